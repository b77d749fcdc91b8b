/* SPDX-License-Identifier: MIT */
/* test_merge_math.c : merges of generated models checked against a double-precision reference
 * computed here: convolution LoRA (Conv1d/2d/3d kernels, which the golden set lacks), several
 * adapters with weights summed and rounded once, adapter keys that keep the adapter name, --dtype,
 * and a sharded base.  No ../shared needed. */
#include "th.h"

#include "lora_merge.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    char name[160];
    int n_dims;
    uint64_t shape[8];
    uint64_t n;
    double *v;
} mm_t;

static uint64_t mm_seed = 777;

static mm_t mm_make(const char *name, int n_dims, const uint64_t *shape, double sd, const char *dtype)
{
    mm_t t;
    memset(&t, 0, sizeof t);
    snprintf(t.name, sizeof t.name, "%s", name);
    t.n_dims = n_dims;
    t.n = 1;
    for (int d = 0; d < n_dims; d++) {
        t.shape[d] = shape[d];
        t.n *= shape[d];
    }
    t.v = malloc(t.n * sizeof(double));
    for (uint64_t i = 0; i < t.n; i++)
        t.v[i] = th_round_to(sd * th_rand_normal(&mm_seed), dtype);
    return t;
}

static void mm_write(const char *path, mm_t *t, size_t n, const char *dtype)
{
    th_out_tensor *o = calloc(n, sizeof *o);
    for (size_t i = 0; i < n; i++) {
        o[i].name = t[i].name;
        o[i].dtype = dtype;
        o[i].n_dims = t[i].n_dims;
        memcpy(o[i].shape, t[i].shape, sizeof o[i].shape);
        o[i].values = t[i].v;
    }
    cr_assert_eq(th_st_write(path, o, n), 0, "cannot write %s", path);
    free(o);
}

static void mm_adapter(const char *dir, mm_t *t, size_t n, const char *config)
{
    char p[1024];
    mkdir(dir, 0777);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    mm_write(p, t, n, "F32");
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    cr_assert_eq(th_write_file(p, config, strlen(config)), 0);
}

/* ref[o, rest] += s * sum_k B[o, k] * A[k, rest] */
static void mm_add_lowrank(double *ref, const mm_t *A, const mm_t *B, double s)
{
    uint64_t r = A->shape[0], in = A->n / r, out = B->shape[0];
    for (uint64_t o = 0; o < out; o++)
        for (uint64_t i = 0; i < in; i++) {
            double acc = 0;
            for (uint64_t k = 0; k < r; k++)
                acc += B->v[o * r + k] * A->v[k * in + i];
            ref[o * in + i] += s * acc;
        }
}

static void mm_check(const char *out_path, const char *name, const char *dtype, const double *ref, uint64_t n)
{
    th_st st;
    cr_assert_eq(th_st_read(out_path, &st), 0, "output unreadable");
    const th_tensor *t = th_st_find(&st, name);
    cr_assert_not_null(t, "no %s in the output", name);
    cr_assert_str_eq(t->dtype, dtype);
    cr_assert_eq(t->n_elems, n);
    double *v = th_to_f64(t);
    th_cmp c = th_compare(dtype, v, ref, (size_t)n);
    cr_assert(c.ok, "%s: %s", name, c.why);
    free(v);
    th_st_free(&st);
}

static void mm_merge_ok(const char *const *argv)
{
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
}

Test(merge_math, conv_lora_1d_2d_3d)
{
    const char *dts[] = {"BF16", "F16", "F32"};
    for (int di = 0; di < 3; di++) {
        const char *dt = dts[di];
        char *tmp = th_tmpdir(), base[512], ad[512], out[512];
        snprintf(base, sizeof base, "%s/base.safetensors", tmp);
        snprintf(ad, sizeof ad, "%s/adapter", tmp);
        snprintf(out, sizeof out, "%s/out.safetensors", tmp);
        uint64_t w1[] = {12, 5, 3}, w2[] = {16, 6, 3, 3}, w3[] = {8, 4, 2, 3, 3}, w4[] = {10, 6, 1, 1};
        mm_t b[4] = {mm_make("net.c1.weight", 3, w1, 0.05, dt), mm_make("net.c2.weight", 4, w2, 0.05, dt),
                     mm_make("net.c3.weight", 5, w3, 0.05, dt), mm_make("net.pw.weight", 4, w4, 0.05, dt)};
        mm_write(base, b, 4, dt);
        uint64_t a1[] = {4, 5, 3}, b1[] = {12, 4, 1}, a2[] = {4, 6, 3, 3}, b2[] = {16, 4, 1, 1};
        uint64_t a3[] = {4, 4, 2, 3, 3}, b3[] = {8, 4, 1, 1, 1}, a4[] = {4, 6, 1, 1}, b4[] = {10, 4, 1, 1};
        mm_t a[8] = {mm_make("base_model.model.net.c1.lora_A.weight", 3, a1, 0.2, "F32"),
                     mm_make("base_model.model.net.c1.lora_B.weight", 3, b1, 0.2, "F32"),
                     mm_make("base_model.model.net.c2.lora_A.weight", 4, a2, 0.2, "F32"),
                     mm_make("base_model.model.net.c2.lora_B.weight", 4, b2, 0.2, "F32"),
                     mm_make("base_model.model.net.c3.lora_A.weight", 5, a3, 0.2, "F32"),
                     mm_make("base_model.model.net.c3.lora_B.weight", 5, b3, 0.2, "F32"),
                     mm_make("base_model.model.net.pw.lora_A.weight", 4, a4, 0.2, "F32"),
                     mm_make("base_model.model.net.pw.lora_B.weight", 4, b4, 0.2, "F32")};
        mm_adapter(ad, a, 8,
                   "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 6, \"target_modules\": [\"c1\", \"c2\", \"c3\", \"pw\"]}");
        const char *argv[] = {th_bin(), "-q", base, ad, out, NULL};
        mm_merge_ok(argv);
        for (int k = 0; k < 4; k++) {
            double *ref = malloc(b[k].n * sizeof(double));
            memcpy(ref, b[k].v, b[k].n * sizeof(double));
            mm_add_lowrank(ref, &a[2 * k], &a[2 * k + 1], 6.0 / 4.0);
            mm_check(out, b[k].name, dt, ref, b[k].n);
            free(ref);
            free(b[k].v);
        }
        for (int k = 0; k < 8; k++)
            free(a[k].v);
        th_rmrf(tmp);
        free(tmp);
    }
}

