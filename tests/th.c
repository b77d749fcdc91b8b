/* SPDX-License-Identifier: MIT */
/* th.c : test helpers (see th.h).  Deliberately shares no code with src/. */
#include "th.h"

#include <criterion/criterion.h>

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <math.h>
#include <openssl/evp.h>
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zip.h>

int th_have_shared(void)
{
    struct stat st;
    return stat(TH_SHARED "/README.md", &st) == 0;
}

const char *th_bin(void)
{
    const char *b = getenv("LM_BIN");
    return b && *b ? b : "build/lora-merge";
}

static char *slurp_fd(int fd)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    lseek(fd, 0, SEEK_SET);
    for (;;) {
        if (n + 1 >= cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
        ssize_t k = read(fd, buf + n, cap - n - 1);
        if (k <= 0)
            break;
        n += (size_t)k;
    }
    buf[n] = '\0';
    return buf;
}

th_run_result th_run(const char *cwd, const char *const *argv)
{
    th_run_result r = {-1, NULL, NULL};
    char of[] = "/tmp/th-out-XXXXXX", ef[] = "/tmp/th-err-XXXXXX";
    int ofd = mkstemp(of), efd = mkstemp(ef);
    unlink(of);
    unlink(ef);
    char bin_abs[4096];
    const char *prog = argv[0];
    if (cwd != NULL && prog[0] != '/' && strchr(prog, '/') != NULL && realpath(prog, bin_abs) != NULL)
        prog = bin_abs;
    /* posix_spawn, not fork: the child shares the parent's memory until it execs (a forked
     * child of a large or sanitized test process first copies its page tables, and faults its
     * pages until exec: a large part of a short run's cost, thousands of runs a suite) */
    extern char **environ;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, ofd, 1);
    posix_spawn_file_actions_adddup2(&fa, efd, 2);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    if (cwd != NULL)
        posix_spawn_file_actions_addchdir_np(&fa, cwd);
    pid_t pid;
    const int e = posix_spawnp(&pid, prog, &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    int st = 0;
    if (e != 0) /* no child (glibc reaps it): a cwd that cannot be entered 126, else 127, as a shell */
        r.status = cwd != NULL && access(cwd, X_OK) != 0 ? 126 : 127;
    else {
        pid_t w;
        while ((w = waitpid(pid, &st, 0)) < 0 && errno == EINTR)
            ;
        if (w == pid)
            r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    r.out = slurp_fd(ofd);
    r.err = slurp_fd(efd);
    close(ofd);
    close(efd);
    return r;
}

th_held_result th_run_held(const char *const *argv, const char *const *env, const char *mark, int kill_it,
                           void (*at)(void *ctx), void *ctx)
{
    th_held_result r = {-1, 0, NULL};
    int in[2], errp[2];
    if (pipe(in) != 0)
        return r;
    if (pipe(errp) != 0) {
        close(in[0]);
        close(in[1]);
        return r;
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(errp[1], 2);
        close(in[1]);
        close(errp[0]);
        for (; env != NULL && *env != NULL; env++) {
            const char *eq = strchr(*env, '=');
            char name[256];
            snprintf(name, sizeof name, "%.*s", eq ? (int)(eq - *env) : (int)strlen(*env), *env);
            if (eq != NULL)
                setenv(name, eq + 1, 1);
            else
                unsetenv(name);
        }
        execv(argv[0], (char *const *)argv);
        _exit(121);
    }
    close(in[0]);
    close(errp[1]);
    char buf[8192];
    size_t n = 0;
    buf[0] = '\0';
    while (pid > 0 && !r.held && n + 1 < sizeof buf) { /* until the mark, or the end of stderr */
        ssize_t k = read(errp[0], buf + n, sizeof buf - 1 - n);
        if (k <= 0)
            break;
        n += (size_t)k;
        buf[n] = '\0';
        r.held = strstr(buf, mark) != NULL;
    }
    if (r.held && at != NULL)
        at(ctx);
    if (kill_it && pid > 0) {
        kill(pid, SIGKILL);
    } else {
        signal(SIGPIPE, SIG_IGN);
        if (r.held && write(in[1], "x", 1) != 1)
            r.held = 0;
        close(in[1]);
        in[1] = -1;
        ssize_t k;
        while (n + 1 < sizeof buf && (k = read(errp[0], buf + n, sizeof buf - 1 - n)) > 0)
            n += (size_t)k;
        buf[n] = '\0';
    }
    if (in[1] >= 0)
        close(in[1]);
    close(errp[0]);
    int st = 0;
    if (pid > 0 && waitpid(pid, &st, 0) == pid)
        r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    const char *after = strstr(buf, mark);
    r.err = strdup(after != NULL ? after + strlen(mark) : buf);
    return r;
}

th_run_result th_runv(const char *first, ...)
{
    const char *argv[40];
    int n = 0;
    argv[n++] = th_bin();
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a != NULL && n < 39; a = va_arg(ap, const char *))
        argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    return th_run(NULL, argv);
}

