/* SPDX-License-Identifier: MIT */
/* psoft.c : PSOFT (docs/adapter-types.md, PSOFT): ΔW = scaling · B (R − I) A with A, B rebuilt
 * from the r leading singular triplets of the base weight (W = U S Vh, as torch.linalg.svd:
 * LAPACK gesdd, linalg.c) and R the trained r x r matrix: a Cayley transform of the skew matrix
 * saved as psoft_R.weight (exact, or Neumann), or psoft_R.weight itself; rows scaled by
 * psoft_R.vector_b, columns by psoft_R.vector_a.  psoft_init: A = Vh_r, B = U_r S_r / scaling;
 * pissa_init: A = √(S_r/scaling) Vh_r, B = U_r √(S_r/scaling).  PEFT's delta depends on the
 * singular vectors' signs (R mixes them), so the SVD is LAPACK's own algorithm on W as torch
 * lays it out.  A low-rank op: prepare reads the tensor (LM_M_READS_BASE), runs one SVD, keeps
 * the [out, r] and [r, in] factors, and frees the rest at once. */
#include "method.h"

#include "linalg.h"
#include "lm_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { PW, PVA, PVB };

typedef struct {
    double alpha;   /* psoft_alpha (32) */
    int pissa;      /* ab_svd_init "pissa_init" (else "psoft_init") */
    int orth, mag_a, mag_b, neumann;
    long terms;     /* num_cayley_neumann_terms (5) */
    double eps;     /* cayley_neumann_eps, or < 0 (null) */
} psoft_cfg;

typedef struct {
    const lm_ts_tensor *w, *va, *vb;
    const psoft_cfg *cfg;
    double scaling;
} psoft_params;

static lm_code psoft_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    psoft_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    f->alpha = 32;
    f->orth = f->mag_a = f->mag_b = 1;
    f->terms = 5;
    f->eps = -1;
    if (lm_cfg_num(root, "psoft_alpha", &f->alpha, err) || lm_cfg_bool(root, "psoft_orth", &f->orth, err) ||
        lm_cfg_bool(root, "psoft_mag_a", &f->mag_a, err) || lm_cfg_bool(root, "psoft_mag_b", &f->mag_b, err) ||
        lm_cfg_bool(root, "use_cayley_neumann", &f->neumann, err) ||
        lm_cfg_int(root, "num_cayley_neumann_terms", &f->terms, err) ||
        lm_cfg_num(root, "cayley_neumann_eps", &f->eps, err))
        return err->code;
    const cJSON *init = lm_cfg_field(root, "ab_svd_init"), *svd = lm_cfg_field(root, "psoft_svd");
    if ((init != NULL && !cJSON_IsString(init)) || (svd != NULL && !cJSON_IsString(svd)))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'ab_svd_init' and 'psoft_svd' must be strings");
    if (init != NULL && strcmp(init->valuestring, "psoft_init") != 0 && strcmp(init->valuestring, "pissa_init") != 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type PSOFT: unknown ab_svd_init '%s'", init->valuestring);
    f->pissa = init != NULL && strcmp(init->valuestring, "pissa_init") == 0;
    if (svd != NULL && strcmp(svd->valuestring, "full") != 0)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type PSOFT with psoft_svd '%s': only 'full' "
                       "is reproduced ('lowrank' is torch's randomized svd_lowrank on its global generator)",
                       svd->valuestring);
    if (f->alpha == 0 || f->terms < 0 || f->terms > 1000000)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type PSOFT needs psoft_alpha != 0 and "
                       "num_cayley_neumann_terms in [0, 1000000]");
    return LM_OK;
}

