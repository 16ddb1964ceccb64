/* SPIRT.PACK and SPIRT.UNPACK: a float32 tensor to and from a compressed body
 * (codec.h), with error feedback. Parsed in commands.c; syntax in native/README.md. */
#ifndef SPIRT_PACK_H
#define SPIRT_PACK_H

#include <stddef.h>

#include "codec.h"
#include "jobs.h"
#include "rm_api.h"
#include "src.h"

typedef struct {
    CodecFormat fmt;
    RedisModuleString *dst;
    RedisModuleString *src;
    RedisModuleString *base;     /* PACK: v = base - src (NULL: v = src) */
    RedisModuleString *residual; /* PACK: added to v, then replaced by what v lost */
    size_t count;                /* UNPACK: values in the body */
    int scratch;                 /* outputs not propagated (AOF, replicas) */
} PackArgs;

/* Both validate everything before writing anything, and reply. PACK runs as a job
 * (jobs.h: on a worker thread when large); UNPACK on the main thread. */
int pack_run(RedisModuleCtx *ctx, const PackArgs *a);
int unpack_run(RedisModuleCtx *ctx, const PackArgs *a);

/* PACK's computation over its input rows (src, then base and/or the residual as the
 * params say; an absent residual row is zeros), chunk by chunk: the body into `body`
 * (codec_encoded_size bytes), the new residual into res_out (NULL without RESIDUAL).
 * 0, or -1 with the message in s->err. */
int pack_compute(Src *s, const struct JobParams *p, unsigned char *body, float *res_out);

#endif
