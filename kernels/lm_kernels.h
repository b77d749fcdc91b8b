/* SPDX-License-Identifier: MIT */
/* lm_kernels.h : the numeric kernels (f16/bf16/f64 <-> f32 conversion, acc += s*x) as a table of
 * function pointers, plus the CPU probe that fills it.  Each kernel has a scalar _ref variant
 * (kernels/convert_ref.c), which defines the semantics, and SIMD variants that match it bit for
 * bit.  Kernels never allocate, never fail, and accept any alignment and any n (0 included).
 * This header includes nothing from src/. */
#ifndef LM_KERNELS_H
#define LM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Numeric contract (all variants, bit for bit; no FTZ/DAZ, subnormals are kept everywhere):
 *  bf16 -> f32 : exact (bits << 16; NaNs pass through unchanged, signalling ones included).
 *  f32 -> bf16 : round to nearest, ties to even; overflow -> inf; NaN -> (bits >> 16) | 0x0040,
 *                i.e. quiet, sign and the top 6 payload bits kept.
 *  f16 -> f32  : exact, subnormals included; NaN -> quiet NaN (payload << 13 | 0x00400000,
 *                sign kept), which is what F16C's vcvtph2ps produces.
 *  f32 -> f16  : round to nearest, ties to even, also for results in the f16 subnormal range;
 *                |x| >= 65520 -> inf; NaN -> sign | 0x7e00 | top 9 payload bits (quiet).
 *  f64 -> f32  : the C cast under the default rounding mode (RNE; NaN quieted, top payload kept).
 *  f32 -> f64  : exact.
 *  axpy        : acc[i] = acc[i] + (s * x[i]) with the product rounded to f32 first (no FMA);
 *                a NaN result is always LM_AXPY_NAN.  Why: when two NaNs meet, x86 returns the
 *                first operand's, and compilers order the operands of + and * as they like
 *                (gcc -O1 and -O2 differ), so payloads would not be reproducible otherwise. */
#define LM_AXPY_NAN 0x7FC00000u /* the default quiet NaN, positive */

/* ---- correctly rounded low-rank update of a row tile (kernels/lowrank_*.c) ----------------------
 *
 *   out[i][j] = RNE_out( W[i][j] + sum_k s_k * B[row0+i][k] * A[k][j] )
 *
 * where the sum is the EXACT real value of the expression (W, s, B, A taken as the exact values
 * of their floating-point representations), rounded once to the output dtype, ties to even.
 * Several adapters' terms are concatenated along k, each with its own scale s_k.  The inputs are
 * prepared once per tensor by lm_lowrank_prepare() (f32 and f64 copies with s folded into B,
 * plus per-row and per-column error-bound factors), then any number of row tiles are processed
 * by the kernel, from any number of threads (lm_lowrank is read-only after preparation).
 *
 * How (the proof is in lowrank_exact.c):
 *  1. fast path, vectorised: bf16/f16 outputs accumulate d = sum_k fl32(s_k B_ik) A_kj in f32 with
 *     FMAs in four interleaved chains (chain m takes k = m, m+4, ...; d = (c0 + c1) + (c2 + c3)),
 *     r = W + d in f32; f32 outputs accumulate in f64 (one chain, k ascending).  A rigorous bound e
 *     on |exact - r| (from the row norm of B and the column norm of A) gives an interval
 *     [r - e, r + e] (bf16 outputs: r -+ the row/column part of e, each end then moved outwards
 *     by one or two f32 ulps on its bits); when both ends round to the same finite output value,
 *     that value is the correctly rounded result (rounding is monotone) and is written.
 *  2. otherwise (typically 1e-5 to 1e-3 of the elements), scalar code shared by every variant
 *     recomputes the element in f64 with a tighter bound (sum_k |s_k B_ik A_kj| evaluated
 *     per element) and certifies it the same way;
 *  3. if that still straddles a rounding boundary (the exact value lies within about 2^-50
 *     relative of a midpoint, an exact midpoint, or an exact cancellation), the exact value is
 *     formed in a 6400-bit fixed-point accumulator (exact products of three doubles) and rounded.
 * So every variant writes the same bytes (the exact answer) and the same counters: level-1
 * decisions use identical f32/f64 operations in every variant, levels 2 and 3 are one function.
 *
 * Special values, all variants alike:
 *  - an exact result outside the output's finite range (f16: |v| >= 65520) is written as +-inf
 *    and counted in n_overflow: the caller must refuse the tensor (never write the tile);
 *  - any NaN or infinity among the inputs of an element (W, s_k, B_ik, A_kj for its k's): the
 *    result is the IEEE f64 evaluation W + sum_k fma(s_k B_ik, A_kj, .) (k ascending), i.e. +-inf
 *    or NaN; NaN is written as the canonical quiet NaN of the output dtype (f32 0x7FC00000, bf16
 *    0x7FC0, f16 0x7E00) whatever its payload; counted in n_nonfinite;
 *  - an exact zero: +0, except where every term s_k B_ik A_kj is zero (the delta is exactly
 *    zero), where the result is RNE_out(W) itself, so a -0 in the base stays -0;
 *  - subnormal inputs and results are exact like any other value (no FTZ/DAZ anywhere).
 * LM_LOWRANK_UNCERTIFIED (benchmark switch, "exactness off"): the plain fused f32 kernel, i.e.
 * out = RNE_out(fl32(W + d32)) for every element with no bound, no recomputation (f32 outputs
 * too); NaN results canonical as above, overflow still counted. */
typedef enum lm_kdtype { LM_KDT_F32 = 0, LM_KDT_BF16 = 1, LM_KDT_F16 = 2 } lm_kdtype;

#define LM_LOWRANK_MAX_K 65536u         /* terms per tensor (the error bounds assume K <= 2^20) */
#define LM_LOWRANK_UNCERTIFIED 1u       /* flags: exactness off (benchmark comparison only) */

