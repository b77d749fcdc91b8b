/* SPDX-License-Identifier: MIT */
/* lycoris.c : what LyCORIS files add to the LoRA / LoHa / LoKr modules that
 * src/peft/formats_kohya.c normalises from them, and LyCORIS's norm tuning.
 *
 * Weight decomposition ("DoRA", dora_scale; lycoris/modules/locon.py, loha.py, lokr.py,
 * apply_weight_decompose, and get_merged_weight for the multiplier):
 *     V = W + dW (dW with its scale alpha / r, never the multiplier)
 *     f = dora_scale / (||V|| + eps),  eps = 2^-23 (torch.finfo(float32).eps: V is cast to
 *         dora_scale's dtype, a float32 parameter in every LyCORIS release)
 *     W' = V * f, or V * (w * (f - 1) + 1) with a multiplier w != 1.
 * The norm is per output row over inputs and kernel positions (wd_on_out, LyCORIS >= 3.1.1's
 * default: dora_scale [out, 1, ...]) or per input channel over outputs and kernel positions (the
 * only form before LyCORIS 3.1.1: dora_scale [1, in, 1, ...]); the saved shape says which.
 * PEFT's DoRA (lora.c) is the same NORM op with eps 0, one factor per row or column and no mix:
 * here it gets eps, the columns of one input channel as a group, and the mix.
 *
 * Norm tuning (w_norm, b_norm; lycoris/modules/norms.py, NormModule.get_merged_weight):
 *     W' = W + w * w_norm, b' = b + w * b_norm on a LayerNorm / GroupNorm (a 1-D weight),
 * in float32 and rounded once to the base's dtype: the engine's ADD ops.  No PEFT type says it,
 * so it is a type of its own whose parts come along in any adapter (LM_M_PARTS_ANYWHERE).
 *
 * The part names ("lycoris_dora_scale", "lycoris_w_norm", "lycoris_b_norm") are lora-merge's,
 * accepted only in an adapter normalised from another tool's file: a PEFT directory holding
 * them is refused. */
#include "lycoris.h"

#include "lm_error.h"

#include <stdio.h>

#define LYCORIS_EPS 0x1p-23 /* torch.finfo(torch.float32).eps */

static lm_code only_foreign(lm_plan_ctx *ctx, const char *module, const char *part, lm_err *err)
{
    if (lm_ctx_adapter(ctx)->foreign != NULL)
        return LM_OK;
    return lm_module_fail(err, LM_E_FORMAT, "ForeignPart", module, "'%s' is lora-merge's name for a LyCORIS file's "
                          "tensor, not a PEFT part: give the LyCORIS file itself", part);
}

/* 1 if every dimension of t from `from` on is 1 */
static int ones_from(const lm_ts_tensor *t, size_t from)
{
    for (size_t d = from; d < t->n_dims; d++)
        if (t->shape[d] != 1)
            return 0;
    return 1;
}

lm_code lm_lycoris_dora(lm_plan_ctx *ctx, const char *module, long base, lm_op *delta, double scale,
                        const lm_ts_tensor *ds, lm_err *err)
{
    const lm_adapter *ad = lm_ctx_adapter(ctx);
    const lm_tensor_info *W = lm_ctx_base(ctx, base);
    if (only_foreign(ctx, module, "lycoris_dora_scale", err) != LM_OK)
        return err->code;
    if (!lm_is_float_dtype(ds->dtype))
        return lm_mismatch(err, module, "dora_scale is %s, not a float tensor", lm_dtype_name(ds->dtype));
    if (delta->kind == LM_OP_LOWRANK && delta->axis != 0)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", module,
                              "LyCORIS DoRA (dora_scale) on a layer stored [in, out] ('%s'): LyCORIS wraps nn.Linear "
                              "and convolutions only", W->name);
    char sw[96], sd[96];
    lm_shape_str(sw, sizeof sw, W->n_dims, W->shape);
    lm_shape_str(sd, sizeof sd, ds->n_dims, ds->shape);
    if (W->n_dims < 2 || ds->n_dims < 2)
        return lm_mismatch(err, module, "dora_scale %s does not fit base '%s' %s: LyCORIS saves [out, 1, ...] "
                           "(wd_on_out) or [1, in, 1, ...]", sd, W->name, sw);
    const uint64_t out = W->shape[0], in = W->shape[1], kk = W->n_elems / (out * in != 0 ? out * in : 1);
    int on_out = ds->shape[0] == out && ones_from(ds, 1);
    int on_in = !on_out && ds->shape[0] == 1 && ds->shape[1] == in && ones_from(ds, 2);
    if (!on_out && !on_in)
        return lm_mismatch(err, module, "dora_scale %s does not fit base '%s' %s: LyCORIS saves [%llu, 1, ...] "
                           "(one per output, wd_on_out) or [1, %llu, 1, ...] (one per input channel)", sd, W->name, sw,
                           (unsigned long long)out, (unsigned long long)in);
    delta->scale = scale; /* LyCORIS: the multiplier enters the factor, not the delta */
    lm_op *d = lm_ctx_add_op(ctx, base, LM_OP_NORM, "lycoris_dora", module, err);
    if (d == NULL)
        return LM_E_NOMEM;
    d->src = ds;
    d->axis = on_in;
    d->group = on_in ? kk : 0;
    d->eps = LYCORIS_EPS;
    d->mix = ad->weight != 1.0;
    d->scale = ad->weight;
    return LM_OK;
}

