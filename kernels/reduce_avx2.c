/* SPDX-License-Identifier: MIT */
/* reduce_avx2.c : AVX2 variants of reduce_ref.c, bit for bit.  Sums of squares: four 4-lane
 * double accumulators hold lanes 0-15; full blocks of 16 elements here, the tail in the
 * reference's loop. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

double __attribute__((target("avx,avx2"))) lm_sumsq_avx2(const float *x, size_t n)
{
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256d x0 = _mm256_cvtps_pd(_mm_loadu_ps(x + i)), x1 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4));
        const __m256d x2 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 8)), x3 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 12));
        a0 = _mm256_add_pd(a0, _mm256_mul_pd(x0, x0));
        a1 = _mm256_add_pd(a1, _mm256_mul_pd(x1, x1));
        a2 = _mm256_add_pd(a2, _mm256_mul_pd(x2, x2));
        a3 = _mm256_add_pd(a3, _mm256_mul_pd(x3, x3));
    }
    double lanes[16];
    _mm256_storeu_pd(lanes, a0);
    _mm256_storeu_pd(lanes + 4, a1);
    _mm256_storeu_pd(lanes + 8, a2);
    _mm256_storeu_pd(lanes + 12, a3);
    lm_sumsq_ref_tail(x + i, n - i, lanes);
    return lm_sumsq_lanes(lanes);
}

size_t __attribute__((target("avx,avx2"))) lm_count_nonfinite_f32_avx2(const float *x, size_t n)
{
    const __m256i m = _mm256_set1_epi32(0x7F800000);
    size_t bad = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i e = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(const void *)(x + i)), m);
        bad += (size_t)__builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(e, m))));
    }
    return bad + lm_count_nonfinite_f32_ref(x + i, n - i);
}

size_t __attribute__((target("avx,avx2"))) lm_count_nonfinite_16_avx2(const uint16_t *x, size_t n, uint16_t exp_mask)
{
    const __m256i m = _mm256_set1_epi16((short)exp_mask);
    size_t bad = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i e = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(const void *)(x + i)), m);
        /* two mask bits per 16-bit lane */
        bad += (size_t)__builtin_popcount((unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi16(e, m))) / 2;
    }
    return bad + lm_count_nonfinite_16_ref(x + i, n - i, exp_mask);
}

size_t __attribute__((target("avx,avx2"))) lm_count_diff_16_avx2(const uint16_t *a, const uint16_t *b, size_t n)
{
    size_t same = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(const void *)(a + i));
        const __m256i y = _mm256_loadu_si256((const __m256i *)(const void *)(b + i));
        same += (size_t)__builtin_popcount((unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi16(x, y))) / 2;
    }
    return (i - same) + lm_count_diff_16_ref(a + i, b + i, n - i);
}

size_t __attribute__((target("avx,avx2"))) lm_count_diff_32_avx2(const uint32_t *a, const uint32_t *b, size_t n)
{
    size_t same = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(const void *)(a + i));
        const __m256i y = _mm256_loadu_si256((const __m256i *)(const void *)(b + i));
        same += (size_t)__builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(x, y))));
    }
    return (i - same) + lm_count_diff_32_ref(a + i, b + i, n - i);
}
#endif
