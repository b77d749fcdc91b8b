/* SPDX-License-Identifier: MIT */
/* glora.c : GLoRA (docs/adapter-types.md): W <- W + W ⊙ A + B on Linear weights, A and B each a
 * low-rank product Xd @ Xu ("lora"), a column [out, 1] broadcast along the row ("vector"), a
 * scalar ("constant") or a full [out, in] buffer ("none": PEFT saves it as `.zeros` and uses the
 * values it loads).  Their kind is read from the tensors present, and checked against config_A_B.
 * The bias form b + b ⊙ D + E + W @ C applies only to layers with a bias; there it is refused
 * unless C, D and E are all zero (W @ C would need the weight while the bias is merged).
 * Exact path (issue 10): every element is computed in f64 from the stored values (glora_apply64),
 * rounded once by the engine. */
#include "method.h"

#include "lm_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* slots: A and B (and C) have four forms, D and E two */
enum { A_XD, A_XU, A_X, A_Z, B_XD, B_XU, B_X, B_Z, C_XD, C_XU, C_X, C_Z, D_X, D_Z, E_X, E_Z, N_SLOTS };
enum { G_NONE, G_LORA, G_VECTOR, G_CONSTANT };

typedef struct {
    int ab; /* config_A_B as G_* ("lora") */
} glora_cfg;

typedef struct {
    int kind;                     /* G_* */
    const lm_ts_tensor *xd, *xu;  /* LORA */
    const lm_ts_tensor *x;        /* VECTOR, CONSTANT; NONE: the [out, in] buffer */
} glora_path;

typedef struct {
    glora_path a, b;
    uint64_t out, in, r;
} glora_params;

typedef struct {
    const float *xd[2], *xu[2], *x[2]; /* A, B views */
    int kind[2];
    uint64_t r[2];
} glora_prep;

static int glora_kind_of(const char *s)
{
    static const char *const names[] = {"none", "lora", "vector", "constant"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    return -1;
}

static lm_code glora_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    glora_cfg *g = calloc(1, sizeof *g);
    if (g == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = g;
    g->ab = G_LORA;
    const cJSON *f = lm_cfg_field(root, "config_A_B");
    if (f != NULL && !cJSON_IsNull(f)) {
        if (!cJSON_IsString(f) || (g->ab = glora_kind_of(f->valuestring)) < 0)
            return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type GLORA: config_A_B is not one of "
                           "\"lora\", \"vector\", \"constant\", \"none\"");
    }
    return LM_OK;
}

/* one of A, B from its slots (first = its Xd slot); checks shapes */
static lm_code glora_path_of(const lm_module *m, int first, char which, uint64_t out, uint64_t in, glora_path *p,
                             lm_err *err)
{
    const lm_ts_tensor *xd = m->part[first], *xu = m->part[first + 1], *x = m->part[first + 2], *z = m->part[first + 3];
    int n = (xd || xu) + (x != NULL) + (z != NULL);
    if (n != 1 || (xd == NULL) != (xu == NULL))
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "GLoRA needs exactly one form of glora_%c "
                              "(Xd and Xu, X, or zeros)", which);
    const lm_ts_tensor *all[] = {xd, xu, x, z};
    for (int i = 0; i < 4; i++)
        if (all[i] != NULL && !lm_is_float_dtype(all[i]->dtype))
            return lm_mismatch(err, m->path, "glora_%c is not a float tensor", which);
    memset(p, 0, sizeof *p);
    if (xd != NULL) {
        if (xd->n_dims != 2 || xu->n_dims != 2 || xd->shape[0] != out || xu->shape[1] != in ||
            xd->shape[1] != xu->shape[0] || xd->shape[1] == 0)
            return lm_mismatch(err, m->path, "glora_%c.Xd / Xu must be [%llu, r] and [r, %llu]", which,
                               (unsigned long long)out, (unsigned long long)in);
        *p = (glora_path){G_LORA, xd, xu, NULL};
    } else if (x != NULL) {
        if (x->n_elems == 1 && x->n_dims == 1)
            *p = (glora_path){G_CONSTANT, NULL, NULL, x};
        else if (x->n_dims == 2 && x->shape[0] == out && x->shape[1] == 1)
            *p = (glora_path){G_VECTOR, NULL, NULL, x};
        else
            return lm_mismatch(err, m->path, "glora_%c.X must be [%llu, 1] (vector) or [1] (constant)", which,
                               (unsigned long long)out);
    } else {
        if (z->n_dims != 2 || z->shape[0] != out || z->shape[1] != in)
            return lm_mismatch(err, m->path, "glora_%c.zeros must be [%llu, %llu]", which, (unsigned long long)out,
                               (unsigned long long)in);
        *p = (glora_path){G_NONE, NULL, NULL, z};
    }
    return LM_OK;
}

