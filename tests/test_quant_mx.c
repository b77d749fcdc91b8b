/* SPDX-License-Identifier: MIT */
/* test_quant_mx.c : MXFP4 bases (gpt-oss).  The codec against the format's definition written
 * here in double precision: every E2M1 code with every E8M0 scale (0 = 2^-127, 254 = 2^127, 255
 * NaN), the rounding ties and saturation, the library's scale rule, dequantize -> requantize
 * round trips byte for byte. */
#include "quant_mx.h"
#include "th.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* E2M1 from its definition: 1 sign, 2 exponent (bias 1), 1 mantissa bit; exponent 0 subnormal */
static double e2m1_def(unsigned c)
{
    unsigned e = (c >> 1) & 3, m = c & 1;
    double v = e == 0 ? m * 0.5 : (1.0 + m / 2.0) * ldexp(1.0, (int)e - 1);
    return (c & 8) ? -v : v;
}

/* the nearest code by brute force, ties to the even code (mantissa bit 0), beyond 6 saturating */
static unsigned e2m1_nearest(double x)
{
    double a = fabs(x) > 6.0 ? 6.0 : fabs(x);
    unsigned best = 0;
    for (unsigned c = 1; c < 8; c++) {
        double d = fabs(e2m1_def(c) - a), db = fabs(e2m1_def(best) - a);
        if (d < db || (d == db && (c & 1) == 0))
            best = c;
    }
    return best | (signbit(x) ? 8u : 0u);
}

Test(quant_mx, every_code_with_every_scale)
{
    for (unsigned s = 0; s < 256; s++) {
        double sc = ldexp(1.0, (int)s - 127);
        if (s == 255)
            cr_assert(isnan(lm_e8m0_value(255)), "E8M0 255 is NaN");
        else
            cr_assert_eq((double)lm_e8m0_value((uint8_t)s), sc, "E8M0 %u", s);
        for (unsigned c = 0; c < 16; c++) {
            uint8_t q[16];
            memset(q, (int)(c | c << 4), sizeof q);
            float out[32], sv = lm_e8m0_value((uint8_t)s);
            cr_assert_eq(lm_e8m0_from_f32(sv), s, "E8M0 %u back to its byte", s);
            lm_mxfp4_dequant(q, &sv, 1, 32, out);
            double want = e2m1_def(c) * sc;
            for (int i = 0; i < 32; i++) {
                if (s == 255) {
                    cr_assert(isnan(out[i]), "scale 255 code %u: NaN expected", c);
                } else if (fabs(want) > 3.4028234663852886e38) {
                    cr_assert(isinf(out[i]) && (out[i] < 0) == (want < 0), "scale %u code %u overflows to inf", s, c);
                } else {
                    cr_assert_eq((double)out[i], want, "scale %u code %u: %a, want %a", s, c, (double)out[i], want);
                    cr_assert_eq(!!signbit(out[i]), !!(c & 8), "scale %u code %u: sign", s, c);
                }
            }
        }
    }
    cr_assert_eq(lm_e8m0_value(0), 0x1p-127f);
    cr_assert_eq(lm_e8m0_value(127), 1.0f);
    cr_assert_eq(lm_e8m0_value(254), 0x1p127f);
}

Test(quant_mx, nibble_order)
{
    /* element 2k is the low nibble of byte k (transformers' convert_moe_packed_tensors) */
    uint8_t q[16] = {0x71, 0xF8};
    float out[32], s = 2.0f;
    lm_mxfp4_dequant(q, &s, 1, 32, out);
    cr_assert_eq(out[0], 1.0f);   /* 0x1: 0.5 * 2 */
    cr_assert_eq(out[1], 12.0f);  /* 0x7: 6 * 2 */
    cr_assert(out[2] == 0.0f && signbit(out[2])); /* 0x8: -0 */
    cr_assert_eq(out[3], -12.0f); /* 0xF: -6 * 2 */
}

