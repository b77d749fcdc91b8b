/* SPDX-License-Identifier: MIT */
/* pickle_reader.c : the restricted pickle machine (see pickle_reader.h).
 * Nothing here calls out: the only "callables" are three C emulations (OrderedDict(), the
 * tensor rebuild, the parameter rebuild) chosen from a fixed table.  Every count that input can
 * grow (objects, items, stack, memo, nesting, string length) is bounded before allocating. */
#include "pickle_reader.h"

#include "compat.h"
#include "lm_error.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    G_ORDERED_DICT = 1, G_REBUILD_TENSOR_V2, G_REBUILD_PARAMETER, G_REBUILD_PARAMETER_STATE,
    G_STORAGE /* + index into k_storages */
};

static const struct {
    const char *module, *name;
    int id;
} k_callables[] = {
    {"collections", "OrderedDict", G_ORDERED_DICT},
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR_V2},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAMETER},
    {"torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PARAMETER_STATE},
};

static const struct {
    const char *name;
    lm_dtype dtype;
    unsigned elem_bytes;
} k_storages[] = {
    {"FloatStorage", LM_DT_F32, 4}, {"HalfStorage", LM_DT_F16, 2}, {"BFloat16Storage", LM_DT_BF16, 2},
    {"DoubleStorage", LM_DT_F64, 8}, {"LongStorage", LM_DT_I64, 8}, {"IntStorage", LM_DT_I32, 4},
    {"ShortStorage", LM_DT_I16, 2}, {"CharStorage", LM_DT_I8, 1}, {"ByteStorage", LM_DT_U8, 1},
    {"BoolStorage", LM_DT_BOOL, 1},
};

typedef struct pk_obj {
    uint8_t kind;     /* lm_pk_kind */
    uint16_t depth;   /* container nesting below this object */
    uint32_t n, cap;  /* containers: items used / allocated (a dict holds key, value, ...) */
    union {
        int64_t i;
        double f;
        struct { size_t off, n_bytes; } s; /* STR and BIGINT: bytes in the input */
        lm_pk_ref *items;                  /* containers; from malloc() */
        int global;                        /* GLOBAL: G_* id */
        size_t index;                      /* STORAGE, TENSOR: index into pk's tables */
    } u;
} pk_obj;

struct lm_pickle {
    const uint8_t *buf;
    size_t n_bytes;
    pk_obj *obj;
    size_t n_obj, cap_obj;
    size_t n_items;
    lm_pk_storage *st;
    size_t n_st, cap_st;
    size_t *st_hash; /* open addressing, storage index + 1, 0 = empty */
    size_t hash_cap;
    lm_pk_tensor *t;
    size_t n_t, cap_t;
    lm_pk_ref root;
};

enum { REF_NONE = 0, REF_FALSE = 1, REF_TRUE = 2, N_FIXED = 3 };
#define MEMO_UNSET UINT32_MAX

typedef struct parser {
    lm_pickle *pk;
    const lm_pk_options *opt;
    lm_pk_limits lim;
    lm_err *err;
    size_t pos, op_pos;
    lm_pk_ref *stack;
    size_t sp, cap_stack;
    size_t *marks;
    size_t n_marks, cap_marks;
    lm_pk_ref *memo;
    size_t cap_memo, n_memo_set;
} parser;

/* ---------------------------------------------------------------------------------------- */

static void printable(char *dst, size_t cap, const uint8_t *src, size_t n)
{
    size_t i = 0, j = 0;
    for (; i < n && j + 4 < cap; i++)
        dst[j++] = (src[i] >= 0x20 && src[i] < 0x7f) ? (char)src[i] : '?';
    if (i < n) { /* cut short: there is room for the dots */
        memcpy(dst + j, "...", 3);
        j += 3;
    }
    dst[j] = '\0';
}

