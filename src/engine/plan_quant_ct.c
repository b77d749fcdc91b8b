/* SPDX-License-Identifier: MIT */
/* plan_quant_ct.c : compressed-tensors and ModelOpt quantized weights in the plan (see
 * plan_quant_ct.h).  The tensors decide the layout; the config, when present, must agree. */
#include "plan_quant_ct.h"

#include "lm_error.h"

#include <stdio.h>
#include <string.h>

static uint64_t ceil_div(uint64_t a, uint64_t b)
{
    return (a + b - 1) / b;
}

static lm_code ct_fail(lm_err *err, const char *tensor, const char *fmt, const char *a, const char *b)
{
    lm_fail(err, LM_E_MISMATCH, "QuantScale", fmt, a, b);
    lm_err_set_tensor(err, tensor);
    return LM_E_MISMATCH;
}

/* the sibling "<weight>" + suffix of entry w, or NULL */
static const lm_model_entry *sibling(const lm_model *model, const char *wname, const char *suffix, size_t *idx)
{
    char name[1100];
    if (strlen(wname) + strlen(suffix) >= sizeof name)
        return NULL;
    memcpy(name, wname, strlen(wname));
    memcpy(name + strlen(wname), suffix, strlen(suffix) + 1);
    return lm_model_find(model, name, idx);
}

/* compressed-tensors FP8: the strategy from the scale's shape (as compressed-tensors' own
 * dequantize() infers it), checked against the config's.  A group scale has ceil(C / group_size)
 * columns (initialize.py, strategy_cdiv): one, [R, 1], when a row is no wider than a group, the
 * grid of a per-channel scale */
static lm_code ct_fp8_grid(const lm_qscheme *s, const lm_tensor_info *w, const lm_tensor_info *sc, lm_qtensor *q,
                           lm_err *err)
{
    const uint64_t R = w->shape[0], C = w->shape[1];
    const uint64_t s0 = sc->n_dims >= 1 ? sc->shape[0] : 1, s1 = sc->n_dims >= 2 ? sc->shape[1] : 1;
    const char *want = s ? s->ct_strategy : "";
    const char *got;
    if (sc->n_elems == 1 && sc->n_dims <= 2 && (R != 1 || strcmp(want, "channel") != 0)) {
        got = "tensor";
        q->br = R;
        q->bc = C;
    } else if (sc->n_dims == 2 && s0 == R && s1 == 1 && strcmp(want, "block") != 0 && strcmp(want, "group") != 0) {
        got = "channel";
        q->br = 1;
        q->bc = C;
    } else if (sc->n_dims == 2 && s0 == R && (s1 > 1 || strcmp(want, "group") == 0) && C % s1 == 0 &&
               strcmp(want, "block") != 0) {
        got = "group";
        q->br = 1;
        q->bc = C / s1;
        if (s && s->group_size && s->group_size != q->bc && !(s1 == 1 && s->group_size >= C)) {
            char a[160], b[64];
            snprintf(a, sizeof a, "'%s' has %llu group%s per row (group size %llu)", sc->name,
                     (unsigned long long)s1, s1 == 1 ? "" : "s", (unsigned long long)q->bc);
            snprintf(b, sizeof b, "%llu", (unsigned long long)s->group_size);
            return ct_fail(err, sc->name, "scale tensor %s but quantization_config says group_size %s", a, b);
        }
    } else if (s && strcmp(want, "block") == 0 && s->block_rows && sc->n_dims == 2 &&
               s0 == ceil_div(R, s->block_rows) && s1 == ceil_div(C, s->block_cols)) {
        got = "block";
        q->br = s->block_rows;
        q->bc = s->block_cols;
    } else {
        char a[200], b[200], ws[64], ss[64];
        lm_shape_str(ws, sizeof ws, w->n_dims, w->shape);
        lm_shape_str(ss, sizeof ss, sc->n_dims, sc->shape);
        snprintf(a, sizeof a, "'%s' %s", sc->name, ss);
        snprintf(b, sizeof b, "%s (per tensor [1], per channel [%llu, 1], per group [%llu, %llu/g]%s)", ws,
                 (unsigned long long)R, (unsigned long long)R, (unsigned long long)C,
                 s && strcmp(want, "block") == 0 ? ", or per block" : "");
        return ct_fail(err, sc->name, "scale tensor %s does not fit the compressed-tensors FP8 weight %s", a, b);
    }
    if (want[0] != '\0' && strcmp(want, got) != 0 && strcmp(want, "tensor_group") != 0) {
        char a[160];
        snprintf(a, sizeof a, "'%s' is a per-%s scale", sc->name, got);
        return ct_fail(err, sc->name, "scale tensor %s but quantization_config's weights strategy is '%s'", a, want);
    }
    q->srows = ceil_div(R, q->br);
    q->scols = ceil_div(C, q->bc);
    q->needs_amax = q->br == R && R > 1; /* one scale for the tensor: its amax first, then any tiles */
    q->tile_rows = q->needs_amax ? 1 : q->br;
    return LM_OK;
}

