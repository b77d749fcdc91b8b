/* SPDX-License-Identifier: MIT */
/* test_lycoris.c : LyCORIS's weight decomposition (dora_scale) and norm tuning (w_norm / b_norm)
 * in kohya-style files (src/peft/formats_kohya.c, src/methods/lycoris.c).
 *
 * Generated LyCORIS files merged onto generated bases (F32 and BF16) and compared element by
 * element with LyCORIS's rule computed here in double precision from the stored values
 * (lycoris/modules/locon.py apply_weight_decompose, norms.py NormModule):
 *     V = W + (alpha / r) dW;  f = dora_scale / (||V|| + 2^-23), the norm per output row
 *     (dora_scale [out, 1, ...]) or per input channel over outputs and kernel positions
 *     ([1, in, 1, ...]);  W' = V * f, or V * (w (f - 1) + 1) with a multiplier w != 1;
 *     norms: W' = W + w * w_norm, b' = b + w * b_norm.
 * A row whose norm is about 2^-23 shows the epsilon (without it the factor is 40% off); the
 * multiplier case shows the delta is not weighted.  Malformed inputs are refused with one line
 * and no output; `convert` refuses both forms (PEFT cannot say them). */
#include "th.h"

#include "lora_merge.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define EPS 0x1p-23

typedef struct {
    char name[200];
    char dtype[8];
    int n_dims;
    uint64_t shape[4];
    uint64_t n;
    double *v; /* values exactly as stored */
} tt;

typedef struct {
    tt t[48];
    size_t n;
} tset;

static uint64_t g_seed = 0x1c0de;

/* a tensor of uniform values in [lo, lo + 2 * amp), rounded to dtype */
static tt *tadd_r(tset *s, const char *dtype, const char *name, double lo, double amp, int n_dims, ...)
{
    cr_assert(s->n < 48);
    tt *t = &s->t[s->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
    t->n_dims = n_dims;
    t->n = 1;
    va_list ap;
    va_start(ap, n_dims);
    for (int d = 0; d < n_dims; d++) {
        t->shape[d] = va_arg(ap, uint64_t);
        t->n *= t->shape[d];
    }
    va_end(ap);
    t->v = malloc((t->n ? t->n : 1) * sizeof *t->v);
    for (uint64_t i = 0; i < t->n; i++)
        t->v[i] = th_round_to(lo + amp * (th_rand_uniform(&g_seed) + 1.0), dtype);
    return t;
}

#define U64(x) ((uint64_t)(x))
#define tadd(s, dt, name, nd, ...) tadd_r((s), (dt), (name), -1.0, 1.0, (nd), __VA_ARGS__)

static void tfree(tset *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->t[i].v);
    s->n = 0;
}

static void twrite(const char *path, const tset *s)
{
    th_out_tensor o[48];
    for (size_t i = 0; i < s->n; i++) {
        memset(&o[i], 0, sizeof o[i]);
        o[i].name = s->t[i].name;
        o[i].dtype = s->t[i].dtype;
        o[i].n_dims = s->t[i].n_dims;
        memcpy(o[i].shape, s->t[i].shape, sizeof s->t[i].shape);
        o[i].values = s->t[i].v;
    }
    cr_assert_eq(th_st_write(path, o, s->n), 0, "cannot write %s", path);
}

static char *pjoin(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", a, b);
    return p;
}

typedef struct {
    lm_code rc;
    lm_err err;
    lm_merge_report *rep;
    char line[2048];
} mres;

static mres merge_opts(const char *base, const char *adapter, const char *out, double w, int threads, uint64_t tile,
                       const char *kernels)
{
    mres r;
    memset(&r, 0, sizeof r);
    lm_err_clear(&r.err);
    lm_merge_adapter a = {adapter, w};
    lm_merge_job job;
    memset(&job, 0, sizeof job);
    job.base_path = base;
    job.out_path = out;
    job.adapters = &a;
    job.n_adapters = 1;
    job.n_threads = threads;
    job.tile_elems = tile;
    job.kernels = kernels;
    r.rc = lm_merge_run(&job, &r.rep, &r.err);
    lm_err_format(&r.err, r.line, sizeof r.line);
    return r;
}

static mres merge_w(const char *base, const char *adapter, const char *out, double w)
{
    return merge_opts(base, adapter, out, w, 2, 0, NULL);
}

static int has_note(const mres *r, const char *needle)
{
    for (size_t i = 0; r->rep && i < r->rep->n_notes; i++)
        if (strstr(r->rep->notes[i], needle))
            return 1;
    return 0;
}

/* one line naming what is wrong, kind as given, no output */
static void expect_refused(mres *r, const char *out, const char *kind, const char *needle)
{
    cr_assert_neq(r->rc, LM_OK, "expected a refusal (%s, %s)", kind, needle);
    cr_assert_str_eq(r->err.kind, kind, "%s", r->line);
    cr_assert(strstr(r->line, needle) != NULL, "'%s' not in: %s", needle, r->line);
    cr_assert(strchr(r->line, '\n') == NULL, "one line: %s", r->line);
    cr_assert(!th_exists(out), "no output after a refusal");
    lm_merge_report_free(r->rep);
    r->rep = NULL;
}

/* ---- the reference -------------------------------------------------------------------------- */
/* w[o, c] += s * sum_k B[o, k] A[k, c]  (W viewed [out, cols]) */
static void ref_lowrank(double *w, const double *B, const double *A, uint64_t out, uint64_t r, uint64_t cols, double s)
{
    for (uint64_t o = 0; o < out; o++)
        for (uint64_t c = 0; c < cols; c++) {
            double acc = 0;
            for (uint64_t k = 0; k < r; k++)
                acc += B[o * r + k] * A[k * cols + c];
            w[o * cols + c] += s * acc;
        }
}

