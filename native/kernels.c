/* The kernels of kernels.h, compiled once per ISA.
 *
 * Each kernel's body is an always-inline function compiled into two wrappers: one for
 * the x86-64 baseline and one with __attribute__((target("avx2"))); k_select points
 * k_active at one set at load. (gcc's target_clones would pick by CPU alone, with no way
 * to force a set for testing or for agreement with other peers.)
 *
 * Bit-identical across the two sets (see kernels.h): element-wise loops are exact IEEE
 * per element (no FMA: -ffp-contract=off); reductions are written as 16 separate
 * sums (lane i mod 16: scalar arrays, or explicit 4-double vectors, whose operations
 * are lane-wise) joined by a fixed tree, which C's strict floating-point semantics
 * forbid the compiler to reorder, whatever vector width it uses for them. No kernel
 * uses an `omp simd reduction` over floating point: that lets the compiler associate
 * by its vector width, which differs between the two sets. */
#include "kernels.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define SPIRT_HAVE_AVX2 1
#define AVX2 __attribute__((target("avx2")))
#else
#define SPIRT_HAVE_AVX2 0
#endif

#define BODY static inline __attribute__((always_inline))

/* The fixed final tree over 16 lanes: ((l0+l4)+(l8+l12)) for each of the 4 positions,
 * then ((u0+u1)+(u2+u3)). */
BODY double fold16(const double *l) {
    double u[4];
    for (int j = 0; j < 4; j++) u[j] = (l[j] + l[4 + j]) + (l[8 + j] + l[12 + j]);
    return (u[0] + u[1]) + (u[2] + u[3]);
}

/* ---- element-wise --------------------------------------------------------------- */

BODY void acc_set_body(double *restrict acc, const f32u *restrict x, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) acc[i] = (double)x[i];
}

BODY void acc_add_body(double *restrict acc, const f32u *restrict x, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) acc[i] += (double)x[i];
}

BODY void acc_axpy_body(double *restrict acc, double a, const f32u *restrict x, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) acc[i] += a * (double)x[i];
}

BODY void acc_add4_body(double *restrict acc, const f32u *restrict x0,
                        const f32u *restrict x1, const f32u *restrict x2,
                        const f32u *restrict x3, size_t n, int init) {
    if (init) {
#pragma omp simd
        for (size_t i = 0; i < n; i++)
            acc[i] = ((double)x0[i] + (double)x1[i]) + ((double)x2[i] + (double)x3[i]);
    } else {
#pragma omp simd
        for (size_t i = 0; i < n; i++)
            acc[i] += ((double)x0[i] + (double)x1[i]) + ((double)x2[i] + (double)x3[i]);
    }
}

BODY void acc_sum_body(double *acc, const f32u *const *rows, size_t k, size_t n) {
    size_t r = 0;
    for (; r + 4 <= k; r += 4)
        acc_add4_body(acc, rows[r], rows[r + 1], rows[r + 2], rows[r + 3], n, r == 0);
    if (r == 0) {
        acc_set_body(acc, rows[0], n);
        r = 1;
    }
    for (; r < k; r++) acc_add_body(acc, rows[r], n);
}

BODY void acc_toward_body(double *restrict t, double a, const f32u *restrict x,
                          const double *restrict v, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) t[i] += a * ((double)x[i] - v[i]);
}

BODY void store_scaled_body(float *restrict out, const double *restrict acc, double s,
                            size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) out[i] = (float)(acc[i] * s);
}

BODY void cmpx_body(float *restrict lo, float *restrict hi, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        float a = lo[i], b = hi[i];
        lo[i] = a < b ? a : b;
        hi[i] = a < b ? b : a;
    }
}

/* The bits of a float at any address (may_alias: reading a float's bytes as an integer
 * is then well-defined whatever the aliasing flags). */
typedef uint32_t u32u __attribute__((aligned(1), may_alias));

