/* SPDX-License-Identifier: MIT */
/* gemm_tile.c : see gemm_tile.h.  The tile products are our own row-independent loops (the
 * output must not depend on the tile height, issue 15); whole-matrix products go to BLAS. */
#include "gemm_tile.h"

#include <cblas.h>
#include <stdio.h>
#include <string.h>

/* OpenBLAS's pthread build starts its own worker threads when it loads; they spin (sched_yield)
 * for a while before sleeping, taking CPU from lora-merge's own workers even though every
 * sgemm here runs single-threaded.  Where the library exports its shutdown (a weak reference:
 * other builds simply lack it), stop them; OpenBLAS restarts them itself if ever needed. */
extern int blas_thread_shutdown_(void) __attribute__((weak));

void lm_blas_single_thread(void)
{
    openblas_set_num_threads(1);
    if (blas_thread_shutdown_ != NULL)
        blas_thread_shutdown_();
}

const char *lm_blas_name(void)
{
    static char buf[128];
    if (buf[0] == '\0') {
        const char *cfg = openblas_get_config();
        snprintf(buf, sizeof buf, "%s (core %s)", cfg ? cfg : "OpenBLAS ?", openblas_get_corename());
    }
    return buf;
}

/* Row-independent product (see gemm_tile.h): every element is
 *   C[i,j] = beta * C[i,j] + alpha * (((0 + a(i,0) b(0,j)) + a(i,1) b(1,j)) + ... + a(i,k-1) b(k-1,j))
 * in exactly this order, each product rounded (the build has -ffp-contract=off), whatever m, the
 * blocking or the vector width the compiler picks: the loops below only choose which elements
 * advance together.  BLAS picks its kernels by shape, so its rows change with the tile height. */
#define RB 4u   /* rows per block */
#define JB 64u  /* columns per block */
#define KB 128u /* op(B) rows packed at a time (transposed B) */

/* same operations in every clone (no FMA: -ffp-contract=off, and "avx2" does not enable FMA) */
__attribute__((target_clones("avx2", "default"))) static void rows_block(int trans_a, int trans_b, size_t i0, size_t ri, size_t j0, size_t nj, size_t k,
                       const float *A, size_t lda, const float *B, size_t ldb, float acc[RB][JB])
{
    float bt[KB][JB];
    for (size_t p0 = 0; p0 < k; p0 += KB) {
        size_t np = k - p0 < KB ? k - p0 : KB;
        if (trans_b)
            for (size_t jj = 0; jj < nj; jj++)
                for (size_t p = 0; p < np; p++)
                    bt[p][jj] = B[(j0 + jj) * ldb + p0 + p];
        for (size_t p = 0; p < np; p++) {
            const float *b = trans_b ? bt[p] : B + (p0 + p) * ldb + j0;
            for (size_t r = 0; r < ri; r++) {
                const float a = trans_a ? A[(p0 + p) * lda + i0 + r] : A[(i0 + r) * lda + p0 + p];
                for (size_t jj = 0; jj < nj; jj++)
                    acc[r][jj] += a * b[jj];
            }
        }
    }
}

void lm_sgemm_rows(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha, const float *A,
                   size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc)
{
    for (size_t i0 = 0; i0 < m; i0 += RB) {
        size_t ri = m - i0 < RB ? m - i0 : RB;
        for (size_t j0 = 0; j0 < n; j0 += JB) {
            size_t nj = n - j0 < JB ? n - j0 : JB;
            float acc[RB][JB];
            memset(acc, 0, sizeof acc);
            rows_block(trans_a, trans_b, i0, ri, j0, nj, k, A, lda, B, ldb, acc);
            for (size_t r = 0; r < ri; r++) {
                float *c = C + (i0 + r) * ldc + j0;
                for (size_t jj = 0; jj < nj; jj++)
                    c[jj] = beta == 0.0f ? alpha * acc[r][jj]
                            : beta == 1.0f ? c[jj] + alpha * acc[r][jj] : beta * c[jj] + alpha * acc[r][jj];
            }
        }
    }
}

void lm_gemm_tile_nn(float *W, size_t rows, size_t cols, const float *B, const float *A, size_t r,
                     float s)
{
    lm_sgemm_rows(0, 0, rows, cols, r, s, B, r, A, cols, 1.0f, W, cols);
}

void lm_gemm_tile_tt(float *W, size_t rows, size_t cols, const float *A_col0, size_t lda,
                     const float *B, size_t r, float s)
{
    lm_sgemm_rows(1, 1, rows, cols, r, s, A_col0, lda, B, r, 1.0f, W, cols);
}

void lm_sgemm_rm(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha, const float *A, size_t lda,
                 const float *B, size_t ldb, float beta, float *C, size_t ldc)
{
    if (m == 0 || n == 0)
        return;
    if (k == 0) { /* BLAS leaves C * beta; say so explicitly (beta 0 must clear NaNs too) */
        for (size_t i = 0; i < m; i++)
            for (size_t j = 0; j < n; j++)
                C[i * ldc + j] = beta == 0.0f ? 0.0f : C[i * ldc + j] * beta;
        return;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, (blasint)m,
                (blasint)n, (blasint)k, alpha, A, (blasint)lda, B, (blasint)ldb, beta, C, (blasint)ldc);
}
