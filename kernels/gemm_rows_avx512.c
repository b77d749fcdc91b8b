/* SPDX-License-Identifier: MIT */
/* gemm_rows_avx512.c : AVX-512F variant of the row-independent tile product, bit for bit the
 * reference (gemm_rows_ref.c): every lane runs its element's chain of fused multiply-adds in p
 * order.  Blocks of 4 rows x 64 columns (16 accumulators; 8 rows x 16 when op(B) is narrow) stay
 * in registers over p; op(B)'s row is loaded (or gathered, transposed B) once per block and
 * serves every row; the last vector of a row is masked. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define GR5_TARGET __attribute__((target("avx,avx2,fma,avx512f")))
#define GR5_INLINE static inline __attribute__((always_inline)) GR5_TARGET
#define GR5_NV 4 /* vectors of 16 columns per block */

typedef struct gr5_args {
    int ta, tb;
    size_t k, lda, ldb, ldc;
    float alpha, beta;
    const float *A, *B;
    float *C;
    __m512i idx; /* transposed B: lane l reads column l of the block, l * ldb floats along */
} gr5_args;

/* lanes of row p of op(B), columns j .. j + 15 (mask m) */
GR5_INLINE __m512 gr5_b(const gr5_args *g, size_t p, size_t j, __mmask16 m)
{
    if (g->tb)
        return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, g->idx, g->B + j * g->ldb + p, 4);
    return _mm512_maskz_loadu_ps(m, g->B + p * g->ldb + j);
}

/* rows i0 .. i0 + mr, columns j0 .. j0 + 16 nv (the last vector masked by `last`); mr <= 8,
 * mr * nv <= 16; both constants at every call, so acc[][] lives in registers */
GR5_INLINE void gr5_block(const gr5_args *g, size_t i0, size_t mr, size_t j0, size_t nv, __mmask16 last)
{
    __m512 acc[8][GR5_NV];
#pragma GCC unroll 8
    for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 4
        for (size_t v = 0; v < nv; v++)
            acc[r][v] = _mm512_setzero_ps();
    for (size_t p = 0; p < g->k; p++) {
        __m512 b[GR5_NV];
#pragma GCC unroll 4
        for (size_t v = 0; v < nv; v++)
            b[v] = gr5_b(g, p, j0 + 16 * v, v + 1 == nv ? last : 0xFFFF);
#pragma GCC unroll 8
        for (size_t r = 0; r < mr; r++) {
            const __m512 a = _mm512_set1_ps(g->ta ? g->A[p * g->lda + i0 + r] : g->A[(i0 + r) * g->lda + p]);
#pragma GCC unroll 4
            for (size_t v = 0; v < nv; v++)
                acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
        }
    }
    const __m512 al = _mm512_set1_ps(g->alpha), be = _mm512_set1_ps(g->beta);
#pragma GCC unroll 8
    for (size_t r = 0; r < mr; r++)
#pragma GCC unroll 4
        for (size_t v = 0; v < nv; v++) {
            const __mmask16 m = v + 1 == nv ? last : 0xFFFF;
            float *c = g->C + (i0 + r) * g->ldc + j0 + 16 * v;
            __m512 x = _mm512_mul_ps(al, acc[r][v]);
            if (g->beta == 1.0f)
                x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c), x);
            else if (g->beta != 0.0f)
                x = _mm512_add_ps(_mm512_mul_ps(be, _mm512_maskz_loadu_ps(m, c)), x);
            _mm512_mask_storeu_ps(c, m, x);
        }
}

/* one panel of columns for every row: blocks of rows, then the rows left one by one */
GR5_INLINE void gr5_panel(const gr5_args *g, size_t m, size_t j0, size_t nv, __mmask16 last)
{
    size_t i = 0;
    if (nv == 1)
        for (; i + 8 <= m; i += 8)
            gr5_block(g, i, 8, j0, 1, last);
    for (; i + 4 <= m; i += 4)
        gr5_block(g, i, 4, j0, nv, last);
    for (; i < m; i++)
        gr5_block(g, i, 1, j0, nv, last);
}

void GR5_TARGET lm_gemm_rows_avx512(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha,
                                    const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C,
                                    size_t ldc)
{
    if (trans_b && ldb > ((size_t)1 << 24)) { /* gather offsets are 32-bit */
        lm_gemm_rows_ref(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    gr5_args g = {trans_a, trans_b, k, lda, ldb, ldc, alpha, beta, A, B, C,
                  _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32((int)ldb))};
    for (size_t j0 = 0; j0 < n; j0 += 16 * GR5_NV) {
        const size_t nj = n - j0 < 16 * GR5_NV ? n - j0 : 16 * GR5_NV, nv = (nj + 15) / 16;
        const __mmask16 last = nj % 16 ? (__mmask16)((1u << (nj % 16)) - 1) : (__mmask16)0xFFFF;
        if (nv == 4)
            gr5_panel(&g, m, j0, 4, last);
        else if (nv == 3)
            gr5_panel(&g, m, j0, 3, last);
        else if (nv == 2)
            gr5_panel(&g, m, j0, 2, last);
        else
            gr5_panel(&g, m, j0, 1, last);
    }
}

#else
typedef int lm_gemm_rows_avx512_unused; /* not x86: nothing to build */
#endif
