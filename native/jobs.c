#include "jobs.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "pack.h"
#include "rules.h"
#include "scratch.h"
#include "tensor.h"

JobsConfig jobs_config = {
    .threads = 2,
    /* Measured in single-pass bytes (see work_bytes): 64 MiB is ~8 ms of work on
     * the main thread. Below it the hand-off to a worker and its locked copies cost
     * more than they save (bench.aggregate at 1M floats: 2.3x numpy's time via a
     * worker, 1.3x inline). */
    .async_min_bytes = 64 << 20,
    .job_timeout_ms = 600000,
    .max_queue = 64,
};

struct Job {
    OpKind op;
    struct JobParams p;

    size_t n_in;
    RedisModuleString *in_keys[SPIRT_MAX_INPUTS + 4];
    unsigned char optional[SPIRT_MAX_INPUTS + 4];
    unsigned char present[SPIRT_MAX_INPUTS + 4];
    const unsigned char *direct[SPIRT_MAX_INPUTS + 4]; /* main-thread pointers into Redis */
    size_t len;
    char shape[SPIRT_MAX_SHAPE_LEN];
    size_t shape_len;
    int check_finite;

    size_t n_out;
    RedisModuleString *out_keys[3];
    float *out[3];

    RedisModuleString *plain_key; /* PACK: the body's key */
    unsigned char *body;
    size_t body_len;

    double scalar;
    int iters_done;
    uint32_t *selected;
    char hex[65];

    int dbid;
    RedisModuleBlockedClient *bc;
    RedisModuleCtx *tsctx;
    float *chunkbuf; /* worker jobs: the locked copies of the current chunk */
    int aborted; /* set on the main thread or under the module lock only */
    char abort_msg[SPIRT_ERRLEN];
    int failed;
    char err[SPIRT_ERRLEN];
    int registered;
    int replied; /* the reply callback ran (else the client left or timed out) */
    Job *prev, *next;
};

/* ---- job objects ---------------------------------------------------------------- */

Job *job_new(OpKind op) {
    Job *j = calloc(1, sizeof(*j));
    if (!j) return NULL;
    j->op = op;
    j->check_finite = op != OP_DIGEST;
    return j;
}

struct JobParams *job_params(Job *job) { return &job->p; }

void job_add_input(Job *job, RedisModuleString *key, int optional) {
    RM.RetainString(NULL, key);
    job->optional[job->n_in] = (unsigned char)optional;
    job->in_keys[job->n_in++] = key;
}

void job_add_output(Job *job, RedisModuleString *key) {
    RM.RetainString(NULL, key);
    job->out_keys[job->n_out++] = key;
}

void job_set_plain_output(Job *job, RedisModuleString *key) {
    RM.RetainString(NULL, key);
    job->plain_key = key;
}

void job_free(Job *job) {
    if (!job) return;
    if (job->plain_key) RM.FreeString(NULL, job->plain_key);
    scratch_give(job->body, job->body_len);
    for (size_t i = 0; i < job->n_in; i++) RM.FreeString(NULL, job->in_keys[i]);
    for (size_t i = 0; i < job->n_out; i++) {
        RM.FreeString(NULL, job->out_keys[i]);
        scratch_give(job->out[i], job->len * sizeof(float));
    }
    free(job->p.weights);
    free(job->selected);
    free(job->chunkbuf);
    free(job);
}

/* ---- statistics ----------------------------------------------------------------- */

static long long st_sync, st_async, st_failed, st_aborted, st_cancelled, st_queued, st_running;

#define BUMP(v, d) __atomic_add_fetch(&(v), (d), __ATOMIC_RELAXED)
#define READ(v) __atomic_load_n(&(v), __ATOMIC_RELAXED)

void jobs_stats(JobsStats *o) {
    o->sync_done = READ(st_sync);
    o->async_done = READ(st_async);
    o->failed = READ(st_failed);
    o->aborted = READ(st_aborted);
    o->cancelled = READ(st_cancelled);
    o->queued = READ(st_queued);
    o->running = READ(st_running);
}

/* ---- the registry of worker jobs and their watched keys -------------------------- */

/* Touched only on the main thread or with the module lock held, like Redis data. */
static Job *g_active;

static void registry_add(Job *j) {
    j->next = g_active;
    j->prev = NULL;
    if (g_active) g_active->prev = j;
    g_active = j;
    j->registered = 1;
}

