/* SPDX-License-Identifier: MIT */
/* lowrank_exact.c : what every variant of the low-rank kernel shares: lm_lowrank_prepare() (the
 * f32/f64 factor copies and the per-row / per-column bound factors) and the scalar recomputation
 * of the elements the vector path could not certify (lm_lowrank_fallback_1: f64 with a per-element
 * bound, then, rarely, the exact value in a fixed-point accumulator).  The proof that a certified
 * element is the correctly rounded result is here, beside the constants it justifies.  No
 * intrinsics, no allocation; the default rounding mode (to nearest) is assumed throughout.
 *
 * ---- Proof (level 1, f32 path; element (i, j), K terms) --------------------------------------
 * u = 2^-24, eta = 2^-150.  Model of one rounding to nearest (no overflow): fl(x) = x(1 + t) + n
 * with |t| <= u, |n| <= eta, t n = 0 (n only in the subnormal range, where a SUM of two floats is
 * exact, so additions have n = 0).  Let P_k = s_k B_ik A_kj (exact reals), b_k = Bf[i,k] =
 * fl32(fl64(s_k B_ik)), a_k = Af[k,j] = fl32(A_kj), S = sum_k |b_k a_k|, v = W + sum_k P_k.
 * (a) Copies.  prepare() lets a row (column) certify only if every nonzero fl64(s_k B_ik) (A_kj) is
 *     finite with magnitude in [2^-126, FLT_MAX] and s_k B_ik did not underflow in f64; then
 *     |b_k - s_k B_ik| <= rB |s_k B_ik| with rB = 2^-24 + 2^-53 + 2^-77 <= 2^-24 (1 + 2^-22)
 *     (two roundings, both in the normal range), or rB = 0 if every copy of the tensor was exact;
 *     likewise |a_k - A_kj| <= rA |A_kj|.  With r' = r / (1 - r), |s_k B_ik| <= |b_k| / (1 - rB), so
 *     |P_k - b_k a_k| <= |s_k B_ik - b_k||A_kj| + |b_k||A_kj - a_k| <= (r'B (1 + r'A) + r'A)|b_k a_k|
 *     and |sum P_k - sum b_k a_k| <= rho S, rho = r'A + r'B + r'A r'B.
 * (b) Accumulation.  Chain m (m = 0..3) is c_m = fl(b_k a_k + c_m) over k = m, m+4, ... (one FMA
 *     each, from c_m = 0), then d = fl(fl(c0 + c1) + fl(c2 + c3)).  Product k, at position k / 4
 *     of its chain's n = ceil((K - k % 4) / 4) terms, passes through h_k = n - k / 4 + 2
 *     roundings (h_k <= H = ceil(K/4) + 2), and there are at most K + 3 roundings, so
 *     |d - sum b_k a_k| <= sum_k ((1 + u)^h_k - 1)|b_k a_k| + (K + 3) eta (1 + u)^H
 *                       <= sum_k g_k |b_k a_k| + 2 (K + 3) eta,   g_k = h_k G, G = u / (1 - H u)
 *     (H u <= 2^-6 for K <= 2^20).
 * (c) r = fl(W + d): |r - (W + d)| <= u|W + d| <= u'|r|, u' = u / (1 - u).
 *     So |v - r| <= D := u'|r| + C + 2 (K + 3) eta,   C = sum_k (g_k + rho)|b_k a_k|.
 * (d) Cauchy-Schwarz: C <= (G ||(h_k b_k)_k||_2 + rho ||b_i.||_2) ||a_.j||_2.  prepare() stores
 *     bnd_rf[i] >= (1 + 2^-20)(G ||(h_k b_k)||_2 + rho ||b_i.||_2) and bnd_cf[j] >= (1 + 2^-20)
 *     ||a_.j||_2: norms of the f32 copies computed in f64 (relative error < 2^-32 for K <= 2^20;
 *     G and h_k^2 too), times (1 + 2^-19), rounded up to f32.  So bnd_rf[i] bnd_cf[j] >=
 *     (1 + 2^-20)^2 C.
 * (e) f16 outputs (bf16 outputs: (g)).  Every variant computes, in f32 with RNE:
 *     e1 = fma(bnd_rf[i], bnd_cf[j], c0),
 *     e2 = fma(|r|, 4u, e1), lo = r - e2, hi = r + e2, with c0 = 2^-125 (LM_LR_C0F, LM_LR_CRF).
 *     e1 >= c0 is normal, so e1 >= (1 - u)(bnd_rf bnd_cf + c0) and e2 >= (1 - u)(4u|r| + e1).
 *     lo = fl(r - e2) <= r - e2 + u|r - e2| <= r - e2 + u(|r| + e2), so lo <= r - D holds if
 *     (1 - u) e2 >= D + u|r| = (u + u')|r| + C + 2 (K + 3) eta, which it does term by term:
 *     (1 - u)^2 4u >= u + u';  (1 - u)^3 (1 + 2^-20)^2 >= 1;  (1 - u)^3 2^-125 >= 2^22 eta.
 *     Symmetrically hi >= r + D.  Overflow or NaN anywhere leaves lo or hi NaN or infinite.
 * (f) So lo <= v <= hi.  Rounding to the output dtype is monotone: if RNE(lo) and RNE(hi) are the
 *     same finite value, RNE(v) is that value.  The test every variant applies is |r| < T and
 *     RNE(lo) == RNE(hi), T = 2^127 (bf16, f32) or 65504 (f16): e2 is never NaN (prepare keeps the
 *     bound factors >= 2^-149, so no 0 * inf) and e2 > 0, so NaN or infinite r fails |r| < T, an
 *     infinite e2 gives RNE(lo) = -inf != +inf = RNE(hi), and equal roundings are finite because
 *     lo <= r < T and hi >= r > -T lie inside the finite range.  The same f32 operations in the
 *     same order give the same r, e2, lo, hi in every variant, so even the decision (hence the
 *     counters) is identical.
 * (g) bf16 outputs: no |r| term; the ends are widened on their bits, and the test reads the bits.
 *     Every variant computes, in f32 with RNE, e1 = fma(bnd_rf[i], bnd_cf[j], c0) as in (e),
 *     a = |r|, lo = a - e1, hi = a + e1, then on the bits (unsigned, 32 bits) tm = bits(lo) +
 *     (2^15 - 3), tM = bits(hi) + (2^15 + 1) (LM_LR_BF16_NEAR, _FAR), and certifies when
 *     tm >> 16 == tM >> 16 =: q and q < 0x7F80 (LM_LR_BF16_QMAX); the result is q with r's sign
 *     bit.  RNE is symmetric (fl(-x) = -fl(x)): negating W and every b_k negates d, r and v and
 *     leaves a, e1, lo and hi as they are, so it suffices to take r's sign bit clear (a = r) and
 *     show RNE(v) = q; with the sign bit set, RNE(v) = -q, q with the sign bit.
 *     Facts used: floats of one sign are ordered as their bits (magnitude order); bits + 1 is the
 *     next float away from zero, at a distance >= ulp(x) above x and >= ulp(x) / 2 below it
 *     (ulp(x) = 2^(E - 23) for x in [2^E, 2^(E+1)), E >= -126); RNE errs by at most half the ulp
 *     of its result: |fl(x) - x| <= ulp(fl(x)) / 2.  The bf16 values are the patterns q 2^16,
 *     their rounding boundaries the midpoints q 2^16 +- 2^15.
 *     (1) The test puts the bit patterns m - 2 and M + 1, m = bits(lo), M = bits(hi), strictly
 *     between the midpoints around q: tm >> 16 == q says m - 2 - 1 + 2^15 >= q 2^16, i.e.
 *     m - 2 > q 2^16 - 2^15, and tM >> 16 == q says M + 1 + 2^15 < (q + 1) 2^16.  No addition
 *     wraps: hi = fl(a + e1) is +0 .. +inf or a NaN with the sign bit clear (a is |r|, e1 > 0 is
 *     never NaN, (f)), M <= 0x7FFFFFFF; lo is that or a negative float down to -inf (0xFF800000).
 *     q < 0x7F80 then says m, M < 0x7F800000: lo and hi are finite floats with the sign bit clear
 *     (a NaN or inf r gives NaN or inf ends, q >= 0x7F80), so 0 <= lo <= hi, and q is a finite
 *     bf16 magnitude.
 *     (2) Sizes.  e1 >= c0 = 2^-125 (a nonnegative product plus c0, rounded).  lo's sign bit is
 *     clear, so L = r - e1 >= 0 (a negative L rounds to a negative float or -0) and r >= e1 > 0;
 *     H = r + e1 > 2^-125, hi = fl(H) >= 2^-125: q >= the bf16 pattern of 2^-125, normal, and
 *     lo > the midpoint below q >= 2^-126: lo, r, hi are normal.  lo and hi lie between the
 *     midpoints around q, q in [2^F, 2^(F+1)), q -+ 2^(F-8) at most, so hi / lo < (1 + 2^-8) /
 *     (1 - 2^-8) < 1.008; and lo <= r <= hi (L <= r <= H, RNE monotone, r a float).
 *     (3) Upper end.  By (a)-(b), |v - (W + d)| <= D' := C + 2 (K + 3) eta, and e1 >= D' since
 *     (1 - u)(1 + 2^-20)^2 >= 1 and (1 - u) 2^-125 >= 2 (K + 3) 2^-150 (as in (e)).  r = fl(W + d)
 *     errs by <= ulp(r) / 2 <= ulp(hi) / 2 (r <= hi), and hi >= H - ulp(hi) / 2.  So
 *     v <= r + ulp(r) / 2 + D' <= H + ulp(hi) / 2 <= hi + ulp(hi) <= the float of bits M + 1.
 *     (4) Lower end.  Likewise v >= r - ulp(r) / 2 - e1 = L - ulp(r) / 2 and L >= lo - ulp(lo) / 2,
 *     so v >= lo - (ulp(lo) + ulp(r)) / 2.  With lo in [2^E, 2^(E+1)): if r < 2^(E+1), ulp(r) =
 *     ulp(lo) and two steps down from lo cover ulp(lo) (ulp(lo) / 2 each at least); else r is in
 *     the next binade (r <= 1.008 lo), ulp(r) = 2 ulp(lo), and lo > 2^(E+1) / 1.008 is far above
 *     2^E, so the two steps cover 2 ulp(lo) >= 1.5 ulp(lo).  So v >= the float of bits m - 2.
 *     (5) So v lies strictly between the midpoints around q: RNE(v) = q, no tie, a finite bf16.
 *     Subnormal bf16 results are never certified here ((2)); the f64 levels handle them.
 * f64 path (f32 outputs): (a)-(f) with u = 2^-53, eta = 2^-1075, one chain and every h_k taken as
 * H = K (bnd_rd[i] >= (1 + 2^-20)(1.07 K u + rho) ||b_i.||_2), b_k = Bs[i,k]
 * = fl64(s_k B_ik) (rB = 2^-53, or 0 if all exact; rows with a nonzero |b_k| < 2^-1022 or a
 * non-finite one never certify), a_k = A_kj (exact: rA = 0), c0 = 2^-1020 (LM_LR_C0D, LM_LR_CRD),
 * and lo, hi rounded once from f64 to f32.
 * Level 2 (lm_lowrank_fallback_1, f64): four chains as in (b), and S evaluated for the element,
 * S' = fl(sum_k |b_k||A_kj|) by the same tree, so S <= (S' + 2(K+3) eta) / (1 - u)^h.  Then
 * e1 = fma((h + 2) u, S', c0): (g + r'B) / (1 - u)^h <= (h + 1) u (1 + 2^-32) <= (h + 2) u (1 - u)^3.
 * lo and hi are rounded directly from f64 to the output dtype (lr_round_f64, no double rounding).
 * bf16 outputs try a sufficient test first, as the old level 1 did: fl32(lo) and fl32(hi), whose
 * bits (+ 2^15) agree on the top half q, both low halves nonzero, q finite.  Then fl32(lo) and
 * fl32(hi) lie strictly between the bf16 midpoints around q, which are f32 values, so lo and hi do
 * too (f64 -> f32 rounding is monotone: lo <= mu would give fl32(lo) <= mu), RNE(lo) = RNE(hi) = q,
 * and the full test would certify q as well: the same decision, two conversions cheaper.
 * If that does not certify either, level 2 may still prove its own result exact: when s_k B_ik
 * was exact in f64 for the whole tensor and W and every product b_k A_kj are multiples of 2^q
 * with |W| + sum |b_k A_kj| < 2^(q+52) (bounded through S'), every product, partial sum and
 * r = W + d is a multiple of 2^q below 2^(q+53), representable, so computed exactly: r = v and
 * RNE(r) is the answer (ties included) without level 3.
 * Level 3: the exact value (a sum of exact products of three doubles in a fixed-point integer of up
 * to 6400 bits), rounded by inspecting its bits: no approximation left. */