th_run_result th_sh(const char *cmd)
{
    const char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    return th_run(NULL, argv);
}

void th_run_free(th_run_result *r)
{
    free(r->out);
    free(r->err);
    r->out = r->err = NULL;
}

int th_gen_model_path(char *buf, size_t cap)
{
    const char *bin = th_bin();
    const char *slash = strrchr(bin, '/');
    if (slash == NULL)
        snprintf(buf, cap, "bench/gen_model");
    else
        snprintf(buf, cap, "%.*s/bench/gen_model", (int)(slash - bin), bin);
    return access(buf, X_OK) == 0;
}

char *th_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    char buf[4096];
    snprintf(buf, sizeof buf, "%s/lm-test-XXXXXX", base && *base ? base : "/tmp");
    char *d = mkdtemp(buf);
    return d ? strdup(d) : NULL;
}

static int rmrf_one(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    return (flag == FTW_DP ? rmdir(p) : unlink(p)) != 0 && errno != ENOENT;
}

void th_rmrf(const char *path)
{
    if (path == NULL)
        return;
    /* in-process (no sh + rm per call: the method tests remove ~150 trees) */
    if (nftw(path, rmrf_one, 16, FTW_DEPTH | FTW_PHYS) != 0 && errno != ENOENT)
        fprintf(stderr, "th_rmrf: could not remove %s\n", path);
}

int th_exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

int th_count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
            n++;
    closedir(d);
    return n;
}

uint8_t *th_read_file(const char *path, size_t *n)
{
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
        return NULL;
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(len > 0 ? (size_t)len : 1);
    size_t got = fread(buf, 1, (size_t)len, f);
    fclose(f);
    if (got != (size_t)len) {
        free(buf);
        return NULL;
    }
    *n = (size_t)len;
    return buf;
}

int th_path(char *dst, size_t cap, const char *dir, const char *name)
{
    int n = snprintf(dst, cap, "%s/%s", dir, name);
    return n > 0 && (size_t)n < cap ? 0 : -1;
}

int th_write_text(const char *dir, const char *name, const char *text)
{
    char p[4096];
    return th_path(p, sizeof p, dir, name) == 0 ? th_write_file(p, text, strlen(text)) : -1;
}

int th_write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return -1;
    size_t k = fwrite(data, 1, n, f);
    return (fclose(f) == 0 && k == n) ? 0 : -1;
}

uint64_t th_file_hash(const char *path)
{
    size_t n;
    uint8_t *b = th_read_file(path, &n);
    if (b == NULL)
        return 0;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    free(b);
    return h ^ n;
}

/* the XXH3-128 of a whole buffer, by the library's one-shot call (src/core/lm_xxh128.c streams,
 * st_writer.c's hash-as-written reads parts back): 32 hex digits as `xxhsum -H2` writes them */
int th_file_xxh128(const char *path, char hex[33])
{
    size_t n;
    uint8_t *b = th_read_file(path, &n);
    if (b == NULL)
        return -1;
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(b, n));
    for (int i = 0; i < 16; i++)
        snprintf(hex + 2 * i, 3, "%02x", c.digest[i]);
    free(b);
    return 0;
}

int th_files_equal(const char *a, const char *b)
{
    size_t na, nb;
    uint8_t *x = th_read_file(a, &na), *y = th_read_file(b, &nb);
    int eq = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return eq;
}

/* ---- safetensors ------------------------------------------------------------------------------ */
static int dtype_size(const char *dt)
{
    if (!strcmp(dt, "F64") || !strcmp(dt, "I64") || !strcmp(dt, "U64"))
        return 8;
    if (!strcmp(dt, "F32") || !strcmp(dt, "I32") || !strcmp(dt, "U32"))
        return 4;
    if (!strcmp(dt, "F16") || !strcmp(dt, "BF16") || !strcmp(dt, "I16") || !strcmp(dt, "U16"))
        return 2;
    if (!strcmp(dt, "U8") || !strcmp(dt, "I8") || !strcmp(dt, "BOOL") || !strncmp(dt, "F8_", 3))
        return 1;
    return -1;
}

