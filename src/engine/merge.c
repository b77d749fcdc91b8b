/* SPDX-License-Identifier: MIT */
/* merge.c : lm_merge_run(): the orchestration.  Opens the base and the adapters, plans, decides
 * the output (output.c), runs the executor, and fills the report (report.c). */
#include "lora_merge.h"

#include "adapter_load.h"
#include "exec.h"
#include "gemm_tile.h"
#include "inputs.h"
#include "lm_error.h"
#include "lm_kernels.h"
#include "model_files.h"
#include "output.h"
#include "plan.h"
#include "report.h"
#include "st_reader.h"
#include "shards.h"
#include "st_writer.h"
#include "tensor_set.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

const char *lm_version_text(void)
{
    static char buf[256];
    if (buf[0] == '\0') {
        lm_kernels k;
        lm_kernels_select(&k, NULL);
        snprintf(buf, sizeof buf, "lora-merge %s (kernels %s, %s)", LM_VERSION_STRING, k.name, lm_blas_name());
    }
    return buf;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int parse_dtype_opt(const char *s, int *set, lm_dtype *dt)
{
    *set = 0;
    if (s == NULL || strcmp(s, "auto") == 0)
        return 1;
    *set = 1;
    if (strcmp(s, "bf16") == 0 || strcmp(s, "BF16") == 0)
        *dt = LM_DT_BF16;
    else if (strcmp(s, "f16") == 0 || strcmp(s, "F16") == 0 || strcmp(s, "fp16") == 0)
        *dt = LM_DT_F16;
    else if (strcmp(s, "f32") == 0 || strcmp(s, "F32") == 0 || strcmp(s, "fp32") == 0)
        *dt = LM_DT_F32;
    else
        return 0;
    return 1;
}

/* An output file must not be any input, through any alias (symlink, hard link). */
static lm_code check_not_input(const char *out, const lm_model *m, lm_adapter *const *ads, size_t n_ads, lm_err *err)
{
    struct stat st;
    if (stat(out, &st) != 0)
        return LM_OK;
    for (size_t i = 0; i < lm_model_n_files(m); i++)
        if (lm_same_file(out, lm_st_path(lm_model_file(m, i))))
            return lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as the base '%s'",
                           lm_st_path(lm_model_file(m, i)));
    if (lm_model_index_path(m) && lm_same_file(out, lm_model_index_path(m)))
        return lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as the index '%s'",
                       lm_model_index_path(m));
    for (size_t a = 0; a < n_ads; a++) {
        const char *inputs[2] = {ads[a]->weights_path, ads[a]->config_path};
        for (size_t i = 0; i < 2; i++)
            if (lm_same_file(out, inputs[i]))
                return lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as the input '%s'",
                               inputs[i]);
    }
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* the state of one merge                                                                       */
/* ------------------------------------------------------------------------------------------ */
/* an adapter of a batch job opened ahead, on one of the batch's threads (batch_preopen): the
 * adapter, or the error its opening gave */
typedef struct {
    lm_adapter *a;
    lm_err err;
    int done;
} preopened;

typedef struct {
    const lm_merge_job *job;
    preopened *pre;             /* job->n_adapters opened ahead (a batch), or NULL */
    lm_report_impl *ri;
    lm_model *model;
    lm_adapter **ads;           /* job->n_adapters */
    char (*ad_sha256)[65];      /* of each adapter's weights file */
    lm_plan *plan;
    lm_plan_opts popts;
    lm_kernels kern;
    lm_out_target ot;
    lm_side_plan side;
    lm_base_info bi;
    lm_qscheme qs;              /* the base's quantization_config */
    char *base_dir;
    char *meta_text[3];         /* provenance values in the output's __metadata__ */
    const char *out_dtype;      /* "BF16", "mixed" or NULL */
    lm_tensor_stats *tstats;    /* per plan tensor, measured by the executor */
    char (*out_sha)[65];        /* --json: each weights file's sha256, computed as it was written */
    lm_exec_stats st;
    double t_phase, t0;
    int model_shared;           /* a batch job: the model is the first job's */
    int committed;              /* its OUT holds the new model */
} merge_state;

static void phase_end(merge_state *S, int phase)
{
    double t = now_seconds();
    S->ri->phase_seconds[phase] += t - S->t_phase;
    S->t_phase = t;
}

/* Adapters opened ahead on the merge's threads: a merge's own when it has several, a batch's
 * after the first job's.  Opening one (the snapshot copy, its sha256, the inf/NaN scan) is most of
 * a job's set-up; the jobs then take their adapters in order, as before, each its adapter or the
 * error the same call gave, and report the first failure.  Each thread hashes the snapshots it
 * copies itself. */
typedef struct {
    const lm_merge_job *jobs;
    lm_model *model;
    preopened **pre;     /* [job][adapter]; NULL for a job left to open its own */
    size_t n_jobs;
    size_t next;         /* the next (job, adapter) to open, counted over the jobs in order */
} batch_pre;

static void *preopen_main(void *arg)
{
    batch_pre *B = arg;
    lm_st_snapshot_hash_here(1);
    for (;;) {
        size_t k = __atomic_fetch_add(&B->next, 1, __ATOMIC_RELAXED), j = 0;
        while (j < B->n_jobs && k >= B->jobs[j].n_adapters) {
            k -= B->jobs[j].n_adapters;
            j++;
        }
        if (j == B->n_jobs)
            break;
        if (B->pre[j] == NULL)
            continue;
        const lm_merge_job *J = &B->jobs[j];
        preopened *p = &B->pre[j][k];
        lm_err_clear(&p->err);
        p->a = lm_adapter_open_with(J->adapters[k].dir, J->adapters[k].weight, B->model, J->formats, &p->err);
        p->done = 1;
    }
    lm_st_snapshot_hash_here(0);
    return NULL;
}

/* the threads for items pieces of work asked for n_threads (0: every core), at most 64 */
static size_t pool_threads(int n_threads, size_t items)
{
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    size_t T = n_threads > 0 ? (size_t)n_threads : cores > 0 ? (size_t)cores : 1;
    T = T < items ? T : items;
    return T < 64 ? T : 64;
}

/* fn(arg) on T threads, the calling one too (fewer when a thread cannot be started) */
static void pool_run(void *(*fn)(void *), void *arg, size_t T)
{
    pthread_t th[64];
    size_t started = 0;
    while (started + 1 < T && pthread_create(&th[started], NULL, fn, arg) == 0)
        started++;
    fn(arg);
    for (size_t t = 0; t < started; t++)
        pthread_join(th[t], NULL);
}

/* B->next .. B->next + items - 1 opened on up to n_threads threads (0: every core), the calling
 * one too; with one, nothing (the job opens its own) */
static void preopen_run(batch_pre *B, size_t items, int n_threads)
{
    const size_t T = pool_threads(n_threads, items);
    if (T >= 2)
        pool_run(preopen_main, B, T);
}

/* the base and the adapters, with an error that says what a file is when it is not what was
 * expected (an LFS pointer, a GGUF file ...) */
static lm_code open_inputs(merge_state *S, lm_err *err)
{
    const lm_merge_job *job = S->job;
    lm_code rc = lm_inputs_precheck(job, err);
    if (rc != LM_OK)
        return rc;
    if (S->model == NULL) /* a batch job shares the first job's */
        S->model = lm_model_open(job->base_path, err);
    if (S->model == NULL) {
        lm_inputs_explain("base", job->base_path, err);
        return err->code;
    }
    if (lm_model_n_files(S->model) > 0 && lm_st_fd(lm_model_file(S->model, 0)) < 0) {
        uint64_t bytes = 0;
        for (size_t i = 0; i < lm_model_n_files(S->model); i++)
            bytes += lm_st_data_bytes(lm_model_file(S->model, i));
        lm_report_note(S->ri, "the base is a PyTorch checkpoint, read into memory (%.2f GB) by the restricted "
                              "reader; the safetensors output can be the base of later merges", (double)bytes * 1e-9);
    }
    preopened *own = NULL; /* several adapters of this merge: opened ahead, together */
    if (S->pre == NULL && job->n_adapters > 1 && (own = calloc(job->n_adapters, sizeof *own)) != NULL) {
        batch_pre B = {job, S->model, &own, 1, 0};
        preopen_run(&B, job->n_adapters, job->n_threads);
        S->pre = own;
    }
    lm_st_snapshot_hash_here(job->n_threads == 1); /* one thread asked for: the copying one hashes too */
    for (size_t i = 0; i < job->n_adapters && rc == LM_OK; i++) {
        if (S->pre != NULL && S->pre[i].done) { /* the same call, made ahead */
            S->ads[i] = S->pre[i].a;
            S->pre[i].a = NULL;
            if (S->ads[i] == NULL)
                *err = S->pre[i].err;
        } else {
            S->ads[i] = lm_adapter_open_with(job->adapters[i].dir, job->adapters[i].weight, S->model, job->formats,
                                             err);
        }
        if (S->ads[i] == NULL) {
            lm_inputs_explain("adapter", job->adapters[i].dir, err);
            rc = err->code;
        }
    }
    lm_st_snapshot_hash_here(0);
    if (own != NULL) { /* those after a failure */
        for (size_t i = 0; i < job->n_adapters; i++)
            lm_adapter_free(own[i].a);
        free(own);
        S->pre = NULL;
    }
    return rc;
}

