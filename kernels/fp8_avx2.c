/* SPDX-License-Identifier: MIT */
/* fp8_avx2.c : AVX2 variant of block FP8 merged with a low-rank term, bit for bit the reference
 * (fp8_ref.c), built with -mavx2 -mf16c -mfma.
 *  merge: the term's rows four at a time, 16 columns (two vectors) a step, the chains over p in
 *  registers (one A load feeds four fmas); the codes' values by way of f16 as fp8_avx512.c
 *  (exact, then one product with 256 s0, or 256 then s0 when that overflows); the differences
 *  kept per row group and added to the d2 lanes row after row (the reference's order); blocks
 *  wider than 128 a row at a time.
 *  encode: 16 columns a step (lanes 0-7 and 8-15 in two vectors), the rounding on the integer
 *  bits as fp8_avx512.c; a tail of fewer than 16 columns by the reference's scalar operations on
 *  the same lanes (stored between). */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define F2_INLINE static inline __attribute__((always_inline))
#define F2_RB 4 /* term rows a pass */

static uint32_t f2_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static float f2_float(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* the values of 8 codes times 2^-8 (f16 bits: the code sign-extended, shifted by 7, bit 14
 * cleared; NaN codes 0x7F | sign -> 0x7E00 | sign), widened */
F2_INLINE __m256 f2_dq8(const uint8_t *p)
{
    const __m128i c = _mm_loadl_epi64((const __m128i *)(const void *)p);
    const __m128i w = _mm_cvtepi8_epi16(c);
    __m128i h = _mm_and_si128(_mm_slli_epi16(w, 7), _mm_set1_epi16((short)0xBFFF));
    const __m128i nan = _mm_cmpeq_epi16(_mm_or_si128(w, _mm_set1_epi16((short)0xFF80)), _mm_set1_epi16(-1));
    h = _mm_add_epi16(h, _mm_and_si128(nan, _mm_set1_epi16(0x3E80)));
    return _mm256_cvtph_ps(h);
}

typedef struct {
    __m256 s256, s0;
    int split;
    __m256i amax;
    __m256 diff; /* lanes where x != base (all ones) */
} f2_state;

F2_INLINE __m256 f2_base(const f2_state *S, const uint8_t *p)
{
    const __m256 v = f2_dq8(p);
    if (S->split)
        return _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(256.0f)), S->s0);
    return _mm256_mul_ps(v, S->s256);
}

F2_INLINE void f2_take(f2_state *S, __m256 x, __m256 c, float *dst)
{
    S->amax = _mm256_max_epu32(S->amax, _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF)));
    S->diff = _mm256_or_ps(S->diff, _mm256_cmp_ps(x, c, _CMP_NEQ_UQ));
    _mm256_storeu_ps(dst, x);
}

/* the scalar reference's element (a column tail), its d2 lane updated */
static void f2_one(f2_state *S, const uint8_t *q0, float s0, const lm_fp8_term *t, int term, size_t i, size_t j,
                   float *x, float *d2, uint32_t *amax, int *same)
{
    const float c = lm_fp8_code_value(q0[j]) * s0;
    float v = c;
    if (term) {
        const float *b = t->B + (i - t->r_lo) * t->ldb;
        float acc = 0.0f;
        for (size_t p = 0; p < t->K; p++)
            acc = fmaf(b[p], t->A[p * t->lda + j], acc);
        v = c + t->alpha * acc;
    }
    x[j] = v;
    const uint32_t a = f2_bits(v) & 0x7FFFFFFFu;
    *amax = a > *amax ? a : *amax;
    *same &= v == c;
    const float d = v - c;
    d2[j % 16] += d * d;
    (void)S;
}

/* rows i .. i + mr (mr <= F2_RB, all term rows or none), columns j0 .. j0 + 16 nc (nc chunks of
 * 16): x, amax, sameness; the differences into dd (row stride 16 nc) */
