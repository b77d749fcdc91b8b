/* SPDX-License-Identifier: MIT */
/* exec_quant.c : quantized tiles (see exec_quant.h). */
#include "exec_quant.h"

#include "lm_error.h"
#include "lm_sys.h"
#include "plan_quant_bnb.h"
#include "quant_bnb.h"
#include "quant_mx.h"
#include "st_reader.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t *entry_bytes(const lm_model *model, const lm_model_entry *e)
{
    return lm_st_data(lm_model_file(model, e->file)) + e->info->begin;
}

/* the nb bytes of entry e of the base into dst.  Read with pread when the file has a descriptor:
 * through the mapping, where the page cache holds the base in 2 MB folios, the first touch maps
 * the whole folio, which must be made present and dropped again (~0.2 ms a tensor, 2.3% of the
 * fp8 bench's CPU, against a few us for the pread), and a file cut under the merge would raise
 * SIGBUS.  Otherwise the mapped bytes, made present in one call and then dropped (resident, 2 MB
 * a tensor would stay: +288 MB of peak RSS on the fp8 bench read cold). */
static lm_code entry_read(const lm_model *model, const lm_model_entry *e, void *dst, uint64_t nb, lm_err *err)
{
    const lm_st_file *f = lm_model_file(model, e->file);
    if (lm_st_fd(f) < 0) {
        lm_populate_read(entry_bytes(model, e), nb);
        memcpy(dst, entry_bytes(model, e), (size_t)nb);
        lm_drop_mapped_pages(entry_bytes(model, e), nb);
        return LM_OK;
    }
    return lm_base_pread(f, lm_st_data_offset(f) + e->info->begin, dst, nb, e->info->name, err);
}

