/* SPDX-License-Identifier: MIT */
/* doracert_avx512.c : AVX-512 variant of lm_dora_cert_ref (doracert_ref.c), bit for bit: eight
 * lanes of the fast test; a vector with a lane it does not certify takes the precise test on
 * all eight lanes (the reference's operations lane by lane) and keeps its result where the fast
 * one failed.  The tail by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T512 __attribute__((target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))

/* prec_bits of doracert_ref.c on eight lanes */
static inline __m512i T512 prec8(__m512d x, const lm_dora_fmt *f, __m128i sc, __m512i half)
{
    const __m512i u = _mm512_castpd_si512(x), abs = _mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll);
    const __m512i a = _mm512_and_si512(u, abs), sg = _mm512_andnot_si512(abs, u);
    const __m512d big = _mm512_set1_pd(0x1p52);
    const __m512i sub = _mm512_sub_epi64(
        _mm512_castpd_si512(_mm512_add_pd(_mm512_mul_pd(_mm512_castsi512_pd(a), _mm512_set1_pd(f->subscale)), big)),
        _mm512_castpd_si512(big));
    const __m512i r = _mm512_srl_epi64(
        _mm512_add_epi64(_mm512_add_epi64(a, half), _mm512_and_si512(_mm512_srl_epi64(a, sc), _mm512_set1_epi64(1))), sc);
    const __m512i nrm = _mm512_sub_epi64(r, _mm512_set1_epi64((long long)f->bias));
    const __mmask8 is_sub = _mm512_cmplt_epu64_mask(a, _mm512_set1_epi64((long long)f->amin));
    return _mm512_or_si512(_mm512_mask_blend_epi64(is_sub, nrm, sub), sg);
}

size_t T512 lm_dora_cert_avx512(const double *v, const float *w, const double *kap, size_t n, const lm_dora_cert *c,
                                lm_kdtype out, void *dst, const void *base, size_t *n_changed)
{
    const lm_dora_fmt *f = &lm_dora_fmts[out];
    const __m128i sc = _mm_cvtsi32_si128(f->s), ssh = _mm_cvtsi32_si128(63 - f->s - (f->obits - 1));
    const uint64_t sgn_s = 1ull << (f->obits - 1);
    const __m512i half = _mm512_set1_epi64((long long)((1ull << (f->s - 1)) - 1)), one = _mm512_set1_epi64(1);
    const __m512i magr = _mm512_set1_epi64((long long)((1ull << (63 - f->s)) - 1)), sgn = _mm512_set1_epi64((long long)sgn_s);
    const __m512i bias = _mm512_set1_epi64((long long)f->bias), rmin1 = _mm512_set1_epi64((long long)(f->rmin + 1));
    const __m512i span = _mm512_set1_epi64((long long)(f->rinf - f->rmin - 1));
    const __m512i abs63 = _mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll);
    const __m128i psh = _mm_cvtsi32_si128(64 - f->obits);
    const __m512i oinf = _mm512_set1_epi64((long long)f->oinf);
    const __m512d F = _mm512_set1_pd(c->F), E = _mm512_set1_pd(c->E), A0 = _mm512_set1_pd(c->A0);
    const __m512d A1 = _mm512_set1_pd(c->A1), A2 = _mm512_set1_pd(c->A2), eF = _mm512_set1_pd(c->eF);
    const __m512d g40 = _mm512_set1_pd(1 + 0x1p-40), t50 = _mm512_set1_pd(0x1p-50), t1060 = _mm512_set1_pd(0x1p-1060);
    const int o32 = f->obits == 32;
    size_t bad = 0, changed = 0, j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m512d vj = _mm512_loadu_pd(v + j), y = _mm512_mul_pd(vj, F);
        const __m512i ul = _mm512_castpd_si512(_mm512_sub_pd(y, E)), uh = _mm512_castpd_si512(_mm512_add_pd(y, E));
        const __m512i rl = _mm512_srl_epi64(
            _mm512_add_epi64(_mm512_add_epi64(ul, half), _mm512_and_si512(_mm512_srl_epi64(ul, sc), one)), sc);
        const __m512i rh = _mm512_srl_epi64(
            _mm512_add_epi64(_mm512_add_epi64(uh, half), _mm512_and_si512(_mm512_srl_epi64(uh, sc), one)), sc);
        const __m512i mag = _mm512_and_si512(rl, magr);
        __mmask8 ok = _mm512_cmpeq_epi64_mask(rl, rh) & _mm512_cmplt_epu64_mask(_mm512_sub_epi64(mag, rmin1), span);
        __m512i o = _mm512_or_si512(_mm512_sub_epi64(mag, bias), _mm512_and_si512(_mm512_srl_epi64(rl, ssh), sgn));
        if (ok != 0xFF) {
            const __m512d av = _mm512_abs_pd(vj);
            const __m512d aw = _mm512_abs_pd(_mm512_cvtps_pd(_mm256_loadu_ps(w + j)));
            const __m512d t = _mm512_add_pd(
                _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(A1, _mm512_loadu_pd(kap + j)), A0),
                              _mm512_mul_pd(A2, _mm512_add_pd(aw, _mm512_add_pd(av, av)))),
                _mm512_mul_pd(eF, av));
            const __m512d e =
                _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(t, g40), _mm512_mul_pd(t50, _mm512_abs_pd(y))), t1060);
            const __m512i pl = prec8(_mm512_sub_pd(y, e), f, sc, half), ph = prec8(_mm512_add_pd(y, e), f, sc, half);
            const __m512i m = _mm512_and_si512(pl, abs63);
            const __mmask8 ok2 = _mm512_cmpeq_epi64_mask(pl, ph) & _mm512_cmplt_epu64_mask(m, oinf);
            o = _mm512_mask_blend_epi64(ok, _mm512_or_si512(m, _mm512_and_si512(_mm512_srl_epi64(pl, psh), sgn)), o);
            ok |= ok2;
        }
        if (o32) {
            const __m256i o4 = _mm512_cvtepi64_epi32(o);
            _mm256_storeu_si256((__m256i *)(void *)((uint32_t *)dst + j), o4);
            if (base != NULL)
                changed += (size_t)__builtin_popcount((unsigned)_mm256_cmpneq_epi32_mask(
                    o4, _mm256_loadu_si256((const __m256i *)(const void *)((const uint32_t *)base + j))));
        } else {
            const __m128i o2 = _mm512_cvtepi64_epi16(o);
            _mm_storeu_si128((__m128i *)(void *)((uint16_t *)dst + j), o2);
            if (base != NULL)
                changed += (size_t)__builtin_popcount((unsigned)_mm_cmpneq_epi16_mask(
                    o2, _mm_loadu_si128((const __m128i *)(const void *)((const uint16_t *)base + j))));
        }
        bad += 8 - (size_t)__builtin_popcount((unsigned)ok);
    }
    if (j < n) {
        const size_t ob = o32 ? 4 : 2;
        size_t ct = 0;
        bad += lm_dora_cert_ref(v + j, w + j, kap + j, n - j, c, out, (unsigned char *)dst + j * ob,
                                base != NULL ? (const unsigned char *)base + j * ob : NULL, &ct);
        changed += ct;
    }
    if (base != NULL)
        *n_changed = changed;
    return bad;
}
#endif
