/* SPDX-License-Identifier: MIT */
/* output.h : what goes into OUT, and where.  OUT is a .safetensors file, or a model directory:
 * model.safetensors or shards with model.safetensors.index.json, plus the side files chosen by
 * model_files.c.  This module names the files, predicts their sizes (dry runs), finds what an
 * earlier merge left in a directory OUT, and puts the small files in place.  The executor writes
 * the tensor data. */
#ifndef LM_OUTPUT_H
#define LM_OUTPUT_H

#include "lora_merge.h"
#include "model_files.h"
#include "plan.h"

#define LM_DEFAULT_SHARD_BYTES 5000000000ull /* transformers' "5GB" */
#define LM_INDEX_NAME "model.safetensors.index.json"

typedef struct lm_out_target {
    int is_dir, created_dir, dir_exists;
    char *dir;           /* owned: directory OUT, without a trailing slash */
    size_t n_shards;
    size_t n_dropped;    /* planned shards left without a tensor (only scales, moved): no file */
    int mirrored;        /* shard jobs: each shard holds the tensors of the base's shard of its name */
    char **paths;        /* owned: the weight files to write */
    size_t *shard_of;    /* owned: plan tensor -> shard */
    uint64_t *shard_bytes; /* owned: size of each weight file, header included */
    uint64_t total_bytes;  /* tensor data of all shards (the index's total_size) */
    char *index_text;    /* owned: model.safetensors.index.json (sharded output only) */
    char **stale;        /* owned: names in a directory OUT left by an earlier merge, removed
                            once the new model is in place */
    size_t n_stale;
    /* the commit protocol of a directory OUT (see lm_out_stage_begin) */
    char *stage;         /* owned: OUT/.lora-merge-stage.<pid>.XXXXXX while the model is written */
    int stage_fd;        /* the stage, flock'd (LOCK_EX) for the whole run: a live stage is never cleaned */
    struct lm_cleanup_slot *stage_slot; /* its signal-time cleanup registration */
    char **write_paths;  /* owned: where each shard is renamed at the commit (in the stage); NULL: paths */
} lm_out_target;

#define LM_STAGE_PREFIX ".lora-merge-stage."

void lm_out_target_free(lm_out_target *o);

/*! lm_out_resolve() :
 *  What out_path is: an existing directory, a path ending in '/', or a name that does not exist
 *  and does not end in .safetensors give a directory; *.safetensors or an existing file give a
 *  file.  Names of other weight formats (*.gguf, *.bin, *.pt ...) are refused (LM_E_USAGE):
 *  lora-merge writes safetensors.  Creates nothing. */
lm_code lm_out_resolve(lm_out_target *o, const char *out_path, lm_err *err);

/*! lm_out_check_not_in() : a directory OUT that is one of dirs (an adapter's directory, a base
 *  directory) or inside one is refused (OutputIsInput): the merge would write into an input. */
lm_code lm_out_check_not_in(const lm_out_target *o, const char *const *dirs, size_t n_dirs, lm_err *err);

/*! lm_out_plan_shards() : shards in data order, each at most the job's max_shard_bytes (a larger
 *  tensor gets a shard of its own), their paths and exact sizes (the plan's metadata included),
 *  and the index text when there are several. */
lm_code lm_out_plan_shards(lm_out_target *o, const lm_merge_job *job, const lm_plan *p, lm_err *err);

/*! lm_out_layout_named() : the rest of the layout once o->shard_of (n_shards files) is decided:
 *  the scales of weights kept quantized moved to their weights' shards, the shards left without
 *  a tensor dropped (o->n_dropped; names[] compacted: a shard k keeps its name; one shard left is
 *  model.safetensors), paths (names[k] in the directory, or the default names when names is
 *  NULL), total size, index text and exact shard sizes. */
lm_code lm_out_layout_named(lm_out_target *o, const lm_merge_job *job, const lm_plan *p, size_t n_shards,
                            const char **names, lm_err *err);

/*! lm_out_scan_existing() :
 *  For a directory OUT that exists: the files of an earlier merge that the new one does not
 *  replace (other shards, an index, side files no longer chosen) become o->stale; weight files
 *  lora-merge would not have written (pytorch_model.bin, foo.safetensors, a GGUF ...) are refused
 *  before anything is written, since a loader could pick them instead of the merged weights. */
lm_code lm_out_scan_existing(lm_out_target *o, const lm_side_plan *side, lm_err *err);

/*! lm_out_make_dir() : creates a directory OUT that does not exist yet (o->created_dir). */
lm_code lm_out_make_dir(lm_out_target *o, lm_err *err);