static lm_code fail(parser *p, lm_code code, const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static lm_code fail(parser *p, lm_code code, const char *kind, const char *fmt, ...)
{
    if (p->err == NULL || p->err->code != LM_OK)
        return code;
    char msg[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *label = p->opt->label;
    lm_fail(p->err, code, kind, "%s%s%s", label ? label : "", label ? ": " : "", msg);
    p->err->offset = p->opt->base_offset + p->op_pos;
    return code;
}

static lm_code nomem(parser *p)
{
    return fail(p, LM_E_NOMEM, NULL, "out of memory");
}

static lm_code grow(parser *p, void **arr, size_t *cap, size_t need, size_t elem, size_t first)
{
    if (need <= *cap)
        return LM_OK;
    size_t c = *cap ? *cap : first;
    while (c < need)
        c *= 2;
    void *q = realloc(*arr, c * elem);
    if (q == NULL)
        return nomem(p);
    *arr = q;
    *cap = c;
    return LM_OK;
}

static lm_code new_obj(parser *p, lm_pk_kind kind, lm_pk_ref *out)
{
    lm_pickle *pk = p->pk;
    if (pk->n_obj >= p->lim.max_objects)
        return fail(p, LM_E_FORMAT, "PickleTooLarge", "pickle creates more than %zu objects",
                    p->lim.max_objects);
    if (grow(p, (void **)&pk->obj, &pk->cap_obj, pk->n_obj + 1, sizeof *pk->obj, 256))
        return LM_E_NOMEM;
    pk_obj *o = &pk->obj[pk->n_obj];
    memset(o, 0, sizeof *o);
    o->kind = (uint8_t)kind;
    *out = (lm_pk_ref)pk->n_obj++;
    return LM_OK;
}

static int is_container(lm_pk_kind k)
{
    return k == LM_PK_TUPLE || k == LM_PK_LIST || k == LM_PK_DICT;
}

static lm_code add_item(parser *p, lm_pk_ref c, lm_pk_ref item)
{
    lm_pickle *pk = p->pk;
    if (pk->n_items >= p->lim.max_items)
        return fail(p, LM_E_FORMAT, "PickleTooLarge", "pickle stores more than %zu container items",
                    p->lim.max_items);
    unsigned depth = pk->obj[item].depth + 1u;
    if (depth > p->lim.max_depth)
        return fail(p, LM_E_FORMAT, "PickleTooDeep", "pickle nests containers deeper than %zu",
                    p->lim.max_depth);
    pk_obj *o = &pk->obj[c];
    if (o->n == o->cap) {
        size_t cap = o->cap ? (size_t)o->cap * 2 : 4;
        lm_pk_ref *q = realloc(o->u.items, cap * sizeof *q);
        if (q == NULL)
            return nomem(p);
        o->u.items = q;
        o->cap = (uint32_t)cap;
    }
    o->u.items[o->n++] = item;
    if (depth > o->depth)
        o->depth = (uint16_t)depth;
    pk->n_items++;
    return LM_OK;
}

static lm_code push(parser *p, lm_pk_ref r)
{
    if (p->sp >= p->lim.max_stack)
        return fail(p, LM_E_FORMAT, "PickleTooLarge", "pickle stack grows beyond %zu entries",
                    p->lim.max_stack);
    if (grow(p, (void **)&p->stack, &p->cap_stack, p->sp + 1, sizeof *p->stack, 64))
        return LM_E_NOMEM;
    p->stack[p->sp++] = r;
    return LM_OK;
}

static size_t mark_base(const parser *p)
{
    return p->n_marks ? p->marks[p->n_marks - 1] : 0;
}

static lm_code pop(parser *p, lm_pk_ref *r)
{
    if (p->sp <= mark_base(p))
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle stack underflow");
    *r = p->stack[--p->sp];
    return LM_OK;
}

static lm_code top(parser *p, lm_pk_ref *r)
{
    if (p->sp <= mark_base(p))
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle stack underflow");
    *r = p->stack[p->sp - 1];
    return LM_OK;
}

/* Pops the topmost MARK: the items above it are stack[*base .. p->sp). */
static lm_code pop_mark(parser *p, size_t *base)
{
    if (p->n_marks == 0)
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle uses a MARK that was never set");
    *base = p->marks[--p->n_marks];
    return LM_OK;
}

static lm_code make_container(parser *p, lm_pk_kind kind, const lm_pk_ref *items, size_t n,
                              lm_pk_ref *out)
{
    lm_code rc = new_obj(p, kind, out);
    for (size_t i = 0; rc == LM_OK && i < n; i++)
        rc = add_item(p, *out, items[i]);
    return rc;
}

static lm_code need(parser *p, size_t k)
{
    if (p->pk->n_bytes - p->pos < k)
        return fail(p, LM_E_FORMAT, "TruncatedPickle", "pickle is truncated (opcode needs %zu more bytes)", k);
    return LM_OK;
}

/* UTF-8 as Python's 'surrogatepass' decoder accepts it (surrogates allowed, no overlongs). */
static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp, min;
        if (c < 0x80) { i++; continue; }
        else if ((c & 0xe0) == 0xc0) { k = 1; cp = c & 0x1f; min = 0x80; }
        else if ((c & 0xf0) == 0xe0) { k = 2; cp = c & 0x0f; min = 0x800; }
        else if ((c & 0xf8) == 0xf0) { k = 3; cp = c & 0x07; min = 0x10000; }
        else return 0;
        if (n - i - 1 < k)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff)
            return 0;
        i += k + 1;
    }
    return 1;
}

static lm_code op_string(parser *p, size_t len_bytes)
{
    lm_code rc = need(p, len_bytes);
    if (rc)
        return rc;
    const uint8_t *b = p->pk->buf + p->pos;
    uint64_t n = len_bytes == 1 ? b[0] : len_bytes == 4 ? lm_load_le32(b) : lm_load_le64(b);
    p->pos += len_bytes;
    if (n > p->lim.max_str_bytes)
        return fail(p, LM_E_FORMAT, "PickleTooLarge", "pickle string of %llu bytes (limit %zu)",
                    (unsigned long long)n, p->lim.max_str_bytes);
    if ((rc = need(p, (size_t)n)))
        return rc;
    if (!utf8_valid(p->pk->buf + p->pos, (size_t)n))
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle string is not valid UTF-8");
    lm_pk_ref r;
    if ((rc = new_obj(p, LM_PK_STR, &r)))
        return rc;
    p->pk->obj[r].u.s.off = p->pos;
    p->pk->obj[r].u.s.n_bytes = (size_t)n;
    p->pos += (size_t)n;
    return push(p, r);
}

static lm_code push_int(parser *p, int64_t v)
{
    lm_pk_ref r;
    lm_code rc = new_obj(p, LM_PK_INT, &r);
    if (rc)
        return rc;
    p->pk->obj[r].u.i = v;
    return push(p, r);
}

static lm_code op_long1(parser *p)
{
    lm_code rc = need(p, 1);
    if (rc)
        return rc;
    size_t n = p->pk->buf[p->pos++];
    if ((rc = need(p, n)))
        return rc;
    const uint8_t *b = p->pk->buf + p->pos;
    if (n > 16)
        return fail(p, LM_E_UNSUPPORTED, "UnsupportedValue", "pickle integer of %zu bytes is too large", n);
    if (n > 8) {
        lm_pk_ref r;
        if ((rc = new_obj(p, LM_PK_BIGINT, &r)))
            return rc;
        p->pk->obj[r].u.s.off = p->pos;
        p->pk->obj[r].u.s.n_bytes = n;
        p->pos += n;
        return push(p, r);
    }
    uint64_t u = 0;
    for (size_t i = 0; i < n; i++)
        u |= (uint64_t)b[i] << (8 * i);
    if (n > 0 && n < 8 && (b[n - 1] & 0x80))
        u |= ~(uint64_t)0 << (8 * n); /* sign-extend */
    p->pos += n;
    int64_t v;
    memcpy(&v, &u, sizeof v);
    return push_int(p, v);
}

