/* SPDX-License-Identifier: MIT */
/* lokr.c : LoKr (peft-merge.md §5.5): W += kron(w1, w2) * alpha/r, w1 whole or w1_a @ w1_b, w2
 * likewise; r always comes from the config (PEFT does so even for whole factors).  Linear
 * weights, and convolution kernels W [o, i, k...] seen as [o, i*k...]: PEFT's kron of w1 [a, c]
 * (unsqueezed to [a, c, 1, 1]) with a 4-D w2 [b, d, kh, kw] is the 2-D kron with w2 flattened to
 * [b, d*kh*kw], and so are the flat form (w2_b [r, d*k...]) and the CP form of Conv1d/Conv2d
 * (lokr_t2 [r, r, kh, kw]: w2[p, q, x] = sum_{i,j} t2[i, j, x] w2_a[i, p] w2_b[j, q], built in
 * prepare).  A whole 3-D lokr_w2 (Conv1d) is refused: PEFT's kron then pads w1 in front and
 * reshapes a scrambled kernel.
 * Exact path (issue 10): prepare also builds the whole factors in f64 (d1, d2: the decomposed ones
 * summed in f64 from the stored values; a whole factor is its stored values), and PEFT's formula in
 * f64 is W + (d1[p, u] d2[q, v]) s (apply_tile64, elem64; the product of two whole factors is exact
 * in f64).  bf16/f16 outputs take the certified f32 form (apply_tile_bound): the f32 result with a
 * bound from e1, e2 = |f32 factor - f64 factor| (per element, from prepare), the elements it leaves
 * uncertain recomputed by elem64 (exec_exact.h). */
#include "method.h"

#include "gemm_tile.h"
#include "linalg.h"
#include "lm_error.h"
#include "lycoris.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { W1, W1A, W1B, W2, W2A, W2B, T2, LYCO_DORA };

typedef struct {
    const lm_ts_tensor *w1, *w1b, *w2, *w2b; /* w1 (or w1_a with w1b = w1_b), w2 likewise */
    const lm_ts_tensor *t2;                  /* CP: lokr_t2 [r, r, kh, kw] (w2 = w2_a [r, b], w2b = w2_b [r, d]) */
    uint64_t kb, kd;                         /* w2 is [kb, kd] (a conv's kd is d * kh * kw) */
} lokr_params;

typedef struct {
    const float *w1, *w2;   /* whole factors [a, c] and [kb, kd] (f32 products, as PEFT: the f32 path) */
    const double *d1, *d2;  /* the same in f64 (products summed in f64 from the stored values: the
                               exact path) */
    const float *e1, *e2;   /* upper bounds of |w - d| per element (NULL: a whole factor, w = d) */
    const double *bq, *ebq; /* per row q of w2: the largest |w2[q, v]| and e2[q, v] (0 without e2) */
    float s;                /* fl32(op->scale) (lokr_apply's) */
    double ds, sabs;        /* >= |s - op->scale|, >= |op->scale| */
} lokr_prep;

typedef struct {
    int db, uee;                /* decompose_both, use_effective_conv2d (-1: not in the file) */
    long df;                    /* decompose_factor */
    int df_given;
} lokr_cfg;

static lm_code lokr_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    lokr_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    const cJSON *db = lm_cfg_field(root, "decompose_both"), *uee = lm_cfg_field(root, "use_effective_conv2d");
    f->db = db ? lm_cfg_truthy(db) : -1;
    f->uee = uee ? lm_cfg_truthy(uee) : -1;
    f->df_given = lm_cfg_field(root, "decompose_factor") != NULL;
    f->df = -1;
    return lm_cfg_int(root, "decompose_factor", &f->df, err);
}