static void registry_remove(Job *j) {
    if (!j->registered) return;
    if (j->prev) j->prev->next = j->next;
    else g_active = j->next;
    if (j->next) j->next->prev = j->prev;
    j->registered = 0;
}

static void abort_job(Job *j, const char *msg) {
    if (j->aborted) return;
    j->aborted = 1;
    snprintf(j->abort_msg, sizeof(j->abort_msg), "%s", msg);
}

static int name_is(RedisModuleString *a, const char *p, size_t n) {
    size_t an;
    const char *ap = RM.StringPtrLen(a, &an);
    return an == n && memcmp(ap, p, n) == 0;
}

static int on_keyspace(RedisModuleCtx *ctx, int type, const char *event, RedisModuleString *key) {
    (void)type;
    if (!g_active) return RM_OK;
    size_t n;
    const char *p = RM.StringPtrLen(key, &n);
    static const char sfx[] = ":shape";
    const size_t sl = sizeof(sfx) - 1;
    int db = RM.GetSelectedDb(ctx);
    for (Job *j = g_active; j; j = j->next) {
        if (j->aborted || j->dbid != db) continue;
        for (size_t i = 0; i < j->n_in; i++) {
            /* Watch both KEY and KEY:shape of every input. */
            int hit = name_is(j->in_keys[i], p, n) ||
                      (n > sl && memcmp(p + n - sl, sfx, sl) == 0 &&
                       name_is(j->in_keys[i], p, n - sl));
            if (hit) {
                char label[80], msg[SPIRT_ERRLEN];
                snprintf(msg, sizeof(msg),
                         "input '%s' was modified during the command (%s); nothing was written",
                         tensor_key_label(key, label, sizeof(label)), event);
                abort_job(j, msg);
                break;
            }
        }
    }
    return RM_OK;
}

static void abort_all(const char *why) {
    char msg[SPIRT_ERRLEN];
    snprintf(msg, sizeof(msg), "%s during the command; nothing was written", why);
    for (Job *j = g_active; j; j = j->next) abort_job(j, msg);
}

static void on_flush(RedisModuleCtx *ctx, RMEvent e, uint64_t sub, void *data) {
    (void)ctx, (void)e, (void)data;
    if (sub == 0) abort_all("the database was flushed");
}

static void on_swapdb(RedisModuleCtx *ctx, RMEvent e, uint64_t sub, void *data) {
    (void)ctx, (void)e, (void)sub, (void)data;
    abort_all("databases were swapped");
}

static void on_loading(RedisModuleCtx *ctx, RMEvent e, uint64_t sub, void *data) {
    (void)ctx, (void)e, (void)data;
    if (sub <= 2) abort_all("the dataset was reloaded");
}

static Job *find_by_bc(RedisModuleBlockedClient *bc) {
    for (Job *j = g_active; j; j = j->next)
        if (j->bc == bc) return j;
    return NULL;
}

/* ---- sources: direct (main thread) and locked copies (worker) -------------------- */

typedef struct {
    Src base;
    Job *job;
} JobSrc;

static int check_rows_finite(JobSrc *js, size_t off, size_t cnt, const f32u **out) {
    Job *j = js->job;
    if (!j->check_finite) return 0;
    for (size_t i = 0; i < j->n_in; i++) {
        if (!out[i]) continue;
        size_t bad = k_first_nonfinite(out[i], cnt);
        if (bad < cnt) {
            char label[80];
            return src_fail(&js->base, "non-finite value in '%s' at index %zu",
                            tensor_key_label(j->in_keys[i], label, sizeof(label)), off + bad);
        }
    }
    return 0;
}

/* Reads Redis' bytes in place, wherever they sit: Redis' string headers are 3, 5, 9 or
 * 17 bytes, so a value's buffer is usually not float-aligned, and the rows are handed
 * out as f32u (alignment 1, src.h), which every kernel reads with plain unaligned
 * vector loads. (Copying each chunk into an aligned buffer first added a pass over
 * every input to every command.) */
static int direct_fetch(Src *s, size_t off, size_t cnt, const f32u **out) {
    JobSrc *js = (JobSrc *)s;
    Job *j = js->job;
    for (size_t i = 0; i < j->n_in; i++)
        out[i] = j->present[i] ? (const f32u *)(const void *)(j->direct[i] + off * sizeof(float))
                               : NULL;
    return check_rows_finite(js, off, cnt, out);
}

