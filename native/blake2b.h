/* BLAKE2b (RFC 7693), unkeyed, streaming. Used for SPIRT.DIGEST so that a tensor's
 * digest equals Python's hashlib.blake2b(values, digest_size=32).hexdigest(). */
#ifndef SPIRT_BLAKE2B_H
#define SPIRT_BLAKE2B_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t h[8];
    uint64_t t[2];      /* bytes hashed so far, 128-bit */
    uint8_t buf[128];   /* pending block: the last one is compressed by final() */
    size_t buflen;
    size_t outlen;
} blake2b_state;

void blake2b_init(blake2b_state *s, size_t outlen); /* 1 <= outlen <= 64 */
void blake2b_update(blake2b_state *s, const void *data, size_t len);
void blake2b_final(blake2b_state *s, uint8_t *out);

#endif
