/* SPDX-License-Identifier: MIT */
/* plan.c : the planner (see plan.h).  Adapter keys -> modules -> the method's plan -> operations.
 * Nothing here names an adapter type: the methods' part tables say which tensor belongs to
 * which module, and the methods turn modules into operations through the lm_ctx_* calls. */
#include "plan.h"

#include "compat.h"
#include "lm_error.h"
#include "lm_kernels.h"
#include "lm_sys.h"
#include "peft_match.h"
#include "st_reader.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* the plan's own memory                                                                        */
/* ------------------------------------------------------------------------------------------ */
static int is_numeric_comp(const char *s, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i]))
            return 0;
    return 1;
}

static lm_code plan_vnote(lm_plan *p, const char *fmt, va_list ap)
{
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    char **n = realloc(p->notes, (p->n_notes + 1) * sizeof *n);
    if (n == NULL)
        return LM_E_NOMEM;
    p->notes = n;
    if ((p->notes[p->n_notes] = strdup(buf)) == NULL)
        return LM_E_NOMEM;
    p->n_notes++;
    return LM_OK;
}

lm_code plan_note(lm_plan *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    lm_code rc = plan_vnote(p, fmt, ap);
    va_end(ap);
    return rc;
}

/* n_bytes zeroed, freed with the plan */
static void *plan_alloc(lm_plan *p, size_t n_bytes)
{
    if (lm_grow((void **)&p->blobs, &p->cap_blobs, p->n_blobs, sizeof *p->blobs, 64) != 0)
        return NULL;
    void *b = calloc(1, n_bytes ? n_bytes : 1);
    if (b != NULL)
        p->blobs[p->n_blobs++] = b;
    return b;
}

void *lm_plan_blob(lm_plan *p, size_t n_bytes)
{
    return plan_alloc(p, n_bytes);
}

static const char *plan_str(lm_plan *p, const char *s)
{
    size_t n = strlen(s) + 1;
    char *c = plan_alloc(p, n);
    if (c != NULL)
        memcpy(c, s, n);
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
    for (size_t i = 0; i < p->n_blobs; i++)
        free(p->blobs[i]);
    free(p->blobs);
    free(p);
}

uint64_t lm_plan_tensor_bytes(const lm_plan_tensor *t)
{
    uint64_t n = 1;
    for (size_t d = 0; d < t->n_dims; d++)
        n *= t->shape[d];
    return n * lm_dtype_bits(t->dtype) / 8;
}

uint64_t lm_plan_out_bytes(const lm_plan *p)
{
    uint64_t total = 0;
    for (size_t i = 0; i < p->n; i++)
        total += lm_plan_tensor_bytes(&p->t[i]);
    return total;
}

