/* SPDX-License-Identifier: MIT */
/* exec_lowrank.c : see exec_lowrank.h. */
#include "exec_lowrank.h"

#include <stdlib.h>
#include <string.h>

struct lm_lowrank_tensor {
    lm_lowrank lr;
    double *B, *A, *s; /* [rows x K], [K x cols], [K] */
    void *ws;          /* the kernel's workspace */
};

static int kernel_dtype(lm_dtype dt)
{
    return dt == LM_DT_BF16 || dt == LM_DT_F16 || dt == LM_DT_F32;
}

lm_kdtype lm_kdtype_of(lm_dtype dt)
{
    return dt == LM_DT_BF16 ? LM_KDT_BF16 : dt == LM_DT_F16 ? LM_KDT_F16 : LM_KDT_F32;
}

/* the op's factors as the tile sees them: rows x rank (B side), rank x cols (A side) */
static int op_fits(const lm_op *op, const lm_plan_tensor *t)
{
    if (op->kind != LM_OP_LOWRANK)
        return 0;
    return op->axis ? op->in == t->rows && op->out == t->cols : op->out == t->rows && op->in == t->cols;
}

int lm_lowrank_tensor_eligible(const lm_plan_tensor *t)
{
    if (t->base == NULL || t->n_ops == 0 || !kernel_dtype(t->src_dtype) || !kernel_dtype(t->dtype) ||
        t->rows == 0 || t->cols == 0)
        return 0;
    uint64_t K = 0;
    for (size_t o = 0; o < t->n_ops; o++) {
        if (!op_fits(&t->ops[o], t))
            return 0;
        K += t->ops[o].rank;
    }
    return K <= LM_LOWRANK_MAX_K;
}

void lm_lowrank_tensor_free(lm_lowrank_tensor *f)
{
    if (f == NULL)
        return;
    free(f->B);
    free(f->A);
    free(f->s);
    free(f->ws);
    free(f);
}

const lm_lowrank *lm_lowrank_tensor_factors(const lm_lowrank_tensor *f)
{
    return &f->lr;
}

/* element (r, i) of the op's A' [rank, in] and (o, r) of B' [out, rank], f64 when the method
 * made them in f64, else the f32 values (exact in f64) */
static double fa(const lm_prepared *p, const lm_op *op, uint64_t r, uint64_t i)
{
    const size_t e = (size_t)(r * op->in + i);
    return p->a64 ? p->a64[e] : (double)p->a[e];
}

static double fb(const lm_prepared *p, const lm_op *op, uint64_t o, uint64_t r)
{
    const size_t e = (size_t)(o * op->rank + r);
    return p->b64 ? p->b64[e] : (double)p->b[e];
}

lm_lowrank_tensor *lm_lowrank_tensor_create(const lm_plan_tensor *t, const lm_prepared *prep, lm_err *err)
{
    size_t K = 0;
    for (size_t o = 0; o < t->n_ops; o++)
        K += (size_t)t->ops[o].rank;
    const size_t rows = (size_t)t->rows, cols = (size_t)t->cols;
    const size_t ws_bytes = lm_lowrank_ws_bytes(rows, cols, K);
    lm_lowrank_tensor *f = calloc(1, sizeof *f);
    if (f == NULL || ws_bytes == 0)
        goto nomem;
    f->B = malloc(rows * K * sizeof *f->B + 1);
    f->A = malloc(K * cols * sizeof *f->A + 1);
    f->s = malloc(K * sizeof *f->s + 1);
    f->ws = malloc(ws_bytes);
    if (f->B == NULL || f->A == NULL || f->s == NULL || f->ws == NULL)
        goto nomem;
    /* op o's terms are k0 .. k0 + rank - 1.  axis 0: W [out, in] += B' A'; axis 1: W [in, out]
     * += (B' A')^T, so the tile's B side is A'^T and its A side B'^T */
    size_t k0 = 0;
    for (size_t o = 0; o < t->n_ops; o++) {
        const lm_op *op = &t->ops[o];
        const lm_prepared *p = &prep[o];
        const size_t rank = (size_t)op->rank;
        for (size_t q = 0; q < rank; q++)
            f->s[k0 + q] = op->scale;
        for (size_t i = 0; i < rows; i++)
            for (size_t q = 0; q < rank; q++)
                f->B[i * K + k0 + q] = op->axis ? fa(p, op, q, i) : fb(p, op, i, q);
        for (size_t q = 0; q < rank; q++)
            for (size_t j = 0; j < cols; j++)
                f->A[(k0 + q) * cols + j] = op->axis ? fb(p, op, j, q) : fa(p, op, q, j);
        k0 += rank;
    }
    if (lm_lowrank_prepare(&f->lr, rows, cols, K, f->B, f->A, f->s, f->ws, ws_bytes) != 0)
        goto nomem;
    return f;
nomem:
    lm_lowrank_tensor_free(f);
    lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the low-rank factors of '%s'", t->name);
    return NULL;
}