#include "lm_kernels.h"

#include <float.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

/* The fused multiply-adds here are fma() calls: without -mfma (this file is built for any x86-64)
 * each is a call into libm, about ten times the cost of the instruction.  The functions with
 * fma() in a loop, and the preparations, are built three times, for CPUs with AVX-512 (x86-64-v4:
 * the preparation's loops, vectorized, take half the time of the fma build's), with FMA and
 * without, the choice made once at load (an ifunc).  fma() is correctly rounded in every build,
 * and no loop is reassociated (no -ffast-math), so all three give the same bits. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define LR_FMA_CLONES __attribute__((target_clones("arch=x86-64-v4", "fma", "default")))
#else
#define LR_FMA_CLONES
#endif

/* ---- output formats ------------------------------------------------------------------------ */

typedef struct lr_fmt {
    int p;    /* significand bits, hidden bit included */
    int emin; /* exponent of the smallest normal */
    int emax; /* exponent of the largest finite */
} lr_fmt;

static lr_fmt lr_fmt_of(lm_kdtype t)
{
    static const lr_fmt f32 = {24, -126, 127}, bf16 = {8, -126, 127}, f16 = {11, -14, 15};
    return t == LM_KDT_BF16 ? bf16 : t == LM_KDT_F16 ? f16 : f32;
}

/* x (any double) rounded to nearest, ties to even, in the output dtype, as bits: one rounding (f32:
 * the C cast; bf16/f16: lm_f64_to_16_1, round to odd in f32 then RNE, subnormals included), with no
 * libm call (frexp, ldexp and rint made this a tenth of the recomputation's time).  NaN ->
 * canonical NaN; beyond the finite range -> +-inf. */
static uint32_t lr_round_f64(double x, lm_kdtype t)
{
    if (isnan(x))
        return lm_lr_nan_bits(t);
    return t == LM_KDT_F32 ? lm_f32_bits((float)x) : lm_f64_to_16_1(x, t);
}

/* ---- preparation ---------------------------------------------------------------------------- */

/* bytes of n items of sz bytes, rounded up to 64, added to *total; 0 on overflow */
static int lr_ws_add(size_t *total, size_t n, size_t sz)
{
    if (sz != 0 && n > (SIZE_MAX - 128) / sz)
        return 0;
    const size_t b = (n * sz + 63) & ~(size_t)63;
    if (*total > SIZE_MAX - b)
        return 0;
    *total += b;
    return 1;
}

/* K up to which the scalar code takes column j of an A exact in f32 from the panels (lr_col); A
 * transposed (At) is made only for the other cases */
#define LR_COLBUF 256

/* the K-dependent constant of level 1's f32 bound: h = ceil(K/4) + 2 roundings per product */
static size_t lr_depth4(size_t K)
{
    return (K + 3) / 4 + 2;
}

/* the workspace of lr_prepare: src32 when the factors are f32 values (no Af, and At, Bs and an f64
 * A only where needed: lr_ws_needs) */
static size_t lr_ws_bytes(size_t rows, size_t cols, size_t K, int src32, int f64_path)
{
    if (K > LM_LOWRANK_MAX_K || (K != 0 && (rows > SIZE_MAX / K || cols > SIZE_MAX / K)))
        return 0;
    const int keep_bs = !src32 || f64_path || K > LR_COLBUF, at = !src32 || K > LR_COLBUF;
    size_t t = 64; /* alignment slack */
    if (!lr_ws_add(&t, keep_bs ? rows * K : 0, sizeof(double)) || !lr_ws_add(&t, rows * K, sizeof(float)) ||
        !lr_ws_add(&t, src32 ? 0 : K * cols, sizeof(float)) || !lr_ws_add(&t, at ? K * cols : 0, sizeof(double)) ||
        !lr_ws_add(&t, src32 && f64_path ? K * cols : 0, sizeof(double)) ||
        !lr_ws_add(&t, K * (cols / LM_LR_PANEL * LM_LR_PANEL), sizeof(float)) ||
        !lr_ws_add(&t, rows, sizeof(float)) || !lr_ws_add(&t, cols, sizeof(float)) ||
        !lr_ws_add(&t, rows, sizeof(double)) || !lr_ws_add(&t, cols, sizeof(double)) ||
        !lr_ws_add(&t, rows, sizeof(double)) || !lr_ws_add(&t, cols, sizeof(double)) ||
        !lr_ws_add(&t, rows, 1) || !lr_ws_add(&t, cols, 1) || !lr_ws_add(&t, K, sizeof(long long)) ||
        !lr_ws_add(&t, K, sizeof(double)) || !lr_ws_add(&t, rows, sizeof(double)) ||
        !lr_ws_add(&t, cols, sizeof(double)) || !lr_ws_add(&t, cols, sizeof(double)))
        return 0;
    return t;
}

