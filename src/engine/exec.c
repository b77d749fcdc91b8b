/* SPDX-License-Identifier: MIT */
/* exec.c : the executor (see exec.h). */
#include "exec.h"

#include "compat.h"
#include "exec_dora.h"
#include "exec_exact.h"
#include "exec_lowrank.h"
#include "exec_quant.h"
#include "gemm_tile.h"
#include "lm_error.h"
#include "lm_sys.h"
#include "output.h"
#include "quant_bnb.h"
#include "st_reader.h"
#include "st_writer.h"

#include <errno.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define COPY_CHUNK ((uint64_t)32 << 20)     /* bytes per copy task: fewer hand-offs of the output inode lock */


static void to_f32(const lm_kernels *k, lm_dtype dt, const void *src, float *dst, size_t n)
{
    switch (dt) {
    case LM_DT_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case LM_DT_F16:
        k->f16_to_f32(src, dst, n);
        break;
    case LM_DT_BF16:
        k->bf16_to_f32(src, dst, n);
        break;
    case LM_DT_F64:
        k->f64_to_f32(src, dst, n);
        break;
    default:
        memset(dst, 0, n * sizeof(float)); /* the planner allows float types only */
        break;
    }
}

static void from_f32(const lm_kernels *k, lm_dtype dt, const float *src, void *dst, size_t n)
{
    switch (dt) {
    case LM_DT_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case LM_DT_F16:
        k->f32_to_f16(src, dst, n);
        break;
    case LM_DT_BF16:
        k->f32_to_bf16(src, dst, n);
        break;
    case LM_DT_F64:
        k->f32_to_f64(src, dst, n);
        break;
    default:
        break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* tasks and per-tensor state                                                                   */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    size_t tensor;   /* plan index */
    uint64_t first;  /* copy: byte offset in the tensor; compute: first row */
    uint64_t count;  /* copy: bytes; compute: rows */
    int copy;
} task;

/* What a computed tensor needs while its tiles are in flight: the ops' prepared factors, made
 * when its first tile is claimed and freed after its last, so memory is the tensors in flight,
 * whatever the number of modules. */
typedef struct {
    lm_prepared *prep;   /* [n_ops], or NULL */
    double *col_scale;   /* column DoRA: per-column factors (the column pass), or NULL */
    lm_lowrank_tensor *exact; /* every op low-rank: the exact path's factors, or NULL */
    lm_dora_tensor *dora;     /* low-rank and DoRA ops (LM_EXACT_DORA, exactness on), or NULL */
    lm_xq_bound *xqb;         /* block FP8 kept, one low-rank op: the certified fused tiles' bound, or NULL */
    float *xq_apack;          /* and its A packed by column block (lm_xq_pack_a), or NULL */
    lm_exact_kind exact_kind; /* the certified path it takes (decided before the run) */
    uint64_t tiles_left; /* compute tiles not done yet (atomic) */
    uint64_t n_recomputed, n_fixed_point; /* the exact path's counters (atomic) */
    int ready;           /* prep is filled (atomic, release/acquire) */
    int ahead;           /* a thread took its preparation ahead of its tiles (atomic; prepare_ahead) */
    size_t next;         /* the next tensor computed after it, in task order (SIZE_MAX: none) */
    float *qscale;       /* a quantized weight: its scale grid in f32, or NULL */
    float *qamax;        /* q->needs_amax: the merged amaxes (quant_amax_pass), or NULL */
    lm_qstats qst;       /* what requantizing its tiles did (under prep_lock) */
} tensor_rt;

/* The adapter tensors a tensor's ops read are dropped from the process once it is done (its
 * pages would stay mapped, and resident memory is bounded by the tensors in flight).  madvise
 * interrupts every core the process runs on (a TLB shootdown), so the ranges are gathered and
 * dropped DROP_BATCH bytes at a time per job of the run, adjacent ones (the next module's
 * factors) merged.  One list for every job of a batch, under their prep_lock. */
#define DROP_BATCH ((uint64_t)2 << 20)
#define DROP_RANGES 16

typedef struct {
    uintptr_t lo[DROP_RANGES], hi[DROP_RANGES];
    size_t n;
    uint64_t bytes, batch; /* gathered; dropped when bytes reach batch */
} drop_list;

typedef struct {
    const lm_plan *plan;
    const lm_model *model;
    lm_st_writer **w;        /* one writer per output shard */
    size_t n_shards;
    const size_t *shard_of;  /* plan tensor -> shard */
    size_t *local;           /* plan tensor -> its index inside its shard */
    int one_shard;           /* only shard only_shard is written (lm_exec_opts) */
    size_t only_shard;
    const lm_kernels *k;
    tensor_rt *rt;           /* per plan tensor */
    pthread_mutex_t *prep_lock; /* prepare and release one at a time (FFTW's planner is not reentrant):
                                  one lock for every job of a batch */
    uint64_t tile_elems;     /* f32 elements per tile (0: default) */
    unsigned lowrank_flags;  /* 0, or LM_LOWRANK_UNCERTIFIED (exactness off) */
    struct tile_stat *tstat; /* per task (compute tasks only), or NULL: statistics not measured */
    int stats_norms;
    const lm_exec_opts *opts;
    task *tasks;             /* in the plan's data order */
    size_t n_tasks;
    lm_exec_stats st;
    size_t max_elems;        /* f32 elements of its largest tile */
    drop_list *drops;        /* adapter pages to drop (under prep_lock, shared by a batch's jobs) */
} job;

/* the base file a tensor's bytes come from (NULL when they come from an adapter) */
static const lm_st_file *tensor_src_file(const job *J, size_t ti)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    if (t->base == NULL || (t->n_ops > 0 && t->ops[0].kind == LM_OP_REPLACE))
        return NULL;
    return lm_model_file(J->model, t->base->file);
}

static const uint8_t *tensor_src_bytes(const job *J, size_t ti)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    if (t->n_ops > 0 && t->ops[0].kind == LM_OP_REPLACE)
        return t->ops[0].src->data;
    const lm_st_file *f = lm_model_file(J->model, t->base->file);
    return lm_st_data(f) + t->base->info->begin;
}

static void drops_flush(drop_list *d)
{
    for (size_t i = 0; i < d->n; i++)
        lm_drop_mapped_pages((const void *)d->lo[i], (uint64_t)(d->hi[i] - d->lo[i]));
    d->n = 0;
    d->bytes = 0;
}

/* tensor t's pages to drop (now, or with the next batch) */
static void drops_add(drop_list *d, const lm_ts_tensor *t)
{
    if (t == NULL || !t->file_backed || t->shared || t->n_bytes == 0)
        return;
    const uintptr_t lo = (uintptr_t)t->data, hi = lo + (uintptr_t)t->n_bytes;
    size_t i = 0;
    while (i < d->n && !(lo <= d->hi[i] && d->lo[i] <= hi))
        i++;
    if (i == d->n) {
        if (d->n == DROP_RANGES)
            drops_flush(d);
        i = d->n++;
        d->lo[i] = lo;
        d->hi[i] = hi;
    } else { /* overlaps or touches range i: one range */
        d->bytes -= d->hi[i] - d->lo[i];
        d->lo[i] = lo < d->lo[i] ? lo : d->lo[i];
        d->hi[i] = hi > d->hi[i] ? hi : d->hi[i];
    }
    d->bytes += d->hi[i] - d->lo[i];
    if (d->bytes >= d->batch)
        drops_flush(d);
}

static void prepared_free(lm_prepared *p, drop_list *d)
{
    if (p->destroy != NULL)
        p->destroy(p);
    for (size_t i = 0; i < p->n_owned; i++)
        free(p->owned[i]);
    for (size_t i = 0; i < p->n_read; i++)
        drops_add(d, p->read[i]);
    memset(p, 0, sizeof *p);
}

/* releases tensor ti's prepared factors; caller holds prep_lock */
static void tensor_release(job *J, size_t ti)
{
    tensor_rt *rt = &J->rt[ti];
    if (rt->prep != NULL)
        for (size_t o = 0; o < J->plan->t[ti].n_ops; o++)
            prepared_free(&rt->prep[o], J->drops);
    free(rt->prep);
    free(rt->col_scale);
    free(rt->qscale);
    lm_lowrank_tensor_free(rt->exact);
    lm_dora_tensor_free(rt->dora);
    lm_xq_bound_free(rt->xqb);
    rt->xqb = NULL;
    free(rt->xq_apack);
    rt->xq_apack = NULL;
    rt->dora = NULL;
    rt->qscale = NULL;
    rt->prep = NULL;
    rt->col_scale = NULL;
    rt->exact = NULL;
    __atomic_store_n(&rt->ready, 0, __ATOMIC_RELEASE);
}

static lm_code load_tile(const job *J, size_t ti, float *acc, uint8_t *raw, uint64_t r0, uint64_t nr, lm_err *err);

/* a method's prepare; a method that reads the base weight (LM_M_READS_BASE) gets tensor ti's input
 * values as f32 for the call, read with pread (not kept resident) and freed after it */
static lm_code method_prepare(job *J, size_t ti, const lm_op *op, lm_prepared *p, lm_err *err)
{
    if (op->method->prepare == NULL)
        return LM_OK;
    if (!(op->method->flags & LM_M_READS_BASE))
        return op->method->prepare(op, J->k, p, err);
    const lm_plan_tensor *t = &J->plan->t[ti];
    size_t n = (size_t)(t->rows * t->cols), esz = lm_dtype_bits(t->src_dtype) / 8;
    float *base = malloc(n * sizeof(float) + 1);
    uint8_t *raw = malloc(n * esz + 1);
    lm_code rc = base == NULL || raw == NULL ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory")
                                             : load_tile(J, ti, base, raw, 0, t->rows, err);
    free(raw);
    if (rc == LM_OK) {
        p->base = base;
        rc = op->method->prepare(op, J->k, p, err);
        p->base = NULL;
    }
    free(base);
    return rc;
}

static lm_code sim_double_absmax(const job *J, size_t ti, float **out, lm_err *err);

static int fused_tile(const job *J, size_t ti);

/* block FP8 kept quantized, one low-rank op (not transposed, factors exact in f32) on the
 * certified low-rank path: its tiles take the fused kernels, certified (lm_xq_merge_tile) */
static int fused_certifiable(const job *J, size_t ti)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const tensor_rt *rt = &J->rt[ti];
    return rt->exact_kind == LM_EXACT_LOWRANK && rt->exact != NULL && !J->lowrank_flags && lm_xq_fused(t) &&
           t->n_ops == 1 && t->ops[0].kind == LM_OP_LOWRANK && !t->ops[0].axis && J->k->fp8_merge != NULL &&
           rt->prep[0].a64 == NULL && rt->prep[0].b64 == NULL;
}

/* every op of tensor ti prepared (once, by the first thread that needs it) */
static lm_code tensor_prepare(job *J, size_t ti, lm_err *err)
{
    tensor_rt *rt = &J->rt[ti];
    if (__atomic_load_n(&rt->ready, __ATOMIC_ACQUIRE))
        return LM_OK;
    lm_code rc = LM_OK;
    pthread_mutex_lock(J->prep_lock);
    if (!rt->ready) {
        const lm_plan_tensor *t = &J->plan->t[ti];
        rt->prep = calloc(t->n_ops ? t->n_ops : 1, sizeof *rt->prep);
        if (rt->prep == NULL)
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        for (size_t o = 0; o < t->n_ops && rc == LM_OK; o++) {
            const lm_op *op = &t->ops[o];
            lm_prepared *p = &rt->prep[o];
            if (op->kind == LM_OP_LOWRANK || op->kind == LM_OP_METHOD)
                rc = method_prepare(J, ti, op, p, err);
            else if (op->kind != LM_OP_REPLACE && (p->a = lm_prep_view(p, op->src, J->k, err)) == NULL)
                rc = LM_E_NOMEM;
            /* the adapter tensors its tiles read through the mapping, mapped now in one call each
             * rather than a page fault every few pages as they are first read (dropped as before) */
            for (size_t i = 0; rc == LM_OK && i < p->n_read; i++)
                lm_populate_read(p->read[i]->data, p->read[i]->n_bytes);
        }
        if (rc == LM_OK && t->sim_nf4 == 2)
            rc = sim_double_absmax(J, ti, &rt->qscale, err);
        if (rc == LM_OK && t->q != NULL && (rc = lm_xq_load_scales(t, J->model, &rt->qscale, err)) == LM_OK &&
            t->q->needs_amax && rt->qamax != NULL)
            lm_xq_set_amax(t, rt->qscale, rt->qamax);
        if (rc == LM_OK && rt->exact_kind == LM_EXACT_LOWRANK &&
            (rt->exact = lm_lowrank_tensor_create(t, rt->prep, J->lowrank_flags, err)) == NULL)
            rc = LM_E_NOMEM;
        if (rc == LM_OK && lm_xq_fused(t) && t->n_ops == 1 && t->ops[0].kind == LM_OP_LOWRANK && !t->ops[0].axis &&
            J->k->fp8_merge != NULL) { /* the kernels' A, once (NULL: packed per block) */
            const lm_op *op = &t->ops[0];
            const lm_xq_term term = {rt->prep[0].b, rt->prep[0].a, op->rank, op->row0, op->out, (float)op->scale,
                                     op->scale, NULL, NULL, NULL, NULL};
            rt->xq_apack = lm_xq_pack_a(t, &term);
        }
        if (rc == LM_OK && fused_certifiable(J, ti)) { /* (NULL: the certified tiles of the other paths) */
            const lm_op *op = &t->ops[0];
            const lm_xq_term term = {rt->prep[0].b, rt->prep[0].a, op->rank, op->row0, op->out, (float)op->scale,
                                     op->scale, rt->xq_apack, NULL, NULL, NULL};
            rt->xqb = lm_xq_bound_make(t, &term);
        }
        if (rc == LM_OK && rt->exact_kind == LM_EXACT_DORA && !J->lowrank_flags &&
            (rt->dora = lm_dora_tensor_create(t, rt->prep, lm_kdtype_of(lm_exact_out_dtype(t)), err)) == NULL)
            rc = LM_E_NOMEM;
        if (rc != LM_OK) {
            lm_err_set_tensor(err, t->name);
            tensor_release(J, ti);
        } else {
            __atomic_store_n(&rt->ready, 1, __ATOMIC_RELEASE);
        }
    }
    pthread_mutex_unlock(J->prep_lock);
    return rc;
}

/* Tensor ti is prepared and its tiles under way: the first thread here prepares the next tensor
 * now (its factors, and for the certified low-rank path the first segment's), while the other
 * threads compute ti's tiles, so that none waits for them at that tensor's first tile.  Two
 * tensors' factors are in memory at once instead of one.  A failure is left for the tensor's own
 * tiles to meet and report. */
