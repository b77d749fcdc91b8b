/* SPDX-License-Identifier: MIT */
/* test_quant_bnb.c : bitsandbytes bases and --simulate-nf4.  The codecs against bitsandbytes'
 * definitions restated here in double precision (every code of both nibbles, the nested absmax,
 * every int8 code, the NF4 quantizer's thresholds and ties); merges into generated checkpoints
 * (bench/gen_model --quant bnb-*, or a 16-bit base for --simulate-nf4) checked by an independent
 * numpy reference (tests/quant/bnb_ref.py; skipped visibly without /usr/bin/python3 + numpy);
 * and the refusals. */
#include "quant_bnb.h"
#include "th.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* functional.py get_4bit_type("nf4"): the data list as written there */
static const double NF4_DEF[16] = {-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                                   -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                                   0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                                   0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                                   0.7229568362236023, 1.0};

/* get_4bit_type("fp4"): create_fp8_map(signed, 2 exponent bits, 1 mantissa bit) in bit-pattern
 * order, [0, 0.0625, 8, 12, 4, 6, 2, 3] and their negatives, divided in f32 by the maximum 12 */
static float fp4_def(unsigned c)
{
    static const float mag[8] = {0.0f, 0.0625f, 8.0f, 12.0f, 4.0f, 6.0f, 2.0f, 3.0f};
    volatile float twelve = 12.0f; /* an f32 division, as torch's div_ */
    float v = mag[c & 7] / twelve;
    return (c & 8) ? -v : v;
}

Test(quant_bnb, code_tables)
{
    for (unsigned c = 0; c < 16; c++) {
        cr_assert_eq(LM_BNB_NF4[c], (float)NF4_DEF[c], "NF4 code %u: %a, want %a", c, (double)LM_BNB_NF4[c],
                     (double)(float)NF4_DEF[c]);
        float want = fp4_def(c);
        cr_assert_eq(LM_BNB_FP4[c], want, "FP4 code %u: %a, want %a", c, (double)LM_BNB_FP4[c], (double)want);
        cr_assert_eq(!!signbit(LM_BNB_FP4[c]), !!(c & 8), "FP4 code %u: sign (0b1000 is -0)", c);
        if (c > 0)
            cr_assert(LM_BNB_NF4[c] > LM_BNB_NF4[c - 1], "NF4 is sorted");
    }
    cr_assert_eq(LM_BNB_NF4[7], 0.0f);
    cr_assert_eq(LM_BNB_FP4[3], 1.0f);
    cr_assert_eq(LM_BNB_FP4[1], 0.0625f / 12.0f);
}

/* every byte in every position of a block, both tables, starts on odd elements, blocks cut by
 * the end: against code[nibble] * absmax of the element's block in double, rounded once to f32 */
Test(quant_bnb, dequant_every_code)
{
    enum { NB = 256 + 3, NE = 2 * NB - 1, BS = 64 };
    uint8_t packed[NB];
    float absmax[(NE + BS - 1) / BS], out[NE];
    for (unsigned i = 0; i < NB; i++)
        packed[i] = (uint8_t)(i * 37u + 11u); /* every byte value (37 is odd) */
    for (size_t b = 0; b < sizeof absmax / sizeof *absmax; b++)
        absmax[b] = (float)(0.01 * (1.0 + 0.37 * (double)b)) * (b == 3 ? 1e-30f : 1.0f); /* one tiny block */
    for (int t = 0; t < 2; t++) {
        const float *code = t ? LM_BNB_FP4 : LM_BNB_NF4;
        for (uint64_t e0 = 0; e0 < 3; e0++)
            for (uint64_t n = 0; e0 + n <= NE; n += n < 5 ? 1 : 61) {
                memset(out, 0x55, sizeof out);
                lm_bnb4_dequant(code, packed + e0 / 2, absmax, BS, e0, n, out);
                for (uint64_t k = 0; k < n; k++) {
                    uint64_t e = e0 + k;
                    unsigned q = (e & 1) ? packed[e / 2] & 15u : packed[e / 2] >> 4; /* first element: high nibble */
                    double want = (double)(t ? fp4_def(q) : (float)NF4_DEF[q]) * (double)absmax[e / BS];
                    cr_assert_eq(out[k], (float)want, "table %d e0 %llu n %llu element %llu", t,
                                 (unsigned long long)e0, (unsigned long long)n, (unsigned long long)e);
                    cr_assert_eq(!!signbit(out[k]), !!signbit((float)want), "sign of element %llu",
                                 (unsigned long long)e);
                }
                cr_assert_eq(((uint32_t *)(void *)out)[n], 0x55555555u, "wrote past n");
            }
    }
}

