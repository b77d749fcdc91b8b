/* SPDX-License-Identifier: MIT */
/* test_exact_lowrank.c : issue 10 for the low-rank types other than LoRA (test_exact.c): VeRA,
 * PVeRA, AdaLoRA, GraLoRA, RandLoRA (both orientations) and TinyLoRA, whose factors are
 * prepared from several stored tensors before the certified low-rank product.  Per type, an adapter with random
 * stored values is merged by the binary onto a base built from its delta, and every element is
 * compared with PEFT's formula evaluated here in long double from the stored values, rounded once
 * (th_exact.c's runner):
 *  - CANCEL: W = -(the delta rounded to bf16), so the result is the small residue;
 *  - TINY: the delta ~1e-9 of W;  HUGE: W ~1e-6 of the delta;
 *  - SUBNORMAL: CANCEL at a scale whose results are subnormal in the output dtype;
 *  - an f16 result beyond 65504 refused naming the tensor, nothing written.
 * bf16, f16 and f32 bases.  The reference's own rounding (products of four stored values in
 * long double) is carried as a bound; elements it leaves ambiguous may take either neighbour.
 * The same bytes with --threads 1/2, --tile-elems and --kernels ref; --json says exact. */
#include "th.h"
#include "th_exact.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_rng = 0x10a7;

typedef enum { XL_VERA, XL_ADALORA, XL_PVERA, XL_GRALORA, XL_RANDLORA, XL_RANDLORA_T, XL_TINYLORA, XL_DELORA, XL_VBLORA, XL_VBLORA_TOPK } xl_type;

enum { XL_O = 24, XL_I = 32, XL_R = 4 };
#define XL_MOD "base_model.model.model.layers.0.self_attn.q_proj."

static tx_t *xl_param(tx_set *ad, const char *name, uint64_t d0, uint64_t d1, double g)
{
    return tx_param(ad, name, d0, d1, g, &g_rng);
}

/* the same, 3-D [d0, d1, d2] */
static tx_t *xl_param3(tx_set *ad, const char *name, uint64_t d0, uint64_t d1, uint64_t d2, double g)
{
    tx_t *t = xl_param(ad, name, d0, d1 * d2, g);
    t->nd = 3;
    t->shape[1] = d1;
    t->shape[2] = d2;
    return t;
}

/* D[e] += x, mag[e] += |x| */
static void xl_term(long double *D, long double *mag, uint64_t e, long double x)
{
    D[e] += x;
    mag[e] += fabsl(x);
}

/* GraLoRA, k = 2, r = 4 (sigma = 2), hybrid_r = 2: Delta[j o/k + y, n i/k + x] = sum_{t<sigma}
 * A[n, x, j sigma + t] B[j, n sigma + t, y], plus B_gen @ A_gen, times alpha / (r + hybrid_r)
 * (a Python float: the double 16/6) */
static const char *xl_gralora(uint64_t O, uint64_t I, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t k = 2, R = 4, s = R / k, h = 2, ok = O / k, ik = I / k;
    const tx_t *B = xl_param3(ad, XL_MOD "gralora_B", k, R, ok, g);
    const tx_t *A = xl_param3(ad, XL_MOD "gralora_A", k, ik, R, 1.0 / sqrt((double)I));
    const tx_t *Bg = xl_param(ad, XL_MOD "gralora_B_general.weight", O, h, g);
    const tx_t *Ag = xl_param(ad, XL_MOD "gralora_A_general.weight", h, I, 1.0 / sqrt((double)I));
    const long double sc = (long double)(16.0 / 6.0);
    for (uint64_t j = 0; j < k; j++)
        for (uint64_t n = 0; n < k; n++)
            for (uint64_t y = 0; y < ok; y++)
                for (uint64_t x = 0; x < ik; x++)
                    for (uint64_t t = 0; t < s; t++)
                        xl_term(D, mag, (j * ok + y) * I + n * ik + x,
                                (long double)A->v[(n * ik + x) * R + j * s + t] *
                                    B->v[(j * R + n * s + t) * ok + y] * sc);
    for (uint64_t o = 0; o < O; o++)
        for (uint64_t i = 0; i < I; i++)
            for (uint64_t q = 0; q < h; q++)
                xl_term(D, mag, o * I + i, (long double)Bg->v[o * h + q] * Ag->v[q * I + i] * sc);
    return "{\"peft_type\": \"GRALORA\", \"r\": 4, \"hybrid_r\": 2, \"alpha\": 16, \"gralora_k\": 2, "
           "\"target_modules\": [\"q_proj\"]}";
}

