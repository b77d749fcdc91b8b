/* SPDX-License-Identifier: MIT */
/* rotcert_ref.c : one row of the certified rotation (OFT, BOFT; src/methods/oft.c proves the
 * bound), the reference: from the row's input x and v = D x (rot_blocks with D = R - I),
 *   per block j of bs:  ss = ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), l_q the squares
 *                       x_b^2 of b = q mod 8 summed in b order (from 0);
 *                       xn = (sqrtf(ss) cx + 2^-70) c1, cx = 1 + (bs + 2) 2^-24, c1 = (bs + 4) 2^-24;
 *                       e_a = dn_a xn (dn: row j of rc->dn, or row 0 when n_rot is 1);
 *   per element:        y = x + v, b = ((e + |y| cy) + |x| ca) + c0 (cy = 2^-24 (1 + 2^-20),
 *                       ca = bs 2^-52, c0 = bs 2^-149); scaled: y = y f, b = b af + |y| 2^-23 +
 *                       2^-149 (af = |f| (1 + 2^-20));
 *                       w = b (1 + 2^-20) + |y| 2^-22, lo = y - w, hi = y + w (f32 operations, in
 *                       this order, no contraction);
 *                       dst = RNE_out(lo) (bf16: the integer rounding of lm_f32_to_bf16_1 without
 *                       its NaN case; f16: lm_f32_to_f16_1), unc = RNE_out(hi) differs, dst has an
 *                       all-ones exponent, or lo is inf or NaN (a NaN's bits plus the bf16 rounding
 *                       increment may carry out of its exponent: 0x7FFFFFFF rounds to 0x8000, -0,
 *                       and a NaN in a block makes every lo of the block NaN through its norm).
 * The SIMD variants do the same operations lane by lane: the same bits. */
#include "lm_kernels.h"

#include <math.h>

void lm_rotcert_norms_ref(const float *x, size_t cols, const lm_rotcert *rc, float *e)
{
    const size_t bs = rc->bs, nb = cols / bs;
    const float c1 = (float)(bs + 4) * 0x1p-24f, cx = 1.0f + (float)(bs + 2) * 0x1p-24f;
    for (size_t j = 0; j < nb; j++) {
        const float *xb = x + j * bs;
        float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        size_t b = 0;
        for (; b + 8 <= bs; b += 8)
            for (int q = 0; q < 8; q++)
                l[q] += xb[b + (size_t)q] * xb[b + (size_t)q];
        for (; b < bs; b++)
            l[b % 8] += xb[b] * xb[b];
        const float ss = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
        const float xn = (sqrtf(ss) * cx + 0x1p-70f) * c1;
        const float *dn = rc->dn + (rc->n_rot == 1 ? 0 : j) * bs;
        for (size_t a = 0; a < bs; a++)
            e[j * bs + a] = dn[a] * xn;
    }
}

unsigned lm_rotcert_elems_ref(const float *x, const float *v, const float *e, size_t n, const lm_rotcert *rc,
                              uint16_t *dst, uint8_t *unc)
{
    const float cy = 0x1p-24f * (1.0f + 0x1p-20f), ca = (float)rc->bs * 0x1p-52f, c0 = (float)rc->bs * 0x1p-149f;
    const float f = rc->f, af = fabsf(f) * (1.0f + 0x1p-20f);
    const uint16_t em = rc->out == LM_KDT_BF16 ? 0x7F80u : 0x7C00u;
    unsigned any = 0;
    for (size_t c = 0; c < n; c++) {
        const float xc = x[c];
        float y = xc + v[c];
        float b = ((e[c] + fabsf(y) * cy) + fabsf(xc) * ca) + c0;
        if (rc->scaled) {
            y *= f;
            b = b * af + fabsf(y) * 0x1p-23f + 0x1p-149f;
        }
        const float w = b * (1.0f + 0x1p-20f) + fabsf(y) * 0x1p-22f, lo = y - w, hi = y + w;
        const uint32_t ul = lm_f32_bits(lo);
        uint16_t bl, bh;
        if (rc->out == LM_KDT_BF16) {
            const uint32_t uh = lm_f32_bits(hi);
            bl = (uint16_t)((ul + 0x7FFFu + ((ul >> 16) & 1u)) >> 16);
            bh = (uint16_t)((uh + 0x7FFFu + ((uh >> 16) & 1u)) >> 16);
        } else {
            bl = lm_f32_to_f16_1(lo);
            bh = lm_f32_to_f16_1(hi);
        }
        dst[c] = bl;
        unc[c] = (uint8_t)((bl != bh) | ((bl & em) == em) | ((ul & 0x7F800000u) == 0x7F800000u));
        any |= unc[c];
    }
    return any;
}

unsigned lm_rot_cert_ref(const float *x, const float *v, size_t cols, const lm_rotcert *rc, float *e, uint16_t *dst,
                         uint8_t *unc)
{
    lm_rotcert_norms_ref(x, cols, rc, e);
    return lm_rotcert_elems_ref(x, v, e, cols, rc, dst, unc);
}
