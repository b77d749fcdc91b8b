/* SPDX-License-Identifier: MIT */
/* test_methods.c : every adapter type that merges today, on generated models with odd shapes, in
 * every base dtype, checked against a double-precision reference written here from
 * ../shared/docs/peft-merge.md and PEFT's tuners/<type>/layer.py (not from src/).  No ../shared
 * needed: this is what covers each type on a user's clone.
 *
 * ONE table drives it (mt_rows[], near the end): a row per PEFT type with its variants (config JSON
 * + a generator of base and adapter tensors), its reference (a per-module delta for the additive
 * types, else a transform of the weights), and one malformed adapter.  For every type:
 *   methods/<TYPE>      variant 0 in BF16, F16 and F32 bases (adapter F32, BF16, F32; --scale -0.75
 *                       on the F32 run of additive types; that run again with the hidden
 *                       --tile-elems 100, tiles of one or two rows), the other variants once each
 *                       (dtype cycling); every output tensor: changed ones by the golden rule
 *                       (th_compare), the others bit for bit; then the malformed adapter, with and
 *                       without --dry-run: exit 1, one `error:` line naming the module, no output
 *                       file, inputs unchanged;
 *   methods_det/<TYPE>  the same merge byte-identical with --threads 1, --threads 2 and --kernels
 *                       ref (small tiles, so that the threads share each tensor).
 * LM_METHODS_REPORT=1: each type prints how many changed elements are exactly rounded (equal to
 * th_round_to(reference)) per base dtype.  LM_METHODS_KEEP=1 keeps the generated files.
 * Only the public interface is used: the lora-merge binary through th_run. */
#include "th.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#define MT_MAX 40
#define MT_MODS 8

/* a tensor of the base or the adapter, values as stored (already rounded to its dtype) */
typedef struct {
    char name[200];
    char dtype[8];
    int nd;
    uint64_t shape[5];
    uint64_t n;
    double *v;
} mt_t;

/* how a module's weight is stored: Linear [O, I]; GPT-2 Conv1D [I, O]; Embedding [V, D] (logical
 * out = D, in = V: every type's delta for it is transposed like Conv1D's); conv [o, i, k, k]
 * (logical in = i*k*k) */
enum { LIN, C1D, EMB, CONV };

typedef struct {
    char path[128];  /* module path: base weight "<path>.weight", adapter "base_model.model.<path>.<part>" */
    int kind;
    uint64_t O, I;   /* logical [out, in] */
    int w, b;        /* index of the base weight / bias in ctx.base, -1 if none */
    double s;        /* the scale the reference applies (alpha / r ... as the config gives it) */
    int r, q[3];     /* per type: rank or block size, flags, variant numbers */
    double p;        /* per type: eps, scaling */
} mt_mod;

typedef struct {
    const char *bdt, *adt; /* base and adapter float dtypes */
    uint64_t rng;
    mt_t base[MT_MAX];
    int nb;
    mt_t ad[MT_MAX];
    int na;
    mt_mod mod[MT_MODS];
    int nm;
    double *ref[MT_MAX]; /* expected values of base[k] (NULL: must be unchanged) */
    const char *cfg;
    const char *base_config; /* config.json beside the base (NULL: none) */
    char *dir;
} mt_ctx;

typedef struct {
    const char *label;
    const char *cfg; /* adapter_config.json */
    void (*gen)(mt_ctx *c);
} mt_variant;

typedef struct {
    const char *type;
    int additive;              /* --scale S multiplies the change (else it is not passed) */
    void (*ref)(mt_ctx *c);    /* fills ctx.ref from ctx.base, ctx.ad and ctx.mod, or: */
    double *(*delta)(const mt_ctx *c, const mt_mod *m); /* W += s * delta for every module */
    mt_variant v[5];           /* v[0] runs in every base dtype */
    mt_variant bad;            /* a malformed adapter (cfg NULL: v[0]'s) ... */
    const char *bad_names;     /* ... refused naming this module */
} mt_row;

#define SH(...) (int)(sizeof((uint64_t[]){__VA_ARGS__}) / sizeof(uint64_t)), (const uint64_t[]){__VA_ARGS__}

/* ---- building a case ---------------------------------------------------------------------------- */
static int mt_is_int(const char *dt) { return dt[0] == 'I' || dt[0] == 'U'; }

static mt_t *mt_push(mt_t *arr, int *n, const char *name, const char *dtype, int nd, const uint64_t *sh)
{
    cr_assert_lt(*n, MT_MAX, "too many tensors");
    mt_t *t = &arr[(*n)++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
    t->nd = nd;
    t->n = 1;
    for (int d = 0; d < nd; d++) {
        t->shape[d] = sh[d];
        t->n *= sh[d];
    }
    t->v = calloc(t->n ? t->n : 1, sizeof(double));
    return t;
}

static void mt_set(mt_t *t, uint64_t k, double x) { t->v[k] = mt_is_int(t->dtype) ? x : th_round_to(x, t->dtype); }

/* mean + sd * N(0, 1), rounded to the tensor's dtype */
static void mt_fill(mt_ctx *c, mt_t *t, double mean, double sd)
{
    for (uint64_t k = 0; k < t->n; k++)
        mt_set(t, k, mean + sd * th_rand_normal(&c->rng));
}

static mt_t *mt_base(mt_ctx *c, const char *name, int nd, const uint64_t *sh, double mean, double sd)
{
    mt_t *t = mt_push(c->base, &c->nb, name, c->bdt, nd, sh);
    mt_fill(c, t, mean, sd);
    return t;
}

/* an adapter tensor under its full key, in dtype dt (NULL: the adapter dtype) */
static mt_t *mt_key(mt_ctx *c, const char *key, const char *dt, int nd, const uint64_t *sh, double mean, double sd)
{
    mt_t *t = mt_push(c->ad, &c->na, key, dt ? dt : c->adt, nd, sh);
    mt_fill(c, t, mean, sd);
    return t;
}

/* the adapter tensor base_model.model.<module path>.<part> */
static mt_t *mt_part(mt_ctx *c, const mt_mod *m, const char *part, int nd, const uint64_t *sh, double mean, double sd)
{
    char key[300];
    snprintf(key, sizeof key, "base_model.model.%s.%s", m->path, part);
    return mt_key(c, key, NULL, nd, sh, mean, sd);
}

/* a module: its base weight (N(0, 0.05)) and optionally a bias */
static mt_mod *mt_module(mt_ctx *c, const char *path, int kind, uint64_t O, uint64_t I, int bias)
{
    cr_assert_lt(c->nm, MT_MODS);
    mt_mod *m = &c->mod[c->nm++];
    memset(m, 0, sizeof *m);
    snprintf(m->path, sizeof m->path, "%s", path);
    m->kind = kind;
    m->O = O;
    m->I = I;
    m->s = 1;
    char name[200];
    snprintf(name, sizeof name, "%s.weight", path);
    if (kind == LIN)
        mt_base(c, name, SH(O, I), 0, 0.05);
    else
        mt_base(c, name, SH(I, O), 0, 0.05);
    m->w = c->nb - 1;
    m->b = -1;
    if (bias) {
        snprintf(name, sizeof name, "%s.bias", path);
        mt_base(c, name, SH(O), 0, 0.05);
        m->b = c->nb - 1;
    }
    return m;
}

static mt_mod *mt_conv(mt_ctx *c, const char *path, uint64_t o, uint64_t i, uint64_t k)
{
    mt_mod *m = mt_module(c, path, LIN, o, i * k * k, 0);
    mt_t *w = &c->base[m->w];
    w->nd = 4;
    w->shape[0] = o;
    w->shape[1] = i;
    w->shape[2] = w->shape[3] = k;
    m->kind = CONV;
    return m;
}

static const mt_t *mt_find(const mt_ctx *c, const char *key)
{
    for (int k = 0; k < c->na; k++)
        if (strcmp(c->ad[k].name, key) == 0)
            return &c->ad[k];
    return NULL;
}

static const mt_t *mt_opt(const mt_ctx *c, const mt_mod *m, const char *part)
{
    char key[300];
    snprintf(key, sizeof key, "base_model.model.%s.%s", m->path, part);
    return mt_find(c, key);
}

static const double *mt_get(const mt_ctx *c, const mt_mod *m, const char *part)
{
    const mt_t *t = mt_opt(c, m, part);
    cr_assert_not_null(t, "reference: no %s for %s", part, m->path);
    return t->v;
}

/* ---- the reference's view of a weight: logical [O, I], whatever the storage ------------------- */
static uint64_t mt_at(const mt_mod *m, uint64_t o, uint64_t i)
{
    return (m->kind == C1D || m->kind == EMB) ? i * m->O + o : o * m->I + i;
}

static double *mt_ref_of(mt_ctx *c, int bi)
{
    if (c->ref[bi] == NULL) {
        c->ref[bi] = malloc(c->base[bi].n * sizeof(double));
        memcpy(c->ref[bi], c->base[bi].v, c->base[bi].n * sizeof(double));
    }
    return c->ref[bi];
}

static double *mt_W(const mt_ctx *c, const mt_mod *m)
{
    double *w = malloc(m->O * m->I * sizeof(double));
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            w[o * m->I + i] = c->base[m->w].v[mt_at(m, o, i)];
    return w;
}

static void mt_setW(mt_ctx *c, const mt_mod *m, const double *w)
{
    double *r = mt_ref_of(c, m->w);
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            r[mt_at(m, o, i)] = w[o * m->I + i];
}

/* W += s * D (D logical [O, I]) */
static void mt_addW(mt_ctx *c, const mt_mod *m, const double *d, double s)
{
    double *r = mt_ref_of(c, m->w);
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            r[mt_at(m, o, i)] += s * d[o * m->I + i];
}

/* every module: W += s * delta(module), the delta logical [O, I] (malloc'd), s the module's scale
 * (the additive types' reference is their delta) */
static void mt_add_deltas(mt_ctx *c, double *(*delta)(const mt_ctx *c, const mt_mod *m))
{
    for (int k = 0; k < c->nm; k++) {
        double *d = delta(c, &c->mod[k]);
        mt_addW(c, &c->mod[k], d, c->mod[k].s);
        free(d);
    }
}

/* X [p, q] @ Y [q, r] */
static double *mt_mm(const double *x, const double *y, uint64_t p, uint64_t q, uint64_t r)
{
    uint64_t n = p * r;
    double *z = calloc(n > 0 ? n : 1, sizeof(double));
    for (uint64_t a = 0; a < p; a++)
        for (uint64_t k = 0; k < q; k++)
            for (uint64_t b = 0; b < r; b++)
                z[a * r + b] += x[a * q + k] * y[k * r + b];
    return z;
}

/* in-place inverse of a small n x n matrix (Gauss-Jordan, partial pivoting) */
static void mt_inverse(double *a, int n)
{
    double *inv = calloc((size_t)(n * n), sizeof(double));
    for (int k = 0; k < n; k++)
        inv[k * n + k] = 1;
    for (int col = 0; col < n; col++) {
        int piv = col;
        for (int r = col + 1; r < n; r++)
            if (fabs(a[r * n + col]) > fabs(a[piv * n + col]))
                piv = r;
        for (int k = 0; k < n; k++) {
            double t = a[col * n + k];
            a[col * n + k] = a[piv * n + k];
            a[piv * n + k] = t;
            t = inv[col * n + k];
            inv[col * n + k] = inv[piv * n + k];
            inv[piv * n + k] = t;
        }
        double d = a[col * n + col];
        cr_assert(fabs(d) > 1e-12, "singular matrix in the reference");
        for (int k = 0; k < n; k++) {
            a[col * n + k] /= d;
            inv[col * n + k] /= d;
        }
        for (int r = 0; r < n; r++) {
            if (r == col)
                continue;
            double f = a[r * n + col];
            for (int k = 0; k < n; k++) {
                a[r * n + k] -= f * a[col * n + k];
                inv[r * n + k] -= f * inv[col * n + k];
            }
        }
    }
    memcpy(a, inv, (size_t)(n * n) * sizeof(double));
    free(inv);
}

/* (I - S)(I + S)^-1 for an n x n matrix S (the exact Cayley transform of OFT and BOFT) */
static double *mt_cayley(const double *s, int n)
{
    double *ip = malloc((size_t)(n * n) * sizeof(double)), *im = malloc((size_t)(n * n) * sizeof(double));
    for (int a = 0; a < n; a++)
        for (int b = 0; b < n; b++) {
            ip[a * n + b] = (a == b) + s[a * n + b];
            im[a * n + b] = (a == b) - s[a * n + b];
        }
    mt_inverse(ip, n);
    double *r = mt_mm(im, ip, (uint64_t)n, (uint64_t)n, (uint64_t)n);
    free(ip);
    free(im);
    return r;
}

/* W[o, j*bs + a] <- sum_b W[o, j*bs + b] * R_j[a, b]   (W @ blockdiag(R_j)^T; rot[j] is bs x bs) */
static void mt_rotate_blocks(double *w, uint64_t O, uint64_t I, int bs, double *const *rot)
{
    double *x = malloc((size_t)bs * sizeof(double));
    for (uint64_t o = 0; o < O; o++)
        for (uint64_t j = 0; j < I / (uint64_t)bs; j++) {
            double *row = w + o * I + j * (uint64_t)bs;
            for (int a = 0; a < bs; a++) {
                x[a] = 0;
                for (int b = 0; b < bs; b++)
                    x[a] += row[b] * rot[j][a * bs + b];
            }
            memcpy(row, x, (size_t)bs * sizeof(double));
        }
    free(x);
}

/* ---- MT19937 and torch's CPU randperm (peft-merge.md Appendix A), for FourierFT ----------------- */
typedef struct {
    uint32_t mt[624];
    int i;
} mt19937;

static void mt19937_seed(mt19937 *g, uint32_t seed)
{
    g->mt[0] = seed;
    for (int k = 1; k < 624; k++)
        g->mt[k] = 1812433253u * (g->mt[k - 1] ^ (g->mt[k - 1] >> 30)) + (uint32_t)k;
    g->i = 624;
}

static uint32_t mt19937_next(mt19937 *g)
{
    if (g->i >= 624) {
        for (int k = 0; k < 624; k++) {
            uint32_t y = (g->mt[k] & 0x80000000u) | (g->mt[(k + 1) % 624] & 0x7fffffffu);
            g->mt[k] = g->mt[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        g->i = 0;
    }
    uint32_t y = g->mt[g->i++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* the first m entries of randperm(n, generator seeded with seed) (n < 2^28 here) */
static uint64_t *mt_randperm(uint64_t n, uint32_t seed, uint64_t m)
{
    uint64_t *p = malloc(n * sizeof(uint64_t));
    for (uint64_t k = 0; k < n; k++)
        p[k] = k;
    mt19937 g;
    mt19937_seed(&g, seed);
    for (uint64_t t = 0; t < m && t + 1 < n; t++) {
        uint64_t z = mt19937_next(&g) % (n - t), x = p[t];
        p[t] = p[t + z];
        p[t + z] = x;
    }
    return p;
}

/* ---- LORA (§5.1): Linear, Conv1D, Embedding (transposed), conv; rank/alpha patterns, rsLoRA,
 * DoRA (norm of each logical output row of W + s*B@A: rows for Linear, columns of the stored
 * Conv1D and Embedding weights), lora_bias ------------------------------------------------------- */
static void lora_ab(mt_ctx *c, mt_mod *m, int r, double s)
{
    m->r = r;
    m->s = s;
    if (m->kind == EMB) {
        mt_part(c, m, "lora_embedding_A", SH((uint64_t)r, m->I), 0, 0.1);
        mt_part(c, m, "lora_embedding_B", SH(m->O, (uint64_t)r), 0, 0.1);
    } else if (m->kind == CONV) {
        const mt_t *w = &c->base[m->w];
        mt_part(c, m, "lora_A.weight", SH((uint64_t)r, w->shape[1], w->shape[2], w->shape[3]), 0, 0.1);
        mt_part(c, m, "lora_B.weight", SH(m->O, (uint64_t)r, 1, 1), 0, 0.1);
    } else {
        mt_part(c, m, "lora_A.weight", SH((uint64_t)r, m->I), 0, 0.1);
        mt_part(c, m, "lora_B.weight", SH(m->O, (uint64_t)r), 0, 0.1);
    }
}

static void tt_rows(mt_ctx *c, const mt_mod *m, const char *part, const uint64_t *idx, uint64_t n);
static const uint64_t lora_tt_idx[] = {41, 3, 9}; /* trainable_token_indices of the rsLoRA variant */

static void ref_lora(mt_ctx *c)
{
    for (int k = 0; k < c->nm; k++) {
        const mt_mod *m = &c->mod[k];
        if (m->q[2]) { /* trainable_token_indices: embedding rows replaced */
            tt_rows(c, m, "token_adapter.trainable_tokens_delta", lora_tt_idx, 3);
            continue;
        }
        int emb = m->kind == EMB;
        const double *a = mt_get(c, m, emb ? "lora_embedding_A" : "lora_A.weight");
        const double *b = mt_get(c, m, emb ? "lora_embedding_B" : "lora_B.weight");
        double *d = mt_mm(b, a, m->O, (uint64_t)m->r, m->I), *w = mt_W(c, m);
        for (uint64_t e = 0; e < m->O * m->I; e++)
            w[e] += m->s * d[e];
        if (m->q[0]) { /* DoRA */
            const double *mag = mt_get(c, m, "lora_magnitude_vector");
            for (uint64_t o = 0; o < m->O; o++) {
                double n2 = 0;
                for (uint64_t i = 0; i < m->I; i++)
                    n2 += w[o * m->I + i] * w[o * m->I + i];
                for (uint64_t i = 0; i < m->I; i++)
                    w[o * m->I + i] *= mag[o] / sqrt(n2);
            }
        }
        mt_setW(c, m, w);
        if (m->q[1]) { /* lora_bias */
            const double *lb = mt_get(c, m, "lora_B.bias");
            double *rb = mt_ref_of(c, m->b);
            for (uint64_t o = 0; o < m->O; o++)
                rb[o] += m->s * lb[o];
        }
        free(d);
        free(w);
    }
}

/* rank_pattern {"v_proj": 6}, alpha_pattern {"layers\.1\..*": 3}, r 4, alpha 8 */
static void gen_lora(mt_ctx *c)
{
    lora_ab(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 4, 2.0);
    lora_ab(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 6, 8.0 / 6.0);
    lora_ab(c, mt_module(c, "model.layers.1.self_attn.q_proj", LIN, 37, 43, 0), 4, 3.0 / 4.0);
    lora_ab(c, mt_module(c, "model.embed_tokens", EMB, 43, 53, 0), 4, 2.0);
    lora_ab(c, mt_conv(c, "model.conv", 7, 5, 3), 4, 2.0);
    lora_ab(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0), 4, 2.0);
    /* targeted by the config but absent from the file: PEFT's initial value, a no-op */
    mt_base(c, "model.layers.1.self_attn.v_proj.weight", SH(33, 97), 0, 0.05);
}

/* r 8, alpha 6, trainable_token_indices [41, 3, 9] (a list: the input embedding) */
static void gen_lora_rslora(mt_ctx *c)
{
    lora_ab(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 8, 6.0 / sqrt(8.0));
    lora_ab(c, mt_module(c, "transformer.h.0.mlp.c_fc", C1D, 97, 33, 0), 8, 6.0 / sqrt(8.0));
    mt_mod *m = mt_module(c, "model.embed_tokens", EMB, 43, 53, 0);
    m->q[2] = 1;
    mt_part(c, m, "token_adapter.trainable_tokens_delta", SH(3, 43), 0, 0.05);
}

static void dora(mt_ctx *c, mt_mod *m)
{
    lora_ab(c, m, 4, 2.0);
    m->q[0] = 1;
    mt_t *mag = m->kind == CONV ? mt_part(c, m, "lora_magnitude_vector", SH(1, m->O, 1, 1), 0, 0)
                                : mt_part(c, m, "lora_magnitude_vector", SH(m->O), 0, 0);
    double *w = mt_W(c, m);
    for (uint64_t o = 0; o < m->O; o++) {
        double n2 = 0;
        for (uint64_t i = 0; i < m->I; i++)
            n2 += w[o * m->I + i] * w[o * m->I + i];
        mt_set(mag, o, sqrt(n2) * (1 + 0.2 * th_rand_uniform(&c->rng)));
    }
    free(w);
}

static void gen_lora_dora(mt_ctx *c)
{
    dora(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0));
    dora(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0));
    dora(c, mt_module(c, "model.embed_tokens", EMB, 43, 53, 0));
    dora(c, mt_conv(c, "model.conv", 7, 5, 3));
}

static void gen_lora_bias(mt_ctx *c)
{
    for (int k = 0; k < 2; k++) {
        mt_mod *m = k == 0 ? mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 1)
                           : mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 1);
        lora_ab(c, m, 4, 1.5);
        m->q[1] = 1;
        mt_part(c, m, "lora_B.bias", SH(m->O), 0, 0.05);
    }
}

static void bad_lora(mt_ctx *c) /* lora_A's input dimension is not the weight's */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0);
    mt_part(c, m, "lora_A.weight", SH(4, 41), 0, 0.1);
    mt_part(c, m, "lora_B.weight", SH(37, 4), 0, 0.1);
}

/* ---- ADALORA (§5.2): B @ (A ⊙ E) * alpha / (init_r + 1e-5), whatever rank the module kept ------- */
static void ada(mt_ctx *c, mt_mod *m, int k)
{
    m->r = k;
    m->s = 8.0 / (double)(6.0f + 1e-5f);
    mt_part(c, m, "lora_A", SH((uint64_t)k, m->I), 0, 0.1);
    mt_part(c, m, "lora_B", SH(m->O, (uint64_t)k), 0, 0.1);
    mt_part(c, m, "lora_E", SH((uint64_t)k, 1), 0, 0.5);
}

static void gen_adalora(mt_ctx *c)
{
    ada(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 4);
    ada(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0), 6);
}

static double *delta_adalora(const mt_ctx *c, const mt_mod *m)
{
    const double *a = mt_get(c, m, "lora_A"), *e = mt_get(c, m, "lora_E");
    double *ae = malloc((uint64_t)m->r * m->I * sizeof(double));
    for (uint64_t j = 0; j < (uint64_t)m->r; j++)
        for (uint64_t i = 0; i < m->I; i++)
            ae[j * m->I + i] = a[j * m->I + i] * e[j];
    double *d = mt_mm(mt_get(c, m, "lora_B"), ae, m->O, (uint64_t)m->r, m->I);
    free(ae);
    return d;
}

static void bad_adalora(mt_ctx *c) /* no lora_E */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0);
    mt_part(c, m, "lora_A", SH(4, 43), 0, 0.1);
    mt_part(c, m, "lora_B", SH(37, 4), 0, 0.1);
}

/* ---- IA3 (§5.3): rows (and bias) scaled, or input columns for feed-forward modules -------------- */
static void ia3(mt_ctx *c, mt_mod *m, int ff)
{
    m->q[0] = ff;
    if (ff)
        mt_part(c, m, "ia3_l", SH(1, m->I), 1, 0.2);
    else
        mt_part(c, m, "ia3_l", SH(m->O, 1), 1, 0.2);
}

static void gen_ia3(mt_ctx *c)
{
    ia3(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 1), 0);
    ia3(c, mt_module(c, "model.layers.0.mlp.down_proj", LIN, 33, 97, 1), 1);
    ia3(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 1), 0);
}

static void gen_ia3_conv1d_ff(mt_ctx *c)
{
    ia3(c, mt_module(c, "transformer.h.0.mlp.c_fc", C1D, 97, 33, 1), 0);
    ia3(c, mt_module(c, "transformer.h.0.mlp.c_proj", C1D, 33, 97, 1), 1);
}