static lm_code set_memo(parser *p, uint64_t key)
{
    lm_pk_ref r;
    lm_code rc = top(p, &r);
    if (rc)
        return rc;
    if (key >= p->lim.max_memo)
        return fail(p, LM_E_FORMAT, "PickleTooLarge", "pickle memo key %llu exceeds the limit %zu",
                    (unsigned long long)key, p->lim.max_memo);
    size_t old = p->cap_memo;
    if (grow(p, (void **)&p->memo, &p->cap_memo, (size_t)key + 1, sizeof *p->memo, 64))
        return LM_E_NOMEM;
    for (size_t i = old; i < p->cap_memo; i++)
        p->memo[i] = MEMO_UNSET;
    if (p->memo[key] == MEMO_UNSET)
        p->n_memo_set++;
    p->memo[key] = r;
    return LM_OK;
}

static lm_code get_memo(parser *p, uint64_t key)
{
    if (key >= p->cap_memo || p->memo[key] == MEMO_UNSET)
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle reads memo key %llu that was never set",
                    (unsigned long long)key);
    return push(p, p->memo[key]);
}

/* Looks module.name up in the allow-lists; refuses anything else. */
static lm_code push_global(parser *p, const uint8_t *mod, size_t n_mod, const uint8_t *name, size_t n_name)
{
    int id = 0;
    for (size_t i = 0; i < LM_ARRAY_LEN(k_callables) && !id; i++)
        if (strlen(k_callables[i].module) == n_mod && memcmp(k_callables[i].module, mod, n_mod) == 0 &&
            strlen(k_callables[i].name) == n_name && memcmp(k_callables[i].name, name, n_name) == 0)
            id = k_callables[i].id;
    if (n_mod == 5 && memcmp(mod, "torch", 5) == 0)
        for (size_t i = 0; i < LM_ARRAY_LEN(k_storages) && !id; i++)
            if (strlen(k_storages[i].name) == n_name && memcmp(k_storages[i].name, name, n_name) == 0)
                id = G_STORAGE + (int)i;
    if (!id) {
        char m[100], n[100];
        printable(m, sizeof m, mod, n_mod);
        printable(n, sizeof n, name, n_name);
        return fail(p, LM_E_UNSUPPORTED, "ForbiddenGlobal", "pickle calls forbidden global '%s.%s'", m, n);
    }
    lm_pk_ref r;
    lm_code rc = new_obj(p, LM_PK_GLOBAL, &r);
    if (rc)
        return rc;
    p->pk->obj[r].u.global = id;
    return push(p, r);
}

/* GLOBAL and INST carry "module\nname\n" inline.  @return 1 with the line, 0 if none. */
static int scan_line(parser *p, const uint8_t **s, size_t *n)
{
    const uint8_t *b = p->pk->buf + p->pos;
    size_t avail = p->pk->n_bytes - p->pos, limit = avail < 256 ? avail : 256;
    const uint8_t *nl = memchr(b, '\n', limit);
    if (nl == NULL)
        return 0;
    *s = b;
    *n = (size_t)(nl - b);
    p->pos += *n + 1;
    return 1;
}

static lm_code read_line(parser *p, const uint8_t **s, size_t *n)
{
    if (!scan_line(p, s, n))
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle GLOBAL name is unterminated or too long");
    return LM_OK;
}

static const char *global_name(int id, char *buf, size_t cap)
{
    if (id >= G_STORAGE) {
        snprintf(buf, cap, "torch.%s", k_storages[id - G_STORAGE].name);
        return buf;
    }
    for (size_t i = 0; i < LM_ARRAY_LEN(k_callables); i++)
        if (k_callables[i].id == id)
            snprintf(buf, cap, "%s.%s", k_callables[i].module, k_callables[i].name);
    return buf;
}

/* ---------------------------------------------------------------------------------------- */

static const pk_obj *obj(const parser *p, lm_pk_ref r)
{
    return &p->pk->obj[r];
}

static int obj_uint(const parser *p, lm_pk_ref r, uint64_t *v)
{
    const pk_obj *o = obj(p, r);
    if (o->kind != LM_PK_INT || o->u.i < 0)
        return 0;
    *v = (uint64_t)o->u.i;
    return 1;
}

static int obj_str_is(const parser *p, lm_pk_ref r, const char *s)
{
    const pk_obj *o = obj(p, r);
    return o->kind == LM_PK_STR && o->u.s.n_bytes == strlen(s) &&
           memcmp(p->pk->buf + o->u.s.off, s, o->u.s.n_bytes) == 0;
}

static size_t hash_key(const uint8_t *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 1099511628211ull;
    return (size_t)h;
}

static lm_code rehash(parser *p)
{
    lm_pickle *pk = p->pk;
    size_t cap = pk->hash_cap ? pk->hash_cap * 2 : 64;
    size_t *h = calloc(cap, sizeof *h);
    if (h == NULL)
        return nomem(p);
    for (size_t i = 0; i < pk->n_st; i++) {
        size_t j = hash_key((const uint8_t *)pk->st[i].key, strlen(pk->st[i].key)) & (cap - 1);
        while (h[j])
            j = (j + 1) & (cap - 1);
        h[j] = i + 1;
    }
    free(pk->st_hash);
    pk->st_hash = h;
    pk->hash_cap = cap;
    return LM_OK;
}

