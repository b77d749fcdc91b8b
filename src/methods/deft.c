/* SPDX-License-Identifier: MIT */
/* deft.c : DeFT (docs/adapter-types.md): the adapted weight is (I - Q_P right^T) W + Q_P (s R),
 * so W += Q_P (s R - right^T W), a rank-r delta whose A' depends on the base weight: prepare reads
 * the tensor's original values (LM_M_READS_BASE; PEFT computes right^T W from the weight before
 * merging) and forms A' = s R - right^T W in double.  decomposition_method "relu": Q_P = P,
 * right = relu(P); "qr": Q_P = right = the Q of P's reduced QR (LAPACK geqrf + orgqr as
 * torch.linalg.qr: Q_P R depends on Q's column signs, Householder's); para: no R (pure subspace
 * removal). */
#include "method.h"

#include "linalg.h"
#include "lm_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { DP, DR };

typedef struct {
    double alpha; /* 0: none (scaling 1) */
    int para;
    int qr; /* decomposition_method "qr" (else "relu") */
} deft_cfg;

typedef struct {
    const lm_ts_tensor *P, *R; /* P [out, r]; R [r, in] (NULL for para) */
    double s;                  /* alpha / r, or 1 */
    int transposed;            /* W stored [in, out] (Conv1D) */
    int qr;                    /* Q_P = right = qr(P).Q (else Q_P = P, right = relu(P)) */
} deft_params;

static lm_code deft_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    deft_cfg *d = calloc(1, sizeof *d);
    if (d == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = d;
    const cJSON *dm = lm_cfg_field(root, "decomposition_method");
    d->qr = dm != NULL && cJSON_IsString(dm) && strcmp(dm->valuestring, "qr") == 0;
    if (dm != NULL && !cJSON_IsNull(dm) && !d->qr && !(cJSON_IsString(dm) && strcmp(dm->valuestring, "relu") == 0))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type DEFT: decomposition_method is not \"relu\" or \"qr\"");
    const cJSON *a = lm_cfg_field(root, "alpha");
    if (a != NULL && !cJSON_IsNull(a) && lm_cfg_num(root, "alpha", &d->alpha, err))
        return err->code;
    return lm_cfg_bool(root, "para", &d->para, err);
}

static lm_code deft_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const deft_cfg *dc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *P = m->part[DP], *R = m->part[DR];
    if (P == NULL || (R == NULL && !dc->para))
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "DeFT needs deft_P%s",
                              dc->para ? "" : " and deft_R (para is false)");
    if (R != NULL && dc->para)
        return lm_mismatch(err, m->path, "deft_R present but the config's para is true");
    if (P->n_dims != 2 || P->shape[1] == 0 || !lm_is_float_dtype(P->dtype) ||
        (R != NULL && (R->n_dims != 2 || R->shape[0] != P->shape[1] || !lm_is_float_dtype(R->dtype))))
        return lm_mismatch(err, m->path, "deft_P / deft_R must be [out, r] and [r, in] float matrices");
    uint64_t out = P->shape[0], r = P->shape[1], in;
    /* PEFT makes deft_P [out, min(r, out)] ('r', no pattern) */
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    if (lm_cfg_checked(ctx) && cfg->r_given && r != ((uint64_t)cfg->r < out ? (uint64_t)cfg->r : out))
        return lm_cfg_disagrees(ctx, err, m->path, "r", cfg->r, "deft_P is [%llu, %llu] (PEFT makes [out, "
                                "min(r, out)])", (unsigned long long)out, (unsigned long long)r);
    if (dc->qr && r > out)
        return lm_mismatch(err, m->path, "deft_P is [%llu, %llu]: \"qr\" needs r <= out (PEFT caps r at out)",
                           (unsigned long long)out, (unsigned long long)r);
    if (R != NULL)
        in = R->shape[1];
    else {
        long wi = lm_ctx_module_weight(ctx, m->path, err);
        if (wi < 0)
            return err->code;
        const lm_tensor_info *W = lm_ctx_base(ctx, wi);
        if (W->n_dims != 2 || (W->shape[0] != out && W->shape[1] != out))
            return lm_mismatch(err, m->path, "deft_P has %llu rows but base '%s' has no such dimension",
                               (unsigned long long)out, W->name);
        in = W->shape[0] == out && !(W->shape[1] == out && lm_is_gpt2_conv1d(m->path)) ? W->shape[1] : W->shape[0];
    }
    int orient = 0;
    long bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err);
    if (bi < 0)
        return err->code;
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "deft", m->path, r, in, out, orient, 1.0,
                                 sizeof(deft_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    /* PEFT: scaling = alpha / r when alpha is set (r capped at out: P's columns) */
    *(deft_params *)op->params = (deft_params){P, R, dc->alpha != 0 ? dc->alpha / (double)r : 1.0, orient, dc->qr};
    op->flops += 2.0 * (double)in * (double)out * (double)r; /* right^T W */
    return LM_OK;
}

