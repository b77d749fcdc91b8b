/* SPDX-License-Identifier: MIT */
/* exec_dora.c : see exec_dora.h.
 *
 * Why V in f64 and not a first pass in f32: the norm's relative error becomes the relative error
 * of every element of the row, so for most elements to be certified in bf16 (half an ulp is
 * 2^-9 relative) the norm must be known to ~2^-28.  An f32 fma chain of K terms is only bounded
 * by gamma_K sum_k |b_ik a_kj| (~2^-20 of |d| for K = 16), which made 54% of the rows of the
 * bench's DoRA adapter (|dW| ~ 12% of |W|) uncertain.  In f64 the same bound is ~2^-49.
 *
 * ---- Proof (certified rows; row i, n = cols, U = 2^-53) -------------------------------------
 * Exact value: Y_j = F V_j, V_j = W_j + s sum_k R_ik C_kj (R, C: the exact factors in the tiles'
 * orientation, f64), F = m / (||V|| + eps) (or w (that - 1) + 1).  Computed:
 * (a) t_j = fma chain over k ascending from 0 (K roundings per term):
 *     |sum_k R C - t_j| <= g S_j + K 2^-1074, g = K U / (1 - K U), S_j = sum_k |R_ik C_kj|
 *     <= rho_i kap_j (Cauchy-Schwarz; rho_i = ||R_i.||, kap_j = ||C_.j|| computed in f64 and
 *     rounded up by (1 + 2^-30)).  e_d[j] := c rho_i kap_j + tau, c = g (1 + 2^-30), tau = K 2^-1074.
 * (b) v_j = fl(W_j + fl(s t_j)): |V_j - v_j| <= |s| e_d[j] + 2^-52 (|s t_j| + |v_j|) =: ev_j.
 *     Over the row (triangle inequality, Cauchy-Schwarz, sum_j kap_j^2 <= AF^2):
 *     ||V - v|| <= |s| (c rho_i AF + tau sqrt(n)) + 2^-52 (||s t|| + ||v||) =: Ev.
 * (c) nn = fl(sqrt(sum of fl(v_j^2) in eight lanes)): | ||v|| - nn | <= (n + 20) U nn, so
 *     | ||V|| - nn | <= En := (Ev + (n + 20) U nn)(1 + 2^-20).
 * (d) den = fl(nn + eps): |(||V|| + eps) - den| <= En + 2^-52 den; delta = that / den; certified
 *     rows need delta <= 1/4.  f~ = fl(m / den): |f - f~| <= ef := |f~| (2.0001 delta + 2^-51).
 *     Mix: F~ = fl(fl(w fl(f~ - 1)) + 1), |F - F~| <= eF := |w| ef + 2^-51 (|w| (|f~| + 1) + |F~|);
 *     else F~ = f~, eF = ef.
 * (e) y_j = fl(v_j F~): |Y_j - y_j| <= |F - F~| |V_j| + |F~| |V_j - v_j| + U |y_j|
 *     <= (|F~| + eF) ev_j + eF |v_j| + U |y_j|.  The code evaluates that (all terms >= 0) with a
 *     factor (1 + 2^-40) for its own roundings, plus 2^-50 |y_j| (which also covers rounding
 *     y_j -+ e) and 2^-1060 (underflow): e_j.  So lo = fl(y_j - e_j) <= Y_j <= fl(y_j + e_j) = hi.
 * (f) Rounding to the output is monotone: if RNE(lo) == RNE(hi) is finite, RNE(Y_j) is that value,
 *     which is also RNE(y_j), the value written.  RNE from f64 is exact: round to odd to f32
 *     (24 >= 11 + 2 bits), then to nearest even; f32 outputs: the C cast.
 * A row with an element that fails (f) (cancellation, a tie within the bound, overflow) is
 * computed again with V in double-double (row_dd), then rounded once from f64, which the issue's
 * rule accepts; so is every element of a tensor whose op list is longer.  Both are counted
 * ("recomputed").
 * Every step is the same IEEE operation in every build (no contraction: -ffp-contract=off; fma()
 * is correctly rounded), so the bytes do not depend on the kernel variant or the tiles. */
