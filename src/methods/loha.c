/* SPDX-License-Identifier: MIT */
/* loha.c : LoHa (peft-merge.md §5.4): W += (w1a @ w1b) * (w2a @ w2b) * alpha/r, the two
 * products computed per row tile, then multiplied elementwise.  Linear weights, and convolution
 * kernels [o, i/groups, k...] seen as [o, i/groups * k...] (PEFT's flat form).  The CP (Tucker)
 * form of Conv1d/Conv2d (use_effective_conv2d: hada_t1/t2 [r, r, kh, kw], w_a [r, o], w_b [r, i])
 *     R_j[p, q, x, y] = sum_{a,b} t_j[a, b, x, y] w_j_a[a, p] w_j_b[b, q]
 * is the same product once prepare has built w_j_a^T [o, r] and U_j[a, (q, x, y)] = sum_b
 * t_j[a, b, x, y] w_j_b[b, q] (f64, rounded once), so a tile is still two small products.
 * Exact path (issue 10): PEFT's formula in f64 is W + (P1 P2) s with P_j = sum_k w_j_a[i, k]
 * w_j_b[k, c] summed in f64, k ascending, from the stored values (CP: from U_j in f64)
 * (apply_tile64, elem64).  bf16/f16 outputs take the certified f32 form (apply_tile_bound): the
 * f32 result with a per-element bound (each rank-r f32 product within (r + 2) 2^-24 ||row|| ||col||
 * of P_j, then the Hadamard product's error), the elements it leaves uncertain recomputed by
 * elem64 (exec_exact.h); the engine takes the same form in one sweep (certify_tile: the loha_cert
 * kernel, kernels/lohacert_ref.c, then the uncertain elements eight at a time). */
#include "method.h"

#include "gemm_tile.h"
#include "linalg.h"
#include "lm_error.h"
#include "lycoris.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { W1A, W1B, W2A, W2B, T1, T2, LYCO_DORA };

typedef struct {
    const lm_ts_tensor *f[4]; /* w1a [o, r], w1b [r, i], w2a [o, r], w2b [r, i]; CP: w1a [r, o], w1b [r, i] */
    const lm_ts_tensor *t[2]; /* CP: hada_t1, hada_t2 [r, r, kh, kw]; else NULL */
    uint64_t o, i, kk;        /* CP: the kernel [o, i, kk] (kk = kh * kw) */
} loha_params;

typedef struct {
    const float *f[4];
    const double *u64[2]; /* CP: U_j [r, cols] in f64 (f[2j+1] is it rounded to f32); else NULL: f[2j+1] exact */
    const double *at[2];  /* CP: U_j in f64 transposed [cols, r], for elem64 (a column's r values in one
                             place); else NULL: elem64 reads f[2j+1] (exact) from the panels ap[j] */
    const double *nb[2];  /* [o]: ||row i of f[2j]||_2 + 2^-62 (rounded up) */
    const float *cc;      /* [cols]: (||column c of f[1]||_2 + 2^-62) (||column c of f[3]||_2 + 2^-62), rounded
                             up (CP: of U_j, f32 or f64, the larger) */
    const float *ap[2];   /* f[2j+1] in the loha_cert kernel's panels (lm_lohacert) */
    double kappa;         /* the bound's factor (loha_apply_bound) */
    float s;              /* fl32(op->scale) (loha_apply's) */
    uint64_t cols;
} loha_prep;

/* x (f64, >= 0) rounded up to f32 (the factor covers the conversion and a few f64 roundings in
 * x), at least the smallest normal (a subnormal operand in the bound's loop costs a microcode
 * assist per operation); inf when it overflows, NaN stays NaN */
static float up32(double x)
{
    const float f = (float)(x * (1.0 + 0x1p-22));
    return f >= 0x1p-126f || f != f ? f : 0x1p-126f; /* a NaN stays NaN */
}

