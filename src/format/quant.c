/* SPDX-License-Identifier: MIT */
/* quant.c : quantization schemes and codecs (see quant.h). */
#include "quant.h"

#include "lm_error.h"
#include "st_json.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* the scheme                                                                                   */
/* ------------------------------------------------------------------------------------------ */
static const st_json_node *member(const st_json_doc *d, const st_json_node *o, const char *key)
{
    return o && o->type == ST_JSON_OBJECT ? st_json_get(d, o, key, strlen(key)) : NULL;
}

/* methods whose tensors lora-merge reads as they are (float weights, or refused by dtype) */
static const char *const KNOWN_OTHER[] = {"bitsandbytes", "gptq", "awq", "compressed-tensors", "mxfp4", "modelopt",
                                          "fbgemm_fp8", "torchao", "hqq", "quanto", "eetq", "bitnet", "aqlm",
                                          "gptqmodel", "vptq", "higgs", "spqr", "fp_quant", "auto-round", "quark"};

static lm_code parse_skip(const st_json_doc *d, const st_json_node *qc, lm_qscheme *s, lm_err *err)
{
    static const char *const keys[] = {"modules_to_not_convert", "ignore", "ignored_layers"};
    for (size_t k = 0; k < 3; k++) {
        const st_json_node *a = member(d, qc, keys[k]);
        if (a == NULL || a->type != ST_JSON_ARRAY)
            continue;
        for (const st_json_node *c = st_json_child(d, a); c != NULL; c = st_json_next(d, c)) {
            if (c->type != ST_JSON_STRING)
                continue;
            char **ns = realloc(s->skip, (s->n_skip + 1) * sizeof *ns);
            if (ns == NULL)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            s->skip = ns;
            if ((s->skip[s->n_skip] = strdup(st_json_str(d, c))) == NULL)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            s->n_skip++;
        }
    }
    return LM_OK;
}

static lm_code parse_block(const st_json_doc *d, const st_json_node *qc, lm_qscheme *s, lm_err *err)
{
    s->block_rows = s->block_cols = 128;
    const st_json_node *b = member(d, qc, "weight_block_size");
    if (b == NULL || b->type == ST_JSON_NULL)
        return LM_OK;
    uint64_t v[2];
    size_t k = 0;
    for (const st_json_node *c = b->type == ST_JSON_ARRAY ? st_json_child(d, b) : NULL; c != NULL; c = st_json_next(d, c)) {
        if (k == 2 || st_json_u64(d, c, &v[k]) != ST_JSON_U64_OK || v[k] == 0 || v[k] > (1u << 20))
            return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "quantization_config.weight_block_size is not two "
                           "positive integers");
        k++;
    }
    if (k != 2)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "quantization_config.weight_block_size is not two positive "
                       "integers");
    s->block_rows = v[0];
    s->block_cols = v[1];
    return LM_OK;
}

lm_code lm_qscheme_parse(const char *text, size_t n, lm_qscheme *s, lm_err *err)
{
    memset(s, 0, sizeof *s);
    st_json_doc d;
    memset(&d, 0, sizeof d);
    lm_code rc = LM_OK;
    if (text == NULL || st_json_parse(&d, text, n) != ST_JSON_OK || st_json_root(&d)->type != ST_JSON_OBJECT)
        goto done; /* config.json's own problems are reported where it is copied */
    const st_json_node *qc = member(&d, st_json_root(&d), "quantization_config");
    if (qc == NULL)
        qc = member(&d, st_json_root(&d), "compression_config");
    if (qc == NULL || qc->type != ST_JSON_OBJECT)
        goto done;
    const st_json_node *m = member(&d, qc, "quant_method");
    if (m == NULL || m->type != ST_JSON_STRING) {
        rc = lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "config.json: quantization_config has no "
                     "quant_method: the format of the weights is unknown");
        goto done;
    }
    snprintf(s->method, sizeof s->method, "%s", st_json_str(&d, m));
    if (strcmp(s->method, "fp8") == 0) {
        s->fmt = LM_Q_FP8_BLOCK;
        if ((rc = parse_block(&d, qc, s, err)) != LM_OK)
            goto done;
    } else {
        int known = 0;
        for (size_t i = 0; i < sizeof KNOWN_OTHER / sizeof *KNOWN_OTHER; i++)
            known |= strcmp(s->method, KNOWN_OTHER[i]) == 0;
        if (!known) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedQuantization", "config.json: quant_method '%.31s' is not "
                         "a format lora-merge knows: merge into the unquantized original", s->method);
            goto done;
        }
        s->fmt = LM_Q_OTHER;
    }
    rc = parse_skip(&d, qc, s, err);
