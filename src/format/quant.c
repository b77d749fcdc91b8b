/* SPDX-License-Identifier: MIT */
/* quant.c : quantization schemes and codecs (see quant.h). */
#include "quant.h"

#include "lm_error.h"
#include "quant_ct.h"
#include "quant_mx.h"
#include "st_json.h"

#include <float.h>
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

lm_code lm_qscheme_add_skip(lm_qscheme *s, const char *entry, lm_qskip_rule rule, lm_err *err)
{
    char **ns = realloc(s->skip, (s->n_skip + 1) * sizeof *ns);
    if (ns != NULL)
        s->skip = ns;
    unsigned char *nr = ns != NULL ? realloc(s->skip_rule, s->n_skip + 1) : NULL;
    if (nr != NULL)
        s->skip_rule = nr;
    if (ns == NULL || nr == NULL || (s->skip[s->n_skip] = strdup(entry)) == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    s->skip_rule[s->n_skip++] = (unsigned char)rule;
    return LM_OK;
}

/* the lists of modules left unquantized, each read with its library's rule: compressed-tensors'
 * ignore, vLLM's ignored_layers, and transformers' lists for every other method */
static lm_code parse_skip(const st_json_doc *d, const st_json_node *qc, lm_qscheme *s, lm_err *err)
{
    static const char *const keys[] = {"modules_to_not_convert", "ignore", "ignored_layers", "llm_int8_skip_modules"};
    const int ct = strcmp(s->method, "compressed-tensors") == 0;
    for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
        const st_json_node *a = member(d, qc, keys[k]);
        if (a == NULL || a->type != ST_JSON_ARRAY)
            continue;
        const lm_qskip_rule rule = k == 2 ? LM_QSKIP_EXACT : k == 1 && ct ? LM_QSKIP_CT : LM_QSKIP_HF;
        for (const st_json_node *c = st_json_child(d, a); c != NULL; c = st_json_next(d, c))
            if (c->type == ST_JSON_STRING && lm_qscheme_add_skip(s, st_json_str(d, c), rule, err) != LM_OK)
                return err->code;
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
    free(s->skip_rule);
    memset(s, 0, sizeof *s);
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
 * move their exponent and mantissa into an f32's, subnormals are m * 2^-9, 0x7F/0xFF NaN.  (Not
 * the shorter f32-subnormal product by 2^120: subnormal operands cost a microcode assist.) */
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
/* one row of a block into its amax (on the bits: |x| orders as its bits, NaN above everything)
 * and into whether the block equals the base's dequantized values (checked up to the first
 * difference) */
static inline __attribute__((always_inline)) void row_amax(const float *xr, const uint8_t *qr, float s0, uint64_t w,
                                                           uint32_t *amax, int *same)
{
    int eq = *same;
    for (uint64_t c = 0; eq && c < w; c++)
        eq = xr[c] == e4m3_decode(qr[c]) * s0;
    uint32_t m = *amax;
    for (uint64_t c = 0; c < w; c++) {
        const uint32_t a = f32_bits(xr[c]) & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    *amax = m;
    *same = eq;
}

/* a block's amax and sameness (nr rows of w) */
static inline __attribute__((always_inline)) float block_amax(const float *x, const uint8_t *q0, float s0, uint64_t nr,
                                                              uint64_t w, uint64_t cols, int *same)
{
    uint32_t amax = 0;
    *same = 1;
    for (uint64_t r = 0; r < nr; r++)
        row_amax(x + r * cols, q0 + r * cols, s0, w, &amax, same);
    return bits_f32(amax);
}

/* 16 lanes written with the vector extensions of GCC and clang: every operation is the scalar
 * one (e4m3_encode, one IEEE operation per float step) lane by lane, so the vector code and the
 * scalar tail give the same values; each clone lowers them to its own width.  Bytes are never
 * widened inside these (GCC 12 does it byte by byte): the base's values come from a plain loop
 * the vectorizer handles, the changed codes are counted by another. */
#define LANES 16
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));
typedef float v16f_unaligned __attribute__((vector_size(64), aligned(4)));
typedef uint8_t v16b_unaligned __attribute__((vector_size(16), aligned(1)));

/* e4m3_encode for |x| < 464 (block_encode's x * s: |x| <= amax times 448 / amax rounded), where
 * saturation and NaN never apply.  (Pointers, not vector arguments: no vector calling
 * convention is involved.) */
