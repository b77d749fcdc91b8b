/* SPDX-License-Identifier: MIT */
/* formats_kohya.c : kohya-ss sd-scripts and LyCORIS files.
 *
 * Keys are "<name>.<part>" with name = prefix + "_" + the module path with '.' replaced by '_'
 * (prefixes lora_unet, lora_te, lora_te1/2/3, lycoris).  The flattened name is resolved against
 * the base by the core (never split on '_').  Per module (sd-scripts networks/lora.py,
 * LyCORIS lycoris/modules/):
 *   LoRA / LoCon  lora_down.weight [r, in(, kh, kw)] = PEFT A, lora_up.weight [out, r(, 1, 1)] = B,
 *                 alpha (0-d; missing or 0 means r); scale alpha / r with r = lora_down's rows.
 *                 With rs_lora LyCORIS stores alpha * sqrt(r), so alpha / r is still the scale.
 *                 lora_mid.weight [r, r, kh, kw] (Tucker): dW[p, c, x, y] = sum up[p, i] mid[i, j, x, y]
 *                 down[j, c] -- folded exactly into A' = mid x down (in double, rounded once to F32).
 *   LoHa          hada_w1_a/_b, hada_w2_a/_b (hada_t1/_t2): PEFT's names and layout; r = w1_b's rows.
 *   Conv1d        LyCORIS's 3-D Tucker cores (lora_mid, hada_t1/_t2, lokr_t2 [r, r, k]) are viewed
 *                 [r, r, k, 1] (PEFT's form) and a whole 3-D lokr_w2 [b, d, k] as [b, d * k] (LyCORIS's
 *                 make_kron unsqueezes w1 at the end: the flat kron).
 *   LoKr          lokr_w1 or lokr_w1_a/_b, lokr_w2 or lokr_w2_a/_b (lokr_t2): PEFT's names; r is the
 *                 inner dimension of a decomposed factor; both factors full: scale 1 (LyCORIS
 *                 forces alpha = r there, PEFT does not, so the config gets alpha = r).
 *   IA3           weight (+ on_input): W *= (1 + weight), per output row or per input column.
 *   full          diff (+ diff_b): W += diff, b += diff_b: an identity factor makes it an exact LoRA.
 *   dora_scale    (LoRA / LoCon, LoHa, LoKr: LyCORIS's weight decomposition) kept whole as the part
 *                 "lycoris_dora_scale", merged by src/methods/lycoris.c with LyCORIS's rule (its
 *                 shape [out, 1, ...] or [1, in, 1, ...] says the axis; eps 2^-23).
 *   norm          w_norm (+ b_norm): W += w_norm, b += b_norm on a LayerNorm / GroupNorm: the parts
 *                 "lycoris_w_norm" / "lycoris_b_norm" (src/methods/lycoris.c).
 * Neither of the last two is a PEFT adapter: `convert` refuses them (adapter_formats.c).
 * Refused, saying why: OFT/BOFT (oft_blocks, oft_diag), GLoRA, dora_scale on IA3 / full modules. */
#include "formats_internal.h"

#include "compat.h"
#include "linalg.h"
#include "lm_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const PREFIXES[] = {"lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_te", "lycoris"};

typedef struct {
    const char *key;    /* borrowed: the full key */
    size_t name_len;    /* the module name is key[0 .. name_len) */
    const char *part;   /* after the '.' */
    const lm_ts_tensor *t;
    size_t order;
} kentry;

static int cmp_entry(const void *x, const void *y)
{
    const kentry *a = x, *b = y;
    size_t n = a->name_len < b->name_len ? a->name_len : b->name_len;
    int c = memcmp(a->key, b->key, n);
    if (c == 0 && a->name_len != b->name_len)
        c = a->name_len < b->name_len ? -1 : 1;
    if (c == 0)
        c = a->order < b->order ? -1 : a->order > b->order;
    return c;
}

/* parts of one module, by name */
typedef struct {
    const lm_ts_tensor *down, *up, *mid, *alpha, *dora, *diff, *diff_b, *ia3, *on_input, *w_norm, *b_norm;
    const lm_ts_tensor *h1a, *h1b, *h2a, *h2b, *ht1, *ht2, *k1, *k1a, *k1b, *k2, *k2a, *k2b, *kt2;
} kparts;

