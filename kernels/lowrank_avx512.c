/* SPDX-License-Identifier: MIT */
/* lowrank_avx512.c : AVX-512 (F, BW, VL, DQ) + F16C variant of the low-rank tile kernel, bit for
 * bit the reference (lowrank_ref.c; contract in lm_kernels.h, proof in lowrank_exact.c).
 * Blocks of 3 rows x 32 columns with four accumulation chains each (f32 path, bf16/f16 outputs:
 * 24 accumulators) or 4 rows x 16 columns in one chain (f64 path, f32 outputs): the accumulators
 * stay in registers over k, each A vector load serves every row of the block, B is broadcast.
 * Each lane performs the reference's operations in the reference's order, so r, the bound and the
 * certification decision are the reference's; lanes that fail it go to the shared scalar code
 * (lm_lowrank_patch), column tails to lm_lowrank_row_ref. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <string.h>

#define LR5_TARGET __attribute__((target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define LR5_INLINE static inline __attribute__((always_inline)) LR5_TARGET

#define LR5_MR 4     /* rows per block, at most */
#define LR5_MR_F32 3 /* f32 path: 3 rows x 2 vectors x 4 chains = 24 accumulators of the 32 zmm */
#define LR5_A_L2 (512u << 10) /* A's panels up to this size are read over every row block */
#define LR5_A_L1 (32u << 10)  /* else over groups of columns whose panels take this much */

/* 8 base values -> f32 */
LR5_INLINE __m256 lr5_load_w8(const void *p, lm_kdtype t)
{
    if (t == LM_KDT_F32)
        return _mm256_loadu_ps(p);
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (t == LM_KDT_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* f32 -> bf16 bits in 32-bit lanes, RNE as lm_f32_to_bf16_1 (NaN lanes: garbage, masked out) */
LR5_INLINE __m512i lr5_bf16(__m512 x)
{
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
}

/* 16 values of dtype t as bits, the form the finishes count changed elements in: f32 and bf16
 * in 32-bit lanes (bf16 zero-extended: the form its conversions work in), f16 in the 16-bit lanes
 * of the low half */
LR5_INLINE __m512i lr5_bits16(const void *p, lm_kdtype t)
{
    if (t == LM_KDT_F32)
        return _mm512_loadu_si512(p);
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return t == LM_KDT_F16 ? _mm512_castsi256_si512(h) : _mm512_cvtepu16_epi32(h);
}

/* 16 base values of dtype t at p -> f32 (*w), exactly as lm_bf16_to_f32_1 / lm_f16_to_f32_1; returns
 * their bits as lr5_bits16 */
LR5_INLINE __m512i lr5_load_w16(const void *p, lm_kdtype t, __m512 *w)
{
    const __m512i u = lr5_bits16(p, t);
    *w = t == LM_KDT_F32   ? _mm512_castsi512_ps(u)
         : t == LM_KDT_F16 ? _mm512_cvtph_ps(_mm512_castsi512_si256(u))
                           : _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    return u;
}

/* how many of 16 elements differ, both in lr5_bits16's form of dtype t */
LR5_INLINE unsigned lr5_ndiff(__m512i a, __m512i b, lm_kdtype t)
{
    if (t == LM_KDT_F16)
        return (unsigned)__builtin_popcount(_mm256_cmpneq_epi16_mask(_mm512_castsi512_si256(a),
                                                                     _mm512_castsi512_si256(b)));
    return (unsigned)__builtin_popcount(_mm512_cmpneq_epi32_mask(a, b));
}

/* the "exactness off" finish of 16 lanes: RNE of r, NaN canonical; counters as the reference.
 * Returns the output bits (lr5_bits16's form). */
LR5_INLINE __m512i lr5_store_uncertified(__m512 r, void *o, lm_kdtype ot, lm_lowrank_stats *st)
{
    const __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
    __mmask16 fin;
    __m512i b;
    if (ot == LM_KDT_BF16) {
        b = _mm512_mask_blend_epi32(nan, lr5_bf16(r), _mm512_set1_epi32(LM_LR_NAN_BF16));
        fin = _mm512_cmpneq_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7F80)), _mm512_set1_epi32(0x7F80));
        _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(b));
    } else if (ot == LM_KDT_F16) {
        const __m256i h = _mm256_mask_blend_epi16(nan, _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT),
                                                  _mm256_set1_epi16((short)LM_LR_NAN_F16));
        fin = _mm256_cmpneq_epi16_mask(_mm256_and_si256(h, _mm256_set1_epi16(0x7C00)),
                                       _mm256_set1_epi16(0x7C00));
        _mm256_storeu_si256((__m256i *)o, h);
        b = _mm512_castsi256_si512(h);
    } else {
        b = _mm512_mask_blend_epi32(nan, _mm512_castps_si512(r), _mm512_set1_epi32((int)LM_LR_NAN_F32));
        fin = _mm512_cmpneq_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7F800000)),
                                       _mm512_set1_epi32(0x7F800000));
        _mm512_storeu_si512(o, b);
    }
    if (__builtin_expect((unsigned)nan | (~(unsigned)fin & 0xFFFFu), 0)) {
        st->n_nonfinite += (uint64_t)__builtin_popcount(nan);
        st->n_overflow += (uint64_t)__builtin_popcount((unsigned)(~fin & ~nan) & 0xFFFFu);
    }
    return b;
}