/* double quantization: absmax = f32(f32(map[q] * absmax2[i / bs2]) + offset) */
Test(quant_bnb, nested_absmax)
{
    enum { N = 700, BS2 = 256 };
    uint8_t q[N];
    float map[256], a2[3], out[N];
    for (int i = 0; i < 256; i++)
        map[i] = (float)(-1.0 + 2.0 * i / 255.0);
    for (int i = 0; i < N; i++)
        q[i] = (uint8_t)((i * 101) & 255);
    a2[0] = 0.013f;
    a2[1] = 0.5f;
    a2[2] = 3e-5f;
    const float off = 0.0123456789f;
    lm_bnb_nested_absmax(q, N, map, a2, BS2, off, out);
    for (int i = 0; i < N; i++) {
        float prod = (float)((double)map[q[i]] * (double)a2[i / BS2]);
        cr_assert_eq(out[i], (float)((double)prod + (double)off), "absmax %d", i);
    }
}

/* int8_vectorwise_dequant: (q * SCB) * 7.874015718698502e-3, each product an f32 */
Test(quant_bnb, int8_every_code)
{
    enum { R = 3, C = 256 };
    int8_t q[R * C];
    float scb[R] = {0.25f, 1.7f, 123.456f}, out[R * C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            q[r * C + c] = (int8_t)(c - 128);
    lm_bnb_int8_dequant(q, scb, R, C, out);
    const double k = (double)(float)7.874015718698502e-3;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float p = (float)((double)q[r * C + c] * (double)scb[r]);
            cr_assert_eq(out[r * C + c], (float)((double)p * k), "row %d code %d", r, c - 128);
        }
    int n_differ = 0; /* the rule is not q * SCB / 127 rounded once: 152 of these 768 values differ */
    for (int i = 0; i < R * C; i++)
        n_differ += out[i] != (float)((double)q[i] * (double)scb[i / C] / 127.0);
    cr_assert_eq(n_differ, 152, "%d", n_differ);
}

/* kernels.cu dQuantizeNF4's thresholds, ascending, as written there: float literals, so each
 * decimal is rounded once to f32 (strtof; through a double, -0.8480964004993439 would come out
 * one ulp off); the code is how many are below x */
static const char *const NF4_THRESH_TEXT[15] = {"-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906",
                                                "-0.33967943489551544", "-0.23460740596055984", "-0.13791173323988914",
                                                "-0.045525018125772476", "0.03979014977812767", "0.1202552504837513",
                                                "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
                                                "0.5016634166240692", "0.6427869200706482", "0.8614784181118011"};

static float nf4_thresh(int i)
{
    return strtof(NF4_THRESH_TEXT[i], NULL);
}

static unsigned nf4_count(float x)
{
    unsigned c = 0;
    for (int i = 0; i < 15; i++)
        c += x > nf4_thresh(i);
    return c;
}

