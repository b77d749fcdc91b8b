/* SPDX-License-Identifier: MIT */
/* test_exact_frombase.c : issue 10 for the low-rank types whose delta is derived from the base
 * weight itself (LM_M_READS_BASE): PEANuT, DeFT and PSOFT.  Their delta cannot be chosen apart
 * from W (th_exact.c's runner builds W = -delta), so each case builds W and the adapter together,
 * then compares every merged element with PEFT's formula evaluated here in long double from the
 * stored values, rounded once (th_exact.c's checks):
 *  - CANCEL: W + delta(W) is a small residue of W.  PEANuT and DeFT: W's rows come in blocks of 4
 *    nearly equal rows, and the adapter subtracts the block's mean (peanut_A / deft_P the block
 *    indicator / 2, peanut_B = -A^T); what is left is the rows' spread and the adapter's other,
 *    small terms (encoder/decoder layers, deft_R, deft_P's negative entries that relu drops).
 *    PSOFT: W of rank r (random orthonormal triplets) rounded to the base dtype, its SVD computed
 *    here (one-sided Jacobi in long double), R = diag(vb) Cayley(Q) diag(va) with vb ~2^-8, so
 *    W + U S (R - I) Vh = U S R Vh + the rounding's part of W, ~2^-8 of W;
 *  - TINY: the delta far under an ulp of W ~0.05;  HUGE: W ~1e-6 of the delta;
 *  - SUBNORMAL: CANCEL at a scale whose results are subnormal in the output dtype;
 *  - an f16 result beyond 65504 refused naming the tensor, nothing written.
 * bf16, f16 and f32 bases; every case is also merged with --exactness-off, which gets elements
 * wrong (asserted for CANCEL in f16 and f32, HUGE and SUBNORMAL in f32): the checks can fail.  PSOFT's delta depends on the signs LAPACK gives
 * the singular vectors (R mixes them, as in PEFT): the reference takes the sign pattern that the
 * output matches, among the 2^(r-1) that differ; every element is then checked against it.
 * PEANuT's adversarial cases take relu at depth 1; peanut_activations checks every other act_fn
 * (transformers' ACT2FN definitions) at depth 2 (the golden case has relu at depth 0 only).
 * DeFT's "qr" and para, PSOFT's pissa_init, free R and Cayley-Neumann variants: *_variants (DeFT
 * qr's delta depends on the signs of LAPACK's Householder Q columns: chosen as PSOFT's are). */
#include "th.h"
#include "th_exact.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_rng = 0xfb5e;

typedef enum { FB_PEANUT, FB_DEFT, FB_PSOFT } fb_type;

enum { FB_O = 16, FB_I = 32, FB_R = 4, FB_BLK = 4, FB_PI = 64, FB_PR = 3, FB_K = 5 };
#define FB_MOD "base_model.model.model.layers.0.self_attn.q_proj."
#define FB_DEFT_S 2.0L /* DeFT's alpha / r = 8 / 4 */

static tx_t *fb_param(tx_set *ad, const char *name, uint64_t d0, uint64_t d1, double g)
{
    return tx_param(ad, name, d0, d1, g, &g_rng);
}

/* the relative spread of a block's rows (CANCEL's residue): a few ulps of the base dtype */
static double fb_spread(const char *bdt)
{
    return !strcmp(bdt, "BF16") ? 0x1p-6 : !strcmp(bdt, "F16") ? 0x1p-9 : 0x1p-12;
}

/* CANCEL's and SUBNORMAL's scale of W: SUBNORMAL puts the residues (spread * x) under the
 * output's smallest normal */
static double fb_block_scale(const char *bdt, tx_mode mode)
{
    if (mode != TX_SUBNORMAL)
        return 1.0;
    return !strcmp(bdt, "F16") ? 0x1p-6 : 0x1p-122;
}

/* W in blocks of FB_BLK rows: x X[block, i] (1 + k n), X in [1, 2), rounded to bdt */
static void fb_block_w(tx_t *w, const char *bdt, double x, double k)
{
    double X[FB_O / FB_BLK][FB_I];
    for (uint64_t c = 0; c < FB_O / FB_BLK; c++)
        for (uint64_t i = 0; i < FB_I; i++)
            X[c][i] = 1 + 0.5 * fabs(th_rand_normal(&g_rng));
    for (uint64_t o = 0; o < FB_O; o++)
        for (uint64_t i = 0; i < FB_I; i++)
            w->v[o * FB_I + i] = th_round_to(x * X[o / FB_BLK][i] * (1 + k * th_rand_normal(&g_rng)), bdt);
}

/* W = round(x normal) */
static void fb_random_w(tx_t *w, const char *bdt, double x)
{
    for (uint64_t e = 0; e < w->n; e++)
        w->v[e] = th_round_to(x * th_rand_normal(&g_rng), bdt);
}

/* the gain of TINY's delta against W ~0.05 (under half an ulp of most elements), HUGE's */
static double fb_gain(const char *bdt, tx_mode mode)
{
    if (mode == TX_HUGE)
        return 4.0;
    return !strcmp(bdt, "BF16") ? 1e-4 : !strcmp(bdt, "F16") ? 1.5e-5 : 1e-9;
}

/* PEANuT's activation (transformers' ACT2FN, from their definitions) and depth: the adversarial
 * modes take relu, depth 1; exact_frombase/peanut_activations every other */
typedef enum { FA_RELU, FA_GELU, FA_GELU_TANH, FA_SILU, FA_TANH, FA_SIGMOID, FA_LINEAR } fb_act;
static struct {
    fb_act act;
    const char *name; /* act_fn as the config says it */
    int depth;
    double w_scale; /* > 0: W ~ w_scale (the activations' test), else the mode's */
} g_pn = {FA_RELU, "relu", 1, 0};

