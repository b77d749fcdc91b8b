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
#include "quant.h"

/* a quantized base weight (plan_quant.c): its format and scales; the methods see `view`, the
 * weight as an F32 tensor of the same shape, and the tile loader dequantizes it.  Everything the
 * executor does with its codes and scales goes through exec_quant.c, which dispatches on fmt. */
typedef struct lm_qtensor {
    lm_qformat fmt;
    const lm_model_entry *scale; /* the scale tensor (weight_scale_inv, weight_scale ...) */
    size_t scale_index;          /* its model entry / plan index (before dropping) */
    lm_dtype scale_dtype;        /* of scale: F32, BF16, F16, F8_E4M3 or U8 = E8M0 (read exactly as f32) */
    const lm_model_entry *scale2; /* NVFP4's second (global) scales, or NULL */
    size_t scale2_index;
    uint64_t n_scale2;           /* how many (0: one); each covers scale2_rows consecutive rows, whose
                                  * merged amax it follows (an expert stack: one per expert) */
    uint64_t scale2_rows;
    uint64_t br, bc;             /* block rows and columns (one scale each) */
    uint64_t srows, scols;       /* the scale grid */
    uint64_t tile_rows;          /* tiles are whole multiples of these rows (br, or every row when
                                  * requantizing needs the whole tensor's amax) */
    uint64_t row_bytes;          /* bytes of codes per row (cols for 8-bit codes, cols / 2 packed 4-bit) */
    int needs_amax;              /* requantizing needs the merged tensor's amax (a per-tensor scale;
                                  * NVFP4: one per second scale): the executor computes it in a pass
                                  * before the tiles */
    const void *ext;             /* the format's own (plan blob; bitsandbytes: lm_bnb_qinfo), or NULL */
    lm_tensor_info view;         /* what the methods see (dtype F32) */
    int out_transposed;          /* written dequantized as [E, in, out] from the view's rows [E, out, in]
                                  * (gpt-oss MXFP4 experts, plan_quant_mx.c) */
} lm_qtensor;

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
    const lm_qtensor *q;         /* a quantized base weight (plan blob), or NULL */
    size_t scale_of;             /* a scale tensor rewritten by the tiles of weight scale_of - 1; 0: none */
    int drop;                    /* not written (a scale of a weight written dequantized); removed by the planner */
    int sim_nf4;                 /* --simulate-nf4: the base values go through NF4 quantize/dequantize
                                    (blocks of 64 over the flattened tensor) as they are loaded */
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
    const lm_qscheme *quant; /* the base's quantization_config, or NULL (none) */
    const char *model_type;  /* the base's config.json model_type, or NULL (none) */
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

/*! lm_plan_quant_attach() : (plan_quant.c) marks the quantized base weights and their scales
 *  (p->t[i] is model entry i); views[i] receives the F32 view the methods get for entry i.
 *  @return LM_OK, or an error naming the tensor (missing scale, bad scale shape or dtype). */
lm_code lm_plan_quant_attach(lm_plan *p, const lm_model *model, const lm_qscheme *s, const lm_plan_opts *o,
                             const lm_tensor_info **views, lm_err *err);
/*! lm_plan_quant_skips() : (plan_quant.c) 1 when the module of tensor name (the name without
 *  its last component) is listed as left unquantized, by its entry's library rule
 *  (lm_qskip_rule); an entry that is no valid pattern for the regex subset matches only exactly */
int lm_plan_quant_skips(const lm_qscheme *s, const char *name);
/*! lm_plan_quant_is_mx_blocks() / lm_plan_quant_attach_mx() : (plan_quant_mx.c) a gpt-oss MXFP4
 *  "P_blocks" tensor, and marking it (its view [E, out, in], its scales; --dtype: renamed P,
 *  [E, in, out]).  @return LM_OK, or an error naming the blocks or scales */
int lm_plan_quant_is_mx_blocks(const lm_qscheme *s, const lm_tensor_info *w);
lm_code lm_plan_quant_attach_mx(lm_plan *p, const lm_model *model, const lm_plan_opts *o, size_t i,
                                const lm_tensor_info **views, lm_err *err);
/*! lm_plan_quant_scale_shape() : (plan_quant.c) LM_OK when the scale tensor sc has the shape
 *  want[0..n); else a one-line QuantScale error naming it: "<fmt> scale tensor '<name>' is [..]:
 *  expected [..] (<why>)" */
lm_code lm_plan_quant_scale_shape(const lm_tensor_info *sc, const uint64_t *want, size_t n, const char *fmt,
                                  const char *why, lm_err *err);
/*! lm_plan_quant_finish() : after planning: the scales of changed weights kept quantized are
 *  written by the weights' tiles; dropped tensors leave the plan.  @return LM_OK or NOMEM. */
lm_code lm_plan_quant_finish(lm_plan *p, lm_err *err);
/*! lm_base_pread() : n_bytes of base file f at offset off (from the start of the file) into dst,
 *  with pread (EINTR retried); a short file (cut during the merge: InputChanged) or a read error is
 *  a one-line error naming the tensor and the file.  f must have a descriptor. */
lm_code lm_base_pread(const lm_st_file *f, uint64_t off, void *dst, uint64_t n_bytes, const char *tensor, lm_err *err);
/*! plan_blob() : n_bytes zeroed, freed with the plan */
void *lm_plan_blob(lm_plan *p, size_t n_bytes);

/*! lm_plan_tile_rows() : rows per tile of plan tensor t (depends on its shape, its ops and
 *  tile_elems only; 0 = the default) */
uint64_t lm_plan_tile_rows(const lm_plan_tensor *t, uint64_t tile_elems);

/*! lm_plan_tensor_bytes() : the bytes plan tensor t takes in the output (its shape in its dtype);
 *  lm_plan_out_bytes() : the same summed over the plan (every shard; the headers left out) */
uint64_t lm_plan_tensor_bytes(const lm_plan_tensor *t);
uint64_t lm_plan_out_bytes(const lm_plan *p);

#endif
