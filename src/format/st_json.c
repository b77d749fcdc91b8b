/* SPDX-License-Identifier: MIT */
/* st_json.c : strict JSON for safetensors headers (see st_json.h).
 * Recursive descent over the input, nodes appended in pre-order to one array.  The depth limit
 * bounds the recursion.  No global state; nothing here prints. */
#include "st_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    st_json_doc *d;
    const uint8_t *s;
    size_t n, p;
} jp;

static st_json_status jp_fail(jp *j, st_json_status st, size_t pos, const char *msg)
{
    st_json_doc *d = j->d;
    if (d->status == ST_JSON_OK) {
        d->status = st;
        d->err_pos = pos;
        snprintf(d->err_msg, sizeof d->err_msg, "%s", msg);
    }
    return st;
}

static int is_ws(uint8_t c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static void skip_ws(jp *j)
{
    while (j->p < j->n && is_ws(j->s[j->p]))
        j->p++;
}

/* Length of the valid UTF-8 sequence at s (avail bytes readable), or 0 if invalid. */
static size_t utf8_seq(const uint8_t *s, size_t avail)
{
    const uint8_t c = s[0];
    if (c < 0x80)
        return 1;
    size_t len;
    uint8_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c == 0xE0)
        len = 3, lo = 0xA0; /* no overlongs */
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
        len = 3;
    else if (c == 0xED)
        len = 3, hi = 0x9F; /* no UTF-16 surrogates */
    else if (c == 0xF0)
        len = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3)
        len = 4;
    else if (c == 0xF4)
        len = 4, hi = 0x8F; /* nothing above U+10FFFF */
    else
        return 0;
    if (avail < len)
        return 0;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return len;
}

size_t st_json_utf8_check(const uint8_t *s, size_t n_bytes)
{
    size_t i = 0;
    while (i < n_bytes) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        const size_t k = utf8_seq(s + i, n_bytes - i);
        if (k == 0)
            return i;
        i += k;
    }
    return n_bytes;
}

static int new_node(jp *j, st_json_type type, uint32_t *out)
{
    st_json_doc *d = j->d;
    if (d->n_nodes == d->cap_nodes) {
        const size_t cap = d->cap_nodes ? d->cap_nodes * 2 : 64;
        st_json_node *nn = realloc(d->nodes, cap * sizeof *nn);
        if (nn == NULL)
            return jp_fail(j, ST_JSON_E_NOMEM, j->p, "out of memory"), -1;
        d->nodes = nn;
        d->cap_nodes = cap;
    }
    st_json_node *v = &d->nodes[d->n_nodes];
    memset(v, 0, sizeof *v);
    v->type = (uint8_t)type;
    v->pos = (uint32_t)j->p;
    *out = (uint32_t)d->n_nodes++;
    return 0;
}

static int reserve_strings(jp *j, size_t extra)
{
    st_json_doc *d = j->d;
    if (d->cap_strings - d->n_strings >= extra)
        return 0;
    size_t cap = d->cap_strings ? d->cap_strings : 256;
    while (cap - d->n_strings < extra)
        cap *= 2;
    char *ns = realloc(d->strings, cap);
    if (ns == NULL)
        return jp_fail(j, ST_JSON_E_NOMEM, j->p, "out of memory"), -1;
    d->strings = ns;
    d->cap_strings = cap;
    return 0;
}

