/* SPDX-License-Identifier: MIT */
/* test_exact_types.c : issue 10 for the types that are not a low-rank product: every element the
 * exact value of PEFT's formula rounded once (ties to even), on generated adversarial cases, with
 * the reference computed here in double precision (or exactly) from the stored values.  Only the
 * binary is used (th_run); no ../shared needed.
 *  - IA3 (W * l per output row, the bias too; per input column for feed-forward modules): the exact
 *    product of two stored values is a double, rounded here once (th_round_to).  Most elements are
 *    built so that fl32(W * l) is exactly a rounding midpoint of the output dtype while the exact
 *    product is not (an f32 computation rounded again gets those wrong); tiny results (f16
 *    subnormals), and an f16 result beyond 65504 refused naming the tensor.
 * For each: the bytes equal for --threads 1/2, --tile-elems 100 and --kernels ref; --json says
 * the tensor is exact and how many elements were recomputed. */
#include "th.h"
#include "th_exact.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* every element equal to ref rounded once; @return how many of them an f32 computation rounded
 * again (fl32 first) would get wrong */
static uint64_t xe_check_exact(const double *out, const double *ref, uint64_t n, const char *dtype, const char *what)
{
    uint64_t twice_wrong = 0;
    for (uint64_t e = 0; e < n; e++) {
        const double want = th_round_to(ref[e], dtype);
        cr_assert(out[e] == want || (out[e] == 0 && want == 0 && signbit(out[e]) == signbit(want)),
                  "%s: element %llu is %a, the exact value %a rounded once is %a", what, (unsigned long long)e, out[e],
                  ref[e], want);
        twice_wrong += th_round_to((double)(float)ref[e], dtype) != want;
    }
    return twice_wrong;
}

/* ---- IA3 ------------------------------------------------------------------------------------ */

/* the midpoint of dtype just above |v| (away from zero), signed like v; v != 0 */
static double xe_midpoint_near(double v, const char *dtype)
{
    const double r = th_round_to(v, dtype);
    const double a = fabs(r) > 0 ? fabs(r) : th_spacing(0, dtype);
    return copysign(a + th_spacing(a, dtype) / 2, v);
}

/* a factor l (f32) such that fl32(w * l) is likely the midpoint of dtype nearest w * l0 while
 * w * l itself is not a midpoint (the exact product has more bits than f32 holds) */
static double xe_adversarial_factor(double w, double l0, const char *dtype)
{
    const double m = xe_midpoint_near(w * l0, dtype);
    return (double)(float)(m / w);
}

typedef struct {
    const char *bdt;
    uint64_t O, I;
} xe_ia3_shape;

static uint64_t g_rng = 0x1a3;

/* base value: N(0, 0.05) mostly, some tiny ones (f16 subnormal results), a few exact powers of 2 */
static double xe_w(const char *dt, uint64_t k)
{
    double w = 0.05 * th_rand_normal(&g_rng);
    if (k % 7 == 3)
        w = ldexp(1.0 + fabs(th_rand_uniform(&g_rng)), -20); /* tiny: results near 2^-24 */
    if (k % 11 == 5)
        w = ldexp(1.0, -(int)(k % 9)); /* a power of two */
    w = th_round_to(w, dt);
    return w == 0 ? th_round_to(0.01, dt) : w;
}

/* IA3 on a row-scaled module with a bias (up_proj, l [O, 1]) and a feed-forward module
 * (down_proj, l [1, I]: input columns); the element of each row (column) that its factor targets
 * lands on a midpoint of the output dtype in f32 */
