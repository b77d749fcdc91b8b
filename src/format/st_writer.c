/* SPDX-License-Identifier: MIT */
/* st_writer.c : safetensors writer with a precomputed header, temp file and rename
 * (see st_writer.h).  Also the signal-time cleanup of temporary files. */
#include "st_writer.h"

#include "compat.h"
#include "lm_error.h"
#include "lm_sha256.h"
#include "lm_xxh128.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
/* last: the allocations below go through the fault-injection seam */
#define LM_SYS_ALLOC
#include "lm_sys.h"

struct lm_st_writer {
    char *out_path;
    char *tmp_path;
    int fd;
    lm_cleanup_slot *cleanup_slot;
    int finished; /* lm_st_writer_finish() done: no more writes; fd kept (and locked) until the rename */
    int anon;     /* an O_TMPFILE file: no name until lm_st_writer_commit() links it (tmp_path NULL) */
    size_t n;
    uint64_t *offsets;  /* absolute */
    uint64_t *n_bytes;
    uint64_t file_bytes;
    uint64_t data_start; /* 8 + the header's length */
    struct writer_hash *hash; /* lm_st_writer_hash_begin(), or NULL */
    uint64_t db_step;    /* lm_st_writer_drop_behind(), or 0 */
    uint64_t db_last;    /* the end of the range last advised (atomic) */
    uint64_t hashed_to;  /* hashed: the end of the hashed prefix (atomic), the most drop-behind drops */
    struct writer_dio *dio; /* lm_st_writer_direct(), or NULL */
    int wrote_data;      /* a write other than the header's was made (lm_st_writer_direct then refused) */
};

/* ------------------------------------------------------------------------------------------ */
/* signal-time cleanup                                                                          */
/* ------------------------------------------------------------------------------------------ */
/* A list that only grows (nodes are reused, never freed), so that the handler can walk it at any
 * moment without a lock and there is no limit on the number of files (one per output shard). */
typedef struct cleanup_node {
    struct cleanup_node *next;
    volatile sig_atomic_t used; /* 1: path is to be removed; 2: path is a directory to empty and remove */
    int claimed;
    char path[PATH_MAX];
} cleanup_node;
static cleanup_node *volatile g_cleanup_head;

/* the signals whose default action ends the process without a core dump or with one: a temporary
 * file must not outlive any of them */
static const int g_cleanup_sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM,
                                     SIGXCPU, SIGVTALRM, SIGPROF};

struct lm_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* async-signal-safe: the entries of a stage directory (our files only), then the directory */
static void remove_dir_on_signal(const char *path)
{
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        char buf[4096] __attribute__((aligned(8)));
        for (;;) {
            long n = syscall(SYS_getdents64, dfd, buf, sizeof buf);
            if (n <= 0)
                break;
            for (long pos = 0; pos < n;) {
                struct lm_dirent64 *d = (struct lm_dirent64 *)(void *)(buf + pos);
                if (!(d->d_name[0] == '.' && (d->d_name[1] == '\0' || (d->d_name[1] == '.' && d->d_name[2] == '\0'))))
                    unlinkat(dfd, d->d_name, 0);
                pos += d->d_reclen;
            }
        }
        close(dfd);
    }
    rmdir(path);
}

static void cleanup_on_signal(int sig)
{
    int saved = errno;
    for (cleanup_node *c = g_cleanup_head; c != NULL; c = c->next)
        if (c->used == 1)
            unlink(c->path); /* async-signal-safe */
    for (cleanup_node *c = g_cleanup_head; c != NULL; c = c->next)
        if (c->used == 2)
            remove_dir_on_signal(c->path);
    errno = saved;
    signal(sig, SIG_DFL);
    raise(sig);
}

void lm_cleanup_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = cleanup_on_signal;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < LM_ARRAY_LEN(g_cleanup_sigs); i++) /* one handler at a time */
        sigaddset(&sa.sa_mask, g_cleanup_sigs[i]);
    for (size_t i = 0; i < LM_ARRAY_LEN(g_cleanup_sigs); i++) {
        /* a signal the caller ignores stays ignored: `nohup lora-merge ...` must survive the
         * hangup, a background job of a script its SIGINT */
        struct sigaction old;
        if (sigaction(g_cleanup_sigs[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN)
            continue;
        sigaction(g_cleanup_sigs[i], &sa, NULL);
    }
    signal(SIGXFSZ, SIG_IGN);
}

/* the signals whose handler removes the registered files: blocked while a temporary file is
 * created and registered, so that none can come in between */
static void cleanup_block(sigset_t *old)
{
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < LM_ARRAY_LEN(g_cleanup_sigs); i++)
        sigaddset(&set, g_cleanup_sigs[i]);
    pthread_sigmask(SIG_BLOCK, &set, old);
}

static void cleanup_unblock(const sigset_t *old)
{
    pthread_sigmask(SIG_SETMASK, old, NULL);
}

static lm_cleanup_slot *cleanup_register_as(const char *path, int kind)
{
    if (strlen(path) >= PATH_MAX)
        return NULL;
    cleanup_node *c;
    for (c = g_cleanup_head; c != NULL; c = c->next)
        /* claim a free node atomically: writers may be opened from several threads */
        if (__atomic_exchange_n(&c->claimed, 1, __ATOMIC_ACQ_REL) == 0)
            break;
    if (c == NULL) {
        if ((c = calloc(1, sizeof *c)) == NULL)
            return NULL;
        c->claimed = 1;
        cleanup_node *head = __atomic_load_n(&g_cleanup_head, __ATOMIC_ACQUIRE);
        do
            c->next = head;
        while (!__atomic_compare_exchange_n(&g_cleanup_head, &head, c, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    }
    snprintf(c->path, sizeof c->path, "%s", path);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    c->used = kind;
    return (lm_cleanup_slot *)c;
}

lm_cleanup_slot *lm_cleanup_register(const char *path) { return cleanup_register_as(path, 1); }
lm_cleanup_slot *lm_cleanup_register_dir(const char *path) { return cleanup_register_as(path, 2); }

void lm_cleanup_unregister(lm_cleanup_slot *slot)
{
    cleanup_node *c = (cleanup_node *)slot;
    if (c != NULL) {
        c->used = 0;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        __atomic_store_n(&c->claimed, 0, __ATOMIC_RELEASE);
    }
}

int lm_same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    if (stat(a, &sa) != 0 || stat(b, &sb) != 0)
        return 0;
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* ------------------------------------------------------------------------------------------ */
/* header                                                                                       */
/* ------------------------------------------------------------------------------------------ */
size_t lm_json_escape(char *buf, size_t used, size_t cap, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char tmp[7];
        size_t k;
        if (*p == '"' || *p == '\\') {
            tmp[0] = '\\';
            tmp[1] = (char)*p;
            k = 2;
        } else if (*p < 0x20) {
            tmp[0] = '\\';
            tmp[1] = 'u';
            tmp[2] = '0';
            tmp[3] = '0';
            tmp[4] = hex[*p >> 4];
            tmp[5] = hex[*p & 15];
            k = 6;
        } else {
            tmp[0] = (char)*p;
            k = 1;
        }
        if (used + k >= cap)
            return (size_t)-1;
        memcpy(buf + used, tmp, k);
        used += k;
    }
    buf[used] = '\0';
    return used;
}

typedef struct {
    char *buf;
    size_t used, cap;
    int oom;
} strbuf;

static void sb_reserve(strbuf *sb, size_t extra)
{
    if (sb->oom || sb->used + extra + 1 <= sb->cap)
        return;
    size_t cap = sb->cap ? sb->cap : 4096;
    while (cap < sb->used + extra + 1)
        cap *= 2;
    char *p = realloc(sb->buf, cap);
    if (p == NULL) {
        sb->oom = 1;
        return;
    }
    sb->buf = p;
    sb->cap = cap;
}

static void sb_puts(strbuf *sb, const char *s)
{
    size_t k = strlen(s);
    sb_reserve(sb, k);
    if (sb->oom)
        return;
    memcpy(sb->buf + sb->used, s, k + 1);
    sb->used += k;
}

static void sb_str(strbuf *sb, const char *s)
{
    sb_reserve(sb, strlen(s) * 6 + 2);
    if (sb->oom)
        return;
    sb->buf[sb->used++] = '"';
    sb->used = lm_json_escape(sb->buf, sb->used, sb->cap, s);
    sb->buf[sb->used++] = '"';
    sb->buf[sb->used] = '\0';
}

static void sb_u64(strbuf *sb, uint64_t v)
{
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)v);
    sb_puts(sb, tmp);
}

