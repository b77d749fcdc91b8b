/* SPDX-License-Identifier: MIT */
/* st_reader.c : strict safetensors reader: length, JSON header, validation, read-only mapping.
 * Every check runs before a file is handed out, so users of lm_st_* never see a tensor whose
 * bytes are not all inside the data section.  Error kinds follow the conformance manifests in
 * ../shared/fixtures/safetensors (HeaderTooSmall ... IncompleteDataCoverage).
 * Does not read tensor data, and does not touch pages of the mapping beyond the header. */
#include "st_reader.h"

#include "compat.h"
#include "lm_error.h"
#include "lm_sha256.h"
#include "st_json.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- name set --------------------------------------------------------------------------- */

uint32_t st_hash_name(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

int st_strmap_init(st_strmap *m, size_t n_max)
{
    m->slots = NULL;
    m->cap = 0;
    if (n_max >= UINT32_MAX / 2)
        return -1;
    size_t cap = 16;
    while (cap < n_max * 2)
        cap *= 2;
    m->slots = calloc(cap, sizeof *m->slots);
    if (m->slots == NULL)
        return -1;
    m->cap = cap;
    return 0;
}

void st_strmap_free(st_strmap *m)
{
    free(m->slots);
    m->slots = NULL;
    m->cap = 0;
}

size_t st_strmap_find(const st_strmap *m, const char *name, st_key_of_fn key_of, const void *ctx)
{
    if (m->cap == 0)
        return SIZE_MAX;
    size_t h = st_hash_name(name) & (m->cap - 1);
    while (m->slots[h] != 0) {
        const size_t idx = m->slots[h] - 1;
        if (strcmp(key_of(ctx, idx), name) == 0)
            return idx;
        h = (h + 1) & (m->cap - 1);
    }
    return SIZE_MAX;
}

size_t st_strmap_insert(st_strmap *m, const char *name, size_t index, st_key_of_fn key_of,
                        const void *ctx)
{
    size_t h = st_hash_name(name) & (m->cap - 1);
    while (m->slots[h] != 0) {
        const size_t idx = m->slots[h] - 1;
        if (strcmp(key_of(ctx, idx), name) == 0)
            return idx;
        h = (h + 1) & (m->cap - 1);
    }
    m->slots[h] = (uint32_t)(index + 1);
    return SIZE_MAX;
}

/* ---- the file object --------------------------------------------------------------------- */

/* Names, shapes and metadata strings live in a chain of chunks freed together: one allocation
 * per few thousand tensors instead of two per tensor. */
typedef struct st_chunk {
    struct st_chunk *next;
    size_t used, cap;
    alignas(8) unsigned char data[];
} st_chunk;

/* The sha256 of a snapshot's bytes, computed by a thread of its own while the copy is made and
 * after (the merge's start goes on meanwhile), from the copy's own buffers: the copy reads each
 * chunk of the file into a free buffer of the ring, writes it into the memfd and hands it over;
 * the hasher hashes it and gives it back.  The bytes are read once, and never read back from the
 * memfd (a re-read through a mapping would also count its pages in the resident memory).
 * Each side sleeps only on an empty (hasher) or full (copy) ring and is woken when half of it is
 * ready again, not per chunk: a wake-up per 256 KB chunk was ~450 context switches for the 1b
 * adapter's 50 MB (~200 chunks), now ~165. */
#define ST_RING 8                   /* buffers of the ring */
#define ST_CHUNK ((size_t)1 << 18)  /* bytes of a buffer */
#define ST_WAKE (ST_RING / 2)       /* chunks ready (hasher) or free (copy) before a sleeper is woken */

typedef struct st_hasher {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;             /* a chunk given, a chunk hashed, the end, or the hasher gone */
    unsigned char *ring;           /* ST_RING buffers of ST_CHUNK bytes, one allocation */
    size_t len[ST_RING];
    uint64_t given, hashed;        /* chunks handed over / hashed so far (under mu) */
    int end;                       /* every chunk handed over (under mu) */
    int stop;                      /* the copy failed: give up (under mu) */
    int gone;                      /* the thread is done with the ring (under mu) */
    int hasher_waits, copy_waits;  /* asleep on cv (under mu) */
    int ok;                        /* hex holds the digest (read after the join) */
    char hex[65];
} st_hasher;

struct lm_st_file {
    char *path;                /* owned: the path, or the name given to lm_st_open_buffer */
    st_hasher *hasher;         /* owned: a hashed snapshot's hash, until joined (lm_st_snapshot_sha256) */
    int sha_state;             /* 0 not asked yet, 1 sha_hex valid, -1 no hash */
    char sha_hex[65];
    int fd;                    /* -1 for a buffer; a snapshot's memfd */
    int snapshot;              /* fd is a copy of path's bytes (lm_st_open_snapshot) */
    int all_finite;            /* a hashed snapshot whose float tensors were all seen finite as it was copied */
    int have_stat;             /* opened: the file as it was when read */
    struct stat opened;
    void *map;                 /* owned mapping (munmap), NULL for buffers and short files */
    size_t map_bytes;
    const uint8_t *bytes;      /* whole file: map, or the borrowed buffer */
    uint64_t n_bytes;
    uint64_t data_offset;      /* 8 + N */
    uint64_t data_bytes;
    size_t n_tensors;
    lm_tensor_info *tensors;   /* owned, header order */
    size_t n_meta;
    const char **meta;         /* owned array of 2 * n_meta pointers into chunks: key, value */
    st_strmap names;
    st_chunk *chunks;          /* owned */
};

static void *chunk_alloc(lm_st_file *f, size_t n_bytes)
{
    n_bytes = (n_bytes + 7) & ~(size_t)7;
    st_chunk *c = f->chunks;
    if (c == NULL || c->cap - c->used < n_bytes) {
        size_t cap = c ? c->cap * 2 : 4096;
        if (cap > ((size_t)1 << 20))
            cap = (size_t)1 << 20;
        if (cap < n_bytes)
            cap = n_bytes;
        st_chunk *nc = malloc(sizeof *nc + cap);
        if (nc == NULL)
            return NULL;
        nc->next = c;
        nc->used = 0;
        nc->cap = cap;
        f->chunks = nc;
        c = nc;
    }
    void *p = c->data + c->used;
    c->used += n_bytes;
    return p;
}

static char *chunk_strdup(lm_st_file *f, const char *s, size_t n)
{
    char *p = chunk_alloc(f, n + 1);
    if (p != NULL) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

static const char *tensor_name_of(const void *ctx, size_t i)
{
    return ((const lm_st_file *)ctx)->tensors[i].name;
}

static int hasher_join(st_hasher *h, char hex[65]);

void lm_st_close(lm_st_file *f)
{
    if (f == NULL)
        return;
    if (f->hasher != NULL) {
        char hex[65];
        (void)hasher_join(f->hasher, hex);
        f->hasher = NULL;
    }
    if (f->map != NULL)
        munmap(f->map, f->map_bytes);
    if (f->fd >= 0)
        close(f->fd);
    st_chunk *c = f->chunks;
    while (c != NULL) {
        st_chunk *next = c->next;
        free(c);
        c = next;
    }
    st_strmap_free(&f->names);
    free(f->tensors);
    free(f->meta);
    free(f->path);
    free(f);
}

static lm_st_file *file_new(const char *path, lm_err *err)
{
    lm_st_file *f = calloc(1, sizeof *f);
    if (f == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    f->fd = -1;
    f->path = strdup(path != NULL ? path : "");
    if (f->path == NULL) {
        free(f);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    return f;
}

/* ---- validation ------------------------------------------------------------------------- */

#define NAME_FMT "%.160s" /* names are quoted in messages, cut to keep room for the rest */

typedef struct {
    lm_st_file *f;
    const st_json_doc *doc;
    lm_err *err;
} st_ctx;

static uint64_t at(const st_ctx *c, uint32_t pos)
{
    return 8 + (uint64_t)pos;
}

/* fail with kind and tensor context; offset = file position of the offending JSON value */
static lm_code tfail(const st_ctx *c, lm_code code, const char *kind, const char *tensor,
                     uint32_t pos, const char *fmt, const char *what)
{
    if (tensor != NULL)
        lm_fail(c->err, code, kind, "tensor '" NAME_FMT "': %s%s", tensor, fmt, what ? what : "");
    else
        lm_fail(c->err, code, kind, "%s%s", fmt, what ? what : "");
    lm_err_set_tensor(c->err, tensor);
    lm_err_set_offset(c->err, at(c, pos));
    return code;
}

static const char *type_name(uint8_t t)
{
    switch (t) {
    case ST_JSON_NULL: return "null";
    case ST_JSON_FALSE:
    case ST_JSON_TRUE: return "a boolean";
    case ST_JSON_NUMBER: return "a number";
    case ST_JSON_STRING: return "a string";
    case ST_JSON_ARRAY: return "an array";
    case ST_JSON_OBJECT: return "an object";
    }
    return "?";
}

/* decoded strings may hold U+0000, which a C string cannot carry */
static int has_nul(const char *s, uint32_t n)
{
    return memchr(s, '\0', n) != NULL;
}

static lm_code check_metadata(st_ctx *c, const st_json_node *md)
{
    const st_json_doc *d = c->doc;
    lm_st_file *f = c->f;
    if (md->type != ST_JSON_OBJECT) {
        lm_fail(c->err, LM_E_FORMAT, "InvalidMetadata", "__metadata__ is %s, not an object",
                type_name(md->type));
        lm_err_set_offset(c->err, at(c, md->pos));
        return LM_E_FORMAT;
    }
    f->n_meta = md->n;
    if (md->n > 0) {
        f->meta = calloc(2 * (size_t)md->n, sizeof *f->meta);
        if (f->meta == NULL)
            return lm_fail(c->err, LM_E_NOMEM, NULL, "out of memory");
    }
    size_t i = 0;
    for (const st_json_node *m = st_json_child(d, md); m; m = st_json_next(d, m), i++) {
        const char *key = st_json_key(d, m);
        if (m->type != ST_JSON_STRING) {
            lm_fail(c->err, LM_E_FORMAT, "InvalidFieldType",
                    "__metadata__ '" NAME_FMT "': value is %s, not a string", key,
                    type_name(m->type));
            lm_err_set_offset(c->err, at(c, m->pos));
            return LM_E_FORMAT;
        }
        if (has_nul(key, m->key_len) || has_nul(st_json_str(d, m), m->n)) {
            lm_fail(c->err, LM_E_FORMAT, "InvalidMetadata",
                    "__metadata__ '" NAME_FMT "': U+0000 in a key or value is not supported", key);
            lm_err_set_offset(c->err, at(c, m->key_pos));
            return LM_E_FORMAT;
        }
        const char *k = chunk_strdup(f, key, m->key_len);
        const char *v = chunk_strdup(f, st_json_str(d, m), m->n);
        if (k == NULL || v == NULL)
            return lm_fail(c->err, LM_E_NOMEM, NULL, "out of memory");
        f->meta[2 * i] = k;
        f->meta[2 * i + 1] = v;
    }
    return LM_OK;
}

static const char *const KNOWN_FIELDS[] = {"dtype", "shape", "data_offsets"};

static lm_code check_tensor(st_ctx *c, const st_json_node *desc, lm_tensor_info *t)
{
    const st_json_doc *d = c->doc;
    lm_st_file *f = c->f;
    const char *name = st_json_key(d, desc);
    if (has_nul(name, desc->key_len))
        return tfail(c, LM_E_FORMAT, "InvalidFieldType", name, desc->key_pos,
                     "U+0000 in a tensor name is not supported", NULL);
    if (desc->type != ST_JSON_OBJECT)
        return tfail(c, LM_E_FORMAT, "InvalidFieldType", name, desc->pos,
                     "descriptor is not an object but ", type_name(desc->type));

    /* presence and JSON types of the three fields */
    const st_json_node *fld[3];
    for (int k = 0; k < 3; k++) {
        fld[k] = st_json_get(d, desc, KNOWN_FIELDS[k], strlen(KNOWN_FIELDS[k]));
        if (fld[k] == NULL)
            return tfail(c, LM_E_FORMAT, "MissingField", name, desc->pos, "missing field ",
                         KNOWN_FIELDS[k]);
        const uint8_t want = k == 0 ? ST_JSON_STRING : ST_JSON_ARRAY;
        if (fld[k]->type != want) {
            char what[64];
            snprintf(what, sizeof what, "%s is %s, not %s", KNOWN_FIELDS[k],
                     type_name(fld[k]->type), type_name(want));
            return tfail(c, LM_E_FORMAT, "InvalidFieldType", name, fld[k]->pos, what, NULL);
        }
    }
    const st_json_node *dt = fld[0], *shape = fld[1], *offs = fld[2];

    /* unknown fields are ignored, but must still be JSON (a lexed "01" there is not) */
    for (const st_json_node *m = st_json_child(d, desc); m; m = st_json_next(d, m)) {
        if (m == dt || m == shape || m == offs)
            continue;
        const st_json_node *bad = st_json_bad_number(d, m);
        if (bad != NULL)
            return tfail(c, LM_E_FORMAT, "InvalidJson", name, bad->pos,
                         "invalid JSON number in field ", st_json_key(d, m));
    }

    if (!lm_dtype_parse(st_json_str(d, dt), dt->n, &t->dtype)) {
        lm_fail(c->err, LM_E_UNSUPPORTED, "UnsupportedDType",
                "tensor '" NAME_FMT "': unknown dtype '%.40s'", name, st_json_str(d, dt));
        lm_err_set_tensor(c->err, name);
        lm_err_set_offset(c->err, at(c, dt->pos));
        return LM_E_UNSUPPORTED;
    }

    t->n_dims = shape->n;
    uint64_t *dims = NULL;
    if (shape->n > 0) {
        dims = chunk_alloc(f, (size_t)shape->n * sizeof *dims);
        if (dims == NULL)
            return lm_fail(c->err, LM_E_NOMEM, NULL, "out of memory");
    }
    size_t k = 0;
    for (const st_json_node *e = st_json_child(d, shape); e; e = st_json_next(d, e), k++) {
        const st_json_u64_status st = st_json_u64(d, e, &dims[k]);
        if (st == ST_JSON_U64_OVERFLOW)
            return tfail(c, LM_E_FORMAT, "ValidationOverflow", name, e->pos,
                         "shape dimension does not fit in 64 bits", NULL);
        if (st != ST_JSON_U64_OK)
            return tfail(c, LM_E_FORMAT, "InvalidShape", name, e->pos,
                         "shape entries must be non-negative integers written as plain digits",
                         NULL);
    }
    t->shape = dims;

    if (offs->n != 2) {
        char what[64];
        snprintf(what, sizeof what, "data_offsets has %u entries, not 2", (unsigned)offs->n);
        return tfail(c, LM_E_FORMAT, "InvalidOffsets", name, offs->pos, what, NULL);
    }
    uint64_t be[2];
    k = 0;
    for (const st_json_node *e = st_json_child(d, offs); e; e = st_json_next(d, e), k++) {
        const st_json_u64_status st = st_json_u64(d, e, &be[k]);
        if (st == ST_JSON_U64_OVERFLOW)
            return tfail(c, LM_E_FORMAT, "ValidationOverflow", name, e->pos,
                         "data_offsets entry does not fit in 64 bits", NULL);
        if (st != ST_JSON_U64_OK)
            return tfail(c, LM_E_FORMAT, "InvalidOffsets", name, e->pos,
                         "data_offsets entries must be non-negative integers written as plain "
                         "digits",
                         NULL);
    }
    t->begin = be[0];
    t->end = be[1];

    /* element count left to right with checked multiplies: [2^64-1, 0, 2^64-1] is 0 elements */
    uint64_t n_elems = 1;
    for (size_t i = 0; i < t->n_dims; i++)
        if (lm_mul_overflow_u64(n_elems, dims[i], &n_elems))
            return tfail(c, LM_E_FORMAT, "ValidationOverflow", name, shape->pos,
                         "shape product overflows 64 bits", NULL);
    t->n_elems = n_elems;
    uint64_t n_bits;
    if (lm_mul_overflow_u64(n_elems, lm_dtype_bits(t->dtype), &n_bits))
        return tfail(c, LM_E_FORMAT, "ValidationOverflow", name, shape->pos,
                     "size in bits overflows 64 bits", NULL);
    if (n_bits % 8 != 0) {
        lm_fail(c->err, LM_E_FORMAT, "MisalignedSlice",
                "tensor '" NAME_FMT "': %llu elements of %s make %llu bits, not whole bytes",
                name, (unsigned long long)n_elems, lm_dtype_name(t->dtype),
                (unsigned long long)n_bits);
        lm_err_set_tensor(c->err, name);
        lm_err_set_offset(c->err, at(c, shape->pos));
        return LM_E_FORMAT;
    }
    /* order as in the reference implementation: begin <= end, then the length, then the
     * bounds, so a range of the wrong length is InvalidTensorSize even if it also runs past
     * the data (rust's test_invalid_info) */
    if (t->begin > t->end) {
        lm_fail(c->err, LM_E_FORMAT, "InvalidOffsets",
                "tensor '" NAME_FMT "': data_offsets [%llu, %llu]: begin after end", name,
                (unsigned long long)t->begin, (unsigned long long)t->end);
        lm_err_set_tensor(c->err, name);
        lm_err_set_offset(c->err, at(c, offs->pos));
        return LM_E_FORMAT;
    }
    if (t->end - t->begin != n_bits / 8) {
        lm_fail(c->err, LM_E_FORMAT, "InvalidTensorSize",
                "tensor '" NAME_FMT "': data_offsets [%llu, %llu] hold %llu bytes, %s x %llu "
                "elements needs %llu",
                name, (unsigned long long)t->begin, (unsigned long long)t->end,
                (unsigned long long)(t->end - t->begin), lm_dtype_name(t->dtype),
                (unsigned long long)n_elems, (unsigned long long)(n_bits / 8));
        lm_err_set_tensor(c->err, name);
        lm_err_set_offset(c->err, at(c, offs->pos));
        return LM_E_FORMAT;
    }
    if (t->end > f->data_bytes) {
        lm_fail(c->err, LM_E_FORMAT, "InvalidOffsets",
                "tensor '" NAME_FMT "': data_offsets [%llu, %llu]: end beyond the %llu-byte "
                "data section",
                name, (unsigned long long)t->begin, (unsigned long long)t->end,
                (unsigned long long)f->data_bytes);
        lm_err_set_tensor(c->err, name);
        lm_err_set_offset(c->err, at(c, offs->pos));
        return LM_E_FORMAT;
    }
    t->name = chunk_strdup(f, name, desc->key_len);
    if (t->name == NULL)
        return lm_fail(c->err, LM_E_NOMEM, NULL, "out of memory");
    return LM_OK;
}

typedef struct {
    uint64_t begin, end;
    size_t index;
} st_range;

static int range_cmp(const void *a, const void *b)
{
    const st_range *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Sorted by (begin, end), the ranges must tile [0, data_bytes): each begins where the previous
 * one ended.  A zero-size tensor inside another one's range is an overlap, as in the reference
 * implementation. */
static lm_code check_coverage(st_ctx *c)
{
    lm_st_file *f = c->f;
    st_range *r = NULL;
    if (f->n_tensors > 0) {
        r = malloc(f->n_tensors * sizeof *r);
        if (r == NULL)
            return lm_fail(c->err, LM_E_NOMEM, NULL, "out of memory");
    }
    for (size_t i = 0; i < f->n_tensors; i++)
        r[i] = (st_range){f->tensors[i].begin, f->tensors[i].end, i};
    if (f->n_tensors > 1)
        qsort(r, f->n_tensors, sizeof *r, range_cmp);
    uint64_t pos = 0;
    size_t prev = SIZE_MAX;
    lm_code rc = LM_OK;
    for (size_t i = 0; i < f->n_tensors && rc == LM_OK; i++) {
        const lm_tensor_info *t = &f->tensors[r[i].index];
        if (t->begin == pos) {
            pos = t->end;
            prev = r[i].index;
            continue;
        }
        if (t->begin > pos) {
            rc = lm_fail(c->err, LM_E_FORMAT, "IncompleteDataCoverage",
                         "tensor '" NAME_FMT "': data_offsets [%llu, %llu] leave data bytes "
                         "[%llu, %llu) covered by no tensor",
                         t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                         (unsigned long long)pos, (unsigned long long)t->begin);
            lm_err_set_offset(c->err, f->data_offset + pos);
        } else {
            rc = lm_fail(c->err, LM_E_FORMAT, "IncompleteDataCoverage",
                         "tensor '" NAME_FMT "': data_offsets [%llu, %llu] overlap tensor '%.60s'"
                         " (ends at %llu)",
                         t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                         f->tensors[prev].name, (unsigned long long)pos);
            lm_err_set_offset(c->err, f->data_offset + t->begin);
        }
        lm_err_set_tensor(c->err, t->name);
    }
    if (rc == LM_OK && pos != f->data_bytes) {
        rc = lm_fail(c->err, LM_E_FORMAT, "IncompleteDataCoverage",
                     "data section holds %llu bytes but tensors cover only the first %llu",
                     (unsigned long long)f->data_bytes, (unsigned long long)pos);
        lm_err_set_offset(c->err, f->data_offset + pos);
    }
    free(r);
    return rc;
}

static lm_code json_status_fail(lm_err *err, const st_json_doc *doc)
{
    const char *kind = "InvalidJson";
    lm_code code = LM_E_FORMAT;
    switch (doc->status) {
    case ST_JSON_E_UTF8: kind = "InvalidUtf8"; break;
    case ST_JSON_E_DUPKEY: kind = "DuplicateKey"; break;
    case ST_JSON_E_TRAILING: kind = "InvalidHeaderPadding"; break;
    case ST_JSON_E_NOMEM: kind = NULL, code = LM_E_NOMEM; break;
    default: break;
    }
    lm_fail(err, code, kind, "header: %s", doc->err_msg);
    lm_err_set_offset(err, 8 + (uint64_t)doc->err_pos);
    if (doc->status == ST_JSON_E_DUPKEY && doc->err_object == 0) {
        const char *key = st_json_key(doc, &doc->nodes[doc->err_member]);
        if (strcmp(key, "__metadata__") != 0)
            lm_err_set_tensor(err, key); /* a tensor name given twice */
    }
    return code;
}

/* All checks on the whole file's bytes; fills f's tables.  The first failure wins. */
static lm_code st_validate(lm_st_file *f, const uint8_t *bytes, uint64_t n_bytes, lm_err *err)
{
    f->bytes = bytes;
    f->n_bytes = n_bytes;
    if (n_bytes < 8) {
        lm_fail(err, LM_E_FORMAT, "HeaderTooSmall",
                "file is %llu bytes, shorter than the 8-byte header length",
                (unsigned long long)n_bytes);
        lm_err_set_offset(err, 0);
        return LM_E_FORMAT;
    }
    const uint64_t n_hdr = lm_load_le64(bytes);
    if (n_hdr > ST_MAX_HEADER_BYTES) {
        lm_fail(err, LM_E_FORMAT, "HeaderTooLarge",
                "header length %llu exceeds the limit of %u bytes", (unsigned long long)n_hdr,
                ST_MAX_HEADER_BYTES);
        lm_err_set_offset(err, 0);
        return LM_E_FORMAT;
    }
    if (n_hdr > n_bytes - 8) {
        lm_fail(err, LM_E_FORMAT, "InvalidHeaderLength",
                "header length %llu exceeds the %llu bytes after the length field",
                (unsigned long long)n_hdr, (unsigned long long)(n_bytes - 8));
        lm_err_set_offset(err, 0);
        return LM_E_FORMAT;
    }
    f->data_offset = 8 + n_hdr;
    f->data_bytes = n_bytes - 8 - n_hdr;
    const uint8_t *hdr = bytes + 8;
    const size_t n = (size_t)n_hdr;

    const size_t bad = st_json_utf8_check(hdr, n);
    if (bad != n) {
        lm_fail(err, LM_E_FORMAT, "InvalidUtf8", "header: invalid UTF-8 byte 0x%02x", hdr[bad]);
        lm_err_set_offset(err, 8 + (uint64_t)bad);
        return LM_E_FORMAT;
    }
    size_t first = 0;
    while (first < n && (hdr[first] == ' ' || hdr[first] == '\t' || hdr[first] == '\n' ||
                         hdr[first] == '\r'))
        first++;
    if (first == n || hdr[first] != '{') {
        if (first == n)
            lm_fail(err, LM_E_FORMAT, "InvalidHeaderStart", "header holds no JSON object");
        else
            lm_fail(err, LM_E_FORMAT, "InvalidHeaderStart",
                    "header must start with '{', found byte 0x%02x", hdr[first]);
        lm_err_set_offset(err, 8 + (uint64_t)first);
        return LM_E_FORMAT;
    }

    st_json_doc doc;
    lm_code rc = LM_OK;
    if (st_json_parse(&doc, (const char *)hdr, n) != ST_JSON_OK) {
        rc = json_status_fail(err, &doc);
        goto done;
    }
    st_ctx c = {f, &doc, err};
    const st_json_node *root = st_json_root(&doc);
    const st_json_node *md = st_json_get(&doc, root, "__metadata__", 12);
    f->n_tensors = root->n - (md != NULL);
    if (f->n_tensors > 0) {
        f->tensors = calloc(f->n_tensors, sizeof *f->tensors);
        if (f->tensors == NULL || st_strmap_init(&f->names, f->n_tensors) != 0) {
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto done;
        }
    }
    /* "__metadata__": null is no metadata: the reference implementation reads it into an
     * Option (serde), and mlx-lm writes it */
    if (md != NULL && md->type != ST_JSON_NULL && (rc = check_metadata(&c, md)) != LM_OK)
        goto done;
    size_t i = 0;
    for (const st_json_node *m = st_json_child(&doc, root); m; m = st_json_next(&doc, m)) {
        if (m == md)
            continue;
        if ((rc = check_tensor(&c, m, &f->tensors[i])) != LM_OK)
            goto done;
        /* the parser refused duplicate keys already; a hit here would be our bug */
        const size_t dup = st_strmap_insert(&f->names, f->tensors[i].name, i, tensor_name_of, f);
        if (dup != SIZE_MAX) {
            rc = tfail(&c, LM_E_FORMAT, "DuplicateKey", f->tensors[i].name, m->key_pos,
                       "duplicate tensor name", NULL);
            goto done;
        }
        i++;
    }
    rc = check_coverage(&c);
done:
    st_json_free(&doc);
    return rc;
}

/* ---- opening ------------------------------------------------------------------------------ */

lm_st_file *lm_st_open_buffer(const void *buf, size_t n_bytes, const char *name, lm_err *err)
{
    lm_st_file *f = file_new(name, err);
    if (f == NULL)
        goto fail;
    if (buf == NULL && n_bytes > 0) {
        lm_fail(err, LM_E_USAGE, NULL, "NULL buffer of %zu bytes", n_bytes);
        goto fail;
    }
    if (st_validate(f, buf != NULL ? buf : (const void *)"", n_bytes, err) != LM_OK)
        goto fail;
    return f;
fail:
    lm_err_set_path(err, name);
    lm_st_close(f);
    return NULL;
}

static int same_file_state(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
           a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

int lm_st_input_changed(const lm_st_file *f)
{
    struct stat now;
    if (f == NULL || !f->have_stat)
        return 0;
    if (f->snapshot ? stat(f->path, &now) != 0 : fstat(f->fd, &now) != 0)
        return 1;
    return !same_file_state(&f->opened, &now);
}

/* Hashers running at once, at most ST_HASHERS: a batch opens many adapters one after another, and
 * hashing is slower than copying, so unbounded they would pile up (a thread and a ring each);
 * past the limit a snapshot is hashed by the thread that copies it, from the copy's buffer (the
 * bytes are still read once). */
#define ST_HASHERS 2
static int st_hashers_running;
static _Thread_local int st_hash_here; /* lm_st_snapshot_hash_here() */

void lm_st_snapshot_hash_here(int on)
{
    st_hash_here = on != 0;
}

static void *hasher_main(void *arg)
{
    st_hasher *h = arg;
    lm_sha256_ctx ctx;
    lm_sha256_init(&ctx);
    int ok = 1;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (ok && h->hashed == h->given && !h->end && !h->stop) {
            h->hasher_waits = 1;
            pthread_cond_wait(&h->cv, &h->mu);
            h->hasher_waits = 0;
        }
        ok = ok && !h->stop;
        if (!ok || h->hashed == h->given)
            break;
        const size_t slot = (size_t)(h->hashed % ST_RING), len = h->len[slot];
        pthread_mutex_unlock(&h->mu);
        lm_sha256_update(&ctx, h->ring + slot * ST_CHUNK, len);
        pthread_mutex_lock(&h->mu);
        h->hashed++;
        if (h->copy_waits && h->given - h->hashed <= ST_RING - ST_WAKE)
            pthread_cond_broadcast(&h->cv);
    }
    h->gone = 1; /* the copy may use every buffer now */
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    if (ok) {
        uint8_t md[32];
        lm_sha256_final(&ctx, md);
        lm_sha256_hex(md, h->hex);
        h->ok = 1;
    }
    __atomic_sub_fetch(&st_hashers_running, 1, __ATOMIC_ACQ_REL); /* its slot free for the next */
    return NULL;
}

static void hasher_free(st_hasher *h)
{
    free(h->ring);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv);
    free(h);
}

/* a hasher with its ring, its thread started; NULL if it cannot be (no hash then) */
static st_hasher *hasher_start(void)
{
    if (__atomic_add_fetch(&st_hashers_running, 1, __ATOMIC_ACQ_REL) > ST_HASHERS) {
        __atomic_sub_fetch(&st_hashers_running, 1, __ATOMIC_ACQ_REL);
        return NULL;
    }
    st_hasher *h = calloc(1, sizeof *h);
    int ok = h != NULL;
    if (ok && (ok = (h->ring = malloc(ST_RING * ST_CHUNK)) != NULL))
        lm_populate(h->ring, ST_RING * ST_CHUNK);
    if (h != NULL) {
        pthread_mutex_init(&h->mu, NULL);
        pthread_cond_init(&h->cv, NULL);
    }
    if (!ok || pthread_create(&h->th, NULL, hasher_main, h) != 0) {
        if (h != NULL)
            hasher_free(h);
        __atomic_sub_fetch(&st_hashers_running, 1, __ATOMIC_ACQ_REL);
        return NULL;
    }
    return h;
}

/* the buffer the copy's next chunk goes into, once the hasher is done with it */
static unsigned char *hasher_buffer(st_hasher *h)
{
    pthread_mutex_lock(&h->mu);
    while (h->given - h->hashed == ST_RING && !h->gone) {
        h->copy_waits = 1;
        pthread_cond_wait(&h->cv, &h->mu);
        h->copy_waits = 0;
    }
    unsigned char *b = h->ring + h->given % ST_RING * ST_CHUNK;
    pthread_mutex_unlock(&h->mu);
    return b;
}

/* that buffer holds the next len bytes of the copy (len 0: the copy is complete; stop: it failed) */
static void hasher_give(st_hasher *h, size_t len, int stop)
{
    if (h == NULL)
        return;
    pthread_mutex_lock(&h->mu);
    if (stop)
        h->stop = 1;
    else if (len == 0)
        h->end = 1;
    else
        h->len[h->given++ % ST_RING] = len;
    if (stop || len == 0 || (h->hasher_waits && h->given - h->hashed >= ST_WAKE))
        pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
}

/* waits for the hash, frees h; 0 and hex filled, or -1 (no hash) */
static int hasher_join(st_hasher *h, char hex[65])
{
    if (h == NULL)
        return -1;
    pthread_join(h->th, NULL);
    const int ok = h->ok;
    if (ok)
        memcpy(hex, h->hex, 65);
    hasher_free(h);
    return ok ? 0 : -1;
}

int lm_st_snapshot_sha256(lm_st_file *f, char hex[65])
{
    if (f == NULL)
        return -1;
    if (f->sha_state == 0) {
        f->sha_state = f->hasher != NULL && hasher_join(f->hasher, f->sha_hex) == 0 ? 1 : -1;
        f->hasher = NULL;
    }
    if (f->sha_state != 1)
        return -1;
    memcpy(hex, f->sha_hex, 65);
    return 0;
}

/* clones for AVX-512 and AVX2, chosen when the program loads: the snapshot's copy looks at every
 * byte of the adapter with it (~1.8 ms for the 1b adapter's 50 MB with SSE2) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
int lm_any_non_finite(const uint8_t *p, size_t n, lm_dtype dt)
{
    unsigned bad = 0; /* no early exit, so that the loops vectorise */
    switch (dt) {
    case LM_DT_F32:
        for (size_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, p + 4 * i, 4);
            bad |= (u & 0x7f800000u) == 0x7f800000u;
        }
        break;
    case LM_DT_F16:
    case LM_DT_BF16: {
        const uint16_t m = dt == LM_DT_F16 ? 0x7c00u : 0x7f80u;
        for (size_t i = 0; i < n; i++) {
            uint16_t u;
            memcpy(&u, p + 2 * i, 2);
            bad |= (uint16_t)(u & m) == m;
        }
        break;
    }
    case LM_DT_F64:
        for (size_t i = 0; i < n; i++) {
            uint64_t u;
            memcpy(&u, p + 8 * i, 8);
            bad |= (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
        }
        break;
    default:
        break;
    }
    return bad != 0;
}

/* The float tensors of the file being copied (their file offsets, in file order), looked at
 * for inf and NaN chunk by chunk while the chunk is in the copy's buffer: the adapter's
 * finiteness check (adapter_load.c) then has nothing left to read. */
typedef struct {
    uint64_t lo, hi;
    lm_dtype dt;
    unsigned esz;
} st_span;

typedef struct {
    st_span *s;
    size_t n, k;   /* k: the first span not wholly before the copy's position */
    int bad;       /* a non-finite value seen */
    int complete;  /* every chunk was looked at */
} st_scan;

static int span_cmp(const void *a, const void *b)
{
    const st_span *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* the scan of f's float tensors; 0 (no scan: out of memory) or 1 */
static int scan_init(st_scan *sc, const lm_st_file *f)
{
    memset(sc, 0, sizeof *sc);
    if ((sc->s = malloc((f->n_tensors + 1) * sizeof *sc->s)) == NULL)
        return 0;
    for (size_t i = 0; i < f->n_tensors; i++) {
        const lm_tensor_info *t = &f->tensors[i];
        if ((t->dtype == LM_DT_F32 || t->dtype == LM_DT_F16 || t->dtype == LM_DT_BF16 || t->dtype == LM_DT_F64) &&
            t->end > t->begin)
            sc->s[sc->n++] = (st_span){f->data_offset + t->begin, f->data_offset + t->end, t->dtype,
                                       lm_dtype_bits(t->dtype) / 8};
    }
    qsort(sc->s, sc->n, sizeof *sc->s, span_cmp);
    sc->complete = 1;
    return 1;
}

/* the end of a chunk [a, b): b, or earlier so that it splits no element of a float tensor */
static uint64_t scan_cut(const st_scan *sc, uint64_t a, uint64_t b)
{
    for (size_t j = sc != NULL ? sc->k : 0; sc != NULL && j < sc->n && sc->s[j].lo < b; j++)
        if (sc->s[j].hi > b) {
            const uint64_t c = b - (b - sc->s[j].lo) % sc->s[j].esz;
            return c > a ? c : b;
        }
    return b;
}

/* the n bytes at buf, the file's bytes from offset a */
static void scan_chunk(st_scan *sc, const uint8_t *buf, uint64_t a, uint64_t n)
{
    if (sc == NULL)
        return;
    const uint64_t b = a + n;
    while (sc->k < sc->n && sc->s[sc->k].hi <= a)
        sc->k++;
    for (size_t j = sc->k; j < sc->n && sc->s[j].lo < b; j++) {
        const st_span *s = &sc->s[j];
        const uint64_t lo = s->lo > a ? s->lo : a, hi = s->hi < b ? s->hi : b;
        if ((lo - s->lo) % s->esz != 0 || (hi - s->lo) % s->esz != 0) {
            sc->complete = 0; /* a chunk cut inside an element (a short read): not seen whole */
            continue;
        }
        sc->bad |= lm_any_non_finite(buf + (lo - a), (size_t)((hi - lo) / s->esz), s->dt);
    }
}

/* Copies the n bytes of regular file `in` into a new sealed memfd; -1 with errno (ESTALE: the
 * file did not hold n bytes while it was copied).  hashed: *hasher receives a hasher of the
 * copy's bytes, which the caller joins or frees; when none is started (ST_HASHERS are running, or
 * this thread hashes its own: lm_st_snapshot_hash_here), the copy is hashed here, chunk by chunk
 * from its buffer, and hex_here receives the digest.  sc (or NULL): the float tensors to look at
 * as their bytes pass. */
static int snapshot_fd(int in, uint64_t n, int hashed, st_hasher **hasher, char hex_here[65], st_scan *sc)
{
    st_hasher *h = NULL;
    char *big = NULL;
    lm_sha256_ctx here;
    int by_here = 0;
    if (hasher != NULL)
        *hasher = NULL;
    int m = memfd_create("lora-merge-input", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (m < 0)
        return -1;
    if (ftruncate(m, (off_t)n) != 0)
        goto fail;
    if (hashed && n > 0 && !st_hash_here)
        h = hasher_start();
    if (hashed && h == NULL) {
        lm_sha256_init(&here);
        by_here = 1;
    }
    char small[1 << 16], *buf = small;
    size_t cap = sizeof small;
    if (h != NULL) {
        cap = ST_CHUNK;
    } else if (n > ((uint64_t)1 << 20) && (big = malloc(ST_CHUNK)) != NULL) {
        buf = big; /* fewer system calls */
        cap = ST_CHUNK;
        lm_populate(big, ST_CHUNK);
    }
    loff_t off_in = 0, off_out = 0;
    /* copy_file_range (in the kernel: the bytes never pass here) when neither the hash nor the scan
     * needs them, until the kernel refuses it once (EXDEV ... : a file and a memfd on most
     * kernels), then pread/pwrite for the rest, without asking again per chunk */
    int cfr = !hashed && sc == NULL;
    while ((uint64_t)off_in < n) {
        if (cfr) {
            ssize_t k = copy_file_range(in, &off_in, m, &off_out, (size_t)(n - (uint64_t)off_in), 0);
            if (k < 0 && errno == EINTR)
                continue;
            if (k > 0)
                continue;
            if (k < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP)) {
                cfr = 0;
                continue;
            }
            if (k == 0)
                errno = ESTALE; /* shorter than its size: truncated while copied */
            goto fail;
        }
        if (h != NULL)
            buf = (char *)hasher_buffer(h);
        const uint64_t end = (uint64_t)off_in + cap < n ? (uint64_t)off_in + cap : n;
        const size_t want = (size_t)(scan_cut(sc, (uint64_t)off_in, end) - (uint64_t)off_in);
        ssize_t r = pread(in, buf, want, off_in);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0 || pwrite(m, buf, (size_t)r, off_out) != r) {
            if (r == 0)
                errno = ESTALE;
            goto fail;
        }
        scan_chunk(sc, (const uint8_t *)buf, (uint64_t)off_in, (uint64_t)r);
        hasher_give(h, (size_t)r, 0);
        if (by_here)
            lm_sha256_update(&here, buf, (size_t)r);
        off_in += r;
        off_out += r;
    }
    free(big);
    big = NULL;
    if (fcntl(m, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0)
        goto fail;
    hasher_give(h, 0, 0);
    if (by_here && hex_here != NULL) {
        uint8_t md[32];
        lm_sha256_final(&here, md);
        lm_sha256_hex(md, hex_here);
    }
    if (hasher != NULL)
        *hasher = h;
    else if (h != NULL)
        (void)hasher_join(h, (char[65]){0});
    return m;
fail:;
    int e = errno;
    free(big);
    hasher_give(h, 0, 1);
    if (h != NULL) {
        char hex[65];
        (void)hasher_join(h, hex); /* before the ring it reads is freed */
    }
    close(m);
    errno = e;
    return -1;
}

static lm_st_file *open_snapshot(const char *path, int hashed, lm_err *err)
{
    lm_st_file *f = lm_st_open(path, err);
    if (f == NULL || f->fd < 0 || f->map == NULL)
        return f; /* refused, or too short to need a copy: already checked from its bytes */
    /* the first open validated the file in place; now the bytes are copied once and checked again
     * from the copy, which is what every later read sees */
    struct stat before = f->opened, after;
    st_hasher *h = NULL;
    st_scan scan;
    const int scanned = hashed && scan_init(&scan, f);
    char hex_here[65] = "";
    int m = snapshot_fd(f->fd, (uint64_t)before.st_size, hashed, &h, hex_here, scanned ? &scan : NULL);
    int e = errno;
    int changed = m >= 0 && (fstat(f->fd, &after) != 0 || !same_file_state(&before, &after));
    int all_finite = scanned && scan.complete && !scan.bad;
    lm_st_close(f);
    if (m < 0 || changed) {
        if (scanned)
            free(scan.s);
        if (h != NULL) {
            char hex[65];
            (void)hasher_join(h, hex);
        }
        if (m >= 0)
            close(m);
        if (m < 0 && e != ESTALE) {
            lm_fail_errno(err, e, "cannot copy the file into memory");
        } else {
            lm_fail(err, LM_E_IO, "InputChanged", "the file changed while it was being read (%s); nothing was merged",
                    "truncated, overwritten or replaced");
        }
        lm_err_set_path(err, path);
        return NULL;
    }
    if ((f = file_new(path, err)) == NULL) {
        if (h != NULL) {
            char hex[65];
            (void)hasher_join(h, hex);
        }
        close(m);
        if (scanned)
            free(scan.s);
        goto fail;
    }
    f->fd = m;
    f->hasher = h;
    if (h == NULL && hex_here[0] != '\0') { /* hashed by this thread */
        memcpy(f->sha_hex, hex_here, sizeof hex_here);
        f->sha_state = 1;
    }
    f->snapshot = 1;
    f->have_stat = 1;
    f->opened = before;
    f->map = mmap(NULL, (size_t)before.st_size, PROT_READ, MAP_SHARED, m, 0);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        lm_fail_errno(err, errno, "cannot map %llu bytes", (unsigned long long)before.st_size);
        goto fail;
    }
    f->map_bytes = (size_t)before.st_size;
    if (st_validate(f, f->map, (uint64_t)before.st_size, err) != LM_OK) {
        if (scanned)
            free(scan.s);
        goto fail;
    }
    if (scanned) { /* the copy's float tensors are the ones looked at (the same header, surely: the same file state) */
        st_scan now = {0};
        all_finite = all_finite && scan_init(&now, f) && now.n == scan.n;
        for (size_t j = 0; all_finite && j < scan.n; j++)
            all_finite = now.s[j].lo == scan.s[j].lo && now.s[j].hi == scan.s[j].hi && now.s[j].dt == scan.s[j].dt;
        free(now.s);
        free(scan.s);
    }
    f->all_finite = all_finite;
    return f;
fail:
    lm_err_set_path(err, path);
    lm_st_close(f);
    return NULL;
}

int lm_st_snapshot_read(const lm_st_file *f, const void *p, void *dst, size_t n)
{
    if (f == NULL || !f->snapshot || f->fd < 0 || !lm_st_in_mapping(f, p, n))
        return -1;
    const uint64_t at = (uint64_t)((const uint8_t *)p - (const uint8_t *)f->map);
    for (size_t done = 0; done < n;) {
        ssize_t k = pread(f->fd, (uint8_t *)dst + done, n - done, (off_t)(at + done));
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        done += (size_t)k;
    }
    return 0;
}

int lm_st_snapshot_all_finite(const lm_st_file *f)
{
    return f != NULL && f->all_finite;
}

lm_st_file *lm_st_open_snapshot(const char *path, lm_err *err)
{
    return open_snapshot(path, 0, err);
}

lm_st_file *lm_st_open_snapshot_hashed(const char *path, lm_err *err)
{
    return open_snapshot(path, 1, err);
}

lm_st_file *lm_st_open(const char *path, lm_err *err)
{
    static const uint8_t no_bytes[8];
    lm_st_file *f = file_new(path, err);
    if (f == NULL)
        goto fail;
    /* a FIFO, a device ... is named as such before any open; O_NONBLOCK: should one appear in
     * between, opening it must not wait for a writer (cleared once it is a file) */
    if (lm_fail_not_regular(err, path) != LM_OK)
        goto fail;
    f->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (f->fd < 0) {
        lm_fail_errno(err, errno, "cannot open");
        goto fail;
    }
    struct stat st;
    if (fstat(f->fd, &st) != 0) {
        lm_fail_errno(err, errno, "cannot stat");
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        lm_fail_errno(err, S_ISDIR(st.st_mode) ? EISDIR : EINVAL, "not a regular file");
        goto fail;
    }
    f->opened = st;
    f->have_stat = 1;
    const int fl = fcntl(f->fd, F_GETFL);
    if (fl != -1)
        (void)fcntl(f->fd, F_SETFL, fl & ~O_NONBLOCK);
    const uint64_t n_bytes = (uint64_t)st.st_size;
    if (n_bytes > SIZE_MAX) {
        lm_fail_errno(err, EFBIG, "file of %llu bytes cannot be mapped",
                      (unsigned long long)n_bytes);
        goto fail;
    }
    if (n_bytes < 8) {
        /* too short to hold the length: nothing to map (mmap of 0 bytes fails anyway) */
        if (st_validate(f, no_bytes, n_bytes, err) != LM_OK)
            goto fail;
        return f;
    }
    f->map = mmap(NULL, (size_t)n_bytes, PROT_READ, MAP_SHARED, f->fd, 0);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        lm_fail_errno(err, errno, "cannot map %llu bytes", (unsigned long long)n_bytes);
        goto fail;
    }
    f->map_bytes = (size_t)n_bytes;
    if (st_validate(f, f->map, n_bytes, err) != LM_OK)
        goto fail;
    return f;
fail:
    lm_err_set_path(err, path);
    lm_st_close(f);
    return NULL;
}

/* ---- accessors ---------------------------------------------------------------------------- */

int lm_st_in_mapping(const lm_st_file *f, const void *p, uint64_t n)
{
    const uint8_t *b = p, *m = f != NULL ? f->map : NULL;
    return m != NULL && b >= m && n <= f->map_bytes && (size_t)(b - m) <= f->map_bytes - n;
}

/* the page size, asked once (threads that race ask twice and store the same value) */
static long page_size(void)
{
    static long page;
    long k = __atomic_load_n(&page, __ATOMIC_RELAXED);
    if (k == 0) {
        k = sysconf(_SC_PAGESIZE);
        __atomic_store_n(&page, k, __ATOMIC_RELAXED);
    }
    return k;
}

void lm_drop_mapped_pages(const void *p, uint64_t n)
{
    const long page = page_size();
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)(page - 1), e = (uintptr_t)p + (uintptr_t)n;
    if (n > 0)
        madvise((void *)a, (size_t)(e - a), MADV_DONTNEED);
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

void lm_populate(void *p, size_t n)
{
    const long page = page_size();
    const uintptr_t a = ((uintptr_t)p + (uintptr_t)page - 1) & ~(uintptr_t)(page - 1),
                    e = ((uintptr_t)p + n) & ~(uintptr_t)(page - 1);
    if (e > a) /* best effort: an older kernel refuses the advice (EINVAL), and the pages fault in as used */
        (void)madvise((void *)a, (size_t)(e - a), MADV_POPULATE_WRITE);
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

void lm_populate_read(const void *p, uint64_t n)
{
    const long page = page_size();
    const uintptr_t a = (uintptr_t)p & ~(uintptr_t)(page - 1), e = (uintptr_t)p + (uintptr_t)n;
    if (n > 0) /* best effort, as lm_populate() */
        (void)madvise((void *)a, (size_t)(e - a), MADV_POPULATE_READ);
}

const char *lm_st_path(const lm_st_file *f)
{
    return f->path;
}

size_t lm_st_n_tensors(const lm_st_file *f)
{
    return f->n_tensors;
}

const lm_tensor_info *lm_st_tensor(const lm_st_file *f, size_t i)
{
    return i < f->n_tensors ? &f->tensors[i] : NULL;
}

const lm_tensor_info *lm_st_find(const lm_st_file *f, const char *name, size_t *index)
{
    if (name == NULL)
        return NULL;
    const size_t i = st_strmap_find(&f->names, name, tensor_name_of, f);
    if (i == SIZE_MAX)
        return NULL;
    if (index != NULL)
        *index = i;
    return &f->tensors[i];
}

size_t lm_st_n_metadata(const lm_st_file *f)
{
    return f->n_meta;
}

void lm_st_metadata(const lm_st_file *f, size_t i, const char **key, const char **value)
{
    const int ok = i < f->n_meta;
    if (key != NULL)
        *key = ok ? f->meta[2 * i] : NULL;
    if (value != NULL)
        *value = ok ? f->meta[2 * i + 1] : NULL;
}

const uint8_t *lm_st_data(const lm_st_file *f)
{
    return f->bytes + f->data_offset;
}

uint64_t lm_st_data_offset(const lm_st_file *f)
{
    return f->data_offset;
}

uint64_t lm_st_data_bytes(const lm_st_file *f)
{
    return f->data_bytes;
}

int lm_st_fd(const lm_st_file *f)
{
    return f->fd;
}
