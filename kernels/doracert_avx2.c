/* SPDX-License-Identifier: MIT */
/* doracert_avx2.c : AVX2 variant of lm_dora_cert_ref (doracert_ref.c), bit for bit: four lanes
 * of the fast test; a vector with a lane it does not certify takes the precise test on all four
 * lanes and keeps its result where the fast one failed.  The tail by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T256 __attribute__((target("avx,avx2,fma,f16c")))

static inline __m256d T256 abs4(__m256d x)
{
    return _mm256_and_pd(x, _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll)));
}

/* prec_bits of doracert_ref.c on four lanes */
static inline __m256i T256 prec4(__m256d x, const lm_dora_fmt *f, __m128i sc, __m256i half)
{
    const __m256i u = _mm256_castpd_si256(x), a = _mm256_castpd_si256(abs4(x)), sg = _mm256_xor_si256(u, a);
    const __m256d big = _mm256_set1_pd(0x1p52);
    const __m256i sub = _mm256_sub_epi64(
        _mm256_castpd_si256(_mm256_add_pd(_mm256_mul_pd(_mm256_castsi256_pd(a), _mm256_set1_pd(f->subscale)), big)),
        _mm256_castpd_si256(big));
    const __m256i r = _mm256_srl_epi64(
        _mm256_add_epi64(_mm256_add_epi64(a, half), _mm256_and_si256(_mm256_srl_epi64(a, sc), _mm256_set1_epi64x(1))),
        sc);
    const __m256i nrm = _mm256_sub_epi64(r, _mm256_set1_epi64x((long long)f->bias));
    const __m256i is_sub = _mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)f->amin), a); /* a < 2^63 */
    return _mm256_or_si256(_mm256_blendv_epi8(nrm, sub, is_sub), sg);
}