/* the bound's row and column norms (loha_apply_bound) */
static lm_code loha_norms(const lm_op *op, loha_prep *lp, uint64_t o, uint64_t cols, lm_prepared *p, lm_err *err)
{
    const uint64_t r = op->rank, P = LM_LOHA_PANEL, np = (cols + P - 1) / P;
    /* the panels first (64-byte aligned), then nb, at (CP only) and cc */
    const size_t npan = (size_t)(np * r * P), nat = lp->u64[0] != NULL ? (size_t)(cols * r) : 0;
    char *blk = lm_prep_alloc(p, 2 * npan * sizeof(float) + 2 * ((size_t)o + nat) * sizeof(double) +
                                     cols * sizeof(float) + 64, err);
    double *cn = blk ? malloc(2 * (size_t)cols * sizeof *cn + 1) : NULL;
    if (cn == NULL)
        return blk ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory") : LM_E_NOMEM;
    float *pan = (float *)(void *)(blk + (64 - (uintptr_t)blk % 64) % 64);
    for (int j = 0; j < 2; j++) {
        float *ap = pan + (size_t)j * npan; /* zeroed: the last panel's padding */
        const float *A = lp->f[2 * j + 1];
        for (uint64_t k = 0; k < r; k++)
            for (uint64_t c = 0; c < cols; c++)
                ap[(c / P) * r * P + k * P + c % P] = A[k * cols + c];
        lp->ap[j] = ap;
    }
    double *nb = (double *)(void *)(pan + 2 * npan);
    float *cc = (float *)(void *)(nb + 2 * ((size_t)o + nat));
    for (int j = 0; j < 2 && nat > 0; j++) {
        double *at = nb + 2 * o + (size_t)j * nat;
        const double *U = lp->u64[j];
        for (uint64_t k = 0; k < r; k++)
            for (uint64_t c = 0; c < cols; c++)
                at[c * r + k] = U[k * cols + c];
        lp->at[j] = at;
    }
    const double m = 1.0 + 0x1p-40; /* the f64 sums of squares and the root: a few 2^-53 each */
    for (int j = 0; j < 2; j++) {
        const float *B = lp->f[2 * j], *A = lp->f[2 * j + 1];
        for (uint64_t i = 0; i < o; i++) {
            double ss = 0;
            for (uint64_t k = 0; k < r; k++)
                ss += (double)B[i * r + k] * (double)B[i * r + k];
            nb[j * o + i] = sqrt(ss) * m + 0x1p-62;
        }
        for (uint64_t c = 0; c < cols; c++) {
            double ss = 0;
            for (uint64_t k = 0; k < r; k++) {
                /* CP: the larger of |U32| and |U64| (the norms bound the sums over either) */
                double a = fabs((double)A[k * cols + c]);
                if (lp->u64[j] != NULL && fabs(lp->u64[j][k * cols + c]) > a)
                    a = fabs(lp->u64[j][k * cols + c]);
                ss += a * a;
            }
            cn[j * cols + c] = sqrt(ss) * m + 0x1p-62;
        }
        lp->nb[j] = nb + j * o;
    }
    for (uint64_t c = 0; c < cols; c++)
        cc[c] = up32(cn[c] * cn[cols + c]);
    free(cn);
    lp->cc = cc;
    const double g = (double)(r + 2) * 0x1p-24 / (1.0 - (double)(r + 2) * 0x1p-24) * m, S = fabs(op->scale) * m;
    lp->s = (float)op->scale;
    const double ds = fabs((double)lp->s - op->scale) * m;
    lp->kappa = ((0x1.01p-23 * S + ds) * (1 + g) * (1 + g) + S * g * (3 + 2 * g)) * (1.0 + 0x1p-17);
    lp->cols = cols;
    return LM_OK;
}

