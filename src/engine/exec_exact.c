/* SPDX-License-Identifier: MIT */
/* exec_exact.c : see exec_exact.h. */
#include "exec_exact.h"

#include "exec_dora.h"
#include "exec_lowrank.h"

#include <math.h>
#include <string.h>

/* the scaling loops built for AVX-512 and AVX2 too (an ifunc picks one at load); the same
 * operations per element either way (f32 products, bit tests), so the same bytes */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define XE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define XE_CLONES
#endif

static int kernel_dtype(lm_dtype dt)
{
    return dt == LM_DT_BF16 || dt == LM_DT_F16 || dt == LM_DT_F32;
}

lm_dtype lm_exact_out_dtype(const lm_plan_tensor *t)
{
    if (t->q == NULL || t->dtype != t->src_dtype)
        return t->dtype;
    return t->q->fmt == LM_Q_MXFP4 ? LM_DT_BF16 : LM_DT_F32;
}

static lm_exact_kind kind_of(const lm_plan_tensor *t);

lm_exact_kind lm_exact_kind_of(const lm_plan_tensor *t)
{
    if (t->q == NULL)
        return kind_of(t);
    /* the dequantized tile is an f32 base (exact), rounded to lm_exact_out_dtype() */
    lm_plan_tensor v = *t;
    v.q = NULL;
    v.src_dtype = LM_DT_F32;
    v.dtype = lm_exact_out_dtype(t);
    if (t->sim_nf4 || (t->n_ops > 0 && t->ops[0].kind == LM_OP_REPLACE)) /* the tiles are the codes' */
        return LM_EXACT_NONE;
    return kind_of(&v);
}

static lm_exact_kind kind_of(const lm_plan_tensor *t)
{
    if (lm_lowrank_tensor_eligible(t))
        return LM_EXACT_LOWRANK;
    if (!t->sim_nf4 && lm_dora_tensor_eligible(t))
        return LM_EXACT_DORA; /* low-rank and DoRA ops (exec_dora.h) */
    if (t->base == NULL || t->n_ops == 0 || !kernel_dtype(t->src_dtype) || !kernel_dtype(t->dtype) || t->rows == 0 ||
        t->cols == 0)
        return LM_EXACT_NONE;
    if (t->n_ops == 1 && t->ops[0].kind == LM_OP_SCALE && kernel_dtype(t->ops[0].src->dtype))
        return LM_EXACT_SCALE; /* the factors are exact in f32 */
    if (t->sim_nf4)
        return LM_EXACT_NONE;
    int arith = 0; /* an op that computes (not only replaces values) */
    for (size_t o = 0; o < t->n_ops; o++) {
        const lm_op *op = &t->ops[o];
        switch (op->kind) {
        case LM_OP_METHOD:
            if (op->method == NULL || op->method->apply_tile64 == NULL)
                return LM_EXACT_NONE;
            arith = 1;
            break;
        case LM_OP_LOWRANK: arith = 1; break;
        case LM_OP_REPLACE: /* op 0: the tiles are loaded from the replacement (src_dtype, exact in f32) */
            if (o != 0)
                return LM_EXACT_NONE;
            break;
        case LM_OP_ROWS:
        case LM_OP_ADD:
        case LM_OP_SCALE:
        case LM_OP_NORM: /* their f32 view of src must be its exact values (a column NORM: the column pass in f64) */
            if (op->src == NULL || !kernel_dtype(op->src->dtype))
                return LM_EXACT_NONE;
            arith |= op->kind != LM_OP_ROWS;
            break;
        default: return LM_EXACT_NONE;
        }
    }
    /* ops that only replace values (ROWS, REPLACE) leave each element the base's or an exact f32
     * value rounded once on the f32 path (lm_exact_by_copy); the others (a bias or full delta
     * added, low-rank terms beside them) are computed in f64 and rounded once */
    return arith ? LM_EXACT_F64 : LM_EXACT_NONE;
}

int lm_exact_by_copy(const lm_plan_tensor *t)
{
    if (t->q != NULL || t->sim_nf4 || t->n_ops == 0 || !kernel_dtype(t->src_dtype) || !kernel_dtype(t->dtype))
        return 0;
    for (size_t o = 0; o < t->n_ops; o++) {
        const lm_op *op = &t->ops[o];
        if (!(op->kind == LM_OP_REPLACE && o == 0) &&
            !(op->kind == LM_OP_ROWS && op->src != NULL && kernel_dtype(op->src->dtype)))
            return 0;
    }
    return 1;
}

