/* SPDX-License-Identifier: MIT */
/* output.c : what goes into OUT, and where (see output.h). */
#include "output.h"

#include "lm_error.h"
#include "lm_sha256.h"
#include "lm_xxh128.h"
#include "st_writer.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
/* last: the allocations below go through the fault-injection seam */
#define LM_SYS_ALLOC
#include "lm_sys.h"

void lm_out_target_free(lm_out_target *o)
{
    for (size_t i = 0; i < o->n_shards && o->paths; i++)
        free(o->paths[i]);
    free(o->paths);
    free(o->shard_of);
    free(o->shard_bytes);
    free(o->dir);
    free(o->index_text);
    for (size_t i = 0; i < o->n_stale; i++)
        free(o->stale[i]);
    free(o->stale);
    lm_out_stage_abort(o);
    for (size_t i = 0; i < o->n_shards && o->write_paths; i++)
        free(o->write_paths[i]);
    free(o->write_paths);
    memset(o, 0, sizeof *o);
}

const char *lm_path_leaf(const char *path, size_t *n_bytes)
{
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/')
        n--;
    size_t b = n;
    while (b > 0 && path[b - 1] != '/')
        b--;
    *n_bytes = n - b;
    return path + b;
}

char *lm_path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p != NULL)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static const char *name_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int ends_with_ci(const char *s, size_t n, const char *suffix)
{
    size_t k = strlen(suffix);
    return n >= k && strncasecmp(s + n - k, suffix, k) == 0;
}

lm_code lm_out_resolve(lm_out_target *o, const char *out_path, lm_err *err)
{
    memset(o, 0, sizeof *o);
    size_t n = strlen(out_path);
    if (n == 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "the output path is empty");
    struct stat st;
    int exists = stat(out_path, &st) == 0;
    if (exists && !S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode)) {
        /* a device, a FIFO, a socket: the rename would replace it (`lora-merge B A /dev/null`
         * run as root would put a model in place of /dev/null) */
        const char *what = S_ISCHR(st.st_mode) ? "a character device" : S_ISBLK(st.st_mode) ? "a block device"
                         : S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISSOCK(st.st_mode) ? "a socket" : "not a regular file";
        lm_fail(err, LM_E_USAGE, "InvalidOutput",
                "OUT exists and is %s: lora-merge writes a .safetensors file or a model directory, and would replace "
                "it", what);
        lm_err_set_path(err, out_path);
        return LM_E_USAGE;
    }
    if (!exists && errno != ENOENT) { /* a symlink loop, a component that is a file ... */
        lm_fail(err, LM_E_USAGE, "InvalidOutput", "OUT cannot be used: %s", strerror(errno));
        lm_err_set_path(err, out_path);
        return LM_E_USAGE;
    }
    if (out_path[n - 1] == '/' || (exists && S_ISDIR(st.st_mode))) {
        o->is_dir = 1;
    } else if (!exists || S_ISREG(st.st_mode)) {
        static const char *const foreign[] = {".gguf", ".ggml", ".bin", ".pt", ".pth", ".ckpt", ".h5",
                                              ".msgpack", ".onnx", ".pkl", ".npz"};
        for (size_t i = 0; i < sizeof foreign / sizeof *foreign; i++)
            if (ends_with_ci(out_path, n, foreign[i])) {
                lm_fail(err, LM_E_USAGE, "InvalidOutput",
                        "lora-merge writes safetensors, not %s: name OUT *.safetensors, or a directory (a model "
                        "directory comes out)", foreign[i]);
                lm_err_set_path(err, out_path);
                return LM_E_USAGE;
            }
        /* a new name without .safetensors: a model directory */
        o->is_dir = !exists && !ends_with_ci(out_path, n, ".safetensors");
    }
    if (o->is_dir) {
        while (n > 1 && out_path[n - 1] == '/')
            n--;
        o->dir = strndup(out_path, n);
        if (o->dir == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        o->dir_exists = exists;
    }
    return LM_OK;
}