BODY size_t first_nonfinite_body(const f32u *x, size_t n) {
    /* Exponent all ones means Inf or NaN. Scan in blocks with a branch-free (integer,
     * so order-free) reduction, then locate the culprit only in a bad block. */
    const u32u *u = (const u32u *)(const void *)x;
    const size_t B = 4096;
    for (size_t off = 0; off < n; off += B) {
        size_t end = off + B < n ? off + B : n;
        uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
        for (size_t i = off; i < end; i++) bad |= (uint32_t)((u[i] & 0x7f800000u) == 0x7f800000u);
        if (bad)
            for (size_t i = off; i < end; i++)
                if ((u[i] & 0x7f800000u) == 0x7f800000u) return i;
    }
    return n;
}

/* ---- fixed-order reductions: element i goes to lane i mod 16 ---------------------- */

/* Each lane is its own scalar sum in strict IEEE order, so the compiler may put the
 * lanes in vector registers of any width (it does: 4 AVX2 or 8 SSE2 registers) but
 * may not reassociate within a lane. */
BODY double sqdist_ff_body(const f32u *restrict a, const f32u *restrict b, size_t n) {
    double s[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) {
            double d = (double)a[i + l] - (double)b[i + l];
            s[l] += d * d;
        }
    for (size_t l = 0; i + l < n; l++) {
        double d = (double)a[i + l] - (double)b[i + l];
        s[l] += d * d;
    }
    return fold16(s);
}

BODY double sqdist_fd_body(const f32u *restrict a, const double *restrict b, size_t n) {
    double s[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) {
            double d = (double)a[i + l] - b[i + l];
            s[l] += d * d;
        }
    for (size_t l = 0; i + l < n; l++) {
        double d = (double)a[i + l] - b[i + l];
        s[l] += d * d;
    }
    return fold16(s);
}

BODY double sumsq_f_body(const f32u *restrict a, size_t n) {
    double s[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) s[l] += (double)a[i + l] * (double)a[i + l];
    for (size_t l = 0; i + l < n; l++) s[l] += (double)a[i + l] * (double)a[i + l];
    return fold16(s);
}

/* A pass of the geometric median: z <- t, with sum (t-z)^2 and sum t^2, 16 lanes each.
 * Written with explicit 4-double vectors (lane-wise IEEE operations, the same in both
 * sets): as 16-element scalar loops, gcc vectorises this fused loop 4x slower. */
typedef double v4d __attribute__((vector_size(32)));
typedef double v4du __attribute__((vector_size(32), aligned(8), may_alias));
#define LDD(p) (*(const v4du *)(const void *)(p))
#define STD(p, v) (*(v4du *)(void *)(p) = (v))

BODY void replace_measure_body(double *restrict z, const double *restrict t, size_t n,
                               double *diff, double *nrm) {
    v4d d0 = {0, 0, 0, 0}, d1 = d0, d2 = d0, d3 = d0, q0 = d0, q1 = d0, q2 = d0, q3 = d0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v4d t0 = LDD(t + i), t1 = LDD(t + i + 4), t2 = LDD(t + i + 8), t3 = LDD(t + i + 12);
        v4d e0 = t0 - LDD(z + i), e1 = t1 - LDD(z + i + 4);
        v4d e2 = t2 - LDD(z + i + 8), e3 = t3 - LDD(z + i + 12);
        d0 += e0 * e0, d1 += e1 * e1, d2 += e2 * e2, d3 += e3 * e3;
        q0 += t0 * t0, q1 += t1 * t1, q2 += t2 * t2, q3 += t3 * t3;
        STD(z + i, t0), STD(z + i + 4, t1), STD(z + i + 8, t2), STD(z + i + 12, t3);
    }
    double d[16], q[16];
    memcpy(d, &d0, 32), memcpy(d + 4, &d1, 32), memcpy(d + 8, &d2, 32), memcpy(d + 12, &d3, 32);
    memcpy(q, &q0, 32), memcpy(q + 4, &q1, 32), memcpy(q + 8, &q2, 32), memcpy(q + 12, &q3, 32);
    for (size_t l = 0; i + l < n; l++) {
        double e = t[i + l] - z[i + l];
        d[l] += e * e;
        q[l] += t[i + l] * t[i + l];
        z[i + l] = t[i + l];
    }
    *diff += fold16(d);
    *nrm += fold16(q);
}

