/* SPDX-License-Identifier: MIT */
/* gemm_tile.h : the low-rank product of one row tile (the kernels' row-independent product) and
 * whole-matrix products through BLAS.  gemm_tile.c is the only file that includes cblas.h. */
#ifndef LM_GEMM_TILE_H
#define LM_GEMM_TILE_H

#include <stddef.h>

#include "lm_kernels.h"

/* Process-wide: OpenBLAS's own threads off (lora-merge's OpenMP workers call it). */
void lm_blas_single_thread(void);
/* a function of the dlopen'd OpenBLAS (its LAPACK too: "dgesdd_"), or NULL when the library or
 * the symbol is missing */
void *lm_blas_sym(const char *name);
/* "OpenBLAS 0.3.21 ..." (static storage) */
const char *lm_blas_name(void);

/* The tile products are row-independent: a row's values depend on that row's inputs only, never
 * on how many rows the call covers (so never on the tile size, the thread count or the kernel
 * variant): k->gemm_rows sums each element over k in order, one fused multiply-add per term.
 * W[rows, cols] += s * B[rows, r] @ A[r, cols]            (Linear, conv: W stored [out, in])
 * B points at the tile's first row of B (ld r); A has leading dimension cols. */
void lm_gemm_tile_nn(const lm_kernels *k, float *W, size_t rows, size_t cols, const float *B, const float *A,
                     size_t r, float s);

/* W[rows, cols] += s * (A[:, row0 : row0+rows])^T @ B^T  (Conv1D, Embedding: W stored [in, out])
 * A_col0 = A + row0, A has leading dimension lda (= in); B is [cols, r]. */
void lm_gemm_tile_tt(const lm_kernels *k, float *W, size_t rows, size_t cols, const float *A_col0, size_t lda,
                     const float *B, size_t r, float s);

/* C[m, n] = alpha * op(A) @ op(B) + beta * C, row-major, op = transpose when trans_* is set
 * (op(A) is [m, k], op(B) is [k, n]); single-threaded like the others. */
void lm_sgemm_rm(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha, const float *A, size_t lda,
                 const float *B, size_t ldb, float beta, float *C, size_t ldc);

#endif