typedef struct lm_lowrank {
    size_t rows, cols, K;
    const double *B;  /* [rows x K], B[i*K + k]  (borrowed: must outlive every kernel call); NULL
                         when prepared from f32 factors (lm_lowrank_prepare_f32: B32) */
    const double *A;  /* [K x cols], A[k*cols + j] (borrowed; from f32 factors: a copy in the
                         workspace when the f64 path needs it, else NULL) */
    const double *s;  /* [K] scales (borrowed) */
    const float *B32; /* lm_lowrank_prepare_f32: B [rows x K] in f32 (borrowed), else NULL */
    /* in the caller's workspace (lm_lowrank_prepare fills them; read-only afterwards): */
    double *Bs;       /* [rows x K] fl64(s_k * B_ik); from f32 factors made only for the f64 path
                         or K > 256 (the scalar code forms s_k * B_ik itself otherwise), else NULL */
    float *Bf;        /* [rows x K] fl32(Bs) */
    float *Af;        /* [K x cols] fl32(A) (from f32 factors: A itself, borrowed) */
    float *Afp;       /* Af again in panels of LM_LR_PANEL columns, each [K x 32] contiguous (full
                         panels only: the last cols % 32 columns are read from Af).  The vector
                         kernels stream one panel per row block; in Af a panel's K rows lie cols * 4
                         bytes apart, for power-of-two widths all in the same few L1 sets, and for
                         K = 256 over more 4 KiB pages than the TLB holds (lm_lr_panel) */
    double *At;       /* [cols x K] A transposed (the scalar fallback reads a column at a time), made
                         only when a column cannot come from the panels (A not exact in f32, or
                         K > 256); else NULL */
    uint8_t *row_nf;  /* [rows] 1 if some s_k or B_ik is NaN or infinite */
    uint8_t *col_nf;  /* [cols] 1 if some A_kj is NaN or infinite */
    int bs_exact;     /* 1 if every Bs[i,k] == s_k * B_ik exactly */
    int a_f32, b_f32; /* 1 if Af == A (every A_kj an f32 value), Bf == Bs: the scalar fallback then
                         reads column j of A from the panels and row i of B from Bf (in cache while
                         the vector path works there) instead of At and Bs (in a large tensor, a
                         cache miss each per recomputed element) */
    float *bnd_rf, *bnd_cf;  /* [rows], [cols]: f32 path, e_ij = fma(bnd_rf[i], bnd_cf[j], c0) */
    double *bnd_rd, *bnd_cd; /* [rows], [cols]: f64 path, same form; +inf: never certified */
} lm_lowrank;

#define LM_LR_PANEL 32

/* where columns j .. j + w - 1 (w <= 32, inside one panel when j < the panels' end) of Af's row 0
 * are, and *stride: the distance between rows k and k + 1 (floats) */
static inline const float *lm_lr_panel(const lm_lowrank *lr, size_t j, size_t w, size_t *stride)
{
    const size_t full = lr->cols / LM_LR_PANEL * LM_LR_PANEL;
    if (j + w <= full && j / LM_LR_PANEL == (j + w - 1) / LM_LR_PANEL) {
        *stride = LM_LR_PANEL;
        return lr->Afp + (j / LM_LR_PANEL) * lr->K * LM_LR_PANEL + j % LM_LR_PANEL;
    }
    *stride = lr->cols;
    return lr->Af + j;
}

typedef struct lm_lowrank_stats {
    uint64_t n_elems;       /* elements written */
    uint64_t n_recomputed;  /* not certified by the vector path: recomputed by scalar f64 code */
    uint64_t n_exact;       /* of those, rounded from the exact fixed-point value (level 3) */
    uint64_t n_overflow;    /* finite exact value beyond the output's range: written as +-inf */
    uint64_t n_nonfinite;   /* NaN or inf inputs (see above) */
    uint64_t n_changed;     /* w_dtype == out_dtype: elements whose output bits differ from W's
                               (counted in the store pass, so the caller needs no second pass over
                               the tile; right in place too); other dtype pairs: 0 */
} lm_lowrank_stats;

static inline void lm_lowrank_stats_add(lm_lowrank_stats *dst, const lm_lowrank_stats *src)
{
    dst->n_elems += src->n_elems;
    dst->n_recomputed += src->n_recomputed;
    dst->n_exact += src->n_exact;
    dst->n_overflow += src->n_overflow;
    dst->n_nonfinite += src->n_nonfinite;
    dst->n_changed += src->n_changed;
}

/* the tile kernel (slot lowrank of lm_kernels):
 *  lr: prepared factors; rows row0 .. row0+n_rows-1 of the tensor, all lr->cols columns.
 *  w: the base tile, w_dtype, row i at element offset i*ldw (ldw >= cols).
 *  out: the result, out_dtype, row i at i*ldo (ldo >= cols).  out may be w itself (same dtype
 *  and ld); no other overlap.  Any alignment.  flags: 0 or LM_LOWRANK_UNCERTIFIED.
 *  st: counters are ADDED to (so one struct can sum a tensor's tiles).  Never fails, never
 *  allocates (uses about 2 KiB of stack in the rare exact path). */
typedef void (*lm_lowrank_fn)(const lm_lowrank *lr, size_t row0, size_t n_rows, const void *w,
                              lm_kdtype w_dtype, size_t ldw, void *out, lm_kdtype out_dtype,
                              size_t ldo, unsigned flags, lm_lowrank_stats *st);

/* C[m, n] = beta * C + alpha * op(A) @ op(B), row-major, op = transpose when trans_* is set.  Every
 * element is acc = fmaf(a(i,p), b(p,j), acc) over p = 0 .. k-1 from acc = 0, then alpha * acc (one
 * rounding), then beta * C (beta 0: C is not read; beta 1: no product) plus that (one rounding):
 * a row's values depend on that row's inputs only, never on m, the blocking or the variant. */
typedef void (*lm_gemm_rows_fn)(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha,
                                const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C,
                                size_t ldc);

