/* SPDX-License-Identifier: MIT */
/* method.h : what an adapter type is to the rest of lora-merge.
 * A type (LoRA, IA3, OFT ...) is one file in src/methods/ that ends with a `const lm_method`;
 * registry.c is the only list of them.  A method declares the tensor names it owns (parts), reads
 * its own adapter_config.json keys, plans its modules (every check that can fail on input runs
 * there, so --dry-run refuses exactly what a real run refuses), prepares its factors for one
 * tensor at a time (when the tensor's first tile is claimed; freed after its last), and applies
 * itself to a row tile.  The engine keeps a few op kinds (lm_op_kind); anything else is a
 * method's own tile function.  Nothing here reads files or writes output. */
#ifndef LM_METHOD_H
#define LM_METHOD_H

#include "adapter_load.h"
#include "lm_kernels.h"
#include "lora_merge.h"

#include <cJSON.h>

struct lm_method;
typedef struct lm_plan_ctx lm_plan_ctx; /* the planner's state for one adapter (engine/plan.c) */

/* ---- the engine's op kinds -------------------------------------------------------------- */
typedef enum {
    LM_OP_REPLACE = 0, /* the tile is loaded from op->src instead of the base (always op 0) */
    LM_OP_ROWS,        /* W[rows[k], :] <- src[k, :] */
    LM_OP_LOWRANK,     /* W += scale * B' @ A' (axis 1: W stored [in, out], so (B' @ A')^T);
                          A' [rank, in] and B' [out, rank] come from the method's prepare */
    LM_OP_ADD,         /* W += scale * src (same number of elements: bias deltas) */
    LM_OP_SCALE,       /* W[r, :] *= src[r] (axis 0) or W[:, c] *= src[c] (axis 1) */
    LM_OP_NORM,        /* DoRA: W <- src / (||W|| + eps) * W, norm per row (axis 0) or per column
                          (axis 1; or per group of columns) */
    LM_OP_METHOD,      /* op->method->apply_tile() */
    LM_OP_COUNT
} lm_op_kind;

typedef struct lm_op {
    lm_op_kind kind;
    const struct lm_method *method; /* the type that planned it */
    const char *name;        /* what the report calls it ("lora", "dora", "ia3" ...; static) */
    size_t adapter;          /* index of the adapter it comes from */
    const char *module;      /* module path (owned by the plan) */
    const lm_ts_tensor *src; /* REPLACE, ROWS, ADD, SCALE, NORM: the adapter tensor read */
    double scale;            /* LOWRANK, ADD, METHOD: the factor applied (user weight included) */
    int axis;                /* SCALE, NORM: 0 per row, 1 per column; LOWRANK: 1 = transposed */
    uint64_t rank, in, out;  /* LOWRANK: the factors' shapes */
    uint64_t row0;           /* LOWRANK: the delta covers rows row0 .. row0 + (axis ? in : out) - 1
                                of the tensor's view (a block: one expert of a fused MoE stack) */
    const long *rows;        /* ROWS: target rows (borrowed from the config) */
    size_t n_rows;
    uint64_t row_align;      /* tiles of this tensor start at multiples of it (0, 1: any row) */
    double eps;              /* NORM: added to every norm (LyCORIS DoRA: 2^-23; PEFT: 0) */
    uint64_t group;          /* NORM axis 1: consecutive columns that share one norm (a conv
                                kernel's input channel: kh * kw; 0 or 1: each column its own) */
    int mix;                 /* NORM: the factor f becomes scale * (f - 1) + 1 (LyCORIS's
                                multiplier of a DoRA module; the delta itself is not weighted) */
    double flops;            /* arithmetic per merge of this op (for the report) */
    void *params;            /* LOWRANK, METHOD: the method's own parameters (owned by the plan,
                                freed with free()) */
} lm_op;

/* What prepare() builds for one op; everything in owned[] is freed with free() after the
 * tensor's last tile. */