static lm_code take_part(kparts *p, const kentry *e, lm_err *err)
{
    static const struct {
        const char *name;
        size_t off;
    } table[] = {
        {"lora_down.weight", offsetof(kparts, down)}, {"lora_up.weight", offsetof(kparts, up)},
        {"lora_mid.weight", offsetof(kparts, mid)},   {"alpha", offsetof(kparts, alpha)},
        {"dora_scale", offsetof(kparts, dora)},       {"diff", offsetof(kparts, diff)},
        {"diff_b", offsetof(kparts, diff_b)},         {"weight", offsetof(kparts, ia3)},
        {"on_input", offsetof(kparts, on_input)},     {"hada_w1_a", offsetof(kparts, h1a)},
        {"hada_w1_b", offsetof(kparts, h1b)},         {"hada_w2_a", offsetof(kparts, h2a)},
        {"hada_w2_b", offsetof(kparts, h2b)},         {"hada_t1", offsetof(kparts, ht1)},
        {"hada_t2", offsetof(kparts, ht2)},           {"lokr_w1", offsetof(kparts, k1)},
        {"lokr_w1_a", offsetof(kparts, k1a)},         {"lokr_w1_b", offsetof(kparts, k1b)},
        {"lokr_w2", offsetof(kparts, k2)},            {"lokr_w2_a", offsetof(kparts, k2a)},
        {"lokr_w2_b", offsetof(kparts, k2b)},         {"lokr_t2", offsetof(kparts, kt2)},
        {"w_norm", offsetof(kparts, w_norm)},         {"b_norm", offsetof(kparts, b_norm)},
    };
    for (size_t i = 0; i < LM_ARRAY_LEN(table); i++)
        if (strcmp(e->part, table[i].name) == 0) {
            const lm_ts_tensor **slot = (const lm_ts_tensor **)((char *)p + table[i].off);
            if (*slot != NULL)
                return lm_fail(err, LM_E_FORMAT, "DuplicateKey", "two tensors for '%s'", e->key);
            *slot = e->t;
            return LM_OK;
        }
    const char *why = "a part lora-merge does not know";
    if (strstr(e->part, "oft_") || strcmp(e->part, "rescale") == 0)
        why = "LyCORIS OFT / BOFT: its rotation parametrisation differs from PEFT's OFT; not supported";
    else if (fm_starts_with(e->part, "a1.") || fm_starts_with(e->part, "a2.") || fm_starts_with(e->part, "b1.") ||
             fm_starts_with(e->part, "b2."))
        why = "LyCORIS GLoRA: not a PEFT method; not supported";
    lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedPart", "part '%s': %s", e->part, why);
    lm_err_set_tensor(err, e->key);
    return LM_E_UNSUPPORTED;
}

static lm_code need_float(const lm_ts_tensor *t, lm_err *err)
{
    if (t != NULL && !fm_is_float(t->dtype)) {
        lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "tensor '%s' is %s, not a float", t->name,
                lm_dtype_name(t->dtype));
        lm_err_set_tensor(err, t->name);
        return LM_E_UNSUPPORTED;
    }
    return LM_OK;
}

/* alpha of a module: the tensor's value, or r when missing or 0 (sd-scripts, LyCORIS) */
static lm_code module_alpha(const kparts *p, long r, double *alpha, lm_err *err)
{
    *alpha = (double)r;
    if (p->alpha == NULL)
        return LM_OK;
    double v;
    lm_code rc = fm_scalar(p->alpha, &v, err);
    if (rc != LM_OK) {
        lm_err_set_tensor(err, p->alpha->name);
        return rc;
    }
    if (v != 0)
        *alpha = v;
    return LM_OK;
}

static const lm_ts_tensor *identity(fm_ctx *c, uint64_t n, size_t n_dims, lm_err *err)
{
    if (n > ((uint64_t)1 << 15)) {
        lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "a full delta of %llu rows and columns is too large to merge "
                "as a low-rank product", (unsigned long long)n);
        return NULL;
    }
    float *d = calloc((size_t)(n * n), sizeof *d);
    if (d == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    for (uint64_t i = 0; i < n; i++)
        d[i * n + i] = 1.0f;
    uint64_t shape[LM_TS_MAX_DIMS] = {n, n};
    for (size_t k = 2; k < n_dims; k++)
        shape[k] = 1;
    return fm_made(c, LM_DT_F32, n_dims < 2 ? 2 : n_dims, shape, d, err);
}