/* CP form: t_j [r, r, kh, kw], w_j_a [r, o], w_j_b [r, i] against the kernel W [o, i, k...] */
static lm_code check_cp(const lm_module *m, const lm_tensor_info *W, const lm_ts_tensor *const *f,
                        const lm_ts_tensor *const *t, long r, lm_err *err)
{
    uint64_t kk = W->n_dims >= 3 ? W->n_elems / (W->shape[0] * W->shape[1]) : 0;
    for (int j = 0; j < 2; j++) {
        const lm_ts_tensor *a = f[2 * j], *b = f[2 * j + 1], *tj = t[j];
        int ok = tj != NULL && tj->n_dims == 4 && lm_is_float_dtype(tj->dtype) && kk > 0 && tj->shape[0] == (uint64_t)r &&
                 tj->shape[1] == (uint64_t)r && a->shape[0] == (uint64_t)r && b->shape[0] == (uint64_t)r &&
                 a->shape[1] == W->shape[0] && b->shape[1] == W->shape[1] &&
                 (W->n_dims == 4 ? tj->shape[2] == W->shape[2] && tj->shape[3] == W->shape[3]
                                 : W->n_dims == 3 && tj->shape[2] == W->shape[2] && tj->shape[3] == 1);
        if (!ok) {
            char sw[96], st[96];
            lm_shape_str(sw, sizeof sw, W->n_dims, W->shape);
            lm_shape_str(st, sizeof st, tj ? tj->n_dims : 0, tj ? tj->shape : NULL);
            return lm_mismatch(err, m->path, "LoHa CP factors (hada_t%d %s, w%d_a/w%d_b [r=%ld, o], [r, i]) do not make "
                               "the convolution kernel '%s' %s", j + 1, tj ? st : "missing", j + 1, j + 1, r, W->name, sw);
        }
    }
    return LM_OK;
}

static lm_code loha_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    const lm_ts_tensor *t[2] = {m->part[T1], m->part[T2]};
    const lm_ts_tensor *f[4] = {m->part[W1A], m->part[W1B], m->part[W2A], m->part[W2B]};
    for (int q = 0; q < 4; q++) {
        if (f[q] == NULL)
            return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "%s module lacks a factor (%s)",
                                  cfg->peft_type, "hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b are needed");
        if (f[q]->n_dims != 2 || !lm_is_float_dtype(f[q]->dtype))
            return lm_mismatch(err, m->path, "%s factor '%s' is not a 2-D float tensor (convolution forms are not "
                               "supported yet)", cfg->peft_type, f[q]->name);
    }
    long r;
    double alpha;
    if (lm_ctx_rank_alpha(ctx, m->path, &r, &alpha, err) != LM_OK)
        return err->code;
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    uint64_t cols = W->shape[0] ? W->n_elems / W->shape[0] : 0; /* a conv kernel's i/groups * k... */
    if (t[0] || t[1]) {
        if (check_cp(m, W, f, t, r, err) != LM_OK)
            return err->code;
    } else if (W->n_dims < 2 || f[0]->shape[1] != f[1]->shape[0] || f[2]->shape[1] != f[3]->shape[0] || f[0]->shape[0] != W->shape[0] ||
        f[2]->shape[0] != W->shape[0] || f[1]->shape[1] != cols || f[3]->shape[1] != cols)
        return lm_mismatch(err, m->path, "LoHa factors [%llu, %llu]@[%llu, %llu] and [%llu, %llu]@[%llu, %llu] "
                           "do not make base '%s' [%llu, %llu]",
                           (unsigned long long)f[0]->shape[0], (unsigned long long)f[0]->shape[1],
                           (unsigned long long)f[1]->shape[0], (unsigned long long)f[1]->shape[1],
                           (unsigned long long)f[2]->shape[0], (unsigned long long)f[2]->shape[1],
                           (unsigned long long)f[3]->shape[0], (unsigned long long)f[3]->shape[1], W->name,
                           (unsigned long long)W->shape[0], (unsigned long long)cols);
    else if ((long)f[0]->shape[1] != r || (long)f[2]->shape[1] != r)
        return lm_module_fail(err, LM_E_MISMATCH, "RankMismatch", m->path,
                              "the tensors have rank %llu but adapter_config.json says r=%ld",
                              (unsigned long long)f[0]->shape[1], r);
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "loha", m->path, err);
    loha_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    memcpy(pr->f, f, sizeof f);
    if (t[0] != NULL) {
        pr->t[0] = t[0];
        pr->t[1] = t[1];
        pr->o = W->shape[0];
        pr->i = W->shape[1];
        pr->kk = cols / W->shape[1];
    }
    op->rank = (uint64_t)r;
    op->scale = alpha / (double)r * lm_ctx_adapter(ctx)->weight;
    op->flops = 4.0 * (double)r * (double)W->n_elems;
    lm_ctx_count_module(ctx);
    if (m->part[LYCO_DORA] != NULL)
        return lm_lycoris_dora(ctx, m->path, bi, op, alpha / (double)r, m->part[LYCO_DORA], err);
    return LM_OK;
}