/* a convolution kernel [o, i, k...] (nk kernel dims of size k), with a bias; logical in = i * k^nk */
static mt_mod *mt_conv_nd(mt_ctx *c, const char *path, uint64_t o, uint64_t i, uint64_t k, int nk)
{
    uint64_t kk = 1;
    for (int d = 0; d < nk; d++)
        kk *= k;
    mt_mod *m = mt_module(c, path, LIN, o, i * kk, 1);
    mt_t *w = &c->base[m->w];
    w->nd = 2 + nk;
    w->shape[1] = i;
    for (int d = 0; d < nk; d++)
        w->shape[2 + d] = k;
    m->kind = CONV;
    m->q[1] = (int)kk;
    return m;
}

/* Conv2d rows (bias too), Conv2d and Conv3d feed-forward input channels: ia3_l [1, C, 1...] */
static void gen_ia3_conv(mt_ctx *c)
{
    mt_mod *m = mt_conv_nd(c, "unet.conv_in", 6, 4, 3, 2);
    mt_part(c, m, "ia3_l", SH(1, 6, 1, 1), 1, 0.2);
    m = mt_conv_nd(c, "unet.ff.conv", 5, 7, 3, 2);
    m->q[0] = 1;
    mt_part(c, m, "ia3_l", SH(1, 7, 1, 1), 1, 0.2);
    m = mt_conv_nd(c, "unet.ff.conv3d", 3, 4, 2, 3);
    m->q[0] = 1;
    mt_part(c, m, "ia3_l", SH(1, 4, 1, 1, 1), 1, 0.2);
}

static void ref_ia3(mt_ctx *c)
{
    for (int k = 0; k < c->nm; k++) {
        const mt_mod *m = &c->mod[k];
        const double *l = mt_get(c, m, "ia3_l");
        double *w = mt_W(c, m);
        for (uint64_t o = 0; o < m->O; o++)
            for (uint64_t i = 0; i < m->I; i++)
                w[o * m->I + i] *= m->q[0] ? l[i / (uint64_t)(m->q[1] ? m->q[1] : 1)] : l[o];
        mt_setW(c, m, w);
        free(w);
        if (m->b >= 0 && !m->q[0]) {
            double *rb = mt_ref_of(c, m->b);
            for (uint64_t o = 0; o < m->O; o++)
                rb[o] *= l[o];
        }
    }
}

static void bad_ia3(mt_ctx *c) /* ia3_l one row short */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 1);
    mt_part(c, m, "ia3_l", SH(36, 1), 1, 0.2);
}

/* ---- LOHA (§5.4): (w1a @ w1b) ⊙ (w2a @ w2b) * alpha / r ------------------------------------------ */
static void loha(mt_ctx *c, mt_mod *m, int r, double s)
{
    m->r = r;
    m->s = s;
    mt_part(c, m, "hada_w1_a", SH(m->O, (uint64_t)r), 0, 0.3);
    mt_part(c, m, "hada_w1_b", SH((uint64_t)r, m->I), 0, 0.3);
    mt_part(c, m, "hada_w2_a", SH(m->O, (uint64_t)r), 0, 0.3);
    mt_part(c, m, "hada_w2_b", SH((uint64_t)r, m->I), 0, 0.3);
}

/* rank_pattern {"v_proj": 2}, alpha_pattern {"v_proj": 6}, r 4, alpha 8 */
static void gen_loha(mt_ctx *c)
{
    loha(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 4, 2.0);
    loha(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 2, 3.0);
}

/* convolutions: a Conv2d kernel [6, 4, 3, 3] in the flat form (w_b [r, 4*3*3]), a Conv2d [5, 3, 3, 3]
 * and a Conv1d [4, 5, 3] in the CP form (use_effective_conv2d: hada_t1/t2 [r, r, kh, kw] with a
 * trailing 1 for Conv1d, w_a [r, o], w_b [r, i]) */
static void loha_cp(mt_ctx *c, mt_mod *m, uint64_t i, uint64_t kh, uint64_t kw, int r, double s)
{
    m->r = r;
    m->s = s;
    m->q[0] = 1;
    m->q[1] = (int)i;
    mt_part(c, m, "hada_t1", SH((uint64_t)r, (uint64_t)r, kh, kw), 0, 0.5);
    mt_part(c, m, "hada_w1_a", SH((uint64_t)r, m->O), 0, 0.4);
    mt_part(c, m, "hada_w1_b", SH((uint64_t)r, i), 0, 0.4);
    mt_part(c, m, "hada_t2", SH((uint64_t)r, (uint64_t)r, kh, kw), 0, 0.5);
    mt_part(c, m, "hada_w2_a", SH((uint64_t)r, m->O), 0, 0.4);
    mt_part(c, m, "hada_w2_b", SH((uint64_t)r, i), 0, 0.4);
}

static void gen_loha_conv(mt_ctx *c)
{
    loha(c, mt_conv(c, "unet.conv_in", 6, 4, 3), 3, 2.0);
    loha_cp(c, mt_conv(c, "unet.conv_out", 5, 3, 3), 3, 3, 3, 3, 2.0);
    mt_mod *m = mt_module(c, "unet.conv1d", LIN, 4, 15, 0); /* stored as the Conv1d kernel [4, 5, 3] */
    mt_t *w = &c->base[m->w];
    w->nd = 3;
    w->shape[1] = 5;
    w->shape[2] = 3;
    m->kind = CONV;
    loha_cp(c, m, 5, 3, 1, 3, 2.0);
}

/* CP: R_j[p, (q, x)] = sum_{a,b} t_j[a, b, x] w_j_a[a, p] w_j_b[b, q] (PEFT's HadaWeightCP einsum
 * "i j k l, j r, i p -> p r k l"), x over the kernel positions */
static double *loha_cp_rebuild(const mt_ctx *c, const mt_mod *m, int j)
{
    uint64_t r = (uint64_t)m->r, in = (uint64_t)m->q[1], kk = m->I / in;
    const double *t = mt_get(c, m, j ? "hada_t2" : "hada_t1"), *wa = mt_get(c, m, j ? "hada_w2_a" : "hada_w1_a"),
                 *wb = mt_get(c, m, j ? "hada_w2_b" : "hada_w1_b");
    double *d = calloc(m->O * m->I, sizeof *d);
    for (uint64_t p = 0; p < m->O; p++)
        for (uint64_t q = 0; q < in; q++)
            for (uint64_t x = 0; x < kk; x++)
                for (uint64_t a = 0; a < r; a++)
                    for (uint64_t b = 0; b < r; b++)
                        d[p * m->I + q * kk + x] += t[(a * r + b) * kk + x] * wa[a * m->O + p] * wb[b * in + q];
    return d;
}

static double *delta_loha(const mt_ctx *c, const mt_mod *m)
{
    uint64_t r = (uint64_t)m->r;
    if (m->q[0]) {
        double *d1 = loha_cp_rebuild(c, m, 0), *d2 = loha_cp_rebuild(c, m, 1);
        for (uint64_t e = 0; e < m->O * m->I; e++)
            d1[e] *= d2[e];
        free(d2);
        return d1;
    }
    double *d1 = mt_mm(mt_get(c, m, "hada_w1_a"), mt_get(c, m, "hada_w1_b"), m->O, r, m->I);
    double *d2 = mt_mm(mt_get(c, m, "hada_w2_a"), mt_get(c, m, "hada_w2_b"), m->O, r, m->I);
    for (uint64_t e = 0; e < m->O * m->I; e++)
        d1[e] *= d2[e];
    free(d2);
    return d1;
}

static void bad_loha(mt_ctx *c) /* hada_w2_b missing */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0);
    mt_part(c, m, "hada_w1_a", SH(37, 4), 0, 0.3);
    mt_part(c, m, "hada_w1_b", SH(4, 43), 0, 0.3);
    mt_part(c, m, "hada_w2_a", SH(37, 4), 0, 0.3);
}

/* ---- LOKR (§5.5): kron(w1, w2) * alpha / r, each factor whole or as a product ------------------- */
static void lokr_factor(mt_ctx *c, mt_mod *m, int which, uint64_t p, uint64_t q, int r)
{
    char n[32];
    if (r == 0) {
        snprintf(n, sizeof n, "lokr_w%d", which);
        mt_part(c, m, n, SH(p, q), 0, 0.25);
    } else {
        snprintf(n, sizeof n, "lokr_w%d_a", which);
        mt_part(c, m, n, SH(p, (uint64_t)r), 0, 0.25);
        snprintf(n, sizeof n, "lokr_w%d_b", which);
        mt_part(c, m, n, SH((uint64_t)r, q), 0, 0.25);
    }
}

static void gen_lokr(mt_ctx *c)
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 35, 39, 0); /* both whole */
    lokr_factor(c, m, 1, 5, 3, 0);
    lokr_factor(c, m, 2, 7, 13, 0);
    m = mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 91, 0); /* both decomposed */
    lokr_factor(c, m, 1, 3, 7, 4);
    lokr_factor(c, m, 2, 11, 13, 4);
    m = mt_module(c, "model.layers.0.mlp.up_proj", LIN, 45, 39, 0); /* w1 whole, w2 decomposed */
    lokr_factor(c, m, 1, 5, 3, 0);
    lokr_factor(c, m, 2, 9, 13, 4);
    for (int k = 0; k < c->nm; k++)
        c->mod[k].s = 2.0; /* alpha 8 / r 4, also for the whole factors (PEFT) */
}

/* factor `which` of a module as a dense [p, q] matrix */
static double *lokr_dense(const mt_ctx *c, const mt_mod *m, int which, uint64_t *p, uint64_t *q)
{
    char n[32];
    snprintf(n, sizeof n, "lokr_w%d", which);
    const mt_t *t = mt_opt(c, m, n);
    if (t != NULL) {
        *p = t->shape[0];
        *q = t->shape[1];
        double *x = malloc(t->n * sizeof(double));
        memcpy(x, t->v, t->n * sizeof(double));
        return x;
    }
    snprintf(n, sizeof n, "lokr_w%d_a", which);
    const mt_t *a = mt_opt(c, m, n);
    snprintf(n, sizeof n, "lokr_w%d_b", which);
    const mt_t *b = mt_opt(c, m, n);
    cr_assert(a && b, "reference: LoKr factor %d of %s", which, m->path);
    *p = a->shape[0];
    *q = b->shape[1];
    return mt_mm(a->v, b->v, a->shape[0], a->shape[1], b->shape[1]);
}

/* convolutions (PEFT's lokr Conv2d/Conv1d): flat (w2_b [r, d*kh*kw]: 2-D kron, reshaped), a whole
 * 4-D lokr_w2 [b, d, kh, kw] and the CP forms (lokr_t2 [r, r, kh, kw], w2_a [r, b], w2_b [r, d];
 * Conv1d: kw = 1); w1 [a, c] is unsqueezed to [a, c, 1, 1] for the 4-D kron */
static void lokr_conv_cp(mt_ctx *c, mt_mod *m, uint64_t b, uint64_t d, uint64_t kh, uint64_t kw)
{
    mt_part(c, m, "lokr_t2", SH(4, 4, kh, kw), 0, 0.4);
    mt_part(c, m, "lokr_w2_a", SH(4, b), 0, 0.4);
    mt_part(c, m, "lokr_w2_b", SH(4, d), 0, 0.4);
}

static void gen_lokr_conv(mt_ctx *c)
{
    mt_mod *m = mt_conv(c, "unet.conv_a", 6, 4, 3); /* flat: w1 [2, 2] whole, w2_a [3, 4] @ w2_b [4, 2*9] */
    m->q[0] = 1, m->q[1] = 3, m->q[2] = 3;
    lokr_factor(c, m, 1, 2, 2, 0);
    lokr_factor(c, m, 2, 3, 18, 4);
    m = mt_conv(c, "unet.conv_b", 6, 6, 3); /* w1_a @ w1_b [3, 2], whole lokr_w2 [2, 3, 3, 3] */
    m->q[0] = 2, m->q[1] = 3, m->q[2] = 3;
    lokr_factor(c, m, 1, 3, 2, 4);
    mt_part(c, m, "lokr_w2", SH(2, 3, 3, 3), 0, 0.25);
    m = mt_conv(c, "unet.conv_c", 4, 6, 3); /* CP Conv2d: w1 [2, 3], w2 [2, 2, 3, 3] */
    m->q[0] = 2, m->q[1] = 3, m->q[2] = 3;
    lokr_factor(c, m, 1, 2, 3, 0);
    lokr_conv_cp(c, m, 2, 2, 3, 3);
    m = mt_module(c, "unet.conv1d", LIN, 4, 18, 0); /* CP Conv1d [4, 6, 3]: w1 [2, 2], w2 [2, 3, 3, 1] */
    mt_t *w = &c->base[m->w];
    w->nd = 3;
    w->shape[1] = 6;
    w->shape[2] = 3;
    m->kind = CONV;
    m->q[0] = 2, m->q[1] = 3, m->q[2] = 1;
    lokr_factor(c, m, 1, 2, 2, 0);
    lokr_conv_cp(c, m, 2, 3, 3, 1);
    for (int k = 0; k < c->nm; k++)
        c->mod[k].s = 2.0;
}

/* w2 of a conv module as [b, d, kk] (q[0] 2: whole 4-D or CP) */
static double *lokr_w2_4d(const mt_ctx *c, const mt_mod *m, uint64_t *b, uint64_t *d, uint64_t kk)
{
    const mt_t *w2 = mt_opt(c, m, "lokr_w2"), *t = mt_opt(c, m, "lokr_t2");
    if (w2 != NULL) {
        *b = w2->shape[0];
        *d = w2->shape[1];
        double *x = malloc(w2->n * sizeof(double));
        memcpy(x, w2->v, w2->n * sizeof(double));
        return x;
    }
    cr_assert_not_null(t, "reference: no lokr_w2 or lokr_t2 for %s", m->path);
    const mt_t *wa = mt_opt(c, m, "lokr_w2_a"), *wb = mt_opt(c, m, "lokr_w2_b");
    uint64_t r = t->shape[0];
    *b = wa->shape[1];
    *d = wb->shape[1];
    double *x = calloc(*b * *d * kk, sizeof(double));
    /* einsum("i j k l, i p, j r -> p r k l", t2, w2_a, w2_b) */
    for (uint64_t p = 0; p < *b; p++)
        for (uint64_t q = 0; q < *d; q++)
            for (uint64_t e = 0; e < kk; e++)
                for (uint64_t i = 0; i < r; i++)
                    for (uint64_t j = 0; j < r; j++)
                        x[(p * *d + q) * kk + e] += t->v[(i * r + j) * kk + e] * wa->v[i * *b + p] * wb->v[j * *d + q];
    return x;
}

static double *delta_lokr_conv(const mt_ctx *c, const mt_mod *m)
{
    uint64_t a, cc, b, d, kk = (uint64_t)(m->q[1] * m->q[2]);
    double *w1 = lokr_dense(c, m, 1, &a, &cc), *dl = malloc(m->O * m->I * sizeof(double));
    if (m->q[0] == 1) { /* 2-D kron(w1, w2_a @ w2_b), reshaped to the kernel */
        uint64_t u, v;
        double *w2 = lokr_dense(c, m, 2, &u, &v);
        for (uint64_t ia = 0; ia < a; ia++)
            for (uint64_t ic = 0; ic < cc; ic++)
                for (uint64_t x = 0; x < u; x++)
                    for (uint64_t y = 0; y < v; y++)
                        dl[(ia * u + x) * (cc * v) + ic * v + y] = w1[ia * cc + ic] * w2[x * v + y];
        free(w2);
    } else { /* 4-D kron([a, c, 1, 1], [b, d, kh, kw]) = [a*b, c*d, kh, kw] */
        double *w2 = lokr_w2_4d(c, m, &b, &d, kk);
        uint64_t in = cc * d;
        for (uint64_t ia = 0; ia < a; ia++)
            for (uint64_t ib = 0; ib < b; ib++)
                for (uint64_t ic = 0; ic < cc; ic++)
                    for (uint64_t id = 0; id < d; id++)
                        for (uint64_t e = 0; e < kk; e++)
                            dl[((ia * b + ib) * in + ic * d + id) * kk + e] = w1[ia * cc + ic] * w2[(ib * d + id) * kk + e];
        free(w2);
    }
    free(w1);
    return dl;
}

static double *delta_lokr(const mt_ctx *c, const mt_mod *m)
{
    if (m->q[0])
        return delta_lokr_conv(c, m);
    uint64_t p, q, u, v;
    double *w1 = lokr_dense(c, m, 1, &p, &q), *w2 = lokr_dense(c, m, 2, &u, &v);
    cr_assert(p * u == m->O && q * v == m->I);
    double *d = malloc(m->O * m->I * sizeof(double));
    for (uint64_t a = 0; a < p; a++)
        for (uint64_t b = 0; b < q; b++)
            for (uint64_t x = 0; x < u; x++)
                for (uint64_t y = 0; y < v; y++)
                    d[(a * u + x) * m->I + b * v + y] = w1[a * q + b] * w2[x * v + y];
    free(w1);
    free(w2);
    return d;
}

static void bad_lokr(mt_ctx *c) /* kron is [35, 42], the weight [35, 39] */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 35, 39, 0);
    lokr_factor(c, m, 1, 5, 3, 0);
    lokr_factor(c, m, 2, 7, 14, 0);
}

/* ---- VERA (§5.8): (λ_b ⊙ B[:o]) @ (λ_d ⊙ A[:, :i]) from the shared projections ----------------- */
static void gen_vera_mods(mt_ctx *c, uint64_t lb_short)
{
    mt_mod *m[3] = {mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0),
                    mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0),
                    mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0)};
    mt_key(c, "base_model.vera_A", NULL, SH(8, 97), 0, 0.3);
    mt_key(c, "base_model.vera_B", NULL, SH(39, 8), 0, 0.3);
    for (int k = 0; k < 3; k++) {
        mt_part(c, m[k], "vera_lambda_b", SH(m[k]->O - (k == 0 ? lb_short : 0)), 0, 0.1);
        mt_part(c, m[k], "vera_lambda_d", SH(8), 1, 0.2);
    }
}

static void gen_vera(mt_ctx *c) { gen_vera_mods(c, 0); }
static void bad_vera(mt_ctx *c) { gen_vera_mods(c, 1); } /* q_proj's lambda_b one short */

/* (λ_b ⊙ B[:o]) @ (λ_d[:r] ⊙ A[:r, :i]) from the shared <t>_A and <t>_B [o_max, r]: VeRA's r is
 * A's rows; PVeRA's A has 2r (rows r .. 2r of A and λ_d, the log-variance, are not merged) */
static double *delta_vera_like(const mt_ctx *c, const mt_mod *m, const char *t)
{
    char an[64], bn[64], lbn[64], ldn[64];
    snprintf(an, sizeof an, "base_model.%s_A", t);
    snprintf(bn, sizeof bn, "base_model.%s_B", t);
    snprintf(lbn, sizeof lbn, "%s_lambda_b", t);
    snprintf(ldn, sizeof ldn, "%s_lambda_d", t);
    const mt_t *A = mt_find(c, an), *B = mt_find(c, bn);
    cr_assert(A && B);
    uint64_t r = B->shape[1], imax = A->shape[1];
    const double *lb = mt_get(c, m, lbn), *ld = mt_get(c, m, ldn);
    double *d = calloc(m->O * m->I, sizeof(double));
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            for (uint64_t j = 0; j < r; j++)
                d[o * m->I + i] += lb[o] * B->v[o * r + j] * ld[j] * A->v[j * imax + i];
    return d;
}

static double *delta_vera(const mt_ctx *c, const mt_mod *m) { return delta_vera_like(c, m, "vera"); }

/* ---- PVERA (docs/adapter-types.md): VeRA on the mean half: (λ_b ⊙ B[:o]) @ (λ_d[:r] ⊙ A[:r, :i]) -- */
static void gen_pvera_mods(mt_ctx *c, uint64_t a_rows)
{
    mt_mod *m[3] = {mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0),
                    mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0),
                    mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0)};
    mt_key(c, "base_model.pvera_A", NULL, SH(a_rows, 97), 0, 0.3); /* mean rows, then log-variance rows */
    mt_key(c, "base_model.pvera_B", NULL, SH(39, 5), 0, 0.3);
    for (int k = 0; k < 3; k++) {
        mt_part(c, m[k], "pvera_lambda_b", SH(m[k]->O), 0, 0.1);
        mt_part(c, m[k], "pvera_lambda_d", SH(10), 1, 0.2);
    }
}

static void gen_pvera(mt_ctx *c) { gen_pvera_mods(c, 10); }
static void bad_pvera(mt_ctx *c) { gen_pvera_mods(c, 5); } /* A with r rows, not 2r */

static double *delta_pvera(const mt_ctx *c, const mt_mod *m) { return delta_vera_like(c, m, "pvera"); }

/* ---- RANDLORA (§5.13; layer.py get_scaled_bases): the two flattenings pair different (k, b) ----- */
static void gen_randlora_mods(mt_ctx *c, int bad)
{
    mt_mod *m[3] = {mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), /* o < i: transposed */
                    mt_module(c, "model.layers.0.mlp.down_proj", LIN, 45, 33, 0),
                    mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0)};
    /* shared bases sized by the element-wise max of (out, in) over the modules: (45, 43) */
    mt_t *A = mt_key(c, "base_model.randlora_A", NULL, SH(4, 1, 43), 0, 1);
    mt_t *B = mt_key(c, "base_model.randlora_B", NULL, SH(45, 11, 4), 0, 1);
    for (int k = 0; k < 3; k++) {
        uint64_t mn = m[k]->O < m[k]->I ? m[k]->O : m[k]->I, nb = (mn + 3) / 4;
        m[k]->r = 4;
        m[k]->s = 8.0 / 4.0; /* randlora_alpha / r */
        mt_part(c, m[k], "randlora_lambda", SH(4, nb), 0, 0.05);
        mt_part(c, m[k], "randlora_gamma", SH(nb, mn - (bad && k == 0)), 0, 0.05);
        /* PEFT also saves each layer's reference to the shared bases */
        mt_t *a = mt_part(c, m[k], "randlora_A", SH(4, 1, 43), 0, 0), *b = mt_part(c, m[k], "randlora_B", SH(45, 11, 4), 0, 0);
        memcpy(a->v, A->v, A->n * sizeof(double));
        memcpy(b->v, B->v, B->n * sizeof(double));
    }
}

static void gen_randlora(mt_ctx *c) { gen_randlora_mods(c, 0); }
static void bad_randlora(mt_ctx *c) { gen_randlora_mods(c, 1); } /* q_proj's gamma one column short */

static double *delta_randlora(const mt_ctx *c, const mt_mod *m)
{
    const mt_t *A = mt_find(c, "base_model.randlora_A"), *B = mt_find(c, "base_model.randlora_B");
    cr_assert(A && B);
    uint64_t dmin = A->shape[2], NB = B->shape[1];
    uint64_t r = (uint64_t)m->r, mn = m->O < m->I ? m->O : m->I, mx = m->O < m->I ? m->I : m->O;
    uint64_t nb = (mn + r - 1) / r;
    const double *lam = mt_get(c, m, "randlora_lambda"), *gam = mt_get(c, m, "randlora_gamma");
    double *d = calloc(m->O * m->I, sizeof(double));
    for (uint64_t x = 0; x < mx; x++)
        for (uint64_t j = 0; j < mn; j++) {
            double acc = 0;
            for (uint64_t t = 0; t < nb * r; t++) {
                uint64_t bb = t / r, kb = t % r;  /* B_flat column t = b*r + k */
                uint64_t ka = t / nb, ba = t % nb; /* A_flat row t = k*nb + b */
                acc += B->v[(x * NB + bb) * r + kb] * lam[ka * nb + ba] * A->v[ka * dmin + j] * gam[ba * mn + j];
            }
            if (mn == m->I)
                d[x * m->I + j] = acc;
            else
                d[j * m->I + x] = acc;
        }
    return d;
}

