/* SPDX-License-Identifier: MIT */
/* plan_quant.c : quantized base weights in the plan.  A quantized weight is planned as an F32
 * tensor of its shape (the methods see that view); the executor dequantizes its tiles and writes
 * them back quantized (the weight keeps its dtype, its scale tensor is rewritten by the same
 * tiles) or dequantized (--dtype: the scale tensors are dropped). */
#include "plan.h"

#include "lm_error.h"
#include "plan_quant_bnb.h"
#include "plan_quant_ct.h"
#include "pyregex.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t ceil_div(uint64_t a, uint64_t b)
{
    return (a + b - 1) / b;
}

static lm_code q_fail(lm_err *err, const char *tensor, const char *fmt, const char *a, const char *b)
{
    lm_fail(err, LM_E_MISMATCH, "QuantScale", fmt, a, b);
    lm_err_set_tensor(err, tensor);
    return LM_E_MISMATCH;
}

/* block FP8: W F8_E4M3 [out, in] with W_scale_inv F32 [ceil(out/br), ceil(in/bc)], or an expert
 * stack P [E, out, in] with P_scale_inv [E, ceil(out/br), ceil(in/bc)] (transformers' FP8Experts),
 * tiled as [E*out, in]: with out a multiple of br its scale rows are the 2-D grid's */
static lm_code attach_fp8_block(lm_plan *p, const lm_model *model, const lm_qscheme *s, size_t i, lm_qtensor **out,
                                lm_err *err)
{
    const lm_tensor_info *w = lm_model_tensor(model, i)->info;
    char name[1100];
    snprintf(name, sizeof name, "%s_scale_inv", w->name);
    size_t si;
    const lm_model_entry *se = lm_model_find(model, name, &si);
    *out = NULL;
    if (se == NULL) {
        if (s == NULL || s->fmt != LM_Q_FP8_BLOCK)
            return LM_OK; /* an F8 tensor without scales: not a block-quantized weight */
        return q_fail(err, w->name, "quant_method fp8: the F8_E4M3 weight '%s' has no scale tensor "
                      "'%s'", w->name, name);
    }
    const lm_tensor_info *sc = se->info;
    uint64_t br = s && s->fmt == LM_Q_FP8_BLOCK ? s->block_rows : 128;
    uint64_t bc = s && s->fmt == LM_Q_FP8_BLOCK ? s->block_cols : 128;
    const size_t nd = w->n_dims;
    if (nd != 2 && nd != 3)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "block FP8 weight '%s' is %zu-D: 2-D "
                       "weights and 3-D expert stacks are dequantized", w->name, nd);
    const uint64_t E = nd == 3 ? w->shape[0] : 1, O = w->shape[nd - 2], I = w->shape[nd - 1];
    if (nd == 3 && O % br != 0)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "block FP8 expert stack '%s' has %llu rows "
                       "per expert, not a multiple of the block's %llu", w->name, (unsigned long long)O,
                       (unsigned long long)br);
    if (sc->dtype != LM_DT_F32)
        return q_fail(err, sc->name, "scale tensor '%s' is %s: block FP8 scales must be F32", sc->name,
                      lm_dtype_name(sc->dtype));
    uint64_t want_r = ceil_div(O, br), want_c = ceil_div(I, bc), want[3] = {E, want_r, want_c};
    char why[64];
    snprintf(why, sizeof why, "blocks of %llux%llu", (unsigned long long)br, (unsigned long long)bc);
    if (lm_plan_quant_scale_shape(sc, want + 3 - nd, nd, "block FP8", why, err) != LM_OK)
        return err->code;
    lm_qtensor *q = lm_plan_blob(p, sizeof *q);
    if (q == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    q->fmt = LM_Q_FP8_BLOCK;
    q->scale = se;
    q->scale_index = si;
    q->scale_dtype = LM_DT_F32;
    q->br = br;
    q->bc = bc;
    q->srows = E * want_r;
    q->scols = want_c;
    q->tile_rows = br;
    q->row_bytes = I;
    p->t[i].rows = E * O;
    p->t[i].cols = I;
    q->view = *w;
    q->view.dtype = LM_DT_F32;
    *out = q;
    return LM_OK;
}

lm_code lm_plan_quant_scale_shape(const lm_tensor_info *sc, const uint64_t *want, size_t n, const char *fmt,
                                  const char *why, lm_err *err)
{
    int same = sc->n_dims == n;
    for (size_t d = 0; same && d < n; d++)
        same = sc->shape[d] == want[d];
    if (same)
        return LM_OK;
    char a[1300], b[200];
    lm_shape_str(b, sizeof b, sc->n_dims, sc->shape);
    snprintf(a, sizeof a, "%s scale tensor '%s' is %s", fmt, sc->name, b);
    lm_shape_str(b, sizeof b, n, want);
    lm_fail(err, LM_E_MISMATCH, "QuantScale", "%s: expected %s (%s)", a, b, why);
    lm_err_set_tensor(err, sc->name);
    return LM_E_MISMATCH;
}

