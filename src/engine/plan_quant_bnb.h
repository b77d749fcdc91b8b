/* SPDX-License-Identifier: MIT */
/* plan_quant_bnb.h : bitsandbytes weights in the plan (plan_quant_bnb.c), and what the executor
 * needs of them (exec_quant.c).  A bitsandbytes weight is always written dequantized: its
 * quant-state tensors leave the output and config.json loses quantization_config. */
#ifndef LM_PLAN_QUANT_BNB_H
#define LM_PLAN_QUANT_BNB_H

#include "plan.h"

/* a 4-bit weight's quant state (lm_qtensor.ext) */
typedef struct lm_bnb_qinfo {
    const float *code;               /* LM_BNB_NF4 or LM_BNB_FP4 */
    uint64_t blocksize, n_absmax;    /* elements per absmax; absmax count */
    const lm_model_entry *absmax;    /* F32 [n_absmax], or U8 codes when nested */
    const lm_model_entry *nested_absmax, *nested_map; /* double quantization, else NULL */
    uint64_t nested_blocksize;
    float offset;                    /* nested_offset */
    uint64_t shape[2];               /* [out, in] (the view's shape) */
} lm_bnb_qinfo;

/*! lm_plan_bnb_attach() : when model tensor i is a bitsandbytes weight (4-bit: a sibling
 *  '<W>.quant_state.bitsandbytes__nf4|fp4'; 8-bit: I8 with '<module>.SCB'), checks its quant
 *  state against the weight, marks it quantized (p->t[i].q, views[i]: F32 [out, in]), sets its
 *  output dtype and shape and drops its quant-state tensors; *found = 1.  Otherwise *found = 0.
 *  @return LM_OK, or one error naming the tensor (missing or mismatched absmax, quant_map,
 *  nested tensors, quant_state JSON). */
lm_code lm_plan_bnb_attach(lm_plan *p, const lm_model *model, const lm_qscheme *s, const lm_plan_opts *o, size_t i,
                           const lm_tensor_info **views, int *found, lm_err *err);

/*! lm_bnb_orphan_state() : a tensor that belongs to a bitsandbytes quant state ('.absmax',
 *  '.quant_map', '.nested_absmax', '.nested_quant_map', '.quant_state.bitsandbytes__*', '.SCB')
 *  whose weight is not a bitsandbytes weight (missing, of another dtype, or left as it is because
 *  s's skip list names its module): LM_E_MISMATCH naming it when model tensor i is one, else LM_OK */
lm_code lm_bnb_orphan_state(const lm_plan *p, const lm_model *model, const lm_qscheme *s, size_t i, lm_err *err);

/* what `inspect` says of a bitsandbytes checkpoint */
typedef struct lm_bnb_summary {
    size_t n_nf4, n_fp4, n_nested, n_int8; /* weights of each kind (nested: 4-bit with nested absmax) */
    uint64_t blocksize;                    /* of the first 4-bit weight (0: none or unreadable) */
    lm_dtype dtype;                        /* its quant_state dtype (LM_DT_BOOL: none) */
} lm_bnb_summary;

/*! lm_bnb_summarize() : counts the bitsandbytes weights of model (from their tensors) */
void lm_bnb_summarize(const lm_model *model, lm_bnb_summary *out);

#endif
