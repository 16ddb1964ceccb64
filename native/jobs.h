/* A tensor command as a job: validated on the main thread, computed either right there
 * (small inputs, or where blocking is not allowed: MULTI, Lua) or on a worker thread
 * with the client blocked, and committed on the main thread.
 *
 * Worker jobs read their inputs chunk by chunk under the module lock, so Redis serves
 * other clients between chunks. The job watches its input keys through keyspace
 * notifications; if any is modified, deleted, expired, flushed or swapped away before
 * the result is committed, the job fails and writes nothing. Outputs are written only
 * after everything succeeded, so every error leaves the keyspace unchanged. */
#ifndef SPIRT_JOBS_H
#define SPIRT_JOBS_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "optim.h"
#include "rm_api.h"
#include "src.h"

#define SPIRT_MAX_INPUTS 1024

typedef enum {
    OP_MEAN,
    OP_MEDIAN,
    OP_TRIMMEAN,
    OP_KRUM,
    OP_GEOMED,
    OP_CCLIP,
    OP_SGD,
    OP_ADAM,
    OP_NORM,
    OP_DIGEST,
    OP_PACK,
} OpKind;

typedef struct Job Job;

typedef struct {
    long long threads;
    long long async_min_bytes;
    long long job_timeout_ms;
    long long max_queue;
} JobsConfig;

extern JobsConfig jobs_config;

/* Starts the worker threads and subscribes to keyspace/server events. */
int jobs_init(RedisModuleCtx *ctx);

Job *job_new(OpKind op);
void job_free(Job *job);

/* Inputs and outputs (key names are retained). Inputs marked optional may be absent. */
void job_add_input(Job *job, RedisModuleString *key, int optional);
void job_add_output(Job *job, RedisModuleString *key);
/* PACK's body: a plain string output (no shape key), written with the float outputs. */
void job_set_plain_output(Job *job, RedisModuleString *key);

/* Parameters, set by the command parser before job_submit. */
struct JobParams {
    size_t n;          /* aggregated inputs: the first n inputs */
    double *weights;   /* MEAN WEIGHTS (n, owned by the job) or NULL */
    int nnm;
    size_t nnm_f;
    size_t trim_b;
    size_t krum_f, krum_m;
    int maxiter;
    double eps;
    double tau;
    int iters;
    int has_start;     /* CCLIP: input n is the start point */
    int scratch;       /* SCRATCH: the outputs are not propagated (AOF, replicas) */
    SgdParams sgd;
    AdamParams adam;
    CodecFormat pack_fmt; /* PACK: inputs src, [base], [residual]; output [residual] */
    int pack_has_base;
    int pack_has_res;
};
struct JobParams *job_params(Job *job);

/* Validates, runs or queues, replies; takes ownership of job. Always returns RM_OK. */
int job_submit(RedisModuleCtx *ctx, Job *job);

/* Whether anything would receive what a command propagates now: the AOF, a replica,
 * or a replication backlog (jobs.c explains why by-value copies are made only then).
 * Main thread only. */
int jobs_propagation_delivered(RedisModuleCtx *ctx);

/* Counters for SPIRT.INFO. */
typedef struct {
    long long sync_done, async_done, failed, aborted, cancelled, queued, running;
} JobsStats;
void jobs_stats(JobsStats *out);

#endif
