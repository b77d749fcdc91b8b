/* SPDX-License-Identifier: MIT */
/* supertuning.c : Super-Tuning (docs/adapter-types.md, Super-Tuning): the flat weight gets
 * supertuning_values scatter-added at supertuning_indices (positions into W.reshape(-1), W
 * [out, in]; repeated positions add up), and with 'r' set (the "Supra" hybrid) a LoRA delta
 * (lora_alpha / r) * supertuning_lora_B @ supertuning_lora_A on top.  The indices are data:
 * checked when planning and sorted by row per tensor when its first tile is claimed, as SHiRA's.
 * Exact path (issue 10): the values added in f64 (st_apply64), the LoRA part by the engine's f64
 * LOWRANK, rounded once. */
#include "method.h"

#include "lm_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { SI, SV, SA, SB };

typedef struct {
    long r;       /* 0: no LoRA part (the config's null) */
    double alpha; /* lora_alpha (needed when r is set) */
} st_cfg;

typedef struct {
    const lm_ts_tensor *ix, *v; /* supertuning_indices [n] (flat), supertuning_values [n] */
    uint64_t rows, cols;
} st_params;

typedef struct {
    uint64_t *row_start; /* [rows + 1] */
    uint64_t *col, *vi;  /* per entry in row order (stable): its column and its index into values */
} st_prep;

static lm_code st_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    st_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    int have_alpha = lm_cfg_field(root, "lora_alpha") != NULL;
    if (lm_cfg_int(root, "r", &f->r, err) || lm_cfg_num(root, "lora_alpha", &f->alpha, err))
        return err->code;
    if (f->r < 0 || (f->r > 0 && !have_alpha))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig",
                       "peft_type SUPERTUNING: 'r' must be null or positive, with a 'lora_alpha' when set");
    int saved = 1;
    if (lm_cfg_bool(root, "save_precomputed_indices", &saved, err))
        return err->code;
    if (!saved)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type SUPERTUNING with "
                       "save_precomputed_indices false: the positions would be torch.topk of the base's magnitudes, "
                       "whose order among equal magnitudes torch does not define; not supported");
    return LM_OK;
}

static lm_code st_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const st_cfg *fc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *ix = m->part[SI], *v = m->part[SV], *A = m->part[SA], *B = m->part[SB];
    long bi = lm_ctx_weight_2d(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    uint64_t o = W->shape[0], in = W->shape[1], n = o * in;
    if (ix == NULL || v == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                              "Super-Tuning needs supertuning_indices and supertuning_values");
    if (ix->n_dims != 1 || v->n_dims != 1 || ix->n_elems != v->n_elems || !lm_is_float_dtype(v->dtype) ||
        (ix->dtype != LM_DT_I32 && ix->dtype != LM_DT_I64))
        return lm_mismatch(err, m->path, "Super-Tuning needs integer supertuning_indices [n] and float "
                           "supertuning_values [n] (got %s and %s)", lm_dtype_name(ix->dtype), lm_dtype_name(v->dtype));
    if ((A != NULL || B != NULL) != (fc->r > 0))
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, fc->r > 0 ?
                              "the config sets 'r' but supertuning_lora_A / supertuning_lora_B are missing" :
                              "supertuning_lora_A / supertuning_lora_B present but the config's 'r' is null");
    for (uint64_t q = 0; q < ix->n_elems; q++) {
        int64_t x = lm_ts_index(ix, q);
        if (x < 0 || (uint64_t)x >= n)
            return lm_module_fail(err, LM_E_MISMATCH, "IndexOutOfRange", m->path,
                                  "supertuning_indices holds %lld, outside [0, %llu) of the weight's elements",
                                  (long long)x, (unsigned long long)n);
    }
    lm_ts_drop_pages(ix);
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "supertuning", m->path, err);
    st_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    *pr = (st_params){ix, v, o, in};
    op->scale = lm_ctx_adapter(ctx)->weight;
    lm_ctx_count_module(ctx);
    if (fc->r == 0)
        return LM_OK;
    if (A == NULL || B == NULL || A->n_dims != 2 || B->n_dims != 2 || A->shape[0] != (uint64_t)fc->r ||
        A->shape[1] != in || B->shape[0] != o || B->shape[1] != (uint64_t)fc->r || !lm_is_float_dtype(A->dtype) ||
        !lm_is_float_dtype(B->dtype))
        return lm_mismatch(err, m->path, "supertuning_lora_A / _B are not [r = %ld, %llu] and [%llu, r]", fc->r,
                           (unsigned long long)in, (unsigned long long)o);
    lm_op *lr = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "supertuning_lora", m->path, (uint64_t)fc->r, in, o, 0,
                                 fc->alpha / (double)fc->r, 2 * sizeof(const lm_ts_tensor *), err);
    if (lr == NULL)
        return LM_E_NOMEM;
    const lm_ts_tensor **ab = lr->params;
    ab[0] = A;
    ab[1] = B;
    return LM_OK;
}

