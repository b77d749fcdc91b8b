/* SPDX-License-Identifier: MIT */
/* lora.c : LoRA (peft-merge.md §5.1): W += scale * B @ A for Linear, GPT-2 Conv1D (stored
 * [in, out], so (B @ A)^T), Embedding (lora_embedding_A/B) and convolution kernels; rank and
 * alpha through rank_pattern / alpha_pattern, rsLoRA, DoRA (row norms for Linear, column norms
 * for Conv1D and Embedding), lora_bias, tied output heads.  AdaLoRA reuses the pair planner. */
#include "lora.h"

#include "lm_error.h"
#include "peft_match.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const lm_ts_tensor *A, *B, *E; /* E: AdaLoRA's singular values scaling A's rows, or NULL */
} lora_params;

typedef struct {
    const lm_module *m;
    long base;   /* base entry of the weight */
    int orient;  /* 0 [out, in], 1 [in, out] (Conv1D, Embedding), -1 undecided (square) */
    long rank;
    double alpha;
} pair_info;

static const lm_ts_tensor *factor_a(const lm_module *m) { return m->part[LORA_A] ? m->part[LORA_A] : m->part[LORA_EA]; }
static const lm_ts_tensor *factor_b(const lm_module *m) { return m->part[LORA_B] ? m->part[LORA_B] : m->part[LORA_EB]; }

/* the storage of W for the pair: 0 [out, in], 1 [in, out] (Conv1D, Embedding), -1 square
 * (decided with the siblings); convolutions are [out, in, k...] */
static lm_code orientation(const lm_module *m, const lm_tensor_info *W, const lm_ts_tensor *A, const lm_ts_tensor *B,
                           int *orient, lm_err *err)
{
    char sw[96], sa[96], sb[96];
    lm_shape_str(sw, sizeof sw, W->n_dims, W->shape);
    lm_shape_str(sa, sizeof sa, A->n_dims, A->shape);
    lm_shape_str(sb, sizeof sb, B->n_dims, B->shape);
    if (m->part[LORA_EA] != NULL) { /* embedding: W [V, D], A [r, V], B [D, r] */
        if (A->n_dims != 2 || B->n_dims != 2 || W->n_dims != 2 || W->shape[0] != A->shape[1] ||
            W->shape[1] != B->shape[0])
            return lm_mismatch(err, m->path, "base '%s' is %s but lora_embedding_A %s, lora_embedding_B %s need [%llu, %llu]",
                               W->name, sw, sa, sb, (unsigned long long)A->shape[1], (unsigned long long)B->shape[0]);
        *orient = 1;
    } else if (W->n_dims >= 3 || A->n_dims >= 3) { /* convolution */
        int ok = W->n_dims == A->n_dims && W->n_dims == B->n_dims && W->shape[0] == B->shape[0];
        for (size_t d = 1; ok && d < W->n_dims; d++)
            ok = W->shape[d] == A->shape[d];
        for (size_t d = 2; ok && d < B->n_dims; d++)
            ok = B->shape[d] == 1;
        if (!ok)
            return lm_mismatch(err, m->path, "base '%s' is %s but lora_A is %s and lora_B %s", W->name, sw, sa, sb);
        *orient = 0;
    } else {
        uint64_t out = B->shape[0], in = A->shape[1];
        if (W->shape[0] == out && W->shape[1] == in)
            *orient = out == in ? -1 : 0;
        else if (W->shape[0] == in && W->shape[1] == out)
            *orient = 1;
        else
            return lm_mismatch(err, m->path, "base '%s' is %s but lora_B @ lora_A is [%llu, %llu] (lora_A %s, lora_B %s)",
                               W->name, sw, (unsigned long long)out, (unsigned long long)in, sa, sb);
    }
    return LM_OK;
}

/* pass 1 for one module: parts complete, ranks, base tensor, orientation where shapes tell.
 * li->m stays NULL for a module that adds nothing (AdaLoRA rank 0). */
