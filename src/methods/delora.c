/* SPDX-License-Identifier: MIT */
/* delora.c : DeLoRA (peft-merge.md §5.14): W += B diag(lambda / r / (max(|A_j|, 1e-4)
 * max(|B_.j|, 1e-4))) A, columns scaled by the saved w_norm; a low-rank delta whose factors are
 * built when the tensor's first tile is claimed (the scaled A in f64, published with its f32
 * rounding).  Conv1D layers are refused (PEFT does too). */
#include "method.h"

#include "lm_error.h"

#include <math.h>
#include <string.h>

enum { DA, DB, DL, DN };

typedef struct {
    const lm_ts_tensor *A, *B, *lambda, *w_norm;
} delora_params;

static lm_code delora_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_ts_tensor *a = m->part[DA], *b = m->part[DB], *l = m->part[DL], *nrm = m->part[DN];
    if (!a || !b || !l || !nrm || a->n_dims != 2 || b->n_dims != 2 || a->shape[0] != b->shape[1] || l->n_elems != 1 ||
        nrm->n_elems != a->shape[1])
        return lm_mismatch(err, m->path, "DeLoRA needs delora_A [r, in], delora_B [out, r], delora_lambda [1] "
                           "and delora_w_norm [in]");
    const lm_ts_tensor *x[4] = {a, b, l, nrm};
    for (int q = 0; q < 4; q++)
        if (!lm_is_float_dtype(x[q]->dtype))
            return lm_mismatch(err, m->path, "'%s' is not a float tensor", x[q]->name);
    uint64_t K = a->shape[0], in = a->shape[1], out = b->shape[0];
    if (lm_cfg_rank_is(ctx, err, m->path, K, "delora_A") != LM_OK)
        return err->code;
    int orient = 0;
    long bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err);
    if (bi < 0)
        return err->code;
    if (orient == 1)
        return lm_mismatch(err, m->path, "DeLoRA on a Conv1D layer is not supported (PEFT does not either)");
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "delora", m->path, K, in, out, 0, 1.0, sizeof(delora_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(delora_params *)op->params = (delora_params){a, b, l, nrm};
    return LM_OK;
}

static lm_code delora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const delora_params *pr = op->params;
    uint64_t K = op->rank, in = op->in, out = op->out;
    const float *a = lm_prep_view(p, pr->A, k, err), *b = a ? lm_prep_view(p, pr->B, k, err) : NULL;
    const float *l = b ? lm_prep_view(p, pr->lambda, k, err) : NULL, *wn = l ? lm_prep_view(p, pr->w_norm, k, err) : NULL;
    double *a64 = wn ? lm_prep_alloc(p, (size_t)(K * in) * sizeof(double), err) : NULL;
    if (a64 == NULL)
        return LM_E_NOMEM;
    double lambda = l[0];
    for (uint64_t j = 0; j < K; j++) {
        double na = 0, nb = 0;
        for (uint64_t i = 0; i < in; i++)
            na += (double)a[j * in + i] * (double)a[j * in + i];
        for (uint64_t o = 0; o < out; o++)
            nb += (double)b[o * K + j] * (double)b[o * K + j];
        double d = lambda / (double)K / (fmax(sqrt(na), 1e-4) * fmax(sqrt(nb), 1e-4));
        for (uint64_t i = 0; i < in; i++)
            a64[j * in + i] = (double)a[j * in + i] * d * (double)wn[i];
    }
    p->b = b;
    return lm_prep_publish64(p, a64, (size_t)(K * in), NULL, 0, err);
}

static const lm_part delora_parts[] = {
    {"delora_A", DA, -1, 1}, {"delora_B", DB, -1, 1}, {"delora_lambda", DL, -1, 1}, {"delora_w_norm", DN, -1, 1},
};

const lm_method lm_method_delora = {
    .peft_type = "DELORA",
    .summary = "delora (normalised low-rank delta)",
    .parts = delora_parts,
    .n_parts = 4,
    .plan_module = delora_plan_module,
    .prepare = delora_prepare,
};
