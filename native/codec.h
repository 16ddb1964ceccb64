/* The compressed formats of a published vector (protocol/compression.py defines them):
 *
 *   fp16  n little-endian IEEE binary16;
 *   int8  every block's header (scale, offset: two little-endian float32) for blocks of
 *         CODEC_BLOCK values (the last may be shorter), then one code byte per value;
 *         value = float32(double(offset) + double(code) * double(scale)).
 *
 * Pure functions over byte buffers at any alignment (no Redis here), so that the
 * decoding every peer must agree on bit for bit sits in one small place. Decoding
 * needs a checked body (codec_first_bad); encoding needs finite input (and |v| <= 65504
 * for fp16). Little-endian hosts only, like the rest of the module. */
#ifndef SPIRT_CODEC_H
#define SPIRT_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "src.h"

#define CODEC_BLOCK 4096
#define CODEC_HEADER 8
#define CODEC_CODES 255
#define CODEC_FP16_MAX 65504.0f

typedef enum { CODEC_FP16, CODEC_INT8 } CodecFormat;

const char *codec_name(CodecFormat fmt);

/* Picks the half conversions (F16C with the AVX2 kernel set); call once at load, after
 * the kernel set is chosen. */
void codec_init(void);

static inline size_t codec_blocks(size_t n) { return (n + CODEC_BLOCK - 1) / CODEC_BLOCK; }

/* Exact body size of n values (n <= SPIRT_MAX_ELEMENTS: no overflow). */
size_t codec_encoded_size(CodecFormat fmt, size_t n);

/* Exact binary16 -> float32 of a finite half (every one is representable). */
float codec_half_to_float(uint16_t h);
/* float32 -> binary16, round to nearest even, for finite |f| <= 65504. */
uint16_t codec_float_to_half(float f);

/* The first element of a body of n values that does not decode to a finite value:
 * the index of a non-finite half (fp16) or of a malformed block header (int8: scale or
 * offset not finite, scale negative, or offset + 255 * scale not finite in float32).
 * Returns n (fp16) or codec_blocks(n) (int8) when the body is good. */
size_t codec_first_bad(CodecFormat fmt, const unsigned char *body, size_t n);

/* Decodes a checked body of n values into out. */
void codec_decode(CodecFormat fmt, const unsigned char *body, size_t n, float *out);

/* Encodes the values [off, off + cnt) of an n-value vector (finite; v points at element
 * off, at any alignment) into their place in body (codec_encoded_size(fmt, n) bytes), so
 * a vector can be encoded chunk by chunk; off must be a multiple of CODEC_BLOCK. With
 * res non-NULL (pointing at element off too), also res[i] = v[i] - decode(body)[i]
 * (float32), the part of v the body lost: the error feedback a later encode adds back.
 * Returns -1 with *bad set when a value cannot be encoded: for fp16 the index of a value
 * beyond 65504, for int8 the block whose header would be malformed (a range that
 * overflows float32 when rounded); 0 otherwise. */
int codec_encode(CodecFormat fmt, const f32u *v, size_t off, size_t cnt, size_t n,
                 unsigned char *body, float *res, size_t *bad);

#endif
