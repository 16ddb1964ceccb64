/* The few Redis Modules API entry points SPIRT uses, declared by us.
 *
 * Names, signatures and constants follow the Redis Modules API reference; the server
 * hands out each entry point by name through the GetApi pointer stored first in the
 * context passed to RedisModule_OnLoad. Everything is reached through the RM table
 * (RM.OpenKey(...)), filled by rm_load_api(). */
#ifndef SPIRT_RM_API_H
#define SPIRT_RM_API_H

#include <stddef.h>
#include <stdint.h>

typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleKey RedisModuleKey;
typedef struct RedisModuleString RedisModuleString;
typedef struct RedisModuleBlockedClient RedisModuleBlockedClient;
typedef struct RedisModuleServerInfoData RedisModuleServerInfoData;

typedef int (*RMCmdFunc)(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
typedef int (*RMNotifyFunc)(RedisModuleCtx *ctx, int type, const char *event,
                            RedisModuleString *key);
typedef void (*RMDisconnectFunc)(RedisModuleCtx *ctx, RedisModuleBlockedClient *bc);
typedef void (*RMFreePrivFunc)(RedisModuleCtx *ctx, void *privdata);

/* Server events are passed by value as {id, data version}. */
typedef struct RMEvent {
    uint64_t id;
    uint64_t dataver;
} RMEvent;
typedef void (*RMEventFunc)(RedisModuleCtx *ctx, RMEvent e, uint64_t subevent, void *data);

enum { RM_OK = 0, RM_ERR = 1, RM_APIVER_1 = 1 };

#define RM_READ (1 << 0)
#define RM_WRITE (1 << 1)

#define RM_NO_EXPIRE (-1LL)

#define RM_KEYTYPE_EMPTY 0
#define RM_KEYTYPE_STRING 1

#define RM_CTX_FLAGS_LUA (1 << 0)
#define RM_CTX_FLAGS_MULTI (1 << 1)
#define RM_CTX_FLAGS_AOF (1 << 6)
#define RM_CTX_FLAGS_REPLICATED (1 << 12)
#define RM_CTX_FLAGS_LOADING (1 << 13)
#define RM_CTX_FLAGS_DENY_BLOCKING (1 << 21)

#define RM_NOTIFY_GENERIC (1 << 2)
#define RM_NOTIFY_STRING (1 << 3)
#define RM_NOTIFY_LIST (1 << 4)
#define RM_NOTIFY_SET (1 << 5)
#define RM_NOTIFY_HASH (1 << 6)
#define RM_NOTIFY_ZSET (1 << 7)
#define RM_NOTIFY_EXPIRED (1 << 8)
#define RM_NOTIFY_EVICTED (1 << 9)
#define RM_NOTIFY_STREAM (1 << 10)
#define RM_NOTIFY_MODULE (1 << 13)
#define RM_NOTIFY_ALL                                                                    \
    (RM_NOTIFY_GENERIC | RM_NOTIFY_STRING | RM_NOTIFY_LIST | RM_NOTIFY_SET |             \
     RM_NOTIFY_HASH | RM_NOTIFY_ZSET | RM_NOTIFY_EXPIRED | RM_NOTIFY_EVICTED |           \
     RM_NOTIFY_STREAM | RM_NOTIFY_MODULE)

#define RM_EVENT_FLUSHDB 2
#define RM_EVENT_LOADING 3
#define RM_EVENT_SWAPDB 11

struct rm_api {
    int (*GetApi)(const char *name, void *out);
    int (*CreateCommand)(RedisModuleCtx *ctx, const char *name, RMCmdFunc fn,
                         const char *flags, int firstkey, int lastkey, int keystep);
    void (*SetModuleAttribs)(RedisModuleCtx *ctx, const char *name, int ver, int apiver);
    int (*IsModuleNameBusy)(const char *name);
    int (*WrongArity)(RedisModuleCtx *ctx);
    int (*ReplyWithError)(RedisModuleCtx *ctx, const char *err);
    int (*ReplyWithSimpleString)(RedisModuleCtx *ctx, const char *msg);
    int (*ReplyWithLongLong)(RedisModuleCtx *ctx, long long v);
    int (*ReplyWithDouble)(RedisModuleCtx *ctx, double v);
    int (*ReplyWithArray)(RedisModuleCtx *ctx, long len);
    int (*ReplyWithStringBuffer)(RedisModuleCtx *ctx, const char *buf, size_t len);
    void *(*OpenKey)(RedisModuleCtx *ctx, RedisModuleString *name, int mode);
    void (*CloseKey)(RedisModuleKey *key);
    int (*KeyType)(RedisModuleKey *key);
    char *(*StringDMA)(RedisModuleKey *key, size_t *len, int mode);
    int (*StringSet)(RedisModuleKey *key, RedisModuleString *str);
    int (*SetExpire)(RedisModuleKey *key, long long expire_ms);
    RedisModuleString *(*CreateString)(RedisModuleCtx *ctx, const char *ptr, size_t len);
    void (*FreeString)(RedisModuleCtx *ctx, RedisModuleString *str);
    void (*RetainString)(RedisModuleCtx *ctx, RedisModuleString *str);
    const char *(*StringPtrLen)(const RedisModuleString *str, size_t *len);
    int (*StringToLongLong)(const RedisModuleString *str, long long *out);
    int (*StringToDouble)(const RedisModuleString *str, double *out);
    int (*ReplicateVerbatim)(RedisModuleCtx *ctx);
    int (*Replicate)(RedisModuleCtx *ctx, const char *cmdname, const char *fmt, ...);
    int (*NotifyKeyspaceEvent)(RedisModuleCtx *ctx, int type, const char *event,
                               RedisModuleString *key);
    int (*GetContextFlags)(RedisModuleCtx *ctx);
    RedisModuleServerInfoData *(*GetServerInfo)(RedisModuleCtx *ctx, const char *section);
    void (*FreeServerInfo)(RedisModuleCtx *ctx, RedisModuleServerInfoData *data);
    long long (*ServerInfoGetFieldSigned)(RedisModuleServerInfoData *data, const char *field,
                                          int *out_err);
    int (*GetSelectedDb)(RedisModuleCtx *ctx);
    int (*IsKeysPositionRequest)(RedisModuleCtx *ctx);
    void (*KeyAtPos)(RedisModuleCtx *ctx, int pos);
    RedisModuleBlockedClient *(*BlockClient)(RedisModuleCtx *ctx, RMCmdFunc reply_cb,
                                             RMCmdFunc timeout_cb, RMFreePrivFunc free_cb,
                                             long long timeout_ms);
    int (*UnblockClient)(RedisModuleBlockedClient *bc, void *privdata);
    void *(*GetBlockedClientPrivateData)(RedisModuleCtx *ctx);
    RedisModuleBlockedClient *(*GetBlockedClientHandle)(RedisModuleCtx *ctx);
    void (*SetDisconnectCallback)(RedisModuleBlockedClient *bc, RMDisconnectFunc cb);
    RedisModuleCtx *(*GetThreadSafeContext)(RedisModuleBlockedClient *bc);
    void (*FreeThreadSafeContext)(RedisModuleCtx *ctx);
    void (*ThreadSafeContextLock)(RedisModuleCtx *ctx);
    void (*ThreadSafeContextUnlock)(RedisModuleCtx *ctx);
    int (*SubscribeToKeyspaceEvents)(RedisModuleCtx *ctx, int types, RMNotifyFunc cb);
    int (*SubscribeToServerEvent)(RedisModuleCtx *ctx, RMEvent event, RMEventFunc cb);
    void (*Log)(RedisModuleCtx *ctx, const char *level, const char *fmt, ...);
};

extern struct rm_api RM;

/* Fills RM from the server behind ctx; RM_ERR if any entry point is missing. */
int rm_load_api(RedisModuleCtx *ctx);

#endif