/* BINPERSID: ('storage', torch.<T>Storage, key, location, numel[, None]) -> STORAGE object. */
static lm_code op_persid(parser *p)
{
    lm_pk_ref pid = REF_NONE, r = REF_NONE;
    lm_code rc = pop(p, &pid);
    if (rc)
        return rc;
    const pk_obj *o = obj(p, pid);
    if (o->kind != LM_PK_TUPLE || (o->n != 5 && o->n != 6) || !obj_str_is(p, o->u.items[0], "storage"))
        return fail(p, LM_E_UNSUPPORTED, "UnsupportedPersistentId",
                    "pickle persistent id is not a ('storage', type, key, location, numel) tuple");
    const lm_pk_ref *it = o->u.items;
    const pk_obj *type = obj(p, it[1]), *key = obj(p, it[2]), *loc = obj(p, it[3]);
    uint64_t n_elems;
    if (type->kind != LM_PK_GLOBAL || type->u.global < G_STORAGE)
        return fail(p, LM_E_FORMAT, "InvalidStorage", "persistent id names a %s, not a storage type",
                    lm_pk_kind_name((lm_pk_kind)type->kind));
    if (key->kind != LM_PK_STR || key->u.s.n_bytes == 0 || key->u.s.n_bytes > 255 ||
        memchr(p->pk->buf + key->u.s.off, '\0', key->u.s.n_bytes) ||
        memchr(p->pk->buf + key->u.s.off, '/', key->u.s.n_bytes))
        return fail(p, LM_E_FORMAT, "InvalidStorage", "storage key is not a plain string");
    if (loc->kind != LM_PK_STR || !obj_uint(p, it[4], &n_elems))
        return fail(p, LM_E_FORMAT, "InvalidStorage", "storage location or element count is malformed");
    if (o->n == 6 && it[5] != REF_NONE)
        return fail(p, LM_E_UNSUPPORTED, "UnsupportedStorage", "legacy storage views are not supported");
    size_t ti = (size_t)(type->u.global - G_STORAGE);
    uint64_t n_bytes;
    if (lm_mul_overflow_u64(n_elems, k_storages[ti].elem_bytes, &n_bytes))
        return fail(p, LM_E_FORMAT, "InvalidStorage", "storage size overflows");

    lm_pickle *pk = p->pk;
    const uint8_t *ks = pk->buf + key->u.s.off;
    size_t kn = key->u.s.n_bytes, found = SIZE_MAX;
    char kbuf[256];
    memcpy(kbuf, ks, kn);
    kbuf[kn] = '\0';
    if (pk->hash_cap) {
        for (size_t j = hash_key(ks, kn) & (pk->hash_cap - 1); pk->st_hash[j]; j = (j + 1) & (pk->hash_cap - 1))
            if (strcmp(pk->st[pk->st_hash[j] - 1].key, kbuf) == 0) {
                found = pk->st_hash[j] - 1;
                break;
            }
    }
    if (found != SIZE_MAX) {
        const lm_pk_storage *s = &pk->st[found];
        if (s->dtype != k_storages[ti].dtype || s->n_elems != n_elems)
            return fail(p, LM_E_UNSUPPORTED, "UnsupportedStorage",
                        "storage '%s' is referenced as %s[%llu] and as %s[%llu]", kbuf,
                        lm_dtype_name(s->dtype), (unsigned long long)s->n_elems,
                        lm_dtype_name(k_storages[ti].dtype), (unsigned long long)n_elems);
    } else {
        if (grow(p, (void **)&pk->st, &pk->cap_st, pk->n_st + 1, sizeof *pk->st, 16))
            return LM_E_NOMEM;
        if ((pk->n_st + 1) * 2 > pk->hash_cap && rehash(p))
            return LM_E_NOMEM;
        lm_pk_storage *s = &pk->st[pk->n_st];
        memset(s, 0, sizeof *s);
        if ((s->key = strdup(kbuf)) == NULL)
            return nomem(p);
        s->dtype = k_storages[ti].dtype;
        s->elem_bytes = k_storages[ti].elem_bytes;
        s->n_elems = n_elems;
        s->n_bytes = n_bytes;
        found = pk->n_st++;
        size_t j = hash_key(ks, kn) & (pk->hash_cap - 1);
        while (pk->st_hash[j])
            j = (j + 1) & (pk->hash_cap - 1);
        pk->st_hash[j] = found + 1;
        /* the callback's message names the storage and the entry; no pickle offset is added */
        if (p->opt->resolve != NULL && (rc = p->opt->resolve(p->opt->ctx, found, s, p->err)))
            return rc;
    }
    if ((rc = new_obj(p, LM_PK_STORAGE, &r)))
        return rc;
    pk->obj[r].u.index = found;
    return push(p, r);
}

