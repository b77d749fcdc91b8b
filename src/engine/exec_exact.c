/* SPDX-License-Identifier: MIT */
/* exec_exact.c : see exec_exact.h. */
#include "exec_exact.h"

#include "exec_lowrank.h"

#include <math.h>
#include <string.h>

/* the scaling loops built for AVX-512 and AVX2 too (an ifunc picks one at load); the same
 * operations per element either way (f32 products, bit tests), so the same bytes */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define XE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define XE_CLONES
#endif

static int kernel_dtype(lm_dtype dt)
{
    return dt == LM_DT_BF16 || dt == LM_DT_F16 || dt == LM_DT_F32;
}

lm_exact_kind lm_exact_kind_of(const lm_plan_tensor *t)
{
    if (t->q != NULL)
        return LM_EXACT_NONE;
    if (lm_lowrank_tensor_eligible(t))
        return LM_EXACT_LOWRANK;
    if (t->base == NULL || t->n_ops == 0 || !kernel_dtype(t->src_dtype) || !kernel_dtype(t->dtype) || t->rows == 0 ||
        t->cols == 0)
        return LM_EXACT_NONE;
    if (t->n_ops == 1 && t->ops[0].kind == LM_OP_SCALE && kernel_dtype(t->ops[0].src->dtype))
        return LM_EXACT_SCALE; /* the factors are exact in f32 */
    return LM_EXACT_NONE;
}

int lm_exact_is_midpoint(float x, lm_kdtype out)
{
    const uint32_t a = lm_f32_bits(x) & 0x7FFFFFFFu;
    if (a >= 0x7F800000u || out == LM_KDT_F32)
        return 0;
    if (out == LM_KDT_BF16) /* bf16 keeps the top 16 bits, subnormals alike */
        return (a & 0xFFFFu) == 0x8000u;
    if (a >= 0x38800000u) /* f16 normal range (quantum 2^(e-10)): 13 dropped bits, 100...0 */
        return (a & 0x1FFFu) == 0x1000u && a <= 0x477FF000u; /* above 65520 everything is inf */
    const double q = (double)fabsf(x) * 0x1p24; /* f16 subnormals: quantum 2^-24; exact */
    return q - floor(q) == 0.5;
}

/* 1 if some element of p[0 .. n) may be a midpoint of out (a cheap superset: bit tests only, so
 * that the loop vectorizes) */
static inline __attribute__((always_inline)) uint32_t any_candidate(const float *p, size_t n, lm_kdtype out)
{
    uint32_t hit = 0;
    if (out == LM_KDT_BF16) {
        for (size_t c = 0; c < n; c++)
            hit |= (lm_f32_bits(p[c]) & 0xFFFFu) == 0x8000u;
    } else {
        for (size_t c = 0; c < n; c++) {
            const uint32_t u = lm_f32_bits(p[c]);
            hit |= ((u & 0x1FFFu) == 0x1000u) | (((u & 0x7FFFFFFFu) < 0x38800000u) & ((u & 0xFFFu) == 0));
        }
    }
    return hit;
}

/* Proof.  p = fl32(w f) (w, f f32, the exact product x = w f has at most 48 significant bits and
 * is exact in f64).  If x = p, RNE_out(p) is RNE_out(x).  Else p is x rounded once, so x and p lie
 * in the same closed interval between neighbouring f32 values and |x - p| <= ulp32(p) / 2.
 * Output rounding boundaries (midpoints between neighbouring bf16/f16 values) are f32 values, so
 * no boundary lies strictly between x and p; if p is not a boundary, x and p round alike.  If p
 * is a boundary, p' = p moved one f32 ulp towards x: x lies strictly between p and p' (|x - p| <=
 * ulp/2 < ulp, x != p), the next boundary or output value beyond p is at least 2^12 f32 ulps
 * away (f16: 13 dropped bits; bf16: 16), so p' and x are on the same side of p inside the same
 * rounding interval: RNE_out(p') = RNE_out(x).  p' is never a power of two crossing (a midpoint
 * has its lowest kept bit set). */
XE_CLONES uint64_t lm_exact_scale_tile(float *acc, uint64_t r0, uint64_t nr, uint64_t cols, const float *s, int axis,
                                       lm_kdtype out, int certify)
{
    enum { CH = 256 };
    uint64_t n_fix = 0;
    float p[CH];
    for (uint64_t r = 0; r < nr; r++) {
        float *row = acc + r * cols;
        const float fr = axis == 0 ? s[r0 + r] : 0.0f;
        for (uint64_t c0 = 0; c0 < cols; c0 += CH) {
            const size_t n = (size_t)(cols - c0 < CH ? cols - c0 : CH);
            float *w = row + c0;
            const float *fc = s + c0;
            if (axis == 0)
                for (size_t c = 0; c < n; c++)
                    p[c] = w[c] * fr;
            else
                for (size_t c = 0; c < n; c++)
                    p[c] = w[c] * fc[c];
            /* an f32 output is fl32(x) itself */
            if (certify && out != LM_KDT_F32 && any_candidate(p, n, out))
                for (size_t c = 0; c < n; c++) {
                    if (!lm_exact_is_midpoint(p[c], out))
                        continue;
                    const double x = (double)w[c] * (double)(axis == 0 ? fr : fc[c]); /* exact */
                    n_fix++;
                    if (x != (double)p[c])
                        p[c] = nextafterf(p[c], x > (double)p[c] ? INFINITY : -INFINITY);
                }
            memcpy(w, p, n * sizeof *w);
        }
    }
    return n_fix;
}