/* PEFT's factorization(dimension, factor) (tuners/lokr/layer.py): m <= n, m * n = dim */
static void lokr_factorize(uint64_t dim, long factor, uint64_t *m, uint64_t *n)
{
    *m = 1;
    *n = dim;
    if (factor > 0 && dim % (uint64_t)factor == 0) {
        *m = (uint64_t)factor;
        *n = dim / *m;
        return;
    }
    while (*m < *n && factor != 0 && (factor == -1 || factor > 0)) {
        uint64_t nm = *m + 1;
        while (dim % nm != 0)
            nm++;
        if (nm + dim / nm > 1 + dim || (factor > 0 && nm > (uint64_t)factor))
            break;
        *m = nm;
        *n = dim / nm;
    }
    if (*m > *n) {
        uint64_t t = *m;
        *m = *n;
        *n = t;
    }
}

/* the factors' forms and shapes against decompose_factor, decompose_both and use_effective_conv2d
 * when the file gives them (PEFT builds the tensors from them) */
static lm_code lokr_check_config(lm_plan_ctx *ctx, const lm_module *m, const lm_tensor_info *W, const uint64_t *abcd,
                                 lm_err *err)
{
    const lokr_cfg *f = lm_ctx_adapter(ctx)->cfg->mcfg;
    if (f == NULL || !lm_cfg_checked(ctx) || W->shape[0] == 0 || W->shape[1] == 0 || W->n_elems == 0)
        return LM_OK;
    uint64_t kk = W->n_elems / (W->shape[0] * W->shape[1]), fa, fb, fc, fd;
    lokr_factorize(W->shape[0], f->df, &fa, &fb);
    lokr_factorize(W->shape[1], f->df, &fc, &fd);
    if (f->df_given && (fa != abcd[0] || fb != abcd[1] || fc != abcd[2] || fd != abcd[3] / kk))
        return lm_cfg_disagrees(ctx, err, m->path, "decompose_factor", f->df, "the factors are w1 [%llu, %llu] and "
                                "w2 [%llu, %llu] where PEFT makes [%llu, %llu] and [%llu, %llu]",
                                (unsigned long long)abcd[0], (unsigned long long)abcd[2],
                                (unsigned long long)abcd[1], (unsigned long long)(abcd[3] / kk),
                                (unsigned long long)fa, (unsigned long long)fc, (unsigned long long)fb,
                                (unsigned long long)fd);
    if (f->db == 0 && m->part[W1] == NULL)
        return lm_cfg_disagrees(ctx, err, m->path, "decompose_both", 0, "w1 is split into lokr_w1_a and lokr_w1_b");
    if (f->uee == 0 && m->part[T2] != NULL)
        return lm_cfg_disagrees(ctx, err, m->path, "use_effective_conv2d", 0, "the module has lokr_t2");
    return LM_OK;
}

/* w2's [b, d*k...] for the kron, from its whole, flat or CP form; 0 with *err when it does not fit */
static int w2_shape(const lm_module *m, const lm_tensor_info *W, const lm_ts_tensor *const *f, long r, uint64_t *b,
                    uint64_t *d, lm_err *err)
{
    const lm_ts_tensor *t2 = m->part[T2];
    uint64_t kk = W->n_dims >= 3 ? W->n_elems / (W->shape[0] * W->shape[1]) : 1;
    if (t2 != NULL) {
        int ok = m->part[W2] == NULL && W->n_dims >= 3 && t2->n_dims == 4 && lm_is_float_dtype(t2->dtype) &&
                 t2->shape[0] == (uint64_t)r && t2->shape[1] == (uint64_t)r && f[2]->shape[0] == (uint64_t)r &&
                 f[3]->shape[0] == (uint64_t)r &&
                 (W->n_dims == 4 ? t2->shape[2] == W->shape[2] && t2->shape[3] == W->shape[3]
                                 : W->n_dims == 3 && t2->shape[2] == W->shape[2] && t2->shape[3] == 1);
        if (!ok) {
            char st[96], sw[96];
            lm_shape_str(st, sizeof st, t2->n_dims, t2->shape);
            lm_shape_str(sw, sizeof sw, W->n_dims, W->shape);
            return lm_mismatch(err, m->path, "LoKr CP factors (lokr_t2 %s, lokr_w2_a/_b [r=%ld, ...]) do not fit the "
                               "kernel '%s' %s", st, r, W->name, sw), 0;
        }
        *b = f[2]->shape[1];
        *d = f[3]->shape[1] * kk;
        return 1;
    }
    if (m->part[W2] != NULL && f[2]->n_dims == 3)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path,
                              "LoKr with a whole 3-D lokr_w2 (Conv1d): PEFT's kron pads w1 in front and reshapes a "
                              "scrambled kernel; not supported"), 0;
    *b = f[2]->shape[0];
    *d = f[2]->n_elems / (f[2]->shape[0] ? f[2]->shape[0] : 1);
    if (m->part[W2] == NULL)
        *d = f[3]->shape[1];
    return 1;
}