static lm_code loha_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const loha_params *pr = op->params;
    loha_prep *lp = lm_prep_alloc(p, sizeof *lp, err);
    if (lp == NULL)
        return LM_E_NOMEM;
    for (int q = 0; q < 4; q++)
        if ((lp->f[q] = lm_prep_view(p, pr->f[q], k, err)) == NULL)
            return LM_E_NOMEM;
    p->data = lp;
    if (pr->t[0] == NULL)
        return loha_norms(op, lp, pr->f[0]->shape[0], pr->f[1]->shape[1], p, err);
    /* CP: f[2j] <- w_j_a^T [o, r]; f[2j+1] <- U_j [r, i * kk] */
    const uint64_t r = op->rank, o = pr->o, in = pr->i, kk = pr->kk;
    const size_t nu = (size_t)(r * in * kk);
    float *blk = lm_prep_floats(p, 2 * ((size_t)(o * r) + nu), err); /* one block: at most 10 owned */
    double *u64 = blk ? lm_prep_alloc(p, 2 * nu * sizeof *u64 + 1, err) : NULL;
    if (u64 == NULL)
        return LM_E_NOMEM;
    for (int j = 0; j < 2; j++) {
        const float *wa = lp->f[2 * j], *wb = lp->f[2 * j + 1], *tj = lm_prep_view(p, pr->t[j], k, err);
        float *waT = blk + (size_t)j * ((size_t)(o * r) + nu), *U = waT + o * r;
        double *uj = u64 + (size_t)j * nu;
        if (tj == NULL)
            return LM_E_NOMEM;
        for (uint64_t a = 0; a < r; a++)
            for (uint64_t q = 0; q < o; q++)
                waT[q * r + a] = wa[a * o + q];
        lm_tucker_fold(tj, wb, (size_t)r, (size_t)in, (size_t)kk, uj);
        for (size_t e = 0; e < nu; e++)
            U[e] = (float)uj[e];
        lp->f[2 * j] = waT;
        lp->f[2 * j + 1] = U;
        lp->u64[j] = uj;
    }
    return loha_norms(op, lp, o, in * kk, p, err);
}

static void loha_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const loha_prep *lp = p->data;
    float *t1 = t->scratch, *t2 = t->scratch + t->nr * t->cols;
    size_t n = (size_t)(t->nr * t->cols), r = (size_t)op->rank;
    const float s = (float)op->scale;
    memset(t->scratch, 0, 2 * n * sizeof *t->scratch);
    lm_gemm_tile_nn(t->k, t1, (size_t)t->nr, (size_t)t->cols, lp->f[0] + t->r0 * r, lp->f[1], r, 1.0f);
    lm_gemm_tile_nn(t->k, t2, (size_t)t->nr, (size_t)t->cols, lp->f[2] + t->r0 * r, lp->f[3], r, 1.0f);
    for (size_t i = 0; i < n; i++)
        t->acc[i] += t1[i] * t2[i] * s;
}

/* P_j of row i, column c in f64 (k ascending from 0, as loha_apply64): A_j's column from at[j]
 * (CP) or the panels */
static inline double loha_p64(const loha_prep *lp, int j, uint64_t r, uint64_t i, uint64_t c)
{
    const float *B = lp->f[2 * j] + i * r;
    double acc = 0.0;
    if (lp->at[j] != NULL) {
        const double *a = lp->at[j] + c * r;
        for (uint64_t k = 0; k < r; k++)
            acc += (double)B[k] * a[k];
    } else {
        const float *a = lp->ap[j] + (c / LM_LOHA_PANEL) * r * LM_LOHA_PANEL + c % LM_LOHA_PANEL;
        for (uint64_t k = 0; k < r; k++)
            acc += (double)B[k] * (double)a[k * LM_LOHA_PANEL];
    }
    return acc;
}

