/* SPDX-License-Identifier: MIT */
/* formats_internal.h : what the format readers share (adapter_formats.c is the core; the
 * readers are formats_kohya.c, formats_named.c and formats_raw.c).  Not part of any API.
 *
 * A reader turns its input into fm_modules: each one foreign module with the PEFT parts it
 * becomes (borrowed tensors, or tensors made here for transposes, permutations and folds),
 * its PEFT type, rank and alpha (scale = alpha / r), and how to find it in the base: a dotted
 * module path, a kohya flattened name, or a path already resolved.  The core resolves names
 * against the base, checks shapes, and writes the config and the tensor set. */
#ifndef LM_FORMATS_INTERNAL_H
#define LM_FORMATS_INTERNAL_H

#include "adapter_formats.h"

#include <cJSON.h>

/* FM_FULL: a whole tensor that replaces the base's (mlx-lm full fine-tuning, loralib biases):
 * its name is the tensor's, its one part has the suffix "" */
/* FM_NORM: LyCORIS norm tuning (w_norm / b_norm added to a norm's weight / bias): lora-merge's
 * own parts "lycoris_w_norm" / "lycoris_b_norm", which go with any type (src/methods/lycoris.c) */
typedef enum { FM_LORA = 0, FM_LOHA, FM_LOKR, FM_IA3, FM_FULL, FM_NORM } fm_type;

#define FM_MAX_PARTS 8

typedef struct fm_part {
    const char *suffix;      /* static: the PEFT part name ("lora_A.weight", "hada_w1_a" ...) */
    const lm_ts_tensor *t;   /* borrowed from a kept source set or from ctx->own */
} fm_part;

typedef enum { FM_NAME_PATH = 0, FM_NAME_FLAT, FM_NAME_RESOLVED } fm_name_kind;

typedef struct fm_module {
    char *src;               /* owned: the module as the input names it (messages, mapping) */
    char *group;             /* owned or NULL: component ("lora_unet", "text_encoder" ...) */
    char *name;              /* owned: dotted path, kohya flattened rest, or the resolved path */
    fm_name_kind name_kind;
    char *module;            /* owned: the base module path once resolved (NULL: not found) */
    fm_type type;
    fm_part part[FM_MAX_PARTS];
    size_t n_parts;
    long r;                  /* rank for the scale (PEFT's r for this module) */
    double alpha;            /* scale = alpha / r, both exact doubles */
    int ia3_ff;              /* IA3: scales input features (feedforward_modules) */
    int ia3_no_bias;         /* IA3: the input scales the weight only; refuse a base bias */
    int embedding;           /* LoRA on an embedding: lora_embedding_A / _B */
    int orient_by_base;      /* mlx-lm / loralib: embedding or linear decided by the base shape */
} fm_module;

typedef struct fm_map fm_map;

typedef struct fm_base {
    const lm_model *model;
    size_t n;                /* base tensors */
    char **mod;              /* per tensor: its module path (name without ".weight"), or NULL */
    fm_map *exact;           /* module path -> tensor index of its weight */
    fm_map *suffix;          /* dotted suffix of a module path -> index (-2 when several) */
    fm_map *flat;            /* flattened module path ('.' -> '_') -> index (-2 on collision) */
    fm_map *flat_suffix;     /* flattened dotted suffixes -> index (-2 when several) */
    cJSON *config;           /* owned: the base directory's config.json, or NULL */
    char *dir;               /* owned: the base directory */
} fm_base;

typedef struct fm_ctx {
    const char *path;        /* the input */
    const lm_format_opts *opts;
    fm_base *base;           /* NULL when no base was given */
    const char *format;      /* static name of the detected format */
    lm_tensor_set *own;      /* tensors made here (names "made:<n>") */
    lm_tensor_set **keep;    /* source sets the data lives in */
    size_t n_keep, cap_keep;
    fm_module *m;
    size_t n, cap;
    char **notes;
    size_t n_notes, cap_notes;
    int rslora;              /* scale = alpha / sqrt(r) for every module */
    int dora;                /* every LoRA module has lora_magnitude_vector */
    char *config_path;       /* owned: a config file that was read */
    char *weights_path;      /* owned: the weights file */
    size_t n_made;
} fm_ctx;

