/* SPDX-License-Identifier: MIT */
/* lora.c : LoRA (peft-merge.md §5.1): W += scale * B @ A for Linear, GPT-2 Conv1D (stored
 * [in, out], so (B @ A)^T), Embedding (lora_embedding_A/B), convolution kernels and
 * nn.MultiheadAttention (in_proj_weight, and out_proj twice as PEFT does, §5.1.6); rank and alpha
 * through rank_pattern / alpha_pattern, rsLoRA, DoRA (row norms for Linear, column norms for
 * Conv1D and Embedding), lora_bias, tied output heads, BD-LoRA (a block-diagonal factor stored
 * compressed, §5.1.8), VeLoRA and MonteCLoRA (their extra tensors are not part of the merge).
 * LoRA on parameters (target_parameters) is lora_param.c.  AdaLoRA reuses the pair planner. */
#include "lora.h"

#include "lycoris.h"

#include "lm_error.h"
#include "peft_match.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const lm_method lm_method_lora;

typedef struct {
    int kind;                      /* LM_LORA_PAIR */
    const lm_ts_tensor *A, *B, *E; /* E: AdaLoRA's singular values scaling A's rows, or NULL */
    long nb_a, nb_b;               /* BD-LoRA: A (B) stored as the nb row-chunks of its diagonal blocks */
} lora_params;

typedef struct {
    const lm_module *m;
    long base;   /* base entry of the weight */
    int orient;  /* 0 [out, in], 1 [in, out] (Conv1D, Embedding), -1 undecided (square) */
    long rank;
    double alpha;
    uint64_t in, out; /* the delta's shape ([out, in]; a conv's in is in * kernel) */
    long nb_a, nb_b;  /* BD-LoRA blocks of A / B (0: a plain factor) */
    int mha;          /* 1: the in_proj of an nn.MultiheadAttention; 2: its out_proj */
} pair_info;

static const lm_ts_tensor *factor_a(const lm_module *m) { return m->part[LORA_A] ? m->part[LORA_A] : m->part[LORA_EA]; }
static const lm_ts_tensor *factor_b(const lm_module *m) { return m->part[LORA_B] ? m->part[LORA_B] : m->part[LORA_EB]; }

/* the storage of W for the pair: 0 [out, in], 1 [in, out] (Conv1D, Embedding), -1 square
 * (decided with the siblings); convolutions are [out, in, k...] */
static lm_code orientation(const lm_module *m, const lm_tensor_info *W, const lm_ts_tensor *A, const lm_ts_tensor *B,
                           uint64_t in, uint64_t out, int *orient, lm_err *err)
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

/* "<module>.in_proj_weight" of an nn.MultiheadAttention, or -1 */
static long mha_in_proj(lm_plan_ctx *ctx, const char *module)
{
    char buf[1100];
    lm_err e;
    lm_err_clear(&e);
    snprintf(buf, sizeof buf, "%s.in_proj_weight", module);
    return lm_ctx_base_named(ctx, buf, &e);
}

static int matches_any(const lm_str_list *l, const char *path)
{
    for (size_t i = 0; i < l->n; i++)
        if (strstr(path, l->v[i]) != NULL) /* PEFT: `pattern in target_name` */
            return 1;
    return 0;
}

/* BD-LoRA (peft-merge.md §5.1.8): the blocks of this module's A or B, or 0 and 0 */
static lm_code bd_blocks(const lm_lora_cfg *lc, const lm_module *m, uint64_t rank, long *nb_a, long *nb_b, lm_err *err)
{
    *nb_a = *nb_b = 0;
    if (lc == NULL || lc->bd_nblocks <= 0)
        return LM_OK;
    int a = matches_any(&lc->bd_a, m->path), b = matches_any(&lc->bd_b, m->path);
    if (a && b)
        return lm_module_fail(err, LM_E_FORMAT, "InvalidConfig", m->path,
                              "matches both target_modules_bd_a and target_modules_bd_b of use_bdlora");
    const lm_ts_tensor *A = m->part[LORA_A], *B = m->part[LORA_B];
    if ((!a && !b) || A == NULL || B == NULL)
        return LM_OK;
    long nb = lc->bd_nblocks;
    uint64_t other = a ? A->shape[1] * (uint64_t)nb : B->shape[0]; /* in (A) or out (B) */
    if (rank % (uint64_t)nb != 0 || (b && other % (uint64_t)nb != 0))
        return lm_mismatch(err, m->path, "BD-LoRA with nblocks=%ld needs the rank (%llu) and the %s features to be "
                           "multiples of it", nb, (unsigned long long)rank, a ? "input" : "output");
    *(a ? nb_a : nb_b) = nb;
    return LM_OK;
}

