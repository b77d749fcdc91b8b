/* SPDX-License-Identifier: MIT */
/* formats_named.c : formats whose keys carry the module path: mlx-lm, torchtune, diffusers (and
 * PEFT-keyed files without their adapter_config.json), microsoft loralib.
 *
 *   mlx-lm     adapters.safetensors + adapter_config.json: "<path>.lora_a" [in, r], ".lora_b" [r, out],
 *              ".m" [out] (DoRA); dW = S (a @ b)^T, so A = a^T, B = b^T (exact transposes).  S is
 *              lora_parameters.scale, except configs written before ml-explore/mlx-examples #614
 *              (2024-06-02): S = scale * (alpha / rank).  Configs with fine_tune_type or num_layers
 *              are after it; lora_layers without use_dora are before it; lora_layers with use_dora
 *              (2024-05-16 .. 2024-09-30) are ambiguous unless alpha == rank: --lora-scale settles.
 *   torchtune  "layers.N.attn.q_proj.lora_a.weight" ...: torchtune's module names mapped to HF's
 *              (convert_weights._FROM_HF), q/k lora_b rows (and DoRA magnitudes) permuted per head as
 *              tune_to_hf permutes the base weights (llama, mistral); alpha from the adapter_config.json
 *              torchtune writes beside it, or --lora-alpha.
 *   diffusers  "<path>.processor.to_q_lora.down.weight" (attention processors; to_out -> to_out.0),
 *              "<path>.lora.down.weight", "<path>.lora_linear_layer.down.weight", and PEFT keys
 *              "<path>.lora_A.weight" under a component prefix (unet., transformer., text_encoder.)
 *              or none; alphas from the "lora_adapter_metadata" header entry, "<path>.alpha" keys, or
 *              none (scale 1).
 *   loralib    "<path>.lora_A" [r, in], "<path>.lora_B" [out, r] (no ".weight"); alpha is not in the
 *              file: --lora-alpha or --lora-scale. */
#include "formats_internal.h"

#include "adapter_config.h"
#include "compat.h"
#include "lm_error.h"
#include "peft_match.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* shared: modules keyed by path                                                                */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    char *group;      /* owned or NULL */
    char *path;       /* owned */
    char *src;        /* owned: the key stem as written (messages) */
    const lm_ts_tensor *a, *b, *mag, *bias, *alpha;
} nmod;

typedef struct {
    nmod *v;
    size_t n, cap;
    size_t *slots, n_slots; /* (group, path) -> index + 1, open addressing, at most half full */
} nlist;

static void nlist_free(nlist *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].group);
        free(l->v[i].path);
        free(l->v[i].src);
    }
    free(l->v);
    free(l->slots);
}