static long double fb_act_of(long double x)
{
    const long double c = sqrtl(2 / 3.14159265358979323846264338327950288L);
    switch (g_pn.act) {
    case FA_RELU: return x > 0 ? x : 0;
    case FA_GELU: return 0.5L * x * (1 + erfl(x / sqrtl(2)));
    case FA_GELU_TANH: return 0.5L * x * (1 + tanhl(c * (x + 0.044715L * x * x * x)));
    case FA_SILU: return x / (1 + expl(-x));
    case FA_TANH: return tanhl(x);
    case FA_SIGMOID: return 1 / (1 + expl(-x));
    case FA_LINEAR: return x;
    }
    return x;
}

/* the magnitude act(s) carries when s has magnitude m: an error of s moves act(s) by at most
 * 1.13 times it (the largest slope, GELU's), act's own rounding is of |act(s)|; relu: none where s
 * is negative beyond f64's noise (the result is exactly 0 however s was rounded) */
static long double fb_act_mag(long double s, long double m)
{
    if (g_pn.act == FA_RELU)
        return s < -ldexpl(m, -40) ? 0 : m;
    return 1.13L * m + fabsl(fb_act_of(s));
}

/* H [i, q] <- act(H M^T) (+ res), and its magnitude */
static void fb_peanut_layer(long double *H, long double *Hm, const double *Mx, const long double *res,
                            const long double *resm)
{
    long double out[FB_I * FB_R], outm[FB_I * FB_R];
    for (uint64_t i = 0; i < FB_I; i++)
        for (uint64_t q = 0; q < FB_R; q++) {
            long double s = 0, m = 0;
            for (uint64_t j = 0; j < FB_R; j++) {
                s += H[i * FB_R + j] * Mx[q * FB_R + j];
                m += Hm[i * FB_R + j] * fabs(Mx[q * FB_R + j]);
            }
            out[i * FB_R + q] = fb_act_of(s) + (res ? res[i * FB_R + q] : 0);
            outm[i * FB_R + q] = fb_act_mag(s, m) + (resm ? resm[i * FB_R + q] : 0);
        }
    memcpy(H, out, sizeof out);
    memcpy(Hm, outm, sizeof outm);
}

/* ---- PEANuT (scaling 1): H = act(W^T A^T); res_k = H, H = act(H E_k^T) for k < depth; H =
 * act(H D_k^T) + res_{depth-1-k}; delta = B H^T.  M: the f64 evaluation's magnitude.  Tensors:
 * A, B, the encoders, the decoders ---- */
static void fb_peanut_h(const tx_t *w, const tx_set *ad, long double *H, long double *M)
{
    const double *A = ad->t[0].v;
    const int d = g_pn.depth;
    long double res[4][FB_I * FB_R], resm[4][FB_I * FB_R];
    for (uint64_t i = 0; i < FB_I; i++)
        for (uint64_t q = 0; q < FB_R; q++) {
            long double s = 0, m = 0;
            for (uint64_t o = 0; o < FB_O; o++) {
                s += (long double)w->v[o * FB_I + i] * A[q * FB_O + o];
                m += fabsl((long double)w->v[o * FB_I + i] * A[q * FB_O + o]);
            }
            H[i * FB_R + q] = fb_act_of(s);
            M[i * FB_R + q] = fb_act_mag(s, m);
        }
    for (int k = 0; k < d; k++) {
        memcpy(res[k], H, sizeof res[k]);
        memcpy(resm[k], M, sizeof resm[k]);
        fb_peanut_layer(H, M, ad->t[2 + k].v, NULL, NULL);
    }
    for (int k = 0; k < d; k++)
        fb_peanut_layer(H, M, ad->t[2 + d + k].v, res[d - 1 - k], resm[d - 1 - k]);
}

/* the encoders (gain ge) and decoders (gain gd), numbered as PEFT saves them */
static void fb_peanut_layers(tx_set *ad, double ge, double gd)
{
    char n[200];
    for (int k = 0; k < 2 * g_pn.depth; k++) {
        snprintf(n, sizeof n, FB_MOD "peanut_%s.%d.weight", k < g_pn.depth ? "encoders" : "decoders",
                 k % g_pn.depth);
        fb_param(ad, n, FB_R, FB_R, k < g_pn.depth ? ge : gd);
    }
}