Test(quant_bnb, nf4_quantizer_thresholds_and_ties)
{
    for (int i = 0; i < 15; i++) {
        float t = nf4_thresh(i);
        cr_assert_eq(lm_bnb_nf4_code(t), (unsigned)i, "a value on threshold %d takes the lower code", i);
        cr_assert_eq(lm_bnb_nf4_code(nextafterf(t, 2.0f)), (unsigned)i + 1, "just above threshold %d", i);
        cr_assert_eq(lm_bnb_nf4_code(nextafterf(t, -2.0f)), (unsigned)i, "just below threshold %d", i);
        /* the thresholds are (near) the midpoints of neighbouring codes */
        cr_assert(fabs((double)t - (NF4_DEF[i] + NF4_DEF[i + 1]) / 2) < 1e-7, "threshold %d", i);
    }
    cr_assert_eq(lm_bnb_nf4_code(NAN), 0u, "NaN: every comparison false");
    cr_assert_eq(lm_bnb_nf4_code(0.0f), 7u);
    cr_assert_eq(lm_bnb_nf4_code(-0.0f), 7u);
    cr_assert_eq(lm_bnb_nf4_code(1.5f), 15u);
    cr_assert_eq(lm_bnb_nf4_code(-1.5f), 0u);
    uint64_t rng = 99;
    for (int k = 0; k < 200000; k++) {
        float x = (float)(2.2 * th_rand_uniform(&rng) - 1.1);
        cr_assert_eq(lm_bnb_nf4_code(x), nf4_count(x), "%a", (double)x);
    }
}

/* a block through the round trip: amax, x * (1 / amax) in f32, the code, code * amax; a zero
 * block gives -0; a partial last block has its own amax */
Test(quant_bnb, nf4_roundtrip_blocks)
{
    enum { N = 64 * 3 + 5 };
    float x[N], y[N];
    uint64_t rng = 5;
    for (int i = 0; i < N; i++)
        x[i] = (float)(0.1 * (2 * th_rand_uniform(&rng) - 1));
    for (int i = 64; i < 128; i++)
        x[i] = 0.0f;
    x[195] = 3.0f;
    memcpy(y, x, sizeof x);
    lm_bnb_nf4_roundtrip(y, N, 64, NULL, 0);
    for (int b0 = 0; b0 < N; b0 += 64) {
        int m = b0 + 64 <= N ? 64 : N - b0;
        float amax = 0;
        for (int i = 0; i < m; i++)
            amax = fmaxf(amax, fabsf(x[b0 + i]));
        for (int i = 0; i < m; i++) {
            float want;
            if (amax == 0) {
                want = -0.0f;
            } else {
                float s = x[b0 + i] * (1.0f / amax);
                want = (float)((double)LM_BNB_NF4[nf4_count(s)] * (double)amax);
            }
            cr_assert_eq(y[b0 + i], want, "element %d", b0 + i);
            cr_assert_eq(!!signbit(y[b0 + i]), !!signbit(want), "sign of element %d", b0 + i);
        }
    }
    cr_assert_eq(y[195], 3.0f, "the block's amax is exact");
    /* rounded to bf16: the f32 values rounded to nearest even */
    float z[N];
    memcpy(z, x, sizeof x);
    lm_bnb_nf4_roundtrip(z, N, 64, NULL, 1);
    for (int i = 0; i < N; i++) {
        uint32_t u;
        memcpy(&u, &y[i], 4);
        u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
        float w;
        memcpy(&w, &u, 4);
        cr_assert_eq(z[i], w, "bf16 element %d", i);
    }
}

/* ---- merges ------------------------------------------------------------------------------------ */
typedef th_qfx bq_fx;

static void bq_gen(bq_fx *f, const char *args_)
{
    char args[3000];
    snprintf(args, sizeof args, "--hidden 48 --inter 72 --layers 2 --vocab 32 --heads 4 --kv-heads 2 --rank 4 "
             "--alpha 32 %s", args_);
    th_qgen(f, args);
}

/* tests/quant/bnb_ref.py MODE ARGS (th_quant_ref) */
static void bq_ref(const char *mode, const char *args)
{
    char a[5000];
    snprintf(a, sizeof a, "%s %s", mode, args);
    th_quant_ref("bnb_ref.py", a);
}

