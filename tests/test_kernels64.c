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
    static const size_t rows[] = {1, 2, 3, 4, 5, 7, 9};
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
 * panels, row counts around the four-row blocks and the eight-row groups, ranks 1 .. 17; the rows'
 * sums of squares (asked for or not) against long double, and bit for bit in every variant */
Test(kernels64, lr64_variants_match_the_reference_and_long_double)
{
    static const char *const variants[] = {"avx2", "avx512"};
    static const size_t colss[] = {5, 32, 33, 64, 70};
    static const size_t rows[] = {1, 3, 4, 5, 8, 13};
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
                    double *sa = malloc(2 * rb * sizeof *sa), *sb = malloc(2 * rb * sizeof *sb);
                    float *w = malloc(rb * n * sizeof *w);
                    cr_assert(R && C && Cp && X0 && a && b && w && sa && sb);
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
                    for (size_t i = 0; i < 2 * rb; i++)
                        sa[i] = sb[i] = -1.0;
                    ref.lr64(a, with_w ? w : NULL, s, R, Cp, K, rb, n, sa, sa + rb);
                    for (size_t i = 0; i < rb; i++) {
                        long double x2 = 0, w2 = 0;
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
                            x2 += (long double)a[i * n + j] * a[i * n + j];
                            w2 += (long double)w[i * n + j] * w[i * n + j];
                        }
                        /* squares in lanes of at most n / 8 + 1 terms, then 8 lanes (16 for w) */
                        cr_assert_leq(fabsl(sa[i] - x2), (long double)(n / 8 + 10) * 0x1p-53L * x2, "n %zu rows %zu K %zu: "
                                      "row %zu's squares %a, want %La", n, rb, K, i, sa[i], x2);
                        if (with_w)
                            cr_assert_leq(fabsl(sa[rb + i] - w2), (long double)(n / 16 + 6) * 0x1p-53L * w2,
                                          "row %zu's squares of w %a, want %La", i, sa[rb + i], w2);
                        else
                            cr_assert(sa[rb + i] == -1.0, "no w: ssw left alone");
                    }
                    for (size_t v = 0; v < 3; v++) {
                        lm_kernels k;
                        if (lm_kernels_select(&k, v < 2 ? variants[v] : "ref") != 0)
                            continue;
                        memcpy(b, X0, rb * n * sizeof *b);
                        for (size_t i = 0; i < 2 * rb; i++)
                            sb[i] = -1.0;
                        k.lr64(b, with_w ? w : NULL, s, R, Cp, K, rb, n, sb, sb + rb);
                        cr_assert(memcmp(a, b, rb * n * sizeof *a) == 0 && memcmp(sa, sb, 2 * rb * sizeof *sa) == 0,
                                  "%s n %zu rows %zu K %zu w %d differs from ref", k.name, n, rb, K, with_w);
                        memcpy(b, X0, rb * n * sizeof *b); /* without the squares: the same X */
                        k.lr64(b, with_w ? w : NULL, s, R, Cp, K, rb, n, NULL, NULL);
                        cr_assert(memcmp(a, b, rb * n * sizeof *a) == 0, "%s n %zu rows %zu K %zu w %d, no squares, "
                                  "differs from ref", k.name, n, rb, K, with_w);
                    }
                    free(R), free(C), free(Cp), free(X0), free(a), free(b), free(w), free(sa), free(sb);
                }
}

/* x rounded to nearest even in out (bf16, f16, f32), as bits: the independent rounding of the
 * dora_cert test (long double, scaled by the quantum at x's binade) */
static uint32_t k64_round_out(long double x, lm_kdtype out)
{
    const int p = out == LM_KDT_BF16 ? 8 : out == LM_KDT_F16 ? 11 : 24, emin = out == LM_KDT_F16 ? -14 : -126;
    const int emax = out == LM_KDT_F16 ? 15 : 127;
    const uint32_t sign = signbit(x) ? (out == LM_KDT_F32 ? 0x80000000u : 0x8000u) : 0u;
    const long double ax = fabsl(x);
    int e = ax > 0 ? ilogbl(ax) : emin;
    e = e < emin ? emin : e;
    const long double q = ldexpl(1.0L, e - p + 1), val = nearbyintl(ax / q) * q;
    if (val >= ldexpl(1.0L, emax + 1))
        return sign | (out == LM_KDT_BF16 ? 0x7F80u : out == LM_KDT_F16 ? 0x7C00u : 0x7F800000u);
    const float fv = (float)val; /* exact: val is a value of out */
    uint32_t u;
    memcpy(&u, &fv, sizeof u);
    return sign | (out == LM_KDT_BF16 ? u >> 16 : out == LM_KDT_F16 ? lm_f32_to_f16_1(fv) : u);
}

/* dora_cert (a certified DoRA row, doracert_ref.c): every variant bit for bit the reference (the
 * bits and the count) for lengths around the vector widths, the three outputs, a tight and a loose
 * row bound E (the precise test then decides), results near the outputs' midpoints, zeros,
 * subnormal outputs, overflow, inf and NaN; the reference's certified elements (one at a time)
 * checked in long double: y -+ 0.999 e_j rounds to the bits written; the changed elements counted
 * against a base row that differs from the bits written in two of three elements */
