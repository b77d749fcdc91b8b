/* SPDX-License-Identifier: MIT */
/* shards.c : shard jobs: workers that each write some output shards, and finalize (shards.h). */
#include "shards.h"

#include "lm_error.h"
#include "lm_sha256.h"
#include "lm_sys.h"
#include "st_reader.h"
#include "st_writer.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_num_procs(void) { return 1; }
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PLAN_NAME "plan.json"

static const char *leaf_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n > k && strcmp(s + n - k, suffix) == 0;
}

/* the input files' names when output shard k can mirror input shard k, else NULL (then the size
 * split): a sharded safetensors base, no --max-shard-size, distinct names */
static const char **mirror_names(const lm_merge_job *job, const lm_model *m)
{
    size_t n = lm_model_n_files(m);
    if (n < 2 || job->max_shard_bytes != 0 || lm_st_fd(lm_model_file(m, 0)) < 0)
        return NULL;
    const char **names = calloc(n, sizeof *names);
    for (size_t k = 0; names != NULL && k < n; k++) {
        names[k] = leaf_of(lm_st_path(lm_model_file(m, k)));
        int bad = !ends_with(names[k], ".safetensors") || names[k][0] == '.';
        for (size_t j = 0; j < k && !bad; j++)
            bad = strcmp(names[j], names[k]) == 0;
        if (bad) {
            free(names);
            return NULL;
        }
    }
    return names;
}

lm_code lm_shards_layout(lm_out_target *o, const lm_merge_job *job, const lm_plan *p, const lm_model *m,
                         lm_err *err)
{
    const char **names = mirror_names(job, m);
    if (names == NULL)
        return lm_out_plan_shards(o, job, p, err);
    size_t n = lm_model_n_files(m);
    o->shard_of = calloc(p->n + 1, sizeof *o->shard_of);
    if (o->shard_of == NULL) {
        free(names);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    for (size_t i = 0; i < p->n; i++) /* a tensor the adapter adds goes to the last shard */
        o->shard_of[i] = p->t[i].base ? p->t[i].base->file : n - 1;
    lm_code rc = lm_out_layout_named(o, job, p, n, names, err);
    o->mirrored = o->n_shards > 1;
    free(names);
    return rc;
}

/* ---- the plan's fingerprint ------------------------------------------------------------------ */
static void md_str(lm_sha256_ctx *md, const char *s)
{
    lm_sha256_update(md, s ? s : "(null)", strlen(s ? s : "(null)") + 1);
}

static void md_u64(lm_sha256_ctx *md, uint64_t v)
{
    char b[32];
    snprintf(b, sizeof b, "%llu", (unsigned long long)v);
    md_str(md, b);
}

static void md_f64(lm_sha256_ctx *md, double v)
{
    char b[40];
    snprintf(b, sizeof b, "%.17g", v);
    md_str(md, b);
}

/* every tensor (name, dtype, shape, shard) and what is done to it (op kinds, adapters, ranks,
 * scales); the op parameters themselves come from the adapters' files, hashed whole */
static void md_plan(lm_sha256_ctx *md, const lm_plan *p, const size_t *shard_of)
{
    md_u64(md, p->n);
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        md_str(md, t->name);
        md_u64(md, (uint64_t)t->dtype);
        md_u64(md, (uint64_t)t->src_dtype);
        for (size_t d = 0; d < t->n_dims; d++)
            md_u64(md, t->shape[d]);
        md_u64(md, shard_of[i]);
        md_u64(md, (uint64_t)t->sim_nf4); /* --simulate-nf4: other base values */
        md_u64(md, t->n_ops);
        for (size_t q = 0; q < t->n_ops; q++) {
            md_u64(md, (uint64_t)t->ops[q].kind);
            md_u64(md, t->ops[q].adapter);
            md_f64(md, t->ops[q].scale);
        }
    }
    for (size_t q = 0; q < p->n; q++)
        md_u64(md, p->data_order[q]);
    for (size_t k = 0; k < p->n_meta; k++) {
        md_str(md, p->meta_keys[k]);
        md_str(md, p->meta_values[k]);
    }
}

/* a sample of the base's values: two workers given bases with the same headers but other values
 * (another revision of the checkpoint, the instruct model for the base: the names, shapes and
 * index are the same) have other fingerprints.  32 bytes at the start and at the middle of every
 * base tensor of the plan: two small reads a tensor, whichever input shard holds it (every worker
 * has read every shard's header already) */
