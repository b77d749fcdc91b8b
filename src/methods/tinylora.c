/* SPDX-License-Identifier: MIT */
/* tinylora.c : TinyLoRA (docs/adapter-types.md, TinyLoRA): ΔW = orient(B R A) with the saved
 * per-layer SVD factors tinylora_A [r, in], tinylora_B [out, r], and R = Σ_k v[k] P[k] from the
 * saved projections tinylora_P [u, r, r] and the shared vector base_model.tinylora_v.<g> of the
 * layer's group g.  PEFT numbers the targeted layers in model order (layer_idx), seeds each
 * layer's P with projection_seed + layer_idx and groups layers by layer_idx (weight_tying); the
 * file does not say that order, so each layer's index is found by drawing torch.normal again
 * for every candidate index and matching the saved P (torch_rng.c). */
#include "method.h"

#include "lm_error.h"
#include "torch_rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { TA, TB, TP };

typedef struct {
    long u, seed;
    double weight_tying;
} tinylora_cfg;

typedef struct {
    const lm_ts_tensor *A, *B, *P, *v;
} tinylora_params;

static lm_code tinylora_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    tinylora_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    f->u = 64;
    f->seed = 42;
    int save = 1;
    if (lm_cfg_int(root, "u", &f->u, err) || lm_cfg_int(root, "projection_seed", &f->seed, err) ||
        lm_cfg_num(root, "weight_tying", &f->weight_tying, err) || lm_cfg_bool(root, "save_projection", &save, err))
        return err->code;
    if (f->u <= 0 || f->seed < 0 || !(f->weight_tying >= 0 && f->weight_tying <= 1))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig",
                       "peft_type TINYLORA needs u > 0, projection_seed >= 0 and weight_tying in [0, 1]");
    if (!save)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type TINYLORA with save_projection false: "
                       "the projections would be drawn again in the model's module order, which the adapter does "
                       "not record; not supported");
    return LM_OK;
}

/* Python's round(): halves to even */
static long py_round(double x)
{
    double f = floor(x), d = x - f;
    if (d > 0.5 || (d == 0.5 && fmod(f, 2.0) != 0.0))
        f += 1.0;
    return (long)f;
}

/* 1 when the first values of P are torch.normal(0, 1/sqrt(r), (u, r, r), seed) (to float rounding:
 * torch's vectorised path may differ in the last bits) */
static int p_matches(uint64_t seed, uint64_t r, const float *first, float *buf, size_t n, double tol)
{
    if (lm_torch_normal_f32(seed, 0.0f, (float)(1.0 / sqrt((double)r)), n, buf) != 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(fabs((double)buf[i] - (double)first[i]) <= tol * (1.0 + fabs((double)first[i]))))
            return 0;
    return 1;
}

/* the layer index whose seeded draw P is (one of 0 .. n_layers - 1), or -1 */
static long layer_index(const lm_ts_tensor *P, uint64_t seed0, uint64_t r, size_t n_layers, long hint)
{
    size_t n = (size_t)P->n_elems >= 32 ? 16 : (size_t)P->n_elems; /* the first block of 16 (the last 16 are drawn
                                                                        again when 16 does not divide the size) */
    float first[32], buf[32];
    lm_kernels kr;
    if (lm_kernels_select(&kr, "ref") != 0)
        return -1;
    lm_ts_to_f32(P, 0, n, first, &kr);
    /* P saved in a narrower dtype is rounded: a few of its ulps (16 values of a wrong draw never
     * come that close) */
    double tol = P->dtype == LM_DT_BF16 ? 1e-2 : P->dtype == LM_DT_F16 ? 2e-3 : 1e-4;
    if (hint >= 0 && (size_t)hint < n_layers && p_matches(seed0 + (uint64_t)hint, r, first, buf, n, tol))
        return hint;
    for (size_t k = 0; k < n_layers; k++)
        if ((long)k != hint && p_matches(seed0 + k, r, first, buf, n, tol))
            return (long)k;
    return -1;
}