static lm_code tensor_bytes(const lm_out_tensor *t, uint64_t *out, lm_err *err)
{
    uint64_t n = 1, bits;
    for (size_t d = 0; d < t->n_dims; d++)
        if (lm_mul_overflow_u64(n, t->shape[d], &n))
            return lm_fail(err, LM_E_FORMAT, "ValidationOverflow", "tensor '%s': shape overflows", t->name);
    if (lm_mul_overflow_u64(n, lm_dtype_bits(t->dtype), &bits) || bits % 8 != 0)
        return lm_fail(err, LM_E_FORMAT, "MisalignedSlice", "tensor '%s': size is not whole bytes", t->name);
    *out = bits / 8;
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* open / write / commit                                                                        */
/* ------------------------------------------------------------------------------------------ */
static void hash_free(struct writer_hash *h);

static void dio_free(struct writer_dio *d);

static void writer_free(lm_st_writer *w)
{
    if (w == NULL)
        return;
    hash_free(w->hash);
    dio_free(w->dio);
    if (w->fd >= 0)
        close(w->fd);
    lm_cleanup_unregister(w->cleanup_slot);
    free(w->out_path);
    free(w->tmp_path);
    free(w->offsets);
    free(w->n_bytes);
    free(w);
}

void lm_st_writer_abort(lm_st_writer *w)
{
    if (w == NULL)
        return;
    if (w->tmp_path != NULL && !w->anon) /* an unnamed file goes with its descriptor */
        unlink(w->tmp_path);
    writer_free(w);
}

/* ".<name>.lm-tmp-XXXXXX" beside out_path; <name> is shortened (never inside a UTF-8
 * sequence) when the temporary name would pass NAME_MAX, so any valid OUT name can be written */
static char *temp_name_for(const char *out_path)
{
    static const char suffix[] = ".lm-tmp-XXXXXX";
    const char *slash = strrchr(out_path, '/');
    size_t dir_len = slash ? (size_t)(slash - out_path + 1) : 0;
    const char *base = slash ? slash + 1 : out_path;
    size_t base_len = strlen(base), max_base = NAME_MAX - 1 - (sizeof suffix - 1);
    if (base_len > max_base) {
        base_len = max_base;
        while (base_len > 0 && ((unsigned char)base[base_len] & 0xC0) == 0x80)
            base_len--;
    }
    size_t cap = strlen(out_path) + sizeof suffix + 2;
    char *t = malloc(cap);
    if (t != NULL)
        snprintf(t, cap, "%.*s.%.*s%s", (int)dir_len, out_path, (int)base_len, base, suffix);
    return t;
}

/* mkostemp, then flock(LOCK_EX) held until the file is closed: a temporary file whose lock is
 * free belongs to a dead process, and only such a file is ever removed by another run's cleanup
 * (lm_out_clean_stale_temps).  Should a cleanup remove the name between the creation and the
 * lock, the name no longer leads to our file: another name is tried. */
static int create_locked_temp(char *tmpl)
{
    size_t n = strlen(tmpl);
    for (int attempt = 0; attempt < 100; attempt++) {
        memcpy(tmpl + n - 6, "XXXXXX", 6);
        int fd = lm_sys_mkostemp(tmpl, O_CLOEXEC);
        if (fd < 0)
            return -1;
        struct stat a, b;
        if (lm_sys_flock(fd, LOCK_EX) == 0 && lm_sys_fstat(fd, &a) == 0 && stat(tmpl, &b) == 0 && a.st_dev == b.st_dev &&
            a.st_ino == b.st_ino)
            return fd;
        int e = errno;
        close(fd);
        if (e != ENOENT && e != 0) {
            unlink(tmpl);
            errno = e;
            return -1;
        }
    }
    errno = EEXIST;
    return -1;
}

/* An unnamed file (O_TMPFILE) in out_path's directory, flock'd: a SIGKILL leaves nothing at all
 * (the kernel frees it); it gets a name only at the commit.  -1 where the file system has no
 * O_TMPFILE (or LM_NO_TMPFILE is set: the tests run the named fallback that way). */
static int create_anon_temp(const char *out_path)
{
    if (getenv("LM_NO_TMPFILE") != NULL)
        return -1;
    const char *slash = strrchr(out_path, '/');
    char *dir = slash == NULL ? strdup(".") : slash == out_path ? strdup("/")
              : strndup(out_path, (size_t)(slash - out_path));
    int fd = dir ? lm_sys_open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600) : -1;
    free(dir);
    if (fd >= 0 && lm_sys_flock(fd, LOCK_EX) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

/* gives the unnamed file w->fd the name w->tmp_path (".<name>.lm-tmp-XXXXXX", a fresh suffix),
 * registered for signal-time cleanup; the file stays locked, so no other run's cleanup takes it */
static int link_anon_temp(lm_st_writer *w)
{
    static const char digits[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    static unsigned long seq;
    size_t n = strlen(w->tmp_path);
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", w->fd);
    for (int attempt = 0; attempt < 100; attempt++) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        unsigned long v = (unsigned long)ts.tv_nsec ^ ((unsigned long)getpid() << 20) ^
                          (__atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED) * 2654435761ul);
        for (int i = 0; i < 6; i++, v /= 62)
            w->tmp_path[n - 6 + (size_t)i] = digits[v % 62];
        sigset_t old_mask;
        cleanup_block(&old_mask);
        int rc = lm_sys_linkat(AT_FDCWD, proc, AT_FDCWD, w->tmp_path, AT_SYMLINK_FOLLOW);
        if (rc != 0 && errno != EEXIST) /* no /proc: the same by the descriptor (needs privilege) */
            rc = lm_sys_linkat(w->fd, "", AT_FDCWD, w->tmp_path, AT_EMPTY_PATH);
        int e = errno;
        if (rc == 0)
            w->cleanup_slot = lm_cleanup_register(w->tmp_path);
        cleanup_unblock(&old_mask);
        if (rc == 0)
            return 0;
        if (e != EEXIST) {
            errno = e;
            return -1;
        }
    }
    errno = EEXIST;
    return -1;
}

/* the writer's layout: offsets, sizes and the header text in *sb (no file yet) */
static lm_st_writer *writer_layout(const char *out_path, const lm_out_tensor *tensors, size_t n,
                                   const size_t *data_order, const char *const *meta_keys,
                                   const char *const *meta_values, size_t n_meta, strbuf *sb_out, lm_err *err)
{
    size_t out_len = out_path ? strlen(out_path) : 0;
    if (out_len == 0 || out_path[out_len - 1] == '/') {
        /* nothing could be renamed there: refuse before creating anything */
        lm_fail(err, LM_E_USAGE, "InvalidOutput", out_len == 0 ? "the output path is empty"
                                                               : "the output path ends with '/': give a file name");
        if (out_len > 0)
            lm_err_set_path(err, out_path);
        return NULL;
    }
    lm_st_writer *w = calloc(1, sizeof *w);
    strbuf sb = {0};
    if (w == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    w->fd = -1;
    w->cleanup_slot = NULL;
    w->n = n;
    w->out_path = strdup(out_path);
    w->offsets = calloc(n ? n : 1, sizeof *w->offsets);
    w->n_bytes = calloc(n ? n : 1, sizeof *w->n_bytes);
    if (w->out_path == NULL || w->offsets == NULL || w->n_bytes == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    /* relative offsets in data order */
    uint64_t pos = 0;
    for (size_t k = 0; k < n; k++) {
        size_t i = data_order ? data_order[k] : k;
        if (tensor_bytes(&tensors[i], &w->n_bytes[i], err) != LM_OK)
            goto fail;
        w->offsets[i] = pos;
        if (lm_add_overflow_u64(pos, w->n_bytes[i], &pos)) {
            lm_fail(err, LM_E_FORMAT, "ValidationOverflow", "output size overflows");
            goto fail;
        }
    }
    /* header JSON */
    sb_puts(&sb, "{");
    if (n_meta > 0) {
        sb_puts(&sb, "\"__metadata__\":{");
        for (size_t m = 0; m < n_meta; m++) {
            if (m)
                sb_puts(&sb, ",");
            sb_str(&sb, meta_keys[m]);
            sb_puts(&sb, ":");
            sb_str(&sb, meta_values[m]);
        }
        sb_puts(&sb, "}");
    }
    for (size_t i = 0; i < n; i++) {
        if (i || n_meta)
            sb_puts(&sb, ",");
        sb_str(&sb, tensors[i].name);
        sb_puts(&sb, ":{\"dtype\":\"");
        sb_puts(&sb, lm_dtype_name(tensors[i].dtype));
        sb_puts(&sb, "\",\"shape\":[");
        for (size_t d = 0; d < tensors[i].n_dims; d++) {
            if (d)
                sb_puts(&sb, ",");
            sb_u64(&sb, tensors[i].shape[d]);
        }
        sb_puts(&sb, "],\"data_offsets\":[");
        sb_u64(&sb, w->offsets[i]);
        sb_puts(&sb, ",");
        sb_u64(&sb, w->offsets[i] + w->n_bytes[i]);
        sb_puts(&sb, "]}");
    }
    sb_puts(&sb, "}");
    while (!sb.oom && sb.used % 8 != 0)
        sb_puts(&sb, " ");
    if (sb.oom) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory building the header");
        goto fail;
    }
    uint64_t header_len = sb.used;
    for (size_t i = 0; i < n; i++)
        w->offsets[i] += 8 + header_len;
    w->file_bytes = 8 + header_len + pos;
    w->data_start = 8 + header_len;
    *sb_out = sb;
    return w;
fail:
    free(sb.buf);
    lm_st_writer_abort(w);
    return NULL;
}

lm_code lm_st_layout_bytes(const lm_out_tensor *tensors, size_t n, const size_t *data_order,
                           const char *const *meta_keys, const char *const *meta_values, size_t n_meta,
                           uint64_t *file_bytes, lm_err *err)
{
    strbuf sb = {0};
    lm_st_writer *w = writer_layout("layout", tensors, n, data_order, meta_keys, meta_values, n_meta, &sb, err);
    if (w == NULL)
        return err ? err->code : LM_E_NOMEM;
    *file_bytes = w->file_bytes;
    free(sb.buf);
    lm_st_writer_abort(w);
    return LM_OK;
}

lm_st_writer *lm_st_writer_open(const char *out_path, const lm_out_tensor *tensors, size_t n,
                                const size_t *data_order, const char *const *meta_keys,
                                const char *const *meta_values, size_t n_meta, lm_err *err)
{
    strbuf sb = {0};
    lm_st_writer *w = writer_layout(out_path, tensors, n, data_order, meta_keys, meta_values, n_meta, &sb, err);
    if (w == NULL)
        return NULL;
    uint64_t header_len = sb.used;

    /* temporary file beside the destination */
    w->tmp_path = temp_name_for(out_path);
    if (w->tmp_path == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    if ((w->fd = create_anon_temp(out_path)) >= 0) {
        w->anon = 1; /* tmp_path is the template of the name it gets at the commit */
    } else {
        sigset_t old_mask;
        cleanup_block(&old_mask);
        w->fd = create_locked_temp(w->tmp_path);
        int mk_errno = errno;
        if (w->fd >= 0)
            w->cleanup_slot = lm_cleanup_register(w->tmp_path);
        cleanup_unblock(&old_mask);
        errno = mk_errno;
    }
    int mk_errno = errno;
    if (w->fd < 0) {
        int e = mk_errno;
        free(w->tmp_path);
        w->tmp_path = NULL;
        lm_fail_errno(err, e, "cannot create the output file in its directory");
        lm_err_set_path(err, out_path);
        goto fail;
    }
    /* reserve the space now so a full disk is found before the work starts */
    if (w->file_bytes > 0) {
        int rc = lm_sys_fallocate(w->fd, (off_t)w->file_bytes);
        if (rc == EOPNOTSUPP || rc == EINVAL) {
            if (ftruncate(w->fd, (off_t)w->file_bytes) != 0)
                rc = errno;
            else
                rc = 0;
        }
        if (rc != 0) {
            lm_fail_errno(err, rc, "cannot reserve %llu bytes for the output",
                          (unsigned long long)w->file_bytes);
            lm_err_set_path(err, out_path);
            goto fail;
        }
    }
    uint8_t len8[8];
    lm_store_le64(len8, header_len);
    if (lm_st_writer_pwrite(w, len8, 8, 0, err) != LM_OK ||
        lm_st_writer_pwrite(w, sb.buf, sb.used, 8, err) != LM_OK)
        goto fail;
    free(sb.buf);
    w->wrote_data = 0; /* the header only */
    return w;
fail:
    free(sb.buf);
    lm_st_writer_abort(w);
    return NULL;
}

uint64_t lm_st_writer_tensor_offset(const lm_st_writer *w, size_t i) { return w->offsets[i]; }
uint64_t lm_st_writer_tensor_bytes(const lm_st_writer *w, size_t i) { return w->n_bytes[i]; }
uint64_t lm_st_writer_file_bytes(const lm_st_writer *w) { return w->file_bytes; }
int lm_st_writer_fd(const lm_st_writer *w) { return w->fd; }
const char *lm_st_writer_temp_path(const lm_st_writer *w) { return w->anon ? NULL : w->tmp_path; }
const char *lm_st_writer_out_path(const lm_st_writer *w) { return w->out_path; }

static void hash_written(lm_st_writer *w, const uint8_t *buf, uint64_t off, uint64_t n);

/* Drop-behind: the pages of the file well behind a write are handed to the disk and, once written
 * back, dropped from the page cache, so that the next writes reuse the same memory.  A batch's K
 * outputs are more than the page cache holds: without it, every page it writes is one the kernel
 * has to find (fresh memory, which on a virtual machine that returns free memory to its host costs
 * a host fault per page: several times the copy), and the page cache fills with outputs that push
 * the base out.  POSIX_FADV_DONTNEED starts the write-back of the dirty pages in its range (without
 * waiting for it) and drops the clean ones; the range [end - 2 step - 4 step, end - 2 step) behind
 * each write, advised once per step of progress, sees each page four times: the first starts its
 * write-back, a later one drops it.  Pages still dirty or under write-back when the window has
 * passed them are left to the kernel's own write-back and reclaim.  Only an advice: the bytes
 * written never depend on it (a page dropped before a later write fills the rest of it is read
 * back by the kernel).
 * A file hashed as it is written (lm_st_writer_hash_begin) is dropped only behind its hashed
 * prefix: the bytes there are all written and hashed, while those ahead of it are still to be
 * read back from the page cache (the in-kernel copies).  When the prefix jumps ahead (a copy read
 * back at once), the window reaches back to the range last advised, so that each page of the
 * jump is advised at least once. */
void lm_st_writer_drop_behind(lm_st_writer *w, uint64_t step) { w->db_step = step; }

static void drop_behind(lm_st_writer *w, uint64_t end)
{
    const uint64_t step = w->db_step, lag = 2 * step;
    if (step == 0)
        return;
    if (w->hash != NULL) { /* not beyond the hashed prefix: b <= hashed_to below */
        const uint64_t h = __atomic_load_n(&w->hashed_to, __ATOMIC_ACQUIRE);
        end = end < h + lag ? end : h + lag;
    }
    if (end < lag + step)
        return;
    const uint64_t b = (end - lag) / step * step;
    uint64_t last = __atomic_load_n(&w->db_last, __ATOMIC_RELAXED);
    if (b == last || !__atomic_compare_exchange_n(&w->db_last, &last, b, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return; /* this step advised already (or by another thread just now) */
    uint64_t a = b > 4 * step ? b - 4 * step : 0;
    if (w->hash != NULL && last < a) /* the prefix jumped: every byte below b is written and hashed */
        a = last;
    (void)posix_fadvise(w->fd, (off_t)a, (off_t)(b - a), POSIX_FADV_DONTNEED);
}

/* n_bytes at offset through fd: retries short writes; EFBIG, ENOSPC ... an error naming the output */
static lm_code write_all(const lm_st_writer *w, int fd, const uint8_t *p, size_t n_bytes, uint64_t offset, lm_err *err)
{
    while (n_bytes > 0) {
        size_t chunk = n_bytes > ((size_t)1 << 30) ? ((size_t)1 << 30) : n_bytes;
        ssize_t k = lm_sys_pwrite(fd, p, chunk, (off_t)offset);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            if (e == EINVAL && fd != w->fd)
                return LM_E_UNSUPPORTED; /* direct I/O refused here (err untouched): written plainly */
            lm_fail_errno(err, e, "write failed at byte %llu", (unsigned long long)offset);
            lm_err_set_path(err, w->out_path);
            return LM_E_IO;
        }
        if (k == 0) {
            lm_fail(err, LM_E_IO, NULL, "write made no progress at byte %llu", (unsigned long long)offset);
            lm_err_set_path(err, w->out_path);
            return LM_E_IO;
        }
        p += k;
        n_bytes -= (size_t)k;
        offset += (uint64_t)k;
    }
    return LM_OK;
}

static lm_code dio_pwrite(lm_st_writer *w, const uint8_t *buf, uint64_t n, uint64_t off, lm_err *err);

lm_code lm_st_writer_pwrite(lm_st_writer *w, const void *buf, size_t n_bytes, uint64_t offset,
                            lm_err *err)
{
    if (!__atomic_load_n(&w->wrote_data, __ATOMIC_RELAXED)) /* once: no shared line written per call */
        __atomic_store_n(&w->wrote_data, 1, __ATOMIC_RELAXED);
    if (w->dio != NULL)
        return dio_pwrite(w, buf, n_bytes, offset, err);
    lm_code rc = write_all(w, w->fd, buf, n_bytes, offset, err);
    if (rc != LM_OK)
        return rc;
    if (w->hash != NULL) /* once the bytes are in the file (another thread's catch-up may read them) */
        hash_written(w, buf, offset, n_bytes);
    drop_behind(w, offset + n_bytes);
    return LM_OK;
}

/* ---- direct I/O (lm_st_writer_direct): the bytes go from the caller's buffer to the disk, not
 * through the page cache.  Only whole pages (DIO_PAGE, at offsets that are multiples of it) are
 * written so: a write's first and last pages, when it starts or ends inside one, are shared with the
 * neighbouring writes (tensors and tiles start anywhere), so their bytes are kept here (pages, one
 * per partial page, its bytes so far) and the page is written once it has all of them; a page shared
 * with the header gets the header's bytes when direct I/O is turned on, and the file's last page, when
 * it ends inside one, is written plainly once complete (a direct write would have to write past the
 * end).  So every page is written exactly once, whole, by one write: no page is both in the page
 * cache and written directly.  The whole pages come from the caller's buffer when its address is a
 * multiple of DIO_PAGE there (the executor places its tiles so: address == file offset modulo
 * DIO_PAGE), else through a bounce buffer.  What is hashed (lm_st_writer_hash_begin) is told once in
 * the file: the whole pages after their write, a kept page once written. */
#define DIO_PAGE ((uint64_t)4096)
#define DIO_BOUNCE ((size_t)1 << 20) /* a bounce buffer's bytes (plus a page: placed as the write) */

typedef struct {
    uint64_t page;  /* bytes [page * DIO_PAGE, + DIO_PAGE) */
    uint64_t have;  /* of them given so far (writes never overlap) */
    uint8_t *bytes; /* DIO_PAGE, aligned; zero where nothing was given */
} dio_page;

struct writer_dio {
    int fd; /* the file again, opened O_DIRECT */
    pthread_mutex_t mu;
    dio_page *p; /* the pages kept, unsorted (few at a time: the writes' fronts) */
    size_t n_p, cap_p;
    uint8_t **spare; /* page buffers free for reuse */
    size_t n_spare, cap_spare;
    uint8_t **bounce; /* bounce buffers free for reuse (DIO_BOUNCE + DIO_PAGE, aligned) */
    size_t n_bounce, cap_bounce;
    int plain; /* a direct write was refused (EINVAL): plain writes from then on (atomic) */
};

static void dio_free(struct writer_dio *d)
{
    if (d == NULL)
        return;
    if (d->fd >= 0)
        close(d->fd);
    pthread_mutex_destroy(&d->mu);
    for (size_t i = 0; i < d->n_p; i++)
        free(d->p[i].bytes);
    for (size_t i = 0; i < d->n_spare; i++)
        free(d->spare[i]);
    for (size_t i = 0; i < d->n_bounce; i++)
        free(d->bounce[i]);
    free(d->p);
    free(d->spare);
    free(d->bounce);
    free(d);
}

/* pushes x on a free list (dropped when out of memory); d->mu held */
static void dio_push(uint8_t ***list, size_t *n, size_t *cap, uint8_t *x)
{
    if (*n == *cap) {
        size_t c = *cap ? 2 * *cap : 8;
        uint8_t **l = realloc(*list, c * sizeof *l);
        if (l == NULL) {
            free(x);
            return;
        }
        *list = l;
        *cap = c;
    }
    (*list)[(*n)++] = x;
}

/* whole pages [off, off + n) from p (aligned) to the file: direct, or plainly once refused */
static lm_code dio_write_pages(lm_st_writer *w, const uint8_t *p, uint64_t n, uint64_t off, lm_err *err)
{
    struct writer_dio *d = w->dio;
    if (!__atomic_load_n(&d->plain, __ATOMIC_RELAXED)) {
        lm_code rc = write_all(w, d->fd, p, (size_t)n, off, err);
        if (rc != LM_E_UNSUPPORTED)
            return rc;
        __atomic_store_n(&d->plain, 1, __ATOMIC_RELAXED); /* a file system that opens O_DIRECT and refuses it */
    }
    return write_all(w, w->fd, p, (size_t)n, off, err);
}

/* page pg, complete: written (the file's last page plainly, its bytes only), then hashed */
static lm_code dio_write_kept(lm_st_writer *w, dio_page *pg, lm_err *err)
{
    const uint64_t at = pg->page * DIO_PAGE;
    const uint64_t n = w->file_bytes - at < DIO_PAGE ? w->file_bytes - at : DIO_PAGE;
    lm_code rc = n == DIO_PAGE ? dio_write_pages(w, pg->bytes, n, at, err) : write_all(w, w->fd, pg->bytes, (size_t)n, at, err);
    if (rc == LM_OK && w->hash != NULL)
        hash_written(w, pg->bytes, at, n);
    return rc;
}

/* bytes [off, off + n) of one page kept; *complete: the page now has all its bytes and is *done
 * (no longer kept: the caller writes it and gives its buffer back).  d->mu held. */
static lm_code dio_keep(lm_st_writer *w, const uint8_t *src, uint64_t n, uint64_t off, dio_page *done, int *complete)
{
    struct writer_dio *d = w->dio;
    const uint64_t page = off / DIO_PAGE, at = page * DIO_PAGE;
    const uint64_t want = w->file_bytes - at < DIO_PAGE ? w->file_bytes - at : DIO_PAGE;
    size_t i = 0;
    while (i < d->n_p && d->p[i].page != page)
        i++;
    if (i == d->n_p) {
        if (d->n_p == d->cap_p) {
            size_t c = d->cap_p ? 2 * d->cap_p : 16;
            dio_page *np = realloc(d->p, c * sizeof *np);
            if (np == NULL)
                return LM_E_NOMEM;
            d->p = np;
            d->cap_p = c;
        }
        uint8_t *b = NULL;
        if (d->n_spare > 0)
            b = d->spare[--d->n_spare];
        else if (posix_memalign((void **)&b, DIO_PAGE, DIO_PAGE) != 0)
            return LM_E_NOMEM;
        memset(b, 0, DIO_PAGE);
        d->p[d->n_p++] = (dio_page){page, 0, b};
    }
    dio_page *pg = &d->p[i];
    memcpy(pg->bytes + (off - at), src, (size_t)n);
    pg->have += n;
    *complete = pg->have >= want;
    if (*complete) {
        *done = *pg;
        d->p[i] = d->p[--d->n_p];
    }
    return LM_OK;
}

/* a kept page written: its buffer back to the spares */
static void dio_spare(struct writer_dio *d, uint8_t *b)
{
    pthread_mutex_lock(&d->mu);
    dio_push(&d->spare, &d->n_spare, &d->cap_spare, b);
    pthread_mutex_unlock(&d->mu);
}

/* a bounce buffer (DIO_BOUNCE bytes, page-aligned), or NULL when out of memory */
static uint8_t *dio_bounce_take(struct writer_dio *d)
{
    uint8_t *bb = NULL;
    pthread_mutex_lock(&d->mu);
    if (d->n_bounce > 0)
        bb = d->bounce[--d->n_bounce];
    pthread_mutex_unlock(&d->mu);
    if (bb == NULL && posix_memalign((void **)&bb, DIO_PAGE, DIO_BOUNCE) != 0)
        return NULL;
    return bb;
}

static void dio_bounce_give(struct writer_dio *d, uint8_t *bb)
{
    pthread_mutex_lock(&d->mu);
    dio_push(&d->bounce, &d->n_bounce, &d->cap_bounce, bb);
    pthread_mutex_unlock(&d->mu);
}

static lm_code dio_pwrite(lm_st_writer *w, const uint8_t *buf, uint64_t n, uint64_t off, lm_err *err)
{
    struct writer_dio *d = w->dio;
    if (n == 0)
        return LM_OK;
    const uint64_t end = off + n;
    uint64_t a = (off + DIO_PAGE - 1) / DIO_PAGE * DIO_PAGE, b = end / DIO_PAGE * DIO_PAGE;
    if (a > b) /* inside one page */
        a = b = end;
    /* the partial first and last pages: kept, written here once complete */
    dio_page full[2];
    int n_full = 0;
    lm_code rc = LM_OK;
    pthread_mutex_lock(&d->mu);
    for (int side = 0; side < 2 && rc == LM_OK; side++) {
        const uint64_t lo = side == 0 ? off : b, hi = side == 0 ? a : end;
        if (hi <= lo)
            continue;
        int complete = 0;
        rc = dio_keep(w, buf + (lo - off), hi - lo, lo, &full[n_full], &complete);
        n_full += complete;
    }
    pthread_mutex_unlock(&d->mu);
    if (rc != LM_OK)
        return lm_fail(err, rc, NULL, "out of memory");
    for (int i = 0; i < n_full; i++) {
        lm_code r = dio_write_kept(w, &full[i], err);
        dio_spare(d, full[i].bytes);
        if (r != LM_OK)
            return r;
    }
    if (b <= a)
        return LM_OK;
    /* the whole pages: from buf when placed, else through a bounce buffer */
    const uint8_t *p = buf + (a - off);
    if (((uintptr_t)p & (DIO_PAGE - 1)) == 0) {
        rc = dio_write_pages(w, p, b - a, a, err);
    } else {
        uint8_t *bb = dio_bounce_take(d);
        if (bb == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        for (uint64_t at = a; at < b && rc == LM_OK; at += DIO_BOUNCE) {
            const uint64_t k = b - at < DIO_BOUNCE ? b - at : DIO_BOUNCE;
            memcpy(bb, p + (at - a), (size_t)k);
            rc = dio_write_pages(w, bb, k, at, err);
        }
        dio_bounce_give(d, bb);
    }
    if (rc == LM_OK && w->hash != NULL)
        hash_written(w, p, a, b - a);
    return rc;
}

int lm_st_writer_is_direct(const lm_st_writer *w) { return w->dio != NULL; }

lm_code lm_st_writer_copy_fd(lm_st_writer *w, int in_fd, const char *in_path, uint64_t in_off, uint64_t n,
                             uint64_t offset, uint64_t *copied, lm_err *err)
{
    struct writer_dio *d = w->dio;
    *copied = 0;
    uint8_t *bb = dio_bounce_take(d);
    if (bb == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    lm_code rc = LM_OK;
    while (*copied < n && rc == LM_OK) {
        const uint64_t at = offset + *copied, shift = at % DIO_PAGE, room = DIO_BOUNCE - shift;
        const uint64_t want = n - *copied < room ? n - *copied : room;
        ssize_t k = lm_sys_pread(in_fd, bb + shift, (size_t)want, (off_t)(in_off + *copied));
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            lm_fail_errno(err, errno, "read failed at byte %llu", (unsigned long long)(in_off + *copied));
            lm_err_set_path(err, in_path);
            rc = LM_E_IO;
        } else if (k == 0) {
            break; /* in_fd ends early: *copied < n tells the caller */
        } else if ((rc = lm_st_writer_pwrite(w, bb + shift, (size_t)k, at, err)) == LM_OK) {
            *copied += (uint64_t)k;
        }
    }
    dio_bounce_give(d, bb);
    return rc;
}

/* every page still kept (bytes never given: zero, as in the file) written */
static lm_code dio_flush(lm_st_writer *w, lm_err *err)
{
    struct writer_dio *d = w->dio;
    lm_code rc = LM_OK;
    if (d == NULL)
        return LM_OK;
    pthread_mutex_lock(&d->mu);
    while (d->n_p > 0 && rc == LM_OK) {
        dio_page pg = d->p[--d->n_p];
        rc = dio_write_kept(w, &pg, err);
        dio_push(&d->spare, &d->n_spare, &d->cap_spare, pg.bytes);
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int lm_st_writer_direct(lm_st_writer *w)
{
    /* opt-in (LM_DIRECT_IO=1): measured idle, the plain writes with drop-behind finish sooner (the
     * disk takes the direct writes as 1 MB requests; an out-of-order hashed range is read back from
     * the disk), the direct ones take about half the CPU (README, "Outputs larger than memory") */
    const char *env = getenv("LM_DIRECT_IO");
    if (w->dio != NULL || w->wrote_data || w->fd < 0 || env == NULL || strcmp(env, "1") != 0)
        return w->dio != NULL;
    struct statx sx;
    memset(&sx, 0, sizeof sx);
    /* what the file system says of direct I/O (Linux 6.1): none (tmpfs, most network and FUSE
     * file systems) or one needing more than page alignment: the plain writes stay */
    if (statx(w->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) != 0 || !(sx.stx_mask & STATX_DIOALIGN) ||
        sx.stx_dio_offset_align == 0 || sx.stx_dio_offset_align > DIO_PAGE || sx.stx_dio_mem_align == 0 ||
        sx.stx_dio_mem_align > DIO_PAGE)
        return 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", w->fd);
    struct writer_dio *d = calloc(1, sizeof *d);
    if (d == NULL)
        return 0;
    pthread_mutex_init(&d->mu, NULL);
    if ((d->fd = lm_sys_open(path, O_RDWR | O_DIRECT | O_CLOEXEC, 0)) < 0) {
        dio_free(d);
        return 0;
    }
    w->dio = d;
    /* the header's last page, shared with the first tensor: kept with the header's bytes in it */
    const uint64_t head = w->data_start % DIO_PAGE;
    if (head != 0 && w->data_start < w->file_bytes) {
        uint8_t tmp[DIO_PAGE];
        const uint64_t at = w->data_start - head;
        int complete = 0;
        dio_page pg;
        if (lm_sys_pread(w->fd, tmp, (size_t)head, (off_t)at) != (ssize_t)head ||
            dio_keep(w, tmp, head, at, &pg, &complete) != LM_OK) {
            w->dio = NULL;
            dio_free(d);
            return 0;
        }
    }
    return 1;
}

/* ---- the XXH3-128 (or SHA-256) of the file as it is written (lm_st_writer_hash_begin; lm_xxh128.h)
 * [0, done) is hashed.  A write that reaches done is hashed from the writer's own buffer; one
 * beyond it is kept as a range (sorted, disjoint, touching ranges merged) and hashed once the
 * prefix reaches it, read back from the file: the page cache, just written.  With one thread the
 * tiles land in file order, the copies of untouched tensors (in-kernel, never in a buffer here)
 * ahead of them, so what is read back is the copies only. */
typedef struct {
    uint64_t lo, hi;
} wrange;

struct writer_hash {
    pthread_mutex_t mu;
    int plain;         /* lm_st_writer_hash_begin_sha256(): SHA-256 (md1), else XXH3-128 (x) */
    lm_xxh128 *x;
    lm_sha256_ctx md1;
    uint64_t done;
    wrange *r;
    size_t n_r, cap_r;
    uint8_t *buf; /* the read-back buffer (HASH_BUF), made at the first read */
    int err;      /* errno of a failed read-back, or ENOMEM: reported by lm_st_writer_hash_end() */
    double cpu;   /* thread CPU seconds spent hashing */
};
#define HASH_BUF ((size_t)4 << 20)

static void hash_free(struct writer_hash *h)
{
    if (h == NULL)
        return;
    pthread_mutex_destroy(&h->mu);
    lm_xxh128_free(h->x);
    free(h->r);
    free(h->buf);
    free(h);
}

static void hash_update(struct writer_hash *h, const void *p, size_t n)
{
    if (h->plain)
        lm_sha256_update(&h->md1, p, n);
    else
        lm_xxh128_update(h->x, p, n);
}

static double thread_cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* bytes [h->done, end) hashed, read from the file; h->mu held */
static void hash_read_to(lm_st_writer *w, struct writer_hash *h, uint64_t end)
{
    if (h->err)
        return;
    if (h->buf == NULL && (h->buf = malloc(HASH_BUF)) == NULL) {
        h->err = ENOMEM;
        return;
    }
    while (h->done < end) {
        size_t want = end - h->done < HASH_BUF ? (size_t)(end - h->done) : HASH_BUF;
        ssize_t k = lm_sys_pread(w->fd, h->buf, want, (off_t)h->done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            h->err = k < 0 ? errno : EIO;
            return;
        }
        hash_update(h, h->buf, (size_t)k);
        h->done += (uint64_t)k;
    }
}

/* [off, off + n) is in the file (buf: the same bytes, or NULL) */
static void hash_written(lm_st_writer *w, const uint8_t *buf, uint64_t off, uint64_t n)
{
    struct writer_hash *h = w->hash;
    if (n == 0)
        return;
    pthread_mutex_lock(&h->mu);
    double c0 = thread_cpu();
    if (h->err == 0 && buf != NULL && off <= h->done && off + n > h->done) {
        hash_update(h, buf + (h->done - off), (size_t)(off + n - h->done));
        h->done = off + n;
    } else if (h->err == 0 && off + n > h->done) { /* a range ahead of the prefix: kept */
        size_t i = 0;
        while (i < h->n_r && h->r[i].hi < off)
            i++;
        if (i < h->n_r && h->r[i].lo <= off + n) { /* touches range i (writes never overlap) */
            h->r[i].lo = off < h->r[i].lo ? off : h->r[i].lo;
            h->r[i].hi = off + n > h->r[i].hi ? off + n : h->r[i].hi;
            if (i + 1 < h->n_r && h->r[i + 1].lo <= h->r[i].hi) { /* and range i + 1 */
                h->r[i].hi = h->r[i + 1].hi > h->r[i].hi ? h->r[i + 1].hi : h->r[i].hi;
                memmove(&h->r[i + 1], &h->r[i + 2], (h->n_r - i - 2) * sizeof *h->r);
                h->n_r--;
            }
        } else {
            if (h->n_r == h->cap_r) {
                size_t cap = h->cap_r ? 2 * h->cap_r : 64;
                wrange *r = realloc(h->r, cap * sizeof *r);
                if (r == NULL) {
                    h->err = ENOMEM;
                    goto out;
                }
                h->r = r;
                h->cap_r = cap;
            }
            memmove(&h->r[i + 1], &h->r[i], (h->n_r - i) * sizeof *h->r);
            h->r[i] = (wrange){off, off + n};
            h->n_r++;
        }
    }
    /* the ranges the prefix now reaches: read back */
    size_t k = 0;
    while (k < h->n_r && h->r[k].lo <= h->done && h->err == 0) {
        if (h->r[k].hi > h->done)
            hash_read_to(w, h, h->r[k].hi);
        k++;
    }
    memmove(h->r, h->r + k, (h->n_r - k) * sizeof *h->r);
    h->n_r -= k;
out:
    __atomic_store_n(&w->hashed_to, h->done, __ATOMIC_RELEASE); /* for drop_behind() */
    h->cpu += thread_cpu() - c0;
    pthread_mutex_unlock(&h->mu);
}

static lm_code hash_begin(lm_st_writer *w, int plain, lm_err *err)
{
    struct writer_hash *h = calloc(1, sizeof *h);
    if (h == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    h->plain = plain;
    if (!plain && (h->x = lm_xxh128_new()) == NULL) {
        free(h);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    lm_sha256_init(&h->md1);
    pthread_mutex_init(&h->mu, NULL);
    w->hash = h;
    hash_written(w, NULL, 0, w->data_start); /* the header, written by lm_st_writer_open() */
    return LM_OK;
}

lm_code lm_st_writer_hash_begin(lm_st_writer *w, lm_err *err) { return hash_begin(w, 0, err); }
lm_code lm_st_writer_hash_begin_sha256(lm_st_writer *w, lm_err *err) { return hash_begin(w, 1, err); }

void lm_st_writer_note_written(lm_st_writer *w, uint64_t offset, uint64_t n_bytes)
{
    if (!__atomic_load_n(&w->wrote_data, __ATOMIC_RELAXED))
        __atomic_store_n(&w->wrote_data, 1, __ATOMIC_RELAXED);
    if (w->hash != NULL)
        hash_written(w, NULL, offset, n_bytes);
    drop_behind(w, offset + n_bytes);
}

lm_code lm_st_writer_hash_end(lm_st_writer *w, char hex[65], double *cpu_seconds, lm_err *err)
{
    lm_code rc;
    if ((rc = dio_flush(w, err)) != LM_OK)
        return rc;
    if (w->hash == NULL && (rc = lm_st_writer_hash_begin(w, err)) != LM_OK) /* not hashed so far: all read back */
        return rc;
    struct writer_hash *h = w->hash;
    pthread_mutex_lock(&h->mu);
    double c0 = thread_cpu();
    hash_read_to(w, h, w->file_bytes); /* what was never written (none, normally) read as it is */
    h->n_r = 0;
    h->cpu += thread_cpu() - c0;
    int e = h->err;
    pthread_mutex_unlock(&h->mu);
    if (e != 0) {
        lm_fail_errno(err, e, "cannot read the output file back to hash it");
        lm_err_set_path(err, w->out_path);
        return e == ENOMEM ? LM_E_NOMEM : LM_E_IO;
    }
    if (h->plain) {
        uint8_t md[32];
        lm_sha256_final(&h->md1, md);
        lm_sha256_hex(md, hex);
    } else {
        lm_xxh128_hex(h->x, hex);
    }
    if (cpu_seconds != NULL)
        *cpu_seconds = h->cpu;
    hash_free(h);
    w->hash = NULL;
    return LM_OK;
}

lm_code lm_st_writer_finish(lm_st_writer *w, int do_fsync, lm_err *err)
{
    if (w->fd < 0 || w->finished)
        return LM_OK;
    lm_code rc = dio_flush(w, err);
    if (rc != LM_OK)
        return rc;
    /* the temp file was created 0600; give it the permissions a new file would get */
    mode_t mask = umask(0);
    umask(mask);
    if (lm_sys_fchmod(w->fd, 0666 & ~mask) != 0 || (do_fsync && lm_sys_fsync(w->fd) != 0)) {
        int e = errno;
        lm_fail_errno(err, e, "cannot finish the output file");
        lm_err_set_path(err, w->out_path);
        return LM_E_IO;
    }
    /* what close() reports (a delayed write error on NFS) is reported by the close of a
     * duplicate too; the file itself stays open, and locked, until it is renamed */
    int dup_fd = lm_sys_dup(w->fd);
    if (dup_fd < 0 || lm_sys_close_checked(dup_fd) != 0) {
        int e = errno;
        lm_fail_errno(err, e, "cannot close the output file");
        lm_err_set_path(err, w->out_path);
        return LM_E_IO;
    }
    w->finished = 1;
    return LM_OK;
}

lm_code lm_st_writer_retarget(lm_st_writer *w, const char *out_path, lm_err *err)
{
    char *p = strdup(out_path);
    if (p == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    free(w->out_path);
    w->out_path = p;
    return LM_OK;
}

lm_code lm_st_writer_commit(lm_st_writer *w, int do_fsync, lm_err *err)
{
    if (lm_st_writer_finish(w, do_fsync, err) != LM_OK) {
        lm_st_writer_abort(w);
        return LM_E_IO;
    }
    if (w->anon) { /* a name beside OUT first (linkat cannot replace a file), then the rename */
        if (link_anon_temp(w) != 0) {
            lm_fail_errno(err, errno, "cannot link the finished output file into its directory");
            lm_err_set_path(err, w->out_path);
            lm_st_writer_abort(w);
            return LM_E_IO;
        }
        w->anon = 0; /* named from here: a failure below removes the name */
    }
    if (lm_sys_rename(w->tmp_path, w->out_path) != 0) {
        int e = errno;
        lm_fail_errno(err, e, "cannot rename the temporary file into place");
        lm_err_set_path(err, w->out_path);
        lm_st_writer_abort(w);
        return LM_E_IO;
    }
    free(w->tmp_path);
    w->tmp_path = NULL;
    close(w->fd); /* flushed by lm_st_writer_finish(): nothing left to report */
    w->fd = -1;
    if (do_fsync) {
        /* the rename itself is only durable once the directory is flushed too */
        char *dir = strdup(w->out_path);
        if (dir != NULL) {
            char *slash = strrchr(dir, '/');
            const char *d = dir;
            if (slash == NULL)
                d = ".";
            else if (slash == dir)
                slash[1] = '\0';
            else
                *slash = '\0';
            int dfd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (dfd >= 0) {
                if (lm_sys_fsync(dfd) != 0) { /* best effort: some file systems refuse fsync on a directory */
                }
                close(dfd);
            }
            free(dir);
        }
    }
    writer_free(w);
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* small files (index, copied config files): temp file beside the destination + rename          */
/* ------------------------------------------------------------------------------------------ */
/* the n_bytes of data written to fd (a new temporary file), then its mode set to mode & 0777 less
 * the umask; @return 0 or the errno of the failing call */
static int write_small(int fd, const void *data, size_t n_bytes, unsigned mode)
{
    const uint8_t *p = data;
    size_t left = n_bytes;
    while (left > 0) {
        ssize_t k = lm_sys_write(fd, p, left);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return k < 0 ? errno : EIO;
        p += k;
        left -= (size_t)k;
    }
    mode_t mask = umask(0);
    umask(mask);
    return lm_sys_fchmod(fd, (mode_t)(mode & 0777) & ~mask) != 0 ? errno : 0;
}

lm_code lm_write_file_atomic(const char *path, const void *data, size_t n_bytes, lm_err *err)
{
    return lm_write_file_atomic_mode(path, data, n_bytes, 0666, err);
}

lm_code lm_write_file_atomic_mode(const char *path, const void *data, size_t n_bytes, unsigned mode, lm_err *err)
{
    return lm_write_file_atomic_sync(path, data, n_bytes, mode, 0, err);
}

lm_code lm_write_file_atomic_sync(const char *path, const void *data, size_t n_bytes, unsigned mode, int do_fsync,
                                  lm_err *err)
{
    char *tmp = temp_name_for(path);
    if (tmp == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    sigset_t old_mask;
    cleanup_block(&old_mask);
    int fd = create_locked_temp(tmp), mk_errno = errno;
    lm_cleanup_slot *slot = fd >= 0 ? lm_cleanup_register(tmp) : NULL;
    cleanup_unblock(&old_mask);
    if (fd < 0) {
        int e = mk_errno;
        free(tmp);
        lm_fail_errno(err, e, "cannot create the file in its directory");
        lm_err_set_path(err, path);
        return LM_E_IO;
    }
    int e = write_small(fd, data, n_bytes, mode);
    if (e == 0 && do_fsync && lm_sys_fsync(fd) != 0)
        e = errno;
    /* renamed while still locked, so no other run's cleanup can take it for a dead one's */
    int renamed = e == 0 && lm_sys_rename(tmp, path) == 0;
    if (e == 0 && !renamed)
        e = errno;
    if (lm_sys_close_checked(fd) != 0 && e == 0)
        e = errno;
    if (e != 0)
        unlink(renamed ? path : tmp);
    lm_cleanup_unregister(slot);
    free(tmp);
    if (e != 0) {
        lm_fail_errno(err, e, "cannot write the file");
        lm_err_set_path(err, path);
        return LM_E_IO;
    }
    return LM_OK;
}

lm_code lm_write_file_new(const char *path, const void *data, size_t n_bytes, int *existed, lm_err *err)
{
    char *tmp = temp_name_for(path);
    if (tmp == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    sigset_t old_mask;
    cleanup_block(&old_mask);
    int fd = create_locked_temp(tmp), e = fd < 0 ? errno : 0;
    lm_cleanup_slot *slot = fd >= 0 ? lm_cleanup_register(tmp) : NULL;
    cleanup_unblock(&old_mask);
    if (fd >= 0)
        e = write_small(fd, data, n_bytes, 0666);
    *existed = 0;
    /* linked, then the temporary name removed, while still locked: whatever kills this process
     * leaves at most a temporary file whose lock is free */
    if (fd >= 0 && e == 0 && link(tmp, path) != 0) {
        if (errno == EEXIST)
            *existed = 1;
        else
            e = errno;
    }
    if (fd >= 0) {
        unlink(tmp);
        close(fd);
    }
    lm_cleanup_unregister(slot);
    free(tmp);
    if (e != 0) {
        lm_fail_errno(err, e, "cannot write the file");
        lm_err_set_path(err, path);
        return LM_E_IO;
    }
    return LM_OK;
}
