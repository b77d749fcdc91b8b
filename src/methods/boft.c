/* SPDX-License-Identifier: MIT */
/* boft.c : BOFT (peft-merge.md §5.7) with one butterfly factor (the only form PEFT loads without
 * its CUDA extension): W <- diag(s) (W @ blockdiag(R_j)^T), R_j the exact Cayley transform of
 * the skew part (X_j - X_j^T)/2 of boft_R's blocks, s = boft_s [out, 1].  The rotations are
 * built in f64 and kept in f32 (the fast path) and f64 (the exact path, apply_tile64). */
#include "oft.h"

#include "linalg.h"
#include "lm_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { BR, BS };

typedef struct {
    const lm_ts_tensor *R, *s; /* [1, nb, bs, bs], [out, 1] */
} boft_params;

typedef struct {
    long block_size, block_num, factor; /* boft_block_size (4), boft_block_num (0), boft_n_butterfly_factor (1) */
} boft_cfg;

static lm_code boft_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    boft_cfg *b = calloc(1, sizeof *b);
    if (b == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = b;
    b->block_size = 4;
    b->factor = 1;
    if (lm_cfg_int(root, "boft_block_size", &b->block_size, err) || lm_cfg_int(root, "boft_block_num", &b->block_num, err) ||
        lm_cfg_int(root, "boft_n_butterfly_factor", &b->factor, err))
        return err->code;
    if ((b->block_size != 0) == (b->block_num != 0) || b->block_size < 0 || b->block_num < 0 || b->factor < 1)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type BOFT needs exactly one of 'boft_block_size' (%ld) "
                       "and 'boft_block_num' (%ld) positive, the other 0, and 'boft_n_butterfly_factor' (%ld) >= 1",
                       b->block_size, b->block_num, b->factor);
    return LM_OK;
}

static lm_code boft_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (W->n_dims != 2) /* boft.layer.Conv2d.merge: (W_flat R^T) * boft_s with boft_s [1, out] */
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path, "BOFT on the %zu-D weight '%s': PEFT's "
                              "Conv2d merge multiplies boft_s [1, out] across the flattened input dimension (it only "
                              "runs when in*k*k = out); not supported", W->n_dims, W->name);
    uint64_t o = W->shape[0], in = W->shape[1];
    const lm_ts_tensor *R = m->part[BR], *sv = m->part[BS];
    if (!R || !sv || R->n_dims != 4 || R->shape[2] != R->shape[3] || R->shape[1] * R->shape[2] != in ||
        sv->n_elems != o || !lm_is_float_dtype(R->dtype) || !lm_is_float_dtype(sv->dtype))
        return lm_mismatch(err, m->path, "BOFT needs boft_R [m, in/bs, bs, bs] and boft_s [%llu, 1] for base '%s'",
                           (unsigned long long)o, W->name);
    if (R->shape[0] != 1)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "BOFT with %llu butterfly factors: PEFT itself can "
                       "only load 1 without its CUDA extension; not supported", (unsigned long long)R->shape[0]);
    /* the blocks PEFT builds from the config (BOFTLayer.update_layer): the one given divides in */
    const boft_cfg *bc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const char *key = bc->block_num ? "boft_block_num" : "boft_block_size";
    long v = bc->block_num ? bc->block_num : bc->block_size;
    if (in % (uint64_t)v != 0)
        return lm_cfg_disagrees(ctx, err, m->path, key, v, "it does not divide the %llu input features of '%s'",
                                (unsigned long long)in, W->name);
    uint64_t nb = bc->block_num ? (uint64_t)bc->block_num : in / (uint64_t)bc->block_size;
    if (nb != R->shape[1] || bc->factor != 1)
        return lm_cfg_disagrees(ctx, err, m->path, bc->factor != 1 ? "boft_n_butterfly_factor"
                                : key, bc->factor != 1 ? bc->factor : v, "PEFT makes %ld butterfly factor%s of %llu "
                                "blocks of %llu for '%s' and boft_R holds 1 of %llu blocks of %llu", bc->factor,
                                bc->factor == 1 ? "" : "s", (unsigned long long)nb, (unsigned long long)(in / nb), W->name,
                                (unsigned long long)R->shape[1], (unsigned long long)R->shape[2]);
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "boft", m->path, err);
    boft_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    pr->R = R;
    pr->s = sv;
    op->in = in;
    op->scale = 1.0;
    op->flops = 2.0 * (double)R->shape[2] * (double)W->n_elems;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static lm_code boft_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const boft_params *pr = op->params;
    uint64_t nbl = pr->R->shape[1], bs = pr->R->shape[2];
    const float *X = lm_prep_view(p, pr->R, k, err), *s = X ? lm_prep_view(p, pr->s, k, err) : NULL;
    float *R = s ? lm_prep_floats(p, (size_t)(nbl * bs * bs), err) : NULL;
    double *R64 = R ? lm_prep_alloc(p, (size_t)(nbl * bs * bs) * sizeof *R64, err) : NULL;
    double *Q = R64 ? malloc((size_t)(bs * bs) * 4 * sizeof *Q) : NULL;
    if (Q == NULL)
        return R64 ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory") : LM_E_NOMEM;
    double *S = Q + bs * bs, *work = S + bs * bs;
    for (uint64_t j = 0; j < nbl; j++) {
        for (uint64_t a = 0; a < bs; a++)
            for (uint64_t b = 0; b < bs; b++)
                Q[a * bs + b] = 0.5 * ((double)X[(j * bs + a) * bs + b] - (double)X[(j * bs + b) * bs + a]);
        lm_cayley_exact(Q, S, (size_t)bs, work);
        for (uint64_t a = 0; a < bs; a++) /* transposed, for lm_rotate_blocks */
            for (uint64_t b = 0; b < bs; b++) {
                R[j * bs * bs + b * bs + a] = (float)S[a * bs + b];
                R64[j * bs * bs + b * bs + a] = S[a * bs + b];
            }
    }
    free(Q);
    p->a = R;
    p->b = s;
    return lm_rot_prep_make(p, R, R64, nbl, bs, err);
}

