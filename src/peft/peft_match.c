/* SPDX-License-Identifier: MIT */
/* peft_match.c : PEFT's module matching (get_pattern_key, check_target_module_exists) on top of
 * pyregex.  Config entries are pasted raw into PEFT's regex templates, as PEFT does, so a '.' in
 * an entry is a wildcard; list entries compared with == or endswith stay literal, as in PEFT. */
#include "peft_match.h"

#include "lm_error.h"
#include "pyregex.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Compiles pre + body + post.  `what` names the config field and entry in errors. */
static lm_regex *compile_wrapped(const char *pre, const char *body, const char *post,
                                 const char *what, lm_err *err)
{
    size_t n_bytes = strlen(pre) + strlen(body) + strlen(post) + 1;
    char *pat = malloc(n_bytes);
    if (pat == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory compiling %s", what);
        return NULL;
    }
    snprintf(pat, n_bytes, "%s%s%s", pre, body, post);
    lm_err local;
    lm_err_clear(&local);
    lm_regex *re = lm_regex_compile(pat, &local);
    if (re == NULL)
        lm_fail(err, local.code, local.kind, "%s: %s", what, local.msg);
    free(pat);
    return re;
}

static void budget_error(lm_err *err, const char *what, const char *module)
{
    lm_fail(err, LM_E_UNSUPPORTED, "RegexTooComplex",
            "%s: regex step budget exceeded (or out of memory) matching module '%.120s'", what,
            module);
    lm_err_set_tensor(err, module);
}

/* key.endswith("." + entry) */
static int ends_with_dotted(const char *key, const char *entry)
{
    size_t n_key = strlen(key), n_entry = strlen(entry);
    return n_key > n_entry && key[n_key - n_entry - 1] == '.'
           && memcmp(key + n_key - n_entry, entry, n_entry) == 0;
}

long lm_pattern_lookup(const char *const *keys, size_t n_keys, const char *module, lm_err *err)
{
    if (module == NULL || (keys == NULL && n_keys > 0)) {
        lm_fail(err, LM_E_USAGE, NULL, "lm_pattern_lookup: NULL argument");
        return -2;
    }
    for (size_t i = 0; i < n_keys; i++) {
        char what[160];
        if (keys[i] == NULL) {
            lm_fail(err, LM_E_USAGE, NULL, "lm_pattern_lookup: key %zu is NULL", i);
            return -2;
        }
        snprintf(what, sizeof what, "pattern key '%.100s'", keys[i]);
        lm_regex *re = compile_wrapped("(.*\\.)?(", keys[i], ")$", what, err);
        if (re == NULL)
            return -2;
        int rc = lm_regex_match(re, module, NULL, NULL);
        lm_regex_free(re);
        if (rc < 0) {
            budget_error(err, what, module);
            return -2;
        }
        if (rc == 1)
            return (long)i;
    }
    return -1;
}

struct lm_pattern_set {
    size_t n;
    lm_regex **re; /* owned: "(.*\.)?(" key ")$" per key */
    char **what;   /* owned: "pattern key '...'" for messages */
};

void lm_pattern_set_free(lm_pattern_set *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->n; i++) {
        lm_regex_free(s->re[i]);
        free(s->what[i]);
    }
    free(s->re);
    free(s->what);
    free(s);
}

lm_pattern_set *lm_pattern_set_create(const char *const *keys, size_t n_keys, lm_err *err)
{
    lm_pattern_set *s = calloc(1, sizeof *s);
    if (s == NULL || (s->re = calloc(n_keys + 1, sizeof *s->re)) == NULL ||
        (s->what = calloc(n_keys + 1, sizeof *s->what)) == NULL) {
        lm_pattern_set_free(s);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n_keys; i++, s->n++) {
        char what[160];
        snprintf(what, sizeof what, "pattern key '%.100s'", keys[i] ? keys[i] : "(null)");
        if (keys[i] == NULL || (s->what[i] = strdup(what)) == NULL ||
            (s->re[i] = compile_wrapped("(.*\\.)?(", keys[i], ")$", what, err)) == NULL) {
            if (keys[i] == NULL || s->what[i] == NULL)
                lm_fail(err, keys[i] == NULL ? LM_E_USAGE : LM_E_NOMEM, NULL, "%s", keys[i] ? "out of memory" : "NULL key");
            s->n++;
            lm_pattern_set_free(s);
            return NULL;
        }
    }
    return s;
}

