/* SPDX-License-Identifier: MIT */
/* test_linalg.c : the pure math of the methods (src/methods/linalg.c, torch_rng.c) on
 * hand-checkable matrices: Cayley transforms, the Cayley-Neumann series (one by one and by
 * doubling), the compact WY form of Householder products, Gram-Schmidt, torch's MT19937 and
 * randperm, numpy's PCG64 Generator (against numpy's own test vectors and, when /usr/bin/python3
 * has numpy, numpy itself), and the FFT glue of FourierFT against a direct double sum. */
#include "linalg.h"
#include "numpy_rng.h"
#include "th.h"
#include "torch_rng.h"

#include <criterion/criterion.h>
#include <fftw3.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static double max_abs_diff(const double *a, const double *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(a[i] - b[i]));
    return m;
}

/* lm_matmul_d's definition: C[a, b] = sum over x ascending of fl(A[a, x] B[x, b]), each sum
 * rounded (no fma); its 32-column form (four rows at a time in vector registers) and the general
 * loop give exactly that, for row counts on and off its blocks of four */
Test(linalg, matmul_d_sums_in_x_order_bit_for_bit)
{
    static const size_t ms[] = {1, 4, 5, 8, 32}, ks[] = {1, 7, 32};
    static const size_t ns[] = {32, 31, 33};
    uint64_t st = 77;
    for (size_t mi = 0; mi < 5; mi++)
        for (size_t ki = 0; ki < 3; ki++)
            for (size_t ni = 0; ni < 3; ni++) {
                const size_t m = ms[mi], k = ks[ki], n = ns[ni];
                double *A = malloc(m * k * sizeof *A), *B = malloc(k * n * sizeof *B), *C = malloc(m * n * sizeof *C);
                cr_assert(A && B && C);
                for (size_t i = 0; i < m * k + k * n; i++) {
                    st = st * 6364136223846793005ull + 1442695040888963407ull;
                    const double v = (double)(st >> 11) / 9007199254740992.0 - 0.5;
                    if (i < m * k)
                        A[i] = v;
                    else
                        B[i - m * k] = v;
                }
                lm_matmul_d(A, B, C, m, k, n);
                for (size_t a = 0; a < m; a++)
                    for (size_t b = 0; b < n; b++) {
                        double want = 0;
                        for (size_t x = 0; x < k; x++) {
                            const volatile double p = A[a * k + x] * B[x * n + b]; /* rounded: no fma */
                            want += p;
                        }
                        cr_assert(C[a * n + b] == want, "m %zu k %zu n %zu: C[%zu, %zu] = %a, want %a", m, k, n, a, b,
                                  C[a * n + b], want);
                    }
                free(A), free(B), free(C);
            }
}

Test(linalg, cayley_of_a_2x2_skew_matrix)
{
    /* Q = [[0, a], [-a, 0]]: (I - Q)(I + Q)^-1 = [[1 - a^2, -2a], [2a, 1 - a^2]] / (1 + a^2) */
    const double a = 0.75, Q[4] = {0, a, -a, 0}, d = 1 + a * a;
    const double want[4] = {(1 - a * a) / d, -2 * a / d, 2 * a / d, (1 - a * a) / d};
    double R[4], work[8];
    lm_cayley_exact(Q, R, 2, work);
    cr_assert_lt(max_abs_diff(R, want, 4), 1e-15);
}

Test(linalg, cayley_is_orthogonal)
{
    enum { N = 7 };
    double Q[N * N], R[N * N], RtR[N * N], Rt[N * N], work[2 * N * N];
    uint64_t s = 12345;
    memset(Q, 0, sizeof Q);
    for (int i = 0; i < N; i++)
        for (int j = i + 1; j < N; j++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            double v = (double)(s >> 11) / 9007199254740992.0 - 0.5;
            Q[i * N + j] = v;
            Q[j * N + i] = -v;
        }
    lm_cayley_exact(Q, R, N, work);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++)
            Rt[i * N + j] = R[j * N + i];
    lm_matmul_d(Rt, R, RtR, N, N, N);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++)
            cr_assert_lt(fabs(RtR[i * N + j] - (i == j)), 1e-13, "R^T R [%d, %d] = %g", i, j, RtR[i * N + j]);
}

