/* SPDX-License-Identifier: MIT */
/* adapter_formats.c : the core of the foreign-adapter path (see adapter_formats.h): detection,
 * the base index (module paths, dotted suffixes, kohya's flattened names), name resolution with
 * the component rules and the key-drift table, shape checks, and the PEFT config and tensor set
 * the modules become.  The readers for each format family live in formats_*.c. */
#include "formats_internal.h"

#include "compat.h"
#include "lm_error.h"
#include "peft_match.h"
#include "st_reader.h"
#include "st_writer.h"
#include "torch_bin.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */
int fm_is_file(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

int fm_is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

char *fm_join(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p != NULL)
        snprintf(p, n, "%s%s%s", a, (a[0] && a[strlen(a) - 1] == '/') ? "" : "/", b);
    return p;
}

int fm_ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && memcmp(s + n - k, suffix, k) == 0;
}

int fm_starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

int fm_is_float(lm_dtype dt)
{
    return dt == LM_DT_F32 || dt == LM_DT_F16 || dt == LM_DT_BF16 || dt == LM_DT_F64;
}

static double half_to_double(uint16_t h)
{
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(m + 1024, e - 25);
    return (h & 0x8000) ? -v : v;
}

double fm_get(const lm_ts_tensor *t, uint64_t i)
{
    const uint8_t *p = t->data;
    switch (t->dtype) {
    case LM_DT_F32: {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    case LM_DT_F64: {
        double d;
        memcpy(&d, p + 8 * i, 8);
        return d;
    }
    case LM_DT_F16:
        return half_to_double(lm_load_le16(p + 2 * i));
    case LM_DT_BF16: {
        uint32_t u = (uint32_t)lm_load_le16(p + 2 * i) << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    default:
        return 0;
    }
}

lm_code fm_scalar(const lm_ts_tensor *t, double *v, lm_err *err)
{
    if (t->n_elems != 1)
        return lm_fail(err, LM_E_FORMAT, "InvalidAlpha", "tensor '%s' should hold one number but has %llu elements",
                       t->name, (unsigned long long)t->n_elems);
    const uint8_t *p = t->data;
    if (fm_is_float(t->dtype))
        *v = fm_get(t, 0);
    else if (t->dtype == LM_DT_I64 || t->dtype == LM_DT_U64)
        *v = t->dtype == LM_DT_I64 ? (double)(int64_t)lm_load_le64(p) : (double)lm_load_le64(p);
    else if (t->dtype == LM_DT_I32 || t->dtype == LM_DT_U32)
        *v = t->dtype == LM_DT_I32 ? (double)(int32_t)lm_load_le32(p) : (double)lm_load_le32(p);
    else if (t->dtype == LM_DT_I16 || t->dtype == LM_DT_U16)
        *v = t->dtype == LM_DT_I16 ? (double)(int16_t)lm_load_le16(p) : (double)lm_load_le16(p);
    else if (t->dtype == LM_DT_I8 || t->dtype == LM_DT_U8 || t->dtype == LM_DT_BOOL)
        *v = t->dtype == LM_DT_I8 ? (double)(int8_t)p[0] : (double)p[0];
    else
        return lm_fail(err, LM_E_FORMAT, "InvalidAlpha", "tensor '%s' is %s, not a number", t->name,
                       lm_dtype_name(t->dtype));
    if (!isfinite(*v))
        return lm_fail(err, LM_E_FORMAT, "NonFinite", "tensor '%s' holds a non-finite value", t->name);
    return LM_OK;
}

lm_code fm_note(fm_ctx *c, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (lm_grow((void **)&c->notes, &c->cap_notes, c->n_notes, sizeof *c->notes, 8) != 0 ||
        (c->notes[c->n_notes] = strdup(buf)) == NULL)
        return LM_E_NOMEM;
    c->n_notes++;
    return LM_OK;
}

fm_module *fm_add(fm_ctx *c, fm_type type, const char *src, const char *group, const char *name,
                  fm_name_kind kind, lm_err *err)
{
    if (lm_grow((void **)&c->m, &c->cap, c->n, sizeof *c->m, 64) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    fm_module *m = &c->m[c->n];
    memset(m, 0, sizeof *m);
    m->src = strdup(src);
    m->group = group ? strdup(group) : NULL;
    m->name = strdup(name);
    if (m->src == NULL || m->name == NULL || (group && m->group == NULL)) {
        free(m->src);
        free(m->group);
        free(m->name);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    m->name_kind = kind;
    m->type = type;
    c->n++;
    return m;
}

lm_code fm_part_add(fm_module *m, const char *suffix, const lm_ts_tensor *t, lm_err *err)
{
    for (size_t i = 0; i < m->n_parts; i++)
        if (strcmp(m->part[i].suffix, suffix) == 0)
            return lm_fail(err, LM_E_FORMAT, "DuplicateKey", "module '%s' has two %s tensors ('%s' and '%s')", m->src,
                           suffix, m->part[i].t->name, t->name);
    if (m->n_parts == FM_MAX_PARTS)
        return lm_fail(err, LM_E_FORMAT, "InvalidModule", "module '%s' has too many tensors", m->src);
    m->part[m->n_parts].suffix = suffix;
    m->part[m->n_parts].t = t;
    m->n_parts++;
    return LM_OK;
}

const lm_ts_tensor *fm_part_get(const fm_module *m, const char *suffix)
{
    for (size_t i = 0; i < m->n_parts; i++)
        if (strcmp(m->part[i].suffix, suffix) == 0)
            return m->part[i].t;
    return NULL;
}

static void fm_part_set(fm_module *m, const char *suffix, const lm_ts_tensor *t)
{
    for (size_t i = 0; i < m->n_parts; i++)
        if (strcmp(m->part[i].suffix, suffix) == 0)
            m->part[i].t = t;
}

lm_code fm_keep(fm_ctx *c, lm_tensor_set *ts, lm_err *err)
{
    if (lm_grow((void **)&c->keep, &c->cap_keep, c->n_keep, sizeof *c->keep, 4) != 0) {
        lm_ts_free(ts);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    c->keep[c->n_keep++] = ts;
    return LM_OK;
}

const lm_ts_tensor *fm_made(fm_ctx *c, lm_dtype dtype, size_t n_dims, const uint64_t *shape, void *data,
                            lm_err *err)
{
    char name[48];
    snprintf(name, sizeof name, "made:%zu", c->n_made++);
    size_t before = c->own->n_owned;
    if (lm_ts_add(c->own, name, dtype, n_dims, shape, data, 1, err) != LM_OK) {
        if (c->own->n_owned == before)
            free(data);
        return NULL;
    }
    return &c->own->t[c->own->n - 1];
}

const lm_ts_tensor *fm_reshaped(fm_ctx *c, const lm_ts_tensor *t, size_t n_dims, const uint64_t *shape,
                                lm_err *err)
{
    char name[48];
    snprintf(name, sizeof name, "made:%zu", c->n_made++);
    if (lm_ts_add(c->own, name, t->dtype, n_dims, shape, t->data, 0, err) != LM_OK)
        return NULL;
    return &c->own->t[c->own->n - 1];
}

const lm_ts_tensor *fm_transposed(fm_ctx *c, const lm_ts_tensor *t, lm_err *err)
{
    if (t->n_dims != 2) {
        lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "tensor '%s' is not a matrix", t->name);
        return NULL;
    }
    uint64_t rows = t->shape[0], cols = t->shape[1], es = lm_dtype_bits(t->dtype) / 8;
    uint8_t *d = malloc(t->n_bytes ? (size_t)t->n_bytes : 1);
    if (d == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    const uint8_t *s = t->data;
    for (uint64_t i = 0; i < rows; i++)
        for (uint64_t j = 0; j < cols; j++)
            memcpy(d + (j * rows + i) * es, s + (i * cols + j) * es, (size_t)es);
    uint64_t shape[2] = {cols, rows};
    return fm_made(c, t->dtype, 2, shape, d, err);
}

char *fm_read_text(const char *path, size_t max_bytes, lm_err *err)
{
    size_t n = 0;
    int why;
    char *buf = lm_read_small_file(path, max_bytes, &n, &why, err);
    if (buf == NULL && why != LM_READ_ERROR)
        lm_fail(err, LM_E_FORMAT, "InvalidConfig", "cannot read the file, or it is larger than expected");
    if (buf == NULL)
        lm_err_set_path(err, path);
    return buf;
}

const char *fm_st_meta(const lm_tensor_set *ts, const char *key)
{
    if (ts->st == NULL)
        return NULL;
    for (size_t i = 0; i < lm_st_n_metadata(ts->st); i++) {
        const char *k, *v;
        lm_st_metadata(ts->st, i, &k, &v);
        if (strcmp(k, key) == 0)
            return v;
    }
    return NULL;
}

/* PEFT computes s = alpha / r in double: find the alpha that gives exactly s */
lm_code fm_alpha_for_scale(double s, long r, double *alpha, lm_err *err)
{
    double a = s * (double)r;
    if (!isfinite(a) || r <= 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidScale", "scale %g cannot be expressed as alpha / r (r = %ld)", s, r);
    for (int k = 0; k < 64; k++) {
        if (a / (double)r == s) {
            *alpha = a;
            return LM_OK;
        }
        a = (a / (double)r < s) ? nextafter(a, INFINITY) : nextafter(a, -INFINITY);
    }
    return lm_fail(err, LM_E_UNSUPPORTED, "InexactScale",
                   "scale %.17g has no exact alpha / %ld in double precision", s, r);
}

/* ------------------------------------------------------------------------------------------ */
/* a string -> long hash map (open addressing; -2 marks "several")                             */
/* ------------------------------------------------------------------------------------------ */
struct fm_map {
    char **key; /* owned */
    long *val;
    size_t cap, n;
};

static uint64_t fm_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static void map_free(fm_map *m)
{
    if (m == NULL)
        return;
    for (size_t i = 0; i < m->cap; i++)
        free(m->key[i]);
    free(m->key);
    free(m->val);
    free(m);
}

static fm_map *map_create(size_t expect)
{
    fm_map *m = calloc(1, sizeof *m);
    size_t cap = 64;
    while (cap < expect * 2 + 16)
        cap *= 2;
    if (m == NULL || (m->key = calloc(cap, sizeof *m->key)) == NULL || (m->val = calloc(cap, sizeof *m->val)) == NULL) {
        if (m)
            free(m->key);
        free(m);
        return NULL;
    }
    m->cap = cap;
    return m;
}

static size_t map_slot(const fm_map *m, const char *k)
{
    size_t i = (size_t)(fm_hash(k) & (m->cap - 1));
    while (m->key[i] != NULL && strcmp(m->key[i], k) != 0)
        i = (i + 1) & (m->cap - 1);
    return i;
}

static long map_get(const fm_map *m, const char *k)
{
    size_t i = map_slot(m, k);
    return m->key[i] ? m->val[i] : -1;
}

/* several different values for one key become -2; @return 0 or -1 (out of memory) */
static int map_put(fm_map *m, const char *k, long v)
{
    if (2 * (m->n + 1) > m->cap) {
        fm_map bigger = {0};
        bigger.cap = m->cap * 2;
        bigger.key = calloc(bigger.cap, sizeof *bigger.key);
        bigger.val = calloc(bigger.cap, sizeof *bigger.val);
        if (bigger.key == NULL || bigger.val == NULL) {
            free(bigger.key);
            free(bigger.val);
            return -1;
        }
        for (size_t i = 0; i < m->cap; i++)
            if (m->key[i]) {
                size_t j = map_slot(&bigger, m->key[i]);
                bigger.key[j] = m->key[i];
                bigger.val[j] = m->val[i];
            }
        free(m->key);
        free(m->val);
        m->key = bigger.key;
        m->val = bigger.val;
        m->cap = bigger.cap;
    }
    size_t i = map_slot(m, k);
    if (m->key[i] != NULL) {
        if (m->val[i] != v)
            m->val[i] = -2;
        return 0;
    }
    if ((m->key[i] = strdup(k)) == NULL)
        return -1;
    m->val[i] = v;
    m->n++;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* the base                                                                                     */
/* ------------------------------------------------------------------------------------------ */
static void base_free(fm_base *b)
{
    if (b == NULL)
        return;
    for (size_t i = 0; i < b->n; i++)
        free(b->mod[i]);
    free(b->mod);
    map_free(b->exact);
    map_free(b->suffix);
    map_free(b->flat);
    map_free(b->flat_suffix);
    cJSON_Delete(b->config);
    free(b->dir);
    free(b);
}

static void flatten(char *s)
{
    for (; *s; s++)
        if (*s == '.')
            *s = '_';
}

/* the directory of the base (the base itself when it is one) */
static char *base_dir_of(const lm_model *model)
{
    const char *p = lm_model_index_path(model);
    if (p == NULL)
        p = lm_st_path(lm_model_file(model, 0));
    const char *slash = strrchr(p, '/');
    if (slash == NULL)
        return strdup(".");
    return strndup(p, (size_t)(slash - p) ? (size_t)(slash - p) : 1);
}

static lm_code base_build(const lm_model *model, fm_base **out, lm_err *err)
{
    fm_base *b = calloc(1, sizeof *b);
    size_t n = lm_model_n_tensors(model);
    if (b == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    b->model = model;
    b->n = n;
    b->mod = calloc(n ? n : 1, sizeof *b->mod);
    b->exact = map_create(n);
    b->suffix = map_create(4 * n);
    b->flat = map_create(n);
    b->flat_suffix = map_create(4 * n);
    if (b->mod == NULL || !b->exact || !b->suffix || !b->flat || !b->flat_suffix)
        goto nomem;
    for (size_t i = 0; i < n; i++) {
        const char *name = lm_model_tensor(model, i)->info->name;
        /* a module is what holds a weight; other tensors (biases, norms' weights too) count by name */
        if (!fm_ends_with(name, ".weight"))
            continue;
        char *mod = strndup(name, strlen(name) - 7);
        if (mod == NULL)
            goto nomem;
        b->mod[i] = mod;
        if (map_put(b->exact, mod, (long)i) != 0)
            goto nomem;
        char *fl = strdup(mod);
        if (fl == NULL)
            goto nomem;
        flatten(fl);
        int bad = map_put(b->flat, fl, (long)i) != 0;
        for (const char *p = mod; !bad && (p = strchr(p, '.')) != NULL;) {
            p++;
            bad = map_put(b->suffix, p, (long)i) != 0 || map_put(b->flat_suffix, fl + (p - mod), (long)i) != 0;
        }
        free(fl);
        if (bad)
            goto nomem;
    }
    b->dir = base_dir_of(model);
    char *cfg = b->dir ? fm_join(b->dir, "config.json") : NULL;
    if (cfg != NULL && fm_is_file(cfg)) {
        lm_err ignore;
        lm_err_clear(&ignore);
        char *text = fm_read_text(cfg, (size_t)16 << 20, &ignore);
        if (text != NULL)
            b->config = cJSON_Parse(text);
        free(text);
    }
    free(cfg);
    *out = b;
    return LM_OK;
nomem:
    base_free(b);
    return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
}

long fm_base_weight(const fm_base *b, const char *module)
{
    return map_get(b->exact, module);
}

const lm_tensor_info *fm_base_info(const fm_base *b, long idx)
{
    return lm_model_tensor(b->model, (size_t)idx)->info;
}

int fm_base_has_bias(const fm_base *b, const char *module)
{
    char buf[1100];
    snprintf(buf, sizeof buf, "%s.bias", module);
    return lm_model_find(b->model, buf, NULL) != NULL;
}

static const cJSON *config_field(const fm_base *b, const char *key)
{
    if (b == NULL || b->config == NULL)
        return NULL;
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(b->config, key);
    if (f == NULL) {
        const cJSON *tc = cJSON_GetObjectItemCaseSensitive(b->config, "text_config");
        if (cJSON_IsObject(tc))
            f = cJSON_GetObjectItemCaseSensitive(tc, key);
    }
    return f;
}

int fm_base_config_int(const fm_base *b, const char *key, long *out)
{
    const cJSON *f = config_field(b, key);
    if (!cJSON_IsNumber(f) || f->valuedouble != floor(f->valuedouble) || fabs(f->valuedouble) > 1e15)
        return 0;
    *out = (long)f->valuedouble;
    return 1;
}

const char *fm_base_config_str(const fm_base *b, const char *key)
{
    const cJSON *f = config_field(b, key);
    if (cJSON_IsArray(f))
        f = cJSON_GetArrayItem(f, 0);
    return cJSON_IsString(f) ? f->valuestring : NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* key drift between transformers versions                                                      */
/* ------------------------------------------------------------------------------------------ */
/* Both directions of each pair are tried (an adapter older or newer than the base).  The first
 * ones are transformers' _checkpoint_conversion_mapping of the VLMs refactored in 4.52 (LLaVA
 * family, Qwen2-VL / 2.5-VL, Gemma 3, Mllama, Idefics3 ...). */
static const struct {
    const char *old_prefix, *new_prefix;
} DRIFT[] = {
    {"language_model.model.", "model.language_model."},
    {"language_model.lm_head.", "lm_head."},
    {"vision_tower.", "model.vision_tower."},
    {"multi_modal_projector.", "model.multi_modal_projector."},
    {"visual.", "model.visual."},
    {"vision_model.", "model.vision_model."},
    {"model.", "model.language_model."},
};

/* the renamed spellings of module path p (with a trailing '.'), in cands (malloc'd) */
static size_t drift_candidates(const char *p, char **cands, size_t cap, size_t *rule)
{
    size_t n = 0, np = strlen(p);
    for (size_t i = 0; i < LM_ARRAY_LEN(DRIFT) && n < cap; i++)
        for (int dir = 0; dir < 2 && n < cap; dir++) {
            const char *from = dir ? DRIFT[i].new_prefix : DRIFT[i].old_prefix;
            const char *to = dir ? DRIFT[i].old_prefix : DRIFT[i].new_prefix;
            size_t nf = strlen(from), nt = strlen(to);
            if (np < nf || memcmp(p, from, nf) != 0)
                continue;
            char *c = malloc(np - nf + nt + 1);
            if (c == NULL)
                continue;
            memcpy(c, to, nt);
            memcpy(c + nt, p + nf, np - nf + 1);
            rule[n] = 2 * i + (size_t)dir;
            cands[n++] = c;
        }
    return n;
}

static void drift_rule_text(size_t rule, char *buf, size_t cap)
{
    size_t i = rule / 2;
    int dir = (int)(rule % 2);
    snprintf(buf, cap, "%s* -> %s*", dir ? DRIFT[i].new_prefix : DRIFT[i].old_prefix,
             dir ? DRIFT[i].old_prefix : DRIFT[i].new_prefix);
}

/* For a path (module, or a full tensor name when tensor = 1) absent from the base: the one
 * renamed spelling the base has.  @return 1 renamed (*out malloc'd, *rule), 0 none, -1 error. */
static int drift_resolve(const fm_base *b, const char *path, int tensor, char **out, size_t *rule, lm_err *err)
{
    char with_dot[1100], *cands[2 * LM_ARRAY_LEN(DRIFT)];
    size_t rules[2 * LM_ARRAY_LEN(DRIFT)];
    snprintf(with_dot, sizeof with_dot, "%s.", path);
    size_t n = drift_candidates(with_dot, cands, LM_ARRAY_LEN(cands), rules);
    int found = -1, rc = 0;
    for (size_t i = 0; i < n; i++) {
        cands[i][strlen(cands[i]) - 1] = '\0';
        int exists = tensor ? lm_model_find(b->model, cands[i], NULL) != NULL : fm_base_weight(b, cands[i]) >= 0;
        if (!exists)
            continue;
        if (found >= 0 && strcmp(cands[found], cands[i]) != 0) {
            lm_fail(err, LM_E_MISMATCH, "AmbiguousModule",
                    "'%s' is not in the base, and two known renames both fit: '%s' and '%s'", path, cands[found],
                    cands[i]);
            rc = -1;
            break;
        }
        found = (int)i;
    }
    if (rc == 0 && found >= 0) {
        *out = cands[found];
        *rule = rules[found];
        cands[found] = NULL;
        rc = 1;
    }
    for (size_t i = 0; i < n; i++)
        free(cands[i]);
    return rc;
}

typedef struct {
    size_t rule, count;
    char example[300];
} drift_tally;

static void tally_add(drift_tally *t, size_t *n_t, size_t rule, const char *from, const char *to)
{
    for (size_t i = 0; i < *n_t; i++)
        if (t[i].rule == rule) {
            t[i].count++;
            return;
        }
    if (*n_t >= 2 * LM_ARRAY_LEN(DRIFT))
        return;
    t[*n_t].rule = rule;
    t[*n_t].count = 1;
    snprintf(t[*n_t].example, sizeof t[*n_t].example, "%s -> %s", from, to);
    (*n_t)++;
}

static lm_code tally_notes(const drift_tally *t, size_t n_t, char ***notes, size_t *n_notes)
{
    for (size_t i = 0; i < n_t; i++) {
        char rule[160], line[700];
        drift_rule_text(t[i].rule, rule, sizeof rule);
        snprintf(line, sizeof line,
                 "key drift: %zu name%s renamed %s to match the base (the adapter and the base come from different "
                 "transformers versions), e.g. %s", t[i].count, t[i].count == 1 ? "" : "s", rule, t[i].example);
        char **nn = realloc(*notes, (*n_notes + 1) * sizeof *nn);
        if (nn == NULL)
            return LM_E_NOMEM;
        *notes = nn;
        if ((nn[*n_notes] = strdup(line)) == NULL)
            return LM_E_NOMEM;
        (*n_notes)++;
    }
    return LM_OK;
}

lm_code lm_formats_key_drift(lm_tensor_set *ts, const lm_model *model, char ***notes, size_t *n_notes, lm_err *err)
{
    fm_base *b = NULL;
    lm_code rc = base_build(model, &b, err);
    if (rc != LM_OK)
        return rc;
    drift_tally tally[2 * LM_ARRAY_LEN(DRIFT)];
    size_t n_tally = 0;
    for (size_t i = 0; i < ts->n && rc == LM_OK; i++) {
        const char *name = ts->t[i].name;
        if (!fm_starts_with(name, "base_model.model."))
            continue;
        const char *rest = name + 17;
        if (lm_model_find(model, rest, NULL) != NULL)
            continue;
        /* the module is some leading part of the key: if any leading part is in the base, there is
         * nothing to rename */
        char buf[1100];
        snprintf(buf, sizeof buf, "%s", rest);
        int present = 0;
        for (char *dot = strrchr(buf, '.'); dot != NULL && !present; dot = strrchr(buf, '.')) {
            *dot = '\0';
            present = fm_base_weight(b, buf) >= 0;
        }
        if (present)
            continue;
        /* longest leading part first: the whole key as a tensor, then each module prefix */
        snprintf(buf, sizeof buf, "%s", rest);
        char *renamed = NULL;
        size_t rule = 0;
        int r = drift_resolve(b, buf, 1, &renamed, &rule, err);
        size_t keep_len = strlen(buf);
        for (char *dot = strrchr(buf, '.'); r == 0 && dot != NULL; dot = strrchr(buf, '.')) {
            *dot = '\0';
            keep_len = strlen(buf);
            r = drift_resolve(b, buf, 0, &renamed, &rule, err);
        }
        if (r < 0) {
            lm_err_set_tensor(err, name);
            rc = LM_E_MISMATCH;
            break;
        }
        if (r == 0)
            continue;
        size_t n_new = 17 + strlen(renamed) + strlen(rest + keep_len) + 1;
        char *nn = malloc(n_new);
        if (nn == NULL) {
            free(renamed);
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            break;
        }
        snprintf(nn, n_new, "base_model.model.%s%s", renamed, rest + keep_len);
        snprintf(buf, sizeof buf, "%.*s", (int)keep_len, rest);
        tally_add(tally, &n_tally, rule, buf, renamed);
        free(renamed);
        if (lm_ts_find(ts, nn) != NULL) {
            rc = lm_fail(err, LM_E_MISMATCH, "AmbiguousModule", "renaming '%s' to '%s' collides with a tensor the "
                         "adapter already has", name, nn);
            free(nn);
            break;
        }
        if ((rc = lm_ts_rename(ts, i, nn, err)) != LM_OK)
            break;
    }
    if (rc == LM_OK && tally_notes(tally, n_tally, notes, n_notes) != LM_OK)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    base_free(b);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* loading a weights file                                                                       */
/* ------------------------------------------------------------------------------------------ */
/* what the first bytes say: GGUF and .npz are refused with what to do instead */
typedef enum { SNIFF_SAFETENSORS = 0, SNIFF_TORCH, SNIFF_GGUF, SNIFF_NPZ } sniff_kind;

static sniff_kind sniff(const uint8_t *head, size_t got, const char *name)
{
    if (got >= 4 && memcmp(head, "GGUF", 4) == 0)
        return SNIFF_GGUF;
    if (got >= 9 && head[8] == '{') /* 8-byte header length, then the JSON */
        return SNIFF_SAFETENSORS;
    if (got >= 4 && head[0] == 'P' && head[1] == 'K')
        return fm_ends_with(name, ".npz") ? SNIFF_NPZ : SNIFF_TORCH;
    if (got >= 3 && head[0] == 0x80 && head[2] == 0x8a) /* legacy torch.save: PROTO, LONG1 magic */
        return SNIFF_TORCH;
    return SNIFF_SAFETENSORS; /* its reader says what is wrong */
}

static lm_code refuse_sniffed(sniff_kind k, lm_err *err)
{
    if (k == SNIFF_GGUF)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedFormat",
                       "a GGUF file (llama.cpp): merge GGUF LoRA adapters with llama.cpp's own llama-export-lora, or "
                       "convert the PEFT adapter it came from");
    return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedFormat",
                   "a NumPy .npz archive (adapters.npz of mlx-examples' lora.py, 2023): re-save it with a current "
                   "mlx-lm (adapters.safetensors + adapter_config.json)");
}

/* a tensor set over an opened safetensors file (data borrowed from it; the set closes it) */
static lm_code set_of_st(lm_st_file *st, const char *name, lm_tensor_set **out, lm_err *err)
{
    lm_tensor_set *ts = lm_ts_create(name);
    lm_code rc = LM_OK;
    if (ts == NULL) {
        lm_st_close(st);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    ts->st = st;
    for (size_t i = 0; i < lm_st_n_tensors(st) && rc == LM_OK; i++) {
        const lm_tensor_info *t = lm_st_tensor(st, i);
        rc = lm_ts_add(ts, t->name, t->dtype, t->n_dims, t->shape, lm_st_data(st) + t->begin, 0, err);
    }
    if (rc != LM_OK)
        lm_ts_free(ts);
    else
        *out = ts;
    return rc;
}

/* after a load: keep the set, and forget the path the readers record even on success */
static lm_code loaded(fm_ctx *c, lm_code rc, const char *path, lm_tensor_set **out, lm_err *err)
{
    if (rc == LM_OK) {
        rc = fm_keep(c, *out, err);
        if (rc != LM_OK)
            *out = NULL;
    }
    if (rc == LM_OK && err != NULL && err->code == LM_OK)
        lm_err_clear(err);
    else
        lm_err_set_path(err, path);
    return rc;
}

lm_code fm_load_file(fm_ctx *c, const char *path, lm_tensor_set **out, int *root_kind, lm_err *err)
{
    *out = NULL;
    *root_kind = LM_TORCH_ROOT_DICT;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        lm_fail_errno(err, errno, "cannot open");
        lm_err_set_path(err, path);
        return err ? err->code : LM_E_IO;
    }
    uint8_t head[16] = {0};
    size_t got = fread(head, 1, sizeof head, f);
    fclose(f);
    sniff_kind k = sniff(head, got, path);
    lm_code rc;
    if (k == SNIFF_GGUF || k == SNIFF_NPZ) {
        rc = refuse_sniffed(k, err);
    } else if (k == SNIFF_TORCH) {
        rc = lm_torch_obj_load(path, out, root_kind, err);
    } else {
        lm_st_file *st = lm_st_open_snapshot(path, err);
        rc = st ? set_of_st(st, path, out, err) : (err ? err->code : LM_E_FORMAT);
    }
    return loaded(c, rc, path, out, err);
}

static lm_code load_buffer(fm_ctx *c, const void *buf, size_t n, const char *name, lm_tensor_set **out, int *root_kind,
                           lm_err *err)
{
    *out = NULL;
    *root_kind = LM_TORCH_ROOT_DICT;
    sniff_kind k = sniff(buf, n, name);
    lm_code rc;
    if (k == SNIFF_GGUF || k == SNIFF_NPZ) {
        rc = refuse_sniffed(k, err);
    } else if (k == SNIFF_TORCH) {
        rc = lm_torch_obj_load_buffer(buf, n, name, out, root_kind, err);
    } else {
        lm_st_file *st = lm_st_open_buffer(buf, n, name, err);
        rc = st ? set_of_st(st, name, out, err) : (err ? err->code : LM_E_FORMAT);
    }
    return loaded(c, rc, name, out, err);
}

/* ------------------------------------------------------------------------------------------ */
/* detection                                                                                    */
/* ------------------------------------------------------------------------------------------ */
typedef enum {
    FK_UNKNOWN = 0, FK_KOHYA, FK_DIFFUSERS, FK_TORCHTUNE, FK_LORALIB, FK_LORA_SAM, FK_CLONE_ST, FK_CLONE_LIST,
    FK_MLX_KEYS, FK_SINGLE
} fm_kind;

static int is_kohya_name(const char *k)
{
    return fm_starts_with(k, "lora_unet_") || fm_starts_with(k, "lora_te_") || fm_starts_with(k, "lora_te1_") ||
           fm_starts_with(k, "lora_te2_") || fm_starts_with(k, "lora_te3_") || fm_starts_with(k, "lycoris_");
}

static int is_w_ab(const char *k)
{
    if (!(fm_starts_with(k, "w_a_") || fm_starts_with(k, "w_b_")) || k[4] == '\0')
        return 0;
    for (const char *p = k + 4; *p; p++)
        if (*p < '0' || *p > '9')
            return 0;
    return 1;
}

static fm_kind classify(const lm_tensor_set *ts, int root_kind)
{
    if (root_kind == LM_TORCH_ROOT_LIST)
        return FK_CLONE_LIST;
    if (root_kind == LM_TORCH_ROOT_TENSOR)
        return FK_SINGLE;
    size_t kohya = 0, diff = 0, tune = 0, lib = 0, sam = 0, clone = 0, mlx = 0, n = ts->n;
    for (size_t i = 0; i < n; i++) {
        const char *k = ts->t[i].name;
        if (is_kohya_name(k))
            kohya++;
        else if (is_w_ab(k))
            sam++;
        else if (strchr(k, ':') && (fm_ends_with(k, ":up") || fm_ends_with(k, ":down")))
            clone++;
        else if (fm_ends_with(k, ".lora_a.weight") || fm_ends_with(k, ".lora_b.weight") || fm_ends_with(k, ".magnitude"))
            tune++;
        else if (fm_ends_with(k, ".lora_a") || fm_ends_with(k, ".lora_b"))
            mlx++;
        else if (fm_ends_with(k, ".lora_A") || fm_ends_with(k, ".lora_B"))
            lib++;
        else if (fm_ends_with(k, ".down.weight") || fm_ends_with(k, ".up.weight") || fm_ends_with(k, ".lora_A.weight") ||
                 fm_ends_with(k, ".lora_B.weight"))
            diff++;
    }
    if (n == 0)
        return FK_UNKNOWN;
    if (kohya > 0)
        return FK_KOHYA;
    if (clone > 0)
        return FK_CLONE_ST;
    if (sam > 0)
        return FK_LORA_SAM;
    if (tune > 0)
        return FK_TORCHTUNE;
    if (mlx > 0)
        return FK_MLX_KEYS;
    if (lib > 0)
        return FK_LORALIB;
    if (diff > 0)
        return FK_DIFFUSERS;
    return FK_UNKNOWN;
}

static const char *kind_name(fm_kind k)
{
    switch (k) {
    case FK_KOHYA: return "kohya-ss / LyCORIS";
    case FK_DIFFUSERS: return "diffusers / PEFT keys";
    case FK_TORCHTUNE: return "torchtune";
    case FK_LORALIB: return "microsoft loralib";
    case FK_LORA_SAM: return "LoRA-SAM / LoRA-ViT";
    case FK_CLONE_ST: return "lora_diffusion .safetensors";
    case FK_CLONE_LIST: return "lora_diffusion .pt list";
    case FK_MLX_KEYS: return "mlx-lm";
    case FK_SINGLE: return "a single tensor";
    default: return NULL;
    }
}

static int dir_has(const char *dir, const char *name)
{
    char *p = fm_join(dir, name);
    int r = p && fm_is_file(p);
    free(p);
    return r;
}

static int is_mlx_config(const cJSON *root)
{
    return cJSON_IsObject(root) && cJSON_GetObjectItemCaseSensitive(root, "peft_type") == NULL &&
           (cJSON_GetObjectItemCaseSensitive(root, "lora_parameters") != NULL ||
            cJSON_GetObjectItemCaseSensitive(root, "fine_tune_type") != NULL ||
            cJSON_GetObjectItemCaseSensitive(root, "lora_layers") != NULL);
}

/* torchtune writes a PEFT config beside its own adapter_model.pt / adapter_0.pt */
static const char *const TORCHTUNE_FILES[] = {"adapter_model.pt", "adapter_0.pt"};

/* A PEFT directory, or one whose problems the PEFT loader explains best: a config that is not
 * mlx-lm's and not torchtune's companion, or PEFT's weights without their config, or nothing
 * but sub-folders (a multi-adapter save). */
int lm_formats_is_peft(const char *path)
{
    if (!fm_is_dir(path))
        return 0;
    int peft_weights = dir_has(path, "adapter_model.safetensors") || dir_has(path, "adapter_model.bin");
    char *cfg = fm_join(path, "adapter_config.json");
    if (cfg != NULL && fm_is_file(cfg)) {
        lm_err ignore;
        lm_err_clear(&ignore);
        char *text = fm_read_text(cfg, (size_t)64 << 20, &ignore);
        cJSON *root = text ? cJSON_Parse(text) : NULL;
        free(text);
        free(cfg);
        int mlx = is_mlx_config(root);
        cJSON_Delete(root);
        if (mlx)
            return 0;
        if (!peft_weights)
            for (size_t i = 0; i < LM_ARRAY_LEN(TORCHTUNE_FILES); i++)
                if (dir_has(path, TORCHTUNE_FILES[i]))
                    return 0;
        return 1;
    }
    free(cfg);
    if (peft_weights)
        return 1;
    DIR *d = opendir(path);
    if (d == NULL)
        return 1;
    struct dirent *de;
    int foreign = 0;
    while ((de = readdir(d)) != NULL && !foreign) {
        const char *n = de->d_name;
        foreign = fm_ends_with(n, ".safetensors") || fm_ends_with(n, ".pt") || fm_ends_with(n, ".bin") ||
                  fm_ends_with(n, ".pth") || fm_ends_with(n, ".ckpt");
    }
    closedir(d);
    return !foreign;
}

/* the one weights file of a directory that holds a single one (diffusers' pytorch_lora_weights,
 * a kohya file in a folder ...), or NULL */
static char *single_weights_file(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return NULL;
    struct dirent *de;
    char *found = NULL;
    int n = 0;
    while ((de = readdir(d)) != NULL) {
        const char *nm = de->d_name;
        if (nm[0] == '.')
            continue;
        if (fm_ends_with(nm, ".safetensors") || fm_ends_with(nm, ".pt") || fm_ends_with(nm, ".bin") ||
            fm_ends_with(nm, ".pth") || fm_ends_with(nm, ".ckpt")) {
            n++;
            free(found);
            found = fm_join(dir, nm);
        }
    }
    closedir(d);
    if (n != 1) {
        free(found);
        return NULL;
    }
    return found;
}

static int raw_name(const char *n)
{
    static const char *const stems[] = {"up", "down", "lora_up", "lora_down", "up-param", "down-param",
                                        "up_param", "down_param", "up_params", "down_params"};
    for (size_t i = 0; i < LM_ARRAY_LEN(stems); i++) {
        size_t k = strlen(stems[i]);
        if (strncmp(n, stems[i], k) == 0 && n[k] == '.')
            return 1;
    }
    return 0;
}

static int dir_has_raw(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return 0;
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d)) != NULL)
        n += raw_name(de->d_name);
    closedir(d);
    return n > 0;
}

typedef enum { FD_NONE = 0, FD_MLX, FD_TORCHTUNE_DIR, FD_RAW, FD_FILE } fm_dir_kind;

/* what a directory is; *file receives the weights file for FD_FILE / FD_TORCHTUNE_DIR */
static fm_dir_kind dir_kind(const char *dir, char **file)
{
    *file = NULL;
    char *cfg = fm_join(dir, "adapter_config.json");
    if (cfg != NULL && fm_is_file(cfg)) {
        lm_err ignore;
        lm_err_clear(&ignore);
        char *text = fm_read_text(cfg, (size_t)16 << 20, &ignore);
        cJSON *root = text ? cJSON_Parse(text) : NULL;
        free(text);
        int mlx = is_mlx_config(root), peft = cJSON_IsString(cJSON_GetObjectItemCaseSensitive(root, "peft_type"));
        cJSON_Delete(root);
        free(cfg);
        if (mlx)
            return FD_MLX;
        if (peft)
            for (size_t i = 0; i < LM_ARRAY_LEN(TORCHTUNE_FILES); i++)
                if (dir_has(dir, TORCHTUNE_FILES[i])) {
                    *file = fm_join(dir, TORCHTUNE_FILES[i]);
                    return FD_TORCHTUNE_DIR;
                }
        return FD_NONE;
    }
    free(cfg);
    if (dir_has(dir, "adapters.safetensors"))
        return FD_MLX;
    if (dir_has_raw(dir))
        return FD_RAW;
    if ((*file = single_weights_file(dir)) != NULL)
        return FD_FILE;
    return FD_NONE;
}

const char *lm_formats_detect(const char *path)
{
    if (lm_formats_is_peft(path))
        return NULL;
    char *file = NULL;
    const char *name = NULL;
    if (fm_is_dir(path)) {
        fm_dir_kind k = dir_kind(path, &file);
        if (k == FD_MLX)
            name = "mlx-lm";
        else if (k == FD_TORCHTUNE_DIR)
            name = "torchtune";
        else if (k == FD_RAW)
            name = "raw up/down files";
        if (k != FD_FILE) {
            free(file);
            return name;
        }
    }
    const char *p = file ? file : path;
    if (!fm_is_file(p)) {
        free(file);
        return NULL;
    }
    fm_ctx c;
    memset(&c, 0, sizeof c);
    lm_tensor_set *ts = NULL;
    int root = 0;
    lm_err ignore;
    lm_err_clear(&ignore);
    if (fm_load_file(&c, p, &ts, &root, &ignore) == LM_OK) {
        name = kind_name(classify(ts, root));
    } else if (ignore.code == LM_E_UNSUPPORTED) {
        name = "unsupported";
    }
    for (size_t i = 0; i < c.n_keep; i++)
        lm_ts_free(c.keep[i]);
    free(c.keep);
    free(file);
    return name;
}

/* ------------------------------------------------------------------------------------------ */
/* resolution against the base                                                                  */
/* ------------------------------------------------------------------------------------------ */
/* component prefixes a group of modules may sit under in a whole-pipeline base */
static const struct {
    const char *group;
    const char *const prefixes[5];
} GROUP_HINTS[] = {
    {"lora_unet", {"unet.", "model.diffusion_model.", "transformer.", NULL}},
    {"unet", {"unet.", "model.diffusion_model.", NULL}},
    {"transformer", {"transformer.", "model.diffusion_model.", NULL}},
    {"lora_te", {"text_encoder.", "cond_stage_model.transformer.", "cond_stage_model.", NULL}},
    {"lora_te1", {"text_encoder.", "conditioner.embedders.0.transformer.", "text_encoders.clip_l.", NULL}},
    {"lora_te2", {"text_encoder_2.", "conditioner.embedders.1.model.", "text_encoders.clip_g.", NULL}},
    {"text_encoder", {"text_encoder.", "cond_stage_model.transformer.", NULL}},
    {"text_encoder_2", {"text_encoder_2.", NULL}},
};

/* among several base modules whose flattened/dotted suffix fits, the one under the group's
 * component prefix; -1 if none or several */
static long pick_by_group(const fm_base *b, const char *group, const char *key, int flat)
{
    const char *const *hints = NULL;
    for (size_t i = 0; group && i < LM_ARRAY_LEN(GROUP_HINTS); i++)
        if (strcmp(GROUP_HINTS[i].group, group) == 0)
            hints = GROUP_HINTS[i].prefixes;
    if (hints == NULL)
        return -1;
    long found = -1;
    size_t nk = strlen(key);
    for (size_t i = 0; i < b->n; i++) {
        const char *m = b->mod[i];
        if (m == NULL)
            continue;
        size_t nm = strlen(m);
        if (nm <= nk + 1 || m[nm - nk - 1] != '.')
            continue;
        int match = 1;
        for (size_t j = 0; j < nk && match; j++) {
            char x = m[nm - nk + j];
            match = (flat && x == '.' ? '_' : x) == key[j];
        }
        if (!match)
            continue;
        int hinted = 0;
        for (size_t h = 0; hints[h] && !hinted; h++)
            hinted = strncmp(m, hints[h], strlen(hints[h])) == 0 && strlen(hints[h]) == nm - nk;
        if (!hinted)
            continue;
        if (found >= 0)
            return -1;
        found = (long)i;
    }
    return found;
}

/* two base modules that fit, for a message */
static void two_fits(const fm_base *b, const char *key, int flat, char *buf, size_t cap)
{
    size_t nk = strlen(key), used = 0;
    int k = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < b->n && k < 2; i++) {
        const char *m = b->mod[i];
        if (m == NULL)
            continue;
        size_t nm = strlen(m);
        if (nm < nk || (nm > nk && m[nm - nk - 1] != '.' && !(flat && m[nm - nk - 1] == '_')))
            continue;
        int match = 1;
        for (size_t j = 0; j < nk && match; j++) {
            char x = m[nm - nk + j];
            match = (flat && x == '.' ? '_' : x) == key[j];
        }
        if (match) {
            used += (size_t)snprintf(buf + used, cap > used ? cap - used : 0, "%s'%s'", k ? " and " : "", m);
            k++;
        }
    }
}

/* @return base tensor index, -1 not found, -2 several (err filled) */
static long resolve_one(fm_ctx *c, fm_module *m, char **drifted, size_t *drift_rule, lm_err *err)
{
    const fm_base *b = c->base;
    *drifted = NULL;
    long idx;
    char two[700];
    if (m->name_kind == FM_NAME_FLAT) {
        idx = map_get(b->flat, m->name);
        if (idx == -2) {
            two_fits(b, m->name, 1, two, sizeof two);
            lm_fail(err, LM_E_MISMATCH, "AmbiguousModule", "'%s' fits several base modules once '.' is read as '_' "
                    "(%s): the flattened name cannot tell them apart", m->src, two);
            return -2;
        }
        if (idx >= 0)
            return idx;
        idx = map_get(b->flat_suffix, m->name);
        if (idx == -2 && (idx = pick_by_group(b, m->group, m->name, 1)) < 0) {
            two_fits(b, m->name, 1, two, sizeof two);
            lm_fail(err, LM_E_MISMATCH, "AmbiguousModule", "'%s' fits several base modules (%s)", m->src, two);
            return -2;
        }
        return idx;
    }
    if (m->type == FM_FULL) { /* a whole tensor: its exact name, or a known rename */
        size_t at;
        if (lm_model_find(b->model, m->name, &at) != NULL)
            return (long)at;
        int r = drift_resolve(b, m->name, 1, drifted, drift_rule, err);
        if (r > 0 && lm_model_find(b->model, *drifted, &at) != NULL)
            return (long)at;
        return r < 0 ? -2 : -1;
    }
    idx = fm_base_weight(b, m->name);
    if (idx >= 0)
        return idx;
    int r = drift_resolve(b, m->name, 0, drifted, drift_rule, err);
    if (r < 0)
        return -2;
    if (r > 0)
        return fm_base_weight(b, *drifted);
    /* a dotted suffix of a base module (the base has a component prefix the adapter lacks), or
     * the adapter has a component prefix the base lacks (drop leading components) */
    for (const char *p = m->name; p != NULL; p = strchr(p, '.')) {
        if (*p == '.')
            p++;
        idx = fm_base_weight(b, p);
        if (idx >= 0)
            return idx;
        idx = map_get(b->suffix, p);
        if (idx == -2 && (idx = pick_by_group(b, m->group, p, 0)) < 0) {
            two_fits(b, p, 0, two, sizeof two);
            lm_fail(err, LM_E_MISMATCH, "AmbiguousModule", "'%s' fits several base modules (%s)", m->src, two);
            return -2;
        }
        if (idx >= 0)
            return idx;
    }
    return -1;
}

static int any_tensor_prefixed(const fm_base *b, const char *prefix)
{
    for (size_t i = 0; i < b->n; i++)
        if (fm_starts_with(lm_model_tensor(b->model, i)->info->name, prefix))
            return 1;
    return 0;
}

typedef struct {
    const char *group;
    size_t n, found;
    const char *first_missing;
} group_count;

/* the layout message for a UNet group that matches nothing in the base */
static lm_code layout_refusal(fm_ctx *c, const group_count *g, lm_err *err)
{
    const fm_base *b = c->base;
    int diffusers_names = 0;
    for (size_t i = 0; i < c->n; i++)
        if (c->m[i].group && strcmp(c->m[i].group, g->group) == 0 &&
            (strstr(c->m[i].name, "down_blocks") || strstr(c->m[i].name, "up_blocks") ||
             strstr(c->m[i].name, "mid_block")))
            diffusers_names = 1;
    if (any_tensor_prefixed(b, "model.diffusion_model.") && diffusers_names)
        return lm_fail(err, LM_E_UNSUPPORTED, "LayoutMismatch",
                       "the adapter names diffusers UNet modules (down_blocks ...) but the base is an original "
                       "(LDM/SGM) single-file checkpoint (model.diffusion_model.input_blocks ...): merge into the "
                       "diffusers-layout UNet (unet/diffusion_pytorch_model.safetensors) instead");
    int unet = strcmp(g->group, "lora_unet") == 0 || strcmp(g->group, "unet") == 0;
    if (unet && any_tensor_prefixed(b, "down_blocks.") && !diffusers_names)
        return lm_fail(err, LM_E_UNSUPPORTED, "LayoutMismatch",
                       "the adapter names modules of another layout ('%s' ...) than the diffusers-layout base "
                       "(down_blocks ...): use the checkpoint layout the adapter was trained on", g->first_missing);
    return LM_OK;
}

static lm_code resolve_all(fm_ctx *c, lm_err *err)
{
    group_count groups[16];
    size_t n_groups = 0;
    drift_tally tally[2 * LM_ARRAY_LEN(DRIFT)];
    size_t n_tally = 0;
    for (size_t i = 0; i < c->n; i++) {
        fm_module *m = &c->m[i];
        long idx;
        char *drifted = NULL;
        size_t rule = 0;
        if (c->base == NULL) {
            if (m->name_kind == FM_NAME_FLAT)
                return lm_fail(err, LM_E_USAGE, "NeedsBase", "module '%s' uses kohya's flattened naming, which only "
                               "the base model can resolve: give the base (convert --base BASE)", m->src);
            if ((m->module = strdup(m->name)) == NULL)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            continue;
        }
        if (m->name_kind == FM_NAME_RESOLVED) {
            idx = fm_base_weight(c->base, m->name);
        } else {
            lm_err local;
            lm_err_clear(&local);
            idx = resolve_one(c, m, &drifted, &rule, &local);
            if (idx == -2) {
                if (err)
                    *err = local;
                lm_err_set_tensor(err, m->src);
                return LM_E_MISMATCH;
            }
        }
        if (idx >= 0) {
            m->module = strdup(m->type == FM_FULL ? lm_model_tensor(c->base->model, (size_t)idx)->info->name
                                                  : c->base->mod[idx]);
            if (m->module == NULL) {
                free(drifted);
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            }
            if (drifted)
                tally_add(tally, &n_tally, rule, m->name, drifted);
        }
        free(drifted);
        const char *g = m->group ? m->group : "";
        size_t k = 0;
        while (k < n_groups && strcmp(groups[k].group, g) != 0)
            k++;
        if (k == n_groups) {
            if (n_groups == LM_ARRAY_LEN(groups))
                return lm_fail(err, LM_E_FORMAT, "InvalidModule", "too many module groups");
            groups[k].group = g;
            groups[k].n = groups[k].found = 0;
            groups[k].first_missing = NULL;
            n_groups++;
        }
        groups[k].n++;
        if (idx >= 0)
            groups[k].found++;
        else if (groups[k].first_missing == NULL)
            groups[k].first_missing = m->src;
    }
    if (c->base == NULL)
        return LM_OK;
    size_t any_found = 0;
    for (size_t k = 0; k < n_groups; k++)
        any_found += groups[k].found;
    for (size_t k = 0; k < n_groups; k++) {
        group_count *g = &groups[k];
        if (g->found == g->n)
            continue;
        if (g->found == 0 && g->group[0] != '\0') {
            lm_code rc = layout_refusal(c, g, err);
            if (rc != LM_OK)
                return rc;
            if (any_found == 0)
                continue;
            if (fm_note(c, "%s: %zu module%s of component '%s' (e.g. %s) match nothing in the base: skipped (merge "
                           "them into that component's weights separately)", c->path, g->n, g->n == 1 ? "" : "s",
                        g->group, g->first_missing) != LM_OK)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            continue;
        }
        lm_fail(err, LM_E_MISMATCH, "NoMatchingTensor", "no base module for '%s'%s", g->first_missing,
                g->found ? " (other modules of the adapter were found)" : "");
        lm_err_set_tensor(err, g->first_missing);
        return LM_E_MISMATCH;
    }
    if (any_found == 0 && c->n > 0) {
        lm_code rc = LM_OK;
        for (size_t k = 0; k < n_groups && rc == LM_OK; k++)
            rc = layout_refusal(c, &groups[k], err);
        if (rc != LM_OK)
            return rc;
        lm_fail(err, LM_E_MISMATCH, "NoMatchingTensor", "none of the adapter's %zu modules is in the base (first: "
                "'%s')", c->n, groups[0].first_missing);
        lm_err_set_tensor(err, groups[0].first_missing);
        return LM_E_MISMATCH;
    }
    char **notes = NULL;
    size_t n_notes = 0;
    if (tally_notes(tally, n_tally, &notes, &n_notes) != LM_OK)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; i < n_notes; i++) {
        fm_note(c, "%s", notes[i]);
        free(notes[i]);
    }
    free(notes);
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* shape checks against the base (LoRA modules)                                                 */
/* ------------------------------------------------------------------------------------------ */
static void shape_str(char *buf, size_t cap, size_t n, const uint64_t *s)
{
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (size_t d = 0; d < n && used < cap; d++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%llu", d ? ", " : "", (unsigned long long)s[d]);
    if (used < cap)
        snprintf(buf + used, cap - used, "]");
}

static lm_code check_lora_shapes(fm_ctx *c, fm_module *m, lm_err *err)
{
    const lm_ts_tensor *A = fm_part_get(m, "lora_A.weight"), *B = fm_part_get(m, "lora_B.weight");
    if (A == NULL || B == NULL || c->base == NULL || m->module == NULL)
        return LM_OK;
    long idx = fm_base_weight(c->base, m->module);
    const lm_tensor_info *W = fm_base_info(c->base, idx);
    char sw[96], sa[96], sb[96];
    shape_str(sw, sizeof sw, W->n_dims, W->shape);
    shape_str(sa, sizeof sa, A->n_dims, A->shape);
    shape_str(sb, sizeof sb, B->n_dims, B->shape);
    uint64_t r = A->shape[0], in = A->n_elems / (r ? r : 1), out = B->shape[0];
    if (m->orient_by_base && W->n_dims == 2) {
        /* mlx-lm / loralib on an embedding W [V, D]: A [r, V], B [D, r] (PEFT's embedding layout);
         * a square one is told by its name */
        int as_linear = W->shape[0] == out && W->shape[1] == in;
        int as_embedding = W->shape[0] == in && W->shape[1] == out;
        m->embedding = as_embedding && (!as_linear || strstr(m->module, "embed") || strstr(m->module, "wte"));
    }
    if (W->n_dims >= 3 && A->n_dims == 2 && B->n_dims == 2) {
        /* a 1x1 convolution saved with 2-D factors: the same numbers viewed [r, in, 1, 1] / [out, r, 1, 1] */
        int one = 1;
        for (size_t d = 2; d < W->n_dims; d++)
            one &= W->shape[d] == 1;
        if (one && W->shape[0] == out && W->shape[1] == in) {
            uint64_t sa4[LM_TS_MAX_DIMS] = {r, in}, sb4[LM_TS_MAX_DIMS] = {out, r};
            for (size_t d = 2; d < W->n_dims; d++)
                sa4[d] = sb4[d] = 1;
            const lm_ts_tensor *A4 = fm_reshaped(c, A, W->n_dims, sa4, err), *B4 = fm_reshaped(c, B, W->n_dims, sb4, err);
            if (A4 == NULL || B4 == NULL)
                return LM_E_NOMEM;
            fm_part_set(m, "lora_A.weight", A4);
            fm_part_set(m, "lora_B.weight", B4);
            return LM_OK;
        }
    }
    if (W->n_dims == 2 && A->n_dims > 2) {
        /* 1x1 convolution factors for a Linear base (SD 2's proj_in/proj_out): view them 2-D */
        int one = 1;
        for (size_t d = 2; d < A->n_dims; d++)
            one &= A->shape[d] == 1;
        for (size_t d = 2; d < B->n_dims; d++)
            one &= B->shape[d] == 1;
        if (one) {
            uint64_t sa2[2] = {r, A->shape[1]}, sb2[2] = {out, B->shape[1]};
            const lm_ts_tensor *A2 = fm_reshaped(c, A, 2, sa2, err), *B2 = fm_reshaped(c, B, 2, sb2, err);
            if (A2 == NULL || B2 == NULL)
                return LM_E_NOMEM;
            fm_part_set(m, "lora_A.weight", A2);
            fm_part_set(m, "lora_B.weight", B2);
            A = A2;
            B = B2;
        }
    }
    int ok;
    if (W->n_dims == 2 && A->n_dims == 2 && B->n_dims == 2)
        ok = B->shape[1] == r && ((W->shape[0] == out && W->shape[1] == in) || (W->shape[0] == in && W->shape[1] == out));
    else {
        ok = W->n_dims == A->n_dims && W->n_dims == B->n_dims && W->shape[0] == out && B->shape[1] == r;
        for (size_t d = 1; ok && d < W->n_dims; d++)
            ok = W->shape[d] == A->shape[d];
        for (size_t d = 2; ok && d < B->n_dims; d++)
            ok = B->shape[d] == 1;
    }
    if (!ok) {
        lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "base '%s.weight' is %s but the factors are down %s and up %s",
                m->module, sw, sa, sb);
        lm_err_set_tensor(err, m->src);
        return LM_E_MISMATCH;
    }
    return LM_OK;
}

static lm_code check_base(fm_ctx *c, lm_err *err)
{
    for (size_t i = 0; i < c->n; i++) {
        fm_module *m = &c->m[i];
        if (m->module == NULL)
            continue;
        if (m->type == FM_LORA) {
            lm_code rc = check_lora_shapes(c, m, err);
            if (rc != LM_OK)
                return rc;
        }
        if (m->type == FM_IA3 && m->ia3_no_bias) {
            if (c->base == NULL)
                return lm_fail(err, LM_E_USAGE, "NeedsBase", "module '%s': LyCORIS IA3 on outputs scales the weight "
                               "only, which PEFT's IA3 matches only for layers without a bias; give the base to check",
                               m->src);
            if (fm_base_has_bias(c->base, m->module)) {
                lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "LyCORIS IA3 on the outputs of a layer with a bias "
                        "('%s.bias'): LyCORIS scales the weight only when merging, PEFT's IA3 scales the bias too; "
                        "not representable as a PEFT adapter", m->module);
                lm_err_set_tensor(err, m->src);
                return LM_E_UNSUPPORTED;
            }
        }
    }
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* the PEFT adapter                                                                              */
/* ------------------------------------------------------------------------------------------ */
static const char *const PEFT_TYPES[] = {"LORA", "LOHA", "LOKR", "IA3"};

static cJSON *raw_number(double v)
{
    char buf[40];
    if (v == floor(v) && fabs(v) < 1e15)
        snprintf(buf, sizeof buf, "%.1f", v);
    else
        snprintf(buf, sizeof buf, "%.17g", v);
    return cJSON_CreateRaw(buf);
}

/* the exact pattern key for one module: ^ and the path with every non-word character escaped */
static char *exact_pattern(const char *module)
{
    size_t n = strlen(module);
    char *p = malloc(2 * n + 2), *q = p;
    if (p == NULL)
        return NULL;
    *q++ = '^';
    for (const char *s = module; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (!(ch == '_' || (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch >= 0x80))
            *q++ = '\\';
        *q++ = (char)ch;
    }
    *q = '\0';
    return p;
}

/* the most frequent value (ties: the first seen) */
static double mode_of(const double *v, size_t n)
{
    double best = n ? v[0] : 0;
    size_t best_n = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = 0;
        for (size_t j = 0; j < n; j++)
            k += v[j] == v[i];
        if (k > best_n) {
            best_n = k;
            best = v[i];
        }
        if (best_n > n / 2)
            break;
    }
    return best;
}

static int cmp_module_name(const void *a, const void *b)
{
    const fm_module *x = *(const fm_module *const *)a, *y = *(const fm_module *const *)b;
    int d = strcmp(x->module, y->module);
    return d != 0 ? d : (x > y) - (x < y); /* equal names in file order */
}

/* no base module named by two entries: sorted, so 100k modules cost n log n, not n^2 */
static lm_code emit_unique(const fm_ctx *c, lm_err *err)
{
    const fm_module **v = malloc((c->n ? c->n : 1) * sizeof *v);
    size_t n = 0;
    if (v == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; i < c->n; i++)
        if (c->m[i].module != NULL)
            v[n++] = &c->m[i];
    qsort(v, n, sizeof *v, cmp_module_name);
    lm_code rc = LM_OK;
    for (size_t i = 1; i < n && rc == LM_OK; i++)
        if (strcmp(v[i - 1]->module, v[i]->module) == 0)
            rc = lm_fail(err, LM_E_MISMATCH, "DuplicateModule", "'%s' and '%s' both map to base module '%s'",
                         v[i - 1]->src, v[i]->src, v[i]->module);
    free(v);
    return rc;
}

/* the one PEFT type of the resolved modules (whole tensors go with any); no module twice */
static lm_code emit_type(const fm_ctx *c, int *type, lm_err *err)
{
    size_t n = 0;
    *type = -1;
    for (size_t i = 0; i < c->n; i++) {
        const fm_module *m = &c->m[i];
        if (m->module == NULL)
            continue;
        if (m->type != FM_FULL && m->type != FM_NORM && *type >= 0 && (int)m->type != *type)
            return lm_fail(err, LM_E_UNSUPPORTED, "MixedTypes", "the adapter mixes %s and %s modules ('%s'); a PEFT "
                           "adapter has one type: not supported", PEFT_TYPES[*type], PEFT_TYPES[m->type], m->src);
        if (m->type != FM_FULL && m->type != FM_NORM)
            *type = (int)m->type;
        n++;
    }
    if (n > 1 && emit_unique(c, err) != LM_OK)
        return err->code;
    if (n == 0)
        return lm_fail(err, LM_E_FORMAT, "EmptyAdapter", "the adapter has no module to merge");
    if (*type < 0) /* whole tensors or norms only: a LoRA adapter without LoRA modules carries them */
        *type = FM_LORA;
    return LM_OK;
}

typedef struct {
    double g_r, g_a;             /* the config's r and alpha: the most frequent ones */
    int dora, bias, w1_split;
} emit_stats;

static lm_code emit_stats_of(const fm_ctx *c, int type, emit_stats *st, lm_err *err)
{
    double *rs = malloc((c->n ? c->n : 1) * sizeof *rs), *as = malloc((c->n ? c->n : 1) * sizeof *as);
    if (rs == NULL || as == NULL) {
        free(rs);
        free(as);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    size_t k = 0;
    memset(st, 0, sizeof *st);
    for (size_t i = 0; i < c->n; i++) {
        const fm_module *m = &c->m[i];
        if (m->module == NULL || m->type == FM_FULL || m->type == FM_NORM)
            continue;
        rs[k] = (double)m->r;
        as[k++] = m->alpha;
        st->dora += fm_part_get(m, "lora_magnitude_vector") != NULL;
        st->bias |= fm_part_get(m, "lora_B.bias") != NULL;
        st->w1_split |= fm_part_get(m, "lokr_w1_a") != NULL;
    }
    st->g_r = k ? mode_of(rs, k) : 8;
    st->g_a = k ? mode_of(as, k) : 8;
    free(rs);
    free(as);
    if (type == FM_LORA && st->dora != 0 && (size_t)st->dora != k)
        return lm_fail(err, LM_E_UNSUPPORTED, "MixedTypes", "%d of %zu modules are DoRA (have a magnitude): PEFT's "
                       "use_dora is all or nothing", st->dora, k);
    return LM_OK;
}

/* a module's tensors under PEFT's names */
static lm_code emit_tensors(const fm_module *m, lm_tensor_set *ts, lm_err *err)
{
    for (size_t p = 0; p < m->n_parts; p++) {
        const lm_ts_tensor *t = m->part[p].t;
        const char *suffix = m->part[p].suffix;
        if (m->embedding && strcmp(suffix, "lora_A.weight") == 0)
            suffix = "lora_embedding_A";
        else if (m->embedding && strcmp(suffix, "lora_B.weight") == 0)
            suffix = "lora_embedding_B";
        size_t nk = 17 + strlen(m->module) + 1 + strlen(suffix) + 1;
        char *key = malloc(nk);
        if (key == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        snprintf(key, nk, "base_model.model.%s%s%s", m->module, suffix[0] ? "." : "", suffix);
        lm_code rc = lm_ts_add(ts, key, t->dtype, t->n_dims, t->shape, t->data, 0, err);
        free(key);
        if (rc != LM_OK)
            return rc;
    }
    return LM_OK;
}

/* a growable text */
typedef struct {
    char *p;
    size_t n, cap;
} text_buf;

static int text_add(text_buf *t, const char *s)
{
    size_t k = strlen(s);
    if (t->n + k + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 4096;
        while (t->n + k + 1 > cap)
            cap *= 2;
        char *np = realloc(t->p, cap);
        if (np == NULL)
            return -1;
        t->p = np;
        t->cap = cap;
    }
    memcpy(t->p + t->n, s, k + 1);
    t->n += k;
    return 0;
}

static int emit_mapping(const fm_ctx *c, const fm_module *m, int type, text_buf *map)
{
    char line[1400];
    double s = type == FM_IA3 ? 1.0 : c->rslora ? m->alpha / sqrt((double)m->r) : m->alpha / (double)m->r;
    if (m->type == FM_FULL)
        snprintf(line, sizeof line, "  %s -> %s (replaces the base tensor)\n", m->src, m->module);
    else if (m->type == FM_NORM)
        snprintf(line, sizeof line, "  %s -> %s (LyCORIS norm tuning: weight += w_norm%s)\n", m->src, m->module,
                 fm_part_get(m, "lycoris_b_norm") ? ", bias += b_norm" : "");
    else
        snprintf(line, sizeof line, "  %s -> %s (%s%s, r %ld, scale %.9g)\n", m->src, m->module,
                 m->embedding ? "embedding " : "", PEFT_TYPES[m->type], m->r, s);
    return text_add(map, line);
}

/* adapter_config.json: type, the most frequent r / alpha, exact per-module patterns for the rest */
static cJSON *emit_config(const fm_ctx *c, int type, const emit_stats *st)
{
    cJSON *root = cJSON_CreateObject(), *targets = cJSON_CreateArray(), *rank_pat = cJSON_CreateObject(),
          *alpha_pat = cJSON_CreateObject(), *ff = cJSON_CreateArray();
    int ok = root && targets && rank_pat && alpha_pat && ff;
    cJSON_AddStringToObject(root, "peft_type", PEFT_TYPES[type]);
    if (type != FM_IA3) {
        cJSON_AddItemToObject(root, "r", raw_number(st->g_r));
        cJSON_AddItemToObject(root, type == FM_LORA ? "lora_alpha" : "alpha", raw_number(st->g_a));
    }
    for (size_t i = 0; ok && i < c->n; i++) {
        const fm_module *m = &c->m[i];
        if (m->module == NULL || m->type == FM_FULL || m->type == FM_NORM)
            continue;
        cJSON_AddItemToArray(targets, cJSON_CreateString(m->module));
        if (type == FM_IA3 && m->ia3_ff)
            cJSON_AddItemToArray(ff, cJSON_CreateString(m->module));
        if (type == FM_IA3 || ((double)m->r == st->g_r && m->alpha == st->g_a))
            continue;
        char *pat = exact_pattern(m->module);
        ok = pat != NULL;
        if (ok && (double)m->r != st->g_r)
            cJSON_AddItemToObject(rank_pat, pat, raw_number((double)m->r));
        if (ok && m->alpha != st->g_a)
            cJSON_AddItemToObject(alpha_pat, pat, raw_number(m->alpha));
        free(pat);
    }
    cJSON_AddItemToObject(root, "target_modules", targets);
    cJSON *parts[3] = {rank_pat, alpha_pat, ff};
    const char *names[3] = {"rank_pattern", "alpha_pattern", "feedforward_modules"};
    for (int i = 0; i < 3; i++) {
        if (cJSON_GetArraySize(parts[i]) > 0)
            cJSON_AddItemToObject(root, names[i], parts[i]);
        else
            cJSON_Delete(parts[i]);
    }
    if (type == FM_LORA) {
        cJSON_AddBoolToObject(root, "use_dora", st->dora > 0);
        cJSON_AddBoolToObject(root, "use_rslora", c->rslora != 0);
        cJSON_AddBoolToObject(root, "lora_bias", st->bias != 0);
    }
    if (type == FM_LOKR)
        cJSON_AddBoolToObject(root, "decompose_both", st->w1_split != 0);
    cJSON_AddStringToObject(root, "bias", "none");
    if (!ok) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

static lm_code emit(fm_ctx *c, char **config_out, lm_tensor_set **ts_out, char **mapping_out, lm_err *err)
{
    int type;
    emit_stats st;
    lm_code rc = emit_type(c, &type, err);
    if (rc == LM_OK)
        rc = emit_stats_of(c, type, &st, err);
    if (rc != LM_OK)
        return rc;
    lm_tensor_set *ts = lm_ts_create(c->weights_path ? c->weights_path : c->path);
    text_buf map = {0};
    if (ts == NULL || text_add(&map, "") != 0)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; i < c->n && rc == LM_OK; i++) {
        if (c->m[i].module == NULL)
            continue;
        rc = emit_tensors(&c->m[i], ts, err);
        if (rc == LM_OK && emit_mapping(c, &c->m[i], type, &map) != 0)
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    cJSON *root = rc == LM_OK ? emit_config(c, type, &st) : NULL;
    char *text = root ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (rc == LM_OK && text == NULL)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if (rc != LM_OK) {
        lm_ts_free(ts);
        free(map.p);
        free(text);
        return rc;
    }
    *config_out = text;
    *ts_out = ts;
    *mapping_out = map.p;
    return LM_OK;
}

/* what a PEFT adapter cannot say: lora-merge's own LyCORIS parts (src/methods/lycoris.c) */
static lm_code not_peft_reason(const fm_ctx *c, char **out, lm_err *err)
{
    *out = NULL;
    for (size_t i = 0; i < c->n; i++) {
        const fm_module *m = &c->m[i];
        const char *why = NULL;
        const lm_ts_tensor *ds = fm_part_get(m, "lycoris_dora_scale");
        if (m->module == NULL)
            continue;
        const lm_ts_tensor *w2 = m->type == FM_LOKR ? fm_part_get(m, "lokr_w2") : NULL;
        long bi = w2 != NULL && c->base != NULL ? fm_base_weight(c->base, m->module) : -1;
        if (bi >= 0 && fm_base_info(c->base, bi)->n_dims == 3 && w2->n_dims == 2)
            why = "LyCORIS LoKr with a whole lokr_w2 on a Conv1d kernel: PEFT's LoKr keeps it [b, d, k] and its "
                  "kron then pads w1 in front, which makes another kernel than LyCORIS's";
        else if (m->type == FM_NORM)
            why = "LyCORIS norm tuning (w_norm / b_norm) adds to a norm's weight; a PEFT adapter could only replace "
                  "the whole norm (LN_TUNING) with values computed from this base";
        else if (ds != NULL)
            why = ds->n_dims > 1 && ds->shape[0] == 1 && ds->shape[1] != 1
                      ? "LyCORIS DoRA with one dora_scale per input channel: PEFT's DoRA (lora_magnitude_vector) "
                        "normalises output rows"
                      : "LyCORIS DoRA divides by the row norm plus 2^-23, PEFT's lora_magnitude_vector by the norm "
                        "alone, so the merged weights would differ; and a multiplier other than 1 scales LyCORIS's "
                        "factor, not the delta";
        if (why == NULL)
            continue;
        size_t n = strlen(m->src) + strlen(why) + 16;
        if ((*out = malloc(n)) == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        snprintf(*out, n, "'%s': %s", m->src, why);
        return LM_OK;
    }
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* normalise                                                                                     */
/* ------------------------------------------------------------------------------------------ */
static void ctx_free_modules(fm_ctx *c)
{
    for (size_t i = 0; i < c->n; i++) {
        free(c->m[i].src);
        free(c->m[i].group);
        free(c->m[i].name);
        free(c->m[i].module);
    }
    free(c->m);
    c->m = NULL;
    c->n = c->cap = 0;
}

typedef struct {
    lm_tensor_set **sets;
    size_t n;
} keep_box;

void lm_norm_adapter_free(lm_norm_adapter *a)
{
    if (a == NULL)
        return;
    free(a->config_json);
    lm_ts_free(a->ts);
    free(a->dir);
    free(a->config_path);
    free(a->weights_path);
    for (size_t i = 0; i < a->n_notes; i++)
        free(a->notes[i]);
    free(a->notes);
    free(a->mapping);
    free(a->not_peft);
    keep_box *k = a->keep;
    if (k != NULL) {
        for (size_t i = 0; i < k->n; i++)
            lm_ts_free(k->sets[i]);
        free(k->sets);
        free(k);
    }
    free(a);
}

/* a loaded weights file -> modules, by what its keys look like */
static lm_code read_set(fm_ctx *c, const lm_tensor_set *ts, int root, const cJSON *dir_config, lm_err *err)
{
    fm_kind k = classify(ts, root);
    switch (k) {
    case FK_KOHYA: return fm_read_kohya(c, ts, err);
    case FK_DIFFUSERS: return fm_read_diffusers(c, ts, err);
    case FK_TORCHTUNE: return fm_read_torchtune(c, ts, dir_config, err);
    case FK_LORALIB: return fm_read_loralib(c, ts, err);
    case FK_LORA_SAM: return fm_read_lora_sam(c, ts, err);
    case FK_CLONE_ST: return fm_read_clone_st(c, ts, err);
    case FK_CLONE_LIST: return fm_read_clone_list(c, ts, err);
    case FK_MLX_KEYS:
        return lm_fail(err, LM_E_IO, "MissingConfig", "mlx-lm adapter weights (.lora_a / .lora_b) without their "
                       "adapter_config.json: the scale is in that file; give the directory that holds both");
    case FK_SINGLE:
        return lm_fail(err, LM_E_FORMAT, "NotAnAdapter", "the file holds a single tensor: a raw up or down matrix "
                       "alone cannot be merged; put up and down files in one directory (up.pt, down.pt) and give the "
                       "directory");
    default:
        break;
    }
    return lm_fail(err, LM_E_FORMAT, "UnknownFormat", "not an adapter lora-merge knows: no PEFT, kohya-ss, LyCORIS, "
                   "mlx-lm, torchtune, diffusers, lora_diffusion, LoRA-SAM or loralib key names (first key '%s')",
                   ts->n ? ts->t[0].name : "");
}

static lm_code read_file_input(fm_ctx *c, const char *file, const cJSON *dir_config, lm_err *err)
{
    lm_tensor_set *ts = NULL;
    int root = 0;
    lm_code rc = fm_load_file(c, file, &ts, &root, err);
    if (rc != LM_OK)
        return rc;
    if ((c->weights_path = strdup(file)) == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return read_set(c, ts, root, dir_config, err);
}

/* path names the input; buf (n_buf bytes), when not NULL, holds its bytes (a file's) */
static lm_code normalise(const char *path, const void *buf, size_t n_buf, const lm_model *base,
                         const lm_format_opts *opts, lm_norm_adapter **out, lm_err *err)
{
    static const lm_format_opts no_opts = {0};
    fm_ctx c;
    memset(&c, 0, sizeof c);
    c.path = path;
    c.opts = opts ? opts : &no_opts;
    *out = NULL;
    lm_code rc = LM_OK;
    lm_norm_adapter *a = calloc(1, sizeof *a);
    keep_box *box = calloc(1, sizeof *box);
    char *file = NULL;
    cJSON *dir_cfg = NULL;
    if (a == NULL || box == NULL || (c.own = lm_ts_create("made")) == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    if (c.opts->lora_alpha != 0 && c.opts->lora_scale != 0) {
        rc = lm_fail(err, LM_E_USAGE, "Usage", "give --lora-alpha or --lora-scale, not both");
        goto done;
    }
    if (base != NULL && (rc = base_build(base, &c.base, err)) != LM_OK)
        goto done;
    if (buf != NULL) {
        lm_tensor_set *ts = NULL;
        int root = 0;
        if ((rc = load_buffer(&c, buf, n_buf, path, &ts, &root, err)) == LM_OK)
            rc = read_set(&c, ts, root, NULL, err);
    } else if (fm_is_dir(path)) {
        fm_dir_kind k = dir_kind(path, &file);
        if (k == FD_MLX) {
            rc = fm_read_mlx(&c, path, err);
        } else if (k == FD_RAW) {
            rc = fm_read_raw_dir(&c, path, err);
        } else if (k == FD_TORCHTUNE_DIR || k == FD_FILE) {
            if (k == FD_TORCHTUNE_DIR) {
                char *cfg = fm_join(path, "adapter_config.json");
                char *text = cfg ? fm_read_text(cfg, (size_t)16 << 20, err) : NULL;
                dir_cfg = text ? cJSON_Parse(text) : NULL;
                c.config_path = cfg;
                free(text);
            }
            rc = read_file_input(&c, file, dir_cfg, err);
        } else {
            rc = lm_fail(err, LM_E_FORMAT, "UnknownFormat", "no adapter here: no PEFT adapter_config.json with "
                         "weights, no mlx-lm adapters.safetensors, no up/down files and not exactly one weights file");
        }
    } else if (fm_is_file(path)) {
        rc = read_file_input(&c, path, NULL, err);
    } else if ((rc = lm_fail_not_regular(err, path)) == LM_OK) {
        rc = lm_fail_errno(err, ENOENT, "cannot open the adapter");
    }
    if (rc == LM_OK)
        rc = resolve_all(&c, err);
    if (rc == LM_OK)
        rc = check_base(&c, err);
    if (rc == LM_OK)
        rc = emit(&c, &a->config_json, &a->ts, &a->mapping, err);
    if (rc == LM_OK)
        rc = not_peft_reason(&c, &a->not_peft, err);
    if (rc != LM_OK)
        goto done;
    a->format = c.format ? c.format : "?";
    const char *slash = strrchr(path, '/');
    a->dir = buf == NULL && fm_is_dir(path) ? strdup(path)
           : slash ? strndup(path, (size_t)(slash - path) ? (size_t)(slash - path) : 1) : strdup(".");
    a->weights_path = strdup(c.weights_path ? c.weights_path : path);
    a->config_path = strdup(c.config_path ? c.config_path : a->weights_path ? a->weights_path : path);
    if (a->dir == NULL || a->weights_path == NULL || a->config_path == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    a->notes = c.notes;
    a->n_notes = c.n_notes;
    c.notes = NULL;
    c.n_notes = 0;
    /* the data lives in the source sets and in the made tensors */
    if (fm_keep(&c, c.own, err) != LM_OK) {
        c.own = NULL;
        rc = LM_E_NOMEM;
        goto done;
    }
    c.own = NULL;
    box->sets = c.keep;
    box->n = c.n_keep;
    c.keep = NULL;
    c.n_keep = 0;
    a->keep = box;
    box = NULL;
    *out = a;
    a = NULL;
done:
    if (rc != LM_OK)
        lm_err_set_path(err, c.weights_path ? c.weights_path : path);
    cJSON_Delete(dir_cfg);
    free(file);
    ctx_free_modules(&c);
    for (size_t i = 0; i < c.n_keep; i++)
        lm_ts_free(c.keep[i]);
    free(c.keep);
    lm_ts_free(c.own);
    for (size_t i = 0; i < c.n_notes; i++)
        free(c.notes[i]);
    free(c.notes);
    free(c.config_path);
    free(c.weights_path);
    base_free(c.base);
    free(box);
    lm_norm_adapter_free(a);
    return rc;
}

lm_code lm_formats_normalise(const char *path, const lm_model *base, const lm_format_opts *opts,
                             lm_norm_adapter **out, lm_err *err)
{
    return normalise(path, NULL, 0, base, opts, out, err);
}

lm_code lm_formats_normalise_buffer(const void *buf, size_t n_bytes, const char *name, const lm_model *base,
                                    const lm_format_opts *opts, lm_norm_adapter **out, lm_err *err)
{
    return normalise(name, buf ? buf : "", n_bytes, base, opts, out, err);
}