#include "exec_dora.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* the loops built for AVX-512 and AVX2+FMA too (an ifunc picks one at load); the same IEEE
 * operations in each, so the same bits */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define XD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define XD_CLONES
#endif

enum {
    LANES = 8, /* the row norm's partial sums */
    RB = 8,    /* rows per block: a block's products share each panel of C in L1 */
    JW = LM_LR64_PANEL /* columns per panel (the lr64 kernel's) */
};

typedef struct {
    size_t K;
    double s;
    double *R;  /* [rows x K]: the row side in the tiles' orientation (NULL: not a low-rank op) */
    double *Cp; /* the column side C [K x cols] in panels: for each JW columns a [K x JW] block,
                   then the last cols % JW columns [K x tail].  A panel's rows are contiguous: in
                   C they would lie cols * 8 bytes apart, for power-of-two widths in the same few
                   L1 sets */
} dlr;

/* element (k, j) of C in the panels */
static inline double cp_at(const double *Cp, size_t K, size_t cols, size_t k, size_t j)
{
    const size_t full = cols / JW * JW;
    return Cp[j < full ? (j / JW) * K * JW + k * JW + j % JW : full * K + k * (cols - full) + (j - full)];
}

struct lm_dora_tensor {
    const lm_plan_tensor *t;
    const lm_prepared *prep;
    dlr *lr; /* [n_ops] */
    /* certified rows: op 0 low-rank, op 1 a row NORM (the proof above) */
    int bounded;
    double *rc;     /* [rows] c * ||R_i.|| rounded up */
    double *kap;    /* [cols] ||C_.j|| rounded up */
    double AF, tau; /* sqrt(sum kap^2) rounded up; K 2^-1074 */
};

static int kdtype(lm_dtype dt)
{
    return dt == LM_DT_BF16 || dt == LM_DT_F16 || dt == LM_DT_F32;
}

static int op_whole(const lm_op *op, const lm_plan_tensor *t)
{
    return op->row0 == 0 && (op->axis ? op->in : op->out) == t->rows && (op->axis ? op->out : op->in) == t->cols;
}

int lm_dora_tensor_eligible(const lm_plan_tensor *t)
{
    if (t->q != NULL || t->base == NULL || t->n_ops == 0 || !kdtype(t->src_dtype) || !kdtype(t->dtype) ||
        t->rows == 0 || t->cols == 0)
        return 0;
    int norms = 0;
    for (size_t o = 0; o < t->n_ops; o++) {
        const lm_op *op = &t->ops[o];
        if (op->kind == LM_OP_NORM && op->src != NULL && kdtype(op->src->dtype))
            norms++;
        else if (op->kind == LM_OP_REPLACE && o == 0) /* the tiles load the replacement (its dtype: src_dtype) */
            continue;
        else if (!(op->kind == LM_OP_LOWRANK && op_whole(op, t) && op->rank > 0 && op->rank <= LM_LOWRANK_MAX_K))
            return 0;
    }
    return norms > 0;
}

void lm_dora_tensor_free(lm_dora_tensor *f)
{
    if (f == NULL)
        return;
    for (size_t o = 0; f->lr != NULL && o < f->t->n_ops; o++) {
        free(f->lr[o].R);
        free(f->lr[o].Cp);
    }
    free(f->lr);
    free(f->rc);
    free(f->kap);
    free(f);
}

/* n factor values (f64 or f32, exact in f64) from src with stride st into dst */
static void widen(double *dst, const double *s64, const float *s32, size_t st, size_t n)
{
    if (s64 != NULL)
        for (size_t e = 0; e < n; e++)
            dst[e] = s64[e * st];
    else
        for (size_t e = 0; e < n; e++)
            dst[e] = (double)s32[e * st];
}

/* op o's R and Cp from its prepared factors A' [rank, in] and B' [out, rank]: axis 0 (W [out, in]
 * += B' A'): R = B', C = A'; axis 1 (W [in, out] += (B' A')^T): R = A'^T, C = B'^T */
