/* output.c : what goes into OUT (see output.h): shard names and boundaries, the index, the
 * base directory's model files. */
#include "output.h"

#include "lm_error.h"
#include "st_writer.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

void lm_out_target_free(lm_out_target *o)
{
    for (size_t i = 0; i < o->n_shards && o->paths; i++)
        free(o->paths[i]);
    free(o->paths);
    free(o->shard_of);
    free(o->dir);
    memset(o, 0, sizeof *o);
}

char *lm_path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p != NULL)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* shards in data order, each at most max_bytes (a larger tensor gets a shard of its own) */
lm_code lm_out_plan_shards(lm_out_target *o, const lm_merge_job *job, const lm_plan *p, lm_err *err)
{
    o->shard_of = calloc(p->n + 1, sizeof *o->shard_of);
    if (o->shard_of == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    uint64_t max_bytes = job->max_shard_bytes ? job->max_shard_bytes : LM_DEFAULT_SHARD_BYTES, used = 0;
    size_t sh = 0;
    for (size_t q = 0; q < p->n; q++) {
        const lm_plan_tensor *t = &p->t[p->data_order[q]];
        uint64_t n = 1;
        for (size_t d = 0; d < t->n_dims; d++)
            n *= t->shape[d];
        uint64_t bytes = n * lm_dtype_bits(t->dtype) / 8;
        if (o->is_dir && used > 0 && used + bytes > max_bytes) {
            sh++;
            used = 0;
        }
        used += bytes;
        o->total_bytes += bytes;
        o->shard_of[p->data_order[q]] = sh;
    }
    size_t n_shards = sh + 1;
    o->paths = calloc(n_shards, sizeof *o->paths);
    if (o->paths == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    o->n_shards = n_shards;
    for (size_t i = 0; i < n_shards; i++) {
        char name[64];
        if (!o->is_dir) {
            o->paths[i] = strdup(job->out_path);
        } else {
            if (n_shards == 1)
                snprintf(name, sizeof name, "model.safetensors");
            else
                snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, n_shards);
            o->paths[i] = lm_path_join(o->dir, name);
        }
        if (o->paths[i] == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    return LM_OK;
}

lm_code lm_out_write_index(const lm_out_target *o, const lm_plan *p, lm_err *err)
{
    cJSON *root = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(root, "metadata");
    cJSON_AddNumberToObject(meta, "total_size", (double)o->total_bytes);
    cJSON *map = cJSON_AddObjectToObject(root, "weight_map");
    for (size_t i = 0; i < p->n; i++) {
        const char *slash = strrchr(o->paths[o->shard_of[i]], '/');
        cJSON_AddStringToObject(map, p->t[i].name, slash ? slash + 1 : o->paths[o->shard_of[i]]);
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (text == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    char *path = lm_path_join(o->dir, "model.safetensors.index.json");
    lm_code rc = path ? lm_write_file_atomic(path, text, strlen(text), err)
                      : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    free(path);
    free(text);
    return rc;
}

static int is_weight_file(const char *name)
{
    static const char *const ends[] = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                                       ".onnx", ".index.json"};
    size_t n = strlen(name);
    for (size_t i = 0; i < sizeof ends / sizeof *ends; i++) {
        size_t k = strlen(ends[i]);
        if (n >= k && strcmp(name + n - k, ends[i]) == 0)
            return 1;
    }
    return 0;
}

/* the base directory's other files (config.json, tokenizer files ...) into the output directory;
 * @return the number copied, or -1 with *err */
long lm_out_copy_model_files(const lm_out_target *o, const char *base_dir, lm_err *err)
{
    DIR *d = opendir(base_dir);
    if (d == NULL)
        return 0;
    long n_copied = 0;
    struct dirent *de;
    while (n_copied >= 0 && (de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' || is_weight_file(de->d_name))
            continue;
        char *src = lm_path_join(base_dir, de->d_name), *dst = lm_path_join(o->dir, de->d_name);
        struct stat st;
        if (src && dst && stat(src, &st) == 0 && S_ISREG(st.st_mode) && st.st_size < (64 << 20) &&
            !lm_same_file(src, dst)) {
            FILE *f = fopen(src, "rb");
            char *buf = malloc((size_t)st.st_size + 1);
            size_t got = (f && buf) ? fread(buf, 1, (size_t)st.st_size, f) : 0;
            if (f)
                fclose(f);
            if (buf && got == (size_t)st.st_size)
                n_copied = lm_write_file_atomic(dst, buf, got, err) == LM_OK ? n_copied + 1 : -1;
            free(buf);
        }
        free(src);
        free(dst);
    }
    closedir(d);
    return n_copied;
}

/* the directory holding the base's files (the base itself when it is a directory) */
char *lm_base_directory(const char *base_path)
{
    struct stat st;
    if (stat(base_path, &st) == 0 && S_ISDIR(st.st_mode))
        return strdup(base_path);
    const char *slash = strrchr(base_path, '/');
    if (slash == NULL)
        return strdup(".");
    size_t n = (size_t)(slash - base_path);
    char *d = malloc(n + 2);
    if (d != NULL)
        snprintf(d, n + 2, "%.*s", (int)(n ? n : 1), n ? base_path : "/");
    return d;
}