static inline __attribute__((always_inline)) void e4m3_encode_in_range_v(const v16f *x, v16u *code, v16f *qv)
{
    const v16u u = (v16u)*x, a = u & 0x7FFFFFFFu;
    const v16f sub = (v16f)a + 16384.0f;
    const v16u r = a + 0x7FFFFu + ((a >> 20) & 1u);
    const v16u is_sub = (v16u)(a < 0x3C800000u);
    const v16u c = (((v16u)sub - 0x46800000u) & is_sub) | (((r >> 20) - 960u) & ~is_sub);
    *qv = (v16f)(((v16u)(sub - 16384.0f) & is_sub) | (r & 0xFFF00000u & ~is_sub));
    *code = ((u >> 24) & 0x80u) | c;
}

/* per-lane partial results of block_encode: lane k takes the elements whose column in the
 * block is k modulo LANES, row after row, so every clone sums the same values in the same order */
typedef struct {
    v16f sum, d2, e2;
    v16u emax;
} enc_lanes;

/* the lanes' numbers for x, y = x * s, the value coded v (magnitude) of y and x's base value b:
 * the requantization error in y's units, e = v (y's sign) - y (exact: v and y are within a
 * factor 2, or both below 2^-6 where v is a multiple of 2^-9), its magnitude's max and sum and
 * its square (fp8_lanes_into() makes them relative to the amax, in x's units), and the square
 * of the delta */
static inline __attribute__((always_inline)) void lane_stats(const v16f *x, const v16f *y, const v16f *val,
                                                             const v16f *base, enc_lanes *L)
{
    const v16f xv = *x, yv = *y, v = *val, b = *base;
    const v16f ey = (v16f)((v16u)v | ((v16u)yv & 0x80000000u)) - yv, d = xv - b;
    const v16u e = (v16u)ey & 0x7FFFFFFFu, gt = (v16u)(e > L->emax);
    L->emax = (e & gt) | (L->emax & ~gt);
    L->sum += (v16f)e;
    L->d2 += d * d;
    L->e2 += ey * ey;
}

/* LANES elements of a changed block (in range): their codes and the lanes' numbers */
static inline __attribute__((always_inline)) void encode_lanes(const float *x, const float *base, float s, float inv,
                                                               float ramax, uint8_t *q, enc_lanes *L)
{
    const v16f xv = *(const v16f_unaligned *)x, xs = xv * s; /* (a memcpy loads it piece by piece) */
    v16f v;
    v16u code;
    e4m3_encode_in_range_v(&xs, &code, &v);
    *(v16b_unaligned *)q = __builtin_convertvector(code, v16b);
    const v16f b = *(const v16f_unaligned *)base;
    lane_stats(&xv, &xs, &v, &b, L);
}

/* the same for one element (any x), into lane k; s not finite (amax below 448 / FLT_MAX, out of
 * lane_stats' range): the error in x's units, dq = (v with x's sign) inv - x, relative to the amax
 * (ramax = 1 / amax) */
static inline void encode_one(float x, float b, float s, float inv, float ramax, uint8_t *q, enc_lanes *L, int k)
{
    float v;
    const float y = x * s, d = x - b;
    *q = (uint8_t)e4m3_encode(y, &v);
    const float ey = isfinite(s) ? copysignf(v, y) - y : copysignf(v, x) * inv - x;
    const uint32_t e = f32_bits(isfinite(s) ? ey : ey * ramax) & 0x7FFFFFFFu;
    L->emax[k] = e > L->emax[k] ? e : L->emax[k];
    L->sum[k] += bits_f32(e);
    L->d2[k] += d * d;
    L->e2[k] += ey * ey;
}

/* a block's lanes (n of each) into st: e2 times ke2, the errors times kerr (fp8_lanes_k()) */
static void fp8_lanes_into(const float *sum, const float *d2l, const float *e2l, const uint32_t *emaxl, int n,
                           double kerr, double ke2, lm_qstats *st)
{
    double esum = 0, d2 = 0, e2 = 0;
    uint32_t emax = 0;
    for (int k = 0; k < n; k++) {
        esum += sum[k];
        d2 += d2l[k];
        e2 += e2l[k];
        emax = emaxl[k] > emax ? emaxl[k] : emax;
    }
    const double em = (double)bits_f32(emax) * kerr;
    st->err_max = em > st->err_max ? em : st->err_max;
    st->err_sum += esum * kerr;
    st->d2 += d2;
    st->e2 += e2 * ke2;
}

