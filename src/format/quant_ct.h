/* SPDX-License-Identifier: MIT */
/* quant_ct.h : compressed-tensors and ModelOpt quantization_config (quant_ct.c), for quant.c */
#ifndef LM_QUANT_CT_H
#define LM_QUANT_CT_H

#include "quant.h"
#include "st_json.h"

/*! lm_qscheme_parse_ct() : a compressed-tensors quantization_config qc into s (fmt, the float
 *  weights' strategy, group size, block structure).  @return LM_OK or LM_E_FORMAT */
lm_code lm_qscheme_parse_ct(const st_json_doc *d, const st_json_node *qc, lm_qscheme *s, lm_err *err);

/*! lm_qscheme_parse_modelopt_qc() : config.json's quantization_config with quant_method
 *  "modelopt" (quant_algo, group_size, ignore).  @return LM_OK or LM_E_NOMEM */
lm_code lm_qscheme_parse_modelopt_qc(const st_json_doc *d, const st_json_node *qc, lm_qscheme *s, lm_err *err);

#endif
