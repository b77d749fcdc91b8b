/* SPDX-License-Identifier: MIT */
/* test_plan_checks.c : what the planner refuses, and that --dry-run refuses exactly what a real
 * run refuses: a tensor of another adapter type (one error kind, naming the real type), several
 * column-DoRA adapters on one tensor, VB-LoRA indices outside the bank; and merges whose result
 * would not be finite (an overflowing delta, or a value beyond the f16 range), refused naming the
 * tensor with nothing written.  Generated models; no ../shared needed. */
#include "th.h"

#include <cJSON.h>

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static uint64_t pc_seed = 4242;

/* a tensor of n values ~ sd * N(0, 1) (or `fill` when sd is 0) */
static th_out_tensor pc_tensor(const char *name, const char *dtype, int n_dims, const uint64_t *shape, double sd,
                               double fill)
{
    th_out_tensor t;
    memset(&t, 0, sizeof t);
    t.name = name;
    t.dtype = dtype;
    t.n_dims = n_dims;
    uint64_t n = 1;
    for (int d = 0; d < n_dims; d++) {
        t.shape[d] = shape[d];
        n *= shape[d];
    }
    double *v = malloc((n ? n : 1) * sizeof *v);
    for (uint64_t i = 0; i < n; i++)
        v[i] = sd != 0 ? sd * th_rand_normal(&pc_seed) : fill;
    t.values = v;
    return t;
}

static void pc_write(const char *path, th_out_tensor *t, size_t n)
{
    cr_assert_eq(th_st_write(path, t, n), 0, "cannot write %s", path);
    for (size_t i = 0; i < n; i++)
        free((void *)t[i].values);
}

static void pc_config(const char *dir, const char *json)
{
    char p[1024];
    mkdir(dir, 0777);
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    cr_assert_eq(th_write_file(p, json, strlen(json)), 0);
}

/* runs the merge with and without --dry-run: both must fail with status 1, one error line that
 * contains `kind` and `what`, and no output file */
static void pc_refused_both_ways(const char *tmp, const char *const *adapters, size_t n_ad, const char *base,
                                 const char *kind, const char *what)
{
    char out[1024];
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    for (int dry = 0; dry < 2; dry++) {
        const char *argv[16];
        size_t k = 0;
        argv[k++] = th_bin();
        if (dry)
            argv[k++] = "--dry-run";
        argv[k++] = base;
        argv[k++] = adapters[0];
        for (size_t i = 1; i < n_ad; i++) {
            argv[k++] = "--adapter";
            argv[k++] = adapters[i];
        }
        argv[k++] = out;
        argv[k] = NULL;
        th_run_result r = th_run(NULL, argv);
        cr_assert_eq(r.status, 1, "%s: exit %d: %s", dry ? "dry run" : "run", r.status, r.err);
        cr_assert_not_null(strstr(r.err, kind), "%s: no '%s' in: %s", dry ? "dry run" : "run", kind, r.err);
        cr_assert_not_null(strstr(r.err, what), "%s: no '%s' in: %s", dry ? "dry run" : "run", what, r.err);
        cr_assert_eq(strchr(r.err, '\n'), r.err + strlen(r.err) - 1, "one line: %s", r.err);
        cr_assert(!th_exists(out), "an output was left");
        th_run_free(&r);
    }
    cr_assert_eq(th_count_entries(tmp), 1 + (int)n_ad, "a temporary file was left in %s", tmp);
}

Test(plan_checks, tensor_of_another_type_names_it)
{
    /* a C3A adapter holding RoAd tensors: "road_theta is a ROAD tensor, but this is a C3A adapter" */
    char *tmp = th_tmpdir(), base[600], ad[600], p[700];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    uint64_t w[2] = {8, 8}, v[1] = {4};
    th_out_tensor bt[1] = {pc_tensor("model.layers.0.q_proj.weight", "F32", 2, w, 0.1, 0)};
    pc_write(base, bt, 1);
    pc_config(ad, "{\"peft_type\": \"C3A\", \"target_modules\": [\"q_proj\"], \"block_size\": 4}");
    th_out_tensor at[2] = {pc_tensor("base_model.model.model.layers.0.q_proj.road_theta", "F32", 1, v, 0.1, 0),
                           pc_tensor("base_model.model.model.layers.0.q_proj.road_alpha", "F32", 1, v, 0.1, 0)};
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", ad);
    pc_write(p, at, 2);
    const char *ads[1] = {ad};
    pc_refused_both_ways(tmp, ads, 1, base, "ForeignPart", "ROAD tensor, but this is a C3A adapter");
    th_rmrf(tmp);
    free(tmp);
}

