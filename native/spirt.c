/* SPIRT Redis module (skeleton; the tensor commands follow). */
#include <stddef.h>
#include <stdint.h>

#define RM_OK 0
#define RM_ERR 1
#define RM_APIVER_1 1

typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleString RedisModuleString;
typedef int (*RMCmdFunc)(RedisModuleCtx *, RedisModuleString **, int);

static int (*RM_GetApi)(const char *, void *);
static int (*RM_CreateCommand)(RedisModuleCtx *, const char *, RMCmdFunc, const char *, int, int, int);
static void (*RM_SetModuleAttribs)(RedisModuleCtx *, const char *, int, int);
static int (*RM_IsModuleNameBusy)(const char *);
static int (*RM_ReplyWithSimpleString)(RedisModuleCtx *, const char *);

static int cmd_info(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv; (void)argc;
    return RM_ReplyWithSimpleString(ctx, "spirt");
}

__attribute__((visibility("default")))
int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv; (void)argc;
    RM_GetApi = (int (*)(const char *, void *))((void **)ctx)[0];
    if (RM_GetApi("RedisModule_CreateCommand", &RM_CreateCommand) != RM_OK) return RM_ERR;
    if (RM_GetApi("RedisModule_SetModuleAttribs", &RM_SetModuleAttribs) != RM_OK) return RM_ERR;
    if (RM_GetApi("RedisModule_IsModuleNameBusy", &RM_IsModuleNameBusy) != RM_OK) return RM_ERR;
    if (RM_GetApi("RedisModule_ReplyWithSimpleString", &RM_ReplyWithSimpleString) != RM_OK) return RM_ERR;
    if (RM_IsModuleNameBusy("spirt")) return RM_ERR;
    RM_SetModuleAttribs(ctx, "spirt", 1, RM_APIVER_1);
    if (RM_CreateCommand(ctx, "spirt.info", cmd_info, "readonly fast", 0, 0, 0) != RM_OK) return RM_ERR;
    return RM_OK;
}