size_t lm_lowrank_ws_bytes(size_t rows, size_t cols, size_t K)
{
    return lr_ws_bytes(rows, cols, K, 0, 1);
}

size_t lm_lowrank_ws_bytes_f32(size_t rows, size_t cols, size_t K, int f64_path)
{
    return lr_ws_bytes(rows, cols, K, 1, f64_path != 0);
}

static void *lr_carve(unsigned char **p, size_t n, size_t sz)
{
    void *r = *p;
    *p += (n * sz + 63) & ~(size_t)63;
    return r;
}

/* the smallest float >= x (x >= 0); +inf for NaN, inf or beyond FLT_MAX: the next float up is
 * f's bits + 1 (f >= 0 finite), the infinity chosen on the bits.  No branch and no conversion
 * under a condition, so the loops over the rows and columns vectorize (sqrt() too: this file is
 * built with -fno-math-errno, its arguments are never negative) */
static inline float lr_up_f32(double x)
{
    const float f = (float)x;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += (double)f < x;
    const uint32_t keep = -(uint32_t)(x <= FLT_MAX);
    u = (u & keep) | (0x7F800000u & ~keep);
    float g;
    memcpy(&g, &u, sizeof g);
    return g;
}

/* fmaxf / fmax for a constant m (not NaN): x when x > m, else m (m when x is NaN, as fmax), inline */
static float lr_atleast_f(float x, float m)
{
    return x > m ? x : m;
}

static double lr_atleast_d(double x, double m)
{
    return x > m ? x : m;
}

/* row k of A (ak, n values) into the column accumulators: its f32 copy (fk), the sums of the
 * squares of the copies (n32) and of the values (n64), the smallest nonzero magnitude (amin), and
 * inexact[j] = 1 once a finite value is not exact in f32.  No branch, no aliasing: vectorized. */
static inline __attribute__((always_inline)) void lr_col_sums(const double *restrict ak, float *restrict fk, double *restrict n32, double *restrict n64,
                        double *restrict amin, double *restrict inexact, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        const double a = ak[j], fa = fabs(a);
        const float f = (float)a;
        fk[j] = f;
        inexact[j] = (double)f != a && fa <= DBL_MAX ? 1.0 : inexact[j];
        const double m = a != 0 ? fa : INFINITY;
        amin[j] = m < amin[j] ? m : amin[j];
        n32[j] += (double)f * (double)f;
        n64[j] += a * a;
    }
}

/* the same for a row of f32 values: their f32 copies are themselves (no fk, no inexact), so n32 is
 * n64 (the caller copies it) */
static inline __attribute__((always_inline)) void lr_col_sums_f32(const float *restrict ak, double *restrict n64, double *restrict amin, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        const double a = (double)ak[j], fa = fabs(a);
        const double m = a != 0 ? fa : INFINITY;
        amin[j] = m < amin[j] ? m : amin[j];
        n64[j] += a * a;
    }
}

/* B's value (i, k), from the f64 or the f32 factors */
static inline double lr_b(const lm_lowrank *lr, size_t i, size_t k)
{
    return lr->B != NULL ? lr->B[i * lr->K + k] : (double)lr->B32[i * lr->K + k];
}

/* four lanes of doubles, of 64-bit masks (-1 true, 0 false), of floats: GCC/clang vector extensions
 * (each operation is the scalar one per lane, IEEE, no reassociation) */
typedef double lr_v4d __attribute__((vector_size(32)));
typedef long long lr_v4l __attribute__((vector_size(32)));
typedef float lr_v4f __attribute__((vector_size(16)));

/* the lanes of x (lr_v4d) where m (lr_v4l) is set replaced by +inf (a macro: a function returning
 * a 32-byte vector has another ABI in the clone without AVX, which gcc warns about) */
#define LR_INF_WHERE(m, x) ((lr_v4d)(((lr_v4l)(x) & ~(m)) | ((lr_v4l)lr_inf4 & (m))))
static const lr_v4d lr_inf4 = {INFINITY, INFINITY, INFINITY, INFINITY};

/* terms k .. k + 3 of a row of B (bd, or bf widened), their scales, h_k^2 and power-of-two masks */
static inline __attribute__((always_inline)) void lr_load4(const double *restrict bd, const float *restrict bf,
                                                           const double *restrict s, const double *restrict hsq,
                                                           const long long *restrict pow2m, size_t k, lr_v4d *b,
                                                           lr_v4d *sk, lr_v4d *hk, lr_v4l *p2)
{
    if (bd != NULL) {
        memcpy(b, bd + k, sizeof *b);
    } else {
        lr_v4f b4;
        memcpy(&b4, bf + k, sizeof b4);
        *b = __builtin_convertvector(b4, lr_v4d);
    }
    memcpy(sk, s + k, sizeof *sk);
    memcpy(hk, hsq + k, sizeof *hk);
    memcpy(p2, pow2m + k, sizeof *p2);
}

/* One row of B (bd or bf, K values): Bs (bs, when kept) and Bf, the sums of the squares of the f32
 * and the f64 copies (+inf: the row never certifies on that path), whether a value is NaN or
 * infinite (*nf), and the tensor's flags (&= : Bf == Bs, every s_k B_ik exact in f64, every Bf
 * value exact and normal).  Four lanes at a time, lane m summing k = m, m+4, ... (then (s0 + s1) +
 * (s2 + s3)), with no branch: a nonzero product outside the normal range, a non-finite one and one
 * that underflowed to zero add +inf to the sums (they stay +inf).  Lanes past K are s = b = 0,
 * which changes nothing.  ex4: the exactness test of s_k B_ik when s_k is not a power of two
 * (NULL: every s_k is one); pow2m: -1 where s_k is a power of two. */
