#include "codec.h"

#include <math.h>
#include <string.h>

#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CODEC_HAVE_F16C 1
#include <immintrin.h>
#define F16C __attribute__((target("avx2,f16c")))
#else
#define CODEC_HAVE_F16C 0
#endif

/* The hardware's half conversions (F16C) where the AVX2 kernel set runs and the CPU has
 * them; with ISA baseline, the portable code below. Both are exact (half -> float) or
 * round to nearest even (float -> half), so both give the same bits; the tests compare
 * them on every half and every tie. */
static int have_f16c; /* set once at load (codec_init), read by any thread */

void codec_init(void) {
#if CODEC_HAVE_F16C
    __builtin_cpu_init();
    have_f16c = __builtin_cpu_supports("f16c") != 0 && strcmp(k_isa(), "avx2") == 0;
#endif
}

static int use_f16c(void) { return have_f16c; }

const char *codec_name(CodecFormat fmt) { return fmt == CODEC_FP16 ? "fp16" : "int8"; }

size_t codec_encoded_size(CodecFormat fmt, size_t n) {
    return fmt == CODEC_FP16 ? 2 * n : CODEC_HEADER * codec_blocks(n) + n;
}

static inline uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

float codec_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;
    /* A normal half: widen the fraction and move the exponent bias from 15 to 127. */
    uint32_t normal = (em << 13) + ((127u - 15u) << 23);
    /* A subnormal half (or zero) is em * 2^-24: an integer below 1024 times a power of
     * two, exact in float32, and computed without subnormal float arithmetic. */
    uint32_t sub = f2u((float)(int32_t)em * 0x1p-24f);
    return u2f((em < 0x400u ? sub : normal) | sign);
}

uint16_t codec_float_to_half(float f) {
    uint32_t x = f2u(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x38800000u) { /* >= 2^-14: a normal half */
        uint32_t r = ax - ((127u - 15u) << 23);
        /* Round the 13 dropped bits to nearest, ties to even; a carry into the
         * exponent gives the next binade, which is the right answer. */
        r += 0x0fffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    /* A subnormal half: round |f| * 2^24 (exact) to an integer, ties to even. 2^52 is
     * added and removed in double, which rounds to an integer in the default mode;
     * 1024 (the carry from the largest subnormal) encodes the smallest normal. */
    double a = (double)u2f(ax) * 0x1p24;
    double q = (a + 0x1p52) - 0x1p52;
    return (uint16_t)(sign | (uint16_t)q);
}

static inline float load_f32(const unsigned char *p) {
    float f;
    memcpy(&f, p, sizeof(f));
    return f;
}

static inline void store_f32(unsigned char *p, float f) { memcpy(p, &f, sizeof(f)); }

static int header_ok(float scale, float offset) {
    if (!isfinite(scale) || !isfinite(offset) || !(scale >= 0.0f)) return 0;
    float top = (float)((double)offset + (double)CODEC_CODES * (double)scale);
    return isfinite(top);
}

size_t codec_first_bad(CodecFormat fmt, const unsigned char *body, size_t n) {
    if (fmt == CODEC_FP16) {
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, body + 2 * i, sizeof(h));
            if ((h & 0x7c00u) == 0x7c00u) return i;
        }
        return n;
    }
    size_t nb = codec_blocks(n);
    for (size_t b = 0; b < nb; b++)
        if (!header_ok(load_f32(body + CODEC_HEADER * b), load_f32(body + CODEC_HEADER * b + 4)))
            return b;
    return nb;
}

#if CODEC_HAVE_F16C
F16C static size_t decode_fp16_f16c(const unsigned char *body, size_t n, float *out) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(body + 2 * i))));
    return i;
}

F16C static size_t encode_fp16_f16c(const f32u *v, size_t n, unsigned char *body, float *res) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps((const float *)(v + i));
        __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(body + 2 * i), h);
        if (res) _mm256_storeu_ps(res + i, _mm256_sub_ps(x, _mm256_cvtph_ps(h)));
    }
    return i;
}
#endif

static void decode_fp16(const unsigned char *body, size_t n, float *out) {
    size_t i = 0;
#if CODEC_HAVE_F16C
    if (use_f16c()) i = decode_fp16_f16c(body, n, out);
#endif
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, body + 2 * i, sizeof(h));
        out[i] = codec_half_to_float(h);
    }
}

