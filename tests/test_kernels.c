/* SPDX-License-Identifier: MIT */
/* test_kernels.c : the numeric kernels.  Two kinds of check:
 *  - the reference (convert_ref.c) against independent computations in double arithmetic
 *    (ldexp decoding, round-to-nearest-even by choosing the nearer neighbour, Figueroa's double
 *    rounding bound for axpy), over edge values, every rounding boundary and random bits;
 *  - every SIMD variant against the reference bit for bit: all 65,536 16-bit inputs, every f32
 *    class, >= 4 M random bit patterns, every length 0..67 and misaligned pointers.
 * Variants this CPU cannot run are skipped, visibly.  Random seeds are printed; LM_TEST_SEED
 * repeats a run.  LM_TEST_EXHAUSTIVE=1 enables the test of all 2^32 floats (minutes). */
#include <criterion/criterion.h>

#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lm_kernels.h"

#define KT_N_RANDOM (4u << 20) /* random f32 bit patterns per run */

/* ---- helpers ------------------------------------------------------------------------------- */

typedef struct kt_rng {
    uint64_t state;
} kt_rng;

static uint64_t kt_next(kt_rng *r) /* splitmix64 */
{
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t kt_seed(const char *what)
{
    const char *env = getenv("LM_TEST_SEED");
    uint64_t seed = (env && env[0]) ? strtoull(env, NULL, 0) : (uint64_t)time(NULL);
    /* stderr, because Criterion shows log messages only with --verbose */
    fprintf(stderr, "kernels/%s: random seed %" PRIu64 " (LM_TEST_SEED=%" PRIu64 " repeats it)\n",
            what, seed, seed);
    return seed;
}

static uint64_t kt_f64_bits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static double kt_f64_from_bits(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static void *kt_alloc(size_t n_bytes)
{
    void *p = malloc(n_bytes ? n_bytes : 1);
    cr_assert_not_null(p, "out of memory (%zu bytes)", n_bytes);
    return p;
}

/* the variant named `name`, or the test is skipped (visibly: Criterion lists skips only with
 * --verbose, hence the line on stderr) when this CPU cannot run it */
static lm_kernels kt_variant(const char *name, const char *test)
{
    lm_kernels k;
    if (lm_kernels_select(&k, name) != 0) {
        const char *why = strcmp(name, "avx512") == 0 ? "AVX-512 F/BW/VL/DQ" : "AVX2+F16C+FMA";
        fprintf(stderr, "kernels/%s: SKIPPED, this CPU lacks %s\n", test, why);
        cr_skip_test("kernel variant '%s' needs %s, which this CPU lacks: not run", name, why);
    }
    cr_assert_str_eq(k.name, name);
    return k;
}

static lm_kernels kt_ref(void)
{
    lm_kernels k;
    cr_assert_eq(lm_kernels_select(&k, "ref"), 0);
    return k;
}

/* independent decoder of a binary float format with ebits exponent and mbits fraction bits */
static double kt_decode(uint32_t bits, int ebits, int mbits)
{
    const int bias = (1 << (ebits - 1)) - 1;
    const uint32_t emax = (1u << ebits) - 1u;
    const uint32_t e = (bits >> mbits) & emax;
    const uint32_t m = bits & ((1u << mbits) - 1u);
    const int neg = (bits >> (ebits + mbits)) & 1u;
    double v;
    if (e == emax)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, 1 - bias - mbits);
    else
        v = ldexp((double)(m + (1u << mbits)), (int)e - bias - mbits);
    return neg ? -v : v;
}

/* x rounded to nearest, ties to even, in a format with p significand bits, minimum normal
 * exponent emin and maximum exponent emax (overflow -> inf), computed exactly in double:
 * scale to units of the target ulp (a power of two), take the nearer of floor and floor+1. */
static double kt_round_rne(double x, int p, int emin, int emax)
{
    if (isnan(x) || isinf(x) || x == 0)
        return x;
    const double a = fabs(x);
    int e;
    frexp(a, &e); /* a = f * 2^e, f in [0.5, 1): leading bit has weight 2^(e-1) */
    int ex = e - 1;
    if (ex < emin)
        ex = emin; /* subnormal range: fixed ulp */
    const double ulp = ldexp(1.0, ex - (p - 1));
    const double q = a / ulp;
    double lo = floor(q);
    const double frac = q - lo;
    if (frac > 0.5 || (frac == 0.5 && fmod(lo, 2.0) != 0.0))
        lo += 1.0;
    double r = lo * ulp;
    if (r >= ldexp(1.0, emax + 1))
        r = INFINITY;
    return copysign(r, x);
}

/* f32 inputs: every class, every bf16 and f16 rounding boundary, random bit patterns, and random
 * values inside the f16 exponent range.  Caller frees. */
static float *kt_f32_inputs(size_t *n_out, kt_rng *rng)
{
    static const uint32_t edges[] = {
        0x00000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x3F800000, 0x7F7FFFFF, 0x7F800000,
        0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7FA00000, 0x7F802000, 0x7F801FFF,
        0x7F810000, 0x7F8000FF, 0x7FC00001, 0x7FE00000, 0x477FE000, 0x477FEFFF, 0x477FF000,
        0x477FF001, 0x47800000, 0x38800000, 0x387FFFFF, 0x33000000, 0x33000001, 0x32FFFFFF,
        0x33800000, 0x33C00000, 0x34200000, 0x7F7F8000, 0x7F7F7FFF, 0x3F808000, 0x3F818000,
    };
    const size_t n_edges = sizeof edges / sizeof edges[0];
    const size_t n_bf16 = 65536u * 6u;
    const size_t n_f16 = 0x7C00u * 6u * 2u;
    const size_t n_f16_rand = 1u << 20;
    const size_t cap = 2 * n_edges + n_bf16 + n_f16 + KT_N_RANDOM + n_f16_rand;
    float *v = kt_alloc(cap * sizeof *v);
    size_t n = 0;
    for (size_t i = 0; i < n_edges; i++) {
        v[n++] = lm_f32_from_bits(edges[i]);
        v[n++] = lm_f32_from_bits(edges[i] ^ 0x80000000u);
    }
    /* bf16: around the rounding point of every 16-bit prefix (ties, both sides, extremes) */
    static const uint32_t lows[6] = {0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF};
    for (uint32_t h = 0; h < 65536u; h++)
        for (int j = 0; j < 6; j++)
            v[n++] = lm_f32_from_bits(h << 16 | lows[j]);
    /* f16: every finite value, its neighbours in f32, and the exact midpoint to the next f16
     * (the one after 65504 is 65536, the overflow boundary), with its neighbours */
    for (uint32_t h = 0; h < 0x7C00u; h++) {
        const float a = (float)kt_decode(h, 5, 10);
        const float b = h + 1 < 0x7C00u ? (float)kt_decode(h + 1, 5, 10) : 65536.0f;
        const float mid = (float)(((double)a + (double)b) / 2);
        const float six[6] = {a, nextafterf(a, INFINITY), nextafterf(a, 0.0f), mid,
                              nextafterf(mid, 0.0f), nextafterf(mid, INFINITY)};
        for (int j = 0; j < 6; j++) {
            v[n++] = six[j];
            v[n++] = -six[j];
        }
    }
    for (size_t i = 0; i < KT_N_RANDOM; i++)
        v[n++] = lm_f32_from_bits((uint32_t)kt_next(rng));
    for (size_t i = 0; i < n_f16_rand; i++) { /* exponent 2^-28 .. 2^17 */
        const uint32_t r = (uint32_t)kt_next(rng);
        const uint32_t e = 99u + (r >> 24) % 46u;
        v[n++] = lm_f32_from_bits((r & 0x807FFFFFu) | e << 23);
    }
    cr_assert_leq(n, cap);
    *n_out = n;
    return v;
}

/* f64 inputs for f64 -> f32: classes, f32 rounding boundaries, random bits and random values in
 * the f32 range */
static double *kt_f64_inputs(size_t *n_out, kt_rng *rng)
{
    const double fmin = (double)FLT_TRUE_MIN, fmax = (double)FLT_MAX;
    const double edges[] = {
        0.0, DBL_TRUE_MIN, DBL_MIN, DBL_MAX, INFINITY, fmin, fmin / 2, fmin * 1.5, fmin * 2.5,
        nextafter(fmin / 2, 0), nextafter(fmin / 2, 1), (double)FLT_MIN, fmax,
        fmax + ldexp(1.0, 103), nextafter(fmax + ldexp(1.0, 103), 0), ldexp(1.0, 128), 1.0,
        1.0 + ldexp(1.0, -24), 1.0 + 3 * ldexp(1.0, -24), kt_f64_from_bits(0x7FF8000000000000ull),
        kt_f64_from_bits(0x7FF0000000000001ull), kt_f64_from_bits(0x7FF7FFFFFFFFFFFFull),
        kt_f64_from_bits(0x7FFFFFFFFFFFFFFFull), kt_f64_from_bits(0x7FF0000020000000ull),
        kt_f64_from_bits(0x7FF000001FFFFFFFull), kt_f64_from_bits(0x7FF4000000000000ull),
    };
    const size_t n_edges = sizeof edges / sizeof edges[0];
    const size_t n_bound = 1u << 19, n_rand = 1u << 20;
    const size_t cap = 2 * n_edges + 5 * n_bound + 2 * n_rand;
    double *v = kt_alloc(cap * sizeof *v);
    size_t n = 0;
    for (size_t i = 0; i < n_edges; i++) {
        v[n++] = edges[i];
        v[n++] = -edges[i];
    }
    for (size_t i = 0; i < n_bound; i++) { /* midpoints between neighbouring floats */
        const float f = lm_f32_from_bits((uint32_t)kt_next(rng) & 0xFF7FFFFFu);
        const double a = f, b = nextafterf(f, f < 0 ? -INFINITY : INFINITY);
        const double mid = (a + b) / 2; /* exact: one more bit than f32 has */
        v[n++] = mid;
        v[n++] = nextafter(mid, 0);
        v[n++] = nextafter(mid, b * 2);
        v[n++] = a;
        v[n++] = nextafter(a, b);
    }
    for (size_t i = 0; i < n_rand; i++)
        v[n++] = kt_f64_from_bits(kt_next(rng));
    for (size_t i = 0; i < n_rand; i++) { /* biased exponent 1023-152 .. 1023+129 */
        const uint64_t r = kt_next(rng);
        const uint64_t e = 871u + (r >> 52 & 0x7FF) % 282u;
        v[n++] = kt_f64_from_bits((r & 0x800FFFFFFFFFFFFFull) | e << 52);
    }
    cr_assert_leq(n, cap);
    *n_out = n;
    return v;
}

/* first difference between two outputs, elem_bytes wide; SIZE_MAX when equal */
static size_t kt_first_diff(const void *a, const void *b, size_t n, size_t elem_bytes)
{
    if (memcmp(a, b, n * elem_bytes) == 0)
        return SIZE_MAX;
    for (size_t i = 0; i < n; i++)
        if (memcmp((const char *)a + i * elem_bytes, (const char *)b + i * elem_bytes,
                   elem_bytes) != 0)
            return i;
    return SIZE_MAX;
}

/* ---- the reference against independent computations -------------------------------------- */

Test(kernels, ref_bf16_to_f32_exact)
{
    for (uint32_t h = 0; h < 65536u; h++) {
        const uint16_t in = (uint16_t)h;
        float out;
        lm_bf16_to_f32_ref(&in, &out, 1);
        const double want = kt_decode(h, 8, 7);
        if (isnan(want)) {
            cr_assert_eq(lm_f32_bits(out), h << 16, "bf16 NaN 0x%04x must pass through", h);
        } else {
            cr_assert((double)out == want && !signbit(out) == !signbit(want),
                      "bf16 0x%04x: got %a, want %a", h, (double)out, want);
        }
        cr_assert_eq(lm_f32_bits(lm_bf16_to_f32_1(in)), lm_f32_bits(out));
    }
}

Test(kernels, ref_f16_to_f32_exact)
{
    for (uint32_t h = 0; h < 65536u; h++) {
        const uint16_t in = (uint16_t)h;
        float out;
        lm_f16_to_f32_ref(&in, &out, 1);
        const uint32_t bits = lm_f32_bits(out);
        const double want = kt_decode(h, 5, 10);
        if (isnan(want)) {
            const uint32_t want_bits =
                (h & 0x8000u) << 16 | 0x7F800000u | 0x00400000u | (h & 0x3FFu) << 13;
            cr_assert_eq(bits, want_bits, "f16 NaN 0x%04x: got 0x%08x, want quiet 0x%08x", h,
                         bits, want_bits);
        } else {
            cr_assert((double)out == want && !signbit(out) == !signbit(want),
                      "f16 0x%04x: got %a, want %a", h, (double)out, want);
        }
        cr_assert_eq(lm_f32_bits(lm_f16_to_f32_1(in)), bits);
    }
}

/* hand-checked values, so the double-based oracle below is itself anchored */
Test(kernels, ref_known_values)
{
    static const struct {
        uint32_t in, bf16, f16;
    } t[] = {
        {0x3F800000, 0x3F80, 0x3C00}, /* 1 */
        {0xC0000000, 0xC000, 0xC000}, /* -2 */
        {0x3DCCCCCD, 0x3DCD, 0x2E66}, /* 0.1 */
        {0x3EAAAAAB, 0x3EAB, 0x3555}, /* 1/3 */
        {0x3F808000, 0x3F80, 0x3C04}, /* 1 + 2^-8: bf16 tie to even (down); f16 exact */
        {0x3F818000, 0x3F82, 0x3C0C}, /* 1 + 3*2^-8: bf16 tie to even (up) */
        {0x3F801000, 0x3F80, 0x3C00}, /* 1 + 2^-11: f16 tie to even (down) */
        {0x3F803000, 0x3F80, 0x3C02}, /* 1 + 3*2^-11: f16 tie to even (up) */
        {0x477FE000, 0x4780, 0x7BFF}, /* 65504 = f16 max */
        {0x477FEFFF, 0x4780, 0x7BFF}, /* just below 65520 */
        {0x477FF000, 0x4780, 0x7C00}, /* 65520: tie, rounds to 2^16 = inf */
        {0x7F7FFFFF, 0x7F80, 0x7C00}, /* FLT_MAX: bf16 overflows to inf */
        {0x7F7F7FFF, 0x7F7F, 0x7C00}, /* largest value that stays finite in bf16 */
        {0x38800000, 0x3880, 0x0400}, /* 2^-14: smallest normal f16 */
        {0x387FC000, 0x3880, 0x03FF}, /* largest subnormal f16 */
        {0x387FE000, 0x3880, 0x0400}, /* tie above it: rounds up to the smallest normal */
        {0x33800000, 0x3380, 0x0001}, /* 2^-24: smallest subnormal f16 */
        {0x33000000, 0x3300, 0x0000}, /* 2^-25: tie to even, 0 */
        {0x33000001, 0x3300, 0x0001}, /* just above the tie */
        {0x33C00000, 0x33C0, 0x0002}, /* 1.5 * 2^-24: tie to even, 2 */
        {0x34200000, 0x3420, 0x0002}, /* 2.5 * 2^-24: tie to even, 2 */
        {0x80000001, 0x8000, 0x8000}, /* -smallest f32 subnormal */
        {0x007FFFFF, 0x0080, 0x0000}, /* largest f32 subnormal: bf16 rounds to min normal */
        {0x7F800000, 0x7F80, 0x7C00}, /* inf */
        {0xFF800000, 0xFF80, 0xFC00}, /* -inf */
        {0x7FC00000, 0x7FC0, 0x7E00}, /* quiet NaN */
        {0x7F800001, 0x7FC0, 0x7E00}, /* signalling NaN, payload only in low bits */
        {0xFF800001, 0xFFC0, 0xFE00}, /* negative signalling NaN */
        {0x7FA00000, 0x7FE0, 0x7F00}, /* signalling NaN, high payload */
        {0x7F802000, 0x7FC0, 0x7E01}, /* payload bit that survives in f16 */
        {0x7FFFFFFF, 0x7FFF, 0x7FFF},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        const float f = lm_f32_from_bits(t[i].in);
        uint16_t b, h;
        lm_f32_to_bf16_ref(&f, &b, 1);
        lm_f32_to_f16_ref(&f, &h, 1);
        cr_expect_eq(b, t[i].bf16, "bf16(0x%08x) = 0x%04x, want 0x%04x", t[i].in, b, t[i].bf16);
        cr_expect_eq(h, t[i].f16, "f16(0x%08x) = 0x%04x, want 0x%04x", t[i].in, h, t[i].f16);
    }
}

/* every NaN keeps its sign, becomes quiet and keeps the payload bits that fit */
static void kt_check_nan_bf16(uint32_t u, uint16_t out)
{
    cr_assert_eq(out, (uint16_t)((u >> 16) | 0x0040u), "bf16(NaN 0x%08x) = 0x%04x", u, out);
}

static void kt_check_nan_f16(uint32_t u, uint16_t out)
{
    const uint16_t want = (uint16_t)((u >> 16 & 0x8000u) | 0x7E00u | (u >> 13 & 0x1FFu));
    cr_assert_eq(out, want, "f16(NaN 0x%08x) = 0x%04x, want 0x%04x", u, out, want);
}

Test(kernels, ref_f32_to_bf16_f16_rne)
{
    kt_rng rng = {kt_seed("ref_f32_to_bf16_f16_rne")};
    size_t n;
    float *in = kt_f32_inputs(&n, &rng);
    uint16_t *b = kt_alloc(n * sizeof *b), *h = kt_alloc(n * sizeof *h);
    lm_f32_to_bf16_ref(in, b, n);
    lm_f32_to_f16_ref(in, h, n);
    for (size_t i = 0; i < n; i++) {
        const uint32_t u = lm_f32_bits(in[i]);
        cr_assert_eq(b[i], lm_f32_to_bf16_1(in[i]));
        cr_assert_eq(h[i], lm_f32_to_f16_1(in[i]));
        if (isnan(in[i])) {
            kt_check_nan_bf16(u, b[i]);
            kt_check_nan_f16(u, h[i]);
            continue;
        }
        const double want_b = kt_round_rne(in[i], 8, -126, 127);
        const double got_b = kt_decode(b[i], 8, 7);
        cr_assert(got_b == want_b && !signbit(got_b) == !signbit(want_b),
                  "bf16(%a = 0x%08x) = 0x%04x = %a, want %a", (double)in[i], u, b[i], got_b,
                  want_b);
        const double want_h = kt_round_rne(in[i], 11, -14, 15);
        const double got_h = kt_decode(h[i], 5, 10);
        cr_assert(got_h == want_h && !signbit(got_h) == !signbit(want_h),
                  "f16(%a = 0x%08x) = 0x%04x = %a, want %a", (double)in[i], u, h[i], got_h,
                  want_h);
    }
    free(in);
    free(b);
    free(h);
}

Test(kernels, ref_f64_to_f32_rne)
{
    kt_rng rng = {kt_seed("ref_f64_to_f32_rne")};
    size_t n;
    double *in = kt_f64_inputs(&n, &rng);
    float *out = kt_alloc(n * sizeof *out);
    double *back = kt_alloc(n * sizeof *back);
    lm_f64_to_f32_ref(in, out, n);
    lm_f32_to_f64_ref(out, back, n);
    for (size_t i = 0; i < n; i++) {
        const uint64_t u = kt_f64_bits(in[i]);
        if (isnan(in[i])) {
            const uint32_t want = (uint32_t)(u >> 32 & 0x80000000u) | 0x7FC00000u |
                                  (uint32_t)(u >> 29 & 0x003FFFFFu);
            cr_assert_eq(lm_f32_bits(out[i]), want, "f32(NaN 0x%016" PRIx64 ") = 0x%08x", u,
                         lm_f32_bits(out[i]));
        } else {
            const double want = kt_round_rne(in[i], 24, -126, 127);
            cr_assert((double)out[i] == want && !signbit(out[i]) == !signbit(want),
                      "f32(%a) = %a, want %a", in[i], (double)out[i], want);
        }
        /* f32 -> f64 is exact: the value comes back, NaNs stay NaN with their sign */
        if (isnan(out[i]))
            cr_assert(isnan(back[i]) && !signbit(back[i]) == !signbit(out[i]));
        else
            cr_assert((float)back[i] == out[i] && !signbit(back[i]) == !signbit(out[i]));
    }
    free(in);
    free(out);
    free(back);
}

/* acc + s*x with the product rounded first: double holds the exact product (48 bits), and
 * rounding a double sum of two floats to float is correct (53 >= 2*24 + 2), so this oracle has
 * exactly one rounding per operation, as the contract says.  An FMA would round once overall. */
static float kt_axpy_oracle(float acc, float s, float x)
{
    const float p = (float)((double)s * (double)x);
    return (float)((double)acc + (double)p);
}

Test(kernels, ref_axpy_no_fma)
{
    /* s*x = 1 + 2^-11 + 2^-24 exactly; rounded to f32 that is 1 + 2^-11 (tie, even), so the
     * unfused result is exactly 0 while an FMA would give 2^-24 */
    float acc = -(1.0f + 0x1p-11f);
    const float s = 1.0f + 0x1p-12f, x = 1.0f + 0x1p-12f;
    lm_axpy_ref(&acc, s, &x, 1);
    cr_assert_eq(lm_f32_bits(acc), 0u, "axpy fused the multiply-add: got %a", (double)acc);

    /* NaN results, generated (inf - inf, 0 * inf) or propagated (either sign, any payload),
     * all come out as LM_AXPY_NAN */
    float nacc[4] = {INFINITY, lm_f32_from_bits(0xFF800001u), 1.0f, lm_f32_from_bits(0x7FA00001u)};
    const float nx[4] = {-1.0f, 2.0f, lm_f32_from_bits(0xFFC12345u), lm_f32_from_bits(0xFF812345u)};
    lm_axpy_ref(nacc, INFINITY, nx, 4);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(lm_f32_bits(nacc[i]), LM_AXPY_NAN, "NaN result %d is 0x%08x", i,
                     lm_f32_bits(nacc[i]));

    kt_rng rng = {kt_seed("ref_axpy_no_fma")};
    enum { N = 1 << 18 };
    float *a = kt_alloc(N * sizeof *a), *a0 = kt_alloc(N * sizeof *a0);
    float *xs = kt_alloc(N * sizeof *xs);
    for (int round = 0; round < 8; round++) {
        /* a subnormal, a huge and random finite multipliers (bit 30 clear: no inf or NaN) */
        float sv = lm_f32_from_bits((uint32_t)kt_next(&rng) & 0xBFFFFFFFu);
        if (round == 0)
            sv = 0x1p-140f;
        else if (round == 1)
            sv = 3.0e38f;
        for (size_t i = 0; i < N; i++) {
            /* mostly values of similar magnitude, so sums cancel and round; some random bits */
            const uint64_t r = kt_next(&rng);
            if (i % 4 == 0) {
                a0[i] = lm_f32_from_bits((uint32_t)r);
                xs[i] = lm_f32_from_bits((uint32_t)(r >> 32));
            } else {
                a0[i] = (float)((int32_t)(uint32_t)r) * 0x1p-31f;
                xs[i] = (float)((int32_t)(uint32_t)(r >> 32)) * 0x1p-31f;
            }
        }
        memcpy(a, a0, N * sizeof *a);
        lm_axpy_ref(a, sv, xs, N);
        for (size_t i = 0; i < N; i++) {
            const float want = kt_axpy_oracle(a0[i], sv, xs[i]);
            if (isnan(want)) /* every NaN result is the one canonical NaN */
                cr_assert_eq(lm_f32_bits(a[i]), LM_AXPY_NAN, "axpy(%a, %a, %a) = 0x%08x, want NaN",
                             (double)a0[i], (double)sv, (double)xs[i], lm_f32_bits(a[i]));
            else
                cr_assert_eq(lm_f32_bits(a[i]), lm_f32_bits(want), "axpy(%a, %a, %a) = %a, want %a",
                             (double)a0[i], (double)sv, (double)xs[i], (double)a[i], (double)want);
        }
    }
    free(a);
    free(a0);
    free(xs);
}

/* ---- variants against the reference, bit for bit ------------------------------------------- */

static void kt_all16_to_f32(const lm_kernels *v, const char *test)
{
    (void)test;
    const lm_kernels r = kt_ref();
    uint16_t *in = kt_alloc(65536 * sizeof *in);
    float *want = kt_alloc(65536 * sizeof *want), *got = kt_alloc(65536 * sizeof *got);
    for (uint32_t i = 0; i < 65536u; i++)
        in[i] = (uint16_t)i;

    r.bf16_to_f32(in, want, 65536);
    v->bf16_to_f32(in, got, 65536);
    size_t d = kt_first_diff(want, got, 65536, sizeof *got);
    cr_assert_eq(d, SIZE_MAX, "%s bf16_to_f32(0x%04zx) = 0x%08x, ref 0x%08x", v->name, d,
                 d == SIZE_MAX ? 0 : lm_f32_bits(got[d]), d == SIZE_MAX ? 0 : lm_f32_bits(want[d]));

    r.f16_to_f32(in, want, 65536);
    v->f16_to_f32(in, got, 65536);
    d = kt_first_diff(want, got, 65536, sizeof *got);
    cr_assert_eq(d, SIZE_MAX, "%s f16_to_f32(0x%04zx) = 0x%08x, ref 0x%08x", v->name, d,
                 d == SIZE_MAX ? 0 : lm_f32_bits(got[d]), d == SIZE_MAX ? 0 : lm_f32_bits(want[d]));
    free(in);
    free(want);
    free(got);
}

static void kt_f32_to_16(const lm_kernels *v, const char *test)
{
    const lm_kernels r = kt_ref();
    kt_rng rng = {kt_seed(test)};
    size_t n;
    float *in = kt_f32_inputs(&n, &rng);
    uint16_t *want = kt_alloc(n * sizeof *want), *got = kt_alloc(n * sizeof *got);

    r.f32_to_bf16(in, want, n);
    v->f32_to_bf16(in, got, n);
    size_t d = kt_first_diff(want, got, n, sizeof *got);
    cr_assert_eq(d, SIZE_MAX, "%s f32_to_bf16(0x%08x) = 0x%04x, ref 0x%04x", v->name,
                 d == SIZE_MAX ? 0 : lm_f32_bits(in[d]), d == SIZE_MAX ? 0 : got[d],
                 d == SIZE_MAX ? 0 : want[d]);

    r.f32_to_f16(in, want, n);
    v->f32_to_f16(in, got, n);
    d = kt_first_diff(want, got, n, sizeof *got);
    cr_assert_eq(d, SIZE_MAX, "%s f32_to_f16(0x%08x) = 0x%04x, ref 0x%04x", v->name,
                 d == SIZE_MAX ? 0 : lm_f32_bits(in[d]), d == SIZE_MAX ? 0 : got[d],
                 d == SIZE_MAX ? 0 : want[d]);
    free(in);
    free(want);
    free(got);
}

static void kt_f64(const lm_kernels *v, const char *test)
{
    const lm_kernels r = kt_ref();
    kt_rng rng = {kt_seed(test)};
    size_t n;
    double *in = kt_f64_inputs(&n, &rng);
    float *want = kt_alloc(n * sizeof *want), *got = kt_alloc(n * sizeof *got);
    r.f64_to_f32(in, want, n);
    v->f64_to_f32(in, got, n);
    size_t d = kt_first_diff(want, got, n, sizeof *got);
    cr_assert_eq(d, SIZE_MAX, "%s f64_to_f32(0x%016" PRIx64 ") = 0x%08x, ref 0x%08x", v->name,
                 d == SIZE_MAX ? 0 : kt_f64_bits(in[d]), d == SIZE_MAX ? 0 : lm_f32_bits(got[d]),
                 d == SIZE_MAX ? 0 : lm_f32_bits(want[d]));
    free(in);
    free(want);
    free(got);

    float *fin = kt_f32_inputs(&n, &rng);
    double *dwant = kt_alloc(n * sizeof *dwant), *dgot = kt_alloc(n * sizeof *dgot);
    r.f32_to_f64(fin, dwant, n);
    v->f32_to_f64(fin, dgot, n);
    d = kt_first_diff(dwant, dgot, n, sizeof *dgot);
    cr_assert_eq(d, SIZE_MAX, "%s f32_to_f64(0x%08x) = 0x%016" PRIx64 ", ref 0x%016" PRIx64,
                 v->name, d == SIZE_MAX ? 0 : lm_f32_bits(fin[d]),
                 d == SIZE_MAX ? 0 : kt_f64_bits(dgot[d]),
                 d == SIZE_MAX ? 0 : kt_f64_bits(dwant[d]));
    free(fin);
    free(dwant);
    free(dgot);
}

static void kt_axpy(const lm_kernels *v, const char *test)
{
    const lm_kernels r = kt_ref();
    kt_rng rng = {kt_seed(test)};
    enum { N = 1 << 18 };
    float *a0 = kt_alloc(N * sizeof *a0), *x = kt_alloc(N * sizeof *x);
    float *want = kt_alloc(N * sizeof *want), *got = kt_alloc(N * sizeof *got);
    const float specials[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 0x1p-140f, 3.0e38f, -7.25f,
                              INFINITY, -INFINITY, NAN, lm_f32_from_bits(0xFF800001u)};
    const size_t n_specials = sizeof specials / sizeof specials[0];
    for (size_t round = 0; round < n_specials + 4; round++) {
        const float s = round < n_specials ? specials[round]
                                           : lm_f32_from_bits((uint32_t)kt_next(&rng));
        for (size_t i = 0; i < N; i++) {
            const uint64_t b = kt_next(&rng);
            if (i % 2) {
                a0[i] = lm_f32_from_bits((uint32_t)b);
                x[i] = lm_f32_from_bits((uint32_t)(b >> 32));
            } else {
                a0[i] = (float)(int32_t)(uint32_t)b * 0x1p-31f;
                x[i] = (float)(int32_t)(uint32_t)(b >> 32) * 0x1p-30f;
            }
        }
        memcpy(want, a0, N * sizeof *want);
        memcpy(got, a0, N * sizeof *got);
        r.axpy(want, s, x, N);
        v->axpy(got, s, x, N);
        for (size_t i = 0; i < N; i++)
            cr_assert(lm_f32_bits(got[i]) == lm_f32_bits(want[i]),
                      "%s axpy(acc 0x%08x, s 0x%08x, x 0x%08x) = 0x%08x, ref 0x%08x", v->name,
                      lm_f32_bits(a0[i]), lm_f32_bits(s), lm_f32_bits(x[i]), lm_f32_bits(got[i]),
                      lm_f32_bits(want[i]));
    }
    free(a0);
    free(x);
    free(want);
    free(got);
}

/* every length 0..67 (all tails of every loop), source and destination each offset by 0..3
 * elements; buffers are exactly as long as needed, so ASan sees any overread, and the
 * destination has guard elements on both sides that must stay untouched */
enum {
    KT_BF16_F32, KT_F32_BF16, KT_F16_F32, KT_F32_F16, KT_AXPY, KT_F64_F32, KT_F32_F64, KT_N_OPS
};
static const char *const kt_op_names[KT_N_OPS] = {"bf16_to_f32", "f32_to_bf16", "f16_to_f32",
                                                  "f32_to_f16",  "axpy",        "f64_to_f32",
                                                  "f32_to_f64"};
static const size_t kt_src_bytes[KT_N_OPS] = {2, 4, 2, 4, 4, 8, 4};
static const size_t kt_dst_bytes[KT_N_OPS] = {4, 2, 4, 2, 4, 4, 8};

static void kt_call(const lm_kernels *k, int op, const void *src, void *dst, size_t n)
{
    switch (op) {
    case KT_BF16_F32: k->bf16_to_f32(src, dst, n); break;
    case KT_F32_BF16: k->f32_to_bf16(src, dst, n); break;
    case KT_F16_F32: k->f16_to_f32(src, dst, n); break;
    case KT_F32_F16: k->f32_to_f16(src, dst, n); break;
    case KT_AXPY: k->axpy(dst, -1.75f, src, n); break;
    case KT_F64_F32: k->f64_to_f32(src, dst, n); break;
    case KT_F32_F64: k->f32_to_f64(src, dst, n); break;
    default: cr_assert_fail("bad op %d", op);
    }
}

static void kt_tails(const lm_kernels *v, const char *test)
{
    enum { GUARD = 4, MAX_N = 67 };
    const lm_kernels r = kt_ref();
    kt_rng rng = {kt_seed(test)};
    unsigned char init[(MAX_N + 3 + 2 * GUARD) * 8], want[MAX_N * 8];
    for (int op = 0; op < KT_N_OPS; op++) {
        const size_t sb = kt_src_bytes[op], db = kt_dst_bytes[op];
        for (size_t n = 0; n <= MAX_N; n++) {
            for (size_t soff = 0; soff < 4; soff++) {
                for (size_t doff = 0; doff < 4; doff++) {
                    unsigned char *src = kt_alloc((soff + n) * sb);
                    const size_t dst_bytes = (doff + n + GUARD) * db;
                    unsigned char *dst = kt_alloc(dst_bytes);
                    for (size_t i = 0; i < (soff + n) * sb; i++)
                        src[i] = (unsigned char)kt_next(&rng);
                    if (op == KT_AXPY) /* small finite accumulators and inputs, plus random */
                        for (size_t i = soff; i < soff + n; i += 2) {
                            const float f = (float)(int32_t)(uint32_t)kt_next(&rng) * 0x1p-31f;
                            memcpy(src + i * sb, &f, sizeof f);
                        }
                    for (size_t i = 0; i < dst_bytes; i++)
                        init[i] = (unsigned char)(0xA5 ^ i);
                    memcpy(dst, init, dst_bytes);
                    memcpy(want, init + doff * db, n * db);
                    kt_call(&r, op, src + soff * sb, want, n);
                    kt_call(v, op, src + soff * sb, dst + doff * db, n);
                    cr_assert(memcmp(dst, init, doff * db) == 0 &&
                                  memcmp(dst + (doff + n) * db, init + (doff + n) * db,
                                         GUARD * db) == 0,
                              "%s %s n=%zu src+%zu dst+%zu wrote outside [0, n)", v->name,
                              kt_op_names[op], n, soff, doff);
                    cr_assert(memcmp(dst + doff * db, want, n * db) == 0,
                              "%s %s n=%zu src+%zu dst+%zu differs from ref", v->name,
                              kt_op_names[op], n, soff, doff);
                    free(src);
                    free(dst);
                }
            }
        }
    }
}

Test(kernels, ref_tails_misaligned)
{
    /* the ref against itself element by element: checks the guards and the harness */
    const lm_kernels r = kt_ref();
    kt_tails(&r, "ref_tails_misaligned");
}

typedef void (*kt_check_fn)(const lm_kernels *v, const char *test);

static void kt_run(const char *variant, const char *test, kt_check_fn check)
{
    const lm_kernels v = kt_variant(variant, test);
    check(&v, test);
}

Test(kernels, avx2_all_16bit_inputs)
{
    kt_run("avx2", "avx2_all_16bit_inputs", kt_all16_to_f32);
}

Test(kernels, avx2_f32_to_bf16_f16)
{
    kt_run("avx2", "avx2_f32_to_bf16_f16", kt_f32_to_16);
}

Test(kernels, avx2_f64_f32)
{
    kt_run("avx2", "avx2_f64_f32", kt_f64);
}

Test(kernels, avx2_axpy)
{
    kt_run("avx2", "avx2_axpy", kt_axpy);
}

Test(kernels, avx2_tails_misaligned)
{
    kt_run("avx2", "avx2_tails_misaligned", kt_tails);
}

Test(kernels, avx512_all_16bit_inputs)
{
    kt_run("avx512", "avx512_all_16bit_inputs", kt_all16_to_f32);
}

Test(kernels, avx512_f32_to_bf16_f16)
{
    kt_run("avx512", "avx512_f32_to_bf16_f16", kt_f32_to_16);
}

Test(kernels, avx512_f64_f32)
{
    kt_run("avx512", "avx512_f64_f32", kt_f64);
}

Test(kernels, avx512_axpy)
{
    kt_run("avx512", "avx512_axpy", kt_axpy);
}

Test(kernels, avx512_tails_misaligned)
{
    kt_run("avx512", "avx512_tails_misaligned", kt_tails);
}

/* the double oracle for one input, without asserting (usable from OpenMP threads) */
static int kt_narrow_ok(uint32_t u, uint16_t b, uint16_t h)
{
    const float f = lm_f32_from_bits(u);
    if (isnan(f))
        return b == (uint16_t)((u >> 16) | 0x0040u) &&
               h == (uint16_t)((u >> 16 & 0x8000u) | 0x7E00u | (u >> 13 & 0x1FFu));
    const double want_b = kt_round_rne(f, 8, -126, 127), got_b = kt_decode(b, 8, 7);
    const double want_h = kt_round_rne(f, 11, -14, 15), got_h = kt_decode(h, 5, 10);
    return got_b == want_b && !signbit(got_b) == !signbit(want_b) && got_h == want_h &&
           !signbit(got_h) == !signbit(want_h);
}

/* opt-in: every one of the 2^32 f32 bit patterns through both narrowing conversions, each
 * supported variant against the ref and the ref against the double oracle */
Test(kernels, exhaustive_f32, .timeout = 3600)
{
    const char *env = getenv("LM_TEST_EXHAUSTIVE");
    if (!env || strcmp(env, "1") != 0)
        cr_skip_test("all 2^32 floats: set LM_TEST_EXHAUSTIVE=1 to run (minutes)");
    lm_kernels vs[2];
    size_t n_vs = 0;
    if (lm_kernels_select(&vs[n_vs], "avx2") == 0)
        n_vs++;
    if (lm_kernels_select(&vs[n_vs], "avx512") == 0)
        n_vs++;
    enum { CHUNK = 1 << 20 };
    float *in = kt_alloc(CHUNK * sizeof *in);
    uint16_t *wb = kt_alloc(CHUNK * 2), *wh = kt_alloc(CHUNK * 2), *g = kt_alloc(CHUNK * 2);
    for (uint64_t base = 0; base < (1ull << 32); base += CHUNK) {
        for (uint32_t i = 0; i < CHUNK; i++)
            in[i] = lm_f32_from_bits((uint32_t)(base + i));
        lm_f32_to_bf16_ref(in, wb, CHUNK);
        lm_f32_to_f16_ref(in, wh, CHUNK);
        for (size_t k = 0; k < n_vs; k++) {
            vs[k].f32_to_bf16(in, g, CHUNK);
            size_t d = kt_first_diff(wb, g, CHUNK, 2);
            cr_assert_eq(d, SIZE_MAX, "%s f32_to_bf16(0x%08" PRIx64 ") differs", vs[k].name,
                         base + (d == SIZE_MAX ? 0 : d));
            vs[k].f32_to_f16(in, g, CHUNK);
            d = kt_first_diff(wh, g, CHUNK, 2);
            cr_assert_eq(d, SIZE_MAX, "%s f32_to_f16(0x%08" PRIx64 ") differs", vs[k].name,
                         base + (d == SIZE_MAX ? 0 : d));
        }
        /* the oracle is slow (frexp, fmod, ldexp per value): spread it over the cores and
         * report the first failing input from this thread */
        uint32_t first_bad = UINT32_MAX;
#pragma omp parallel for reduction(min : first_bad) schedule(static)
        for (uint32_t i = 0; i < CHUNK; i++)
            if (!kt_narrow_ok((uint32_t)(base + i), wb[i], wh[i]) && i < first_bad)
                first_bad = i;
        if (first_bad != UINT32_MAX) {
            const uint32_t u = (uint32_t)(base + first_bad);
            cr_assert_fail("ref f32 0x%08x -> bf16 0x%04x, f16 0x%04x: wrong rounding or NaN", u,
                           wb[first_bad], wh[first_bad]);
        }
    }
    free(in);
    free(wb);
    free(wh);
    free(g);
}

/* ---- selection ------------------------------------------------------------------------------ */

static int kt_is_ref_table(const lm_kernels *k)
{
    return k->bf16_to_f32 == lm_bf16_to_f32_ref && k->f32_to_bf16 == lm_f32_to_bf16_ref &&
           k->f16_to_f32 == lm_f16_to_f32_ref && k->f32_to_f16 == lm_f32_to_f16_ref &&
           k->axpy == lm_axpy_ref && k->f64_to_f32 == lm_f64_to_f32_ref &&
           k->f32_to_f64 == lm_f32_to_f64_ref && strcmp(k->name, "ref") == 0;
}

Test(kernels, select_forced_ref)
{
    setenv("LM_KERNELS", "avx2", 1); /* a forced choice ignores the environment */
    lm_kernels k;
    cr_assert_eq(lm_kernels_select(&k, "ref"), 0);
    cr_assert(kt_is_ref_table(&k), "forced ref gave '%s'", k.name);
    unsetenv("LM_KERNELS");
}

Test(kernels, select_auto_picks_best)
{
    unsetenv("LM_KERNELS");
    lm_kernels k;
    cr_assert_eq(lm_kernels_select(&k, NULL), 0);
    const char *best = lm_cpu_has_avx512() ? "avx512" : lm_cpu_has_avx2_f16c() ? "avx2" : "ref";
    cr_assert_str_eq(k.name, best);
    cr_assert_eq(lm_kernels_select(&k, "auto"), 0);
    cr_assert_str_eq(k.name, best);
    char cpu[128];
    cr_log_info("kernels: cpu '%s', auto selects '%s'", lm_cpu_name(cpu, sizeof cpu), k.name);
}

Test(kernels, select_env_override)
{
    lm_kernels k;
    setenv("LM_KERNELS", "ref", 1);
    cr_assert_eq(lm_kernels_select(&k, NULL), 0);
    cr_assert(kt_is_ref_table(&k), "LM_KERNELS=ref gave '%s'", k.name);
    if (lm_cpu_has_avx2_f16c()) {
        setenv("LM_KERNELS", "avx2", 1);
        cr_assert_eq(lm_kernels_select(&k, NULL), 0);
        cr_assert_str_eq(k.name, "avx2");
        cr_assert_eq(k.f32_to_f16, lm_f32_to_f16_avx2);
    }
    setenv("LM_KERNELS", "no-such-variant", 1);
    cr_assert_eq(lm_kernels_select(&k, NULL), -1);
    cr_assert(kt_is_ref_table(&k));
    setenv("LM_KERNELS", "", 1); /* empty means unset */
    cr_assert_eq(lm_kernels_select(&k, NULL), 0);
    unsetenv("LM_KERNELS");
}

Test(kernels, select_unsupported)
{
    unsetenv("LM_KERNELS");
    lm_kernels k;
    cr_assert_eq(lm_kernels_select(&k, "bogus"), -1);
    cr_assert(kt_is_ref_table(&k));
    const int rc512 = lm_kernels_select(&k, "avx512");
    if (lm_cpu_has_avx512()) {
        cr_assert_eq(rc512, 0);
        cr_assert_str_eq(k.name, "avx512");
    } else {
        cr_assert_eq(rc512, -1, "forcing avx512 on a CPU without it must fail");
        cr_assert(kt_is_ref_table(&k), "after a failed force the table must hold ref");
    }
    const int rc2 = lm_kernels_select(&k, "avx2");
    cr_assert_eq(rc2, lm_cpu_has_avx2_f16c() ? 0 : -1);
}

Test(kernels, cpu_name)
{
    char buf[256];
    const char *name = lm_cpu_name(buf, sizeof buf);
    cr_assert_eq(name, buf);
    cr_assert_gt(strlen(buf), 0);
    cr_assert_eq(strchr(buf, '\n'), NULL);
    char tiny[4];
    lm_cpu_name(tiny, sizeof tiny);
    cr_assert_leq(strlen(tiny), 3);
}
