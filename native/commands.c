/* Argument parsing for every SPIRT.* command. Parsing only builds a Job (or answers
 * directly for PUT/GET/INFO/CONFIG); every error is replied before anything is read
 * or written. See native/README.md for the syntax. */
#include "commands.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "jobs.h"
#include "kernels.h"
#include "pack.h"
#include "tensor.h"

typedef struct {
    RedisModuleCtx *ctx;
    RedisModuleString **argv;
    int argc;
    char err[SPIRT_ERRLEN];
} Args;

static int fail(Args *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(Args *a, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->err, sizeof(a->err), fmt, ap);
    va_end(ap);
    return -1;
}

static int reply_fail(Args *a) {
    char buf[SPIRT_ERRLEN + 16];
    snprintf(buf, sizeof(buf), "ERR SPIRT %s", a->err);
    return RM.ReplyWithError(a->ctx, buf);
}

static int is_kw(RedisModuleString *s, const char *kw) {
    size_t n;
    const char *p = RM.StringPtrLen(s, &n);
    return n == strlen(kw) && strncasecmp(p, kw, n) == 0;
}

static const char *text(RedisModuleString *s, char *buf, size_t cap) {
    return tensor_key_label(s, buf, cap);
}

static int need(Args *a, int pos, int count, const char *opt) {
    if (pos + count >= a->argc)
        return fail(a, "option %s needs %d value%s", opt, count, count > 1 ? "s" : "");
    return 0;
}

static int get_ll(Args *a, int pos, const char *what, long long lo, long long hi,
                  long long *out) {
    char buf[80];
    if (pos >= a->argc) return fail(a, "missing %s", what);
    if (RM.StringToLongLong(a->argv[pos], out) != RM_OK)
        return fail(a, "%s must be an integer, got '%s'", what, text(a->argv[pos], buf, sizeof(buf)));
    if (*out < lo || *out > hi) return fail(a, "%s must be in [%lld, %lld], got %lld", what, lo, hi, *out);
    return 0;
}

/* A finite double in [lo, hi] (or [lo, hi) when hi_open). */
static int get_dbl(Args *a, int pos, const char *what, double lo, double hi, int hi_open,
                   double *out) {
    char buf[80];
    if (pos >= a->argc) return fail(a, "missing %s", what);
    if (RM.StringToDouble(a->argv[pos], out) != RM_OK || !isfinite(*out))
        return fail(a, "%s must be a finite number, got '%s'", what, text(a->argv[pos], buf, sizeof(buf)));
    if (*out < lo || *out > hi || (hi_open && *out >= hi))
        return fail(a, "%s must be in [%g, %g%c, got %g", what, lo, hi, hi_open ? ')' : ']', *out);
    return 0;
}

static int once(Args *a, int *seen, const char *opt) {
    if (*seen) return fail(a, "option %s given twice", opt);
    *seen = 1;
    return 0;
}

static int unknown(Args *a, int pos) {
    char buf[80];
    return fail(a, "unknown option '%s'", text(a->argv[pos], buf, sizeof(buf)));
}

static int same_key(RedisModuleString *x, RedisModuleString *y) {
    size_t nx, ny;
    const char *px = RM.StringPtrLen(x, &nx), *py = RM.StringPtrLen(y, &ny);
    return nx == ny && memcmp(px, py, nx) == 0;
}

/* ---- aggregation: SPIRT.<RULE> out numkeys key [key ...] [options] ---------------- */

/* Key positions for COMMAND GETKEYS/ACL: walk the options with their arities so an
 * option's value is never mistaken for an option name. */
typedef struct {
    const char *name;
    int nvalues; /* -1: one value per aggregated input (WEIGHTS) */
    int is_key;
} OptSpec;

static void report_option_keys(Args *a, int from, int n, const OptSpec *spec) {
    for (int i = from; i < a->argc;) {
        const OptSpec *o = spec;
        while (o->name && !is_kw(a->argv[i], o->name)) o++;
        if (!o->name) return;
        if (o->is_key && i + 1 < a->argc) RM.KeyAtPos(a->ctx, i + 1);
        i += 1 + (o->nvalues < 0 ? n : o->nvalues);
    }
}

static const OptSpec AGG_OPTS[] = {
    {"NNM", 1, 0},   {"WEIGHTS", -1, 0}, {"BETA", 1, 0},  {"TRIM", 1, 0},
    {"F", 1, 0},     {"M", 1, 0},        {"MAXITER", 1, 0}, {"EPS", 1, 0},
    {"TAU", 1, 0},   {"ITERS", 1, 0},    {"START", 1, 1},   {"SCRATCH", 0, 0},
    {NULL, 0, 0},
};

