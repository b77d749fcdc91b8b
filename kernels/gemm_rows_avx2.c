/* SPDX-License-Identifier: MIT */
/* gemm_rows_avx2.c : AVX2+FMA variant of the row-independent tile product, bit for bit the
 * reference (gemm_rows_ref.c): every lane runs its element's chain of fused multiply-adds in p
 * order.  Blocks of 4 rows x 24 columns (12 accumulators; 8 rows x 8 when op(B) is narrow) stay
 * in registers over p; the last vector of a row is masked. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define GR2_TARGET __attribute__((target("avx,avx2,fma")))
#define GR2_INLINE static inline __attribute__((always_inline)) GR2_TARGET
#define GR2_NV 3 /* vectors of 8 columns per block */

typedef struct gr2_args {
    int ta, tb;
    size_t k, lda, ldb, ldc;
    float alpha, beta;
    const float *A, *B;
    float *C;
    __m256i idx; /* transposed B: lane l reads column l of the vector, l * ldb floats along */
} gr2_args;

static const int32_t gr2_ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* lanes of row p of op(B), columns j .. j + 7 (mask m) */
GR2_INLINE __m256 gr2_b(const gr2_args *g, size_t p, size_t j, __m256i m)
{
    if (g->tb)
        return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), g->B + j * g->ldb + p, g->idx, _mm256_castsi256_ps(m), 4);
    return _mm256_maskload_ps(g->B + p * g->ldb + j, m);
}

/* rows i0 .. i0 + mr, columns j0 .. j0 + 8 nv (the last vector masked by `last`); mr <= 8,
 * mr * nv <= 12; constants at every call */
GR2_INLINE void gr2_block(const gr2_args *g, size_t i0, size_t mr, size_t j0, size_t nv, __m256i last)
{
    const __m256i all = _mm256_set1_epi32(-1);
    __m256 acc[8][GR2_NV];
#pragma GCC unroll 8
    for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 3
        for (size_t v = 0; v < nv; v++)
            acc[r][v] = _mm256_setzero_ps();
    for (size_t p = 0; p < g->k; p++) {
        __m256 b[GR2_NV];
#pragma GCC unroll 3
        for (size_t v = 0; v < nv; v++)
            b[v] = gr2_b(g, p, j0 + 8 * v, v + 1 == nv ? last : all);
#pragma GCC unroll 8
        for (size_t r = 0; r < mr; r++) {
            const __m256 a = _mm256_set1_ps(g->ta ? g->A[p * g->lda + i0 + r] : g->A[(i0 + r) * g->lda + p]);
#pragma GCC unroll 3
            for (size_t v = 0; v < nv; v++)
                acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
        }
    }
    const __m256 al = _mm256_set1_ps(g->alpha), be = _mm256_set1_ps(g->beta);
#pragma GCC unroll 8
    for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 3
        for (size_t v = 0; v < nv; v++) {
            const __m256i m = v + 1 == nv ? last : all;
            float *c = g->C + (i0 + r) * g->ldc + j0 + 8 * v;
            __m256 x = _mm256_mul_ps(al, acc[r][v]);
            if (g->beta == 1.0f)
                x = _mm256_add_ps(_mm256_maskload_ps(c, m), x);
            else if (g->beta != 0.0f)
                x = _mm256_add_ps(_mm256_mul_ps(be, _mm256_maskload_ps(c, m)), x);
            _mm256_maskstore_ps(c, m, x);
        }
}

GR2_INLINE void gr2_panel(const gr2_args *g, size_t m, size_t j0, size_t nv, __m256i last)
{
    size_t i = 0;
    if (nv == 1)
        for (; i + 8 <= m; i += 8)
            gr2_block(g, i, 8, j0, 1, last);
    for (; i + 4 <= m; i += 4)
        gr2_block(g, i, 4, j0, nv, last);
    for (; i < m; i++)
        gr2_block(g, i, 1, j0, nv, last);
}

void GR2_TARGET lm_gemm_rows_avx2(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha,
                                  const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C,
                                  size_t ldc)
{
    if (trans_b && ldb > ((size_t)1 << 24)) { /* gather offsets are 32-bit */
        lm_gemm_rows_ref(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    gr2_args g = {trans_a, trans_b, k, lda, ldb, ldc, alpha, beta, A, B, C,
                  _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)ldb))};
    for (size_t j0 = 0; j0 < n; j0 += 8 * GR2_NV) {
        const size_t nj = n - j0 < 8 * GR2_NV ? n - j0 : 8 * GR2_NV, nv = (nj + 7) / 8;
        const __m256i last = _mm256_loadu_si256((const __m256i *)(gr2_ones + 8 - (nj % 8 ? nj % 8 : 8)));
        if (nv == 3)
            gr2_panel(&g, m, j0, 3, last);
        else if (nv == 2)
            gr2_panel(&g, m, j0, 2, last);
        else
            gr2_panel(&g, m, j0, 1, last);
    }
}

#else
typedef int lm_gemm_rows_avx2_unused; /* not x86: nothing to build */
#endif