static size_t nmod_hash(const char *group, const char *path)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a over group, a separator, path */
    for (const char *s = group ? group : ""; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    h = (h ^ (group ? 1u : 2u)) * 1099511628211ull;
    for (const char *s = path; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return (size_t)(h ^ (h >> 29));
}

static int nmod_is(const nmod *m, const char *group, const char *path)
{
    return strcmp(m->path, path) == 0 &&
           ((group == NULL && m->group == NULL) || (group && m->group && !strcmp(group, m->group)));
}

/* the slot of (group, path), or the empty one where it would go */
static size_t nlist_slot(const nlist *l, const char *group, const char *path)
{
    size_t mask = l->n_slots - 1, i = nmod_hash(group, path) & mask;
    while (l->slots[i] != 0 && !nmod_is(&l->v[l->slots[i] - 1], group, path))
        i = (i + 1) & mask;
    return i;
}

static int nlist_reserve(nlist *l)
{
    if (l->n_slots != 0 && 2 * (l->n + 1) <= l->n_slots)
        return 0;
    size_t want = 64;
    while (want < 4 * (l->n + 1))
        want *= 2;
    size_t *slots = calloc(want, sizeof *slots);
    if (slots == NULL)
        return -1;
    free(l->slots);
    l->slots = slots;
    l->n_slots = want;
    for (size_t k = 0; k < l->n; k++)
        l->slots[nlist_slot(l, l->v[k].group, l->v[k].path)] = k + 1;
    return 0;
}

/* the module of (group, path), made on first use: hashed, since a file may hold 100k modules */
static nmod *nlist_get(nlist *l, const char *group, const char *path, const char *src, lm_err *err)
{
    if (nlist_reserve(l) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    size_t slot = nlist_slot(l, group, path);
    if (l->slots[slot] != 0)
        return &l->v[l->slots[slot] - 1];
    if (lm_grow((void **)&l->v, &l->cap, l->n, sizeof *l->v, 64) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    nmod *m = &l->v[l->n];
    memset(m, 0, sizeof *m);
    m->group = group ? strdup(group) : NULL;
    m->path = strdup(path);
    m->src = strdup(src);
    if (m->path == NULL || m->src == NULL || (group && m->group == NULL)) {
        free(m->group);
        free(m->path);
        free(m->src);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    l->slots[slot] = ++l->n;
    return m;
}

static lm_code set_slot(const lm_ts_tensor **slot, const lm_ts_tensor *t, lm_err *err)
{
    if (*slot != NULL)
        return lm_fail(err, LM_E_FORMAT, "DuplicateKey", "'%s' and '%s' are the same part of one module",
                       (*slot)->name, t->name);
    *slot = t;
    return LM_OK;
}

/* the LoRA module of a named pair (both factors float matrices), r from A's rows; NULL with *rc */
static fm_module *pair_module(fm_ctx *c, const nmod *n, const char *a_name, const char *b_name, lm_code *rc,
                              lm_err *err)
{
    if (n->a == NULL || n->b == NULL) {
        *rc = lm_fail(err, LM_E_FORMAT, "IncompleteModule", "has %s but no %s", n->a ? a_name : b_name,
                      n->a ? b_name : a_name);
        lm_err_set_tensor(err, n->src);
        return NULL;
    }
    if (!fm_is_float(n->a->dtype) || !fm_is_float(n->b->dtype) || n->a->n_dims < 2 || n->b->n_dims < 2) {
        *rc = lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "factors must be float matrices (got %s %zu-D, %s %zu-D)",
                      lm_dtype_name(n->a->dtype), n->a->n_dims, lm_dtype_name(n->b->dtype), n->b->n_dims);
        lm_err_set_tensor(err, n->src);
        return NULL;
    }
    fm_module *m = fm_add(c, FM_LORA, n->src, n->group, n->path, FM_NAME_PATH, err);
    if (m == NULL) {
        *rc = LM_E_NOMEM;
        return NULL;
    }
    m->r = (long)n->a->shape[0];
    return m;
}

/* the scale the user gave for formats without one: alpha / r or the multiplier; 1 if given */
static int user_alpha(const fm_ctx *c, long r, double *alpha, lm_err *err, lm_code *rc)
{
    *rc = LM_OK;
    if (c->opts->lora_alpha != 0) {
        *alpha = c->opts->lora_alpha;
        return 1;
    }
    if (c->opts->lora_scale != 0) {
        *rc = fm_alpha_for_scale(c->opts->lora_scale, r, alpha, err);
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* mlx-lm                                                                                        */
/* ------------------------------------------------------------------------------------------ */
static const cJSON *jget(const cJSON *o, const char *k)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNull(f) ? NULL : f;
}

/* the multiplier of an mlx-lm config (see the file header); *how says which rule */
static lm_code mlx_multiplier(const fm_ctx *c, const cJSON *cfg, double *S, const char **how, lm_err *err)
{
    const cJSON *lp = jget(cfg, "lora_parameters");
    const cJSON *scale = jget(lp, "scale"), *rank = jget(lp, "rank"), *alpha = jget(lp, "alpha");
    if (c->opts->lora_alpha != 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "mlx-lm's multiplier is a scale: give --lora-scale, not --lora-alpha");
    if (c->opts->lora_scale != 0) {
        *S = c->opts->lora_scale;
        *how = "--lora-scale";
        return LM_OK;
    }
    if (!cJSON_IsNumber(scale) || !isfinite(scale->valuedouble))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "adapter_config.json has no lora_parameters.scale");
    int new_schema = jget(cfg, "fine_tune_type") != NULL || jget(cfg, "num_layers") != NULL;
    int has_dora_key = jget(cfg, "use_dora") != NULL;
    if (new_schema || (alpha == NULL && has_dora_key)) {
        *S = scale->valuedouble;
        *how = "scale (mlx-lm after 2024-06-02)";
        return LM_OK;
    }
    if (!cJSON_IsNumber(alpha) || !cJSON_IsNumber(rank) || rank->valuedouble <= 0 || !isfinite(alpha->valuedouble))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "an mlx-lm config from before mid-2024 (lora_layers) needs "
                       "lora_parameters.alpha and .rank: the multiplier was scale * alpha / rank");
    double old = scale->valuedouble * (alpha->valuedouble / rank->valuedouble);
    if (!has_dora_key) {
        *S = old;
        *how = "scale * alpha / rank (mlx-lm before 2024-06-02: config with lora_layers, no use_dora)";
        return LM_OK;
    }
    if (old == scale->valuedouble) {
        *S = old;
        *how = "scale (alpha == rank: both mlx-lm rules agree)";
        return LM_OK;
    }
    return lm_fail(err, LM_E_USAGE, "AmbiguousScale", "this mlx-lm config (lora_layers with use_dora) was written "
                   "between 2024-05-16 and 2024-09-30, when the multiplier changed from scale * alpha / rank (%g) to "
                   "scale (%g) on 2024-06-02: give --lora-scale with the one your mlx-lm used", old,
                   scale->valuedouble);
}

lm_code fm_read_mlx(fm_ctx *c, const char *dir, lm_err *err)
{
    char *cfg_path = fm_join(dir, "adapter_config.json"), *w_path = fm_join(dir, "adapters.safetensors");
    char *text = NULL;
    cJSON *cfg = NULL;
    nlist l = {0};
    lm_code rc = LM_OK;
    c->format = "mlx-lm";
    if (cfg_path == NULL || w_path == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    if (!fm_is_file(cfg_path)) {
        rc = lm_fail(err, LM_E_IO, "MissingConfig", "mlx-lm adapters.safetensors without its adapter_config.json: "
                     "the scale is in that file");
        lm_err_set_path(err, cfg_path);
        goto done;
    }
    if ((text = fm_read_text(cfg_path, (size_t)16 << 20, err)) == NULL) {
        rc = err ? err->code : LM_E_IO;
        goto done;
    }
    cfg = cJSON_Parse(text);
    if (!cJSON_IsObject(cfg)) {
        rc = lm_fail(err, LM_E_FORMAT, "InvalidJson", "adapter_config.json is not a JSON object");
        lm_err_set_path(err, cfg_path);
        goto done;
    }
    c->config_path = cfg_path;
    cfg_path = NULL;
    const cJSON *ftt = jget(cfg, "fine_tune_type");
    const char *ft = cJSON_IsString(ftt) ? ftt->valuestring : "lora";
    int full = strcmp(ft, "full") == 0;
    if (!full && strcmp(ft, "lora") != 0 && strcmp(ft, "dora") != 0) {
        rc = lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "mlx-lm fine_tune_type '%s' is not lora, dora or full", ft);
        lm_err_set_path(err, c->config_path);
        goto done;
    }
    double S = 1;
    const char *how = "";
    if (!full && (rc = mlx_multiplier(c, cfg, &S, &how, err)) != LM_OK) {
        lm_err_set_path(err, c->config_path);
        goto done;
    }
    lm_tensor_set *ts = NULL;
    int root = 0;
    if ((rc = fm_load_file(c, w_path, &ts, &root, err)) != LM_OK)
        goto done;
    c->weights_path = w_path;
    w_path = NULL;
    for (size_t i = 0; i < ts->n && rc == LM_OK; i++) {
        const lm_ts_tensor *t = &ts->t[i];
        if (full) { /* full fine-tuning: the tensors replace the base's */
            fm_module *m = fm_add(c, FM_FULL, t->name, NULL, t->name, FM_NAME_PATH, err);
            rc = m ? fm_part_add(m, "", t, err) : LM_E_NOMEM;
            continue;
        }
        const char *k = t->name, *dot = strrchr(k, '.');
        if (dot == NULL || (strcmp(dot, ".lora_a") && strcmp(dot, ".lora_b") && strcmp(dot, ".m"))) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnknownKey", "not an mlx-lm adapter tensor (expected <module>.lora_a, "
                         ".lora_b or .m)");
            lm_err_set_tensor(err, k);
            break;
        }
        char *path = strndup(k, (size_t)(dot - k));
        nmod *m = path ? nlist_get(&l, NULL, path, path, err) : NULL;
        free(path);
        if (m == NULL) {
            rc = LM_E_NOMEM;
            break;
        }
        if (t->n_dims == 3) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "mlx-lm LoRA on a mixture-of-experts switch layer "
                         "(3-D factors): not expressible as a PEFT LoRA on the per-expert weights; not supported");
            lm_err_set_tensor(err, k);
            break;
        }
        rc = set_slot(dot[1] == 'm' ? &m->mag : dot[6] == 'a' ? &m->a : &m->b, t, err);
    }
    for (size_t i = 0; i < l.n && rc == LM_OK; i++) {
        nmod *n = &l.v[i];
        fm_module *m = pair_module(c, n, "lora_a", "lora_b", &rc, err);
        if (m == NULL)
            break;
        if (n->a->n_dims != 2 || n->b->n_dims != 2 || n->a->shape[1] != n->b->shape[0]) {
            rc = lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "lora_a [%llu, %llu] and lora_b [%llu, %llu] disagree "
                         "on the rank (mlx-lm: lora_a [in, r], lora_b [r, out])",
                         (unsigned long long)n->a->shape[0], (unsigned long long)n->a->shape[1],
                         (unsigned long long)n->b->shape[0], (unsigned long long)n->b->shape[1]);
            lm_err_set_tensor(err, n->src);
            break;
        }
        const lm_ts_tensor *A = fm_transposed(c, n->a, err), *B = A ? fm_transposed(c, n->b, err) : NULL;
        if (B == NULL) {
            rc = err ? err->code : LM_E_NOMEM;
            break;
        }
        m->r = (long)n->a->shape[1];
        m->orient_by_base = 1;
        m->embedding = c->base == NULL && (strstr(n->path, "embed") != NULL || fm_ends_with(n->path, ".wte"));
        if ((rc = fm_alpha_for_scale(S, m->r, &m->alpha, err)) || (rc = fm_part_add(m, "lora_A.weight", A, err)) ||
            (rc = fm_part_add(m, "lora_B.weight", B, err)))
            break;
        if (n->mag != NULL) {
            if (m->embedding || strstr(n->path, "embed")) {
                rc = lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "mlx-lm DoRA on an embedding normalises each "
                             "token's row, PEFT's embedding DoRA each dimension over the vocabulary; not supported");
                lm_err_set_tensor(err, n->src);
                break;
            }
            rc = fm_part_add(m, "lora_magnitude_vector", n->mag, err);
        }
    }
    if (rc == LM_OK && !full)
        rc = fm_note(c, "%s: mlx-lm adapter, multiplier %.9g = %s", dir, S, how);