/* the lanes' factors for a block requantized with s = 448 / amax: the errors in y = x s relative
 * to the amax (1 / (s amax)) and their squares in x's units (1 / s^2); s not finite: the lanes
 * hold them in x's units relative to the amax already */
static void fp8_lanes_k(float s, float amax, double *kerr, double *ke2)
{
    const int f = isfinite(s);
    *kerr = f ? 1.0 / ((double)s * (double)amax) : 1.0;
    *ke2 = f ? 1.0 / ((double)s * (double)s) : 1.0;
}

/* block_encode's lanes into st, for a block requantized with s and amax (fp8_lanes_k()) */
static void enc_lanes_into(const enc_lanes *L, float s, float amax, lm_qstats *st)
{
    float ls[LANES], ld[LANES], le[LANES];
    uint32_t lm[LANES];
    memcpy(ls, &L->sum, sizeof ls);
    memcpy(ld, &L->d2, sizeof ld);
    memcpy(le, &L->e2, sizeof le);
    memcpy(lm, &L->emax, sizeof lm);
    double kerr, ke2;
    fp8_lanes_k(s, amax, &kerr, &ke2);
    fp8_lanes_into(ls, ld, le, lm, LANES, kerr, ke2, st);
}

/* a block that keeps the base's scale s0 (h x w; codes row stride cols, x row stride ldx):
 * unchanged (same: its codes too), all zero, or not finite (refused later; its codes under s0).
 * @return 0 when the block needs a new scale (nothing written) */
static int keep_block(const float *x, uint64_t ldx, const uint8_t *q0, float s0, uint64_t h, uint64_t w, uint64_t cols,
                      int same, float amax, uint8_t *q, float *out_scale, lm_qstats *st)
{
    if (!same && amax > 0.0f && isfinite(amax))
        return 0;
    *out_scale = s0;
    if (same) {
        st->n_blocks_kept++;
        for (uint64_t r = 0; r < h; r++)
            memcpy(q + r * cols, q0 + r * cols, w);
        return 1;
    }
    for (uint64_t r = 0; r < h; r++)
        for (uint64_t c = 0; c < w; c++)
            q[r * cols + c] = lm_f32_to_fp8_e4m3(x[r * ldx + c] / s0);
    return 1;
}

/* the next block of the block row (w 0: none), whose amax and sameness block_encode finds */
typedef struct {
    const float *x;
    const uint8_t *q0;
    float s0;
    uint64_t w;
    uint32_t amax;
    int same;
} next_block;

#define SEG 256 /* columns of a row segment (a multiple of LANES) */

/* one changed block, h x w, with the new scale s (inv = 1 / s): each row in segments of SEG
 * columns (the base's values of the segment; its codes in chunks of LANES, then the tail; the
 * changed codes counted).  Row by row it also reads the next block (its amax, sameness and codes),
 * so that block is in the cache when its turn comes and its loads overlap this block's arithmetic */
static inline __attribute__((always_inline)) void block_encode(const float *xb, const uint8_t *q0b, float s0, uint64_t h, uint64_t w, uint64_t cols,
                         float s, float inv, float amax, uint8_t *qb, next_block *nb, lm_qstats *st)
{
    const float ramax = 1.0f / amax;
    const int in_range = isfinite(s); /* amax >= 448 / FLT_MAX: every x * s is within +-464 */
    enc_lanes L;
    float base[SEG];
    uint64_t changed = 0;
    memset(&L, 0, sizeof L);
    nb->amax = 0;
    nb->same = 1;
    for (uint64_t r = 0; r < h; r++) {
        const float *xr = xb + r * cols;
        const uint8_t *q0r = q0b + r * cols;
        uint8_t *qr = qb + r * cols;
        for (uint64_t c1 = 0; c1 < w; c1 += SEG) {
            const uint64_t n = w - c1 < SEG ? w - c1 : SEG;
            for (uint64_t c = 0; c < n; c++)
                base[c] = e4m3_decode(q0r[c1 + c]) * s0;
            uint64_t c0 = 0;
            for (; in_range && c0 + LANES <= n; c0 += LANES)
                encode_lanes(xr + c1 + c0, base + c0, s, inv, ramax, qr + c1 + c0, &L);
            for (; c0 < n; c0++)
                encode_one(xr[c1 + c0], base[c0], s, inv, ramax, qr + c1 + c0, &L, (int)(c0 % LANES));
            if (inv == s0) /* (else every value counts: below) */
                for (uint64_t c = 0; c < n; c++)
                    changed += qr[c1 + c] != q0r[c1 + c];
        }
        if (nb->w > 0) {
            for (uint64_t b = 0; b < nb->w; b += 64)
                __builtin_prefetch(nb->q0 + r * cols + b);
            row_amax(nb->x + r * cols, nb->q0 + r * cols, nb->s0, nb->w, &nb->amax, &nb->same);
        }
    }
    enc_lanes_into(&L, s, amax, st);
    st->n_changed += inv != s0 ? h * w : changed;
    st->n_err += h * w;
}