#define LM_PREP_OWNED 12
typedef struct lm_prepared {
    const float *a, *b; /* LOWRANK: A' [rank, in] and B' [out, rank], row-major f32;
                           generic ops: a = op->src as f32 */
    const double *a64, *b64; /* LOWRANK, optional: the same factors in f64 when the method derives
                                them in f64 (the exact path then uses these, not a and b); NULL:
                                a and b are the factors exactly */
    const void *data;   /* METHOD: the method's own */
    const float *base;  /* LM_M_READS_BASE: the tensor's input values as f32, [rows, cols] of its tiles'
                           view (exact for BF16/F16/F32 bases), during prepare() only: the engine frees
                           it when prepare returns, so a method copies what it keeps */
    void *owned[LM_PREP_OWNED];
    size_t n_owned;
    const lm_ts_tensor *read[LM_PREP_OWNED]; /* adapter tensors read (lm_prep_read): their mapped
                                                pages are dropped after the tensor's last tile */
    size_t n_read;
    /* called (serialized with every prepare) before owned[] is freed; may be NULL */
    void (*destroy)(struct lm_prepared *p);
} lm_prepared;

/* One row tile in f32: rows r0 .. r0+nr of the tensor's 2-D view [rows, cols]. */
typedef struct lm_tile {
    float *acc;      /* nr * cols, row-major: W on entry, the result on return */
    float *scratch;  /* room for 2 * nr * cols floats, contents undefined */
    uint64_t r0, nr, rows, cols;
    const lm_kernels *k;
} lm_tile;

/* The same tile in f64, for the exact path (engine/exec_exact.h, LM_EXACT_F64): acc holds the
 * tensor's values exactly (bf16/f16/f32 bases widened), every op of the tensor updates it in f64
 * in plan order, and the engine rounds each element ONCE from f64 to the output dtype.  So an
 * apply_tile64 computes PEFT's formula in double precision from the stored adapter values (its
 * prepared factors built in f64 where it derives them: Cayley transforms, Householder products),
 * never through an f32 intermediate, and leaves the rounding to the engine. */
typedef struct lm_tile64 {
    double *acc;      /* nr * cols, row-major: W on entry, the result on return */
    double *scratch;  /* room for 2 * nr * cols + 64 doubles, contents undefined */
    uint64_t r0, nr, rows, cols;
    const lm_kernels *k;
} lm_tile64;

/* what a certify_tile hook recomputed in f64 (exec_exact.h's lm_certify_stats) */
typedef struct lm_cert_counts {
    uint64_t n_recomputed; /* elements the bound left uncertain: elem64 */
    uint64_t n_overflow;   /* of those, a finite value beyond the output's range (written as inf) */
    uint64_t n_nonfinite;  /* of those, an inf/NaN value */
} lm_cert_counts;

/* ---- the adapter's tensors, grouped by module -------------------------------------------- */
#define LM_MAX_PARTS 40

/* A tensor name a method owns: "<module>.<name>[.<adapter name>][.weight|.bias]".  A numbered
 * part, declared "<name>.#" (nn.ModuleList members such as "peanut_encoders.<k>.weight"), is
 * "<module>.<name>.<k>[...]" with k < the method's n_index, in slot slot + k. */
typedef struct lm_part {
    const char *name;  /* "lora_A", "hada_w1_a", "peanut_encoders.#" ...; or two components
                          ("glora_A.Xd": PEFT's ModuleDict of a sub-module's parameters) */
    int slot;          /* index into lm_module.part[] (the first of n_index for a numbered part) */
    int bias_slot;     /* slot of "<name>.bias" (lora_B.bias), or -1 */
    int max_tail;      /* components allowed after the name (and index): 1 ("default" or
                          "weight"), 2 */
} lm_part;

typedef struct lm_module {
    char *path;                             /* owned: "model.layers.0.self_attn.q_proj" */
    const struct lm_method *method;         /* whose parts these are */
    const lm_ts_tensor *part[LM_MAX_PARTS]; /* by slot; NULL when absent */
} lm_module;

/* ---- a method -------------------------------------------------------------------------- */
enum {
    LM_M_PATTERNS = 1,      /* rank_pattern / alpha_pattern apply */
    LM_M_ALPHA_KEY = 2,     /* its alpha is the config key "alpha", not "lora_alpha" */
    LM_M_PARTS_ANYWHERE = 4, /* its parts are accepted in adapters of any type (trainable tokens) */
    LM_M_NO_RANK = 8,        /* 'r' means nothing to it (OFT, BOFT: a block size instead) */
    LM_M_UNIT_WEIGHT = 16,   /* not a delta (rotations, scalings, replacements): an adapter of this
                                type takes no weight other than 1 (--scale, --adapter-scaled) */
    LM_M_READS_BASE = 32     /* its prepare() derives factors from the base weight (PEANuT, PSOFT):
                                lm_prepared.base holds the tensor's values while prepare runs */
};