/* LoCon's Tucker core folded into the down factor: A'[i, c, x, y] = sum_j mid[i, j, x, y] down[j, c] */
static const lm_ts_tensor *fold_tucker(fm_ctx *c, const kparts *p, lm_err *err)
{
    const lm_ts_tensor *mid = p->mid, *down = p->down;
    uint64_t r = down->shape[0], in = down->n_elems / (r ? r : 1);
    int ok = (mid->n_dims == 4 || mid->n_dims == 3) && mid->shape[0] == r && mid->shape[1] == r && down->n_dims >= 2;
    for (size_t d = 2; ok && d < down->n_dims; d++)
        ok = down->shape[d] == 1;
    if (!ok) {
        lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "lora_mid [%llu, %llu, ...] does not fit lora_down [%llu, ...] "
                "(Tucker form: lora_mid [r, r, kh, kw], lora_down [r, in, 1, 1])",
                (unsigned long long)mid->shape[0], (unsigned long long)(mid->n_dims > 1 ? mid->shape[1] : 0),
                (unsigned long long)r);
        lm_err_set_tensor(err, mid->name);
        return NULL;
    }
    const size_t kk = (size_t)(mid->shape[2] * (mid->n_dims == 4 ? mid->shape[3] : 1)), n = (size_t)(r * in * kk);
    float *o = malloc(n * sizeof *o + 1), *mf = malloc((size_t)mid->n_elems * sizeof *mf + 1),
          *df = malloc((size_t)(r * in) * sizeof *df + 1);
    double *u = malloc(n * sizeof *u + 1);
    if (o == NULL || mf == NULL || df == NULL || u == NULL) {
        free(o);
        o = NULL;
    } else { /* the factors as f32 (exact for f16/bf16/f32 files), folded in f64, rounded once */
        for (uint64_t i = 0; i < mid->n_elems; i++)
            mf[i] = (float)fm_get(mid, i);
        for (uint64_t i = 0; i < r * in; i++)
            df[i] = (float)fm_get(down, i);
        lm_tucker_fold(mf, df, (size_t)r, (size_t)in, kk, u);
        for (size_t i = 0; i < n; i++)
            o[i] = (float)u[i];
    }
    free(mf);
    free(df);
    free(u);
    if (o == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    uint64_t shape[4] = {r, in, mid->shape[2], mid->n_dims == 4 ? mid->shape[3] : 1};
    return fm_made(c, LM_DT_F32, mid->n_dims, shape, o, err); /* Conv1d: [r, in, k] */
}

static lm_code add_lora(fm_ctx *c, fm_module *m, const kparts *p, lm_err *err)
{
    lm_code rc;
    if (p->up == NULL || p->down == NULL)
        return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "has lora_%s.weight but no lora_%s.weight",
                       p->up ? "up" : "down", p->up ? "down" : "up");
    if ((rc = need_float(p->up, err)) || (rc = need_float(p->down, err)) || (rc = need_float(p->mid, err)))
        return rc;
    if (p->down->n_dims < 2 || p->up->n_dims < 2 || p->up->shape[1] != p->down->shape[0])
        return lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "lora_up '%s' and lora_down '%s' disagree on the rank",
                       p->up->name, p->down->name);
    const lm_ts_tensor *A = p->down;
    if (p->mid != NULL && (A = fold_tucker(c, p, err)) == NULL)
        return err ? err->code : LM_E_FORMAT;
    m->r = (long)p->down->shape[0];
    if ((rc = module_alpha(p, m->r, &m->alpha, err)) != LM_OK)
        return rc;
    if ((rc = fm_part_add(m, "lora_A.weight", A, err)) != LM_OK)
        return rc;
    return fm_part_add(m, "lora_B.weight", p->up, err);
}

