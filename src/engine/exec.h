/* SPDX-License-Identifier: MIT */
/* exec.h : the executor.  Walks a plan in output order and writes the merged file: untouched
 * tensors are copied as bytes, the others computed in row tiles (convert to f32, apply every
 * operation in f32, round once to the output dtype) and written at their final offsets.
 * OpenMP threads take tasks (copy chunks and tiles); tile bounds depend on shapes only, so the
 * output is byte-identical for every thread count. */
#ifndef LM_EXEC_H
#define LM_EXEC_H

#include "lm_kernels.h"
#include "plan.h"
#include "tensor_stats.h"

typedef struct lm_exec_opts {
    int n_threads;              /* <= 0: all cores */
    int do_fsync;
    const lm_kernels *kernels;  /* NULL: selected automatically */
    /* progress: called from worker threads, serialized; may be NULL */
    void (*progress)(void *ctx, uint64_t done_bytes, uint64_t total_bytes);
    void *progress_ctx;
    uint64_t tile_elems;        /* f32 elements per tile; 0 = default */
    /* sharded output: n_shards > 1 files shard_paths[], plan tensor i goes to shard_of[i]
     * (out_path is then unused); all are renamed into place only when all are complete */
    size_t n_shards;
    const char *const *shard_paths;
    const size_t *shard_of;
    /* tensors whose every op is low-rank are computed exactly (exec_lowrank.h); exactness_off
     * (hidden benchmark switch) runs the same fused kernel without the certification */
    int exactness_off;
    /* NULL, or [plan->n]: per tensor, the elements recomputed in f64 by the exact path, or
     * UINT64_MAX for a tensor that did not take it (filled by lm_exec_run) */
    uint64_t *recomputed;
    /* per plan tensor: what the merge changed in each computed tensor (NULL: not measured);
     * the norms too when stats_norms.  Filled before before_commit is called. */
    lm_tensor_stats *stats;
    int stats_norms;
    /* called once every file is complete, before any is renamed into place (may be NULL); an
     * error aborts the run and leaves nothing */
    lm_code (*before_commit)(void *ctx, lm_err *err);
    void *before_commit_ctx;
    /* NULL, or per file (shard_paths' order; [0] for one file): where the finished file is renamed
     * instead of its path, read when committing, after before_commit (which may fill it) */
    const char *const *commit_paths;
    /* called once the files are renamed into place (may be NULL), with before_commit_ctx */
    lm_code (*after_commit)(void *ctx, lm_err *err);
    /* shard workers (shards.h): with one_shard, only shard only_shard is computed and written
     * (the other shards' tensors are not read); shard_hash_hex (may be NULL) then receives that
     * file's XXH3-128 (lm_xxh128.h; 32 hex digits), computed as the file is written (lm_st_writer_hash_begin), before it is
     * renamed; the stats' hash_cpu_seconds what hashing took */
    int one_shard;
    size_t only_shard;
    char *shard_hash_hex; /* [65] */
    /* NULL, or per file (shard_paths' order; [0] for one file; not with one_shard): its plain
     * SHA-256 (64 hex digits), computed as it is written (lm_st_writer_hash_begin_sha256), so that
     * the report (--json) need not read it back, which drop-behind would make a read from the disk */
    char (*file_sha256)[65];
} lm_exec_opts;

typedef struct lm_exec_stats {
    uint64_t bytes_written, bytes_copied, bytes_computed;
    size_t n_tiles, n_copied_tensors, n_computed_tensors;
    int n_threads;
    size_t n_exact_tensors;   /* tensors computed by the exact low-rank path */
    uint64_t n_exact_elems;   /* their elements */
    uint64_t n_recomputed;    /* of those, recomputed in f64 (not certified by the fast path) */
    uint64_t n_fixed_point;   /* of those, rounded from the exact fixed-point value */
    double hash_cpu_seconds;  /* shard_hash_hex: CPU seconds spent hashing the shard */
} lm_exec_stats;

/*! lm_exec_run() :
 *  Writes the plan's output to out_path (through a temporary file and a rename).
 *  @return LM_OK, or an error with *err filled; no output or temporary file is left then. */
lm_code lm_exec_run(const lm_plan *plan, const lm_model *model, lm_adapter *const *adapters,
                    const char *out_path, const lm_exec_opts *opts, lm_exec_stats *stats,
                    lm_err *err);

/*! lm_exec_run_batch() :
 *  Runs n_jobs plans of one model in one pass (lora-merge batch): a tile or copy chunk of the
 *  base that several jobs need is read once and used by each in turn (a copy chunk: the jobs'
 *  in-kernel copies follow each other, so the base is read from disk once).  opts[j] and
 *  stats[j] are job j's; the thread count, kernels and progress callback are opts[0]'s.  Every
 *  job's files are written and checked (before_commit) before any is committed; then job by job
 *  its files are renamed and its after_commit runs.  Each job's files are byte-identical to
 *  lm_exec_run() of its plan alone.
 *  @return LM_OK, or an error with *err filled and *failed_job (may be NULL) the job it concerns;
 *  the jobs before it that reached their commit are committed, the others leave nothing. */
lm_code lm_exec_run_batch(size_t n_jobs, const lm_plan *const *plans, const lm_model *model,
                          const char *const *out_paths, const lm_exec_opts *opts, lm_exec_stats *stats,
                          size_t *failed_job, lm_err *err);

#endif