static lm_code check_pair(lm_plan_ctx *ctx, const lm_module *m, int adalora, pair_info *li, lm_err *err)
{
    const lm_adapter *ad = lm_ctx_adapter(ctx);
    const lm_adapter_config *cfg = ad->cfg;
    const lm_ts_tensor *A = factor_a(m), *B = factor_b(m);
    const lm_ts_tensor *pa = m->part[LORA_A], *pb = m->part[LORA_B], *pea = m->part[LORA_EA], *peb = m->part[LORA_EB];
    li->m = NULL;
    li->base = -1;
    li->orient = -1;
    if (adalora && m->part[LORA_E] == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                              "no lora_E tensor in a %s adapter (AdaLoRA needs it)", cfg->peft_type);
    if ((pa != NULL) != (pb != NULL) || (pea != NULL) != (peb != NULL) || A == NULL) {
        const char *have = pa ? "lora_A" : pb ? "lora_B" : pea ? "lora_embedding_A" : peb ? "lora_embedding_B"
                         : m->part[LORA_MAG] ? "lora_magnitude_vector" : m->part[LORA_E] ? "lora_E" : "lora_B.bias";
        const char *miss = pa ? "lora_B" : pb ? "lora_A" : pea ? "lora_embedding_B" : peb ? "lora_embedding_A"
                                                                                             : "lora_A and lora_B";
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "adapter has %s but no %s for this module",
                              have, miss);
    }
    if (pa != NULL && pea != NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                              "adapter has both lora_A/B and lora_embedding_A/B");
    long r;
    double alpha;
    if (lm_ctx_rank_alpha(ctx, m->path, &r, &alpha, err) != LM_OK)
        return err->code;
    li->rank = r;
    li->alpha = alpha;
    if (!lm_is_float_dtype(A->dtype) || !lm_is_float_dtype(B->dtype))
        return lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", m->path, "lora factors must be float (got %s, %s)",
                              lm_dtype_name(A->dtype), lm_dtype_name(B->dtype));
    if (A->n_dims < 2 || B->n_dims < 2)
        return lm_mismatch(err, m->path, "lora factors must have at least 2 dimensions");
    uint64_t rank = A->shape[0];
    if (B->shape[1] != rank) {
        char s1[96], s2[96];
        lm_shape_str(s1, sizeof s1, A->n_dims, A->shape);
        lm_shape_str(s2, sizeof s2, B->n_dims, B->shape);
        return lm_mismatch(err, m->path, "lora_A %s and lora_B %s disagree on the rank", s1, s2);
    }
    if (adalora) {
        /* the file holds the kept ranks (any k <= init_r); k = 0 adds nothing */
        const lm_ts_tensor *E = m->part[LORA_E];
        if (E->n_elems != rank)
            return lm_mismatch(err, m->path, "lora_E has %llu elements but lora_A has rank %llu",
                               (unsigned long long)E->n_elems, (unsigned long long)rank);
        if (!lm_is_float_dtype(E->dtype))
            return lm_mismatch(err, m->path, "lora_E is not a float tensor");
        if (rank == 0)
            return LM_OK;
    } else if ((long)rank != r) {
        return lm_module_fail(err, LM_E_MISMATCH, "RankMismatch", m->path,
                              "the tensors have rank %llu but adapter_config.json says r=%ld for this module "
                              "(PEFT would fail to load it)", (unsigned long long)rank, r);
    }
    lm_err local;
    lm_err_clear(&local);
    long bi = lm_ctx_module_weight(ctx, m->path, &local);
    const char *leaf = lm_leaf_of(m->path);
    if (bi < 0 && (strcmp(leaf, "lm_head") == 0 || strcmp(leaf, "embed_out") == 0)) {
        /* a tied output head: the checkpoint stores only the input embedding, which is the
         * same tensor in the model, so the head's delta goes there (peft-merge.md §6.4) */
        long tied = lm_ctx_input_embedding(ctx);
        if (tied >= 0) {
            bi = tied;
            if (lm_ctx_note(ctx, "%s: %s is tied to the input embedding %s (no separate head in the base): "
                                 "its delta is applied to the shared tensor", ad->dir, m->path,
                            lm_ctx_base(ctx, tied)->name) != LM_OK)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
    }
    if (bi < 0) {
        *err = local;
        return local.code;
    }
    li->base = bi;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (!lm_is_float_dtype(W->dtype))
        return lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", m->path,
                              "base tensor '%s' is %s: only float weights can be merged", W->name,
                              lm_dtype_name(W->dtype));
    if (orientation(m, W, A, B, &li->orient, err) != LM_OK)
        return err->code;
    li->m = m;
    return LM_OK;
}

