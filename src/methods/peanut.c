/* SPDX-License-Identifier: MIT */
/* peanut.c : PEANuT (docs/adapter-types.md, PEANuT): a delta computed from the base weight itself,
 *   H = act(W^T A^T) [in, r];  res_k = H, H = act(H E_k^T) for k < depth;
 *   H = act(H D_k^T) + res_{depth-1-k} for k < depth;  ΔW = scaling · B H^T,
 * A = peanut_A.weight [r, out], B = peanut_B.weight [out, r], E_k / D_k the numbered
 * peanut_encoders.<k> / peanut_decoders.<k> [r, r].  A low-rank op: prepare reads the tensor's
 * original values (LM_M_READS_BASE, as PEFT merges from the weight before merging) and builds
 * H^T in double. */
#include "method.h"

#include "lm_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PEANUT_MAX_DEPTH 16 /* numbered slots per list */

enum { PA, PB, PENC, PDEC = PENC + PEANUT_MAX_DEPTH };

typedef enum { ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_TANH, ACT_SIGMOID, ACT_LINEAR } peanut_act;

typedef struct {
    long depth;
    double scaling;
    peanut_act act;
    char act_name[32];
} peanut_cfg;

typedef struct {
    const lm_ts_tensor *A, *B;
    const lm_ts_tensor *enc[PEANUT_MAX_DEPTH], *dec[PEANUT_MAX_DEPTH];
    long depth;
    peanut_act act;
} peanut_params;

/* transformers' ACT2FN names this file reproduces */
static const struct {
    const char *name;
    peanut_act act;
} ACTS[] = {{"relu", ACT_RELU},          {"gelu", ACT_GELU},        {"gelu_new", ACT_GELU_TANH},
            {"gelu_pytorch_tanh", ACT_GELU_TANH}, {"silu", ACT_SILU}, {"swish", ACT_SILU},
            {"tanh", ACT_TANH},          {"sigmoid", ACT_SIGMOID},  {"linear", ACT_LINEAR}};

static lm_code peanut_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    peanut_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    f->scaling = 1.0;
    snprintf(f->act_name, sizeof f->act_name, "relu");
    if (lm_cfg_int(root, "depth", &f->depth, err) || lm_cfg_num(root, "scaling", &f->scaling, err))
        return err->code;
    if (f->depth < 0 || f->depth > PEANUT_MAX_DEPTH)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant",
                       "peft_type PEANUT with depth %ld: lora-merge merges depths 0 to %d", f->depth, PEANUT_MAX_DEPTH);
    const cJSON *a = lm_cfg_field(root, "act_fn");
    if (a != NULL && !cJSON_IsString(a))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'act_fn' must be a string");
    if (a != NULL)
        snprintf(f->act_name, sizeof f->act_name, "%.31s", a->valuestring);
    for (size_t i = 0; i < sizeof ACTS / sizeof *ACTS; i++)
        if (strcmp(ACTS[i].name, f->act_name) == 0 && (a == NULL || strlen(a->valuestring) < sizeof f->act_name)) {
            f->act = ACTS[i].act;
            return LM_OK;
        }
    return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant",
                   "peft_type PEANUT with act_fn '%s': lora-merge knows relu, gelu, gelu_new, gelu_pytorch_tanh, "
                   "silu, swish, tanh, sigmoid, linear", a != NULL ? a->valuestring : f->act_name);
}

static int is_rr(const lm_ts_tensor *t, uint64_t r)
{
    return t != NULL && t->n_dims == 2 && t->shape[0] == r && t->shape[1] == r && lm_is_float_dtype(t->dtype);
}

