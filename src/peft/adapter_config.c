/* SPDX-License-Identifier: MIT */
/* adapter_config.c : adapter_config.json through cJSON (see adapter_config.h). */
#include "adapter_config.h"

#include "lm_error.h"
#include "method.h"
#include "st_json.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const PROMPT_TYPES[] = {
    "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE",
    "ADAPTION_PROMPT",
};
static const char *const PEFT_REFUSES[] = {"POLY", "XLORA", "LILY", "SHADOW"};
/* PEFT merges these; lora-merge does not implement them yet */
static const char *const NOT_YET[] = {
    "BONE",
};

static int in_list(const char *s, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(s, list[i]) == 0)
            return 1;
    return 0;
}

int lm_peft_type_kind(const char *t, const char **why)
{
    if (lm_method_find(t) != NULL)
        return 1;
    if (in_list(t, PROMPT_TYPES, sizeof PROMPT_TYPES / sizeof *PROMPT_TYPES)) {
        *why = "cannot be merged into weights (it adds virtual tokens or prompts, not weight deltas)";
        return 0;
    }
    if (in_list(t, PEFT_REFUSES, sizeof PEFT_REFUSES / sizeof *PEFT_REFUSES)) {
        *why = "cannot be merged into weights (PEFT itself does not merge it)";
        return 0;
    }
    if (in_list(t, NOT_YET, sizeof NOT_YET / sizeof *NOT_YET)) {
        *why = "is mergeable in PEFT but not supported by lora-merge yet";
        return 0;
    }
    return -1;
}

