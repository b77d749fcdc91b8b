/* SPDX-License-Identifier: MIT */
/* vblora.c : VB-LoRA (peft-merge.md §5.9): every r x L sub-vector of A and B mixed from the
 * shared vector bank [N, L] (base_model.vblora_vector_bank) with the softmax of its top-k logits
 * (or the saved top-k indices and k-1 weights, the last weight completing them to 1); then a
 * low-rank delta with both factors mixed in f64.  Saved indices are checked when planning. */
#include "method.h"

#include "lm_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { ZA, ZB, IA, WA, IB, WB };

#define VB_MAX_TOPK 64
#define VB_MAX_L 4096

typedef struct {
    long topk; /* (2) */
} vblora_cfg;

typedef struct {
    const lm_ts_tensor *bank, *za, *zb, *wa, *wb; /* za/zb: logits, or top-k indices when topk_only */
    uint64_t topk;
    int topk_only;
} vblora_params;

static lm_code vblora_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    vblora_cfg *v = calloc(1, sizeof *v);
    if (v == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = v;
    v->topk = 2;
    if (lm_cfg_int(root, "topk", &v->topk, err) != LM_OK)
        return err->code;
    if (v->topk <= 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'topk' must be positive");
    return LM_OK;
}

/* PEFT's load of save_only_topk_weights completes each row's k-1 weights w with 1 - sum(w),
 * computed in their dtype, and takes the log of all k: a sum above 1 (or a negative weight) is a
 * NaN there, where the merge would go on with a negative last weight.  Refused, naming the module
 * and the row.  The sum is taken exactly (f64) and rounded to the weights' dtype once, as torch's
 * sum of k-1 values is for k <= 3 (for larger k its order may round the last bit otherwise). */
static lm_code vb_check_weights(const lm_ts_tensor *w, uint64_t topk, const char *module, lm_err *err)
{
    lm_kernels kr;
    lm_kernels_select(&kr, "ref");
    float v[VB_MAX_TOPK];
    for (uint64_t row = 0; row < w->n_elems / (topk - 1); row++) {
        lm_ts_to_f32(w, row * (topk - 1), (size_t)(topk - 1), v, &kr);
        double sum = 0;
        for (uint64_t t = 0; t + 1 < topk; t++) {
            if (!(v[t] >= 0))
                return lm_module_fail(err, LM_E_FORMAT, "InvalidTensor", module, "'%s' row %llu holds the weight %g, "
                                      "not a softmax weight (PEFT's load takes its log)", w->name,
                                      (unsigned long long)row, (double)v[t]);
            sum += v[t];
        }
        float s32 = (float)sum, s = s32;
        uint16_t h;
        if (w->dtype == LM_DT_BF16) {
            kr.f32_to_bf16(&s32, &h, 1);
            kr.bf16_to_f32(&h, &s, 1);
        } else if (w->dtype == LM_DT_F16) {
            kr.f32_to_f16(&s32, &h, 1);
            kr.f16_to_f32(&h, &s, 1);
        }
        if (w->dtype == LM_DT_F64 ? sum > 1 : s > 1.0f)
            return lm_module_fail(err, LM_E_FORMAT, "InvalidTensor", module, "'%s' row %llu: its %llu saved top-k "
                                  "weights sum to %.9g, above 1 (the last weight, 1 minus their sum, would be negative; "
                                  "PEFT's load takes its log: NaN)", w->name, (unsigned long long)row,
                                  (unsigned long long)(topk - 1), sum);
    }
    lm_ts_drop_pages(w);
    return LM_OK;
}

static lm_code vblora_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const vblora_cfg *vc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *bank = lm_ctx_shared(ctx, "vblora_vector_bank");
    int topk_only = m->part[IA] || m->part[WA] || m->part[IB] || m->part[WB];
    const lm_ts_tensor *za = topk_only ? m->part[IA] : m->part[ZA], *zb = topk_only ? m->part[IB] : m->part[ZB];
    const lm_ts_tensor *wa = topk_only ? m->part[WA] : NULL, *wb = topk_only ? m->part[WB] : NULL;
    if (bank == NULL || bank->n_dims != 2 || !za || !zb || (topk_only && (!wa || !wb)))
        return lm_mismatch(err, m->path, "VB-LoRA needs both logits (or top-k indices and weights) and "
                           "base_model.vblora_vector_bank");
    uint64_t L = bank->shape[1], N = bank->shape[0], topk = (uint64_t)vc->topk;
    uint64_t last = topk_only ? topk : N;
    if (za->n_dims != 3 || zb->n_dims != 3 || za->shape[2] != last || zb->shape[2] != last ||
        za->shape[0] != zb->shape[1] || topk > N ||
        (topk_only && (wa->n_elems * topk != za->n_elems * (topk - 1) || wb->n_elems * topk != zb->n_elems * (topk - 1))))
        return lm_mismatch(err, m->path, "VB-LoRA logits do not fit the bank [%llu, %llu] and topk=%ld",
                           (unsigned long long)N, (unsigned long long)L, vc->topk);
    if (topk > VB_MAX_TOPK)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "VB-LoRA topk %llu is larger than %d",
                       (unsigned long long)topk, VB_MAX_TOPK);
    if (L > VB_MAX_L)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "VB-LoRA vector_length %llu is larger than %d",
                       (unsigned long long)L, VB_MAX_L);
    if (!lm_is_float_dtype(bank->dtype))
        return lm_mismatch(err, m->path, "'%s' is not a float tensor", bank->name);
    if (topk_only) {
        if (!lm_is_float_dtype(wa->dtype) || !lm_is_float_dtype(wb->dtype))
            return lm_mismatch(err, m->path, "VB-LoRA top-k weights are not float");
        const lm_ts_tensor *ix[2] = {za, zb};
        for (int s = 0; s < 2; s++) {
            if (lm_is_float_dtype(ix[s]->dtype))
                return lm_mismatch(err, m->path, "VB-LoRA top-k indices must be integers");
            for (uint64_t i = 0; i < ix[s]->n_elems; i++) { /* data, checked before anything is written */
                int64_t v = lm_ts_index(ix[s], i);
                if (v < 0 || (uint64_t)v >= N)
                    return lm_module_fail(err, LM_E_MISMATCH, "IndexOutOfRange", m->path,
                                          "'%s' holds index %lld outside the bank (%llu)", ix[s]->name, (long long)v,
                                          (unsigned long long)N);
            }
            lm_ts_drop_pages(ix[s]);
            if (topk > 1 && vb_check_weights(s ? wb : wa, topk, m->path, err) != LM_OK)
                return err->code;
        }
    } else if (!lm_is_float_dtype(za->dtype) || !lm_is_float_dtype(zb->dtype)) {
        return lm_mismatch(err, m->path, "VB-LoRA logits are not float");
    }
    uint64_t K = za->shape[0], in = za->shape[1] * L, out = zb->shape[0] * L;
    int orient = 0;
    long bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err);
    if (bi < 0)
        return err->code;
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "vblora", m->path, K, in, out, orient, 1.0, sizeof(vblora_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(vblora_params *)op->params = (vblora_params){bank, za, zb, wa, wb, topk, topk_only};
    return LM_OK;
}