static lm_code attach_ct_fp8(lm_plan *p, const lm_model *model, const lm_qscheme *s, const lm_tensor_info *w,
                             const lm_model_entry *se, size_t si, lm_qtensor **out, lm_err *err)
{
    const lm_tensor_info *sc = se->info;
    if (w->n_dims != 2)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "compressed-tensors FP8 weight '%s' is "
                       "%zu-D: only 2-D weights are dequantized", w->name, w->n_dims);
    if (s != NULL && s->asymmetric)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "compressed-tensors FP8 weight '%s': "
                       "asymmetric float quantization (symmetric: false) is not dequantized", w->name);
    if (sc->dtype != LM_DT_F32 && sc->dtype != LM_DT_BF16 && sc->dtype != LM_DT_F16)
        return ct_fail(err, sc->name, "scale tensor '%s' is %s: compressed-tensors FP8 scales must be F32, BF16 "
                       "or F16", sc->name, lm_dtype_name(sc->dtype));
    lm_qtensor *q = lm_plan_blob(p, sizeof *q);
    if (q == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if (ct_fp8_grid(s, w, sc, q, err) != LM_OK)
        return err->code;
    q->fmt = LM_Q_CT_FP8;
    q->scale = se;
    q->scale_index = si;
    q->scale_dtype = sc->dtype;
    q->row_bytes = w->shape[1];
    q->view = *w;
    q->view.dtype = LM_DT_F32;
    *out = q;
    return LM_OK;
}

/* NVFP4: packed codes U8 [R, C/2], weight_scale F8_E4M3 [R, C/g], the second scale F32 (one
 * value); name2: weight_global_scale (compressed-tensors) or weight_scale_2 (ModelOpt).  An expert
 * stack: codes [E, R, C/2], scales [E, R, C/g], the second scale one value, or one per expert ([E],
 * [E, 1], [E, 1, 1]) or per k-th of an expert's rows ([E, k]: vLLM's w13 gate and up halves);
 * each follows the merged amax of its rows.  base: the siblings' stem ("<m>.weight", ModelOpt's
 * expert parameter "P_weight") */
static lm_code attach_nvfp4(lm_plan *p, const lm_model *model, const lm_qscheme *s, const lm_tensor_info *w,
                            lm_qformat fmt, const char *base, const char *name2, lm_qtensor **out, lm_err *err)
{
    const char *lib = fmt == LM_Q_MO_NVFP4 ? "ModelOpt NVFP4" : "compressed-tensors NVFP4";
    size_t si, si2;
    char want[1200];
    const lm_model_entry *se = sibling(model, base, "_scale", &si), *se2 = sibling(model, base, name2, &si2);
    if (se == NULL || se2 == NULL) {
        snprintf(want, sizeof want, "%s%s", base, se == NULL ? "_scale" : name2);
        return ct_fail(err, w->name, "%s: the packed weight has no scale tensor '%s'", lib, want);
    }
    const size_t nd = w->n_dims;
    if (nd != 2 && nd != 3)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "%s weight '%s' is %zu-D: 2-D weights "
                       "and 3-D expert stacks are dequantized", lib, w->name, nd);
    const lm_tensor_info *sc = se->info, *g = se2->info;
    const uint64_t E = nd == 3 ? w->shape[0] : 1, R = w->shape[nd - 2], C = 2 * w->shape[nd - 1];
    uint64_t gsz = s && s->group_size ? s->group_size : 16;
    if (sc->dtype != LM_DT_F8_E4M3)
        return ct_fail(err, sc->name, "scale tensor '%s' is %s: NVFP4 group scales must be F8_E4M3", sc->name,
                       lm_dtype_name(sc->dtype));
    /* the second scales: one, or (a stack) k per expert with k dividing R */
    const uint64_t n2 = g->n_elems, k2 = n2 / E;
    int g_ok = g->dtype == LM_DT_F32 && g->n_dims <= 1 && n2 == 1;
    if (nd == 3 && g->dtype == LM_DT_F32 && n2 > 1 && n2 % E == 0 && R % k2 == 0 && g->n_dims >= 1 &&
        g->shape[0] == E)
        g_ok = g->n_dims == 1 || (g->n_dims == 2 && g->shape[1] == k2) ||
               (g->n_dims == 3 && g->shape[1] == k2 && g->shape[2] == 1);
    if (!g_ok) {
        lm_shape_str(want, sizeof want, g->n_dims, g->shape);
        char a[1300];
        snprintf(a, sizeof a, "'%s' (%s %s)", g->name, lm_dtype_name(g->dtype), want);
        return ct_fail(err, g->name, "second scale %s: NVFP4 wants one F32 value%s", a,
                       nd == 3 ? ", or one per expert" : "");
    }
    if (gsz % 2 != 0 || C % gsz != 0) {
        char a[160], b[64];
        snprintf(a, sizeof a, "'%s' has %llu columns", w->name, (unsigned long long)C);
        snprintf(b, sizeof b, "%llu", (unsigned long long)gsz);
        return ct_fail(err, w->name, "NVFP4 weight %s: not a whole number of groups of %s", a, b);
    }
    const uint64_t wsc[3] = {E, R, C / gsz};
    char why[200];
    snprintf(why, sizeof why, "weight [%s%llu, %llu] in groups of %llu", nd == 3 ? "E, " : "", (unsigned long long)R,
             (unsigned long long)C, (unsigned long long)gsz);
    if (lm_plan_quant_scale_shape(sc, wsc + 3 - nd, nd, "NVFP4", why, err) != LM_OK)
        return err->code;
    lm_qtensor *q = lm_plan_blob(p, sizeof *q);
    uint64_t *shape = lm_plan_blob(p, 3 * sizeof *shape);
    if (q == NULL || shape == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    q->fmt = fmt;
    q->scale = se;
    q->scale_index = si;
    q->scale_dtype = LM_DT_F8_E4M3;
    q->scale2 = se2;
    q->scale2_index = si2;
    q->n_scale2 = n2;
    q->scale2_rows = E * R / n2;
    q->br = 1;
    q->bc = gsz;
    q->srows = E * R;
    q->scols = C / gsz;
    q->tile_rows = 1;
    q->needs_amax = 1; /* each second scale follows the merged amax of its rows */
    q->row_bytes = C / 2;
    memcpy(shape, w->shape, nd * sizeof *shape);
    shape[nd - 1] = C;
    q->view = *w;
    q->view.shape = shape;
    q->view.n_elems = E * R * C;
    q->view.dtype = LM_DT_F32;
    *out = q;
    return LM_OK;
}