static lm_code md_base_sample(lm_sha256_ctx *md, const lm_plan *p, const lm_model *m, lm_err *err)
{
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        if (t->base == NULL)
            continue;
        const lm_st_file *f = lm_model_file(m, t->base->file);
        const lm_tensor_info *ti = t->base->info;
        uint64_t n = ti->end - ti->begin, at[2] = {0, n / 2};
        for (int s = 0; s < 2; s++) {
            uint8_t buf[32];
            uint64_t len = n - at[s] < sizeof buf ? n - at[s] : sizeof buf;
            if (lm_st_fd(f) < 0)
                memcpy(buf, lm_st_data(f) + ti->begin + at[s], (size_t)len);
            else if (lm_base_pread(f, lm_st_data_offset(f) + ti->begin + at[s], buf, len, t->name, err) != LM_OK)
                return err->code;
            lm_sha256_update(md, buf, (size_t)len);
        }
    }
    return LM_OK;
}

lm_code lm_shards_fingerprint(const lm_shard_ctx *C, char fp[65], lm_err *err)
{
    lm_sha256_ctx ctx, *md = &ctx;
    lm_sha256_init(md);
    /* 3: the sidecars hold XXH3-128 (2: sha256x4): an older worker's sidecar is of another plan,
     * so its shard is rewritten by a worker and refused by finalize, never trusted */
    md_str(md, "lora-merge shard plan 3");
    md_str(md, LM_VERSION_STRING);
    md_u64(md, (uint64_t)C->job->exactness_off); /* uncertified products: other bytes */
    /* exact elements are one rounding of the exact value whatever the tiles; uncertified products
     * (BLAS-based types) may round a last bit otherwise with other tiles */
    md_u64(md, C->job->exactness_off ? C->job->tile_elems : 0);
    md_u64(md, C->ot->n_shards);
    for (size_t k = 0; k < C->ot->n_shards; k++) {
        md_str(md, leaf_of(C->ot->paths[k]));
        md_u64(md, C->ot->shard_bytes[k]);
    }
    md_plan(md, C->plan, C->ot->shard_of);
    lm_code rc = md_base_sample(md, C->plan, C->model, err);
    for (size_t a = 0; a < C->job->n_adapters && rc == LM_OK; a++) {
        const lm_adapter *ad = C->ads[a];
        const char *files[2] = {ad->weights_path, ad->config_path};
        md_f64(md, ad->weight);
        for (int f = 0; f < 2 && rc == LM_OK; f++) {
            char hex[65] = "";
            if (f == 0 && C->ad_sha256 != NULL && files[0] != NULL) /* the provenance's: not read twice */
                memcpy(hex, C->ad_sha256[a], sizeof hex);
            else if (files[f] != NULL)
                rc = lm_file_sha256(files[f], hex, err);
            md_str(md, hex);
        }
    }
    uint8_t d[32];
    lm_sha256_final(md, d);
    lm_sha256_hex(d, fp);
    return rc;
}

/* ---- files in OUT/.lora-merge-shards ---------------------------------------------------------- */
static char *sidecar_path(const lm_out_target *o, const char *leaf)
{
    size_t n = strlen(o->dir) + strlen(LM_SHARDS_DIR) + strlen(leaf) + 8;
    char *p = malloc(n);
    if (p != NULL)
        snprintf(p, n, "%s/%s/%s%s", o->dir, LM_SHARDS_DIR, leaf, strcmp(leaf, PLAN_NAME) == 0 ? "" : ".json");
    return p;
}

/* An exclusive flock on the lock file `path` (created; released by the kernel when the process
 * dies, however it dies; a file, not the directory: NFS emulates flock with byte-range locks,
 * which need a descriptor open for writing).  wait: block until it is free.  @return the locked
 * descriptor, -1 when another live process holds it (busy), -2 on an I/O error (err filled). */
static int lock_file(const char *path, int wait, lm_err *err)
{
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) {
        lm_fail_errno(err, errno, "cannot create the lock file");
        lm_err_set_path(err, path);
        return -2;
    }
    int r;
    while ((r = flock(fd, LOCK_EX | (wait ? 0 : LOCK_NB))) != 0 && errno == EINTR)
        ;
    if (r != 0) {
        int busy = errno == EWOULDBLOCK;
        if (!busy) {
            lm_fail_errno(err, errno, "cannot lock the lock file");
            lm_err_set_path(err, path);
        }
        close(fd);
        return busy ? -1 : -2;
    }
    return fd;
}

/* OUT/.lora-merge-shards/<leaf>.lock (malloc'd), or NULL */
static char *lock_path(const lm_out_target *o, const char *leaf)
{
    char *path = sidecar_path(o, leaf);
    if (path != NULL)
        memcpy(path + strlen(path) - 5, ".lock", 5); /* <leaf>.json -> <leaf>.lock */
    return path;
}

/* The lock of shard k: whoever writes the shard holds it, so a temporary file of shard k is known
 * to be abandoned when the lock can be taken.  lock_file()'s results. */
