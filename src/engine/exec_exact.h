/* SPDX-License-Identifier: MIT */
/* exec_exact.h : which certified path a computed tensor takes (issue 10: every element the exact
 * value of PEFT's formula rounded once), and the paths that are not the low-rank kernel's:
 *  - LM_EXACT_LOWRANK: every op low-rank (exec_lowrank.h: the lowrank kernel, bound + f64/exact
 *    recomputation);
 *  - LM_EXACT_SCALE: one scaling op (IA3: W * l per row or column).  The f32 product p = fl32(W l)
 *    is the exact product rounded once; rounding p to bf16/f16 is then the correctly rounded
 *    result except where p is exactly a rounding midpoint of the output dtype (the second
 *    rounding would break the tie by evenness instead of by the exact value).  Those elements are
 *    recomputed in f64 (the product of two f32 values is exact there) and p is moved one f32 ulp
 *    towards the exact product, off the midpoint, which the output rounding then resolves the
 *    right way (proof at lm_exact_scale_tile);
 *  - LM_EXACT_F64: every op is a method op with an f64 form (lm_method.apply_tile64: OFT ...) or
 *    an engine op this file computes in f64 (ROWS, LOWRANK, ADD, SCALE; NORM: LyCORIS's
 *    dora_scale after a LoHa or LoKr delta, V in f64, its norm, factor and product in f64,
 *    eps and multiplier as lycoris.c says), mixed in any order (a
 *    rotation after a LoRA of another adapter): the tile is widened to f64 exactly, the ops
 *    applied in plan order in f64, and each element rounded ONCE from f64 to the output dtype
 *    (lm_f64_round: round-to-odd to f32 then RNE, no double rounding).  Every element is
 *    computed in f64, so --json counts them all as recomputed.  The error is that of the f64
 *    evaluation of PEFT's formula (float64 noise, as issue 10 allows), never an f32 intermediate.
 *    For bf16/f16 outputs a type may offer a faster equivalent (lm_exact_certify_fast): its f32
 *    result plus a rigorous bound on the distance to the f64 value; where the bound's interval
 *    rounds to one value that is the f64 value's rounding, the rest are computed in f64 one by one
 *    (elem64), so the bytes are the f64 path's and --json counts only those as recomputed.
 *  - LM_EXACT_DORA: low-rank deltas and DoRA rescalings (LM_OP_NORM) only (exec_dora.h): f64 from
 *    the exact factors, rounded once; one low-rank op and a row NORM (PEFT's DoRA on a Linear)
 *    certified element by element by a bound, the rows it cannot certify recomputed with V in
 *    double-double;
 * A quantized base weight (t->q, exec_quant.h) takes the same paths from its dequantized tile,
 * whose values are exact f32 (every code of every format maps to one f32 value): the tensor is
 * seen as an f32 base (lm_exact_kind_of), and its exact values are rounded once to
 * lm_exact_out_dtype(): the output dtype with --dtype, or, kept quantized, the input dtype of the
 * format's requantization rule (f32; bf16 for MXFP4, whose rule rounds to bf16 first), which the
 * requantizer then applies as the library does to a tensor of those values.
 * Everything else is computed in f32 and rounded once (not certified). */
#ifndef LM_EXEC_EXACT_H
#define LM_EXEC_EXACT_H

#include "lm_kernels.h"
#include "plan.h"

typedef enum { LM_EXACT_NONE = 0, LM_EXACT_LOWRANK, LM_EXACT_SCALE, LM_EXACT_F64, LM_EXACT_DORA } lm_exact_kind;

/*! lm_exact_kind_of() : the certified path tensor t takes (LM_EXACT_NONE: the f32 path).  Depends on
 *  the plan only, so --dry-run reports what a real run does. */
lm_exact_kind lm_exact_kind_of(const lm_plan_tensor *t);

/*! lm_exact_by_copy() : 1 if t's ops only replace values (a replacement tensor, rows of trainable
 *  tokens) taken exactly in f32: the f32 path then writes every element rounded once (the base's
 *  value or the replacement's), exact with no certified path; the report counts it exact. */
int lm_exact_by_copy(const lm_plan_tensor *t);

