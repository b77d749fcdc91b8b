/* SPDX-License-Identifier: MIT */
/* miss.c : MiSS (peft-merge.md §5.12) on Linear weights: W[o, c] += scale * block[c mod r, o mod w]
 * with block [r, w], w = out ("default" init) or mini_r ("mini").  The "bat" form is refused. */
#include "method.h"

#include "lm_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int mini;    /* init_weights "mini" */
    long mini_r; /* the block's width then */
} miss_cfg;

static lm_code miss_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    miss_cfg *mc = calloc(1, sizeof *mc);
    if (mc == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = mc;
    const cJSON *iw = lm_cfg_field(root, "init_weights");
    mc->mini_r = 1;
    if (lm_cfg_int(root, "mini_r", &mc->mini_r, err) != LM_OK)
        return err->code;
    if (cJSON_IsString(iw) && strcmp(iw->valuestring, "bat") == 0)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant",
                       "peft_type MISS with init_weights \"bat\" (block-wise form) is not supported by lora-merge yet");
    mc->mini = cJSON_IsString(iw) && strcmp(iw->valuestring, "mini") == 0;
    if (mc->mini && mc->mini_r <= 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'mini_r' must be positive");
    return LM_OK;
}

typedef struct {
    const lm_ts_tensor *block;
    uint64_t width;
} miss_params;

static lm_code miss_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const miss_cfg *mc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *b = m->part[0];
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (W->n_dims != 2)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path, "MiSS on the %zu-D weight '%s': PEFT's "
                              "MiSS has Linear layers only", W->n_dims, W->name);
    uint64_t o = W->shape[0];
    uint64_t r = b->n_dims == 2 ? b->shape[0] : 0, width = mc->mini ? (uint64_t)mc->mini_r : o;
    if (b->n_dims != 2 || r == 0 || b->shape[1] != width || !lm_is_float_dtype(b->dtype))
        return lm_mismatch(err, m->path, "miss_block must be [r, %llu] for base '%s'", (unsigned long long)width, W->name);
    if (lm_cfg_rank_is(ctx, err, m->path, r, "miss_block") != LM_OK)
        return err->code;
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "miss", m->path, err);
    miss_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    pr->block = b;
    pr->width = width;
    op->rank = r;
    op->scale = lm_ctx_adapter(ctx)->weight;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static lm_code miss_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const miss_params *pr = op->params;
    return (p->a = lm_prep_view(p, pr->block, k, err)) != NULL ? LM_OK : LM_E_NOMEM;
}

static void miss_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const miss_params *pr = op->params;
    const uint64_t r = op->rank, w = pr->width;
    const float s = (float)op->scale;
    float *v = t->scratch; /* this row's column of the block: v[j] = block[j, o mod w] */
    const uint64_t used = r < t->cols ? r : t->cols; /* columns reach c mod r < cols only */
    for (uint64_t i = 0; i < t->nr; i++) {
        float *row = t->acc + i * t->cols;
        uint64_t oi = (t->r0 + i) % w;
        for (uint64_t j = 0; j < used; j++)
            v[j] = p->a[j * w + oi];
        for (uint64_t c0 = 0; c0 < t->cols; c0 += r) {
            uint64_t n = t->cols - c0 < r ? t->cols - c0 : r;
            float *seg = row + c0;
            for (uint64_t j = 0; j < n; j++)
                seg[j] += v[j] * s;
        }
    }
}

/* the same in f64 */
static void miss_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const miss_params *pr = op->params;
    const uint64_t r = op->rank, w = pr->width;
    double *v = t->scratch; /* this row's column of the block, times the scale */
    const uint64_t used = r < t->cols ? r : t->cols;
    for (uint64_t i = 0; i < t->nr; i++) {
        double *row = t->acc + i * t->cols;
        const uint64_t oi = (t->r0 + i) % w;
        for (uint64_t j = 0; j < used; j++)
            v[j] = (double)p->a[j * w + oi] * op->scale;
        for (uint64_t c0 = 0; c0 < t->cols; c0 += r) {
            const uint64_t n = t->cols - c0 < r ? t->cols - c0 : r;
            double *seg = row + c0;
            for (uint64_t j = 0; j < n; j++)
                seg[j] += v[j];
        }
    }
}

static void miss_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    (void)m;
    snprintf(buf, cap, "miss (%s block added)", ((const miss_cfg *)cfg->mcfg)->mini ? "mini" : "tiled");
}

static const lm_part miss_parts[] = {{"miss_block", 0, -1, 1}};

const lm_method lm_method_miss = {
    .peft_type = "MISS",
    .summary = "tiled blocks added (default, mini)",
    .parts = miss_parts,
    .n_parts = 1,
    .parse_config = miss_parse,
    .plan_module = miss_plan_module,
    .prepare = miss_prepare,
    .apply_tile = miss_apply,
    .apply_tile64 = miss_apply64,
    .certify_tile = lm_f64_rows_tile,
    .certify_raw = lm_f64_rows_raw,
    .describe = miss_describe,
};
