/* SPDX-License-Identifier: MIT */
/* torch_model.c : a PyTorch checkpoint as a base model (see torch_model.h). */
#include "torch_model.h"

#include "lm_error.h"
#include "st_reader.h"
#include "tensor_set.h"
#include "torch_bin.h"

#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define BIN_NAME "pytorch_model.bin"
#define BIN_INDEX_NAME "pytorch_model.bin.index.json"
#define BIN_INDEX_MAX_BYTES ((size_t)1 << 28)

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int is_regular(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static char *join(const char *dir, size_t dir_len, const char *name)
{
    size_t n = dir_len + strlen(name) + 2;
    char *p = malloc(n);
    if (p != NULL)
        snprintf(p, n, "%.*s/%s", (int)dir_len, dir, name);
    return p;
}

int lm_torch_model_is_file(const char *path)
{
    return ends_with(path, ".bin") || ends_with(path, ".pt") || ends_with(path, ".pth") ||
           ends_with(path, ".bin.index.json");
}

int lm_torch_model_in_dir(const char *dir)
{
    char *a = join(dir, strlen(dir), BIN_INDEX_NAME), *b = join(dir, strlen(dir), BIN_NAME);
    int r = (a && is_regular(a)) || (b && is_regular(b));
    free(a);
    free(b);
    return r;
}

/* the tensors of ts as one safetensors file in memory (format: pt, the set's order) */
static void *st_image(const lm_tensor_set *ts, size_t *n_out, lm_err *err)
{
    cJSON *root = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(root, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    uint64_t off = 0;
    for (size_t i = 0; i < ts->n && root != NULL; i++) {
        const lm_ts_tensor *t = &ts->t[i];
        cJSON *e = cJSON_CreateObject(), *shape = cJSON_AddArrayToObject(e, "shape"),
              *offs = cJSON_AddArrayToObject(e, "data_offsets");
        cJSON_AddStringToObject(e, "dtype", lm_dtype_name(t->dtype));
        for (size_t d = 0; d < t->n_dims; d++)
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + t->n_bytes)));
        cJSON_AddItemToObject(root, t->name, e);
        off += t->n_bytes;
    }
    char *hdr = root ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (hdr == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    size_t hl = strlen(hdr), padded = (hl + 7) / 8 * 8;
    uint8_t *img = malloc(8 + padded + off + 1);
    if (img == NULL) {
        free(hdr);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory: a PyTorch checkpoint is converted in memory (%llu bytes)",
                (unsigned long long)off);
        return NULL;
    }
    for (int i = 0; i < 8; i++)
        img[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(img + 8, hdr, hl);
    memset(img + 8 + hl, ' ', padded - hl);
    free(hdr);
    uint8_t *data = img + 8 + padded;
    for (size_t i = 0; i < ts->n; i++) {
        if (ts->t[i].n_bytes)
            memcpy(data, ts->t[i].data, ts->t[i].n_bytes);
        data += ts->t[i].n_bytes;
    }
    *n_out = 8 + padded + off;
    return img;
}

