/* SPDX-License-Identifier: MIT */
/* wy64_avx2.c : AVX2 variant of lm_wy64_ref (wy64_ref.c), bit for bit: two ymm registers hold
 * the eight lanes of one dot product (lanes 0-3 and 4-7), the tail columns go through the
 * reference's scalar fma into the lanes, which are summed in the reference's order.  Dot
 * products: two rows by two unit vectors per pass; the update: two rows per pass. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <math.h>

#define T256 __attribute__((target("avx,avx2,fma")))
#define INL inline __attribute__((always_inline))

static INL void T256 dots(const double *X, size_t cols, const double *U, size_t q0, size_t r, double *p, int RB, int QB)
{
    __m256d lo[2][2], hi[2][2];
    const size_t n8 = cols - cols % 8;
#pragma GCC unroll 2
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 2
        for (int b = 0; b < QB; b++)
            lo[i][b] = hi[i][b] = _mm256_setzero_pd();
    for (size_t j = 0; j < n8; j += 8) {
#pragma GCC unroll 2
        for (int i = 0; i < RB; i++) {
            const __m256d xl = _mm256_loadu_pd(X + (size_t)i * cols + j), xh = _mm256_loadu_pd(X + (size_t)i * cols + j + 4);
#pragma GCC unroll 2
            for (int b = 0; b < QB; b++) {
                const double *u = U + (q0 + (size_t)b) * cols + j;
                lo[i][b] = _mm256_fmadd_pd(xl, _mm256_loadu_pd(u), lo[i][b]);
                hi[i][b] = _mm256_fmadd_pd(xh, _mm256_loadu_pd(u + 4), hi[i][b]);
            }
        }
    }
#pragma GCC unroll 2
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 2
        for (int b = 0; b < QB; b++) {
            double l[8];
            _mm256_storeu_pd(l, lo[i][b]);
            _mm256_storeu_pd(l + 4, hi[i][b]);
            const double *x = X + (size_t)i * cols, *u = U + (q0 + (size_t)b) * cols;
            for (size_t j = n8; j < cols; j++)
                l[j - n8] = fma(x[j], u[j], l[j - n8]);
            p[(size_t)i * r + q0 + (size_t)b] = lm_dot8_lanes(l);
        }
}

static INL void T256 update(double *X, size_t cols, const double *U, size_t r, const double *p2, int RB)
{
    const size_t n4 = cols - cols % 4;
    for (size_t j = 0; j < n4; j += 4) {
        __m256d s[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
        for (size_t q = 0; q < r; q++) {
            const __m256d u = _mm256_loadu_pd(U + q * cols + j);
#pragma GCC unroll 2
            for (int i = 0; i < RB; i++)
                s[i] = _mm256_fmadd_pd(_mm256_set1_pd(p2[(size_t)i * r + q]), u, s[i]);
        }
#pragma GCC unroll 2
        for (int i = 0; i < RB; i++) {
            double *x = X + (size_t)i * cols + j;
            _mm256_storeu_pd(x, _mm256_sub_pd(_mm256_loadu_pd(x), s[i]));
        }
    }
    for (int i = 0; i < RB; i++)
        lm_wy64_update_ref(X + (size_t)i * cols, U, cols, r, p2 + (size_t)i * r, n4, cols);
}

void T256 lm_wy64_avx2(double *X, size_t nr, size_t cols, const double *U, size_t r, const double *T, double *scratch)
{
    double *p = scratch, *p2 = scratch + nr * r;
    const size_t r2 = r - r % 2;
    size_t i = 0;
    for (; i + 2 <= nr; i += 2) {
        size_t q = 0;
        for (; q < r2; q += 2)
            dots(X + i * cols, cols, U, q, r, p + i * r, 2, 2);
        for (; q < r; q++)
            dots(X + i * cols, cols, U, q, r, p + i * r, 2, 1);
    }
    for (; i < nr; i++) {
        size_t q = 0;
        for (; q < r2; q += 2)
            dots(X + i * cols, cols, U, q, r, p + i * r, 1, 2);
        for (; q < r; q++)
            dots(X + i * cols, cols, U, q, r, p + i * r, 1, 1);
    }
    lm_wy64_mid(p, nr, r, T, p2);
    for (i = 0; i + 2 <= nr; i += 2)
        update(X + i * cols, cols, U, r, p2 + i * r, 2);
    for (; i < nr; i++)
        update(X + i * cols, cols, U, r, p2 + i * r, 1);
}
#endif