/* ---- the f64 forms of the engine's ops (as exec.c's f32 ones) ------------------------------ */
static void f64_rows(const lm_op *op, const float *src, const lm_tile64 *t)
{
    for (size_t q = 0; q < op->n_rows; q++) {
        const uint64_t row = (uint64_t)op->rows[q];
        if (row < t->r0 || row >= t->r0 + t->nr)
            continue;
        double *d = t->acc + (row - t->r0) * t->cols;
        const float *s = src + q * t->cols;
        for (uint64_t c = 0; c < t->cols; c++)
            d[c] = (double)s[c];
    }
}

/* W += scale * B' A' (axis 1: transposed) on the rows of the op's block, sums in f64 (k
 * ascending) from the f64 factors when the method made them, else from the exact f32 ones */
static void f64_lowrank(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    const uint64_t end = op->row0 + (op->axis ? op->in : op->out);
    const uint64_t lo = t->r0 > op->row0 ? t->r0 : op->row0, hi = t->r0 + t->nr < end ? t->r0 + t->nr : end;
    const uint64_t R = op->rank, cols = t->cols;
    for (uint64_t row = lo; row < hi; row++) {
        double *d = t->acc + (row - t->r0) * cols, *y = t->scratch;
        const uint64_t i = row - op->row0;
        for (uint64_t c = 0; c < cols; c++)
            y[c] = 0.0;
        for (uint64_t k = 0; k < R; k++) {
            /* axis 0: row i of B' times row k of A'; axis 1: A'[k, i] times column k of B' */
            const double f = op->axis ? (p->a64 ? p->a64[k * op->in + i] : (double)p->a[k * op->in + i])
                                      : (p->b64 ? p->b64[i * R + k] : (double)p->b[i * R + k]);
            if (!op->axis) {
                if (p->a64)
                    for (uint64_t c = 0; c < cols; c++)
                        y[c] += f * p->a64[k * cols + c];
                else
                    for (uint64_t c = 0; c < cols; c++)
                        y[c] += f * (double)p->a[k * cols + c];
            } else {
                if (p->b64)
                    for (uint64_t c = 0; c < cols; c++)
                        y[c] += f * p->b64[c * R + k];
                else
                    for (uint64_t c = 0; c < cols; c++)
                        y[c] += f * (double)p->b[c * R + k];
            }
        }
        for (uint64_t c = 0; c < cols; c++)
            d[c] += op->scale * y[c];
    }
}

static void f64_scale(const lm_op *op, const float *f, const lm_tile64 *t)
{
    for (uint64_t r = 0; r < t->nr; r++) {
        double *row = t->acc + r * t->cols;
        if (op->axis == 0) {
            const double s = (double)f[t->r0 + r];
            for (uint64_t c = 0; c < t->cols; c++)
                row[c] *= s;
        } else {
            for (uint64_t c = 0; c < t->cols; c++)
                row[c] *= (double)f[c];
        }
    }
}

int lm_exact_certify_fast(const lm_plan_tensor *t)
{
    const lm_dtype od = lm_exact_out_dtype(t);
    if (t->n_ops != 1 || (od != LM_DT_BF16 && od != LM_DT_F16))
        return 0;
    const lm_op *op = &t->ops[0];
    return op->kind == LM_OP_METHOD && op->method->apply_tile64 != NULL &&
           (op->method->certify_tile != NULL || (op->method->apply_tile_bound != NULL && op->method->elem64 != NULL));
}

/* the output bits of lo and hi equal and finite: a mask bit per element of a chunk of 64.  lo, hi
 * = y -+ b', b' = b (1 + 2^-20) + |y| 2^-22: the f32 sums y -+ b' round outwards of y -+ b (their
 * rounding error is at most 2^-24 (|y| + b')), and RNE is monotone, so every value in
 * [y - b, y + b] rounds like them */
static inline __attribute__((always_inline)) void certify_ends(const float *y, const float *b, size_t i, float *lo,
                                                               float *hi)
{
    const float w = b[i] * (1.0f + 0x1p-20f) + fabsf(y[i]) * 0x1p-22f;
    *lo = y[i] - w;
    *hi = y[i] + w;
}

/* bf16: lm_f32_to_bf16_1 without its NaN case; a NaN end (y or b NaN, inf - inf) is never
 * certified: its bits plus the increment may carry out of the exponent (0x7FFFFFFF gives 0x8000),
 * so lo's own exponent is tested (hi NaN with lo finite makes lo infinite); vectorizes */
