#include "pack.h"

#include <stdarg.h>
#include <stdio.h>
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

static const f32u *floats_of(const TensorView *tv) {
    return (const f32u *)(const void *)tv->data;
}

/* 0, or -1 with err naming the first non-finite value of the input. */
static int check_finite(RedisModuleString *key, const TensorView *tv, char *err) {
    size_t bad = k_first_nonfinite(floats_of(tv), tv->len);
    if (bad == tv->len) return 0;
    char label[80];
    snprintf(err, SPIRT_ERRLEN, "non-finite value in '%s' at index %zu",
             tensor_key_label(key, label, sizeof(label)), bad);
    return -1;
}

/* Reads a required (or, with optional, possibly absent) tensor input; 1 if present,
 * 0 if absent and optional, -1 with err otherwise. */
static int read_input(RedisModuleCtx *ctx, RedisModuleString *key, int optional, TensorView *tv,
                      char *err) {
    int rc = tensor_read(ctx, key, tv, err);
    if (rc == 0 && !optional) {
        char label[80];
        snprintf(err, SPIRT_ERRLEN, "missing key '%s'", tensor_key_label(key, label, sizeof(label)));
        return -1;
    }
    return rc;
}

static int same_len(const TensorView *a, RedisModuleString *ka, const TensorView *b,
                    RedisModuleString *kb, char *err) {
    if (a->len == b->len) return 0;
    char la[80], lb[80];
    snprintf(err, SPIRT_ERRLEN, "length mismatch: '%s' has %zu elements, '%s' has %zu",
             tensor_key_label(ka, la, sizeof(la)), a->len, tensor_key_label(kb, lb, sizeof(lb)),
             b->len);
    return -1;
}

/* Non-scratch outputs reach the AOF and replicas by value (as jobs.c's do); with nothing
 * to receive them, the write is only counted as a change (RDB save points). */
static void propagate(RedisModuleCtx *ctx, const PackArgs *a, const unsigned char *body,
                      size_t body_len, const float *floats, size_t n, RedisModuleString *fkey,
                      const char *shape, size_t shape_len) {
    if (a->scratch) return;
    if (!jobs_propagation_delivered(ctx)) {
        RM.Replicate(ctx, "PING", "AR");
        return;
    }
    if (body) RM.Replicate(ctx, "SET", "sb", a->dst, (const char *)body, body_len);
    if (floats) tensor_replicate_floats(ctx, fkey, floats, n, shape, shape_len);
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

int pack_run(RedisModuleCtx *ctx, const PackArgs *a) {
    char err[SPIRT_ERRLEN];
    TensorView src, base, res;
    int have_res = 0;
    if (read_input(ctx, a->src, 0, &src, err) < 0) return reply_err(ctx, "%s", err);
    if (a->base && (read_input(ctx, a->base, 0, &base, err) < 0 ||
                    same_len(&base, a->base, &src, a->src, err)))
        return reply_err(ctx, "%s", err);
    if (a->residual) {
        have_res = read_input(ctx, a->residual, 1, &res, err);
        if (have_res < 0 || (have_res && same_len(&res, a->residual, &src, a->src, err)))
            return reply_err(ctx, "%s", err);
    }
    if (plain_check_writable(ctx, a->dst, err) ||
        (a->residual && tensor_check_writable(ctx, a->residual, err)))
        return reply_err(ctx, "%s", err);

    size_t n = src.len, body_len = codec_encoded_size(a->fmt, n);
    const f32u *s = floats_of(&src);
    /* With a residual output, v is computed into the buffer that becomes the new
     * residual; with neither BASE nor RESIDUAL, src is encoded in place. */
    int need_v = a->base || a->residual;
    float *v = need_v ? scratch_take(n * sizeof(float)) : NULL;
    unsigned char *body = scratch_take(body_len);
    if ((need_v && !v) || !body) {
        scratch_give(v, n * sizeof(float));
        scratch_give(body, body_len);
        return reply_err(ctx, "out of memory for a %zu-element vector", n);
    }
    const f32u *vin = s;
    int refused = 0;
    if (!need_v) {
        refused = check_finite(a->src, &src, err);
    } else {
        combine(s, a->base ? floats_of(&base) : NULL, have_res ? floats_of(&res) : NULL, v, n);
        vin = v;
        /* A non-finite input makes v non-finite: one pass over v checks all of them, and
         * only a refusal looks for the input to blame. */
        size_t bad = k_first_nonfinite(vin, n);
        if (bad < n) {
            refused = check_finite(a->src, &src, err) ||
                      (a->base && check_finite(a->base, &base, err)) ||
                      (have_res && check_finite(a->residual, &res, err));
            if (!refused) {
                refused = 1;
                snprintf(err, sizeof(err),
                         "non-finite value at index %zu of the vector to pack "
                         "(base - src + residual overflows float32)",
                         bad);
            }
        }
    }
    if (refused) {
        scratch_give(v, n * sizeof(float));
        scratch_give(body, body_len);
        return reply_err(ctx, "%s", err);
    }
    size_t bad = 0;
    int rc = codec_encode(a->fmt, vin, n, body, a->residual ? v : NULL, &bad);
    if (rc) {
        scratch_give(v, n * sizeof(float));
        scratch_give(body, body_len);
        if (a->fmt == CODEC_FP16)
            return reply_err(ctx, "non-finite value in fp16 at index %zu: %g is beyond %g", bad,
                             (double)vin[bad], (double)CODEC_FP16_MAX);
        return reply_err(ctx, "non-finite value in int8 block %zu: its range overflows float32",
                         bad);
    }
    plain_write_bytes(ctx, a->dst, body, body_len);
    if (a->residual) tensor_write_floats(ctx, a->residual, v, n, src.shape, src.shape_len);
    propagate(ctx, a, body, body_len, a->residual ? v : NULL, n, a->residual, src.shape,
              src.shape_len);
    scratch_give(v, n * sizeof(float));
    scratch_give(body, body_len);
    return RM.ReplyWithLongLong(ctx, (long long)body_len);
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
    propagate(ctx, a, NULL, 0, out, n, a->dst, shape, (size_t)sl);
    scratch_give(out, n * sizeof(float));
    return RM.ReplyWithSimpleString(ctx, "OK");
}