LM_CLONES void lm_fp8_block_requant(const float *x, const uint8_t *q0, const float *scale0, uint64_t scols, uint64_t br,
                          uint64_t bc, uint64_t nr, uint64_t cols, uint8_t *q, float *out_scale, lm_qstats *st)
{
    for (uint64_t r0 = 0; r0 < nr; r0 += br) {
        const uint64_t h = r0 + br < nr ? br : nr - r0;
        int same;
        float amax = block_amax(x + r0 * cols, q0 + r0 * cols, scale0[(r0 / br) * scols], h, bc < cols ? bc : cols,
                                cols, &same);
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const uint64_t w = c0 + bc < cols ? bc : cols - c0, bi = (r0 / br) * scols + c0 / bc;
            const float *xb = x + r0 * cols + c0;
            const uint8_t *q0b = q0 + r0 * cols + c0;
            uint8_t *qb = q + r0 * cols + c0;
            next_block nb = {xb + w, q0b + w, c0 + w < cols ? scale0[bi + 1] : 0.0f, 0, 0, 1};
            nb.w = c0 + w >= cols ? 0 : c0 + w + bc < cols ? bc : cols - c0 - w;
            st->n_blocks++;
            st->n_nonfinite_blocks += !isfinite(amax);
            if (keep_block(xb, cols, q0b, scale0[bi], h, w, cols, same, amax, qb, &out_scale[bi], st)) {
                if (nb.w > 0)
                    amax = block_amax(nb.x, nb.q0, nb.s0, h, nb.w, cols, &same);
                continue;
            }
            const float s = 448.0f / amax, inv = 1.0f / s;
            out_scale[bi] = inv;
            block_encode(xb, q0b, scale0[bi], h, w, cols, s, inv, amax, qb, &nb, st);
            amax = bits_f32(nb.amax);
            same = nb.same;
        }
    }
}

LM_CLONES void lm_fp8_dequant_block(const uint8_t *q, float s, uint64_t h, uint64_t w, uint64_t cols, float *dst,
                                    float *base)
{
    for (uint64_t r = 0; r < h; r++)
        for (uint64_t c = 0; c < w; c++) {
            const float v = e4m3_decode(q[r * cols + c]) * s;
            dst[r * cols + c] = v;
            base[r * w + c] = v;
        }
}

/* bytes that differ between a and b (n of them), 64 at a time: the lanes count to at most 255
 * before they are summed */
typedef uint8_t v64b __attribute__((vector_size(64)));
typedef uint8_t v64b_unaligned __attribute__((vector_size(64), aligned(1)));
typedef uint64_t v8q __attribute__((vector_size(64)));

/* the lanes' sum; by pointer: a 64-byte vector argument changes the ABI without AVX-512 (-Wpsabi) */
static inline __attribute__((always_inline)) uint64_t v64b_sum(const v64b *v)
{
    v8q x = (v8q)*v;
    x = (x & 0x00FF00FF00FF00FFu) + ((x >> 8) & 0x00FF00FF00FF00FFu);
    x = (x & 0x0000FFFF0000FFFFu) + ((x >> 16) & 0x0000FFFF0000FFFFu);
    x = (x & 0xFFFFFFFFu) + (x >> 32);
    uint64_t t = 0;
    for (int k = 0; k < 8; k++)
        t += x[k];
    return t;
}

