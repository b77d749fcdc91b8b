/* SPDX-License-Identifier: MIT */
/* lohacert_avx512.c : AVX-512 variant of lm_loha_cert_ref (lohacert_ref.c), bit for bit: blocks
 * of up to 4 rows x one panel (32 columns), the two products' chains in 16 registers over p (each
 * lane its element's chain of fused multiply-adds in p order), then the reference's element
 * operations lane by lane; the columns after the last full panel by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T512 __attribute__((target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define L5_INLINE static inline __attribute__((always_inline)) T512

typedef struct {
    __m512 ky, c124, s;
    __m512i h8, lo16, e8, one16;
    __m256i em;
    int bf16, count;
    lm_kdtype in;
} l5_consts;

/* 16 elements of x from element e on, as f32 (exact) */
L5_INLINE __m512 l5_x(const l5_consts *k, const void *x, size_t e)
{
    if (k->in == LM_KDT_F32)
        return _mm512_loadu_ps((const float *)x + e);
    const __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)((const uint16_t *)x + e));
    if (k->in == LM_KDT_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* the element operations of one vector, elements e .. e + 15 (lohacert_ref.c): y, the ends, their
 * rounding; stores the low end's bits (counted in *chg where they differ from x's), @return the
 * uncertain lanes */
L5_INLINE __mmask16 l5_elems(const l5_consts *k, __m512 t1, __m512 t2, const void *x, size_t e, __m512 rcc,
                             uint16_t *dst, unsigned *chg)
{
    const __m512 y = _mm512_add_ps(l5_x(k, x, e), _mm512_mul_ps(_mm512_mul_ps(t1, t2), k->s));
    const __m512 w = _mm512_add_ps(_mm512_fmadd_ps(_mm512_abs_ps(y), k->ky, rcc), k->c124);
    const __m512 lo = _mm512_sub_ps(y, w), hi = _mm512_add_ps(y, w);
    const __mmask16 nf = _mm512_fpclass_ps_mask(lo, 0x99); /* NaN or inf */
    if (k->bf16) {
        const __m512i a = _mm512_add_epi32(_mm512_castps_si512(lo), k->h8);
        const __m512i b = _mm512_add_epi32(_mm512_castps_si512(hi), k->h8);
        const __m256i bl = _mm512_cvtepi32_epi16(_mm512_srli_epi32(a, 16));
        _mm256_storeu_si256((__m256i *)(void *)(dst + e), bl);
        if (k->count)
            *chg += (unsigned)__builtin_popcount(_mm256_cmpneq_epi16_mask(
                bl, _mm256_loadu_si256((const __m256i *)(const void *)((const uint16_t *)x + e))));
        return nf | _mm512_cmpge_epu32_mask(_mm512_xor_si512(a, b), k->one16) | _mm512_testn_epi32_mask(a, k->lo16) |
               _mm512_testn_epi32_mask(b, k->lo16) | _mm512_cmpeq_epi32_mask(_mm512_and_si512(a, k->e8), k->e8);
    }
    const __m256i bl = _mm512_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i bh = _mm512_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256((__m256i *)(void *)(dst + e), bl);
    if (k->count)
        *chg += (unsigned)__builtin_popcount(
            _mm256_cmpneq_epi16_mask(bl, _mm256_loadu_si256((const __m256i *)(const void *)((const uint16_t *)x + e))));
    return nf | _mm256_cmpneq_epi16_mask(bl, bh) | _mm256_cmpeq_epi16_mask(_mm256_and_si256(bl, k->em), k->em);
}

/* the element operations of rows q0 .. q0 + mr of panel j from the products t[i][v] (t1) and
 * t[i][2 + v] (t2): a function of its own, so that its constants are not held in registers over
 * the products' loop (which needs 22 of them) */
