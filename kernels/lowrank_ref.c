/* SPDX-License-Identifier: MIT */
/* lowrank_ref.c : the scalar reference of the low-rank tile kernel (contract in lm_kernels.h, proof
 * in lowrank_exact.c).  One element at a time, with exactly the f32 (or f64) operations the SIMD
 * variants perform on each lane, in the same order: fmaf()/fma() for the fused steps, plain
 * operators for the others (the build has -ffp-contract=off, so nothing else gets fused). */
#include "lm_kernels.h"

#include <math.h>
#include <string.h>

/* element idx of a row of dtype t, through memcpy: any alignment is allowed */
static float lr_load_w(const void *w, lm_kdtype t, size_t idx)
{
    if (t == LM_KDT_F32) {
        float f;
        memcpy(&f, (const char *)w + 4 * idx, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, (const char *)w + 2 * idx, 2);
    return t == LM_KDT_BF16 ? lm_bf16_to_f32_1(h) : lm_f16_to_f32_1(h);
}

static void lr_store(void *out, lm_kdtype t, size_t idx, uint32_t bits)
{
    if (t == LM_KDT_F32) {
        memcpy((char *)out + 4 * idx, &bits, 4);
    } else {
        const uint16_t h = (uint16_t)bits;
        memcpy((char *)out + 2 * idx, &h, 2);
    }
}

/* RNE of a (non-NaN) f32 to the output dtype, as bits */
static uint32_t lr_cvt(float x, lm_kdtype t)
{
    switch (t) {
    case LM_KDT_BF16: return lm_f32_to_bf16_1(x);
    case LM_KDT_F16: return lm_f32_to_f16_1(x);
    default: return lm_f32_bits(x);
    }
}

/* one element, levels 1 to 3 */
static uint32_t lr_one(const lm_lowrank *lr, size_t i, size_t j, float w, lm_kdtype out_dtype,
                       unsigned flags, lm_lowrank_stats *st)
{
    const size_t K = lr->K, cols = lr->cols;
    st->n_elems++;
    if (out_dtype != LM_KDT_F32 || (flags & LM_LOWRANK_UNCERTIFIED)) {
        /* four chains, chain m over k = m, m+4, ...; then (c0 + c1) + (c2 + c3) */
        const float *b = lr->Bf + i * K, *a = lr->Af + j;
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (size_t k = 0; k < K; k++)
            c[k % 4] = fmaf(b[k], a[k * cols], c[k % 4]);
        const float d = (c[0] + c[1]) + (c[2] + c[3]);
        const float r = w + d;
        if (flags & LM_LOWRANK_UNCERTIFIED) {
            if (isnan(r)) {
                st->n_nonfinite++;
                return lm_lr_nan_bits(out_dtype);
            }
            const uint32_t o = lr_cvt(r, out_dtype);
            st->n_overflow += !lm_lr_finite_bits(o, out_dtype);
            return o;
        }
        const float e1 = fmaf(lr->bnd_rf[i], lr->bnd_cf[j], LM_LR_C0F);
        if (out_dtype == LM_KDT_BF16) { /* |r|'s ends widened on their bits ((g) in lowrank_exact.c) */
            const float ar = fabsf(r);
            const uint32_t tm = lm_f32_bits(ar - e1) + LM_LR_BF16_NEAR, tM = lm_f32_bits(ar + e1) + LM_LR_BF16_FAR;
            if ((tm >> 16) == (tM >> 16) && (tm >> 16) < LM_LR_BF16_QMAX)
                return (tm >> 16) | ((lm_f32_bits(r) >> 16) & 0x8000u);
        } else { /* f16: (e), (f) */
            const float e = fmaf(fabsf(r), LM_LR_CRF, e1);
            const float lo = r - e, hi = r + e;
            if (fabsf(r) < LM_LR_RMAX_F16) {
                const uint32_t blo = lr_cvt(lo, out_dtype);
                if (blo == lr_cvt(hi, out_dtype))
                    return blo;
            }
        }
    } else {
        const double *b = lr->Bs + i * K;
        double d = 0.0;
        for (size_t k = 0; k < K; k++)
            d = fma(b[k], lr->A[k * cols + j], d);
        const double r = (double)w + d;
        double e = fma(lr->bnd_rd[i], lr->bnd_cd[j], LM_LR_C0D);
        e = fma(fabs(r), LM_LR_CRD, e);
        const double lo = r - e, hi = r + e;
        if (fabs(r) < (double)LM_LR_RMAX_F32) {
            const uint32_t blo = lm_f32_bits((float)lo);
            if (blo == lm_f32_bits((float)hi))
                return blo;
        }
    }
    st->n_recomputed++;
    return lm_lowrank_fallback_1(lr, i, j, w, out_dtype, st);
}

void lm_lowrank_row_ref(const lm_lowrank *lr, size_t i, size_t j0, size_t j1, const void *w_row,
                        lm_kdtype w_dtype, void *out_row, lm_kdtype out_dtype, unsigned flags,
                        lm_lowrank_stats *st)
{
    const size_t wsz = w_dtype == LM_KDT_F32 ? 4 : 2;
    for (size_t j = j0; j < j1; j++) {
        const float wv = lr_load_w(w_row, w_dtype, j);
        uint32_t in; /* W's bits, read before the store (out_row may be w_row) */
        if (wsz == 4) {
            memcpy(&in, (const char *)w_row + 4 * j, 4);
        } else {
            uint16_t h;
            memcpy(&h, (const char *)w_row + 2 * j, 2);
            in = h;
        }
        const uint32_t o = lr_one(lr, i, j, wv, out_dtype, flags, st);
        lr_store(out_row, out_dtype, j, o);
        if (w_dtype == out_dtype)
            st->n_changed += o != in;
    }
}

void lm_lowrank_ref(const lm_lowrank *lr, size_t row0, size_t n_rows, const void *w,
                    lm_kdtype w_dtype, size_t ldw, void *out, lm_kdtype out_dtype, size_t ldo,
                    unsigned flags, lm_lowrank_stats *st)
{
    const size_t wsz = w_dtype == LM_KDT_F32 ? 4 : 2, osz = out_dtype == LM_KDT_F32 ? 4 : 2;
    for (size_t i = 0; i < n_rows; i++)
        lm_lowrank_row_ref(lr, row0 + i, 0, lr->cols, (const char *)w + i * ldw * wsz, w_dtype,
                           (char *)out + i * ldo * osz, out_dtype, flags, st);
}
