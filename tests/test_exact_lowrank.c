/* SPDX-License-Identifier: MIT */
/* test_exact_lowrank.c : issue 10 for the low-rank types other than LoRA (test_exact.c): VeRA,
 * PVeRA and AdaLoRA, whose factors are prepared from several stored tensors before the certified
 * low-rank product.  Per type, an adapter with random stored values is merged by the binary onto
 * a base built from its delta, and every element is compared with PEFT's formula evaluated here
 * in long double from the stored values, rounded once (th_exact.c's runner):
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
#include <string.h>

static uint64_t g_rng = 0x10a7;

typedef enum { XL_VERA, XL_ADALORA, XL_PVERA } xl_type;

enum { XL_O = 24, XL_I = 32, XL_R = 4 };
#define XL_MOD "base_model.model.model.layers.0.self_attn.q_proj."

/* a stored f32 value: g * normal, exact in f32 */
static double xl_val(double g)
{
    return (double)(float)(g * th_rand_normal(&g_rng));
}

static tx_t *xl_param(tx_set *ad, const char *name, uint64_t d0, uint64_t d1, double g)
{
    tx_t *t = tx_add(ad, name, "F32", d1 ? 2 : 1, d0, d1);
    for (uint64_t e = 0; e < t->n; e++)
        t->v[e] = xl_val(g);
    return t;
}

/* the adapter with gain g (its first tensor scales the delta linearly), its config, and the
 * delta in long double from the stored values (PEFT's formula) with mag = the sum of |terms| */
static const char *xl_adapter(const tx_type *tt, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t O = XL_O, I = XL_I, R = XL_R;
    for (uint64_t e = 0; e < O * I; e++)
        D[e] = mag[e] = 0;
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
};

Test(exact_lowrank, vera, .timeout = 120) { tx_run_type(&XL_TYPES[XL_VERA]); }
Test(exact_lowrank, adalora, .timeout = 120) { tx_run_type(&XL_TYPES[XL_ADALORA]); }
Test(exact_lowrank, pvera, .timeout = 120) { tx_run_type(&XL_TYPES[XL_PVERA]); }