static lm_code add_diff(fm_ctx *c, fm_module *m, const kparts *p, lm_err *err)
{
    const lm_ts_tensor *d = p->diff;
    lm_code rc = need_float(d, err);
    if (rc == LM_OK)
        rc = need_float(p->diff_b, err);
    if (rc != LM_OK)
        return rc;
    if (d->n_dims < 2)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "diff '%s' of a %zu-D weight: only matrices and "
                       "convolution kernels", d->name, d->n_dims);
    uint64_t out = d->shape[0], in = d->n_elems / (out ? out : 1);
    const lm_ts_tensor *A, *B;
    if (d->n_dims == 2 && in < out) { /* W += diff @ I */
        A = identity(c, in, 2, err);
        B = d;
        m->r = (long)in;
    } else { /* W += I @ diff; a kernel diff is A [out, in, kh, kw] and B = I viewed [out, out, 1, 1] */
        A = d;
        B = identity(c, out, d->n_dims, err);
        m->r = (long)out;
    }
    if (A == NULL || B == NULL)
        return err ? err->code : LM_E_NOMEM;
    m->alpha = (double)m->r; /* scale 1 */
    if ((rc = fm_part_add(m, "lora_A.weight", A, err)) || (rc = fm_part_add(m, "lora_B.weight", B, err)))
        return rc;
    if (p->diff_b != NULL) {
        if (p->diff_b->n_elems != out)
            return lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "diff_b has %llu elements, the layer %llu outputs",
                           (unsigned long long)p->diff_b->n_elems, (unsigned long long)out);
        uint64_t shape[1] = {out};
        const lm_ts_tensor *b = p->diff_b->n_dims == 1 ? p->diff_b : fm_reshaped(c, p->diff_b, 1, shape, err);
        if (b == NULL || (rc = fm_part_add(m, "lora_B.bias", b, err)) != LM_OK)
            return b == NULL ? LM_E_NOMEM : rc;
    }
    return fm_note(c, "%s: full delta of '%s' merged as an exact rank-%ld product with an identity factor", c->path,
                   m->src, m->r);
}

static lm_code add_ia3(fm_ctx *c, fm_module *m, const kparts *p, lm_err *err)
{
    if (p->ia3 == NULL)
        return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "IA3 module has on_input but no weight");
    lm_code rc = need_float(p->ia3, err);
    if (rc != LM_OK)
        return rc;
    double on_input = 0;
    if (p->on_input != NULL && (rc = fm_scalar(p->on_input, &on_input, err)) != LM_OK)
        return rc;
    const lm_ts_tensor *w = p->ia3;
    uint64_t n = w->n_elems;
    float *l = malloc((size_t)n * sizeof *l + 1);
    if (l == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    /* LyCORIS multiplies by (weight + 1), computed in float32 */
    for (uint64_t i = 0; i < n; i++)
        l[i] = (float)fm_get(w, i) + 1.0f;
    m->ia3_ff = on_input != 0;
    m->ia3_no_bias = !m->ia3_ff;
    uint64_t shape[LM_TS_MAX_DIMS];
    size_t nd;
    if (w->n_dims <= 1) { /* Linear: PEFT's [out, 1] or, for input features, [1, in] */
        shape[0] = m->ia3_ff ? 1 : n;
        shape[1] = m->ia3_ff ? n : 1;
        nd = 2;
    } else {
        nd = w->n_dims;
        memcpy(shape, w->shape, nd * sizeof *shape);
    }
    const lm_ts_tensor *t = fm_made(c, LM_DT_F32, nd, shape, l, err);
    if (t == NULL)
        return LM_E_NOMEM;
    m->r = 1;
    m->alpha = 1;
    return fm_part_add(m, "ia3_l", t, err);
}

/* a Conv1d's LyCORIS tensor in PEFT's form: a 3-D Tucker core [r, r, k] viewed [r, r, k, 1]; a
 * whole 3-D lokr_w2 [b, d, k] viewed [b, d * k] (LyCORIS's make_kron unsqueezes w1 at the end, so
 * its kron is the flat one, which PEFT reshapes to the kernel alike) */
static const lm_ts_tensor *conv1d_view(fm_ctx *c, const lm_ts_tensor *t, int whole_w2, lm_err *err)
{
    if (t == NULL || t->n_dims != 3)
        return t;
    uint64_t s[4] = {t->shape[0], t->shape[1], t->shape[2], 1};
    if (whole_w2)
        s[1] *= t->shape[2];
    return fm_reshaped(c, t, whole_w2 ? 2 : 4, s, err);
}