static lm_code lokr_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    const lm_ts_tensor *k1 = m->part[W1], *k2 = m->part[W2];
    const lm_ts_tensor *f[4] = {k1 ? k1 : m->part[W1A], k1 ? k1 : m->part[W1B], k2 ? k2 : m->part[W2A],
                                k2 ? k2 : m->part[W2B]};
    if ((k1 && (m->part[W1A] || m->part[W1B])) || (k2 && (m->part[W2A] || m->part[W2B])))
        return lm_mismatch(err, m->path, "LoKr factor given both whole and decomposed");
    for (int q = 0; q < 4; q++) {
        if (f[q] == NULL)
            return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "%s module lacks a factor (%s)",
                                  cfg->peft_type,
                                  "lokr_w1 or lokr_w1_a + lokr_w1_b, and lokr_w2 or lokr_w2_a + lokr_w2_b are needed");
        int whole_w2 = q >= 2 && k2 != NULL; /* a conv's whole w2 is [b, d, k...] */
        if ((whole_w2 ? f[q]->n_dims < 2 || f[q]->n_dims > 4 : f[q]->n_dims != 2) || !lm_is_float_dtype(f[q]->dtype))
            return lm_mismatch(err, m->path, "%s factor '%s' is not a %s float tensor", cfg->peft_type, f[q]->name,
                               whole_w2 ? "2-D to 4-D" : "2-D");
    }
    long r;
    double alpha;
    if (lm_ctx_rank_alpha(ctx, m->path, &r, &alpha, err) != LM_OK)
        return err->code;
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (W->n_dims < 2 || W->n_dims > 4)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path, "LoKr on a %zu-D weight ('%s'): PEFT's "
                              "LoKr has Linear, Conv1d and Conv2d layers only", W->n_dims, W->name);
    uint64_t cols = W->n_elems / W->shape[0];
    /* w1 [a, c] (or w1_a [a, r] @ w1_b [r, c]), w2 [b, d] likewise; W [a*b, c*d] */
    int w1_split = k1 == NULL, w2_split = k2 == NULL && m->part[T2] == NULL;
    if ((w1_split && f[0]->shape[1] != f[1]->shape[0]) || (w2_split && f[2]->shape[1] != f[3]->shape[0]))
        return lm_mismatch(err, m->path, "LoKr factors' inner dimensions disagree");
    /* PEFT splits a factor into _a @ _b of inner size r (else keeps it whole) */
    if ((w1_split && lm_cfg_rank_is(ctx, err, m->path, f[0]->shape[1], "lokr_w1_a") != LM_OK) ||
        (w2_split && lm_cfg_rank_is(ctx, err, m->path, f[2]->shape[1], "lokr_w2_a") != LM_OK))
        return err->code;
    uint64_t a = f[0]->shape[0], c = w1_split ? f[1]->shape[1] : f[0]->shape[1], b, d;
    if (!w2_shape(m, W, f, r, &b, &d, err))
        return err->code;
    const uint64_t abcd[4] = {a, b, c, d};
    if (a * b == W->shape[0] && c * d == cols && lokr_check_config(ctx, m, W, abcd, err) != LM_OK)
        return err->code;
    if (a * b != W->shape[0] || c * d != cols)
        return lm_mismatch(err, m->path, "kron of w1 [%llu, %llu] and w2 [%llu, %llu] is [%llu, %llu] but base "
                           "'%s' is [%llu, %llu]", (unsigned long long)a, (unsigned long long)c,
                           (unsigned long long)b, (unsigned long long)d, (unsigned long long)(a * b),
                           (unsigned long long)(c * d), W->name, (unsigned long long)W->shape[0],
                           (unsigned long long)cols);
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "lokr", m->path, err);
    lokr_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    pr->w1 = f[0];
    pr->w1b = w1_split ? f[1] : NULL;
    pr->w2 = f[2];
    pr->w2b = w2_split || m->part[T2] ? f[3] : NULL;
    pr->t2 = m->part[T2];
    pr->kb = b;
    pr->kd = d;
    op->rank = (uint64_t)r;
    op->scale = alpha / (double)r * lm_ctx_adapter(ctx)->weight;
    op->flops = 2.0 * (double)W->n_elems;
    lm_ctx_count_module(ctx);
    if (m->part[LYCO_DORA] != NULL)
        return lm_lycoris_dora(ctx, m->path, bi, op, alpha / (double)r, m->part[LYCO_DORA], err);
    return LM_OK;
}

