/* SPDX-License-Identifier: MIT */
/* test_exact_quant.c : issue 10 on quantized bases (issue 12).  A base generated in each format
 * (bench/gen_model --quant: block FP8, compressed-tensors FP8, both NVFP4s, bitsandbytes NF4 and
 * int8) is dequantized by tests/quant/deq_ref.py (numpy, from the formats' definitions, no code
 * from src/); against those values W an adapter of each certified path's type (LoRA: the low-rank
 * kernel; DoRA; LoHa and LoKr: the f32 form with a bound, f64 for f32 outputs) is built whose
 * delta cancels W to a residue of a few f32 ulps of W (zeros of W: subnormal results):
 *     delta = s * c * B,  c = fl32(1/3),  B = fl32(-W / (s c)) moved j f32 ulps, |j| <= 6
 * (LoRA: A = c I, r = in; LoHa: w1 = B (c I), w2 = a product of ones; LoKr: kron([[c]], B)).  The
 * delta is exact in long double, so every element of the reference (W + delta; DoRA: rescaled by
 * m / ||row||) is exact here, and a plain f32 evaluation of it gets many wrong (asserted).  Merged
 * with --dtype bf16, f16 and f32, every element must be the reference rounded once; an f16 result
 * beyond 65504 is refused naming the tensor; --json says exact; the same bytes with --threads
 * 1/2, --tile-elems and --kernels ref (one type per format), kept quantized too.
 * Kept block FP8 (LoRA: the certified fused tiles): merged values built next to rounding
 * midpoints of the FP8 grid, on the side their exact value says but within an f32 evaluation's
 * error of them: the codes and scales written must be the library's rule applied to the
 * correctly rounded f32 values (README: "rounded once" for a kept format). */
#include "th.h"
#include "th_exact.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static uint64_t g_rng = 0x9e37;

enum { XQ_N = 64 }; /* q_proj [64, 64] (--hidden 64) */
#define XQ_W "model.layers.0.self_attn.q_proj.weight"
#define XQ_MOD "base_model.model.model.layers.0.self_attn.q_proj."

typedef enum { XQ_LORA, XQ_DORA, XQ_LOHA, XQ_LOKR } xq_type;
static const char *const XQ_TYPE_NAMES[] = {"lora", "dora", "loha", "lokr"};

/* a generated base in format q, and W (its q_proj) as deq_ref.py dequantizes it */
typedef struct {
    th_qfx f;
    double *w;
} xq_base;

static void xq_base_make(xq_base *b, const char *q)
{
    char args[4000], deq[1200], p[1300];
    snprintf(args, sizeof args, "--hidden 64 --inter 128 --layers 1 --vocab 32 --heads 4 --kv-heads 2 --rank 4 "
             "--quant %s --block 16 --no-adapter", q);
    th_qgen(&b->f, args);
    snprintf(deq, sizeof deq, "%s/deq", b->f.tmp);
    snprintf(args, sizeof args, "dequant '%s' '%s'", b->f.base, deq);
    th_quant_ref("deq_ref.py", args);
    snprintf(p, sizeof p, "%s/model.safetensors", deq);
    b->w = tx_out_values(p, XQ_W, XQ_N * XQ_N);
}

static void xq_base_free(xq_base *b)
{
    free(b->w);
    th_qfx_free(&b->f);
}

static tx_t *xq_param(tx_set *ad, const char *part, uint64_t d0, uint64_t d1)
{
    char nm[160];
    snprintf(nm, sizeof nm, XQ_MOD "%s", part);
    return tx_add(ad, nm, "F32", d1 ? 2 : 1, d0, d1);
}

/* x moved j f32 ulps */
static double nudge(double x, int j)
{
    float f = (float)x;
    for (; j > 0; j--)
        f = nextafterf(f, INFINITY);
    for (; j < 0; j++)
        f = nextafterf(f, -INFINITY);
    return (double)f;
}

/* the adapter of type ty against W (s = 2), its config, and ref: the merged value (exact in long
 * double; DoRA's up to its f64 noise, bnd) */