/* LyCORIS's factor on V = w [out, in * kk]: per output row, or per input channel (its kk
 * columns of every row); mult != 1 mixes it as LyCORIS does.  eps 0: what PEFT would do. */
static void ref_dora(double *w, uint64_t out, uint64_t in, uint64_t kk, const double *ds, int on_in, double mult,
                     double eps)
{
    const uint64_t cols = in * kk, groups = on_in ? in : out;
    for (uint64_t g = 0; g < groups; g++) {
        double ss = 0;
        for (uint64_t o = 0; o < out; o++)
            for (uint64_t c = 0; c < cols; c++)
                if (on_in ? c / kk == g : o == g)
                    ss += w[o * cols + c] * w[o * cols + c];
        double f = ds[g] / (sqrt(ss) + eps);
        if (mult != 1.0)
            f = mult * (f - 1.0) + 1.0;
        for (uint64_t o = 0; o < out; o++)
            for (uint64_t c = 0; c < cols; c++)
                if (on_in ? c / kk == g : o == g)
                    w[o * cols + c] *= f;
    }
}

/* every base tensor of the output against ref[i] (the golden rule per dtype) */
static void check_output(const char *out, const tset *base, double *const *ref)
{
    th_st st;
    cr_assert_eq(th_st_read(out, &st), 0, "cannot read %s", out);
    for (size_t i = 0; i < base->n; i++) {
        const th_tensor *t = th_st_find(&st, base->t[i].name);
        cr_assert(t != NULL, "output lacks %s", base->t[i].name);
        double *v = th_to_f64(t);
        th_cmp c = th_compare(base->t[i].dtype, v, ref[i], base->t[i].n);
        cr_assert(c.ok, "%s (%s): %s (max %.3g ulp, max abs err %.3g)", base->t[i].name, base->t[i].dtype, c.why,
                  c.max_ulp, c.max_abs_err);
        free(v);
    }
    th_st_free(&st);
}

static double *ref_of(tset *base, double **ref, const char *name)
{
    for (size_t i = 0; i < base->n; i++)
        if (strcmp(base->t[i].name, name) == 0)
            return ref[i];
    cr_assert_fail("no base tensor %s", name);
    return NULL;
}

/* ---- the base ------------------------------------------------------------------------------ */
/* Linear layers (not square: the axis shows), 3x3 convolutions, a LayerNorm with a bias, a
 * GroupNorm without, and "tiny" whose rows have norms near 2^-23 */
static void lyco_base(tset *b, const char *dt)
{
    tadd(b, dt, "blk.lin.weight", 2, U64(6), U64(10));
    tadd(b, dt, "blk.lin2.weight", 2, U64(10), U64(6));
    tadd(b, dt, "blk.conv.weight", 4, U64(6), U64(4), U64(3), U64(3));
    tadd(b, dt, "blk.conv.bias", 1, U64(6));
    tadd(b, dt, "blk.conv2.weight", 4, U64(5), U64(4), U64(3), U64(3));
    tadd(b, dt, "blk.loha.weight", 2, U64(6), U64(8));
    tadd(b, dt, "blk.lokr.weight", 2, U64(8), U64(6));
    tadd(b, dt, "blk.plain.weight", 2, U64(5), U64(7));
    tadd_r(b, dt, "blk.norm.weight", 0.5, 0.5, 1, U64(10));
    tadd(b, dt, "blk.norm.bias", 1, U64(10));
    tadd_r(b, dt, "blk.gn.weight", 0.5, 0.5, 1, U64(4));
    tadd_r(b, dt, "blk.tiny.weight", -1e-7, 1e-7, 2, U64(4), U64(3));
}

static double **refs_of(const tset *base)
{
    double **ref = calloc(base->n, sizeof *ref);
    for (size_t i = 0; i < base->n; i++) {
        ref[i] = malloc(base->t[i].n * sizeof **ref);
        memcpy(ref[i], base->t[i].v, base->t[i].n * sizeof **ref);
    }
    return ref;
}

static void refs_free(const tset *base, double **ref)
{
    for (size_t i = 0; i < base->n; i++)
        free(ref[i]);
    free(ref);
}

#define K "lora_unet_blk_"

/* a LoRA / LoCon module "K<name>" with rank r, alpha a and dora_scale ds (positive, around the
 * base norms) of the given shape; returns the factors through *down and *up */
static void lora_module(tset *ad, const char *name, uint64_t out, uint64_t in, uint64_t kk, uint64_t r, double alpha,
                        tt **down, tt **up)
{
    char k[200];
    snprintf(k, sizeof k, K "%s.lora_down.weight", name);
    *down = kk > 1 ? tadd(ad, "F32", k, 4, r, in, U64(3), U64(3)) : tadd(ad, "F32", k, 2, r, in);
    snprintf(k, sizeof k, K "%s.lora_up.weight", name);
    *up = kk > 1 ? tadd(ad, "F32", k, 4, out, r, U64(1), U64(1)) : tadd(ad, "F32", k, 2, out, r);
    snprintf(k, sizeof k, K "%s.alpha", name);
    tt *a = tadd(ad, "F16", k, 0, 0);
    a->v[0] = alpha;
}

static tt *dora_scale(tset *ad, const char *name, int n_dims, uint64_t d0, uint64_t d1)
{
    char k[200];
    snprintf(k, sizeof k, K "%s.dora_scale", name);
    return n_dims == 4 ? tadd_r(ad, "F32", k, 0.5, 1.0, 4, d0, d1, U64(1), U64(1))
                       : tadd_r(ad, "F32", k, 0.5, 1.0, 2, d0, d1);
}

