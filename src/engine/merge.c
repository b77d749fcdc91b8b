/* merge.c : lm_merge_run(): base + adapters -> plan -> executor, and the report. */
#include "lora_merge.h"

#include "adapter_load.h"
#include "exec.h"
#include "exec_lowrank.h"
#include "gemm_tile.h"
#include "lm_error.h"
#include "lm_kernels.h"
#include "plan.h"
#include "st_writer.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    lm_merge_report pub;
    char **notes;
    char *plan_text;
    char *json;
    uint64_t *recomputed; /* [plan->n], filled by the executor (exec.h); freed with the report */
} report_impl;

void lm_merge_report_free(lm_merge_report *r)
{
    if (r == NULL)
        return;
    report_impl *ri = (report_impl *)r;
    for (size_t i = 0; i < r->n_notes; i++)
        free(ri->notes[i]);
    free(ri->notes);
    free(ri->plan_text);
    free(ri->json);
    free(ri->recomputed);
    free(ri);
}

const char *lm_version_text(void)
{
    static char buf[256];
    if (buf[0] == '\0') {
        lm_kernels k;
        lm_kernels_select(&k, NULL);
        snprintf(buf, sizeof buf, "lora-merge %s (kernels %s, %s)", LM_VERSION_STRING, k.name, lm_blas_name());
    }
    return buf;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void shape_text(char *buf, size_t cap, size_t n_dims, const uint64_t *shape)
{
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (size_t d = 0; d < n_dims && used < cap; d++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%llu", d ? ", " : "", (unsigned long long)shape[d]);
    if (used < cap)
        snprintf(buf + used, cap - used, "]");
}

/* builds plan_text and json */
static lm_code build_report(report_impl *ri, const lm_merge_job *job, lm_adapter *const *ads, const lm_plan *p,
                            lm_err *err)
{
    size_t cap = 4096, used = 0;
    char *text = malloc(cap);
    cJSON *root = cJSON_CreateObject();
    ri->recomputed = malloc((p->n + 1) * sizeof *ri->recomputed);
    if (text == NULL || root == NULL || ri->recomputed == NULL)
        goto nomem;
    for (size_t i = 0; i < p->n; i++) /* a dry run does not change them */
        ri->recomputed[i] = lm_lowrank_tensor_eligible(&p->t[i]) ? 0 : UINT64_MAX;
    text[0] = '\0';
    cJSON_AddStringToObject(root, "base", job->base_path);
    cJSON_AddStringToObject(root, "out", job->out_path ? job->out_path : "");
    cJSON_AddBoolToObject(root, "dry_run", job->dry_run != 0);
    cJSON *ja = cJSON_AddArrayToObject(root, "adapters");
    for (size_t i = 0; i < job->n_adapters; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "dir", ads[i]->dir);
        cJSON_AddStringToObject(a, "name", ads[i]->name);
        cJSON_AddStringToObject(a, "peft_type", ads[i]->cfg->peft_type);
        cJSON_AddStringToObject(a, "weights", ads[i]->weights_path);
        cJSON_AddNumberToObject(a, "weight", ads[i]->weight);
        cJSON_AddNumberToObject(a, "n_tensors", (double)ads[i]->ts->n);
        cJSON_AddItemToArray(ja, a);
    }
    cJSON *jt = cJSON_AddArrayToObject(root, "changed_tensors");
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        if (t->n_ops == 0 && t->dtype == t->src_dtype)
            continue;
        char sh[128], line[1024];
        shape_text(sh, sizeof sh, t->n_dims, t->shape);
        size_t k = (size_t)snprintf(line, sizeof line, "  %s %s %s%s:", t->name, lm_dtype_name(t->dtype), sh,
                                    t->base ? "" : " (new)");
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", t->name);
        cJSON_AddStringToObject(o, "dtype", lm_dtype_name(t->dtype));
        cJSON_AddBoolToObject(o, "new", t->base == NULL);
        cJSON *ops = cJSON_AddArrayToObject(o, "ops");
        if (t->n_ops == 0 && k < sizeof line)
            k += (size_t)snprintf(line + k, sizeof line - k, " convert %s -> %s", lm_dtype_name(t->src_dtype),
                                  lm_dtype_name(t->dtype));
        for (size_t q = 0; q < t->n_ops; q++) {
            const lm_op *op = &t->ops[q];
            cJSON *jo = cJSON_CreateObject();
            cJSON_AddStringToObject(jo, "op", op->name);
            cJSON_AddStringToObject(jo, "module", op->module ? op->module : "");
            cJSON_AddNumberToObject(jo, "adapter", (double)op->adapter);
            if (op->kind == LM_OP_LOWRANK) {
                cJSON_AddNumberToObject(jo, "rank", (double)op->rank);
                cJSON_AddNumberToObject(jo, "scale", op->scale);
                cJSON_AddBoolToObject(jo, "transposed", op->axis);
                if (k < sizeof line)
                    k += (size_t)snprintf(line + k, sizeof line - k, " %s(r=%llu, scale=%g%s, #%zu)", op->name,
                                          (unsigned long long)op->rank, op->scale, op->axis ? ", transposed" : "",
                                          op->adapter);
            } else if (k < sizeof line) {
                k += (size_t)snprintf(line + k, sizeof line - k, " %s(#%zu)", op->name, op->adapter);
            }
            cJSON_AddItemToArray(ops, jo);
        }
        cJSON_AddItemToArray(jt, o);
        size_t ll = strlen(line);
        if (used + ll + 2 > cap) {
            while (used + ll + 2 > cap)
                cap *= 2;
            char *nt = realloc(text, cap);
            if (nt == NULL)
                goto nomem;
            text = nt;
        }
        memcpy(text + used, line, ll);
        used += ll;
        text[used++] = '\n';
        text[used] = '\0';
    }
    ri->plan_text = text;
    ri->json = NULL;
    /* numbers filled by the caller after the run: kept as a tree until then */
    ri->pub.json = (const char *)root;
    return LM_OK;
nomem:
    free(text);
    cJSON_Delete(root);
    return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
}

