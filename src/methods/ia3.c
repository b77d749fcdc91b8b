/* SPDX-License-Identifier: MIT */
/* ia3.c : IA3 (peft-merge.md §5.3): W *= l per output feature, or per input feature for the
 * config's feedforward_modules; the bias of a non-feed-forward layer is scaled too.  Conv1D
 * weights are stored [in, out], so the axes swap.  Conv2d/Conv3d kernels [o, i, k...] (ia3_l
 * [1, o, 1...] or, feed-forward, [1, i, 1...]): rows scaled, or every kernel position of input
 * channel c by l[c] (a tile op with l expanded over the kernel). */
#include "method.h"

#include "lm_error.h"
#include "pyregex.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    /* feedforward_modules: a list (a module path ends with an entry, no dot boundary) or a regex */
    int ff_is_regex;
    char *ff_regex;
    lm_str_list ff_list;
} ia3_cfg;

static void ia3_free_config(void *p)
{
    ia3_cfg *c = p;
    if (c == NULL)
        return;
    free(c->ff_regex);
    lm_str_list_free(&c->ff_list);
    free(c);
}

static lm_code ia3_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    ia3_cfg *a = calloc(1, sizeof *a);
    if (a == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = a;
    const cJSON *ff = lm_cfg_field(root, "feedforward_modules");
    if (ff == NULL)
        return LM_OK;
    if (cJSON_IsString(ff)) {
        a->ff_is_regex = 1;
        return lm_cfg_dup(ff->valuestring, &a->ff_regex, err);
    }
    return lm_cfg_str_list(ff, "feedforward_modules", &a->ff_list, err);
}

/* 1 feed-forward, 0 not, -1 error (a bad regex) */
static int is_feedforward(const lm_adapter *ad, const char *module, lm_err *err)
{
    const ia3_cfg *c = ad->cfg->mcfg;
    if (c->ff_is_regex) {
        lm_regex *re = lm_regex_compile(c->ff_regex, err);
        if (re == NULL) {
            lm_err_set_path(err, ad->config_path);
            return -1;
        }
        int ff = lm_regex_fullmatch(re, module) == 1;
        lm_regex_free(re);
        return ff;
    }
    int ff = 0;
    for (size_t q = 0; q < c->ff_list.n; q++) {
        size_t nm = strlen(module), ne = strlen(c->ff_list.v[q]);
        ff |= nm >= ne && strcmp(module + nm - ne, c->ff_list.v[q]) == 0;
    }
    return ff;
}

/* a non-feed-forward layer's bias is scaled by l too */
static lm_code scale_bias(lm_plan_ctx *ctx, const lm_module *m, const lm_ts_tensor *l, lm_err *err)
{
    long bb = lm_ctx_module_bias(ctx, m->path);
    if (bb < 0)
        return LM_OK;
    const lm_tensor_info *bt = lm_ctx_base(ctx, bb);
    if (bt->n_elems != l->n_elems)
        return lm_mismatch(err, m->path, "ia3_l has %llu elements but the bias has %llu", (unsigned long long)l->n_elems,
                           (unsigned long long)bt->n_elems);
    lm_op *bo = lm_ctx_add_op(ctx, bb, LM_OP_SCALE, "ia3", m->path, err);
    if (bo == NULL)
        return LM_E_NOMEM;
    bo->src = l;
    /* a bias [o] is viewed [o, 1]; a bias stored [1, o] is scaled per column */
    uint64_t rows = bt->n_dims ? bt->shape[0] : 1;
    bo->axis = rows ? (bt->n_elems / rows == 1 ? 0 : 1) : 0;
    return LM_OK;
}

typedef struct {
    const lm_ts_tensor *l;
    uint64_t kk; /* kernel positions per input channel */
} ia3_conv_params;

/* Conv2d/Conv3d (PEFT's ia3 _ConvNd): l [1, o, 1...] scales rows; feed-forward l [1, i, 1...]
 * scales input channels */
static lm_code plan_conv(lm_plan_ctx *ctx, const lm_module *m, long bi, int ff, lm_err *err)
{
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    const lm_ts_tensor *l = m->part[0];
    uint64_t want = ff ? W->shape[1] : W->shape[0];
    int ok = l->n_dims == W->n_dims && l->shape[0] == 1 && l->shape[1] == want;
    for (size_t d = 2; ok && d < l->n_dims; d++)
        ok = l->shape[d] == 1;
    if (!ok) {
        char sl[96], sw[96];
        lm_shape_str(sl, sizeof sl, l->n_dims, l->shape);
        lm_shape_str(sw, sizeof sw, W->n_dims, W->shape);
        return lm_mismatch(err, m->path, "ia3_l is %s but the convolution kernel '%s' is %s (it needs [1, %llu, 1...]: "
                           "one factor per %s channel)", sl, W->name, sw, (unsigned long long)want, ff ? "input" : "output");
    }
    lm_op *op = lm_ctx_add_op(ctx, bi, ff ? LM_OP_METHOD : LM_OP_SCALE, "ia3", m->path, err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->src = l;
    lm_ctx_count_module(ctx);
    if (!ff)
        return scale_bias(ctx, m, l, err);
    ia3_conv_params *pr = lm_ctx_params(ctx, op, sizeof *pr, err);
    if (pr == NULL)
        return LM_E_NOMEM;
    pr->l = l;
    pr->kk = W->n_elems / (W->shape[0] * W->shape[1]);
    return LM_OK;
}

static lm_code ia3_conv_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const ia3_conv_params *pr = op->params;
    const float *l = lm_prep_view(p, pr->l, k, err);
    float *v = lm_prep_floats(p, (size_t)(pr->l->n_elems * pr->kk), err);
    if (l == NULL || v == NULL)
        return LM_E_NOMEM;
    for (uint64_t j = 0; j < pr->l->n_elems * pr->kk; j++)
        v[j] = l[j / pr->kk];
    p->a = v;
    return LM_OK;
}

