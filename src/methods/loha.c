/* SPDX-License-Identifier: MIT */
/* loha.c : LoHa (peft-merge.md §5.4) on Linear weights: W += (w1a @ w1b) * (w2a @ w2b) * alpha/r,
 * the two products computed per row tile, then multiplied elementwise.  The CP (Tucker) forms
 * of convolutions (hada_t1/t2) are refused. */
#include "method.h"

#include "gemm_tile.h"
#include "lm_error.h"

#include <stdio.h>
#include <string.h>

enum { W1A, W1B, W2A, W2B, T1, T2 };

typedef struct {
    const lm_ts_tensor *f[4]; /* w1a [o, r], w1b [r, i], w2a [o, r], w2b [r, i] */
} loha_params;

typedef struct {
    const float *f[4];
} loha_prep;

static lm_code loha_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    if (m->part[T1] || m->part[T2])
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path, "%s with a CP-decomposed convolution "
                              "(use_effective_conv2d) is not supported by lora-merge yet", cfg->peft_type);
    const lm_ts_tensor *f[4] = {m->part[W1A], m->part[W1B], m->part[W2A], m->part[W2B]};
    for (int q = 0; q < 4; q++) {
        if (f[q] == NULL)
            return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "%s module lacks a factor (%s)",
                                  cfg->peft_type, "hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b are needed");
        if (f[q]->n_dims != 2 || !lm_is_float_dtype(f[q]->dtype))
            return lm_mismatch(err, m->path, "%s factor '%s' is not a 2-D float tensor (convolution forms are not "
                               "supported yet)", cfg->peft_type, f[q]->name);
    }
    long r;
    double alpha;
    if (lm_ctx_rank_alpha(ctx, m->path, &r, &alpha, err) != LM_OK)
        return err->code;
    long bi = lm_ctx_weight_2d(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    /* [o, r1] @ [r1, i] and [o, r2] @ [r2, i], all equal to W's [o, i] */
    if (f[0]->shape[1] != f[1]->shape[0] || f[2]->shape[1] != f[3]->shape[0] || f[0]->shape[0] != W->shape[0] ||
        f[2]->shape[0] != W->shape[0] || f[1]->shape[1] != W->shape[1] || f[3]->shape[1] != W->shape[1])
        return lm_mismatch(err, m->path, "LoHa factors [%llu, %llu]@[%llu, %llu] and [%llu, %llu]@[%llu, %llu] "
                           "do not make base '%s' [%llu, %llu]",
                           (unsigned long long)f[0]->shape[0], (unsigned long long)f[0]->shape[1],
                           (unsigned long long)f[1]->shape[0], (unsigned long long)f[1]->shape[1],
                           (unsigned long long)f[2]->shape[0], (unsigned long long)f[2]->shape[1],
                           (unsigned long long)f[3]->shape[0], (unsigned long long)f[3]->shape[1], W->name,
                           (unsigned long long)W->shape[0], (unsigned long long)W->shape[1]);
    if ((long)f[0]->shape[1] != r || (long)f[2]->shape[1] != r)
        return lm_module_fail(err, LM_E_MISMATCH, "RankMismatch", m->path,
                              "the tensors have rank %llu but adapter_config.json says r=%ld",
                              (unsigned long long)f[0]->shape[1], r);
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "loha", m->path, err);
    loha_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    memcpy(pr->f, f, sizeof f);
    op->rank = (uint64_t)r;
    op->scale = alpha / (double)r * lm_ctx_adapter(ctx)->weight;
    op->flops = 4.0 * (double)r * (double)W->n_elems;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static lm_code loha_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const loha_params *pr = op->params;
    loha_prep *lp = lm_prep_alloc(p, sizeof *lp, err);
    if (lp == NULL)
        return LM_E_NOMEM;
    for (int q = 0; q < 4; q++)
        if ((lp->f[q] = lm_prep_view(p, pr->f[q], k, err)) == NULL)
            return LM_E_NOMEM;
    p->data = lp;
    return LM_OK;
}

static void loha_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const loha_prep *lp = p->data;
    float *t1 = t->scratch, *t2 = t->scratch + t->nr * t->cols;
    size_t n = (size_t)(t->nr * t->cols), r = (size_t)op->rank;
    const float s = (float)op->scale;
    memset(t->scratch, 0, 2 * n * sizeof *t->scratch);
    lm_gemm_tile_nn(t1, (size_t)t->nr, (size_t)t->cols, lp->f[0] + t->r0 * r, lp->f[1], r, 1.0f);
    lm_gemm_tile_nn(t2, (size_t)t->nr, (size_t)t->cols, lp->f[2] + t->r0 * r, lp->f[3], r, 1.0f);
    for (size_t i = 0; i < n; i++)
        t->acc[i] += t1[i] * t2[i] * s;
}

static void loha_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    const lm_ts_tensor *a = m->part[W1A];
    snprintf(buf, cap, "loha%s r=%ld alpha=%g", m->part[T1] || m->part[T2] ? " (CP form: refused, not supported yet)" : "",
             a && a->n_dims == 2 ? (long)a->shape[1] : cfg->r, cfg->lora_alpha);
}

static void loha_describe_config(const lm_adapter_config *c, char *buf, size_t cap)
{
    snprintf(buf, cap, "variant: LoHa\nr: %ld, alpha: %g, scale: %g (alpha/r)\n", c->r, c->lora_alpha,
             c->lora_alpha / (double)c->r);
}

static const lm_part loha_parts[] = {
    {"hada_w1_a", W1A, -1, 1}, {"hada_w1_b", W1B, -1, 1}, {"hada_w2_a", W2A, -1, 1},
    {"hada_w2_b", W2B, -1, 1}, {"hada_t1", T1, -1, 1},    {"hada_t2", T2, -1, 1},
};

const lm_method lm_method_loha = {
    .peft_type = "LOHA",
    .summary = "W += (w1a @ w1b) * (w2a @ w2b) * alpha/r",
    .parts = loha_parts,
    .n_parts = sizeof loha_parts / sizeof *loha_parts,
    .flags = LM_M_PATTERNS | LM_M_ALPHA_KEY,
    .plan_module = loha_plan_module,
    .prepare = loha_prepare,
    .apply_tile = loha_apply,
    .describe = loha_describe,
    .describe_config = loha_describe_config,
};