static int lock_shard(const lm_out_target *o, size_t k, lm_err *err)
{
    char *path = lock_path(o, leaf_of(o->paths[k]));
    if (path == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return -2;
    }
    int fd = lock_file(path, 0, err);
    free(path);
    return fd;
}

/* Removes the temporary files a killed writer of shard k left (".<name>.lm-tmp-XXXXXX"); the
 * caller holds shard k's lock, so no live process is writing them. */
static void remove_abandoned_temps(const lm_out_target *o, size_t k, lm_report_impl *ri)
{
    const char *leaf = leaf_of(o->paths[k]);
    size_t n_leaf = strlen(leaf);
    DIR *d = opendir(o->dir);
    if (d == NULL)
        return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const char *nm = de->d_name;
        if (nm[0] != '.' || strncmp(nm + 1, leaf, n_leaf) != 0 || strncmp(nm + 1 + n_leaf, ".lm-tmp-", 8) != 0 ||
            strlen(nm + 1 + n_leaf + 8) != 6)
            continue;
        char *p = lm_path_join(o->dir, nm);
        if (p != NULL && unlink(p) == 0)
            lm_report_note(ri, "removed %s, left by a worker that did not finish", nm);
        free(p);
    }
    closedir(d);
}

static lm_code make_dir(const char *path, lm_err *err)
{
    if (mkdir(path, 0777) == 0 || errno == EEXIST) /* another worker may have made it */
        return LM_OK;
    lm_fail_errno(err, errno, "cannot create the directory");
    lm_err_set_path(err, path);
    return LM_E_IO;
}

/* a plan or sidecar (a regular file of at most 64 MiB: the plan lists every shard, so it is not
 * bounded by a buffer: a plan of 1983 shards is 72 KB), or NULL (missing, unreadable, not JSON) */
static cJSON *read_json(const char *path)
{
    lm_err e;
    lm_err_clear(&e);
    size_t n = 0;
    int why;
    char *buf = lm_read_small_file(path, (size_t)64 << 20, &n, &why, &e);
    cJSON *j = buf != NULL ? cJSON_ParseWithLength(buf, n) : NULL;
    free(buf);
    return j;
}

