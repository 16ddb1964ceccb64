/* SPIRT.* command handlers (syntax in native/README.md). */
#ifndef SPIRT_COMMANDS_H
#define SPIRT_COMMANDS_H

#include "rm_api.h"

#define SPIRT_MODULE_VERSION 1

int cmd_put(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_get(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_mean(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_median(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_trimmean(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_krum(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_geomed(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_cclip(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_sgd(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_adam(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_norm(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_digest(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_pack(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_unpack(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_info(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int cmd_config(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

/* Module arguments: THREADS n, MAX_QUEUE n, ASYNC_MIN_BYTES n, JOB_TIMEOUT_MS n. */
int parse_load_args(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

#endif