static uint64_t count_diff_rows(const uint8_t *a, const uint8_t *b, uint64_t h, uint64_t w, uint64_t cols)
{
    uint64_t n = 0;
    v64b acc = {0};
    unsigned k = 0;
    for (uint64_t r = 0; r < h; r++) {
        uint64_t c = 0;
        for (; c + 64 <= w; c += 64) {
            const v64b x = *(const v64b_unaligned *)(a + r * cols + c), y = *(const v64b_unaligned *)(b + r * cols + c);
            acc -= (v64b)(x != y);
            if (++k == 255) {
                n += v64b_sum(&acc);
                acc = (v64b){0};
                k = 0;
            }
        }
        for (; c < w; c++)
            n += a[r * cols + c] != b[r * cols + c];
    }
    return n + v64b_sum(&acc);
}

LM_CLONES void lm_fp8_requant_block(const float *x, const float *base, const uint8_t *q0, float s0, uint64_t h,
                                    uint64_t w, uint64_t cols, uint8_t *q, float *out_scale, lm_qstats *st)
{
    uint32_t am = 0;
    int same = 1;
    for (uint64_t r = 0; r < h; r++) { /* the amax (on the bits, as row_amax) and the sameness */
        const float *xr = x + r * cols, *br = base + r * w;
        int eq = same;
        for (uint64_t c = 0; eq && c < w; c++)
            eq = xr[c] == br[c];
        same = eq;
        for (uint64_t c = 0; c < w; c++) {
            const uint32_t a = f32_bits(xr[c]) & 0x7FFFFFFFu;
            am = a > am ? a : am;
        }
    }
    const float amax = bits_f32(am);
    st->n_blocks++;
    st->n_nonfinite_blocks += !isfinite(amax);
    if (keep_block(x, cols, q0, s0, h, w, cols, same, amax, q, out_scale, st))
        return;
    const float s = 448.0f / amax, inv = 1.0f / s, ramax = 1.0f / amax;
    *out_scale = inv;
    const int in_range = isfinite(s); /* as block_encode, lane k the columns k modulo LANES */
    enc_lanes L;
    memset(&L, 0, sizeof L);
    for (uint64_t r = 0; r < h; r++) {
        const float *xr = x + r * cols, *br = base + r * w;
        uint8_t *qr = q + r * cols;
        uint64_t c0 = 0;
        for (; in_range && c0 + LANES <= w; c0 += LANES)
            encode_lanes(xr + c0, br + c0, s, inv, ramax, qr + c0, &L);
        for (; c0 < w; c0++)
            encode_one(xr[c0], br[c0], s, inv, ramax, qr + c0, &L, (int)(c0 % LANES));
    }
    enc_lanes_into(&L, s, amax, st);
    /* a new scale changes every value: the codes are counted only under the base's scale */
    st->n_changed += inv != s0 ? h * w : count_diff_rows(q, q0, h, w, cols);
    st->n_err += h * w;
}

/* the block's lanes summed into st (n_changed: its changed codes; s, amax: its new scale and amax,
 * fp8_lanes_k()) */
static void fp8_block_stats(uint64_t h, uint64_t w, uint64_t n_changed, const lm_fp8_lanes *L, float s, float amax,
                            lm_qstats *st)
{
    double kerr, ke2;
    fp8_lanes_k(s, amax, &kerr, &ke2);
    fp8_lanes_into(L->sum, L->d2, L->e2, L->emax, 16, kerr, ke2, st);
    st->n_changed += n_changed;
    st->n_err += h * w;
}

/* the block's x (h x w, row stride ldx) requantized by the rule: kept, or a new scale and the
 * codes (k->fp8_encode); the numbers into st */
