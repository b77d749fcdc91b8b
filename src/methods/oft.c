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
    return lm_rot_prep_make(p, R, R64, nbl, bs, err);
}

lm_code lm_rot_prep_make(lm_prepared *p, const float *RT, const double *RT64, uint64_t n_rot, uint64_t bs, lm_err *err)
{
    lm_rot_prep *rp = lm_prep_alloc(p, sizeof *rp, err);
    float *dn = rp ? lm_prep_floats(p, (size_t)(n_rot * bs), err) : NULL;
    float *DT = dn ? lm_prep_floats(p, (size_t)(n_rot * bs * bs), err) : NULL;
    double *R64 = DT ? lm_prep_alloc(p, (size_t)(n_rot * bs * bs) * sizeof *R64, err) : NULL;
    if (R64 == NULL)
        return LM_E_NOMEM;
    for (uint64_t j = 0; j < n_rot; j++)
        for (uint64_t a = 0; a < bs; a++)
            for (uint64_t b = 0; b < bs; b++) {
                const uint64_t e = j * bs * bs + b * bs + a;
                R64[(j * bs + a) * bs + b] = RT64[e];
                DT[e] = (float)(RT64[e] - (a == b ? 1.0 : 0.0));
            }
    for (uint64_t j = 0; j < n_rot; j++)
        for (uint64_t a = 0; a < bs; a++) {
            double ss = 0; /* exact enough: relative error < 2^-45, covered by the margin */
            for (uint64_t b = 0; b < bs; b++)
                ss += (double)DT[j * bs * bs + b * bs + a] * (double)DT[j * bs * bs + b * bs + a];
            /* rounded up: the margin > f32 rounding; 2^-100 covers D's subnormal roundings */
            dn[j * bs + a] = (float)(sqrt(ss) * (1.0 + 0x1p-20) + 0x1p-100);
        }
    rp->RT = RT;
    rp->RT64 = RT64;
    rp->R64 = R64;
    rp->DT = DT;
    rp->dn = dn;
    rp->n_rot = n_rot;
    rp->bs = bs;
    p->data = rp;
    return LM_OK;
}

/* Bound.  The certified form computes y_a = fl(x_a + v_a), v_a = fl(sum_b D32[a,b] x_b) by bs
 * fmaf roundings from 0 (rot_blocks with D in place of R), D32 = fl32(fl64(R64 - I)): for the
 * near-identity rotations of OFT and BOFT, D is small, and so is the bound (R itself gives bs u
 * ||x||, most of the rounding intervals of a bf16 value).  With Z_a = sum_b R64[a,b] x_b, the
 * value certified, u = 2^-24, eta = 2^-150 (underflow) and dn_a >= ||D32[a,:]||_2 + 2^-100:
 *   |R64 - I - D32| <= (u + 2^-53 (1 + u)) |D32| elementwise (plus 2^-150 for a subnormal D32,
 *   within u 2^-100 ||x||), so |Z_a - x_a - sum D32 x| <= (u + 2^-52) dn_a ||x||;
 *   |v_a - sum D32 x| <= gamma_bs sum |D32[a,b] x_b| + bs eta <= bs u (1 + bs u) dn_a ||x|| + bs eta;
 *   |y_a - (x_a + v_a)| <= u |y_a| (an f32 sum: exact when subnormal).
 * The f64 sums of lm_rotate_blocks64 and lm_rot_elem64 are within bs 2^-53 (1 + u)
 * (|x_a| + dn_a ||x||) of Z_a (|R64[a,b]| <= [a = b] + |D64[a,b]|): the bound covers them too.
 * ||x||_2 <= sqrtf(fl(sum x_b^2)) (1 + (bs + 2) u) + 2^-70 (any order of the bs squares and sums:
 * bs + 1 roundings, the sqrt one more; squares below 2^-150 lost: at most bs 2^-150 in all,
 * whose root is < 2^-70 for bs < 2^10).  So bound_a = dn_a xn c1 + |y_a| u (1 + 2^-20) +
 * |x_a| bs 2^-52 + c0 with c1 = (bs + 4) u (it also covers the f32 roundings of the bound's
 * products and sums, each at most u relative, and the 2^-52 terms) and c0 = bs 2^-149
 * (underflow, and the bound's own rounding near 0).  An inf or NaN anywhere makes the bound
 * inf or NaN: never certified. */
/* built for AVX-512 and AVX2 too (an ifunc picks one); the same IEEE operations in each (no
 * contraction: -ffp-contract=off), so the same bits */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define ROT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ROT_CLONES