static __attribute__((noinline)) T512 unsigned l5_finish(const l5_consts *k, const void *x, size_t q0, size_t mr,
                                                           const float *R, const lm_lohacert *lc, size_t j,
                                                           const __m512 (*t)[4], uint16_t *dst, uint16_t *unc,
                                                           uint64_t *n_changed)
{
    const size_t cols = lc->cols, nw = (cols + 15) / 16, P = LM_LOHA_PANEL;
    const __m512 cc0 = _mm512_loadu_ps(lc->cc + j * P), cc1 = _mm512_loadu_ps(lc->cc + j * P + 16);
    unsigned any = 0, chg = 0;
    for (size_t i = 0; i < mr; i++) {
        const size_t q = q0 + i, e = q * cols + j * P;
        const __m512 rq = _mm512_set1_ps(R[q]);
        const __mmask16 m0 = l5_elems(k, t[i][0], t[i][2], x, e, _mm512_mul_ps(rq, cc0), dst, &chg);
        const __mmask16 m1 = l5_elems(k, t[i][1], t[i][3], x, e + 16, _mm512_mul_ps(rq, cc1), dst, &chg);
        unc[q * nw + 2 * j] = (uint16_t)m0;
        unc[q * nw + 2 * j + 1] = (uint16_t)m1;
        any |= (unsigned)(m0 | m1);
    }
    *n_changed += chg;
    return any;
}

/* rows q0 .. q0 + mr (mr <= 4, a constant at every call), panel j: the products' chains in
 * registers */
L5_INLINE unsigned l5_block(const l5_consts *k, const void *x, size_t q0, size_t mr, const float *B1, const float *B2,
                            const float *R, const lm_lohacert *lc, size_t j, uint16_t *dst, uint16_t *unc,
                            uint64_t *n_changed)
{
    const size_t r = lc->r, P = LM_LOHA_PANEL;
    const float *a1 = lc->Ap[0] + j * r * P, *a2 = lc->Ap[1] + j * r * P;
    __m512 t[4][4];
#pragma GCC unroll 4
    for (size_t i = 0; i < mr; i++)
        t[i][0] = t[i][1] = t[i][2] = t[i][3] = _mm512_setzero_ps();
    for (size_t p = 0; p < r; p++) {
        const __m512 a10 = _mm512_loadu_ps(a1 + p * P), a11 = _mm512_loadu_ps(a1 + p * P + 16);
        const __m512 a20 = _mm512_loadu_ps(a2 + p * P), a21 = _mm512_loadu_ps(a2 + p * P + 16);
#pragma GCC unroll 4
        for (size_t i = 0; i < mr; i++) {
            const __m512 b1 = _mm512_set1_ps(B1[(q0 + i) * r + p]), b2 = _mm512_set1_ps(B2[(q0 + i) * r + p]);
            t[i][0] = _mm512_fmadd_ps(b1, a10, t[i][0]);
            t[i][1] = _mm512_fmadd_ps(b1, a11, t[i][1]);
            t[i][2] = _mm512_fmadd_ps(b2, a20, t[i][2]);
            t[i][3] = _mm512_fmadd_ps(b2, a21, t[i][3]);
        }
    }
    return l5_finish(k, x, q0, mr, R, lc, j, (const __m512(*)[4])t, dst, unc, n_changed);
}

unsigned T512 lm_loha_cert_avx512(const void *x, size_t nr, const float *B1, const float *B2, const float *R,
                                  const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, uint64_t *n_changed)
{
    const l5_consts k = {_mm512_set1_ps(0x1.01004p-23f), _mm512_set1_ps(0x1p-124f), _mm512_set1_ps(lc->s),
                         _mm512_set1_epi32(0x8000), _mm512_set1_epi32(0xFFFF), _mm512_set1_epi32(0x7F800000),
                         _mm512_set1_epi32(0x10000), _mm256_set1_epi16(0x7C00), lc->out == LM_KDT_BF16, lc->count, lc->in};
    const size_t np = lc->cols / LM_LOHA_PANEL;
    unsigned any = 0;
    for (size_t j = 0; j < np; j++) {
        size_t q = 0;
        for (; q + 4 <= nr; q += 4)
            any |= l5_block(&k, x, q, 4, B1, B2, R, lc, j, dst, unc, n_changed);
        for (; q < nr; q++)
            any |= l5_block(&k, x, q, 1, B1, B2, R, lc, j, dst, unc, n_changed);
    }
    if (np * LM_LOHA_PANEL < lc->cols)
        any |= lm_loha_cert_cols_ref(x, nr, B1, B2, R, lc, dst, unc, n_changed, np * LM_LOHA_PANEL);
    return any != 0;
}
#endif