static int agg_key_positions(Args *a) {
    RM.KeyAtPos(a->ctx, 1);
    long long nk;
    if (a->argc < 3 || RM.StringToLongLong(a->argv[2], &nk) != RM_OK || nk < 1 ||
        nk > a->argc - 3)
        return RM_OK;
    for (int i = 0; i < nk; i++) RM.KeyAtPos(a->ctx, 3 + i);
    report_option_keys(a, 3 + (int)nk, (int)nk, AGG_OPTS);
    return RM_OK;
}

static int agg_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc, OpKind op) {
    Args a = {ctx, argv, argc, {0}};
    if (RM.IsKeysPositionRequest(ctx)) return agg_key_positions(&a);
    if (argc < 4) return RM.WrongArity(ctx);
    long long nk;
    if (get_ll(&a, 2, "numkeys", 1, SPIRT_MAX_INPUTS, &nk)) return reply_fail(&a);
    if (3 + nk > argc) {
        fail(&a, "numkeys is %lld but only %d keys follow", nk, argc - 3);
        return reply_fail(&a);
    }
    size_t n = (size_t)nk;
    Job *job = job_new(op);
    if (!job) return RM.ReplyWithError(ctx, "ERR SPIRT out of memory");
    struct JobParams *p = job_params(job);
    p->n = n;
    p->krum_m = 1;
    p->maxiter = 100;
    p->eps = 1e-6;
    p->iters = 1;
    for (size_t i = 0; i < n; i++) job_add_input(job, argv[3 + i], 0);

    int s_nnm = 0, s_w = 0, s_beta = 0, s_trim = 0, s_f = 0, s_m = 0, s_it = 0, s_eps = 0,
        s_tau = 0, s_iters = 0, s_start = 0, s_scratch = 0;
    long long v;
    double d;
    RedisModuleString *start = NULL;
    for (int i = 3 + (int)n; i < argc;) {
        RedisModuleString *o = argv[i];
        if (is_kw(o, "NNM")) {
            if (once(&a, &s_nnm, "NNM") || need(&a, i, 1, "NNM") ||
                get_ll(&a, i + 1, "NNM f", 0, (long long)n - 1, &v))
                goto bad;
            p->nnm = 1;
            p->nnm_f = (size_t)v;
            i += 2;
        } else if (op == OP_MEAN && is_kw(o, "WEIGHTS")) {
            if (once(&a, &s_w, "WEIGHTS") || need(&a, i, (int)n, "WEIGHTS")) goto bad;
            p->weights = malloc(n * sizeof(double));
            if (!p->weights) {
                fail(&a, "out of memory");
                goto bad;
            }
            int any_positive = 0;
            for (size_t k = 0; k < n; k++) {
                if (get_dbl(&a, i + 1 + (int)k, "weight", 0.0, HUGE_VAL, 0, &p->weights[k]))
                    goto bad;
                any_positive |= p->weights[k] > 0.0;
            }
            /* The rule normalises the weights, so any finite, non-negative set with one
             * positive weight is usable: denormal ones, or ones whose plain sum overflows. */
            if (!any_positive) {
                fail(&a, "weights must have a positive sum");
                goto bad;
            }
            i += 1 + (int)n;
        } else if (op == OP_TRIMMEAN && is_kw(o, "BETA")) {
            if (once(&a, &s_beta, "BETA") || need(&a, i, 1, "BETA") ||
                get_dbl(&a, i + 1, "BETA", 0.0, 0.5, 1, &d))
                goto bad;
            p->trim_b = (size_t)floor(d * (double)n);
            i += 2;
        } else if (op == OP_TRIMMEAN && is_kw(o, "TRIM")) {
            /* An exact count: a fraction such as 3/47 can floor to one less than meant. */
            if (once(&a, &s_trim, "TRIM") || need(&a, i, 1, "TRIM") ||
                get_ll(&a, i + 1, "TRIM", 0, ((long long)n - 1) / 2, &v))
                goto bad;
            p->trim_b = (size_t)v;
            i += 2;
        } else if (op == OP_KRUM && is_kw(o, "F")) {
            if (once(&a, &s_f, "F") || need(&a, i, 1, "F") ||
                get_ll(&a, i + 1, "F", 0, SPIRT_MAX_INPUTS, &v))
                goto bad;
            p->krum_f = (size_t)v;
            i += 2;
        } else if (op == OP_KRUM && is_kw(o, "M")) {
            if (once(&a, &s_m, "M") || need(&a, i, 1, "M") ||
                get_ll(&a, i + 1, "M", 1, SPIRT_MAX_INPUTS, &v))
                goto bad;
            p->krum_m = (size_t)v;
            i += 2;
        } else if (op == OP_GEOMED && is_kw(o, "MAXITER")) {
            if (once(&a, &s_it, "MAXITER") || need(&a, i, 1, "MAXITER") ||
                get_ll(&a, i + 1, "MAXITER", 1, 100000, &v))
                goto bad;
            p->maxiter = (int)v;
            i += 2;
        } else if (op == OP_GEOMED && is_kw(o, "EPS")) {
            if (once(&a, &s_eps, "EPS") || need(&a, i, 1, "EPS") ||
                get_dbl(&a, i + 1, "EPS", 0.0, 1.0, 0, &p->eps))
                goto bad;
            i += 2;
        } else if (op == OP_CCLIP && is_kw(o, "TAU")) {
            if (once(&a, &s_tau, "TAU") || need(&a, i, 1, "TAU") ||
                get_dbl(&a, i + 1, "TAU", 0.0, HUGE_VAL, 0, &p->tau))
                goto bad;
            if (!(p->tau > 0.0)) {
                fail(&a, "TAU must be positive");
                goto bad;
            }
            i += 2;
        } else if (op == OP_CCLIP && is_kw(o, "ITERS")) {
            if (once(&a, &s_iters, "ITERS") || need(&a, i, 1, "ITERS") ||
                get_ll(&a, i + 1, "ITERS", 1, 100000, &v))
                goto bad;
            p->iters = (int)v;
            i += 2;
        } else if (is_kw(o, "SCRATCH")) {
            if (once(&a, &s_scratch, "SCRATCH")) goto bad;
            p->scratch = 1;
            i += 1;
        } else if (op == OP_CCLIP && is_kw(o, "START")) {
            if (once(&a, &s_start, "START") || need(&a, i, 1, "START")) goto bad;
            start = argv[i + 1];
            i += 2;
        } else {
            unknown(&a, i);
            goto bad;
        }
    }
    if (op == OP_TRIMMEAN && s_beta + s_trim != 1) {
        fail(&a, s_beta ? "TRIMMEAN takes BETA or TRIM, not both" : "TRIMMEAN needs TRIM or BETA");
        goto bad;
    }
    if (op == OP_CCLIP && !s_tau) {
        fail(&a, "CCLIP needs TAU");
        goto bad;
    }
    if (op == OP_KRUM) {
        if (!s_f) {
            fail(&a, "KRUM needs F");
            goto bad;
        }
        if (n <= 2 * p->krum_f + 2) {
            fail(&a, "too few inputs for f: Krum needs n > 2f+2 (n=%zu, f=%zu)", n, p->krum_f);
            goto bad;
        }
        if (p->krum_m > n - p->krum_f) {
            fail(&a, "M must be at most n-f (n=%zu, f=%zu, M=%zu)", n, p->krum_f, p->krum_m);
            goto bad;
        }
    }
    if (start) {
        job_add_input(job, start, 0);
        p->has_start = 1;
    }
    job_add_output(job, argv[1]);
    return job_submit(ctx, job);
bad:
    job_free(job);
    return reply_fail(&a);
}

