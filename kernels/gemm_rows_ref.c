/* SPDX-License-Identifier: MIT */
/* gemm_rows_ref.c : the row-independent product of a tile (contract in lm_kernels.h), the
 * reference: one element at a time, its terms in p order with one fused multiply-add each
 * (fmaf), then alpha * acc and beta * C + that, each rounded (the build has -ffp-contract=off).
 * The SIMD variants run the same chain per lane, so they are bit-identical; nothing depends on
 * how many rows a call covers, so a tile's bytes do not depend on the tile height. */
#include "lm_kernels.h"

#include <math.h>

void lm_gemm_rows_ref(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha, const float *A,
                      size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc)
{
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            float acc = 0.0f;
            for (size_t p = 0; p < k; p++)
                acc = fmaf(trans_a ? A[p * lda + i] : A[i * lda + p], trans_b ? B[j * ldb + p] : B[p * ldb + j], acc);
            float *c = C + i * ldc + j;
            const float x = alpha * acc;
            *c = beta == 0.0f ? x : beta == 1.0f ? *c + x : beta * *c + x;
        }
}