typedef struct lm_method {
    const char *peft_type; /* as adapter_config.json says: "OFT" */
    const char *summary;   /* one line for inspect and the README */
    const lm_part *parts;
    size_t n_parts;
    const char *const *shared; /* adapter-level tensors after "base_model." ("vera_A"), NULL-ended */
    unsigned n_index;          /* numbered parts ("<name>.#"): indices 0 .. n_index - 1 accepted */
    unsigned flags;            /* LM_M_* */
    /* reads the method's own keys into cfg->mcfg (may be NULL: nothing to read) */
    lm_code (*parse_config)(const cJSON *root, lm_adapter_config *cfg, lm_err *err);
    void (*free_config)(void *mcfg);
    /* plans one targeted module: checks its parts and adds ops through the lm_ctx_* calls */
    lm_code (*plan_module)(lm_plan_ctx *ctx, const lm_module *m, lm_err *err);
    /* may be NULL: 1 when the type targets a module that target_modules does not name (LoRA's
     * target_parameters, the out_proj of a targeted nn.MultiheadAttention); ctx is NULL when
     * inspect describes an adapter without a base */
    int (*claims_module)(lm_plan_ctx *ctx, const lm_adapter_config *cfg, const lm_module *m);
    /* instead of plan_module, when a module's plan depends on its siblings (LoRA orientation) */
    lm_code (*plan_adapter)(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, lm_err *err);
    /* LOWRANK and METHOD ops: builds what apply needs; fails only when out of memory */
    lm_code (*prepare)(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err);
    /* METHOD ops: updates the tile; never fails.  The fast f32 path: tensors no certified path
     * takes, and every tensor under the benchmark's --exactness-off */
    void (*apply_tile)(const lm_op *op, const lm_prepared *p, const lm_tile *t);
    /* METHOD ops, optional: the same update in f64 (lm_tile64), from the same prepare().  A tensor
     * whose every op is such a method op or an engine op with an f64 form (ROWS, LOWRANK, ADD,
     * SCALE) takes the exact f64 path: computed in f64, rounded once (issue 10); NULL: the type is
     * not certified (its tensors stay on the f32 path).  Never fails */
    void (*apply_tile64)(const lm_op *op, const lm_prepared *p, const lm_tile64 *t);
    /* METHOD ops, optional (with apply_tile64 and elem64): the exact path's fast form for bf16/f16
     * outputs of a tensor with this one op.  t->acc gets apply_tile's f32 result and bound[e] an
     * upper bound of |acc[e] - the value apply_tile64 computes| (+inf or NaN: unknown).  The
     * engine writes RNE(acc[e]) where acc[e] +- bound[e] rounds to one finite value (then it is
     * the f64 value's rounding too) and asks elem64 for the others (exec_exact.h) */
    void (*apply_tile_bound)(const lm_op *op, const lm_prepared *p, const lm_tile *t, float *bound);
    /* the f64 value of element (row, col) from the input row `in` (its cols values, f32, exact): PEFT's
     * formula in f64 as apply_tile64 computes it, the sums in any order the bound covers (so the
     * certified elements are the f64 path's; these may differ from it within f64 noise) */
    double (*elem64)(const lm_op *op, const lm_prepared *p, const float *in, uint64_t row, uint64_t col,
                     uint64_t cols);
    /* METHOD ops, optional (with apply_tile64, and with apply_tile_bound and elem64 if it certifies
     * an f32 result): apply_tile_bound and the engine's certify pass in one sweep over the tile, or
     * the f64 tile by row blocks (lm_f64_rows_tile).  t->acc holds the input rows (left intact), dst [nr, cols] gets
     * every element's output bits (out: bf16 or f16), the bytes the two passes write; the elements
     * it recomputed by elem64 are counted in st.  -1: out of memory */
    int (*certify_tile)(const lm_op *op, const lm_prepared *p, const lm_tile *t, lm_kdtype out, uint16_t *dst,
                        struct lm_cert_counts *st);
    /* METHOD ops, optional (with certify_tile): the same from the tile's input bytes raw [nr, cols]
     * of dtype in (f32, bf16 or f16), converted as they are read (t->acc and t->scratch unused);
     * n_changed (or NULL; in == out only) gets the count of output elements whose bits differ
     * from raw's.  -1: out of memory */
    int (*certify_raw)(const lm_op *op, const lm_prepared *p, const lm_tile *t, const void *raw, lm_kdtype in,
                       lm_kdtype out, uint16_t *dst, struct lm_cert_counts *st, uint64_t *n_changed);
    /* inspect: what the module does ("oft (block rotations, Cayley-Neumann)"); may be NULL */
    void (*describe)(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap);
    /* inspect: the type's settings, whole lines ("r: 8, lora_alpha: 16, scale: 2 (alpha/r)\n");
     * may be NULL */
    void (*describe_config)(const lm_adapter_config *cfg, char *buf, size_t cap);
} lm_method;

