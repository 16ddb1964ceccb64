#include "tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char SHAPE_SUFFIX[] = ":shape";

const char *tensor_key_label(RedisModuleString *key, char *buf, size_t cap) {
    size_t n;
    const char *p = RM.StringPtrLen(key, &n);
    size_t lim = cap - 4, o = 0;
    for (size_t i = 0; i < n && o < lim; i++)
        buf[o++] = (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\'') ? p[i] : '?';
    if (n > lim) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
    return buf;
}

static RedisModuleString *shape_key(RedisModuleCtx *ctx, RedisModuleString *key) {
    size_t n;
    const char *p = RM.StringPtrLen(key, &n);
    char stackbuf[256];
    char *buf = n + sizeof(SHAPE_SUFFIX) <= sizeof(stackbuf) ? stackbuf : malloc(n + sizeof(SHAPE_SUFFIX));
    if (!buf) return NULL;
    memcpy(buf, p, n);
    memcpy(buf + n, SHAPE_SUFFIX, sizeof(SHAPE_SUFFIX) - 1);
    RedisModuleString *s = RM.CreateString(ctx, buf, n + sizeof(SHAPE_SUFFIX) - 1);
    if (buf != stackbuf) free(buf);
    return s;
}

int tensor_parse_shape(const char *s, size_t n, size_t *elems, char *err) {
    size_t total = 1, dims = 0, i = 0;
    if (n == 0) {
        *elems = 1;
        return 0;
    }
    if (n >= SPIRT_MAX_SHAPE_LEN) {
        snprintf(err, SPIRT_ERRLEN, "shape string too long (%zu bytes)", n);
        return -1;
    }
    while (i <= n) {
        size_t start = i, d = 0;
        while (i < n && s[i] != ',') {
            if (s[i] < '0' || s[i] > '9' || i - start >= 12) {
                snprintf(err, SPIRT_ERRLEN, "bad shape '%.*s'", (int)n, s);
                return -1;
            }
            d = d * 10 + (size_t)(s[i] - '0');
            i++;
        }
        if (i == start) {
            snprintf(err, SPIRT_ERRLEN, "bad shape '%.*s' (empty dimension)", (int)n, s);
            return -1;
        }
        if (++dims > SPIRT_MAX_DIMS) {
            snprintf(err, SPIRT_ERRLEN, "shape has more than %d dimensions", SPIRT_MAX_DIMS);
            return -1;
        }
        if (d != 0 && total > SPIRT_MAX_ELEMENTS / d) {
            snprintf(err, SPIRT_ERRLEN, "tensor too large (more than %zu elements)",
                     SPIRT_MAX_ELEMENTS);
            return -1;
        }
        total *= d;
        i++; /* skip ',' (or step past the end) */
    }
    *elems = total;
    return 0;
}

int tensor_read(RedisModuleCtx *ctx, RedisModuleString *key, TensorView *tv, char *err) {
    char label[80];
    RedisModuleKey *k = RM.OpenKey(ctx, key, RM_READ);
    if (!k || RM.KeyType(k) == RM_KEYTYPE_EMPTY) {
        if (k) RM.CloseKey(k);
        return 0;
    }
    if (RM.KeyType(k) != RM_KEYTYPE_STRING) {
        RM.CloseKey(k);
        snprintf(err, SPIRT_ERRLEN, "key '%s' holds the wrong type (not a string tensor)",
                 tensor_key_label(key, label, sizeof(label)));
        return -1;
    }
    size_t bytes;
    const char *data = RM.StringDMA(k, &bytes, RM_READ);
    RM.CloseKey(k);

    RedisModuleString *sk = shape_key(ctx, key);
    if (!sk) {
        snprintf(err, SPIRT_ERRLEN, "out of memory");
        return -1;
    }
    RedisModuleKey *s = RM.OpenKey(ctx, sk, RM_READ);
    int st = s ? RM.KeyType(s) : RM_KEYTYPE_EMPTY;
    RM.FreeString(ctx, sk);
    if (st != RM_KEYTYPE_STRING) {
        if (s) RM.CloseKey(s);
        snprintf(err, SPIRT_ERRLEN, "%s shape key '%s:shape'",
                 st == RM_KEYTYPE_EMPTY ? "missing" : "wrong type at",
                 tensor_key_label(key, label, sizeof(label)));
        return -1;
    }
    size_t slen;
    const char *sp = RM.StringDMA(s, &slen, RM_READ);
    if (slen >= SPIRT_MAX_SHAPE_LEN) {
        RM.CloseKey(s);
        snprintf(err, SPIRT_ERRLEN, "shape of '%s' is too long",
                 tensor_key_label(key, label, sizeof(label)));
        return -1;
    }
    memcpy(tv->shape, sp, slen);
    tv->shape[slen] = '\0';
    tv->shape_len = slen;
    RM.CloseKey(s);

    size_t elems;
    char perr[SPIRT_ERRLEN];
    if (tensor_parse_shape(tv->shape, slen, &elems, perr)) {
        snprintf(err, SPIRT_ERRLEN, "'%s': %.150s", tensor_key_label(key, label, sizeof(label)), perr);
        return -1;
    }
    if (bytes != elems * sizeof(float)) {
        snprintf(err, SPIRT_ERRLEN,
                 "length mismatch: '%s' has %zu bytes but shape '%.60s' needs %zu",
                 tensor_key_label(key, label, sizeof(label)), bytes, tv->shape,
                 elems * sizeof(float));
        return -1;
    }
    tv->data = (const unsigned char *)data;
    tv->len = elems;
    return 1;
}

