/* SPDX-License-Identifier: MIT */
/* test_peft_match.c : PEFT's module matching (peft-merge.md §3.3, §3.4): the verified examples of
 * the spec, each rule on its own, and three real PEFT adapters from ../shared/fixtures, whose
 * configs must select exactly the modules PEFT changed. */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "peft_match.h"

#define PM_GOLDEN "../shared/fixtures/peft-golden"

/* ---- §3.3 ---------------------------------------------------------------------------------- */

static long pm_lookup(const char *const *keys, size_t n, const char *module)
{
    lm_err err;
    lm_err_clear(&err);
    long r = lm_pattern_lookup(keys, n, module, &err);
    cr_assert(r >= -1, "lookup of '%s' failed: %s", module, err.msg);
    return r;
}

Test(peft_match, pattern_lookup_verified_examples)
{
    const char *first[] = { "lin", "a.lin" };
    cr_expect_eq(pm_lookup(first, 2, "b.a.lin"), 0, "first match wins, not the most specific");
    const char *caret[] = { "^lin" };
    cr_expect_eq(pm_lookup(caret, 1, "lin"), 0);
    cr_expect_eq(pm_lookup(caret, 1, "a.lin"), -1, "^ only works at the start");
    const char *prefix[] = { "b\\..*" };
    cr_expect_eq(pm_lookup(prefix, 1, "b.a.lin"), 0);
}

Test(peft_match, pattern_lookup_rules)
{
    const char *keys[] = { "q_proj", "model.layers.0.self_attn.v_proj", "mlp\\.(up|down)_proj" };
    cr_expect_eq(pm_lookup(keys, 3, "model.layers.0.self_attn.q_proj"), 0);
    cr_expect_eq(pm_lookup(keys, 3, "q_proj"), 0, "a top-level module matches (0.15+)");
    cr_expect_eq(pm_lookup(keys, 3, "model.layers.0.self_attn.xq_proj"), -1, "whole components");
    cr_expect_eq(pm_lookup(keys, 3, "model.layers.0.self_attn.q_proj.base"), -1, "anchored at $");
    cr_expect_eq(pm_lookup(keys, 3, "model.layers.0.self_attn.v_proj"), 1);
    cr_expect_eq(pm_lookup(keys, 3, "model.layers.1.self_attn.v_proj"), -1);
    cr_expect_eq(pm_lookup(keys, 3, "model.layers_0_self_attn_v_proj"), 1, "dots are wildcards");
    cr_expect_eq(pm_lookup(keys, 3, "model.layers.3.mlp.down_proj"), 2);
    cr_expect_eq(pm_lookup(keys, 3, "model.layers.3.mlp.gate_proj"), -1);
    cr_expect_eq(pm_lookup(keys, 0, "q_proj"), -1, "no keys");
}

Test(peft_match, pattern_lookup_bad_key)
{
    const char *keys[] = { "q_proj", "v_proj(", "k_proj" };
    lm_err err;
    lm_err_clear(&err);
    cr_expect_eq(lm_pattern_lookup(keys, 3, "model.k_proj", &err), -2);
    cr_expect_str_eq(err.kind, "InvalidRegex");
    cr_expect(strstr(err.msg, "v_proj(") != NULL, "message names the key: %s", err.msg);
    /* an earlier match wins before the bad key is reached, as in PEFT's loop */
    lm_err_clear(&err);
    cr_expect_eq(lm_pattern_lookup(keys, 3, "model.q_proj", &err), 0);
    const char *unsup[] = { "(?<=a)b" };
    lm_err_clear(&err);
    cr_expect_eq(lm_pattern_lookup(unsup, 1, "x.ab", &err), -2);
    cr_expect_eq(err.code, LM_E_UNSUPPORTED);
    cr_expect(strstr(err.msg, "lookbehind") != NULL, "%s", err.msg);
}

/* ---- §3.4 ---------------------------------------------------------------------------------- */

static int pm_adapts(const lm_target_rules *r, const char *module)
{
    lm_err err;
    lm_err_clear(&err);
    int rc = lm_target_matches(r, module, &err);
    cr_assert(rc >= 0, "'%s': %s: %s", module, err.kind, err.msg);
    return rc;
}

