/* SPDX-License-Identifier: MIT */
/* oft.h : what BOFT shares with OFT: applying block-diagonal rotations to a tile. */
#ifndef LM_OFT_H
#define LM_OFT_H

#include "method.h"

/*! lm_rotate_blocks() : every row x of the tile becomes x @ blockdiag(R_j)^T (block j of x
 *  <- R_j @ block j); RT holds the blocks transposed, [n_rot, bs, bs] with n_rot 1 (one
 *  rotation shared by all blocks) or cols / bs.  Uses the tile's scratch. */
void lm_rotate_blocks(const lm_tile *t, const float *RT, uint64_t n_rot, uint64_t bs);

/*! lm_rotate_blocks64() : the same in f64 on an exact-path tile (y_a = sum_b R_j[a, b] x_b, b
 *  ascending, in double), RT in f64.  Uses the tile's scratch. */
void lm_rotate_blocks64(const lm_tile64 *t, const double *RT, uint64_t n_rot, uint64_t bs);

#endif
