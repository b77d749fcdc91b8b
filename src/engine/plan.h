/* plan.h : the planner.  Turns adapters into a plan: for every output tensor, what it becomes
 * (copied, converted, or computed by a list of operations).  Reads headers and configs only,
 * never writes; every check that can fail (names, shapes, ranks, dtypes) runs here, before the
 * output file exists. */
#ifndef LM_PLAN_H
#define LM_PLAN_H

#include "adapter_load.h"
#include "lora_merge.h"

typedef enum {
    LM_OP_REPLACE = 0, /* W <- src (modules_to_save, bias="all", saved embeddings) */
    LM_OP_LOWRANK,     /* W += scale * B@A (transposed: W += scale * (B@A)^T) */
    LM_OP_BIAS_ADD,    /* b += scale * src (lora_bias) */
    LM_OP_ROWS,        /* W[rows[k], :] <- src[k, :] (trainable tokens) */
    LM_OP_DORA,        /* W <- m / ||W|| * W, norm per row (axis 0) or per column (axis 1) */
    LM_OP_SCALE,       /* IA3: W[r, :] *= a[r] (axis 0) or W[:, c] *= a[c] (axis 1) */
    LM_OP_HADAMARD,    /* LoHa: W += scale * (a@b) * (c@d) (elementwise) */
    LM_OP_KRON,        /* LoKr: W += scale * kron(w1, w2), w1 = a (or a@b), w2 = c (or c@d) */
    LM_OP_HIRA,        /* HiRA: W += scale * W * (B@A) (transposed like LOWRANK) */
    LM_OP_SPARSE,      /* SHiRA: W[rows[t], cols[t]] += scale * a[t] */
    LM_OP_HRA,         /* HRA: W <- W @ H, Householder reflections from a = hra_u [in, r] */
    LM_OP_MISS,        /* MiSS: W[o, c] += scale * a[c mod r, o mod kd] */
    LM_OP_OFT,         /* OFT: W <- W @ blockdiag(R_j)^T, R_j from a = oft_R [blocks, bs(bs-1)/2];
                          BOFT (one butterfly factor, k2 & 4): R_j = Cayley(X_j - X_j^T)/2 from
                          a = boft_R [1, blocks, bs, bs], rows then scaled by b = boft_s */
    LM_OP_ROAD,        /* RoAd: W <- R @ W, 2x2 rotations of row pairs (p, p + g/2) in groups of kd rows */
    LM_OP_C3A,         /* C3A: W[p b + u, q b + v] += scale * a[p, q, (v - u) mod b] / in */
} lm_op_kind;

enum { LM_DERIVE_NONE = 0, LM_DERIVE_DELORA, LM_DERIVE_GRALORA, LM_DERIVE_VBLORA, LM_DERIVE_RANDLORA,
       LM_DERIVE_FOURIER };

typedef struct lm_op {
    lm_op_kind kind;
    size_t adapter;            /* index of the adapter it comes from */
    const char *module;        /* module path (owned by the plan) */
    const lm_ts_tensor *a, *b; /* LOWRANK: a = A [rank, in], b = B [out, rank]; others: a = source */
    const lm_ts_tensor *e;     /* LOWRANK (AdaLoRA): row k of A is scaled by e[k] */
    const lm_ts_tensor *c, *d; /* HADAMARD, KRON: the second factor pair (d may be NULL for KRON);
                                  LOWRANK (VeRA): lambda_b, lambda_d scaling B[:out] and A[:, :in] */
    uint64_t kb, kd;           /* KRON: w2 is [kb, kd] */
    int derive;                /* LOWRANK whose factors the executor builds from x[] (LM_DERIVE_*) */
    const lm_ts_tensor *x[4];
    uint64_t k1, k2;           /* derive parameters (GraLoRA: k, rank r; VB-LoRA: topk) */
    uint64_t rank, in, out;
    int transposed;            /* W is stored [in, out] (Conv1D, Embedding) */
    int dora_axis;             /* DORA and SCALE: 0 per row, 1 per column of the 2-D view */
    float scale;
    double scale_f64;
    const long *rows;          /* ROWS: borrowed from the adapter config; SPARSE: rows then columns
                                  (2 * n_rows, owned by the plan) */
    size_t n_rows;
} lm_op;

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
    size_t n;
    size_t *data_order; /* data layout order (the base's data order, then new tensors) */
    const char **meta_keys, **meta_values; /* borrowed from the base's first file */
    size_t n_meta;
    char **notes;       /* owned: one-line remarks for the report (skipped modules ...) */
    void **blobs;       /* owned arrays referenced by ops */
    size_t n_blobs, cap_blobs;
    size_t n_notes;
    char **modules;     /* owned strings referenced by ops */
    size_t n_modules, cap_modules;
    size_t n_lowrank, n_replaced, n_new, n_changed;
    double lowrank_flops;
} lm_plan;

typedef struct lm_plan_opts {
    int out_dtype_set;   /* --dtype other than auto: floating tensors become out_dtype */
    lm_dtype out_dtype;
} lm_plan_opts;

/*! lm_plan_create() :
 *  Resolves every adapter module to one base tensor and checks names, shapes, ranks, dtypes.
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

#endif
