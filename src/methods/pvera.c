/* SPDX-License-Identifier: MIT */
/* pvera.c : PVeRA (docs/adapter-types.md, PVeRA): VeRA whose A has 2r rows (a mean and a
 * log-variance half); the merge keeps the mean, as PEFT's get_delta_weight:
 * W += (lambda_b * B[:out, :r]) @ (lambda_d[:r] * A[:r, :in]) from the projections A [2r, >= in],
 * B [>= out, r] shared by every layer (saved as base_model.pvera_A / pvera_B).  The scaled
 * slices are built per tensor when its first tile is claimed, so memory does not grow with the
 * number of layers. */
#include "vera.h"

#include "lm_error.h"

#include <stdio.h>

enum { LB, LD };

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
    uint64_t r = B->shape[1];
    if (A->shape[0] != 2 * r || ld->n_elems != 2 * r)
        return lm_mismatch(err, m->path, "base_model.pvera_A has %llu rows and pvera_lambda_d %llu elements; "
                           "PVeRA needs 2r = %llu for both (base_model.pvera_B has r = %llu columns)",
                           (unsigned long long)A->shape[0], (unsigned long long)ld->n_elems,
                           (unsigned long long)(2 * r), (unsigned long long)r);
    if (lm_cfg_rank_is(ctx, err, m->path, r, "base_model.pvera_B") != LM_OK)
        return err->code;
    return lm_vera_add(ctx, m, "pvera", A, B, lb, ld, r, err);
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
    .prepare = lm_vera_prepare,
};
