/* adapter_config.c : adapter_config.json through cJSON (see adapter_config.h). */
#include "adapter_config.h"

#include "lm_error.h"

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
    "OSF", "WAVEFT", "ADAMSS", "DEFT", "FROD", "GLORA", "PEANUT", "PSOFT",
    "PVERA", "SUPERTUNING", "TINYLORA", "UNILORA",
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
    static const char *const merged[] = {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "TRAINABLE_TOKENS",
                                         "BEFT", "LN_TUNING", "HIRA", "VERA", "SHIRA", "HRA", "MISS", "DELORA", "GRALORA",
                                         "VBLORA", "RANDLORA", "OFT", "FOURIERFT", "ROAD", "C3A", "BOFT"};
    if (in_list(t, merged, sizeof merged / sizeof *merged))
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

static void str_list_free(lm_str_list *l)
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
    str_list_free(&c->rank_keys);
    free(c->rank_vals);
    str_list_free(&c->alpha_keys);
    free(c->alpha_vals);
    free(c->target_regex);
    str_list_free(&c->target_list);
    free(c->exclude_regex);
    str_list_free(&c->exclude_list);
    str_list_free(&c->modules_to_save);
    free(c->layers_to_transform);
    str_list_free(&c->layers_pattern);
    for (size_t i = 0; i < c->tt_modules.n; i++)
        free(c->tt_indices[i]);
    free(c->tt_indices);
    free(c->tt_n);
    str_list_free(&c->tt_modules);
    free(c->init_lora_weights);
    free(c->ff_regex);
    str_list_free(&c->ff_list);
    free(c);
}

static const cJSON *field(const cJSON *root, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(root, name);
    return (f == NULL || cJSON_IsNull(f)) ? NULL : f;
}

static lm_code get_bool(const cJSON *root, const char *name, int *out, lm_err *err)
{
    const cJSON *f = field(root, name);
    if (f == NULL)
        return LM_OK;
    if (!cJSON_IsBool(f))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be true or false", name);
    *out = cJSON_IsTrue(f);
    return LM_OK;
}

static int is_integer(double v) { return isfinite(v) && v == floor(v) && fabs(v) < 9.0e15; }

static lm_code get_int(const cJSON *root, const char *name, long *out, lm_err *err)
{
    const cJSON *f = field(root, name);
    if (f == NULL)
        return LM_OK;
    if (!cJSON_IsNumber(f) || !is_integer(f->valuedouble))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be an integer", name);
    *out = (long)f->valuedouble;
    return LM_OK;
}

static lm_code get_num(const cJSON *root, const char *name, double *out, lm_err *err)
{
    const cJSON *f = field(root, name);
    if (f == NULL)
        return LM_OK;
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be a number", name);
    *out = f->valuedouble;
    return LM_OK;
}

static lm_code dup_str(const char *s, char **out, lm_err *err)
{
    *out = strdup(s);
    return *out ? LM_OK : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
}

/* a JSON array of strings (or a single string when allow_string) -> list */
static lm_code get_str_list(const cJSON *f, const char *name, lm_str_list *out, lm_err *err)
{
    if (cJSON_IsString(f)) {
        out->v = calloc(1, sizeof *out->v);
        if (out->v == NULL || dup_str(f->valuestring, &out->v[0], err) != LM_OK)
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
        if (dup_str(e->valuestring, &out->v[out->n], err) != LM_OK)
            return LM_E_NOMEM;
        out->n++;
    }
    return LM_OK;
}

static lm_code get_int_list(const cJSON *f, const char *name, long **out, size_t *n_out, lm_err *err)
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
    const cJSON *f = field(root, name);
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
        if (dup_str(e->string, &keys->v[keys->n], err) != LM_OK)
            return LM_E_NOMEM;
        (*vals)[keys->n] = e->valuedouble;
        keys->n++;
    }
    return LM_OK;
}

static int truthy(const cJSON *f)
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