Test(linalg, neumann_terms_as_peft_counts_them)
{
    /* 1x1 "matrix" q: T<=1 -> 1; 2 -> 1 + 2q; 3 -> 1 + 2q + 2q^2 + q^3; 5 -> 1 + 2(q + q^2 + q^3) + q^4 */
    const double q = 0.3;
    double R, work[4];
    lm_cayley_neumann(&q, &R, 1, 0, work);
    cr_assert_eq(R, 1.0);
    lm_cayley_neumann(&q, &R, 1, 1, work);
    cr_assert_eq(R, 1.0);
    lm_cayley_neumann(&q, &R, 1, 2, work);
    cr_assert_lt(fabs(R - (1 + 2 * q)), 1e-15);
    lm_cayley_neumann(&q, &R, 1, 3, work);
    cr_assert_lt(fabs(R - (1 + 2 * q + 2 * q * q + q * q * q)), 1e-15);
    lm_cayley_neumann(&q, &R, 1, 5, work);
    cr_assert_lt(fabs(R - (1 + 2 * (q + q * q + q * q * q) + q * q * q * q)), 1e-15);
}

Test(linalg, neumann_by_doubling_matches_one_by_one)
{
    /* beyond 64 terms the powers are summed by doubling: same value as summing one by one */
    enum { N = 4 };
    double Q[N * N], R[N * N], work[4 * N * N];
    memset(Q, 0, sizeof Q);
    Q[0 * N + 1] = 0.2, Q[1 * N + 0] = -0.2, Q[1 * N + 3] = 0.35, Q[3 * N + 1] = -0.35, Q[0 * N + 2] = 0.1,
    Q[2 * N + 0] = -0.1;
    for (uint64_t T = 65; T < 200; T += 27) {
        double S[N * N], P[N * N], X[N * N];
        memset(S, 0, sizeof S);
        for (int i = 0; i < N; i++)
            S[i * N + i] = 1;
        memcpy(P, Q, sizeof P);
        for (uint64_t k = 1; k <= T - 1; k++) {
            double f = k == T - 1 ? 1.0 : 2.0;
            for (int i = 0; i < N * N; i++)
                S[i] += f * P[i];
            lm_matmul_d(P, Q, X, N, N, N);
            memcpy(P, X, sizeof P);
        }
        lm_cayley_neumann(Q, R, N, T, work);
        cr_assert_lt(max_abs_diff(R, S, N * N), 1e-13, "T=%llu", (unsigned long long)T);
    }
    /* a billion terms cost a few dozen products, not a billion */
    lm_cayley_neumann(Q, R, N, 1000000000ull, work);
    for (int i = 0; i < N * N; i++)
        cr_assert(isfinite(R[i]));
}