static const char *xq_adapter(xq_type ty, const double *w, tx_set *ad, long double *ref, long double *bnd,
                              float *y32)
{
    const uint64_t N = XQ_N, n = N * N;
    const double s = 2.0, c = (double)(1.0f / 3.0f);
    double *B = malloc(n * sizeof *B);
    for (uint64_t e = 0; e < n; e++)
        B[e] = nudge(-w[e] / (s * c), (int)(th_rand_u64(&g_rng) % 13) - 6);
    for (uint64_t e = 0; e < n; e++) {
        ref[e] = (long double)w[e] + (long double)s * c * B[e];
        bnd[e] = 0;
        y32[e] = (float)w[e] + (float)(s * c) * (float)B[e]; /* an f32 evaluation: fl32(s c) B, then + W */
    }
    const char *cfg = NULL;
    switch (ty) {
    case XQ_LORA:
    case XQ_DORA: {
        tx_t *a = xq_param(ad, "lora_A.weight", N, N), *b = xq_param(ad, "lora_B.weight", N, N);
        for (uint64_t i = 0; i < N; i++)
            a->v[i * N + i] = c;
        memcpy(b->v, B, n * sizeof *B);
        cfg = "{\"peft_type\": \"LORA\", \"target_modules\": [\"q_proj\"], \"r\": 64, \"lora_alpha\": 128}";
        if (ty == XQ_LORA)
            break;
        tx_t *m = xq_param(ad, "lora_magnitude_vector", N, 0);
        for (uint64_t o = 0; o < N; o++) { /* V = W + delta (exact), W' = V m / ||V|| */
            m->v[o] = (double)(float)(0.5 + 0.25 * th_rand_normal(&g_rng));
            long double ss = 0;
            for (uint64_t i = 0; i < N; i++)
                ss += ref[o * N + i] * ref[o * N + i];
            const long double f = ss > 0 ? m->v[o] / sqrtl(ss) : 0;
            for (uint64_t i = 0; i < N; i++) {
                ref[o * N + i] *= f;
                bnd[o * N + i] = ldexpl(fabsl(ref[o * N + i]), -48); /* the f64 norm and factor */
                y32[o * N + i] = (float)(y32[o * N + i] * (float)f);
            }
        }
        cfg = "{\"peft_type\": \"LORA\", \"target_modules\": [\"q_proj\"], \"r\": 64, \"lora_alpha\": 128, "
              "\"use_dora\": true}";
        break;
    }
    case XQ_LOHA: { /* (w1a @ w1b) * (w2a @ w2b) * alpha / r, w2a @ w2b all ones */
        tx_t *a1 = xq_param(ad, "hada_w1_a", N, N), *b1 = xq_param(ad, "hada_w1_b", N, N);
        tx_t *a2 = xq_param(ad, "hada_w2_a", N, N), *b2 = xq_param(ad, "hada_w2_b", N, N);
        memcpy(a1->v, B, n * sizeof *B);
        for (uint64_t i = 0; i < N; i++) {
            b1->v[i * N + i] = c;
            a2->v[i * N] = 1;
            b2->v[i] = 1;
        }
        cfg = "{\"peft_type\": \"LOHA\", \"target_modules\": [\"q_proj\"], \"r\": 64, \"alpha\": 128}";
        break;
    }
    case XQ_LOKR: { /* kron(w1, w2) * alpha / r, w1 = [[c]] */
        tx_t *w1 = xq_param(ad, "lokr_w1", 1, 1), *w2 = xq_param(ad, "lokr_w2", N, N);
        w1->v[0] = c;
        memcpy(w2->v, B, n * sizeof *B);
        cfg = "{\"peft_type\": \"LOKR\", \"target_modules\": [\"q_proj\"], \"r\": 64, \"alpha\": 128}";
        break;
    }
    }
    free(B);
    return cfg;
}

/* the adapter written beside the base, in dir/ad<k> (c: the case, out dir/o<k>.safetensors) */
static void xq_case(tx_case *c, const xq_base *b, const tx_set *ad, const char *cfg, int k)
{
    memset(c, 0, sizeof *c);
    c->dir = b->f.tmp;
    cr_assert_lt(strlen(b->f.base), sizeof c->base);
    memcpy(c->base, b->f.base, strlen(b->f.base) + 1);
    snprintf(c->adir, sizeof c->adir, "%s/ad%d", b->f.tmp, k);
    snprintf(c->out, sizeof c->out, "%s/o%d.safetensors", b->f.tmp, k);
    cr_assert_eq(mkdir(c->adir, 0755), 0);
    char p[700];
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", c->adir);
    tx_write(p, ad);
    cr_assert_eq(th_write_text(c->adir, "adapter_config.json", cfg), 0);
}

