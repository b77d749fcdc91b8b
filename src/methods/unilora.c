/* SPDX-License-Identifier: MIT */
/* unilora.c : Uni-LoRA (docs/adapter-types.md, Uni-LoRA): ΔW = orient(B A) with every entry of
 * A [r, in] and B [out, r] taken from the one saved vector base_model.unilora_theta_d:
 * A[j, i] = θ[iA[j, i]] · s[iA[j, i]], s[k] = 1 / sqrt(how often index k is used) (float32).
 * With save_indices the file holds the indices and scales of every module; without it (the
 * default) PEFT regenerates them: numpy.random.default_rng(proj_seed) draws a balanced assignment
 * of the D = Σ r (in + out) entries of all targeted layers (UniLoraModel.generate_index: each
 * index floor(D / L) times, D mod L extras by choice(replace=False), then shuffle), handed out in
 * model.modules() order, A then B of each layer.  The checkpoint does not record that order: the
 * targeted layers come from the base tensors and target_modules, their order from the numbers in
 * their paths and, for the model types below, from transformers' registration order of the named
 * children; anything else is refused. */
#include "method.h"

#include "lm_error.h"
#include "numpy_rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { UIA, UIB, USA, USB };

typedef struct {
    long r, seed, length;
    int save_indices;
} unilora_cfg;

typedef struct {
    const lm_ts_tensor *theta;
    const uint32_t *ia, *ib;    /* generated: this layer's chunks of the assignment ... */
    const float *scale;         /* ... and s[k] per theta index */
    const lm_ts_tensor *sa[4];  /* saved: indices_A, indices_B, scales_A, scales_B */
} unilora_params;

/* transformers' modeling files register these children in this order (LlamaForCausalLM: model,
 * lm_head; LlamaModel: embed_tokens, layers, norm; LlamaDecoderLayer: self_attn, mlp;
 * LlamaAttention: q, k, v, o; LlamaMLP: gate, up, down); Mistral, Qwen2 and Qwen3 copy Llama's.
 * `linear`: the nn.Linear leaves (what PEFT can put a Uni-LoRA layer on; lm_head last) */
static const char *const LLAMA_ORDER[] = {"model", "score", "embed_tokens", "layers", "self_attn", "q_proj", "k_proj",
                                          "v_proj", "o_proj", "mlp", "gate_proj", "up_proj", "down_proj", "norm",
                                          "lm_head", NULL};
static const char *const LLAMA_LINEAR[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj", "score", "lm_head", NULL};
static const struct {
    const char *model_type;
    const char *const *order, *const *linear;
} ORDERS[] = {{"llama", LLAMA_ORDER, LLAMA_LINEAR},
              {"mistral", LLAMA_ORDER, LLAMA_LINEAR},
              {"qwen2", LLAMA_ORDER, LLAMA_LINEAR},
              {"qwen3", LLAMA_ORDER, LLAMA_LINEAR}};

static lm_code unilora_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    unilora_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    f->r = 4;
    f->seed = 42;
    f->length = 256;
    if (lm_cfg_int(root, "r", &f->r, err) || lm_cfg_int(root, "proj_seed", &f->seed, err) ||
        lm_cfg_int(root, "theta_d_length", &f->length, err) || lm_cfg_bool(root, "save_indices", &f->save_indices, err))
        return err->code;
    if (f->r <= 0 || f->seed < 0 || f->length <= 0 || f->length > 0x7fffffffL)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig",
                       "peft_type UNILORA needs r > 0, proj_seed >= 0 and 0 < theta_d_length < 2^31");
    return LM_OK;
}

/* ---- the layers' order ------------------------------------------------------------------ */
typedef struct {
    const char *const *order, *const *linear;
    int ambiguous;
    const char *amb_a, *amb_b; /* the first pair whose order is unknown */
} order_ctx;