/* pass 2: square modules whose orientation the shapes cannot tell (peft-merge.md §5.1.2) */
static lm_code decide_square(lm_plan_ctx *ctx, pair_info *li, size_t n, lm_err *err)
{
    const lm_adapter *ad = lm_ctx_adapter(ctx);
    int any_conv1d = 0;
    for (size_t k = 0; k < n; k++)
        if (li[k].m && li[k].orient == 1 && li[k].m->part[LORA_A] != NULL)
            any_conv1d = 1;
    for (size_t k = 0; k < n; k++) {
        if (li[k].m == NULL || li[k].orient != -1)
            continue;
        int o = -1;
        const char *why = NULL;
        for (size_t j = 0; j < n && o < 0; j++)
            if (li[j].m && li[j].orient >= 0 && li[j].m->part[LORA_A] != NULL &&
                strcmp(lm_leaf_of(li[j].m->path), lm_leaf_of(li[k].m->path)) == 0) {
                o = li[j].orient;
                why = "as its non-square siblings";
            }
        if (o < 0 && any_conv1d) {
            o = 1;
            why = "the adapter's other modules are Conv1D";
        }
        if (o < 0 && lm_is_gpt2_conv1d(li[k].m->path)) {
            o = 1;
            why = "GPT-2 Conv1D layer name";
        }
        if (o < 0) {
            o = ad->cfg->fan_in_fan_out ? 1 : 0;
            why = "fan_in_fan_out of adapter_config.json";
        }
        li[k].orient = o;
        if (o == 1 && lm_ctx_note(ctx, "%s: square module %s taken as Conv1D ([in, out] storage): %s", ad->dir,
                                  li[k].m->path, why) != LM_OK)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    if (any_conv1d && !ad->cfg->fan_in_fan_out &&
        lm_ctx_note(ctx, "%s: fan_in_fan_out is false but the base stores these layers as [in, out] (Conv1D); "
                         "merged transposed, as PEFT does", ad->dir) != LM_OK)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return LM_OK;
}

/* pass 3 for one module: the low-rank op, DoRA, lora_bias */
static lm_code add_pair_ops(lm_plan_ctx *ctx, const pair_info *li, int adalora, lm_lora_scale_fn scale_of,
                            lm_err *err)
{
    const lm_adapter *ad = lm_ctx_adapter(ctx);
    const lm_adapter_config *cfg = ad->cfg;
    const lm_module *m = li->m;
    const lm_ts_tensor *A = factor_a(m), *B = factor_b(m), *mag = m->part[LORA_MAG], *bb = m->part[LORA_B_BIAS];
    lm_op *op = lm_ctx_add_delta(ctx, li->base, LM_OP_LOWRANK, adalora ? "adalora" : "lora", m->path, A->shape[0],
                                 A->n_elems / A->shape[0], B->shape[0], li->orient == 1,
                                 scale_of(cfg, li->rank, li->alpha), sizeof(lora_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(lora_params *)op->params = (lora_params){A, B, adalora ? m->part[LORA_E] : NULL};
    double scale = op->scale;
    uint64_t out = op->out;
    if (mag != NULL || cfg->use_dora) {
        if (mag == NULL || !cfg->use_dora)
            return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "%s",
                                  mag ? "adapter has lora_magnitude_vector but use_dora is not set"
                                      : "use_dora is set but the adapter has no lora_magnitude_vector for this module");
        /* one magnitude per output feature (per embedding dimension for an Embedding) */
        if (mag->n_elems != B->shape[0])
            return lm_mismatch(err, m->path, "lora_magnitude_vector has %llu elements, expected %llu",
                               (unsigned long long)mag->n_elems, (unsigned long long)B->shape[0]);
        if (!lm_is_float_dtype(mag->dtype))
            return lm_mismatch(err, m->path, "lora_magnitude_vector is not a float tensor");
        lm_op *d = lm_ctx_add_op(ctx, li->base, LM_OP_NORM, "dora", m->path, err);
        if (d == NULL)
            return LM_E_NOMEM;
        d->src = mag;
        d->axis = li->orient == 1 ? 1 : 0;
    }
    if (bb != NULL) {
        long bi = lm_ctx_module_bias(ctx, m->path);
        if (bi < 0)
            return lm_module_fail(err, LM_E_MISMATCH, "NoMatchingTensor", m->path,
                                  "lora_bias is set but the base layer has no bias (no '%s.bias')", m->path);
        if (lm_ctx_base(ctx, bi)->n_elems != bb->n_elems || bb->n_elems != out || !lm_is_float_dtype(bb->dtype))
            return lm_mismatch(err, m->path, "lora_B.bias has %llu elements but the base bias has %llu",
                               (unsigned long long)bb->n_elems, (unsigned long long)lm_ctx_base(ctx, bi)->n_elems);
        lm_op *bo = lm_ctx_add_op(ctx, bi, LM_OP_ADD, "lora_bias", m->path, err);
        if (bo == NULL)
            return LM_E_NOMEM;
        bo->src = bb;
        bo->scale = scale;
    }
    return LM_OK;
}

lm_code lm_lora_plan_pairs(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, int adalora,
                           lm_lora_scale_fn scale_of, lm_err *err)
{
    pair_info *li = calloc(n ? n : 1, sizeof *li);
    lm_code rc = LM_OK;
    if (li == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t k = 0; k < n && rc == LM_OK; k++)
        rc = check_pair(ctx, mods[k], adalora, &li[k], err);
    if (rc == LM_OK)
        rc = decide_square(ctx, li, n, err);
    for (size_t k = 0; k < n && rc == LM_OK; k++)
        if (li[k].m != NULL)
            rc = add_pair_ops(ctx, &li[k], adalora, scale_of, err);
    free(li);
    return rc;
}

lm_code lm_lora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const lora_params *pr = op->params;
    const float *A = lm_prep_view(p, pr->A, k, err), *B = lm_prep_view(p, pr->B, k, err);
    if (A == NULL || B == NULL)
        return LM_E_NOMEM;
    if (pr->E != NULL) { /* AdaLoRA: A with row i scaled by E[i] */
        const float *E = lm_prep_view(p, pr->E, k, err);
        float *As = lm_prep_floats(p, (size_t)(op->rank * op->in), err);
        /* the exact products too (two f32 multiply exactly in f64), for the exact path */
        double *A64 = lm_prep_alloc(p, (size_t)(op->rank * op->in) * sizeof *A64, err);
        if (E == NULL || As == NULL || A64 == NULL)
            return LM_E_NOMEM;
        for (uint64_t r = 0; r < op->rank; r++)
            for (uint64_t i = 0; i < op->in; i++) {
                As[r * op->in + i] = A[r * op->in + i] * E[r];
                A64[r * op->in + i] = (double)A[r * op->in + i] * (double)E[r];
            }
        A = As;
        p->a64 = A64;
    }
    p->a = A;
    p->b = B;
    return LM_OK;
}

lm_code lm_lora_check_variants(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    static const struct {
        const char *key, *what;
    } refused[] = {
        {"alora_invocation_tokens", "aLoRA (alora_invocation_tokens): PEFT does not support merging aLoRA"},
        {"arrow_config", "Arrow routing (arrow_config): a router adapter cannot be merged"},
        {"use_qalora", "QA-LoRA (use_qalora): made for GPTQ-quantized layers, not mergeable into a float base"},
        {"kasa_config", "KaSA (kasa_config): the merge needs an SVD of the base weights"},
        {"layer_replication", "layer_replication: the merged model would have more layers than the base"},
        {"enable_lora", "'enable_lora' (PEFT <= 0.2 MergedLinear): unsupported old format, re-save the adapter with a current PEFT"},
        {"target_parameters", "LoRA on raw parameters (target_parameters) is not supported by lora-merge yet"},
        {"use_bdlora", "BD-LoRA (use_bdlora) is not supported by lora-merge yet"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
        if (lm_cfg_truthy(lm_cfg_field(root, refused[i].key)))
            return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type %s with %s", c->peft_type,
                           refused[i].what);
    const cJSON *init = lm_cfg_field(root, "init_lora_weights");
    if (init != NULL) {
        char buf[64];
        if (cJSON_IsBool(init))
            snprintf(buf, sizeof buf, "%s", cJSON_IsTrue(init) ? "true" : "false");
        else if (cJSON_IsString(init))
            snprintf(buf, sizeof buf, "%s", init->valuestring);
        else
            snprintf(buf, sizeof buf, "?");
        if (lm_cfg_dup(buf, &c->init_lora_weights, err) != LM_OK)
            return LM_E_NOMEM;
        static const char *const mutating[] = {"pissa", "olora", "corda", "loftq", "lora_ga"};
        for (size_t i = 0; i < sizeof mutating / sizeof *mutating; i++)
            if (strncmp(buf, mutating[i], strlen(mutating[i])) == 0)
                return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant",
                               "peft_type %s with init_lora_weights '%s': PEFT re-runs this init on load and "
                               "modifies the base weights; convert the adapter to plain LoRA first "
                               "(path_initial_model_for_weight_conversion)", c->peft_type, buf);
    }
    return LM_OK;
}

static double lora_scale(const lm_adapter_config *cfg, long rank, double alpha)
{
    return cfg->use_rslora ? alpha / sqrt((double)rank) : alpha / (double)rank;
}

static lm_code lora_plan(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, lm_err *err)
{
    return lm_lora_plan_pairs(ctx, mods, n, 0, lora_scale, err);
}

static lm_code lora_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    return lm_lora_check_variants(root, c, err);
}

