/* SPDX-License-Identifier: MIT */
/* test_rotate.c : the block-rotation kernel (OFT, BOFT): every variant bit for bit the reference
 * for block sizes that exercise each lane width and remainder (2 .. 40), row counts around the
 * 8-row groups, shared and per-block rotations; the reference against a double-precision
 * product within the bound of a fused chain of bs terms. */
#include "lm_kernels.h"
#include "th.h"

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
                memset(a, 0, nr * cols * sizeof *a);
                ref.rot_blocks_to(x, a, nr, cols, RT, n_rot, bs, y);
                memcpy(b, x, nr * cols * sizeof *b);
                ref.rot_blocks(b, nr, cols, RT, n_rot, bs, y);
                cr_assert(memcmp(a, b, nr * cols * sizeof *a) == 0, "ref: in place and not differ");
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
                    memset(b, 0, nr * cols * sizeof *b); /* out of place: x stays, b gets the same */
                    k.rot_blocks_to(x, b, nr, cols, RT, n_rot, bs, y);
                    cr_assert(memcmp(a, b, nr * cols * sizeof *a) == 0, "%s rot_blocks_to bs %zu rows %zu shared %d "
                              "differs", variants[v], bs, nr, shared);
                }
                free(RT);
                free(x);
                free(a);
                free(b);
                free(y);
            }
}

/* rot_cert (the certified rotation's row, rotcert_ref.c): every variant bit for bit the reference
 * (dst, unc, the flag and the block terms left in e) for block sizes 2 .. 40, shared and per-block norms, bf16 and f16,
 * scaled (BOFT) or not, with elements near the outputs' midpoints, zeros, subnormals, values
 * beyond f16's range, inf and NaN; the reference's certified elements checked in double: the
 * interval of the main bound term around (x + v) f rounds to dst at both ends */
Test(rotate, rot_cert_variants_match_the_reference_which_certifies_soundly)
{
    static const char *const variants[] = {"avx2", "avx512"};
    static const size_t sizes[] = {2, 5, 8, 16, 24, 32, 40};
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    size_t certified = 0, uncertain = 0;
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (int mode = 0; mode < 8; mode++) {
            const size_t bs = sizes[si], nb = 1 + (size_t)mode % 3 + 3 * (si % 2) + (bs == 8 ? 20 : 0), cols = nb * bs;
            const int shared = mode & 1, bf16 = (mode >> 1) & 1, scaled = (mode >> 2) & 1;
            float *x = malloc(cols * sizeof *x), *v = malloc(cols * sizeof *v), *dn = malloc(cols * sizeof *dn);
            float *e = malloc(cols * sizeof *e), *e1 = malloc(cols * sizeof *e1);
            uint16_t *d0 = malloc(cols * sizeof *d0), *d1 = malloc(cols * sizeof *d1);
            uint8_t *u0 = malloc(cols), *u1 = malloc(cols);
            cr_assert(x && v && dn && e && e1 && d0 && d1 && u0 && u1);
            for (size_t c = 0; c < cols; c++) {
                x[c] = rt_value() * (bf16 ? 4.0f : 0.5f);
                v[c] = rt_value() * 0x1p-6f;
                dn[c] = fabsf(rt_value()) * 0x1p-5f;
                if (c % 7 == 3) /* the result y = x + v near a midpoint */
                    x[c] = th_near_mid(x[c] + v[c], bf16, (int)(c % 5) - 2) - v[c];
            }
            if (nb > 3 && bs > 4) { /* in the last block, which they leave uncertain (its norm) */
                float *xl = x + cols - bs, *vl = v + cols - bs;
                xl[0] = 0.0f, vl[0] = 0.0f;
                xl[1] = 0x1p-140f, vl[1] = -0x1p-141f;
                xl[2] = bf16 ? 0x1p127f : 70000.0f;
                if (mode & 1)
                    xl[3] = INFINITY, vl[4] = NAN;
            }
            const lm_rotcert rc = {dn, shared ? 1 : nb, bs, scaled ? -1.375f + rt_value() : 1.0f, scaled,
                                   bf16 ? LM_KDT_BF16 : LM_KDT_F16};
            const unsigned any0 = ref.rot_cert(x, v, cols, &rc, e, d0, u0);
            unsigned seen = 0;
            for (size_t c = 0; c < cols; c++) {
                seen |= u0[c];
                if (u0[c]) {
                    uncertain++;
                    continue;
                }
                certified++;
                /* the main term of the bound: ||D_a|| ||x_block|| (bs + 4) 2^-24 (the rest is small) */
                const size_t j = c / bs, a = c % bs;
                double ss = 0;
                for (size_t b = 0; b < bs; b++)
                    ss += (double)x[j * bs + b] * x[j * bs + b];
                const double y = ((double)x[c] + (double)v[c]) * (double)rc.f;
                const double b = (double)dn[(shared ? 0 : j) * bs + a] * sqrt(ss) * (double)(bs + 4) * 0x1p-24 *
                                 fabs((double)rc.f);
                const uint16_t lo = lm_f64_to_16_1(y - b, rc.out), hi = lm_f64_to_16_1(y + b, rc.out);
                cr_assert(lo == d0[c] && hi == d0[c], "bs %zu mode %d: element %zu certified as %04x, bound [%04x, %04x]",
                          bs, mode, c, d0[c], lo, hi);
            }
            cr_assert_eq(any0 != 0, seen != 0);
            for (size_t q = 0; q < 2; q++) {
                lm_kernels k;
                if (lm_kernels_select(&k, variants[q]) != 0)
                    continue;
                memset(d1, 0xA5, cols * sizeof *d1);
                const unsigned any1 = k.rot_cert(x, v, cols, &rc, e1, d1, u1);
                cr_assert(memcmp(e, e1, cols * sizeof *e) == 0, "%s bs %zu mode %d: block terms differ", variants[q],
                          bs, mode);
                cr_assert(memcmp(u0, u1, cols) == 0 && (any0 != 0) == (any1 != 0), "%s bs %zu mode %d: unc differs",
                          variants[q], bs, mode);
                for (size_t c = 0; c < cols; c++)
                    cr_assert(d0[c] == d1[c], "%s bs %zu mode %d: element %zu %04x, ref %04x", variants[q], bs, mode, c,
                              d1[c], d0[c]);
            }
            free(x), free(v), free(dn), free(e), free(e1), free(d0), free(d1), free(u0), free(u1);
        }
    /* both kinds occur: the comparison covers the certification, not only the rounding */
    cr_assert(certified > 3 * uncertain && uncertain > 20, "certified %zu, uncertain %zu", certified, uncertain);
}

