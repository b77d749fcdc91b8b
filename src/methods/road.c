/* SPDX-License-Identifier: MIT */
/* road.c : RoAd (peft-merge.md §5.13): W <- R @ W, 2x2 rotations of the row pairs (p, p + g/2) in
 * groups of g = group_size output rows, scaled (alpha) and rotated (theta); road_1 has one angle
 * per pair, road_2 one per row, road_4 separate cos and sin parts.  The bias rotates with its
 * rows.  Tiles hold whole groups. */
#include "method.h"

#include "lm_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { RT, RA };

typedef struct {
    int variant;  /* 1, 2 or 4 (road_1 ...) */
    long group;   /* group_size (64) */
} road_cfg;

typedef struct {
    const lm_ts_tensor *theta, *alpha;
    uint64_t g, variant, out;
} road_params;

static lm_code road_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    road_cfg *rc = calloc(1, sizeof *rc);
    if (rc == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = rc;
    const cJSON *var = lm_cfg_field(root, "variant");
    rc->variant = 1;
    rc->group = 64;
    if (var != NULL) {
        if (!cJSON_IsString(var) || strncmp(var->valuestring, "road_", 5) != 0 ||
            (strcmp(var->valuestring + 5, "1") && strcmp(var->valuestring + 5, "2") && strcmp(var->valuestring + 5, "4")))
            return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "RoAd 'variant' must be road_1, road_2 or road_4");
        rc->variant = var->valuestring[5] - '0';
    }
    if (lm_cfg_int(root, "group_size", &rc->group, err) != LM_OK)
        return err->code;
    if (rc->group <= 0 || rc->group % 2 != 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "RoAd 'group_size' must be positive and even");
    return LM_OK;
}

static lm_code road_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const road_cfg *rc = lm_ctx_adapter(ctx)->cfg->mcfg;
    long bi = lm_ctx_weight_2d(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    /* theta, alpha: [out/2] (road_1), [out] (road_2), [2 out] (road_4); groups of g rows */
    uint64_t o = W->shape[0], g = (uint64_t)rc->group, v = (uint64_t)rc->variant;
    uint64_t want_n = v == 1 ? o / 2 : v == 2 ? o : 2 * o;
    const lm_ts_tensor *th = m->part[RT], *al = m->part[RA];
    if (!th || !al || th->n_elems != want_n || al->n_elems != want_n || o % g != 0 || !lm_is_float_dtype(th->dtype) ||
        !lm_is_float_dtype(al->dtype))
        return lm_mismatch(err, m->path, "RoAd road_%llu needs road_theta and road_alpha of %llu elements and "
                           "%llu output rows divisible by group_size %llu", (unsigned long long)v,
                           (unsigned long long)want_n, (unsigned long long)o, (unsigned long long)g);
    long bb = lm_ctx_module_bias(ctx, m->path);
    if (bb >= 0 && lm_ctx_base(ctx, bb)->n_elems != o)
        return lm_mismatch(err, m->path, "the bias has %llu elements, not %llu",
                           (unsigned long long)lm_ctx_base(ctx, bb)->n_elems, (unsigned long long)o);
    for (int k = 0; k < 2; k++) { /* the weight, then the bias, which rotates with its rows */
        long target = k == 0 ? bi : bb;
        if (target < 0)
            continue;
        lm_op *op = lm_ctx_add_op(ctx, target, LM_OP_METHOD, "road", m->path, err);
        road_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
        if (pr == NULL)
            return LM_E_NOMEM;
        *pr = (road_params){th, al, g, v, o};
        op->row_align = g;
        op->scale = 1.0;
    }
    lm_ctx_count_module(ctx);
    return LM_OK;
}

/* per output row p, c[p] (cos part) then s[p] (sin part), from theta and alpha by variant */
static lm_code road_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const road_params *pr = op->params;
    uint64_t o = pr->out, g = pr->g, h = g / 2;
    const float *th = lm_prep_view(p, pr->theta, k, err), *al = th ? lm_prep_view(p, pr->alpha, k, err) : NULL;
    float *cs = al ? lm_prep_floats(p, (size_t)(2 * o), err) : NULL;
    double *cs64 = cs ? lm_prep_alloc(p, (size_t)(2 * o) * sizeof *cs64, err) : NULL;
    if (cs64 == NULL)
        return LM_E_NOMEM;
    for (uint64_t q = 0; q < o; q++) {
        uint64_t G = q / g, x = q % g;
        double cv, sv;
        if (pr->variant == 1) { /* one angle per pair (x, x + h) */
            uint64_t t = G * h + (x % h);
            cv = (double)al[t] * cos((double)th[t]);
            sv = (double)al[t] * sin((double)th[t]);
        } else if (pr->variant == 2) {
            cv = (double)al[q] * cos((double)th[q]);
            sv = (double)al[q] * sin((double)th[q]);
        } else { /* [o/g, 2, g]: cos part, then sin part */
            cv = (double)al[G * 2 * g + x] * cos((double)th[G * 2 * g + x]);
            sv = (double)al[G * 2 * g + g + x] * sin((double)th[G * 2 * g + g + x]);
        }
        cs[q] = (float)cv;
        cs[o + q] = (float)sv;
        cs64[q] = cv;
        cs64[o + q] = sv;
    }
    p->a = cs;
    p->data = cs64; /* the exact path's factors, in f64 */
    return LM_OK;
}

/* rows p, q = p + g/2 of each group: p <- c_p W_p - s_p W_q, q <- s_q W_p + c_q W_q, in double.
 * One body for both paths: T is the tile's element type, A the factors (the f32 path's floats
 * from p->a, the exact path's doubles from p->data); for T = double the cast is a no-op. */
#define ROAD_ROTATE(T, A, op, t)                                                                    \
    do {                                                                                            \
        const road_params *pr = (op)->params;                                                       \
        uint64_t g = pr->g, h = g / 2, n_out = pr->out, cols = (t)->cols;                           \
        for (uint64_t G = 0; G < (t)->nr / g; G++)                                                  \
            for (uint64_t x = 0; x < h; x++) {                                                      \
                uint64_t pp = G * g + x, q = pp + h, P0 = (t)->r0 + pp, Q0 = (t)->r0 + q;           \
                T *restrict wp = (t)->acc + pp * cols, *restrict wq = (t)->acc + q * cols;          \
                const double cp = (A)[P0], sp = (A)[n_out + P0], cq = (A)[Q0], sq = (A)[n_out + Q0]; \
                for (uint64_t c = 0; c < cols; c++) {                                               \
                    const double a = wp[c], b = wq[c];                                              \
                    wp[c] = (T)(cp * a - sp * b);                                                   \
                    wq[c] = (T)(sq * a + cq * b);                                                   \
                }                                                                                   \
            }                                                                                       \
    } while (0)

static void road_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    const float *A = p->a;
    ROAD_ROTATE(float, A, op, t);
}

static void road_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const double *A = p->data;
    ROAD_ROTATE(double, A, op, t);
}

static const lm_part road_parts[] = {{"road_theta", RT, -1, 1}, {"road_alpha", RA, -1, 1}};

const lm_method lm_method_road = {
    .peft_type = "ROAD",
    .summary = "row-pair rotations",
    .flags = LM_M_UNIT_WEIGHT,
    .parts = road_parts,
    .n_parts = 2,
    .parse_config = road_parse,
    .plan_module = road_plan_module,
    .prepare = road_prepare,
    .apply_tile = road_apply,
    .apply_tile64 = road_apply64,
};