/* kind 0: LoRA + DoRA on both axes of a Linear and a conv, a plain LoRA, a LayerNorm (w_norm,
 * b_norm), a GroupNorm (w_norm) and the tiny-norm rows; kind 1: LoHa + DoRA (input axis) and the
 * norms; kind 2: LoKr + DoRA (output axis) (a file has one type of module, as PEFT's adapters);
 * the reference for multiplier mult (eps 0: PEFT's rule, for the contrast) */
static void lyco_lora(tset *ad, tset *base, double **ref, double mult, double eps)
{
    tt *d, *u;
    /* Linear, one norm per output row: dora_scale [6, 1] */
    lora_module(ad, "lin", 6, 10, 1, 2, 3.0, &d, &u);
    tt *ds = dora_scale(ad, "lin", 2, 6, 1);
    double *w = ref_of(base, ref, "blk.lin.weight");
    ref_lowrank(w, u->v, d->v, 6, 2, 10, 1.5);
    ref_dora(w, 6, 10, 1, ds->v, 0, mult, eps);
    /* Linear, one norm per input column: [1, 6] */
    lora_module(ad, "lin2", 10, 6, 1, 3, 0.0, &d, &u); /* alpha 0: r */
    ds = dora_scale(ad, "lin2", 2, 1, 6);
    w = ref_of(base, ref, "blk.lin2.weight");
    ref_lowrank(w, u->v, d->v, 10, 3, 6, 1.0);
    ref_dora(w, 10, 6, 1, ds->v, 1, mult, eps);
    /* 3x3 conv, per input channel over outputs and kernel positions: [1, 4, 1, 1] */
    lora_module(ad, "conv", 6, 4, 9, 2, 1.0, &d, &u);
    ds = dora_scale(ad, "conv", 4, 1, 4);
    w = ref_of(base, ref, "blk.conv.weight");
    ref_lowrank(w, u->v, d->v, 6, 2, 36, 0.5);
    ref_dora(w, 6, 4, 9, ds->v, 1, mult, eps);
    /* 3x3 conv, per output channel: [5, 1, 1, 1] */
    lora_module(ad, "conv2", 5, 4, 9, 2, 4.0, &d, &u);
    ds = dora_scale(ad, "conv2", 4, 5, 1);
    w = ref_of(base, ref, "blk.conv2.weight");
    ref_lowrank(w, u->v, d->v, 5, 2, 36, 2.0);
    ref_dora(w, 5, 4, 9, ds->v, 0, mult, eps);
    /* a plain LoRA module in the same file: W += mult * s dW */
    lora_module(ad, "plain", 5, 7, 1, 2, 2.0, &d, &u);
    ref_lowrank(ref_of(base, ref, "blk.plain.weight"), u->v, d->v, 5, 2, 7, mult);
    /* rows of norm ~1.7e-7 after a tiny delta: the epsilon is 40% of it */
    tt *td = tadd(ad, "F32", K "tiny.lora_down.weight", 2, U64(1), U64(3));
    tt *tu = tadd_r(ad, "F32", K "tiny.lora_up.weight", -1e-8, 1e-8, 2, U64(4), U64(1));
    ds = dora_scale(ad, "tiny", 2, 4, 1);
    w = ref_of(base, ref, "blk.tiny.weight");
    ref_lowrank(w, tu->v, td->v, 4, 1, 3, 1.0);
    ref_dora(w, 4, 3, 1, ds->v, 0, mult, eps);
}

static void lyco_loha(tset *ad, tset *base, double **ref, double mult, double eps)
{
    /* LoHa [6, 8], r 2, alpha 1, per input column */
    tt *h[4], *ds;
    double *w;
    const char *hn[4] = {K "loha.hada_w1_a", K "loha.hada_w1_b", K "loha.hada_w2_a", K "loha.hada_w2_b"};
    for (int i = 0; i < 4; i++)
        h[i] = i % 2 ? tadd(ad, "F32", hn[i], 2, U64(2), U64(8)) : tadd(ad, "F32", hn[i], 2, U64(6), U64(2));
    tadd(ad, "F32", K "loha.alpha", 0, 0)->v[0] = 1.0;
    ds = dora_scale(ad, "loha", 2, 1, 8);
    w = ref_of(base, ref, "blk.loha.weight");
    for (int o = 0; o < 6; o++)
        for (int i = 0; i < 8; i++) {
            double a = 0, b = 0;
            for (int q = 0; q < 2; q++) {
                a += h[0]->v[o * 2 + q] * h[1]->v[q * 8 + i];
                b += h[2]->v[o * 2 + q] * h[3]->v[q * 8 + i];
            }
            w[o * 8 + i] += 0.5 * a * b;
        }
    ref_dora(w, 6, 8, 1, ds->v, 1, mult, eps);
}

static void lyco_lokr(tset *ad, tset *base, double **ref, double mult, double eps)
{
    tt *ds;
    double *w;
    /* LoKr [8, 6] = kron(w1 [2, 3], w2_a [4, 1] @ w2_b [1, 2]), r 1, alpha 1, per output row */
    tt *k1 = tadd(ad, "F32", K "lokr.lokr_w1", 2, U64(2), U64(3));
    tt *k2a = tadd(ad, "F32", K "lokr.lokr_w2_a", 2, U64(4), U64(1));
    tt *k2b = tadd(ad, "F32", K "lokr.lokr_w2_b", 2, U64(1), U64(2));
    tadd(ad, "F32", K "lokr.alpha", 0, 0)->v[0] = 1.0;
    ds = dora_scale(ad, "lokr", 2, 8, 1);
    w = ref_of(base, ref, "blk.lokr.weight");
    for (int a = 0; a < 2; a++)
        for (int c = 0; c < 3; c++)
            for (int b = 0; b < 4; b++)
                for (int e = 0; e < 2; e++)
                    w[(a * 4 + b) * 6 + c * 2 + e] += k1->v[a * 3 + c] * k2a->v[b] * k2b->v[e];
    ref_dora(w, 8, 6, 1, ds->v, 0, mult, eps);
}