static void factors_f64(dlr *L, const lm_prepared *p, const lm_op *op, size_t rows, size_t cols)
{
    const size_t K = L->K, full = cols / JW * JW, tail = cols - full;
    const size_t in = (size_t)op->in, rk = (size_t)op->rank;
    for (size_t i = 0; i < rows; i++) { /* R [i, k]: B' (i, k) or A' (k, i) */
        const size_t e = op->axis ? i : i * rk;
        if (op->axis)
            widen(L->R + i * K, p->a64 ? p->a64 + e : NULL, p->a64 ? NULL : p->a + e, in, K);
        else
            widen(L->R + i * K, p->b64 ? p->b64 + e : NULL, p->b64 ? NULL : p->b + e, 1, K);
    }
    for (size_t k = 0; k < K; k++) /* C [k, j]: A' (k, j) or B' (j, k), into the panels */
        for (size_t j0 = 0; j0 < cols; j0 += JW) {
            const size_t w = j0 < full ? JW : tail, e = op->axis ? j0 * rk + k : k * in + j0;
            double *d = j0 < full ? L->Cp + j0 * K + k * JW : L->Cp + full * K + k * tail;
            if (op->axis)
                widen(d, p->b64 ? p->b64 + e : NULL, p->b64 ? NULL : p->b + e, rk, w);
            else
                widen(d, p->a64 ? p->a64 + e : NULL, p->a64 ? NULL : p->a + e, 1, w);
        }
}

/* the certified rows' bound factors (proof (a)) */
static int bound_prepare(lm_dora_tensor *f)
{
    const lm_plan_tensor *t = f->t;
    const dlr *L = &f->lr[0];
    const size_t rows = (size_t)t->rows, cols = (size_t)t->cols, K = L->K;
    f->rc = malloc(rows * sizeof *f->rc + 1);
    f->kap = calloc(cols + 1, sizeof *f->kap);
    if (f->rc == NULL || f->kap == NULL)
        return -1;
    const double U = 0x1p-53, c = (double)K * U / (1 - (double)K * U) * (1 + 0x1p-30);
    for (size_t i = 0; i < rows; i++) {
        double q = 0;
        for (size_t k = 0; k < K; k++)
            q += L->R[i * K + k] * L->R[i * K + k];
        f->rc[i] = c * sqrt(q) * (1 + 0x1p-30);
    }
    const size_t full = cols / JW * JW, tail = cols - full;
    for (size_t j0 = 0; j0 < cols; j0 += JW) { /* kap_j = sum over k ascending of C_kj^2 */
        const size_t w = j0 < full ? JW : tail;
        const double *P = j0 < full ? L->Cp + j0 * K : L->Cp + full * K;
        for (size_t k = 0; k < K; k++)
            for (size_t q = 0; q < w; q++)
                f->kap[j0 + q] += P[k * w + q] * P[k * w + q];
    }
    double af = 0;
    for (size_t j = 0; j < cols; j++) {
        f->kap[j] = sqrt(f->kap[j]) * (1 + 0x1p-30);
        af += f->kap[j] * f->kap[j];
    }
    f->AF = sqrt(af) * (1 + 0x1p-20);
    f->tau = (double)K * 0x1p-1074;
    /* squares that overflow or underflow leave the norms useless: no row is certified then */
    f->bounded = isfinite(f->AF);
    for (size_t i = 0; i < rows && f->bounded; i++)
        f->bounded = isfinite(f->rc[i]);
    return 0;
}