/* the base tensor of a pair: "<module>.weight", an nn.MultiheadAttention's in_proj_weight, or the
 * input embedding for a tied output head; -1 with *err */
static long pair_base(lm_plan_ctx *ctx, const lm_module *m, pair_info *li, lm_err *err)
{
    const lm_adapter *ad = lm_ctx_adapter(ctx);
    const lm_adapter_config *cfg = ad->cfg;
    lm_err local;
    lm_err_clear(&local);
    long bi = lm_ctx_module_weight(ctx, m->path, &local);
    const char *leaf = lm_leaf_of(m->path);
    if (bi < 0 && (bi = mha_in_proj(ctx, m->path)) >= 0) {
        /* nn.MultiheadAttention: lora_A/B on the module itself adapt in_proj_weight [3E, E] */
        li->mha = 1;
        if (m->part[LORA_MAG] != NULL || cfg->use_dora || m->part[LORA_B_BIAS] != NULL)
            return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path,
                                  "%s on nn.MultiheadAttention: PEFT does not merge it (in_proj_weight)",
                                  m->part[LORA_B_BIAS] != NULL ? "lora_bias" : "DoRA"), -1;
    }
    if (bi < 0 && (strcmp(leaf, "lm_head") == 0 || strcmp(leaf, "embed_out") == 0)) {
        /* a tied output head: the checkpoint stores only the input embedding, which is the
         * same tensor in the model, so the head's delta goes there (peft-merge.md §6.4) */
        long tied = lm_ctx_input_embedding(ctx);
        if (tied >= 0) {
            bi = tied;
            if (lm_ctx_note(ctx, "%s: %s is tied to the input embedding %s (no separate head in the base): "
                                 "its delta is applied to the shared tensor", ad->dir, m->path,
                            lm_ctx_base(ctx, tied)->name) != LM_OK)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory"), -1;
        }
    }
    if (bi < 0)
        *err = local;
    return bi < 0 ? -1 : bi;
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
    if (!adalora && bd_blocks(cfg->mcfg, m, rank, &li->nb_a, &li->nb_b, err) != LM_OK)
        return err->code;
    li->in = A->n_elems / (rank ? rank : 1) * (uint64_t)(li->nb_a ? li->nb_a : 1);
    li->out = B->shape[0];
    if (B->shape[1] * (uint64_t)(li->nb_b ? li->nb_b : 1) != rank) {
        char s1[96], s2[96];
        lm_shape_str(s1, sizeof s1, A->n_dims, A->shape);
        lm_shape_str(s2, sizeof s2, B->n_dims, B->shape);
        /* a grouped conv: lora_B is [out, r / groups, 1...] (lora_A keeps all input channels) */
        if (A->n_dims >= 3 && B->n_dims == A->n_dims && B->shape[1] > 0 && rank % B->shape[1] == 0 &&
            rank > B->shape[1])
            return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path,
                                  "LoRA on a grouped convolution (groups = %llu: lora_A %s, lora_B %s): PEFT cannot "
                                  "merge it (NotImplementedError for groups > 1)",
                                  (unsigned long long)(rank / B->shape[1]), s1, s2);
        return lm_mismatch(err, m->path, "lora_A %s and lora_B %s disagree on the rank%s", s1, s2,
                           li->nb_a || li->nb_b ? " (BD-LoRA block-diagonal factor)" : "");
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
    long bi = pair_base(ctx, m, li, err);
    if (bi < 0)
        return err->code;
    li->base = bi;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (!lm_is_float_dtype(W->dtype))
        return lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", m->path,
                              "base tensor '%s' is %s: only float weights can be merged", W->name,
                              lm_dtype_name(W->dtype));
    if (orientation(m, W, A, B, li->in, li->out, &li->orient, err) != LM_OK)
        return err->code;
    if ((li->nb_a || li->nb_b) && (A->n_dims != 2 || B->n_dims != 2))
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path,
                              "BD-LoRA on a %zu-D weight: PEFT supports it on Linear layers only", W->n_dims);
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

/* pass 2: the out_proj of a MultiheadAttention whose in_proj the adapter adapts ("<M>.base_layer.
 * out_proj.lora_A" in the file) gets its delta twice, as PEFT merges it (peft-merge.md §5.1.6) */
