/* SPDX-License-Identifier: MIT */
/* test_exact_lyco.c : issue 10 for LoHa and LoKr (certified: an f32 pass with a rigorous bound per
 * element, the elements it leaves uncertain recomputed in f64; f32 outputs computed in f64).  Per
 * form (LoHa; LoKr with w2 = w2_a @ w2_b, with both factors whole, with w1 = w1_a @ w1_b), an
 * adapter with random stored values is merged by the binary onto a base built from its delta, and
 * every element is compared with PEFT's formula evaluated here in long double from the stored
 * values, rounded once:
 *  - CANCEL: W = -(the delta rounded to bf16), so the result is the small residue (an f32
 *    evaluation gets some of them wrong, asserted for f16/f32);
 *  - TINY: the delta ~1e-9 of W;  HUGE: W ~1e-6 of the delta;
 *  - SUBNORMAL: CANCEL at a scale whose results are subnormal in the output dtype;
 *  - an f16 result beyond 65504 refused naming the tensor, nothing written.
 * bf16, f16 and f32 bases (output = base dtype).  --json says exact; for bf16/f16 outputs of TINY
 * only a few elements are recomputed (the f32 form is used); the same bytes with --threads 1/2,
 * --tile-elems and --kernels ref.  GLoRA and Super-Tuning (computed in f64): near-ties that their f32
 * path's second rounding gets wrong. */
#include "lm_kernels.h"
#include "th.h"
#include "th_exact.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t g_rng = 0x10c0;

typedef enum { XL_LOHA, XL_LOKR, XL_LOKR_WHOLE, XL_LOKR_SPLIT1 } xl_type;

enum { XL_O = 24, XL_I = 40, XL_R = 4 };
#define XL_MOD "base_model.model.model.layers.0.self_attn.q_proj."

static tx_t *xl_param(tx_set *ad, const char *part, uint64_t d0, uint64_t d1, double g)
{
    char nm[160];
    snprintf(nm, sizeof nm, XL_MOD "%s", part);
    tx_t *t = tx_add(ad, nm, "F32", 2, d0, d1);
    for (uint64_t e = 0; e < t->n; e++)
        t->v[e] = tx_f32_normal(&g_rng, g);
    return t;
}

/* the adapter with gain g on its first factor, its config, the delta (long double, PEFT's formula
 * from the stored values; scale alpha / r = 2) and mag = the same with absolute values */