static lm_target_rules pm_list(const char *const *names, size_t n)
{
    lm_target_rules r;
    memset(&r, 0, sizeof r);
    r.has_target = 1;
    r.target_list = names;
    r.n_target = n;
    return r;
}

Test(peft_match, layers_to_transform_verified_q01)
{
    const char *names[] = { "q", "0", "1" };
    const long layers[] = { 1 };
    lm_target_rules r = pm_list(names, 3);
    r.layers_to_transform = layers;
    r.n_layers = 1;
    static const struct { const char *module; int want; } c[] = {
        { "model.layers.0.q", 0 },
        { "model.layers.1.q", 1 },
        { "model.layers.2.q", 0 },
        { "model.layers.0.experts.0", 0 },
        { "model.layers.0.experts.1", 0 },
        { "model.layers.1.experts.0", 1 },
        { "model.layers.1.experts.1", 1 },
        { "model.layers.1.experts", 0 },
        { "model.layers.0", 0 },
        { "model.layers.1", 0 },  /* suffix "1" but no ".<word>.<n>." in the path */
        { "model.layers.1.xq", 0 },
        { "model.layers.1.k", 0 },
        { "model.embed_tokens", 0 },
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        cr_expect_eq(pm_adapts(&r, c[i].module), c[i].want, "%s", c[i].module);
}

Test(peft_match, layers_to_transform_verified_exact_entry)
{
    const char *names[] = { "model.layers.0.q", "q" };
    const long layers[] = { 2 };
    lm_target_rules r = pm_list(names, 2);
    r.layers_to_transform = layers;
    r.n_layers = 1;
    cr_expect_eq(pm_adapts(&r, "model.layers.0.q"), 1, "an exact entry skips the layer filter");
    cr_expect_eq(pm_adapts(&r, "model.layers.1.q"), 0);
    cr_expect_eq(pm_adapts(&r, "model.layers.2.q"), 1);
    cr_expect_eq(pm_adapts(&r, "model.layers.3.q"), 0);
}

Test(peft_match, layer_index_is_lazy)
{
    const char *names[] = { "w1" };
    const long three[] = { 3 }, seven[] = { 7 }, both[] = { 5, 7, 3 };
    lm_target_rules r = pm_list(names, 1);
    r.n_layers = 1;
    r.layers_to_transform = three;
    cr_expect_eq(pm_adapts(&r, "model.layers.3.mlp.experts.7.w1"), 1, "index 3 (PEFT >= 0.20)");
    r.layers_to_transform = seven;
    cr_expect_eq(pm_adapts(&r, "model.layers.3.mlp.experts.7.w1"), 0, "not the expert index 7");
    r.layers_to_transform = both;
    r.n_layers = 3;
    cr_expect_eq(pm_adapts(&r, "model.layers.3.mlp.experts.7.w1"), 1, "index in the list");
    cr_expect_eq(pm_adapts(&r, "blocks.w1"), 0, "suffix match without an index");
    cr_expect_eq(pm_adapts(&r, "w1"), 1, "exact entry: no layer filter");
}

Test(peft_match, layers_pattern)
{
    const char *names[] = { "q_proj", "c_attn" };
    const long one[] = { 1 };
    const char *pat_layers[] = { "layers" };
    const char *pat_two[] = { "h", "layers" };
    const char *pat_raw[] = { "lay.rs" };
    lm_target_rules r = pm_list(names, 2);
    r.layers_to_transform = one;
    r.n_layers = 1;
    r.layers_pattern = pat_layers;
    r.n_layers_pattern = 1;
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.q_proj"), 1);
    cr_expect_eq(pm_adapts(&r, "model.layers.0.self_attn.q_proj"), 0);
    cr_expect_eq(pm_adapts(&r, "transformer.h.1.attn.c_attn"), 0, "pattern 'layers' not found");
    cr_expect_eq(pm_adapts(&r, "layers.1.q_proj"), 0, "a dot before the pattern is required");
    cr_expect_eq(pm_adapts(&r, "model.blocks.1.layers.2.q_proj"), 0, "index after 'layers' is 2");
    r.layers_pattern = pat_two;
    r.n_layers_pattern = 2;
    cr_expect_eq(pm_adapts(&r, "transformer.h.1.attn.c_attn"), 1, "second pattern tried");
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.q_proj"), 1);
    r.layers_pattern = pat_raw;
    r.n_layers_pattern = 1;
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.q_proj"), 1, "entry used raw as regex");
}

Test(peft_match, layers_pattern_errors)
{
    const char *names[] = { "q_proj" };
    const long one[] = { 1 };
    const char *bad[] = { "layers(" };
    const char *grouped[] = { "(layers|h)" };
    lm_target_rules r = pm_list(names, 1);
    r.layers_to_transform = one;
    r.n_layers = 1;
    r.layers_pattern = bad;
    r.n_layers_pattern = 1;
    lm_err err;
    lm_err_clear(&err);
    cr_expect_eq(lm_target_matches(&r, "model.layers.1.q_proj", &err), -1);
    cr_expect(strstr(err.msg, "layers_pattern") != NULL && strstr(err.msg, "layers(") != NULL,
              "%s", err.msg);
    /* a group inside the pattern becomes group 1: PEFT's int() of it fails, so do we */
    r.layers_pattern = grouped;
    lm_err_clear(&err);
    cr_expect_eq(lm_target_matches(&r, "model.layers.1.q_proj", &err), -1);
    cr_expect(strstr(err.msg, "not a number") != NULL, "%s", err.msg);
}

Test(peft_match, target_regex_full_match)
{
    lm_target_rules r;
    memset(&r, 0, sizeof r);
    r.has_target = 1;
    r.target_is_regex = 1;
    r.target_regex = "model\\.layers\\.1\\.self_attn\\.(q|k|v|o)_proj"
                     "|.*\\.0\\.mlp\\.(gate|up)_proj";
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.q_proj"), 1);
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.o_proj"), 1);
    cr_expect_eq(pm_adapts(&r, "model.layers.0.self_attn.q_proj"), 0);
    cr_expect_eq(pm_adapts(&r, "model.layers.0.mlp.up_proj"), 1);
    cr_expect_eq(pm_adapts(&r, "model.layers.1.mlp.up_proj"), 0);
    cr_expect_eq(pm_adapts(&r, "model.layers.0.mlp.up_proj.base_layer"), 0, "full match only");
    r.target_regex = "q_proj";
    cr_expect_eq(pm_adapts(&r, "model.q_proj"), 0, "no suffix rule for a regex");
    cr_expect_eq(pm_adapts(&r, "q_proj"), 1);
    r.target_regex = ".*(q|v)_proj$";
    cr_expect_eq(pm_adapts(&r, "a.v_proj"), 1);
}

Test(peft_match, target_regex_with_layer_filter_refused)
{
    const long one[] = { 1 };
    lm_target_rules r;
    memset(&r, 0, sizeof r);
    r.has_target = 1;
    r.target_is_regex = 1;
    r.target_regex = ".*q_proj";
    r.layers_to_transform = one;
    r.n_layers = 1;
    lm_err err;
    lm_err_clear(&err);
    cr_expect_eq(lm_target_matches(&r, "model.layers.1.q_proj", &err), -1);
    cr_expect(strstr(err.msg, "layers_to_transform") != NULL, "%s", err.msg);
}

Test(peft_match, target_list_suffix_rules)
{
    const char *names[] = { "q", "self_attn.v_proj", "lay.rs" };
    lm_target_rules r = pm_list(names, 3);
    cr_expect_eq(pm_adapts(&r, "model.attn.q"), 1);
    cr_expect_eq(pm_adapts(&r, "model.attn.xq"), 0, "no partial names");
    cr_expect_eq(pm_adapts(&r, "q"), 1, "exact entry");
    cr_expect_eq(pm_adapts(&r, "model.q.k"), 0);
    cr_expect_eq(pm_adapts(&r, "model.layers.0.self_attn.v_proj"), 1, "dotted entry as suffix");
    cr_expect_eq(pm_adapts(&r, "model.layers.0.cross_attn.v_proj"), 0);
    cr_expect_eq(pm_adapts(&r, "model.layers"), 0, "list entries are literal, not regexes");
    cr_expect_eq(pm_adapts(&r, "model.lay.rs"), 1);
}

Test(peft_match, exclude_modules)
{
    const char *names[] = { "q_proj", "k_proj" };
    const char *excl[] = { "model.layers.0.self_attn.q_proj", "k_proj", "lay.rs" };
    lm_target_rules r = pm_list(names, 2);
    r.exclude_list = excl;
    r.n_exclude = 3;
    cr_expect_eq(pm_adapts(&r, "model.layers.0.self_attn.q_proj"), 0, "excluded by full path");
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.q_proj"), 1);
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.k_proj"), 0, "excluded by suffix");
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.xk_proj"), 0, "not a target either");
    r.exclude_list = NULL;
    r.n_exclude = 0;
    r.exclude_is_regex = 1;
    r.exclude_regex = ".*\\.0\\..*";
    cr_expect_eq(pm_adapts(&r, "model.layers.0.self_attn.q_proj"), 0);
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.q_proj"), 1);
    r.exclude_regex = "k_proj";
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.k_proj"), 1, "exclude regex: full match");
    r.exclude_regex = "";
    cr_expect_eq(pm_adapts(&r, "model.layers.1.self_attn.k_proj"), 1, "empty: none");
    /* exclusion comes first, even for an exact target entry */
    const char *exact[] = { "model.q_proj" };
    r = pm_list(exact, 1);
    r.exclude_is_regex = 1;
    r.exclude_regex = "model\\..*";
    cr_expect_eq(pm_adapts(&r, "model.q_proj"), 0);
    r.exclude_regex = "([";
    lm_err err;
    lm_err_clear(&err);
    cr_expect_eq(lm_target_matches(&r, "model.q_proj", &err), -1);
    cr_expect(strstr(err.msg, "exclude_modules") != NULL, "%s", err.msg);
}

Test(peft_match, modules_to_save_excluded)
{
    const char *names[] = { "lm_head", "q", "score", "classifier.dense" };
    const char *mts[] = { "lm_head", "score", "a.b" };
    lm_target_rules r = pm_list(names, 4);
    r.modules_to_save = mts;
    r.n_modules_to_save = 3;
    cr_expect_eq(pm_adapts(&r, "lm_head"), 0);
    cr_expect_eq(pm_adapts(&r, "model.lm_head"), 0);
    cr_expect_eq(pm_adapts(&r, "model.lm_head.q"), 0, "sub-modules of a saved module too");
    cr_expect_eq(pm_adapts(&r, "model.xlm_head.q"), 1, "whole components only");
    cr_expect_eq(pm_adapts(&r, "model.scores.q"), 1);
    cr_expect_eq(pm_adapts(&r, "model.score"), 0);
    cr_expect_eq(pm_adapts(&r, "x.aXb.q"), 0, "entry used raw: '.' is a wildcard");
    cr_expect_eq(pm_adapts(&r, "model.layers.0.q"), 1);
    const char *bad[] = { "lm_head", "(" };
    r.modules_to_save = bad;
    r.n_modules_to_save = 2;
    lm_err err;
    lm_err_clear(&err);
    cr_expect_eq(lm_target_matches(&r, "model.layers.0.q", &err), -1);
    cr_expect(strstr(err.msg, "modules_to_save") != NULL, "%s", err.msg);
}

Test(peft_match, no_target_and_all_linear)
{
    lm_target_rules r;
    memset(&r, 0, sizeof r);
    cr_expect_eq(pm_adapts(&r, "model.q_proj"), 0, "target_modules null: nothing");
    r.has_target = 1;
    r.all_linear = 1;
    cr_expect_eq(pm_adapts(&r, "model.layers.0.q_proj"), 1);
    const char *mts[] = { "lm_head" };
    const long zero[] = { 0 };
    r.modules_to_save = mts;
    r.n_modules_to_save = 1;
    r.layers_to_transform = zero;
    r.n_layers = 1;
    cr_expect_eq(pm_adapts(&r, "lm_head"), 0, "exclusions still apply");
    cr_expect_eq(pm_adapts(&r, "model.layers.1.q_proj"), 0, "layer filter still applies");
    cr_expect_eq(pm_adapts(&r, "model.layers.0.q_proj"), 1);
}

Test(peft_match, hostile_regex_bounded)
{
    char module[64];
    memset(module, 'a', 40);
    module[40] = '\0';
    lm_target_rules r;
    memset(&r, 0, sizeof r);
    r.has_target = 1;
    r.target_is_regex = 1;
    r.target_regex = "(a*)*b";
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    lm_err err;
    lm_err_clear(&err);
    int rc = lm_target_matches(&r, module, &err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    cr_expect(rc == 0 || (rc == -1 && err.code != LM_OK), "rc %d", rc);
    cr_expect((double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9 < 2.0);
}

Test(peft_match, matcher_reuse_and_null)
{
    const char *names[] = { "q_proj" };
    lm_target_rules r = pm_list(names, 1);
    lm_err err;
    lm_err_clear(&err);
    lm_target_matcher *m = lm_target_matcher_create(&r, &err);
    cr_assert_not_null(m, "%s", err.msg);
    for (int i = 0; i < 100; i++) {
        char key[64];
        snprintf(key, sizeof key, "model.layers.%d.self_attn.%s", i, i % 2 ? "q_proj" : "k_proj");
        cr_expect_eq(lm_target_matcher_test(m, key, &err), i % 2);
    }
    cr_expect_eq(lm_target_matcher_test(m, NULL, &err), -1);
    lm_target_matcher_free(m);
    lm_target_matcher_free(NULL);
    lm_err_clear(&err);
    cr_expect_eq(lm_target_matches(NULL, "x", &err), -1);
    r.target_list = NULL;
    lm_err_clear(&err);
    cr_expect_eq(lm_target_matches(&r, "x", &err), -1, "n_target > 0 with a NULL list");
}

/* ---- real PEFT adapters ---------------------------------------------------------------------- */

static int pm_have_golden(void)
{
    struct stat st;
    return stat(PM_GOLDEN, &st) == 0 && S_ISDIR(st.st_mode);
}

static char *pm_read_file(const char *path, size_t *n_bytes)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n + 65536 + 1 > cap) {
            cap = (n + 65536 + 1) * 2;
            buf = realloc(buf, cap);
            cr_assert_not_null(buf);
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
    }
    fclose(f);
    buf[n] = '\0';
    if (n_bytes != NULL)
        *n_bytes = n;
    return buf;
}

static cJSON *pm_read_json(const char *path)
{
    size_t n;
    char *text = pm_read_file(path, &n);
    cJSON *j = cJSON_ParseWithLength(text, n);
    free(text);
    cr_assert_not_null(j, "%s: not JSON", path);
    return j;
}

/* header of a safetensors file as JSON (little-endian u64 length, then the header) */
static cJSON *pm_read_st_header(const char *path)
{
    size_t n;
    char *buf = pm_read_file(path, &n);
    cr_assert(n >= 8, "%s: too short", path);
    uint64_t len = 0;
    for (int i = 7; i >= 0; i--)
        len = (len << 8) | (unsigned char)buf[i];
    cr_assert(len <= n - 8, "%s: bad header length", path);
    cJSON *j = cJSON_ParseWithLength(buf + 8, (size_t)len);
    free(buf);
    cr_assert_not_null(j, "%s: bad header", path);
    return j;
}

/* string or list of strings -> array of borrowed strings; returns the count, -1 for a string */
static size_t pm_strings(const cJSON *item, const char ***out)
{
    *out = NULL;
    if (!cJSON_IsArray(item))
        return 0;
    size_t n = (size_t)cJSON_GetArraySize(item), i = 0;
    *out = calloc(n + 1, sizeof **out);
    cr_assert_not_null(*out);
    const cJSON *e;
    cJSON_ArrayForEach(e, item) {
        cr_assert(cJSON_IsString(e));
        (*out)[i++] = e->valuestring;
    }
    return n;
}

typedef struct pm_config {
    cJSON *root;
    lm_target_rules rules;
    const char **target, **exclude, **mts, **lpat;
    const char *lpat_one[1];
    long *layers;
} pm_config;

static void pm_config_load(pm_config *c, const char *path)
{
    memset(c, 0, sizeof *c);
    c->root = pm_read_json(path);
    lm_target_rules *r = &c->rules;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(c->root, "target_modules");
    if (cJSON_IsString(t)) {
        r->has_target = 1;
        if (strcmp(t->valuestring, "all-linear") == 0) {
            r->all_linear = 1;
        } else {
            r->target_is_regex = 1;
            r->target_regex = t->valuestring;
        }
    } else if (cJSON_IsArray(t)) {
        r->has_target = 1;
        r->n_target = pm_strings(t, &c->target);
        r->target_list = c->target;
    }
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(c->root, "exclude_modules");
    if (cJSON_IsString(x)) {
        r->exclude_is_regex = 1;
        r->exclude_regex = x->valuestring;
    } else {
        r->n_exclude = pm_strings(x, &c->exclude);
        r->exclude_list = c->exclude;
    }
    r->n_modules_to_save =
        pm_strings(cJSON_GetObjectItemCaseSensitive(c->root, "modules_to_save"), &c->mts);
    r->modules_to_save = c->mts;
    const cJSON *lp = cJSON_GetObjectItemCaseSensitive(c->root, "layers_pattern");
    if (cJSON_IsString(lp)) {
        c->lpat_one[0] = lp->valuestring;
        r->layers_pattern = c->lpat_one;
        r->n_layers_pattern = 1;
    } else {
        r->n_layers_pattern = pm_strings(lp, &c->lpat);
        r->layers_pattern = c->lpat;
    }
    const cJSON *lt = cJSON_GetObjectItemCaseSensitive(c->root, "layers_to_transform");
    if (cJSON_IsNumber(lt)) {
        c->layers = malloc(sizeof *c->layers);
        c->layers[0] = (long)lt->valuedouble;
        r->n_layers = 1;
    } else if (cJSON_IsArray(lt)) {
        c->layers = calloc((size_t)cJSON_GetArraySize(lt) + 1, sizeof *c->layers);
        const cJSON *e;
        cJSON_ArrayForEach(e, lt) c->layers[r->n_layers++] = (long)e->valuedouble;
    }
    r->layers_to_transform = c->layers;
}

static void pm_config_free(pm_config *c)
{
    cJSON_Delete(c->root);
    free(c->target);
    free(c->exclude);
    free(c->mts);
    free(c->lpat);
    free(c->layers);
}

static int pm_in_changed(const cJSON *changed, const char *module)
{
    const cJSON *e;
    size_t n = strlen(module);
    cJSON_ArrayForEach(e, changed) {
        const char *k = e->valuestring;
        if (strncmp(k, module, n) == 0 && strcmp(k + n, ".weight") == 0)
            return 1;
    }
    return 0;
}

/* Every module of the base model (tensor "<module>.weight") is adapted by the config exactly
 * when PEFT changed its weight, except `saved`, a modules_to_save module: PEFT replaced its
 * weight wholesale, and must not have adapted it.  @return the number of adapted modules. */
static size_t pm_check_case(const char *name, const char *saved, size_t *n_layer0_refused)
{
    char path[512];
    pm_config cfg;
    snprintf(path, sizeof path, PM_GOLDEN "/%s/adapter/adapter_config.json", name);
    pm_config_load(&cfg, path);
    snprintf(path, sizeof path, PM_GOLDEN "/%s/case.json", name);
    cJSON *kase = pm_read_json(path);
    const cJSON *changed = cJSON_GetObjectItemCaseSensitive(kase, "changed_keys");
    cr_assert(cJSON_IsArray(changed) && cJSON_GetArraySize(changed) > 0, "%s: changed_keys", name);
    snprintf(path, sizeof path, PM_GOLDEN "/%s/base/model.safetensors", name);
    cJSON *hdr = pm_read_st_header(path);

    lm_err err;
    lm_err_clear(&err);
    lm_target_matcher *m = lm_target_matcher_create(&cfg.rules, &err);
    cr_assert_not_null(m, "%s: %s", name, err.msg);
    size_t n_adapted = 0, n_changed_seen = 0;
    const cJSON *t;
    *n_layer0_refused = 0;
    cJSON_ArrayForEach(t, hdr) {
        const char *key = t->string;
        size_t n = strlen(key);
        if (strcmp(key, "__metadata__") == 0 || n < 7 || strcmp(key + n - 7, ".weight") != 0)
            continue;
        char module[256];
        cr_assert(n - 7 < sizeof module);
        memcpy(module, key, n - 7);
        module[n - 7] = '\0';
        int want = pm_in_changed(changed, module);
        if (saved != NULL && strcmp(module, saved) == 0) {
            cr_expect_eq(want, 1, "%s: the saved module's weight changed", name);
            n_changed_seen++;
            want = 0;
        }
        int got = lm_target_matcher_test(m, module, &err);
        cr_expect_eq(got, want, "%s: module '%s': adapted %d, PEFT changed it: %d (%s)", name,
                     module, got, want, err.msg);
        n_adapted += got == 1;
        n_changed_seen += (size_t)want;
        if (got == 0 && strncmp(module, "model.layers.0.", 15) == 0 && strstr(module, "_proj"))
            (*n_layer0_refused)++;
    }
    cr_expect_eq(n_changed_seen, (size_t)cJSON_GetArraySize(changed),
                 "%s: every changed key is a base tensor", name);
    lm_target_matcher_free(m);
    cJSON_Delete(hdr);
    cJSON_Delete(kase);
    pm_config_free(&cfg);
    return n_adapted;
}

Test(peft_match, golden_target_regex)
{
    if (!pm_have_golden())
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
    size_t l0;
    cr_expect_eq(pm_check_case("lora_target_regex", NULL, &l0), 6);
}

Test(peft_match, golden_layers_to_transform)
{
    if (!pm_have_golden())
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
    size_t l0;
    cr_expect_eq(pm_check_case("lora_layers_to_transform", NULL, &l0), 5);
    cr_expect_eq(l0, 7, "all seven layer-0 projections refused, got %zu", l0);
}

Test(peft_match, golden_modules_to_save)
{
    if (!pm_have_golden())
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
    size_t l0;
    cr_expect_eq(pm_check_case("lora_modules_to_save", "lm_head", &l0), 4);
}

Test(peft_match, golden_rank_alpha_pattern)
{
    if (!pm_have_golden())
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
    size_t l0;
    cr_expect_eq(pm_check_case("lora_rank_alpha_pattern", NULL, &l0), 14);

    /* ranks: rank_pattern in file order, else r; checked against lora_A's first dimension */
    pm_config cfg;
    pm_config_load(&cfg, PM_GOLDEN "/lora_rank_alpha_pattern/adapter/adapter_config.json");
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(cfg.root, "rank_pattern");
    const cJSON *ap = cJSON_GetObjectItemCaseSensitive(cfg.root, "alpha_pattern");
    const cJSON *r_global = cJSON_GetObjectItemCaseSensitive(cfg.root, "r");
    cr_assert(cJSON_IsObject(rp) && cJSON_IsObject(ap) && cJSON_IsNumber(r_global));
    const char *rkeys[16], *akeys[16];
    size_t n_r = 0, n_a = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, rp) {
        cr_assert(n_r < 16);
        rkeys[n_r++] = e->string;
    }
    cJSON_ArrayForEach(e, ap) {
        cr_assert(n_a < 16);
        akeys[n_a++] = e->string;
    }
    cJSON *hdr =
        pm_read_st_header(PM_GOLDEN "/lora_rank_alpha_pattern/adapter/adapter_model.safetensors");
    static const char prefix[] = "base_model.model.", suffix[] = ".lora_A.weight";
    size_t n_checked = 0;
    cJSON_ArrayForEach(e, hdr) {
        const char *key = e->string;
        size_t n = strlen(key);
        if (strncmp(key, prefix, sizeof prefix - 1) != 0 || n < sizeof suffix - 1
            || strcmp(key + n - (sizeof suffix - 1), suffix) != 0)
            continue;
        char module[256];
        size_t n_mod = n - (sizeof prefix - 1) - (sizeof suffix - 1);
        cr_assert(n_mod < sizeof module);
        memcpy(module, key + sizeof prefix - 1, n_mod);
        module[n_mod] = '\0';
        long ki = pm_lookup(rkeys, n_r, module);
        long want = ki >= 0 ? (long)cJSON_GetArrayItem(rp, (int)ki)->valuedouble
                            : (long)r_global->valuedouble;
        const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
        long got = (long)cJSON_GetArrayItem(shape, 0)->valuedouble;
        cr_expect_eq(got, want, "%s: rank %ld in the file, lookup says %ld (key %ld)", module,
                     got, want, ki);
        n_checked++;
    }
    cr_expect_eq(n_checked, 14);
    /* the case's note: layers.1 v_proj gets alpha from 'layers\.1\..*_proj' (first key), not
     * from 'v_proj' */
    cr_expect_eq(pm_lookup(akeys, n_a, "model.layers.1.self_attn.v_proj"), 0);
    cr_expect_eq(pm_lookup(akeys, n_a, "model.layers.0.self_attn.v_proj"), 1);
    cr_expect_eq(pm_lookup(akeys, n_a, "model.layers.0.self_attn.q_proj"), -1);
    cJSON_Delete(hdr);
    pm_config_free(&cfg);
}
