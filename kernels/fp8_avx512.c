/* SPDX-License-Identifier: MIT */
/* fp8_avx512.c : AVX-512 variant of block FP8 merged with a low-rank term, bit for bit the
 * reference (fp8_ref.c).
 *  merge: the term's rows six at a time, in panels of 64 columns (4 A loads and 6 broadcasts feed
 *  24 fmas; the differences kept for the d2 lanes, added row after row once the rows are done),
 *  then pairs; blocks wider than 128 a row at a time, 128 columns a pass; the term's fma chains
 *  in registers over p, as gemm_rows runs them; the codes' values by way of
 *  f16 (a code's bits moved into an f16's are its value times 2^-8, exact, and vcvtph2ps widens
 *  them, subnormals included), times 256 s0 (exact unless that overflows: then times 256, then
 *  times s0), NaN codes patched to the f16 NaN; x, its amax, sameness and d2 lanes in one pass,
 *  rows in order (so d2's lanes add the reference's values in the reference's order).
 *  encode: the mantissa rounded in the integer bits, the lanes below 2^-6 (rare: a branch) by
 *  the sum with 2^14; the codes packed 64 to a store.  (Groups of 64 made without masks or
 *  branches and made again when a lane is below 2^-6 or flagged were slower on the fp8 bench's
 *  random codes, 5.5% of them subnormal: bench_fp8 --codes random.) */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <string.h>

#define F8_TARGET __attribute__((target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define F8_INLINE static inline __attribute__((always_inline)) F8_TARGET
#define F8_MAXV 8 /* vectors of 16 columns a row per pass */
#define F8_QR 6   /* term rows a panel pass (4 A loads and 6 broadcasts feed 24 fmas) */

static inline __mmask16 f8_mask(size_t n)
{
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

/* the values of 16 codes (mask m: the others 0) times 2^-8, f16 bits: the code sign-extended to
 * 16 bits, shifted by 7 (sign and magnitude in place, bit 14 a copy of the sign, cleared); the
 * NaN codes (0x7F | sign) get 0x7E00 | sign */
F8_INLINE __m512 f8_dq(const uint8_t *p, __mmask16 m)
{
    const __m128i c = _mm_maskz_loadu_epi8(m, p);
    __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(c), 7), _mm256_set1_epi16((short)0xBFFF));
    const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_or_si128(c, _mm_set1_epi8((char)0x80)), _mm_set1_epi8((char)0xFF));
    h = _mm256_mask_add_epi16(h, nan, h, _mm256_set1_epi16(0x3E80));
    return _mm512_cvtph_ps(h);
}

typedef struct {
    __m512 s256, s0; /* 256 s0, s0 */
    int split;       /* 256 s0 overflows: times 256, then s0 */
    __m512i amax;
    __mmask16 diff;
    __m512 d2;
} f8_state;

/* the code's value times s0, as the reference's dq(c) * s0 (one rounding) */
F8_INLINE __m512 f8_base(const f8_state *S, const uint8_t *p, __mmask16 m)
{
    const __m512 v = f8_dq(p, m);
    if (S->split)
        return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(256.0f)), S->s0);
    return _mm512_mul_ps(v, S->s256);
}