/* 1 when every element of the float tensor t is +-0 (or t is absent) */
static int glora_all_zero(const lm_ts_tensor *t)
{
    if (t == NULL)
        return 1;
    size_t esz = lm_dtype_bits(t->dtype) / 8;
    const uint8_t *d = t->data;
    for (uint64_t i = 0; i < t->n_elems * esz; i++) /* little-endian: the sign bit is the top byte's */
        if ((i % esz == esz - 1 ? d[i] & 0x7f : d[i]) != 0)
            return 0;
    return 1;
}

static lm_code glora_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const glora_cfg *gc = lm_ctx_adapter(ctx)->cfg->mcfg;
    long bi = lm_ctx_weight_2d(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (lm_is_gpt2_conv1d(m->path))
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path, "GLoRA on a Conv1D layer: PEFT's "
                              "GLoRA wraps nn.Linear only");
    uint64_t out = W->shape[0], in = W->shape[1];
    glora_path a, b;
    if (glora_path_of(m, A_XD, 'A', out, in, &a, err) || glora_path_of(m, B_XD, 'B', out, in, &b, err))
        return err->code;
    if (a.kind != gc->ab || b.kind != gc->ab) {
        static const char *const names[] = {"none", "lora", "vector", "constant"};
        lm_module_fail(err, LM_E_MISMATCH, "ConfigMismatch", m->path, "adapter_config.json has \"config_A_B\": \"%s\", "
                       "but glora_%c is of the form \"%s\"", names[gc->ab], a.kind != gc->ab ? 'A' : 'B',
                       names[a.kind != gc->ab ? a.kind : b.kind]);
        lm_err_set_path(err, lm_ctx_adapter(ctx)->config_path);
        return err->code;
    }
    /* PEFT makes Xd [out, r] and Xu [r, in] ('r', no pattern) */
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    for (int i = 0; i < 2 && lm_cfg_checked(ctx) && cfg->r_given; i++) {
        const glora_path *p = i ? &b : &a;
        if (p->kind == G_LORA && p->xd->shape[1] != (uint64_t)cfg->r)
            return lm_cfg_disagrees(ctx, err, m->path, "r", cfg->r, "glora_%c.Xd is [%llu, %llu]", i ? 'B' : 'A',
                                    (unsigned long long)p->xd->shape[0], (unsigned long long)p->xd->shape[1]);
    }
    if (lm_ctx_module_bias(ctx, m->path) >= 0) {
        for (int s = C_XD; s < N_SLOTS; s++)
            if (!glora_all_zero(m->part[s]))
                return lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", m->path, "GLoRA's bias terms "
                                      "(b + b * D + E + W @ C) on a layer with a bias are not supported yet");
    }
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "glora", m->path, err);
    glora_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    uint64_t ra = a.kind == G_LORA ? a.xd->shape[1] : 0, rb = b.kind == G_LORA ? b.xd->shape[1] : 0;
    *pr = (glora_params){a, b, out, in, ra > rb ? ra : rb};
    op->in = in;
    op->out = out;
    op->rank = pr->r;
    op->scale = 1.0;
    op->flops = 2.0 * (double)(ra + rb + 2) * (double)out * (double)in;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static lm_code glora_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const glora_params *pr = op->params;
    glora_prep *g = lm_prep_alloc(p, sizeof *g, err);
    if (g == NULL)
        return LM_E_NOMEM;
    const glora_path *path[2] = {&pr->a, &pr->b};
    for (int i = 0; i < 2; i++) {
        g->kind[i] = path[i]->kind;
        if (path[i]->kind == G_LORA) {
            g->r[i] = path[i]->xd->shape[1];
            if ((g->xd[i] = lm_prep_view(p, path[i]->xd, k, err)) == NULL ||
                (g->xu[i] = lm_prep_view(p, path[i]->xu, k, err)) == NULL)
                return LM_E_NOMEM;
        } else if ((g->x[i] = lm_prep_view(p, path[i]->x, k, err)) == NULL)
            return LM_E_NOMEM;
    }
    p->data = g;
    return LM_OK;
}

