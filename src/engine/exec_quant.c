/* SPDX-License-Identifier: MIT */
/* exec_quant.c : quantized tiles (see exec_quant.h). */
#include "exec_quant.h"

#include "lm_error.h"
#include "st_reader.h"

#include <stdlib.h>
#include <string.h>

lm_code lm_xq_load_scales(const lm_plan_tensor *t, const lm_model *model, float **scales, lm_err *err)
{
    const lm_qtensor *q = t->q;
    const lm_tensor_info *si = q->scale->info;
    *scales = malloc((size_t)(q->srows * q->scols + 1) * sizeof **scales);
    if (*scales == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the scales of '%s'", t->name);
    const lm_st_file *f = lm_model_file(model, q->scale->file);
    memcpy(*scales, lm_st_data(f) + si->begin, (size_t)(q->srows * q->scols) * sizeof **scales);
    return LM_OK;
}

void lm_xq_dequant(const lm_plan_tensor *t, const float *scales, const uint8_t *src, uint64_t r0, uint64_t nr,
                   float *dst)
{
    const lm_qtensor *q = t->q;
    lm_fp8_block_dequant(src, scales + (r0 / q->br) * q->scols, q->scols, q->br, q->bc, nr, t->cols, dst);
}

size_t lm_xq_requant(const lm_plan_tensor *t, const float *scales, const float *acc, const uint8_t *codes0,
                     uint64_t r0, uint64_t nr, uint8_t *out, float *out_scales, lm_qstats *st)
{
    const lm_qtensor *q = t->q;
    lm_fp8_block_requant(acc, codes0, scales + (r0 / q->br) * q->scols, q->scols, q->br, q->bc, nr, t->cols, out,
                         out_scales, st);
    return (size_t)((nr + q->br - 1) / q->br * q->scols) * sizeof(float);
}

uint64_t lm_xq_scale_offset(const lm_plan_tensor *t, uint64_t r0)
{
    return r0 / t->q->br * t->q->scols * sizeof(float);
}