uint64_t lm_plan_tile_rows(const lm_plan_tensor *t, uint64_t tile_elems)
{
    if (tile_elems == 0) /* 2^19: a bf16 tile is one 1 MiB pread and one pwrite, and each call has a
                          * fixed cost (2^18 made the 1b merge ~48 ms of CPU dearer, 2^17 ~130 ms);
                          * larger writes risk covering a whole aligned 2 MiB range, which gets a
                          * 2 MiB page-cache folio, often memory the VM's host has taken back (a
                          * host fault on each page as it is first written: 4 MiB writes cost ~5x) */
        tile_elems = (uint64_t)1 << 19;
    uint64_t tr = (t->cols == 0 || t->cols >= tile_elems) ? 1 : tile_elems / t->cols;
    if (tr > t->rows && t->rows > 0)
        tr = t->rows;
    for (size_t o = 0; o < t->n_ops; o++) { /* whole groups of rows that an op mixes (RoAd) */
        uint64_t g = t->ops[o].row_align;
        if (g > 1)
            tr = tr < g ? g : tr - tr % g;
    }
    if (t->sim_nf4 && t->cols % 64 != 0) { /* tiles start on an NF4 block (64 elements) */
        uint64_t g = 64;
        while (t->cols % g != 0)
            g /= 2;
        g = 64 / g;
        tr = tr < g ? g : tr - tr % g;
    }
    if (t->q != NULL && t->q->tile_rows > 1) /* whole blocks: each tile requantizes its own */
        tr = tr < t->q->tile_rows ? t->q->tile_rows : tr - tr % t->q->tile_rows;
    return tr;
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

/* a GPTQ/AWQ-style base stores "<module>.qweight" (packed int4 with qzeros, scales, g_idx) where
 * "<module>.weight" would be: say so (the fix is the unquantized original, as PEFT says) rather
 * than "no base tensor".  @return 1 when err was set */
static int packed_weight(const lm_model *model, const char *name, lm_err *err)
{
    static const char sfx[] = ".weight";
    size_t n = strlen(name), ns = sizeof sfx - 1;
    char want[1024];
    if (n <= ns || n - ns + 9 > sizeof want || strcmp(name + n - ns, sfx) != 0)
        return 0;
    snprintf(want, sizeof want, "%.*s.qweight", (int)(n - ns), name);
    for (size_t i = 0, nt = lm_model_n_tensors(model); i < nt; i++) {
        const char *T = lm_model_tensor(model, i)->info->name;
        if (strcmp(T, want) == 0 || suffix_match(T, want)) {
            lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization",
                    "base tensor '%s' is stored packed as '%s' (GPTQ/AWQ int4 with zeros and scales), which "
                    "lora-merge does not dequantize: merge into the unquantized original model (as PEFT does)",
                    name, T);
            return 1;
        }
    }
    return 0;
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
    size_t nn = strlen(name);
    if (nn > 7 && strcmp(name + nn - 7, ".weight") == 0 && nn + 8 < 1024) { /* compressed-tensors' packed weights */
        char packed[1024];
        snprintf(packed, sizeof packed, "%s_packed", name);
        lm_err quiet;
        lm_err_clear(&quiet);
        long k = lm_resolve_base_name(model, packed, &quiet);
        if (k >= 0)
            return k;
    }
    if (packed_weight(model, name, err))
        return -1;
    lm_fail(err, LM_E_MISMATCH, "NoMatchingTensor", "no base tensor '%s' (nor under another prefix)", name);
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* adapter keys -> modules                                                                      */
/* ------------------------------------------------------------------------------------------ */
typedef enum { KEY_PART, KEY_FULL, KEY_SKIP } key_kind;

typedef struct {
    key_kind kind;
    const lm_method *method; /* KEY_PART */
    int slot;                /* KEY_PART */
} key_class;

/* the part `name` in the adapter's own method first, then in any method */
static const lm_part *find_part(const lm_method *own, const char *name, size_t n, const lm_method **which)
{
    const lm_part *p = own != NULL ? lm_method_part(own, name, n) : NULL;
    if (p != NULL) {
        *which = own;
        return p;
    }
    for (size_t i = 0; i < lm_method_count(); i++)
        if ((p = lm_method_part(lm_method_at(i), name, n)) != NULL) {
            *which = lm_method_at(i);
            return p;
        }
    return NULL;
}

/* Splits an adapter key (prefix "base_model.model." already removed) into a part and the module
 * path (or, for a full tensor, the tensor name), dropping ".base_layer" components.  The part is
 * the last component (or pair of components, "glora_A.Xd") that some method declares; after it
 * may come the adapter's name and/or
 * "weight" ("bias" for a part with a bias slot). */
static key_class classify_key(const lm_method *own, const char *rest, char *out, size_t cap)
{
    key_class kc = {KEY_SKIP, NULL, -1};
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
    size_t span = 1; /* components the part's name takes: 2 for "glora_A.Xd", "osf_svd_params.U_low" */
    const lm_part *part = NULL;
    const lm_method *pm = NULL;
    for (long i = (long)n - 1; i >= 0 && j < 0; i--) {
        if ((size_t)i + 1 < n && (part = find_part(own, comps[i], lens[i] + 1 + lens[i + 1], &pm)) != NULL)
            j = i, span = 2;
        else if ((part = find_part(own, comps[i], lens[i], &pm)) != NULL)
            j = i;
    }
    size_t end = j >= 0 ? (size_t)j : n;
    for (size_t i = 0; i < end; i++)
        if (IS(i, "modules_to_save") || IS(i, "original_module"))
            return kc;
    size_t used = 0;
    out[0] = '\0';
    /* "base_layer"s right before a part are kept: they nest wrappers of several parameters of one
     * module (LoRA target_parameters: "experts.base_layer.lora_A" is another parameter than
     * "experts.lora_A") */
    size_t nest = end;
    while (j >= 0 && nest > 0 && IS(nest - 1, "base_layer"))
        nest--;
    for (size_t i = 0; i < end; i++) {
        if (i < nest && (IS(i, "base_layer") || IS(i, "token_adapter") || IS(i, "ln_tuning_layers")))
            continue;
        int k = snprintf(out + used, cap - used, "%s%.*s", used ? "." : "", (int)lens[i], comps[i]);
        if (k < 0 || (size_t)k >= cap - used)
            return kc;
        used += (size_t)k;
    }
    if (j < 0) {
        kc.kind = KEY_FULL;
        return kc;
    }
    size_t tail = n - (size_t)j - span; /* components after the part */
    int index = 0;
    size_t pn = strlen(part->name);
    if (pn > 2 && strcmp(part->name + pn - 2, ".#") == 0) { /* "<part>.<k>...": k decimal, below n_index */
        if (tail == 0 || lens[j + 1] == 0 || lens[j + 1] > 6)
            return kc;
        for (size_t q = 0; q < lens[j + 1]; q++)
            if (!isdigit((unsigned char)comps[j + 1][q]))
                return kc;
        index = atoi(comps[j + 1]);
        if ((unsigned)index >= pm->n_index || (lens[j + 1] > 1 && comps[j + 1][0] == '0'))
            return kc;
        tail--;
    }
    size_t last = n - 1;
    int last_weight = IS(last, "weight"), last_bias = IS(last, "bias");
#undef IS
    kc.method = pm;
    if (tail >= 1 && tail <= 2 && last_bias && part->bias_slot >= 0) {
        kc.kind = KEY_PART;
        kc.slot = part->bias_slot;
        return kc;
    }
    /* a part with max_tail 2 and a ".weight" form ("lora_A.default.weight") needs "weight" last
     * when two components follow; max_tail < 0 means any two */
    int ok = part->max_tail >= 2 ? (tail <= 1 || last_weight) : part->max_tail < 0 ? tail <= 2 : tail <= 1;
    if (!ok)
        return kc;
    kc.kind = KEY_PART;
    kc.slot = part->slot + index;
    return kc;
}

typedef struct {
    lm_module *v;
    char **keys; /* "path\n<method index>" */
    size_t n, cap;
    st_strmap map;
} module_list;

static const char *module_key_of(const void *ctx, size_t i) { return ((const module_list *)ctx)->keys[i]; }

static void module_list_free(module_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].path);
        free(l->keys[i]);
    }
    free(l->v);
    free(l->keys);
    st_strmap_free(&l->map);
}

static size_t method_index(const lm_method *m)
{
    for (size_t i = 0; i < lm_method_count(); i++)
        if (lm_method_at(i) == m)
            return i;
    return 0;
}

/* the module (path, method), created on first use.  O(1) per lookup (160k tiny tensors must
 * not cost a quadratic scan) */
