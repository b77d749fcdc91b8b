/* SPDX-License-Identifier: MIT */
/* torch_bin.c : torch.save() checkpoints (zip through libzip, or legacy) into a tensor set.
 * The pickle is read by pickle_reader (nothing executed); this file finds the storages, checks
 * their sizes against what the pickle declares, and gathers every tensor into a contiguous,
 * little-endian buffer.  It does not read torch's even older tar format. */
#include "torch_bin.h"

#include "compat.h"
#include "lm_error.h"
#include "lm_sys.h"
#include "pickle_reader.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zip.h>

/* libzip is loaded on first use, not linked: loading it (with the libcrypto, libbz2 and libz it
 * needs) cost every run ~3-5 ms of one core before main(), and only torch.save() zips need it.
 * The functions below are libzip's own, called through their addresses in the loaded library
 * (lz_lib loaded first, at the two places an archive is opened). */
#define ZIP_FNS(X)                                                                                                    \
    X(zip_discard) X(zip_error_code_zip) X(zip_error_fini) X(zip_error_init) X(zip_error_init_with_code)              \
    X(zip_error_strerror) X(zip_fclose) X(zip_file_strerror) X(zip_fopen_index) X(zip_fread) X(zip_get_name)         \
    X(zip_get_num_entries) X(zip_name_locate) X(zip_open) X(zip_open_from_source) X(zip_source_buffer_create)        \
    X(zip_source_free) X(zip_stat_index) X(zip_stat_init) X(zip_strerror)
LM_LAZY_LIBRARY(lz_lib, ZIP_FNS, "libzip (libzip.so.4)", "reading a torch.save() zip checkpoint", "libzip.so.4",
                "libzip.so");

#define zip_discard (*lm_lazy_fns.zip_discard)
#define zip_error_code_zip (*lm_lazy_fns.zip_error_code_zip)
#define zip_error_fini (*lm_lazy_fns.zip_error_fini)
#define zip_error_init (*lm_lazy_fns.zip_error_init)
#define zip_error_init_with_code (*lm_lazy_fns.zip_error_init_with_code)
#define zip_error_strerror (*lm_lazy_fns.zip_error_strerror)
#define zip_fclose (*lm_lazy_fns.zip_fclose)
#define zip_file_strerror (*lm_lazy_fns.zip_file_strerror)
#define zip_fopen_index (*lm_lazy_fns.zip_fopen_index)
#define zip_fread (*lm_lazy_fns.zip_fread)
#define zip_get_name (*lm_lazy_fns.zip_get_name)
#define zip_get_num_entries (*lm_lazy_fns.zip_get_num_entries)
#define zip_name_locate (*lm_lazy_fns.zip_name_locate)
#define zip_open (*lm_lazy_fns.zip_open)
#define zip_open_from_source (*lm_lazy_fns.zip_open_from_source)
#define zip_source_buffer_create (*lm_lazy_fns.zip_source_buffer_create)
#define zip_source_free (*lm_lazy_fns.zip_source_free)
#define zip_stat_index (*lm_lazy_fns.zip_stat_index)
#define zip_stat_init (*lm_lazy_fns.zip_stat_init)
#define zip_strerror (*lm_lazy_fns.zip_strerror)

#define MAX_PICKLE_BYTES ((uint64_t)256 << 20)
#define MAX_DEFLATE_RATIO 1032u /* deflate cannot expand more than this */

/* Supplies storage i: *data (borrowed) or *owned (from malloc, handed over). */
typedef lm_code (*fetch_fn)(void *ctx, size_t i, const lm_pk_storage *st, const uint8_t **data,
                            uint8_t **owned, lm_err *err);

typedef struct storage_slot {
    const uint8_t *data;
    uint8_t *owned;
    size_t remaining; /* tensors still to gather from it */
    int fetched;
} storage_slot;

static int is_row_major(const lm_pk_tensor *t)
{
    uint64_t expect = 1;
    for (size_t d = t->n_dims; d-- > 0;) {
        if (t->shape[d] != 1 && t->stride[d] != expect)
            return 0;
        expect *= t->shape[d];
    }
    return 1;
}