static const char *fb_peanut(const char *bdt, tx_mode mode, tx_t *w, tx_set *ad)
{
    static char cfg[300];
    tx_t *A = tx_add(ad, FB_MOD "peanut_A.weight", "F32", 2, FB_R, FB_O);
    tx_t *B = tx_add(ad, FB_MOD "peanut_B.weight", "F32", 2, FB_O, FB_R);
    if (mode == TX_CANCEL || mode == TX_SUBNORMAL || mode == TX_OVERFLOW) {
        /* A: the block indicator / 2 (plus small positive entries elsewhere: more residue);
         * B = -A^T (OVERFLOW: +A^T / 2, W 60000: 1.25 W); the encoder/decoder terms small */
        const double k = mode == TX_OVERFLOW ? 0 : fb_spread(bdt);
        if (mode == TX_OVERFLOW)
            for (uint64_t e = 0; e < w->n; e++)
                w->v[e] = 60000;
        else
            fb_block_w(w, bdt, fb_block_scale(bdt, mode), k);
        for (uint64_t q = 0; q < FB_R; q++)
            for (uint64_t o = 0; o < FB_O; o++) {
                const int in = o / FB_BLK == q;
                A->v[q * FB_O + o] = in ? 0.5 : (double)(float)(0.25 * k * fabs(th_rand_normal(&g_rng)));
                B->v[o * FB_R + q] = !in ? 0 : mode == TX_OVERFLOW ? 0.25 : -0.5;
            }
        fb_peanut_layers(ad, k, 1.0);
    } else {
        /* W random, A, E, D random; B drawn so that the delta is g at its typical size */
        fb_random_w(w, bdt, g_pn.w_scale > 0 ? g_pn.w_scale : mode == TX_TINY ? 0.05 : 1e-6);
        for (uint64_t e = 0; e < A->n; e++)
            A->v[e] = tx_f32_normal(&g_rng, 0.5);
        fb_peanut_layers(ad, 0.5, 0.5);
        long double H[FB_I * FB_R], M[FB_I * FB_R], ss = 0;
        fb_peanut_h(w, ad, H, M);
        for (uint64_t e = 0; e < FB_I * FB_R; e++)
            ss += H[e] * H[e];
        const double rms = (double)sqrtl(ss / (FB_I * FB_R)) + 1e-300;
        for (uint64_t e = 0; e < B->n; e++)
            B->v[e] = tx_f32_normal(&g_rng, fb_gain(bdt, mode) / rms / 2);
    }
    snprintf(cfg, sizeof cfg, "{\"peft_type\": \"PEANUT\", \"r\": 4, \"depth\": %d, \"act_fn\": \"%s\", "
             "\"scaling\": 1.0, \"target_modules\": [\"q_proj\"]}", g_pn.depth, g_pn.name);
    return cfg;
}

static void fb_peanut_delta(const tx_t *w, const tx_set *ad, long double *D, long double *mag)
{
    long double H[FB_I * FB_R], M[FB_I * FB_R];
    fb_peanut_h(w, ad, H, M);
    const double *B = ad->t[1].v;
    for (uint64_t o = 0; o < FB_O; o++)
        for (uint64_t i = 0; i < FB_I; i++) {
            long double s = 0, m = 0;
            for (uint64_t q = 0; q < FB_R; q++) {
                s += B[o * FB_R + q] * H[i * FB_R + q];
                m += fabs(B[o * FB_R + q]) * M[i * FB_R + q];
            }
            D[o * FB_I + i] = s;
            mag[o * FB_I + i] = m;
        }
}

/* the DeFT variant: decomposition_method "qr" (else "relu"), para (no deft_R) */
static struct {
    int qr, para;
} g_df;

/* ---- DeFT, alpha 8 (s = 2): delta = Q_P (s R - right^T W); relu: Q_P = P, right = relu(P); qr:
 * Q_P = right = the Q of P's reduced QR; para: no R ---- */
static const char *fb_deft(const char *bdt, tx_mode mode, tx_t *w, tx_set *ad)
{
    static char cfg[300];
    tx_t *P = tx_add(ad, FB_MOD "deft_P", "F32", 2, FB_O, FB_R);
    tx_t *R = g_df.para ? NULL : tx_add(ad, FB_MOD "deft_R", "F32", 2, FB_R, FB_I);
    if (mode == TX_CANCEL || mode == TX_SUBNORMAL || mode == TX_OVERFLOW) {
        /* P: the block indicator / 2, small negative entries elsewhere (relu drops them from
         * right^T W, Q_P keeps them); s R / 2 the size of the residue (OVERFLOW: W 60000, s R
         * 160000: 80000) */
        const double k = mode == TX_OVERFLOW ? 0 : fb_spread(bdt), x = fb_block_scale(bdt, mode);
        if (mode == TX_OVERFLOW)
            for (uint64_t e = 0; e < w->n; e++)
                w->v[e] = 60000;
        else
            fb_block_w(w, bdt, x, k);
        for (uint64_t o = 0; o < FB_O; o++)
            for (uint64_t c = 0; c < FB_R; c++)
                P->v[o * FB_R + c] = o / FB_BLK == c ? 0.5 : -(double)(float)(0.25 * k * fabs(th_rand_normal(&g_rng)));
        for (uint64_t e = 0; R != NULL && e < R->n; e++)
            R->v[e] = mode == TX_OVERFLOW ? 80000 : tx_f32_normal(&g_rng, x * k);
    } else {
        /* TINY, relu: P ~g (para: sqrt(g), the delta being P relu(P)^T W), R ~0.5; qr: Q_P
         * Q_P^T W is of W's size whatever P, so TINY is one more case with R ~g */
        fb_random_w(w, bdt, mode == TX_TINY ? 0.05 : 1e-6);
        const double g = fb_gain(bdt, mode);
        for (uint64_t e = 0; e < P->n; e++)
            P->v[e] = tx_f32_normal(&g_rng, mode != TX_TINY || g_df.qr ? 1.0 : g_df.para ? sqrt(g) : g);
        for (uint64_t e = 0; R != NULL && e < R->n; e++)
            R->v[e] = tx_f32_normal(&g_rng, mode == TX_TINY ? (g_df.qr ? g : 0.5) : g / 4);
    }
    snprintf(cfg, sizeof cfg, "{\"peft_type\": \"DEFT\", \"r\": 4, \"alpha\": 8, \"decomposition_method\": \"%s\", "
             "\"para\": %s, \"target_modules\": [\"q_proj\"]}", g_df.qr ? "qr" : "relu", g_df.para ? "true" : "false");
    return cfg;
}