static long rank_of(const char *const *list, const char *s, size_t n)
{
    for (long k = 0; list != NULL && list[k] != NULL; k++)
        if (strlen(list[k]) == n && strncmp(list[k], s, n) == 0)
            return k;
    return -1;
}

static int all_digits(const char *s, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

/* model.modules() order of two module paths: < 0, > 0, or 0 when unknown (c->ambiguous set) */
static int path_cmp(const char *a, const char *b, order_ctx *c)
{
    for (;;) {
        size_t na = strcspn(a, "."), nb = strcspn(b, ".");
        if (na != nb || strncmp(a, b, na) != 0) {
            if (all_digits(a, na) && all_digits(b, nb)) { /* ModuleList members: by number */
                while (na > 1 && *a == '0')
                    a++, na--;
                while (nb > 1 && *b == '0')
                    b++, nb--;
                if (na != nb)
                    return na < nb ? -1 : 1;
                return strncmp(a, b, na) < 0 ? -1 : 1;
            }
            long ra = rank_of(c->order, a, na), rb = rank_of(c->order, b, nb);
            if (ra >= 0 && rb >= 0 && ra != rb)
                return ra < rb ? -1 : 1;
            break;
        }
        if (a[na] == '\0' || b[nb] == '\0')
            break; /* one inside the other */
        a += na + 1;
        b += nb + 1;
    }
    if (!c->ambiguous) {
        c->ambiguous = 1;
        c->amb_a = a;
        c->amb_b = b;
    }
    return 0;
}

typedef struct {
    char *path;
    long bi;
    uint64_t in, out;
    int orient;
} ul_layer;

static int layer_cmp(const void *x, const void *y, void *c)
{
    return path_cmp(((const ul_layer *)x)->path, ((const ul_layer *)y)->path, c);
}

/* the targeted layers of a checkpoint without indices, in PEFT's order */
static lm_code find_layers(lm_plan_ctx *ctx, ul_layer **out, size_t *n_out, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    const char *mt = lm_ctx_model_type(ctx);
    order_ctx oc = {NULL, NULL, 0, NULL, NULL};
    for (size_t k = 0; mt != NULL && k < sizeof ORDERS / sizeof *ORDERS; k++)
        if (strcmp(ORDERS[k].model_type, mt) == 0)
            oc.order = ORDERS[k].order, oc.linear = ORDERS[k].linear;
    if (!cfg->has_target || (cfg->all_linear && oc.linear == NULL))
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type UNILORA without saved indices and with "
                       "target_modules %s: which base tensors are Linear layers is known only for model_type llama, "
                       "mistral, qwen2 and qwen3 (the base's is '%s'); save the adapter with save_indices=True",
                       cfg->has_target ? "'all-linear'" : "null", mt ? mt : "none");
    size_t nb = lm_ctx_n_base(ctx), n = 0;
    ul_layer *v = calloc(nb ? nb : 1, sizeof *v);
    if (v == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    lm_code rc = LM_OK;
    long emb = lm_ctx_input_embedding(ctx);
    for (size_t i = 0; i < nb && rc == LM_OK; i++) {
        const lm_tensor_info *W = lm_ctx_base(ctx, (long)i);
        size_t len = strlen(W->name);
        if (len <= 7 || strcmp(W->name + len - 7, ".weight") != 0)
            continue;
        char path[1024];
        snprintf(path, sizeof path, "%.*s", (int)(len - 7), W->name);
        const char *leaf = lm_leaf_of(path);
        int t = cfg->all_linear ? rank_of(oc.linear, leaf, strlen(leaf)) >= 0 && strcmp(leaf, "lm_head") != 0
                                : lm_ctx_targets(ctx, path, err);
        if (t == 1 && cfg->all_linear)
            t = lm_ctx_targets(ctx, path, err); /* exclusions, layers_to_transform */
        if (t < 0)
            rc = err->code;
        if (t != 1)
            continue;
        if (W->n_dims != 2 || (long)i == emb || (oc.linear != NULL && rank_of(oc.linear, leaf, strlen(leaf)) < 0)) {
            rc = lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", path, "target_modules selects it, but it is no "
                                "Linear layer%s%s%s: PEFT creates Uni-LoRA layers on Linear and Conv1D only",
                                mt ? " of a " : "", mt ? mt : "", mt ? " model" : "");
            break;
        }
        int conv1d = lm_is_gpt2_conv1d(path);
        v[n] = (ul_layer){strdup(path), (long)i, conv1d ? W->shape[0] : W->shape[1], conv1d ? W->shape[1] : W->shape[0],
                          conv1d};
        if (v[n++].path == NULL)
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    if (rc == LM_OK && n == 0)
        rc = lm_fail(err, LM_E_MISMATCH, "NoMatchingTensor", "peft_type UNILORA: target_modules selects no 2-D weight of "
                     "the base; the adapter's indices cannot be assigned");
    if (rc == LM_OK) {
        qsort_r(v, n, sizeof *v, layer_cmp, &oc);
        for (size_t k = 1; k < n; k++) /* every neighbour pair decided: the order is the only one */
            (void)path_cmp(v[k - 1].path, v[k].path, &oc);
        if (oc.ambiguous)
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type UNILORA without saved indices: PEFT "
                         "hands out theta_d indices in model.modules() order, which the adapter does not record, and "
                         "for %s%s%s lora-merge cannot tell whether '%.*s' or '%.*s' comes first; save the adapter with "
                         "save_indices=True", mt ? "model_type '" : "a base whose config.json has no model_type:",
                         mt ? mt : "", mt ? "'" : "", (int)strcspn(oc.amb_a, "."), oc.amb_a, (int)strcspn(oc.amb_b, "."),
                         oc.amb_b);
    }
    if (rc != LM_OK) {
        for (size_t k = 0; k < n; k++)
            free(v[k].path);
        free(v);
        return rc;
    }
    *out = v;
    *n_out = n;
    return LM_OK;
}