/* element (o, c) of A (i = 0) or B (i = 1), in double */
static double glora_at(const glora_prep *g, int i, uint64_t o, uint64_t c, uint64_t in)
{
    switch (g->kind[i]) {
    case G_LORA: {
        double s = 0;
        for (uint64_t q = 0; q < g->r[i]; q++)
            s += (double)g->xd[i][o * g->r[i] + q] * (double)g->xu[i][q * in + c];
        return s;
    }
    case G_VECTOR:
        return g->x[i][o];
    case G_CONSTANT:
        return g->x[i][0];
    default:
        return g->x[i][o * in + c];
    }
}

static void glora_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const glora_prep *g = p->data;
    for (uint64_t i = 0; i < t->nr; i++) {
        float *row = t->acc + i * t->cols;
        for (uint64_t c = 0; c < t->cols; c++) {
            double w = row[c];
            row[c] = (float)(w + (w * glora_at(g, 0, t->r0 + i, c, op->in) + glora_at(g, 1, t->r0 + i, c, op->in)));
        }
    }
}

/* the same in f64, rounded once by the engine (exec_exact.h: LM_EXACT_F64): glora_apply's f64 value
 * without its rounding to f32 (which the engine's rounding to bf16/f16 would round a second time) */
static void glora_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const glora_prep *g = p->data;
    for (uint64_t i = 0; i < t->nr; i++) {
        double *row = t->acc + i * t->cols;
        for (uint64_t c = 0; c < t->cols; c++) {
            const double w = row[c];
            row[c] = w + (w * glora_at(g, 0, t->r0 + i, c, op->in) + glora_at(g, 1, t->r0 + i, c, op->in));
        }
    }
}

static void glora_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    (void)m;
    static const char *const names[] = {"none", "lora", "vector", "constant"};
    const glora_cfg *gc = cfg->mcfg;
    snprintf(buf, cap, "glora (W + W * A + B, A and B %s)", names[gc->ab]);
}

static const lm_part glora_parts[] = {
    {"glora_A.Xd", A_XD, -1, 1}, {"glora_A.Xu", A_XU, -1, 1}, {"glora_A.X", A_X, -1, 1}, {"glora_A.zeros", A_Z, -1, 1},
    {"glora_B.Xd", B_XD, -1, 1}, {"glora_B.Xu", B_XU, -1, 1}, {"glora_B.X", B_X, -1, 1}, {"glora_B.zeros", B_Z, -1, 1},
    {"glora_C.Xd", C_XD, -1, 1}, {"glora_C.Xu", C_XU, -1, 1}, {"glora_C.X", C_X, -1, 1}, {"glora_C.zeros", C_Z, -1, 1},
    {"glora_D.X", D_X, -1, 1},   {"glora_D.zeros", D_Z, -1, 1}, {"glora_E.X", E_X, -1, 1}, {"glora_E.zeros", E_Z, -1, 1},
};

const lm_method lm_method_glora = {
    .peft_type = "GLORA",
    .summary = "W + W * A + B (A, B low-rank, vector or scalar)",
    .parts = glora_parts,
    .n_parts = N_SLOTS,
    .flags = LM_M_UNIT_WEIGHT,
    .parse_config = glora_parse,
    .plan_module = glora_plan_module,
    .prepare = glora_prepare,
    .apply_tile = glora_apply,
    .apply_tile64 = glora_apply64,
    .describe = glora_describe,
};