static lm_code int_tuple(parser *p, lm_pk_ref r, const char *what, uint64_t *v, size_t *n)
{
    const pk_obj *o = obj(p, r);
    if (o->kind != LM_PK_TUPLE)
        return fail(p, LM_E_FORMAT, "InvalidTensor", "tensor %s is a %s, not a tuple", what,
                    lm_pk_kind_name((lm_pk_kind)o->kind));
    if (o->n > LM_PK_MAX_DIMS)
        return fail(p, LM_E_UNSUPPORTED, "TooManyDims", "tensor has %u dimensions (at most %d)",
                    (unsigned)o->n, LM_PK_MAX_DIMS);
    for (size_t i = 0; i < o->n; i++)
        if (!obj_uint(p, o->u.items[i], &v[i]))
            return fail(p, LM_E_FORMAT, "InvalidTensor", "tensor %s holds a non-integer or negative value", what);
    *n = o->n;
    return LM_OK;
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]) */
static lm_code rebuild_tensor(parser *p, lm_pk_ref args, lm_pk_ref *out)
{
    const pk_obj *a = obj(p, args);
    if (a->n != 6 && a->n != 7)
        return fail(p, LM_E_FORMAT, "InvalidTensor", "_rebuild_tensor_v2 takes 6 or 7 arguments, got %u",
                    (unsigned)a->n);
    const lm_pk_ref *it = a->u.items;
    lm_pk_tensor t;
    memset(&t, 0, sizeof t);
    const pk_obj *st = obj(p, it[0]);
    if (st->kind != LM_PK_STORAGE)
        return fail(p, LM_E_FORMAT, "InvalidTensor", "tensor storage is a %s",
                    lm_pk_kind_name((lm_pk_kind)st->kind));
    t.storage = st->u.index;
    size_t n_stride;
    lm_code rc;
    if (!obj_uint(p, it[1], &t.offset))
        return fail(p, LM_E_FORMAT, "InvalidTensor", "tensor storage offset is not a non-negative integer");
    if ((rc = int_tuple(p, it[2], "size", t.shape, &t.n_dims)) || (rc = int_tuple(p, it[3], "stride", t.stride, &n_stride)))
        return rc;
    if (n_stride != t.n_dims)
        return fail(p, LM_E_FORMAT, "InvalidTensor", "tensor has %zu sizes but %zu strides", t.n_dims, n_stride);
    if (obj(p, it[4])->kind != LM_PK_BOOL || obj(p, it[5])->kind != LM_PK_DICT ||
        (a->n == 7 && obj(p, it[6])->kind != LM_PK_DICT && it[6] != REF_NONE))
        return fail(p, LM_E_FORMAT, "InvalidTensor", "tensor requires_grad, hooks or metadata malformed");

    lm_pk_storage *s = &p->pk->st[t.storage];
    uint64_t n_elems = 1, last = t.offset;
    for (size_t d = 0; d < t.n_dims; d++)
        if (lm_mul_overflow_u64(n_elems, t.shape[d], &n_elems))
            return fail(p, LM_E_FORMAT, "InvalidTensor", "tensor shape product overflows");
    t.n_elems = n_elems;
    if (n_elems > 0) {
        for (size_t d = 0; d < t.n_dims; d++) {
            uint64_t span;
            if (lm_mul_overflow_u64(t.shape[d] - 1, t.stride[d], &span) || lm_add_overflow_u64(last, span, &last))
                return fail(p, LM_E_FORMAT, "InvalidStorage", "tensor view extent overflows");
        }
        if (last >= s->n_elems)
            return fail(p, LM_E_FORMAT, "InvalidStorage",
                        "tensor view (offset %llu, last element %llu) lies outside storage '%s' of %llu elements",
                        (unsigned long long)t.offset, (unsigned long long)last, s->key,
                        (unsigned long long)s->n_elems);
        if (n_elems > s->n_elems)
            return fail(p, LM_E_UNSUPPORTED, "UnsupportedStorage",
                        "tensor of %llu elements overlaps itself in storage '%s' of %llu (broadcast views are not supported)",
                        (unsigned long long)n_elems, s->key, (unsigned long long)s->n_elems);
    } else if (t.offset > s->n_elems) {
        return fail(p, LM_E_FORMAT, "InvalidStorage", "tensor offset %llu lies outside storage '%s' of %llu elements",
                    (unsigned long long)t.offset, s->key, (unsigned long long)s->n_elems);
    }

    lm_pickle *pk = p->pk;
    if (grow(p, (void **)&pk->t, &pk->cap_t, pk->n_t + 1, sizeof *pk->t, 16))
        return LM_E_NOMEM;
    if ((rc = new_obj(p, LM_PK_TENSOR, out)))
        return rc;
    pk->t[pk->n_t] = t;
    pk->obj[*out].u.index = pk->n_t++;
    s->n_tensors++;
    return LM_OK;
}

static lm_code op_reduce(parser *p)
{
    lm_pk_ref args = REF_NONE, fn = REF_NONE, r = REF_NONE;
    lm_code rc;
    if ((rc = pop(p, &args)) || (rc = pop(p, &fn)))
        return rc;
    const pk_obj *f = obj(p, fn), *a = obj(p, args);
    if (f->kind != LM_PK_GLOBAL)
        return fail(p, LM_E_UNSUPPORTED, "ForbiddenCall", "pickle REDUCE calls a %s",
                    lm_pk_kind_name((lm_pk_kind)f->kind));
    if (a->kind != LM_PK_TUPLE)
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle REDUCE arguments are a %s, not a tuple",
                    lm_pk_kind_name((lm_pk_kind)a->kind));
    switch (f->u.global) {
    case G_ORDERED_DICT:
        if (a->n != 0)
            return fail(p, LM_E_UNSUPPORTED, "ForbiddenCall", "OrderedDict() is only allowed without arguments");
        rc = new_obj(p, LM_PK_DICT, &r);
        break;
    case G_REBUILD_TENSOR_V2:
        rc = rebuild_tensor(p, args, &r);
        break;
    case G_REBUILD_PARAMETER:
    case G_REBUILD_PARAMETER_STATE:
        /* (data, requires_grad, backward_hooks[, state]): the parameter is its tensor */
        if (a->n != (f->u.global == G_REBUILD_PARAMETER ? 3u : 4u) || obj(p, a->u.items[0])->kind != LM_PK_TENSOR)
            return fail(p, LM_E_FORMAT, "InvalidTensor", "_rebuild_parameter arguments malformed");
        r = a->u.items[0];
        break;
    default: {
        char name[80];
        return fail(p, LM_E_UNSUPPORTED, "ForbiddenCall", "pickle REDUCE on '%s' is not allowed",
                    global_name(f->u.global, name, sizeof name));
    }
    }
    return rc ? rc : push(p, r);
}