/* rot_cert never certifies an element whose interval end is inf or NaN.  A NaN base element with
 * the bits 0x7FFFFFFF, 0xFFFFFFFF or 0x7FFF8000 makes its block's norm, and so every lo of the
 * block, that NaN; its bits plus the bf16 rounding increment carry out of the exponent (0x8000,
 * -0, or 0x0000, +0), where a missing check certified the block's elements as zeros.  Every
 * variant, bf16 and f16, scaled or not, block sizes taking each norm path (5: the reference's,
 * 8: AVX-512's two blocks per register, 16: AVX2's), the poisoned blocks in the vector body and
 * in the tail; the clean blocks certify, and every variant's dst and unc are the reference's. */
Test(rotate, rot_cert_never_certifies_a_nan_or_inf_end)
{
    static const char *const variants[] = {"ref", "avx2", "avx512"};
    static const size_t sizes[] = {5, 8, 16};
    static const uint32_t poison[] = {0x7FFFFFFFu, 0xFFFFFFFFu, 0x7FFF8000u, 0x7F800000u, 0xFF800000u};
    enum { NB = 7, NP = sizeof poison / sizeof *poison };
    lm_kernels ref;
    lm_kernels_select(&ref, "ref");
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (int mode = 0; mode < 4; mode++) {
            const size_t bs = sizes[si], cols = NB * bs;
            const int bf16 = mode & 1, scaled = mode >> 1;
            float x[NB * 16], v[NB * 16], dn[16], e[NB * 16];
            uint16_t d0[NB * 16], d1[NB * 16];
            uint8_t u0[NB * 16], u1[NB * 16];
            for (size_t c = 0; c < cols; c++)
                x[c] = rt_value(), v[c] = rt_value() * 0x1p-6f;
            for (size_t a = 0; a < bs; a++)
                dn[a] = fabsf(rt_value()) * 0x1p-5f;
            for (size_t p = 0; p < NP; p++) /* blocks 1 .. 5, element (p + a) % bs; blocks 0 and 6 clean */
                x[(1 + p) * bs + (p + 2) % bs] = lm_f32_from_bits(poison[p]);
            const lm_rotcert rc = {dn, 1, bs, scaled ? -1.375f : 1.0f, scaled, bf16 ? LM_KDT_BF16 : LM_KDT_F16};
            ref.rot_cert(x, v, cols, &rc, e, d0, u0);
            for (size_t q = 0; q < sizeof variants / sizeof *variants; q++) {
                lm_kernels k;
                if (lm_kernels_select(&k, variants[q]) != 0)
                    continue;
                memset(d1, 0xA5, sizeof d1);
                memset(u1, 0xA5, sizeof u1);
                const unsigned any = k.rot_cert(x, v, cols, &rc, e, d1, u1);
                size_t certified = 0;
                for (size_t c = 0; c < cols; c++) {
                    const size_t j = c / bs;
                    if (j >= 1 && j <= NP)
                        cr_assert(u1[c] == 1, "%s bs %zu mode %d: element %zu of the block with %08x certified as %04x",
                                  variants[q], bs, mode, c, poison[j - 1], d1[c]);
                    else
                        certified += u1[c] == 0;
                    cr_assert(u1[c] == u0[c] && d1[c] == d0[c], "%s bs %zu mode %d: element %zu differs from ref",
                              variants[q], bs, mode, c);
                }
                cr_assert(any != 0 && certified > bs, "%s bs %zu mode %d: %zu certified", variants[q], bs, mode,
                          certified);
            }
        }
}
