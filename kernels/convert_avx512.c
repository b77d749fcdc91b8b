/* SPDX-License-Identifier: MIT */
/* convert_avx512.c : AVX-512 (F, BW, VL, DQ) + F16C variants of the kernels in convert_ref.c,
 * bit for bit the same.  Always compiled; lm_kernels_select() picks it only when the CPU has
 * AVX-512.  16 elements per iteration, the tail (< 16) goes to the _ref function.  Same
 * instructions as the AVX2 file in EVEX form, so the same rounding and NaN rules apply; no FMA.
 * The target attributes let it build even without the Makefile's per-file vector flags. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define LM_TARGET_AVX512 \
    __attribute__((target("avx,avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq")))

void LM_TARGET_AVX512 lm_bf16_to_f32_avx512(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)(src + i));
        const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(w));
    }
    lm_bf16_to_f32_ref(src + i, dst + i, n - i);
}

/* integer RNE as in lm_f32_to_bf16_1(); NaN lanes get the truncated bits with the quiet bit */
void LM_TARGET_AVX512 lm_f32_to_bf16_avx512(const float *src, uint16_t *dst, size_t n)
{
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i half = _mm512_set1_epi32(0x7FFF);
    const __m512i qbit = _mm512_set1_epi32(0x0040);
    const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i inf = _mm512_set1_epi32(0x7F800000);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(src + i));
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
        const __m512i rounded =
            _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, half)), 16);
        const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), qbit);
        const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, absmask), inf);
        const __m512i r = _mm512_mask_blend_epi32(is_nan, rounded, quiet);
        /* lanes hold 0..0xffff, so vpmovdw's truncation is exact */
        _mm256_storeu_si256((__m256i *)(void *)(dst + i), _mm512_cvtepi32_epi16(r));
    }
    lm_f32_to_bf16_ref(src + i, dst + i, n - i);
}

void LM_TARGET_AVX512 lm_f16_to_f32_avx512(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)(src + i));
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
    }
    lm_f16_to_f32_ref(src + i, dst + i, n - i);
}

void LM_TARGET_AVX512 lm_f32_to_f16_avx512(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_si256((__m256i *)(void *)(dst + i), h);
    }
    lm_f32_to_f16_ref(src + i, dst + i, n - i);
}

void LM_TARGET_AVX512 lm_axpy_avx512(float *acc, float s, const float *x, size_t n)
{
    const __m512 vs = _mm512_set1_ps(s);
    const __m512 canon = _mm512_castsi512_ps(_mm512_set1_epi32((int)LM_AXPY_NAN));
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 p = _mm512_mul_ps(vs, _mm512_loadu_ps(x + i));
        const __m512 r = _mm512_add_ps(_mm512_loadu_ps(acc + i), p);
        /* NaN lanes -> LM_AXPY_NAN, as the ref (the payload would depend on operand order) */
        const __mmask16 is_nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
        _mm512_storeu_ps(acc + i, _mm512_mask_blend_ps(is_nan, r, canon));
    }
    lm_axpy_ref(acc + i, s, x + i, n - i);
}

void LM_TARGET_AVX512 lm_f64_to_f32_avx512(const double *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_ps(dst + i, _mm512_cvtpd_ps(_mm512_loadu_pd(src + i)));
        _mm256_storeu_ps(dst + i + 8, _mm512_cvtpd_ps(_mm512_loadu_pd(src + i + 8)));
    }
    lm_f64_to_f32_ref(src + i, dst + i, n - i);
}

void LM_TARGET_AVX512 lm_f32_to_f64_avx512(const float *src, double *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_pd(dst + i, _mm512_cvtps_pd(_mm256_loadu_ps(src + i)));
        _mm512_storeu_pd(dst + i + 8, _mm512_cvtps_pd(_mm256_loadu_ps(src + i + 8)));
    }
    lm_f32_to_f64_ref(src + i, dst + i, n - i);
}

#else
typedef int lm_convert_avx512_unused; /* not x86: nothing to build (ISO C wants a declaration) */
#endif
