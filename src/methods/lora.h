/* SPDX-License-Identifier: MIT */
/* lora.h : what LoRA shares with AdaLoRA (adalora.c): the pair planner (shapes, orientation,
 * tied heads, DoRA, lora_bias) and the part slots. */
#ifndef LM_LORA_H
#define LM_LORA_H

#include "method.h"

enum {
    LORA_A, LORA_B, LORA_B_BIAS, LORA_EA, LORA_EB, LORA_MAG, LORA_E,
    LORA_LYCO_DORA, /* lycoris_dora_scale: LyCORIS's DoRA (lycoris.c), from a LyCORIS file only */
    /* saved with the factors but not part of the merge: VeLoRA's projection, MonteCLoRA's sampler */
    LORA_VELORA, LORA_MC_STD, LORA_MC_WPRIOR, LORA_MC_VAR, LORA_MC_W
};

/* LoRA's own settings (cfg->mcfg of a LORA adapter) */
typedef struct {
    lm_str_list target_params; /* target_parameters: "mlp.experts.gate_up_proj" ... */
    long bd_nblocks;           /* use_bdlora: blocks of the block-diagonal factor (0: no BD-LoRA) */
    lm_str_list bd_a, bd_b;    /* use_bdlora: module-path substrings whose A (B) is block-diagonal */
    int peft_major, peft_minor; /* peft_version ("0.19.1" -> 0, 19), -1 when absent */
} lm_lora_cfg;

/* op->params of LoRA's ops begin with their kind */
enum { LM_LORA_PAIR = 0, LM_LORA_EXPERTS = 1 };

/* the scale of a module's delta (before the user's weight) from its rank and alpha */
typedef double (*lm_lora_scale_fn)(const lm_adapter_config *cfg, long rank, double alpha);

/*! lm_lora_plan_pairs() : plans the lora_A/lora_B modules of one adapter (LoRA, or AdaLoRA with
 *  `adalora` set: lora_E scales A's rows, the kept rank may be anything, rank 0 adds nothing). */
lm_code lm_lora_plan_pairs(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, int adalora,
                           lm_lora_scale_fn scale_of, lm_err *err);
lm_code lm_lora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err);
/* LoRA settings PEFT does not merge, or that would need the base's SVD (peft-merge.md §7.2) */
lm_code lm_lora_check_variants(const cJSON *root, lm_adapter_config *c, lm_err *err);

/* ---- lora_param.c: LoRA on parameters (target_parameters, MoE expert stacks) ---------------- */
/*! lm_lora_param_module() : 1 if module path m (maybe ending in ".base_layer"s) wraps a parameter
 *  the config's target_parameters names */
int lm_lora_param_module(const lm_lora_cfg *lc, const char *path);
/*! lm_lora_plan_params() : plans those modules (all of one adapter) */
lm_code lm_lora_plan_params(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, lm_lora_scale_fn scale_of,
                            lm_err *err);
lm_code lm_lora_param_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err);

#endif
