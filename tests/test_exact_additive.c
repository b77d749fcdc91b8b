/* SPDX-License-Identifier: MIT */
/* test_exact_additive.c : issue 10 for the additive method types on the f64 tile path
 * (apply_tile64): FourierFT, WaveFT, C3A, SHiRA (LoHa, LoKr: not yet, see below).  Per type, an adapter with random
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

typedef enum { XA_CANCEL, XA_TINY, XA_HUGE, XA_SUBNORMAL, XA_OVERFLOW } xa_mode;
typedef enum { XA_LOHA, XA_LOKR, XA_FOURIERFT, XA_WAVEFT, XA_C3A, XA_SHIRA } xa_type;

static const char *const XA_TYPE_NAMES[] = {"loha", "lokr", "fourierft", "waveft", "c3a", "shira"};
static const char *const XA_MODE_NAMES[] = {"cancel", "tiny", "huge", "subnormal", "overflow"};

enum { XA_O = 24, XA_I = 32, XA_R = 4, XA_B = 8, XA_NF = 96 };
#define XA_MOD "base_model.model.model.layers.0.self_attn.q_proj."

/* a stored f32 adapter value: g * normal, exact in f32 */
static double xa_val(double g)
{
    return (double)(float)(g * th_rand_normal(&g_rng));
}

static tx_t *xa_param(tx_set *ad, const char *part, int nd, uint64_t d0, uint64_t d1, double g)
{
    char nm[160];
    snprintf(nm, sizeof nm, XA_MOD "%s", part);
    tx_t *t = tx_add(ad, nm, "F32", nd, d0, d1);
    for (uint64_t e = 0; e < t->n; e++)
        t->v[e] = xa_val(g);
    return t;
}

/* the adapter of type ty with gain g (the delta is linear in g), its config, and the delta
 * (long double, PEFT's formula from the stored values) with mag = the same sum of absolute terms */