/* tx_same_bytes, its outputs removed (the next case writes them again) */
static void xq_same_bytes(const tx_case *c, const char *what, const char *const *extra)
{
    tx_same_bytes_with(c, what, extra);
    for (int k = 0; k < 3; k++) {
        char o[700];
        snprintf(o, sizeof o, "%s/det%d.safetensors", c->dir, k);
        remove(o);
    }
}

/* kept: also merged kept quantized; bytes: the same bytes across threads, tiles, kernels checked */
static void xq_type_on(const xq_base *b, const char *q, xq_type ty, int k, int kept, int bytes)
{
    const uint64_t n = XQ_N * XQ_N;
    long double *ref = malloc(n * sizeof *ref), *bnd = malloc(n * sizeof *bnd);
    float *y32 = malloc(n * sizeof *y32);
    tx_set ad = {0};
    const char *cfg = xq_adapter(ty, b->w, &ad, ref, bnd, y32);
    tx_case c;
    xq_case(&c, b, &ad, cfg, k);
    static const char *const dts[3] = {"BF16", "F16", "F32"}, *const opt[3] = {"bf16", "f16", "f32"};
    for (int d = 0; d < 3; d++) {
        const char *o[] = {"--dtype", opt[d], NULL};
        th_run_result r = tx_merge(&c, c.out, o);
        char what[160];
        snprintf(what, sizeof what, "%s into %s --dtype %s", XQ_TYPE_NAMES[ty], q, opt[d]);
        cr_assert_eq(r.status, 0, "%s: exit %d: %s", what, r.status, r.err);
        uint64_t amb = 0, sub = 0;
        double *ov = tx_out_values(c.out, XQ_W, n);
        const uint64_t wrong = tx_check(ov, ref, bnd, y32, n, dts[d], what, &amb);
        cr_assert_leq(amb, n / 50, "%s: %llu elements within f64 noise of a boundary", what, (unsigned long long)amb);
        int exact;
        double rec;
        tx_json_tensor(r.out, XQ_W, &exact, &rec);
        cr_assert(exact, "%s: --json does not say exact", what);
        cr_log_info("%s: %llu of %llu an f32 evaluation gets wrong; %g recomputed", what, (unsigned long long)wrong,
                    (unsigned long long)n, rec);
        if (d != 1)
            cr_assert_gt(wrong, n / 8, "%s: an f32 evaluation gets only %llu wrong: not adversarial", what,
                         (unsigned long long)wrong);
        for (uint64_t e = 0; e < n; e++)
            sub += ov[e] != 0 && fabs(ov[e]) < (d == 1 ? 0x1p-14 : 0x1p-126);
        free(ov);
        if (d == 1 && ty != XQ_DORA) /* the residues are f16 subnormals */
            cr_assert_gt(sub, n / 16, "%s: only %llu subnormal results", what, (unsigned long long)sub);
        if (d == 1 && bytes)
            xq_same_bytes(&c, what, o);
        th_run_free(&r);
        remove(c.out);
    }
    if (kept) { /* kept quantized: the same bytes across threads, tiles, kernels */
        th_run_result r = tx_merge(&c, c.out, NULL);
        cr_assert_eq(r.status, 0, "%s into %s kept: exit %d: %s", XQ_TYPE_NAMES[ty], q, r.status, r.err);
        int exact;
        double rc;
        tx_json_tensor(r.out, strcmp(q, "nvfp4") ? XQ_W : XQ_W "_packed", &exact, &rc);
        cr_assert(exact, "%s into %s kept: --json does not say exact", XQ_TYPE_NAMES[ty], q);
        th_run_free(&r);
        if (bytes)
            xq_same_bytes(&c, "kept", NULL);
        remove(c.out);
    }
    tx_free(&ad);
    free(ref);
    free(bnd);
    free(y32);
}

