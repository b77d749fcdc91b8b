/* SPDX-License-Identifier: MIT */
/* test_rotate.c : the block-rotation kernel (OFT, BOFT): every variant bit for bit the reference
 * for block sizes that exercise each lane width and remainder (2 .. 40), row counts around the
 * 8-row groups, shared and per-block rotations; the reference against a double-precision
 * product within the bound of a fused chain of bs terms. */
#include "lm_kernels.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rt_state = 77;

static float rt_value(void)
{
    rt_state = rt_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rt_state >> 40) / 16777216.0 - 0.5);
}

Test(rotate, variants_match_the_reference_and_a_double_product)
{
    static const char *const variants[] = {"avx2", "avx512"};
    static const size_t sizes[] = {2, 3, 8, 13, 16, 24, 32, 40};
    static const size_t rows[] = {1, 7, 8, 9, 17};
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (size_t ri = 0; ri < sizeof rows / sizeof *rows; ri++)
            for (int shared = 0; shared < 2; shared++) {
                size_t bs = sizes[si], nr = rows[ri], nb = 3, cols = nb * bs, n_rot = shared ? 1 : nb;
                float *RT = malloc(n_rot * bs * bs * sizeof *RT), *x = malloc(nr * cols * sizeof *x);
                float *a = malloc(nr * cols * sizeof *a), *b = malloc(nr * cols * sizeof *b);
                float *y = malloc(8 * bs * sizeof *y);
                for (size_t i = 0; i < n_rot * bs * bs; i++)
                    RT[i] = rt_value();
                for (size_t i = 0; i < nr * cols; i++)
                    x[i] = rt_value();
                memcpy(a, x, nr * cols * sizeof *a);
                ref.rot_blocks(a, nr, cols, RT, n_rot, bs, y);
                for (size_t r = 0; r < nr; r++) /* y_a = sum_b R[a, b] x_b = sum_b RT[b, a] x_b */
                    for (size_t j = 0; j < nb; j++)
                        for (size_t q = 0; q < bs; q++) {
                            const float *R = RT + (n_rot == 1 ? 0 : j) * bs * bs;
                            double want = 0, mag = 0;
                            for (size_t t = 0; t < bs; t++) {
                                want += (double)R[t * bs + q] * (double)x[r * cols + j * bs + t];
                                mag += fabs((double)R[t * bs + q] * (double)x[r * cols + j * bs + t]);
                            }
                            double got = a[r * cols + j * bs + q];
                            cr_assert_leq(fabs(got - want), (double)bs * 0x1p-24 * mag + 1e-30, "bs %zu row %zu", bs, r);
                        }
                for (size_t v = 0; v < 2; v++) {
                    lm_kernels k;
                    if (lm_kernels_select(&k, variants[v]) != 0)
                        continue;
                    memcpy(b, x, nr * cols * sizeof *b);
                    k.rot_blocks(b, nr, cols, RT, n_rot, bs, y);
                    cr_assert(memcmp(a, b, nr * cols * sizeof *a) == 0, "%s bs %zu rows %zu shared %d differs from ref",
                              variants[v], bs, nr, shared);
                }
                free(RT);
                free(x);
                free(a);
                free(b);
                free(y);
            }
}