done:
    nlist_free(&l);
    cJSON_Delete(cfg);
    free(text);
    free(cfg_path);
    free(w_path);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* torchtune                                                                                     */
/* ------------------------------------------------------------------------------------------ */
/* torchtune's module names -> Hugging Face's (torchtune/models/convert_weights.py _FROM_HF) */
static char *tune_to_hf(const char *p)
{
    static const struct {
        const char *tune, *hf;
    } map[] = {{"attn.q_proj", "self_attn.q_proj"}, {"attn.k_proj", "self_attn.k_proj"},
               {"attn.v_proj", "self_attn.v_proj"}, {"attn.output_proj", "self_attn.o_proj"},
               {"mlp.w1", "mlp.gate_proj"},         {"mlp.w2", "mlp.down_proj"},
               {"mlp.w3", "mlp.up_proj"}};
    if (strcmp(p, "output") == 0)
        return strdup("lm_head");
    if (!fm_starts_with(p, "layers."))
        return NULL;
    const char *q = p + 7;
    char *end;
    unsigned long n = strtoul(q, &end, 10);
    if (end == q || *end != '.')
        return NULL;
    for (size_t i = 0; i < LM_ARRAY_LEN(map); i++)
        if (strcmp(end + 1, map[i].tune) == 0) {
            char buf[256];
            snprintf(buf, sizeof buf, "model.layers.%lu.%s", n, map[i].hf);
            return strdup(buf);
        }
    return NULL;
}

