/* SPDX-License-Identifier: MIT */
/* linalg.c : see linalg.h. */
#include "linalg.h"

#include <math.h>
#include <string.h>

/* C[a, b] accumulates its terms in x order, as a dot product would, but row by row so the b
 * loop vectorizes */
void lm_matmul_d(const double *A, const double *B, double *C, size_t m, size_t k, size_t n)
{
    for (size_t a = 0; a < m; a++) {
        double *restrict c = C + a * n;
        for (size_t b = 0; b < n; b++)
            c[b] = 0;
        for (size_t x = 0; x < k; x++) {
            const double f = A[a * k + x];
            const double *restrict brow = B + x * n;
            for (size_t b = 0; b < n; b++)
                c[b] += f * brow[b];
        }
    }
}

void lm_cayley_exact(const double *Q, double *R, size_t bs, double *work)
{
    /* solve R (I + Q) = (I - Q), i.e. (I + Q)^T R^T = (I - Q)^T */
    double *P = work, *X = work + bs * bs;
    for (size_t a = 0; a < bs; a++)
        for (size_t b = 0; b < bs; b++) {
            P[a * bs + b] = (a == b) + Q[b * bs + a]; /* (I + Q)^T */
            X[a * bs + b] = (a == b) - Q[b * bs + a]; /* (I - Q)^T, becomes R^T */
        }
    for (size_t col = 0; col < bs; col++) {
        size_t piv = col;
        for (size_t r = col + 1; r < bs; r++)
            if (fabs(P[r * bs + col]) > fabs(P[piv * bs + col]))
                piv = r;
        for (size_t x = 0; x < bs && piv != col; x++) {
            double t1 = P[col * bs + x], t2 = X[col * bs + x];
            P[col * bs + x] = P[piv * bs + x];
            X[col * bs + x] = X[piv * bs + x];
            P[piv * bs + x] = t1;
            X[piv * bs + x] = t2;
        }
        double d = P[col * bs + col];
        for (size_t x = 0; x < bs; x++) {
            P[col * bs + x] /= d;
            X[col * bs + x] /= d;
        }
        for (size_t r = 0; r < bs; r++) {
            double f = P[r * bs + col];
            if (r == col || f == 0)
                continue;
            for (size_t x = 0; x < bs; x++) {
                P[r * bs + x] -= f * P[col * bs + x];
                X[r * bs + x] -= f * X[col * bs + x];
            }
        }
    }
    for (size_t a = 0; a < bs; a++)
        for (size_t b = 0; b < bs; b++)
            R[a * bs + b] = X[b * bs + a];
}

/* S = sum_{k=1}^{m} Q^k and Pm = Q^m, by doubling: work 2 bs^2 */
static void power_sum(const double *Q, size_t bs, uint64_t m, double *S, double *Pm, double *work)
{
    size_t nn = bs * bs;
    if (m == 1) {
        memcpy(S, Q, nn * sizeof *S);
        memcpy(Pm, Q, nn * sizeof *Pm);
        return;
    }
    double *X = work, *Y = work + nn;
    power_sum(Q, bs, m / 2, S, Pm, work); /* S_h, Q^h with h = m/2 */
    /* S_2h = S_h + Q^h S_h; Q^2h = Q^h Q^h */
    lm_matmul_d(Pm, S, X, bs, bs, bs);
    for (size_t i = 0; i < nn; i++)
        S[i] += X[i];
    lm_matmul_d(Pm, Pm, Y, bs, bs, bs);
    memcpy(Pm, Y, nn * sizeof *Pm);
    if (m % 2) { /* one more: S += Q^(2h+1), Pm = Q^(2h+1) */
        lm_matmul_d(Pm, Q, Y, bs, bs, bs);
        memcpy(Pm, Y, nn * sizeof *Pm);
        for (size_t i = 0; i < nn; i++)
            S[i] += Pm[i];
    }
}

