/* SPDX-License-Identifier: MIT */
/* test_quant.c : quantized bases.  The codecs against the formats' definitions written here in
 * double precision (every code, the rounding ties, saturation, NaN, subnormals); merges into
 * generated quantized checkpoints (bench/gen_model --quant) checked by an independent reference
 * (tests/quant/quant_ref.py, numpy only; skipped visibly without /usr/bin/python3 + numpy):
 * dequantization, the merge in float64, the format's requantization rule, unchanged blocks kept
 * byte for byte; and the refusals (unknown quant_method, missing scale, bad scale shape/dtype). */
#include "plan.h"
#include "quant.h"
#include "th.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- FP8 E4M3FN from its definition ---------------------------------------------------------- */
static double e4m3_def(unsigned c)
{
    double s = (c & 0x80) ? -1.0 : 1.0;
    unsigned e = (c >> 3) & 15, m = c & 7;
    if (e == 15 && m == 7)
        return NAN;
    return e == 0 ? s * m * ldexp(1.0, -9) : s * (1.0 + m / 8.0) * ldexp(1.0, (int)e - 7);
}

/* the nearest finite code to x by brute force, ties to the even code, beyond 448 saturating */
static unsigned e4m3_nearest(double x)
{
    double a = fabs(x) > 448.0 ? 448.0 : fabs(x);
    unsigned best = 0;
    for (unsigned c = 1; c <= 0x7E; c++) {
        double d = fabs(e4m3_def(c) - a), db = fabs(e4m3_def(best) - a);
        if (d < db || (d == db && (c & 1) == 0))
            best = c;
    }
    return best | (signbit(x) ? 0x80u : 0u);
}

Test(quant, e4m3_every_code)
{
    for (unsigned c = 0; c < 256; c++) {
        double want = e4m3_def(c);
        float got = lm_fp8_e4m3_value((uint8_t)c);
        if (isnan(want)) {
            cr_assert(isnan(got), "code %#x: NaN expected", c);
            continue;
        }
        cr_assert_eq((double)got, want, "code %#x: %.9g, want %.9g", c, got, want);
        cr_assert_eq(!!signbit(got), !!signbit(want), "code %#x: sign", c);
        cr_assert_eq(lm_f32_to_fp8_e4m3(got), c, "code %#x does not encode back to itself", c);
    }
    cr_assert_eq(lm_fp8_e4m3_value(0x7E), 448.0f);
    cr_assert_eq(lm_fp8_e4m3_value(0x01), 0x1p-9f);
    cr_assert_eq(lm_fp8_e4m3_value(0x08), 0x1p-6f);
}