/* ---- optimizer steps (element-wise) --------------------------------------------- */

BODY void sgd_body(const SgdParams *p, const f32u *restrict w, const f32u *restrict g,
                   const f32u *restrict buf, float *restrict w_out, float *restrict buf_out,
                   size_t n) {
    const double lr = p->lr, mu = p->momentum, damp = 1.0 - p->dampening, wd = p->weight_decay;
    if (mu == 0.0) {
#pragma omp simd
        for (size_t i = 0; i < n; i++) {
            double gi = (double)g[i] + wd * (double)w[i];
            w_out[i] = (float)((double)w[i] - lr * gi);
        }
        return;
    }
    const int nesterov = p->nesterov, first = buf == NULL;
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        double gi = (double)g[i] + wd * (double)w[i];
        double b = first ? gi : mu * (double)buf[i] + damp * gi;
        double step = nesterov ? gi + mu * b : b;
        buf_out[i] = (float)b;
        w_out[i] = (float)((double)w[i] - lr * step);
    }
}

BODY void adam_body(const AdamParams *p, double bc1, double sqrt_bc2, const f32u *restrict w,
                    const f32u *restrict g, const f32u *restrict m, const f32u *restrict v,
                    float *restrict w_out, float *restrict m_out, float *restrict v_out,
                    size_t n) {
    const double lr = p->lr, b1 = p->beta1, b2 = p->beta2, eps = p->eps, wd = p->weight_decay;
    const int fresh = m == NULL, decoupled = p->decoupled;
    const double step_size = lr / bc1;
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        double wi = (double)w[i], gi = (double)g[i];
        if (decoupled)
            wi *= 1.0 - lr * wd;
        else
            gi += wd * wi;
        double mi = b1 * (fresh ? 0.0 : (double)m[i]) + (1.0 - b1) * gi;
        double vi = b2 * (fresh ? 0.0 : (double)v[i]) + (1.0 - b2) * gi * gi;
        double denom = sqrt(vi) / sqrt_bc2 + eps;
        m_out[i] = (float)mi;
        v_out[i] = (float)vi;
        w_out[i] = (float)(wi - step_size * mi / denom);
    }
}

/* ---- one wrapper per kernel and ISA ---------------------------------------------- */

#if SPIRT_HAVE_AVX2
#define AVX2_VOID(name, params, args) \
    AVX2 static void name##_avx2 params { name##_body args; }
#define AVX2_RET(ret, name, params, args) \
    AVX2 static ret name##_avx2 params { return name##_body args; }
#else
#define AVX2_VOID(name, params, args)
#define AVX2_RET(ret, name, params, args)
#endif

#define KERNEL_VOID(name, params, args)              \
    static void name##_base params { name##_body args; } \
    AVX2_VOID(name, params, args)
#define KERNEL_RET(ret, name, params, args)                 \
    static ret name##_base params { return name##_body args; } \
    AVX2_RET(ret, name, params, args)

KERNEL_VOID(acc_set, (double *acc, const f32u *x, size_t n), (acc, x, n))
KERNEL_VOID(acc_add, (double *acc, const f32u *x, size_t n), (acc, x, n))
KERNEL_VOID(acc_axpy, (double *acc, double a, const f32u *x, size_t n), (acc, a, x, n))
KERNEL_VOID(acc_sum, (double *acc, const f32u *const *rows, size_t k, size_t n),
            (acc, rows, k, n))