static lm_code peanut_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const peanut_cfg *fc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *A = m->part[PA], *B = m->part[PB];
    long bi = lm_ctx_weight_2d(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    uint64_t out = W->shape[0], in = W->shape[1];
    if (A == NULL || B == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "PEANuT needs peanut_A and peanut_B");
    uint64_t r = A->shape[0];
    if (A->n_dims != 2 || B->n_dims != 2 || A->shape[1] != out || B->shape[0] != out || B->shape[1] != r ||
        !lm_is_float_dtype(A->dtype) || !lm_is_float_dtype(B->dtype))
        return lm_mismatch(err, m->path, "peanut_A / peanut_B are not [r, %llu] and [%llu, r] float matrices "
                           "(PEANuT maps the weight's %llu outputs)", (unsigned long long)out,
                           (unsigned long long)out, (unsigned long long)out);
    peanut_params pr = {.A = A, .B = B, .depth = fc->depth, .act = fc->act};
    for (int k = 0; k < PEANUT_MAX_DEPTH; k++) {
        const lm_ts_tensor *e = m->part[PENC + k], *d = m->part[PDEC + k];
        if (k < fc->depth && (!is_rr(e, r) || !is_rr(d, r)))
            return lm_mismatch(err, m->path, "depth %ld needs peanut_encoders.%d and peanut_decoders.%d, "
                               "[%llu, %llu] each", fc->depth, k, k, (unsigned long long)r, (unsigned long long)r);
        if (k >= fc->depth && (e != NULL || d != NULL))
            return lm_mismatch(err, m->path, "peanut_%s.%d present but the config's depth is %ld",
                               e != NULL ? "encoders" : "decoders", k, fc->depth);
        pr.enc[k] = e;
        pr.dec[k] = d;
    }
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "peanut", m->path, r, in, out, 0, fc->scaling,
                                 sizeof(peanut_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(peanut_params *)op->params = pr;
    /* the activation chain: W^T A^T, then 2 depth r x r products per input feature */
    op->flops += 2.0 * (double)in * (double)out * (double)r + 4.0 * (double)fc->depth * (double)in * (double)(r * r);
    return LM_OK;
}

static double act(peanut_act a, double x)
{
    switch (a) {
    case ACT_RELU: return x > 0 ? x : 0;
    case ACT_GELU: return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
    case ACT_GELU_TANH: return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    case ACT_SILU: return x / (1.0 + exp(-x));
    case ACT_TANH: return tanh(x);
    case ACT_SIGMOID: return 1.0 / (1.0 + exp(-x));
    case ACT_LINEAR: return x;
    }
    return x;
}

/* H [in, r] <- act(H M^T) (+ res) for an r x r matrix M (f32), one row at a time */
static void layer(double *H, const float *M, const double *res, uint64_t in, uint64_t r, peanut_act a, double *row)
{
    for (uint64_t i = 0; i < in; i++) {
        double *h = H + i * r;
        for (uint64_t q = 0; q < r; q++) {
            double s = 0;
            for (uint64_t j = 0; j < r; j++)
                s += h[j] * (double)M[q * r + j];
            row[q] = act(a, s);
        }
        for (uint64_t q = 0; q < r; q++)
            h[q] = row[q] + (res != NULL ? res[i * r + q] : 0.0);
    }
}

/* A' = H^T [r, in] (f32 and the f64 it rounds), B' = peanut_B [out, r] */
static lm_code peanut_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const peanut_params *pr = op->params;
    uint64_t r = op->rank, in = op->in, out = op->out, d = (uint64_t)pr->depth;
    const float *A = lm_prep_view(p, pr->A, k, err), *W = p->base;
    double *a64 = lm_prep_alloc(p, (size_t)(r * in) * sizeof(double), err);
    double *H = malloc((size_t)((d + 1) * in * r + r) * sizeof(double));
    if (A == NULL || a64 == NULL || H == NULL || (p->b = lm_prep_view(p, pr->B, k, err)) == NULL) {
        free(H);
        return err->code ? err->code : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    double *cur = H + d * in * r, *row = H + (d + 1) * in * r; /* H[0 .. d) keep the residuals */
    /* H = act(W^T A^T): H[i, q] = act(sum_o W[o, i] A[q, o]) */
    memset(cur, 0, (size_t)(in * r) * sizeof(double));
    for (uint64_t o = 0; o < out; o++)
        for (uint64_t q = 0; q < r; q++) {
            const double aq = (double)A[q * out + o];
            const float *w = W + o * in;
            for (uint64_t i = 0; i < in; i++)
                cur[i * r + q] += (double)w[i] * aq;
        }
    for (uint64_t e = 0; e < in * r; e++)
        cur[e] = act(pr->act, cur[e]);
    for (uint64_t s = 0; s < d; s++) {
        const float *E = lm_prep_view(p, pr->enc[s], k, err);
        if (E == NULL) {
            free(H);
            return LM_E_NOMEM;
        }
        memcpy(H + s * in * r, cur, (size_t)(in * r) * sizeof(double));
        layer(cur, E, NULL, in, r, pr->act, row);
    }
    for (uint64_t s = 0; s < d; s++) {
        const float *D = lm_prep_view(p, pr->dec[s], k, err);
        if (D == NULL) {
            free(H);
            return LM_E_NOMEM;
        }
        layer(cur, D, H + (d - 1 - s) * in * r, in, r, pr->act, row);
    }
    for (uint64_t q = 0; q < r; q++)
        for (uint64_t i = 0; i < in; i++)
            a64[q * in + i] = cur[i * r + q];
    free(H);
    return lm_prep_publish64(p, a64, (size_t)(r * in), NULL, 0, err);
}

static void peanut_describe_config(const lm_adapter_config *cfg, char *buf, size_t cap)
{
    const peanut_cfg *f = cfg->mcfg;
    snprintf(buf, cap, "r: %ld, depth: %ld, act_fn: %s, scaling: %g (delta computed from the base weight)\n", cfg->r,
             f->depth, f->act_name, f->scaling);
}

static const lm_part peanut_parts[] = {{"peanut_A", PA, -1, 2},
                                       {"peanut_B", PB, -1, 2},
                                       {"peanut_encoders.#", PENC, -1, 2},
                                       {"peanut_decoders.#", PDEC, -1, 2}};

const lm_method lm_method_peanut = {
    .peft_type = "PEANUT",
    .summary = "peanut (a delta computed from the base weight through small activated layers)",
    .parts = peanut_parts,
    .n_parts = 4,
    .n_index = PEANUT_MAX_DEPTH,
    .flags = LM_M_READS_BASE,
    .parse_config = peanut_parse,
    .plan_module = peanut_plan_module,
    .prepare = peanut_prepare,
    .describe_config = peanut_describe_config,
};