Test(quant_mx, e2m1_rounding)
{
    static const struct {
        float x;
        unsigned code;
    } cases[] = {
        {0.25f, 0}, {0.2500001f, 1}, {0.75f, 2}, {0.7499999f, 1}, {1.25f, 2}, {1.2500001f, 3}, {1.75f, 4},
        {2.5f, 4}, {2.5000002f, 5}, {3.5f, 6}, {3.4999998f, 5}, {5.0f, 6}, {5.0000005f, 7}, {6.0f, 7},
        {7.9f, 7}, {1e30f, 7}, {INFINITY, 7}, {-INFINITY, 15}, {-0.0f, 8}, {-0.1f, 8}, {0x1p-140f, 0},
        {-5.0f, 14}, {-0.75f, 10},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        cr_assert_eq(lm_mx_f32_to_e2m1(cases[i].x), cases[i].code, "%a -> %u, want %u", (double)cases[i].x,
                     lm_mx_f32_to_e2m1(cases[i].x), cases[i].code);
    cr_assert_eq(lm_mx_f32_to_e2m1(NAN) & 7, 7, "NaN saturates (the library's bit rule)");
    for (unsigned c = 0; c < 16; c++)
        cr_assert_eq(lm_mx_f32_to_e2m1(lm_mx_e2m1_value(c)), c, "code %u encodes back to itself", c);
    uint64_t rng = 99;
    for (int k = 0; k < 20000; k++) {
        float x = (float)(th_rand_uniform(&rng) * 7.5);
        cr_assert_eq(lm_mx_f32_to_e2m1(x), e2m1_nearest(x), "%a -> %u, want %u", (double)x, lm_mx_f32_to_e2m1(x),
                     e2m1_nearest(x));
    }
}

Test(quant_mx, scale_rule)
{
    /* amax / 6 rounded up to a power of two; the byte its biased exponent */
    cr_assert_eq(lm_mx_scale_for(6.0f), 127);
    cr_assert_eq(lm_mx_scale_for(6.0000005f), 128);
    cr_assert_eq(lm_mx_scale_for(3.0f), 126);
    cr_assert_eq(lm_mx_scale_for(4.0f), 127);
    cr_assert_eq(lm_mx_scale_for(0.0f), 0);
    cr_assert_eq(lm_mx_scale_for(INFINITY), 255);
    cr_assert_eq(lm_mx_scale_for(0x1p-140f), 1, "a subnormal amax / 6 rounds up to 2^-126");
    cr_assert_eq(lm_mx_scale_for(3.4028235e38f), 253);
    uint64_t rng = 5;
    for (int k = 0; k < 5000; k++) {
        float a = (float)ldexp(1.0 + th_rand_uniform(&rng) * 0.999, (int)(th_rand_u64(&rng) % 200) - 100);
        double want = ceil(log2((double)(a / 6.0f)));
        cr_assert_eq(lm_mx_scale_for(a), (unsigned)(want + 127), "amax %a", (double)a);
    }
}

/* random codes and scales (the edge scales 0, 1, 254 and 255 among them): dequantize ->
 * requantize gives the same bytes, every group kept */
Test(quant_mx, round_trip_identical_bytes)
{
    enum { R = 6, C = 128, G = C / 32 };
    uint8_t q[R * C / 2], q2[R * C / 2], sb[R * G];
    float x[R * C], s[R * G], s2[R * G];
    uint64_t rng = 3;
    for (size_t i = 0; i < sizeof q; i++)
        q[i] = (uint8_t)(th_rand_u64(&rng) >> 56);
    for (size_t i = 0; i < sizeof sb; i++)
        sb[i] = (uint8_t)(th_rand_u64(&rng) >> 56);
    sb[0] = 0;
    sb[1] = 1;
    sb[2] = 254;
    sb[3] = 255;
    for (size_t i = 0; i < sizeof sb; i++)
        s[i] = lm_e8m0_value(sb[i]);
    lm_mxfp4_dequant(q, s, R, C, x);
    lm_qstats st = {0};
    lm_mxfp4_requant(x, q, s, R, C, q2, s2, &st);
    cr_assert_eq(memcmp(q, q2, sizeof q), 0, "unchanged groups keep their codes");
    for (size_t i = 0; i < sizeof sb; i++)
        cr_assert_eq(lm_e8m0_from_f32(s2[i]), sb[i], "unchanged groups keep their scales");
    cr_assert_eq(st.n_blocks, R * G);
    cr_assert_eq(st.n_blocks_kept, R * G);
    cr_assert_eq(st.n_changed, 0);
}

/* a changed group follows the library's rule, written here in double precision: bf16 first,
 * scale 2^ceil(log2(amax / 6)), codes the nearest-even of x / scale */
Test(quant_mx, changed_group_rule)
{
    enum { C = 64 };
    uint8_t q0[C / 2], q[C / 2];
    float s0[2] = {0x1p-7f, 0x1p-6f}, s[2];
    float x[C];
    uint64_t rng = 11;
    for (int i = 0; i < C / 2; i++)
        q0[i] = (uint8_t)(th_rand_u64(&rng) >> 56);
    lm_mxfp4_dequant(q0, s0, 1, C, x);
    for (int i = 32; i < C; i++) /* the second group changes (values off the bf16 grid too) */
        x[i] = (float)(th_rand_uniform(&rng) * 0.3);
    lm_qstats st = {0};
    lm_mxfp4_requant(x, q0, s0, 1, C, q, s, &st);
    cr_assert_eq(memcmp(q, q0, 16), 0, "the first group is kept");
    cr_assert_eq(s[0], s0[0]);
    cr_assert_eq(st.n_blocks_kept, 1);
    double amax = 0, xb[32];
    for (int i = 0; i < 32; i++) {
        uint32_t u;
        memcpy(&u, &x[32 + i], 4);
        u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
        float f;
        memcpy(&f, &u, 4);
        xb[i] = f;
        amax = fmax(amax, fabs(xb[i]));
    }
    int e = (int)ceil(log2(amax / 6.0));
    cr_assert_eq(lm_e8m0_from_f32(s[1]), (unsigned)(e + 127), "scale %u, want %d", lm_e8m0_from_f32(s[1]), e + 127);
    for (int i = 0; i < 32; i++) {
        unsigned c = (i & 1) ? q[16 + i / 2] >> 4 : q[16 + i / 2] & 15;
        cr_assert_eq(c, e2m1_nearest(ldexp(xb[i], -e)), "element %d: code %u, want %u", i, c,
                     e2m1_nearest(ldexp(xb[i], -e)));
    }
    cr_assert(st.err_max > 0 && st.err_max <= 0.34, "error at most half a step (1) over amax (> 3): %g",
              st.err_max);
}

/* ---- merges into generated gpt-oss-shaped checkpoints --------------------------------------- */
typedef th_qfx mx_fx;

/* bench/gen_model --quant Q --experts 4 (gpt-oss MXFP4, or FP8 expert stacks) */
static void mx_gen(mx_fx *f, const char *quant, const char *extra)
{
    char args[3000];
    snprintf(args, sizeof args, "--hidden 64 --inter 96 --layers 2 --vocab 32 --heads 4 --kv-heads 2 "
             "--rank 4 --experts 4 --quant %s %s", quant, extra ? extra : "");
    th_qgen(f, args);
}

/* tests/quant/mx_ref.py MODE ARGS... (th_quant_ref) */
static void mx_ref(const char *args)
{
    th_quant_ref("mx_ref.py", args);
}

static int file_has(const char *path, const char *needle)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot read %s", path);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return strstr(buf, needle) != NULL;
}

