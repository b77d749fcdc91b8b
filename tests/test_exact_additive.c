/* SPDX-License-Identifier: MIT */
/* test_exact_additive.c : issue 10 for the additive method types on the f64 tile path
 * (apply_tile64): FourierFT, WaveFT, C3A, SHiRA (LoHa and LoKr: test_exact_lyco.c).  Per type, an adapter with random
 * stored values is merged by the binary onto a base built from its delta, and every element is
 * compared with PEFT's formula evaluated here in long double from the stored values (independent
 * of the tool: its own loops, its own cosines, no FFT), rounded once:
 *  - CANCEL: W = -(the delta rounded to bf16), so the result is the small residue (an f32
 *    evaluation of the delta gets some of them wrong, asserted);
 *  - TINY: the delta ~1e-9 of W (the result within an ulp of W);  HUGE: W ~1e-6 of the delta;
 *  - SUBNORMAL: CANCEL at a scale whose results are subnormal in the output dtype;
 *  - an f16 result beyond 65504 refused naming the tensor, nothing written.
 * bf16, f16 and f32 bases (output = base dtype).  The reference carries a bound on f64 evaluation
 * noise (zero for C3A, SHiRA and WaveFT without the transform, whose f64 evaluation is exact here);
 * elements it leaves ambiguous may take either neighbour (counted, a small fraction).  The
 * same bytes with --threads 1/2, --tile-elems and --kernels ref; --json says exact. */
#include "th.h"
#include "th_exact.h"

#include "lm_kernels.h"
#include "torch_rng.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- cases on disk ------------------------------------------------------------------------- */
static uint64_t g_rng = 0xadd1;

typedef enum { XA_FOURIERFT, XA_WAVEFT, XA_C3A, XA_SHIRA } xa_type;

enum { XA_O = 24, XA_I = 32, XA_B = 8, XA_NF = 96 };
#define XA_MOD "base_model.model.model.layers.0.self_attn.q_proj."

static tx_t *xa_param(tx_set *ad, const char *part, int nd, uint64_t d0, uint64_t d1, double g)
{
    char nm[160];
    snprintf(nm, sizeof nm, XA_MOD "%s", part);
    tx_t *t = tx_add(ad, nm, "F32", nd, d0, d1);
    for (uint64_t e = 0; e < t->n; e++)
        t->v[e] = tx_f32_normal(&g_rng, g);
    return t;
}

/* the adapter of type ty with gain g (the delta is linear in g), its config, and the delta
 * (long double, PEFT's formula from the stored values) with mag = the same sum of absolute terms */
static const char *xa_adapter(const tx_type *tt, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t O = XA_O, I = XA_I;
    const xa_type ty = (xa_type)tt->id;
    for (uint64_t e = 0; e < O * I; e++)
        D[e] = mag[e] = 0;
    switch (ty) {
    case XA_FOURIERFT:
    case XA_WAVEFT: { /* spectrum at randperm(O * I, seed)[:n]: FourierFT Re(ifft2(S)) * scaling;
                         WaveFT without the transform (use_idwt false): S * scaling */
        tx_t *s = xa_param(ad, ty == XA_FOURIERFT ? "fourierft_spectrum" : "waveft_spectrum", 1, XA_NF, 0, g);
        uint64_t pos[XA_NF];
        cr_assert_eq(lm_randperm_prefix(O * I, 777, XA_NF, pos), 0);
        const long double sc = ty == XA_FOURIERFT ? 150.0L / (O * I) : 25.0L;
        for (uint64_t t = 0; t < XA_NF; t++) {
            const uint64_t rr = pos[t] / I, cc = pos[t] % I;
            if (ty == XA_WAVEFT) {
                D[rr * I + cc] += s->v[t] * sc;
                mag[rr * I + cc] += fabsl(s->v[t] * sc);
                continue;
            }
            for (uint64_t o = 0; o < O; o++)
                for (uint64_t i = 0; i < I; i++) {
                    /* the phase reduced exactly in integers before the cosine */
                    const uint64_t ph = ((o * rr % O) * I + (i * cc % I) * O) % (O * I);
                    const long double x = s->v[t] * sc * cosl(2 * 3.14159265358979323846264338327950288L * ph / (O * I));
                    D[o * I + i] += x;
                    mag[o * I + i] += fabsl(s->v[t] * sc);
                }
        }
        return ty == XA_FOURIERFT
                   ? "{\"peft_type\": \"FOURIERFT\", \"target_modules\": [\"q_proj\"], \"n_frequency\": 96, "
                     "\"scaling\": 150.0, \"random_loc_seed\": 777}"
                   : "{\"peft_type\": \"WAVEFT\", \"target_modules\": [\"q_proj\"], \"n_frequency\": 96, "
                     "\"scaling\": 25.0, \"random_loc_seed\": 777, \"use_idwt\": false}";
    }
    case XA_C3A: { /* W[p b + u, q b + v] += kernel[p, q, (v - u) mod b] / in */
        char nm[160];
        snprintf(nm, sizeof nm, XA_MOD "c3a_kernel");
        tx_t *k = tx_add(ad, nm, "F32", 2, O / XA_B, (I / XA_B) * XA_B); /* written 2-D, reshaped below */
        for (uint64_t e = 0; e < k->n; e++)
            k->v[e] = tx_f32_normal(&g_rng, g);
        k->nd = 3;
        k->shape[1] = I / XA_B;
        k->shape[2] = XA_B;
        for (uint64_t o = 0; o < O; o++)
            for (uint64_t i = 0; i < I; i++) {
                const uint64_t p = o / XA_B, u = o % XA_B, q = i / XA_B, v = i % XA_B;
                D[o * I + i] = (long double)k->v[(p * (I / XA_B) + q) * XA_B + (v + XA_B - u) % XA_B] / I;
                mag[o * I + i] = fabsl(D[o * I + i]);
            }
        return "{\"peft_type\": \"C3A\", \"target_modules\": [\"q_proj\"], \"block_size\": 8}";
    }
    case XA_SHIRA: { /* W[idx[0, t], idx[1, t]] += w[t], repeated entries included */
        const uint64_t nnz = 300;
        tx_t *w = xa_param(ad, "shira_weight", 1, nnz, 0, g);
        char nm[160];
        snprintf(nm, sizeof nm, XA_MOD "shira_indices");
        tx_t *ix = tx_add(ad, nm, "I64", 2, 2, nnz);
        for (uint64_t t = 0; t < nnz; t++) {
            ix->v[t] = (double)(th_rand_u64(&g_rng) % O);
            ix->v[nnz + t] = (double)(th_rand_u64(&g_rng) % I);
            const uint64_t e = (uint64_t)ix->v[t] * I + (uint64_t)ix->v[nnz + t];
            D[e] += w->v[t];
            mag[e] += fabsl((long double)w->v[t]);
        }
        return "{\"peft_type\": \"SHIRA\", \"target_modules\": [\"q_proj\"]}";
    }
    }
    return NULL;
}