/* what the adapter loader noticed (formats read, renames) goes into the report */
static void note_adapters(lm_report_impl *ri, lm_adapter *const *ads, size_t n)
{
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < ads[i]->n_notes; k++)
            lm_report_note(ri, "%s", ads[i]->notes[k]);
}

/* 1 when the n floats at x are all +0 or -0 */
static int f32_all_zero(const float *x, uint64_t n)
{
    if (x == NULL)
        return 0;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        if ((u & 0x7fffffffu) != 0)
            return 0;
    }
    return 1;
}

/* 1 when every element of x is exactly one (a scaling that scales nothing) */
static int f32_all_one(const float *x, uint64_t n)
{
    if (x == NULL)
        return 0;
    for (uint64_t i = 0; i < n; i++)
        if (x[i] != 1.0f)
            return 0;
    return 1;
}

/* 1 when op's delta is multiplied by a zero scale (--scale 0, an adapter weighted 0, an alpha of
 * 0): W += 0 * delta.  That is every LOWRANK and ADD op (method.h), and the METHOD ops of the types
 * that take a weight (C3A, FourierFT, HiRA, LoHa, LoKr, MiSS, SHiRA, SuperTuning, WaveFT scale their
 * delta by op->scale); a unit-weight type's METHOD op (IA3, OFT, BOFT, HRA, GLoRA, RoAd) is not a
 * delta and leaves op->scale at 1 or unused.  A DoRA norm (NORM) still rescales W at scale 0: PEFT's
 * m / ||W|| W; LyCORIS's factor is 1 there, but its delta is not weighted. */
static int op_scale_is_zero(const lm_op *op)
{
    if (op->scale != 0.0)
        return 0;
    return op->kind == LM_OP_LOWRANK || op->kind == LM_OP_ADD ||
           (op->kind == LM_OP_METHOD && op->method != NULL && !(op->method->flags & LM_M_UNIT_WEIGHT));
}

/* 1 when op provably changes nothing: a zero scale (op_scale_is_zero), a low-rank delta with a
 * zero factor (lora_B is zero until trained), a zero delta added, a scaling by ones.  Low-rank
 * factors come from the method's own prepare(), so this holds for every type whose delta is
 * low-rank (LoRA, AdaLoRA, VeRA ...); the check stops at the first non-zero element, so a trained
 * adapter costs one prepare per op.  Ops whose effect cannot be read off their factors
 * (replacements, DoRA norms, rotations and other method ops) count as changing.  @return 1, 0, or
 * -1 when out of memory */
static int op_is_noop(const lm_op *op, const lm_kernels *k)
{
    if (op_scale_is_zero(op))
        return 1;
    if (op->kind != LM_OP_LOWRANK && op->kind != LM_OP_ADD && op->kind != LM_OP_SCALE)
        return 0;
    lm_prepared p;
    memset(&p, 0, sizeof p);
    lm_err e;
    lm_err_clear(&e);
    int noop = 0;
    if (op->kind == LM_OP_LOWRANK) {
        if (op->method == NULL || op->method->prepare == NULL || (op->method->flags & LM_M_READS_BASE))
            return 0; /* factors derived from the base: only a run reads it */
        if (op->method->prepare(op, k, &p, &e) != LM_OK)
            noop = -1;
        else
            noop = f32_all_zero(p.a, op->rank * op->in) || f32_all_zero(p.b, op->out * op->rank);
    } else if (op->src != NULL) {
        const float *x = lm_prep_view(&p, op->src, k, &e);
        if (x == NULL)
            noop = -1;
        else
            noop = op->kind == LM_OP_ADD ? f32_all_zero(x, op->src->n_elems) : f32_all_one(x, op->src->n_elems);
    }
    if (p.destroy != NULL)
        p.destroy(&p);
    for (size_t i = 0; i < p.n_owned; i++)
        free(p.owned[i]);
    return noop;
}

/* A merge must change something: an adapter that lands nowhere, or whose deltas are all zero,
 * is an error (a warning with allow_noop). */
static lm_code check_noop(merge_state *S, lm_err *err)
{
    const lm_plan *p = S->plan;
    size_t n_ads = S->job->n_adapters;
    size_t *n_ops = calloc(n_ads, sizeof *n_ops), *n_live = calloc(n_ads, sizeof *n_live);
    size_t *n_zero = calloc(n_ads, sizeof *n_zero); /* ops multiplied by 0 */
    if (n_ops == NULL || n_live == NULL || n_zero == NULL) {
        free(n_ops);
        free(n_live);
        free(n_zero);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        for (size_t q = 0; q < t->n_ops; q++) {
            const lm_op *op = &t->ops[q];
            if (op->adapter >= n_ads)
                continue;
            n_ops[op->adapter]++;
            if (n_live[op->adapter] > 0)
                continue; /* one live op is enough */
            int noop = op_is_noop(op, &S->kern);
            if (noop < 0) {
                free(n_ops);
                free(n_live);
                free(n_zero);
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            }
            n_live[op->adapter] += !noop;
            n_zero[op->adapter] += op_scale_is_zero(op);
        }
    }
    lm_code rc = LM_OK;
    for (size_t a = 0; a < n_ads && rc == LM_OK; a++) {
        const char *dir = S->ads[a]->dir;
        char msg[600];
        if (n_ops[a] == 0)
            snprintf(msg, sizeof msg, "the adapter changes no tensor of the base: none of its %zu tensors lands on "
                                      "a module the base has and the config targets (see the notes)",
                     S->ads[a]->ts->n);
        else if (n_live[a] == 0 && n_zero[a] == n_ops[a])
            snprintf(msg, sizeof msg, "every delta of the adapter is multiplied by 0 (%zu operations; a weight of 0 "
                                      "from --scale or --adapter-scaled, or an alpha of 0): the merged model would be "
                                      "the base", n_ops[a]);
        else if (n_live[a] == 0)
            snprintf(msg, sizeof msg, "every delta of the adapter is zero (%zu operations; lora_B is zero until "
                                      "trained): the merged model would be the base", n_ops[a]);
        else
            continue;
        if (S->job->allow_noop) {
            lm_report_warn(S->ri, "NoOpAllowed", "%s: %s", dir, msg);
        } else {
            rc = lm_fail(err, LM_E_MISMATCH, "NoOp", "%s (--allow-noop accepts it)", msg);
            lm_err_set_path(err, S->ads[a]->weights_path);
        }
    }
    free(n_ops);
    free(n_live);
    free(n_zero);
    return rc;
}

static int name_ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0 && (n == k || s[n - k - 1] == '.' || suffix[0] == '.');
}