/* 16 lanes of the f32 path: r = W + d, bound, certify, store; failures to the shared code.
 * Returns, when W and the output have one dtype, how many lanes' bits changed (compared in
 * registers, W read before the store: the output may be W itself), else 0.  The callers sum the
 * counts in a register and add them to st once per block, not through memory per vector.
 * bf16 outputs are certified from the bits of lo = r - e1 and hi = r + e1: the end nearer zero
 * (the smaller pattern) moved 2 floats toward zero, the other 1 away, both must lie strictly
 * between the two bf16 midpoints around the result, which the offsets LM_LR_BF16_NEAR / _FAR
 * turn into one compare of top halves ((g) in lowrank_exact.c); the reference applies the same
 * test. */
LR5_INLINE unsigned lr5_finish_f32(const lm_lowrank *lr, size_t i, size_t j, __m512 d, const void *wp,
                                   lm_kdtype wt, void *op, lm_kdtype ot, unsigned flags,
                                   lm_lowrank_stats *st)
{
    __m512 w;
    const __m512i in = lr5_load_w16(wp, wt, &w);
    const __m512 r = _mm512_add_ps(w, d);
    if (flags & LM_LOWRANK_UNCERTIFIED) {
        const __m512i b = lr5_store_uncertified(r, op, ot, st);
        return wt == ot ? lr5_ndiff(in, b, ot) : 0;
    }
    __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(lr->bnd_rf[i]), _mm512_loadu_ps(lr->bnd_cf + j),
                               _mm512_set1_ps(LM_LR_C0F));
    const __m512 absr = _mm512_abs_ps(r);
    __mmask16 ok;
    __m512i b;
    if (ot == LM_KDT_BF16) { /* |r|'s ends widened on their bits ((g) in lowrank_exact.c) */
        const __m512i tm = _mm512_add_epi32(_mm512_castps_si512(_mm512_sub_ps(absr, e)),
                                            _mm512_set1_epi32(LM_LR_BF16_NEAR));
        const __m512i tM = _mm512_add_epi32(_mm512_castps_si512(_mm512_add_ps(absr, e)),
                                            _mm512_set1_epi32(LM_LR_BF16_FAR));
        ok = _mm512_testn_epi32_mask(_mm512_xor_si512(tm, tM), _mm512_set1_epi32((int)0xFFFF0000u));
        ok = _mm512_mask_cmplt_epu32_mask(ok, tm, _mm512_set1_epi32((int)(LM_LR_BF16_QMAX << 16)));
        /* the magnitude's top half with r's sign */
        b = _mm512_ternarylogic_epi32(_mm512_srli_epi32(tm, 16), _mm512_srli_epi32(_mm512_castps_si512(r), 16),
                                      _mm512_set1_epi32(0x8000), 0xF8); /* A | (B & C) */
        _mm256_storeu_si256((__m256i *)op, _mm512_cvtepi32_epi16(b));
    } else {
        ok = _mm512_cmp_ps_mask(absr, _mm512_set1_ps(LM_LR_RMAX_F16), _CMP_LT_OQ);
        e = _mm512_fmadd_ps(absr, _mm512_set1_ps(LM_LR_CRF), e);
        const __m512 lo = _mm512_sub_ps(r, e), hi = _mm512_add_ps(r, e);
        const __m256i hlo = _mm512_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT);
        const __m256i hhi = _mm512_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT);
        ok = _mm256_mask_cmpeq_epi16_mask(ok, hlo, hhi);
        _mm256_storeu_si256((__m256i *)op, hlo);
        b = _mm512_castsi256_si512(hlo);
    }
    if (__builtin_expect(ok != 0xFFFF, 0)) {
        float wv[16];
        _mm512_storeu_ps(wv, w);
        lm_lowrank_patch(lr, i, j, wv, (uint32_t)(uint16_t)~ok, op, ot, st);
        return wt == ot ? lr5_ndiff(in, lr5_bits16(op, ot), ot) : 0; /* the patched lanes too */
    }
    return wt == ot ? lr5_ndiff(in, b, ot) : 0;
}