static lm_code tinylora_plan_one(lm_plan_ctx *ctx, const lm_module *m, long layer, size_t n_layers, lm_err *err)
{
    const tinylora_cfg *fc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *A = m->part[TA], *B = m->part[TB], *P = m->part[TP];
    long n_groups = py_round((double)n_layers * (1.0 - fc->weight_tying));
    if (n_groups < 1)
        n_groups = 1;
    long gsize = (long)n_layers / n_groups > 1 ? (long)n_layers / n_groups : 1;
    long g = layer / gsize < n_groups - 1 ? layer / gsize : n_groups - 1;
    char vname[64];
    snprintf(vname, sizeof vname, "tinylora_v.%ld", g);
    const lm_ts_tensor *v = lm_ctx_shared(ctx, vname);
    uint64_t r = A->shape[0];
    if (v == NULL || v->n_dims != 1 || v->n_elems != (uint64_t)fc->u || !lm_is_float_dtype(v->dtype))
        return lm_module_fail(err, LM_E_MISMATCH, "ShapeMismatch", m->path,
                              "layer %ld of %zu is in group %ld of %ld (weight_tying %g), but base_model.%s is %s, "
                              "not a float vector of u = %ld", layer, n_layers, g, n_groups, fc->weight_tying, vname,
                              v == NULL ? "missing" : "another shape", fc->u);
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    uint64_t out = B->shape[0], in = A->shape[1];
    if (W->n_dims != 2 || !((W->shape[0] == out && W->shape[1] == in) || (W->shape[0] == in && W->shape[1] == out)))
        return lm_mismatch(err, m->path, "tinylora_B @ tinylora_A is [%llu, %llu], which is not base '%s''s shape",
                           (unsigned long long)out, (unsigned long long)in, W->name);
    int orient = W->shape[0] == out && W->shape[1] == in && !(out == in && lm_is_gpt2_conv1d(m->path)) ? 0 : 1;
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "tinylora", m->path, r, in, out, orient, 1.0,
                                 sizeof(tinylora_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(tinylora_params *)op->params = (tinylora_params){A, B, P, v};
    return LM_OK;
}

static lm_code tinylora_plan(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, lm_err *err)
{
    const tinylora_cfg *fc = lm_ctx_adapter(ctx)->cfg->mcfg;
    unsigned char *taken = calloc(n + 1, 1);
    if (taken == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    lm_code rc = LM_OK;
    for (size_t k = 0; k < n && rc == LM_OK; k++) {
        const lm_module *m = mods[k];
        const lm_ts_tensor *A = m->part[TA], *B = m->part[TB], *P = m->part[TP];
        if (A == NULL || B == NULL || P == NULL) {
            rc = lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                                "TinyLoRA needs tinylora_A, tinylora_B and tinylora_P (save_projection)");
            break;
        }
        uint64_t r = A->shape[0];
        if (A->n_dims != 2 || B->n_dims != 2 || P->n_dims != 3 || B->shape[1] != r || P->shape[0] != (uint64_t)fc->u ||
            P->shape[1] != r || P->shape[2] != r || !lm_is_float_dtype(A->dtype) || !lm_is_float_dtype(B->dtype) ||
            !lm_is_float_dtype(P->dtype)) {
            rc = lm_mismatch(err, m->path, "tinylora_A / _B / _P are not [r, in], [out, r] and [u = %ld, r, r] floats",
                             fc->u);
            break;
        }
        long layer = 0;
        if (n > 1) { /* the layer's index in PEFT's numbering, from its seeded projections */
            if (P->n_elems < 16) {
                rc = lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", m->path,
                                    "TinyLoRA with u r^2 = %llu < 16 projection values: the layer's index cannot be "
                                    "recovered from torch's draws there; not supported", (unsigned long long)P->n_elems);
                break;
            }
            layer = layer_index(P, (uint64_t)fc->seed, r, n, (long)k);
            if (layer < 0 || taken[layer]) {
                rc = lm_module_fail(err, LM_E_MISMATCH, "ShapeMismatch", m->path, layer < 0 ?
                                    "tinylora_P is no torch.normal draw of projection_seed %ld + a layer index below "
                                    "%zu: the layer's group cannot be found" :
                                    "tinylora_P is the draw of layer %ld, which another module has too", layer < 0 ?
                                    fc->seed : layer, n);
                break;
            }
            taken[layer] = 1;
        }
        rc = tinylora_plan_one(ctx, m, layer, n, err);
    }
    free(taken);
    return rc;
}

/* A' = R @ tinylora_A with R = Σ_k v[k] P[k] (double), B' = tinylora_B */
static lm_code tinylora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const tinylora_params *pr = op->params;
    uint64_t r = op->rank, in = op->in, u = pr->v->n_elems;
    const float *A = lm_prep_view(p, pr->A, k, err), *P = lm_prep_view(p, pr->P, k, err);
    const float *v = lm_prep_view(p, pr->v, k, err);
    double *a64 = lm_prep_alloc(p, (size_t)(r * in + r * r) * sizeof(double), err);
    if (A == NULL || P == NULL || v == NULL || a64 == NULL ||
        (p->b = lm_prep_view(p, pr->B, k, err)) == NULL)
        return LM_E_NOMEM;
    double *R = a64 + r * in;
    for (uint64_t e = 0; e < r * r; e++) {
        double s = 0;
        for (uint64_t q = 0; q < u; q++)
            s += (double)v[q] * (double)P[q * r * r + e];
        R[e] = s;
    }
    for (uint64_t j = 0; j < r; j++)
        for (uint64_t i = 0; i < in; i++) {
            double s = 0;
            for (uint64_t q = 0; q < r; q++)
                s += R[j * r + q] * (double)A[q * in + i];
            a64[j * in + i] = s;
        }
    return lm_prep_publish64(p, a64, (size_t)(r * in), NULL, 0, err);
}

static void tinylora_describe_config(const lm_adapter_config *cfg, char *buf, size_t cap)
{
    const tinylora_cfg *f = cfg->mcfg;
    snprintf(buf, cap, "r: %ld, u: %ld, weight_tying: %g, projection_seed: %ld\n", cfg->r, f->u, f->weight_tying,
             f->seed);
}

static const lm_part tinylora_parts[] = {{"tinylora_A", TA, -1, 1}, {"tinylora_B", TB, -1, 1}, {"tinylora_P", TP, -1, 1}};
static const char *const tinylora_shared[] = {"tinylora_v.#", NULL};

const lm_method lm_method_tinylora = {
    .peft_type = "TINYLORA",
    .summary = "tinylora (saved SVD factors of the base, R mixed from a tiny shared vector)",
    .parts = tinylora_parts,
    .n_parts = 3,
    .shared = tinylora_shared,
    .parse_config = tinylora_parse,
    .plan_adapter = tinylora_plan,
    .prepare = tinylora_prepare,
    .describe_config = tinylora_describe_config,
};
