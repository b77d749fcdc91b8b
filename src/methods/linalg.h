/* SPDX-License-Identifier: MIT */
/* linalg.h : the small dense math some methods need, as pure functions on row-major arrays
 * (no allocation, no failure): Cayley transforms of skew matrices (OFT, BOFT), the compact WY
 * form of a product of Householder reflections and Gram-Schmidt (HRA).  Unit-tested on
 * hand-checkable matrices (tests/test_linalg.c). */
#ifndef LM_LINALG_H
#define LM_LINALG_H

#include <stddef.h>
#include <stdint.h>

/*! lm_cayley_exact() : R = (I - Q) (I + Q)^-1 for a bs x bs matrix Q (skew in use, so I + Q is
 *  invertible), by Gauss-Jordan elimination with partial pivoting.  work: 2 bs^2 doubles. */
void lm_cayley_exact(const double *Q, double *R, size_t bs, double *work);

/*! lm_cayley_neumann() : PEFT's Cayley-Neumann approximation with `terms` terms:
 *  terms <= 1: I;  2: I + 2Q;  3: I + 2Q + 2Q^2 + Q^3;  >= 4: I + 2 sum_{k=1}^{terms-2} Q^k + Q^(terms-1).
 *  Powers are accumulated one by one up to 64 terms (as PEFT does); beyond, by doubling
 *  (sum_{k=1}^{2m} Q^k = S_m + Q^m S_m), so any count costs O(log terms) products.
 *  work: 4 bs^2 doubles. */
void lm_cayley_neumann(const double *Q, double *R, size_t bs, uint64_t terms, double *work);

/*! lm_householder_wy() : the r x r upper triangular T with H_0 H_1 ... H_{r-1} = I - U^T T U,
 *  H_j = I - 2 u_j u_j^T, for unit rows u_j of U [r, n] (LAPACK's dlarft, forward, tau = 2).
 *  work: r doubles. */
void lm_householder_wy(const float *U, size_t r, size_t n, double *T, double *work);

/*! lm_unit_rows() : Q [r, n] from the columns of V [n, r]: each normalised (or, with
 *  gram_schmidt, made orthonormal in order by classical Gram-Schmidt), in double, rounded to
 *  f32.  A zero column stays zero.  work: n doubles. */
void lm_unit_rows(const float *V, size_t n, size_t r, int gram_schmidt, float *Q, double *work);

/*! lm_householder_wy_d() / lm_unit_rows_d() : the same in f64 throughout (the exact path's
 *  factors: no f32 rounding of the unit vectors), Q [r, n] in double; lm_unit_rows_d divides by
 *  the norm as PEFT does (U / ||U||) and needs no work array. */
void lm_householder_wy_d(const double *U, size_t r, size_t n, double *T, double *work);
void lm_unit_rows_d(const float *V, size_t n, size_t r, int gram_schmidt, double *Q);

/* A sparse 2-D spectrum whose inverse DFT is wanted row by row (FourierFT): entry t sits at
 * (rho[t], gamma[t]) of an n_rows x n_cols grid with value s[t]. */
typedef struct {
    uint64_t n_rows, n_cols, n;
    const uint64_t *rho, *gamma;
    const double *s;
    const double *tw; /* [n_rows][2]: cos, sin of 2 pi k / n_rows (lm_twiddles) */
    double norm;      /* the factor applied to each row (scale / (rows cols)) */
} lm_sparse_spectrum;

/*! lm_twiddles() : tw[2k], tw[2k+1] = cos, sin of 2 pi k / n for k < n. */
void lm_twiddles(double *tw, uint64_t n);

/*! lm_half_spectrum_row() : h (n_cols/2 + 1 complex numbers as re, im pairs) such that a real
 *  inverse FFT of length n_cols (FFTW's c2r, unnormalised) gives row x of
 *  Re(sum_t s_t e^{2 pi i (x rho_t / n_rows + c gamma_t / n_cols)}): the Hermitian half
 *  X[k] = (G[k] + conj(G[n_cols - k])) / 2 of the row's spectrum G. */
void lm_half_spectrum_row(const lm_sparse_spectrum *sp, uint64_t x, double *h);

/*! lm_tucker_fold() : U [r, n, kk] with U[a, q, x] = sum_b core[a, b, x] w[b, q] (b ascending,
 *  in double): a Tucker/CP core [r, r, kk] (kk kernel positions) contracted with a factor w [r, n].
 *  LoHa's hada_t x hada_w_b, LoKr's lokr_t2 x lokr_w2_b, kohya LoCon's lora_mid x lora_down. */
void lm_tucker_fold(const float *core, const float *w, size_t r, size_t n, size_t kk, double *U);

/* C [m, n] = A [m, k] @ B [k, n] in double, plain loops (small matrices) */
void lm_matmul_d(const double *A, const double *B, double *C, size_t m, size_t k, size_t n);

/*! lm_svd_top() : the r leading singular triplets of the row-major m x n matrix W, in double, as
 *  torch.linalg.svd computes them on the CPU (LAPACK gesdd on W in column-major order, thin:
 *  jobz 'S'), so the singular vectors' signs follow the same convention: U_r [m, r] and
 *  Vh_r [r, n] row-major, S_r [r] descending.  Allocates its workspace (the one function here
 *  that does).  @return 0, -1 when out of memory, -2 when LAPACK fails or the sizes exceed its
 *  32-bit integers (or r > min(m, n)), -3 when OpenBLAS's LAPACK cannot be loaded. */
int lm_svd_top(const float *W, size_t m, size_t n, size_t r, double *U_r, double *S_r, double *Vh_r);

/*! lm_svd_range() : lm_svd_top's triplets c0 .. c0 + r - 1 (0: the largest) instead of the r
 *  leading ones; U_r [m, r], S_r [r], Vh_r [r, n].  Same returns (-2 also when c0 + r > min(m, n)). */
int lm_svd_range(const float *W, size_t m, size_t n, size_t c0, size_t r, double *U_r, double *S_r, double *Vh_r);

/*! lm_solve_rows() : B [nrhs, n] row-major <- B V^-T, i.e. each row b becomes the y with V y = b
 *  (torch.linalg.solve(V, Bᵀ)ᵀ): LAPACK getrf (partial pivoting) on V and getrs.  @return 0, 1
 *  when V is singular (getrf met an exact zero pivot, where torch raises; B unchanged), -1 out of
 *  memory, -2 LAPACK failed or the sizes exceed its 32-bit integers, -3 no LAPACK. */
int lm_solve_rows(const double *V, size_t n, double *B, size_t nrhs);

/*! lm_qr_q() : A [m, n] row-major (m >= n) <- the Q of its reduced QR as torch.linalg.qr computes
 *  it on the CPU (LAPACK geqrf on A in column-major order, then orgqr): Householder reflectors,
 *  R's diagonal of either sign (no sign normalisation).  @return 0, -1 out of memory, -2 LAPACK
 *  failed or bad sizes, -3 no LAPACK. */
int lm_qr_q(double *A, size_t m, size_t n);

/*! lm_min_norm_solve() : X [m, q] = the least-norm solution of Wᵀ X = V for the row-major W [m, n]
 *  (m >= n, full column rank) and V [n, q]: X = W (WᵀW)⁻¹ V, by LAPACK's dgels (QR of W).
 *  Allocates its workspace.  @return 0, -1 when out of memory, -2 when W is rank-deficient, m < n
 *  or the sizes exceed LAPACK's 32-bit integers, -3 when OpenBLAS's LAPACK cannot be loaded. */
int lm_min_norm_solve(const double *W, size_t m, size_t n, const double *V, size_t q, double *X);
#endif
