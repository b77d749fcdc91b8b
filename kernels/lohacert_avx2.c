/* SPDX-License-Identifier: MIT */
/* lohacert_avx2.c : AVX2 variant of lm_loha_cert_ref (lohacert_ref.c), bit for bit: blocks of up
 * to 2 rows x 16 columns (half a panel), the two products' chains in 8 registers over p (each lane
 * its element's chain of fused multiply-adds in p order), then the reference's element operations
 * lane by lane; the columns after the last full 16 by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T256 __attribute__((target("avx,avx2,fma,f16c")))
#define L2_INLINE static inline __attribute__((always_inline)) T256

typedef struct {
    __m256 ky, c124, s, sign;
    __m256i h8, lo16, e8;
    __m128i em;
    int bf16, count;
    lm_kdtype in;
} l2_consts;

/* 8 elements of x from element e on, as f32 (exact) */
L2_INLINE __m256 l2_x(const l2_consts *k, const void *x, size_t e)
{
    if (k->in == LM_KDT_F32)
        return _mm256_loadu_ps((const float *)x + e);
    const __m128i h = _mm_loadu_si128((const __m128i *)(const void *)((const uint16_t *)x + e));
    if (k->in == LM_KDT_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* the elements of 8 stored bits that differ from x's */
L2_INLINE unsigned l2_changed(__m128i bits, const void *x, size_t e)
{
    const __m128i eq = _mm_cmpeq_epi16(bits, _mm_loadu_si128((const __m128i *)(const void *)((const uint16_t *)x + e)));
    return 8u - (unsigned)__builtin_popcount((unsigned)_mm_movemask_epi8(eq)) / 2u;
}

/* the element operations of elements e .. e + 7 (lohacert_ref.c); stores the low end's bits
 * (counted in *chg where they differ from x's), @return the uncertain lanes as 8 bits */
L2_INLINE unsigned l2_elems(const l2_consts *k, __m256 t1, __m256 t2, const void *x, size_t e, __m256 rcc,
                            uint16_t *dst, uint64_t *chg)
{
    const __m256 y = _mm256_add_ps(l2_x(k, x, e), _mm256_mul_ps(_mm256_mul_ps(t1, t2), k->s));
    const __m256 w = _mm256_add_ps(_mm256_fmadd_ps(_mm256_andnot_ps(k->sign, y), k->ky, rcc), k->c124);
    const __m256 lo = _mm256_sub_ps(y, w), hi = _mm256_add_ps(y, w);
    const __m256i ul = _mm256_castps_si256(lo), z = _mm256_setzero_si256();
    __m256i bad = _mm256_cmpeq_epi32(_mm256_and_si256(ul, k->e8), k->e8); /* lo NaN or inf */
    if (k->bf16) {
        const __m256i a = _mm256_add_epi32(ul, k->h8), b = _mm256_add_epi32(_mm256_castps_si256(hi), k->h8);
        const __m256i h = _mm256_srli_epi32(a, 16);
        const __m128i bl = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        _mm_storeu_si128((__m128i *)(void *)(dst + e), bl);
        if (k->count)
            *chg += l2_changed(bl, x, e);
        bad = _mm256_or_si256(bad, _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_srli_epi32(_mm256_xor_si256(a, b), 16), z),
                                                       _mm256_set1_epi32(-1)));
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(a, k->lo16), z));
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(b, k->lo16), z));
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(a, k->e8), k->e8));
        return (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(bad));
    }
    const __m128i bl = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i bh = _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128((__m128i *)(void *)(dst + e), bl);
    if (k->count)
        *chg += l2_changed(bl, x, e);
    const __m128i ne = _mm_xor_si128(_mm_cmpeq_epi16(bl, bh), _mm_set1_epi16(-1));
    const __m128i m = _mm_or_si128(ne, _mm_cmpeq_epi16(_mm_and_si128(bl, k->em), k->em));
    return ((unsigned)_mm_movemask_epi8(_mm_packs_epi16(m, _mm_setzero_si128())) & 0xFFu) |
           (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(bad));
}

