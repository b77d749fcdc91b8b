/* output.h : what goes into OUT.  A .safetensors file, or a model directory: model.safetensors
 * or shards with model.safetensors.index.json, plus the base directory's model files
 * (config.json, tokenizer files ...).  Decides names and contents; the executor writes the
 * tensor data. */
#ifndef LM_OUTPUT_H
#define LM_OUTPUT_H

#include "lora_merge.h"
#include "plan.h"

#define LM_DEFAULT_SHARD_BYTES 5000000000ull /* transformers' "5GB" */

typedef struct lm_out_target {
    int is_dir, created_dir;
    char *dir;        /* owned: directory OUT, without a trailing slash */
    size_t n_shards;
    char **paths;     /* owned: the weight files to write */
    size_t *shard_of; /* owned: plan tensor -> shard */
    uint64_t total_bytes;
} lm_out_target;

void lm_out_target_free(lm_out_target *o);

/*! lm_out_plan_shards() : shards in data order, each at most max_bytes (a larger tensor gets a
 *  shard of its own), and the paths of the files to write. */
lm_code lm_out_plan_shards(lm_out_target *o, const lm_merge_job *job, const lm_plan *p, lm_err *err);

/*! lm_out_write_index() : model.safetensors.index.json of a sharded output. */
lm_code lm_out_write_index(const lm_out_target *o, const lm_plan *p, lm_err *err);

/*! lm_out_copy_model_files() : the base directory's other files into the output directory.
 *  @return the number copied, or -1 with *err. */
long lm_out_copy_model_files(const lm_out_target *o, const char *base_dir, lm_err *err);

/*! lm_base_directory() : the directory holding the base's files (the base itself when it is a
 *  directory); malloc'd, NULL when out of memory. */
char *lm_base_directory(const char *base_path);

/*! lm_path_join() : "dir/name", malloc'd (NULL when out of memory). */
char *lm_path_join(const char *dir, const char *name);

#endif
