/* SPDX-License-Identifier: MIT */
/* rotate_avx512.c : AVX-512 variant of rotate_ref.c, bit for bit: each output lane runs the
 * reference's fmaf chain (vfmadd, same operands, same order).  Eight rows of a block are done
 * together, so eight independent chains hide the FMA latency; 16 lanes at a time, then 8,
 * then the reference for the rest. */
#include "lm_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <string.h>

#define T512 __attribute__((target("avx,avx2,fma,avx512f")))

/* rows x[0..8) (row stride cols) of one block, lanes [a0, a0 + 16) into y (8 rows, row stride
 * ys; y may be x itself: every load comes before the stores); the accumulators stay in registers
 * (a constant row count) */
static inline void T512 lanes16x8(const float *x, size_t cols, const float *R, size_t bs, size_t a0, float *y,
                                  size_t ys)
{
    __m512 v0 = _mm512_setzero_ps(), v1 = v0, v2 = v0, v3 = v0, v4 = v0, v5 = v0, v6 = v0, v7 = v0;
    for (size_t b = 0; b < bs; b++) {
        const __m512 c = _mm512_loadu_ps(R + b * bs + a0);
        v0 = _mm512_fmadd_ps(c, _mm512_set1_ps(x[b]), v0);
        v1 = _mm512_fmadd_ps(c, _mm512_set1_ps(x[cols + b]), v1);
        v2 = _mm512_fmadd_ps(c, _mm512_set1_ps(x[2 * cols + b]), v2);
        v3 = _mm512_fmadd_ps(c, _mm512_set1_ps(x[3 * cols + b]), v3);
        v4 = _mm512_fmadd_ps(c, _mm512_set1_ps(x[4 * cols + b]), v4);
        v5 = _mm512_fmadd_ps(c, _mm512_set1_ps(x[5 * cols + b]), v5);
        v6 = _mm512_fmadd_ps(c, _mm512_set1_ps(x[6 * cols + b]), v6);
        v7 = _mm512_fmadd_ps(c, _mm512_set1_ps(x[7 * cols + b]), v7);
    }
    _mm512_storeu_ps(y + a0, v0);
    _mm512_storeu_ps(y + ys + a0, v1);
    _mm512_storeu_ps(y + 2 * ys + a0, v2);
    _mm512_storeu_ps(y + 3 * ys + a0, v3);
    _mm512_storeu_ps(y + 4 * ys + a0, v4);
    _mm512_storeu_ps(y + 5 * ys + a0, v5);
    _mm512_storeu_ps(y + 6 * ys + a0, v6);
    _mm512_storeu_ps(y + 7 * ys + a0, v7);
}

/* one row, lanes [a0, a0 + 16) */
static inline void T512 lanes16x1(const float *x, const float *R, size_t bs, size_t a0, float *y)
{
    __m512 v = _mm512_setzero_ps();
    for (size_t b = 0; b < bs; b++)
        v = _mm512_fmadd_ps(_mm512_loadu_ps(R + b * bs + a0), _mm512_set1_ps(x[b]), v);
    _mm512_storeu_ps(y + a0, v);
}

void T512 lm_rot_blocks_to_avx512(const float *src, float *dst, size_t n_rows, size_t cols, const float *RT,
                                  size_t n_rot, size_t bs, float *y)
{
    size_t nb = cols / bs, full16 = bs - bs % 16, full8 = bs - bs % 8;
    for (size_t j = 0; j < nb; j++) {
        const float *R = RT + (n_rot == 1 ? 0 : j) * bs * bs;
        for (size_t r = 0; r < n_rows; r += 8) {
            size_t g = n_rows - r < 8 ? n_rows - r : 8;
            const float *x = src + r * cols + j * bs;
            float *d = dst + r * cols + j * bs;
            if (bs == 16 || bs == 8) { /* one lane group: the results straight into d */
                for (size_t i = 0; i < (g == 8 ? 1 : g); i++) {
                    const float *xi = x + i * cols;
                    float *di = d + i * cols;
                    if (bs == 16 && g == 8)
                        lanes16x8(xi, cols, R, bs, 0, di, cols);
                    else if (bs == 16)
                        lanes16x1(xi, R, bs, 0, di);
                    else if (g == 8)
                        lm_rot_lanes8x8_avx2(xi, cols, R, bs, 0, di, cols);
                    else
                        lm_rot_lanes8x1_avx2(xi, R, bs, 0, di);
                }
                continue;
            }
            /* another destination, a block of whole lane groups (OFT's 32): the results straight
             * into d (no input is overwritten); else through y, the tail lanes by the reference */
            const int direct = dst != src && full8 == bs;
            float *yo = direct ? d : y;
            const size_t ys = direct ? cols : bs;
            size_t a = 0;
            for (; a < full16; a += 16) {
                if (g == 8)
                    lanes16x8(x, cols, R, bs, a, yo, ys);
                else
                    for (size_t i = 0; i < g; i++)
                        lanes16x1(x + i * cols, R, bs, a, yo + i * ys);
            }
            for (; a < full8; a += 8) { /* the AVX2 code (VEX encoded, same results) */
                if (g == 8)
                    lm_rot_lanes8x8_avx2(x, cols, R, bs, a, yo, ys);
                else
                    for (size_t i = 0; i < g; i++)
                        lm_rot_lanes8x1_avx2(x + i * cols, R, bs, a, yo + i * ys);
            }
            if (direct)
                continue;
            for (size_t i = 0; i < g; i++)
                lm_rot_block_lanes_ref(x + i * cols, R, bs, a, bs, y + i * bs);
            for (size_t i = 0; i < g; i++)
                memcpy(d + i * cols, y + i * bs, bs * sizeof *d);
        }
    }
}

void T512 lm_rot_blocks_avx512(float *acc, size_t n_rows, size_t cols, const float *RT, size_t n_rot, size_t bs,
                               float *y)
{
    lm_rot_blocks_to_avx512(acc, acc, n_rows, cols, RT, n_rot, bs, y);
}
#endif
