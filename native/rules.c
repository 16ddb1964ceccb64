#include "rules.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blake2b.h"
#include "kernels.h"
#include "scratch.h"

int src_fail(Src *s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, SPIRT_ERRLEN, fmt, ap);
    va_end(ap);
    return -1;
}

size_t src_pick_chunk(size_t rows) {
    size_t c = ((size_t)1 << 16) / (rows ? rows : 1);
    if (c > 16384) c = 16384;
    if (c < 256) c = 256;
    return c & ~(size_t)15;
}

#define OOM(s) src_fail((s), "out of memory")

/* ---- mean ----------------------------------------------------------------------- */

/* Weights scaled to sum to 1: first by the largest (so the sum cannot overflow), then
 * by that sum (in [1, n], so its reciprocal is finite even for denormal weights, whose
 * plain sum would have an infinite reciprocal). */
static int normalise_weights(Src *s, size_t n, const double *w, double *nw) {
    double wmax = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(w[i]) || w[i] < 0.0)
            return src_fail(s, "weights must be finite and non-negative");
        if (w[i] > wmax) wmax = w[i];
    }
    if (!(wmax > 0.0)) return src_fail(s, "weights must have a positive sum");
    double total = 0.0;
    for (size_t i = 0; i < n; i++) {
        nw[i] = w[i] / wmax;
        total += nw[i];
    }
    for (size_t i = 0; i < n; i++) nw[i] /= total;
    return 0;
}

int rule_mean(Src *s, size_t n, const double *w, float *out) {
    double *acc = malloc(s->chunk * sizeof(double));
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    double *nw = w ? malloc(n * sizeof(double)) : NULL;
    int rc = -1;
    if (!acc || !rows || (w && !nw)) {
        OOM(s);
        goto done;
    }
    if (w && normalise_weights(s, n, w, nw)) goto done;
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) goto done;
        if (w) {
            memset(acc, 0, cnt * sizeof(double));
            for (size_t i = 0; i < n; i++)
                if (nw[i] != 0.0) k_acc_axpy(acc, nw[i], rows[i], cnt);
            k_store_scaled(out + off, acc, 1.0, cnt);
        } else {
            k_acc_sum(acc, rows, n, cnt);
            k_store_scaled(out + off, acc, 1.0 / (double)n, cnt);
        }
        /* A convex combination of finite floats is finite; checked anyway, as the
         * optimizers do, so no weighting can ever store NaN or Inf. */
        size_t bad = k_first_nonfinite(out + off, cnt);
        if (bad < cnt) {
            src_fail(s, "non-finite result at index %zu; nothing was written", off + bad);
            goto done;
        }
    }
    rc = 0;
done:
    free(acc);
    free(rows);
    free(nw);
    return rc;
}

/* ---- rank rules (median, trimmed mean) via a sorting network --------------------- */

/* Batcher's odd-even merge sort for any n: the power-of-two network with every
 * comparator that touches an index >= n dropped (those would face +inf padding and
 * never swap). Comparators run across coordinates, so each is one vector min/max. */
static size_t batcher_pairs(size_t n, uint32_t *pairs) {
    size_t c = 0;
    for (size_t p = 1; p < n; p <<= 1) {
        for (size_t k = p; k >= 1; k >>= 1) {
            for (size_t j = k % p; j + k < n; j += 2 * k) {
                for (size_t i = 0; i < k && i + j + k < n; i++) {
                    if ((i + j) / (2 * p) == (i + j + k) / (2 * p)) {
                        if (pairs) {
                            pairs[2 * c] = (uint32_t)(i + j);
                            pairs[2 * c + 1] = (uint32_t)(i + j + k);
                        }
                        c++;
                    }
                }
            }
        }
    }
    return c;
}