static double loha_elem64(const lm_op *op, const lm_prepared *p, const float *in, uint64_t row, uint64_t col,
                          uint64_t cols)
{
    const loha_prep *lp = p->data;
    (void)cols;
    return (double)in[col] + loha_p64(lp, 0, op->rank, row, col) * loha_p64(lp, 1, op->rank, row, col) * op->scale;
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define LH_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3")))
#else
#define LH_CLONES
#endif

/* y[c] = sum_k b[k] A[k, c] in f64, k ascending (A f32, or U f64) */
LH_CLONES static void loha_row64(const float *b, const float *A, const double *U, uint64_t r, uint64_t cols, double *y)
{
    for (uint64_t c = 0; c < cols; c++)
        y[c] = 0.0;
    for (uint64_t k = 0; k < r; k++) {
        const double f = (double)b[k];
        if (U != NULL) {
            const double *u = U + k * cols;
            for (uint64_t c = 0; c < cols; c++)
                y[c] += f * u[c];
        } else {
            const float *a = A + k * cols;
            for (uint64_t c = 0; c < cols; c++)
                y[c] += f * (double)a[c];
        }
    }
}

LH_CLONES static void loha_comb64(double *x, const double *y1, const double *y2, double s, uint64_t cols)
{
    for (uint64_t c = 0; c < cols; c++)
        x[c] += y1[c] * y2[c] * s;
}

static void loha_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const loha_prep *lp = p->data;
    const uint64_t r = op->rank, cols = t->cols;
    double *y1 = t->scratch, *y2 = t->scratch + cols;
    for (uint64_t q = 0; q < t->nr; q++) {
        const uint64_t i = t->r0 + q;
        loha_row64(lp->f[0] + i * r, lp->f[1], lp->u64[0], r, cols, y1);
        loha_row64(lp->f[2] + i * r, lp->f[3], lp->u64[1], r, cols, y2);
        loha_comb64(t->acc + q * cols, y1, y2, op->scale, cols);
    }
}

/* Bound of the certified f32 form.  t1, t2: the f32 products (gemm_rows: r fused multiply-adds from
 * 0, each rounding at most u |partial| + 2^-150, u = 2^-24), so |t_j - P_j| <= E_j = gamma N_j + ke
 * with N_j = ||b||_2 ||a||_2 >= sum_k |b_k a_k| (b: row i of f[2j], a: column c of f[2j+1]): r u
 * (1 + r u) of the sum for the FMA chain, r 2^-53 for P_j's f64 sum, u for CP's U rounded to f32
 * (gamma = (r + 2) u / (1 - (r + 2) u)), ke = (r + 1) 2^-149 the underflow; and |t_j| <= T_j = N_j
 * (1 + gamma) + ke.  Then y = fl(x + fl(fl(t1 t2) s)) against v = fl(x + fl(fl(P1 P2) S)) as LoKr's
 * (lokr.c, a = t1, b = t2): everything but the sum's rounding is at most
 *   C = ((C_t S' + ds) T1 T2 + S' (T1 E2 + E1 (T2 + E2))) M + K
 * (S' >= |S|, ds >= |s - S|, C_t = 2^-23 (1 + 2^-8), M = 1 + 2^-17, K = 2^-144).  With N_j' = N_j +
 * ke / gamma: E_j <= gamma N_j', T_j <= (1 + gamma) N_j', so C <= kappa N1' N2' + K, kappa = ((C_t S'
 * + ds) (1 + gamma)^2 + S' gamma (3 + 2 gamma)) M; and N_j' <= (||b|| + h) (||a|| + h) with h = 2^-62
 * >= sqrt(ke / gamma).  So C <= R cc[c] + K: R = kappa (nb_1[i]) (nb_2[i]) per row, cc[c] per column
 * (the norms with h added, rounded up; R and cc at least 2^-126: the smallest normal keeps subnormal
 * operands, a microcode assist each, out of the loop), and bound = C_y |y| + R cc[c] + 2^-125 (K,
 * the underflow of R cc[c]), C_y = 2^-24 (1 + 2^-7) (the f64 terms of |v| and the f32 roundings of
 * the bound, R's and cc's included in their rounding up).  inf/NaN anywhere: uncertain (elem64).
 * The one-sweep form (loha_cert, kernels/lohacert_ref.c) rests on the same analysis in real terms:
 * |y - v| <= B = 2^-24 (1 + 2^-8) |y| + kappa nb_1[i] nb_2[i] cc[c] + K (the 2^-8, like the 2^-7
 * above, is ample for v's f64 terms).  Its ends lo, hi = fl(y -+ w) contain [y - B, y + B] when w (1
 * - u) >= B + u |y| (the sums' rounding, at most u (|y| + w)).  With w = fl(fl(fma(|y|, ky, fl(R'
 * cc[c]))) + 2^-124), ky = 2^-23 (1 + 2^-8 + 2^-18), R' = kappa nb_1[i] nb_2[i] (1 + 2^-17) rounded
 * up: each of the three roundings loses at most a factor 1 - u and 2^-150 (underflow), so w (1 - u)
 * >= |y| ky (1 - u)^3 + R' cc (1 - u)^4 + 2^-124 (1 - u)^2 - 2^-149, and ky (1 - u)^3 >= 2^-23 (1 +
 * 2^-9), R' (1 - u)^4 >= kappa nb_1 nb_2, 2^-124 (1 - u)^2 - 2^-149 >= K. */