static int writable(RedisModuleCtx *ctx, RedisModuleString *name) {
    RedisModuleKey *k = RM.OpenKey(ctx, name, RM_READ);
    if (!k) return 1;
    int t = RM.KeyType(k);
    RM.CloseKey(k);
    return t == RM_KEYTYPE_EMPTY || t == RM_KEYTYPE_STRING;
}

int tensor_check_writable(RedisModuleCtx *ctx, RedisModuleString *key, char *err) {
    char label[80];
    if (!writable(ctx, key)) {
        snprintf(err, SPIRT_ERRLEN, "output key '%s' holds the wrong type (not a string)",
                 tensor_key_label(key, label, sizeof(label)));
        return -1;
    }
    RedisModuleString *sk = shape_key(ctx, key);
    if (!sk) {
        snprintf(err, SPIRT_ERRLEN, "out of memory");
        return -1;
    }
    int ok = writable(ctx, sk);
    RM.FreeString(ctx, sk);
    if (!ok) {
        snprintf(err, SPIRT_ERRLEN, "output key '%s:shape' holds the wrong type (not a string)",
                 tensor_key_label(key, label, sizeof(label)));
        return -1;
    }
    return 0;
}

static void set_string(RedisModuleCtx *ctx, RedisModuleString *name, RedisModuleString *value) {
    RedisModuleKey *k = RM.OpenKey(ctx, name, RM_WRITE);
    RM.StringSet(k, value);
    RM.CloseKey(k);
    RM.NotifyKeyspaceEvent(ctx, RM_NOTIFY_STRING, "set", name);
}

static void set_shape(RedisModuleCtx *ctx, RedisModuleString *key, const char *shape,
                      size_t shape_len) {
    RedisModuleString *sk = shape_key(ctx, key);
    RedisModuleString *sv = RM.CreateString(ctx, shape, shape_len);
    if (sk) {
        set_string(ctx, sk, sv);
        RM.FreeString(ctx, sk);
    }
    RM.FreeString(ctx, sv);
}

void tensor_write(RedisModuleCtx *ctx, RedisModuleString *key, RedisModuleString *values,
                  const char *shape, size_t shape_len) {
    set_string(ctx, key, values);
    set_shape(ctx, key, shape, shape_len);
}

/* Overwrites KEY's value in place when it is a string of exactly `bytes` bytes (like SET:
 * the TTL is dropped, keyspace subscribers are told); returns 0 when it is not. */
static int overwrite_in_place(RedisModuleCtx *ctx, RedisModuleString *key, const void *data,
                              size_t bytes) {
    RedisModuleKey *k = RM.OpenKey(ctx, key, RM_WRITE);
    if (RM.KeyType(k) == RM_KEYTYPE_STRING && bytes > 0) {
        size_t have;
        /* Read-mode DMA only peeks at the length; write mode then unshares if needed. */
        RM.StringDMA(k, &have, RM_READ);
        if (have == bytes) {
            char *dst = RM.StringDMA(k, &have, RM_WRITE);
            if (dst && have == bytes) {
                memcpy(dst, data, bytes);
                RM.SetExpire(k, RM_NO_EXPIRE);
                RM.CloseKey(k); /* signals the modification (WATCH) */
                RM.NotifyKeyspaceEvent(ctx, RM_NOTIFY_STRING, "set", key);
                return 1;
            }
        }
    }
    RM.CloseKey(k);
    return 0;
}

void tensor_write_floats(RedisModuleCtx *ctx, RedisModuleString *key, const float *data,
                         size_t len, const char *shape, size_t shape_len) {
    size_t bytes = len * sizeof(float);
    if (overwrite_in_place(ctx, key, data, bytes)) {
        set_shape(ctx, key, shape, shape_len);
        return;
    }
    RedisModuleString *v = RM.CreateString(ctx, (const char *)data, bytes);
    tensor_write(ctx, key, v, shape, shape_len);
    RM.FreeString(ctx, v);
}

int plain_check_writable(RedisModuleCtx *ctx, RedisModuleString *key, char *err) {
    char label[80];
    if (writable(ctx, key)) return 0;
    snprintf(err, SPIRT_ERRLEN, "output key '%s' holds the wrong type (not a string)",
             tensor_key_label(key, label, sizeof(label)));
    return -1;
}

void plain_write_bytes(RedisModuleCtx *ctx, RedisModuleString *key, const void *data,
                       size_t bytes) {
    if (overwrite_in_place(ctx, key, data, bytes)) return;
    RedisModuleString *v = RM.CreateString(ctx, (const char *)data, bytes);
    set_string(ctx, key, v);
    RM.FreeString(ctx, v);
}

void tensor_replicate_floats(RedisModuleCtx *ctx, RedisModuleString *key, const float *data,
                             size_t len, const char *shape, size_t shape_len) {
    RedisModuleString *sk = shape_key(ctx, key);
    if (!sk) return;
    RM.Replicate(ctx, "SET", "sb", key, (const char *)data, len * sizeof(float));
    RM.Replicate(ctx, "SET", "sb", sk, shape, shape_len);
    RM.FreeString(ctx, sk);
}

static void expire_one(RedisModuleCtx *ctx, RedisModuleString *name, long long ms) {
    RedisModuleKey *k = RM.OpenKey(ctx, name, RM_WRITE);
    RM.SetExpire(k, ms);
    RM.CloseKey(k);
}

void tensor_expire(RedisModuleCtx *ctx, RedisModuleString *key, long long ms) {
    RedisModuleString *sk = shape_key(ctx, key);
    expire_one(ctx, key, ms);
    if (sk) {
        expire_one(ctx, sk, ms);
        RM.FreeString(ctx, sk);
    }
}
