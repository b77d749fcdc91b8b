/* SPDX-License-Identifier: MIT */
/* quant.c : quantization schemes and codecs (see quant.h). */
#include "quant.h"

#include "lm_error.h"
#include "quant_ct.h"
#include "quant_mx.h"
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
static const char *const KNOWN_OTHER[] = {"bitsandbytes", "gptq", "awq", "compressed-tensors", "modelopt",
                                          "fbgemm_fp8", "torchao", "hqq", "quanto", "eetq", "bitnet", "aqlm",
                                          "gptqmodel", "vptq", "higgs", "spqr", "fp_quant", "auto-round", "quark"};

static lm_code parse_skip(const st_json_doc *d, const st_json_node *qc, lm_qscheme *s, lm_err *err)
{
    static const char *const keys[] = {"modules_to_not_convert", "ignore", "ignored_layers", "llm_int8_skip_modules"};
    for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
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

static int json_true(const st_json_doc *d, const st_json_node *o, const char *key)
{
    const st_json_node *v = member(d, o, key);
    return v != NULL && v->type == ST_JSON_TRUE;
}

/* bitsandbytes (transformers' BitsAndBytesConfig.to_dict()): load_in_4bit / load_in_8bit (or
 * their _load_in_* twins) say which; the tensors decide the rest (quant_bnb.h) */
static void parse_bnb(const st_json_doc *d, const st_json_node *qc, lm_qscheme *s)
{
    if (json_true(d, qc, "load_in_4bit") || json_true(d, qc, "_load_in_4bit"))
        s->fmt = LM_Q_BNB4;
    else if (json_true(d, qc, "load_in_8bit") || json_true(d, qc, "_load_in_8bit"))
        s->fmt = LM_Q_BNB8;
    else
        s->fmt = LM_Q_OTHER;
    const st_json_node *qt = member(d, qc, "bnb_4bit_quant_type");
    if (qt != NULL && qt->type == ST_JSON_STRING)
        snprintf(s->bnb_quant_type, sizeof s->bnb_quant_type, "%s", st_json_str(d, qt));
    s->bnb_double_quant = json_true(d, qc, "bnb_4bit_use_double_quant");
}

/* torch_dtype (transformers < 4.56) or dtype */
static lm_dtype parse_torch_dtype(const st_json_doc *d, const st_json_node *root)
{
    const st_json_node *v = member(d, root, "torch_dtype");
    if (v == NULL || v->type != ST_JSON_STRING)
        v = member(d, root, "dtype");
    if (v == NULL || v->type != ST_JSON_STRING)
        return LM_DT_BOOL;
    const char *t = st_json_str(d, v);
    return strcmp(t, "bfloat16") == 0 ? LM_DT_BF16 : strcmp(t, "float16") == 0 ? LM_DT_F16
           : strcmp(t, "float32") == 0 ? LM_DT_F32 : LM_DT_BOOL;
}

lm_code lm_qscheme_parse(const char *text, size_t n, lm_qscheme *s, lm_err *err)
{
    memset(s, 0, sizeof *s);
    st_json_doc d;
    memset(&d, 0, sizeof d);
    lm_code rc = LM_OK;
    if (text == NULL || st_json_parse(&d, text, n) != ST_JSON_OK || st_json_root(&d)->type != ST_JSON_OBJECT)
        goto done; /* config.json's own problems are reported where it is copied */
    s->torch_dtype = parse_torch_dtype(&d, st_json_root(&d));
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
    if (strcmp(s->method, "compressed-tensors") == 0) {
        if ((rc = lm_qscheme_parse_ct(&d, qc, s, err)) != LM_OK)
            goto done;
    } else if (strcmp(s->method, "mxfp4") == 0) {
        s->fmt = LM_Q_MXFP4;
    } else if (strcmp(s->method, "modelopt") == 0) {
        if ((rc = lm_qscheme_parse_modelopt_qc(&d, qc, s, err)) != LM_OK)
            goto done;
        goto done; /* its ignore list is read with the rest */
    } else if (strcmp(s->method, "fp8") == 0) {
        s->fmt = LM_Q_FP8_BLOCK;
        if ((rc = parse_block(&d, qc, s, err)) != LM_OK)
            goto done;
    } else if (strcmp(s->method, "bitsandbytes") == 0) {
        parse_bnb(&d, qc, s);
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

static inline uint32_t f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static inline float bits_f32(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* The two loops over every element have clones for AVX-512 and AVX2, chosen when the program
 * loads: their operations are exact or IEEE-rounded one by one (no contraction, fixed partial
 * sums), so every clone gives the same bytes. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LM_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define LM_CLONES
#endif

/* f32 -> E4M3FN code without branches (the loops vectorize): below 2^-6 the subnormal steps
 * of 2^-9 by adding 2^14 (whose f32 ulp is 2^-9: the addition rounds to nearest even), above
 * the mantissa rounded to 3 bits (ties to even) in the bits; >= 448 and inf saturate, NaN stays
 * NaN.  *qv receives the magnitude of the value coded (exact). */
static inline uint32_t e4m3_encode(float x, float *qv)
{
    const uint32_t u = f32_bits(x), a = u & 0x7FFFFFFFu;
    const float sub = bits_f32(a) + 16384.0f;
    const uint32_t csub = f32_bits(sub) - 0x46800000u;
    const uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);
    const uint32_t cnorm = (r >> 20) - 960u;
    /* selects on integers (masks): float selects would count as control flow (-ftrapping-math) */
    const uint32_t is_sub = 0u - (uint32_t)(a < 0x3C800000u), sat = 0u - (uint32_t)(a >= 0x43E00000u);
    const uint32_t nan = 0u - (uint32_t)(a > 0x7F800000u);
    uint32_t c = (csub & is_sub) | (cnorm & ~is_sub);
    uint32_t vb = (f32_bits(sub - 16384.0f) & is_sub) | (r & 0xFFF00000u & ~is_sub);
    c = (0x7Eu & sat) | (c & ~sat);
    vb = (0x43E00000u & sat) | (vb & ~sat);
    c = (0x7Fu & nan) | (c & ~nan);
    *qv = bits_f32(vb);
    return ((u >> 24) & 0x80u) | c;
}

/* the value of code c from its bits (no table lookup, so the loops vectorize): normal codes
 * move their exponent and mantissa into an f32's, subnormals are m * 2^-9, 0x7F/0xFF NaN */
static inline float e4m3_decode(uint32_t c)
{
    const uint32_t sign = (c & 0x80u) << 24, m = c & 7u;
    const uint32_t sub = f32_bits((float)(int32_t)m * 0x1p-9f), norm = ((c & 0x7Fu) << 20) + (120u << 23);
    const uint32_t is_sub = 0u - (uint32_t)((c & 0x78u) == 0), nan = 0u - (uint32_t)((c & 0x7Fu) == 0x7Fu);
    uint32_t v = (sub & is_sub) | (norm & ~is_sub);
    v = (0x7FC00000u & nan) | (v & ~nan);
    return bits_f32(v | sign);
}

uint8_t lm_f32_to_fp8_e4m3(float x)
{
    float v;
    return (uint8_t)e4m3_encode(x, &v);
}

LM_CLONES void lm_fp8_block_dequant(const uint8_t *q, const float *scale, uint64_t scols, uint64_t br, uint64_t bc,
                          uint64_t nr, uint64_t cols, float *dst)
{
    for (uint64_t r = 0; r < nr; r++) {
        const float *srow = scale + (r / br) * scols;
        const uint8_t *qr = q + r * cols;
        float *dr = dst + r * cols;
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const float s = srow[c0 / bc];
            const uint64_t c1 = c0 + bc < cols ? c0 + bc : cols;
            for (uint64_t c = c0; c < c1; c++)
                dr[c] = e4m3_decode(qr[c]) * s;
        }
    }
}

/* one block: amax (on the bits: |x| orders as its bits, NaN above everything), and whether it
 * equals the base's dequantized values (checked up to the first difference) */
static inline __attribute__((always_inline)) float block_amax(const float *x, const uint8_t *q0, float s0, uint64_t nr, uint64_t w, uint64_t cols,
                        int *same)
{
    uint32_t amax = 0;
    int eq = 1;
    for (uint64_t r = 0; r < nr; r++) {
        const float *xr = x + r * cols;
        const uint8_t *qr = q0 + r * cols;
        for (uint64_t c = 0; eq && c < w; c++)
            eq = xr[c] == e4m3_decode(qr[c]) * s0;
        for (uint64_t c = 0; c < w; c++) {
            const uint32_t a = f32_bits(xr[c]) & 0x7FFFFFFFu;
            amax = a > amax ? a : amax;
        }
    }
    *same = eq;
    return bits_f32(amax);
}

#define LANES 16
/* one changed block, h x w, with the new scale s (inv = 1 / s); the error sums go through
 * LANES partial sums so the loop vectorizes (they are only reported) */
static inline __attribute__((always_inline)) void block_encode(const float *xb, const uint8_t *q0b, float s0, uint64_t h, uint64_t w, uint64_t cols,
                         float s, float inv, float amax, uint8_t *qb, lm_qstats *st)
{
    const float ramax = 1.0f / amax;
    uint64_t changed = 0;
    uint32_t emax = f32_bits((float)st->err_max);
    float fsum[LANES] = {0}, fd2[LANES] = {0}, fe2[LANES] = {0};
    for (uint64_t r = 0; r < h; r++) {
        const float *xr = xb + r * cols;
        const uint8_t *q0r = q0b + r * cols;
        uint8_t *qr = qb + r * cols;
        uint32_t rmax = 0, rchanged = 0;
        for (uint64_t c0 = 0; c0 < w; c0 += LANES) {
            const uint64_t n = c0 + LANES <= w ? LANES : w - c0;
            for (uint64_t k = 0; k < n; k++) {
                const float x = xr[c0 + k];
                float v;
                const uint32_t code = e4m3_encode(x * s, &v);
                qr[c0 + k] = (uint8_t)code;
                rchanged += code != q0r[c0 + k];
                const float dq = copysignf(v, x) * inv - x, d = x - e4m3_decode(q0r[c0 + k]) * s0;
                const uint32_t e = f32_bits(dq * ramax) & 0x7FFFFFFFu;
                rmax = e > rmax ? e : rmax;
                fsum[k] += bits_f32(e);
                fd2[k] += d * d;
                fe2[k] += dq * dq;
            }
        }
        changed += inv != s0 ? w : rchanged;
        emax = rmax > emax ? rmax : emax;
    }
    double esum = 0, d2 = 0, e2 = 0;
    for (int k = 0; k < LANES; k++) {
        esum += fsum[k];
        d2 += fd2[k];
        e2 += fe2[k];
    }
    st->n_changed += changed;
    st->err_max = bits_f32(emax);
    st->err_sum += esum;
    st->d2 += d2;
    st->e2 += e2;
    st->n_err += h * w;
}

LM_CLONES void lm_fp8_block_requant(const float *x, const uint8_t *q0, const float *scale0, uint64_t scols, uint64_t br,
                          uint64_t bc, uint64_t nr, uint64_t cols, uint8_t *q, float *out_scale, lm_qstats *st)
{
    for (uint64_t r0 = 0; r0 < nr; r0 += br) {
        const uint64_t h = r0 + br < nr ? br : nr - r0;
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const uint64_t w = c0 + bc < cols ? bc : cols - c0, bi = (r0 / br) * scols + c0 / bc;
            const float *xb = x + r0 * cols + c0;
            const uint8_t *q0b = q0 + r0 * cols + c0;
            uint8_t *qb = q + r0 * cols + c0;
            int same;
            const float amax = block_amax(xb, q0b, scale0[bi], h, w, cols, &same);
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
            const float s = 448.0f / amax, inv = 1.0f / s;
            out_scale[bi] = inv;
            block_encode(xb, q0b, scale0[bi], h, w, cols, s, inv, amax, qb, st);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* scale tensors                                                                                */
/* ------------------------------------------------------------------------------------------ */
static float f16_value(uint16_t h)
{
    const uint32_t e = (h >> 10) & 31u, m = h & 0x3FFu;
    float v = e == 0 ? ldexpf((float)m, -24)
              : e == 31 ? (m ? NAN : INFINITY) : bits_f32(((e + 112u) << 23) | (m << 13));
    return (h & 0x8000u) ? -v : v;
}

static uint16_t f32_to_f16(float x)
{
    const uint32_t u = f32_bits(x), a = u & 0x7FFFFFFFu;
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    if (a > 0x7F800000u)
        return sign | 0x7E00u;
    if (a >= 0x477FF000u) /* 65520 and above round to inf */
        return sign | 0x7C00u;
    if (a < 0x38800000u) /* below 2^-14: steps of 2^-24, the ulp of 0.5f (the addition rounds to even) */
        return sign | (uint16_t)(f32_bits(bits_f32(a) + 0.5f) - 0x3F000000u);
    return sign | (uint16_t)((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13);
}

static uint16_t f32_to_bf16(float x)
{
    const uint32_t u = f32_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

int lm_q_scale_dtype_ok(lm_dtype dt)
{
    return dt == LM_DT_F32 || dt == LM_DT_BF16 || dt == LM_DT_F16 || dt == LM_DT_F8_E4M3;
}

void lm_q_scales_to_f32(lm_dtype dt, const void *src, size_t n, float *dst)
{
    const uint8_t *b = src;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        switch (dt) {
        case LM_DT_F32:
            memcpy(&dst[i], b + 4 * i, 4);
            break;
        case LM_DT_BF16:
            memcpy(&h, b + 2 * i, 2);
            dst[i] = bits_f32((uint32_t)h << 16);
            break;
        case LM_DT_F16:
            memcpy(&h, b + 2 * i, 2);
            dst[i] = f16_value(h);
            break;
        case LM_DT_U8: /* E8M0 (MXFP4) */
            dst[i] = lm_e8m0_value(b[i]);
            break;
        default: /* F8_E4M3 */
            dst[i] = e4m3_decode(b[i]);
            break;
        }
    }
}

void lm_q_scales_from_f32(lm_dtype dt, const float *src, size_t n, void *dst)
{
    uint8_t *b = dst;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        switch (dt) {
        case LM_DT_F32:
            memcpy(b + 4 * i, &src[i], 4);
            break;
        case LM_DT_BF16:
            h = f32_to_bf16(src[i]);
            memcpy(b + 2 * i, &h, 2);
            break;
        case LM_DT_F16:
            h = f32_to_f16(src[i]);
            memcpy(b + 2 * i, &h, 2);
            break;
        case LM_DT_U8: /* E8M0 (MXFP4): the scales are powers of two */
            b[i] = lm_e8m0_from_f32(src[i]);
            break;
        default: /* F8_E4M3 */
            b[i] = lm_f32_to_fp8_e4m3(src[i]);
            break;
        }
    }
}

float lm_q_round_to(lm_dtype dt, float x)
{
    uint8_t b[4];
    float v;
    lm_q_scales_from_f32(dt, &x, 1, b);
    lm_q_scales_to_f32(dt, b, 1, &v);
    return v;
}