static void boft_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const boft_params *pr = op->params;
    lm_rotate_blocks(t, p->a, pr->R->shape[1], pr->R->shape[2]);
    for (uint64_t r = 0; r < t->nr; r++) { /* then each output row scaled by s */
        float *x = t->acc + r * t->cols;
        const float f = p->b[t->r0 + r];
        for (uint64_t c = 0; c < t->cols; c++)
            x[c] *= f;
    }
}

/* the same in f64: each rotated value times s (exact f32 values) in f64 */
static void boft_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const lm_rot_prep *rp = p->data;
    (void)op;
    lm_rotate_blocks64(t, rp->RT64, rp->n_rot, rp->bs);
    for (uint64_t r = 0; r < t->nr; r++) {
        double *x = t->acc + r * t->cols;
        const double f = (double)p->b[t->r0 + r];
        for (uint64_t c = 0; c < t->cols; c++)
            x[c] *= f;
    }
}

/* the rotation's bound B scaled: |fl32(f r32) - fl64(f Y64)| <= |f| B + 2^-24 |fl32(f r32)| (1 + u)
 * + 2^-149 + 2^-53 |f Y64|: within |f| B (1 + 2^-20) + 2^-23 |y| + 2^-149 */
static void boft_apply_bound(const lm_op *op, const lm_prepared *p, const lm_tile *t, float *bound)
{
    (void)op;
    lm_rotate_blocks_bound(t, p->data, bound);
    for (uint64_t r = 0; r < t->nr; r++) {
        float *x = t->acc + r * t->cols, *bd = bound + r * t->cols;
        const float f = p->b[t->r0 + r], af = fabsf(f) * (1.0f + 0x1p-20f);
        for (uint64_t c = 0; c < t->cols; c++) {
            x[c] *= f;
            bd[c] = bd[c] * af + fabsf(x[c]) * 0x1p-23f + 0x1p-149f;
        }
    }
}

static double boft_elem64(const lm_op *op, const lm_prepared *p, const float *in, uint64_t row, uint64_t col,
                          uint64_t cols)
{
    (void)op, (void)cols;
    return lm_rot_elem64(p->data, in, col) * (double)p->b[row];
}

static int boft_certify_tile(const lm_op *op, const lm_prepared *p, const lm_tile *t, lm_kdtype out, uint16_t *dst,
                             lm_cert_counts *st)
{
    return lm_rot_certify_tile(op, p, p->b, t, NULL, LM_KDT_F32, out, dst, st, NULL);
}

static int boft_certify_raw(const lm_op *op, const lm_prepared *p, const lm_tile *t, const void *raw, lm_kdtype in,
                            lm_kdtype out, uint16_t *dst, lm_cert_counts *st, uint64_t *n_changed)
{
    if (n_changed != NULL)
        *n_changed = 0;
    return lm_rot_certify_tile(op, p, p->b, t, raw, in, out, dst, st, n_changed);
}

static const lm_part boft_parts[] = {{"boft_R", BR, -1, 1}, {"boft_s", BS, -1, 1}};

const lm_method lm_method_boft = {
    .peft_type = "BOFT",
    .summary = "boft (block rotations, rows scaled)",
    .parts = boft_parts,
    .n_parts = 2,
    .flags = LM_M_NO_RANK | LM_M_UNIT_WEIGHT,
    .parse_config = boft_parse,
    .plan_module = boft_plan_module,
    .prepare = boft_prepare,
    .apply_tile = boft_apply,
    .apply_tile64 = boft_apply64,
    .apply_tile_bound = boft_apply_bound,
    .elem64 = boft_elem64,
    .certify_tile = boft_certify_tile,
    .certify_raw = boft_certify_raw,
};
