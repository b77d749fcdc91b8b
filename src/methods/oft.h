/* SPDX-License-Identifier: MIT */
/* oft.h : what BOFT shares with OFT: applying block-diagonal rotations to a tile. */
#ifndef LM_OFT_H
#define LM_OFT_H

#include "method.h"

/*! lm_rotate_blocks() : every row x of the tile becomes x @ blockdiag(R_j)^T (block j of x
 *  <- R_j @ block j); RT holds the blocks transposed, [n_rot, bs, bs] with n_rot 1 (one
 *  rotation shared by all blocks) or cols / bs.  Uses the tile's scratch. */
void lm_rotate_blocks(const lm_tile *t, const float *RT, uint64_t n_rot, uint64_t bs);

/* a tensor's rotations as the three paths use them (p->data of OFT and BOFT) */
typedef struct lm_rot_prep {
    const float *RT;    /* [n_rot, bs, bs] transposed, f32 (the fast path) */
    const double *RT64; /* the same in f64 (the exact path) */
    const double *R64;  /* [n_rot, bs, bs] not transposed (lm_rot_elem64 reads a row of R_j) */
    const float *DT;    /* [n_rot, bs, bs] transposed, f32: R64 - I rounded (the certified form) */
    const float *dn;    /* [n_rot, bs]: ||row a of D_j||_2 rounded up, plus 2^-100 (its bound) */
    uint64_t n_rot, bs;
} lm_rot_prep;

/*! lm_rot_prep_make() : p->data <- an lm_rot_prep of RT (f32) and RT64, owned by p.  LM_OK or
 *  LM_E_NOMEM */
lm_code lm_rot_prep_make(lm_prepared *p, const float *RT, const double *RT64, uint64_t n_rot, uint64_t bs, lm_err *err);

/*! lm_rotate_blocks_bound() : the rotation in f32 as x + (R - I) x (the f32 result in t->acc)
 *  and bound[e] >= |acc[e] - the exact sum of R64 x| and >= |acc[e] - the value
 *  lm_rotate_blocks64 computes| (the fmaf chain's roundings, D's rounding to f32, the last sum,
 *  the f64 sums', by Cauchy-Schwarz with the block norm of D; underflow included; inf or NaN
 *  when the norm overflows) */
void lm_rotate_blocks_bound(const lm_tile *t, const lm_rot_prep *rp, float *bound);

/*! lm_rot_certify_tile() : lm_rotate_blocks_bound (then, row_scale not NULL, each row r times
 *  row_scale[r] with boft_apply_bound's bound) and the engine's certification (exec_exact.h) in one
 *  sweep over the tile: the certify_tile hook of OFT and BOFT (method.h), p->data an lm_rot_prep.
 *  raw not NULL: the certify_raw hook, the input rows from raw (dtype in), converted 8 rows at a
 *  time; n_changed (or NULL, in == out only) gets the output elements whose bits differ from raw's */
int lm_rot_certify_tile(const lm_op *op, const lm_prepared *p, const float *row_scale, const lm_tile *t,
                        const void *raw, lm_kdtype in, lm_kdtype out, uint16_t *dst, lm_cert_counts *st,
                        uint64_t *n_changed);

/*! lm_rot_elem64() : element col of a row x (f32 values) after the rotation, in f64 (four
 *  chains: b = m mod 4, then (s0 + s1) + (s2 + s3); within the bound's f64 term) */
double lm_rot_elem64(const lm_rot_prep *rp, const float *x, uint64_t col);

/*! lm_rotate_blocks64() : the same in f64 on an exact-path tile (y_a = sum_b R_j[a, b] x_b, b
 *  ascending, in double), RT in f64.  Uses the tile's scratch. */
void lm_rotate_blocks64(const lm_tile64 *t, const double *RT, uint64_t n_rot, uint64_t bs);

#endif