long lm_pattern_set_lookup(const lm_pattern_set *s, const char *module, lm_err *err)
{
    for (size_t i = 0; s != NULL && i < s->n; i++) {
        int rc = lm_regex_match(s->re[i], module, NULL, NULL);
        if (rc < 0) {
            budget_error(err, s->what[i], module);
            return -2;
        }
        if (rc == 1)
            return (long)i;
    }
    return -1;
}

struct lm_target_matcher {
    lm_target_rules rules;   /* shallow copy: arrays and strings borrowed */
    lm_regex *target_re;     /* owned; target_modules as a regex */
    lm_regex *exclude_re;    /* owned; exclude_modules as a regex */
    lm_regex **save_re;      /* owned, n_modules_to_save entries */
    lm_regex **layer_re;     /* owned, n_layer_re entries: the layer-index regexes */
    size_t n_layer_re;
};

void lm_target_matcher_free(lm_target_matcher *m)
{
    if (m == NULL)
        return;
    lm_regex_free(m->target_re);
    lm_regex_free(m->exclude_re);
    for (size_t i = 0; m->save_re != NULL && i < m->rules.n_modules_to_save; i++)
        lm_regex_free(m->save_re[i]);
    free(m->save_re);
    for (size_t i = 0; m->layer_re != NULL && i < m->n_layer_re; i++)
        lm_regex_free(m->layer_re[i]);
    free(m->layer_re);
    free(m);
}

static int list_ok(const char *const *list, size_t n)
{
    if (n > 0 && list == NULL)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (list[i] == NULL)
            return 0;
    return 1;
}

