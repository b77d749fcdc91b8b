/* SPDX-License-Identifier: MIT */
/* test_reduce.c : the reduction kernels: sums of squares (DoRA row norms) and counts of
 * non-finite values (the output check).  Every variant bit for bit the reference, on every
 * length 0..67 (every tail) and long random rows, misaligned too; the reference's sum within
 * the error bound of any summation order of the exact (long double) sum. */
#include "lm_kernels.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rs_state = 0x1234567ull;

static float rs_value(void)
{
    rs_state = rs_state * 6364136223846793005ull + 1442695040888963407ull;
    uint32_t u = (uint32_t)(rs_state >> 32);
    /* mixed magnitudes: most ordinary, some tiny and some large, subnormals too */
    float v = (float)((double)(u & 0xFFFFFF) / 16777216.0 - 0.5);
    switch (u >> 29) {
    case 0: return v * 1e-30f;
    case 1: return v * 1e15f;
    case 2: return lm_f32_from_bits(u & 0x807FFFFFu); /* subnormal */
    default: return v;
    }
}

Test(reduce, sumsq_variants_match_the_reference)
{
    static const char *const variants[] = {"avx2", "avx512"};
    float *buf = malloc((70000 + 1) * sizeof *buf);
    for (size_t i = 0; i < 70001; i++)
        buf[i] = rs_value();
    for (size_t v = 0; v < 2; v++) {
        lm_kernels k, ref;
        lm_kernels_select(&ref, "ref");
        if (lm_kernels_select(&k, variants[v]) != 0) {
            cr_log_warn("reduce: %s not available on this CPU: skipped", variants[v]);
            continue;
        }
        for (size_t off = 0; off < 2; off++) { /* misaligned by one float too */
            for (size_t n = 0; n <= 67; n++) {
                double a = ref.sumsq(buf + off, n), b = k.sumsq(buf + off, n);
                cr_assert(memcmp(&a, &b, sizeof a) == 0, "%s n=%zu off=%zu: %.17g vs %.17g", variants[v], n, off, a, b);
            }
            for (size_t n = 1000; n <= 70000; n += 23001) {
                double a = ref.sumsq(buf + off, n), b = k.sumsq(buf + off, n);
                cr_assert(memcmp(&a, &b, sizeof a) == 0, "%s n=%zu: %.17g vs %.17g", variants[v], n, a, b);
            }
        }
    }
    free(buf);
}

Test(reduce, sumsq_is_accurate)
{
    /* every term is exact in double and non-negative, so a sum of n terms in any order is within
     * (n - 1) * 2^-53 relative of the exact one (here: long double, 64-bit mantissa) */
    float *buf = malloc(4096 * sizeof *buf);
    for (size_t i = 0; i < 4096; i++)
        buf[i] = rs_value();
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    for (size_t n = 1; n <= 4096; n *= 4) {
        long double exact = 0;
        for (size_t i = 0; i < n; i++)
            exact += (long double)buf[i] * (long double)buf[i];
        double got = ref.sumsq(buf, n);
        cr_assert_leq(fabsl((long double)got - exact), exact * (long double)n * 0x1p-53L, "n=%zu: %.17g vs %.20Lg",
                      n, got, exact);
    }
    cr_assert_eq(ref.sumsq(buf, 0), 0.0);
    free(buf);
}