/* ---- core helpers (adapter_formats.c) ------------------------------------------------------ */
lm_code fm_note(fm_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* a new module (src copied); NULL on allocation failure (err filled) */
fm_module *fm_add(fm_ctx *c, fm_type type, const char *src, const char *group, const char *name,
                  fm_name_kind kind, lm_err *err);
lm_code fm_part_add(fm_module *m, const char *suffix, const lm_ts_tensor *t, lm_err *err);
const lm_ts_tensor *fm_part_get(const fm_module *m, const char *suffix);
/* takes ownership of a source set (freed with the adapter) */
lm_code fm_keep(fm_ctx *c, lm_tensor_set *ts, lm_err *err);
/* a new tensor in ctx->own: data (malloc'd) handed over; NULL with err on failure */
const lm_ts_tensor *fm_made(fm_ctx *c, lm_dtype dtype, size_t n_dims, const uint64_t *shape, void *data,
                            lm_err *err);
/* a view of t with another shape (same bytes, borrowed) */
const lm_ts_tensor *fm_reshaped(fm_ctx *c, const lm_ts_tensor *t, size_t n_dims, const uint64_t *shape,
                                lm_err *err);
/* the 2-D transpose of t (same dtype, exact) */
const lm_ts_tensor *fm_transposed(fm_ctx *c, const lm_ts_tensor *t, lm_err *err);
/* element i of a float tensor as a double (exact); 0 for other dtypes */
double fm_get(const lm_ts_tensor *t, uint64_t i);
int fm_is_float(lm_dtype dt);
/* a scalar (0-d or 1-element, float or integer) tensor's value; fails naming the tensor */
lm_code fm_scalar(const lm_ts_tensor *t, double *v, lm_err *err);
/* loads a weights file: safetensors (data borrowed from the mapping) or torch.save (any root);
 * GGUF and .npz are refused with what to do instead.  *root_kind: LM_TORCH_ROOT_* (safetensors:
 * dict).  The set is kept by the context. */
lm_code fm_load_file(fm_ctx *c, const char *path, lm_tensor_set **ts, int *root_kind, lm_err *err);
/* the metadata value for key of a safetensors set, or NULL */
const char *fm_st_meta(const lm_tensor_set *ts, const char *key);
/* a whole small file into memory (NUL-terminated), at most max_bytes */
char *fm_read_text(const char *path, size_t max_bytes, lm_err *err);
int fm_is_file(const char *path);
int fm_is_dir(const char *path);
char *fm_join(const char *a, const char *b);
int fm_ends_with(const char *s, const char *suffix);
int fm_starts_with(const char *s, const char *prefix);
/* alpha such that alpha / r == s exactly in double (for a multiplier given as s) */
lm_code fm_alpha_for_scale(double s, long r, double *alpha, lm_err *err);

/* ---- the base (adapter_formats.c) ------------------------------------------------------------ */
/* tensor index of module path's weight in the base, or -1 */
long fm_base_weight(const fm_base *b, const char *module);
const lm_tensor_info *fm_base_info(const fm_base *b, long idx);
/* does the base have "<module>.bias" */
int fm_base_has_bias(const fm_base *b, const char *module);
/* an integer field of the base's config.json (also under "text_config"); 1 if found */
int fm_base_config_int(const fm_base *b, const char *key, long *out);
/* a string field ("_class_name", "model_type") or the first of "architectures"; NULL if absent */
const char *fm_base_config_str(const fm_base *b, const char *key);

/* ---- readers ------------------------------------------------------------------------------- */
/* key-based readers over a loaded set (the set is already kept by the context) */
lm_code fm_read_kohya(fm_ctx *c, const lm_tensor_set *ts, lm_err *err);
lm_code fm_read_diffusers(fm_ctx *c, const lm_tensor_set *ts, lm_err *err);
lm_code fm_read_torchtune(fm_ctx *c, const lm_tensor_set *ts, const cJSON *config, lm_err *err);
lm_code fm_read_loralib(fm_ctx *c, const lm_tensor_set *ts, lm_err *err);
lm_code fm_read_lora_sam(fm_ctx *c, const lm_tensor_set *ts, lm_err *err);
lm_code fm_read_clone_st(fm_ctx *c, const lm_tensor_set *ts, lm_err *err);
lm_code fm_read_clone_list(fm_ctx *c, const lm_tensor_set *ts, lm_err *err);
/* directory readers */
lm_code fm_read_mlx(fm_ctx *c, const char *dir, lm_err *err);
lm_code fm_read_raw_dir(fm_ctx *c, const char *dir, lm_err *err);
/* unnamed (up, down) pairs in order -> modules, the order from the base or --target-modules;
 * group: the component the pairs belong to (for messages), classes: the target classes a file
 * names (lora_diffusion's metadata), or NULL */
lm_code fm_map_unnamed(fm_ctx *c, const lm_ts_tensor *const *up, const lm_ts_tensor *const *down, size_t n,
                       const char *group, const char *const *classes, size_t n_classes, const char *what,
                       lm_err *err);

#endif