/* ---- block FP8 merged with a low-rank term, one block at a time (kernels/fp8_*.c) ---------------
 * A block of h x w E4M3FN codes q0 (row stride ldq) with the base's scale s0, and one low-rank
 * term; quant.c (lm_fp8_merge_block) runs the two passes with transformers' FineGrainedFP8 rule.
 *  fp8_merge:  x[i][j] = dq(q0[i][j]) * s0 (dq the code's exact value, NaN for 0x7F / 0xFF),
 *              and for r_lo <= i < r_hi that plus alpha * acc (acc the chain of fmaf over p of
 *              B[i][p] * A[p][j] from 0: gemm_rows with beta 1), each rounded once.  Fills L:
 *              amax (max |x| as bits, NaN above inf; amax_b: over the rows outside the term),
 *              same (every x == dq * s0), d2[k] (the f32 sum of (x - dq * s0)^2 over the
 *              columns j = k mod 16, row after row, columns in order); sum, e2, emax and n_diff
 *              zero.
 *  fp8_encode: s finite (so |x * s| <= 448.0001): the code of y = x * s rounded to nearest even
 *              into q (row stride ldo), and L's sum[k], e2[k], emax[k] over the same lanes, v
 *              the magnitude coded and e = (v with y's sign) - y (exact): sum += |e|, e2 += e * e,
 *              emax = max of |e|'s bits (the caller scales them: e / (s amax) is the error
 *              relative to the amax, e / s in x's units; inv and ramax are not used);
 *              n_diff: the codes that differ from q0's (q0 NULL: 0).  L's other fields untouched.
 *              c (NULL: none) flags the elements whose code the rule might give differently
 *              for the exact value (lm_fp8_cert) into c->flag, i * w + j ascending.
 * Every variant computes every value with the same f32 operations: the same bytes and numbers,
 * the same flags. */
typedef struct lm_fp8_term {
    const float *B; /* row i's factors at B + (i - r_lo) * ldb */
    const float *A; /* A[p * lda + j], p < K */
    size_t ldb, lda, K, r_lo, r_hi;
    float alpha;
} lm_fp8_term;

typedef struct lm_fp8_lanes {
    float d2[16], sum[16], e2[16];
    uint32_t emax[16];
    uint32_t amax, amax_b; /* max |x| as bits: every row; the rows outside r_lo .. r_hi (their x exact) */
    int same;
    uint64_t n_diff;
} lm_fp8_lanes;

/* The certification of fp8_encode (quant.c's lm_fp8_merge_block has the proof).  Row i of the
 * block with erow[i] > 0 is checked: with y = x * s (f32), a its magnitude's bits, af = |y| and
 * e = |v - y| (v the value coded, y's sign), an element is flagged when a >= thr (it may hold
 * the block's amax); when a >= 0x3C800000 (|y| >= 2^-6) and the bits of fl(e + M) are at
 * least (a & 0x7F800000) - 0x020002C0, the bits of h - 22 ulp(y) (h = 2^-4 2^E, half the grid
 * step of y's binade [2^E, 2^(E+1)), ulp(y) = 2^(E-23)): y within the row's margin M =
 * lm_fp8_margin(Ers) of the nearest rounding midpoint; below, when fminf(2^-10 - |af - r|, af) <=
 * fmaf(af, 2^-19, Ers), r = (af + 2^14) - 2^14 (E4M3's subnormal grid, and zero's sign).  Per
 * checked row, Ers = erow[i] * s * 1.0001f + 2^-140 (f32).  erow[i] == 0: the row is not checked
 * (its x are exact). */
typedef struct lm_fp8_cert {
    const float *erow; /* h values */
    uint32_t thr;      /* 0xFFFFFFFF: no element is an amax candidate */
    uint32_t *flag;    /* room for h * w */
    size_t n_flag;     /* out */
} lm_fp8_cert;

/* lm_fp8_cert's margin for a row's Ers: Ers itself when Ers <= 2^-12 (then Ers + 11 ulp(y) is
 * below a quarter step of every binade from 2^-6 up: the midpoint that ends the binade below is
 * out of reach), else 2 Ers (quant.c's proof, (a)) */
static inline float lm_fp8_margin(float ers)
{
    return ers <= 0x1p-12f ? ers : ers + ers;
}

typedef void (*lm_fp8_merge_fn)(const uint8_t *q0, size_t ldq, float s0, size_t h, size_t w, const lm_fp8_term *t,
                                float *x, size_t ldx, lm_fp8_lanes *L);
typedef void (*lm_fp8_encode_fn)(const float *x, size_t ldx, size_t h, size_t w, float s, float inv, float ramax,
                                 const uint8_t *q0, size_t ldq, uint8_t *q, size_t ldo, lm_fp8_lanes *L,
                                 lm_fp8_cert *c);
/* the certified rotation's row (slot rot_cert; kernels/rotcert_ref.c): dn [n_rot, bs] the rows'
 * norms of D = R - I (rounded up), f BOFT's row factor when scaled, out bf16 or f16 */
typedef struct lm_rotcert {
    const float *dn;
    size_t n_rot, bs;
    float f;
    int scaled;
    lm_kdtype out;
} lm_rotcert;

/* a row block of the certified LoHa merge (slot loha_cert; kernels/lohacert_ref.c, the bound's
 * proof in src/methods/loha.c): Ap[j] the factor A_j [r, cols] in panels of LM_LOHA_PANEL columns,
 * each [r, LM_LOHA_PANEL] contiguous, the last one padded with zeros (A_j[p][c] at Ap[j][(c / P)
 * r P + p P + c % P]); cc [cols] the columns' bound factors; s the f32 scale; in the input rows'
 * dtype (f32, bf16 or f16: converted exactly as they are read); out bf16 or f16; count (in == out
 * only): the elements whose stored bits differ from the input's are counted */
#define LM_LOHA_PANEL 32
typedef struct lm_lohacert {
    const float *Ap[2];
    const float *cc;
    size_t r, cols;
    float s;
    lm_kdtype in, out;
    int count;
} lm_lohacert;

/* a certified DoRA row's constants (slot dora_cert; kernels/doracert_ref.c, exec_dora.c's proof):
 * F the row's factor, E a bound of every element's e_j, eF, A0, A1, A2 the terms of e_j */