int cmd_mean(RedisModuleCtx *c, RedisModuleString **v, int n) { return agg_command(c, v, n, OP_MEAN); }
int cmd_median(RedisModuleCtx *c, RedisModuleString **v, int n) { return agg_command(c, v, n, OP_MEDIAN); }
int cmd_trimmean(RedisModuleCtx *c, RedisModuleString **v, int n) { return agg_command(c, v, n, OP_TRIMMEAN); }
int cmd_krum(RedisModuleCtx *c, RedisModuleString **v, int n) { return agg_command(c, v, n, OP_KRUM); }
int cmd_geomed(RedisModuleCtx *c, RedisModuleString **v, int n) { return agg_command(c, v, n, OP_GEOMED); }
int cmd_cclip(RedisModuleCtx *c, RedisModuleString **v, int n) { return agg_command(c, v, n, OP_CCLIP); }

/* ---- optimizers ----------------------------------------------------------------- */

static int opt_key_positions(Args *a, const OptSpec *spec) {
    RM.KeyAtPos(a->ctx, 1);
    if (a->argc > 2) RM.KeyAtPos(a->ctx, 2);
    report_option_keys(a, 3, 0, spec);
    return RM_OK;
}

static const OptSpec SGD_OPTS[] = {
    {"LR", 1, 0},        {"MOMENTUM", 1, 0},     {"BUF", 1, 1},     {"DAMPENING", 1, 0},
    {"NESTEROV", 0, 0},  {"WEIGHT_DECAY", 1, 0}, {"SCRATCH", 0, 0}, {NULL, 0, 0},
};