/* ---- the commit protocol of a directory OUT ---------------------------------------------------
 * A directory OUT holds a model when it holds its commit record: model.safetensors.index.json
 * (sharded) or model.safetensors (one file); a directory with neither is not a model (loaders
 * and lora-merge refuse it).  So:
 *   0. the weight files are written as unnamed files (O_TMPFILE; else flock'd temporary names)
 *      in OUT: until the commit, a failure or a SIGKILL leaves nothing in OUT;
 *   1. lm_out_stage_begin(), once every file is complete and checked: the stage,
 *      OUT/.lora-merge-stage.<pid>.XXXXXX, created inside OUT so that every later step is a rename
 *      within one file system, and flock'd until the end (a stage whose lock is free belongs to
 *      a dead run); the weight files are renamed into it (lm_st_writer_retarget);
 *   2. lm_out_commit(): the index and side files into the stage; then (a) OUT's commit records
 *      are removed (OUT holds no model from here), (b) every staged file but the new record is
 *      renamed into OUT, (c) the earlier merge's stale files are removed, (d) the new record is
 *      renamed into OUT last, (e) the stage is removed.  --fsync syncs every file, and OUT after
 *      (a) and after (d).
 * A failure before (a) leaves OUT as it was; after (a), OUT holds no model (a rerun completes it),
 * and an OUT this run created is removed with what was moved into it (lm_out_remove_moved_in).
 * Shard workers (--shards) write into OUT directly and do not stage: finalize writes the index
 * last, the same rule. */

/*! lm_out_stage_paths() : allocates o->write_paths (entries NULL until lm_out_stage_begin()), the
 *  executor's commit_paths, for a directory OUT (no-op for a file OUT). */
lm_code lm_out_stage_paths(lm_out_target *o, lm_err *err);

/*! lm_out_stage_begin() : creates and locks the stage of a directory OUT (no-op for a file OUT)
 *  and points o->write_paths into it. */
lm_code lm_out_stage_begin(lm_out_target *o, lm_err *err);

/*! lm_out_commit() : steps 2 (a)-(e) above; every removed name recorded in r. */
lm_code lm_out_commit(lm_out_target *o, const lm_side_plan *side, int do_fsync, lm_report_impl *r, lm_err *err);

/*! lm_out_remove_moved_in() : for a directory OUT this run created, after a failed commit: removes
 *  what lm_out_commit() may have moved in (the weight files, side files, the index), so that the
 *  directory can be removed too (nothing else is ever in a directory of ours). */
void lm_out_remove_moved_in(const lm_out_target *o, const lm_side_plan *side);

/*! lm_out_stage_abort() : removes the stage and what is in it (no-op without a stage). */
void lm_out_stage_abort(lm_out_target *o);

/*! lm_out_put_index_and_side_files() : without a stage (shard workers' finalize): every side
 *  file, then model.safetensors.index.json last, each through a temporary file and a rename. */
lm_code lm_out_put_index_and_side_files(lm_out_target *o, const lm_side_plan *side, lm_err *err);

/*! lm_out_fsync_dir() : fsync of a directory (after renames into it): 0, or -1 with errno; a file
 *  system that refuses fsync on a directory is not an error. */
int lm_out_fsync_dir(const char *dir);

/*! lm_out_remove_stale() : removes o->stale; each removed name is recorded in r. */
void lm_out_remove_stale(lm_out_target *o, lm_report_impl *r);

/*! lm_out_clean_stale_temps() : removes what a killed run left: stages in a directory OUT, and
 *  temporary files (".<name>.lm-tmp-XXXXXX") in OUT or beside a file OUT, each only when its
 *  lock is free (its writer is dead).  Nothing else: never another run's live files, never
 *  anything under OUT/.lora-merge-shards/.  Each removed name is noted in r (when r != NULL). */
void lm_out_clean_stale_temps(const lm_out_target *o, lm_report_impl *r);

/*! lm_out_clean_dead_temps_in() : removes the temporary files (".<name>.lm-tmp-XXXXXX") in dir
 *  whose lock is free (their writer is dead), and nothing else; each removed name is noted in r
 *  (when r != NULL). */
void lm_out_clean_dead_temps_in(const char *dir, lm_report_impl *r);

/*! lm_base_directory() : the directory holding the base's files (the base itself when it is a
 *  directory); malloc'd, NULL when out of memory. */
char *lm_base_directory(const char *base_path);

/*! lm_path_leaf() : the last component of path (trailing slashes ignored): a pointer into path
 *  and its length in *n_bytes. */
const char *lm_path_leaf(const char *path, size_t *n_bytes);

/*! lm_path_join() : "dir/name", malloc'd (NULL when out of memory). */
char *lm_path_join(const char *dir, const char *name);

/*! lm_file_sha256() : sha256 of a whole file, as 64 lowercase hex digits into hex[65]. */
lm_code lm_file_sha256(const char *path, char hex[65], lm_err *err);
/*! lm_fd_sha256() : the same over an open file (from its first byte; an unnamed temporary file
 *  too), path naming it in errors. */
lm_code lm_fd_sha256(int fd, const char *path, char hex[65], lm_err *err);
/*! lm_fd_hashes() : one read of the open file for its plain sha256 (into plain[65]) and its
 *  XXH3-128 (into xxh[33], lm_xxh128.h); either may be NULL. */
lm_code lm_fd_hashes(int fd, const char *path, char *plain, char *xxh, lm_err *err);

#endif