/* RandLoRA, r = 4, nb = 3: lambda [r, nb], gamma [nb, m], shared A_all [r, 1, Dmin] and B_all [Dmax,
 * NB, r] wider than needed; m = min(O, I), M = max(O, I).  A_flat[q, j] = lambda[q / nb, q % nb]
 * A_all[q / nb, 0, j] gamma[q % nb, j], B_flat[row, q] = B_all[row, q / r, q % r] (the two
 * flattenings pair different (k, b)); Delta_Mm = B_flat @ A_flat, transposed when O < I; times
 * randlora_alpha / r = 10 / 4 */
static const char *xl_randlora(uint64_t O, uint64_t I, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t r = 4, nb = 3, m = O < I ? O : I, M = O < I ? I : O, dmin = m + 4, dmax = M + 8, NB = nb + 2;
    const tx_t *lam = xl_param(ad, XL_MOD "randlora_lambda", r, nb, g);
    const tx_t *gam = xl_param(ad, XL_MOD "randlora_gamma", nb, m, 1.0);
    const tx_t *A = xl_param3(ad, "base_model.randlora_A", r, 1, dmin, 1.0 / sqrt((double)(r * nb)));
    const tx_t *B = xl_param3(ad, "base_model.randlora_B", dmax, NB, r, 1.0);
    for (uint64_t row = 0; row < M; row++)
        for (uint64_t j = 0; j < m; j++)
            for (uint64_t q = 0; q < r * nb; q++) {
                const uint64_t e = O < I ? j * I + row : row * I + j;
                xl_term(D, mag, e, (long double)B->v[(row * NB + q / r) * r + q % r] * lam->v[q] *
                                       A->v[(q / nb) * dmin + j] * gam->v[(q % nb) * m + j] * 2.5L);
            }
    return "{\"peft_type\": \"RANDLORA\", \"r\": 4, \"randlora_alpha\": 10, \"save_projection\": true, "
           "\"target_modules\": [\"q_proj\"]}";
}

/* TinyLoRA, r = 4, u = 8, one module (its layer index 0, group 0, whatever P's draw):
 * Delta = B @ (sum_k v[k] P[k]) @ A */
static const char *xl_tinylora(uint64_t O, uint64_t I, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t r = 4, u = 8;
    const tx_t *B = xl_param(ad, XL_MOD "tinylora_B", O, r, g);
    const tx_t *A = xl_param(ad, XL_MOD "tinylora_A", r, I, 1.0 / sqrt((double)I));
    const tx_t *P = xl_param3(ad, XL_MOD "tinylora_P", u, r, r, 0.5);
    const tx_t *v = xl_param(ad, "base_model.tinylora_v.0", u, 0, 0.5);
    for (uint64_t o = 0; o < O; o++)
        for (uint64_t i = 0; i < I; i++)
            for (uint64_t j = 0; j < r; j++)
                for (uint64_t q = 0; q < r; q++)
                    for (uint64_t k = 0; k < u; k++)
                        xl_term(D, mag, o * I + i,
                                (long double)B->v[o * r + j] * v->v[k] * P->v[(k * r + j) * r + q] * A->v[q * I + i]);
    return "{\"peft_type\": \"TINYLORA\", \"r\": 4, \"u\": 8, \"projection_seed\": 42, \"weight_tying\": 0, "
           "\"save_projection\": true, \"target_modules\": [\"q_proj\"]}";
}

/* DeLoRA, r = 4: B diag(lambda / r / (max(|A[j, :]|, 1e-4) max(|B[:, j]|, 1e-4))) A, column i
 * times w_norm[i]; lambda [1] scales it: 64 g itself, not a random draw (the normalised terms
 * are ~1/64; one small draw of the single scale left F16 SUBNORMAL's residues below f16's
 * subnormals, rounded to 0) */
