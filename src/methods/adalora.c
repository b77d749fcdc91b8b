/* SPDX-License-Identifier: MIT */
/* adalora.c : AdaLoRA (peft-merge.md §5.2): W += B @ (A * E) * alpha / (init_r + 1e-5), whatever
 * rank each module kept (the file holds the kept ranks; 0 adds nothing).  The pairs are planned
 * as LoRA's (lora.c). */
#include "lora.h"

#include "lm_error.h"

#include <stdio.h>
#include <stdlib.h>

typedef struct {
    long init_r; /* the divisor of the scale (default 12) */
} adalora_cfg;

static lm_code adalora_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    adalora_cfg *a = calloc(1, sizeof *a);
    if (a == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = a;
    a->init_r = 12;
    if (lm_lora_check_variants(root, c, err) != LM_OK || lm_cfg_int(root, "init_r", &a->init_r, err) != LM_OK)
        return err->code;
    if (a->init_r <= 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'init_r' must be positive (it is %ld)", a->init_r);
    return LM_OK;
}

/* PEFT divides by init_r, not the kept rank; a zero alpha counts as init_r */
static double adalora_scale(const lm_adapter_config *cfg, long rank, double alpha)
{
    (void)rank;
    (void)alpha;
    const adalora_cfg *a = cfg->mcfg;
    return (cfg->lora_alpha > 0 ? cfg->lora_alpha : (double)a->init_r) / ((double)a->init_r + 1e-5);
}

static lm_code adalora_plan(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, lm_err *err)
{
    return lm_lora_plan_pairs(ctx, mods, n, 1, adalora_scale, err);
}

static void adalora_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    const lm_ts_tensor *A = m->part[LORA_A];
    snprintf(buf, cap, "adalora (kept rank) r=%ld scale=%g", A && A->n_dims >= 1 ? (long)A->shape[0] : 0L,
             adalora_scale(cfg, 0, 0));
}

static void adalora_describe_config(const lm_adapter_config *c, char *buf, size_t cap)
{
    const adalora_cfg *a = c->mcfg;
    snprintf(buf, cap, "variant: AdaLoRA\ninit_r: %ld, lora_alpha: %g, scale: %g (alpha/(init_r+1e-5), whatever rank "
             "each module kept)\n", a->init_r, c->lora_alpha, adalora_scale(c, 0, 0));
}

static const lm_part adalora_parts[] = {
    {"lora_A", LORA_A, -1, 2},
    {"lora_B", LORA_B, -1, 2},
    {"lora_E", LORA_E, -1, 1},
};

const lm_method lm_method_adalora = {
    .peft_type = "ADALORA",
    .summary = "W += B @ (A * E) * alpha / (init_r + 1e-5)",
    .parts = adalora_parts,
    .n_parts = sizeof adalora_parts / sizeof *adalora_parts,
    .parse_config = adalora_parse,
    .plan_adapter = adalora_plan,
    .prepare = lm_lora_prepare,
    .describe = adalora_describe,
    .describe_config = adalora_describe_config,
};