static void lyco_norms(tset *ad, tset *base, double **ref, double mult)
{
    /* norms: W += mult * w_norm, b += mult * b_norm, in float32 */
    tt *wn = tadd_r(ad, "F32", K "norm.w_norm", -0.1, 0.1, 1, U64(10));
    tt *bn = tadd_r(ad, "F32", K "norm.b_norm", -0.1, 0.1, 1, U64(10));
    tt *gn = tadd_r(ad, "F32", K "gn.w_norm", -0.1, 0.1, 1, U64(4));
    double *nw = ref_of(base, ref, "blk.norm.weight"), *nb = ref_of(base, ref, "blk.norm.bias"),
           *gw = ref_of(base, ref, "blk.gn.weight");
    for (int i = 0; i < 10; i++) {
        nw[i] = (float)(nw[i] + mult * wn->v[i]);
        nb[i] = (float)(nb[i] + mult * bn->v[i]);
    }
    for (int i = 0; i < 4; i++)
        gw[i] = (float)(gw[i] + mult * gn->v[i]);
}

static void lyco_file(int kind, tset *ad, tset *base, double **ref, double mult, double eps)
{
    if (kind == 0)
        lyco_lora(ad, base, ref, mult, eps);
    else if (kind == 1)
        lyco_loha(ad, base, ref, mult, eps);
    else
        lyco_lokr(ad, base, ref, mult, eps);
    if (kind < 2)
        lyco_norms(ad, base, ref, mult);
}

/* the merge of each file against LyCORIS's rule, for F32 and BF16 bases and multipliers 1 and 0.5
 * (the delta unweighted, the factor mixed) */
Test(lycoris, dora_both_axes_loha_lokr_norms)
{
    const char *dts[2] = {"F32", "BF16"};
    const double mults[2] = {1.0, 0.5};
    for (int kind = 0; kind < 3; kind++)
    for (int di = 0; di < 2; di++)
        for (int mi = 0; mi < 2; mi++) {
            char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *ap = pjoin(dir, "lyco.safetensors"),
                 *out = pjoin(dir, "out.safetensors");
            tset base = {0}, ad = {0}, ad2 = {0};
            lyco_base(&base, dts[di]);
            twrite(bp, &base);
            double **ref = refs_of(&base), **peft = refs_of(&base);
            uint64_t seed = g_seed;
            lyco_file(kind, &ad, &base, ref, mults[mi], EPS);
            twrite(ap, &ad);
            g_seed = seed; /* the same file again: the reference without the epsilon */
            lyco_file(kind, &ad2, &base, peft, mults[mi], 0.0);
            mres r = merge_w(bp, ap, out, mults[mi]);
            cr_assert_eq(r.rc, LM_OK, "merge failed: %s", r.line);
            cr_assert(has_note(&r, "LyCORIS DoRA"), "the DoRA modules are noted");
            check_output(out, &base, ref);
            /* the test can tell the epsilon: without it the tiny rows differ by far more than a ulp */
            double *with = ref_of(&base, ref, "blk.tiny.weight"), *without = ref_of(&base, peft, "blk.tiny.weight");
            cr_assert(kind > 0 || fabs(with[0] - without[0]) > 0.1 * fabs(with[0]), "eps must matter for the tiny rows");
            lm_merge_report_free(r.rep);
            refs_free(&base, ref);
            refs_free(&base, peft);
            tfree(&base);
            tfree(&ad);
            tfree(&ad2);
            th_rmrf(dir);
            free(dir);
            free(bp);
            free(ap);
            free(out);
        }
}

/* R[p, q, x] = sum_{a,b} t[a, b, x] wa[a, p] wb[b, q] (LyCORIS's rebuild_tucker; x: kernel position) */
static void tucker(double *R, const double *t, const double *wa, const double *wb, int r, int P, int Q, int kk)
{
    for (int p = 0; p < P; p++)
        for (int q = 0; q < Q; q++)
            for (int x = 0; x < kk; x++) {
                double acc = 0;
                for (int a = 0; a < r; a++)
                    for (int b = 0; b < r; b++)
                        acc += t[(a * r + b) * kk + x] * wa[a * P + p] * wb[b * Q + q];
                R[(p * Q + q) * kk + x] = acc;
            }
}

/* LyCORIS's convolution forms with DoRA: LoHa CP (hada_t1/t2) and flat, LoKr CP (lokr_t2) and
 * with a whole 4-D lokr_w2 (scale 1), on 3x3 kernels */