static inline __attribute__((always_inline)) void lr_row_pass(const double *restrict bd, const float *restrict bf,
                                                              const double *restrict s, const long long *restrict pow2m,
                                                              const double *restrict hsq, int all_pow2, size_t K,
                                                              double *restrict bs, float *restrict bfo, double *ss32o,
                                                              double *ss32ho, double *ss64o,
                                                              uint8_t *nf, int *same, int *exact64o, int *exact32o)
{
    const lr_v4d zero = {0, 0, 0, 0}, dmax = {DBL_MAX, DBL_MAX, DBL_MAX, DBL_MAX};
    const lr_v4d fmax = {FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX}, t960 = {0x1p-960, 0x1p-960, 0x1p-960, 0x1p-960};
    const lr_v4d t126 = {0x1p-126, 0x1p-126, 0x1p-126, 0x1p-126};
    const lr_v4d t1022 = {0x1p-1022, 0x1p-1022, 0x1p-1022, 0x1p-1022};
    const lr_v4l absm = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    lr_v4d s32 = zero, s32h = zero, s64 = zero;
    lr_v4l nfv = {0, 0, 0, 0}, sm = ~nfv, e64 = ~nfv, e32 = ~nfv;
    for (size_t k = 0; k < K; k += 4) {
        lr_v4d b = zero, sk = zero, hk = zero;
        lr_v4l p2 = {0, 0, 0, 0}, exf = {0, 0, 0, 0};
        if (k + 4 <= K) {
            lr_load4(bd, bf, s, hsq, pow2m, k, &b, &sk, &hk, &p2);
        } else {
            for (size_t m = 0; k + m < K; m++) {
                b[m] = bd != NULL ? bd[k + m] : (double)bf[k + m];
                sk[m] = s[k + m];
                hk[m] = hsq[k + m];
                p2[m] = pow2m[k + m];
            }
        }
        const lr_v4d x = sk * b, ax = (lr_v4d)((lr_v4l)x & absm);
        const lr_v4f f = __builtin_convertvector(x, lr_v4f);
        const lr_v4d fd = __builtin_convertvector(f, lr_v4d);
        if (!all_pow2) /* the product's rounding error tells */
            for (size_t m = 0; m < 4 && k + m < K; m++)
                exf[m] = fma(sk[m], b[m], -x[m]) == 0 ? -1 : 0;
        if (k + 4 <= K) {
            if (bs != NULL)
                memcpy(bs + k, &x, sizeof x);
            memcpy(bfo + k, &f, sizeof f);
        } else {
            for (size_t m = 0; k + m < K; m++) {
                if (bs != NULL)
                    bs[k + m] = x[m];
                bfo[k + m] = f[m];
            }
        }
        const lr_v4l exact32 = fd == x;
        sm &= exact32;
        nfv |= ~(((lr_v4d)((lr_v4l)sk & absm) <= dmax) & ((lr_v4d)((lr_v4l)b & absm) <= dmax));
        /* non-finite, or the product underflowed to zero */
        const lr_v4l bad = ~(ax <= dmax) | ((x == zero) & (sk != zero) & (b != zero));
        const lr_v4l nz = x != zero;
        /* a power-of-two scale (1 included) multiplies exactly in this range */
        const lr_v4l ex = (ax >= t960) & (p2 | exf);
        const lr_v4l out32 = (ax < t126) | ~((lr_v4d)((lr_v4l)fd & absm) <= fmax);
        e64 &= bad | ~nz | ex;
        e32 &= bad | ~nz | out32 | (ex & exact32);
        s32 += LR_INF_WHERE(bad | (nz & out32), fd * fd);
        s32h += LR_INF_WHERE(bad | (nz & out32), hk * (fd * fd));
        s64 += LR_INF_WHERE(bad | (nz & (ax < t1022)), x * x);
    }
    *ss32o = (s32[0] + s32[1]) + (s32[2] + s32[3]);
    *ss32ho = (s32h[0] + s32h[1]) + (s32h[2] + s32h[3]);
    *ss64o = (s64[0] + s64[1]) + (s64[2] + s64[3]);
    *nf = (uint8_t)((nfv[0] | nfv[1] | nfv[2] | nfv[3]) != 0);
    *same &= (sm[0] & sm[1] & sm[2] & sm[3]) != 0;
    *exact64o &= (e64[0] & e64[1] & e64[2] & e64[3]) != 0;
    *exact32o &= (e32[0] & e32[1] & e32[2] & e32[3]) != 0;
}

/* 1 if every lane of v (0 or -1 each) is set */
static inline int lr_all4(const lr_v4l *v)
{
    return ((*v)[0] & (*v)[1] & (*v)[2] & (*v)[3]) != 0;
}

/* the tensor's flags of lr_row_pass (-1: holds) over the rows lr_row_clean took */
typedef struct lr_flags4 {
    lr_v4l same, exact64, exact32;
} lr_flags4;

/* lr_row_clean's accumulators: its chain sums, whether the row is clean so far, its flags */
typedef struct lr_clean {
    lr_v4d c32, c32h, c64;
    lr_v4l ok, same, exact64, exact32;
} lr_clean;

/* four terms k .. k+3 of lr_row_clean (b: B_ik, sk: s_k, hk: h_k^2, p2: pow2m), their copies to
 * bs (when kept) and bfo.  lean: f32 factors and every s_k a power of two, where a clean term's
 * product s_k B_ik is exact in f64 and in f32 (an f32 significand times 2^e inside the normal
 * range), so its flags hold and its f64 square is its f32 one: nothing to compute for them */
static inline __attribute__((always_inline)) void lr_clean4(lr_clean *a, const lr_v4d *b, const lr_v4d *sk,
                                                            const lr_v4d *hk, const lr_v4l *p2, int all_pow2,
                                                            int lean, double *restrict bs, float *restrict bfo)
{
    const lr_v4d zero = {0, 0, 0, 0}, fmax = {FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX};
    const lr_v4d t126 = {0x1p-126, 0x1p-126, 0x1p-126, 0x1p-126};
    const lr_v4l absm = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    const lr_v4d x = *sk * *b, ax = (lr_v4d)((lr_v4l)x & absm);
    const lr_v4f f = __builtin_convertvector(x, lr_v4f);
    if (bs != NULL)
        memcpy(bs, &x, sizeof x);
    memcpy(bfo, &f, sizeof f);
    const lr_v4l in = (ax <= fmax) & (ax >= t126);
    const lr_v4d q = lean ? x * x : __builtin_convertvector(f, lr_v4d) * __builtin_convertvector(f, lr_v4d);
    a->c32 += q;
    a->c32h += *hk * q;
    if (lean) { /* s_k != 0: a zero product has B_ik zero or underflowed */
        a->ok &= in | (*b == zero);
        return;
    }
    const lr_v4l nz = x != zero;
    a->ok &= in | (~nz & ((*b == zero) | (*sk == zero)));
    lr_v4l ex = *p2;
    if (!all_pow2) { /* the product's rounding error tells */
        double xs[4], ss[4], bb[4];
        long long e[4];
        memcpy(xs, &x, sizeof xs);
        memcpy(ss, sk, sizeof ss);
        memcpy(bb, b, sizeof bb);
        for (size_t m = 0; m < 4; m++)
            e[m] = fma(ss[m], bb[m], -xs[m]) == 0 ? -1 : 0;
        memcpy(&ex, e, sizeof ex);
        ex |= *p2;
    }
    const lr_v4l exact32 = __builtin_convertvector(f, lr_v4d) == x;
    a->same &= exact32;
    a->exact64 &= ~nz | ex;
    a->exact32 &= ~nz | (ex & exact32);
    a->c64 += x * x;
}

/* lr_row_pass for a row with nothing special in it: 1 when every nonzero product s_k B_ik is in
 * [2^-126, FLT_MAX] and every zero one has s_k or B_ik zero (so no s_k or B_ik is NaN or
 * infinite, none underflowed, no f32 copy left the normal range: every "bad" and "out32" lane of
 * lr_row_pass is clear, its sums add the plain squares and its flags reduce to the ones and-ed
 * here into *fl); 0, with nothing but bs and bfo written, for the others, which lr_row_pass takes
 * again.  The same lanes, terms and order as lr_row_pass (chain m adds k = m, m+4, ..., the lanes
 * past K zeros), so the same sums bit for bit, in a fraction of its operations.  (Vectors of
 * eight lanes would halve them again, but gcc makes scalar code of their compares in the
 * target_clones builds.) */
static inline __attribute__((always_inline)) int lr_row_clean(const double *restrict bd, const float *restrict bf,
                                                               const double *restrict s, const long long *restrict pow2m,
                                                               const double *restrict hsq, int all_pow2, int lean,
                                                               size_t K, double *restrict bs, float *restrict bfo,
                                                               double *ss32o, double *ss32ho, double *ss64o,
                                                               lr_flags4 *fl)
{
    const lr_v4d zero = {0, 0, 0, 0};
    const lr_v4l ones = {-1, -1, -1, -1};
    lr_clean a = {zero, zero, zero, ones, ones, ones, ones};
    size_t k = 0;
    for (; k + 4 <= K; k += 4) {
        lr_v4d b, sk, hk;
        lr_v4l p2;
        lr_load4(bd, bf, s, hsq, pow2m, k, &b, &sk, &hk, &p2);
        lr_clean4(&a, &b, &sk, &hk, &p2, all_pow2, lean, bs != NULL ? bs + k : NULL, bfo + k);
    }
    if (k < K) { /* the last 1-3 terms, the other lanes zeros */
        double b[4] = {0, 0, 0, 0}, sk[4] = {0, 0, 0, 0}, hk[4] = {0, 0, 0, 0}, xs[4];
        long long p2[4] = {0, 0, 0, 0};
        float fs[4];
        for (size_t m = 0; k + m < K; m++) {
            b[m] = bd != NULL ? bd[k + m] : (double)bf[k + m];
            sk[m] = s[k + m];
            hk[m] = hsq[k + m];
            p2[m] = pow2m[k + m];
        }
        lr_v4d bv, sv, hv;
        lr_v4l pv;
        memcpy(&bv, b, sizeof bv);
        memcpy(&sv, sk, sizeof sv);
        memcpy(&hv, hk, sizeof hv);
        memcpy(&pv, p2, sizeof pv);
        lr_clean4(&a, &bv, &sv, &hv, &pv, all_pow2, lean, xs, fs);
        for (size_t m = 0; k + m < K; m++) {
            if (bs != NULL)
                bs[k + m] = xs[m];
            bfo[k + m] = fs[m];
        }
    }
    if (!lr_all4(&a.ok))
        return 0;
    fl->same &= a.same;
    fl->exact64 &= a.exact64;
    fl->exact32 &= a.exact32;
    *ss32o = (a.c32[0] + a.c32[1]) + (a.c32[2] + a.c32[3]);
    *ss32ho = (a.c32h[0] + a.c32h[1]) + (a.c32h[2] + a.c32h[3]);
    *ss64o = lean ? *ss32o : (a.c64[0] + a.c64[1]) + (a.c64[2] + a.c64[3]);
    return 1;
}