#endif

/* one row: x (its input, replaced by its bound), v (D x, replaced by y); e: cols floats */
ROT_CLONES static void row_bound(float *x, float *v, float *e, const lm_rot_prep *rp, uint64_t cols)
{
    const uint64_t bs = rp->bs, nb = cols / bs;
    const float c1 = (float)(bs + 4) * 0x1p-24f, c0 = (float)bs * 0x1p-149f, cx = 1.0f + (float)(bs + 2) * 0x1p-24f;
    const float cy = 0x1p-24f * (1.0f + 0x1p-20f), ca = (float)bs * 0x1p-52f;
    for (uint64_t j = 0; j < nb; j++) { /* e = dn_a xn of the block */
        const float *xb = x + j * bs;
        float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        uint64_t b = 0;
        for (; b + 8 <= bs; b += 8)
            for (int q = 0; q < 8; q++)
                l[q] += xb[b + (uint64_t)q] * xb[b + (uint64_t)q];
        for (; b < bs; b++)
            l[b % 8] += xb[b] * xb[b];
        const float ss = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
        const float xn = (sqrtf(ss) * cx + 0x1p-70f) * c1;
        const float *dn = rp->dn + (rp->n_rot == 1 ? 0 : j) * bs;
        for (uint64_t a = 0; a < bs; a++)
            e[j * bs + a] = dn[a] * xn;
    }
    for (uint64_t c = 0; c < cols; c++) {
        const float xc = x[c], y = xc + v[c];
        v[c] = y;
        x[c] = ((e[c] + fabsf(y) * cy) + fabsf(xc) * ca) + c0;
    }
}

void lm_rotate_blocks_bound(const lm_tile *t, const lm_rot_prep *rp, float *bound)
{
    memcpy(bound, t->acc, (size_t)(t->nr * t->cols) * sizeof *bound); /* x, until its bound replaces it */
    t->k->rot_blocks(t->acc, (size_t)t->nr, (size_t)t->cols, rp->DT, (size_t)rp->n_rot, (size_t)rp->bs, t->scratch);
    for (uint64_t r = 0; r < t->nr; r++) /* the scratch (2 nr cols floats) is free again */
        row_bound(bound + r * t->cols, t->acc + r * t->cols, t->scratch, rp, t->cols);
}

/* ---- the certified form in one sweep (lm_rot_certify_tile) ---------------------------------
 * The same f32 operations as lm_rotate_blocks_bound (+ BOFT's row scaling, boft_apply_bound) and
 * the engine's certification (exec_exact.c: certify_bf16, certify_f16) element by element, with
 * nothing stored between them (the rot_cert kernel, kernels/rotcert_ref.c): the same bounds, the
 * same certified elements, the same bytes. */