Test(plan_checks, two_column_dora_adapters_refused_by_the_dry_run_too)
{
    /* GPT-2 Conv1D (stored [in, out]): DoRA's norms are per column; two such adapters on one tensor
     * are refused (the executor cannot chain column norms) - when planning, so --dry-run says so */
    char *tmp = th_tmpdir(), base[600], a1[600], a2[600], p[700];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    uint64_t w[2] = {6, 10}, A[2] = {2, 6}, B[2] = {10, 2}, m[1] = {10};
    th_out_tensor bt[1] = {pc_tensor("h.0.attn.c_attn.weight", "F32", 2, w, 0.1, 0)};
    pc_write(base, bt, 1);
    for (int k = 0; k < 2; k++) {
        char *ad = k ? a2 : a1;
        snprintf(ad, 600, "%s/a%d", tmp, k);
        pc_config(ad, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"use_dora\": true, "
                      "\"fan_in_fan_out\": true, \"target_modules\": [\"c_attn\"]}");
        th_out_tensor at[3] = {pc_tensor("base_model.model.h.0.attn.c_attn.lora_A.weight", "F32", 2, A, 0.1, 0),
                               pc_tensor("base_model.model.h.0.attn.c_attn.lora_B.weight", "F32", 2, B, 0.1, 0),
                               pc_tensor("base_model.model.h.0.attn.c_attn.lora_magnitude_vector", "F32", 1, m, 0, 1.5)};
        snprintf(p, sizeof p, "%s/adapter_model.safetensors", ad);
        pc_write(p, at, 3);
    }
    const char *ads[2] = {a1, a2};
    pc_refused_both_ways(tmp, ads, 2, base, "Unsupported", "several DoRA adapters");
    th_rmrf(tmp);
    free(tmp);
}

Test(plan_checks, vblora_index_outside_the_bank_refused_by_the_dry_run_too)
{
    char *tmp = th_tmpdir(), base[600], ad[600], p[700];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    /* W [8, 8], vector length 4, bank of 5 vectors, rank 2, topk 2: indices [r, in/L, 2], weights [.., 1] */
    uint64_t w[2] = {8, 8}, bank[2] = {5, 4}, ia[3] = {2, 2, 2}, wa[3] = {2, 2, 1}, ib[3] = {2, 2, 2};
    th_out_tensor bt[1] = {pc_tensor("model.layers.0.q_proj.weight", "F32", 2, w, 0.1, 0)};
    pc_write(base, bt, 1);
    pc_config(ad, "{\"peft_type\": \"VBLORA\", \"r\": 2, \"topk\": 2, \"vector_length\": 4, \"num_vectors\": 5, "
                  "\"target_modules\": [\"q_proj\"], \"save_only_topk_weights\": true}");
    th_out_tensor at[5] = {
        pc_tensor("base_model.vblora_vector_bank", "F32", 2, bank, 0.1, 0),
        pc_tensor("base_model.model.model.layers.0.q_proj.vblora_logits_A_topk_indices", "I64", 3, ia, 0, 1),
        pc_tensor("base_model.model.model.layers.0.q_proj.vblora_logits_A_topk_weights", "F32", 3, wa, 0, 0.25),
        pc_tensor("base_model.model.model.layers.0.q_proj.vblora_logits_B_topk_indices", "I64", 3, ib, 0, 7),
        pc_tensor("base_model.model.model.layers.0.q_proj.vblora_logits_B_topk_weights", "F32", 3, wa, 0, 0.5),
    };
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", ad);
    pc_write(p, at, 5);
    const char *ads[1] = {ad};
    pc_refused_both_ways(tmp, ads, 1, base, "IndexOutOfRange", "outside the bank");
    th_rmrf(tmp);
    free(tmp);
}