static lm_module *module_get(module_list *l, size_t n_max, const char *path, const lm_method *m, lm_err *err)
{
    char key[1100];
    snprintf(key, sizeof key, "%s\n%zu", path, method_index(m));
    if (l->map.slots == NULL && st_strmap_init(&l->map, n_max ? n_max : 1) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    size_t at = st_strmap_find(&l->map, key, module_key_of, l);
    if (at != SIZE_MAX)
        return &l->v[at];
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        lm_module *v = realloc(l->v, cap * sizeof *v);
        if (v != NULL)
            l->v = v;
        char **k = realloc(l->keys, cap * sizeof *k);
        if (k != NULL)
            l->keys = k;
        if (v == NULL || k == NULL) {
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            return NULL;
        }
        l->cap = cap;
    }
    lm_module *mod = &l->v[l->n];
    memset(mod, 0, sizeof *mod);
    mod->method = m;
    if ((mod->path = strdup(path)) == NULL || (l->keys[l->n] = strdup(key)) == NULL) {
        free(mod->path);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    st_strmap_insert(&l->map, key, l->n, module_key_of, l);
    l->n++;
    return mod;
}

/* the method's shared (adapter-level) tensor `rest` (after "base_model."), or NULL */
static int is_shared_name(const lm_method *m, const char *rest)
{
    for (const char *const *s = m->shared; s != NULL && *s != NULL; s++) {
        size_t n = strlen(*s);
        if (n > 2 && strcmp(*s + n - 2, ".#") == 0) { /* numbered: "<name>.<k>", k decimal */
            const char *k = rest + n - 1;
            if (strncmp(*s, rest, n - 1) != 0 || *k == '\0' || (k[0] == '0' && k[1] != '\0') ||
                strspn(k, "0123456789") != strlen(k) || strlen(k) > 6)
                continue;
            return 1;
        }
        if (n > 2 && strcmp(*s + n - 2, ".*") == 0) { /* "<name>.<any one component>" (FRoD's per-category
                                                          frod_V.<category>) */
            const char *k = rest + n - 1;
            if (strncmp(*s, rest, n - 1) == 0 && *k != '\0' && strchr(k, '.') == NULL)
                return 1;
            continue;
        }
        if (strcmp(*s, rest) == 0)
            return 1;
    }
    return 0;
}

/* the number k of a shared numbered tensor "<prefix>.<k>" (rest after "base_model."), or -1 */
static long shared_number(const char *rest)
{
    const char *dot = strrchr(rest, '.');
    return dot != NULL && dot[1] != '\0' && strspn(dot + 1, "0123456789") == strlen(dot + 1) ? atol(dot + 1) : -1;
}

/* 1 when `rest` (after "base_model.") may be an adapter-level tensor: one component, a numbered
 * "<prefix>.<k>", or a two-component name some type declares ("frod_V.<category>") */
static int shared_candidate(const char *rest)
{
    const char *dot = strchr(rest, '.');
    if (dot == NULL)
        return 1;
    if (strncmp(rest, "model.", 6) == 0 || dot != strrchr(rest, '.'))
        return 0;
    if (shared_number(rest) >= 0)
        return 1;
    for (size_t k = 0; k < lm_method_count(); k++)
        if (is_shared_name(lm_method_at(k), rest))
            return 1;
    return 0;
}

/* Groups the adapter's tensors: shared ones into ctx, full tensors to `full`, parts into
 * modules.  n_bare counts keys without the "base_model.model." prefix. */
typedef struct {
    const lm_ts_tensor *t;
    char name[1024];
} full_tensor;

/* ------------------------------------------------------------------------------------------ */
/* planning context (what methods see)                                                          */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    const lm_model *model;
    lm_plan *plan;
    lm_adapter *const *adapters;
    size_t n_adapters;
    const lm_plan_opts *opts;
    lm_dtype new_dtype; /* dtype of tensors the adapters add */
    const lm_tensor_info **views; /* [model tensors]: what the methods see of a quantized weight, or NULL */
} planner;

struct lm_plan_ctx {
    planner *P;
    size_t ai;
    const lm_adapter *ad;
    const char **shared_names;   /* owned arrays (the names point into the adapter's tensors) */
    const lm_ts_tensor **shared;
    size_t n_shared, cap_shared;
    const char *last_module; /* plan copy of the last module string handed out */
    lm_pattern_set *rank_pat, *alpha_pat; /* the config's patterns, compiled once (owned) */
    const lm_target_matcher *tm;          /* the config's target rules */
};

const lm_adapter *lm_ctx_adapter(const lm_plan_ctx *ctx) { return ctx->ad; }
size_t lm_ctx_adapter_index(const lm_plan_ctx *ctx) { return ctx->ai; }

const lm_ts_tensor *lm_ctx_shared(const lm_plan_ctx *ctx, const char *name)
{
    for (size_t i = 0; i < ctx->n_shared; i++)
        if (strcmp(ctx->shared_names[i], name) == 0)
            return ctx->shared[i];
    return NULL;
}

size_t lm_ctx_n_base(const lm_plan_ctx *ctx) { return lm_model_n_tensors(ctx->P->model); }

const char *lm_ctx_model_type(const lm_plan_ctx *ctx) { return ctx->P->opts->model_type; }

int lm_ctx_targets(lm_plan_ctx *ctx, const char *module, lm_err *err)
{
    int t = lm_target_matcher_test(ctx->tm, module, err);
    if (t < 0)
        lm_err_set_path(err, ctx->ad->config_path);
    return t;
}

const lm_tensor_info *lm_ctx_base(const lm_plan_ctx *ctx, long i)
{
    if (ctx->P->views != NULL && ctx->P->views[i] != NULL)
        return ctx->P->views[i];
    return lm_model_tensor(ctx->P->model, (size_t)i)->info;
}

/* n_bytes of base file f at offset off (from the start of its file) into dst, for tensor `tensor`
 * (declared in plan.h) */
lm_code lm_base_pread(const lm_st_file *f, uint64_t off, void *dst, uint64_t n_bytes, const char *tensor, lm_err *err)
{
    for (uint64_t got = 0; got < n_bytes;) {
        const ssize_t k = lm_sys_pread(lm_st_fd(f), (uint8_t *)dst + got, (size_t)(n_bytes - got), (off_t)(off + got));
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) { /* k 0: its header said more, the file was cut while the merge read it */
            if (k == 0)
                lm_fail(err, LM_E_IO, "InputChanged", "the file ends before tensor '%s' does: it was truncated "
                        "while the merge read it; nothing was written", tensor);
            else
                lm_fail_errno(err, errno, "cannot read tensor '%s'", tensor);
            lm_err_set_path(err, lm_st_path(f));
            return LM_E_IO;
        }
        got += (uint64_t)k;
    }
    return LM_OK;
}

lm_code lm_ctx_base_f64(lm_plan_ctx *ctx, long i, double *out, lm_err *err)
{
    const lm_model_entry *e = lm_model_tensor(ctx->P->model, (size_t)i);
    const lm_tensor_info *t = e->info;
    lm_dtype dt = t->dtype;
    if ((ctx->P->views != NULL && ctx->P->views[i] != NULL) ||
        !(dt == LM_DT_BF16 || dt == LM_DT_F16 || dt == LM_DT_F32 || dt == LM_DT_F64)) {
        lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "the merge needs this weight's values while planning, "
                "which lora-merge reads from BF16, F16, F32 and F64 tensors only (this one is %s%s)",
                lm_dtype_name(dt), ctx->P->views != NULL && ctx->P->views[i] != NULL ? ", quantized" : "");
        lm_err_set_tensor(err, t->name);
        return LM_E_UNSUPPORTED;
    }
    const lm_st_file *f = lm_model_file(ctx->P->model, e->file);
    size_t esz = lm_dtype_bits(dt) / 8, n = (size_t)t->n_elems;
    uint8_t *raw = malloc(n * esz + 1);
    if (raw == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if (lm_st_fd(f) < 0) {
        memcpy(raw, lm_st_data(f) + t->begin, n * esz);
    } else if (lm_base_pread(f, lm_st_data_offset(f) + t->begin, raw, n * esz, t->name, err) != LM_OK) {
        free(raw);
        return LM_E_IO;
    }
    for (size_t k = 0; k < n; k++) {
        const uint8_t *p = raw + k * esz;
        if (dt == LM_DT_F64) {
            memcpy(&out[k], p, 8);
        } else if (dt == LM_DT_F32) {
            float v;
            memcpy(&v, p, 4);
            out[k] = v;
        } else {
            uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
            float v;
            if (dt == LM_DT_BF16) {
                uint32_t u = (uint32_t)h << 16;
                memcpy(&v, &u, 4);
            } else {
                lm_f16_to_f32_ref(&h, &v, 1);
            }
            out[k] = v;
        }
    }
    free(raw);
    return LM_OK;
}

