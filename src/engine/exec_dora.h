/* SPDX-License-Identifier: MIT */
/* exec_dora.h : the executor's certified path for a tensor whose ops are low-rank deltas and DoRA
 * rescalings only (LM_OP_LOWRANK covering every row, LM_OP_NORM: PEFT's DoRA per output row or per
 * column, LyCORIS's with eps, groups of columns and its multiplier), several adapters in any order.
 * Every element is PEFT's formula evaluated in f64 from the exact factors and rounded once:
 * x = W, then per op in order x += s (B A)[i, :] (the method's a64/b64 or its f32 values, exact
 * in f64; one fma per term, k ascending, in blocks of rows that share the factors' panels),
 * x *= m / (||x|| + eps) (the row's norm: squares summed in eight lanes) or LyCORIS's mix, or
 * x *= the column factor (column DoRA: norms of whole columns from the column pass, in f64 too);
 * each element rounded once from f64 (round to odd to f32, then to nearest even).
 * For a tensor with one low-rank op and one row NORM (PEFT's DoRA on a Linear layer, LyCORIS's
 * with wd_on_out) each element is also certified: a rigorous bound on |exact - computed| (proof
 * in exec_dora.c) shows both ends rounding to the value written.  A row holding an element it
 * cannot certify (cancellation, a tie within the bound, overflow) is computed again with V in
 * double-double, then rounded once from f64; those rows' elements, and every element of other op
 * lists (stacked adapters, column DoRA), are counted ("recomputed").  Same IEEE operations in
 * every build and kernel variant, and a row's values never depend on the tiles: the same bytes
 * everywhere.  Cost: the f64 product is K fmas per element at 8 lanes, twice the f32 kernel's
 * work; on the 1.1B bench it alone is about the whole LoRA merge's CPU time. */
#ifndef LM_EXEC_DORA_H
#define LM_EXEC_DORA_H

#include "lm_error.h"
#include "lm_kernels.h"
#include "method.h"
#include "plan.h"

typedef struct lm_dora_tensor lm_dora_tensor;

typedef struct lm_dora_stats {
    uint64_t n_uncertified;    /* elements rounded from f64 without a certificate */
    uint64_t rows_uncertified; /* rows holding one */
    uint64_t n_overflow;  /* finite values beyond the output's range (written as inf) */
    uint64_t n_nonfinite; /* inf or NaN results */
    uint64_t n_changed;   /* elements written whose bits differ from base's (when given) */
} lm_dora_stats;

/*! lm_dora_tensor_eligible() : 1 if tensor t takes this path: bf16/f16/f32 base and output, not
 *  quantized, every op LOWRANK (its factors cover the whole 2-D view) or NORM (magnitudes in
 *  bf16/f16/f32) but a REPLACE first (modules_to_save, trainable tokens: the tiles start from the
 *  replacement), at least one NORM. */
int lm_dora_tensor_eligible(const lm_plan_tensor *t);

/*! lm_dora_tensor_create() : the f64 factors of t's low-rank ops in the tiles' orientation, and
 *  the fast pass's bound factors when it applies (out: the output dtype).  t and prep (the ops'
 *  prepared factors, prep[o] for op o) are borrowed until lm_dora_tensor_free().  NULL with *err
 *  when out of memory. */
lm_dora_tensor *lm_dora_tensor_create(const lm_plan_tensor *t, const lm_prepared *prep, lm_kdtype out, lm_err *err);
void lm_dora_tensor_free(lm_dora_tensor *f);

/*! lm_dora_col_sumsq() : column DoRA's pass: rows r0 .. r0+nr of the value before the column NORM
 *  op (ops 0 .. upto-1, in f64; w: the base rows in f32, exact), each column's squares added to
 *  ss[cols] in row order.  @return 0, -1 when out of memory */
int lm_dora_col_sumsq(const lm_dora_tensor *f, const float *w, uint64_t r0, uint64_t nr, size_t upto, double *ss);

/*! lm_dora_tensor_run() : rows r0 .. r0+nr of the tensor from the base rows w (f32, exact) to out
 *  (out_dtype, as written), col_scale: the column factors (f64) when the tensor has a column NORM.
 *  w NULL: the base rows are raw, the input bytes in the tensor's src dtype (bf16, f16 or f32),
 *  converted a block of rows at a time (while in cache).  base (or NULL): the base rows in
 *  out_dtype, then st->n_changed counts the elements written that differ from them.
 *  ws: lm_dora_ws_doubles(nr, cols) doubles.  st: counters added to.  @return 0, -1 out of memory */
int lm_dora_tensor_run(const lm_dora_tensor *f, const lm_kernels *k, const float *w, const void *raw, uint64_t r0,
                       uint64_t nr, const double *col_scale, void *out, lm_kdtype out_dtype, const void *base,
                       double *ws, lm_dora_stats *st);
/*! lm_dora_ws_doubles() : the workspace of lm_dora_tensor_run() for nr rows (at most 2 nr cols) */
size_t lm_dora_ws_doubles(uint64_t nr, uint64_t cols);

/*! lm_dora_factor() : the DoRA factor of a row (or column) whose squared norm is ss: m / (sqrt(ss) +
 *  op->eps), or LyCORIS's op->scale (f - 1) + 1 when op->mix; NaN when ss is not finite (a delta
 *  that overflows: the caller's non-finite check refuses it).  Used by the f32 and exact paths. */
double lm_dora_factor(const lm_op *op, double m, double ss);

#endif