static void prepare_ahead(job *J, size_t ti)
{
    const size_t nx = J->rt[ti].next;
    if (nx == SIZE_MAX || __atomic_load_n(&J->rt[nx].ready, __ATOMIC_ACQUIRE) ||
        __atomic_load_n(&J->rt[nx].tiles_left, __ATOMIC_ACQUIRE) == 0 ||
        __atomic_exchange_n(&J->rt[nx].ahead, 1, __ATOMIC_ACQ_REL))
        return;
    lm_err e;
    lm_err_clear(&e);
    if (tensor_prepare(J, nx, &e) != LM_OK || J->rt[nx].exact_kind != LM_EXACT_LOWRANK || fused_tile(J, nx))
        return; /* (the fused tiles make the factors only when an element needs them) */
    /* The first segment's factors are made outside prep_lock, so that a thread releasing the
     * tensor it has just finished (under that lock) does not wait for them.  Its tiles may all be
     * done meanwhile: the warm-up holds one more "tile" and whoever brings the count to zero
     * releases the tensor. */
    tensor_rt *rt = &J->rt[nx];
    uint64_t n = __atomic_load_n(&rt->tiles_left, __ATOMIC_ACQUIRE);
    do {
        if (n == 0)
            return;
    } while (!__atomic_compare_exchange_n(&rt->tiles_left, &n, n + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    if (rt->exact != NULL) /* still prepared: the count held it */
        (void)lm_lowrank_tensor_warm(rt->exact, 0);
    if (__atomic_sub_fetch(&rt->tiles_left, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_lock(J->prep_lock);
        tensor_release(J, nx);
        pthread_mutex_unlock(J->prep_lock);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* the engine's op kinds on one tile                                                            */
/* ------------------------------------------------------------------------------------------ */
_Static_assert(LM_OP_COUNT == 7, "every op kind has a case in apply_ops and in tensor_prepare");

static void op_rows(const lm_op *op, const float *src, const lm_tile *t)
{
    for (size_t q = 0; q < op->n_rows; q++) {
        uint64_t row = (uint64_t)op->rows[q];
        if (row >= t->r0 && row < t->r0 + t->nr)
            memcpy(t->acc + (row - t->r0) * t->cols, src + q * t->cols, t->cols * sizeof(float));
    }
}

/* the rows of the tile inside the op's block row0 .. row0 + (axis ? in : out), columns c0 .. c0 + w
 * (each element's value does not depend on which columns a call covers: lm_kernels.h) */
static void op_lowrank(const lm_op *op, const lm_prepared *p, const lm_tile *t, uint64_t c0, uint64_t w)
{
    const uint64_t end = op->row0 + (op->axis ? op->in : op->out);
    const uint64_t lo = t->r0 > op->row0 ? t->r0 : op->row0, hi = t->r0 + t->nr < end ? t->r0 + t->nr : end;
    if (lo >= hi)
        return;
    float *acc = t->acc + (lo - t->r0) * t->cols + c0;
    const uint64_t i = lo - op->row0;
    if (!op->axis)
        t->k->gemm_rows(0, 0, hi - lo, w, op->rank, (float)op->scale, p->b + i * op->rank, op->rank, p->a + c0, t->cols,
                        1.0f, acc, t->cols);
    else
        t->k->gemm_rows(1, 1, hi - lo, w, op->rank, (float)op->scale, p->a + i, op->in, p->b + c0 * op->rank, op->rank,
                        1.0f, acc, t->cols);
}

static void op_scale(const lm_op *op, const float *f, const lm_tile *t)
{
    for (uint64_t r = 0; r < t->nr; r++) {
        float *row = t->acc + r * t->cols;
        if (op->axis == 0) {
            const float s = f[t->r0 + r];
            for (uint64_t c = 0; c < t->cols; c++)
                row[c] *= s;
        } else {
            for (uint64_t c = 0; c < t->cols; c++)
                row[c] *= f[c];
        }
    }
}

/* DoRA's factor m / (norm + eps), or LyCORIS's w * (that - 1) + 1 for a multiplier w (in f64) */
/* DoRA: rows rescaled to m / ||row|| (axis 0), or columns by the column pass's factors */
static void op_norm(const lm_op *op, const float *m, const double *col_scale, const lm_tile *t)
{
    for (uint64_t r = 0; r < t->nr; r++) {
        float *row = t->acc + r * t->cols;
        if (op->axis == 0) {
            const double ss = t->k->sumsq(row, (size_t)t->cols);
            const float f = (float)lm_dora_factor(op, (double)m[t->r0 + r], ss);
            for (uint64_t c = 0; c < t->cols; c++)
                row[c] *= f;
        } else {
            for (uint64_t c = 0; c < t->cols; c++)
                row[c] = (float)((double)row[c] * col_scale[c]);
        }
    }
}

/* Applies ops [from, to) of tensor ti to the tile. */
static void apply_ops(const job *J, size_t ti, size_t from, size_t to, const lm_tile *t)
{
    const lm_plan_tensor *pt = &J->plan->t[ti];
    const tensor_rt *rt = &J->rt[ti];
    for (size_t o = from; o < to; o++) {
        const lm_op *op = &pt->ops[o];
        const lm_prepared *p = &rt->prep[o];
        switch (op->kind) {
        case LM_OP_REPLACE: break; /* the tile was loaded from the replacement */
        case LM_OP_ROWS: op_rows(op, p->a, t); break;
        case LM_OP_LOWRANK: op_lowrank(op, p, t, 0, t->cols); break;
        case LM_OP_ADD: t->k->axpy(t->acc, (float)op->scale, p->a + t->r0 * t->cols, (size_t)(t->nr * t->cols)); break;
        case LM_OP_SCALE: op_scale(op, p->a, t); break;
        case LM_OP_NORM: op_norm(op, p->a, rt->col_scale, t); break;
        case LM_OP_METHOD: op->method->apply_tile(op, p, t); break;
        case LM_OP_COUNT: break;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* tiles                                                                                        */
/* ------------------------------------------------------------------------------------------ */
/* Loads rows [r0, r0+nr) of tensor ti as f32.  Base bytes are read with pread into `raw`
 * rather than through the mapping: the mapping would leave pages resident (the kernel maps
 * neighbouring pages on every fault), and resident memory must stay bounded by the tiles in
 * flight, not the model. */
static const uint8_t *tile_bytes(const job *J, size_t ti, uint8_t *raw, uint64_t r0, uint64_t nr, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    uint64_t row = t->q != NULL ? t->q->row_bytes : t->cols * (lm_dtype_bits(t->src_dtype) / 8);
    uint64_t n_bytes = nr * row, rel = r0 * row;
    const lm_st_file *f = tensor_src_file(J, ti);
    const uint8_t *src;
    if (f != NULL && lm_st_fd(f) >= 0 && raw != NULL) {
        if (lm_base_pread(f, lm_st_data_offset(f) + t->base->info->begin + rel, raw, n_bytes, t->name, err) != LM_OK)
            return NULL;
        src = raw;
    } else {
        src = tensor_src_bytes(J, ti) + rel;
    }
    return src;
}

/* the tile's input bytes (rows r0 ..) as f32: converted, or dequantized (a quantized weight,
 * prepared) */
static void src_to_f32(const job *J, size_t ti, const uint8_t *src, uint64_t r0, uint64_t nr, float *dst)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    if (t->q != NULL)
        lm_xq_dequant(t, J->rt[ti].qscale, src, r0, nr, dst);
    else
        to_f32(J->k, t->src_dtype, src, dst, (size_t)(nr * t->cols));
    if (t->sim_nf4) /* tiles start on a block (lm_plan_tile_rows); double quantization: the tensor's absmax */
        lm_bnb_nf4_roundtrip(dst, nr * t->cols, 64, t->sim_nf4 == 2 ? J->rt[ti].qscale + r0 * t->cols / 64 : NULL,
                             t->src_dtype == LM_DT_BF16 ? 1 : t->src_dtype == LM_DT_F16 ? 2 : 0);
}

/* --simulate-nf4=double: the absmax dequantize_4bit would use for every block of 64 of the base
 * weight (double quantization needs all of them: their mean), from one pass over its rows */
static lm_code sim_double_absmax(const job *J, size_t ti, float **out, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const uint64_t n = t->rows * t->cols, chunk = t->cols >= 65536 ? 1 : 65536 / t->cols;
    float *amax = malloc((size_t)(n / 64 + 1) * sizeof *amax), *buf = malloc((size_t)(chunk * t->cols) * sizeof *buf);
    uint8_t *raw = malloc((size_t)(chunk * t->cols) * (lm_dtype_bits(t->src_dtype) / 8));
    lm_code rc = amax && buf && raw ? LM_OK : lm_fail(err, LM_E_NOMEM, NULL, "out of memory for '%s'", t->name);
    for (uint64_t r0 = 0; rc == LM_OK && r0 < t->rows; r0 += chunk) {
        const uint64_t nr = r0 + chunk <= t->rows ? chunk : t->rows - r0;
        const uint8_t *src = tile_bytes(J, ti, raw, r0, nr, err);
        if (src == NULL) {
            rc = LM_E_IO;
            break;
        }
        to_f32(J->k, t->src_dtype, src, buf, (size_t)(nr * t->cols));
        lm_bnb_block_amax(buf, nr * t->cols, 64, amax + r0 * t->cols / 64);
    }
    free(buf);
    free(raw);
    if (rc != LM_OK) {
        free(amax);
        return rc;
    }
    lm_bnb_double_quant(amax, n / 64, amax);
    *out = amax;
    return LM_OK;
}

static lm_code load_tile(const job *J, size_t ti, float *acc, uint8_t *raw, uint64_t r0, uint64_t nr, lm_err *err)
{
    const uint8_t *src = tile_bytes(J, ti, raw, r0, nr, err);
    if (src == NULL)
        return LM_E_IO;
    src_to_f32(J, ti, src, r0, nr, acc);
    return LM_OK;
}

/* per-thread buffers, room for max_elems f32 elements per tile */
#define WQ_BUFS 3 /* output buffers per thread: the tile being computed and two waiting for the writer */

typedef struct {
    float *acc;
    uint8_t *out;   /* the tile in the output dtype: outs[cur] */
    uint8_t *outs[WQ_BUFS]; /* handed to the write queue in turn, busy[] until written (DIO_ROOM bytes
                             * more, for the tile placed at its file offset's place in a page) */
    int placed;             /* tiles placed in outs[] for direct writes (alloc_workspace) */
    int busy[WQ_BUFS];      /* queued writes of each (under the queue's lock) */
    int cur;
    size_t out_bytes;       /* of each */
    float *scratch; /* the raw read buffer, then the methods' scratch: 4 max_elems + 64 floats */
    uint8_t *base_out; /* statistics: the base tile in the output dtype (NULL: not measured) */
    float *base_f32;   /* statistics: the base tile in f32 */
    uint8_t *codes;    /* a quantized weight kept quantized: the base's codes of the tile */
    float *qscales;    /* and the tile's new scales (lm_xq_requant()'s buffer) */
    uint8_t *raw;      /* a batch: the input bytes of a tile that several jobs compute (else NULL) */
    double *acc64;     /* LM_EXACT_F64 tensors: the tile in f64 (max_elems), and the methods' f64 */
    double *scratch64; /* scratch (2 max_elems + 64); NULL when no tensor takes that path */
    size_t ready_scratch, ready_acc, ready_out[WQ_BUFS]; /* bytes of each made present (ws_ready) */
} workspace;

/* the output buffers of a run whose writes are direct (lm_st_writer_direct): a tile is computed at
 * outs[i] + (its file offset modulo DIO_ROOM), so that its whole pages are written from where they
 * are; in transparent huge pages (2 MB: a 1 MB write is then one request to the disk, where 4 KB
 * pages make it two, the disk's segments being 254 pages here) */
#define DIO_ROOM ((size_t)4096)
#define HUGE_BYTES ((size_t)2 << 20)

/* [0, want) of buffer p present, ready (*ready) bytes of it already: a page written for the
 * first time costs a fault each (~14 us on a virtual machine), populated ahead ~0.7 us */
static void ws_populate(void *p, size_t *ready, size_t want)
{
    if (want > *ready) {
        lm_populate((uint8_t *)p + *ready, want - *ready);
        *ready = want;
    }
}

/* A merge must not create inf or NaN, in f32 or when rounding to a narrower dtype.  The common
 * case costs one scan of the output; only when it finds something is the input tile read again
 * to tell values the base already had from ones the merge made. */
/* the refusal of a tile whose merged values are not finite (bad_merged of them, where the input had
 * bad_in) or exceed the output dtype's range (bad_out non-finite in the output): LM_OK when
 * neither happened */
static lm_code refuse_nonfinite(const lm_plan_tensor *t, uint64_t r0, uint64_t nr, size_t bad_in, size_t bad_merged,
                                size_t bad_out, lm_err *err)
{
    if (bad_merged > bad_in)
        lm_fail(err, LM_E_MISMATCH, "NonFiniteResult", "the merged values are not finite (%zu inf/NaN in rows %llu.."
                "%llu): an adapter's delta overflows", bad_merged - bad_in, (unsigned long long)r0,
                (unsigned long long)(r0 + nr - 1));
    else if (bad_out > bad_in)
        lm_fail(err, LM_E_MISMATCH, "NonFiniteResult", "%zu merged values exceed the %s range (they would be "
                "written as inf; rows %llu..%llu)", bad_out - bad_in, lm_dtype_name(lm_exact_out_dtype(t)), (unsigned long long)r0,
                (unsigned long long)(r0 + nr - 1));
    else
        return LM_OK;
    lm_err_set_tensor(err, t->name);
    return LM_E_MISMATCH;
}

static lm_code check_finite(const job *J, size_t ti, uint64_t r0, uint64_t nr, const workspace *ws, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    size_t n = (size_t)(nr * t->cols);
    int narrow = t->dtype == LM_DT_F16 || t->dtype == LM_DT_BF16;
    size_t bad_out = narrow ? J->k->count_nonfinite_16((const uint16_t *)ws->out, n, t->dtype == LM_DT_F16 ? 0x7C00u : 0x7F80u)
                            : J->k->count_nonfinite_f32(ws->acc, n);
    if (bad_out == 0 || t->dtype == LM_DT_F64)
        return LM_OK;
    size_t bad_f32 = J->k->count_nonfinite_f32(ws->acc, n);
    if (load_tile(J, ti, ws->acc, (uint8_t *)ws->scratch, r0, nr, err) != LM_OK)
        return LM_E_IO;
    size_t bad_in = J->k->count_nonfinite_f32(ws->acc, n);
    return refuse_nonfinite(t, r0, nr, bad_in, bad_f32, bad_out, err);
}


/* the exact path: base bytes -> output bytes in one kernel call; the same refusals as
 * check_finite (a finite exact value beyond the output's range, or inf/NaN made from finite
 * base values) */
static lm_code compute_tile_exact(const job *J, size_t ti, uint64_t r0, uint64_t nr, const uint8_t *src, lm_dtype src_dt,
                                  const workspace *ws, uint64_t *n_changed, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    tensor_rt *rt = &J->rt[ti];
    size_t n = (size_t)(nr * t->cols);
    const lm_dtype od = lm_exact_out_dtype(t);
    lm_lowrank_stats st = {0};
    if (lm_lowrank_tensor_run(rt->exact, J->k, r0, nr, src, lm_kdtype_of(src_dt), ws->out, lm_kdtype_of(od), t->cols,
                              J->lowrank_flags, &st) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the low-rank factors");
        lm_err_set_tensor(err, t->name);
        return LM_E_NOMEM;
    }
    __atomic_add_fetch(&rt->n_recomputed, st.n_recomputed, __ATOMIC_RELAXED);
    __atomic_add_fetch(&rt->n_fixed_point, st.n_exact, __ATOMIC_RELAXED);
    *n_changed = st.n_changed;
    if (st.n_overflow + st.n_nonfinite == 0)
        return LM_OK;
    size_t bad_in = 0; /* non-finite base values (src may be unaligned: a mapping) */
    for (size_t e = 0; e < n; e++) {
        if (src_dt == LM_DT_F32) {
            uint32_t u;
            memcpy(&u, src + 4 * e, 4);
            bad_in += (u & 0x7F800000u) == 0x7F800000u;
        } else {
            uint16_t h;
            memcpy(&h, src + 2 * e, 2);
            const uint16_t m = src_dt == LM_DT_F16 ? 0x7C00u : 0x7F80u;
            bad_in += (h & m) == m;
        }
    }
    /* exactness off counts every infinite result as an overflow, inf base values included */
    const uint64_t made = J->lowrank_flags ? st.n_overflow + st.n_nonfinite : st.n_nonfinite;
    if (made > bad_in)
        lm_fail(err, LM_E_MISMATCH, "NonFiniteResult", "the merged values are not finite (%llu inf/NaN in rows %llu.."
                "%llu): an adapter's delta overflows", (unsigned long long)(made - bad_in), (unsigned long long)r0,
                (unsigned long long)(r0 + nr - 1));
    else if (st.n_overflow > 0 && !J->lowrank_flags)
        lm_fail(err, LM_E_MISMATCH, "NonFiniteResult", "%llu merged values exceed the %s range (they would be "
                "written as inf; rows %llu..%llu)", (unsigned long long)st.n_overflow, lm_dtype_name(od),
                (unsigned long long)r0, (unsigned long long)(r0 + nr - 1));
    else
        return LM_OK;
    lm_err_set_tensor(err, t->name);
    return LM_E_MISMATCH;
}

/* the f64 path's refusals, as check_finite's: ws->acc still holds the base tile (f32, exact),
 * ws->acc64 the results before rounding, ws->out the rounded ones */
static lm_code check_finite64(const job *J, size_t ti, uint64_t r0, uint64_t nr, const workspace *ws, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const size_t n = (size_t)(nr * t->cols);
    const lm_dtype od = lm_exact_out_dtype(t);
    const size_t bad_out = od == LM_DT_F32 ? J->k->count_nonfinite_f32((const float *)(const void *)ws->out, n)
                           : J->k->count_nonfinite_16((const uint16_t *)(const void *)ws->out, n,
                                                      od == LM_DT_F16 ? 0x7C00u : 0x7F80u);
    if (bad_out == 0)
        return LM_OK;
    size_t bad_in = J->k->count_nonfinite_f32(ws->acc, n), bad64 = 0;
    for (size_t e = 0; e < n; e++)
        bad64 += !isfinite(ws->acc64[e]);
    return refuse_nonfinite(t, r0, nr, bad_in, bad64, bad_out, err);
}

/* ------------------------------------------------------------------------------------------ */
/* what the merge changed: per tile, reduced per tensor in task order (so the numbers do not   */
/* depend on the thread count)                                                                  */
/* ------------------------------------------------------------------------------------------ */
struct tile_stat {
    uint64_t n_changed;
    double d2, b2; /* sum of (W' - W)^2 and of W^2 */
};

/* elements of esz bytes that differ between a and b */
static uint64_t count_changed(const lm_kernels *k, const uint8_t *a, const uint8_t *b, size_t n, size_t esz)
{
    if (esz == 2)
        return k->count_diff_16((const uint16_t *)(const void *)a, (const uint16_t *)(const void *)b, n);
    if (esz == 4)
        return k->count_diff_32((const uint32_t *)(const void *)a, (const uint32_t *)(const void *)b, n);
    uint64_t c = 0;
    if (esz == 1) { /* 8-bit codes */
        for (size_t i = 0; i < n; i++)
            c += a[i] != b[i];
        return c;
    }
    for (size_t i = 0; i < n; i++)
        c += memcmp(a + i * esz, b + i * esz, esz) != 0;
    return c;
}

/* The base's own values of rows [r0, r0 + nr) of tensor ti as f32 into dst, when its tiles start
 * from a replacement (modules_to_save, LN tuning ...).  @return the number of those rows the base
 * has (the others are new: an added tensor, a resized vocabulary), or UINT64_MAX on a read error */
static uint64_t load_base_rows(const job *J, size_t ti, float *dst, uint8_t *raw, uint64_t r0, uint64_t nr,
                               lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    if (t->base == NULL)
        return 0;
    const lm_tensor_info *bt = t->base->info;
    uint64_t base_rows = bt->n_dims ? bt->shape[0] : 1, cols = t->cols;
    uint64_t have = r0 >= base_rows ? 0 : (r0 + nr <= base_rows ? nr : base_rows - r0);
    if (have == 0 || (base_rows ? bt->n_elems / base_rows : 0) != cols)
        return 0;
    size_t esz = lm_dtype_bits(bt->dtype) / 8;
    const lm_st_file *f = lm_model_file(J->model, t->base->file);
    uint64_t rel = r0 * cols * esz, n_bytes = have * cols * esz;
    const uint8_t *src = lm_st_data(f) + bt->begin + rel;
    if (lm_st_fd(f) >= 0) {
        if (lm_base_pread(f, lm_st_data_offset(f) + bt->begin + rel, raw, n_bytes, t->name, err) != LM_OK)
            return UINT64_MAX;
        src = raw;
    }
    to_f32(J->k, bt->dtype, src, dst, (size_t)(have * cols));
    return have;
}

/* before the ops: the base tile as it would be written (and in f32 for the norms), from src, the
 * tile's input bytes; *base_bytes receives where it is (ws->base_out, or src itself when
 * src_stays: the caller keeps src intact until stats_after), *n_base how many of the n elements
 * the base has (the rest count as changed) */
static lm_code stats_before(const job *J, size_t ti, const workspace *ws, const uint8_t *src, int src_stays,
                            uint64_t r0, uint64_t nr, size_t n, const uint8_t **base_bytes, size_t *n_base, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    size_t esz = lm_dtype_bits(t->dtype) / 8;
    *base_bytes = ws->base_out;
    if (t->n_ops == 0 || t->ops[0].kind != LM_OP_REPLACE) { /* src holds the base */
        *n_base = n;
        if (J->stats_norms || t->dtype != t->src_dtype)
            src_to_f32(J, ti, src, r0, nr, ws->base_f32);
        if (t->q != NULL && t->dtype == t->src_dtype)
            *base_bytes = NULL; /* codes kept quantized: the requantizer counts the changes */
        else if (t->dtype == t->src_dtype && src_stays && (uintptr_t)src % esz == 0)
            *base_bytes = src; /* the bytes read are the base as written: no copy */
        else if (t->dtype == t->src_dtype)
            memcpy(ws->base_out, src, n * esz);
        else
            from_f32(J->k, t->dtype, ws->base_f32, ws->base_out, n);
        return LM_OK;
    }
    uint64_t rows = load_base_rows(J, ti, ws->base_f32, ws->base_out, r0, nr, err);
    if (rows == UINT64_MAX)
        return LM_E_IO;
    *n_base = (size_t)(rows * t->cols);
    memset(ws->base_f32 + *n_base, 0, (n - *n_base) * sizeof(float));
    from_f32(J->k, t->dtype, ws->base_f32, ws->base_out, *n_base);
    return LM_OK;
}

/* the tile's values as written (ws->out), in f32: exact for every output dtype but F64, whose
 * values are the f32 tile widened (only the non-exact path writes F64) */
static const float *written_f32(const job *J, const lm_plan_tensor *t, const workspace *ws, uint64_t r0, size_t n)
{
    if (t->dtype == LM_DT_F32)
        return (const float *)(const void *)ws->out;
    if (t->dtype == LM_DT_F64)
        return ws->acc;
    if (t->q != NULL && t->dtype == t->src_dtype) { /* the codes written, with the tile's new scales */
        lm_xq_dequant_written(t, ws->qscales, ws->out, r0, n / t->cols, ws->scratch);
        return ws->scratch;
    }
    to_f32(J->k, t->dtype, ws->out, ws->scratch, n); /* the methods' scratch is free again */
    return ws->scratch;
}

/* after the ops and the rounding: the counts and norms of the values written */
static void stats_after(const job *J, const lm_plan_tensor *t, const workspace *ws, const uint8_t *base_bytes,
                        uint64_t r0, size_t n, size_t n_base, struct tile_stat *ts)
{
    if (base_bytes != NULL)
        ts->n_changed = count_changed(J->k, ws->out, base_bytes, n_base, lm_dtype_bits(t->dtype) / 8) + (n - n_base);
    if (J->stats_norms) { /* the differences in f32 (rounded once each), their squares summed in double */
        const float *w = written_f32(J, t, ws, r0, n);
        for (size_t i = 0; i < n; i++)
            ws->scratch[i] = w[i] - ws->base_f32[i];
        ts->d2 = J->k->sumsq(ws->scratch, n);
        ts->b2 = J->k->sumsq(ws->base_f32, n);
    }
}

/* the tiles' numbers summed per tensor, in task order */
static void stats_reduce(const job *J, const task *tasks, size_t n_tasks, lm_tensor_stats *out)
{
    const lm_plan *plan = J->plan;
    memset(out, 0, plan->n * sizeof *out);
    double *d2 = calloc(plan->n + 1, sizeof *d2), *b2 = calloc(plan->n + 1, sizeof *b2);
    for (size_t q = 0; q < n_tasks; q++) {
        if (tasks[q].copy)
            continue;
        size_t i = tasks[q].tensor;
        lm_tensor_stats *st = &out[i];
        st->valid = 1;
        st->n_elems += tasks[q].count * plan->t[i].cols;
        st->n_changed += J->tstat[q].n_changed;
        if (d2 != NULL && b2 != NULL) {
            d2[i] += J->tstat[q].d2;
            b2[i] += J->tstat[q].b2;
        }
    }
    for (size_t i = 0; i < plan->n && d2 != NULL && b2 != NULL; i++)
        if (out[i].valid && J->stats_norms) {
            out[i].has_norms = 1;
            out[i].delta_norm = sqrt(d2[i]);
            out[i].base_norm = sqrt(b2[i]);
        }
    free(d2);
    free(b2);
    for (size_t i = 0; i < plan->n; i++) {
        const lm_qstats *q = &J->rt[i].qst;
        if (!out[i].valid || q->n_blocks == 0)
            continue;
        out[i].has_quant = 1;
        out[i].q_blocks = q->n_blocks;
        out[i].q_blocks_kept = q->n_blocks_kept;
        out[i].q_err_max = q->err_max;
        out[i].q_err_mean = q->n_err ? q->err_sum / (double)q->n_err : 0.0;
        out[i].q_delta_norm = sqrt(q->d2);
        out[i].q_err_norm = sqrt(q->e2);
    }
}

/* a tile's requantization numbers into its tensor's */
static void quant_stats_add(job *J, size_t ti, const lm_qstats *qs)
{
    pthread_mutex_lock(J->prep_lock);
    lm_qstats *d = &J->rt[ti].qst;
    d->n_changed += qs->n_changed;
    d->n_blocks += qs->n_blocks;
    d->n_blocks_kept += qs->n_blocks_kept;
    d->err_max = qs->err_max > d->err_max ? qs->err_max : d->err_max;
    d->err_sum += qs->err_sum;
    d->n_err += qs->n_err;
    d->d2 += qs->d2;
    d->e2 += qs->e2;
    pthread_mutex_unlock(J->prep_lock);
}

/* compute_tile_certify() for a method with certify_tile: the bound and the rounding in one sweep
 * (ws->acc, the input, left intact) */
static lm_code compute_tile_certify1(const job *J, size_t ti, uint64_t r0, uint64_t nr, const workspace *ws,
                                     struct tile_stat *ts, const uint8_t *base_bytes, size_t n_base, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const size_t n = (size_t)(nr * t->cols);
    const lm_op *op = &t->ops[0];
    const lm_tile tile = {ws->acc, NULL, r0, nr, t->rows, t->cols, J->k}; /* no scratch: src stays (compute_tile) */
    lm_cert_counts cs = {0};
    if (op->method->certify_tile(op, &J->rt[ti].prep[0], &tile, lm_kdtype_of(lm_exact_out_dtype(t)), (uint16_t *)(void *)ws->out,
                                 &cs) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory for a tile of '%s'", t->name);
        return LM_E_NOMEM;
    }
    __atomic_add_fetch(&J->rt[ti].n_recomputed, cs.n_recomputed, __ATOMIC_RELAXED);
    if (ts != NULL)
        stats_after(J, t, ws, base_bytes, r0, n, n_base, ts);
    if (cs.n_overflow + cs.n_nonfinite == 0)
        return LM_OK;
    const size_t bad_in = J->k->count_nonfinite_f32(ws->acc, n);
    return refuse_nonfinite(t, r0, nr, bad_in, (size_t)cs.n_nonfinite, bad_in + (size_t)cs.n_overflow, err);
}

/* compute_tile_certify1() from the tile's input bytes src (intact), converted and, ts not NULL,
 * the changes counted in the method's kernel (certify_raw: no f32 tile, no count pass) */
static lm_code compute_tile_certify_raw(const job *J, size_t ti, uint64_t r0, uint64_t nr, const uint8_t *src,
                                        const workspace *ws, struct tile_stat *ts, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const lm_op *op = &t->ops[0];
    const lm_tile tile = {NULL, NULL, r0, nr, t->rows, t->cols, J->k};
    lm_cert_counts cs = {0};
    uint64_t changed = 0;
    if (op->method->certify_raw(op, &J->rt[ti].prep[0], &tile, src, lm_kdtype_of(t->src_dtype),
                                lm_kdtype_of(lm_exact_out_dtype(t)), (uint16_t *)(void *)ws->out, &cs,
                                ts != NULL ? &changed : NULL) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory for a tile of '%s'", t->name);
        return LM_E_NOMEM;
    }
    __atomic_add_fetch(&J->rt[ti].n_recomputed, cs.n_recomputed, __ATOMIC_RELAXED);
    if (ts != NULL)
        ts->n_changed = changed;
    if (cs.n_overflow + cs.n_nonfinite == 0)
        return LM_OK;
    src_to_f32(J, ti, src, r0, nr, ws->acc); /* the base tile, for the refusal's count */
    const size_t bad_in = J->k->count_nonfinite_f32(ws->acc, (size_t)(nr * t->cols));
    return refuse_nonfinite(t, r0, nr, bad_in, (size_t)cs.n_nonfinite, bad_in + (size_t)cs.n_overflow, err);
}

/* LM_EXACT_F64, the certified f32 form (lm_exact_certify_fast): ws->acc holds the input tile; the
 * op's f32 result and bounds, then the output bits, the uncertain elements from f64 (exec_exact.h).
 * The input tile and the bounds live in ws->acc64 (room for 2 n floats) */
static lm_code compute_tile_certify(const job *J, size_t ti, uint64_t r0, uint64_t nr, const workspace *ws,
                                    struct tile_stat *ts, const uint8_t *base_bytes, size_t n_base, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const size_t n = (size_t)(nr * t->cols);
    const lm_op *op = &t->ops[0];
    const lm_prepared *p = &J->rt[ti].prep[0];
    lm_certify_stats cs = {0};
    if (op->method->certify_tile != NULL) /* one sweep; ws->acc stays the input */
        return compute_tile_certify1(J, ti, r0, nr, ws, ts, base_bytes, n_base, err);
    float *in = (float *)(void *)ws->acc64, *bound = in + n;
    memcpy(in, ws->acc, n * sizeof *in);
    /* 16 rows at a time (whole row groups), so that the input rows are still in
     * cache when the uncertain elements are recomputed from them */
    uint64_t sub = 16, g = op->row_align > 1 ? op->row_align : 1; /* rot_blocks does 8 rows at once */
    sub = sub < g ? g : sub - sub % g;
    for (uint64_t q = 0; q < nr; q += sub) {
        const uint64_t k = nr - q < sub ? nr - q : sub;
        const size_t e0 = (size_t)(q * t->cols);
        const lm_tile tile = {ws->acc + e0, ws->scratch, r0 + q, k, t->rows, t->cols, J->k};
        op->method->apply_tile_bound(op, p, &tile, bound + e0);
        lm_exact_certify_tile(op, p, ws->acc + e0, bound + e0, in + e0, r0 + q, k, t->cols, lm_kdtype_of(lm_exact_out_dtype(t)),
                              (uint16_t *)(void *)ws->out + e0, &cs);
    }
    __atomic_add_fetch(&J->rt[ti].n_recomputed, cs.n_recomputed, __ATOMIC_RELAXED);
    if (ts != NULL)
        stats_after(J, t, ws, base_bytes, r0, n, n_base, ts);
    if (cs.n_overflow + cs.n_nonfinite == 0)
        return LM_OK;
    const size_t bad_in = J->k->count_nonfinite_f32(in, n);
    return refuse_nonfinite(t, r0, nr, bad_in, (size_t)cs.n_nonfinite, bad_in + (size_t)cs.n_overflow, err);
}

/* the DoRA path (exec_dora.h): base rows in f32 (ws->acc, exact) -> output bytes; the same
 * refusals as check_finite (a finite value beyond the output's range, inf/NaN the base did not
 * have).  raw (or NULL: ws->acc holds the f32 tile): the tile's input bytes, converted a block
 * of rows at a time.  base (or NULL): the tile's base bytes in the output dtype, *changed then
 * the elements written that differ.  The f64 rows go to the scratch after the tile's input bytes
 * (which the statistics may still read there) */
static lm_code compute_tile_dora(const job *J, size_t ti, uint64_t r0, uint64_t nr, const workspace *ws,
                                 const uint8_t *raw, const uint8_t *base, uint64_t *changed, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    tensor_rt *rt = &J->rt[ti];
    lm_dora_stats st = {0};
    /* the input bytes take at most n floats (4-byte dtypes at most here), lm_dora_ws_doubles(nr,
     * cols) at most 2 n: within the scratch's 4 max_elems + 64 floats */
    const size_t n = (size_t)(nr * t->cols);
    if (lm_dora_tensor_run(rt->dora, J->k, raw != NULL ? NULL : ws->acc, raw, r0, nr, rt->col_scale, ws->out,
                           lm_kdtype_of(lm_exact_out_dtype(t)), base, (double *)(void *)(ws->scratch + ((n + 1) & ~(size_t)1)),
                           &st) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory for a DoRA row");
        lm_err_set_tensor(err, t->name);
        return LM_E_NOMEM;
    }
    __atomic_add_fetch(&rt->n_recomputed, st.n_uncertified, __ATOMIC_RELAXED);
    if (changed != NULL)
        *changed = st.n_changed;
    if (st.n_overflow + st.n_nonfinite == 0)
        return LM_OK;
    if (raw != NULL) /* the base tile in f32, for the refusal's count */
        src_to_f32(J, ti, raw, r0, nr, ws->acc);
    const size_t bad_in = J->k->count_nonfinite_f32(ws->acc, n);
    return refuse_nonfinite(t, r0, nr, bad_in, (size_t)st.n_nonfinite, bad_in + (size_t)st.n_overflow, err);
}

/* a block FP8 weight kept quantized whose ops are all low-rank: its tiles are dequantized, merged
 * and requantized one block at a time (lm_xq_merge_tile), certified (rt->xqb) or with exactness
 * off or no certified path (exec_exact.h) */
static int fused_tile(const job *J, size_t ti)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const tensor_rt *rt = &J->rt[ti];
    if (!lm_xq_fused(t) || rt->dora != NULL || t->n_ops == 0)
        return 0;
    for (size_t o = 0; o < t->n_ops; o++)
        if (t->ops[o].kind != LM_OP_LOWRANK)
            return 0;
    return rt->exact_kind == LM_EXACT_NONE || J->lowrank_flags || rt->xqb != NULL;
}

/* lm_fp8_exact_fn of the certified fused tiles: the exact value (f32) by an f64 evaluation, or
 * the low-rank path's when that does not settle it (its factors then made) */
typedef struct {
    const lm_xq_term *term;
    uint64_t cols, bc;
    lm_lowrank_tensor *f;
    int failed; /* out of memory for the factors */
} fused_exact_ctx;

static float fused_exact(void *arg, uint64_t row, uint64_t col, float w)
{
    fused_exact_ctx *c = arg;
    float x = 0.0f;
    if (lm_xq_exact(c->term, c->cols, c->bc, row, col, w, &x) != 0 && lm_lowrank_tensor_exact_f32(c->f, row, col, w, &x) != 0)
        c->failed = 1;
    return x;
}

typedef struct {
    const job *J;
    size_t ti;
    float *acc;
    uint64_t r0;
} fused_ctx;

/* lm_xq_apply_fn: the low-rank ops on rows rr .. rr + h, columns c0 .. c0 + w of the tile */
static void fused_apply(void *arg, uint64_t rr, uint64_t h, uint64_t c0, uint64_t w)
{
    const fused_ctx *c = arg;
    const lm_plan_tensor *t = &c->J->plan->t[c->ti];
    const lm_tile tile = {c->acc + rr * t->cols, NULL, c->r0 + rr, h, t->rows, t->cols, c->J->k};
    for (size_t o = 0; o < t->n_ops; o++)
        op_lowrank(&t->ops[o], &c->J->rt[c->ti].prep[o], &tile, c0, w);
}

/* fused_tile()'s tiles: src (the codes) stays intact, ws->acc ends as the merged tile, so the
 * statistics and the refusals are check_finite's as for the other tiles */
static lm_code compute_tile_fused(job *J, size_t ti, uint64_t r0, uint64_t nr, const uint8_t *src,
                                  const workspace *ws, struct tile_stat *ts, lm_xq_piece *pieces, size_t *n_pieces,
                                  lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const size_t n = (size_t)(nr * t->cols);
    const uint8_t *base_bytes = NULL;
    size_t n_base = 0;
    if (ts != NULL && stats_before(J, ti, ws, src, 1, r0, nr, n, &base_bytes, &n_base, err) != LM_OK)
        return LM_E_IO;
    fused_ctx c = {J, ti, ws->acc, r0};
    lm_qstats qs = {0};
    tensor_rt *rt = &J->rt[ti];
    fused_exact_ctx fx = {NULL, t->cols, t->q->bc, rt->exact, 0};
    const lm_op *op = &t->ops[0]; /* one op not transposed: the kernels' two passes (lm_xq_merge_tile) */
    const lm_xq_term term = {rt->prep[0].b, rt->prep[0].a, op->rank, op->row0, op->out, (float)op->scale,
                             op->scale, rt->xq_apack, rt->xqb, fused_exact, &fx};
    fx.term = &term;
    *n_pieces = lm_xq_merge_tile(t, J->k, rt->qscale, src, r0, nr, ws->acc,
                                 t->n_ops == 1 && !op->axis ? &term : NULL, fused_apply, &c,
                                 ws->out, ws->qscales, &qs, pieces);
    if (rt->xqb != NULL) { /* the rows done with the exact path's factors (freed after the last) */
        lm_lowrank_tensor_done(rt->exact, r0, nr);
        __atomic_add_fetch(&rt->n_recomputed, qs.n_exact, __ATOMIC_RELAXED);
        if (fx.failed) {
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the low-rank factors");
            lm_err_set_tensor(err, t->name);
            return LM_E_NOMEM;
        }
    }
    quant_stats_add(J, ti, &qs);
    if (ts != NULL) {
        ts->n_changed = qs.n_changed;
        stats_after(J, t, ws, base_bytes, r0, n, n_base, ts);
    }
    return qs.n_nonfinite_blocks == 0 ? LM_OK : check_finite(J, ti, r0, nr, ws, err);
}

/* The certified paths from the f32 tile in ws->acc (exact: a quantized weight's dequantized
 * tile) to ws->out in lm_exact_out_dtype(t), with their refusals (exec_exact.h); the elements
 * recomputed counted in the tensor's rt. */
static lm_code exact_values(const job *J, size_t ti, uint64_t r0, uint64_t nr, const workspace *ws, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    tensor_rt *rt = &J->rt[ti];
    const size_t n = (size_t)(nr * t->cols);
    lm_code rc;
    if (rt->exact_kind == LM_EXACT_LOWRANK) {
        uint64_t changed; /* (the statistics compare the bytes) */
        rc = compute_tile_exact(J, ti, r0, nr, (const uint8_t *)ws->acc, LM_DT_F32, ws, &changed, err);
    } else if (rt->dora != NULL) {
        rc = compute_tile_dora(J, ti, r0, nr, ws, NULL, NULL, NULL, err);
    } else if (rt->exact_kind == LM_EXACT_F64 && !J->lowrank_flags && lm_exact_certify_fast(t)) {
        rc = compute_tile_certify(J, ti, r0, nr, ws, NULL, NULL, 0, err);
        if (t->ops[0].method->certify_tile == NULL) /* (certify_tile leaves ws->acc intact) */
            memcpy(ws->acc, ws->acc64, n * sizeof *ws->acc); /* the input tile again (the checks' base) */
    } else if (rt->exact_kind == LM_EXACT_F64 && !J->lowrank_flags) {
        const lm_tile64 t64 = {ws->acc64, ws->scratch64, r0, nr, t->rows, t->cols, J->k};
        J->k->f32_to_f64(ws->acc, ws->acc64, n);
        lm_exact_f64_apply(t, rt->prep, rt->col_scale, 0, t->n_ops, &t64);
        J->k->f64_round(ws->acc64, ws->out, lm_kdtype_of(lm_exact_out_dtype(t)), n);
        __atomic_add_fetch(&rt->n_recomputed, (uint64_t)n, __ATOMIC_RELAXED);
        rc = check_finite64(J, ti, r0, nr, ws, err);
    } else { /* LM_EXACT_SCALE, or exactness off: f32 ops, rounded once */
        lm_tile tile = {ws->acc, ws->scratch, r0, nr, t->rows, t->cols, J->k};
        const lm_dtype od = lm_exact_out_dtype(t);
        if (rt->exact_kind == LM_EXACT_SCALE)
            __atomic_add_fetch(&rt->n_recomputed,
                               lm_exact_scale_tile(ws->acc, r0, nr, t->cols, rt->prep[0].a, t->ops[0].axis,
                                                   lm_kdtype_of(od), !J->lowrank_flags),
                               __ATOMIC_RELAXED);
        else
            apply_ops(J, ti, 0, t->n_ops, &tile);
        from_f32(J->k, od, ws->acc, ws->out, n);
        rc = LM_OK; /* the caller's check_finite */
    }
    return rc;
}

/* A quantized weight on a certified path (exec_exact.h): ws->acc holds its dequantized tile.
 * --dtype: its exact values rounded once are the output.  Kept quantized: they are rounded once
 * to the rule's input dtype (lm_exact_out_dtype), widened into ws->acc, and requantized. */
static lm_code compute_tile_qexact(job *J, size_t ti, uint64_t r0, uint64_t nr, const workspace *ws,
                                   struct tile_stat *ts, const uint8_t *base_bytes, size_t n_base, lm_xq_piece *pieces,
                                   size_t *n_pieces, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const size_t n = (size_t)(nr * t->cols);
    const int requant = t->dtype == t->src_dtype;
    if (exact_values(J, ti, r0, nr, ws, err) != LM_OK)
        return err->code;
    lm_qstats qs = {0};
    if (requant) {
        to_f32(J->k, lm_exact_out_dtype(t), ws->out, ws->acc, n);
        *n_pieces = lm_xq_requant(t, J->rt[ti].qscale, ws->acc, ws->codes, r0, nr, ws->out, ws->qscales, &qs, pieces);
        quant_stats_add(J, ti, &qs);
    }
    if (ts != NULL) {
        ts->n_changed = qs.n_changed;
        stats_after(J, t, ws, base_bytes, r0, n, n_base, ts);
    }
    return check_finite(J, ti, r0, nr, ws, err);
}

/* tensor ti's tiles take compute_tile_certify1: a method's one-sweep certification, which leaves
 * the scratch, and so the input bytes read there, intact */
static int certify1_tile(const job *J, size_t ti)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    return t->q == NULL && J->rt[ti].exact_kind == LM_EXACT_F64 && !J->lowrank_flags && lm_exact_certify_fast(t) &&
           t->ops[0].method->certify_tile != NULL;
}

/* a certify1_tile() tile that takes the method's certify_raw: the statistics it needs are the
 * changed count (one dtype in and out) or none */
static int certify_raw_tile(const job *J, size_t ti, const uint8_t *src, const struct tile_stat *ts)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    return certify1_tile(J, ti) && t->ops[0].method->certify_raw != NULL && !t->sim_nf4 &&
           (uintptr_t)src % (lm_dtype_bits(t->src_dtype) / 8) == 0 &&
           (ts == NULL || (!J->stats_norms && t->dtype == t->src_dtype));
}

/* a DoRA tile whose input bytes (src, intact: the rows go after them) are the base as written,
 * which the DoRA kernel compares with what it stores (one dtype in and out, no norms asked) */
static int dora_counts(const job *J, const lm_plan_tensor *t, const uint8_t *src)
{
    return t->dtype == t->src_dtype && !J->stats_norms && (t->n_ops == 0 || t->ops[0].kind != LM_OP_REPLACE) &&
           (uintptr_t)src % (lm_dtype_bits(t->dtype) / 8) == 0;
}

/* shared: the tile's input bytes, read once for every job of a batch (NULL: read here) */
static lm_code compute_tile(job *J, size_t ti, uint64_t r0, uint64_t nr, const uint8_t *shared, const workspace *ws,
                            struct tile_stat *ts, lm_xq_piece *pieces, size_t *n_pieces, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    size_t n = (size_t)(nr * t->cols), n_base = 0;
    const uint8_t *base_bytes = NULL;
    if (tensor_prepare(J, ti, err) != LM_OK)
        return err->code;
    prepare_ahead(J, ti);
    const uint8_t *src = shared ? shared : tile_bytes(J, ti, (uint8_t *)ws->scratch, r0, nr, err);
    if (src == NULL)
        return LM_E_IO;
    if (J->rt[ti].exact_kind == LM_EXACT_LOWRANK && t->q == NULL) { /* base bytes -> output bytes; the statistics from the bytes written */
        /* one dtype in and out: the kernel counts the changed elements as it stores them (no
         * second pass over the tile); else they are compared after */
        const int kernel_counts = t->dtype == t->src_dtype && !t->sim_nf4 && !J->stats_norms;
        if (ts != NULL && !kernel_counts && stats_before(J, ti, ws, src, 1, r0, nr, n, &base_bytes, &n_base, err) != LM_OK)
            return LM_E_IO;
        const uint8_t *xsrc = src;
        if (t->sim_nf4) { /* the NF4 round trip, exactly in the base's dtype (qscales: unused here) */
            src_to_f32(J, ti, src, r0, nr, ws->acc);
            from_f32(J->k, t->src_dtype, ws->acc, ws->qscales, n);
            xsrc = (const uint8_t *)ws->qscales;
        }
        uint64_t changed = 0;
        lm_code rc = compute_tile_exact(J, ti, r0, nr, xsrc, t->src_dtype, ws, &changed, err); /* src stays intact */
        if (rc == LM_OK && ts != NULL && kernel_counts)
            ts->n_changed = changed;
        else if (rc == LM_OK && ts != NULL)
            stats_after(J, t, ws, base_bytes, r0, n, n_base, ts);
        return rc;
    }
    if (fused_tile(J, ti))
        return compute_tile_fused(J, ti, r0, nr, src, ws, ts, pieces, n_pieces, err);
    const int dora = J->rt[ti].dora != NULL && t->q == NULL, src_stays = dora || certify1_tile(J, ti);
    if (dora && ts != NULL && dora_counts(J, t, src)) { /* the input bytes, converted and counted in the kernels */
        uint64_t changed = 0;
        lm_code rc = compute_tile_dora(J, ti, r0, nr, ws, src, src, &changed, err);
        ts->n_changed = changed;
        return rc;
    }
    if (certify_raw_tile(J, ti, src, ts))
        return compute_tile_certify_raw(J, ti, r0, nr, src, ws, ts, err);
    src_to_f32(J, ti, src, r0, nr, ws->acc);
    const int requant = t->q != NULL && t->dtype == t->src_dtype;
    if (requant) /* src may be in the scratch the methods use */
        memcpy(ws->codes, src, (size_t)(nr * t->q->row_bytes));
    /* src may be in the scratch the methods use (not src_stays'): the base bytes are copied */
    if (ts != NULL && stats_before(J, ti, ws, src, src_stays, r0, nr, n, &base_bytes, &n_base, err) != LM_OK)
        return LM_E_IO;
    if (t->q != NULL && J->rt[ti].exact_kind != LM_EXACT_NONE)
        return compute_tile_qexact(J, ti, r0, nr, ws, ts, base_bytes, n_base, pieces, n_pieces, err);
    if (dora) { /* low-rank and DoRA ops, certified (exec_dora.h) */
        lm_code rc = compute_tile_dora(J, ti, r0, nr, ws, NULL, NULL, NULL, err);
        if (rc == LM_OK && ts != NULL)
            stats_after(J, t, ws, base_bytes, r0, n, n_base, ts);
        return rc;
    }
    if (J->rt[ti].exact_kind == LM_EXACT_F64 && !J->lowrank_flags && lm_exact_certify_fast(t))
        return compute_tile_certify(J, ti, r0, nr, ws, ts, base_bytes, n_base, err);
    if (J->rt[ti].exact_kind == LM_EXACT_F64 && !J->lowrank_flags) { /* f64 ops, one rounding (exec_exact.h) */
        const lm_tile64 t64 = {ws->acc64, ws->scratch64, r0, nr, t->rows, t->cols, J->k};
        J->k->f32_to_f64(ws->acc, ws->acc64, n); /* ws->acc keeps the base tile for the checks */
        lm_exact_f64_apply(t, J->rt[ti].prep, J->rt[ti].col_scale, 0, t->n_ops, &t64);
        J->k->f64_round(ws->acc64, ws->out, lm_kdtype_of(t->dtype), n);
        __atomic_add_fetch(&J->rt[ti].n_recomputed, (uint64_t)n, __ATOMIC_RELAXED);
        if (ts != NULL)
            stats_after(J, t, ws, base_bytes, r0, n, n_base, ts);
        return check_finite64(J, ti, r0, nr, ws, err);
    }
    lm_tile tile = {ws->acc, ws->scratch, r0, nr, t->rows, t->cols, J->k};
    if (J->rt[ti].exact_kind == LM_EXACT_SCALE) /* one rounding of the exact product (exec_exact.h) */
        __atomic_add_fetch(&J->rt[ti].n_recomputed,
                           lm_exact_scale_tile(ws->acc, r0, nr, t->cols, J->rt[ti].prep[0].a, t->ops[0].axis,
                                               lm_kdtype_of(t->dtype), !J->lowrank_flags),
                           __ATOMIC_RELAXED);
    else
        apply_ops(J, ti, 0, t->n_ops, &tile);
    lm_qstats qs = {0};
    if (requant) {
        *n_pieces = lm_xq_requant(t, J->rt[ti].qscale, ws->acc, ws->codes, r0, nr, ws->out, ws->qscales, &qs, pieces);
        quant_stats_add(J, ti, &qs);
    } else {
        from_f32(J->k, t->dtype, ws->acc, ws->out, n);
    }
    if (ts != NULL) {
        ts->n_changed = qs.n_changed;
        stats_after(J, t, ws, base_bytes, r0, n, n_base, ts);
    }
    if (requant && t->q->fmt == LM_Q_FP8_BLOCK && qs.n_nonfinite_blocks == 0)
        return LM_OK; /* block FP8's requantizer saw every value finite (its amax): no second scan */
    return check_finite(J, ti, r0, nr, ws, err);
}

/* the base file no longer holds `end` bytes: it was truncated during the merge */
static int base_shrank(const lm_st_file *f, uint64_t end)
{
    struct stat st;
    return fstat(lm_st_fd(f), &st) == 0 && (uint64_t)st.st_size < end;
}

static lm_code base_ended(const lm_st_file *f, const char *tensor, lm_err *err)
{
    lm_fail(err, LM_E_IO, "InputChanged", "the file ends inside tensor '%s': it was truncated while the merge read "
            "it; nothing was written", tensor);
    lm_err_set_path(err, lm_st_path(f));
    return LM_E_IO;
}

/* A tile of rows (e, o) of a weight written as [E, in, out] (gpt-oss MXFP4 experts with --dtype,
 * plan_quant_mx.c): per expert the tile covers, its k rows go transposed into columns o .. o + k
 * of that expert's `in` rows, one write per row (buf: room for the tile). */
static lm_code write_transposed(lm_st_writer *w, uint64_t dst, const lm_plan_tensor *t, const uint8_t *out, uint64_t r0,
                                uint64_t nr, uint8_t *buf, lm_err *err)
{
    const uint64_t O = t->q->view.shape[1], In = t->cols;
    const size_t esz = lm_dtype_bits(t->dtype) / 8;
    for (uint64_t r = r0; r < r0 + nr;) {
        const uint64_t e = r / O, o0 = r % O, k = O - o0 < r0 + nr - r ? O - o0 : r0 + nr - r;
        for (uint64_t i = 0; i < k; i++)
            for (uint64_t h = 0; h < In; h++)
                memcpy(buf + (h * k + i) * esz, out + ((r - r0 + i) * In + h) * esz, esz);
        for (uint64_t h = 0; h < In; h++)
            if (lm_st_writer_pwrite(w, buf + h * k * esz, (size_t)(k * esz), dst + ((e * In + h) * O + o0) * esz,
                                    err) != LM_OK)
                return err->code;
        r += k;
    }
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* the write queue: one thread writes an output at a time                                     */
/* ------------------------------------------------------------------------------------------ */
/* Writes into one file take its inode lock for the whole copy into the page cache (ext4), so two
 * threads writing at once take turns, and the one waiting spins on the lock.  Instead a thread
 * with a finished tile queues it and, when no thread is writing that job's files, takes the
 * writer's role for them and writes their queue (its lane) until it is empty; when one is, it
 * goes on to its next tile in another of its buffers (WQ_BUFS), waiting only when all of them
 * are queued.  The copies of unchanged tensors are queued too (no buffer) and done by the writer
 * in slices, the queued tiles first, so that a copy never keeps a computing thread waiting for a
 * buffer long.  A batch has a lane per job: its K outputs are written by as many threads at once
 * (writing its outputs is most of a batch's work; one writer for all of them left the other
 * threads waiting for their buffers).  Same bytes at the same offsets as before: the order of the
 * writes is all that changes. */
/* bytes of a copy done before the queued tiles are looked at again.  With 4 MB (~2 ms of
 * copy_file_range here) the 1b merge's first ~130 ms of writing (its 131 MB embedding copied while
 * layer 0's tiles are computed) ran at ~1.4 of 2 cores: the computing thread found its buffers all
 * queued and waited out each slice; with 1 MB at ~1.9, and the merge 6% faster */
#define WQ_SLICE ((uint64_t)1 << 20)

typedef struct {
    job *J;
    size_t jb;          /* the job's index in the batch (the failed job) */
    lm_st_writer *w;    /* a tile's file */
    const uint8_t *buf; /* a tile's bytes, or NULL: a copy task */
    uint64_t n, off;    /* a tile: bytes and where they go; a copy: bytes done so far (off) */
    const task *tk;     /* a copy: its task */
    int *busy;          /* a tile: its buffer's count of queued writes, decremented once written */
} wq_item;

/* one job's writes (all of its files) */
typedef struct {
    wq_item *tiles;       /* ring of cap_tiles (every queued write holds a busy buffer: never full) */
    size_t cap_tiles, head_tiles, n_tiles;
    wq_item *copies;      /* [head_copies, n_copies) queued, cap_copies never exceeded (no move) */
    size_t head_copies, n_copies, cap_copies;
    int writing;          /* a thread holds the lane's writer's role; 0: the lane is empty */
} wq_lane;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;    /* a buffer was written, or a role was given up */
    wq_lane *lanes;       /* one per job */
    size_t n_lanes;
    int role_waiters;     /* threads waiting in wq_role_take() */
    int io;               /* writer threads (wq_io_worker) write the lanes, the workers only queue */
    int io_stop;          /* the workers are done: the writer threads end once the lanes are empty */
    pthread_cond_t io_cv; /* a write was queued, or io_stop */
    int failed;           /* the first error of the run (err, failed_job); queued writes after it are dropped */
    lm_err err;
    size_t failed_job;
} wqueue;

/* the run's first error; q->mu held */
static void wq_fail_locked(wqueue *q, const lm_err *e, size_t jb)
{
    if (!q->failed) {
        q->err = *e;
        q->failed_job = jb;
        __atomic_store_n(&q->failed, 1, __ATOMIC_RELEASE);
    }
}

static void wq_fail(wqueue *q, const lm_err *e, size_t jb)
{
    pthread_mutex_lock(&q->mu);
    wq_fail_locked(q, e, jb);
    pthread_mutex_unlock(&q->mu);
}

static int wq_failed(wqueue *q)
{
    return __atomic_load_n(&q->failed, __ATOMIC_ACQUIRE);
}

/* bytes [from, from + count) of copy task tk (counted from its first byte): copy_file_range, in the
 * kernel (the bytes never pass through, or stay in, this process); plain writes from the mapping
 * where the kernel cannot */
static lm_code copy_task_bytes(const job *J, const task *tk, uint64_t from, uint64_t count, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[tk->tensor];
    lm_st_writer *w = J->w[J->shard_of ? J->shard_of[tk->tensor] : 0];
    const uint64_t dst = lm_st_writer_tensor_offset(w, J->local[tk->tensor]) + tk->first + from;
    const uint8_t *src = tensor_src_bytes(J, tk->tensor) + tk->first + from;
    const lm_st_file *f = tensor_src_file(J, tk->tensor);
    if (f == NULL || lm_st_fd(f) < 0)
        return lm_st_writer_pwrite(w, src, (size_t)count, dst, err);
    loff_t in = (loff_t)(lm_st_data_offset(f) + t->base->info->begin + tk->first + from);
    if (lm_st_writer_is_direct(w)) { /* read and written directly: no page cache for OUT */
        uint64_t copied = 0;
        lm_code rc = lm_st_writer_copy_fd(w, lm_st_fd(f), lm_st_path(f), (uint64_t)in, count, dst, &copied, err);
        return rc == LM_OK && copied < count ? base_ended(f, t->name, err) : rc;
    }
    loff_t outp = (loff_t)dst;
    uint64_t left = count;
    while (left > 0) {
        const uint64_t at = (uint64_t)outp;
        ssize_t k = lm_sys_copy_file_range(lm_st_fd(f), &in, lm_st_writer_fd(w), &outp, (size_t)left);
        if (k > 0) /* a shard worker's hash: these bytes read back once its prefix reaches them */
            lm_st_writer_note_written(w, at, (uint64_t)k);
        if (k <= 0) {
            if (k < 0 && errno == EINTR)
                continue;
            /* the base ends early: a changed input, not a write error on OUT (and the mapping the
             * fallbacks below read would SIGBUS past the new end) */
            int e = k < 0 ? errno : 0;
            if (k == 0 || base_shrank(f, (uint64_t)in + left))
                return base_ended(f, t->name, err);
            if (e == ENOSPC || e == EFBIG || e == EIO || e == EDQUOT) /* said by the plain write */
                return lm_st_writer_pwrite(w, src + (count - left), (size_t)left, dst + (count - left), err);
            break; /* not supported here (EXDEV, EINVAL, ...): plain writes below */
        }
        left -= (uint64_t)k;
    }
    if (left == 0)
        return LM_OK;
    const uint64_t done = count - left;
    lm_code rc = lm_st_writer_pwrite(w, src + done, (size_t)left, dst + done, err);
    lm_drop_mapped_pages(src + done, left);
    return rc;
}

/* The writer's loop on lane L: its queued tiles, else a slice of its oldest copy, until it is
 * empty.  Called with q->mu held and L's role taken; the lock is let go around each write, and
 * the threads waiting for a buffer this loop has written are woken only then, with the lock let
 * go: woken while it is held, a thread wakes only to sleep again at once on that lock (a futex
 * wait and wake more, each a few microseconds on a virtual machine).
 * @return 1 when a buffer written last has threads to wake (the caller wakes them, the lock let go) */
static int wq_drain(wqueue *q, wq_lane *L)
{
    int wake = 0;
    for (;;) {
        wq_item it;
        lm_err e;
        lm_err_clear(&e);
        lm_code rc = LM_OK;
        const int skip = q->failed;
        if (L->n_tiles > 0) {
            it = L->tiles[L->head_tiles];
            L->head_tiles = (L->head_tiles + 1) % L->cap_tiles;
            L->n_tiles--;
            pthread_mutex_unlock(&q->mu);
            if (wake)
                pthread_cond_broadcast(&q->cv);
            if (!skip)
                rc = lm_st_writer_pwrite(it.w, it.buf, (size_t)it.n, it.off, &e);
            pthread_mutex_lock(&q->mu);
            wake = --*it.busy == 0;
        } else if (L->head_copies < L->n_copies) {
            /* the slice claimed before the lock is let go: the writer threads (q->io) share lanes */
            wq_item *c = &L->copies[L->head_copies];
            it = *c;
            const uint64_t n = it.tk->count - it.off < WQ_SLICE ? it.tk->count - it.off : WQ_SLICE;
            c->off += n;
            if (skip || c->off >= c->tk->count)
                L->head_copies++;
            pthread_mutex_unlock(&q->mu);
            if (wake)
                pthread_cond_broadcast(&q->cv);
            wake = 0;
            if (!skip)
                rc = copy_task_bytes(it.J, it.tk, it.off, n, &e);
            pthread_mutex_lock(&q->mu);
        } else {
            return wake;
        }
        if (rc != LM_OK)
            wq_fail_locked(q, &e, it.jb);
    }
}

/* lane L written by this thread if no other is writing it; q->mu held.  @return 1: the caller
 * wakes the waiting threads (pthread_cond_broadcast) once it has let the lock go */
static int wq_kick_locked(wqueue *q, wq_lane *L)
{
    if (q->io) {
        pthread_cond_signal(&q->io_cv);
        return 0;
    }
    if (L->writing)
        return 0;
    L->writing = 1;
    int wake = wq_drain(q, L);
    L->writing = 0;
    return wake || q->role_waiters > 0;
}

/* every lane with queued writes and no writer written here: cannot happen (an idle writer leaves
 * its lane empty), kept so that a waiting thread can never wait for nobody; q->mu held.
 * @return 1 when one was */
static int wq_kick_idle_locked(wqueue *q)
{
    int kicked = 0;
    for (size_t i = 0; i < q->n_lanes && !q->io; i++) {
        wq_lane *L = &q->lanes[i];
        if (!L->writing && (L->n_tiles > 0 || L->head_copies < L->n_copies)) {
            if (wq_kick_locked(q, L))
                pthread_cond_broadcast(&q->cv);
            kicked = 1;
        }
    }
    return kicked;
}

/* Direct writes (lm_st_writer_direct) wait for the disk, not for a core, and one at a time (a
 * worker writing its lane while the others compute) they kept a 1 MB write in flight per thread:
 * ~0.45 GB/s each here, half of what the disk takes.  A run with direct files has WQ_IO writer
 * threads instead, which write the queued tiles and copies of any lane, several of one lane at once
 * (direct writes to one file take its inode lock shared, the pages written whole and never the
 * same), while the workers only queue.  Same bytes at the same offsets. */
#define WQ_IO 4

static void *wq_io_worker(void *arg)
{
    wqueue *q = arg;
    size_t next = 0;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        wq_lane *L = NULL;
        for (size_t i = 0; i < q->n_lanes && L == NULL; i++) {
            wq_lane *c = &q->lanes[(next + i) % q->n_lanes];
            if (c->n_tiles > 0 || c->head_copies < c->n_copies)
                L = c;
        }
        if (L != NULL) {
            next = (size_t)(L - q->lanes) + 1;
            const int wake = wq_drain(q, L) || q->role_waiters > 0;
            pthread_mutex_unlock(&q->mu);
            if (wake)
                pthread_cond_broadcast(&q->cv);
            pthread_mutex_lock(&q->mu);
        } else if (q->io_stop) {
            break;
        } else {
            pthread_cond_wait(&q->io_cv, &q->mu);
        }
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

/* queues n bytes at buf for offset off of w in lane L (busy: the count of queued writes of buf's
 * buffer); q->mu held */
static void wq_put_locked(wq_lane *L, job *J, size_t jb, lm_st_writer *w, const uint8_t *buf, uint64_t n,
                          uint64_t off, int *busy)
{
    L->tiles[(L->head_tiles + L->n_tiles) % L->cap_tiles] = (wq_item){J, jb, w, buf, n, off, NULL, busy};
    L->n_tiles++;
    ++*busy;
}

/* the copy task queued in job jb's lane; done by the thread that writes the lane */
static void wq_put_copy(wqueue *q, job *J, size_t jb, const task *tk)
{
    pthread_mutex_lock(&q->mu);
    wq_lane *L = &q->lanes[jb];
    if (L->n_copies < L->cap_copies) /* room for every copy task of the job (run_groups) */
        L->copies[L->n_copies++] = (wq_item){J, jb, NULL, NULL, 0, 0, tk, NULL};
    const int wake = wq_kick_locked(q, L);
    pthread_mutex_unlock(&q->mu);
    if (wake)
        pthread_cond_broadcast(&q->cv);
}

/* ws->out: one of this thread's buffers with no write queued (the first such: the warmest), after
 * waiting for the writers if every one is queued */
static void wq_next_buffer(wqueue *q, workspace *ws)
{
    pthread_mutex_lock(&q->mu);
    for (;;) {
        int i = 0;
        while (i < WQ_BUFS && ws->busy[i])
            i++;
        if (i < WQ_BUFS) {
            ws->cur = i;
            ws->out = ws->outs[i];
            break;
        }
        if (!wq_kick_idle_locked(q))
            pthread_cond_wait(&q->cv, &q->mu);
    }
    pthread_mutex_unlock(&q->mu);
}

/* every buffer of ws written (before they are freed) */
static void wq_wait_buffers(wqueue *q, workspace *ws)
{
    pthread_mutex_lock(&q->mu);
    for (int i = 0; i < WQ_BUFS; i++)
        while (ws->busy[i])
            if (!wq_kick_idle_locked(q))
                pthread_cond_wait(&q->cv, &q->mu);
    pthread_mutex_unlock(&q->mu);
}

/* lane L's writer's role for writes done here and now (the lane written first) */
static void wq_role_take(wqueue *q, wq_lane *L)
{
    pthread_mutex_lock(&q->mu);
    q->role_waiters++;
    while (L->writing)
        pthread_cond_wait(&q->cv, &q->mu);
    q->role_waiters--;
    L->writing = 1;
    const int wake = wq_drain(q, L);
    pthread_mutex_unlock(&q->mu);
    if (wake)
        pthread_cond_broadcast(&q->cv);
}

static void wq_role_give(wqueue *q, wq_lane *L)
{
    pthread_mutex_lock(&q->mu);
    (void)wq_drain(q, L);
    L->writing = 0;
    pthread_mutex_unlock(&q->mu);
    pthread_cond_broadcast(&q->cv);
}

/* Task tk of job jb: a copy is queued; a tile is computed into ws->out, which is queued for the
 * writer (the tile's new scales too, copied behind it), and ws->out becomes another buffer. */
static lm_code run_task(wqueue *q, job *J, size_t jb, const task *tk, const uint8_t *shared, struct tile_stat *ts,
                        workspace *ws, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[tk->tensor];
    lm_st_writer *w = J->w[J->shard_of ? J->shard_of[tk->tensor] : 0];
    uint64_t dst = lm_st_writer_tensor_offset(w, J->local[tk->tensor]);
    if (tk->copy) {
        wq_put_copy(q, J, jb, tk);
        return LM_OK;
    }
    uint64_t r0 = tk->first, nr = tk->count;
    lm_xq_piece pieces[2];
    size_t n_pieces = 0;
    uint64_t row = t->q != NULL && t->dtype == t->src_dtype ? t->q->row_bytes : t->cols * (lm_dtype_bits(t->dtype) / 8);
    /* the buffers this tile writes, present before it: the input bytes read into the scratch, the
     * output bytes (and the scales after them) and, but on the low-rank kernel's path and the fused
     * block FP8 one (a block at a time), the f32 tile */
    const uint64_t in_row = t->q != NULL ? t->q->row_bytes : t->cols * (lm_dtype_bits(t->src_dtype) / 8);
    if (shared == NULL)
        ws_populate(ws->scratch, &ws->ready_scratch, (size_t)(nr * in_row));
    const size_t out_want = (size_t)(nr * row) + (t->q != NULL ? 4096 : 0);
    const size_t shift = ws->placed ? (size_t)((dst + r0 * row) % DIO_ROOM) : 0;
    ws->out = ws->outs[ws->cur] + shift;
    ws_populate(ws->outs[ws->cur], &ws->ready_out[ws->cur], shift + (out_want < ws->out_bytes ? out_want : ws->out_bytes));
    if ((J->rt[tk->tensor].exact_kind != LM_EXACT_LOWRANK || t->q != NULL || t->sim_nf4) && !fused_tile(J, tk->tensor))
        ws_populate(ws->acc, &ws->ready_acc, (size_t)(nr * t->cols) * sizeof(float));
    lm_code rc = compute_tile(J, tk->tensor, r0, nr, shared, ws, ts, pieces, &n_pieces, err);
    uint64_t used = nr * row;
    for (size_t k = 0; k < n_pieces; k++)
        used += pieces[k].n_bytes;
    if (rc == LM_OK && ((t->q != NULL && t->q->out_transposed) || used > ws->out_bytes)) {
        wq_role_take(q, &q->lanes[jb]); /* one write per row, from the scratch: written here */
        if (t->q != NULL && t->q->out_transposed)
            rc = write_transposed(w, dst, t, ws->out, r0, nr, (uint8_t *)ws->scratch, err);
        else
            rc = lm_st_writer_pwrite(w, ws->out, (size_t)(nr * row), dst + r0 * row, err);
        for (size_t k = 0; k < n_pieces && rc == LM_OK; k++) { /* the tile's scales, in the scale tensors */
            lm_st_writer *sw = J->w[J->shard_of ? J->shard_of[pieces[k].tensor] : 0];
            uint64_t sdst = lm_st_writer_tensor_offset(sw, J->local[pieces[k].tensor]);
            rc = lm_st_writer_pwrite(sw, pieces[k].bytes, pieces[k].n_bytes, sdst + pieces[k].offset, err);
        }
        wq_role_give(q, &q->lanes[jb]);
    } else if (rc == LM_OK) {
        uint8_t *buf = ws->out;
        uint64_t at = nr * row;
        wq_lane *L = &q->lanes[jb];
        pthread_mutex_lock(&q->mu);
        wq_put_locked(L, J, jb, w, buf, nr * row, dst + r0 * row, &ws->busy[ws->cur]);
        for (size_t k = 0; k < n_pieces; k++) { /* the tile's scales, in the scale tensors */
            lm_st_writer *sw = J->w[J->shard_of ? J->shard_of[pieces[k].tensor] : 0];
            uint64_t sdst = lm_st_writer_tensor_offset(sw, J->local[pieces[k].tensor]);
            memcpy(buf + at, pieces[k].bytes, pieces[k].n_bytes);
            wq_put_locked(L, J, jb, sw, buf + at, pieces[k].n_bytes, sdst + pieces[k].offset, &ws->busy[ws->cur]);
            at += pieces[k].n_bytes;
        }
        const int wake = wq_kick_locked(q, L);
        pthread_mutex_unlock(&q->mu);
        if (wake)
            pthread_cond_broadcast(&q->cv);
        wq_next_buffer(q, ws);
    }
    tensor_rt *rt = &J->rt[tk->tensor];
    if (__atomic_sub_fetch(&rt->tiles_left, 1, __ATOMIC_ACQ_REL) == 0) { /* the tensor's last tile */
        pthread_mutex_lock(J->prep_lock);
        tensor_release(J, tk->tensor);
        pthread_mutex_unlock(J->prep_lock);
    }
    return rc;
}


static uint8_t *alloc_out(size_t n, int placed)
{
    if (!placed)
        return malloc(n);
    void *p = NULL;
    const size_t want = (n + DIO_ROOM + HUGE_BYTES - 1) / HUGE_BYTES * HUGE_BYTES;
    if (posix_memalign(&p, HUGE_BYTES, want) != 0)
        return NULL;
    (void)madvise(p, want, MADV_HUGEPAGE);
    return p;
}

/* f64: room for the LM_EXACT_F64 tiles too; n_out output buffers (1 .. WQ_BUFS); placed: for
 * direct writes (alloc_out) */
static int alloc_workspace(workspace *ws, size_t max_elems, int f64, int n_out, int placed)
{
    memset(ws, 0, sizeof *ws);
    if (f64 && ((ws->acc64 = malloc(max_elems * sizeof(double))) == NULL ||
                (ws->scratch64 = malloc((2 * max_elems + 64) * sizeof(double))) == NULL))
        return 0;
    ws->acc = malloc(max_elems * sizeof(float));
    ws->out_bytes = max_elems * sizeof(double);
    ws->placed = placed;
    for (int i = 0; i < n_out; i++)
        if ((ws->outs[i] = alloc_out(ws->out_bytes, placed)) == NULL)
            return 0;
    ws->out = ws->outs[0];
    ws->scratch = malloc((4 * max_elems + 64) * sizeof(float));
    ws->codes = malloc(max_elems + 64);
    ws->qscales = malloc(lm_xq_qbuf_floats(max_elems) * sizeof(float));
    return ws->acc != NULL && ws->scratch != NULL && ws->codes != NULL && ws->qscales != NULL;
}

/* the statistics' buffers (only when they are measured) */
static int alloc_stats_workspace(workspace *ws, size_t max_elems)
{
    ws->base_out = malloc(max_elems * sizeof(double));
    ws->base_f32 = malloc(max_elems * sizeof(float));
    return ws->base_out != NULL && ws->base_f32 != NULL;
}

static void free_workspace(workspace *ws)
{
    free(ws->acc);
    for (int i = 0; i < WQ_BUFS; i++)
        free(ws->outs[i]);
    free(ws->scratch);
    free(ws->base_out);
    free(ws->base_f32);
    free(ws->codes);
    free(ws->qscales);
    free(ws->raw);
    free(ws->acc64);
    free(ws->scratch64);
}

/* the work of one tile of a pass over a whole tensor (for_each_tile): rows r0 .. r0 + nr, tile k,
 * loaded as f32 in ws->acc */
typedef lm_code (*tile_fn)(const job *J, size_t ti, uint64_t k, uint64_t r0, uint64_t nr, const workspace *ws,
                           void *ctx, lm_err *err);

/* fn on every tile (tr rows) of tensor ti, n_threads threads with a workspace each, the tiles in
 * any order: the first error stops the pass (the others skip their remaining tiles) */
static lm_code for_each_tile(const job *J, size_t ti, uint64_t tr, int n_threads, tile_fn fn, void *ctx, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const uint64_t n_tiles = (t->rows + tr - 1) / tr;
    int failed = 0;
    lm_err shared_err;
    lm_err_clear(&shared_err);
#pragma omp parallel num_threads(n_threads)
    {
        workspace ws;
        lm_err lerr;
        lm_err_clear(&lerr);
        if (!alloc_workspace(&ws, (size_t)(tr * t->cols) + 1, J->rt[ti].exact_kind == LM_EXACT_F64, 1, 0))
            lm_fail(&lerr, LM_E_NOMEM, NULL, "out of memory for the tile workspace");
#pragma omp for schedule(dynamic, 1)
        for (uint64_t k = 0; k < n_tiles; k++) {
            if (lerr.code != LM_OK)
                continue;
            uint64_t r0 = k * tr, nr = r0 + tr <= t->rows ? tr : t->rows - r0;
            if (load_tile(J, ti, ws.acc, (uint8_t *)ws.scratch, r0, nr, &lerr) != LM_OK)
                continue;
            fn(J, ti, k, r0, nr, &ws, ctx, &lerr);
        }
        if (lerr.code != LM_OK) {
#pragma omp critical(lm_tilepass_error)
            {
                if (!failed)
                    shared_err = lerr;
                failed = 1;
            }
        }
        free_workspace(&ws);
    }
    if (failed) {
        *err = shared_err;
        return shared_err.code;
    }
    return LM_OK;
}

/* quant_amax_pass's tile: the merged tile's amaxes (lm_xq_tile_amax) into ctx's slots of tile k */
static lm_code amax_tile(const job *J, size_t ti, uint64_t k, uint64_t r0, uint64_t nr, const workspace *ws,
                         void *ctx, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    if (J->rt[ti].exact_kind != LM_EXACT_NONE) { /* the values the tiles will requantize (compute_tile_qexact) */
        if (exact_values(J, ti, r0, nr, ws, err) != LM_OK)
            return err->code;
        to_f32(J->k, lm_exact_out_dtype(t), ws->out, ws->acc, (size_t)(nr * t->cols));
    } else {
        lm_tile tile = {ws->acc, ws->scratch, r0, nr, t->rows, t->cols, J->k};
        apply_ops(J, ti, 0, t->n_ops, &tile);
    }
    lm_xq_tile_amax(t, ws->acc, r0, nr, (uint32_t *)ctx + k * lm_xq_amax_slots(t));
    return LM_OK;
}

/* A quantized weight with one scale for the whole tensor (a per-tensor FP8 scale, NVFP4's second
 * scale): requantizing needs the merged tensor's amax before any tile is written.  The merged
 * tiles are computed once for it (the max does not depend on the order) and again when written;
 * memory stays a tile per thread.  release: free the prepared factors after (no column pass
 * holds them). */
static lm_code quant_amax_pass(job *J, size_t ti, int n_threads, int release, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    if (tensor_prepare(J, ti, err) != LM_OK)
        return err->code;
    uint64_t tr = lm_plan_tile_rows(t, J->tile_elems), n_tiles = (t->rows + tr - 1) / tr;
    const size_t ns = lm_xq_amax_slots(t); /* one amax per second scale (NVFP4 expert stacks: per expert) */
    uint32_t *part = calloc((size_t)n_tiles * ns + 1, sizeof *part); /* per tile */
    float *famax = malloc(ns * sizeof *famax);
    if (part == NULL || famax == NULL) {
        free(part);
        free(famax);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the amaxes of '%s'", t->name);
    }
    /* the tiles are computed again when written: --json counts their recomputed elements once */
    const uint64_t rec0 = J->rt[ti].n_recomputed, fix0 = J->rt[ti].n_fixed_point;
    if (for_each_tile(J, ti, tr, n_threads, amax_tile, part, err) != LM_OK) {
        free(part);
        free(famax);
        return err->code;
    }
    J->rt[ti].n_recomputed = rec0;
    J->rt[ti].n_fixed_point = fix0;
    for (size_t i = 0; i < ns; i++) { /* a max: the same whatever the order */
        uint32_t m = 0;
        for (uint64_t k = 0; k < n_tiles; k++)
            m = part[k * ns + i] > m ? part[k * ns + i] : m;
        memcpy(&famax[i], &m, sizeof m);
    }
    free(part);
    free(J->rt[ti].qamax);
    J->rt[ti].qamax = famax;
    lm_xq_set_amax(t, J->rt[ti].qscale, J->rt[ti].qamax);
    if (release)
        tensor_release(J, ti); /* prepared again by its first tile */
    return LM_OK;
}

/* column_dora_pass's tile: the squared column sums of W + dW (the ops before the norm, op d)
 * into ctx's row k */
typedef struct {
    double *part;
    size_t d;
} colsum_ctx;

static lm_code colsum_tile(const job *J, size_t ti, uint64_t k, uint64_t r0, uint64_t nr, const workspace *ws,
                           void *ctx, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const colsum_ctx *c = ctx;
    double *p = c->part + k * t->cols;
    if (J->rt[ti].dora != NULL) /* the rows in f64 (exec_dora.h) */
        return lm_dora_col_sumsq(J->rt[ti].dora, ws->acc, r0, nr, c->d, p) == 0
                   ? LM_OK : lm_fail(err, LM_E_NOMEM, NULL, "out of memory for a DoRA row");
    if (J->rt[ti].exact_kind == LM_EXACT_F64 && !J->lowrank_flags) { /* the ops before the norm in f64 (exec_exact.h) */
        const lm_tile64 t64 = {ws->acc64, ws->scratch64, r0, nr, t->rows, t->cols, J->k};
        J->k->f32_to_f64(ws->acc, ws->acc64, (size_t)(nr * t->cols));
        lm_exact_f64_colsumsq(t, J->rt[ti].prep, c->d, &t64, p);
        return LM_OK;
    }
    lm_tile tile = {ws->acc, ws->scratch, r0, nr, t->rows, t->cols, J->k};
    apply_ops(J, ti, 0, c->d, &tile);
    for (uint64_t r = 0; r < nr; r++)
        for (uint64_t col = 0; col < t->cols; col++)
            p[col] += (double)ws->acc[r * t->cols + col] * (double)ws->acc[r * t->cols + col];
    return LM_OK;
}

/* Column DoRA (Conv1D, Embedding): the norm of every column of W + dW needs all rows first.
 * Partial sums per block of rows, reduced in block order; the blocks are the default tiles
 * whatever --tile-elems says, so the sums (and the output) do not depend on it or on the
 * thread count. */
static lm_code column_dora_pass(job *J, size_t ti, int n_threads, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    size_t d = 0;
    while (!(t->ops[d].kind == LM_OP_NORM && t->ops[d].axis == 1))
        d++;
    if (tensor_prepare(J, ti, err) != LM_OK)
        return err->code;
    uint64_t tr = lm_plan_tile_rows(t, 0), n_tiles = (t->rows + tr - 1) / tr;
    double *part = calloc((size_t)(n_tiles * t->cols) + 1, sizeof *part);
    double *scale = calloc((size_t)t->cols + 1, sizeof *scale);
    if (part == NULL || scale == NULL) {
        free(part);
        free(scale);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the DoRA column norms of '%s'", t->name);
    }
    colsum_ctx cc = {part, d};
    if (for_each_tile(J, ti, tr, n_threads, colsum_tile, &cc, err) != LM_OK) {
        free(part);
        free(scale);
        return err->code;
    }
    const float *m = J->rt[ti].prep[d].a;
    const lm_op *op = &t->ops[d];
    const uint64_t g = op->group > 1 ? op->group : 1; /* columns per norm (a kernel's input channel) */
    for (uint64_t c0 = 0; c0 < t->cols; c0 += g) {
        double ss = 0;
        for (uint64_t c = c0; c < c0 + g && c < t->cols; c++)
            for (uint64_t k = 0; k < n_tiles; k++)
                ss += part[k * t->cols + c];
        for (uint64_t c = c0; c < c0 + g && c < t->cols; c++)
            scale[c] = lm_dora_factor(op, (double)m[c0 / g], ss);
    }
    free(part);
    J->rt[ti].col_scale = scale;
    return LM_OK;
}

/* the passes some tensors need over all their rows before their tiles are written */
static lm_code pre_passes(job *J, int n_threads, lm_err *err)
{
    for (size_t i = 0; i < J->plan->n; i++) {
        const lm_plan_tensor *t = &J->plan->t[i];
        int has_col = 0;
        for (size_t o = 0; o < t->n_ops; o++)
            has_col |= t->ops[o].kind == LM_OP_NORM && t->ops[o].axis == 1;
        if (has_col && J->rt[i].tiles_left > 0 && column_dora_pass(J, i, n_threads, err) != LM_OK)
            return err->code;
        if (t->q != NULL && t->q->needs_amax && t->dtype == t->src_dtype && J->rt[i].tiles_left > 0 &&
            quant_amax_pass(J, i, n_threads, !has_col, err) != LM_OK)
            return err->code;
    }
    return LM_OK;
}

/* 1 when shard sh is written by this run (a shard worker writes one) */
static int shard_selected(const job *J, size_t sh)
{
    return !J->one_shard || sh == J->only_shard;
}

/* Every shard stays open from its creation to the commit (an unnamed O_TMPFILE file exists only
 * through its descriptor), so n files are open at once: the soft RLIMIT_NOFILE (1024 on most
 * systems, less than a merge into 1080 shards needs) is raised toward the hard limit, and a merge
 * the hard limit cannot hold is refused before any file is created. */
static lm_code reserve_descriptors(size_t n, lm_err *err)
{
    const rlim_t margin = 64; /* inputs, the stage, standard streams, the libraries' own */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= n + margin)
        return LM_OK;
    rlim_t want = n + margin;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want)
        return lm_fail_errno(err, EMFILE, "the output has %zu shards, each open until the commit, but at most %llu "
                             "files may be open here (ulimit -n): raise the limit or give a larger --max-shard-size",
                             n, (unsigned long long)rl.rlim_max);
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        return lm_fail_errno(err, errno, "cannot raise the open-file limit to %llu for %zu shards",
                             (unsigned long long)want, n);
    return LM_OK;
}

/* the output's header, one writer per shard (the files exist from here on, as temporary files) */
static lm_code open_writers(job *J, const char *out_path, const lm_exec_opts *opts, uint64_t *bytes_written,
                            lm_err *err)
{
    const lm_plan *plan = J->plan;
    lm_out_tensor *outs = calloc(plan->n + 1, sizeof *outs), *souts = calloc(plan->n + 1, sizeof *souts);
    size_t *sorder = calloc(plan->n + 1, sizeof *sorder);
    J->w = calloc(J->n_shards, sizeof *J->w);
    J->local = calloc(plan->n + 1, sizeof *J->local);
    lm_code rc = LM_OK;
    if (outs == NULL || souts == NULL || sorder == NULL || J->w == NULL || J->local == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    if (!J->one_shard && (rc = reserve_descriptors(J->n_shards, err)) != LM_OK) {
        lm_err_set_path(err, out_path);
        goto done;
    }
    for (size_t i = 0; i < plan->n; i++) {
        outs[i].name = plan->t[i].name;
        outs[i].dtype = plan->t[i].dtype;
        outs[i].n_dims = plan->t[i].n_dims;
        outs[i].shape = plan->t[i].shape;
    }
    for (size_t sh = 0; sh < J->n_shards; sh++) {
        size_t n_in = 0, n_ord = 0;
        if (!shard_selected(J, sh))
            continue;
        for (size_t i = 0; i < plan->n; i++) /* header order */
            if ((J->shard_of ? J->shard_of[i] : 0) == sh) {
                J->local[i] = n_in;
                souts[n_in++] = outs[i];
            }
        for (size_t q = 0; q < plan->n; q++) { /* data order */
            size_t i = plan->data_order[q];
            if ((J->shard_of ? J->shard_of[i] : 0) == sh)
                sorder[n_ord++] = J->local[i];
        }
        const char *path = J->n_shards > 1 ? opts->shard_paths[sh] : out_path;
        J->w[sh] = lm_st_writer_open(path, souts, n_in, sorder, plan->meta_keys, plan->meta_values, plan->n_meta, err);
        if (J->w[sh] == NULL) {
            rc = err->code;
            goto done;
        }
        if (J->one_shard && opts->shard_hash_hex != NULL && (rc = lm_st_writer_hash_begin(J->w[sh], err)) != LM_OK)
            goto done; /* a shard worker: the sidecar's sha256, computed as the shard is written */
        if (!J->one_shard && opts && opts->file_sha256 != NULL &&
            (rc = lm_st_writer_hash_begin_sha256(J->w[sh], err)) != LM_OK)
            goto done; /* the report's sha256 (--json) */
        *bytes_written += lm_st_writer_file_bytes(J->w[sh]);
    }
done:
    free(outs);
    free(souts);
    free(sorder);
    return rc;
}

/* the tasks in data order: copy chunks of untouched tensors, row tiles of the others */
static lm_code make_tasks(job *J, task **tasks_out, size_t *n_out, lm_exec_stats *st, lm_err *err)
{
    const lm_plan *plan = J->plan;
    task *tasks = NULL;
    size_t n_tasks = 0, cap_tasks = 0;
    for (size_t q = 0; q < plan->n; q++) {
        size_t i = plan->data_order[q];
        const lm_plan_tensor *t = &plan->t[i];
        if (!shard_selected(J, J->shard_of ? J->shard_of[i] : 0))
            continue;
        int copy = (t->n_ops == 0 || (t->n_ops == 1 && t->ops[0].kind == LM_OP_REPLACE)) && t->dtype == t->src_dtype;
        int replaced = t->n_ops > 0 && t->ops[0].kind == LM_OP_REPLACE; /* maybe resized: the saved tensor's size */
        uint64_t bytes = t->base && !replaced ? t->base->info->end - t->base->info->begin : t->ops[0].src->n_bytes;
        uint64_t unit = copy ? COPY_CHUNK : lm_plan_tile_rows(t, J->tile_elems);
        /* a tensor with no elements (a zero in its shape; other dimensions may be huge) has no
         * work; an output dtype of another width changes nothing to that */
        uint64_t total = bytes == 0 || t->scale_of ? 0 : copy ? bytes : t->rows; /* a scale: its weight's tiles */
        copy &= !t->scale_of;
        if (copy) {
            st->n_copied_tensors++;
            st->bytes_copied += bytes;
        } else {
            st->n_computed_tensors++;
        }
        for (uint64_t first = 0; first < total; first += unit) {
            if (lm_grow((void **)&tasks, &cap_tasks, n_tasks, sizeof *tasks, 1024) != 0) {
                free(tasks);
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            }
            task *tk = &tasks[n_tasks++];
            tk->tensor = i;
            tk->first = first;
            tk->count = first + unit <= total ? unit : total - first;
            tk->copy = copy;
            if (!copy) {
                st->n_tiles++;
                J->rt[i].tiles_left++;
            }
        }
    }
    for (size_t i = 0; i < plan->n; i++)
        J->rt[i].next = SIZE_MAX;
    for (size_t q = 0, last = SIZE_MAX; q < n_tasks; q++) /* computed tensors: each one's next */
        if (!tasks[q].copy && tasks[q].tensor != last) {
            if (last != SIZE_MAX)
                J->rt[last].next = tasks[q].tensor;
            last = tasks[q].tensor;
        }
    *tasks_out = tasks;
    *n_out = n_tasks;
    return LM_OK;
}

/* the tensors that take a certified path (exec_exact.h) */
static void mark_exact_tensors(job *J)
{
    for (size_t i = 0; i < J->plan->n; i++)
        J->rt[i].exact_kind = J->rt[i].tiles_left > 0 ? lm_exact_kind_of(&J->plan->t[i]) : LM_EXACT_NONE;
}

/* the exact path's counters, per tensor (opts->recomputed) and in total */
static void exact_stats(const job *J, const lm_exec_opts *opts, lm_exec_stats *st)
{
    for (size_t i = 0; i < J->plan->n; i++) {
        const tensor_rt *rt = &J->rt[i];
        if (opts && opts->recomputed)
            opts->recomputed[i] = rt->exact_kind != LM_EXACT_NONE ? rt->n_recomputed
                                  : lm_exact_by_copy(&J->plan->t[i]) ? 0 : UINT64_MAX;
        if (rt->exact_kind != LM_EXACT_NONE) {
            st->n_exact_tensors++;
            st->n_exact_elems += J->plan->t[i].rows * J->plan->t[i].cols;
            st->n_recomputed += rt->n_recomputed;
            st->n_fixed_point += rt->n_fixed_point;
        }
    }
}

/* the per-task statistics, when the caller asks for them */
static lm_code stats_alloc(job *J, const lm_exec_opts *opts, size_t n_tasks, lm_err *err)
{
    J->stats_norms = opts && opts->stats_norms;
    if (opts == NULL || opts->stats == NULL)
        return LM_OK;
    J->tstat = calloc(n_tasks + 1, sizeof *J->tstat);
    return J->tstat ? LM_OK : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
}

#ifdef _OPENMP
typedef struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int open;
} gate;

static void *idle_thread(void *arg)
{
    gate *g = arg;
    pthread_mutex_lock(&g->mu);
    while (!g->open)
        pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

/* How many of `want` workers can exist at once.  libgomp exits the process (status 1, its own
 * message) when it cannot create a thread, which a tight `ulimit -v` provokes (each thread's
 * stack is address space); the output does not depend on the thread count, so fewer workers
 * are used instead (issue 15).  The probes use the default attributes, as libgomp does unless
 * OMP_STACKSIZE says otherwise (then it is trusted). */
static int threads_available(int want)
{
    if (want <= 1 || getenv("OMP_STACKSIZE") != NULL || getenv("GOMP_STACKSIZE") != NULL)
        return want < 1 ? 1 : want;
    pthread_t *t = malloc((size_t)want * sizeof *t);
    if (t == NULL)
        return 1;
    gate g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
    int k = 0;
    while (k < want - 1 && pthread_create(&t[k], NULL, idle_thread, &g) == 0)
        k++;
    pthread_mutex_lock(&g.mu);
    g.open = 1;
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
    for (int i = 0; i < k; i++)
        pthread_join(t[i], NULL);
    free(t);
    return k + 1;
}
#endif

/* Every shard complete and closed, what the merge changed measured and judged by the caller
 * (before_commit).  Nothing is renamed yet. */
static lm_code finish_job(job *J, lm_err *err)
{
    const lm_exec_opts *opts = J->opts;
    lm_code rc;
    for (size_t sh = 0; sh < J->n_shards; sh++)
        if (J->w[sh] != NULL && (rc = lm_st_writer_finish(J->w[sh], opts ? opts->do_fsync : 0, err)) != LM_OK)
            return rc;
    if (J->one_shard && opts->shard_hash_hex != NULL &&
        (rc = lm_st_writer_hash_end(J->w[J->only_shard], opts->shard_hash_hex, &J->st.hash_cpu_seconds, err)) != LM_OK)
        return rc;
    for (size_t sh = 0; !J->one_shard && opts && opts->file_sha256 != NULL && sh < J->n_shards; sh++) {
        double c = 0;
        if ((rc = lm_st_writer_hash_end(J->w[sh], opts->file_sha256[sh], &c, err)) != LM_OK)
            return rc;
        J->st.hash_cpu_seconds += c;
    }
    if (J->tstat != NULL)
        stats_reduce(J, J->tasks, J->n_tasks, opts->stats);
    if (opts && opts->before_commit && (rc = opts->before_commit(opts->before_commit_ctx, err)) != LM_OK)
        return rc;
    return LM_OK;
}

/* every shard renamed into place, then the caller's after_commit */
static lm_code commit_job(job *J, lm_err *err)
{
    const lm_exec_opts *opts = J->opts;
    for (size_t sh = 0; sh < J->n_shards; sh++) {
        if (J->w[sh] == NULL)
            continue;
        lm_code rc;
        if (opts && opts->commit_paths && (rc = lm_st_writer_retarget(J->w[sh], opts->commit_paths[sh], err)) != LM_OK)
            return rc;
        rc = lm_st_writer_commit(J->w[sh], opts ? opts->do_fsync : 0, err);
        J->w[sh] = NULL;
        if (rc != LM_OK)
            return rc;
    }
    return opts && opts->after_commit ? opts->after_commit(opts->before_commit_ctx, err) : LM_OK;
}

/* one job's state, its tasks and its output files (temporary files from here on) */
static lm_code job_init(job *J, const lm_plan *plan, const lm_model *model, const char *out_path,
                        const lm_exec_opts *opts, const lm_kernels *k, pthread_mutex_t *lock, drop_list *drops,
                        int n_threads, lm_err *err)
{
    lm_code rc;
    memset(J, 0, sizeof *J);
    J->plan = plan;
    J->model = model;
    J->k = k;
    J->opts = opts;
    J->prep_lock = lock;
    J->drops = drops;
    J->tile_elems = opts ? opts->tile_elems : 0;
    J->lowrank_flags = opts && opts->exactness_off ? LM_LOWRANK_UNCERTIFIED : 0;
    J->n_shards = opts && opts->n_shards > 1 ? opts->n_shards : 1;
    J->shard_of = opts && opts->n_shards > 1 ? opts->shard_of : NULL;
    J->one_shard = opts && opts->one_shard;
    J->only_shard = J->one_shard ? opts->only_shard : 0;
    J->st.n_threads = n_threads;
    J->rt = calloc(plan->n + 1, sizeof *J->rt);
    if (J->rt == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if ((rc = make_tasks(J, &J->tasks, &J->n_tasks, &J->st, err)) != LM_OK)
        return rc;
    mark_exact_tensors(J);
    if ((rc = stats_alloc(J, opts, J->n_tasks, err)) != LM_OK)
        return rc;
    /* every check is done: now the output files exist (as temporary files) */
    if ((rc = open_writers(J, out_path, opts, &J->st.bytes_written, err)) != LM_OK)
        return rc;
    if ((rc = pre_passes(J, n_threads, err)) != LM_OK) /* column DoRA norms, quantized amax */
        return rc;
    J->max_elems = 1;
    for (size_t i = 0; i < plan->n; i++) {
        uint64_t e = lm_plan_tile_rows(&plan->t[i], J->tile_elems) * plan->t[i].cols;
        if (e > J->max_elems)
            J->max_elems = (size_t)e;
    }
    return LM_OK;
}

static void job_free(job *J, int abort_writers)
{
    if (J->w && abort_writers)
        for (size_t sh = 0; sh < J->n_shards; sh++)
            lm_st_writer_abort(J->w[sh]);
    if (J->rt != NULL)
        for (size_t i = 0; i < J->plan->n; i++) {
            tensor_release(J, i);
            free(J->rt[i].qamax);
        }
    free(J->rt);
    free(J->w);
    free(J->local);
    free(J->tstat);
    free(J->tasks);
}

/* ------------------------------------------------------------------------------------------ */
/* a batch: the tasks of K jobs over one base, grouped so that a tile (or copy chunk) of the   */
/* base that several jobs need is read once and used by each in turn                           */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    size_t job, task;
    size_t file;      /* base file of the bytes (SIZE_MAX: not from the base: not shared) */
    uint64_t begin;   /* the base tensor's offset in it */
    uint64_t off;     /* the bytes' offset in it */
    uint64_t n_bytes;
    int copy;
} member;

static int member_cmp(const void *pa, const void *pb)
{
    const member *a = pa, *b = pb;
    if (a->copy != b->copy) /* copies first (see make_groups) */
        return b->copy - a->copy;
    if (a->file != b->file)
        return a->file < b->file ? -1 : 1;
    if (a->file != SIZE_MAX) {
        if (a->off != b->off)
            return a->off < b->off ? -1 : 1;
        if (a->begin != b->begin)
            return a->begin < b->begin ? -1 : 1;
        if (a->copy != b->copy)
            return a->copy - b->copy;
        if (a->n_bytes != b->n_bytes)
            return a->n_bytes < b->n_bytes ? -1 : 1;
    }
    if (a->job != b->job)
        return a->job < b->job ? -1 : 1;
    return a->task < b->task ? -1 : a->task > b->task;
}

/* 1 when a and b read the same bytes of the base */
static int member_same(const member *a, const member *b)
{
    return a->file != SIZE_MAX && a->file == b->file && a->begin == b->begin && a->off == b->off && a->copy == b->copy &&
           a->n_bytes == b->n_bytes;
}

static void member_key(const job *J, size_t jb, size_t q, member *m)
{
    const task *tk = &J->tasks[q];
    const lm_plan_tensor *t = &J->plan->t[tk->tensor];
    const lm_st_file *f = tensor_src_file(J, tk->tensor);
    uint64_t row = t->q != NULL ? t->q->row_bytes : t->cols * (lm_dtype_bits(t->src_dtype) / 8); /* as tile_bytes */
    *m = (member){jb, q, SIZE_MAX, 0, 0, 0, tk->copy};
    if (f == NULL || row == 0)
        return;
    m->file = t->base->file;
    m->begin = t->base->info->begin;
    m->off = m->begin + (tk->copy ? tk->first : tk->first * row);
    m->n_bytes = tk->copy ? tk->count : tk->count * row;
}

/* the members in run order and where each group starts (groups[n_groups] = n_members); one job:
 * its tasks in its order, one group each */
static lm_code make_groups(job *Js, size_t n_jobs, member **members, size_t **groups, size_t *n_groups, lm_err *err)
{
    size_t n = 0;
    for (size_t j = 0; j < n_jobs; j++)
        n += Js[j].n_tasks;
    member *m = malloc((n + 1) * sizeof *m);
    size_t *g = malloc((n + 1) * sizeof *g), k = 0, ng = 0;
    if (m == NULL || g == NULL) {
        free(m);
        free(g);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    for (size_t j = 0; j < n_jobs; j++)
        for (size_t q = 0; q < Js[j].n_tasks; q++)
            member_key(&Js[j], j, q, &m[k++]);
    /* The copies of unchanged tensors first: the thread that writes does them while the others
     * compute, instead of one thread copying the last tensors (lm_head) alone at the end */
    if (n_jobs > 1) {
        qsort(m, n, sizeof *m, member_cmp);
    } else {
        size_t c = 0;
        for (size_t i = 0; i < n; i++)
            c += m[i].copy != 0;
        member *tmp = malloc((n + 1) * sizeof *tmp);
        if (tmp != NULL) { /* stable: copies in data order, then the tiles in data order */
            size_t a = 0, b = c;
            for (size_t i = 0; i < n; i++)
                tmp[m[i].copy ? a++ : b++] = m[i];
            memcpy(m, tmp, n * sizeof *m);
            free(tmp);
        }
    }
    for (size_t i = 0; i < n; i++)
        if (i == 0 || n_jobs == 1 || !member_same(&m[i - 1], &m[i]))
            g[ng++] = i;
    g[ng] = n;
    *members = m;
    *groups = g;
    *n_groups = ng;
    return LM_OK;
}

/* what the threads share in a run */
typedef struct {
    job *Js;
    size_t n_jobs;
    uint64_t done_bytes, total_bytes; /* progress (under lm_progress) */
} batch;

static void progress_add(batch *B, const job *J, const task *tk)
{
    const lm_exec_opts *o0 = B->Js[0].opts;
    if (o0 == NULL || o0->progress == NULL)
        return;
    const lm_plan_tensor *t = &J->plan->t[tk->tensor];
    uint64_t b = tk->copy ? tk->count : tk->count * t->cols * (lm_dtype_bits(t->dtype) / 8);
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&mu);
    B->done_bytes += b;
    o0->progress(o0->progress_ctx, B->done_bytes, B->total_bytes);
    pthread_mutex_unlock(&mu);
}

/* one group: the shared tile read once (several jobs computing it), then each job's task, from
 * the member `first` on (the groups' threads start at different jobs: fewer of their tiles wait
 * for the same job's writer) */
static lm_code run_group(batch *B, wqueue *q, const member *m, size_t n, size_t first, workspace *ws,
                         size_t *failed_job, lm_err *err)
{
    const uint8_t *shared = NULL;
    *failed_job = m[0].job;
    if (n > 1 && !m[0].copy) {
        job *J = &B->Js[m[0].job];
        const task *tk = &J->tasks[m[0].task];
        if ((shared = tile_bytes(J, tk->tensor, ws->raw, tk->first, tk->count, err)) == NULL)
            return LM_E_IO;
    }
    for (size_t k = 0; k < n; k++) {
        const member *mi = &m[(first + k) % n];
        job *J = &B->Js[mi->job];
        const task *tk = &J->tasks[mi->task];
        *failed_job = mi->job;
        if (run_task(q, J, mi->job, tk, shared, J->tstat ? &J->tstat[mi->task] : NULL, ws, err) != LM_OK)
            return err->code;
        progress_add(B, J, tk);
    }
    return LM_OK;
}

/* the write queue of a run: a lane per job, each with room for every buffer's writes and for all
 * of its job's copy tasks */
static lm_code wq_init(wqueue *q, const batch *B, int n_threads, lm_err *err)
{
    memset(q, 0, sizeof *q);
    const size_t cap_tiles = (size_t)n_threads * WQ_BUFS * 3; /* a tile and its scales (two pieces) per buffer */
    size_t n_copies = 0;
    for (size_t j = 0; j < B->n_jobs; j++)
        for (size_t t = 0; t < B->Js[j].n_tasks; t++)
            n_copies += B->Js[j].tasks[t].copy != 0;
    q->n_lanes = B->n_jobs;
    q->lanes = calloc(B->n_jobs, sizeof *q->lanes);
    wq_item *tiles = malloc(B->n_jobs * cap_tiles * sizeof *tiles), *copies = malloc((n_copies + 1) * sizeof *copies);
    if (q->lanes == NULL || tiles == NULL || copies == NULL) {
        free(q->lanes);
        free(tiles);
        free(copies);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    for (size_t j = 0, c = 0; j < B->n_jobs; j++) {
        wq_lane *L = &q->lanes[j];
        L->tiles = tiles + j * cap_tiles;
        L->cap_tiles = cap_tiles;
        L->copies = copies + c;
        for (size_t t = 0; t < B->Js[j].n_tasks; t++)
            L->cap_copies += B->Js[j].tasks[t].copy != 0;
        c += L->cap_copies;
    }
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    pthread_cond_init(&q->io_cv, NULL);
    return LM_OK;
}

static void wq_free(wqueue *q)
{
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    pthread_cond_destroy(&q->io_cv);
    free(q->lanes[0].tiles);
    free(q->lanes[0].copies);
    free(q->lanes);
}

/* what the workers of a run share */
typedef struct {
    batch *B;
    wqueue *q;
    const member *m;
    const size_t *g;
    size_t n_groups;
    size_t next; /* the next group to run (atomic) */
    size_t max_elems;
    int want_stats, want64;
    int placed; /* a file is written directly: tiles placed (alloc_workspace) */
} group_run;

/* a worker: the groups in turn, each to the first thread free for it (the fastest thread runs
 * the most), with a workspace of its own */
static void *group_worker(void *arg)
{
    group_run *R = arg;
    batch *B = R->B;
    wqueue *q = R->q;
    workspace ws;
    lm_err local;
    lm_err_clear(&local);
    size_t local_job = 0;
    if (!alloc_workspace(&ws, R->max_elems, R->want64, WQ_BUFS, R->placed) ||
        (R->want_stats && !alloc_stats_workspace(&ws, R->max_elems)) ||
        (B->n_jobs > 1 && (ws.raw = malloc(R->max_elems * sizeof(double) + 64)) == NULL))
        lm_fail(&local, LM_E_NOMEM, NULL, "out of memory for the tile workspace");
    for (size_t k; local.code == LM_OK && !wq_failed(q) &&
                   (k = __atomic_fetch_add(&R->next, 1, __ATOMIC_RELAXED)) < R->n_groups;)
        run_group(B, q, &R->m[R->g[k]], R->g[k + 1] - R->g[k], k, &ws, &local_job, &local);
    if (local.code != LM_OK)
        wq_fail(q, &local, local_job);
    wq_wait_buffers(q, &ws);
    free_workspace(&ws);
    return NULL;
}

/* the groups on n_threads threads, their writes through the write queue; the first error (and its
 * job) into err */
static lm_code run_groups(batch *B, const member *m, const size_t *g, size_t n_groups, int n_threads,
                          size_t *failed_job, lm_err *err)
{
    size_t max_elems = 1;
    for (size_t j = 0; j < B->n_jobs; j++)
        max_elems = B->Js[j].max_elems > max_elems ? B->Js[j].max_elems : max_elems;
    int want_stats = 0, want64 = 0;
    for (size_t j = 0; j < B->n_jobs; j++) {
        want_stats |= B->Js[j].tstat != NULL;
        for (size_t i = 0; i < B->Js[j].plan->n && !B->Js[j].lowrank_flags; i++)
            want64 |= B->Js[j].rt[i].exact_kind == LM_EXACT_F64;
    }
    wqueue q;
    lm_code rc = wq_init(&q, B, n_threads, err);
    if (rc != LM_OK)
        return rc;
    int placed = 0;
    for (size_t j = 0; j < B->n_jobs; j++)
        for (size_t sh = 0; sh < B->Js[j].n_shards; sh++)
            placed |= B->Js[j].w[sh] != NULL && lm_st_writer_is_direct(B->Js[j].w[sh]);
    group_run R = {B, &q, m, g, n_groups, 0, max_elems, want_stats, want64, placed};
    pthread_t io[WQ_IO];
    int n_io = 0;
    q.io = placed;
    while (q.io && n_io < WQ_IO && pthread_create(&io[n_io], NULL, wq_io_worker, &q) == 0)
        n_io++;
    q.io = n_io > 0;
    /* plain threads, not an OpenMP team: a thread done first waits (sleeps) for the others in
     * the write queue and the join, where libgomp's barriers spin; one that cannot be created
     * leaves its share to the others (the output does not depend on their number) */
    pthread_t *th = calloc((size_t)n_threads, sizeof *th);
    int n_started = 0;
    while (th != NULL && n_started < n_threads - 1 && pthread_create(&th[n_started], NULL, group_worker, &R) == 0)
        n_started++;
    group_worker(&R);
    for (int i = 0; i < n_started; i++)
        pthread_join(th[i], NULL);
    pthread_mutex_lock(&q.mu);
    q.io_stop = 1;
    pthread_cond_broadcast(&q.io_cv);
    pthread_mutex_unlock(&q.mu);
    for (int i = 0; i < n_io; i++)
        pthread_join(io[i], NULL);
    free(th);
    wq_free(&q);
    if (!q.failed)
        return LM_OK;
    *err = q.err;
    *failed_job = q.failed_job;
    return err->code;
}

/* A run whose output is more than half of the memory writes it with direct I/O
 * (lm_st_writer_direct), or where the file system offers none, with drop-behind
 * (lm_st_writer_drop_behind, advised every DROP_STEP bytes): the output cannot stay in the page
 * cache anyway, and bypassing it (or reusing the pages of the bytes already written back) costs
 * less than taking fresh pages (and leaves the base cached).  The output is the whole of what the plans write: a
 * batch's K outputs, one merge's file or shards, and for a shard worker the whole model too (all
 * its plan's shards, which the workers on one machine write together), not only its own shards:
 * the one rule for every way of merging one model.  A smaller output is left in the page cache
 * (it is often read next).  LM_DROP_BEHIND decides instead (the tests, the benches): 0 off, 1 on,
 * N > 1 on with a step of N bytes.  @return the step, 0: off */
#define DROP_STEP ((uint64_t)8 << 20)

static uint64_t drop_behind_step(uint64_t out_bytes)
{
    const char *e = getenv("LM_DROP_BEHIND");
    if (e != NULL && *e != '\0') {
        const long long v = atoll(e);
        return v <= 0 ? 0 : v == 1 ? DROP_STEP : (uint64_t)v;
    }
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 && out_bytes > (uint64_t)pages * (uint64_t)page / 2 ? DROP_STEP : 0;
}


/* the run of n_jobs plans over one model: every job's files written and checked (before_commit)
 * before any is committed; then job by job, its files renamed into place and its after_commit */
static lm_code exec_batch(job *Js, size_t n_jobs, const lm_plan *const *plans, const lm_model *model,
                          const char *const *out_paths, const lm_exec_opts *opts, pthread_mutex_t *lock,
                          drop_list *drops, size_t *n_init, size_t *failed_job, lm_err *err)
{
    const lm_exec_opts *o0 = opts;
    lm_kernels kern;
    const lm_kernels *k = o0 && o0->kernels ? o0->kernels : NULL;
    if (k == NULL) {
        lm_kernels_select(&kern, NULL);
        k = &kern;
    }
#ifdef _OPENMP
    int n_threads = threads_available(o0 && o0->n_threads > 0 ? o0->n_threads : omp_get_num_procs());
#else
    int n_threads = 1; /* built without OpenMP (the fuzz builds): one worker */
#endif
    lm_blas_single_thread();
    lm_code rc;
    batch B = {Js, n_jobs, 0, 0};
    uint64_t out_bytes = 0; /* every file of every plan (drop_behind_step) */
    for (size_t j = 0; j < n_jobs; j++) {
        *failed_job = j;
        rc = job_init(&Js[j], plans[j], model, out_paths[j], opts ? &opts[j] : NULL, k, lock, drops, n_threads, err);
        *n_init = j + 1;
        if (rc != LM_OK)
            return rc;
        B.total_bytes += Js[j].st.bytes_written;
        out_bytes += lm_plan_out_bytes(plans[j]);
    }
    const uint64_t drop_step = drop_behind_step(out_bytes);
    for (size_t j = 0; j < n_jobs && drop_step > 0; j++)
        for (size_t sh = 0; sh < Js[j].n_shards; sh++)
            if (Js[j].w[sh] != NULL && !lm_st_writer_direct(Js[j].w[sh]))
                lm_st_writer_drop_behind(Js[j].w[sh], drop_step);
    member *m = NULL;
    size_t *g = NULL, n_groups = 0;
    if ((rc = make_groups(Js, n_jobs, &m, &g, &n_groups, err)) == LM_OK)
        rc = run_groups(&B, m, g, n_groups, n_threads, failed_job, err);
    free(m);
    free(g);
    for (size_t j = 0; j < n_jobs && rc == LM_OK; j++) {
        *failed_job = j;
        Js[j].st.bytes_computed = Js[j].st.bytes_written - Js[j].st.bytes_copied;
        exact_stats(&Js[j], Js[j].opts, &Js[j].st);
        rc = finish_job(&Js[j], err);
    }
    for (size_t j = 0; j < n_jobs && rc == LM_OK; j++) {
        *failed_job = j;
        rc = commit_job(&Js[j], err);
    }
    return rc;
}

lm_code lm_exec_run_batch(size_t n_jobs, const lm_plan *const *plans, const lm_model *model,
                          const char *const *out_paths, const lm_exec_opts *opts, lm_exec_stats *stats,
                          size_t *failed_job, lm_err *err)
{
    lm_err local_err;
    lm_err_clear(&local_err);
    size_t n_init = 0, failed = 0;
    pthread_mutex_t lock;
    pthread_mutex_init(&lock, NULL);
    drop_list drops;
    memset(&drops, 0, sizeof drops);
    drops.batch = DROP_BATCH * (n_jobs < 16 ? n_jobs : 16);
    job *Js = calloc(n_jobs + 1, sizeof *Js);
    lm_code rc = Js == NULL ? lm_fail(&local_err, LM_E_NOMEM, NULL, "out of memory")
                            : exec_batch(Js, n_jobs, plans, model, out_paths, opts, &lock, &drops, &n_init, &failed,
                                         &local_err);
    for (size_t j = 0; j < n_init; j++) {
        if (rc == LM_OK && stats)
            stats[j] = Js[j].st;
        job_free(&Js[j], rc != LM_OK);
    }
    drops_flush(&drops);
    free(Js);
    pthread_mutex_destroy(&lock);
    if (rc != LM_OK) {
        if (err != NULL && err->code == LM_OK)
            *err = local_err;
        if (failed_job)
            *failed_job = failed;
    }
    return rc;
}

lm_code lm_exec_run(const lm_plan *plan, const lm_model *model, lm_adapter *const *adapters,
                    const char *out_path, const lm_exec_opts *opts, lm_exec_stats *stats,
                    lm_err *err)
{
    (void)adapters;
    return lm_exec_run_batch(1, &plan, model, &out_path, opts, stats, NULL, err);
}