int lm_rot_certify_tile(const lm_op *op, const lm_prepared *p, const float *row_scale, const lm_tile *t,
                        const void *raw, lm_kdtype in, lm_kdtype out, uint16_t *dst, lm_cert_counts *st,
                        uint64_t *n_changed)
{
    const lm_rot_prep *rp = p->data;
    const uint64_t cols = t->cols, bs = rp->bs;
    const uint16_t em = out == LM_KDT_BF16 ? 0x7F80u : 0x7C00u;
    const int conv = raw != NULL && in != LM_KDT_F32; /* bf16/f16 rows converted into xs */
    lm_rotcert rc = {rp->dn, (size_t)rp->n_rot, (size_t)bs, 1.0f, row_scale != NULL, out};
    /* v: 8 rows of D x; e: a row's block terms; y: rot_blocks' scratch; unc: a row's flags; xs:
     * 8 input rows converted from raw */
    float *v = malloc((size_t)((conv ? 16 : 8) * cols + cols + 8 * bs) * sizeof *v + (size_t)cols + 64);
    if (v == NULL)
        return -1;
    float *e = v + 8 * cols, *y = e + cols, *xs = y + 8 * bs;
    uint8_t *unc = (uint8_t *)(xs + (conv ? 8 * cols : 0));
    for (uint64_t r = 0; r < t->nr; r += 8) {
        const uint64_t g = t->nr - r < 8 ? t->nr - r : 8;
        const float *x0 = raw == NULL ? t->acc + r * cols : conv ? xs : (const float *)raw + r * cols;
        if (conv && in == LM_KDT_BF16)
            t->k->bf16_to_f32((const uint16_t *)raw + r * cols, xs, (size_t)(g * cols));
        else if (conv)
            t->k->f16_to_f32((const uint16_t *)raw + r * cols, xs, (size_t)(g * cols));
        t->k->rot_blocks_to(x0, v, (size_t)g, (size_t)cols, rp->DT, (size_t)rp->n_rot, (size_t)bs, y);
        for (uint64_t i = 0; i < g; i++) {
            const float *x = x0 + i * cols;
            uint16_t *d = dst + (r + i) * cols;
            if (row_scale != NULL)
                rc.f = row_scale[t->r0 + r + i];
            const unsigned any = t->k->rot_cert(x, v + i * cols, (size_t)cols, &rc, e, d, unc);
            for (uint64_t c = 0; any && c < cols; c++) {
                if ((c & 63) == 0 && c + 64 <= cols) { /* 64 at a time: a row has a few at most */
                    uint64_t w[8];
                    memcpy(w, unc + c, sizeof w);
                    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) == 0) {
                        c += 63;
                        continue;
                    }
                }
                if ((c & 7) == 0 && c + 8 <= cols) { /* eight at a time: most are certified */
                    uint64_t w8;
                    memcpy(&w8, unc + c, 8);
                    if (w8 == 0) {
                        c += 7;
                        continue;
                    }
                }
                if (!unc[c])
                    continue;
                const double x64 = op->method->elem64(op, p, x, t->r0 + r + i, c, cols);
                const uint16_t bits = lm_f64_to_16_1(x64, out);
                d[c] = bits;
                st->n_recomputed++;
                if (!isfinite(x64))
                    st->n_nonfinite++;
                else if ((bits & em) == em)
                    st->n_overflow++;
            }
        }
        if (n_changed != NULL && in == out)
            *n_changed += t->k->count_diff_16((const uint16_t *)raw + r * cols, dst + r * cols, (size_t)(g * cols));
    }
    free(v);
    return 0;
}

double lm_rot_elem64(const lm_rot_prep *rp, const float *x, uint64_t col)
{
    const uint64_t bs = rp->bs, j = col / bs, a = col % bs;
    const double *m = rp->R64 + ((rp->n_rot == 1 ? 0 : j) * bs + a) * bs;
    const float *xb = x + j * bs;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    uint64_t b = 0;
    for (; b + 4 <= bs; b += 4)
        for (int q = 0; q < 4; q++)
            s[q] += m[b + (uint64_t)q] * (double)xb[b + (uint64_t)q];
    for (; b < bs; b++)
        s[b % 4] += m[b] * (double)xb[b];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

/* built for AVX-512 and AVX2 too (an ifunc picks one), vectorized across a block's lanes (-O3 for
 * this function: gcc's -O2 leaves a loop of run-time length scalar); no FMA contraction
 * (-ffp-contract=off), so every clone computes the same products and sums */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define ROT64_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3")))
#else
#define ROT64_CLONES
#endif

ROT64_CLONES void lm_rotate_blocks64(const lm_tile64 *t, const double *RT, uint64_t n_rot, uint64_t bs)
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
    const lm_rot_prep *rp = p->data;
    (void)op;
    lm_rotate_blocks64(t, rp->RT64, rp->n_rot, rp->bs);
}

static void oft_apply_bound(const lm_op *op, const lm_prepared *p, const lm_tile *t, float *bound)
{
    (void)op;
    lm_rotate_blocks_bound(t, p->data, bound);
}

static double oft_elem64(const lm_op *op, const lm_prepared *p, const float *in, uint64_t row, uint64_t col,
                         uint64_t cols)
{
    (void)op, (void)row, (void)cols;
    return lm_rot_elem64(p->data, in, col);
}

static int oft_certify_tile(const lm_op *op, const lm_prepared *p, const lm_tile *t, lm_kdtype out, uint16_t *dst,
                            lm_cert_counts *st)
{
    return lm_rot_certify_tile(op, p, NULL, t, NULL, LM_KDT_F32, out, dst, st, NULL);
}

static int oft_certify_raw(const lm_op *op, const lm_prepared *p, const lm_tile *t, const void *raw, lm_kdtype in,
                           lm_kdtype out, uint16_t *dst, lm_cert_counts *st, uint64_t *n_changed)
{
    if (n_changed != NULL)
        *n_changed = 0;
    return lm_rot_certify_tile(op, p, NULL, t, raw, in, out, dst, st, n_changed);
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
    .apply_tile_bound = oft_apply_bound,
    .elem64 = oft_elem64,
    .certify_tile = oft_certify_tile,
    .certify_raw = oft_certify_raw,
    .describe = oft_describe,
};