static lm_code add_loha(fm_ctx *c, fm_module *m, const kparts *p, lm_err *err)
{
    const lm_ts_tensor *need[4] = {p->h1a, p->h1b, p->h2a, p->h2b};
    static const char *const names[4] = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"};
    lm_code rc;
    for (size_t i = 0; i < 4; i++) {
        if (need[i] == NULL)
            return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "LoHa module lacks %s", names[i]);
        if ((rc = need_float(need[i], err)) != LM_OK || (rc = fm_part_add(m, names[i], need[i], err)) != LM_OK)
            return rc;
    }
    if ((p->ht1 == NULL) != (p->ht2 == NULL))
        return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "LoHa module has one of hada_t1 / hada_t2 only");
    const lm_ts_tensor *t1 = conv1d_view(c, p->ht1, 0, err), *t2 = conv1d_view(c, p->ht2, 0, err);
    if ((p->ht1 && t1 == NULL) || (p->ht2 && t2 == NULL))
        return LM_E_NOMEM;
    if (t1 && ((rc = fm_part_add(m, "hada_t1", t1, err)) || (rc = fm_part_add(m, "hada_t2", t2, err))))
        return rc;
    if (p->h1b->n_dims < 1)
        return lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "hada_w1_b is a scalar");
    m->r = (long)p->h1b->shape[0];
    return module_alpha(p, m->r, &m->alpha, err);
}

static lm_code add_lokr(fm_ctx *c, fm_module *m, const kparts *p, lm_err *err)
{
    lm_code rc;
    const lm_ts_tensor *k2 = conv1d_view(c, p->k2, 1, err), *kt2 = conv1d_view(c, p->kt2, 0, err);
    if ((p->k2 && k2 == NULL) || (p->kt2 && kt2 == NULL))
        return LM_E_NOMEM;
    if (!(p->k1 || (p->k1a && p->k1b)) || !(p->k2 || (p->k2a && p->k2b)) || (p->k1 && (p->k1a || p->k1b)) ||
        (p->k2 && (p->k2a || p->k2b)))
        return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "LoKr module needs lokr_w1 or lokr_w1_a + lokr_w1_b, and "
                       "lokr_w2 or lokr_w2_a + lokr_w2_b");
    const struct {
        const char *name;
        const lm_ts_tensor *t;
    } parts[] = {{"lokr_w1", p->k1}, {"lokr_w1_a", p->k1a}, {"lokr_w1_b", p->k1b}, {"lokr_w2", k2},
                 {"lokr_w2_a", p->k2a}, {"lokr_w2_b", p->k2b}, {"lokr_t2", kt2}};
    for (size_t i = 0; i < LM_ARRAY_LEN(parts); i++)
        if (parts[i].t && ((rc = need_float(parts[i].t, err)) || (rc = fm_part_add(m, parts[i].name, parts[i].t, err))))
            return rc;
    /* LyCORIS: lora_dim = lokr_w1_a's columns, else lokr_w2_a's; both factors full: scale 1 */
    const lm_ts_tensor *inner = p->k1a ? p->k1a : p->k2a;
    if (inner != NULL) {
        if (inner->n_dims != 2)
            return lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "'%s' is not a matrix", inner->name);
        m->r = (long)(inner == p->k2a && p->kt2 ? inner->shape[0] : inner->shape[1]);
        return module_alpha(p, m->r, &m->alpha, err);
    }
    /* PEFT keeps a factor whole when r >= half its larger side: r = the largest side keeps both */
    uint64_t r = 1;
    for (size_t d = 0; d < p->k1->n_dims && d < 2; d++)
        r = p->k1->shape[d] > r ? p->k1->shape[d] : r;
    for (size_t d = 0; d < p->k2->n_dims && d < 2; d++)
        r = p->k2->shape[d] > r ? p->k2->shape[d] : r;
    m->r = (long)r;
    m->alpha = (double)r;
    return LM_OK;
}

/* LyCORIS norm tuning: W += w_norm, b += b_norm (src/methods/lycoris.c checks them against the base) */
static lm_code add_norm(fm_module *m, const kparts *p, lm_err *err)
{
    lm_code rc;
    if (p->w_norm == NULL)
        return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "b_norm without w_norm (LyCORIS loads a norm module by "
                       "its w_norm)");
    if ((rc = need_float(p->w_norm, err)) || (rc = need_float(p->b_norm, err)) ||
        (rc = fm_part_add(m, "lycoris_w_norm", p->w_norm, err)))
        return rc;
    m->r = 1;
    m->alpha = 1;
    return p->b_norm ? fm_part_add(m, "lycoris_b_norm", p->b_norm, err) : LM_OK;
}

