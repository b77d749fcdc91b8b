/* SPDX-License-Identifier: MIT */
/* plan_quant_bnb.c : bitsandbytes weights in the plan (see plan_quant_bnb.h).  What transformers
 * saves (bitsandbytes' Linear4bit._save_to_state_dict / QuantState.as_dict(packed=True), and
 * Linear8bitLt._save_to_state_dict):
 *   4-bit: W U8 [(out*in+1)/2, 1] (or the same bytes in bnb_4bit_quant_storage's dtype),
 *          W.absmax, W.quant_map, [W.nested_absmax, W.nested_quant_map],
 *          W.quant_state.bitsandbytes__nf4|fp4 (U8: json.dumps of quant_type, blocksize, dtype,
 *          shape [, nested_blocksize, nested_dtype, nested_offset])
 *   8-bit: W I8 [out, in], <module>.SCB F32 [out], <module>.weight_format U8 [] (0: "row") */
#include "plan_quant_bnb.h"

#include "lm_error.h"
#include "quant_bnb.h"
#include "st_json.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const STATE_SUFFIX[] = {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"};

static const uint8_t *entry_bytes(const lm_model *model, const lm_model_entry *e)
{
    return lm_st_data(lm_model_file(model, e->file)) + e->info->begin;
}

static const lm_model_entry *sibling(const lm_model *model, const char *name, const char *suffix, size_t *index)
{
    char full[1200];
    if ((size_t)snprintf(full, sizeof full, "%s%s", name, suffix) >= sizeof full)
        return NULL;
    return lm_model_find(model, full, index);
}