static void lora_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    const lm_ts_tensor *A = factor_a(m);
    long rank = A && A->n_dims >= 1 ? (long)A->shape[0] : 0, r = cfg->r;
    double alpha = cfg->lora_alpha;
    long w = lm_pattern_lookup((const char *const *)cfg->rank_keys.v, cfg->rank_keys.n, m->path, NULL);
    if (w >= 0)
        r = cfg->rank_vals[w];
    w = lm_pattern_lookup((const char *const *)cfg->alpha_keys.v, cfg->alpha_keys.n, m->path, NULL);
    if (w >= 0)
        alpha = cfg->alpha_vals[w];
    if (A == NULL) {
        snprintf(buf, cap, "incomplete (refused: %s without its pair)", m->part[LORA_B] ? "lora_B" : "a part");
        return;
    }
    int n = snprintf(buf, cap, "%s%s%s r=%ld alpha=%g scale=%g", m->part[LORA_EA] ? "embedding lora" : "lora",
                     m->part[LORA_MAG] ? " + dora" : "", m->part[LORA_B_BIAS] ? " + lora_bias" : "", rank, alpha,
                     lora_scale(cfg, r, alpha));
    if (rank != r && n > 0 && (size_t)n < cap)
        snprintf(buf + n, cap - (size_t)n, " (refused: the tensors have rank %ld but the config says r=%ld)", rank, r);
}

