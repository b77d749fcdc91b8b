/* SPDX-License-Identifier: MIT */
/* pvera.c : PVeRA (docs/adapter-types.md, PVeRA): VeRA whose A has 2r rows (a mean and a
 * log-variance half); the merge keeps the mean, as PEFT's get_delta_weight:
 * W += (lambda_b * B[:out, :r]) @ (lambda_d[:r] * A[:r, :in]) from the projections A [2r, >= in],
 * B [>= out, r] shared by every layer (saved as base_model.pvera_A / pvera_B).  The scaled
 * slices are built per tensor when its first tile is claimed, so memory does not grow with the
 * number of layers. */
#include "method.h"

#include "lm_error.h"

#include <stdio.h>

enum { LB, LD };

typedef struct {
    const lm_ts_tensor *A, *B, *lb, *ld; /* shared A [r, >= in], B [>= out, r]; lambdas [out], [r] */
} pvera_params;

static lm_code pvera_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    (void)c;
    if (cJSON_IsFalse(lm_cfg_field(root, "save_projection")))
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type PVERA with save_projection false: the "
                       "shared projections would have to be regenerated from torch's random generator; not supported");
    return LM_OK;
}

static lm_code pvera_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_ts_tensor *A = lm_ctx_shared(ctx, "pvera_A"), *B = lm_ctx_shared(ctx, "pvera_B");
    const lm_ts_tensor *lb = m->part[LB], *ld = m->part[LD];
    if (lb == NULL || ld == NULL || A == NULL || B == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                              "PVeRA needs pvera_lambda_b, pvera_lambda_d and the shared base_model.pvera_A / base_model.pvera_B");
    if (A->n_dims != 2 || B->n_dims != 2 || !lm_is_float_dtype(A->dtype) ||
        !lm_is_float_dtype(B->dtype) || !lm_is_float_dtype(lb->dtype) || !lm_is_float_dtype(ld->dtype))
        return lm_mismatch(err, m->path, "the projections are not [2r, in] and [out, r] float matrices");
    /* A holds the mean rows, then the log-variance rows: [2r, in]; B is [out, r] */
    uint64_t r = B->shape[1], out = lb->n_elems;
    if (A->shape[0] != 2 * r || ld->n_elems != 2 * r)
        return lm_mismatch(err, m->path, "base_model.pvera_A has %llu rows and pvera_lambda_d %llu elements; "
                           "PVeRA needs 2r = %llu for both (base_model.pvera_B has r = %llu columns)",
                           (unsigned long long)A->shape[0], (unsigned long long)ld->n_elems,
                           (unsigned long long)(2 * r), (unsigned long long)r);
    if (out > B->shape[0])
        return lm_mismatch(err, m->path, "pvera_lambda_b has %llu elements, more than base_model.pvera_B's %llu rows",
                           (unsigned long long)out, (unsigned long long)B->shape[0]);
    /* the input size comes from the base: [out, in] or, for Conv1D, [in, out] */
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (W->n_dims != 2 || (W->shape[0] != out && W->shape[1] != out))
        return lm_mismatch(err, m->path, "pvera_lambda_b has %llu elements but base '%s' has no such dimension",
                           (unsigned long long)out, W->name);
    int orient = W->shape[0] == out && !(W->shape[1] == out && lm_is_gpt2_conv1d(m->path)) ? 0 : 1;
    uint64_t in = orient ? W->shape[0] : W->shape[1];
    if (in > A->shape[1])
        return lm_mismatch(err, m->path, "the layer has %llu inputs, more than base_model.pvera_A's %llu columns",
                           (unsigned long long)in, (unsigned long long)A->shape[1]);
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "pvera", m->path, r, in, out, orient, 1.0, sizeof(pvera_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(pvera_params *)op->params = (pvera_params){A, B, lb, ld};
    return LM_OK;
}

/* A' = lambda_d[:r] * A[:r, :in] ([rank, in]) and B' = lambda_b * B[:out, :] ([out, rank]) */
static lm_code pvera_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const pvera_params *pr = op->params;
    uint64_t r = op->rank, lda = pr->A->shape[1];
    const float *A = lm_prep_view(p, pr->A, k, err), *B = lm_prep_view(p, pr->B, k, err);
    const float *lb = lm_prep_view(p, pr->lb, k, err), *ld = lm_prep_view(p, pr->ld, k, err);
    float *a2 = lm_prep_floats(p, (size_t)(r * op->in), err), *b2 = lm_prep_floats(p, (size_t)(op->out * r), err);
    if (A == NULL || B == NULL || lb == NULL || ld == NULL || a2 == NULL || b2 == NULL)
        return LM_E_NOMEM;
    for (uint64_t q = 0; q < r; q++)
        for (uint64_t j = 0; j < op->in; j++)
            a2[q * op->in + j] = ld[q] * A[q * lda + j];
    for (uint64_t o = 0; o < op->out; o++)
        for (uint64_t q = 0; q < r; q++)
            b2[o * r + q] = lb[o] * B[o * r + q];
    p->a = a2;
    p->b = b2;
    return LM_OK;
}

static const lm_part pvera_parts[] = {{"pvera_lambda_b", LB, -1, 1}, {"pvera_lambda_d", LD, -1, 1}};
static const char *const pvera_shared[] = {"pvera_A", "pvera_B", NULL};

const lm_method lm_method_pvera = {
    .peft_type = "PVERA",
    .summary = "pvera (shared projections, per-layer lambdas; the mean half)",
    .parts = pvera_parts,
    .n_parts = 2,
    .shared = pvera_shared,
    .parse_config = pvera_parse,
    .plan_module = pvera_plan_module,
    .prepare = pvera_prepare,
};
