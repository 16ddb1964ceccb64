/* The SPIRT tensor format in Redis (mirrors spirtd/tensorfmt.py):
 *   KEY        raw little-endian float32 values, no header;
 *   KEY:shape  ASCII decimal dims joined by ',' ("" for a scalar).
 * Reading validates both keys; writing sets both. Writes do not propagate anything:
 * each command decides what reaches the AOF and replicas (commands.c, jobs.c). */
#ifndef SPIRT_TENSOR_H
#define SPIRT_TENSOR_H

#include <stddef.h>

#include "rm_api.h"
#include "src.h"

#define SPIRT_MAX_ELEMENTS ((size_t)512 * 1024 * 1024)
#define SPIRT_MAX_DIMS 8
#define SPIRT_MAX_SHAPE_LEN 128

typedef struct {
    /* Valid until the key is modified. Bytes, not floats: a Redis string's buffer follows
     * an odd-sized header, so it is rarely float-aligned (see jobs.c, direct_fetch). */
    const unsigned char *data;
    size_t len;        /* elements */
    char shape[SPIRT_MAX_SHAPE_LEN];
    size_t shape_len;
} TensorView;

/* Parses a shape; 0 and *elems on success, -1 with err (SPIRT_ERRLEN) otherwise. */
int tensor_parse_shape(const char *s, size_t n, size_t *elems, char *err);

/* Opens KEY and KEY:shape for reading. Returns 1 if found (tv filled), 0 if KEY does not
 * exist, -1 with err if it is not a valid tensor (wrong type, bad shape, length). */
int tensor_read(RedisModuleCtx *ctx, RedisModuleString *key, TensorView *tv, char *err);

/* 0 if KEY and KEY:shape are absent or strings (so a write cannot fail), else -1. */
int tensor_check_writable(RedisModuleCtx *ctx, RedisModuleString *key, char *err);

/* Sets KEY and KEY:shape, notifying keyspace subscribers. A float result overwrites an
 * existing value of the same size in place (no allocation); otherwise a new string
 * replaces it like SET (any TTL is dropped either way). */
void tensor_write(RedisModuleCtx *ctx, RedisModuleString *key, RedisModuleString *values,
                  const char *shape, size_t shape_len);
void tensor_write_floats(RedisModuleCtx *ctx, RedisModuleString *key, const float *data,
                         size_t len, const char *shape, size_t shape_len);

/* A plain string output (no shape key: the compressed body of SPIRT.PACK). The check
 * passes when KEY is absent or a string; the write is like SET, in place when KEY
 * already holds a string of that size. */
int plain_check_writable(RedisModuleCtx *ctx, RedisModuleString *key, char *err);
void plain_write_bytes(RedisModuleCtx *ctx, RedisModuleString *key, const void *data,
                       size_t bytes);

/* Sets a time to live on KEY and KEY:shape (both written just before). */
void tensor_expire(RedisModuleCtx *ctx, RedisModuleString *key, long long ms);

/* Propagates the effect of a write of these floats to KEY (SET of KEY and KEY:shape) to
 * the AOF and replicas, so replaying it needs none of the command's inputs. */
void tensor_replicate_floats(RedisModuleCtx *ctx, RedisModuleString *key, const float *data,
                             size_t len, const char *shape, size_t shape_len);

/* Printable, truncated rendering of a key name for error messages. */
const char *tensor_key_label(RedisModuleString *key, char *buf, size_t cap);

#endif
