/* plan.c : the planner (see plan.h).  Adapter keys -> modules -> base tensors -> operations. */
#include "plan.h"

#include "compat.h"
#include "lm_error.h"
#include "peft_match.h"
#include "pyregex.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                                */
/* ------------------------------------------------------------------------------------------ */
static int is_float_dtype(lm_dtype dt)
{
    return dt == LM_DT_F16 || dt == LM_DT_BF16 || dt == LM_DT_F32 || dt == LM_DT_F64;
}

static int is_numeric_comp(const char *s, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i]))
            return 0;
    return 1;
}

static void shape_str(char *buf, size_t cap, size_t n_dims, const uint64_t *shape)
{
    size_t used = 0;
    used += (size_t)snprintf(buf + used, cap - used, "[");
    for (size_t d = 0; d < n_dims && used < cap; d++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%llu", d ? ", " : "", (unsigned long long)shape[d]);
    if (used < cap)
        snprintf(buf + used, cap - used, "]");
}

lm_code plan_note(lm_plan *p, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char **n = realloc(p->notes, (p->n_notes + 1) * sizeof *n);
    if (n == NULL)
        return LM_E_NOMEM;
    p->notes = n;
    if ((p->notes[p->n_notes] = strdup(buf)) == NULL)
        return LM_E_NOMEM;
    p->n_notes++;
    return LM_OK;
}

static const char *plan_str(lm_plan *p, const char *s)
{
    if (lm_grow((void **)&p->modules, &p->cap_modules, p->n_modules, sizeof *p->modules, 64) != 0)
        return NULL;
    char *c = strdup(s);
    if (c != NULL)
        p->modules[p->n_modules++] = c;
    return c;
}

void lm_plan_free(lm_plan *p)
{
    if (p == NULL)
        return;
    for (size_t i = 0; i < p->n; i++) {
        free(p->t[i].name);
        free(p->t[i].ops);
    }
    free(p->t);
    free(p->data_order);
    free(p->meta_keys);
    free(p->meta_values);
    for (size_t i = 0; i < p->n_notes; i++)
        free(p->notes[i]);
    free(p->notes);
    for (size_t i = 0; i < p->n_modules; i++)
        free(p->modules[i]);
    free(p->modules);
    for (size_t i = 0; i < p->n_blobs; i++)
        free(p->blobs[i]);
    free(p->blobs);
    free(p);
}

static lm_op *add_op(lm_plan_tensor *t, lm_err *err)
{
    if (lm_grow((void **)&t->ops, &t->cap_ops, t->n_ops, sizeof *t->ops, 4) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    lm_op *op = &t->ops[t->n_ops++];
    memset(op, 0, sizeof *op);
    return op;
}

/* appends an op of `kind` from adapter ai on `module`, reading `a` */
static lm_op *new_op(lm_plan_tensor *t, lm_op_kind kind, size_t ai, const char *module, const lm_ts_tensor *a,
                     lm_err *err)
{
    lm_op *op = add_op(t, err);
    if (op != NULL) {
        op->kind = kind;
        op->adapter = ai;
        op->module = module;
        op->a = a;
    }
    return op;
}

/* ------------------------------------------------------------------------------------------ */
/* name resolution: adapter module path -> base tensor                                          */
/* ------------------------------------------------------------------------------------------ */
/* does base name T end with "." + s, the part before having no numeric component? */
static int suffix_match(const char *T, const char *s)
{
    size_t nt = strlen(T), ns = strlen(s);
    if (nt <= ns + 1 || T[nt - ns - 1] != '.' || memcmp(T + nt - ns, s, ns) != 0)
        return 0;
    size_t plen = nt - ns - 1, start = 0;
    for (size_t i = 0; i <= plen; i++) {
        if (i == plen || T[i] == '.') {
            if (is_numeric_comp(T + start, i - start))
                return 0;
            start = i + 1;
        }
    }
    return 1;
}

long lm_resolve_base_name(const lm_model *model, const char *name, lm_err *err)
{
    size_t idx;
    if (lm_model_find(model, name, &idx) != NULL)
        return (long)idx;
    /* candidate spellings: the name with leading non-numeric components dropped */
    const char *cands[64];
    size_t n_cands = 0;
    cands[n_cands++] = name;
    for (const char *p = name; n_cands < 64;) {
        const char *dot = strchr(p, '.');
        if (dot == NULL || is_numeric_comp(p, (size_t)(dot - p)) || strchr(dot + 1, '.') == NULL)
            break;
        p = dot + 1;
        cands[n_cands++] = p;
    }
    long found = -1;
    const char *found_name = NULL;
    for (size_t c = 1; c < n_cands; c++) {
        if (lm_model_find(model, cands[c], &idx) != NULL) {
            if (found >= 0 && (size_t)found != idx) {
                lm_fail(err, LM_E_MISMATCH, "AmbiguousModule", "matches several base tensors ('%s' and '%s')",
                        found_name, cands[c]);
                return -2;
            }
            found = (long)idx;
            found_name = cands[c];
        }
    }
    if (found >= 0)
        return found;
    /* the base may carry leading components the adapter lacks (e.g. "model.") */
    size_t n = lm_model_n_tensors(model);
    for (size_t c = 0; c < n_cands; c++) {
        for (size_t i = 0; i < n; i++) {
            const char *T = lm_model_tensor(model, i)->info->name;
            if (suffix_match(T, cands[c])) {
                if (found >= 0 && (size_t)found != i) {
                    lm_fail(err, LM_E_MISMATCH, "AmbiguousModule", "matches several base tensors ('%s' and '%s')",
                            found_name, T);
                    return -2;
                }
                found = (long)i;
                found_name = T;
            }
        }
        if (found >= 0)
            return found;
    }
    lm_fail(err, LM_E_MISMATCH, "NoMatchingTensor", "no base tensor '%s' (nor under another prefix)", name);
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* adapter keys -> modules                                                                      */
/* ------------------------------------------------------------------------------------------ */
typedef enum {
    R_A, R_B, R_BBIAS, R_EA, R_EB, R_MAG, R_TT, R_E, R_IA3,
    R_H1A, R_H1B, R_H2A, R_H2B, R_HT, /* LoHa */
    R_K1, R_K1A, R_K1B, R_K2, R_K2A, R_K2B, R_KT, /* LoKr */
    R_BEFT, R_HA, R_HB, R_HEA, R_HEB, R_VLB, R_VLD, R_SW, R_SI, R_HRA, R_MISS,
    R_DA, R_DB, R_DL, R_DN, R_GA, R_GB, R_GAG, R_GBG, R_VZA, R_VZB, R_VIA, R_VWA, R_VIB, R_VWB,
    R_RL, R_RG, R_RA, R_RB, R_OFT, R_FS, R_RT, R_RAL, R_C3, R_BR, R_BS,
    R_FULL, R_SKIP
} key_role;

/* LoHa / LoKr parameter names (no ".weight"), each maybe followed by the adapter name */
static const struct {
    const char *name;
    key_role role;
} LYCORIS_PARTS[] = {
    {"hada_w1_a", R_H1A}, {"hada_w1_b", R_H1B}, {"hada_w2_a", R_H2A}, {"hada_w2_b", R_H2B},
    {"hada_t1", R_HT},    {"hada_t2", R_HT},    {"lokr_w1", R_K1},    {"lokr_w1_a", R_K1A},
    {"lokr_w1_b", R_K1B}, {"lokr_w2", R_K2},    {"lokr_w2_a", R_K2A}, {"lokr_w2_b", R_K2B},
    {"lokr_t2", R_KT},
    /* other single-tensor parameters, handled the same way */
    {"trainable_tokens_delta", R_TT}, {"beft_bias", R_BEFT}, {"hira_A", R_HA}, {"hira_B", R_HB},
    {"hira_embedding_A", R_HEA}, {"hira_embedding_B", R_HEB}, {"vera_lambda_b", R_VLB}, {"vera_lambda_d", R_VLD},
    {"shira_weight", R_SW}, {"shira_indices", R_SI}, {"hra_u", R_HRA}, {"miss_block", R_MISS},
    {"delora_A", R_DA}, {"delora_B", R_DB}, {"delora_lambda", R_DL}, {"delora_w_norm", R_DN},
    {"gralora_A", R_GA}, {"gralora_B", R_GB}, {"gralora_A_general", R_GAG}, {"gralora_B_general", R_GBG},
    {"vblora_logits_A", R_VZA}, {"vblora_logits_B", R_VZB}, {"vblora_logits_A_topk_indices", R_VIA},
    {"vblora_logits_A_topk_weights", R_VWA}, {"vblora_logits_B_topk_indices", R_VIB},
    {"vblora_logits_B_topk_weights", R_VWB}, {"randlora_lambda", R_RL}, {"randlora_gamma", R_RG},
    {"randlora_A", R_RA}, {"randlora_B", R_RB}, {"oft_R", R_OFT}, {"oft_embedding_R", R_OFT},
    {"fourierft_spectrum", R_FS}, {"road_theta", R_RT}, {"road_alpha", R_RAL}, {"c3a_kernel", R_C3},
    {"boft_R", R_BR}, {"boft_s", R_BS},
};

typedef struct {
    char *module; /* path of the module inside the model ("model.layers.0.self_attn.q_proj") */
    const lm_ts_tensor *a, *b, *bbias, *ea, *eb, *mag, *tt, *e, *ia3;
    const lm_ts_tensor *h1a, *h1b, *h2a, *h2b, *ht, *k1, *k1a, *k1b, *k2, *k2a, *k2b, *kt;
    const lm_ts_tensor *beft, *ha, *hb, *hea, *heb, *vlb, *vld, *sw, *si, *hra, *miss;
    const lm_ts_tensor *da, *db, *dl, *dn, *ga, *gb, *gag, *gbg, *vza, *vzb, *via, *vwa, *vib, *vwb;
    const lm_ts_tensor *rl, *rg, *ra, *rb, *oft, *fs, *rt, *ral, *c3, *br, *bsv;
} lora_module;

typedef struct {
    lora_module *v;
    size_t n, cap;
} module_list;

static void module_list_free(module_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i].module);
    free(l->v);
}

static const lm_ts_tensor **module_slot(lora_module *m, key_role role)
{
    switch (role) {
    case R_A: return &m->a;
    case R_B: return &m->b;
    case R_BBIAS: return &m->bbias;
    case R_EA: return &m->ea;
    case R_EB: return &m->eb;
    case R_MAG: return &m->mag;
    case R_E: return &m->e;
    case R_IA3: return &m->ia3;
    case R_H1A: return &m->h1a;
    case R_H1B: return &m->h1b;
    case R_H2A: return &m->h2a;
    case R_H2B: return &m->h2b;
    case R_HT: return &m->ht;
    case R_K1: return &m->k1;
    case R_K1A: return &m->k1a;
    case R_K1B: return &m->k1b;
    case R_K2: return &m->k2;
    case R_K2A: return &m->k2a;
    case R_K2B: return &m->k2b;
    case R_KT: return &m->kt;
    case R_BEFT: return &m->beft;
    case R_HA: return &m->ha;
    case R_HB: return &m->hb;
    case R_HEA: return &m->hea;
    case R_HEB: return &m->heb;
    case R_VLB: return &m->vlb;
    case R_VLD: return &m->vld;
    case R_SW: return &m->sw;
    case R_SI: return &m->si;
    case R_HRA: return &m->hra;
    case R_MISS: return &m->miss;
    case R_DA: return &m->da;
    case R_DB: return &m->db;
    case R_DL: return &m->dl;
    case R_DN: return &m->dn;
    case R_GA: return &m->ga;
    case R_GB: return &m->gb;
    case R_GAG: return &m->gag;
    case R_GBG: return &m->gbg;
    case R_VZA: return &m->vza;
    case R_VZB: return &m->vzb;
    case R_VIA: return &m->via;
    case R_VWA: return &m->vwa;
    case R_VIB: return &m->vib;
    case R_VWB: return &m->vwb;
    case R_RL: return &m->rl;
    case R_RG: return &m->rg;
    case R_RA: return &m->ra;
    case R_RB: return &m->rb;
    case R_OFT: return &m->oft;
    case R_FS: return &m->fs;
    case R_RT: return &m->rt;
    case R_RAL: return &m->ral;
    case R_C3: return &m->c3;
    case R_BR: return &m->br;
    case R_BS: return &m->bsv;
    default: return &m->tt;
    }
}

static lora_module *module_get(module_list *l, const char *module, lm_err *err)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->v[i].module, module) == 0)
            return &l->v[i];
    if (lm_grow((void **)&l->v, &l->cap, l->n, sizeof *l->v, 64) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    lora_module *m = &l->v[l->n];
    memset(m, 0, sizeof *m);
    if ((m->module = strdup(module)) == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    l->n++;
    return m;
}

/* Splits an adapter key (prefix "base_model.model." already removed) into a role and the
 * module path (or, for R_FULL, the tensor name), dropping ".base_layer" components. */
static key_role classify_key(const char *rest, char *out, size_t cap)
{
    const char *comps[128];
    size_t lens[128], n = 0;
    for (const char *p = rest; n < 128;) {
        const char *dot = strchr(p, '.');
        comps[n] = p;
        lens[n] = dot ? (size_t)(dot - p) : strlen(p);
        n++;
        if (dot == NULL)
            break;
        p = dot + 1;
    }
#define IS(i, lit) (lens[i] == sizeof(lit) - 1 && memcmp(comps[i], lit, sizeof(lit) - 1) == 0)
    long j = -1;
    key_role lyco = R_SKIP;
    for (long i = (long)n - 1; i >= 0 && j < 0; i--) {
        for (size_t q = 0; q < sizeof LYCORIS_PARTS / sizeof *LYCORIS_PARTS && j < 0; q++)
            if (lens[i] == strlen(LYCORIS_PARTS[q].name) && memcmp(comps[i], LYCORIS_PARTS[q].name, lens[i]) == 0) {
                j = i;
                lyco = LYCORIS_PARTS[q].role;
            }
        if (j >= 0)
            break;
        if (IS(i, "lora_A") || IS(i, "lora_B") || IS(i, "lora_embedding_A") || IS(i, "lora_embedding_B") ||
            IS(i, "lora_E") || IS(i, "ia3_l") ||
            IS(i, "lora_magnitude_vector"))
            j = i;
    }
    size_t end = j >= 0 ? (size_t)j : n;
    for (size_t i = 0; i < end; i++)
        if (IS(i, "modules_to_save") || IS(i, "original_module"))
            return R_SKIP;
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < end; i++) {
        if (IS(i, "base_layer") || IS(i, "token_adapter") || IS(i, "ln_tuning_layers"))
            continue;
        int k = snprintf(out + used, cap - used, "%s%.*s", used ? "." : "", (int)lens[i], comps[i]);
        if (k < 0 || (size_t)k >= cap - used)
            return R_SKIP;
        used += (size_t)k;
    }
    if (j < 0)
        return R_FULL;
    size_t tail = n - (size_t)j - 1; /* components after the role */
    const char *last = comps[n - 1];
    size_t last_len = lens[n - 1];
    int last_weight = last_len == 6 && memcmp(last, "weight", 6) == 0;
    int last_bias = last_len == 4 && memcmp(last, "bias", 4) == 0;
    size_t ju = (size_t)j;
    if (lyco != R_SKIP)
        return tail <= 1 ? lyco : R_SKIP;
    if (IS(ju, "lora_A") || IS(ju, "lora_B")) {
        key_role ab = IS(ju, "lora_A") ? R_A : R_B;
        if ((tail == 1 || tail == 2) && last_weight)
            return ab;
        if ((tail == 1 || tail == 2) && last_bias && IS(ju, "lora_B"))
            return R_BBIAS;
        /* AdaLoRA keeps parameters without ".weight": "lora_A" or "lora_A.<adapter name>" */
        return tail <= 1 ? ab : R_SKIP;
    }
    if (IS(ju, "lora_E"))
        return tail <= 1 ? R_E : R_SKIP;
    if (IS(ju, "ia3_l"))
        return tail <= 1 ? R_IA3 : R_SKIP;
    if (IS(ju, "lora_embedding_A") || IS(ju, "lora_embedding_B"))
        return tail <= 1 ? (IS(ju, "lora_embedding_A") ? R_EA : R_EB) : R_SKIP;
    if (IS(ju, "lora_magnitude_vector"))
        return tail <= 2 ? R_MAG : R_SKIP;
#undef IS
    return R_SKIP;
}