/* an f16 result beyond 65504 refused naming the tensor, nothing written */
static void xq_overflow(const xq_base *b, int k)
{
    tx_set ad = {0};
    tx_t *a = xq_param(&ad, "lora_A.weight", 1, XQ_N), *bb = xq_param(&ad, "lora_B.weight", XQ_N, 1);
    for (uint64_t i = 0; i < XQ_N; i++) {
        a->v[i] = 1;
        bb->v[i] = i == 5 ? 70000.0 : 0.0;
    }
    tx_case c;
    xq_case(&c, b, &ad, "{\"peft_type\": \"LORA\", \"target_modules\": [\"q_proj\"], \"r\": 1, \"lora_alpha\": 1}", k);
    const char *o[] = {"--dtype", "f16", NULL};
    th_run_result r = tx_merge(&c, c.out, o);
    tx_assert_refused(&r, c.out, "q_proj", "F16");
    th_run_free(&r);
    tx_free(&ad);
}

/* every type into format q; the bytes compared across threads, tiles and kernels for type
 * bytes_ty only (each type is in some format) */
static void xq_format(const char *q, int kept, xq_type bytes_ty)
{
    xq_base b;
    xq_base_make(&b, q);
    for (int ty = XQ_LORA; ty <= XQ_LOKR; ty++)
        xq_type_on(&b, q, (xq_type)ty, ty, kept, ty == (int)bytes_ty);
    xq_overflow(&b, 9);
    xq_base_free(&b);
}

Test(exact_quant, fp8_block, .timeout = 120) { xq_format("fp8", 1, XQ_LORA); }
Test(exact_quant, ct_fp8_tensor, .timeout = 120) { xq_format("ct-fp8", 1, XQ_DORA); }
Test(exact_quant, nvfp4, .timeout = 120) { xq_format("nvfp4", 1, XQ_LOHA); }
Test(exact_quant, modelopt_nvfp4, .timeout = 120) { xq_format("modelopt-nvfp4", 1, XQ_LOKR); }
Test(exact_quant, bnb_nf4, .timeout = 120) { xq_format("bnb-nf4", 0, XQ_DORA); }
Test(exact_quant, bnb_int8, .timeout = 120) { xq_format("bnb-int8", 0, XQ_LORA); }

/* ---- OFT and BOFT (the certified f32 form: one sweep of bound and certification) ------------- */
/* An OFT adapter on an NVFP4 base and a BOFT one on a block FP8 base (bench/gen_adapter against
 * the base as deq_ref.py dequantizes it), merged with --dtype f16 and bf16: the same bytes as the
 * merge into that dequantized base (every element the exact merge rounded once), --json exact
 * with the f32 form's few recomputed elements; kept quantized: exact (the f64 path, f32 values
 * for the rule).  Kept MXFP4 cannot take them: only LoRA reaches gpt-oss's expert parameters
 * (target_parameters), covered by quant_mx. */
