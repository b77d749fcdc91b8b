/* SPDX-License-Identifier: MIT */
/* lr64_avx2.c : AVX2 variant of lm_lr64_ref (lr64_ref.c), bit for bit: eight ymm registers hold
 * a row's 32 sums of a panel, each lane the reference's fma chain (k ascending from 0); then
 * fl(w + fl(s t)) by a multiply and an add, as the reference.  The row sums of squares as the
 * panels are stored: vector q holds columns j0 + 4q .. j0 + 4q + 3, lanes 4 (q mod 2) .. of ssx's
 * eight and 4 (q mod 4) .. of ssw's sixteen, each lane's squares added in column order as the
 * reference's (the lanes in memory across panels).  The tail panel by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T256 __attribute__((target("avx,avx2,fma")))
#define INL inline __attribute__((always_inline))

/* one row's full panels; sq, hw: compile-time constants in each call (squares wanted, w given) */
static INL void T256 row(double *X, const float *w, __m256d vs, const double *R, const double *Cp, size_t K, size_t n,
                         int sq, int hw, double *lx, double *lw)
{
    const size_t full = n / LM_LR64_PANEL * LM_LR64_PANEL;
    __m256d x0 = _mm256_setzero_pd(), x1 = x0, w0 = x0, w1 = x0, w2 = x0, w3 = x0;
    for (size_t j0 = 0; j0 < full; j0 += LM_LR64_PANEL) {
        const double *P = Cp + j0 * K;
        __m256d a[8];
#pragma GCC unroll 8
        for (int q = 0; q < 8; q++)
            a[q] = _mm256_setzero_pd();
        for (size_t k = 0; k < K; k++) {
            const __m256d r = _mm256_set1_pd(R[k]);
            const double *c = P + k * LM_LR64_PANEL;
#pragma GCC unroll 8
            for (int q = 0; q < 8; q++)
                a[q] = _mm256_fmadd_pd(r, _mm256_loadu_pd(c + 4 * q), a[q]);
        }
#pragma GCC unroll 8
        for (int q = 0; q < 8; q++) {
            const size_t e = j0 + (size_t)q * 4;
            const __m256d base = hw ? _mm256_cvtps_pd(_mm_loadu_ps(w + e)) : _mm256_loadu_pd(X + e);
            const __m256d x = _mm256_add_pd(base, _mm256_mul_pd(vs, a[q]));
            _mm256_storeu_pd(X + e, x);
            if (sq) {
                const __m256d xx = _mm256_mul_pd(x, x);
                if (q % 2 == 0)
                    x0 = _mm256_add_pd(x0, xx);
                else
                    x1 = _mm256_add_pd(x1, xx);
            }
            if (sq && hw) {
                const __m256d ww = _mm256_mul_pd(base, base);
                if (q % 4 == 0)
                    w0 = _mm256_add_pd(w0, ww);
                else if (q % 4 == 1)
                    w1 = _mm256_add_pd(w1, ww);
                else if (q % 4 == 2)
                    w2 = _mm256_add_pd(w2, ww);
                else
                    w3 = _mm256_add_pd(w3, ww);
            }
        }
    }
    _mm256_storeu_pd(lx, x0);
    _mm256_storeu_pd(lx + 4, x1);
    _mm256_storeu_pd(lw, w0);
    _mm256_storeu_pd(lw + 4, w1);
    _mm256_storeu_pd(lw + 8, w2);
    _mm256_storeu_pd(lw + 12, w3);
}

void T256 lm_lr64_avx2(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb,
                       size_t n, double *ssx, double *ssw)
{
    const __m256d vs = _mm256_set1_pd(s);
    const int sq = ssx != NULL || ssw != NULL;
    for (size_t i = 0; i < rb; i++) {
        double lx[8], lw[16];
        double *x = X + i * n;
        const double *r = R + i * K;
        if (w != NULL && sq)
            row(x, w + i * n, vs, r, Cp, K, n, 1, 1, lx, lw);
        else if (w != NULL)
            row(x, w + i * n, vs, r, Cp, K, n, 0, 1, lx, lw);
        else if (sq)
            row(x, NULL, vs, r, Cp, K, n, 1, 0, lx, lw);
        else
            row(x, NULL, vs, r, Cp, K, n, 0, 0, lx, lw);
        if (!sq)
            continue;
        lm_lr64_tail(x, w ? w + i * n : NULL, s, r, Cp, K, 1, n);
        lm_lr64_tail_sumsq(x, w ? w + i * n : NULL, n, lx, w ? lw : NULL);
        if (ssx != NULL)
            ssx[i] = lm_lr64_lanes8(lx);
        if (ssw != NULL && w != NULL)
            ssw[i] = lm_sumsq_lanes(lw);
    }
    if (!sq)
        lm_lr64_tail(X, w, s, R, Cp, K, rb, n);
}
#endif