static const char *xl_delora(uint64_t O, uint64_t I, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t r = 4;
    tx_t *lam = xl_param(ad, XL_MOD "delora_lambda", 1, 0, 1.0);
    lam->v[0] = (double)(float)(64 * g);
    const tx_t *A = xl_param(ad, XL_MOD "delora_A", r, I, 1.0);
    const tx_t *B = xl_param(ad, XL_MOD "delora_B", O, r, 1.0);
    const tx_t *wn = xl_param(ad, XL_MOD "delora_w_norm", I, 0, 1.0);
    for (uint64_t q = 0; q < r; q++) {
        long double na = 0, nb = 0;
        for (uint64_t i = 0; i < I; i++)
            na += (long double)A->v[q * I + i] * A->v[q * I + i];
        for (uint64_t o = 0; o < O; o++)
            nb += (long double)B->v[o * r + q] * B->v[o * r + q];
        na = sqrtl(na) > 1e-4L ? sqrtl(na) : 1e-4L;
        nb = sqrtl(nb) > 1e-4L ? sqrtl(nb) : 1e-4L;
        const long double d = lam->v[0] / (long double)r / (na * nb);
        for (uint64_t o = 0; o < O; o++)
            for (uint64_t i = 0; i < I; i++)
                xl_term(D, mag, o * I + i, (long double)B->v[o * r + q] * d * A->v[q * I + i] * wn->v[i]);
    }
    return "{\"peft_type\": \"DELORA\", \"r\": 4, \"delora_lambda\": 15, \"target_modules\": [\"q_proj\"]}";
}

/* one VB-LoRA row: the top 2 of the logits z[N] (no ties drawn), softmax weights, the mix of
 * those bank rows (v), and the same with |bank| (m) */
static void xl_vbmix(const double *z, const double *bank, uint64_t N, uint64_t L, long double *v, long double *m)
{
    uint64_t i0 = 0, i1 = 1;
    for (uint64_t n = 0; n < N; n++)
        i0 = z[n] > z[i0] ? n : i0;
    i1 = i0 == 0 ? 1 : 0;
    for (uint64_t n = 0; n < N; n++)
        i1 = n != i0 && z[n] > z[i1] ? n : i1;
    const long double e1 = expl((long double)z[i1] - z[i0]), w0 = 1 / (1 + e1), w1 = e1 / (1 + e1);
    for (uint64_t l = 0; l < L; l++) {
        v[l] = w0 * bank[i0 * L + l] + w1 * bank[i1 * L + l];
        m[l] = w0 * fabsl((long double)bank[i0 * L + l]) + w1 * fabsl((long double)bank[i1 * L + l]);
    }
}

/* D += B A and mag += mB mA (B [O, r], A [r, I]); the four factors freed */
static void xl_product_free(uint64_t O, uint64_t I, uint64_t r, long double *B, long double *mB, long double *A,
                            long double *mA, long double *D, long double *mag)
{
    for (uint64_t o = 0; o < O; o++)
        for (uint64_t i = 0; i < I; i++)
            for (uint64_t a = 0; a < r; a++) {
                D[o * I + i] += B[o * r + a] * A[a * I + i];
                mag[o * I + i] += mB[o * r + a] * mA[a * I + i];
            }
    free(A);
    free(mA);
    free(B);
    free(mB);
}

/* VB-LoRA, r = 4, topk = 2, bank [8, 8]: A [r, I] and B [O, r] rows mixed from the bank by the
 * softmax of each logit row's top 2 (A: logits [r, I/L, N]; B: [O/L, r, N], row block q, column
 * a), Delta = B @ A; the bank (gain sqrt(g)) enters both factors */
static const char *xl_vblora(uint64_t O, uint64_t I, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t r = 4, N = 8, L = 8;
    const tx_t *V = xl_param(ad, "base_model.vblora_vector_bank", N, L, sqrt(g));
    const tx_t *za = xl_param3(ad, XL_MOD "vblora_logits_A", r, I / L, N, 1.0);
    const tx_t *zb = xl_param3(ad, XL_MOD "vblora_logits_B", O / L, r, N, 1.0);
    long double *A = malloc(r * I * sizeof *A), *mA = malloc(r * I * sizeof *mA);
    long double *B = malloc(O * r * sizeof *B), *mB = malloc(O * r * sizeof *mB), v[8], m[8];
    for (uint64_t a = 0; a < r; a++)
        for (uint64_t q = 0; q < I / L; q++) {
            xl_vbmix(za->v + (a * (I / L) + q) * N, V->v, N, L, A + a * I + q * L, mA + a * I + q * L);
        }
    for (uint64_t q = 0; q < O / L; q++)
        for (uint64_t a = 0; a < r; a++) {
            xl_vbmix(zb->v + (q * r + a) * N, V->v, N, L, v, m);
            for (uint64_t l = 0; l < L; l++) {
                B[(q * L + l) * r + a] = v[l];
                mB[(q * L + l) * r + a] = m[l];
            }
        }
    xl_product_free(O, I, r, B, mB, A, mA, D, mag);
    return "{\"peft_type\": \"VBLORA\", \"r\": 4, \"topk\": 2, \"num_vectors\": 8, \"vector_length\": 8, "
           "\"target_modules\": [\"q_proj\"]}";
}