/* Q of P's reduced QR up to its columns' signs (modified Gram-Schmidt twice, long double) */
static void fb_deft_q(const double *P, long double Q[FB_O][FB_R])
{
    for (uint64_t c = 0; c < FB_R; c++) {
        for (uint64_t o = 0; o < FB_O; o++)
            Q[o][c] = P[o * FB_R + c];
        for (int pass = 0; pass < 2; pass++)
            for (uint64_t j = 0; j < c; j++) {
                long double d = 0;
                for (uint64_t o = 0; o < FB_O; o++)
                    d += Q[o][j] * Q[o][c];
                for (uint64_t o = 0; o < FB_O; o++)
                    Q[o][c] -= d * Q[o][j];
            }
        long double nn = 0;
        for (uint64_t o = 0; o < FB_O; o++)
            nn += Q[o][c] * Q[o][c];
        for (uint64_t o = 0; o < FB_O; o++)
            Q[o][c] /= sqrtl(nn);
    }
}

/* the delta; qr: with Q's column c negated where bit c of sigma is set (LAPACK's signs) */
static void fb_deft_delta(const tx_t *w, const tx_set *ad, unsigned sigma, long double *D, long double *mag)
{
    const double *P = ad->t[0].v, *R = g_df.para ? NULL : ad->t[1].v;
    long double Qp[FB_O][FB_R], right[FB_O][FB_R];
    if (g_df.qr)
        fb_deft_q(P, Qp);
    for (uint64_t o = 0; o < FB_O; o++)
        for (uint64_t c = 0; c < FB_R; c++) {
            if (g_df.qr)
                Qp[o][c] = (sigma >> c) & 1 ? -Qp[o][c] : Qp[o][c];
            else
                Qp[o][c] = P[o * FB_R + c];
            right[o][c] = g_df.qr ? Qp[o][c] : P[o * FB_R + c] > 0 ? P[o * FB_R + c] : 0;
        }
    long double F[FB_R][FB_I], Fm[FB_R][FB_I]; /* s R - right^T W and its magnitude */
    for (uint64_t c = 0; c < FB_R; c++)
        for (uint64_t i = 0; i < FB_I; i++) {
            long double s = R ? FB_DEFT_S * R[c * FB_I + i] : 0, m = fabsl(s);
            for (uint64_t o = 0; o < FB_O; o++) {
                const long double t = right[o][c] * w->v[o * FB_I + i];
                s -= t;
                m += fabsl(t);
            }
            F[c][i] = s;
            Fm[c][i] = m;
        }
    for (uint64_t o = 0; o < FB_O; o++)
        for (uint64_t i = 0; i < FB_I; i++) {
            long double s = 0, m = 0;
            for (uint64_t c = 0; c < FB_R; c++) {
                s += Qp[o][c] * F[c][i];
                m += fabsl(Qp[o][c]) * Fm[c][i];
            }
            D[o * FB_I + i] = s;
            mag[o * FB_I + i] = m;
        }
}

/* ---- PSOFT, r = 3, orth (exact Cayley), vectors a and b, psoft_init: delta = U_r S_r (R - I) Vh_r
 * from the SVD of the stored W, R = diag(vb) (I + Q)(I - Q)^-1 diag(va), Q skew from the stored
 * upper triangle.  W = sum_k<K s_k u_k v_k^T for random orthonormal u_k, v_k and s_k = 2^(2-k),
 * scaled and rounded to the base dtype (its rounding adds the small singular values beyond K);
 * the reference's SVD of the stored W: one-sided Jacobi in long double ---- */
static struct {
    long double U[FB_O][FB_O], S[FB_O], V[FB_PI][FB_O]; /* W = U diag(S) V^T, S descending */
} g_svd;

/* n random orthonormal vectors of length len (Gram-Schmidt twice, double) into x[k * len + e] */
static void fb_orthonormal(double *x, int n, int len)
{
    for (int k = 0; k < n; k++) {
        double *v = x + k * len;
        for (int e = 0; e < len; e++)
            v[e] = th_rand_normal(&g_rng);
        for (int pass = 0; pass < 2; pass++)
            for (int j = 0; j < k; j++) {
                double d = 0;
                for (int e = 0; e < len; e++)
                    d += v[e] * x[j * len + e];
                for (int e = 0; e < len; e++)
                    v[e] -= d * x[j * len + e];
            }
        double nn = 0;
        for (int e = 0; e < len; e++)
            nn += v[e] * v[e];
        for (int e = 0; e < len; e++)
            v[e] /= sqrt(nn);
    }
}

/* the PSOFT variant: pissa_init (else psoft_init), psoft_orth, psoft_mag_a and _b, Cayley-Neumann
 * with `terms` terms and eps (< 0: null); exact_frombase/psoft takes the defaults */
static struct {
    int pissa, orth, mag, neumann, terms;
    double eps;
} g_ps = {0, 1, 1, 0, 5, -1};