/* Copies a view (already checked to lie inside the storage) into dst, row-major. */
static void gather(uint8_t *dst, const uint8_t *src, size_t es, const lm_pk_tensor *t)
{
    if (t->n_elems == 0)
        return;
    if (t->n_dims == 0) {
        memcpy(dst, src + t->offset * es, es);
        return;
    }
    size_t nd = t->n_dims;
    uint64_t idx[LM_PK_MAX_DIMS] = {0};
    uint64_t inner = t->shape[nd - 1], inner_stride = t->stride[nd - 1];
    uint64_t outer = t->n_elems / inner;
    for (uint64_t o = 0; o < outer; o++) {
        uint64_t base = t->offset;
        for (size_t d = 0; d + 1 < nd; d++)
            base += idx[d] * t->stride[d];
        if (inner_stride == 1) {
            memcpy(dst, src + base * es, inner * es);
        } else {
            for (uint64_t k = 0; k < inner; k++)
                memcpy(dst + k * es, src + (base + k * inner_stride) * es, es);
        }
        dst += inner * es;
        for (size_t d = nd - 1; d-- > 0;) {
            if (++idx[d] < t->shape[d])
                break;
            idx[d] = 0;
        }
    }
}

static void swap_elems(uint8_t *p, uint64_t n_elems, unsigned es)
{
    for (uint64_t i = 0; i < n_elems; i++, p += es)
        for (unsigned a = 0, b = es - 1; a < b; a++, b--) {
            uint8_t tmp = p[a];
            p[a] = p[b];
            p[b] = tmp;
        }
}

static void sanitize(char *dst, size_t cap, const uint8_t *s, size_t n)
{
    size_t j = 0;
    for (size_t i = 0; i < n && j + 1 < cap; i++)
        dst[j++] = (s[i] == '\n' || s[i] == '\r') ? ' ' : (char)s[i];
    dst[j] = '\0';
}

/* Uses per storage, counted over the values actually gathered: one tensor object may sit under
 * several keys (tied weights: the pickle memo shares it), so the parser's count of tensor
 * records is not the number of times a storage is read (issue 15: the second read copied from
 * a storage already handed over). */
static void count_uses(const lm_pickle *pk, lm_pk_ref root, lm_pk_kind kind, size_t n_keys, storage_slot *slot)
{
    for (size_t k = 0; k < n_keys; k++) {
        lm_pk_ref val = kind == LM_PK_TENSOR ? root : lm_pk_item(pk, root, kind == LM_PK_DICT ? 2 * k + 1 : k);
        const lm_pk_tensor *t = lm_pk_tensor_of(pk, val);
        if (t != NULL)
            slot[t->storage].remaining++;
    }
}

/* Walks the root dict of pk and adds one tensor per key.  With root_kind != NULL a list of
 * tensors (items named "0", "1" ...) or a single tensor (named "tensor") is accepted too, and
 * *root_kind says which (lm_torch_root). */