/* the merged weights of 16-bit bases (bf16, f16, f32) are the NF4 round trips of the base plus
 * the delta (numpy); one thread and tiny tiles (rows 48 and 72 wide: tiles start on a block)
 * give the same bytes */
Test(quant_bnb, simulate_nf4_merges)
{
    static const char *const dts[] = {"bf16", "f16", "f32"};
    for (size_t d = 0; d < 3; d++) {
        bq_fx f;
        char args[64], out[1200], out2[1200], a[1300], b[1300], refargs[4000];
        snprintf(args, sizeof args, "--dtype %s", dts[d]);
        bq_gen(&f, args);
        snprintf(out, sizeof out, "%s/out", f.tmp);
        snprintf(out2, sizeof out2, "%s/out2", f.tmp);
        th_run_result r = th_runv("--simulate-nf4", f.base, f.ad, out, NULL);
        cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
        cr_assert(strstr(r.err, "--simulate-nf4: 14 weights merged into their bitsandbytes NF4 round trip") != NULL,
                  "%s", r.err);
        th_run_free(&r);
        r = th_runv("-q", "--simulate-nf4", "--threads", "1", "--tile-elems", "40", f.base, f.ad, out2, NULL);
        cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
        th_run_free(&r);
        snprintf(a, sizeof a, "%s/model.safetensors", out);
        snprintf(b, sizeof b, "%s/model.safetensors", out2);
        cr_assert(th_files_equal(a, b), "%s: thread count or tile size changed the bytes", dts[d]);
        snprintf(refargs, sizeof refargs, "'%s' '%s' '%s'", f.base, f.ad, out);
        bq_ref("simulate", refargs);
        th_qfx_free(&f);
    }
}

/* --simulate-nf4=double (bnb_4bit_use_double_quant): the absmax of each block of 64 through
 * bitsandbytes' double quantization (mean offset, 8-bit dynamic map over blocks of 256) before the
 * NF4 round trip; weights of 768 blocks (three nested blocks), the same bytes for any thread count
 * and tile size, checked by tests/quant/bnb_ref.py simulate-double, and not the plain round trip */
Test(quant_bnb, simulate_nf4_double_quant)
{
    bq_fx f;
    char out[1200], out2[1200], out3[1200], a[1300], b[1300], refargs[4000];
    bq_gen(&f, "--dtype bf16 --hidden 256 --inter 192 --layers 1 --targets all");
    snprintf(out, sizeof out, "%s/out", f.tmp);
    snprintf(out2, sizeof out2, "%s/out2", f.tmp);
    snprintf(out3, sizeof out3, "%s/out3", f.tmp);
    th_run_result r = th_runv("--simulate-nf4=double", f.base, f.ad, out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "NF4 round trip (blocks of 64, absmax double-quantized)") != NULL, "%s", r.err);
    th_run_free(&r);
    r = th_runv("-q", "--simulate-nf4=double", "--threads", "1", "--tile-elems", "40", f.base, f.ad, out2, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    snprintf(a, sizeof a, "%s/model.safetensors", out);
    snprintf(b, sizeof b, "%s/model.safetensors", out2);
    cr_assert(th_files_equal(a, b), "thread count or tile size changed the bytes");
    r = th_runv("-q", "--simulate-nf4", f.base, f.ad, out3, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    snprintf(b, sizeof b, "%s/model.safetensors", out3);
    cr_assert(!th_files_equal(a, b), "double quantization changed nothing");
    snprintf(refargs, sizeof refargs, "'%s' '%s' '%s'", f.base, f.ad, out);
    bq_ref("simulate-double", refargs);
    r = th_runv("-q", "--simulate-nf4=triple", f.base, f.ad, out3, NULL);
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "--simulate-nf4=triple: the only value is 'double'") != NULL, "%s", r.err);
    th_run_free(&r);
    th_qfx_free(&f);
}