/* bf16 W and output, the 32 columns j .. j+31 of row i (d0: columns j .., d1: j + 16 ..): W read
 * as one vector of 32 values and spread into the high halves of two f32 vectors by word
 * permutations, the 32 results (the high halves of the rounded bits) gathered by one permutation
 * and stored as one vector, the changed ones counted on the 32 words at once.  Per lane the
 * operations and decisions of lr5_finish_f32 (and lr5_store_uncertified), so the same bits and
 * counters; it spares the two 32 -> 16 bit narrowings, the widenings, the shifts and a compare
 * per 32 elements. */
LR5_INLINE unsigned lr5_finish_bb(const lm_lowrank *lr, size_t i, size_t j, __m512 d0, __m512 d1, const void *wp,
                                  void *op, unsigned flags, lm_lowrank_stats *st, uint32_t *fail, float *wsave)
{
    const __m512i raw = _mm512_loadu_si512(wp);
    /* word 2k+1 of the widening indices: W's word k (k < 16), 16 + k; the even words are zeroed */
    const __m512i lo_idx = _mm512_set_epi32(15 << 16, 14 << 16, 13 << 16, 12 << 16, 11 << 16, 10 << 16, 9 << 16,
                                            8 << 16, 7 << 16, 6 << 16, 5 << 16, 4 << 16, 3 << 16, 2 << 16, 1 << 16, 0);
    const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(16 << 16));
    /* word k of the result: word 2k+1 of the first vector (k < 16), of the second (k >= 16) */
    const __m512i out_idx = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                             27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512 w0 = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, lo_idx, raw));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, hi_idx, raw));
    const __m512 r0 = _mm512_add_ps(w0, d0), r1 = _mm512_add_ps(w1, d1);
    if (flags & LM_LOWRANK_UNCERTIFIED) {
        /* RNE in the high half: u + lsb + 0x7FFF (as lr5_bf16, without the shift), NaN canonical */
        const __m512i one = _mm512_set1_epi32(1 << 16), bias = _mm512_set1_epi32(0x7FFF);
        const __m512i nanb = _mm512_set1_epi32((int)(LM_LR_NAN_BF16 << 16)), em = _mm512_set1_epi32(0x7F800000);
        const __m512i u0 = _mm512_castps_si512(r0), u1 = _mm512_castps_si512(r1);
        const __mmask16 n0 = _mm512_cmp_ps_mask(r0, r0, _CMP_UNORD_Q), n1 = _mm512_cmp_ps_mask(r1, r1, _CMP_UNORD_Q);
        const __m512i h0 = _mm512_mask_blend_epi32(
            n0, _mm512_add_epi32(u0, _mm512_add_epi32(_mm512_srli_epi32(_mm512_and_si512(u0, one), 16), bias)), nanb);
        const __m512i h1 = _mm512_mask_blend_epi32(
            n1, _mm512_add_epi32(u1, _mm512_add_epi32(_mm512_srli_epi32(_mm512_and_si512(u1, one), 16), bias)), nanb);
        const __mmask16 f0 = _mm512_cmpneq_epi32_mask(_mm512_and_si512(h0, em), em);
        const __mmask16 f1 = _mm512_cmpneq_epi32_mask(_mm512_and_si512(h1, em), em);
        const __m512i packed = _mm512_permutex2var_epi16(h0, out_idx, h1);
        _mm512_storeu_si512(op, packed);
        const unsigned nan = (unsigned)n0 | (unsigned)n1 << 16, fin = (unsigned)f0 | (unsigned)f1 << 16;
        if (__builtin_expect(nan | ~fin, 0)) {
            st->n_nonfinite += (uint64_t)__builtin_popcount(nan);
            st->n_overflow += (uint64_t)__builtin_popcount(~fin & ~nan);
        }
        return (unsigned)__builtin_popcount(_mm512_cmpneq_epi16_mask(packed, raw));
    }
    const __m512 c0 = _mm512_set1_ps(LM_LR_C0F), brf = _mm512_set1_ps(lr->bnd_rf[i]);
    const __m512i near = _mm512_set1_epi32(LM_LR_BF16_NEAR), far = _mm512_set1_epi32(LM_LR_BF16_FAR);
    const __m512 e0 = _mm512_fmadd_ps(brf, _mm512_loadu_ps(lr->bnd_cf + j), c0);
    const __m512 e1 = _mm512_fmadd_ps(brf, _mm512_loadu_ps(lr->bnd_cf + j + 16), c0);
    const __m512 a0 = _mm512_abs_ps(r0), a1 = _mm512_abs_ps(r1);
    const __m512i tm0 = _mm512_add_epi32(_mm512_castps_si512(_mm512_sub_ps(a0, e0)), near);
    const __m512i tM0 = _mm512_add_epi32(_mm512_castps_si512(_mm512_add_ps(a0, e0)), far);
    const __m512i tm1 = _mm512_add_epi32(_mm512_castps_si512(_mm512_sub_ps(a1, e1)), near);
    const __m512i tM1 = _mm512_add_epi32(_mm512_castps_si512(_mm512_add_ps(a1, e1)), far);
    /* the test of lr5_finish_f32 on the 32 elements at once: the top halves of tm and tM gathered
     * and compared as words, the magnitudes below LM_LR_BF16_QMAX; the result is tm's with the
     * sign of r (its top words gathered too) */
    const __m512i mag = _mm512_permutex2var_epi16(tm0, out_idx, tm1);
    const __m512i mag_h = _mm512_permutex2var_epi16(tM0, out_idx, tM1);
    const __m512i rtop = _mm512_permutex2var_epi16(_mm512_castps_si512(r0), out_idx, _mm512_castps_si512(r1));
    const __m512i packed = _mm512_ternarylogic_epi32(mag, rtop, _mm512_set1_epi16((short)0x8000), 0xF8); /* A | (B & C) */
    _mm512_storeu_si512(op, packed);
    const uint32_t ok = (uint32_t)_mm512_mask_cmplt_epu16_mask(_mm512_cmpeq_epi16_mask(mag, mag_h), mag,
                                                               _mm512_set1_epi16((short)LM_LR_BF16_QMAX));
    if (__builtin_expect(ok != 0xFFFFFFFFu, 0)) { /* patched by the caller (lr5_patch_bb) */
        _mm512_storeu_ps(wsave, w0);
        _mm512_storeu_ps(wsave + 16, w1);
        *fail = ~ok;
        return (unsigned)__builtin_popcount(_mm512_mask_cmpneq_epi16_mask(ok, packed, raw));
    }
    return (unsigned)__builtin_popcount(_mm512_cmpneq_epi16_mask(packed, raw));
}

