/* SPDX-License-Identifier: MIT */
/* lm_sys.h : the fault-injection seam.  The system calls and allocations of the output path
 * (st_writer.c, output.c, model_files.c, the executor's writes and base reads) go through these
 * wrappers, which are the plain calls unless LM_FAULT is set in the environment:
 *   LM_FAULT=<k>:<kind>   the k-th call (from 1, over the calls <kind> applies to) fails:
 *     EIO, ENOSPC  every call fails with that errno (an allocation returns NULL)
 *     EINTR        every system call fails with EINTR (allocations are not counted)
 *     short        read/write calls transfer half the bytes asked (at least 1; others not counted)
 *     stall        the call waits: "lora-merge: stalled in <call>" on stderr, then one byte read from
 *                  stdin, then it runs as usual (a test changes an input at that exact point)
 *   LM_FAULT=<k>:<kind>:<call>   the same, counting only the calls of that name (e.g.
 *                          "1:stall:copy_file_range": the first copy of base bytes)
 *   LM_FAULT_LOG=<file>   each injection appends "<k> <call>\n" there (no line: k was past the
 *                          last call, the sweep is over).
 *   LM_FSYNC_LOG=<file>   each lm_sys_fsync() appends "<inode> <file|dir> <path>\n" there (the
 *                          path as /proc/self/fd says it), whether or not a fault is injected:
 *                          tests/test_durability.c checks what --fsync flushes.
 * tests/test_faults.c sweeps every k for each kind over small merges. */
#ifndef LM_SYS_H
#define LM_SYS_H

#include "lm_error.h"

#include <dirent.h>
#include <stddef.h>
#include <sys/stat.h>
#include <sys/types.h>

int lm_sys_open(const char *path, int flags, mode_t mode);
int lm_sys_openat(int dfd, const char *path, int flags, mode_t mode);
ssize_t lm_sys_read(int fd, void *buf, size_t n);
ssize_t lm_sys_pread(int fd, void *buf, size_t n, off_t off);
ssize_t lm_sys_write(int fd, const void *buf, size_t n);
ssize_t lm_sys_pwrite(int fd, const void *buf, size_t n, off_t off);
ssize_t lm_sys_copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t n);
int lm_sys_fsync(int fd);
int lm_sys_fchmod(int fd, mode_t mode);
int lm_sys_fallocate(int fd, off_t len); /* posix_fallocate: returns the error number */
int lm_sys_rename(const char *from, const char *to);
int lm_sys_linkat(int olddfd, const char *oldpath, int newdfd, const char *newpath, int flags);
int lm_sys_unlink(const char *path);
int lm_sys_mkdir(const char *path, mode_t mode);
char *lm_sys_mkdtemp(char *tmpl);
int lm_sys_mkostemp(char *tmpl, int flags);
int lm_sys_flock(int fd, int op);
int lm_sys_fstat(int fd, struct stat *st);
int lm_sys_dup(int fd);
int lm_sys_close_checked(int fd); /* close whose error matters (a flush) */
DIR *lm_sys_opendir(const char *path);

/* A shared library loaded on first use instead of linked (loading it at start-up cost every run,
 * and few runs need it).  lm_sys_lazy_load(): once per process (thread-safe), the first of
 * `names` that loads (one call "dlopen" for the faults), and slots[i] = the address of syms[i];
 * LM_OK, or (then, and on every later call) MissingLibrary: "<needed_for> needs <library>, which
 * cannot be loaded: <why>".  Define one as a static (state 0) beside the calls it serves. */
typedef struct {
    const char *const *names;  /* sonames to try in order, NULL-terminated */
    const char *library;       /* e.g. "libzip (libzip.so.4)" */
    const char *needed_for;    /* e.g. "reading a torch.save() zip checkpoint" */
    const char *const *syms;   /* NULL-terminated */
    void **const *slots;       /* one per symbol */
    int state;                 /* 0 not tried, 1 loaded, -1 not loadable (why) */
    char why[200];
} lm_lazy_lib;
lm_code lm_sys_lazy_load(lm_lazy_lib *L, lm_err *err);

/* A file's lazily loaded library: FNS(X) lists its functions (X(name) each, as its header
 * declares them); this defines the file's `lm_lazy_fns` (a pointer per function: call
 * (*lm_lazy_fns.name)(...) once LIB is loaded) and LIB, the lm_lazy_lib that loads them. */
#define LM_LAZY_FIELD(f) __typeof__(f) *f;
#define LM_LAZY_NAME(f) #f,
#define LM_LAZY_SLOT(f) (void **)&lm_lazy_fns.f,
#define LM_LAZY_LIBRARY(LIB, FNS, library, needed_for, ...)                                                            \
    static struct {                                                                                                   \
        FNS(LM_LAZY_FIELD)                                                                                            \
    } lm_lazy_fns;                                                                                                    \
    static const char *const lm_lazy_names[] = {__VA_ARGS__, NULL}, *const lm_lazy_syms[] = {FNS(LM_LAZY_NAME) NULL}; \
    static void **const lm_lazy_slots[] = {FNS(LM_LAZY_SLOT)};                                                        \
    static lm_lazy_lib LIB = {lm_lazy_names, library, needed_for, lm_lazy_syms, lm_lazy_slots, 0, ""}
void *lm_sys_malloc(size_t n);
void *lm_sys_calloc(size_t n, size_t size);
void *lm_sys_realloc(void *p, size_t n);
char *lm_sys_strdup(const char *s);
char *lm_sys_strndup(const char *s, size_t n);

#endif

/* LM_SYS_ALLOC: a file that defines it before including lm_sys.h has its allocations counted */
#if defined(LM_SYS_ALLOC) && !defined(LM_SYS_ALLOC_DONE)
#define LM_SYS_ALLOC_DONE
#define malloc(n) lm_sys_malloc(n)
#define calloc(n, s) lm_sys_calloc(n, s)
#define realloc(p, n) lm_sys_realloc(p, n)
#define strdup(s) lm_sys_strdup(s)
#define strndup(s, n) lm_sys_strndup(s, n)
#endif
