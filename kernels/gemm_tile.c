/* SPDX-License-Identifier: MIT */
/* gemm_tile.c : see gemm_tile.h.  The tile products are the kernels' row-independent product
 * (lm_kernels.gemm_rows: the output must not depend on the tile height); whole-matrix products
 * go to BLAS. */
#include "gemm_tile.h"

#include <cblas.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* OpenBLAS is loaded on first use, never at start-up: when linked, its constructor starts a
 * thread pool and allocates its buffers before main, and under `ulimit -v` 70-150 MB a worker
 * retried a 128 MB allocation forever (`--version` hung; issue 15).  The engine's tile products
 * are the kernels' own (gemm_rows), so a merge never needs it; lm_sgemm_rm (the benchmark's
 * comparison) and the version line load it, single-threaded. */
typedef void (*sgemm_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, blasint, blasint, blasint,
                         float, const float *, blasint, const float *, blasint, float, float *, blasint);
static struct {
    void *handle;
    sgemm_fn sgemm;
    char *(*config)(void);
    char *(*corename)(void);
} blas;
static pthread_once_t blas_once = PTHREAD_ONCE_INIT;

static void blas_load(void)
{
    setenv("OPENBLAS_NUM_THREADS", "1", 1); /* read by its constructor: no thread pool */
    void *h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    if (h == NULL)
        h = dlopen("libopenblas.so", RTLD_NOW | RTLD_LOCAL);
    if (h == NULL)
        return;
    blas.handle = h;
    void (*set_threads)(int) = (void (*)(int))dlsym(h, "openblas_set_num_threads");
    if (set_threads != NULL)
        set_threads(1);
    blas.config = (char *(*)(void))dlsym(h, "openblas_get_config");
    blas.corename = (char *(*)(void))dlsym(h, "openblas_get_corename");
    blas.sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
}

void *lm_blas_sym(const char *name)
{
    pthread_once(&blas_once, blas_load);
    return blas.handle != NULL ? dlsym(blas.handle, name) : NULL;
}

void lm_blas_single_thread(void)
{
    /* nothing to do: OpenBLAS is loaded single-threaded, and only if something uses it */
}

const char *lm_blas_name(void)
{
    static char buf[128];
    pthread_once(&blas_once, blas_load);
    if (buf[0] == '\0') {
        const char *cfg = blas.config ? blas.config() : NULL;
        if (blas.sgemm == NULL)
            snprintf(buf, sizeof buf, "OpenBLAS not loaded: %s", "libopenblas.so.0 unavailable");
        else
            snprintf(buf, sizeof buf, "%s (core %s)", cfg ? cfg : "OpenBLAS ?",
                     blas.corename ? blas.corename() : "?");
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
    pthread_once(&blas_once, blas_load);
    if (blas.sgemm == NULL) { /* no OpenBLAS on this system: the same product, plain loops */
        for (size_t i = 0; i < m; i++)
            for (size_t j = 0; j < n; j++) {
                float acc = 0.0f;
                for (size_t p = 0; p < k; p++)
                    acc += (trans_a ? A[p * lda + i] : A[i * lda + p]) * (trans_b ? B[j * ldb + p] : B[p * ldb + j]);
                C[i * ldc + j] = (beta == 0.0f ? 0.0f : beta * C[i * ldc + j]) + alpha * acc;
            }
        return;
    }
    blas.sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, (blasint)m,
               (blasint)n, (blasint)k, alpha, A, (blasint)lda, B, (blasint)ldb, beta, C, (blasint)ldc);
}
