/* SPDX-License-Identifier: MIT */
/* adapter_config.h : adapter_config.json -> lm_adapter_config.
 * Reads the fields that change a merge (peft-merge.md §3.2), takes PEFT's defaults for missing
 * ones, ignores unknown ones, and refuses what cannot be merged: non-mergeable peft_types, types
 * not implemented yet, and LoRA variants PEFT itself does not merge (§7). */
#ifndef LM_ADAPTER_CONFIG_H
#define LM_ADAPTER_CONFIG_H

#include "lora_merge.h"

typedef struct lm_str_list {
    char **v; /* owned strings */
    size_t n;
} lm_str_list;

typedef struct lm_adapter_config {
    char *path;          /* owned: the adapter_config.json path */
    char *peft_type;     /* owned, as written (e.g. "LORA") */
    const struct lm_method *method; /* the type (methods/registry.c) */
    void *mcfg;          /* owned: the method's own settings (its parse_config), or NULL */
    long r;              /* default 8 */
    double lora_alpha;   /* default 8 (LoHa/LoKr: their key 'alpha') */
    int use_rslora, use_dora, lora_bias;
    int fan_in_fan_out;  /* as saved; PEFT overrides it by module type */
    char *bias;          /* owned: "none", "all", "lora_only" */
    /* rank_pattern / alpha_pattern, keys in file order */
    lm_str_list rank_keys;
    long *rank_vals;
    lm_str_list alpha_keys;
    double *alpha_vals;
    /* targeting (peft-merge.md §3.4) */
    int has_target, target_is_regex, all_linear;
    char *target_regex;
    lm_str_list target_list;
    int exclude_is_regex;
    char *exclude_regex;
    lm_str_list exclude_list;
    lm_str_list modules_to_save;
    long *layers_to_transform;
    size_t n_layers;
    lm_str_list layers_pattern;
    /* trainable_token_indices: a list (for the embedding) or {module: [ids]} */
    lm_str_list tt_modules;   /* "" for the plain-list form */
    long **tt_indices;        /* per module, owned */
    size_t *tt_n;
    char *init_lora_weights;  /* owned string form: "true", "false", "gaussian", "mica", ... */
    int ensure_weight_tying;
    int r_given;              /* 'r' is in the file (not PEFT's default of this reader) */
    int rank_pattern_given;   /* a non-empty 'rank_pattern' is in the file (read or not by the type) */
} lm_adapter_config;

#include <cJSON.h>

/* Readers of one config key for the methods' parse_config (null counts as absent).
 * @return LM_OK leaving *out as it was when the key is absent, else an InvalidConfig error. */
const cJSON *lm_cfg_field(const cJSON *root, const char *name);
lm_code lm_cfg_bool(const cJSON *root, const char *name, int *out, lm_err *err);
lm_code lm_cfg_int(const cJSON *root, const char *name, long *out, lm_err *err);
lm_code lm_cfg_num(const cJSON *root, const char *name, double *out, lm_err *err);
lm_code lm_cfg_str_list(const cJSON *f, const char *name, lm_str_list *out, lm_err *err);
lm_code lm_cfg_int_list(const cJSON *f, const char *name, long **out, size_t *n_out, lm_err *err);
lm_code lm_cfg_dup(const char *s, char **out, lm_err *err);
void lm_str_list_free(lm_str_list *l);
/* room for n trainable_token_indices entries (tt_modules, tt_indices, tt_n), none used yet */
lm_code lm_adapter_config_tt_alloc(lm_adapter_config *c, size_t n, lm_err *err);
/* JSON truthiness as Python's bool() of the parsed value */
int lm_cfg_truthy(const cJSON *f);

/*! lm_adapter_config_load() :
 *  Parses path (an adapter_config.json).  Refuses (LM_E_UNSUPPORTED, the message names the
 *  peft_type or the variant) anything lora-merge cannot merge exactly.
 *  @return the config or NULL with *err filled (err->path = path).
 *  Ownership: free with lm_adapter_config_free(). */
lm_adapter_config *lm_adapter_config_load(const char *path, lm_err *err);
lm_adapter_config *lm_adapter_config_parse(const char *json, size_t n_bytes, const char *path,
                                           lm_err *err);
void lm_adapter_config_free(lm_adapter_config *c);
/*! lm_json_strict() : LM_OK when json is what Python's json.load takes: one value and nothing
 *  after it, UTF-8 without a BOM, no number Python refuses; and no key twice in an object (which
 *  Python would read as the last).  Else InvalidJson, InvalidUtf8 or DuplicateKey with the line and
 *  column (cJSON alone takes trailing data and any bytes in strings). */
lm_code lm_json_strict(const char *json, size_t n_bytes, lm_err *err);

/*! lm_peft_type_kind() : 1 mergeable and implemented (a method in the registry), 0 known but
 *  refused (message in *why, static), -1 unknown. */
int lm_peft_type_kind(const char *peft_type, const char **why);

#endif