static const char *xa_adapter(xa_type ty, double g, tx_set *ad, long double *D, long double *mag)
{
    const uint64_t O = XA_O, I = XA_I, R = XA_R;
    for (uint64_t e = 0; e < O * I; e++)
        D[e] = mag[e] = 0;
    switch (ty) {
    case XA_LOHA: { /* (w1a @ w1b) * (w2a @ w2b) * alpha / r */
        tx_t *a1 = xa_param(ad, "hada_w1_a", 2, O, R, g), *b1 = xa_param(ad, "hada_w1_b", 2, R, I, 0.5);
        tx_t *a2 = xa_param(ad, "hada_w2_a", 2, O, R, 0.5), *b2 = xa_param(ad, "hada_w2_b", 2, R, I, 0.5);
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
    case XA_LOKR: { /* kron(w1, w2_a @ w2_b) * alpha / r: w1 [4, 4], w2 [6, 8] */
        const uint64_t a = 4, c = 4, kb = 6, kd = 8;
        tx_t *w1 = xa_param(ad, "lokr_w1", 2, a, c, g);
        tx_t *wa = xa_param(ad, "lokr_w2_a", 2, kb, R, 0.5), *wb = xa_param(ad, "lokr_w2_b", 2, R, kd, 0.5);
        for (uint64_t p = 0; p < a; p++)
            for (uint64_t q = 0; q < kb; q++)
                for (uint64_t u = 0; u < c; u++)
                    for (uint64_t v = 0; v < kd; v++) {
                        long double w2 = 0, a2 = 0;
                        for (uint64_t k = 0; k < R; k++) {
                            w2 += (long double)wa->v[q * R + k] * wb->v[k * kd + v];
                            a2 += fabsl((long double)wa->v[q * R + k] * wb->v[k * kd + v]);
                        }
                        const uint64_t e = (p * kb + q) * I + u * kd + v;
                        D[e] = (long double)w1->v[p * c + u] * w2 * 2;
                        mag[e] = fabsl((long double)w1->v[p * c + u]) * a2 * 2;
                    }
        return "{\"peft_type\": \"LOKR\", \"target_modules\": [\"q_proj\"], \"r\": 4, \"alpha\": 8}";
    }
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
            k->v[e] = xa_val(g);
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

/* the largest |delta| */
static long double xa_max(const long double *D, uint64_t n)
{
    long double m = 0;
    for (uint64_t e = 0; e < n; e++)
        m = fabsl(D[e]) > m ? fabsl(D[e]) : m;
    return m;
}

static void xa_run_case(xa_type ty, const char *bdt, xa_mode mode)
{
    const uint64_t O = XA_O, I = XA_I, n = O * I;
    long double *D = malloc(n * sizeof *D), *mag = malloc(n * sizeof *mag);
    long double *ref = malloc(n * sizeof *ref), *bnd = malloc(n * sizeof *bnd);
    float *y32 = malloc(n * sizeof *y32);
    /* the gain: the delta's size (LoHa's is a product of two, the others linear in g) */
    const int f16 = !strcmp(bdt, "F16");
    /* TINY: under an ulp of W ~0.05 (bf16 2^-12, f16 2^-15, f32 2^-28) */
    const double tiny = !strcmp(bdt, "BF16") ? 1e-4 : f16 ? 1.5e-5 : 1e-9;
    double g = mode == XA_TINY ? tiny : mode == XA_HUGE ? 4.0 : mode == XA_SUBNORMAL ? (f16 ? 0x1p-14 : 0x1p-122)
               : mode == XA_OVERFLOW ? 1.0 : 0.25;
    if (ty == XA_FOURIERFT && mode != XA_SUBNORMAL && mode != XA_TINY)
        g *= 4; /* 150 / (O I) times a sum of 96 cosines: keep the delta of order g */
    if (ty == XA_C3A)
        g *= 32; /* kernel / in */
    if (mode == XA_SUBNORMAL && !f16 && ty != XA_WAVEFT) /* WaveFT: scaling 25 does it */
        g *= 16; /* a normal delta whose residue against bf16 (2^-8 of it) is subnormal */
    tx_set base = {0}, ad = {0};
    tx_t *w = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", bdt, 2, O, I);
    tx_t *other = tx_add(&base, "model.layers.0.self_attn.k_proj.weight", bdt, 2, 4, I);
    for (uint64_t e = 0; e < other->n; e++)
        other->v[e] = th_round_to(0.01 * (double)e, bdt);
    const char *cfg = xa_adapter(ty, g, &ad, D, mag);
    if (mode == XA_OVERFLOW) { /* scale the delta to ~8000 at its largest, W 60000 with its sign */
        const long double m = xa_max(D, n);
        for (int k = 0; k < ad.n; k++)
            if (strstr(ad.t[k].name, "hada_w1_a") || strstr(ad.t[k].name, "lokr_w1") || strstr(ad.t[k].name, "spectrum") ||
                strstr(ad.t[k].name, "c3a_kernel") || strstr(ad.t[k].name, "shira_weight"))
                for (uint64_t e = 0; e < ad.t[k].n; e++)
                    ad.t[k].v[e] = (double)(float)(ad.t[k].v[e] * (double)(8000 / m));
    }
    for (uint64_t e = 0; e < n; e++) {
        switch (mode) {
        case XA_CANCEL:
        case XA_SUBNORMAL: w->v[e] = th_round_to(-th_round_to((double)D[e], "BF16"), bdt); break;
        case XA_TINY: w->v[e] = th_round_to(0.05 * th_rand_normal(&g_rng), bdt); break;
        case XA_HUGE: w->v[e] = th_round_to(1e-6 * th_rand_normal(&g_rng), bdt); break;
        case XA_OVERFLOW: w->v[e] = D[e] < 0 ? -60000.0 : 60000.0; break;
        }
    }
    tx_case c;
    tx_case_write(&c, &base, &ad, cfg);
    th_run_result res = tx_merge(&c, c.out, NULL);
    char what[96];
    snprintf(what, sizeof what, "%s %s %s", XA_TYPE_NAMES[ty], bdt, XA_MODE_NAMES[mode]);
    if (mode == XA_OVERFLOW) {
        cr_assert_neq(res.status, 0, "%s: exit 0, the result overflows f16", what);
        cr_assert(strstr(res.err, "q_proj.weight") != NULL, "%s: the error does not name the tensor: %s", what, res.err);
        cr_assert(!th_exists(c.out), "%s: an output was written", what);
    } else {
        cr_assert_eq(res.status, 0, "%s: exit %d: %s", what, res.status, res.err);
        for (uint64_t e = 0; e < n; e++) {
            ref[e] = w->v[e] + D[e];
            /* f64 noise: a few roundings per term of the delta (FourierFT: FFTW's twiddles and
             * butterflies, log2(32) levels), and the final sum */
            bnd[e] = ldexpl(mag[e], ty == XA_FOURIERFT ? -48 : -49) + ldexpl(fabsl(ref[e]), -52);
            /* C3A (k * (1 / 32)), SHiRA (sums of a few f32 values) and WaveFT without the transform
             * (s * 25) are exact in f64, W + delta too: no noise, every element the nearest value
             * (ties included) */
            if (ty == XA_C3A || ty == XA_SHIRA || ty == XA_WAVEFT)
                bnd[e] = 0;
            /* an f32 evaluation: the delta rounded to f32, then the f32 sum */
            y32[e] = (float)w->v[e] + (float)D[e];
        }
        uint64_t rec = 0;
        const uint64_t wrong = tx_verify(&c, &res, w->name, n, ref, bnd, y32, bdt, what, &rec);
        cr_assert_eq(rec, n, "%s: --json says %llu recomputed, the f64 path computes all %llu", what,
                     (unsigned long long)rec, (unsigned long long)n); /* these types have no f32 form */
        /* bf16: the residue is often exact in f32; C3A's delta (kernel / 32) is exact in f32 */
        if (mode == XA_CANCEL && strcmp(bdt, "BF16") != 0 && ty != XA_C3A)
            cr_assert_gt(wrong, 0, "%s: an f32 evaluation gets every element right: not adversarial", what);
        if (mode == XA_SUBNORMAL) { /* the construction reaches the subnormal range */
            double *o = tx_out_values(c.out, w->name, n);
            uint64_t sub = 0, nz = 0; /* of the elements the delta changes (SHiRA, WaveFT: sparse) */
            for (uint64_t e = 0; e < n; e++) {
                nz += D[e] != 0;
                sub += D[e] != 0 && o[e] != 0 && fabs(o[e]) < (f16 ? 0x1p-14 : 0x1p-126);
            }
            free(o);
            cr_assert_gt(sub, nz / 4, "%s: only %llu of %llu results subnormal", what, (unsigned long long)sub,
                         (unsigned long long)nz);
        }
        if (mode == XA_CANCEL)
            tx_same_bytes(&c, what);
    }
    th_run_free(&res);
    free(D);
    free(mag);
    free(ref);
    free(bnd);
    free(y32);
    tx_case_free(&c, &base, &ad);
}

static void xa_type_all(xa_type ty)
{
    static const char *const dts[3] = {"BF16", "F16", "F32"};
    for (int d = 0; d < 3; d++)
        for (int m = XA_CANCEL; m <= XA_SUBNORMAL; m++)
            xa_run_case(ty, dts[d], (xa_mode)m);
    xa_run_case(ty, "F16", XA_OVERFLOW);
}

/* LoHa: its f64 tile path (both rank-r products in f64 per tile) measured 10.7x the LoRA merge in
 * the methods bench (issue 9's target 2.0x), so LoHa stays on the f32 path, not certified; the
 * XA_LOHA case is kept for when it is (an f32 pass with a bound and f64 recomputation).  LoKr
 * likewise: 3.95x through the f64 tile path (target 1.5x), not certified yet */
Test(exact_additive, fourierft, .timeout = 120) { xa_type_all(XA_FOURIERFT); }
Test(exact_additive, waveft, .timeout = 120) { xa_type_all(XA_WAVEFT); }
Test(exact_additive, c3a, .timeout = 120) { xa_type_all(XA_C3A); }
Test(exact_additive, shira, .timeout = 120) { xa_type_all(XA_SHIRA); }