/* rows q0 .. q0 + mr (mr <= 2, a constant at every call), columns c0 .. c0 + 16 */
L2_INLINE unsigned l2_block(const l2_consts *k, const void *x, size_t q0, size_t mr, const float *B1, const float *B2,
                            const float *R, const lm_lohacert *lc, size_t c0, uint16_t *dst, uint16_t *unc,
                            uint64_t *chg)
{
    const size_t r = lc->r, cols = lc->cols, nw = (cols + 15) / 16, P = LM_LOHA_PANEL;
    const size_t off = (c0 / P) * r * P + c0 % P;
    const float *a1 = lc->Ap[0] + off, *a2 = lc->Ap[1] + off;
    __m256 t1[2][2], t2[2][2];
#pragma GCC unroll 2
    for (size_t i = 0; i < mr; i++)
        t1[i][0] = t1[i][1] = t2[i][0] = t2[i][1] = _mm256_setzero_ps();
    for (size_t p = 0; p < r; p++) {
        const __m256 a10 = _mm256_loadu_ps(a1 + p * P), a11 = _mm256_loadu_ps(a1 + p * P + 8);
        const __m256 a20 = _mm256_loadu_ps(a2 + p * P), a21 = _mm256_loadu_ps(a2 + p * P + 8);
#pragma GCC unroll 2
        for (size_t i = 0; i < mr; i++) {
            const __m256 b1 = _mm256_broadcast_ss(B1 + (q0 + i) * r + p), b2 = _mm256_broadcast_ss(B2 + (q0 + i) * r + p);
            t1[i][0] = _mm256_fmadd_ps(b1, a10, t1[i][0]);
            t1[i][1] = _mm256_fmadd_ps(b1, a11, t1[i][1]);
            t2[i][0] = _mm256_fmadd_ps(b2, a20, t2[i][0]);
            t2[i][1] = _mm256_fmadd_ps(b2, a21, t2[i][1]);
        }
    }
    const __m256 cc0 = _mm256_loadu_ps(lc->cc + c0), cc1 = _mm256_loadu_ps(lc->cc + c0 + 8);
    unsigned any = 0;
#pragma GCC unroll 2
    for (size_t i = 0; i < mr; i++) {
        const size_t q = q0 + i, e = q * cols + c0;
        const __m256 rq = _mm256_set1_ps(R[q]);
        const unsigned m0 = l2_elems(k, t1[i][0], t2[i][0], x, e, _mm256_mul_ps(rq, cc0), dst, chg);
        const unsigned m1 = l2_elems(k, t1[i][1], t2[i][1], x, e + 8, _mm256_mul_ps(rq, cc1), dst, chg);
        unc[q * nw + c0 / 16] = (uint16_t)(m0 | m1 << 8);
        any |= m0 | m1;
    }
    return any;
}

unsigned T256 lm_loha_cert_avx2(const void *x, size_t nr, const float *B1, const float *B2, const float *R,
                                const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, uint64_t *n_changed)
{
    const l2_consts k = {_mm256_set1_ps(0x1.01004p-23f), _mm256_set1_ps(0x1p-124f), _mm256_set1_ps(lc->s),
                         _mm256_set1_ps(-0.0f), _mm256_set1_epi32(0x8000), _mm256_set1_epi32(0xFFFF),
                         _mm256_set1_epi32(0x7F800000), _mm_set1_epi16(0x7C00), lc->out == LM_KDT_BF16, lc->count, lc->in};
    const size_t nc = lc->cols / 16 * 16;
    unsigned any = 0;
    uint64_t chg = 0;
    for (size_t c0 = 0; c0 < nc; c0 += 16) {
        size_t q = 0;
        for (; q + 2 <= nr; q += 2)
            any |= l2_block(&k, x, q, 2, B1, B2, R, lc, c0, dst, unc, &chg);
        for (; q < nr; q++)
            any |= l2_block(&k, x, q, 1, B1, B2, R, lc, c0, dst, unc, &chg);
    }
    *n_changed += chg;
    if (nc < lc->cols)
        any |= lm_loha_cert_cols_ref(x, nr, B1, B2, R, lc, dst, unc, n_changed, nc);
    return any != 0;
}
#endif