/* the shard files an index names, in order of first appearance (plain names beside it) */
static lm_code index_shards(const char *index_path, char ***files, size_t *n_files, lm_err *err)
{
    FILE *f = fopen(index_path, "rb");
    if (f == NULL)
        return lm_fail_errno(err, errno, "cannot open the index");
    char *text = malloc(BIN_INDEX_MAX_BYTES + 1);
    size_t n = text ? fread(text, 1, BIN_INDEX_MAX_BYTES + 1, f) : 0;
    fclose(f);
    if (text == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if (n > BIN_INDEX_MAX_BYTES) {
        free(text);
        return lm_fail(err, LM_E_FORMAT, "IndexTooLarge", "index larger than %zu bytes", BIN_INDEX_MAX_BYTES);
    }
    cJSON *root = cJSON_ParseWithLength(text, n);
    free(text);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map"), *e;
    lm_code rc = LM_OK;
    if (!cJSON_IsObject(map))
        rc = lm_fail(err, LM_E_FORMAT, "InvalidIndex", "no weight_map object");
    *files = NULL;
    *n_files = 0;
    cJSON_ArrayForEach(e, map)
    {
        if (rc != LM_OK)
            break;
        if (!cJSON_IsString(e) || e->valuestring[0] == '\0' || strchr(e->valuestring, '/') != NULL ||
            strcmp(e->valuestring, "..") == 0) {
            rc = lm_fail(err, LM_E_FORMAT, "InvalidIndex", "weight_map entry '%s' is not a plain file name", e->string);
            break;
        }
        int seen = 0;
        for (size_t k = 0; k < *n_files && !seen; k++)
            seen = strcmp((*files)[k], e->valuestring) == 0;
        if (seen)
            continue;
        char **nf = realloc(*files, (*n_files + 1) * sizeof *nf);
        if (nf == NULL || (nf[*n_files] = strdup(e->valuestring)) == NULL) {
            if (nf != NULL)
                *files = nf;
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            break;
        }
        *files = nf;
        (*n_files)++;
    }
    if (rc == LM_OK && *n_files == 0)
        rc = lm_fail(err, LM_E_FORMAT, "InvalidIndex", "the weight_map names no file");
    cJSON_Delete(root);
    return rc;
}

lm_model *lm_torch_model_open(const char *path, lm_err *err)
{
    char *index = NULL, **files = NULL, **paths = NULL;
    size_t n_files = 0, dir_len = 0;
    void **images = NULL;
    size_t *sizes = NULL;
    lm_model *m = NULL;
    struct stat st;
    int is_dir = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
    const char *dir = path;
    if (is_dir) {
        dir_len = strlen(path);
        while (dir_len > 1 && path[dir_len - 1] == '/')
            dir_len--;
        index = join(path, dir_len, BIN_INDEX_NAME);
        if (index != NULL && !is_regular(index)) {
            free(index);
            index = NULL;
        }
    } else if (ends_with(path, ".index.json")) {
        index = strdup(path);
        const char *slash = strrchr(path, '/');
        dir = slash ? path : ".";
        dir_len = slash ? (size_t)(slash - path) : 1;
    }
    size_t n_done = 0;
    if (index != NULL) {
        if (index_shards(index, &files, &n_files, err) != LM_OK) {
            lm_err_set_path(err, index);
            goto done;
        }
    } else {
        files = malloc(sizeof *files);
        if (files == NULL || (files[0] = is_dir ? join(path, dir_len, BIN_NAME) : strdup(path)) == NULL) {
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto done;
        }
        n_files = 1;
    }
    images = calloc(n_files, sizeof *images);
    sizes = calloc(n_files, sizeof *sizes);
    paths = calloc(n_files, sizeof *paths);
    if (images == NULL || sizes == NULL || paths == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    for (; n_done < n_files; n_done++) {
        paths[n_done] = index != NULL ? join(dir, dir_len, files[n_done]) : strdup(files[n_done]);
        if (paths[n_done] == NULL) {
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto done;
        }
        lm_tensor_set *ts = NULL;
        if (lm_torch_bin_load(paths[n_done], &ts, err) != LM_OK) {
            lm_err_set_path(err, paths[n_done]);
            goto done;
        }
        images[n_done] = st_image(ts, &sizes[n_done], err);
        lm_ts_free(ts);
        if (images[n_done] == NULL) {
            lm_err_set_path(err, paths[n_done]);
            goto done;
        }
    }
    m = lm_model_from_images(images, sizes, (const char *const *)paths, n_files, index, err);
    n_done = 0; /* the model owns the images now (or freed them) */
done:
    for (size_t i = 0; images != NULL && i < n_done; i++)
        free(images[i]);
    for (size_t i = 0; i < n_files; i++) {
        free(files ? files[i] : NULL);
        free(paths ? paths[i] : NULL);
    }
    free(files);
    free(paths);
    free(images);
    free(sizes);
    free(index);
    return m;
}
