/* SPDX-License-Identifier: MIT */
/* exec_lowrank.h : the executor's correctly rounded path for a tensor whose every op is a
 * low-rank delta (LoRA, AdaLoRA, VeRA, DeLoRA, GraLoRA, RandLoRA, VB-LoRA: LM_OP_LOWRANK), of the
 * whole tensor or of a block of its rows (op->row0: the experts of a fused MoE stack).  Per block
 * of rows that the same ops change, the terms of those ops (several adapters included) are
 * concatenated along k with their own scales, in f64 (the prepared factors, exact, or the method's own f64 factors), and each row tile
 * goes through the lowrank kernel from the base bytes straight to the output bytes: every element
 * is the exact value rounded once (kernels/lm_kernels.h).  Other tensors keep the f32 path. */
#ifndef LM_EXEC_LOWRANK_H
#define LM_EXEC_LOWRANK_H

#include "lm_error.h"
#include "lm_kernels.h"
#include "method.h"
#include "plan.h"

typedef struct lm_lowrank_tensor lm_lowrank_tensor;

/*! lm_lowrank_tensor_eligible() : 1 if tensor t takes this path: a base tensor in bf16, f16 or
 *  f32, output in one of those, every op LM_OP_LOWRANK with factors that fit its 2-D view, every
 *  row changed by some op. */
int lm_lowrank_tensor_eligible(const lm_plan_tensor *t);

/*! lm_lowrank_tensor_create() :
 *  The state of tensor t's exact path: per block of rows that the same ops change, the f64
 *  factors of those ops (from prep[o], the op's method prepare) in the kernel's layout, built
 *  when a tile first reaches the block and freed after its last row.  flags: the kernel flags
 *  every lm_lowrank_tensor_run() of it will pass (LM_LOWRANK_UNCERTIFIED, exactness off: only
 *  what that kernel reads is prepared, and lm_lowrank_tensor_exact_f32() must not be called).
 *  @return the state, or NULL with *err (out of memory).  Ownership: lm_lowrank_tensor_free(); t
 *  and prep are borrowed until then. */
lm_lowrank_tensor *lm_lowrank_tensor_create(const lm_plan_tensor *t, const lm_prepared *prep, unsigned flags,
                                            lm_err *err);
void lm_lowrank_tensor_free(lm_lowrank_tensor *f);

/*! lm_lowrank_tensor_warm() : builds now the factors of the segment holding row r0 (the first
 *  tile's run would), so that a thread can make them ahead of the tiles.  @return 0, -1 when out
 *  of memory (the tile that needs them says so). */
int lm_lowrank_tensor_warm(lm_lowrank_tensor *f, uint64_t r0);

/*! lm_lowrank_tensor_run() : rows r0 .. r0+nr of the tensor through the kernel k->lowrank, from
 *  the base bytes w (w_dtype, row-major, cols per row) to out (out_dtype): one call per block of
 *  rows whose ops are the same (st: counters added to).  Every row of the tensor is computed
 *  exactly once, by any thread.  @return 0, or -1 when out of memory (building a block) */
int lm_lowrank_tensor_run(lm_lowrank_tensor *f, const lm_kernels *k, uint64_t r0, uint64_t nr, const void *w,
                          lm_kdtype w_dtype, void *out, lm_kdtype out_dtype, uint64_t cols, unsigned flags,
                          lm_lowrank_stats *st);

/*! lm_lowrank_tensor_exact_f32() : element (row, col)'s exact merged value rounded once to f32
 *  into *x (w: its base value), for a caller that computes the rows some other way (the rows
 *  stay counted as not done until lm_lowrank_tensor_done()).  @return 0, -1 when out of memory */
int lm_lowrank_tensor_exact_f32(lm_lowrank_tensor *f, uint64_t row, uint64_t col, float w, float *x);
/*! lm_lowrank_tensor_done() : rows r0 .. r0+nr computed by such a caller (lm_lowrank_tensor_run
 *  counts its own); the last rows of a segment free its factors */
void lm_lowrank_tensor_done(lm_lowrank_tensor *f, uint64_t r0, uint64_t nr);

/*! lm_kdtype_of() : the kernel's name for a dtype (bf16, f16, f32 only). */
lm_kdtype lm_kdtype_of(lm_dtype dt);

#endif