static const char *xl_adapter(const tx_type *tt, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t O = XL_O, I = XL_I, R = XL_R;
    const xl_type ty = (xl_type)tt->id;
    if (ty == XL_LOHA) { /* (w1a @ w1b) * (w2a @ w2b) * alpha / r */
        tx_t *a1 = xl_param(ad, "hada_w1_a", O, R, g), *b1 = xl_param(ad, "hada_w1_b", R, I, 0.5);
        tx_t *a2 = xl_param(ad, "hada_w2_a", O, R, 0.5), *b2 = xl_param(ad, "hada_w2_b", R, I, 0.5);
        for (uint64_t o = 0; o < O; o++)
            for (uint64_t i = 0; i < I; i++) {
                long double x = 0, y = 0, ax = 0, ay = 0;
                for (uint64_t k = 0; k < R; k++) {
                    x += (long double)a1->v[o * R + k] * b1->v[k * I + i];
                    y += (long double)a2->v[o * R + k] * b2->v[k * I + i];
                    ax += fabsl((long double)a1->v[o * R + k] * b1->v[k * I + i]);
                    ay += fabsl((long double)a2->v[o * R + k] * b2->v[k * I + i]);
                }
                D[o * I + i] = x * y * 2;
                mag[o * I + i] = ax * ay * 2;
            }
        return "{\"peft_type\": \"LOHA\", \"target_modules\": [\"q_proj\"], \"r\": 4, \"alpha\": 8}";
    }
    /* kron(w1, w2) * alpha / r: w1 [a, c] = [4, 5], w2 [kb, kd] = [6, 8] */
    const uint64_t a = 4, c = 5, kb = O / a, kd = I / c;
    long double w1[4 * 5], m1[4 * 5], *w2 = malloc(kb * kd * sizeof *w2), *m2 = malloc(kb * kd * sizeof *m2);
    if (ty == XL_LOKR_SPLIT1) {
        tx_t *xa = xl_param(ad, "lokr_w1_a", a, R, g), *xb = xl_param(ad, "lokr_w1_b", R, c, 0.5);
        for (uint64_t p = 0; p < a * c; p++) {
            w1[p] = m1[p] = 0;
            for (uint64_t k = 0; k < R; k++) {
                w1[p] += (long double)xa->v[(p / c) * R + k] * xb->v[k * c + p % c];
                m1[p] += fabsl((long double)xa->v[(p / c) * R + k] * xb->v[k * c + p % c]);
            }
        }
    } else {
        tx_t *x = xl_param(ad, "lokr_w1", a, c, g);
        for (uint64_t p = 0; p < a * c; p++)
            m1[p] = fabsl(w1[p] = x->v[p]);
    }
    if (ty == XL_LOKR) {
        tx_t *wa = xl_param(ad, "lokr_w2_a", kb, R, 0.5), *wb = xl_param(ad, "lokr_w2_b", R, kd, 0.5);
        for (uint64_t q = 0; q < kb * kd; q++) {
            w2[q] = m2[q] = 0;
            for (uint64_t k = 0; k < R; k++) {
                w2[q] += (long double)wa->v[(q / kd) * R + k] * wb->v[k * kd + q % kd];
                m2[q] += fabsl((long double)wa->v[(q / kd) * R + k] * wb->v[k * kd + q % kd]);
            }
        }
    } else {
        tx_t *x = xl_param(ad, "lokr_w2", kb, kd, 0.5);
        for (uint64_t q = 0; q < kb * kd; q++)
            m2[q] = fabsl(w2[q] = x->v[q]);
    }
    for (uint64_t p = 0; p < a; p++)
        for (uint64_t q = 0; q < kb; q++)
            for (uint64_t u = 0; u < c; u++)
                for (uint64_t v = 0; v < kd; v++) {
                    const uint64_t e = (p * kb + q) * I + u * kd + v;
                    D[e] = w1[p * c + u] * w2[q * kd + v] * 2;
                    mag[e] = m1[p * c + u] * m2[q * kd + v] * 2;
                }
    free(w2);
    free(m2);
    return "{\"peft_type\": \"LOKR\", \"target_modules\": [\"q_proj\"], \"r\": 4, \"alpha\": 8}";
}

static double xl_gain(const tx_type *tt, const char *bdt, tx_mode mode)
{
    (void)tt;
    const int f16 = !strcmp(bdt, "F16");
    /* TINY: the delta far under an ulp of W ~0.05 (bf16 2^-12, f16 2^-15, f32 2^-28) */
    const double tiny = !strcmp(bdt, "BF16") ? 1e-4 : f16 ? 1.5e-5 : 1e-9;
    return mode == TX_TINY ? tiny : mode == TX_HUGE ? 4.0 : mode == TX_SUBNORMAL ? (f16 ? 0x1p-11 : 0x1p-118) : 0.5;
}

/* f64 noise: a few roundings per term of the delta (its sums of r products, the products of the
 * two factors, the scale); bf16/f16 outputs take the f32 form with its bound */
static const tx_type XL_TYPES[] = {
    {"loha", XL_LOHA, XL_O, XL_I, xl_adapter, xl_gain, -49, 1, 0, &g_rng, 0},
    {"lokr", XL_LOKR, XL_O, XL_I, xl_adapter, xl_gain, -49, 1, 0, &g_rng, 0},
    {"lokr (whole factors)", XL_LOKR_WHOLE, XL_O, XL_I, xl_adapter, xl_gain, -49, 1, 0, &g_rng, 0},
    {"lokr (w1_a @ w1_b)", XL_LOKR_SPLIT1, XL_O, XL_I, xl_adapter, xl_gain, -49, 1, 0, &g_rng, 0},
};

