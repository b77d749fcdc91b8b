/* SPDX-License-Identifier: MIT */
/* lr64_avx512.c : AVX-512 variant of lm_lr64_ref (lr64_ref.c), bit for bit: four zmm registers
 * hold a row's 32 sums of a panel, each lane the reference's fma chain (k ascending from 0);
 * four rows per pass share the panel's loads (sixteen independent chains); then fl(w + fl(s t))
 * by a multiply and an add, as the reference.  The row sums of squares as the panels are
 * stored: a panel's four vectors hold columns j0 + 8q .. j0 + 8q + 7, lanes j mod 8 of ssx's
 * eight lanes (one register per row) and, alternately, lanes 0-7 and 8-15 of ssw's sixteen (two
 * registers per row), each lane's squares added in column order as the reference's.  Rows in
 * groups of eight (their lanes on the stack across panels); the tail panel by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T512 __attribute__((target("avx,avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define INL inline __attribute__((always_inline))

enum { GR = 8 }; /* rows per group */

typedef struct {
    __m512d x[GR], w0[GR], w1[GR]; /* per row: ssx's lanes, ssw's lanes 0-7 and 8-15 */
} lanes;

/* row i's four sums of the panel stored (columns j0 ..): X = fl(base + fl(s t)), squares added */
static INL void T512 store_row(double *X, const float *w, __m512d vs, __m512d t0, __m512d t1, __m512d t2, __m512d t3,
                               size_t j0, int sq, int hw, __m512d *lx, __m512d *lw0, __m512d *lw1)
{
    const __m512d t[4] = {t0, t1, t2, t3};
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        const size_t e = j0 + (size_t)q * 8;
        const __m512d base = hw ? _mm512_cvtps_pd(_mm256_loadu_ps(w + e)) : _mm512_loadu_pd(X + e);
        const __m512d x = _mm512_add_pd(base, _mm512_mul_pd(vs, t[q]));
        _mm512_storeu_pd(X + e, x);
        if (sq) {
            *lx = _mm512_add_pd(*lx, _mm512_mul_pd(x, x));
            if (hw) {
                if (q % 2 == 0)
                    *lw0 = _mm512_add_pd(*lw0, _mm512_mul_pd(base, base));
                else
                    *lw1 = _mm512_add_pd(*lw1, _mm512_mul_pd(base, base));
            }
        }
    }
}

#define FMA4(a0, a1, a2, a3, r)                                                                                        \
    do {                                                                                                               \
        a0 = _mm512_fmadd_pd(r, c0, a0);                                                                               \
        a1 = _mm512_fmadd_pd(r, c1, a1);                                                                               \
        a2 = _mm512_fmadd_pd(r, c2, a2);                                                                               \
        a3 = _mm512_fmadd_pd(r, c3, a3);                                                                               \
    } while (0)

/* rows i .. i+3 of the group (X, w, R at row i) over the panel at column j0 */
static INL void T512 rows4(double *X, const float *w, __m512d vs, const double *R, const double *P, size_t K, size_t n,
                           size_t j0, int sq, int hw, lanes *L, size_t i)
{
    __m512d a00 = _mm512_setzero_pd(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512d a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    const double *R0 = R, *R1 = R + K, *R2 = R + 2 * K, *R3 = R + 3 * K;
    for (size_t k = 0; k < K; k++) {
        const double *c = P + k * LM_LR64_PANEL;
        const __m512d c0 = _mm512_loadu_pd(c), c1 = _mm512_loadu_pd(c + 8), c2 = _mm512_loadu_pd(c + 16),
                      c3 = _mm512_loadu_pd(c + 24);
        FMA4(a00, a01, a02, a03, _mm512_set1_pd(R0[k]));
        FMA4(a10, a11, a12, a13, _mm512_set1_pd(R1[k]));
        FMA4(a20, a21, a22, a23, _mm512_set1_pd(R2[k]));
        FMA4(a30, a31, a32, a33, _mm512_set1_pd(R3[k]));
    }
    store_row(X, w, vs, a00, a01, a02, a03, j0, sq, hw, &L->x[i], &L->w0[i], &L->w1[i]);
    store_row(X + n, hw ? w + n : NULL, vs, a10, a11, a12, a13, j0, sq, hw, &L->x[i + 1], &L->w0[i + 1], &L->w1[i + 1]);
    store_row(X + 2 * n, hw ? w + 2 * n : NULL, vs, a20, a21, a22, a23, j0, sq, hw, &L->x[i + 2], &L->w0[i + 2],
              &L->w1[i + 2]);
    store_row(X + 3 * n, hw ? w + 3 * n : NULL, vs, a30, a31, a32, a33, j0, sq, hw, &L->x[i + 3], &L->w0[i + 3],
              &L->w1[i + 3]);
}

static INL void T512 rows1(double *X, const float *w, __m512d vs, const double *R, const double *P, size_t K,
                           size_t j0, int sq, int hw, lanes *L, size_t i)
{
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t k = 0; k < K; k++) {
        const double *c = P + k * LM_LR64_PANEL;
        const __m512d c0 = _mm512_loadu_pd(c), c1 = _mm512_loadu_pd(c + 8), c2 = _mm512_loadu_pd(c + 16),
                      c3 = _mm512_loadu_pd(c + 24);
        FMA4(a0, a1, a2, a3, _mm512_set1_pd(R[k]));
    }
    store_row(X, w, vs, a0, a1, a2, a3, j0, sq, hw, &L->x[i], &L->w0[i], &L->w1[i]);
}

