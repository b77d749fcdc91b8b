/* SPDX-License-Identifier: MIT */
/* c3a.c : C3A (peft-merge.md §5.14): a block-circulant delta, W[p b + u, q b + v] +=
 * scale * kernel[p, q, (v - u) mod b] / in, kernel [out/b, in/b, b]. */
#include "method.h"

#include "lm_error.h"

#include <stdlib.h>

typedef struct {
    long block_size; /* 0: not in the file */
    lm_suffix_pattern pattern;
} c3a_cfg;

static lm_code c3a_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    c3a_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    if (lm_cfg_int(root, "block_size", &f->block_size, err))
        return err->code;
    return lm_suffix_pattern_parse(root, "block_size_pattern", &f->pattern, err);
}

static void c3a_free_config(void *mcfg)
{
    if (mcfg == NULL)
        return;
    lm_suffix_pattern_free(&((c3a_cfg *)mcfg)->pattern);
    free(mcfg);
}

/* the block size PEFT built the module with (block_size_pattern, block_size) against the kernel's */
static lm_code c3a_check_config(lm_plan_ctx *ctx, const lm_module *m, uint64_t b, lm_err *err)
{
    const c3a_cfg *f = lm_ctx_adapter(ctx)->cfg->mcfg;
    long v = f->block_size;
    int got = lm_suffix_pattern_lookup(&f->pattern, m->path, &v);
    if (!lm_cfg_checked(ctx) || got < 0 || (got == 0 && f->block_size == 0) || (uint64_t)v == b)
        return LM_OK;
    return lm_cfg_disagrees(ctx, err, m->path, got ? "block_size_pattern" : "block_size", v,
                            "c3a_kernel has blocks of %llu", (unsigned long long)b);
}

static lm_code c3a_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    long bi = lm_ctx_weight_2d(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    uint64_t o = W->shape[0], in = W->shape[1];
    const lm_ts_tensor *kr = m->part[0];
    uint64_t b = kr->n_dims == 3 ? kr->shape[2] : 0;
    if (kr->n_dims != 3 || b == 0 || kr->shape[0] * b != o || kr->shape[1] * b != in || !lm_is_float_dtype(kr->dtype))
        return lm_mismatch(err, m->path, "c3a_kernel must be [out/b, in/b, b] for base '%s' [%llu, %llu]", W->name,
                           (unsigned long long)o, (unsigned long long)in);
    if (c3a_check_config(ctx, m, b, err) != LM_OK)
        return err->code;
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "c3a", m->path, err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->src = kr;
    op->in = in;
    op->rank = b; /* the block size */
    op->scale = lm_ctx_adapter(ctx)->weight;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static lm_code c3a_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    return (p->a = lm_prep_view(p, op->src, k, err)) != NULL ? LM_OK : LM_E_NOMEM;
}

static void c3a_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const uint64_t b = op->rank, nq = t->cols / b;
    const double inv = 1.0 / (double)op->in;
    const float s = (float)op->scale;
    for (uint64_t r = 0; r < t->nr; r++) {
        uint64_t R = t->r0 + r, pp = R / b, u = R % b;
        float *row = t->acc + r * t->cols;
        for (uint64_t q = 0; q < nq; q++) {
            const float *kv = p->a + (pp * nq + q) * b;
            float *seg = row + q * b;
            for (uint64_t v = 0; v < u; v++) /* (v - u) mod b = v + b - u */
                seg[v] += (float)((double)kv[v + b - u] * inv) * s;
            for (uint64_t v = u; v < b; v++)
                seg[v] += (float)((double)kv[v - u] * inv) * s;
        }
    }
}

/* the exact path: W + scale * kernel / in in f64 (PEFT's formula; its own float32 FFT and base-dtype
 * division are roundings the rule does not keep), rounded once by the engine */
static void c3a_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const uint64_t b = op->rank, nq = t->cols / b;
    const double f = op->scale / (double)op->in;
    for (uint64_t r = 0; r < t->nr; r++) {
        uint64_t R = t->r0 + r, pp = R / b, u = R % b;
        double *row = t->acc + r * t->cols;
        for (uint64_t q = 0; q < nq; q++) {
            const float *kv = p->a + (pp * nq + q) * b;
            double *seg = row + q * b;
            for (uint64_t v = 0; v < u; v++)
                seg[v] += (double)kv[v + b - u] * f;
            for (uint64_t v = u; v < b; v++)
                seg[v] += (double)kv[v - u] * f;
        }
    }
}

static const lm_part c3a_parts[] = {{"c3a_kernel", 0, -1, 1}};

const lm_method lm_method_c3a = {
    .peft_type = "C3A",
    .summary = "c3a (block-circulant delta)",
    .parts = c3a_parts,
    .n_parts = 1,
    .parse_config = c3a_parse,
    .free_config = c3a_free_config,
    .plan_module = c3a_plan_module,
    .prepare = c3a_prepare,
    .apply_tile = c3a_apply,
    .apply_tile64 = c3a_apply64,
};