size_t T256 lm_dora_cert_avx2(const double *v, const float *w, const double *kap, size_t n, const lm_dora_cert *c,
                              lm_kdtype out, void *dst, const void *base, size_t *n_changed)
{
    const lm_dora_fmt *f = &lm_dora_fmts[out];
    const __m128i sc = _mm_cvtsi32_si128(f->s), ssh = _mm_cvtsi32_si128(63 - f->s - (f->obits - 1));
    const uint64_t sgn_s = 1ull << (f->obits - 1);
    const __m256i half = _mm256_set1_epi64x((long long)((1ull << (f->s - 1)) - 1)), one = _mm256_set1_epi64x(1);
    const __m256i magr = _mm256_set1_epi64x((long long)((1ull << (63 - f->s)) - 1));
    const __m256i sgn = _mm256_set1_epi64x((long long)sgn_s), m1 = _mm256_set1_epi64x(-1);
    const __m256i bias = _mm256_set1_epi64x((long long)f->bias), rmin1 = _mm256_set1_epi64x((long long)(f->rmin + 1));
    const __m256i span = _mm256_set1_epi64x((long long)(f->rinf - f->rmin - 1));
    const __m256i abs63 = _mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll), oinf = _mm256_set1_epi64x((long long)f->oinf);
    const __m128i psh = _mm_cvtsi32_si128(64 - f->obits);
    const __m256d F = _mm256_set1_pd(c->F), E = _mm256_set1_pd(c->E), A0 = _mm256_set1_pd(c->A0);
    const __m256d A1 = _mm256_set1_pd(c->A1), A2 = _mm256_set1_pd(c->A2), eF = _mm256_set1_pd(c->eF);
    const __m256d g40 = _mm256_set1_pd(1 + 0x1p-40), t50 = _mm256_set1_pd(0x1p-50), t1060 = _mm256_set1_pd(0x1p-1060);
    /* the low 16 bits (or 32) of each 64-bit lane, gathered into the low 8 (16) bytes */
    const __m256i pick16 = _mm256_setr_epi8(0, 1, 8, 9, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 8, 9, -1,
                                            -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i lanes16 = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1), lanes32 = _mm256_setr_epi32(0, 2, 4, 6, 1, 1, 1, 1);
    const int o32 = f->obits == 32;
    /* the bits written (the low 16 or 32 of each lane), to compare with the base's */
    const __m256i omask = _mm256_set1_epi64x(o32 ? 0xFFFFFFFFll : 0xFFFFll);
    size_t bad = 0, changed = 0, j = 0;
    for (; j + 4 <= n; j += 4) {
        const __m256d vj = _mm256_loadu_pd(v + j), y = _mm256_mul_pd(vj, F);
        const __m256i ul = _mm256_castpd_si256(_mm256_sub_pd(y, E)), uh = _mm256_castpd_si256(_mm256_add_pd(y, E));
        const __m256i rl = _mm256_srl_epi64(
            _mm256_add_epi64(_mm256_add_epi64(ul, half), _mm256_and_si256(_mm256_srl_epi64(ul, sc), one)), sc);
        const __m256i rh = _mm256_srl_epi64(
            _mm256_add_epi64(_mm256_add_epi64(uh, half), _mm256_and_si256(_mm256_srl_epi64(uh, sc), one)), sc);
        const __m256i mag = _mm256_and_si256(rl, magr), t = _mm256_sub_epi64(mag, rmin1); /* small: signed */
        __m256i ok = _mm256_and_si256(_mm256_cmpeq_epi64(rl, rh),
                                      _mm256_and_si256(_mm256_cmpgt_epi64(t, m1), _mm256_cmpgt_epi64(span, t)));
        __m256i o = _mm256_or_si256(_mm256_sub_epi64(mag, bias), _mm256_and_si256(_mm256_srl_epi64(rl, ssh), sgn));
        if (_mm256_movemask_pd(_mm256_castsi256_pd(ok)) != 0xF) {
            const __m256d av = abs4(vj), aw = abs4(_mm256_cvtps_pd(_mm_loadu_ps(w + j)));
            const __m256d tt = _mm256_add_pd(
                _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(A1, _mm256_loadu_pd(kap + j)), A0),
                              _mm256_mul_pd(A2, _mm256_add_pd(aw, _mm256_add_pd(av, av)))),
                _mm256_mul_pd(eF, av));
            const __m256d e =
                _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(tt, g40), _mm256_mul_pd(t50, abs4(y))), t1060);
            const __m256i pl = prec4(_mm256_sub_pd(y, e), f, sc, half), ph = prec4(_mm256_add_pd(y, e), f, sc, half);
            const __m256i m = _mm256_and_si256(pl, abs63); /* < 2^63: signed compares */
            const __m256i ok2 = _mm256_and_si256(_mm256_cmpeq_epi64(pl, ph), _mm256_cmpgt_epi64(oinf, m));
            o = _mm256_blendv_epi8(_mm256_or_si256(m, _mm256_and_si256(_mm256_srl_epi64(pl, psh), sgn)), o, ok);
            ok = _mm256_or_si256(ok, ok2);
        }
        if (o32)
            _mm_storeu_si128((__m128i *)(void *)((uint32_t *)dst + j),
                             _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(o, lanes32)));
        else
            _mm_storel_epi64((__m128i *)(void *)((uint16_t *)dst + j),
                             _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(o, pick16), lanes16)));
        bad += 4 - (size_t)__builtin_popcount((unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(ok)));
        if (base != NULL) {
            const __m256i b = o32 ? _mm256_cvtepu32_epi64(_mm_loadu_si128((const __m128i *)(const void *)((const uint32_t *)base + j)))
                                  : _mm256_cvtepu16_epi64(_mm_loadl_epi64((const __m128i *)(const void *)((const uint16_t *)base + j)));
            const __m256i same = _mm256_cmpeq_epi64(_mm256_and_si256(o, omask), b);
            changed += 4 - (size_t)__builtin_popcount((unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(same)));
        }
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
