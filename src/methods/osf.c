/* SPDX-License-Identifier: MIT */
/* osf.c : OSF (docs/adapter-types.md, OSF): the adapted weight is rebuilt from an SVD of the
 * base weight, W' = U_high S_high V_high + U_low diag(S_low) V_low, where the high part is the
 * k = effective_rank leading singular triplets of W (not saved: PEFT recomputes them when it
 * loads the adapter) and the low part is the trained rest (saved: osf_svd_params.U_low [out, L],
 * S_low [L], V_low [L, in], L = min(out, in) - k).  With the exact SVD W = high + rest, so
 * W' = W - U_rest S_rest Vh_rest + U_low diag(S_low) V_low: a low-rank op of rank 2L whose
 * factors come from one SVD of the tensor's original values (LM_M_READS_BASE; lm_svd_range in
 * double, back-transforming the rest's L vectors only).  Each term u s vᵀ is the same whatever the signs of u and v, so the merge does not
 * depend on the SVD's sign conventions (PEFT's does not either). */
#include "method.h"

#include "linalg.h"
#include "lm_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { OU, OS, OV };

typedef struct {
    double rank;  /* effective_rank; < 0: null (min(out, in) / 2) */
    int patterns; /* rank_pattern is a non-empty object: the saved shapes decide k */
} osf_cfg;

typedef struct {
    const lm_ts_tensor *U, *S, *V; /* U_low [out, L], S_low [L], V_low [L, in] */
    uint64_t k;                    /* the high part's rank (frozen directions) */
} osf_params;

static lm_code osf_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    osf_cfg *o = calloc(1, sizeof *o);
    if (o == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = o;
    o->rank = -1;
    const cJSON *er = lm_cfg_field(root, "effective_rank");
    if (er != NULL && (lm_cfg_num(root, "effective_rank", &o->rank, err) || !(o->rank > 0)))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type OSF: effective_rank must be a positive number");
    const cJSON *rp = lm_cfg_field(root, "rank_pattern");
    if (rp != NULL && !cJSON_IsObject(rp))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type OSF: rank_pattern must be an object");
    o->patterns = rp != NULL && rp->child != NULL;
    return LM_OK;
}

/* 1 when PEFT's _resolve_rank(effective_rank, mn) can be k: a float in (0, 1] is a fraction of mn
 * (JSON does not tell 1 from 1.0: both readings count), other values are truncated; capped at mn */
static int osf_rank_fits(double v, uint64_t mn, uint64_t k)
{
    if (v < 0)
        return k == mn / 2;
    uint64_t as_int = v >= (double)mn ? mn : (uint64_t)v;
    uint64_t as_frac = v <= 1.0 ? (uint64_t)((double)mn * v) : as_int;
    return k == as_int || k == as_frac;
}

static lm_code osf_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const osf_cfg *oc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *U = m->part[OU], *S = m->part[OS], *V = m->part[OV];
    if (U == NULL || S == NULL || V == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                              "OSF needs osf_svd_params.U_low, S_low and V_low");
    long bi = lm_ctx_weight_2d(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    if (lm_is_gpt2_conv1d(m->path))
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path, "OSF on a Conv1D layer: PEFT's OSF "
                              "wraps nn.Linear only");
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    uint64_t out = W->shape[0], in = W->shape[1], mn = out < in ? out : in, L = S->n_elems;
    if (!lm_is_float_dtype(U->dtype) || !lm_is_float_dtype(S->dtype) || !lm_is_float_dtype(V->dtype) ||
        S->n_dims != 1 || U->n_dims != 2 || V->n_dims != 2 || U->shape[0] != out || U->shape[1] != L ||
        V->shape[0] != L || V->shape[1] != in || L >= mn)
        return lm_mismatch(err, m->path, "osf_svd_params U_low / S_low / V_low must be [%llu, L], [L], [L, %llu] "
                           "float tensors with L < %llu (min of the base weight's dimensions)",
                           (unsigned long long)out, (unsigned long long)in, (unsigned long long)mn);
    uint64_t k = mn - L;
    if (!oc->patterns && !osf_rank_fits(oc->rank, mn, k))
        return lm_mismatch(err, m->path, "the saved low part has %llu directions, so effective_rank would be %llu, "
                           "which the config's effective_rank does not give for this [%llu, %llu] weight",
                           (unsigned long long)L, (unsigned long long)k, (unsigned long long)out,
                           (unsigned long long)in);
    if (L == 0)
        return lm_module_fail(err, LM_E_MISMATCH, "NoOp", m->path, "OSF with effective_rank = min(out, in) = %llu "
                              "keeps every singular direction: the merge would change nothing",
                              (unsigned long long)mn);
    if (out * in > (uint64_t)INT32_MAX)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path,
                              "OSF needs an SVD of the [%llu, %llu] weight, beyond LAPACK's 32-bit sizes",
                              (unsigned long long)out, (unsigned long long)in);
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "osf", m->path, 2 * L, in, out, 0, 1.0, sizeof(osf_params),
                                 err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(osf_params *)op->params = (osf_params){U, S, V, k};
    op->flops += 4.0 * (double)out * (double)in * (double)mn; /* the SVD (bidiagonalisation) */
    return LM_OK;
}

