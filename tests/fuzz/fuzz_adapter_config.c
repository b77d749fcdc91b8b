/* SPDX-License-Identifier: MIT */
/* fuzz_adapter_config.c : libFuzzer target for adapter_config.json parsing and PEFT's
 * module-matching rules.  Any bytes are a candidate config; an accepted config's patterns and
 * targeting rules are then exercised on a few module paths (hostile regexes must neither crash
 * nor hang: the matcher has a step budget). */
#include "adapter_config.h"
#include "peft_match.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lm_err err;
    lm_err_clear(&err);
    lm_adapter_config *c = lm_adapter_config_parse((const char *)data, size, "fuzz/adapter_config.json", &err);
    if (c == NULL) {
        if (err.code == LM_OK || err.kind[0] == '\0' || err.msg[0] == '\0')
            __builtin_trap();
        return 0;
    }
    static const char *const modules[] = {"model.layers.0.self_attn.q_proj", "transformer.h.11.attn.c_attn", "lm_head",
                                          "model.layers.3.mlp.experts.7.w1", "encoder.block.0.layer.1.EncDecAttention.q"};
    lm_target_rules rules;
    memset(&rules, 0, sizeof rules);
    rules.has_target = 1;
    rules.all_linear = c->all_linear || !c->has_target;
    rules.target_is_regex = c->target_is_regex;
    rules.target_regex = c->target_regex;
    rules.target_list = (const char *const *)c->target_list.v;
    rules.n_target = c->target_list.n;
    rules.exclude_is_regex = c->exclude_is_regex;
    rules.exclude_regex = c->exclude_regex;
    rules.exclude_list = (const char *const *)c->exclude_list.v;
    rules.n_exclude = c->exclude_list.n;
    rules.modules_to_save = (const char *const *)c->modules_to_save.v;
    rules.n_modules_to_save = c->modules_to_save.n;
    rules.layers_to_transform = c->layers_to_transform;
    rules.n_layers = c->n_layers;
    rules.layers_pattern = (const char *const *)c->layers_pattern.v;
    rules.n_layers_pattern = c->layers_pattern.n;
    for (size_t i = 0; i < sizeof modules / sizeof *modules; i++) {
        lm_err e2;
        lm_err_clear(&e2);
        (void)lm_target_matches(&rules, modules[i], &e2);
        lm_err_clear(&e2);
        (void)lm_pattern_lookup((const char *const *)c->rank_keys.v, c->rank_keys.n, modules[i], &e2);
        lm_err_clear(&e2);
        (void)lm_pattern_lookup((const char *const *)c->alpha_keys.v, c->alpha_keys.n, modules[i], &e2);
    }
    lm_adapter_config_free(c);
    return 0;
}