static lm_code psoft_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    const psoft_cfg *fc = cfg->mcfg;
    const lm_ts_tensor *w = m->part[PW], *va = m->part[PVA], *vb = m->part[PVB];
    long bi = lm_ctx_weight_2d(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    uint64_t out = W->shape[0], in = W->shape[1], r = (uint64_t)cfg->r;
    if (w == NULL || (va == NULL) == fc->mag_a || (vb == NULL) == fc->mag_b)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "PSOFT needs psoft_R.weight%s%s (and "
                              "nothing else), as psoft_mag_a / psoft_mag_b say", fc->mag_a ? ", psoft_R.vector_a" : "",
                              fc->mag_b ? ", psoft_R.vector_b" : "");
    uint64_t nw = fc->orth ? r * (r - 1) / 2 : r * r;
    if (w->n_elems != nw || (fc->orth ? w->n_dims != 1 : w->n_dims != 2) || !lm_is_float_dtype(w->dtype) ||
        (va != NULL && (va->n_elems != r || !lm_is_float_dtype(va->dtype))) ||
        (vb != NULL && (vb->n_elems != r || !lm_is_float_dtype(vb->dtype))))
        return lm_mismatch(err, m->path, "psoft_R holds %llu values; r = %llu needs %s and vectors of r",
                           (unsigned long long)w->n_elems, (unsigned long long)r,
                           fc->orth ? "r(r-1)/2 (the skew matrix's upper triangle)" : "r x r");
    if (r > out || r > in)
        return lm_mismatch(err, m->path, "r = %llu exceeds the weight's rank bound min(%llu, %llu)",
                           (unsigned long long)r, (unsigned long long)out, (unsigned long long)in);
    if (out * in > (uint64_t)INT32_MAX)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path,
                              "PSOFT needs an SVD of the [%llu, %llu] weight, beyond LAPACK's 32-bit sizes",
                              (unsigned long long)out, (unsigned long long)in);
    double scaling = fc->alpha / (double)r;
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "psoft", m->path, r, in, out, 0, fc->pissa ? scaling : 1.0,
                                 sizeof(psoft_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(psoft_params *)op->params = (psoft_params){w, va, vb, fc, scaling};
    double k = (double)(out < in ? out : in);
    op->flops += 4.0 * (double)out * (double)in * k; /* the SVD (bidiagonalisation) */
    return LM_OK;
}

/* R (r x r, double) as OrthLayer.get_matrix: Cayley (I + Q)(I − Q)^-1 of the skew Q, or its
 * Neumann series, or the weight itself; rows times vector_b, columns times vector_a */
static int psoft_R(const psoft_params *pr, const float *w, const float *va, const float *vb, size_t r, double *R)
{
    const psoft_cfg *c = pr->cfg;
    if (!c->orth) {
        for (size_t e = 0; e < r * r; e++)
            R[e] = w[e];
    } else {
        double *Q = calloc(6 * r * r + 1, sizeof(double)), *work = Q + r * r;
        if (Q == NULL)
            return -1;
        size_t t = 0;
        for (size_t a = 0; a < r; a++) /* torch.triu_indices(r, r, 1): row-major upper triangle */
            for (size_t b = a + 1; b < r; b++, t++) {
                Q[a * r + b] = w[t];
                Q[b * r + a] = -(double)w[t];
            }
        if (c->neumann) {
            if (c->eps >= 0) {
                double ss = 0;
                for (size_t e = 0; e < r * r; e++)
                    ss += Q[e] * Q[e];
                double norm = sqrt(ss);
                if (norm > c->eps)
                    for (size_t e = 0; e < r * r; e++)
                        Q[e] *= c->eps / (norm + 1e-12);
            }
            lm_cayley_neumann(Q, R, r, (uint64_t)c->terms, work);
        } else {
            for (size_t e = 0; e < r * r; e++) /* (I + Q)(I - Q)^-1 = cayley_exact(-Q) = (I - (-Q))(I + (-Q))^-1 */
                Q[e] = -Q[e];
            lm_cayley_exact(Q, R, r, work);
        }
        free(Q);
    }
    for (size_t a = 0; a < r; a++)
        for (size_t b = 0; b < r; b++)
            R[a * r + b] *= (vb ? (double)vb[a] : 1.0) * (va ? (double)va[b] : 1.0);
    return 0;
}