done:
    st_json_free(&d);
    if (rc != LM_OK)
        lm_qscheme_free(s);
    return rc;
}

void lm_qscheme_free(lm_qscheme *s)
{
    for (size_t i = 0; i < s->n_skip; i++)
        free(s->skip[i]);
    free(s->skip);
    memset(s, 0, sizeof *s);
}

/* "lm_head" skips "lm_head.weight" and "model.lm_head.weight"; a component match, as
 * transformers' `key in name` test, but never in the middle of a component */
int lm_qscheme_skips(const lm_qscheme *s, const char *name)
{
    for (size_t i = 0; i < s->n_skip; i++) {
        const char *k = s->skip[i];
        size_t n = strlen(k);
        if (n == 0)
            continue;
        for (const char *p = strstr(name, k); p != NULL; p = strstr(p + 1, k))
            if ((p == name || p[-1] == '.') && (p[n] == '\0' || p[n] == '.'))
                return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* FP8 E4M3FN                                                                                   */
/* ------------------------------------------------------------------------------------------ */
static float e4m3_value(unsigned c)
{
    float v = (c & 0x78) == 0 ? (float)(c & 7) / 512.0f
              : (c & 0x7F) == 0x7F ? NAN : ldexpf(1.0f + (float)(c & 7) / 8.0f, (int)((c >> 3) & 15) - 7);
    return (c & 0x80) ? -v : v;
}
static float E4M3[256];
static int e4m3_ready;

static const float *e4m3_table(void)
{
    if (!__atomic_load_n(&e4m3_ready, __ATOMIC_ACQUIRE)) {
        float t[256];
        for (unsigned c = 0; c < 256; c++)
            t[c] = e4m3_value(c);
        memcpy(E4M3, t, sizeof t); /* every thread writes the same values */
        __atomic_store_n(&e4m3_ready, 1, __ATOMIC_RELEASE);
    }
    return E4M3;
}

float lm_fp8_e4m3_value(uint8_t c)
{
    return e4m3_table()[c];
}

uint8_t lm_f32_to_fp8_e4m3(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    u &= 0x7FFFFFFFu;
    if (u > 0x7F800000u)
        return sign | 0x7F;
    if (u >= 0x43E00000u) /* >= 448 (and inf): saturate */
        return sign | 0x7E;
    if (u < 0x3C800000u) { /* below 2^-6: subnormal steps of 2^-9, rounded to nearest even */
        float y;
        memcpy(&y, &u, 4);
        return sign | (uint8_t)lrintf(y * 512.0f); /* 8 is the smallest normal, code 0x08 */
    }
    uint32_t r = u + 0x7FFFFu + ((u >> 20) & 1u); /* round the mantissa to 3 bits, ties to even */
    uint32_t e = (r >> 23) - 120u, m = (r >> 20) & 7u;
    uint32_t c = e << 3 | m;
    return sign | (uint8_t)(c > 0x7E ? 0x7E : c);
}

void lm_fp8_block_dequant(const uint8_t *q, const float *scale, uint64_t scols, uint64_t br, uint64_t bc,
                          uint64_t nr, uint64_t cols, float *dst)
{
    const float *lut = e4m3_table();
    for (uint64_t r = 0; r < nr; r++) {
        const float *srow = scale + (r / br) * scols;
        const uint8_t *qr = q + r * cols;
        float *dr = dst + r * cols;
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const float s = srow[c0 / bc];
            const uint64_t c1 = c0 + bc < cols ? c0 + bc : cols;
            for (uint64_t c = c0; c < c1; c++)
                dr[c] = lut[qr[c]] * s;
        }
    }
}

/* one block: amax, and whether it equals the base's dequantized values */
static float block_amax(const float *x, const uint8_t *q0, float s0, const float *lut, uint64_t nr, uint64_t w,
                        uint64_t cols, int *same)
{
    float amax = 0.0f;
    int eq = 1;
    for (uint64_t r = 0; r < nr; r++) {
        const float *xr = x + r * cols;
        const uint8_t *qr = q0 + r * cols;
        for (uint64_t c = 0; c < w; c++) {
            const float a = fabsf(xr[c]);
            amax = a > amax ? a : amax;
            eq &= xr[c] == lut[qr[c]] * s0;
        }
    }
    *same = eq;
    return amax;
}

void lm_fp8_block_requant(const float *x, const uint8_t *q0, const float *scale0, uint64_t scols, uint64_t br,
                          uint64_t bc, uint64_t nr, uint64_t cols, uint8_t *q, float *out_scale, lm_qstats *st)
{
    const float *lut = e4m3_table();
    for (uint64_t r0 = 0; r0 < nr; r0 += br) {
        const uint64_t h = r0 + br < nr ? br : nr - r0;
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const uint64_t w = c0 + bc < cols ? bc : cols - c0, bi = (r0 / br) * scols + c0 / bc;
            const float *xb = x + r0 * cols + c0;
            const uint8_t *q0b = q0 + r0 * cols + c0;
            uint8_t *qb = q + r0 * cols + c0;
            int same;
            const float amax = block_amax(xb, q0b, scale0[bi], lut, h, w, cols, &same);
            st->n_blocks++;
            if (same || !(amax > 0.0f) || !isfinite(amax)) { /* unchanged, all zero (or non-finite: refused later) */
                out_scale[bi] = scale0[bi];
                for (uint64_t r = 0; r < h; r++)
                    memcpy(qb + r * cols, q0b + r * cols, w);
                if (same) {
                    st->n_blocks_kept++;
                    continue;
                }
                for (uint64_t r = 0; r < h; r++)
                    for (uint64_t c = 0; c < w; c++)
                        qb[r * cols + c] = lm_f32_to_fp8_e4m3(xb[r * cols + c] / scale0[bi]);
                continue;
            }
            const float s = 448.0f / amax, inv = 1.0f / s, ramax = 1.0f / amax;
            out_scale[bi] = inv;
            uint64_t changed = 0;
            float emax = (float)st->err_max;
            double esum = 0, d2 = 0, e2 = 0;
            const float s0 = scale0[bi];
            for (uint64_t r = 0; r < h; r++) {
                const float *xr = xb + r * cols;
                uint8_t *qr = qb + r * cols;
                const uint8_t *q0r = q0b + r * cols;
                for (uint64_t c = 0; c < w; c++) {
                    const uint8_t code = lm_f32_to_fp8_e4m3(xr[c] * s);
                    qr[c] = code;
                    changed += code != q0r[c] || inv != scale0[bi];
                    const float dq = lut[code] * inv - xr[c], d = xr[c] - lut[q0r[c]] * s0;
                    const float e = fabsf(dq) * ramax;
                    emax = e > emax ? e : emax;
                    esum += e;
                    d2 += (double)d * d;
                    e2 += (double)dq * dq;
                }
            }
            st->n_changed += changed;
            st->err_max = emax;
            st->err_sum += esum;
            st->d2 += d2;
            st->e2 += e2;
            st->n_err += h * w;
        }
    }
}