F2_INLINE void f2_group(f2_state *S, const uint8_t *q0, size_t ldq, const lm_fp8_term *t, int term, size_t i,
                        size_t mr, size_t j0, size_t nc, float *x, size_t ldx, float *dd)
{
    for (size_t ch = 0; ch < nc; ch++) {
        const size_t j = j0 + 16 * ch;
        __m256 acc[F2_RB][2];
#pragma GCC unroll 4
        for (size_t r = 0; r < F2_RB; r++)
            acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        if (term) {
            const float *B0 = t->B + (i - t->r_lo) * t->ldb;
            for (size_t p = 0; p < t->K; p++) {
                const float *Ap = t->A + p * t->lda + j;
                const __m256 a0 = _mm256_loadu_ps(Ap), a1 = _mm256_loadu_ps(Ap + 8);
#pragma GCC unroll 4
                for (size_t r = 0; r < F2_RB; r++)
                    if (r < mr) {
                        const __m256 b = _mm256_set1_ps(B0[r * t->ldb + p]);
                        acc[r][0] = _mm256_fmadd_ps(b, a0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(b, a1, acc[r][1]);
                    }
            }
        }
        const __m256 al = _mm256_set1_ps(term ? t->alpha : 0.0f);
#pragma GCC unroll 4
        for (size_t r = 0; r < F2_RB; r++)
            if (r < mr)
                for (int hh = 0; hh < 2; hh++) {
                    const __m256 c = f2_base(S, q0 + (i + r) * ldq + j + 8 * hh);
                    const __m256 xv = term ? _mm256_add_ps(c, _mm256_mul_ps(al, acc[r][hh])) : c;
                    f2_take(S, xv, c, x + (i + r) * ldx + j + 8 * hh);
                    _mm256_storeu_ps(dd + r * 16 * nc + 16 * ch + 8 * hh, _mm256_sub_ps(xv, c));
                }
    }
}

void lm_fp8_merge_avx2(const uint8_t *q0, size_t ldq, float s0, size_t h, size_t w, const lm_fp8_term *t, float *x,
                       size_t ldx, lm_fp8_lanes *L)
{
    memset(L, 0, sizeof *L);
    L->same = 1;
    if (h == 0 || w == 0)
        return;
    const float s256 = s0 * 256.0f;
    f2_state S = {_mm256_set1_ps(s256), _mm256_set1_ps(s0), !(s256 - s256 == 0.0f) && s0 - s0 == 0.0f,
                  _mm256_setzero_si256(), _mm256_setzero_ps()};
    const size_t lo = t->r_lo < h ? t->r_lo : h, hi0 = t->r_hi < h ? t->r_hi : h, hi = hi0 > lo ? hi0 : lo;
    const size_t wf = w / 16 * 16;
    __m256 d2lo = _mm256_setzero_ps(), d2hi = _mm256_setzero_ps();
    float dd[F2_RB * 128];
    uint32_t amax_b = 0, amax_t = 0;
    for (size_t i = 0; i < h;) {
        const int term = i >= lo && i < hi;
        const size_t end = i < lo ? lo : i < hi ? hi : h;
        size_t mr = end - i < F2_RB ? end - i : F2_RB;
        if (w > 128 || wf < w) /* a row at a time: its chunks', then its tail's d2 (the reference's order) */
            mr = 1;
        /* the full chunks of rows i .. i + mr: 128 columns at most a pass */
        for (size_t jb = 0; jb < wf; jb += 128) {
            const size_t n = wf - jb < 128 ? (wf - jb) / 16 : 8;
            f2_group(&S, q0, ldq, t, term, i, mr, jb, n, x, ldx, dd);
            for (size_t r = 0; r < mr; r++) /* the d2 lanes: row after row */
                for (size_t ch = 0; ch < n; ch++) {
                    const __m256 a = _mm256_loadu_ps(dd + r * 16 * n + 16 * ch),
                                 b = _mm256_loadu_ps(dd + r * 16 * n + 16 * ch + 8);
                    d2lo = _mm256_add_ps(d2lo, _mm256_mul_ps(a, a));
                    d2hi = _mm256_add_ps(d2hi, _mm256_mul_ps(b, b));
                }
        }
        if (wf < w) { /* the row's tail by the reference's operations */
            float d2[16];
            _mm256_storeu_ps(d2, d2lo);
            _mm256_storeu_ps(d2 + 8, d2hi);
            uint32_t am = 0;
            int same = 1;
            for (size_t r = 0; r < mr; r++)
                for (size_t j = wf; j < w; j++)
                    f2_one(&S, q0 + (i + r) * ldq, s0, t, term, i + r, j, x + (i + r) * ldx, d2, &am, &same);
            d2lo = _mm256_loadu_ps(d2);
            d2hi = _mm256_loadu_ps(d2 + 8);
            if (term)
                amax_t = am > amax_t ? am : amax_t;
            else
                amax_b = am > amax_b ? am : amax_b;
            if (!same)
                S.diff = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        }
        /* the vector amax of this group into its kind */
        __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(S.amax), _mm256_extracti128_si256(S.amax, 1));
        m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0x4E));
        m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0xB1));
        const uint32_t gm = (uint32_t)_mm_cvtsi128_si32(m4);
        if (term)
            amax_t = gm > amax_t ? gm : amax_t;
        else
            amax_b = gm > amax_b ? gm : amax_b;
        S.amax = _mm256_setzero_si256();
        i += mr;
    }
    L->amax = amax_t > amax_b ? amax_t : amax_b;
    L->amax_b = amax_b;
    L->same = _mm256_movemask_ps(S.diff) == 0;
    _mm256_storeu_ps(L->d2, d2lo);
    _mm256_storeu_ps(L->d2 + 8, d2hi);
}