/* UniLoraModel.generate_index and the inverse square roots of the counts */
static lm_code assign(lm_plan_ctx *ctx, uint64_t D, uint64_t L, uint64_t seed, uint32_t **idx, float **scale,
                      lm_err *err)
{
    uint32_t *x = lm_ctx_alloc(ctx, (size_t)D * sizeof *x, err);
    float *s = lm_ctx_alloc(ctx, (size_t)L * sizeof *s, err);
    uint64_t base = D / L, rem = D % L, *extra = malloc((size_t)(rem ? rem : 1) * sizeof *extra);
    uint64_t *count = calloc((size_t)L, sizeof *count);
    lm_code rc = LM_OK;
    if (x == NULL || s == NULL || extra == NULL || count == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    lm_np_pcg64 g;
    lm_np_default_rng(&g, seed);
    uint64_t n = 0;
    for (uint64_t k = 0; k < L; k++) /* np.repeat(np.arange(L), base) */
        for (uint64_t t = 0; t < base; t++)
            x[n++] = (uint32_t)k;
    if (rem > 0 && lm_np_choice(&g, L, rem, extra) != 0) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    for (uint64_t k = 0; k < rem; k++)
        x[n++] = (uint32_t)extra[k];
    lm_np_shuffle_u32(&g, x, D);
    for (uint64_t k = 0; k < D; k++)
        count[x[k]]++;
    for (uint64_t k = 0; k < L; k++) /* torch: counts.float().rsqrt(), 0 for unused indices */
        s[k] = count[k] ? 1.0f / sqrtf((float)count[k]) : 0.0f;
    *idx = x;
    *scale = s;
done:
    free(extra);
    free(count);
    return rc;
}

static lm_code plan_generated(lm_plan_ctx *ctx, const lm_ts_tensor *theta, lm_err *err)
{
    const unilora_cfg *f = lm_ctx_adapter(ctx)->cfg->mcfg;
    ul_layer *v = NULL;
    size_t n = 0;
    lm_code rc = find_layers(ctx, &v, &n, err);
    if (rc != LM_OK)
        return rc;
    uint64_t D = 0, r = (uint64_t)f->r;
    for (size_t k = 0; k < n; k++)
        D += r * (v[k].in + v[k].out);
    uint32_t *idx = NULL;
    float *scale = NULL;
    if (D > 0x7fffffffull)
        rc = lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "peft_type UNILORA: %llu adapted weights in all, more than "
                     "2^31 indices to generate", (unsigned long long)D);
    else
        rc = assign(ctx, D, (uint64_t)f->length, (uint64_t)f->seed, &idx, &scale, err);
    uint64_t at = 0;
    for (size_t k = 0; k < n && rc == LM_OK; k++) {
        lm_op *op = lm_ctx_add_delta(ctx, v[k].bi, LM_OP_LOWRANK, "unilora", v[k].path, r, v[k].in, v[k].out,
                                     v[k].orient, 1.0, sizeof(unilora_params), err);
        if (op == NULL) {
            rc = LM_E_NOMEM;
            break;
        }
        *(unilora_params *)op->params = (unilora_params){theta, idx + at, idx + at + r * v[k].in, scale, {NULL}};
        at += r * (v[k].in + v[k].out);
    }
    if (rc == LM_OK)
        rc = lm_ctx_note(ctx, "Uni-LoRA: theta_d indices regenerated (numpy default_rng(%ld), %llu entries over %zu "
                         "layers in PEFT's module order)", f->seed, (unsigned long long)D, n);
    for (size_t k = 0; k < n; k++)
        free(v[k].path);
    free(v);
    return rc;
}