/* re.match(pattern, s) (fullmatch when full); a pattern outside the regex subset: equality */
static int re_match(const char *pattern, const char *s, int full)
{
    lm_err err;
    lm_err_clear(&err);
    lm_regex *re = lm_regex_compile(pattern, &err);
    if (re == NULL)
        return strcmp(pattern, s) == 0;
    int m = full ? lm_regex_fullmatch(re, s) : lm_regex_match(re, s, NULL, NULL);
    lm_regex_free(re);
    return m == 1;
}

/* fnmatch's pattern as a regex (Python's fnmatch.translate: * ? [seq] [!seq], the rest literal) */
static int glob_match(const char *glob, const char *s)
{
    size_t n = strlen(glob);
    char *re = malloc(4 * n + 1), *o = re;
    if (re == NULL)
        return 0;
    for (size_t i = 0; i < n; i++) {
        const char c = glob[i];
        const char *close = c == '[' ? strchr(glob + i + 1 + (glob[i + 1] == '!') + 1, ']') : NULL;
        if (c == '*') {
            *o++ = '.';
            *o++ = '*';
        } else if (c == '?') {
            *o++ = '.';
        } else if (close != NULL) { /* a class: its characters as they are, [! as [^ */
            *o++ = '[';
            size_t j = i + 1;
            if (glob[j] == '!') {
                *o++ = '^';
                j++;
            }
            for (; glob + j < close; j++) {
                if (glob[j] == '\\' || glob[j] == '[')
                    *o++ = '\\';
                *o++ = glob[j];
            }
            *o++ = ']';
            i = (size_t)(close - glob);
        } else {
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'))
                *o++ = '\\';
            *o++ = c;
        }
    }
    *o = '\0';
    int m = re_match(re, s, 1);
    free(re);
    return m;
}

int lm_plan_quant_skips(const lm_qscheme *s, const char *name)
{
    const char *dot = strrchr(name, '.');
    char module[1100];
    snprintf(module, sizeof module, "%.*s", dot ? (int)(dot - name) : (int)strlen(name), name);
    const size_t nm = strlen(module);
    for (size_t i = 0; s != NULL && i < s->n_skip; i++) {
        const char *k = s->skip[i];
        const size_t nk = strlen(k);
        int hit;
        switch (s->skip_rule[i]) {
        case LM_QSKIP_CT:
            hit = strncmp(k, "re:", 3) == 0 ? re_match(k + 3, module, 0) : strcmp(k, module) == 0;
            break;
        case LM_QSKIP_GLOB:
            hit = glob_match(k, module);
            break;
        case LM_QSKIP_EXACT:
            hit = strcmp(k, module) == 0;
            break;
        default: /* transformers: a pattern matched at the start, or a suffix */
            hit = (nk <= nm && strcmp(module + nm - nk, k) == 0) || re_match(k, module, 0);
            break;
        }
        if (hit)
            return 1;
    }
    return 0;
}

/* an error about model tensor i (a quantized weight, its scales or quant state) names the base
 * file holding it, as every error names its file.  @return err->code */
static lm_code in_file(const lm_model *model, size_t i, lm_err *err)
{
    if (err->path[0] == '\0')
        lm_err_set_path(err, lm_st_path(lm_model_file(model, lm_model_tensor(model, i)->file)));
    return err->code;
}

/* FP8 weights under a quantization_config whose quant_method writes none (gptq, awq, hqq,
 * bitsandbytes, mxfp4 ...): the checkpoint contradicts its config, which a merge kept quantized
 * would copy as it is; refused.  Block FP8 (weight_scale_inv) is transformers' "fp8"; a
 * weight_scale beside an F8_E4M3 weight is written by compressed-tensors, ModelOpt, FBGEMM FP8 and
 * Quark.  Without quant_method the tensors decide. */
