/* SPDX-License-Identifier: MIT */
/* wy64_avx512.c : AVX-512 variant of lm_wy64_ref (wy64_ref.c), bit for bit: a zmm register
 * holds the eight lanes of one dot product (lane m: columns j = m mod 8), the tail columns
 * enter lanes 0 .. cols % 8 - 1 by a masked fma (the other lanes kept as they are), and the
 * lanes are summed in the reference's order.  Dot products: four rows by four unit vectors per
 * pass (sixteen independent chains); the update: four rows per pass (then two, one), sharing U's
 * loads. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T512 __attribute__((target("avx,avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define INL inline __attribute__((always_inline))

/* ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) */
static INL double T512 lanes_sum(__m512d v)
{
    const __m256d w = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    const __m128d a = _mm_add_pd(_mm256_castpd256_pd128(w), _mm256_extractf128_pd(w, 1));
    return _mm_cvtsd_f64(_mm_add_sd(a, _mm_unpackhi_pd(a, a)));
}

/* p[i * r + q0 + b] for rows i < RB, unit vectors q0 + b, b < QB */
static INL void T512 dots(const double *X, size_t cols, const double *U, size_t q0, size_t r, double *p, int RB, int QB)
{
    __m512d acc[4][4];
    const size_t n8 = cols - cols % 8;
#pragma GCC unroll 4
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 4
        for (int b = 0; b < QB; b++)
            acc[i][b] = _mm512_setzero_pd();
    for (size_t j = 0; j < n8; j += 8) {
        __m512d x[4], u[4];
#pragma GCC unroll 4
        for (int i = 0; i < RB; i++)
            x[i] = _mm512_loadu_pd(X + (size_t)i * cols + j);
#pragma GCC unroll 4
        for (int b = 0; b < QB; b++)
            u[b] = _mm512_loadu_pd(U + (q0 + (size_t)b) * cols + j);
#pragma GCC unroll 4
        for (int i = 0; i < RB; i++)
#pragma GCC unroll 4
            for (int b = 0; b < QB; b++)
                acc[i][b] = _mm512_fmadd_pd(x[i], u[b], acc[i][b]);
    }
    if (n8 < cols) {
        const __mmask8 m = (__mmask8)((1u << (cols - n8)) - 1u);
#pragma GCC unroll 4
        for (int i = 0; i < RB; i++) {
            const __m512d x = _mm512_maskz_loadu_pd(m, X + (size_t)i * cols + n8);
#pragma GCC unroll 4
            for (int b = 0; b < QB; b++)
                acc[i][b] = _mm512_mask3_fmadd_pd(x, _mm512_maskz_loadu_pd(m, U + (q0 + (size_t)b) * cols + n8),
                                                  acc[i][b], m);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 4
        for (int b = 0; b < QB; b++)
            p[(size_t)i * r + q0 + (size_t)b] = lanes_sum(acc[i][b]);
}

/* rows X[0 .. RB) -= p2 U, p2 [RB, r] */
static INL void T512 update(double *X, size_t cols, const double *U, size_t r, const double *p2, int RB)
{
    const size_t n8 = cols - cols % 8;
    for (size_t j = 0; j < n8; j += 8) {
        __m512d s[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
        for (size_t q = 0; q < r; q++) {
            const __m512d u = _mm512_loadu_pd(U + q * cols + j);
#pragma GCC unroll 4
            for (int i = 0; i < RB; i++)
                s[i] = _mm512_fmadd_pd(_mm512_set1_pd(p2[(size_t)i * r + q]), u, s[i]);
        }
#pragma GCC unroll 4
        for (int i = 0; i < RB; i++) {
            double *x = X + (size_t)i * cols + j;
            _mm512_storeu_pd(x, _mm512_sub_pd(_mm512_loadu_pd(x), s[i]));
        }
    }
    for (int i = 0; i < RB; i++)
        lm_wy64_update_ref(X + (size_t)i * cols, U, cols, r, p2 + (size_t)i * r, n8, cols);
}

void T512 lm_wy64_avx512(double *X, size_t nr, size_t cols, const double *U, size_t r, const double *T, double *scratch)
{
    double *p = scratch, *p2 = scratch + nr * r;
    const size_t r4 = r - r % 4;
    size_t i = 0;
    for (; i + 4 <= nr; i += 4) {
        size_t q = 0;
        for (; q < r4; q += 4)
            dots(X + i * cols, cols, U, q, r, p + i * r, 4, 4);
        for (; q < r; q++)
            dots(X + i * cols, cols, U, q, r, p + i * r, 4, 1);
    }
    for (; i < nr; i++) {
        size_t q = 0;
        for (; q < r4; q += 4)
            dots(X + i * cols, cols, U, q, r, p + i * r, 1, 4);
        for (; q < r; q++)
            dots(X + i * cols, cols, U, q, r, p + i * r, 1, 1);
    }
    lm_wy64_mid(p, nr, r, T, p2);
    for (i = 0; i + 4 <= nr; i += 4)
        update(X + i * cols, cols, U, r, p2 + i * r, 4);
    for (; i + 2 <= nr; i += 2)
        update(X + i * cols, cols, U, r, p2 + i * r, 2);
    for (; i < nr; i++)
        update(X + i * cols, cols, U, r, p2 + i * r, 1);
}
#endif