/* ---- registry.c ------------------------------------------------------------------------- */
/*! lm_method_find() : the method for a peft_type, or NULL. */
const lm_method *lm_method_find(const char *peft_type);
/*! lm_method_count() / lm_method_at() : every method, in registry order. */
size_t lm_method_count(void);
const lm_method *lm_method_at(size_t i);
/*! lm_method_part() : the part `name` of m ("peanut_encoders" finds "peanut_encoders.#"), or NULL. */
const lm_part *lm_method_part(const lm_method *m, const char *name, size_t name_len);

/* ---- what a method may call while planning (engine/plan.c) ------------------------------ */
const lm_adapter *lm_ctx_adapter(const lm_plan_ctx *ctx);
size_t lm_ctx_adapter_index(const lm_plan_ctx *ctx);
/* a shared tensor of the adapter by its name after "base_model." ("vera_A"), or NULL */
const lm_ts_tensor *lm_ctx_shared(const lm_plan_ctx *ctx, const char *name);
/* base tensor i's header */
const lm_tensor_info *lm_ctx_base(const lm_plan_ctx *ctx, long i);
/* base tensor i's values in double (BF16, F16, F32, F64; not a quantized weight), read now: for a
 * type whose plan depends on the base (AdaMSS's clustering).  out: n_elems doubles.  LM_OK or an
 * error naming the tensor */
lm_code lm_ctx_base_f64(lm_plan_ctx *ctx, long i, double *out, lm_err *err);
/* the number of base tensors (entries 0 .. n - 1) */
size_t lm_ctx_n_base(const lm_plan_ctx *ctx);
/* the base's config.json model_type ("llama"), or NULL when it has none */
const char *lm_ctx_model_type(const lm_plan_ctx *ctx);
/* would PEFT adapt the module at `path` by the adapter's target rules (target_modules,
 * exclude_modules, layers_to_transform ...)?  1, 0, or -1 with *err (a bad regex) */
int lm_ctx_targets(lm_plan_ctx *ctx, const char *path, lm_err *err);
/* "<module>.weight" under any prefix: entry index, or -1 with *err (NoMatchingTensor ...) */
long lm_ctx_module_weight(lm_plan_ctx *ctx, const char *module, lm_err *err);
/* base tensor `name` under any prefix (as "<module>.weight" is found): entry index, or -1 with
 * *err (NoMatchingTensor, AmbiguousModule) */
long lm_ctx_base_named(lm_plan_ctx *ctx, const char *name, lm_err *err);
/* base tensor named exactly `name`, or -1 */
long lm_ctx_base_exact(const lm_plan_ctx *ctx, const char *name);
/* "<module>.bias": entry index, or -1 when the layer has none */
long lm_ctx_module_bias(lm_plan_ctx *ctx, const char *module);
/* the weight of a module whose delta is [out, in]: *orient 0 when stored [out, in], 1 when
 * [in, out] (Conv1D; a square weight follows GPT-2's layer names).  -1 with *err otherwise */