/* ---- GLoRA and Super-Tuning: computed in f64, rounded once ---------------------------------
 * The trap is double rounding: their f32 path (GLoRA's f64 value rounded to f32; Super-Tuning's
 * f32 sum) lands on a bf16/f16 rounding midpoint m where the f64 value is m + a hair, and the
 * second rounding breaks the tie by evenness.  Each element's value is built as such a near-tie:
 * W random, m the midpoint above |1.3 W|, GLoRA: A = fl32(m / W - 1) (full buffers, B = 0), so W +
 * W A is within ~2^-25 |m| of m; Super-Tuning: m - W one f32 ulp off, at every position. */
static double xl_midpoint(double x, const char *dt)
{
    int e;
    frexp(x, &e); /* x in [2^(e-1), 2^e): the dtype's quantum there is 2^(e-1-p) */
    const double q = ldexp(1.0, e - 1 - (!strcmp(dt, "BF16") ? 7 : 10));
    return (floor(x / q) + 0.5) * q;
}

static void xl_run_double(int supertuning, const char *bdt)
{
    const uint64_t O = XL_O, I = XL_I, n = O * I;
    long double *ref = malloc(n * sizeof *ref), *bnd = malloc(n * sizeof *bnd);
    float *y32 = malloc(n * sizeof *y32);
    tx_set base = {0}, ad = {0};
    tx_t *w = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", bdt, 2, O, I);
    tx_t *other = tx_add(&base, "model.layers.0.self_attn.k_proj.weight", bdt, 2, 4, I);
    for (uint64_t e = 0; e < other->n; e++)
        other->v[e] = th_round_to(0.01 * (double)e, bdt);
    tx_t *a, *b;
    const char *cfg;
    if (supertuning) {
        a = tx_add(&ad, XL_MOD "supertuning_values", "F32", 1, n, 0);
        b = tx_add(&ad, XL_MOD "supertuning_indices", "I32", 1, n, 0);
        cfg = "{\"peft_type\": \"SUPERTUNING\", \"target_modules\": [\"q_proj\"], \"r\": null}";
    } else {
        a = tx_add(&ad, XL_MOD "glora_A.zeros", "F32", 2, O, I);
        b = tx_add(&ad, XL_MOD "glora_B.zeros", "F32", 2, O, I);
        cfg = "{\"peft_type\": \"GLORA\", \"target_modules\": [\"q_proj\"], \"r\": 4, \"config_A_B\": \"none\", "
              "\"config_C\": \"none\", \"config_D_E\": \"constant\"}";
    }
    for (uint64_t e = 0; e < n; e++) {
        const double x = th_round_to((0.5 + 0.4 * th_rand_normal(&g_rng)) * (e % 2 ? -1 : 1), bdt);
        w->v[e] = x == 0 ? th_round_to(0.25, bdt) : x;
        const double m = copysign(xl_midpoint(fabs(1.3 * w->v[e]), bdt), w->v[e]);
        if (supertuning) {
            b->v[e] = (double)e; /* every position once */
            /* m - W is exact in f32; one f32 ulp of it off (< 2^-24 |m|: |m - W| < |m| / 2), so
             * that W + value is a hair off m and its f32 sum is m */
            a->v[e] = (double)nextafterf((float)(m - w->v[e]), th_rand_normal(&g_rng) > 0 ? INFINITY : -INFINITY);
            ref[e] = (long double)w->v[e] + a->v[e];
            y32[e] = (float)w->v[e] + (float)a->v[e];
        } else {
            a->v[e] = (double)(float)(m / w->v[e] - 1.0);
            b->v[e] = 0;
            ref[e] = (long double)w->v[e] + (long double)w->v[e] * a->v[e];
            y32[e] = (float)ref[e]; /* GLoRA's f32 path: the f64 value rounded to f32 */
        }
        bnd[e] = ldexpl(fabsl(ref[e]), -51);
    }
    tx_case c;
    tx_case_write(&c, &base, &ad, cfg);
    th_run_result res = tx_merge(&c, c.out, NULL);
    char what[96];
    snprintf(what, sizeof what, "%s %s near-ties", supertuning ? "supertuning" : "glora", bdt);
    cr_assert_eq(res.status, 0, "%s: exit %d: %s", what, res.status, res.err);
    uint64_t rec = 0;
    const uint64_t wrong = tx_verify(&c, &res, w->name, n, ref, bnd, y32, bdt, what, &rec);
    cr_assert_eq(rec, n, "%s: --json says %llu recomputed, the f64 path computes all %llu", what,
                 (unsigned long long)rec, (unsigned long long)n);
    cr_assert_gt(wrong, n / 8, "%s: the f32 path then a second rounding gets only %llu wrong: not adversarial", what,
                 (unsigned long long)wrong);
    tx_same_bytes(&c, what);
    th_run_free(&res);
    free(ref);
    free(bnd);
    free(y32);
    tx_case_free(&c, &base, &ad);
}