static void conv_loha(tset *ad, tset *base, double **ref, double mult)
{
    /* blk.conv [6, 4, 3, 3], CP r 2, alpha 2: scale 1; DoRA per input channel */
    tt *a1 = tadd(ad, "F32", K "conv.hada_w1_a", 2, U64(2), U64(6)), *b1 = tadd(ad, "F32", K "conv.hada_w1_b", 2, U64(2), U64(4));
    tt *t1 = tadd(ad, "F32", K "conv.hada_t1", 4, U64(2), U64(2), U64(3), U64(3));
    tt *a2 = tadd(ad, "F32", K "conv.hada_w2_a", 2, U64(2), U64(6)), *b2 = tadd(ad, "F32", K "conv.hada_w2_b", 2, U64(2), U64(4));
    tt *t2 = tadd(ad, "F32", K "conv.hada_t2", 4, U64(2), U64(2), U64(3), U64(3));
    tadd(ad, "F32", K "conv.alpha", 0, 0)->v[0] = 2.0;
    tt *ds = dora_scale(ad, "conv", 4, 1, 4);
    double R1[216], R2[216], *w = ref_of(base, ref, "blk.conv.weight");
    tucker(R1, t1->v, a1->v, b1->v, 2, 6, 4, 9);
    tucker(R2, t2->v, a2->v, b2->v, 2, 6, 4, 9);
    for (int i = 0; i < 216; i++)
        w[i] += R1[i] * R2[i];
    ref_dora(w, 6, 4, 9, ds->v, 1, mult, EPS);
    /* blk.conv2 [5, 4, 3, 3], flat: w_a [5, 2] @ w_b [2, 36], alpha 1: scale 0.5; DoRA per output */
    tt *f1a = tadd(ad, "F32", K "conv2.hada_w1_a", 2, U64(5), U64(2)), *f1b = tadd(ad, "F32", K "conv2.hada_w1_b", 2, U64(2), U64(36));
    tt *f2a = tadd(ad, "F32", K "conv2.hada_w2_a", 2, U64(5), U64(2)), *f2b = tadd(ad, "F32", K "conv2.hada_w2_b", 2, U64(2), U64(36));
    tadd(ad, "F32", K "conv2.alpha", 0, 0)->v[0] = 1.0;
    ds = dora_scale(ad, "conv2", 4, 5, 1);
    w = ref_of(base, ref, "blk.conv2.weight");
    for (int o = 0; o < 5; o++)
        for (int c = 0; c < 36; c++) {
            double x = 0, y = 0;
            for (int q = 0; q < 2; q++) {
                x += f1a->v[o * 2 + q] * f1b->v[q * 36 + c];
                y += f2a->v[o * 2 + q] * f2b->v[q * 36 + c];
            }
            w[o * 36 + c] += 0.5 * x * y;
        }
    ref_dora(w, 5, 4, 9, ds->v, 0, mult, EPS);
}

static void conv_lokr(tset *ad, tset *base, double **ref, double mult)
{
    /* blk.conv [6, 4, 3, 3] = kron(w1 [2, 2], w2 [3, 2, 3, 3]), w2 from lokr_t2 [2, 2, 3, 3],
     * w2_a [2, 3], w2_b [2, 2]: r 2, alpha 1: scale 0.5; DoRA per output */
    tt *w1 = tadd(ad, "F32", K "conv.lokr_w1", 2, U64(2), U64(2));
    tt *t2 = tadd(ad, "F32", K "conv.lokr_t2", 4, U64(2), U64(2), U64(3), U64(3));
    tt *wa = tadd(ad, "F32", K "conv.lokr_w2_a", 2, U64(2), U64(3)), *wb = tadd(ad, "F32", K "conv.lokr_w2_b", 2, U64(2), U64(2));
    tadd(ad, "F32", K "conv.alpha", 0, 0)->v[0] = 1.0;
    tt *ds = dora_scale(ad, "conv", 4, 6, 1);
    double W2[54], *w = ref_of(base, ref, "blk.conv.weight");
    tucker(W2, t2->v, wa->v, wb->v, 2, 3, 2, 9);
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 2; c++)
                for (int d = 0; d < 2; d++)
                    for (int x = 0; x < 9; x++)
                        w[((a * 3 + b) * 4 + c * 2 + d) * 9 + x] += 0.5 * w1->v[a * 2 + c] * W2[(b * 2 + d) * 9 + x];
    ref_dora(w, 6, 4, 9, ds->v, 0, mult, EPS);
    /* blk.conv2 [5, 4, 3, 3] = kron(w1 [1, 2], w2 [5, 2, 3, 3]), both whole: scale 1 whatever alpha
     * says; DoRA per input channel */
    tt *v1 = tadd(ad, "F32", K "conv2.lokr_w1", 2, U64(1), U64(2));
    tt *v2 = tadd(ad, "F32", K "conv2.lokr_w2", 4, U64(5), U64(2), U64(3), U64(3));
    tadd(ad, "F32", K "conv2.alpha", 0, 0)->v[0] = 3.0;
    ds = dora_scale(ad, "conv2", 4, 1, 4);
    w = ref_of(base, ref, "blk.conv2.weight");
    for (int b = 0; b < 5; b++)
        for (int c = 0; c < 2; c++)
            for (int d = 0; d < 2; d++)
                for (int x = 0; x < 9; x++)
                    w[(b * 4 + c * 2 + d) * 9 + x] += v1->v[c] * v2->v[(b * 2 + d) * 9 + x];
    ref_dora(w, 5, 4, 9, ds->v, 1, mult, EPS);
}

Test(lycoris, conv_forms_with_dora)
{
    const char *dts[2] = {"F32", "BF16"};
    const double mults[2] = {1.0, 0.7};
    for (int kind = 0; kind < 2; kind++)
        for (int di = 0; di < 2; di++) {
            char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *ap = pjoin(dir, "lyco.safetensors"),
                 *out = pjoin(dir, "out.safetensors");
            tset base = {0}, ad = {0};
            lyco_base(&base, dts[di]);
            twrite(bp, &base);
            double **ref = refs_of(&base);
            if (kind == 0)
                conv_loha(&ad, &base, ref, mults[di]);
            else
                conv_lokr(&ad, &base, ref, mults[di]);
            twrite(ap, &ad);
            mres r = merge_w(bp, ap, out, mults[di]);
            cr_assert_eq(r.rc, LM_OK, "merge failed (%s): %s", kind ? "LoKr" : "LoHa", r.line);
            check_output(out, &base, ref);
            lm_merge_report_free(r.rep);
            refs_free(&base, ref);
            tfree(&base);
            tfree(&ad);
            th_rmrf(dir);
            free(dir);
            free(bp);
            free(ap);
            free(out);
        }
}