/* LoRA settings PEFT does not merge, or that would need the base's SVD (peft-merge.md §7.2) */
static lm_code check_lora_variants(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    static const struct {
        const char *key, *what;
    } refused[] = {
        {"alora_invocation_tokens", "aLoRA (alora_invocation_tokens): PEFT does not support merging aLoRA"},
        {"arrow_config", "Arrow routing (arrow_config): a router adapter cannot be merged"},
        {"use_qalora", "QA-LoRA (use_qalora): made for GPTQ-quantized layers, not mergeable into a float base"},
        {"kasa_config", "KaSA (kasa_config): the merge needs an SVD of the base weights"},
        {"layer_replication", "layer_replication: the merged model would have more layers than the base"},
        {"enable_lora", "'enable_lora' (PEFT <= 0.2 MergedLinear): unsupported old format, re-save the adapter with a current PEFT"},
        {"target_parameters", "LoRA on raw parameters (target_parameters) is not supported by lora-merge yet"},
        {"use_bdlora", "BD-LoRA (use_bdlora) is not supported by lora-merge yet"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
        if (truthy(field(root, refused[i].key)))
            return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type LORA with %s", refused[i].what);
    const cJSON *init = field(root, "init_lora_weights");
    if (init != NULL) {
        char buf[64];
        if (cJSON_IsBool(init))
            snprintf(buf, sizeof buf, "%s", cJSON_IsTrue(init) ? "true" : "false");
        else if (cJSON_IsString(init))
            snprintf(buf, sizeof buf, "%s", init->valuestring);
        else
            snprintf(buf, sizeof buf, "?");
        if (dup_str(buf, &c->init_lora_weights, err) != LM_OK)
            return LM_E_NOMEM;
        static const char *const mutating[] = {"pissa", "olora", "corda", "loftq", "lora_ga", "eva"};
        for (size_t i = 0; i < sizeof mutating / sizeof *mutating; i++)
            if (strncmp(buf, mutating[i], strlen(mutating[i])) == 0 && strcmp(buf, "eva") != 0)
                return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant",
                               "peft_type LORA with init_lora_weights '%s': PEFT re-runs this init on load and "
                               "modifies the base weights; convert the adapter to plain LoRA first "
                               "(path_initial_model_for_weight_conversion)", buf);
    }
    return LM_OK;
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
    root = cJSON_ParseWithLengthOpts(json, n_bytes, &end, 0);
    if (root == NULL) {
        size_t off = end ? (size_t)(end - json) : 0, line = 1, col = 1;
        for (size_t i = 0; i < off && i < n_bytes; i++) {
            if (json[i] == '\n') {
                line++;
                col = 1;
            } else {
                col++;
            }
        }
        lm_fail(err, LM_E_FORMAT, "InvalidJson", "invalid JSON at line %zu, column %zu", line, col);
        lm_err_set_offset(err, off);
        goto fail;
    }
    if (!cJSON_IsObject(root)) {
        lm_fail(err, LM_E_FORMAT, "InvalidConfig", "the config is not a JSON object");
        goto fail;
    }
    const cJSON *pt = field(root, "peft_type");
    if (pt == NULL || !cJSON_IsString(pt)) {
        lm_fail(err, LM_E_FORMAT, "MissingField", "no 'peft_type' string: not a PEFT adapter config");
        goto fail;
    }
    if (dup_str(pt->valuestring, &c->peft_type, err) != LM_OK)
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
    c->kind = strcmp(c->peft_type, "ADALORA") == 0 ? LM_PEFT_ADALORA
            : strcmp(c->peft_type, "IA3") == 0     ? LM_PEFT_IA3
            : strcmp(c->peft_type, "LOHA") == 0    ? LM_PEFT_LOHA
            : strcmp(c->peft_type, "LOKR") == 0    ? LM_PEFT_LOKR
            : strcmp(c->peft_type, "TRAINABLE_TOKENS") == 0 ? LM_PEFT_TRAINABLE_TOKENS
            : strcmp(c->peft_type, "BEFT") == 0    ? LM_PEFT_BEFT
            : strcmp(c->peft_type, "LN_TUNING") == 0 ? LM_PEFT_LN_TUNING
            : strcmp(c->peft_type, "HIRA") == 0    ? LM_PEFT_HIRA
            : strcmp(c->peft_type, "VERA") == 0    ? LM_PEFT_VERA
            : strcmp(c->peft_type, "SHIRA") == 0   ? LM_PEFT_SHIRA
            : strcmp(c->peft_type, "HRA") == 0     ? LM_PEFT_HRA
            : strcmp(c->peft_type, "MISS") == 0    ? LM_PEFT_MISS
            : strcmp(c->peft_type, "DELORA") == 0  ? LM_PEFT_DELORA
            : strcmp(c->peft_type, "GRALORA") == 0 ? LM_PEFT_GRALORA
            : strcmp(c->peft_type, "VBLORA") == 0  ? LM_PEFT_VBLORA
            : strcmp(c->peft_type, "RANDLORA") == 0 ? LM_PEFT_RANDLORA
            : strcmp(c->peft_type, "OFT") == 0     ? LM_PEFT_OFT
            : strcmp(c->peft_type, "FOURIERFT") == 0 ? LM_PEFT_FOURIERFT
            : strcmp(c->peft_type, "ROAD") == 0    ? LM_PEFT_ROAD
            : strcmp(c->peft_type, "C3A") == 0     ? LM_PEFT_C3A
            : strcmp(c->peft_type, "BOFT") == 0    ? LM_PEFT_BOFT
                                                   : LM_PEFT_LORA;
    if (c->kind == LM_PEFT_ROAD) {
        const cJSON *var = field(root, "variant");
        c->road_variant = 1;
        c->road_group = 64;
        if (var != NULL) {
            if (!cJSON_IsString(var) || strncmp(var->valuestring, "road_", 5) != 0 ||
                (strcmp(var->valuestring + 5, "1") && strcmp(var->valuestring + 5, "2") && strcmp(var->valuestring + 5, "4"))) {
                lm_fail(err, LM_E_FORMAT, "InvalidConfig", "RoAd 'variant' must be road_1, road_2 or road_4");
                goto fail;
            }
            c->road_variant = var->valuestring[5] - '0';
        }
        if (get_int(root, "group_size", &c->road_group, err) != LM_OK)
            goto fail;
        if (c->road_group <= 0 || c->road_group % 2 != 0) {
            lm_fail(err, LM_E_FORMAT, "InvalidConfig", "RoAd 'group_size' must be positive and even");
            goto fail;
        }
    }
    if (c->kind == LM_PEFT_FOURIERFT) {
        c->ft_scaling = 150.0;
        c->ft_seed = 777;
        if (get_num(root, "scaling", &c->ft_scaling, err) || get_int(root, "random_loc_seed", &c->ft_seed, err))
            goto fail;
    }
    if (c->kind == LM_PEFT_OFT) {
        long bs = 0;
        c->oft_neumann = 1;
        c->oft_terms = 5;
        c->oft_eps = 6e-5;
        if (field(root, "oft_block_size") == NULL) {
            lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type OFT without oft_block_size: an adapter "
                    "from PEFT < 0.14, which today's PEFT refuses too (OFT was changed incompatibly)");
            goto fail;
        }
        if (get_int(root, "oft_block_size", &bs, err) || get_bool(root, "coft", &c->oft_coft, err) ||
            get_bool(root, "use_cayley_neumann", &c->oft_neumann, err) ||
            get_int(root, "num_cayley_neumann_terms", &c->oft_terms, err) || get_num(root, "eps", &c->oft_eps, err))
            goto fail;
    }
    if (c->kind == LM_PEFT_RANDLORA) {
        if (cJSON_IsFalse(field(root, "save_projection"))) {
            lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type RANDLORA with save_projection false: the "
                    "random bases would have to be regenerated from torch's generator; not supported");
            goto fail;
        }
        c->lora_alpha = 640; /* randlora_alpha's default */
        if (get_num(root, "randlora_alpha", &c->lora_alpha, err) != LM_OK)
            goto fail;
    }
    c->gralora_k = 2;
    c->topk = 2;
    if (c->kind == LM_PEFT_GRALORA &&
        (get_int(root, "hybrid_r", &c->hybrid_r, err) != LM_OK || get_int(root, "gralora_k", &c->gralora_k, err) != LM_OK))
        goto fail;
    if (c->kind == LM_PEFT_GRALORA && (c->gralora_k <= 0 || c->hybrid_r < 0)) {
        lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'gralora_k' must be positive and 'hybrid_r' not negative");
        goto fail;
    }
    if (c->kind == LM_PEFT_VBLORA && get_int(root, "topk", &c->topk, err) != LM_OK)
        goto fail;
    if (c->kind == LM_PEFT_VBLORA && c->topk <= 0) {
        lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'topk' must be positive");
        goto fail;
    }
    if (c->kind == LM_PEFT_HRA && get_bool(root, "apply_GS", &c->hra_gs, err) != LM_OK)
        goto fail;
    if (c->kind == LM_PEFT_MISS) {
        const cJSON *iw = field(root, "init_weights");
        c->mini_r = 1;
        if (get_int(root, "mini_r", &c->mini_r, err) != LM_OK)
            goto fail;
        if (cJSON_IsString(iw) && strcmp(iw->valuestring, "bat") == 0) {
            lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant",
                    "peft_type MISS with init_weights \"bat\" (block-wise form) is not supported by lora-merge yet");
            goto fail;
        }
        c->miss_mini = cJSON_IsString(iw) && strcmp(iw->valuestring, "mini") == 0;
        if (c->miss_mini && c->mini_r <= 0) {
            lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'mini_r' must be positive");
            goto fail;
        }
    }
    if (c->kind == LM_PEFT_VERA && cJSON_IsFalse(field(root, "save_projection"))) {
        lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type VERA with save_projection false: the shared "
                "projections would have to be regenerated from torch's random generator; not supported");
        goto fail;
    }
    /* the standalone trainable-tokens type: token_indices for its target module */
    const cJSON *tok = field(root, "token_indices");
    if (c->kind == LM_PEFT_TRAINABLE_TOKENS) {
        if (tok == NULL) {
            lm_fail(err, LM_E_FORMAT, "MissingField", "TRAINABLE_TOKENS without 'token_indices'");
            goto fail;
        }
        c->tt_modules.v = calloc(1, sizeof *c->tt_modules.v);
        c->tt_indices = calloc(1, sizeof *c->tt_indices);
        c->tt_n = calloc(1, sizeof *c->tt_n);
        if (c->tt_modules.v == NULL || c->tt_indices == NULL || c->tt_n == NULL ||
            dup_str("", &c->tt_modules.v[0], err) != LM_OK) {
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto fail;
        }
        c->tt_modules.n = 1;
        if (get_int_list(tok, "token_indices", &c->tt_indices[0], &c->tt_n[0], err) != LM_OK)
            goto fail;
    }
    int lycoris = c->kind == LM_PEFT_LOHA || c->kind == LM_PEFT_LOKR || c->kind == LM_PEFT_GRALORA; /* 'alpha' */
    c->init_r = 12;
    if ((c->kind == LM_PEFT_LORA || c->kind == LM_PEFT_ADALORA) && check_lora_variants(root, c, err) != LM_OK)
        goto fail;
    if (c->kind == LM_PEFT_ADALORA && get_int(root, "init_r", &c->init_r, err) != LM_OK)
        goto fail;
    if (c->kind == LM_PEFT_ADALORA && c->init_r <= 0) {
        lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'init_r' must be positive (it is %ld)", c->init_r);
        goto fail;
    }
    const cJSON *ff = field(root, "feedforward_modules");
    if (c->kind == LM_PEFT_IA3 && ff != NULL) {
        if (cJSON_IsString(ff)) {
            c->ff_is_regex = 1;
            if (dup_str(ff->valuestring, &c->ff_regex, err) != LM_OK)
                goto fail;
        } else if (get_str_list(ff, "feedforward_modules", &c->ff_list, err) != LM_OK) {
            goto fail;
        }
    }
    /* LoHa/LoKr call it 'alpha'; LoRA's 'alpha' (hand-written configs) means nothing */
    if (get_int(root, "r", &c->r, err) ||
        (c->kind != LM_PEFT_RANDLORA && get_num(root, lycoris ? "alpha" : "lora_alpha", &c->lora_alpha, err)) ||
        get_bool(root, "use_rslora", &c->use_rslora, err) || get_bool(root, "use_dora", &c->use_dora, err) ||
        get_bool(root, "lora_bias", &c->lora_bias, err) ||
        get_bool(root, "fan_in_fan_out", &c->fan_in_fan_out, err) ||
        get_bool(root, "ensure_weight_tying", &c->ensure_weight_tying, err))
        goto fail;
    if (c->r <= 0 && c->kind != LM_PEFT_OFT && c->kind != LM_PEFT_BOFT) { /* (B)OFT: r = 0 with a block size */
        lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'r' must be positive (it is %ld)", c->r);
        goto fail;
    }
    const cJSON *bias = field(root, "bias");
    if (bias != NULL) {
        if (!cJSON_IsString(bias)) {
            lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'bias' must be a string");
            goto fail;
        }
        free(c->bias);
        if (dup_str(bias->valuestring, &c->bias, err) != LM_OK)
            goto fail;
    }
    double *rank_d = NULL;
    /* AdaLoRA's rank_pattern holds the kept ranks as booleans: the tensors already have them */
    if ((c->kind == LM_PEFT_LORA || lycoris) &&
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
    if ((c->kind == LM_PEFT_LORA || lycoris) &&
        get_pattern(root, "alpha_pattern", &c->alpha_keys, NULL, &c->alpha_vals, 0, err) != LM_OK)
        goto fail;

    const cJSON *tm = field(root, "target_modules");
    if (tm != NULL) {
        c->has_target = 1;
        if (cJSON_IsString(tm)) {
            if (strcmp(tm->valuestring, "all-linear") == 0)
                c->all_linear = 1;
            else {
                c->target_is_regex = 1;
                if (dup_str(tm->valuestring, &c->target_regex, err) != LM_OK)
                    goto fail;
            }
        } else if (get_str_list(tm, "target_modules", &c->target_list, err) != LM_OK) {
            goto fail;
        }
    }
    const cJSON *ex = field(root, "exclude_modules");
    if (ex != NULL) {
        if (cJSON_IsString(ex)) {
            c->exclude_is_regex = 1;
            if (dup_str(ex->valuestring, &c->exclude_regex, err) != LM_OK)
                goto fail;
        } else if (get_str_list(ex, "exclude_modules", &c->exclude_list, err) != LM_OK) {
            goto fail;
        }
    }
    const cJSON *mts = field(root, "modules_to_save");
    if (mts != NULL && get_str_list(mts, "modules_to_save", &c->modules_to_save, err) != LM_OK)
        goto fail;
    const cJSON *ltt = field(root, "layers_to_transform");
    if (ltt != NULL && get_int_list(ltt, "layers_to_transform", &c->layers_to_transform, &c->n_layers, err) != LM_OK)
        goto fail;
    const cJSON *lp = field(root, "layers_pattern");
    if (lp != NULL && get_str_list(lp, "layers_pattern", &c->layers_pattern, err) != LM_OK)
        goto fail;

    const cJSON *tti = field(root, "trainable_token_indices");
    if (tti != NULL && c->kind != LM_PEFT_TRAINABLE_TOKENS) {
        size_t n = cJSON_IsObject(tti) ? (size_t)cJSON_GetArraySize(tti) : 1;
        c->tt_modules.v = calloc(n ? n : 1, sizeof *c->tt_modules.v);
        c->tt_indices = calloc(n ? n : 1, sizeof *c->tt_indices);
        c->tt_n = calloc(n ? n : 1, sizeof *c->tt_n);
        if (c->tt_modules.v == NULL || c->tt_indices == NULL || c->tt_n == NULL) {
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto fail;
        }
        if (cJSON_IsObject(tti)) {
            const cJSON *e;
            cJSON_ArrayForEach(e, tti)
            {
                if (dup_str(e->string, &c->tt_modules.v[c->tt_modules.n], err) != LM_OK)
                    goto fail;
                c->tt_modules.n++;
                if (get_int_list(e, "trainable_token_indices", &c->tt_indices[c->tt_modules.n - 1],
                                 &c->tt_n[c->tt_modules.n - 1], err) != LM_OK)
                    goto fail;
            }
        } else {
            if (dup_str("", &c->tt_modules.v[0], err) != LM_OK)
                goto fail;
            c->tt_modules.n = 1;
            if (get_int_list(tti, "trainable_token_indices", &c->tt_indices[0], &c->tt_n[0], err) != LM_OK)
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
