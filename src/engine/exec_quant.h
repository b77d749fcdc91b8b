/* SPDX-License-Identifier: MIT */
/* exec_quant.h : the executor's side of quantized base weights: a tile's codes to f32 (exact),
 * and the merged tile back to codes and scales with the format's rule. */
#ifndef LM_EXEC_QUANT_H
#define LM_EXEC_QUANT_H

#include "plan.h"

/*! lm_xq_load_scales() : the whole scale grid of t as f32 (malloc'd into *scales).  @return LM_OK,
 *  or LM_E_NOMEM */
lm_code lm_xq_load_scales(const lm_plan_tensor *t, const lm_model *model, float **scales, lm_err *err);

/*! lm_xq_dequant() : rows [r0, r0 + nr) of t from their codes src to f32 dst */
void lm_xq_dequant(const lm_plan_tensor *t, const float *scales, const uint8_t *src, uint64_t r0, uint64_t nr,
                   float *dst);

/*! lm_xq_requant() : the merged rows acc back to codes (out) and the tile's scales (out_scales,
 *  the block rows the tile covers, in the scale tensor's layout); codes0: the base's codes of
 *  the same rows.  @return the bytes of out_scales written */
size_t lm_xq_requant(const lm_plan_tensor *t, const float *scales, const float *acc, const uint8_t *codes0,
                     uint64_t r0, uint64_t nr, uint8_t *out, float *out_scales, lm_qstats *st);

/*! lm_xq_scale_offset() : byte offset, inside the scale tensor, of the scales of rows from r0 */
uint64_t lm_xq_scale_offset(const lm_plan_tensor *t, uint64_t r0);

#endif