KERNEL_VOID(acc_toward, (double *t, double a, const f32u *x, const double *v, size_t n),
            (t, a, x, v, n))
KERNEL_VOID(store_scaled, (float *out, const double *acc, double s, size_t n), (out, acc, s, n))
KERNEL_RET(double, sqdist_ff, (const f32u *a, const f32u *b, size_t n), (a, b, n))
KERNEL_RET(double, sqdist_fd, (const f32u *a, const double *b, size_t n), (a, b, n))
KERNEL_RET(double, sumsq_f, (const f32u *a, size_t n), (a, n))
KERNEL_VOID(replace_measure, (double *z, const double *t, size_t n, double *diff, double *nrm),
            (z, t, n, diff, nrm))
KERNEL_VOID(cmpx, (float *lo, float *hi, size_t n), (lo, hi, n))
KERNEL_RET(size_t, first_nonfinite, (const f32u *x, size_t n), (x, n))
KERNEL_VOID(sgd,
            (const SgdParams *p, const f32u *w, const f32u *g, const f32u *buf, float *w_out,
             float *buf_out, size_t n),
            (p, w, g, buf, w_out, buf_out, n))
KERNEL_VOID(adam,
            (const AdamParams *p, double bc1, double sqrt_bc2, const f32u *w, const f32u *g,
             const f32u *m, const f32u *v, float *w_out, float *m_out, float *v_out,
             size_t n),
            (p, bc1, sqrt_bc2, w, g, m, v, w_out, m_out, v_out, n))

#define TABLE(isa, label)                                                                   \
    {                                                                                       \
        .name = label, .acc_set = acc_set_##isa, .acc_add = acc_add_##isa,                  \
        .acc_axpy = acc_axpy_##isa, .acc_sum = acc_sum_##isa, .acc_toward = acc_toward_##isa, \
        .store_scaled = store_scaled_##isa, .sqdist_ff = sqdist_ff_##isa,                   \
        .sqdist_fd = sqdist_fd_##isa, .sumsq_f = sumsq_f_##isa,                             \
        .replace_measure = replace_measure_##isa, .cmpx = cmpx_##isa,                       \
        .first_nonfinite = first_nonfinite_##isa, .sgd = sgd_##isa, .adam = adam_##isa,     \
    }

static const Kernels k_baseline = TABLE(base, "baseline");
#if SPIRT_HAVE_AVX2
static const Kernels k_avx2 = TABLE(avx2, "avx2");
#endif

Kernels k_active = TABLE(base, "baseline");

static int cpu_has_avx2(void) {
#if SPIRT_HAVE_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
#else
    return 0;
#endif
}

int k_select(const char *mode, char *err, size_t errlen) {
    if (strcmp(mode, "baseline") == 0) {
        k_active = k_baseline;
        return 0;
    }
    if (strcmp(mode, "avx2") != 0 && strcmp(mode, "auto") != 0) {
        snprintf(err, errlen, "ISA must be auto, avx2 or baseline, got '%s'", mode);
        return -1;
    }
    int avx2 = cpu_has_avx2();
    if (strcmp(mode, "avx2") == 0 && !avx2) {
        snprintf(err, errlen,
                 SPIRT_HAVE_AVX2 ? "ISA avx2 requested but this CPU does not support AVX2 "
                                   "(use ISA auto or ISA baseline)"
                                 : "ISA avx2 requested but this build has no AVX2 kernels "
                                   "(not x86-64; use ISA auto or ISA baseline)");
        return -1;
    }
#if SPIRT_HAVE_AVX2
    k_active = avx2 ? k_avx2 : k_baseline;
#else
    k_active = k_baseline;
#endif
    return 0;
}

double k_powi(double x, long long t) {
    double r = 1.0;
    while (t > 0) {
        if (t & 1) r *= x;
        t >>= 1;
        if (t) x *= x;
    }
    return r;
}