static int locked_fetch(Src *s, size_t off, size_t cnt, const f32u **out) {
    JobSrc *js = (JobSrc *)s;
    Job *j = js->job;
    RM.ThreadSafeContextLock(j->tsctx);
    if (j->aborted) {
        RM.ThreadSafeContextUnlock(j->tsctx);
        return src_fail(s, "%s", j->abort_msg);
    }
    for (size_t i = 0; i < j->n_in; i++) {
        if (!j->present[i]) {
            out[i] = NULL;
            continue;
        }
        RedisModuleKey *k = RM.OpenKey(j->tsctx, j->in_keys[i], RM_READ);
        size_t bytes = 0;
        const char *p = NULL;
        if (k && RM.KeyType(k) == RM_KEYTYPE_STRING) p = RM.StringDMA(k, &bytes, RM_READ);
        if (!p || bytes != j->len * sizeof(float)) {
            /* Unreachable while the watch works; kept so a missed event cannot read
             * out of bounds. */
            if (k) RM.CloseKey(k);
            RM.ThreadSafeContextUnlock(j->tsctx);
            char label[80];
            return src_fail(s, "input '%s' changed during the command; nothing was written",
                            tensor_key_label(j->in_keys[i], label, sizeof(label)));
        }
        float *dst = j->chunkbuf + i * s->chunk;
        memcpy(dst, p + off * sizeof(float), cnt * sizeof(float));
        RM.CloseKey(k);
        out[i] = dst;
    }
    RM.ThreadSafeContextUnlock(j->tsctx);
    return check_rows_finite(js, off, cnt, out);
}

/* ---- computing ------------------------------------------------------------------ */

static int compute(Job *j, Src *src) {
    struct JobParams *p = &j->p;
    for (size_t k = 0; k < j->n_out; k++) {
        j->out[k] = scratch_take(j->len * sizeof(float));
        if (!j->out[k]) return src_fail(src, "out of memory for %zu-element result", j->len);
    }
    NnmSrc *mix = NULL;
    Src *s = src;
    if (p->nnm) {
        mix = nnm_create(src, p->n, p->nnm_f);
        if (!mix) return -1;
        s = nnm_src(mix);
    }
    int rc;
    switch (j->op) {
    case OP_MEAN: rc = rule_mean(s, p->n, p->weights, j->out[0]); break;
    case OP_MEDIAN: rc = rule_median(s, p->n, j->out[0]); break;
    case OP_TRIMMEAN: rc = rule_trimmed_mean(s, p->n, p->trim_b, j->out[0]); break;
    case OP_KRUM:
        j->selected = malloc(p->krum_m * sizeof(uint32_t));
        rc = j->selected ? rule_krum(s, p->n, p->krum_f, p->krum_m, j->out[0], j->selected)
                         : src_fail(s, "out of memory");
        break;
    case OP_GEOMED: rc = rule_geomed(s, p->n, p->maxiter, p->eps, j->out[0], &j->iters_done); break;
    case OP_CCLIP: rc = rule_cclip(s, p->n, p->tau, p->iters, p->has_start, j->out[0]); break;
    case OP_SGD: rc = opt_sgd(s, &p->sgd, j->out[0], j->n_out > 1 ? j->out[1] : NULL); break;
    case OP_ADAM: rc = opt_adam(s, &p->adam, j->out[0], j->out[1], j->out[2]); break;
    case OP_NORM: rc = op_norm(s, &j->scalar); break;
    case OP_DIGEST: rc = op_digest(s, j->hex); break;
    case OP_PACK:
        j->body_len = codec_encoded_size(p->pack_fmt, j->len);
        j->body = scratch_take(j->body_len);
        rc = j->body ? pack_compute(s, p, j->body, j->n_out ? j->out[0] : NULL)
                     : src_fail(s, "out of memory for a %zu-byte body", j->body_len);
        break;
    default: rc = src_fail(s, "unknown operation");
    }
    nnm_free(mix);
    return rc;
}

static void init_src(JobSrc *js, Job *j, int locked) {
    js->job = j;
    js->base.rows = j->n_in;
    js->base.len = j->len;
    js->base.chunk = src_pick_chunk(j->n_in);
    js->base.fetch = locked ? locked_fetch : direct_fetch;
    js->base.err = j->err;
}