/* the group's full panels; sq, hw: compile-time constants in each call (squares wanted, w given) */
static INL void T512 panels(double *X, const float *w, __m512d vs, const double *R, const double *Cp, size_t K,
                            size_t rb, size_t n, int sq, int hw, lanes *L)
{
    const size_t full = n / LM_LR64_PANEL * LM_LR64_PANEL;
    for (size_t j0 = 0; j0 < full; j0 += LM_LR64_PANEL) {
        const double *P = Cp + j0 * K;
        size_t i = 0;
        for (; i + 4 <= rb; i += 4)
            rows4(X + i * n, hw ? w + i * n : NULL, vs, R + i * K, P, K, n, j0, sq, hw, L, i);
        for (; i < rb; i++)
            rows1(X + i * n, hw ? w + i * n : NULL, vs, R + i * K, P, K, j0, sq, hw, L, i);
    }
}

static void T512 group(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb,
                       size_t n, double *ssx, double *ssw)
{
    const __m512d vs = _mm512_set1_pd(s);
    const int sq = ssx != NULL || ssw != NULL;
    lanes L;
    for (size_t i = 0; i < GR; i++)
        L.x[i] = L.w0[i] = L.w1[i] = _mm512_setzero_pd();
    if (w != NULL && sq)
        panels(X, w, vs, R, Cp, K, rb, n, 1, 1, &L);
    else if (w != NULL)
        panels(X, w, vs, R, Cp, K, rb, n, 0, 1, &L);
    else if (sq)
        panels(X, NULL, vs, R, Cp, K, rb, n, 1, 0, &L);
    else
        panels(X, NULL, vs, R, Cp, K, rb, n, 0, 0, &L);
    lm_lr64_tail(X, w, s, R, Cp, K, rb, n);
    for (size_t i = 0; sq && i < rb; i++) {
        double lx[8], lw[16];
        _mm512_storeu_pd(lx, L.x[i]);
        _mm512_storeu_pd(lw, L.w0[i]);
        _mm512_storeu_pd(lw + 8, L.w1[i]);
        lm_lr64_tail_sumsq(X + i * n, w ? w + i * n : NULL, n, lx, w ? lw : NULL);
        if (ssx != NULL)
            ssx[i] = lm_lr64_lanes8(lx);
        if (ssw != NULL && w != NULL)
            ssw[i] = lm_sumsq_lanes(lw);
    }
}

void T512 lm_lr64_avx512(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb,
                         size_t n, double *ssx, double *ssw)
{
    for (size_t i0 = 0; i0 < rb; i0 += GR)
        group(X + i0 * n, w ? w + i0 * n : NULL, s, R + i0 * K, Cp, K, rb - i0 < GR ? rb - i0 : GR, n,
              ssx ? ssx + i0 : NULL, ssw ? ssw + i0 : NULL);
}
#endif
