/* SPDX-License-Identifier: MIT */
/* lr64_avx512.c : AVX-512 variant of lm_lr64_ref (lr64_ref.c), bit for bit: four zmm registers
 * hold a row's 32 sums of a panel, each lane the reference's fma chain (k ascending from 0);
 * four rows per pass share the panel's loads (sixteen independent chains); then fl(w + fl(s t))
 * by a multiply and an add, as the reference.  The tail panel by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T512 __attribute__((target("avx,avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define INL inline __attribute__((always_inline))

static INL void T512 rows_panel(double *X, const float *w, __m512d vs, const double *R, const double *P, size_t K,
                                size_t n, size_t j0, int RB)
{
    __m512d a[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++)
            a[i][q] = _mm512_setzero_pd();
    for (size_t k = 0; k < K; k++) {
        const double *c = P + k * LM_LR64_PANEL;
        const __m512d c0 = _mm512_loadu_pd(c), c1 = _mm512_loadu_pd(c + 8), c2 = _mm512_loadu_pd(c + 16),
                      c3 = _mm512_loadu_pd(c + 24);
#pragma GCC unroll 4
        for (int i = 0; i < RB; i++) {
            const __m512d r = _mm512_set1_pd(R[(size_t)i * K + k]);
            a[i][0] = _mm512_fmadd_pd(r, c0, a[i][0]);
            a[i][1] = _mm512_fmadd_pd(r, c1, a[i][1]);
            a[i][2] = _mm512_fmadd_pd(r, c2, a[i][2]);
            a[i][3] = _mm512_fmadd_pd(r, c3, a[i][3]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
            const size_t e = (size_t)i * n + j0 + (size_t)q * 8;
            const __m512d base = w != NULL ? _mm512_cvtps_pd(_mm256_loadu_ps(w + e)) : _mm512_loadu_pd(X + e);
            _mm512_storeu_pd(X + e, _mm512_add_pd(base, _mm512_mul_pd(vs, a[i][q])));
        }
}

void T512 lm_lr64_avx512(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb,
                         size_t n)
{
    const size_t full = n / LM_LR64_PANEL * LM_LR64_PANEL;
    const __m512d vs = _mm512_set1_pd(s);
    for (size_t j0 = 0; j0 < full; j0 += LM_LR64_PANEL) {
        const double *P = Cp + j0 * K;
        size_t i = 0;
        for (; i + 4 <= rb; i += 4)
            rows_panel(X + i * n, w ? w + i * n : NULL, vs, R + i * K, P, K, n, j0, 4);
        for (; i < rb; i++)
            rows_panel(X + i * n, w ? w + i * n : NULL, vs, R + i * K, P, K, n, j0, 1);
    }
    lm_lr64_tail(X, w, s, R, Cp, K, rb, n);
}
#endif
