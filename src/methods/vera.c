/* SPDX-License-Identifier: MIT */
/* vera.c : VeRA (peft-merge.md §5.8): W += (lambda_b * B[:out]) @ (lambda_d * A[:, :in]) from the
 * projections A, B shared by every layer (saved as base_model.vera_A / vera_B).  The scaled
 * slices are built per tensor when its first tile is claimed, so memory does not grow with the
 * number of layers. */
#include "vera.h"

#include "lm_error.h"

#include <stdio.h>

enum { LB, LD };

static lm_code vera_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    (void)c;
    if (cJSON_IsFalse(lm_cfg_field(root, "save_projection")))
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type VERA with save_projection false: the "
                       "shared projections would have to be regenerated from torch's random generator; not supported");
    return LM_OK;
}

/* the rest of a VeRA-like module's plan (VeRA, PVeRA): lambda_b against B's rows and the base,
 * the base's inputs against A's columns, then the op.  name: the tensors' prefix and the op's
 * name ("vera", "pvera"; static storage) */
lm_code lm_vera_add(lm_plan_ctx *ctx, const lm_module *m, const char *name, const lm_ts_tensor *A,
                    const lm_ts_tensor *B, const lm_ts_tensor *lb, const lm_ts_tensor *ld, uint64_t r, lm_err *err)
{
    uint64_t out = lb->n_elems;
    if (out > B->shape[0])
        return lm_mismatch(err, m->path, "%s_lambda_b has %llu elements, more than base_model.%s_B's %llu rows",
                           name, (unsigned long long)out, name, (unsigned long long)B->shape[0]);
    /* the input size comes from the base: [out, in] or, for Conv1D, [in, out] */
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (W->n_dims != 2 || (W->shape[0] != out && W->shape[1] != out))
        return lm_mismatch(err, m->path, "%s_lambda_b has %llu elements but base '%s' has no such dimension",
                           name, (unsigned long long)out, W->name);
    int orient = W->shape[0] == out && !(W->shape[1] == out && lm_is_gpt2_conv1d(m->path)) ? 0 : 1;
    uint64_t in = orient ? W->shape[0] : W->shape[1];
    if (in > A->shape[1])
        return lm_mismatch(err, m->path, "the layer has %llu inputs, more than base_model.%s_A's %llu columns",
                           (unsigned long long)in, name, (unsigned long long)A->shape[1]);
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, name, m->path, r, in, out, orient, 1.0, sizeof(lm_vera_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(lm_vera_params *)op->params = (lm_vera_params){A, B, lb, ld};
    return LM_OK;
}

static lm_code vera_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_ts_tensor *A = lm_ctx_shared(ctx, "vera_A"), *B = lm_ctx_shared(ctx, "vera_B");
    const lm_ts_tensor *lb = m->part[LB], *ld = m->part[LD];
    if (lb == NULL || ld == NULL || A == NULL || B == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                              "VeRA needs vera_lambda_b, vera_lambda_d and the shared base_model.vera_A / base_model.vera_B");
    if (A->n_dims != 2 || B->n_dims != 2 || A->shape[0] != B->shape[1] || !lm_is_float_dtype(A->dtype) ||
        !lm_is_float_dtype(B->dtype) || !lm_is_float_dtype(lb->dtype) || !lm_is_float_dtype(ld->dtype))
        return lm_mismatch(err, m->path, "the factors are not [r, in] and [out, r] float matrices");
    uint64_t r = A->shape[0];
    if (ld->n_elems != r)
        return lm_mismatch(err, m->path, "vera_lambda_d has %llu elements but the projections have rank %llu",
                           (unsigned long long)ld->n_elems, (unsigned long long)r);
    if (lm_cfg_rank_is(ctx, err, m->path, r, "base_model.vera_A") != LM_OK)
        return err->code;
    return lm_vera_add(ctx, m, "vera", A, B, lb, ld, r, err);
}

/* see vera.h.  The f32 slices are PEFT's products rounded to f32 (the f32 path); a64 and b64 hold
 * the same products in f64, where a product of two floats is exact, so that the certified path
 * (exec_lowrank.c) sums the exact terms lambda_b[o] B[o, q] lambda_d[q] A[q, j] */
lm_code lm_vera_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const lm_vera_params *pr = op->params;
    uint64_t r = op->rank, lda = pr->A->shape[1];
    const float *A = lm_prep_view(p, pr->A, k, err), *B = lm_prep_view(p, pr->B, k, err);
    const float *lb = lm_prep_view(p, pr->lb, k, err), *ld = lm_prep_view(p, pr->ld, k, err);
    float *a2 = lm_prep_floats(p, (size_t)(r * op->in), err), *b2 = lm_prep_floats(p, (size_t)(op->out * r), err);
    double *a64 = a2 && b2 ? lm_prep_alloc(p, (size_t)(r * op->in) * sizeof *a64, err) : NULL;
    double *b64 = a64 ? lm_prep_alloc(p, (size_t)(op->out * r) * sizeof *b64, err) : NULL;
    if (A == NULL || B == NULL || lb == NULL || ld == NULL || b64 == NULL)
        return LM_E_NOMEM;
    for (uint64_t q = 0; q < r; q++)
        for (uint64_t j = 0; j < op->in; j++) {
            a2[q * op->in + j] = ld[q] * A[q * lda + j];
            a64[q * op->in + j] = (double)ld[q] * (double)A[q * lda + j];
        }
    for (uint64_t o = 0; o < op->out; o++)
        for (uint64_t q = 0; q < r; q++) {
            b2[o * r + q] = lb[o] * B[o * r + q];
            b64[o * r + q] = (double)lb[o] * (double)B[o * r + q];
        }
    p->a = a2;
    p->b = b2;
    p->a64 = a64;
    p->b64 = b64;
    return LM_OK;
}

static const lm_part vera_parts[] = {{"vera_lambda_b", LB, -1, 1}, {"vera_lambda_d", LD, -1, 1}};
static const char *const vera_shared[] = {"vera_A", "vera_B", NULL};

const lm_method lm_method_vera = {
    .peft_type = "VERA",
    .summary = "vera (shared projections, per-layer lambdas)",
    .parts = vera_parts,
    .n_parts = 2,
    .shared = vera_shared,
    .parse_config = vera_parse,
    .plan_module = vera_plan_module,
    .prepare = lm_vera_prepare,
};