static const OptSpec ADAM_OPTS[] = {
    {"M", 1, 1},   {"V", 1, 1},            {"STEP", 1, 0},      {"LR", 1, 0},
    {"BETAS", 2, 0}, {"EPS", 1, 0},        {"WEIGHT_DECAY", 1, 0}, {"DECOUPLED", 0, 0},
    {"SCRATCH", 0, 0}, {NULL, 0, 0},
};

/* SPIRT.SGD param grad LR lr [MOMENTUM mu] [BUF key] [DAMPENING d] [NESTEROV]
 *           [WEIGHT_DECAY wd] [SCRATCH] */
int cmd_sgd(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    Args a = {ctx, argv, argc, {0}};
    if (RM.IsKeysPositionRequest(ctx)) return opt_key_positions(&a, SGD_OPTS);
    if (argc < 5) return RM.WrongArity(ctx);
    SgdParams sp = {0};
    RedisModuleString *buf = NULL;
    int s_lr = 0, s_mu = 0, s_buf = 0, s_damp = 0, s_nest = 0, s_wd = 0, scratch = 0;
    for (int i = 3; i < argc;) {
        RedisModuleString *o = argv[i];
        if (is_kw(o, "LR")) {
            if (once(&a, &s_lr, "LR") || need(&a, i, 1, "LR") ||
                get_dbl(&a, i + 1, "LR", 0.0, HUGE_VAL, 0, &sp.lr))
                return reply_fail(&a);
            i += 2;
        } else if (is_kw(o, "MOMENTUM")) {
            if (once(&a, &s_mu, "MOMENTUM") || need(&a, i, 1, "MOMENTUM") ||
                get_dbl(&a, i + 1, "MOMENTUM", 0.0, HUGE_VAL, 0, &sp.momentum))
                return reply_fail(&a);
            i += 2;
        } else if (is_kw(o, "BUF")) {
            if (once(&a, &s_buf, "BUF") || need(&a, i, 1, "BUF")) return reply_fail(&a);
            buf = argv[i + 1];
            i += 2;
        } else if (is_kw(o, "DAMPENING")) {
            if (once(&a, &s_damp, "DAMPENING") || need(&a, i, 1, "DAMPENING") ||
                get_dbl(&a, i + 1, "DAMPENING", 0.0, 1.0, 0, &sp.dampening))
                return reply_fail(&a);
            i += 2;
        } else if (is_kw(o, "NESTEROV")) {
            if (once(&a, &s_nest, "NESTEROV")) return reply_fail(&a);
            sp.nesterov = 1;
            i += 1;
        } else if (is_kw(o, "SCRATCH")) {
            if (once(&a, &scratch, "SCRATCH")) return reply_fail(&a);
            i += 1;
        } else if (is_kw(o, "WEIGHT_DECAY")) {
            if (once(&a, &s_wd, "WEIGHT_DECAY") || need(&a, i, 1, "WEIGHT_DECAY") ||
                get_dbl(&a, i + 1, "WEIGHT_DECAY", 0.0, HUGE_VAL, 0, &sp.weight_decay))
                return reply_fail(&a);
            i += 2;
        } else {
            unknown(&a, i);
            return reply_fail(&a);
        }
    }
    if (!s_lr) fail(&a, "SGD needs LR");
    else if (sp.momentum > 0.0 && !buf) fail(&a, "MOMENTUM needs a BUF key for the momentum buffer");
    else if (sp.nesterov && (sp.momentum <= 0.0 || sp.dampening != 0.0))
        fail(&a, "NESTEROV needs MOMENTUM > 0 and DAMPENING 0");
    else if (buf && sp.momentum > 0.0 && same_key(buf, argv[1]))
        fail(&a, "BUF must differ from the parameter key");
    if (a.err[0]) return reply_fail(&a);
    Job *job = job_new(OP_SGD);
    if (!job) return RM.ReplyWithError(ctx, "ERR SPIRT out of memory");
    job_params(job)->sgd = sp;
    job_params(job)->scratch = scratch;
    job_add_input(job, argv[1], 0);
    job_add_input(job, argv[2], 0);
    job_add_output(job, argv[1]);
    if (sp.momentum > 0.0) {
        job_add_input(job, buf, 1); /* absent on the first step */
        job_add_output(job, buf);
    }
    return job_submit(ctx, job);
}

/* SPIRT.ADAM param grad M m V v STEP t LR lr [BETAS b1 b2] [EPS e] [WEIGHT_DECAY wd]
 *            [DECOUPLED] [SCRATCH] */