/* the delta's size per mode (each type's delta is linear in g) */
static double xa_gain(const tx_type *tt, const char *bdt, tx_mode mode)
{
    const xa_type ty = (xa_type)tt->id;
    const int f16 = !strcmp(bdt, "F16");
    /* TINY: under an ulp of W ~0.05 (bf16 2^-12, f16 2^-15, f32 2^-28) */
    const double tiny = !strcmp(bdt, "BF16") ? 1e-4 : f16 ? 1.5e-5 : 1e-9;
    double g = mode == TX_TINY ? tiny : mode == TX_HUGE ? 4.0 : mode == TX_SUBNORMAL ? (f16 ? 0x1p-14 : 0x1p-122)
               : mode == TX_OVERFLOW ? 1.0 : 0.25;
    if (ty == XA_FOURIERFT && mode != TX_SUBNORMAL && mode != TX_TINY)
        g *= 4; /* 150 / (O I) times a sum of 96 cosines: keep the delta of order g */
    if (ty == XA_C3A)
        g *= 32; /* kernel / in */
    if (mode == TX_SUBNORMAL && !f16 && ty != XA_WAVEFT) /* WaveFT: scaling 25 does it */
        g *= 16; /* a normal delta whose residue against bf16 (2^-8 of it) is subnormal */
    return g;
}

/* f64 noise: a few roundings per term of the delta (FourierFT: FFTW's twiddles and butterflies,
 * log2(32) levels).  C3A (k * (1 / 32)), SHiRA (sums of a few f32 values) and WaveFT without the
 * transform (s * 25) are exact in f64, W + delta too: no noise, every element the nearest value
 * (ties included).  None has an f32 form: every element is recomputed.  C3A's delta (kernel / 32)
 * is exact in f32. */
static const tx_type XA_TYPES[] = {
    {"fourierft", XA_FOURIERFT, XA_O, XA_I, xa_adapter, xa_gain, -48, 0, 0, &g_rng, 0},
    {"waveft", XA_WAVEFT, XA_O, XA_I, xa_adapter, xa_gain, 0, 0, 0, &g_rng, 0},
    {"c3a", XA_C3A, XA_O, XA_I, xa_adapter, xa_gain, 0, 0, 1, &g_rng, 0},
    {"shira", XA_SHIRA, XA_O, XA_I, xa_adapter, xa_gain, 0, 0, 0, &g_rng, 0},
};

Test(exact_additive, fourierft, .timeout = 120) { tx_run_type(&XA_TYPES[XA_FOURIERFT]); }
Test(exact_additive, waveft, .timeout = 120) { tx_run_type(&XA_TYPES[XA_WAVEFT]); }
Test(exact_additive, c3a, .timeout = 120) { tx_run_type(&XA_TYPES[XA_C3A]); }
Test(exact_additive, shira, .timeout = 120) { tx_run_type(&XA_TYPES[XA_SHIRA]); }