static lm_code build_set(const lm_pickle *pk, fetch_fn fetch, void *ctx, int big_endian,
                         const char *source, lm_tensor_set **out, int *root_kind, lm_err *err)
{
    lm_pk_ref root = lm_pk_root(pk);
    lm_pk_kind kind = lm_pk_kind_of(pk, root);
    if (kind != LM_PK_DICT && (root_kind == NULL || (kind != LM_PK_LIST && kind != LM_PK_TENSOR)))
        return lm_fail(err, LM_E_FORMAT, "NotAStateDict", "checkpoint holds a %s, not a state dict%s",
                       lm_pk_kind_name(kind), root_kind ? ", a list of tensors or a tensor" : "");
    if (root_kind != NULL)
        *root_kind = kind == LM_PK_DICT ? LM_TORCH_ROOT_DICT : kind == LM_PK_LIST ? LM_TORCH_ROOT_LIST
                                                                                 : LM_TORCH_ROOT_TENSOR;
    size_t n_st = lm_pk_n_storages(pk);
    uint64_t storage_bytes = 0, out_bytes = 0, out_limit;
    for (size_t i = 0; i < n_st; i++) /* those with tensors were checked against real data */
        if (lm_pk_storage_at(pk, i)->n_tensors > 0 &&
            lm_add_overflow_u64(storage_bytes, lm_pk_storage_at(pk, i)->n_bytes, &storage_bytes))
            storage_bytes = UINT64_MAX;
    /* views may share a storage, but thousands of views of one storage are a memory bomb */
    out_limit = storage_bytes > (UINT64_MAX >> 3) ? UINT64_MAX : 4 * storage_bytes + ((uint64_t)64 << 20);

    storage_slot *slot = calloc(n_st ? n_st : 1, sizeof *slot);
    lm_tensor_set *ts = lm_ts_create(source);
    char *name = NULL;
    lm_code rc = LM_OK;
    if (slot == NULL || ts == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    size_t n_keys = kind == LM_PK_TENSOR ? 1 : lm_pk_len(pk, root);
    count_uses(pk, root, kind, n_keys, slot);
    for (size_t k = 0; k < n_keys && rc == LM_OK; k++) {
        lm_pk_ref key = 0, val;
        size_t n_name;
        const uint8_t *s;
        char index_name[32];
        if (kind == LM_PK_DICT) {
            key = lm_pk_item(pk, root, 2 * k);
            val = lm_pk_item(pk, root, 2 * k + 1);
            s = lm_pk_bytes(pk, key, &n_name);
        } else { /* list items and a lone tensor get made-up names */
            val = kind == LM_PK_LIST ? lm_pk_item(pk, root, k) : root;
            n_name = (size_t)snprintf(index_name, sizeof index_name, kind == LM_PK_LIST ? "%zu" : "tensor", k);
            s = (const uint8_t *)index_name;
        }
        if (kind == LM_PK_DICT && (lm_pk_kind_of(pk, key) != LM_PK_STR || memchr(s, '\0', n_name) != NULL)) {
            rc = lm_fail(err, LM_E_FORMAT, "InvalidKey", "state dict key %zu is a %s, not a name", k,
                         lm_pk_kind_of(pk, key) == LM_PK_STR ? "string with a NUL byte" :
                         lm_pk_kind_name(lm_pk_kind_of(pk, key)));
            break;
        }
        free(name);
        if ((name = malloc(n_name + 1)) == NULL) {
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            break;
        }
        memcpy(name, s, n_name);
        name[n_name] = '\0';
        const lm_pk_tensor *t = lm_pk_tensor_of(pk, val);
        if (t == NULL) {
            char shown[200];
            sanitize(shown, sizeof shown, s, n_name);
            rc = lm_fail(err, LM_E_UNSUPPORTED, "NonTensorValue", "%s '%s' is a %s, not a tensor",
                         kind == LM_PK_LIST ? "list item" : "state dict value for key", shown,
                         lm_pk_kind_name(lm_pk_kind_of(pk, val)));
            lm_err_set_tensor(err, name);
            break;
        }
        const lm_pk_storage *st = lm_pk_storage_at(pk, t->storage);
        storage_slot *sl = &slot[t->storage];
        uint64_t n_bytes = t->n_elems * st->elem_bytes; /* <= st->n_bytes: checked by the parser */
        if (lm_add_overflow_u64(out_bytes, n_bytes, &out_bytes) || out_bytes > out_limit) {
            rc = lm_fail(err, LM_E_FORMAT, "InvalidStorage",
                         "tensors add up to more than %llu bytes from %llu bytes of storage",
                         (unsigned long long)out_limit, (unsigned long long)storage_bytes);
            lm_err_set_tensor(err, name);
            break;
        }
        if (!sl->fetched) {
            if ((rc = fetch(ctx, t->storage, st, &sl->data, &sl->owned, err)) != LM_OK) {
                lm_err_set_tensor(err, name);
                break;
            }
            sl->fetched = 1;
            if (sl->owned != NULL)
                sl->data = sl->owned;
        }
        uint8_t *data;
        if (sl->owned != NULL && sl->remaining == 1 && t->offset == 0 && t->n_elems == st->n_elems &&
            is_row_major(t)) {
            data = sl->owned; /* the whole storage is this tensor: hand it over */
            sl->owned = NULL;
        } else {
            if ((data = malloc(n_bytes ? (size_t)n_bytes : 1)) == NULL) {
                rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory (%llu bytes for a tensor)", (unsigned long long)n_bytes);
                break;
            }
            gather(data, sl->data, st->elem_bytes, t);
        }
        if (big_endian && st->elem_bytes > 1)
            swap_elems(data, t->n_elems, st->elem_bytes);
        if (--sl->remaining == 0) {
            free(sl->owned);
            sl->owned = NULL;
            sl->data = NULL;
        }
        size_t owned_before = ts->n_owned;
        rc = lm_ts_add(ts, name, st->dtype, t->n_dims, t->shape, data, 1, err);
        if (rc != LM_OK) {
            if (ts->n_owned == owned_before)
                free(data);
            lm_err_set_tensor(err, name);
        }
    }
done:
    if (slot != NULL)
        for (size_t i = 0; i < n_st; i++)
            free(slot[i].owned);
    free(slot);
    free(name);
    if (rc != LM_OK) {
        lm_ts_free(ts);
        return rc;
    }
    *out = ts;
    return LM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* zip layout */

typedef struct zip_ctx {
    zip_t *za;
    char prefix[256];
    zip_uint64_t *index; /* per storage */
    size_t cap_index;
} zip_ctx;

static lm_code zip_entry_error(zip_t *za, zip_file_t *zf, const char *entry, lm_err *err)
{
    const char *why = zf != NULL ? zip_file_strerror(zf) : zip_strerror(za);
    return lm_fail(err, LM_E_FORMAT, "InvalidZip", "cannot read archive entry '%s': %s", entry, why);
}

/* Reads entry idx whole into a new buffer, with its declared size checked against max_bytes,
 * the compressed size and the bytes actually produced (libzip checks the CRC at the end). */
static lm_code read_entry(zip_t *za, zip_uint64_t idx, const char *entry, uint64_t max_bytes,
                          uint8_t **out, size_t *n_out, lm_err *err)
{
    zip_stat_t sb;
    zip_stat_init(&sb);
    if (zip_stat_index(za, idx, 0, &sb) != 0)
        return zip_entry_error(za, NULL, entry, err);
    const zip_uint64_t need = ZIP_STAT_SIZE | ZIP_STAT_COMP_SIZE | ZIP_STAT_COMP_METHOD;
    if ((sb.valid & need) != need)
        return lm_fail(err, LM_E_FORMAT, "InvalidZip", "archive entry '%s' has no size", entry);
    if ((sb.valid & ZIP_STAT_ENCRYPTION_METHOD) && sb.encryption_method != ZIP_EM_NONE)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedZip", "archive entry '%s' is encrypted", entry);
    if (sb.comp_method != ZIP_CM_STORE && sb.comp_method != ZIP_CM_DEFLATE)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedZip", "archive entry '%s' uses compression method %d",
                       entry, (int)sb.comp_method);
    if (sb.size > max_bytes || sb.size > SIZE_MAX - 1 ||
        (sb.comp_method == ZIP_CM_STORE && sb.size != sb.comp_size) ||
        (sb.comp_method == ZIP_CM_DEFLATE && sb.size / MAX_DEFLATE_RATIO > sb.comp_size + 1))
        return lm_fail(err, LM_E_FORMAT, "InvalidZip", "archive entry '%s' has an implausible size of %llu bytes",
                       entry, (unsigned long long)sb.size);
    uint8_t *buf = malloc(sb.size ? (size_t)sb.size : 1);
    if (buf == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory (%llu bytes for '%s')", (unsigned long long)sb.size, entry);
    zip_file_t *zf = zip_fopen_index(za, idx, 0);
    if (zf == NULL) {
        free(buf);
        return zip_entry_error(za, NULL, entry, err);
    }
    zip_uint64_t got = 0;
    lm_code rc = LM_OK;
    while (got < sb.size) {
        zip_int64_t k = zip_fread(zf, buf + got, sb.size - got);
        if (k < 0) {
            rc = zip_entry_error(za, zf, entry, err);
            break;
        }
        if (k == 0) {
            rc = lm_fail(err, LM_E_FORMAT, "InvalidZip", "archive entry '%s' is truncated (%llu of %llu bytes)",
                         entry, (unsigned long long)got, (unsigned long long)sb.size);
            break;
        }
        got += (zip_uint64_t)k;
    }
    if (rc == LM_OK) { /* reaching the end makes libzip verify the CRC */
        uint8_t extra;
        zip_int64_t k = zip_fread(zf, &extra, 1);
        if (k < 0)
            rc = zip_entry_error(za, zf, entry, err);
        else if (k > 0)
            rc = lm_fail(err, LM_E_FORMAT, "InvalidZip", "archive entry '%s' is longer than declared", entry);
    }
    zip_fclose(zf);
    if (rc != LM_OK) {
        free(buf);
        return rc;
    }
    *out = buf;
    *n_out = (size_t)sb.size;
    return LM_OK;
}

static lm_code storage_entry_name(const zip_ctx *z, const char *key, char *buf, size_t cap, lm_err *err)
{
    int n = snprintf(buf, cap, "%s/data/%s", z->prefix, key);
    if (n < 0 || (size_t)n >= cap)
        return lm_fail(err, LM_E_FORMAT, "InvalidStorage", "storage key '%s' is too long", key);
    return LM_OK;
}

static lm_code zip_resolve(void *ctx, size_t i, const lm_pk_storage *st, lm_err *err)
{
    zip_ctx *z = ctx;
    char entry[600];
    lm_code rc = storage_entry_name(z, st->key, entry, sizeof entry, err);
    if (rc)
        return rc;
    zip_int64_t idx = zip_name_locate(z->za, entry, ZIP_FL_ENC_RAW);
    if (idx < 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidStorage", "storage '%s' is missing from the archive (no entry '%s')",
                       st->key, entry);
    zip_stat_t sb;
    zip_stat_init(&sb);
    if (zip_stat_index(z->za, (zip_uint64_t)idx, 0, &sb) != 0 || !(sb.valid & ZIP_STAT_SIZE))
        return zip_entry_error(z->za, NULL, entry, err);
    if (sb.size != st->n_bytes)
        return lm_fail(err, LM_E_FORMAT, "InvalidStorage",
                       "storage '%s' declares %llu bytes (%llu x %s) but entry '%s' holds %llu",
                       st->key, (unsigned long long)st->n_bytes, (unsigned long long)st->n_elems,
                       lm_dtype_name(st->dtype), entry, (unsigned long long)sb.size);
    if (i >= z->cap_index) {
        size_t cap = z->cap_index ? z->cap_index * 2 : 64;
        while (cap <= i)
            cap *= 2;
        zip_uint64_t *q = realloc(z->index, cap * sizeof *q);
        if (q == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        z->index = q;
        z->cap_index = cap;
    }
    z->index[i] = (zip_uint64_t)idx;
    return LM_OK;
}

static lm_code zip_fetch(void *ctx, size_t i, const lm_pk_storage *st, const uint8_t **data,
                         uint8_t **owned, lm_err *err)
{
    zip_ctx *z = ctx;
    char entry[600];
    size_t n;
    lm_code rc = storage_entry_name(z, st->key, entry, sizeof entry, err);
    if (rc == LM_OK)
        rc = read_entry(z->za, z->index[i], entry, st->n_bytes, owned, &n, err);
    if (rc == LM_OK && n != st->n_bytes) {
        free(*owned);
        *owned = NULL;
        rc = lm_fail(err, LM_E_FORMAT, "InvalidStorage", "entry '%s' holds %zu bytes, expected %llu", entry, n,
                     (unsigned long long)st->n_bytes);
    }
    *data = *owned;
    return rc;
}

static lm_code load_zip(zip_t *za, const char *source, lm_tensor_set **out, int *root_kind, lm_err *err)
{
    zip_ctx z;
    memset(&z, 0, sizeof z);
    z.za = za;
    uint8_t *pkl = NULL, *order = NULL;
    size_t n_pkl = 0, n_order = 0;
    lm_pickle *pk = NULL;
    lm_code rc = LM_OK;
    char entry[300];

    const char *first = zip_get_num_entries(za, 0) > 0 ? zip_get_name(za, 0, ZIP_FL_ENC_RAW) : NULL;
    const char *slash = first != NULL ? strchr(first, '/') : NULL;
    if (slash == NULL || slash == first || (size_t)(slash - first) >= sizeof z.prefix) {
        rc = lm_fail(err, LM_E_FORMAT, "NotACheckpoint", "zip archive is not a torch checkpoint (no '<name>/data.pkl')");
        goto done;
    }
    memcpy(z.prefix, first, (size_t)(slash - first));
    z.prefix[slash - first] = '\0';

    snprintf(entry, sizeof entry, "%s/data.pkl", z.prefix);
    zip_int64_t idx = zip_name_locate(za, entry, ZIP_FL_ENC_RAW);
    if (idx < 0) {
        rc = lm_fail(err, LM_E_FORMAT, "NotACheckpoint", "zip archive is not a torch checkpoint (no entry '%s')", entry);
        goto done;
    }
    if ((rc = read_entry(za, (zip_uint64_t)idx, entry, MAX_PICKLE_BYTES, &pkl, &n_pkl, err)))
        goto done;

    int big_endian = 0;
    char order_entry[300];
    snprintf(order_entry, sizeof order_entry, "%s/byteorder", z.prefix);
    if ((idx = zip_name_locate(za, order_entry, ZIP_FL_ENC_RAW)) >= 0) {
        if ((rc = read_entry(za, (zip_uint64_t)idx, order_entry, 16, &order, &n_order, err)))
            goto done;
        if (n_order == 3 && memcmp(order, "big", 3) == 0)
            big_endian = 1;
        else if (!(n_order == 6 && memcmp(order, "little", 6) == 0)) {
            rc = lm_fail(err, LM_E_FORMAT, "InvalidZip", "entry '%s' is neither 'little' nor 'big'", order_entry);
            goto done;
        }
    }

    lm_pk_options opt;
    memset(&opt, 0, sizeof opt);
    opt.label = entry;
    opt.resolve = zip_resolve;
    opt.ctx = &z;
    if ((rc = lm_pk_parse(pkl, n_pkl, &opt, &pk, NULL, err)))
        goto done;
    rc = build_set(pk, zip_fetch, &z, big_endian, source, out, root_kind, err);
done:
    lm_pk_free(pk);
    free(pkl);
    free(order);
    free(z.index);
    return rc;
}

static lm_code zip_open_error(zip_error_t *ze, lm_err *err)
{
    lm_code rc = lm_fail(err, zip_error_code_zip(ze) == ZIP_ER_MEMORY ? LM_E_NOMEM : LM_E_FORMAT, "InvalidZip",
                         "not a readable zip archive: %s", zip_error_strerror(ze));
    zip_error_fini(ze);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* legacy layout */

typedef struct legacy_ctx {
    const uint8_t **data; /* per storage, into the buffer */
} legacy_ctx;

static lm_code legacy_fetch(void *ctx, size_t i, const lm_pk_storage *st, const uint8_t **data,
                            uint8_t **owned, lm_err *err)
{
    const legacy_ctx *l = ctx;
    (void)st;
    (void)err;
    *data = l->data[i];
    *owned = NULL;
    return LM_OK;
}

static lm_code parse_at(const uint8_t *buf, size_t n_bytes, size_t *pos, lm_pickle **pk, lm_err *err)
{
    lm_pk_options opt;
    memset(&opt, 0, sizeof opt);
    opt.base_offset = *pos;
    size_t used = 0;
    lm_code rc = lm_pk_parse(buf + *pos, n_bytes - *pos, &opt, pk, &used, err);
    *pos += used;
    return rc;
}

static lm_code load_legacy(const uint8_t *buf, size_t n_bytes, const char *source, lm_tensor_set **out, int *root_kind,
                           lm_err *err)
{
    static const uint8_t magic[10] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
    lm_pickle *hdr = NULL, *pk = NULL, *keys = NULL;
    legacy_ctx l = {NULL};
    size_t pos = 0, n;
    int64_t v;
    lm_code rc;

    if ((rc = parse_at(buf, n_bytes, &pos, &hdr, err)))
        goto done;
    const uint8_t *m = lm_pk_bytes(hdr, lm_pk_root(hdr), &n);
    if (lm_pk_kind_of(hdr, lm_pk_root(hdr)) != LM_PK_BIGINT || n != sizeof magic || memcmp(m, magic, n) != 0) {
        rc = lm_fail(err, LM_E_FORMAT, "NotACheckpoint", "not a torch checkpoint (legacy magic number missing)");
        goto done;
    }
    lm_pk_free(hdr);
    hdr = NULL;
    if ((rc = parse_at(buf, n_bytes, &pos, &hdr, err)))
        goto done;
    if (!lm_pk_int(hdr, lm_pk_root(hdr), &v) || v != 1001) {
        rc = lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "legacy checkpoint has an unsupported protocol version");
        goto done;
    }
    lm_pk_free(hdr);
    hdr = NULL;
    if ((rc = parse_at(buf, n_bytes, &pos, &hdr, err)))
        goto done;
    lm_pk_ref info = lm_pk_root(hdr);
    if (lm_pk_kind_of(hdr, info) != LM_PK_DICT) {
        rc = lm_fail(err, LM_E_FORMAT, "NotACheckpoint", "legacy checkpoint sys_info is not a dict");
        goto done;
    }
    for (size_t i = 0; i < lm_pk_len(hdr, info); i++) {
        const uint8_t *k = lm_pk_bytes(hdr, lm_pk_item(hdr, info, 2 * i), &n);
        if (lm_pk_kind_of(hdr, lm_pk_item(hdr, info, 2 * i)) == LM_PK_STR && n == 13 &&
            memcmp(k, "little_endian", 13) == 0 &&
            (!lm_pk_int(hdr, lm_pk_item(hdr, info, 2 * i + 1), &v) || v != 1)) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedByteOrder", "legacy checkpoint written on a big-endian machine");
            goto done;
        }
    }

    size_t pickle_pos = pos;
    if ((rc = parse_at(buf, n_bytes, &pos, &pk, err)) || (rc = parse_at(buf, n_bytes, &pos, &keys, err)))
        goto done;
    size_t n_st = lm_pk_n_storages(pk);
    if ((l.data = calloc(n_st ? n_st : 1, sizeof *l.data)) == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    lm_pk_ref list = lm_pk_root(keys);
    if (lm_pk_kind_of(keys, list) != LM_PK_LIST) {
        rc = lm_fail(err, LM_E_FORMAT, "NotACheckpoint", "legacy checkpoint storage key list is missing");
        lm_err_set_offset(err, pickle_pos);
        goto done;
    }
    for (size_t i = 0; i < lm_pk_len(keys, list); i++) {
        const uint8_t *k = lm_pk_bytes(keys, lm_pk_item(keys, list, i), &n);
        char key[256];
        if (lm_pk_kind_of(keys, lm_pk_item(keys, list, i)) != LM_PK_STR || n >= sizeof key) {
            rc = lm_fail(err, LM_E_FORMAT, "InvalidStorage", "legacy storage key %zu is not a short string", i);
            goto done;
        }
        memcpy(key, k, n);
        key[n] = '\0';
        size_t s = memchr(key, '\0', n) ? SIZE_MAX : lm_pk_storage_find(pk, key);
        if (s == SIZE_MAX || l.data[s] != NULL) {
            rc = lm_fail(err, LM_E_FORMAT, "InvalidStorage", "legacy storage key '%s' is %s", key,
                         s == SIZE_MAX ? "not referenced by the pickle" : "listed twice");
            goto done;
        }
        const lm_pk_storage *st = lm_pk_storage_at(pk, s);
        if (n_bytes - pos < 8 || lm_load_le64(buf + pos) != st->n_elems || n_bytes - pos - 8 < st->n_bytes) {
            rc = lm_fail(err, LM_E_FORMAT, "InvalidStorage",
                         n_bytes - pos < 8 || lm_load_le64(buf + pos) == st->n_elems
                             ? "legacy storage '%s' is truncated (needs %llu elements)"
                             : "legacy storage '%s' size disagrees with the pickle (%llu elements)",
                         key, (unsigned long long)st->n_elems);
            lm_err_set_offset(err, pos);
            goto done;
        }
        l.data[s] = buf + pos + 8;
        pos += 8 + (size_t)st->n_bytes;
    }
    for (size_t s = 0; s < n_st; s++)
        if (l.data[s] == NULL && lm_pk_storage_at(pk, s)->n_tensors > 0) {
            rc = lm_fail(err, LM_E_FORMAT, "InvalidStorage", "storage '%s' has no data in the file",
                         lm_pk_storage_at(pk, s)->key);
            goto done;
        }
    rc = build_set(pk, legacy_fetch, &l, 0, source, out, root_kind, err);
done:
    lm_pk_free(hdr);
    lm_pk_free(pk);
    lm_pk_free(keys);
    free(l.data);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */

static int looks_like_zip(const uint8_t *b, size_t n)
{
    return n >= 4 && b[0] == 'P' && b[1] == 'K' && ((b[2] == 3 && b[3] == 4) || (b[2] == 5 && b[3] == 6));
}

static lm_code load_buffer(const void *buf, size_t n_bytes, const char *name, lm_tensor_set **out,
                           int *root_kind, lm_err *err)
{
    const uint8_t *b = buf;
    lm_code rc;
    *out = NULL;
    if (looks_like_zip(b, n_bytes)) {
        zip_error_t ze;
        zip_source_t *src = NULL;
        zip_t *za = NULL;
        if ((rc = lm_sys_lazy_load(&lz_lib, err)) != LM_OK)
            goto out;
        zip_error_init(&ze);
        src = zip_source_buffer_create(buf, n_bytes, 0, &ze);
        za = src != NULL ? zip_open_from_source(src, ZIP_RDONLY | ZIP_CHECKCONS, &ze) : NULL;
        if (za == NULL) {
            zip_source_free(src);
            rc = zip_open_error(&ze, err);
        } else {
            zip_error_fini(&ze);
            rc = load_zip(za, name, out, root_kind, err);
            zip_discard(za);
        }
    } else if (n_bytes >= 2 && b[0] == 0x80) {
        rc = load_legacy(b, n_bytes, name, out, root_kind, err);
    } else {
        rc = lm_fail(err, LM_E_FORMAT, "NotACheckpoint", "not a torch checkpoint (neither zip nor legacy pickle)");
    }
out:
    lm_err_set_path(err, name);
    return rc;
}

lm_code lm_torch_bin_load_buffer(const void *buf, size_t n_bytes, const char *name,
                                 lm_tensor_set **out, lm_err *err)
{
    return load_buffer(buf, n_bytes, name, out, NULL, err);
}

lm_code lm_torch_obj_load_buffer(const void *buf, size_t n_bytes, const char *name,
                                 lm_tensor_set **out, int *root_kind, lm_err *err)
{
    return load_buffer(buf, n_bytes, name, out, root_kind, err);
}

static lm_code load_path(const char *path, lm_tensor_set **out, int *root_kind, lm_err *err)
{
    lm_code rc;
    *out = NULL;
    int fd = -1;
    if ((rc = lm_fail_not_regular(err, path)) != LM_OK)
        goto done;
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO appearing here must not block */
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) {
        rc = lm_fail_errno(err, errno, "cannot open");
        goto done;
    }
    if (!S_ISREG(sb.st_mode) || sb.st_size == 0) {
        rc = lm_fail(err, LM_E_FORMAT, "NotACheckpoint", "not a torch checkpoint (%s)",
                     S_ISREG(sb.st_mode) ? "empty file" : "not a regular file");
        goto done;
    }
    uint8_t head[4] = {0};
    ssize_t got = pread(fd, head, sizeof head, 0);
    if (got < 0) {
        rc = lm_fail_errno(err, errno, "cannot read");
        goto done;
    }
    if (looks_like_zip(head, (size_t)got)) {
        /* libzip reads the file itself, entry by entry */
        if ((rc = lm_sys_lazy_load(&lz_lib, err)) != LM_OK)
            goto done;
        int zerr = 0;
        zip_t *za = zip_open(path, ZIP_RDONLY | ZIP_CHECKCONS, &zerr);
        if (za == NULL) {
            zip_error_t ze;
            zip_error_init_with_code(&ze, zerr);
            rc = zip_open_error(&ze, err);
            goto done;
        }
        rc = load_zip(za, path, out, root_kind, err);
        zip_discard(za);
    } else {
        if ((uint64_t)sb.st_size > SIZE_MAX) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, NULL, "file too large to map");
            goto done;
        }
        void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            rc = lm_fail_errno(err, errno, "cannot map");
            goto done;
        }
        rc = load_buffer(map, (size_t)sb.st_size, path, out, root_kind, err);
        munmap(map, (size_t)sb.st_size);
    }
done:
    if (fd >= 0)
        close(fd);
    lm_err_set_path(err, path);
    return rc;
}