/* a LoRA r=1 merge of W [4, 4] (dtype) with factors of size `f` and alpha; exit status and stderr */
static th_run_result pc_lora_merge(const char *tmp, const char *dtype, double f, const char *alpha, const char *out_dtype)
{
    char base[600], ad[600], p[700], out[700], cfg[256];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t w[2] = {4, 4}, A[2] = {1, 4}, B[2] = {4, 1};
    th_out_tensor bt[1] = {pc_tensor("model.layers.0.q_proj.weight", dtype, 2, w, 0.1, 0)};
    pc_write(base, bt, 1);
    snprintf(cfg, sizeof cfg, "{\"peft_type\": \"LORA\", \"r\": 1, \"lora_alpha\": %s, \"target_modules\": [\"q_proj\"]}",
             alpha);
    pc_config(ad, cfg);
    th_out_tensor at[2] = {pc_tensor("base_model.model.model.layers.0.q_proj.lora_A.weight", "F32", 2, A, 0, f),
                           pc_tensor("base_model.model.model.layers.0.q_proj.lora_B.weight", "F32", 2, B, 0, f)};
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", ad);
    pc_write(p, at, 2);
    const char *argv[] = {th_bin(), "--dtype", out_dtype, base, ad, out, NULL};
    return th_run(NULL, argv);
}

Test(plan_checks, results_beyond_f16_are_refused_not_written_as_inf)
{
    char *tmp = th_tmpdir(), out[700];
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    /* delta = 1 * 300 * 300 = 90000 > 65504: fine in f32 and bf16, not in f16 */
    th_run_result r = pc_lora_merge(tmp, "F32", 300, "1", "f16");
    cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "NonFiniteResult"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "model.layers.0.q_proj.weight"), "names the tensor: %s", r.err);
    cr_assert_not_null(strstr(r.err, "F16"), "names the dtype: %s", r.err);
    cr_assert(!th_exists(out));
    th_run_free(&r);
    r = pc_lora_merge(tmp, "F32", 300, "1", "bf16");
    cr_assert_eq(r.status, 0, "bf16 holds 90000: %s", r.err);
    th_run_free(&r);
    th_rmrf(tmp);
    free(tmp);
}

Test(plan_checks, overflowing_deltas_are_refused)
{
    /* finite factors of 3e38 overflow f32 in the product; alpha 1e308 overflows the scale */
    char *tmp = th_tmpdir(), out[700];
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    th_run_result r = pc_lora_merge(tmp, "F32", 3e38, "1", "auto");
    cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "NonFiniteResult"), "%s", r.err);
    cr_assert(!th_exists(out));
    th_run_free(&r);
    r = pc_lora_merge(tmp, "BF16", 0.5, "1e308", "auto");
    cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "NonFiniteResult") != NULL || strstr(r.err, "scale") != NULL, "%s", r.err);
    cr_assert(!th_exists(out));
    th_run_free(&r);
    th_rmrf(tmp);
    free(tmp);
}

Test(plan_checks, types_that_are_not_deltas_take_no_weight)
{
    /* IA3 scales the weight: --scale 0.5 used to be ignored silently; now refused, dry run too */
    char *tmp = th_tmpdir(), base[600], ad[600], p[700], out[700];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t w[2] = {6, 4}, l[1] = {6};
    th_out_tensor bt[1] = {pc_tensor("model.layers.0.q_proj.weight", "F32", 2, w, 0.1, 0)};
    pc_write(base, bt, 1);
    pc_config(ad, "{\"peft_type\": \"IA3\", \"target_modules\": [\"q_proj\"], \"feedforward_modules\": []}");
    th_out_tensor at[1] = {pc_tensor("base_model.model.model.layers.0.q_proj.ia3_l", "F32", 1, l, 0, 1.25)};
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", ad);
    pc_write(p, at, 1);
    for (int dry = 0; dry < 2; dry++) {
        const char *argv[] = {th_bin(), "--scale", "0.5", dry ? "--dry-run" : "-q", base, ad, out, NULL};
        th_run_result r = th_run(NULL, argv);
        cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
        cr_assert_not_null(strstr(r.err, "IA3 adapter is not a delta"), "%s", r.err);
        cr_assert(!th_exists(out));
        th_run_free(&r);
    }
    const char *argv[] = {th_bin(), "-q", base, ad, out, NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "weight 1 merges: %s", r.err);
    th_run_free(&r);
    th_rmrf(tmp);
    free(tmp);
}