Test(kernels64, dora_cert_variants_match_the_reference_which_certifies_soundly)
{
    static const char *const variants[] = {"avx2", "avx512"};
    static const lm_kdtype outs[] = {LM_KDT_BF16, LM_KDT_F16, LM_KDT_F32};
    static const size_t lens[] = {1, 3, 4, 8, 13, 16, 29, 67};
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    size_t certified = 0, uncertain = 0, sub = 0;
    for (size_t oi = 0; oi < 3; oi++)
        for (size_t li = 0; li < sizeof lens / sizeof *lens; li++)
            for (int loose = 0; loose < 2; loose++) {
                const lm_kdtype out = outs[oi];
                const size_t n = lens[li], ob = out == LM_KDT_F32 ? 4 : 2;
                double *v = malloc(n * sizeof *v), *kap = malloc(n * sizeof *kap);
                float *w = malloc(n * sizeof *w);
                uint8_t *d0 = malloc(n * 4), *d1 = malloc(n * 4), *d2 = malloc(4), *bs = malloc(n * 4);
                cr_assert(v && kap && w && d0 && d1 && d2 && bs);
                lm_dora_cert c = {1.0 + 0x1p-30, 0, 0x1p-46, 0x1p-60, 0x1p-48, 0x1p-50};
                c.E = loose ? 0x1p-12 : 0x1p-40; /* E >= every e_j here when |v| stays below 2^8 */
                const double mid = out == LM_KDT_BF16 ? 1.0 + 0x1p-8 : out == LM_KDT_F16 ? 1.0 + 0x1p-11 : 1.0 + 0x1p-24;
                for (size_t j = 0; j < n; j++) {
                    v[j] = k64_value() * (out == LM_KDT_F16 ? 8.0 : 0.25);
                    w[j] = (float)k64_value();
                    kap[j] = fabs(k64_value());
                    if (j % 5 == 2) { /* y near a midpoint: -2, -1/2, 1/2, 2 times ~e (2^-46) away */
                        static const double offs[] = {-2.0, -0.5, 0.5, 2.0};
                        v[j] = (mid + offs[(j / 5) % 4] * 0x1p-46) / (1.0 + 0x1p-30) * (j % 2 ? -1.0 : 1.0);
                    }
                    if (j % 11 == 6 && out == LM_KDT_F16)
                        v[j] = k64_value() * 0x1p-16; /* subnormal f16 results */
                }
                if (n > 8) {
                    v[0] = 0.0, v[1] = -0.0, v[3] = 1e300, v[7] = out == LM_KDT_F32 ? 0x1p-140 : 70000.0;
                    v[8] = out == LM_KDT_F16 ? 3e5 : 1e39; /* beyond the range by one exponent bit */
                    /* rounds exactly to the output's infinity (beyond its last midpoint) */
                    v[6] = (out == LM_KDT_BF16 ? 0x1.ffcp127 : out == LM_KDT_F16 ? 65530.0 : 0x1.ffffff8p127) / c.F;
                    if (loose)
                        v[4] = INFINITY, v[5] = NAN;
                }
                /* a base row: every third element the bits the reference writes, the others not */
                size_t ch0 = 0, want_ch = 0;
                (void)ref.dora_cert(v, w, kap, n, &c, out, bs, NULL, NULL);
                for (size_t j = 0; j < n; j++)
                    if (j % 3 != 0)
                        bs[j * ob] ^= (uint8_t)(1u << (j % 8));
                const size_t bad0 = ref.dora_cert(v, w, kap, n, &c, out, d0, bs, &ch0);
                for (size_t j = 0; j < n; j++)
                    want_ch += memcmp(d0 + j * ob, bs + j * ob, ob) != 0;
                cr_assert(ch0 == want_ch && want_ch == n - (n + 2) / 3, "out %d n %zu: %zu changed, want %zu", (int)out, n,
                          ch0, want_ch);
                size_t bad1 = 0;
                for (size_t j = 0; j < n; j++) {
                    const size_t b = ref.dora_cert(v + j, w + j, kap + j, 1, &c, out, d2, NULL, NULL);
                    cr_assert(memcmp(d2, d0 + j * ob, ob) == 0, "the row and element %zu alone differ", j);
                    bad1 += b;
                    if (b) {
                        uncertain++;
                        continue;
                    }
                    certified++;
                    const double y = v[j] * c.F, av = fabs(v[j]);
                    const long double e = ((long double)c.A1 * kap[j] + c.A0 + c.A2 * (fabsl((long double)w[j]) + 2.0L * av) +
                                           (long double)c.eF * av) * 0.999L;
                    uint32_t got = 0;
                    memcpy(&got, d0 + j * ob, ob);
                    const uint32_t lo = k64_round_out((long double)y - e, out), hi = k64_round_out((long double)y + e, out);
                    cr_assert(lo == got && hi == got, "out %d n %zu loose %d: element %zu (%a) certified as %x, "
                              "its bound rounds to [%x, %x]", (int)out, n, loose, j, y, got, lo, hi);
                    sub += out == LM_KDT_F16 && (got & 0x7C00u) == 0 && (got & 0x3FFu) != 0;
                }
                cr_assert_eq(bad0, bad1);
                for (size_t q = 0; q < 2; q++) {
                    lm_kernels k;
                    if (lm_kernels_select(&k, variants[q]) != 0)
                        continue;
                    memset(d1, 0xA5, n * 4);
                    size_t chv = 0;
                    const size_t badv = k.dora_cert(v, w, kap, n, &c, out, d1, bs, &chv);
                    cr_assert(badv == bad0 && chv == ch0 && memcmp(d0, d1, n * ob) == 0,
                              "%s out %d n %zu loose %d differs from ref", variants[q], (int)out, n, loose);
                    memset(d1, 0xA5, n * 4);
                    cr_assert(k.dora_cert(v, w, kap, n, &c, out, d1, NULL, &chv) == bad0 && chv == ch0 &&
                              memcmp(d0, d1, n * ob) == 0, "%s without a base", variants[q]);
                }
                free(v), free(kap), free(w), free(d0), free(d1), free(d2), free(bs);
            }
    cr_assert(certified > 2 * uncertain && uncertain > 10 && sub > 3, "certified %zu, uncertain %zu, f16 subnormal %zu",
              certified, uncertain, sub);
}