int th_st_read(const char *path, th_st *out)
{
    memset(out, 0, sizeof *out);
    out->buf = th_read_file(path, &out->n_buf);
    if (out->buf == NULL || out->n_buf < 8)
        return -1;
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = (hl << 8) | out->buf[i];
    if (hl > out->n_buf - 8)
        return -1;
    cJSON *root = cJSON_ParseWithLength((const char *)out->buf + 8, (size_t)hl);
    if (root == NULL || !cJSON_IsObject(root))
        return -1;
    const uint8_t *data = out->buf + 8 + hl;
    uint64_t data_len = out->n_buf - 8 - hl;
    size_t n = (size_t)cJSON_GetArraySize(root);
    out->t = calloc(n ? n : 1, sizeof *out->t);
    cJSON *e;
    int rc = 0;
    cJSON_ArrayForEach(e, root)
    {
        if (strcmp(e->string, "__metadata__") == 0) {
            out->meta_json = cJSON_PrintUnformatted(e);
            continue;
        }
        th_tensor *t = &out->t[out->n];
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
        const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
        const cJSON *of = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        if (!cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(of) || cJSON_GetArraySize(of) != 2 ||
            cJSON_GetArraySize(sh) > 8) {
            rc = -1;
            break;
        }
        t->name = strdup(e->string);
        snprintf(t->dtype, sizeof t->dtype, "%s", dt->valuestring);
        t->n_elems = 1;
        const cJSON *d;
        cJSON_ArrayForEach(d, sh)
        {
            t->shape[t->n_dims++] = (uint64_t)d->valuedouble;
            t->n_elems *= (uint64_t)d->valuedouble;
        }
        uint64_t b = (uint64_t)cJSON_GetArrayItem(of, 0)->valuedouble, en = (uint64_t)cJSON_GetArrayItem(of, 1)->valuedouble;
        int es = dtype_size(t->dtype);
        if (es < 0 || b > en || en > data_len || en - b != t->n_elems * (uint64_t)es) {
            free(t->name);
            rc = -1;
            break;
        }
        t->data = data + b;
        t->n_bytes = en - b;
        out->n++;
    }
    cJSON_Delete(root);
    return rc;
}

void th_st_free(th_st *st)
{
    for (size_t i = 0; i < st->n; i++)
        free(st->t[i].name);
    free(st->t);
    free(st->buf);
    free(st->meta_json);
    memset(st, 0, sizeof *st);
}

/* 1 when the two safetensors files hold the same tensors in the same order (names, dtypes,
 * shapes, bytes) and the same __metadata__ apart from the key skip_meta (may be NULL) */
int th_st_same_except(const char *a, const char *b, const char *skip_meta)
{
    th_st x, y;
    memset(&x, 0, sizeof x);
    memset(&y, 0, sizeof y);
    int eq = th_st_read(a, &x) == 0 && th_st_read(b, &y) == 0 && x.n == y.n;
    for (size_t i = 0; eq && i < x.n; i++) {
        const th_tensor *p = &x.t[i], *q = &y.t[i];
        eq = strcmp(p->name, q->name) == 0 && strcmp(p->dtype, q->dtype) == 0 && p->n_dims == q->n_dims &&
             memcmp(p->shape, q->shape, sizeof p->shape) == 0 && p->n_bytes == q->n_bytes &&
             memcmp(p->data, q->data, p->n_bytes) == 0;
    }
    if (eq && (x.meta_json == NULL) != (y.meta_json == NULL))
        eq = 0;
    if (eq && x.meta_json != NULL) {
        cJSON *mx = cJSON_Parse(x.meta_json), *my = cJSON_Parse(y.meta_json);
        if (skip_meta != NULL) {
            cJSON_DeleteItemFromObjectCaseSensitive(mx, skip_meta);
            cJSON_DeleteItemFromObjectCaseSensitive(my, skip_meta);
        }
        eq = mx != NULL && my != NULL && cJSON_Compare(mx, my, 1);
        cJSON_Delete(mx);
        cJSON_Delete(my);
    }
    th_st_free(&x);
    th_st_free(&y);
    return eq;
}

const th_tensor *th_st_find(const th_st *st, const char *name)
{
    for (size_t i = 0; i < st->n; i++)
        if (strcmp(st->t[i].name, name) == 0)
            return &st->t[i];
    return NULL;
}

static double half_to_double(uint16_t h)
{
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 0)
        v = ldexp((double)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexp((double)(m + 1024), e - 25);
    return s ? -v : v;
}

