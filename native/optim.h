/* Optimizer updates with torch.optim semantics, over a Src of
 *   SGD:  row 0 param, row 1 grad, row 2 momentum buffer (NULL if absent)
 *   Adam: row 0 param, row 1 grad, then after step 1 rows 2-3 the first/second moments
 * Math in float64, results rounded to float32; a non-finite result is an error. */
#ifndef SPIRT_OPTIM_H
#define SPIRT_OPTIM_H

#include "src.h"

typedef struct {
    double lr, momentum, dampening, weight_decay;
    int nesterov;
} SgdParams;

typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    long long step;  /* 1-based number of this step; step 1 starts from zero moments */
    int decoupled;   /* AdamW: decay the parameter instead of adding wd*p to the gradient */
} AdamParams;

/* Writes the new parameter to p_out, and the new buffer to buf_out when momentum != 0
 * (an absent buffer row means the first step: buf = grad). */
int opt_sgd(Src *s, const SgdParams *p, float *p_out, float *buf_out);

int opt_adam(Src *s, const AdamParams *p, float *p_out, float *m_out, float *v_out);

#endif