/* rows of t ([rows, cols]) from torchtune's interleaved rotary layout to HF's, per head:
 * HF row h*hd + j*(hd/2) + i <- torchtune row h*hd + 2*i + j (tune_to_hf's _permute) */
static const lm_ts_tensor *permute_heads(fm_ctx *c, const lm_ts_tensor *t, long n_heads, long head_dim, lm_err *err)
{
    uint64_t rows = t->shape[0], cols = t->n_elems / (rows ? rows : 1), es = lm_dtype_bits(t->dtype) / 8;
    if (head_dim <= 0 || head_dim % 2 || rows != (uint64_t)n_heads * (uint64_t)head_dim) {
        lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "'%s' has %llu rows, not %ld heads of %ld", t->name,
                (unsigned long long)rows, n_heads, head_dim);
        return NULL;
    }
    uint8_t *d = malloc(t->n_bytes ? (size_t)t->n_bytes : 1);
    if (d == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    const uint8_t *s = t->data;
    uint64_t half = (uint64_t)head_dim / 2;
    for (uint64_t h = 0; h < (uint64_t)n_heads; h++)
        for (uint64_t i = 0; i < half; i++)
            for (uint64_t j = 0; j < 2; j++) {
                uint64_t to = h * (uint64_t)head_dim + j * half + i, from = h * (uint64_t)head_dim + 2 * i + j;
                memcpy(d + to * cols * es, s + from * cols * es, (size_t)(cols * es));
            }
    return fm_made(c, t->dtype, t->n_dims, t->shape, d, err);
}

typedef struct {
    int permute;            /* some module is a q_proj or k_proj */
    long heads, kv, head_dim;
} tune_heads;