/* Afp: Af's full panels of LM_LR_PANEL columns, each [K x 32] contiguous */
static void lr_panels(lm_lowrank *lr)
{
    const size_t K = lr->K, cols = lr->cols;
    for (size_t j0 = 0; j0 + LM_LR_PANEL <= cols; j0 += LM_LR_PANEL)
        for (size_t k = 0; k < K; k++)
            memcpy(lr->Afp + (j0 * K + k * LM_LR_PANEL), lr->Af + k * cols + j0, LM_LR_PANEL * sizeof(float));
}

/* the rows of B (lr->Bs, Bf, row_nf; their squared norms n32r, n32h and lr->bnd_rd, square
 * roots taken later) and the tensor's flags: a clean row (lr_row_clean) as lr_row_pass would take
 * it, the others by lr_row_pass.  pow2, hsq: K values of workspace */
static inline __attribute__((always_inline)) void lr_rows(lm_lowrank *lr, const double *B, const float *B32,
                                                          long long *pow2, double *hsq, double *n32r, double *n32h,
                                                          int *sameB32, int *exactB64, int *exactB32)
{
    const size_t rows = lr->rows, K = lr->K;
    const double *s = lr->s;
    const int src32 = B == NULL;
    int all_pow2 = 1;
    /* h_k^2: term k (chain k % 4, position k / 4 of its n = ceil((K - k % 4) / 4) terms) passes
     * through h_k = n - k / 4 + 2 roundings of the f32 path */
    for (size_t k = 0; k < K; k++) {
        const double h = (double)((K - k % 4 + 3) / 4 - k / 4 + 2);
        hsq[k] = h * h;
    }
    for (size_t k = 0; k < K; k++) {
        int e;
        const double m = frexp(s[k], &e);
        pow2[k] = isfinite(s[k]) && (m == 0.5 || m == -0.5) ? -1 : 0;
        all_pow2 &= pow2[k] != 0;
    }
    const int lean = src32 && all_pow2;
    lr_flags4 fl;
    fl.same = fl.exact64 = fl.exact32 = (lr_v4l){-1, -1, -1, -1};
    for (size_t i = 0; i < rows; i++) {
        double ss32, ss32h, ss64;
        const double *bd = src32 ? NULL : B + i * K;
        const float *bf = src32 ? B32 + i * K : NULL;
        double *bs = lr->Bs ? lr->Bs + i * K : NULL;
        /* lean and all_pow2 constants in each call: the common case's code has no test of them */
        if (lean ? lr_row_clean(NULL, bf, s, pow2, hsq, 1, 1, K, bs, lr->Bf + i * K, &ss32, &ss32h, &ss64, &fl)
                 : lr_row_clean(bd, bf, s, pow2, hsq, all_pow2, 0, K, bs, lr->Bf + i * K, &ss32, &ss32h, &ss64, &fl))
            lr->row_nf[i] = 0;
        else
            lr_row_pass(bd, bf, s, pow2, hsq, all_pow2, K, bs, lr->Bf + i * K, &ss32, &ss32h, &ss64, &lr->row_nf[i],
                        sameB32, exactB64, exactB32);
        n32r[i] = ss32; /* the square roots in lr_prepare's last loop, which vectorizes */
        n32h[i] = ss32h;
        lr->bnd_rd[i] = ss64;
    }
    *sameB32 &= lr_all4(&fl.same);
    *exactB64 &= lr_all4(&fl.exact64);
    *exactB32 &= lr_all4(&fl.exact32);
}

/* lm_lowrank_prepare (B, A in f64) and lm_lowrank_prepare_f32 (B32, A32) */
static inline __attribute__((always_inline)) int lr_prepare(lm_lowrank *lr, size_t rows, size_t cols, size_t K, const double *B, const float *B32,
                      const double *A, const float *A32, const double *s, int f64_path, void *ws, size_t ws_bytes)
{
    const int src32 = B == NULL;
    const size_t need = lr_ws_bytes(rows, cols, K, src32, f64_path);
    if (need == 0 || ws == NULL || ws_bytes < need)
        return -1;
    const int keep_bs = !src32 || f64_path || K > LR_COLBUF, at = !src32 || K > LR_COLBUF;
    unsigned char *p = (unsigned char *)(((uintptr_t)ws + 63) & ~(uintptr_t)63);
    lr->rows = rows;
    lr->cols = cols;
    lr->K = K;
    lr->B = B;
    lr->B32 = B32;
    lr->s = s;
    lr->Bs = keep_bs ? lr_carve(&p, rows * K, sizeof(double)) : NULL;
    lr->Bf = lr_carve(&p, rows * K, sizeof(float));
    lr->Af = src32 ? (float *)(uintptr_t)A32 : lr_carve(&p, K * cols, sizeof(float));
    lr->At = at ? lr_carve(&p, K * cols, sizeof(double)) : NULL;
    if (src32 && f64_path) { /* the f64 path reads A in f64 */
        double *a64 = lr_carve(&p, K * cols, sizeof(double));
        for (size_t e = 0; e < K * cols; e++)
            a64[e] = (double)A32[e];
        A = a64;
    }
    lr->A = A;
    lr->Afp = lr_carve(&p, K * (cols / LM_LR_PANEL * LM_LR_PANEL), sizeof(float));
    lr->bnd_rf = lr_carve(&p, rows, sizeof(float));
    lr->bnd_cf = lr_carve(&p, cols, sizeof(float));
    lr->bnd_rd = lr_carve(&p, rows, sizeof(double));
    lr->bnd_cd = lr_carve(&p, cols, sizeof(double));
    double *n32r = lr_carve(&p, rows, sizeof(double)); /* raw norms of the f32 copies */
    double *n32h = lr_carve(&p, rows, sizeof(double)); /* the same weighted by h_k ((b) above) */
    double *n32c = lr_carve(&p, cols, sizeof(double));
    lr->row_nf = lr_carve(&p, rows, 1);
    lr->col_nf = lr_carve(&p, cols, 1);

    /* rows of B: copies, exactness, sums of squares (+inf marks a row that never certifies) */
    int exactB32 = 1, exactB64 = 1, exactA32 = 1, sameB32 = 1;
    long long *pow2 = lr_carve(&p, K, sizeof(long long));
    double *hsq = lr_carve(&p, K, sizeof(double));
    lr_rows(lr, B, B32, pow2, hsq, n32r, n32h, &sameB32, &exactB64, &exactB32);
    /* columns of A, summed row by row (A is row-major), k ascending for each column, in a loop with
     * no branch (it vectorizes): the sums, the smallest nonzero |A_kj| and whether every value is
     * exact in f32.  A column whose f64 sum is not finite (a NaN or an infinity in it, or an
     * overflow) is looked at again value by value; in the others every value is finite, and the
     * f32 copy leaves the normal range exactly where a nonzero |A_kj| < 2^-126 or a copy overflows
     * (then its f32 sum is infinite).  f32 values are their own copies: n32 = n64. */
    double *amin = lr_carve(&p, cols, sizeof(double)), *inexact = lr_carve(&p, cols, sizeof(double));
    for (size_t j = 0; j < cols; j++) {
        n32c[j] = lr->bnd_cd[j] = inexact[j] = 0;
        amin[j] = INFINITY;
    }
    for (size_t k = 0; k < K; k++)
        if (src32)
            lr_col_sums_f32(A32 + k * cols, lr->bnd_cd, amin, cols);
        else
            lr_col_sums(A + k * cols, lr->Af + k * cols, n32c, lr->bnd_cd, amin, inexact, cols);
    for (size_t j = 0; j < cols; j++) {
        if (src32)
            n32c[j] = lr->bnd_cd[j];
        exactA32 &= inexact[j] == 0;
        lr->col_nf[j] = 0;
        if (!(lr->bnd_cd[j] <= DBL_MAX)) /* rare: the column value by value */
            for (size_t k = 0; k < K; k++)
                lr->col_nf[j] |= !isfinite(src32 ? (double)A32[k * cols + j] : A[k * cols + j]);
        if (lr->col_nf[j])
            n32c[j] = lr->bnd_cd[j] = INFINITY;
        else if (amin[j] < 0x1p-126)
            n32c[j] = INFINITY;
    }
    /* A transposed, in 32 x 32 blocks (a column at a time would miss the cache on every write),
     * only when the scalar code cannot take the columns from the panels (lr_col) */
    if (!exactA32 || K > LR_COLBUF) {
        for (size_t k0 = 0; k0 < K; k0 += 32)
            for (size_t j0 = 0; j0 < cols; j0 += 32)
                for (size_t j = j0; j < j0 + 32 && j < cols; j++)
                    for (size_t k = k0; k < k0 + 32 && k < K; k++)
                        lr->At[j * K + k] = src32 ? (double)A32[k * cols + j] : A[k * cols + j];
    } else {
        lr->At = NULL;
    }
    lr_panels(lr);
    lr->bs_exact = exactB64;
    lr->a_f32 = exactA32;
    lr->b_f32 = sameB32;
    /* the constants of the proof (r' = r / (1 - r) rounded up generously) */
    const double rB32 = exactB32 ? 0 : 0x1p-24 * (1 + 0x1p-21);
    const double rA32 = exactA32 ? 0 : 0x1p-24 * (1 + 0x1p-21);
    /* f32 path: g_k <= h_k u / (1 - H u) with H = max h_k, then the copies' rho, for every k */
    const double g32 = 0x1p-24 / (1 - (double)lr_depth4(K) * 0x1p-24), rho32 = rA32 + rB32 + rA32 * rB32;
    const double c64 = 1.07 * (double)K * 0x1p-53 + (exactB64 ? 0 : 0x1p-53 * (1 + 0x1p-50));
    const double margin = 1 + 0x1p-19;
    /* never below the smallest subnormal, so that a product of two factors is never 0 * inf.
     * lm_lowrank_fallback_1 relies on: a NaN or infinite factor in row i (column j) makes bnd_rf[i]
     * and bnd_rd[i] (bnd_cf[j] and bnd_cd[j]) infinite (their sums are +inf), and a finite bnd_rf[i]
     * leaves bnd_rd[i] finite (every nonzero |fl64(s_k B_ik)| is then in [2^-126, ~FLT_MAX]) */
    for (size_t i = 0; i < rows; i++) {
        lr->bnd_rf[i] = lr_atleast_f(lr_up_f32(margin * (g32 * sqrt(n32h[i]) + rho32 * sqrt(n32r[i]))), 0x1p-149f);
        const double d = lr_atleast_d(c64 * margin * sqrt(lr->bnd_rd[i]), 0x1p-1074);
        lr->bnd_rd[i] = d != d ? INFINITY : d;
    }
    for (size_t j = 0; j < cols; j++) {
        lr->bnd_cf[j] = lr_atleast_f(lr_up_f32(margin * sqrt(n32c[j])), 0x1p-149f);
        const double d = lr_atleast_d(margin * sqrt(lr->bnd_cd[j]), 0x1p-1074);
        lr->bnd_cd[j] = d != d ? INFINITY : d;
    }
    return 0;
}