/* ---- VBLORA (§5.9): rows of A and B mixed from the bank by softmax over the top-k logits -------- */
#define VB_N 7
#define VB_L 3

/* indices of the k largest of z[0..n) (descending) and their softmax weights */
static void vb_topk(const double *z, int n, int k, int *idx, double *w)
{
    int used[64] = {0};
    for (int t = 0; t < k; t++) {
        int best = -1;
        for (int j = 0; j < n; j++)
            if (!used[j] && (best < 0 || z[j] > z[best]))
                best = j;
        used[best] = 1;
        idx[t] = best;
    }
    double sum = 0;
    for (int t = 0; t < k; t++)
        sum += exp(z[idx[t]] - z[idx[0]]);
    for (int t = 0; t < k; t++)
        w[t] = exp(z[idx[t]] - z[idx[0]]) / sum;
}

/* logits [rows, N] of one part: stored whole, or as top-k indices + the first k-1 weights */
static void vb_logits(mt_ctx *c, mt_mod *m, const char *part, uint64_t d0, uint64_t d1, int topk, int saved_topk)
{
    if (!saved_topk) {
        mt_part(c, m, part, SH(d0, d1, VB_N), 0, 1);
        return;
    }
    char n[64];
    snprintf(n, sizeof n, "%s_topk_indices", part);
    mt_t *ti = mt_part(c, m, n, SH(d0, d1, (uint64_t)topk), 0, 0);
    snprintf(ti->dtype, sizeof ti->dtype, "U8");
    snprintf(n, sizeof n, "%s_topk_weights", part);
    mt_t *tw = mt_part(c, m, n, SH(d0, d1, (uint64_t)topk - 1), 0, 0);
    for (uint64_t row = 0; row < d0 * d1; row++) {
        double z[VB_N], w[VB_N];
        int idx[VB_N];
        for (int j = 0; j < VB_N; j++)
            z[j] = th_rand_normal(&c->rng);
        vb_topk(z, VB_N, topk, idx, w);
        for (int t = 0; t < topk; t++)
            mt_set(ti, row * (uint64_t)topk + (uint64_t)t, idx[t]);
        for (int t = 0; t < topk - 1; t++)
            mt_set(tw, row * (uint64_t)(topk - 1) + (uint64_t)t, w[t]);
    }
}

static void gen_vblora_k(mt_ctx *c, int topk, int saved, uint64_t bad_n)
{
    mt_key(c, "base_model.vblora_vector_bank", NULL, SH(VB_N, VB_L), 0, 0.15);
    mt_mod *m[2] = {mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 33, 39, 0),
                    mt_module(c, "transformer.h.0.attn.c_attn", C1D, 45, 33, 0)};
    for (int k = 0; k < 2; k++) {
        m[k]->r = 4;
        m[k]->q[0] = topk;
        vb_logits(c, m[k], "vblora_logits_A", 4, m[k]->I / VB_L, topk, saved);
        if (bad_n && k == 0)
            mt_part(c, m[k], "vblora_logits_B", SH(m[k]->O / VB_L, 4, bad_n), 0, 1);
        else
            vb_logits(c, m[k], "vblora_logits_B", m[k]->O / VB_L, 4, topk, saved);
    }
}

static void gen_vblora(mt_ctx *c) { gen_vblora_k(c, 2, 0, 0); }
static void gen_vblora_topk(mt_ctx *c) { gen_vblora_k(c, 3, 1, 0); }
static void gen_vblora_top1(mt_ctx *c) { gen_vblora_k(c, 1, 1, 0); } /* weights [.., 0]: each row one bank vector */
static void bad_vblora(mt_ctx *c) { gen_vblora_k(c, 2, 0, VB_N - 1); } /* logits over 6 vectors, bank has 7 */

/* the mixed vectors of one part: out[row * L + l] */
static double *vb_mix(const mt_ctx *c, const mt_mod *m, const char *part, uint64_t rows, int topk)
{
    const mt_t *bank = mt_find(c, "base_model.vblora_vector_bank");
    double *out = calloc(rows * VB_L, sizeof(double));
    const mt_t *z = mt_opt(c, m, part);
    char n[64];
    snprintf(n, sizeof n, "%s_topk_indices", part);
    const mt_t *ti = mt_opt(c, m, n);
    snprintf(n, sizeof n, "%s_topk_weights", part);
    const mt_t *tw = mt_opt(c, m, n);
    cr_assert(bank && (z || (ti && tw)), "reference: VB-LoRA %s of %s", part, m->path);
    for (uint64_t row = 0; row < rows; row++) {
        int idx[VB_N];
        double w[VB_N];
        if (z != NULL) {
            vb_topk(z->v + row * VB_N, VB_N, topk, idx, w);
        } else {
            double sum = 0;
            for (int t = 0; t < topk; t++)
                idx[t] = (int)ti->v[row * (uint64_t)topk + (uint64_t)t];
            for (int t = 0; t < topk - 1; t++)
                sum += w[t] = tw->v[row * (uint64_t)(topk - 1) + (uint64_t)t];
            w[topk - 1] = 1 - sum;
        }
        for (int t = 0; t < topk; t++)
            for (int l = 0; l < VB_L; l++)
                out[row * VB_L + (uint64_t)l] += w[t] * bank->v[idx[t] * VB_L + l];
    }
    return out;
}

static double *delta_vblora(const mt_ctx *c, const mt_mod *m)
{
    uint64_t r = (uint64_t)m->r, ob = m->O / VB_L;
    /* A: [r, i/L, L] -> [r, i]; B: [o/L, r, L] -> [o/L, L, r] -> [o, r] */
    double *a = vb_mix(c, m, "vblora_logits_A", r * (m->I / VB_L), m->q[0]);
    double *mb = vb_mix(c, m, "vblora_logits_B", ob * r, m->q[0]);
    double *b = malloc(m->O * r * sizeof(double));
    for (uint64_t o = 0; o < ob; o++)
        for (uint64_t j = 0; j < r; j++)
            for (uint64_t l = 0; l < VB_L; l++)
                b[(o * VB_L + l) * r + j] = mb[(o * r + j) * VB_L + l];
    double *d = mt_mm(b, a, m->O, r, m->I);
    free(a);
    free(mb);
    free(b);
    return d;
}

/* ---- DELORA (§5.14): B diag(λ / r / (max(|A_j|, 1e-4) max(|B^j|, 1e-4))) A ⊙ w_norm ------------- */
static void delora(mt_ctx *c, mt_mod *m, int r, uint64_t wn_short)
{
    m->r = r;
    mt_t *a = mt_part(c, m, "delora_A", SH((uint64_t)r, m->I), 0, 0.3);
    mt_part(c, m, "delora_B", SH(m->O, (uint64_t)r), 0, 0.3);
    mt_part(c, m, "delora_lambda", SH(1), 15, 1.5);
    mt_t *wn = mt_part(c, m, "delora_w_norm", SH(m->I - wn_short), 0, 0);
    double *w = mt_W(c, m);
    for (uint64_t i = 0; i < wn->n; i++) {
        double n2 = 0;
        for (uint64_t o = 0; o < m->O; o++)
            n2 += w[o * m->I + i] * w[o * m->I + i];
        mt_set(wn, i, sqrt(n2) * (1 + 0.1 * th_rand_uniform(&c->rng)));
    }
    free(w);
    if (r == 3) /* a row of A below the 1e-4 clamp */
        for (uint64_t i = 0; i < m->I; i++)
            mt_set(a, m->I + i, 1e-7 * th_rand_normal(&c->rng));
}

/* rank_pattern {"v_proj": 3}, r 4 */
static void gen_delora(mt_ctx *c)
{
    delora(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 4, 0);
    delora(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 3, 0);
}

static void bad_delora(mt_ctx *c) /* w_norm one short */
{
    delora(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 4, 1);
}

static double *delta_delora(const mt_ctx *c, const mt_mod *m)
{
    uint64_t r = (uint64_t)m->r;
    const double *a = mt_get(c, m, "delora_A"), *b = mt_get(c, m, "delora_B");
    const double *lam = mt_get(c, m, "delora_lambda"), *wn = mt_get(c, m, "delora_w_norm");
    double *bs = malloc(m->O * r * sizeof(double));
    for (uint64_t j = 0; j < r; j++) {
        double an = 0, bn = 0;
        for (uint64_t i = 0; i < m->I; i++)
            an += a[j * m->I + i] * a[j * m->I + i];
        for (uint64_t o = 0; o < m->O; o++)
            bn += b[o * r + j] * b[o * r + j];
        double f = lam[0] / (double)r / (fmax(sqrt(an), 1e-4) * fmax(sqrt(bn), 1e-4));
        for (uint64_t o = 0; o < m->O; o++)
            bs[o * r + j] = b[o * r + j] * f;
    }
    double *d = mt_mm(bs, a, m->O, r, m->I);
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            d[o * m->I + i] *= wn[i];
    free(bs);
    return d;
}

/* ---- GRALORA (§5.14): k x k blocks, each a rank r/k product, plus the hybrid LoRA ---------------- */
static void gralora(mt_ctx *c, mt_mod *m, int h, uint64_t bad)
{
    const uint64_t k = 3, r = 6;
    m->r = (int)r;
    m->q[0] = (int)k;
    m->q[1] = h;
    m->s = 12.0 / (double)(r + (uint64_t)h);
    mt_part(c, m, "gralora_A", SH(k, m->I / k, r), 0, 0.3);
    mt_part(c, m, "gralora_B", SH(k, r, m->O / k - bad), 0, 0.3);
    if (h > 0) {
        mt_part(c, m, "gralora_A_general.weight", SH((uint64_t)h, m->I), 0, 0.2);
        mt_part(c, m, "gralora_B_general.weight", SH(m->O, (uint64_t)h), 0, 0.2);
    }
}

static void gen_gralora_h(mt_ctx *c, int h)
{
    gralora(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 33, 39, 0), h, 0);
    gralora(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 33, 45, 0), h, 0);
}

static void gen_gralora(mt_ctx *c) { gen_gralora_h(c, 0); }
static void gen_gralora_hybrid(mt_ctx *c) { gen_gralora_h(c, 2); }
static void bad_gralora(mt_ctx *c) { gralora(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 33, 39, 0), 0, 1); }

static double *delta_gralora(const mt_ctx *c, const mt_mod *m)
{
    uint64_t k = (uint64_t)m->q[0], r = (uint64_t)m->r, sg = r / k, ok = m->O / k, ik = m->I / k;
    const double *a = mt_get(c, m, "gralora_A"), *b = mt_get(c, m, "gralora_B");
    double *d = calloc(m->O * m->I, sizeof(double));
    for (uint64_t j = 0; j < k; j++)
        for (uint64_t y = 0; y < ok; y++)
            for (uint64_t n = 0; n < k; n++)
                for (uint64_t x = 0; x < ik; x++) {
                    double acc = 0;
                    for (uint64_t t = 0; t < sg; t++)
                        acc += a[(n * ik + x) * r + j * sg + t] * b[(j * r + n * sg + t) * ok + y];
                    d[(j * ok + y) * m->I + n * ik + x] = acc;
                }
    if (m->q[1] > 0) {
        double *g = mt_mm(mt_get(c, m, "gralora_B_general.weight"), mt_get(c, m, "gralora_A_general.weight"), m->O,
                          (uint64_t)m->q[1], m->I);
        for (uint64_t e = 0; e < m->O * m->I; e++)
            d[e] += g[e];
        free(g);
    }
    return d;
}

/* ---- FOURIERFT (§5.10): Re(ifft2(sparse spectrum)) * scaling, positions from torch's randperm ---- */
static void fourierft(mt_ctx *c, mt_mod *m, uint64_t n, uint32_t seed, double scaling)
{
    m->r = (int)seed;
    m->s = scaling / (double)(m->O * m->I);
    mt_part(c, m, "fourierft_spectrum", SH(n), 0, 0.2);
}

/* n_frequency 20, scaling 100, seed 777 */
static void gen_fourierft(mt_ctx *c)
{
    fourierft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 20, 777, 100);
    fourierft(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0), 20, 777, 100);
}

/* n_frequency 25, n_frequency_pattern {"v_proj": 11}, scaling 150, seed 42 */
static void gen_fourierft_pattern(mt_ctx *c)
{
    fourierft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 25, 42, 150);
    fourierft(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 11, 42, 150);
}

static void bad_fourierft(mt_ctx *c) /* a 2-D spectrum */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0);
    mt_part(c, m, "fourierft_spectrum", SH(4, 5), 0, 0.2);
}

static double *delta_fourierft(const mt_ctx *c, const mt_mod *m)
{
    const mt_t *sp = mt_opt(c, m, "fourierft_spectrum");
    cr_assert_not_null(sp);
    uint64_t *perm = mt_randperm(m->O * m->I, (uint32_t)m->r, sp->n);
    double *d = calloc(m->O * m->I, sizeof(double));
    for (uint64_t t = 0; t < sp->n; t++) {
        uint64_t row = perm[t] / m->I, col = perm[t] % m->I;
        for (uint64_t y = 0; y < m->O; y++)
            for (uint64_t x = 0; x < m->I; x++) {
                double ph = (double)(y * row % m->O) / (double)m->O + (double)(x * col % m->I) / (double)m->I;
                d[y * m->I + x] += sp->v[t] * cos(2 * M_PI * ph);
            }
    }
    free(perm);
    return d;
}

/* ---- WAVEFT (docs/adapter-types.md): scaling * waverec2d of the sparse spectrum, done densely as
 * PEFT does (zero-padded spectrum, four quadrants, transposed convolution of stride 2, crops) ---- */
static const double WF_DB1[2] = {M_SQRT1_2, M_SQRT1_2};
static double WF_DB2[4]; /* (1 + sqrt3, 3 + sqrt3, 3 - sqrt3, 1 - sqrt3) / (4 sqrt2) */

/* q[0]: filter length (0: use_idwt false), q[1]: the family's reduction; r: the seed */
static void waveft(mt_ctx *c, mt_mod *m, uint64_t n, uint32_t seed, double scaling, int len, int red)
{
    m->r = (int)seed;
    m->s = scaling;
    m->q[0] = len;
    m->q[1] = red;
    mt_part(c, m, "waveft_spectrum", SH(n), 0, 0.2);
}

static void gen_waveft(mt_ctx *c) /* db1, scaling 25, seed 777 */
{
    waveft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 20, 777, 25, 2, 0);
    waveft(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0), 20, 777, 25, 2, 0);
}

static void gen_waveft_db2(mt_ctx *c) /* db2 (reduction 2), scaling 10, seed 42 */
{
    waveft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 30, 42, 10, 4, 2);
    waveft(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 34, 40, 0), 30, 42, 10, 4, 2);
}

static void gen_waveft_plain(mt_ctx *c) /* use_idwt false */
{
    waveft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 25, 5, 3, 0, 0);
}

static void bad_waveft(mt_ctx *c) /* a 2-D spectrum */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0);
    mt_part(c, m, "waveft_spectrum", SH(4, 5), 0, 0.2);
}

static double *delta_waveft(const mt_ctx *c, const mt_mod *m)
{
    const mt_t *sp = mt_opt(c, m, "waveft_spectrum");
    cr_assert_not_null(sp);
    uint64_t O = m->O, I = m->I, *perm = mt_randperm(O * I, (uint32_t)m->r, sp->n);
    double *d = calloc(O * I, sizeof(double));
    if (m->q[0] == 0) {
        for (uint64_t t = 0; t < sp->n; t++)
            d[perm[t]] = sp->v[t];
        free(perm);
        return d;
    }
    for (int k = 0; k < 4; k++)
        WF_DB2[k] = (double[]){1 + sqrt(3.0), 3 + sqrt(3.0), 3 - sqrt(3.0), 1 - sqrt(3.0)}[k] / (4 * sqrt(2.0));
    int L = m->q[0];
    const double *lo = L == 2 ? WF_DB1 : WF_DB2;
    double hi[4];
    for (int k = 0; k < L; k++)
        hi[k] = (k % 2 ? -1 : 1) * lo[L - 1 - k];
    uint64_t Hp = O + (uint64_t)m->q[1], Wp = I + (uint64_t)m->q[1];
    Hp += Hp % 2;
    Wp += Wp % 2;
    double *S = calloc(Hp * Wp, sizeof(double));
    for (uint64_t t = 0; t < sp->n; t++)
        S[(perm[t] / I + (Hp - O) / 2) * Wp + perm[t] % I + (Wp - I) / 2] = sp->v[t];
    uint64_t H2 = Hp / 2, W2 = Wp / 2, Ho = (H2 - 1) * 2 + (uint64_t)L, Wo = (W2 - 1) * 2 + (uint64_t)L;
    double *Y = calloc(Ho * Wo, sizeof(double));
    for (uint64_t i = 0; i < H2; i++)
        for (uint64_t j = 0; j < W2; j++) {
            double cA = S[i * Wp + j], cH = S[i * Wp + W2 + j], cV = S[(H2 + i) * Wp + j], cD = S[(H2 + i) * Wp + W2 + j];
            for (int a = 0; a < L; a++)
                for (int b = 0; b < L; b++)
                    Y[(2 * i + (uint64_t)a) * Wo + 2 * j + (uint64_t)b] +=
                        cA * lo[a] * lo[b] + cH * hi[a] * lo[b] + cV * lo[a] * hi[b] + cD * hi[a] * hi[b];
        }
    uint64_t pad = (uint64_t)(2 * L - 3) / 2, rows = Ho - 2 * pad, cols = Wo - 2 * pad;
    uint64_t sr = pad + (rows - O) / 2, sc = pad + (cols - I) / 2;
    for (uint64_t y = 0; y < O; y++)
        for (uint64_t x = 0; x < I; x++)
            d[y * I + x] = Y[(sr + y) * Wo + sc + x];
    free(S);
    free(Y);
    free(perm);
    return d;
}

/* ---- GLORA (docs/adapter-types.md): W + W ⊙ A + B, A and B low-rank / column / scalar / full ---- */
enum { GL_LORA, GL_VECTOR, GL_CONSTANT, GL_NONE };

static void glora_path(mt_ctx *c, mt_mod *m, char which, int kind, int r, double sd, int bad)
{
    char n1[64], n2[64];
    snprintf(n1, sizeof n1, "glora_%c.%s", which, kind == GL_LORA ? "Xd" : kind == GL_NONE ? "zeros" : "X");
    snprintf(n2, sizeof n2, "glora_%c.Xu", which);
    if (kind == GL_LORA) {
        mt_part(c, m, n1, SH(m->O, (uint64_t)r), 0, sd);
        mt_part(c, m, n2, SH((uint64_t)r, m->I + (uint64_t)bad), 0, sd);
    } else if (kind == GL_VECTOR)
        mt_part(c, m, n1, SH(m->O, 1), 0, sd);
    else if (kind == GL_CONSTANT)
        mt_part(c, m, n1, SH(1), 0, sd);
    else
        mt_part(c, m, n1, SH(m->O, m->I), 0, sd);
}

/* q[0]: the form of A and B; r: the rank of the lora form */
static void glora(mt_ctx *c, mt_mod *m, int kind, int r)
{
    m->q[0] = kind;
    m->r = r;
    glora_path(c, m, 'A', kind, r, kind == GL_LORA ? 0.3 : 0.2, 0);
    glora_path(c, m, 'B', kind, r, kind == GL_LORA ? 0.15 : 0.05, 0);
    if (m->b >= 0) { /* PEFT's empty C, D, E paths on a layer with a bias: zero buffers */
        mt_part(c, m, "glora_C.zeros", SH(m->I, 1), 0, 0);
        mt_part(c, m, "glora_D.zeros", SH(m->O), 0, 0);
        mt_part(c, m, "glora_E.zeros", SH(m->O), 0, 0);
    }
}

static void gen_glora(mt_ctx *c)
{
    glora(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 1), GL_LORA, 3);
    glora(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), GL_LORA, 3);
}

static void gen_glora_vector(mt_ctx *c) { glora(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), GL_VECTOR, 0); }
static void gen_glora_constant(mt_ctx *c) { glora(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), GL_CONSTANT, 0); }
static void gen_glora_none(mt_ctx *c) { glora(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), GL_NONE, 0); }

static void bad_glora(mt_ctx *c) /* glora_A.Xu one column too many */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0);
    glora_path(c, m, 'A', GL_LORA, 3, 0.3, 1);
    glora_path(c, m, 'B', GL_LORA, 3, 0.1, 0);
}

/* element e = o * I + i of A or B */
static double glora_at(const mt_ctx *c, const mt_mod *m, char which, uint64_t o, uint64_t i)
{
    char n1[64], n2[64];
    snprintf(n1, sizeof n1, "glora_%c.%s", which, m->q[0] == GL_LORA ? "Xd" : m->q[0] == GL_NONE ? "zeros" : "X");
    snprintf(n2, sizeof n2, "glora_%c.Xu", which);
    const double *x = mt_get(c, m, n1);
    switch (m->q[0]) {
    case GL_LORA: {
        const double *xu = mt_get(c, m, n2);
        double s = 0;
        for (int q = 0; q < m->r; q++)
            s += x[o * (uint64_t)m->r + (uint64_t)q] * xu[(uint64_t)q * m->I + i];
        return s;
    }
    case GL_VECTOR: return x[o];
    case GL_CONSTANT: return x[0];
    default: return x[o * m->I + i];
    }
}

static double *delta_glora(const mt_ctx *c, const mt_mod *m)
{
    double *w = mt_W(c, m);
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            w[o * m->I + i] = w[o * m->I + i] * glora_at(c, m, 'A', o, i) + glora_at(c, m, 'B', o, i);
    return w;
}

/* ---- DEFT (docs/adapter-types.md): W + P (s R - relu(P)^T W), relu decomposition; para: no R ---- */
static void deft(mt_ctx *c, mt_mod *m, int r, double s, int para)
{
    m->r = r;
    m->p = s; /* the injection scaling (alpha / r, or 1) */
    m->q[0] = para;
    mt_part(c, m, "deft_P", SH(m->O, (uint64_t)r), 0, 0.3);
    if (!para)
        mt_part(c, m, "deft_R", SH((uint64_t)r, m->I), 0, 0.1);
}

static void gen_deft(mt_ctx *c)
{
    deft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 3, 1.0, 0);
    deft(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0), 3, 1.0, 0);
}

static void gen_deft_alpha(mt_ctx *c) /* alpha 6, r 4: s = 1.5 */
{
    deft(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 4, 1.5, 0);
}

static void gen_deft_para(mt_ctx *c) { deft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 3, 1.0, 1); }

static void gen_deft_qr(mt_ctx *c) /* decomposition_method "qr", alpha 6, r 4 (s = 1.5); a Conv1D */
{
    deft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 4, 1.5, 0);
    deft(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0), 4, 1.5, 0);
    c->mod[0].q[1] = c->mod[1].q[1] = 1;
}

/* the Q [n, r] of P [n, r]'s reduced QR by Householder reflections with LAPACK's convention (dlarfg:
 * beta = -sign(alpha) |x|, no reflection when the part below the diagonal is zero), accumulated as
 * orgqr forms it: Q = H_0 ... H_{r-1} I[:, :r].  torch.linalg.qr's Q (its signs matter: Q R) */