int cmd_adam(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    Args a = {ctx, argv, argc, {0}};
    if (RM.IsKeysPositionRequest(ctx)) return opt_key_positions(&a, ADAM_OPTS);
    if (argc < 11) return RM.WrongArity(ctx);
    AdamParams ap = {.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
    RedisModuleString *m = NULL, *v = NULL;
    int s_m = 0, s_v = 0, s_step = 0, s_lr = 0, s_b = 0, s_eps = 0, s_wd = 0, s_dec = 0,
        scratch = 0;
    for (int i = 3; i < argc;) {
        RedisModuleString *o = argv[i];
        if (is_kw(o, "M")) {
            if (once(&a, &s_m, "M") || need(&a, i, 1, "M")) return reply_fail(&a);
            m = argv[i + 1];
            i += 2;
        } else if (is_kw(o, "V")) {
            if (once(&a, &s_v, "V") || need(&a, i, 1, "V")) return reply_fail(&a);
            v = argv[i + 1];
            i += 2;
        } else if (is_kw(o, "STEP")) {
            if (once(&a, &s_step, "STEP") || need(&a, i, 1, "STEP") ||
                get_ll(&a, i + 1, "STEP", 1, (long long)1 << 53, &ap.step))
                return reply_fail(&a);
            i += 2;
        } else if (is_kw(o, "LR")) {
            if (once(&a, &s_lr, "LR") || need(&a, i, 1, "LR") ||
                get_dbl(&a, i + 1, "LR", 0.0, HUGE_VAL, 0, &ap.lr))
                return reply_fail(&a);
            i += 2;
        } else if (is_kw(o, "BETAS")) {
            if (once(&a, &s_b, "BETAS") || need(&a, i, 2, "BETAS") ||
                get_dbl(&a, i + 1, "beta1", 0.0, 1.0, 1, &ap.beta1) ||
                get_dbl(&a, i + 2, "beta2", 0.0, 1.0, 1, &ap.beta2))
                return reply_fail(&a);
            i += 3;
        } else if (is_kw(o, "EPS")) {
            if (once(&a, &s_eps, "EPS") || need(&a, i, 1, "EPS") ||
                get_dbl(&a, i + 1, "EPS", 0.0, HUGE_VAL, 0, &ap.eps))
                return reply_fail(&a);
            i += 2;
        } else if (is_kw(o, "WEIGHT_DECAY")) {
            if (once(&a, &s_wd, "WEIGHT_DECAY") || need(&a, i, 1, "WEIGHT_DECAY") ||
                get_dbl(&a, i + 1, "WEIGHT_DECAY", 0.0, HUGE_VAL, 0, &ap.weight_decay))
                return reply_fail(&a);
            i += 2;
        } else if (is_kw(o, "DECOUPLED")) {
            if (once(&a, &s_dec, "DECOUPLED")) return reply_fail(&a);
            ap.decoupled = 1;
            i += 1;
        } else if (is_kw(o, "SCRATCH")) {
            if (once(&a, &scratch, "SCRATCH")) return reply_fail(&a);
            i += 1;
        } else {
            unknown(&a, i);
            return reply_fail(&a);
        }
    }
    if (!m || !v) fail(&a, "ADAM needs M and V keys");
    else if (!s_step) fail(&a, "ADAM needs STEP");
    else if (!s_lr) fail(&a, "ADAM needs LR");
    else if (same_key(m, v) || same_key(m, argv[1]) || same_key(v, argv[1]))
        fail(&a, "the parameter, M and V keys must all differ");
    else if (ap.eps == 0.0) fail(&a, "EPS must be positive");
    if (a.err[0]) return reply_fail(&a);
    Job *job = job_new(OP_ADAM);
    if (!job) return RM.ReplyWithError(ctx, "ERR SPIRT out of memory");
    job_params(job)->adam = ap;
    job_params(job)->scratch = scratch;
    job_add_input(job, argv[1], 0);
    job_add_input(job, argv[2], 0);
    /* Step 1 starts from zero moments: the moment keys are only written, never read. */
    if (ap.step > 1) {
        job_add_input(job, m, 0);
        job_add_input(job, v, 0);
    }
    job_add_output(job, argv[1]);
    job_add_output(job, m);
    job_add_output(job, v);
    return job_submit(ctx, job);
}

/* ---- single-tensor commands ----------------------------------------------------- */

static int one_key_job(RedisModuleCtx *ctx, RedisModuleString **argv, int argc, OpKind op) {
    if (RM.IsKeysPositionRequest(ctx)) {
        RM.KeyAtPos(ctx, 1);
        return RM_OK;
    }
    if (argc != 2) return RM.WrongArity(ctx);
    Job *job = job_new(op);
    if (!job) return RM.ReplyWithError(ctx, "ERR SPIRT out of memory");
    job_add_input(job, argv[1], 0);
    return job_submit(ctx, job);
}

int cmd_norm(RedisModuleCtx *c, RedisModuleString **v, int n) { return one_key_job(c, v, n, OP_NORM); }
int cmd_digest(RedisModuleCtx *c, RedisModuleString **v, int n) { return one_key_job(c, v, n, OP_DIGEST); }

/* SPIRT.PUT key shape values [SCRATCH [EX seconds]] */
int cmd_put(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 4 || argc > 7) return RM.WrongArity(ctx);
    Args a = {ctx, argv, argc, {0}};
    int scratch = 0, s_ex = 0;
    long long ex = 0;
    for (int i = 4; i < argc;) {
        if (is_kw(argv[i], "SCRATCH")) {
            if (once(&a, &scratch, "SCRATCH")) return reply_fail(&a);
            i += 1;
        } else if (is_kw(argv[i], "EX")) {
            if (once(&a, &s_ex, "EX") || need(&a, i, 1, "EX") ||
                get_ll(&a, i + 1, "EX", 1, 100LL * 365 * 24 * 3600, &ex))
                return reply_fail(&a);
            i += 2;
        } else {
            unknown(&a, i);
            return reply_fail(&a);
        }
    }
    /* A persisted tensor with a relative TTL would get a fresh one on every AOF load. */
    if (s_ex && !scratch) {
        fail(&a, "EX needs SCRATCH");
        return reply_fail(&a);
    }
    size_t sl, vl, elems;
    const char *shape = RM.StringPtrLen(argv[2], &sl);
    const char *vals = RM.StringPtrLen(argv[3], &vl);
    if (tensor_parse_shape(shape, sl, &elems, a.err)) return reply_fail(&a);
    if (vl != elems * sizeof(float)) {
        fail(&a, "length mismatch: %zu value bytes but shape '%.*s' needs %zu", vl, (int)sl,
             shape, elems * sizeof(float));
        return reply_fail(&a);
    }
    /* The values arrive as bytes at any alignment; checked in place (f32u, src.h). */
    size_t bad = k_first_nonfinite((const f32u *)(const void *)vals, elems);
    if (bad < elems) {
        fail(&a, "non-finite value at index %zu", bad);
        return reply_fail(&a);
    }
    if (tensor_check_writable(ctx, argv[1], a.err)) return reply_fail(&a);
    tensor_write(ctx, argv[1], argv[3], shape, sl);
    if (s_ex) tensor_expire(ctx, argv[1], ex * 1000);
    if (!scratch) RM.ReplicateVerbatim(ctx);
    return RM.ReplyWithSimpleString(ctx, "OK");
}

