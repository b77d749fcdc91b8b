/* SPDX-License-Identifier: MIT */
/* st_index.c : models: one safetensors file, a sharded checkpoint (model.safetensors.index.json)
 * or a directory holding either.
 * The index is trusted for nothing: shard names must be plain file names next to the index,
 * every shard it names is opened and validated, and the weight_map must route every tensor to
 * the shard that holds it (no ghosts, no omissions, no tensor in two shards).  Shards the map
 * does not name are never opened.  Reads headers only, never tensor data. */
#include "st_reader.h"
#include "torch_model.h"

#include "compat.h"
#include "lm_error.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define INDEX_MAX_BYTES ((size_t)1 << 30)
#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"

struct lm_model {
    char *index_path;          /* owned, NULL for a single file */
    size_t n_files;
    lm_st_file **files;        /* owned, each closed with the model */
    size_t n_tensors;
    lm_model_entry *tensors;  /* owned, shard by shard, header order */
    st_strmap names;
    void **images;             /* owned: safetensors images the files read (lm_model_from_images) */
    size_t n_images;
};

void lm_model_close(lm_model *m)
{
    if (m == NULL)
        return;
    for (size_t i = 0; i < m->n_files; i++)
        lm_st_close(m->files[i]);
    free(m->files);
    free(m->tensors);
    st_strmap_free(&m->names);
    free(m->index_path);
    for (size_t i = 0; i < m->n_images; i++)
        free(m->images[i]);
    free(m->images);
    free(m);
}

static const char *model_name_of(const void *ctx, size_t i)
{
    return ((const lm_model *)ctx)->tensors[i].info->name;
}

/* Lists every tensor of every file, shard by shard, and indexes the names.  A name held by two
 * files is a ShardMismatch (the routing check normally reports it first). */