static void fp8_encode_block(const lm_kernels *k, const uint8_t *q0, float s0, uint64_t h, uint64_t w, uint64_t cols,
                             const float *x, uint64_t ldx, uint8_t *q, float *out_scale, lm_qstats *st,
                             lm_fp8_lanes *L)
{
    const float amax = bits_f32(L->amax);
    st->n_blocks++;
    st->n_nonfinite_blocks += !isfinite(amax);
    if (keep_block(x, ldx, q0, s0, h, w, cols, L->same, amax, q, out_scale, st))
        return;
    const float s = 448.0f / amax, inv = 1.0f / s, ramax = 1.0f / amax;
    *out_scale = inv;
    const uint8_t *cq = inv == s0 ? q0 : NULL; /* a new scale changes every value: counted only under s0 */
    if (isfinite(s)) {
        k->fp8_encode(x, (size_t)ldx, (size_t)h, (size_t)w, s, inv, ramax, cq, (size_t)cols, q, (size_t)cols, L, NULL);
    } else { /* amax below 448 / FLT_MAX: x * s out of range, encode_one's saturating rule */
        memset(L->sum, 0, sizeof L->sum);
        memset(L->e2, 0, sizeof L->e2);
        memset(L->emax, 0, sizeof L->emax);
        L->n_diff = 0;
        for (uint64_t r = 0; r < h; r++)
            for (uint64_t c = 0; c < w; c++) {
                const float xv = x[r * ldx + c];
                float v;
                const uint8_t code = (uint8_t)e4m3_encode(xv * s, &v);
                q[r * cols + c] = code;
                L->n_diff += cq != NULL && code != cq[r * cols + c];
                const float dq = copysignf(v, xv) * inv - xv;
                const uint32_t e = f32_bits(dq * ramax) & 0x7FFFFFFFu;
                L->emax[c % 16] = e > L->emax[c % 16] ? e : L->emax[c % 16];
                L->sum[c % 16] += bits_f32(e);
                L->e2[c % 16] += dq * dq;
            }
    }
    fp8_block_stats(h, w, cq == NULL ? h * w : L->n_diff, L, s, amax, st);
}

/* ---- certification (lm_fp8_bound) -----------------------------------------------------------
 * Proof.  Let X be the exact merged value of an element rounded once to f32 (RN32), x the
 * kernel's f32 value, |X - x| <= erow[i] + 2^-21 |x| (the caller's bound, which covers the term's
 * chain, the add and RN32 itself; erow 0: x = X).  The rule maps X to fl(X * s) and that to its
 * E4M3 code; fl, RN32 and the E4M3 rounding are monotone.  y = fl(x s), y' = fl(X s), Es =
 * fl(erow s).
 * (a) The codes, |y| >= 2^-6.  |y' - y| <= D := s erow + 2^-21 |x s| + 2^-24 (|y| + |y'|) <=
 *     Es (1 + 2^-23) + 11 ulp(y) (ulp(y) = 2^(E-23) for |y| in [2^E, 2^(E+1))).  With g = 2^(E-3)
 *     the E4M3 step of that binade, h = g / 2, v the value coded and e = |v - y| <= h, the
 *     nearest rounding midpoint of y's binade is h - e from y; the binade below has its last
 *     midpoint h / 2 below 2^E (below 2^-6: 2^-6 - 2^-10, h below), the binade above its first g
 *     above 2^(E+1).  So no midpoint lies within min(h - e, h / 2) of y (the one below 2^E is
 *     |y| - 2^E + h / 2 away), and when D is below both, y and y' get the same code (no tie
 *     either).  D <= Ers + 11 ulp(y) (Ers >= Es (1 + 2^-23), below), and h - 22 ulp(y) = 2^(E-23)
 *     (2^19 - 22) is an f32 (its bits (a & 0x7F800000) - 0x020002C0): the kernel flags fl(e + M)
 *     >= h - 22 ulp(y), M = lm_fp8_margin(Ers), so an element not flagged has e + M < h - 22
 *     ulp(y) (rounding is monotone).  M = Ers when Ers <= 2^-12: D < h - e - 11 ulp(y), and D <=
 *     2^-12 + 11 ulp(y) < 2^-11 <= h / 2 (E >= -6).  Else M = 2 Ers: 2 D <= 2 Ers + 22 ulp(y) <
 *     h - e, so D < (h - e) / 2, below both.  (The y of a bounded f32 merge are within far less
 *     than 2^-12 of their exact values (|y| <= 448): M = Ers halves the elements flagged.)
 * (b) |y| < 2^-6: the codes are the multiples of 2^-9 (to 2^-6 and its neighbour 9 x 2^-9), the
 *     midpoints the odd multiples of 2^-10, and zero's sign is the code's.  Here D <= Es (1 +
 *     2^-23) + 2^-20 |y| + 2^-147 (the subnormal f32 range adds 2^-150 per rounding) <= Ers +
 *     2^-19 |y|, Ers = Es 1.0001 + 2^-140 (f32), and the distance of y to the nearest midpoint,
 *     2^-10 - |y - r| (r = |y| rounded to 2^-9: (|y| + 2^14) - 2^14), or to zero (|y|), exact
 *     where it is the smaller, must exceed it; the kernel flags the others.
 * (c) The amax is max |X|.  With E = max erow + 2^-21 amax_x (amax_x = max |x|), every element
 *     has |X - x| <= E.  The rows outside the term are exact (their max, amax_b).  A term
 *     element with |x| < thr <= amax_x - 2 E has |X| < amax_x - E, below the exact value of the
 *     element holding amax_x (a term element, then |x| >= thr and it is flagged) or below
 *     amax_b (when that holds it): amax = max(amax_b, |X| of the flagged).  The kernel flags
 *     |y| >= fl(thr s), which every |x| >= thr has (monotone).  A new amax (rare) changes s:
 *     the codes are made again with it, flagged by (a) and (b) only.
 * (d) Kept: a block keeps its codes and scale when every X equals its base value c.  An element
 *     with |x - c| > erow + 2^-21 |x| has X != c: the block changes.  Blocks with no such
 *     element, with a bound or x not finite, or a scale out of range, take X for every element
 *     of the term's rows (the rule on exact values).
 * The flagged elements take X (exact()), their codes made again from it. */