static double *householder_q(const double *P, uint64_t n, uint64_t r)
{
    double *A = malloc(n * r * sizeof(double)), *V = calloc(n * r, sizeof(double)), *tau = calloc(r, sizeof(double));
    memcpy(A, P, n * r * sizeof(double));
    for (uint64_t j = 0; j < r; j++) {
        double alpha = A[j * r + j], xn = 0;
        for (uint64_t i = j + 1; i < n; i++)
            xn += A[i * r + j] * A[i * r + j];
        if (xn == 0)
            continue; /* H_j = I */
        double beta = -copysign(sqrt(alpha * alpha + xn), alpha);
        tau[j] = (beta - alpha) / beta;
        V[j * r + j] = 1;
        for (uint64_t i = j + 1; i < n; i++)
            V[i * r + j] = A[i * r + j] / (alpha - beta);
        for (uint64_t c = j; c < r; c++) { /* A <- (I - tau v vᵀ) A */
            double d = 0;
            for (uint64_t i = j; i < n; i++)
                d += V[i * r + j] * A[i * r + c];
            for (uint64_t i = j; i < n; i++)
                A[i * r + c] -= tau[j] * V[i * r + j] * d;
        }
    }
    double *Q = calloc(n * r, sizeof(double));
    for (uint64_t c = 0; c < r; c++)
        Q[c * r + c] = 1;
    for (uint64_t jj = r; jj-- > 0;) /* Q <- H_j Q, last reflection first */
        for (uint64_t c = 0; c < r; c++) {
            double d = 0;
            for (uint64_t i = jj; i < n; i++)
                d += V[i * r + jj] * Q[i * r + c];
            for (uint64_t i = jj; i < n; i++)
                Q[i * r + c] -= tau[jj] * V[i * r + jj] * d;
        }
    free(A);
    free(V);
    free(tau);
    return Q;
}

static void bad_deft(mt_ctx *c) /* deft_R with one row too many */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0);
    mt_part(c, m, "deft_P", SH(37, 3), 0, 0.3);
    mt_part(c, m, "deft_R", SH(4, 43), 0, 0.1);
}

static double *delta_deft(const mt_ctx *c, const mt_mod *m)
{
    const double *P = mt_get(c, m, "deft_P"), *R = m->q[0] ? NULL : mt_get(c, m, "deft_R");
    double *w = mt_W(c, m), *d = calloc(m->O * m->I, sizeof(double));
    uint64_t r = (uint64_t)m->r;
    double *Q = m->q[1] ? householder_q(P, m->O, r) : NULL; /* qr: Q_P = right = Q */
    double *inj = calloc(r * m->I, sizeof(double)); /* s R - relu(P)^T W */
    for (uint64_t q = 0; q < r; q++)
        for (uint64_t i = 0; i < m->I; i++) {
            double f = 0;
            for (uint64_t o = 0; o < m->O; o++)
                f += (Q ? Q[o * r + q] : fmax(P[o * r + q], 0.0)) * w[o * m->I + i];
            inj[q * m->I + i] = (R ? m->p * R[q * m->I + i] : 0.0) - f;
        }
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            for (uint64_t q = 0; q < r; q++)
                d[o * m->I + i] += (Q ? Q[o * r + q] : P[o * r + q]) * inj[q * m->I + i];
    free(inj);
    free(Q);
    free(w);
    return d;
}

/* ---- OFT (§5.6): W @ blockdiag(R_j)^T, R_j the Cayley-Neumann series or the exact Cayley
 * transform of the skew block (coft: projected onto a ball of radius eps/sqrt(#rows) first) ------- */
enum { OFT_EXACT = 1, OFT_COFT = 2, OFT_SHARE = 4 };

static void oft(mt_ctx *c, mt_mod *m, int bs, int flags, int terms, double eps, uint64_t bad)
{
    uint64_t nb = m->I / (uint64_t)bs, ne = (uint64_t)(bs * (bs - 1) / 2);
    m->r = bs;
    m->q[0] = flags;
    m->q[1] = terms;
    m->p = eps;
    mt_t *t = mt_part(c, m, "oft_R.weight", SH((flags & OFT_SHARE) ? 1 : nb, ne - bad), 0, 0.1);
    if (flags & OFT_COFT) /* block norms on both sides of eps' */
        for (uint64_t j = 0; j < t->shape[0]; j++) {
            double f = pow(10, -2.5 + 1.5 * (th_rand_uniform(&c->rng) + 1) / 2);
            for (uint64_t e = 0; e < ne; e++)
                mt_set(t, j * ne + e, f * th_rand_normal(&c->rng));
        }
}

/* block size 5; q_proj has 9 blocks, v_proj 7 */
static void gen_oft_f(mt_ctx *c, int flags, int terms, double eps)
{
    oft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 45, 0), 5, flags, terms, eps, 0);
    oft(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 35, 0), 5, flags, terms, eps, 0);
}

static void gen_oft(mt_ctx *c) { gen_oft_f(c, 0, 5, 6e-5); }
static void gen_oft_exact(mt_ctx *c) { gen_oft_f(c, OFT_EXACT, 5, 6e-5); }
static void gen_oft_coft(mt_ctx *c) { gen_oft_f(c, OFT_COFT, 3, 0.2); }
static void gen_oft_share(mt_ctx *c) { gen_oft_f(c, OFT_SHARE | OFT_EXACT, 5, 6e-5); }
/* Conv2d kernels seen as [o, i*k*k] (PEFT's OFT Conv2d): a 3x3 [7, 5, 3, 3] (9 blocks of 5) and a 1x1 */
static void gen_oft_conv(mt_ctx *c)
{
    oft(c, mt_conv(c, "unet.conv_in", 7, 5, 3), 5, 0, 5, 6e-5, 0);
    oft(c, mt_conv(c, "unet.proj", 6, 10, 1), 5, 0, 5, 6e-5, 0);
}
static void bad_oft(mt_ctx *c) { oft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 45, 0), 5, 0, 5, 6e-5, 1); }

/* I + 2Q + 2Q^2 ... as PEFT's _cayley_batch sums it */
static double *oft_neumann(const double *q, int n, int terms)
{
    uint64_t nn = (uint64_t)n;
    double *r = calloc(nn * nn, sizeof(double)), *p = NULL;
    for (uint64_t a = 0; a < nn; a++)
        r[a * nn + a] = 1;
    if (terms > 1)
        for (uint64_t e = 0; e < nn * nn; e++)
            r[e] += 2 * q[e];
    if (terms > 2) {
        p = mt_mm(q, q, nn, nn, nn);
        for (uint64_t e = 0; e < nn * nn; e++)
            r[e] += 2 * p[e];
        for (int k = 3; k < terms - 1; k++) {
            double *p2 = mt_mm(p, q, nn, nn, nn);
            free(p);
            p = p2;
            for (uint64_t e = 0; e < nn * nn; e++)
                r[e] += 2 * p[e];
        }
        double *p2 = mt_mm(p, q, nn, nn, nn);
        for (uint64_t e = 0; e < nn * nn; e++)
            r[e] += p2[e];
        free(p2);
        free(p);
    }
    return r;
}

static void ref_oft(mt_ctx *c)
{
    for (int k = 0; k < c->nm; k++) {
        const mt_mod *m = &c->mod[k];
        const mt_t *t = mt_opt(c, m, "oft_R.weight");
        cr_assert_not_null(t);
        int bs = m->r, nb = (int)(m->I / (uint64_t)bs);
        uint64_t ne = t->shape[1];
        double **rot = calloc((size_t)nb, sizeof *rot), *q = malloc((size_t)(bs * bs) * sizeof(double));
        for (int j = 0; j < nb; j++) {
            const double *v = t->v + (t->shape[0] == 1 ? 0 : (uint64_t)j) * ne;
            memset(q, 0, (size_t)(bs * bs) * sizeof(double));
            int e = 0;
            for (int a = 0; a < bs; a++)
                for (int b = a + 1; b < bs; b++, e++) {
                    q[a * bs + b] = v[e];
                    q[b * bs + a] = -v[e];
                }
            if (m->q[0] & OFT_COFT) {
                double lim = m->p / sqrt((double)t->shape[0]), n2 = 0;
                for (int x = 0; x < bs * bs; x++)
                    n2 += q[x] * q[x];
                if (sqrt(n2) > lim)
                    for (int x = 0; x < bs * bs; x++)
                        q[x] *= lim / sqrt(n2);
            }
            rot[j] = (m->q[0] & OFT_EXACT) ? mt_cayley(q, bs) : oft_neumann(q, bs, m->q[1]);
        }
        double *w = mt_W(c, m);
        mt_rotate_blocks(w, m->O, m->I, bs, rot);
        mt_setW(c, m, w);
        for (int j = 0; j < nb; j++)
            free(rot[j]);
        free(rot);
        free(q);
        free(w);
    }
}

/* ---- BOFT (§5.7), one butterfly factor: (W @ blockdiag(Cayley(skew(R_j)))^T) ⊙ s_row ----------- */
static void boft(mt_ctx *c, mt_mod *m, uint64_t s_short)
{
    m->r = 5;
    mt_part(c, m, "boft_R", SH(1, m->I / 5, 5, 5), 0, 0.1);
    mt_part(c, m, "boft_s", SH(m->O - s_short, 1), 1, 0.1);
}

static void gen_boft(mt_ctx *c)
{
    boft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 45, 0), 0);
    boft(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 35, 0), 0);
}

static void bad_boft(mt_ctx *c) { boft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 45, 0), 1); }

static void ref_boft(mt_ctx *c)
{
    for (int k = 0; k < c->nm; k++) {
        const mt_mod *m = &c->mod[k];
        int bs = m->r, nb = (int)(m->I / (uint64_t)bs);
        const double *R = mt_get(c, m, "boft_R"), *s = mt_get(c, m, "boft_s");
        double **rot = calloc((size_t)nb, sizeof *rot), *sk = malloc((size_t)(bs * bs) * sizeof(double));
        for (int j = 0; j < nb; j++) {
            const double *x = R + (size_t)j * (size_t)(bs * bs);
            for (int a = 0; a < bs; a++)
                for (int b = 0; b < bs; b++)
                    sk[a * bs + b] = 0.5 * (x[a * bs + b] - x[b * bs + a]);
            rot[j] = mt_cayley(sk, bs);
        }
        double *w = mt_W(c, m);
        mt_rotate_blocks(w, m->O, m->I, bs, rot);
        for (uint64_t o = 0; o < m->O; o++)
            for (uint64_t i = 0; i < m->I; i++)
                w[o * m->I + i] *= s[o];
        mt_setW(c, m, w);
        for (int j = 0; j < nb; j++)
            free(rot[j]);
        free(rot);
        free(sk);
        free(w);
    }
}

/* ---- HRA (§5.11): W @ (I - 2u_0u_0^T)...(I - 2u_{r-1}u_{r-1}^T), or W @ (I - 2QQ^T) with
 * Gram-Schmidt ------------------------------------------------------------------------------------ */
static void hra(mt_ctx *c, mt_mod *m, int r, int gs, uint64_t bad)
{
    m->r = r;
    m->q[0] = gs;
    mt_part(c, m, "hra_u", SH(m->I - bad, (uint64_t)r), 0, 1);
}

static void gen_hra_gs(mt_ctx *c, int r, int gs)
{
    hra(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), r, gs, 0);
    hra(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), r, gs, 0);
}

static void gen_hra(mt_ctx *c) { gen_hra_gs(c, 4, 0); }
static void gen_hra_gram_schmidt(mt_ctx *c) { gen_hra_gs(c, 3, 1); }
/* Conv2d kernels seen as [o, i*k*k] (PEFT's HRAConv2d), ranks 4 and 3 (rank_pattern) */
static void gen_hra_conv(mt_ctx *c)
{
    hra(c, mt_conv(c, "unet.conv_in", 7, 5, 3), 4, 0, 0);
    hra(c, mt_conv(c, "unet.conv_out", 4, 6, 3), 3, 0, 0);
}
static void bad_hra(mt_ctx *c) { hra(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 4, 0, 1); }

static void ref_hra(mt_ctx *c)
{
    for (int k = 0; k < c->nm; k++) {
        const mt_mod *m = &c->mod[k];
        uint64_t r = (uint64_t)m->r, n = m->I;
        const double *U = mt_get(c, m, "hra_u");
        double *u = malloc(r * n * sizeof(double)); /* u[j*n + i]: normalised (or orthonormalised) columns */
        for (uint64_t j = 0; j < r; j++) {
            for (uint64_t i = 0; i < n; i++)
                u[j * n + i] = U[i * r + j];
            if (m->q[0])
                for (uint64_t l = 0; l < j; l++) {
                    double dot = 0;
                    for (uint64_t i = 0; i < n; i++)
                        dot += u[l * n + i] * U[i * r + j];
                    for (uint64_t i = 0; i < n; i++)
                        u[j * n + i] -= dot * u[l * n + i];
                }
            double n2 = 0;
            for (uint64_t i = 0; i < n; i++)
                n2 += u[j * n + i] * u[j * n + i];
            for (uint64_t i = 0; i < n; i++)
                u[j * n + i] /= sqrt(n2);
        }
        double *w = mt_W(c, m), *dots = malloc(r * sizeof(double));
        for (uint64_t o = 0; o < m->O; o++) {
            double *x = w + o * n;
            if (m->q[0]) { /* x (I - 2 Q Q^T) */
                for (uint64_t j = 0; j < r; j++) {
                    dots[j] = 0;
                    for (uint64_t i = 0; i < n; i++)
                        dots[j] += x[i] * u[j * n + i];
                }
                for (uint64_t j = 0; j < r; j++)
                    for (uint64_t i = 0; i < n; i++)
                        x[i] -= 2 * dots[j] * u[j * n + i];
            } else { /* x H_0 H_1 ... */
                for (uint64_t j = 0; j < r; j++) {
                    double dot = 0;
                    for (uint64_t i = 0; i < n; i++)
                        dot += x[i] * u[j * n + i];
                    for (uint64_t i = 0; i < n; i++)
                        x[i] -= 2 * dot * u[j * n + i];
                }
            }
        }
        mt_setW(c, m, w);
        free(w);
        free(u);
        free(dots);
    }
}

/* ---- ROAD (§5.14; layer.py _prepare_cols): R @ W and R @ b, 2x2 rotations of output rows p and
 * p + g/2 inside each group of g rows --------------------------------------------------------------- */
static void road(mt_ctx *c, mt_mod *m, int variant, int g, uint64_t bad)
{
    uint64_t n = variant == 1 ? m->O / 2 : variant == 2 ? m->O : 2 * m->O;
    m->q[0] = variant;
    m->q[1] = g;
    mt_part(c, m, "road_theta", SH(n - bad), 0, 0.4);
    mt_part(c, m, "road_alpha", SH(n), 1, 0.2);
}

static void gen_road_v(mt_ctx *c, int variant, int g)
{
    road(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 36, 43, 1), variant, g, 0);
    road(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, g == 6 ? 42 : 24, 97, 0), variant, g, 0);
}

static void gen_road_1(mt_ctx *c) { gen_road_v(c, 1, 4); }
static void gen_road_2(mt_ctx *c) { gen_road_v(c, 2, 6); }
static void gen_road_4(mt_ctx *c) { gen_road_v(c, 4, 4); }
static void bad_road(mt_ctx *c) { road(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 36, 43, 1), 1, 4, 1); }

/* x_new[p] = c_p x[p] - s_p x[q], x_new[q] = c_q x[q] + s_q x[p] on rows of length len */
static void road_rotate(double *x, uint64_t O, uint64_t len, uint64_t g, const double *cs, const double *sn)
{
    uint64_t h = g / 2;
    double *tmp = malloc(2 * len * sizeof(double));
    for (uint64_t g0 = 0; g0 < O; g0 += g)
        for (uint64_t k = 0; k < h; k++) {
            uint64_t p = g0 + k, q = p + h;
            for (uint64_t i = 0; i < len; i++) {
                tmp[i] = cs[p] * x[p * len + i] - sn[p] * x[q * len + i];
                tmp[len + i] = cs[q] * x[q * len + i] + sn[q] * x[p * len + i];
            }
            memcpy(x + p * len, tmp, len * sizeof(double));
            memcpy(x + q * len, tmp + len, len * sizeof(double));
        }
    free(tmp);
}

static void ref_road(mt_ctx *c)
{
    for (int k = 0; k < c->nm; k++) {
        const mt_mod *m = &c->mod[k];
        uint64_t g = (uint64_t)m->q[1], h = g / 2;
        const double *th = mt_get(c, m, "road_theta"), *al = mt_get(c, m, "road_alpha");
        double *cs = malloc(m->O * sizeof(double)), *sn = malloc(m->O * sizeof(double));
        for (uint64_t y = 0; y < m->O; y++) {
            uint64_t gi = y / g, x = y % g, ic = y, is = y;
            if (m->q[0] == 1)
                ic = is = gi * h + x % h;
            else if (m->q[0] == 4) {
                ic = gi * 2 * g + x;
                is = ic + g;
            }
            cs[y] = al[ic] * cos(th[ic]);
            sn[y] = al[is] * sin(th[is]);
        }
        double *w = mt_W(c, m);
        road_rotate(w, m->O, m->I, g, cs, sn);
        mt_setW(c, m, w);
        if (m->b >= 0)
            road_rotate(mt_ref_of(c, m->b), m->O, 1, g, cs, sn);
        free(w);
        free(cs);
        free(sn);
    }
}

/* ---- SHIRA (§5.14): W[idx[0,t], idx[1,t]] += w[t], repeated indices add up ---------------------- */
static void shira(mt_ctx *c, mt_mod *m, uint64_t nnz, int bad)
{
    mt_t *idx = mt_part(c, m, "shira_indices", SH(2, nnz), 0, 0);
    snprintf(idx->dtype, sizeof idx->dtype, "I32");
    for (uint64_t t = 0; t < nnz; t++) {
        mt_set(idx, t, (double)(th_rand_u64(&c->rng) % m->O));
        mt_set(idx, nnz + t, (double)(th_rand_u64(&c->rng) % m->I));
    }
    for (uint64_t t = 7; t < nnz; t += 11) { /* some repeated positions */
        idx->v[t] = idx->v[t - 4];
        idx->v[nnz + t] = idx->v[nnz + t - 4];
    }
    if (bad)
        idx->v[5] = (double)m->O;
    mt_part(c, m, "shira_weight", SH(nnz), 0, 0.05);
}

static void gen_shira(mt_ctx *c)
{
    shira(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 60, 0);
    shira(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 40, 0);
}

static void bad_shira(mt_ctx *c) { shira(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 60, 1); }

static double *delta_shira(const mt_ctx *c, const mt_mod *m)
{
    const mt_t *idx = mt_opt(c, m, "shira_indices");
    const double *w = mt_get(c, m, "shira_weight");
    cr_assert_not_null(idx);
    uint64_t nnz = idx->shape[1];
    double *d = calloc(m->O * m->I, sizeof(double));
    for (uint64_t t = 0; t < nnz; t++)
        d[(uint64_t)idx->v[t] * m->I + (uint64_t)idx->v[nnz + t]] += w[t];
    return d;
}

/* ---- SUPERTUNING (docs/adapter-types.md): W.flat[idx[t]] += v[t] (repeats add up), + 5/3 B @ A ---- */
static void supertuning(mt_ctx *c, mt_mod *m, uint64_t n, int lora, int bad)
{
    mt_t *idx = mt_part(c, m, "supertuning_indices", SH(n), 0, 0);
    snprintf(idx->dtype, sizeof idx->dtype, "%s", m->O == 37 ? "I32" : "I64");
    for (uint64_t t = 0; t < n; t++)
        mt_set(idx, t, (double)(th_rand_u64(&c->rng) % (m->O * m->I)));
    for (uint64_t t = 7; t < n; t += 11) /* some repeated positions */
        idx->v[t] = idx->v[t - 4];
    idx->v[n - 1] = (double)(m->O * m->I - 1); /* the last element */
    if (bad)
        idx->v[5] = (double)(m->O * m->I);
    mt_part(c, m, "supertuning_values", SH(n), 0, 0.05);
    if (lora) {
        mt_part(c, m, "supertuning_lora_A.weight", SH(3, m->I), 0, 0.1);
        mt_part(c, m, "supertuning_lora_B.weight", SH(m->O, 3), 0, 0.1);
    }
}

static void gen_supertuning_k(mt_ctx *c, int lora)
{
    supertuning(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 60, lora, 0);
    supertuning(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 40, lora, 0);
}

static void gen_supertuning(mt_ctx *c) { gen_supertuning_k(c, 0); }
static void gen_supertuning_lora(mt_ctx *c) { gen_supertuning_k(c, 1); }
static void bad_supertuning(mt_ctx *c)
{
    supertuning(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 60, 0, 1);
}

static double *delta_supertuning(const mt_ctx *c, const mt_mod *m)
{
    const mt_t *idx = mt_opt(c, m, "supertuning_indices");
    const double *v = mt_get(c, m, "supertuning_values");
    cr_assert_not_null(idx);
    double *d = calloc(m->O * m->I, sizeof(double));
    for (uint64_t t = 0; t < idx->shape[0]; t++)
        d[(uint64_t)idx->v[t]] += v[t];
    const mt_t *A = mt_opt(c, m, "supertuning_lora_A.weight"), *B = mt_opt(c, m, "supertuning_lora_B.weight");
    for (uint64_t o = 0; A != NULL && B != NULL && o < m->O; o++) /* the variant's lora_alpha 5, r 3 */
        for (uint64_t i = 0; i < m->I; i++)
            for (uint64_t j = 0; j < 3; j++)
                d[o * m->I + i] += 5.0 / 3.0 * B->v[o * 3 + j] * A->v[j * m->I + i];
    return d;
}

/* ---- PEANUT (docs/adapter-types.md): ΔW = s · B act-chain(W^T A^T)^T, from the base weight ----------- */
static void peanut(mt_ctx *c, mt_mod *m, int depth, int gelu, double scaling, int bad)
{
    m->r = 3;
    m->q[0] = depth;
    m->q[1] = gelu;
    m->p = scaling;
    mt_part(c, m, "peanut_A.weight", SH(3, m->O), 0, 0.3);
    mt_part(c, m, "peanut_B.weight", SH(m->O, 3), 0, 0.3);
    for (int k = 0; k < depth; k++) {
        char n[64];
        snprintf(n, sizeof n, "peanut_encoders.%d.weight", k);
        if (!(bad && k == 1))
            mt_part(c, m, n, SH(3, 3), 0, 0.6);
        snprintf(n, sizeof n, "peanut_decoders.%d.weight", k);
        mt_part(c, m, n, SH(3, 3), 0, 0.6);
    }
}

static void gen_peanut(mt_ctx *c)
{
    peanut(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 0, 0, 1.0, 0);
    peanut(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 0, 0, 1.0, 0);
}

static void gen_peanut_deep(mt_ctx *c)
{
    peanut(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 2, 1, 0.7, 0);
    peanut(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 2, 1, 0.7, 0);
}

static void bad_peanut(mt_ctx *c) /* depth 2 without peanut_encoders.1 */
{
    peanut(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 2, 1, 0.7, 1);
}

static double peanut_act(int gelu, double x) { return gelu ? 0.5 * x * (1.0 + erf(x / sqrt(2.0))) : (x > 0 ? x : 0); }

/* y [I, 3] = act(x [I, 3] @ M^T) for M [3, 3] */
static void peanut_lin(const double *x, const double *M, double *y, uint64_t I, int gelu)
{
    for (uint64_t i = 0; i < I; i++)
        for (int q = 0; q < 3; q++) {
            double acc = 0;
            for (int j = 0; j < 3; j++)
                acc += x[i * 3 + j] * M[q * 3 + j];
            y[i * 3 + q] = peanut_act(gelu, acc);
        }
}