void lm_str_list_free(lm_str_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

void lm_adapter_config_free(lm_adapter_config *c)
{
    if (c == NULL)
        return;
    free(c->path);
    free(c->peft_type);
    free(c->bias);
    lm_str_list_free(&c->rank_keys);
    free(c->rank_vals);
    lm_str_list_free(&c->alpha_keys);
    free(c->alpha_vals);
    free(c->target_regex);
    lm_str_list_free(&c->target_list);
    free(c->exclude_regex);
    lm_str_list_free(&c->exclude_list);
    lm_str_list_free(&c->modules_to_save);
    free(c->layers_to_transform);
    lm_str_list_free(&c->layers_pattern);
    for (size_t i = 0; i < c->tt_modules.n; i++)
        free(c->tt_indices[i]);
    free(c->tt_indices);
    free(c->tt_n);
    lm_str_list_free(&c->tt_modules);
    free(c->init_lora_weights);
    if (c->method != NULL && c->method->free_config != NULL)
        c->method->free_config(c->mcfg);
    else
        free(c->mcfg);
    free(c);
}

const cJSON *lm_cfg_field(const cJSON *root, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(root, name);
    return (f == NULL || cJSON_IsNull(f)) ? NULL : f;
}

lm_code lm_cfg_bool(const cJSON *root, const char *name, int *out, lm_err *err)
{
    const cJSON *f = lm_cfg_field(root, name);
    if (f == NULL)
        return LM_OK;
    if (!cJSON_IsBool(f))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be true or false", name);
    *out = cJSON_IsTrue(f);
    return LM_OK;
}

static int is_integer(double v) { return isfinite(v) && v == floor(v) && fabs(v) < 9.0e15; }

lm_code lm_cfg_int(const cJSON *root, const char *name, long *out, lm_err *err)
{
    const cJSON *f = lm_cfg_field(root, name);
    if (f == NULL)
        return LM_OK;
    if (!cJSON_IsNumber(f) || !is_integer(f->valuedouble))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be an integer", name);
    *out = (long)f->valuedouble;
    return LM_OK;
}

lm_code lm_cfg_num(const cJSON *root, const char *name, double *out, lm_err *err)
{
    const cJSON *f = lm_cfg_field(root, name);
    if (f == NULL)
        return LM_OK;
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be a number", name);
    *out = f->valuedouble;
    return LM_OK;
}

lm_code lm_cfg_dup(const char *s, char **out, lm_err *err)
{
    *out = strdup(s);
    return *out ? LM_OK : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
}

/* a JSON array of strings (or a single string when allow_string) -> list */
lm_code lm_cfg_str_list(const cJSON *f, const char *name, lm_str_list *out, lm_err *err)
{
    if (cJSON_IsString(f)) {
        out->v = calloc(1, sizeof *out->v);
        if (out->v == NULL || lm_cfg_dup(f->valuestring, &out->v[0], err) != LM_OK)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        out->n = 1;
        return LM_OK;
    }
    if (!cJSON_IsArray(f))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be a list of strings", name);
    int n = cJSON_GetArraySize(f);
    out->v = calloc(n > 0 ? (size_t)n : 1, sizeof *out->v);
    if (out->v == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, f)
    {
        if (!cJSON_IsString(e))
            return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be a list of strings", name);
        if (lm_cfg_dup(e->valuestring, &out->v[out->n], err) != LM_OK)
            return LM_E_NOMEM;
        out->n++;
    }
    return LM_OK;
}

lm_code lm_cfg_int_list(const cJSON *f, const char *name, long **out, size_t *n_out, lm_err *err)
{
    if (cJSON_IsNumber(f)) {
        if (!is_integer(f->valuedouble))
            return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must hold integers", name);
        *out = malloc(sizeof **out);
        if (*out == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        (*out)[0] = (long)f->valuedouble;
        *n_out = 1;
        return LM_OK;
    }
    if (!cJSON_IsArray(f))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be an integer or a list of integers", name);
    int n = cJSON_GetArraySize(f);
    *out = calloc(n > 0 ? (size_t)n : 1, sizeof **out);
    if (*out == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    *n_out = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, f)
    {
        if (!cJSON_IsNumber(e) || !is_integer(e->valuedouble))
            return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must hold integers", name);
        (*out)[(*n_out)++] = (long)e->valuedouble;
    }
    return LM_OK;
}

/* {"pattern": number, ...} in file order */
static lm_code get_pattern(const cJSON *root, const char *name, lm_str_list *keys, long *ivals_unused,
                           double **vals, int want_int, lm_err *err)
{
    (void)ivals_unused;
    const cJSON *f = lm_cfg_field(root, name);
    if (f == NULL)
        return LM_OK;
    if (!cJSON_IsObject(f))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be an object", name);
    int n = cJSON_GetArraySize(f);
    keys->v = calloc(n > 0 ? (size_t)n : 1, sizeof *keys->v);
    *vals = calloc(n > 0 ? (size_t)n : 1, sizeof **vals);
    if (keys->v == NULL || *vals == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, f)
    {
        if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble) || (want_int && !is_integer(e->valuedouble)))
            return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' entry '%s' must be a%s number", name,
                           e->string, want_int ? "n integer" : "");
        if (lm_cfg_dup(e->string, &keys->v[keys->n], err) != LM_OK)
            return LM_E_NOMEM;
        (*vals)[keys->n] = e->valuedouble;
        keys->n++;
    }
    return LM_OK;
}

int lm_cfg_truthy(const cJSON *f)
{
    if (f == NULL || cJSON_IsFalse(f))
        return 0;
    if (cJSON_IsArray(f) || cJSON_IsObject(f))
        return cJSON_GetArraySize(f) > 0;
    if (cJSON_IsString(f))
        return f->valuestring[0] != '\0';
    if (cJSON_IsNumber(f))
        return f->valuedouble != 0;
    return 1;
}

static void line_col(const char *s, size_t off, size_t *line, size_t *col)
{
    *line = *col = 1;
    for (size_t i = 0; i < off; i++) {
        if (s[i] == '\n') {
            (*line)++;
            *col = 1;
        } else {
            (*col)++;
        }
    }
}

/* The document must be what Python's json.load (PEFT's reader) accepts, read the same way:
 * UTF-8 without a BOM, one value and nothing after it.  cJSON alone is laxer (trailing data,
 * any bytes in strings) and keeps the first of two equal keys where Python keeps the last, so
 * the strict parser of the safetensors header checks the text first; a duplicate key is refused
 * rather than read either way.  (Python also takes NaN and Infinity, which are refused here
 * with every non-finite config value.) */