lm_dora_tensor *lm_dora_tensor_create(const lm_plan_tensor *t, const lm_prepared *prep, lm_kdtype out, lm_err *err)
{
    (void)out;
    lm_dora_tensor *f = calloc(1, sizeof *f);
    if (f == NULL || (f->lr = calloc(t->n_ops, sizeof *f->lr)) == NULL)
        goto nomem;
    f->t = t;
    f->prep = prep;
    const size_t rows = (size_t)t->rows, cols = (size_t)t->cols;
    for (size_t o = 0; o < t->n_ops; o++) {
        const lm_op *op = &t->ops[o];
        if (op->kind != LM_OP_LOWRANK)
            continue;
        dlr *L = &f->lr[o];
        const size_t K = (size_t)op->rank;
        L->K = K;
        L->s = op->scale;
        L->R = malloc(rows * K * sizeof *L->R + 1);
        L->Cp = malloc(K * cols * sizeof *L->Cp + 1);
        if (L->R == NULL || L->Cp == NULL)
            goto nomem;
        factors_f64(L, &prep[o], op, rows, cols);
    }
    if (t->n_ops == 2 && t->ops[0].kind == LM_OP_LOWRANK && t->ops[1].kind == LM_OP_NORM && t->ops[1].axis == 0 &&
        bound_prepare(f) != 0)
        goto nomem;
    return f;
nomem:
    lm_dora_tensor_free(f);
    lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the DoRA factors of '%s'", t->name);
    return NULL;
}

/* ---- rounding once from f64 ---------------------------------------------------------------- */

/* x rounded to odd in f32, as bits: RNE first, then, when inexact and even, one step towards x
 * (also from +-0 to the smallest subnormal and from inf back to FLT_MAX) */
static inline __attribute__((always_inline)) uint32_t rto32(double x)
{
    const float r = (float)x;
    const double b = (double)r;
    uint32_t u = lm_f32_bits(r);
    if (b != x && (u & 1u) == 0)
        u = fabs(x) > fabs(b) ? u + 1 : u - 1;
    return u;
}

/* RNE_out(x) as output bits (low 16 for bf16/f16) */
static inline __attribute__((always_inline)) uint32_t round_out(double x, lm_kdtype t)
{
    if (t == LM_KDT_F32)
        return lm_f32_bits((float)x);
    const float v = lm_f32_from_bits(rto32(x));
    return t == LM_KDT_BF16 ? lm_f32_to_bf16_1(v) : lm_f32_to_f16_1(v);
}

/* ---- the f64 rows ---------------------------------------------------------------------------- */

/* sum of x[j]^2 in LANES lanes (lane j % LANES), the lanes summed in order */
XD_CLONES static double sumsq8(const double *x, size_t n)
{
    double l[LANES] = {0};
    size_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int q = 0; q < LANES; q++)
            l[q] += x[j + q] * x[j + q];
    for (; j < n; j++)
        l[j % LANES] += x[j] * x[j];
    double s = 0;
    for (int q = 0; q < LANES; q++)
        s += l[q];
    return s;
}

XD_CLONES static void scale_row(double *x, size_t n, double f)
{
    for (size_t j = 0; j < n; j++)
        x[j] *= f;
}

XD_CLONES static void scale_cols(double *x, size_t n, const double *f)
{
    for (size_t j = 0; j < n; j++)
        x[j] *= f[j];
}

double lm_dora_factor(const lm_op *op, double m, double ss)
{
    if (!isfinite(ss)) /* the squares of V overflow even f64: the delta overflows, and the result is
                          NaN (refused as a non-finite result), not m / inf = 0 */
        return NAN;
    const double f = m / (sqrt(ss) + op->eps);
    return op->mix ? op->scale * (f - 1.0) + 1.0 : f;
}

/* rows i0 .. i0+rb (tensor rows; w: the first one's base values) after ops 0 .. upto-1, in f64,
 * into X [rb x n] (the certified rows: upto = 1, their NORM applied by the caller, which takes
 * the rows' sums of squares of X and w from op 0's lr64 into ssx, ssw: NULL else) */