LR_FMA_CLONES int lm_lowrank_prepare(lm_lowrank *lr, size_t rows, size_t cols, size_t K, const double *B,
                                     const double *A, const double *s, void *ws, size_t ws_bytes)
{
    if (B == NULL || A == NULL)
        return -1;
    return lr_prepare(lr, rows, cols, K, B, NULL, A, NULL, s, 1, ws, ws_bytes);
}

LR_FMA_CLONES int lm_lowrank_prepare_f32(lm_lowrank *lr, size_t rows, size_t cols, size_t K, const float *B,
                                         const float *A, const double *s, int f64_path, void *ws, size_t ws_bytes)
{
    if (B == NULL || A == NULL)
        return -1;
    return lr_prepare(lr, rows, cols, K, NULL, B, NULL, A, s, f64_path != 0, ws, ws_bytes);
}

/* ---- exactness off: what the uncertified kernel reads, and nothing else ----------------------
 * Bf, Af and its panels, the same bits as lr_prepare makes them (Bf = fl32(fl64(s_k B_ik)), Af =
 * fl32(A_kj)): no bound factors, no non-finite flags, no Bs or At, O((rows + cols) K) conversions
 * and copies only.  So --exactness-off no longer pays for bounds it never reads, and the
 * exactness's measured cost is the whole of it. */
static size_t lr_ws_bytes_uncertified(size_t rows, size_t cols, size_t K, int src32)
{
    if (K > LM_LOWRANK_MAX_K || (K != 0 && (rows > SIZE_MAX / K || cols > SIZE_MAX / K)))
        return 0;
    size_t t = 64; /* alignment slack */
    if (!lr_ws_add(&t, rows * K, sizeof(float)) || !lr_ws_add(&t, src32 ? 0 : K * cols, sizeof(float)) ||
        !lr_ws_add(&t, K * (cols / LM_LR_PANEL * LM_LR_PANEL), sizeof(float)))
        return 0;
    return t;
}

size_t lm_lowrank_ws_bytes_uncertified(size_t rows, size_t cols, size_t K, int src32)
{
    return lr_ws_bytes_uncertified(rows, cols, K, src32 != 0);
}

LR_FMA_CLONES int lm_lowrank_prepare_uncertified(lm_lowrank *lr, size_t rows, size_t cols, size_t K, const double *B,
                                                 const double *A, const float *B32, const float *A32, const double *s,
                                                 void *ws, size_t ws_bytes)
{
    const int src32 = B == NULL;
    if (src32 ? B32 == NULL || A32 == NULL || A != NULL : A == NULL || B32 != NULL || A32 != NULL)
        return -1;
    const size_t need = lr_ws_bytes_uncertified(rows, cols, K, src32);
    if (need == 0 || ws == NULL || ws_bytes < need)
        return -1;
    unsigned char *p = (unsigned char *)(((uintptr_t)ws + 63) & ~(uintptr_t)63);
    memset(lr, 0, sizeof *lr);
    lr->rows = rows;
    lr->cols = cols;
    lr->K = K;
    lr->B = B;
    lr->B32 = B32;
    lr->A = A;
    lr->s = s;
    lr->Bf = lr_carve(&p, rows * K, sizeof(float));
    lr->Af = src32 ? (float *)(uintptr_t)A32 : lr_carve(&p, K * cols, sizeof(float));
    lr->Afp = lr_carve(&p, K * (cols / LM_LR_PANEL * LM_LR_PANEL), sizeof(float));
    for (size_t i = 0; i < rows; i++) {
        float *restrict bf = lr->Bf + i * K;
        if (src32)
            for (size_t k = 0; k < K; k++)
                bf[k] = (float)(s[k] * (double)B32[i * K + k]);
        else
            for (size_t k = 0; k < K; k++)
                bf[k] = (float)(s[k] * B[i * K + k]);
    }
    if (!src32)
        for (size_t e = 0; e < K * cols; e++)
            lr->Af[e] = (float)A[e];
    lr_panels(lr);
    return 0;
}

/* ---- level 3: the exact value in fixed point ------------------------------------------------- */

/* Bit b of the accumulator weighs 2^(b + LR_XMIN).  A finite double is m 2^e with m < 2^53 and
 * -1074 <= e <= 971; a product of three is M 2^X with M < 2^159 and -3222 <= X <= 2913, so its
 * top bit is below bit 6294; with W and up to 65536 terms the sum stays below bit 6312.  Two
 * magnitudes (positive and negative terms) are kept; only the words in [lo, hi] are valid (the
 * rest are zero by definition), so a typical element touches a handful of words. */
#define LR_XMIN (-3222)
#define LR_WORDS 100

__extension__ typedef unsigned __int128 lr_u128;

typedef struct lr_acc {
    uint64_t pos[LR_WORDS], neg[LR_WORDS];
    int lo, hi; /* valid words; lo > hi when empty */
} lr_acc;

static void lr_decompose(double x, uint64_t *m, int *e)
{
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    const int ef = (int)((u >> 52) & 0x7FF);
    *m = (u & 0xFFFFFFFFFFFFFull) | (ef ? 1ull << 52 : 0);
    *e = (ef ? ef : 1) - 1075;
}

/* makes words [w0, w1] valid (zero where new) */
static void lr_acc_touch(lr_acc *a, int w0, int w1)
{
    if (a->lo > a->hi) {
        a->lo = w0;
        a->hi = w0 - 1;
    }
    for (int w = w0; w < a->lo; w++)
        a->pos[w] = a->neg[w] = 0;
    for (int w = a->hi + 1; w <= w1; w++)
        a->pos[w] = a->neg[w] = 0;
    if (w0 < a->lo)
        a->lo = w0;
    if (w1 > a->hi)
        a->hi = w1;
}

