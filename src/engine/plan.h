/* SPDX-License-Identifier: MIT */
/* plan.h : the planner.  Turns adapters into a plan: for every output tensor, what it becomes
 * (copied, converted, or computed by a list of operations).  The generic loop here names no
 * adapter type: it groups each adapter's tensors into modules by the parts the methods declare
 * (methods/method.h), applies the config's targeting rules, and lets the adapter's method plan
 * its modules.  Reads headers, configs and the few adapter tensors that are indices; never
 * writes; every check that can fail runs here, before the output file exists. */
#ifndef LM_PLAN_H
#define LM_PLAN_H

#include "adapter_load.h"
#include "lora_merge.h"
#include "method.h"

typedef struct lm_plan_tensor {
    char *name;                  /* owned */
    lm_dtype dtype;              /* output dtype */
    lm_dtype src_dtype;          /* dtype of the input bytes (base, or the replacing tensor) */
    size_t n_dims;
    const uint64_t *shape;       /* borrowed from the base or the adapter tensor */
    const lm_model_entry *base;  /* NULL for a tensor the adapter adds */
    uint64_t rows, cols;         /* 2-D view: rows = shape[0], cols = the rest */
    lm_op *ops;                  /* owned */
    size_t n_ops, cap_ops;
} lm_plan_tensor;

typedef struct lm_plan {
    lm_plan_tensor *t;  /* output tensors in header order: the base's, then new ones */
    size_t n, cap;
    size_t *data_order; /* data layout order (the base's data order, then new tensors) */
    const char **meta_keys, **meta_values; /* borrowed from the base's first file */
    size_t n_meta;
    char **notes;       /* owned: one-line remarks for the report (skipped modules ...) */
    size_t n_notes;
    void **blobs;       /* owned: op parameters, module strings, data read at plan time */
    size_t n_blobs, cap_blobs;
    size_t n_lowrank, n_replaced, n_new, n_changed;
    double lowrank_flops;
} lm_plan;

typedef struct lm_plan_opts {
    int out_dtype_set;   /* --dtype other than auto: floating tensors become out_dtype */
    lm_dtype out_dtype;
} lm_plan_opts;

/*! lm_plan_create() :
 *  Resolves every adapter module to its base tensors and checks names, shapes, ranks, dtypes.
 *  @return a plan, or NULL with *err filled (err->tensor names the module).
 *  Ownership: lm_plan_free(); the plan borrows model and adapters, which must outlive it. */
lm_plan *lm_plan_create(const lm_model *model, lm_adapter *const *adapters, size_t n_adapters,
                        const lm_plan_opts *opts, lm_err *err);
void lm_plan_free(lm_plan *p);

/*! lm_resolve_base_name() : the base tensor for `name` as written in the adapter: the exact
 *  name, else with non-numeric leading components dropped and/or the base's own leading
 *  components added.  @return the entry index, or -1 (none; err filled) or -2 (several). */
long lm_resolve_base_name(const lm_model *model, const char *name, lm_err *err);

/*! plan_note() : appends a one-line remark to the plan's notes (shown in the report). */
lm_code plan_note(lm_plan *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*! lm_plan_describe_modules() : the adapter's modules grouped by leaf name, kind, rank, alpha
 *  and scale (through the patterns), whether the config targets them, and the full tensors.
 *  @return LM_OK with *text (malloc'd lines). */
lm_code lm_plan_describe_modules(const lm_adapter *ad, char **text, lm_err *err);

/*! lm_plan_tile_rows() : rows per tile of plan tensor t (depends on its shape, its ops and
 *  tile_elems only; 0 = the default) */
uint64_t lm_plan_tile_rows(const lm_plan_tensor *t, uint64_t tile_elems);

#endif
