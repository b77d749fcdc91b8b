/* SPDX-License-Identifier: MIT */
/* randlora.c : RandLoRA (peft-merge.md §5.14): the delta B_flat @ A_flat from the shared random
 * bases (saved: save_projection) scaled by the layer's lambda [r, nb] and gamma [nb, min(o, i)];
 * scale randlora_alpha / r.  Transposed when the layer's out is the smaller side. */
#include "method.h"

#include "lm_error.h"

enum { RL, RG, RA, RB };

typedef struct {
    const lm_ts_tensor *lambda, *gamma, *A, *B;
    uint64_t M, mn; /* max and min of out, in */
} randlora_params;

static lm_code randlora_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    if (cJSON_IsFalse(lm_cfg_field(root, "save_projection")))
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type RANDLORA with save_projection false: the "
                       "random bases would have to be regenerated from torch's generator; not supported");
    c->lora_alpha = 640; /* randlora_alpha's default; 'lora_alpha' means nothing to it */
    return lm_cfg_num(root, "randlora_alpha", &c->lora_alpha, err);
}

static lm_code randlora_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    /* lambda [r, nb], gamma [nb, min(o,i)], bases A [r, 1, >=min], B [>=max, >=nb, r] (the layer's
     * own copies, else the shared ones) */
    const lm_ts_tensor *rl = m->part[RL], *rg = m->part[RG];
    const lm_ts_tensor *ba = m->part[RA] ? m->part[RA] : lm_ctx_shared(ctx, "randlora_A");
    const lm_ts_tensor *bb = m->part[RB] ? m->part[RB] : lm_ctx_shared(ctx, "randlora_B");
    if (!rl || !rg || !ba || !bb || rl->n_dims != 2 || rg->n_dims != 2 || ba->n_dims != 3 || bb->n_dims != 3 ||
        rl->shape[1] != rg->shape[0] || ba->shape[0] != rl->shape[0] || ba->shape[1] != 1 ||
        bb->shape[2] != rl->shape[0] || bb->shape[1] < rl->shape[1] || ba->shape[2] < rg->shape[1])
        return lm_mismatch(err, m->path, "RandLoRA needs randlora_lambda [r, nb], randlora_gamma [nb, min(out, in)] "
                           "and the bases randlora_A [r, 1, D], randlora_B [D, NB, r]");
    const lm_ts_tensor *x[4] = {rl, rg, ba, bb};
    for (int q = 0; q < 4; q++)
        if (!lm_is_float_dtype(x[q]->dtype))
            return lm_mismatch(err, m->path, "'%s' is not a float tensor", x[q]->name);
    uint64_t r = rl->shape[0], nb = rl->shape[1], mn = rg->shape[1];
    /* the base tells which of out and in is the smaller one */
    long wi = lm_ctx_module_weight(ctx, m->path, err);
    if (wi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, wi);
    if (W->n_dims != 2 || (W->shape[0] != mn && W->shape[1] != mn))
        return lm_mismatch(err, m->path, "randlora_gamma's width %llu is neither dimension of '%s'",
                           (unsigned long long)mn, W->name);
    uint64_t mx = W->shape[0] == mn ? W->shape[1] : W->shape[0];
    if (bb->shape[0] < mx)
        return lm_mismatch(err, m->path, "randlora_B has %llu rows, fewer than %llu", (unsigned long long)bb->shape[0],
                           (unsigned long long)mx);
    int conv1d_names = lm_is_gpt2_conv1d(m->path);
    uint64_t out = conv1d_names ? W->shape[1] : W->shape[0], in = conv1d_names ? W->shape[0] : W->shape[1];
    int orient = 0;
    long bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err);
    if (bi < 0)
        return err->code;
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "randlora", m->path, r * nb, in, out, orient,
                                 cfg->lora_alpha / (double)cfg->r, sizeof(randlora_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(randlora_params *)op->params = (randlora_params){rl, rg, ba, bb, mx, mn};
    return LM_OK;
}

