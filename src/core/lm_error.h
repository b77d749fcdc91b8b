/* SPDX-License-Identifier: MIT */
/* lm_error.h : the one error type of lora-merge.
 * An lm_err carries a code, a stable kind name (e.g. "HeaderTooLarge"), the file, the tensor or
 * module, a byte offset and a one-line message.  The first, most specific cause wins: lm_fail()
 * writes only while err->code == LM_OK, and callers on the way up fill only empty fields. */
#ifndef LM_ERROR_H
#define LM_ERROR_H

#include "lora_merge.h"

/*! lm_fail() :
 *  Records (code, kind, message) in *err if nothing was recorded yet.  kind may be NULL (a
 *  default is derived from code); a kind listed in lm_kinds.def always gets the code listed there.  @return code, so callers can `return lm_fail(...)`.
 *  err may be NULL (then nothing is recorded). */
lm_code lm_fail(lm_err *err, lm_code code, const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/*! lm_kind_meaning() : the one-line meaning of an error kind listed in lm_kinds.def (the table
 *  lm_fail() takes codes from), or NULL for a kind not listed. */
const char *lm_kind_meaning(const char *kind);

/*! lm_fail_errno() : as lm_fail(), with sys_errno = errnum and ": strerror(errnum)" appended. */
lm_code lm_fail_errno(lm_err *err, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Fill context fields if they are still empty (no-op on NULL err or NULL value). */
void lm_err_set_path(lm_err *err, const char *path);
void lm_err_set_tensor(lm_err *err, const char *tensor);
void lm_err_set_offset(lm_err *err, uint64_t offset);

/*! lm_path_not_regular() : what path names when it is there but is no regular file an input can
 *  be read from: "a FIFO", "a socket", "a character device", "a block device", "a directory", "a
 *  symbolic link loop", "a symbolic link to nothing"; NULL for a regular file, a name that does
 *  not exist, or one that cannot be looked at (the open that follows says why).  lstat/stat only:
 *  never opens it, so never blocks on a FIFO or touches a device. */
const char *lm_path_not_regular(const char *path);

/*! lm_fail_not_regular() : when lm_path_not_regular(path) names something, records NotRegularFile
 *  "<leaf of path> is <what>, not a regular file" with the path set and returns its code (LM_E_IO);
 *  else LM_OK and nothing recorded (the caller goes on to its own "missing" or open error). */
lm_code lm_fail_not_regular(lm_err *err, const char *path);

#endif