double *th_to_f64(const th_tensor *t)
{
    double *v = malloc((t->n_elems ? t->n_elems : 1) * sizeof *v);
    for (uint64_t i = 0; i < t->n_elems; i++) {
        const uint8_t *p = t->data;
        if (!strcmp(t->dtype, "F64")) {
            memcpy(&v[i], p + 8 * i, 8);
        } else if (!strcmp(t->dtype, "F32")) {
            float f;
            memcpy(&f, p + 4 * i, 4);
            v[i] = f;
        } else if (!strcmp(t->dtype, "BF16")) {
            uint32_t u = (uint32_t)(p[2 * i] | (p[2 * i + 1] << 8)) << 16;
            float f;
            memcpy(&f, &u, 4);
            v[i] = f;
        } else if (!strcmp(t->dtype, "F16")) {
            v[i] = half_to_double((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        } else {
            v[i] = NAN;
        }
    }
    return v;
}

/* ---- rounding ------------------------------------------------------------------------------------ */
static void fmt_params(const char *dt, int *mb, int *emin, double *vmax)
{
    if (!strcmp(dt, "BF16")) {
        *mb = 7;
        *emin = -126;
        *vmax = ldexp(2.0 - ldexp(1, -7), 127);
    } else if (!strcmp(dt, "F16")) {
        *mb = 10;
        *emin = -14;
        *vmax = 65504.0;
    } else {
        *mb = 23;
        *emin = -126;
        *vmax = ldexp(2.0 - ldexp(1, -23), 127);
    }
}

double th_spacing(double x, const char *dtype)
{
    int mb, emin;
    double vmax;
    fmt_params(dtype, &mb, &emin, &vmax);
    x = fabs(x);
    int e;
    frexp(x, &e);
    e = x == 0 ? emin : (e - 1 < emin ? emin : e - 1);
    return ldexp(1.0, e - mb);
}

float th_near_mid(float x, int bf16, int off)
{
    union { float f; uint32_t u; } v = {.f = x};
    v.u = bf16 ? (v.u & 0xFFFF0000u) | 0x8000u : (v.u & 0xFFFFE000u) | 0x1000u;
    v.u += (uint32_t)off;
    return v.f;
}

double th_round_to(double x, const char *dtype)
{
    if (!isfinite(x))
        return x;
    int mb, emin;
    double vmax;
    fmt_params(dtype, &mb, &emin, &vmax);
    double q = th_spacing(x, dtype);
    double y = rint(x / q) * q;
    if (fabs(x) >= vmax + th_spacing(vmax, dtype) / 2)
        y = copysign(INFINITY, x);
    return y;
}

uint64_t th_encode(double x, const char *dtype)
{
    double y = th_round_to(x, dtype);
    if (!strcmp(dtype, "F64")) {
        uint64_t u;
        memcpy(&u, &x, 8);
        return u;
    }
    if (!strcmp(dtype, "F32") || !strcmp(dtype, "BF16")) {
        float f = (float)y; /* exact: y is representable */
        uint32_t u;
        memcpy(&u, &f, 4);
        if (isnan(y))
            u = 0x7fc00000u;
        return !strcmp(dtype, "BF16") ? (u >> 16) : u;
    }
    /* F16 */
    uint16_t s = signbit(y) ? 0x8000 : 0;
    if (isnan(y))
        return 0x7e00;
    if (isinf(y))
        return s | 0x7c00;
    double a = fabs(y);
    if (a == 0)
        return s;
    int e;
    frexp(a, &e);
    int E = e - 1;
    if (E < -14)
        return s | (uint16_t)(a / ldexp(1, -24));
    return s | (uint16_t)((E + 15) << 10) | (uint16_t)((a / ldexp(1, E) - 1.0) * 1024.0);
}

int th_st_write(const char *path, const th_out_tensor *t, size_t n)
{
    return th_st_write_meta(path, t, n, NULL, NULL, 0);
}

int th_st_write_meta(const char *path, const th_out_tensor *t, size_t n, const char *const *meta_keys,
                     const char *const *meta_values, size_t n_meta)
{
    cJSON *root = cJSON_CreateObject();
    uint64_t off = 0;
    if (n_meta > 0) {
        cJSON *md = cJSON_AddObjectToObject(root, "__metadata__");
        for (size_t i = 0; i < n_meta; i++)
            cJSON_AddStringToObject(md, meta_keys[i], meta_values[i]);
    }
    for (size_t i = 0; i < n; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "dtype", t[i].dtype);
        cJSON *sh = cJSON_AddArrayToObject(e, "shape");
        uint64_t ne = 1;
        for (int d = 0; d < t[i].n_dims; d++) {
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t[i].shape[d]));
            ne *= t[i].shape[d];
        }
        uint64_t nb = ne * (uint64_t)dtype_size(t[i].dtype);
        cJSON *of = cJSON_AddArrayToObject(e, "data_offsets");
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)(off + nb)));
        off += nb;
        cJSON_AddItemToObject(root, t[i].name, e);
    }
    char *hdr = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    size_t hl = strlen(hdr), padded = (hl + 7) / 8 * 8;
    FILE *f = fopen(path, "wb");
    if (f == NULL) {
        free(hdr);
        return -1;
    }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)(padded >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(hdr, 1, hl, f);
    for (size_t i = hl; i < padded; i++)
        fputc(' ', f);
    free(hdr);
    for (size_t i = 0; i < n; i++) {
        uint64_t ne = 1;
        for (int d = 0; d < t[i].n_dims; d++)
            ne *= t[i].shape[d];
        int es = dtype_size(t[i].dtype);
        uint8_t *buf = malloc(ne * (uint64_t)es + 1);
        for (uint64_t k = 0; k < ne; k++) {
            uint64_t bits;
            if (t[i].dtype[0] == 'I' || t[i].dtype[0] == 'U') /* integers: the value, two's complement */
                bits = (uint64_t)(int64_t)llround(t[i].values[k]);
            else
                bits = th_encode(t[i].values[k], t[i].dtype);
            if (!strcmp(t[i].dtype, "F64"))
                memcpy(&bits, &t[i].values[k], 8);
            for (int b = 0; b < es; b++)
                buf[k * (uint64_t)es + (uint64_t)b] = (uint8_t)((bits >> (8 * b)) & 0xff);
        }
        fwrite(buf, 1, ne * (uint64_t)es, f);
        free(buf);
    }
    return fclose(f) == 0 ? 0 : -1;
}

