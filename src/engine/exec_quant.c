/* SPDX-License-Identifier: MIT */
/* exec_quant.c : quantized tiles (see exec_quant.h). */
#include "exec_quant.h"

#include "lm_error.h"
#include "plan_quant_bnb.h"
#include "quant_bnb.h"
#include "quant_mx.h"
#include "st_reader.h"

#include <stdlib.h>
#include <string.h>

static const uint8_t *entry_bytes(const lm_model *model, const lm_model_entry *e)
{
    return lm_st_data(lm_model_file(model, e->file)) + e->info->begin;
}

/* a bitsandbytes 4-bit weight's absmax as f32: stored, or decoded from the nested ones */
static lm_code bnb4_absmax(const lm_bnb_qinfo *b, const lm_model *model, float *dst, const char *name, lm_err *err)
{
    if (b->nested_absmax == NULL) {
        memcpy(dst, entry_bytes(model, b->absmax), (size_t)b->n_absmax * sizeof(float));
        return LM_OK;
    }
    uint64_t n2 = b->nested_absmax->info->n_elems;
    float map[256], *a2 = malloc((size_t)n2 * sizeof *a2 + 1);
    if (a2 == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the scales of '%s'", name);
    memcpy(map, entry_bytes(model, b->nested_map), sizeof map);
    memcpy(a2, entry_bytes(model, b->nested_absmax), (size_t)n2 * sizeof *a2);
    lm_bnb_nested_absmax(entry_bytes(model, b->absmax), b->n_absmax, map, a2, b->nested_blocksize, b->offset, dst);
    free(a2);
    return LM_OK;
}

lm_code lm_xq_load_scales(const lm_plan_tensor *t, const lm_model *model, float **scales, lm_err *err)
{
    const lm_qtensor *q = t->q;
    size_t n = (size_t)(q->srows * q->scols);
    *scales = malloc((n + 2) * sizeof **scales);
    if (*scales == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the scales of '%s'", t->name);
    (*scales)[n] = 1.0f;
    (*scales)[n + 1] = -1.0f; /* the merged amax, when the format needs it (lm_xq_set_amax()) */
    if (q->fmt == LM_Q_BNB4) {
        lm_code rc = bnb4_absmax(q->ext, model, *scales, t->name, err);
        if (rc != LM_OK) {
            free(*scales);
            *scales = NULL;
        }
        return rc;
    }
    lm_q_scales_to_f32(q->scale_dtype, entry_bytes(model, q->scale), n, *scales);
    if (q->scale2 != NULL)
        lm_q_scales_to_f32(LM_DT_F32, entry_bytes(model, q->scale2), 1, *scales + n);
    return LM_OK;
}

/* the tile's scales: the block rows its rows cover */
static size_t tile_scales(const lm_qtensor *q, uint64_t nr)
{
    return (size_t)((nr + q->br - 1) / q->br * q->scols);
}

static void dequant_tile(const lm_plan_tensor *t, const float *tscales, float global, const uint8_t *codes,
                         uint64_t nr, float *dst)
{
    const lm_qtensor *q = t->q;
    switch (q->fmt) {
    case LM_Q_MXFP4: /* E2M1 pairs times the E8M0 scale of their group of 32 */
        lm_mxfp4_dequant(codes, tscales, nr, t->cols, dst);
        break;
    case LM_Q_CT_NVFP4:
    case LM_Q_MO_NVFP4:
        lm_nvfp4_dequant(codes, tscales, global, q->fmt == LM_Q_MO_NVFP4, q->bc, nr, t->cols, dst);
        break;
    default: /* FP8 codes times the scale of their block */
        lm_fp8_block_dequant(codes, tscales, q->scols, q->br, q->bc, nr, t->cols, dst);
        break;
    }
}

void lm_xq_dequant(const lm_plan_tensor *t, const float *scales, const uint8_t *src, uint64_t r0, uint64_t nr,
                   float *dst)
{
    const lm_qtensor *q = t->q;
    if (q->fmt == LM_Q_BNB4) { /* blocks of the flattened tensor: element r0 * cols on (cols even: a byte) */
        const lm_bnb_qinfo *b = q->ext;
        lm_bnb4_dequant(b->code, src, scales, b->blocksize, r0 * t->cols, nr * t->cols, dst);
        return;
    }
    if (q->fmt == LM_Q_BNB8) { /* one SCB a row */
        lm_bnb_int8_dequant((const int8_t *)src, scales + r0, nr, t->cols, dst);
        return;
    }
    dequant_tile(t, scales + (r0 / q->br) * q->scols, scales[q->srows * q->scols], src, nr, dst);
}

void lm_xq_set_amax(const lm_plan_tensor *t, float *scales, float amax)
{
    scales[t->q->srows * t->q->scols + 1] = amax;
}

size_t lm_xq_qbuf_floats(size_t max_elems)
{
    return 2 * max_elems + 128;
}

size_t lm_xq_requant(const lm_plan_tensor *t, const float *scales, const float *acc, const uint8_t *codes0,
                     uint64_t r0, uint64_t nr, uint8_t *out, float *qbuf, lm_qstats *st, lm_xq_piece pieces[2])
{
    const lm_qtensor *q = t->q;
    const size_t ns = tile_scales(q, nr);
    const float *s0 = scales + (r0 / q->br) * q->scols;
    qbuf[ns] = scales[q->srows * q->scols];
    switch (q->fmt) {
    case LM_Q_CT_NVFP4: /* the whole tensor (tile_rows = rows): its amax decides the second scale */
    case LM_Q_MO_NVFP4:
        lm_nvfp4_requant(acc, codes0, s0, scales[q->srows * q->scols], q->fmt == LM_Q_MO_NVFP4, q->bc,
                         scales[q->srows * q->scols + 1], nr, t->cols, out, qbuf, qbuf + ns, st);
        break;
    case LM_Q_CT_FP8: /* compressed-tensors' rule, scales in their dtype */
        lm_ct_fp8_requant(acc, codes0, s0, q->scols, q->br, q->bc, nr, t->cols, q->scale_dtype,
                          q->needs_amax ? scales[q->srows * q->scols + 1] : -1.0f, out, qbuf, st);
        break;
    case LM_Q_MXFP4: /* triton_kernels' downcast_to_mxfp_torch (transformers' quantize_to_mxfp4) */
        lm_mxfp4_requant(acc, codes0, s0, nr, t->cols, out, qbuf, st);
        break;
    default: /* block FP8 (transformers' FineGrainedFP8 rule) */
        lm_fp8_block_requant(acc, codes0, s0, q->scols, q->br, q->bc, nr, t->cols, out, qbuf, st);
        break;
    }
    const size_t esz = lm_dtype_bits(q->scale_dtype) / 8;
    void *enc = qbuf;
    if (q->scale_dtype != LM_DT_F32) {
        enc = qbuf + ns + 1;
        lm_q_scales_from_f32(q->scale_dtype, qbuf, ns, enc);
    }
    pieces[0] = (lm_xq_piece){q->scale_index, (r0 / q->br) * q->scols * esz, ns * esz, enc};
    if (q->scale2 == NULL)
        return 1;
    pieces[1] = (lm_xq_piece){q->scale2_index, 0, sizeof(float), qbuf + ns};
    return 2;
}

int lm_xq_fused(const lm_plan_tensor *t)
{
    return t->q != NULL && t->q->fmt == LM_Q_FP8_BLOCK && t->dtype == t->src_dtype && !t->q->out_transposed &&
           t->q->scale_dtype == LM_DT_F32 && t->q->scale2 == NULL && !t->sim_nf4;
}

size_t lm_xq_merge_tile(const lm_plan_tensor *t, const float *scales, const uint8_t *codes0, uint64_t r0, uint64_t nr,
                        float *acc, lm_xq_apply_fn apply, void *ctx, uint8_t *out, float *qbuf, lm_qstats *st,
                        lm_xq_piece pieces[2])
{
    const lm_qtensor *q = t->q;
    const uint64_t cols = t->cols, br = q->br, bc = q->bc;
    const float *s0 = scales + (r0 / br) * q->scols;
    const size_t ns = tile_scales(q, nr);
    float *base = qbuf + (ns + 16) / 16 * 16; /* a block's base values (lm_xq_qbuf_floats: room) */
    for (uint64_t rr = 0; rr < nr; rr += br) { /* tiles start on a block row (lm_plan_tile_rows) */
        const uint64_t h = rr + br < nr ? br : nr - rr;
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const uint64_t w = c0 + bc < cols ? bc : cols - c0, bi = (rr / br) * q->scols + c0 / bc, e = rr * cols + c0;
            lm_fp8_dequant_block(codes0 + e, s0[bi], h, w, cols, acc + e, base);
            apply(ctx, rr, h, c0, w);
            lm_fp8_requant_block(acc + e, base, codes0 + e, s0[bi], h, w, cols, out + e, qbuf + bi, st);
        }
    }
    qbuf[ns] = scales[q->srows * q->scols]; /* (lm_xq_dequant_written() reads it) */
    pieces[0] = (lm_xq_piece){q->scale_index, (r0 / br) * q->scols * sizeof(float), ns * sizeof(float), qbuf};
    return 1;
}

void lm_xq_dequant_written(const lm_plan_tensor *t, const float *qbuf, const uint8_t *out, uint64_t r0,
                           uint64_t nr, float *dst)
{
    (void)r0;
    dequant_tile(t, qbuf, qbuf[tile_scales(t->q, nr)], out, nr, dst);
}