static const char *json_str(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* what the workers share: the plan's fingerprint, its shards, and the command line that
 * `lora-merge finalize OUT` replays.  The first worker creates it (link: never replaced); the
 * others check that their plan is the same. */
static lm_code record_plan(const lm_shard_ctx *C, const char *fp, lm_err *err)
{
    char *path = sidecar_path(C->ot, PLAN_NAME);
    cJSON *root = cJSON_CreateObject(), *shards = cJSON_AddArrayToObject(root, "shards");
    cJSON_AddStringToObject(root, "fingerprint", fp);
    for (size_t k = 0; k < C->ot->n_shards && shards; k++)
        cJSON_AddItemToArray(shards, cJSON_CreateString(leaf_of(C->ot->paths[k])));
    char cwd[4096];
    cJSON_AddStringToObject(root, "cwd", getcwd(cwd, sizeof cwd) ? cwd : "");
    cJSON *args = cJSON_AddArrayToObject(root, "args");
    for (size_t i = 0; i < C->job->n_record_args && args; i++)
        cJSON_AddItemToArray(args, cJSON_CreateString(C->job->record_args[i]));
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    lm_code rc = LM_OK;
    int existed = 0;
    if (text == NULL || path == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    /* never a name of its own that a SIGKILL could leave behind, but a locked temporary file
     * (removed by finalize when its writer is dead) */
    if ((rc = lm_write_file_new(path, text, strlen(text), &existed, err)) != LM_OK) {
        lm_err_set_path(err, path);
        goto done;
    }
    int linked = !existed;
    cJSON *had = linked ? NULL : read_json(path);
    const char *other = had ? json_str(had, "fingerprint") : NULL;
    if (!linked && other == NULL) {
        rc = lm_fail(err, LM_E_USAGE, "PlanMismatch", "the output directory's shard plan is damaged (not JSON with a "
                     "fingerprint, or larger than 64 MiB): remove it, and a worker records it again");
        lm_err_set_path(err, path);
    } else if (!linked && strcmp(other, fp) != 0) {
        rc = lm_fail(err, LM_E_USAGE, "PlanMismatch",
                     "the output directory holds shards of another plan (fingerprint %.12s, this worker's %.12s): "
                     "every worker must get the same base, adapters and options (or remove the directory)",
                     other, fp);
        lm_err_set_path(err, path);
    }
    cJSON_Delete(had);
done:
    free(text);
    free(path);
    return rc;
}

/* the file's identity as the sidecar records it: inode, mtime and ctime (ns).  A change made
 * through the filesystem after the worker recorded it (a write in place, a truncation, another
 * file renamed over it, a copy) changes at least one of them: ctime cannot be set back by
 * anyone but the kernel */
typedef struct {
    unsigned long long ino, mtime_ns, ctime_ns;
} file_id;

static file_id id_of(const struct stat *st)
{
    file_id id = {(unsigned long long)st->st_ino,
                  (unsigned long long)st->st_mtim.tv_sec * 1000000000ull + (unsigned long long)st->st_mtim.tv_nsec,
                  (unsigned long long)st->st_ctim.tv_sec * 1000000000ull + (unsigned long long)st->st_ctim.tv_nsec};
    return id;
}

/* the identity is kept as decimal strings: a double (cJSON's numbers) does not hold 64 bits */
static int sidecar_id_matches(const cJSON *sc, const file_id *id)
{
    const char *keys[3] = {"inode", "mtime_ns", "ctime_ns"};
    const unsigned long long v[3] = {id->ino, id->mtime_ns, id->ctime_ns};
    for (int i = 0; i < 3; i++) {
        const char *s = json_str(sc, keys[i]);
        char b[32];
        snprintf(b, sizeof b, "%llu", v[i]);
        if (s == NULL || strcmp(s, b) != 0)
            return 0;
    }
    return 1;
}

/* the file read back: its XXH3-128 into xxh and, unless NULL, its plain sha256 into plain (one
 * read for both).  LM_OK, or an I/O error naming the file */
static lm_code file_hashes(const char *path, char xxh[33], char *plain, lm_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        lm_fail_errno(err, errno, "cannot open the shard to hash it");
        lm_err_set_path(err, path);
        return LM_E_IO;
    }
    lm_code rc = lm_fd_hashes(fd, path, plain, xxh, err);
    close(fd);
    return rc;
}

/* why shard k is not complete and verified ("" when it is).  The cheap check: present, a sidecar
 * of this plan, the planned size, and the identity the worker recorded (inode, mtime, ctime):
 * then the sidecar's xxh3_128 (computed by the worker from the complete file) stands.  A shard whose
 * identity changed, or every shard with `verify`, is read again and hashed (*rehashed set). */
static const char *shard_problem(const lm_shard_ctx *C, size_t k, const char *fp, int verify, int *rehashed,
                                 int *threads, lm_err *err)
{
    const char *leaf = leaf_of(C->ot->paths[k]);
    struct stat st;
    *rehashed = 0;
    if (lstat(C->ot->paths[k], &st) != 0)
        return "missing";
    if (!S_ISREG(st.st_mode)) /* a link would leave the model relying on a file outside OUT */
        return S_ISLNK(st.st_mode) ? "a symbolic link, not the file its worker wrote" : "not a regular file";
    char *sp = sidecar_path(C->ot, leaf);
    cJSON *sc = sp ? read_json(sp) : NULL;
    free(sp);
    const char *why = "";
    const char *sfp = sc ? json_str(sc, "fingerprint") : NULL, *ssha = sc ? json_str(sc, "xxh3_128") : NULL;
    file_id id = id_of(&st);
    char hex[65], plain[65];
    /* finalize --json (shard_sha): the report's plain sha256, read back (the sidecar holds XXH3-128) */
    char *want_plain = C->shard_sha != NULL ? plain : NULL;
    if (sfp == NULL)
        why = "no sidecar (not completed by a worker)";
    else if (strcmp(sfp, fp) != 0) /* an older version's sidecar (sha256x4) too: another plan */
        why = "written for another plan";
    else if (ssha == NULL || strlen(ssha) != 32)
        why = "its sidecar has no XXH3-128 (corrupted)";
    else if ((uint64_t)st.st_size != C->ot->shard_bytes[k])
        why = "wrong size";
    else {
        int same = !verify && sidecar_id_matches(sc, &id);
        *rehashed = !same;
        if (same && want_plain == NULL)
            memcpy(hex, ssha, 33);
        else if (file_hashes(C->ot->paths[k], hex, want_plain, err) != LM_OK)
            why = "unreadable";
        else if (strcmp(hex, ssha) != 0) /* read back (for the plain sha256 too): checked as well */
            why = "XXH3-128 differs from its sidecar (corrupted)";
    }
    if (why[0] == '\0' && C->shard_sha != NULL)
        memcpy(C->shard_sha[k], plain, sizeof plain);
    const cJSON *th = sc ? cJSON_GetObjectItemCaseSensitive(sc, "threads") : NULL;
    *threads = why[0] == '\0' && cJSON_IsNumber(th) && th->valuedouble >= 1 ? (int)th->valuedouble : 0;
    cJSON_Delete(sc);
    return why;
}

/* wall and CPU (user+system, all threads) seconds of this process so far */
static void clocks(double *wall, double *cpu)
{
    struct timespec ts;
    struct rusage ru;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    getrusage(RUSAGE_SELF, &ru);
    *wall = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    *cpu = (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_sec +
           1e-6 * (double)ru.ru_stime.tv_usec;
}

/* the sidecar of shard k, once it is in place: what finalize checks, and for the record (a
 * scheduler's view of the shard's cost) the wall and CPU seconds its worker spent on it */
static lm_code write_sidecar(const lm_shard_ctx *C, size_t k, const char *fp, const char *sha, double seconds,
                             double cpu_seconds, const lm_exec_stats *es, lm_err *err)
{
    struct stat st;
    if (stat(C->ot->paths[k], &st) != 0) {
        lm_fail_errno(err, errno, "cannot stat the shard just written");
        lm_err_set_path(err, C->ot->paths[k]);
        return LM_E_IO;
    }
    file_id id = id_of(&st);
    char ino[32], mt[32], ct[32];
    snprintf(ino, sizeof ino, "%llu", id.ino);
    snprintf(mt, sizeof mt, "%llu", id.mtime_ns);
    snprintf(ct, sizeof ct, "%llu", id.ctime_ns);
    char *path = sidecar_path(C->ot, leaf_of(C->ot->paths[k]));
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "shard", leaf_of(C->ot->paths[k]));
    cJSON_AddStringToObject(o, "fingerprint", fp);
    cJSON_AddNumberToObject(o, "bytes", (double)C->ot->shard_bytes[k]);
    cJSON_AddStringToObject(o, "xxh3_128", sha);
    cJSON_AddStringToObject(o, "xxh3_128_is", "a 128-bit integrity check against truncation and corruption, not a "
                            "cryptographic digest; finalize --json reports each file's SHA-256");
    cJSON_AddStringToObject(o, "inode", ino);
    cJSON_AddStringToObject(o, "mtime_ns", mt);
    cJSON_AddStringToObject(o, "ctime_ns", ct);
    cJSON_AddNumberToObject(o, "seconds", seconds);
    cJSON_AddNumberToObject(o, "cpu_seconds", cpu_seconds);
    cJSON_AddNumberToObject(o, "hash_cpu_seconds", es->hash_cpu_seconds); /* of cpu_seconds */
    cJSON_AddNumberToObject(o, "threads", es->n_threads);
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    lm_code rc = path && text ? lm_write_file_atomic(path, text, strlen(text), err)
                              : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    free(text);
    free(path);
    return rc;
}

static lm_code prepare_dirs(const lm_shard_ctx *C, lm_err *err)
{
    lm_code rc = make_dir(C->ot->dir, err);
    char *sd = rc == LM_OK ? lm_path_join(C->ot->dir, LM_SHARDS_DIR) : NULL;
    if (rc == LM_OK)
        rc = sd ? make_dir(sd, err) : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    free(sd);
    return rc;
}

static lm_code write_one_shard(lm_shard_ctx *C, size_t k, const char *fp, lm_err *err)
{
    char *sp = sidecar_path(C->ot, leaf_of(C->ot->paths[k]));
    if (sp == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    unlink(sp); /* a sidecar of an earlier plan: the shard is rewritten */
    free(sp);
    lm_exec_opts eo = *C->eo;
    char sha[65];
    eo.one_shard = 1;
    eo.only_shard = k;
    eo.shard_hash_hex = sha;
    eo.before_commit = NULL;
    lm_exec_stats st;
    memset(&st, 0, sizeof st);
    double w0, c0, w1, c1;
    clocks(&w0, &c0);
    lm_code rc = lm_exec_run(C->plan, C->model, C->ads, C->ot->paths[k], &eo, &st, err);
    clocks(&w1, &c1);
    if (rc != LM_OK)
        return rc;
    C->st->bytes_written += st.bytes_written;
    C->st->bytes_copied += st.bytes_copied;
    C->st->bytes_computed += st.bytes_computed;
    C->st->n_tiles += st.n_tiles;
    C->st->n_threads = st.n_threads;
    return write_sidecar(C, k, fp, sha, w1 - w0, c1 - c0, &st, err);
}

typedef struct {
    uint64_t bytes;
    size_t k;
} shard_size;

static int cmp_larger_first(const void *a, const void *b)
{
    const shard_size *x = a, *y = b;
    if (x->bytes != y->bytes)
        return x->bytes > y->bytes ? -1 : 1;
    return x->k < y->k ? -1 : x->k > y->k;
}

int lm_shards_owners(const uint64_t *bytes, size_t n, unsigned count, unsigned *owner)
{
    shard_size *order = malloc((n ? n : 1) * sizeof *order);
    uint64_t *load = calloc(count ? count : 1, sizeof *load);
    if (order == NULL || load == NULL || count == 0) {
        free(order);
        free(load);
        return -1;
    }
    for (size_t k = 0; k < n; k++)
        order[k] = (shard_size){bytes[k], k};
    qsort(order, n, sizeof *order, cmp_larger_first);
    for (size_t i = 0; i < n; i++) {
        unsigned best = 0;
        for (unsigned w = 1; w < count; w++)
            if (load[w] < load[best])
                best = w;
        owner[order[i].k] = best;
        load[best] += order[i].bytes;
    }
    free(order);
    free(load);
    return 0;
}

lm_code lm_shards_work(lm_shard_ctx *C, lm_err *err)
{
    char fp[65];
    lm_code rc;
    if ((rc = lm_shards_fingerprint(C, fp, err)) != LM_OK || (rc = prepare_dirs(C, err)) != LM_OK ||
        (rc = record_plan(C, fp, err)) != LM_OK)
        return rc;
    unsigned *owner = malloc((C->ot->n_shards ? C->ot->n_shards : 1) * sizeof *owner);
    if (owner == NULL || lm_shards_owners(C->ot->shard_bytes, C->ot->n_shards, C->job->shard_count, owner) != 0) {
        free(owner);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    size_t n_mine = 0, n_done = 0;
    for (size_t k = 0; k < C->ot->n_shards && rc == LM_OK; k++) {
        if (owner[k] != C->job->shard_index)
            continue;
        n_mine++;
        lm_err e;
        lm_err_clear(&e);
        int rehashed, threads;
        if (shard_problem(C, k, fp, C->job->shard_verify, &rehashed, &threads, &e)[0] == '\0') {
            n_done++;
            lm_report_note(C->ri, "shard %s already complete and verified: kept", leaf_of(C->ot->paths[k]));
            for (size_t i = 0; i < C->ri->n_files; i++) /* the report's file: kept, not written */
                if (strcmp(C->ri->files[i].path, C->ot->paths[k]) == 0)
                    C->ri->files[i].origin = "kept";
            continue;
        }
        int lock = lock_shard(C->ot, k, err);
        if (lock == -2) {
            free(owner);
            return err->code;
        }
        if (lock == -1) { /* two workers given the same index: one writes, the other says so */
            rc = lm_fail(err, LM_E_USAGE, "Usage", "shard %s is being written by another live worker (the same "
                         "--shards index given twice?)", leaf_of(C->ot->paths[k]));
            break;
        }
        remove_abandoned_temps(C->ot, k, C->ri);
        rc = write_one_shard(C, k, fp, err);
        close(lock);
    }
    free(owner);
    if (rc == LM_OK)
        lm_report_note(C->ri, "shard worker %u of %u: %zu of the %zu shards (%zu written, %zu kept); run "
                              "`lora-merge finalize %s` once every worker is done",
                       C->job->shard_index, C->job->shard_count, n_mine, C->ot->n_shards, n_mine - n_done, n_done,
                       C->ot->dir);
    return rc;
}

/* ---- finalize ----------------------------------------------------------------------------------- */
static lm_code check_all_shards(const lm_shard_ctx *C, const char *fp, lm_err *err)
{
    char *plan = sidecar_path(C->ot, PLAN_NAME);
    cJSON *pj = plan ? read_json(plan) : NULL;
    const char *pfp = pj ? json_str(pj, "fingerprint") : NULL;
    lm_code rc = LM_OK;
    if (pfp != NULL && strcmp(pfp, fp) != 0) {
        rc = lm_fail(err, LM_E_USAGE, "PlanMismatch", "the shards in the output directory were planned with other "
                     "inputs or options (fingerprint %.12s, finalize's %.12s)", pfp, fp);
        lm_err_set_path(err, plan);
    }
    cJSON_Delete(pj);
    free(plan);
    if (rc != LM_OK)
        return rc;
    const char **whys = calloc(C->ot->n_shards, sizeof *whys);
    int *rehashed = calloc(C->ot->n_shards, sizeof *rehashed), *threads = calloc(C->ot->n_shards, sizeof *threads);
    if (whys == NULL || rehashed == NULL || threads == NULL) {
        free(whys);
        free(rehashed);
        free(threads);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    int n_threads = C->eo->n_threads > 0 ? C->eo->n_threads : 0;
    /* shards read back (--verify, or a changed identity) are hashed in parallel */
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads > 0 ? n_threads : omp_get_num_procs())
    for (size_t k = 0; k < C->ot->n_shards; k++) {
        lm_err e;
        lm_err_clear(&e);
        whys[k] = shard_problem(C, k, fp, C->job->shard_verify, &rehashed[k], &threads[k], &e);
    }
    size_t n_rehashed = 0;
    C->st->n_threads = 0; /* the report's threads: the most a worker used (sidecars), 0 (left out) if unknown */
    for (size_t k = 0; k < C->ot->n_shards; k++) {
        n_rehashed += rehashed[k] != 0;
        C->st->n_threads = threads[k] > C->st->n_threads ? threads[k] : C->st->n_threads;
    }
    free(rehashed);
    free(threads);
    if (C->job->shard_verify)
        lm_report_note(C->ri, "--verify: %zu of the %zu shards read back and hashed", n_rehashed, C->ot->n_shards);
    else
        lm_report_note(C->ri, "%zu shards checked by size and the identity their workers recorded (inode, mtime, "
                              "ctime), %zu read back and hashed because it changed; --verify reads every shard back%s",
                       C->ot->n_shards, n_rehashed, C->shard_sha != NULL ? " (--json: every shard read back for its "
                       "sha256, the sidecars holding XXH3-128, and checked against it)" : "");
    char list[900];
    size_t used = 0, n_bad = 0;
    list[0] = '\0';
    for (size_t k = 0; k < C->ot->n_shards; k++) {
        const char *why = whys[k];
        if (why[0] == '\0')
            continue;
        if (n_bad++ < 8 && used < sizeof list)
            used += (size_t)snprintf(list + used, sizeof list - used, "%s%s (%s)", n_bad > 1 ? ", " : "",
                                     leaf_of(C->ot->paths[k]), why);
    }
    free(whys);
    if (n_bad == 0)
        return LM_OK;
    rc = lm_fail(err, LM_E_MISMATCH, "ShardsIncomplete", "%zu of %zu shards not complete and verified: %s%s; rerun "
                 "their workers, then finalize", n_bad, C->ot->n_shards, list, n_bad > 8 ? ", ..." : "");
    lm_err_set_path(err, C->ot->dir);
    return rc;
}

/* the sidecars and plan record, once the index is in place */
static void remove_records(const lm_shard_ctx *C)
{
    for (size_t k = 0; k < C->ot->n_shards; k++) {
        char *sp = sidecar_path(C->ot, leaf_of(C->ot->paths[k]));
        if (sp != NULL) {
            unlink(sp);
            memcpy(sp + strlen(sp) - 5, ".lock", 5);
            unlink(sp);
        }
        free(sp);
    }
    char *pp = sidecar_path(C->ot, PLAN_NAME), *sd = lm_path_join(C->ot->dir, LM_SHARDS_DIR);
    if (pp != NULL)
        unlink(pp);
    char *fl = lock_path(C->ot, "finalize"); /* still held: a finalize waiting on it then finds no plan */
    if (fl != NULL)
        unlink(fl);
    free(fl);
    if (sd != NULL) {
        lm_out_clean_dead_temps_in(sd, C->ri); /* a killed worker's temporary plan or sidecar */
        rmdir(sd); /* only when empty: another plan's files are never removed */
    }
    free(pp);
    free(sd);
}

/* Two finalize steps at once (a retried dependent job): the second waits for the first, then
 * finds the plan gone and the index committed, and says so (it said every shard had no sidecar:
 * "rerun their workers").  @return the locked descriptor of OUT/.lora-merge-shards/finalize.lock,
 * -2 when there is no plan and nothing committed (--shards index before any worker:
 * check_all_shards() names the missing shards), or -1 (err filled) */
static int lock_finalize(const lm_shard_ctx *C, lm_err *err)
{
    char *lock = lock_path(C->ot, "finalize"), *plan = sidecar_path(C->ot, PLAN_NAME);
    char *index = lm_path_join(C->ot->dir, C->ot->index_text != NULL ? LM_INDEX_NAME : leaf_of(C->ot->paths[0]));
    int fd = -1;
    struct stat st;
    if (lock == NULL || plan == NULL || index == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    char *slash = strrchr(lock, '/');
    *slash = '\0';
    int have_dir = lstat(lock, &st) == 0;
    *slash = '/';
    if (have_dir && (fd = lock_file(lock, 1, err)) < 0)
        goto done;
    if (lstat(plan, &st) != 0) {
        if (fd >= 0) { /* finalized meanwhile: this lock file is a leftover */
            unlink(lock);
            *slash = '\0';
            rmdir(lock);
            close(fd);
        }
        fd = -2;
        if (lstat(index, &st) == 0) {
            fd = -1;
            lm_fail(err, LM_E_USAGE, "Usage", "the directory is finalized already (its shard plan removed, %s in "
                    "place): another finalize completed it", leaf_of(index));
            lm_err_set_path(err, C->ot->dir);
        }
    }
done:
    free(lock);
    free(plan);
    free(index);
    return fd;
}

static lm_code finalize_locked(lm_shard_ctx *C, char fp[65], lm_err *err)
{
    lm_code rc;
    if ((rc = lm_shards_fingerprint(C, fp, err)) != LM_OK || (rc = check_all_shards(C, fp, err)) != LM_OK)
        return rc;
    int do_fsync = C->job->do_fsync; /* the shards were flushed by their workers (--fsync there too) */
    for (size_t i = 0; i < C->side->n && rc == LM_OK; i++) {
        const lm_side_file *f = &C->side->f[i];
        char *path = lm_path_join(C->ot->dir, f->name);
        rc = path ? lm_write_file_atomic_sync(path, f->data, f->n_bytes, f->mode, do_fsync, err)
                  : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        free(path);
    }
    if (rc == LM_OK && do_fsync && lm_out_fsync_dir(C->ot->dir) != 0) /* the side files, before the record */
        rc = lm_fail_errno(err, errno, "cannot flush the output directory");
    if (rc == LM_OK && C->ot->index_text != NULL) { /* last: the commit record */
        char *path = lm_path_join(C->ot->dir, LM_INDEX_NAME);
        rc = path ? lm_write_file_atomic_sync(path, C->ot->index_text, strlen(C->ot->index_text), 0666, do_fsync, err)
                  : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        free(path);
    }
    if (rc == LM_OK && do_fsync && lm_out_fsync_dir(C->ot->dir) != 0)
        rc = lm_fail_errno(err, errno, "cannot flush the output directory");
    if (rc != LM_OK) {
        lm_err_set_path(err, C->ot->dir);
        return rc;
    }
    lm_out_remove_stale(C->ot, C->ri);
    for (size_t k = 0; k < C->ot->n_shards; k++) {
        lm_err e;
        lm_err_clear(&e);
        int lock = lock_shard(C->ot, k, &e);
        if (lock >= 0) { /* every shard is complete: its temporary files are leftovers */
            remove_abandoned_temps(C->ot, k, C->ri);
            close(lock);
        }
    }
    remove_records(C);
    for (size_t k = 0; k < C->ot->n_shards; k++)
        C->st->bytes_written += C->ot->shard_bytes[k];
    return LM_OK;
}

lm_code lm_shards_finalize(lm_shard_ctx *C, lm_err *err)
{
    char fp[65];
    lm_code rc;
    int lock = lock_finalize(C, err);
    if (lock == -1)
        return err->code;
    rc = finalize_locked(C, fp, err);
    if (lock >= 0)
        close(lock);
    return rc;
}

lm_code lm_shards_recorded(const char *out_dir, char ***args, size_t *n_args, char **cwd, lm_err *err)
{
    lm_err local;
    lm_err_clear(&local);
    lm_err *e = err ? err : &local;
    *args = NULL;
    *n_args = 0;
    *cwd = NULL;
    size_t n = strlen(out_dir) + sizeof LM_SHARDS_DIR + sizeof PLAN_NAME + 2;
    char *path = malloc(n);
    if (path == NULL)
        return lm_fail(e, LM_E_NOMEM, NULL, "out of memory");
    snprintf(path, n, "%s/%s/%s", out_dir, LM_SHARDS_DIR, PLAN_NAME);
    cJSON *pj = read_json(path);
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(pj, "args");
    const char *dir = json_str(pj, "cwd");
    lm_code rc = LM_OK;
    struct stat st;
    if ((!cJSON_IsArray(a) || dir == NULL) && lstat(path, &st) == 0) {
        rc = lm_fail(e, LM_E_USAGE, "PlanMismatch", "the shard plan is damaged (not JSON with the workers' args and "
                     "cwd, or larger than 64 MiB): remove it and rerun one worker, which records it again");
        lm_err_set_path(e, path);
        goto done;
    }
    if (!cJSON_IsArray(a) || dir == NULL) {
        rc = lm_fail(e, LM_E_USAGE, "Usage", "no shard plan here (no worker ran with --shards I/N into this directory, "
                     "or finalize already completed it)");
        lm_err_set_path(e, path);
        goto done;
    }
    size_t k = (size_t)cJSON_GetArraySize(a);
    *args = calloc(k + 1, sizeof **args);
    *cwd = strdup(dir);
    if (*args == NULL || *cwd == NULL) {
        rc = lm_fail(e, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, a)
    {
        if (!cJSON_IsString(it)) {
            rc = lm_fail(e, LM_E_USAGE, "PlanMismatch", "the shard plan is damaged (argument %zu is not a string): "
                         "remove it and rerun one worker, which records it again", *n_args + 1);
            lm_err_set_path(e, path);
            goto done;
        }
        if (((*args)[*n_args] = strdup(it->valuestring)) == NULL) {
            rc = lm_fail(e, LM_E_NOMEM, NULL, "out of memory");
            goto done;
        }
        ++*n_args;
    }
done:
    cJSON_Delete(pj);
    free(path);
    return rc;
}
