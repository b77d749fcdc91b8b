/* SPDX-License-Identifier: MIT */
/* test_adapter_config.c : adapter_config.json parsing: PEFT's defaults for missing keys, unknown
 * keys ignored, patterns kept in file order, refusals that name the peft_type or the variant,
 * and invalid JSON located by line and column.  The real configs of
 * ../shared/fixtures/adapters/peft-method-comparison-configs are read when present. */
#include "adapter_config.h"

#include "th.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static lm_adapter_config *ac_parse(const char *json, lm_err *err)
{
    lm_err_clear(err);
    return lm_adapter_config_parse(json, strlen(json), "cfg/adapter_config.json", err);
}

Test(adapter_config, defaults_and_unknown_keys)
{
    lm_err err;
    lm_adapter_config *c = ac_parse("{\"peft_type\": \"LORA\", \"future_key\": {\"x\": [1, 2]}, \"alpha\": 99}", &err);
    cr_assert_not_null(c, "%s", err.msg);
    cr_assert_eq(c->r, 8);
    cr_assert_float_eq(c->lora_alpha, 8.0, 0); /* 'alpha' is not a LoRA key */
    cr_assert_eq(c->use_rslora, 0);
    cr_assert_eq(c->use_dora, 0);
    cr_assert_str_eq(c->bias, "none");
    cr_assert_eq(c->has_target, 0);
    lm_adapter_config_free(c);
}

Test(adapter_config, patterns_in_file_order)
{
    lm_err err;
    lm_adapter_config *c = ac_parse("{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8.5, "
                                    "\"rank_pattern\": {\"z\": 2, \"a\": 6}, \"alpha_pattern\": {\"q\": 1.5}, "
                                    "\"target_modules\": \"model\\\\..*\\\\.q\", \"layers_to_transform\": 3}",
                                    &err);
    cr_assert_not_null(c, "%s", err.msg);
    cr_assert_eq(c->rank_keys.n, 2);
    cr_assert_str_eq(c->rank_keys.v[0], "z");
    cr_assert_eq(c->rank_vals[0], 2);
    cr_assert_str_eq(c->rank_keys.v[1], "a");
    cr_assert_eq(c->rank_vals[1], 6);
    cr_assert_float_eq(c->alpha_vals[0], 1.5, 0);
    cr_assert_float_eq(c->lora_alpha, 8.5, 0);
    cr_assert(c->target_is_regex);
    cr_assert_str_eq(c->target_regex, "model\\..*\\.q");
    cr_assert_eq(c->n_layers, 1);
    cr_assert_eq(c->layers_to_transform[0], 3);
    lm_adapter_config_free(c);
}