static void lora_describe_config(const lm_adapter_config *c, char *buf, size_t cap)
{
    snprintf(buf, cap, "variant: %s%s%s%s\nr: %ld, lora_alpha: %g, scale: %g (%s)\n", c->use_dora ? "DoRA" : "LoRA",
             c->use_rslora ? " + rsLoRA" : "", c->lora_bias ? " + lora_bias" : "",
             c->tt_modules.n ? " + trainable tokens" : "", c->r, c->lora_alpha, lora_scale(c, c->r, c->lora_alpha),
             c->use_rslora ? "alpha/sqrt(r)" : "alpha/r");
}

static const lm_part lora_parts[] = {
    {"lora_A", LORA_A, -1, 2},
    {"lora_B", LORA_B, LORA_B_BIAS, 2},
    {"lora_embedding_A", LORA_EA, -1, 1},
    {"lora_embedding_B", LORA_EB, -1, 1},
    {"lora_magnitude_vector", LORA_MAG, -1, -1},
};

const lm_method lm_method_lora = {
    .peft_type = "LORA",
    .summary = "W += alpha/r * B @ A (Linear, Conv1D, Embedding, conv; rsLoRA, DoRA, lora_bias)",
    .parts = lora_parts,
    .n_parts = sizeof lora_parts / sizeof *lora_parts,
    .flags = LM_M_PATTERNS,
    .parse_config = lora_parse,
    .plan_adapter = lora_plan,
    .prepare = lm_lora_prepare,
    .describe = lora_describe,
    .describe_config = lora_describe_config,
};