/* the names transformers gives input embeddings and output heads (the last components) */
static const char *const EMBED_NAMES[] = {"embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                                          "shared.weight"};
static const char *const HEAD_NAMES[] = {"lm_head.weight", "embed_out.weight"};
#define N_EMBED_NAMES (sizeof EMBED_NAMES / sizeof *EMBED_NAMES)
#define N_HEAD_NAMES (sizeof HEAD_NAMES / sizeof *HEAD_NAMES)

/* the output's tensor whose name ends with one of names (as a whole component), or NULL */
static const lm_plan_tensor *find_output(const lm_plan *p, const char *const *names, size_t n_names)
{
    const lm_plan_tensor *found = NULL;
    for (size_t i = 0; i < p->n; i++)
        for (size_t k = 0; k < n_names; k++)
            if (name_ends_with(p->t[i].name, names[k])) {
                if (found != NULL)
                    return NULL; /* ambiguous: leave the config alone */
                found = &p->t[i];
            }
    return found;
}

/* --simulate-nf4: the weights QLoRA quantized (bitsandbytes replaces every nn.Linear but the output
 * head; embeddings and 1-D tensors stay float) and the adapter changes go through NF4 as they
 * are loaded.  Refused on a quantized base, and when no weight qualifies. */
static lm_code mark_simulate_nf4(merge_state *S, lm_err *err)
{
    if (!S->job->simulate_nf4)
        return LM_OK;
    size_t n_sim = 0, n_kept = 0;
    for (size_t i = 0; i < S->plan->n; i++) {
        lm_plan_tensor *t = &S->plan->t[i];
        if (t->base == NULL || t->n_ops == 0 || t->ops[0].kind == LM_OP_REPLACE)
            continue;
        int linear = t->n_dims == 2 && t->q == NULL && name_ends_with(t->name, ".weight") &&
                     (t->src_dtype == LM_DT_BF16 || t->src_dtype == LM_DT_F16 || t->src_dtype == LM_DT_F32);
        for (size_t k = 0; linear && k < N_EMBED_NAMES; k++)
            linear = !name_ends_with(t->name, EMBED_NAMES[k]);
        for (size_t k = 0; linear && k < N_HEAD_NAMES; k++)
            linear = !name_ends_with(t->name, HEAD_NAMES[k]);
        t->sim_nf4 = linear ? S->job->simulate_nf4 : 0; /* 2: with double quantization */
        n_sim += linear;
        n_kept += !linear;
    }
    if (n_sim == 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "--simulate-nf4: the merge changes no 2-D linear weight of a "
                       "16-bit base (embeddings, the output head and 1-D tensors are not quantized by QLoRA)");
    lm_report_note(S->ri, "--simulate-nf4: %zu weights merged into their bitsandbytes NF4 round trip (blocks of 64, "
                   "%s)%s", n_sim, S->job->simulate_nf4 == 2 ? "absmax double-quantized" : "no double quantization",
                   n_kept ? "; embeddings, output head and 1-D tensors merged into their stored values" : "");
    return LM_OK;
}

/* A vocabulary resized by a saved embedding or head must stay one vocabulary: the input
 * embedding and a separate output head with the same number of rows, and nothing else applied to
 * a resized tensor (its other ops were planned for the base's shape). */
static lm_code check_vocabulary(merge_state *S, lm_err *err)
{
    const lm_plan *p = S->plan;
    int resized = 0;
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        if (t->base == NULL || t->n_dims != 2 || t->base->info->shape[0] == t->shape[0] ||
            (t->q != NULL && t->shape == t->q->view.shape)) /* a packed weight's stored shape is not its own */
            continue;
        resized = 1;
        if (t->n_ops != 1) {
            lm_fail(err, LM_E_MISMATCH, "ResizedVocabulary", "resized from %llu to %llu rows by a saved tensor, and "
                    "changed by another adapter operation planned for the old size", (unsigned long long)t->base->info->shape[0],
                    (unsigned long long)t->shape[0]);
            lm_err_set_tensor(err, t->name);
            return LM_E_MISMATCH;
        }
    }
    if (!resized)
        return LM_OK;
    const lm_plan_tensor *emb = find_output(p, EMBED_NAMES, N_EMBED_NAMES), *head = find_output(p, HEAD_NAMES, N_HEAD_NAMES);
    if (emb != NULL && head != NULL && emb->n_dims == 2 && head->n_dims == 2 && emb->shape[0] != head->shape[0]) {
        const lm_plan_tensor *old = emb->base && emb->base->info->shape[0] == emb->shape[0] ? emb : head;
        lm_fail(err, LM_E_MISMATCH, "ResizedVocabulary", "the adapter resizes the vocabulary to %llu rows (%s) but "
                "'%s' keeps %llu: save both the embedding and the head (modules_to_save)",
                (unsigned long long)(old == emb ? head : emb)->shape[0], (old == emb ? head : emb)->name, old->name,
                (unsigned long long)old->shape[0]);
        lm_err_set_tensor(err, old->name);
        return LM_E_MISMATCH;
    }
    return LM_OK;
}

static const char *torch_dtype_name(const char *dt)
{
    if (dt == NULL)
        return NULL;
    if (strcmp(dt, "BF16") == 0)
        return "bfloat16";
    if (strcmp(dt, "F16") == 0)
        return "float16";
    if (strcmp(dt, "F32") == 0)
        return "float32";
    if (strcmp(dt, "F64") == 0)
        return "float64";
    return NULL;
}

/* the one floating dtype of the output's tensors, "mixed", or NULL when none is floating */
static const char *output_dtype(const lm_plan *p)
{
    int seen = -1;
    for (size_t i = 0; i < p->n; i++) {
        lm_dtype d = p->t[i].dtype;
        if (d != LM_DT_F16 && d != LM_DT_BF16 && d != LM_DT_F32 && d != LM_DT_F64)
            continue;
        if (seen >= 0 && seen != (int)d)
            return "mixed";
        seen = (int)d;
    }
    return seen < 0 ? NULL : lm_dtype_name((lm_dtype)seen);
}

/* the output still holds quantized weights (packed integers, scales ...), so config.json's
 * quantization_config still describes them */
static int output_quantized(const lm_plan *p)
{
    static const char *const quant[] = {".qweight", ".qzeros", ".g_idx", ".absmax", ".quant_map", ".SCB",
                                        ".weight_scale", ".weight_scale_inv", ".weight_packed", ".weight_zero_point",
                                        ".input_scale", ".weight_format", ".nested_absmax"};
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        for (size_t k = 0; k < sizeof quant / sizeof *quant; k++)
            if (name_ends_with(t->name, quant[k]) || strstr(t->name, ".quant_state.") != NULL)
                return 1;
        /* parameters (no ".weight"): gpt-oss MXFP4 "P_blocks"/"P_scales", FP8 experts "P_scale_inv" */
        static const char *const param_quant[] = {"_blocks", "_scales", "_scale_inv"};
        for (size_t k = 0; k < sizeof param_quant / sizeof *param_quant; k++) {
            size_t n = strlen(t->name), m = strlen(param_quant[k]);
            if (n > m && strcmp(t->name + n - m, param_quant[k]) == 0 && (k > 0 || t->dtype == LM_DT_U8))
                return 1;
        }
        lm_dtype d = t->dtype;
        if (name_ends_with(t->name, ".weight") && d != LM_DT_F16 && d != LM_DT_BF16 && d != LM_DT_F32 &&
            d != LM_DT_F64 && d != LM_DT_BOOL)
            return 1;
    }
    return 0;
}

/* what config.json must say about the weights written */
static void config_edits(merge_state *S, lm_config_edits *e)
{
    const lm_plan *p = S->plan;
    e->torch_dtype = S->out_dtype ? torch_dtype_name(S->out_dtype) : NULL;
    e->tie_word_embeddings = -1;
    e->vocab_size = -1;
    e->drop_quantization = S->bi.has_quantization && !output_quantized(p);
    const lm_plan_tensor *emb = find_output(p, EMBED_NAMES, N_EMBED_NAMES), *head = find_output(p, HEAD_NAMES, N_HEAD_NAMES);
    /* a tied base whose output has a head of its own (trained, from modules_to_save): a loader
     * that honours the flag would tie it back to the embedding and drop the trained head */
    if (S->bi.tie_word_embeddings == 1 && head != NULL && (head->base == NULL || head->n_ops > 0)) {
        e->tie_word_embeddings = 0;
        lm_report_note(S->ri, "tie_word_embeddings set to false: the output has its own %s (%s), which a loader "
                              "would otherwise replace by the input embedding", head->name,
                       head->base == NULL ? "added by the adapter" : "changed by the merge");
    }
    else if (S->bi.tie_word_embeddings == 1 && head == NULL && emb != NULL && emb->n_ops > 0)
        lm_report_note(S->ri, "the output head is tied to %s (tie_word_embeddings true): it changes with the embedding, "
                              "as in PEFT's merge", emb->name);
    if (emb != NULL && emb->n_dims == 2 && S->bi.vocab_size >= 0 && (int64_t)emb->shape[0] != S->bi.vocab_size)
        e->vocab_size = (int64_t)emb->shape[0];
}

/* the output's __metadata__: the base's (format: pt kept, or added, as transformers requires it
 * once there is metadata), then the tool version, the adapters (name, sha256, weight) and the
 * output dtype */