static double *delta_peanut(const mt_ctx *c, const mt_mod *m)
{
    const double *W = c->base[m->w].v, *A = mt_get(c, m, "peanut_A.weight"), *B = mt_get(c, m, "peanut_B.weight");
    int depth = m->q[0], gelu = m->q[1];
    double *res = calloc((size_t)(depth + 2) * m->I * 3, sizeof(double));
    double *h = res + (size_t)depth * m->I * 3, *t = h + m->I * 3;
    for (uint64_t i = 0; i < m->I; i++) /* h = act(W^T @ A^T) */
        for (int q = 0; q < 3; q++) {
            double acc = 0;
            for (uint64_t o = 0; o < m->O; o++)
                acc += W[o * m->I + i] * A[q * m->O + o];
            h[i * 3 + q] = peanut_act(gelu, acc);
        }
    for (int k = 0; k < depth; k++) {
        char n[64];
        snprintf(n, sizeof n, "peanut_encoders.%d.weight", k);
        memcpy(res + (size_t)k * m->I * 3, h, m->I * 3 * sizeof(double));
        peanut_lin(h, mt_get(c, m, n), t, m->I, gelu);
        memcpy(h, t, m->I * 3 * sizeof(double));
    }
    for (int k = 0; k < depth; k++) {
        char n[64];
        snprintf(n, sizeof n, "peanut_decoders.%d.weight", k);
        peanut_lin(h, mt_get(c, m, n), t, m->I, gelu);
        for (uint64_t e = 0; e < m->I * 3; e++)
            h[e] = t[e] + res[(size_t)(depth - 1 - k) * m->I * 3 + e];
    }
    double *d = calloc(m->O * m->I, sizeof(double)); /* (h @ B^T)^T · scaling */
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            for (int q = 0; q < 3; q++)
                d[o * m->I + i] += m->p * h[i * 3 + q] * B[o * 3 + q];
    free(res);
    return d;
}

/* ---- TINYLORA (docs/adapter-types.md): B (Σ_k v_g[k] P[k]) A, v_g the group of PEFT's layer index --- */
/* torch.normal(0, 1/sqrt(r), (u, r, r), manual_seed(seed)) written from torch's CPU kernel: uniform
 * floats (low 24 bits), Box-Muller per block of 16, the last 16 drawn again when 16 does not divide n;
 * in double here (the tool computes in float: they agree to ~1e-6) */
static void tl_normal(uint32_t seed, uint64_t n, double sd, double *out)
{
    mt19937 g;
    mt19937_seed(&g, seed);
    for (uint64_t i = 0; i < n; i++)
        out[i] = (double)(mt19937_next(&g) & 0xffffffu) / 16777216.0;
    for (uint64_t b = 0; b < n; b += 16) {
        double *d = b + 16 <= n ? out + b : out + n - 16;
        if (b + 16 > n) {
            if (n % 16 == 0)
                break;
            for (int i = 0; i < 16; i++)
                d[i] = (double)(mt19937_next(&g) & 0xffffffu) / 16777216.0;
        }
        for (int j = 0; j < 8; j++) {
            double rad = sqrt(-2.0 * log(1.0 - d[j])), th = 2.0 * M_PI * d[j + 8];
            d[j] = rad * cos(th) * sd;
            d[j + 8] = rad * sin(th) * sd;
        }
    }
}

static void tinylora(mt_ctx *c, mt_mod *m, int r, int u, int layer, int group, int bad)
{
    m->r = r;
    m->q[0] = group;
    mt_part(c, m, "tinylora_A", SH((uint64_t)r, m->I), 0, 0.3);
    mt_part(c, m, "tinylora_B", SH(m->O, (uint64_t)r), 0, 0.3);
    mt_t *P = mt_part(c, m, "tinylora_P", SH((uint64_t)u, (uint64_t)r, (uint64_t)r), 0, 1);
    double *v = malloc(P->n * sizeof(double));
    tl_normal(7u + (uint32_t)layer + (bad ? 5u : 0u), P->n, 1.0 / sqrt((double)r), v); /* projection_seed 7 */
    for (uint64_t e = 0; e < P->n; e++)
        mt_set(P, e, v[e]);
    free(v);
}

/* PEFT's layer order q_proj (0), down_proj (1), c_attn (2) is not the names' order */
static void gen_tinylora_k(mt_ctx *c, int r, int u, const int *group, int bad)
{
    mt_mod *m[3] = {mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0),
                    mt_module(c, "model.layers.0.mlp.down_proj", LIN, 33, 45, 0),
                    mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0)};
    for (int k = 0; k < 3; k++)
        tinylora(c, m[k], r, u, k, group[k], bad && k == 1);
    for (int g = 0; g <= group[2]; g++) {
        char n[64];
        snprintf(n, sizeof n, "base_model.tinylora_v.%d", g);
        mt_key(c, n, NULL, SH((uint64_t)u), 0, 0.5);
    }
}

/* weight_tying 0: a group per layer; 0.5: round(1.5) = 2 groups (Python rounds halves to even), of 1 */
static void gen_tinylora(mt_ctx *c) { gen_tinylora_k(c, 2, 16, (const int[]){0, 1, 2}, 0); }
static void gen_tinylora_tied(mt_ctx *c) { gen_tinylora_k(c, 3, 3, (const int[]){0, 1, 1}, 0); }
static void bad_tinylora(mt_ctx *c) { gen_tinylora_k(c, 2, 16, (const int[]){0, 1, 2}, 1); }

static double *delta_tinylora(const mt_ctx *c, const mt_mod *m)
{
    uint64_t r = (uint64_t)m->r;
    char n[64];
    snprintf(n, sizeof n, "base_model.tinylora_v.%d", m->q[0]);
    const mt_t *v = mt_find(c, n), *P = mt_opt(c, m, "tinylora_P");
    const double *A = mt_get(c, m, "tinylora_A"), *B = mt_get(c, m, "tinylora_B");
    cr_assert(v && P);
    double R[9] = {0};
    for (uint64_t k = 0; k < v->n; k++)
        for (uint64_t e = 0; e < r * r; e++)
            R[e] += v->v[k] * P->v[k * r * r + e];
    double *d = calloc(m->O * m->I, sizeof(double));
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            for (uint64_t j = 0; j < r; j++)
                for (uint64_t q = 0; q < r; q++)
                    d[o * m->I + i] += B[o * r + j] * R[j * r + q] * A[q * m->I + i];
    return d;
}

/* ---- ADAMSS (docs/adapter-types.md): rows of subspace k += B_k A_k newB, the rows from KMeans ---- */
/* The reference clusters as PEFT does, written here from torch's svd_lowrank algebra and sklearn's
 * KMeans: U = [W | b] V / |.| (wide) or [W | b] ([W | b]ᵀ [W | b])⁻¹ V / |.| (square, tall: normal
 * equations by Gauss-Jordan), rounded to float; centered; initial centers from numpy's legacy
 * RandomState(123456789).choice(n, K, replace=False, p=uniform) (MT19937, 53-bit doubles, the
 * cumulated p searched, duplicates dropped, chosen entries zeroed); Lloyd for at most 10 rounds
 * (strict convergence on unchanged labels, else the summed squared center shift against 1e-4 x the
 * mean feature variance), then the labels of the last centers.  The rows of X V are drawn around
 * K well-separated points, so that no label is a near tie. */
static double as_udouble(mt19937 *g)
{
    uint32_t a = mt19937_next(g) >> 5, b = mt19937_next(g) >> 6;
    return (a * 67108864.0 + b) / 9007199254740992.0;
}

static void as_labels(const double *Wa, uint64_t m, uint64_t n, const double *V, uint64_t q, int K, int *lab)
{
    double *U = calloc(m * q, sizeof(double));
    if (m < n) {
        for (uint64_t i = 0; i < m; i++)
            for (uint64_t j = 0; j < q; j++)
                for (uint64_t t = 0; t < n; t++)
                    U[i * q + j] += Wa[i * n + t] * V[t * q + j];
    } else { /* Y = (WᵀW)⁻¹ V by Gauss-Jordan on [WᵀW | V], then U = W Y */
        uint64_t w = n + q;
        double *G = calloc(n * w, sizeof(double));
        for (uint64_t a = 0; a < n; a++) {
            for (uint64_t b = 0; b < n; b++)
                for (uint64_t i = 0; i < m; i++)
                    G[a * w + b] += Wa[i * n + a] * Wa[i * n + b];
            for (uint64_t j = 0; j < q; j++)
                G[a * w + n + j] = V[a * q + j];
        }
        for (uint64_t c = 0; c < n; c++) {
            uint64_t p = c;
            for (uint64_t r = c + 1; r < n; r++)
                if (fabs(G[r * w + c]) > fabs(G[p * w + c]))
                    p = r;
            for (uint64_t k = 0; k < w; k++) {
                double t = G[c * w + k];
                G[c * w + k] = G[p * w + k];
                G[p * w + k] = t;
            }
            double d = G[c * w + c];
            for (uint64_t k = 0; k < w; k++)
                G[c * w + k] /= d;
            for (uint64_t r = 0; r < n; r++)
                if (r != c) {
                    double f = G[r * w + c];
                    for (uint64_t k = 0; k < w; k++)
                        G[r * w + k] -= f * G[c * w + k];
                }
        }
        for (uint64_t i = 0; i < m; i++)
            for (uint64_t j = 0; j < q; j++)
                for (uint64_t t = 0; t < n; t++)
                    U[i * q + j] += Wa[i * n + t] * G[t * w + n + j];
        free(G);
    }
    for (uint64_t j = 0; j < q; j++) {
        double s = 0;
        for (uint64_t i = 0; i < m; i++)
            s += U[i * q + j] * U[i * q + j];
        for (uint64_t i = 0; i < m; i++)
            U[i * q + j] = (double)(float)(U[i * q + j] / sqrt(s));
    }
    double tol = 0;
    for (uint64_t j = 0; j < q; j++) {
        double mu = 0, v = 0;
        for (uint64_t i = 0; i < m; i++)
            mu += U[i * q + j] / (double)m;
        for (uint64_t i = 0; i < m; i++) {
            U[i * q + j] -= mu;
            v += U[i * q + j] * U[i * q + j] / (double)m;
        }
        tol += v * 1e-4 / (double)q;
    }
    /* RandomState(123456789).choice(m, K, replace=False, p=ones/m) */
    mt19937 g;
    mt19937_seed(&g, 123456789u);
    double *p = malloc(m * sizeof(double)), *cdf = malloc(m * sizeof(double));
    for (uint64_t i = 0; i < m; i++)
        p[i] = (double)(1.0f / (float)m);
    int seeds[8], got = 0;
    while (got < K) {
        double x[8];
        int want = K - got, before = got;
        for (int t = 0; t < want; t++)
            x[t] = as_udouble(&g);
        for (int t = 0; t < got; t++)
            p[seeds[t]] = 0;
        double s = 0;
        for (uint64_t i = 0; i < m; i++)
            cdf[i] = (s += p[i]);
        for (int t = 0; t < want; t++) {
            uint64_t i = 0;
            while (i < m && cdf[i] / s <= x[t])
                i++;
            int dup = 0;
            for (int u = before; u < got; u++)
                dup |= seeds[u] == (int)i;
            if (!dup)
                seeds[got++] = (int)i;
        }
    }
    double C[8 * 8], Cn[8 * 8];
    for (int k = 0; k < K; k++)
        for (uint64_t j = 0; j < q; j++)
            C[k * q + j] = U[(uint64_t)seeds[k] * q + j];
    int *old = malloc(m * sizeof(int)), strict = 0;
    for (uint64_t i = 0; i < m; i++)
        old[i] = -1;
    for (int it = 0; it < 11; it++) {
        for (uint64_t i = 0; i < m; i++) {
            double best = INFINITY;
            for (int k = 0; k < K; k++) {
                double d = 0;
                for (uint64_t j = 0; j < q; j++)
                    d += (U[i * q + j] - C[k * q + j]) * (U[i * q + j] - C[k * q + j]);
                if (d < best) {
                    best = d;
                    lab[i] = k;
                }
            }
        }
        if (it == 10 || strict)
            break; /* the labels of the last centers */
        double shift = 0;
        for (int k = 0; k < K; k++) {
            int nk = 0;
            for (uint64_t j = 0; j < q; j++)
                Cn[k * q + j] = 0;
            for (uint64_t i = 0; i < m; i++)
                if (lab[i] == k) {
                    nk++;
                    for (uint64_t j = 0; j < q; j++)
                        Cn[k * q + j] += U[i * q + j];
                }
            cr_assert_gt(nk, 0, "reference: an empty cluster");
            for (uint64_t j = 0; j < q; j++) {
                Cn[k * q + j] /= nk;
                shift += (Cn[k * q + j] - C[k * q + j]) * (Cn[k * q + j] - C[k * q + j]);
                C[k * q + j] = Cn[k * q + j];
            }
        }
        int same = memcmp(old, lab, m * sizeof(int)) == 0;
        memcpy(old, lab, m * sizeof(int));
        if (same)
            break; /* strict: these labels stand (the centers moved, the labels do not) */
        if (shift <= tol)
            strict = 1; /* one more assignment with the new centers */
    }
    free(old);
    free(p);
    free(cdf);
    free(U);
}

/* the augmented base [W | b] of a module, logical [O, I (+1)] */
static double *as_waug(const mt_ctx *c, const mt_mod *m, uint64_t *n)
{
    *n = m->I + (m->b >= 0);
    double *w = malloc(m->O * *n * sizeof(double));
    for (uint64_t o = 0; o < m->O; o++) {
        for (uint64_t i = 0; i < m->I; i++)
            w[o * *n + i] = c->base[m->w].v[o * m->I + i];
        if (m->b >= 0)
            w[o * *n + m->I] = c->base[m->b].v[o];
    }
    return w;
}

/* a module whose U rows cluster around K points; q = 3; bad: subspace 1's B one row short, 0's one long */
static void adamss_mod(mt_ctx *c, mt_mod *m, int K, int bad)
{
    const uint64_t q = 3;
    uint64_t n = m->I + (m->b >= 0);
    m->r = K;
    mt_t *W = &c->base[m->w];
    static const double pts[4][3] = {{1, 0, 0.2}, {0, 1, -0.3}, {-0.7, -0.6, 0.1}, {0.2, -0.9, 1}};
    for (uint64_t o = 0; o < m->O; o++) { /* [W | b] = X Vᵀ + small, V = the first q unit vectors */
        uint64_t g = (o * 7 + 3) % (uint64_t)K;
        for (uint64_t i = 0; i < n; i++) {
            double x = i < q ? 0.05 * (pts[g][i] + 0.05 * th_rand_normal(&c->rng)) : 0.004 * th_rand_normal(&c->rng);
            if (i < m->I)
                mt_set(W, o * m->I + i, x);
            else
                mt_set(&c->base[m->b], o, x);
        }
    }
    mt_t *nb = mt_part(c, m, "adamss_newB", SH(q, n), 0, 0);
    for (uint64_t j = 0; j < q; j++) { /* mostly the first q unit vectors; the last column (a bias) too */
        mt_set(nb, j * n + j, 1.0);
        mt_set(nb, j * n + n - 1, 0.3 - 0.2 * (double)j);
    }
    double *Wa = as_waug(c, m, &n), V[64 * 3];
    for (uint64_t t = 0; t < n; t++)
        for (uint64_t j = 0; j < q; j++)
            V[t * q + j] = nb->v[j * n + t];
    int lab[64], cnt[4] = {0};
    as_labels(Wa, m->O, n, V, q, K, lab);
    free(Wa);
    for (uint64_t o = 0; o < m->O; o++)
        cnt[lab[o]]++;
    for (int k = 0; k < K; k++) {
        char nm[32];
        uint64_t rk = k == 1 ? 2 : 1, len = (uint64_t)cnt[k] + (bad ? (k == 0) - (k == 1) : 0);
        snprintf(nm, sizeof nm, "adamss_A.%d", k);
        mt_part(c, m, nm, SH(rk, q), 0, 0.5);
        snprintf(nm, sizeof nm, "adamss_B.%d", k);
        mt_part(c, m, nm, SH(len, rk), 0, 0.3);
    }
}

static void gen_adamss_k(mt_ctx *c, int bad)
{
    adamss_mod(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 13, 17, 0), 3, bad); /* wide */
    adamss_mod(c, mt_module(c, "model.layers.0.mlp.down_proj", LIN, 21, 6, 1), 3, 0);       /* tall, bias */
}
static void gen_adamss(mt_ctx *c) { gen_adamss_k(c, 0); }
static void bad_adamss(mt_ctx *c) { gen_adamss_k(c, 1); }

static void ref_adamss(mt_ctx *c)
{
    for (int mi = 0; mi < c->nm; mi++) {
        const mt_mod *m = &c->mod[mi];
        uint64_t n, q = 3;
        double *Wa = as_waug(c, m, &n), V[64 * 3];
        const double *nb = mt_get(c, m, "adamss_newB");
        for (uint64_t t = 0; t < n; t++)
            for (uint64_t j = 0; j < q; j++)
                V[t * q + j] = nb[j * n + t];
        int lab[64];
        as_labels(Wa, m->O, n, V, q, m->r, lab);
        for (int k = 0; k < m->r; k++) { /* subspace k: its rows ascending, += B_k A_k newB */
            char na[32], nbn[32];
            snprintf(na, sizeof na, "adamss_A.%d", k);
            snprintf(nbn, sizeof nbn, "adamss_B.%d", k);
            const mt_t *A = mt_opt(c, m, na), *B = mt_opt(c, m, nbn);
            uint64_t rk = A->shape[0], at = 0;
            for (uint64_t o = 0; o < m->O; o++) {
                if (lab[o] != k)
                    continue;
                for (uint64_t i = 0; i < n; i++) {
                    double d = 0;
                    for (uint64_t a = 0; a < rk; a++)
                        for (uint64_t t = 0; t < q; t++)
                            d += B->v[at * rk + a] * A->v[a * q + t] * nb[t * n + i];
                    if (i < m->I)
                        Wa[o * n + i] += m->s * d;
                    else
                        Wa[o * n + i] += m->s * d;
                }
                at++;
            }
            cr_assert_eq(at, B->shape[0], "reference: subspace %d has %llu rows, B %llu", k, (unsigned long long)at,
                         (unsigned long long)B->shape[0]);
        }
        double *rw = mt_ref_of(c, m->w);
        for (uint64_t o = 0; o < m->O; o++)
            for (uint64_t i = 0; i < m->I; i++)
                rw[o * m->I + i] = Wa[o * n + i];
        if (m->b >= 0) {
            double *rb = mt_ref_of(c, m->b);
            for (uint64_t o = 0; o < m->O; o++)
                rb[o] = Wa[o * n + m->I];
        }
        free(Wa);
    }
}

/* ---- UNILORA (docs/adapter-types.md): B A with A[j, i] = θ[iA[j, i]] / sqrt(count of iA[j, i]) ------ */
/* UniLoraModel.generate_index(104, 24, proj_seed 7) as numpy 1.24 computes it (default_rng(7):
 * repeat(arange(24), 4), 8 extras by choice(24, 8, replace=False), shuffle), printed once with
 * /usr/bin/python3; PEFT hands it out in model order, A then B of each layer */
static const int ul_idx[104] = {21, 5, 13, 13, 19, 16, 0, 8, 14, 7, 8, 16, 15, 6, 9, 22, 4, 0, 12, 17, 11, 4, 18, 5, 2, 20, 17, 1, 12, 18, 14, 16, 11, 23, 20, 12, 3, 3, 6, 6, 12, 19, 9, 14, 23, 16, 11, 1, 18, 10, 5, 4, 10, 1, 20, 17, 12, 15, 5, 7, 10, 9, 22, 10, 19, 21, 0, 19, 23, 9, 21, 2, 19, 13, 22, 21, 11, 5, 15, 2, 16, 6, 15, 22, 2, 0, 20, 13, 14, 17, 11, 3, 21, 7, 20, 4, 7, 8, 1, 18, 17, 8, 23, 3};

/* llama's module order (layers by number, self_attn before mlp, q before v) is not the names' order */
static void gen_unilora(mt_ctx *c)
{
    static const char *const paths[4] = {"model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj",
                                         "model.layers.2.mlp.down_proj", "model.layers.10.self_attn.q_proj"};
    static const uint64_t oi[4][2] = {{7, 6}, {5, 6}, {6, 9}, {7, 6}};
    c->base_config = "{\"model_type\": \"llama\", \"architectures\": [\"LlamaForCausalLM\"]}";
    mt_base(c, "model.layers.2.self_attn.k_proj.weight", SH(5, 6), 0, 0.05); /* not targeted */
    mt_key(c, "base_model.unilora_theta_d", NULL, SH(24), 0, 0.3);
    int at = 0;
    for (int k = 0; k < 4; k++) {
        mt_mod *m = mt_module(c, paths[k], LIN, oi[k][0], oi[k][1], k == 1);
        m->r = 2;
        m->q[0] = at;
        at += 2 * (int)(oi[k][0] + oi[k][1]);
    }
    cr_assert_eq(at, 104);
}

/* save_indices: each layer's indices and scales in the file (a Linear and a GPT-2 Conv1D) */
static void gen_unilora_saved_k(mt_ctx *c, int bad)
{
    mt_key(c, "base_model.unilora_theta_d", NULL, SH(10), 0, 0.3);
    mt_mod *m[2] = {mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 7, 6, 0),
                    mt_module(c, "transformer.h.0.attn.c_attn", C1D, 9, 6, 0)};
    for (int k = 0; k < 2; k++) {
        m[k]->r = 3;
        m[k]->q[1] = 1;
        mt_t *ia = mt_part(c, m[k], "unilora_indices_A", SH(3, m[k]->I), 0, 0);
        mt_t *ib = mt_part(c, m[k], "unilora_indices_B", SH(m[k]->O, 3), 0, 0);
        snprintf(ia->dtype, sizeof ia->dtype, "I64");
        snprintf(ib->dtype, sizeof ib->dtype, "I64");
        for (uint64_t e = 0; e < ia->n; e++)
            ia->v[e] = (double)(th_rand_u64(&c->rng) % 10);
        for (uint64_t e = 0; e < ib->n; e++)
            ib->v[e] = (double)(th_rand_u64(&c->rng) % 10);
        if (bad && k == 0)
            ib->v[4] = 10; /* theta_d has 10 entries */
        mt_part(c, m[k], "unilora_scales_A", SH(3, m[k]->I), 0.6, 0.1);
        mt_part(c, m[k], "unilora_scales_B", SH(m[k]->O, 3), 0.6, 0.1);
    }
}
static void gen_unilora_saved(mt_ctx *c) { gen_unilora_saved_k(c, 0); }
static void bad_unilora(mt_ctx *c) { gen_unilora_saved_k(c, 1); }

static double *delta_unilora(const mt_ctx *c, const mt_mod *m)
{
    const mt_t *th = mt_find(c, "base_model.unilora_theta_d");
    cr_assert(th);
    uint64_t r = (uint64_t)m->r, na = r * m->I, nb = m->O * r;
    double *A = malloc(na * sizeof(double)), *B = malloc(nb * sizeof(double));
    int count[24] = {0};
    for (int e = 0; e < 104; e++)
        count[ul_idx[e]]++;
    for (uint64_t e = 0; e < na + nb; e++) {
        int w = e >= na;
        uint64_t j = w ? e - na : e;
        double x;
        if (m->q[1]) {
            const double *iv = mt_get(c, m, w ? "unilora_indices_B" : "unilora_indices_A");
            const double *sv = mt_get(c, m, w ? "unilora_scales_B" : "unilora_scales_A");
            x = th->v[(int)iv[j]] * sv[j];
        } else {
            int q = ul_idx[m->q[0] + (int)e];
            x = th->v[q] / sqrt((double)count[q]);
        }
        (w ? B : A)[j] = x;
    }
    double *d = mt_mm(B, A, m->O, r, m->I);
    free(A);
    free(B);
    return d;
}

/* ---- PSOFT (docs/adapter-types.md): U_r S_r (R − I) Vh_r from an SVD of the base weight ------------ */
/* R is left diagonal here (psoft_orth false, a diagonal weight; the vectors keep it so), which makes the
 * delta Σ_k s_k (R_kk − 1) u_k v_kᵀ independent of the singular vectors' signs: the reference takes its
 * own SVD (one-sided Jacobi, double).  The signs and the Cayley transform are the golden case's. */
