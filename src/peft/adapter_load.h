/* SPDX-License-Identifier: MIT */
/* adapter_load.h : a PEFT adapter directory -> config + tensors.
 * Finds adapter_config.json and the weights (adapter_model.safetensors, else adapter_model.bin
 * through the restricted reader), follows a single-adapter save under a non-default name
 * (DIR/NAME/), and checks every floating value is finite. */
#ifndef LM_ADAPTER_LOAD_H
#define LM_ADAPTER_LOAD_H

#include "adapter_config.h"
#include "adapter_formats.h"
#include "tensor_set.h"

typedef struct lm_adapter {
    char *dir;              /* owned: the directory the files are in */
    char *name;             /* owned: adapter name: "default" or the sub-folder's name */
    char *config_path;      /* owned */
    char *weights_path;     /* owned */
    lm_adapter_config *cfg; /* owned */
    lm_tensor_set *ts;      /* owned */
    double weight;          /* the user's weight for this adapter (--scale, --adapter-scaled) */
    char **notes;           /* owned: remarks for the report (format, renames, skipped parts) */
    size_t n_notes;
    lm_norm_adapter *foreign; /* owned: an adapter of another tool, normalised (holds the data of
                                 ts and the config text), or NULL for a PEFT directory */
} lm_adapter;

/*! lm_adapter_open() : @return the adapter, or NULL with *err filled (err->path names the file).
 *  Ownership: free with lm_adapter_free(). */
lm_adapter *lm_adapter_open(const char *dir, double weight, lm_err *err);
void lm_adapter_free(lm_adapter *a);

/*! lm_adapter_open_with() :
 *  As lm_adapter_open() for a PEFT directory, and with base (may be NULL) also the key-drift
 *  renames; any other tool's adapter (a file or directory) is normalised into a PEFT adapter
 *  first (adapter_formats.h), its modules resolved against base.  opts may be NULL. */
lm_adapter *lm_adapter_open_with(const char *path, double weight, const lm_model *base,
                                 const lm_format_opts *opts, lm_err *err);

/*! lm_adapter_locate() : the directory that holds adapter_config.json for `dir` (dir itself,
 *  or its single sub-folder that holds one).  @return malloc'd path or NULL with *err. */
char *lm_adapter_locate(const char *dir, char **name_out, lm_err *err);

#endif