/* one VB-LoRA row saved as PEFT's save_only_topk_weights saves it: the indices of the top 3 of
 * random logits (U8 [.., 3]) and the first 2 of their softmax weights (F32 [.., 2]); v, m: the
 * mix of those bank rows with the stored weights and the third 1 - w0 - w1 (what PEFT's load
 * rebuilds: logits log(w), -inf elsewhere), and the same with |bank| */
static void xl_vbtopk_row(tx_t *ix, tx_t *wt, uint64_t slot, const double *bank, uint64_t N, uint64_t L,
                          long double *v, long double *m)
{
    double z[8];
    int used[8] = {0}, idx[3];
    for (uint64_t n = 0; n < N; n++)
        z[n] = th_rand_normal(&g_rng);
    for (int t = 0; t < 3; t++) {
        int best = -1;
        for (uint64_t n = 0; n < N; n++)
            best = !used[n] && (best < 0 || z[n] > z[best]) ? (int)n : best;
        used[best] = 1;
        idx[t] = best;
    }
    long double e[3], sum = 0, w[3];
    for (int t = 0; t < 3; t++)
        sum += e[t] = expl((long double)z[idx[t]] - z[idx[0]]);
    for (int t = 0; t < 3; t++)
        ix->v[slot * 3 + (uint64_t)t] = idx[t];
    for (int t = 0; t < 2; t++)
        w[t] = wt->v[slot * 2 + (uint64_t)t] = (double)(float)(e[t] / sum);
    w[2] = 1 - w[0] - w[1];
    for (uint64_t l = 0; l < L; l++) {
        v[l] = m[l] = 0;
        for (int t = 0; t < 3; t++) {
            v[l] += w[t] * bank[(uint64_t)idx[t] * L + l];
            m[l] += w[t] * fabsl((long double)bank[(uint64_t)idx[t] * L + l]);
        }
    }
}

/* VB-LoRA, r = 4, topk = 3, bank [8, 8], saved with save_only_topk_weights: as xl_vblora, the rows
 * from the stored indices and weights */
static const char *xl_vbtopk(uint64_t O, uint64_t I, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t r = 4, N = 8, L = 8;
    const tx_t *V = xl_param(ad, "base_model.vblora_vector_bank", N, L, sqrt(g));
    tx_t *ia = xl_param3(ad, XL_MOD "vblora_logits_A_topk_indices", r, I / L, 3, 0);
    tx_t *wa = xl_param3(ad, XL_MOD "vblora_logits_A_topk_weights", r, I / L, 2, 0);
    tx_t *ib = xl_param3(ad, XL_MOD "vblora_logits_B_topk_indices", O / L, r, 3, 0);
    tx_t *wb = xl_param3(ad, XL_MOD "vblora_logits_B_topk_weights", O / L, r, 2, 0);
    snprintf(ia->dtype, sizeof ia->dtype, "U8");
    snprintf(ib->dtype, sizeof ib->dtype, "U8");
    long double *A = malloc(r * I * sizeof *A), *mA = malloc(r * I * sizeof *mA);
    long double *B = malloc(O * r * sizeof *B), *mB = malloc(O * r * sizeof *mB), v[8], m[8];
    for (uint64_t a = 0; a < r; a++)
        for (uint64_t q = 0; q < I / L; q++)
            xl_vbtopk_row(ia, wa, a * (I / L) + q, V->v, N, L, A + a * I + q * L, mA + a * I + q * L);
    for (uint64_t q = 0; q < O / L; q++)
        for (uint64_t a = 0; a < r; a++) {
            xl_vbtopk_row(ib, wb, q * r + a, V->v, N, L, v, m);
            for (uint64_t l = 0; l < L; l++) {
                B[(q * L + l) * r + a] = v[l];
                mB[(q * L + l) * r + a] = m[l];
            }
        }
    xl_product_free(O, I, r, B, mB, A, mA, D, mag);
    return "{\"peft_type\": \"VBLORA\", \"r\": 4, \"topk\": 3, \"num_vectors\": 8, \"vector_length\": 8, "
           "\"save_only_topk_weights\": true, \"target_modules\": [\"q_proj\"]}";
}