Test(quant_bnb, simulate_nf4_refusals)
{
    bq_fx f;
    bq_gen(&f, "--quant bnb-nf4");
    char out[1200];
    snprintf(out, sizeof out, "%s/out", f.tmp);
    th_run_result r = th_runv("-q", "--simulate-nf4", f.base, f.ad, out, NULL);
    cr_assert_neq(r.status, 0, "accepted");
    cr_assert(strstr(r.err, "--simulate-nf4 is for a 16-bit base") != NULL && strstr(r.err, "bitsandbytes") != NULL,
              "%s", r.err);
    cr_assert(strchr(r.err, '\n') == strrchr(r.err, '\n'), "one line: %s", r.err);
    cr_assert(!th_exists(out), "an output was left");
    th_run_free(&r);
    th_qfx_free(&f);
}

/* ---- bitsandbytes bases ----------------------------------------------------------------------- */
static void bq_merge_check(const char *gen_args, const char *dtype_opt, const char *want_dtype, const char *inspect)
{
    bq_fx f;
    bq_gen(&f, gen_args);
    char out[1200], out2[1200], a[1300], b[1300], refargs[4000];
    snprintf(out, sizeof out, "%s/out", f.tmp);
    snprintf(out2, sizeof out2, "%s/out2", f.tmp);
    th_run_result r = dtype_opt ? th_runv("-q", "--dtype", dtype_opt, f.base, f.ad, out, NULL)
                                : th_runv("-q", f.base, f.ad, out, NULL);
    cr_assert_eq(r.status, 0, "%s: exit %d: %s", gen_args, r.status, r.err);
    th_run_free(&r);
    r = dtype_opt ? th_runv("-q", "--threads", "1", "--tile-elems", "50", "--dtype", dtype_opt, f.base, f.ad, out2, NULL)
                  : th_runv("-q", "--threads", "1", "--tile-elems", "50", f.base, f.ad, out2, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    snprintf(a, sizeof a, "%s/model.safetensors", out);
    snprintf(b, sizeof b, "%s/model.safetensors", out2);
    cr_assert(th_files_equal(a, b), "%s: thread count or tile size changed the bytes", gen_args);
    th_st st;
    cr_assert_eq(th_st_read(a, &st), 0);
    const th_tensor *w = th_st_find(&st, "model.layers.1.mlp.down_proj.weight");
    cr_assert_not_null(w);
    cr_assert_str_eq(w->dtype, want_dtype);
    cr_assert(w->n_dims == 2 && w->shape[0] == 48 && w->shape[1] == 72, "down_proj comes out [48, 72]");
    for (size_t i = 0; i < st.n; i++)
        cr_assert(strstr(st.t[i].name, "absmax") == NULL && strstr(st.t[i].name, "quant_") == NULL &&
                      strstr(st.t[i].name, ".SCB") == NULL && strstr(st.t[i].name, "weight_format") == NULL,
                  "quant-state tensor '%s' written", st.t[i].name);
    th_st_free(&st);
    snprintf(a, sizeof a, "%s/config.json", out);
    size_t n;
    uint8_t *raw = th_read_file(a, &n); /* not NUL-terminated */
    cr_assert_not_null(raw);
    char *cfg = calloc(1, n + 1);
    memcpy(cfg, raw, n);
    free(raw);
    cr_assert(strstr(cfg, "quantization_config") == NULL, "quantization_config must go: %s", cfg);
    free(cfg);
    r = th_runv("inspect", f.base, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.out, inspect) != NULL, "inspect: %s", r.out);
    th_run_free(&r);
    snprintf(refargs, sizeof refargs, "'%s' '%s' '%s' %s", f.base, f.ad, out, want_dtype);
    bq_ref("dequant", refargs);
    th_qfx_free(&f);
}

Test(quant_bnb, nf4_base)
{
    bq_merge_check("--quant bnb-nf4 --targets qv", NULL, "BF16", "quantization: bitsandbytes 4-bit NF4, blocks of 64, quant_method "
                   "bitsandbytes, 14 quantized weights; merged output dequantized to BF16");
}

