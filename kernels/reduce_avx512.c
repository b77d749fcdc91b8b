/* SPDX-License-Identifier: MIT */
/* reduce_avx512.c : AVX-512 variants of reduce_ref.c, bit for bit.  Sums of squares: two
 * 8-lane double accumulators hold lanes 0-15; full blocks of 16 elements here, the tail in the
 * reference's. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

double __attribute__((target("avx,avx2,avx512f"))) lm_sumsq_avx512(const float *x, size_t n)
{
    __m512d a0 = _mm512_setzero_pd(), a1 = a0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512d x0 = _mm512_cvtps_pd(_mm256_loadu_ps(x + i)), x1 = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8));
        a0 = _mm512_add_pd(a0, _mm512_mul_pd(x0, x0));
        a1 = _mm512_add_pd(a1, _mm512_mul_pd(x1, x1));
    }
    double lanes[16];
    _mm512_storeu_pd(lanes, a0);
    _mm512_storeu_pd(lanes + 8, a1);
    lm_sumsq_ref_tail(x + i, n - i, lanes);
    return lm_sumsq_lanes(lanes);
}

size_t __attribute__((target("avx,avx2,avx512f,avx512bw"))) lm_count_nonfinite_f32_avx512(const float *x, size_t n)
{
    const __m512i m = _mm512_set1_epi32(0x7F800000);
    size_t bad = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i e = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), m);
        bad += (size_t)__builtin_popcount((unsigned)_mm512_cmpeq_epi32_mask(e, m));
    }
    return bad + lm_count_nonfinite_f32_ref(x + i, n - i);
}

size_t __attribute__((target("avx,avx2,avx512f,avx512bw"))) lm_count_nonfinite_16_avx512(const uint16_t *x, size_t n,
                                                                                       uint16_t exp_mask)
{
    const __m512i m = _mm512_set1_epi16((short)exp_mask);
    size_t bad = 0, i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512i e = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), m);
        bad += (size_t)__builtin_popcount((unsigned)_mm512_cmpeq_epi16_mask(e, m));
    }
    return bad + lm_count_nonfinite_16_ref(x + i, n - i, exp_mask);
}

size_t __attribute__((target("avx,avx2,avx512f,avx512bw"))) lm_count_diff_16_avx512(const uint16_t *a, const uint16_t *b,
                                                                                  size_t n)
{
    size_t diff = 0, i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512i x = _mm512_loadu_si512((const void *)(a + i)), y = _mm512_loadu_si512((const void *)(b + i));
        diff += (size_t)__builtin_popcount((unsigned)_mm512_cmpneq_epi16_mask(x, y));
    }
    return diff + lm_count_diff_16_ref(a + i, b + i, n - i);
}

size_t __attribute__((target("avx,avx2,avx512f,avx512bw"))) lm_count_diff_32_avx512(const uint32_t *a, const uint32_t *b,
                                                                                  size_t n)
{
    size_t diff = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i x = _mm512_loadu_si512((const void *)(a + i)), y = _mm512_loadu_si512((const void *)(b + i));
        diff += (size_t)__builtin_popcount((unsigned)_mm512_cmpneq_epi32_mask(x, y));
    }
    return diff + lm_count_diff_32_ref(a + i, b + i, n - i);
}
#endif
