/* SPDX-License-Identifier: MIT */
/* pickle_reader.h : a restricted reader of Python pickles, enough for torch.save() state dicts.
 *
 * A pickle is a program for a small stack machine: one opcode byte, then its argument bytes.
 * This reader knows only the opcodes a tensor state dict uses, and it executes nothing: GLOBAL
 * and STACK_GLOBAL may name only the allow-listed callables and storage types below, REDUCE
 * runs our own C emulation of the few allowed callables (building a tensor record or an empty
 * dict), and BINPERSID turns torch's ('storage', <type>, key, location, numel[, None]) tuples
 * into storage records.  Everything else is refused with an lm_err naming what was found.
 *
 *   allowed opcodes: PROTO FRAME STOP MARK POP POP_MARK EMPTY_DICT EMPTY_LIST EMPTY_TUPLE DICT LIST
 *     TUPLE TUPLE1 TUPLE2 TUPLE3 NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 BINFLOAT
 *     SHORT_BINUNICODE BINUNICODE BINUNICODE8 BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET
 *     SETITEM SETITEMS APPEND APPENDS GLOBAL STACK_GLOBAL REDUCE BUILD BINPERSID
 *   allowed globals: collections.OrderedDict, torch._utils._rebuild_tensor_v2,
 *     torch._utils._rebuild_parameter, torch._utils._rebuild_parameter_with_state,
 *     torch.{Float,Half,BFloat16,Double,Long,Int,Short,Char,Byte,Bool}Storage
 *
 * Objects live in an arena and are referenced by index, so memo sharing costs nothing and no
 * walk over the object graph is ever recursive.  Strings point into the input buffer. */
#ifndef LM_PICKLE_READER_H
#define LM_PICKLE_READER_H

#include "lora_merge.h"

#define LM_PK_MAX_DIMS 8

/* Limits against hostile input; a zero field takes the default shown. */
typedef struct lm_pk_limits {
    size_t max_objects;   /* objects created (1,000,000) */
    size_t max_items;     /* references stored in containers, all containers together (4,000,000) */
    size_t max_stack;     /* stack entries (262,144) */
    size_t max_memo;      /* memo keys must be below this (1,048,576) */
    size_t max_depth;     /* MARK nesting and container nesting (100) */
    size_t max_str_bytes; /* one string (1 MiB) */
} lm_pk_limits;

typedef enum lm_pk_kind {
    LM_PK_NONE = 0, LM_PK_BOOL, LM_PK_INT, LM_PK_BIGINT, LM_PK_FLOAT, LM_PK_STR,
    LM_PK_TUPLE, LM_PK_LIST, LM_PK_DICT, LM_PK_GLOBAL, LM_PK_STORAGE, LM_PK_TENSOR
} lm_pk_kind;

typedef uint32_t lm_pk_ref; /* an object of a parsed pickle */

typedef struct lm_pk_storage {
    char *key;          /* owned, NUL-terminated (torch: "0", "1", ...) */
    lm_dtype dtype;
    unsigned elem_bytes;
    uint64_t n_elems;   /* as declared by the pickle */
    uint64_t n_bytes;   /* n_elems * elem_bytes (checked) */
    size_t n_tensors;   /* tensors that reference it */
} lm_pk_storage;

typedef struct lm_pk_tensor {
    size_t storage;     /* index: lm_pk_storage_at() */
    uint64_t offset;    /* in elements */
    size_t n_dims;
    uint64_t shape[LM_PK_MAX_DIMS];
    uint64_t stride[LM_PK_MAX_DIMS]; /* in elements */
    uint64_t n_elems;
} lm_pk_tensor;

/* Called once per distinct storage key, when it is first referenced: may refuse it (for
 * instance when the archive has no such entry) by returning an error filled into err. */
typedef lm_code (*lm_pk_storage_fn)(void *ctx, size_t index, const lm_pk_storage *st, lm_err *err);

typedef struct lm_pk_options {
    lm_pk_limits limits;
    uint64_t base_offset;     /* added to the byte offsets reported in errors */
    const char *label;        /* prefixed to messages, e.g. "adapter_model/data.pkl"; may be NULL */
    lm_pk_storage_fn resolve; /* may be NULL: every storage is accepted */
    void *ctx;
} lm_pk_options;

typedef struct lm_pickle lm_pickle;

/*! lm_pk_parse() :
 *  Runs the restricted machine over buf up to and including STOP.  Tensor records are checked
 *  against their storage's declared size (offset, shape, stride all inside it).
 *  @return LM_OK with *out, and *n_consumed (may be NULL) = bytes up to and including STOP.
 *  Errors carry err->offset = opts->base_offset + position of the offending opcode.
 *  Ownership: free *out with lm_pk_free(); strings borrow buf, which must outlive *out. */
lm_code lm_pk_parse(const void *buf, size_t n_bytes, const lm_pk_options *opts, lm_pickle **out,
                    size_t *n_consumed, lm_err *err);
void lm_pk_free(lm_pickle *pk);

/* Read-only access to the result (refs are valid for pk; a wrong kind gives 0 / NULL). */
lm_pk_ref lm_pk_root(const lm_pickle *pk);
lm_pk_kind lm_pk_kind_of(const lm_pickle *pk, lm_pk_ref r);
const char *lm_pk_kind_name(lm_pk_kind k);
/*! lm_pk_int() : value of an INT or BOOL.  @return 1 if r is one. */
int lm_pk_int(const lm_pickle *pk, lm_pk_ref r, int64_t *v);
/*! lm_pk_bytes() : raw bytes of a STR (UTF-8, not NUL-terminated) or BIGINT (little-endian
 *  two's complement), borrowed from the input; NULL for other kinds. */
const uint8_t *lm_pk_bytes(const lm_pickle *pk, lm_pk_ref r, size_t *n_bytes);
/*! lm_pk_len() : items of a TUPLE or LIST, key/value pairs of a DICT; 0 otherwise. */
size_t lm_pk_len(const lm_pickle *pk, lm_pk_ref r);
/*! lm_pk_item() : i-th item of a TUPLE/LIST; for a DICT, item 2i is the i-th key, 2i+1 its value. */
lm_pk_ref lm_pk_item(const lm_pickle *pk, lm_pk_ref r, size_t i);
const lm_pk_tensor *lm_pk_tensor_of(const lm_pickle *pk, lm_pk_ref r);
size_t lm_pk_n_storages(const lm_pickle *pk);
const lm_pk_storage *lm_pk_storage_at(const lm_pickle *pk, size_t i);
/*! lm_pk_storage_find() : index of the storage with this key, or SIZE_MAX. */
size_t lm_pk_storage_find(const lm_pickle *pk, const char *key);

#endif
