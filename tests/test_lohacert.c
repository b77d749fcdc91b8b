/* SPDX-License-Identifier: MIT */
/* test_lohacert.c : the certified LoHa kernel (loha_cert, kernels/lohacert_*.c): every variant bit
 * for bit the reference (output bits, uncertain bits, the flag, the changes counted) for widths
 * around the 16- and 32-column blocks, row counts around the 2- and 4-row blocks, ranks 1 .. 17,
 * bf16 and f16 outputs, inputs in f32 or in the output's dtype (then the changes counted against a
 * count made here); and
 * the reference's certified elements checked against the value computed here in long double,
 * x + (P1 P2) s with P_j = sum_p B_j[q][p] A_j[p][c], rounded once: with a valid bound (loha.c's
 * form: R[q] cc[c] >= the f32 products' error), every certified element is that value's rounding,
 * and no inf/NaN (NaNs with every payload bit set included) is certified. */
#include "lm_kernels.h"
#include "th.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t lt_state = 1234567;

static float lt_value(void)
{
    lt_state = lt_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(lt_state >> 40) / 16777216.0 - 0.5);
}

Test(lohacert, variants_match_the_reference_which_certifies_soundly)
{
    static const char *const variants[] = {"avx2", "avx512"};
    static const size_t widths[] = {5, 16, 31, 32, 47, 64, 96, 113};
    static const size_t nrows[] = {1, 2, 3, 4, 5, 9};
    static const size_t ranks[] = {1, 4, 16, 17};
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    size_t certified = 0, uncertain = 0;
    for (size_t wi = 0; wi < sizeof widths / sizeof *widths; wi++)
        for (size_t ni = 0; ni < sizeof nrows / sizeof *nrows; ni++)
            for (size_t ki = 0; ki < sizeof ranks / sizeof *ranks; ki++) {
                const size_t cols = widths[wi], nr = nrows[ni], r = ranks[ki], P = LM_LOHA_PANEL;
                const size_t np = (cols + P - 1) / P, nw = (cols + 15) / 16;
                const int bf16 = (int)((wi + ni + ki) % 2);
                const lm_kdtype out = bf16 ? LM_KDT_BF16 : LM_KDT_F16;
                float *A[2], *Ap[2], *B[2], *x = malloc(nr * cols * sizeof *x), *cc = malloc(cols * sizeof *cc);
                float *R = malloc(nr * sizeof *R);
                uint16_t *x16 = malloc(nr * cols * 2);
                uint16_t *d0 = malloc(nr * cols * 2), *d1 = malloc(nr * cols * 2);
                uint16_t *u0 = malloc(nr * nw * 2), *u1 = malloc(nr * nw * 2);
                cr_assert(x && cc && R && x16 && d0 && d1 && u0 && u1);
                const float s = 0.75f + lt_value();
                for (int j = 0; j < 2; j++) {
                    A[j] = malloc(r * cols * sizeof(float));
                    Ap[j] = calloc(np * r * P, sizeof(float));
                    B[j] = malloc(nr * r * sizeof(float));
                    cr_assert(A[j] && Ap[j] && B[j]);
                    for (size_t e = 0; e < r * cols; e++)
                        A[j][e] = lt_value();
                    for (size_t e = 0; e < nr * r; e++)
                        B[j][e] = lt_value() * 0.5f;
                    for (size_t p = 0; p < r; p++)
                        for (size_t c = 0; c < cols; c++)
                            Ap[j][(c / P) * r * P + p * P + c % P] = A[j][p * cols + c];
                }
                /* the bound's factors as loha.c forms them (generously): each f32 product within
                 * (r + 2) 2^-24 ||b|| ||a|| of P_j, then the Hadamard product and the scaling */
                const double g = (double)(r + 2) * 0x1p-24 * 1.01, S = fabs((double)s);
                const double kappa = (0x1.01p-23 * S * (1 + g) * (1 + g) + S * g * (3 + 2 * g)) * 1.01;
                for (size_t c = 0; c < cols; c++) {
                    double n1 = 0, n2 = 0;
                    for (size_t p = 0; p < r; p++) {
                        n1 += (double)A[0][p * cols + c] * A[0][p * cols + c];
                        n2 += (double)A[1][p * cols + c] * A[1][p * cols + c];
                    }
                    cc[c] = (float)((sqrt(n1) + 0x1p-62) * (sqrt(n2) + 0x1p-62) * 1.001);
                }
                long double *v = malloc(nr * cols * sizeof *v);
                cr_assert(v != NULL);
                for (size_t q = 0; q < nr; q++) {
                    double m1 = 0, m2 = 0;
                    for (size_t p = 0; p < r; p++) {
                        m1 += (double)B[0][q * r + p] * B[0][q * r + p];
                        m2 += (double)B[1][q * r + p] * B[1][q * r + p];
                    }
                    R[q] = (float)(kappa * (sqrt(m1) + 0x1p-62) * (sqrt(m2) + 0x1p-62) * 1.001);
                    for (size_t c = 0; c < cols; c++) {
                        long double p1 = 0, p2 = 0;
                        for (size_t p = 0; p < r; p++) {
                            p1 += (long double)B[0][q * r + p] * A[0][p * cols + c];
                            p2 += (long double)B[1][q * r + p] * A[1][p * cols + c];
                        }
                        const long double d = p1 * p2 * (long double)s;
                        float xv = lt_value() * (bf16 ? 4.0f : 0.5f);
                        if (c % 5 == 2) /* the result near a midpoint */
                            xv = th_near_mid(xv + (float)d, bf16, (int)(c % 7) - 3) - (float)d;
                        if (c % 11 == 4) /* cancelling: the result tiny */
                            xv = -(float)d;
                        x[q * cols + c] = xv;
                    }
                }
                if (cols > 8) { /* special values */
                    x[0] = 0.0f, x[1] = -0.0f, x[2] = 0x1p-140f, x[3] = bf16 ? 0x1p127f : 70000.0f;
                    x[4 + nr % 2] = nr % 2 ? INFINITY : NAN;
                    /* NaNs whose bits plus a rounding increment carry out of the exponent */
                    x[6] = lm_f32_from_bits(0x7FFFFFFFu), x[7] = lm_f32_from_bits(0xFFFFFFFFu);
                }
                /* the input in f32 or in the output's dtype (then the changes counted): x16 its bits,
                 * x its values, v the exact results from them */
                const lm_kdtype in = (wi + ki) % 3 == 0 ? LM_KDT_F32 : out;
                for (size_t e = 0; e < nr * cols && in != LM_KDT_F32; e++) {
                    x16[e] = bf16 ? lm_f32_to_bf16_1(x[e]) : lm_f32_to_f16_1(x[e]);
                    x[e] = bf16 ? lm_bf16_to_f32_1(x16[e]) : lm_f16_to_f32_1(x16[e]);
                }
                for (size_t q = 0; q < nr; q++)
                    for (size_t c = 0; c < cols; c++) {
                        long double p1 = 0, p2 = 0;
                        for (size_t p = 0; p < r; p++) {
                            p1 += (long double)B[0][q * r + p] * A[0][p * cols + c];
                            p2 += (long double)B[1][q * r + p] * A[1][p * cols + c];
                        }
                        v[q * cols + c] = (long double)x[q * cols + c] + p1 * p2 * (long double)s;
                    }
                const void *xin = in == LM_KDT_F32 ? (const void *)x : (const void *)x16;
                const lm_lohacert lc = {{Ap[0], Ap[1]}, cc, r, cols, s, in, out, in != LM_KDT_F32};
                memset(u0, 0xA5, nr * nw * 2);
                uint64_t ch0 = 7, ch1;
                const unsigned any0 = ref.loha_cert(xin, nr, B[0], B[1], R, &lc, d0, u0, &ch0);
                if (in != LM_KDT_F32) { /* the changes, counted here */
                    uint64_t want = 7;
                    for (size_t e = 0; e < nr * cols; e++)
                        want += d0[e] != x16[e];
                    cr_assert_eq(ch0, want, "cols %zu rows %zu r %zu: %llu changes counted, %llu", cols, nr, r,
                                 (unsigned long long)ch0, (unsigned long long)want);
                } else {
                    cr_assert_eq(ch0, 7);
                }
                unsigned seen = 0;
                for (size_t q = 0; q < nr; q++) {
                    cr_assert(cols % 16 == 0 || (u0[q * nw + nw - 1] >> (cols % 16)) == 0, "bits past the row's end");
                    for (size_t c = 0; c < cols; c++) {
                        const unsigned u = (u0[q * nw + c / 16] >> (c % 16)) & 1u;
                        seen |= u;
                        if (u) {
                            uncertain++;
                            continue;
                        }
                        certified++;
                        const long double want = v[q * cols + c];
                        cr_assert(isfinite(want), "cols %zu rows %zu r %zu: element (%zu, %zu) certified, value not finite",
                                  cols, nr, r, q, c);
                        const uint16_t bits = lm_f64_to_16_1((double)want, out);
                        cr_assert(bits == d0[q * cols + c], "cols %zu rows %zu r %zu: element (%zu, %zu) certified as %04x, "
                                  "the value %.20Lg rounds to %04x", cols, nr, r, q, c, d0[q * cols + c], want, bits);
                    }
                }
                cr_assert_eq(any0 != 0, seen != 0);
                for (size_t vi = 0; vi < 2; vi++) {
                    lm_kernels k;
                    if (lm_kernels_select(&k, variants[vi]) != 0)
                        continue;
                    memset(d1, 0x5A, nr * cols * 2);
                    memset(u1, 0x5A, nr * nw * 2);
                    ch1 = 7;
                    const unsigned any1 = k.loha_cert(xin, nr, B[0], B[1], R, &lc, d1, u1, &ch1);
                    cr_assert_eq(ch1, ch0, "%s cols %zu rows %zu r %zu: the changes differ", variants[vi], cols, nr, r);
                    cr_assert((any0 != 0) == (any1 != 0), "%s cols %zu rows %zu r %zu: the flag differs", variants[vi],
                              cols, nr, r);
                    cr_assert(memcmp(u0, u1, nr * nw * 2) == 0, "%s cols %zu rows %zu r %zu: unc differs", variants[vi],
                              cols, nr, r);
                    for (size_t e = 0; e < nr * cols; e++)
                        cr_assert(d0[e] == d1[e], "%s cols %zu rows %zu r %zu: element %zu %04x, ref %04x", variants[vi],
                                  cols, nr, r, e, d1[e], d0[e]);
                }
                for (int j = 0; j < 2; j++)
                    free(A[j]), free(Ap[j]), free(B[j]);
                free(x), free(x16), free(cc), free(R), free(d0), free(d1), free(u0), free(u1), free(v);
            }
    /* both kinds occur: the comparison covers the certification, not only the rounding */
    cr_assert(certified > 2 * uncertain && uncertain > 100, "certified %zu, uncertain %zu", certified, uncertain);
}
