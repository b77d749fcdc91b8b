/* SPDX-License-Identifier: MIT */
/* lr64_ref.c : an f64 low-rank product of a block of rows, for DoRA's exact path
 * (src/engine/exec_dora.c), the reference.  t_ij = sum_k R[i K + k] C[k, j], one fma per term,
 * k ascending from 0; then X[i n + j] = fl(w[i n + j] + fl(s t_ij)) (w: f32 base rows) or, when w
 * is NULL, X[i n + j] = fl(X[i n + j] + fl(s t_ij)).  C is given in panels (Cp): for each
 * LM_LR64_PANEL columns a [K x LM_LR64_PANEL] block, then the last n % LM_LR64_PANEL columns as
 * [K x tail].  The row sums of squares (the DoRA norm's and its bound's), when asked for:
 * ssx[i] = the squares fl(x_j x_j) of row i of X added in eight lanes (lane j mod 8, j ascending),
 * the lanes then added in order to 0 (lm_lr64_sumsq8); ssw[i] = lm_sumsq_ref of row i of w.
 * Every variant (lr64_avx2.c, lr64_avx512.c) performs the same operations per element and per
 * lane, so they write the same bits. */
#include "lm_kernels.h"

#include <math.h>

double lm_lr64_sumsq8(const double *x, size_t n)
{
    double l[8] = {0};
    for (size_t j = 0; j < n; j++)
        l[j % 8] += x[j] * x[j];
    return lm_lr64_lanes8(l);
}

double lm_lr64_lanes8(const double *l)
{
    double s = 0;
    for (int q = 0; q < 8; q++)
        s += l[q];
    return s;
}

/* columns [full, n) (the tail panel) of rows [0, rb) */
void lm_lr64_tail(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb,
                  size_t n)
{
    const size_t full = n / LM_LR64_PANEL * LM_LR64_PANEL, tail = n - full;
    const double *P = Cp + full * K;
    for (size_t i = 0; i < rb && tail > 0; i++)
        for (size_t j = 0; j < tail; j++) {
            double acc = 0;
            for (size_t k = 0; k < K; k++)
                acc = fma(R[i * K + k], P[k * tail + j], acc);
            const size_t e = i * n + full + j;
            X[e] = (w != NULL ? (double)w[e] : X[e]) + s * acc;
        }
}

/* the tail panel's squares added to row lanes lx [8] and lw [16] (lw: NULL without w); the
 * variants' tail, after their full panels */
void lm_lr64_tail_sumsq(const double *x, const float *w, size_t n, double *lx, double *lw)
{
    for (size_t j = n / LM_LR64_PANEL * LM_LR64_PANEL; j < n; j++) {
        lx[j % 8] += x[j] * x[j];
        if (lw != NULL)
            lw[j % 16] += (double)w[j] * (double)w[j];
    }
}

void lm_lr64_ref(double *X, const float *w, double s, const double *R, const double *Cp, size_t K, size_t rb, size_t n,
                 double *ssx, double *ssw)
{
    enum { JW = LM_LR64_PANEL };
    const size_t full = n / JW * JW;
    for (size_t j0 = 0; j0 < full; j0 += JW) {
        const double *P = Cp + j0 * K;
        for (size_t i = 0; i < rb; i++) {
            double acc[JW];
            for (int q = 0; q < JW; q++)
                acc[q] = 0;
            for (size_t k = 0; k < K; k++)
                for (int q = 0; q < JW; q++)
                    acc[q] = fma(R[i * K + k], P[k * JW + (size_t)q], acc[q]);
            for (int q = 0; q < JW; q++) {
                const size_t e = i * n + j0 + (size_t)q;
                X[e] = (w != NULL ? (double)w[e] : X[e]) + s * acc[q];
            }
        }
    }
    lm_lr64_tail(X, w, s, R, Cp, K, rb, n);
    for (size_t i = 0; i < rb; i++) {
        if (ssx != NULL)
            ssx[i] = lm_lr64_sumsq8(X + i * n, n);
        if (ssw != NULL && w != NULL)
            ssw[i] = lm_sumsq_ref(w + i * n, n);
    }
}
