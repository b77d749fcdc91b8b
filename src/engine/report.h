/* SPDX-License-Identifier: MIT */
/* report.h : what a merge says about itself: notes, warnings with stable codes, the files
 * written, the plan text and the JSON report (a stable, documented format: README "The JSON
 * report"), the description of a model or an adapter (inspect).  Builds text; prints nothing
 * (the CLI does). */
#ifndef LM_REPORT_H
#define LM_REPORT_H

#include "adapter_load.h"
#include "lora_merge.h"
#include "plan.h"
#include "tensor_stats.h"

#define LM_REPORT_VERSION 1 /* bumped only when a field changes meaning or disappears */


enum { LM_PHASE_OPEN = 0, LM_PHASE_PLAN, LM_PHASE_PREPARE, LM_PHASE_WRITE, LM_PHASE_FINISH, LM_PHASE_HASH,
       LM_PHASE_COUNT };

typedef struct lm_report_impl {
    lm_merge_report pub;
    char **notes;                 /* owned */
    size_t n_notes, cap_notes;
    lm_merge_warning *warnings;   /* owned, with their strings */
    size_t n_warnings, cap_warnings;
    lm_merge_file *files;         /* owned, with their strings */
    size_t n_files, cap_files;
    char **removed;               /* owned */
    size_t n_removed, cap_removed;
    char *plan_text;              /* owned */
    char *json;                   /* owned */
    int oom;                      /* a note, warning or file could not be recorded */
    double phase_seconds[LM_PHASE_COUNT];
    uint64_t *recomputed;         /* owned, [plan->n]: per tensor, the elements the exact path
                                     recomputed in f64 (filled by the executor, exec.h), or
                                     UINT64_MAX for a tensor that does not take that path */
} lm_report_impl;

lm_report_impl *lm_report_new(void);
void lm_report_free(lm_report_impl *ri);

/*! lm_report_note() / lm_report_warn() : append a one-line note, or a warning with a stable
 *  code.  Never fail: an allocation failure sets ri->oom (the caller reports it). */
void lm_report_note(lm_report_impl *ri, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void lm_report_warn(lm_report_impl *ri, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/*! lm_report_take_notes() : moves the plan's notes in front of the report's own. */
void lm_report_take_notes(lm_report_impl *ri, lm_plan *plan);
/*! lm_report_file() : records a file written (or to be written).  sha256 may be NULL. */
void lm_report_file(lm_report_impl *ri, const char *name, const char *path, const char *kind, const char *origin,
                    uint64_t n_bytes, const char *sha256);
void lm_report_removed(lm_report_impl *ri, const char *name);

typedef struct lm_report_ctx {
    const lm_merge_job *job;
    lm_adapter *const *ads;
    const char *const *adapter_sha256;  /* per adapter: of its weights file */
    const lm_plan *plan;
    const lm_tensor_stats *stats;       /* per plan tensor, or NULL */
    const char *out_kind;               /* "file", "directory", or NULL */
    const char *out_dtype;              /* "BF16", "mixed" ... */
    int n_threads;
    const char *kernels;
    uint64_t out_bytes;                 /* bytes of weights written (0 on a dry run) */
    size_t n_exact_tensors;             /* the executor's exact low-rank path (exec.h) */
    uint64_t n_recomputed;
} lm_report_ctx;

/*! lm_report_plan_exact() : ri->recomputed for plan p, before the run: 0 for the tensors that
 *  take the exact low-rank path, UINT64_MAX for the others (what a dry run reports). */
lm_code lm_report_plan_exact(lm_report_impl *ri, const lm_plan *p, lm_err *err);

/*! lm_report_finish() : fills the public numbers, the plan text and the JSON text. */
lm_code lm_report_finish(lm_report_impl *ri, const lm_report_ctx *c, lm_err *err);

#endif
