/* SPDX-License-Identifier: MIT */
/* plan_quant_mx.c : MXFP4 weights in the plan (gpt-oss, quant_method "mxfp4").  The checkpoint
 * holds each expert parameter P as "P_blocks" U8 [E, out, in/32, 16] and "P_scales" U8 [E, out,
 * in/32] (transformers' Mxfp4GptOssExperts); transformers dequantizes them into P [E, in, out]
 * (convert_moe_packed_tensors ends with transpose(1, 2)).  The methods see the blocks as an F32
 * tensor [E, out, in] (rows (e, o): a row is one output channel's groups of 32, contiguous), the
 * executor dequantizes and requantizes its tiles row by row.  With --dtype the weight is written
 * as transformers' dequantized checkpoint has it: named P, [E, in, out], the scales dropped. */
#include "plan.h"

#include "lm_error.h"
#include "quant_mx.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* --dtype: tiles of at least this many rows (output channels), so that each of the `in` writes
 * of a tile (write_transposed() in exec.c) carries this many values (gpt-oss-20b: 512 x 2880 f32
 * tiles, 2880 writes of 1 KB each) */
#define MX_T_ROWS 512

static int ends_with(const char *s, const char *suf)
{
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && strcmp(s + n - k, suf) == 0;
}

static lm_code mx_fail(lm_err *err, const char *tensor, const char *fmt, const char *a, const char *b)
{
    lm_fail(err, LM_E_MISMATCH, "QuantScale", fmt, a, b);
    lm_err_set_tensor(err, tensor);
    return LM_E_MISMATCH;
}

int lm_plan_quant_is_mx_blocks(const lm_qscheme *s, const lm_tensor_info *w)
{
    return s != NULL && s->fmt == LM_Q_MXFP4 && w->dtype == LM_DT_U8 && ends_with(w->name, "_blocks") &&
           !lm_plan_quant_skips(s, w->name);
}

/* the blocks and their scales: [E, O, G, 16] and [E, O, G] */
static lm_code check_mx(const lm_tensor_info *w, const lm_model_entry *se, const char *sname, lm_err *err)
{
    char a[200];
    if (w->n_dims != 4 || w->shape[3] != 16) {
        lm_shape_str(a, sizeof a, w->n_dims, w->shape);
        lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "MXFP4 blocks '%s' are %s: expected [E, out, "
                "in/32, 16] (16 bytes, 32 values, per group)", w->name, a);
        lm_err_set_tensor(err, w->name);
        return LM_E_UNSUPPORTED;
    }
    if (se == NULL)
        return mx_fail(err, w->name, "quant_method mxfp4: the blocks '%s' have no scale tensor '%s'", w->name, sname);
    const lm_tensor_info *sc = se->info;
    if (sc->dtype != LM_DT_U8) {
        snprintf(a, sizeof a, "%s", sc->name);
        return mx_fail(err, sc->name, "scale tensor '%s' is %s: MXFP4 scales are U8 (E8M0)", a,
                       lm_dtype_name(sc->dtype));
    }
    return lm_plan_quant_scale_shape(sc, w->shape, w->n_dims - 1, "MXFP4", "one scale per group of 32", err);
}

lm_code lm_plan_quant_attach_mx(lm_plan *p, const lm_model *model, const lm_plan_opts *o, size_t i,
                                const lm_tensor_info **views, lm_err *err)
{
    const lm_tensor_info *w = lm_model_tensor(model, i)->info;
    char sname[1100];
    size_t nb = strlen(w->name) - 7; /* without "_blocks" */
    snprintf(sname, sizeof sname, "%.*s_scales", (int)nb, w->name);
    size_t si;
    const lm_model_entry *se = lm_model_find(model, sname, &si);
    if (check_mx(w, se, sname, err) != LM_OK)
        return err->code;
    const uint64_t E = w->shape[0], O = w->shape[1], G = w->shape[2];
    lm_qtensor *q = lm_plan_blob(p, sizeof *q);
    uint64_t *vshape = lm_plan_blob(p, 4 * sizeof *vshape);
    if (q == NULL || vshape == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    q->fmt = LM_Q_MXFP4;
    q->scale = se;
    q->scale_index = si;
    q->scale_dtype = LM_DT_U8;
    q->br = 1;
    q->bc = LM_MX_GROUP;
    q->srows = E * O;
    q->scols = G;
    q->tile_rows = 1;
    q->row_bytes = G * (LM_MX_GROUP / 2);
    q->view = *w;
    q->view.dtype = LM_DT_F32;
    q->view.n_dims = 3;
    vshape[0] = E;
    vshape[1] = O;
    vshape[2] = G * LM_MX_GROUP;
    q->view.shape = vshape;
    q->view.n_elems = E * O * G * LM_MX_GROUP;
    lm_plan_tensor *t = &p->t[i];
    t->q = q;
    t->rows = E * O; /* a row is one output channel: its groups are contiguous */
    t->cols = G * LM_MX_GROUP;
    views[i] = &q->view;
    if (!o->out_dtype_set)
        return LM_OK;
    /* dequantized: transformers' name and layout, P [E, in, out]; the scales go */
    char *name = malloc(nb + 1);
    uint64_t *oshape = lm_plan_blob(p, 4 * sizeof *oshape);
    if (name == NULL || oshape == NULL) {
        free(name);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    memcpy(name, w->name, nb);
    name[nb] = '\0';
    free(t->name);
    t->name = name;
    oshape[0] = E;
    oshape[1] = G * LM_MX_GROUP;
    oshape[2] = O;
    t->shape = oshape;
    t->n_dims = 3;
    t->dtype = o->out_dtype;
    q->out_transposed = 1;
    q->tile_rows = MX_T_ROWS;
    p->t[si].drop = 1;
    return LM_OK;
}