static lm_code state_fail(lm_err *err, const char *tensor, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static lm_code state_fail(lm_err *err, const char *tensor, const char *fmt, ...)
{
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lm_fail(err, LM_E_MISMATCH, "QuantScale", "%s", msg);
    lm_err_set_tensor(err, tensor);
    return LM_E_MISMATCH;
}

static lm_dtype dtype_of_torch(const char *s)
{
    return strcmp(s, "bfloat16") == 0 ? LM_DT_BF16 : strcmp(s, "float16") == 0 ? LM_DT_F16
           : strcmp(s, "float32") == 0 ? LM_DT_F32 : LM_DT_BOOL;
}

/* the packed quant_state JSON */
typedef struct {
    char quant_type[8];
    uint64_t blocksize, shape[2], nested_blocksize;
    lm_dtype dtype;
    int nested;
    double offset;
} bnb_state;

static int is_pow2_block(uint64_t b)
{
    return b >= 32 && b <= 4096 && (b & (b - 1)) == 0;
}

/* the members of the quant_state JSON; 0, or -1 with why[] filled */
static int parse_state_members(const st_json_doc *d, const st_json_node *root, bnb_state *st, char *why, size_t cap)
{
    const st_json_node *qt = st_json_get(d, root, "quant_type", 10), *bs = st_json_get(d, root, "blocksize", 9);
    const st_json_node *dt = st_json_get(d, root, "dtype", 5), *sh = st_json_get(d, root, "shape", 5);
    if (qt == NULL || qt->type != ST_JSON_STRING || bs == NULL || dt == NULL || dt->type != ST_JSON_STRING ||
        sh == NULL || sh->type != ST_JSON_ARRAY)
        return snprintf(why, cap, "has no quant_type, blocksize, dtype and shape"), -1;
    snprintf(st->quant_type, sizeof st->quant_type, "%s", st_json_str(d, qt));
    if (st_json_u64(d, bs, &st->blocksize) != ST_JSON_U64_OK || !is_pow2_block(st->blocksize))
        return snprintf(why, cap, "blocksize is not one bitsandbytes uses (32 .. 4096, a power of two)"), -1;
    if ((st->dtype = dtype_of_torch(st_json_str(d, dt))) == LM_DT_BOOL)
        return snprintf(why, cap, "dtype '%.20s' is not float16, bfloat16 or float32", st_json_str(d, dt)), -1;
    size_t k = 0;
    for (const st_json_node *c = st_json_child(d, sh); c != NULL; c = st_json_next(d, c), k++)
        if (k >= 2 || st_json_u64(d, c, &st->shape[k]) != ST_JSON_U64_OK || st->shape[k] == 0 ||
            st->shape[k] > ((uint64_t)1 << 31))
            return snprintf(why, cap, "shape is not [out, in] (a 2-D weight)"), -1;
    if (k != 2)
        return snprintf(why, cap, "shape is not [out, in] (a 2-D weight)"), -1;
    const st_json_node *no = st_json_get(d, root, "nested_offset", 13);
    if ((st->nested = no != NULL)) {
        const st_json_node *nb = st_json_get(d, root, "nested_blocksize", 16), *nd = st_json_get(d, root, "nested_dtype", 12);
        char num[64];
        if (no->type != ST_JSON_NUMBER || no->n >= sizeof num || nb == NULL ||
            st_json_u64(d, nb, &st->nested_blocksize) != ST_JSON_U64_OK || st->nested_blocksize == 0 || nd == NULL ||
            nd->type != ST_JSON_STRING || strcmp(st_json_str(d, nd), "float32") != 0)
            return snprintf(why, cap, "nested_offset needs a number, nested_blocksize and nested_dtype float32"), -1;
        memcpy(num, st_json_num(d, no), no->n);
        num[no->n] = '\0';
        st->offset = strtod(num, NULL);
    }
    return 0;
}

static lm_code parse_state(const lm_model *model, const lm_model_entry *e, const char *suffix_type, bnb_state *st,
                           lm_err *err)
{
    const lm_tensor_info *qi = e->info;
    if (qi->dtype != LM_DT_U8 || qi->n_dims != 1)
        return state_fail(err, qi->name, "quant_state tensor '%s' is %s with %zu dimensions: bitsandbytes packs its "
                          "JSON as U8 [n]", qi->name, lm_dtype_name(qi->dtype), qi->n_dims);
    st_json_doc d;
    memset(&d, 0, sizeof d);
    memset(st, 0, sizeof *st);
    char why[200] = "is not a JSON object";
    int ok = st_json_parse(&d, (const char *)entry_bytes(model, e), (size_t)qi->n_elems) == ST_JSON_OK &&
             st_json_root(&d)->type == ST_JSON_OBJECT &&
             parse_state_members(&d, st_json_root(&d), st, why, sizeof why) == 0;
    st_json_free(&d);
    if (!ok)
        return state_fail(err, qi->name, "quant_state '%s' %s", qi->name, why);
    if (strcmp(st->quant_type, suffix_type) != 0)
        return state_fail(err, qi->name, "quant_state '%s' says quant_type '%s'", qi->name, st->quant_type);
    return LM_OK;
}

/* a quant-state tensor of weight w: present, of dtype dt and n elements */
static lm_code need(const lm_model *model, const char *w, const char *suffix, lm_dtype dt, uint64_t n,
                    const lm_model_entry **out, size_t *index, lm_err *err)
{
    *out = sibling(model, w, suffix, index);
    if (*out == NULL)
        return state_fail(err, w, "bitsandbytes weight '%s' has no '%s%s'", w, w, suffix);
    const lm_tensor_info *t = (*out)->info;
    if (t->dtype != dt || t->n_elems != n)
        return state_fail(err, t->name, "'%s' is %s with %llu elements; the quant_state of '%s' needs %s with %llu",
                          t->name, lm_dtype_name(t->dtype), (unsigned long long)t->n_elems, w, lm_dtype_name(dt),
                          (unsigned long long)n);
    return LM_OK;
}

static void drop(lm_plan *p, const lm_model_entry *e, size_t index)
{
    if (e != NULL)
        p->t[index].drop = 1;
}

static lm_dtype out_dtype(const lm_qscheme *s, const lm_plan_opts *o, lm_dtype fallback)
{
    if (o->out_dtype_set)
        return o->out_dtype;
    if (s != NULL && s->torch_dtype != LM_DT_BOOL)
        return s->torch_dtype;
    return fallback;
}

static lm_code attach4(lm_plan *p, const lm_model *model, const lm_qscheme *s, const lm_plan_opts *o, size_t i,
                       const lm_model_entry *qe, size_t qidx, const char *qt, const lm_tensor_info **views, lm_err *err)
{
    const lm_tensor_info *w = lm_model_tensor(model, i)->info;
    bnb_state st;
    if (parse_state(model, qe, qt, &st, err) != LM_OK)
        return err->code;
    const uint64_t n = st.shape[0] * st.shape[1], nb = (n + st.blocksize - 1) / st.blocksize;
    if (w->end - w->begin != (n + 1) / 2)
        return state_fail(err, w->name, "bitsandbytes weight '%s' holds %llu bytes; its quant_state shape [%llu, %llu] "
                          "packs into %llu", w->name, (unsigned long long)(w->end - w->begin),
                          (unsigned long long)st.shape[0], (unsigned long long)st.shape[1], (unsigned long long)((n + 1) / 2));
    if (st.shape[1] % 2 != 0)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "bitsandbytes weight '%s' has an odd number "
                       "of columns (%llu): its rows do not start on a byte", w->name, (unsigned long long)st.shape[1]);
    lm_bnb_qinfo *bi = lm_plan_blob(p, sizeof *bi);
    lm_qtensor *q = lm_plan_blob(p, sizeof *q);
    if (bi == NULL || q == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    const lm_model_entry *am, *map, *na = NULL, *nm = NULL;
    size_t ai, mi, nai = 0, nmi = 0;
    if (need(model, w->name, ".absmax", st.nested ? LM_DT_U8 : LM_DT_F32, nb, &am, &ai, err) != LM_OK ||
        need(model, w->name, ".quant_map", LM_DT_F32, 16, &map, &mi, err) != LM_OK)
        return err->code;
    bi->code = strcmp(qt, "nf4") == 0 ? LM_BNB_NF4 : LM_BNB_FP4;
    if (memcmp(entry_bytes(model, map), bi->code, 16 * sizeof(float)) != 0)
        return state_fail(err, map->info->name, "'%s' is not bitsandbytes' %s table (bitsandbytes dequantizes with its "
                          "own table, so these codes would not mean what the file says)", map->info->name,
                          strcmp(qt, "nf4") == 0 ? "NF4" : "FP4");
    if (st.nested) {
        if (need(model, w->name, ".nested_absmax", LM_DT_F32, (nb + st.nested_blocksize - 1) / st.nested_blocksize,
                 &na, &nai, err) != LM_OK ||
            need(model, w->name, ".nested_quant_map", LM_DT_F32, 256, &nm, &nmi, err) != LM_OK)
            return err->code;
    } else if (sibling(model, w->name, ".nested_absmax", NULL) || sibling(model, w->name, ".nested_quant_map", NULL)) {
        return state_fail(err, w->name, "'%s' has nested absmax tensors but its quant_state has no nested_offset",
                          w->name);
    }
    *bi = (lm_bnb_qinfo){bi->code, st.blocksize, nb, am, na, nm, st.nested_blocksize, (float)st.offset,
                         {st.shape[0], st.shape[1]}};
    q->fmt = LM_Q_BNB4;
    q->scale = am;
    q->scale_index = ai;
    q->scale_dtype = LM_DT_F32;
    q->br = q->bc = 1;
    q->srows = nb;
    q->scols = 1;
    q->tile_rows = 1;
    q->row_bytes = st.shape[1] / 2;
    q->ext = bi;
    q->view = *w;
    q->view.dtype = LM_DT_F32;
    q->view.n_dims = 2;
    q->view.shape = bi->shape;
    q->view.n_elems = n;
    lm_plan_tensor *t = &p->t[i];
    t->q = q;
    t->dtype = out_dtype(s, o, st.dtype);
    t->n_dims = 2;
    t->shape = bi->shape;
    t->rows = st.shape[0];
    t->cols = st.shape[1];
    views[i] = &q->view;
    drop(p, am, ai);
    drop(p, map, mi);
    drop(p, na, nai);
    drop(p, nm, nmi);
    drop(p, qe, qidx);
    return LM_OK;
}

static lm_code attach8(lm_plan *p, const lm_model *model, const lm_qscheme *s, const lm_plan_opts *o, size_t i,
                       const lm_tensor_info **views, int *found, lm_err *err)
{
    const lm_tensor_info *w = lm_model_tensor(model, i)->info;
    size_t len = strlen(w->name);
    if (w->dtype != LM_DT_I8 || len < 7 || strcmp(w->name + len - 7, ".weight") != 0)
        return LM_OK;
    char mod[1100];
    snprintf(mod, sizeof mod, "%.*s", (int)(len - 7), w->name);
    size_t si, fi = 0;
    const lm_model_entry *scb = sibling(model, mod, ".SCB", &si), *fmt = sibling(model, mod, ".weight_format", &fi);
    if (scb == NULL)
        return LM_OK;
    *found = 1;
    if (w->n_dims != 2)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "bitsandbytes 8-bit weight '%s' is %zu-D: "
                       "only 2-D weights are dequantized", w->name, w->n_dims);
    const lm_tensor_info *sc = scb->info;
    if (sc->dtype != LM_DT_F32 || sc->n_elems != w->shape[0])
        return state_fail(err, sc->name, "'%s' is %s with %llu elements; the 8-bit weight '%s' needs F32 with %llu (one "
                          "per row)", sc->name, lm_dtype_name(sc->dtype), (unsigned long long)sc->n_elems, w->name,
                          (unsigned long long)w->shape[0]);
    if (fmt != NULL && (fmt->info->dtype != LM_DT_U8 || fmt->info->n_elems != 1 || entry_bytes(model, fmt)[0] != 0))
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "'%s' is not the row format (U8 0): bitsandbytes "
                       "reads only row-major 8-bit weights", fmt->info->name);
    lm_qtensor *q = lm_plan_blob(p, sizeof *q);
    if (q == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    q->fmt = LM_Q_BNB8;
    q->scale = scb;
    q->scale_index = si;
    q->scale_dtype = LM_DT_F32;
    q->br = 1;
    q->bc = w->shape[1];
    q->srows = w->shape[0];
    q->scols = 1;
    q->tile_rows = 1;
    q->row_bytes = w->shape[1];
    q->view = *w;
    q->view.dtype = LM_DT_F32;
    p->t[i].q = q;
    p->t[i].dtype = out_dtype(s, o, LM_DT_BF16);
    views[i] = &q->view;
    drop(p, scb, si);
    drop(p, fmt, fi);
    return LM_OK;
}