/* the attention geometry torchtune's q/k permutation needs, from the base's config.json */
static lm_code tune_heads_of(const fm_ctx *c, const nlist *l, tune_heads *h, lm_err *err)
{
    long hidden = 0;
    for (size_t i = 0; i < l->n && !h->permute; i++)
        h->permute = strstr(l->v[i].path, "q_proj") || strstr(l->v[i].path, "k_proj");
    if (!h->permute)
        return LM_OK;
    const char *model_type = c->base ? fm_base_config_str(c->base, "model_type") : NULL;
    if (c->base == NULL || !fm_base_config_int(c->base, "num_attention_heads", &h->heads) ||
        !fm_base_config_int(c->base, "hidden_size", &hidden))
        return lm_fail(err, LM_E_USAGE, "NeedsBase", "torchtune permutes q_proj / k_proj rows per attention head: the "
                       "base's config.json (num_attention_heads, hidden_size) is needed");
    if (model_type == NULL || (strcmp(model_type, "llama") && strcmp(model_type, "mistral")))
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "torchtune keys for a base of model_type '%s': lora-merge "
                       "knows torchtune's q/k row permutation for llama and mistral only; use the PEFT adapter "
                       "torchtune writes beside it (adapter_model.safetensors)", model_type ? model_type : "?");
    if (!fm_base_config_int(c->base, "num_key_value_heads", &h->kv))
        h->kv = h->heads;
    if (!fm_base_config_int(c->base, "head_dim", &h->head_dim))
        h->head_dim = h->heads > 0 ? hidden / h->heads : 0;
    return LM_OK;
}

lm_code fm_read_torchtune(fm_ctx *c, const lm_tensor_set *ts, const cJSON *config, lm_err *err)
{
    nlist l = {0};
    lm_code rc = LM_OK;
    c->format = "torchtune";
    for (size_t i = 0; i < ts->n && rc == LM_OK; i++) {
        const lm_ts_tensor *t = &ts->t[i];
        const char *k = t->name;
        size_t cut = fm_ends_with(k, ".lora_a.weight") || fm_ends_with(k, ".lora_b.weight") ? 14
                   : fm_ends_with(k, ".magnitude")                                          ? 10
                                                                                             : 0;
        char *stem = cut ? strndup(k, strlen(k) - cut) : NULL;
        char *hf = stem ? tune_to_hf(stem) : NULL;
        if (hf == NULL) {
            free(stem);
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnknownKey", "not a torchtune LoRA key lora-merge can map to Hugging "
                         "Face names (layers.N.attn.{q,k,v,output}_proj, layers.N.mlp.w1/w2/w3, output)");
            lm_err_set_tensor(err, k);
            break;
        }
        nmod *m = nlist_get(&l, NULL, hf, stem, err);
        free(stem);
        free(hf);
        if (m == NULL) {
            rc = LM_E_NOMEM;
            break;
        }
        rc = set_slot(cut == 10 ? &m->mag : k[strlen(k) - 8] == 'a' ? &m->a : &m->b, t, err);
    }
    tune_heads h = {0};
    if (rc == LM_OK)
        rc = tune_heads_of(c, &l, &h, err);
    double cfg_alpha = 0;
    const cJSON *ca = config ? jget(config, "lora_alpha") : NULL;
    if (cJSON_IsNumber(ca) && isfinite(ca->valuedouble))
        cfg_alpha = ca->valuedouble;
    for (size_t i = 0; i < l.n && rc == LM_OK; i++) {
        nmod *n = &l.v[i];
        fm_module *m = pair_module(c, n, "lora_a.weight", "lora_b.weight", &rc, err);
        if (m == NULL)
            break;
        if (!user_alpha(c, m->r, &m->alpha, err, &rc)) {
            if (cfg_alpha == 0) {
                rc = lm_fail(err, LM_E_USAGE, "MissingAlpha", "torchtune's adapter file does not hold lora_alpha and "
                             "no adapter_config.json beside it does: give --lora-alpha (the training config's "
                             "lora_alpha)");
                break;
            }
            m->alpha = cfg_alpha;
        }
        if (rc != LM_OK)
            break;
        const lm_ts_tensor *B = n->b, *mag = n->mag;
        long nh = strstr(n->path, "q_proj") ? h.heads : strstr(n->path, "k_proj") ? h.kv : 0;
        if (nh > 0) {
            if ((B = permute_heads(c, n->b, nh, h.head_dim, err)) == NULL ||
                (mag && (mag = permute_heads(c, n->mag, nh, h.head_dim, err)) == NULL)) {
                rc = err ? err->code : LM_E_NOMEM;
                lm_err_set_tensor(err, n->src);
                break;
            }
        }
        if ((rc = fm_part_add(m, "lora_A.weight", n->a, err)) || (rc = fm_part_add(m, "lora_B.weight", B, err)) ||
            (mag && (rc = fm_part_add(m, "lora_magnitude_vector", mag, err))))
            break;
    }
    if (rc == LM_OK && h.permute)
        rc = fm_note(c, "%s: torchtune names mapped to Hugging Face's; q_proj / k_proj lora_B rows%s permuted per head "
                     "(%ld heads, %ld key/value heads, head_dim %ld) as torchtune permutes the base weights",
                     c->path, l.n && l.v[0].mag ? " and magnitudes" : "", h.heads, h.kv, h.head_dim);
    nlist_free(&l);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* diffusers                                                                                     */