/* ---- replies and commit (main thread) ------------------------------------------- */

static int reply_err(RedisModuleCtx *ctx, const char *msg) {
    char buf[SPIRT_ERRLEN + 16];
    snprintf(buf, sizeof(buf), "ERR SPIRT %s", msg);
    return RM.ReplyWithError(ctx, buf);
}

/* Whether Redis would deliver anything this command propagates. It feeds the AOF when
 * AOF is on (or being turned on) and the replication stream when this server has a
 * replica or keeps a backlog (from the first replica on, and for repl-backlog-ttl
 * after the last one left, so that it can resume); anything else it drops. When INFO
 * cannot be read, assume it would. Main thread only. */
int jobs_propagation_delivered(RedisModuleCtx *ctx) {
    if (RM.GetContextFlags(ctx) & RM_CTX_FLAGS_AOF) return 1;
    RedisModuleServerInfoData *info = RM.GetServerInfo(ctx, "replication");
    if (!info) return 1;
    int err_backlog = 0, err_replicas = 0;
    long long backlog = RM.ServerInfoGetFieldSigned(info, "repl_backlog_active", &err_backlog);
    long long replicas = RM.ServerInfoGetFieldSigned(info, "connected_slaves", &err_replicas);
    RM.FreeServerInfo(ctx, info);
    return err_backlog || err_replicas || backlog != 0 || replicas != 0;
}

/* What the AOF and replicas get for a command's outputs. By value: a SET of each output
 * and its shape, so that replaying them never needs the inputs. Replicating the command
 * itself would be smaller, but its inputs are usually scratch, so absent from the AOF
 * and the replicas (or stale there, from an AOF rewrite that captured them); making
 * them durable instead would put every training round's gradients in the AOF (~20 MB
 * a round at 1M parameters and 4 peers), which cost the managed Redis more CPU than
 * all its tensor work.
 *
 * By value costs a copy of every output into a new string, so it is made only when
 * something receives it: with AOF off and no replica nor backlog Redis would drop it,
 * and the copy would be one more pass over every output (into fresh pages). The write
 * is still counted as a change, as every RM_Replicate counts one (server.dirty: the
 * RDB save points), by a replication sent to neither the AOF ("A") nor replicas
 * ("R"): a module's key writes are not counted otherwise. */
static void propagate_outputs(RedisModuleCtx *ctx, Job *j) {
    if (j->p.scratch) return;
    if (!jobs_propagation_delivered(ctx)) {
        RM.Replicate(ctx, "PING", "AR");
        return;
    }
    if (j->plain_key) RM.Replicate(ctx, "SET", "sb", j->plain_key, (const char *)j->body, j->body_len);
    for (size_t k = 0; k < j->n_out; k++)
        tensor_replicate_floats(ctx, j->out_keys[k], j->out[k], j->len, j->shape, j->shape_len);
}

static int finish(RedisModuleCtx *ctx, Job *j) {
    if (j->aborted) {
        BUMP(st_aborted, 1);
        return reply_err(ctx, j->abort_msg);
    }
    if (j->failed) {
        BUMP(st_failed, 1);
        return reply_err(ctx, j->err);
    }
    /* Check every output before writing any: all or nothing. */
    int unwritable = j->plain_key && plain_check_writable(ctx, j->plain_key, j->err);
    for (size_t k = 0; k < j->n_out && !unwritable; k++)
        unwritable = tensor_check_writable(ctx, j->out_keys[k], j->err);
    if (unwritable) {
        BUMP(st_failed, 1);
        return reply_err(ctx, j->err);
    }
    if (j->plain_key) plain_write_bytes(ctx, j->plain_key, j->body, j->body_len);
    for (size_t k = 0; k < j->n_out; k++)
        tensor_write_floats(ctx, j->out_keys[k], j->out[k], j->len, j->shape, j->shape_len);
    propagate_outputs(ctx, j);
    switch (j->op) {
    case OP_KRUM:
        RM.ReplyWithArray(ctx, (long)j->p.krum_m);
        for (size_t t = 0; t < j->p.krum_m; t++) RM.ReplyWithLongLong(ctx, j->selected[t]);
        return RM_OK;
    case OP_GEOMED: return RM.ReplyWithLongLong(ctx, j->iters_done);
    case OP_NORM: return RM.ReplyWithDouble(ctx, j->scalar);
    case OP_DIGEST: return RM.ReplyWithStringBuffer(ctx, j->hex, 64);
    case OP_PACK: return RM.ReplyWithLongLong(ctx, (long long)j->body_len);
    default: return RM.ReplyWithSimpleString(ctx, "OK");
    }
}

