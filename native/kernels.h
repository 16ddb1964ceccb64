/* Vector kernels over float32 rows with float64 accumulation.
 *
 * Built once per ISA with runtime dispatch (gcc target_clones: AVX2 when the CPU has
 * it, the x86-64 baseline otherwise), so what ships needs no -march=native. Reductions
 * use `omp simd` (compiled with -fopenmp-simd, no OpenMP runtime) to allow a vector
 * reduction order in these loops only. */
#ifndef SPIRT_KERNELS_H
#define SPIRT_KERNELS_H

#include <stddef.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPIRT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SPIRT_CLONES
#endif

void k_acc_set(double *acc, const float *x, size_t n);              /* acc = x */
void k_acc_add(double *acc, const float *x, size_t n);              /* acc += x */
void k_acc_axpy(double *acc, double a, const float *x, size_t n);   /* acc += a*x */
/* acc (+)= x0 + x1 + x2 + x3: four rows per pass over acc (init: set instead of add) */
void k_acc_add4(double *acc, const float *x0, const float *x1, const float *x2,
                const float *x3, size_t n, int init);
/* acc = sum of rows[0..k), any k >= 1, four at a time */
void k_acc_sum(double *acc, const float *const *rows, size_t k, size_t n);
void k_store_scaled(float *out, const double *acc, double s, size_t n); /* out = acc*s */
double k_sqdist_ff(const float *a, const float *b, size_t n);       /* sum (a-b)^2 */
double k_sqdist_fd(const float *a, const double *b, size_t n);      /* sum (a-b)^2 */
double k_sumsq_f(const float *a, size_t n);                         /* sum a^2 */
void k_cmpx(float *lo, float *hi, size_t n);  /* lo,hi = min,max elementwise */
size_t k_first_nonfinite(const float *x, size_t n); /* index of first NaN/Inf, or n */
const char *k_isa(void); /* which clone the dispatcher picked, for SPIRT.INFO */

#endif
