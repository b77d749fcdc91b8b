/* SPDX-License-Identifier: MIT */
/* convert_avx2.c : AVX2 + F16C variants of the kernels in convert_ref.c, bit for bit the same.
 * Each one runs 16 elements per iteration, then 8, then hands the tail to the _ref function, so
 * tails cannot disagree.  No FMA anywhere (mul then add).  The Makefile gives only this file
 * -mavx2 -mf16c -mfma; the target attributes let it also build where that does not happen (the
 * single-command clang fuzz build), and the CPU probe in cpu.c decides whether it may run. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define LM_TARGET_AVX2 __attribute__((target("avx,avx2,f16c")))

void LM_TARGET_AVX2 lm_bf16_to_f32_avx2(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)(src + i));
        const __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(h));
        const __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)));
        _mm256_storeu_ps(dst + i + 8, _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)));
    }
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
        const __m256i w = _mm256_cvtepu16_epi32(h);
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    lm_bf16_to_f32_ref(src + i, dst + i, n - i);
}

/* 8 floats -> 8 bf16 in the low halves of 32-bit lanes, exactly as lm_f32_to_bf16_1(): integer
 * RNE, and for NaN (|bits| > 0x7f800000, a signed compare is fine as both sides are positive)
 * the truncated bits with the quiet bit set.  No FP instruction, so no FP flags. */
static inline __m256i LM_TARGET_AVX2 bf16_round8(__m256 x)
{
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x0040));
    const __m256i abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F800000));
    return _mm256_blendv_epi8(rounded, quiet, is_nan);
}

void LM_TARGET_AVX2 lm_f32_to_bf16_avx2(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i a = bf16_round8(_mm256_loadu_ps(src + i));
        const __m256i b = bf16_round8(_mm256_loadu_ps(src + i + 8));
        /* lanes hold 0..0xffff, so the unsigned saturation never clips; packus interleaves the
         * 128-bit halves (a0-3 b0-3 a4-7 b4-7), the permute puts them back in order */
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
        _mm256_storeu_si256((__m256i *)(void *)(dst + i), packed);
    }
    for (; i + 8 <= n; i += 8) {
        const __m256i a = bf16_round8(_mm256_loadu_ps(src + i));
        const __m128i packed =
            _mm_packus_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        _mm_storeu_si128((__m128i *)(void *)(dst + i), packed);
    }
    lm_f32_to_bf16_ref(src + i, dst + i, n - i);
}

/* vcvtph2ps is exact, keeps subnormals (DAZ does not apply to it), and quiets signalling NaNs,
 * which is the reference's contract */
void LM_TARGET_AVX2 lm_f16_to_f32_avx2(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
        const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 8));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(a));
        _mm256_storeu_ps(dst + i + 8, _mm256_cvtph_ps(b));
    }
    for (; i + 8 <= n; i += 8) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(a));
    }
    lm_f16_to_f32_ref(src + i, dst + i, n - i);
}

/* vcvtps2ph with an explicit round-to-nearest-even immediate (not MXCSR): RNE including
 * subnormal results, overflow to inf, NaN -> sign | 0x7e00 | top 9 payload bits, as the ref.
 * The flush-to-zero bit of MXCSR does not apply to this instruction. */
void LM_TARGET_AVX2 lm_f32_to_f16_avx2(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m128i a = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        const __m128i b = _mm256_cvtps_ph(_mm256_loadu_ps(src + i + 8), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(void *)(dst + i), a);
        _mm_storeu_si128((__m128i *)(void *)(dst + i + 8), b);
    }
    for (; i + 8 <= n; i += 8) {
        const __m128i a = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(void *)(dst + i), a);
    }
    lm_f32_to_f16_ref(src + i, dst + i, n - i);
}

/* acc + s*x, then NaN lanes replaced by LM_AXPY_NAN (whose payload the hardware would pick
 * depends on operand order, which the compiler chooses) */
static inline __m256 LM_TARGET_AVX2 axpy8(__m256 acc, __m256 vs, __m256 x)
{
    const __m256 r = _mm256_add_ps(acc, _mm256_mul_ps(vs, x));
    const __m256 is_nan = _mm256_cmp_ps(r, r, _CMP_UNORD_Q);
    return _mm256_blendv_ps(r, _mm256_castsi256_ps(_mm256_set1_epi32((int)LM_AXPY_NAN)), is_nan);
}

void LM_TARGET_AVX2 lm_axpy_avx2(float *acc, float s, const float *x, size_t n)
{
    const __m256 vs = _mm256_set1_ps(s);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 r0 = axpy8(_mm256_loadu_ps(acc + i), vs, _mm256_loadu_ps(x + i));
        const __m256 r1 = axpy8(_mm256_loadu_ps(acc + i + 8), vs, _mm256_loadu_ps(x + i + 8));
        _mm256_storeu_ps(acc + i, r0);
        _mm256_storeu_ps(acc + i + 8, r1);
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i, axpy8(_mm256_loadu_ps(acc + i), vs, _mm256_loadu_ps(x + i)));
    lm_axpy_ref(acc + i, s, x + i, n - i);
}

/* vcvtpd2ps rounds with MXCSR (RNE unless someone changed it) and treats NaN like the scalar
 * cvtsd2ss the C cast compiles to */
void LM_TARGET_AVX2 lm_f64_to_f32_avx2(const double *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128 a = _mm256_cvtpd_ps(_mm256_loadu_pd(src + i));
        const __m128 b = _mm256_cvtpd_ps(_mm256_loadu_pd(src + i + 4));
        _mm_storeu_ps(dst + i, a);
        _mm_storeu_ps(dst + i + 4, b);
    }
    for (; i + 4 <= n; i += 4)
        _mm_storeu_ps(dst + i, _mm256_cvtpd_ps(_mm256_loadu_pd(src + i)));
    lm_f64_to_f32_ref(src + i, dst + i, n - i);
}

void LM_TARGET_AVX2 lm_f32_to_f64_avx2(const float *src, double *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_pd(dst + i, _mm256_cvtps_pd(_mm_loadu_ps(src + i)));
        _mm256_storeu_pd(dst + i + 4, _mm256_cvtps_pd(_mm_loadu_ps(src + i + 4)));
    }
    for (; i + 4 <= n; i += 4)
        _mm256_storeu_pd(dst + i, _mm256_cvtps_pd(_mm_loadu_ps(src + i)));
    lm_f32_to_f64_ref(src + i, dst + i, n - i);
}

#else
typedef int lm_convert_avx2_unused; /* not x86: nothing to build (ISO C wants a declaration) */
#endif
