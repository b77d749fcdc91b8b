/* SPDX-License-Identifier: MIT */
/* test_gemm_rows.c : the row-independent tile product (LoHa, HiRA, HRA, DoRA and the f32 low-rank
 * tiles): the reference against a double-precision product within the bound of a fused chain of
 * k terms; every variant bit for bit the reference over shapes that exercise each block size,
 * lane tail and transposition; and rows computed one call at a time equal to one call over all
 * rows (so the tile height cannot change a byte). */
#include "lm_kernels.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t gt_state = 91;

static float gt_value(void)
{
    gt_state = gt_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(gt_state >> 40) / 16777216.0 - 0.5);
}

typedef struct gt_case {
    int ta, tb;
    size_t m, n, k;
    float alpha, beta;
} gt_case;

/* C (m x n, ldc n + 3) from C0 by k's product; A and B stored with padding so lda/ldb != width */
static void gt_run(const lm_kernels *k, const gt_case *c, const float *A, size_t lda, const float *B, size_t ldb,
                   const float *C0, float *C, int row_by_row)
{
    const size_t ldc = c->n + 3;
    memcpy(C, C0, c->m * ldc * sizeof *C);
    if (!row_by_row) {
        k->gemm_rows(c->ta, c->tb, c->m, c->n, c->k, c->alpha, A, lda, B, ldb, c->beta, C, ldc);
        return;
    }
    for (size_t i = 0; i < c->m; i++)
        k->gemm_rows(c->ta, c->tb, 1, c->n, c->k, c->alpha, c->ta ? A + i : A + i * lda, lda, B, ldb, c->beta,
                     C + i * ldc, ldc);
}

static void gt_check_double(const gt_case *c, const float *A, size_t lda, const float *B, size_t ldb, const float *C0,
                            const float *C)
{
    const size_t ldc = c->n + 3;
    for (size_t i = 0; i < c->m; i++)
        for (size_t j = 0; j < c->n; j++) {
            double want = 0, mag = 0;
            for (size_t p = 0; p < c->k; p++) {
                const double t = (double)(c->ta ? A[p * lda + i] : A[i * lda + p]) *
                                 (double)(c->tb ? B[j * ldb + p] : B[p * ldb + j]);
                want += t;
                mag += fabs(t);
            }
            const double c0 = c->beta == 0.0f ? 0.0 : (double)c->beta * (double)C0[i * ldc + j];
            want = c0 + (double)c->alpha * want;
            const double bound = ((double)c->k + 2.0) * 0x1p-24 * (fabs((double)c->alpha) * mag + fabs(c0)) +
                                 0x1p-24 * fabs(want) + 1e-30;
            cr_assert_leq(fabs((double)C[i * ldc + j] - want), bound, "ta %d tb %d m %zu n %zu k %zu: (%zu, %zu)",
                          c->ta, c->tb, c->m, c->n, c->k, i, j);
        }
}

Test(gemm_rows, variants_match_the_reference_and_a_double_product)
{
    static const char *const variants[] = {"ref", "avx2", "avx512"};
    static const size_t ms[] = {1, 3, 4, 5, 8, 9, 17};
    static const size_t ns[] = {1, 7, 8, 9, 16, 17, 24, 25, 64, 65, 130};
    static const size_t ks[] = {0, 1, 5, 16, 33};
    static const float betas[] = {0.0f, 1.0f, -0.75f};
    lm_kernels ks_[3];
    int have[3];
    for (size_t v = 0; v < 3; v++) {
        have[v] = lm_kernels_select(&ks_[v], variants[v]) == 0;
        if (!have[v])
            fprintf(stderr, "gemm_rows: variant %s SKIPPED (this CPU cannot run it)\n", variants[v]);
    }
    cr_assert(have[0]);
    size_t n_cases = 0;
    for (int t = 0; t < 4; t++)
        for (size_t mi = 0; mi < sizeof ms / sizeof *ms; mi++)
            for (size_t ni = 0; ni < sizeof ns / sizeof *ns; ni++)
                for (size_t ki = 0; ki < sizeof ks / sizeof *ks; ki++)
                    for (size_t bi = 0; bi < sizeof betas / sizeof *betas; bi++) {
                        const gt_case c = {t & 1, t >> 1, ms[mi], ns[ni], ks[ki], bi == 2 ? -1.5f : 1.0f, betas[bi]};
                        /* op(A) is m x k, op(B) is k x n; stored with 2 floats of padding per row */
                        const size_t lda = (c.ta ? c.m : c.k) + 2, ldb = (c.tb ? c.k : c.n) + 2;
                        const size_t na = (c.ta ? c.k : c.m) * lda, nb = (c.tb ? c.n : c.k) * ldb, ldc = c.n + 3;
                        float *A = malloc((na + 1) * sizeof *A), *B = malloc((nb + 1) * sizeof *B);
                        float *C0 = malloc(c.m * ldc * sizeof *C0), *R = malloc(c.m * ldc * sizeof *R);
                        float *X = malloc(c.m * ldc * sizeof *X);
                        cr_assert(A && B && C0 && R && X);
                        for (size_t i = 0; i < na; i++)
                            A[i] = gt_value();
                        for (size_t i = 0; i < nb; i++)
                            B[i] = gt_value();
                        for (size_t i = 0; i < c.m * ldc; i++)
                            C0[i] = gt_value();
                        gt_run(&ks_[0], &c, A, lda, B, ldb, C0, R, 0);
                        gt_check_double(&c, A, lda, B, ldb, C0, R);
                        for (size_t v = 0; v < 3; v++)
                            for (int rbr = 0; rbr < 2; rbr++) {
                                if (!have[v] || (v == 0 && rbr == 0))
                                    continue;
                                gt_run(&ks_[v], &c, A, lda, B, ldb, C0, X, rbr);
                                cr_assert(memcmp(R, X, c.m * ldc * sizeof *R) == 0,
                                          "%s%s differs from ref: ta %d tb %d m %zu n %zu k %zu beta %g", variants[v],
                                          rbr ? " (row by row)" : "", c.ta, c.tb, c.m, c.n, c.k, (double)c.beta);
                            }
                        free(A);
                        free(B);
                        free(C0);
                        free(R);
                        free(X);
                        n_cases++;
                    }
    cr_assert_eq(n_cases, 4 * 7 * 11 * 5 * 3);
}
