/* SPDX-License-Identifier: MIT */
/* round64.c : f64 values rounded ONCE to bf16, f16 or f32 (round to nearest, ties to even), for
 * the exact f64 tile path (engine/exec_exact.h, LM_EXACT_F64).  f32 outputs: the C cast, which is
 * that rounding.  bf16/f16: x is first rounded to f32 by round-to-odd (truncate towards zero,
 * then set the last bit when anything was dropped), and that f32 value rounded RNE by the
 * reference conversions (lm_f32_to_bf16_1 / lm_f32_to_f16_1).  Round-to-odd to a format with
 * at least p + 2 bits followed by RNE to p bits is the correctly rounded result (Boldo and
 * Melquiond, "Emulation of FMA and correctly-rounded sums: proved algorithms using rounding to
 * odd", IEEE TC 2008): f32 keeps >= 13 bits more than f16 and >= 16 more than bf16 at every
 * magnitude where those have a quantum, subnormals of both included, so the odd bit stands
 * below the rounding position and records whether x was above the f32 value.  Beyond FLT_MAX
 * the odd truncation is FLT_MAX itself (odd), which rounds to inf in both narrower formats, as
 * x does.  No FTZ/DAZ assumed; the default rounding mode (to nearest) is. */
#include "lm_kernels.h"

#include <math.h>

/* the reference (slot f64_round of lm_kernels; round64_avx2.c and round64_avx512.c are the
 * vector variants, bit for bit) */
void lm_f64_round_ref(const double *src, void *dst, lm_kdtype out, size_t n)
{
    if (out == LM_KDT_F32) {
        float *d = dst;
        for (size_t i = 0; i < n; i++)
            d[i] = (float)src[i];
        return;
    }
    uint16_t *d = dst;
    if (out == LM_KDT_BF16) { /* lm_f64_to_16_1 without branches, so that it vectorizes: same bits */
        for (size_t i = 0; i < n; i++) {
            const double x = src[i];
            const float f = (float)x;
            const double b = (double)f;
            uint32_t u = lm_f32_bits(f);
            u -= (uint32_t)(fabs(b) > fabs(x));
            u |= (uint32_t)((b != x) & (x == x));
            const uint32_t rne = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x0040u;
            d[i] = (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rne);
        }
        return;
    }
    for (size_t i = 0; i < n; i++)
        d[i] = lm_f64_to_16_1(src[i], out);
}