long lm_ctx_module_bias(lm_plan_ctx *ctx, const char *module)
{
    char buf[1100];
    snprintf(buf, sizeof buf, "%s.bias", module);
    return lm_resolve_base_name(ctx->P->model, buf, NULL);
}

long lm_ctx_base_named(lm_plan_ctx *ctx, const char *name, lm_err *err)
{
    long bi = lm_resolve_base_name(ctx->P->model, name, err);
    return bi >= 0 ? bi : -1;
}

long lm_ctx_base_exact(const lm_plan_ctx *ctx, const char *name)
{
    size_t idx;
    return lm_model_find(ctx->P->model, name, &idx) != NULL ? (long)idx : -1;
}

long lm_ctx_module_weight(lm_plan_ctx *ctx, const char *module, lm_err *err)
{
    char buf[1100];
    snprintf(buf, sizeof buf, "%s.weight", module);
    lm_err local;
    lm_err_clear(&local);
    long bi = lm_resolve_base_name(ctx->P->model, buf, &local);
    if (bi < 0) {
        *err = local;
        lm_err_set_tensor(err, module);
        return -1;
    }
    return bi;
}

long lm_ctx_weight_for(lm_plan_ctx *ctx, const char *module, uint64_t out, uint64_t in, int *orient, lm_err *err)
{
    long bi = lm_ctx_module_weight(ctx, module, err);
    if (bi < 0)
        return -1;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    int o = -2;
    if (W->n_dims == 2 && W->shape[0] == out && W->shape[1] == in)
        o = out == in ? lm_is_gpt2_conv1d(module) : 0;
    else if (W->n_dims == 2 && W->shape[0] == in && W->shape[1] == out)
        o = 1;
    if (o < 0) {
        lm_mismatch(err, module, "base '%s' does not have the shape [%llu, %llu] the adapter needs", W->name,
                    (unsigned long long)out, (unsigned long long)in);
        return -1;
    }
    *orient = o;
    return bi;
}

long lm_ctx_input_embedding(lm_plan_ctx *ctx)
{
    static const char *const names[] = {"embed_tokens.weight", "wte.weight", "shared.weight",
                                        "word_embeddings.weight", "embed_in.weight"};
    const lm_model *model = ctx->P->model;
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

lm_code lm_ctx_rank_alpha(lm_plan_ctx *ctx, const char *module, long *r, double *alpha, lm_err *err)
{
    const lm_adapter_config *cfg = ctx->ad->cfg;
    *r = cfg->r;
    *alpha = cfg->lora_alpha;
    if ((cfg->rank_keys.n && ctx->rank_pat == NULL &&
         (ctx->rank_pat = lm_pattern_set_create((const char *const *)cfg->rank_keys.v, cfg->rank_keys.n, err)) == NULL) ||
        (cfg->alpha_keys.n && ctx->alpha_pat == NULL &&
         (ctx->alpha_pat = lm_pattern_set_create((const char *const *)cfg->alpha_keys.v, cfg->alpha_keys.n, err)) == NULL)) {
        lm_err_set_path(err, ctx->ad->config_path);
        return err->code;
    }
    long w = lm_pattern_set_lookup(ctx->rank_pat, module, err);
    if (w == -2) {
        lm_err_set_path(err, ctx->ad->config_path);
        return err->code;
    }
    if (w >= 0)
        *r = cfg->rank_vals[w];
    w = lm_pattern_set_lookup(ctx->alpha_pat, module, err);
    if (w == -2) {
        lm_err_set_path(err, ctx->ad->config_path);
        return err->code;
    }
    if (w >= 0)
        *alpha = cfg->alpha_vals[w];
    return LM_OK;
}

lm_op *lm_ctx_add_op(lm_plan_ctx *ctx, long base, lm_op_kind kind, const char *name, const char *module,
                     lm_err *err)
{
    lm_plan *p = ctx->P->plan;
    lm_plan_tensor *t = &p->t[base];
    if (ctx->last_module == NULL || strcmp(ctx->last_module, module) != 0)
        ctx->last_module = plan_str(p, module);
    if (ctx->last_module == NULL ||
        lm_grow((void **)&t->ops, &t->cap_ops, t->n_ops, sizeof *t->ops, 4) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    lm_op *op = &t->ops[t->n_ops++];
    if (kind == LM_OP_REPLACE) { /* the replacement comes first: later deltas apply to it */
        memmove(&t->ops[1], &t->ops[0], (t->n_ops - 1) * sizeof *op);
        op = &t->ops[0];
    }
    memset(op, 0, sizeof *op);
    op->kind = kind;
    op->method = ctx->ad->cfg->method;
    op->name = name;
    op->adapter = ctx->ai;
    op->module = ctx->last_module;
    return op;
}

long lm_ctx_weight_2d(lm_plan_ctx *ctx, const char *module, lm_err *err)
{
    long bi = lm_ctx_module_weight(ctx, module, err);
    if (bi < 0)
        return -1;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (W->n_dims != 2) {
        lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "%s on a %zu-D weight ('%s') is not supported yet",
                ctx->ad->cfg->peft_type, W->n_dims, W->name);
        lm_err_set_tensor(err, module);
        return -1;
    }
    return bi;
}

lm_op *lm_ctx_add_delta(lm_plan_ctx *ctx, long base, lm_op_kind kind, const char *name, const char *module,
                        uint64_t rank, uint64_t in, uint64_t out, int transposed, double scale, size_t params_bytes,
                        lm_err *err)
{
    lm_op *op = lm_ctx_add_op(ctx, base, kind, name, module, err);
    if (op == NULL || lm_ctx_params(ctx, op, params_bytes, err) == NULL)
        return NULL;
    op->rank = rank;
    op->in = in;
    op->out = out;
    op->axis = transposed != 0;
    op->scale = scale * ctx->ad->weight;
    op->flops = 2.0 * (double)rank * (double)in * (double)out;
    lm_ctx_count_module(ctx);
    return op;
}

int lm_ctx_view_rows(lm_plan_ctx *ctx, long base, uint64_t rows, lm_err *err)
{
    lm_plan_tensor *t = &ctx->P->plan->t[base];
    uint64_t n = t->rows * t->cols;
    if (rows == t->rows)
        return 0;
    int others = 0;
    for (size_t o = 0; o < t->n_ops; o++)
        others += t->ops[o].kind != LM_OP_REPLACE;
    if (rows == 0 || n % rows != 0 || others > 0) {
        lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "'%s' cannot be tiled as %llu rows%s", t->name,
                (unsigned long long)rows, others ? " (another adapter changes it as a whole)" : "");
        return -1;
    }
    t->rows = rows;
    t->cols = n / rows;
    return 0;
}

