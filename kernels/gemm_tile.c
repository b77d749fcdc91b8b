/* SPDX-License-Identifier: MIT */
/* gemm_tile.c : see gemm_tile.h.  The tile products are the kernels' row-independent product
 * (lm_kernels.gemm_rows: the output must not depend on the tile height); whole-matrix products
 * go to BLAS. */
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

void lm_gemm_tile_nn(const lm_kernels *k, float *W, size_t rows, size_t cols, const float *B, const float *A,
                     size_t r, float s)
{
    k->gemm_rows(0, 0, rows, cols, r, s, B, r, A, cols, 1.0f, W, cols);
}

void lm_gemm_tile_tt(const lm_kernels *k, float *W, size_t rows, size_t cols, const float *A_col0, size_t lda,
                     const float *B, size_t r, float s)
{
    k->gemm_rows(1, 1, rows, cols, r, s, A_col0, lda, B, r, 1.0f, W, cols);
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
