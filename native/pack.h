/* SPIRT.PACK and SPIRT.UNPACK: a float32 tensor to and from a compressed body
 * (codec.h), with error feedback. Parsed in commands.c; run here, on the main thread
 * (see native/README.md for why and for the syntax). */
#ifndef SPIRT_PACK_H
#define SPIRT_PACK_H

#include <stddef.h>

#include "codec.h"
#include "rm_api.h"

typedef struct {
    CodecFormat fmt;
    RedisModuleString *dst;
    RedisModuleString *src;
    RedisModuleString *base;     /* PACK: v = base - src (NULL: v = src) */
    RedisModuleString *residual; /* PACK: added to v, then replaced by what v lost */
    size_t count;                /* UNPACK: values in the body */
    int scratch;                 /* outputs not propagated (AOF, replicas) */
} PackArgs;

/* Both validate everything before writing anything, and reply. */
int pack_run(RedisModuleCtx *ctx, const PackArgs *a);
int unpack_run(RedisModuleCtx *ctx, const PackArgs *a);

#endif
