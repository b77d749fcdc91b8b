/* SPDX-License-Identifier: MIT */
/* round64_avx2.c : AVX2 variant of lm_f64_round_ref (round64.c), bit for bit: the same
 * round-to-odd f32 value (vcvtpd2ps is the C cast's RNE; then one step towards zero when that
 * rounded away, and the last bit set when inexact), then RNE to bf16 by the integer steps of
 * lm_f32_to_bf16_1 or to f16 by vcvtps2ph (as lm_f32_to_f16_avx2); f32 outputs: vcvtpd2ps.
 * 8 elements per iteration, the tail by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T256 __attribute__((target("avx,avx2,f16c")))

/* the low 32 bits of each 64-bit mask lane, packed: [m0, m1, m2, m3] */
static inline __m128i T256 pack_mask(__m256d m)
{
    const __m256i p = _mm256_permutevar8x32_epi32(_mm256_castpd_si256(m), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    return _mm256_castsi256_si128(p);
}

/* 4 doubles rounded to odd in f32, as bits */
static inline __m128i T256 odd4(__m256d x)
{
    const __m256d sign = _mm256_set1_pd(-0.0);
    const __m128 f = _mm256_cvtpd_ps(x);
    const __m256d b = _mm256_cvtps_pd(f);
    const __m128i away = pack_mask(_mm256_cmp_pd(_mm256_andnot_pd(sign, b), _mm256_andnot_pd(sign, x), _CMP_GT_OQ));
    const __m128i inexact = pack_mask(_mm256_cmp_pd(b, x, _CMP_NEQ_OQ));
    const __m128i u = _mm_add_epi32(_mm_castps_si128(f), away); /* away: -1 */
    return _mm_or_si128(u, _mm_srli_epi32(inexact, 31));
}

void T256 lm_f64_round_avx2(const double *src, void *dst, lm_kdtype out, size_t n)
{
    size_t i = 0;
    if (out == LM_KDT_F32) {
        float *d = dst;
        for (; i + 4 <= n; i += 4)
            _mm_storeu_ps(d + i, _mm256_cvtpd_ps(_mm256_loadu_pd(src + i)));
        lm_f64_round_ref(src + i, d + i, out, n - i);
        return;
    }
    uint16_t *d = dst;
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF), qbit = _mm256_set1_epi32(0x0040);
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
    for (; i + 8 <= n; i += 8) {
        const __m128i lo = odd4(_mm256_loadu_pd(src + i)), hi = odd4(_mm256_loadu_pd(src + i + 4));
        const __m256i u = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
        __m128i h;
        if (out == LM_KDT_BF16) {
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
            const __m256i rne = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, half)), 16);
            const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), qbit);
            const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absmask), inf);
            const __m256i r = _mm256_blendv_epi8(rne, quiet, nan);
            /* lanes hold 0..0xffff: packus is exact; it interleaves the 128-bit halves */
            h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
        } else {
            h = _mm256_cvtps_ph(_mm256_castsi256_ps(u), _MM_FROUND_TO_NEAREST_INT);
        }
        _mm_storeu_si128((__m128i *)(void *)(d + i), h);
    }
    lm_f64_round_ref(src + i, d + i, out, n - i);
}
#endif