/* issue 15 item 7: a config value PEFT builds the tensors from (a rank, a block size or count) that
 * the tensors contradict is refused, naming adapter_config.json, the key and the value (before:
 * oft_block_size 1e9, boft_block_size 1e9, r 1e9 of HRA, MiSS, VeRA, PVeRA, DeLoRA, HiRA merged
 * with exit 0, the shapes deciding); the fixtures' own values still merge (golden suite) */
Test(plan_checks, config_values_the_tensors_contradict_are_refused, .timeout = 120)
{
    if (!th_have_shared())
        cr_skip_test("needs ../shared/fixtures");
    static const struct {
        const char *type, *key;
        double value;
        const char *kind;
        const char *json, *shows; /* the key's JSON value and what the message shows, when not `value` */
    } cases[] = {
        {"oft", "oft_block_size", 1e9, "ConfigMismatch", NULL, NULL},
        {"oft", "oft_block_size", 3, "ConfigMismatch", NULL, NULL},
        {"oft", "r", 4, "InvalidConfig", NULL, NULL}, /* both r and oft_block_size: PEFT's OFTConfig refuses it too */
        {"boft", "boft_block_size", 1e9, "ConfigMismatch", NULL, NULL},
        {"boft", "boft_block_size", 8, "ConfigMismatch", NULL, NULL},
        {"boft", "boft_n_butterfly_factor", 1e9, "ConfigMismatch", NULL, NULL},
        {"boft", "boft_block_num", 1e9, "InvalidConfig", NULL, NULL},
        {"hra", "r", 1e9, "ConfigMismatch", NULL, NULL},
        {"miss", "r", 1e9, "ConfigMismatch", NULL, NULL},
        {"vera", "r", 1e9, "ConfigMismatch", NULL, NULL},
        {"vera", "r", 4, "ConfigMismatch", NULL, NULL},
        {"pvera", "r", 1e9, "ConfigMismatch", NULL, NULL},
        {"delora", "r", 1e9, "ConfigMismatch", NULL, NULL},
        {"hira", "r", 1e9, "ConfigMismatch", NULL, NULL},
        /* LoKr, FourierFT, C3A, SHiRA, GLoRA, DeFT (all exit 0 before) */
        {"lokr", "decompose_factor", 2, "ConfigMismatch", NULL, NULL},
        {"fourierft", "n_frequency", 1e9, "ConfigMismatch", NULL, NULL},
        {"fourierft", "n_frequency", 59, "ConfigMismatch", NULL, NULL},
        {"fourierft", "n_frequency_pattern", 30, "ConfigMismatch", "{\"q_proj\": 30}", NULL},
        {"c3a", "block_size", 1e9, "ConfigMismatch", NULL, NULL},
        {"c3a", "block_size", 8, "ConfigMismatch", NULL, NULL},
        {"c3a", "block_size_pattern", 2, "ConfigMismatch", "{\"nomatch\": 4, \"v_proj\": 2}", NULL},
        {"shira", "r", 1e9, "ConfigMismatch", NULL, NULL}, {"shira", "r", 2, "ConfigMismatch", NULL, NULL},
        {"glora", "r", 1e9, "ConfigMismatch", NULL, NULL},
        {"glora", "config_A_B", 0, "ConfigMismatch", "\"vector\"", "\"lora\""},
        {"deft", "r", 1e9, "ConfigMismatch", NULL, NULL}, {"deft", "r", 8, "ConfigMismatch", NULL, NULL},
    };
    char *tmp = th_tmpdir();
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char g[600], ad[700], cfgp[800], out[700], cmd[3000];
        snprintf(g, sizeof g, TH_SHARED "/peft-golden/%s", cases[i].type);
        snprintf(ad, sizeof ad, "%s/a", tmp);
        snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s/adapter' '%s'", ad, g, ad);
        th_run_result r = th_sh(cmd);
        cr_assert_eq(r.status, 0, "%s", r.err);
        th_run_free(&r);
        snprintf(cfgp, sizeof cfgp, "%s/adapter_config.json", ad);
        size_t n;
        char *text = (char *)th_read_file(cfgp, &n);
        cr_assert_not_null(text);
        cJSON *root = cJSON_ParseWithLength(text, n);
        free(text);
        cr_assert_not_null(root);
        cJSON_DeleteItemFromObjectCaseSensitive(root, cases[i].key);
        if (cases[i].json != NULL)
            cJSON_AddItemToObject(root, cases[i].key, cJSON_Parse(cases[i].json));
        else
            cJSON_AddNumberToObject(root, cases[i].key, cases[i].value);
        text = cJSON_Print(root);
        cJSON_Delete(root);
        cr_assert_eq(th_write_file(cfgp, text, strlen(text)), 0);
        free(text);
        snprintf(out, sizeof out, "%s/o.safetensors", tmp);
        snprintf(g, sizeof g, TH_SHARED "/peft-golden/%s/base", cases[i].type);
        r = th_runv(g, ad, out, NULL);
        char val[32];
        snprintf(val, sizeof val, "%.0f", cases[i].value);
        if (cases[i].shows != NULL)
            snprintf(val, sizeof val, "%s", cases[i].shows);
        cr_expect_eq(r.status, 1, "%s %s=%s: exit %d: %s", cases[i].type, cases[i].key, val, r.status, r.err);
        cr_expect(strstr(r.err, cases[i].kind) != NULL && strstr(r.err, "adapter_config.json") != NULL &&
                      strstr(r.err, cases[i].key) != NULL && strstr(r.err, val) != NULL,
                  "%s %s=%s: expected %s naming the file, key and value: %s", cases[i].type, cases[i].key, val,
                  cases[i].kind, r.err);
        cr_expect(!th_exists(out));
        th_run_free(&r);
    }
    th_rmrf(tmp);
    free(tmp);
}