LH_CLONES static void loha_row_bound(float *restrict x, const float *restrict t1, const float *restrict t2, float s,
                                     float R, const float *restrict cc, uint64_t n, float *restrict bound)
{
    const float cy = 0x1.02p-24f;
    for (uint64_t c = 0; c < n; c++) {
        const float y = x[c] + t1[c] * t2[c] * s;
        bound[c] = (cy * fabsf(y) + R * cc[c]) + 0x1p-125f;
        x[c] = y;
    }
}

static void loha_apply_bound(const lm_op *op, const lm_prepared *p, const lm_tile *t, float *bound)
{
    const loha_prep *lp = p->data;
    float *t1 = t->scratch, *t2 = t->scratch + t->nr * t->cols;
    const size_t n = (size_t)(t->nr * t->cols), r = (size_t)op->rank;
    memset(t->scratch, 0, 2 * n * sizeof *t->scratch);
    lm_gemm_tile_nn(t->k, t1, (size_t)t->nr, (size_t)t->cols, lp->f[0] + t->r0 * r, lp->f[1], r, 1.0f);
    lm_gemm_tile_nn(t->k, t2, (size_t)t->nr, (size_t)t->cols, lp->f[2] + t->r0 * r, lp->f[3], r, 1.0f);
    for (uint64_t q = 0; q < t->nr; q++) {
        const size_t e0 = (size_t)(q * t->cols);
        const double R = lp->kappa * lp->nb[0][t->r0 + q] * lp->nb[1][t->r0 + q];
        loha_row_bound(t->acc + e0, t1 + e0, t2 + e0, lp->s, up32(R), lp->cc, t->cols, bound + e0);
    }
}

/* ---- the certified form in one sweep (loha_certify_tile) ------------------------------------
 * The kernel (loha_cert, kernels/lohacert_ref.c) computes loha_apply_bound's y with the same f32
 * operations, then its own ends (the proof above, after loha_apply_bound's) and their rounding,
 * element by element with nothing stored between them; every certified element is RNE of the f64
 * value, as are the others (elem64's), so the bytes are those of the two-pass form.  The elements it leaves uncertain are recomputed LH_BATCH at a time (loha_batch64),
 * each exactly as loha_elem64: the same f64 operations in the same order per element. */
enum { LH_BATCH = 8, LH_ROWS = 16 };

/* p_j[l] = P_j of element (row[l], col[l]) as loha_p64 (k ascending from 0, no contraction), the
 * LH_BATCH chains interleaved; A_j's columns from at[j] (CP) or the panels (in cache: the kernel
 * has just read them) */