/* a module whose indices and scales are saved (save_indices) */
static lm_code plan_saved(lm_plan_ctx *ctx, const lm_module *m, const lm_ts_tensor *theta, lm_err *err)
{
    const lm_ts_tensor *ia = m->part[UIA], *ib = m->part[UIB], *sa = m->part[USA], *sb = m->part[USB];
    if (ia == NULL || ib == NULL || sa == NULL || sb == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "Uni-LoRA with saved indices needs "
                              "unilora_indices_A, unilora_indices_B, unilora_scales_A and unilora_scales_B");
    if (ia->n_dims != 2 || ib->n_dims != 2 || ib->shape[1] != ia->shape[0] || lm_is_float_dtype(ia->dtype) ||
        lm_is_float_dtype(ib->dtype) || ia->dtype == LM_DT_BOOL || ib->dtype == LM_DT_BOOL ||
        sa->n_dims != 2 || sb->n_dims != 2 || sa->shape[0] != ia->shape[0] || sa->shape[1] != ia->shape[1] ||
        sb->shape[0] != ib->shape[0] || sb->shape[1] != ib->shape[1] || !lm_is_float_dtype(sa->dtype) ||
        !lm_is_float_dtype(sb->dtype))
        return lm_mismatch(err, m->path, "unilora_indices_A / _B are not integer [r, in] and [out, r] matrices with "
                           "float scales of the same shapes");
    for (int w = 0; w < 2; w++) {
        const lm_ts_tensor *t = w ? ib : ia;
        for (uint64_t e = 0; e < t->n_elems; e++) {
            int64_t x = lm_ts_index(t, e);
            if (x < 0 || (uint64_t)x >= theta->n_elems)
                return lm_mismatch(err, m->path, "%s[%llu] = %lld is outside theta_d's %llu entries", t->name,
                                   (unsigned long long)e, (long long)x, (unsigned long long)theta->n_elems);
        }
    }
    uint64_t r = ia->shape[0], in = ia->shape[1], out = ib->shape[0];
    int orient = 0;
    long bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err);
    if (bi < 0)
        return err->code;
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "unilora", m->path, r, in, out, orient, 1.0,
                                 sizeof(unilora_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(unilora_params *)op->params = (unilora_params){theta, NULL, NULL, NULL, {ia, ib, sa, sb}};
    return LM_OK;
}

