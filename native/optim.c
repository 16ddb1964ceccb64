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

int opt_sgd(Src *s, const SgdParams *p, float *p_out, float *buf_out) {
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    if (!rows) return src_fail(s, "out of memory");
    int rc = -1;
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) goto done;
        k_active.sgd(p, rows[0], rows[1], s->rows > 2 ? rows[2] : NULL, p_out + off,
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

int opt_adam(Src *s, const AdamParams *p, float *p_out, float *m_out, float *v_out) {
    const f32u **rows = malloc(s->rows * sizeof(*rows));
    if (!rows) return src_fail(s, "out of memory");
    /* k_powi, not pow: libm's pow may differ in the last bit between CPUs. */
    double bc1 = 1.0 - k_powi(p->beta1, p->step);
    double sqrt_bc2 = sqrt(1.0 - k_powi(p->beta2, p->step));
    int rc = -1;
    for (size_t off = 0; off < s->len; off += s->chunk) {
        size_t cnt = src_chunk_len(s, off);
        if (s->fetch(s, off, cnt, rows)) goto done;
        /* Step 1 starts from zero moments (the moment rows are not even read). */
        const f32u *m = s->rows > 3 ? rows[2] : NULL;
        const f32u *v = s->rows > 3 ? rows[3] : NULL;
        k_active.adam(p, bc1, sqrt_bc2, rows[0], rows[1], m, v, p_out + off, m_out + off,
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
