/* SPDX-License-Identifier: MIT */
/* plan_quant_ct.h : compressed-tensors FP8/NVFP4 and ModelOpt NVFP4 weights in the plan
 * (plan_quant_ct.c), for plan_quant.c */
#ifndef LM_PLAN_QUANT_CT_H
#define LM_PLAN_QUANT_CT_H

#include "plan.h"

/*! lm_plan_attach_ct() : model entry i when it is a compressed-tensors or ModelOpt quantized
 *  weight (an F8_E4M3 "<m>.weight" with "<m>.weight_scale"; later packed FP4): *out receives its
 *  lm_qtensor (a plan blob), NULL when the tensor is not one.  @return LM_OK, or an error naming
 *  the tensor (missing or misshaped scales, an unsupported strategy). */
lm_code lm_plan_attach_ct(lm_plan *p, const lm_model *model, const lm_qscheme *s, size_t i, lm_qtensor **out,
                          lm_err *err);

/*! lm_plan_ct_drop_extras() : a quantized weight written dequantized: its module's activation
 *  scale ("<module>.input_scale") goes with its weight scales */
void lm_plan_ct_drop_extras(lm_plan *p, const lm_model *model, const char *wname);

#endif
