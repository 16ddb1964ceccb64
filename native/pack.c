#include "pack.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs.h"
#include "kernels.h"
#include "scratch.h"
#include "tensor.h"

static int reply_err(RedisModuleCtx *ctx, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static int reply_err(RedisModuleCtx *ctx, const char *fmt, ...) {
    char msg[SPIRT_ERRLEN], buf[SPIRT_ERRLEN + 16];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    snprintf(buf, sizeof(buf), "ERR SPIRT %s", msg);
    return RM.ReplyWithError(ctx, buf);
}

/* UNPACK's output reaches the AOF and replicas by value unless SCRATCH, as job outputs
 * do (jobs.c); with nothing to receive it, the write is only counted as a change. */
static void propagate(RedisModuleCtx *ctx, const PackArgs *a, const float *floats, size_t n,
                      const char *shape, size_t shape_len) {
    if (a->scratch) return;
    if (!jobs_propagation_delivered(ctx)) {
        RM.Replicate(ctx, "PING", "AR");
        return;
    }
    tensor_replicate_floats(ctx, a->dst, floats, n, shape, shape_len);
}

/* v = (base - src) + residual in float64, rounded once to float32: the order the store's
 * client-side path uses too, so both give the same bits. */
static void combine(const f32u *src, const f32u *base, const f32u *res, float *v, size_t n) {
    if (base && res)
        for (size_t i = 0; i < n; i++) v[i] = (float)(((double)base[i] - src[i]) + res[i]);
    else if (base)
        for (size_t i = 0; i < n; i++) v[i] = (float)((double)base[i] - src[i]);
    else if (res)
        for (size_t i = 0; i < n; i++) v[i] = (float)((double)src[i] + res[i]);
    else
        memcpy(v, (const void *)src, n * sizeof(float));
}

int pack_compute(Src *s, const struct JobParams *p, unsigned char *body, float *res_out) {
    size_t n = s->len;
    /* Whole int8 blocks per fetch, so each chunk encodes on its own. */
    size_t step = s->chunk - s->chunk % CODEC_BLOCK;
    if (step == 0) return src_fail(s, "internal: a fetch of %zu values is below a block", s->chunk);
    int need_v = p->pack_has_base || p->pack_has_res;
    /* v goes into the buffer that becomes the new residual, or a chunk of its own with
     * BASE alone; with neither, src is encoded as fetched. */
    float *tmp = need_v && !res_out ? malloc(step * sizeof(float)) : NULL;
    if (need_v && !res_out && !tmp) return src_fail(s, "out of memory");
    const f32u *rows[3] = {NULL, NULL, NULL};
    int rc = 0;
    for (size_t off = 0; off < n && !rc; off += step) {
        size_t cnt = n - off < step ? n - off : step;
        if (s->fetch(s, off, cnt, rows)) {
            rc = -1;
            break;
        }
        const f32u *v = rows[0];
        if (need_v) {
            float *out = res_out ? res_out + off : tmp;
            combine(rows[0], p->pack_has_base ? rows[1] : NULL,
                    p->pack_has_res ? rows[p->pack_has_base ? 2 : 1] : NULL, out, cnt);
            /* The inputs were checked as fetched: only the arithmetic can overflow. */
            size_t bad = k_first_nonfinite(out, cnt);
            if (bad < cnt) {
                rc = src_fail(s, "non-finite value at index %zu of the vector to pack "
                                 "(base - src + residual overflows float32)", off + bad);
                break;
            }
            v = out;
        }
        size_t bad = 0;
        if (codec_encode(p->pack_fmt, v, off, cnt, n, body, res_out ? res_out + off : NULL, &bad)) {
            if (p->pack_fmt == CODEC_FP16)
                rc = src_fail(s, "non-finite value in fp16 at index %zu: %g is beyond %g", bad,
                              (double)v[bad - off], (double)CODEC_FP16_MAX);
            else
                rc = src_fail(s, "non-finite value in int8 block %zu: its range overflows float32",
                              bad);
        }
    }
    free(tmp);
    return rc;
}

int pack_run(RedisModuleCtx *ctx, const PackArgs *a) {
    Job *job = job_new(OP_PACK);
    if (!job) return RM.ReplyWithError(ctx, "ERR SPIRT out of memory");
    struct JobParams *p = job_params(job);
    p->pack_fmt = a->fmt;
    p->pack_has_base = a->base != NULL;
    p->pack_has_res = a->residual != NULL;
    p->scratch = a->scratch;
    job_add_input(job, a->src, 0);
    if (a->base) job_add_input(job, a->base, 0);
    if (a->residual) {
        job_add_input(job, a->residual, 1); /* absent: zeros */
        job_add_output(job, a->residual);
    }
    job_set_plain_output(job, a->dst);
    return job_submit(ctx, job);
}

int unpack_run(RedisModuleCtx *ctx, const PackArgs *a) {
    char err[SPIRT_ERRLEN], label[80];
    const char *fmt = codec_name(a->fmt);
    size_t n = a->count, need = codec_encoded_size(a->fmt, n);
    if (tensor_check_writable(ctx, a->dst, err)) return reply_err(ctx, "%s", err);
    RedisModuleKey *k = RM.OpenKey(ctx, a->src, RM_READ);
    int type = k ? RM.KeyType(k) : RM_KEYTYPE_EMPTY;
    if (type != RM_KEYTYPE_STRING) {
        if (k) RM.CloseKey(k);
        tensor_key_label(a->src, label, sizeof(label));
        if (type == RM_KEYTYPE_EMPTY) return reply_err(ctx, "missing key '%s'", label);
        return reply_err(ctx, "key '%s' holds the wrong type (not a string)", label);
    }
    size_t have;
    const unsigned char *body = (const unsigned char *)RM.StringDMA(k, &have, RM_READ);
    RM.CloseKey(k);
    tensor_key_label(a->src, label, sizeof(label));
    /* The size is checked before anything is allocated for n values. */
    if (have != need)
        return reply_err(ctx, "size mismatch: '%s' has %zu bytes where %s of %zu values needs %zu",
                         label, have, fmt, n, need);
    size_t bad = codec_first_bad(a->fmt, body, n);
    if (a->fmt == CODEC_FP16 && bad < n) {
        uint16_t h;
        memcpy(&h, body + 2 * bad, sizeof(h));
        return reply_err(ctx, "non-finite value in '%s' at index %zu (fp16 0x%04x)", label, bad,
                         (unsigned)h);
    }
    if (a->fmt == CODEC_INT8 && bad < codec_blocks(n)) {
        float sc, off;
        memcpy(&sc, body + CODEC_HEADER * bad, sizeof(sc));
        memcpy(&off, body + CODEC_HEADER * bad + 4, sizeof(off));
        return reply_err(ctx,
                         "non-finite value in '%s': int8 block %zu has a malformed header "
                         "(scale %g, offset %g)",
                         label, bad, (double)sc, (double)off);
    }
    float *out = scratch_take(n * sizeof(float));
    if (!out) return reply_err(ctx, "out of memory for %zu values", n);
    codec_decode(a->fmt, body, n, out);
    char shape[32];
    int sl = snprintf(shape, sizeof(shape), "%zu", n);
    tensor_write_floats(ctx, a->dst, out, n, shape, (size_t)sl);
    propagate(ctx, a, out, n, shape, (size_t)sl);
    scratch_give(out, n * sizeof(float));
    return RM.ReplyWithSimpleString(ctx, "OK");
}
