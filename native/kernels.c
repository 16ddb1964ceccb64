#include "kernels.h"

#include <stdint.h>

#define CLONES SPIRT_CLONES

CLONES void k_acc_set(double *restrict acc, const float *restrict x, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) acc[i] = (double)x[i];
}

CLONES void k_acc_add(double *restrict acc, const float *restrict x, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) acc[i] += (double)x[i];
}

CLONES void k_acc_axpy(double *restrict acc, double a, const float *restrict x, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) acc[i] += a * (double)x[i];
}

CLONES void k_acc_add4(double *restrict acc, const float *restrict x0,
                       const float *restrict x1, const float *restrict x2,
                       const float *restrict x3, size_t n, int init) {
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

void k_acc_sum(double *acc, const float *const *rows, size_t k, size_t n) {
    size_t r = 0;
    for (; r + 4 <= k; r += 4) k_acc_add4(acc, rows[r], rows[r + 1], rows[r + 2], rows[r + 3], n, r == 0);
    if (r == 0) {
        k_acc_set(acc, rows[0], n);
        r = 1;
    }
    for (; r < k; r++) k_acc_add(acc, rows[r], n);
}

CLONES void k_store_scaled(float *restrict out, const double *restrict acc, double s,
                           size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) out[i] = (float)(acc[i] * s);
}

CLONES double k_sqdist_ff(const float *restrict a, const float *restrict b, size_t n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        s += d * d;
    }
    return s;
}

CLONES double k_sqdist_fd(const float *restrict a, const double *restrict b, size_t n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        s += d * d;
    }
    return s;
}

CLONES double k_sumsq_f(const float *restrict a, size_t n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < n; i++) s += (double)a[i] * (double)a[i];
    return s;
}

CLONES void k_cmpx(float *restrict lo, float *restrict hi, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        float a = lo[i], b = hi[i];
        lo[i] = a < b ? a : b;
        hi[i] = a < b ? b : a;
    }
}

CLONES size_t k_first_nonfinite(const float *x, size_t n) {
    /* Exponent all ones means Inf or NaN. Scan in blocks with a branch-free reduction,
     * then locate the culprit only in a bad block. */
    const uint32_t *u = (const uint32_t *)x;
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

const char *k_isa(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? "avx2" : "x86-64";
#else
    return "generic";
#endif
}