/* x (f64, >= 0) rounded up to f32 (the factor covers the conversion and a few f64 roundings in
 * x), at least the smallest normal (a subnormal operand in the bound's loop costs a microcode
 * assist per operation); inf when it overflows, NaN stays NaN */
static float up32(double x)
{
    const float f = (float)(x * (1.0 + 0x1p-22));
    return f >= 0x1p-126f || f != f ? f : 0x1p-126f; /* a NaN stays NaN */
}

/* e[i] >= |w[i] - d[i]| (the f64 difference is within 2^-53 of its value) */
static const float *err_bounds(const float *w, const double *d, size_t n, float *e)
{
    for (size_t i = 0; i < n; i++)
        e[i] = up32(fabs((double)w[i] - d[i]));
    return e;
}

/* a whole factor [rows, cols]: x, or x @ y when decomposed; *f32: the f32 product (as PEFT: the f32
 * path), *f64: the product summed in f64 from the stored values (k ascending; the exact path).  One
 * block holds both (a prepare owns at most LM_PREP_OWNED blocks).  @return 0, -1 out of memory */
static int whole(lm_prepared *p, const lm_ts_tensor *x, const lm_ts_tensor *y, const lm_kernels *k, const float **f32,
                 const double **f64, const float **ebound, lm_err *err)
{
    const float *X = lm_prep_view(p, x, k, err), *Y = y ? lm_prep_view(p, y, k, err) : NULL;
    if (X == NULL || (y != NULL && Y == NULL))
        return -1;
    const uint64_t rows = x->shape[0], inner = y ? x->shape[1] : 0, cols = y ? y->shape[1] : x->n_elems / rows;
    const size_t n = (size_t)(rows * cols);
    double *d = lm_prep_alloc(p, n * (sizeof(double) + (y ? 2 * sizeof(float) : 0)), err);
    if (d == NULL)
        return -1;
    for (uint64_t i = 0; i < rows; i++)
        for (uint64_t j = 0; j < cols; j++) {
            double acc = y ? 0.0 : (double)X[i * cols + j];
            for (uint64_t q = 0; q < inner; q++)
                acc += (double)X[i * inner + q] * (double)Y[q * cols + j];
            d[i * cols + j] = acc;
        }
    *f64 = d;
    *f32 = X;
    if (y != NULL) {
        float *out = (float *)(void *)(d + n);
        lm_gemm_tile_nn(k, out, (size_t)rows, (size_t)cols, X, Y, (size_t)inner, 1.0f);
        *f32 = out;
        *ebound = err_bounds(out, d, n, out + n);
    }
    return 0;
}

