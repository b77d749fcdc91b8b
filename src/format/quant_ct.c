/* SPDX-License-Identifier: MIT */
/* quant_ct.c : compressed-tensors (vllm-project/compressed-tensors) FP8 and NVFP4 checkpoints,
 * and NVIDIA ModelOpt's NVFP4: the config, and the codecs with each library's own rule. */
#include "quant_ct.h"

#include "lm_error.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* the config                                                                                   */
/* ------------------------------------------------------------------------------------------ */
static const st_json_node *member(const st_json_doc *d, const st_json_node *o, const char *key)
{
    return o && o->type == ST_JSON_OBJECT ? st_json_get(d, o, key, strlen(key)) : NULL;
}

static uint64_t u64_of(const st_json_doc *d, const st_json_node *v)
{
    uint64_t u = 0;
    if (v == NULL || st_json_u64(d, v, &u) != ST_JSON_U64_OK || u > (1u << 20))
        return 0;
    return u;
}

/* config_groups: {"group_0": {"targets": [...], "weights": {"num_bits": 8, "type": "float",
 * "strategy": "channel", "group_size": null, "block_structure": null, "symmetric": true ...},
 * "format": ...}}: the first group whose weights are floats decides */
lm_code lm_qscheme_parse_ct(const st_json_doc *d, const st_json_node *qc, lm_qscheme *s, lm_err *err)
{
    s->fmt = LM_Q_OTHER;
    const st_json_node *groups = member(d, qc, "config_groups");
    for (const st_json_node *g = groups && groups->type == ST_JSON_OBJECT ? st_json_child(d, groups) : NULL; g != NULL;
         g = st_json_next(d, g)) {
        const st_json_node *w = member(d, g, "weights"), *v;
        if (w == NULL || w->type != ST_JSON_OBJECT)
            continue;
        v = member(d, w, "type");
        if (v == NULL || v->type != ST_JSON_STRING || strcmp(st_json_str(d, v), "float") != 0)
            continue;
        uint64_t bits = u64_of(d, member(d, w, "num_bits"));
        if (bits != 8 && bits != 4)
            continue;
        s->fmt = bits == 8 ? LM_Q_CT_FP8 : LM_Q_CT_NVFP4;
        if ((v = member(d, w, "strategy")) != NULL && v->type == ST_JSON_STRING)
            snprintf(s->ct_strategy, sizeof s->ct_strategy, "%s", st_json_str(d, v));
        s->group_size = u64_of(d, member(d, w, "group_size"));
        s->asymmetric = (v = member(d, w, "symmetric")) != NULL && v->type == ST_JSON_FALSE;
        const st_json_node *b = member(d, w, "block_structure");
        if (b != NULL && b->type == ST_JSON_ARRAY) {
            const st_json_node *c0 = st_json_child(d, b), *c1 = c0 ? st_json_next(d, c0) : NULL;
            s->block_rows = u64_of(d, c0);
            s->block_cols = u64_of(d, c1);
            if (s->block_rows == 0 || s->block_cols == 0 || st_json_next(d, c1) != NULL)
                return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "quantization_config: a config group's "
                               "weights.block_structure is not two positive integers");
        }
        break;
    }
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* FP8 (float-quantized)                                                                        */
/* ------------------------------------------------------------------------------------------ */
/* torch.finfo(dtype).eps: the scale that replaces a zero one */
static float dtype_eps(lm_dtype dt)
{
    return dt == LM_DT_BF16 ? 0x1p-7f : dt == LM_DT_F16 ? 0x1p-10f : dt == LM_DT_F8_E4M3 ? 0.125f : 0x1p-23f;
}

static int block_same(const float *x, const uint8_t *q0, float s0, uint64_t h, uint64_t w, uint64_t cols,
                      float *amax)
{
    int same = 1;
    float a = 0.0f;
    for (uint64_t r = 0; r < h; r++)
        for (uint64_t c = 0; c < w; c++) {
            const float v = x[r * cols + c];
            same &= v == lm_fp8_e4m3_value(q0[r * cols + c]) * s0;
            const float m = fabsf(v);
            a = m > a || m != m ? m : a;
        }
    *amax = a;
    return same;
}

void lm_ct_fp8_requant(const float *x, const uint8_t *q0, const float *scale0, uint64_t scols, uint64_t br,
                       uint64_t bc, uint64_t nr, uint64_t cols, lm_dtype sdt, uint8_t *q, float *out_scale,
                       lm_qstats *st)
{
    for (uint64_t r0 = 0; r0 < nr; r0 += br) {
        const uint64_t h = r0 + br < nr ? br : nr - r0;
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const uint64_t w = c0 + bc < cols ? bc : cols - c0, bi = (r0 / br) * scols + c0 / bc;
            const float *xb = x + r0 * cols + c0;
            const uint8_t *q0b = q0 + r0 * cols + c0;
            uint8_t *qb = q + r0 * cols + c0;
            float amax;
            const int same = block_same(xb, q0b, scale0[bi], h, w, cols, &amax);
            st->n_blocks++;
            if (same || !isfinite(amax)) { /* unchanged (or non-finite: refused by the executor) */
                out_scale[bi] = scale0[bi];
                for (uint64_t r = 0; r < h; r++)
                    memcpy(qb + r * cols, q0b + r * cols, w);
                st->n_blocks_kept += same;
                continue;
            }
            float s = lm_q_round_to(sdt, amax / 448.0f);
            if (s == 0.0f)
                s = dtype_eps(sdt);
            out_scale[bi] = s;
            const float ramax = amax > 0.0f ? 1.0f / amax : 0.0f;
            for (uint64_t r = 0; r < h; r++)
                for (uint64_t c = 0; c < w; c++) {
                    const float v = xb[r * cols + c], b0 = lm_fp8_e4m3_value(q0b[r * cols + c]) * scale0[bi];
                    const uint8_t code = lm_f32_to_fp8_e4m3(v / s);
                    qb[r * cols + c] = code;
                    const float e = lm_fp8_e4m3_value(code) * s - v;
                    st->n_changed += code != q0b[r * cols + c] || s != scale0[bi];
                    const double re = fabs((double)e) * ramax;
                    st->err_max = re > st->err_max ? re : st->err_max;
                    st->err_sum += re;
                    st->d2 += (double)(v - b0) * (v - b0);
                    st->e2 += (double)e * e;
                }
            st->n_err += h * w;
        }
    }
}