LH_CLONES static void loha_batch64(const loha_prep *lp, uint64_t r, const uint64_t *row, const uint64_t *col,
                                   double *p1, double *p2)
{
    const int cp = lp->at[0] != NULL;
    const uint64_t P = LM_LOHA_PANEL, st = cp ? 1 : P;
    const float *B1 = lp->f[0], *B2 = lp->f[2];
    uint64_t ob[LH_BATCH], oa[LH_BATCH];
    double s1[LH_BATCH], s2[LH_BATCH];
    for (int l = 0; l < LH_BATCH; l++) {
        ob[l] = row[l] * r;
        oa[l] = cp ? col[l] * r : (col[l] / P) * r * P + col[l] % P;
        s1[l] = s2[l] = 0.0;
    }
    if (cp)
        for (uint64_t k = 0; k < r; k++)
            for (int l = 0; l < LH_BATCH; l++) {
                s1[l] += (double)B1[ob[l] + k] * lp->at[0][oa[l] + k * st];
                s2[l] += (double)B2[ob[l] + k] * lp->at[1][oa[l] + k * st];
            }
    else
        for (uint64_t k = 0; k < r; k++)
            for (int l = 0; l < LH_BATCH; l++) {
                s1[l] += (double)B1[ob[l] + k] * (double)lp->ap[0][oa[l] + k * st];
                s2[l] += (double)B2[ob[l] + k] * (double)lp->ap[1][oa[l] + k * st];
            }
    for (int l = 0; l < LH_BATCH; l++) {
        p1[l] = s1[l];
        p2[l] = s2[l];
    }
}

/* where the tile is: x its input rows (in: f32, bf16 or f16), changed (or NULL) the count of
 * output elements whose bits differ from x's (in == out) */
typedef struct {
    const lm_tile *t;
    const void *x;
    lm_kdtype in, out;
    uint16_t *dst;
    uint64_t *changed;
} loha_run;

/* the n <= LH_BATCH elements (q[l], col[l]) of the tile (rows from t->r0): their f64 values
 * rounded once into dst, counted in st (and the changed count mended) */
static void loha_flush(const lm_op *op, const loha_prep *lp, const loha_run *u, const uint64_t *q,
                       const uint64_t *col, size_t n, lm_cert_counts *st)
{
    const uint16_t em = u->out == LM_KDT_BF16 ? 0x7F80u : 0x7C00u;
    uint64_t row[LH_BATCH], c[LH_BATCH];
    double p1[LH_BATCH], p2[LH_BATCH];
    for (size_t l = 0; l < LH_BATCH; l++) { /* unused lanes repeat the first */
        row[l] = u->t->r0 + q[l < n ? l : 0];
        c[l] = col[l < n ? l : 0];
    }
    loha_batch64(lp, op->rank, row, c, p1, p2);
    for (size_t l = 0; l < n; l++) {
        const size_t e = (size_t)(q[l] * u->t->cols + col[l]);
        const double v = (double)lm_loha_x(u->x, u->in, e) + p1[l] * p2[l] * op->scale;
        const uint16_t bits = lm_f64_to_16_1(v, u->out);
        if (u->changed != NULL) { /* the kernel counted the bits it stored there */
            const uint16_t b0 = ((const uint16_t *)u->x)[e];
            *u->changed = *u->changed + (bits != b0) - (u->dst[e] != b0);
        }
        u->dst[e] = bits;
        st->n_recomputed++;
        if (!isfinite(v))
            st->n_nonfinite++;
        else if ((bits & em) == em)
            st->n_overflow++;
    }
}

