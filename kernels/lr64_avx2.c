/* SPDX-License-Identifier: MIT */
/* lr64_avx2.c : AVX2 variant of lm_lr64_ref (lr64_ref.c), bit for bit: eight ymm registers hold
 * a row's 32 sums of a panel, each lane the reference's fma chain (k ascending from 0); then
 * fl(w + fl(s t)) by a multiply and an add, as the reference.  The tail panel by the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T256 __attribute__((target("avx,avx2,fma")))

void T256 lm_lr64_avx2(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb,
                       size_t n)
{
    const size_t full = n / LM_LR64_PANEL * LM_LR64_PANEL;
    const __m256d vs = _mm256_set1_pd(s);
    for (size_t j0 = 0; j0 < full; j0 += LM_LR64_PANEL) {
        const double *P = Cp + j0 * K;
        for (size_t i = 0; i < rb; i++) {
            __m256d a[8];
#pragma GCC unroll 8
            for (int q = 0; q < 8; q++)
                a[q] = _mm256_setzero_pd();
            for (size_t k = 0; k < K; k++) {
                const __m256d r = _mm256_set1_pd(R[i * K + k]);
                const double *c = P + k * LM_LR64_PANEL;
#pragma GCC unroll 8
                for (int q = 0; q < 8; q++)
                    a[q] = _mm256_fmadd_pd(r, _mm256_loadu_pd(c + 4 * q), a[q]);
            }
#pragma GCC unroll 8
            for (int q = 0; q < 8; q++) {
                const size_t e = i * n + j0 + (size_t)q * 4;
                const __m256d base = w != NULL ? _mm256_cvtps_pd(_mm_loadu_ps(w + e)) : _mm256_loadu_pd(X + e);
                _mm256_storeu_pd(X + e, _mm256_add_pd(base, _mm256_mul_pd(vs, a[q])));
            }
        }
    }
    lm_lr64_tail(X, w, s, R, Cp, K, rb, n);
}
#endif