static lm_code add_module(fm_ctx *c, const char *name, const char *group, const char *rest, const kparts *p, int *kinds,
                          lm_err *err)
{
    int lora = p->down || p->up || p->mid, loha = p->h1a || p->h1b || p->h2a || p->h2b || p->ht1 || p->ht2;
    int lokr = p->k1 || p->k1a || p->k1b || p->k2 || p->k2a || p->k2b || p->kt2, full = p->diff || p->diff_b;
    int ia3 = p->ia3 || p->on_input, norm = p->w_norm || p->b_norm;
    if (lora + loha + lokr + full + ia3 + norm != 1) {
        lm_fail(err, LM_E_FORMAT, lora + loha + lokr + full + ia3 + norm ? "MixedTypes" : "IncompleteModule",
                lora + loha + lokr + full + ia3 + norm ? "module mixes the parts of several methods"
                                                       : "module has only an alpha or a dora_scale (no factors)");
        lm_err_set_tensor(err, name);
        return LM_E_FORMAT;
    }
    if (p->dora != NULL && (full || ia3 || norm)) {
        lm_fail(err, LM_E_UNSUPPORTED, "MixedTypes", "dora_scale on a LyCORIS %s module: LyCORIS decomposes only LoRA / "
                "LoCon, LoHa and LoKr weights", full ? "full (diff)" : ia3 ? "IA3" : "norm");
        lm_err_set_tensor(err, name);
        return LM_E_UNSUPPORTED;
    }
    fm_type type = loha ? FM_LOHA : lokr ? FM_LOKR : ia3 ? FM_IA3 : norm ? FM_NORM : FM_LORA;
    fm_module *m = fm_add(c, type, name, group, rest, FM_NAME_FLAT, err);
    if (m == NULL)
        return LM_E_NOMEM;
    lm_code rc = lora ? add_lora(c, m, p, err) : loha ? add_loha(c, m, p, err) : lokr ? add_lokr(c, m, p, err)
               : full ? add_diff(c, m, p, err) : norm ? add_norm(m, p, err) : add_ia3(c, m, p, err);
    if (rc == LM_OK && p->dora != NULL && (rc = need_float(p->dora, err)) == LM_OK)
        rc = fm_part_add(m, "lycoris_dora_scale", p->dora, err);
    if (rc != LM_OK)
        lm_err_set_tensor(err, name);
    kinds[lora ? (p->mid || (p->down && p->down->n_dims > 2 && p->down->shape[2] > 1) ? 1 : 0)
               : loha ? 2 : lokr ? 3 : full ? 4 : norm ? 6 : 5] = 1;
    kinds[7] += p->dora != NULL;
    kinds[8] += norm;
    return rc;
}

/* "<name>.<part>"; or the hand-converted "<name>_lora_down.weight" / "_lora_up.weight" (no other
 * '.'; *joined set), read as "<name>.lora_down.weight": kohya's meaning, and scale 1 without an
 * alpha as both kohya and the diffusers file it came from say */
static lm_code split_key(const char *k, kentry *e, int *joined, lm_err *err)
{
    const char *dot = strchr(k, '.');
    static const char *const parts[2] = {"lora_down.weight", "lora_up.weight"};
    size_t n = strlen(k);
    for (int i = 0; i < 2; i++) {
        size_t pl = strlen(parts[i]);
        if (dot != NULL && n > pl + 1 && dot == k + n - 7 && strcmp(k + n - pl, parts[i]) == 0 && k[n - pl - 1] == '_' &&
            n - pl - 1 > 0) {
            e->key = k;
            e->name_len = n - pl - 1;
            e->part = parts[i];
            *joined = 1;
            return LM_OK;
        }
    }
    if (dot == NULL || dot == k || dot[1] == '\0' || fm_ends_with(k, "_lora_mid.weight")) {
        if (dot != NULL)
            lm_fail(err, LM_E_FORMAT, "MalformedKohya", "not kohya naming: kohya writes '<name>.lora_mid.weight', this "
                    "key joins the part with '_'; re-save it with sd-scripts");
        else
            lm_fail(err, LM_E_FORMAT, "MalformedKohya", "key has no '.<part>' (kohya writes '<name>.lora_down.weight', "
                    "'<name>.alpha' ...)");
        lm_err_set_tensor(err, k);
        return LM_E_FORMAT;
    }
    e->key = k;
    e->name_len = (size_t)(dot - k);
    e->part = dot + 1;
    return LM_OK;
}