/* per changed tensor of the JSON report: "exact" (every element the exact value rounded once)
 * and, after a real run, "recomputed" (its elements recomputed in f64); the array follows
 * build_report's order */
static void add_exactness(report_impl *ri, const lm_plan *p, int exactness_off, int ran)
{
    const uint64_t *recomputed = ri->recomputed;
    cJSON *jt = cJSON_GetObjectItemCaseSensitive((cJSON *)ri->pub.json, "changed_tensors");
    cJSON *o = jt ? jt->child : NULL;
    for (size_t i = 0; i < p->n && o != NULL; i++) {
        const lm_plan_tensor *t = &p->t[i];
        if (t->n_ops == 0 && t->dtype == t->src_dtype)
            continue;
        const int exact = recomputed[i] != UINT64_MAX;
        cJSON_AddBoolToObject(o, "exact", exact && !exactness_off);
        if (exact && ran)
            cJSON_AddNumberToObject(o, "recomputed", (double)recomputed[i]);
        o = o->next;
    }
}

static lm_code finish_json(report_impl *ri, lm_err *err)
{
    cJSON *root = (cJSON *)ri->pub.json;
    lm_merge_report *r = &ri->pub;
    cJSON *s = cJSON_CreateObject();
    cJSON_AddNumberToObject(s, "n_tensors", (double)r->n_tensors);
    cJSON_AddNumberToObject(s, "n_changed", (double)r->n_changed);
    cJSON_AddNumberToObject(s, "n_lowrank", (double)r->n_lowrank);
    cJSON_AddNumberToObject(s, "n_replaced", (double)r->n_replaced);
    cJSON_AddNumberToObject(s, "n_added", (double)r->n_added);
    cJSON_AddNumberToObject(s, "out_bytes", (double)r->out_bytes);
    cJSON_AddNumberToObject(s, "lowrank_gflop", r->lowrank_gflop);
    cJSON_AddNumberToObject(s, "seconds", r->seconds);
    cJSON_AddNumberToObject(s, "threads", r->n_threads);
    cJSON_AddStringToObject(s, "kernels", r->kernels);
    cJSON_AddNumberToObject(s, "n_exact_tensors", (double)r->n_exact_tensors);
    cJSON_AddNumberToObject(s, "n_recomputed", (double)r->n_recomputed);
    cJSON_AddItemToObject(root, "summary", s);
    cJSON *jn = cJSON_AddArrayToObject(root, "notes");
    for (size_t i = 0; i < r->n_notes; i++)
        cJSON_AddItemToArray(jn, cJSON_CreateString(r->notes[i]));
    ri->json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    r->json = ri->json;
    if (ri->json == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return LM_OK;
}

static int parse_dtype_opt(const char *s, int *set, lm_dtype *dt)
{
    *set = 0;
    if (s == NULL || strcmp(s, "auto") == 0)
        return 1;
    *set = 1;
    if (strcmp(s, "bf16") == 0 || strcmp(s, "BF16") == 0)
        *dt = LM_DT_BF16;
    else if (strcmp(s, "f16") == 0 || strcmp(s, "F16") == 0 || strcmp(s, "fp16") == 0)
        *dt = LM_DT_F16;
    else if (strcmp(s, "f32") == 0 || strcmp(s, "F32") == 0 || strcmp(s, "fp32") == 0)
        *dt = LM_DT_F32;
    else
        return 0;
    return 1;
}

/* An output file must not be any input, through any alias (symlink, hard link). */
static lm_code check_not_input(const char *out, const lm_model *m, lm_adapter *const *ads, size_t n_ads, lm_err *err)
{
    struct stat st;
    if (stat(out, &st) != 0)
        return LM_OK;
    for (size_t i = 0; i < lm_model_n_files(m); i++)
        if (lm_same_file(out, lm_st_path(lm_model_file(m, i))))
            return lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as the base '%s'",
                           lm_st_path(lm_model_file(m, i)));
    if (lm_model_index_path(m) && lm_same_file(out, lm_model_index_path(m)))
        return lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as the index '%s'",
                       lm_model_index_path(m));
    for (size_t a = 0; a < n_ads; a++) {
        const char *inputs[2] = {ads[a]->weights_path, ads[a]->config_path};
        for (size_t i = 0; i < 2; i++)
            if (lm_same_file(out, inputs[i]))
                return lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as the input '%s'",
                               inputs[i]);
    }
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* the output: one file, or a model directory (shards + index + the base's other files)         */
/* ------------------------------------------------------------------------------------------ */
#define LM_DEFAULT_SHARD_BYTES 5000000000ull /* transformers' "5GB" */

typedef struct {
    int is_dir, created_dir;
    char *dir;        /* directory OUT, without a trailing slash */
    size_t n_shards;
    char **paths;     /* the files written */
    size_t *shard_of; /* plan tensor -> shard */
    uint64_t total_bytes;
} out_target;

static void out_target_free(out_target *o)
{
    for (size_t i = 0; i < o->n_shards && o->paths; i++)
        free(o->paths[i]);
    free(o->paths);
    free(o->shard_of);
    free(o->dir);
    memset(o, 0, sizeof *o);
}

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p != NULL)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* shards in data order, each at most max_bytes (a larger tensor gets a shard of its own) */
static lm_code plan_shards(out_target *o, const lm_merge_job *job, const lm_plan *p, lm_err *err)
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
            o->paths[i] = path_join(o->dir, name);
        }
        if (o->paths[i] == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    return LM_OK;
}