/* x (masked lanes 0) into the amax, sameness and d2 lanes, then stored */
F8_INLINE void f8_take(f8_state *S, __m512 x, __m512 c, float *dst, __mmask16 m)
{
    S->amax = _mm512_max_epu32(S->amax, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
    S->diff |= _mm512_mask_cmp_ps_mask(m, x, c, _CMP_NEQ_UQ);
    const __m512 d = _mm512_sub_ps(x, c);
    S->d2 = _mm512_add_ps(S->d2, _mm512_mul_ps(d, d));
    _mm512_mask_storeu_ps(dst, m, x);
}

/* mr rows (1 or 2) from row i, columns j0 .. j0 + 16 nv (the last vector masked by last); term:
 * the rows are the term's (the chains), else x = the base's values */
F8_INLINE void f8_rows(f8_state *S, const uint8_t *q0, size_t ldq, const lm_fp8_term *t, int term, size_t i,
                       size_t mr, size_t j0, size_t nv, __mmask16 last, float *x, size_t ldx)
{
    if (!term) {
        for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 8
            for (size_t v = 0; v < nv; v++) {
                const __mmask16 m = v + 1 == nv ? last : 0xFFFF;
                const size_t j = j0 + 16 * v;
                const __m512 c = f8_base(S, q0 + (i + r) * ldq + j, m);
                f8_take(S, c, c, x + (i + r) * ldx + j, m);
            }
        return;
    }
    __m512 acc[2][F8_MAXV];
#pragma GCC unroll 2
    for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 8
        for (size_t v = 0; v < nv; v++)
            acc[r][v] = _mm512_setzero_ps();
    const float *B0 = t->B + (i - t->r_lo) * t->ldb, *B1 = B0 + t->ldb;
    for (size_t p = 0; p < t->K; p++) {
        const __m512 a0 = _mm512_set1_ps(B0[p]);
        const __m512 a1 = mr > 1 ? _mm512_set1_ps(B1[p]) : a0;
        const float *Ap = t->A + p * t->lda + j0;
#pragma GCC unroll 8
        for (size_t v = 0; v < nv; v++) {
            __m512 b = _mm512_maskz_loadu_ps(v + 1 == nv ? last : 0xFFFF, Ap + 16 * v);
            __asm__("" : "+v"(b)); /* one load for both rows (gcc would fold it into each fma) */
            acc[0][v] = _mm512_fmadd_ps(a0, b, acc[0][v]);
            if (mr > 1)
                acc[1][v] = _mm512_fmadd_ps(a1, b, acc[1][v]);
        }
    }
    const __m512 al = _mm512_set1_ps(t->alpha);
#pragma GCC unroll 2
    for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 8
        for (size_t v = 0; v < nv; v++) {
            const __mmask16 m = v + 1 == nv ? last : 0xFFFF;
            const size_t j = j0 + 16 * v;
            const __m512 c = f8_base(S, q0 + (i + r) * ldq + j, m);
            f8_take(S, _mm512_add_ps(c, _mm512_mul_ps(al, acc[r][v])), c, x + (i + r) * ldx + j, m);
        }
}

/* F8_QR term rows from row i, columns j0 .. j0 + 16 pv (pv <= 4; the block's last vector masked
 * by last when it is here): the chains (F8_QR x pv fmas a p), x, amax and
 * sameness; the differences x - base into dd (row stride 16 F8_MAXV) for the d2 lanes */
F8_INLINE void f8_quad_panel(f8_state *S, const uint8_t *q0, size_t ldq, const lm_fp8_term *t, size_t i, size_t j0,
                             size_t pv, int has_last, __mmask16 last, float *x, size_t ldx, float *dd)
{
    __m512 acc[F8_QR][4];
#pragma GCC unroll 8
    for (size_t r = 0; r < F8_QR; r++)
#pragma GCC unroll 4
        for (size_t v = 0; v < pv; v++)
            acc[r][v] = _mm512_setzero_ps();
    const float *B0 = t->B + (i - t->r_lo) * t->ldb;
    const size_t ldb = t->ldb;
    for (size_t p = 0; p < t->K; p++) {
        const float *Ap = t->A + p * t->lda + j0;
        __m512 b[4];
#pragma GCC unroll 4
        for (size_t v = 0; v < pv; v++) {
            b[v] = _mm512_maskz_loadu_ps(has_last && v + 1 == pv ? last : 0xFFFF, Ap + 16 * v);
            __asm__("" : "+v"(b[v]));
        }
#pragma GCC unroll 8
        for (size_t r = 0; r < F8_QR; r++) {
            const __m512 a = _mm512_set1_ps(B0[r * ldb + p]);
#pragma GCC unroll 4
            for (size_t v = 0; v < pv; v++)
                acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
        }
    }
    const __m512 al = _mm512_set1_ps(t->alpha);
#pragma GCC unroll 8
    for (size_t r = 0; r < F8_QR; r++)
#pragma GCC unroll 4
        for (size_t v = 0; v < pv; v++) {
            const __mmask16 m = has_last && v + 1 == pv ? last : 0xFFFF;
            const size_t j = j0 + 16 * v;
            const __m512 c = f8_base(S, q0 + (i + r) * ldq + j, m);
            const __m512 xv = _mm512_add_ps(c, _mm512_mul_ps(al, acc[r][v]));
            S->amax = _mm512_max_epu32(S->amax, _mm512_and_si512(_mm512_castps_si512(xv), _mm512_set1_epi32(0x7FFFFFFF)));
            S->diff |= _mm512_mask_cmp_ps_mask(m, xv, c, _CMP_NEQ_UQ);
            _mm512_mask_storeu_ps(x + (i + r) * ldx + j, m, xv);
            _mm512_storeu_ps(dd + r * 16 * F8_MAXV + j, _mm512_maskz_sub_ps(m, xv, c));
        }
}

/* F8_QR term rows, nv vectors wide: the panels, then the d2 lanes row after row */
F8_INLINE void f8_quad(f8_state *S, const uint8_t *q0, size_t ldq, const lm_fp8_term *t, size_t i, size_t nv,
                       __mmask16 last, float *x, size_t ldx)
{
    float dd[F8_QR * 16 * F8_MAXV] __attribute__((aligned(64)));
    if (nv <= 4) {
        f8_quad_panel(S, q0, ldq, t, i, 0, nv, 1, last, x, ldx, dd);
    } else {
        f8_quad_panel(S, q0, ldq, t, i, 0, 4, 0, last, x, ldx, dd);
        f8_quad_panel(S, q0, ldq, t, i, 64, nv - 4, 1, last, x, ldx, dd);
    }
#pragma GCC unroll 8
    for (size_t r = 0; r < F8_QR; r++)
#pragma GCC unroll 8
        for (size_t v = 0; v < nv; v++) {
            const __m512 d = _mm512_load_ps(dd + r * 16 * F8_MAXV + 16 * v);
            S->d2 = _mm512_add_ps(S->d2, _mm512_mul_ps(d, d));
        }
}

/* rows [i0, i1) of the block, all term rows or none; nv, last: the block's width (<= 128) */
F8_INLINE void f8_span(f8_state *S, const uint8_t *q0, size_t ldq, const lm_fp8_term *t, int term, size_t i0,
                       size_t i1, size_t nv, __mmask16 last, float *x, size_t ldx)
{
    size_t i = i0;
    if (term)
        for (; i + F8_QR <= i1; i += F8_QR)
            f8_quad(S, q0, ldq, t, i, nv, last, x, ldx);
    for (; i + 2 <= i1; i += 2)
        f8_rows(S, q0, ldq, t, term, i, 2, 0, nv, last, x, ldx);
    if (i < i1)
        f8_rows(S, q0, ldq, t, term, i, 1, 0, nv, last, x, ldx);
}

F8_TARGET static void f8_span_any(f8_state *St, const uint8_t *q0, size_t ldq, const lm_fp8_term *t, int term,
                                  size_t i0, size_t i1, size_t w, float *x, size_t ldx)
{
    if (i0 >= i1)
        return;
    f8_state L = *St, *S = &L; /* (in registers: its address does not leave the inlined code) */
    if (w > 16 * F8_MAXV) { /* a row at a time (the d2 lanes take a row's columns in order) */
        for (size_t i = i0; i < i1; i++)
            for (size_t j0 = 0; j0 < w; j0 += 16 * F8_MAXV) {
                const size_t n = w - j0 < 16 * F8_MAXV ? w - j0 : 16 * F8_MAXV, nv = (n + 15) / 16;
                const __mmask16 last = f8_mask(n - 16 * (nv - 1));
                switch (nv) {
                case 8: f8_rows(S, q0, ldq, t, term, i, 1, j0, 8, last, x, ldx); break;
                case 7: f8_rows(S, q0, ldq, t, term, i, 1, j0, 7, last, x, ldx); break;
                case 6: f8_rows(S, q0, ldq, t, term, i, 1, j0, 6, last, x, ldx); break;
                case 5: f8_rows(S, q0, ldq, t, term, i, 1, j0, 5, last, x, ldx); break;
                case 4: f8_rows(S, q0, ldq, t, term, i, 1, j0, 4, last, x, ldx); break;
                case 3: f8_rows(S, q0, ldq, t, term, i, 1, j0, 3, last, x, ldx); break;
                case 2: f8_rows(S, q0, ldq, t, term, i, 1, j0, 2, last, x, ldx); break;
                default: f8_rows(S, q0, ldq, t, term, i, 1, j0, 1, last, x, ldx); break;
                }
            }
        *St = L;
        return;
    }
    const size_t nv = (w + 15) / 16;
    const __mmask16 last = f8_mask(w - 16 * (nv - 1));
    switch (nv) {
    case 8: f8_span(S, q0, ldq, t, term, i0, i1, 8, last, x, ldx); break;
    case 7: f8_span(S, q0, ldq, t, term, i0, i1, 7, last, x, ldx); break;
    case 6: f8_span(S, q0, ldq, t, term, i0, i1, 6, last, x, ldx); break;
    case 5: f8_span(S, q0, ldq, t, term, i0, i1, 5, last, x, ldx); break;
    case 4: f8_span(S, q0, ldq, t, term, i0, i1, 4, last, x, ldx); break;
    case 3: f8_span(S, q0, ldq, t, term, i0, i1, 3, last, x, ldx); break;
    case 2: f8_span(S, q0, ldq, t, term, i0, i1, 2, last, x, ldx); break;
    default: f8_span(S, q0, ldq, t, term, i0, i1, 1, last, x, ldx); break;
    }
    *St = L;
}

F8_TARGET void lm_fp8_merge_avx512(const uint8_t *q0, size_t ldq, float s0, size_t h, size_t w, const lm_fp8_term *t,
                                   float *x, size_t ldx, lm_fp8_lanes *L)
{
    memset(L, 0, sizeof *L);
    L->same = 1;
    if (h == 0 || w == 0)
        return;
    const float s256 = s0 * 256.0f;
    f8_state S = {_mm512_set1_ps(s256), _mm512_set1_ps(s0), !(s256 - s256 == 0.0f) && s0 - s0 == 0.0f,
                  _mm512_setzero_si512(), 0, _mm512_setzero_ps()};
    const size_t lo = t->r_lo < h ? t->r_lo : h, hi = t->r_hi < h ? t->r_hi : h;
    f8_span_any(&S, q0, ldq, t, 0, 0, lo, w, x, ldx);
    const uint32_t b1 = (uint32_t)_mm512_reduce_max_epu32(S.amax); /* the rows before the term's */
    f8_span_any(&S, q0, ldq, t, 1, lo, hi > lo ? hi : lo, w, x, ldx);
    const uint32_t a12 = (uint32_t)_mm512_reduce_max_epu32(S.amax);
    S.amax = _mm512_setzero_si512(); /* the rows after them */
    f8_span_any(&S, q0, ldq, t, 0, hi > lo ? hi : lo, h, w, x, ldx);
    const uint32_t b3 = (uint32_t)_mm512_reduce_max_epu32(S.amax);
    L->amax = a12 > b3 ? a12 : b3;
    L->amax_b = b1 > b3 ? b1 : b3;
    L->same = S.diff == 0;
    _mm512_storeu_ps(L->d2, S.d2);
}

/* the certification (lm_fp8_cert): a checked row's Ers and the flags found */
typedef struct {
    __m512 ers, marg; /* the row's Ers, its margin M (lm_fp8_margin) */
    __m512i thr;
    uint32_t *flag;
    size_t n;
} f8_chk;

/* the flagged lanes of f (bit l: element idx + l) appended (rare) */
static inline __attribute__((always_inline)) void f8_flag(f8_chk *k, uint64_t f, uint32_t idx)
{
    while (f) {
        k->flag[k->n++] = idx + (uint32_t)__builtin_ctzll(f);
        f &= f - 1;
    }
}

/* 16 values' codes (lanes outside m: 0) into qp, or into *out (not NULL), and the lanes' numbers;
 * checked: @return the lanes flagged (lm_fp8_cert) */
F8_INLINE unsigned f8_enc16(const float *xp, __mmask16 m, __m512 s, __m512 inv, __m512 ramax, const uint8_t *q0p,
                            uint8_t *qp, __m512 *sum, __m512 *e2, __m512i *emax, uint64_t *n_diff, __m512i *out,
                            int checked, const f8_chk *chk)
{
    const __m512 xv = _mm512_maskz_loadu_ps(m, xp);
    const __m512i u = _mm512_castps_si512(_mm512_mul_ps(xv, s));
    const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
    /* the rounding on the signed bits (|x * s| < 2^31 as bits: no carry into the sign): v the
     * value coded with x's sign (x * s has it), bits 20.. + 0x40 the code's 7 low bits (the
     * exponent rebiased: -960 = +0x40 modulo 128; bit 7 clear for every code up to 0x7E) */
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFFF)),
                                       _mm512_and_si512(_mm512_srli_epi32(u, 20), _mm512_set1_epi32(1)));
    __m512i c = _mm512_add_epi32(_mm512_srli_epi32(r, 20), _mm512_set1_epi32(0x40));
    __m512i v = _mm512_and_si512(r, _mm512_set1_epi32((int)0xFFF00000u));
    const __mmask16 sub = _mm512_mask_cmplt_epu32_mask(m, a, _mm512_set1_epi32(0x3C800000));
    unsigned f = 0;
    if (sub) { /* below 2^-6: steps of 2^-9 */
        const __m512 sa = _mm512_add_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(16384.0f));
        const __m512 rs = _mm512_sub_ps(sa, _mm512_set1_ps(16384.0f));
        c = _mm512_mask_sub_epi32(c, sub, _mm512_castps_si512(sa), _mm512_set1_epi32(0x46800000));
        v = _mm512_mask_or_epi32(v, sub, _mm512_castps_si512(rs), _mm512_and_si512(u, _mm512_set1_epi32((int)0x80000000u)));
        if (checked) { /* the distance to the nearest odd multiple of 2^-10, or to zero */
            const __m512 af = _mm512_castsi512_ps(a);
            const __m512 dm = _mm512_sub_ps(_mm512_set1_ps(0x1p-10f), _mm512_abs_ps(_mm512_sub_ps(af, rs)));
            f |= (unsigned)_mm512_mask_cmp_ps_mask(sub, _mm512_min_ps(dm, af),
                                                   _mm512_fmadd_ps(af, _mm512_set1_ps(0x1p-19f), chk->ers), _CMP_LE_OQ);
        }
    }
    /* the code: its 7 low bits (c & 0x7F), and bit 31 of u as bit 7 (u >> 24 & ~0x7F) */
    c = _mm512_maskz_ternarylogic_epi32(m, c, _mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x7F), 0xE4);
    if (out != NULL) /* (the caller stores it) */
        *out = c;
    else
        _mm512_mask_cvtepi32_storeu_epi8(qp, m, c);
    if (q0p != NULL)
        *n_diff += (uint64_t)__builtin_popcount(
            (unsigned)_mm512_mask_cmpneq_epi32_mask(m, c, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, q0p))));
    /* the error in the scaled domain, exact: v (y's sign) - y */
    const __m512 ey = _mm512_sub_ps(_mm512_castsi512_ps(v), _mm512_castsi512_ps(u));
    const __m512i e = _mm512_maskz_and_epi32(m, _mm512_castps_si512(ey), _mm512_set1_epi32(0x7FFFFFFF));
    if (checked) /* |y| >= 2^-6: within M of the nearest midpoint (fl(e + M) >= h - 22 ulp(y));
                    the amax candidates */
        f |= (unsigned)(_mm512_mask_cmpge_epu32_mask(
                            m & (__mmask16)~sub, _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(e), chk->marg)),
                            _mm512_sub_epi32(_mm512_and_si512(a, _mm512_set1_epi32(0x7F800000)),
                                             _mm512_set1_epi32(0x020002C0))) |
                        _mm512_mask_cmpge_epu32_mask(m, a, chk->thr));
    *emax = _mm512_max_epu32(*emax, e);
    *sum = _mm512_add_ps(*sum, _mm512_castsi512_ps(e));
    *e2 = _mm512_add_ps(*e2, _mm512_maskz_mul_ps(m, ey, ey));
    return f;
}