long lm_ctx_weight_for(lm_plan_ctx *ctx, const char *module, uint64_t out, uint64_t in, int *orient,
                       lm_err *err);
/* the input embedding of the base (for tied heads), or -1 when there is none or several */
long lm_ctx_input_embedding(lm_plan_ctx *ctx);
/* r and alpha of a module through rank_pattern / alpha_pattern (defaults: the config's) */
lm_code lm_ctx_rank_alpha(lm_plan_ctx *ctx, const char *module, long *r, double *alpha, lm_err *err);
/* appends an op of `kind` to base tensor `base` (REPLACE goes first); params zeroed,
 * module/adapter/method filled.  @return the op or NULL (out of memory, *err filled) */
lm_op *lm_ctx_add_op(lm_plan_ctx *ctx, long base, lm_op_kind kind, const char *name, const char *module,
                     lm_err *err);
/* "<module>.weight" for a type that handles 2-D weights only: entry index, or -1 with *err
 * (a missing weight, or "<TYPE> on a N-D weight ... is not supported yet") */
long lm_ctx_weight_2d(lm_plan_ctx *ctx, const char *module, lm_err *err);
/* a delta of rank `rank` ([out, in]; transposed: W stored [in, out]) from this module: an op of
 * `kind` (LOWRANK or METHOD) with zeroed typed parameters of params_bytes (op->params), scale =
 * scale * the adapter's weight, flops 2 rank in out; counts the module.  NULL when out of memory */
lm_op *lm_ctx_add_delta(lm_plan_ctx *ctx, long base, lm_op_kind kind, const char *name, const char *module,
                        uint64_t rank, uint64_t in, uint64_t out, int transposed, double scale, size_t params_bytes,
                        lm_err *err);
/* tiles of base tensor `base` see it as [rows, n_elems / rows] instead of [shape[0], rest] (a 3-D
 * expert stack as [E * d1, d2], so that tiles stay small); refused (-1 with *err) when rows does
 * not divide the tensor or another op already uses the default view */
