/* SPDX-License-Identifier: MIT */
/* st_reader.h : internal helpers shared by the safetensors reader (st_reader.c) and the model
 * loader (st_index.c).  The public side is in lora_merge.h ("Reading safetensors files").
 *
 * Byte layout checked by the reader:
 *   [8: N, u64 little-endian][N: UTF-8 JSON object, optional whitespace before and after][data]
 *   N <= ST_MAX_HEADER_BYTES; every tensor's [begin, end) lies in data, has exactly the bytes its
 *   dtype and shape need, and the ranges tile [0, data_bytes) with no gap or overlap. */
#ifndef ST_READER_H
#define ST_READER_H

#include "lora_merge.h"

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_HEADER_BYTES 100000000u

/* 1 when [p, p + n) lies inside f's read-only file mapping (not a buffer) */
int lm_st_in_mapping(const lm_st_file *f, const void *p, uint64_t n);
/* Drops this process's pages of [p, p + n), a range of a read-only shared file mapping, once it
 * has been read: resident memory stays bounded by what is in flight (the data stays in the page
 * cache, and a later read faults it back in).  Never call it on anonymous memory (it would zero
 * it). */
void lm_drop_mapped_pages(const void *p, uint64_t n);

/* Makes the pages wholly inside [p, p + n), memory of this process's own (malloc'd) about to be
 * written, present now, in one system call (MADV_POPULATE_WRITE), instead of one page fault per
 * page as they are first written: on a virtual machine a fault costs ~14 us, populating ~0.7 us
 * a page.  Only for memory that will be written whole (it counts in the resident memory). */
void lm_populate(void *p, size_t n);

/* The pages of [p, p + n), a range of a read-only file mapping about to be read, mapped now in
 * one system call (MADV_POPULATE_READ) instead of a fault every few pages; dropped as any others
 * with lm_drop_mapped_pages(). */
void lm_populate_read(const void *p, uint64_t n);

/*! lm_st_open_snapshot() : lm_st_open() on a copy of the file's bytes taken once, into a sealed
 *  memfd that is then mapped (for adapters, which are small): the file may be truncated or
 *  overwritten while the copy is read, never during it unnoticed (its size and times are compared
 *  before and after the copy).  The mapping is shared memory, so lm_drop_mapped_pages() still
 *  only drops this process's pages of it.  lm_st_path() is the original path. */
lm_st_file *lm_st_open_snapshot(const char *path, lm_err *err);

/*! lm_st_open_snapshot_hashed() : lm_st_open_snapshot(), and the sha256 of the copied bytes
 *  (lm_st_snapshot_sha256), from the copy's buffers: computed by a thread of its own while they
 *  are copied and after, or by the calling thread as it copies (see lm_st_snapshot_hash_here). */
lm_st_file *lm_st_open_snapshot_hashed(const char *path, lm_err *err);

/*! lm_st_snapshot_hash_here() : 1: the snapshots this thread opens hashed are hashed by this
 *  thread as it copies them (from the copy's buffer), not by a thread of their own; for callers
 *  that already open several at once on threads of their own.  0 (the default): a hasher thread
 *  while fewer than two run, else this thread. */
void lm_st_snapshot_hash_here(int on);

/*! lm_st_snapshot_sha256() : waits for the sha256 of f's bytes (a snapshot opened hashed) and puts
 *  it as 64 lowercase hex digits into hex.  @return 0, or -1 when f has none (not a hashed
 *  snapshot, too short to be copied, or the hash could not be made): the caller hashes the file. */
int lm_st_snapshot_sha256(lm_st_file *f, char hex[65]);

/*! lm_st_snapshot_read() : the n bytes at p, a range of snapshot f's mapping, into dst by pread
 *  from its sealed memfd (the same bytes, never changed): they are read without mapping a page
 *  (no fault, nothing resident to drop after).  @return 0, or -1 when f is not a snapshot or the
 *  range is not in its mapping (the caller reads the mapping). */
int lm_st_snapshot_read(const lm_st_file *f, const void *p, void *dst, size_t n);

/*! lm_st_snapshot_all_finite() : 1 when f is a hashed snapshot and every value of its F32, F16,
 *  BF16 and F64 tensors was seen finite (no inf, no NaN) as its bytes were copied; 0 otherwise
 *  (a value that is not, or not looked at). */
int lm_st_snapshot_all_finite(const lm_st_file *f);

/*! lm_any_non_finite() : 1 when one of the n values at p (dtype dt: F32, F16, BF16 or F64; any
 *  other gives 0) is inf or NaN. */
int lm_any_non_finite(const uint8_t *p, size_t n, lm_dtype dt);

/*! lm_st_input_changed() : 1 when the file f was opened from (the original of a snapshot) is no
 *  longer what was read: another size, modification or change time, or (by path, for a snapshot)
 *  another inode.  0 for buffers and unchanged files. */
int lm_st_input_changed(const lm_st_file *f);

/* An open-addressing set of names, each identified by an index into the owner's array.  The
 * capacity is fixed at init for the expected count (never more than half full), so inserting
 * never reallocates.  Names are looked up through key_of(ctx, index), so the table stores only
 * 32-bit indices (4 bytes x 2 per name). */
typedef const char *(*st_key_of_fn)(const void *ctx, size_t index);

typedef struct st_strmap {
    uint32_t *slots; /* owned: index + 1, 0 = empty */
    size_t cap;      /* power of two */
} st_strmap;

uint32_t st_hash_name(const char *s);
/*! st_strmap_init() : room for n_max names.  @return 0, or -1 when out of memory (or n_max
 *  does not fit in 32 bits). */
int st_strmap_init(st_strmap *m, size_t n_max);
void st_strmap_free(st_strmap *m);
/*! st_strmap_find() : @return the index of name, or SIZE_MAX. */
size_t st_strmap_find(const st_strmap *m, const char *name, st_key_of_fn key_of, const void *ctx);
/*! st_strmap_insert() : adds index under name unless the name is there already.
 *  @return SIZE_MAX when added, else the index already holding that name. */
size_t st_strmap_insert(st_strmap *m, const char *name, size_t index, st_key_of_fn key_of,
                        const void *ctx);

/*! lm_model_from_images() : a model whose files are safetensors images in memory (converted from
 *  another format); takes the images (freed with the model, or here on failure).  names[i] is
 *  what errors and lm_st_path() call image i; index_path may be NULL. */
lm_model *lm_model_from_images(void **images, const size_t *n_bytes, const char *const *names, size_t n,
                               const char *index_path, lm_err *err);

/*! st_tensor_bytes() : info->end - info->begin (validated equal to the dtype x shape size). */
static inline uint64_t st_tensor_bytes(const lm_tensor_info *t)
{
    return t->end - t->begin;
}

/*! lm_read_small_file() : the whole regular file at path (at most max_bytes), NUL-terminated
 *  (malloc'd), *n_out its size.  Opened without blocking (a FIFO is refused, never waited on),
 *  read with EINTR retried.  NULL on failure, *why saying which: LM_READ_ERROR (err filled: cannot
 *  open, stat or read, with errno; out of memory), or, err left for the caller's own words,
 *  LM_READ_DIRECTORY, LM_READ_NOT_REGULAR, LM_READ_TOO_LARGE (*n_out = its size). */
enum { LM_READ_ERROR, LM_READ_DIRECTORY, LM_READ_NOT_REGULAR, LM_READ_TOO_LARGE };
char *lm_read_small_file(const char *path, size_t max_bytes, size_t *n_out, int *why, lm_err *err);

#endif