Test(exact_lyco, glora_supertuning_double_rounding, .timeout = 60)
{
    for (int st = 0; st < 2; st++) {
        xl_run_double(st, "BF16");
        xl_run_double(st, "F16");
    }
}

Test(exact_lyco, loha, .timeout = 120) { tx_run_type(&XL_TYPES[XL_LOHA]); }
Test(exact_lyco, lokr, .timeout = 120) { tx_run_type(&XL_TYPES[XL_LOKR]); }
Test(exact_lyco, lokr_whole, .timeout = 120) { tx_run_type(&XL_TYPES[XL_LOKR_WHOLE]); }
Test(exact_lyco, lokr_split_w1, .timeout = 120) { tx_run_type(&XL_TYPES[XL_LOKR_SPLIT1]); }

/* ---- LyCORIS's dora_scale on LoHa and LoKr modules: computed in f64, rounded once ------------
 * lycoris/modules/loha.py, lokr.py (get_merged_weight, apply_weight_decompose): V = W + dW (dW
 * with alpha / r, not the multiplier), f = dora_scale / (||V|| + 2^-23) per output row (dora_scale
 * [out, 1], wd_on_out) or per input column ([1, in]), W' = V f.  W cancels the delta to a residue
 * (W = -(dW rounded to bf16)), so V is small and f large: an f32 evaluation of V misses most
 * elements, the f64 one (V exact but for f64 noise, the norm and the factor in f64) none.  The
 * reference carries the f64 noise through the norm (the row's or column's ||E|| / ||V||). */
#define XD_K "lora_unet_blk_"

static tx_t *xd_param(tx_set *ad, const char *part, uint64_t d0, uint64_t d1, double g)
{
    char nm[160];
    snprintf(nm, sizeof nm, XD_K "%s", part);
    tx_t *t = tx_add(ad, nm, "F32", 2, d0, d1);
    for (uint64_t e = 0; e < t->n; e++)
        t->v[e] = tx_f32_normal(&g_rng, g);
    return t;
}

/* loha: LoHa r 4, alpha 8 (s 2), dora_scale per output row; else LoKr with whole factors w1 [4, 5],
 * w2 [6, 8] (s 1: LyCORIS forces alpha = r), per input column */
