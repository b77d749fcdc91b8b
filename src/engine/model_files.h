/* SPDX-License-Identifier: MIT */
/* model_files.h : the files around the weights in a model directory OUT.
 * Which files go in: an allow-list (config, generation config, tokenizer files, chat templates,
 * processor configs, LICENSE-like files) from the base's directory, the tokenizer, chat template
 * and processor files from the adapter's directory when it has them, names given with
 * --copy-file, and a generated model card.  config.json is adjusted to the weights written
 * (dtype, tied head, vocabulary size, quantization), edited in place so every other byte stays.
 * Files are read safely (no link out of the directory, permissions kept at most) and all of
 * them are read before anything is written.  Writing is output.c's job. */
#ifndef LM_MODEL_FILES_H
#define LM_MODEL_FILES_H

#include "lora_merge.h"
#include "quant.h"
#include "report.h"

#include <stdint.h>

#define LM_SIDE_FILE_MAX_BYTES ((size_t)256 << 20) /* a tokenizer.json is ~30 MB at most */

typedef struct lm_side_file {
    char *name;         /* owned: the file name in OUT */
    char *src;          /* owned: the file it comes from; NULL when generated */
    const char *origin; /* static: "base", "adapter" or "generated" */
    const char *kind;   /* static: "config", "generation_config", "tokenizer", "chat_template",
                           "processor", "license", "model_card", "extra" */
    char *data;         /* owned: the bytes to write */
    size_t n_bytes;
    unsigned mode;      /* permission bits: the source's at most */
    int rewritten;      /* config.json changed from the base's */
} lm_side_file;

typedef struct lm_side_plan {
    lm_side_file *f; /* owned */
    size_t n, cap;
} lm_side_plan;

void lm_side_plan_free(lm_side_plan *sp);
/*! lm_side_find() : the file planned under name, or NULL. */
const lm_side_file *lm_side_find(const lm_side_plan *sp, const char *name);

/* What config.json must say about the weights written. */
typedef struct lm_config_edits {
    const char *torch_dtype; /* "bfloat16", "float16", "float32": torch_dtype / dtype; NULL: keep */
    int tie_word_embeddings; /* -1: keep; 0 or 1: set (added when absent) */
    int64_t vocab_size;      /* < 0: keep */
    int drop_quantization;   /* remove quantization_config: the weights written are not quantized */
} lm_config_edits;

/*! lm_config_rewrite() :
 *  Applies e to the JSON object text[0..n): values replaced in place (top level, and in the
 *  direct sub-objects that hold the same key, e.g. "text_config"), keys removed or appended;
 *  every other byte is kept.  *changes receives a short summary ("torch_dtype bfloat16 ->
 *  float16, ...", "" when nothing changed).
 *  @return LM_OK with *out (malloc'd, NUL-terminated) and *n_out, or LM_E_FORMAT when text is not
 *  a strict JSON object (the caller then keeps the file as it is). */
lm_code lm_config_rewrite(const char *text, size_t n, const lm_config_edits *e, char **out, size_t *n_out,
                          char *changes, size_t changes_cap, lm_err *err);

/* What the base's config.json and model card say (fields absent: NULL / -1). */
typedef struct lm_base_info {
    char *model_type;     /* owned */
    char *name_or_path;   /* owned: "_name_or_path" */
    int tie_word_embeddings; /* -1 absent (transformers then ties), 0, 1 */
    int64_t vocab_size;
    int has_quantization; /* quantization_config present */
    char *torch_dtype;    /* owned: "torch_dtype" or "dtype" */
    int has_auto_map;     /* custom code (trust_remote_code) */
    char *license;        /* owned: "license: ..." lines of the base README's front matter */
    int has_config;
} lm_base_info;

/*! lm_base_quant_scheme() : the quantization_config of dir/config.json (none: fmt LM_Q_NONE).
 *  @return LM_OK, or an error naming config.json (an unknown quant_method ...) */
lm_code lm_base_quant_scheme(const char *dir, lm_qscheme *s, lm_err *err);
/*! lm_base_info_read() : reads dir/config.json and dir/README.md's front matter when present.
 *  Unreadable or malformed files leave fields empty (the side-file pass reports them). */
void lm_base_info_read(const char *dir, lm_base_info *bi);
void lm_base_info_free(lm_base_info *bi);

typedef struct lm_card_adapter {
    const char *name;      /* the adapter directory's name */
    const char *peft_type;
    double weight;
    const char *sha256;    /* of its weights file */
    const char *declared_base; /* base_model_name_or_path, or NULL */
} lm_card_adapter;

typedef struct lm_card_info {
    const char *title;     /* the output directory's name */
    const char *base_name; /* the base as the Hub knows it, or its directory's name */
    int base_is_hub_id;
    const char *license;   /* front matter lines of the base's card, or NULL */
    const lm_card_adapter *adapters;
    size_t n_adapters;
    const char *dtype;     /* "BF16", "mixed" */
    size_t n_tensors, n_changed;
} lm_card_info;

/*! lm_model_card() : README.md for a merged model directory: what was merged into what, with
 *  which weights and hashes (deterministic: no date).  @return malloc'd text or NULL (memory). */
char *lm_model_card(const lm_card_info *ci);

typedef struct lm_side_inputs {
    const char *base_dir;               /* the directory holding the base */
    const char *const *adapter_dirs;    /* [0]: the main adapter, source of tokenizer files */
    size_t n_adapter_dirs;
    const char *const *copy_files;      /* --copy-file names */
    size_t n_copy_files;
    const lm_config_edits *edits;
    const char *model_card;             /* README.md text; NULL: none */
    const char *const *reserved;        /* names the weights take (never side files) */
    size_t n_reserved;
} lm_side_inputs;

/*! lm_side_plan_build() :
 *  Chooses and reads every side file.  Notes (what came from where, what was not copied) go to
 *  r's notes, warnings (no config.json, custom code not copied ...) to its warnings.
 *  @return LM_OK, or an error naming the file: a link out of the directory, an unreadable or
 *  oversized expected file, a --copy-file that does not exist. */
lm_code lm_side_plan_build(lm_side_plan *sp, const lm_side_inputs *in, lm_report_impl *r, lm_err *err);

/*! lm_side_is_allowed() : 1 when name is a model file copied by default (allow-list); *kind and
 *  *group (0 = base only, 1 tokenizer, 2 chat template, 3 processor) say which. */
int lm_side_is_allowed(const char *name, const char **kind, int *group);

/*! lm_is_weight_name() : 1 for names of weight files and indexes (*.safetensors, *.bin, *.gguf,
 *  *.index.json ...). */
int lm_is_weight_name(const char *name);

#endif
