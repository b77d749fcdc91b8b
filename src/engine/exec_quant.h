/* SPDX-License-Identifier: MIT */
/* exec_quant.h : the executor's side of quantized base weights: a tile's codes to f32 (exact),
 * and the merged tile back to codes and scales with the format's rule.  The only place the
 * executor learns about formats: every function dispatches on t->q->fmt. */
#ifndef LM_EXEC_QUANT_H
#define LM_EXEC_QUANT_H

#include "plan.h"

/* requantized scales to write: n_bytes at byte offset `offset` inside plan tensor `tensor` */
typedef struct {
    size_t tensor;
    uint64_t offset;
    size_t n_bytes;
    const void *bytes;
} lm_xq_piece;

/*! lm_xq_load_scales() : the whole scale grid of t as f32 (malloc'd into *scales), converted
 *  exactly from the scale dtype, then the second (global) scales at [srows * scols] (1 when the
 *  format has none), then room for their amaxes.  @return LM_OK, or LM_E_NOMEM */
lm_code lm_xq_load_scales(const lm_plan_tensor *t, const lm_model *model, float **scales, lm_err *err);

/*! lm_xq_amax_slots() : how many amaxes requantizing t needs (q->needs_amax): one per second
 *  scale (an NVFP4 expert stack: one per expert), else one */
size_t lm_xq_amax_slots(const lm_plan_tensor *t);
/*! lm_xq_tile_amax() : the merged rows acc [r0, r0 + nr) into slots[lm_xq_amax_slots()] (as the
 *  bits of |x|: a max over them is the max of |x|, NaN above inf) */
void lm_xq_tile_amax(const lm_plan_tensor *t, const float *acc, uint64_t r0, uint64_t nr, uint32_t *slots);
/*! lm_xq_set_amax() : the merged amaxes (q->needs_amax, lm_xq_amax_slots() of them) into the
 *  loaded scales */
void lm_xq_set_amax(const lm_plan_tensor *t, float *scales, const float *amax);

/*! lm_xq_dequant() : rows [r0, r0 + nr) of t from their codes src (q->row_bytes a row) to f32 dst */
void lm_xq_dequant(const lm_plan_tensor *t, const float *scales, const uint8_t *src, uint64_t r0, uint64_t nr,
                   float *dst);

/*! lm_xq_qbuf_floats() : floats the requantizer's buffer needs for a tile of max_elems elements */
size_t lm_xq_qbuf_floats(size_t max_elems);

/*! lm_xq_requant() : the merged rows acc back to codes (out, q->row_bytes a row) and new scales;
 *  codes0: the base's codes of the same rows; qbuf (lm_xq_qbuf_floats()): the tile's new scales
 *  in f32 and in their dtype.  pieces receives the scale bytes to write (at most 2).
 *  @return the number of pieces */
size_t lm_xq_requant(const lm_plan_tensor *t, const float *scales, const float *acc, const uint8_t *codes0,
                     uint64_t r0, uint64_t nr, uint8_t *out, float *qbuf, lm_qstats *st, lm_xq_piece pieces[2]);

/* the ops of a tile on rows [rr, rr + h) of it, columns [c0, c0 + w) only (elementwise ops) */
typedef void (*lm_xq_apply_fn)(void *ctx, uint64_t rr, uint64_t h, uint64_t c0, uint64_t w);

/*! lm_xq_fused() : 1 when lm_xq_merge_tile() does t's tiles (block FP8 kept quantized), given
 *  that its ops are elementwise (each merged element depends on its own base element only) */
int lm_xq_fused(const lm_plan_tensor *t);

/* a fused tensor's one low-rank op (exec.c op_lowrank, not transposed): rows row0 .. row0 + n - 1
 * of the tensor get alpha * B A, B [n, K] and A [K, cols] row-major f32, by gemm_rows' chains */
typedef struct lm_xq_bound lm_xq_bound;
typedef struct lm_xq_term {
    const float *B, *A;
    uint64_t K, row0, n;
    float alpha;
    double s;                 /* the op's scale (alpha = fl32(s)) */
    const float *Ap;          /* A packed by column block (lm_xq_pack_a), or NULL: packed per block */
    const lm_xq_bound *bound; /* NULL: the f32 values requantized (not certified) */
    lm_fp8_exact_fn exact;    /* with bound: the exact values (lm_fp8_bound) */
    void *ctx;
} lm_xq_term;

/*! lm_xq_bound_make() : the certification's bound factors of a fused tensor's term (B, A, K of
 *  term, its scale s: alpha = fl32(s)), for lm_xq_merge_tile() (exec_quant.c has the bound).
 *  @return NULL when out of memory or when the term's form is outside the proof (K, s) */
lm_xq_bound *lm_xq_bound_make(const lm_plan_tensor *t, const lm_xq_term *term);

/*! lm_xq_pack_a() : the term's A [K, cols] packed once per tensor for lm_xq_merge_tile(): column
 *  block b (bc = t->q->bc columns, w of them for the last) as K rows of w floats at b K bc.
 *  @return malloc'ed, or NULL when out of memory */
float *lm_xq_pack_a(const lm_plan_tensor *t, const lm_xq_term *term);

/*! lm_xq_exact() : the term's element (row, col) (cols a row, column blocks of bc: term->Ap's
 *  layout) merged into its base value w exactly, rounded
 *  once to f32 into *x, when an f64 evaluation with its error bound settles it.  @return 0, or -1
 *  (then the low-rank path's exact value: lm_lowrank_tensor_exact_f32()) */
int lm_xq_exact(const lm_xq_term *term, uint64_t cols, uint64_t bc, uint64_t row, uint64_t col, float w, float *x);
void lm_xq_bound_free(lm_xq_bound *b);

/*! lm_xq_merge_tile() : dequantize, merge and requantize rows [r0, r0 + nr) block by block while
 *  each block is in the cache: the block's codes (codes0) to f32 into acc (the tile, row stride
 *  cols), apply(ctx, ...) on it, then its new codes and scale as lm_xq_requant() would (the same
 *  bytes, scales and st).  With term (t's only op: apply's effect) and kernels k that have
 *  fp8_merge, each block instead in two passes of those (lm_fp8_merge_block), the merged values
 *  in qbuf; with term->bound, certified (the rule on the exact values, lm_fp8_merge_block(); the
 *  elements made exact counted in st->n_exact).  acc ends as the merged tile when some block is
 *  not finite (st->n_nonfinite_blocks; always without term).  @return the number of pieces */
size_t lm_xq_merge_tile(const lm_plan_tensor *t, const lm_kernels *k, const float *scales, const uint8_t *codes0,
                        uint64_t r0, uint64_t nr, float *acc, const lm_xq_term *term, lm_xq_apply_fn apply, void *ctx,
                        uint8_t *out, float *qbuf, lm_qstats *st, lm_xq_piece pieces[2]);

/*! lm_xq_dequant_written() : the values lm_xq_requant() wrote (codes out, scales in qbuf) as f32 */
void lm_xq_dequant_written(const lm_plan_tensor *t, const float *qbuf, const uint8_t *out, uint64_t r0,
                           uint64_t nr, float *dst);

#endif