static lm_code model_index_tensors(lm_model *m, lm_err *err)
{
    size_t total = 0;
    for (size_t i = 0; i < m->n_files; i++)
        total += lm_st_n_tensors(m->files[i]);
    if (total > 0) {
        m->tensors = malloc(total * sizeof *m->tensors);
        if (m->tensors == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    if (st_strmap_init(&m->names, total) != 0)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; i < m->n_files; i++) {
        const lm_st_file *f = m->files[i];
        for (size_t k = 0; k < lm_st_n_tensors(f); k++) {
            const lm_tensor_info *t = lm_st_tensor(f, k);
            m->tensors[m->n_tensors] = (lm_model_entry){t, i};
            const size_t prev = st_strmap_insert(&m->names, t->name, m->n_tensors,
                                                 model_name_of, m);
            if (prev != SIZE_MAX) {
                lm_fail(err, LM_E_FORMAT, "ShardMismatch",
                        "tensor '%.160s' is in both %s and %s", t->name,
                        lm_st_path(m->files[m->tensors[prev].file]), lm_st_path(f));
                lm_err_set_tensor(err, t->name);
                return LM_E_FORMAT;
            }
            m->n_tensors++;
        }
    }
    return LM_OK;
}

static lm_model *model_new(lm_err *err)
{
    lm_model *m = calloc(1, sizeof *m);
    if (m == NULL)
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return m;
}

static lm_model *open_single(const char *path, lm_err *err)
{
    lm_model *m = model_new(err);
    if (m == NULL)
        return NULL;
    m->files = malloc(sizeof *m->files);
    if (m->files == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    m->files[0] = lm_st_open(path, err);
    if (m->files[0] == NULL)
        goto fail;
    m->n_files = 1;
    if (model_index_tensors(m, err) != LM_OK)
        goto fail;
    return m;
fail:
    lm_err_set_path(err, path);
    lm_model_close(m);
    return NULL;
}

lm_model *lm_model_from_images(void **images, const size_t *n_bytes, const char *const *names, size_t n,
                               const char *index_path, lm_err *err)
{
    lm_model *m = model_new(err);
    if (m == NULL) {
        for (size_t i = 0; i < n; i++)
            free(images[i]);
        return NULL;
    }
    m->images = malloc((n ? n : 1) * sizeof *m->images);
    m->files = calloc(n ? n : 1, sizeof *m->files);
    if (m->images == NULL || m->files == NULL) {
        for (size_t i = 0; i < n; i++)
            free(images[i]);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < n; i++)
        m->images[m->n_images++] = images[i];
    for (size_t i = 0; i < n; i++) {
        if ((m->files[i] = lm_st_open_buffer(images[i], n_bytes[i], names[i], err)) == NULL) {
            lm_err_set_path(err, names[i]);
            goto fail;
        }
        m->n_files++;
    }
    if (index_path != NULL && (m->index_path = strdup(index_path)) == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    if (model_index_tensors(m, err) != LM_OK)
        goto fail;
    return m;
fail:
    lm_model_close(m);
    return NULL;
}

/* ---- index -------------------------------------------------------------------------------- */

char *lm_read_small_file(const char *path, size_t max_bytes, size_t *n_out, int *why, lm_err *err)
{
    char *buf = NULL;
    *why = LM_READ_ERROR;
    const int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block */
    if (fd < 0) {
        lm_fail_errno(err, errno, "cannot open");
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        lm_fail_errno(err, errno, "cannot stat");
        goto done;
    }
    if (!S_ISREG(st.st_mode)) {
        *why = S_ISDIR(st.st_mode) ? LM_READ_DIRECTORY : LM_READ_NOT_REGULAR;
        goto done;
    }
    if ((uint64_t)st.st_size > max_bytes) {
        *why = LM_READ_TOO_LARGE;
        *n_out = (size_t)st.st_size;
        goto done;
    }
    const size_t n = (size_t)st.st_size;
    buf = malloc(n + 1);
    if (buf == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    size_t got = 0;
    while (got < n) {
        const ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            lm_fail_errno(err, r < 0 ? errno : EIO, "cannot read");
            free(buf);
            buf = NULL;
            goto done;
        }
        got += (size_t)r;
    }
    buf[n] = '\0';
    *n_out = n;
done:
    close(fd);
    return buf;
}

/* the index file, whole */
static char *read_small_file(const char *path, size_t *n_out, lm_err *err)
{
    if (lm_fail_not_regular(err, path) != LM_OK)
        return NULL;
    int why;
    char *buf = lm_read_small_file(path, INDEX_MAX_BYTES, n_out, &why, err);
    if (buf == NULL && why == LM_READ_TOO_LARGE)
        lm_fail(err, LM_E_FORMAT, "InvalidIndex", "index file of %llu bytes is too large", (unsigned long long)*n_out);
    else if (buf == NULL && why != LM_READ_ERROR)
        lm_fail_errno(err, why == LM_READ_DIRECTORY ? EISDIR : EINVAL, "not a regular file");
    return buf;
}

/* A shard must be a plain file name in the index's directory, ending in ".safetensors". */
static int shard_name_ok(const char *s)
{
    static const char suffix[] = ".safetensors";
    const size_t n = strlen(s), k = sizeof suffix - 1;
    if (n == 0 || strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
        return 0;
    if (strchr(s, '/') != NULL || strchr(s, '\\') != NULL)
        return 0;
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

typedef struct {
    const char *tensor; /* borrowed from the cJSON tree */
    size_t shard;       /* index into the shard list */
    int seen;           /* found in its shard */
} route;

typedef struct {
    route *routes;
    size_t n_routes;
    const char **shards; /* borrowed from the cJSON tree */
    size_t n_shards;
} index_map;

static const char *route_key(const void *ctx, size_t i)
{
    return ((const index_map *)ctx)->routes[i].tensor;
}

static const char *shard_key(const void *ctx, size_t i)
{
    return ((const index_map *)ctx)->shards[i];
}

static char *join_dir(const char *dir, size_t dir_len, const char *name)
{
    const size_t n = strlen(name);
    char *p = malloc(dir_len + 1 + n + 1);
    if (p == NULL)
        return NULL;
    memcpy(p, dir, dir_len);
    p[dir_len] = '/';
    memcpy(p + dir_len + 1, name, n + 1);
    return p;
}

static lm_code index_fail(lm_err *err, const char *kind, const char *tensor, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static lm_code index_fail(lm_err *err, const char *kind, const char *tensor, const char *fmt, ...)
{
    char msg[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lm_fail(err, LM_E_FORMAT, kind, "%s", msg);
    lm_err_set_tensor(err, tensor);
    return LM_E_FORMAT;
}

/* metadata.total_size, when present: a non-negative integer.  *has = 0 when absent. */
static lm_code read_total_size(const cJSON *root, uint64_t *total, int *has, lm_err *err)
{
    *has = 0;
    const cJSON *md = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (md == NULL || cJSON_IsNull(md))
        return LM_OK;
    if (!cJSON_IsObject(md))
        return lm_fail(err, LM_E_FORMAT, "InvalidIndex", "metadata is not an object");
    const cJSON *ts = cJSON_GetObjectItemCaseSensitive(md, "total_size");
    if (ts == NULL)
        return LM_OK;
    const double v = cJSON_IsNumber(ts) ? ts->valuedouble : -1.0;
    /* 18446744073709551616.0 = 2^64, exactly representable */
    if (!cJSON_IsNumber(ts) || !(v >= 0.0) || v >= 18446744073709551616.0 || floor(v) != v)
        return lm_fail(err, LM_E_FORMAT, "InvalidIndex",
                       "metadata.total_size is not a non-negative integer");
    *total = (uint64_t)v;
    *has = 1;
    return LM_OK;
}

static lm_model *open_index(const char *index_path, lm_err *err)
{
    size_t n_text = 0;
    cJSON *root = NULL;
    index_map map = {0};
    st_strmap route_set = {0}, shard_set = {0};
    lm_model *m = NULL;
    char *text = read_small_file(index_path, &n_text, err);
    if (text == NULL)
        goto fail;

    const char *end = NULL;
    root = cJSON_ParseWithLengthOpts(text, n_text, &end, 0);
    if (root == NULL) {
        lm_fail(err, LM_E_FORMAT, "InvalidJson", "index is not valid JSON");
        if (end != NULL && end >= text && end <= text + n_text)
            lm_err_set_offset(err, (uint64_t)(end - text));
        goto fail;
    }
    if (end != NULL) {
        while (end < text + n_text && (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r'))
            end++;
        if (end < text + n_text) {
            lm_fail(err, LM_E_FORMAT, "InvalidJson", "unexpected data after the index's JSON value");
            lm_err_set_offset(err, (uint64_t)(end - text));
            goto fail;
        }
    }
    if (!cJSON_IsObject(root)) {
        lm_fail(err, LM_E_FORMAT, "InvalidIndex", "index is not a JSON object");
        goto fail;
    }
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (wm == NULL) {
        lm_fail(err, LM_E_FORMAT, "MissingField", "index has no weight_map");
        goto fail;
    }
    if (!cJSON_IsObject(wm)) {
        lm_fail(err, LM_E_FORMAT, "InvalidIndex", "weight_map is not an object");
        goto fail;
    }
    const int n_entries = cJSON_GetArraySize(wm);
    if (n_entries <= 0) {
        lm_fail(err, LM_E_FORMAT, "InvalidIndex", "weight_map is empty");
        goto fail;
    }
    uint64_t total_size = 0;
    int has_total = 0;
    if (read_total_size(root, &total_size, &has_total, err) != LM_OK)
        goto fail;

    map.routes = calloc((size_t)n_entries, sizeof *map.routes);
    map.shards = calloc((size_t)n_entries, sizeof *map.shards);
    if (map.routes == NULL || map.shards == NULL ||
        st_strmap_init(&route_set, (size_t)n_entries) != 0 ||
        st_strmap_init(&shard_set, (size_t)n_entries) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    for (const cJSON *e = wm->child; e != NULL; e = e->next) {
        const char *tensor = e->string != NULL ? e->string : "";
        if (!cJSON_IsString(e) || e->valuestring == NULL) {
            index_fail(err, "InvalidIndex", tensor, "weight_map entry '%.160s' is not a string",
                       tensor);
            goto fail;
        }
        const char *shard = e->valuestring;
        if (!shard_name_ok(shard)) {
            index_fail(err, "PathTraversal", tensor,
                       "weight_map routes '%.160s' to '%.120s': shards must be plain "
                       ".safetensors file names next to the index",
                       tensor, shard);
            goto fail;
        }
        size_t s = st_strmap_insert(&shard_set, shard, map.n_shards, shard_key, &map);
        if (s == SIZE_MAX) {
            s = map.n_shards;
            map.shards[map.n_shards++] = shard;
        }
        map.routes[map.n_routes] = (route){tensor, s, 0};
        if (st_strmap_insert(&route_set, tensor, map.n_routes, route_key, &map) != SIZE_MAX) {
            index_fail(err, "DuplicateKey", tensor, "weight_map lists '%.160s' twice", tensor);
            goto fail;
        }
        map.n_routes++;
    }

    m = model_new(err);
    if (m == NULL)
        goto fail;
    m->index_path = strdup(index_path);
    m->files = calloc(map.n_shards, sizeof *m->files);
    if (m->index_path == NULL || m->files == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    const char *slash = strrchr(index_path, '/');
    for (size_t s = 0; s < map.n_shards; s++) {
        char *spath = slash != NULL ? join_dir(index_path, (size_t)(slash - index_path),
                                               map.shards[s])
                                    : strdup(map.shards[s]);
        if (spath == NULL) {
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto fail;
        }
        m->files[s] = lm_st_open(spath, err); /* sets err->path to the shard on failure */
        free(spath);
        if (m->files[s] == NULL)
            goto fail;
        m->n_files++;
    }

    /* every tensor of every shard must be routed to that shard */
    for (size_t s = 0; s < m->n_files; s++) {
        const lm_st_file *f = m->files[s];
        for (size_t k = 0; k < lm_st_n_tensors(f); k++) {
            const char *name = lm_st_tensor(f, k)->name;
            const size_t r = st_strmap_find(&route_set, name, route_key, &map);
            if (r == SIZE_MAX) {
                index_fail(err, "ShardMismatch", name,
                           "tensor '%.160s' is in %.120s but not in the weight_map", name,
                           map.shards[s]);
                goto fail;
            }
            if (map.routes[r].shard != s) {
                index_fail(err, "ShardMismatch", name,
                           "tensor '%.160s' is in %.120s but the weight_map routes it to %.120s",
                           name, map.shards[s], map.shards[map.routes[r].shard]);
                goto fail;
            }
            map.routes[r].seen = 1;
        }
    }
    for (size_t r = 0; r < map.n_routes; r++) {
        if (!map.routes[r].seen) {
            index_fail(err, "ShardMismatch", map.routes[r].tensor,
                       "weight_map routes '%.160s' to %.120s, which does not hold it",
                       map.routes[r].tensor, map.shards[map.routes[r].shard]);
            goto fail;
        }
    }
    if (model_index_tensors(m, err) != LM_OK)
        goto fail;
    if (has_total) {
        uint64_t sum = 0;
        int overflow = 0;
        for (size_t i = 0; i < m->n_tensors; i++)
            overflow |= lm_add_overflow_u64(sum, st_tensor_bytes(m->tensors[i].info), &sum);
        if (overflow || sum != total_size) {
            lm_fail(err, LM_E_FORMAT, "TotalSizeMismatch",
                    "metadata.total_size is %llu but the tensors hold %llu bytes",
                    (unsigned long long)total_size, (unsigned long long)sum);
            goto fail;
        }
    }
    goto done;
fail:
    lm_model_close(m);
    m = NULL;
    lm_err_set_path(err, index_path);
done:
    st_strmap_free(&route_set);
    st_strmap_free(&shard_set);
    free(map.routes);
    free(map.shards);
    cJSON_Delete(root);
    free(text);
    return m;
}

/* ---- public ------------------------------------------------------------------------------- */

static int ends_with(const char *s, const char *suffix)
{
    const size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int is_regular(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

lm_model *lm_model_open(const char *path, lm_err *err)
{
    if (path == NULL || path[0] == '\0') {
        lm_fail(err, LM_E_USAGE, NULL, "no model path given");
        return NULL;
    }
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        size_t n = strlen(path);
        while (n > 1 && path[n - 1] == '/')
            n--;
        char *idx = join_dir(path, n, INDEX_NAME);
        char *one = join_dir(path, n, SINGLE_NAME);
        lm_model *m = NULL;
        if (idx == NULL || one == NULL)
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        else if (is_regular(idx))
            m = open_index(idx, err);
        else if (lm_fail_not_regular(err, idx) != LM_OK)
            ; /* a FIFO, a loop ... where the index is: said as such, never "missing" */
        else if (is_regular(one))
            m = open_single(one, err);
        else if (lm_fail_not_regular(err, one) != LM_OK)
            ;
        else if (lm_torch_model_in_dir(path))
            m = lm_torch_model_open(path, err);
        else {
            lm_fail_errno(err, ENOENT, "directory holds neither " INDEX_NAME " nor " SINGLE_NAME);
            lm_err_set_path(err, path);
        }
        free(idx);
        free(one);
        return m;
    }
    if (lm_torch_model_is_file(path))
        return lm_torch_model_open(path, err);
    if (ends_with(path, ".json"))
        return open_index(path, err);
    return open_single(path, err);
}

size_t lm_model_n_files(const lm_model *m)
{
    return m->n_files;
}

const lm_st_file *lm_model_file(const lm_model *m, size_t i)
{
    return i < m->n_files ? m->files[i] : NULL;
}

size_t lm_model_n_tensors(const lm_model *m)
{
    return m->n_tensors;
}

const lm_model_entry *lm_model_tensor(const lm_model *m, size_t i)
{
    return i < m->n_tensors ? &m->tensors[i] : NULL;
}

const lm_model_entry *lm_model_find(const lm_model *m, const char *name, size_t *index)
{
    if (name == NULL)
        return NULL;
    const size_t i = st_strmap_find(&m->names, name, model_name_of, m);
    if (i == SIZE_MAX)
        return NULL;
    if (index != NULL)
        *index = i;
    return &m->tensors[i];
}

const char *lm_model_index_path(const lm_model *m)
{
    return m->index_path;
}