Test(linalg, householder_wy_equals_the_product_of_reflections)
{
    enum { R = 3, N = 5 };
    float U[R * N];
    double V[N], work[R], T[R * R], H[N * N], X[N * N], P[N * N];
    uint64_t s = 99;
    for (int j = 0; j < R; j++) { /* unit rows */
        double ss = 0;
        for (int x = 0; x < N; x++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            V[x] = (double)(s >> 11) / 9007199254740992.0 - 0.5;
            ss += V[x] * V[x];
        }
        for (int x = 0; x < N; x++)
            U[j * N + x] = (float)(V[x] / sqrt(ss));
    }
    /* P = H_0 H_1 H_2, H_j = I - 2 u_j u_j^T, with the rows as they are (f32 values, exact in double) */
    memset(P, 0, sizeof P);
    for (int i = 0; i < N; i++)
        P[i * N + i] = 1;
    for (int j = 0; j < R; j++) {
        for (int a = 0; a < N; a++)
            for (int b = 0; b < N; b++)
                H[a * N + b] = (a == b) - 2.0 * (double)U[j * N + a] * (double)U[j * N + b];
        lm_matmul_d(P, H, X, N, N, N);
        memcpy(P, X, sizeof P);
    }
    lm_householder_wy(U, R, N, T, work);
    for (int a = 0; a < N; a++)
        for (int b = 0; b < N; b++) { /* (I - U^T T U)[a, b] */
            double v = (a == b);
            for (int i = 0; i < R; i++)
                for (int j = 0; j < R; j++)
                    v -= (double)U[i * N + a] * T[i * R + j] * (double)U[j * N + b];
            cr_assert_lt(fabs(v - P[a * N + b]), 1e-6, "[%d, %d]: %g vs %g", a, b, v, P[a * N + b]);
        }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < i; j++)
            cr_assert_eq(T[i * R + j], 0.0, "T is upper triangular");
}

Test(linalg, unit_rows_and_gram_schmidt)
{
    /* V [3, 2]: columns (3, 4, 0) and (1, 1, 1) */
    const float V[6] = {3, 1, 4, 1, 0, 1};
    float Q[6];
    double work[3];
    lm_unit_rows(V, 3, 2, 0, Q, work);
    cr_assert_float_eq(Q[0], 0.6f, 1e-7);
    cr_assert_float_eq(Q[1], 0.8f, 1e-7);
    cr_assert_float_eq(Q[2], 0.0f, 1e-7);
    cr_assert_float_eq(Q[3], (float)(1 / sqrt(3.0)), 1e-7);
    lm_unit_rows(V, 3, 2, 1, Q, work);
    /* (1, 1, 1) - 1.4 (0.6, 0.8, 0) = (0.16, -0.12, 1), normalised */
    double n = sqrt(0.16 * 0.16 + 0.12 * 0.12 + 1);
    cr_assert_float_eq(Q[3], (float)(0.16 / n), 1e-6);
    cr_assert_float_eq(Q[4], (float)(-0.12 / n), 1e-6);
    cr_assert_float_eq(Q[5], (float)(1 / n), 1e-6);
    double dot = (double)Q[0] * Q[3] + (double)Q[1] * Q[4] + (double)Q[2] * Q[5];
    cr_assert_lt(fabs(dot), 1e-7);
}

Test(torch_rng, mt19937_reference_outputs)
{
    /* the standard MT19937 outputs: seed 5489 starts 3499211612, 581869302; seed 0 starts 2357136044 */
    lm_mt19937 g;
    lm_mt_seed(&g, 5489);
    cr_assert_eq(lm_mt_next(&g), 3499211612u);
    cr_assert_eq(lm_mt_next(&g), 581869302u);
    lm_mt_seed(&g, 0);
    cr_assert_eq(lm_mt_next(&g), 2357136044u);
}

Test(torch_rng, randperm_prefix_is_fisher_yates_from_the_front)
{
    const uint64_t cases[][3] = {{10, 0, 10}, {384, 777, 100}, {5000, 42, 5000}, {100000, 777, 1000}, {1, 3, 1}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        uint64_t N = cases[c][0], seed = cases[c][1], n = cases[c][2];
        uint64_t *full = malloc(N * sizeof *full), *got = malloc(n * sizeof *got);
        for (uint64_t i = 0; i < N; i++)
            full[i] = i;
        lm_mt19937 g;
        lm_mt_seed(&g, seed);
        for (uint64_t t = 0; t + 1 < N; t++) {
            uint64_t z = lm_mt_next(&g) % (N - t), tmp = full[t];
            full[t] = full[t + z];
            full[t + z] = tmp;
        }
        cr_assert_eq(lm_randperm_prefix(N, seed, n, got), 0);
        for (uint64_t i = 0; i < n; i++)
            cr_assert_eq(got[i], full[i], "N=%llu seed=%llu: entry %llu", (unsigned long long)N,
                         (unsigned long long)seed, (unsigned long long)i);
        free(full);
        free(got);
    }
    /* (the definition itself was checked against torch: peft-merge.md Appendix A) */
}