/* bq, ebq from w2 and e2 (lokr_apply_bound) */
static lm_code row_maxima(const lokr_params *pr, lokr_prep *lp, lm_prepared *p, lm_err *err)
{
    double *bq = lm_prep_alloc(p, 2 * (size_t)pr->kb * sizeof *bq, err), *ebq = bq ? bq + pr->kb : NULL;
    if (bq == NULL)
        return LM_E_NOMEM;
    for (uint64_t q = 0; q < pr->kb; q++) {
        double m = 0, me = 0;
        for (uint64_t v = 0; v < pr->kd; v++) {
            const double b = fabs((double)lp->w2[q * pr->kd + v]), e = lp->e2 ? (double)lp->e2[q * pr->kd + v] : 0.0;
            m = b > m || b != b ? b : m; /* a NaN stays: the bound is then NaN, nothing certified */
            me = e > me || e != e ? e : me;
        }
        bq[q] = m;
        ebq[q] = me;
    }
    lp->bq = bq;
    lp->ebq = ebq;
    return LM_OK;
}

static lm_code lokr_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const lokr_params *pr = op->params;
    lokr_prep *lp = lm_prep_alloc(p, sizeof *lp, err);
    if (lp == NULL || whole(p, pr->w1, pr->w1b, k, &lp->w1, &lp->d1, &lp->e1, err) != 0)
        return LM_E_NOMEM;
    p->data = lp;
    lp->s = (float)op->scale;
    lp->ds = fabs((double)lp->s - op->scale) * (1.0 + 0x1p-40);
    lp->sabs = fabs(op->scale) * (1.0 + 0x1p-40);
    if (pr->t2 == NULL)
        return whole(p, pr->w2, pr->w2b, k, &lp->w2, &lp->d2, &lp->e2, err) != 0 ? LM_E_NOMEM : row_maxima(pr, lp, p, err);
    /* CP: w2[q, (v, x)] = sum_i w2_a[i, q] U[i, (v, x)], U[i, v, x] = sum_j t2[i, j, x] w2_b[j, v]
     * (f64; the f32 path's copy rounded once) */
    const uint64_t r = pr->t2->shape[0], kb = pr->kb, dd = pr->w2b->shape[1], kk = pr->kd / dd;
    const size_t n2 = (size_t)(kb * pr->kd);
    const float *t = lm_prep_view(p, pr->t2, k, err), *wa = lm_prep_view(p, pr->w2, k, err),
                *wb = lm_prep_view(p, pr->w2b, k, err);
    double *d2 = t && wa && wb ? lm_prep_alloc(p, n2 * (sizeof(double) + 2 * sizeof(float)), err) : NULL;
    if (d2 == NULL)
        return LM_E_NOMEM;
    float *w2 = (float *)(void *)(d2 + n2);
    double *U = malloc((size_t)(r * pr->kd) * sizeof *U + 1);
    if (U == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    lm_tucker_fold(t, wb, (size_t)r, (size_t)dd, (size_t)kk, U);
    for (uint64_t q = 0; q < kb; q++)
        for (uint64_t e = 0; e < pr->kd; e++) {
            double acc = 0;
            for (uint64_t i = 0; i < r; i++)
                acc += (double)wa[i * kb + q] * U[i * pr->kd + e];
            w2[q * pr->kd + e] = (float)acc;
            d2[q * pr->kd + e] = acc;
        }
    free(U);
    lp->w2 = w2;
    lp->d2 = d2;
    lp->e2 = err_bounds(w2, d2, n2, w2 + n2);
    return row_maxima(pr, lp, p, err);
}

/* The tile's segments: row r of the tile (tensor row R = r0 + r = p*kb + q), columns u*kd .. u*kd + kd,
 * which take w1[p, u] * w2[q, :] * scale.  fn(ctx, e0, i1, q) for each: e0 the segment's first
 * element in the tile, i1 = p*w1_cols + u the w1 element, q the w2 row.  The one loop of the f32,
 * f64 and bound forms below. */
typedef void (*lokr_seg_fn)(void *ctx, uint64_t e0, uint64_t i1, uint64_t q);