static const char *fb_psoft(const char *bdt, tx_mode mode, tx_t *w, tx_set *ad)
{
    const int f16 = !strcmp(bdt, "F16"), K = mode == TX_TINY || mode == TX_HUGE ? FB_K : FB_PR;
    double u[FB_K * FB_O], v[FB_K * FB_PI], top = 0;
    fb_orthonormal(u, K, FB_O);
    fb_orthonormal(v, K, FB_PI);
    for (uint64_t o = 0; o < FB_O; o++)
        for (uint64_t i = 0; i < FB_PI; i++) {
            double x = 0;
            for (int k = 0; k < K; k++)
                x += ldexp(1.0, 2 - k) * u[k * FB_O + o] * v[k * FB_PI + i];
            w->v[o * FB_PI + i] = x;
            top = fabs(x) > top ? fabs(x) : top;
        }
    /* the largest |W|: CANCEL 1; TINY 0.1; HUGE 1e-6; SUBNORMAL with residues (2^-8 of W) under
     * the smallest normal; OVERFLOW 58000, 1.5 W beyond f16 */
    const double x = mode == TX_TINY ? 0.1 : mode == TX_HUGE ? 1e-6 : mode == TX_OVERFLOW ? 58000
                     : mode == TX_SUBNORMAL ? (f16 ? 0x1p-6 : 0x1p-118) : 1.0;
    for (uint64_t e = 0; e < w->n; e++)
        w->v[e] = th_round_to(w->v[e] * x / top, bdt);
    /* the skew part (or the free R), then vector_a, vector_b (CANCEL: R ~2^-8, so W + delta =
     * U S R Vh + the part of W beyond r, both small) */
    const int orth = g_ps.orth, n_w = orth ? FB_PR * (FB_PR - 1) / 2 : FB_PR * FB_PR;
    tx_t *q = fb_param(ad, FB_MOD "psoft_R.weight", (uint64_t)n_w, 0, orth || g_ps.mag ? 0.3 : 0x1p-10);
    if (!orth) {
        q->nd = 2;
        q->shape[0] = q->shape[1] = FB_PR;
    }
    tx_t *va = g_ps.mag ? fb_param(ad, FB_MOD "psoft_R.vector_a", FB_PR, 0, 1.0) : NULL;
    tx_t *vb = g_ps.mag ? fb_param(ad, FB_MOD "psoft_R.vector_b", FB_PR, 0, 0x1p-8) : NULL;
    cr_assert(g_ps.mag || !orth || mode == TX_TINY, "an orthogonal R without vectors is never small nor huge");
    if (mode == TX_TINY || mode == TX_OVERFLOW) { /* R = I + 2Q ~ g (free: I + g); OVERFLOW: R = 1.5 I, 1.5 W */
        for (uint64_t e = 0; e < q->n; e++)
            q->v[e] = mode == TX_OVERFLOW ? 0 : (double)(float)(tx_f32_normal(&g_rng, fb_gain(bdt, mode)) + (!orth && e % (FB_PR + 1) == 0));
        for (uint64_t e = 0; va != NULL && e < FB_PR; e++) {
            va->v[e] = 1;
            vb->v[e] = mode == TX_OVERFLOW ? 1.5 : 1;
        }
    } else if (mode == TX_HUGE) {
        for (uint64_t e = 0; vb != NULL && e < FB_PR; e++)
            vb->v[e] = tx_f32_normal(&g_rng, 4e6);
        for (uint64_t e = 0; vb == NULL && e < q->n; e++)
            q->v[e] = tx_f32_normal(&g_rng, 4e6);
    }
    static char cfg[600];
    char eps[32] = "null";
    if (g_ps.eps >= 0)
        snprintf(eps, sizeof eps, "%g", g_ps.eps);
    snprintf(cfg, sizeof cfg, "{\"peft_type\": \"PSOFT\", \"r\": 3, \"psoft_alpha\": 32, \"psoft_orth\": %s, "
             "\"psoft_mag_a\": %s, \"psoft_mag_b\": %s, \"use_cayley_neumann\": %s, \"num_cayley_neumann_terms\": %d, "
             "\"cayley_neumann_eps\": %s, \"ab_svd_init\": \"%s\", \"psoft_svd\": \"full\", "
             "\"target_modules\": [\"q_proj\"]}", orth ? "true" : "false", g_ps.mag ? "true" : "false",
             g_ps.mag ? "true" : "false", g_ps.neumann ? "true" : "false", g_ps.terms, eps,
             g_ps.pissa ? "pissa_init" : "psoft_init");
    return cfg;
}

/* g_svd from W [FB_O, FB_PI]: Jacobi rotations J orthogonalise the columns of W^T (W^T J = V S),
 * so that U = J; sweeps until every pair is orthogonal to 2^-60 */
static void fb_svd(const tx_t *w)
{
    long double A[FB_PI][FB_O], J[FB_O][FB_O];
    for (int i = 0; i < FB_PI; i++)
        for (int o = 0; o < FB_O; o++)
            A[i][o] = w->v[o * FB_PI + i];
    for (int a = 0; a < FB_O; a++)
        for (int b = 0; b < FB_O; b++)
            J[a][b] = a == b;
    for (int sweep = 0, rotated = 1; rotated && sweep < 60; sweep++) {
        rotated = 0;
        for (int p = 0; p < FB_O; p++)
            for (int q = p + 1; q < FB_O; q++) {
                long double al = 0, be = 0, ga = 0;
                for (int i = 0; i < FB_PI; i++) {
                    al += A[i][p] * A[i][p];
                    be += A[i][q] * A[i][q];
                    ga += A[i][p] * A[i][q];
                }
                if (fabsl(ga) <= 0x1p-60L * sqrtl(al * be) || ga == 0)
                    continue;
                rotated = 1;
                const long double z = (be - al) / (2 * ga);
                const long double t = (z >= 0 ? 1 : -1) / (fabsl(z) + sqrtl(1 + z * z));
                const long double c = 1 / sqrtl(1 + t * t), s = c * t;
                for (int i = 0; i < FB_PI; i++) {
                    const long double x = A[i][p], y = A[i][q];
                    A[i][p] = c * x - s * y;
                    A[i][q] = s * x + c * y;
                }
                for (int i = 0; i < FB_O; i++) {
                    const long double x = J[i][p], y = J[i][q];
                    J[i][p] = c * x - s * y;
                    J[i][q] = s * x + c * y;
                }
            }
    }
    int order[FB_O];
    long double nrm[FB_O];
    for (int o = 0; o < FB_O; o++) {
        long double n2 = 0;
        for (int i = 0; i < FB_PI; i++)
            n2 += A[i][o] * A[i][o];
        nrm[o] = sqrtl(n2);
        order[o] = o;
    }
    for (int a = 1; a < FB_O; a++) /* descending */
        for (int b = a; b > 0 && nrm[order[b]] > nrm[order[b - 1]]; b--) {
            const int t = order[b];
            order[b] = order[b - 1];
            order[b - 1] = t;
        }
    for (int k = 0; k < FB_O; k++) {
        const int o = order[k];
        g_svd.S[k] = nrm[o];
        for (int i = 0; i < FB_O; i++)
            g_svd.U[i][k] = J[i][o];
        for (int i = 0; i < FB_PI; i++)
            g_svd.V[i][k] = nrm[o] > 0 ? A[i][o] / nrm[o] : 0;
    }
}