static int ends_with(const char *s, const char *sfx)
{
    size_t n = strlen(s), k = strlen(sfx);
    return n > k && strcmp(s + n - k, sfx) == 0;
}

lm_code lm_plan_attach_ct(lm_plan *p, const lm_model *model, const lm_qscheme *s, size_t i, lm_qtensor **out,
                          lm_err *err)
{
    const lm_tensor_info *w = lm_model_tensor(model, i)->info;
    size_t si;
    const lm_model_entry *se;
    *out = NULL;
    char stem[1100];
    if (ends_with(w->name, ".weight_packed")) {
        if (w->dtype != LM_DT_U8)
            return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "base tensor '%s' is %s: compressed-"
                           "tensors pack-quantized integer weights are not dequantized by lora-merge; merge into the "
                           "unquantized original model", w->name, lm_dtype_name(w->dtype));
        snprintf(stem, sizeof stem, "%.*s", (int)(strlen(w->name) - 7), w->name); /* "<m>.weight" */
        return attach_nvfp4(p, model, s, w, LM_Q_CT_NVFP4, stem, "_global_scale", out, err);
    }
    /* ModelOpt: "<m>.weight" U8 with "<m>.weight_scale_2"; an expert parameter "P" U8 with
     * "P_weight_scale_2" (the NVFP4 exports of gpt-oss and other fused-expert models) */
    snprintf(stem, sizeof stem, "%s%s", w->name, ends_with(w->name, ".weight") ? "" : "_weight");
    if (w->dtype == LM_DT_U8 && sibling(model, stem, "_scale_2", &si) != NULL)
        return attach_nvfp4(p, model, s, w, LM_Q_MO_NVFP4, stem, "_scale_2", out, err);
    if (w->dtype == LM_DT_F8_E4M3) {
        if (sibling(model, w->name, "_scale_inv", &si) != NULL)
            return LM_OK; /* block FP8 */
        if ((se = sibling(model, w->name, "_scale", &si)) != NULL)
            return attach_ct_fp8(p, model, s, w, se, si, out, err);
        if (s != NULL && s->fmt == LM_Q_CT_FP8) {
            char name[1200];
            snprintf(name, sizeof name, "%s_scale", w->name);
            return ct_fail(err, w->name, "compressed-tensors FP8: the F8_E4M3 weight '%s' has no scale tensor '%s'",
                           w->name, name);
        }
    }
    return LM_OK;
}

void lm_plan_ct_drop_extras(lm_plan *p, const lm_model *model, const char *wname)
{
    static const char *const sfx[] = {".weight", ".weight_packed"};
    size_t n = strlen(wname), idx;
    char name[1100];
    snprintf(name, sizeof name, "%s_input_scale", wname); /* ModelOpt's expert parameter "P" */
    for (size_t k = 0; k < 2; k++) {
        size_t ns = strlen(sfx[k]);
        if (n > ns && strcmp(wname + n - ns, sfx[k]) == 0)
            snprintf(name, sizeof name, "%.*s.input_scale", (int)(n - ns), wname);
    }
    if (lm_model_find(model, name, &idx) != NULL)
        p->t[idx].drop = 1;
}