/* the lanes `fail` of lr5_finish_bb's 32 (W's values in wv) recomputed and stored at op; returns
 * how many of them differ from W (lr5_finish_bb counted the others) */
static unsigned __attribute__((noinline, cold)) lr5_patch_bb(const lm_lowrank *lr, size_t i, size_t j,
                                                               const float *wv, uint32_t fail, void *op,
                                                               lm_lowrank_stats *st)
{
    lm_lowrank_patch(lr, i, j, wv, fail, op, LM_KDT_BF16, st);
    unsigned n = 0;
    for (uint32_t m = fail; m; m &= m - 1) {
        const unsigned l = (unsigned)__builtin_ctz(m);
        uint16_t o;
        memcpy(&o, (const char *)op + 2 * l, 2);
        n += o != (uint16_t)(lm_f32_bits(wv[l]) >> 16); /* W's bf16 bits: its f32 value's top half */
    }
    return n;
}

/* 8 lanes of the f64 path (f32 output); the count as lr5_finish_f32's */
LR5_INLINE unsigned lr5_finish_f64(const lm_lowrank *lr, size_t i, size_t j, __m512d d, const void *wp,
                                   lm_kdtype wt, void *op, lm_lowrank_stats *st)
{
    const __m256 w = lr5_load_w8(wp, wt);
    const __m512d r = _mm512_add_pd(_mm512_cvtps_pd(w), d);
    __m512d e = _mm512_fmadd_pd(_mm512_set1_pd(lr->bnd_rd[i]), _mm512_loadu_pd(lr->bnd_cd + j),
                                _mm512_set1_pd(LM_LR_C0D));
    const __m512d absr = _mm512_abs_pd(r);
    e = _mm512_fmadd_pd(absr, _mm512_set1_pd(LM_LR_CRD), e);
    const __m512d lo = _mm512_sub_pd(r, e), hi = _mm512_add_pd(r, e);
    const __m256i flo = _mm256_castps_si256(_mm512_cvtpd_ps(lo));
    const __m256i fhi = _mm256_castps_si256(_mm512_cvtpd_ps(hi));
    const __mmask8 ok = _mm256_mask_cmpeq_epi32_mask(
        _mm512_cmp_pd_mask(absr, _mm512_set1_pd((double)LM_LR_RMAX_F32), _CMP_LT_OQ), flo, fhi);
    _mm256_storeu_si256((__m256i *)op, flo);
    const __m256i in = _mm256_castps_si256(w); /* W's bits when W is f32 */
    if (__builtin_expect(ok != 0xFF, 0)) {
        float wv[8];
        _mm256_storeu_ps(wv, w);
        lm_lowrank_patch(lr, i, j, wv, (uint32_t)(uint8_t)~ok, op, LM_KDT_F32, st);
        return wt == LM_KDT_F32 ? (unsigned)__builtin_popcount(
                                      _mm256_cmpneq_epi32_mask(in, _mm256_loadu_si256((const __m256i *)op)))
                                : 0;
    }
    return wt == LM_KDT_F32 ? (unsigned)__builtin_popcount(_mm256_cmpneq_epi32_mask(in, flo)) : 0;
}