/* SPIRT.GET key -> [shape, values] */
int cmd_get(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 2) return RM.WrongArity(ctx);
    Args a = {ctx, argv, argc, {0}};
    TensorView tv;
    int rc = tensor_read(ctx, argv[1], &tv, a.err);
    if (rc < 0) return reply_fail(&a);
    if (rc == 0) {
        char buf[80];
        fail(&a, "missing key '%s'", text(argv[1], buf, sizeof(buf)));
        return reply_fail(&a);
    }
    RM.ReplyWithArray(ctx, 2);
    RM.ReplyWithStringBuffer(ctx, tv.shape, tv.shape_len);
    return RM.ReplyWithStringBuffer(ctx, (const char *)tv.data, tv.len * sizeof(float));
}

/* ---- compression: SPIRT.PACK / SPIRT.UNPACK --------------------------------------- */

static int get_format(Args *a, int pos, CodecFormat *out) {
    char buf[80];
    if (is_kw(a->argv[pos], "fp16")) *out = CODEC_FP16;
    else if (is_kw(a->argv[pos], "int8")) *out = CODEC_INT8;
    else return fail(a, "FORMAT must be fp16 or int8, got '%s'", text(a->argv[pos], buf, sizeof(buf)));
    return 0;
}

static const OptSpec PACK_OPTS[] = {
    {"FORMAT", 1, 0}, {"BASE", 1, 1}, {"RESIDUAL", 1, 1}, {"SCRATCH", 0, 0}, {NULL, 0, 0},
};

