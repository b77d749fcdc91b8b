/* SPDX-License-Identifier: MIT */
/* wy64_ref.c : x <- x - ((x U^T) T) U for each row x of an f64 tile (HRA's compact WY form of a
 * product of Householder reflections, src/methods/hra.c), the reference.  U [r, cols] (rows: the
 * unit vectors), T [r, r].  The operations, which every variant (wy64_avx2.c, wy64_avx512.c)
 * performs in the same order, so that they write the same bits:
 *   p_q  = dot(x, U_q): eight lanes, lane m the fma chain (from 0, j ascending) over the
 *          columns j = m mod 8 of the full groups of eight (j < cols8 = cols - cols % 8), then
 *          the last cols % 8 columns j into lane j - cols8 (fma); the lanes summed as
 *          ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7));
 *   p2_q = the fma chain (from 0, l ascending) of p_l T[l, q];
 *   x_j  = x_j - s_j, s_j the fma chain (from 0, q ascending) of p2_q U_q[j].
 * fma() is correctly rounded in every build, so the reference is exact IEEE arithmetic too. */
#include "lm_kernels.h"

#include <math.h>

double lm_dot8_ref(const double *x, const double *u, size_t n)
{
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const size_t n8 = n - n % 8;
    for (size_t j = 0; j < n8; j += 8)
        for (size_t m = 0; m < 8; m++)
            l[m] = fma(x[j + m], u[j + m], l[m]);
    for (size_t j = n8; j < n; j++)
        l[j - n8] = fma(x[j], u[j], l[j - n8]);
    return lm_dot8_lanes(l);
}

double lm_dot8_lanes(const double *l)
{
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* p2 [nr, r] from p [nr, r] */
void lm_wy64_mid(const double *p, size_t nr, size_t r, const double *T, double *p2)
{
    for (size_t i = 0; i < nr; i++)
        for (size_t q = 0; q < r; q++) {
            double a = 0;
            for (size_t l = 0; l < r; l++)
                a = fma(p[i * r + l], T[l * r + q], a);
            p2[i * r + q] = a;
        }
}

/* x_j -= s_j for columns [j0, j1) of one row */
void lm_wy64_update_ref(double *x, const double *U, size_t cols, size_t r, const double *p2, size_t j0, size_t j1)
{
    for (size_t j = j0; j < j1; j++) {
        double s = 0;
        for (size_t q = 0; q < r; q++)
            s = fma(p2[q], U[q * cols + j], s);
        x[j] -= s;
    }
}

void lm_wy64_ref(double *X, size_t nr, size_t cols, const double *U, size_t r, const double *T, double *scratch)
{
    double *p = scratch, *p2 = scratch + nr * r;
    for (size_t i = 0; i < nr; i++)
        for (size_t q = 0; q < r; q++)
            p[i * r + q] = lm_dot8_ref(X + i * cols, U + q * cols, cols);
    lm_wy64_mid(p, nr, r, T, p2);
    for (size_t i = 0; i < nr; i++)
        lm_wy64_update_ref(X + i * cols, U, cols, r, p2 + i * r, 0, cols);
}
