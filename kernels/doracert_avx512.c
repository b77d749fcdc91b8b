/* SPDX-License-Identifier: MIT */
/* doracert_avx512.c : AVX-512 variant of lm_dora_cert_ref (doracert_ref.c), bit for bit: eight
 * lanes of the fast test; a vector with a lane it does not certify takes the precise test on
 * all eight lanes (the reference's operations lane by lane) and keeps its result where the fast
 * one failed.  Two vectors a step, their output bits gathered into one store (and one compare
 * with the base's); then one vector; the tail by the reference. */
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

/* the row's constants in registers */
typedef struct {
    __m128i sc, psh;
    __m512i half, one, magr, sgn, bias, rmin1, span, abs63, oinf;
    __m512d F, E, A0, A1, A2, eF, g40, t50, t1060;
} consts;

#define INL inline __attribute__((always_inline))

/* eight elements from j: the output bits in the low bits of each lane, ok the lanes certified;
 * S = f->s and SH = 63 - f->s - (f->obits - 1): constants in each instance (immediate shifts) */
static INL __m512i T512 cert8(const consts *k, const lm_dora_fmt *f, const double *v, const float *w, const double *kap,
                              __mmask8 *okp, const int S, const int SH)
{
    const __m512d vj = _mm512_loadu_pd(v), y = _mm512_mul_pd(vj, k->F);
    const __m512i ul = _mm512_castpd_si512(_mm512_sub_pd(y, k->E)), uh = _mm512_castpd_si512(_mm512_add_pd(y, k->E));
    const __m512i rl = _mm512_srli_epi64(
        _mm512_add_epi64(_mm512_add_epi64(ul, k->half), _mm512_and_si512(_mm512_srli_epi64(ul, S), k->one)), S);
    const __m512i rh = _mm512_srli_epi64(
        _mm512_add_epi64(_mm512_add_epi64(uh, k->half), _mm512_and_si512(_mm512_srli_epi64(uh, S), k->one)), S);
    const __m512i mag = _mm512_and_si512(rl, k->magr);
    __mmask8 ok = _mm512_cmpeq_epi64_mask(rl, rh) & _mm512_cmplt_epu64_mask(_mm512_sub_epi64(mag, k->rmin1), k->span);
    __m512i o = _mm512_or_si512(_mm512_sub_epi64(mag, k->bias), _mm512_and_si512(_mm512_srli_epi64(rl, SH), k->sgn));
    if (ok != 0xFF) {
        const __m512d av = _mm512_abs_pd(vj);
        const __m512d aw = _mm512_abs_pd(_mm512_cvtps_pd(_mm256_loadu_ps(w)));
        const __m512d t = _mm512_add_pd(
            _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(k->A1, _mm512_loadu_pd(kap)), k->A0),
                          _mm512_mul_pd(k->A2, _mm512_add_pd(aw, _mm512_add_pd(av, av)))),
            _mm512_mul_pd(k->eF, av));
        const __m512d e =
            _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(t, k->g40), _mm512_mul_pd(k->t50, _mm512_abs_pd(y))), k->t1060);
        const __m512i pl = prec8(_mm512_sub_pd(y, e), f, k->sc, k->half), ph = prec8(_mm512_add_pd(y, e), f, k->sc, k->half);
        const __m512i m = _mm512_and_si512(pl, k->abs63);
        const __mmask8 ok2 = _mm512_cmpeq_epi64_mask(pl, ph) & _mm512_cmplt_epu64_mask(m, k->oinf);
        o = _mm512_mask_blend_epi64(ok, _mm512_or_si512(m, _mm512_and_si512(_mm512_srl_epi64(pl, k->psh), k->sgn)), o);
        ok |= ok2;
    }
    *okp = ok;
    return o;
}