/* three adapters, weights 1 (via --scale 0.5), -0.75, 2: one rounding of the f32 sum */
Test(merge_math, weighted_adapters_round_once)
{
    char *tmp = th_tmpdir(), base[512], a1[512], a2[512], a3[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(a1, sizeof a1, "%s/a1", tmp);
    snprintf(a2, sizeof a2, "%s/a2", tmp);
    snprintf(a3, sizeof a3, "%s/a3", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t ws[] = {96, 80};
    mm_t w = mm_make("model.layers.0.mlp.proj.weight", 2, ws, 0.02, "BF16");
    mm_write(base, &w, 1, "BF16");
    uint64_t as[] = {8, 80}, bs[] = {96, 8};
    mm_t f[6];
    for (int k = 0; k < 3; k++) {
        f[2 * k] = mm_make("base_model.model.model.layers.0.mlp.proj.lora_A.weight", 2, as, 0.1, "F32");
        f[2 * k + 1] = mm_make("base_model.model.model.layers.0.mlp.proj.lora_B.weight", 2, bs, 0.1, "F32");
    }
    /* the second adapter keeps the adapter name in its keys (lora_A.default.weight) */
    snprintf(f[2].name, sizeof f[2].name, "base_model.model.model.layers.0.mlp.proj.lora_A.default.weight");
    snprintf(f[3].name, sizeof f[3].name, "base_model.model.model.layers.0.mlp.proj.lora_B.default.weight");
    mm_adapter(a1, &f[0], 2, "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, \"target_modules\": [\"proj\"]}");
    mm_adapter(a2, &f[2], 2, "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 8, \"target_modules\": [\"proj\"]}");
    mm_adapter(a3, &f[4], 2,
               "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 4, \"use_rslora\": true, \"target_modules\": [\"proj\"]}");
    const char *argv[] = {th_bin(), "-q", "--scale", "0.5", base, a1, "--adapter-scaled", a2, "-0.75", out,
                          "--adapter", a3, NULL};
    mm_merge_ok(argv);
    double *ref = malloc(w.n * sizeof(double));
    memcpy(ref, w.v, w.n * sizeof(double));
    mm_add_lowrank(ref, &f[0], &f[1], 0.5 * 16.0 / 8.0);
    mm_add_lowrank(ref, &f[2], &f[3], -0.75 * 8.0 / 8.0);
    mm_add_lowrank(ref, &f[4], &f[5], 1.0 * 4.0 / sqrt(8.0));
    mm_check(out, w.name, "BF16", ref, w.n);
    /* --dtype f32: the same sum, not rounded to bf16 */
    const char *argv2[] = {th_bin(), "-q", "--dtype", "f32", "--scale", "0.5", base, a1, "--adapter-scaled", a2,
                           "-0.75", "--adapter", a3, out, NULL};
    mm_merge_ok(argv2);
    mm_check(out, w.name, "F32", ref, w.n);
    free(ref);
    free(w.v);
    for (int k = 0; k < 6; k++)
        free(f[k].v);
    th_rmrf(tmp);
    free(tmp);
}

/* a base split in two shards with an index: merged into one file with every tensor */
Test(merge_math, sharded_base)
{
    char *tmp = th_tmpdir(), p[1024], ad[512], out[512];
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t s1[] = {32, 24}, s2[] = {24, 32}, s3[] = {32};
    mm_t t1 = mm_make("model.layers.0.q_proj.weight", 2, s1, 0.02, "F16");
    mm_t t2 = mm_make("model.layers.1.q_proj.weight", 2, s2, 0.02, "F16");
    mm_t t3 = mm_make("model.norm.weight", 1, s3, 0.5, "F16");
    snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", tmp);
    mm_write(p, &t1, 1, "F16");
    mm_t rest[2] = {t2, t3};
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", tmp);
    mm_write(p, rest, 2, "F16");
    const char *index = "{\"metadata\": {\"total_size\": 3136}, \"weight_map\": {"
                        "\"model.layers.0.q_proj.weight\": \"model-00001-of-00002.safetensors\","
                        "\"model.layers.1.q_proj.weight\": \"model-00002-of-00002.safetensors\","
                        "\"model.norm.weight\": \"model-00002-of-00002.safetensors\"}}";
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", tmp);
    cr_assert_eq(th_write_file(p, index, strlen(index)), 0);
    uint64_t a0[] = {2, 24}, b0[] = {32, 2}, a1s[] = {2, 32}, b1s[] = {24, 2};
    mm_t f[4] = {mm_make("base_model.model.model.layers.0.q_proj.lora_A.weight", 2, a0, 0.3, "F32"),
                 mm_make("base_model.model.model.layers.0.q_proj.lora_B.weight", 2, b0, 0.3, "F32"),
                 mm_make("base_model.model.model.layers.1.q_proj.lora_A.weight", 2, a1s, 0.3, "F32"),
                 mm_make("base_model.model.model.layers.1.q_proj.lora_B.weight", 2, b1s, 0.3, "F32")};
    mm_adapter(ad, f, 4, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 2, \"target_modules\": [\"q_proj\"]}");
    const char *argv[] = {th_bin(), "-q", tmp, ad, out, NULL}; /* the directory: the index is found */
    mm_merge_ok(argv);
    double *ref = malloc(t1.n * sizeof(double));
    memcpy(ref, t1.v, t1.n * sizeof(double));
    mm_add_lowrank(ref, &f[0], &f[1], 1.0);
    mm_check(out, t1.name, "F16", ref, t1.n);
    memcpy(ref, t2.v, t2.n * sizeof(double));
    mm_add_lowrank(ref, &f[2], &f[3], 1.0);
    mm_check(out, t2.name, "F16", ref, t2.n);
    mm_check(out, t3.name, "F16", t3.v, t3.n);
    free(ref);
    free(t1.v);
    free(t2.v);
    free(t3.v);
    for (int k = 0; k < 4; k++)
        free(f[k].v);
    th_rmrf(tmp);
    free(tmp);
}

/* a tied model whose checkpoint stores only the input embedding: the lm_head adapter and the
 * embedding adapter both land on the one shared tensor (peft-merge.md §6.4) */
Test(merge_math, tied_head_goes_to_embedding)
{
    char *tmp = th_tmpdir(), base[512], ad[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t es[] = {50, 24}, ns[] = {24};
    mm_t emb = mm_make("model.embed_tokens.weight", 2, es, 0.05, "BF16");
    mm_t norm = mm_make("model.norm.weight", 1, ns, 0.5, "BF16");
    mm_t b2[2] = {emb, norm};
    mm_write(base, b2, 2, "BF16");
    uint64_t ha[] = {4, 24}, hb[] = {50, 4}, ea[] = {4, 50}, eb[] = {24, 4};
    mm_t f[4] = {mm_make("base_model.model.lm_head.lora_A.weight", 2, ha, 0.2, "F32"),
                 mm_make("base_model.model.lm_head.lora_B.weight", 2, hb, 0.2, "F32"),
                 mm_make("base_model.model.model.embed_tokens.lora_embedding_A", 2, ea, 0.2, "F32"),
                 mm_make("base_model.model.model.embed_tokens.lora_embedding_B", 2, eb, 0.2, "F32")};
    mm_adapter(ad, f, 4,
               "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"embed_tokens\", \"lm_head\"]}");
    const char *argv[] = {th_bin(), base, ad, out, NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "tied") != NULL, "the tie is not reported: %s", r.err);
    th_run_free(&r);
    double *ref = malloc(emb.n * sizeof(double));
    memcpy(ref, emb.v, emb.n * sizeof(double));
    mm_add_lowrank(ref, &f[0], &f[1], 2.0); /* head: (B@A) is [V, D] like the embedding */
    for (uint64_t v = 0; v < 50; v++)       /* embedding: (B@A)^T */
        for (uint64_t d = 0; d < 24; d++) {
            double s = 0;
            for (uint64_t k = 0; k < 4; k++)
                s += f[3].v[d * 4 + k] * f[2].v[k * 50 + v];
            ref[v * 24 + d] += 2.0 * s;
        }
    mm_check(out, emb.name, "BF16", ref, emb.n);
    th_st st;
    cr_assert_eq(th_st_read(out, &st), 0);
    cr_assert_eq(st.n, 2, "the output must not add lm_head.weight");
    th_st_free(&st);
    free(ref);
    free(emb.v);
    free(norm.v);
    for (int k = 0; k < 4; k++)
        free(f[k].v);
    th_rmrf(tmp);
    free(tmp);
}

/* inspect ADAPTER_DIR: type, variant, r/alpha, patterns, per-group scales, targets, dtypes */
Test(merge_math, inspect_adapter)
{
    char *tmp = th_tmpdir(), ad[512];
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    uint64_t as[] = {8, 16}, bs[] = {16, 8}, a2[] = {2, 16}, b2[] = {16, 2};
    mm_t f[4] = {mm_make("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 2, as, 0.1, "F32"),
                 mm_make("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 2, bs, 0.1, "F32"),
                 mm_make("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", 2, a2, 0.1, "F32"),
                 mm_make("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", 2, b2, 0.1, "F32")};
    mm_adapter(ad, f, 4,
               "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, \"use_rslora\": true, "
               "\"rank_pattern\": {\"v_proj\": 2}, \"target_modules\": [\"q_proj\", \"v_proj\"]}");
    const char *argv[] = {th_bin(), "inspect", ad, NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.out, "type: LORA") && strstr(r.out, "rsLoRA"), "%s", r.out);
    cr_assert(strstr(r.out, "rank_pattern: v_proj -> 2"), "%s", r.out);
    cr_assert(strstr(r.out, "q_proj") && strstr(r.out, "r=8 alpha=16 scale=5.65685"), "%s", r.out);
    cr_assert(strstr(r.out, "r=2 alpha=16 scale=11.3137"), "%s", r.out);
    cr_assert(strstr(r.out, "F32 x4"), "%s", r.out);
    th_run_free(&r);
    /* a refused variant is described, not merged */
    const char *cfg = "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, \"layer_replication\": [[0, 1]]}";
    char p[600];
    snprintf(p, sizeof p, "%s/adapter_config.json", ad);
    cr_assert_eq(th_write_file(p, cfg, strlen(cfg)), 0);
    r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.out, "refused") && strstr(r.out, "layer_replication"), "%s", r.out);
    th_run_free(&r);
    for (int k = 0; k < 4; k++)
        free(f[k].v);
    th_rmrf(tmp);
    free(tmp);
}

/* "all-linear" and a hand-written config without target_modules take every module in the file */
Test(merge_math, all_linear_and_no_targets)
{
    const char *cfgs[] = {"{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": \"all-linear\"}",
                          "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4}"};
    for (int c = 0; c < 2; c++) {
        char *tmp = th_tmpdir(), base[512], ad[512], out[512];
        snprintf(base, sizeof base, "%s/base.safetensors", tmp);
        snprintf(ad, sizeof ad, "%s/adapter", tmp);
        snprintf(out, sizeof out, "%s/out.safetensors", tmp);
        uint64_t ws[] = {20, 12};
        mm_t w = mm_make("model.layers.0.mlp.fc.weight", 2, ws, 0.05, "F32");
        mm_write(base, &w, 1, "F32");
        uint64_t as[] = {2, 12}, bs[] = {20, 2};
        mm_t f[2] = {mm_make("base_model.model.model.layers.0.mlp.fc.lora_A.weight", 2, as, 0.2, "F32"),
                     mm_make("base_model.model.model.layers.0.mlp.fc.lora_B.weight", 2, bs, 0.2, "F32")};
        mm_adapter(ad, f, 2, cfgs[c]);
        const char *argv[] = {th_bin(), "-q", base, ad, out, NULL};
        mm_merge_ok(argv);
        double *ref = malloc(w.n * sizeof(double));
        memcpy(ref, w.v, w.n * sizeof(double));
        mm_add_lowrank(ref, &f[0], &f[1], 2.0);
        mm_check(out, w.name, "F32", ref, w.n);
        free(ref);
        free(w.v);
        free(f[0].v);
        free(f[1].v);
        th_rmrf(tmp);
        free(tmp);
    }
}

/* GPT-2's published checkpoint says h.0.attn.c_attn.weight where the adapter says
 * transformer.h.0.attn.c_attn; Conv1D weights are stored [in, out] (delta transposed); the
 * square c_proj follows its non-square sibling.  And a base with an extra leading component. */
Test(merge_math, module_names_and_conv1d_orientation)
{
    char *tmp = th_tmpdir(), base[512], ad[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t ca[] = {16, 48}, cp[] = {16, 16}, q[] = {8, 16};
    mm_t b[3] = {mm_make("h.0.attn.c_attn.weight", 2, ca, 0.05, "F16"), mm_make("h.0.attn.c_proj.weight", 2, cp, 0.05, "F16"),
                 mm_make("language_model.model.layers.0.q.weight", 2, q, 0.05, "F16")};
    mm_write(base, b, 3, "F16");
    uint64_t a1[] = {2, 16}, b1[] = {48, 2}, a2[] = {2, 16}, b2[] = {16, 2}, a3[] = {2, 16}, b3[] = {8, 2};
    mm_t f[6] = {mm_make("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", 2, a1, 0.3, "F32"),
                 mm_make("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight", 2, b1, 0.3, "F32"),
                 mm_make("base_model.model.transformer.h.0.attn.c_proj.lora_A.weight", 2, a2, 0.3, "F32"),
                 mm_make("base_model.model.transformer.h.0.attn.c_proj.lora_B.weight", 2, b2, 0.3, "F32"),
                 mm_make("base_model.model.model.layers.0.q.lora_A.weight", 2, a3, 0.3, "F32"),
                 mm_make("base_model.model.model.layers.0.q.lora_B.weight", 2, b3, 0.3, "F32")};
    mm_adapter(ad, f, 6, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 2, \"fan_in_fan_out\": false, "
                         "\"target_modules\": [\"c_attn\", \"c_proj\", \"q\"]}");
    const char *argv[] = {th_bin(), "-q", base, ad, out, NULL};
    mm_merge_ok(argv);
    for (int k = 0; k < 3; k++) {
        const mm_t *A = &f[2 * k], *B = &f[2 * k + 1];
        uint64_t in = A->shape[1], o = B->shape[0];
        double *ref = malloc(b[k].n * sizeof(double));
        memcpy(ref, b[k].v, b[k].n * sizeof(double));
        for (uint64_t i = 0; i < o; i++)
            for (uint64_t j = 0; j < in; j++) {
                double s = 0;
                for (uint64_t r = 0; r < 2; r++)
                    s += B->v[i * 2 + r] * A->v[r * in + j];
                if (k < 2)
                    ref[j * o + i] += s; /* Conv1D: W[in, out] += (B@A)^T */
                else
                    ref[i * in + j] += s;
            }
        mm_check(out, b[k].name, "F16", ref, b[k].n);
        free(ref);
    }
    for (int k = 0; k < 3; k++)
        free(b[k].v);
    for (int k = 0; k < 6; k++)
        free(f[k].v);
    th_rmrf(tmp);
    free(tmp);
}

/* IA3 on GPT-2 Conv1D weights ([in, out] storage): output features are columns, a feed-forward
 * module (regex feedforward_modules) scales rows, and a non-FF bias is scaled too */
Test(merge_math, ia3_conv1d_and_regex_feedforward)
{
    char *tmp = th_tmpdir(), base[512], ad[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t ca[] = {8, 24}, cab[] = {24}, cf[] = {8, 32};
    mm_t b[3] = {mm_make("transformer.h.0.attn.c_attn.weight", 2, ca, 0.05, "BF16"),
                 mm_make("transformer.h.0.attn.c_attn.bias", 1, cab, 0.05, "BF16"),
                 mm_make("transformer.h.0.mlp.c_fc.weight", 2, cf, 0.05, "BF16")};
    mm_write(base, b, 3, "BF16");
    uint64_t l1[] = {24, 1}, l2[] = {1, 8};
    mm_t f[2] = {mm_make("base_model.model.transformer.h.0.attn.c_attn.ia3_l", 2, l1, 0.3, "F32"),
                 mm_make("base_model.model.transformer.h.0.mlp.c_fc.ia3_l", 2, l2, 0.3, "F32")};
    for (int k = 0; k < 2; k++)
        for (uint64_t i = 0; i < f[k].n; i++)
            f[k].v[i] += 1.0;
    mm_adapter(ad, f, 2, "{\"peft_type\": \"IA3\", \"target_modules\": [\"c_attn\", \"c_fc\"], "
                         "\"feedforward_modules\": \".*mlp\\\\.c_f.\", \"fan_in_fan_out\": true}");
    const char *argv[] = {th_bin(), "-q", base, ad, out, NULL};
    mm_merge_ok(argv);
    double *ref = malloc(32 * 8 * sizeof(double));
    for (uint64_t i = 0; i < 8; i++) /* c_attn [in 8, out 24]: column o scaled by l[o] */
        for (uint64_t o = 0; o < 24; o++)
            ref[i * 24 + o] = b[0].v[i * 24 + o] * f[0].v[o];
    mm_check(out, b[0].name, "BF16", ref, b[0].n);
    for (uint64_t o = 0; o < 24; o++)
        ref[o] = b[1].v[o] * f[0].v[o];
    mm_check(out, b[1].name, "BF16", ref, b[1].n);
    for (uint64_t i = 0; i < 8; i++) /* c_fc [in 8, out 32], feed-forward: row i scaled by l[i] */
        for (uint64_t o = 0; o < 32; o++)
            ref[i * 32 + o] = b[2].v[i * 32 + o] * f[1].v[i];
    mm_check(out, b[2].name, "BF16", ref, b[2].n);
    free(ref);
    for (int k = 0; k < 3; k++)
        free(b[k].v);
    for (int k = 0; k < 2; k++)
        free(f[k].v);
    th_rmrf(tmp);
    free(tmp);
}

/* AdaLoRA: B @ (A * E) * alpha / (init_r + 1e-5) whatever rank a module kept; a module pruned to
 * rank 0 is left alone */
Test(merge_math, adalora_kept_ranks)
{
    char *tmp = th_tmpdir(), base[512], ad[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t ws[] = {20, 12};
    mm_t w[2] = {mm_make("m.layers.0.q.weight", 2, ws, 0.05, "F16"), mm_make("m.layers.0.v.weight", 2, ws, 0.05, "F16")};
    mm_write(base, w, 2, "F16");
    uint64_t as[] = {3, 12}, bs[] = {20, 3}, es[] = {3, 1}, a0[] = {0, 12}, b0[] = {20, 0}, e0[] = {0, 1};
    mm_t f[6] = {mm_make("base_model.model.m.layers.0.q.lora_A", 2, as, 0.3, "F32"),
                 mm_make("base_model.model.m.layers.0.q.lora_B", 2, bs, 0.3, "F32"),
                 mm_make("base_model.model.m.layers.0.q.lora_E", 2, es, 0.5, "F32"),
                 mm_make("base_model.model.m.layers.0.v.lora_A", 2, a0, 0.3, "F32"),
                 mm_make("base_model.model.m.layers.0.v.lora_B", 2, b0, 0.3, "F32"),
                 mm_make("base_model.model.m.layers.0.v.lora_E", 2, e0, 0.5, "F32")};
    mm_adapter(ad, f, 6, "{\"peft_type\": \"ADALORA\", \"init_r\": 5, \"r\": 8, \"lora_alpha\": 4, "
                         "\"target_modules\": [\"q\", \"v\"], \"rank_pattern\": {\"m.layers.0.q.lora_E\": "
                         "[true, false, true, true, false]}}");
    const char *argv[] = {th_bin(), "-q", base, ad, out, NULL};
    mm_merge_ok(argv);
    double *ref = malloc(w[0].n * sizeof(double));
    memcpy(ref, w[0].v, w[0].n * sizeof(double));
    for (uint64_t o = 0; o < 20; o++)
        for (uint64_t i = 0; i < 12; i++) {
            double s = 0;
            for (uint64_t k = 0; k < 3; k++)
                s += f[1].v[o * 3 + k] * f[0].v[k * 12 + i] * f[2].v[k];
            ref[o * 12 + i] += s * 4.0 / (5.0 + 1e-5);
        }
    mm_check(out, w[0].name, "F16", ref, w[0].n);
    mm_check(out, w[1].name, "F16", w[1].v, w[1].n);
    free(ref);
    for (int k = 0; k < 2; k++)
        free(w[k].v);
    for (int k = 0; k < 6; k++)
        free(f[k].v);
    th_rmrf(tmp);
    free(tmp);
}

/* LoHa: (w1a@w1b) * (w2a@w2b) * alpha/r with alpha_pattern; LoKr: kron(w1_a@w1_b, w2) * alpha/r,
 * r from the config (rank_pattern) even where no tensor shows it */
Test(merge_math, loha_and_lokr)
{
    char *tmp = th_tmpdir(), base[512], ad[512], ad2[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/loha", tmp);
    snprintf(ad2, sizeof ad2, "%s/lokr", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t ws[] = {12, 20};
    mm_t w = mm_make("net.fc.weight", 2, ws, 0.05, "BF16");
    mm_write(base, &w, 1, "BF16");
    uint64_t s1a[] = {12, 3}, s1b[] = {3, 20};
    mm_t h[4] = {mm_make("base_model.model.net.fc.hada_w1_a", 2, s1a, 0.3, "F32"),
                 mm_make("base_model.model.net.fc.hada_w1_b", 2, s1b, 0.3, "F32"),
                 mm_make("base_model.model.net.fc.hada_w2_a", 2, s1a, 0.3, "F32"),
                 mm_make("base_model.model.net.fc.hada_w2_b", 2, s1b, 0.3, "F32")};
    mm_adapter(ad, h, 4, "{\"peft_type\": \"LOHA\", \"r\": 3, \"alpha\": 2, \"alpha_pattern\": {\"fc\": 6}, "
                         "\"target_modules\": [\"fc\"]}");
    /* kron: w1 [3, 4] = w1_a [3, 2] @ w1_b [2, 4]; w2 [4, 5]: [12, 20] */
    uint64_t k1a[] = {3, 2}, k1b[] = {2, 4}, k2[] = {4, 5};
    mm_t k[3] = {mm_make("base_model.model.net.fc.lokr_w1_a", 2, k1a, 0.5, "F32"),
                 mm_make("base_model.model.net.fc.lokr_w1_b", 2, k1b, 0.5, "F32"),
                 mm_make("base_model.model.net.fc.lokr_w2", 2, k2, 0.5, "F32")};
    mm_adapter(ad2, k, 3, "{\"peft_type\": \"LOKR\", \"r\": 8, \"alpha\": 0.5, \"rank_pattern\": {\"net.fc\": 2}, "
                          "\"target_modules\": [\"fc\"]}");
    const char *argv[] = {th_bin(), "-q", base, ad, "--adapter-scaled", ad2, "-1.5", out, NULL};
    mm_merge_ok(argv);
    double *ref = malloc(w.n * sizeof(double));
    for (uint64_t o = 0; o < 12; o++)
        for (uint64_t i = 0; i < 20; i++) {
            double t1 = 0, t2 = 0, w1 = 0;
            for (uint64_t r = 0; r < 3; r++) {
                t1 += h[0].v[o * 3 + r] * h[1].v[r * 20 + i];
                t2 += h[2].v[o * 3 + r] * h[3].v[r * 20 + i];
            }
            uint64_t p = o / 4, q = o % 4, u = i / 5, v = i % 5;
            for (uint64_t r = 0; r < 2; r++)
                w1 += k[0].v[p * 2 + r] * k[1].v[r * 4 + u];
            ref[o * 20 + i] = w.v[o * 20 + i] + t1 * t2 * 6.0 / 3.0 - 1.5 * w1 * k[2].v[q * 5 + v] * 0.5 / 2.0;
        }
    mm_check(out, w.name, "BF16", ref, w.n);
    free(ref);
    free(w.v);
    for (int i = 0; i < 4; i++)
        free(h[i].v);
    for (int i = 0; i < 3; i++)
        free(k[i].v);
    th_rmrf(tmp);
    free(tmp);
}

/* HiRA (W += W * (B@A)^T) and VeRA ((lb * B[:o]) @ (ld * A[:, :i]), transposed) on a GPT-2 Conv1D
 * weight stored [in, out]; BEFT refused where the base layer has no bias */
Test(merge_math, hira_vera_conv1d_and_beft_without_bias)
{
    char *tmp = th_tmpdir(), base[512], ad[512], ad2[512], ad3[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/hira", tmp);
    snprintf(ad2, sizeof ad2, "%s/vera", tmp);
    snprintf(ad3, sizeof ad3, "%s/beft", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t ws[] = {6, 10}; /* [in 6, out 10] */
    mm_t w = mm_make("transformer.h.0.mlp.c_fc.weight", 2, ws, 0.1, "F32");
    mm_write(base, &w, 1, "F32");
    uint64_t as[] = {2, 6}, bs[] = {10, 2}, va[] = {3, 8}, vb[] = {12, 3}, lbs[] = {10}, lds[] = {3};
    mm_t h[2] = {mm_make("base_model.model.transformer.h.0.mlp.c_fc.hira_A", 2, as, 0.5, "F32"),
                 mm_make("base_model.model.transformer.h.0.mlp.c_fc.hira_B", 2, bs, 0.5, "F32")};
    mm_adapter(ad, h, 2, "{\"peft_type\": \"HIRA\", \"r\": 2, \"target_modules\": [\"c_fc\"]}");
    mm_t v[4] = {mm_make("base_model.vera_A", 2, va, 0.5, "F32"), mm_make("base_model.vera_B", 2, vb, 0.5, "F32"),
                 mm_make("base_model.model.transformer.h.0.mlp.c_fc.vera_lambda_b", 1, lbs, 0.5, "F32"),
                 mm_make("base_model.model.transformer.h.0.mlp.c_fc.vera_lambda_d", 1, lds, 0.5, "F32")};
    mm_adapter(ad2, v, 4, "{\"peft_type\": \"VERA\", \"r\": 3, \"target_modules\": [\"c_fc\"]}");
    const char *argv[] = {th_bin(), "-q", base, ad, "--adapter", ad2, out, NULL};
    mm_merge_ok(argv);
    double *ref = malloc(w.n * sizeof(double));
    for (uint64_t i = 0; i < 6; i++)
        for (uint64_t o = 0; o < 10; o++) {
            double ba = 0, vv = 0;
            for (uint64_t k = 0; k < 2; k++)
                ba += h[1].v[o * 2 + k] * h[0].v[k * 6 + i];
            for (uint64_t k = 0; k < 3; k++)
                vv += v[2].v[o] * v[1].v[o * 3 + k] * v[3].v[k] * v[0].v[k * 8 + i];
            double w0 = w.v[i * 10 + o];
            ref[i * 10 + o] = w0 + w0 * ba + vv;
        }
    mm_check(out, w.name, "F32", ref, w.n);
    uint64_t bb[] = {1, 10};
    mm_t be = mm_make("base_model.model.transformer.h.0.mlp.c_fc.beft_bias", 2, bb, 0.5, "F32");
    mm_adapter(ad3, &be, 1, "{\"peft_type\": \"BEFT\", \"target_modules\": [\"c_fc\"]}");
    const char *argv2[] = {th_bin(), base, ad3, out, NULL};
    th_run_result r = th_run(NULL, argv2);
    cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "bias") && strstr(r.err, "c_fc"), "%s", r.err);
    th_run_free(&r);
    free(ref);
    free(w.v);
    free(be.v);
    for (int k = 0; k < 2; k++)
        free(h[k].v);
    for (int k = 0; k < 4; k++)
        free(v[k].v);
    th_rmrf(tmp);
    free(tmp);
}

/* a tensor with no elements but huge other dimensions ([2^64-1, 0, 2^64-1], valid safetensors)
 * converted with --dtype: no work, no allocation, a valid output */
Test(merge_math, empty_tensor_with_huge_dims_converted, .timeout = 30)
{
    char *tmp = th_tmpdir(), base[512], ad[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    const char *hdr = "{\"empty\":{\"dtype\":\"F32\",\"shape\":[18446744073709551615,0,18446744073709551615],"
                      "\"data_offsets\":[0,0]},\"w.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}";
    size_t hl = strlen(hdr), pad = (8 - hl % 8) % 8;
    uint8_t buf[512] = {0};
    uint64_t n = hl + pad;
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(n >> (8 * i));
    memcpy(buf + 8, hdr, hl);
    memset(buf + 8 + hl, ' ', pad);
    float vals[4] = {1, 2, 3, 4};
    memcpy(buf + 8 + n, vals, 16);
    cr_assert_eq(th_write_file(base, buf, 8 + n + 16), 0);
    uint64_t as[] = {1, 2}, bs[] = {2, 1};
    mm_t f[2] = {mm_make("base_model.model.w.lora_A.weight", 2, as, 0.5, "F32"),
                 mm_make("base_model.model.w.lora_B.weight", 2, bs, 0.5, "F32")};
    mm_adapter(ad, f, 2, "{\"peft_type\": \"LORA\", \"r\": 1, \"lora_alpha\": 1, \"target_modules\": [\"w\"]}");
    const char *argv[] = {th_bin(), "-q", "--dtype", "bf16", base, ad, out, NULL};
    mm_merge_ok(argv);
    const char *argv2[] = {th_bin(), "inspect", out, NULL};
    th_run_result r = th_run(NULL, argv2);
    cr_assert_eq(r.status, 0, "%s", r.err);
    cr_assert(strstr(r.out, "empty BF16 [18446744073709551615, 0, 18446744073709551615] 0 bytes"), "%s", r.out);
    th_run_free(&r);
    free(f[0].v);
    free(f[1].v);
    th_rmrf(tmp);
    free(tmp);
}

/* HRA with apply_GS (W @ (I - 2 Q Q^T), Q from classical Gram-Schmidt of U's columns) and MiSS
 * "mini" (B [r, mini_r] tiled to [r, out]: W[o, c] += B[c mod r, o mod mini_r]) */
Test(merge_math, hra_gram_schmidt_and_miss_mini)
{
    char *tmp = th_tmpdir(), base[512], ad[512], ad2[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/hra", tmp);
    snprintf(ad2, sizeof ad2, "%s/miss", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t ws[] = {7, 9};
    mm_t w[2] = {mm_make("m.q.weight", 2, ws, 0.2, "F32"), mm_make("m.v.weight", 2, ws, 0.2, "F32")};
    mm_write(base, w, 2, "F32");
    uint64_t us[] = {9, 3}, bs[] = {4, 2};
    mm_t u = mm_make("base_model.model.m.q.hra_u", 2, us, 1.0, "F32");
    mm_adapter(ad, &u, 1, "{\"peft_type\": \"HRA\", \"r\": 3, \"apply_GS\": true, \"target_modules\": [\"q\"]}");
    mm_t b = mm_make("base_model.model.m.v.miss_block", 2, bs, 0.3, "F32");
    mm_adapter(ad2, &b, 1, "{\"peft_type\": \"MISS\", \"r\": 4, \"mini_r\": 2, \"init_weights\": \"mini\", "
                           "\"target_modules\": [\"v\"]}");
    const char *argv[] = {th_bin(), "-q", base, ad, "--adapter", ad2, out, NULL};
    mm_merge_ok(argv);
    /* Gram-Schmidt in double, independently */
    double q[3][9];
    for (int j = 0; j < 3; j++) {
        double v[9];
        for (int x = 0; x < 9; x++)
            v[x] = u.v[x * 3 + j];
        for (int l = 0; l < j; l++) {
            double d = 0;
            for (int x = 0; x < 9; x++)
                d += q[l][x] * u.v[x * 3 + j];
            for (int x = 0; x < 9; x++)
                v[x] -= d * q[l][x];
        }
        double nn = 0;
        for (int x = 0; x < 9; x++)
            nn += v[x] * v[x];
        for (int x = 0; x < 9; x++)
            q[j][x] = v[x] / sqrt(nn);
    }
    double ref[63];
    for (int o = 0; o < 7; o++)
        for (int c = 0; c < 9; c++) {
            double y = 0; /* (W (I - 2QQ^T))[o, c] */
            for (int k = 0; k < 9; k++) {
                double h = (k == c) ? 1.0 : 0.0;
                for (int j = 0; j < 3; j++)
                    h -= 2.0 * q[j][k] * q[j][c];
                y += w[0].v[o * 9 + k] * h;
            }
            ref[o * 9 + c] = y;
        }
    mm_check(out, w[0].name, "F32", ref, 63);
    for (int o = 0; o < 7; o++)
        for (int c = 0; c < 9; c++)
            ref[o * 9 + c] = w[1].v[o * 9 + c] + b.v[(c % 4) * 2 + (o % 2)];
    mm_check(out, w[1].name, "F32", ref, 63);
    free(w[0].v);
    free(w[1].v);
    free(u.v);
    free(b.v);
    th_rmrf(tmp);
    free(tmp);
}

/* OFT with the exact Cayley transform (use_cayley_neumann false), shared blocks and coft: each
 * block of each row is rotated (its norm kept, its values changed); the rotation is the same
 * for every block (block_share) */
Test(merge_math, oft_exact_cayley_rotates_blocks)
{
    char *tmp = th_tmpdir(), base[512], ad[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/oft", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t ws[] = {5, 12};
    mm_t w = mm_make("m.q.weight", 2, ws, 0.3, "F32");
    mm_write(base, &w, 1, "F32");
    uint64_t rs[] = {1, 6}; /* block size 4: 4*3/2 = 6 values, shared by the 3 blocks */
    mm_t r = mm_make("base_model.model.m.q.oft_R.weight", 2, rs, 0.5, "F32");
    mm_adapter(ad, &r, 1, "{\"peft_type\": \"OFT\", \"r\": 0, \"oft_block_size\": 4, \"block_share\": true, "
                          "\"coft\": true, \"eps\": 0.5, \"use_cayley_neumann\": false, \"target_modules\": [\"q\"]}");
    const char *argv[] = {th_bin(), "-q", base, ad, out, NULL};
    mm_merge_ok(argv);
    th_st st;
    cr_assert_eq(th_st_read(out, &st), 0);
    double *v = th_to_f64(th_st_find(&st, "m.q.weight"));
    double maxdiff = 0;
    for (int o = 0; o < 5; o++)
        for (int j = 0; j < 3; j++) {
            double n0 = 0, n1 = 0;
            for (int b = 0; b < 4; b++) {
                n0 += w.v[o * 12 + j * 4 + b] * w.v[o * 12 + j * 4 + b];
                n1 += v[o * 12 + j * 4 + b] * v[o * 12 + j * 4 + b];
                maxdiff = fmax(maxdiff, fabs(v[o * 12 + j * 4 + b] - w.v[o * 12 + j * 4 + b]));
            }
            cr_assert_float_eq(sqrt(n1), sqrt(n0), 1e-5 * (1 + sqrt(n0)), "row %d block %d: norm %g -> %g", o, j,
                               sqrt(n0), sqrt(n1));
        }
    cr_assert_gt(maxdiff, 1e-3, "the rotation changed nothing");
    free(v);
    th_st_free(&st);
    free(w.v);
    free(r.v);
    th_rmrf(tmp);
    free(tmp);
}

/* RoAd road_2 (one angle per row) rotating row pairs (p, p + g/2) of each group, bias too, with
 * tiles smaller than a group (they are widened to whole groups): same bytes, right values */
Test(merge_math, road_rotations_and_tiles)
{
    char *tmp = th_tmpdir(), base[512], ad[512], out[512], out2[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/road", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    snprintf(out2, sizeof out2, "%s/out2.safetensors", tmp);
    uint64_t ws[] = {8, 5}, bs[] = {8};
    mm_t b[2] = {mm_make("m.q.weight", 2, ws, 0.3, "F32"), mm_make("m.q.bias", 1, bs, 0.3, "F32")};
    mm_write(base, b, 2, "F32");
    uint64_t ts[] = {8};
    mm_t f[2] = {mm_make("base_model.model.m.q.road_theta", 1, ts, 0.7, "F32"),
                 mm_make("base_model.model.m.q.road_alpha", 1, ts, 0.2, "F32")};
    for (int i = 0; i < 8; i++)
        f[1].v[i] += 1.0;
    mm_adapter(ad, f, 2, "{\"peft_type\": \"ROAD\", \"variant\": \"road_2\", \"group_size\": 4, "
                         "\"target_modules\": [\"q\"]}");
    const char *argv[] = {th_bin(), "-q", base, ad, out, NULL};
    mm_merge_ok(argv);
    const char *argv2[] = {th_bin(), "-q", "--tile-elems", "3", base, ad, out2, NULL};
    mm_merge_ok(argv2);
    cr_assert(th_files_equal(out, out2), "tiles smaller than a RoAd group change the output");
    double ref[40], refb[8];
    for (int G = 0; G < 2; G++)
        for (int x = 0; x < 2; x++) {
            int p = G * 4 + x, q = p + 2;
            double cp = f[1].v[p] * cos(f[0].v[p]), sp = f[1].v[p] * sin(f[0].v[p]);
            double cq = f[1].v[q] * cos(f[0].v[q]), sq = f[1].v[q] * sin(f[0].v[q]);
            for (int c = 0; c < 5; c++) {
                ref[p * 5 + c] = cp * b[0].v[p * 5 + c] - sp * b[0].v[q * 5 + c];
                ref[q * 5 + c] = sq * b[0].v[p * 5 + c] + cq * b[0].v[q * 5 + c];
            }
            refb[p] = cp * b[1].v[p] - sp * b[1].v[q];
            refb[q] = sq * b[1].v[p] + cq * b[1].v[q];
        }
    mm_check(out, b[0].name, "F32", ref, 40);
    mm_check(out, b[1].name, "F32", refb, 8);
    for (int k = 0; k < 2; k++) {
        free(b[k].v);
        free(f[k].v);
    }
    th_rmrf(tmp);
    free(tmp);
}

/* the library with err == NULL: refusals still come back as codes, never a crash */
Test(merge_math, library_without_error_details)
{
    char *tmp = th_tmpdir(), base[512], ad[512], out[512];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t ws[] = {4, 4}, as[] = {1, 4}, bs[] = {4, 1};
    mm_t w = mm_make("m.other.weight", 2, ws, 0.1, "F32");
    mm_write(base, &w, 1, "F32");
    mm_t f[2] = {mm_make("base_model.model.m.q.lora_A.weight", 2, as, 0.1, "F32"),
                 mm_make("base_model.model.m.q.lora_B.weight", 2, bs, 0.1, "F32")};
    mm_adapter(ad, f, 2, "{\"peft_type\": \"LORA\", \"r\": 1, \"target_modules\": [\"q\"]}");
    lm_merge_adapter a = {ad, 1.0};
    lm_merge_job job;
    memset(&job, 0, sizeof job);
    job.base_path = base;
    job.out_path = out;
    job.adapters = &a;
    job.n_adapters = 1;
    cr_assert_eq(lm_merge_run(&job, NULL, NULL), LM_E_MISMATCH, "no base tensor for m.q must be refused");
    cr_assert(!th_exists(out));
    free(w.v);
    free(f[0].v);
    free(f[1].v);
    th_rmrf(tmp);
    free(tmp);
}
