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

static void shape_str(const lm_tensor_info *t, char *buf, size_t cap)
{
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (size_t d = 0; d < t->n_dims && k < cap; d++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%llu", d ? ", " : "", (unsigned long long)t->shape[d]);
    if (k < cap)
        snprintf(buf + k, cap - k, "]");
}

/* the sibling "<weight>" + suffix of entry w, or NULL */
static const lm_model_entry *sibling(const lm_model *model, const char *wname, const char *suffix, size_t *idx)
{
    char name[1100];
    snprintf(name, sizeof name, "%s%s", wname, suffix);
    return lm_model_find(model, name, idx);
}

/* compressed-tensors FP8: the strategy from the scale's shape (as compressed-tensors' own
 * dequantize() infers it), checked against the config's */
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
    } else if (sc->n_dims == 2 && s0 == R && s1 == 1 && strcmp(want, "block") != 0) {
        got = "channel";
        q->br = 1;
        q->bc = C;
    } else if (sc->n_dims == 2 && s0 == R && s1 > 1 && C % s1 == 0 && strcmp(want, "block") != 0) {
        got = "group";
        q->br = 1;
        q->bc = C / s1;
        if (s && s->group_size && s->group_size != q->bc) {
            char a[160], b[64];
            snprintf(a, sizeof a, "'%s' has %llu groups per row (group size %llu)", sc->name,
                     (unsigned long long)s1, (unsigned long long)q->bc);
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
        shape_str(w, ws, sizeof ws);
        shape_str(sc, ss, sizeof ss);
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
    q->tile_rows = q->br;
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

lm_code lm_plan_attach_ct(lm_plan *p, const lm_model *model, const lm_qscheme *s, size_t i, lm_qtensor **out,
                          lm_err *err)
{
    const lm_tensor_info *w = lm_model_tensor(model, i)->info;
    size_t si;
    const lm_model_entry *se;
    *out = NULL;
    if (w->dtype == LM_DT_F8_E4M3) {
        if (sibling(model, w->name, "_scale_inv", &si) != NULL)
            return LM_OK; /* block FP8 */
        if ((se = sibling(model, w->name, "_scale", &si)) != NULL)
            return attach_ct_fp8(p, model, s, w, se, si, out, err);
        if (s != NULL && s->fmt == LM_Q_CT_FP8) {
            char name[1100];
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
    for (size_t k = 0; k < 2; k++) {
        size_t ns = strlen(sfx[k]);
        if (n <= ns || strcmp(wname + n - ns, sfx[k]) != 0)
            continue;
        char name[1100];
        snprintf(name, sizeof name, "%.*s.input_scale", (int)(n - ns), wname);
        if (lm_model_find(model, name, &idx) != NULL)
            p->t[idx].drop = 1;
    }
}