Test(quant, e4m3_rounding_edges)
{
    static const struct {
        float x;
        unsigned code;
    } cases[] = {
        {0x1p-10f, 0x00},         /* half the smallest subnormal: tie to even 0 */
        {0x1.8p-9f, 0x02},        /* 1.5 steps: tie to 2 */
        {0x1.0001p-10f, 0x01},    /* just above the tie */
        {1.0625f, 0x38},          /* 1 and 1.125: tie to 1 (even mantissa) */
        {1.1875f, 0x3A},          /* 1.125 and 1.25: tie to 1.25 */
        {0x1.Fp-7f, 0x08},        /* the largest subnormal 7 * 2^-9 and 2^-6: rounds up into the normals */
        {448.0f, 0x7E}, {464.0f, 0x7E}, {1e9f, 0x7E}, {INFINITY, 0x7E}, {-INFINITY, 0xFE}, /* saturation */
        {-0.0f, 0x80}, {-1e-30f, 0x80}, {0.0f, 0x00},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        cr_assert_eq(lm_f32_to_fp8_e4m3(cases[i].x), cases[i].code, "%a -> %#x, want %#x", (double)cases[i].x,
                     lm_f32_to_fp8_e4m3(cases[i].x), cases[i].code);
    cr_assert_eq(lm_f32_to_fp8_e4m3(NAN) & 0x7F, 0x7F);
    uint64_t rng = 12345;
    for (int k = 0; k < 20000; k++) { /* magnitudes from 2^-12 to 2^10 */
        double x = th_rand_uniform(&rng) * ldexp(1.0, (int)(th_rand_u64(&rng) % 23) - 12);
        float xf = (float)x;
        cr_assert_eq(lm_f32_to_fp8_e4m3(xf), e4m3_nearest(xf), "%a -> %#x, want %#x", (double)xf,
                     lm_f32_to_fp8_e4m3(xf), e4m3_nearest(xf));
    }
}

/* dequantize -> requantize of untouched blocks gives the same codes and scales; a changed block
 * gets amax / 448 */
Test(quant, fp8_block_round_trip)
{
    enum { R = 40, C = 24, BR = 16, BC = 16, SR = 3, SC = 2 };
    uint8_t q[R * C], q2[R * C];
    float s[SR * SC], s2[SR * SC], x[R * C];
    uint64_t rng = 7;
    for (int i = 0; i < R * C; i++) {
        q[i] = (uint8_t)(th_rand_u64(&rng) >> 56);
        if ((q[i] & 0x7F) == 0x7F)
            q[i] ^= 1;
    }
    for (int i = 0; i < SR * SC; i++)
        s[i] = (float)(1e-3 * (1.5 + th_rand_uniform(&rng)));
    lm_fp8_block_dequant(q, s, SC, BR, BC, R, C, x);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            cr_assert_eq((double)x[r * C + c], (double)(float)(e4m3_def(q[r * C + c]) * s[(r / BR) * SC + c / BC]));
    lm_qstats st = {0};
    lm_fp8_block_requant(x, q, s, SC, BR, BC, R, C, q2, s2, &st);
    cr_assert_eq(memcmp(q, q2, sizeof q), 0, "unchanged blocks must keep their codes");
    cr_assert_eq(memcmp(s, s2, sizeof s), 0, "unchanged blocks must keep their scales");
    cr_assert_eq(st.n_blocks, SR * SC);
    cr_assert_eq(st.n_blocks_kept, SR * SC);
    x[17 * C + 3] += 0.01f; /* block (1, 0) changes */
    memset(&st, 0, sizeof st);
    lm_fp8_block_requant(x, q, s, SC, BR, BC, R, C, q2, s2, &st);
    cr_assert_eq(st.n_blocks_kept, SR * SC - 1);
    double amax = 0;
    for (int r = 16; r < 32; r++)
        for (int c = 0; c < 16; c++)
            amax = fmax(amax, fabs(x[r * C + c]));
    cr_assert_eq((double)s2[1 * SC + 0], (double)(1.0f / (448.0f / (float)amax)));
    for (int r = 16; r < 32; r++)
        for (int c = 0; c < 16; c++)
            cr_assert_eq(q2[r * C + c], e4m3_nearest((double)(x[r * C + c] * (448.0f / (float)amax))));
    for (int i = 0; i < SR * SC; i++)
        if (i != SC)
            cr_assert_eq(s2[i], s[i]);
}

/* every block changed, for block widths that use the 16-lane chunks, their tail, both, or the
 * row segments of 256: the codes against the brute-force nearest code of x * (448 / amax), and
 * the reported numbers against sums in double (they are f32 partial sums: a relative tolerance) */
static void requant_width_check(const float *x, const uint8_t *q, const float *s, uint64_t bc, uint64_t cols,
                                uint64_t R, uint64_t BR, const uint8_t *q2, const float *s2, const lm_qstats *stp);

static void requant_width(uint64_t bc, uint64_t cols)
{
    enum { R = 12, BR = 8 };
    const uint64_t sc = (cols + bc - 1) / bc, sr = (R + BR - 1) / BR, n = R * cols;
    uint8_t *q = malloc(n), *q2 = malloc(n);
    float *x = malloc(n * sizeof *x), *s = malloc(sr * sc * sizeof *s), *s2 = malloc(sr * sc * sizeof *s2);
    uint64_t rng = 3 + bc;
    for (uint64_t i = 0; i < n; i++) {
        q[i] = (uint8_t)(th_rand_u64(&rng) >> 56);
        if ((q[i] & 0x7F) == 0x7F)
            q[i] ^= 1;
    }
    for (uint64_t i = 0; i < sr * sc; i++)
        s[i] = (float)(1e-3 * (1.5 + th_rand_uniform(&rng)));
    lm_fp8_block_dequant(q, s, sc, BR, bc, R, cols, x);
    for (uint64_t i = 0; i < n; i++) /* a delta of about a grid step */
        x[i] += (float)(2e-3 * (th_rand_uniform(&rng) - 0.5));
    lm_qstats st = {0};
    lm_fp8_block_requant(x, q, s, sc, BR, bc, R, cols, q2, s2, &st);
    requant_width_check(x, q, s, bc, cols, R, BR, q2, s2, &st);
    /* the fused tiles' functions, block by block: the base's values (against the codes' values
     * times the scale), then the same codes, scales and numbers */
    float *xd = malloc(n * sizeof *xd), *base = malloc(BR * bc * sizeof *base);
    lm_qstats st3 = {0};
    for (uint64_t bi = 0; bi < sr * sc; bi++) {
        const uint64_t r0 = bi / sc * BR, c0 = bi % sc * bc, h = R - r0 < BR ? R - r0 : BR;
        const uint64_t w = cols - c0 < bc ? cols - c0 : bc, e = r0 * cols + c0;
        lm_fp8_dequant_block(q + e, s[bi], h, w, cols, xd + e, base);
        for (uint64_t r = 0; r < h; r++)
            for (uint64_t c = 0; c < w; c++) {
                const double v = (double)(float)(e4m3_def(q[e + r * cols + c]) * s[bi]);
                cr_assert_eq((double)xd[e + r * cols + c], v);
                cr_assert_eq((double)base[r * w + c], v);
                xd[e + r * cols + c] = x[e + r * cols + c]; /* the merge */
            }
        lm_fp8_requant_block(xd + e, base, q + e, s[bi], h, w, cols, q2 + e, s2 + bi, &st3);
    }
    requant_width_check(x, q, s, bc, cols, R, BR, q2, s2, &st3);
    cr_assert(st3.err_max == st.err_max && st3.err_sum == st.err_sum && st3.d2 == st.d2 && st3.e2 == st.e2,
              "the block functions' numbers differ from the tile's");
    free(xd);
    free(base);
    free(q);
    free(q2);
    free(x);
    free(s);
    free(s2);
}

/* requant_width's expectations: the codes against the brute-force nearest code, the numbers
 * against sums in double */
static void requant_width_check(const float *x, const uint8_t *q, const float *s, uint64_t bc, uint64_t cols,
                                uint64_t R, uint64_t BR, const uint8_t *q2, const float *s2, const lm_qstats *stp)
{
    const uint64_t sc = (cols + bc - 1) / bc, sr = (R + BR - 1) / BR, n = R * cols;
    const lm_qstats st = *stp;
    cr_assert_eq(st.n_blocks, sr * sc);
    cr_assert_eq(st.n_blocks_kept, 0);
    cr_assert_eq(st.n_nonfinite_blocks, 0);
    double emax = 0, esum = 0, d2 = 0, e2 = 0;
    uint64_t changed = 0;
    for (uint64_t bi = 0; bi < sr * sc; bi++) {
        const uint64_t r0 = bi / sc * BR, c0 = bi % sc * bc;
        double amax = 0;
        for (uint64_t r = r0; r < r0 + BR && r < R; r++)
            for (uint64_t c = c0; c < c0 + bc && c < cols; c++)
                amax = fmax(amax, fabs(x[r * cols + c]));
        const float sf = 448.0f / (float)amax, inv = 1.0f / sf;
        cr_assert_eq((double)s2[bi], (double)inv, "block %llu: scale", (unsigned long long)bi);
        for (uint64_t r = r0; r < r0 + BR && r < R; r++)
            for (uint64_t c = c0; c < c0 + bc && c < cols; c++) {
                const float xv = x[r * cols + c];
                const unsigned want = e4m3_nearest((double)(xv * sf));
                cr_assert_eq(q2[r * cols + c], want, "width %llu, row %llu col %llu: %#x, want %#x",
                             (unsigned long long)bc, (unsigned long long)r, (unsigned long long)c, q2[r * cols + c], want);
                const double dq = (double)(float)((float)e4m3_def(want) * inv) - xv;
                const double d = xv - (double)(float)((float)e4m3_def(q[r * cols + c]) * s[bi]);
                emax = fmax(emax, fabs(dq) / amax);
                esum += fabs(dq) / amax;
                d2 += d * d;
                e2 += dq * dq;
                changed++;
            }
    }
    cr_assert_eq(st.n_changed, changed);
    cr_assert_eq(st.n_err, n);
    /* the errors are taken in y = x * s, |v - fl(x s)| / (s amax), against |fl(v inv) - x| / amax
     * here: they differ by the roundings of x s, of inv and of v inv, each at most 2^-24 of 448 /
     * (s amax), so by at most 3 2^-24 in all */
    cr_assert(fabs(st.err_max - emax) <= 4 * 0x1p-24, "err_max %.9g, want %.9g", st.err_max, emax);
    cr_assert(fabs(st.err_sum - esum) <= 1e-4 * esum, "err_sum %.9g, want %.9g", st.err_sum, esum);
    cr_assert(fabs(st.d2 - d2) <= 1e-4 * d2, "d2 %.9g, want %.9g", st.d2, d2);
    cr_assert(fabs(st.e2 - e2) <= 1e-4 * e2, "e2 %.9g, want %.9g", st.e2, e2);
}

Test(quant, fp8_block_requant_every_width)
{
    requant_width(16, 48);   /* whole chunks */
    requant_width(40, 100);  /* two chunks and a tail of 8; the last block 20 wide */
    requant_width(7, 30);    /* tails only */
    requant_width(300, 600); /* two row segments (256 + 44) */
}

/* a changed block whose amax stays, with a base scale that is already 1 / (448 / amax): the scale
 * stays and only the codes that moved count as changed (128 rows of 200: the counts of the byte
 * lanes are summed more than once), by the tile function and the block functions */
Test(quant, fp8_block_requant_scale_kept)
{
    enum { R = 128, C = 200 };
    uint8_t *q = malloc(R * C), *q2 = malloc(R * C), *q3 = malloc(R * C);
    float *x = malloc(R * C * sizeof *x), *xd = malloc(R * C * sizeof *xd), *base = malloc(R * C * sizeof *base);
    const float s = 0x1p-10f;
    uint64_t rng = 11;
    for (int i = 0; i < R * C; i++) {
        q[i] = (uint8_t)(th_rand_u64(&rng) >> 56);
        if ((q[i] & 0x7F) >= 0x7E)
            q[i] = (uint8_t)(q[i] - 2);
    }
    q[5 * C + 7] = 0x7E; /* 448: the amax, 448 * 2^-10 */
    lm_fp8_block_dequant(q, &s, 1, R, C, R, C, x);
    uint64_t want = 0;
    for (int i = 0; i < R * C; i += 3) /* every third value a grid step up */
        if ((q[i] & 0x7F) < 0x7D && i != 5 * C + 7) {
            x[i] = (float)(e4m3_def((uint8_t)(q[i] + 1)) * s);
            want++;
        }
    float s2 = 0, s3 = 0;
    lm_qstats st = {0}, st3 = {0};
    lm_fp8_block_requant(x, q, &s, 1, R, C, R, C, q2, &s2, &st);
    lm_fp8_dequant_block(q, s, R, C, C, xd, base);
    memcpy(xd, x, R * C * sizeof *x);
    lm_fp8_requant_block(xd, base, q, s, R, C, C, q3, &s3, &st3);
    cr_assert_eq((double)s2, (double)s);
    cr_assert_eq((double)s3, (double)s);
    uint64_t moved = 0;
    for (int i = 0; i < R * C; i++) {
        const unsigned code = e4m3_nearest((double)(x[i] * (448.0f / (448.0f * s))));
        cr_assert_eq(q2[i], code, "element %d: %#x, want %#x", i, q2[i], code);
        cr_assert_eq(q3[i], code, "element %d: %#x, want %#x", i, q3[i], code);
        moved += code != q[i];
    }
    cr_assert_eq(moved, want);
    cr_assert_eq(st.n_changed, want);
    cr_assert_eq(st3.n_changed, want);
    free(q);
    free(q2);
    free(q3);
    free(x);
    free(xd);
    free(base);
}

/* ---- block FP8's kernels (lm_kernels.h fp8_merge, fp8_encode) through lm_fp8_merge_block ------
 * every variant this CPU runs, bit for bit against the block functions composed (the base's
 * values by lm_fp8_dequant_block, the term by gemm_rows' reference, lm_fp8_requant_block): the
 * merged values, codes, scale and every number */
typedef struct {
    uint64_t h, w, cols, K, r_lo, r_hi;
    float s0, alpha, bscale; /* base scale, the term's factor, B's magnitude */
    int codes;               /* 0 random finite, 1 with NaN codes, 2 small (|code| < 0x40), 3 amax kept */
    int expect;              /* 0 a new scale, 1 kept, 2 not finite, 3 the scale kept, 4 scale 0 (out of range) */
} fk_case;

static int fk_same_float(float a, float b)
{
    return (isnan(a) && isnan(b)) || memcmp(&a, &b, 4) == 0;
}

static void fk_run(const lm_kernels *k, const fk_case *c, uint64_t seed)
{
    const uint64_t h = c->h, w = c->w, cols = c->cols, K = c->K, n = h * cols;
    uint8_t *q0 = malloc(n), *qa = calloc(n, 1), *qb = calloc(n, 1);
    float *acc = malloc(n * sizeof *acc), *base = malloc(h * w * sizeof *base), *x = malloc(h * w * sizeof *x);
    float *A = malloc(K * cols * sizeof *A), *B = malloc(h * K * sizeof *B);
    uint64_t rng = seed;
    for (uint64_t i = 0; i < n; i++) {
        uint8_t b = (uint8_t)(th_rand_u64(&rng) >> 56);
        if (c->codes != 1 && (b & 0x7F) == 0x7F)
            b ^= 1;
        if (c->codes >= 2)
            b &= 0xBF; /* below 2 */
        q0[i] = b;
    }
    if (c->codes == 3)
        q0[1] = 0x7E; /* row 0 (outside the term): the amax stays 448 s0 */
    for (uint64_t i = 0; i < K * cols; i++)
        A[i] = (float)th_rand_normal(&rng);
    for (uint64_t i = 0; i < h * K; i++)
        B[i] = (float)(th_rand_normal(&rng) * c->bscale);
    lm_fp8_dequant_block(q0, c->s0, h, w, cols, acc, base);
    if (c->r_hi > c->r_lo)
        lm_gemm_rows_ref(0, 0, c->r_hi - c->r_lo, w, K, c->alpha, B, K, A, cols, 1.0f, acc + c->r_lo * cols, cols);
    float sa = -1, sb = -2;
    lm_qstats sta = {0}, stb = {0};
    lm_fp8_requant_block(acc, base, q0, c->s0, h, w, cols, qa, &sa, &sta);
    const lm_fp8_term t = {B, A, K, cols, K, c->r_lo, c->r_hi, c->alpha};
    lm_fp8_merge_block(k, q0, c->s0, h, w, cols, &t, x, w, qb, &sb, &stb, NULL);
    for (uint64_t r = 0; r < h; r++)
        for (uint64_t j = 0; j < w; j++)
            cr_assert(fk_same_float(x[r * w + j], acc[r * cols + j]), "%s h %llu w %llu: x[%llu][%llu] %a, want %a",
                      k->name, (unsigned long long)h, (unsigned long long)w, (unsigned long long)r,
                      (unsigned long long)j, (double)x[r * w + j], (double)acc[r * cols + j]);
    for (uint64_t r = 0; r < h; r++)
        cr_assert_eq(memcmp(qa + r * cols, qb + r * cols, w), 0, "%s h %llu w %llu: the codes of row %llu", k->name,
                     (unsigned long long)h, (unsigned long long)w, (unsigned long long)r);
    cr_assert(fk_same_float(sa, sb), "%s: scale %a, want %a", k->name, (double)sb, (double)sa);
    cr_assert(sta.n_changed == stb.n_changed && sta.n_blocks == stb.n_blocks && sta.n_blocks_kept == stb.n_blocks_kept &&
              sta.n_err == stb.n_err && sta.n_nonfinite_blocks == stb.n_nonfinite_blocks,
              "%s h %llu w %llu: counts differ (changed %llu, want %llu)", k->name, (unsigned long long)h,
              (unsigned long long)w, (unsigned long long)stb.n_changed, (unsigned long long)sta.n_changed);
    cr_assert(memcmp(&sta.err_max, &stb.err_max, 8) == 0 && memcmp(&sta.err_sum, &stb.err_sum, 8) == 0 &&
              memcmp(&sta.d2, &stb.d2, 8) == 0 && memcmp(&sta.e2, &stb.e2, 8) == 0,
              "%s h %llu w %llu: numbers differ (err_max %a/%a err_sum %a/%a d2 %a/%a e2 %a/%a)", k->name,
              (unsigned long long)h, (unsigned long long)w, stb.err_max, sta.err_max, stb.err_sum, sta.err_sum,
              stb.d2, sta.d2, stb.e2, sta.e2);
    switch (c->expect) { /* what the case is there for */
    case 0: cr_assert(sta.n_blocks_kept == 0 && sta.n_changed == h * w && sa != c->s0); break;
    case 1: cr_assert(sta.n_blocks_kept == 1 && sa == c->s0); break;
    case 2: cr_assert(sta.n_nonfinite_blocks == 1); break;
    case 3: cr_assert(sta.n_blocks_kept == 0 && sa == c->s0 && sta.n_changed > 0 && sta.n_changed < h * w); break;
    default: cr_assert(sta.n_blocks_kept == 0 && sa == 0.0f); break;
    }
    free(q0);
    free(qa);
    free(qb);
    free(acc);
    free(base);
    free(x);
    free(A);
    free(B);
}

Test(quant, fp8_merge_block_every_variant)
{
    static const fk_case cases[] = {
        {128, 128, 200, 16, 0, 128, 0x1p-7f, 0.5f, 1e-3f, 0, 0},  /* a whole block, every row merged */
        {37, 40, 100, 3, 5, 30, 1e-3f, 2.0f, 1e-3f, 0, 0},        /* two vectors and a tail of 8; some rows */
        {14, 100, 120, 7, 0, 14, 1e-3f, 1.0f, 1e-3f, 0, 0},       /* panels of 4 and 3 vectors (a tail of 4) */
        {9, 200, 230, 16, 0, 9, 1e-3f, 1.0f, 1e-3f, 0, 0},        /* wider than 128: a row at a time */
        {16, 7, 7, 5, 1, 16, 1e-3f, 1.0f, 1e-3f, 0, 0},           /* a tail only */
        {20, 64, 64, 8, 0, 0, 1e-3f, 1.0f, 1e-3f, 0, 1},          /* no term rows: kept */
        {20, 64, 64, 8, 0, 20, 1e-3f, 0.0f, 1e-3f, 0, 1},         /* alpha 0: kept */
        {24, 48, 64, 4, 0, 24, 1e-3f, 1.0f, 1e-3f, 1, 2},         /* NaN codes: not finite */
        {33, 80, 96, 16, 0, 33, 0x1p-3f, 1.0f, 1e-2f, 2, 0},      /* small codes: subnormal codes and x * s */
        {16, 32, 32, 4, 0, 16, 0x1p125f, 1.0f, 0x1p120f, 2, 0},   /* 256 s0 overflows */
        {16, 32, 32, 4, 0, 16, 0x1p-140f, 1.0f, 1e-45f, 2, 4},    /* amax under 448 / FLT_MAX: x * s out of range */
        {128, 128, 128, 16, 1, 128, 0x1p-10f, 1.0f, 1e-6f, 3, 3}, /* the amax and scale stay: changed codes counted */
    };
    static const char *const names[] = {"ref", "avx2", "avx512"};
    int ran = 0;
    for (int v = 0; v < 3; v++) {
        lm_kernels k;
        if (lm_kernels_select(&k, names[v]) != 0 || k.fp8_merge == NULL) {
            fprintf(stderr, "quant fp8_merge_block: variant %s SKIPPED (%s)\n", names[v],
                    lm_kernels_select(&k, names[v]) != 0 ? "this CPU cannot run it" : "no fp8 kernels");
            continue;
        }
        for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
            fk_run(&k, &cases[i], 100 + i);
        ran++;
    }
    cr_assert(ran >= 1);
}

/* each library's rule for its list of unquantized modules, on the module (the tensor name without
 * its last component): transformers' should_convert_module (re.match or a suffix), compressed-
 * tensors' ignore ("re:" patterns, else the exact name), ModelOpt's exclude_modules (fnmatch),
 * vLLM's ignored_layers (exact) */
static int skips(const char *cfg, const char *name)
{
    lm_qscheme s;
    lm_err err;
    lm_err_clear(&err);
    cr_assert_eq(lm_qscheme_parse(cfg, strlen(cfg), &s, &err), LM_OK, "%s", err.msg);
    int k = lm_plan_quant_skips(&s, name);
    lm_qscheme_free(&s);
    return k;
}

static int skips_hf(const char *hq, const char *name)
{
    lm_qscheme s;
    lm_err err;
    lm_err_clear(&err);
    cr_assert_eq(lm_qscheme_parse_hf_quant(hq, strlen(hq), &s, &err), LM_OK, "%s", err.msg);
    int k = lm_plan_quant_skips(&s, name);
    lm_qscheme_free(&s);
    return k;
}

Test(quant, skip_lists_follow_each_library)
{
    const char *hf = "{\"quantization_config\": {\"quant_method\": \"fp8\", \"modules_to_not_convert\": "
                     "[\"lm_head\", \"model.layers.0.mlp\", \"model.layers.*.self_attn\", \"fc1\"]}}";
    cr_assert(skips(hf, "lm_head.weight"));
    cr_assert(skips(hf, "model.layers.0.mlp.up_proj.weight"));       /* a prefix */
    cr_assert(skips(hf, "model.layers.0.mlp_x.weight"), "re.match has no end anchor: transformers skips it too");
    cr_assert(!skips(hf, "model.layers.10.mlp.up_proj.weight"));
    cr_assert(skips(hf, "model.layers.7.self_attn.q_proj.weight"));  /* the regex */
    cr_assert(skips(hf, "model.decoder.layers.23.fc1.weight"));      /* a suffix */
    cr_assert(!skips(hf, "model.layers.7.mlp.down_proj.weight"));
    cr_assert(!skips(hf, "model.lm_head_x.y.weight"));
    const char *ct = "{\"quantization_config\": {\"quant_method\": \"compressed-tensors\", \"format\": "
                     "\"float-quantized\", \"ignore\": [\"lm_head\", \"re:.*mlp\\\\.down_proj$\"]}}";
    cr_assert(skips(ct, "lm_head.weight"));
    cr_assert(skips(ct, "model.layers.3.mlp.down_proj.weight"));
    cr_assert(!skips(ct, "model.layers.3.mlp.up_proj.weight"));
    cr_assert(!skips(ct, "model.lm_head.weight"), "compressed-tensors compares whole names");
    const char *vl = "{\"quantization_config\": {\"quant_method\": \"fp8\", \"ignored_layers\": "
                     "[\"model.layers.0.self_attn.q_proj\"]}}";
    cr_assert(skips(vl, "model.layers.0.self_attn.q_proj.weight"));
    cr_assert(!skips(vl, "model.layers.0.self_attn.q_proj_x.weight"));
    cr_assert(!skips(vl, "model.layers.10.self_attn.q_proj.weight"));
    const char *mo = "{\"quantization\": {\"quant_algo\": \"FP8\", \"exclude_modules\": [\"lm_head\", "
                     "\"model.layers.1*\", \"*.mlp.gat[!x]\"]}}";
    cr_assert(skips_hf(mo, "lm_head.weight"));
    cr_assert(skips_hf(mo, "model.layers.1.mlp.up_proj.weight"));
    cr_assert(skips_hf(mo, "model.layers.12.mlp.up_proj.weight"));   /* fnmatch: * crosses dots */
    cr_assert(!skips_hf(mo, "model.layers.2.mlp.up_proj.weight"));
    cr_assert(skips_hf(mo, "model.layers.2.mlp.gate.weight"));       /* [!x] */
    cr_assert(!skips_hf(mo, "model.layers.2.mlp.gatx.weight"));
    cr_assert(!skips_hf(mo, "model.lm_head.weight"), "fnmatch matches the whole name");
}

Test(quant, scheme_parse)
{
    lm_qscheme s;
    lm_err err;
    lm_err_clear(&err);
    const char *ok = "{\"quantization_config\": {\"quant_method\": \"fp8\", \"weight_block_size\": [64, 32], "
                     "\"modules_to_not_convert\": [\"lm_head\", \"model.layers.0.mlp\"]}}";
    cr_assert_eq(lm_qscheme_parse(ok, strlen(ok), &s, &err), LM_OK);
    cr_assert_eq(s.fmt, LM_Q_FP8_BLOCK);
    cr_assert_eq(s.block_rows, 64);
    cr_assert_eq(s.block_cols, 32);
    cr_assert(lm_plan_quant_skips(&s, "lm_head.weight"));
    cr_assert(lm_plan_quant_skips(&s, "model.layers.0.mlp.up_proj.weight"));
    cr_assert(!lm_plan_quant_skips(&s, "model.layers.10.mlp.up_proj.weight"));
    lm_qscheme_free(&s);
    const char *unknown = "{\"quantization_config\": {\"quant_method\": \"frobnicate\"}}";
    cr_assert_eq(lm_qscheme_parse(unknown, strlen(unknown), &s, &err), LM_E_UNSUPPORTED);
    cr_assert(strstr(err.msg, "frobnicate") != NULL, "%s", err.msg);
    lm_err_clear(&err);
    const char *bad = "{\"quantization_config\": {\"quant_method\": \"fp8\", \"weight_block_size\": [128]}}";
    cr_assert_eq(lm_qscheme_parse(bad, strlen(bad), &s, &err), LM_E_FORMAT);
    lm_err_clear(&err);
    cr_assert_eq(lm_qscheme_parse("{}", 2, &s, &err), LM_OK);
    cr_assert_eq(s.fmt, LM_Q_NONE);
}

/* ---- merges into generated checkpoints -------------------------------------------------------- */
typedef th_qfx qt_fx;

static void qt_gen(qt_fx *f, const char *quant, const char *extra)
{
    char args[3000];
    snprintf(args, sizeof args, "--hidden 64 --inter 72 --layers 2 --vocab 32 --heads 4 --kv-heads 2 "
             "--rank 4 --quant %s --block 16 %s", quant, extra ? extra : "");
    th_qgen(f, args);
}

/* runs the reference in mode on base/adapter/out (th_quant_ref) */
static void qt_ref(const char *mode, const char *a, const char *b, const char *c, const char *d)
{
    char args[5000];
    snprintf(args, sizeof args, "%s '%s' '%s' '%s' %s", mode, a, b, c, d ? d : "");
    th_quant_ref("quant_ref.py", args);
}

static char *qt_read(const char *path)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot read %s", path);
    char *buf = calloc(1, 1 << 16);
    size_t n = fread(buf, 1, (1 << 16) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* the scales are read with pread (exec_quant.c scales_read), not through the mapping: a read error
 * injected into each pread in turn (LM_FAULT, one thread: a fixed order) fails the merge with one
 * line naming the tensor and the file, no output, and reaches a scale tensor before the run gets
 * past every read (through the mapping, no pread would ever be a scale's) */
Test(quant, fp8_scales_read_errors_name_the_tensor, .timeout = 120)
{
    qt_fx f;
    qt_gen(&f, "fp8", NULL);
    char out[1200], spec[32];
    snprintf(out, sizeof out, "%s/out", f.tmp);
    int scale_seen = 0, k = 1;
    for (; k <= 200 && !scale_seen; k++) {
        snprintf(spec, sizeof spec, "%d:EIO:pread", k);
        setenv("LM_FAULT", spec, 1);
        th_run_result r = th_runv("-q", "--threads", "1", f.base, f.ad, out, NULL);
        unsetenv("LM_FAULT");
        if (r.status == 0) { /* past every pread */
            th_run_free(&r);
            break;
        }
        cr_assert_eq(r.status, 3, "pread %d failing: exit %d: %s", k, r.status, r.err);
        cr_assert(strstr(r.err, "cannot read tensor '") != NULL && strstr(r.err, f.base) != NULL &&
                  strchr(r.err, '\n') == strrchr(r.err, '\n'), "pread %d failing: %s", k, r.err);
        cr_assert(!th_exists(out), "pread %d failing left %s", k, out);
        scale_seen = strstr(r.err, "_scale_inv'") != NULL;
        th_run_free(&r);
    }
    cr_assert(scale_seen, "no scale tensor was read with pread (%d reads failed in turn)", k - 1);
    th_qfx_free(&f);
}

Test(quant, fp8_block_keep_and_dtype)
{
    qt_fx f;
    qt_gen(&f, "fp8", NULL);
    char out[1200], out2[1200], outf[1200], p[1300];
    snprintf(out, sizeof out, "%s/out", f.tmp);
    snprintf(out2, sizeof out2, "%s/out2", f.tmp);
    snprintf(outf, sizeof outf, "%s/outf", f.tmp);
    th_run_result r = th_runv("-q", f.base, f.ad, out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    /* the same bytes for one thread and small tiles */
    r = th_runv("-q", "--threads", "1", "--tile-elems", "64", f.base, f.ad, out2, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    char a[1300], b[1300];
    snprintf(a, sizeof a, "%s/model.safetensors", out);
    snprintf(b, sizeof b, "%s/model.safetensors", out2);
    cr_assert(th_files_equal(a, b), "thread count or tile size changed the bytes");
    /* every kernel variant (the low-rank products of the fused tiles) gives the same bytes */
    static const char *const variants[] = {"ref", "avx2", "avx512"};
    for (size_t v = 0; v < 3; v++) {
        th_rmrf(out2);
        r = th_runv("-q", "--kernels", variants[v], f.base, f.ad, out2, NULL);
        if (r.status == 2 && strstr(r.err, "cannot run on this CPU") != NULL) {
            cr_log_info("--kernels %s: not on this CPU, not compared", variants[v]);
        } else {
            cr_assert_eq(r.status, 0, "--kernels %s: exit %d: %s", variants[v], r.status, r.err);
            cr_assert(th_files_equal(a, b), "--kernels %s changed the bytes", variants[v]);
        }
        th_run_free(&r);
    }
    th_st st;
    cr_assert_eq(th_st_read(a, &st), 0);
    const th_tensor *w = th_st_find(&st, "model.layers.1.mlp.down_proj.weight");
    const th_tensor *s = th_st_find(&st, "model.layers.1.mlp.down_proj.weight_scale_inv");
    cr_assert(w != NULL && s != NULL);
    cr_assert_str_eq(w->dtype, "F8_E4M3");
    cr_assert_str_eq(s->dtype, "F32");
    cr_assert_eq(s->shape[0], 4);
    cr_assert_eq(s->shape[1], 5); /* 72 columns: the last block is 8 wide */
    th_st_free(&st);
    snprintf(p, sizeof p, "%s/config.json", out);
    char *cfg = qt_read(p);
    cr_assert(strstr(cfg, "\"quant_method\": \"fp8\"") != NULL, "quantization_config must stay: %s", cfg);
    free(cfg);
    r = th_runv("-q", "--dtype", "f32", f.base, f.ad, outf, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    snprintf(a, sizeof a, "%s/model.safetensors", outf);
    cr_assert_eq(th_st_read(a, &st), 0);
    cr_assert_null(th_st_find(&st, "model.layers.1.mlp.down_proj.weight_scale_inv"), "scales must be dropped");
    cr_assert_str_eq(th_st_find(&st, "model.layers.1.mlp.down_proj.weight")->dtype, "F32");
    th_st_free(&st);
    snprintf(p, sizeof p, "%s/config.json", outf);
    cfg = qt_read(p);
    cr_assert(strstr(cfg, "quantization_config") == NULL, "quantization_config must go: %s", cfg);
    free(cfg);
    qt_ref("fp8-keep", f.base, f.ad, out, NULL);
    qt_ref("fp8-dtype", f.base, f.ad, outf, NULL);
    th_qfx_free(&f);
}

/* an adapter touching the first block row only: every other block keeps its bytes */
Test(quant, fp8_block_unchanged_blocks_identical)
{
    qt_fx f;
    qt_gen(&f, "fp8", "--no-adapter");
    char ad[1200], out[1200];
    snprintf(ad, sizeof ad, "%s/partial", f.tmp);
    snprintf(out, sizeof out, "%s/out", f.tmp);
    cr_assert_eq(mkdir(ad, 0777), 0);
    qt_ref("partial-adapter", f.base, ad, "model.layers.1.self_attn.q_proj", "16");
    th_run_result r = th_runv("--json", f.base, ad, out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    /* the report: 4 of the 16 blocks changed, 12 kept */
    cr_assert(strstr(r.out, "\"requantized\":{\"blocks\":16,\"blocks_kept\":12,") != NULL, "%s", r.out);
    cr_assert(strstr(r.out, "QuantizedDeltaLost") == NULL, "%s", r.out);
    th_run_free(&r);
    qt_ref("fp8-keep", f.base, ad, out, NULL);
    /* the text report (not --json) sums the requantization up after a real run: its figures
     * checked against the reference's, from the base, the adapter and the output */
    char outt[1200];
    snprintf(outt, sizeof outt, "%s/outt", f.tmp);
    r = th_runv(f.base, ad, outt, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    const char *sum = strstr(r.err, "note: requantized 1 tensor: ");
    unsigned long long n_ch = 0, n_el = 0;
    double emax = -1;
    cr_assert(sum != NULL && sscanf(sum, "note: requantized 1 tensor: %llu of %llu elements changed (code x scale); "
                                    "error up to %lf of the block amax", &n_ch, &n_el, &emax) == 3, "%s", r.err);
    cr_assert(strstr(sum, "worst model.layers.1.self_attn.q_proj.weight: ") && strstr(sum, "12 of 16 blocks kept"),
              "%s", sum);
    char args[100];
    snprintf(args, sizeof args, "%llu %llu %.17g", n_ch, n_el, emax);
    th_run_free(&r);
    qt_ref("fp8-summary", f.base, ad, outt, args);
    /* a delta far below the FP8 step: said in a warning (and an error under --strict) */
    char ad2[1200], out2[1200];
    snprintf(ad2, sizeof ad2, "%s/tiny", f.tmp);
    snprintf(out2, sizeof out2, "%s/out2", f.tmp);
    cr_assert_eq(mkdir(ad2, 0777), 0);
    qt_ref("partial-adapter", f.base, ad2, "model.layers.1.self_attn.q_proj", "16 0.00005");
    r = th_runv(f.base, ad2, out2, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "QuantizedDeltaLost") != NULL || strstr(r.out, "QuantizedDeltaLost") != NULL,
              "no warning: %s %s", r.out, r.err);
    th_run_free(&r);
    char out3[1200];
    snprintf(out3, sizeof out3, "%s/out3", f.tmp);
    r = th_runv("-q", "--strict", f.base, ad2, out3, NULL);
    cr_assert_eq(r.status, 5, "--strict: exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "QuantizedDeltaLost") != NULL && !th_exists(out3), "%s", r.err);
    th_run_free(&r);
    th_qfx_free(&f);
}

Test(quant, fp8_inspect)
{
    qt_fx f;
    qt_gen(&f, "fp8", "--no-adapter");
    th_run_result r = th_runv("inspect", f.base, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.out, "quantization: block FP8 (F8_E4M3, weight_scale_inv), quant_method fp8, blocks 16x16, "
                            "14 quantized weights") != NULL, "%s", r.out);
    th_run_free(&r);
    th_qfx_free(&f);
}

/* ---- refusals --------------------------------------------------------------------------------- */
/* copies model.safetensors without tensor `drop`, or with `reshape` given a new shape/dtype */
static void qt_rewrite(const char *dir, const char *drop, const char *change, const char *dtype, uint64_t d0,
                       uint64_t d1)
{
    char src[1300], hdr[1 << 16];
    snprintf(src, sizeof src, "%s/model.safetensors", dir);
    th_st st;
    cr_assert_eq(th_st_read(src, &st), 0);
    size_t used = (size_t)snprintf(hdr, sizeof hdr, "{");
    uint64_t off = 0;
    uint64_t *size = calloc(st.n, sizeof *size);
    for (size_t i = 0; i < st.n; i++) {
        const th_tensor *t = &st.t[i];
        if (drop && strcmp(t->name, drop) == 0)
            continue;
        int ch = change && strcmp(t->name, change) == 0;
        const char *dt = ch ? dtype : t->dtype;
        uint64_t sh0 = ch ? d0 : t->shape[0], sh1 = ch ? d1 : (t->n_dims > 1 ? t->shape[1] : 0);
        int nd = ch ? 2 : t->n_dims;
        size[i] = ch ? d0 * d1 * (strcmp(dt, "F32") == 0 ? 4 : strcmp(dt, "I8") == 0 || strcmp(dt, "U8") == 0 ? 1 : 2)
                     : t->n_bytes;
        used += (size_t)snprintf(hdr + used, sizeof hdr - used, "%s\"%s\": {\"dtype\": \"%s\", \"shape\": [%llu%s",
                                 off || used > 1 ? ", " : "", t->name, dt, (unsigned long long)sh0, nd > 1 ? ", " : "");
        if (nd > 1)
            used += (size_t)snprintf(hdr + used, sizeof hdr - used, "%llu", (unsigned long long)sh1);
        used += (size_t)snprintf(hdr + used, sizeof hdr - used, "], \"data_offsets\": [%llu, %llu]}",
                                 (unsigned long long)off, (unsigned long long)(off + size[i]));
        off += size[i];
    }
    used += (size_t)snprintf(hdr + used, sizeof hdr - used, "}");
    while (used % 8)
        hdr[used++] = ' ';
    cr_assert_eq(unlink(src), 0);
    FILE *f = fopen(src, "wb");
    uint64_t n = used;
    fwrite(&n, 8, 1, f);
    fwrite(hdr, 1, used, f);
    uint8_t *zero = calloc(1, 1 << 16);
    for (size_t i = 0; i < st.n; i++) {
        const th_tensor *t = &st.t[i];
        if (drop && strcmp(t->name, drop) == 0)
            continue;
        if (size[i] == t->n_bytes)
            fwrite(t->data, 1, t->n_bytes, f);
        else
            for (uint64_t k = 0; k < size[i]; k += 4)
                fwrite("\0\0\x80\x3f", 1, 4, f); /* 1.0f */
    }
    fclose(f);
    free(zero);
    free(size);
    th_st_free(&st);
}

static void qt_refused(qt_fx *f, const char *want1, const char *want2)
{
    char out[1200];
    snprintf(out, sizeof out, "%s/out", f->tmp);
    th_run_result r = th_runv("-q", f->base, f->ad, out, NULL);
    cr_assert_neq(r.status, 0, "accepted; want a refusal naming %s", want1);
    cr_assert(strstr(r.err, want1) != NULL && strstr(r.err, want2) != NULL, "stderr: %s", r.err);
    cr_assert(!th_exists(out), "an output was left");
    th_run_free(&r);
}

Test(quant, fp8_refusals)
{
    qt_fx f;
    qt_gen(&f, "fp8", NULL);
    qt_rewrite(f.base, "model.layers.0.self_attn.q_proj.weight_scale_inv", NULL, NULL, 0, 0);
    qt_refused(&f, "model.layers.0.self_attn.q_proj.weight_scale_inv", "no scale tensor");
    th_qfx_free(&f);
    qt_gen(&f, "fp8", NULL);
    qt_rewrite(f.base, NULL, "model.layers.0.mlp.up_proj.weight_scale_inv", "F32", 4, 4);
    qt_refused(&f, "/base/model.safetensors: QuantScale: block FP8 scale tensor 'model.layers.0.mlp.up_proj.weight_scale_inv'",
               "is [4, 4]: expected [5, 4]"); /* the base file named, as every error names its file */
    th_qfx_free(&f);
    qt_gen(&f, "fp8", NULL);
    qt_rewrite(f.base, NULL, "model.layers.0.mlp.up_proj.weight_scale_inv", "BF16", 5, 4);
    qt_refused(&f, "model.layers.0.mlp.up_proj.weight_scale_inv", "BF16");
    th_qfx_free(&f);
    qt_gen(&f, "fp8", NULL);
    char cfg[1300];
    snprintf(cfg, sizeof cfg, "%s/config.json", f.base);
    th_write_text(f.base, "config.json", "{\"model_type\": \"llama\", \"quantization_config\": {\"quant_method\": "
                                         "\"frobnicate\"}}");
    qt_refused(&f, "frobnicate", "config.json");
    th_qfx_free(&f);
}

/* a GPTQ/AWQ-packed base (qweight/qzeros/scales/g_idx where weight would be): refused naming the
 * packed tensor and saying to merge into the unquantized original, for both quant_methods */
Test(quant, gptq_awq_packed_base_refused)
{
    static const char *const methods[] = {"gptq", "awq"};
    static const char *const proj[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
    for (size_t mi = 0; mi < 2; mi++) {
        qt_fx f;
        char gen[1200], cmd[4000], path[1300];
        if (!th_gen_model_path(gen, sizeof gen))
            cr_skip_test("needs %s (build it: make BUILD=... <build>/bench/gen_model)", gen);
        f.tmp = th_tmpdir();
        snprintf(cmd, sizeof cmd, "'%s' --out '%s/m' --hidden 64 --inter 72 --layers 2 --vocab 32 --heads 4 "
                 "--kv-heads 2 --rank 4 --targets all 2>&1", gen, f.tmp);
        th_run_result r = th_sh(cmd);
        cr_assert_eq(r.status, 0, "gen_model failed: %s", r.out);
        th_run_free(&r);
        snprintf(f.base, sizeof f.base, "%s/m/base", f.tmp);
        snprintf(f.ad, sizeof f.ad, "%s/m/adapter", f.tmp);
        /* every projection of both layers packed: qweight I32 [in/8, out], scales F16 [1, out] */
        static double zeros[64 * 72];
        th_out_tensor t[2 * 7 * 2];
        char names[2 * 7 * 2][96];
        size_t n = 0;
        for (int l = 0; l < 2; l++)
            for (size_t p = 0; p < 7; p++)
                for (int k = 0; k < 2; k++) {
                    snprintf(names[n], sizeof names[n], "model.layers.%d.%s.%s", l, proj[p], k ? "scales" : "qweight");
                    t[n] = (th_out_tensor){names[n], k ? "F16" : "I32", 2, {k ? 1 : 8, 72}, zeros};
                    n++;
                }
        snprintf(path, sizeof path, "%s/model.safetensors", f.base);
        cr_assert_eq(th_st_write(path, t, n), 0);
        char cfg[200];
        snprintf(cfg, sizeof cfg, "{\"model_type\": \"llama\", \"quantization_config\": {\"quant_method\": \"%s\", "
                 "\"bits\": 4, \"group_size\": 128}}", methods[mi]);
        th_write_text(f.base, "config.json", cfg);
        qt_refused(&f, ".qweight' (GPTQ/AWQ", "merge into the unquantized original model");
        th_qfx_free(&f);
    }
}

/* a quant_method lora-merge knows of but does not read (the tensors decide): the weights it
 * stores where "<module>.weight" would be a float, an I8 weight (eetq) or another tensor
 * (hqq's W_q), fail naming the quant_method and the way out, not with "no base tensor" or "only
 * float weights" alone; the same base under a config without quantization_config fails as before.
 * Then skip lists that name a quantized weight's module */
Test(quant, unread_quant_methods_and_contradicting_skip_lists_named)
{
    static const struct {
        const char *method, *drop, *change, *dtype, *was;
    } cases[] = {
        {"eetq", NULL, "model.layers.0.self_attn.q_proj.weight", "I8", "is I8: only float weights"},
        {"hqq", "model.layers.0.self_attn.q_proj.weight", NULL, NULL, "no base tensor"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        qt_fx f;
        th_qgen(&f, "--hidden 64 --inter 72 --layers 2 --vocab 32 --heads 4 --kv-heads 2 --rank 4");
        qt_rewrite(f.base, cases[k].drop, cases[k].change, cases[k].dtype, 64, 64);
        qt_refused(&f, "model.layers.0.self_attn.q_proj", cases[k].was); /* no quantization_config yet */
        char cfg[200], want[200];
        snprintf(cfg, sizeof cfg, "{\"model_type\": \"llama\", \"quantization_config\": {\"quant_method\": \"%s\"}}",
                 cases[k].method);
        th_write_text(f.base, "config.json", cfg);
        snprintf(want, sizeof want, "UnsupportedQuantization: 'model.layers.0.self_attn.q_proj': the base is quantized "
                 "with quant_method '%s'", cases[k].method);
        qt_refused(&f, want, "merge into the unquantized original model");
        qt_refused(&f, want, cases[k].was);
        th_qfx_free(&f);
    }
    /* a skip list naming the module of a weight stored quantized: a checkpoint contradicting its
     * config, said as such (not "F8_E4M3: only float weights", nor "has no quant_state") */
    qt_fx f;
    qt_gen(&f, "fp8", NULL);
    th_write_text(f.base, "config.json", "{\"model_type\": \"llama\", \"quantization_config\": {\"quant_method\": "
                                         "\"fp8\", \"weight_block_size\": [16, 16], \"modules_to_not_convert\": [\"q_proj\"]}}");
    qt_refused(&f, "'model.layers.0.self_attn.q_proj': config.json's quantization_config (fp8) lists this module as left "
               "unquantized, but its weight is stored quantized", "is F8_E4M3");
    th_qfx_free(&f);
    qt_gen(&f, "bnb-nf4", NULL);
    th_write_text(f.base, "config.json", "{\"model_type\": \"llama\", \"quantization_config\": {\"quant_method\": "
                                         "\"bitsandbytes\", \"load_in_4bit\": true, \"llm_int8_skip_modules\": [\"q_proj\"]}}");
    qt_refused(&f, "lists the module of its weight 'model.layers.0.self_attn.q_proj.weight' as left unquantized",
               "the checkpoint contradicts its config");
    th_qfx_free(&f);
}

/* FP8 weights under a config naming a format that stores none (gptq, awq, hqq; block FP8 under
 * compressed-tensors, compressed-tensors' weight_scale under "fp8"): the checkpoint contradicts its
 * config, refused naming config.json, the quant_method and the weight (before: merged as FP8, the
 * contradicting config copied into the output); the same checkpoints under their own config merge */
Test(quant, fp8_weights_under_another_quant_method_refused, .timeout = 120)
{
    static const struct {
        const char *quant, *method;
    } cases[] = {{"fp8", "gptq"}, {"fp8", "awq"}, {"fp8", "hqq"}, {"fp8", "compressed-tensors"},
                 {"ct-fp8-channel", "gptq"}, {"ct-fp8-channel", "fp8"}};
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        qt_fx f;
        qt_gen(&f, cases[k].quant, "--block 128"); /* the default blocks: the scales fit any config */
        char cfg[300], want[200], out[1200];
        snprintf(out, sizeof out, "%s/own", f.tmp);
        th_run_result r = th_runv("-q", f.base, f.ad, out, NULL);
        cr_assert_eq(r.status, 0, "%s under its own config: exit %d: %s", cases[k].quant, r.status, r.err);
        th_run_free(&r);
        snprintf(cfg, sizeof cfg, "{\"model_type\": \"llama\", \"quantization_config\": {\"quant_method\": \"%s\", "
                 "\"bits\": 4, \"group_size\": 128, \"weight_block_size\": [16, 16]}}", cases[k].method);
        th_write_text(f.base, "config.json", cfg);
        snprintf(want, sizeof want, "UnsupportedQuantization: 'model.layers.0.self_attn.q_proj.weight': config.json's "
                 "quantization_config says quant_method '%s', but the weight is F8_E4M3", cases[k].method);
        qt_refused(&f, want, "the checkpoint contradicts its config");
        th_qfx_free(&f);
    }
}

/* ---- block FP8 certified (lm_fp8_bound): the rule on the exact values ----------------------
 * A = c I (K = w columns), so that each merged value v = w + s c B_ij is set on its own: values
 * built next to the FP8 grid's rounding midpoints (scaled by the block's amax), below 2^-6 (the
 * subnormal codes) and around zero, two near the amax whose f32 order may differ from the exact
 * one, all as cancellations of the base value so that the kernels' f32 x miss the exact value by
 * many of its ulps.  The exact values X (RN32 of v, in long double with the sum checked exact)
 * and the rule on them (transformers' FineGrainedFP8: amax, s = 448 / amax, the nearest code of
 * fl(X s) by brute force) are this test's; every variant must write those codes and that scale,
 * flag the same elements, and the f32 values must get some codes wrong (else not adversarial).
 * bound_scale < 1 breaks the bound (the failure it must cause is checked by hand, see the note). */
typedef struct {
    uint64_t h, w, r_lo;
    double s;       /* the term's scale (a power of two: s c B exact in long double) */
    int keep_scale; /* a base row holds 448 s0: the amax and scale stay */
} fc_case;

static float fc_X[64 * 80];
static unsigned fc_calls;

static float fc_exact(void *ctx, uint64_t row, uint64_t col, float w)
{
    (void)w;
    fc_calls++;
    return fc_X[row * *(const uint64_t *)ctx + col];
}

static void fc_run(const lm_kernels *k, const fc_case *cs, uint64_t seed, uint64_t *n_flag_out, uint64_t *f32_wrong)
{
    const uint64_t h = cs->h, w = cs->w, cols = w + 16, K = w, nt = h - cs->r_lo;
    const float s0 = 0x1p-8f, c = 1.0f / 3.0f;
    uint8_t *q0 = malloc(h * cols), *q = calloc(h * cols, 1);
    float *A = calloc(K * w, sizeof *A), *B = malloc(nt * K * sizeof *B), *x = malloc(h * w * sizeof *x);
    float *W = malloc(h * w * sizeof *W), erow[64];
    uint32_t *flag = malloc(2 * h * w * sizeof *flag);
    uint64_t rng = seed;
    double wmax = 0;
    for (uint64_t i = 0; i < h; i++)
        for (uint64_t j = 0; j < cols; j++) {
            uint8_t b = (uint8_t)(th_rand_u64(&rng) >> 56) & 0xF7; /* below 448 */
            if ((b & 0x7F) == 0x7F)
                b ^= 1;
            q0[i * cols + j] = b;
            if (j < w) {
                W[i * w + j] = (float)(e4m3_def(b) * s0);
                wmax = fabs(W[i * w + j]) > wmax ? fabs(W[i * w + j]) : wmax;
            }
        }
    if (cs->keep_scale)
        q0[0] = 0x7E, W[0] = 448.0f * s0;
    for (uint64_t p = 0; p < K; p++)
        A[p * w + p] = c;
    const double T = cs->keep_scale ? 448.0 * s0 * 0.75 : 2 * wmax; /* the block's largest value */
    for (uint64_t i = 0; i < h; i++)
        for (uint64_t j = 0; j < w; j++) {
            long double X = W[i * w + j];
            if (i >= cs->r_lo) {
                const unsigned kind = (unsigned)(th_rand_u64(&rng) % 16);
                static const double offs[] = {0, 0x1p-23, -0x1p-23, 0x1p-21, -0x1p-21, 0x1p-15, -0x1p-12};
                const double sg = th_rand_u64(&rng) & 1 ? -1.0 : 1.0, eps = offs[th_rand_u64(&rng) % 7];
                double target;
                if (i == cs->r_lo && j < 2) /* the amax, and a near tie */
                    target = T * (1 - (double)j * 0x1p-23);
                else if (kind < 11) /* a small delta */
                    target = W[i * w + j] * (1 + sg * 0x1p-12);
                else if (kind < 14) { /* next to a midpoint of normal codes */
                    const unsigned cd = 0x08 + (unsigned)(th_rand_u64(&rng) % 0x75);
                    target = sg * (e4m3_def(cd) + e4m3_def(cd + 1)) / 2 * T / 448.0 * (1 + eps);
                } else if (kind < 15) { /* next to a subnormal midpoint */
                    const unsigned m = (unsigned)(th_rand_u64(&rng) % 8);
                    target = sg * (m + 0.5) * 0x1p-9 * T / 448.0 * (1 + eps);
                } else { /* around zero */
                    target = sg * T * 0x1p-30 * (double)(th_rand_u64(&rng) % 4);
                }
                const float b = (float)((target - W[i * w + j]) / (cs->s * c));
                B[(i - cs->r_lo) * K + j] = b;
                const long double p = (long double)cs->s * c * b, t = (long double)W[i * w + j] + p;
                cr_assert(t - (long double)W[i * w + j] == p, "the long double sum is not exact");
                X = t;
            }
            fc_X[i * w + j] = (float)X; /* (exact: one rounding) */
        }
    /* the test's own bound: 1.05 (K + 2) 2^-24 |s| ||b_i|| max ||a_j|| + (|s| (K + 1) + 2) 2^-149 */
    for (uint64_t i = 0; i < h; i++) {
        double nb = 0;
        for (uint64_t p = 0; i >= cs->r_lo && p < K; p++)
            nb += (double)B[(i - cs->r_lo) * K + p] * B[(i - cs->r_lo) * K + p];
        const double e = 1.05 * (double)(K + 2) * 0x1p-24 * fabs(cs->s) * sqrt(nb) * c +
                         (fabs(cs->s) * (double)(K + 1) + 2) * 0x1p-149;
        erow[i] = i >= cs->r_lo ? nextafterf((float)e, INFINITY) : 0.0f;
    }
    /* the rule on the exact values */
    float amax = 0;
    int same = 1;
    for (uint64_t e = 0; e < h * w; e++) {
        amax = fabsf(fc_X[e]) > amax ? fabsf(fc_X[e]) : amax;
        same &= fc_X[e] == W[e];
    }
    cr_assert(!same);
    const float sc = 448.0f / amax, inv = 1.0f / sc;
    const lm_fp8_term t = {B, A, K, w, K, cs->r_lo, h, (float)cs->s};
    lm_fp8_bound bd = {erow, fc_exact, (void *)&w, 0, 0, flag, 0};
    float got_scale = -1;
    lm_qstats st = {0};
    fc_calls = 0;
    lm_fp8_merge_block(k, q0, s0, h, w, cols, &t, x, w, q, &got_scale, &st, &bd);
    cr_assert(got_scale == inv, "%s: scale_inv %a, the rule on the exact values gives %a", k->name, (double)got_scale,
              (double)inv);
    cr_assert(bd.n_exact == fc_calls && fc_calls > 0 && fc_calls < nt * w * 3 / 4, "%s: %u exact values", k->name, fc_calls);
    uint64_t wrong = 0, changed = 0;
    for (uint64_t i = 0; i < h; i++)
        for (uint64_t j = 0; j < w; j++) {
            volatile float y = fc_X[i * w + j] * sc; /* f32 */
            const unsigned want = e4m3_nearest(y);
            cr_assert_eq(q[i * cols + j], want, "%s: element (%llu, %llu): code %#x, the rule on the exact %a gives %#x",
                         k->name, (unsigned long long)i, (unsigned long long)j, q[i * cols + j], (double)fc_X[i * w + j],
                         want);
            changed += want != q0[i * cols + j];
            /* the same rule on the f32 value the kernels computed (x holds X where made exact) */
            float xf = W[i * w + j];
            if (i >= cs->r_lo)
                xf = W[i * w + j] + (float)cs->s * (B[(i - cs->r_lo) * K + j] * c);
            volatile float yf = xf * sc;
            wrong += e4m3_nearest(yf) != want;
        }
    if (cs->keep_scale)
        cr_assert(inv == s0 && st.n_changed == changed, "%s: the scale stays: %llu changed codes counted, want %llu",
                  k->name, (unsigned long long)st.n_changed, (unsigned long long)changed);
    *n_flag_out = bd.n_exact;
    *f32_wrong = wrong;
    free(q0);
    free(q);
    free(A);
    free(B);
    free(x);
    free(W);
    free(flag);
}

/* lm_fp8_cert (a) next to the bottom of a binade: y = 2^E (1 + 2^-20) codes as 2^E, its own
 * grid's midpoint is h = 2^(E-4) above, but the binade below ends with a midpoint h / 2 under
 * 2^E, so a bound Ers = 0.6 h reaches it (a y' there codes one step lower): every such element
 * is flagged; with Ers = 0.2 h it cannot move the code and none is.  Rows of 64 (the AVX-512
 * variant's unmasked groups) and 80 (a tail), every variant. */
Test(quant, fp8_cert_flags_the_midpoint_of_the_binade_below)
{
    static const int E[] = {0, 3, 8};
    static const size_t W[] = {64, 80};
    static const char *const names[] = {"ref", "avx2", "avx512"};
    float x[3 * 80], erow[3];
    uint8_t q[3 * 80];
    uint32_t flag[2 * 3 * 80];
    for (int v = 0; v < 3; v++) {
        lm_kernels k;
        if (lm_kernels_select(&k, names[v]) != 0 || k.fp8_encode == NULL) {
            fprintf(stderr, "quant fp8_cert_flags_the_midpoint_of_the_binade_below: variant %s SKIPPED\n", names[v]);
            continue;
        }
        for (size_t wi = 0; wi < 2; wi++)
            for (int far = 0; far < 2; far++) {
                const size_t w = W[wi];
                for (size_t i = 0; i < 3; i++) {
                    for (size_t j = 0; j < w; j++)
                        x[i * w + j] = ldexpf(1.0f + 0x1p-20f, E[i]) * (j % 2 ? -1.0f : 1.0f);
                    /* Ers = erow 1.0001 + 2^-140 (s = 1) */
                    erow[i] = ldexpf(far ? 0.2f : 0.6f, E[i] - 4) / 1.0001f;
                }
                lm_fp8_lanes L;
                lm_fp8_cert cert = {erow, 0xFFFFFFFFu, flag, 0};
                k.fp8_encode(x, w, 3, w, 1.0f, 1.0f, 1.0f / 448, NULL, w, q, w, &L, &cert);
                cr_assert_eq(cert.n_flag, far ? 0 : 3 * w, "%s, w %zu, Ers %s h: %zu flagged", names[v], w,
                             far ? "0.2" : "0.6", cert.n_flag);
                for (size_t i = 0; i < 3; i++)
                    cr_assert_eq(q[i * w + 1], 0x80 | q[i * w], "%s: the codes of +-2^%d", names[v], E[i]);
            }
    }
}

/* a rounding midpoint of the E4M3 grid within dmax of |y| (2^-6 <= |y| < 2^8), from the grid's
 * definition in long double: the midpoints of y's binade [2^E, 2^(E+1)) (step 2^(E-3)), the last
 * one below 2^E (half the step below it: 2^(E-5); under 2^-6 the subnormal grid's 2^-10) and the
 * first one above 2^(E+1) */
static int fm_midpoint_within(float y, long double dmax, long double *dist)
{
    int ex;
    const long double a = fabsl((long double)y);
    (void)frexpl(a, &ex);
    const int E = ex - 1;
    long double m[10], best = INFINITY;
    for (int k = 0; k < 8; k++)
        m[k] = ldexpl(1, E) + (k + 0.5L) * ldexpl(1, E - 3);
    m[8] = E > -6 ? ldexpl(1, E) - ldexpl(1, E - 5) : ldexpl(1, -6) - ldexpl(1, -10);
    m[9] = ldexpl(1, E + 1) + ldexpl(1, E - 3);
    for (int k = 0; k < 10; k++)
        best = fabsl(m[k] - a) < best ? fabsl(m[k] - a) : best;
    *dist = best;
    return best <= dmax;
}

/* lm_fp8_cert (a) with its margin M (lm_fp8_margin: Ers up to 2^-12, then 2 Ers): rows whose Ers
 * is either side of 2^-12, s = 1, values of every binade from 2^-6 to 2^7 placed next to the
 * midpoints of their binade or just above its bottom (the binade below's last midpoint half a
 * step under it), 0.15 to 2.5 Ers away; a last row (Ers 1.5 2^-9) of values just above 2^-4,
 * whose nearest midpoint is the one below (2^-4 - 2^-9, within Ers: a margin of Ers would miss
 * it).  Sound: every element with a midpoint within Ers + 11 ulp(y) of it (the bound on
 * |fl(X s) - fl(x s)|, quant.c's proof; the midpoints from the grid's definition, not the
 * kernels' test) is flagged, by every variant, and the variants flag the same.  The margin is
 * used: with Ers <= 2^-12, most elements between Ers + 24 ulp(y) and 2 Ers from a midpoint of
 * their binade are not flagged (those of the rows above are).  Rows of 88: the AVX-512 variant's
 * groups of 64, a masked tail; the AVX2 variant's scalar tail. */
Test(quant, fp8_cert_margin_sound)
{
    enum { H = 7, W = 88 };
    static const float T[H] = {0x1p-30f, 0x1p-16f, 0x1p-13f, 0x1p-12f, 0x1p-11f, 0x1p-9f, 0x1.8p-9f};
    static const float F[] = {0.15f, 0.5f, 0.75f, 0.95f, 1.0f, 1.25f, 1.5f, 1.75f, 2.5f};
    static const char *const names[] = {"ref", "avx2", "avx512"};
    float x[H * W], erow[H], ers[H];
    uint8_t q[H * W];
    uint32_t flag[2 * H * W], ref_flag[2 * H * W];
    int mid[H * W]; /* placed next to a midpoint of its binade */
    size_t ref_n = SIZE_MAX;
    for (int i = 0; i < H; i++) {
        erow[i] = T[i] / 1.0001f;
        volatile float e = erow[i] * 1.0f * 1.0001f; /* lm_fp8_cert's Ers, s = 1 */
        ers[i] = e + 0x1p-140f;
        for (int j = 0; j < W; j++) {
            const int E = -6 + j % 14, k = (j / 14) % 8, sg = j % 4 < 2 ? 1 : -1;
            mid[i * W + j] = i < H - 1 && j % 3 != 0;
            if (i == H - 1) { /* 2^-4 + (0 .. 0.5) 2^-9 */
                x[i * W + j] = (float)(sg * (0x1p-4L + (j + 1) * 0x1p-10L / (W + 1)));
                continue;
            }
            const long double site = mid[i * W + j] ? ldexpl(1, E) + (k + 0.5L) * ldexpl(1, E - 3) : ldexpl(1, E);
            const long double d = (long double)F[(j / 3) % 9] * ers[i];
            x[i * W + j] = (float)(sg * (!mid[i * W + j] || j % 2 ? site + d : site - d));
        }
    }
    for (int v = 0; v < 3; v++) {
        lm_kernels k;
        if (lm_kernels_select(&k, names[v]) != 0 || k.fp8_encode == NULL) {
            fprintf(stderr, "quant fp8_cert_margin_sound: variant %s SKIPPED\n", names[v]);
            continue;
        }
        lm_fp8_lanes L;
        lm_fp8_cert cert = {erow, 0xFFFFFFFFu, flag, 0};
        k.fp8_encode(x, W, H, W, 1.0f, 1.0f, 1.0f / 448, NULL, W, q, W, &L, &cert);
        int flagged[H * W] = {0};
        for (size_t f = 0; f < cert.n_flag; f++)
            flagged[flag[f]] = 1;
        uint64_t gain = 0, gain_of = 0, must_n = 0;
        for (int i = 0; i < H; i++)
            for (int j = 0; j < W; j++) {
                int ex;
                (void)frexpf(x[i * W + j], &ex);
                const long double ulp = ldexpl(1, ex - 1 - 23);
                long double dist;
                const int must = fm_midpoint_within(x[i * W + j], (long double)ers[i] + 11 * ulp, &dist);
                must_n += must;
                cr_assert(!must || flagged[i * W + j], "%s: row %d (Ers %a), y = %a: a midpoint %Lg away, not flagged",
                          names[v], i, (double)ers[i], (double)x[i * W + j], dist);
                if (mid[i * W + j] && dist >= ers[i] + 24 * ulp && dist <= 2 * (long double)ers[i]) {
                    if (ers[i] <= 0x1p-12f) {
                        gain_of++;
                        gain += !flagged[i * W + j];
                    } else {
                        cr_assert(flagged[i * W + j], "%s: row %d (Ers %a > 2^-12), y = %a, %Lg from a midpoint: "
                                  "the margin is 2 Ers, not flagged", names[v], i, (double)ers[i], (double)x[i * W + j],
                                  dist);
                    }
                }
            }
        cr_assert(must_n > W, "%s: only %llu elements within reach of a midpoint: not adversarial", names[v],
                  (unsigned long long)must_n);
        cr_assert(gain_of > 20 && gain * 4 > gain_of * 3, "%s: %llu of %llu elements between Ers + 24 ulp and 2 Ers "
                  "from a midpoint not flagged (Ers <= 2^-12: the margin is Ers)", names[v], (unsigned long long)gain,
                  (unsigned long long)gain_of);
        if (ref_n == SIZE_MAX) {
            ref_n = cert.n_flag;
            memcpy(ref_flag, flag, ref_n * sizeof *flag);
        } else {
            cr_assert(cert.n_flag == ref_n && !memcmp(flag, ref_flag, ref_n * sizeof *flag),
                      "%s flags %zu elements, not the same as the first variant's %zu", names[v], cert.n_flag, ref_n);
        }
    }
}

Test(quant, fp8_merge_block_certified)
{
    static const fc_case cases[] = {
        {64, 80, 2, 2.0, 0},  /* a tail of 16, two exact rows */
        {48, 64, 0, 0.5, 0},  /* every row */
        {33, 48, 5, 4.0, 1},  /* the scale stays: the changed codes counted */
    };
    static const char *const names[] = {"ref", "avx2", "avx512"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        uint64_t n_ref = UINT64_MAX, wrong = 0;
        for (int v = 0; v < 3; v++) {
            lm_kernels k;
            if (lm_kernels_select(&k, names[v]) != 0 || k.fp8_merge == NULL) {
                fprintf(stderr, "quant fp8_merge_block_certified: variant %s SKIPPED\n", names[v]);
                continue;
            }
            uint64_t n;
            fc_run(&k, &cases[i], 900 + i, &n, &wrong);
            cr_assert(n_ref == UINT64_MAX || n == n_ref, "%s flags %llu elements, ref %llu", names[v],
                      (unsigned long long)n, (unsigned long long)n_ref);
            n_ref = n;
        }
        cr_log_info("case %zu: %llu exact values; the f32 values get %llu codes wrong", i, (unsigned long long)n_ref,
                    (unsigned long long)wrong);
        cr_assert(wrong > 0, "case %zu: the f32 values get every code right: not adversarial", i);
    }
}