static void lokr_segments(const lokr_params *pr, uint64_t r0, uint64_t nr, uint64_t cols, lokr_seg_fn fn, void *ctx)
{
    const uint64_t kb = pr->kb, kd = pr->kd, w1_cols = cols / kd;
    for (uint64_t r = 0; r < nr; r++) {
        const uint64_t R = r0 + r, pi = R / kb, q = R % kb;
        for (uint64_t u = 0; u < w1_cols; u++)
            fn(ctx, r * cols + u * kd, pi * w1_cols + u, q);
    }
}

typedef struct {
    const lokr_prep *lp;
    uint64_t kd;
    float *acc;   /* the f32 tile (lokr_apply, lokr_apply_bound) */
    double *acc64; /* the f64 tile (lokr_apply64) */
    float s;
    double s64;
    float *bound; /* lokr_apply_bound */
} lokr_seg_ctx;

static void seg_add32(void *ctx, uint64_t e0, uint64_t i1, uint64_t q)
{
    const lokr_seg_ctx *c = ctx;
    const float a = c->lp->w1[i1], s = c->s, *w2row = c->lp->w2 + q * c->kd;
    float *seg = c->acc + e0;
    for (uint64_t v = 0; v < c->kd; v++)
        seg[v] += a * w2row[v] * s;
}

/* W[p*kb + q, u*kd + v] += w1[p, u] * w2[q, v] * scale */
static void lokr_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    lokr_seg_ctx c = {.lp = p->data, .kd = ((const lokr_params *)op->params)->kd, .acc = t->acc, .s = (float)op->scale};
    lokr_segments(op->params, t->r0, t->nr, t->cols, seg_add32, &c);
}

static void seg_add64(void *ctx, uint64_t e0, uint64_t i1, uint64_t q)
{
    const lokr_seg_ctx *c = ctx;
    const double a = c->lp->d1[i1], s = c->s64, *d2row = c->lp->d2 + q * c->kd;
    double *seg = c->acc64 + e0;
    for (uint64_t v = 0; v < c->kd; v++)
        seg[v] += a * d2row[v] * s;
}

/* W[p*kb + q, u*kd + v] += d1[p, u] * d2[q, v] * scale in f64 (exec_exact.h: rounded once by the engine) */
static void lokr_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    lokr_seg_ctx c = {.lp = p->data, .kd = ((const lokr_params *)op->params)->kd, .acc64 = t->acc, .s64 = op->scale};
    lokr_segments(op->params, t->r0, t->nr, t->cols, seg_add64, &c);
}

static double lokr_elem64(const lm_op *op, const lm_prepared *p, const float *in, uint64_t row, uint64_t col,
                          uint64_t cols)
{
    const lokr_params *pr = op->params;
    const lokr_prep *lp = p->data;
    const uint64_t kb = pr->kb, kd = pr->kd, w1_cols = cols / kd;
    return (double)in[col] + lp->d1[(row / kb) * w1_cols + col / kd] * lp->d2[(row % kb) * kd + col % kd] * op->scale;
}

