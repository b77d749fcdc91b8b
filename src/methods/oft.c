/* SPDX-License-Identifier: MIT */
/* oft.c : OFT (peft-merge.md §5.6) on Linear weights and square-kernel Conv2d kernels (seen as
 * [o, i*k*k], as PEFT does): W <- W @ blockdiag(R_j)^T, R_j the Cayley
 * transform (exact, or PEFT's Cayley-Neumann series) of the skew matrix whose upper triangle
 * oft_R stores (optionally projected: coft); block_share keeps one block.  The rotations are
 * built in double when a tensor's first tile is claimed and applied to each tile by the
 * rot_blocks kernel (one fused multiply-add chain per element, SIMD across a block's lanes), or,
 * on the exact path (apply_tile64), from the same f64 rotations in f64 (lm_rotate_blocks64). */
#include "oft.h"

#include "linalg.h"
#include "lm_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int coft, neumann; /* coft (false), use_cayley_neumann (true) */
    long terms;        /* num_cayley_neumann_terms (5) */
    double eps;        /* eps (6e-5) */
    long r, bs;        /* r (0) and oft_block_size as the config gives them: PEFT derives the blocks */
    int block_share;
} oft_cfg;

typedef struct {
    const lm_ts_tensor *q; /* [n_rot, bs(bs-1)/2] */
    uint64_t bs;
    oft_cfg cfg;
} oft_params;

static lm_code oft_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    oft_cfg *o = calloc(1, sizeof *o);
    if (o == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = o;
    long bs = 0;
    o->neumann = 1;
    o->terms = 5;
    o->eps = 6e-5;
    if (lm_cfg_field(root, "oft_block_size") == NULL)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type OFT without oft_block_size: an adapter "
                       "from PEFT < 0.14, which today's PEFT refuses too (OFT was changed incompatibly)");
    if (lm_cfg_int(root, "oft_block_size", &bs, err) || lm_cfg_int(root, "r", &o->r, err) ||
        lm_cfg_bool(root, "block_share", &o->block_share, err) || lm_cfg_bool(root, "coft", &o->coft, err) ||
        lm_cfg_bool(root, "use_cayley_neumann", &o->neumann, err) ||
        lm_cfg_int(root, "num_cayley_neumann_terms", &o->terms, err) || lm_cfg_num(root, "eps", &o->eps, err))
        return err->code;
    o->bs = bs;
    if ((o->r != 0) == (bs != 0) || o->r < 0 || bs < 0) /* PEFT's OFTConfig refuses it too */
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type OFT needs exactly one of 'r' (%ld) and "
                       "'oft_block_size' (%ld) positive, the other 0", o->r, bs);
    return LM_OK;
}

/* PEFT's OFTLayer.adjust_oft_parameters: the divisor of n nearest to p (the lower one on a tie) */
static uint64_t oft_adjust(uint64_t n, uint64_t p)
{
    if (p >= n)
        return n;
    uint64_t hi = p, lo = p;
    while (hi <= n && n % hi != 0)
        hi++;
    while (lo > 1 && n % lo != 0)
        lo--;
    return p - lo <= hi - p ? lo : hi;
}

/* the block size PEFT builds for `in` input features from the config (it adjusts a value that does
 * not divide them, with a warning) */
static uint64_t lm_oft_peft_block(long r, long bs, uint64_t in)
{
    if (r == 0) {
        uint64_t b = (uint64_t)bs;
        return in % b != 0 || b > in ? oft_adjust(in, b) : b;
    }
    uint64_t n = in % (uint64_t)r != 0 || (uint64_t)r > in ? oft_adjust(in, (uint64_t)r) : (uint64_t)r;
    return in / n;
}

static lm_code oft_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    if (m->part[1] != NULL)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path, "OFT on an embedding is not supported yet");
    const lm_ts_tensor *q = m->part[0];
    uint64_t in;
    long bi = lm_ctx_weight_2d_or_conv(ctx, m->path, &in, err); /* Conv2d: in = i*k*k */
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    /* oft_R [blocks (1 with block_share), bs(bs-1)/2]; the blocks tile the input features */
    uint64_t n = q->n_dims == 2 ? q->shape[1] : 0, bs = 1;
    while (bs * (bs - 1) / 2 < n)
        bs++;
    if (q->n_dims != 2 || bs * (bs - 1) / 2 != n || bs < 2 || in % bs != 0 ||
        (q->shape[0] != 1 && q->shape[0] != in / bs) || !lm_is_float_dtype(q->dtype))
        return lm_mismatch(err, m->path, "oft_R must be [%llu or 1, bs(bs-1)/2] for base '%s' with in=%llu",
                           (unsigned long long)(bs > 1 ? in / bs : 0), W->name, (unsigned long long)in);
    const oft_cfg *oc = lm_ctx_adapter(ctx)->cfg->mcfg;
    uint64_t want = lm_oft_peft_block(oc->r, oc->bs, in);
    if (want != bs || (oc->block_share ? q->shape[0] != 1 : q->shape[0] != in / bs))
        return lm_cfg_disagrees(ctx, err, m->path, oc->r ? "r" : "oft_block_size", oc->r ? oc->r : oc->bs,
                                "PEFT makes %llu block%s of %llu for '%s' (%llu input features%s) and oft_R holds %llu "
                                "blocks of %llu", (unsigned long long)(oc->block_share ? 1 : in / want),
                                oc->block_share ? " (block_share)" : "s", (unsigned long long)want, W->name,
                                (unsigned long long)in, want == (uint64_t)(oc->r ? in / (uint64_t)oc->r : (uint64_t)oc->bs)
                                ? "" : ", the value adjusted as PEFT does", (unsigned long long)q->shape[0],
                                (unsigned long long)bs);
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "oft", m->path, err);
    oft_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    pr->q = q;
    pr->bs = bs;
    pr->cfg = *(const oft_cfg *)lm_ctx_adapter(ctx)->cfg->mcfg;
    op->in = in;
    op->scale = 1.0;
    op->flops = 2.0 * (double)bs * (double)W->n_elems;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

