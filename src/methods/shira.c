/* shira.c : SHiRA (peft-merge.md §5.14): W[rows[t], cols[t]] += scale * shira_weight[t].
 * The indices are data: read and checked when planning (a bad one fails before anything is
 * written) and kept sorted by row (stable, so repeated entries add in file order), so a tile
 * touches only its own entries. */
#include "method.h"

#include "lm_error.h"

#include <stdlib.h>
#include <string.h>

enum { SW, SI };

typedef struct {
    const lm_ts_tensor *w;
    uint64_t *row_start; /* [out + 1]: entries of row o are row_start[o] .. row_start[o+1] */
    uint64_t *col, *wi;  /* per entry (row order): its column and its index into shira_weight */
} shira_params;

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
    uint64_t nnz = w->n_elems;
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "shira", m->path, err);
    shira_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    uint64_t *rc = pr ? lm_ctx_alloc(ctx, (size_t)(2 * nnz) * sizeof *rc, err) : NULL;
    if (pr == NULL || rc == NULL || (pr->row_start = lm_ctx_alloc(ctx, (size_t)(o + 2) * sizeof(uint64_t), err)) == NULL ||
        (pr->col = lm_ctx_alloc(ctx, (size_t)nnz * sizeof(uint64_t), err)) == NULL ||
        (pr->wi = lm_ctx_alloc(ctx, (size_t)nnz * sizeof(uint64_t), err)) == NULL)
        return LM_E_NOMEM;
    for (uint64_t q = 0; q < 2 * nnz; q++) {
        const uint8_t *d = ix->data;
        double v;
        if (ix->dtype == LM_DT_I32) {
            int32_t x;
            memcpy(&x, d + 4 * q, 4);
            v = x;
        } else if (ix->dtype == LM_DT_I64) {
            int64_t x;
            memcpy(&x, d + 8 * q, 8);
            v = (double)x;
        } else { /* F32: saved on Windows */
            float x;
            memcpy(&x, d + 4 * q, 4);
            v = x;
        }
        uint64_t lim = q < nnz ? o : in;
        if (!(v >= 0) || v != (double)(long)v || (uint64_t)v >= lim)
            return lm_module_fail(err, LM_E_MISMATCH, "IndexOutOfRange", m->path,
                                  "shira_indices holds %g, outside [0, %llu)", v, (unsigned long long)lim);
        rc[q] = (uint64_t)v;
    }
    /* counting sort by row: stable */
    for (uint64_t t = 0; t < nnz; t++)
        pr->row_start[rc[t] + 2]++;
    for (uint64_t r = 2; r < o + 2; r++)
        pr->row_start[r] += pr->row_start[r - 1];
    for (uint64_t t = 0; t < nnz; t++) {
        uint64_t at = pr->row_start[rc[t] + 1]++;
        pr->col[at] = rc[nnz + t];
        pr->wi[at] = t;
    }
    pr->w = w;
    op->scale = lm_ctx_adapter(ctx)->weight;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static lm_code shira_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const shira_params *pr = op->params;
    return (p->a = lm_prep_view(p, pr->w, k, err)) != NULL ? LM_OK : LM_E_NOMEM;
}

static void shira_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const shira_params *pr = op->params;
    const float s = (float)op->scale;
    for (uint64_t r = 0; r < t->nr; r++) {
        uint64_t R = t->r0 + r;
        float *row = t->acc + r * t->cols;
        for (uint64_t e = pr->row_start[R]; e < pr->row_start[R + 1]; e++)
            row[pr->col[e]] += p->a[pr->wi[e]] * s;
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
};
