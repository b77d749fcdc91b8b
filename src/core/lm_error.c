/* SPDX-License-Identifier: MIT */
/* lm_error.c : recording and formatting lm_err (see lm_error.h). */
#include "lm_error.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

static void copy_field(char *dst, size_t cap, const char *src)
{
    if (dst[0] != '\0' || src == NULL)
        return;
    snprintf(dst, cap, "%s", src);
}

void lm_err_clear(lm_err *err)
{
    if (err == NULL)
        return;
    memset(err, 0, sizeof *err);
    err->offset = UINT64_MAX;
}

const char *lm_code_name(lm_code code)
{
    switch (code) {
    case LM_OK: return "OK";
    case LM_E_IO: return "IoError";
    case LM_E_NOMEM: return "OutOfMemory";
    case LM_E_FORMAT: return "InvalidFormat";
    case LM_E_UNSUPPORTED: return "Unsupported";
    case LM_E_MISMATCH: return "Mismatch";
    case LM_E_USAGE: return "Usage";
    case LM_E_INTERRUPTED: return "Interrupted";
    case LM_E_WARNING: return "WarningAsError";
    }
    return "Unknown";
}

/* the one table of error kinds: a listed kind always carries its listed code */
static const struct {
    const char *name;
    lm_code code;
    const char *meaning;
} kinds[] = {
#define LM_KIND(name, code, meaning) {#name, code, meaning},
#include "lm_kinds.def"
#undef LM_KIND
};

static int kind_index(const char *kind)
{
    for (size_t i = 0; kind != NULL && i < sizeof kinds / sizeof kinds[0]; i++)
        if (strcmp(kinds[i].name, kind) == 0)
            return (int)i;
    return -1;
}

int lm_error_kind(size_t i, const char **name, lm_code *code, const char **meaning)
{
    if (i >= sizeof kinds / sizeof kinds[0])
        return 0;
    *name = kinds[i].name;
    *code = kinds[i].code;
    *meaning = kinds[i].meaning;
    return 1;
}

const char *lm_kind_meaning(const char *kind)
{
    int i = kind_index(kind);
    return i < 0 ? NULL : kinds[i].meaning;
}

int lm_code_exit_status(lm_code code)
{
    switch (code) {
    case LM_OK: return 0;
    case LM_E_USAGE: return 2;
    case LM_E_IO: return 3;
    case LM_E_NOMEM: return 4;
    case LM_E_WARNING: return 5;
    default: return 1;
    }
}

static void vfail(lm_err *err, lm_code code, const char *kind, const char *fmt, va_list ap)
{
    if (err == NULL || err->code != LM_OK)
        return;
    err->code = code;
    snprintf(err->kind, sizeof err->kind, "%s", kind != NULL ? kind : lm_code_name(code));
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    /* one line: no newline may survive (file names and tensor names come from input) */
    for (char *p = err->msg; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
}

lm_code lm_fail(lm_err *err, lm_code code, const char *kind, const char *fmt, ...)
{
    int k = kind_index(kind);
    if (k >= 0)
        code = kinds[k].code;
    va_list ap;
    va_start(ap, fmt);
    vfail(err, code, kind, fmt, ap);
    va_end(ap);
    return code;
}

lm_code lm_fail_errno(lm_err *err, int errnum, const char *fmt, ...)
{
    if (err == NULL || err->code != LM_OK)
        return errnum == ENOMEM ? LM_E_NOMEM : LM_E_IO;
    lm_code code = errnum == ENOMEM ? LM_E_NOMEM : LM_E_IO;
    va_list ap;
    va_start(ap, fmt);
    vfail(err, code, NULL, fmt, ap);
    va_end(ap);
    err->sys_errno = errnum;
    size_t n = strlen(err->msg);
    snprintf(err->msg + n, sizeof err->msg - n, ": %s", strerror(errnum));
    return code;
}

void lm_err_set_path(lm_err *err, const char *path)
{
    if (err != NULL)
        copy_field(err->path, sizeof err->path, path);
}

void lm_err_set_tensor(lm_err *err, const char *tensor)
{
    if (err != NULL)
        copy_field(err->tensor, sizeof err->tensor, tensor);
}

void lm_err_set_offset(lm_err *err, uint64_t offset)
{
    if (err != NULL && err->offset == UINT64_MAX)
        err->offset = offset;
}

/* error: <path>: <Kind>: tensor '<name>': <msg> (at byte N) */
size_t lm_err_format(const lm_err *err, char *buf, size_t cap)
{
    if (cap == 0)
        return 0;
    int n = snprintf(buf, cap, "error: ");
    size_t used = n > 0 ? (size_t)n : 0;
#define APPEND(...)                                                                                \
    do {                                                                                           \
        if (used < cap) {                                                                          \
            int k_ = snprintf(buf + used, cap - used, __VA_ARGS__);                                \
            if (k_ > 0)                                                                            \
                used += (size_t)k_;                                                                \
        }                                                                                          \
    } while (0)
    if (err->path[0])
        APPEND("%s: ", err->path);
    APPEND("%s: ", err->kind[0] ? err->kind : lm_code_name(err->code));
    /* the message may name the tensor already ("tensor 'a': ..."): say it once */
    if (err->tensor[0]) {
        char quoted[sizeof err->tensor + 2];
        snprintf(quoted, sizeof quoted, "'%s'", err->tensor);
        if (strstr(err->msg, quoted) == NULL)
            APPEND("'%s': ", err->tensor);
    }
    APPEND("%s", err->msg[0] ? err->msg : "unknown error");
    if (err->offset != UINT64_MAX)
        APPEND(" (at byte %llu)", (unsigned long long)err->offset);
#undef APPEND
    return used < cap ? used : cap - 1;
}

const char *lm_path_not_regular(const char *path)
{
    struct stat st;
    if (path == NULL || lstat(path, &st) != 0)
        return NULL;
    if (S_ISLNK(st.st_mode) && stat(path, &st) != 0)
        return errno == ELOOP ? "a symbolic link loop" : errno == ENOENT ? "a symbolic link to nothing" : NULL;
    return S_ISREG(st.st_mode) ? NULL : S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISSOCK(st.st_mode) ? "a socket"
         : S_ISCHR(st.st_mode) ? "a character device" : S_ISBLK(st.st_mode) ? "a block device"
         : S_ISDIR(st.st_mode) ? "a directory" : "a special file";
}

lm_code lm_fail_not_regular(lm_err *err, const char *path)
{
    const char *what = lm_path_not_regular(path);
    if (what == NULL)
        return LM_OK;
    const char *slash = strrchr(path, '/');
    lm_code rc = lm_fail(err, LM_E_IO, "NotRegularFile", "%s is %s, not a regular file",
                         slash && slash[1] ? slash + 1 : path, what);
    lm_err_set_path(err, path);
    return rc;
}