/* 1 if an element of a checked row surely changed (X != its base value, (d)) */
static int fp8_surely_changed(const uint8_t *q0, float s0, uint64_t h, uint64_t w, uint64_t cols, const float *x,
                              uint64_t ldx, const float *erow)
{
    for (uint64_t r = 0; r < h; r++) {
        if (!(erow[r] > 0.0f))
            continue;
        for (uint64_t c = 0; c < w; c++) {
            const double xv = x[r * ldx + c], d = fabs(xv - (double)(e4m3_decode(q0[r * cols + c]) * s0));
            if (d > ((double)erow[r] + 0x1p-20 * fabs(xv)) * (1 + 0x1p-40))
                return 1;
        }
    }
    return 0;
}

/* element (i, j) exact: X into x, counted */
static float fp8_exact1(lm_fp8_bound *bd, const uint8_t *q0, float s0, uint64_t cols, float *x, uint64_t ldx,
                        uint64_t i, uint64_t j)
{
    const float X = bd->exact(bd->ctx, bd->row0 + i, bd->col0 + j, e4m3_decode(q0[i * cols + j]) * s0);
    x[i * ldx + j] = X;
    bd->n_exact++;
    return X;
}

/* every element of the checked rows exact, L's amax and sameness from the exact values */
static void fp8_exact_block(lm_fp8_bound *bd, const uint8_t *q0, float s0, uint64_t h, uint64_t w, uint64_t cols,
                            float *x, uint64_t ldx, lm_fp8_lanes *L)
{
    uint32_t am = 0;
    int same = 1;
    for (uint64_t r = 0; r < h; r++)
        for (uint64_t c = 0; c < w; c++) {
            const float X = bd->erow[r] > 0.0f ? fp8_exact1(bd, q0, s0, cols, x, ldx, r, c) : x[r * ldx + c];
            const uint32_t a = f32_bits(X) & 0x7FFFFFFFu;
            am = a > am ? a : am;
            same &= X == e4m3_decode(q0[r * cols + c]) * s0;
        }
    L->amax = am;
    L->same = same;
}