/* the adapter with gain g (its first tensor scales the delta linearly; GraLoRA: its grid part,
 * which is enough for OVERFLOW's refusal), its config, and the delta in long double from the
 * stored values (PEFT's formula) with mag = the sum of |terms| */
static const char *xl_adapter(const tx_type *tt, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t O = tt->rows, I = tt->cols, R = XL_R;
    for (uint64_t e = 0; e < O * I; e++)
        D[e] = mag[e] = 0;
    switch ((xl_type)tt->id) {
    case XL_GRALORA: return xl_gralora(O, I, g, ad, D, mag);
    case XL_RANDLORA:
    case XL_RANDLORA_T: return xl_randlora(O, I, g, ad, D, mag);
    case XL_TINYLORA: return xl_tinylora(O, I, g, ad, D, mag);
    case XL_DELORA: return xl_delora(O, I, g, ad, D, mag);
    case XL_VBLORA: return xl_vblora(O, I, g, ad, D, mag);
    case XL_VBLORA_TOPK: return xl_vbtopk(O, I, g, ad, D, mag);
    default: break;
    }
    if ((xl_type)tt->id != XL_ADALORA) {
        /* (lambda_b[:, None] * B[:O]) @ (lambda_d[:, None] * A[:, :I]), A and B shared (larger);
         * PVeRA: A and lambda_d have 2r rows (the mean, then the log-variance), the mean merged */
        const int pv = (xl_type)tt->id == XL_PVERA;
        const uint64_t RA = pv ? 2 * R : R;
        const tx_t *lb = xl_param(ad, pv ? XL_MOD "pvera_lambda_b" : XL_MOD "vera_lambda_b", O, 0, g);
        const tx_t *ld = xl_param(ad, pv ? XL_MOD "pvera_lambda_d" : XL_MOD "vera_lambda_d", RA, 0, 2.0);
        const tx_t *A = xl_param(ad, pv ? "base_model.pvera_A" : "base_model.vera_A", RA, I + 8, 1.0 / sqrt((double)I));
        const tx_t *B = xl_param(ad, pv ? "base_model.pvera_B" : "base_model.vera_B", O + 8, R, 1.0);
        for (uint64_t o = 0; o < O; o++)
            for (uint64_t i = 0; i < I; i++)
                for (uint64_t q = 0; q < R; q++) {
                    const long double x = (long double)lb->v[o] * B->v[o * R + q] * ld->v[q] * A->v[q * (I + 8) + i];
                    D[o * I + i] += x;
                    mag[o * I + i] += fabsl(x);
                }
        return pv ? "{\"peft_type\": \"PVERA\", \"r\": 4, \"target_modules\": [\"q_proj\"], \"save_projection\": true, "
                    "\"projection_prng_key\": 0, \"d_initial\": 0.1}"
                  : "{\"peft_type\": \"VERA\", \"r\": 4, \"target_modules\": [\"q_proj\"], \"save_projection\": true, "
                    "\"projection_prng_key\": 0, \"d_initial\": 0.1}";
    }
    /* AdaLoRA: B @ (A * E) * alpha / (init_r + 1e-5), the scale a double (PEFT: a Python float) */
    const tx_t *B = xl_param(ad, XL_MOD "lora_B", O, R, g);
    const tx_t *A = xl_param(ad, XL_MOD "lora_A", R, I, 1.0 / sqrt((double)I));
    const tx_t *E = xl_param(ad, XL_MOD "lora_E", R, 1, 1.0);
    const long double s = (long double)(6.0 / (3.0 + 1e-5));
    for (uint64_t o = 0; o < O; o++)
        for (uint64_t i = 0; i < I; i++)
            for (uint64_t q = 0; q < R; q++) {
                const long double x = (long double)B->v[o * R + q] * A->v[q * I + i] * E->v[q] * s;
                D[o * I + i] += x;
                mag[o * I + i] += fabsl(x);
            }
    return "{\"peft_type\": \"ADALORA\", \"r\": 8, \"init_r\": 3, \"target_r\": 2, \"lora_alpha\": 6, "
           "\"target_modules\": [\"q_proj\"], \"total_step\": 100}";
}