static int hex4(const uint8_t *s, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        const uint8_t c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* j->p at the opening quote.  Decodes into doc->strings; *off / *len receive the result. */
static int parse_string(jp *j, uint32_t *off, uint32_t *len)
{
    const uint8_t *s = j->s;
    const size_t start = j->p;
    /* find the closing quote first, so the decoded text (never longer) fits in one reserve */
    size_t close = start + 1;
    while (close < j->n && s[close] != '"')
        close += s[close] == '\\' ? 2 : 1;
    if (close >= j->n)
        return jp_fail(j, ST_JSON_E_SYNTAX, start, "unterminated string"), -1;
    if (reserve_strings(j, close - start) != 0)
        return -1;
    st_json_doc *d = j->d;
    char *o = d->strings + d->n_strings;
    char *const o0 = o;
    size_t i = start + 1;
    while (i < close) {
        const uint8_t c = s[i];
        if (c < 0x20)
            return jp_fail(j, ST_JSON_E_SYNTAX, i, "control character in string"), -1;
        if (c >= 0x80) {
            const size_t k = utf8_seq(s + i, close - i);
            if (k == 0)
                return jp_fail(j, ST_JSON_E_UTF8, i, "invalid UTF-8 in string"), -1;
            memcpy(o, s + i, k);
            o += k;
            i += k;
            continue;
        }
        if (c != '\\') {
            *o++ = (char)c;
            i++;
            continue;
        }
        /* escape: close is past the backslash's partner byte, so s[i + 1] is readable */
        const uint8_t e = s[i + 1];
        switch (e) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp;
            if (close - i < 6 || hex4(s + i + 2, &cp) != 0)
                return jp_fail(j, ST_JSON_E_SYNTAX, i, "bad \\u escape"), -1;
            if (cp >= 0xDC00 && cp <= 0xDFFF)
                return jp_fail(j, ST_JSON_E_UTF8, i, "lone low surrogate escape"), -1;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (close - i < 12 || s[i + 6] != '\\' || s[i + 7] != 'u' ||
                    hex4(s + i + 8, &lo) != 0 || lo < 0xDC00 || lo > 0xDFFF)
                    return jp_fail(j, ST_JSON_E_UTF8, i, "lone high surrogate escape"), -1;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                i += 6;
            }
            o += put_utf8(o, cp);
            i += 6;
            continue;
        }
        default:
            return jp_fail(j, ST_JSON_E_SYNTAX, i, "bad escape in string"), -1;
        }
        i += 2;
    }
    *o = '\0';
    *off = (uint32_t)d->n_strings;
    *len = (uint32_t)(o - o0);
    d->n_strings += (size_t)(o - o0) + 1;
    j->p = close + 1;
    return 0;
}

static int is_num_char(uint8_t c)
{
    return (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
}

/* RFC 8259: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)? */
static int rfc_number(const uint8_t *s, size_t n)
{
    size_t i = 0;
#define DIG(k) ((k) < n && s[k] >= '0' && s[k] <= '9')
    if (i < n && s[i] == '-')
        i++;
    if (!DIG(i))
        return 0;
    if (s[i] == '0')
        i++;
    else
        while (DIG(i))
            i++;
    if (i < n && s[i] == '.') {
        i++;
        if (!DIG(i))
            return 0;
        while (DIG(i))
            i++;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        if (!DIG(i))
            return 0;
        while (DIG(i))
            i++;
    }
#undef DIG
    return i == n;
}

static int literal(jp *j, const char *word, st_json_type type, uint32_t *out)
{
    const size_t k = strlen(word);
    if (j->n - j->p < k || memcmp(j->s + j->p, word, k) != 0)
        return jp_fail(j, ST_JSON_E_SYNTAX, j->p, "invalid literal"), -1;
    if (new_node(j, type, out) != 0)
        return -1;
    j->p += k;
    return 0;
}

static uint32_t key_hash(const char *k, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)k[i]) * 16777619u;
    return h;
}

static int same_key(const st_json_doc *d, const st_json_node *a, const st_json_node *b)
{
    return a->key_len == b->key_len &&
           memcmp(d->strings + a->key, d->strings + b->key, a->key_len) == 0;
}

static int dup_found(jp *j, uint32_t obj, uint32_t member)
{
    st_json_doc *d = j->d;
    const st_json_node *m = &d->nodes[member];
    char msg[96];
    snprintf(msg, sizeof msg, "duplicate key \"%.48s\"", d->strings + m->key);
    jp_fail(j, ST_JSON_E_DUPKEY, m->key_pos, msg);
    d->err_member = member;
    d->err_object = obj;
    return -1;
}

/* Duplicate keys: pairwise for small objects, a temporary hash set for large ones (the top
 * level of a big checkpoint holds hundreds of thousands of names). */