/* LoKr with both factors split, as PEFT makes them for W [16, 16] at r 1 with decompose_both (and
 * decompose_factor -1 or 4: w1, w2 4 x 4): merges; decompose_both false (PEFT keeps w1 whole) or
 * decompose_factor 2 (PEFT makes w1 [2, 2], w2 [8, 8]) contradict the tensors (exit 0 before) */
Test(plan_checks, lokr_decompose_keys_the_factors_contradict_are_refused)
{
    char *tmp = th_tmpdir(), base[600], ad[600], p[700], out[700];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    uint64_t w[2] = {16, 16}, fa[2] = {4, 1}, fb[2] = {1, 4};
    th_out_tensor bt[1] = {pc_tensor("model.layers.0.q_proj.weight", "F32", 2, w, 0.1, 0)};
    pc_write(base, bt, 1);
    th_out_tensor at[4] = {pc_tensor("base_model.model.model.layers.0.q_proj.lokr_w1_a", "F32", 2, fa, 0.5, 0),
                           pc_tensor("base_model.model.model.layers.0.q_proj.lokr_w1_b", "F32", 2, fb, 0.5, 0),
                           pc_tensor("base_model.model.model.layers.0.q_proj.lokr_w2_a", "F32", 2, fa, 0.5, 0),
                           pc_tensor("base_model.model.model.layers.0.q_proj.lokr_w2_b", "F32", 2, fb, 0.5, 0)};
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", ad);
    mkdir(ad, 0777);
    pc_write(p, at, 4);
    static const struct {
        const char *extra, *key; /* key NULL: merges */
    } cases[] = {
        {"\"decompose_both\": true, \"decompose_factor\": -1", NULL},
        {"\"decompose_both\": true, \"decompose_factor\": 4", NULL},
        {"\"decompose_both\": false", "\"decompose_both\": 0"},
        {"\"decompose_both\": true, \"decompose_factor\": 2", "\"decompose_factor\": 2"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char cfg[400];
        snprintf(cfg, sizeof cfg, "{\"peft_type\": \"LOKR\", \"r\": 1, \"alpha\": 1, %s, "
                 "\"target_modules\": [\"q_proj\"]}", cases[i].extra);
        pc_config(ad, cfg);
        if (cases[i].key != NULL) {
            const char *ads[1] = {ad};
            pc_refused_both_ways(tmp, ads, 1, base, "ConfigMismatch", cases[i].key);
            continue;
        }
        const char *argv[] = {th_bin(), "-q", base, ad, out, NULL};
        th_run_result r = th_run(NULL, argv);
        cr_assert_eq(r.status, 0, "%s: exit %d: %s", cases[i].extra, r.status, r.err);
        th_run_free(&r);
        remove(out);
    }
    th_rmrf(tmp);
    free(tmp);
}