/* R - I in long double: R = diag(vb) R0 diag(va), R0 the free matrix, or from the skew Q
 * (projected to Frobenius norm eps when larger): Cayley (I + Q)(I - Q)^-1 (Gauss-Jordan), or
 * PEFT's Neumann loop: I + 2Q (t = 2); I + 2Q + 2Q^2 + 2Q^3 + ... + 2Q^(t-2) + Q^(t-1) (t > 2; t = 3 as 4) */
static void fb_psoft_m(const tx_set *ad, long double M[FB_PR][FB_PR])
{
    const double *w = ad->t[0].v, *va = g_ps.mag ? ad->t[1].v : NULL, *vb = g_ps.mag ? ad->t[2].v : NULL;
    long double Q[FB_PR][FB_PR] = {{0}}, R0[FB_PR][FB_PR] = {{0}}, L[FB_PR][2 * FB_PR];
    for (int a = 0, t = 0; g_ps.orth && a < FB_PR; a++)
        for (int b = a + 1; b < FB_PR; b++, t++) {
            Q[a][b] = w[t];
            Q[b][a] = -(long double)w[t];
        }
    if (!g_ps.orth) {
        for (int a = 0; a < FB_PR; a++)
            for (int b = 0; b < FB_PR; b++)
                R0[a][b] = w[a * FB_PR + b];
    } else if (g_ps.neumann) {
        long double nn = 0;
        for (int a = 0; a < FB_PR; a++)
            for (int b = 0; b < FB_PR; b++)
                nn += Q[a][b] * Q[a][b];
        const long double f = g_ps.eps >= 0 && sqrtl(nn) > g_ps.eps ? g_ps.eps / (sqrtl(nn) + 1e-12L) : 1;
        long double P[FB_PR][FB_PR], X[FB_PR][FB_PR];
        for (int a = 0; a < FB_PR; a++)
            for (int b = 0; b < FB_PR; b++) {
                Q[a][b] *= f;
                P[a][b] = Q[a][b];
                R0[a][b] = a == b;
            }
        const int t = g_ps.terms, top = t <= 1 ? 0 : t == 2 ? 1 : t == 3 ? 3 : t - 1;
        for (int k = 1; k <= top; k++) {
            const long double c = k == top && t > 2 ? 1 : 2;
            for (int a = 0; a < FB_PR; a++)
                for (int b = 0; b < FB_PR; b++)
                    R0[a][b] += c * P[a][b];
            for (int a = 0; a < FB_PR; a++)
                for (int b = 0; b < FB_PR; b++) {
                    X[a][b] = 0;
                    for (int j = 0; j < FB_PR; j++)
                        X[a][b] += P[a][j] * Q[j][b];
                }
            memcpy(P, X, sizeof P);
        }
    } else {
        for (int a = 0; a < FB_PR; a++)
            for (int b = 0; b < FB_PR; b++) {
                L[a][b] = (a == b) - Q[a][b];
                L[a][FB_PR + b] = a == b;
            }
        tx_gauss_jordan(&L[0][0], FB_PR); /* L -> [I | (I - Q)^-1] */
        for (int a = 0; a < FB_PR; a++)
            for (int b = 0; b < FB_PR; b++)
                for (int j = 0; j < FB_PR; j++)
                    R0[a][b] += ((a == j) + Q[a][j]) * L[j][FB_PR + b];
    }
    for (int a = 0; a < FB_PR; a++)
        for (int b = 0; b < FB_PR; b++)
            M[a][b] = (vb ? vb[a] : 1) * R0[a][b] * (va ? va[b] : 1) - (a == b);
}

/* the delta with singular vector signs sigma (bit a-1: pair a flipped; pair 0 kept) */
static void fb_psoft_delta(const tx_set *ad, unsigned sigma, long double *D, long double *mag)
{
    long double M[FB_PR][FB_PR];
    fb_psoft_m(ad, M);
    for (uint64_t o = 0; o < FB_O; o++)
        for (uint64_t i = 0; i < FB_PI; i++) {
            long double s = 0, m = 0;
            for (int a = 0; a < FB_PR; a++)
                for (int b = 0; b < FB_PR; b++) {
                    const int sg = (a > 0 && (sigma >> (a - 1)) & 1) != (b > 0 && (sigma >> (b - 1)) & 1);
                    /* psoft_init: S_a on the left; pissa_init: sqrt(S_a / scaling) both sides,
                     * times the op's scaling */
                    const long double sab = g_ps.pissa ? sqrtl(g_svd.S[a] * g_svd.S[b]) : g_svd.S[a];
                    const long double t = g_svd.U[o][a] * sab * M[a][b] * g_svd.V[i][b];
                    s += sg ? -t : t;
                    m += fabsl(t);
                }
            for (int k = 0; k < FB_O; k++) /* the SVD's noise: of the order of W's terms */
                m += fabsl(g_svd.U[o][k] * g_svd.S[k] * g_svd.V[i][k]);
            D[o * FB_PI + i] = s;
            mag[o * FB_PI + i] = m;
        }
}