static void psoft(mt_ctx *c, mt_mod *m, int mag_a, int bad)
{
    m->q[0] = mag_a;
    mt_t *w = mt_part(c, m, "psoft_R.weight", SH(3, bad ? 2 : 3), 0, 0);
    for (uint64_t e = 0; e < w->n; e++)
        mt_set(w, e, e % 4 == 0 ? 1.0 + 0.3 * th_rand_uniform(&c->rng) : 0.0);
    if (mag_a)
        mt_part(c, m, "psoft_R.vector_a", SH(3), 1, 0.2);
    mt_part(c, m, "psoft_R.vector_b", SH(3), 1, 0.2);
}

static void gen_psoft(mt_ctx *c)
{
    psoft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 1, 0);
    psoft(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 17, 0), 1, 0);
}

static void gen_psoft_pissa(mt_ctx *c)
{
    psoft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 0, 0);
    psoft(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 17, 0), 0, 0);
}

static void bad_psoft(mt_ctx *c) { psoft(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 1, 1); }

/* one-sided Jacobi on the columns of X [rows, cols] (rows >= cols), in place: afterwards the columns are
 * orthogonal, X = U S, and V [cols, cols] accumulates the rotations (X_in = X V^T) */
static void jacobi_svd(double *X, uint64_t rows, uint64_t cols, double *V)
{
    for (uint64_t i = 0; i < cols * cols; i++)
        V[i] = i % (cols + 1) == 0;
    for (int sweep = 0; sweep < 60; sweep++) {
        double off = 0;
        for (uint64_t p = 0; p < cols; p++)
            for (uint64_t q = p + 1; q < cols; q++) {
                double a = 0, b = 0, g = 0;
                for (uint64_t i = 0; i < rows; i++) {
                    a += X[i * cols + p] * X[i * cols + p];
                    b += X[i * cols + q] * X[i * cols + q];
                    g += X[i * cols + p] * X[i * cols + q];
                }
                if (fabs(g) <= 1e-300 || fabs(g) < 1e-17 * sqrt(a * b))
                    continue;
                off = fmax(off, fabs(g) / sqrt(a * b));
                double z = (b - a) / (2 * g), t = (z >= 0 ? 1 : -1) / (fabs(z) + sqrt(1 + z * z));
                double cs = 1 / sqrt(1 + t * t), sn = cs * t;
                for (uint64_t i = 0; i < rows; i++) {
                    double x = X[i * cols + p], y = X[i * cols + q];
                    X[i * cols + p] = cs * x - sn * y;
                    X[i * cols + q] = sn * x + cs * y;
                }
                for (uint64_t i = 0; i < cols; i++) {
                    double x = V[i * cols + p], y = V[i * cols + q];
                    V[i * cols + p] = cs * x - sn * y;
                    V[i * cols + q] = sn * x + cs * y;
                }
            }
        if (off < 1e-15)
            break;
    }
}

static double *delta_psoft(const mt_ctx *c, const mt_mod *m)
{
    /* work on Wᵀ [I, O] when I >= O, else on W: columns of X are the vectors of the short side */
    int tr = m->I >= m->O;
    uint64_t rows = tr ? m->I : m->O, cols = tr ? m->O : m->I;
    const double *W = c->base[m->w].v;
    double *X = malloc(rows * cols * sizeof(double)), *V = malloc(cols * cols * sizeof(double));
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            X[tr ? i * cols + o : o * cols + i] = W[o * m->I + i];
    jacobi_svd(X, rows, cols, V);
    const double *w = mt_get(c, m, "psoft_R.weight"), *vb = mt_get(c, m, "psoft_R.vector_b");
    const double *va = m->q[0] ? mt_get(c, m, "psoft_R.vector_a") : NULL;
    double *d = calloc(m->O * m->I, sizeof(double));
    for (int k = 0; k < 3; k++) { /* the 3 largest: X's columns are s_j times the long side's vectors */
        uint64_t best = 0;
        double bn = -1;
        for (uint64_t j = 0; j < cols; j++) {
            double nn = 0;
            for (uint64_t i = 0; i < rows; i++)
                nn += X[i * cols + j] * X[i * cols + j];
            if (nn > bn) {
                bn = nn;
                best = j;
            }
        }
        double mkk = vb[k] * w[k * 4] * (va ? va[k] : 1.0) - 1.0;
        for (uint64_t o = 0; o < m->O; o++) /* s u vᵀ = (X column)(V column)ᵀ, oriented back */
            for (uint64_t i = 0; i < m->I; i++)
                d[o * m->I + i] += mkk * (tr ? X[i * cols + best] * V[o * cols + best] : X[o * cols + best] * V[i * cols + best]);
        for (uint64_t i = 0; i < rows; i++)
            X[i * cols + best] = 0;
    }
    free(X);
    free(V);
    return d;
}

/* ---- OSF (docs/adapter-types.md): W' = U_high S_high V_high + U_low diag(S_low) V_low, the high part the
 * k leading singular triplets of W (not saved), the low part the saved trained rest.  The reference sums
 * s u vᵀ of the k largest Jacobi columns, which no sign convention changes. */
static void osf(mt_ctx *c, mt_mod *m, int k, int bad)
{
    uint64_t mn = m->O < m->I ? m->O : m->I, L = mn - (uint64_t)k;
    m->r = k;
    mt_part(c, m, "osf_svd_params.U_low", SH(m->O, L), 0, 0.2);
    mt_t *s = mt_part(c, m, "osf_svd_params.S_low", SH(L - (uint64_t)bad), 0, 0);
    for (uint64_t j = 0; j < s->n; j++) /* positive and spread, as trained singular values are */
        mt_set(s, j, 0.05 + 0.1 * (th_rand_uniform(&c->rng) + 1));
    mt_part(c, m, "osf_svd_params.V_low", SH(L, m->I), 0, 0.2);
}

static void gen_osf(mt_ctx *c) /* effective_rank 5 */
{
    osf(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 5, 0);
    osf(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 17, 1), 5, 0);
}

static void gen_osf_default(mt_ctx *c) /* effective_rank null: min(out, in) / 2 */
{
    osf(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 18, 0);
    osf(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 17, 0), 8, 0);
}

static void gen_osf_fraction(mt_ctx *c) /* effective_rank 0.25: int(min(out, in) * 0.25) */
{
    osf(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 9, 0);
    osf(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 17, 0), 4, 0);
}

static void bad_osf(mt_ctx *c) { osf(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 5, 1); }

static double *delta_osf(const mt_ctx *c, const mt_mod *m)
{
    int tr = m->I >= m->O; /* as delta_psoft: Jacobi on the short side's vectors */
    uint64_t rows = tr ? m->I : m->O, cols = tr ? m->O : m->I, L = cols - (uint64_t)m->r;
    double *W = mt_W(c, m), *X = malloc(rows * cols * sizeof(double)), *V = malloc(cols * cols * sizeof(double));
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            X[tr ? i * cols + o : o * cols + i] = W[o * m->I + i];
    jacobi_svd(X, rows, cols, V);
    double *d = calloc(m->O * m->I, sizeof(double));
    for (int k = 0; k < m->r; k++) { /* high part: the k largest columns, s u vᵀ each */
        uint64_t best = 0;
        double bn = -1;
        for (uint64_t j = 0; j < cols; j++) {
            double nn = 0;
            for (uint64_t i = 0; i < rows; i++)
                nn += X[i * cols + j] * X[i * cols + j];
            if (nn > bn) {
                bn = nn;
                best = j;
            }
        }
        for (uint64_t o = 0; o < m->O; o++)
            for (uint64_t i = 0; i < m->I; i++)
                d[o * m->I + i] += tr ? X[i * cols + best] * V[o * cols + best] : X[o * cols + best] * V[i * cols + best];
        for (uint64_t i = 0; i < rows; i++)
            X[i * cols + best] = 0;
    }
    const double *U = mt_get(c, m, "osf_svd_params.U_low"), *S = mt_get(c, m, "osf_svd_params.S_low");
    const double *Vl = mt_get(c, m, "osf_svd_params.V_low");
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++) {
            double lo = 0;
            for (uint64_t j = 0; j < L; j++)
                lo += U[o * L + j] * S[j] * Vl[j * m->I + i];
            d[o * m->I + i] += lo - W[o * m->I + i]; /* the delta W' - W */
        }
    free(W);
    free(X);
    free(V);
    return d;
}

/* ---- FROD (docs/adapter-types.md): W' = U (S + diag λ) Vᵀ, V shared per category, U = bi with unit
 * columns rounded to f32, bi = W V^-T (solve), or W pinv(V)ᵀ (rtol 1e-6) when V is singular ----------- */
/* PEFT's _category_from_key, written again for the paths used here */
static void frod_cat(const char *path, char *cat, size_t cap)
{
    char parts[8][64];
    int n = 0;
    const char *s = path;
    while (n < 8) {
        const char *d = strchr(s, '.');
        size_t len = d ? (size_t)(d - s) : strlen(s);
        snprintf(parts[n++], sizeof parts[0], "%.*s", (int)len, s);
        if (d == NULL)
            break;
        s = d + 1;
    }
    const char *a = parts[n - 2], *b = parts[n - 1];
    int digits = a[0] != '\0' && strspn(a, "0123456789") == strlen(a);
    if (digits)
        snprintf(cat, cap, "%.63s", b);
    else if (!strcmp(a, "output") && !strcmp(b, "dense") && n >= 3 && !strcmp(parts[n - 3], "attention"))
        snprintf(cat, cap, "attention_output");
    else
        snprintf(cat, cap, "%.63s_%.63s", a, b);
}

/* a category's V [in, in] (singular: column 1 zero), its S positions (dup: the first one again at
 * the end) and size */
static void frod_cat_tensors(mt_ctx *c, const char *cat, uint64_t in, uint64_t nnz, int singular, int dup, int bad)
{
    char key[200];
    snprintf(key, sizeof key, "base_model.frod_V.%s", cat);
    mt_t *V = mt_key(c, key, NULL, SH(in, in), 0, 0.3 / sqrt((double)in));
    for (uint64_t i = 0; i < in; i++) {
        mt_set(V, i * in + i, V->v[i * in + i] + 1.0);
        if (singular)
            V->v[i * in + 1] = 0;
    }
    snprintf(key, sizeof key, "base_model.frod_s_indices.%s", cat);
    mt_t *ix = mt_key(c, key, "I64", SH(2, nnz), 0, 0);
    for (uint64_t e = 0; e < nnz; e++) {
        uint64_t r = th_rand_u64(&c->rng) % in, q = (r + 1 + th_rand_u64(&c->rng) % (in - 1)) % in; /* off-diagonal */
        ix->v[e] = (double)r;
        ix->v[nnz + e] = (double)q;
    }
    if (dup) {
        ix->v[nnz - 1] = ix->v[0];
        ix->v[2 * nnz - 1] = ix->v[nnz];
    }
    if (bad)
        ix->v[nnz + 2] = (double)in;
    snprintf(key, sizeof key, "base_model.frod_s_size.%s", cat);
    mt_t *sz = mt_key(c, key, "I64", SH(2), 0, 0);
    sz->v[0] = sz->v[1] = (double)in;
}

static void frod(mt_ctx *c, mt_mod *m, uint64_t nnz, int singular)
{
    m->q[0] = singular;
    mt_part(c, m, "frod_lambda_l", SH(m->I), 0.3, 0.1);
    mt_part(c, m, "frod_lambda_s_values", SH(nnz), 0, 0.1);
}

static void gen_frod(mt_ctx *c) /* two layers share self_attn_q_proj's V (one S position twice); a Conv1D */
{
    frod_cat_tensors(c, "self_attn_q_proj", 43, 9, 0, 1, 0);
    frod_cat_tensors(c, "attn_c_attn", 43, 5, 0, 0, 0);
    frod(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 1), 9, 0);
    frod(c, mt_module(c, "model.layers.1.self_attn.q_proj", LIN, 37, 43, 0), 9, 0);
    frod(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0), 5, 0);
}

static void gen_frod_pinv(mt_ctx *c) /* a singular V (pinv fallback); BERT's attention_output; "<n>.fc" */
{
    frod_cat_tensors(c, "attention_output", 31, 6, 1, 0, 0);
    frod_cat_tensors(c, "fc", 31, 4, 0, 0, 0);
    frod(c, mt_module(c, "encoder.layer.0.attention.output.dense", LIN, 29, 31, 0), 6, 1);
    frod(c, mt_module(c, "layers.1.fc", LIN, 23, 31, 0), 4, 0);
}

static void bad_frod(mt_ctx *c) /* an S position outside [0, in) */
{
    frod_cat_tensors(c, "self_attn_q_proj", 43, 9, 0, 0, 1);
    frod(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 9, 0);
}

static double *delta_frod(const mt_ctx *c, const mt_mod *m)
{
    char cat[128], key[200];
    frod_cat(m->path, cat, sizeof cat);
    uint64_t n = m->I, O = m->O;
    snprintf(key, sizeof key, "base_model.frod_V.%s", cat);
    const mt_t *Vt = mt_find(c, key);
    snprintf(key, sizeof key, "base_model.frod_s_indices.%s", cat);
    const mt_t *ix = mt_find(c, key);
    cr_assert(Vt && ix, "reference: no shared tensors for %s", cat);
    const double *V = Vt->v, *lam = mt_get(c, m, "frod_lambda_l"), *sv = mt_get(c, m, "frod_lambda_s_values");
    double *W = mt_W(c, m), *bi = calloc(O * n, sizeof(double));
    if (!m->q[0]) { /* bi = W V^-T: W times the inverse of Vᵀ */
        double *vt = malloc(n * n * sizeof(double));
        for (uint64_t a = 0; a < n; a++)
            for (uint64_t b = 0; b < n; b++)
                vt[a * n + b] = V[b * n + a];
        mt_inverse(vt, (int)n);
        double *t = mt_mm(W, vt, O, n, n);
        memcpy(bi, t, O * n * sizeof(double));
        free(t);
        free(vt);
    } else { /* pinv(V)ᵀ = Σ u_c vj_cᵀ / s_c over s_c > 1e-6 s_max; Jacobi: X = U S, V = X Vjᵀ */
        double *X = malloc(n * n * sizeof(double)), *Vj = malloc(n * n * sizeof(double)), *sc = malloc(n * sizeof(double));
        memcpy(X, V, n * n * sizeof(double));
        jacobi_svd(X, n, n, Vj);
        double smax = 0;
        for (uint64_t q = 0; q < n; q++) {
            double ss = 0;
            for (uint64_t i = 0; i < n; i++)
                ss += X[i * n + q] * X[i * n + q];
            sc[q] = sqrt(ss);
            smax = fmax(smax, sc[q]);
        }
        for (uint64_t q = 0; q < n; q++) {
            if (!(sc[q] > 1e-6 * smax))
                continue;
            for (uint64_t o = 0; o < O; o++) {
                double wu = 0; /* W u_q / s_q = W X[:, q] / s_q^2 */
                for (uint64_t i = 0; i < n; i++)
                    wu += W[o * n + i] * X[i * n + q];
                wu /= sc[q] * sc[q];
                for (uint64_t i = 0; i < n; i++)
                    bi[o * n + i] += wu * Vj[i * n + q];
            }
        }
        free(X);
        free(Vj);
        free(sc);
    }
    double *M = calloc(n * n, sizeof(double)); /* S + diag λ, duplicates added */
    for (uint64_t i = 0; i < n; i++)
        M[i * n + i] = lam[i];
    uint64_t nnz = ix->shape[1];
    for (uint64_t e = 0; e < nnz; e++)
        M[(uint64_t)ix->v[e] * n + (uint64_t)ix->v[nnz + e]] += sv[e];
    for (uint64_t j = 0; j < n; j++) { /* U: unit columns, f32 */
        double ss = 0;
        for (uint64_t o = 0; o < O; o++)
            ss += bi[o * n + j] * bi[o * n + j];
        for (uint64_t o = 0; o < O; o++)
            bi[o * n + j] = sqrt(ss) > 1e-12 ? (double)(float)(bi[o * n + j] / sqrt(ss)) : 0.0;
    }
    double *UM = mt_mm(bi, M, O, n, n), *d = calloc(O * n, sizeof(double));
    for (uint64_t o = 0; o < O; o++)
        for (uint64_t i = 0; i < n; i++) {
            double x = 0;
            for (uint64_t q = 0; q < n; q++)
                x += UM[o * n + q] * V[i * n + q];
            d[o * n + i] = x - W[o * n + i];
        }
    free(UM);
    free(M);
    free(bi);
    free(W);
    return d;
}

/* ---- MISS (§5.12): W[o, c] += B[c mod r, o] (mini: B tiled along the outputs) -------------------- */
static void miss(mt_ctx *c, mt_mod *m, int mini, uint64_t bad)
{
    m->s = 1;
    m->q[0] = mini;
    mt_part(c, m, "miss_block", SH(4, (mini ? (uint64_t)mini : m->O) + bad), 0, 0.03);
}

static void gen_miss(mt_ctx *c)
{
    miss(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 0, 0);
    miss(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 0, 0);
}

static void gen_miss_mini(mt_ctx *c) /* r 4, mini_r 3 */
{
    miss(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 36, 43, 0), 3, 0);
    miss(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 33, 97, 0), 3, 0);
}

static void bad_miss(mt_ctx *c) { miss(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 0, 1); }

static double *delta_miss(const mt_ctx *c, const mt_mod *m)
{
    const mt_t *b = mt_opt(c, m, "miss_block");
    cr_assert_not_null(b);
    double *d = malloc(m->O * m->I * sizeof(double));
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            d[o * m->I + i] = b->v[(i % b->shape[0]) * b->shape[1] + (m->q[0] ? o % (uint64_t)m->q[0] : o)];
    return d;
}

/* ---- C3A (§5.14): dW[p*b + u, q*b + v] = kernel[p, q, (v - u) mod b] / in ----------------------- */
static void c3a(mt_ctx *c, mt_mod *m, uint64_t b, uint64_t bad)
{
    m->s = 1.0 / (double)m->I;
    mt_part(c, m, "c3a_kernel", SH(m->O / b, m->I / b, b + bad), 0, 0.8);
}

/* block_size 3, block_size_pattern {"v_proj": 7} */
static void gen_c3a(mt_ctx *c)
{
    c3a(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 33, 39, 0), 3, 0);
    c3a(c, mt_module(c, "model.layers.0.self_attn.v_proj", LIN, 35, 49, 0), 7, 0);
}

static void bad_c3a(mt_ctx *c) { c3a(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 33, 39, 0), 3, 1); }

static double *delta_c3a(const mt_ctx *c, const mt_mod *m)
{
    const mt_t *K = mt_opt(c, m, "c3a_kernel");
    cr_assert_not_null(K);
    uint64_t b = K->shape[2];
    double *d = malloc(m->O * m->I * sizeof(double));
    for (uint64_t o = 0; o < m->O; o++)
        for (uint64_t i = 0; i < m->I; i++)
            d[o * m->I + i] = K->v[((o / b) * K->shape[1] + i / b) * b + (i % b + b - o % b) % b];
    return d;
}

/* ---- HIRA (§5.14): W + W ⊙ (B @ A) (Embedding: transposed) -------------------------------------- */
static void hira(mt_ctx *c, mt_mod *m, uint64_t bad)
{
    int emb = m->kind == EMB;
    mt_part(c, m, emb ? "hira_embedding_A" : "hira_A", SH(4, m->I), 0, 0.3);
    mt_part(c, m, emb ? "hira_embedding_B" : "hira_B", SH(m->O, 4 - bad), 0, 0.3);
}

static void gen_hira(mt_ctx *c)
{
    hira(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 0);
    hira(c, mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 0), 0);
    hira(c, mt_module(c, "model.embed_tokens", EMB, 43, 53, 0), 0);
}

static void bad_hira(mt_ctx *c) { hira(c, mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0), 1); }

static double *delta_hira(const mt_ctx *c, const mt_mod *m)
{
    int emb = m->kind == EMB;
    double *d = mt_mm(mt_get(c, m, emb ? "hira_embedding_B" : "hira_B"), mt_get(c, m, emb ? "hira_embedding_A" : "hira_A"),
                      m->O, 4, m->I);
    double *w = mt_W(c, m);
    for (uint64_t e = 0; e < m->O * m->I; e++)
        d[e] *= w[e];
    free(w);
    return d;
}

/* ---- BEFT (§5.14): b += beft_bias --------------------------------------------------------------- */
static void gen_beft(mt_ctx *c)
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 1);
    mt_part(c, m, "beft_bias", SH(1, 37), 0, 0.05);
    m = mt_module(c, "transformer.h.0.attn.c_attn", C1D, 39, 43, 1);
    mt_part(c, m, "beft_bias", SH(1, 39), 0, 0.05);
}

static void bad_beft(mt_ctx *c) /* the base layer has no bias */
{
    mt_mod *m = mt_module(c, "model.layers.0.self_attn.q_proj", LIN, 37, 43, 0);
    mt_part(c, m, "beft_bias", SH(1, 37), 0, 0.05);
}

static void ref_beft(mt_ctx *c)
{
    for (int k = 0; k < c->nm; k++) {
        const mt_mod *m = &c->mod[k];
        const double *bb = mt_get(c, m, "beft_bias");
        double *rb = mt_ref_of(c, m->b);
        for (uint64_t o = 0; o < m->O; o++)
            rb[o] += bb[o];
    }
}

/* ---- LN_TUNING (§5.15): the norm's weight and bias replaced by the saved copies ------------------ */
static mt_mod *ln_norm(mt_ctx *c, const char *path, int bias, uint64_t len)
{
    cr_assert_lt(c->nm, MT_MODS);
    mt_mod *m = &c->mod[c->nm++];
    memset(m, 0, sizeof *m);
    snprintf(m->path, sizeof m->path, "%s", path);
    m->kind = LIN;
    m->O = 43;
    m->I = 1;
    char n[200];
    snprintf(n, sizeof n, "%s.weight", path);
    mt_base(c, n, SH(43), 1, 0.1);
    m->w = c->nb - 1;
    m->b = -1;
    mt_part(c, m, "ln_tuning_layers.weight", SH(len), 1, 0.1);
    if (bias) {
        snprintf(n, sizeof n, "%s.bias", path);
        mt_base(c, n, SH(43), 0, 0.1);
        m->b = c->nb - 1;
        mt_part(c, m, "ln_tuning_layers.bias", SH(43), 0, 0.1);
    }
    return m;
}

static void gen_ln_tuning(mt_ctx *c)
{
    ln_norm(c, "model.layers.0.input_layernorm", 1, 43);
    ln_norm(c, "model.norm", 0, 43);
}

static void bad_ln_tuning(mt_ctx *c) { ln_norm(c, "model.norm", 0, 42); }

static void ref_ln_tuning(mt_ctx *c)
{
    for (int k = 0; k < c->nm; k++) {
        const mt_mod *m = &c->mod[k];
        memcpy(mt_ref_of(c, m->w), mt_get(c, m, "ln_tuning_layers.weight"), m->O * sizeof(double));
        if (m->b >= 0)
            memcpy(mt_ref_of(c, m->b), mt_get(c, m, "ln_tuning_layers.bias"), m->O * sizeof(double));
    }
}

/* ---- TRAINABLE_TOKENS (§5.15): embedding rows replaced, in the config's index order -------------- */
static const uint64_t tt_idx[] = {3, 17, 42, 5}; /* the config's token_indices */

static void tt(mt_ctx *c, uint64_t rows)
{
    mt_mod *m = mt_module(c, "model.embed_tokens", EMB, 43, 53, 0);
    mt_part(c, m, "trainable_tokens_delta", SH(rows, 43), 0, 0.05);
}

static void gen_trainable_tokens(mt_ctx *c) { tt(c, 4); }
static void bad_trainable_tokens(mt_ctx *c) { tt(c, 3); } /* 3 rows for 4 indices */