void *lm_ctx_params(lm_plan_ctx *ctx, lm_op *op, size_t n_bytes, lm_err *err)
{
    op->params = plan_alloc(ctx->P->plan, n_bytes);
    if (op->params == NULL)
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return op->params;
}

void *lm_ctx_alloc(lm_plan_ctx *ctx, size_t n_bytes, lm_err *err)
{
    void *b = plan_alloc(ctx->P->plan, n_bytes);
    if (b == NULL)
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return b;
}

void lm_ctx_count_module(lm_plan_ctx *ctx) { ctx->P->plan->n_lowrank++; }

lm_code lm_ctx_note(lm_plan_ctx *ctx, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    lm_code rc = plan_vnote(ctx->P->plan, fmt, ap);
    va_end(ap);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* full tensors: modules_to_save, bias="all", saved embeddings, LN tuning                       */
/* ------------------------------------------------------------------------------------------ */
/* a saved embedding or output head with another number of rows than the base's (tokens added
 * or removed when training): 2-D, the same width, a name transformers gives these layers */
static int is_resized_vocabulary(const lm_tensor_info *bt, const lm_ts_tensor *src)
{
    static const char *const leaves[] = {"embed_tokens", "wte", "word_embeddings", "embed_in", "shared", "lm_head",
                                         "embed_out", "output", "tok_embeddings"};
    if (bt->n_dims != 2 || src->n_dims != 2 || bt->shape[1] != src->shape[1] || src->shape[0] == 0)
        return 0;
    const char *dot = strrchr(bt->name, '.');
    if (dot == NULL || strcmp(dot, ".weight") != 0)
        return 0;
    size_t end = (size_t)(dot - bt->name), b = end;
    while (b > 0 && bt->name[b - 1] != '.')
        b--;
    for (size_t i = 0; i < sizeof leaves / sizeof *leaves; i++)
        if (strlen(leaves[i]) == end - b && strncmp(bt->name + b, leaves[i], end - b) == 0)
            return 1;
    return 0;
}

static lm_code plan_replace(lm_plan_ctx *ctx, const lm_ts_tensor *src, const char *name, lm_err *err)
{
    planner *P = ctx->P;
    lm_plan *p = P->plan;
    lm_err local;
    lm_err_clear(&local);
    long bi = lm_resolve_base_name(P->model, name, &local);
    if (bi == -2) {
        *err = local;
        lm_err_set_tensor(err, src->name);
        return LM_E_MISMATCH;
    }
    if (!lm_is_float_dtype(src->dtype))
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "adapter tensor '%s' has dtype %s (expected a float type)",
                       src->name, lm_dtype_name(src->dtype));
    if (bi < 0) { /* a tensor the base does not have: added to the output */
        if (lm_grow((void **)&p->t, &p->cap, p->n, sizeof *p->t, 64) != 0)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
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
        lm_op *op = lm_ctx_add_op(ctx, (long)(p->n - 1), LM_OP_REPLACE, "replace", name, err);
        if (op == NULL)
            return LM_E_NOMEM;
        op->src = src;
        p->n_new++;
        return plan_note(p, "added tensor %s %s from the adapter (no such tensor in the base)", name,
                         lm_dtype_name(t->dtype));
    }
    lm_plan_tensor *t = &p->t[bi];
    const lm_tensor_info *bt = t->base->info;
    int same = bt->n_dims == src->n_dims;
    for (size_t d = 0; same && d < bt->n_dims; d++)
        same = bt->shape[d] == src->shape[d];
    int resized = !same && is_resized_vocabulary(bt, src);
    if (!same && !resized) {
        char s1[96], s2[96];
        lm_shape_str(s1, sizeof s1, src->n_dims, src->shape);
        lm_shape_str(s2, sizeof s2, bt->n_dims, bt->shape);
        return lm_mismatch(err, src->name, "replacement tensor has shape %s but base tensor '%s' has %s "
                           "(only an embedding or output head may change its number of rows)", s1, bt->name, s2);
    }
    if (!lm_is_float_dtype(bt->dtype))
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "base tensor '%s' is %s: only float tensors can be replaced",
                       bt->name, lm_dtype_name(bt->dtype));
    for (size_t k = 0; k < t->n_ops; k++)
        if (t->ops[k].kind == LM_OP_REPLACE)
            return lm_fail(err, LM_E_MISMATCH, "Conflict", "two adapters replace base tensor '%s'", bt->name);
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_REPLACE, "replace", name, err);
    if (op == NULL)
        return LM_E_NOMEM;
    op->src = src;
    t->src_dtype = src->dtype;
    p->n_replaced++;
    if (resized) { /* the output takes the saved tensor's shape (the merge checks the vocabulary agrees) */
        t->shape = src->shape;
        t->rows = src->shape[0];
        return plan_note(p, "%s resized from %llu to %llu rows by the adapter's saved %s (added tokens)", bt->name,
                         (unsigned long long)bt->shape[0], (unsigned long long)src->shape[0], src->name);
    }
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* one adapter                                                                                  */
/* ------------------------------------------------------------------------------------------ */
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

