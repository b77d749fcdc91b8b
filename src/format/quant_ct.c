/* SPDX-License-Identifier: MIT */
/* quant_ct.c : compressed-tensors (vllm-project/compressed-tensors) FP8 and NVFP4 checkpoints,
 * and NVIDIA ModelOpt's NVFP4: the config, and the codecs with each library's own rule. */
#include "quant_ct.h"

#include "lm_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
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

/* ModelOpt: quant_algo "NVFP4" (or an NVFP4 variant) / "FP8", group_size, the excluded modules
 * (hf_quant_config.json's "quantization" object, or config.json's quant_method "modelopt") */
static lm_code parse_modelopt(const st_json_doc *d, const st_json_node *qo, lm_qscheme *s, lm_err *err)
{
    snprintf(s->method, sizeof s->method, "modelopt");
    s->fmt = LM_Q_OTHER;
    const st_json_node *a = member(d, qo, "quant_algo"), *v;
    if (a != NULL && a->type == ST_JSON_STRING) {
        const char *algo = st_json_str(d, a);
        if (strstr(algo, "NVFP4") != NULL)
            s->fmt = LM_Q_MO_NVFP4;
        else if (strcmp(algo, "FP8") == 0) {
            s->fmt = LM_Q_CT_FP8;
            snprintf(s->ct_strategy, sizeof s->ct_strategy, "tensor");
        }
    }
    s->group_size = u64_of(d, member(d, qo, "group_size"));
    const st_json_node *groups = member(d, qo, "config_groups");
    for (const st_json_node *g = groups && groups->type == ST_JSON_OBJECT ? st_json_child(d, groups) : NULL;
         g != NULL && s->group_size == 0; g = st_json_next(d, g))
        s->group_size = u64_of(d, member(d, member(d, g, "weights"), "group_size"));
    static const char *const keys[] = {"exclude_modules", "ignore"};
    for (size_t k = 0; k < 2; k++) {
        const st_json_node *arr = member(d, qo, keys[k]);
        for (v = arr && arr->type == ST_JSON_ARRAY ? st_json_child(d, arr) : NULL; v != NULL; v = st_json_next(d, v)) {
            if (v->type == ST_JSON_STRING && lm_qscheme_add_skip(s, st_json_str(d, v), LM_QSKIP_GLOB, err) != LM_OK)
                return err->code;
        }
    }
    return LM_OK;
}

lm_code lm_qscheme_parse_modelopt_qc(const st_json_doc *d, const st_json_node *qc, lm_qscheme *s, lm_err *err)
{
    return parse_modelopt(d, qc, s, err);
}