typedef struct {
    __m512 s, inv, ramax, sum, e2;
    __m512i emax;
    uint64_t n_diff;
} f8_enc;

/* row i: its w codes (checked: flagged into chk, idx the row's first element) */
F8_INLINE void f8_enc_row(f8_enc *E, const float *xr, const uint8_t *q0r, uint8_t *qr, size_t w, int checked,
                          f8_chk *chk, uint32_t idx)
{
    const size_t wf = w / 16 * 16;
    size_t j = 0;
    unsigned f;
    if (q0r == NULL) { /* 64 codes packed into one store (vpmovdb to memory is slow on AMD) */
        for (; j + 64 <= wf; j += 64) {
            __m512i c[4];
            uint64_t f4 = 0;
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++)
                f4 |= (uint64_t)f8_enc16(xr + j + 16 * g, 0xFFFF, E->s, E->inv, E->ramax, NULL, NULL, &E->sum, &E->e2,
                                         &E->emax, &E->n_diff, &c[g], checked, chk)
                      << (16 * g);
            if (checked && f4)
                f8_flag(chk, f4, idx + (uint32_t)j);
            /* in each 128-bit lane l: c0[4l..4l+3] c1[..] c2[..] c3[..] (codes < 256: no saturation) */
            const __m512i p = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
            _mm512_storeu_si512(qr + j, _mm512_permutexvar_epi32(
                                            _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), p));
        }
        for (; j < wf; j += 16)
            if ((f = f8_enc16(xr + j, 0xFFFF, E->s, E->inv, E->ramax, NULL, qr + j, &E->sum, &E->e2, &E->emax,
                              &E->n_diff, NULL, checked, chk)) != 0)
                f8_flag(chk, f, idx + (uint32_t)j);
    } else {
        for (; j < wf; j += 16)
            if ((f = f8_enc16(xr + j, 0xFFFF, E->s, E->inv, E->ramax, q0r + j, qr + j, &E->sum, &E->e2, &E->emax,
                              &E->n_diff, NULL, checked, chk)) != 0)
                f8_flag(chk, f, idx + (uint32_t)j);
    }
    if (j < w && (f = f8_enc16(xr + j, f8_mask(w - wf), E->s, E->inv, E->ramax, q0r != NULL ? q0r + j : NULL, qr + j,
                               &E->sum, &E->e2, &E->emax, &E->n_diff, NULL, checked, chk)) != 0)
        f8_flag(chk, f, idx + (uint32_t)j);
}