/* ------------------------------------------------------------------------------------------ */
/* planning one adapter                                                                         */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    const lm_model *model;
    lm_plan *plan;
    lm_adapter *const *adapters;
    size_t n_adapters;
    const lm_plan_opts *opts;
    lm_dtype new_dtype; /* dtype of tensors the adapters add */
} planner;

static lm_code mismatch(lm_err *err, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static lm_code mismatch(lm_err *err, const char *module, const char *fmt, ...)
{
    char buf[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "%s", buf);
    lm_err_set_tensor(err, module);
    return LM_E_MISMATCH;
}

static int leaf_is(const char *module, const char *leaf)
{
    const char *dot = strrchr(module, '.');
    return strcmp(dot ? dot + 1 : module, leaf) == 0;
}

/* GPT-2's Conv1D layers (stored [in, out]) by name: what decides a square layer's orientation */
static int is_gpt2_conv1d(const char *module)
{
    return leaf_is(module, "c_attn") || leaf_is(module, "c_proj") || leaf_is(module, "c_fc");
}

static const char *leaf_of(const char *module)
{
    const char *dot = strrchr(module, '.');
    return dot ? dot + 1 : module;
}

/* the input embedding of the base (for tied heads), or -1 when there is none or several */
static long find_input_embedding(const lm_model *model)
{
    static const char *const names[] = {"embed_tokens.weight", "wte.weight", "shared.weight",
                                        "word_embeddings.weight", "embed_in.weight"};
    long found = -1;
    for (size_t i = 0; i < lm_model_n_tensors(model); i++) {
        const char *n = lm_model_tensor(model, i)->info->name;
        for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
            size_t ln = strlen(n), lk = strlen(names[k]);
            if (ln >= lk && strcmp(n + ln - lk, names[k]) == 0 && (ln == lk || n[ln - lk - 1] == '.')) {
                if (found >= 0)
                    return -1;
                found = (long)i;
            }
        }
    }
    return found;
}

/* find or create the output tensor for a base entry index */
static lm_plan_tensor *tensor_for(planner *P, long base_idx) { return &P->plan->t[base_idx]; }