static lm_code op_build(parser *p)
{
    lm_pk_ref state = REF_NONE, target = REF_NONE;
    lm_code rc;
    if ((rc = pop(p, &state)) || (rc = top(p, &target)))
        return rc;
    /* OrderedDict state dicts carry their _metadata attribute this way: inert, so ignored */
    if (obj(p, target)->kind != LM_PK_DICT)
        return fail(p, LM_E_UNSUPPORTED, "ForbiddenCall", "pickle BUILD on a %s is not allowed",
                    lm_pk_kind_name((lm_pk_kind)obj(p, target)->kind));
    return LM_OK;
}

static lm_code op_setitems(parser *p, int batch)
{
    size_t base = 0;
    lm_pk_ref d;
    lm_code rc;
    if (batch) {
        if ((rc = pop_mark(p, &base)))
            return rc;
    } else {
        if (p->sp < mark_base(p) + 2)
            return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle stack underflow");
        base = p->sp - 2;
    }
    if ((p->sp - base) % 2 != 0)
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle SETITEMS with an odd number of items");
    if (base <= mark_base(p))
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle stack underflow");
    d = p->stack[base - 1];
    if (obj(p, d)->kind != LM_PK_DICT)
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle SETITEM on a %s",
                    lm_pk_kind_name((lm_pk_kind)obj(p, d)->kind));
    for (size_t i = base; i < p->sp; i++)
        if ((rc = add_item(p, d, p->stack[i])))
            return rc;
    p->sp = base;
    return LM_OK;
}

static lm_code op_appends(parser *p, int batch)
{
    size_t base = 0;
    lm_code rc;
    if (batch) {
        if ((rc = pop_mark(p, &base)))
            return rc;
    } else {
        if (p->sp < mark_base(p) + 1)
            return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle stack underflow");
        base = p->sp - 1;
    }
    if (base <= mark_base(p))
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle stack underflow");
    lm_pk_ref l = p->stack[base - 1];
    if (obj(p, l)->kind != LM_PK_LIST)
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle APPEND on a %s",
                    lm_pk_kind_name((lm_pk_kind)obj(p, l)->kind));
    for (size_t i = base; i < p->sp; i++)
        if ((rc = add_item(p, l, p->stack[i])))
            return rc;
    p->sp = base;
    return LM_OK;
}

static lm_code op_tuple_n(parser *p, size_t n)
{
    if (p->sp < mark_base(p) + n)
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle stack underflow");
    lm_pk_ref r;
    lm_code rc = make_container(p, LM_PK_TUPLE, p->stack + p->sp - n, n, &r);
    if (rc)
        return rc;
    p->sp -= n;
    return push(p, r);
}

static lm_code op_marked(parser *p, lm_pk_kind kind)
{
    size_t base = 0;
    lm_pk_ref r;
    lm_code rc = pop_mark(p, &base);
    if (rc)
        return rc;
    if (kind == LM_PK_DICT && (p->sp - base) % 2 != 0)
        return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle DICT with an odd number of items");
    if ((rc = make_container(p, kind, p->sp > base ? p->stack + base : NULL, p->sp - base, &r)))
        return rc;
    p->sp = base;
    return push(p, r);
}

static const char *opcode_name(uint8_t op)
{
    switch (op) {
    case 'i': return "INST";
    case 'o': return "OBJ";
    case 0x81: return "NEWOBJ";
    case 0x92: return "NEWOBJ_EX";
    case 'P': return "PERSID";
    case 'I': return "INT";
    case 'L': return "LONG";
    case 0x8b: return "LONG4";
    case 'F': return "FLOAT";
    case 'S': return "STRING";
    case 'T': return "BINSTRING";
    case 'U': return "SHORT_BINSTRING";
    case 'V': return "UNICODE";
    case 'B': return "BINBYTES";
    case 'C': return "SHORT_BINBYTES";
    case 0x8e: return "BINBYTES8";
    case 0x96: return "BYTEARRAY8";
    case 0x97: return "NEXT_BUFFER";
    case 0x98: return "READONLY_BUFFER";
    case 'g': return "GET";
    case 'p': return "PUT";
    case '2': return "DUP";
    case 0x82: return "EXT1";
    case 0x83: return "EXT2";
    case 0x84: return "EXT4";
    case 0x8f: return "EMPTY_SET";
    case 0x90: return "ADDITEMS";
    case 0x91: return "FROZENSET";
    default: return NULL;
    }
}