/* Conv1d kernels [6, 4, 3]: LyCORIS writes 3-D Tucker cores (lora_mid, hada_t1/t2, lokr_t2
 * [r, r, k]) and a 3-D whole lokr_w2 [b, d, k] whose kron with w1 [a, c] (unsqueezed at the end)
 * is w1[a, c] * w2[b, d, x] at [a*b + b, c*d + d, x] */
Test(lycoris, conv1d_forms)
{
    for (int kind = 0; kind < 4; kind++) {
        char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *ap = pjoin(dir, "lyco.safetensors"),
             *out = pjoin(dir, "out.safetensors");
        tset base = {0}, ad = {0};
        tadd(&base, "F32", "blk.c1.weight", 3, U64(6), U64(4), U64(3));
        tadd(&base, "F32", "blk.c1.bias", 1, U64(6));
        twrite(bp, &base);
        double **ref = refs_of(&base), *w = ref[0], R1[72], R2[72];
        if (kind == 0) { /* LoCon Tucker, r 2, alpha 2: scale 1; DoRA per input channel */
            tt *d = tadd(&ad, "F32", K "c1.lora_down.weight", 3, U64(2), U64(4), U64(1));
            tt *m = tadd(&ad, "F32", K "c1.lora_mid.weight", 3, U64(2), U64(2), U64(3));
            tt *u = tadd(&ad, "F32", K "c1.lora_up.weight", 3, U64(6), U64(2), U64(1));
            tadd(&ad, "F32", K "c1.alpha", 0, 0)->v[0] = 2.0;
            tt *ds = tadd_r(&ad, "F32", K "c1.dora_scale", 0.5, 1.0, 3, U64(1), U64(4), U64(1));
            for (int p = 0; p < 6; p++)
                for (int c = 0; c < 4; c++)
                    for (int x = 0; x < 3; x++)
                        for (int i = 0; i < 2; i++)
                            for (int j = 0; j < 2; j++)
                                w[(p * 4 + c) * 3 + x] += u->v[p * 2 + i] * m->v[(i * 2 + j) * 3 + x] * d->v[j * 4 + c];
            ref_dora(w, 6, 4, 3, ds->v, 1, 1.0, EPS);
        } else if (kind == 1) { /* LoHa CP, r 2, alpha 2: scale 1; DoRA per output */
            tt *a1 = tadd(&ad, "F32", K "c1.hada_w1_a", 2, U64(2), U64(6)), *b1 = tadd(&ad, "F32", K "c1.hada_w1_b", 2, U64(2), U64(4));
            tt *t1 = tadd(&ad, "F32", K "c1.hada_t1", 3, U64(2), U64(2), U64(3));
            tt *a2 = tadd(&ad, "F32", K "c1.hada_w2_a", 2, U64(2), U64(6)), *b2 = tadd(&ad, "F32", K "c1.hada_w2_b", 2, U64(2), U64(4));
            tt *t2 = tadd(&ad, "F32", K "c1.hada_t2", 3, U64(2), U64(2), U64(3));
            tadd(&ad, "F32", K "c1.alpha", 0, 0)->v[0] = 2.0;
            tt *ds = tadd_r(&ad, "F32", K "c1.dora_scale", 0.5, 1.0, 3, U64(6), U64(1), U64(1));
            tucker(R1, t1->v, a1->v, b1->v, 2, 6, 4, 3);
            tucker(R2, t2->v, a2->v, b2->v, 2, 6, 4, 3);
            for (int i = 0; i < 72; i++)
                w[i] += R1[i] * R2[i];
            ref_dora(w, 6, 4, 3, ds->v, 0, 1.0, EPS);
        } else { /* LoKr: kron(w1 [2, 2], w2 [3, 2, 3]), w2 from lokr_t2 (r 2, alpha 2: scale 1) or whole
                    (scale 1 whatever alpha says) */
            tt *w1 = tadd(&ad, "F32", K "c1.lokr_w1", 2, U64(2), U64(2));
            if (kind == 2) {
                tt *t2 = tadd(&ad, "F32", K "c1.lokr_t2", 3, U64(2), U64(2), U64(3));
                tt *wa = tadd(&ad, "F32", K "c1.lokr_w2_a", 2, U64(2), U64(3));
                tt *wb = tadd(&ad, "F32", K "c1.lokr_w2_b", 2, U64(2), U64(2));
                tucker(R2, t2->v, wa->v, wb->v, 2, 3, 2, 3);
            } else {
                tt *w2 = tadd(&ad, "F32", K "c1.lokr_w2", 3, U64(3), U64(2), U64(3));
                memcpy(R2, w2->v, 18 * sizeof *R2);
            }
            tadd(&ad, "F32", K "c1.alpha", 0, 0)->v[0] = kind == 2 ? 2.0 : 5.0;
            for (int a = 0; a < 2; a++)
                for (int b = 0; b < 3; b++)
                    for (int c = 0; c < 2; c++)
                        for (int d = 0; d < 2; d++)
                            for (int x = 0; x < 3; x++)
                                w[((a * 3 + b) * 4 + c * 2 + d) * 3 + x] += w1->v[a * 2 + c] * R2[(b * 2 + d) * 3 + x];
        }
        twrite(ap, &ad);
        if (kind == 3) { /* no PEFT adapter says it: convert refuses */
            char *od = pjoin(dir, "peft");
            lm_err e;
            lm_err_clear(&e);
            cr_assert_neq(lm_adapter_convert(ap, od, bp, NULL, NULL, &e), LM_OK);
            cr_assert(strstr(e.msg, "Conv1d") != NULL, "%s", e.msg);
            cr_assert(!th_exists(od));
            free(od);
        }
        mres r = merge_w(bp, ap, out, 1.0);
        cr_assert_eq(r.rc, LM_OK, "merge failed (form %d): %s", kind, r.line);
        check_output(out, &base, ref);
        lm_merge_report_free(r.rep);
        refs_free(&base, ref);
        tfree(&base);
        tfree(&ad);
        th_rmrf(dir);
        free(dir);
        free(bp);
        free(ap);
        free(out);
    }
}