lm_code lm_json_strict(const char *json, size_t n_bytes, lm_err *err)
{
    if (n_bytes >= 3 && memcmp(json, "\xef\xbb\xbf", 3) == 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidJson",
                       "the file starts with a UTF-8 byte order mark, which Python's json (and so PEFT) refuses");
    st_json_doc doc;
    st_json_status st = st_json_parse(&doc, json, n_bytes);
    lm_code rc = LM_OK;
    size_t line, col;
    if (st != ST_JSON_OK)
        line_col(json, doc.err_pos < n_bytes ? doc.err_pos : n_bytes, &line, &col);
    const st_json_node *bad = st == ST_JSON_OK ? st_json_bad_number(&doc, st_json_root(&doc)) : NULL;
    if (bad != NULL) {
        line_col(json, bad->pos, &line, &col);
        rc = lm_fail(err, LM_E_FORMAT, "InvalidJson", "invalid JSON at line %zu, column %zu: number '%.*s' is not "
                     "JSON (Python's json refuses it)", line, col, (int)(bad->n > 40 ? 40 : bad->n),
                     st_json_num(&doc, bad));
        doc.err_pos = bad->pos;
    }
    switch (st) {
    case ST_JSON_OK:
        break;
    case ST_JSON_E_NOMEM:
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        break;
    case ST_JSON_E_DUPKEY:
        rc = lm_fail(err, LM_E_FORMAT, "DuplicateKey",
                     "key '%s' appears twice in one object (line %zu, column %zu): Python's json, and so PEFT, "
                     "would silently take the last value; remove one",
                     st_json_key(&doc, &doc.nodes[doc.err_member]), line, col);
        break;
    case ST_JSON_E_UTF8:
        rc = lm_fail(err, LM_E_FORMAT, "InvalidUtf8", "not valid UTF-8 at line %zu, column %zu (%s)", line, col,
                     doc.err_msg);
        break;
    default:
        rc = lm_fail(err, LM_E_FORMAT, "InvalidJson", "invalid JSON at line %zu, column %zu: %s", line, col,
                     doc.err_msg);
        break;
    }
    if (rc != LM_OK)
        lm_err_set_offset(err, doc.err_pos);
    st_json_free(&doc);
    return rc;
}

