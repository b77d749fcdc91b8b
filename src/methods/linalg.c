/* SPDX-License-Identifier: MIT */
/* linalg.c : see linalg.h. */
#include "linalg.h"

#include "gemm_tile.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* built for AVX-512 and AVX2 too (an ifunc picks one): the same products and sums in each (no
 * contraction: -ffp-contract=off), so the same bits */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define MM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MM_CLONES
#endif

typedef double v8d __attribute__((vector_size(64)));

/* C[a, b] accumulates its terms in x order, as a dot product would, but row by row so the b
 * loop vectorizes.  Rows of 32 (OFT's usual block size, the Cayley-Neumann products of every
 * block of a tensor), four at a time, are summed in local rows the compiler keeps in registers:
 * the same products and sums in the same order, without a store and a load of C per term */
MM_CLONES void lm_matmul_d(const double *A, const double *B, double *C, size_t m, size_t k, size_t n)
{
    if (n == 32 && m % 4 == 0) { /* four rows at a time: 16 independent vector sums */
        for (size_t a = 0; a < m; a += 4) {
            v8d c[4][4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
                for (int q = 0; q < 4; q++)
                    c[i][q] = (v8d){0, 0, 0, 0, 0, 0, 0, 0};
            for (size_t x = 0; x < k; x++) {
                v8d b[4];
                memcpy(b, B + x * 32, sizeof b);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    const double f = A[(a + (size_t)i) * k + x];
                    const v8d fv = {f, f, f, f, f, f, f, f};
#pragma GCC unroll 4
                    for (int q = 0; q < 4; q++)
                        c[i][q] += fv * b[q];
                }
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
                for (int q = 0; q < 4; q++)
                    memcpy(C + (a + (size_t)i) * 32 + q * 8, &c[i][q], sizeof c[i][q]);
        }
        return;
    }
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

/* u_i . u_j of the rows of U [., n], given in f32 (Uf) or f64 (Ud, when Uf is NULL); in double */
static double row_dot(const float *Uf, const double *Ud, size_t i, size_t j, size_t n)
{
    double d = 0;
    if (Uf != NULL)
        for (size_t x = 0; x < n; x++)
            d += (double)Uf[i * n + x] * (double)Uf[j * n + x];
    else
        for (size_t x = 0; x < n; x++)
            d += Ud[i * n + x] * Ud[j * n + x];
    return d;
}

/* lm_householder_wy() and lm_householder_wy_d(): one body, U's rows in f32 (Uf) or f64 (Ud) */
static void householder_wy(const float *Uf, const double *Ud, size_t r, size_t n, double *T, double *work)
{
    memset(T, 0, r * r * sizeof *T);
    for (size_t j = 0; j < r; j++) {
        /* T[0:j, j] = -2 T[0:j, 0:j] (U[0:j] u_j) */
        for (size_t i = 0; i < j; i++)
            work[i] = row_dot(Uf, Ud, i, j, n);
        for (size_t i = 0; i < j; i++) {
            double v = 0;
            for (size_t l = i; l < j; l++)
                v += T[i * r + l] * work[l];
            T[i * r + j] = -2.0 * v;
        }
        T[j * r + j] = 2.0;
    }
}

void lm_householder_wy(const float *U, size_t r, size_t n, double *T, double *work)
{
    householder_wy(U, NULL, r, n, T, work);
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

void lm_householder_wy_d(const double *U, size_t r, size_t n, double *T, double *work)
{
    householder_wy(NULL, U, r, n, T, work);
}

void lm_unit_rows_d(const float *V, size_t n, size_t r, int gram_schmidt, double *Q)
{
    for (size_t j = 0; j < r; j++) {
        double *v = Q + j * n;
        for (size_t x = 0; x < n; x++)
            v[x] = V[x * r + j];
        if (gram_schmidt) /* classical: the projections of V's column j */
            for (size_t l = 0; l < j; l++) {
                double d = 0;
                for (size_t x = 0; x < n; x++)
                    d += Q[l * n + x] * (double)V[x * r + j];
                for (size_t x = 0; x < n; x++)
                    v[x] -= d * Q[l * n + x];
            }
        double ss = 0;
        for (size_t x = 0; x < n; x++)
            ss += v[x] * v[x];
        const double nrm = sqrt(ss);
        for (size_t x = 0; x < n; x++)
            v[x] = ss > 0 ? v[x] / nrm : 0.0;
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

/* LAPACK from the dlopen'd OpenBLAS (kernels/gemm_tile.c), Fortran calling convention (character
 * arguments' hidden lengths last) */
typedef void (*dgebrd_fn)(const int *m, const int *n, double *a, const int *lda, double *d, double *e, double *tauq,
                          double *taup, double *work, const int *lwork, int *info);
typedef void (*dbdsdc_fn)(const char *uplo, const char *compq, const int *n, double *d, double *e, double *u,
                          const int *ldu, double *vt, const int *ldvt, double *q, int *iq, double *work, int *iwork,
                          int *info, size_t, size_t);
typedef void (*dormbr_fn)(const char *vect, const char *side, const char *trans, const int *m, const int *n,
                          const int *k, const double *a, const int *lda, const double *tau, double *c, const int *ldc,
                          double *work, const int *lwork, int *info, size_t, size_t, size_t);

/* the SVD the way gesdd computes it without its QR / LQ first step (which MKL, torch's LAPACK,
 * does not take where reference LAPACK does: the two give other signs for a 16 x 32 weight):
 * bidiagonalisation (dgebrd), divide and conquer on the bidiagonal (dbdsdc), and the
 * back-transformations (dormbr) applied to the r vectors wanted only */
int lm_svd_top(const float *W, size_t m, size_t n, size_t r, double *U_r, double *S_r, double *Vh_r)
{
    return lm_svd_range(W, m, n, 0, r, U_r, S_r, Vh_r);
}

int lm_svd_range(const float *W, size_t m, size_t n, size_t c0, size_t r, double *U_r, double *S_r, double *Vh_r)
{
    dgebrd_fn gebrd = (dgebrd_fn)lm_blas_sym("dgebrd_");
    dbdsdc_fn bdsdc = (dbdsdc_fn)lm_blas_sym("dbdsdc_");
    dormbr_fn ormbr = (dormbr_fn)lm_blas_sym("dormbr_");
    if (gebrd == NULL || bdsdc == NULL || ormbr == NULL)
        return -3;
    size_t k = m < n ? m : n;
    if (c0 > k || r > k - c0 || r == 0 || m > INT32_MAX / 4 || n > INT32_MAX / 4 || m * n > (size_t)INT32_MAX ||
        3 * k * k + 4 * k > (size_t)INT32_MAX)
        return -2;
    int im = (int)m, in = (int)n, ik = (int)k, ir = (int)r, info = 0, lq = -1;
    double q = 0, q2 = 0, q3 = 0;
    gebrd(&im, &in, NULL, &im, NULL, NULL, NULL, NULL, &q, &lq, &info);
    if (info == 0)
        ormbr("Q", "L", "N", &im, &ir, &in, NULL, &im, NULL, NULL, &im, &q2, &lq, &info, 1, 1, 1);
    if (info == 0)
        ormbr("P", "R", "T", &ir, &in, &im, NULL, &im, NULL, NULL, &ir, &q3, &lq, &info, 1, 1, 1);
    if (info != 0)
        return -2;
    double lw = q > q2 ? q : q2;
    lw = lw > q3 ? lw : q3;
    if (lw < (double)(3 * k * k + 4 * k))
        lw = (double)(3 * k * k + 4 * k); /* dbdsdc's */
    if (!(lw < 1e12))
        return -2;
    size_t n_d = m * n + 4 * k + 2 * k * k + (size_t)lw;
    double *a = malloc(n_d * sizeof(double));
    int *iwork = malloc(8 * k * sizeof(int));
    if (a == NULL || iwork == NULL) {
        free(a);
        free(iwork);
        return -1;
    }
    double *d = a + m * n, *e = d + k, *tauq = e + k, *taup = tauq + k, *ub = taup + k, *vb = ub + k * k,
           *work = vb + k * k;
    int lwork = (int)lw;
    for (size_t i = 0; i < m; i++) /* column-major, as torch hands W [m, n] to LAPACK */
        for (size_t j = 0; j < n; j++)
            a[i + j * m] = (double)W[i * n + j];
    gebrd(&im, &in, a, &im, d, e, tauq, taup, work, &lwork, &info);
    if (info == 0)
        bdsdc(m >= n ? "U" : "L", "I", &ik, d, e, ub, &ik, vb, &ik, NULL, NULL, work, iwork, &info, 1, 1);
    free(iwork);
    double *u = NULL, *vt = NULL;
    if (info == 0 && (u = calloc(m * r + r * n, sizeof(double))) != NULL) {
        vt = u + m * r;
        for (size_t c = 0; c < r; c++) { /* the bidiagonal's vectors, then Q and P^T applied */
            for (size_t i = 0; i < k; i++)
                u[i + c * m] = ub[i + (c0 + c) * k];
            for (size_t j = 0; j < k; j++)
                vt[c + j * r] = vb[(c0 + c) + j * k];
        }
        ormbr("Q", "L", "N", &im, &ir, &in, a, &im, tauq, u, &im, work, &lwork, &info, 1, 1, 1);
        if (info == 0)
            ormbr("P", "R", "T", &ir, &in, &im, a, &im, taup, vt, &ir, work, &lwork, &info, 1, 1, 1);
    }
    if (info == 0 && u != NULL)
        for (size_t c = 0; c < r; c++) {
            S_r[c] = d[c0 + c];
            for (size_t i = 0; i < m; i++)
                U_r[i * r + c] = u[i + c * m];
            for (size_t j = 0; j < n; j++)
                Vh_r[c * n + j] = vt[c + j * r];
        }
    int rc = info != 0 ? -2 : u == NULL ? -1 : 0;
    free(u);
    free(a);
    return rc;
}

typedef void (*dgetrf_fn)(const int *m, const int *n, double *a, const int *lda, int *ipiv, int *info);
typedef void (*dgetrs_fn)(const char *trans, const int *n, const int *nrhs, const double *a, const int *lda,
                          const int *ipiv, double *b, const int *ldb, int *info, size_t);

/* LU with partial pivoting of V itself (column-major copy: torch hands V to getrf that way), then
 * getrs on the right-hand sides, which row-major B holds as the columns of a column-major [n, nrhs] */
int lm_solve_rows(const double *V, size_t n, double *B, size_t nrhs)
{
    dgetrf_fn getrf = (dgetrf_fn)lm_blas_sym("dgetrf_");
    dgetrs_fn getrs = (dgetrs_fn)lm_blas_sym("dgetrs_");
    if (getrf == NULL || getrs == NULL)
        return -3;
    if (n == 0 || n > INT32_MAX / 4 || nrhs > INT32_MAX / 4 || n * n > (size_t)INT32_MAX ||
        n * nrhs > (size_t)INT32_MAX)
        return -2;
    double *a = malloc(n * n * sizeof(double));
    int *ipiv = malloc(n * sizeof(int));
    if (a == NULL || ipiv == NULL) {
        free(a);
        free(ipiv);
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++)
            a[i + j * n] = V[i * n + j];
    int in = (int)n, ir = (int)nrhs, info = 0;
    getrf(&in, &in, a, &in, ipiv, &info);
    int rc = info > 0 ? 1 : info < 0 ? -2 : 0;
    if (rc == 0 && nrhs > 0) {
        getrs("N", &in, &ir, a, &in, ipiv, B, &in, &info, 1);
        rc = info != 0 ? -2 : 0;
    }
    free(a);
    free(ipiv);
    return rc;
}

typedef void (*dgeqrf_fn)(const int *m, const int *n, double *a, const int *lda, double *tau, double *work,
                          const int *lwork, int *info);
typedef void (*dorgqr_fn)(const int *m, const int *n, const int *k, double *a, const int *lda, const double *tau,
                          double *work, const int *lwork, int *info);

/* Householder QR of the column-major copy (as torch hands a row-major tensor to LAPACK), Q formed
 * from the reflectors as torch.linalg.qr's reduced mode does (geqrf, then orgqr) */
int lm_qr_q(double *A, size_t m, size_t n)
{
    dgeqrf_fn geqrf = (dgeqrf_fn)lm_blas_sym("dgeqrf_");
    dorgqr_fn orgqr = (dorgqr_fn)lm_blas_sym("dorgqr_");
    if (geqrf == NULL || orgqr == NULL)
        return -3;
    if (n == 0 || n > m || m > INT32_MAX / 4 || m * n > (size_t)INT32_MAX)
        return -2;
    int im = (int)m, in = (int)n, info = 0, lq = -1;
    double q1 = 0, q2 = 0;
    geqrf(&im, &in, NULL, &im, NULL, &q1, &lq, &info);
    if (info == 0)
        orgqr(&im, &in, &in, NULL, &im, NULL, &q2, &lq, &info);
    double lw = q1 > q2 ? q1 : q2;
    if (info != 0 || !(lw < 1e12))
        return -2;
    if (lw < (double)n)
        lw = (double)n;
    double *a = malloc((m * n + n + (size_t)lw) * sizeof(double));
    if (a == NULL)
        return -1;
    double *tau = a + m * n, *work = tau + n;
    int lwork = (int)lw;
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++)
            a[i + j * m] = A[i * n + j];
    geqrf(&im, &in, a, &im, tau, work, &lwork, &info);
    if (info == 0)
        orgqr(&im, &in, &in, a, &im, tau, work, &lwork, &info);
    if (info == 0)
        for (size_t i = 0; i < m; i++)
            for (size_t j = 0; j < n; j++)
                A[i * n + j] = a[i + j * m];
    free(a);
    return info != 0 ? -2 : 0;
}
typedef void (*dgels_fn)(const char *trans, const int *m, const int *n, const int *nrhs, double *a, const int *lda,
                         double *b, const int *ldb, double *work, const int *lwork, int *info);

int lm_min_norm_solve(const double *W, size_t m, size_t n, const double *V, size_t q, double *X)
{
    dgels_fn gels = (dgels_fn)lm_blas_sym("dgels_");
    if (gels == NULL)
        return -3;
    if (m < n || m > INT32_MAX || q > INT32_MAX || (double)m * (double)(n > q ? n : q) > INT32_MAX)
        return -2;
    int im = (int)m, in = (int)n, iq = (int)q, info = 0, lwork = -1;
    double wq = 0, *a = malloc(m * n * sizeof *a), *b = malloc(m * q * sizeof *b);
    if (a == NULL || b == NULL) {
        free(a);
        free(b);
        return -1;
    }
    for (size_t i = 0; i < m; i++) /* column-major copies */
        for (size_t j = 0; j < n; j++)
            a[i + j * m] = W[i * n + j];
    memset(b, 0, m * q * sizeof *b);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < q; j++)
            b[i + j * m] = V[i * q + j];
    gels("T", &im, &in, &iq, a, &im, b, &im, &wq, &lwork, &info);
    lwork = info == 0 && wq >= 1 && wq < (double)INT32_MAX ? (int)wq : (int)(n + (m > q ? m : q)) * 64;
    double *work = info == 0 ? malloc((size_t)lwork * sizeof *work) : NULL;
    int rc = info != 0 ? -2 : work == NULL ? -1 : 0;
    if (rc == 0) {
        gels("T", &im, &in, &iq, a, &im, b, &im, work, &lwork, &info);
        rc = info != 0 ? -2 : 0;
    }
    if (rc == 0)
        for (size_t i = 0; i < m; i++)
            for (size_t j = 0; j < q; j++)
                X[i * q + j] = b[i + j * m];
    free(work);
    free(a);
    free(b);
    return rc;
}