lm_code lm_torch_bin_load(const char *path, lm_tensor_set **out, lm_err *err)
{
    return load_path(path, out, NULL, err);
}

lm_code lm_torch_obj_load(const char *path, lm_tensor_set **out, int *root_kind, lm_err *err)
{
    return load_path(path, out, root_kind, err);
}

/* ---------------------------------------------------------------------------------------- */

typedef struct user_ctx {
    lm_torch_storage_fn fn;
    void *ctx;
} user_ctx;

static lm_code user_fetch(void *ctx, size_t i, const lm_pk_storage *st, const uint8_t **data,
                          uint8_t **owned, lm_err *err)
{
    const user_ctx *u = ctx;
    const void *p = NULL;
    (void)i;
    *owned = NULL;
    lm_code rc = u->fn(u->ctx, st->key, st->dtype, st->n_bytes, &p, err);
    if (rc == LM_OK && p == NULL && st->n_bytes > 0)
        rc = lm_fail(err, LM_E_FORMAT, "InvalidStorage", "storage '%s' has no data", st->key);
    *data = p;
    return rc;
}

lm_code lm_torch_pickle_load(const void *pkl, size_t n_bytes, const char *name,
                             lm_torch_storage_fn fn, void *ctx, lm_tensor_set **out, lm_err *err)
{
    lm_pickle *pk = NULL;
    user_ctx u = {fn, ctx};
    *out = NULL;
    lm_code rc = lm_pk_parse(pkl, n_bytes, NULL, &pk, NULL, err);
    if (rc == LM_OK)
        rc = build_set(pk, user_fetch, &u, 0, name, out, NULL, err);
    lm_pk_free(pk);
    lm_err_set_path(err, name);
    return rc;
}