/* the certified encode ((a) to (c)): 0 done, -1 the block takes exact values throughout */
static int fp8_certified(const lm_kernels *k, const uint8_t *q0, float s0, uint64_t h, uint64_t w, uint64_t cols,
                         float *x, uint64_t ldx, uint8_t *q, float *out_scale, lm_qstats *st, lm_fp8_lanes *L,
                         lm_fp8_bound *bd, float emax)
{
    float amax = bits_f32(L->amax);
    if (!isfinite(amax) || L->same || !fp8_surely_changed(q0, s0, h, w, cols, x, ldx, bd->erow))
        return -1;
    const double thr_d = (double)amax * (1 - 0x1p-19) - 2 * (double)emax;
    float thr = (float)thr_d;
    if (!(thr_d > 0) || !(448.0f / amax < FLT_MAX))
        return -1;
    if ((double)thr > thr_d)
        thr = nextafterf(thr, 0.0f);
    float s = 448.0f / amax, inv = 1.0f / s, ramax = 1.0f / amax;
    const uint8_t *cq = inv == s0 ? q0 : NULL;
    lm_fp8_cert cert = {bd->erow, f32_bits(thr * s), bd->flag, 0};
    k->fp8_encode(x, (size_t)ldx, (size_t)h, (size_t)w, s, inv, ramax, cq, (size_t)cols, q, (size_t)cols, L, &cert);
    const size_t n1 = cert.n_flag;
    uint32_t am = L->amax_b;
    const uint32_t w32 = (uint32_t)w; /* (h w < 2^32: the flags' row and column by a 32-bit division) */
    for (size_t f = 0; f < n1; f++) {
        const uint32_t e = bd->flag[f], i = e / w32;
        const uint32_t a = f32_bits(fp8_exact1(bd, q0, s0, cols, x, ldx, i, e - i * w32)) & 0x7FFFFFFFu;
        am = a > am ? a : am;
    }
    size_t n2 = 0;
    if (am != L->amax) { /* a new amax: the codes again with its scale, the flagged of (a), (b) exact too */
        amax = bits_f32(am);
        if (!(amax > 0.0f) || !isfinite(amax) || !(448.0f / amax < FLT_MAX))
            return -1;
        s = 448.0f / amax;
        inv = 1.0f / s;
        ramax = 1.0f / amax;
        cq = inv == s0 ? q0 : NULL;
        cert.thr = 0xFFFFFFFFu;
        cert.flag = bd->flag + n1;
        k->fp8_encode(x, (size_t)ldx, (size_t)h, (size_t)w, s, inv, ramax, cq, (size_t)cols, q, (size_t)cols, L, &cert);
        n2 = cert.n_flag;
        for (size_t f = 0, g = 0; f < n2; f++) { /* (both lists ascending) the new ones */
            const uint32_t e = bd->flag[n1 + f];
            while (g < n1 && bd->flag[g] < e)
                g++;
            if (g == n1 || bd->flag[g] != e)
                (void)fp8_exact1(bd, q0, s0, cols, x, ldx, e / w32, e % w32);
        }
    }
    L->amax = am;
    st->n_blocks++;
    *out_scale = inv;
    for (size_t f = 0; f < n1 + n2; f++) { /* the exact elements' codes */
        const uint32_t i = bd->flag[f] / w32, j = bd->flag[f] - i * w32;
        float v;
        const uint8_t code = (uint8_t)e4m3_encode(x[i * ldx + j] * s, &v), old = q[i * cols + j];
        q[i * cols + j] = code;
        if (cq != NULL)
            L->n_diff = L->n_diff + (code != cq[i * cols + j]) - (old != cq[i * cols + j]);
    }
    fp8_block_stats(h, w, cq == NULL ? h * w : L->n_diff, L, s, amax, st);
    return 0;
}

void lm_fp8_merge_block(const lm_kernels *k, const uint8_t *q0, float s0, uint64_t h, uint64_t w, uint64_t cols,
                        const lm_fp8_term *term, float *x, uint64_t ldx, uint8_t *q, float *out_scale, lm_qstats *st,
                        lm_fp8_bound *bd)
{
    lm_fp8_lanes L;
    k->fp8_merge(q0, (size_t)cols, s0, (size_t)h, (size_t)w, term, x, (size_t)ldx, &L);
    /* on the bounds' bits (a loop that vectorizes): any one not +-0 (checked), the largest
     * magnitude (emax), and bad: one negative (not -0), FLT_MAX or above, inf or NaN */
    uint32_t any = 0, am = 0, bad = 0;
    for (uint64_t r = 0; bd != NULL && r < h; r++) {
        const uint32_t u = f32_bits(bd->erow[r]), a = u & 0x7FFFFFFFu;
        any |= a;
        am = a > am ? a : am;
        bad |= (uint32_t)(u > 0x80000000u) | (uint32_t)(a >= 0x7F7FFFFFu);
    }
    if (any != 0) {
        if (!bad && fp8_certified(k, q0, s0, h, w, cols, x, ldx, q, out_scale, st, &L, bd, bits_f32(am)) == 0)
            return;
        fp8_exact_block(bd, q0, s0, h, w, cols, x, ldx, &L);
    }
    fp8_encode_block(k, q0, s0, h, w, cols, x, ldx, q, out_scale, st, &L);
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
