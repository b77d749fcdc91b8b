/* SPDX-License-Identifier: MIT */
/* inputs.h : what a path given as BASE or ADAPTER_DIR really is.  Turns the errors users meet
 * most (a Git LFS pointer, a GGUF file, a Hub id, the two arguments swapped)
 * into one line that says what the file is and what to do; and compares the base an adapter
 * declares with the base it is merged into. */
#ifndef LM_INPUTS_H
#define LM_INPUTS_H

#include "adapter_load.h"
#include "lora_merge.h"
#include "model_files.h"
#include "report.h"

/*! lm_inputs_precheck() : before anything is opened: a BASE that is an adapter directory, an
 *  ADAPTER_DIR that is a model directory (swapped arguments), a path that does not exist and
 *  looks like a Hugging Face Hub id.  @return LM_OK or LM_E_USAGE with *err. */
lm_code lm_inputs_precheck(const lm_merge_job *job, lm_err *err);

/*! lm_inputs_explain() : after opening `path` (role "base" or "adapter") failed with *err: when
 *  the file that failed (err->path, else path) is a Git LFS pointer or a GGUF file, or a directory
 *  holding such a file, *err is replaced by an error that says so.  Otherwise *err is left as
 *  it is. */
void lm_inputs_explain(const char *role, const char *path, lm_err *err);

/*! lm_adapter_declared_base() : "base_model_name_or_path" of an adapter_config.json, or NULL
 *  (malloc'd). */
char *lm_adapter_declared_base(const char *config_path);

/*! lm_inputs_check_base() : warns (BaseModelMismatch) when an adapter declares a base that is
 *  not the one given: another name than the base config's _name_or_path, or a model family
 *  that contradicts its model_type. */
void lm_inputs_check_base(const lm_base_info *bi, const char *base_path, lm_adapter *const *ads, size_t n_ads,
                          lm_report_impl *r);

#endif