/* ---- torch.save() zips ---------------------------------------------------------------------------- */
typedef struct {
    uint8_t *b;
    size_t n, cap;
} th_pk;

static void pk_bytes(th_pk *p, const void *d, size_t n)
{
    if (p->n + n > p->cap) {
        p->cap = 2 * (p->n + n) + 256;
        p->b = realloc(p->b, p->cap);
    }
    memcpy(p->b + p->n, d, n);
    p->n += n;
}

static void pk_op(th_pk *p, int op)
{
    uint8_t c = (uint8_t)op;
    pk_bytes(p, &c, 1);
}

static void pk_text(th_pk *p, const char *s) /* BINUNICODE */
{
    uint32_t n = (uint32_t)strlen(s);
    uint8_t h[5] = {'X', (uint8_t)n, (uint8_t)(n >> 8), (uint8_t)(n >> 16), (uint8_t)(n >> 24)};
    pk_bytes(p, h, 5);
    pk_bytes(p, s, n);
}

static void pk_uint(th_pk *p, uint64_t v) /* BININT (v < 2^31) or LONG1 */
{
    if (v < (1u << 31)) {
        uint8_t h[5] = {'J', (uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
        pk_bytes(p, h, 5);
    } else {
        uint8_t h[11] = {0x8a, 9};
        for (int i = 0; i < 8; i++)
            h[2 + i] = (uint8_t)(v >> (8 * i));
        pk_bytes(p, h, 11);
    }
}

static void pk_global(th_pk *p, const char *module, const char *name)
{
    pk_op(p, 'c');
    pk_bytes(p, module, strlen(module));
    pk_op(p, '\n');
    pk_bytes(p, name, strlen(name));
    pk_op(p, '\n');
}

static void pk_tensor(th_pk *p, const th_out_tensor *t, size_t key, int as_parameter, const char *location)
{
    const char *type = !strcmp(t->dtype, "F16") ? "HalfStorage" : !strcmp(t->dtype, "BF16") ? "BFloat16Storage"
                                                                                           : "FloatStorage";
    uint64_t numel = 1, stride[8];
    for (int d = t->n_dims - 1; d >= 0; d--) {
        stride[d] = numel;
        numel *= t->shape[d];
    }
    char k[32];
    snprintf(k, sizeof k, "%zu", key);
    if (as_parameter)
        pk_global(p, "torch._utils", "_rebuild_parameter");
    if (as_parameter)
        pk_op(p, '(');
    pk_global(p, "torch._utils", "_rebuild_tensor_v2");
    pk_op(p, '(');
    pk_op(p, '(');
    pk_text(p, "storage");
    pk_global(p, "torch", type);
    pk_text(p, k);
    pk_text(p, location);
    pk_uint(p, numel);
    pk_op(p, 't');
    pk_op(p, 'Q');
    pk_uint(p, 0);
    pk_op(p, '(');
    for (int d = 0; d < t->n_dims; d++)
        pk_uint(p, t->shape[d]);
    pk_op(p, 't');
    pk_op(p, '(');
    for (int d = 0; d < t->n_dims; d++)
        pk_uint(p, stride[d]);
    pk_op(p, 't');
    pk_op(p, 0x89);
    pk_global(p, "collections", "OrderedDict");
    pk_op(p, ')');
    pk_op(p, 'R');
    pk_op(p, 't');
    pk_op(p, 'R');
    if (as_parameter) {
        pk_op(p, 0x88);
        pk_global(p, "collections", "OrderedDict");
        pk_op(p, ')');
        pk_op(p, 'R');
        pk_op(p, 't');
        pk_op(p, 'R');
    }
}

int th_torch_save(const char *path, int root, const th_out_tensor *t, size_t n, int as_parameter,
                  const char *location)
{
    th_pk p = {0};
    pk_op(&p, 0x80);
    pk_op(&p, 2);
    if (root == 0) {
        pk_op(&p, '}');
        pk_op(&p, '(');
    } else if (root == 1) {
        pk_op(&p, ']');
        pk_op(&p, '(');
    }
    for (size_t i = 0; i < n; i++) {
        if (root == 0)
            pk_text(&p, t[i].name);
        pk_tensor(&p, &t[i], i, as_parameter, location);
    }
    if (root == 0)
        pk_op(&p, 'u');
    else if (root == 1)
        pk_op(&p, 'e');
    pk_op(&p, '.');
    /* the archive folder is the file's stem, as torch.save names it */
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    char prefix[128];
    snprintf(prefix, sizeof prefix, "%.*s", (int)strcspn(base, "."), base);
    int zerr = 0;
    zip_t *za = zip_open(path, ZIP_CREATE | ZIP_TRUNCATE, &zerr);
    if (za == NULL) {
        free(p.b);
        return -1;
    }
    char name[256];
    uint8_t **bufs = calloc(n + 1, sizeof *bufs);
    snprintf(name, sizeof name, "%s/data.pkl", prefix);
    zip_int64_t idx = zip_file_add(za, name, zip_source_buffer(za, p.b, p.n, 0), ZIP_FL_ENC_UTF_8);
    zip_set_file_compression(za, (zip_uint64_t)idx, ZIP_CM_STORE, 0);
    for (size_t i = 0; i < n; i++) {
        uint64_t ne = 1;
        for (int d = 0; d < t[i].n_dims; d++)
            ne *= t[i].shape[d];
        int es = dtype_size(t[i].dtype);
        bufs[i] = malloc(ne * (uint64_t)es + 1);
        for (uint64_t k = 0; k < ne; k++) {
            uint64_t bits = th_encode(t[i].values[k], t[i].dtype);
            for (int b = 0; b < es; b++)
                bufs[i][k * (uint64_t)es + (uint64_t)b] = (uint8_t)((bits >> (8 * b)) & 0xff);
        }
        snprintf(name, sizeof name, "%s/data/%zu", prefix, i);
        idx = zip_file_add(za, name, zip_source_buffer(za, bufs[i], ne * (uint64_t)es, 0), ZIP_FL_ENC_UTF_8);
        zip_set_file_compression(za, (zip_uint64_t)idx, ZIP_CM_STORE, 0);
    }
    snprintf(name, sizeof name, "%s/version", prefix);
    idx = zip_file_add(za, name, zip_source_buffer(za, "3\n", 2, 0), ZIP_FL_ENC_UTF_8);
    int rc = zip_close(za) == 0 ? 0 : -1;
    for (size_t i = 0; i < n; i++)
        free(bufs[i]);
    free(bufs);
    free(p.b);
    return rc;
}

/* ---- the golden rule ---------------------------------------------------------------------------- */
th_cmp th_compare(const char *dt, const double *out, const double *ref, size_t n)
{
    th_cmp c;
    memset(&c, 0, sizeof c);
    c.ok = 1;
    c.nearest_frac = 1.0;
    double maxref = 0, sumref = 0;
    size_t n_fin = 0, n_exact = 0;
    for (size_t i = 0; i < n; i++) {
        if (isfinite(ref[i]) != isfinite(out[i]) ||
            (!isfinite(ref[i]) && !(isnan(ref[i]) ? isnan(out[i]) : out[i] == ref[i]))) {
            c.ok = 0;
            snprintf(c.why, sizeof c.why, "non-finite values differ at element %zu", i);
            return c;
        }
        if (isfinite(ref[i])) {
            maxref = fmax(maxref, fabs(ref[i]));
            sumref += fabs(ref[i]);
            n_fin++;
        }
    }
    if (n_fin == 0)
        return c;
    int lowp = !strcmp(dt, "BF16") || !strcmp(dt, "F16");
    if (lowp) {
        double slack = ldexp(1, -20) * maxref;
        for (size_t i = 0; i < n; i++) {
            if (!isfinite(ref[i]))
                continue;
            double err = fabs(out[i] - ref[i]), near = th_round_to(ref[i], dt);
            double ulp = fmax(th_spacing(ref[i], dt), th_spacing(near, dt));
            if (err > ulp + slack)
                c.n_beyond++;
            if (out[i] == near || err <= fabs(near - ref[i]) + slack)
                n_exact++;
            else
                c.n_off++;
            c.max_ulp = fmax(c.max_ulp, err / ulp);
        }
        c.nearest_frac = (double)n_exact / (double)n_fin;
        c.ok = c.n_beyond == 0 && c.nearest_frac >= 0.999;
        if (!c.ok)
            snprintf(c.why, sizeof c.why, "max %.3g ulp, %zu beyond 1 ulp, nearest %.4f%%", c.max_ulp, c.n_beyond,
                     100 * c.nearest_frac);
        return c;
    }
    c.tol = (!strcmp(dt, "F32") ? 1e-5 : 1e-12) * (sumref / (double)n_fin);
    for (size_t i = 0; i < n; i++)
        if (isfinite(ref[i]))
            c.max_abs_err = fmax(c.max_abs_err, fabs(out[i] - ref[i]));
    c.ok = c.max_abs_err <= c.tol;
    if (!c.ok)
        snprintf(c.why, sizeof c.why, "max abs err %.3g > tol %.3g", c.max_abs_err, c.tol);
    return c;
}

uint64_t th_rand_u64(uint64_t *s)
{
    uint64_t x = (*s += 0x9E3779B97F4A7C15ull);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

double th_rand_uniform(uint64_t *s)
{
    return (double)(th_rand_u64(s) >> 11) * ldexp(1, -52) - 1.0;
}

double th_rand_normal(uint64_t *s)
{
    double u1 = ((double)(th_rand_u64(s) >> 11) + 0.5) * ldexp(1, -53);
    double u2 = (double)(th_rand_u64(s) >> 11) * ldexp(1, -53);
    return sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
}

/* The model a directory holds: every tensor of its shards (through the index, or model.safetensors)
 * equal to those of ref_a (1), of ref_b (2); 0 when it holds no model (no index, no
 * model.safetensors); -1 for anything else: a mixed or broken model. */
int th_model_is(const char *dir, const char *ref_a, const char *ref_b)
{
    char p[1400];
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    size_t n;
    char *js = (char *)th_read_file(p, &n);
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    if (js == NULL && !th_exists(p))
        return 0;
    const char *refs[2] = {ref_a, ref_b};
    int verdict = -1;
    for (int k = 0; k < 2 && verdict < 0; k++) {
        th_st ref;
        if (th_st_read(refs[k], &ref) != 0)
            return -1;
        int same = 1;
        if (js == NULL) {
            same = th_files_equal(p, refs[k]);
        } else {
            cJSON *idx = cJSON_ParseWithLength(js, n);
            const cJSON *map = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
            same = map != NULL && (size_t)cJSON_GetArraySize(map) == ref.n;
            for (size_t i = 0; i < ref.n && same; i++) {
                const cJSON *f = cJSON_GetObjectItemCaseSensitive(map, ref.t[i].name);
                char sp[1400];
                th_st sh;
                if (!cJSON_IsString(f) || th_path(sp, sizeof sp, dir, f->valuestring) != 0 || th_st_read(sp, &sh) != 0) {
                    same = 0;
                    break;
                }
                const th_tensor *t = th_st_find(&sh, ref.t[i].name);
                same = t != NULL && t->n_bytes == ref.t[i].n_bytes && memcmp(t->data, ref.t[i].data, t->n_bytes) == 0;
                th_st_free(&sh);
            }
            cJSON_Delete(idx);
        }
        th_st_free(&ref);
        if (same)
            verdict = k + 1;
    }
    free(js);
    return verdict;
}

/* names in dir that a run leaves only while it runs: stages and temporary files */
int th_count_temps(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        n += strstr(de->d_name, ".lm-tmp-") != NULL || strncmp(de->d_name, ".lora-merge-stage.", 18) == 0;
    closedir(d);
    return n;
}

static int name_cmp(const void *x, const void *y) { return strcmp(*(char *const *)x, *(char *const *)y); }

/* the names in dir but . and .., sorted (malloc'd, *n of them); NULL when dir cannot be read */
static char **sorted_names(const char *dir, size_t *n)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return NULL;
    size_t cap = 16;
    char **v = malloc(cap * sizeof *v);
    *n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (*n == cap)
            v = realloc(v, (cap *= 2) * sizeof *v);
        v[(*n)++] = strdup(de->d_name);
    }
    closedir(d);
    qsort(v, *n, sizeof *v, name_cmp);
    return v;
}

static void free_names(char **v, size_t n)
{
    for (size_t i = 0; v != NULL && i < n; i++)
        free(v[i]);
    free(v);
}

int th_same_tree(const char *a, const char *b)
{
    struct stat sa, sb;
    if (lstat(a, &sa) != 0 || lstat(b, &sb) != 0)
        return 0;
    if (S_ISREG(sa.st_mode) && S_ISREG(sb.st_mode))
        return th_files_equal(a, b);
    if (!S_ISDIR(sa.st_mode) || !S_ISDIR(sb.st_mode))
        return 0;
    size_t na = 0, nb = 0;
    char **va = sorted_names(a, &na), **vb = sorted_names(b, &nb);
    int same = va != NULL && vb != NULL && na == nb;
    for (size_t i = 0; same && i < na; i++) {
        char pa[4096], pb[4096];
        same = strcmp(va[i], vb[i]) == 0 && th_path(pa, sizeof pa, a, va[i]) == 0 &&
               th_path(pb, sizeof pb, b, vb[i]) == 0 && th_same_tree(pa, pb);
    }
    free_names(va, na);
    free_names(vb, nb);
    return same;
}

int th_copy_tree(const char *from, const char *to)
{
    struct stat st;
    if (lstat(from, &st) != 0)
        return -1;
    if (S_ISREG(st.st_mode)) {
        size_t n;
        uint8_t *b = th_read_file(from, &n);
        int rc = b != NULL ? th_write_file(to, b, n) : -1;
        free(b);
        return rc;
    }
    if (!S_ISDIR(st.st_mode) || mkdir(to, 0777) != 0)
        return -1;
    size_t n = 0;
    char **v = sorted_names(from, &n);
    int rc = v != NULL ? 0 : -1;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        char pf[4096], pt[4096];
        rc = th_path(pf, sizeof pf, from, v[i]) == 0 && th_path(pt, sizeof pt, to, v[i]) == 0 ? th_copy_tree(pf, pt)
                                                                                              : -1;
    }
    free_names(v, n);
    return rc;
}

