/* SPDX-License-Identifier: MIT */
/* lm_sys.c : the fault-injection seam (see lm_sys.h). */
#include "lm_sys.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

enum { K_NONE, K_EIO, K_ENOSPC, K_EINTR, K_SHORT, K_STALL };
enum { C_SYS, C_IO, C_ALLOC }; /* a system call, one that transfers bytes, an allocation */

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_kind;
static long g_target;
static long g_count;
static const char *g_log;
static char g_only[32];         /* count only the calls of this name ("" all) */
static const char *g_fsync_log; /* LM_FSYNC_LOG */

static void fault_init(void)
{
    g_fsync_log = getenv("LM_FSYNC_LOG");
    const char *s = getenv("LM_FAULT");
    if (s == NULL)
        return;
    char kind[16] = "";
    long k = 0;
    if (sscanf(s, "%ld:%15[^:]:%31s", &k, kind, g_only) < 2 || k < 1)
        return;
    g_kind = strcmp(kind, "EIO") == 0 ? K_EIO : strcmp(kind, "ENOSPC") == 0 ? K_ENOSPC
           : strcmp(kind, "EINTR") == 0 ? K_EINTR : strcmp(kind, "short") == 0 ? K_SHORT
           : strcmp(kind, "stall") == 0 ? K_STALL : K_NONE;
    g_target = k;
    g_log = getenv("LM_FAULT_LOG");
}

/* 0: proceed; else the kind to inject into this call */
static int fault(int cls, const char *call)
{
    pthread_once(&g_once, fault_init);
    if (__builtin_expect(g_kind == K_NONE, 1))
        return 0;
    if ((g_kind == K_EINTR && cls == C_ALLOC) || (g_kind == K_SHORT && cls != C_IO) ||
        (g_only[0] != '\0' && strcmp(call, g_only) != 0))
        return 0;
    if (__atomic_add_fetch(&g_count, 1, __ATOMIC_SEQ_CST) != g_target)
        return 0;
    if (g_log != NULL) {
        int fd = open(g_log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0) {
            char line[96];
            int n = snprintf(line, sizeof line, "%ld %s\n", g_target, call);
            if (write(fd, line, (size_t)n) < 0) {
            }
            close(fd);
        }
    }
    if (g_kind == K_STALL) {
        char line[96], c;
        int n = snprintf(line, sizeof line, "lora-merge: stalled in %s\n", call);
        if (write(2, line, (size_t)n) < 0 || read(0, &c, 1) < 0) {
        }
        return 0;
    }
    return g_kind;
}