static int check_dups(jp *j, uint32_t obj)
{
    const st_json_doc *d = j->d;
    const uint32_t count = d->nodes[obj].n;
    if (count < 2)
        return 0;
    if (count <= 16) {
        for (uint32_t a = d->nodes[obj].child; a; a = d->nodes[a].next)
            for (uint32_t b = d->nodes[obj].child; b != a; b = d->nodes[b].next)
                if (same_key(d, &d->nodes[a], &d->nodes[b]))
                    return dup_found(j, obj, a);
        return 0;
    }
    size_t cap = 32;
    while (cap < (size_t)count * 2)
        cap *= 2;
    uint32_t *slots = calloc(cap, sizeof *slots);
    if (slots == NULL)
        return jp_fail(j, ST_JSON_E_NOMEM, j->p, "out of memory"), -1;
    int rc = 0;
    for (uint32_t a = d->nodes[obj].child; a && rc == 0; a = d->nodes[a].next) {
        const st_json_node *m = &d->nodes[a];
        size_t h = key_hash(d->strings + m->key, m->key_len) & (cap - 1);
        while (slots[h] != 0) {
            if (same_key(d, &d->nodes[slots[h]], m)) {
                rc = dup_found(j, obj, a);
                break;
            }
            h = (h + 1) & (cap - 1);
        }
        slots[h] = a; /* member indices are never 0 (0 is the root) */
    }
    free(slots);
    return rc;
}

static int parse_value(jp *j, unsigned depth, uint32_t *out);

static int parse_container(jp *j, unsigned depth, uint32_t *out)
{
    const int is_obj = j->s[j->p] == '{';
    const uint8_t close = is_obj ? '}' : ']';
    if (depth >= ST_JSON_MAX_DEPTH)
        return jp_fail(j, ST_JSON_E_SYNTAX, j->p, "nesting deeper than 64 levels"), -1;
    uint32_t self;
    if (new_node(j, is_obj ? ST_JSON_OBJECT : ST_JSON_ARRAY, &self) != 0)
        return -1;
    j->p++;
    skip_ws(j);
    uint32_t last = 0, count = 0;
    if (j->p < j->n && j->s[j->p] == close) {
        j->p++;
        *out = self;
        return 0;
    }
    for (;;) {
        uint32_t key = 0, key_len = 0, key_pos = 0, child;
        if (is_obj) {
            if (j->p >= j->n || j->s[j->p] != '"')
                return jp_fail(j, ST_JSON_E_SYNTAX, j->p, "expected a string key"), -1;
            key_pos = (uint32_t)j->p;
            if (parse_string(j, &key, &key_len) != 0)
                return -1;
            skip_ws(j);
            if (j->p >= j->n || j->s[j->p] != ':')
                return jp_fail(j, ST_JSON_E_SYNTAX, j->p, "expected ':' after key"), -1;
            j->p++;
        }
        if (parse_value(j, depth + 1, &child) != 0)
            return -1;
        st_json_node *c = &j->d->nodes[child];
        c->key = key;
        c->key_len = key_len;
        c->key_pos = key_pos;
        if (last == 0)
            j->d->nodes[self].child = child;
        else
            j->d->nodes[last].next = child;
        last = child;
        count++;
        skip_ws(j);
        if (j->p < j->n && j->s[j->p] == ',') {
            j->p++;
            skip_ws(j);
            continue;
        }
        if (j->p < j->n && j->s[j->p] == close) {
            j->p++;
            break;
        }
        return jp_fail(j, ST_JSON_E_SYNTAX, j->p,
                       is_obj ? "expected ',' or '}' in object" : "expected ',' or ']' in array"),
               -1;
    }
    j->d->nodes[self].n = count;
    *out = self;
    return is_obj ? check_dups(j, self) : 0;
}

