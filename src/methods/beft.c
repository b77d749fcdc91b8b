/* SPDX-License-Identifier: MIT */
/* beft.c : BEFT (peft-merge.md §5.14): the layer's bias += beft_bias. */
#include "method.h"

#include "lm_error.h"

static lm_code beft_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_ts_tensor *d = m->part[0];
    long bb = lm_ctx_module_bias(ctx, m->path);
    if (bb < 0)
        return lm_module_fail(err, LM_E_MISMATCH, "NoMatchingTensor", m->path,
                              "BEFT needs a bias but the base layer has none (no '%s.bias')", m->path);
    if (lm_ctx_base(ctx, bb)->n_elems != d->n_elems || !lm_is_float_dtype(d->dtype))
        return lm_mismatch(err, m->path, "beft_bias has %llu elements but the base bias has %llu",
                           (unsigned long long)d->n_elems, (unsigned long long)lm_ctx_base(ctx, bb)->n_elems);
    lm_op *op = lm_ctx_add_op(ctx, bb, LM_OP_ADD, "beft", m->path, err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->src = d;
    op->scale = lm_ctx_adapter(ctx)->weight;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static const lm_part beft_parts[] = {{"beft_bias", 0, -1, 1}};

const lm_method lm_method_beft = {
    .peft_type = "BEFT",
    .summary = "beft (bias added)",
    .parts = beft_parts,
    .n_parts = 1,
    .plan_module = beft_plan_module,
};
