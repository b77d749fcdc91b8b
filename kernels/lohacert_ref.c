/* SPDX-License-Identifier: MIT */
/* lohacert_ref.c : a row block of the certified LoHa merge (src/methods/loha.c proves the bound),
 * the reference.  For row q < nr and column c:
 *   t_j = the chain acc = fmaf(B_j[q][p], A_j[p][c], acc) over p = 0 .. r - 1 from acc = 0
 *         (gemm_rows' product; A_j[p][c] read from its panels, lm_lohacert);
 *   y = x + (t_1 t_2) s,  b = (cy |y| + R[q] cc[c]) + 2^-125,  cy = 2^-24 (1 + 2^-7);
 *   w = b (1 + 2^-20) + |y| 2^-22,  lo = y - w,  hi = y + w;
 *   dst = RNE_out(lo) (bf16: the integer rounding of lm_f32_to_bf16_1 without its NaN case;
 *   f16: lm_f32_to_f16_1); the unc bit set when RNE_out(hi) differs or has an all-ones exponent.
 * f32 operations in this order, no contraction (the build has -ffp-contract=off).  The SIMD
 * variants do the same operations lane by lane (their tails call lm_loha_cert_cols_ref): the
 * same bits. */
#include "lm_kernels.h"

#include <math.h>

static inline uint16_t lc_round(float v, lm_kdtype out)
{
    if (out == LM_KDT_BF16) {
        const uint32_t u = lm_f32_bits(v);
        return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    return lm_f32_to_f16_1(v);
}

unsigned lm_loha_cert_cols_ref(const float *x, size_t nr, const float *B1, const float *B2, const float *R,
                               const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, size_t c0)
{
    const size_t r = lc->r, cols = lc->cols, nw = (cols + 15) / 16, P = LM_LOHA_PANEL;
    const float cy = 0x1.02p-24f, s = lc->s;
    const uint16_t em = lc->out == LM_KDT_BF16 ? 0x7F80u : 0x7C00u;
    unsigned any = 0;
    for (size_t q = 0; q < nr; q++) {
        const float *b1 = B1 + q * r, *b2 = B2 + q * r, *xq = x + q * cols;
        uint16_t *uq = unc + q * nw;
        for (size_t w = c0 / 16; w < nw; w++)
            uq[w] = 0;
        for (size_t c = c0; c < cols; c++) {
            const size_t off = (c / P) * r * P + c % P;
            float t1 = 0.0f, t2 = 0.0f;
            for (size_t p = 0; p < r; p++) {
                t1 = fmaf(b1[p], lc->Ap[0][off + p * P], t1);
                t2 = fmaf(b2[p], lc->Ap[1][off + p * P], t2);
            }
            const float y = xq[c] + (t1 * t2) * s, ay = fabsf(y);
            const float b = (cy * ay + R[q] * lc->cc[c]) + 0x1p-125f;
            const float wd = b * (1.0f + 0x1p-20f) + ay * 0x1p-22f, lo = y - wd, hi = y + wd;
            const uint16_t bl = lc_round(lo, lc->out), bh = lc_round(hi, lc->out);
            dst[q * cols + c] = bl;
            const unsigned u = (bl != bh) | ((bl & em) == em);
            uq[c / 16] |= (uint16_t)(u << (c % 16));
            any |= u;
        }
    }
    return any;
}

unsigned lm_loha_cert_ref(const float *x, size_t nr, const float *B1, const float *B2, const float *R,
                          const lm_lohacert *lc, uint16_t *dst, uint16_t *unc)
{
    return lm_loha_cert_cols_ref(x, nr, B1, B2, R, lc, dst, unc, 0);
}
