/* SPDX-License-Identifier: MIT */
/* st_writer.h : writes a safetensors file whose header is known up front.
 * The header (names, dtypes, shapes, offsets, metadata; padded with spaces to a multiple of 8)
 * is computed and written first, so tensor data can then go to fixed offsets in any order,
 * from any thread (pwrite).  Data goes to a temporary file beside the destination, which is
 * renamed over it by lm_st_writer_commit() only when complete; lm_st_writer_abort() (and every
 * failure) removes the temporary file.  Does not check that the destination differs from the
 * inputs: the caller does that before opening (lm_same_file()). */
#ifndef LM_ST_WRITER_H
#define LM_ST_WRITER_H

#include "lora_merge.h"

typedef struct lm_out_tensor {
    const char *name;      /* borrowed until lm_st_writer_open() returns */
    lm_dtype dtype;
    size_t n_dims;
    const uint64_t *shape; /* borrowed until lm_st_writer_open() returns */
} lm_out_tensor;

typedef struct lm_st_writer lm_st_writer;

/*! lm_st_writer_open() :
 *  Creates the temporary file beside out_path, writes the header and reserves the file size.
 *  Tensors appear in the header in the order given; their data is laid out in data_order
 *  (a permutation of 0..n-1), or in the given order when data_order is NULL.
 *  @return the writer, or NULL with *err filled (err->path names the file or directory).
 *  Ownership: finish with lm_st_writer_commit() or lm_st_writer_abort(), which free it. */
lm_st_writer *lm_st_writer_open(const char *out_path, const lm_out_tensor *tensors, size_t n,
                                const size_t *data_order, const char *const *meta_keys,
                                const char *const *meta_values, size_t n_meta, lm_err *err);

/*! lm_st_layout_bytes() : the size of the file lm_st_writer_open() would write for these
 *  arguments (header included), without creating anything (dry runs). */
lm_code lm_st_layout_bytes(const lm_out_tensor *tensors, size_t n, const size_t *data_order,
                           const char *const *meta_keys, const char *const *meta_values, size_t n_meta,
                           uint64_t *file_bytes, lm_err *err);

/*! lm_st_writer_tensor_offset() : absolute file offset of tensor i's data. */
uint64_t lm_st_writer_tensor_offset(const lm_st_writer *w, size_t i);
uint64_t lm_st_writer_tensor_bytes(const lm_st_writer *w, size_t i);
uint64_t lm_st_writer_file_bytes(const lm_st_writer *w);
int lm_st_writer_fd(const lm_st_writer *w);
const char *lm_st_writer_temp_path(const lm_st_writer *w); /* NULL while the file has no name (O_TMPFILE) */
const char *lm_st_writer_out_path(const lm_st_writer *w);

/*! lm_st_writer_pwrite() : writes n_bytes at absolute offset (thread-safe; retries short
 *  writes; EFBIG, ENOSPC ... become an error naming the output file). */
lm_code lm_st_writer_pwrite(lm_st_writer *w, const void *buf, size_t n_bytes, uint64_t offset,
                            lm_err *err);

/*! lm_st_writer_hash_begin() : from here on the file's XXH3-128 (lm_xxh128.h: an integrity check,
 *  not a cryptographic digest; a shard worker's sidecar) is computed as it is written: the
 *  bytes written at the end of the hashed prefix are hashed from the caller's buffer, the others
 *  once the prefix reaches them, read back from the file (the page cache, just written).  Bytes
 *  written into lm_st_writer_fd() by other means (copy_file_range) are told with
 *  lm_st_writer_note_written() once they are in the file.  LM_OK or out of memory. */
lm_code lm_st_writer_hash_begin(lm_st_writer *w, lm_err *err);
/*! lm_st_writer_hash_begin_sha256() : the same with the file's plain SHA-256 (one message: ~1.7 GB/s
 *  with SHA-NI), what the report gives (--json) */
lm_code lm_st_writer_hash_begin_sha256(lm_st_writer *w, lm_err *err);
/*! lm_st_writer_drop_behind() : step > 0: the pages written are written back and dropped from the
 *  page cache from 2 steps behind the writes on, advised once per step of progress (an advice, for
 *  outputs larger than the page cache; see st_writer.c); 0: off, the default.  A file hashed as
 *  it is written is dropped only behind its hashed prefix. */
void lm_st_writer_drop_behind(lm_st_writer *w, uint64_t step);
/*! lm_st_writer_direct() : the data from here on written with direct I/O (O_DIRECT: not through the
 *  page cache; for outputs larger than it, instead of drop-behind), each page once whole (see
 *  st_writer.c); the bytes written are the same.  Only before any write but the header's; not where
 *  the file system offers no direct I/O (statx STATX_DIOALIGN: tmpfs, most network file systems)
 *  or unless LM_DIRECT_IO=1 is set (opt-in).  @return 1: on, 0: plain writes. */
