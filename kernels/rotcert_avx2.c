/* SPDX-License-Identifier: MIT */
/* rotcert_avx2.c : AVX2 variant of lm_rot_cert_ref (rotcert_ref.c), bit for bit.  Block norms
 * (bs a multiple of 8): the eight lanes l_q of a ymm register summed in b order, then the
 * reference's tree ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) by three exchanges (lane q
 * with q ^ 4, q ^ 2, q ^ 1: every lane ends with the same sum, additions commute), other block
 * sizes by the reference.  Elements: eight lanes of the reference's operations (lo's inf or NaN
 * test on its 32-bit lanes, packed to the 16-bit lanes of the rest), the tail by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <math.h>

#define T256 __attribute__((target("avx,avx2,fma,f16c")))

void T256 lm_rotcert_norms_avx2(const float *x, size_t cols, const lm_rotcert *rc, float *e)
{
    const size_t bs = rc->bs, nb = cols / bs;
    if (bs % 8 != 0) {
        lm_rotcert_norms_ref(x, cols, rc, e);
        return;
    }
    const __m256 c1 = _mm256_set1_ps((float)(bs + 4) * 0x1p-24f), cx = _mm256_set1_ps(1.0f + (float)(bs + 2) * 0x1p-24f);
    const __m256 t70 = _mm256_set1_ps(0x1p-70f);
    for (size_t j = 0; j < nb; j++) {
        const float *xb = x + j * bs;
        __m256 l = _mm256_setzero_ps();
        for (size_t b = 0; b < bs; b += 8) {
            const __m256 v = _mm256_loadu_ps(xb + b);
            l = _mm256_add_ps(l, _mm256_mul_ps(v, v));
        }
        l = _mm256_add_ps(l, _mm256_permute2f128_ps(l, l, 0x01));
        l = _mm256_add_ps(l, _mm256_permute_ps(l, _MM_SHUFFLE(1, 0, 3, 2)));
        l = _mm256_add_ps(l, _mm256_permute_ps(l, _MM_SHUFFLE(2, 3, 0, 1)));
        const __m256 xn = _mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(l), cx), t70), c1);
        const float *dn = rc->dn + (rc->n_rot == 1 ? 0 : j) * bs;
        for (size_t a = 0; a < bs; a += 8)
            _mm256_storeu_ps(e + j * bs + a, _mm256_mul_ps(_mm256_loadu_ps(dn + a), xn));
    }
}

static inline __m256 T256 abs8(__m256 v)
{
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
}

unsigned T256 lm_rot_cert_avx2(const float *x, const float *v, size_t cols, const lm_rotcert *rc, float *e,
                               uint16_t *dst, uint8_t *unc)
{
    lm_rotcert_norms_avx2(x, cols, rc, e);
    const __m256 cy = _mm256_set1_ps(0x1p-24f * (1.0f + 0x1p-20f)), ca = _mm256_set1_ps((float)rc->bs * 0x1p-52f);
    const __m256 c0 = _mm256_set1_ps((float)rc->bs * 0x1p-149f), f = _mm256_set1_ps(rc->f);
    const __m256 af = _mm256_set1_ps(fabsf(rc->f) * (1.0f + 0x1p-20f)), t23 = _mm256_set1_ps(0x1p-23f);
    const __m256 t149 = _mm256_set1_ps(0x1p-149f), w20 = _mm256_set1_ps(1.0f + 0x1p-20f), t22 = _mm256_set1_ps(0x1p-22f);
    const __m256i r7 = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), e8 = _mm256_set1_epi32(0x7F800000);
    const int bf16 = rc->out == LM_KDT_BF16, scaled = rc->scaled;
    const __m128i em = _mm_set1_epi16(bf16 ? 0x7F80 : 0x7C00), one8 = _mm_set1_epi8(1);
    unsigned any = 0;
    size_t c = 0;
    for (; c + 8 <= cols; c += 8) {
        const __m256 xc = _mm256_loadu_ps(x + c);
        __m256 y = _mm256_add_ps(xc, _mm256_loadu_ps(v + c)), ay = abs8(y);
        __m256 b = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(e + c), _mm256_mul_ps(ay, cy)),
                                               _mm256_mul_ps(abs8(xc), ca)),
                                 c0);
        if (scaled) {
            y = _mm256_mul_ps(y, f);
            ay = abs8(y);
            b = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(b, af), _mm256_mul_ps(ay, t23)), t149);
        }
        const __m256 w = _mm256_add_ps(_mm256_mul_ps(b, w20), _mm256_mul_ps(ay, t22));
        const __m256 lo = _mm256_sub_ps(y, w), hi = _mm256_add_ps(y, w);
        __m128i bl, bh;
        if (bf16) {
            const __m256i ul = _mm256_castps_si256(lo), uh = _mm256_castps_si256(hi);
            const __m256i rl = _mm256_srli_epi32(
                _mm256_add_epi32(_mm256_add_epi32(ul, r7), _mm256_and_si256(_mm256_srli_epi32(ul, 16), one)), 16);
            const __m256i rh = _mm256_srli_epi32(
                _mm256_add_epi32(_mm256_add_epi32(uh, r7), _mm256_and_si256(_mm256_srli_epi32(uh, 16), one)), 16);
            bl = _mm_packus_epi32(_mm256_castsi256_si128(rl), _mm256_extracti128_si256(rl, 1));
            bh = _mm_packus_epi32(_mm256_castsi256_si128(rh), _mm256_extracti128_si256(rh, 1));
        } else {
            bl = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            bh = _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        _mm_storeu_si128((__m128i *)(void *)(dst + c), bl);
        /* lo inf or NaN (its exponent all ones), as 16-bit lanes */
        const __m256i nf = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(lo), e8), e8);
        const __m128i nf16 = _mm_packs_epi32(_mm256_castsi256_si128(nf), _mm256_extracti128_si256(nf, 1));
        /* 0xFFFF where certified: equal ends, a finite exponent and a finite lo */
        const __m128i ok = _mm_andnot_si128(_mm_or_si128(_mm_cmpeq_epi16(_mm_and_si128(bl, em), em), nf16),
                                            _mm_cmpeq_epi16(bl, bh));
        const __m128i u8 = _mm_andnot_si128(_mm_packs_epi16(ok, ok), one8);
        _mm_storel_epi64((__m128i *)(void *)(unc + c), u8);
        any |= (unsigned)(_mm_cvtsi128_si64(u8) != 0);
    }
    return any | (c < cols ? lm_rotcert_elems_ref(x + c, v + c, e + c, cols - c, rc, dst + c, unc + c) : 0u);
}
#endif