/* (negative ? neg : pos) += M << pos, M given as three words (M < 2^192) */
static void lr_acc_add(lr_acc *a, int negative, const uint64_t M[3], int bitpos)
{
    const int wi = bitpos / 64;
    const unsigned sh = (unsigned)bitpos % 64;
    uint64_t t[4];
    if (sh == 0) {
        t[0] = M[0];
        t[1] = M[1];
        t[2] = M[2];
        t[3] = 0;
    } else {
        t[0] = M[0] << sh;
        t[1] = (M[1] << sh) | (M[0] >> (64 - sh));
        t[2] = (M[2] << sh) | (M[1] >> (64 - sh));
        t[3] = M[2] >> (64 - sh);
    }
    lr_acc_touch(a, wi, wi + 3);
    uint64_t *acc = negative ? a->neg : a->pos;
    uint64_t carry = 0;
    for (int k = 0; k < 4; k++) {
        const uint64_t s1 = acc[wi + k] + t[k];
        const uint64_t c1 = s1 < t[k];
        const uint64_t s2 = s1 + carry;
        carry = c1 | (s2 < carry);
        acc[wi + k] = s2;
    }
    for (int k = wi + 4; carry && k < LR_WORDS; k++) {
        lr_acc_touch(a, k, k);
        acc[k] += 1;
        carry = acc[k] == 0;
    }
}

static int lr_acc_bit(const uint64_t *D, int lo, int b)
{
    return (b >> 6) < lo ? 0 : (int)((D[b >> 6] >> (b & 63)) & 1u);
}

/* the magnitude D (valid words [lo, hi], sign neg) rounded to the output dtype; 0 gives +0 */
static uint32_t lr_round_acc(const uint64_t *D, int lo, int hi, int neg, lm_kdtype t)
{
    int hw = hi;
    while (hw >= lo && D[hw] == 0)
        hw--;
    if (hw < lo)
        return lr_round_f64(0.0, t);
    const int h = hw * 64 + 63 - __builtin_clzll(D[hw]); /* top bit: D in [2^E, 2^(E+1)) */
    const lr_fmt f = lr_fmt_of(t);
    int E = h + LR_XMIN;
    if (E < f.emin)
        E = f.emin;
    const int q = E - (f.p - 1); /* the output's quantum at D: 2^q, q >= -149 */
    const int bq = q - LR_XMIN;  /* its bit (>= 3073, so bits below it exist) */
    uint64_t T = 0;
    for (int b = h; b >= bq; b--)
        T = (T << 1) | (uint64_t)lr_acc_bit(D, lo, b);
    const int round = lr_acc_bit(D, lo, bq - 1);
    int sticky = 0;
    const int nb = bq - 1; /* bits [0, nb) */
    for (int w = lo; w < nb / 64 && w <= hi && !sticky; w++)
        sticky = D[w] != 0;
    if (!sticky && nb % 64 && nb / 64 >= lo && nb / 64 <= hi)
        sticky = (D[nb / 64] & ((1ull << (nb % 64)) - 1)) != 0;
    if (round && (sticky || (T & 1u)))
        T++;
    const double v = ldexp((double)T, q); /* exact, or inf beyond the double range */
    return lr_round_f64(neg ? -v : v, t); /* representable: no second rounding */
}

/* W + sum_k s_k B_ik A_kj, exactly, rounded to the output dtype (all inputs finite); Aj: column j
 * of A (lr_col) */
static uint32_t lr_exact(const lm_lowrank *lr, size_t i, const double *Aj, float w, lm_kdtype t)
{
    lr_acc a;
    a.lo = 1;
    a.hi = 0;
    uint64_t m;
    int e;
    if (w != 0) {
        lr_decompose((double)w, &m, &e);
        const uint64_t M[3] = {m, 0, 0};
        lr_acc_add(&a, w < 0, M, e - LR_XMIN);
    }
    for (size_t k = 0; k < lr->K; k++) {
        const double x = lr->s[k], y = lr_b(lr, i, k), z = Aj[k];
        if (x == 0 || y == 0 || z == 0)
            continue;
        uint64_t mx, my, mz;
        int ex, ey, ez;
        lr_decompose(x, &mx, &ex);
        lr_decompose(y, &my, &ey);
        lr_decompose(z, &mz, &ez);
        const lr_u128 p1 = (lr_u128)mx * my; /* < 2^106 */
        const lr_u128 plo = (lr_u128)(uint64_t)p1 * mz, phi = (lr_u128)(uint64_t)(p1 >> 64) * mz;
        const lr_u128 mid = (plo >> 64) + (lr_u128)(uint64_t)phi;
        const uint64_t M[3] = {(uint64_t)plo, (uint64_t)mid, (uint64_t)(phi >> 64) + (uint64_t)(mid >> 64)};
        lr_acc_add(&a, (x < 0) ^ (y < 0) ^ (z < 0), M, ex + ey + ez - LR_XMIN);
    }
    if (a.lo > a.hi)
        return lr_round_f64(0.0, t);
    /* |pos - neg| with its sign */
    int cmp = 0;
    for (int k = a.hi; k >= a.lo && cmp == 0; k--)
        cmp = a.pos[k] > a.neg[k] ? 1 : a.pos[k] < a.neg[k] ? -1 : 0;
    uint64_t *big = cmp >= 0 ? a.pos : a.neg;
    const uint64_t *small = cmp >= 0 ? a.neg : a.pos;
    uint64_t borrow = 0;
    for (int k = a.lo; k <= a.hi; k++) {
        const uint64_t x = big[k], y = small[k];
        const uint64_t d1 = x - y;
        const uint64_t b1 = x < y;
        big[k] = d1 - borrow;
        borrow = b1 | (d1 < borrow);
    }
    return lr_round_acc(big, a.lo, a.hi, cmp < 0, t);
}

/* ---- levels 2 and 3 ----------------------------------------------------------------------- */

/* the exponent of the lowest set bit of x (finite, nonzero) */
static int lr_lowbit(double x)
{
    uint64_t m;
    int e;
    lr_decompose(x, &m, &e);
    return e + __builtin_ctzll(m);
}

/* 1 if level 2's evaluation of element (i, j) was exact (see the proof above) */
static int lr_level2_exact(const lm_lowrank *lr, const double *Bs, const double *Aj, float w,
                           double S)
{
    if (!lr->bs_exact)
        return 0;
    int q = w != 0 ? lr_lowbit((double)w) : INT32_MAX;
    for (size_t k = 0; k < lr->K; k++)
        if (Bs[k] != 0 && Aj[k] != 0) {
            const int qk = lr_lowbit(Bs[k]) + lr_lowbit(Aj[k]);
            q = qk < q ? qk : q;
        }
    /* S' underestimates sum |b_k A_kj| by a factor (1 - u)^h at most: 2^(q+52) leaves room */
    return q != INT32_MAX && q + 52 < 1024 && (S + fabs((double)w)) * (1 + 0x1p-30) < ldexp(1.0, q + 52);
}

/* 1 if every term s_k B_ik A_kj of element (i, j) is zero (Aj: column j of A) */
static int lr_all_terms_zero(const lm_lowrank *lr, size_t i, const double *Aj)
{
    for (size_t k = 0; k < lr->K; k++)
        if (lr->s[k] != 0 && lr_b(lr, i, k) != 0 && Aj[k] != 0)
            return 0;
    return 1;
}

/* column j of A (K values, exact): from the f32 panels when A is exact in f32 (the vector path has
 * just read them, so they are in L1), else At (made by prepare only then: lr_needs_at) */
static const double *lr_col(const lm_lowrank *lr, size_t j, double *buf)
{
    const size_t K = lr->K;
    if (!lr->a_f32 || K > LR_COLBUF)
        return lr->At + j * K;
    size_t stride;
    const float *a = lm_lr_panel(lr, j, 1, &stride);
    for (size_t k = 0; k < K; k++)
        buf[k] = (double)a[k * stride];
    return buf;
}

/* row i of Bs (K values): from Bf when every Bs value is an f32 one, else Bs, or without Bs (f32
 * factors, K <= LR_COLBUF) the products s_k B_ik formed here as prepare forms them */
