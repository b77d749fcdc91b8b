/* SPDX-License-Identifier: MIT */
/* test_kernels64.c : the f64 kernels of the exact paths.  wy64 (HRA's x - ((x U^T) T) U): every
 * variant bit for bit the reference for row counts around the register blocks (1 .. 9), column
 * counts with every remainder mod 8 and ranks around the unit-vector groups (1 .. 9); the
 * reference against the same product in long double within an f64 error bound.  (f64_round:
 * tests/test_exact_method.c.) */
#include "lm_kernels.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t k64_state = 1234567;

static double k64_value(void)
{
    k64_state = k64_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(k64_state >> 11) / 9007199254740992.0 - 0.5;
}

Test(kernels64, wy64_variants_match_the_reference_and_long_double)
{
    static const char *const variants[] = {"avx2", "avx512"};
    static const size_t rows[] = {1, 2, 3, 4, 5, 9};
    static const size_t colss[] = {1, 7, 8, 9, 15, 21, 64, 75};
    static const size_t ranks[] = {1, 2, 3, 4, 5, 8, 9};
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    int compared = 0;
    for (size_t ri = 0; ri < sizeof rows / sizeof *rows; ri++)
        for (size_t ci = 0; ci < sizeof colss / sizeof *colss; ci++)
            for (size_t qi = 0; qi < sizeof ranks / sizeof *ranks; qi++) {
                const size_t nr = rows[ri], cols = colss[ci], r = ranks[qi];
                double *X = malloc(nr * cols * sizeof *X), *U = malloc(r * cols * sizeof *U), *T = malloc(r * r * sizeof *T);
                double *a = malloc(nr * cols * sizeof *a), *b = malloc(nr * cols * sizeof *b);
                double *sc = malloc((2 * nr * r + 1) * sizeof *sc);
                cr_assert(X && U && T && a && b && sc);
                for (size_t i = 0; i < nr * cols; i++)
                    X[i] = k64_value();
                for (size_t i = 0; i < r * cols; i++)
                    U[i] = k64_value();
                for (size_t i = 0; i < r * r; i++)
                    T[i] = k64_value();
                if (cols > 3) /* a signed zero and a tiny value among the inputs */
                    X[1] = -0.0, X[2] = 0x1p-1000;
                memcpy(a, X, nr * cols * sizeof *a);
                ref.wy64(a, nr, cols, U, r, T, sc);
                for (size_t i = 0; i < nr; i++) { /* long double, and a magnitude for the bound */
                    long double p[16], p2[16], mp[16], mp2[16];
                    for (size_t q = 0; q < r; q++) {
                        p[q] = mp[q] = 0;
                        for (size_t j = 0; j < cols; j++) {
                            p[q] += (long double)X[i * cols + j] * U[q * cols + j];
                            mp[q] += fabsl((long double)X[i * cols + j] * U[q * cols + j]);
                        }
                    }
                    for (size_t q = 0; q < r; q++) {
                        p2[q] = mp2[q] = 0;
                        for (size_t l = 0; l < r; l++) {
                            p2[q] += p[l] * T[l * r + q];
                            mp2[q] += mp[l] * fabsl((long double)T[l * r + q]);
                        }
                    }
                    for (size_t j = 0; j < cols; j++) {
                        long double s = 0, ms = 0;
                        for (size_t q = 0; q < r; q++) {
                            s += p2[q] * U[q * cols + j];
                            ms += mp2[q] * fabsl((long double)U[q * cols + j]);
                        }
                        const long double want = X[i * cols + j] - s;
                        const long double tol = (long double)(cols + 2 * r + 4) * 0x1p-53L * (ms + fabsl((long double)X[i * cols + j]));
                        cr_assert_leq(fabsl(a[i * cols + j] - want), tol, "rows %zu cols %zu r %zu: element %zu,%zu", nr,
                                      cols, r, i, j);
                    }
                }
                for (size_t v = 0; v < 2; v++) {
                    lm_kernels k;
                    if (lm_kernels_select(&k, variants[v]) != 0)
                        continue;
                    memcpy(b, X, nr * cols * sizeof *b);
                    k.wy64(b, nr, cols, U, r, T, sc);
                    cr_assert(memcmp(a, b, nr * cols * sizeof *a) == 0, "%s rows %zu cols %zu r %zu differs from ref",
                              variants[v], nr, cols, r);
                    compared++;
                }
                free(X), free(U), free(T), free(a), free(b), free(sc);
            }
    (void)compared;
}