Test(quant_bnb, nf4_nested_base_f16)
{
    bq_merge_check("--quant bnb-nf4 --nested --dtype f16", NULL, "F16", "quantization: bitsandbytes 4-bit NF4, blocks "
                   "of 64, nested absmax (double quant), quant_method bitsandbytes, 14 quantized weights; merged output "
                   "dequantized to F16");
}

Test(quant_bnb, fp4_base_to_f32)
{
    bq_merge_check("--quant bnb-fp4 --nested", "f32", "F32", "bitsandbytes 4-bit FP4, blocks of 64, nested absmax");
}

Test(quant_bnb, int8_base)
{
    bq_merge_check("--quant bnb-int8 --targets qv", NULL, "BF16", "quantization: bitsandbytes 8-bit (I8, SCB per row), quant_method "
                   "bitsandbytes, 14 quantized weights");
}

/* llm_int8_skip_modules: the listed module is a float tensor, merged and written as it is */
Test(quant_bnb, skip_modules_kept)
{
    bq_merge_check("--quant bnb-nf4 --quant-skip o_proj", NULL, "BF16", "12 quantized weights");
}

/* ---- refusals: one line naming the tensor, no output ------------------------------------------ */
/* replaces the first `from` in model.safetensors' header by `to` (the data stays) */
static void bq_edit_header(const char *base, const char *from, const char *to)
{
    char path[1300];
    snprintf(path, sizeof path, "%s/model.safetensors", base);
    size_t n;
    uint8_t *buf = th_read_file(path, &n);
    cr_assert_not_null(buf);
    uint64_t hl;
    memcpy(&hl, buf, 8);
    char *hdr = calloc(1, hl + strlen(to) + 16);
    memcpy(hdr, buf + 8, hl);
    char *p = strstr(hdr, from);
    cr_assert_not_null(p, "'%s' not in the header", from);
    size_t nh = hl - strlen(from) + strlen(to);
    char *nhdr = calloc(1, nh + 16);
    memcpy(nhdr, hdr, (size_t)(p - hdr));
    memcpy(nhdr + (p - hdr), to, strlen(to));
    memcpy(nhdr + (p - hdr) + strlen(to), p + strlen(from), hl - (size_t)(p - hdr) - strlen(from));
    while (nh % 8)
        nhdr[nh++] = ' ';
    uint8_t *o = malloc(8 + nh + (n - 8 - hl));
    uint64_t nh64 = nh;
    memcpy(o, &nh64, 8);
    memcpy(o + 8, nhdr, nh);
    memcpy(o + 8 + nh, buf + 8 + hl, n - 8 - hl);
    cr_assert_eq(th_write_file(path, o, 8 + nh + (n - 8 - hl)), 0);
    free(o);
    free(nhdr);
    free(hdr);
    free(buf);
}

/* replaces the first `from` in the data of tensor `name` by `to` (same length) */
static void bq_edit_data(const char *base, const char *name, const void *from, const void *to, size_t len)
{
    char path[1300];
    snprintf(path, sizeof path, "%s/model.safetensors", base);
    th_st st;
    cr_assert_eq(th_st_read(path, &st), 0);
    const th_tensor *t = th_st_find(&st, name);
    cr_assert_not_null(t, "%s", name);
    size_t off = (size_t)(t->data - st.buf), k = 0;
    while (k + len <= t->n_bytes && memcmp(t->data + k, from, len) != 0)
        k++;
    cr_assert(k + len <= t->n_bytes, "pattern not in %s", name);
    memcpy(st.buf + off + k, to, len);
    cr_assert_eq(th_write_file(path, st.buf, st.n_buf), 0);
    th_st_free(&st);
}