/* the delta's size per mode (linear in g); the factors above give a delta of order g */
static double xl_gain(const tx_type *tt, const char *bdt, tx_mode mode)
{
    (void)tt;
    const int f16 = !strcmp(bdt, "F16");
    const double tiny = !strcmp(bdt, "BF16") ? 1e-4 : f16 ? 1.5e-5 : 1e-9;
    double g = mode == TX_TINY ? tiny : mode == TX_HUGE ? 4.0 : mode == TX_SUBNORMAL ? (f16 ? 0x1p-11 : 0x1p-122)
               : mode == TX_OVERFLOW ? 1.0 : 0.25;
    if (mode == TX_SUBNORMAL && !f16)
        g *= 16; /* a normal delta whose residue against bf16 (2^-8 of it) is subnormal */
    return g;
}

/* noise 2^-60 of the terms' magnitude: the reference's products of four values in long double
 * (64-bit significands, a few roundings per term); the tool's f32 form with its bound serves
 * bf16/f16 outputs where it can place an element (TINY: under a tenth recomputed), its f64 form
 * with a bound f32 outputs */
static const tx_type XL_TYPES[] = {
    {"vera", XL_VERA, XL_O, XL_I, xl_adapter, xl_gain, -60, 1, 0, &g_rng, 1},
    {"adalora", XL_ADALORA, XL_O, XL_I, xl_adapter, xl_gain, -60, 1, 0, &g_rng, 1},
    {"pvera", XL_PVERA, XL_O, XL_I, xl_adapter, xl_gain, -60, 1, 0, &g_rng, 1},
    {"gralora", XL_GRALORA, XL_O, XL_I, xl_adapter, xl_gain, -60, 1, 0, &g_rng, 1},
    {"randlora", XL_RANDLORA, XL_O, XL_I, xl_adapter, xl_gain, -60, 1, 0, &g_rng, 1},
    {"randlora_t", XL_RANDLORA_T, XL_I, XL_O, xl_adapter, xl_gain, -60, 1, 0, &g_rng, 1},
    /* TinyLoRA: R = v P and R @ A summed in f64 (the a64 factor): (u + r + 2) 2^-53 < 2^-48 of the terms */
    {"tinylora", XL_TINYLORA, XL_O, XL_I, xl_adapter, xl_gain, -48, 1, 0, &g_rng, 1},
    /* DeLoRA: the f64 noise of the norms' square roots and quotient, 2^-48 of the terms */
    {"delora", XL_DELORA, XL_O, XL_I, xl_adapter, xl_gain, -48, 1, 0, &g_rng, 1},
    /* VB-LoRA: the f64 noise of the softmax's exp, 2^-48 of the terms */
    {"vblora", XL_VBLORA, XL_O, XL_I, xl_adapter, xl_gain, -48, 1, 0, &g_rng, 1},
    /* VB-LoRA saved top-k: 1 - w0 - w1 and the mix's products and sums in f64, 2^-50 of the terms */
    {"vblora_topk", XL_VBLORA_TOPK, XL_O, XL_I, xl_adapter, xl_gain, -50, 1, 0, &g_rng, 1},
};

Test(exact_lowrank, vera, .timeout = 120) { tx_run_type(&XL_TYPES[XL_VERA]); }
Test(exact_lowrank, adalora, .timeout = 120) { tx_run_type(&XL_TYPES[XL_ADALORA]); }
Test(exact_lowrank, pvera, .timeout = 120) { tx_run_type(&XL_TYPES[XL_PVERA]); }
Test(exact_lowrank, gralora, .timeout = 120) { tx_run_type(&XL_TYPES[XL_GRALORA]); }
Test(exact_lowrank, randlora, .timeout = 120) { tx_run_type(&XL_TYPES[XL_RANDLORA]); }
Test(exact_lowrank, randlora_t, .timeout = 120) { tx_run_type(&XL_TYPES[XL_RANDLORA_T]); }
Test(exact_lowrank, tinylora, .timeout = 120) { tx_run_type(&XL_TYPES[XL_TINYLORA]); }
/* delora.c's scaled factor A rounded to f32 (no a64), a second rounding, fails this */
Test(exact_lowrank, delora, .timeout = 120) { tx_run_type(&XL_TYPES[XL_DELORA]); }
/* each mixed row of A and B rounded to f32 (no a64/b64), a second rounding, fails this */
Test(exact_lowrank, vblora, .timeout = 120) { tx_run_type(&XL_TYPES[XL_VBLORA]); }
/* PEFT's save_only_topk_weights: the top-k indices and k-1 weights, the last completing them to 1 */
Test(exact_lowrank, vblora_topk, .timeout = 120) { tx_run_type(&XL_TYPES[XL_VBLORA_TOPK]); }