/* mr rows (tensor rows i ..) x 16*nv columns from j, f32 path: four accumulators per row and
 * vector, chain m taking k = m, m+4, ... (24 zmm for mr = 3, nv = 2); each broadcast of B serves
 * nv vectors.  mr and nv are constants at every call, so the loops unroll and the accumulators
 * live in registers. */
LR5_INLINE void lr5_block_f32(const lm_lowrank *lr, size_t i, size_t mr, size_t j, size_t nv,
                              const char *wp, size_t wstride, lm_kdtype wt, char *op, size_t ostride,
                              lm_kdtype ot, unsigned flags, lm_lowrank_stats *st)
{
    const size_t K = lr->K;
    const size_t wsz = wt == LM_KDT_F32 ? 4 : 2, osz = ot == LM_KDT_F32 ? 4 : 2;
    __m512 acc[LR5_MR][2][4];
#pragma GCC unroll 4
    for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 2
        for (size_t v = 0; v < nv; v++)
            acc[r][v][0] = acc[r][v][1] = acc[r][v][2] = acc[r][v][3] = _mm512_setzero_ps();
    size_t as;
    const float *b = lr->Bf + i * K, *a = lm_lr_panel(lr, j, 16 * nv, &as);
    /* term k goes to chain k % 4; the test on k + m < K only matters in the last round */
    for (size_t k = 0; k < K; k += 4)
#pragma GCC unroll 4
        for (size_t m = 0; m < 4; m++) {
            if (k + m >= K)
                break;
            __m512 a0 = _mm512_loadu_ps(a + (k + m) * as);
            __m512 a1 = nv > 1 ? _mm512_loadu_ps(a + (k + m) * as + 16) : a0;
            __asm__("" : "+v"(a0), "+v"(a1)); /* in registers: gcc would fold a load into each FMA */
#pragma GCC unroll 4
            for (size_t r = 0; r < mr; r++) {
                const __m512 bk = _mm512_set1_ps(b[r * K + k + m]);
                acc[r][0][m] = _mm512_fmadd_ps(bk, a0, acc[r][0][m]);
                if (nv > 1)
                    acc[r][1][m] = _mm512_fmadd_ps(bk, a1, acc[r][1][m]);
            }
        }
    unsigned changed = 0;
    if (wt == LM_KDT_BF16 && ot == LM_KDT_BF16 && nv == 2) {
        /* the lanes the vector test did not certify are recomputed after the block's last row
         * (W's values kept in wsave): no call among the rows, whose accumulators are live */
        uint32_t fail[LR5_MR] = {0};
        float wsave[LR5_MR][32];
#pragma GCC unroll 4
        for (size_t r = 0; r < mr; r++) {
            const __m512 d0 = _mm512_add_ps(_mm512_add_ps(acc[r][0][0], acc[r][0][1]),
                                            _mm512_add_ps(acc[r][0][2], acc[r][0][3]));
            const __m512 d1 = _mm512_add_ps(_mm512_add_ps(acc[r][1][0], acc[r][1][1]),
                                            _mm512_add_ps(acc[r][1][2], acc[r][1][3]));
            changed += lr5_finish_bb(lr, i + r, j, d0, d1, wp + r * wstride + j * 2, op + r * ostride + j * 2, flags,
                                     st, &fail[r], wsave[r]);
        }
#pragma GCC unroll 4
        for (size_t r = 0; r < mr; r++)
            if (__builtin_expect(fail[r] != 0, 0))
                changed += lr5_patch_bb(lr, i + r, j, wsave[r], fail[r], op + r * ostride + j * 2, st);
        st->n_changed += changed;
        return;
    }
#pragma GCC unroll 4
    for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 2
        for (size_t v = 0; v < nv; v++) {
            const __m512 d = _mm512_add_ps(_mm512_add_ps(acc[r][v][0], acc[r][v][1]),
                                           _mm512_add_ps(acc[r][v][2], acc[r][v][3]));
            changed += lr5_finish_f32(lr, i + r, j + 16 * v, d, wp + r * wstride + (j + 16 * v) * wsz, wt,
                                      op + r * ostride + (j + 16 * v) * osz, ot, flags, st);
        }
    st->n_changed += changed;
}