static void decode_int8(const unsigned char *body, size_t n, float *out) {
    size_t nb = codec_blocks(n);
    const unsigned char *codes = body + CODEC_HEADER * nb;
    for (size_t b = 0; b < nb; b++) {
        /* float64 product of an 8-bit code and a 24-bit scale is exact: one rounding. */
        double scale = load_f32(body + CODEC_HEADER * b);
        double offset = load_f32(body + CODEC_HEADER * b + 4);
        size_t s = b * CODEC_BLOCK, e = s + CODEC_BLOCK < n ? s + CODEC_BLOCK : n;
        for (size_t i = s; i < e; i++) out[i] = (float)(offset + (double)codes[i] * scale);
    }
}

void codec_decode(CodecFormat fmt, const unsigned char *body, size_t n, float *out) {
    if (fmt == CODEC_FP16) decode_fp16(body, n, out);
    else decode_int8(body, n, out);
}

/* The encoders work on a range [off, off + cnt) of an n-value vector (off a multiple of
 * CODEC_BLOCK), so a vector can be encoded chunk by chunk: v and res point at element
 * off, body at the whole body. */
static int encode_fp16(const f32u *v, size_t off, size_t cnt, unsigned char *body, float *res,
                       size_t *bad) {
    for (size_t i = 0; i < cnt; i++) {
        if (fabsf(v[i]) > CODEC_FP16_MAX) {
            *bad = off + i;
            return -1;
        }
    }
    body += 2 * off;
    size_t i = 0;
#if CODEC_HAVE_F16C
    if (use_f16c()) i = encode_fp16_f16c(v, cnt, body, res);
#endif
    for (; i < cnt; i++) {
        uint16_t h = codec_float_to_half(v[i]);
        memcpy(body + 2 * i, &h, sizeof(h));
        /* Both are floats within a factor 2^-11 of each other: the difference is exact
         * whenever Sterbenz applies and otherwise tiny; never an overflow. */
        if (res) res[i] = v[i] - codec_half_to_float(h);
    }
    return 0;
}

static int encode_int8(const f32u *v, size_t off, size_t cnt, size_t n, unsigned char *body,
                       float *res, size_t *bad) {
    size_t first = off / CODEC_BLOCK, nb = codec_blocks(cnt);
    unsigned char *heads = body + CODEC_HEADER * first;
    unsigned char *codes = body + CODEC_HEADER * codec_blocks(n) + off;
    for (size_t b = 0; b < nb; b++) {
        size_t s = b * CODEC_BLOCK, e = s + CODEC_BLOCK < cnt ? s + CODEC_BLOCK : cnt;
        float lo = v[s], hi = v[s];
        for (size_t i = s + 1; i < e; i++) {
            lo = v[i] < lo ? v[i] : lo;
            hi = v[i] > hi ? v[i] : hi;
        }
        float scale = (float)(((double)hi - (double)lo) / CODEC_CODES);
        /* A range near float32's limit can round the top code past it: refuse rather
         * than write a header every peer must reject. */
        if (!header_ok(scale, lo)) {
            *bad = first + b;
            return -1;
        }
        store_f32(heads + CODEC_HEADER * b, scale);
        store_f32(heads + CODEC_HEADER * b + 4, lo);
        double dlo = lo, ds = scale;
        for (size_t i = s; i < e; i++) {
            double q = 0.0;
            if (ds > 0.0) {
                /* x >= 0 (lo is the minimum); adding and removing 2^52 rounds it to an
                 * integer, ties to even: numpy's rint, as protocol/compression.encode. */
                double x = ((double)v[i] - dlo) / ds;
                q = (x + 0x1p52) - 0x1p52;
                q = q > CODEC_CODES ? CODEC_CODES : q; /* scale rounded down: clip */
            }
            unsigned char c = (unsigned char)q;
            codes[i] = c;
            if (res) res[i] = v[i] - (float)(dlo + (double)c * ds);
        }
    }
    return 0;
}

int codec_encode(CodecFormat fmt, const f32u *v, size_t off, size_t cnt, size_t n,
                 unsigned char *body, float *res, size_t *bad) {
    return fmt == CODEC_FP16 ? encode_fp16(v, off, cnt, body, res, bad)
                             : encode_int8(v, off, cnt, n, body, res, bad);
}