/* the same bytes for any thread count, tile size and kernel variant (the input-channel norms of
 * the column pass are summed in a fixed order) */
Test(lycoris, deterministic)
{
    for (int kind = 0; kind < 2; kind++) {
        char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *ap = pjoin(dir, "lyco.safetensors"),
             *o1 = pjoin(dir, "o1.safetensors"), *o2 = pjoin(dir, "o2.safetensors"), *o3 = pjoin(dir, "o3.safetensors");
        tset base = {0}, ad = {0};
        lyco_base(&base, "BF16");
        twrite(bp, &base);
        double **ref = refs_of(&base);
        lyco_file(kind, &ad, &base, ref, 0.5, EPS);
        twrite(ap, &ad);
        mres r1 = merge_opts(bp, ap, o1, 0.5, 1, 0, NULL), r2 = merge_opts(bp, ap, o2, 0.5, 3, 16, NULL),
             r3 = merge_opts(bp, ap, o3, 0.5, 2, 40, "ref");
        cr_assert(r1.rc == LM_OK && r2.rc == LM_OK && r3.rc == LM_OK, "%s / %s / %s", r1.line, r2.line, r3.line);
        cr_assert(th_files_equal(o1, o2) && th_files_equal(o1, o3), "thread count, tile size or kernels changed bytes");
        lm_merge_report_free(r1.rep);
        lm_merge_report_free(r2.rep);
        lm_merge_report_free(r3.rep);
        refs_free(&base, ref);
        tfree(&base);
        tfree(&ad);
        th_rmrf(dir);
        free(dir);
        free(bp);
        free(ap);
        free(o1);
        free(o2);
        free(o3);
    }
}

/* a file of norm modules only merges too (no LoRA module, so no target_modules) */
Test(lycoris, norm_only_file)
{
    char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *ap = pjoin(dir, "norm.safetensors"),
         *out = pjoin(dir, "out.safetensors");
    tset base = {0}, ad = {0};
    lyco_base(&base, "BF16");
    twrite(bp, &base);
    double **ref = refs_of(&base);
    tt *wn = tadd(&ad, "BF16", K "norm.w_norm", 1, U64(10));
    tt *bn = tadd(&ad, "F16", K "norm.b_norm", 1, U64(10));
    double *nw = ref_of(&base, ref, "blk.norm.weight"), *nb = ref_of(&base, ref, "blk.norm.bias");
    for (int i = 0; i < 10; i++) {
        nw[i] = (float)(nw[i] + wn->v[i]);
        nb[i] = (float)(nb[i] + bn->v[i]);
    }
    twrite(ap, &ad);
    mres r = merge_w(bp, ap, out, 1.0);
    cr_assert_eq(r.rc, LM_OK, "merge failed: %s", r.line);
    check_output(out, &base, ref);
    lm_merge_report_free(r.rep);
    refs_free(&base, ref);
    tfree(&base);
    tfree(&ad);
    th_rmrf(dir);
    free(dir);
    free(bp);
    free(ap);
    free(out);
}

/* one bad module in a small file: refused with kind and message, no output */
typedef struct {
    const char *key;
    int n_dims;
    uint64_t shape[4];
} part_spec;

static void refused(const part_spec *p, size_t n, const char *kind, const char *needle)
{
    char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *ap = pjoin(dir, "bad.safetensors"),
         *out = pjoin(dir, "out.safetensors");
    tset base = {0}, ad = {0};
    lyco_base(&base, "F32");
    twrite(bp, &base);
    for (size_t i = 0; i < n; i++) {
        const uint64_t *s = p[i].shape;
        tt *t = p[i].n_dims == 0 ? tadd(&ad, "F32", p[i].key, 0, 0)
              : p[i].n_dims == 1 ? tadd(&ad, "F32", p[i].key, 1, s[0])
              : p[i].n_dims == 2 ? tadd(&ad, "F32", p[i].key, 2, s[0], s[1])
                                 : tadd(&ad, "F32", p[i].key, 4, s[0], s[1], s[2], s[3]);
        (void)t;
    }
    twrite(ap, &ad);
    mres r = merge_w(bp, ap, out, 1.0);
    expect_refused(&r, out, kind, needle);
    tfree(&base);
    tfree(&ad);
    th_rmrf(dir);
    free(dir);
    free(bp);
    free(ap);
    free(out);
}

#define LIN_PAIR {K "lin.lora_down.weight", 2, {2, 10}}, {K "lin.lora_up.weight", 2, {6, 2}}

