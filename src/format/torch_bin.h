/* SPDX-License-Identifier: MIT */
/* torch_bin.h : tensors from a torch.save() state dict (adapter_model.bin), executing nothing.
 *
 * Two layouts exist:
 *   zip (torch >= 1.6):  <prefix>/data.pkl       the state-dict pickle (see pickle_reader.h)
 *                        <prefix>/data/<key>     one raw storage per key (stored, as torch writes;
 *                                                deflated entries are read too)
 *                        <prefix>/byteorder      "little" or "big" (absent: little)
 *                        <prefix>/version, .format_version, .storage_alignment, ... (ignored)
 *   legacy (_use_new_zipfile_serialization=False): five pickles one after the other -- the magic
 *     number 0x1950a86a20f9469cfc6c, the protocol version 1001, sys_info (a dict), the state
 *     dict, the sorted list of storage keys -- then for each listed key: an 8-byte little-endian
 *     element count followed by the storage's bytes (little-endian).
 * Storages are referenced from the pickle by ('storage', torch.<T>Storage, key, location, numel). */
#ifndef LM_TORCH_BIN_H
#define LM_TORCH_BIN_H

#include "lora_merge.h"
#include "tensor_set.h"

/*! lm_torch_bin_load() :
 *  Reads a torch.save() state dict (zip or legacy) of tensors.  Every tensor is returned
 *  contiguous, row-major, little-endian (strided views are gathered; big-endian byteorder
 *  entries byte-swapped), with its key as name, into a new lm_tensor_set (owned data).
 *  Non-tensor values in the dict are refused with a message naming the key.
 *  @return LM_OK or an error with err->path = path.
 *  Ownership: free *out with lm_ts_free(); it holds copies, nothing borrowed from the file. */
lm_code lm_torch_bin_load(const char *path, lm_tensor_set **out, lm_err *err);

/*! lm_torch_bin_load_buffer() : the same on bytes in memory (for the fuzzer and tests); name is
 *  used in errors and as the set's source_path.  buf is only read during the call. */
lm_code lm_torch_bin_load_buffer(const void *buf, size_t n_bytes, const char *name,
                                 lm_tensor_set **out, lm_err *err);

/* What lm_torch_obj_load() found at the top of the pickle. */
enum { LM_TORCH_ROOT_DICT = 0, LM_TORCH_ROOT_LIST, LM_TORCH_ROOT_TENSOR };

/*! lm_torch_obj_load() :
 *  As lm_torch_bin_load(), but the saved object may also be a list of tensors (lora_diffusion's
 *  [up_0, down_0, up_1, ...]: items are named "0", "1" ... in list order) or one tensor (named
 *  "tensor"); *root_kind receives LM_TORCH_ROOT_DICT, _LIST or _TENSOR. */
lm_code lm_torch_obj_load(const char *path, lm_tensor_set **out, int *root_kind, lm_err *err);
lm_code lm_torch_obj_load_buffer(const void *buf, size_t n_bytes, const char *name,
                                 lm_tensor_set **out, int *root_kind, lm_err *err);

/* Supplies the bytes of one storage: *data must point to n_bytes bytes that stay valid until
 * lm_torch_pickle_load() returns, or the function fails with err filled. */
typedef lm_code (*lm_torch_storage_fn)(void *ctx, const char *key, lm_dtype dtype,
                                       uint64_t n_bytes, const void **data, lm_err *err);

/*! lm_torch_pickle_load() :
 *  The pickle layer alone, for fuzzing: parses a state-dict pickle with the restricted rules,
 *  storages resolved through fn, and builds the tensor set as lm_torch_bin_load() does.
 *  Ownership: as lm_torch_bin_load(). */
lm_code lm_torch_pickle_load(const void *pkl, size_t n_bytes, const char *name,
                             lm_torch_storage_fn fn, void *ctx, lm_tensor_set **out, lm_err *err);

#endif