/* ---- norm tuning ------------------------------------------------------------------------- */
enum { NORM_W, NORM_B };

static lm_code norm_add(lm_plan_ctx *ctx, const lm_module *m, long bi, const lm_ts_tensor *t, const char *what,
                        lm_err *err)
{
    const lm_tensor_info *B = lm_ctx_base(ctx, bi);
    if (!lm_is_float_dtype(t->dtype) || !lm_is_float_dtype(B->dtype) || t->n_elems != B->n_elems) {
        char sb[96], st[96];
        lm_shape_str(sb, sizeof sb, B->n_dims, B->shape);
        lm_shape_str(st, sizeof st, t->n_dims, t->shape);
        return lm_mismatch(err, m->path, "%s %s %s does not fit base '%s' %s %s", what, lm_dtype_name(t->dtype), st,
                           B->name, lm_dtype_name(B->dtype), sb);
    }
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_ADD, what, m->path, err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->src = t;
    op->scale = lm_ctx_adapter(ctx)->weight;
    op->flops = (double)t->n_elems;
    return LM_OK;
}

static lm_code norm_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_ts_tensor *w = m->part[NORM_W], *b = m->part[NORM_B];
    if (only_foreign(ctx, m->path, w ? "lycoris_w_norm" : "lycoris_b_norm", err) != LM_OK)
        return err->code;
    if (w == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                              "b_norm without w_norm (LyCORIS loads a norm module by its w_norm)");
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (W->n_dims != 1) {
        char sw[96];
        lm_shape_str(sw, sizeof sw, W->n_dims, W->shape);
        return lm_module_fail(err, LM_E_MISMATCH, "ShapeMismatch", m->path,
                              "w_norm on '%s' %s: LyCORIS norm tuning adapts the 1-D weight of a LayerNorm or "
                              "GroupNorm, not a %zu-D tensor", W->name, sw, W->n_dims);
    }
    lm_code rc = norm_add(ctx, m, bi, w, "w_norm", err);
    if (rc == LM_OK && b != NULL) {
        long bb = lm_ctx_module_bias(ctx, m->path);
        if (bb < 0)
            return lm_module_fail(err, LM_E_MISMATCH, "NoMatchingTensor", m->path,
                                  "b_norm but the base norm has no bias (no '%s.bias')", m->path);
        rc = norm_add(ctx, m, bb, b, "b_norm", err);
    }
    return rc;
}

static void norm_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    (void)cfg;
    snprintf(buf, cap, "LyCORIS norm tuning: weight += w_norm%s", m->part[NORM_B] ? ", bias += b_norm" : "");
}

static const lm_part norm_parts[] = {{"lycoris_w_norm", NORM_W, -1, 0}, {"lycoris_b_norm", NORM_B, -1, 0}};

const lm_method lm_method_lycoris_norm = {
    .peft_type = "LYCORIS_NORM",
    .summary = "LyCORIS norm tuning from a LyCORIS file: W += w_norm, b += b_norm (not a PEFT type)",
    .parts = norm_parts,
    .n_parts = sizeof norm_parts / sizeof *norm_parts,
    .flags = LM_M_PARTS_ANYWHERE,
    .plan_module = norm_plan_module,
    .describe = norm_describe,
};