static lm_code provenance(merge_state *S, lm_err *err)
{
    lm_plan *p = S->plan;
    cJSON *arr = cJSON_CreateArray();
    for (size_t i = 0; i < S->job->n_adapters && arr; i++) {
        char leaf[256];
        size_t n;
        const char *l = lm_path_leaf(S->job->adapters[i].dir, &n);
        snprintf(leaf, sizeof leaf, "%.*s", (int)n, l);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", leaf);
        cJSON_AddStringToObject(o, "adapter_name", S->ads[i]->name);
        cJSON_AddStringToObject(o, "peft_type", S->ads[i]->cfg->peft_type);
        cJSON_AddStringToObject(o, "sha256", S->ad_sha256[i]);
        cJSON_AddNumberToObject(o, "weight", S->ads[i]->weight);
        cJSON_AddItemToArray(arr, o);
    }
    S->meta_text[0] = arr ? cJSON_PrintUnformatted(arr) : NULL;
    cJSON_Delete(arr);
    S->meta_text[1] = strdup(LM_VERSION_STRING);
    S->meta_text[2] = strdup(S->out_dtype ? S->out_dtype : "none");
    const char **keys = calloc(p->n_meta + 4, sizeof *keys), **vals = calloc(p->n_meta + 4, sizeof *vals);
    if (S->meta_text[0] == NULL || S->meta_text[1] == NULL || S->meta_text[2] == NULL || keys == NULL || vals == NULL) {
        free(keys);
        free(vals);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    size_t n = 0;
    int has_format = 0;
    for (size_t i = 0; i < p->n_meta; i++) {
        if (strncmp(p->meta_keys[i], "lora_merge.", 11) == 0) /* a merged model merged again: ours replace them */
            continue;
        has_format |= strcmp(p->meta_keys[i], "format") == 0;
        keys[n] = p->meta_keys[i];
        vals[n++] = p->meta_values[i];
    }
    if (!has_format) {
        memmove(keys + 1, keys, n * sizeof *keys);
        memmove(vals + 1, vals, n * sizeof *vals);
        keys[0] = "format";
        vals[0] = "pt";
        n++;
    }
    static const char *const ours[3] = {"lora_merge.adapters", "lora_merge.version", "lora_merge.dtype"};
    for (int k = 0; k < 3; k++) {
        keys[n] = ours[k];
        vals[n++] = S->meta_text[k];
    }
    free(p->meta_keys);
    free(p->meta_values);
    p->meta_keys = keys;
    p->meta_values = vals;
    p->n_meta = n;
    return LM_OK;
}

/* each adapter's sha256: of the snapshot its weights were read from, hashed while it was copied
 * (lm_st_open_snapshot_hashed), else of its weights file */
static lm_code hash_adapters(merge_state *S, lm_err *err)
{
    for (size_t i = 0; i < S->job->n_adapters; i++) {
        lm_st_file *st = S->ads[i]->ts != NULL ? S->ads[i]->ts->st : NULL;
        if (st != NULL && strcmp(lm_st_path(st), S->ads[i]->weights_path) == 0 &&
            lm_st_snapshot_sha256(st, S->ad_sha256[i]) == 0)
            continue;
        lm_code rc = lm_file_sha256(S->ads[i]->weights_path, S->ad_sha256[i], err);
        if (rc != LM_OK)
            return rc;
    }
    return LM_OK;
}

static char *leaf_dup(const char *path)
{
    size_t n;
    const char *l = lm_path_leaf(path, &n);
    return strndup(l, n);
}

/* README.md of a directory OUT */
static char *model_card(merge_state *S)
{
    size_t n = S->job->n_adapters;
    lm_card_adapter *ca = calloc(n, sizeof *ca);
    char **names = calloc(n, sizeof *names), **declared = calloc(n, sizeof *declared);
    char *title = leaf_dup(S->ot.dir), *bdir_leaf = S->base_dir ? leaf_dup(S->base_dir) : NULL, *card = NULL;
    if (ca == NULL || names == NULL || declared == NULL || title == NULL)
        goto done;
    for (size_t i = 0; i < n; i++) {
        names[i] = leaf_dup(S->job->adapters[i].dir);
        declared[i] = S->ads[i]->foreign ? NULL : lm_adapter_declared_base(S->ads[i]->config_path);
        ca[i] = (lm_card_adapter){names[i], S->ads[i]->cfg->peft_type, S->ads[i]->weight, S->ad_sha256[i], declared[i]};
    }
    const char *bn = S->bi.name_or_path;
    int hub = bn != NULL && bn[0] != '/' && bn[0] != '.' && strchr(bn, '/') != NULL && strchr(strchr(bn, '/') + 1, '/') == NULL;
    lm_card_info ci = {title, hub ? bn : bdir_leaf, hub, S->bi.license, ca, n, S->out_dtype, S->plan->n,
                       S->plan->n_changed};
    card = lm_model_card(&ci);
done:
    for (size_t i = 0; names && i < n; i++) {
        free(names[i]);
        free(declared[i]);
    }
    free(names);
    free(declared);
    free(ca);
    free(title);
    free(bdir_leaf);
    return card;
}

static const char *name_in(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* everything about OUT decided and checked before anything is written: the weight files and
 * their sizes, the side files (read now), the stale files of an earlier merge */
static lm_code prepare_output(merge_state *S, lm_err *err)
{
    const lm_merge_job *job = S->job;
    lm_code rc = job->shard_mode ? lm_shards_layout(&S->ot, job, S->plan, S->model, err)
                                 : lm_out_plan_shards(&S->ot, job, S->plan, err);
    if (rc != LM_OK)
        return rc;
    for (size_t i = 0; i < S->ot.n_shards; i++)
        if ((rc = check_not_input(S->ot.paths[i], S->model, S->ads, job->n_adapters, err)) != LM_OK) {
            lm_err_set_path(err, S->ot.paths[i]);
            return rc;
        }
    if (S->ot.is_dir && S->base_dir != NULL && lm_same_file(S->ot.dir, S->base_dir)) {
        rc = lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output directory is the base model's directory");
        lm_err_set_path(err, S->ot.dir);
        return rc;
    }
    if (S->ot.is_dir) {
        struct stat bst;
        int base_is_dir = stat(job->base_path, &bst) == 0 && S_ISDIR(bst.st_mode);
        for (size_t i = 0; i < job->n_adapters; i++)
            if (S->ads[i]->foreign == NULL && /* a PEFT directory, not a file of another format */
                (rc = lm_out_check_not_in(&S->ot, (const char *const *)&S->ads[i]->dir, 1, err)) != LM_OK)
                return rc;
        if (base_is_dir && (rc = lm_out_check_not_in(&S->ot, (const char *const *)&S->base_dir, 1, err)) != LM_OK)
            return rc;
    }
    if (S->ot.is_dir) {
        lm_config_edits edits;
        config_edits(S, &edits);
        char *card = model_card(S);
        const char **adirs = calloc(job->n_adapters, sizeof *adirs);
        const char *reserved[2] = {"model.safetensors", LM_INDEX_NAME};
        if (card == NULL || adirs == NULL) {
            free(card);
            free(adirs);
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
        for (size_t i = 0; i < job->n_adapters; i++)
            adirs[i] = S->ads[i]->dir;
        lm_side_inputs in = {S->base_dir, adirs, job->n_adapters, job->copy_files, job->n_copy_files, &edits, card,
                             reserved, 2};
        rc = lm_side_plan_build(&S->side, &in, S->ri, err);
        free(card);
        free(adirs);
        if (rc != LM_OK)
            return rc;
        if (S->bi.has_auto_map) {
            int code = 0;
            for (size_t i = 0; i < S->side.n; i++)
                code |= strlen(S->side.f[i].name) > 3 && strcmp(S->side.f[i].name + strlen(S->side.f[i].name) - 3, ".py") == 0;
            if (!code)
                lm_report_warn(S->ri, "RemoteCodeNotCopied",
                               "the base's config.json names custom code (auto_map) and no .py file is copied: give "
                               "each with --copy-file NAME to load the output with trust_remote_code");
        }
        if ((rc = lm_out_scan_existing(&S->ot, &S->side, err)) != LM_OK)
            return rc;
        for (size_t i = 0; job->dry_run && i < S->ot.n_stale; i++) /* what a real run would remove */
            lm_report_removed(S->ri, S->ot.stale[i]);
        if (S->ot.mirrored)
            lm_report_note(S->ri, "output in %zu shards, each holding the tensors of the base's shard of the same name",
                           S->ot.n_shards);
        else if (S->ot.n_shards > 1)
            lm_report_note(S->ri, "output in %zu shards of at most %llu bytes, with " LM_INDEX_NAME, S->ot.n_shards,
                           (unsigned long long)(job->max_shard_bytes ? job->max_shard_bytes : LM_DEFAULT_SHARD_BYTES));
        if (S->ot.n_dropped > 0)
            lm_report_note(S->ri, "%zu planned shard%s held only the scales of weights kept quantized, written with "
                           "their weights: no file for %s", S->ot.n_dropped, S->ot.n_dropped == 1 ? "" : "s",
                           S->ot.n_dropped == 1 ? "it" : "them");
    }
    /* the files, in the order they are written */
    int worker = job->shard_mode == LM_SHARDS_WORKER; /* a worker writes its shards only */
    unsigned *owner = worker ? malloc((S->ot.n_shards ? S->ot.n_shards : 1) * sizeof *owner) : NULL;
    if (worker && (owner == NULL || lm_shards_owners(S->ot.shard_bytes, S->ot.n_shards, job->shard_count, owner) != 0)) {
        free(owner);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    for (size_t i = 0; i < S->ot.n_shards; i++)
        if (!worker || owner[i] == job->shard_index)
            lm_report_file(S->ri, name_in(S->ot.paths[i]), S->ot.paths[i], "weights", "merge", S->ot.shard_bytes[i],
                           NULL);
    free(owner);
    if (worker)
        return S->ri->oom ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory") : LM_OK;
    if (S->ot.index_text != NULL) {
        char *p = lm_path_join(S->ot.dir, LM_INDEX_NAME);
        if (p != NULL)
            lm_report_file(S->ri, LM_INDEX_NAME, p, "index", "generated", strlen(S->ot.index_text), NULL);
        free(p);
    }
    for (size_t i = 0; i < S->side.n; i++) {
        char *p = lm_path_join(S->ot.dir, S->side.f[i].name);
        if (p != NULL)
            lm_report_file(S->ri, S->side.f[i].name, p, S->side.f[i].kind, S->side.f[i].origin, S->side.f[i].n_bytes,
                           NULL);
        free(p);
    }
    return S->ri->oom ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory") : LM_OK;
}

/* under strict, a warning stops the merge before anything is written */
static lm_code check_strict(merge_state *S, lm_err *err)
{
    if (!S->job->strict || S->ri->n_warnings == 0)
        return LM_OK;
    const lm_merge_warning *w = &S->ri->warnings[0];
    return lm_fail(err, LM_E_WARNING, w->code, "%s (a warning, an error under --strict%s)", w->message,
                   S->ri->n_warnings > 1 ? "; more warnings follow" : "");
}

#define LM_FEW_CHANGED_FRACTION 0.01 /* below 1% of the adapted tensors' elements: a warning */

/* tensors written back quantized: a note sums up what requantization kept of the deltas (the
 * worst tensor: the largest |Q-x|/|x-W|), and a warning names those whose requantization error is
 * as large as the adapter's delta: most of the delta is below the format's grid step (a near
 * no-op on them) */
static void report_requantized(merge_state *S)
{
    size_t n = 0, n_lost = 0;
    const lm_tensor_stats *wst = NULL;
    const char *first = NULL;
    double worst = 0, err_max = 0, d2 = 0, e2 = 0;
    uint64_t changed = 0, elems = 0;
    for (size_t i = 0; i < S->plan->n; i++) {
        const lm_tensor_stats *st = &S->tstats[i];
        if (!st->valid || !st->has_quant || st->q_delta_norm <= 0)
            continue;
        n++;
        changed += st->n_changed;
        elems += st->n_elems;
        err_max = st->q_err_max > err_max ? st->q_err_max : err_max;
        d2 += st->q_delta_norm * st->q_delta_norm;
        e2 += st->q_err_norm * st->q_err_norm;
        double r = st->q_err_norm / st->q_delta_norm;
        if (first == NULL || r > worst) {
            first = S->plan->t[i].name;
            worst = r;
            wst = st;
        }
        n_lost += r >= 0.5;
    }
    if (n == 0)
        return;
    lm_report_note(S->ri, "requantized %zu tensor%s: %llu of %llu elements changed (code x scale); error up to "
                   "%.3g of the block amax, %.3g of the delta (|Q-x|/|x-W|); worst %s: %.3g of the delta, max %.3g "
                   "mean %.3g of the block amax, %llu of %llu blocks kept", n, n == 1 ? "" : "s",
                   (unsigned long long)changed, (unsigned long long)elems, err_max, sqrt(e2 / d2), first, worst,
                   wst->q_err_max, wst->q_err_mean, (unsigned long long)wst->q_blocks_kept,
                   (unsigned long long)wst->q_blocks);
    if (n_lost > 0)
        lm_report_warn(S->ri, "QuantizedDeltaLost", "requantizing %zu of the %zu changed quantized tensors loses as "
                       "much as half of the adapter's delta (requantization error / delta norm up to %.3g, on %s): "
                       "the delta is mostly below the format's grid step; --dtype bf16 keeps it", n_lost, n, worst,
                       first);
}

/* Once every file is complete and before any is renamed into place: what the merge really
 * changed, after rounding.  Nothing at all is an error (NoOp), as is any warning under strict. */
/* Every input read through a file (the base's safetensors files, each adapter's original) must
 * still be what was read: a base truncated or overwritten in place would have mixed old and new
 * bytes into the output, an adapter changed after its snapshot (adapters are copied once when
 * opened) is reported too, so that no output claims to be the merge of files that are not
 * there any more (issue 15). */
static lm_code check_inputs_unchanged(const merge_state *S, lm_err *err)
{
    for (size_t i = 0; i < lm_model_n_files(S->model); i++)
        if (lm_st_input_changed(lm_model_file(S->model, i))) {
            lm_fail(err, LM_E_IO, "InputChanged", "the base file changed (truncated, overwritten or replaced) while "
                    "the merge read it; nothing was written");
            lm_err_set_path(err, lm_st_path(lm_model_file(S->model, i)));
            return LM_E_IO;
        }
    for (size_t i = 0; S->ads != NULL && i < S->job->n_adapters; i++) {
        const lm_st_file *f = S->ads[i] && S->ads[i]->ts ? S->ads[i]->ts->st : NULL;
        if (lm_st_input_changed(f)) {
            lm_fail(err, LM_E_IO, "InputChanged", "the adapter file changed (truncated, overwritten or replaced) "
                    "during the merge, which used it as it was when opened; nothing was written");
            lm_err_set_path(err, lm_st_path(f));
            return LM_E_IO;
        }
    }
    return LM_OK;
}

/* Test seam (tests/test_budget.c): with LM_TEST_PAUSE_BEFORE_COMMIT set, one line on stderr and
 * one byte read from stdin before the output is committed, so that a test can change an input
 * at that exact point. */
static void test_pause(void)
{
    if (getenv("LM_TEST_PAUSE_BEFORE_COMMIT") == NULL)
        return;
    fputs("lora-merge: paused before commit\n", stderr);
    fflush(stderr);
    char c;
    while (read(0, &c, 1) < 0 && errno == EINTR)
        ;
}

static lm_code check_changes(void *ctx, lm_err *err)
{
    merge_state *S = ctx;
    test_pause();
    if (check_inputs_unchanged(S, err) != LM_OK)
        return err->code;
    uint64_t changed = 0, elems = 0;
    size_t n_adapted = 0;
    for (size_t i = 0; i < S->plan->n; i++)
        if (S->plan->t[i].n_ops > 0 && S->tstats[i].valid) {
            changed += S->tstats[i].n_changed;
            elems += S->tstats[i].n_elems;
            n_adapted++;
        }
    if (n_adapted == 0)
        return LM_OK;
    report_requantized(S);
    const char *dt = S->out_dtype ? S->out_dtype : "the output dtype";
    if (changed == 0) {
        char msg[300];
        snprintf(msg, sizeof msg, "the merge changes no element of the %zu tensor%s it adapts once rounded to %s: "
                 "every delta is below the output's precision", n_adapted, n_adapted == 1 ? "" : "s", dt);
        if (!S->job->allow_noop)
            return lm_fail(err, LM_E_MISMATCH, "NoOp", "%s (--allow-noop accepts it)", msg);
        lm_report_warn(S->ri, "NoOpAllowed", "%s", msg);
    } else if ((double)changed < LM_FEW_CHANGED_FRACTION * (double)elems) {
        lm_report_warn(S->ri, "FewElementsChanged", "the merge changes only %.3g%% of the elements of the %zu tensor%s "
                       "it adapts (%llu of %llu): most deltas vanish when rounded to %s",
                       100.0 * (double)changed / (double)elems, n_adapted, n_adapted == 1 ? "" : "s",
                       (unsigned long long)changed, (unsigned long long)elems, dt);
    }
    return check_strict(S, err);
}

/* every file complete and the merge judged: a directory OUT's stage is made now, so that nothing
 * but unnamed files exists in OUT until here (output.h) */
static lm_code check_then_stage(void *ctx, lm_err *err)
{
    merge_state *S = ctx;
    if (check_changes(S, err) != LM_OK)
        return err->code;
    return lm_out_stage_begin(&S->ot, err);
}

/* --json: the sha256 of report files (read back), a file a thread on up to n_threads threads (0:
 * every core): K outputs of a batch, or the shards of one merge, are not read back one after
 * another on one core.  Every file is hashed; the first failure in the files' order is returned
 * (*bad its index), as when they were hashed in turn. */
typedef struct {
    lm_merge_file **f;
    lm_code *rc;
    lm_err *err;
    size_t n, next;
} hash_pool;

static void *hash_main(void *arg)
{
    hash_pool *H = arg;
    for (;;) {
        size_t i = __atomic_fetch_add(&H->next, 1, __ATOMIC_RELAXED);
        if (i >= H->n)
            break;
        char hex[65];
        lm_err_clear(&H->err[i]);
        H->rc[i] = LM_OK;
        if (H->f[i]->sha256 != NULL) /* hashed as it was written (out_sha_take) */
            continue;
        H->rc[i] = lm_file_sha256(H->f[i]->path, hex, &H->err[i]);
        if (H->rc[i] == LM_OK && (H->f[i]->sha256 = strdup(hex)) == NULL)
            H->rc[i] = lm_fail(&H->err[i], LM_E_NOMEM, NULL, "out of memory");
    }
    return NULL;
}

static lm_code hash_files(lm_merge_file **f, size_t n, int n_threads, size_t *bad, lm_err *err)
{
    hash_pool H = {f, calloc(n + 1, sizeof *H.rc), calloc(n + 1, sizeof *H.err), n, 0};
    if (H.rc == NULL || H.err == NULL) {
        free(H.rc);
        free(H.err);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    pool_run(hash_main, &H, pool_threads(n_threads, n));
    lm_code rc = LM_OK;
    for (size_t i = 0; i < n && rc == LM_OK; i++)
        if ((rc = H.rc[i]) != LM_OK) {
            *err = H.err[i];
            *bad = i;
        }
    free(H.rc);
    free(H.err);
    return rc;
}

static void exec_opts(merge_state *S, char **paths, lm_exec_opts *eo_out)
{
    const lm_merge_job *job = S->job;
    lm_exec_opts eo;
    memset(&eo, 0, sizeof eo);
    eo.n_threads = job->n_threads;
    eo.do_fsync = job->do_fsync;
    eo.kernels = &S->kern;
    eo.progress = job->progress;
    eo.progress_ctx = job->progress_ctx;
    eo.tile_elems = job->tile_elems;
    eo.exactness_off = job->exactness_off;
    eo.recomputed = S->ri->recomputed;
    eo.n_shards = S->ot.n_shards;
    eo.shard_paths = (const char *const *)paths;
    eo.shard_of = S->ot.shard_of;
    eo.stats = S->tstats;
    eo.stats_norms = job->tensor_norms;
    eo.before_commit = check_then_stage;
    eo.before_commit_ctx = S;
    eo.commit_paths = (const char *const *)S->ot.write_paths; /* filled by check_then_stage */
    eo.file_sha256 = S->out_sha;
    *eo_out = eo;
}

/* --json: the weights files hashed by the executor as they are written (exec.h: file_sha256), not
 * read back after the commit (with drop-behind their pages are gone: a read from the disk) */
static lm_code out_sha_alloc(merge_state *S, lm_err *err)
{
    if (!S->job->hash_outputs || S->job->shard_mode != LM_SHARDS_NONE)
        return LM_OK;
    if ((S->out_sha = calloc(S->ot.n_shards + 1, sizeof *S->out_sha)) == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return LM_OK;
}

/* the report's weights files given the sha256 the executor computed (the others: hash_files) */
static lm_code out_sha_take(merge_state *S, lm_err *err)
{
    for (size_t i = 0; S->out_sha != NULL && i < S->ri->n_files; i++) {
        lm_merge_file *f = &S->ri->files[i];
        for (size_t k = 0; k < S->ot.n_shards && f->sha256 == NULL; k++)
            if (strcmp(f->path, S->ot.paths[k]) == 0 && S->out_sha[k][0] != '\0' &&
                (f->sha256 = strdup(S->out_sha[k])) == NULL)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    return LM_OK;
}

/* shard jobs (shards.h): a worker writes its shards, finalize the rest, straight into OUT (the
 * workers share it: no staging directory, no stale-temp cleanup but shards.c's own, under each
 * shard's lock) */
static lm_code run_shards(merge_state *S, lm_err *err)
{
    lm_exec_opts eo;
    exec_opts(S, S->ot.paths, &eo);
    eo.file_sha256 = NULL; /* a worker's sidecar hash is its own (sha256_hex), finalize writes no weights */
    eo.before_commit = check_changes; /* no stage */
    eo.commit_paths = NULL;
    int fin = S->job->shard_mode == LM_SHARDS_INDEX;
    char(*sha)[65] = fin && S->job->hash_outputs ? calloc(S->ot.n_shards + 1, sizeof *sha) : NULL;
    if (fin && S->job->hash_outputs && sha == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    lm_shard_ctx C = {S->job, S->plan, S->model, S->ads, &S->ot, &S->side, S->ri, &eo, &S->st, sha, S->ad_sha256};
    lm_code rc = fin ? lm_shards_finalize(&C, err) : lm_shards_work(&C, err);
    phase_end(S, LM_PHASE_WRITE);
    /* finalize --json: the sha256 of every file, the shards' from their verification (not read again) */
    for (size_t i = 0; sha != NULL && rc == LM_OK && i < S->ri->n_files; i++) {
        lm_merge_file *f = &S->ri->files[i];
        char hex[65] = "";
        for (size_t k = 0; k < S->ot.n_shards && hex[0] == '\0'; k++)
            if (strcmp(f->path, S->ot.paths[k]) == 0)
                memcpy(hex, sha[k], sizeof hex);
        if (hex[0] == '\0')
            rc = lm_file_sha256(f->path, hex, err);
        if (rc == LM_OK && (f->sha256 = strdup(hex)) == NULL)
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    if (sha != NULL)
        phase_end(S, LM_PHASE_HASH);
    free(sha);
    return rc;
}

static lm_code write_output(merge_state *S, lm_err *err)
{
    const lm_merge_job *job = S->job;
    lm_code rc;
    if ((rc = lm_out_make_dir(&S->ot, err)) != LM_OK)
        return rc;
    lm_out_clean_stale_temps(&S->ot, S->ri);
    if ((rc = lm_out_stage_paths(&S->ot, err)) != LM_OK)
        return rc;
    char **paths = S->ot.paths;
    lm_exec_opts eo;
    if ((rc = out_sha_alloc(S, err)) != LM_OK)
        return rc;
    exec_opts(S, paths, &eo);
    if ((rc = lm_exec_run(S->plan, S->model, S->ads, paths[0], &eo, &S->st, err)) != LM_OK)
        return rc;
    if (job->progress) /* the last call says "all of it" */
        job->progress(job->progress_ctx, S->st.bytes_written, S->st.bytes_written);
    phase_end(S, LM_PHASE_WRITE);
    if (S->ot.is_dir && (rc = lm_out_commit(&S->ot, &S->side, job->do_fsync, S->ri, err)) != LM_OK)
        return rc;
    S->committed = 1;
    phase_end(S, LM_PHASE_FINISH);
    if (job->hash_outputs) {
        if ((rc = out_sha_take(S, err)) != LM_OK)
            return rc;
        lm_merge_file **f = malloc((S->ri->n_files + 1) * sizeof *f);
        if (f == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        for (size_t i = 0; i < S->ri->n_files; i++)
            f[i] = &S->ri->files[i];
        size_t bad = 0;
        rc = hash_files(f, S->ri->n_files, job->n_threads, &bad, err);
        free(f);
        if (rc != LM_OK)
            return rc;
        phase_end(S, LM_PHASE_HASH);
    }
    return LM_OK;
}

static void state_free(merge_state *S)
{
    lm_report_free(S->ri);
    lm_out_target_free(&S->ot);
    lm_side_plan_free(&S->side);
    lm_base_info_free(&S->bi);
    lm_qscheme_free(&S->qs);
    free(S->base_dir);
    lm_plan_free(S->plan);
    if (S->ads)
        for (size_t i = 0; i < S->job->n_adapters; i++)
            lm_adapter_free(S->ads[i]);
    free(S->ads);
    free(S->ad_sha256);
    free(S->tstats);
    free(S->out_sha);
    for (int k = 0; k < 3; k++)
        free(S->meta_text[k]);
    if (!S->model_shared)
        lm_model_close(S->model);
}

/* the job's options that need no input read */
static lm_code check_options(merge_state *S, lm_err *err)
{
    const lm_merge_job *job = S->job;
    int dir = S->ot.is_dir || job->out_path == NULL;
    if (job->max_shard_bytes && !dir)
        return lm_fail(err, LM_E_USAGE, "Usage", "--max-shard-size needs a directory OUT (e.g. 'merged/')");
    if (job->shard_mode && !S->ot.is_dir)
        return lm_fail(err, LM_E_USAGE, "Usage", "--shards needs a directory OUT (e.g. 'merged/'), not the file '%s'",
                       job->out_path ? job->out_path : "");
    if (job->shard_mode == LM_SHARDS_WORKER && (job->shard_count == 0 || job->shard_index >= job->shard_count))
        return lm_fail(err, LM_E_USAGE, "Usage", "--shards I/N needs 0 <= I < N (worker %u of %u)", job->shard_index,
                       job->shard_count);
    if (job->n_copy_files && !dir)
        return lm_fail(err, LM_E_USAGE, "Usage", "--copy-file needs a directory OUT (e.g. 'merged/')");
    if (!parse_dtype_opt(job->out_dtype, &S->popts.out_dtype_set, &S->popts.out_dtype))
        return lm_fail(err, LM_E_USAGE, "Usage", "--dtype must be auto, bf16, f16 or f32 (not '%s')", job->out_dtype);
    if (lm_kernels_select(&S->kern, job->kernels) != 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "kernel variant '%s' cannot run on this CPU", job->kernels);
    return LM_OK;
}

/* everything up to the first byte written: the inputs opened (model: NULL, or a batch's shared
 * one; pre: NULL, or the job's adapters opened ahead), planned and checked, OUT decided and its
 * side files read */
static lm_code merge_begin(merge_state *S, const lm_merge_job *job, lm_model *model, preopened *pre, lm_err *err)
{
    lm_code rc = LM_OK;
    memset(S, 0, sizeof *S);
    S->job = job;
    S->pre = pre;
    S->t0 = S->t_phase = now_seconds();
    S->model = model;
    S->model_shared = model != NULL;
    lm_base_info_free(&S->bi); /* fields "absent" */
    if (job == NULL || job->base_path == NULL || (job->out_path == NULL && !job->dry_run) || job->n_adapters == 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "a merge needs a base, at least one adapter and an output");
    if (job->out_path != NULL && (rc = lm_out_resolve(&S->ot, job->out_path, err)) != LM_OK)
        return rc;
    if ((rc = check_options(S, err)) != LM_OK)
        return rc;
    S->ri = lm_report_new();
    S->ads = calloc(job->n_adapters, sizeof *S->ads);
    S->ad_sha256 = calloc(job->n_adapters, sizeof *S->ad_sha256);
    S->base_dir = lm_base_directory(job->base_path);
    if (S->ri == NULL || S->ads == NULL || S->ad_sha256 == NULL || S->base_dir == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if ((rc = open_inputs(S, err)) != LM_OK)
        return rc;
    phase_end(S, LM_PHASE_OPEN);
    if ((rc = lm_base_quant_scheme(S->base_dir, &S->qs, err)) != LM_OK)
        return rc;
    if (job->simulate_nf4 && S->qs.fmt != LM_Q_NONE)
        return lm_fail(err, LM_E_USAGE, "Usage", "--simulate-nf4 is for a 16-bit base, and this base is quantized "
                       "(quant_method %s): its weights already are what the adapter saw", S->qs.method);
    S->popts.quant = &S->qs;
    lm_base_info_read(S->base_dir, &S->bi);
    S->popts.model_type = S->bi.model_type;
    S->plan = lm_plan_create(S->model, S->ads, job->n_adapters, &S->popts, err);
    if (S->plan == NULL)
        return err->code;
    lm_report_take_notes(S->ri, S->plan);
    note_adapters(S->ri, S->ads, job->n_adapters);
    if ((rc = mark_simulate_nf4(S, err)) != LM_OK)
        return rc;
    if ((rc = check_noop(S, err)) != LM_OK || (rc = check_vocabulary(S, err)) != LM_OK ||
        (rc = lm_report_plan_exact(S->ri, S->plan, err)) != LM_OK)
        return rc;
    if ((S->tstats = calloc(S->plan->n + 1, sizeof *S->tstats)) == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    phase_end(S, LM_PHASE_PLAN);
    S->out_dtype = output_dtype(S->plan);
    lm_inputs_check_base(&S->bi, job->base_path, S->ads, job->n_adapters, S->ri);
    if ((rc = hash_adapters(S, err)) != LM_OK || (rc = provenance(S, err)) != LM_OK)
        return rc;
    if (job->out_path != NULL && (rc = prepare_output(S, err)) != LM_OK)
        return rc;
    if ((rc = check_strict(S, err)) != LM_OK)
        return rc;
    phase_end(S, LM_PHASE_PREPARE);
    return LM_OK;
}

/* the threads the report gives: the run's; finalize's, the workers' (from their sidecars; 0, left
 * out, when unknown): it writes no tensor itself */
static int report_threads(const merge_state *S)
{
    if (S->job->shard_mode == LM_SHARDS_INDEX || S->st.n_threads > 0)
        return S->st.n_threads;
    return S->job->n_threads;
}

/* the report of a merge done (or planned) */
static lm_code merge_report(merge_state *S, lm_merge_report **report, lm_err *err)
{
    const lm_merge_job *job = S->job;
    S->ri->pub.seconds = now_seconds() - S->t0;
    lm_report_ctx c = {job, S->ads, (const char *const *)NULL, S->plan, job->dry_run ? NULL : S->tstats,
                       job->out_path ? (S->ot.is_dir ? "directory" : "file") : NULL,
                       S->out_dtype, report_threads(S), S->kern.name, S->st.bytes_written,
                       S->st.n_exact_tensors, S->st.n_recomputed};
    const char *shas[64];
    const char **sha_ptrs = job->n_adapters <= 64 ? shas : malloc(job->n_adapters * sizeof *sha_ptrs);
    if (sha_ptrs == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; i < job->n_adapters; i++)
        sha_ptrs[i] = S->ad_sha256[i];
    c.adapter_sha256 = sha_ptrs;
    lm_code rc = lm_report_finish(S->ri, &c, err);
    if (sha_ptrs != shas)
        free(sha_ptrs);
    if (rc == LM_OK && report) {
        *report = &S->ri->pub;
        S->ri = NULL;
    }
    return rc;
}

/* after success or failure: a failure's stage and what is in it, a directory OUT the merge
 * created (only if still empty: nothing of ours is left in it) */
static void merge_end(merge_state *S, lm_code rc)
{
    lm_out_stage_abort(&S->ot);
    if (rc != LM_OK && S->ot.created_dir && !S->committed) {
        if (S->job->shard_mode == LM_SHARDS_NONE) /* shard jobs share OUT: never theirs alone */
            lm_out_remove_moved_in(&S->ot, &S->side); /* a commit that failed after (a) */
        rmdir(S->ot.dir);
    }
    state_free(S);
}

static lm_code merge_run(const lm_merge_job *job, lm_merge_report **report, lm_err *err)
{
    merge_state S;
    if (report)
        *report = NULL;
    lm_code rc = merge_begin(&S, job, NULL, NULL, err);
    if (rc == LM_OK && !job->dry_run)
        rc = job->shard_mode ? run_shards(&S, err) : write_output(&S, err);
    if (rc == LM_OK)
        rc = merge_report(&S, report, err);
    merge_end(&S, rc);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* batch: K merges of one base in one pass (lm_merge_batch)                                     */
/* ------------------------------------------------------------------------------------------ */
/* OUT as an absolute path without trailing slashes (through realpath as far as it exists), for
 * comparing the jobs' outputs; malloc'd, NULL when out of memory */
static char *out_canonical(const char *out)
{
    char *real = realpath(out, NULL), *c = NULL;
    if (real != NULL)
        return real;
    size_t n;
    const char *leaf = lm_path_leaf(out, &n);
    char *parent = strndup(out, (size_t)(leaf - out));
    if (parent == NULL)
        return NULL;
    char *rp = realpath(parent[0] ? parent : ".", NULL);
    if (rp != NULL) {
        if (asprintf(&c, "%s/%.*s", strcmp(rp, "/") == 0 ? "" : rp, (int)n, leaf) < 0)
            c = NULL;
    } else { /* the parent does not exist either: the path as written, made absolute */
        char cwd[4096];
        if (asprintf(&c, "%s/%s", out[0] == '/' || getcwd(cwd, sizeof cwd) == NULL ? "" : cwd, out) < 0)
            c = NULL;
        for (size_t k = c ? strlen(c) : 0; k > 1 && c[k - 1] == '/'; k--)
            c[k - 1] = '\0';
    }
    free(parent);
    free(rp);
    return c;
}

/* pre[j] for jobs 1.. whose inputs pass lm_inputs_precheck (the others open nothing ahead: the
 * check refuses what could block an open, a FIFO ...), opened on up to n_threads threads (the
 * calling one too).  Nothing is reported here: a failure is the job's, when it is begun. */
static void batch_preopen(const lm_merge_job *jobs, size_t n, lm_model *model, preopened **pre)
{
    batch_pre B = {jobs, model, pre, n, 0};
    size_t items = 0;
    for (size_t j = 1; j < n; j++) {
        lm_err e;
        lm_err_clear(&e);
        if (jobs[j].n_adapters == 0 || lm_inputs_precheck(&jobs[j], &e) != LM_OK)
            continue;
        if ((pre[j] = calloc(jobs[j].n_adapters, sizeof *pre[j])) == NULL)
            return; /* out of memory: the jobs open their own */
        items += jobs[j].n_adapters;
    }
    B.next = jobs[0].n_adapters; /* the first job's are open */
    preopen_run(&B, items, jobs[0].n_threads);
}

/* the batch's shared options, and no two jobs writing the same OUT (or one inside another's) */
static lm_code batch_check(const lm_merge_job *jobs, size_t n, char **canon, size_t *bad, lm_err *err)
{
    const lm_merge_job *j0 = &jobs[0];
    for (size_t j = 0; j < n; j++) {
        const lm_merge_job *J = &jobs[j];
        *bad = j;
        if (J->base_path == NULL || strcmp(J->base_path, j0->base_path) != 0 || J->n_threads != j0->n_threads ||
            J->tile_elems != j0->tile_elems || J->exactness_off != j0->exactness_off || J->dry_run != j0->dry_run ||
            (J->kernels == NULL) != (j0->kernels == NULL) || (J->kernels && strcmp(J->kernels, j0->kernels) != 0))
            return lm_fail(err, LM_E_USAGE, "Usage", "every job of a batch has the same base, threads, kernels and "
                           "dry-run setting");
        if (J->shard_mode != LM_SHARDS_NONE)
            return lm_fail(err, LM_E_USAGE, "Usage", "--shards is not available in a batch (run a batch per shard "
                           "set, or shard jobs one merge at a time)");
        if (J->out_path == NULL)
            continue;
        if ((canon[j] = out_canonical(J->out_path)) == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        for (size_t k = 0; k < j; k++) {
            if (canon[k] == NULL)
                continue;
            size_t a = strlen(canon[k]), b = strlen(canon[j]);
            int same = strcmp(canon[k], canon[j]) == 0;
            int nested = (a < b && strncmp(canon[k], canon[j], a) == 0 && canon[j][a] == '/') ||
                         (b < a && strncmp(canon[j], canon[k], b) == 0 && canon[k][b] == '/');
            if (same || nested)
                return lm_fail(err, LM_E_USAGE, "Usage", "OUT '%s' %s the output of job %zu ('%s'): each job needs "
                               "an output of its own", J->out_path, same ? "is also" : "overlaps", k + 1,
                               jobs[k].out_path);
        }
    }
    return LM_OK;
}

/* no job writes over another job's input: an adapter's weights or config file, or (a directory
 * OUT) its directory.  (A job's own inputs and the shared base are checked by merge_begin.) */
static lm_code batch_check_inputs(merge_state *S, size_t n, size_t *bad, lm_err *err)
{
    for (size_t j = 0; j < n; j++)
        for (size_t k = 0; k < n; k++) {
            *bad = j;
            for (size_t a = 0; k != j && a < S[k].job->n_adapters; a++) {
                const lm_adapter *ad = S[k].ads[a];
                const char *inputs[2] = {ad->weights_path, ad->config_path};
                for (size_t i = 0; i < S[j].ot.n_shards; i++)
                    for (int f = 0; f < 2; f++)
                        if (inputs[f] != NULL && lm_same_file(S[j].ot.paths[i], inputs[f])) {
                            lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as job %zu's "
                                    "input '%s'", k + 1, inputs[f]);
                            lm_err_set_path(err, S[j].ot.paths[i]);
                            return err->code;
                        }
                if (S[j].ot.is_dir && ad->foreign == NULL &&
                    lm_out_check_not_in(&S[j].ot, (const char *const *)&ad->dir, 1, err) != LM_OK)
                    return err->code;
            }
        }
    return LM_OK;
}

/* a batch job's directory OUT, once its weight files are in the stage: the commit */
static lm_code batch_commit(void *ctx, lm_err *err)
{
    merge_state *S = ctx;
    lm_code rc = S->ot.is_dir ? lm_out_commit(&S->ot, &S->side, S->job->do_fsync, S->ri, err) : LM_OK;
    S->committed = rc == LM_OK;
    return rc;
}

/* every job's OUT made and staged, then the one pass over the base */
static lm_code batch_write(merge_state *S, size_t n, size_t *bad, lm_err *err)
{
    const lm_plan **plans = calloc(n, sizeof *plans);
    const char **outs = calloc(n, sizeof *outs);
    lm_exec_opts *eo = calloc(n, sizeof *eo);
    lm_exec_stats *st = calloc(n, sizeof *st);
    lm_code rc = plans && outs && eo && st ? LM_OK : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t j = 0; j < n && rc == LM_OK; j++) {
        *bad = j;
        if ((rc = lm_out_make_dir(&S[j].ot, err)) != LM_OK)
            break;
        lm_out_clean_stale_temps(&S[j].ot, S[j].ri);
        if ((rc = lm_out_stage_paths(&S[j].ot, err)) != LM_OK)
            break;
        char **paths = S[j].ot.paths;
        if ((rc = out_sha_alloc(&S[j], err)) != LM_OK)
            break;
        exec_opts(&S[j], paths, &eo[j]);
        eo[j].after_commit = batch_commit;
        plans[j] = S[j].plan;
        outs[j] = paths[0];
    }
    if (rc == LM_OK)
        rc = lm_exec_run_batch(n, plans, S[0].model, outs, eo, st, bad, err);
    for (size_t j = 0; j < n && rc == LM_OK; j++) {
        S[j].st = st[j];
        phase_end(&S[j], LM_PHASE_WRITE);
    }
    if (rc == LM_OK && S[0].job->progress) /* the last call says "all of it" */
        S[0].job->progress(S[0].job->progress_ctx, 1, 1);
    /* --json: every job's files hashed together, on the batch's threads */
    size_t n_files = 0, k = 0;
    for (size_t j = 0; j < n && rc == LM_OK; j++) {
        *bad = j;
        n_files += S[j].job->hash_outputs ? S[j].ri->n_files : 0;
        rc = out_sha_take(&S[j], err);
    }
    lm_merge_file **f = rc == LM_OK && n_files > 0 ? malloc(n_files * sizeof *f) : NULL;
    size_t *job_of = f != NULL ? malloc(n_files * sizeof *job_of) : NULL;
    if (n_files > 0 && rc == LM_OK && job_of == NULL)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t j = 0; j < n && rc == LM_OK; j++)
        for (size_t i = 0; S[j].job->hash_outputs && i < S[j].ri->n_files; i++) {
            job_of[k] = j;
            f[k++] = &S[j].ri->files[i];
        }
    size_t bad_file = 0;
    if (rc == LM_OK && n_files > 0 && (rc = hash_files(f, n_files, S[0].job->n_threads, &bad_file, err)) != LM_OK)
        *bad = job_of[bad_file];
    for (size_t j = 0; j < n && rc == LM_OK; j++)
        phase_end(&S[j], LM_PHASE_HASH);
    free(f);
    free(job_of);
    free(plans);
    free(outs);
    free(eo);
    free(st);
    return rc;
}

static lm_code merge_batch(const lm_merge_job *jobs, size_t n, lm_merge_report **reports, size_t *bad,
                           size_t *n_committed, lm_err *err)
{
    if (n == 0 || jobs == NULL)
        return lm_fail(err, LM_E_USAGE, "Usage", "a batch needs at least one job");
    merge_state *S = calloc(n, sizeof *S);
    char **canon = calloc(n, sizeof *canon);
    preopened **pre = calloc(n, sizeof *pre);
    size_t n_begun = 0;
    lm_code rc = S && canon && pre ? batch_check(jobs, n, canon, bad, err)
                                   : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t j = 0; j < n && rc == LM_OK; j++) { /* every job planned and checked before anything is written */
        *bad = j;
        n_begun = j + 1;
        rc = merge_begin(&S[j], &jobs[j], j ? S[0].model : NULL, pre[j], err);
        if (j == 0 && rc == LM_OK && n > 1)
            batch_preopen(jobs, n, S[0].model, pre);
    }
    if (rc == LM_OK)
        rc = batch_check_inputs(S, n, bad, err);
    if (rc == LM_OK && !jobs[0].dry_run)
        rc = batch_write(S, n, bad, err);
    for (size_t j = 0; j < n && rc == LM_OK; j++) {
        *bad = j;
        rc = merge_report(&S[j], reports ? &reports[j] : NULL, err);
    }
    if (rc != LM_OK)
        for (size_t j = 0; reports && j < n; j++) {
            lm_merge_report_free(reports[j]);
            reports[j] = NULL;
        }
    for (size_t j = n_begun; j-- > 0;) { /* the shared model is closed with the first job */
        *n_committed += S[j].committed;
        merge_end(&S[j], rc);
    }
    for (size_t j = 0; canon && j < n; j++)
        free(canon[j]);
    for (size_t j = 0; pre && j < n; j++) { /* the adapters of jobs not begun (an earlier one failed) */
        for (size_t i = 0; pre[j] && i < jobs[j].n_adapters; i++)
            lm_adapter_free(pre[j][i].a);
        free(pre[j]);
    }
    free(pre);
    free(canon);
    free(S);
    return rc;
}

lm_code lm_merge_batch(const lm_merge_job *jobs, size_t n_jobs, lm_merge_report **reports, size_t *failed_job,
                       size_t *n_committed, lm_err *err)
{
    lm_err e;
    lm_err_clear(&e);
    size_t bad = 0, committed = 0;
    for (size_t j = 0; reports && j < n_jobs; j++)
        reports[j] = NULL;
    lm_code rc = merge_batch(jobs, n_jobs, reports, &bad, &committed, &e);
    if (rc != LM_OK && e.code == LM_OK)
        lm_fail(&e, rc, NULL, "merge failed");
    if (err != NULL && rc != LM_OK)
        *err = e;
    if (failed_job)
        *failed_job = rc != LM_OK ? bad : 0;
    if (n_committed)
        *n_committed = committed;
    return rc;
}

/* the work always records its error in a local lm_err, so the code returned is the real one even
 * when the caller passes err == NULL */
lm_code lm_merge_run(const lm_merge_job *job, lm_merge_report **report, lm_err *err)
{
    lm_err e;
    lm_err_clear(&e);
    lm_code rc = merge_run(job, report, &e);
    if (rc != LM_OK && e.code == LM_OK) /* every failure path names itself; this is a safety net */
        lm_fail(&e, rc, NULL, "merge failed");
    if (err != NULL && rc != LM_OK)
        *err = e;
    return rc;
}