static lm_code unilora_plan(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, lm_err *err)
{
    const unilora_cfg *f = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *theta = lm_ctx_shared(ctx, "unilora_theta_d");
    if (theta == NULL || theta->n_dims != 1 || theta->n_elems != (uint64_t)f->length || !lm_is_float_dtype(theta->dtype))
        return lm_fail(err, LM_E_FORMAT, theta == NULL ? "IncompleteModule" : "ShapeMismatch", "peft_type UNILORA needs "
                       "base_model.unilora_theta_d, a float vector of theta_d_length = %ld (%s)", f->length,
                       theta == NULL ? "missing" : "another shape or dtype");
    if (n == 0 && f->save_indices)
        return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "peft_type UNILORA with save_indices true, but the "
                       "adapter holds no unilora_indices_A / _B");
    if (n == 0)
        return plan_generated(ctx, theta, err);
    for (size_t k = 0; k < n; k++) {
        lm_code rc = plan_saved(ctx, mods[k], theta, err);
        if (rc != LM_OK)
            return rc;
    }
    return LM_OK;
}

/* A' [r, in] and B' [out, r]: θ[index] · s, exact in f64 (a product of two floats) */
static lm_code unilora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const unilora_params *pr = op->params;
    uint64_t r = op->rank, na = r * op->in, nb = op->out * r;
    const float *th = lm_prep_view(p, pr->theta, k, err);
    double *a64 = lm_prep_alloc(p, (size_t)(na + nb) * sizeof(double), err);
    const float *sv[2] = {NULL, NULL};
    if (pr->ia == NULL) {
        sv[0] = lm_prep_view(p, pr->sa[2], k, err);
        sv[1] = lm_prep_view(p, pr->sa[3], k, err);
        lm_prep_read(p, pr->sa[0]);
        lm_prep_read(p, pr->sa[1]);
    }
    if (th == NULL || a64 == NULL || (pr->ia == NULL && (sv[0] == NULL || sv[1] == NULL)))
        return LM_E_NOMEM;
    for (uint64_t e = 0; e < na + nb; e++) {
        int w = e >= na;
        uint64_t j = w ? e - na : e;
        if (pr->ia != NULL) {
            uint32_t q = w ? pr->ib[j] : pr->ia[j];
            a64[e] = (double)th[q] * (double)pr->scale[q];
        } else {
            a64[e] = (double)th[lm_ts_index(pr->sa[w], j)] * (double)sv[w][j];
        }
    }
    return lm_prep_publish64(p, a64, (size_t)na, a64 + na, (size_t)nb, err);
}

static void unilora_describe_config(const lm_adapter_config *cfg, char *buf, size_t cap)
{
    const unilora_cfg *f = cfg->mcfg;
    snprintf(buf, cap, "r: %ld, theta_d_length: %ld, proj_seed: %ld, save_indices: %s%s\n", f->r, f->length, f->seed,
             f->save_indices ? "true" : "false", f->save_indices ? "" : " (the layers come from the base and "
             "target_modules at merge time, their indices drawn again in model order)");
}

static const lm_part unilora_parts[] = {{"unilora_indices_A", UIA, -1, 1}, {"unilora_indices_B", UIB, -1, 1},
                                        {"unilora_scales_A", USA, -1, 1}, {"unilora_scales_B", USB, -1, 1}};
static const char *const unilora_shared[] = {"unilora_theta_d", NULL};

const lm_method lm_method_unilora = {
    .peft_type = "UNILORA",
    .summary = "unilora (every entry of B and A drawn from one shared vector by seeded indices)",
    .parts = unilora_parts,
    .n_parts = 4,
    .shared = unilora_shared,
    .parse_config = unilora_parse,
    .plan_adapter = unilora_plan,
    .prepare = unilora_prepare,
    .describe_config = unilora_describe_config,
};