int lm_st_writer_direct(lm_st_writer *w);
int lm_st_writer_is_direct(const lm_st_writer *w);
/*! lm_st_writer_copy_fd() : a direct writer's (lm_st_writer_is_direct) copy of n bytes of in_fd from
 *  in_off to offset, read into a buffer placed for direct I/O (copy_file_range would go through
 *  the page cache).  *copied < n with LM_OK: in_fd ended early; a read error names in_path. */
lm_code lm_st_writer_copy_fd(lm_st_writer *w, int in_fd, const char *in_path, uint64_t in_off, uint64_t n,
                             uint64_t offset, uint64_t *copied, lm_err *err);
void lm_st_writer_note_written(lm_st_writer *w, uint64_t offset, uint64_t n_bytes);
/*! lm_st_writer_hash_end() : once every byte is written: the file's XXH3-128 (32 hex digits), or its
 *  SHA-256 (64; lm_st_writer_hash_begin_sha256); what
 *  was never written is read back as it is; without lm_st_writer_hash_begin(), the whole file),
 *  and the thread CPU seconds spent hashing (may be NULL). */
lm_code lm_st_writer_hash_end(lm_st_writer *w, char hex[65], double *cpu_seconds, lm_err *err);

/*! lm_st_writer_finish() : optionally fsyncs the temporary file and flushes it as close() would
 *  (reporting what close() reports); it stays open, flock'd and registered for cleanup until
 *  lm_st_writer_commit() renames it or lm_st_writer_abort() removes it (several shards are all
 *  finished before any is renamed).  No more writes.  Every temporary file is flock'd (LOCK_EX)
 *  from its creation to its rename: one whose lock is free belongs to a dead process. */
lm_code lm_st_writer_finish(lm_st_writer *w, int do_fsync, lm_err *err);

/*! lm_st_writer_retarget() : the file is renamed to out_path instead when committed (a path in the
 *  same file system: a directory OUT's stage, made only at the commit); its temporary name stays
 *  beside the first path.  LM_OK, or out of memory (the writer unchanged). */
lm_code lm_st_writer_retarget(lm_st_writer *w, const char *out_path, lm_err *err);

/*! lm_st_writer_commit() : optionally fsyncs, closes and renames the temporary file over
 *  out_path; frees w.  On failure the temporary file is removed. */
lm_code lm_st_writer_commit(lm_st_writer *w, int do_fsync, lm_err *err);
/*! lm_st_writer_abort() : removes the temporary file and frees w.  NULL is a no-op. */
void lm_st_writer_abort(lm_st_writer *w);

/*! lm_write_file_atomic() : writes a small file through a temporary file beside it and a
 *  rename (index files, copied config files). */
lm_code lm_write_file_atomic(const char *path, const void *data, size_t n_bytes, lm_err *err);
/*! lm_write_file_atomic_mode() : the same, the file getting permission bits mode & ~umask (it
 *  is never more open than that, even while being written). */
lm_code lm_write_file_atomic_mode(const char *path, const void *data, size_t n_bytes, unsigned mode,
                                  lm_err *err);
/*! lm_write_file_atomic_sync() : the same, fsync'd before the rename when do_fsync. */
lm_code lm_write_file_atomic_sync(const char *path, const void *data, size_t n_bytes, unsigned mode, int do_fsync,
                                  lm_err *err);

/*! lm_write_file_new() : creates path holding data unless path exists (never replaced): the
 *  bytes go to a locked temporary file beside it (".<name>.lm-tmp-XXXXXX", lock held until it is
 *  removed, so a killed writer's leftover is a temporary file with a free lock), linked to path.
 *  @return LM_OK with *existed 0 (created) or 1 (path was there: nothing changed), or an error. */
lm_code lm_write_file_new(const char *path, const void *data, size_t n_bytes, int *existed, lm_err *err);

/*! lm_json_escape() : appends s as a JSON string body (no quotes) to buf; @return new length,
 *  or (size_t)-1 if cap is too small. */
size_t lm_json_escape(char *buf, size_t used, size_t cap, const char *s);

/* ---- temporary-file cleanup on signals ----------------------------------------------------
 * The one piece of process-wide state: a signal handler can only see globals.  The writer
 * registers its temporary file here; lm_cleanup_install() (called by the CLI) makes SIGINT,
 * SIGTERM, SIGHUP, SIGPIPE, SIGQUIT, SIGUSR1/2, SIGALRM, SIGXCPU, SIGVTALRM and SIGPROF remove
 * registered files before the default action, and ignores
 * SIGXFSZ so that a file-size limit becomes an EFBIG error instead of killing the process. */
void lm_cleanup_install(void);
typedef struct lm_cleanup_slot lm_cleanup_slot;
/* @return the registration (no limit on their number), or NULL when out of memory */
lm_cleanup_slot *lm_cleanup_register(const char *path);
/* a directory of our own (a stage): its entries, then itself, are removed after every file */
lm_cleanup_slot *lm_cleanup_register_dir(const char *path);
void lm_cleanup_unregister(lm_cleanup_slot *slot); /* NULL: no-op */

/*! lm_same_file() : 1 if a and b name the same existing file (device and inode, links
 *  followed), 0 otherwise. */
int lm_same_file(const char *a, const char *b);

#endif
