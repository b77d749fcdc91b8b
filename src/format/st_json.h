/* SPDX-License-Identifier: MIT */
/* st_json.h : a small strict JSON parser for safetensors headers.
 * RFC 8259 grammar; UTF-8 validated (no overlongs, surrogates, code points above U+10FFFF);
 * string escapes decoded (\uXXXX with surrogate pairs, lone surrogates refused); duplicate
 * object keys detected after decoding, at every level; nesting limited to ST_JSON_MAX_DEPTH.
 * Numbers are kept as raw text, so that callers can read integers exactly as u64 (cJSON turns
 * them into doubles).  Number tokens outside RFC 8259 ("01", "+1", ".5") are lexed and flagged
 * rather than refused, so the caller can say *which* field holds one; st_json_bad_number()
 * finds them in a subtree.
 * Not a general JSON library: no writer, no mutation, input at most ST_JSON_MAX_INPUT bytes. */
#ifndef ST_JSON_H
#define ST_JSON_H

#include <stddef.h>
#include <stdint.h>

#define ST_JSON_MAX_DEPTH 64
#define ST_JSON_MAX_INPUT ((size_t)1 << 30)

typedef enum {
    ST_JSON_NULL = 0,
    ST_JSON_FALSE,
    ST_JSON_TRUE,
    ST_JSON_NUMBER,
    ST_JSON_STRING,
    ST_JSON_ARRAY,
    ST_JSON_OBJECT,
} st_json_type;

/* One value.  Nodes live in one array and refer to each other by index; index 0 is the root,
 * so 0 also means "none" for next/child.  32-bit fields keep a node at 36 bytes: a header with
 * 300k tensors makes a few million nodes. */
typedef struct st_json_node {
    uint8_t type;     /* st_json_type */
    uint8_t bad_num;  /* NUMBER: 1 if the token is not an RFC 8259 number */
    uint32_t pos;     /* offset of the value's first byte in the input */
    uint32_t n;       /* STRING: decoded bytes; NUMBER: raw bytes; ARRAY/OBJECT: members */
    uint32_t str;     /* STRING: offset in doc->strings (NUL-terminated); NUMBER: offset in input */
    uint32_t key;     /* object member: offset of its decoded key in doc->strings */
    uint32_t key_len; /* object member: decoded key bytes */
    uint32_t key_pos; /* object member: offset of the key's opening quote in the input */
    uint32_t next;    /* next member of the parent, 0 = last */
    uint32_t child;   /* ARRAY/OBJECT: first member, 0 = empty */
} st_json_node;

typedef enum {
    ST_JSON_OK = 0,
    ST_JSON_E_SYNTAX,   /* not JSON (includes the depth limit and a missing value) */
    ST_JSON_E_UTF8,     /* invalid UTF-8 in a string, or a lone surrogate escape */
    ST_JSON_E_DUPKEY,   /* two members of one object with the same decoded key */
    ST_JSON_E_TRAILING, /* something other than whitespace after the value */
    ST_JSON_E_NOMEM,
    ST_JSON_E_TOOBIG,   /* input longer than ST_JSON_MAX_INPUT */
} st_json_status;

typedef struct st_json_doc {
    const char *src;     /* borrowed input */
    size_t src_bytes;
    st_json_node *nodes; /* owned */
    size_t n_nodes, cap_nodes;
    char *strings;       /* owned: decoded strings, each NUL-terminated */
    size_t n_strings, cap_strings;
    /* on error: */
    st_json_status status;
    size_t err_pos;      /* offset in the input where the problem was seen */
    uint32_t err_member; /* ST_JSON_E_DUPKEY: the second member with that key */
    uint32_t err_object; /* ST_JSON_E_DUPKEY: the object holding both (0 = the root) */
    char err_msg[96];    /* one line, no trailing period */
} st_json_doc;

/*! st_json_parse() :
 *  Parses src[0..n_bytes) as exactly one JSON value surrounded by optional whitespace
 *  (space, \t, \n, \r).  Does not check UTF-8 outside strings (any non-ASCII byte there is a
 *  syntax error anyway).
 *  @return ST_JSON_OK, or an error with doc->err_pos / doc->err_msg set.
 *  Ownership: src is borrowed and must outlive doc; free with st_json_free() in every case. */
st_json_status st_json_parse(st_json_doc *doc, const char *src, size_t n_bytes);
void st_json_free(st_json_doc *doc);

/*! st_json_utf8_check() : @return the offset of the first invalid UTF-8 byte, or n_bytes. */
size_t st_json_utf8_check(const uint8_t *s, size_t n_bytes);

static inline const st_json_node *st_json_root(const st_json_doc *d)
{
    return d->n_nodes > 0 ? &d->nodes[0] : NULL;
}
static inline const st_json_node *st_json_child(const st_json_doc *d, const st_json_node *v)
{
    return v->child ? &d->nodes[v->child] : NULL;
}
static inline const st_json_node *st_json_next(const st_json_doc *d, const st_json_node *v)
{
    return v->next ? &d->nodes[v->next] : NULL;
}
static inline const char *st_json_key(const st_json_doc *d, const st_json_node *v)
{
    return d->strings + v->key;
}
/* STRING: decoded text, NUL-terminated (may hold U+0000 inside: compare v->n with strlen) */
static inline const char *st_json_str(const st_json_doc *d, const st_json_node *v)
{
    return d->strings + v->str;
}
/* NUMBER: raw text, v->n bytes, not NUL-terminated */
static inline const char *st_json_num(const st_json_doc *d, const st_json_node *v)
{
    return d->src + v->str;
}

/*! st_json_get() : member of object `obj` whose decoded key is key (key_len bytes), or NULL. */
const st_json_node *st_json_get(const st_json_doc *d, const st_json_node *obj, const char *key,
                                size_t key_len);

typedef enum {
    ST_JSON_U64_OK = 0,
    ST_JSON_U64_NOT_INTEGER, /* not a NUMBER, or not plain digits (sign, fraction, exponent, 01) */
    ST_JSON_U64_OVERFLOW,    /* plain digits, but >= 2^64 */
} st_json_u64_status;

/*! st_json_u64() : reads a NUMBER made of plain decimal digits, no leading zero, as u64. */
st_json_u64_status st_json_u64(const st_json_doc *d, const st_json_node *v, uint64_t *out);

/*! st_json_bad_number() : the first NUMBER in the subtree of v that is not RFC 8259, or NULL. */
const st_json_node *st_json_bad_number(const st_json_doc *d, const st_json_node *v);

#endif