/* Q = qr(P).Q [out, r] in double into p (NULL with *err on failure) */
static double *deft_qr(const float *P, uint64_t out, uint64_t r, lm_prepared *p, lm_err *err)
{
    double *q = lm_prep_alloc(p, (size_t)(out * r) * sizeof(double), err);
    if (q == NULL)
        return NULL;
    for (uint64_t e = 0; e < out * r; e++)
        q[e] = P[e];
    int rc = lm_qr_q(q, (size_t)out, (size_t)r);
    if (rc == 0)
        return q;
    if (rc == -3)
        lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "DeFT's \"qr\" needs LAPACK from OpenBLAS (libopenblas.so.0), "
                "which could not be loaded");
    else if (rc == -1)
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    else
        lm_fail(err, LM_E_FORMAT, "NonFinite", "LAPACK's QR of deft_P failed (inf or NaN in it?)");
    return NULL;
}

/* B' = Q_P [out, r]; A' = s R - right^T W [r, in] (f64, and its f32 rounding): relu: Q_P = P,
 * right = relu(P); qr: Q_P = right = qr(P).Q */
static lm_code deft_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const deft_params *pr = op->params;
    uint64_t r = op->rank, in = op->in, out = op->out;
    const float *P = lm_prep_view(p, pr->P, k, err), *W = p->base;
    const float *R = P && pr->R ? lm_prep_view(p, pr->R, k, err) : NULL;
    double *a64 = P ? lm_prep_alloc(p, (size_t)(r * in) * sizeof(double), err) : NULL;
    if (a64 == NULL || (pr->R != NULL && R == NULL))
        return LM_E_NOMEM;
    const double *q = NULL;
    if (pr->qr && (q = deft_qr(P, out, r, p, err)) == NULL)
        return err->code;
    for (uint64_t o = 0; o < out; o++)
        for (uint64_t c = 0; c < r; c++) {
            double rq = q ? q[o * r + c] : P[o * r + c] > 0 ? (double)P[o * r + c] : 0.0;
            if (rq == 0.0)
                continue;
            double *f = a64 + c * in;
            for (uint64_t i = 0; i < in; i++) /* logical W[o, i]: stored [in, out] when transposed */
                f[i] -= rq * (double)(pr->transposed ? W[i * out + o] : W[o * in + i]);
        }
    for (uint64_t e = 0; R != NULL && e < r * in; e++)
        a64[e] += pr->s * (double)R[e];
    p->b = P; /* relu: the saved P (qr: Q_P, rounded, in its place) */
    return lm_prep_publish64(p, a64, (size_t)(r * in), q, (size_t)(out * r), err);
}

static void deft_describe_config(const lm_adapter_config *cfg, char *buf, size_t cap)
{
    const deft_cfg *d = cfg->mcfg;
    snprintf(buf, cap, "decomposition_method: %s, para: %s, alpha: %g (delta computed from the base weight)\n",
             d->qr ? "qr" : "relu", d->para ? "true" : "false", d->alpha);
}

static const lm_part deft_parts[] = {{"deft_P", DP, -1, 1}, {"deft_R", DR, -1, 1}};

const lm_method lm_method_deft = {
    .peft_type = "DEFT",
    .summary = "deft (subspace of the base weight removed, injection added)",
    .parts = deft_parts,
    .n_parts = 2,
    .flags = LM_M_READS_BASE | LM_M_UNIT_WEIGHT,
    .parse_config = deft_parse,
    .plan_module = deft_plan_module,
    .prepare = deft_prepare,
    .describe_config = deft_describe_config,
};
