/* SPDX-License-Identifier: MIT */
/* round64_avx512.c : AVX-512 variant of lm_f64_round_ref (round64.c), bit for bit: the same
 * round-to-odd f32 value (vcvtpd2ps is the C cast's RNE; then one step towards zero when that
 * rounded away, and the last bit set when inexact), then RNE to bf16 by the integer steps of
 * lm_f32_to_bf16_1 or to f16 by vcvtps2ph (as lm_f32_to_f16_avx512); f32 outputs: vcvtpd2ps.
 * 16 elements per iteration, the tail by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T512 __attribute__((target("avx,avx2,f16c,fma,avx512f,avx512bw,avx512vl,avx512dq")))

/* 8 doubles rounded to odd in f32, as bits */
static inline __m256i T512 odd8(__m512d x)
{
    const __m256 f = _mm512_cvtpd_ps(x);
    const __m512d b = _mm512_cvtps_pd(f);
    const __mmask8 away = _mm512_cmp_pd_mask(_mm512_abs_pd(b), _mm512_abs_pd(x), _CMP_GT_OQ);
    const __mmask8 inexact = _mm512_cmp_pd_mask(b, x, _CMP_NEQ_OQ);
    __m256i u = _mm256_castps_si256(f);
    u = _mm256_mask_sub_epi32(u, away, u, _mm256_set1_epi32(1));
    return _mm256_mask_or_epi32(u, inexact, u, _mm256_set1_epi32(1));
}

void T512 lm_f64_round_avx512(const double *src, void *dst, lm_kdtype out, size_t n)
{
    size_t i = 0;
    if (out == LM_KDT_F32) {
        float *d = dst;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(d + i, _mm512_cvtpd_ps(_mm512_loadu_pd(src + i)));
        lm_f64_round_ref(src + i, d + i, out, n - i);
        return;
    }
    uint16_t *d = dst;
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF), qbit = _mm512_set1_epi32(0x0040);
    const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    for (; i + 16 <= n; i += 16) {
        const __m256i lo = odd8(_mm512_loadu_pd(src + i)), hi = odd8(_mm512_loadu_pd(src + i + 8));
        const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        __m256i h;
        if (out == LM_KDT_BF16) {
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
            const __m512i rne = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, half)), 16);
            const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), qbit);
            const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, absmask), inf);
            h = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rne, quiet));
        } else {
            h = _mm512_cvtps_ph(_mm512_castsi512_ps(u), _MM_FROUND_TO_NEAREST_INT);
        }
        _mm256_storeu_si256((__m256i *)(void *)(d + i), h);
    }
    lm_f64_round_ref(src + i, d + i, out, n - i);
}
#endif