static lm_code check_fp8_method(const lm_qscheme *s, const lm_qtensor *q, const lm_model *model, const char *wname,
                                lm_err *err)
{
    static const char *const ct_methods[] = {"compressed-tensors", "modelopt", "fbgemm_fp8", "quark"};
    if (s == NULL || s->method[0] == '\0' || (q->fmt != LM_Q_FP8_BLOCK && q->fmt != LM_Q_CT_FP8))
        return LM_OK;
    int ok = q->fmt == LM_Q_FP8_BLOCK && strcmp(s->method, "fp8") == 0;
    for (size_t k = 0; q->fmt == LM_Q_CT_FP8 && k < sizeof ct_methods / sizeof *ct_methods; k++)
        ok |= strcmp(s->method, ct_methods[k]) == 0;
    if (ok)
        return LM_OK;
    lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "config.json's quantization_config says quant_method "
            "'%s', but the weight is F8_E4M3 with the %s scale '%s' (%s): the checkpoint contradicts its config; "
            "fix config.json or merge into the unquantized original model", s->method,
            q->fmt == LM_Q_FP8_BLOCK ? "block FP8" : "FP8", lm_model_tensor(model, q->scale_index)->info->name,
            q->fmt == LM_Q_FP8_BLOCK ? "quant_method fp8" : "compressed-tensors, ModelOpt, FBGEMM FP8 or Quark");
    lm_err_set_tensor(err, wname);
    return LM_E_UNSUPPORTED;
}

lm_code lm_plan_quant_attach(lm_plan *p, const lm_model *model, const lm_qscheme *s, const lm_plan_opts *o,
                             const lm_tensor_info **views, lm_err *err)
{
    size_t n = lm_model_n_tensors(model);
    for (size_t i = 0; i < n; i++) {
        const lm_tensor_info *w = lm_model_tensor(model, i)->info;
        if (lm_plan_quant_is_mx_blocks(s, w)) {
            if (lm_plan_quant_attach_mx(p, model, o, i, views, err) != LM_OK)
                return in_file(model, i, err);
            continue;
        }
        if (s != NULL && lm_plan_quant_skips(s, w->name))
            continue;
        int bnb = 0; /* bitsandbytes: the tensors decide (plan_quant_bnb.c) */
        if (lm_plan_bnb_attach(p, model, s, o, i, views, &bnb, err) != LM_OK)
            return in_file(model, i, err);
        if (bnb)
            continue;
        lm_qtensor *q;
        if (lm_plan_attach_ct(p, model, s, i, &q, err) != LM_OK)
            return in_file(model, i, err);
        if (q == NULL && w->dtype == LM_DT_F8_E4M3 && attach_fp8_block(p, model, s, i, &q, err) != LM_OK)
            return in_file(model, i, err);
        if (q == NULL)
            continue;
        if (check_fp8_method(s, q, model, w->name, err) != LM_OK)
            return in_file(model, i, err);
        p->t[i].q = q;
        p->t[i].cols = q->view.shape[q->view.n_dims - 1]; /* 2-D, or an expert stack [E, out, in] */
        p->t[i].rows = q->view.n_elems / p->t[i].cols;
        views[i] = &q->view;
        if (o->out_dtype_set) { /* written dequantized: the scales go */
            p->t[i].dtype = o->out_dtype;
            p->t[i].shape = q->view.shape;
            size_t nl = strlen(p->t[i].name);
            if (nl > 7 && strcmp(p->t[i].name + nl - 7, "_packed") == 0)
                p->t[i].name[nl - 7] = '\0'; /* compressed-tensors' weight_packed is a weight again */
            p->t[q->scale_index].drop = 1;
            if (q->scale2 != NULL)
                p->t[q->scale2_index].drop = 1;
            lm_plan_ct_drop_extras(p, model, w->name);
        }
    }
    for (size_t i = 0; i < n; i++) /* quant-state tensors whose weight is not a bitsandbytes weight */
        if (lm_bnb_orphan_state(p, model, s, i, err) != LM_OK)
            return in_file(model, i, err);
    return LM_OK;
}

lm_code lm_plan_quant_finish(lm_plan *p, lm_err *err)
{
    int any_drop = 0;
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        any_drop |= t->drop;
        if (t->q != NULL && !t->drop && t->dtype == t->src_dtype && t->n_ops > 0) {
            p->t[t->q->scale_index].scale_of = i + 1;
            if (t->q->scale2 != NULL)
                p->t[t->q->scale2_index].scale_of = i + 1;
        }
    }
    if (!any_drop)
        return LM_OK;
    size_t *map = malloc(p->n * sizeof *map), m = 0;
    if (map == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; i < p->n; i++) {
        map[i] = p->t[i].drop ? SIZE_MAX : m;
        if (p->t[i].drop) {
            free(p->t[i].name);
            free(p->t[i].ops);
            continue;
        }
        p->t[m++] = p->t[i];
    }
    size_t k = 0;
    for (size_t q = 0; q < p->n; q++)
        if (map[p->data_order[q]] != SIZE_MAX)
            p->data_order[k++] = map[p->data_order[q]];
    for (size_t i = 0; i < m; i++)
        if (p->t[i].scale_of)
            p->t[i].scale_of = map[p->t[i].scale_of - 1] + 1;
    p->n = m;
    free(map);
    return LM_OK;
}
