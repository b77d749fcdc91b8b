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
#include <unistd.h>

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
        {"{\"peft_type\": \"BONE\"}", "UnsupportedPeftType", "not supported by lora-merge yet"},
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

/* Issue 15, item 5: the text is read as Python's json reads it (PEFT: json.load), and a key given
 * twice in one object is refused because PEFT would silently take the last value. */
Test(adapter_config, json_as_python_reads_it)
{
    static const struct {
        const char *json, *kind, *word;
    } bad[] = {
        {"{\"peft_type\": \"LORA\", \"lora_alpha\": 8, \"r\": 4, \"lora_alpha\": 800}", "DuplicateKey", "'lora_alpha'"},
        {"{\"peft_type\": \"LORA\", \"rank_pattern\": {\"q\": 4, \"q\": 16}}", "DuplicateKey", "take the last"},
        {"\xef\xbb\xbf{\"peft_type\": \"LORA\"}", "InvalidJson", "byte order mark"},
        {"{\"peft_type\": \"LORA\", \"target_modules\": [\"q\xffk\"]}", "InvalidUtf8", "UTF-8"},
        {"{\"peft_type\": \"LORA\", \"target_modules\": [\"\xc0\xaf\"]}", "InvalidUtf8", "UTF-8"},
        {"{\"peft_type\": \"LORA\"}\n{\"peft_type\": \"IA3\"}", "InvalidJson", "line 2"},
        {"{\"peft_type\": \"LORA\", \"r\": 4}x", "InvalidJson", "column 30"},
        {"{\"peft_type\": \"LORA\", \"r\": 08}", "InvalidJson", "'08'"},
        {"{\"peft_type\": \"LORA\", \"lora_alpha\": 1.}", "InvalidJson", "'1.'"},
        {"{\"peft_type\": \"LORA\", \"lora_dropout\": NaN}", "InvalidJson", "line 1"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        lm_err err;
        lm_adapter_config *c = ac_parse(bad[i].json, &err);
        cr_assert_null(c, "accepted %s", bad[i].json);
        cr_assert_str_eq(err.kind, bad[i].kind, "%s: %s (%s)", bad[i].json, err.kind, err.msg);
        cr_assert(strstr(err.msg, bad[i].word) != NULL, "%s: '%s' lacks %s", bad[i].json, err.msg, bad[i].word);
        cr_assert_str_eq(err.path, "cfg/adapter_config.json");
    }
    /* equal keys in different objects, escapes, non-ASCII and trailing whitespace are fine */
    lm_err err;
    lm_adapter_config *c = ac_parse("{\"peft_type\": \"LORA\", \"rank_pattern\": {\"r\": 4}, \"alpha_pattern\": {\"r\": 2},"
                                    " \"r\": 16, \"target_modules\": [\"caf\xc3\xa9\", \"\\u00e9\"]} \r\n\t",
                                    &err);
    cr_assert_not_null(c, "%s", err.msg);
    cr_assert_eq(c->r, 16);
    lm_adapter_config_free(c);
}

/* Differential test against /usr/bin/python3's json over the fuzz corpus and the shared
 * fixtures' configs: what Python refuses is refused here as JSON; what it accepts as plain JSON
 * is not refused as JSON; a duplicate key is refused as DuplicateKey.  NaN/Infinity, lone
 * surrogate escapes and nesting past 64 (Python extensions, "ext") are refused here by design. */
static int ac_json_refusal(const char *kind)
{
    return strcmp(kind, "InvalidJson") == 0 || strcmp(kind, "InvalidUtf8") == 0 || strcmp(kind, "DuplicateKey") == 0;
}

Test(adapter_config, differential_python_json)
{
    if (access("/usr/bin/python3", X_OK) != 0)
        cr_skip_test("no /usr/bin/python3");
    char cmd[8192];
    int n = snprintf(cmd, sizeof cmd, "/usr/bin/python3 tests/json_classify.py tests/fuzz/corpus/fuzz_adapter_config/*");
    if (th_have_shared())
        snprintf(cmd + n, sizeof cmd - (size_t)n, " %s/adapters/*/adapter_config.json %s/peft-golden/*/adapter/adapter_config.json",
                 TH_SHARED, TH_SHARED);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    char line[4096];
    size_t counts[4] = {0};
    static const char *const cls[4] = {"refuse", "dup", "ext", "ok"};
    while (fgets(line, sizeof line, p) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        char *path = strchr(line, ' ');
        cr_assert_not_null(path);
        *path++ = '\0';
        size_t k = 0;
        while (k < 4 && strcmp(line, cls[k]) != 0)
            k++;
        cr_assert(k < 4, "python says %s", line);
        counts[k]++;
        size_t nb;
        uint8_t *b = th_read_file(path, &nb);
        cr_assert_not_null(b, "%s", path);
        lm_err err;
        lm_err_clear(&err);
        lm_adapter_config *c = lm_adapter_config_parse((const char *)b, nb, path, &err);
        int refused = c == NULL && ac_json_refusal(err.kind);
        if (k == 3)
            cr_assert(!refused, "%s: Python's json reads it, we say %s: %s", path, err.kind, err.msg);
        else
            cr_assert(refused, "%s: Python says %s, we %s", path, cls[k], c ? "accept it" : err.kind);
        if (k == 1)
            cr_assert_str_eq(err.kind, "DuplicateKey", "%s", path);
        lm_adapter_config_free(c);
        free(b);
    }
    cr_assert_eq(pclose(p), 0);
    cr_assert(counts[0] >= 5 && counts[1] >= 2 && counts[3] >= 8, "refuse %zu dup %zu ext %zu ok %zu", counts[0],
              counts[1], counts[2], counts[3]);
}
