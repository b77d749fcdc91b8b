/* SPDX-License-Identifier: MIT */
/* rotate_ref.c : block-diagonal products of a row tile, the reference (OFT, BOFT): every row x
 * becomes x @ blockdiag(R_j)^T, i.e. block j of the row y_a = sum_b R_j[a, b] x_b, accumulated
 * in b order with one fused multiply-add per term (fmaf), starting from 0.  The SIMD variants
 * run the same chain per output lane, so they are bit-identical.  RT holds the blocks
 * transposed (RT_j[b, a] = R_j[a, b]) so that a lane's coefficients are contiguous. */
#include "lm_kernels.h"

#include <math.h>
#include <string.h>

/* lanes [a0, a1) of block `blk` of one row, into y (bs floats) */
void lm_rot_block_lanes_ref(const float *x, const float *RT, size_t bs, size_t a0, size_t a1, float *y)
{
    for (size_t a = a0; a < a1; a++) {
        float v = 0.0f;
        for (size_t b = 0; b < bs; b++)
            v = fmaf(RT[b * bs + a], x[b], v);
        y[a] = v;
    }
}

void lm_rot_blocks_to_ref(const float *src, float *dst, size_t n_rows, size_t cols, const float *RT, size_t n_rot,
                          size_t bs, float *y)
{
    size_t nb = cols / bs;
    for (size_t r = 0; r < n_rows; r++)
        for (size_t j = 0; j < nb; j++) {
            lm_rot_block_lanes_ref(src + r * cols + j * bs, RT + (n_rot == 1 ? 0 : j) * bs * bs, bs, 0, bs, y);
            memcpy(dst + r * cols + j * bs, y, bs * sizeof *dst);
        }
}

void lm_rot_blocks_ref(float *acc, size_t n_rows, size_t cols, const float *RT, size_t n_rot, size_t bs, float *y)
{
    lm_rot_blocks_to_ref(acc, acc, n_rows, cols, RT, n_rot, bs, y);
}