static lm_code osf_svd_fail(int rc, lm_err *err)
{
    if (rc == -3)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "OSF needs LAPACK's SVD from OpenBLAS "
                       "(libopenblas.so.0), which could not be loaded");
    return rc == -1 ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory")
                    : lm_fail(err, LM_E_FORMAT, "NonFinite", "LAPACK's SVD of the base weight did not converge "
                              "(inf or NaN in it?)");
}

/* B' = [-U_rest diag(S_rest) | U_low diag(S_low)] [out, 2L], A' = [Vh_rest; V_low] [2L, in] (f64
 * and f32) */
static lm_code osf_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const osf_params *pr = op->params;
    size_t out = (size_t)op->out, in = (size_t)op->in, K = (size_t)op->rank, L = K / 2;
    /* the rest's triplets first (the SVD's workspace is freed before the factors are allocated) */
    double *Uw = malloc((out * L + L + L * in) * sizeof(double));
    if (Uw == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    double *Sw = Uw + out * L, *Vw = Sw + L;
    int rc = lm_svd_range(p->base, out, in, (size_t)pr->k, L, Uw, Sw, Vw);
    if (rc != 0) {
        free(Uw);
        return osf_svd_fail(rc, err);
    }
    const float *U = lm_prep_view(p, pr->U, k, err), *S = U ? lm_prep_view(p, pr->S, k, err) : NULL;
    const float *V = S ? lm_prep_view(p, pr->V, k, err) : NULL;
    double *b64 = V ? lm_prep_alloc(p, out * K * sizeof(double), err) : NULL;
    double *a64 = b64 ? lm_prep_alloc(p, K * in * sizeof(double), err) : NULL;
    if (a64 == NULL) {
        free(Uw);
        return LM_E_NOMEM;
    }
    for (size_t o = 0; o < out; o++)
        for (size_t c = 0; c < L; c++) {
            b64[o * K + c] = -Uw[o * L + c] * Sw[c];
            b64[o * K + L + c] = (double)U[o * L + c] * (double)S[c];
        }
    for (size_t c = 0; c < L; c++)
        for (size_t i = 0; i < in; i++) {
            a64[c * in + i] = Vw[c * in + i];
            a64[(L + c) * in + i] = V[c * in + i];
        }
    free(Uw);
    return lm_prep_publish64(p, a64, K * in, b64, out * K, err);
}

static void osf_describe_config(const lm_adapter_config *cfg, char *buf, size_t cap)
{
    const osf_cfg *o = cfg->mcfg;
    if (o->rank < 0)
        snprintf(buf, cap, "effective_rank: min(out, in) / 2%s (the high part from an SVD of the base weight)\n",
                 o->patterns ? ", rank_pattern (the saved shapes decide)" : "");
    else
        snprintf(buf, cap, "effective_rank: %g%s (the high part from an SVD of the base weight)\n", o->rank,
                 o->patterns ? ", rank_pattern (the saved shapes decide)" : "");
}

static const lm_part osf_parts[] = {
    {"osf_svd_params.U_low", OU, -1, 1}, {"osf_svd_params.S_low", OS, -1, 1}, {"osf_svd_params.V_low", OV, -1, 1}};

const lm_method lm_method_osf = {
    .peft_type = "OSF",
    .summary = "osf (the base weight's leading singular directions kept, the trained rest replacing the others)",
    .parts = osf_parts,
    .n_parts = 3,
    .flags = LM_M_READS_BASE | LM_M_UNIT_WEIGHT | LM_M_NO_RANK,
    .parse_config = osf_parse,
    .plan_module = osf_plan_module,
    .prepare = osf_prepare,
    .describe_config = osf_describe_config,
};