void th_qgen(th_qfx *f, const char *args)
{
    char gen[1200], cmd[4000];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s (build it: make BUILD=... <build>/bench/gen_model)", gen);
    f->tmp = th_tmpdir();
    snprintf(cmd, sizeof cmd, "'%s' --out '%s/m' %s 2>&1", gen, f->tmp, args);
    th_run_result r = th_sh(cmd);
    cr_assert_eq(r.status, 0, "gen_model failed: %s", r.out);
    th_run_free(&r);
    snprintf(f->base, sizeof f->base, "%s/m/base", f->tmp);
    snprintf(f->ad, sizeof f->ad, "%s/m/adapter", f->tmp);
}

void th_qfx_free(th_qfx *f)
{
    th_rmrf(f->tmp);
    free(f->tmp);
}

void th_quant_ref(const char *script, const char *args)
{
    th_run_result r = th_sh("/usr/bin/python3 -c 'import numpy' 2>&1");
    int ok = r.status == 0;
    th_run_free(&r);
    if (!ok)
        cr_skip_test("the independent reference needs /usr/bin/python3 with numpy (apt-get install python3-numpy)");
    char cmd[6000];
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 tests/quant/%s %s 2>&1", script, args);
    r = th_sh(cmd);
    cr_assert_eq(r.status, 0, "reference %s %s: %s", script, args, r.out);
    cr_log_info("%s %.80s: %s", script, args, r.out);
    th_run_free(&r);
}