/* the same for the f64 path: mr rows x 8*nv columns */
LR5_INLINE void lr5_block_f64(const lm_lowrank *lr, size_t i, size_t mr, size_t j, size_t nv,
                              const char *wp, size_t wstride, lm_kdtype wt, char *op, size_t ostride,
                              lm_lowrank_stats *st)
{
    const size_t K = lr->K, cols = lr->cols;
    const size_t wsz = wt == LM_KDT_F32 ? 4 : 2;
    __m512d acc[LR5_MR][2];
#pragma GCC unroll 4
    for (size_t r = 0; r < mr; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_pd();
    const double *b = lr->Bs + i * K, *a = lr->A + j;
    for (size_t k = 0; k < K; k++, a += cols) {
        const __m512d a0 = _mm512_loadu_pd(a);
        const __m512d a1 = nv > 1 ? _mm512_loadu_pd(a + 8) : a0;
#pragma GCC unroll 4
        for (size_t r = 0; r < mr; r++) {
            const __m512d bk = _mm512_set1_pd(b[r * K + k]);
            acc[r][0] = _mm512_fmadd_pd(bk, a0, acc[r][0]);
            if (nv > 1)
                acc[r][1] = _mm512_fmadd_pd(bk, a1, acc[r][1]);
        }
    }
    unsigned changed = 0;
#pragma GCC unroll 4
    for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 2
        for (size_t v = 0; v < nv; v++)
            changed += lr5_finish_f64(lr, i + r, j + 8 * v, acc[r][v], wp + r * wstride + (j + 8 * v) * wsz, wt,
                                      op + r * ostride + (j + 8 * v) * 4, st);
    st->n_changed += changed;
}

/* Loop order: rows outside (blocks of mr, then one by one), columns inside, so that each block
 * reads its rows of W and writes its rows of the output from left to right, whole cache lines in
 * sequence (with the panels outside, every 32 columns of every row were a line of its own, 4 KiB
 * apart for a 2048-column bf16 tile: the stores waited for their lines; 10-25% slower), while the
 * panels of A (K x 32 values each, contiguous in Afp, 128 KiB for K = 16 and 2048 columns) stream
 * from L2.  The column tail goes to the reference, row by row. */
/* the whole tile for one (W dtype, output dtype) pair: both are constants at each call below, so
 * every dtype test in the loops disappears */
LR5_INLINE void lr5_tile(const lm_lowrank *lr, size_t row0, size_t n_rows, const void *w, lm_kdtype w_dtype,
                            size_t ldw, void *out, lm_kdtype out_dtype, size_t ldo, unsigned flags,
                            lm_lowrank_stats *st)
{
    lm_lowrank_stats c = {0};
    const size_t cols = lr->cols, K = lr->K;
    const size_t wstride = ldw * (w_dtype == LM_KDT_F32 ? 4 : 2);
    const size_t ostride = ldo * (out_dtype == LM_KDT_F32 ? 4 : 2);
    const char *wp = w;
    char *op = out;
    size_t j = 0;
    if (out_dtype != LM_KDT_F32 || (flags & LM_LOWRANK_UNCERTIFIED)) {
        const size_t j32 = cols / 32 * 32;
        j = cols / 16 * 16; /* then the reference */
        /* A's panels beyond L2 (K x cols x 4 bytes over LR5_A_L2): the columns in groups of
         * panels that fit in L1 (at least one panel), every row of the tile over one group before
         * the next, so that each 3-row block reads them from L1 instead of streaming all of A from
         * L3 (VeRA's K = 256: A is 2-5.6 MiB; its merge's CPU time -23%) */
        const size_t jl1 = K != 0 ? LR5_A_L1 / (K * 4 * 32) * 32 : 0, jg = K * cols * 4 <= LR5_A_L2 ? j32 : jl1 > 32 ? jl1 : 32;
        for (size_t j0 = 0; j0 < j32 || j0 == 0; j0 += jg) {
            const size_t j1 = j0 + jg < j32 ? j0 + jg : j32, last = j1 == j32;
            size_t i = 0;
            for (; i + LR5_MR_F32 <= n_rows; i += LR5_MR_F32) {
                for (size_t jb = j0; jb < j1; jb += 32)
                    lr5_block_f32(lr, row0 + i, LR5_MR_F32, jb, 2, wp + i * wstride, wstride, w_dtype,
                                  op + i * ostride, ostride, out_dtype, flags, &c);
                if (last && j > j32)
                    lr5_block_f32(lr, row0 + i, LR5_MR_F32, j32, 1, wp + i * wstride, wstride, w_dtype,
                                  op + i * ostride, ostride, out_dtype, flags, &c);
            }
            for (; i < n_rows; i++) {
                for (size_t jb = j0; jb < j1; jb += 32)
                    lr5_block_f32(lr, row0 + i, 1, jb, 2, wp + i * wstride, wstride, w_dtype, op + i * ostride,
                                  ostride, out_dtype, flags, &c);
                if (last && j > j32)
                    lr5_block_f32(lr, row0 + i, 1, j32, 1, wp + i * wstride, wstride, w_dtype, op + i * ostride,
                                  ostride, out_dtype, flags, &c);
            }
            if (last)
                break;
        }
    } else {
        const size_t j16 = cols / 16 * 16;
        j = cols / 8 * 8;
        size_t i = 0;
        for (; i + LR5_MR <= n_rows; i += LR5_MR) {
            for (size_t jb = 0; jb < j16; jb += 16)
                lr5_block_f64(lr, row0 + i, LR5_MR, jb, 2, wp + i * wstride, wstride, w_dtype, op + i * ostride,
                              ostride, &c);
            if (j > j16)
                lr5_block_f64(lr, row0 + i, LR5_MR, j16, 1, wp + i * wstride, wstride, w_dtype, op + i * ostride,
                              ostride, &c);
        }
        for (; i < n_rows; i++) {
            for (size_t jb = 0; jb < j16; jb += 16)
                lr5_block_f64(lr, row0 + i, 1, jb, 2, wp + i * wstride, wstride, w_dtype, op + i * ostride,
                              ostride, &c);
            if (j > j16)
                lr5_block_f64(lr, row0 + i, 1, j16, 1, wp + i * wstride, wstride, w_dtype, op + i * ostride,
                              ostride, &c);
        }
    }
    if (j < cols)
        for (size_t i = 0; i < n_rows; i++)
            lm_lowrank_row_ref(lr, row0 + i, j, cols, wp + i * wstride, w_dtype, op + i * ostride, out_dtype,
                               flags, &c);
    c.n_elems = n_rows * cols;
    lm_lowrank_stats_add(st, &c);
}

void LR5_TARGET lm_lowrank_avx512(const lm_lowrank *lr, size_t row0, size_t n_rows, const void *w,
                                  lm_kdtype w_dtype, size_t ldw, void *out, lm_kdtype out_dtype,
                                  size_t ldo, unsigned flags, lm_lowrank_stats *st)
{
    /* a local copy: the stores through out cannot reach it, so the factors' pointers and sizes
     * stay in registers instead of being reloaded after every store (exact path, 2048x2048 bf16
     * tensor: -4%) */
    const lm_lowrank L = *lr;
#define LR_CASE(wt, ot)                                                                            \
    if (w_dtype == (wt) && out_dtype == (ot)) {                                                    \
        lr5_tile(&L, row0, n_rows, w, (wt), ldw, out, (ot), ldo, flags, st);                       \
        return;                                                                                    \
    }
    LR_CASE(LM_KDT_BF16, LM_KDT_BF16)
    LR_CASE(LM_KDT_F16, LM_KDT_F16)
    LR_CASE(LM_KDT_F32, LM_KDT_F32)
    LR_CASE(LM_KDT_F32, LM_KDT_BF16)
    LR_CASE(LM_KDT_F32, LM_KDT_F16)
    LR_CASE(LM_KDT_BF16, LM_KDT_F32)
    LR_CASE(LM_KDT_F16, LM_KDT_F32)
    LR_CASE(LM_KDT_BF16, LM_KDT_F16)
    LR_CASE(LM_KDT_F16, LM_KDT_BF16)
#undef LR_CASE
}

#else
typedef int lm_lowrank_avx512_unused; /* not x86: nothing to build */
#endif