static void block_f64(const lm_dora_tensor *f, const lm_kernels *k, const float *w, uint64_t i0, size_t rb,
                      size_t upto, const double *col_scale, double *X, double *ssx, double *ssw)
{
    const lm_plan_tensor *t = f->t;
    const size_t n = (size_t)t->cols;
    if (upto == 0 || t->ops[0].kind != LM_OP_LOWRANK)
        for (size_t e = 0; e < rb * n; e++)
            X[e] = (double)w[e];
    for (size_t o = 0; o < upto; o++) {
        const lm_op *op = &t->ops[o];
        const dlr *L = &f->lr[o];
        if (op->kind == LM_OP_REPLACE) /* op 0: w holds the replacement */
            continue;
        if (op->kind == LM_OP_LOWRANK) {
            /* t = sum_k R[i K + k] C[k, j] (fma chains, k ascending from 0): X = fl(w + fl(s t)) or,
             * without w, X += s t (kernels/lr64_ref.c) */
            k->lr64(X, o == 0 ? w : NULL, L->s, L->R + i0 * L->K, L->Cp, L->K, rb, n, o == 0 ? ssx : NULL,
                    o == 0 ? ssw : NULL);
        } else {
            for (size_t i = 0; i < rb; i++) {
                double *x = X + i * n;
                if (op->axis == 0)
                    scale_row(x, n, lm_dora_factor(op, (double)f->prep[o].a[i0 + i], sumsq8(x, n)));
                else
                    scale_cols(x, n, col_scale);
            }
        }
    }
}

int lm_dora_col_sumsq(const lm_dora_tensor *f, const float *w, uint64_t r0, uint64_t nr, size_t upto, double *ss)
{
    const size_t n = (size_t)f->t->cols;
    lm_kernels k; /* the CPU's variant (every variant writes the same bits) */
    lm_kernels_select(&k, NULL);
    double *X = malloc(RB * n * sizeof *X + 1);
    if (X == NULL)
        return -1;
    for (uint64_t b0 = 0; b0 < nr; b0 += RB) {
        const size_t rb = (size_t)(nr - b0 < RB ? nr - b0 : RB);
        block_f64(f, &k, w + b0 * n, r0 + b0, rb, upto, NULL, X, NULL, NULL);
        for (size_t i = 0; i < rb; i++)
            for (size_t j = 0; j < n; j++)
                ss[j] += X[i * n + j] * X[i * n + j];
    }
    free(X);
    return 0;
}

/* the output formats as the rounding below sees them: T the overflow threshold (the midpoint
 * above the largest finite value), pq = 2^(1-p) (p: significand bits), pinv = 2^(p-1), mn = 2^emin */
typedef struct {
    double T, pq, pinv, mn;
} ofmt;

static const ofmt OFMT[3] = {
    [LM_KDT_F32] = {0x1.ffffffp127, 0x1p-23, 0x1p23, 0x1p-126},
    [LM_KDT_BF16] = {0x1.ffp127, 0x1p-7, 0x1p7, 0x1p-126},
    [LM_KDT_F16] = {65520.0, 0x1p-10, 0x1p10, 0x1p-14},
};