int lm_ctx_view_rows(lm_plan_ctx *ctx, long base, uint64_t rows, lm_err *err);
/* typed parameters for an op, zeroed, owned by the plan */
void *lm_ctx_params(lm_plan_ctx *ctx, lm_op *op, size_t n_bytes, lm_err *err);
/* memory owned by the plan (data read from adapter tensors at plan time, such as indices) */
void *lm_ctx_alloc(lm_plan_ctx *ctx, size_t n_bytes, lm_err *err);
/* counts one adapted module (the report's n_lowrank) */
void lm_ctx_count_module(lm_plan_ctx *ctx);
/* a one-line remark for the report */
lm_code lm_ctx_note(lm_plan_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- helpers for methods (methods/method_util.c) ----------------------------------------- */
/* "<module>.weight" of a Linear layer, or of a Conv2d with a square kernel [o, i, k, k] that PEFT's
 * OFT/HRA Conv2d layers see as [o, i*k*k] (the tiles' view too); *cols = its input dimension.
 * -1 with *err for other shapes (naming the type) */
long lm_ctx_weight_2d_or_conv(lm_plan_ctx *ctx, const char *module, uint64_t *cols, lm_err *err);
int lm_is_float_dtype(lm_dtype dt);
/* ShapeMismatch naming the module.  @return LM_E_MISMATCH */
lm_code lm_mismatch(lm_err *err, const char *module, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* an error of (code, kind) naming the module.  @return code */
/*! lm_cfg_disagrees() : adapter_config.json's `key` (value as the config gives it, after any
 *  pattern) contradicts the module's tensors, which PEFT builds from that value (so PEFT could not
 *  load them either): refused (ConfigMismatch) naming the config file, the key, the value and, by
 *  fmt, what the tensors hold. */
lm_code lm_cfg_disagrees(const lm_plan_ctx *ctx, lm_err *err, const char *module, const char *key, long value,
                         const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/*! lm_cfg_rank_is() : the config's rank for module ('r', or its rank_pattern entry) against the
 *  rank the tensors hold (`tensor` names the one that shows it): lm_cfg_disagrees() when they
 *  differ.  Not checked when the file gives no 'r', when it has a rank_pattern this type does not
 *  read, or for adapters of other tools (their config is made here). */
lm_code lm_cfg_rank_is(lm_plan_ctx *ctx, lm_err *err, const char *module, uint64_t rank, const char *tensor);
/*! lm_cfg_checked() : 1 when the adapter's config is a file of its own that the tensors can be
 *  checked against (0 for adapters of other tools: their config is made here). */
int lm_cfg_checked(const lm_plan_ctx *ctx);
/*! A "<key>_pattern" dict as C3A and FourierFT read it (block_size_pattern, n_frequency_pattern):
 *  PEFT takes the value of the first key k with re.match(rf".*\.{k}$", module), else of the key
 *  equal to the module's path, else the type's default. */
typedef struct lm_suffix_pattern {
    size_t n;
    char **keys;
    long *vals;            /* -1: not a positive integer (not checked) */
    struct lm_regex **re;  /* NULL: a key this regex engine cannot match within its budget */
} lm_suffix_pattern;
/* reads root[name] (absent or null: empty); a value that is not an object: InvalidConfig */
lm_code lm_suffix_pattern_parse(const cJSON *root, const char *name, lm_suffix_pattern *sp, lm_err *err);
void lm_suffix_pattern_free(lm_suffix_pattern *sp);
/* 1 with *val when a key applies to module, 0 when none does, -1 when it cannot be told here */
int lm_suffix_pattern_lookup(const lm_suffix_pattern *sp, const char *module, long *val);
lm_code lm_module_fail(lm_err *err, lm_code code, const char *kind, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
int lm_is_gpt2_conv1d(const char *module);
const char *lm_leaf_of(const char *module);
void lm_shape_str(char *buf, size_t cap, size_t n_dims, const uint64_t *shape);
/* f32 view of an adapter tensor: borrowed when it is aligned F32, else converted into memory
 * owned by p.  @return NULL when out of memory (*err filled) */
const float *lm_prep_view(lm_prepared *p, const lm_ts_tensor *t, const lm_kernels *k, lm_err *err);
/* records that prepare (or the tiles) read t: its pages are dropped from memory with p (lm_prep_view
 * records what it views; call this for tensors read otherwise, e.g. through lm_ts_index) */
void lm_prep_read(lm_prepared *p, const lm_ts_tensor *t);
/* elements off .. off+n of a float adapter tensor as f32 into dst */
void lm_ts_to_f32(const lm_ts_tensor *t, uint64_t off, size_t n, float *dst, const lm_kernels *k);
/* n_floats zeroed floats owned by p */
float *lm_prep_floats(lm_prepared *p, size_t n_floats, lm_err *err);
/* n_bytes (zeroed) owned by p */
void *lm_prep_alloc(lm_prepared *p, size_t n_bytes, lm_err *err);
/* the end of a prepare that derives its factors in f64: p->a = a64 [n_a] rounded to f32 once,
 * p->a64 = a64, and, when b64 is not NULL, p->b = b64 [n_b] rounded, p->b64 = b64 (b64 NULL: p->b
 * stays as the method set it, the saved tensor's view, and p->b64 is NULL).  a64 and b64 stay
 * owned by p (lm_prep_alloc).  @return LM_OK, or LM_E_NOMEM (*err filled) */
lm_code lm_prep_publish64(lm_prepared *p, const double *a64, size_t n_a, const double *b64, size_t n_b, lm_err *err);
/* certify_tile / certify_raw for a type whose exact form is its apply_tile64: the engine's f64
 * tile (f32 -> f64, apply_tile64, one rounding by the f64_round kernel) a few rows at a time, so
 * the f64 rows stay in the cache; the same bytes, every element counted recomputed */
int lm_f64_rows_tile(const lm_op *op, const lm_prepared *p, const lm_tile *t, lm_kdtype out, uint16_t *dst,
                     lm_cert_counts *st);
int lm_f64_rows_raw(const lm_op *op, const lm_prepared *p, const lm_tile *t, const void *raw, lm_kdtype in,
                    lm_kdtype out, uint16_t *dst, lm_cert_counts *st, uint64_t *n_changed);
/* an integer element of an integer (or float holding integers) tensor; -1 for other dtypes */
int64_t lm_ts_index(const lm_ts_tensor *t, uint64_t i);

#endif