/* ---- encode ---------------------------------------------------------------------------------- */
typedef struct {
    __m256 s, inv, ramax, sum[2], e2[2];
    __m256i emax[2];
    uint64_t n_diff;
} f2_enc;

typedef struct {
    __m256 ers, marg; /* the row's Ers (lm_fp8_cert), its margin (lm_fp8_margin) */
    __m256i thr1;     /* thr - 1 (0x7FFFFFFF for thr above: |y|'s bits are never greater) */
} f2_chk;

/* 8 values' codes into *code and lanes hh of the numbers; checked: @return the lanes flagged */
F2_INLINE unsigned f2_enc8(f2_enc *E, const float *xp, int hh, int checked, const f2_chk *k, __m256i *code)
{
    const __m256 xv = _mm256_loadu_ps(xp);
    const __m256i u = _mm256_castps_si256(_mm256_mul_ps(xv, E->s));
    const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFFF)),
                                       _mm256_and_si256(_mm256_srli_epi32(u, 20), _mm256_set1_epi32(1)));
    __m256i c = _mm256_add_epi32(_mm256_srli_epi32(r, 20), _mm256_set1_epi32(0x40));
    __m256i v = _mm256_and_si256(r, _mm256_set1_epi32((int)0xFFF00000u));
    const __m256i sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C800000), a);
    unsigned f = 0;
    if (_mm256_movemask_ps(_mm256_castsi256_ps(sub))) { /* below 2^-6: steps of 2^-9 */
        const __m256 af = _mm256_castsi256_ps(a);
        const __m256 sa = _mm256_add_ps(af, _mm256_set1_ps(16384.0f));
        const __m256 rs = _mm256_sub_ps(sa, _mm256_set1_ps(16384.0f));
        const __m256 sm = _mm256_castsi256_ps(sub);
        c = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(c),
            _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_castps_si256(sa), _mm256_set1_epi32(0x46800000))), sm));
        v = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(v),
            _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(rs),
                                                _mm256_and_si256(u, _mm256_set1_epi32((int)0x80000000u)))),
            sm));
        if (checked) { /* the distance to the nearest odd multiple of 2^-10, or to zero */
            const __m256 dm = _mm256_sub_ps(_mm256_set1_ps(0x1p-10f),
                                            _mm256_and_ps(_mm256_sub_ps(af, rs), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))));
            const __m256 le2 = _mm256_cmp_ps(_mm256_min_ps(dm, af), _mm256_fmadd_ps(af, _mm256_set1_ps(0x1p-19f), k->ers),
                                             _CMP_LE_OQ);
            f |= (unsigned)_mm256_movemask_ps(_mm256_and_ps(le2, sm));
        }
    }
    *code = _mm256_or_si256(_mm256_and_si256(c, _mm256_set1_epi32(0x7F)),
                            _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80)));
    /* the error in the scaled domain, exact: v (y's sign) - y */
    const __m256 ey = _mm256_sub_ps(_mm256_castsi256_ps(v), _mm256_castsi256_ps(u));
    const __m256i e = _mm256_and_si256(_mm256_castps_si256(ey), _mm256_set1_epi32(0x7FFFFFFF));
    if (checked) { /* |y| >= 2^-6: within M of the nearest midpoint, fl(e + M) >= h - 22 ulp(y) (as
                      bits, less those of 2^E: no overflow there); the amax candidates (a > thr - 1) */
        const __m256i t = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(e), k->marg)),
                                           _mm256_and_si256(a, _mm256_set1_epi32(0x7F800000)));
        const __m256i fa = _mm256_andnot_si256(sub, _mm256_cmpgt_epi32(t, _mm256_set1_epi32(-0x020002C0 - 1)));
        f |= (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(fa, _mm256_cmpgt_epi32(a, k->thr1))));
    }
    E->emax[hh] = _mm256_max_epu32(E->emax[hh], e);
    E->sum[hh] = _mm256_add_ps(E->sum[hh], _mm256_castsi256_ps(e));
    E->e2[hh] = _mm256_add_ps(E->e2[hh], _mm256_mul_ps(ey, ey));
    return f;
}