/*! lm_exact_out_dtype() : the dtype a certified path rounds t's exact values to: t->dtype, but for
 *  a quantized weight kept quantized (t->q, t->dtype the codes' dtype) the input dtype of its
 *  format's requantization rule: LM_DT_BF16 for MXFP4 (transformers' quantize_to_mxfp4 rounds
 *  the weight to bf16 first), LM_DT_F32 for the others (their rules take the f32 merged value). */
lm_dtype lm_exact_out_dtype(const lm_plan_tensor *t);

/*! lm_exact_scale_tile() :
 *  acc [nr, cols] holds W (exact f32 values of rows r0 ..); on return acc[e] = fl32(W[e] * f)
 *  with f = s[r0 + row] (axis 0) or s[col] (axis 1), except that an element whose fl32 product
 *  is a rounding midpoint of out while the exact product is not, is moved one f32 ulp towards
 *  the exact product (only when certify).  Rounding acc to out (RNE) then gives the exact
 *  product rounded once.  @return the elements recomputed in f64 (moved or checked). */
uint64_t lm_exact_scale_tile(float *acc, uint64_t r0, uint64_t nr, uint64_t cols, const float *s, int axis,
                             lm_kdtype out, int certify);

/*! lm_exact_f64_apply() :
 *  Ops [o0, o1) of tensor t on the f64 tile (LM_EXACT_F64 tensors only: lm_exact_kind_of said
 *  so), with their prepared factors prep[n_ops].  A NORM op (LyCORIS's dora_scale on a LoHa or
 *  LoKr module: V, the value after the ops before it, rescaled): per row, each row's factor
 *  lm_dora_factor(m[row], sum of V^2 in f64); per column, col_scale (the column pass's factors,
 *  from the same f64 values: lm_exact_f64_colsumsq). */
void lm_exact_f64_apply(const lm_plan_tensor *t, const lm_prepared *prep, const double *col_scale, size_t o0,
                        size_t o1, const lm_tile64 *tile);

/*! lm_exact_f64_colsumsq() : column DoRA's pass on an LM_EXACT_F64 tensor: the tile's values
 *  after ops [0, upto) (f64), each column's squares added to ss[cols] in row order. */
void lm_exact_f64_colsumsq(const lm_plan_tensor *t, const lm_prepared *prep, size_t upto, const lm_tile64 *tile,
                           double *ss);

/* what lm_exact_certify_tile did */
typedef struct {
    uint64_t n_recomputed; /* elements the bound left uncertain: computed by elem64 in f64 */
    uint64_t n_overflow;   /* of those, a finite value beyond the output's range (written as inf) */
    uint64_t n_nonfinite;  /* of those, an inf/NaN value */
} lm_certify_stats;

/*! lm_exact_certify_fast() : 1 if tensor t (LM_EXACT_F64) may take the certified f32 form: one
 *  METHOD op with apply_tile_bound and elem64, or with certify_tile (which may be the f64 tile
 *  itself by row blocks: lm_f64_rows_tile), a bf16 or f16 output (an f32 output's f32 result is
 *  never within its own ulp: those take the f64 tile). */
int lm_exact_certify_fast(const lm_plan_tensor *t);

/*! lm_exact_certify_tile() :
 *  y [nr, cols]: the f32 results of op on rows r0 .. (apply_tile_bound), bound: their bounds, in:
 *  the input rows (f32, exact).  Writes dst (out: bf16 or f16) with RNE(y[e]) where y[e] +-
 *  bound[e] (widened by the rounding of that sum) rounds to one finite value, which is then the
 *  rounding of the f64 value; elsewhere RNE(op->method->elem64(...)), counted in st. */
void lm_exact_certify_tile(const lm_op *op, const lm_prepared *p, const float *y, const float *bound,
                           const float *in, uint64_t r0, uint64_t nr, uint64_t cols, lm_kdtype out, uint16_t *dst,
                           lm_certify_stats *st);

/*! lm_exact_is_midpoint() : 1 if the f32 value x lies exactly halfway between two neighbouring
 *  values of dtype out (bf16 or f16; an f32 output has no midpoints among f32 values), the
 *  overflow thresholds included (f16 65520, bf16 0x7F7F8000). */
int lm_exact_is_midpoint(float x, lm_kdtype out);

#endif