static lm_code write_index(const out_target *o, const lm_plan *p, lm_err *err)
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
    char *path = path_join(o->dir, "model.safetensors.index.json");
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
static long copy_model_files(const out_target *o, const char *base_dir, lm_err *err)
{
    DIR *d = opendir(base_dir);
    if (d == NULL)
        return 0;
    long n_copied = 0;
    struct dirent *de;
    while (n_copied >= 0 && (de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' || is_weight_file(de->d_name))
            continue;
        char *src = path_join(base_dir, de->d_name), *dst = path_join(o->dir, de->d_name);
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
static char *base_directory(const char *base_path)
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

/* what the adapter loader noticed (formats read, renames) goes into the report */
static void note_adapters(lm_plan *plan, lm_adapter *const *ads, size_t n)
{
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < ads[i]->n_notes; k++)
            plan_note(plan, "%s", ads[i]->notes[k]);
}

static lm_code merge_run(const lm_merge_job *job, lm_merge_report **report, lm_err *err)
{
    double t0 = now_seconds();
    lm_code rc = LM_OK;
    lm_model *model = NULL;
    lm_adapter **ads = NULL;
    lm_plan *plan = NULL;
    report_impl *ri = NULL;
    lm_kernels kern;
    out_target ot;
    memset(&ot, 0, sizeof ot);
    char *base_dir = NULL;
    if (report)
        *report = NULL;
    if (job == NULL || job->base_path == NULL || (job->out_path == NULL && !job->dry_run) || job->n_adapters == 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "a merge needs a base, at least one adapter and an output");
    if (job->out_path != NULL && job->out_path[0] == '\0')
        return lm_fail(err, LM_E_USAGE, "Usage", "the output path is empty");
    if (job->out_path != NULL) { /* a directory OUT: a model directory comes out */
        struct stat st;
        size_t n = strlen(job->out_path);
        ot.is_dir = job->out_path[n - 1] == '/' || (stat(job->out_path, &st) == 0 && S_ISDIR(st.st_mode));
        if (ot.is_dir) {
            while (n > 1 && job->out_path[n - 1] == '/')
                n--;
            ot.dir = strndup(job->out_path, n);
            if (ot.dir == NULL)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
    }
    if (job->max_shard_bytes && !ot.is_dir && !job->dry_run)
        return lm_fail(err, LM_E_USAGE, "Usage", "--max-shard-size needs a directory OUT (e.g. 'merged/')");
    lm_plan_opts popts;
    memset(&popts, 0, sizeof popts);
    if (!parse_dtype_opt(job->out_dtype, &popts.out_dtype_set, &popts.out_dtype))
        return lm_fail(err, LM_E_USAGE, "Usage", "--dtype must be auto, bf16, f16 or f32 (not '%s')", job->out_dtype);
    if (lm_kernels_select(&kern, job->kernels) != 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "kernel variant '%s' cannot run on this CPU", job->kernels);
    ri = calloc(1, sizeof *ri);
    ads = calloc(job->n_adapters, sizeof *ads);
    if (ri == NULL || ads == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    model = lm_model_open(job->base_path, err);
    if (model == NULL) {
        rc = err ? err->code : LM_E_FORMAT;
        goto done;
    }
    for (size_t i = 0; i < job->n_adapters; i++) {
        ads[i] = lm_adapter_open_with(job->adapters[i].dir, job->adapters[i].weight, model, job->formats, err);
        if (ads[i] == NULL) {
            rc = err ? err->code : LM_E_FORMAT;
            goto done;
        }
    }
    plan = lm_plan_create(model, ads, job->n_adapters, &popts, err);
    if (plan == NULL) {
        rc = err ? err->code : LM_E_FORMAT;
        goto done;
    }
    note_adapters(plan, ads, job->n_adapters);
    if (job->out_path != NULL) {
        if ((rc = plan_shards(&ot, job, plan, err)) != LM_OK)
            goto done;
        for (size_t i = 0; i < ot.n_shards; i++)
            if ((rc = check_not_input(ot.paths[i], model, ads, job->n_adapters, err)) != LM_OK) {
                lm_err_set_path(err, ot.paths[i]);
                goto done;
            }
        base_dir = base_directory(job->base_path);
        if (ot.is_dir && base_dir != NULL && lm_same_file(ot.dir, base_dir)) {
            rc = lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output directory is the base model's directory");
            lm_err_set_path(err, ot.dir);
            goto done;
        }
        if (ot.is_dir) {
            struct stat st;
            if (stat(ot.dir, &st) != 0) {
                if (mkdir(ot.dir, 0777) != 0) {
                    rc = lm_fail_errno(err, errno, "cannot create the output directory");
                    lm_err_set_path(err, ot.dir);
                    goto done;
                }
                ot.created_dir = 1;
            }
            if (ot.n_shards > 1)
                plan_note(plan, "output in %zu shards of at most %llu bytes, with model.safetensors.index.json",
                          ot.n_shards, (unsigned long long)(job->max_shard_bytes ? job->max_shard_bytes
                                                                                  : LM_DEFAULT_SHARD_BYTES));
        }
    }
    if ((rc = build_report(ri, job, ads, plan, err)) != LM_OK)
        goto done;
    lm_exec_stats st;
    memset(&st, 0, sizeof st);
    st.n_threads = job->n_threads;
    if (!job->dry_run) {
        lm_exec_opts eo;
        memset(&eo, 0, sizeof eo);
        eo.n_threads = job->n_threads;
        eo.do_fsync = job->do_fsync;
        eo.kernels = &kern;
        eo.progress = job->progress;
        eo.progress_ctx = job->progress_ctx;
        eo.tile_elems = job->tile_elems;
        eo.exactness_off = job->exactness_off;
        eo.recomputed = ri->recomputed;
        eo.n_shards = ot.n_shards;
        eo.shard_paths = (const char *const *)ot.paths;
        eo.shard_of = ot.shard_of;
        if ((rc = lm_exec_run(plan, model, ads, ot.paths[0], &eo, &st, err)) != LM_OK) {
            cJSON_Delete((cJSON *)ri->pub.json);
            ri->pub.json = NULL;
            goto done;
        }
        if (ot.is_dir) {
            char *old_index = path_join(ot.dir, "model.safetensors.index.json");
            if (ot.n_shards > 1)
                rc = write_index(&ot, plan, err);
            else if (old_index != NULL && unlink(old_index) == 0) /* it listed an earlier output */
                plan_note(plan, "removed a stale model.safetensors.index.json from the output directory");
            free(old_index);
            long n_copied = rc == LM_OK && base_dir ? copy_model_files(&ot, base_dir, err) : 0;
            if (n_copied < 0)
                rc = err ? err->code : LM_E_IO;
            if (rc != LM_OK) {
                cJSON_Delete((cJSON *)ri->pub.json);
                ri->pub.json = NULL;
                goto done;
            }
            if (n_copied > 0)
                plan_note(plan, "copied %ld non-weight file%s (config, tokenizer ...) from %s", n_copied,
                          n_copied == 1 ? "" : "s", base_dir);
            if (n_copied > 0 && popts.out_dtype_set)
                plan_note(plan, "the copied config.json keeps the base's torch_dtype although --dtype changed the weights");
        }
    }
    lm_merge_report *r = &ri->pub;
    r->n_tensors = plan->n;
    r->n_changed = plan->n_changed;
    r->n_lowrank = plan->n_lowrank;
    r->n_replaced = plan->n_replaced;
    r->n_added = plan->n_new;
    r->out_bytes = st.bytes_written;
    r->lowrank_gflop = plan->lowrank_flops * 1e-9;
    r->n_threads = st.n_threads;
    r->kernels = kern.name;
    r->n_exact_tensors = st.n_exact_tensors;
    r->n_recomputed = st.n_recomputed;
    add_exactness(ri, plan, job->exactness_off, !job->dry_run);
    r->plan_text = ri->plan_text;
    ri->notes = plan->notes;
    r->n_notes = plan->n_notes;
    r->notes = (const char *const *)plan->notes;
    plan->notes = NULL;
    plan->n_notes = 0;
    r->seconds = now_seconds() - t0;
    if ((rc = finish_json(ri, err)) != LM_OK)
        goto done;
    if (report) {
        *report = r;
        ri = NULL;
    }
done:
    if (ri != NULL) {
        if (ri->pub.json != NULL && ri->json == NULL)
            cJSON_Delete((cJSON *)ri->pub.json);
        ri->pub.json = NULL;
        lm_merge_report_free(&ri->pub);
    }
    if (rc != LM_OK && ot.created_dir)
        rmdir(ot.dir); /* only if still empty: nothing of ours is left in it */
    out_target_free(&ot);
    free(base_dir);
    lm_plan_free(plan);
    if (ads)
        for (size_t i = 0; i < job->n_adapters; i++)
            lm_adapter_free(ads[i]);
    free(ads);
    lm_model_close(model);
    return rc;
}

/* the work always records its error in a local lm_err, so the code returned is the real one even
 * when the caller passes err == NULL */
lm_code lm_merge_run(const lm_merge_job *job, lm_merge_report **report, lm_err *err)
{
    lm_err e;
    lm_err_clear(&e);
    lm_code rc = merge_run(job, report, &e);
    if (rc != LM_OK && e.code == LM_OK) /* every failure path names itself; this is a safety net */
        lm_fail(&e, rc, NULL, "merge failed");
    if (err != NULL && rc != LM_OK)
        *err = e;
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* lm_adapter_describe                                                                          */
/* ------------------------------------------------------------------------------------------ */
lm_code lm_adapter_describe(const char *dir, char **text, lm_err *err)
{
    *text = NULL;
    lm_err open_err;
    lm_err_clear(&open_err);
    lm_adapter *a = lm_adapter_open(dir, 1.0, &open_err);
    if (a == NULL && open_err.code != LM_E_UNSUPPORTED) {
        if (err)
            *err = open_err;
        return open_err.code;
    }
    size_t cap = 1 << 17, used = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        lm_adapter_free(a);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    buf[0] = '\0';
#define OUT(...)                                                                                   \
    do {                                                                                           \
        if (used < cap)                                                                            \
            used += (size_t)snprintf(buf + used, cap - used, __VA_ARGS__);                         \
    } while (0)
    if (a == NULL) { /* a well-formed adapter lora-merge refuses: say what and why */
        char line[1024];
        lm_err_format(&open_err, line, sizeof line);
        OUT("adapter: %s\nrefused: lora-merge cannot merge this adapter\n  %s\n", dir, line);
        *text = buf;
        return LM_OK;
    }
    const lm_adapter_config *c = a->cfg;
    OUT("adapter: %s (name '%s')\n", a->dir, a->name);
    OUT("config: %s\nweights: %s\n", a->config_path, a->weights_path);
    OUT("type: %s\n", c->peft_type);
    if (c->method->describe_config != NULL) {
        char mc[2048];
        c->method->describe_config(c, mc, sizeof mc);
        OUT("%s", mc);
    }
    for (size_t i = 0; i < c->rank_keys.n; i++)
        OUT("rank_pattern: %s -> %ld\n", c->rank_keys.v[i], c->rank_vals[i]);
    for (size_t i = 0; i < c->alpha_keys.n; i++)
        OUT("alpha_pattern: %s -> %g\n", c->alpha_keys.v[i], c->alpha_vals[i]);
    if (c->all_linear)
        OUT("target_modules: all-linear\n");
    else if (c->target_is_regex)
        OUT("target_modules: regex %s\n", c->target_regex);
    else if (c->target_list.n) {
        OUT("target_modules:");
        for (size_t i = 0; i < c->target_list.n; i++)
            OUT(" %s", c->target_list.v[i]);
        OUT("\n");
    }
    if (c->exclude_is_regex)
        OUT("exclude_modules: regex %s\n", c->exclude_regex);
    else if (c->exclude_list.n) {
        OUT("exclude_modules:");
        for (size_t i = 0; i < c->exclude_list.n; i++)
            OUT(" %s", c->exclude_list.v[i]);
        OUT("\n");
    }
    if (c->n_layers) {
        OUT("layers_to_transform:");
        for (size_t i = 0; i < c->n_layers; i++)
            OUT(" %ld", c->layers_to_transform[i]);
        OUT("\n");
    }
    if (c->modules_to_save.n) {
        OUT("modules_to_save:");
        for (size_t i = 0; i < c->modules_to_save.n; i++)
            OUT(" %s", c->modules_to_save.v[i]);
        OUT("\n");
    }
    OUT("bias: %s, fan_in_fan_out: %s\n", c->bias, c->fan_in_fan_out ? "true" : "false");
    size_t per_dtype[LM_DT_COUNT] = {0};
    for (size_t i = 0; i < a->ts->n; i++)
        per_dtype[a->ts->t[i].dtype]++;
    OUT("tensors: %zu;", a->ts->n);
    for (int d = 0; d < LM_DT_COUNT; d++)
        if (per_dtype[d])
            OUT(" %s x%zu", lm_dtype_name((lm_dtype)d), per_dtype[d]);
    OUT("\n");
    char *mods = NULL;
    lm_code rc = lm_plan_describe_modules(a, &mods, err);
    if (rc == LM_OK)
        OUT("%s", mods);
    free(mods);
#undef OUT
    lm_adapter_free(a);
    if (rc != LM_OK) {
        free(buf);
        return rc;
    }
    *text = buf;
    return LM_OK;
}
