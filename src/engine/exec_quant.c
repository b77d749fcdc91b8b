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

/* the second scales: how many, and the rows each covers */
static uint64_t n2_of(const lm_qtensor *q)
{
    return q->n_scale2 ? q->n_scale2 : 1;
}

static uint64_t rows2_of(const lm_plan_tensor *t)
{
    return t->q->scale2_rows ? t->q->scale2_rows : t->rows;
}

size_t lm_xq_amax_slots(const lm_plan_tensor *t)
{
    return (size_t)n2_of(t->q);
}

lm_code lm_xq_load_scales(const lm_plan_tensor *t, const lm_model *model, float **scales, lm_err *err)
{
    const lm_qtensor *q = t->q;
    size_t n = (size_t)(q->srows * q->scols), n2 = (size_t)n2_of(q);
    *scales = malloc((n + 2 * n2) * sizeof **scales);
    if (*scales == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the scales of '%s'", t->name);
    for (size_t k = 0; k < n2; k++) {
        (*scales)[n + k] = 1.0f;
        (*scales)[n + n2 + k] = -1.0f; /* the merged amax, when the format needs it (lm_xq_set_amax()) */
    }
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
        lm_q_scales_to_f32(LM_DT_F32, entry_bytes(model, q->scale2), n2, *scales + n);
    return LM_OK;
}

/* the tile's scales: the block rows its rows cover */
static size_t tile_scales(const lm_qtensor *q, uint64_t nr)
{
    return (size_t)((nr + q->br - 1) / q->br * q->scols);
}

/* rows [r0, r0 + nr) from their codes; g: the second scales of those rows (g[0] for row r0's) */
static void dequant_tile(const lm_plan_tensor *t, const float *tscales, const float *g, const uint8_t *codes,
                         uint64_t r0, uint64_t nr, float *dst)
{
    const lm_qtensor *q = t->q;
    switch (q->fmt) {
    case LM_Q_MXFP4: /* E2M1 pairs times the E8M0 scale of their group of 32 */
        lm_mxfp4_dequant(codes, tscales, nr, t->cols, dst);
        break;
    case LM_Q_CT_NVFP4: /* each run of rows with its second scale (br = 1: a row of group scales a row) */
    case LM_Q_MO_NVFP4:
        for (uint64_t r = r0, R2 = rows2_of(t); r < r0 + nr;) {
            uint64_t end = (r / R2 + 1) * R2 < r0 + nr ? (r / R2 + 1) * R2 : r0 + nr, k = r - r0;
            lm_nvfp4_dequant(codes + k * q->row_bytes, tscales + k * q->scols, g[r / R2 - r0 / R2],
                             q->fmt == LM_Q_MO_NVFP4, q->bc, end - r, t->cols, dst + k * t->cols);
            r = end;
        }
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
    dequant_tile(t, scales + (r0 / q->br) * q->scols, scales + q->srows * q->scols + r0 / rows2_of(t), src, r0, nr,
                 dst);
}

void lm_xq_tile_amax(const lm_plan_tensor *t, const float *acc, uint64_t r0, uint64_t nr, uint32_t *slots)
{
    const uint64_t R2 = rows2_of(t);
    for (uint64_t r = r0; r < r0 + nr; r++) { /* |x| orders as its bits; NaN above inf */
        uint32_t m = slots[r / R2];
        for (uint64_t c = 0; c < t->cols; c++) {
            uint32_t u;
            memcpy(&u, &acc[(r - r0) * t->cols + c], 4);
            u &= 0x7FFFFFFFu;
            m = u > m ? u : m;
        }
        slots[r / R2] = m;
    }
}

void lm_xq_set_amax(const lm_plan_tensor *t, float *scales, const float *amax)
{
    const size_t n2 = (size_t)n2_of(t->q);
    memcpy(scales + t->q->srows * t->q->scols + n2, amax, n2 * sizeof *amax);
}

size_t lm_xq_qbuf_floats(size_t max_elems)
{
    return 2 * max_elems + 128;
}

size_t lm_xq_requant(const lm_plan_tensor *t, const float *scales, const float *acc, const uint8_t *codes0,
                     uint64_t r0, uint64_t nr, uint8_t *out, float *qbuf, lm_qstats *st, lm_xq_piece pieces[2])
{
    const lm_qtensor *q = t->q;
    const size_t ns = tile_scales(q, nr), n = (size_t)(q->srows * q->scols), n2 = (size_t)n2_of(q);
    const uint64_t R2 = rows2_of(t), e0 = r0 / R2, ne = (r0 + nr - 1) / R2 - e0 + 1; /* second scales touched */
    const float *s0 = scales + (r0 / q->br) * q->scols;
    qbuf[ns] = scales[n];
    switch (q->fmt) {
    case LM_Q_CT_NVFP4: /* each run of rows under one second scale, which that run's amax decides */
    case LM_Q_MO_NVFP4:
        for (uint64_t r = r0; r < r0 + nr;) {
            const uint64_t e = r / R2, end = (e + 1) * R2 < r0 + nr ? (e + 1) * R2 : r0 + nr, k = r - r0;
            lm_nvfp4_requant(acc + k * t->cols, codes0 + k * q->row_bytes, s0 + k * q->scols, scales[n + e],
                             q->fmt == LM_Q_MO_NVFP4, q->bc, scales[n + n2 + e], end - r, t->cols,
                             out + k * q->row_bytes, qbuf + k * q->scols, qbuf + ns + (e - e0), st);
            r = end;
        }
        break;
    case LM_Q_CT_FP8: /* compressed-tensors' rule, scales in their dtype */
        lm_ct_fp8_requant(acc, codes0, s0, q->scols, q->br, q->bc, nr, t->cols, q->scale_dtype,
                          q->needs_amax ? scales[n + n2] : -1.0f, out, qbuf, st);
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
        enc = qbuf + ns + ne;
        lm_q_scales_from_f32(q->scale_dtype, qbuf, ns, enc);
    }
    pieces[0] = (lm_xq_piece){q->scale_index, (r0 / q->br) * q->scols * esz, ns * esz, enc};
    if (q->scale2 == NULL)
        return 1;
    pieces[1] = (lm_xq_piece){q->scale2_index, e0 * sizeof(float), (size_t)ne * sizeof(float), qbuf + ns};
    return 2;
}

int lm_xq_fused(const lm_plan_tensor *t)
{
    return t->q != NULL && t->q->fmt == LM_Q_FP8_BLOCK && t->dtype == t->src_dtype && !t->q->out_transposed &&
           t->q->scale_dtype == LM_DT_F32 && t->q->scale2 == NULL && !t->sim_nf4;
}

/* one block by the kernels (lm_fp8_merge_block): the term's rows of the block, A's columns of the
 * block packed (K rows of w floats) when room allows (rows cols * 4 bytes apart would share a few
 * L1 sets), the merged values into x (h x w) */
static void merge_block_k(const lm_kernels *k, const lm_xq_term *term, const uint8_t *q0, float s0, uint64_t R,
                          uint64_t h, uint64_t c0, uint64_t w, uint64_t cols, float *x, float *apack, size_t room,
                          uint8_t *q, float *out_scale, lm_qstats *st)
{
    lm_fp8_term ft = {term->B, term->A + c0, (size_t)term->K, (size_t)cols, (size_t)term->K, 0, 0, term->alpha};
    const uint64_t lo = term->row0 > R ? term->row0 : R, hi = term->row0 + term->n < R + h ? term->row0 + term->n : R + h;
    if (lo < hi) {
        ft.B = term->B + (lo - term->row0) * term->K;
        ft.r_lo = (size_t)(lo - R);
        ft.r_hi = (size_t)(hi - R);
        if (term->K * w <= room) {
            for (uint64_t p = 0; p < term->K; p++)
                memcpy(apack + p * w, term->A + p * cols + c0, (size_t)w * sizeof *apack);
            ft.A = apack;
            ft.lda = (size_t)w;
        }
    }
    lm_fp8_merge_block(k, q0, s0, h, w, cols, &ft, x, w, q, out_scale, st);
}

size_t lm_xq_merge_tile(const lm_plan_tensor *t, const lm_kernels *k, const float *scales, const uint8_t *codes0,
                        uint64_t r0, uint64_t nr, float *acc, const lm_xq_term *term, lm_xq_apply_fn apply, void *ctx,
                        uint8_t *out, float *qbuf, lm_qstats *st, lm_xq_piece pieces[2])
{
    const lm_qtensor *q = t->q;
    const uint64_t cols = t->cols, br = q->br, bc = q->bc;
    const float *s0 = scales + (r0 / br) * q->scols;
    const size_t ns = tile_scales(q, nr), off = (ns + 16) / 16 * 16;
    const size_t room = (size_t)(2 * nr * cols + 128) - off; /* lm_xq_qbuf_floats(): qbuf's floats past off */
    float *base = qbuf + off; /* a block's base values (lm_xq_qbuf_floats: room), or its merged values */
    const int kern = term != NULL && k->fp8_merge != NULL;
    const uint64_t nonfinite0 = st->n_nonfinite_blocks;
    for (uint64_t rr = 0; rr < nr; rr += br) { /* tiles start on a block row (lm_plan_tile_rows) */
        const uint64_t h = rr + br < nr ? br : nr - rr;
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const uint64_t w = c0 + bc < cols ? bc : cols - c0, bi = (rr / br) * q->scols + c0 / bc, e = rr * cols + c0;
            if (kern) {
                merge_block_k(k, term, codes0 + e, s0[bi], r0 + rr, h, c0, w, cols, base, base + h * w,
                              room - (size_t)(h * w), out + e, qbuf + bi, st);
                continue;
            }
            lm_fp8_dequant_block(codes0 + e, s0[bi], h, w, cols, acc + e, base);
            apply(ctx, rr, h, c0, w);
            lm_fp8_requant_block(acc + e, base, codes0 + e, s0[bi], h, w, cols, out + e, qbuf + bi, st);
        }
    }
    if (kern && st->n_nonfinite_blocks != nonfinite0) /* the merged tile into acc, for the caller's checks */
        for (uint64_t rr = 0; rr < nr; rr += br) {
            const uint64_t h = rr + br < nr ? br : nr - rr;
            for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
                const uint64_t w = c0 + bc < cols ? bc : cols - c0, bi = (rr / br) * q->scols + c0 / bc;
                lm_fp8_dequant_block(codes0 + rr * cols + c0, s0[bi], h, w, cols, acc + rr * cols + c0, base);
                apply(ctx, rr, h, c0, w);
            }
        }
    qbuf[ns] = scales[q->srows * q->scols]; /* (lm_xq_dequant_written() reads it) */
    pieces[0] = (lm_xq_piece){q->scale_index, (r0 / br) * q->scols * sizeof(float), ns * sizeof(float), qbuf};
    return 1;
}

void lm_xq_dequant_written(const lm_plan_tensor *t, const float *qbuf, const uint8_t *out, uint64_t r0,
                           uint64_t nr, float *dst)
{
    dequant_tile(t, qbuf, qbuf + tile_scales(t->q, nr), out, r0, nr, dst);
}