static lm_code plan_replace(planner *P, size_t ai, const lm_ts_tensor *src, const char *name, lm_err *err)
{
    lm_plan *p = P->plan;
    lm_err local;
    lm_err_clear(&local);
    long bi = lm_resolve_base_name(P->model, name, &local);
    if (bi == -2) {
        if (err != NULL)
            *err = local;
        lm_err_set_tensor(err, src->name);
        return LM_E_MISMATCH;
    }
    if (!is_float_dtype(src->dtype))
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "adapter tensor '%s' has dtype %s (expected a float type)",
                       src->name, lm_dtype_name(src->dtype));
    if (bi < 0) { /* a tensor the base does not have: added to the output */
        lm_plan_tensor *nt = realloc(p->t, (p->n + 1) * sizeof *nt);
        if (nt == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        p->t = nt;
        lm_plan_tensor *t = &p->t[p->n];
        memset(t, 0, sizeof *t);
        if ((t->name = strdup(name)) == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        p->n++;
        t->dtype = P->opts->out_dtype_set ? P->opts->out_dtype : P->new_dtype;
        t->src_dtype = src->dtype;
        t->n_dims = src->n_dims;
        t->shape = src->shape;
        t->rows = src->n_dims ? src->shape[0] : 1;
        t->cols = t->rows ? src->n_elems / t->rows : 0;
        lm_op *op = add_op(t, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->kind = LM_OP_REPLACE;
        op->adapter = ai;
        op->a = src;
        op->module = plan_str(p, name);
        p->n_new++;
        return plan_note(p, "added tensor %s %s from the adapter (no such tensor in the base)", name,
                         lm_dtype_name(t->dtype));
    }
    lm_plan_tensor *t = tensor_for(P, bi);
    const lm_tensor_info *bt = t->base->info;
    int same = bt->n_dims == src->n_dims;
    for (size_t d = 0; same && d < bt->n_dims; d++)
        same = bt->shape[d] == src->shape[d];
    if (!same) {
        char s1[96], s2[96];
        shape_str(s1, sizeof s1, src->n_dims, src->shape);
        shape_str(s2, sizeof s2, bt->n_dims, bt->shape);
        return mismatch(err, src->name, "replacement tensor has shape %s but base tensor '%s' has %s "
                        "(a resized vocabulary or head is not supported)", s1, bt->name, s2);
    }
    if (!is_float_dtype(bt->dtype))
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "base tensor '%s' is %s: only float tensors can be replaced",
                       bt->name, lm_dtype_name(bt->dtype));
    for (size_t k = 0; k < t->n_ops; k++)
        if (t->ops[k].kind == LM_OP_REPLACE)
            return lm_fail(err, LM_E_MISMATCH, "Conflict", "two adapters replace base tensor '%s'", bt->name);
    lm_op *op = add_op(t, err);
    if (op == NULL)
        return LM_E_NOMEM;
    /* the replacement comes first: later deltas apply to the replaced values */
    memmove(&t->ops[1], &t->ops[0], (t->n_ops - 1) * sizeof *op);
    op = &t->ops[0];
    memset(op, 0, sizeof *op);
    op->kind = LM_OP_REPLACE;
    op->adapter = ai;
    op->a = src;
    op->module = plan_str(P->plan, name);
    t->src_dtype = src->dtype;
    P->plan->n_replaced++;
    return LM_OK;
}

/* orientation of a 2-D low-rank module: 0 Linear ([out, in]), 1 Conv1D ([in, out]), -1 undecided */
static int orientation_of(const lm_tensor_info *w, uint64_t out, uint64_t in)
{
    if (w->n_dims != 2)
        return -2;
    if (w->shape[0] == out && w->shape[1] == in)
        return out == in ? -1 : 0;
    if (w->shape[0] == in && w->shape[1] == out)
        return 1;
    return -2;
}

typedef struct {
    lora_module *m;
    long base;    /* base entry of the weight */
    int orient;   /* 0, 1, -1 undecided */
    long rank;
    double alpha;
} lowrank_info;

/* The config's targeting fields as lm_target_rules.  "all-linear", or no target_modules at all
 * (PEFT writes its per-architecture defaults into saved configs, so only hand-written ones lack
 * it), take every module present in the file, still subject to exclusions and layer filters. */
static void rules_from_config(const lm_adapter_config *cfg, lm_target_rules *rules)
{
    memset(rules, 0, sizeof *rules);
    rules->has_target = 1;
    rules->all_linear = cfg->all_linear || !cfg->has_target;
    rules->target_is_regex = cfg->target_is_regex;
    rules->target_regex = cfg->target_regex;
    rules->target_list = (const char *const *)cfg->target_list.v;
    rules->n_target = cfg->target_list.n;
    rules->exclude_is_regex = cfg->exclude_is_regex;
    rules->exclude_regex = cfg->exclude_regex;
    rules->exclude_list = (const char *const *)cfg->exclude_list.v;
    rules->n_exclude = cfg->exclude_list.n;
    rules->modules_to_save = (const char *const *)cfg->modules_to_save.v;
    rules->n_modules_to_save = cfg->modules_to_save.n;
    rules->layers_to_transform = cfg->layers_to_transform;
    rules->n_layers = cfg->n_layers;
    rules->layers_pattern = (const char *const *)cfg->layers_pattern.v;
    rules->n_layers_pattern = cfg->layers_pattern.n;
}

/* the config's decision on a module (peft-merge.md §3.4): 1 targeted, 0 not (a note says it is
 * skipped, as PEFT does), -1 error */
static int module_targeted(planner *P, const lm_adapter *ad, const lm_target_matcher *tm, const char *module,
                           lm_err *err)
{
    int targeted = lm_target_matcher_test(tm, module, err);
    if (targeted < 0)
        return -1;
    if (!targeted && plan_note(P->plan, "%s: module %s is in the file but not targeted by adapter_config.json; "
                                        "skipped, as PEFT does", ad->dir, module) != LM_OK)
        return -1;
    return targeted;
}

/* the base bias "<module>.bias": entry index, or -1 when the layer has none */
static long module_bias(planner *P, const char *module)
{
    char buf[1100];
    snprintf(buf, sizeof buf, "%s.bias", module);
    return lm_resolve_base_name(P->model, buf, NULL);
}

/* the base weight "<module>.weight" (under any prefix, §4.2): entry index, or -1 with *err */
static long module_weight(planner *P, const char *module, lm_err *err)
{
    char buf[1100];
    snprintf(buf, sizeof buf, "%s.weight", module);
    lm_err local;
    lm_err_clear(&local);
    long bi = lm_resolve_base_name(P->model, buf, &local);
    if (bi < 0) {
        if (err != NULL) /* err may be NULL: the library's callers need not ask for details */
            *err = local;
        lm_err_set_tensor(err, module);
        return -1;
    }
    return bi;
}

/* IA3 (peft-merge.md §5.3): W *= l per output feature, or per input feature for the config's
 * feed-forward modules; the bias of a non-feed-forward layer is scaled too. */
static lm_code plan_ia3(planner *P, size_t ai, const lora_module *m, const lm_target_matcher *tm, lm_err *err)
{
    const lm_adapter *ad = P->adapters[ai];
    const lm_adapter_config *cfg = ad->cfg;
    const lm_ts_tensor *l = m->ia3;
    int targeted = module_targeted(P, ad, tm, m->module, err);
    if (targeted <= 0)
        return targeted < 0 ? (err ? err->code : LM_E_FORMAT) : LM_OK;
    /* feed-forward: a list entry the module path ends with (no dot boundary), or a regex */
    int ff = 0;
    if (cfg->ff_is_regex) {
        lm_regex *re = lm_regex_compile(cfg->ff_regex, err);
        if (re == NULL) {
            lm_err_set_path(err, ad->config_path);
            return err ? err->code : LM_E_FORMAT;
        }
        ff = lm_regex_fullmatch(re, m->module) == 1;
        lm_regex_free(re);
    } else {
        for (size_t q = 0; q < cfg->ff_list.n; q++) {
            size_t nm = strlen(m->module), ne = strlen(cfg->ff_list.v[q]);
            ff |= nm >= ne && strcmp(m->module + nm - ne, cfg->ff_list.v[q]) == 0;
        }
    }
    long bi = module_weight(P, m->module, err);
    if (bi < 0)
        return err ? err->code : LM_E_MISMATCH;
    lm_plan_tensor *t = tensor_for(P, bi);
    const lm_tensor_info *W = t->base->info;
    uint64_t n = l->n_elems;
    int shape_ff = l->n_dims == 2 && l->shape[0] == 1 && l->shape[1] == n && n > 1;
    if (W->n_dims != 2)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "IA3 on a %zu-D weight ('%s') is not supported yet",
                       W->n_dims, W->name);
    if (l->n_dims == 2 && n > 1 && shape_ff != ff)
        return mismatch(err, m->module, "ia3_l is [%llu, %llu] but feedforward_modules says this module is %s",
                        (unsigned long long)l->shape[0], (unsigned long long)l->shape[1],
                        ff ? "feed-forward" : "not feed-forward");
    /* the scaled dimension: output features (non-FF) or input features (FF); a Conv1D weight is
     * stored [in, out], so the axes swap */
    int axis;
    uint64_t d0 = W->shape[0], d1 = W->shape[1];
    int gpt2 = is_gpt2_conv1d(m->module);
    int first = ff ? 1 : 0; /* the axis in Linear storage [out, in] */
    if (d0 == d1 && d0 == n)
        axis = gpt2 ? 1 - first : first;
    else if ((first == 0 ? d0 : d1) == n)
        axis = first;
    else if ((first == 0 ? d1 : d0) == n)
        axis = 1 - first;
    else
        return mismatch(err, m->module, "ia3_l has %llu elements but base '%s' is [%llu, %llu]",
                        (unsigned long long)n, W->name, (unsigned long long)d0, (unsigned long long)d1);
    const char *module = plan_str(P->plan, m->module);
    lm_op *op = new_op(t, LM_OP_SCALE, ai, module, l, err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->dora_axis = axis;
    if (!ff) {
        long bb = module_bias(P, m->module);
        if (bb >= 0) {
            lm_plan_tensor *bt = tensor_for(P, bb);
            if (bt->base->info->n_elems != n)
                return mismatch(err, m->module, "ia3_l has %llu elements but the bias has %llu", (unsigned long long)n,
                                (unsigned long long)bt->base->info->n_elems);
            lm_op *bo = new_op(bt, LM_OP_SCALE, ai, module, l, err);
            if (bo == NULL)
                return LM_E_NOMEM;
            bo->dora_axis = bt->cols == 1 ? 0 : 1; /* a bias [o] is viewed [o, 1] */
        }
    }
    P->plan->n_lowrank++;
    return LM_OK;
}

static int is_lycoris(const lora_module *m)
{
    return m->h1a || m->h1b || m->h2a || m->h2b || m->ht || m->k1 || m->k1a || m->k1b || m->k2 || m->k2a || m->k2b ||
           m->kt;
}

/* LoHa (§5.4) and LoKr (§5.5) on Linear weights: W += (w1a@w1b)*(w2a@w2b)*alpha/r, or
 * W += kron(w1, w2)*alpha/r with r always from the config (PEFT does so even for full factors) */
static lm_code plan_lycoris(planner *P, size_t ai, const lora_module *m, const lm_target_matcher *tm, lm_err *err)
{
    const lm_adapter *ad = P->adapters[ai];
    const lm_adapter_config *cfg = ad->cfg;
    int loha = m->h1a || m->h1b || m->h2a || m->h2b || m->ht;
    if (loha != (cfg->kind == LM_PEFT_LOHA) || (!loha && cfg->kind != LM_PEFT_LOKR)) {
        lm_fail(err, LM_E_FORMAT, "IncompleteModule", "%s tensors in a %s adapter", loha ? "LoHa" : "LoKr", cfg->peft_type);
        lm_err_set_tensor(err, m->module);
        return LM_E_FORMAT;
    }
    int targeted = module_targeted(P, ad, tm, m->module, err);
    if (targeted <= 0)
        return targeted < 0 ? (err ? err->code : LM_E_FORMAT) : LM_OK;
    if (m->ht || m->kt) {
        lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "%s with a CP-decomposed convolution (use_effective_conv2d) "
                "is not supported by lora-merge yet", cfg->peft_type);
        lm_err_set_tensor(err, m->module);
        return LM_E_UNSUPPORTED;
    }
    const lm_ts_tensor *parts[4];
    size_t n_parts;
    if (loha) {
        const lm_ts_tensor *p4[4] = {m->h1a, m->h1b, m->h2a, m->h2b};
        memcpy(parts, p4, sizeof p4);
        n_parts = 4;
    } else {
        const lm_ts_tensor *w1 = m->k1 ? m->k1 : m->k1a, *w2 = m->k2 ? m->k2 : m->k2a;
        const lm_ts_tensor *p4[4] = {w1, m->k1 ? m->k1 : m->k1b, w2, m->k2 ? m->k2 : m->k2b};
        memcpy(parts, p4, sizeof p4);
        n_parts = 4;
        if ((m->k1 && (m->k1a || m->k1b)) || (m->k2 && (m->k2a || m->k2b)))
            return mismatch(err, m->module, "LoKr factor given both whole and decomposed");
    }
    for (size_t q = 0; q < n_parts; q++) {
        if (parts[q] == NULL) {
            lm_fail(err, LM_E_FORMAT, "IncompleteModule", "%s module lacks a factor (%s)", cfg->peft_type,
                    loha ? "hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b are needed"
                         : "lokr_w1 or lokr_w1_a + lokr_w1_b, and lokr_w2 or lokr_w2_a + lokr_w2_b are needed");
            lm_err_set_tensor(err, m->module);
            return LM_E_FORMAT;
        }
        if (parts[q]->n_dims != 2 || !is_float_dtype(parts[q]->dtype))
            return mismatch(err, m->module, "%s factor '%s' is not a 2-D float tensor (convolution forms are not "
                            "supported yet)", cfg->peft_type, parts[q]->name);
    }
    long r = cfg->r;
    double alpha = cfg->lora_alpha;
    long w = lm_pattern_lookup((const char *const *)cfg->rank_keys.v, cfg->rank_keys.n, m->module, err);
    if (w == -2)
        return err ? err->code : LM_E_FORMAT;
    if (w >= 0)
        r = cfg->rank_vals[w];
    w = lm_pattern_lookup((const char *const *)cfg->alpha_keys.v, cfg->alpha_keys.n, m->module, err);
    if (w == -2)
        return err ? err->code : LM_E_FORMAT;
    if (w >= 0)
        alpha = cfg->alpha_vals[w];
    long bi = module_weight(P, m->module, err);
    if (bi < 0)
        return err ? err->code : LM_E_MISMATCH;
    lm_plan_tensor *t = tensor_for(P, bi);
    const lm_tensor_info *W = t->base->info;
    if (W->n_dims != 2)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "%s on a %zu-D weight ('%s') is not supported yet",
                       cfg->peft_type, W->n_dims, W->name);
    const char *module = plan_str(P->plan, m->module);
    lm_op *op;
    if (loha) {
        /* [o, r1] @ [r1, i] and [o, r2] @ [r2, i], all equal to W's [o, i] */
        if (parts[0]->shape[1] != parts[1]->shape[0] || parts[2]->shape[1] != parts[3]->shape[0] ||
            parts[0]->shape[0] != W->shape[0] || parts[2]->shape[0] != W->shape[0] ||
            parts[1]->shape[1] != W->shape[1] || parts[3]->shape[1] != W->shape[1])
            return mismatch(err, m->module, "LoHa factors [%llu, %llu]@[%llu, %llu] and [%llu, %llu]@[%llu, %llu] "
                            "do not make base '%s' [%llu, %llu]",
                            (unsigned long long)parts[0]->shape[0], (unsigned long long)parts[0]->shape[1],
                            (unsigned long long)parts[1]->shape[0], (unsigned long long)parts[1]->shape[1],
                            (unsigned long long)parts[2]->shape[0], (unsigned long long)parts[2]->shape[1],
                            (unsigned long long)parts[3]->shape[0], (unsigned long long)parts[3]->shape[1], W->name,
                            (unsigned long long)W->shape[0], (unsigned long long)W->shape[1]);
        if ((long)parts[0]->shape[1] != r || (long)parts[2]->shape[1] != r) {
            lm_fail(err, LM_E_MISMATCH, "RankMismatch", "the tensors have rank %llu but adapter_config.json says r=%ld",
                    (unsigned long long)parts[0]->shape[1], r);
            lm_err_set_tensor(err, m->module);
            return LM_E_MISMATCH;
        }
        op = new_op(t, LM_OP_HADAMARD, ai, module, parts[0], err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->b = parts[1];
        op->c = parts[2];
        op->d = parts[3];
        op->rank = (uint64_t)r;
        P->plan->lowrank_flops += 4.0 * (double)r * (double)W->n_elems;
    } else {
        /* w1 [a, c] (or w1_a [a, r] @ w1_b [r, c]), w2 [b, d] likewise; W [a*b, c*d] */
        int w1_split = m->k1 == NULL, w2_split = m->k2 == NULL;
        if ((w1_split && parts[0]->shape[1] != parts[1]->shape[0]) ||
            (w2_split && parts[2]->shape[1] != parts[3]->shape[0]))
            return mismatch(err, m->module, "LoKr factors' inner dimensions disagree");
        uint64_t a = parts[0]->shape[0], c = w1_split ? parts[1]->shape[1] : parts[0]->shape[1];
        uint64_t b = parts[2]->shape[0], d = w2_split ? parts[3]->shape[1] : parts[2]->shape[1];
        if (a * b != W->shape[0] || c * d != W->shape[1])
            return mismatch(err, m->module, "kron of w1 [%llu, %llu] and w2 [%llu, %llu] is [%llu, %llu] but base "
                            "'%s' is [%llu, %llu]", (unsigned long long)a, (unsigned long long)c,
                            (unsigned long long)b, (unsigned long long)d, (unsigned long long)(a * b),
                            (unsigned long long)(c * d), W->name, (unsigned long long)W->shape[0],
                            (unsigned long long)W->shape[1]);
        op = new_op(t, LM_OP_KRON, ai, module, parts[0], err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->b = w1_split ? parts[1] : NULL;
        op->c = parts[2];
        op->d = w2_split ? parts[3] : NULL;
        op->kb = b;
        op->kd = d;
        op->rank = (uint64_t)r;
        P->plan->lowrank_flops += 2.0 * (double)W->n_elems;
    }
    op->scale_f64 = alpha / (double)r * ad->weight;
    op->scale = (float)op->scale_f64;
    P->plan->n_lowrank++;
    return LM_OK;
}

/* the base weight of a module, orientation from shapes: 0 [out, in], 1 [in, out] (Conv1D);
 * the square case follows the GPT-2 layer names.  @return base entry or -1 with *err */
static long weight_for(planner *P, const char *module, uint64_t out, uint64_t in, int *orient, lm_err *err)
{
    long bi = module_weight(P, module, err);
    if (bi < 0)
        return -1;
    const lm_tensor_info *W = lm_model_tensor(P->model, (size_t)bi)->info;
    int o = orientation_of(W, out, in);
    if (o == -1)
        o = is_gpt2_conv1d(module);
    if (o < 0) {
        mismatch(err, module, "base '%s' does not have the shape [%llu, %llu] the adapter needs", W->name,
                 (unsigned long long)out, (unsigned long long)in);
        return -1;
    }
    *orient = o;
    return bi;
}

/* BEFT (bias += beft_bias), HiRA (W += W * (B@A)), VeRA ((lb * B[:o]) @ (ld * A[:, :i])) */
static lm_code plan_single(planner *P, size_t ai, const lora_module *m, const lm_target_matcher *tm,
                           const lm_ts_tensor *vera_a, const lm_ts_tensor *vera_b, lm_err *err)
{
    const lm_adapter *ad = P->adapters[ai];
    const lm_adapter_config *cfg = ad->cfg;
    int targeted = module_targeted(P, ad, tm, m->module, err);
    if (targeted <= 0)
        return targeted < 0 ? (err ? err->code : LM_E_FORMAT) : LM_OK;
    const char *module = plan_str(P->plan, m->module);
    char buf[1100];
    if (m->beft != NULL) {
        if (cfg->kind != LM_PEFT_BEFT)
            return mismatch(err, m->module, "beft_bias in a %s adapter", cfg->peft_type);
        snprintf(buf, sizeof buf, "%s.bias", m->module);
        lm_err local;
        lm_err_clear(&local);
        long bb = lm_resolve_base_name(P->model, buf, &local);
        if (bb < 0) {
            lm_fail(err, LM_E_MISMATCH, "NoMatchingTensor", "BEFT needs a bias but the base layer has none (no '%s')", buf);
            lm_err_set_tensor(err, m->module);
            return LM_E_MISMATCH;
        }
        lm_plan_tensor *bt = tensor_for(P, bb);
        if (bt->base->info->n_elems != m->beft->n_elems || !is_float_dtype(m->beft->dtype))
            return mismatch(err, m->module, "beft_bias has %llu elements but the base bias has %llu",
                            (unsigned long long)m->beft->n_elems, (unsigned long long)bt->base->info->n_elems);
        lm_op *op = new_op(bt, LM_OP_BIAS_ADD, ai, module, m->beft, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->scale_f64 = ad->weight;
        op->scale = (float)ad->weight;
        P->plan->n_lowrank++;
        return LM_OK;
    }
    const lm_ts_tensor *A, *B;
    int embedding = 0, vera = m->vlb || m->vld;
    if (vera) {
        if (m->vlb == NULL || m->vld == NULL || vera_a == NULL || vera_b == NULL || cfg->kind != LM_PEFT_VERA) {
            lm_fail(err, LM_E_FORMAT, "IncompleteModule", "VeRA needs vera_lambda_b, vera_lambda_d and the shared "
                    "base_model.vera_A / base_model.vera_B");
            lm_err_set_tensor(err, m->module);
            return LM_E_FORMAT;
        }
        A = vera_a;
        B = vera_b;
    } else {
        embedding = m->hea || m->heb;
        A = embedding ? m->hea : m->ha;
        B = embedding ? m->heb : m->hb;
        if (A == NULL || B == NULL || cfg->kind != LM_PEFT_HIRA) {
            lm_fail(err, LM_E_FORMAT, "IncompleteModule", "HiRA needs both hira_A and hira_B (in a HIRA adapter)");
            lm_err_set_tensor(err, m->module);
            return LM_E_FORMAT;
        }
    }
    if (A->n_dims != 2 || B->n_dims != 2 || A->shape[0] != B->shape[1] || !is_float_dtype(A->dtype) ||
        !is_float_dtype(B->dtype))
        return mismatch(err, m->module, "the factors are not [r, in] and [out, r] float matrices");
    uint64_t r = A->shape[0], out, in;
    if (vera) { /* lambda_b: out; lambda_d: r; the projections are sliced to the layer */
        out = m->vlb->n_elems;
        if (m->vld->n_elems != r)
            return mismatch(err, m->module, "vera_lambda_d has %llu elements but the projections have rank %llu",
                            (unsigned long long)m->vld->n_elems, (unsigned long long)r);
        if (out > B->shape[0])
            return mismatch(err, m->module, "vera_lambda_b has %llu elements, more than base_model.vera_B's %llu rows",
                            (unsigned long long)out, (unsigned long long)B->shape[0]);
        in = 0;
    } else {
        out = B->shape[0];
        in = A->shape[1];
    }
    int orient = 0;
    long bi;
    if (vera) {
        /* the input size comes from the base: [out, in] or, for Conv1D, [in, out] */
        bi = module_weight(P, m->module, err);
        if (bi < 0)
            return err ? err->code : LM_E_MISMATCH;
        const lm_tensor_info *W = lm_model_tensor(P->model, (size_t)bi)->info;
        if (W->n_dims != 2 || (W->shape[0] != out && W->shape[1] != out))
            return mismatch(err, m->module, "vera_lambda_b has %llu elements but base '%s' has no such dimension",
                            (unsigned long long)out, W->name);
        orient = W->shape[0] == out && !(W->shape[1] == out && is_gpt2_conv1d(m->module)) ? 0 : 1;
        in = orient ? W->shape[0] : W->shape[1];
        if (in > A->shape[1])
            return mismatch(err, m->module, "the layer has %llu inputs, more than base_model.vera_A's %llu columns",
                            (unsigned long long)in, (unsigned long long)A->shape[1]);
    } else if (embedding) { /* W [V, D], A [r, V], B [D, r]: (B@A)^T */
        bi = weight_for(P, m->module, in, out, &orient, err);
        if (bi < 0)
            return err ? err->code : LM_E_MISMATCH;
        if (orient != 0)
            return mismatch(err, m->module, "embedding weight is not [vocab, dim]");
        orient = 1;
    } else {
        bi = weight_for(P, m->module, out, in, &orient, err);
        if (bi < 0)
            return err ? err->code : LM_E_MISMATCH;
    }
    lm_plan_tensor *t = tensor_for(P, bi);
    lm_op *op = new_op(t, vera ? LM_OP_LOWRANK : LM_OP_HIRA, ai, module, A, err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->b = B;
    op->rank = r;
    op->in = in;
    op->out = out;
    op->transposed = orient == 1;
    if (vera) {
        op->c = m->vlb; /* the executor slices and scales the shared projections */
        op->d = m->vld;
    }
    op->scale_f64 = ad->weight;
    op->scale = (float)ad->weight;
    P->plan->n_lowrank++;
    P->plan->lowrank_flops += 2.0 * (double)r * (double)in * (double)out;
    return LM_OK;
}

/* SHiRA (§5.14), HRA (§5.11), MiSS (§5.12): Linear weights [out, in] only */
static lm_code plan_structured(planner *P, size_t ai, const lora_module *m, const lm_target_matcher *tm, lm_err *err)
{
    const lm_adapter *ad = P->adapters[ai];
    const lm_adapter_config *cfg = ad->cfg;
    lm_op_kind kind = (m->sw || m->si) ? LM_OP_SPARSE : m->hra ? LM_OP_HRA : (m->oft || m->br || m->bsv) ? LM_OP_OFT
                    : (m->rt || m->ral) ? LM_OP_ROAD : m->c3 ? LM_OP_C3A : LM_OP_MISS;
    lm_peft_kind want = kind == LM_OP_SPARSE ? LM_PEFT_SHIRA
                      : kind == LM_OP_HRA    ? LM_PEFT_HRA
                      : kind == LM_OP_OFT    ? (m->oft ? LM_PEFT_OFT : LM_PEFT_BOFT)
                      : kind == LM_OP_ROAD   ? LM_PEFT_ROAD
                      : kind == LM_OP_C3A    ? LM_PEFT_C3A
                                             : LM_PEFT_MISS;
    if (cfg->kind != want)
        return mismatch(err, m->module, "%s tensors in a %s adapter",
                        kind == LM_OP_SPARSE ? "SHiRA" : kind == LM_OP_HRA ? "HRA" : "MiSS", cfg->peft_type);
    int targeted = module_targeted(P, ad, tm, m->module, err);
    if (targeted <= 0)
        return targeted < 0 ? (err ? err->code : LM_E_FORMAT) : LM_OK;
    long bi = module_weight(P, m->module, err);
    if (bi < 0)
        return err ? err->code : LM_E_MISMATCH;
    lm_plan_tensor *t = tensor_for(P, bi);
    const lm_tensor_info *W = t->base->info;
    if (W->n_dims != 2)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "%s on a %zu-D weight ('%s') is not supported yet",
                       cfg->peft_type, W->n_dims, W->name);
    uint64_t o = W->shape[0], in = W->shape[1];
    const char *module = plan_str(P->plan, m->module);
    lm_op *op;
    if (kind == LM_OP_SPARSE) {
        const lm_ts_tensor *w = m->sw, *ix = m->si;
        if (w == NULL || ix == NULL || ix->n_dims != 2 || ix->shape[0] != 2 || ix->shape[1] != w->n_elems ||
            !is_float_dtype(w->dtype))
            return mismatch(err, m->module, "SHiRA needs shira_weight [nnz] and shira_indices [2, nnz]");
        /* the indices are data: read and checked here so that a bad one fails before any write */
        uint64_t nnz = w->n_elems;
        long *rc = malloc((size_t)(2 * nnz + 1) * sizeof *rc);
        if (rc == NULL || lm_grow((void **)&P->plan->blobs, &P->plan->cap_blobs, P->plan->n_blobs,
                                  sizeof *P->plan->blobs, 16) != 0) {
            free(rc);
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
        P->plan->blobs[P->plan->n_blobs++] = rc;
        for (uint64_t q = 0; q < 2 * nnz; q++) {
            const uint8_t *d = ix->data;
            double v;
            if (ix->dtype == LM_DT_I32) {
                int32_t x;
                memcpy(&x, d + 4 * q, 4);
                v = x;
            } else if (ix->dtype == LM_DT_I64) {
                int64_t x;
                memcpy(&x, d + 8 * q, 8);
                v = (double)x;
            } else if (ix->dtype == LM_DT_F32) { /* saved on Windows */
                float x;
                memcpy(&x, d + 4 * q, 4);
                v = x;
            } else {
                return mismatch(err, m->module, "shira_indices has dtype %s", lm_dtype_name(ix->dtype));
            }
            uint64_t lim = q < nnz ? o : in;
            if (!(v >= 0) || v != (double)(long)v || (uint64_t)v >= lim) {
                lm_fail(err, LM_E_MISMATCH, "IndexOutOfRange", "shira_indices holds %g, outside [0, %llu)", v,
                        (unsigned long long)lim);
                lm_err_set_tensor(err, m->module);
                return LM_E_MISMATCH;
            }
            rc[q] = (long)v;
        }
        op = new_op(t, LM_OP_SPARSE, ai, module, w, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->rows = rc;
        op->n_rows = (size_t)nnz;
    } else if (kind == LM_OP_ROAD) {
        /* theta, alpha: [out/2] (road_1), [out] (road_2), [2 out] (road_4); groups of g rows */
        uint64_t g = (uint64_t)cfg->road_group, v = (uint64_t)cfg->road_variant;
        uint64_t want_n = v == 1 ? o / 2 : v == 2 ? o : 2 * o;
        if (!m->rt || !m->ral || m->rt->n_elems != want_n || m->ral->n_elems != want_n || o % g != 0 ||
            !is_float_dtype(m->rt->dtype) || !is_float_dtype(m->ral->dtype))
            return mismatch(err, m->module, "RoAd road_%llu needs road_theta and road_alpha of %llu elements and "
                            "%llu output rows divisible by group_size %llu", (unsigned long long)v,
                            (unsigned long long)want_n, (unsigned long long)o, (unsigned long long)g);
        if (ad->weight != 1.0)
            return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "RoAd rotates the weight: a weight other than 1 "
                           "(--scale, --adapter-scaled) has no meaning for it");
        op = new_op(t, LM_OP_ROAD, ai, module, m->rt, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->b = m->ral;
        op->kd = g;
        op->k2 = v;
        op->out = o;
        /* the bias rotates with its rows */
        long bb = module_bias(P, m->module);
        if (bb >= 0) {
            lm_plan_tensor *bt = tensor_for(P, bb);
            if (bt->base->info->n_elems != o)
                return mismatch(err, m->module, "the bias has %llu elements, not %llu",
                                (unsigned long long)bt->base->info->n_elems, (unsigned long long)o);
            lm_op *bo = new_op(bt, LM_OP_ROAD, ai, module, m->rt, err);
            if (bo == NULL)
                return LM_E_NOMEM;
            *bo = *op;
        }
    } else if (kind == LM_OP_C3A) {
        const lm_ts_tensor *kr = m->c3;
        uint64_t b = kr->n_dims == 3 ? kr->shape[2] : 0;
        if (kr->n_dims != 3 || b == 0 || kr->shape[0] * b != o || kr->shape[1] * b != in || !is_float_dtype(kr->dtype))
            return mismatch(err, m->module, "c3a_kernel must be [out/b, in/b, b] for base '%s' [%llu, %llu]", W->name,
                            (unsigned long long)o, (unsigned long long)in);
        op = new_op(t, LM_OP_C3A, ai, module, kr, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->kd = b;
        op->in = in;
    } else if (kind == LM_OP_OFT && !m->oft) {
        /* BOFT with one butterfly factor (the only portable one, §5.7): R [1, nb, bs, bs], s [o, 1] */
        const lm_ts_tensor *R = m->br, *sv = m->bsv;
        if (!R || !sv || R->n_dims != 4 || R->shape[2] != R->shape[3] || R->shape[1] * R->shape[2] != in ||
            sv->n_elems != o || !is_float_dtype(R->dtype) || !is_float_dtype(sv->dtype))
            return mismatch(err, m->module, "BOFT needs boft_R [m, in/bs, bs, bs] and boft_s [%llu, 1] for base '%s'",
                            (unsigned long long)o, W->name);
        if (R->shape[0] != 1)
            return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "BOFT with %llu butterfly factors: PEFT itself can "
                           "only load 1 without its CUDA extension; not supported", (unsigned long long)R->shape[0]);
        if (ad->weight != 1.0)
            return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "BOFT rotates the weight: a weight other than 1 "
                           "(--scale, --adapter-scaled) has no meaning for it");
        op = new_op(t, LM_OP_OFT, ai, module, R, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->b = sv;
        op->kd = R->shape[2];
        op->in = in;
        op->k2 = 4; /* exact Cayley of (X - X^T)/2, rows scaled by s */
        P->plan->n_lowrank++;
        return LM_OK;
    } else if (kind == LM_OP_OFT) {
        /* oft_R [blocks (1 with block_share), bs(bs-1)/2]; the blocks tile the input features */
        const lm_ts_tensor *q = m->oft;
        uint64_t n = q->n_dims == 2 ? q->shape[1] : 0, bs = 1;
        while (bs * (bs - 1) / 2 < n)
            bs++;
        if (q->n_dims != 2 || bs * (bs - 1) / 2 != n || bs < 2 || in % bs != 0 ||
            (q->shape[0] != 1 && q->shape[0] != in / bs) || !is_float_dtype(q->dtype))
            return mismatch(err, m->module, "oft_R must be [%llu or 1, bs(bs-1)/2] for base '%s' with in=%llu",
                            (unsigned long long)(bs > 1 ? in / bs : 0), W->name, (unsigned long long)in);
        if (strstr(q->name, "oft_embedding_R") != NULL)
            return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "OFT on an embedding is not supported yet");
        if (ad->weight != 1.0)
            return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "OFT rotates the weight: a weight other than 1 "
                           "(--scale, --adapter-scaled) has no meaning for it");
        op = new_op(t, LM_OP_OFT, ai, module, q, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->kd = bs;
        op->in = in;
        op->k1 = (uint64_t)(cfg->oft_terms > 0 ? cfg->oft_terms : 0);
        op->k2 = (uint64_t)(cfg->oft_neumann ? 1 : 0) | (uint64_t)(cfg->oft_coft ? 2 : 0);
        op->scale_f64 = cfg->oft_eps; /* the executor builds the rotations from these */
        P->plan->n_lowrank++;
        return LM_OK;
    } else if (kind == LM_OP_HRA) {
        const lm_ts_tensor *u = m->hra;
        if (u->n_dims != 2 || u->shape[0] != in || u->shape[1] > in || !is_float_dtype(u->dtype))
            return mismatch(err, m->module, "hra_u must be [%llu, r] for base '%s'", (unsigned long long)in, W->name);
        op = new_op(t, LM_OP_HRA, ai, module, u, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->rank = u->shape[1];
        op->in = in;
        op->dora_axis = cfg->hra_gs;
        if (ad->weight != 1.0)
            return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "HRA rotates the weight: a weight other than 1 "
                           "(--scale, --adapter-scaled) has no meaning for it");
    } else {
        const lm_ts_tensor *b = m->miss;
        uint64_t r = b->n_dims == 2 ? b->shape[0] : 0, width = cfg->miss_mini ? (uint64_t)cfg->mini_r : o;
        if (b->n_dims != 2 || r == 0 || b->shape[1] != width || !is_float_dtype(b->dtype))
            return mismatch(err, m->module, "miss_block must be [r, %llu] for base '%s'", (unsigned long long)width,
                            W->name);
        op = new_op(t, LM_OP_MISS, ai, module, b, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->rank = r;
        op->kd = width;
    }
    op->scale_f64 = ad->weight;
    op->scale = (float)ad->weight;
    P->plan->n_lowrank++;
    return LM_OK;
}

static int is_derived(const lora_module *m)
{
    return m->da || m->db || m->dl || m->dn || m->ga || m->gb || m->gag || m->gbg || m->vza || m->vzb || m->via ||
           m->vwa || m->vib || m->vwb || m->rl || m->rg || m->ra || m->rb || m->fs;
}

/* DeLoRA (§5.14), GraLoRA (§5.14), VB-LoRA (§5.9): low-rank deltas whose factors the executor
 * builds from the stored tensors (x[]); shapes are checked here */
static lm_code plan_derived(planner *P, size_t ai, const lora_module *m, const lm_target_matcher *tm,
                            const lm_ts_tensor *bank, const lm_ts_tensor *rl_a, const lm_ts_tensor *rl_b, lm_err *err)
{
    const lm_adapter *ad = P->adapters[ai];
    const lm_adapter_config *cfg = ad->cfg;
    int derive = m->fs != NULL                          ? LM_DERIVE_FOURIER
               : (m->da || m->db || m->dl || m->dn)     ? LM_DERIVE_DELORA
               : (m->ga || m->gb || m->gag || m->gbg)   ? LM_DERIVE_GRALORA
               : (m->rl || m->rg || m->ra || m->rb)     ? LM_DERIVE_RANDLORA
                                                        : LM_DERIVE_VBLORA;
    lm_peft_kind want = derive == LM_DERIVE_FOURIER   ? LM_PEFT_FOURIERFT
                      : derive == LM_DERIVE_DELORA    ? LM_PEFT_DELORA
                      : derive == LM_DERIVE_GRALORA   ? LM_PEFT_GRALORA
                      : derive == LM_DERIVE_RANDLORA  ? LM_PEFT_RANDLORA
                                                      : LM_PEFT_VBLORA;
    if (cfg->kind != want)
        return mismatch(err, m->module, "tensors of another method in a %s adapter", cfg->peft_type);
    int targeted = module_targeted(P, ad, tm, m->module, err);
    if (targeted <= 0)
        return targeted < 0 ? (err ? err->code : LM_E_FORMAT) : LM_OK;
    const lm_ts_tensor *x[4] = {NULL, NULL, NULL, NULL};
    uint64_t out = 0, in = 0, K = 0, k1 = 0, k2 = 0;
    double scale = ad->weight;
    if (derive == LM_DERIVE_FOURIER) {
        /* the spectrum's positions are torch.randperm(out*in, seed)[:n] (peft-merge.md §5.10, App. A):
         * the delta is rank 2n through the separable inverse DFT */
        long wi = module_weight(P, m->module, err);
        if (wi < 0)
            return err ? err->code : LM_E_MISMATCH;
        const lm_tensor_info *W = lm_model_tensor(P->model, (size_t)wi)->info;
        int conv1d_names = is_gpt2_conv1d(m->module);
        if (W->n_dims != 2 || m->fs->n_dims != 1 || !is_float_dtype(m->fs->dtype))
            return mismatch(err, m->module, "FourierFT needs a 1-D fourierft_spectrum and a 2-D base weight");
        out = conv1d_names ? W->shape[1] : W->shape[0];
        in = conv1d_names ? W->shape[0] : W->shape[1];
        if (m->fs->n_elems > out * in)
            return mismatch(err, m->module, "fourierft_spectrum has more entries than the weight");
        if (out * in >= 214748364ull)
            return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "FourierFT on a %llu-element weight: torch's randperm "
                           "switches to another draw there, not reproduced by lora-merge yet", (unsigned long long)(out * in));
        x[0] = m->fs;
        K = 2 * m->fs->n_elems;
        k1 = (uint64_t)cfg->ft_seed;
        scale *= cfg->ft_scaling;
    } else if (derive == LM_DERIVE_DELORA) {
        x[0] = m->da, x[1] = m->db, x[2] = m->dl, x[3] = m->dn;
        if (!m->da || !m->db || !m->dl || !m->dn || m->da->n_dims != 2 || m->db->n_dims != 2 ||
            m->da->shape[0] != m->db->shape[1] || m->dl->n_elems != 1 || m->dn->n_elems != m->da->shape[1])
            return mismatch(err, m->module, "DeLoRA needs delora_A [r, in], delora_B [out, r], delora_lambda [1] "
                            "and delora_w_norm [in]");
        K = m->da->shape[0];
        in = m->da->shape[1];
        out = m->db->shape[0];
    } else if (derive == LM_DERIVE_GRALORA) {
        x[0] = m->ga, x[1] = m->gb, x[2] = m->gag, x[3] = m->gbg;
        uint64_t k = (uint64_t)cfg->gralora_k, h = (uint64_t)cfg->hybrid_r, R = (uint64_t)cfg->r;
        if (!m->ga || !m->gb || m->ga->n_dims != 3 || m->gb->n_dims != 3 || m->ga->shape[0] != k ||
            m->gb->shape[0] != k || m->ga->shape[2] != R || m->gb->shape[1] != R || R % k != 0)
            return mismatch(err, m->module, "GraLoRA needs gralora_A [k, in/k, r] and gralora_B [k, r, out/k] "
                            "with k=%ld and r=%ld (divisible by k) from the config", cfg->gralora_k, cfg->r);
        in = k * m->ga->shape[1];
        out = k * m->gb->shape[2];
        if ((h > 0) != (m->gag != NULL && m->gbg != NULL) ||
            (h > 0 && (m->gag->n_dims != 2 || m->gbg->n_dims != 2 || m->gag->shape[0] != h ||
                       m->gag->shape[1] != in || m->gbg->shape[0] != out || m->gbg->shape[1] != h)))
            return mismatch(err, m->module, "GraLoRA's hybrid part does not match hybrid_r=%ld", cfg->hybrid_r);
        K = k * R + h;
        k1 = k;
        k2 = R;
        scale *= cfg->lora_alpha / (double)(R + h);
    } else if (derive == LM_DERIVE_RANDLORA) {
        /* lambda [r, nb], gamma [nb, min(o,i)], bases A [r, 1, >=min], B [>=max, >=nb, r] (the
         * layer's own copies, else the shared ones) */
        const lm_ts_tensor *ba = m->ra ? m->ra : rl_a, *bb = m->rb ? m->rb : rl_b;
        x[0] = m->rl, x[1] = m->rg, x[2] = ba, x[3] = bb;
        if (!m->rl || !m->rg || !ba || !bb || m->rl->n_dims != 2 || m->rg->n_dims != 2 || ba->n_dims != 3 ||
            bb->n_dims != 3 || m->rl->shape[1] != m->rg->shape[0] || ba->shape[0] != m->rl->shape[0] ||
            ba->shape[1] != 1 || bb->shape[2] != m->rl->shape[0] || bb->shape[1] < m->rl->shape[1] ||
            ba->shape[2] < m->rg->shape[1])
            return mismatch(err, m->module, "RandLoRA needs randlora_lambda [r, nb], randlora_gamma [nb, min(out, in)] "
                            "and the bases randlora_A [r, 1, D], randlora_B [D, NB, r]");
        uint64_t r = m->rl->shape[0], nb = m->rl->shape[1], mn = m->rg->shape[1];
        /* the base tells which of out and in is the smaller one */
        long wi = module_weight(P, m->module, err);
        if (wi < 0)
            return err ? err->code : LM_E_MISMATCH;
        const lm_tensor_info *W = lm_model_tensor(P->model, (size_t)wi)->info;
        if (W->n_dims != 2 || (W->shape[0] != mn && W->shape[1] != mn))
            return mismatch(err, m->module, "randlora_gamma's width %llu is neither dimension of '%s'",
                            (unsigned long long)mn, W->name);
        uint64_t mx = W->shape[0] == mn ? W->shape[1] : W->shape[0];
        if (bb->shape[0] < mx)
            return mismatch(err, m->module, "randlora_B has %llu rows, fewer than %llu", (unsigned long long)bb->shape[0],
                            (unsigned long long)mx);
        /* Linear orientation [out, in] with out >= in unless the stored layout says otherwise:
         * decided with the base below; here: delta = B_flat @ A_flat is [max, min] */
        int conv1d_names = is_gpt2_conv1d(m->module);
        uint64_t o_lin = conv1d_names ? W->shape[1] : W->shape[0], i_lin = conv1d_names ? W->shape[0] : W->shape[1];
        out = o_lin;
        in = i_lin;
        K = r * nb;
        k1 = mx;
        k2 = mn;
        scale *= cfg->lora_alpha / (double)cfg->r;
    } else {
        int topk_only = m->via || m->vwa || m->vib || m->vwb;
        x[0] = topk_only ? m->via : m->vza;
        x[1] = topk_only ? m->vwa : NULL;
        x[2] = topk_only ? m->vib : m->vzb;
        x[3] = topk_only ? m->vwb : NULL;
        if (bank == NULL || bank->n_dims != 2 || !x[0] || !x[2] || (topk_only && (!x[1] || !x[3])))
            return mismatch(err, m->module, "VB-LoRA needs both logits (or top-k indices and weights) and "
                            "base_model.vblora_vector_bank");
        uint64_t L = bank->shape[1], N = bank->shape[0];
        const lm_ts_tensor *za = x[0], *zb = x[2];
        uint64_t last = topk_only ? (uint64_t)cfg->topk : N;
        if (za->n_dims != 3 || zb->n_dims != 3 || za->shape[2] != last || zb->shape[2] != last ||
            za->shape[0] != zb->shape[1] || (uint64_t)cfg->topk > N ||
            (topk_only && (x[1]->n_elems * (uint64_t)cfg->topk != za->n_elems * (uint64_t)(cfg->topk - 1) ||
                           x[3]->n_elems * (uint64_t)cfg->topk != zb->n_elems * (uint64_t)(cfg->topk - 1))))
            return mismatch(err, m->module, "VB-LoRA logits do not fit the bank [%llu, %llu] and topk=%ld",
                            (unsigned long long)N, (unsigned long long)L, cfg->topk);
        if (topk_only && !is_float_dtype(x[1]->dtype))
            return mismatch(err, m->module, "VB-LoRA top-k weights are not float");
        if (topk_only && is_float_dtype(x[0]->dtype))
            return mismatch(err, m->module, "VB-LoRA top-k indices must be integers");
        K = za->shape[0];
        in = za->shape[1] * L;
        out = zb->shape[0] * L;
        k1 = (uint64_t)cfg->topk;
        k2 = topk_only;
    }
    for (int q = 0; q < 4; q++)
        if (x[q] && !is_float_dtype(x[q]->dtype) && !(derive == LM_DERIVE_VBLORA && (q == 0 || q == 2) && k2))
            return mismatch(err, m->module, "'%s' is not a float tensor", x[q]->name);
    int orient = 0;
    long bi = weight_for(P, m->module, out, in, &orient, err);
    if (bi < 0)
        return err ? err->code : LM_E_MISMATCH;
    if (orient == 1 && derive == LM_DERIVE_DELORA)
        return mismatch(err, m->module, "DeLoRA on a Conv1D layer is not supported (PEFT does not either)");
    lm_plan_tensor *t = tensor_for(P, bi);
    lm_op *op = new_op(t, LM_OP_LOWRANK, ai, plan_str(P->plan, m->module), x[0], err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->derive = derive;
    memcpy(op->x, x, sizeof x);
    op->rank = K;
    op->in = in;
    op->out = out;
    op->k1 = k1;
    op->k2 = k2;
    op->transposed = orient == 1;
    op->scale_f64 = scale;
    op->scale = (float)scale;
    if (derive == LM_DERIVE_VBLORA)
        op->b = bank; /* the bank's f32 view is built with the others */
    P->plan->n_lowrank++;
    P->plan->lowrank_flops += 2.0 * (double)K * (double)in * (double)out;
    return LM_OK;
}

static lm_code plan_adapter(planner *P, size_t ai, lm_err *err)
{
    lm_adapter *ad = P->adapters[ai];
    const lm_adapter_config *cfg = ad->cfg;
    lm_plan *p = P->plan;
    module_list mods = {0};
    lowrank_info *li = NULL;
    const lm_ts_tensor *vera_a = NULL, *vera_b = NULL, *vb_bank = NULL, *rl_a = NULL, *rl_b = NULL;
    lm_code rc = LM_OK;
    char buf[1024];
    size_t n_bare = 0;

    /* targeting rules of the config (peft-merge.md §3.4), compiled once */
    lm_target_rules rules;
    rules_from_config(cfg, &rules);
    lm_target_matcher *tm = lm_target_matcher_create(&rules, err);
    if (tm == NULL) {
        lm_err_set_path(err, ad->config_path);
        return err ? err->code : LM_E_FORMAT;
    }

    for (size_t i = 0; i < ad->ts->n; i++) {
        const lm_ts_tensor *t = &ad->ts->t[i];
        const char *rest = t->name;
        if (strcmp(rest, "base_model.vblora_vector_bank") == 0) {
            vb_bank = t; /* VB-LoRA's vector bank, shared by every layer */
            continue;
        }
        if (strcmp(rest, "base_model.randlora_A") == 0 || strcmp(rest, "base_model.randlora_B") == 0) {
            *(rest[20] == 'A' ? &rl_a : &rl_b) = t; /* RandLoRA's random bases, shared */
            continue;
        }
        if (strcmp(rest, "base_model.vera_A") == 0 || strcmp(rest, "base_model.vera_B") == 0) {
            *(rest[16] == 'A' ? &vera_a : &vera_b) = t; /* VeRA's projections, shared by every layer */
            continue;
        }
        if (strncmp(rest, "base_model.model.", 17) == 0) {
            rest += 17;
        } else {
            if (strncmp(rest, "base_model.", 11) == 0)
                rest += 11;
            n_bare++;
        }
        key_role role = classify_key(rest, buf, sizeof buf);
        if (role == R_SKIP) {
            if ((rc = plan_note(p, "%s: ignored adapter tensor %s", ad->dir, t->name)) != LM_OK)
                goto done;
            continue;
        }
        if (role == R_FULL) {
            if ((rc = plan_replace(P, ai, t, buf, err)) != LM_OK) {
                lm_err_set_path(err, ad->weights_path);
                goto done;
            }
            continue;
        }
        lora_module *m = module_get(&mods, buf, err);
        if (m == NULL) {
            rc = LM_E_NOMEM;
            goto done;
        }
        const lm_ts_tensor **slot = module_slot(m, role);
        if (*slot != NULL) {
            rc = lm_fail(err, LM_E_FORMAT, "DuplicateKey", "adapter holds two tensors for the same part ('%s' and '%s')",
                         (*slot)->name, t->name);
            lm_err_set_tensor(err, m->module);
            lm_err_set_path(err, ad->weights_path);
            goto done;
        }
        *slot = t;
    }
    if (n_bare > 0 &&
        (rc = plan_note(p, "%s: %zu adapter keys lack the 'base_model.model.' prefix; merged anyway "
                           "(PEFT would not load them)", ad->dir, n_bare)) != LM_OK)
        goto done;

    li = calloc(mods.n ? mods.n : 1, sizeof *li);
    if (li == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    /* pass 1: pairs, targeting, ranks, base tensors, orientation where the shapes tell */
    for (size_t k = 0; k < mods.n; k++) {
        lora_module *m = &mods.v[k];
        li[k].m = m;
        li[k].base = -1;
        li[k].orient = -1;
        const lm_ts_tensor *A = m->a ? m->a : m->ea, *B = m->b ? m->b : m->eb;
        if (A == NULL && B == NULL && m->e == NULL && m->mag == NULL && m->bbias == NULL)
            continue; /* trainable tokens, IA3, LoHa, LoKr, BEFT, HiRA, VeRA: planned below */
        if (m->ia3 != NULL || (m->e != NULL) != (cfg->kind == LM_PEFT_ADALORA)) {
            rc = lm_fail(err, LM_E_FORMAT, "IncompleteModule", "%s tensor in a %s adapter",
                         m->ia3 ? "ia3_l and lora" : m->e ? "an AdaLoRA lora_E" : "no lora_E (AdaLoRA needs it)",
                         cfg->peft_type);
            lm_err_set_tensor(err, m->module);
            lm_err_set_path(err, ad->weights_path);
            goto done;
        }
        if ((m->a != NULL) != (m->b != NULL) || (m->ea != NULL) != (m->eb != NULL) || (A == NULL)) {
            const char *have = m->a ? "lora_A" : m->b ? "lora_B" : m->ea ? "lora_embedding_A"
                             : m->eb ? "lora_embedding_B" : m->mag ? "lora_magnitude_vector" : "lora_B.bias";
            const char *miss = m->a ? "lora_B" : m->b ? "lora_A" : m->ea ? "lora_embedding_B"
                             : m->eb ? "lora_embedding_A" : "lora_A and lora_B";
            rc = lm_fail(err, LM_E_FORMAT, "IncompleteModule", "adapter has %s but no %s for this module", have, miss);
            lm_err_set_tensor(err, m->module);
            lm_err_set_path(err, ad->weights_path);
            goto done;
        }
        if (m->a != NULL && m->ea != NULL) {
            rc = lm_fail(err, LM_E_FORMAT, "IncompleteModule", "adapter has both lora_A/B and lora_embedding_A/B");
            lm_err_set_tensor(err, m->module);
            goto done;
        }
        int targeted = lm_target_matcher_test(tm, m->module, err);
        if (targeted < 0) {
            lm_err_set_path(err, ad->config_path);
            rc = err ? err->code : LM_E_FORMAT;
            goto done;
        }
        if (!targeted) {
            if ((rc = plan_note(p, "%s: module %s is in the file but not targeted by adapter_config.json; "
                                   "skipped, as PEFT does", ad->dir, m->module)) != LM_OK)
                goto done;
            li[k].m = NULL;
            continue;
        }
        /* rank and alpha through rank_pattern / alpha_pattern */
        long r = cfg->r;
        double alpha = cfg->lora_alpha;
        long w = lm_pattern_lookup((const char *const *)cfg->rank_keys.v, cfg->rank_keys.n, m->module, err);
        if (w == -2) {
            lm_err_set_path(err, ad->config_path);
            rc = err ? err->code : LM_E_FORMAT;
            goto done;
        }
        if (w >= 0)
            r = cfg->rank_vals[w];
        w = lm_pattern_lookup((const char *const *)cfg->alpha_keys.v, cfg->alpha_keys.n, m->module, err);
        if (w == -2) {
            lm_err_set_path(err, ad->config_path);
            rc = err ? err->code : LM_E_FORMAT;
            goto done;
        }
        if (w >= 0)
            alpha = cfg->alpha_vals[w];
        li[k].rank = r;
        li[k].alpha = alpha;
        if (!is_float_dtype(A->dtype) || !is_float_dtype(B->dtype)) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "lora factors must be float (got %s, %s)",
                         lm_dtype_name(A->dtype), lm_dtype_name(B->dtype));
            lm_err_set_tensor(err, m->module);
            goto done;
        }
        if (A->n_dims < 2 || B->n_dims < 2) {
            rc = mismatch(err, m->module, "lora factors must have at least 2 dimensions");
            goto done;
        }
        uint64_t rank = A->shape[0];
        if (B->shape[1] != rank) {
            char s1[96], s2[96];
            shape_str(s1, sizeof s1, A->n_dims, A->shape);
            shape_str(s2, sizeof s2, B->n_dims, B->shape);
            rc = mismatch(err, m->module, "lora_A %s and lora_B %s disagree on the rank", s1, s2);
            goto done;
        }
        if (cfg->kind == LM_PEFT_ADALORA) {
            /* the file holds the kept ranks (any k <= init_r); k = 0 adds nothing */
            if (m->e->n_elems != rank) {
                rc = mismatch(err, m->module, "lora_E has %llu elements but lora_A has rank %llu",
                              (unsigned long long)m->e->n_elems, (unsigned long long)rank);
                goto done;
            }
            if (rank == 0) {
                li[k].m = NULL;
                continue;
            }
        } else if ((long)rank != r) {
            rc = lm_fail(err, LM_E_MISMATCH, "RankMismatch",
                         "the tensors have rank %llu but adapter_config.json says r=%ld for this module "
                         "(PEFT would fail to load it)", (unsigned long long)rank, r);
            lm_err_set_tensor(err, m->module);
            goto done;
        }
        snprintf(buf, sizeof buf, "%s.weight", m->module);
        lm_err local;
        lm_err_clear(&local);
        long bi = lm_resolve_base_name(P->model, buf, &local);
        if (bi == -1 && (leaf_is(m->module, "lm_head") || leaf_is(m->module, "embed_out"))) {
            /* a tied output head: the checkpoint stores only the input embedding, which is the
             * same tensor in the model, so the head's delta goes there (peft-merge.md §6.4) */
            long tied = find_input_embedding(P->model);
            if (tied >= 0) {
                bi = tied;
                if ((rc = plan_note(p, "%s: %s is tied to the input embedding %s (no separate head in the base): "
                                       "its delta is applied to the shared tensor", ad->dir, m->module,
                                    lm_model_tensor(P->model, (size_t)tied)->info->name)) != LM_OK)
                    goto done;
            }
        }
        if (bi < 0) {
            if (err != NULL)
                *err = local;
            lm_err_set_tensor(err, m->module);
            rc = local.code;
            goto done;
        }
        li[k].base = bi;
        const lm_tensor_info *W = lm_model_tensor(P->model, (size_t)bi)->info;
        if (!is_float_dtype(W->dtype)) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "base tensor '%s' is %s: only float weights can be merged",
                         W->name, lm_dtype_name(W->dtype));
            lm_err_set_tensor(err, m->module);
            goto done;
        }
        char sw[96], sa[96], sb[96];
        shape_str(sw, sizeof sw, W->n_dims, W->shape);
        shape_str(sa, sizeof sa, A->n_dims, A->shape);
        shape_str(sb, sizeof sb, B->n_dims, B->shape);
        if (m->ea != NULL) { /* embedding: W [V, D], A [r, V], B [D, r] */
            if (A->n_dims != 2 || B->n_dims != 2 || W->n_dims != 2 || W->shape[0] != A->shape[1] ||
                W->shape[1] != B->shape[0]) {
                rc = mismatch(err, m->module, "base '%s' is %s but lora_embedding_A %s, lora_embedding_B %s "
                              "need [%llu, %llu]", W->name, sw, sa, sb, (unsigned long long)A->shape[1],
                              (unsigned long long)B->shape[0]);
                goto done;
            }
            li[k].orient = 1;
        } else if (W->n_dims >= 3 || A->n_dims >= 3) { /* convolution */
            int ok = W->n_dims == A->n_dims && W->n_dims == B->n_dims && W->shape[0] == B->shape[0];
            for (size_t d = 1; ok && d < W->n_dims; d++)
                ok = W->shape[d] == A->shape[d];
            for (size_t d = 2; ok && d < B->n_dims; d++)
                ok = B->shape[d] == 1;
            if (!ok) {
                rc = mismatch(err, m->module, "base '%s' is %s but lora_A is %s and lora_B %s", W->name, sw, sa, sb);
                goto done;
            }
            li[k].orient = 0;
        } else {
            int o = orientation_of(W, B->shape[0], A->shape[1]);
            if (o == -2) {
                rc = mismatch(err, m->module, "base '%s' is %s but lora_B @ lora_A is [%llu, %llu] "
                              "(lora_A %s, lora_B %s)", W->name, sw, (unsigned long long)B->shape[0],
                              (unsigned long long)A->shape[1], sa, sb);
                goto done;
            }
            li[k].orient = o;
        }
    }
    /* pass 2: square modules whose orientation the shapes cannot tell (peft-merge.md §5.1.2) */
    int any_conv1d = 0;
    for (size_t k = 0; k < mods.n; k++)
        if (li[k].m && li[k].base >= 0 && li[k].orient == 1 && li[k].m->a != NULL)
            any_conv1d = 1;
    for (size_t k = 0; k < mods.n; k++) {
        if (li[k].m == NULL || li[k].base < 0 || li[k].orient != -1)
            continue;
        int o = -1;
        const char *why = NULL;
        for (size_t j = 0; j < mods.n && o < 0; j++)
            if (li[j].m && li[j].orient >= 0 && li[j].m->a != NULL &&
                strcmp(leaf_of(li[j].m->module), leaf_of(li[k].m->module)) == 0) {
                o = li[j].orient;
                why = "as its non-square siblings";
            }
        if (o < 0 && any_conv1d) {
            o = 1;
            why = "the adapter's other modules are Conv1D";
        }
        if (o < 0 && is_gpt2_conv1d(li[k].m->module)) {
            o = 1;
            why = "GPT-2 Conv1D layer name";
        }
        if (o < 0) {
            o = cfg->fan_in_fan_out ? 1 : 0;
            why = "fan_in_fan_out of adapter_config.json";
        }
        li[k].orient = o;
        if (o == 1 && (rc = plan_note(p, "%s: square module %s taken as Conv1D ([in, out] storage): %s", ad->dir,
                                      li[k].m->module, why)) != LM_OK)
            goto done;
    }
    if (any_conv1d && !cfg->fan_in_fan_out &&
        (rc = plan_note(p, "%s: fan_in_fan_out is false but the base stores these layers as [in, out] (Conv1D); "
                           "merged transposed, as PEFT does", ad->dir)) != LM_OK)
        goto done;

    /* pass 3: operations */
    for (size_t k = 0; k < mods.n; k++) {
        lora_module *m = li[k].m;
        if (m == NULL)
            continue;
        if (li[k].base >= 0) {
            const lm_ts_tensor *A = m->a ? m->a : m->ea, *B = m->b ? m->b : m->eb;
            lm_plan_tensor *t = tensor_for(P, li[k].base);
            lm_op *op = new_op(t, LM_OP_LOWRANK, ai, plan_str(p, m->module), A, err);
            if (op == NULL) {
                rc = LM_E_NOMEM;
                goto done;
            }
            double s = cfg->use_rslora ? li[k].alpha / sqrt((double)li[k].rank) : li[k].alpha / (double)li[k].rank;
            if (cfg->kind == LM_PEFT_ADALORA) /* PEFT divides by init_r, not the kept rank (§5.2) */
                s = (cfg->lora_alpha > 0 ? cfg->lora_alpha : (double)cfg->init_r) / ((double)cfg->init_r + 1e-5);
            op->e = m->e;
            op->b = B;
            op->rank = A->shape[0];
            op->in = A->n_elems / A->shape[0];
            op->out = B->shape[0];
            op->transposed = li[k].orient == 1;
            op->scale_f64 = s * ad->weight;
            op->scale = (float)op->scale_f64;
            p->n_lowrank++;
            p->lowrank_flops += 2.0 * (double)op->rank * (double)op->in * (double)op->out;
            if (m->mag != NULL || cfg->use_dora) {
                if (m->mag == NULL || !cfg->use_dora) {
                    rc = lm_fail(err, LM_E_FORMAT, "IncompleteModule",
                                 m->mag ? "adapter has lora_magnitude_vector but use_dora is not set"
                                        : "use_dora is set but the adapter has no lora_magnitude_vector for this module");
                    lm_err_set_tensor(err, m->module);
                    goto done;
                }
                /* one magnitude per output feature (per embedding dimension for an Embedding) */
                if (m->mag->n_elems != B->shape[0]) {
                    rc = mismatch(err, m->module, "lora_magnitude_vector has %llu elements, expected %llu",
                                  (unsigned long long)m->mag->n_elems, (unsigned long long)B->shape[0]);
                    goto done;
                }
                lm_op *d = new_op(t, LM_OP_DORA, ai, op->module, m->mag, err);
                if (d == NULL) {
                    rc = LM_E_NOMEM;
                    goto done;
                }
                d->dora_axis = li[k].orient == 1 ? 1 : 0;
            }
            if (m->bbias != NULL) {
                snprintf(buf, sizeof buf, "%s.bias", m->module);
                lm_err local;
                lm_err_clear(&local);
                long bb = lm_resolve_base_name(P->model, buf, &local);
                if (bb < 0) {
                    rc = lm_fail(err, LM_E_MISMATCH, "NoMatchingTensor",
                                 "lora_bias is set but the base layer has no bias (no '%s')", buf);
                    lm_err_set_tensor(err, m->module);
                    goto done;
                }
                lm_plan_tensor *bt = tensor_for(P, bb);
                if (bt->base->info->n_elems != m->bbias->n_elems || m->bbias->n_elems != op->out) {
                    rc = mismatch(err, m->module, "lora_B.bias has %llu elements but the base bias has %llu",
                                  (unsigned long long)m->bbias->n_elems, (unsigned long long)bt->base->info->n_elems);
                    goto done;
                }
                lm_op *bo = new_op(bt, LM_OP_BIAS_ADD, ai, op->module, m->bbias, err);
                if (bo == NULL) {
                    rc = LM_E_NOMEM;
                    goto done;
                }
                bo->scale_f64 = op->scale_f64;
                bo->scale = op->scale;
            }
        }
        if (m->tt != NULL) {
            /* trainable tokens: rows of the embedding replaced (peft-merge.md §5.15) */
            const long *rows = NULL;
            size_t n_rows = 0;
            for (size_t q = 0; q < cfg->tt_modules.n; q++) {
                const char *key = cfg->tt_modules.v[q];
                size_t nk = strlen(key), nm = strlen(m->module);
                if (key[0] == '\0' || strcmp(key, m->module) == 0 ||
                    (nm > nk && m->module[nm - nk - 1] == '.' && strcmp(m->module + nm - nk, key) == 0)) {
                    rows = cfg->tt_indices[q];
                    n_rows = cfg->tt_n[q];
                    if (key[0] != '\0')
                        break;
                }
            }
            if (rows == NULL) {
                rc = lm_fail(err, LM_E_FORMAT, "MissingField",
                             "adapter has trainable_tokens_delta but trainable_token_indices names no indices for it");
                lm_err_set_tensor(err, m->module);
                goto done;
            }
            long bi = module_weight(P, m->module, err);
            if (bi < 0) {
                rc = err ? err->code : LM_E_MISMATCH;
                goto done;
            }
            lm_plan_tensor *t = tensor_for(P, bi);
            const lm_tensor_info *W = t->base->info;
            if (W->n_dims != 2 || m->tt->n_dims != 2 || m->tt->shape[0] != n_rows || m->tt->shape[1] != W->shape[1]) {
                rc = mismatch(err, m->module, "trainable_tokens_delta must be [%zu, %llu] for embedding '%s'", n_rows,
                              (unsigned long long)(W->n_dims == 2 ? W->shape[1] : 0), W->name);
                goto done;
            }
            for (size_t q = 0; q < n_rows; q++)
                if (rows[q] < 0 || (uint64_t)rows[q] >= W->shape[0]) {
                    rc = lm_fail(err, LM_E_MISMATCH, "IndexOutOfRange", "token index %ld is outside the vocabulary (%llu rows)",
                                 rows[q], (unsigned long long)W->shape[0]);
                    lm_err_set_tensor(err, m->module);
                    goto done;
                }
            lm_op *op = new_op(t, LM_OP_ROWS, ai, plan_str(p, m->module), m->tt, err);
            if (op == NULL) {
                rc = LM_E_NOMEM;
                goto done;
            }
            op->rows = rows;
            op->n_rows = n_rows;
        }
        if (m->ia3 != NULL && (rc = plan_ia3(P, ai, m, tm, err)) != LM_OK)
            goto done;
        if (is_lycoris(m) && (rc = plan_lycoris(P, ai, m, tm, err)) != LM_OK)
            goto done;
        if ((m->beft || m->ha || m->hb || m->hea || m->heb || m->vlb || m->vld) &&
            (rc = plan_single(P, ai, m, tm, vera_a, vera_b, err)) != LM_OK)
            goto done;
        if ((m->sw || m->si || m->hra || m->miss || m->oft || m->rt || m->ral || m->c3 || m->br || m->bsv) &&
            (rc = plan_structured(P, ai, m, tm, err)) != LM_OK)
            goto done;
        if (is_derived(m) && (rc = plan_derived(P, ai, m, tm, vb_bank, rl_a, rl_b, err)) != LM_OK)
            goto done;
    }
done:
    if (rc != LM_OK)
        lm_err_set_path(err, ad->weights_path);
    lm_target_matcher_free(tm);
    free(li);
    module_list_free(&mods);
    return rc;
}

static int cmp_data_order(const void *a, const void *b, void *ctx)
{
    const lm_model_entry *x = lm_model_tensor(ctx, *(const size_t *)a);
    const lm_model_entry *y = lm_model_tensor(ctx, *(const size_t *)b);
    if (x->file != y->file)
        return x->file < y->file ? -1 : 1;
    if (x->info->begin != y->info->begin)
        return x->info->begin < y->info->begin ? -1 : 1;
    return 0;
}

lm_plan *lm_plan_create(const lm_model *model, lm_adapter *const *adapters, size_t n_adapters,
                        const lm_plan_opts *opts, lm_err *err)
{
    static const lm_plan_opts no_opts = {0};
    lm_plan *p = calloc(1, sizeof *p);
    if (p == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    planner P = {model, p, adapters, n_adapters, opts ? opts : &no_opts, LM_DT_F32};
    size_t n = lm_model_n_tensors(model);
    p->n = n;
    p->t = calloc(n ? n : 1, sizeof *p->t);
    if (p->t == NULL)
        goto nomem;
    size_t count[LM_DT_COUNT] = {0};
    for (size_t i = 0; i < n; i++) {
        const lm_model_entry *e = lm_model_tensor(model, i);
        lm_plan_tensor *t = &p->t[i];
        if ((t->name = strdup(e->info->name)) == NULL)
            goto nomem;
        t->base = e;
        t->src_dtype = e->info->dtype;
        t->dtype = (P.opts->out_dtype_set && is_float_dtype(e->info->dtype)) ? P.opts->out_dtype : e->info->dtype;
        t->n_dims = e->info->n_dims;
        t->shape = e->info->shape;
        t->rows = e->info->n_dims ? e->info->shape[0] : 1;
        t->cols = t->rows ? e->info->n_elems / t->rows : 0;
        if (is_float_dtype(e->info->dtype))
            count[e->info->dtype] += e->info->n_elems;
    }
    for (int d = 0; d < LM_DT_COUNT; d++)
        if (count[d] > count[P.new_dtype])
            P.new_dtype = (lm_dtype)d;
    for (size_t ai = 0; ai < n_adapters; ai++)
        if (plan_adapter(&P, ai, err) != LM_OK)
            goto fail;
    /* base metadata (of the first file), kept as it is */
    if (lm_model_n_files(model) > 0) {
        const lm_st_file *f0 = lm_model_file(model, 0);
        p->n_meta = lm_st_n_metadata(f0);
        p->meta_keys = calloc(p->n_meta ? p->n_meta : 1, sizeof *p->meta_keys);
        p->meta_values = calloc(p->n_meta ? p->n_meta : 1, sizeof *p->meta_values);
        if (p->meta_keys == NULL || p->meta_values == NULL)
            goto nomem;
        for (size_t i = 0; i < p->n_meta; i++)
            lm_st_metadata(f0, i, &p->meta_keys[i], &p->meta_values[i]);
    }
    /* data layout: the base's own order, then the added tensors */
    p->data_order = malloc((p->n ? p->n : 1) * sizeof *p->data_order);
    if (p->data_order == NULL)
        goto nomem;
    for (size_t i = 0; i < p->n; i++)
        p->data_order[i] = i;
    qsort_r(p->data_order, n, sizeof *p->data_order, cmp_data_order, (void *)model);
    for (size_t i = 0; i < p->n; i++)
        if (p->t[i].n_ops > 0 || p->t[i].dtype != p->t[i].src_dtype)
            p->n_changed++;
    return p;
nomem:
    lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
fail:
    lm_plan_free(p);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* describing an adapter (lora-merge inspect ADAPTER_DIR)                                        */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    char leaf[96];
    char kind[96];
    long rank, r_cfg;
    double alpha, scale;
    int targeted;
    size_t count;
    char example[256];
} desc_group;

lm_code lm_plan_describe_modules(const lm_adapter *ad, char **text, lm_err *err)
{
    const lm_adapter_config *cfg = ad->cfg;
    module_list mods = {0};
    desc_group *g = NULL;
    size_t ng = 0, n_full = 0, n_skip = 0, cap = 1 << 16, used = 0;
    char *out = malloc(cap), buf[1024], full_names[512] = "";
    lm_code rc = LM_OK;
    if (out == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    out[0] = '\0';
    lm_target_rules rules;
    rules_from_config(cfg, &rules);
    size_t n_shared = 0;
    for (size_t i = 0; i < ad->ts->n; i++) {
        const char *rest = ad->ts->t[i].name;
        if (strcmp(rest, "base_model.vera_A") == 0 || strcmp(rest, "base_model.vera_B") == 0 ||
            strcmp(rest, "base_model.vblora_vector_bank") == 0 || strcmp(rest, "base_model.randlora_A") == 0 ||
            strcmp(rest, "base_model.randlora_B") == 0) {
            n_shared++;
            continue;
        }
        if (strncmp(rest, "base_model.model.", 17) == 0)
            rest += 17;
        else if (strncmp(rest, "base_model.", 11) == 0)
            rest += 11;
        key_role role = classify_key(rest, buf, sizeof buf);
        if (role == R_SKIP) {
            n_skip++;
            continue;
        }
        if (role == R_FULL) {
            size_t k = strlen(full_names);
            if (n_full < 6)
                snprintf(full_names + k, sizeof full_names - k, "%s%.200s", n_full ? ", " : "", buf);
            n_full++;
            continue;
        }
        lora_module *m = module_get(&mods, buf, err);
        if (m == NULL) {
            rc = LM_E_NOMEM;
            goto done;
        }
        const lm_ts_tensor **slot = module_slot(m, role);
        *slot = &ad->ts->t[i];
    }
    g = calloc(mods.n ? mods.n : 1, sizeof *g);
    if (g == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    for (size_t k = 0; k < mods.n; k++) {
        lora_module *m = &mods.v[k];
        desc_group d;
        memset(&d, 0, sizeof d);
        snprintf(d.leaf, sizeof d.leaf, "%s", leaf_of(m->module));
        const lm_ts_tensor *A = m->a ? m->a : m->ea;
        snprintf(d.kind, sizeof d.kind, "%s%s%s%s", m->ea ? "embedding lora" : A ? "lora" : "",
                 m->mag ? " + dora" : "", m->bbias ? " + lora_bias" : "", m->tt ? (A ? " + trainable tokens" : "trainable tokens") : "");
        int other = m->tt || m->ia3 || is_lycoris(m) || m->beft || m->ha || m->hb || m->hea || m->heb || m->vlb ||
                    m->vld || m->sw || m->si || m->hra || m->miss || m->oft || m->rt || m->ral || m->c3 || m->br ||
                    m->bsv ||
                    is_derived(m);
        if (m->rt || m->ral)
            snprintf(d.kind, sizeof d.kind, "road_%d (row-pair rotations, groups of %ld)", cfg->road_variant,
                     cfg->road_group);
        if (m->c3)
            snprintf(d.kind, sizeof d.kind, "c3a (block-circulant delta)");
        if (is_derived(m))
            snprintf(d.kind, sizeof d.kind, "%s",
                     m->fs ? "fourierft" : m->da ? "delora" : m->ga ? "gralora" : m->rl ? "randlora" : "vblora");
        if (m->sw || m->si)
            snprintf(d.kind, sizeof d.kind, "shira (sparse entries added)");
        if (m->hra)
            snprintf(d.kind, sizeof d.kind, "hra (W @ Householder reflections%s)", cfg->hra_gs ? ", Gram-Schmidt" : "");
        if (m->oft)
            snprintf(d.kind, sizeof d.kind, "oft (block rotations%s)", cfg->oft_neumann ? ", Cayley-Neumann" : ", Cayley");
        if (m->br || m->bsv)
            snprintf(d.kind, sizeof d.kind, "boft (block rotations, rows scaled)");
        if (m->miss)
            snprintf(d.kind, sizeof d.kind, "miss (%s block added)", cfg->miss_mini ? "mini" : "tiled");
        if (A == NULL && !other)
            snprintf(d.kind, sizeof d.kind, "incomplete (refused: %s without its pair)", m->b ? "lora_B" : "a part");
        if (m->beft)
            snprintf(d.kind, sizeof d.kind, "beft (bias added)");
        if (m->ha || m->hb || m->hea || m->heb)
            snprintf(d.kind, sizeof d.kind, "hira (W += W * B@A)");
        if (m->vlb || m->vld)
            snprintf(d.kind, sizeof d.kind, "vera (shared projections, per-layer lambdas)");
        if (is_lycoris(m))
            snprintf(d.kind, sizeof d.kind, "%s%s", m->h1a || m->h2a ? "loha" : "lokr",
                     m->ht || m->kt ? " (CP form: refused, not supported yet)" : "");
        if (m->ia3 != NULL)
            snprintf(d.kind, sizeof d.kind, "ia3 (%s features scaled)",
                     m->ia3->n_dims == 2 && m->ia3->shape[0] == 1 && m->ia3->n_elems > 1 ? "input, feed-forward" : "output");
        else if (cfg->kind == LM_PEFT_ADALORA && A != NULL)
            snprintf(d.kind, sizeof d.kind, "adalora (kept rank)");
        d.rank = A && A->n_dims >= 1 ? (long)A->shape[0] : m->h1a && m->h1a->n_dims == 2 ? (long)m->h1a->shape[1] : 0;
        d.r_cfg = cfg->kind == LM_PEFT_LORA || cfg->kind == LM_PEFT_LOHA || cfg->kind == LM_PEFT_LOKR ? cfg->r : d.rank;
        d.alpha = cfg->lora_alpha;
        long w = lm_pattern_lookup((const char *const *)cfg->rank_keys.v, cfg->rank_keys.n, m->module, NULL);
        if (w >= 0)
            d.r_cfg = cfg->rank_vals[w];
        w = lm_pattern_lookup((const char *const *)cfg->alpha_keys.v, cfg->alpha_keys.n, m->module, NULL);
        if (w >= 0)
            d.alpha = cfg->alpha_vals[w];
        if (cfg->kind == LM_PEFT_LOKR) /* no tensor shows the rank: the config's is the one used */
            d.rank = d.r_cfg;
        d.scale = cfg->use_rslora ? d.alpha / sqrt((double)d.r_cfg) : d.alpha / (double)d.r_cfg;
        if (cfg->kind == LM_PEFT_ADALORA)
            d.scale = (cfg->lora_alpha > 0 ? cfg->lora_alpha : (double)cfg->init_r) / ((double)cfg->init_r + 1e-5);
        d.targeted = lm_target_matches(&rules, m->module, NULL) == 1;
        size_t j;
        for (j = 0; j < ng; j++)
            if (!strcmp(g[j].leaf, d.leaf) && !strcmp(g[j].kind, d.kind) && g[j].rank == d.rank &&
                g[j].r_cfg == d.r_cfg && g[j].alpha == d.alpha && g[j].targeted == d.targeted)
                break;
        if (j == ng) {
            g[ng] = d;
            snprintf(g[ng].example, sizeof g[ng].example, "%s", m->module);
            ng++;
        }
        g[j].count++;
    }
#define OUT(...)                                                                                   \
    do {                                                                                           \
        if (used < cap)                                                                            \
            used += (size_t)snprintf(out + used, cap - used, __VA_ARGS__);                         \
    } while (0)
    OUT("modules: %zu in %zu group%s\n", mods.n, ng, ng == 1 ? "" : "s");
    for (size_t j = 0; j < ng; j++) {
        if (cfg->kind != LM_PEFT_LORA && cfg->kind != LM_PEFT_ADALORA && cfg->kind != LM_PEFT_LOHA &&
            cfg->kind != LM_PEFT_LOKR)
            OUT("  %-16s x%-4zu %s%s  (e.g. %s)\n", g[j].leaf, g[j].count, g[j].kind,
                g[j].targeted ? "" : "  NOT TARGETED by the config: skipped, as PEFT does", g[j].example);
        else
            OUT("  %-16s x%-4zu %s r=%ld alpha=%g scale=%g%s  (e.g. %s)\n", g[j].leaf, g[j].count, g[j].kind,
                g[j].rank, g[j].alpha, g[j].scale * 1.0,
                g[j].targeted ? "" : "  NOT TARGETED by the config: skipped, as PEFT does", g[j].example);
        if (g[j].rank != g[j].r_cfg && g[j].rank > 0 && cfg->kind != LM_PEFT_LOKR)
            OUT("    refused: the tensors have rank %ld but the config says r=%ld\n", g[j].rank, g[j].r_cfg);
    }
    if (n_full)
        OUT("full tensors (replace or add base tensors): %zu: %s%s\n", n_full, full_names, n_full > 6 ? ", ..." : "");
    if (n_shared)
        OUT("shared tensors: %zu (base_model.vera_A/B or base_model.vblora_vector_bank)\n", n_shared);
    if (n_skip)
        OUT("ignored keys: %zu\n", n_skip);
#undef OUT
done:
    free(g);
    module_list_free(&mods);
    if (rc != LM_OK) {
        free(out);
        return rc;
    }
    *text = out;
    return LM_OK;
}