static lm_code step(parser *p, int *stop)
{
    lm_pickle *pk = p->pk;
    p->op_pos = p->pos;
    if (p->pos >= pk->n_bytes)
        return fail(p, LM_E_FORMAT, "TruncatedPickle", "pickle ends without STOP");
    uint8_t op = pk->buf[p->pos++];
    const uint8_t *b = pk->buf + p->pos;
    lm_pk_ref r = REF_NONE, a1 = REF_NONE, a2 = REF_NONE;
    lm_code rc;
    switch (op) {
    case 0x80: /* PROTO */
        if ((rc = need(p, 1)))
            return rc;
        if (b[0] > 5)
            return fail(p, LM_E_UNSUPPORTED, "UnsupportedOpcode", "pickle protocol %u is not supported", b[0]);
        p->pos++;
        return LM_OK;
    case 0x95: /* FRAME: a length hint only */
        if ((rc = need(p, 8)))
            return rc;
        p->pos += 8;
        if (lm_load_le64(b) > pk->n_bytes - p->pos)
            return fail(p, LM_E_FORMAT, "TruncatedPickle", "pickle FRAME runs past the end");
        return LM_OK;
    case '.': /* STOP */
        if ((rc = pop(p, &r)))
            return rc;
        if (p->sp != 0 || p->n_marks != 0)
            return fail(p, LM_E_FORMAT, "InvalidPickle",
                        "pickle stops with %zu values on the stack and %zu open marks (expected one value)",
                        p->sp + 1, p->n_marks);
        pk->root = r;
        *stop = 1;
        return LM_OK;
    case '(': /* MARK */
        if (p->n_marks >= p->lim.max_depth)
            return fail(p, LM_E_FORMAT, "PickleTooDeep", "pickle nests MARKs deeper than %zu", p->lim.max_depth);
        if (grow(p, (void **)&p->marks, &p->cap_marks, p->n_marks + 1, sizeof *p->marks, 16))
            return LM_E_NOMEM;
        p->marks[p->n_marks++] = p->sp;
        return LM_OK;
    case '0': /* POP: an item, or the topmost mark when nothing sits above it */
        if (p->n_marks && p->sp == mark_base(p)) {
            p->n_marks--;
            return LM_OK;
        }
        return pop(p, &r);
    case '1': { /* POP_MARK */
        size_t base = 0;
        if ((rc = pop_mark(p, &base)))
            return rc;
        p->sp = base;
        return LM_OK;
    }
    case '}': case ']': case ')':
        if ((rc = new_obj(p, op == '}' ? LM_PK_DICT : op == ']' ? LM_PK_LIST : LM_PK_TUPLE, &r)))
            return rc;
        return push(p, r);
    case 'd': return op_marked(p, LM_PK_DICT);
    case 'l': return op_marked(p, LM_PK_LIST);
    case 't': return op_marked(p, LM_PK_TUPLE);
    case 0x85: return op_tuple_n(p, 1);
    case 0x86: return op_tuple_n(p, 2);
    case 0x87: return op_tuple_n(p, 3);
    case 'N': return push(p, REF_NONE);
    case 0x88: return push(p, REF_TRUE);
    case 0x89: return push(p, REF_FALSE);
    case 'J':
        if ((rc = need(p, 4)))
            return rc;
        p->pos += 4;
        return push_int(p, (int32_t)lm_load_le32(b));
    case 'K':
        if ((rc = need(p, 1)))
            return rc;
        p->pos += 1;
        return push_int(p, b[0]);
    case 'M':
        if ((rc = need(p, 2)))
            return rc;
        p->pos += 2;
        return push_int(p, lm_load_le16(b));
    case 0x8a: return op_long1(p);
    case 'G': {
        if ((rc = need(p, 8)))
            return rc;
        uint64_t u = 0;
        for (int i = 0; i < 8; i++)
            u = (u << 8) | b[i];
        p->pos += 8;
        if ((rc = new_obj(p, LM_PK_FLOAT, &r)))
            return rc;
        memcpy(&pk->obj[r].u.f, &u, sizeof u);
        return push(p, r);
    }
    case 0x8c: return op_string(p, 1);
    case 'X': return op_string(p, 4);
    case 0x8d: return op_string(p, 8);
    case 'q':
        if ((rc = need(p, 1)))
            return rc;
        p->pos += 1;
        return set_memo(p, b[0]);
    case 'r':
        if ((rc = need(p, 4)))
            return rc;
        p->pos += 4;
        return set_memo(p, lm_load_le32(b));
    case 0x94: return set_memo(p, p->n_memo_set);
    case 'h':
        if ((rc = need(p, 1)))
            return rc;
        p->pos += 1;
        return get_memo(p, b[0]);
    case 'j':
        if ((rc = need(p, 4)))
            return rc;
        p->pos += 4;
        return get_memo(p, lm_load_le32(b));
    case 's': return op_setitems(p, 0);
    case 'u': return op_setitems(p, 1);
    case 'a': return op_appends(p, 0);
    case 'e': return op_appends(p, 1);
    case 'c': {
        const uint8_t *mod = NULL, *name = NULL;
        size_t n_mod = 0, n_name = 0;
        if ((rc = read_line(p, &mod, &n_mod)) || (rc = read_line(p, &name, &n_name)))
            return rc;
        return push_global(p, mod, n_mod, name, n_name);
    }
    case 0x93: /* STACK_GLOBAL */
        if ((rc = pop(p, &a2)) || (rc = pop(p, &a1)))
            return rc;
        if (obj(p, a1)->kind != LM_PK_STR || obj(p, a2)->kind != LM_PK_STR)
            return fail(p, LM_E_FORMAT, "InvalidPickle", "pickle STACK_GLOBAL needs two strings");
        return push_global(p, pk->buf + obj(p, a1)->u.s.off, obj(p, a1)->u.s.n_bytes,
                           pk->buf + obj(p, a2)->u.s.off, obj(p, a2)->u.s.n_bytes);
    case 'R': return op_reduce(p);
    case 'b': return op_build(p);
    case 'Q': return op_persid(p);
    case 'i': { /* INST names its class inline: report it */
        const uint8_t *mod = NULL, *name = NULL;
        size_t n_mod = 0, n_name = 0;
        if (scan_line(p, &mod, &n_mod) && scan_line(p, &name, &n_name)) {
            char m[100], n[100];
            printable(m, sizeof m, mod, n_mod);
            printable(n, sizeof n, name, n_name);
            return fail(p, LM_E_UNSUPPORTED, "ForbiddenGlobal", "pickle instantiates forbidden class '%s.%s' (INST)", m, n);
        }
        return fail(p, LM_E_UNSUPPORTED, "UnsupportedOpcode", "pickle opcode INST is not allowed");
    }
    default: {
        const char *name = opcode_name(op);
        if (name != NULL)
            return fail(p, LM_E_UNSUPPORTED, "UnsupportedOpcode", "pickle opcode %s (0x%02x) is not allowed", name, op);
        return fail(p, LM_E_UNSUPPORTED, "UnsupportedOpcode", "unknown pickle opcode 0x%02x", op);
    }
    }
}