Test(quant_mx, mxfp4_keep_and_dtype)
{
    mx_fx f;
    mx_gen(&f, "mxfp4", NULL);
    char out[1200], out2[1200], outd[1200], a[1300], b[1300], args[4000];
    snprintf(out, sizeof out, "%s/out", f.tmp);
    snprintf(out2, sizeof out2, "%s/out2", f.tmp);
    snprintf(outd, sizeof outd, "%s/outd", f.tmp);
    th_run_result r = th_runv("-q", f.base, f.ad, out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    r = th_runv("-q", "--threads", "1", "--tile-elems", "64", f.base, f.ad, out2, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    snprintf(a, sizeof a, "%s/model.safetensors", out);
    snprintf(b, sizeof b, "%s/model.safetensors", out2);
    cr_assert(th_files_equal(a, b), "thread count or tile size changed the bytes");
    th_st st;
    cr_assert_eq(th_st_read(a, &st), 0);
    const th_tensor *w = th_st_find(&st, "model.layers.1.mlp.experts.gate_up_proj_blocks");
    const th_tensor *s = th_st_find(&st, "model.layers.1.mlp.experts.gate_up_proj_scales");
    cr_assert(w != NULL && s != NULL && strcmp(w->dtype, "U8") == 0 && w->n_dims == 4 && w->shape[3] == 16);
    th_st_free(&st);
    snprintf(a, sizeof a, "%s/config.json", out);
    cr_assert(file_has(a, "\"quant_method\": \"mxfp4\""), "quantization_config must stay");
    r = th_runv("-q", "--dtype", "bf16", f.base, f.ad, outd, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    snprintf(a, sizeof a, "%s/model.safetensors", outd);
    cr_assert_eq(th_st_read(a, &st), 0);
    cr_assert_null(th_st_find(&st, "model.layers.1.mlp.experts.gate_up_proj_scales"), "scales must be dropped");
    w = th_st_find(&st, "model.layers.1.mlp.experts.gate_up_proj");
    cr_assert(w != NULL && strcmp(w->dtype, "BF16") == 0 && w->n_dims == 3, "gate_up_proj BF16 3-D expected");
    cr_assert(w->shape[0] == 4 && w->shape[1] == 64 && w->shape[2] == 192, "gpt-oss's [E, in, out]");
    th_st_free(&st);
    snprintf(a, sizeof a, "%s/config.json", outd);
    cr_assert(!file_has(a, "quantization_config"), "quantization_config must go");
    snprintf(args, sizeof args, "keep '%s' '%s' '%s'", f.base, f.ad, out);
    mx_ref(args);
    snprintf(args, sizeof args, "dtype '%s' '%s' '%s'", f.base, f.ad, outd);
    mx_ref(args);
    th_qfx_free(&f);
}

/* an adapter whose expert 1 has a zero delta: its groups keep their bytes (report: kept) */
Test(quant_mx, mxfp4_unchanged_expert_identical)
{
    mx_fx f;
    mx_gen(&f, "mxfp4", NULL);
    char out[1200], args[4000];
    snprintf(out, sizeof out, "%s/out", f.tmp);
    snprintf(args, sizeof args, "zero-expert '%s' 1", f.ad);
    mx_ref(args);
    th_run_result r = th_runv("--json", f.base, f.ad, out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    /* gate_up_proj: 4 experts x 192 rows x 2 groups, expert 1's 384 kept */
    cr_assert(strstr(r.out, "\"requantized\":{\"blocks\":1536,\"blocks_kept\":384,") != NULL, "%s", r.out);
    th_run_free(&r);
    snprintf(args, sizeof args, "keep '%s' '%s' '%s'", f.base, f.ad, out);
    mx_ref(args);
    th_qfx_free(&f);
}

/* E8M0 edge scales in the base: 0 (2^-127, values 2^-128 ..) and 255 (NaN, its group stays NaN,
 * bytes kept) */
Test(quant_mx, mxfp4_edge_scales)
{
    mx_fx f;
    mx_gen(&f, "mxfp4", NULL);
    char out[1200], args[4000];
    snprintf(out, sizeof out, "%s/out", f.tmp);
    snprintf(args, sizeof args, "edit '%s' model.layers.0.mlp.experts.down_proj_scales set 0,0,0 0", f.base);
    mx_ref(args);
    snprintf(args, sizeof args, "edit '%s' model.layers.0.mlp.experts.down_proj_scales set 2,5,1 255", f.base);
    mx_ref(args);
    th_run_result r = th_runv("-q", f.base, f.ad, out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    snprintf(args, sizeof args, "keep '%s' '%s' '%s'", f.base, f.ad, out);
    mx_ref(args);
    th_qfx_free(&f);
}

static void mx_refused(mx_fx *f, const char *edit, const char *want1, const char *want2)
{
    char out[1200], args[4000];
    snprintf(out, sizeof out, "%s/out", f->tmp);
    snprintf(args, sizeof args, "edit '%s' %s", f->base, edit);
    mx_ref(args);
    th_run_result r = th_runv("-q", f->base, f->ad, out, NULL);
    cr_assert_neq(r.status, 0, "accepted; want a refusal naming %s", want1);
    cr_assert(strstr(r.err, want1) != NULL && strstr(r.err, want2) != NULL, "stderr: %s", r.err);
    cr_assert(strchr(r.err, '\n') == r.err + strlen(r.err) - 1, "one line: %s", r.err);
    cr_assert(!th_exists(out), "an output was left");
    th_run_free(&r);
}

Test(quant_mx, mxfp4_refusals)
{
    static const struct {
        const char *edit, *want1, *want2;
    } cases[] = {
        {"model.layers.1.mlp.experts.down_proj_scales drop", "model.layers.1.mlp.experts.down_proj_scales",
         "no scale tensor"},
        {"model.layers.1.mlp.experts.down_proj_scales shape 4,64,2", "expected [4, 64, 3]", "down_proj_scales"},
        {"model.layers.0.mlp.experts.gate_up_proj_scales dtype F32", "gate_up_proj_scales", "U8 (E8M0)"},
        {"model.layers.0.mlp.experts.gate_up_proj_blocks shape 4,192,4,8", "gate_up_proj_blocks", "[4, 192, 4, 8]"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        mx_fx f;
        mx_gen(&f, "mxfp4", NULL);
        mx_refused(&f, cases[i].edit, cases[i].want1, cases[i].want2);
        th_qfx_free(&f);
    }
}

Test(quant_mx, mxfp4_inspect)
{
    mx_fx f;
    mx_gen(&f, "mxfp4", "--no-adapter");
    th_run_result r = th_runv("inspect", f.base, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.out, "quantization: MXFP4 (E2M1 blocks, E8M0 scales per 32), quant_method mxfp4, "
                            "4 quantized weights") != NULL, "%s", r.out);
    th_run_free(&r);
    th_qfx_free(&f);
}

/* ---- block FP8 expert parameters ------------------------------------------------------------ */
/* transformers' FP8Experts stacks (P F8_E4M3 [E, out, in], P_scale_inv [E, out/B, in/B]) and
 * Qwen3-FP8's per-expert weights, merged through target_parameters: kept FP8 and --dtype f32 */
Test(quant_mx, fp8_expert_stacks_and_per_expert)
{
    static const char *const layouts[] = {"--fused-experts", ""};
    for (size_t k = 0; k < 2; k++) {
        mx_fx f;
        char extra[100], out[1200], outd[1200], args[4000];
        snprintf(extra, sizeof extra, "--block 32 %s", layouts[k]);
        mx_gen(&f, "fp8", extra);
        snprintf(out, sizeof out, "%s/out", f.tmp);
        snprintf(outd, sizeof outd, "%s/outd", f.tmp);
        th_run_result r = th_runv("-q", f.base, f.ad, out, NULL);
        cr_assert_eq(r.status, 0, "%s: exit %d: %s", layouts[k], r.status, r.err);
        th_run_free(&r);
        r = th_runv("-q", "--dtype", "f32", f.base, f.ad, outd, NULL);
        cr_assert_eq(r.status, 0, "%s: exit %d: %s", layouts[k], r.status, r.err);
        th_run_free(&r);
        snprintf(args, sizeof args, "fp8-experts keep '%s' '%s' '%s'", f.base, f.ad, out);
        mx_ref(args);
        snprintf(args, sizeof args, "fp8-experts dtype '%s' '%s' '%s'", f.base, f.ad, outd);
        mx_ref(args);
        th_qfx_free(&f);
    }
}

/* an expert stack whose rows per expert are not whole blocks: refused in one line */
Test(quant_mx, fp8_expert_stack_partial_block_refused)
{
    mx_fx f;
    mx_gen(&f, "fp8", "--block 128 --fused-experts");
    char out[1200];
    snprintf(out, sizeof out, "%s/out", f.tmp);
    th_run_result r = th_runv("-q", f.base, f.ad, out, NULL);
    cr_assert_neq(r.status, 0, "accepted");
    cr_assert(strstr(r.err, "experts.gate_up_proj' has 192 rows per expert, not a multiple of the block's 128") != NULL,
              "%s", r.err);
    cr_assert(!th_exists(out), "an output was left");
    th_run_free(&r);
    th_qfx_free(&f);
}

/* a square down_proj [E, H, H] (gpt-oss-20b's is 2880 x 2880): with gate_up_proj in the adapter,
 * and alone (PEFT >= 0.19 cannot tell [E, in, out] from [E, out, in] by the shapes; gpt-oss's
 * experts are is_transposed) */
Test(quant_mx, mxfp4_square_down_proj)
{
    for (int alone = 0; alone < 2; alone++) {
        mx_fx f;
        char out[1200], args[4000];
        th_qgen(&f, "--hidden 64 --inter 64 --layers 1 --vocab 32 --heads 4 --kv-heads 2 --rank 4 --experts 2 "
                "--quant mxfp4");
        if (alone) {
            snprintf(args, sizeof args, "only-down '%s'", f.ad);
            mx_ref(args);
        }
        snprintf(out, sizeof out, "%s/out", f.tmp);
        th_run_result r = th_runv("-q", f.base, f.ad, out, NULL);
        cr_assert_eq(r.status, 0, "alone %d: exit %d: %s", alone, r.status, r.err);
        th_run_free(&r);
        snprintf(args, sizeof args, "keep '%s' '%s' '%s'", f.base, f.ad, out);
        mx_ref(args);
        th_qfx_free(&f);
    }
}
