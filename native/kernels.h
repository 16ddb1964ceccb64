/* Vector kernels over float32 rows with float64 accumulation.
 *
 * Every kernel is compiled twice: for the x86-64 baseline (SSE2) and for AVX2. One of
 * the two sets is chosen once, at module load (k_select: the ISA load argument, `auto`
 * picks AVX2 when the CPU has it); what ships needs no -march=native.
 *
 * Both sets give bit-identical results, so peers on different CPUs (or with a different
 * ISA setting) agree bit for bit:
 *   - element-wise kernels compute each element on its own, in IEEE double, with no
 *     FMA contraction (the module is built with -ffp-contract=off);
 *   - reductions (sums of squares) never let the compiler pick the association order:
 *     element i of a row goes to accumulator lane i mod SPIRT_LANES (16 separate
 *     float64 sums, which the compiler may hold in vector registers of any width but
 *     may not reassociate), and the lanes are combined in a fixed tree. The result
 *     depends only on the values and the row length, never on the ISA, the alignment
 *     or the thread.
 *
 * Inputs are `const f32u *` (src.h): float rows at any address, read in place from
 * Redis' string bytes. Outputs and the float64 accumulators are the module's own,
 * malloc-aligned buffers. */
#ifndef SPIRT_KERNELS_H
#define SPIRT_KERNELS_H

#include <stddef.h>

#include "optim.h"

#define SPIRT_LANES 16

typedef struct {
    const char *name; /* "avx2" or "baseline": reported by SPIRT.INFO as `isa` */
    void (*acc_set)(double *acc, const f32u *x, size_t n);
    void (*acc_add)(double *acc, const f32u *x, size_t n);
    void (*acc_axpy)(double *acc, double a, const f32u *x, size_t n);
    void (*acc_sum)(double *acc, const f32u *const *rows, size_t k, size_t n);
    void (*acc_toward)(double *t, double a, const f32u *x, const double *v, size_t n);
    void (*store_scaled)(float *out, const double *acc, double s, size_t n);
    double (*sqdist_ff)(const f32u *a, const f32u *b, size_t n);
    double (*sqdist_fd)(const f32u *a, const double *b, size_t n);
    double (*sumsq_f)(const f32u *a, size_t n);
    void (*replace_measure)(double *z, const double *t, size_t n, double *diff, double *nrm);
    void (*cmpx)(float *lo, float *hi, size_t n);
    size_t (*first_nonfinite)(const f32u *x, size_t n);
    void (*sgd)(const SgdParams *p, const f32u *w, const f32u *g, const f32u *buf,
                float *w_out, float *buf_out, size_t n);
    void (*adam)(const AdamParams *p, double bc1, double sqrt_bc2, const f32u *w,
                 const f32u *g, const f32u *m, const f32u *v, float *w_out, float *m_out,
                 float *v_out, size_t n);
} Kernels;

/* The set in use (the baseline until k_select runs). Written only at module load. */
extern Kernels k_active;

/* Chooses the kernel set: mode "auto" (AVX2 when the CPU supports it), "avx2" or
 * "baseline". Returns 0, or -1 with a message in err (avx2 on a CPU without it). */
int k_select(const char *mode, char *err, size_t errlen);

static inline const char *k_isa(void) { return k_active.name; }

/* acc = x */
static inline void k_acc_set(double *acc, const f32u *x, size_t n) { k_active.acc_set(acc, x, n); }
/* acc += x */
static inline void k_acc_add(double *acc, const f32u *x, size_t n) { k_active.acc_add(acc, x, n); }
/* acc += a*x */
static inline void k_acc_axpy(double *acc, double a, const f32u *x, size_t n) {
    k_active.acc_axpy(acc, a, x, n);
}
/* acc = sum of rows[0..k), any k >= 1, four rows per pass over acc:
 * acc = ((r0 + r1) + (r2 + r3)), then acc += ((r4 + r5) + (r6 + r7)), ..., then the rest
 * one at a time. */
static inline void k_acc_sum(double *acc, const f32u *const *rows, size_t k, size_t n) {
    k_active.acc_sum(acc, rows, k, n);
}
/* t += a * (x - v) */
static inline void k_acc_toward(double *t, double a, const f32u *x, const double *v, size_t n) {
    k_active.acc_toward(t, a, x, v, n);
}
/* out = (float)(acc * s) */
static inline void k_store_scaled(float *out, const double *acc, double s, size_t n) {
    k_active.store_scaled(out, acc, s, n);
}
/* sum (a-b)^2, fixed-order (see above) */
static inline double k_sqdist_ff(const f32u *a, const f32u *b, size_t n) {
    return k_active.sqdist_ff(a, b, n);
}
static inline double k_sqdist_fd(const f32u *a, const double *b, size_t n) {
    return k_active.sqdist_fd(a, b, n);
}
/* sum a^2, fixed-order */
static inline double k_sumsq_f(const f32u *a, size_t n) { return k_active.sumsq_f(a, n); }
/* z <- t, adding sum (t-z)^2 to *diff and sum t^2 to *nrm (fixed-order) */
static inline void k_replace_measure(double *z, const double *t, size_t n, double *diff,
                                     double *nrm) {
    k_active.replace_measure(z, t, n, diff, nrm);
}
/* lo,hi = min,max elementwise */
static inline void k_cmpx(float *lo, float *hi, size_t n) { k_active.cmpx(lo, hi, n); }
/* index of the first NaN/Inf, or n */
static inline size_t k_first_nonfinite(const f32u *x, size_t n) {
    return k_active.first_nonfinite(x, n);
}

/* x^t for an integer t >= 0 by binary powering: only IEEE multiplications, so unlike
 * libm's pow (whose implementation glibc picks by CPU) it is the same everywhere. */
double k_powi(double x, long long t);

#endif
