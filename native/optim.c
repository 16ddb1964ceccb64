#include "optim.h"

#include <math.h>
#include <stdlib.h>

#include "kernels.h"

static int check_finite(Src *s, const float *out, size_t off, size_t cnt, const char *what) {
    size_t bad = k_first_nonfinite(out, cnt);
    if (bad < cnt)
        return src_fail(s, "update produced a non-finite %s at index %zu (learning rate too large?)",
                        what, off + bad);
    return 0;
}

SPIRT_CLONES static void sgd_chunk(const SgdParams *p, const float *restrict w,
                                   const float *restrict g, const float *restrict buf,
                                   float *restrict w_out, float *restrict buf_out, size_t n) {
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

int opt_sgd(Src *s, const SgdParams *p, float *p_out, float *buf_out) {
    const float **rows = malloc(s->rows * sizeof(*rows));
    if (!rows) return src_fail(s, "out of memory");
    int rc = -1;
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) goto done;
        sgd_chunk(p, rows[0], rows[1], s->rows > 2 ? rows[2] : NULL, p_out + off,
                  buf_out ? buf_out + off : NULL, cnt);
        if (check_finite(s, p_out + off, off, cnt, "parameter")) goto done;
        if (p->momentum != 0.0 && check_finite(s, buf_out + off, off, cnt, "momentum buffer"))
            goto done;
    }
    rc = 0;
done:
    free(rows);
    return rc;
}

SPIRT_CLONES static void adam_chunk(const AdamParams *p, double bc1, double sqrt_bc2,
                                    const float *restrict w, const float *restrict g,
                                    const float *restrict m, const float *restrict v,
                                    float *restrict w_out, float *restrict m_out,
                                    float *restrict v_out, size_t n) {
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

int opt_adam(Src *s, const AdamParams *p, float *p_out, float *m_out, float *v_out) {
    const float **rows = malloc(s->rows * sizeof(*rows));
    if (!rows) return src_fail(s, "out of memory");
    double bc1 = 1.0 - pow(p->beta1, (double)p->step);
    double sqrt_bc2 = sqrt(1.0 - pow(p->beta2, (double)p->step));
    int rc = -1;
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) goto done;
        /* Step 1 starts from zero moments (the moment rows are not even read). */
        const float *m = s->rows > 3 ? rows[2] : NULL;
        const float *v = s->rows > 3 ? rows[3] : NULL;
        adam_chunk(p, bc1, sqrt_bc2, rows[0], rows[1], m, v, p_out + off, m_out + off,
                   v_out + off, cnt);
        if (check_finite(s, p_out + off, off, cnt, "parameter") ||
            check_finite(s, m_out + off, off, cnt, "first moment") ||
            check_finite(s, v_out + off, off, cnt, "second moment"))
            goto done;
    }
    rc = 0;
done:
    free(rows);
    return rc;
}