static void bq_refused(const bq_fx *f, const char *want1, const char *want2)
{
    char out[1200];
    snprintf(out, sizeof out, "%s/out", f->tmp);
    th_run_result r = th_runv("-q", f->base, f->ad, out, NULL);
    cr_assert_neq(r.status, 0, "accepted; want a refusal naming %s", want1);
    cr_assert(strstr(r.err, want1) != NULL && strstr(r.err, want2) != NULL, "stderr: %s", r.err);
    cr_assert(strchr(r.err, '\n') == strrchr(r.err, '\n'), "one line: %s", r.err);
    cr_assert(!th_exists(out), "an output was left");
    th_run_free(&r);
}

#define QP "model.layers.0.self_attn.q_proj.weight"

Test(quant_bnb, refusals)
{
    bq_fx f;
    bq_gen(&f, "--quant bnb-nf4");
    bq_edit_header(f.base, QP ".absmax\"", QP ".absmax_gone\"");
    bq_refused(&f, QP, "has no '" QP ".absmax'");
    th_qfx_free(&f);

    bq_gen(&f, "--quant bnb-nf4");
    bq_edit_header(f.base, QP ".quant_map\"", QP ".quant_map_gone\"");
    bq_refused(&f, QP, "has no '" QP ".quant_map'");
    th_qfx_free(&f);

    bq_gen(&f, "--quant bnb-nf4"); /* 36 absmax F32 read as 72 F16 */
    bq_edit_header(f.base, "\"" QP ".absmax\":{\"dtype\":\"F32\",\"shape\":[36]",
                   "\"" QP ".absmax\":{\"dtype\":\"F16\",\"shape\":[72]");
    bq_refused(&f, QP ".absmax", "is F16 with 72 elements; the quant_state of '" QP "' needs F32 with 36");
    th_qfx_free(&f);

    bq_gen(&f, "--quant bnb-nf4"); /* a quant_map that is not bitsandbytes' table */
    float one = 1.0f, other = 0.999f;
    bq_edit_data(f.base, QP ".quant_map", &one, &other, 4);
    bq_refused(&f, QP ".quant_map", "is not bitsandbytes' NF4 table");
    th_qfx_free(&f);

    bq_gen(&f, "--quant bnb-nf4 --nested");
    bq_edit_header(f.base, QP ".nested_absmax\"", QP ".nested_gone\"");
    bq_refused(&f, QP, "has no '" QP ".nested_absmax'");
    th_qfx_free(&f);

    bq_gen(&f, "--quant bnb-nf4"); /* the JSON's shape disagrees with the packed bytes */
    bq_edit_data(f.base, QP ".quant_state.bitsandbytes__nf4", "[48, 48]", "[48, 46]", 8);
    bq_refused(&f, QP, "holds 1152 bytes; its quant_state shape [48, 46] packs into 1104");
    th_qfx_free(&f);

    bq_gen(&f, "--quant bnb-fp4"); /* quant_type in the JSON against the tensor's name */
    bq_edit_data(f.base, QP ".quant_state.bitsandbytes__fp4", "\"fp4\"", "\"nf4\"", 5);
    bq_refused(&f, QP ".quant_state.bitsandbytes__fp4", "says quant_type 'nf4'");
    th_qfx_free(&f);

    bq_gen(&f, "--quant bnb-nf4"); /* the quant_state is gone: the absmax has no weight to belong to */
    bq_edit_header(f.base, QP ".quant_state.bitsandbytes__nf4\"", QP ".qs_gone\"");
    bq_refused(&f, QP ".absmax", "has no '" QP ".quant_state.bitsandbytes__nf4'");
    th_qfx_free(&f);

    bq_gen(&f, "--quant bnb-int8"); /* SCB of the wrong length */
    bq_edit_header(f.base, "\"model.layers.0.self_attn.q_proj.SCB\":{\"dtype\":\"F32\",\"shape\":[48]",
                   "\"model.layers.0.self_attn.q_proj.SCB\":{\"dtype\":\"F16\",\"shape\":[96]");
    bq_refused(&f, "model.layers.0.self_attn.q_proj.SCB", "needs F32 with 48 (one per row)");
    th_qfx_free(&f);
}