/* SPIRT.PACK dst src FORMAT fp16|int8 [BASE base] [RESIDUAL res] [SCRATCH] */
int cmd_pack(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    Args a = {ctx, argv, argc, {0}};
    if (RM.IsKeysPositionRequest(ctx)) return opt_key_positions(&a, PACK_OPTS);
    if (argc < 5) return RM.WrongArity(ctx);
    PackArgs p = {.dst = argv[1], .src = argv[2]};
    int s_fmt = 0, s_base = 0, s_res = 0;
    for (int i = 3; i < argc;) {
        RedisModuleString *o = argv[i];
        if (is_kw(o, "FORMAT")) {
            if (once(&a, &s_fmt, "FORMAT") || need(&a, i, 1, "FORMAT") ||
                get_format(&a, i + 1, &p.fmt))
                return reply_fail(&a);
            i += 2;
        } else if (is_kw(o, "BASE")) {
            if (once(&a, &s_base, "BASE") || need(&a, i, 1, "BASE")) return reply_fail(&a);
            p.base = argv[i + 1];
            i += 2;
        } else if (is_kw(o, "RESIDUAL")) {
            if (once(&a, &s_res, "RESIDUAL") || need(&a, i, 1, "RESIDUAL")) return reply_fail(&a);
            p.residual = argv[i + 1];
            i += 2;
        } else if (is_kw(o, "SCRATCH")) {
            if (once(&a, &p.scratch, "SCRATCH")) return reply_fail(&a);
            i += 1;
        } else {
            unknown(&a, i);
            return reply_fail(&a);
        }
    }
    /* The outputs are written after every input was read, but an output that is also an
     * input would make the reply depend on that order: refuse it. */
    if (!s_fmt) fail(&a, "PACK needs FORMAT");
    else if (same_key(p.dst, p.src) || (p.base && same_key(p.dst, p.base)) ||
             (p.residual && same_key(p.dst, p.residual)))
        fail(&a, "dst must differ from src, BASE and RESIDUAL");
    else if (p.residual && (same_key(p.residual, p.src) || (p.base && same_key(p.residual, p.base))))
        fail(&a, "RESIDUAL must differ from src and BASE");
    if (a.err[0]) return reply_fail(&a);
    return pack_run(ctx, &p);
}

/* SPIRT.UNPACK dst src FORMAT fp16|int8 COUNT n [SCRATCH] */
int cmd_unpack(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    Args a = {ctx, argv, argc, {0}};
    if (argc < 5) return RM.WrongArity(ctx);
    PackArgs p = {.dst = argv[1], .src = argv[2]};
    int s_fmt = 0, s_count = 0;
    long long v;
    for (int i = 3; i < argc;) {
        RedisModuleString *o = argv[i];
        if (is_kw(o, "FORMAT")) {
            if (once(&a, &s_fmt, "FORMAT") || need(&a, i, 1, "FORMAT") ||
                get_format(&a, i + 1, &p.fmt))
                return reply_fail(&a);
            i += 2;
        } else if (is_kw(o, "COUNT")) {
            if (once(&a, &s_count, "COUNT") || need(&a, i, 1, "COUNT") ||
                get_ll(&a, i + 1, "COUNT", 0, (long long)SPIRT_MAX_ELEMENTS, &v))
                return reply_fail(&a);
            p.count = (size_t)v;
            i += 2;
        } else if (is_kw(o, "SCRATCH")) {
            if (once(&a, &p.scratch, "SCRATCH")) return reply_fail(&a);
            i += 1;
        } else {
            unknown(&a, i);
            return reply_fail(&a);
        }
    }
    if (!s_fmt) fail(&a, "UNPACK needs FORMAT");
    else if (!s_count) fail(&a, "UNPACK needs COUNT");
    if (a.err[0]) return reply_fail(&a);
    return unpack_run(ctx, &p);
}

/* ---- introspection and runtime settings ----------------------------------------- */

int cmd_info(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    if (argc != 1) return RM.WrongArity(ctx);
    JobsStats s;
    jobs_stats(&s);
    RM.ReplyWithArray(ctx, 26);
    RM.ReplyWithSimpleString(ctx, "version");
    RM.ReplyWithLongLong(ctx, SPIRT_MODULE_VERSION);
    RM.ReplyWithSimpleString(ctx, "isa");
    RM.ReplyWithSimpleString(ctx, k_isa());
    RM.ReplyWithSimpleString(ctx, "threads");
    RM.ReplyWithLongLong(ctx, jobs_config.threads);
    RM.ReplyWithSimpleString(ctx, "async_min_bytes");
    RM.ReplyWithLongLong(ctx, jobs_config.async_min_bytes);
    RM.ReplyWithSimpleString(ctx, "job_timeout_ms");
    RM.ReplyWithLongLong(ctx, jobs_config.job_timeout_ms);
    RM.ReplyWithSimpleString(ctx, "max_queue");
    RM.ReplyWithLongLong(ctx, jobs_config.max_queue);
    RM.ReplyWithSimpleString(ctx, "jobs_sync");
    RM.ReplyWithLongLong(ctx, s.sync_done);
    RM.ReplyWithSimpleString(ctx, "jobs_async");
    RM.ReplyWithLongLong(ctx, s.async_done);
    RM.ReplyWithSimpleString(ctx, "jobs_failed");
    RM.ReplyWithLongLong(ctx, s.failed);
    RM.ReplyWithSimpleString(ctx, "jobs_aborted");
    RM.ReplyWithLongLong(ctx, s.aborted);
    RM.ReplyWithSimpleString(ctx, "jobs_cancelled");
    RM.ReplyWithLongLong(ctx, s.cancelled);
    RM.ReplyWithSimpleString(ctx, "jobs_queued");
    RM.ReplyWithLongLong(ctx, s.queued);
    RM.ReplyWithSimpleString(ctx, "jobs_running");
    return RM.ReplyWithLongLong(ctx, s.running);
}