lm_code fm_read_kohya(fm_ctx *c, const lm_tensor_set *ts, lm_err *err)
{
    kentry *e = calloc(ts->n ? ts->n : 1, sizeof *e);
    if (e == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    lm_code rc = LM_OK;
    size_t n = 0, n_joined = 0, n_doubled = 0;
    for (size_t i = 0; i < ts->n && rc == LM_OK; i++) {
        int joined = 0;
        if ((rc = split_key(ts->t[i].name, &e[n], &joined, err)) != LM_OK)
            break;
        e[n].t = &ts->t[i];
        e[n].order = i;
        n++;
        n_joined += (size_t)joined;
    }
    if (rc == LM_OK && n_joined > 0 && n_joined < n) {
        rc = lm_fail(err, LM_E_FORMAT, "MalformedKohya", "the file mixes kohya's '<name>.lora_down.weight' keys with "
                     "'<name>_lora_down.weight' ones");
        lm_err_set_tensor(err, e[0].key);
    }
    if (rc == LM_OK)
        qsort(e, n, sizeof *e, cmp_entry);
    int kinds[9] = {0}; /* LoRA, LoCon, LoHa, LoKr, full, IA3, norm; counts: DoRA modules, norm modules */
    char name[1024];
    for (size_t i = 0; i < n && rc == LM_OK;) {
        size_t j = i;
        kparts p;
        memset(&p, 0, sizeof p);
        while (j < n && e[j].name_len == e[i].name_len && memcmp(e[j].key, e[i].key, e[i].name_len) == 0) {
            if ((rc = take_part(&p, &e[j], err)) != LM_OK)
                break;
            j++;
        }
        if (rc != LM_OK)
            break;
        snprintf(name, sizeof name, "%.*s", (int)e[i].name_len, e[i].key);
        const char *group = NULL;
        for (size_t g = 0; g < LM_ARRAY_LEN(PREFIXES) && group == NULL; g++) {
            size_t k = strlen(PREFIXES[g]);
            if (strncmp(name, PREFIXES[g], k) == 0 && name[k] == '_' && name[k + 1] != '\0')
                group = PREFIXES[g];
        }
        if (group == NULL) {
            rc = lm_fail(err, LM_E_FORMAT, "MalformedKohya", "module name without a kohya prefix (lora_unet_, "
                         "lora_te_, lora_te1_, lora_te2_, lycoris_)");
            lm_err_set_tensor(err, name);
            break;
        }
        const char *rest = name + strlen(group) + 1;
        if (n_joined > 0 && strcmp(group, "lora_unet") == 0 && fm_starts_with(rest, "unet_") && rest[5] != '\0') {
            rest += 5; /* lora_unet_unet_...: the diffusers component prefix kept by a hand conversion */
            n_doubled++;
        }
        rc = add_module(c, name, group, rest, &p, kinds, err);
        i = j;
    }
    free(e);
    if (rc != LM_OK)
        return rc;
    c->format = kinds[2] ? "LyCORIS LoHa" : kinds[3] ? "LyCORIS LoKr" : kinds[5] ? "LyCORIS IA3"
              : kinds[4] ? "LyCORIS full (diff)" : kinds[1] ? "kohya-ss / LyCORIS LoCon"
              : kinds[0] ? "kohya-ss LoRA" : "LyCORIS norm tuning";
    if (n_joined > 0 && fm_note(c, "%s: keys in a hand-converted form ('<name>_lora_down.weight'%s) read as kohya's "
                                "'<name>.lora_down.weight'%s; no alpha in the file means scale 1", c->path,
                                n_doubled ? ", prefix lora_unet_unet_" : "", n_doubled ? " under lora_unet_" : "") != LM_OK)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if (kinds[7] > 0 && fm_note(c, "%s: %d module%s with LyCORIS DoRA (dora_scale): merged with LyCORIS's rule "
                                   "(norm + 2^-23; the multiplier scales the factor)", c->path, kinds[7],
                                kinds[7] == 1 ? "" : "s") != LM_OK)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if (kinds[8] > 0 && kinds[8] < (int)c->n && fm_note(c, "%s: %d LyCORIS norm module%s (w_norm / b_norm) added "
                                                        "to the base's norm weights", c->path, kinds[8],
                                                        kinds[8] == 1 ? "" : "s") != LM_OK)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return LM_OK;
}