static const double *lr_row(const lm_lowrank *lr, size_t i, double *buf)
{
    const size_t K = lr->K;
    if (lr->b_f32 && K <= LR_COLBUF) {
        const float *b = lr->Bf + i * K;
        for (size_t k = 0; k < K; k++)
            buf[k] = (double)b[k];
        return buf;
    }
    if (lr->Bs != NULL)
        return lr->Bs + i * K;
    const float *b = lr->B32 + i * K;
    for (size_t k = 0; k < K; k++)
        buf[k] = lr->s[k] * (double)b[k];
    return buf;
}

/* level 2's sums: the four chains (term k in chain k % 4, k ascending) of the products b_k a_k
 * and of their magnitudes, each chain one FMA a term, then (c0 + c1) + (c2 + c3).  b_k, a_k from
 * the f32 copies bf (row i of Bf) and af (column j of the panels, stride as) when f32, else from
 * Bs and Aj: f32 is a constant at each call, so its loop has no test of it (a test of bf != NULL
 * stayed in the loop: bf is not known to be non-null where it is given) */
static inline __attribute__((always_inline)) void lr_level2_sums(int f32, const float *bf, const float *af, size_t as,
                                                                 const double *Bs, const double *Aj, size_t K,
                                                                 double *dd, double *SS)
{
    /* the chains in named scalars, the four terms of a step written out: with arrays indexed in a
     * loop on m, gcc kept them in memory (a store and a load on every FMA's dependency chain) and
     * tested bf != NULL on every term: 90% of a recomputation's samples (perf, 1b bf16) */
    double d0 = 0, d1 = 0, d2 = 0, d3 = 0, S0 = 0, S1 = 0, S2 = 0, S3 = 0;
#define LR_B(k) (f32 ? (double)bf[k] : Bs[k])
#define LR_A(k) (f32 ? (double)af[(k) * as] : Aj[k])
#define LR_TERM(d, S, k)                                                                           \
    do {                                                                                           \
        const double b_ = LR_B(k), a_ = LR_A(k);                                                   \
        d = fma(b_, a_, d);                                                                        \
        S = fma(fabs(b_), fabs(a_), S);                                                            \
    } while (0)
    size_t k = 0;
    /* four terms a step, one per chain (a loop on k % 4 ran 1.5x slower at K = 256: VeRA) */
    for (; k + 4 <= K; k += 4) {
        LR_TERM(d0, S0, k);
        LR_TERM(d1, S1, k + 1);
        LR_TERM(d2, S2, k + 2);
        LR_TERM(d3, S3, k + 3);
    }
    if (k < K)
        LR_TERM(d0, S0, k);
    if (k + 1 < K)
        LR_TERM(d1, S1, k + 1);
    if (k + 2 < K)
        LR_TERM(d2, S2, k + 2);
#undef LR_TERM
#undef LR_A
#undef LR_B
    *dd = (d0 + d1) + (d2 + d3);
    *SS = (S0 + S1) + (S2 + S3);
}

/* *Bs, *Aj (lr_row, lr_col) once, where a path needs them */
static inline __attribute__((always_inline)) void lr_factors(const lm_lowrank *lr, size_t i, size_t j, double *rowbuf,
                                                             double *colbuf, const double **Bs, const double **Aj)
{
    if (*Bs == NULL) {
        *Bs = lr_row(lr, i, rowbuf);
        *Aj = lr_col(lr, j, colbuf);
    }
}

LR_FMA_CLONES uint32_t lm_lowrank_fallback_1(const lm_lowrank *lr, size_t i, size_t j, float w,
                               lm_kdtype out_dtype, lm_lowrank_stats *st)
{
    const size_t K = lr->K;
    double colbuf[LR_COLBUF], rowbuf[LR_COLBUF];
    /* when the f32 copies are the factors' values (b_f32, a_f32: what lr_row and lr_col would
     * convert), level 2 reads them in place, as the vector code has just read them; the copies in
     * f64 (lr_factors) are made for the rarer paths only: filled by scalar stores and read back
     * as vectors, they stalled the loads (store forwarding) and took half of a recomputation */
    const int direct = lr->b_f32 && lr->a_f32 && K <= LR_COLBUF;
    size_t as = 0;
    const float *bf = direct ? lr->Bf + i * K : NULL, *af = direct ? lm_lr_panel(lr, j, 1, &as) : NULL;
    const double *Bs = NULL, *Aj = NULL;
    uint32_t bits;
    /* the level-1 bound factors of the element's path, which the vector code has just read (in
     * cache): both finite say (prepare) that no factor of row i or column j is NaN or infinite
     * (row_nf, col_nf would be 0) and that bnd_rd[i] is finite, which spares three cache misses
     * (row_nf, col_nf and bnd_rd are read by nothing else: in a large tensor they took 2/3 of the
     * time of a recomputation) */
    const int fin = out_dtype == LM_KDT_F32 ? lr->bnd_rd[i] < INFINITY && lr->bnd_cd[j] < INFINITY
                                            : lr->bnd_rf[i] < INFINITY && lr->bnd_cf[j] < INFINITY;
    if (!isfinite(w) || (!fin && (lr->row_nf[i] || lr->col_nf[j]))) { /* the IEEE evaluation: +-inf or NaN */
        lr_factors(lr, i, j, rowbuf, colbuf, &Bs, &Aj);
        double d = 0;
        for (size_t k = 0; k < K; k++)
            d = fma(Bs[k], Aj[k], d);
        st->n_nonfinite++;
        return lr_round_f64((double)w + d, out_dtype);
    }
    if (fin || lr->bnd_rd[i] < INFINITY) { /* every fl64(s_k B_ik) normal or zero: level 2 */
        double dd, SS;
        if (direct) {
            lr_level2_sums(1, bf, af, as, NULL, NULL, K, &dd, &SS);
        } else {
            lr_factors(lr, i, j, rowbuf, colbuf, &Bs, &Aj);
            lr_level2_sums(0, NULL, NULL, 0, Bs, Aj, K, &dd, &SS);
        }
        if (SS == 0) {
            lr_factors(lr, i, j, rowbuf, colbuf, &Bs, &Aj);
            if (lr_all_terms_zero(lr, i, Aj)) { /* the delta is exactly zero: W, rounded */
                bits = lr_round_f64((double)w, out_dtype);
                goto done;
            }
        }
        const double r = (double)w + dd;
        double e = fma((double)(lr_depth4(K) + 2) * 0x1p-53, SS, LM_LR_C0D);
        e = fma(fabs(r), LM_LR_CRD, e);
        const double lo = r - e, hi = r + e;
        if (!isnan(lo) && !isnan(hi)) {
            if (out_dtype == LM_KDT_BF16) { /* the f32 roundings' bits first (Level 2 above) */
                const uint32_t tl = lm_f32_bits((float)lo) + 0x8000u, th = lm_f32_bits((float)hi) + 0x8000u;
                if (((tl ^ th) >> 16) == 0 && (tl & 0xFFFFu) != 0 && (th & 0xFFFFu) != 0 &&
                    (tl & 0x7F800000u) != 0x7F800000u)
                    return tl >> 16;
            }
            bits = lr_round_f64(lo, out_dtype);
            if (bits == lr_round_f64(hi, out_dtype) && lm_lr_finite_bits(bits, out_dtype))
                return bits;
        }
        lr_factors(lr, i, j, rowbuf, colbuf, &Bs, &Aj);
        if (isfinite(r) && lr_level2_exact(lr, Bs, Aj, w, SS)) {
            bits = lr_round_f64(r, out_dtype);
            goto done;
        }
    } else {
        lr_factors(lr, i, j, rowbuf, colbuf, &Bs, &Aj);
        if (lr_all_terms_zero(lr, i, Aj)) {
            bits = lr_round_f64((double)w, out_dtype);
            goto done;
        }
    }
    st->n_exact++;
    bits = lr_exact(lr, i, Aj, w, out_dtype);
done:
    if (!lm_lr_finite_bits(bits, out_dtype))
        st->n_overflow++;
    return bits;
}
void lm_lowrank_patch(const lm_lowrank *lr, size_t i, size_t j, const float *w, uint32_t lanes,
                      void *out, lm_kdtype out_dtype, lm_lowrank_stats *st)
{
    while (lanes) {
        const unsigned l = (unsigned)__builtin_ctz(lanes);
        lanes &= lanes - 1;
        st->n_recomputed++;
        const uint32_t bits = lm_lowrank_fallback_1(lr, i, j + l, w[l], out_dtype, st);
        if (out_dtype == LM_KDT_F32)
            memcpy((char *)out + 4 * (size_t)l, &bits, 4);
        else {
            const uint16_t h = (uint16_t)bits;
            memcpy((char *)out + 2 * (size_t)l, &h, 2);
        }
    }
}
