/* SPDX-License-Identifier: MIT */
/* reduce_ref.c : reductions, the reference: counts of non-finite values (f32, and bf16/f16
 * given their exponent mask), counts of elements that differ between two arrays (what a merge
 * changed), and sums of squares in double.  Element i goes to lane i mod 16
 * (each square of an f32 is exact in double, so an FMA would change nothing), and the 16 lanes
 * are added in a fixed tree: every variant that keeps the lanes gives the same bits, and 16
 * independent sums run at the adder's throughput, not its latency. */
#include "lm_kernels.h"

double lm_sumsq_lanes(const double *l)
{
    double a[8];
    for (int i = 0; i < 8; i++)
        a[i] = l[i] + l[i + 8];
    for (int i = 0; i < 4; i++)
        a[i] = a[i] + a[i + 4];
    return (a[0] + a[2]) + (a[1] + a[3]);
}

void lm_sumsq_ref_tail(const float *x, size_t n, double *lanes)
{
    for (size_t i = 0; i < n; i++)
        lanes[i % 16] += (double)x[i] * (double)x[i];
}

double lm_sumsq_ref(const float *x, size_t n)
{
    double lanes[16] = {0};
    lm_sumsq_ref_tail(x, n, lanes);
    return lm_sumsq_lanes(lanes);
}

size_t lm_count_nonfinite_f32_ref(const float *x, size_t n)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += (lm_f32_bits(x[i]) & 0x7F800000u) == 0x7F800000u;
    return bad;
}

size_t lm_count_nonfinite_16_ref(const uint16_t *x, size_t n, uint16_t exp_mask)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += (x[i] & exp_mask) == exp_mask;
    return bad;
}

size_t lm_count_diff_16_ref(const uint16_t *a, const uint16_t *b, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += a[i] != b[i];
    return c;
}

size_t lm_count_diff_32_ref(const uint32_t *a, const uint32_t *b, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += a[i] != b[i];
    return c;
}