/* LM_FSYNC_LOG: what is flushed */
static void log_fsync(int fd)
{
    pthread_once(&g_once, fault_init);
    struct stat st;
    if (g_fsync_log == NULL || fstat(fd, &st) != 0)
        return;
    char link[64], path[4096] = "?";
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    path[n > 0 ? n : 1] = '\0';
    int lfd = open(g_fsync_log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (lfd >= 0) {
        char line[4200];
        int k = snprintf(line, sizeof line, "%llu %s %s\n", (unsigned long long)st.st_ino,
                         S_ISDIR(st.st_mode) ? "dir" : "file", path);
        if (write(lfd, line, (size_t)(k < (int)sizeof line ? k : (int)sizeof line - 1)) < 0) {
        }
        close(lfd);
    }
}

static int fail_errno(int kind)
{
    errno = kind == K_EIO ? EIO : kind == K_ENOSPC ? ENOSPC : EINTR;
    return -1;
}

#define SYS_CALL(name, expr)                                                                                   \
    do {                                                                                                       \
        int k_ = fault(C_SYS, name);                                                                           \
        if (k_)                                                                                                \
            return fail_errno(k_);                                                                             \
        return expr;                                                                                           \
    } while (0)

int lm_sys_open(const char *path, int flags, mode_t mode) { SYS_CALL("open", open(path, flags, mode)); }
int lm_sys_openat(int dfd, const char *path, int flags, mode_t mode) { SYS_CALL("openat", openat(dfd, path, flags, mode)); }
int lm_sys_fsync(int fd)
{
    log_fsync(fd);
    SYS_CALL("fsync", fsync(fd));
}
int lm_sys_fchmod(int fd, mode_t mode) { SYS_CALL("fchmod", fchmod(fd, mode)); }
int lm_sys_rename(const char *from, const char *to) { SYS_CALL("rename", rename(from, to)); }
int lm_sys_linkat(int olddfd, const char *oldpath, int newdfd, const char *newpath, int flags)
{
    SYS_CALL("linkat", linkat(olddfd, oldpath, newdfd, newpath, flags));
}
int lm_sys_unlink(const char *path) { SYS_CALL("unlink", unlink(path)); }
int lm_sys_mkdir(const char *path, mode_t mode) { SYS_CALL("mkdir", mkdir(path, mode)); }
int lm_sys_mkostemp(char *tmpl, int flags) { SYS_CALL("mkostemp", mkostemp(tmpl, flags)); }
int lm_sys_flock(int fd, int op) { SYS_CALL("flock", flock(fd, op)); }
int lm_sys_fstat(int fd, struct stat *st) { SYS_CALL("fstat", fstat(fd, st)); }
int lm_sys_dup(int fd) { SYS_CALL("dup", fcntl(fd, F_DUPFD_CLOEXEC, 0)); }
int lm_sys_close_checked(int fd)
{
    int k = fault(C_SYS, "close");
    if (k) {
        close(fd);
        return fail_errno(k);
    }
    return close(fd);
}

int lm_sys_fallocate(int fd, off_t len)
{
    int k = fault(C_SYS, "posix_fallocate");
    if (k)
        return k == K_EIO ? EIO : k == K_ENOSPC ? ENOSPC : EINTR;
    return posix_fallocate(fd, 0, len);
}

char *lm_sys_mkdtemp(char *tmpl)
{
    int k = fault(C_SYS, "mkdtemp");
    if (k) {
        fail_errno(k);
        return NULL;
    }
    return mkdtemp(tmpl);
}

DIR *lm_sys_opendir(const char *path)
{
    int k = fault(C_SYS, "opendir");
    if (k) {
        fail_errno(k);
        return NULL;
    }
    return opendir(path);
}

static void *lazy_dlopen(const char *const *names, const char **why)
{
    int k = fault(C_SYS, "dlopen");
    *why = "no library named";
    if (k) {
        *why = k == K_EIO ? "Input/output error (LM_FAULT)" : k == K_ENOSPC ? "No space left on device (LM_FAULT)"
                                                                          : "Interrupted system call (LM_FAULT)";
        return NULL;
    }
    for (size_t i = 0; names[i] != NULL; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (h != NULL)
            return h;
        const char *e = dlerror();
        *why = e != NULL ? e : "cannot be loaded";
    }
    return NULL;
}

static pthread_mutex_t g_lazy_mu = PTHREAD_MUTEX_INITIALIZER;

lm_code lm_sys_lazy_load(lm_lazy_lib *L, lm_err *err)
{
    int st = __atomic_load_n(&L->state, __ATOMIC_ACQUIRE);
    if (st == 0) {
        pthread_mutex_lock(&g_lazy_mu);
        if ((st = L->state) == 0) {
            const char *why;
            void *h = lazy_dlopen(L->names, &why);
            st = h != NULL ? 1 : -1;
            if (h == NULL)
                snprintf(L->why, sizeof L->why, "%s", why);
            for (size_t i = 0; st == 1 && L->syms[i] != NULL; i++)
                if ((*L->slots[i] = dlsym(h, L->syms[i])) == NULL) {
                    snprintf(L->why, sizeof L->why, "it has no %s", L->syms[i]);
                    st = -1;
                }
            __atomic_store_n(&L->state, st, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&g_lazy_mu);
    }
    if (st == 1)
        return LM_OK;
    return lm_fail(err, LM_E_UNSUPPORTED, "MissingLibrary", "%s needs %s, which cannot be loaded: %s", L->needed_for,
                   L->library, L->why);
}

/* read/write family: a short count transfers half */
static size_t io_size(int k, size_t n) { return k == K_SHORT ? (n > 1 ? n / 2 : n) : n; }

#define IO_CALL(name, n, expr)                                                                                 \
    do {                                                                                                       \
        int k_ = fault(C_IO, name);                                                                            \
        if (k_ && k_ != K_SHORT)                                                                               \
            return fail_errno(k_);                                                                             \
        size_t m_ = io_size(k_, n);                                                                            \
        (void)m_;                                                                                              \
        return expr;                                                                                           \
    } while (0)

ssize_t lm_sys_read(int fd, void *buf, size_t n) { IO_CALL("read", n, read(fd, buf, m_)); }
ssize_t lm_sys_pread(int fd, void *buf, size_t n, off_t off) { IO_CALL("pread", n, pread(fd, buf, m_, off)); }
ssize_t lm_sys_write(int fd, const void *buf, size_t n) { IO_CALL("write", n, write(fd, buf, m_)); }
ssize_t lm_sys_pwrite(int fd, const void *buf, size_t n, off_t off) { IO_CALL("pwrite", n, pwrite(fd, buf, m_, off)); }
ssize_t lm_sys_copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t n)
{
    IO_CALL("copy_file_range", n, copy_file_range(in, in_off, out, out_off, m_, 0));
}

#define ALLOC_CALL(name, expr)                                                                                 \
    do {                                                                                                       \
        if (fault(C_ALLOC, name)) {                                                                            \
            errno = ENOMEM;                                                                                    \
            return NULL;                                                                                       \
        }                                                                                                      \
        return expr;                                                                                           \
    } while (0)

void *lm_sys_malloc(size_t n) { ALLOC_CALL("malloc", malloc(n)); }
void *lm_sys_calloc(size_t n, size_t size) { ALLOC_CALL("calloc", calloc(n, size)); }
void *lm_sys_realloc(void *p, size_t n) { ALLOC_CALL("realloc", realloc(p, n)); }
char *lm_sys_strdup(const char *s) { ALLOC_CALL("strdup", strdup(s)); }
char *lm_sys_strndup(const char *s, size_t n) { ALLOC_CALL("strndup", strndup(s, n)); }