/* out = mean of the sorted ranks lo..hi (inclusive) at every coordinate. */
static int rank_rule(Src *s, size_t n, size_t lo, size_t hi, float *out) {
    size_t npairs = batcher_pairs(n, NULL);
    /* Sub-blocks small enough that all n rows of one stay in L1/L2 for the network. */
    size_t sb = 16384 / n;
    if (sb > 1024) sb = 1024;
    if (sb < 16) sb = 16;
    sb &= ~(size_t)15;
    uint32_t *pairs = malloc((npairs ? npairs : 1) * 2 * sizeof(uint32_t));
    float *scr = malloc(n * sb * sizeof(float));
    double *acc = malloc(sb * sizeof(double));
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    int rc = -1;
    if (!pairs || !scr || !acc || !rows) {
        OOM(s);
        goto done;
    }
    batcher_pairs(n, pairs);
    double scale = 1.0 / (double)(hi - lo + 1);
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) goto done;
        for (size_t b0 = 0; b0 < cnt; b0 += sb) {
            size_t c = cnt - b0 < sb ? cnt - b0 : sb;
            for (size_t i = 0; i < n; i++) memcpy(scr + i * sb, rows[i] + b0, c * sizeof(float));
            for (size_t p = 0; p < npairs; p++)
                k_cmpx(scr + pairs[2 * p] * sb, scr + pairs[2 * p + 1] * sb, c);
            k_acc_set(acc, scr + lo * sb, c);
            for (size_t r = lo + 1; r <= hi; r++) k_acc_add(acc, scr + r * sb, c);
            k_store_scaled(out + off + b0, acc, scale, c);
        }
    }
    rc = 0;
done:
    free(pairs);
    free(scr);
    free(acc);
    free(rows);
    return rc;
}

int rule_median(Src *s, size_t n, float *out) {
    if (n % 2) return rank_rule(s, n, n / 2, n / 2, out);
    return rank_rule(s, n, n / 2 - 1, n / 2, out);
}

int rule_trimmed_mean(Src *s, size_t n, size_t b, float *out) {
    if (2 * b >= n) return src_fail(s, "trimming %zu from each end of %zu leaves nothing", b, n);
    return rank_rule(s, n, b, n - b - 1, out);
}

/* ---- distances, Krum, NNM ------------------------------------------------------- */

int pairwise_sqdist(Src *s, size_t n, double *D) {
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    if (!rows) return OOM(s);
    memset(D, 0, n * n * sizeof(double));
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) {
            free(rows);
            return -1;
        }
        for (size_t i = 0; i < n; i++)
            for (size_t j = i + 1; j < n; j++) D[i * n + j] += k_sqdist_ff(rows[i], rows[j], cnt);
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++) D[j * n + i] = D[i * n + j];
    free(rows);
    return 0;
}

typedef struct {
    double v;
    uint32_t i;
} Ranked;

static int cmp_ranked(const void *a, const void *b) {
    const Ranked *x = a, *y = b;
    if (x->v < y->v) return -1;
    if (x->v > y->v) return 1;
    return (x->i > y->i) - (x->i < y->i);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int rule_krum(Src *s, size_t n, size_t f, size_t m, float *out, uint32_t *selected) {
    if (n <= 2 * f + 2)
        return src_fail(s, "Krum needs n > 2f+2 inputs (n=%zu, f=%zu)", n, f);
    if (m < 1 || m > n - f) return src_fail(s, "Krum needs 1 <= m <= n-f (m=%zu)", m);
    size_t q = n - f - 2;
    double *D = malloc(n * n * sizeof(double));
    double *tmp = malloc(n * sizeof(double));
    Ranked *sc = malloc(n * sizeof(Ranked));
    double *acc = malloc(s->chunk * sizeof(double));
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    int rc = -1;
    if (!D || !tmp || !sc || !acc || !rows) {
        OOM(s);
        goto done;
    }
    if (pairwise_sqdist(s, n, D)) goto done;
    for (size_t i = 0; i < n; i++) {
        size_t k = 0;
        for (size_t j = 0; j < n; j++)
            if (j != i) tmp[k++] = D[i * n + j];
        qsort(tmp, k, sizeof(double), cmp_double);
        double score = 0.0;
        for (size_t t = 0; t < q; t++) score += tmp[t];
        sc[i].v = score;
        sc[i].i = (uint32_t)i;
    }
    qsort(sc, n, sizeof(Ranked), cmp_ranked);
    for (size_t t = 0; t < m; t++) selected[t] = sc[t].i;
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) goto done;
        k_acc_set(acc, rows[selected[0]], cnt);
        for (size_t t = 1; t < m; t++) k_acc_add(acc, rows[selected[t]], cnt);
        k_store_scaled(out + off, acc, 1.0 / (double)m, cnt);
    }
    rc = 0;