/* ------------------------------------------------------------------------------------------ */
static const char *const COMPONENTS[] = {"unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
                                         "prior"};

/* splits an attention-processor projection name: "to_q" -> the module it adapts */
static const char *proc_target(const char *proj, int text_encoder)
{
    static const struct {
        const char *proc, *unet, *te;
    } map[] = {{"to_q", "to_q", "q_proj"}, {"to_k", "to_k", "k_proj"}, {"to_v", "to_v", "v_proj"},
               {"to_out", "to_out.0", "out_proj"}, {"add_k_proj", "add_k_proj", NULL}, {"add_v_proj", "add_v_proj", NULL}};
    for (size_t i = 0; i < LM_ARRAY_LEN(map); i++)
        if (strcmp(proj, map[i].proc) == 0)
            return text_encoder ? map[i].te : map[i].unet;
    return NULL;
}

/* key -> (module path, role); role: 'a', 'b', 'm' magnitude, 's' bias, 'l' alpha; 0 unknown.
 * *style: 1 attention processor, 2 lora.down / lora_linear_layer, 3 PEFT keys */
static char *diffusers_key(const char *k, char *role, int *style)
{
    static const struct {
        const char *suffix;
        char role;
        int style;
    } tails[] = {{".lora.down.weight", 'a', 2}, {".lora.up.weight", 'b', 2}, {".lora_linear_layer.down.weight", 'a', 2},
                 {".lora_linear_layer.up.weight", 'b', 2}, {".lora_A.weight", 'a', 3}, {".lora_B.weight", 'b', 3},
                 {".lora_magnitude_vector", 'm', 3}, {".lora_B.bias", 's', 3}, {".alpha", 'l', 0}};
    *role = 0;
    for (size_t i = 0; i < LM_ARRAY_LEN(tails); i++)
        if (fm_ends_with(k, tails[i].suffix)) {
            *role = tails[i].role;
            *style = tails[i].style;
            return strndup(k, strlen(k) - strlen(tails[i].suffix));
        }
    /* "<path>[.processor].<proj>_lora.down.weight" */
    int up = fm_ends_with(k, "_lora.up.weight");
    if (!up && !fm_ends_with(k, "_lora.down.weight"))
        return NULL;
    size_t n = strlen(k) - strlen(up ? "_lora.up.weight" : "_lora.down.weight");
    const char *dot = NULL;
    for (size_t i = n; i-- > 0;)
        if (k[i] == '.') {
            dot = k + i;
            break;
        }
    if (dot == NULL)
        return NULL;
    char proj[64];
    snprintf(proj, sizeof proj, "%.*s", (int)(k + n - dot - 1), dot + 1);
    size_t stem = (size_t)(dot - k);
    if (stem >= 10 && strncmp(k + stem - 10, ".processor", 10) == 0)
        stem -= 10;
    int te = strstr(k, "text_encoder") != NULL || strstr(k, "self_attn") != NULL;
    const char *target = proc_target(proj, te);
    if (target == NULL)
        return NULL;
    char *path = malloc(stem + 1 + strlen(target) + 1);
    if (path == NULL)
        return NULL;
    snprintf(path, stem + 1 + strlen(target) + 1, "%.*s.%s", (int)stem, k, target);
    *role = up ? 'b' : 'a';
    *style = 1;
    return path;
}

/* alpha / rank from diffusers' "lora_adapter_metadata" (LoraConfig fields under "<component>.") */
typedef struct {
    double lora_alpha, r;
    int have, rslora, dora;
    lm_str_list rank_keys, alpha_keys;
    double *rank_vals, *alpha_vals;
} dmeta;

static void dmeta_free(dmeta *d)
{
    for (size_t i = 0; i < d->rank_keys.n; i++)
        free(d->rank_keys.v[i]);
    for (size_t i = 0; i < d->alpha_keys.n; i++)
        free(d->alpha_keys.v[i]);
    free(d->rank_keys.v);
    free(d->alpha_keys.v);
    free(d->rank_vals);
    free(d->alpha_vals);
    memset(d, 0, sizeof *d);
}

static void dmeta_pattern(const cJSON *o, lm_str_list *keys, double **vals)
{
    if (!cJSON_IsObject(o))
        return;
    int n = cJSON_GetArraySize(o);
    keys->v = calloc((size_t)n + 1, sizeof *keys->v);
    *vals = calloc((size_t)n + 1, sizeof **vals);
    const cJSON *e;
    cJSON_ArrayForEach(e, o)
    {
        if (keys->v == NULL || *vals == NULL || !cJSON_IsNumber(e) || (keys->v[keys->n] = strdup(e->string)) == NULL)
            continue;
        (*vals)[keys->n++] = e->valuedouble;
    }
}