/* the "<module>.<part>" spelling of the module's first part, for messages */
static const char *first_part_name(const lm_module *m)
{
    for (size_t i = 0; i < m->method->n_parts; i++)
        if (m->part[m->method->parts[i].slot] != NULL)
            return m->method->parts[i].name;
    return "?";
}

/* modules_to_save in every form PEFT has saved it: "<module>.<param>" (today), and
 * "<module>.modules_to_save.<param>" or "<module>.modules_to_save.<adapter name>.<param>" (older
 * releases).  @return 1 with the full tensor name "<module>.<param>" in out, 2 for a saved copy of
 * the base's own module ("<module>.original_module.<param>"), 0 for any other key */
static int saved_module_key(const char *rest, const char *adapter_name, char *out, size_t cap)
{
    static const char *const markers[2] = {".modules_to_save.", ".original_module."};
    for (int k = 0; k < 2; k++) {
        const char *m = strstr(rest, markers[k]);
        if (m == NULL)
            continue;
        if (k == 1)
            return 2;
        const char *param = m + strlen(markers[k]);
        size_t an = strlen(adapter_name);
        if (an > 0 && strncmp(param, adapter_name, an) == 0 && param[an] == '.')
            param += an + 1; /* the adapter's name ("default"), as the oldest releases kept it */
        int n = snprintf(out, cap, "%.*s.%s", (int)(m - rest), rest, param);
        return n > 0 && (size_t)n < cap ? 1 : 0;
    }
    return 0;
}

/* an adapter tensor that lands nowhere is an error: its training would be silently lost */
static lm_code unused_tensor(const lm_adapter *ad, const lm_ts_tensor *t, const char *why, lm_err *err)
{
    lm_fail(err, LM_E_FORMAT, "UnusedTensor", "adapter tensor '%s' %s: merging without it would lose what it holds",
            t->name, why);
    lm_err_set_path(err, ad->weights_path);
    return LM_E_FORMAT;
}

/* Groups the adapter's tensors into modules; full tensors are planned as replacements here. */
static lm_code group_tensors(lm_plan_ctx *ctx, module_list *mods, lm_err *err)
{
    const lm_adapter *ad = ctx->ad;
    const lm_method *own = ad->cfg->method;
    lm_plan *p = ctx->P->plan;
    char buf[1024];
    size_t n_bare = 0;
    for (size_t i = 0; i < ad->ts->n; i++) {
        const lm_ts_tensor *t = &ad->ts->t[i];
        const char *rest = t->name;
        if (strncmp(rest, "base_model.", 11) == 0 && shared_candidate(rest + 11)) {
            int mine = is_shared_name(own, rest + 11), known = mine;
            for (size_t k = 0; k < lm_method_count() && !known; k++)
                known = is_shared_name(lm_method_at(k), rest + 11);
            if (mine) { /* shared by every layer (vera_A ...) */
                if (ctx->n_shared == ctx->cap_shared) {
                    size_t cap = ctx->cap_shared ? 2 * ctx->cap_shared : 8;
                    const char **nn = realloc(ctx->shared_names, cap * sizeof *nn);
                    if (nn != NULL)
                        ctx->shared_names = nn;
                    const lm_ts_tensor **ns = realloc(ctx->shared, cap * sizeof *ns);
                    if (ns != NULL)
                        ctx->shared = ns;
                    if (nn == NULL || ns == NULL)
                        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
                    ctx->cap_shared = cap;
                }
                ctx->shared_names[ctx->n_shared] = rest + 11;
                ctx->shared[ctx->n_shared++] = t;
                ad->ts->t[i].shared = 1; /* every module's prepare reads it: keep it mapped */
                continue;
            }
            if (known)
                return unused_tensor(ad, t, "belongs to another adapter type", err);
        }
        if (strncmp(rest, "base_model.model.", 17) == 0) {
            rest += 17;
        } else {
            if (strncmp(rest, "base_model.", 11) == 0)
                rest += 11;
            n_bare++;
        }
        int saved = saved_module_key(rest, ad->name, buf, sizeof buf);
        if (saved == 2) { /* PEFT's untouched copy of the base module: the base already has it */
            if (plan_note(p, "%s: %s is a copy of the base's own module (original_module); not needed", ad->dir,
                          t->name) != LM_OK)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            continue;
        }
        key_class kc = saved == 1 ? (key_class){KEY_FULL, NULL, -1} : classify_key(own, rest, buf, sizeof buf);
        if (kc.kind == KEY_SKIP)
            return unused_tensor(ad, t, "is no part of any adapter type lora-merge knows, and no base tensor", err);
        if (kc.kind == KEY_FULL) {
            lm_code rc = plan_replace(ctx, t, buf, err);
            if (rc != LM_OK) {
                lm_err_set_path(err, ad->weights_path);
                return rc;
            }
            continue;
        }
        if (kc.method != own && !(kc.method->flags & LM_M_PARTS_ANYWHERE)) {
            lm_fail(err, LM_E_FORMAT, "ForeignPart", "'%s' is a %s tensor, but this is a %s adapter", t->name,
                    kc.method->peft_type, own->peft_type);
            lm_err_set_tensor(err, buf);
            lm_err_set_path(err, ad->weights_path);
            return LM_E_FORMAT;
        }
        lm_module *m = module_get(mods, ad->ts->n, buf, kc.method, err);
        if (m == NULL)
            return LM_E_NOMEM;
        if (m->part[kc.slot] != NULL) {
            lm_fail(err, LM_E_FORMAT, "DuplicateKey", "adapter holds two tensors for the same part ('%s' and '%s')",
                    m->part[kc.slot]->name, t->name);
            lm_err_set_tensor(err, m->path);
            lm_err_set_path(err, ad->weights_path);
            return LM_E_FORMAT;
        }
        m->part[kc.slot] = t;
    }
    if (n_bare > 0 && plan_note(p, "%s: %zu adapter keys lack the 'base_model.model.' prefix; merged anyway "
                                   "(PEFT would not load them)", ad->dir, n_bare) != LM_OK)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return LM_OK;
}

