#include "rm_api.h"

struct rm_api RM;

#define LOAD(name)                                                                       \
    do {                                                                                 \
        if (RM.GetApi("RedisModule_" #name, (void *)&RM.name) != RM_OK || !RM.name)      \
            return RM_ERR;                                                               \
    } while (0)

int rm_load_api(RedisModuleCtx *ctx) {
    /* The server stores its GetApi function first in every module context. */
    void *getapi = ((void **)ctx)[0];
    RM.GetApi = (int (*)(const char *, void *))(uintptr_t)getapi;
    if (!RM.GetApi) return RM_ERR;
    LOAD(CreateCommand);
    LOAD(SetModuleAttribs);
    LOAD(IsModuleNameBusy);
    LOAD(WrongArity);
    LOAD(ReplyWithError);
    LOAD(ReplyWithSimpleString);
    LOAD(ReplyWithLongLong);
    LOAD(ReplyWithDouble);
    LOAD(ReplyWithArray);
    LOAD(ReplyWithStringBuffer);
    LOAD(OpenKey);
    LOAD(CloseKey);
    LOAD(KeyType);
    LOAD(StringDMA);
    LOAD(StringSet);
    LOAD(SetExpire);
    LOAD(CreateString);
    LOAD(FreeString);
    LOAD(RetainString);
    LOAD(StringPtrLen);
    LOAD(StringToLongLong);
    LOAD(StringToDouble);
    LOAD(ReplicateVerbatim);
    LOAD(Replicate);
    LOAD(NotifyKeyspaceEvent);
    LOAD(GetContextFlags);
    LOAD(GetServerInfo);
    LOAD(FreeServerInfo);
    LOAD(ServerInfoGetFieldSigned);
    LOAD(GetSelectedDb);
    LOAD(IsKeysPositionRequest);
    LOAD(KeyAtPos);
    LOAD(BlockClient);
    LOAD(UnblockClient);
    LOAD(GetBlockedClientPrivateData);
    LOAD(GetBlockedClientHandle);
    LOAD(SetDisconnectCallback);
    LOAD(GetThreadSafeContext);
    LOAD(FreeThreadSafeContext);
    LOAD(ThreadSafeContextLock);
    LOAD(ThreadSafeContextUnlock);
    LOAD(SubscribeToKeyspaceEvents);
    LOAD(SubscribeToServerEvent);
    LOAD(Log);
    return RM_OK;
}
