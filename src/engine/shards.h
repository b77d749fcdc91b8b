/* SPDX-License-Identifier: MIT */
/* shards.h : shard jobs.  One model directory OUT written by N independent processes (a Slurm
 * job array, a Kubernetes Indexed Job), then committed by one finalize step.
 *
 * Every process builds the same global plan from the headers alone (so a tensor that needs data
 * of another input shard, a tied head or experts split across files, is planned once and each
 * worker knows what to read), and the same layout: output shard k mirrors input shard k (same
 * name, same tensors, new tensors in the last one) when the base is sharded safetensors and no
 * --max-shard-size is given, else the deterministic size split of output.c.  The plan's
 * fingerprint (layout, tensors, ops, adapters' bytes, options) is recorded in
 * OUT/.lora-merge-shards/plan.json by the first worker; a worker with another fingerprint
 * (other adapters or options) is refused.
 *
 * Worker I of N writes the shards k with lm_shards_owners()[k] == I (balanced by bytes; with
 * shards of equal size k % N == I) and nothing else, straight into OUT (no
 * staging directory: the workers share OUT).  Each shard goes through a temporary name, its
 * XXH3-128 (lm_xxh128.h: a 128-bit integrity check against truncation and corruption, not a
 * cryptographic digest; ~8x cheaper than SHA-256 with SHA-NI) is computed as it is written
 * (lm_st_writer_hash_begin: no read-back of the finished file), it is renamed into place, then its
 * sidecar OUT/.lora-merge-shards/<shard>.json
 * (fingerprint, size, xxh3_128, and the file's identity: inode, mtime, ctime; for the record the
 * worker's seconds, hashing CPU and threads) is written.  Workers never remove anything but their own temporary files.
 *
 * A shard is complete and verified when it is present, its sidecar is of this plan, its size is
 * the plan's, and either its identity is still the recorded one (nothing changed it through the
 * filesystem since its worker hashed it: a write in place, a truncation, a file renamed over it
 * all change ctime at least, which only the kernel sets) or, read back, it hashes to the
 * sidecar's xxh3_128.  With job->shard_verify every shard is read back.  A rerun skips shards
 * complete and verified; finalize verifies every shard, refuses naming the ones that are not,
 * then writes the side files, model.safetensors.index.json LAST (the commit record), removes
 * files of an earlier merge and the sidecars. */
#ifndef LM_SHARDS_H
#define LM_SHARDS_H

#include "exec.h"
#include "model_files.h"
#include "output.h"
#include "plan.h"
#include "report.h"

#define LM_SHARDS_DIR ".lora-merge-shards"

typedef struct lm_shard_ctx {
    const lm_merge_job *job;
    const lm_plan *plan;
    const lm_model *model;
    lm_adapter *const *ads;
    lm_out_target *ot;           /* layout from lm_shards_layout() */
    const lm_side_plan *side;
    lm_report_impl *ri;
    const lm_exec_opts *eo;      /* threads, kernels ...: copied per shard */
    lm_exec_stats *st;           /* accumulated over the shards written */
    char (*shard_sha)[65];       /* finalize: [n_shards] receives each verified shard's plain
                                  * sha256, read back (--json; may be NULL) */
    char (*ad_sha256)[65];       /* each adapter's weights file's sha256, hashed already (may be NULL) */
} lm_shard_ctx;

/*! lm_shards_layout() : the output layout every worker computes alike (see above). */
lm_code lm_shards_layout(lm_out_target *o, const lm_merge_job *job, const lm_plan *p, const lm_model *m,
                         lm_err *err);

/*! lm_shards_fingerprint() : sha256 (hex) of everything that decides the output's bytes (the
 *  base's values by a sample: 32 bytes at the start and the middle of every base tensor). */
lm_code lm_shards_fingerprint(const lm_shard_ctx *C, char fp[65], lm_err *err);

/*! lm_shards_owners() : owner[k] = the worker (0 .. count-1) that writes shard k of n, balanced
 *  by bytes: the shards taken largest first (ties: lower k), each given to the worker with the
 *  fewest bytes so far (ties: the lower worker).  Shards of equal size go round-robin, k % count.
 *  0, or -1 out of memory. */
int lm_shards_owners(const uint64_t *bytes, size_t n, unsigned count, unsigned *owner);

/*! lm_shards_work() : worker job->shard_index of job->shard_count (see above). */
lm_code lm_shards_work(lm_shard_ctx *C, lm_err *err);

/*! lm_shards_finalize() : the commit step (see above); LM_E_MISMATCH "ShardsIncomplete" naming
 *  the shards missing or not verified, nothing written then. */
lm_code lm_shards_finalize(lm_shard_ctx *C, lm_err *err);

#endif
