/* SPDX-License-Identifier: MIT */
/* rotate_avx2.c : AVX2+FMA variant of rotate_ref.c, bit for bit: each output lane runs the
 * reference's fmaf chain (vfmadd, same operands, same order).  Eight rows of a block are done
 * together, so eight independent chains hide the FMA latency; 8 lanes at a time, the rest in
 * the reference. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <string.h>

#define T256 __attribute__((target("avx,avx2,fma")))

/* rows x[0..8) (row stride cols) of one block, lanes [a0, a0 + 8) into y (8 rows, row stride ys;
 * y may be x itself: every load comes before the stores); the accumulators stay in registers (a
 * constant row count) */
void T256 lm_rot_lanes8x8_avx2(const float *x, size_t cols, const float *R, size_t bs, size_t a0, float *y, size_t ys)
{
    __m256 v0 = _mm256_setzero_ps(), v1 = v0, v2 = v0, v3 = v0, v4 = v0, v5 = v0, v6 = v0, v7 = v0;
    for (size_t b = 0; b < bs; b++) {
        const __m256 c = _mm256_loadu_ps(R + b * bs + a0);
        v0 = _mm256_fmadd_ps(c, _mm256_set1_ps(x[b]), v0);
        v1 = _mm256_fmadd_ps(c, _mm256_set1_ps(x[cols + b]), v1);
        v2 = _mm256_fmadd_ps(c, _mm256_set1_ps(x[2 * cols + b]), v2);
        v3 = _mm256_fmadd_ps(c, _mm256_set1_ps(x[3 * cols + b]), v3);
        v4 = _mm256_fmadd_ps(c, _mm256_set1_ps(x[4 * cols + b]), v4);
        v5 = _mm256_fmadd_ps(c, _mm256_set1_ps(x[5 * cols + b]), v5);
        v6 = _mm256_fmadd_ps(c, _mm256_set1_ps(x[6 * cols + b]), v6);
        v7 = _mm256_fmadd_ps(c, _mm256_set1_ps(x[7 * cols + b]), v7);
    }
    _mm256_storeu_ps(y + a0, v0);
    _mm256_storeu_ps(y + ys + a0, v1);
    _mm256_storeu_ps(y + 2 * ys + a0, v2);
    _mm256_storeu_ps(y + 3 * ys + a0, v3);
    _mm256_storeu_ps(y + 4 * ys + a0, v4);
    _mm256_storeu_ps(y + 5 * ys + a0, v5);
    _mm256_storeu_ps(y + 6 * ys + a0, v6);
    _mm256_storeu_ps(y + 7 * ys + a0, v7);
}

/* one row, lanes [a0, a0 + 8) */
void T256 lm_rot_lanes8x1_avx2(const float *x, const float *R, size_t bs, size_t a0, float *y)
{
    __m256 v = _mm256_setzero_ps();
    for (size_t b = 0; b < bs; b++)
        v = _mm256_fmadd_ps(_mm256_loadu_ps(R + b * bs + a0), _mm256_set1_ps(x[b]), v);
    _mm256_storeu_ps(y + a0, v);
}

void T256 lm_rot_blocks_to_avx2(const float *src, float *dst, size_t n_rows, size_t cols, const float *RT,
                                size_t n_rot, size_t bs, float *y)
{
    size_t nb = cols / bs, full8 = bs - bs % 8;
    for (size_t j = 0; j < nb; j++) {
        const float *R = RT + (n_rot == 1 ? 0 : j) * bs * bs;
        for (size_t r = 0; r < n_rows; r += 8) {
            size_t g = n_rows - r < 8 ? n_rows - r : 8;
            const float *x = src + r * cols + j * bs;
            float *d = dst + r * cols + j * bs;
            if (bs == 8) { /* one lane group: the results straight into d */
                if (g == 8)
                    lm_rot_lanes8x8_avx2(x, cols, R, bs, 0, d, cols);
                else
                    for (size_t i = 0; i < g; i++)
                        lm_rot_lanes8x1_avx2(x + i * cols, R, bs, 0, d + i * cols);
                continue;
            }
            for (size_t a = 0; a < full8; a += 8) {
                if (g == 8)
                    lm_rot_lanes8x8_avx2(x, cols, R, bs, a, y, bs);
                else
                    for (size_t i = 0; i < g; i++)
                        lm_rot_lanes8x1_avx2(x + i * cols, R, bs, a, y + i * bs);
            }
            for (size_t i = 0; i < g; i++)
                lm_rot_block_lanes_ref(x + i * cols, R, bs, full8, bs, y + i * bs);
            for (size_t i = 0; i < g; i++)
                memcpy(d + i * cols, y + i * bs, bs * sizeof *d);
        }
    }
}

void T256 lm_rot_blocks_avx2(float *acc, size_t n_rows, size_t cols, const float *RT, size_t n_rot, size_t bs,
                             float *y)
{
    lm_rot_blocks_to_avx2(acc, acc, n_rows, cols, RT, n_rot, bs, y);
}
#endif