static lm_code mha_out_proj(lm_plan_ctx *ctx, pair_info *li, size_t n, lm_err *err)
{
    for (size_t k = 0; k < n; k++) {
        if (li[k].m == NULL || li[k].mha != 1)
            continue;
        size_t lp = strlen(li[k].m->path);
        for (size_t j = 0; j < n; j++) {
            const char *q = li[j].m ? li[j].m->path : "";
            if (strncmp(q, li[k].m->path, lp) != 0 || strcmp(q + lp, ".out_proj") != 0)
                continue;
            if (li[j].m->part[LORA_MAG] != NULL)
                return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", q,
                                      "DoRA on nn.MultiheadAttention: PEFT does not merge it (out_proj)");
            li[j].mha = 2;
            if (lm_ctx_note(ctx, "%s: %s is the out_proj of nn.MultiheadAttention %s: its delta is added twice, "
                                 "as PEFT merges (and runs) it", lm_ctx_adapter(ctx)->dir, q, li[k].m->path) != LM_OK)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
    }
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
    /* PEFT's MultiheadAttention merge adds the out_proj delta and then merges out_proj again */
    double twice = li->mha == 2 ? 2.0 : 1.0;
    lm_op *op = lm_ctx_add_delta(ctx, li->base, LM_OP_LOWRANK, adalora ? "adalora" : "lora", m->path, A->shape[0],
                                 li->in, li->out, li->orient == 1, twice * scale_of(cfg, li->rank, li->alpha),
                                 sizeof(lora_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    *(lora_params *)op->params = (lora_params){LM_LORA_PAIR, A, B, adalora ? m->part[LORA_E] : NULL, li->nb_a, li->nb_b};
    double scale = op->scale / twice;
    uint64_t out = op->out;
    if (m->part[LORA_LYCO_DORA] != NULL) {
        if (mag != NULL || cfg->use_dora || bb != NULL || li->mha || adalora)
            return lm_module_fail(err, LM_E_UNSUPPORTED, "MixedTypes", m->path, "LyCORIS dora_scale together with %s",
                                  bb ? "lora_bias" : li->mha ? "nn.MultiheadAttention" : adalora ? "AdaLoRA" : "PEFT's DoRA");
        return lm_lycoris_dora(ctx, m->path, li->base, op, scale_of(cfg, li->rank, li->alpha),
                               m->part[LORA_LYCO_DORA], err);
    }
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
        rc = mha_out_proj(ctx, li, n, err);
    if (rc == LM_OK)
        rc = decide_square(ctx, li, n, err);
    for (size_t k = 0; k < n && rc == LM_OK; k++)
        if (li[k].m != NULL)
            rc = add_pair_ops(ctx, &li[k], adalora, scale_of, err);
    free(li);
    return rc;
}

/* BD-LoRA: the full factor [rows, cols] from its nb row-chunks [rows / nb, cols / nb] stored
 * one under the other ([rows, cols / nb]): block_diag(*chunk(weight, nb, dim=0)) */
static const float *bd_expand(lm_prepared *p, const float *w, uint64_t rows, uint64_t cols, long nb, lm_err *err)
{
    float *f = lm_prep_floats(p, (size_t)(rows * cols), err);
    if (f == NULL)
        return NULL;
    uint64_t rb = rows / (uint64_t)nb, cb = cols / (uint64_t)nb;
    for (uint64_t i = 0; i < rows; i++)
        memcpy(f + i * cols + (i / rb) * cb, w + i * cb, (size_t)cb * sizeof *f);
    return f;
}

lm_code lm_lora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const lora_params *pr = op->params;
    if (pr->kind == LM_LORA_EXPERTS)
        return lm_lora_param_prepare(op, k, p, err);
    const float *A = lm_prep_view(p, pr->A, k, err), *B = lm_prep_view(p, pr->B, k, err);
    if (A == NULL || B == NULL)
        return LM_E_NOMEM;
    if (pr->nb_a > 1 && (A = bd_expand(p, A, op->rank, op->in, pr->nb_a, err)) == NULL)
        return LM_E_NOMEM;
    if (pr->nb_b > 1 && (B = bd_expand(p, B, op->out, op->rank, pr->nb_b, err)) == NULL)
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
        int lora_merges; /* plain LoRA merges it (lora_param.c, BD-LoRA); AdaLoRA does not have it */
    } refused[] = {
        {"alora_invocation_tokens", "aLoRA (alora_invocation_tokens): PEFT does not support merging aLoRA", 0},
        {"arrow_config", "Arrow routing (arrow_config): a router adapter cannot be merged", 0},
        {"use_qalora", "QA-LoRA (use_qalora): made for GPTQ-quantized layers, not mergeable into a float base", 0},
        {"kasa_config", "KaSA (kasa_config): the merge needs an SVD of the base weights", 0},
        {"layer_replication", "layer_replication: the merged model would have more layers than the base", 0},
        {"enable_lora", "'enable_lora' (PEFT <= 0.2 MergedLinear): unsupported old format, re-save the adapter with a current PEFT", 0},
        {"target_parameters", "LoRA on raw parameters (target_parameters): only LORA adapters have them", 1},
        {"use_bdlora", "BD-LoRA (use_bdlora): only LORA adapters have it", 1},
    };
    int lora = c->method == &lm_method_lora;
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
        if (!(lora && refused[i].lora_merges) && lm_cfg_truthy(lm_cfg_field(root, refused[i].key)))
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

static int only_extras(const lm_module *m) /* VeLoRA / MonteCLoRA tensors without factors */
{
    for (int s = LORA_A; s <= LORA_LYCO_DORA; s++)
        if (m->part[s] != NULL)
            return 0;
    return 1;
}

static lm_code lora_plan(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, lm_err *err)
{
    const lm_lora_cfg *lc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_module **pairs = malloc((n ? n : 1) * sizeof *pairs), **params = malloc((n ? n : 1) * sizeof *params);
    size_t n_pairs = 0, n_params = 0;
    lm_code rc = LM_OK;
    if (pairs == NULL || params == NULL)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t k = 0; k < n && rc == LM_OK; k++) {
        if (only_extras(mods[k])) /* MonteCLoRA's sampler sits one level below its module */
            rc = lm_ctx_note(ctx, "%s: %s holds MonteCLoRA/VeLoRA state only: not part of the merge (PEFT merges "
                                  "lora_A/lora_B alone)", lm_ctx_adapter(ctx)->dir, mods[k]->path) == LM_OK
                     ? LM_OK : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        else if (lc->target_params.n > 0 && lm_lora_param_module(lc, mods[k]->path))
            params[n_params++] = mods[k];
        else
            pairs[n_pairs++] = mods[k];
    }
    if (rc == LM_OK && pairs != NULL)
        rc = lm_lora_plan_pairs(ctx, pairs, n_pairs, 0, lora_scale, err);
    if (rc == LM_OK && n_params > 0)
        rc = lm_lora_plan_params(ctx, params, n_params, lora_scale, err);
    free(pairs);
    free(params);
    return rc;
}