Test(exact_quant, oft_boft_one_sweep, .timeout = 120)
{
    static const char *const cases[2][2] = {{"nvfp4", "oft"}, {"fp8", "boft"}};
    char gen_ad[1300];
    if (!th_gen_model_path(gen_ad, sizeof gen_ad))
        cr_skip_test("needs %s", gen_ad);
    memcpy(gen_ad + strlen(gen_ad) - strlen("gen_model"), "gen_adapter", sizeof "gen_adapter");
    for (int k = 0; k < 2; k++) {
        xq_base b;
        xq_base_make(&b, cases[k][0]);
        char args[4000], deq[1200], ad[1200], o1[1200], o2[1200];
        snprintf(deq, sizeof deq, "%s/deq", b.f.tmp);
        snprintf(ad, sizeof ad, "%s/ad", b.f.tmp);
        snprintf(args, sizeof args, "'%s' --base '%s' --out '%s' --type %s --rank 4 --block 16 2>&1", gen_ad, deq, ad,
                 cases[k][1]);
        th_run_result r = th_sh(args);
        cr_assert_eq(r.status, 0, "gen_adapter %s: %s", cases[k][1], r.out);
        th_run_free(&r);
        static const char *const dts[2] = {"f16", "bf16"};
        for (int d = 0; d < 2; d++) {
            snprintf(o1, sizeof o1, "%s/o1%d", b.f.tmp, d);
            snprintf(o2, sizeof o2, "%s/o2%d", b.f.tmp, d);
            r = th_runv("--json", "--dtype", dts[d], b.f.base, ad, o1, NULL);
            cr_assert_eq(r.status, 0, "%s into %s --dtype %s: exit %d: %s", cases[k][1], cases[k][0], dts[d], r.status,
                         r.err);
            int exact;
            double rec;
            tx_json_tensor(r.out, XQ_W, &exact, &rec);
            cr_assert(exact && rec >= 0 && rec < XQ_N * XQ_N / 10, "%s into %s --dtype %s: exact %d, %g recomputed",
                      cases[k][1], cases[k][0], dts[d], exact, rec);
            th_run_free(&r);
            r = th_runv("-q", "--dtype", dts[d], deq, ad, o2, NULL);
            cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
            th_run_free(&r);
            snprintf(args, sizeof args, "same '%s' '%s'", o1, o2);
            th_quant_ref("deq_ref.py", args);
        }
        snprintf(o1, sizeof o1, "%s/kept", b.f.tmp);
        r = th_runv("--json", b.f.base, ad, o1, NULL);
        cr_assert_eq(r.status, 0, "%s into %s kept: exit %d: %s", cases[k][1], cases[k][0], r.status, r.err);
        int exact;
        double rec;
        tx_json_tensor(r.out, strcmp(cases[k][0], "nvfp4") ? XQ_W : XQ_W "_packed", &exact, &rec);
        cr_assert(exact, "%s into %s kept: --json does not say exact", cases[k][1], cases[k][0]);
        th_run_free(&r);
        xq_base_free(&b);
    }
}

/* ---- kept block FP8: the rule applied to the correctly rounded values ------------------------ */
static double e4m3_value(unsigned c)
{
    const double s = (c & 0x80) ? -1.0 : 1.0;
    const unsigned e = (c >> 3) & 15, m = c & 7;
    return e == 0 ? s * m * ldexp(1.0, -9) : s * (1.0 + m / 8.0) * ldexp(1.0, (int)e - 7);
}

/* the nearest finite code by brute force, ties to the even code, beyond 448 saturating */
static unsigned e4m3_code(float x)
{
    static double v[0x7F];
    if (v[1] == 0)
        for (unsigned c = 0; c < 0x7F; c++)
            v[c] = e4m3_value(c);
    const double a = fabs((double)x) > 448.0 ? 448.0 : fabs((double)x);
    unsigned best = 0;
    for (unsigned c = 1; c <= 0x7E; c++) {
        const double d = fabs(v[c] - a), db = fabs(v[best] - a);
        if (d < db || (d == db && (c & 1) == 0))
            best = c;
    }
    return best | (signbit(x) ? 0x80u : 0u);
}

/* transformers' FineGrainedFP8 rule on the f32 values x of a br x bc block (row stride N): the
 * codes into q, the scale_inv returned */
static float fp8_block_rule(const float *x, unsigned *q, uint64_t br, uint64_t bc)
{
    float amax = 0;
    for (uint64_t r = 0; r < br; r++)
        for (uint64_t c = 0; c < bc; c++)
            amax = fabsf(x[r * XQ_N + c]) > amax ? fabsf(x[r * XQ_N + c]) : amax;
    const float s = 448.0f / amax;
    for (uint64_t r = 0; r < br; r++)
        for (uint64_t c = 0; c < bc; c++) {
            volatile float p = x[r * XQ_N + c] * s; /* f32 */
            q[r * XQ_N + c] = e4m3_code(p);
        }
    return 1.0f / s;
}

/* Every 16 x 16 block of q_proj gets merged values next to midpoints m of the FP8 grid (m / s,
 * s = 448 / T the block's scale with its largest value T = 2 max |W|), small against W so that
 * the delta nearly cancels W and an f32 evaluation of W + delta misses the exact value by more
 * than its distance to the midpoint.  The codes and scales written must be the rule applied to
 * the exact values rounded once to f32. */
