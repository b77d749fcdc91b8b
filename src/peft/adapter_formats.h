/* SPDX-License-Identifier: MIT */
/* adapter_formats.h : adapters written by other tools -> a PEFT adapter in memory.
 *
 * Every foreign format (kohya-ss / LyCORIS, mlx-lm, torchtune, diffusers, lora_diffusion,
 * LoRA-SAM, loralib, raw up/down files) is read and normalised into what PEFT would have saved:
 * an adapter_config.json text (peft_type, r, lora_alpha or alpha, per-module rank_pattern /
 * alpha_pattern holding the exact doubles, target_modules, use_dora ...) and a tensor set keyed
 * "base_model.model.<module>.lora_A.weight" etc.  The PEFT path then merges it, and `convert`
 * writes exactly that adapter, so the two cannot disagree.  Names only the base can resolve
 * (kohya's flattened names, unnamed lists) are resolved against the opened base model.
 * Nothing here computes a merge; this layer knows file layouts and naming rules only. */
#ifndef LM_ADAPTER_FORMATS_H
#define LM_ADAPTER_FORMATS_H

#include "lora_merge.h"
#include "tensor_set.h"

typedef struct lm_norm_adapter {
    const char *format;  /* static: "kohya-ss LoRA", "mlx-lm", ... */
    char *config_json;   /* owned: the adapter_config.json it becomes (NUL-terminated) */
    lm_tensor_set *ts;   /* owned: PEFT-keyed tensors; data borrowed from `keep` */
    char *dir;           /* owned: the directory of the input */
    char *config_path;   /* owned: a config file that was read (mlx-lm, torchtune), else the weights */
    char *weights_path;  /* owned: the (first) weights file */
    char **notes;        /* owned: remarks for the report ("lora_te: 72 modules skipped ...") */
    size_t n_notes;
    char *mapping;       /* owned: one line per module, "source name -> module (scale)" */
    char *not_peft;      /* owned: why `convert` cannot write it as a PEFT adapter (LyCORIS DoRA,
                            norm tuning: merged with lora-merge's own parts), or NULL */
    void *keep;          /* owned: source tensor sets and made tensors the data lives in */
} lm_norm_adapter;

/*! lm_formats_is_peft() : 1 if path is a PEFT adapter directory (adapter_config.json with a
 *  peft_type and adapter_model.safetensors/.bin, here or in its one sub-folder). */
int lm_formats_is_peft(const char *path);

/*! lm_formats_detect() : the format name of a non-PEFT adapter, or NULL (see lora_merge.h). */
const char *lm_formats_detect(const char *path);

/*! lm_formats_normalise() :
 *  Reads the adapter at path (a file or a directory of another tool) and normalises it.
 *  base may be NULL (then formats that need it are refused, saying so).  weight is the user's
 *  weight for the adapter (some transformations need it to be 1).
 *  @return LM_OK with *out, or an error naming the file and the foreign key or module.
 *  Ownership: free *out with lm_norm_adapter_free(). */
lm_code lm_formats_normalise(const char *path, const lm_model *base, const lm_format_opts *opts,
                             lm_norm_adapter **out, lm_err *err);
void lm_norm_adapter_free(lm_norm_adapter *n);

/*! lm_formats_normalise_buffer() : the same for the bytes of one weights file (safetensors or
 *  torch.save) in memory, named `name` in errors (the fuzz target's entry point).  buf is read
 *  during the call only... except that the result borrows safetensors data from it: buf must
 *  outlive *out. */
lm_code lm_formats_normalise_buffer(const void *buf, size_t n_bytes, const char *name, const lm_model *base,
                                    const lm_format_opts *opts, lm_norm_adapter **out, lm_err *err);

/*! lm_formats_key_drift() :
 *  Module paths of a PEFT tensor set that the base lacks are looked up under the known renames
 *  between transformers versions (VLMs since 4.52: model.language_model.* <-> model.*,
 *  language_model.model.* <-> model.language_model.*, visual.* <-> model.visual.* ...), in both
 *  directions.  One existing candidate: the keys are renamed and a note says so.  Two: refused,
 *  naming both.  None: left alone (the planner resolves prefixes or reports it).
 *  @return LM_OK, with notes appended to *notes / *n_notes (malloc'd strings). */
lm_code lm_formats_key_drift(lm_tensor_set *ts, const lm_model *base, char ***notes,
                             size_t *n_notes, lm_err *err);

#endif