/* target_parameters, or the out_proj of an nn.MultiheadAttention (its module is the one named) */
static int lora_claims(lm_plan_ctx *ctx, const lm_adapter_config *cfg, const lm_module *m)
{
    if (cfg->method != &lm_method_lora)
        return 0;
    const lm_lora_cfg *lc = cfg->mcfg;
    if (lc->target_params.n > 0 && lm_lora_param_module(lc, m->path))
        return 1;
    size_t n = strlen(m->path);
    if (ctx == NULL || n <= 9 || strcmp(m->path + n - 9, ".out_proj") != 0 || n - 9 >= 1024)
        return 0;
    char parent[1024];
    memcpy(parent, m->path, n - 9);
    parent[n - 9] = '\0';
    return mha_in_proj(ctx, parent) >= 0;
}

static void lora_free_config(void *p)
{
    lm_lora_cfg *lc = p;
    if (lc == NULL)
        return;
    lm_str_list_free(&lc->target_params);
    lm_str_list_free(&lc->bd_a);
    lm_str_list_free(&lc->bd_b);
    free(lc);
}

static lm_code lora_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    lm_lora_cfg *lc = calloc(1, sizeof *lc);
    if (lc == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = lc;
    lc->peft_major = lc->peft_minor = -1;
    if (lm_lora_check_variants(root, c, err) != LM_OK)
        return err->code;
    const cJSON *tp = lm_cfg_field(root, "target_parameters");
    if (tp != NULL && lm_cfg_str_list(tp, "target_parameters", &lc->target_params, err) != LM_OK)
        return err->code;
    const cJSON *v = lm_cfg_field(root, "peft_version");
    if (cJSON_IsString(v) && sscanf(v->valuestring, "%d.%d", &lc->peft_major, &lc->peft_minor) != 2)
        lc->peft_major = lc->peft_minor = -1;
    const cJSON *bd = lm_cfg_field(root, "use_bdlora");
    if (lm_cfg_truthy(bd)) {
        const cJSON *fa = cJSON_IsObject(bd) ? lm_cfg_field(bd, "target_modules_bd_a") : NULL;
        const cJSON *fb = cJSON_IsObject(bd) ? lm_cfg_field(bd, "target_modules_bd_b") : NULL;
        lc->bd_nblocks = 0;
        if (!cJSON_IsObject(bd) || lm_cfg_int(bd, "nblocks", &lc->bd_nblocks, err) != LM_OK ||
            (fa != NULL && lm_cfg_str_list(fa, "use_bdlora.target_modules_bd_a", &lc->bd_a, err) != LM_OK) ||
            (fb != NULL && lm_cfg_str_list(fb, "use_bdlora.target_modules_bd_b", &lc->bd_b, err) != LM_OK))
            return err->code ? err->code
                             : lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'use_bdlora' must be an object with 'nblocks'");
        if (lc->bd_nblocks <= 0)
            return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "use_bdlora.nblocks must be positive (it is %ld)",
                           lc->bd_nblocks);
    }
    return LM_OK;
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
    const lm_lora_cfg *lc = cfg->method == &lm_method_lora ? cfg->mcfg : NULL;
    if (lc != NULL && lc->target_params.n > 0 && lm_lora_param_module(lc, m->path)) {
        snprintf(buf, cap, "lora on a parameter (target_parameters; MoE experts: lora_A has r x experts = %ld rows) "
                 "alpha=%g", rank, alpha);
        return;
    }
    int n = snprintf(buf, cap, "%s%s%s r=%ld alpha=%g scale=%g", m->part[LORA_EA] ? "embedding lora" : "lora",
                     m->part[LORA_MAG] ? " + dora" : m->part[LORA_LYCO_DORA] ? " + LyCORIS dora_scale" : "", m->part[LORA_B_BIAS] ? " + lora_bias" : "", rank, alpha,
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
    const lm_lora_cfg *lc = c->method == &lm_method_lora ? c->mcfg : NULL;
    size_t n = strlen(buf);
    if (lc != NULL && lc->bd_nblocks > 0 && n < cap)
        n += (size_t)snprintf(buf + n, cap - n, "BD-LoRA: %ld blocks, block-diagonal A for %zu pattern(s), B for %zu\n",
                              lc->bd_nblocks, lc->bd_a.n, lc->bd_b.n);
    for (size_t i = 0; lc != NULL && i < lc->target_params.n && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%s%s", i ? ", " : "target_parameters: ", lc->target_params.v[i],
                              i + 1 == lc->target_params.n ? "\n" : "");
}