/* ---------------------------------------------------------------------------------------- */

lm_code lm_pk_parse(const void *buf, size_t n_bytes, const lm_pk_options *opts, lm_pickle **out,
                    size_t *n_consumed, lm_err *err)
{
    static const lm_pk_options no_opts;
    parser p;
    memset(&p, 0, sizeof p);
    p.opt = opts ? opts : &no_opts;
    p.err = err;
    p.lim = p.opt->limits;
    if (!p.lim.max_objects) p.lim.max_objects = 1000000;
    if (!p.lim.max_items) p.lim.max_items = 4000000;
    if (!p.lim.max_stack) p.lim.max_stack = 262144;
    if (!p.lim.max_memo) p.lim.max_memo = 1048576;
    if (!p.lim.max_depth) p.lim.max_depth = 100;
    if (!p.lim.max_str_bytes) p.lim.max_str_bytes = 1u << 20;
    if (p.lim.max_depth > 60000) p.lim.max_depth = 60000; /* pk_obj.depth is 16 bits */
    if (p.lim.max_objects > UINT32_MAX - 1) p.lim.max_objects = UINT32_MAX - 1;
    if (p.lim.max_objects < N_FIXED + 1) p.lim.max_objects = N_FIXED + 1;
    *out = NULL;

    lm_pickle *pk = calloc(1, sizeof *pk);
    if (pk == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    pk->buf = buf;
    pk->n_bytes = n_bytes;
    p.pk = pk;
    lm_pk_ref r;
    lm_code rc = LM_OK;
    /* fixed objects: None, False, True */
    for (int i = 0; i < N_FIXED && rc == LM_OK; i++)
        if ((rc = new_obj(&p, i == REF_NONE ? LM_PK_NONE : LM_PK_BOOL, &r)) == LM_OK)
            pk->obj[r].u.i = (i == REF_TRUE);
    int stop = 0;
    while (rc == LM_OK && !stop)
        rc = step(&p, &stop);
    free(p.stack);
    free(p.marks);
    free(p.memo);
    if (rc != LM_OK) {
        lm_pk_free(pk);
        return rc;
    }
    if (n_consumed != NULL)
        *n_consumed = p.pos;
    *out = pk;
    return LM_OK;
}

void lm_pk_free(lm_pickle *pk)
{
    if (pk == NULL)
        return;
    for (size_t i = 0; i < pk->n_obj; i++)
        if (is_container((lm_pk_kind)pk->obj[i].kind))
            free(pk->obj[i].u.items);
    free(pk->obj);
    for (size_t i = 0; i < pk->n_st; i++)
        free(pk->st[i].key);
    free(pk->st);
    free(pk->st_hash);
    free(pk->t);
    free(pk);
}

lm_pk_ref lm_pk_root(const lm_pickle *pk)
{
    return pk->root;
}

lm_pk_kind lm_pk_kind_of(const lm_pickle *pk, lm_pk_ref r)
{
    return r < pk->n_obj ? (lm_pk_kind)pk->obj[r].kind : LM_PK_NONE;
}

const char *lm_pk_kind_name(lm_pk_kind k)
{
    static const char *const names[] = {"None", "bool", "int", "int", "float", "str", "tuple",
                                        "list", "dict", "global", "storage", "tensor"};
    return (size_t)k < LM_ARRAY_LEN(names) ? names[k] : "?";
}

int lm_pk_int(const lm_pickle *pk, lm_pk_ref r, int64_t *v)
{
    lm_pk_kind k = lm_pk_kind_of(pk, r);
    if (k != LM_PK_INT && k != LM_PK_BOOL)
        return 0;
    *v = pk->obj[r].u.i;
    return 1;
}

const uint8_t *lm_pk_bytes(const lm_pickle *pk, lm_pk_ref r, size_t *n_bytes)
{
    lm_pk_kind k = lm_pk_kind_of(pk, r);
    if (k != LM_PK_STR && k != LM_PK_BIGINT)
        return NULL;
    *n_bytes = pk->obj[r].u.s.n_bytes;
    return pk->buf + pk->obj[r].u.s.off;
}

size_t lm_pk_len(const lm_pickle *pk, lm_pk_ref r)
{
    lm_pk_kind k = lm_pk_kind_of(pk, r);
    if (!is_container(k))
        return 0;
    return k == LM_PK_DICT ? pk->obj[r].n / 2 : pk->obj[r].n;
}

lm_pk_ref lm_pk_item(const lm_pickle *pk, lm_pk_ref r, size_t i)
{
    if (!is_container(lm_pk_kind_of(pk, r)) || i >= pk->obj[r].n)
        return REF_NONE;
    return pk->obj[r].u.items[i];
}

const lm_pk_tensor *lm_pk_tensor_of(const lm_pickle *pk, lm_pk_ref r)
{
    return lm_pk_kind_of(pk, r) == LM_PK_TENSOR ? &pk->t[pk->obj[r].u.index] : NULL;
}

size_t lm_pk_n_storages(const lm_pickle *pk)
{
    return pk->n_st;
}

const lm_pk_storage *lm_pk_storage_at(const lm_pickle *pk, size_t i)
{
    return i < pk->n_st ? &pk->st[i] : NULL;
}

size_t lm_pk_storage_find(const lm_pickle *pk, const char *key)
{
    if (pk->hash_cap == 0)
        return SIZE_MAX;
    for (size_t j = hash_key((const uint8_t *)key, strlen(key)) & (pk->hash_cap - 1); pk->st_hash[j];
         j = (j + 1) & (pk->hash_cap - 1))
        if (strcmp(pk->st[pk->st_hash[j] - 1].key, key) == 0)
            return pk->st_hash[j] - 1;
    return SIZE_MAX;
}
