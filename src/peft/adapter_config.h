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

typedef enum {
    LM_PEFT_LORA = 0, LM_PEFT_ADALORA, LM_PEFT_IA3, LM_PEFT_LOHA, LM_PEFT_LOKR,
    LM_PEFT_TRAINABLE_TOKENS, LM_PEFT_BEFT, LM_PEFT_LN_TUNING, LM_PEFT_HIRA, LM_PEFT_VERA,
    LM_PEFT_SHIRA, LM_PEFT_HRA, LM_PEFT_MISS, LM_PEFT_DELORA, LM_PEFT_GRALORA, LM_PEFT_VBLORA,
    LM_PEFT_RANDLORA, LM_PEFT_OFT, LM_PEFT_FOURIERFT, LM_PEFT_ROAD, LM_PEFT_C3A, LM_PEFT_BOFT
} lm_peft_kind;

typedef struct lm_adapter_config {
    char *path;          /* owned: the adapter_config.json path */
    char *peft_type;     /* owned, as written (e.g. "LORA") */
    lm_peft_kind kind;
    long init_r;         /* AdaLoRA: the divisor of the scale (default 12) */
    int hra_gs;          /* HRA: apply_GS */
    long mini_r;         /* MiSS "mini": the block's width */
    int miss_mini;       /* MiSS init_weights "mini" (default form otherwise) */
    long hybrid_r, gralora_k; /* GraLoRA (defaults 0, 2) */
    long topk;           /* VB-LoRA (default 2) */
    int oft_coft, oft_neumann; /* OFT: coft (false), use_cayley_neumann (true) */
    long oft_terms;      /* OFT: num_cayley_neumann_terms (5) */
    double oft_eps;      /* OFT: eps (6e-5) */
    double ft_scaling;   /* FourierFT: scaling (150) */
    long ft_seed;        /* FourierFT: random_loc_seed (777) */
    int road_variant;    /* RoAd: 1, 2 or 4 (road_1 ...) */
    long road_group;     /* RoAd: group_size (64) */
    /* IA3: feedforward_modules, a list (key ends with an entry, no dot boundary) or a regex */
    int ff_is_regex;
    char *ff_regex;
    lm_str_list ff_list;
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
} lm_adapter_config;

/*! lm_adapter_config_load() :
 *  Parses path (an adapter_config.json).  Refuses (LM_E_UNSUPPORTED, the message names the
 *  peft_type or the variant) anything lora-merge cannot merge exactly.
 *  @return the config or NULL with *err filled (err->path = path).
 *  Ownership: free with lm_adapter_config_free(). */
lm_adapter_config *lm_adapter_config_load(const char *path, lm_err *err);
lm_adapter_config *lm_adapter_config_parse(const char *json, size_t n_bytes, const char *path,
                                           lm_err *err);
void lm_adapter_config_free(lm_adapter_config *c);

/*! lm_peft_type_kind() : 1 mergeable and implemented, 0 known but refused (message in *why,
 *  static), -1 unknown. */
int lm_peft_type_kind(const char *peft_type, const char **why);

#endif