static void ia3_conv_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    (void)op;
    for (uint64_t r = 0; r < t->nr; r++)
        for (uint64_t c = 0; c < t->cols; c++)
            t->acc[r * t->cols + c] *= p->a[c];
}

static lm_code ia3_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_ts_tensor *l = m->part[0];
    int ff = is_feedforward(lm_ctx_adapter(ctx), m->path, err);
    if (ff < 0)
        return err->code;
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    uint64_t n = l->n_elems;
    if (!lm_is_float_dtype(l->dtype))
        return lm_mismatch(err, m->path, "ia3_l is not a float tensor");
    if (W->n_dims >= 3)
        return plan_conv(ctx, m, bi, ff, err);
    if (W->n_dims != 2)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path, "IA3 on a %zu-D weight ('%s'): PEFT's IA3 "
                              "has Linear, Conv1D and Conv2d/Conv3d layers only", W->n_dims, W->name);
    int shape_ff = l->n_dims == 2 && l->shape[0] == 1 && l->shape[1] == n && n > 1;
    if (l->n_dims == 2 && n > 1 && shape_ff != ff)
        return lm_mismatch(err, m->path, "ia3_l is [%llu, %llu] but feedforward_modules says this module is %s",
                           (unsigned long long)l->shape[0], (unsigned long long)l->shape[1],
                           ff ? "feed-forward" : "not feed-forward");
    /* the scaled dimension: output features (non-FF) or input features (FF) in Linear storage
     * [out, in]; a Conv1D weight is stored [in, out], so the axes swap */
    int axis;
    uint64_t d0 = W->shape[0], d1 = W->shape[1];
    int first = ff ? 1 : 0;
    if (d0 == d1 && d0 == n)
        axis = lm_is_gpt2_conv1d(m->path) ? 1 - first : first;
    else if ((first == 0 ? d0 : d1) == n)
        axis = first;
    else if ((first == 0 ? d1 : d0) == n)
        axis = 1 - first;
    else
        return lm_mismatch(err, m->path, "ia3_l has %llu elements but base '%s' is [%llu, %llu]", (unsigned long long)n,
                           W->name, (unsigned long long)d0, (unsigned long long)d1);
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_SCALE, "ia3", m->path, err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->src = l;
    op->axis = axis;
    lm_ctx_count_module(ctx);
    return ff ? LM_OK : scale_bias(ctx, m, l, err);
}

static void ia3_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    (void)cfg;
    const lm_ts_tensor *l = m->part[0];
    snprintf(buf, cap, "ia3 (%s features scaled)",
             l->n_dims >= 3 ? "conv channels" : l->n_dims == 2 && l->shape[0] == 1 && l->n_elems > 1 ? "input, feed-forward"
                                                                                                  : "output");
}

static void ia3_describe_config(const lm_adapter_config *c, char *buf, size_t cap)
{
    const ia3_cfg *a = c->mcfg;
    size_t used = (size_t)snprintf(buf, cap, "variant: IA3\n");
    if (a->ff_is_regex && used < cap)
        snprintf(buf + used, cap - used, "feedforward_modules: regex %s\n", a->ff_regex);
    else if (a->ff_list.n && used < cap) {
        used += (size_t)snprintf(buf + used, cap - used, "feedforward_modules:");
        for (size_t i = 0; i < a->ff_list.n && used < cap; i++)
            used += (size_t)snprintf(buf + used, cap - used, " %s", a->ff_list.v[i]);
        if (used < cap)
            snprintf(buf + used, cap - used, "\n");
    }
}

static const lm_part ia3_parts[] = {{"ia3_l", 0, -1, 1}};

const lm_method lm_method_ia3 = {
    .peft_type = "IA3",
    .flags = LM_M_UNIT_WEIGHT,
    .summary = "W * l per output feature (bias too), per input feature for feedforward_modules",
    .parts = ia3_parts,
    .n_parts = 1,
    .parse_config = ia3_parse,
    .free_config = ia3_free_config,
    .plan_module = ia3_plan_module,
    .prepare = ia3_conv_prepare,
    .apply_tile = ia3_conv_apply,
    .describe = ia3_describe,
    .describe_config = ia3_describe_config,
};