Test(adapter_config, refusals_name_the_reason)
{
    static const struct {
        const char *json, *kind, *word;
    } cases[] = {
        {"{\"peft_type\": \"PROMPT_TUNING\"}", "UnsupportedPeftType", "PROMPT_TUNING"},
        {"{\"peft_type\": \"PREFIX_TUNING\"}", "UnsupportedPeftType", "virtual tokens"},
        {"{\"peft_type\": \"POLY\"}", "UnsupportedPeftType", "POLY"},
        {"{\"peft_type\": \"OSF\"}", "UnsupportedPeftType", "not supported by lora-merge yet"},
        {"{\"peft_type\": \"OFT\", \"r\": 8}", "UnsupportedVariant", "oft_block_size"},
        {"{\"peft_type\": \"FINEGATES\"}", "UnknownPeftType", "FINEGATES"},
        {"{\"r\": 8}", "MissingField", "peft_type"},
        {"{\"peft_type\": \"LORA\", \"alora_invocation_tokens\": [1, 2]}", "UnsupportedVariant", "aLoRA"},
        {"{\"peft_type\": \"LORA\", \"arrow_config\": {\"top_k\": 2}}", "UnsupportedVariant", "Arrow"},
        {"{\"peft_type\": \"LORA\", \"use_qalora\": true}", "UnsupportedVariant", "QA-LoRA"},
        {"{\"peft_type\": \"LORA\", \"kasa_config\": {}}", "", ""}, /* empty: not set, accepted */
        {"{\"peft_type\": \"LORA\", \"layer_replication\": [[0, 2]]}", "UnsupportedVariant", "layer_replication"},
        {"{\"peft_type\": \"LORA\", \"init_lora_weights\": \"pissa_niter_4\"}", "UnsupportedVariant", "pissa"},
        {"{\"peft_type\": \"LORA\", \"init_lora_weights\": \"olora\"}", "UnsupportedVariant", "olora"},
        {"{\"peft_type\": \"LORA\", \"enable_lora\": [true, false, true]}", "UnsupportedVariant", "enable_lora"},
        {"{\"peft_type\": \"LORA\", \"r\": 0}", "InvalidConfig", "'r'"},
        {"{\"peft_type\": \"LORA\", \"r\": 2.5}", "InvalidConfig", "'r'"},
        {"{\"peft_type\": \"LORA\", \"rank_pattern\": {\"q\": \"x\"}}", "InvalidConfig", "rank_pattern"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        lm_err err;
        lm_adapter_config *c = ac_parse(cases[i].json, &err);
        if (cases[i].kind[0] == '\0') {
            cr_assert_not_null(c, "%s: %s", cases[i].json, err.msg);
            lm_adapter_config_free(c);
            continue;
        }
        cr_assert_null(c, "accepted %s", cases[i].json);
        cr_assert_str_eq(err.kind, cases[i].kind, "%s: kind %s (%s)", cases[i].json, err.kind, err.msg);
        cr_assert(strstr(err.msg, cases[i].word) != NULL, "%s: '%s' does not mention %s", cases[i].json, err.msg,
                  cases[i].word);
        cr_assert_str_eq(err.path, "cfg/adapter_config.json");
    }
}

Test(adapter_config, invalid_json_located)
{
    lm_err err;
    lm_adapter_config *c = ac_parse("{\n  \"peft_type\": \"LORA\",\n  \"r\": 8,,\n}", &err);
    cr_assert_null(c);
    cr_assert_str_eq(err.kind, "InvalidJson");
    cr_assert(strstr(err.msg, "line 3") != NULL, "%s", err.msg);
}

/* the method-comparison configs (LoRA, DoRA, rsLoRA, IA3, LoHa, LoKr, AdaLoRA, VB-LoRA, trainable
 * tokens): every one loads, with its type and settings */
Test(adapter_config, real_method_configs)
{
    if (!th_have_shared())
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
    const char *dir = TH_SHARED "/adapters/peft-method-comparison-configs";
    DIR *d = opendir(dir);
    cr_assert_not_null(d);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d)) != NULL) {
        if (strstr(de->d_name, "adapter_config.json") == NULL)
            continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        lm_err err;
        lm_err_clear(&err);
        lm_adapter_config *c = lm_adapter_config_load(p, &err);
        cr_assert_not_null(c, "%s: %s", de->d_name, err.msg);
        static const struct {
            const char *prefix, *type;
        } kinds[] = {{"lora_", "LORA"}, {"text_generation", "LORA"}, {"ia3_", "IA3"},
                     {"adalora_", "ADALORA"}, {"loha_", "LOHA"}, {"lokr_", "LOKR"},
                     {"vblora_", "VBLORA"}, {"trainable_tokens_", "TRAINABLE_TOKENS"}};
        int found = 0;
        for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++)
            if (strncmp(de->d_name, kinds[k].prefix, strlen(kinds[k].prefix)) == 0) {
                cr_assert_str_eq(c->peft_type, kinds[k].type, "%s: type %s", de->d_name, c->peft_type);
                cr_assert_not_null(c->method, "%s: no method", de->d_name);
                found = 1;
            }
        cr_assert(found, "unexpected config %s", de->d_name);
        if (strstr(de->d_name, "dora"))
            cr_assert(c->use_dora, "%s", de->d_name);
        if (strstr(de->d_name, "rslora"))
            cr_assert(c->use_rslora, "%s", de->d_name);
        lm_adapter_config_free(c);
        n++;
    }
    closedir(d);
    cr_assert_geq(n, 12);
}
