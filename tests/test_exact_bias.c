/* SPDX-License-Identifier: MIT */
/* test_exact_bias.c : issue 10 for the ops that add a tensor as it is stored (a bias delta:
 * BEFT's beft_bias, lora_bias; a full delta): every element the exact sum rounded once.  The f32
 * sum rounds twice: each case puts the exact sum W + w x a tiny step off a rounding midpoint of
 * the output dtype, so that fl32(W + w x) lands on the midpoint and round-to-even then picks the
 * wrong neighbour for about half of the elements (asserted: the test could fail).  The reference
 * is computed here in long double (W + w x is exact there), rounded once by th_round_to. */
#include "th.h"
#include "th_exact.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { XB_O = 4096, XB_I = 8 };
static uint64_t g_rng = 0xb1a5;

static uint64_t xb_next(void)
{
    return th_rand_u64(&g_rng);
}

/* one BEFT case: base q_proj (weight and bias, dtype), adapter beft_bias (f32), merged with
 * --weight w (NULL: 1); half = log2 of the output's half ulp at [1, 2) (bf16: -8, f16: -11, f32:
 * -24) */
static void xb_run(const char *dtype, int half, const char *w)
{
    tx_set base = {0}, ad = {0};
    tx_t *wt = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", dtype, 2, XB_O, XB_I);
    for (uint64_t e = 0; e < wt->n; e++)
        wt->v[e] = th_round_to((double)(xb_next() % 1000) / 997.0 - 0.5, dtype);
    tx_t *b = tx_add(&base, "model.layers.0.self_attn.q_proj.bias", dtype, 1, XB_O, 0);
    tx_t *x = tx_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.beft_bias", "F32", 2, 1, XB_O);
    const double wd = w != NULL ? atof(w) : 1.0;
    long double *ref = calloc(XB_O, sizeof *ref), *bnd = calloc(XB_O, sizeof *bnd);
    float *y32 = calloc(XB_O, sizeof *y32);
    cr_assert(ref && bnd && y32);
    for (uint64_t e = 0; e < XB_O; e++) {
        const int ex = (int)(xb_next() % 9) - 4, k = 1 + (int)(xb_next() % 15);
        const double sgn = xb_next() & 1 ? 1.0 : -1.0;
        /* W in [1, 2) 2^ex with the output's precision; w x = half ulp + k 2^(half - 22) ulps of
         * it (up or down): exact in f32 (23 bits), x = that / w exact enough for w = 1 or 0.5 */
        const int mbits = half == -8 ? 7 : half == -11 ? 10 : 23;
        const double m = 1.0 + (double)(xb_next() % (1u << mbits)) / (double)(1u << mbits);
        b->v[e] = sgn * ldexp(m, ex);
        const double d = ldexp(1.0, half + ex) + (xb_next() & 1 ? 1 : -1) * ldexp((double)k, half - 22 + ex);
        x->v[e] = (double)(float)(sgn * d / wd);
        ref[e] = (long double)b->v[e] + (long double)wd * (long double)x->v[e];
        y32[e] = (float)b->v[e] + (float)((float)wd * (float)x->v[e]);
    }
    tx_case c;
    tx_case_write(&c, &base, &ad, "{\"peft_type\": \"BEFT\", \"target_modules\": [\"q_proj\"]}");
    const char *opts[] = {"--scale", w, NULL};
    th_run_result r = tx_merge(&c, c.out, w != NULL ? opts : NULL);
    cr_assert_eq(r.status, 0, "%s BEFT merge failed: %s", dtype, r.err);
    uint64_t recomputed = 0;
    char what[64];
    snprintf(what, sizeof what, "BEFT %s scale %s", dtype, w != NULL ? w : "1");
    const uint64_t wrong = tx_verify(&c, &r, "model.layers.0.self_attn.q_proj.bias", XB_O, ref, bnd, y32, dtype,
                                     what, &recomputed);
    cr_assert_gt(wrong, XB_O / 4, "%s: only %llu elements an f32 sum gets wrong (the case is too easy)", what,
                 (unsigned long long)wrong);
    th_run_free(&r);
    /* and --exactness-off, the f32 sum, gets them wrong: the check above can fail */
    const char *off[] = {"--exactness-off", w != NULL ? "--scale" : NULL, w, NULL};
    char out2[700];
    snprintf(out2, sizeof out2, "%s/off.safetensors", c.dir);
    r = tx_merge(&c, out2, off);
    cr_assert_eq(r.status, 0, "%s: %s", what, r.err);
    double *v = tx_out_values(out2, "model.layers.0.self_attn.q_proj.bias", XB_O);
    uint64_t differ = 0;
    for (uint64_t e = 0; e < XB_O; e++)
        differ += v[e] != th_round_to((double)ref[e], dtype);
    cr_assert_gt(differ, XB_O / 4, "%s: --exactness-off got %llu wrong", what, (unsigned long long)differ);
    free(v);
    th_run_free(&r);
    free(ref);
    free(bnd);
    free(y32);
    tx_case_free(&c, &base, &ad);
}

Test(exact_bias, beft_bf16, .timeout = 60) { xb_run("BF16", -8, NULL); }
Test(exact_bias, beft_f16, .timeout = 60) { xb_run("F16", -11, NULL); }
Test(exact_bias, beft_bf16_weighted, .timeout = 60) { xb_run("BF16", -8, "0.5"); }