/* memcpy, not a union: the vectorizer sees through it */
static inline __attribute__((always_inline)) uint64_t d_bits(double x)
{
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline __attribute__((always_inline)) double d_from(uint64_t u)
{
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* y rounded to nearest (ties handled by the caller) as an f32 value, and whether [y - e, y + e]
 * lies strictly inside one rounding interval of the output, below the overflow threshold.
 * With Q the output's quantum at |y| (2^(max(E, emin) - p + 1)), q = |y| / Q = N + fr (exact:
 * powers of two), the nearest rounding boundaries are (N + 1/2) Q and, when N Q is the bottom of
 * a binade, N Q - Q/4 (others are farther): dist = min(|fr - 1/2|, fr + 1/4) Q.  When e < dist,
 * no boundary lies in the interval and RNE(y) = (N + (fr > 1/2)) Q, exactly representable in the
 * output and in f32.  Branch-free, so that the loops around it vectorize. */
static inline __attribute__((always_inline)) float round_certify(double y, double e, ofmt f, uint32_t *ok)
{
    const double ay = fabs(y), ac = ay > f.mn ? ay : f.mn;
    const uint64_t eb = d_bits(ac) & 0x7FF0000000000000u;
    const double Q = d_from(eb) * f.pq, iQ = d_from(0x7FE0000000000000u - eb) * f.pinv;
    /* N = floor(q) for 0 <= q < 2^52 (q < 2^p here, but for NaN or inf y): q rounded to an
     * integer by adding and removing 2^52, less one if that rounded up (exact steps); floor()
     * itself does not vectorize */
    const double q = ay * iQ, rq = (q + 0x1p52) - 0x1p52, N = rq - (rq > q ? 1.0 : 0.0), fr = q - N;
    const double d1 = fabs(fr - 0.5), d2 = fr + 0.25, dist = d1 < d2 ? d1 : d2;
    *ok = (uint32_t)(e * iQ < dist * (1 - 0x1p-40)) & (uint32_t)(ay + e < f.T);
    const double r = (N + (fr > 0.5 ? 1.0 : 0.0)) * Q;
    return (float)copysign(r, y);
}

/* RNE_out(x) as an f32 value (exact: every output value is an f32 value; inf, NaN kept) */
static float round_out_f32(double x, lm_kdtype t)
{
    const uint32_t b = round_out(x, t);
    return t == LM_KDT_F32 ? lm_f32_from_bits(b) : t == LM_KDT_BF16 ? lm_f32_from_bits(b << 16) : lm_f16_to_f32_1((uint16_t)b);
}

/* o32 (f32 values of the output dtype, exact) written as the output's bytes */
static void emit(const lm_kernels *k, const float *o32, size_t n, void *out, lm_kdtype ot)
{
    if (ot == LM_KDT_F32)
        memcpy(out, o32, n * sizeof *o32);
    else if (ot == LM_KDT_BF16)
        k->f32_to_bf16(o32, out, n);
    else
        k->f32_to_f16(o32, out, n);
}

/* x (f64) rounded: vector loop, ties and non-finite results again one by one */
XD_CLONES static size_t round_plain(const double *x, size_t n, float *o32, lm_kdtype ot)
{
    const ofmt f = OFMT[ot];
    size_t redo = 0;
    for (size_t j = 0; j < n; j++) {
        uint32_t ok;
        o32[j] = round_certify(x[j], 0, f, &ok);
        redo += !ok;
    }
    return redo;
}

/* x (the row's final f64 values) rounded once into out; counts non-finite results */
static void round_row(const lm_kernels *k, const double *x, size_t n, float *o32, void *out, lm_kdtype ot,
                      lm_dora_stats *st)
{
    if (round_plain(x, n, o32, ot) != 0)
        for (size_t j = 0; j < n; j++) {
            uint32_t ok;
            (void)round_certify(x[j], 0, OFMT[ot], &ok);
            if (ok)
                continue;
            o32[j] = round_out_f32(x[j], ot);
            if (!isfinite(o32[j])) {
                if (isfinite(x[j]))
                    st->n_overflow++;
                else
                    st->n_nonfinite++;
            }
        }
    emit(k, o32, n, out, ot);
}

/* ---- certified rows -------------------------------------------------------------------------- */

typedef struct {
    double F, eF, A0, A1, A2, E;
} row_bound;

/* row i's factor F~ (as the f64 row computes it) and bound constants (proof (b) - (e)); @return 0
 * when the norm is too uncertain for any element of the row to be certified */
static int row_bound_of(const lm_dora_tensor *f, uint64_t i, double ss, double ssw, double F, row_bound *rb)
{
    const lm_op *nm = &f->t->ops[1];
    const double n = (double)f->t->cols, s = fabs(f->lr[0].s);
    const double nn = sqrt(ss);
    /* ||s t|| <= ||w|| + ||v|| (1 + 2^-52) */
    const double Ev = s * (f->rc[i] * f->AF + f->tau * sqrt(n)) + 0x1p-52 * (sqrt(ssw) + 2 * nn) * (1 + 0x1p-20);
    const double En = (Ev + (n + 20) * 0x1p-53 * nn) * (1 + 0x1p-20);
    const double den = nn + nm->eps;
    if (!(den > 4 * En + 0x1p-50 * den) || !isfinite(den) || !isfinite(En))
        return 0;
    const double delta = (En + 0x1p-52 * den) / den;
    const double ft = (double)f->prep[1].a[i] / den, ef = fabs(ft) * (2.0001 * delta + 0x1p-51);
    double eF = ef;
    if (nm->mix)
        eF = fabs(nm->scale) * ef + 0x1p-51 * (fabs(nm->scale) * (fabs(ft) + 1) + fabs(F));
    if (!isfinite(F) || !isfinite(eF))
        return 0;
    const double g = fabs(F) + eF;
    rb->F = F;
    rb->eF = eF;
    rb->A1 = g * s * f->rc[i];
    rb->A0 = g * s * f->tau + 0x1p-1060;
    rb->A2 = g * 0x1p-52 * (1 + 0x1p-20);
    /* E >= every element's e_j (the dora_cert kernel): kap_j <= AF, |w_j| <= sqrt(ssw), |v_j| <= ||v|| <=
     * vmax by (c), |y_j| <= |F| vmax (1 + 2^-52), term by term; (1 + 2^-40) for E's own roundings */
    const double vmax = nn * (1 + (n + 64) * 0x1p-52);
    rb->E = ((rb->A1 * f->AF + rb->A0 + rb->A2 * (sqrt(ssw) + 2 * vmax) + eF * vmax) * (1 + 0x1p-40) +
             0x1p-50 * fabs(F) * vmax * (1 + 0x1p-52)) *
                (1 + 0x1p-40) +
            0x1p-1059;
    return isfinite(rb->E);
}

/* y = v F~ rounded once, each element checked against its bound (proof (e), (f)): the dora_cert
 * kernel (kernels/doracert_ref.c) with the row's constants.  e_j there is
 *   ((((A1 kap_j + A0) + A2 (|w_j| + 2 |v_j|)) + eF |v_j|) (1 + 2^-40) + 2^-50 |y_j|) + 2^-1060
 * (|s t_j| <= |w_j| + |v_j| (1 + 2^-52): A2 carries the factor 2 (1 + 2^-20)); a first test with
 * E >= e_j for the whole row certifies nearly every element by the rounding of y -+ E alone, and
 * certifying by any upper bound gives the same bytes: RNE(Y_j).  (f) as there: [fl(y - e),
 * fl(y + e)] contains Y_j (the 2^-50 |y_j| covers those roundings while e <= 7 |y_j|; beyond, the
 * ends differ in sign and nothing is certified), RNE is monotone, and the ends' roundings are
 * the exact RNE of f64 values (integer rounding of the bits, subnormal results scaled exactly). */

/* the bounded tensors' row i again with V in double-double (an uncertified row: the f64 V may have
 * lost bits to cancellation): t = sum_k R C exactly up to ~2^-104 (TwoProd by fma, TwoSum),
 * v = W + s t with the same care, then the norm, the factor and y in f64.  x: the row's y. */
static void row_dd(const lm_dora_tensor *f, const float *w, uint64_t i, double *x)
{
    const dlr *L = &f->lr[0];
    const size_t n = (size_t)f->t->cols, K = L->K;
    const double s = L->s, *R = L->R + i * K;
    for (size_t j = 0; j < n; j++) {
        double hi = 0, lo = 0;
        for (size_t k = 0; k < K; k++) {
            const double c = cp_at(L->Cp, K, n, k, j), p = R[k] * c, pe = fma(R[k], c, -p);
            const double sum = hi + p, bb = sum - hi, err = (hi - (sum - bb)) + (p - bb);
            hi = sum;
            lo += err + pe;
        }
        const double ph = s * hi, phe = fma(s, hi, -ph), wj = (double)w[j];
        const double v1 = wj + ph, bb = v1 - wj, e1 = (wj - (v1 - bb)) + (ph - bb);
        x[j] = v1 + (e1 + (phe + s * lo));
    }
    scale_row(x, n, lm_dora_factor(&f->t->ops[1], (double)f->prep[1].a[i], sumsq8(x, n)));
}

/* rows [b0, b0 + rb) of the input bytes raw (the tensor's src dtype) as f32 into dst */
static void raw_rows(const lm_dora_tensor *f, const lm_kernels *k, const void *raw, uint64_t b0, size_t rb, float *dst)
{
    const size_t n = (size_t)f->t->cols, m = rb * n;
    const lm_dtype dt = f->t->src_dtype;
    const unsigned char *src = (const unsigned char *)raw + b0 * n * (dt == LM_DT_F32 ? 4 : 2);
    if (dt == LM_DT_BF16)
        k->bf16_to_f32((const uint16_t *)(const void *)src, dst, m);
    else if (dt == LM_DT_F16)
        k->f16_to_f32((const uint16_t *)(const void *)src, dst, m);
    else
        memcpy(dst, src, m * sizeof *dst);
}

int lm_dora_tensor_run(const lm_dora_tensor *f, const lm_kernels *k, const float *w, const void *raw, uint64_t r0,
                       uint64_t nr, const double *col_scale, void *out, lm_kdtype ot, const void *base, double *ws,
                       lm_dora_stats *st)
{
    const size_t n = (size_t)f->t->cols, osz = ot == LM_KDT_F32 ? 4 : 2;
    double *X = ws;
    /* o32: a row's f32 values; wb: a block's base rows converted from raw */
    float *o32 = malloc((n + (w == NULL ? RB * n : 0)) * sizeof *o32 + 1), *wb = o32 + n;
    if (o32 == NULL)
        return -1;
    double ssx[RB], ssw[RB];
    for (uint64_t b0 = 0; b0 < nr; b0 += RB) {
        const size_t rb = (size_t)(nr - b0 < RB ? nr - b0 : RB);
        const float *wblk = w != NULL ? w + b0 * n : wb;
        if (w == NULL)
            raw_rows(f, k, raw, b0, rb, wb);
        if (f->bounded)
            block_f64(f, k, wblk, r0 + b0, rb, 1, col_scale, X, ssx, ssw);
        else
            block_f64(f, k, wblk, r0 + b0, rb, f->t->n_ops, col_scale, X, NULL, NULL);
        for (size_t i = 0; i < rb; i++) {
            double *x = X + i * n;
            const float *wr = wblk + i * n;
            unsigned char *o = (unsigned char *)out + (b0 + i) * n * osz;
            const unsigned char *bs = base != NULL ? (const unsigned char *)base + (b0 + i) * n * osz : NULL;
            const uint64_t row = r0 + b0 + i;
            if (f->bounded) { /* op 1, the row NORM, here: its factor and the bound */
                const lm_op *nm = &f->t->ops[1];
                const double ss = ssx[i], F = lm_dora_factor(nm, (double)f->prep[1].a[row], ss);
                row_bound rbd;
                if (row_bound_of(f, row, ss, ssw[i] * (1 + 0x1p-20), F, &rbd)) {
                    const lm_dora_cert c = {rbd.F, rbd.E, rbd.eF, rbd.A0, rbd.A1, rbd.A2};
                    size_t ch = 0;
                    if (k->dora_cert(x, wr, f->kap, n, &c, ot, o, bs, &ch) == 0) {
                        st->n_changed += ch;
                        continue;
                    }
                }
                row_dd(f, wr, row, x); /* recomputed: V in double-double */
            }
            round_row(k, x, n, o32, o, ot, st);
            if (bs != NULL)
                st->n_changed += osz == 2 ? k->count_diff_16((const uint16_t *)(const void *)o, (const uint16_t *)(const void *)bs, n)
                                          : k->count_diff_32((const uint32_t *)(const void *)o, (const uint32_t *)(const void *)bs, n);
            st->n_uncertified += n; /* the row recomputed, each element rounded once from f64 */
            st->rows_uncertified++;
        }
    }
    free(o32);
    return 0;
}

/*! lm_dora_ws_doubles() : see exec_dora.h */
size_t lm_dora_ws_doubles(uint64_t nr, uint64_t cols)
{
    return (size_t)((nr < RB ? nr : RB) * cols);
}