/* W[idx[t], :] = delta[t, :] on the stored [V, D] embedding */
static void tt_rows(mt_ctx *c, const mt_mod *m, const char *part, const uint64_t *idx, uint64_t n)
{
    const double *delta = mt_get(c, m, part);
    double *w = mt_ref_of(c, m->w);
    for (uint64_t t = 0; t < n; t++)
        memcpy(w + idx[t] * m->O, delta + t * m->O, m->O * sizeof(double));
}

static void ref_trainable_tokens(mt_ctx *c) { tt_rows(c, &c->mod[0], "trainable_tokens_delta", tt_idx, 4); }

/* ---- the table ---------------------------------------------------------------------------------- */
#define TGT_QC "\"target_modules\": [\"q_proj\", \"c_attn\"]"
#define TGT_QV "\"target_modules\": [\"q_proj\", \"v_proj\"]"

static const mt_row mt_rows[] = {
    {"LORA", 1, ref_lora, NULL,
     {{"linear, conv1d, embedding, conv, rank and alpha patterns",
       "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\", \"v_proj\", "
       "\"embed_tokens\", \"conv\", \"c_attn\"], \"rank_pattern\": {\"v_proj\": 6}, "
       "\"alpha_pattern\": {\"layers\\\\.1\\\\..*\": 3}}",
       gen_lora},
      {"rslora, trainable tokens",
       "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 6, \"use_rslora\": true, "
       "\"target_modules\": [\"q_proj\", \"c_fc\"], \"trainable_token_indices\": [41, 3, 9]}",
       gen_lora_rslora},
      {"dora: linear rows, conv1d and embedding columns, conv",
       "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"use_dora\": true, "
       "\"target_modules\": [\"q_proj\", \"c_attn\", \"embed_tokens\", \"conv\"]}",
       gen_lora_dora},
      {"lora_bias", "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 6, \"lora_bias\": true, " TGT_QC "}",
       gen_lora_bias}},
     {"lora_A too narrow", NULL, bad_lora},
     "model.layers.0.self_attn.q_proj"},
    {"ADALORA", 1, NULL, delta_adalora,
     {{"kept ranks 4 and 6 of init_r 6",
       "{\"peft_type\": \"ADALORA\", \"init_r\": 6, \"r\": 8, \"target_r\": 4, \"lora_alpha\": 8, " TGT_QC ", "
       "\"rank_pattern\": {\"model.layers.0.self_attn.q_proj.lora_E\": [true, false, true, true, false, true], "
       "\"transformer.h.0.attn.c_attn.lora_E\": [true, true, true, true, true, true]}}",
       gen_adalora}},
     {"no lora_E", NULL, bad_adalora},
     "model.layers.0.self_attn.q_proj"},
    {"IA3", 0, ref_ia3, NULL,
     {{"rows, feed-forward columns, conv1d",
       "{\"peft_type\": \"IA3\", \"target_modules\": [\"q_proj\", \"down_proj\", \"c_attn\"], "
       "\"feedforward_modules\": [\"down_proj\"]}",
       gen_ia3},
      {"conv1d feed-forward by regex",
       "{\"peft_type\": \"IA3\", \"target_modules\": [\"c_fc\", \"c_proj\"], \"feedforward_modules\": \".*c_proj\"}",
       gen_ia3_conv1d_ff},
      {"Conv2d rows and bias, Conv2d/Conv3d feed-forward channels",
       "{\"peft_type\": \"IA3\", \"target_modules\": [\"conv_in\", \"conv\", \"conv3d\"], "
       "\"feedforward_modules\": [\"ff.conv\", \"ff.conv3d\"]}",
       gen_ia3_conv}},
     {"ia3_l one short", NULL, bad_ia3},
     "model.layers.0.self_attn.q_proj"},
    {"LOHA", 1, NULL, delta_loha,
     {{"rank and alpha patterns",
       "{\"peft_type\": \"LOHA\", \"r\": 4, \"alpha\": 8, " TGT_QV ", \"rank_pattern\": {\"v_proj\": 2}, "
       "\"alpha_pattern\": {\"v_proj\": 6}}",
       gen_loha},
      {"convolutions: flat, CP Conv2d, CP Conv1d",
       "{\"peft_type\": \"LOHA\", \"r\": 3, \"alpha\": 6, \"target_modules\": [\"conv_in\", \"conv_out\", "
       "\"conv1d\"], \"use_effective_conv2d\": true}",
       gen_loha_conv}},
     {"hada_w2_b missing", NULL, bad_loha},
     "model.layers.0.self_attn.q_proj"},
    {"LOKR", 1, NULL, delta_lokr,
     {{"whole, decomposed and mixed factors",
       "{\"peft_type\": \"LOKR\", \"r\": 4, \"alpha\": 8, \"target_modules\": [\"q_proj\", \"v_proj\", \"up_proj\"]}",
       gen_lokr},
      {"convolutions: flat, whole 4-D w2, CP Conv2d, CP Conv1d",
       "{\"peft_type\": \"LOKR\", \"r\": 4, \"alpha\": 8, \"target_modules\": [\"conv_a\", \"conv_b\", \"conv_c\", "
       "\"conv1d\"], \"use_effective_conv2d\": true}",
       gen_lokr_conv}},
     {"kron shape is not the weight's", NULL, bad_lokr},
     "model.layers.0.self_attn.q_proj"},
    {"VERA", 1, NULL, delta_vera,
     {{"linear and conv1d on shared projections",
       "{\"peft_type\": \"VERA\", \"r\": 8, \"save_projection\": true, "
       "\"target_modules\": [\"q_proj\", \"v_proj\", \"c_attn\"]}",
       gen_vera}},
     {"vera_lambda_b one short", NULL, bad_vera},
     "model.layers.0.self_attn.q_proj"},
    {"PVERA", 1, NULL, delta_pvera,
     {{"linear and conv1d on shared projections, mean half",
       "{\"peft_type\": \"PVERA\", \"r\": 5, \"save_projection\": true, "
       "\"target_modules\": [\"q_proj\", \"v_proj\", \"c_attn\"]}",
       gen_pvera}},
     {"pvera_A with r rows, not 2r", NULL, bad_pvera},
     "model.layers.0.self_attn.q_proj"},
    {"RANDLORA", 1, NULL, delta_randlora,
     {{"o < i, o > i, conv1d",
       "{\"peft_type\": \"RANDLORA\", \"r\": 4, \"randlora_alpha\": 8, \"save_projection\": true, "
       "\"target_modules\": [\"q_proj\", \"down_proj\", \"c_attn\"]}",
       gen_randlora}},
     {"randlora_gamma one column short", NULL, bad_randlora},
     "model.layers.0.self_attn.q_proj"},
    {"VBLORA", 1, NULL, delta_vblora,
     {{"logits", "{\"peft_type\": \"VBLORA\", \"r\": 4, \"topk\": 2, \"num_vectors\": 7, \"vector_length\": 3, " TGT_QC "}",
       gen_vblora},
      {"saved top-k",
       "{\"peft_type\": \"VBLORA\", \"r\": 4, \"topk\": 3, \"num_vectors\": 7, \"vector_length\": 3, "
       "\"save_only_topk_weights\": true, " TGT_QC "}",
       gen_vblora_topk},
      {"saved top-1",
       "{\"peft_type\": \"VBLORA\", \"r\": 4, \"topk\": 1, \"num_vectors\": 7, \"vector_length\": 3, "
       "\"save_only_topk_weights\": true, " TGT_QC "}",
       gen_vblora_top1}},
     {"logits over fewer vectors than the bank", NULL, bad_vblora},
     "model.layers.0.self_attn.q_proj"},
    {"DELORA", 1, NULL, delta_delora,
     {{"rank pattern, a clamped row",
       "{\"peft_type\": \"DELORA\", \"r\": 4, \"delora_lambda\": 15, " TGT_QV ", \"rank_pattern\": {\"v_proj\": 3}}",
       gen_delora}},
     {"delora_w_norm one short", NULL, bad_delora},
     "model.layers.0.self_attn.q_proj"},
    {"GRALORA", 1, NULL, delta_gralora,
     {{"k 3", "{\"peft_type\": \"GRALORA\", \"r\": 6, \"alpha\": 12, \"gralora_k\": 3, \"hybrid_r\": 0, " TGT_QC "}",
       gen_gralora},
      {"hybrid", "{\"peft_type\": \"GRALORA\", \"r\": 6, \"alpha\": 12, \"gralora_k\": 3, \"hybrid_r\": 2, " TGT_QC "}",
       gen_gralora_hybrid}},
     {"gralora_B block one short", NULL, bad_gralora},
     "model.layers.0.self_attn.q_proj"},
    {"FOURIERFT", 1, NULL, delta_fourierft,
     {{"seed 777", "{\"peft_type\": \"FOURIERFT\", \"n_frequency\": 20, \"scaling\": 100.0, \"random_loc_seed\": 777, " TGT_QC "}",
       gen_fourierft},
      {"seed 42, n_frequency_pattern",
       "{\"peft_type\": \"FOURIERFT\", \"n_frequency\": 25, \"scaling\": 150.0, \"random_loc_seed\": 42, "
       "\"n_frequency_pattern\": {\"v_proj\": 11}, " TGT_QV "}",
       gen_fourierft_pattern}},
     {"2-D spectrum", NULL, bad_fourierft},
     "model.layers.0.self_attn.q_proj"},
    {"WAVEFT", 1, NULL, delta_waveft,
     {{"db1", "{\"peft_type\": \"WAVEFT\", \"n_frequency\": 20, \"scaling\": 25.0, \"random_loc_seed\": 777, " TGT_QC "}",
       gen_waveft},
      {"db2", "{\"peft_type\": \"WAVEFT\", \"n_frequency\": 30, \"scaling\": 10.0, \"random_loc_seed\": 42, "
       "\"wavelet_family\": \"db2\", " TGT_QV "}",
       gen_waveft_db2},
      {"use_idwt false", "{\"peft_type\": \"WAVEFT\", \"n_frequency\": 25, \"scaling\": 3.0, \"random_loc_seed\": 5, "
       "\"use_idwt\": false, " TGT_QV "}",
       gen_waveft_plain}},
     {"2-D spectrum", NULL, bad_waveft},
     "model.layers.0.self_attn.q_proj"},
    {"GLORA", 0, NULL, delta_glora,
     {{"lora (and zero C, D, E on a biased layer)", "{\"peft_type\": \"GLORA\", \"r\": 3, " TGT_QV "}", gen_glora},
      {"vector", "{\"peft_type\": \"GLORA\", \"config_A_B\": \"vector\", " TGT_QV "}", gen_glora_vector},
      {"constant", "{\"peft_type\": \"GLORA\", \"config_A_B\": \"constant\", " TGT_QV "}", gen_glora_constant},
      {"none (loaded buffers)", "{\"peft_type\": \"GLORA\", \"config_A_B\": \"none\", " TGT_QV "}", gen_glora_none}},
     {"glora_A.Xu one column too many", NULL, bad_glora},
     "model.layers.0.self_attn.q_proj"},
    {"DEFT", 0, NULL, delta_deft,
     {{"relu, Linear and Conv1D", "{\"peft_type\": \"DEFT\", \"r\": 3, " TGT_QC "}", gen_deft},
      {"alpha 6", "{\"peft_type\": \"DEFT\", \"r\": 4, \"alpha\": 6, " TGT_QV "}", gen_deft_alpha},
      {"para", "{\"peft_type\": \"DEFT\", \"r\": 3, \"para\": true, " TGT_QV "}", gen_deft_para},
      {"qr, alpha 6, Linear and Conv1D",
       "{\"peft_type\": \"DEFT\", \"r\": 4, \"alpha\": 6, \"decomposition_method\": \"qr\", " TGT_QC "}",
       gen_deft_qr}},
     {"deft_R one row too many", NULL, bad_deft},
     "model.layers.0.self_attn.q_proj"},
    {"OFT", 0, ref_oft, NULL,
     {{"Cayley-Neumann, 5 terms", "{\"peft_type\": \"OFT\", \"oft_block_size\": 5, \"r\": 0, " TGT_QV "}", gen_oft},
      {"exact Cayley",
       "{\"peft_type\": \"OFT\", \"oft_block_size\": 5, \"r\": 0, \"use_cayley_neumann\": false, " TGT_QV "}",
       gen_oft_exact},
      {"coft, 3 terms",
       "{\"peft_type\": \"OFT\", \"oft_block_size\": 5, \"r\": 0, \"coft\": true, \"eps\": 0.2, "
       "\"use_cayley_neumann\": true, \"num_cayley_neumann_terms\": 3, " TGT_QV "}",
       gen_oft_coft},
      {"block_share, exact",
       "{\"peft_type\": \"OFT\", \"oft_block_size\": 5, \"r\": 0, \"block_share\": true, "
       "\"use_cayley_neumann\": false, " TGT_QV "}",
       gen_oft_share},
      {"Conv2d 3x3 and 1x1",
       "{\"peft_type\": \"OFT\", \"oft_block_size\": 5, \"r\": 0, \"target_modules\": [\"conv_in\", \"proj\"]}",
       gen_oft_conv}},
     {"oft_R of a smaller block", NULL, bad_oft},
     "model.layers.0.self_attn.q_proj"},
    {"BOFT", 0, ref_boft, NULL,
     {{"one butterfly factor", "{\"peft_type\": \"BOFT\", \"boft_block_size\": 5, \"boft_n_butterfly_factor\": 1, " TGT_QV "}",
       gen_boft}},
     {"boft_s one short", NULL, bad_boft},
     "model.layers.0.self_attn.q_proj"},
    {"HRA", 0, ref_hra, NULL,
     {{"reflections", "{\"peft_type\": \"HRA\", \"r\": 4, \"apply_GS\": false, " TGT_QV "}", gen_hra},
      {"Gram-Schmidt", "{\"peft_type\": \"HRA\", \"r\": 3, \"apply_GS\": true, " TGT_QV "}", gen_hra_gram_schmidt},
      {"Conv2d, rank_pattern",
       "{\"peft_type\": \"HRA\", \"r\": 4, \"apply_GS\": false, \"target_modules\": [\"conv_in\", \"conv_out\"], "
       "\"rank_pattern\": {\"conv_out\": 3}}",
       gen_hra_conv}},
     {"hra_u one row short", NULL, bad_hra},
     "model.layers.0.self_attn.q_proj"},
    {"ROAD", 0, ref_road, NULL,
     {{"road_1, groups of 4", "{\"peft_type\": \"ROAD\", \"variant\": \"road_1\", \"group_size\": 4, " TGT_QV "}", gen_road_1},
      {"road_2, groups of 6", "{\"peft_type\": \"ROAD\", \"variant\": \"road_2\", \"group_size\": 6, " TGT_QV "}", gen_road_2},
      {"road_4, groups of 4", "{\"peft_type\": \"ROAD\", \"variant\": \"road_4\", \"group_size\": 4, " TGT_QV "}", gen_road_4}},
     {"road_theta one short", NULL, bad_road},
     "model.layers.0.self_attn.q_proj"},
    {"SHIRA", 1, NULL, delta_shira,
     {{"repeated indices", "{\"peft_type\": \"SHIRA\", " TGT_QV "}", gen_shira}},
     {"a row index past the weight", NULL, bad_shira},
     "model.layers.0.self_attn.q_proj"},
    {"SUPERTUNING", 1, NULL, delta_supertuning,
     {{"sparse only, repeated positions", "{\"peft_type\": \"SUPERTUNING\", \"r\": null, " TGT_QV "}",
       gen_supertuning},
      {"sparse and LoRA (Supra)",
       "{\"peft_type\": \"SUPERTUNING\", \"r\": 3, \"lora_alpha\": 5, " TGT_QV "}", gen_supertuning_lora}},
     {"a position past the weight", NULL, bad_supertuning},
     "model.layers.0.self_attn.q_proj"},
    {"PEANUT", 1, NULL, delta_peanut,
     {{"depth 0, relu", "{\"peft_type\": \"PEANUT\", \"r\": 3, " TGT_QV "}", gen_peanut},
      {"depth 2 (numbered encoders, decoders), gelu, scaling",
       "{\"peft_type\": \"PEANUT\", \"r\": 3, \"depth\": 2, \"act_fn\": \"gelu\", \"scaling\": 0.7, " TGT_QV "}",
       gen_peanut_deep}},
     {"depth 2 without peanut_encoders.1",
      "{\"peft_type\": \"PEANUT\", \"r\": 3, \"depth\": 2, \"act_fn\": \"gelu\", \"scaling\": 0.7, " TGT_QV "}",
      bad_peanut},
     "model.layers.0.self_attn.q_proj"},
    {"TINYLORA", 1, NULL, delta_tinylora,
     {{"a group per layer, layers found from their seeded projections",
       "{\"peft_type\": \"TINYLORA\", \"r\": 2, \"u\": 16, \"projection_seed\": 7, \"weight_tying\": 0.0, "
       "\"target_modules\": [\"q_proj\", \"down_proj\", \"c_attn\"]}",
       gen_tinylora},
      {"weight_tying 0.5 (two groups), u r^2 = 27 (the last 16 drawn again)",
       "{\"peft_type\": \"TINYLORA\", \"r\": 3, \"u\": 3, \"projection_seed\": 7, \"weight_tying\": 0.5, "
       "\"target_modules\": [\"q_proj\", \"down_proj\", \"c_attn\"]}",
       gen_tinylora_tied}},
     {"down_proj's tinylora_P drawn from another seed", NULL, bad_tinylora},
     "model.layers.0.mlp.down_proj"},
    {"ADAMSS", 1, ref_adamss, NULL,
     {{"rows of each subspace from the KMeans of the base's singular vectors; wide Linear, tall Linear with bias",
       "{\"peft_type\": \"ADAMSS\", \"r\": 3, \"num_subspaces\": 3, "
       "\"target_modules\": [\"q_proj\", \"down_proj\"]}",
       gen_adamss}},
     {"q_proj's subspaces 0 and 1 one row longer and shorter than the clustering", NULL, bad_adamss},
     "model.layers.0.self_attn.q_proj"},
    {"UNILORA", 1, NULL, delta_unilora,
     {{"indices regenerated (numpy's PCG64) in llama's module order, choice + shuffle",
       "{\"peft_type\": \"UNILORA\", \"r\": 2, \"theta_d_length\": 24, \"proj_seed\": 7, "
       "\"target_modules\": [\"q_proj\", \"v_proj\", \"down_proj\"]}",
       gen_unilora},
      {"save_indices: saved indices and scales, Linear and Conv1D",
       "{\"peft_type\": \"UNILORA\", \"r\": 3, \"theta_d_length\": 10, \"save_indices\": true, "
       "\"target_modules\": [\"q_proj\", \"c_attn\"]}",
       gen_unilora_saved}},
     {"a saved index beyond theta_d", "{\"peft_type\": \"UNILORA\", \"r\": 3, \"theta_d_length\": 10, "
      "\"save_indices\": true, \"target_modules\": [\"q_proj\", \"c_attn\"]}", bad_unilora},
     "model.layers.0.self_attn.q_proj"},
    {"PSOFT", 1, NULL, delta_psoft,
     {{"psoft_init, diagonal free R, both vectors",
       "{\"peft_type\": \"PSOFT\", \"r\": 3, \"psoft_alpha\": 6, \"psoft_orth\": false, " TGT_QV "}", gen_psoft},
      {"pissa_init, no vector_a",
       "{\"peft_type\": \"PSOFT\", \"r\": 3, \"psoft_alpha\": 5, \"psoft_orth\": false, \"psoft_mag_a\": false, "
       "\"ab_svd_init\": \"pissa_init\", " TGT_QV "}",
       gen_psoft_pissa}},
     {"psoft_R.weight of 6 values for r = 3", NULL, bad_psoft},
     "model.layers.0.self_attn.q_proj"},
    {"OSF", 0, NULL, delta_osf,
     {{"effective_rank 5, a biased layer", "{\"peft_type\": \"OSF\", \"effective_rank\": 5, " TGT_QV "}", gen_osf},
      {"effective_rank null (half of min(out, in))", "{\"peft_type\": \"OSF\", \"effective_rank\": null, " TGT_QV "}",
       gen_osf_default},
      {"effective_rank 0.25 (a fraction)", "{\"peft_type\": \"OSF\", \"effective_rank\": 0.25, " TGT_QV "}",
       gen_osf_fraction}},
     {"S_low one value short", NULL, bad_osf},
     "model.layers.0.self_attn.q_proj"},
    {"FROD", 0, NULL, delta_frod,
     {{"two layers of one category, a repeated S position, Conv1D",
       "{\"peft_type\": \"FROD\", \"target_modules\": [\"q_proj\", \"c_attn\"]}", gen_frod},
      {"a singular V (pinv fallback), attention_output and <n>.fc categories",
       "{\"peft_type\": \"FROD\", \"save_projection\": true, \"target_modules\": [\"dense\", \"fc\"]}",
       gen_frod_pinv}},
     {"an S position outside the matrix", NULL, bad_frod},
     "model.layers.0.self_attn.q_proj"},
    {"MISS", 1, NULL, delta_miss,
     {{"default, partial last block", "{\"peft_type\": \"MISS\", \"r\": 4, \"init_weights\": true, " TGT_QV "}", gen_miss},
      {"mini", "{\"peft_type\": \"MISS\", \"r\": 4, \"mini_r\": 3, \"init_weights\": \"mini\", " TGT_QV "}", gen_miss_mini}},
     {"miss_block one column too many", NULL, bad_miss},
     "model.layers.0.self_attn.q_proj"},
    {"C3A", 1, NULL, delta_c3a,
     {{"block sizes 3 and 7 (pattern)",
       "{\"peft_type\": \"C3A\", \"block_size\": 3, \"block_size_pattern\": {\"v_proj\": 7}, " TGT_QV "}", gen_c3a}},
     {"kernel block of 4 in a block-3 adapter", NULL, bad_c3a},
     "model.layers.0.self_attn.q_proj"},
    {"HIRA", 1, NULL, delta_hira,
     {{"linear, conv1d, embedding",
       "{\"peft_type\": \"HIRA\", \"r\": 4, \"target_modules\": [\"q_proj\", \"c_attn\", \"embed_tokens\"]}", gen_hira}},
     {"hira_B of rank 3", NULL, bad_hira},
     "model.layers.0.self_attn.q_proj"},
    {"BEFT", 1, ref_beft, NULL,
     {{"linear and conv1d biases", "{\"peft_type\": \"BEFT\", " TGT_QC "}", gen_beft}},
     {"a layer without bias", NULL, bad_beft},
     "model.layers.0.self_attn.q_proj"},
    {"LN_TUNING", 0, ref_ln_tuning, NULL,
     {{"weight and bias, weight only",
       "{\"peft_type\": \"LN_TUNING\", \"target_modules\": [\"input_layernorm\", \"norm\"]}", gen_ln_tuning}},
     {"norm weight one short", NULL, bad_ln_tuning},
     "model.norm"},
    {"TRAINABLE_TOKENS", 0, ref_trainable_tokens, NULL,
     {{"rows in config order",
       "{\"peft_type\": \"TRAINABLE_TOKENS\", \"target_modules\": [\"embed_tokens\"], \"token_indices\": [3, 17, 42, 5]}",
       gen_trainable_tokens}},
     {"3 rows for 4 indices", NULL, bad_trainable_tokens},
     "model.embed_tokens"},
};

/* ---- running a case ----------------------------------------------------------------------------- */
static const char *const mt_dts[3] = {"BF16", "F16", "F32"};