static lm_code st_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    if (op->kind == LM_OP_LOWRANK) {
        const lm_ts_tensor *const *ab = op->params;
        return (p->a = lm_prep_view(p, ab[0], k, err)) == NULL || (p->b = lm_prep_view(p, ab[1], k, err)) == NULL
                   ? LM_E_NOMEM
                   : LM_OK;
    }
    const st_params *pr = op->params;
    uint64_t n = pr->ix->n_elems, o = pr->rows;
    st_prep *sp = lm_prep_alloc(p, sizeof *sp, err);
    if (sp == NULL || (p->a = lm_prep_view(p, pr->v, k, err)) == NULL ||
        (sp->row_start = lm_prep_alloc(p, (size_t)(o + 2) * sizeof(uint64_t), err)) == NULL ||
        (sp->col = lm_prep_alloc(p, (size_t)(n + 1) * sizeof(uint64_t), err)) == NULL ||
        (sp->vi = lm_prep_alloc(p, (size_t)(n + 1) * sizeof(uint64_t), err)) == NULL)
        return LM_E_NOMEM;
    lm_prep_read(p, pr->ix);
    for (uint64_t t = 0; t < n; t++) /* counting sort by row: stable, so repeats add in file order */
        sp->row_start[(uint64_t)lm_ts_index(pr->ix, t) / pr->cols + 2]++;
    for (uint64_t r = 2; r < o + 2; r++)
        sp->row_start[r] += sp->row_start[r - 1];
    for (uint64_t t = 0; t < n; t++) {
        uint64_t x = (uint64_t)lm_ts_index(pr->ix, t), at = sp->row_start[x / pr->cols + 1]++;
        sp->col[at] = x % pr->cols;
        sp->vi[at] = t;
    }
    p->data = sp;
    return LM_OK;
}

static void st_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const st_prep *sp = p->data;
    const float s = (float)op->scale;
    for (uint64_t r = 0; r < t->nr; r++) {
        uint64_t R = t->r0 + r;
        float *row = t->acc + r * t->cols;
        for (uint64_t e = sp->row_start[R]; e < sp->row_start[R + 1]; e++)
            row[sp->col[e]] += p->a[sp->vi[e]] * s;
    }
}

/* the same in f64 (exec_exact.h: LM_EXACT_F64; the LoRA part is the engine's LOWRANK op) */
static void st_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const st_prep *sp = p->data;
    for (uint64_t r = 0; r < t->nr; r++) {
        uint64_t R = t->r0 + r;
        double *row = t->acc + r * t->cols;
        for (uint64_t e = sp->row_start[R]; e < sp->row_start[R + 1]; e++)
            row[sp->col[e]] += (double)p->a[sp->vi[e]] * op->scale;
    }
}

static void st_describe_config(const lm_adapter_config *cfg, char *buf, size_t cap)
{
    const st_cfg *f = cfg->mcfg;
    if (f->r > 0)
        snprintf(buf, cap, "sparse values at saved positions, plus LoRA r: %ld, lora_alpha: %g, scale: %g\n", f->r,
                 f->alpha, f->alpha / (double)f->r);
    else
        snprintf(buf, cap, "sparse values at saved positions (no LoRA part)\n");
}

static const lm_part st_parts[] = {{"supertuning_indices", SI, -1, 1},
                                   {"supertuning_values", SV, -1, 1},
                                   {"supertuning_lora_A", SA, -1, 2},
                                   {"supertuning_lora_B", SB, -1, 2}};

const lm_method lm_method_supertuning = {
    .peft_type = "SUPERTUNING",
    .summary = "supertuning (sparse values added at saved positions; optional LoRA)",
    .parts = st_parts,
    .n_parts = 4,
    .flags = LM_M_NO_RANK,
    .parse_config = st_parse,
    .plan_module = st_plan_module,
    .prepare = st_prepare,
    .apply_tile = st_apply,
    .apply_tile64 = st_apply64,
    .describe_config = st_describe_config,
};