static const lm_part lora_parts[] = {
    {"lora_A", LORA_A, -1, 2},
    {"lora_B", LORA_B, LORA_B_BIAS, 2},
    {"lora_embedding_A", LORA_EA, -1, 1},
    {"lora_embedding_B", LORA_EB, -1, 1},
    {"lora_magnitude_vector", LORA_MAG, -1, -1},
    {"lycoris_dora_scale", LORA_LYCO_DORA, -1, 0},
    {"lora_velora_embed", LORA_VELORA, -1, 1},
    {"std_prior", LORA_MC_STD, -1, 0},
    {"expert_weights_prior", LORA_MC_WPRIOR, -1, 0},
    {"gaussian_var_prior", LORA_MC_VAR, -1, 0},
    {"expert_weights", LORA_MC_W, -1, 0},
};

const lm_method lm_method_lora = {
    .peft_type = "LORA",
    .summary = "W += alpha/r * B @ A (Linear, Conv1D, Embedding, conv, MultiheadAttention, MoE expert parameters; "
               "rsLoRA, DoRA, lora_bias, BD-LoRA)",
    .parts = lora_parts,
    .n_parts = sizeof lora_parts / sizeof *lora_parts,
    .flags = LM_M_PATTERNS,
    .parse_config = lora_parse,
    .free_config = lora_free_config,
    .claims_module = lora_claims,
    .plan_adapter = lora_plan,
    .prepare = lm_lora_prepare,
    .describe = lora_describe,
    .describe_config = lora_describe_config,
};