/* row i: its w codes (checked: flags appended to c->flag from idx) */
F2_INLINE void f2_enc_row(f2_enc *E, const float *xr, const uint8_t *q0r, uint8_t *qr, size_t w, float s, float inv,
                          float ramax, int checked, const f2_chk *k, float ers, lm_fp8_cert *cert, uint32_t idx)
{
    const size_t wf = w / 16 * 16;
    for (size_t j = 0; j < wf; j += 16) {
        __m256i c0, c1;
        unsigned f = f2_enc8(E, xr + j, 0, checked, k, &c0);
        f |= f2_enc8(E, xr + j + 8, 1, checked, k, &c1) << 8;
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(c0, c1), 0xD8);
        const __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        _mm_storeu_si128((__m128i *)(void *)(qr + j), b);
        if (q0r != NULL)
            E->n_diff += 16u - (unsigned)__builtin_popcount(
                                   (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(b, _mm_loadu_si128((const __m128i *)(const void *)(q0r + j)))));
        if (checked)
            while (f) {
                cert->flag[cert->n_flag++] = idx + (uint32_t)j + (uint32_t)__builtin_ctz(f);
                f &= f - 1;
            }
    }
    if (wf == w)
        return;
    float sum[16], e2[16];
    uint32_t emax[16];
    for (int hh = 0; hh < 2; hh++) {
        _mm256_storeu_ps(sum + 8 * hh, E->sum[hh]);
        _mm256_storeu_ps(e2 + 8 * hh, E->e2[hh]);
        _mm256_storeu_si256((__m256i *)(void *)(emax + 8 * hh), E->emax[hh]);
    }
    for (size_t j = wf; j < w; j++) {
        const float xv = xr[j], y = xv * s;
        float v;
        const unsigned c = lm_fp8_encode1(y, &v);
        const float ey = f2_float(f2_bits(v) | (f2_bits(y) & 0x80000000u)) - y; /* (exact) */
        const uint32_t e = f2_bits(ey) & 0x7FFFFFFFu;
        if (checked && lm_fp8_flagged1(f2_bits(y) & 0x7FFFFFFFu, f2_float(e), ers, cert->thr))
            cert->flag[cert->n_flag++] = idx + (uint32_t)j;
        qr[j] = (uint8_t)c;
        if (q0r != NULL)
            E->n_diff += c != q0r[j];
        const size_t l = j % 16;
        emax[l] = e > emax[l] ? e : emax[l];
        sum[l] += f2_float(e);
        e2[l] += ey * ey;
    }
    for (int hh = 0; hh < 2; hh++) {
        E->sum[hh] = _mm256_loadu_ps(sum + 8 * hh);
        E->e2[hh] = _mm256_loadu_ps(e2 + 8 * hh);
        E->emax[hh] = _mm256_loadu_si256((const __m256i *)(const void *)(emax + 8 * hh));
    }
}

void lm_fp8_encode_avx2(const float *x, size_t ldx, size_t h, size_t w, float s, float inv, float ramax,
                        const uint8_t *q0, size_t ldq, uint8_t *q, size_t ldo, lm_fp8_lanes *L, lm_fp8_cert *cert)
{
    f2_enc E;
    E.s = _mm256_set1_ps(s);
    E.inv = _mm256_set1_ps(inv);
    E.ramax = _mm256_set1_ps(ramax);
    E.sum[0] = E.sum[1] = E.e2[0] = E.e2[1] = _mm256_setzero_ps();
    E.emax[0] = E.emax[1] = _mm256_setzero_si256();
    E.n_diff = 0;
    const uint32_t thr = cert != NULL ? cert->thr : 0;
    f2_chk k = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_set1_epi32(thr > 0x7FFFFFFFu ? 0x7FFFFFFF : (int)thr - 1)};
    if (cert != NULL)
        cert->n_flag = 0;
    for (size_t i = 0; i < h; i++) {
        const float *xr = x + i * ldx;
        uint8_t *qr = q + i * ldo;
        const uint8_t *q0r = q0 != NULL ? q0 + i * ldq : NULL;
        if (cert != NULL && cert->erow[i] > 0.0f) {
            const float ers = cert->erow[i] * s * 1.0001f + 0x1p-140f;
            k.ers = _mm256_set1_ps(ers);
            k.marg = _mm256_set1_ps(lm_fp8_margin(ers));
            f2_enc_row(&E, xr, q0r, qr, w, s, inv, ramax, 1, &k, ers, cert, (uint32_t)(i * w));
        } else {
            f2_enc_row(&E, xr, q0r, qr, w, s, inv, ramax, 0, &k, 0.0f, cert, 0);
        }
    }
    for (int hh = 0; hh < 2; hh++) {
        _mm256_storeu_ps(L->sum + 8 * hh, E.sum[hh]);
        _mm256_storeu_ps(L->e2 + 8 * hh, E.e2[hh]);
        _mm256_storeu_si256((__m256i *)(void *)(L->emax + 8 * hh), E.emax[hh]);
    }
    L->n_diff = E.n_diff;
}

#else
typedef int lm_fp8_avx2_unused; /* not x86: nothing to build */
#endif