Test(reduce, nonfinite_counts_match_the_reference)
{
    static const char *const variants[] = {"avx2", "avx512"};
    enum { N = 1000 };
    float f[N + 1];
    uint16_t h[N + 1];
    size_t want_f = 0, want_b = 0;
    for (size_t i = 0; i < N + 1; i++) {
        rs_state = rs_state * 6364136223846793005ull + 1442695040888963407ull;
        uint32_t u = (uint32_t)(rs_state >> 32);
        /* 1 in 8: an inf or a NaN (any payload, either sign) */
        f[i] = (u & 7) == 0 ? lm_f32_from_bits((u & 0x807FFFFFu) | 0x7F800000u) : rs_value();
        h[i] = (uint16_t)((u & 7) == 1 ? (0x7F80u | (u >> 16 & 0x807Fu)) : (u >> 16 & 0x7F7Fu));
    }
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    for (size_t i = 1; i < N + 1; i++) { /* independent counts (offset 1: misaligned) */
        want_f += isnan(f[i]) || isinf(f[i]);
        want_b += (h[i] & 0x7F80u) == 0x7F80u;
    }
    cr_assert_eq(ref.count_nonfinite_f32(f + 1, N), want_f);
    cr_assert_eq(ref.count_nonfinite_16(h + 1, N, 0x7F80u), want_b);
    for (size_t v = 0; v < 2; v++) {
        lm_kernels k;
        if (lm_kernels_select(&k, variants[v]) != 0) {
            cr_log_warn("reduce: %s not available on this CPU: skipped", variants[v]);
            continue;
        }
        for (size_t n = 0; n <= N; n += (n < 70 ? 1 : 97)) {
            cr_assert_eq(k.count_nonfinite_f32(f + 1, n), ref.count_nonfinite_f32(f + 1, n), "%s f32 n=%zu", variants[v], n);
            cr_assert_eq(k.count_nonfinite_16(h + 1, n, 0x7F80u), ref.count_nonfinite_16(h + 1, n, 0x7F80u), "%s bf16 n=%zu",
                         variants[v], n);
            cr_assert_eq(k.count_nonfinite_16(h + 1, n, 0x7C00u), ref.count_nonfinite_16(h + 1, n, 0x7C00u), "%s f16 n=%zu",
                         variants[v], n);
        }
    }
}

/* what a merge changed: elements that differ between two arrays, every variant as the reference,
 * every length up to 70 and misaligned starts */
Test(reduce, diff_counts_match_the_reference)
{
    static const char *const variants[] = {"avx2", "avx512"};
    enum { N = 1000 };
    uint16_t a16[N + 1], b16[N + 1];
    uint32_t a32[N + 1], b32[N + 1];
    size_t want16 = 0, want32 = 0;
    for (size_t i = 0; i < N + 1; i++) {
        rs_state = rs_state * 6364136223846793005ull + 1442695040888963407ull;
        uint32_t u = (uint32_t)(rs_state >> 32);
        a16[i] = (uint16_t)u;
        a32[i] = u;
        /* 1 in 3 differs, sometimes in one bit only (the sign, the lowest) */
        b16[i] = (uint16_t)((u % 3) == 0 ? a16[i] ^ (1u << (u >> 28)) : a16[i]);
        b32[i] = (u % 3) == 1 ? a32[i] ^ (1u << (u >> 27)) : a32[i];
        if (i > 0) {
            want16 += a16[i] != b16[i];
            want32 += a32[i] != b32[i];
        }
    }
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    cr_assert_eq(ref.count_diff_16(a16 + 1, b16 + 1, N), want16);
    cr_assert_eq(ref.count_diff_32(a32 + 1, b32 + 1, N), want32);
    cr_assert_gt(want16, N / 5);
    for (size_t v = 0; v < 2; v++) {
        lm_kernels k;
        if (lm_kernels_select(&k, variants[v]) != 0) {
            cr_log_warn("reduce: %s not available on this CPU: skipped", variants[v]);
            continue;
        }
        for (size_t n = 0; n <= N; n += (n < 70 ? 1 : 97)) {
            cr_assert_eq(k.count_diff_16(a16 + 1, b16 + 1, n), ref.count_diff_16(a16 + 1, b16 + 1, n), "%s 16 n=%zu",
                         variants[v], n);
            cr_assert_eq(k.count_diff_32(a32 + 1, b32 + 1, n), ref.count_diff_32(a32 + 1, b32 + 1, n), "%s 32 n=%zu",
                         variants[v], n);
        }
    }
}
