/* SPDX-License-Identifier: MIT */
/* torch_model.h : a PyTorch checkpoint as a base model: pytorch_model.bin (torch.save of a state
 * dict, zip or legacy), or its shards listed by pytorch_model.bin.index.json.  Each file is read
 * by the restricted reader (torch_bin.c: nothing executed) and laid out in memory as a
 * safetensors image, so the rest of lora-merge sees an ordinary model (lm_model_open() calls
 * this).  Memory: every shard is held in memory, twice while one is converted; the safetensors
 * files lora-merge writes are the way back to bounded memory. */
#ifndef LM_TORCH_MODEL_H
#define LM_TORCH_MODEL_H

#include "lora_merge.h"

/*! lm_torch_model_is_file() : 1 when path names a PyTorch checkpoint file or its index
 *  (*.bin, *.pt, *.pth, *.bin.index.json). */
int lm_torch_model_is_file(const char *path);
/*! lm_torch_model_in_dir() : 1 when dir holds pytorch_model.bin.index.json or pytorch_model.bin. */
int lm_torch_model_in_dir(const char *dir);

/*! lm_torch_model_open() : path is a checkpoint file, its index, or a directory holding one.
 *  @return the model (close with lm_model_close()), or NULL with *err naming the file. */
lm_model *lm_torch_model_open(const char *path, lm_err *err);

#endif
