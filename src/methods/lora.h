/* SPDX-License-Identifier: MIT */
/* lora.h : what LoRA shares with AdaLoRA (adalora.c): the pair planner (shapes, orientation,
 * tied heads, DoRA, lora_bias) and the part slots. */
#ifndef LM_LORA_H
#define LM_LORA_H

#include "method.h"

enum { LORA_A, LORA_B, LORA_B_BIAS, LORA_EA, LORA_EB, LORA_MAG, LORA_E };

/* the scale of a module's delta (before the user's weight) from its rank and alpha */
typedef double (*lm_lora_scale_fn)(const lm_adapter_config *cfg, long rank, double alpha);

/*! lm_lora_plan_pairs() : plans the lora_A/lora_B modules of one adapter (LoRA, or AdaLoRA with
 *  `adalora` set: lora_E scales A's rows, the kept rank may be anything, rank 0 adds nothing). */
lm_code lm_lora_plan_pairs(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, int adalora,
                           lm_lora_scale_fn scale_of, lm_err *err);
lm_code lm_lora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err);
/* LoRA settings PEFT does not merge, or that would need the base's SVD (peft-merge.md §7.2) */
lm_code lm_lora_check_variants(const cJSON *root, lm_adapter_config *c, lm_err *err);

#endif