static int bc_reply(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv, (void)argc;
    Job *j = RM.GetBlockedClientPrivateData(ctx);
    registry_remove(j);
    j->replied = 1;
    BUMP(st_async, 1);
    return finish(ctx, j);
}

static int bc_timeout(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv, (void)argc;
    Job *j = find_by_bc(RM.GetBlockedClientHandle(ctx));
    char msg[SPIRT_ERRLEN];
    snprintf(msg, sizeof(msg), "timed out after %lld ms; nothing was written",
             jobs_config.job_timeout_ms);
    if (j) abort_job(j, msg);
    return reply_err(ctx, msg);
}

static void bc_free(RedisModuleCtx *ctx, void *privdata) {
    (void)ctx;
    Job *j = privdata;
    registry_remove(j);
    if (!j->replied) BUMP(st_cancelled, 1);
    job_free(j);
}

static void bc_disconnected(RedisModuleCtx *ctx, RedisModuleBlockedClient *bc) {
    (void)ctx;
    Job *j = find_by_bc(bc);
    if (j) abort_job(j, "client disconnected");
}

/* ---- worker threads ------------------------------------------------------------- */

static pthread_mutex_t q_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_cv = PTHREAD_COND_INITIALIZER;
static Job **q_ring;
static size_t q_cap, q_head, q_count;

static void run_on_worker(Job *j) {
    JobSrc js;
    init_src(&js, j, 1);
    j->tsctx = RM.GetThreadSafeContext(j->bc);
    j->chunkbuf = malloc(j->n_in * js.base.chunk * sizeof(float));
    if (!j->chunkbuf)
        j->failed = src_fail(&js.base, "out of memory") != 0;
    else if (compute(j, &js.base))
        j->failed = 1;
    free(j->chunkbuf);
    j->chunkbuf = NULL;
    RM.FreeThreadSafeContext(j->tsctx);
    j->tsctx = NULL;
    RM.UnblockClient(j->bc, j);
}

static void *worker_main(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&q_mu);
        while (q_count == 0) pthread_cond_wait(&q_cv, &q_mu);
        Job *j = q_ring[q_head];
        q_head = (q_head + 1) % q_cap;
        q_count--;
        pthread_mutex_unlock(&q_mu);
        BUMP(st_queued, -1);
        BUMP(st_running, 1);
        run_on_worker(j);
        BUMP(st_running, -1);
    }
    return NULL;
}

static int enqueue(Job *j) {
    pthread_mutex_lock(&q_mu);
    if (q_count >= q_cap) {
        pthread_mutex_unlock(&q_mu);
        return -1;
    }
    q_ring[(q_head + q_count) % q_cap] = j;
    q_count++;
    BUMP(st_queued, 1);
    pthread_cond_signal(&q_cv);
    pthread_mutex_unlock(&q_mu);
    return 0;
}

static int queue_full(void) {
    pthread_mutex_lock(&q_mu);
    int full = q_count >= q_cap;
    pthread_mutex_unlock(&q_mu);
    return full;
}

int jobs_init(RedisModuleCtx *ctx) {
    q_cap = (size_t)jobs_config.max_queue;
    q_ring = calloc(q_cap, sizeof(*q_ring));
    if (!q_ring) return RM_ERR;
    for (long long i = 0; i < jobs_config.threads; i++) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc) return RM_ERR;
    }
    if (RM.SubscribeToKeyspaceEvents(ctx, RM_NOTIFY_ALL, on_keyspace) != RM_OK) return RM_ERR;
    RMEvent flush = {RM_EVENT_FLUSHDB, 1}, swap = {RM_EVENT_SWAPDB, 1}, load = {RM_EVENT_LOADING, 1};
    if (RM.SubscribeToServerEvent(ctx, flush, on_flush) != RM_OK) return RM_ERR;
    if (RM.SubscribeToServerEvent(ctx, swap, on_swapdb) != RM_OK) return RM_ERR;
    if (RM.SubscribeToServerEvent(ctx, load, on_loading) != RM_OK) return RM_ERR;
    return RM_OK;
}

