/* SPDX-License-Identifier: MIT */
/* loha.c : LoHa (peft-merge.md §5.4): W += (w1a @ w1b) * (w2a @ w2b) * alpha/r, the two
 * products computed per row tile, then multiplied elementwise.  Linear weights, and convolution
 * kernels [o, i/groups, k...] seen as [o, i/groups * k...] (PEFT's flat form).  The CP (Tucker)
 * form of Conv1d/Conv2d (use_effective_conv2d: hada_t1/t2 [r, r, kh, kw], w_a [r, o], w_b [r, i])
 *     R_j[p, q, x, y] = sum_{a,b} t_j[a, b, x, y] w_j_a[a, p] w_j_b[b, q]
 * is the same product once prepare has built w_j_a^T [o, r] and U_j[a, (q, x, y)] = sum_b
 * t_j[a, b, x, y] w_j_b[b, q] (f64, rounded once), so a tile is still two small products. */
#include "method.h"

#include "gemm_tile.h"
#include "linalg.h"
#include "lm_error.h"
#include "lycoris.h"

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
} loha_prep;

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
        return LM_OK;
    /* CP: f[2j] <- w_j_a^T [o, r]; f[2j+1] <- U_j [r, i * kk] */
    const uint64_t r = op->rank, o = pr->o, in = pr->i, kk = pr->kk;
    const size_t nu = (size_t)(r * in * kk);
    float *blk = lm_prep_floats(p, 2 * ((size_t)(o * r) + nu), err); /* one block: at most 8 owned */
    double *u64 = blk ? malloc(nu * sizeof *u64 + 1) : NULL;
    if (blk != NULL && u64 == NULL)
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (int j = 0; j < 2 && u64 != NULL; j++) {
        const float *wa = lp->f[2 * j], *wb = lp->f[2 * j + 1], *tj = lm_prep_view(p, pr->t[j], k, err);
        float *waT = blk + (size_t)j * ((size_t)(o * r) + nu), *U = waT + o * r;
        if (tj == NULL) {
            free(u64);
            return LM_E_NOMEM;
        }
        for (uint64_t a = 0; a < r; a++)
            for (uint64_t q = 0; q < o; q++)
                waT[q * r + a] = wa[a * o + q];
        lm_tucker_fold(tj, wb, (size_t)r, (size_t)in, (size_t)kk, u64);
        for (size_t e = 0; e < nu; e++)
            U[e] = (float)u64[e];
        lp->f[2 * j] = waT;
        lp->f[2 * j + 1] = U;
    }
    if (u64 == NULL)
        return LM_E_NOMEM;
    free(u64);
    return LM_OK;
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
    .describe = loha_describe,
    .describe_config = loha_describe_config,
};