/* one mixed vector (length L) from logits z[N] (top-k, softmax) or stored top-k indices and k-1
 * weights */
static void vb_mix(const float *bank, uint64_t N, uint64_t L, uint64_t topk, const float *z, const lm_ts_tensor *ix,
                   const float *wk, uint64_t slot, double *out)
{
    int64_t idx[VB_MAX_TOPK] = {0};
    double w[VB_MAX_TOPK];
    if (z != NULL) {
        for (uint64_t t = 0; t < topk; t++) { /* the t-th largest; ties: the lower index first */
            int64_t best = -1;
            for (uint64_t n = 0; n < N; n++) {
                int used = 0;
                for (uint64_t u = 0; u < t; u++)
                    used |= idx[u] == (int64_t)n;
                if (!used && (best < 0 || z[n] > z[best]))
                    best = (int64_t)n;
            }
            idx[t] = best;
        }
        double mx = z[idx[0]], sum = 0;
        for (uint64_t t = 0; t < topk; t++)
            sum += (w[t] = exp((double)z[idx[t]] - mx));
        for (uint64_t t = 0; t < topk; t++)
            w[t] /= sum;
    } else {
        double sum = 0;
        for (uint64_t t = 0; t < topk; t++) {
            idx[t] = lm_ts_index(ix, slot * topk + t); /* in range: checked when planning */
            if (t + 1 < topk)
                sum += (w[t] = wk[slot * (topk - 1) + t]);
        }
        w[topk - 1] = 1.0 - sum;
    }
    for (uint64_t l = 0; l < L; l++) {
        double v = 0;
        for (uint64_t t = 0; t < topk; t++)
            v += w[t] * (double)bank[(uint64_t)idx[t] * L + l];
        out[l] = v;
    }
}