/* ---- the runner ---- */
static const char *fb_build(const tx_type *ty, const char *bdt, tx_mode mode, tx_t *w, tx_set *ad)
{
    switch ((fb_type)ty->id) {
    case FB_PEANUT: return fb_peanut(bdt, mode, w, ad);
    case FB_DEFT: return fb_deft(bdt, mode, w, ad);
    case FB_PSOFT: return fb_psoft(bdt, mode, w, ad);
    }
    return NULL;
}

/* the delta of sign pattern sigma (PSOFT's singular pairs, DeFT qr's Q columns; else none) */
static void fb_delta_of(const tx_type *ty, const tx_t *w, const tx_set *ad, unsigned sigma, long double *D,
                        long double *mag)
{
    if ((fb_type)ty->id == FB_PEANUT)
        fb_peanut_delta(w, ad, D, mag);
    else if ((fb_type)ty->id == FB_DEFT)
        fb_deft_delta(w, ad, sigma, D, mag);
    else
        fb_psoft_delta(ad, sigma, D, mag);
}

/* D and mag from the stored values, with the sign pattern the output matches (the signs LAPACK
 * gives singular vectors or Householder Q columns, which these deltas depend on as PEFT's do) */
static void fb_delta(const tx_type *ty, const tx_case *c, const tx_t *w, const tx_set *ad, const char *bdt,
                     long double *D, long double *mag)
{
    const unsigned n_sigma = (fb_type)ty->id == FB_PSOFT ? 1u << (FB_PR - 1)
                             : (fb_type)ty->id == FB_DEFT && g_df.qr ? 1u << FB_R : 1;
    if ((fb_type)ty->id == FB_PSOFT)
        fb_svd(w);
    double *out = tx_out_values(c->out, w->name, w->n);
    uint64_t best_miss = UINT64_MAX;
    unsigned best = 0;
    for (unsigned sigma = 0; n_sigma > 1 && sigma < n_sigma; sigma++) {
        fb_delta_of(ty, w, ad, sigma, D, mag);
        uint64_t miss = 0;
        for (uint64_t e = 0; e < w->n; e++)
            miss += th_round_to((double)(w->v[e] + D[e]), bdt) != out[e];
        if (miss < best_miss) {
            best_miss = miss;
            best = sigma;
        }
    }
    free(out);
    fb_delta_of(ty, w, ad, best, D, mag);
}

/* --exactness-off on the same inputs: how many elements whose exact value rounds unambiguously it
 * gets wrong */
static uint64_t fb_off_wrong(const tx_type *ty, const tx_case *c, const tx_t *w, const long double *D,
                             const long double *mag, const char *bdt)
{
    char off[700];
    snprintf(off, sizeof off, "%s/off.safetensors", c->dir);
    const char *opts[] = {"--exactness-off", NULL};
    th_run_result r = tx_merge(c, off, opts);
    cr_assert_eq(r.status, 0, "--exactness-off: exit %d: %s", r.status, r.err);
    th_run_free(&r);
    double *o = tx_out_values(off, w->name, w->n);
    uint64_t wrong = 0;
    for (uint64_t e = 0; e < w->n; e++) {
        const long double ref = w->v[e] + D[e], bnd = ldexpl(mag[e], ty->noise_log2) + ldexpl(fabsl(ref), -52);
        const double lo = th_round_to((double)(ref - bnd), bdt), hi = th_round_to((double)(ref + bnd), bdt);
        wrong += lo == hi && o[e] != lo;
    }
    free(o);
    return wrong;
}

static void fb_run_case(const tx_type *ty, const char *bdt, tx_mode mode)
{
    static const char *const names[] = {"cancel", "tiny", "huge", "subnormal", "overflow"};
    const uint64_t O = ty->rows, I = ty->cols, n = O * I;
    long double *D = malloc(n * sizeof *D), *mag = malloc(n * sizeof *mag);
    tx_set base = {0}, ad = {0};
    tx_t *w = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", bdt, 2, O, I);
    tx_t *other = tx_add(&base, "model.layers.0.self_attn.k_proj.weight", bdt, 2, 4, I);
    for (uint64_t e = 0; e < other->n; e++)
        other->v[e] = th_round_to(0.01 * (double)e, bdt);
    const char *cfg = fb_build(ty, bdt, mode, w, &ad);
    tx_case c;
    tx_case_write(&c, &base, &ad, cfg);
    th_run_result res = tx_merge(&c, c.out, NULL);
    char what[96];
    snprintf(what, sizeof what, "%s %s %s", ty->name, bdt, names[mode]);
    if (mode == TX_OVERFLOW) {
        tx_assert_refused(&res, c.out, "q_proj.weight", "F16");
    } else {
        cr_assert_eq(res.status, 0, "%s: exit %d: %s", what, res.status, res.err);
        fb_delta(ty, &c, w, &ad, bdt, D, mag);
        tx_check_case(ty, &c, &res, w, D, mag, bdt, mode, what);
        const uint64_t off = fb_off_wrong(ty, &c, w, D, mag, bdt);
        fprintf(stderr, "%s: --exactness-off gets %llu of %llu elements wrong\n", what, (unsigned long long)off,
                (unsigned long long)n);
        if ((mode == TX_CANCEL && strcmp(bdt, "BF16") != 0) || (mode != TX_TINY && !strcmp(bdt, "F32")))
            cr_assert_gt(off, 0, "%s: --exactness-off gets every element right: not adversarial", what);
    }
    th_run_free(&res);
    free(D);
    free(mag);
    tx_case_free(&c, &base, &ad);
}