/* B' = U_r diag(sb) [out, r], A' = diag(sa) (R − I) Vh_r [r, in] (f64 and f32) */
static lm_code psoft_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const psoft_params *pr = op->params;
    size_t r = (size_t)op->rank, in = (size_t)op->in, out = (size_t)op->out;
    const float *w = lm_prep_view(p, pr->w, k, err);
    const float *va = pr->va ? lm_prep_view(p, pr->va, k, err) : NULL, *vb = pr->vb ? lm_prep_view(p, pr->vb, k, err) : NULL;
    double *b64 = lm_prep_alloc(p, out * r * sizeof(double), err), *a64 = lm_prep_alloc(p, r * in * sizeof(double), err);
    double *tmp = malloc((r * in + r + 2 * r * r) * sizeof(double));
    if (w == NULL || (pr->va && va == NULL) || (pr->vb && vb == NULL) || b64 == NULL || a64 == NULL || tmp == NULL) {
        free(tmp);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    double *Vh = tmp, *S = Vh + r * in, *R = S + r;
    int rc = lm_svd_top(p->base, out, in, r, b64, S, Vh);
    if (rc == 0)
        rc = psoft_R(pr, w, va, vb, r, R);
    if (rc != 0) {
        free(tmp);
        if (rc == -3)
            return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "PSOFT needs LAPACK's dgesdd from OpenBLAS "
                           "(libopenblas.so.0), which could not be loaded");
        return rc == -1 ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory")
                        : lm_fail(err, LM_E_FORMAT, "NonFinite", "LAPACK's SVD (dgesdd) of the base weight did "
                                  "not converge (inf or NaN in it?)");
    }
    for (size_t c = 0; c < r; c++) {
        R[c * r + c] -= 1.0;
        /* psoft_init: B = U S / scaling, ΔW = scaling B M A = U S M Vh (the op's scale is 1);
         * pissa_init: both sides √(S / scaling) (the op's scale is scaling) */
        double sb = pr->cfg->pissa ? sqrt(S[c] / pr->scaling) : S[c];
        for (size_t o = 0; o < out; o++)
            b64[o * r + c] *= sb;
    }
    for (size_t q = 0; q < r; q++) /* pissa_init: A = √(S/scaling) Vh */
        for (size_t i = 0; pr->cfg->pissa && i < in; i++)
            Vh[q * in + i] *= sqrt(S[q] / pr->scaling);
    lm_matmul_d(R, Vh, a64, r, r, in); /* A' = (R - I) A */
    free(tmp);
    return lm_prep_publish64(p, a64, r * in, b64, out * r, err);
}

static void psoft_describe_config(const lm_adapter_config *cfg, char *buf, size_t cap)
{
    const psoft_cfg *f = cfg->mcfg;
    snprintf(buf, cap, "r: %ld, psoft_alpha: %g, %s, R: %s%s%s (A, B from an SVD of the base weight)\n", cfg->r,
             f->alpha, f->pissa ? "pissa_init" : "psoft_init",
             !f->orth ? "free r x r" : f->neumann ? "Cayley-Neumann" : "Cayley (exact)", f->mag_b ? ", rows scaled" : "",
             f->mag_a ? ", columns scaled" : "");
}

static const lm_part psoft_parts[] = {
    {"psoft_R.weight", PW, -1, 1}, {"psoft_R.vector_a", PVA, -1, 1}, {"psoft_R.vector_b", PVB, -1, 1}};

const lm_method lm_method_psoft = {
    .peft_type = "PSOFT",
    .summary = "psoft (an r x r rotation between factors from an SVD of the base weight)",
    .parts = psoft_parts,
    .n_parts = 3,
    .flags = LM_M_READS_BASE,
    .parse_config = psoft_parse,
    .plan_module = psoft_plan_module,
    .prepare = psoft_prepare,
    .describe_config = psoft_describe_config,
};