Test(linalg, sparse_inverse_dft_rows_match_a_direct_sum)
{
    /* odd and even widths: the Hermitian half has a Nyquist term only for even n_cols */
    const uint64_t shapes[][2] = {{5, 7}, {6, 8}, {4, 1}, {3, 2}};
    for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
        uint64_t R = shapes[k][0], C = shapes[k][1];
        enum { NT = 9 };
        uint64_t rho[NT], gamma[NT];
        double s[NT], tw[2 * 8];
        for (int t = 0; t < NT; t++) { /* repeated positions too, and column 0 / C/2 */
            rho[t] = (uint64_t)(t * 3 + 1) % R;
            gamma[t] = (uint64_t)(t * 5) % C;
            s[t] = 0.5 + 0.25 * t * (t % 2 ? -1 : 1);
        }
        lm_twiddles(tw, R);
        lm_sparse_spectrum sp = {R, C, NT, rho, gamma, s, tw, 1.0};
        double *h = fftw_malloc((C / 2 + 1) * 2 * sizeof *h), *y = fftw_malloc(C * sizeof *y);
        fftw_plan plan = fftw_plan_dft_c2r_1d((int)C, (fftw_complex *)h, y, FFTW_ESTIMATE);
        for (uint64_t x = 0; x < R; x++) {
            lm_half_spectrum_row(&sp, x, h);
            fftw_execute(plan);
            for (uint64_t c = 0; c < C; c++) {
                double want = 0;
                for (int t = 0; t < NT; t++)
                    want += s[t] * cos(6.283185307179586 * ((double)(x * rho[t]) / (double)R +
                                                            (double)(c * gamma[t]) / (double)C));
                cr_assert_lt(fabs(y[c] - want), 1e-12, "[%llu x %llu] row %llu col %llu: %g vs %g",
                             (unsigned long long)R, (unsigned long long)C, (unsigned long long)x,
                             (unsigned long long)c, y[c], want);
            }
        }
        fftw_destroy_plan(plan);
        fftw_free(h);
        fftw_free(y);
    }
}

/* U[a, q, x] = sum_b core[a, b, x] w[b, q], worked by hand for r = 2, n = 3, kk = 2 */
Test(linalg, tucker_fold_by_hand)
{
    /* core[a][b][x]: a=0: b0 (1, 2), b1 (3, 4); a=1: b0 (-1, 0.5), b1 (0, 2) */
    const float core[8] = {1, 2, 3, 4, -1, 0.5f, 0, 2};
    const float w[6] = {1, 0, 2, /* b = 0 */ -1, 1, 0.25f}; /* b = 1 */
    double U[12];
    lm_tucker_fold(core, w, 2, 3, 2, U);
    const double want[12] = {
        /* a = 0: q = 0: x0 1*1 + 3*-1 = -2, x1 2*1 + 4*-1 = -2; q = 1: 3, 4; q = 2: 2 + 0.75, 4 + 1 */
        -2, -2, 3, 4, 2.75, 5,
        /* a = 1: q = 0: -1 + 0, 0.5 - 2; q = 1: 0, 2; q = 2: -2, 1 + 0.5 */
        -1, -1.5, 0, 2, -2, 1.5};
    for (int i = 0; i < 12; i++)
        cr_assert_eq(U[i], want[i], "U[%d] = %g, want %g", i, U[i], want[i]);
}

/* numpy's own reference values: numpy/random/tests/data/pcg64-testset-1.csv (PCG64(0xdeadbeaf),
 * seeded through SeedSequence) and the quick start of numpy's random documentation
 * (default_rng(12345).random() == 0.22733602246716966, i.e. (next64 >> 11) * 2^-53) */