lm_target_matcher *lm_target_matcher_create(const lm_target_rules *rules, lm_err *err)
{
    char what[160];
    if (rules == NULL
        || (rules->has_target && rules->target_is_regex && rules->target_regex == NULL)
        || (rules->has_target && !rules->target_is_regex && !rules->all_linear
            && !list_ok(rules->target_list, rules->n_target))
        || (!rules->exclude_is_regex && !list_ok(rules->exclude_list, rules->n_exclude))
        || !list_ok(rules->modules_to_save, rules->n_modules_to_save)
        || !list_ok(rules->layers_pattern, rules->n_layers_pattern)
        || (rules->n_layers > 0 && rules->layers_to_transform == NULL)) {
        lm_fail(err, LM_E_USAGE, NULL, "lm_target_rules: NULL where a value is required");
        return NULL;
    }
    if (rules->has_target && rules->target_is_regex && !rules->all_linear
        && (rules->n_layers > 0 || rules->n_layers_pattern > 0)) {
        lm_fail(err, LM_E_FORMAT, "InvalidConfig",
                "%s cannot be used when target_modules is a regex string",
                rules->n_layers > 0 ? "layers_to_transform" : "layers_pattern");
        return NULL;
    }
    lm_target_matcher *m = calloc(1, sizeof *m);
    if (m == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    m->rules = *rules;
    if (rules->has_target && rules->target_is_regex && !rules->all_linear) {
        snprintf(what, sizeof what, "target_modules");
        if ((m->target_re = compile_wrapped("", rules->target_regex, "", what, err)) == NULL)
            goto fail;
    }
    /* PEFT tests `if config.exclude_modules:`, so "" means none */
    if (rules->exclude_is_regex && rules->exclude_regex != NULL
        && rules->exclude_regex[0] != '\0') {
        snprintf(what, sizeof what, "exclude_modules");
        if ((m->exclude_re = compile_wrapped("", rules->exclude_regex, "", what, err)) == NULL)
            goto fail;
    }
    if (rules->n_modules_to_save > 0) {
        m->save_re = calloc(rules->n_modules_to_save, sizeof *m->save_re);
        if (m->save_re == NULL)
            goto nomem;
        for (size_t i = 0; i < rules->n_modules_to_save; i++) {
            snprintf(what, sizeof what, "modules_to_save entry '%.100s'",
                     rules->modules_to_save[i]);
            m->save_re[i] = compile_wrapped("(^|.*\\.)", rules->modules_to_save[i], "($|\\..*)",
                                            what, err);
            if (m->save_re[i] == NULL)
                goto fail;
        }
    }
    if (rules->n_layers > 0) {
        size_t n = rules->n_layers_pattern > 0 ? rules->n_layers_pattern : 1;
        m->layer_re = calloc(n, sizeof *m->layer_re);
        if (m->layer_re == NULL)
            goto nomem;
        m->n_layer_re = n;
        if (rules->n_layers_pattern == 0) {
            snprintf(what, sizeof what, "layer index");
            m->layer_re[0] = compile_wrapped(".*?\\.[^.]*\\.(\\d+)\\.", "", "", what, err);
            if (m->layer_re[0] == NULL)
                goto fail;
        }
        for (size_t i = 0; i < rules->n_layers_pattern; i++) {
            snprintf(what, sizeof what, "layers_pattern entry '%.100s'", rules->layers_pattern[i]);
            m->layer_re[i] = compile_wrapped(".*?\\.", rules->layers_pattern[i], "\\.(\\d+)\\.",
                                             what, err);
            if (m->layer_re[i] == NULL)
                goto fail;
        }
    }
    return m;
nomem:
    lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
fail:
    lm_target_matcher_free(m);
    return NULL;
}

/* Layer filter of §3.4 step 4.  @return 1 pass, 0 not, -1 error. */
static int layer_filter(const lm_target_matcher *m, const char *module, lm_err *err)
{
    const lm_target_rules *r = &m->rules;
    long begin = -1, end = -1;
    int found = 0;
    for (size_t i = 0; i < m->n_layer_re && !found; i++) {
        int rc = lm_regex_match(m->layer_re[i], module, &begin, &end);
        if (rc < 0) {
            budget_error(err, r->n_layers_pattern > 0 ? "layers_pattern" : "layer index", module);
            return -1;
        }
        found = rc == 1;
    }
    if (!found)
        return 0;
    /* group 1 is (\d+) unless a layers_pattern entry brought its own group (PEFT's int() of it
     * then raises) */
    if (begin < 0 || end <= begin) {
        lm_fail(err, LM_E_FORMAT, "InvalidConfig",
                "layer index of module '%.120s' is empty (a group in layers_pattern?)", module);
        return -1;
    }
    long index = 0;
    for (long i = begin; i < end; i++) {
        char c = module[i];
        if (c < '0' || c > '9') {
            lm_fail(err, LM_E_FORMAT, "InvalidConfig",
                    "layer index '%.*s' of module '%.120s' is not a number (a group in "
                    "layers_pattern?)", (int)(end - begin), module + begin, module);
            return -1;
        }
        if (index > (LONG_MAX - 9) / 10)
            return 0;  /* larger than any long in layers_to_transform */
        index = index * 10 + (c - '0');
    }
    for (size_t i = 0; i < r->n_layers; i++)
        if (r->layers_to_transform[i] == index)
            return 1;
    return 0;
}

int lm_target_matcher_test(const lm_target_matcher *m, const char *module, lm_err *err)
{
    if (m == NULL || module == NULL) {
        lm_fail(err, LM_E_USAGE, NULL, "lm_target_matcher_test: NULL argument");
        return -1;
    }
    const lm_target_rules *r = &m->rules;
    int rc;
    /* 1. exclude_modules */
    if (m->exclude_re != NULL) {
        if ((rc = lm_regex_fullmatch(m->exclude_re, module)) < 0) {
            budget_error(err, "exclude_modules", module);
            return -1;
        }
        if (rc == 1)
            return 0;
    } else if (!r->exclude_is_regex) {
        for (size_t i = 0; i < r->n_exclude; i++)
            if (strcmp(module, r->exclude_list[i]) == 0
                || ends_with_dotted(module, r->exclude_list[i]))
                return 0;
    }
    /* 2. modules_to_save: never adapted, nor anything inside them */
    for (size_t i = 0; i < r->n_modules_to_save; i++) {
        if ((rc = lm_regex_match(m->save_re[i], module, NULL, NULL)) < 0) {
            budget_error(err, "modules_to_save", module);
            return -1;
        }
        if (rc == 1)
            return 0;
    }
    if (!r->has_target)
        return 0;
    /* 3. target_modules as a regex */
    if (m->target_re != NULL) {
        if ((rc = lm_regex_fullmatch(m->target_re, module)) < 0) {
            budget_error(err, "target_modules", module);
            return -1;
        }
        return rc;
    }
    /* 4. target_modules as a list: an exact entry wins outright, a suffix goes through the
     * layer filter */
    if (!r->all_linear) {
        int suffix = 0;
        for (size_t i = 0; i < r->n_target; i++) {
            if (strcmp(module, r->target_list[i]) == 0)
                return 1;
            if (!suffix && ends_with_dotted(module, r->target_list[i]))
                suffix = 1;
        }
        if (!suffix)
            return 0;
    }
    if (r->n_layers == 0)
        return 1;
    return layer_filter(m, module, err);
}

int lm_target_matches(const lm_target_rules *rules, const char *module, lm_err *err)
{
    lm_target_matcher *m = lm_target_matcher_create(rules, err);
    if (m == NULL)
        return -1;
    int rc = lm_target_matcher_test(m, module, err);
    lm_target_matcher_free(m);
    return rc;
}
