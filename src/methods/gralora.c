/* SPDX-License-Identifier: MIT */
/* gralora.c : GraLoRA (peft-merge.md §5.14): a k x k grid of rank-(r/k) blocks, plus an optional
 * ordinary low-rank hybrid part of rank hybrid_r; scale alpha / (r + hybrid_r).  Planned as one
 * low-rank delta of rank k r + hybrid_r whose factors are built per tensor. */
#include "method.h"

#include "lm_error.h"

#include <stdio.h>
#include <stdlib.h>

enum { GA, GB, GAG, GBG };

typedef struct {
    long k, hybrid_r; /* gralora_k (2), hybrid_r (0) */
} gralora_cfg;

typedef struct {
    const lm_ts_tensor *A, *B, *Ag, *Bg;
    uint64_t k, R;
} gralora_params;

static lm_code gralora_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    gralora_cfg *g = calloc(1, sizeof *g);
    if (g == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = g;
    g->k = 2;
    if (lm_cfg_int(root, "hybrid_r", &g->hybrid_r, err) != LM_OK || lm_cfg_int(root, "gralora_k", &g->k, err) != LM_OK)
        return err->code;
    if (g->k <= 0 || g->hybrid_r < 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'gralora_k' must be positive and 'hybrid_r' not negative");
    return LM_OK;
}

static lm_code gralora_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    const gralora_cfg *gc = cfg->mcfg;
    const lm_ts_tensor *ga = m->part[GA], *gb = m->part[GB], *gag = m->part[GAG], *gbg = m->part[GBG];
    uint64_t k = (uint64_t)gc->k, h = (uint64_t)gc->hybrid_r, R = (uint64_t)cfg->r;
    if (!ga || !gb || ga->n_dims != 3 || gb->n_dims != 3 || ga->shape[0] != k || gb->shape[0] != k ||
        ga->shape[2] != R || gb->shape[1] != R || R % k != 0)
        return lm_mismatch(err, m->path, "GraLoRA needs gralora_A [k, in/k, r] and gralora_B [k, r, out/k] "
                           "with k=%ld and r=%ld (divisible by k) from the config", gc->k, cfg->r);
    uint64_t in = k * ga->shape[1], out = k * gb->shape[2];
    if ((h > 0) != (gag != NULL && gbg != NULL) ||
        (h > 0 && (gag->n_dims != 2 || gbg->n_dims != 2 || gag->shape[0] != h || gag->shape[1] != in ||
                   gbg->shape[0] != out || gbg->shape[1] != h)))
        return lm_mismatch(err, m->path, "GraLoRA's hybrid part does not match hybrid_r=%ld", gc->hybrid_r);
    const lm_ts_tensor *x[4] = {ga, gb, gag, gbg};
    for (int q = 0; q < 4; q++)
        if (x[q] && !lm_is_float_dtype(x[q]->dtype))
            return lm_mismatch(err, m->path, "'%s' is not a float tensor", x[q]->name);
    int orient = 0;
    long bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err);
    if (bi < 0)
        return err->code;
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "gralora", m->path, k * R + h, in, out, orient,
                                 cfg->lora_alpha / (double)(R + h), sizeof(gralora_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(gralora_params *)op->params = (gralora_params){ga, gb, gag, gbg, k, R};
    return LM_OK;
}

/* block (j, n): sum_t A3[n, x, j*s + t] * B3[j, n*s + t, y]; inner index j*R + n*s + t */
static lm_code gralora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const gralora_params *pr = op->params;
    uint64_t K = op->rank, in = op->in, out = op->out, kk = pr->k, R = pr->R, sg = R / kk, ik = in / kk, ok = out / kk;
    uint64_t h = K - kk * R;
    const float *x0 = lm_prep_view(p, pr->A, k, err), *x1 = x0 ? lm_prep_view(p, pr->B, k, err) : NULL;
    const float *x2 = NULL, *x3 = NULL;
    if (x1 == NULL || (h > 0 && ((x2 = lm_prep_view(p, pr->Ag, k, err)) == NULL ||
                                 (x3 = lm_prep_view(p, pr->Bg, k, err)) == NULL)))
        return LM_E_NOMEM;
    float *A = lm_prep_floats(p, (size_t)(K * in), err), *B = A ? lm_prep_floats(p, (size_t)(out * K), err) : NULL;
    if (B == NULL)
        return LM_E_NOMEM;
    for (uint64_t j = 0; j < kk; j++)
        for (uint64_t n = 0; n < kk; n++)
            for (uint64_t t = 0; t < sg; t++) {
                uint64_t q = j * R + n * sg + t;
                for (uint64_t y = 0; y < ok; y++)
                    B[(j * ok + y) * K + q] = x1[(j * R + n * sg + t) * ok + y];
                for (uint64_t xx = 0; xx < ik; xx++)
                    A[q * in + n * ik + xx] = x0[(n * ik + xx) * R + j * sg + t];
            }
    for (uint64_t q = 0; q < h; q++) { /* the hybrid (ordinary low-rank) part */
        for (uint64_t o = 0; o < out; o++)
            B[o * K + kk * R + q] = x3[o * h + q];
        for (uint64_t i = 0; i < in; i++)
            A[(kk * R + q) * in + i] = x2[q * in + i];
    }
    p->a = A;
    p->b = B;
    return LM_OK;
}

static const lm_part gralora_parts[] = {
    {"gralora_A", GA, -1, 1}, {"gralora_B", GB, -1, 1}, {"gralora_A_general", GAG, -1, 1}, {"gralora_B_general", GBG, -1, 1},
};

const lm_method lm_method_gralora = {
    .peft_type = "GRALORA",
    .summary = "gralora (block-structured low-rank delta)",
    .parts = gralora_parts,
    .n_parts = 4,
    .flags = LM_M_PATTERNS | LM_M_ALPHA_KEY,
    .parse_config = gralora_parse,
    .plan_module = gralora_plan_module,
    .prepare = gralora_prepare,
};
