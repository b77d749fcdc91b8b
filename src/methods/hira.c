/* SPDX-License-Identifier: MIT */
/* hira.c : HiRA (peft-merge.md §5.14): W += scale * W * (B @ A) (Hadamard product with the base),
 * for Linear, Conv1D (transposed) and Embedding (hira_embedding_A/B, transposed). */
#include "method.h"

#include "gemm_tile.h"
#include "lm_error.h"

#include <string.h>

enum { HA, HB, HEA, HEB };

typedef struct {
    const lm_ts_tensor *A, *B;
} hira_params;

static lm_code hira_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    int embedding = m->part[HEA] || m->part[HEB];
    const lm_ts_tensor *A = embedding ? m->part[HEA] : m->part[HA], *B = embedding ? m->part[HEB] : m->part[HB];
    if (A == NULL || B == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                              "HiRA needs both hira_A and hira_B (in a HIRA adapter)");
    if (A->n_dims != 2 || B->n_dims != 2 || A->shape[0] != B->shape[1] || !lm_is_float_dtype(A->dtype) ||
        !lm_is_float_dtype(B->dtype))
        return lm_mismatch(err, m->path, "the factors are not [r, in] and [out, r] float matrices");
    uint64_t r = A->shape[0], out = B->shape[0], in = A->shape[1];
    if (lm_cfg_rank_is(ctx, err, m->path, r, embedding ? "hira_embedding_A" : "hira_A") != LM_OK)
        return err->code;
    int orient = 0;
    long bi;
    if (embedding) { /* W [V, D], A [r, V], B [D, r]: (B@A)^T */
        bi = lm_ctx_weight_for(ctx, m->path, in, out, &orient, err);
        if (bi < 0)
            return err->code;
        if (orient != 0)
            return lm_mismatch(err, m->path, "embedding weight is not [vocab, dim]");
        orient = 1;
    } else if ((bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err)) < 0) {
        return err->code;
    }
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_METHOD, "hira", m->path, r, in, out, orient, 1.0, sizeof(hira_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(hira_params *)op->params = (hira_params){A, B};
    return LM_OK;
}

static lm_code hira_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const hira_params *pr = op->params;
    if ((p->a = lm_prep_view(p, pr->A, k, err)) == NULL || (p->b = lm_prep_view(p, pr->B, k, err)) == NULL)
        return LM_E_NOMEM;
    return LM_OK;
}

/* the product for these rows, then elementwise */
static void hira_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    float *t1 = t->scratch;
    size_t n = (size_t)(t->nr * t->cols);
    const float s = (float)op->scale;
    memset(t1, 0, n * sizeof *t1);
    if (!op->axis)
        lm_gemm_tile_nn(t->k, t1, (size_t)t->nr, (size_t)t->cols, p->b + t->r0 * op->rank, p->a, (size_t)op->rank, 1.0f);
    else
        lm_gemm_tile_tt(t->k, t1, (size_t)t->nr, (size_t)t->cols, p->a + t->r0, (size_t)op->in, p->b, (size_t)op->rank, 1.0f);
    for (size_t i = 0; i < n; i++)
        t->acc[i] += t->acc[i] * t1[i] * s;
}

/* the same in f64: W + s W (B A), the product's sums in f64 (k ascending) */
static void hira_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const uint64_t R = op->rank, cols = t->cols;
    double *y = t->scratch;
    for (uint64_t r = 0; r < t->nr; r++) {
        const uint64_t i = t->r0 + r;
        for (uint64_t c = 0; c < cols; c++)
            y[c] = 0.0;
        for (uint64_t k = 0; k < R; k++) {
            if (!op->axis) { /* B [out, r] row i, A [r, in] */
                const double f = (double)p->b[i * R + k];
                for (uint64_t c = 0; c < cols; c++)
                    y[c] += f * (double)p->a[k * cols + c];
            } else { /* stored [in, out]: (B A)^T[i, c] = sum_k A[k, i] B[c, k] */
                const double f = (double)p->a[k * op->in + i];
                for (uint64_t c = 0; c < cols; c++)
                    y[c] += f * (double)p->b[c * R + k];
            }
        }
        double *w = t->acc + r * cols;
        for (uint64_t c = 0; c < cols; c++)
            w[c] += w[c] * y[c] * op->scale;
    }
}

static const lm_part hira_parts[] = {
    {"hira_A", HA, -1, 1}, {"hira_B", HB, -1, 1}, {"hira_embedding_A", HEA, -1, 1}, {"hira_embedding_B", HEB, -1, 1},
};

const lm_method lm_method_hira = {
    .peft_type = "HIRA",
    .summary = "hira (W += W * B@A)",
    .parts = hira_parts,
    .n_parts = sizeof hira_parts / sizeof *hira_parts,
    .plan_module = hira_plan_module,
    .prepare = hira_prepare,
    .apply_tile = hira_apply,
    .apply_tile64 = hira_apply64,
};