/* lr64 (DoRA's f64 rows): with and without the f32 base rows, column counts around the 32-column
 * panels, row counts around the four-row blocks, ranks 1 .. 17 */
Test(kernels64, lr64_variants_match_the_reference_and_long_double)
{
    static const char *const variants[] = {"avx2", "avx512"};
    static const size_t colss[] = {5, 32, 33, 64, 70};
    static const size_t rows[] = {1, 3, 4, 5, 8};
    static const size_t ranks[] = {1, 2, 16, 17};
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    for (size_t ci = 0; ci < sizeof colss / sizeof *colss; ci++)
        for (size_t ri = 0; ri < sizeof rows / sizeof *rows; ri++)
            for (size_t ki = 0; ki < sizeof ranks / sizeof *ranks; ki++)
                for (int with_w = 0; with_w < 2; with_w++) {
                    const size_t n = colss[ci], rb = rows[ri], K = ranks[ki], full = n / LM_LR64_PANEL * LM_LR64_PANEL;
                    const size_t tail = n - full;
                    double *R = malloc(rb * K * sizeof *R), *C = malloc(K * n * sizeof *C), *Cp = malloc(K * n * sizeof *Cp);
                    double *X0 = malloc(rb * n * sizeof *X0), *a = malloc(rb * n * sizeof *a), *b = malloc(rb * n * sizeof *b);
                    float *w = malloc(rb * n * sizeof *w);
                    cr_assert(R && C && Cp && X0 && a && b && w);
                    const double s = 1.75 + k64_value();
                    for (size_t i = 0; i < rb * K; i++)
                        R[i] = k64_value();
                    for (size_t i = 0; i < K * n; i++)
                        C[i] = k64_value();
                    for (size_t i = 0; i < rb * n; i++) {
                        X0[i] = k64_value();
                        w[i] = (float)k64_value();
                    }
                    for (size_t k = 0; k < K; k++)
                        for (size_t j = 0; j < n; j++)
                            Cp[j < full ? (j / LM_LR64_PANEL) * K * LM_LR64_PANEL + k * LM_LR64_PANEL + j % LM_LR64_PANEL
                                        : full * K + k * tail + (j - full)] = C[k * n + j];
                    memcpy(a, X0, rb * n * sizeof *a);
                    ref.lr64(a, with_w ? w : NULL, s, R, Cp, K, rb, n);
                    for (size_t i = 0; i < rb; i++)
                        for (size_t j = 0; j < n; j++) {
                            long double t = 0, m = 0;
                            for (size_t k = 0; k < K; k++) {
                                t += (long double)R[i * K + k] * C[k * n + j];
                                m += fabsl((long double)R[i * K + k] * C[k * n + j]);
                            }
                            const long double base = with_w ? (long double)w[i * n + j] : (long double)X0[i * n + j];
                            const long double want = base + (long double)s * t;
                            const long double tol = (long double)(K + 3) * 0x1p-53L * (fabsl((long double)s) * m + fabsl(base));
                            cr_assert_leq(fabsl(a[i * n + j] - want), tol, "n %zu rows %zu K %zu: %zu,%zu", n, rb, K, i, j);
                        }
                    for (size_t v = 0; v < 2; v++) {
                        lm_kernels k;
                        if (lm_kernels_select(&k, variants[v]) != 0)
                            continue;
                        memcpy(b, X0, rb * n * sizeof *b);
                        k.lr64(b, with_w ? w : NULL, s, R, Cp, K, rb, n);
                        cr_assert(memcmp(a, b, rb * n * sizeof *a) == 0, "%s n %zu rows %zu K %zu w %d differs from ref",
                                  variants[v], n, rb, K, with_w);
                    }
                    free(R), free(C), free(Cp), free(X0), free(a), free(b), free(w);
                }
}
