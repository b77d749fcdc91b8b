/* SPDX-License-Identifier: MIT */
/* shira.c : SHiRA (peft-merge.md §5.14): W[rows[t], cols[t]] += scale * shira_weight[t].
 * The indices are data: checked when planning (a bad one fails before anything is written) and
 * sorted by row per tensor when its first tile is claimed, so a tile touches only its own
 * entries and memory is one module's indices at a time.  The exact path (apply_tile64) adds the
 * same entries in f64. */
#include "method.h"

#include "lm_error.h"

#include <stdlib.h>
#include <string.h>

enum { SW, SI };

typedef struct {
    const lm_ts_tensor *w, *ix; /* shira_weight [nnz], shira_indices [2, nnz] (rows, then columns) */
    uint64_t rows;
} shira_params;

/* built per tensor: the entries sorted by row (stable, so repeated entries add in file order) */
typedef struct {
    uint64_t *row_start; /* [rows + 1]: entries of row o are row_start[o] .. row_start[o+1] */
    uint64_t *col, *wi;  /* per entry (row order): its column and its index into shira_weight */
} shira_prep;

/* index q of shira_indices (I32, I64, or F32 as saved on Windows) */
static double index_at(const lm_ts_tensor *ix, uint64_t q)
{
    const uint8_t *d = ix->data;
    if (ix->dtype == LM_DT_I32) {
        int32_t x;
        memcpy(&x, d + 4 * q, 4);
        return x;
    }
    if (ix->dtype == LM_DT_I64) {
        int64_t x;
        memcpy(&x, d + 8 * q, 8);
        return (double)x;
    }
    float x;
    memcpy(&x, d + 4 * q, 4);
    return x;
}

static lm_code shira_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_ts_tensor *w = m->part[SW], *ix = m->part[SI];
    long bi = lm_ctx_weight_2d(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    uint64_t o = W->shape[0], in = W->shape[1];
    if (w == NULL || ix == NULL || ix->n_dims != 2 || ix->shape[0] != 2 || ix->shape[1] != w->n_elems ||
        !lm_is_float_dtype(w->dtype))
        return lm_mismatch(err, m->path, "SHiRA needs shira_weight [nnz] and shira_indices [2, nnz]");
    if (ix->dtype != LM_DT_I32 && ix->dtype != LM_DT_I64 && ix->dtype != LM_DT_F32)
        return lm_mismatch(err, m->path, "shira_indices has dtype %s", lm_dtype_name(ix->dtype));
    /* PEFT makes r * (out + in) entries ('r', no pattern) */
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    if (lm_cfg_checked(ctx) && cfg->r_given &&
        (w->n_elems % (o + in) != 0 || w->n_elems / (o + in) != (uint64_t)cfg->r))
        return lm_cfg_disagrees(ctx, err, m->path, "r", cfg->r, "shira_weight holds %llu entries, not r * (out + in) "
                                "with out + in = %llu", (unsigned long long)w->n_elems, (unsigned long long)(o + in));
    /* the indices are data: checked here, so that a bad one fails before anything is written;
     * kept in the adapter, not copied (prepare sorts them per tensor) */
    uint64_t nnz = w->n_elems;
    for (uint64_t q = 0; q < 2 * nnz; q++) {
        double v = index_at(ix, q);
        uint64_t lim = q < nnz ? o : in;
        if (!(v >= 0) || v != (double)(long)v || (uint64_t)v >= lim)
            return lm_module_fail(err, LM_E_MISMATCH, "IndexOutOfRange", m->path,
                                  "shira_indices holds %g, outside [0, %llu)", v, (unsigned long long)lim);
    }
    lm_ts_drop_pages(ix); /* read again when the tensor is merged: not kept resident meanwhile */
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "shira", m->path, err);
    shira_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    *pr = (shira_params){w, ix, o};
    op->scale = lm_ctx_adapter(ctx)->weight;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static lm_code shira_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const shira_params *pr = op->params;
    uint64_t nnz = pr->w->n_elems, o = pr->rows;
    shira_prep *sp = lm_prep_alloc(p, sizeof *sp, err);
    if (sp == NULL || (p->a = lm_prep_view(p, pr->w, k, err)) == NULL ||
        (sp->row_start = lm_prep_alloc(p, (size_t)(o + 2) * sizeof(uint64_t), err)) == NULL ||
        (sp->col = lm_prep_alloc(p, (size_t)(nnz + 1) * sizeof(uint64_t), err)) == NULL ||
        (sp->wi = lm_prep_alloc(p, (size_t)(nnz + 1) * sizeof(uint64_t), err)) == NULL)
        return LM_E_NOMEM;
    lm_prep_read(p, pr->ix);
    /* counting sort by row: stable */
    for (uint64_t t = 0; t < nnz; t++)
        sp->row_start[(uint64_t)index_at(pr->ix, t) + 2]++;
    for (uint64_t r = 2; r < o + 2; r++)
        sp->row_start[r] += sp->row_start[r - 1];
    for (uint64_t t = 0; t < nnz; t++) {
        uint64_t at = sp->row_start[(uint64_t)index_at(pr->ix, t) + 1]++;
        sp->col[at] = (uint64_t)index_at(pr->ix, nnz + t);
        sp->wi[at] = t;
    }
    p->data = sp;
    return LM_OK;
}

static void shira_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const shira_prep *sp = p->data;
    const float s = (float)op->scale;
    for (uint64_t r = 0; r < t->nr; r++) {
        uint64_t R = t->r0 + r;
        float *row = t->acc + r * t->cols;
        for (uint64_t e = sp->row_start[R]; e < sp->row_start[R + 1]; e++)
            row[sp->col[e]] += p->a[sp->wi[e]] * s;
    }
}

/* the exact path: the same entries added in f64 (scale * w exact to f64 noise), rounded once by the
 * engine */
static void shira_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const shira_prep *sp = p->data;
    for (uint64_t r = 0; r < t->nr; r++) {
        uint64_t R = t->r0 + r;
        double *row = t->acc + r * t->cols;
        for (uint64_t e = sp->row_start[R]; e < sp->row_start[R + 1]; e++)
            row[sp->col[e]] += (double)p->a[sp->wi[e]] * op->scale;
    }
}

static const lm_part shira_parts[] = {{"shira_weight", SW, -1, 1}, {"shira_indices", SI, -1, 1}};

const lm_method lm_method_shira = {
    .peft_type = "SHIRA",
    .summary = "shira (sparse entries added)",
    .parts = shira_parts,
    .n_parts = 2,
    .plan_module = shira_plan_module,
    .prepare = shira_prepare,
    .apply_tile = shira_apply,
    .apply_tile64 = shira_apply64,
};
