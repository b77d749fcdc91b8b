/* SPDX-License-Identifier: MIT */
/* tensor_set.h : a named set of tensors held in memory or borrowed from a mapping.
 * Adapter weights come as a tensor set, whether they were read from adapter_model.safetensors
 * (data borrowed from the file mapping) or from adapter_model.bin (data copied out of the
 * archive, made contiguous and little-endian).  The set owns its names and any copied data. */
#ifndef LM_TENSOR_SET_H
#define LM_TENSOR_SET_H

#include "lora_merge.h"

#define LM_TS_MAX_DIMS 8

typedef struct lm_ts_tensor {
    char *name;        /* owned */
    lm_dtype dtype;
    size_t n_dims;
    uint64_t shape[LM_TS_MAX_DIMS];
    uint64_t n_elems;
    uint64_t n_bytes;  /* n_elems * bits / 8 */
    const void *data;  /* contiguous, row-major, little-endian; owned or borrowed (see set) */
    int file_backed;   /* data lies in the set's safetensors file mapping (lm_ts_drop_pages) */
    const lm_st_file *file; /* file_backed: that file */
    int shared;        /* read by every module (base_model.vera_A ...): its pages stay mapped for the
                          whole merge instead of being dropped after each tensor (set by the planner) */
} lm_ts_tensor;

typedef struct lm_tensor_set {
    size_t n, cap;
    lm_ts_tensor *t;     /* owned array */
    void **owned;        /* data blocks freed with the set */
    size_t n_owned, cap_owned;
    lm_st_file *st;      /* when the data is borrowed from a safetensors file: closed with the set */
    char *source_path;   /* owned: the file the tensors came from */
    /* name -> index: open addressing, index + 1 per slot (0 empty, SIZE_MAX a removed entry);
     * n_slots a power of two at least twice n.  Keeps lm_ts_add/lm_ts_find O(1), so a file of
     * 160k tiny tensors loads in linear time (issue 15). */
    size_t *slots, n_slots, n_gone;
} lm_tensor_set;

/*! lm_ts_create() : an empty set. @return NULL on allocation failure. */
lm_tensor_set *lm_ts_create(const char *source_path);
void lm_ts_free(lm_tensor_set *ts);

/*! lm_ts_add() : appends a tensor.  name is copied.  If take_ownership, data (from malloc) is
 *  freed with the set, else it is borrowed and must outlive the set.  n_dims <= LM_TS_MAX_DIMS.
 *  Fails with a "DuplicateKey" error if the name exists already. */
lm_code lm_ts_add(lm_tensor_set *ts, const char *name, lm_dtype dtype, size_t n_dims,
                  const uint64_t *shape, const void *data, int take_ownership, lm_err *err);

/*! lm_ts_drop_pages() : once a tensor's data has been read, drops its pages from this process
 *  when they come from a file mapping (no-op otherwise): adapters larger than memory's budget
 *  are not kept resident by having been looked at. */
void lm_ts_drop_pages(const lm_ts_tensor *t);

/*! lm_ts_read_bytes() : bytes [off, off + n) of tensor t's data into dst, read with pread when t
 *  lies in a snapshot's mapping (lm_st_snapshot_read: no page of the mapping touched, nothing to
 *  drop).  @return 0, or -1 when t does not (the caller reads t->data). */
int lm_ts_read_bytes(const lm_ts_tensor *t, uint64_t off, void *dst, size_t n);
/*! lm_ts_find() : by exact name, or NULL (hashed). */
const lm_ts_tensor *lm_ts_find(const lm_tensor_set *ts, const char *name);

/*! lm_ts_rename() : tensor i takes new_name (from malloc, handed over; the old name is freed).
 *  The caller has checked that no other tensor has that name.  Never rename ts->t[i].name in
 *  place: the name index would not know.  @return LM_E_NOMEM (new_name freed, nothing changed). */
lm_code lm_ts_rename(lm_tensor_set *ts, size_t i, char *new_name, lm_err *err);

#endif