XE_CLONES static unsigned certify_bf16(const float *y, const float *b, size_t n, uint16_t *dst, uint8_t *unc)
{
    unsigned any = 0;
    for (size_t i = 0; i < n; i++) {
        float lo, hi;
        certify_ends(y, b, i, &lo, &hi);
        const uint32_t ul = lm_f32_bits(lo), uh = lm_f32_bits(hi);
        const uint16_t bl = (uint16_t)((ul + 0x7FFFu + ((ul >> 16) & 1u)) >> 16);
        const uint16_t bh = (uint16_t)((uh + 0x7FFFu + ((uh >> 16) & 1u)) >> 16);
        dst[i] = bl;
        unc[i] = (uint8_t)((bl != bh) | ((bl & 0x7F80u) == 0x7F80u) | ((ul & 0x7F800000u) == 0x7F800000u));
        any |= unc[i];
    }
    return any;
}

XE_CLONES static unsigned certify_f16(const float *y, const float *b, size_t n, uint16_t *dst, uint8_t *unc)
{
    unsigned any = 0;
    for (size_t i = 0; i < n; i++) {
        float lo, hi;
        certify_ends(y, b, i, &lo, &hi);
        const uint16_t bl = lm_f32_to_f16_1(lo), bh = lm_f32_to_f16_1(hi);
        dst[i] = bl;
        unc[i] = (uint8_t)((bl != bh) | ((bl & 0x7C00u) == 0x7C00u));
        any |= unc[i];
    }
    return any;
}

void lm_exact_certify_tile(const lm_op *op, const lm_prepared *p, const float *y, const float *bound,
                           const float *in, uint64_t r0, uint64_t nr, uint64_t cols, lm_kdtype out, uint16_t *dst,
                           lm_certify_stats *st)
{
    const uint16_t em = out == LM_KDT_BF16 ? 0x7F80u : 0x7C00u;
    enum { CH = 256 };
    uint8_t unc[CH];
    for (uint64_t r = 0; r < nr; r++)
        for (uint64_t c0 = 0; c0 < cols; c0 += CH) {
            const size_t n = (size_t)(cols - c0 < CH ? cols - c0 : CH);
            const size_t e0 = (size_t)(r * cols + c0);
            const unsigned any = out == LM_KDT_BF16 ? certify_bf16(y + e0, bound + e0, n, dst + e0, unc)
                                                    : certify_f16(y + e0, bound + e0, n, dst + e0, unc);
            for (size_t i = 0; any && i < n; i++) {
                if ((i & 7) == 0 && i + 8 <= n) { /* eight at a time: most are certified */
                    uint64_t w8;
                    memcpy(&w8, unc + i, 8);
                    if (w8 == 0) {
                        i += 7;
                        continue;
                    }
                }
                if (!unc[i])
                    continue;
                const double v = op->method->elem64(op, p, in + r * cols, r0 + r, c0 + i, cols);
                const uint16_t bits = lm_f64_to_16_1(v, out);
                dst[e0 + i] = bits;
                st->n_recomputed++;
                if (!isfinite(v))
                    st->n_nonfinite++;
                else if ((bits & em) == em)
                    st->n_overflow++;
            }
        }
}

/* the DoRA rescaling of the tile's rows (per row: m[row] / (||row|| + eps), the squares summed in
 * f64 in column order) or columns (col_scale) */
static void f64_norm(const lm_op *op, const float *m, const double *col_scale, const lm_tile64 *t)
{
    for (uint64_t r = 0; r < t->nr; r++) {
        double *x = t->acc + r * t->cols;
        if (op->axis == 0) {
            double ss = 0;
            for (uint64_t c = 0; c < t->cols; c++)
                ss += x[c] * x[c];
            const double f = lm_dora_factor(op, (double)m[t->r0 + r], ss);
            for (uint64_t c = 0; c < t->cols; c++)
                x[c] *= f;
        } else {
            for (uint64_t c = 0; c < t->cols; c++)
                x[c] *= col_scale[c];
        }
    }
}

void lm_exact_f64_apply(const lm_plan_tensor *t, const lm_prepared *prep, const double *col_scale, size_t o0,
                        size_t o1, const lm_tile64 *tile)
{
    const size_t n = (size_t)(tile->nr * tile->cols);
    for (size_t o = o0; o < o1; o++) {
        const lm_op *op = &t->ops[o];
        const lm_prepared *p = &prep[o];
        switch (op->kind) {
        case LM_OP_ROWS: f64_rows(op, p->a, tile); break;
        case LM_OP_LOWRANK: f64_lowrank(op, p, tile); break;
        case LM_OP_ADD: {
            const float *x = p->a + tile->r0 * tile->cols;
            for (size_t e = 0; e < n; e++)
                tile->acc[e] += op->scale * (double)x[e];
            break;
        }
        case LM_OP_SCALE: f64_scale(op, p->a, tile); break;
        case LM_OP_METHOD: op->method->apply_tile64(op, p, tile); break;
        case LM_OP_NORM: f64_norm(op, p->a, col_scale, tile); break;
        default: break; /* lm_exact_kind_of admits no other kind */
        }
    }
}