static void mt_init(mt_ctx *c, const mt_row *row, int vi, const char *bdt, const char *adt)
{
    memset(c, 0, sizeof *c);
    c->bdt = bdt;
    c->adt = adt;
    c->rng = 0x6d6574686f6473ull;
    for (const char *s = row->type; *s; s++)
        c->rng = (c->rng ^ (uint8_t)*s) * 1099511628211ull;
    c->rng ^= (uint64_t)(vi + 1) * 7919u + (uint64_t)bdt[1] * 131u + (uint64_t)adt[0];
    c->dir = th_tmpdir();
    cr_assert_not_null(c->dir);
    mt_base(c, "untouched.weight", SH(3, 5), 0, 1); /* in no adapter: copied as it is */
}

static void mt_free(mt_ctx *c)
{
    for (int k = 0; k < c->nb; k++) {
        free(c->base[k].v);
        free(c->ref[k]);
    }
    for (int k = 0; k < c->na; k++)
        free(c->ad[k].v);
    const char *keep = getenv("LM_METHODS_KEEP"); /* debugging: keep the generated files */
    if (keep != NULL && *keep)
        fprintf(stderr, "methods: kept %s\n", c->dir);
    else
        th_rmrf(c->dir);
    free(c->dir);
}

static void mt_write_st(const char *path, const mt_t *t, int n)
{
    th_out_tensor o[MT_MAX];
    for (int k = 0; k < n; k++) {
        o[k].name = t[k].name;
        o[k].dtype = t[k].dtype;
        o[k].n_dims = t[k].nd;
        memcpy(o[k].shape, t[k].shape, sizeof t[k].shape);
        for (int d = t[k].nd; d < 8; d++)
            o[k].shape[d] = 0;
        o[k].values = t[k].v;
    }
    cr_assert_eq(th_st_write(path, o, (size_t)n), 0, "cannot write %s", path);
}

static void mt_write(mt_ctx *c, char *base, char *adir, char *out, size_t cap)
{
    char p[1200];
    snprintf(base, cap, "%s/base.safetensors", c->dir);
    snprintf(adir, cap, "%s/adapter", c->dir);
    snprintf(out, cap, "%s/out.safetensors", c->dir);
    mt_write_st(base, c->base, c->nb);
    cr_assert_eq(mkdir(adir, 0777), 0);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", adir);
    mt_write_st(p, c->ad, c->na);
    snprintf(p, sizeof p, "%s/adapter_config.json", adir);
    cr_assert_eq(th_write_file(p, c->cfg, strlen(c->cfg)), 0);
    snprintf(p, sizeof p, "%s/config.json", c->dir);
    if (c->base_config != NULL)
        cr_assert_eq(th_write_file(p, c->base_config, strlen(c->base_config)), 0);
}

/* lora-merge -q [opts...] base adapter out */
static th_run_result mt_merge(const char *base, const char *adir, const char *out, const char *const *opts)
{
    const char *argv[16];
    int n = 0;
    argv[n++] = th_bin();
    argv[n++] = "-q";
    for (; opts && *opts; opts++)
        argv[n++] = *opts;
    argv[n++] = base;
    argv[n++] = adir;
    argv[n++] = out;
    argv[n] = NULL;
    return th_run(NULL, argv);
}

typedef struct {
    uint64_t exact[3], total[3];
} mt_stats;

static int mt_dti(const char *dt) { return !strcmp(dt, "BF16") ? 0 : !strcmp(dt, "F16") ? 1 : 2; }

/* every base tensor in the output, same dtype and shape; the expected ones by the golden rule, the
 * others bit for bit */
static void mt_check(const mt_ctx *c, const char *out, const char *what, mt_stats *st)
{
    th_st o;
    cr_assert_eq(th_st_read(out, &o), 0, "%s: output unreadable", what);
    cr_assert_eq(o.n, (size_t)c->nb, "%s: %zu tensors in the output, %d in the base", what, o.n, c->nb);
    int changed = 0;
    for (int k = 0; k < c->nb; k++) {
        const mt_t *b = &c->base[k];
        const th_tensor *t = th_st_find(&o, b->name);
        cr_assert_not_null(t, "%s: %s missing from the output", what, b->name);
        cr_assert_str_eq(t->dtype, b->dtype, "%s: %s", what, b->name);
        cr_assert(t->n_dims == b->nd && memcmp(t->shape, b->shape, (size_t)b->nd * sizeof(uint64_t)) == 0,
                  "%s: %s has another shape", what, b->name);
        double *v = th_to_f64(t);
        if (c->ref[k] != NULL) {
            th_cmp cmp = th_compare(b->dtype, v, c->ref[k], (size_t)b->n);
            cr_assert(cmp.ok, "%s: %s: %s", what, b->name, cmp.why);
            for (uint64_t e = 0; e < b->n; e++)
                st->exact[mt_dti(b->dtype)] += v[e] == th_round_to(c->ref[k][e], b->dtype);
            st->total[mt_dti(b->dtype)] += b->n;
            changed++;
        } else {
            for (uint64_t e = 0; e < b->n; e++)
                cr_assert(v[e] == b->v[e], "%s: %s changed at element %llu though nothing adapts it", what, b->name,
                          (unsigned long long)e);
        }
        free(v);
    }
    th_st_free(&o);
    cr_assert_gt(changed, 0, "%s: the reference changes nothing", what);
}

static void mt_case(const mt_row *row, int vi, const char *bdt, const char *adt, double scale, int tiles, mt_stats *st)
{
    mt_ctx c;
    mt_init(&c, row, vi, bdt, adt);
    c.cfg = row->v[vi].cfg;
    row->v[vi].gen(&c);
    char base[1100], adir[1100], out[1100], what[300], sc[32];
    snprintf(what, sizeof what, "%s %s (%s base, %s adapter%s%s)", row->type, row->v[vi].label, bdt, adt,
             scale != 1 ? ", --scale " : "", scale != 1 ? "-0.75" : "");
    mt_write(&c, base, adir, out, sizeof base);
    snprintf(sc, sizeof sc, "%.17g", scale);
    /* one thread: the wall time of these tiny merges is mostly thread start-up (methods_det
     * checks that the threads change nothing) */
    const char *opts[] = {"--threads", "1", scale != 1 ? "--scale" : NULL, sc, NULL};
    th_run_result r = mt_merge(base, adir, out, opts);
    cr_assert_eq(r.status, 0, "%s: exit %d: %s", what, r.status, r.err);
    th_run_free(&r);
    char out2[1200];
    if (tiles) { /* the same merge in tiles of about two rows */
        snprintf(out2, sizeof out2, "%s/out-tiles.safetensors", c.dir);
        const char *o2[] = {"--threads", "1", "--tile-elems", "100", scale != 1 ? "--scale" : NULL, sc, NULL};
        r = mt_merge(base, adir, out2, o2);
        cr_assert_eq(r.status, 0, "%s, --tile-elems 100: exit %d: %s", what, r.status, r.err);
        th_run_free(&r);
    }
    if (row->delta != NULL)
        mt_add_deltas(&c, row->delta);
    else
        row->ref(&c);
    if (scale != 1) /* the change, weighted */
        for (int k = 0; k < c.nb; k++)
            if (c.ref[k] != NULL)
                for (uint64_t e = 0; e < c.base[k].n; e++)
                    c.ref[k][e] = c.base[k].v[e] + scale * (c.ref[k][e] - c.base[k].v[e]);
    mt_check(&c, out, what, st);
    if (tiles) { /* the same bytes in small tiles (issue 15: the tile products are row-independent) */
        mt_stats ignored;
        memset(&ignored, 0, sizeof ignored);
        strncat(what, ", --tile-elems 100", sizeof what - strlen(what) - 1);
        mt_check(&c, out2, what, &ignored);
        cr_assert(th_files_equal(out, out2), "%s: not the bytes of the default tiling", what);
    }
    mt_free(&c);
}

/* a malformed adapter: exit 1, one `error:` line naming the module, nothing written, inputs
 * unchanged; --dry-run refuses it the same way */
static void mt_refusal(const mt_row *row)
{
    mt_ctx c;
    mt_init(&c, row, 99, "BF16", "F32");
    c.cfg = row->bad.cfg ? row->bad.cfg : row->v[0].cfg;
    row->bad.gen(&c);
    char base[1100], adir[1100], out[1100], am[1200];
    mt_write(&c, base, adir, out, sizeof base);
    snprintf(am, sizeof am, "%s/adapter_model.safetensors", adir);
    uint64_t hb = th_file_hash(base), ha = th_file_hash(am);
    const char *opts[2][4] = {{"--threads", "1", NULL}, {"--threads", "1", "--dry-run", NULL}};
    for (int k = 0; k < 2; k++) {
        const char *how = k ? "--dry-run" : "merge";
        th_run_result r = mt_merge(base, adir, out, opts[k]);
        const char *e = r.err, *nl = strchr(e, '\n');
        cr_assert_eq(r.status, 1, "%s refusal (%s, %s): exit %d, stderr: %s", row->type, row->bad.label, how, r.status, e);
        cr_assert(strncmp(e, "error: ", 7) == 0 && nl != NULL && nl[1] == '\0',
                  "%s refusal (%s, %s): not one `error:` line: %s", row->type, row->bad.label, how, e);
        cr_assert(strstr(e, row->bad_names) != NULL, "%s refusal (%s, %s): the error does not name %s: %s", row->type,
                  row->bad.label, how, row->bad_names, e);
        cr_assert(!th_exists(out) && th_count_entries(c.dir) == 2 + (c.base_config != NULL),
                  "%s refusal (%s, %s): output or temporary file left",
                  row->type, row->bad.label, how);
        th_run_free(&r);
    }
    cr_assert(th_file_hash(base) == hb && th_file_hash(am) == ha, "%s refusal: an input was modified", row->type);
    mt_free(&c);
}

static const mt_row *mt_row_of(const char *type, int *index)
{
    for (size_t k = 0; k < sizeof mt_rows / sizeof *mt_rows; k++)
        if (strcmp(mt_rows[k].type, type) == 0) {
            *index = (int)k;
            return &mt_rows[k];
        }
    cr_assert_fail("no row for %s", type);
    return NULL;
}

static void mt_type(const char *type)
{
    int ri;
    const mt_row *row = mt_row_of(type, &ri);
    mt_stats st;
    memset(&st, 0, sizeof st);
    /* variant 0: every base dtype, a BF16 adapter once, --scale on the F32 run of additive types */
    mt_case(row, 0, "BF16", "F32", 1, 0, &st);
    mt_case(row, 0, "F16", "BF16", 1, 0, &st);
    mt_case(row, 0, "F32", "F32", row->additive ? -0.75 : 1, 1, &st);
    for (int vi = 1; vi < 5 && row->v[vi].gen != NULL; vi++)
        mt_case(row, vi, mt_dts[(vi + ri) % 3], vi % 2 ? "BF16" : "F32", 1, 0, &st);
    mt_refusal(row);
    const char *rep = getenv("LM_METHODS_REPORT");
    if (rep != NULL && *rep) {
        char line[400];
        int n = snprintf(line, sizeof line, "methods: %-17s exactly rounded:", type);
        for (int d = 0; d < 3; d++)
            if (st.total[d] > 0)
                n += snprintf(line + n, sizeof line - (size_t)n, "  %s %6.2f%% (%llu/%llu)", mt_dts[d],
                              100.0 * (double)st.exact[d] / (double)st.total[d], (unsigned long long)st.exact[d],
                              (unsigned long long)st.total[d]);
        fprintf(stderr, "%s\n", line);
    }
}

/* variant 0 of a type written out for repeated merges, the base dtype cycling over the types */
static void mt_det_setup(mt_ctx *c, const char *type, char *base, char *adir, size_t cap)
{
    int ri;
    const mt_row *row = mt_row_of(type, &ri);
    mt_init(c, row, 0, mt_dts[ri % 3], "F32");
    c->cfg = row->v[0].cfg;
    row->v[0].gen(c);
    char out[1100];
    mt_write(c, base, adir, out, cap);
}

static void mt_det_run(const mt_ctx *c, const char *base, const char *adir, int k, const char *const *opts, char *out,
                       size_t cap)
{
    snprintf(out, cap, "%s/out%d.safetensors", c->dir, k);
    th_run_result r = mt_merge(base, adir, out, opts);
    cr_assert_eq(r.status, 0, "%s base, run %d: exit %d: %s", c->bdt, k, r.status, r.err);
    th_run_free(&r);
}

/* the same bytes with --threads 1, --threads 2 and --kernels ref, with tiles of about two rows
 * (--tile-elems 100: many tiles per tensor for the threads to share) */
static void mt_det(const char *type)
{
    mt_ctx c;
    char base[1100], adir[1100], o[3][1200];
    mt_det_setup(&c, type, base, adir, sizeof base);
    const char *opts[3][7] = {{"--threads", "1", "--tile-elems", "100", NULL},
                              {"--threads", "2", "--tile-elems", "100", NULL},
                              {"--threads", "2", "--tile-elems", "100", "--kernels", "ref", NULL}};
    for (int k = 0; k < 3; k++)
        mt_det_run(&c, base, adir, k, opts[k], o[k], sizeof o[k]);
    cr_assert(!th_files_equal(o[0], base), "%s: the merge changed nothing", type);
    cr_assert(th_files_equal(o[0], o[1]), "%s (%s base): --threads 2 differs from --threads 1", type, c.bdt);
    cr_assert(th_files_equal(o[1], o[2]), "%s (%s base): --kernels ref differs from the default kernels", type, c.bdt);
    mt_free(&c);
}

#define MT_TEST(T)                                                                                                     \
    Test(methods, T, .timeout = 120) { mt_type(#T); }                                                                  \
    Test(methods_det, T, .timeout = 120) { mt_det(#T); }

MT_TEST(LORA)
MT_TEST(ADALORA)
MT_TEST(IA3)
MT_TEST(LOHA)
MT_TEST(LOKR)
MT_TEST(VERA)
MT_TEST(PVERA)
MT_TEST(RANDLORA)
MT_TEST(VBLORA)
MT_TEST(DELORA)
MT_TEST(GRALORA)
MT_TEST(FOURIERFT)
MT_TEST(WAVEFT)
MT_TEST(GLORA)
MT_TEST(DEFT)
MT_TEST(OFT)
MT_TEST(BOFT)
MT_TEST(HRA)
MT_TEST(ROAD)
MT_TEST(SHIRA)
MT_TEST(PSOFT)
MT_TEST(OSF)
MT_TEST(FROD)
MT_TEST(UNILORA)
MT_TEST(ADAMSS)
MT_TEST(TINYLORA)
MT_TEST(PEANUT)
MT_TEST(SUPERTUNING)
MT_TEST(MISS)
MT_TEST(C3A)
MT_TEST(HIRA)
MT_TEST(BEFT)
MT_TEST(LN_TUNING)
MT_TEST(TRAINABLE_TOKENS)

/* Uni-LoRA without saved indices: the layers' order must be known, else the merge is refused */
Test(methods, unilora_unknown_module_order_refused, .timeout = 60)
{
    static const struct {
        const char *config, *cfg, *says;
    } cases[] = {
        {NULL, NULL, "no model_type: lora-merge cannot tell whether"},
        {"{\"model_type\": \"gemma\"}", NULL, "model_type 'gemma'"},
        {"{\"model_type\": \"gemma\"}", "{\"peft_type\": \"UNILORA\", \"r\": 2, \"theta_d_length\": 24, "
         "\"target_modules\": \"all-linear\"}", "target_modules 'all-linear'"},
        {"{\"model_type\": \"llama\"}", "{\"peft_type\": \"UNILORA\", \"r\": 2, \"theta_d_length\": 24, "
         "\"target_modules\": [\"nothing\"]}", "selects no 2-D weight"},
        {"{\"model_type\": \"llama\"}", "{\"peft_type\": \"UNILORA\", \"r\": 2, \"theta_d_length\": 24, "
         "\"target_modules\": [\"q_proj\", \"v_proj\", \"down_proj\", \"untouched\"]}", "no Linear layer of a llama"},
    };
    int ri;
    const mt_row *row = mt_row_of("UNILORA", &ri);
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        mt_ctx c;
        mt_init(&c, row, 0, "F16", "F32");
        c.cfg = cases[k].cfg ? cases[k].cfg : row->v[0].cfg;
        row->v[0].gen(&c);
        c.base_config = cases[k].config;
        char base[1100], adir[1100], out[1100];
        mt_write(&c, base, adir, out, sizeof base);
        th_run_result r = mt_merge(base, adir, out, NULL);
        cr_assert_eq(r.status, 1, "case %zu: exit %d: %s", k, r.status, r.err);
        cr_assert(strstr(r.err, cases[k].says) != NULL && strchr(r.err, '\n') == r.err + strlen(r.err) - 1,
                  "case %zu: not one line saying '%s': %s", k, cases[k].says, r.err);
        cr_assert(!th_exists(out), "case %zu: output left", k);
        th_run_free(&r);
        mt_free(&c);
    }
}

/* every row has its test above, and the table has no duplicates */
Test(methods, table_is_complete)
{
    /* one type a line (helpers add types in parallel) */
    static const char *const tested[] = {
        "LORA",
        "ADALORA",
        "IA3",
        "LOHA",
        "LOKR",
        "VERA",
        "PVERA",
        "RANDLORA",
        "VBLORA",
        "DELORA",
        "GRALORA",
        "FOURIERFT",
        "WAVEFT",
        "GLORA",
        "DEFT",
        "OFT",
        "BOFT",
        "HRA",
        "ROAD",
        "SHIRA",
        "PSOFT",
        "OSF",
        "FROD",
        "UNILORA",
        "ADAMSS",
        "TINYLORA",
        "PEANUT",
        "SUPERTUNING",
        "MISS",
        "C3A",
        "HIRA",
        "BEFT",
        "LN_TUNING",
        "TRAINABLE_TOKENS",
    };
    size_t n = sizeof mt_rows / sizeof *mt_rows;
    cr_assert_eq(n, sizeof tested / sizeof *tested);
    for (size_t k = 0; k < n; k++) {
        int found = 0;
        for (size_t j = 0; j < n; j++)
            found += strcmp(mt_rows[k].type, tested[j]) == 0;
        cr_assert_eq(found, 1, "%s", mt_rows[k].type);
    }
}

/* the test's own MT19937 against the standard's published outputs (seed 5489: first 3499211612,
 * 10000th 4123659995), so FourierFT's reference rests on a checked generator */
Test(methods, mt19937_reference_outputs)
{
    mt19937 g;
    mt19937_seed(&g, 5489);
    cr_assert_eq(mt19937_next(&g), 3499211612u);
    for (int k = 2; k < 10000; k++)
        mt19937_next(&g);
    cr_assert_eq(mt19937_next(&g), 4123659995u);
    uint64_t *p = mt_randperm(10, 0, 10); /* a permutation */
    int seen[10] = {0};
    for (int k = 0; k < 10; k++)
        seen[p[k]]++;
    for (int k = 0; k < 10; k++)
        cr_assert_eq(seen[k], 1);
    free(p);
}

/* VB-LoRA saved with save_only_topk_weights: each row's k-1 weights w, the last 1 - sum(w) in their
 * dtype, logs taken by PEFT's load.  A row whose weights sum above 1 once rounded to their dtype, or
 * with a negative weight, loads as NaN there, and was merged with a negative last weight: refused
 * (exit 1, one line naming the module, the tensor and the row; no output).  Rows that sum above 1
 * only before that rounding load fine in PEFT (1 - 1 = 0, log 0 = -inf: weight 0) and are merged:
 * 0.6f + 0.4f (f32: 1 + 2^-25.4, rounds to 1), bf16 0.5 + 0.50390625 (1 + 2^-8, a tie to 1). */
static int vbw_merge(const char *tmp, const char *wdtype, double w0, double w1, th_run_result *out)
{
    char dir[1200], p[1300];
    snprintf(dir, sizeof dir, "%s/ad", tmp);
    th_rmrf(dir);
    mkdir(dir, 0777);
    th_write_text(dir, "adapter_config.json", "{\"peft_type\": \"VBLORA\", \"r\": 2, \"topk\": 3, \"num_vectors\": 4, "
                                              "\"vector_length\": 4, \"save_only_topk_weights\": true, "
                                              "\"target_modules\": [\"q_proj\"]}");
    double bank[16], ia[12], ib[12], wa[8], wb[8];
    for (int i = 0; i < 16; i++)
        bank[i] = (i % 5) * 0.125 - 0.25;
    for (int i = 0; i < 12; i++)
        ia[i] = ib[i] = i % 3 == 0 ? 2 : i % 3 == 1 ? 0 : 3; /* each row the bank vectors 2, 0, 3 */
    for (int i = 0; i < 8; i++)
        wa[i] = wb[i] = i % 2 ? 0.25 : 0.5;
    wb[6] = w0; /* B's last row (q = 1, a = 1) */
    wb[7] = w1;
#define VBM "base_model.model.model.layers.0.self_attn.q_proj."
    th_out_tensor t[5] = {{"base_model.vblora_vector_bank", "F32", 2, {4, 4}, bank},
                          {VBM "vblora_logits_A_topk_indices", "I64", 3, {2, 2, 3}, ia},
                          {VBM "vblora_logits_A_topk_weights", wdtype, 3, {2, 2, 2}, wa},
                          {VBM "vblora_logits_B_topk_indices", "I64", 3, {2, 2, 3}, ib},
                          {VBM "vblora_logits_B_topk_weights", wdtype, 3, {2, 2, 2}, wb}};
#undef VBM
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    cr_assert_eq(th_st_write(p, t, 5), 0);
    snprintf(p, sizeof p, "%s/out.safetensors", tmp);
    unlink(p);
    char cmd[8500], bin[PATH_MAX];
    cr_assert_not_null(realpath(th_bin(), bin));
    snprintf(cmd, sizeof cmd, "cd %s && %s base.safetensors ad out.safetensors", tmp, bin);
    *out = th_sh(cmd);
    return th_exists(p);
}

Test(methods, vblora_topk_weights_summing_above_one_refused)
{
    char *tmp = th_tmpdir();
    double w[64];
    for (int i = 0; i < 64; i++)
        w[i] = (i % 7) * 0.01;
    th_out_tensor base = {"model.layers.0.self_attn.q_proj.weight", "F32", 2, {8, 8}, w};
    char p[1200];
    snprintf(p, sizeof p, "%s/base.safetensors", tmp);
    cr_assert_eq(th_st_write(p, &base, 1), 0);
    static const struct {
        const char *dtype;
        double w0, w1;
        int ok;
        const char *says;
    } cases[] = {
        {"F32", 0.5, 0.25, 1, NULL},
        {"F32", 0.75, 0.3, 0, "row 3: its 2 saved top-k weights sum to 1.05000001, above 1"},
        {"F32", 0.6, 0.4, 1, NULL},
        {"F32", 1.25, -0.25, 0, "row 3 holds the weight -0.25"},
        {"BF16", 0.5, 0.50390625, 1, NULL},
        {"BF16", 0.5, 0.5078125, 0, "row 3: its 2 saved top-k weights sum to 1.0078125, above 1"},
        {"F16", 0.5, 0.5009765625, 0, "above 1"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        th_run_result r;
        int wrote = vbw_merge(tmp, cases[c].dtype, cases[c].w0, cases[c].w1, &r);
        if (cases[c].ok) {
            cr_assert(r.status == 0 && wrote, "case %zu: exit %d: %s", c, r.status, r.err);
        } else {
            cr_assert(r.status == 1 && !wrote, "case %zu: exit %d, output %d: %s", c, r.status, wrote, r.err);
            cr_assert(strchr(r.err, '\n') == r.err + strlen(r.err) - 1 && strstr(r.err, "InvalidTensor") &&
                          strstr(r.err, "model.layers.0.self_attn.q_proj") &&
                          strstr(r.err, "vblora_logits_B_topk_weights' ") && strstr(r.err, cases[c].says),
                      "case %zu: %s", c, r.err);
        }
        th_run_free(&r);
    }
    th_rmrf(tmp);
    free(tmp);
}