/* Bound of the certified f32 form.  y = fl(x + t), t = fl(fl(a b) s) (lokr_apply: a = w1[p, u], b =
 * w2[q, v], s = fl32(S), S = op->scale); the f64 value is v = fl(x + fl(fl(d1 d2) S)) with
 * |a - d1| <= e1, |b - d2| <= e2 (prepare).  With u = 2^-24:
 *   |y - (x + t)| <= u |y|                       (the sum's rounding; exact when subnormal)
 *   |t - a b s| <= 2u |t| (1 + 2u) + 2^-148      (two roundings, underflow included)
 *   |a b s - d1 d2 S| <= |a b| |s - S| + |S| (|a| e2 + e1 (|b| + e2))
 *   the f64 roundings of v: <= 2^-52 (|v| + |t - v + x|) (3 of them, relative 2^-53 each)
 * Over one segment (a and e1 fixed, b and e2 a row of w2: |b| <= bq, e2 <= ebq, |t| <= S' |a| bq
 * (1 + 2u)) everything but the sum's rounding is at most the segment's constant
 *   C = ((C_t S' + ds) |a| bq + S' (|a| ebq + e1 (bq + ebq))) M + K
 * (S' >= |S|, ds >= |s - S|, C_t = 2^-23 (1 + 2^-8), M = 1 + 2^-17 for the 2^-52 terms and the
 * (1 + 2u) factors, K = 2^-144; f64, rounded up to f32, at least 2^-126: the smallest normal keeps
 * subnormal operands, a microcode assist each, out of the loop; results that small are
 * recomputed).  So bound = C_y |y| + C, C_y = 2^-24 (1 + 2^-7) (the f64 terms of |v| and the
 * element's two f32 roundings of the bound).  An inf or NaN term leaves the element uncertain. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define LK_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3")))
#else
#define LK_CLONES
#endif

LK_CLONES static void lokr_seg_bound(float *restrict x, const float *restrict b, float a, float s, float C, uint64_t n,
                                     float *restrict bound)
{
    const float cy = 0x1.02p-24f;
    for (uint64_t v = 0; v < n; v++) {
        const float y = x[v] + a * b[v] * s;
        bound[v] = cy * fabsf(y) + C;
        x[v] = y;
    }
}

static void seg_bound(void *ctx, uint64_t e0, uint64_t i1, uint64_t q)
{
    const lokr_seg_ctx *c = ctx;
    const lokr_prep *lp = c->lp;
    const double ct = 0x1.01p-23, M = 1.0 + 0x1p-17, K = 0x1p-144, S = lp->sabs;
    const double bq = lp->bq[q], ebq = lp->ebq[q];
    const double A = fabs((double)lp->w1[i1]), e1 = lp->e1 ? (double)lp->e1[i1] : 0.0;
    const double C = ((ct * S + lp->ds) * A * bq + S * (A * ebq + e1 * (bq + ebq))) * M + K;
    lokr_seg_bound(c->acc + e0, lp->w2 + q * c->kd, lp->w1[i1], lp->s, up32(C), c->kd, c->bound + e0);
}

static void lokr_apply_bound(const lm_op *op, const lm_prepared *p, const lm_tile *t, float *bound)
{
    lokr_seg_ctx c = {.lp = p->data, .kd = ((const lokr_params *)op->params)->kd, .acc = t->acc, .bound = bound};
    lokr_segments(op->params, t->r0, t->nr, t->cols, seg_bound, &c);
}

static void lokr_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    snprintf(buf, cap, "lokr%s r=%ld alpha=%g", m->part[T2] ? " (CP form of a convolution)" : "", cfg->r,
             cfg->lora_alpha);
}

static void lokr_describe_config(const lm_adapter_config *c, char *buf, size_t cap)
{
    snprintf(buf, cap, "variant: LoKr\nr: %ld, alpha: %g, scale: %g (alpha/r)\n", c->r, c->lora_alpha,
             c->lora_alpha / (double)c->r);
}

static const lm_part lokr_parts[] = {
    {"lokr_w1", W1, -1, 1},   {"lokr_w1_a", W1A, -1, 1}, {"lokr_w1_b", W1B, -1, 1}, {"lokr_w2", W2, -1, 1},
    {"lokr_w2_a", W2A, -1, 1}, {"lokr_w2_b", W2B, -1, 1}, {"lokr_t2", T2, -1, 1},
    {"lycoris_dora_scale", LYCO_DORA, -1, 0},
};

const lm_method lm_method_lokr = {
    .peft_type = "LOKR",
    .summary = "W += kron(w1, w2) * alpha/r",
    .parts = lokr_parts,
    .n_parts = sizeof lokr_parts / sizeof *lokr_parts,
    .flags = LM_M_PATTERNS | LM_M_ALPHA_KEY,
    .parse_config = lokr_parse,
    .plan_module = lokr_plan_module,
    .prepare = lokr_prepare,
    .apply_tile = lokr_apply,
    .apply_tile64 = lokr_apply64,
    .apply_tile_bound = lokr_apply_bound,
    .elem64 = lokr_elem64,
    .describe = lokr_describe,
    .describe_config = lokr_describe_config,
};
