/* SPDX-License-Identifier: MIT */
/* hra.c : HRA (peft-merge.md §5.11): W <- W @ H on Linear weights and square-kernel Conv2d
 * kernels (seen as [o, i*k*k], as PEFT does), H = H_0 H_1 ... H_{r-1} the Householder
 * reflections I - 2 u u^T of the normalised columns of hra_u [in, r] (or, with apply_GS, of
 * their Gram-Schmidt orthonormalisation: H = I - 2 Q^T Q).  Applied in its compact WY form
 * W - ((W U^T) T) U, two rank-r products through BLAS per tile.  The exact path (apply_tile64)
 * applies the same form in f64 with U and T built in f64 (no f32 unit vectors), by the wy64
 * kernel (kernels/wy64_*.c). */
#include "method.h"

#include "gemm_tile.h"
#include "linalg.h"
#include "lm_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int gs; /* apply_GS */
} hra_cfg;

typedef struct {
    const lm_ts_tensor *u;
    int gs;
} hra_params;

typedef struct {
    const float *U;  /* [r, in]: the unit vectors as rows */
    const float *Ut; /* [in, r]: U transposed (the tile's first product reads it by rows) */
    const float *T;  /* [r, r] */
    const double *U64, *T64; /* the same in f64 (the exact path) */
} hra_prep;

static lm_code hra_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    hra_cfg *h = calloc(1, sizeof *h);
    if (h == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = h;
    return lm_cfg_bool(root, "apply_GS", &h->gs, err);
}

static lm_code hra_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_ts_tensor *u = m->part[0];
    uint64_t in;
    long bi = lm_ctx_weight_2d_or_conv(ctx, m->path, &in, err); /* Conv2d: in = i*k*k */
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (u->n_dims != 2 || u->shape[0] != in || u->shape[1] > in || !lm_is_float_dtype(u->dtype))
        return lm_mismatch(err, m->path, "hra_u must be [%llu, r] for base '%s'", (unsigned long long)in, W->name);
    if (lm_cfg_rank_is(ctx, err, m->path, u->shape[1], "hra_u") != LM_OK)
        return err->code;
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "hra", m->path, err);
    hra_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    pr->u = u;
    pr->gs = ((const hra_cfg *)lm_ctx_adapter(ctx)->cfg->mcfg)->gs;
    op->rank = u->shape[1];
    op->in = in;
    op->scale = 1.0;
    op->flops = 4.0 * (double)op->rank * (double)W->n_elems;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static lm_code hra_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const hra_params *pr = op->params;
    size_t r = (size_t)op->rank, n = (size_t)op->in;
    hra_prep *hp = lm_prep_alloc(p, sizeof *hp, err);
    const float *V = hp ? lm_prep_view(p, pr->u, k, err) : NULL;
    float *U = V ? lm_prep_floats(p, r * n, err) : NULL, *T = U ? lm_prep_floats(p, r * r, err) : NULL;
    float *Ut = T ? lm_prep_floats(p, n * r, err) : NULL;
    double *work = Ut ? malloc((n + 2 * r * r + 1) * sizeof *work) : NULL;
    if (work == NULL)
        return Ut ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory") : LM_E_NOMEM;
    lm_unit_rows(V, n, r, pr->gs, U, work);
    double *Td = work + n;
    if (pr->gs) { /* orthonormal rows: H = I - 2 Q^T Q */
        memset(Td, 0, r * r * sizeof *Td);
        for (size_t j = 0; j < r; j++)
            Td[j * r + j] = 2.0;
    } else {
        lm_householder_wy(U, r, n, Td, work + n + r * r);
    }
    for (size_t i = 0; i < r * r; i++)
        T[i] = (float)Td[i];
    double *U64 = lm_prep_alloc(p, (r * n + r * r) * sizeof *U64, err), *T64 = U64 ? U64 + r * n : NULL;
    if (U64 == NULL) {
        free(work);
        return LM_E_NOMEM;
    }
    lm_unit_rows_d(V, n, r, pr->gs, U64);
    if (pr->gs) {
        for (size_t j = 0; j < r; j++)
            T64[j * r + j] = 2.0;
    } else {
        lm_householder_wy_d(U64, r, n, T64, work);
    }
    hp->U64 = U64;
    hp->T64 = T64;
    free(work);
    for (size_t q = 0; q < r; q++)
        for (size_t j = 0; j < n; j++)
            Ut[j * r + q] = U[q * n + j];
    hp->U = U;
    hp->Ut = Ut;
    hp->T = T;
    p->data = hp;
    return LM_OK;
}

/* x <- x - ((x U^T) T) U for the tile's rows */
static void hra_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const hra_prep *hp = p->data;
    size_t r = (size_t)op->rank, nr = (size_t)t->nr, cols = (size_t)t->cols;
    float *P = t->scratch, *P2 = t->scratch + nr * r;
    t->k->gemm_rows(0, 0, nr, r, cols, 1.0f, t->acc, cols, hp->Ut, r, 0.0f, P, r);     /* P = X U^T */
    t->k->gemm_rows(0, 0, nr, r, r, 1.0f, P, r, hp->T, r, 0.0f, P2, r);                /* P2 = P T */
    t->k->gemm_rows(0, 0, nr, cols, r, -1.0f, P2, r, hp->U, cols, 1.0f, t->acc, cols); /* X -= P2 U */
}

/* the same in f64: x <- x - ((x U^T) T) U, sums in f64 (the wy64 kernel: the scratch holds
 * 2 nr cols >= 2 nr r doubles) */
static void hra_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const hra_prep *hp = p->data;
    t->k->wy64(t->acc, (size_t)t->nr, (size_t)t->cols, hp->U64, (size_t)op->rank, hp->T64, t->scratch);
}

static void hra_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    (void)m;
    snprintf(buf, cap, "hra (W @ Householder reflections%s)", ((const hra_cfg *)cfg->mcfg)->gs ? ", Gram-Schmidt" : "");
}

static const lm_part hra_parts[] = {{"hra_u", 0, -1, 1}};

const lm_method lm_method_hra = {
    .peft_type = "HRA",
    .summary = "W @ Householder reflections",
    .flags = LM_M_UNIT_WEIGHT,
    .parts = hra_parts,
    .n_parts = 1,
    .parse_config = hra_parse,
    .plan_module = hra_plan_module,
    .prepare = hra_prepare,
    .apply_tile = hra_apply,
    .apply_tile64 = hra_apply64,
    .certify_tile = lm_f64_rows_tile,
    .certify_raw = lm_f64_rows_raw,
    .describe = hra_describe,
};