void lm_exact_f64_colsumsq(const lm_plan_tensor *t, const lm_prepared *prep, size_t upto, const lm_tile64 *tile,
                           double *ss)
{
    lm_exact_f64_apply(t, prep, NULL, 0, upto, tile);
    for (uint64_t r = 0; r < tile->nr; r++)
        for (uint64_t c = 0; c < tile->cols; c++)
            ss[c] += tile->acc[r * tile->cols + c] * tile->acc[r * tile->cols + c];
}

int lm_exact_is_midpoint(float x, lm_kdtype out)
{
    const uint32_t a = lm_f32_bits(x) & 0x7FFFFFFFu;
    if (a >= 0x7F800000u || out == LM_KDT_F32)
        return 0;
    if (out == LM_KDT_BF16) /* bf16 keeps the top 16 bits, subnormals alike */
        return (a & 0xFFFFu) == 0x8000u;
    if (a >= 0x38800000u) /* f16 normal range (quantum 2^(e-10)): 13 dropped bits, 100...0 */
        return (a & 0x1FFFu) == 0x1000u && a <= 0x477FF000u; /* above 65520 everything is inf */
    const double q = (double)fabsf(x) * 0x1p24; /* f16 subnormals: quantum 2^-24; exact */
    return q - floor(q) == 0.5;
}

/* 1 if some element of p[0 .. n) may be a midpoint of out (a cheap superset: bit tests only, so
 * that the loop vectorizes) */
static inline __attribute__((always_inline)) uint32_t any_candidate(const float *p, size_t n, lm_kdtype out)
{
    uint32_t hit = 0;
    if (out == LM_KDT_BF16) {
        for (size_t c = 0; c < n; c++)
            hit |= (lm_f32_bits(p[c]) & 0xFFFFu) == 0x8000u;
    } else {
        for (size_t c = 0; c < n; c++) {
            const uint32_t u = lm_f32_bits(p[c]);
            hit |= ((u & 0x1FFFu) == 0x1000u) | (((u & 0x7FFFFFFFu) < 0x38800000u) & ((u & 0xFFFu) == 0));
        }
    }
    return hit;
}

/* Proof.  p = fl32(w f) (w, f f32, the exact product x = w f has at most 48 significant bits and
 * is exact in f64).  If x = p, RNE_out(p) is RNE_out(x).  Else p is x rounded once, so x and p lie
 * in the same closed interval between neighbouring f32 values and |x - p| <= ulp32(p) / 2.
 * Output rounding boundaries (midpoints between neighbouring bf16/f16 values) are f32 values, so
 * no boundary lies strictly between x and p; if p is not a boundary, x and p round alike.  If p
 * is a boundary, p' = p moved one f32 ulp towards x: x lies strictly between p and p' (|x - p| <=
 * ulp/2 < ulp, x != p), the next boundary or output value beyond p is at least 2^12 f32 ulps
 * away (f16: 13 dropped bits; bf16: 16), so p' and x are on the same side of p inside the same
 * rounding interval: RNE_out(p') = RNE_out(x).  p' is never a power of two crossing (a midpoint
 * has its lowest kept bit set). */
XE_CLONES uint64_t lm_exact_scale_tile(float *acc, uint64_t r0, uint64_t nr, uint64_t cols, const float *s, int axis,
                                       lm_kdtype out, int certify)
{
    enum { CH = 256 };
    uint64_t n_fix = 0;
    float p[CH];
    for (uint64_t r = 0; r < nr; r++) {
        float *row = acc + r * cols;
        const float fr = axis == 0 ? s[r0 + r] : 0.0f;
        for (uint64_t c0 = 0; c0 < cols; c0 += CH) {
            const size_t n = (size_t)(cols - c0 < CH ? cols - c0 : CH);
            float *w = row + c0;
            const float *fc = s + c0;
            if (axis == 0)
                for (size_t c = 0; c < n; c++)
                    p[c] = w[c] * fr;
            else
                for (size_t c = 0; c < n; c++)
                    p[c] = w[c] * fc[c];
            /* an f32 output is fl32(x) itself */
            if (certify && out != LM_KDT_F32 && any_candidate(p, n, out))
                for (size_t c = 0; c < n; c++) {
                    if (!lm_exact_is_midpoint(p[c], out))
                        continue;
                    const double x = (double)w[c] * (double)(axis == 0 ? fr : fc[c]); /* exact */
                    n_fix++;
                    if (x != (double)p[c])
                        p[c] = nextafterf(p[c], x > (double)p[c] ? INFINITY : -INFINITY);
                }
            memcpy(w, p, n * sizeof *w);
        }
    }
    return n_fix;
}