/* n scales of dtype dt, entry e of the base, as f32 into dst (entry_read) */
static lm_code scales_read(const lm_model *model, const lm_model_entry *e, lm_dtype dt, size_t n, float *dst,
                           const char *name, lm_err *err)
{
    const uint64_t nb = (uint64_t)n * (lm_dtype_bits(dt) / 8);
    uint8_t *raw = malloc((size_t)nb + 1);
    if (raw == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the scales of '%s'", name);
    const lm_code rc = entry_read(model, e, raw, nb, err);
    if (rc == LM_OK)
        lm_q_scales_to_f32(dt, raw, n, dst);
    free(raw);
    return rc;
}

/* a bitsandbytes 4-bit weight's absmax as f32: stored, or decoded from the nested ones (entry_read) */
static lm_code bnb4_absmax(const lm_bnb_qinfo *b, const lm_model *model, float *dst, const char *name, lm_err *err)
{
    if (b->nested_absmax == NULL)
        return entry_read(model, b->absmax, dst, (uint64_t)b->n_absmax * sizeof(float), err);
    const uint64_t n2 = b->nested_absmax->info->n_elems;
    float map[256], *a2 = malloc((size_t)n2 * sizeof *a2 + 1);
    uint8_t *codes = malloc((size_t)b->n_absmax + 1);
    lm_code rc = a2 != NULL && codes != NULL
                     ? LM_OK
                     : lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the scales of '%s'", name);
    if (rc == LM_OK && (rc = entry_read(model, b->nested_map, map, sizeof map, err)) == LM_OK &&
        (rc = entry_read(model, b->nested_absmax, a2, n2 * sizeof *a2, err)) == LM_OK &&
        (rc = entry_read(model, b->absmax, codes, (uint64_t)b->n_absmax, err)) == LM_OK)
        lm_bnb_nested_absmax(codes, b->n_absmax, map, a2, b->nested_blocksize, b->offset, dst);
    free(codes);
    free(a2);
    return rc;
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
    lm_code rc = scales_read(model, q->scale, q->scale_dtype, n, *scales, t->name, err);
    if (rc == LM_OK && q->scale2 != NULL)
        rc = scales_read(model, q->scale2, LM_DT_F32, n2, *scales + n, t->name, err);
    if (rc != LM_OK) {
        free(*scales);
        *scales = NULL;
    }
    return rc;
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
    return 4 * max_elems + 256;
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

/* ---- the fused term's bound (certified tiles) ------------------------------------------------
 * The kernel's x for a term row i (fp8_merge: acc the chain of K fmaf from 0 over b_k a_k, B's and
 * A's f32 values, x = fl(c + fl(alpha acc)), alpha = fl32(s)) against the exact merged value
 * v = c + s sum_k b_k a_k and X = RN32(v).  u = 2^-24, S = sum_k |b_k a_k|, eta = 2^-150 (the
 * absolute error of one rounding in the subnormal range; sums there are exact).
 *  acc = sum b_k a_k + e1, |e1| <= ((1 + u)^K - 1) S + K eta (1 + u)^K;  alpha = s (1 + d2) when
 *  |s| is 0 or in [2^-126, FLT_MAX] (|d2| <= u); fl(alpha acc) = alpha acc (1 + d1) + n1:
 *  |fl(alpha acc) - s sum| <= |s| S g + (|s| K (1 + 2^-20) + 1) eta, g = (1 + u)^(K+2) - 1 <=
 *  1.01 (K + 2) u for (K + 2) u <= 2^-7.  x = fl(c + t): |x - (c + t)| <= u' |x|.  |X - v| <= u |v| +
 *  eta.  So |X - x| <= (1 + u)(|s| S g) + (u + u')(1 + 2^-20) |x| + (|s| K + 2)(1 + 2^-20) eta, and
 *  with S <= ||b_i.|| ||a_.j|| (Cauchy-Schwarz): erow = 1.02 (K + 2) u |s| ||b_i.|| max_j ||a_.j||
 *  + (|s| (K + 1) + 2) 2^-149, rounded up (the norms in f64 from f32 values: relative error far
 *  below the 1.02's slack), and 2^-21 |x| covers the rest (lm_fp8_bound). */
/* e rounded up to f32 (inf beyond its range, NaN kept): nextafterf(f, INFINITY) when f < e, on
 * the bits (f is then not +inf nor NaN: the next f32 up is one step of the magnitude's bits, up
 * for f >= +0, down for f < 0 and -0 never below e) without the call, ~10% of the bound's time */
static float f32_up(double e)
{
    float f = (float)e;
    if ((double)f < e) {
        uint32_t u;
        memcpy(&u, &f, 4);
        u = f >= 0.0f ? u + 1 : u - 1;
        memcpy(&f, &u, 4);
    }
    return f;
}

struct lm_xq_bound {
    float *rf;   /* [n]: 1.02 (K + 2) u |s| ||b_i.||, rounded up to f32 */
    double *cfm; /* [ceil(cols / bc)]: the largest ||a_.j|| of the block's columns */
    double c0;
};

void lm_xq_bound_free(lm_xq_bound *b)
{
    if (b == NULL)
        return;
    free(b->rf);
    free(b->cfm);
    free(b);
}

lm_xq_bound *lm_xq_bound_make(const lm_plan_tensor *t, const lm_xq_term *term)
{
    const double s = term->s;
    const uint64_t K = term->K, cols = t->cols, bc = t->q->bc, nb = (cols + bc - 1) / bc;
    const double as = fabs(s);
    if (K == 0 || (double)(K + 2) * 0x1p-24 > 0x1p-7 || !(as == 0 || (as >= 0x1p-126 && as <= FLT_MAX)))
        return NULL;
    lm_xq_bound *b = calloc(1, sizeof *b);
    double *cn = malloc((size_t)cols * sizeof *cn + 1);
    if (b == NULL || cn == NULL || (b->rf = malloc((size_t)term->n * sizeof *b->rf + 1)) == NULL ||
        (b->cfm = malloc((size_t)nb * sizeof *b->cfm + 1)) == NULL) {
        free(cn);
        lm_xq_bound_free(b);
        return NULL;
    }
    const double g = 1.02 * (double)(K + 2) * 0x1p-24 * as;
    for (uint64_t i = 0; i < term->n; i++) { /* (four partial sums: any order keeps the error far
                                                 below the slack) */
        const float *bi = term->B + i * K;
        double s4[4] = {0, 0, 0, 0};
        uint64_t p = 0;
        for (; p + 4 <= K; p += 4)
            for (int l = 0; l < 4; l++)
                s4[l] += (double)bi[p + l] * (double)bi[p + l];
        for (; p < K; p++)
            s4[0] += (double)bi[p] * (double)bi[p];
        b->rf[i] = f32_up(g * sqrt((s4[0] + s4[1]) + (s4[2] + s4[3]))); /* (inf or NaN: the blocks take exact values) */
    }
    for (uint64_t j = 0; j < cols; j++)
        cn[j] = 0;
    for (uint64_t c0 = 0; c0 < cols; c0 += bc) { /* (from the packed A when there: read once) */
        const uint64_t w = c0 + bc < cols ? bc : cols - c0;
        const float *a = term->Ap != NULL ? term->Ap + c0 * K : term->A + c0;
        const uint64_t lda = term->Ap != NULL ? w : cols;
        for (uint64_t p = 0; p < K; p++)
            for (uint64_t j = 0; j < w; j++)
                cn[c0 + j] += (double)a[p * lda + j] * (double)a[p * lda + j];
    }
    for (uint64_t c = 0; c < nb; c++) {
        double m = 0;
        for (uint64_t j = c * bc; j < cols && j < (c + 1) * bc; j++)
            m = !(cn[j] <= m) ? cn[j] : m; /* (NaN kept) */
        b->cfm[c] = sqrt(m);
    }
    b->c0 = (as * (double)(K + 1) + 2) * 0x1p-149;
    free(cn);
    return b;
}

float *lm_xq_pack_a(const lm_plan_tensor *t, const lm_xq_term *term)
{
    const uint64_t K = term->K, cols = t->cols, bc = t->q->bc;
    float *p = malloc((size_t)(K * cols) * sizeof *p + 1);
    if (p != NULL) /* written whole: present in one call, not a fault per page */
        lm_populate(p, (size_t)(K * cols) * sizeof *p);
    for (uint64_t k = 0; p != NULL && k < K; k++) /* A's rows read in order (cold: ~2x faster than by block) */
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const uint64_t w = c0 + bc < cols ? bc : cols - c0;
            memcpy(p + c0 * K + k * w, term->A + k * cols + c0, (size_t)w * sizeof *p);
        }
    return p;
}

/* the exponent of the lowest set bit of x (finite, nonzero) */
static int lowbit(double x)
{
    uint64_t u;
    memcpy(&u, &x, 8);
    const int e = (int)((u >> 52) & 0x7FF);
    const uint64_t m = (u & 0xFFFFFFFFFFFFFull) | (e ? 1ull << 52 : 0);
    return (e ? e : 1) - 1075 + __builtin_ctzll(m);
}

/* M 2^q (|M| < 2^127) rounded to nearest even f32 (+0 for 0): the f32 quantum at it is 2^g, g =
 * max(E - 23, -149) for M 2^q in [2^E, 2^(E+1)); M is rounded at bit g - q in the integer, and
 * the f32 of (mantissa < 2^24) 2^g is exact (or inf beyond the range) */
__extension__ static float round_f32(__int128 M, int q)
{
    if (M == 0)
        return 0.0f;
    const int neg = M < 0;
    unsigned __int128 m = neg ? -(unsigned __int128)M : (unsigned __int128)M;
    const uint64_t hi = (uint64_t)(m >> 64);
    const int top = hi ? 127 - __builtin_clzll(hi) : 63 - __builtin_clzll((uint64_t)m);
    int g = top + q - 23;
    g = g < -149 ? -149 : g;
    const int sh = g - q; /* bits of m below the quantum */
    if (sh > 0) {
        if (sh > 127)
            m = 0;
        else {
            const unsigned __int128 half = (unsigned __int128)1 << (sh - 1), low = m & ((half << 1) - 1);
            m >>= sh;
            if (low > half || (low == half && (m & 1)))
                m++;
        }
    } else {
        m <<= -sh; /* (top + q < -126 + 23: small) */
    }
    const float f = ldexpf((float)(uint64_t)m, g);
    return neg ? -f : f;
}

/* Exact values in f64.  p_k = b_k a_k (f32 values) is exact in f64 (48 bits; a nonzero one is a
 * multiple of 2^-298, and so is every partial sum, which is thus never subnormal); d = their
 * sum (four chains from 0, then added pairwise: K - 1 roundings on any product's path, within the
 * bound of one chain of K), S' = the same sum of |p_k|, r = fl(w + fl(s d)): |v - r| <= |s| S ((1 +
 * u)^(K+1) - 1) + u' |r| (u = 2^-53) + 2^-1075 (fl(s d) subnormal), S <= S' (1 + 2 K u), so e =
 * 1.02 (K + 2) u |s| S' + 2^-51 |r| + 2^-1070 (f64, its own roundings in the slack) gives lo =
 * r - e <= v <= hi = r + e, and RN32 being monotone, RN32(v) is RN32(lo) when that equals RN32(hi)
 * (the bits, so that zero's sign counts; (float) of a double rounds once).  Else, with s a power
 * of two, when w and every s p_k are multiples of 2^q and |w| + |s| S' (1 + 2^-30) < 2^(q+120),
 * v is the sum of the integers w 2^-q and s p_k 2^-q times 2^q, computed exactly in 128 bits
 * and rounded once (round_f32).  Every p_k zero (or s zero): v = w, sign included (the low-rank
 * path's rule); an exact zero sum: +0. */
int lm_xq_exact(const lm_xq_term *term, uint64_t cols, uint64_t bc, uint64_t row, uint64_t col, float w, float *x)
{
    const uint64_t K = term->K, c0 = col / bc * bc;
    const float *b = term->B + (row - term->row0) * K, *a = term->A + col;
    if (term->Ap != NULL) { /* the packed block's column (in the cache: the kernels have just read it) */
        a = term->Ap + c0 * K + (col - c0);
        cols = c0 + bc < cols ? bc : cols - c0;
    }
    double d4[4] = {0, 0, 0, 0}, S4[4] = {0, 0, 0, 0}; /* four chains: a quarter of the latency */
    uint64_t k = 0;
    for (; k + 4 <= K; k += 4)
        for (int l = 0; l < 4; l++) {
            const double pk = (double)b[k + l] * (double)a[(k + l) * cols];
            d4[l] += pk;
            S4[l] += fabs(pk);
        }
    for (; k < K; k++) {
        const double pk = (double)b[k] * (double)a[k * cols];
        d4[0] += pk;
        S4[0] += fabs(pk);
    }
    const double d = (d4[0] + d4[1]) + (d4[2] + d4[3]), S = (S4[0] + S4[1]) + (S4[2] + S4[3]);
    if (S == 0 || term->s == 0) {
        *x = w;
        return isfinite(w) ? 0 : -1;
    }
    const double r = (double)w + term->s * d;
    const double e = 1.02 * (double)(K + 2) * 0x1p-53 * fabs(term->s) * S + 0x1p-51 * fabs(r) + 0x1p-1070;
    const float lo = (float)(r - e), hi = (float)(r + e);
    uint32_t ul, uh;
    memcpy(&ul, &lo, 4);
    memcpy(&uh, &hi, 4);
    if (ul == uh && isfinite(lo) && isfinite(e)) {
        *x = lo;
        return 0;
    }
    int es = 0;
    if (!isfinite(r) || !(S < 0x1p1000) || !(fabs(term->s) >= 0x1p-700 && fabs(term->s) <= 0x1p700) ||
        frexp(term->s, &es) != (term->s < 0 ? -0.5 : 0.5)) /* (s p_k exact in f64) */
        return -1;
    int q = w != 0 ? lowbit((double)w) : 1 << 20; /* every term a multiple of 2^q */
    for (uint64_t p = 0; p < K; p++) {
        const double pk = (double)b[p] * (double)a[p * cols] * term->s;
        q = pk != 0 && lowbit(pk) < q ? lowbit(pk) : q;
    }
    /* below 2^(q+120) each, at most 2^7 of them (K <= 2^17 - 2 is checked with the bound, but
     * the sum needs K + 1 < 2^7): the sum of the integers m 2^-q in 128 bits, exactly */
    if (K + 1 >= 128 || q < -1100 || q > 900 ||
        !((fabs((double)w) + fabs(term->s) * S) * (1 + 0x1p-30) < ldexp(1.0, q + 120)))
        return -1;
    __extension__ __int128 M = (__int128)ldexp((double)w, -q);
    for (uint64_t p = 0; p < K; p++)
        M += (__int128)ldexp((double)b[p] * (double)a[p * cols] * term->s, -q);
    *x = round_f32(M, q);
    return 0;
}

/* one block by the kernels (lm_fp8_merge_block): the term's rows of the block, A's columns of the
 * block packed (K rows of w floats) when room allows (rows cols * 4 bytes apart would share a few
 * L1 sets), the merged values into x (h x w); with term->bound the rows' bounds into erow (h) and
 * the flags into flag (2 h w) */
static void merge_block_k(const lm_kernels *k, const lm_xq_term *term, const uint8_t *q0, float s0, uint64_t R,
                          uint64_t h, uint64_t c0, uint64_t w, uint64_t cols, uint64_t bc, float *x, float *erow,
                          uint32_t *flag, float *apack, size_t room, uint8_t *q, float *out_scale, lm_qstats *st)
{
    lm_fp8_term ft = {term->B, term->A + c0, (size_t)term->K, (size_t)cols, (size_t)term->K, 0, 0, term->alpha};
    const uint64_t lo = term->row0 > R ? term->row0 : R, hi = term->row0 + term->n < R + h ? term->row0 + term->n : R + h;
    if (lo < hi) {
        ft.B = term->B + (lo - term->row0) * term->K;
        ft.r_lo = (size_t)(lo - R);
        ft.r_hi = (size_t)(hi - R);
        if (term->Ap != NULL) {
            ft.A = term->Ap + c0 * term->K;
            ft.lda = (size_t)w;
        } else if (term->K * w <= room) {
            for (uint64_t p = 0; p < term->K; p++)
                memcpy(apack + p * w, term->A + p * cols + c0, (size_t)w * sizeof *apack);
            ft.A = apack;
            ft.lda = (size_t)w;
        }
    }
    if (term->bound == NULL) {
        lm_fp8_merge_block(k, q0, s0, h, w, cols, &ft, x, w, q, out_scale, st, NULL);
        return;
    }
    const lm_xq_bound *b = term->bound;
    for (uint64_t i = 0; i < h; i++)
        erow[i] = 0.0f;
    if (lo < hi) {
        /* at least rf_i cf + c0 in f32 (a loop the compiler vectorizes): with rf_i rounded up,
         * cf' >= cf (1 + 2^-22) and c0' >= c0 (1 + 2^-22) + 2^-149, fl(rf_i cf') >= rf_i cf (1 +
         * 2^-22)(1 - 2^-24) (or minus 2^-150 when subnormal, which the 2^-149 covers), and the
         * sum, (rf_i cf + c0)(1 + 2^-23) or more, loses at most 2^-24 of itself rounding (inf
         * and NaN propagate: the block takes exact values) */
        const float cf = f32_up(b->cfm[c0 / bc] * (1 + 0x1p-22)), bc0 = f32_up(b->c0 * (1 + 0x1p-22) + 0x1p-149);
        const float *rf = b->rf + (lo - term->row0);
        float *er = erow + (lo - R);
        for (uint64_t i = 0; i < hi - lo; i++)
            er[i] = rf[i] * cf + bc0;
    }
    lm_fp8_bound bd = {erow, term->exact, term->ctx, R, c0, flag, 0};
    lm_fp8_merge_block(k, q0, s0, h, w, cols, &ft, x, w, q, out_scale, st, &bd);
    st->n_exact += bd.n_exact;
}

size_t lm_xq_merge_tile(const lm_plan_tensor *t, const lm_kernels *k, const float *scales, const uint8_t *codes0,
                        uint64_t r0, uint64_t nr, float *acc, const lm_xq_term *term, lm_xq_apply_fn apply, void *ctx,
                        uint8_t *out, float *qbuf, lm_qstats *st, lm_xq_piece pieces[2])
{
    const lm_qtensor *q = t->q;
    const uint64_t cols = t->cols, br = q->br, bc = q->bc;
    const float *s0 = scales + (r0 / br) * q->scols;
    const size_t ns = tile_scales(q, nr), off = (ns + 16) / 16 * 16;
    const size_t room = (size_t)(4 * nr * cols + 256) - off; /* lm_xq_qbuf_floats(): qbuf's floats past off */
    /* a block's base values or merged values (h w), then with a bound its rows' bounds (h, to a
     * multiple of 16) and flags (2 h w), then A's packed columns in what is left */
    float *base = qbuf + off;
    const int kern = term != NULL && k->fp8_merge != NULL;
    const uint64_t nonfinite0 = st->n_nonfinite_blocks;
    for (uint64_t rr = 0; rr < nr; rr += br) { /* tiles start on a block row (lm_plan_tile_rows) */
        const uint64_t h = rr + br < nr ? br : nr - rr;
        for (uint64_t c0 = 0; c0 < cols; c0 += bc) {
            const uint64_t w = c0 + bc < cols ? bc : cols - c0, bi = (rr / br) * q->scols + c0 / bc, e = rr * cols + c0;
            if (kern) {
                const size_t nb = term->bound != NULL ? (size_t)(h + 15) / 16 * 16 + 2 * (size_t)(h * w) : 0;
                float *erow = base + h * w;
                merge_block_k(k, term, codes0 + e, s0[bi], r0 + rr, h, c0, w, cols, bc, base, erow,
                              (uint32_t *)(void *)(erow + (h + 15) / 16 * 16), base + h * w + nb,
                              room - (size_t)(h * w) - nb, out + e, qbuf + bi, st);
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