lm_code lm_qscheme_parse_hf_quant(const char *text, size_t n, lm_qscheme *s, lm_err *err)
{
    memset(s, 0, sizeof *s);
    st_json_doc d;
    memset(&d, 0, sizeof d);
    lm_code rc = LM_OK;
    const st_json_node *qo;
    if (st_json_parse(&d, text, n) != ST_JSON_OK || st_json_root(&d)->type != ST_JSON_OBJECT ||
        (qo = member(&d, st_json_root(&d), "quantization")) == NULL || qo->type != ST_JSON_OBJECT)
        rc = lm_fail(err, LM_E_FORMAT, "InvalidConfig", "hf_quant_config.json is not a JSON object with a "
                     "\"quantization\" object");
    else
        rc = parse_modelopt(&d, qo, s, err);
    st_json_free(&d);
    if (rc != LM_OK)
        lm_qscheme_free(s);
    return rc;
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
                       uint64_t bc, uint64_t nr, uint64_t cols, lm_dtype sdt, float tamax, uint8_t *q,
                       float *out_scale, lm_qstats *st)
{
    for (uint64_t r0 = 0; r0 < nr; r0 += br) {
        const uint64_t h = r0 + br < nr ? br : nr - r0;
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const uint64_t w = c0 + bc < cols ? bc : cols - c0, bi = (r0 / br) * scols + c0 / bc;
            const float *xb = x + r0 * cols + c0;
            const uint8_t *q0b = q0 + r0 * cols + c0;
            uint8_t *qb = q + r0 * cols + c0;
            float amax;
            int same = block_same(xb, q0b, scale0[bi], h, w, cols, &amax);
            if (tamax >= 0.0f)
                amax = isfinite(amax) ? tamax : amax;
            float s = lm_q_round_to(sdt, amax / 448.0f);
            if (s == 0.0f)
                s = dtype_eps(sdt);
            same &= tamax < 0.0f || s == scale0[bi]; /* a per-tensor scale that changes: every row again */
            st->n_blocks++;
            if (same || !isfinite(amax)) { /* unchanged (or non-finite: refused by the executor) */
                out_scale[bi] = scale0[bi];
                for (uint64_t r = 0; r < h; r++)
                    memcpy(qb + r * cols, q0b + r * cols, w);
                st->n_blocks_kept += same;
                continue;
            }
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

/* ------------------------------------------------------------------------------------------ */
/* NVFP4 (compressed-tensors nvfp4-pack-quantized, ModelOpt NVFP4)                             */
/* ------------------------------------------------------------------------------------------ */
static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

float lm_e2m1_value(unsigned c)
{
    return E2M1[c & 15];
}

unsigned lm_f32_to_e2m1(float x)
{
    const float a = fabsf(x);
    /* compressed-tensors' cast_to_fp4 / ModelOpt's searchsorted + odd-bound rule: ties to even */
    unsigned m = a <= 0.25f ? 0 : a < 0.75f ? 1 : a <= 1.25f ? 2 : a < 1.75f ? 3 : a <= 2.5f ? 4 : a < 3.5f ? 5
                 : a <= 5.0f ? 6 : 7;
    if (a != a)
        m = 0;
    return m | (signbit(x) ? 8u : 0u);
}

static inline float nv_eff(float s, float g, int modelopt)
{
    return modelopt ? s * g : s / g;
}

static inline unsigned nib(const uint8_t *row, uint64_t c)
{
    return (row[c >> 1] >> ((c & 1) * 4)) & 15u;
}

void lm_nvfp4_dequant(const uint8_t *q, const float *s, float g, int modelopt, uint64_t gsz, uint64_t nr,
                      uint64_t cols, float *dst)
{
    const uint64_t ng = cols / gsz;
    for (uint64_t r = 0; r < nr; r++) {
        const uint8_t *qr = q + r * (cols / 2);
        for (uint64_t j = 0; j < ng; j++) {
            const float e = nv_eff(s[r * ng + j], g, modelopt);
            for (uint64_t c = j * gsz; c < (j + 1) * gsz; c++)
                dst[r * cols + c] = E2M1[nib(qr, c)] * e;
        }
    }
}

/* the group scale of a changed group with amax a under second scale g (f32 value of its code) */
static float nv_group_scale(float a, float g, int modelopt)
{
    if (modelopt) { /* get_weights_scaling_factor: amax / (6 * wsf2), 0 -> 1, clamp(min=2^-9), to fp8 */
        float s = a / (6.0f * g);
        if (s == 0.0f)
            s = 1.0f;
        return lm_q_round_to(LM_DT_F8_E4M3, s < 0x1p-9f ? 0x1p-9f : s);
    }
    /* calculate_qparams: amax / 6, times the global scale, clamp(+-448) to fp8, 0 -> eps 0.125 */
    float s = lm_q_round_to(LM_DT_F8_E4M3, (a / 6.0f) * g);
    return s == 0.0f ? 0.125f : s;
}

void lm_nvfp4_requant(const float *x, const uint8_t *q0, const float *s0, float g0, int modelopt, uint64_t gsz,
                      float amax, uint64_t nr, uint64_t cols, uint8_t *q, float *out_s, float *out_g,
                      lm_qstats *st)
{
    const uint64_t ng = cols / gsz, rb = cols / 2;
    float g = g0;
    if (isfinite(amax) && amax > 0.0f) {
        const float top = modelopt ? amax / (6.0f * g0) : (amax / 6.0f) * g0;
        if (!(top <= 448.0f)) /* the second scale no longer covers the tensor: the library's rule */
            g = modelopt ? amax / 2688.0f : 2688.0f / amax;
    }
    *out_g = g;
    memcpy(q, q0, (size_t)(nr * rb));
    for (uint64_t r = 0; r < nr; r++) {
        const float *xr = x + r * cols;
        const uint8_t *q0r = q0 + r * rb;
        uint8_t *qr = q + r * rb;
        for (uint64_t j = 0; j < ng; j++) {
            const uint64_t c0 = j * gsz, c1 = c0 + gsz;
            const float e0 = nv_eff(s0[r * ng + j], g0, modelopt);
            int same = g == g0;
            float ga = 0.0f;
            for (uint64_t c = c0; c < c1; c++) {
                same &= xr[c] == E2M1[nib(q0r, c)] * e0;
                const float m = fabsf(xr[c]);
                ga = m > ga || m != m ? m : ga;
            }
            st->n_blocks++;
            if (same || !isfinite(ga)) { /* unchanged (or non-finite: refused by the executor) */
                out_s[r * ng + j] = s0[r * ng + j];
                st->n_blocks_kept += same;
                continue;
            }
            const float s = nv_group_scale(ga, g, modelopt), e = nv_eff(s, g, modelopt);
            out_s[r * ng + j] = s;
            const float rg = ga > 0.0f ? 1.0f / ga : 0.0f;
            for (uint64_t c = c0; c < c1; c++) {
                const unsigned code = lm_f32_to_e2m1(xr[c] / e);
                const unsigned sh = (unsigned)(c & 1) * 4;
                qr[c >> 1] = (uint8_t)((qr[c >> 1] & ~(15u << sh)) | (code << sh));
                const float v = E2M1[code] * e, b0 = E2M1[nib(q0r, c)] * e0, err = v - xr[c];
                st->n_changed += code != nib(q0r, c) || v != b0;
                const double re = fabs((double)err) * rg;
                st->err_max = re > st->err_max ? re : st->err_max;
                st->err_sum += re;
                st->d2 += (double)(xr[c] - b0) * (xr[c] - b0);
                st->e2 += (double)err * err;
            }
            st->n_err += gsz;
        }
    }
}