lm_code lm_plan_bnb_attach(lm_plan *p, const lm_model *model, const lm_qscheme *s, const lm_plan_opts *o, size_t i,
                           const lm_tensor_info **views, int *found, lm_err *err)
{
    const lm_tensor_info *w = lm_model_tensor(model, i)->info;
    size_t qn = 0, qf = 0;
    const lm_model_entry *nf4 = sibling(model, w->name, ".quant_state.bitsandbytes__nf4", &qn);
    const lm_model_entry *fp4 = sibling(model, w->name, ".quant_state.bitsandbytes__fp4", &qf);
    *found = nf4 != NULL || fp4 != NULL;
    if (nf4 != NULL && fp4 != NULL)
        return state_fail(err, w->name, "bitsandbytes weight '%s' has both an nf4 and an fp4 quant_state", w->name);
    if (*found)
        return attach4(p, model, s, o, i, nf4 ? nf4 : fp4, nf4 ? qn : qf, nf4 ? "nf4" : "fp4", views, err);
    return attach8(p, model, s, o, i, views, found, err);
}

lm_code lm_bnb_orphan_state(const lm_plan *p, const lm_model *model, const lm_qscheme *s, size_t i, lm_err *err)
{
    const char *name = lm_model_tensor(model, i)->info->name, *qs = strstr(name, ".quant_state.bitsandbytes__");
    size_t len = strlen(name), wlen = qs ? (size_t)(qs - name) : 0;
    for (size_t k = 0; !wlen && k < sizeof STATE_SUFFIX / sizeof *STATE_SUFFIX; k++) {
        size_t sl = strlen(STATE_SUFFIX[k]);
        if (len > sl && strcmp(name + len - sl, STATE_SUFFIX[k]) == 0)
            wlen = len - sl;
    }
    if (wlen == 0 || wlen >= 1100)
        return LM_OK;
    char w[1100];
    snprintf(w, sizeof w, "%.*s", (int)wlen, name);
    size_t wi;
    if (lm_model_find(model, w, &wi) == NULL)
        return state_fail(err, name, "'%s' is a bitsandbytes quant-state tensor but its weight '%s' is missing", name, w);
    if (p->t[wi].q != NULL && (p->t[wi].q->fmt == LM_Q_BNB4 || p->t[wi].q->fmt == LM_Q_BNB8))
        return LM_OK;
    if (s != NULL && lm_plan_quant_skips(s, w))
        return state_fail(err, name, "'%s' is a bitsandbytes quant-state tensor but config.json's "
                          "quantization_config lists the module of its weight '%s' as left unquantized "
                          "(llm_int8_skip_modules): the checkpoint contradicts its config", name, w);
    return state_fail(err, name, "'%s' is a bitsandbytes quant-state tensor but its weight '%s' has no "
                      "'%s.quant_state.bitsandbytes__nf4' (or __fp4): the 4-bit codes cannot be read", name, w, w);
}

void lm_bnb_summarize(const lm_model *model, lm_bnb_summary *out)
{
    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < lm_model_n_tensors(model); i++) {
        const lm_model_entry *e = lm_model_tensor(model, i);
        const char *name = e->info->name, *qs = strstr(name, ".quant_state.bitsandbytes__");
        size_t len = strlen(name);
        if (qs == NULL) {
            out->n_int8 += len > 4 && strcmp(name + len - 4, ".SCB") == 0;
            continue;
        }
        int nf4 = strcmp(qs + 27, "nf4") == 0;
        out->n_nf4 += nf4;
        out->n_fp4 += !nf4;
        char w[1100];
        snprintf(w, sizeof w, "%.*s", (int)(qs - name), name);
        out->n_nested += sibling(model, w, ".nested_absmax", NULL) != NULL;
        bnb_state st;
        lm_err err;
        lm_err_clear(&err);
        if (out->blocksize == 0 && parse_state(model, e, nf4 ? "nf4" : "fp4", &st, &err) == LM_OK) {
            out->blocksize = st.blocksize;
            out->dtype = st.dtype;
        }
    }
}