/* Plans the modules of method `m` (the adapter's own, or a type whose parts go anywhere). */
static lm_code plan_method_modules(lm_plan_ctx *ctx, const lm_method *m, const module_list *mods,
                                   const lm_target_matcher *tm, lm_err *err)
{
    const lm_adapter *ad = ctx->ad;
    const lm_module **sel = malloc((mods->n ? mods->n : 1) * sizeof *sel);
    size_t n_sel = 0;
    lm_code rc = LM_OK;
    if (sel == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t k = 0; k < mods->n; k++) {
        const lm_module *mod = &mods->v[k];
        if (mod->method != m)
            continue;
        /* trainable tokens name their modules in trainable_token_indices, not target_modules */
        if (!(m->flags & LM_M_PARTS_ANYWHERE)) {
            int targeted = lm_target_matcher_test(tm, mod->path, err);
            if (targeted == 0 && m->claims_module != NULL)
                targeted = m->claims_module(ctx, ad->cfg, mod);
            if (targeted < 0) {
                lm_err_set_path(err, ad->config_path);
                rc = err->code;
                goto done;
            }
            if (!targeted) {
                if ((rc = plan_note(ctx->P->plan, "%s: module %s is in the file but not targeted by "
                                                  "adapter_config.json; skipped, as PEFT does", ad->dir, mod->path)) != LM_OK)
                    goto done;
                continue;
            }
        }
        sel[n_sel++] = mod;
    }
    if (m->plan_adapter != NULL) {
        rc = m->plan_adapter(ctx, sel, n_sel, err);
    } else {
        for (size_t k = 0; k < n_sel && rc == LM_OK; k++)
            rc = m->plan_module(ctx, sel[k], err);
    }
    if (rc == LM_OK && m->plan_adapter == NULL && m->plan_module == NULL && n_sel > 0)
        rc = lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", sel[0]->path, "%s tensor '%s' means nothing to %s",
                            m->peft_type, first_part_name(sel[0]), m->peft_type);
done:
    free(sel);
    return rc;
}

static lm_code plan_adapter(planner *P, size_t ai, lm_err *err)
{
    lm_adapter *ad = P->adapters[ai];
    module_list mods;
    memset(&mods, 0, sizeof mods);
    lm_plan_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.P = P;
    ctx.ai = ai;
    ctx.ad = ad;
    const lm_method *own = ad->cfg->method;
    if ((own->flags & LM_M_UNIT_WEIGHT) && ad->weight != 1.0) {
        lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "a %s adapter is not a delta (it rotates, scales or replaces "
                "weights): a weight other than 1 (--scale, --adapter-scaled) has no meaning for it", own->peft_type);
        lm_err_set_path(err, ad->config_path);
        return LM_E_UNSUPPORTED;
    }
    lm_target_rules rules;
    rules_from_config(ad->cfg, &rules);
    lm_target_matcher *tm = lm_target_matcher_create(&rules, err);
    if (tm == NULL) {
        lm_err_set_path(err, ad->config_path);
        return err->code;
    }
    ctx.tm = tm;
    lm_code rc = group_tensors(&ctx, &mods, err);
    /* the adapter's own type first, then types whose parts may come along (trainable tokens) */
    if (rc == LM_OK)
        rc = plan_method_modules(&ctx, ad->cfg->method, &mods, tm, err);
    for (size_t i = 0; i < lm_method_count() && rc == LM_OK; i++) {
        const lm_method *m = lm_method_at(i);
        if (m != ad->cfg->method && (m->flags & LM_M_PARTS_ANYWHERE))
            rc = plan_method_modules(&ctx, m, &mods, tm, err);
    }
    if (rc != LM_OK)
        lm_err_set_path(err, ad->weights_path);
    lm_target_matcher_free(tm);
    lm_pattern_set_free(ctx.rank_pat);
    lm_pattern_set_free(ctx.alpha_pat);
    free(ctx.shared_names);
    free(ctx.shared);
    module_list_free(&mods);
    return rc;
}

/* checks that need every adapter's ops on a tensor: conversions and the column norms */
static lm_code check_tensors(const lm_plan *p, lm_err *err)
{
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        int copy = (t->n_ops == 0 || (t->n_ops == 1 && t->ops[0].kind == LM_OP_REPLACE)) && t->dtype == t->src_dtype;
        if (!copy && t->q == NULL && t->scale_of == 0 &&
            (!lm_is_float_dtype(t->dtype) || !lm_is_float_dtype(t->src_dtype))) {
            lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "cannot convert %s to %s", lm_dtype_name(t->src_dtype),
                    lm_dtype_name(t->dtype));
            lm_err_set_tensor(err, t->name);
            return LM_E_UNSUPPORTED;
        }
        size_t n_col_norm = 0;
        for (size_t o = 0; o < t->n_ops; o++)
            n_col_norm += t->ops[o].kind == LM_OP_NORM && t->ops[o].axis == 1;
        if (n_col_norm > 1) {
            lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "several DoRA adapters on one Conv1D/Embedding tensor");
            lm_err_set_tensor(err, t->name);
            return LM_E_UNSUPPORTED;
        }
    }
    return LM_OK;
}

/* a quantized base's weight that planning cannot read fails with "no base tensor" or "is I8: only
 * float weights": say why.  Either config.json names a quantization lora-merge knows of but does
 * not read (hqq, quanto, eetq, torchao ...: LM_Q_OTHER, the tensors decide), or its skip list
 * (modules_to_not_convert, ignore ...) names the module of a weight stored quantized */