/* A_flat [r*nb, m]: row k*nb + b = lambda[k, b] * A_all[k, 0, :m] * gamma[b, :];
 * B_flat [M, nb*r]: column b*r + k = B_all[:M, b, k]; delta = B_flat @ A_flat is [M, m],
 * transposed when the layer's out is the smaller side (PEFT pairs A_flat's row q with B_flat's
 * column q, whatever the indices mean).  a and b are PEFT's f32 factors (the f32 path); a64 and b64
 * the exact terms for the certified path: lambda_flat[q] moves to B's side, so that each factor
 * element is a product of two floats, exact in f64 (A_all * gamma, B_all * lambda). */
static lm_code randlora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const randlora_params *pr = op->params;
    uint64_t K = op->rank, in = op->in, out = op->out;
    uint64_t r = pr->lambda->shape[0], nb = pr->lambda->shape[1], M = pr->M, mn = pr->mn;
    uint64_t dmin = pr->A->shape[2], NB = pr->B->shape[1];
    const float *x0 = lm_prep_view(p, pr->lambda, k, err), *x1 = x0 ? lm_prep_view(p, pr->gamma, k, err) : NULL;
    const float *x2 = x1 ? lm_prep_view(p, pr->A, k, err) : NULL, *x3 = x2 ? lm_prep_view(p, pr->B, k, err) : NULL;
    float *A = x3 ? lm_prep_floats(p, (size_t)(K * in), err) : NULL, *B = A ? lm_prep_floats(p, (size_t)(out * K), err) : NULL;
    double *A64 = B ? lm_prep_alloc(p, (size_t)(K * in) * sizeof *A64, err) : NULL;
    double *B64 = A64 ? lm_prep_alloc(p, (size_t)(out * K) * sizeof *B64, err) : NULL;
    if (B64 == NULL)
        return LM_E_NOMEM;
    int flip = !(out == M && in == mn);
    for (uint64_t kk = 0; kk < r; kk++)
        for (uint64_t b = 0; b < nb; b++)
            for (uint64_t j = 0; j < mn; j++) {
                uint64_t q = kk * nb + b;
                float v = x0[kk * nb + b] * x2[kk * dmin + j] * x1[b * mn + j];
                double v64 = (double)x2[kk * dmin + j] * (double)x1[b * mn + j];
                if (!flip) {
                    A[q * in + j] = v;
                    A64[q * in + j] = v64;
                } else {
                    B[j * K + q] = v;
                    B64[j * K + q] = v64;
                }
            }
    for (uint64_t row = 0; row < M; row++)
        for (uint64_t b = 0; b < nb; b++)
            for (uint64_t kk = 0; kk < r; kk++) {
                uint64_t q = b * r + kk;
                float v = x3[(row * NB + b) * r + kk];
                double v64 = (double)v * (double)x0[q]; /* lambda of A_flat's row q */
                if (!flip) {
                    B[row * K + q] = v;
                    B64[row * K + q] = v64;
                } else {
                    A[q * in + row] = v;
                    A64[q * in + row] = v64;
                }
            }
    p->a = A;
    p->b = B;
    p->a64 = A64;
    p->b64 = B64;
    return LM_OK;
}

static const lm_part randlora_parts[] = {
    {"randlora_lambda", RL, -1, 1}, {"randlora_gamma", RG, -1, 1}, {"randlora_A", RA, -1, 1}, {"randlora_B", RB, -1, 1},
};
static const char *const randlora_shared[] = {"randlora_A", "randlora_B", NULL};

const lm_method lm_method_randlora = {
    .peft_type = "RANDLORA",
    .summary = "randlora (low-rank delta from the saved random bases)",
    .parts = randlora_parts,
    .n_parts = 4,
    .shared = randlora_shared,
    .parse_config = randlora_parse,
    .plan_module = randlora_plan_module,
    .prepare = randlora_prepare,
};