static void xd_run(int loha, const char *bdt)
{
    const uint64_t O = XL_O, I = XL_I, n = O * I;
    long double *D = malloc(n * sizeof *D), *mag = malloc(n * sizeof *mag), *ref = malloc(n * sizeof *ref),
                *bnd = malloc(n * sizeof *bnd);
    float *y32 = malloc(n * sizeof *y32);
    tx_set base = {0}, ad = {0};
    tx_t *w = tx_add(&base, loha ? "blk.loha.weight" : "blk.lokr.weight", bdt, 2, O, I);
    if (loha) {
        tx_t *a1 = xd_param(&ad, "loha.hada_w1_a", O, 4, 0.5), *b1 = xd_param(&ad, "loha.hada_w1_b", 4, I, 0.5);
        tx_t *a2 = xd_param(&ad, "loha.hada_w2_a", O, 4, 0.5), *b2 = xd_param(&ad, "loha.hada_w2_b", 4, I, 0.5);
        for (uint64_t o = 0; o < O; o++)
            for (uint64_t i = 0; i < I; i++) {
                long double x = 0, y = 0, ax = 0, ay = 0;
                for (uint64_t k = 0; k < 4; k++) {
                    x += (long double)a1->v[o * 4 + k] * b1->v[k * I + i];
                    y += (long double)a2->v[o * 4 + k] * b2->v[k * I + i];
                    ax += fabsl((long double)a1->v[o * 4 + k] * b1->v[k * I + i]);
                    ay += fabsl((long double)a2->v[o * 4 + k] * b2->v[k * I + i]);
                }
                D[o * I + i] = x * y * 2;
                mag[o * I + i] = ax * ay * 2;
            }
    } else {
        tx_t *w1 = xd_param(&ad, "lokr.lokr_w1", 4, 5, 0.5), *w2 = xd_param(&ad, "lokr.lokr_w2", 6, 8, 0.5);
        for (uint64_t p = 0; p < 4; p++)
            for (uint64_t q = 0; q < 6; q++)
                for (uint64_t u = 0; u < 5; u++)
                    for (uint64_t v = 0; v < 8; v++) {
                        const uint64_t e = (p * 6 + q) * I + u * 8 + v;
                        D[e] = (long double)w1->v[p * 5 + u] * w2->v[q * 8 + v];
                        mag[e] = fabsl(D[e]);
                    }
    }
    tx_t *al = tx_add(&ad, loha ? XD_K "loha.alpha" : XD_K "lokr.alpha", "F32", 1, 1, 0);
    al->nd = 0;
    al->v[0] = loha ? 8 : 1;
    const uint64_t ng = loha ? O : I; /* the norms: per row, or per column */
    tx_t *ds = tx_add(&ad, loha ? XD_K "loha.dora_scale" : XD_K "lokr.dora_scale", "F32", 2, loha ? O : 1, loha ? 1 : I);
    for (uint64_t g = 0; g < ng; g++)
        ds->v[g] = (double)(float)(0.5 + 0.25 * th_rand_normal(&g_rng));
    float *v32 = malloc(n * sizeof *v32);
    for (uint64_t e = 0; e < n; e++) {
        w->v[e] = th_round_to(-th_round_to((double)D[e], "BF16"), bdt);
        ref[e] = w->v[e] + D[e]; /* V */
        v32[e] = (float)w->v[e] + (float)D[e];
    }
    for (uint64_t g = 0; g < ng; g++) {
        long double ss = 0, e2 = 0;
        float ss32 = 0;
        for (uint64_t k = 0; k < (loha ? I : O); k++) {
            const uint64_t e = loha ? g * I + k : k * I + g;
            ss += ref[e] * ref[e];
            e2 += ldexpl(mag[e], -49) * ldexpl(mag[e], -49);
            ss32 += v32[e] * v32[e];
        }
        const long double f = ds->v[g] / (sqrtl(ss) + 0x1p-23L), relf = sqrtl(e2) / sqrtl(ss) + 0x1p-45L;
        const float f32 = (float)ds->v[g] / (sqrtf(ss32) + 0x1p-23f);
        for (uint64_t k = 0; k < (loha ? I : O); k++) {
            const uint64_t e = loha ? g * I + k : k * I + g;
            bnd[e] = f * (fabsl(ref[e]) * relf + ldexpl(mag[e], -49));
            ref[e] *= f;
            bnd[e] += ldexpl(fabsl(ref[e]), -52);
            y32[e] = v32[e] * f32;
        }
    }
    tx_case c;
    tx_case_write(&c, &base, &ad, "{}");
    snprintf(c.adir, sizeof c.adir, "%.500s/lyco.safetensors", c.dir);
    tx_write(c.adir, &ad);
    th_run_result res = tx_merge(&c, c.out, NULL);
    char what[96];
    snprintf(what, sizeof what, "%s + dora_scale %s cancel", loha ? "loha" : "lokr", bdt);
    cr_assert_eq(res.status, 0, "%s: exit %d: %s", what, res.status, res.err);
    uint64_t rec = 0;
    const uint64_t wrong = tx_verify(&c, &res, w->name, n, ref, bnd, y32, bdt, what, &rec);
    cr_assert_eq(rec, n, "%s: %llu recomputed, the f64 path computes all %llu", what, (unsigned long long)rec,
                 (unsigned long long)n);
    /* bf16, f16: the f32 residue's error (2^-15, 2^-12 of it) reaches a boundary now and then */
    cr_assert_gt(wrong, strcmp(bdt, "F32") ? 0 : n / 8, "%s: an f32 evaluation gets only %llu wrong: not adversarial",
                 what, (unsigned long long)wrong);
    if (!strcmp(bdt, "F16"))
        tx_same_bytes(&c, what);
    th_run_free(&res);
    free(D);
    free(mag);
    free(ref);
    free(bnd);
    free(y32);
    free(v32);
    tx_case_free(&c, &base, &ad);
}