Test(numpy_rng, pcg64_reference_outputs)
{
    lm_np_pcg64 g;
    lm_np_default_rng(&g, 0xdeadbeafu);
    cr_assert_eq(lm_np_next64(&g), 0x60d24054e17a0698ull);
    cr_assert_eq(lm_np_next64(&g), 0xd5e79d89856e4f12ull);
    cr_assert_eq(lm_np_next64(&g), 0xd254972fe64bd782ull);
    lm_np_default_rng(&g, 12345);
    cr_assert_eq((double)(lm_np_next64(&g) >> 11) * 0x1p-53, 0.22733602246716966);
    /* next32 hands out the low half of one 64-bit draw, then its high half */
    lm_np_pcg64 h;
    lm_np_default_rng(&g, 7);
    lm_np_default_rng(&h, 7);
    uint64_t x = lm_np_next64(&h);
    cr_assert_eq(lm_np_next32(&g), (uint32_t)x);
    cr_assert_eq(lm_np_next32(&g), (uint32_t)(x >> 32));
}

/* choice(replace=False) (Floyd and the tail shuffle), shuffle, and the bounded draws against numpy
 * itself: the same seeds through /usr/bin/python3 */
Test(numpy_rng, choice_and_shuffle_match_numpy, .timeout = 60)
{
    th_run_result p = th_sh("/usr/bin/python3 -c 'import numpy' 2>&1");
    int have = p.status == 0;
    th_run_free(&p);
    if (!have)
        cr_skip_test("numpy's outputs need /usr/bin/python3 with numpy (apt-get install python3-numpy)");
    static const uint64_t cases[][3] = {{42, 256, 128}, {7, 20000, 1000}, {7, 20000, 100}, {0, 5, 5},
                                        {123, 100000, 3000}, {1u << 31, 37, 36}, {99, 4294967296ull, 3}};
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        uint64_t seed = cases[k][0], pop = cases[k][1], size = cases[k][2];
        char cmd[600];
        snprintf(cmd, sizeof cmd, "/usr/bin/python3 -c 'import numpy as np\n"
                 "g = np.random.default_rng(%llu)\nc = g.choice(%llu, size=%llu, replace=False)\n"
                 "x = np.arange(1000, dtype=np.int64)\ng.shuffle(x)\n"
                 "print(*c, *x, g.integers(0, 2**40), g.integers(0, 1000))'",
                 (unsigned long long)seed, (unsigned long long)pop, (unsigned long long)size);
        th_run_result r = th_sh(cmd);
        cr_assert_eq(r.status, 0, "python: %s", r.err);
        lm_np_pcg64 g;
        lm_np_default_rng(&g, seed);
        uint64_t *c = malloc((size + 1000 + 2) * sizeof *c);
        uint32_t x[1000];
        cr_assert_eq(lm_np_choice(&g, pop, size, c), 0);
        for (uint32_t i = 0; i < 1000; i++)
            x[i] = i;
        lm_np_shuffle_u32(&g, x, 1000);
        for (uint32_t i = 0; i < 1000; i++)
            c[size + i] = x[i];
        c[size + 1000] = lm_np_bounded(&g, (1ull << 40) - 1); /* integers(0, high): [0, high - 1] */
        c[size + 1001] = lm_np_bounded(&g, 999);
        const char *s = r.out;
        for (uint64_t i = 0; i < size + 1002; i++) {
            char *end;
            unsigned long long v = strtoull(s, &end, 10);
            cr_assert(end != s, "seed %llu: numpy printed %llu values, expected %llu", (unsigned long long)seed,
                      (unsigned long long)i, (unsigned long long)(size + 1002));
            cr_assert_eq(v, c[i], "seed %llu pop %llu size %llu: value %llu is %llu, numpy's %llu",
                         (unsigned long long)seed, (unsigned long long)pop, (unsigned long long)size,
                         (unsigned long long)i, (unsigned long long)c[i], v);
            s = end;
        }
        free(c);
        th_run_free(&r);
    }
}