Test(lycoris, malformed_refused)
{
    /* dora_scale that fits neither axis of blk.lin [6, 10] */
    part_spec wrong[] = {LIN_PAIR, {K "lin.dora_scale", 2, {1, 6}}};
    refused(wrong, 3, "ShapeMismatch", "dora_scale [1, 6] does not fit base 'blk.lin.weight' [6, 10]");
    part_spec flat[] = {LIN_PAIR, {K "lin.dora_scale", 1, {6}}};
    refused(flat, 3, "ShapeMismatch", "dora_scale [6]");
    part_spec conv[] = {{K "conv.lora_down.weight", 4, {2, 4, 3, 3}}, {K "conv.lora_up.weight", 4, {6, 2, 1, 1}},
                        {K "conv.dora_scale", 4, {1, 4, 3, 3}}};
    refused(conv, 3, "ShapeMismatch", "[1, 4, 1, ...]");
    /* dora_scale without factors, or on a module LyCORIS never decomposes */
    part_spec alone[] = {{K "lin.dora_scale", 2, {6, 1}}};
    refused(alone, 1, "IncompleteModule", "dora_scale");
    part_spec diff[] = {{K "lin.diff", 2, {6, 10}}, {K "lin.dora_scale", 2, {6, 1}}};
    refused(diff, 2, "MixedTypes", "full (diff)");
    /* norm deltas on a tensor that is no norm, of the wrong size, without w_norm, without a bias */
    part_spec lin_norm[] = {{K "lin.w_norm", 1, {6}}};
    refused(lin_norm, 1, "ShapeMismatch", "LayerNorm");
    part_spec size[] = {{K "norm.w_norm", 1, {9}}};
    refused(size, 1, "ShapeMismatch", "w_norm F32 [9] does not fit base 'blk.norm.weight'");
    part_spec b_only[] = {{K "norm.b_norm", 1, {10}}};
    refused(b_only, 1, "IncompleteModule", "b_norm without w_norm");
    part_spec no_bias[] = {{K "gn.w_norm", 1, {4}}, {K "gn.b_norm", 1, {4}}};
    refused(no_bias, 2, "NoMatchingTensor", "no bias");
    part_spec mixed[] = {{K "norm.w_norm", 1, {10}}, {K "norm.lora_down.weight", 2, {2, 10}}};
    refused(mixed, 2, "MixedTypes", "several methods");
}

/* `convert` cannot write either form as a PEFT adapter: refused, naming the module and why,
 * nothing written */
Test(lycoris, convert_refused)
{
    for (int kind = 0; kind < 3; kind++) {
        char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *ap = pjoin(dir, "lyco.safetensors"),
             *od = pjoin(dir, "peft");
        tset base = {0}, ad = {0};
        lyco_base(&base, "F32");
        twrite(bp, &base);
        tt *d, *u;
        lora_module(&ad, "lin", 6, 10, 1, 2, 2.0, &d, &u);
        if (kind < 2)
            dora_scale(&ad, "lin", 2, kind ? 1 : 6, kind ? 10 : 1);
        else
            tadd(&ad, "F32", K "norm.w_norm", 1, U64(10));
        twrite(ap, &ad);
        lm_err e;
        lm_err_clear(&e);
        char *notes = NULL, line[1024];
        lm_code rc = lm_adapter_convert(ap, od, bp, NULL, &notes, &e);
        lm_err_format(&e, line, sizeof line);
        cr_assert_neq(rc, LM_OK, "convert must refuse (%d)", kind);
        cr_assert_str_eq(e.kind, "Unsupported", "%s", line);
        const char *why = kind == 0 ? "plus 2^-23" : kind == 1 ? "per input channel" : "norm tuning";
        cr_assert(strstr(line, why) && strstr(line, "PEFT"), "'%s' not in: %s", why, line);
        cr_assert(!th_exists(od), "no output directory");
        char *text = NULL; /* inspect says so too, instead of a config */
        cr_assert_eq(lm_adapter_format_describe(ap, bp, NULL, &text, &e), LM_OK);
        cr_assert(strstr(text, "as a PEFT adapter: none") && strstr(text, why) && !strstr(text, "peft_type"), "%s", text);
        free(text);
        free(notes);
        tfree(&base);
        tfree(&ad);
        th_rmrf(dir);
        free(dir);
        free(bp);
        free(ap);
        free(od);
    }
}

/* lora-merge's own part names in a PEFT directory: refused (only a LyCORIS file has them) */
Test(lycoris, peft_dir_with_internal_part_refused)
{
    char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *ad_dir = pjoin(dir, "adapter"),
         *out = pjoin(dir, "out.safetensors");
    tset base = {0}, ad = {0};
    lyco_base(&base, "F32");
    twrite(bp, &base);
    cr_assert_eq(mkdir(ad_dir, 0777), 0);
    tadd(&ad, "F32", "base_model.model.blk.lin.lora_A.weight", 2, U64(2), U64(10));
    tadd(&ad, "F32", "base_model.model.blk.lin.lora_B.weight", 2, U64(6), U64(2));
    tadd(&ad, "F32", "base_model.model.blk.lin.lycoris_dora_scale", 2, U64(6), U64(1));
    char *wp = pjoin(ad_dir, "adapter_model.safetensors");
    twrite(wp, &ad);
    cr_assert_eq(th_write_text(ad_dir, "adapter_config.json",
                               "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 2, \"target_modules\": [\"lin\"]}"),
                 0);
    mres r = merge_w(bp, ad_dir, out, 1.0);
    expect_refused(&r, out, "ForeignPart", "LyCORIS file");
    tfree(&base);
    tfree(&ad);
    th_rmrf(dir);
    free(dir);
    free(bp);
    free(ad_dir);
    free(out);
    free(wp);
}
