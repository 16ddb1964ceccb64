/* Aggregation rules over the first n rows of a Src (rows after n are extras, such as
 * the starting point of centered clipping). Each returns 0, or -1 with the message in
 * the Src's err. Results are written to `out` (len floats) only; inputs are untouched.
 * Arithmetic is float64 throughout; results are rounded to float32 once. */
#ifndef SPIRT_RULES_H
#define SPIRT_RULES_H

#include <stddef.h>
#include <stdint.h>

#include "src.h"

/* Mean, or weighted mean when w (n weights, non-negative, positive sum) is given. */
int rule_mean(Src *s, size_t n, const double *w, float *out);

/* Coordinate-wise median; for even n the mean of the two middle values. */
int rule_median(Src *s, size_t n, float *out);

/* Coordinate-wise trimmed mean: drop the b smallest and b largest, average the rest. */
int rule_trimmed_mean(Src *s, size_t n, size_t b, float *out);

/* Multi-Krum: score(i) = sum of the n-f-2 smallest squared distances from row i to the
 * others; average the m rows of lowest score (ties: lower index first). m = 1 is Krum.
 * The chosen row indices go to selected[0..m). Needs n > 2f+2 and 1 <= m <= n-f. */
int rule_krum(Src *s, size_t n, size_t f, size_t m, float *out, uint32_t *selected);

/* Geometric median by Weiszfeld's iteration started at the mean; stops after maxiter
 * updates or when ||z' - z|| <= eps * ||z'||. Distances below 1e-12 of the largest are
 * clamped to it. *iters gets the number of updates performed. */
int rule_geomed(Src *s, size_t n, int maxiter, double eps, float *out, int *iters);

/* Centered clipping: v <- v + (1/n) sum_i (x_i - v) min(1, tau/||x_i - v||), `iters`
 * times, from row n when has_start, else from zero. */
int rule_cclip(Src *s, size_t n, double tau, int iters, int has_start, float *out);

/* Pairwise squared distances between the first n rows into D (n*n, symmetric). */
int pairwise_sqdist(Src *s, size_t n, double *D);

/* Nearest-neighbour mixing: a Src whose row i (< n) is the mean of the n-f rows nearest
 * to inner row i (itself included; ties by index). Rows >= n pass through. */
typedef struct NnmSrc NnmSrc;
NnmSrc *nnm_create(Src *inner, size_t n, size_t f); /* NULL + inner->err on failure */
Src *nnm_src(NnmSrc *m);
void nnm_free(NnmSrc *m);

/* L2 norm of row 0. */
int op_norm(Src *s, double *out);

/* BLAKE2b-256 of row 0's raw bytes, as 64 lower-case hex chars plus NUL. */
int op_digest(Src *s, char *hex65);

#endif