static lm_code vblora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const vblora_params *pr = op->params;
    uint64_t N = pr->bank->shape[0], L = pr->bank->shape[1], K = op->rank, in = op->in, out = op->out;
    uint64_t ci = in / L, co = out / L, topk = pr->topk;
    const float *bank = lm_prep_view(p, pr->bank, k, err);
    const float *x0 = NULL, *x1 = NULL, *x2 = NULL, *x3 = NULL;
    if (bank == NULL)
        return LM_E_NOMEM;
    if (pr->topk_only) {
        if ((x1 = lm_prep_view(p, pr->wa, k, err)) == NULL || (x3 = lm_prep_view(p, pr->wb, k, err)) == NULL)
            return LM_E_NOMEM;
    } else if ((x0 = lm_prep_view(p, pr->za, k, err)) == NULL || (x2 = lm_prep_view(p, pr->zb, k, err)) == NULL) {
        return LM_E_NOMEM;
    }
    double *A = lm_prep_alloc(p, (size_t)(K * in + out * K + L) * sizeof(double), err);
    if (A == NULL)
        return LM_E_NOMEM;
    double *B = A + K * in, *v = B + out * K;
    for (uint64_t a = 0; a < K; a++) /* A [r, in]: row a, chunk q */
        for (uint64_t q = 0; q < ci; q++) {
            uint64_t slot = a * ci + q;
            vb_mix(bank, N, L, topk, pr->topk_only ? NULL : x0 + slot * N, pr->za, x1, slot, v);
            memcpy(A + a * in + q * L, v, (size_t)L * sizeof *v);
        }
    for (uint64_t q = 0; q < co; q++) /* B: logits [out/L, r, N] -> [out, r] */
        for (uint64_t a = 0; a < K; a++) {
            uint64_t slot = q * K + a;
            vb_mix(bank, N, L, topk, pr->topk_only ? NULL : x2 + slot * N, pr->zb, x3, slot, v);
            for (uint64_t l = 0; l < L; l++)
                B[(q * L + l) * K + a] = v[l];
        }
    return lm_prep_publish64(p, A, (size_t)(K * in), B, (size_t)(out * K), err);
}

static const lm_part vblora_parts[] = {
    {"vblora_logits_A", ZA, -1, 1},
    {"vblora_logits_B", ZB, -1, 1},
    {"vblora_logits_A_topk_indices", IA, -1, 1},
    {"vblora_logits_A_topk_weights", WA, -1, 1},
    {"vblora_logits_B_topk_indices", IB, -1, 1},
    {"vblora_logits_B_topk_weights", WB, -1, 1},
};
static const char *const vblora_shared[] = {"vblora_vector_bank", NULL};

const lm_method lm_method_vblora = {
    .peft_type = "VBLORA",
    .summary = "vblora (factors mixed from the vector bank)",
    .parts = vblora_parts,
    .n_parts = sizeof vblora_parts / sizeof *vblora_parts,
    .shared = vblora_shared,
    .parse_config = vblora_parse,
    .plan_module = vblora_plan_module,
    .prepare = vblora_prepare,
};