Test(exact_quant, fp8_block_kept_near_midpoints, .timeout = 60)
{
    xq_base b;
    xq_base_make(&b, "fp8");
    const uint64_t N = XQ_N, n = N * N, BS = 16;
    const double s = 2.0, c = (double)(1.0f / 3.0f);
    tx_set ad = {0};
    tx_t *a = xq_param(&ad, "lora_A.weight", N, N), *B = xq_param(&ad, "lora_B.weight", N, N);
    for (uint64_t i = 0; i < N; i++)
        a->v[i * N + i] = c;
    float *x32 = malloc(n * sizeof *x32), *y32 = malloc(n * sizeof *y32);
    for (uint64_t r0 = 0; r0 < N; r0 += BS)
        for (uint64_t c0 = 0; c0 < N; c0 += BS) {
            double T = 0;
            for (uint64_t r = r0; r < r0 + BS; r++)
                for (uint64_t k = c0; k < c0 + BS; k++)
                    T = fabs(b.w[r * N + k]) > T ? fabs(b.w[r * N + k]) : T;
            T = T > 0 ? 2 * T : 1.0;
            for (uint64_t r = r0; r < r0 + BS; r++)
                for (uint64_t k = c0; k < c0 + BS; k++) {
                    const uint64_t e = r * N + k;
                    double target = T; /* the block's first element: its amax */
                    if (r != r0 || k != c0) { /* a midpoint of codes of 0.5 .. 8 (scaled), either sign */
                        const unsigned code = 0x30 + (unsigned)(th_rand_u64(&g_rng) % 32);
                        const double m = (e4m3_value(code) + e4m3_value(code + 1)) / 2;
                        target = (th_rand_u64(&g_rng) & 1 ? -m : m) * T / 448.0;
                    }
                    B->v[e] = (double)(float)((target - b.w[e]) / (s * c));
                    x32[e] = (float)((long double)b.w[e] + (long double)s * c * B->v[e]); /* exact, rounded once */
                    y32[e] = (float)b.w[e] + (float)(s * c) * (float)B->v[e];           /* an f32 evaluation */
                }
        }
    tx_case cs;
    xq_case(&cs, &b, &ad, "{\"peft_type\": \"LORA\", \"target_modules\": [\"q_proj\"], \"r\": 64, \"lora_alpha\": 128}",
            0);
    th_run_result res = tx_merge(&cs, cs.out, NULL);
    cr_assert_eq(res.status, 0, "exit %d: %s", res.status, res.err);
    th_st o;
    cr_assert_eq(th_st_read(cs.out, &o), 0);
    const th_tensor *q = th_st_find(&o, XQ_W), *si = th_st_find(&o, XQ_W "_scale_inv");
    cr_assert(q != NULL && si != NULL && !strcmp(q->dtype, "F8_E4M3") && !strcmp(si->dtype, "F32"));
    unsigned *want = malloc(n * sizeof *want), *f32w = malloc(n * sizeof *f32w);
    uint64_t f32_wrong = 0;
    for (uint64_t r0 = 0; r0 < N; r0 += BS)
        for (uint64_t c0 = 0; c0 < N; c0 += BS) {
            const float inv = fp8_block_rule(x32 + r0 * N + c0, want + r0 * N + c0, BS, BS);
            fp8_block_rule(y32 + r0 * N + c0, f32w + r0 * N + c0, BS, BS);
            float got;
            memcpy(&got, si->data + ((r0 / BS) * (N / BS) + c0 / BS) * 4, 4);
            cr_assert(got == inv, "block (%llu, %llu): scale_inv %a, the rule on the exact values gives %a",
                      (unsigned long long)r0, (unsigned long long)c0, (double)got, (double)inv);
        }
    for (uint64_t e = 0; e < n; e++) {
        cr_assert_eq(q->data[e], want[e], "element %llu: code %#x, the rule on the exact value %a gives %#x",
                     (unsigned long long)e, q->data[e], (double)x32[e], want[e]);
        f32_wrong += f32w[e] != want[e];
    }
    cr_log_info("kept block FP8: %llu of %llu codes an f32 evaluation gets wrong", (unsigned long long)f32_wrong,
                (unsigned long long)n);
    cr_assert_gt(f32_wrong, n / 20, "an f32 evaluation gets only %llu codes wrong: not adversarial",
                 (unsigned long long)f32_wrong);
    th_st_free(&o);
    th_run_free(&res);
    free(want);
    free(f32w);
    free(x32);
    free(y32);
    tx_free(&ad);
    xq_base_free(&b);
}