typedef struct lm_dora_cert {
    double F, E, eF, A0, A1, A2;
} lm_dora_cert;

/* an output format as dora_cert rounds to it: s = 52 - mantissa bits, obits its width, subscale
 * 1 / its subnormal quantum, bias (its exponent rebased from f64's) << mantissa bits, rmin / rinf
 * the rounded f64 bits of its smallest normal value / of infinity, amin the f64 bits of the
 * smallest normal value, oinf its infinity's bits */
typedef struct lm_dora_fmt {
    int s, obits;
    double subscale;
    uint64_t bias, rmin, rinf, amin, oinf;
} lm_dora_fmt;
extern const lm_dora_fmt lm_dora_fmts[3];

typedef struct lm_kernels {
    void (*bf16_to_f32)(const uint16_t *src, float *dst, size_t n);
    void (*f32_to_bf16)(const float *src, uint16_t *dst, size_t n);
    void (*f16_to_f32)(const uint16_t *src, float *dst, size_t n);
    void (*f32_to_f16)(const float *src, uint16_t *dst, size_t n);
    void (*axpy)(float *acc, float s, const float *x, size_t n);
    void (*f64_to_f32)(const double *src, float *dst, size_t n);
    void (*f32_to_f64)(const float *src, double *dst, size_t n);
    double (*sumsq)(const float *x, size_t n); /* sum of x[i]^2 in double, 16 lanes (reduce_ref.c) */
    size_t (*count_nonfinite_f32)(const float *x, size_t n);                 /* inf and NaN */
    size_t (*count_nonfinite_16)(const uint16_t *x, size_t n, uint16_t exp_mask); /* exponent all ones */
    lm_lowrank_fn lowrank;
    /* every row of acc [n_rows, cols] becomes x @ blockdiag(R_j)^T; RT: the blocks transposed,
     * [n_rot, bs, bs] with n_rot 1 (shared) or cols/bs; y: scratch of 8 bs floats (rotate_ref.c) */
    void (*rot_blocks)(float *acc, size_t n_rows, size_t cols, const float *RT, size_t n_rot, size_t bs, float *y);
    /* the same from src into dst (src == dst: rot_blocks) */
    void (*rot_blocks_to)(const float *src, float *dst, size_t n_rows, size_t cols, const float *RT, size_t n_rot,
                          size_t bs, float *y);
    /* C = beta C + alpha op(A) op(B), row-major, row-independent (gemm_rows_ref.c) */
    lm_gemm_rows_fn gemm_rows;
    size_t (*count_diff_16)(const uint16_t *a, const uint16_t *b, size_t n); /* i with a[i] != b[i] */
    size_t (*count_diff_32)(const uint32_t *a, const uint32_t *b, size_t n);
    /* f64 values rounded once to out (lm_f64_round_ref, kernels/round64.c) */
    void (*f64_round)(const double *src, void *dst, lm_kdtype out, size_t n);
    /* each row x of X [nr, cols] (f64) becomes x - ((x U^T) T) U; U [r, cols], T [r, r];
     * scratch: 2 nr r doubles (lm_wy64_ref, kernels/wy64_ref.c) */
    void (*wy64)(double *X, size_t nr, size_t cols, const double *U, size_t r, const double *T, double *scratch);
    /* rb rows of n columns: X = w + s R C (w f32, or X itself when w is NULL), the sums in f64 by
     * fma chains; C in panels of LM_LR64_PANEL columns; ssx, ssw (each NULL or rb doubles): the
     * rows' sums of squares of X and of w, in fixed lanes (lm_lr64_ref, kernels/lr64_ref.c) */
    void (*lr64)(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb, size_t n,
                 double *ssx, double *ssw);
    lm_fp8_merge_fn fp8_merge;   /* block FP8 (above); NULL: quant.c's own block functions */
    lm_fp8_encode_fn fp8_encode;
    /* one row of the certified rotation: x the input, v = D x (cols floats), e: cols floats, left
     * holding the block terms dn_a xn; dst the output bits, unc 1 where not certified; @return any unc (rotcert_ref.c) */
    unsigned (*rot_cert)(const float *x, const float *v, size_t cols, const lm_rotcert *rc, float *e, uint16_t *dst,
                         uint8_t *unc);
    /* a certified DoRA row: y = v F rounded once to out (dst: n elements of out) where the row's
     * bound certifies it; base (or NULL): the base row in out, *n_changed = the elements written
     * that differ from it; @return the elements it does not certify (doracert_ref.c) */
    size_t (*dora_cert)(const double *v, const float *w, const double *kap, size_t n, const lm_dora_cert *c,
                        lm_kdtype out, void *dst, const void *base, size_t *n_changed);
    /* nr rows of the certified LoHa merge: x [nr, cols] the input rows (lc->in), B1, B2 [nr, r] the
     * rows' factors, R [nr] the rows' bound factors; dst [nr, cols] the output bits, unc [nr, (cols
     * + 15) / 16] bit c % 16 of word c / 16 set where column c is not certified; *n_changed += the
     * elements counted (lc->count); @return any unc (lohacert_ref.c) */
    unsigned (*loha_cert)(const void *x, size_t nr, const float *B1, const float *B2, const float *R,
                          const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, uint64_t *n_changed);
    const char *name; /* "ref", "avx2", "avx512"; static storage */
} lm_kernels;

/*! lm_kernels_select() :
 *  Fills k with the _ref functions, then overrides them with the best variant this CPU supports.
 *  force: NULL or "auto" (automatic, but a non-empty environment variable LM_KERNELS=ref|avx2|
 *  avx512 is then taken as if passed here), "ref", "avx2" or "avx512".
 *  @return 0, or -1 if the requested variant is unknown or this CPU cannot run it; k then holds
 *  the ref variant (so it is always usable).  No global state: k is the only thing written. */
int lm_kernels_select(lm_kernels *k, const char *force);