static int parse_value(jp *j, unsigned depth, uint32_t *out)
{
    skip_ws(j);
    if (j->p >= j->n)
        return jp_fail(j, ST_JSON_E_SYNTAX, j->p, "unexpected end of input"), -1;
    const uint8_t c = j->s[j->p];
    switch (c) {
    case '{':
    case '[':
        return parse_container(j, depth, out);
    case '"': {
        const size_t pos = j->p;
        uint32_t off, len;
        if (parse_string(j, &off, &len) != 0)
            return -1;
        if (new_node(j, ST_JSON_STRING, out) != 0)
            return -1;
        st_json_node *v = &j->d->nodes[*out];
        v->pos = (uint32_t)pos;
        v->str = off;
        v->n = len;
        return 0;
    }
    case 't': return literal(j, "true", ST_JSON_TRUE, out);
    case 'f': return literal(j, "false", ST_JSON_FALSE, out);
    case 'n': return literal(j, "null", ST_JSON_NULL, out);
    default:
        break;
    }
    if (c == '-' || c == '+' || c == '.' || (c >= '0' && c <= '9')) {
        if (new_node(j, ST_JSON_NUMBER, out) != 0)
            return -1;
        size_t e = j->p;
        while (e < j->n && is_num_char(j->s[e]))
            e++;
        st_json_node *v = &j->d->nodes[*out];
        v->str = (uint32_t)j->p;
        v->n = (uint32_t)(e - j->p);
        v->bad_num = !rfc_number(j->s + j->p, e - j->p);
        j->p = e;
        return 0;
    }
    return jp_fail(j, ST_JSON_E_SYNTAX, j->p, "unexpected character"), -1;
}

st_json_status st_json_parse(st_json_doc *doc, const char *src, size_t n_bytes)
{
    memset(doc, 0, sizeof *doc);
    doc->src = src;
    doc->src_bytes = n_bytes;
    jp j = {doc, (const uint8_t *)src, n_bytes, 0};
    if (n_bytes > ST_JSON_MAX_INPUT)
        return jp_fail(&j, ST_JSON_E_TOOBIG, 0, "JSON text too large");
    uint32_t root;
    skip_ws(&j);
    if (j.p >= j.n)
        return jp_fail(&j, ST_JSON_E_SYNTAX, j.p, "no JSON value");
    if (parse_value(&j, 0, &root) != 0)
        return doc->status;
    skip_ws(&j);
    if (j.p < j.n)
        return jp_fail(&j, ST_JSON_E_TRAILING, j.p, "unexpected data after the JSON value");
    return ST_JSON_OK;
}

void st_json_free(st_json_doc *doc)
{
    if (doc == NULL)
        return;
    free(doc->nodes);
    free(doc->strings);
    doc->nodes = NULL;
    doc->strings = NULL;
    doc->n_nodes = doc->cap_nodes = doc->n_strings = doc->cap_strings = 0;
}

const st_json_node *st_json_get(const st_json_doc *d, const st_json_node *obj, const char *key,
                                size_t key_len)
{
    if (obj == NULL || obj->type != ST_JSON_OBJECT)
        return NULL;
    for (const st_json_node *m = st_json_child(d, obj); m; m = st_json_next(d, m))
        if (m->key_len == key_len && memcmp(d->strings + m->key, key, key_len) == 0)
            return m;
    return NULL;
}

st_json_u64_status st_json_u64(const st_json_doc *d, const st_json_node *v, uint64_t *out)
{
    if (v == NULL || v->type != ST_JSON_NUMBER || v->n == 0)
        return ST_JSON_U64_NOT_INTEGER;
    const char *s = st_json_num(d, v);
    for (uint32_t i = 0; i < v->n; i++)
        if (s[i] < '0' || s[i] > '9')
            return ST_JSON_U64_NOT_INTEGER;
    if (v->n > 1 && s[0] == '0')
        return ST_JSON_U64_NOT_INTEGER;
    uint64_t x = 0;
    for (uint32_t i = 0; i < v->n; i++) {
        const uint64_t digit = (uint64_t)(s[i] - '0');
        if (x > (UINT64_MAX - digit) / 10)
            return ST_JSON_U64_OVERFLOW;
        x = x * 10 + digit;
    }
    *out = x;
    return ST_JSON_U64_OK;
}

const st_json_node *st_json_bad_number(const st_json_doc *d, const st_json_node *v)
{
    if (v->type == ST_JSON_NUMBER)
        return v->bad_num ? v : NULL;
    if (v->type != ST_JSON_ARRAY && v->type != ST_JSON_OBJECT)
        return NULL;
    /* recursion depth is bounded by ST_JSON_MAX_DEPTH */
    for (const st_json_node *c = st_json_child(d, v); c; c = st_json_next(d, c)) {
        const st_json_node *b = st_json_bad_number(d, c);
        if (b != NULL)
            return b;
    }
    return NULL;
}