done:
    free(D);
    free(tmp);
    free(sc);
    free(acc);
    free(rows);
    return rc;
}

struct NnmSrc {
    Src base;
    Src *inner;
    size_t n, keep;
    uint32_t *nbr;   /* n * keep neighbour indices */
    float *buf;      /* n * chunk mixed rows */
    double *acc;     /* chunk */
    const f32u **in;
};

static int nnm_fetch(Src *s, size_t off, size_t cnt, const f32u **out) {
    NnmSrc *m = (NnmSrc *)s;
    if (m->inner->fetch(m->inner, off, cnt, m->in)) return -1;
    for (size_t i = 0; i < m->n; i++) {
        const uint32_t *nb = m->nbr + i * m->keep;
        k_acc_set(m->acc, m->in[nb[0]], cnt);
        for (size_t k = 1; k < m->keep; k++) k_acc_add(m->acc, m->in[nb[k]], cnt);
        float *dst = m->buf + i * s->chunk;
        k_store_scaled(dst, m->acc, 1.0 / (double)m->keep, cnt);
        out[i] = dst;
    }
    for (size_t i = m->n; i < s->rows; i++) out[i] = m->in[i];
    return 0;
}

NnmSrc *nnm_create(Src *inner, size_t n, size_t f) {
    if (f >= n) {
        src_fail(inner, "NNM needs f < n (n=%zu, f=%zu)", n, f);
        return NULL;
    }
    NnmSrc *m = calloc(1, sizeof(*m));
    double *D = malloc(n * n * sizeof(double));
    Ranked *r = malloc(n * sizeof(Ranked));
    if (m) {
        m->nbr = malloc(n * (n - f) * sizeof(uint32_t));
        m->buf = malloc(n * inner->chunk * sizeof(float));
        m->acc = malloc(inner->chunk * sizeof(double));
        m->in = malloc(inner->rows * sizeof(*m->in));
    }
    if (!m || !D || !r || !m->nbr || !m->buf || !m->acc || !m->in) {
        src_fail(inner, "out of memory");
        goto fail;
    }
    m->inner = inner;
    m->n = n;
    m->keep = n - f;
    m->base = *inner;
    m->base.fetch = nnm_fetch;
    if (pairwise_sqdist(inner, n, D)) goto fail;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < n; j++) {
            r[j].v = D[i * n + j];
            r[j].i = (uint32_t)j;
        }
        qsort(r, n, sizeof(Ranked), cmp_ranked);
        for (size_t k = 0; k < m->keep; k++) m->nbr[i * m->keep + k] = r[k].i;
    }
    free(D);
    free(r);
    return m;
fail:
    free(D);
    free(r);
    nnm_free(m);
    return NULL;
}

Src *nnm_src(NnmSrc *m) { return &m->base; }

void nnm_free(NnmSrc *m) {
    if (!m) return;
    free(m->nbr);
    free(m->buf);
    free(m->acc);
    free(m->in);
    free(m);
}

/* ---- iterative rules ------------------------------------------------------------ */

int rule_geomed(Src *s, size_t n, int maxiter, double eps, float *out, int *iters) {
    double *z = scratch_take(s->len * sizeof(double));
    double *t = malloc(s->chunk * sizeof(double));
    double *d2 = calloc(n, sizeof(double));
    double *nd2 = calloc(n, sizeof(double));
    double *w = malloc(n * sizeof(double));
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    int rc = -1;
    *iters = 0;
    if (!z || !t || !d2 || !nd2 || !w || !rows) {
        OOM(s);
        goto done;
    }
    /* Start at the mean; distances to it in the same pass. */
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) goto done;
        k_acc_set(z + off, rows[0], cnt);
        for (size_t i = 1; i < n; i++) k_acc_add(z + off, rows[i], cnt);
        for (size_t j = 0; j < cnt; j++) z[off + j] /= (double)n;
        for (size_t i = 0; i < n; i++) d2[i] += k_sqdist_fd(rows[i], z + off, cnt);
    }
    while (*iters < maxiter) {
        double dmax = 0.0;
        for (size_t i = 0; i < n; i++) dmax = fmax(dmax, sqrt(d2[i]));
        if (dmax == 0.0) break; /* every input equals z */
        double floor_d = dmax * 1e-12, wsum = 0.0;
        for (size_t i = 0; i < n; i++) {
            w[i] = 1.0 / fmax(sqrt(d2[i]), floor_d);
            wsum += w[i];
        }
        for (size_t i = 0; i < n; i++) w[i] /= wsum;
        memset(nd2, 0, n * sizeof(double));
        double diff = 0.0, nrm = 0.0;
        for (size_t off = 0; off < s->len; off += s->chunk) {
            size_t cnt = src_chunk_len(s, off);
            if (s->fetch(s, off, cnt, rows)) goto done;
            memset(t, 0, cnt * sizeof(double));
            for (size_t i = 0; i < n; i++) k_acc_axpy(t, w[i], rows[i], cnt);
            k_replace_measure(z + off, t, cnt, &diff, &nrm);
            for (size_t i = 0; i < n; i++) nd2[i] += k_sqdist_fd(rows[i], z + off, cnt);
        }
        memcpy(d2, nd2, n * sizeof(double));
        (*iters)++;
        if (sqrt(diff) <= eps * sqrt(nrm)) break;
    }
    for (size_t j = 0; j < s->len; j++) out[j] = (float)z[j];
    rc = 0;