static void name_unread_quant(const lm_qscheme *s, lm_err *e)
{
    static const char *const read[] = {"bitsandbytes", "compressed-tensors", "modelopt", "gptq", "awq"};
    if (s == NULL || s->method[0] == '\0' ||
        (strcmp(e->kind, "NoMatchingTensor") != 0 && strcmp(e->kind, "UnsupportedDType") != 0))
        return;
    char msg[2 * sizeof e->msg], w[sizeof e->tensor + 8];
    snprintf(w, sizeof w, "%s.weight", e->tensor); /* e->tensor: the module */
    int known = 0;
    for (size_t i = 0; i < sizeof read / sizeof *read; i++)
        known |= strcmp(s->method, read[i]) == 0; /* read from their tensors (gptq/awq: packed_weight says so) */
    if (strcmp(e->kind, "UnsupportedDType") == 0 && lm_plan_quant_skips(s, w))
        snprintf(msg, sizeof msg, "config.json's quantization_config (%s) lists this module as left unquantized, but "
                 "its weight is stored quantized: the checkpoint contradicts its config (%s)", s->method, e->msg);
    else if (s->fmt == LM_Q_OTHER && !known)
        snprintf(msg, sizeof msg, "the base is quantized with quant_method '%s' (config.json), which lora-merge does "
                 "not dequantize: merge into the unquantized original model (%s)", s->method, e->msg);
    else
        return;
    size_t n = strlen(msg) < sizeof e->msg ? strlen(msg) : sizeof e->msg - 1; /* the one line, cut if need be */
    memcpy(e->msg, msg, n);
    e->msg[n] = '\0';
    snprintf(e->kind, sizeof e->kind, "UnsupportedQuantization");
    e->code = LM_E_UNSUPPORTED;
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
    lm_err local;
    lm_err_clear(&local);
    lm_plan *p = calloc(1, sizeof *p);
    if (p == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    planner P = {model, p, adapters, n_adapters, opts ? opts : &no_opts, LM_DT_F32, NULL};
    size_t n = lm_model_n_tensors(model);
    p->n = n;
    p->cap = n ? n : 1;
    p->t = calloc(p->cap, sizeof *p->t);
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
        t->dtype = (P.opts->out_dtype_set && lm_is_float_dtype(e->info->dtype)) ? P.opts->out_dtype : e->info->dtype;
        t->n_dims = e->info->n_dims;
        t->shape = e->info->shape;
        t->rows = e->info->n_dims ? e->info->shape[0] : 1;
        t->cols = t->rows ? e->info->n_elems / t->rows : 0;
        if (lm_is_float_dtype(e->info->dtype))
            count[e->info->dtype] += e->info->n_elems;
    }
    for (int d = 0; d < LM_DT_COUNT; d++)
        if (count[d] > count[P.new_dtype])
            P.new_dtype = (lm_dtype)d;
    if ((P.views = calloc(n + 1, sizeof *P.views)) == NULL)
        goto nomem;
    if (lm_plan_quant_attach(p, model, P.opts->quant, P.opts, P.views, &local) != LM_OK)
        goto fail;
    for (size_t ai = 0; ai < n_adapters; ai++)
        if (plan_adapter(&P, ai, &local) != LM_OK)
            goto fail;
    if (check_tensors(p, &local) != LM_OK)
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
    if (lm_plan_quant_finish(p, &local) != LM_OK)
        goto fail;
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        if (t->n_ops > 0 || t->dtype != t->src_dtype)
            p->n_changed++;
        for (size_t o = 0; o < t->n_ops; o++)
            p->lowrank_flops += t->ops[o].flops;
    }
    free(P.views);
    return p;
nomem:
    lm_fail(&local, LM_E_NOMEM, NULL, "out of memory");
fail:
    name_unread_quant(P.opts->quant, &local);
    if (err != NULL)
        *err = local;
    free(P.views);
    lm_plan_free(p);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* describing an adapter (lora-merge inspect ADAPTER_DIR)                                        */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    char leaf[96];
    char kind[256];
    int targeted;
    size_t count;
    char example[256];
} desc_group;

lm_code lm_plan_describe_modules(const lm_adapter *ad, char **text, lm_err *err)
{
    const lm_adapter_config *cfg = ad->cfg;
    const lm_method *own = cfg->method;
    module_list mods;
    memset(&mods, 0, sizeof mods);
    desc_group *g = NULL;
    size_t ng = 0, n_full = 0, n_skip = 0, n_shared = 0, cap = 1 << 16, used = 0;
    char *out = malloc(cap), buf[1024], full_names[512] = "";
    lm_code rc = LM_OK;
    if (out == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    out[0] = '\0';
    lm_target_rules rules;
    rules_from_config(cfg, &rules);
    for (size_t i = 0; i < ad->ts->n; i++) {
        const char *rest = ad->ts->t[i].name;
        if (strncmp(rest, "base_model.", 11) == 0 && is_shared_name(own, rest + 11)) {
            n_shared++;
            continue;
        }
        if (strncmp(rest, "base_model.model.", 17) == 0)
            rest += 17;
        else if (strncmp(rest, "base_model.", 11) == 0)
            rest += 11;
        key_class kc = classify_key(own, rest, buf, sizeof buf);
        if (kc.kind == KEY_SKIP) {
            n_skip++;
            continue;
        }
        if (kc.kind == KEY_FULL) {
            size_t k = strlen(full_names);
            if (n_full < 6)
                snprintf(full_names + k, sizeof full_names - k, "%s%.200s", n_full ? ", " : "", buf);
            n_full++;
            continue;
        }
        lm_module *m = module_get(&mods, ad->ts->n, buf, kc.method, err);
        if (m == NULL) {
            rc = LM_E_NOMEM;
            goto done;
        }
        m->part[kc.slot] = &ad->ts->t[i];
    }
    g = calloc(mods.n ? mods.n : 1, sizeof *g);
    if (g == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    for (size_t k = 0; k < mods.n; k++) {
        const lm_module *m = &mods.v[k];
        desc_group d;
        memset(&d, 0, sizeof d);
        snprintf(d.leaf, sizeof d.leaf, "%s", lm_leaf_of(m->path));
        if (m->method != own && !(m->method->flags & LM_M_PARTS_ANYWHERE))
            snprintf(d.kind, sizeof d.kind, "%s tensors (refused: this is a %s adapter)", m->method->peft_type,
                     own->peft_type);
        else if (m->method->describe != NULL)
            m->method->describe(cfg, m, d.kind, sizeof d.kind);
        else
            snprintf(d.kind, sizeof d.kind, "%s", m->method->summary);
        d.targeted = (m->method->flags & LM_M_PARTS_ANYWHERE) || lm_target_matches(&rules, m->path, NULL) == 1 ||
                     (m->method->claims_module != NULL && m->method->claims_module(NULL, cfg, m));
        size_t j;
        for (j = 0; j < ng; j++)
            if (!strcmp(g[j].leaf, d.leaf) && !strcmp(g[j].kind, d.kind) && g[j].targeted == d.targeted)
                break;
        if (j == ng) {
            g[ng] = d;
            snprintf(g[ng].example, sizeof g[ng].example, "%s", m->path);
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
    for (size_t j = 0; j < ng; j++)
        OUT("  %-16s x%-4zu %s%s  (e.g. %s)\n", g[j].leaf, g[j].count, g[j].kind,
            g[j].targeted ? "" : "  NOT TARGETED by the config: skipped, as PEFT does", g[j].example);
    if (n_full)
        OUT("full tensors (replace or add base tensors): %zu: %s%s\n", n_full, full_names, n_full > 6 ? ", ..." : "");
    if (n_shared)
        OUT("shared tensors: %zu (used by every layer)\n", n_shared);
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
