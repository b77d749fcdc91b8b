/* SPDX-License-Identifier: MIT */
/* lohacert_ref.c : a row block of the certified LoHa merge (src/methods/loha.c proves the bound),
 * the reference.  For row q < nr and column c:
 *   t_j = the chain acc = fmaf(B_j[q][p], A_j[p][c], acc) over p = 0 .. r - 1 from acc = 0
 *         (gemm_rows' product; A_j[p][c] read from its panels, lm_lohacert);
 *   y = x + (t_1 t_2) s (x converted from lc->in, lm_loha_x);
 *   w = fmaf(|y|, ky, R[q] cc[c]) + 2^-124,  ky = 2^-23 (1 + 2^-8 + 2^-18);
 *   lo = y - w,  hi = y + w;
 *   bf16: a = bits(lo) + 0x8000, b = bits(hi) + 0x8000 (each end rounded half away from zero, which
 *         is RNE except at a tie, where the low half of a or b is 0), dst = a >> 16; certified when
 *         a >> 16 == b >> 16, neither low half is 0 and the exponent of dst is not all ones;
 *   f16:  dst = lm_f32_to_f16_1(lo), certified when lm_f32_to_f16_1(hi) is the same and its
 *         exponent is not all ones;
 *   and never when lo is inf or NaN (a NaN's bits plus 0x8000 may carry out of its exponent);
 *   the unc bit set where not certified; counted (lc->count) where dst differs from x's bits.
 * f32 operations in this order, no contraction (the build has -ffp-contract=off).  The SIMD
 * variants do the same operations lane by lane (their tails call lm_loha_cert_cols_ref): the
 * same bits. */
#include "lm_kernels.h"

#include <math.h>

unsigned lm_loha_cert_cols_ref(const void *x, size_t nr, const float *B1, const float *B2, const float *R,
                               const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, uint64_t *n_changed, size_t c0)
{
    const size_t r = lc->r, cols = lc->cols, nw = (cols + 15) / 16, P = LM_LOHA_PANEL;
    const float ky = 0x1.01004p-23f, s = lc->s;
    unsigned any = 0;
    uint64_t changed = 0;
    for (size_t q = 0; q < nr; q++) {
        const float *b1 = B1 + q * r, *b2 = B2 + q * r;
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
            const float y = lm_loha_x(x, lc->in, q * cols + c) + (t1 * t2) * s;
            const float wd = fmaf(fabsf(y), ky, R[q] * lc->cc[c]) + 0x1p-124f, lo = y - wd, hi = y + wd;
            const uint32_t ul = lm_f32_bits(lo);
            unsigned u = (ul & 0x7F800000u) == 0x7F800000u;
            if (lc->out == LM_KDT_BF16) {
                const uint32_t a = ul + 0x8000u, b = lm_f32_bits(hi) + 0x8000u;
                dst[q * cols + c] = (uint16_t)(a >> 16);
                u |= ((a ^ b) >= 0x10000u) | ((a & 0xFFFFu) == 0) | ((b & 0xFFFFu) == 0) |
                     ((a & 0x7F800000u) == 0x7F800000u);
            } else {
                const uint16_t bl = lm_f32_to_f16_1(lo), bh = lm_f32_to_f16_1(hi);
                dst[q * cols + c] = bl;
                u |= (bl != bh) | ((bl & 0x7C00u) == 0x7C00u);
            }
            uq[c / 16] |= (uint16_t)(u << (c % 16));
            any |= u;
            if (lc->count)
                changed += dst[q * cols + c] != ((const uint16_t *)x)[q * cols + c];
        }
    }
    *n_changed += changed;
    return any;
}

unsigned lm_loha_cert_ref(const void *x, size_t nr, const float *B1, const float *B2, const float *R,
                          const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, uint64_t *n_changed)
{
    return lm_loha_cert_cols_ref(x, nr, B1, B2, R, lc, dst, unc, n_changed, 0);
}