/* the real path of a directory that may not exist yet (its parent does) */
static char *real_dir(const char *dir)
{
    char *r = realpath(dir, NULL);
    if (r != NULL || errno != ENOENT)
        return r;
    char *parent = lm_base_directory(dir);
    size_t n_leaf;
    const char *leaf = lm_path_leaf(dir, &n_leaf);
    char *rp = parent ? realpath(parent, NULL) : NULL, *out = NULL;
    if (rp != NULL && (out = malloc(strlen(rp) + n_leaf + 2)) != NULL)
        snprintf(out, strlen(rp) + n_leaf + 2, "%s/%.*s", strcmp(rp, "/") == 0 ? "" : rp, (int)n_leaf, leaf);
    free(parent);
    free(rp);
    return out;
}

lm_code lm_out_check_not_in(const lm_out_target *o, const char *const *dirs, size_t n_dirs, lm_err *err)
{
    if (!o->is_dir)
        return LM_OK;
    char *out = real_dir(o->dir);
    lm_code rc = LM_OK;
    for (size_t i = 0; out != NULL && i < n_dirs && rc == LM_OK; i++) {
        char *in = dirs[i] ? realpath(dirs[i], NULL) : NULL;
        size_t k = in ? strlen(in) : 0;
        if (in != NULL && strncmp(out, in, k) == 0 && (out[k] == '\0' || out[k] == '/' || k == 1)) {
            rc = lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output directory %s the input directory '%s'",
                         out[k] == '\0' ? "is" : "is inside", dirs[i]);
            lm_err_set_path(err, o->dir);
        }
        free(in);
    }
    free(out);
    return rc;
}