Test(exact_lyco, loha_lokr_dora_scale, .timeout = 60)
{
    static const char *const dts[3] = {"BF16", "F16", "F32"};
    for (int d = 0; d < 3; d++) {
        xd_run(1, dts[d]);
        xd_run(0, dts[d]);
    }
}

/* ---- NaN in the base ----------------------------------------------------------------------
 * An f32 base holding NaNs whose bits plus a rounding increment carry out of the exponent
 * (0x7FFFFFFF, 0xFFFFFFFF) merged into bf16 (--dtype): each stays NaN.  The certified f32 forms
 * round the ends of an element's interval by adding to its bits; a NaN end must never count as
 * certified (the LoHa kernel, and exec_exact.c's certify_bf16 that LoKr takes, wrote 0x8000 and
 * 0x0000 here). */
Test(exact_lyco, nan_base_stays_nan, .timeout = 60)
{
    static const uint32_t nan_bits[3] = {0x7FFFFFFFu, 0xFFFFFFFFu, 0x7FC00000u};
    const float marker = 1234.5f; /* written where the NaNs go, then replaced in the file */
    for (int ty = 0; ty < 2; ty++) {
        const tx_type *tt = &XL_TYPES[ty == 0 ? XL_LOHA : XL_LOKR];
        const uint64_t n = (uint64_t)XL_O * XL_I;
        long double *D = malloc(n * sizeof *D), *mag = malloc(n * sizeof *mag);
        tx_set base = {0}, ad = {0};
        tx_t *w = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", "F32", 2, XL_O, XL_I);
        const char *cfg = tt->adapter(tt, 0.5, &ad, D, mag);
        for (uint64_t e = 0; e < n; e++)
            w->v[e] = e % 97 == 5 ? (double)marker : tx_f32_normal(&g_rng, 0.05);
        tx_case c;
        tx_case_write(&c, &base, &ad, cfg);
        size_t nb = 0;
        uint8_t *bytes = th_read_file(c.base, &nb);
        cr_assert_not_null(bytes);
        int k = 0;
        for (size_t o = 0; o + 4 <= nb; o++) {
            float f;
            memcpy(&f, bytes + o, 4);
            if (f == marker && o % 4 == nb % 4) {
                memcpy(bytes + o, &nan_bits[k % 3], 4);
                k++;
            }
        }
        cr_assert_eq((uint64_t)k, (n + 91) / 97, "%s: %d markers replaced", tt->name, k);
        cr_assert_eq(th_write_file(c.base, bytes, nb), 0);
        free(bytes);
        static const char *const opts[] = {"--dtype", "bf16", NULL};
        th_run_result res = tx_merge(&c, c.out, opts);
        cr_assert_eq(res.status, 0, "%s: exit %d: %s", tt->name, res.status, res.err);
        double *out = tx_out_values(c.out, w->name, n);
        for (uint64_t e = 0; e < n; e++)
            cr_assert(e % 97 == 5 ? isnan(out[e]) : isfinite(out[e]), "%s: element %llu is %g", tt->name,
                      (unsigned long long)e, out[e]);
        free(out);
        th_run_free(&res);
        free(D);
        free(mag);
        tx_case_free(&c, &base, &ad);
    }
}