static int loha_certify(const lm_op *op, const lm_prepared *p, const loha_run *u, lm_cert_counts *st)
{
    const loha_prep *lp = p->data;
    const lm_tile *t = u->t;
    const uint64_t cols = t->cols, r = op->rank, nw = (cols + 15) / 16;
    const size_t esz = u->in == LM_KDT_F32 ? 4 : 2;
    uint16_t *unc = malloc((size_t)(LH_ROWS * nw) * sizeof *unc + 1);
    if (unc == NULL)
        return -1;
    const lm_lohacert lc = {{lp->ap[0], lp->ap[1]}, lp->cc, (size_t)r, (size_t)cols, lp->s, u->in, u->out,
                            u->changed != NULL};
    float R[LH_ROWS];
    uint64_t bq[LH_BATCH], bc[LH_BATCH], changed = 0;
    size_t n = 0;
    for (uint64_t q0 = 0; q0 < t->nr; q0 += LH_ROWS) {
        const uint64_t h = t->nr - q0 < LH_ROWS ? t->nr - q0 : LH_ROWS, i0 = t->r0 + q0;
        for (uint64_t i = 0; i < h; i++)
            R[i] = up32(lp->kappa * lp->nb[0][i0 + i] * lp->nb[1][i0 + i] * (1.0 + 0x1p-17)); /* R' */
        if (!t->k->loha_cert((const char *)u->x + q0 * cols * esz, (size_t)h, lp->f[0] + i0 * r, lp->f[2] + i0 * r,
                             R, &lc, u->dst + q0 * cols, unc, &changed))
            continue;
        for (uint64_t i = 0; i < h; i++)
            for (uint64_t w = 0; w < nw; w += 4) { /* four words at a time: most are 0 */
                uint64_t bits = 0;
                if (w + 4 <= nw)
                    memcpy(&bits, unc + i * nw + w, sizeof bits);
                else
                    for (uint64_t v = w; v < nw; v++)
                        bits |= (uint64_t)unc[i * nw + v] << (16 * (v - w));
                for (; bits != 0; bits &= bits - 1) {
                    bq[n] = q0 + i;
                    bc[n] = w * 16 + (uint64_t)__builtin_ctzll(bits);
                    if (++n == LH_BATCH) {
                        if (u->changed != NULL) /* the kernel's count first: the flush mends it */
                            *u->changed += changed, changed = 0;
                        loha_flush(op, lp, u, bq, bc, n, st);
                        n = 0;
                    }
                }
            }
    }
    if (u->changed != NULL)
        *u->changed += changed;
    if (n > 0)
        loha_flush(op, lp, u, bq, bc, n, st);
    free(unc);
    return 0;
}

static int loha_certify_tile(const lm_op *op, const lm_prepared *p, const lm_tile *t, lm_kdtype out, uint16_t *dst,
                             lm_cert_counts *st)
{
    const loha_run u = {t, t->acc, LM_KDT_F32, out, dst, NULL};
    return loha_certify(op, p, &u, st);
}

static int loha_certify_raw(const lm_op *op, const lm_prepared *p, const lm_tile *t, const void *raw, lm_kdtype in,
                            lm_kdtype out, uint16_t *dst, lm_cert_counts *st, uint64_t *n_changed)
{
    if (n_changed != NULL)
        *n_changed = 0;
    const loha_run u = {t, raw, in, out, dst, n_changed};
    return loha_certify(op, p, &u, st);
}

static void loha_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    const lm_ts_tensor *a = m->part[W1A];
    int cp = m->part[T1] || m->part[T2];
    snprintf(buf, cap, "loha%s r=%ld alpha=%g", cp ? " (CP form of a convolution)" : "",
             a && a->n_dims == 2 ? (long)a->shape[cp ? 0 : 1] : cfg->r, cfg->lora_alpha);
}

static void loha_describe_config(const lm_adapter_config *c, char *buf, size_t cap)
{
    snprintf(buf, cap, "variant: LoHa\nr: %ld, alpha: %g, scale: %g (alpha/r)\n", c->r, c->lora_alpha,
             c->lora_alpha / (double)c->r);
}

static const lm_part loha_parts[] = {
    {"hada_w1_a", W1A, -1, 1}, {"hada_w1_b", W1B, -1, 1}, {"hada_w2_a", W2A, -1, 1},
    {"hada_w2_b", W2B, -1, 1}, {"hada_t1", T1, -1, 1},    {"hada_t2", T2, -1, 1},
    {"lycoris_dora_scale", LYCO_DORA, -1, 0},
};

const lm_method lm_method_loha = {
    .peft_type = "LOHA",
    .summary = "W += (w1a @ w1b) * (w2a @ w2b) * alpha/r",
    .parts = loha_parts,
    .n_parts = sizeof loha_parts / sizeof *loha_parts,
    .flags = LM_M_PATTERNS | LM_M_ALPHA_KEY,
    .plan_module = loha_plan_module,
    .prepare = loha_prepare,
    .apply_tile = loha_apply,
    .apply_tile64 = loha_apply64,
    .apply_tile_bound = loha_apply_bound,
    .elem64 = loha_elem64,
    .certify_tile = loha_certify_tile,
    .certify_raw = loha_certify_raw,
    .describe = loha_describe,
    .describe_config = loha_describe_config,
};