void lm_cayley_neumann(const double *Q, double *R, size_t bs, uint64_t terms, double *work)
{
    size_t nn = bs * bs;
    double *P = work, *X = work + nn;
    memset(R, 0, nn * sizeof *R);
    for (size_t a = 0; a < bs; a++)
        R[a * bs + a] = 1.0;
    if (terms <= 1)
        return;
    if (terms > 64) { /* I + 2 S_{T-2} + Q^(T-1), with Q^(T-1) = Q^(T-2) Q */
        double *S = work + 2 * nn, *Pm = work + 3 * nn;
        power_sum(Q, bs, terms - 2, S, Pm, work);
        lm_matmul_d(Pm, Q, X, bs, bs, bs);
        for (size_t i = 0; i < nn; i++)
            R[i] += 2.0 * S[i] + X[i];
        return;
    }
    uint64_t top = terms == 2 ? 1 : terms == 3 ? 3 : terms - 1;
    memcpy(P, Q, nn * sizeof *P); /* P = Q^k */
    for (uint64_t k = 1; k <= top; k++) {
        double f = (terms == 3 && k == 3) || (terms >= 4 && k == terms - 1) ? 1.0 : 2.0;
        for (size_t i = 0; i < nn; i++)
            R[i] += f * P[i];
        if (k < top) { /* P <- P @ Q */
            lm_matmul_d(P, Q, X, bs, bs, bs);
            memcpy(P, X, nn * sizeof *P);
        }
    }
}

void lm_householder_wy(const float *U, size_t r, size_t n, double *T, double *work)
{
    memset(T, 0, r * r * sizeof *T);
    for (size_t j = 0; j < r; j++) {
        /* T[0:j, j] = -2 T[0:j, 0:j] (U[0:j] u_j) */
        for (size_t i = 0; i < j; i++) {
            double d = 0;
            for (size_t x = 0; x < n; x++)
                d += (double)U[i * n + x] * (double)U[j * n + x];
            work[i] = d;
        }
        for (size_t i = 0; i < j; i++) {
            double v = 0;
            for (size_t l = i; l < j; l++)
                v += T[i * r + l] * work[l];
            T[i * r + j] = -2.0 * v;
        }
        T[j * r + j] = 2.0;
    }
}

void lm_unit_rows(const float *V, size_t n, size_t r, int gram_schmidt, float *Q, double *v)
{
    for (size_t j = 0; j < r; j++) {
        for (size_t x = 0; x < n; x++)
            v[x] = V[x * r + j];
        if (gram_schmidt) /* remove the earlier directions (of V's column j: classical) */
            for (size_t l = 0; l < j; l++) {
                double d = 0;
                for (size_t x = 0; x < n; x++)
                    d += (double)Q[l * n + x] * (double)V[x * r + j];
                for (size_t x = 0; x < n; x++)
                    v[x] -= d * Q[l * n + x];
            }
        double ss = 0;
        for (size_t x = 0; x < n; x++)
            ss += v[x] * v[x];
        double inv = ss > 0 ? 1.0 / sqrt(ss) : 0.0;
        for (size_t x = 0; x < n; x++)
            Q[j * n + x] = (float)(v[x] * inv);
    }
}

void lm_twiddles(double *tw, uint64_t n)
{
    const double two_pi = 6.283185307179586476925286766559;
    for (uint64_t q = 0; q < n; q++) {
        tw[2 * q] = cos(two_pi * (double)q / (double)n);
        tw[2 * q + 1] = sin(two_pi * (double)q / (double)n);
    }
}

void lm_half_spectrum_row(const lm_sparse_spectrum *sp, uint64_t x, double *h)
{
    const uint64_t C = sp->n_cols, half = C / 2, R = sp->n_rows;
    memset(h, 0, (size_t)(half + 1) * 2 * sizeof *h);
    for (uint64_t e = 0; e < sp->n; e++) {
        uint64_t ph = (x * sp->rho[e]) % R, g = sp->gamma[e], g2 = (C - g) % C;
        double zr = sp->s[e] * sp->tw[2 * ph], zi = sp->s[e] * sp->tw[2 * ph + 1];
        if (g <= half) {
            h[2 * g] += 0.5 * zr;
            h[2 * g + 1] += 0.5 * zi;
        }
        if (g2 <= half) {
            h[2 * g2] += 0.5 * zr;
            h[2 * g2 + 1] -= 0.5 * zi;
        }
    }
}

void lm_tucker_fold(const float *core, const float *w, size_t r, size_t n, size_t kk, double *U)
{
    for (size_t a = 0; a < r; a++)
        for (size_t q = 0; q < n; q++)
            for (size_t x = 0; x < kk; x++) {
                double acc = 0;
                for (size_t b = 0; b < r; b++)
                    acc += (double)core[(a * r + b) * kk + x] * (double)w[b * n + q];
                U[(a * n + q) * kk + x] = acc;
            }
}