static void xe_ia3_case(const char *bdt)
{
    const uint64_t O = 301, I = 37;
    tx_set base = {0}, ad = {0};
    tx_t *wu = tx_add(&base, "model.layers.0.mlp.up_proj.weight", bdt, 2, O, I);
    tx_t *bu = tx_add(&base, "model.layers.0.mlp.up_proj.bias", bdt, 1, O, 0);
    tx_t *wd = tx_add(&base, "model.layers.0.mlp.down_proj.weight", bdt, 2, I, O);
    tx_t *lu = tx_add(&ad, "base_model.model.model.layers.0.mlp.up_proj.ia3_l", "F32", 2, O, 1);
    tx_t *ld = tx_add(&ad, "base_model.model.model.layers.0.mlp.down_proj.ia3_l", "F32", 2, 1, O);
    const char *odt = bdt; /* the output keeps the base dtype */
    for (uint64_t e = 0; e < wu->n; e++)
        wu->v[e] = xe_w(bdt, e);
    for (uint64_t e = 0; e < wd->n; e++)
        wd->v[e] = xe_w(bdt, e + 3);
    for (uint64_t e = 0; e < bu->n; e++)
        bu->v[e] = xe_w(bdt, e + 5);
    for (uint64_t i = 0; i < O; i++) { /* row i of up_proj: element (i, i % I) targeted */
        const double l0 = 0.5 + 1.5 * fabs(th_rand_uniform(&g_rng));
        lu->v[i] = strcmp(odt, "F32") ? xe_adversarial_factor(wu->v[i * I + i % I], l0, odt) : (double)(float)l0;
    }
    for (uint64_t j = 0; j < O; j++) { /* column j of down_proj: element (j % I, j) targeted */
        const double l0 = 0.5 + 1.5 * fabs(th_rand_uniform(&g_rng));
        ld->v[j] = strcmp(odt, "F32") ? xe_adversarial_factor(wd->v[(j % I) * O + j], l0, odt) : (double)(float)l0;
    }
    tx_case c;
    tx_case_write(&c, &base, &ad,
                  "{\"peft_type\": \"IA3\", \"target_modules\": [\"up_proj\", \"down_proj\"], "
                  "\"feedforward_modules\": [\"down_proj\"]}");
    th_run_result r = tx_merge(&c, c.out, NULL);
    cr_assert_eq(r.status, 0, "IA3 %s: exit %d: %s", bdt, r.status, r.err);
    /* the references: exact products */
    double *ru = malloc(wu->n * sizeof(double)), *rb = malloc(bu->n * sizeof(double)),
           *rd = malloc(wd->n * sizeof(double));
    for (uint64_t i = 0; i < O; i++)
        for (uint64_t j = 0; j < I; j++)
            ru[i * I + j] = wu->v[i * I + j] * lu->v[i];
    for (uint64_t i = 0; i < O; i++)
        rb[i] = bu->v[i] * lu->v[i];
    for (uint64_t i = 0; i < I; i++)
        for (uint64_t j = 0; j < O; j++)
            rd[i * O + j] = wd->v[i * O + j] * ld->v[j];
    const tx_t *ts[3] = {wu, bu, wd};
    double *refs[3] = {ru, rb, rd};
    uint64_t wrong_twice = 0;
    for (int k = 0; k < 3; k++) {
        char what[200];
        snprintf(what, sizeof what, "IA3 %s %s", bdt, ts[k]->name);
        double *o = tx_out_values(c.out, ts[k]->name, ts[k]->n);
        wrong_twice += xe_check_exact(o, refs[k], ts[k]->n, odt, what);
        free(o);
        int exact;
        double rec;
        tx_json_tensor(r.out, ts[k]->name, &exact, &rec);
        cr_assert(exact, "%s: --json does not say exact", what);
        cr_assert(rec >= 0, "%s: --json has no recomputed count", what);
    }
    fprintf(stderr, "exact_types/ia3 %s: %llu elements that f32 rounded twice would get wrong, all exact\n", bdt,
            (unsigned long long)wrong_twice);
    if (strcmp(odt, "F32") != 0) /* the cases are adversarial: most targeted elements */
        cr_assert_gt(wrong_twice, O / 4, "IA3 %s: the adversarial construction produced only %llu cases", bdt,
                     (unsigned long long)wrong_twice);
    th_run_free(&r);
    tx_same_bytes(&c, bdt);
    free(ru);
    free(rb);
    free(rd);
    tx_case_free(&c, &base, &ad);
}

Test(exact_types, ia3_products_rounded_once_bf16, .timeout = 60) { xe_ia3_case("BF16"); }
Test(exact_types, ia3_products_rounded_once_f16, .timeout = 60) { xe_ia3_case("F16"); }
Test(exact_types, ia3_products_rounded_once_f32, .timeout = 60) { xe_ia3_case("F32"); }

/* an f16 product beyond 65504 (it would be written as inf) is refused naming the tensor */
Test(exact_types, ia3_f16_overflow_refused, .timeout = 60)
{
    tx_set base = {0}, ad = {0};
    tx_t *w = tx_add(&base, "model.layers.0.mlp.up_proj.weight", "F16", 2, 5, 3);
    tx_t *l = tx_add(&ad, "base_model.model.model.layers.0.mlp.up_proj.ia3_l", "F32", 2, 5, 1);
    for (uint64_t e = 0; e < w->n; e++)
        w->v[e] = th_round_to(0.1 * (double)(e + 1), "F16");
    w->v[7] = 60000;
    for (uint64_t i = 0; i < 5; i++)
        l->v[i] = 1.5;
    tx_expect_refused(&base, &ad, "{\"peft_type\": \"IA3\", \"target_modules\": [\"up_proj\"], \"feedforward_modules\": []}",
                      "model.layers.0.mlp.up_proj.weight", "F16");
}