lm_adapter_config *lm_adapter_config_parse(const char *json, size_t n_bytes, const char *path,
                                           lm_err *err)
{
    lm_adapter_config *c = calloc(1, sizeof *c);
    const char *end = NULL;
    cJSON *root = NULL;
    if (c == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    c->r = 8;
    c->lora_alpha = 8;
    if ((c->path = strdup(path)) == NULL || (c->bias = strdup("none")) == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    if (lm_json_strict(json, n_bytes, err) != LM_OK)
        goto fail;
    root = cJSON_ParseWithLengthOpts(json, n_bytes, &end, 0);
    if (root == NULL) {
        size_t off = end ? (size_t)(end - json) : 0, line, col;
        line_col(json, off < n_bytes ? off : n_bytes, &line, &col);
        lm_fail(err, LM_E_FORMAT, "InvalidJson", "invalid JSON at line %zu, column %zu", line, col);
        lm_err_set_offset(err, off);
        goto fail;
    }
    if (!cJSON_IsObject(root)) {
        lm_fail(err, LM_E_FORMAT, "InvalidConfig", "the config is not a JSON object");
        goto fail;
    }
    const cJSON *pt = lm_cfg_field(root, "peft_type");
    if (pt == NULL || !cJSON_IsString(pt)) {
        lm_fail(err, LM_E_FORMAT, "MissingField", "no 'peft_type' string: not a PEFT adapter config");
        goto fail;
    }
    if (lm_cfg_dup(pt->valuestring, &c->peft_type, err) != LM_OK)
        goto fail;
    const char *why = NULL;
    int kind = lm_peft_type_kind(c->peft_type, &why);
    if (kind < 0) {
        lm_fail(err, LM_E_UNSUPPORTED, "UnknownPeftType", "unknown peft_type %s (PEFT cannot load it either)",
                c->peft_type);
        goto fail;
    }
    if (kind == 0) {
        lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedPeftType", "peft_type %s %s", c->peft_type, why);
        goto fail;
    }
    const lm_method *m = lm_method_find(c->peft_type);
    c->method = m;
    /* the fields every type may have; a type's own keys are read by its parse_config below.
     * LoHa/LoKr/GraLoRA call the alpha 'alpha'; LoRA's 'alpha' (hand-written configs) means nothing */
    if (lm_cfg_int(root, "r", &c->r, err) ||
        lm_cfg_num(root, (m->flags & LM_M_ALPHA_KEY) ? "alpha" : "lora_alpha", &c->lora_alpha, err) ||
        lm_cfg_bool(root, "use_rslora", &c->use_rslora, err) || lm_cfg_bool(root, "use_dora", &c->use_dora, err) ||
        lm_cfg_bool(root, "lora_bias", &c->lora_bias, err) ||
        lm_cfg_bool(root, "fan_in_fan_out", &c->fan_in_fan_out, err) ||
        lm_cfg_bool(root, "ensure_weight_tying", &c->ensure_weight_tying, err))
        goto fail;
    if (m->parse_config != NULL && m->parse_config(root, c, err) != LM_OK)
        goto fail;
    c->r_given = lm_cfg_field(root, "r") != NULL;
    const cJSON *rpat = lm_cfg_field(root, "rank_pattern");
    c->rank_pattern_given = cJSON_IsObject(rpat) && rpat->child != NULL;
    if (c->r <= 0 && !(m->flags & LM_M_NO_RANK)) {
        lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'r' must be positive (it is %ld)", c->r);
        goto fail;
    }
    const cJSON *bias = lm_cfg_field(root, "bias");
    if (bias != NULL) {
        if (!cJSON_IsString(bias)) {
            lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'bias' must be a string");
            goto fail;
        }
        free(c->bias);
        if (lm_cfg_dup(bias->valuestring, &c->bias, err) != LM_OK)
            goto fail;
    }
    double *rank_d = NULL;
    /* AdaLoRA's rank_pattern holds the kept ranks as booleans: the tensors already have them */
    if ((m->flags & LM_M_PATTERNS) &&
        get_pattern(root, "rank_pattern", &c->rank_keys, NULL, &rank_d, 1, err) != LM_OK) {
        free(rank_d);
        goto fail;
    }
    if (c->rank_keys.n) {
        c->rank_vals = calloc(c->rank_keys.n, sizeof *c->rank_vals);
        if (c->rank_vals == NULL) {
            free(rank_d);
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto fail;
        }
        for (size_t i = 0; i < c->rank_keys.n; i++)
            c->rank_vals[i] = (long)rank_d[i];
    }
    free(rank_d);
    if ((m->flags & LM_M_PATTERNS) &&
        get_pattern(root, "alpha_pattern", &c->alpha_keys, NULL, &c->alpha_vals, 0, err) != LM_OK)
        goto fail;

    const cJSON *tm = lm_cfg_field(root, "target_modules");
    if (tm != NULL) {
        c->has_target = 1;
        if (cJSON_IsString(tm)) {
            if (strcmp(tm->valuestring, "all-linear") == 0)
                c->all_linear = 1;
            else {
                c->target_is_regex = 1;
                if (lm_cfg_dup(tm->valuestring, &c->target_regex, err) != LM_OK)
                    goto fail;
            }
        } else if (lm_cfg_str_list(tm, "target_modules", &c->target_list, err) != LM_OK) {
            goto fail;
        }
    }
    const cJSON *ex = lm_cfg_field(root, "exclude_modules");
    if (ex != NULL) {
        if (cJSON_IsString(ex)) {
            c->exclude_is_regex = 1;
            if (lm_cfg_dup(ex->valuestring, &c->exclude_regex, err) != LM_OK)
                goto fail;
        } else if (lm_cfg_str_list(ex, "exclude_modules", &c->exclude_list, err) != LM_OK) {
            goto fail;
        }
    }
    const cJSON *mts = lm_cfg_field(root, "modules_to_save");
    if (mts != NULL && lm_cfg_str_list(mts, "modules_to_save", &c->modules_to_save, err) != LM_OK)
        goto fail;
    const cJSON *ltt = lm_cfg_field(root, "layers_to_transform");
    if (ltt != NULL && lm_cfg_int_list(ltt, "layers_to_transform", &c->layers_to_transform, &c->n_layers, err) != LM_OK)
        goto fail;
    const cJSON *lp = lm_cfg_field(root, "layers_pattern");
    if (lp != NULL && lm_cfg_str_list(lp, "layers_pattern", &c->layers_pattern, err) != LM_OK)
        goto fail;

    /* trainable_token_indices: a list (for the embedding) or {module: [ids]}; the standalone
     * TRAINABLE_TOKENS type fills the same fields from its token_indices */
    const cJSON *tti = lm_cfg_field(root, "trainable_token_indices");
    if (tti != NULL && c->tt_modules.n == 0) {
        size_t n = cJSON_IsObject(tti) ? (size_t)cJSON_GetArraySize(tti) : 1;
        if (lm_adapter_config_tt_alloc(c, n, err) != LM_OK)
            goto fail;
        if (cJSON_IsObject(tti)) {
            const cJSON *e;
            cJSON_ArrayForEach(e, tti)
            {
                if (lm_cfg_dup(e->string, &c->tt_modules.v[c->tt_modules.n], err) != LM_OK)
                    goto fail;
                c->tt_modules.n++;
                if (lm_cfg_int_list(e, "trainable_token_indices", &c->tt_indices[c->tt_modules.n - 1],
                                 &c->tt_n[c->tt_modules.n - 1], err) != LM_OK)
                    goto fail;
            }
        } else {
            if (lm_cfg_dup("", &c->tt_modules.v[0], err) != LM_OK)
                goto fail;
            c->tt_modules.n = 1;
            if (lm_cfg_int_list(tti, "trainable_token_indices", &c->tt_indices[0], &c->tt_n[0], err) != LM_OK)
                goto fail;
        }
    }
    cJSON_Delete(root);
    return c;
fail:
    cJSON_Delete(root);
    lm_err_set_path(err, path);
    lm_adapter_config_free(c);
    return NULL;
}

lm_code lm_adapter_config_tt_alloc(lm_adapter_config *c, size_t n, lm_err *err)
{
    c->tt_modules.v = calloc(n ? n : 1, sizeof *c->tt_modules.v);
    c->tt_indices = calloc(n ? n : 1, sizeof *c->tt_indices);
    c->tt_n = calloc(n ? n : 1, sizeof *c->tt_n);
    if (c->tt_modules.v == NULL || c->tt_indices == NULL || c->tt_n == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return LM_OK;
}

lm_adapter_config *lm_adapter_config_load(const char *path, lm_err *err)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        int e = errno;
        lm_fail_errno(err, e, e == ENOENT ? "no adapter_config.json (not a PEFT adapter directory?)"
                                          : "cannot open the adapter config");
        lm_err_set_path(err, path);
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        size_t k = fread(buf + n, 1, cap - n, f);
        n += k;
        if (k == 0)
            break;
        if (n == cap) {
            if (cap >= (size_t)64 << 20) { /* configs are a few KB */
                free(buf);
                buf = NULL;
                fclose(f);
                lm_fail(err, LM_E_FORMAT, "InvalidConfig", "adapter config larger than 64 MiB");
                lm_err_set_path(err, path);
                return NULL;
            }
            char *nb = realloc(buf, cap * 2);
            if (nb == NULL) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    int read_error = ferror(f);
    fclose(f);
    if (buf == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        lm_err_set_path(err, path);
        return NULL;
    }
    if (read_error) {
        free(buf);
        lm_fail(err, LM_E_IO, NULL, "cannot read the adapter config");
        lm_err_set_path(err, path);
        return NULL;
    }
    lm_adapter_config *c = lm_adapter_config_parse(buf, n, path, err);
    free(buf);
    return c;
}