F8_TARGET void lm_fp8_encode_avx512(const float *x, size_t ldx, size_t h, size_t w, float s, float inv, float ramax,
                                    const uint8_t *q0, size_t ldq, uint8_t *q, size_t ldo, lm_fp8_lanes *L,
                                    lm_fp8_cert *cert)
{
    f8_enc E = {_mm512_set1_ps(s), _mm512_set1_ps(inv), _mm512_set1_ps(ramax), _mm512_setzero_ps(),
                _mm512_setzero_ps(), _mm512_setzero_si512(), 0};
    f8_chk chk = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_set1_epi32(cert != NULL ? (int)cert->thr : 0),
                  cert != NULL ? cert->flag : NULL, 0};
    for (size_t i = 0; i < h; i++) {
        const float *xr = x + i * ldx;
        uint8_t *qr = q + i * ldo;
        const uint8_t *q0r = q0 != NULL ? q0 + i * ldq : NULL;
        if (cert != NULL && cert->erow[i] > 0.0f) {
            const float ers = cert->erow[i] * s * 1.0001f + 0x1p-140f;
            chk.ers = _mm512_set1_ps(ers);
            chk.marg = _mm512_set1_ps(lm_fp8_margin(ers));
            f8_enc_row(&E, xr, q0r, qr, w, 1, &chk, (uint32_t)(i * w));
        } else {
            f8_enc_row(&E, xr, q0r, qr, w, 0, &chk, 0);
        }
    }
    if (cert != NULL)
        cert->n_flag = chk.n;
    _mm512_storeu_ps(L->sum, E.sum);
    _mm512_storeu_ps(L->e2, E.e2);
    _mm512_storeu_si512(L->emax, E.emax);
    L->n_diff = E.n_diff;
}

#else
typedef int lm_fp8_avx512_unused; /* not x86: nothing to build */
#endif