static void dmeta_read(const lm_tensor_set *ts, const char *group, dmeta *d)
{
    memset(d, 0, sizeof *d);
    const char *raw = fm_st_meta(ts, "lora_adapter_metadata");
    cJSON *root = raw ? cJSON_Parse(raw) : NULL;
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return;
    }
    char key[128];
#define DFIELD(name) (snprintf(key, sizeof key, "%s%s%s", group ? group : "", group ? "." : "", name), \
                      cJSON_GetObjectItemCaseSensitive(root, key))
    const cJSON *la = DFIELD("lora_alpha"), *r = DFIELD("r");
    if (cJSON_IsNumber(la) && cJSON_IsNumber(r)) {
        d->have = 1;
        d->lora_alpha = la->valuedouble;
        d->r = r->valuedouble;
        d->rslora = cJSON_IsTrue(DFIELD("use_rslora"));
        d->dora = cJSON_IsTrue(DFIELD("use_dora"));
        dmeta_pattern(DFIELD("rank_pattern"), &d->rank_keys, &d->rank_vals);
        dmeta_pattern(DFIELD("alpha_pattern"), &d->alpha_keys, &d->alpha_vals);
    }
#undef DFIELD
    cJSON_Delete(root);
}

static lm_code diffusers_module(fm_ctx *c, const lm_tensor_set *ts, nmod *n, dmeta *metas, const char **groups,
                                size_t n_groups, lm_err *err)
{
    lm_code rc = LM_OK;
    fm_module *m = pair_module(c, n, "down", "up", &rc, err);
    if (m == NULL)
        return rc;
    m->alpha = (double)m->r; /* no alpha anywhere: scale 1 */
    dmeta *d = NULL;
    for (size_t g = 0; g < n_groups; g++)
        if ((n->group == NULL && groups[g] == NULL) || (n->group && groups[g] && !strcmp(n->group, groups[g])))
            d = &metas[g];
    if (n->alpha != NULL) {
        if ((rc = fm_scalar(n->alpha, &m->alpha, err)) != LM_OK)
            return rc;
        if (m->alpha == 0)
            m->alpha = (double)m->r;
    } else if (d != NULL && d->have) {
        long w = lm_pattern_lookup((const char *const *)d->rank_keys.v, d->rank_keys.n, n->path, err);
        double r = w >= 0 ? d->rank_vals[w] : d->r;
        long wa = w == -2 ? -2 : lm_pattern_lookup((const char *const *)d->alpha_keys.v, d->alpha_keys.n, n->path, err);
        if (w == -2 || wa == -2)
            return err ? err->code : LM_E_FORMAT;
        if (r != (double)m->r)
            return lm_fail(err, LM_E_MISMATCH, "RankMismatch", "the tensors have rank %ld but lora_adapter_metadata "
                           "says r=%g for this module", m->r, r);
        m->alpha = wa >= 0 ? d->alpha_vals[wa] : d->lora_alpha;
        c->rslora = d->rslora;
    }
    if ((rc = fm_part_add(m, "lora_A.weight", n->a, err)) || (rc = fm_part_add(m, "lora_B.weight", n->b, err)))
        return rc;
    if (n->mag && (rc = fm_part_add(m, "lora_magnitude_vector", n->mag, err)))
        return rc;
    if (n->bias && (rc = fm_part_add(m, "lora_B.bias", n->bias, err)))
        return rc;
    (void)ts;
    return LM_OK;
}