/* ---- submission ----------------------------------------------------------------- */

static int validate(RedisModuleCtx *ctx, Job *j) {
    char label[80], first[80];
    int have_len = 0;
    for (size_t i = 0; i < j->n_in; i++) {
        TensorView tv;
        int rc = tensor_read(ctx, j->in_keys[i], &tv, j->err);
        if (rc < 0) return -1;
        if (rc == 0) {
            if (j->optional[i]) continue;
            snprintf(j->err, SPIRT_ERRLEN, "missing key '%s'",
                     tensor_key_label(j->in_keys[i], label, sizeof(label)));
            return -1;
        }
        j->present[i] = 1;
        j->direct[i] = tv.data;
        if (!have_len) {
            have_len = 1;
            j->len = tv.len;
            memcpy(j->shape, tv.shape, tv.shape_len);
            j->shape_len = tv.shape_len;
            tensor_key_label(j->in_keys[i], first, sizeof(first));
        } else if (tv.len != j->len) {
            snprintf(j->err, SPIRT_ERRLEN,
                     "length mismatch: '%s' has %zu elements, '%s' has %zu",
                     tensor_key_label(j->in_keys[i], label, sizeof(label)), tv.len, first,
                     j->len);
            return -1;
        }
    }
    if (j->plain_key && plain_check_writable(ctx, j->plain_key, j->err)) return -1;
    for (size_t k = 0; k < j->n_out; k++)
        if (tensor_check_writable(ctx, j->out_keys[k], j->err)) return -1;
    return 0;
}

/* Input bytes weighted by how many passes the operation makes over them, so that
 * ASYNC_MIN_BYTES bounds main-thread time rather than input size: one pass for the
 * mean, updates, norm and digest; rank rules sort every coordinate; Krum, the
 * geometric median and centered clipping make many passes. */
static size_t work_bytes(const Job *j, size_t bytes) {
    switch (j->op) {
    case OP_MEDIAN:
    case OP_TRIMMEAN:
    case OP_PACK: return bytes * 2; /* PACK: a division per value, and the body written */
    case OP_KRUM:
    case OP_GEOMED:
    case OP_CCLIP: return bytes * 8;
    default: return bytes;
    }
}

int job_submit(RedisModuleCtx *ctx, Job *j) {
    if (validate(ctx, j)) {
        BUMP(st_failed, 1);
        reply_err(ctx, j->err);
        job_free(j);
        return RM_OK;
    }
    size_t bytes = 0;
    for (size_t i = 0; i < j->n_in; i++)
        if (j->present[i]) bytes += j->len * sizeof(float);
    int flags = RM.GetContextFlags(ctx);
    int may_block = !(flags & (RM_CTX_FLAGS_MULTI | RM_CTX_FLAGS_LUA | RM_CTX_FLAGS_REPLICATED |
                               RM_CTX_FLAGS_DENY_BLOCKING | RM_CTX_FLAGS_LOADING));
    if (!may_block || (long long)work_bytes(j, bytes) < jobs_config.async_min_bytes) {
        /* Small, or blocking not allowed (MULTI, Lua, AOF replay, a master's stream):
         * compute here, reading the inputs in place, with nothing else running. */
        JobSrc js;
        init_src(&js, j, 0);
        if (compute(j, &js.base)) j->failed = 1;
        BUMP(st_sync, 1);
        finish(ctx, j);
        job_free(j);
        return RM_OK;
    }
    if (queue_full()) {
        snprintf(j->err, SPIRT_ERRLEN, "busy: %lld jobs already queued; retry later",
                 jobs_config.max_queue);
        BUMP(st_failed, 1);
        reply_err(ctx, j->err);
        job_free(j);
        return RM_OK;
    }
    j->dbid = RM.GetSelectedDb(ctx);
    registry_add(j);
    j->bc = RM.BlockClient(ctx, bc_reply, bc_timeout, bc_free, jobs_config.job_timeout_ms);
    RM.SetDisconnectCallback(j->bc, bc_disconnected);
    if (enqueue(j)) {
        /* Only the main thread enqueues and queue_full() said no, so this cannot
         * happen; fail the job through the normal unblock path if it ever does. */
        abort_job(j, "worker queue full");
        RM.UnblockClient(j->bc, j);
    }
    return RM_OK;
}