/* Settings that may change while running; THREADS and MAX_QUEUE are load-time only. */
static long long *runtime_setting(RedisModuleString *name, long long *lo, long long *hi) {
    if (is_kw(name, "ASYNC_MIN_BYTES")) {
        *lo = 0;
        *hi = (long long)1 << 50;
        return &jobs_config.async_min_bytes;
    }
    if (is_kw(name, "JOB_TIMEOUT_MS")) {
        *lo = 1;
        *hi = (long long)1 << 40;
        return &jobs_config.job_timeout_ms;
    }
    return NULL;
}

/* SPIRT.CONFIG GET name | SPIRT.CONFIG SET name value */
int cmd_config(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    Args a = {ctx, argv, argc, {0}};
    if (argc < 3) return RM.WrongArity(ctx);
    long long lo, hi, v;
    long long *slot = runtime_setting(argv[2], &lo, &hi);
    if (!slot) {
        char buf[80];
        fail(&a, "unknown setting '%s' (runtime settings: ASYNC_MIN_BYTES, JOB_TIMEOUT_MS)",
             text(argv[2], buf, sizeof(buf)));
        return reply_fail(&a);
    }
    if (is_kw(argv[1], "GET") && argc == 3) return RM.ReplyWithLongLong(ctx, *slot);
    if (is_kw(argv[1], "SET") && argc == 4) {
        if (get_ll(&a, 3, "value", lo, hi, &v)) return reply_fail(&a);
        *slot = v;
        return RM.ReplyWithSimpleString(ctx, "OK");
    }
    fail(&a, "usage: SPIRT.CONFIG GET name | SPIRT.CONFIG SET name value");
    return reply_fail(&a);
}

int parse_load_args(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    Args a = {ctx, argv, argc, {0}};
    long long v;
    const char *isa = "auto";
    for (int i = 0; i < argc; i += 2) {
        if (i + 1 >= argc) {
            fail(&a, "module argument %d has no value", i + 1);
            break;
        }
        if (is_kw(argv[i], "THREADS")) {
            if (get_ll(&a, i + 1, "THREADS", 1, 64, &v)) break;
            jobs_config.threads = v;
        } else if (is_kw(argv[i], "MAX_QUEUE")) {
            if (get_ll(&a, i + 1, "MAX_QUEUE", 1, 4096, &v)) break;
            jobs_config.max_queue = v;
        } else if (is_kw(argv[i], "ASYNC_MIN_BYTES")) {
            if (get_ll(&a, i + 1, "ASYNC_MIN_BYTES", 0, (long long)1 << 50, &v)) break;
            jobs_config.async_min_bytes = v;
        } else if (is_kw(argv[i], "JOB_TIMEOUT_MS")) {
            if (get_ll(&a, i + 1, "JOB_TIMEOUT_MS", 1, (long long)1 << 40, &v)) break;
            jobs_config.job_timeout_ms = v;
        } else if (is_kw(argv[i], "ISA")) {
            /* Which kernel set runs; results are bit-identical either way (kernels.h). */
            static const char *const modes[] = {"auto", "avx2", "baseline"};
            isa = NULL;
            for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++)
                if (is_kw(argv[i + 1], modes[m])) isa = modes[m];
            if (!isa) {
                char buf[80];
                fail(&a, "ISA must be auto, avx2 or baseline, got '%s'",
                     text(argv[i + 1], buf, sizeof(buf)));
                break;
            }
        } else {
            char buf[80];
            fail(&a, "unknown module argument '%s'", text(argv[i], buf, sizeof(buf)));
            break;
        }
    }
    if (!a.err[0]) k_select(isa, a.err, sizeof(a.err));
    if (a.err[0]) {
        RM.Log(ctx, "warning", "spirt: %s", a.err);
        return RM_ERR;
    }
    return RM_OK;
}