/* ty's cases in modes first .. last, bf16, f16 and f32, under the name `name` */
static void fb_run_modes(const tx_type *ty, const char *name, tx_mode first, tx_mode last)
{
    static const char *const dts[3] = {"BF16", "F16", "F32"};
    tx_type named = *ty;
    named.name = name;
    for (int d = 0; d < 3; d++)
        for (int m = (int)first; m <= (int)last; m++)
            fb_run_case(&named, dts[d], (tx_mode)m);
}

static void fb_run_type(const tx_type *ty)
{
    fb_run_modes(ty, ty->name, TX_CANCEL, TX_SUBNORMAL);
    fb_run_case(ty, "F16", TX_OVERFLOW);
}

/* noise bounds (f64 evaluation, as a multiple of the terms' magnitude): PEANuT's chain of sums of
 * 16 and 4 terms, DeFT's s R - right^T W over 16 rows then P times it, 2^-46; PSOFT's LAPACK SVD
 * of a 16 x 64 matrix (backward error a small multiple of n 2^-53 of ||W||, singular values apart
 * by factors of 2) 2^-42 */
static const tx_type FB_TYPES[] = {
    {"peanut", FB_PEANUT, FB_O, FB_I, NULL, NULL, -46, 1, 0, &g_rng, 1},
    {"deft", FB_DEFT, FB_O, FB_I, NULL, NULL, -46, 1, 0, &g_rng, 1},
    {"psoft", FB_PSOFT, FB_O, FB_PI, NULL, NULL, -46, 1, 0, &g_rng, 1},
};

Test(exact_frombase, peanut, .timeout = 120) { fb_run_type(&FB_TYPES[FB_PEANUT]); }
/* every act_fn lora-merge accepts for PEANuT, at depth 2 (two residual pairs): W ~1 and a delta ~4
 * (pre-activations of order 1, where the GELU variants differ), bf16, f16 and f32, every element
 * against the formula in long double */
Test(exact_frombase, peanut_activations, .timeout = 120)
{
    static const struct {
        fb_act act;
        const char *name;
    } acts[] = {{FA_RELU, "relu"}, {FA_GELU, "gelu"}, {FA_GELU_TANH, "gelu_new"}, {FA_GELU_TANH, "gelu_pytorch_tanh"},
                {FA_SILU, "silu"}, {FA_SILU, "swish"}, {FA_TANH, "tanh"}, {FA_SIGMOID, "sigmoid"},
                {FA_LINEAR, "linear"}};
    for (size_t k = 0; k < sizeof acts / sizeof *acts; k++) {
        g_pn.act = acts[k].act;
        g_pn.name = acts[k].name;
        g_pn.depth = 2;
        g_pn.w_scale = 1.0;
        fb_run_modes(&FB_TYPES[FB_PEANUT], acts[k].name, TX_HUGE, TX_HUGE);
    }
}
Test(exact_frombase, deft, .timeout = 120) { fb_run_type(&FB_TYPES[FB_DEFT]); }
/* DeFT's other variants, every mode but the f16 overflow: "qr" (Q_P = right = Q of P's QR, LAPACK's
 * Householder signs, which the injection s Q_P R depends on) and para (no R: -P relu(P)^T W) */
Test(exact_frombase, deft_variants, .timeout = 240)
{
    static const struct {
        const char *name;
        int qr, para;
    } vs[] = {{"deft qr", 1, 0}, {"deft para", 0, 1}, {"deft qr para", 1, 1}};
    for (size_t k = 0; k < sizeof vs / sizeof *vs; k++) {
        g_df.qr = vs[k].qr;
        g_df.para = vs[k].para;
        fb_run_modes(&FB_TYPES[FB_DEFT], vs[k].name, TX_CANCEL, TX_SUBNORMAL);
    }
}
Test(exact_frombase, psoft, .timeout = 120) { fb_run_type(&FB_TYPES[FB_PSOFT]); }
/* PSOFT's other variants, every mode but the f16 overflow: pissa_init (sqrt(S) on both sides of
 * R - I, which R's off-diagonal terms tell from psoft_init's S on the left), a free R with and
 * without the vectors, PEFT's Cayley-Neumann series (5 terms; 3 terms with the projection of Q to
 * Frobenius norm 0.1), and pissa_init with 4 Neumann terms */
Test(exact_frombase, psoft_variants, .timeout = 240)
{
    static const struct {
        const char *name;
        int pissa, orth, mag, neumann, terms;
        double eps;
    } vs[] = {{"psoft pissa_init", 1, 1, 1, 0, 5, -1}, {"psoft free R", 0, 0, 1, 0, 5, -1},
              {"psoft free R, no vectors", 0, 0, 0, 0, 5, -1}, {"psoft neumann 5", 0, 1, 1, 1, 5, -1},
              {"psoft neumann 3, eps 0.1", 0, 1, 1, 1, 3, 0.1}, {"psoft pissa_init, neumann 4", 1, 1, 1, 1, 4, -1}};
    for (size_t k = 0; k < sizeof vs / sizeof *vs; k++) {
        g_ps.pissa = vs[k].pissa;
        g_ps.orth = vs[k].orth;
        g_ps.mag = vs[k].mag;
        g_ps.neumann = vs[k].neumann;
        g_ps.terms = vs[k].terms;
        g_ps.eps = vs[k].eps;
        fb_run_modes(&FB_TYPES[FB_PSOFT], vs[k].name, TX_CANCEL, TX_SUBNORMAL);
    }
}
