/* SPDX-License-Identifier: MIT */
/* trainable_tokens.c : trainable tokens (peft-merge.md §5.15): rows of an embedding replaced by
 * trainable_tokens_delta, the rows named by trainable_token_indices (in a LoRA adapter's config)
 * or token_indices (the standalone TRAINABLE_TOKENS type).  Its parts are accepted in adapters
 * of any type, and target_modules does not apply to them. */
#include "method.h"

#include "lm_error.h"

#include <stdio.h>
#include <string.h>

static lm_code tt_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    const cJSON *tok = lm_cfg_field(root, "token_indices");
    if (tok == NULL)
        return lm_fail(err, LM_E_FORMAT, "MissingField", "TRAINABLE_TOKENS without 'token_indices'");
    if (lm_adapter_config_tt_alloc(c, 1, err) != LM_OK || lm_cfg_dup("", &c->tt_modules.v[0], err) != LM_OK)
        return err->code;
    c->tt_modules.n = 1;
    return lm_cfg_int_list(tok, "token_indices", &c->tt_indices[0], &c->tt_n[0], err);
}

static lm_code tt_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    const lm_ts_tensor *delta = m->part[0];
    const long *rows = NULL;
    size_t n_rows = 0;
    for (size_t q = 0; q < cfg->tt_modules.n; q++) { /* "" (the plain-list form) fits any module */
        const char *key = cfg->tt_modules.v[q];
        size_t nk = strlen(key), nm = strlen(m->path);
        if (key[0] == '\0' || strcmp(key, m->path) == 0 ||
            (nm > nk && m->path[nm - nk - 1] == '.' && strcmp(m->path + nm - nk, key) == 0)) {
            rows = cfg->tt_indices[q];
            n_rows = cfg->tt_n[q];
            if (key[0] != '\0')
                break;
        }
    }
    if (rows == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "MissingField", m->path,
                              "adapter has trainable_tokens_delta but trainable_token_indices names no indices for it");
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (W->n_dims != 2 || delta->n_dims != 2 || delta->shape[0] != n_rows || delta->shape[1] != W->shape[1] ||
        !lm_is_float_dtype(delta->dtype))
        return lm_mismatch(err, m->path, "trainable_tokens_delta must be [%zu, %llu] for embedding '%s'", n_rows,
                           (unsigned long long)(W->n_dims == 2 ? W->shape[1] : 0), W->name);
    for (size_t q = 0; q < n_rows; q++)
        if (rows[q] < 0 || (uint64_t)rows[q] >= W->shape[0])
            return lm_module_fail(err, LM_E_MISMATCH, "IndexOutOfRange", m->path,
                                  "token index %ld is outside the vocabulary (%llu rows)", rows[q],
                                  (unsigned long long)W->shape[0]);
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_ROWS, "trainable_tokens", m->path, err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->src = delta;
    op->rows = rows;
    op->n_rows = n_rows;
    return LM_OK;
}

static void tt_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    (void)cfg;
    snprintf(buf, cap, "trainable tokens (%llu rows replaced)",
             (unsigned long long)(m->part[0]->n_dims == 2 ? m->part[0]->shape[0] : 0));
}

static const lm_part tt_parts[] = {{"trainable_tokens_delta", 0, -1, 1}};

const lm_method lm_method_trainable_tokens = {
    .peft_type = "TRAINABLE_TOKENS",
    .summary = "embedding rows replaced",
    .parts = tt_parts,
    .n_parts = 1,
    .flags = LM_M_PARTS_ANYWHERE | LM_M_UNIT_WEIGHT,
    .parse_config = tt_parse,
    .plan_module = tt_plan_module,
    .describe = tt_describe,
};