/* per block, the skew matrix Q from the stored upper triangle (row-major), optionally projected
 * (coft), then R by the Cayley-Neumann series or exactly; [n_rot, bs, bs] transposed, in f32
 * (p->a, the fast path) and f64 (p->data, the exact path) */
static lm_code oft_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const oft_params *pr = op->params;
    uint64_t bs = pr->bs, nbl = pr->q->shape[0], tri = pr->q->shape[1];
    const float *q = lm_prep_view(p, pr->q, k, err);
    float *R = q ? lm_prep_floats(p, (size_t)(nbl * bs * bs), err) : NULL;
    double *R64 = R ? lm_prep_alloc(p, (size_t)(nbl * bs * bs) * sizeof *R64, err) : NULL;
    double *Q = R64 ? malloc((size_t)(bs * bs) * 6 * sizeof *Q) : NULL;
    if (Q == NULL)
        return R64 ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory") : LM_E_NOMEM;
    double *S = Q + bs * bs, *work = S + bs * bs;
    for (uint64_t j = 0; j < nbl; j++) {
        memset(Q, 0, (size_t)(bs * bs) * sizeof *Q);
        uint64_t t = 0;
        for (uint64_t a = 0; a < bs; a++)
            for (uint64_t b = a + 1; b < bs; b++, t++) {
                Q[a * bs + b] = q[j * tri + t];
                Q[b * bs + a] = -q[j * tri + t];
            }
        if (pr->cfg.coft) {
            double fro = 0, lim = pr->cfg.eps / sqrt((double)nbl);
            for (uint64_t i = 0; i < bs * bs; i++)
                fro += Q[i] * Q[i];
            fro = sqrt(fro);
            if (fro > lim)
                for (uint64_t i = 0; i < bs * bs; i++)
                    Q[i] *= lim / fro;
        }
        if (pr->cfg.neumann)
            lm_cayley_neumann(Q, S, (size_t)bs, pr->cfg.terms > 0 ? (uint64_t)pr->cfg.terms : 0, work);
        else
            lm_cayley_exact(Q, S, (size_t)bs, work);
        for (uint64_t a = 0; a < bs; a++) /* transposed, for lm_rotate_blocks */
            for (uint64_t b = 0; b < bs; b++) {
                R[j * bs * bs + b * bs + a] = (float)S[a * bs + b];
                R64[j * bs * bs + b * bs + a] = S[a * bs + b];
            }
    }
    free(Q);
    p->a = R;
    p->data = R64;
    return LM_OK;
}

void lm_rotate_blocks64(const lm_tile64 *t, const double *RT, uint64_t n_rot, uint64_t bs)
{
    const uint64_t nb = t->cols / bs;
    double *y = t->scratch;
    for (uint64_t r = 0; r < t->nr; r++)
        for (uint64_t j = 0; j < nb; j++) {
            double *x = t->acc + r * t->cols + j * bs;
            const double *M = RT + (n_rot == 1 ? 0 : j) * bs * bs;
            for (uint64_t a = 0; a < bs; a++)
                y[a] = 0.0;
            for (uint64_t b = 0; b < bs; b++) { /* y_a += R[a, b] x_b, b ascending */
                const double xb = x[b];
                const double *m = M + b * bs;
                for (uint64_t a = 0; a < bs; a++)
                    y[a] += m[a] * xb;
            }
            memcpy(x, y, (size_t)bs * sizeof *x);
        }
}

void lm_rotate_blocks(const lm_tile *t, const float *RT, uint64_t n_rot, uint64_t bs)
{
    t->k->rot_blocks(t->acc, (size_t)t->nr, (size_t)t->cols, RT, (size_t)n_rot, (size_t)bs, t->scratch);
}

static void oft_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const oft_params *pr = op->params;
    lm_rotate_blocks(t, p->a, pr->q->shape[0], pr->bs);
}

static void oft_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const oft_params *pr = op->params;
    lm_rotate_blocks64(t, p->data, pr->q->shape[0], pr->bs);
}

static void oft_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    (void)m;
    snprintf(buf, cap, "oft (block rotations%s)", ((const oft_cfg *)cfg->mcfg)->neumann ? ", Cayley-Neumann" : ", Cayley");
}

static const lm_part oft_parts[] = {{"oft_R", 0, -1, 1}, {"oft_embedding_R", 1, -1, 1}};

const lm_method lm_method_oft = {
    .peft_type = "OFT",
    .summary = "W @ blockdiag(Cayley(Q_j))^T",
    .parts = oft_parts,
    .n_parts = 2,
    .flags = LM_M_NO_RANK | LM_M_UNIT_WEIGHT,
    .parse_config = oft_parse,
    .plan_module = oft_plan_module,
    .prepare = oft_prepare,
    .apply_tile = oft_apply,
    .apply_tile64 = oft_apply64,
    .describe = oft_describe,
};