/*! lm_cpu_has_avx2_f16c() : 1 if the CPU and OS support AVX2, F16C and FMA, else 0. */
int lm_cpu_has_avx2_f16c(void);
/*! lm_cpu_has_avx512() : 1 if AVX-512 F, BW, VL and DQ are usable (plus F16C and FMA), else 0. */
int lm_cpu_has_avx512(void);
/*! lm_cpu_name() : the CPU model name ("model name" in /proc/cpuinfo, else the cpuid brand
 *  string, else "unknown") into buf, NUL-terminated when cap > 0.  @return buf. */
const char *lm_cpu_name(char *buf, size_t cap);

/* ---- variants (kernels/convert_<variant>.c) ------------------------------------------------ */
void lm_bf16_to_f32_ref(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_bf16_ref(const float *src, uint16_t *dst, size_t n);
void lm_f16_to_f32_ref(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_f16_ref(const float *src, uint16_t *dst, size_t n);
void lm_axpy_ref(float *acc, float s, const float *x, size_t n);
void lm_f64_to_f32_ref(const double *src, float *dst, size_t n);
void lm_f32_to_f64_ref(const float *src, double *dst, size_t n);

void lm_bf16_to_f32_avx2(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_bf16_avx2(const float *src, uint16_t *dst, size_t n);
void lm_f16_to_f32_avx2(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_f16_avx2(const float *src, uint16_t *dst, size_t n);
void lm_axpy_avx2(float *acc, float s, const float *x, size_t n);
void lm_f64_to_f32_avx2(const double *src, float *dst, size_t n);
void lm_f32_to_f64_avx2(const float *src, double *dst, size_t n);

void lm_bf16_to_f32_avx512(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_bf16_avx512(const float *src, uint16_t *dst, size_t n);
void lm_f16_to_f32_avx512(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_f16_avx512(const float *src, uint16_t *dst, size_t n);
void lm_axpy_avx512(float *acc, float s, const float *x, size_t n);
void lm_f64_to_f32_avx512(const double *src, float *dst, size_t n);
void lm_f32_to_f64_avx512(const float *src, double *dst, size_t n);

size_t lm_count_nonfinite_f32_ref(const float *x, size_t n);
size_t lm_count_nonfinite_f32_avx2(const float *x, size_t n);
size_t lm_count_nonfinite_f32_avx512(const float *x, size_t n);
size_t lm_count_nonfinite_16_ref(const uint16_t *x, size_t n, uint16_t exp_mask);
size_t lm_count_nonfinite_16_avx2(const uint16_t *x, size_t n, uint16_t exp_mask);
size_t lm_count_nonfinite_16_avx512(const uint16_t *x, size_t n, uint16_t exp_mask);
void lm_rot_blocks_ref(float *acc, size_t n_rows, size_t cols, const float *RT, size_t n_rot, size_t bs, float *y);
void lm_rot_blocks_avx2(float *acc, size_t n_rows, size_t cols, const float *RT, size_t n_rot, size_t bs, float *y);
void lm_rot_blocks_avx512(float *acc, size_t n_rows, size_t cols, const float *RT, size_t n_rot, size_t bs, float *y);
void lm_rot_blocks_to_ref(const float *src, float *dst, size_t n_rows, size_t cols, const float *RT, size_t n_rot,
                          size_t bs, float *y);
void lm_rot_blocks_to_avx2(const float *src, float *dst, size_t n_rows, size_t cols, const float *RT, size_t n_rot,
                           size_t bs, float *y);
void lm_rot_blocks_to_avx512(const float *src, float *dst, size_t n_rows, size_t cols, const float *RT, size_t n_rot,
                             size_t bs, float *y);
void lm_rot_lanes8x8_avx2(const float *x, size_t cols, const float *R, size_t bs, size_t a0, float *y, size_t ys);
void lm_rot_lanes8x1_avx2(const float *x, const float *R, size_t bs, size_t a0, float *y);
void lm_rot_block_lanes_ref(const float *x, const float *RT, size_t bs, size_t a0, size_t a1, float *y);
void lm_gemm_rows_ref(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha, const float *A,
                      size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc);
void lm_gemm_rows_avx2(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha, const float *A,
                       size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc);
void lm_gemm_rows_avx512(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha, const float *A,
                         size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc);
size_t lm_count_diff_16_ref(const uint16_t *a, const uint16_t *b, size_t n);
size_t lm_count_diff_16_avx2(const uint16_t *a, const uint16_t *b, size_t n);
size_t lm_count_diff_16_avx512(const uint16_t *a, const uint16_t *b, size_t n);
size_t lm_count_diff_32_ref(const uint32_t *a, const uint32_t *b, size_t n);
size_t lm_count_diff_32_avx2(const uint32_t *a, const uint32_t *b, size_t n);
size_t lm_count_diff_32_avx512(const uint32_t *a, const uint32_t *b, size_t n);
double lm_sumsq_ref(const float *x, size_t n);
double lm_sumsq_avx2(const float *x, size_t n);
double lm_sumsq_avx512(const float *x, size_t n);
/* the reference's pieces the variants share: the tail into the lanes, and the lanes' sum */
void lm_sumsq_ref_tail(const float *x, size_t n, double *lanes);
double lm_sumsq_lanes(const double *lanes);
float lm_fp8_code_value(uint8_t c); /* the exact value of an E4M3FN code (NaN for 0x7F / 0xFF) */
/* fp8_ref.c's element steps, also the AVX2 variant's column tails: the code of y (|y| <= 464) and the
 * magnitude it codes; whether |y|'s bits a (e = |v - y|) need the exact value (lm_fp8_cert) */
unsigned lm_fp8_encode1(float y, float *v);
int lm_fp8_flagged1(uint32_t a, float e, float ers, uint32_t thr);
void lm_fp8_merge_ref(const uint8_t *q0, size_t ldq, float s0, size_t h, size_t w, const lm_fp8_term *t, float *x,
                      size_t ldx, lm_fp8_lanes *L);
void lm_fp8_encode_ref(const float *x, size_t ldx, size_t h, size_t w, float s, float inv, float ramax,
                       const uint8_t *q0, size_t ldq, uint8_t *q, size_t ldo, lm_fp8_lanes *L, lm_fp8_cert *c);
void lm_fp8_merge_avx2(const uint8_t *q0, size_t ldq, float s0, size_t h, size_t w, const lm_fp8_term *t, float *x,
                       size_t ldx, lm_fp8_lanes *L);
void lm_fp8_encode_avx2(const float *x, size_t ldx, size_t h, size_t w, float s, float inv, float ramax,
                        const uint8_t *q0, size_t ldq, uint8_t *q, size_t ldo, lm_fp8_lanes *L, lm_fp8_cert *c);
void lm_fp8_merge_avx512(const uint8_t *q0, size_t ldq, float s0, size_t h, size_t w, const lm_fp8_term *t, float *x,
                         size_t ldx, lm_fp8_lanes *L);
void lm_fp8_encode_avx512(const float *x, size_t ldx, size_t h, size_t w, float s, float inv, float ramax,
                          const uint8_t *q0, size_t ldq, uint8_t *q, size_t ldo, lm_fp8_lanes *L, lm_fp8_cert *c);
/* ---- low-rank kernel: preparation, variants, shared scalar code (kernels/lowrank_*.c) ------- */
/*! lm_lowrank_ws_bytes() :
 *  @return the workspace lm_lowrank_prepare() needs for these sizes (64-byte aligned inside),
 *  or 0 if K > LM_LOWRANK_MAX_K or the size overflows. */
size_t lm_lowrank_ws_bytes(size_t rows, size_t cols, size_t K);
/*! lm_lowrank_prepare() :
 *  Fills *lr for B [rows x K], A [K x cols] and s [K] (all f64, contiguous, borrowed: they must
 *  stay valid and unchanged while lr is used), using ws (ws_bytes >= lm_lowrank_ws_bytes()).
 *  Any values are accepted (NaN, inf, subnormals, zeros); rows or columns whose f32/f64 copies
 *  would not meet the documented relative error (underflow, overflow, non-finite) simply never
 *  take the fast path.  Cost O((rows + cols) * K).  Single-threaded, no allocation.
 *  @return 0, or -1 (ws too small, K too large, sizes overflow): lr is then unusable. */
int lm_lowrank_prepare(lm_lowrank *lr, size_t rows, size_t cols, size_t K, const double *B,
                       const double *A, const double *s, void *ws, size_t ws_bytes);
/*! lm_lowrank_ws_bytes_f32(), lm_lowrank_prepare_f32() :
 *  The same for factors that are f32 values (B [rows x K], A [K x cols], contiguous, borrowed),
 *  without f64 copies of them: the results are those lm_lowrank_prepare() gives for the same
 *  values in f64, bit for bit.  f64_path: 1 if the kernel will be called for f32 outputs with the
 *  exactness on (the f64 path then needs Bs and A in f64, made in ws), else 0. */
size_t lm_lowrank_ws_bytes_f32(size_t rows, size_t cols, size_t K, int f64_path);
int lm_lowrank_prepare_f32(lm_lowrank *lr, size_t rows, size_t cols, size_t K, const float *B, const float *A,
                           const double *s, int f64_path, void *ws, size_t ws_bytes);
/*! lm_lowrank_ws_bytes_uncertified(), lm_lowrank_prepare_uncertified() :
 *  For LM_LOWRANK_UNCERTIFIED only (the benchmark's exactness off): Bf, Af and the panels, the
 *  same bits as the two above make them, and no bound factors, non-finite flags, Bs or At (left
 *  NULL), so lr must never be used without that flag (nor by lm_lowrank_fallback_1).  The factors
 *  are B and A in f64 (B32 and A32 NULL), or B32 and A32, f32 values (B and A NULL; src32 = 1).
 *  @return as lm_lowrank_ws_bytes() and lm_lowrank_prepare(). */
size_t lm_lowrank_ws_bytes_uncertified(size_t rows, size_t cols, size_t K, int src32);
int lm_lowrank_prepare_uncertified(lm_lowrank *lr, size_t rows, size_t cols, size_t K, const double *B,
                                   const double *A, const float *B32, const float *A32, const double *s, void *ws,
                                   size_t ws_bytes);
/*! lm_lowrank_fallback_1() :
 *  Levels 2 and 3 for element (i, j) of the tensor with base value w (exact in f32): the
 *  correctly rounded result as out_dtype bits (low 16 bits for bf16/f16).  Updates st's
 *  n_exact, n_overflow, n_nonfinite (not n_elems / n_recomputed: the caller counts those).
 *  Shared by every variant, so uncertified elements get identical bytes everywhere. */
uint32_t lm_lowrank_fallback_1(const lm_lowrank *lr, size_t i, size_t j, float w,
                               lm_kdtype out_dtype, lm_lowrank_stats *st);
/*! lm_lowrank_patch() :
 *  Recomputes the elements (i, j + l) for every bit l set in `lanes` (l < 32) with
 *  lm_lowrank_fallback_1(), base values w[l], and stores them at out (the element (i, j) of the
 *  output, dtype out_dtype); counts them in n_recomputed.  The SIMD variants' cold path. */
void lm_lowrank_patch(const lm_lowrank *lr, size_t i, size_t j, const float *w, uint32_t lanes,
                      void *out, lm_kdtype out_dtype, lm_lowrank_stats *st);
/*! lm_lowrank_row_ref() :
 *  The reference computation (levels 1 to 3) of the elements j0 .. j1-1 of tensor row i; w_row
 *  and out_row point at that row's element 0.  The SIMD variants use it for column tails. */
void lm_lowrank_row_ref(const lm_lowrank *lr, size_t i, size_t j0, size_t j1, const void *w_row,
                        lm_kdtype w_dtype, void *out_row, lm_kdtype out_dtype, unsigned flags,
                        lm_lowrank_stats *st);
void lm_lowrank_ref(const lm_lowrank *lr, size_t row0, size_t n_rows, const void *w,
                    lm_kdtype w_dtype, size_t ldw, void *out, lm_kdtype out_dtype, size_t ldo,
                    unsigned flags, lm_lowrank_stats *st);
void lm_lowrank_avx2(const lm_lowrank *lr, size_t row0, size_t n_rows, const void *w,
                     lm_kdtype w_dtype, size_t ldw, void *out, lm_kdtype out_dtype, size_t ldo,
                     unsigned flags, lm_lowrank_stats *st);
void lm_lowrank_avx512(const lm_lowrank *lr, size_t row0, size_t n_rows, const void *w,
                       lm_kdtype w_dtype, size_t ldw, void *out, lm_kdtype out_dtype, size_t ldo,
                       unsigned flags, lm_lowrank_stats *st);

/* the constants every variant's level-1 bound uses (see lowrank_exact.c for the proof) */
#define LM_LR_C0F 0x1p-125f  /* f32 path: absolute term of e (normal, covers underflow) */
#define LM_LR_CRF 0x1p-22f   /* f32 path, f16 outputs: coefficient of |r| in e (4u) */
/* f32 path, bf16 outputs: the interval's ends widened on their bits instead of by a |r| term (see
 * (g) in lowrank_exact.c): the end nearer zero by 2 ulps, the other by 1, then + 2^15 to put the
 * bf16 rounding boundaries on the top halves; the nearer end's offset has one more to make its
 * test strict (an end on a midpoint is not certified) */
#define LM_LR_BF16_NEAR 0x7FFDu /* 0x8000 - 2 - 1 */
#define LM_LR_BF16_FAR 0x8001u  /* 0x8000 + 1 */
#define LM_LR_BF16_QMAX 0x7F80u /* certified magnitudes are below it: finite, the end nearer zero >= 0 */
#define LM_LR_C0D 0x1p-1020  /* f64 path */
#define LM_LR_CRD 0x1p-51    /* f64 path (4u) */
/* level 1 certifies an element only if |r| < LM_LR_RMAX_<out>: then equal roundings of lo and hi
 * are finite (see (f) in lowrank_exact.c) */
#define LM_LR_RMAX_F32 0x1p127f   /* bf16 and f32 outputs */
#define LM_LR_RMAX_F16 65504.0f
/* canonical NaN of each output dtype */
#define LM_LR_NAN_F32 0x7FC00000u
#define LM_LR_NAN_BF16 0x7FC0u
#define LM_LR_NAN_F16 0x7E00u

static inline uint32_t lm_lr_nan_bits(lm_kdtype t)
{
    return t == LM_KDT_BF16 ? LM_LR_NAN_BF16 : t == LM_KDT_F16 ? LM_LR_NAN_F16 : LM_LR_NAN_F32;
}

/* 1 if the output bits are a finite value (not inf, not NaN) */
static inline int lm_lr_finite_bits(uint32_t b, lm_kdtype t)
{
    switch (t) {
    case LM_KDT_BF16: return (b & 0x7F80u) != 0x7F80u;
    case LM_KDT_F16: return (b & 0x7C00u) != 0x7C00u;
    default: return (b & 0x7F800000u) != 0x7F800000u;
    }
}

/* ---- single values: the reference semantics, pure integer bit manipulation ---------------- */
/* type punning through a union is defined in C11 (and keeps this header free of <string.h>) */
static inline uint32_t lm_f32_bits(float f)
{
    const union { float f; uint32_t u; } v = {.f = f};
    return v.u;
}

static inline float lm_f32_from_bits(uint32_t u)
{
    const union { uint32_t u; float f; } v = {.u = u};
    return v.f;
}

static inline float lm_bf16_to_f32_1(uint16_t h)
{
    return lm_f32_from_bits((uint32_t)h << 16);
}

static inline uint16_t lm_f32_to_bf16_1(float f)
{
    const uint32_t u = lm_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) /* NaN: keep sign and top payload, force quiet */
        return (uint16_t)((u >> 16) | 0x0040u);
    /* RNE: add just under half an ulp, plus one more when the kept lsb is odd; a carry out of
     * the mantissa bumps the exponent, which is also how max finite rounds to inf */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float lm_f16_to_f32_1(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    if (exp == 0x1F) /* inf, or NaN made quiet (as vcvtph2ps does) */
        return lm_f32_from_bits(sign | 0x7F800000u | (mant << 13) | (mant ? 0x00400000u : 0));
    if (exp != 0)
        return lm_f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13)); /* 112 = 127 - 15 */
    if (mant == 0)
        return lm_f32_from_bits(sign);
    /* subnormal: mant * 2^-24; normalise so the leading 1 lands on bit 10 */
    uint32_t e = 113; /* biased f32 exponent of 2^-14 */
    while (!(mant & 0x400u)) {
        mant <<= 1;
        e--;
    }
    return lm_f32_from_bits(sign | (e << 23) | ((mant & 0x3FFu) << 13));
}

static inline uint16_t lm_f32_to_f16_1(float f)
{
    const uint32_t u = lm_f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) /* NaN: top 9 payload bits, quiet bit forced */
        return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x1FFu));
    if (a >= 0x477FF000u) /* >= 65520 = halfway between 65504 and 2^16: inf (also inf itself) */
        return (uint16_t)(sign | 0x7C00u);
    if (a >= 0x38800000u) { /* >= 2^-14: normal result; rebias, then RNE on 13 dropped bits */
        const uint32_t r = a - (112u << 23);
        return (uint16_t)(sign | ((r + 0x0FFFu + ((r >> 13) & 1u)) >> 13));
    }
    if (a <= 0x33000000u) /* <= 2^-25: half the smallest subnormal or less, ties to even 0 */
        return sign;
    /* subnormal result m * 2^-24: a is a normal f32 here (a > 2^-25), value = mant * 2^(e-150),
     * so m = mant >> (126 - e) rounded to nearest even; m may round up to 0x400 = 2^-14 */
    const uint32_t e = a >> 23;
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e; /* 14 .. 24 */
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    uint32_t m = mant >> shift;
    if (rem > half || (rem == half && (m & 1u)))
        m++;
    return (uint16_t)(sign | m);
}

/* x rounded to f32 by round-to-odd: towards zero, with the last bit set when x is not an f32
 * value (NaN stays NaN; beyond FLT_MAX: FLT_MAX).  Rounding the result once more, RNE, to a format
 * of at most 22 significant bits is x rounded once to that format (round64.c) */
static inline float lm_f64_to_f32_odd_1(double x)
{
    const float f = (float)x; /* RNE */
    const double b = (double)f, ax = x < 0 ? -x : x, ab = b < 0 ? -b : b;
    uint32_t u = lm_f32_bits(f);
    u -= ab > ax;                   /* rounded away from zero: one step back (f != 0 here) */
    u |= (uint32_t)((b != x) & (x == x)); /* inexact: the sticky bit */
    return lm_f32_from_bits(u);
}

/* x rounded once (RNE) to bf16 (out LM_KDT_BF16) or f16, as bits; finite x beyond the format's
 * range gives inf (the caller refuses such a tensor) */
static inline uint16_t lm_f64_to_16_1(double x, lm_kdtype out)
{
    const float f = lm_f64_to_f32_odd_1(x);
    return out == LM_KDT_BF16 ? lm_f32_to_bf16_1(f) : lm_f32_to_f16_1(f);
}

/* lm_f64_round_<variant>() (slot f64_round) : n f64 values rounded once, RNE, to out (f32: the C
 *  cast; bf16/f16: lm_f64_to_16_1), into dst (n elements of out).  Subnormal results are exact
 *  roundings too; finite values beyond the range become inf, which the caller counts and refuses.
 *  kernels/round64*.c */
void lm_f64_round_ref(const double *src, void *dst, lm_kdtype out, size_t n);
void lm_f64_round_avx2(const double *src, void *dst, lm_kdtype out, size_t n);
void lm_f64_round_avx512(const double *src, void *dst, lm_kdtype out, size_t n);
/* kernels/wy64_*.c, and the reference's pieces the variants share */
void lm_wy64_ref(double *X, size_t nr, size_t cols, const double *U, size_t r, const double *T, double *scratch);
void lm_wy64_avx2(double *X, size_t nr, size_t cols, const double *U, size_t r, const double *T, double *scratch);
void lm_wy64_avx512(double *X, size_t nr, size_t cols, const double *U, size_t r, const double *T, double *scratch);
double lm_dot8_ref(const double *x, const double *u, size_t n);
double lm_dot8_lanes(const double *l);
void lm_wy64_mid(const double *p, size_t nr, size_t r, const double *T, double *p2);
#define LM_LR64_PANEL 32
void lm_lr64_ref(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb, size_t n,
                 double *ssx, double *ssw);
void lm_lr64_avx2(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb, size_t n,
                  double *ssx, double *ssw);
void lm_lr64_avx512(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb,
                    size_t n, double *ssx, double *ssw);
void lm_lr64_tail(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb,
                  size_t n);
void lm_lr64_tail_sumsq(const double *x, const float *w, size_t n, double *lx, double *lw);
double lm_lr64_sumsq8(const double *x, size_t n);
double lm_lr64_lanes8(const double *l);
void lm_wy64_update_ref(double *x, const double *U, size_t cols, size_t r, const double *p2, size_t j0, size_t j1);

/* kernels/doracert_*.c */
size_t lm_dora_cert_ref(const double *v, const float *w, const double *kap, size_t n, const lm_dora_cert *c,
                        lm_kdtype out, void *dst, const void *base, size_t *n_changed);
size_t lm_dora_cert_avx2(const double *v, const float *w, const double *kap, size_t n, const lm_dora_cert *c,
                         lm_kdtype out, void *dst, const void *base, size_t *n_changed);
size_t lm_dora_cert_avx512(const double *v, const float *w, const double *kap, size_t n, const lm_dora_cert *c,
                           lm_kdtype out, void *dst, const void *base, size_t *n_changed);
/* kernels/rotcert_*.c, and the reference's pieces the variants share */
unsigned lm_rot_cert_ref(const float *x, const float *v, size_t cols, const lm_rotcert *rc, float *e, uint16_t *dst,
                         uint8_t *unc);
unsigned lm_rot_cert_avx2(const float *x, const float *v, size_t cols, const lm_rotcert *rc, float *e, uint16_t *dst,
                          uint8_t *unc);
unsigned lm_rot_cert_avx512(const float *x, const float *v, size_t cols, const lm_rotcert *rc, float *e,
                            uint16_t *dst, uint8_t *unc);
void lm_rotcert_norms_ref(const float *x, size_t cols, const lm_rotcert *rc, float *e);
void lm_rotcert_norms_avx2(const float *x, size_t cols, const lm_rotcert *rc, float *e);
unsigned lm_rotcert_elems_ref(const float *x, const float *v, const float *e, size_t n, const lm_rotcert *rc,
                              uint16_t *dst, uint8_t *unc);

/* kernels/lohacert_*.c; the reference's columns c0 .. cols (c0 a multiple of 16), the variants' tails */
unsigned lm_loha_cert_ref(const void *x, size_t nr, const float *B1, const float *B2, const float *R,
                          const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, uint64_t *n_changed);
unsigned lm_loha_cert_avx2(const void *x, size_t nr, const float *B1, const float *B2, const float *R,
                           const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, uint64_t *n_changed);
unsigned lm_loha_cert_avx512(const void *x, size_t nr, const float *B1, const float *B2, const float *R,
                             const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, uint64_t *n_changed);
unsigned lm_loha_cert_cols_ref(const void *x, size_t nr, const float *B1, const float *B2, const float *R,
                               const lm_lohacert *lc, uint16_t *dst, uint16_t *unc, uint64_t *n_changed, size_t c0);
/* element e of x in lc->in, as f32 (exact) */
static inline float lm_loha_x(const void *x, lm_kdtype in, size_t e)
{
    return in == LM_KDT_F32    ? ((const float *)x)[e]
           : in == LM_KDT_BF16 ? lm_bf16_to_f32_1(((const uint16_t *)x)[e])
                               : lm_f16_to_f32_1(((const uint16_t *)x)[e]);
}
#ifdef __cplusplus
}
#endif
#endif