lm_code fm_read_diffusers(fm_ctx *c, const lm_tensor_set *ts, lm_err *err)
{
    nlist l = {0};
    lm_code rc = LM_OK;
    int styles = 0;
    const char *groups[LM_ARRAY_LEN(COMPONENTS) + 1];
    size_t n_groups = 0;
    for (size_t i = 0; i < ts->n && rc == LM_OK; i++) {
        const lm_ts_tensor *t = &ts->t[i];
        const char *k = t->name;
        char role = 0;
        int style = 0;
        char *path = diffusers_key(k, &role, &style);
        if (path == NULL) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnknownKey", "not a diffusers LoRA key (.lora.down.weight, "
                         "<proj>_lora.down.weight, .lora_A.weight ...)");
            lm_err_set_tensor(err, k);
            break;
        }
        styles |= style ? 1 << style : 0;
        const char *p = path, *group = NULL;
        if (fm_starts_with(p, "base_model.model."))
            p += 17;
        for (size_t g = 0; g < LM_ARRAY_LEN(COMPONENTS); g++) {
            size_t kk = strlen(COMPONENTS[g]);
            if (strncmp(p, COMPONENTS[g], kk) == 0 && p[kk] == '.') {
                group = COMPONENTS[g];
                p += kk + 1;
            }
        }
        size_t g = 0;
        while (g < n_groups && !((group == NULL && groups[g] == NULL) || (group && groups[g] && !strcmp(group, groups[g]))))
            g++;
        if (g == n_groups)
            groups[n_groups++] = group;
        nmod *m = nlist_get(&l, group, p, path, err);
        free(path);
        if (m == NULL) {
            rc = LM_E_NOMEM;
            break;
        }
        rc = set_slot(role == 'a' ? &m->a : role == 'b' ? &m->b : role == 'm' ? &m->mag : role == 's' ? &m->bias
                                                                                                      : &m->alpha,
                      t, err);
    }
    if (rc == LM_OK && c->base == NULL && n_groups > 1)
        rc = lm_fail(err, LM_E_USAGE, "NeedsBase", "the file holds modules of several components (%s and %s): give "
                     "the base (one component's weights) to pick its modules", groups[0] ? groups[0] : "(none)",
                     groups[1] ? groups[1] : "(none)");
    dmeta metas[LM_ARRAY_LEN(COMPONENTS) + 1];
    for (size_t g = 0; g < n_groups; g++)
        dmeta_read(ts, groups[g], &metas[g]);
    for (size_t i = 0; i < l.n && rc == LM_OK; i++) {
        rc = diffusers_module(c, ts, &l.v[i], metas, groups, n_groups, err);
        if (rc != LM_OK)
            lm_err_set_tensor(err, l.v[i].src);
    }
    int meta = 0;
    for (size_t g = 0; g < n_groups; g++) {
        meta |= metas[g].have;
        dmeta_free(&metas[g]);
    }
    c->format = styles & 2 ? "diffusers (attention processors)" : styles & 4 ? "diffusers (lora.down / lora.up)"
              : groups[0] || n_groups > 1 ? "diffusers (PEFT keys)" : "PEFT keys without adapter_config.json";
    if (rc == LM_OK && !meta) {
        int any_alpha = 0;
        for (size_t i = 0; i < l.n; i++)
            any_alpha |= l.v[i].alpha != NULL;
        if (!any_alpha)
            rc = fm_note(c, "%s: no alpha in the file (no .alpha keys, no lora_adapter_metadata): scale 1, as diffusers "
                         "loads it", c->path);
    }
    nlist_free(&l);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* microsoft loralib                                                                             */
/* ------------------------------------------------------------------------------------------ */
lm_code fm_read_loralib(fm_ctx *c, const lm_tensor_set *ts, lm_err *err)
{
    nlist l = {0};
    lm_code rc = LM_OK;
    c->format = "microsoft loralib";
    for (size_t i = 0; i < ts->n && rc == LM_OK; i++) {
        const lm_ts_tensor *t = &ts->t[i];
        const char *k = t->name;
        if (fm_ends_with(k, ".bias")) { /* lora_state_dict(bias="all"/"lora_only"): trained biases replace */
            fm_module *m = fm_add(c, FM_FULL, k, NULL, k, FM_NAME_PATH, err);
            rc = m ? fm_part_add(m, "", t, err) : LM_E_NOMEM;
            continue;
        }
        int a = fm_ends_with(k, ".lora_A");
        if (!a && !fm_ends_with(k, ".lora_B")) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnknownKey", "a loralib state dict holds <module>.lora_A, "
                         "<module>.lora_B and biases; this is something else");
            lm_err_set_tensor(err, k);
            break;
        }
        char *path = strndup(k, strlen(k) - 7);
        nmod *m = path ? nlist_get(&l, NULL, path, path, err) : NULL;
        free(path);
        rc = m ? set_slot(a ? &m->a : &m->b, t, err) : LM_E_NOMEM;
    }
    for (size_t i = 0; i < l.n && rc == LM_OK; i++) {
        nmod *n = &l.v[i];
        fm_module *m = pair_module(c, n, "lora_A", "lora_B", &rc, err);
        if (m == NULL)
            break;
        m->orient_by_base = 1;
        m->embedding = c->base == NULL && strstr(n->path, "embed") != NULL;
        if (!user_alpha(c, m->r, &m->alpha, err, &rc)) {
            rc = lm_fail(err, LM_E_USAGE, "MissingAlpha", "loralib does not save lora_alpha: give --lora-alpha (the "
                         "value passed to lora.Linear(..., lora_alpha=...); scale = alpha / r, r = %ld here) or "
                         "--lora-scale", m->r);
            break;
        }
        if (rc != LM_OK || (rc = fm_part_add(m, "lora_A.weight", n->a, err)) ||
            (rc = fm_part_add(m, "lora_B.weight", n->b, err)))
            break;
    }
    nlist_free(&l);
    return rc;
}