/* the row, out's constants S, SH (cert8) and O32 (32-bit output) known in each instance */
static INL size_t T512 cert_row(const double *v, const float *w, const double *kap, size_t n, const lm_dora_cert *c,
                                lm_kdtype out, void *dst, const void *base, size_t *n_changed, const int S, const int SH,
                                const int O32)
{
    const lm_dora_fmt *f = &lm_dora_fmts[out];
    consts k;
    k.sc = _mm_cvtsi32_si128(f->s);
    k.psh = _mm_cvtsi32_si128(64 - f->obits);
    k.half = _mm512_set1_epi64((long long)((1ull << (f->s - 1)) - 1));
    k.one = _mm512_set1_epi64(1);
    k.magr = _mm512_set1_epi64((long long)((1ull << (63 - f->s)) - 1));
    k.sgn = _mm512_set1_epi64((long long)(1ull << (f->obits - 1)));
    k.bias = _mm512_set1_epi64((long long)f->bias);
    k.rmin1 = _mm512_set1_epi64((long long)(f->rmin + 1));
    k.span = _mm512_set1_epi64((long long)(f->rinf - f->rmin - 1));
    k.abs63 = _mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll);
    k.oinf = _mm512_set1_epi64((long long)f->oinf);
    k.F = _mm512_set1_pd(c->F), k.E = _mm512_set1_pd(c->E), k.A0 = _mm512_set1_pd(c->A0);
    k.A1 = _mm512_set1_pd(c->A1), k.A2 = _mm512_set1_pd(c->A2), k.eF = _mm512_set1_pd(c->eF);
    k.g40 = _mm512_set1_pd(1 + 0x1p-40), k.t50 = _mm512_set1_pd(0x1p-50), k.t1060 = _mm512_set1_pd(0x1p-1060);
    const int o32 = O32;
    /* two vectors' lanes' low words (dwords), in order */
    const __m512i pick16 = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 60, 56, 52, 48, 44, 40, 36, 32,
                                            28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i pick32 = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    size_t bad = 0, changed = 0, j = 0;
    for (; j + 16 <= n; j += 16) { /* sixteen elements a step: one store, one compare with base */
        __mmask8 oka, okb;
        const __m512i oa = cert8(&k, f, v + j, w + j, kap + j, &oka, S, SH),
                      ob = cert8(&k, f, v + j + 8, w + j + 8, kap + j + 8, &okb, S, SH);
        if (o32) {
            const __m512i o = _mm512_permutex2var_epi32(oa, pick32, ob);
            _mm512_storeu_si512((void *)((uint32_t *)dst + j), o);
            if (base != NULL)
                changed += (size_t)__builtin_popcount(
                    (unsigned)_mm512_cmpneq_epi32_mask(o, _mm512_loadu_si512((const void *)((const uint32_t *)base + j))));
        } else {
            const __m256i o = _mm512_castsi512_si256(_mm512_permutex2var_epi16(oa, pick16, ob));
            _mm256_storeu_si256((__m256i *)(void *)((uint16_t *)dst + j), o);
            if (base != NULL)
                changed += (size_t)__builtin_popcount((unsigned)_mm256_cmpneq_epi16_mask(
                    o, _mm256_loadu_si256((const __m256i *)(const void *)((const uint16_t *)base + j))));
        }
        bad += 16 - (size_t)__builtin_popcount((unsigned)oka | (unsigned)okb << 8);
    }
    for (; j + 8 <= n; j += 8) {
        __mmask8 ok;
        const __m512i o = cert8(&k, f, v + j, w + j, kap + j, &ok, S, SH);
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
size_t T512 lm_dora_cert_avx512(const double *v, const float *w, const double *kap, size_t n, const lm_dora_cert *c,
                                lm_kdtype out, void *dst, const void *base, size_t *n_changed)
{
    /* S, SH and O32 as lm_dora_fmts[out] has them (cert8) */
    if (out == LM_KDT_BF16)
        return cert_row(v, w, kap, n, c, out, dst, base, n_changed, 45, 3, 0);
    if (out == LM_KDT_F16)
        return cert_row(v, w, kap, n, c, out, dst, base, n_changed, 42, 6, 0);
    return cert_row(v, w, kap, n, c, out, dst, base, n_changed, 29, 3, 1);
}
#endif
