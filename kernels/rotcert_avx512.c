/* SPDX-License-Identifier: MIT */
/* rotcert_avx512.c : AVX-512 variant of lm_rot_cert_ref (rotcert_ref.c), bit for bit: the block
 * norms as the AVX2 variant (blocks of 8: two per register), the elements sixteen lanes at a time
 * (the reference's operations lane by lane), the tail by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <math.h>

#define T512 __attribute__((target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))

/* bs 8 (BOFT's usual blocks): two blocks per register, their norms by the AVX2 variant's
 * exchanges within each half (lane q with q ^ 4, q ^ 2, q ^ 1) */
static inline void T512 norms8x2(const float *x, size_t cols, const lm_rotcert *rc, float *e)
{
    const __m512 c1 = _mm512_set1_ps(12.0f * 0x1p-24f), cx = _mm512_set1_ps(1.0f + 10.0f * 0x1p-24f);
    const __m512 t70 = _mm512_set1_ps(0x1p-70f);
    const __m512 dn1 = _mm512_castsi512_ps(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(const void *)rc->dn)));
    size_t c = 0;
    for (; c + 16 <= cols; c += 16) {
        const __m512 xc = _mm512_loadu_ps(x + c);
        __m512 l = _mm512_add_ps(_mm512_setzero_ps(), _mm512_mul_ps(xc, xc));
        l = _mm512_add_ps(l, _mm512_shuffle_f32x4(l, l, _MM_SHUFFLE(2, 3, 0, 1)));
        l = _mm512_add_ps(l, _mm512_permute_ps(l, _MM_SHUFFLE(1, 0, 3, 2)));
        l = _mm512_add_ps(l, _mm512_permute_ps(l, _MM_SHUFFLE(2, 3, 0, 1)));
        const __m512 xn = _mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(l), cx), t70), c1);
        _mm512_storeu_ps(e + c, _mm512_mul_ps(rc->n_rot == 1 ? dn1 : _mm512_loadu_ps(rc->dn + c), xn));
    }
    if (c < cols) { /* the last block */
        const lm_rotcert last = {rc->n_rot == 1 ? rc->dn : rc->dn + c, 1, 8, rc->f, rc->scaled, rc->out};
        lm_rotcert_norms_avx2(x + c, cols - c, &last, e + c);
    }
}

unsigned T512 lm_rot_cert_avx512(const float *x, const float *v, size_t cols, const lm_rotcert *rc, float *e,
                                 uint16_t *dst, uint8_t *unc)
{
    if (rc->bs == 8)
        norms8x2(x, cols, rc, e);
    else
        lm_rotcert_norms_avx2(x, cols, rc, e);
    const __m512 cy = _mm512_set1_ps(0x1p-24f * (1.0f + 0x1p-20f)), ca = _mm512_set1_ps((float)rc->bs * 0x1p-52f);
    const __m512 c0 = _mm512_set1_ps((float)rc->bs * 0x1p-149f), f = _mm512_set1_ps(rc->f);
    const __m512 af = _mm512_set1_ps(fabsf(rc->f) * (1.0f + 0x1p-20f)), t23 = _mm512_set1_ps(0x1p-23f);
    const __m512 t149 = _mm512_set1_ps(0x1p-149f), w20 = _mm512_set1_ps(1.0f + 0x1p-20f), t22 = _mm512_set1_ps(0x1p-22f);
    const __m512i r7 = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const int bf16 = rc->out == LM_KDT_BF16, scaled = rc->scaled;
    const __m256i em = _mm256_set1_epi16(bf16 ? 0x7F80 : 0x7C00);
    __mmask16 any = 0;
    size_t c = 0;
    for (; c + 16 <= cols; c += 16) {
        const __m512 xc = _mm512_loadu_ps(x + c);
        __m512 y = _mm512_add_ps(xc, _mm512_loadu_ps(v + c)), ay = _mm512_abs_ps(y);
        __m512 b = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(e + c), _mm512_mul_ps(ay, cy)),
                                               _mm512_mul_ps(_mm512_abs_ps(xc), ca)),
                                 c0);
        if (scaled) {
            y = _mm512_mul_ps(y, f);
            ay = _mm512_abs_ps(y);
            b = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(b, af), _mm512_mul_ps(ay, t23)), t149);
        }
        const __m512 w = _mm512_add_ps(_mm512_mul_ps(b, w20), _mm512_mul_ps(ay, t22));
        const __m512 lo = _mm512_sub_ps(y, w), hi = _mm512_add_ps(y, w);
        __m256i bl, bh;
        if (bf16) {
            const __m512i ul = _mm512_castps_si512(lo), uh = _mm512_castps_si512(hi);
            bl = _mm512_cvtepi32_epi16(_mm512_srli_epi32(
                _mm512_add_epi32(_mm512_add_epi32(ul, r7), _mm512_and_si512(_mm512_srli_epi32(ul, 16), one)), 16));
            bh = _mm512_cvtepi32_epi16(_mm512_srli_epi32(
                _mm512_add_epi32(_mm512_add_epi32(uh, r7), _mm512_and_si512(_mm512_srli_epi32(uh, 16), one)), 16));
        } else {
            bl = _mm512_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            bh = _mm512_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        _mm256_storeu_si256((__m256i *)(void *)(dst + c), bl);
        const __mmask16 m = _mm256_cmpneq_epi16_mask(bl, bh) | _mm256_cmpeq_epi16_mask(_mm256_and_si256(bl, em), em) |
                            _mm512_fpclass_ps_mask(lo, 0x99); /* lo NaN or inf */
        _mm_storeu_si128((__m128i *)(void *)(unc + c), _mm_maskz_set1_epi8(m, 1));
        any |= m;
    }
    return (any != 0) | (c < cols ? lm_rotcert_elems_ref(x + c, v + c, e + c, cols - c, rc, dst + c, unc + c) : 0u);
}
#endif