/* ---- the changed count of the one-sweep LoHa path ----------------------------------------
 * bf16 and f16 bases (one dtype in and out, no --json: the kernel counts the output bits that
 * differ from the input's, and the elements recomputed in f64 mend the count): rows 0 and 1 without
 * a delta on a zero base (recomputed, unchanged: the kernel's bits there differ from the base),
 * five elements cancelling the delta (recomputed, changed), the others too large for the delta to
 * move (certified, unchanged).  The FewElementsChanged warning's count equals the elements whose
 * bytes differ, counted here, for every kernel variant. */
Test(exact_lyco, loha_changed_count, .timeout = 60)
{
    static const char *const dts[2] = {"BF16", "F16"}, *const variants[3] = {"ref", "avx2", "avx512"};
    for (int d = 0; d < 2; d++) {
        const tx_type *tt = &XL_TYPES[XL_LOHA];
        const uint64_t n = (uint64_t)XL_O * XL_I;
        long double *D = malloc(n * sizeof *D), *mag = malloc(n * sizeof *mag);
        tx_set base = {0}, ad = {0};
        tx_t *w = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", dts[d], 2, XL_O, XL_I);
        const char *cfg = tt->adapter(tt, 0.5, &ad, D, mag);
        for (int q = 0; q < ad.n; q++)
            if (strstr(ad.t[q].name, "hada_w1_a") != NULL)
                memset(ad.t[q].v, 0, 2 * XL_R * sizeof(double));
        for (uint64_t e = 0; e < n; e++)
            w->v[e] = e < 2 * XL_I                  ? 0.0
                      : e % 173 == 7 && D[e] != 0.0 ? th_round_to(-(double)D[e], dts[d])
                                                    : (e % 2 ? 1 : -1) * (fabs((double)D[e]) * 8192.0 + 1.0);
        for (uint64_t e = 0; e < n; e++)
            w->v[e] = th_round_to(w->v[e], dts[d]);
        tx_case c;
        tx_case_write(&c, &base, &ad, cfg);
        for (int v = 0; v < 3; v++) {
            lm_kernels k;
            if (lm_kernels_select(&k, variants[v]) != 0)
                continue;
            const char *argv[] = {th_bin(), "--kernels", variants[v], c.base, c.adir, c.out, NULL};
            unlink(c.out);
            th_run_result res = th_run(NULL, argv);
            cr_assert_eq(res.status, 0, "%s %s: exit %d: %s", dts[d], variants[v], res.status, res.err);
            th_st a, b;
            cr_assert(th_st_read(c.base, &a) == 0 && th_st_read(c.out, &b) == 0);
            const th_tensor *ta = th_st_find(&a, w->name), *tb = th_st_find(&b, w->name);
            cr_assert(ta && tb && ta->n_bytes == tb->n_bytes && ta->n_bytes == 2 * n);
            uint64_t diff = 0;
            for (uint64_t e = 0; e < n; e++)
                diff += memcmp(ta->data + 2 * e, tb->data + 2 * e, 2) != 0;
            th_st_free(&a);
            th_st_free(&b);
            const char *wn = strstr(res.err, "FewElementsChanged");
            unsigned long long got = 0, all = 0;
            cr_assert(wn != NULL && (wn = strstr(wn, "(")) != NULL && sscanf(wn, "(%llu of %llu)", &got, &all) == 2,
                      "%s %s: no count of the changed elements (%llu differ): %s", dts[d], variants[v],
                      (unsigned long long)diff, res.err);
            cr_assert(got == diff && all == n && diff >= 3, "%s %s: %llu changed reported, %llu differ", dts[d],
                      variants[v], got, (unsigned long long)diff);
            th_run_free(&res);
        }
        free(D);
        free(mag);
        tx_case_free(&c, &base, &ad);
    }
}