/* the index: every tensor -> its shard's file name, and the data size of all shards */
static char *index_text(const lm_out_target *o, const lm_plan *p)
{
    cJSON *root = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(root, "metadata");
    cJSON_AddNumberToObject(meta, "total_size", (double)o->total_bytes);
    cJSON *map = cJSON_AddObjectToObject(root, "weight_map");
    for (size_t i = 0; i < p->n && map; i++) {
        const char *slash = strrchr(o->paths[o->shard_of[i]], '/');
        cJSON_AddStringToObject(map, p->t[i].name, slash ? slash + 1 : o->paths[o->shard_of[i]]);
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    return text;
}

/* the exact size of every shard file, as the executor's writers will lay them out */
static lm_code shard_sizes(lm_out_target *o, const lm_plan *p, lm_err *err)
{
    lm_out_tensor *outs = calloc(p->n + 1, sizeof *outs);
    size_t *local = calloc(p->n + 1, sizeof *local), *order = calloc(p->n + 1, sizeof *order);
    o->shard_bytes = calloc(o->n_shards, sizeof *o->shard_bytes);
    lm_code rc = LM_OK;
    if (outs == NULL || local == NULL || order == NULL || o->shard_bytes == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    for (size_t sh = 0; sh < o->n_shards && rc == LM_OK; sh++) {
        size_t n_in = 0, n_ord = 0;
        for (size_t i = 0; i < p->n; i++)
            if (o->shard_of[i] == sh) {
                local[i] = n_in;
                outs[n_in++] = (lm_out_tensor){p->t[i].name, p->t[i].dtype, p->t[i].n_dims, p->t[i].shape};
            }
        for (size_t q = 0; q < p->n; q++)
            if (o->shard_of[p->data_order[q]] == sh)
                order[n_ord++] = local[p->data_order[q]];
        rc = lm_st_layout_bytes(outs, n_in, order, p->meta_keys, p->meta_values, p->n_meta, &o->shard_bytes[sh], err);
    }
done:
    free(outs);
    free(local);
    free(order);
    return rc;
}

lm_code lm_out_plan_shards(lm_out_target *o, const lm_merge_job *job, const lm_plan *p, lm_err *err)
{
    o->shard_of = calloc(p->n + 1, sizeof *o->shard_of);
    if (o->shard_of == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    uint64_t max_bytes = job->max_shard_bytes ? job->max_shard_bytes : LM_DEFAULT_SHARD_BYTES, used = 0;
    size_t sh = 0;
    for (size_t q = 0; q < p->n; q++) {
        const lm_plan_tensor *t = &p->t[p->data_order[q]];
        const uint64_t bytes = lm_plan_tensor_bytes(t);
        if (o->is_dir && used > 0 && used + bytes > max_bytes) {
            sh++;
            used = 0;
        }
        used += bytes;
        o->shard_of[p->data_order[q]] = sh;
    }
    return lm_out_layout_named(o, job, p, sh + 1, NULL, err);
}

/* a weight kept quantized has its scale tensors written with its tiles (the requantized blocks'
 * new scales): they go to the weight's shard, whichever shard the split or the base put them in,
 * so that a shard is written whole by whoever writes it (a shard worker writes one shard at a
 * time, with no writer open for another) */
static void scales_with_weights(lm_out_target *o, const lm_plan *p)
{
    for (size_t i = 0; i < p->n; i++) {
        const lm_qtensor *q = p->t[i].q;
        if (q == NULL)
            continue;
        const size_t sc[2] = {q->scale ? q->scale_index : SIZE_MAX, q->scale2 ? q->scale2_index : SIZE_MAX};
        const lm_model_entry *se[2] = {q->scale, q->scale2};
        for (int k = 0; k < 2; k++) /* (indices valid while nothing is dropped: kept quantized) */
            if (sc[k] < p->n && strcmp(p->t[sc[k]].name, se[k]->info->name) == 0)
                o->shard_of[sc[k]] = o->shard_of[i];
    }
}

/* the shards left without a tensor (they held only scales, now with their weights) dropped, the
 * others renumbered in order, their names kept in names[] (when given): no empty file, and the
 * index names every shard.  @return the shards left (at least one) */
static size_t drop_empty_shards(lm_out_target *o, const lm_plan *p, size_t n_shards, const char **names)
{
    size_t *to = calloc(n_shards + 1, sizeof *to), n = 0;
    if (to == NULL)
        return 0;
    for (size_t i = 0; i < p->n; i++)
        to[o->shard_of[i]] = 1;
    for (size_t k = 0; k < n_shards; k++)
        if (to[k] || (k + 1 == n_shards && n == 0)) {
            if (names != NULL)
                names[n] = names[k];
            to[k] = n++;
        }
    for (size_t i = 0; i < p->n; i++)
        o->shard_of[i] = to[o->shard_of[i]];
    free(to);
    o->n_dropped = n_shards - n;
    return n;
}

lm_code lm_out_layout_named(lm_out_target *o, const lm_merge_job *job, const lm_plan *p, size_t n_shards,
                            const char **names, lm_err *err)
{
    scales_with_weights(o, p);
    if ((n_shards = drop_empty_shards(o, p, n_shards, names)) == 0)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    names = n_shards > 1 ? names : NULL; /* one shard left: model.safetensors, no index */
    o->paths = calloc(n_shards, sizeof *o->paths);
    if (o->paths == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    o->n_shards = n_shards;
    o->total_bytes = lm_plan_out_bytes(p);
    for (size_t i = 0; i < n_shards; i++) {
        char name[64];
        if (!o->is_dir) {
            o->paths[i] = strdup(job->out_path);
        } else if (names != NULL) {
            o->paths[i] = lm_path_join(o->dir, names[i]);
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
    if (n_shards > 1 && (o->index_text = index_text(o, p)) == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return shard_sizes(o, p, err);
}

/* model.safetensors, model-00001-of-00004.safetensors, model.safetensors.index.json: the names
 * transformers (and lora-merge) give a model's weights */
static int is_hf_weight_name(const char *name)
{
    if (strcmp(name, "model.safetensors") == 0 || strcmp(name, LM_INDEX_NAME) == 0)
        return 1;
    unsigned a, b;
    int end = 0;
    /* model-NNNNN-of-NNNNN.safetensors: 32 characters */
    return strlen(name) == 32 && sscanf(name, "model-%5u-of-%5u.safetensors%n", &a, &b, &end) == 2 && end == 32;
}

static int is_new_name(const lm_out_target *o, const lm_side_plan *side, const char *name)
{
    for (size_t i = 0; i < o->n_shards; i++) {
        const char *slash = strrchr(o->paths[i], '/');
        if (strcmp(slash ? slash + 1 : o->paths[i], name) == 0)
            return 1;
    }
    if (o->n_shards > 1 && strcmp(name, LM_INDEX_NAME) == 0)
        return 1;
    return side != NULL && lm_side_find(side, name) != NULL;
}

lm_code lm_out_scan_existing(lm_out_target *o, const lm_side_plan *side, lm_err *err)
{
    if (!o->is_dir)
        return LM_OK;
    DIR *d = opendir(o->dir);
    if (d == NULL)
        return errno == ENOENT ? LM_OK : LM_OK; /* not there yet, or unreadable: the writes will say */
    lm_code rc = LM_OK;
    struct dirent *de;
    size_t cap = 0;
    char foreign[300];
    foreign[0] = '\0';
    while (rc == LM_OK && (de = readdir(d)) != NULL) {
        const char *name = de->d_name, *kind;
        int group;
        if (name[0] == '.' || is_new_name(o, side, name))
            continue;
        int stale = is_hf_weight_name(name) || lm_side_is_allowed(name, &kind, &group);
        if (!stale) {
            if (lm_is_weight_name(name) && foreign[0] == '\0')
                snprintf(foreign, sizeof foreign, "%s", name);
            continue;
        }
        if (o->n_stale == cap) {
            size_t nc = cap ? 2 * cap : 8;
            char **ns = realloc(o->stale, nc * sizeof *ns);
            if (ns == NULL) {
                rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
                break;
            }
            o->stale = ns;
            cap = nc;
        }
        if ((o->stale[o->n_stale] = strdup(name)) == NULL)
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        else
            o->n_stale++;
    }
    closedir(d);
    if (rc == LM_OK && foreign[0] != '\0') {
        rc = lm_fail(err, LM_E_USAGE, "OutputNotEmpty",
                     "the output directory holds '%s', weights lora-merge did not write: a loader could take them "
                     "for the merged model's (remove them or choose another directory)", foreign);
        lm_err_set_path(err, o->dir);
    }
    return rc;
}

lm_code lm_out_make_dir(lm_out_target *o, lm_err *err)
{
    struct stat st;
    if (!o->is_dir || stat(o->dir, &st) == 0)
        return LM_OK;
    if (mkdir(o->dir, 0777) != 0) {
        lm_fail_errno(err, errno, "cannot create the output directory");
        lm_err_set_path(err, o->dir);
        return LM_E_IO;
    }
    o->created_dir = 1;
    return LM_OK;
}

lm_code lm_out_put_index_and_side_files(lm_out_target *o, const lm_side_plan *side, lm_err *err)
{
    lm_code rc = LM_OK;
    for (size_t i = 0; i < side->n && rc == LM_OK; i++) {
        const lm_side_file *f = &side->f[i];
        char *path = lm_path_join(o->dir, f->name);
        rc = path ? lm_write_file_atomic_mode(path, f->data, f->n_bytes, f->mode, err)
                  : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        free(path);
    }
    if (o->index_text != NULL && rc == LM_OK) { /* the commit record, last */
        char *path = lm_path_join(o->dir, LM_INDEX_NAME);
        rc = path ? lm_write_file_atomic(path, o->index_text, strlen(o->index_text), err)
                  : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        free(path);
    }
    return rc;
}

void lm_out_remove_stale(lm_out_target *o, lm_report_impl *r)
{
    for (size_t i = 0; i < o->n_stale; i++) {
        char *path = lm_path_join(o->dir, o->stale[i]);
        if (path != NULL && unlink(path) == 0)
            lm_report_removed(r, o->stale[i]);
        else if (path != NULL && errno != ENOENT)
            lm_report_warn(r, "StaleFileKept", "%s is left from an earlier merge and could not be removed: %s", path,
                           strerror(errno));
        free(path);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* the commit protocol of a directory OUT (see output.h)                                       */
/* ------------------------------------------------------------------------------------------ */
static lm_code fail_path(lm_err *err, int e, const char *path, const char *what)
{
    lm_fail_errno(err, e, "%s", what);
    lm_err_set_path(err, path);
    return LM_E_IO;
}

lm_code lm_out_stage_paths(lm_out_target *o, lm_err *err)
{
    if (!o->is_dir || o->write_paths != NULL)
        return LM_OK;
    if ((o->write_paths = calloc(o->n_shards + 1, sizeof *o->write_paths)) == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return LM_OK;
}

lm_code lm_out_stage_begin(lm_out_target *o, lm_err *err)
{
    if (!o->is_dir || o->stage != NULL)
        return LM_OK;
    char name[64];
    snprintf(name, sizeof name, LM_STAGE_PREFIX "%ld.XXXXXX", (long)getpid());
    o->stage_fd = -1;
    if (lm_out_stage_paths(o, err) != LM_OK)
        return err->code;
    if ((o->stage = lm_path_join(o->dir, name)) == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* created and registered with no signal in between */
    int made = lm_sys_mkdtemp(o->stage) != NULL, e = errno;
    if (made)
        o->stage_slot = lm_cleanup_register_dir(o->stage);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!made) {
        lm_code rc = fail_path(err, e, o->dir, "cannot create the staging directory in the output directory");
        free(o->stage);
        o->stage = NULL;
        return rc;
    }
    o->stage_fd = lm_sys_open(o->stage, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (o->stage_fd < 0 || lm_sys_flock(o->stage_fd, LOCK_EX) != 0) {
        lm_code rc = fail_path(err, errno, o->stage, "cannot lock the staging directory");
        lm_out_stage_abort(o);
        return rc;
    }
    for (size_t i = 0; i < o->n_shards; i++)
        if ((o->write_paths[i] = lm_path_join(o->stage, name_of(o->paths[i]))) == NULL) {
            lm_out_stage_abort(o);
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
    return LM_OK;
}

/* removes every entry of the directory dfd (a stage: only files of ours) */
static void empty_dir(int dfd)
{
    int fd = dup(dfd);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (d == NULL) {
        if (fd >= 0)
            close(fd);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
            unlinkat(dfd, de->d_name, 0);
    closedir(d);
}

void lm_out_stage_abort(lm_out_target *o)
{
    if (o->stage == NULL)
        return;
    if (o->stage_fd >= 0) {
        empty_dir(o->stage_fd);
        rmdir(o->stage);
        close(o->stage_fd);
    } else {
        rmdir(o->stage);
    }
    lm_cleanup_unregister(o->stage_slot);
    o->stage_slot = NULL;
    o->stage_fd = -1;
    free(o->stage);
    o->stage = NULL;
}

void lm_out_remove_moved_in(const lm_out_target *o, const lm_side_plan *side)
{
    if (!o->is_dir || !o->created_dir)
        return;
    for (size_t i = 0; i <= o->n_shards + side->n; i++) {
        const char *name = i < o->n_shards ? name_of(o->paths[i]) : i < o->n_shards + side->n
                         ? side->f[i - o->n_shards].name : LM_INDEX_NAME;
        char *p = lm_path_join(o->dir, name);
        if (p != NULL)
            unlink(p);
        free(p);
    }
}

int lm_out_fsync_dir(const char *dir)
{
    int fd = lm_sys_open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int rc = lm_sys_fsync(fd);
    /* some file systems refuse fsync on a directory: not an error of ours */
    if (rc != 0 && (errno == EINVAL || errno == EROFS || errno == EBADF))
        rc = 0;
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

static int is_stale(const lm_out_target *o, const char *name)
{
    for (size_t i = 0; i < o->n_stale; i++)
        if (strcmp(o->stale[i], name) == 0)
            return 1;
    return 0;
}

/* the index and side files, into the stage */
static lm_code stage_small_files(lm_out_target *o, const lm_side_plan *side, int do_fsync, lm_err *err)
{
    lm_code rc = LM_OK;
    if (o->index_text != NULL) {
        char *path = lm_path_join(o->stage, LM_INDEX_NAME);
        rc = path ? lm_write_file_atomic_sync(path, o->index_text, strlen(o->index_text), 0666, do_fsync, err)
                  : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        if (rc != LM_OK)
            lm_err_set_path(err, path ? path : o->dir);
        free(path);
    }
    for (size_t i = 0; i < side->n && rc == LM_OK; i++) {
        const lm_side_file *f = &side->f[i];
        char *path = lm_path_join(o->stage, f->name);
        rc = path ? lm_write_file_atomic_sync(path, f->data, f->n_bytes, f->mode, do_fsync, err)
                  : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        free(path);
    }
    if (rc == LM_OK && do_fsync && lm_out_fsync_dir(o->stage) != 0)
        rc = fail_path(err, errno, o->stage, "cannot flush the staging directory");
    return rc;
}

/* one staged file into OUT */
static lm_code move_in(lm_out_target *o, const char *name, lm_err *err)
{
    char *dst = lm_path_join(o->dir, name);
    if (dst == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    char *src = lm_path_join(o->stage, name);
    lm_code rc = LM_OK;
    if (src == NULL)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    else if (lm_sys_rename(src, dst) != 0)
        rc = fail_path(err, errno, dst, "cannot move the file into the output directory");
    free(src);
    free(dst);
    return rc;
}

lm_code lm_out_commit(lm_out_target *o, const lm_side_plan *side, int do_fsync, lm_report_impl *r, lm_err *err)
{
    if (o->stage == NULL)
        return LM_OK;
    lm_code rc = stage_small_files(o, side, do_fsync, err);
    if (rc != LM_OK)
        return rc;
    const char *record = o->n_shards > 1 ? LM_INDEX_NAME : "model.safetensors";
    /* (a) OUT holds no model from here on */
    static const char *const records[] = {LM_INDEX_NAME, "model.safetensors"};
    for (size_t i = 0; i < 2; i++) {
        char *p = lm_path_join(o->dir, records[i]);
        if (p == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        int gone = lm_sys_unlink(p) == 0, e = errno;
        if (!gone && e != ENOENT)
            rc = fail_path(err, e, p, "cannot remove the earlier model's file");
        free(p);
        if (rc != LM_OK)
            return rc;
        if (gone && is_stale(o, records[i]))
            lm_report_removed(r, records[i]);
    }
    if (do_fsync && lm_out_fsync_dir(o->dir) != 0)
        return fail_path(err, errno, o->dir, "cannot flush the output directory");
    /* (b) everything but the record */
    for (size_t i = 0; i < o->n_shards && rc == LM_OK; i++)
        if (strcmp(name_of(o->paths[i]), record) != 0)
            rc = move_in(o, name_of(o->paths[i]), err);
    for (size_t i = 0; i < side->n && rc == LM_OK; i++)
        rc = move_in(o, side->f[i].name, err);
    if (rc != LM_OK)
        return rc;
    /* (c) the earlier merge's files the new model does not replace */
    lm_out_remove_stale(o, r);
    /* (d) the record, last */
    if ((rc = move_in(o, record, err)) != LM_OK)
        return rc;
    if (do_fsync && lm_out_fsync_dir(o->dir) != 0)
        return fail_path(err, errno, o->dir, "cannot flush the output directory");
    lm_out_stage_abort(o); /* (e) empty by now */
    return LM_OK;
}

/* ".<name>.lm-tmp-XXXXXX": a temporary file of st_writer.c */
static int is_temp_name(const char *name)
{
    size_t n = strlen(name), k = strlen(".lm-tmp-");
    return name[0] == '.' && n > k + 6 + 1 && strncmp(name + n - 6 - k, ".lm-tmp-", k) == 0;
}

/* open a stale candidate and take its lock without waiting: a file whose lock is free belongs to
 * a dead process (every writer locks its temporary file from its creation to its rename) */
static int lock_if_dead(int dfd, const char *name, int dir)
{
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | (dir ? O_DIRECTORY : 0));
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) != 0 || (dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) ||
        flock(fd, LOCK_EX | LOCK_NB) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

void lm_out_clean_stale_temps(const lm_out_target *o, lm_report_impl *r)
{
    char *dir = o->is_dir ? strdup(o->dir) : lm_base_directory(o->paths ? o->paths[0] : "");
    size_t n_leaf = 0;
    const char *leaf = o->is_dir || o->paths == NULL ? "" : lm_path_leaf(o->paths[0], &n_leaf);
    int dfd = dir ? open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    DIR *d = dfd >= 0 ? fdopendir(dup(dfd)) : NULL;
    struct dirent *de;
    while (d != NULL && (de = readdir(d)) != NULL) {
        const char *name = de->d_name;
        int stage = o->is_dir && strncmp(name, LM_STAGE_PREFIX, strlen(LM_STAGE_PREFIX)) == 0;
        /* beside a file OUT, only the temporary files of that name */
        int temp = is_temp_name(name) && (o->is_dir || (n_leaf > 0 && strncmp(name + 1, leaf, n_leaf < 200 ? n_leaf : 200) == 0));
        if (!stage && !temp)
            continue;
        int fd = lock_if_dead(dfd, name, stage);
        if (fd < 0)
            continue;
        if (stage)
            empty_dir(fd);
        if (unlinkat(dfd, name, stage ? AT_REMOVEDIR : 0) == 0 && r != NULL)
            lm_report_note(r, "removed %s, left by an interrupted run", name);
        close(fd);
    }
    if (d != NULL)
        closedir(d);
    if (dfd >= 0)
        close(dfd);
    free(dir);
}

void lm_out_clean_dead_temps_in(const char *dir, lm_report_impl *r)
{
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = dfd >= 0 ? fdopendir(dup(dfd)) : NULL;
    struct dirent *de;
    while (d != NULL && (de = readdir(d)) != NULL) {
        if (!is_temp_name(de->d_name))
            continue;
        int fd = lock_if_dead(dfd, de->d_name, 0);
        if (fd < 0)
            continue;
        if (unlinkat(dfd, de->d_name, 0) == 0 && r != NULL)
            lm_report_note(r, "removed %s, left by an interrupted run", de->d_name);
        close(fd);
    }
    if (d != NULL)
        closedir(d);
    if (dfd >= 0)
        close(dfd);
}

lm_code lm_file_sha256(const char *path, char hex[65], lm_err *err)
{
    int fd = lm_sys_open(path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) {
        lm_fail_errno(err, errno, "cannot read the file back to hash it");
        lm_err_set_path(err, path);
        return LM_E_IO;
    }
    lm_code rc = lm_fd_sha256(fd, path, hex, err);
    close(fd);
    return rc;
}

lm_code lm_fd_sha256(int fd, const char *path, char hex[65], lm_err *err)
{
    return lm_fd_hashes(fd, path, hex, NULL, err);
}

lm_code lm_fd_hashes(int fd, const char *path, char *plain, char *xxh, lm_err *err)
{
    lm_code rc = LM_OK;
    off_t pos = 0;
    size_t cap = (size_t)4 << 20;
    unsigned char *buf = malloc(cap);
    lm_xxh128 *x = xxh != NULL ? lm_xxh128_new() : NULL;
    if (buf == NULL || (xxh != NULL && x == NULL)) {
        free(buf);
        lm_xxh128_free(x);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    lm_sha256_ctx s;
    lm_sha256_init(&s);
    for (;;) {
        ssize_t k = pread(fd, buf, cap, pos);
        if (k < 0 && errno == EINTR)
            continue;
        if (k > 0)
            pos += k;
        if (k < 0) {
            lm_fail_errno(err, errno, "cannot read the file back to hash it");
            lm_err_set_path(err, path);
            rc = LM_E_IO;
            break;
        }
        if (k == 0)
            break;
        if (plain != NULL)
            lm_sha256_update(&s, buf, (size_t)k);
        if (x != NULL)
            lm_xxh128_update(x, buf, (size_t)k);
    }
    free(buf);
    uint8_t md[32];
    if (rc == LM_OK && plain != NULL) {
        lm_sha256_final(&s, md);
        lm_sha256_hex(md, plain);
    }
    if (rc == LM_OK && x != NULL)
        lm_xxh128_hex(x, xxh);
    lm_xxh128_free(x);
    return rc;
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
