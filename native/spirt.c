/* SPIRT Redis module: in-database tensor aggregation and model updates.
 *
 * Entry point only: loads the API table, reads the module arguments, starts the worker
 * threads and registers the SPIRT.* commands. The commands are documented in
 * native/README.md; the code is split by concern (tensor format, jobs and threads,
 * rules, optimizers, kernels, BLAKE2b). */
#include "codec.h"
#include "commands.h"
#include "jobs.h"
#include "kernels.h"
#include "rm_api.h"

typedef struct {
    const char *name;
    RMCmdFunc fn;
    const char *flags;
    int first, last, step;
} CommandSpec;

/* Commands with a variable key layout declare getkeys-api and report their keys. */
static const CommandSpec COMMANDS[] = {
    {"spirt.put", cmd_put, "write deny-oom", 1, 1, 1},
    {"spirt.get", cmd_get, "readonly", 1, 1, 1},
    {"spirt.mean", cmd_mean, "write deny-oom getkeys-api", 1, 1, 1},
    {"spirt.median", cmd_median, "write deny-oom getkeys-api", 1, 1, 1},
    {"spirt.trimmean", cmd_trimmean, "write deny-oom getkeys-api", 1, 1, 1},
    {"spirt.krum", cmd_krum, "write deny-oom getkeys-api", 1, 1, 1},
    {"spirt.geomed", cmd_geomed, "write deny-oom getkeys-api", 1, 1, 1},
    {"spirt.cclip", cmd_cclip, "write deny-oom getkeys-api", 1, 1, 1},
    {"spirt.sgd", cmd_sgd, "write deny-oom getkeys-api", 1, 2, 1},
    {"spirt.adam", cmd_adam, "write deny-oom getkeys-api", 1, 2, 1},
    {"spirt.norm", cmd_norm, "readonly getkeys-api", 1, 1, 1},
    {"spirt.digest", cmd_digest, "readonly getkeys-api", 1, 1, 1},
    {"spirt.pack", cmd_pack, "write deny-oom getkeys-api", 1, 2, 1},
    {"spirt.unpack", cmd_unpack, "write deny-oom", 1, 2, 1},
    {"spirt.info", cmd_info, "readonly fast", 0, 0, 0},
    {"spirt.config", cmd_config, "admin", 0, 0, 0},
};

__attribute__((visibility("default"))) int RedisModule_OnLoad(RedisModuleCtx *ctx,
                                                              RedisModuleString **argv,
                                                              int argc) {
    if (rm_load_api(ctx) != RM_OK) return RM_ERR;
    if (RM.IsModuleNameBusy("spirt")) return RM_ERR;
    RM.SetModuleAttribs(ctx, "spirt", SPIRT_MODULE_VERSION, RM_APIVER_1);
    if (parse_load_args(ctx, argv, argc) != RM_OK) return RM_ERR;
    codec_init();
    for (size_t i = 0; i < sizeof(COMMANDS) / sizeof(COMMANDS[0]); i++) {
        const CommandSpec *c = &COMMANDS[i];
        if (RM.CreateCommand(ctx, c->name, c->fn, c->flags, c->first, c->last, c->step) != RM_OK) {
            RM.Log(ctx, "warning", "spirt: cannot register %s", c->name);
            return RM_ERR;
        }
    }
    if (jobs_init(ctx) != RM_OK) {
        RM.Log(ctx, "warning", "spirt: cannot start worker threads or subscribe to events");
        return RM_ERR;
    }
    RM.Log(ctx, "notice", "spirt: loaded (%s kernels, %lld threads, async from %lld bytes)",
           k_isa(), jobs_config.threads, jobs_config.async_min_bytes);
    return RM_OK;
}

/* Worker threads may hold pointers into the module: refuse to be unloaded. */
__attribute__((visibility("default"))) int RedisModule_OnUnload(RedisModuleCtx *ctx) {
    (void)ctx;
    return RM_ERR;
}