done:
    scratch_give(z, s->len * sizeof(double));
    free(t);
    free(d2);
    free(nd2);
    free(w);
    free(rows);
    return rc;
}

int rule_cclip(Src *s, size_t n, double tau, int iters, int has_start, float *out) {
    double *v = scratch_take(s->len * sizeof(double));
    double *t = malloc(s->chunk * sizeof(double));
    double *d2 = calloc(n, sizeof(double));
    double *nd2 = calloc(n, sizeof(double));
    double *a = malloc(n * sizeof(double));
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    int rc = -1;
    if (!v || !t || !d2 || !nd2 || !a || !rows) {
        OOM(s);
        goto done;
    }
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) goto done;
        if (has_start)
            k_acc_set(v + off, rows[n], cnt);
        else
            memset(v + off, 0, cnt * sizeof(double));
        for (size_t i = 0; i < n; i++) d2[i] += k_sqdist_fd(rows[i], v + off, cnt);
    }
    for (int it = 0; it < iters; it++) {
        for (size_t i = 0; i < n; i++) {
            double d = sqrt(d2[i]);
            /* x_i == v contributes nothing whatever its factor. */
            double c = (d > 0.0 && tau < d) ? tau / d : 1.0;
            a[i] = c / (double)n;
        }
        memset(nd2, 0, n * sizeof(double));
        for (size_t off = 0; off < s->len; off += s->chunk) {
            size_t cnt = src_chunk_len(s, off);
            if (s->fetch(s, off, cnt, rows)) goto done;
            memcpy(t, v + off, cnt * sizeof(double));
            for (size_t i = 0; i < n; i++) k_acc_toward(t, a[i], rows[i], v + off, cnt);
            memcpy(v + off, t, cnt * sizeof(double));
            for (size_t i = 0; i < n; i++) nd2[i] += k_sqdist_fd(rows[i], v + off, cnt);
        }
        memcpy(d2, nd2, n * sizeof(double));
    }
    for (size_t j = 0; j < s->len; j++) out[j] = (float)v[j];
    rc = 0;
done:
    scratch_give(v, s->len * sizeof(double));
    free(t);
    free(d2);
    free(nd2);
    free(a);
    free(rows);
    return rc;
}

/* ---- single-tensor reductions --------------------------------------------------- */

int op_norm(Src *s, double *out) {
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    if (!rows) return OOM(s);
    double acc = 0.0;
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) {
            free(rows);
            return -1;
        }
        acc += k_sumsq_f(rows[0], cnt);
    }
    free(rows);
    *out = sqrt(acc);
    return 0;
}

int op_digest(Src *s, char *hex65) {
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    if (!rows) return OOM(s);
    blake2b_state st;
    blake2b_init(&st, 32);
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) {
            free(rows);
            return -1;
        }
        blake2b_update(&st, rows[0], cnt * sizeof(float));
    }
    free(rows);
    uint8_t d[32];
    blake2b_final(&st, d);
    static const char hx[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex65[2 * i] = hx[d[i] >> 4];
        hex65[2 * i + 1] = hx[d[i] & 15];
    }
    hex65[64] = '\0';
    return 0;
}
