/* SPDX-License-Identifier: MIT */
/* test_report.c : what lora-merge says, for people and for CI pipelines.
 *   - a merge that changes nothing is an error (an adapter that lands nowhere, deltas all zero),
 *     accepted with a warning under --allow-noop
 *   - the base an adapter declares is compared with the base given (BaseModelMismatch), and
 *     --strict turns warnings into exit status 5 before anything is written
 *   - inputs that are not what they seem (Git LFS pointers, GGUF, PyTorch pickles, Hub ids,
 *     swapped arguments) get an error that says what they are
 *   - --json: errors are JSON objects on stdout with the same exit status; inspect --json
 *   - the progress bar ends at 100% with a rate
 *   - every warning code the sources can emit is documented in the README and the man page
 * Everything is generated here. */
#include "th.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    char *tmp;
    char base[700], ad[700], out[700];
} rp_fx;

#define rp_path(dst, cap, dir, name) cr_assert_eq(th_path(dst, cap, dir, name), 0, "path too long")
#define rp_write(dir, name, text) cr_assert_eq(th_write_text(dir, name, text), 0, "cannot write %s", name)

/* base/model.safetensors (q_proj [4, 6], norm [6]) + config.json; adapter: LoRA r=2 on q_proj;
 * b_scale multiplies lora_B (0: an untrained adapter) */
static void rp_adapter(rp_fx *f, const char *config, double b_scale)
{
    double A[2 * 6], B[4 * 2];
    uint64_t seed = 7;
    for (int i = 0; i < 12; i++)
        A[i] = th_round_to(0.3 * th_rand_uniform(&seed), "F32");
    for (int i = 0; i < 8; i++)
        B[i] = th_round_to(b_scale * th_rand_uniform(&seed), "F32");
    th_out_tensor t[] = {{"base_model.model.model.layers.0.q_proj.lora_A.weight", "F32", 2, {2, 6}, A},
                         {"base_model.model.model.layers.0.q_proj.lora_B.weight", "F32", 2, {4, 2}, B}};
    char p[1400];
    rp_path(p, sizeof p, f->ad, "adapter_model.safetensors");
    cr_assert_eq(th_st_write(p, t, 2), 0);
    rp_write(f->ad, "adapter_config.json", config);
}

static const char RP_ADAPTER_CONFIG[] =
    "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": [\"q_proj\"], "
    "\"base_model_name_or_path\": \"meta-llama/Llama-3.2-1B\"}";

static void rp_make(rp_fx *f)
{
    memset(f, 0, sizeof *f);
    f->tmp = th_tmpdir();
    cr_assert_not_null(f->tmp);
    rp_path(f->base, sizeof f->base, f->tmp, "base");
    rp_path(f->ad, sizeof f->ad, f->tmp, "adapter");
    rp_path(f->out, sizeof f->out, f->tmp, "out.safetensors");
    cr_assert_eq(mkdir(f->base, 0777), 0);
    cr_assert_eq(mkdir(f->ad, 0777), 0);
    double W[4 * 6], n[6];
    uint64_t seed = 3;
    for (int i = 0; i < 24; i++)
        W[i] = th_round_to(th_rand_uniform(&seed), "BF16");
    for (int i = 0; i < 6; i++)
        n[i] = 1;
    th_out_tensor t[] = {{"model.layers.0.q_proj.weight", "BF16", 2, {4, 6}, W}, {"model.norm.weight", "BF16", 1, {6}, n}};
    char p[1400];
    rp_path(p, sizeof p, f->base, "model.safetensors");
    cr_assert_eq(th_st_write(p, t, 2), 0);
    rp_write(f->base, "config.json",
             "{\"_name_or_path\": \"meta-llama/Llama-3.2-1B\", \"model_type\": \"llama\", \"torch_dtype\": \"bfloat16\"}");
    rp_adapter(f, RP_ADAPTER_CONFIG, 0.1);
}

static void rp_free(rp_fx *f)
{
    th_rmrf(f->tmp);
    free(f->tmp);
}

#define rp_run th_runv

/* a refusal: status, one error line with every key, nothing written */
static void rp_refused(const rp_fx *f, const th_run_result *r, int status, const char *k1, const char *k2)
{
    cr_assert_eq(r->status, status, "exit %d (expected %d): %s", r->status, status, r->err);
    cr_assert(strncmp(r->err, "error: ", 7) == 0 && strchr(r->err, '\n') == r->err + strlen(r->err) - 1,
              "not one error line: [%s]", r->err);
    cr_assert(k1 == NULL || strstr(r->err, k1) != NULL, "stderr lacks '%s': %s", k1, r->err);
    cr_assert(k2 == NULL || strstr(r->err, k2) != NULL, "stderr lacks '%s': %s", k2, r->err);
    cr_assert(!th_exists(f->out), "something was written: %s", f->out);
}

/* ============================================================================================ */
/* no silent no-ops                                                                              */
/* ============================================================================================ */
/* refused as a no-op (the message holds key), then accepted with --allow-noop and a warning;
 * frees f */
static void rp_noop_then_allowed(rp_fx *f, const char *key)
{
    th_run_result r = rp_run(f->base, f->ad, f->out, NULL);
    rp_refused(f, &r, 1, "NoOp", key);
    th_run_free(&r);
    r = rp_run("--allow-noop", f->base, f->ad, f->out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "warning: [NoOpAllowed]") != NULL, "%s", r.err);
    th_run_free(&r);
    rp_free(f);
}

Test(report, adapter_that_lands_nowhere_is_an_error)
{
    rp_fx f;
    rp_make(&f);
    rp_adapter(&f, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": [\"v_proj\"]}", 0.1);
    th_run_result r = rp_run(f.base, f.ad, f.out, NULL);
    rp_refused(&f, &r, 1, "NoOp", "changes no tensor");
    th_run_free(&r);
    r = rp_run("--allow-noop", "--json", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.out, "\"code\":\"NoOpAllowed\"") != NULL, "%s", r.out);
    th_run_free(&r);
    rp_free(&f);
}

Test(report, all_zero_deltas_are_an_error)
{
    rp_fx f;
    rp_make(&f);
    rp_adapter(&f, RP_ADAPTER_CONFIG, 0.0); /* lora_B as PEFT initialises it */
    rp_noop_then_allowed(&f, "zero");
}

/* a zero weight (--scale 0) or alpha multiplies every delta by 0: refused when planned, so a dry
 * run refuses it as the merge does, with the same line (before: --dry-run exit 0, the merge exit 1
 * only after writing every tile, "changes no element once rounded") */
Test(report, zero_weight_is_a_noop_dry_run_too)
{
    rp_fx f;
    rp_make(&f);
    th_run_result r = rp_run("--scale", "0", f.base, f.ad, f.out, NULL);
    rp_refused(&f, &r, 1, "NoOp", "every delta of the adapter is multiplied by 0");
    th_run_result d = rp_run("--dry-run", "--scale", "0", f.base, f.ad, f.out, NULL);
    rp_refused(&f, &d, 1, NULL, NULL);
    cr_assert_str_eq(d.err, r.err, "the dry run and the merge disagree");
    th_run_free(&r);
    th_run_free(&d);
    /* an alpha of 0 is the same zero */
    rp_adapter(&f, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 0, \"target_modules\": [\"q_proj\"]}", 0.1);
    r = rp_run("--dry-run", f.base, f.ad, f.out, NULL);
    rp_refused(&f, &r, 1, "NoOp", "multiplied by 0");
    th_run_free(&r);
    rp_noop_then_allowed(&f, "multiplied by 0");
}

/* which ops a zero weight empties, per kind (merge.c, op_scale_is_zero), on the golden fixtures:
 * low-rank deltas (LoRA, VeRA, PEANuT, which derives its factors from the base), added deltas
 * (BEFT) and the method ops that scale a delta (LoHa, LoKr, C3A, HiRA, FourierFT, MiSS, SHiRA,
 * WaveFT) are refused by the dry run and the merge with the same line; DoRA at weight 0 still
 * rescales W (m / ||W|| W), so both accept it and the merge changes the weights; IA3 (not a delta)
 * takes no weight but 1 */
Test(report, zero_weight_per_op_kind, .timeout = 120)
{
    if (!th_have_shared())
        cr_skip_test("needs ../shared/fixtures");
    static const struct {
        const char *type;
        int status; /* 1: NoOp; 0: merges; 2: refused for the weight itself (exit 1 too) */
    } cases[] = {{"lora_qv", 1},  {"vera", 1},   {"peanut", 1}, {"beft", 1},      {"loha", 1},
                 {"lokr", 1},     {"c3a", 1},    {"hira", 1},   {"fourierft", 1}, {"miss", 1},
                 {"shira", 1},    {"waveft", 1}, {"lora_dora", 0}, {"ia3", 2}};
    char *tmp = th_tmpdir();
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char base[600], ad[600], out[700];
        snprintf(base, sizeof base, TH_SHARED "/peft-golden/%s/base", cases[i].type);
        snprintf(ad, sizeof ad, TH_SHARED "/peft-golden/%s/adapter", cases[i].type);
        snprintf(out, sizeof out, "%s/o", tmp);
        th_run_result d = rp_run("--dry-run", "--scale", "0", base, ad, out, NULL);
        th_run_result r = rp_run("--scale", "0", base, ad, out, NULL);
        const char *t = cases[i].type;
        if (cases[i].status == 0) {
            cr_assert_eq(d.status, 0, "%s dry run: exit %d: %s", t, d.status, d.err);
            cr_assert_eq(r.status, 0, "%s: exit %d: %s", t, r.status, r.err);
            char in[700], o[800];
            snprintf(in, sizeof in, "%s/model.safetensors", base);
            snprintf(o, sizeof o, "%s/model.safetensors", out);
            cr_assert(!th_files_equal(in, o), "%s at weight 0 wrote the base", t);
        } else {
            cr_assert_eq(r.status, d.status, "%s: the merge exits %d, the dry run %d: %s", t, r.status, d.status, d.err);
            cr_assert_eq(r.status, 1, "%s: exit %d: %s", t, r.status, r.err);
            cr_assert_str_eq(d.err, r.err, "%s: the dry run and the merge disagree", t);
            cr_assert(strstr(r.err, cases[i].status == 1 ? "NoOp: every delta of the adapter is multiplied by 0"
                                                         : "weight other than 1") != NULL, "%s: %s", t, r.err);
            cr_assert(!th_exists(out), "%s: something was written", t);
        }
        th_run_free(&d);
        th_run_free(&r);
        th_rmrf(out);
    }
    th_rmrf(tmp);
    free(tmp);
}

/* ============================================================================================ */
/* the base an adapter declares; --strict                                                        */
/* ============================================================================================ */
Test(report, base_model_mismatch_warning_and_strict)
{
    rp_fx f;
    rp_make(&f);
    rp_adapter(&f,
               "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": [\"q_proj\"], "
               "\"base_model_name_or_path\": \"mistralai/Mistral-7B-v0.1\"}", 0.1);
    th_run_result r = rp_run(f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "warning: [BaseModelMismatch]") && strstr(r.err, "Mistral-7B-v0.1"), "%s", r.err);
    th_run_free(&r);
    unlink(f.out);
    r = rp_run("--strict", f.base, f.ad, f.out, NULL);
    rp_refused(&f, &r, 5, "BaseModelMismatch", "--strict");
    th_run_free(&r);
    /* under --json the strict error is a JSON object with the same status */
    r = rp_run("--strict", "--json", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 5);
    cJSON *j = cJSON_Parse(r.out);
    cr_assert_not_null(j, "stdout is not JSON: %s", r.out);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(e, "kind")->valuestring, "BaseModelMismatch");
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(e, "exit_status")->valuedouble, 5);
    cJSON_Delete(j);
    th_run_free(&r);
    /* the same declared base as the base's config: no warning, --strict passes */
    rp_adapter(&f, RP_ADAPTER_CONFIG, 0.1);
    r = rp_run("--strict", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "warning") == NULL, "%s", r.err);
    th_run_free(&r);
    /* inspect shows the declared base */
    r = rp_run("inspect", f.ad, NULL);
    cr_assert(strstr(r.out, "base_model_name_or_path: meta-llama/Llama-3.2-1B") != NULL, "%s", r.out);
    th_run_free(&r);
    rp_free(&f);
}

/* ============================================================================================ */
/* inputs that are not what they seem                                                            */
/* ============================================================================================ */
static const char LFS_POINTER[] = "version https://git-lfs.github.com/spec/v1\n"
                                  "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                                  "size 2336927755\n";

Test(report, git_lfs_pointer_base_and_adapter)
{
    rp_fx f;
    rp_make(&f);
    rp_write(f.base, "model.safetensors", LFS_POINTER);
    th_run_result r = rp_run(f.base, f.ad, f.out, NULL);
    rp_refused(&f, &r, 1, "git lfs pull", "model.safetensors");
    cr_assert(strstr(r.err, "header length") == NULL, "%s", r.err);
    th_run_free(&r);
    rp_fx g;
    rp_make(&g);
    rp_write(g.ad, "adapter_model.safetensors", LFS_POINTER);
    r = rp_run(g.base, g.ad, g.out, NULL);
    rp_refused(&g, &r, 1, "git lfs pull", "adapter_model.safetensors");
    th_run_free(&r);
    rp_free(&f);
    rp_free(&g);
}

Test(report, gguf_base_and_broken_pickle)
{
    rp_fx f;
    rp_make(&f);
    char p[1400];
    rp_path(p, sizeof p, f.tmp, "model.gguf");
    cr_assert_eq(th_write_file(p, "GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 24), 0);
    th_run_result r = rp_run(p, f.ad, f.out, NULL);
    rp_refused(&f, &r, 1, "GGUF", "model.gguf");
    th_run_free(&r);
    /* a .bin base is read by the restricted reader: a broken one is refused, naming the file */
    rp_path(p, sizeof p, f.tmp, "pytorch_model.bin");
    cr_assert_eq(th_write_file(p, "PK\x03\x04\x14\0\0\0\0\0archive/data.pkl", 26), 0);
    r = rp_run(p, f.ad, f.out, NULL);
    rp_refused(&f, &r, 1, "pytorch_model.bin", NULL);
    th_run_free(&r);
    /* an LFS pointer in its place */
    cr_assert_eq(th_write_file(p, LFS_POINTER, strlen(LFS_POINTER)), 0);
    r = rp_run(p, f.ad, f.out, NULL);
    rp_refused(&f, &r, 1, "git lfs pull", "pytorch_model.bin");
    th_run_free(&r);
    rp_free(&f);
}

Test(report, hub_ids_and_swapped_arguments)
{
    rp_fx f;
    rp_make(&f);
    th_run_result r = rp_run("meta-llama/Llama-3.2-1B", f.ad, f.out, NULL);
    rp_refused(&f, &r, 2, "Hub id", "huggingface-cli download");
    th_run_free(&r);
    r = rp_run(f.base, "someone/my-lora", f.out, NULL);
    rp_refused(&f, &r, 2, "Hub id", "someone/my-lora");
    th_run_free(&r);
    r = rp_run(f.ad, f.base, f.out, NULL);
    rp_refused(&f, &r, 2, "order is BASE ADAPTER_DIR OUT", NULL);
    th_run_free(&r);
    rp_free(&f);
}

/* ============================================================================================ */
/* --json                                                                                         */
/* ============================================================================================ */
static cJSON *rp_json_error(const th_run_result *r, int status)
{
    cr_assert_eq(r->status, status, "exit %d: %s", r->status, r->err);
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithOpts(r->out, &end, 0);
    cr_assert_not_null(j, "stdout is not one JSON object: [%s]", r->out);
    cr_assert(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(j, "ok")), "%s", r->out);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    cr_assert(cJSON_IsObject(e), "%s", r->out);
    static const char *const keys[] = {"code", "kind", "exit_status", "path", "tensor", "message"};
    for (size_t i = 0; i < 6; i++)
        cr_assert_not_null(cJSON_GetObjectItemCaseSensitive(e, keys[i]), "error lacks %s: %s", keys[i], r->out);
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(e, "exit_status")->valuedouble, status);
    return j;
}

Test(report, json_errors_on_stdout)
{
    rp_fx f;
    rp_make(&f);
    /* a shape mismatch: code, kind, the adapter's module as the tensor */
    rp_adapter(&f, "{\"peft_type\": \"LORA\", \"r\": 3, \"lora_alpha\": 4, \"target_modules\": [\"q_proj\"]}", 0.1);
    th_run_result r = rp_run("--json", f.base, f.ad, f.out, NULL);
    cJSON *j = rp_json_error(&r, 1);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    cr_assert(strstr(cJSON_GetObjectItemCaseSensitive(e, "tensor")->valuestring, "q_proj") != NULL, "%s", r.out);
    cr_assert(strncmp(r.err, "error: ", 7) == 0, "the stderr line is gone: %s", r.err);
    cJSON_Delete(j);
    th_run_free(&r);
    /* a missing base: an I/O error, status 3 */
    char missing[800];
    rp_path(missing, sizeof missing, f.tmp, "nothing/here.safetensors");
    r = rp_run("--json", missing, f.ad, f.out, NULL);
    j = rp_json_error(&r, 3);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "error"), "code")->valuestring,
                     "IoError");
    cJSON_Delete(j);
    th_run_free(&r);
    /* a usage error */
    r = rp_run("--json", "--threads", "0", f.base, f.ad, f.out, NULL);
    j = rp_json_error(&r, 2);
    cJSON_Delete(j);
    th_run_free(&r);
    rp_free(&f);
}

/* --json on a directory OUT in shards, two threads: the files are read back for their sha256 on
 * both threads, and every file's is sha256sum's */
Test(report, json_sha256_of_every_file)
{
    rp_fx f;
    rp_make(&f);
    char out[800];
    snprintf(out, sizeof out, "%s/outdir/", f.tmp);
    th_run_result r = rp_run("--json", "--threads", "2", "--max-shard-size", "40", f.base, f.ad, out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cJSON *j = cJSON_Parse(r.out);
    cr_assert_not_null(j);
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(j, "files");
    cr_assert_geq(cJSON_GetArraySize(files), 4, "%s", r.out); /* two shards, the index, config.json ... */
    for (int i = 0; i < cJSON_GetArraySize(files); i++) {
        const cJSON *fi = cJSON_GetArrayItem(files, i);
        const char *path = cJSON_GetObjectItemCaseSensitive(fi, "path")->valuestring;
        char cmd[1600];
        snprintf(cmd, sizeof cmd, "sha256sum '%s' | cut -c1-64", path);
        th_run_result s = th_sh(cmd);
        cr_assert_geq(strlen(s.out), 64, "%s", path);
        s.out[64] = '\0';
        cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(fi, "sha256")->valuestring, s.out, "%s", path);
        th_run_free(&s);
    }
    cJSON_Delete(j);
    th_run_free(&r);
    rp_free(&f);
}

Test(report, json_report_fields)
{
    rp_fx f;
    rp_make(&f);
    th_run_result r = rp_run("--json", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cJSON *j = cJSON_Parse(r.out);
    cr_assert_not_null(j);
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(j, "report_version")->valuedouble, 1);
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "ok")));
    const cJSON *t = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "changed_tensors"), 0);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(t, "name")->valuestring, "model.layers.0.q_proj.weight");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(t, "shape");
    cr_assert(cJSON_GetArraySize(shape) == 2 && cJSON_GetArrayItem(shape, 0)->valuedouble == 4 &&
              cJSON_GetArrayItem(shape, 1)->valuedouble == 6, "%s", r.out);
    cr_assert_not_null(cJSON_GetObjectItemCaseSensitive(t, "stats"));
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(j, "files");
    cr_assert_eq(cJSON_GetArraySize(files), 1);
    const cJSON *f0 = cJSON_GetArrayItem(files, 0);
    struct stat st;
    cr_assert_eq(stat(f.out, &st), 0);
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(f0, "bytes")->valuedouble, (double)st.st_size);
    char cmd[1600];
    snprintf(cmd, sizeof cmd, "sha256sum '%s' | cut -c1-64", f.out);
    th_run_result s = th_sh(cmd);
    s.out[64] = '\0';
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(f0, "sha256")->valuestring, s.out);
    th_run_free(&s);
    const cJSON *a0 = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "adapters"), 0);
    snprintf(cmd, sizeof cmd, "sha256sum '%s/adapter_model.safetensors' | cut -c1-64", f.ad);
    s = th_sh(cmd);
    s.out[64] = '\0';
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(a0, "sha256")->valuestring, s.out);
    th_run_free(&s);
    static const char *const keys[] = {"warnings", "notes", "timings", "summary", "removed", "out_dtype"};
    for (size_t i = 0; i < 6; i++)
        cr_assert_not_null(cJSON_GetObjectItemCaseSensitive(j, keys[i]), "no %s: %s", keys[i], r.out);
    const cJSON *tm = cJSON_GetObjectItemCaseSensitive(j, "timings");
    static const char *const phases[] = {"open", "plan", "prepare", "write", "finish", "hash", "total"};
    for (size_t i = 0; i < 7; i++)
        cr_assert(cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(tm, phases[i])), "no timing %s", phases[i]);
    cJSON_Delete(j);
    th_run_free(&r);
    rp_free(&f);
}

Test(report, inspect_json)
{
    rp_fx f;
    rp_make(&f);
    th_run_result r = rp_run("inspect", "--json", f.base, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cJSON *j = cJSON_Parse(r.out);
    cr_assert_not_null(j, "not JSON: %s", r.out);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(j, "kind")->valuestring, "model");
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(j, "tensors")), 2);
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "config");
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(c, "model_type")->valuestring, "llama");
    cJSON_Delete(j);
    th_run_free(&r);
    r = rp_run("inspect", f.ad, "--json", NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    j = cJSON_Parse(r.out);
    cr_assert_not_null(j, "not JSON: %s", r.out);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(j, "kind")->valuestring, "adapter");
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(j, "base_model_name_or_path")->valuestring, "meta-llama/Llama-3.2-1B");
    cJSON_Delete(j);
    th_run_free(&r);
    /* an error under inspect --json */
    char bad[800];
    rp_path(bad, sizeof bad, f.tmp, "nope.safetensors");
    r = rp_run("inspect", "--json", bad, NULL);
    j = rp_json_error(&r, 3);
    cJSON_Delete(j);
    th_run_free(&r);
    rp_free(&f);
}

/* the bar's last state: 100%, with a rate */
Test(report, progress_bar_ends_at_100_percent)
{
    rp_fx f;
    rp_make(&f);
    th_run_result r = rp_run("--progress", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    const char *last = strrchr(r.err, '\r');
    cr_assert_not_null(last, "no progress bar: %s", r.err);
    cr_assert(strstr(last, "100%") != NULL && strstr(last, "MB/s") != NULL, "last state: %s", last);
    th_run_free(&r);
    rp_free(&f);
}

/* ============================================================================================ */
/* stable warning codes, documented                                                              */
/* ============================================================================================ */
static char *rp_slurp(const char *path)
{
    size_t n;
    uint8_t *b = th_read_file(path, &n);
    cr_assert_not_null(b, "cannot read %s", path);
    char *s = realloc(b, n + 1);
    s[n] = '\0';
    return s;
}

Test(report, every_warning_code_is_documented)
{
    char *readme = rp_slurp("README.md"), *man = rp_slurp("doc/lora-merge.1");
    DIR *d = opendir("src/engine");
    cr_assert_not_null(d);
    struct dirent *de;
    int n_codes = 0;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (len < 3 || strcmp(de->d_name + len - 2, ".c") != 0)
            continue;
        char p[600];
        snprintf(p, sizeof p, "src/engine/%s", de->d_name);
        char *src = rp_slurp(p);
        for (const char *s = strstr(src, "lm_report_warn("); s; s = strstr(s + 1, "lm_report_warn(")) {
            const char *q = strchr(s, '"'), *semi = strchr(s, ';');
            if (q == NULL || (semi && semi < q))
                continue; /* the declaration or a call with a variable code */
            const char *e = strchr(q + 1, '"');
            char code[64];
            snprintf(code, sizeof code, "%.*s", (int)(e - q - 1), q + 1);
            char md[80], roff[80];
            snprintf(md, sizeof md, "`%s`", code);
            snprintf(roff, sizeof roff, ".B %s\n", code);
            cr_expect(strstr(readme, md) != NULL, "warning code %s (%s) is not in the README", code, p);
            cr_expect(strstr(man, roff) != NULL, "warning code %s (%s) is not in the man page", code, p);
            n_codes++;
        }
        free(src);
    }
    closedir(d);
    cr_assert_geq(n_codes, 5, "found only %d warning codes", n_codes);
    free(readme);
    free(man);
}

/* ============================================================================================ */
/* what the merge changed, measured on the values written                                        */
/* ============================================================================================ */
#define RS_O 128
#define RS_I 64

typedef struct {
    double W[RS_O * RS_I], A[2 * RS_I], B[RS_O * 2];
} rs_data;

/* base: one BF16 tensor [128, 64] (plus a norm); adapter: r=2, alpha 4 (scale 2); lora_B row o
 * is b_row(o) times random values */
static void rs_make(rp_fx *f, rs_data *d, double (*b_row)(int o))
{
    rp_make(f);
    uint64_t seed = 11;
    for (int i = 0; i < RS_O * RS_I; i++)
        d->W[i] = th_round_to(0.5 + 0.4 * th_rand_uniform(&seed), "BF16");
    for (int i = 0; i < 2 * RS_I; i++)
        d->A[i] = th_round_to(0.5 * th_rand_uniform(&seed), "F32");
    for (int o = 0; o < RS_O; o++)
        for (int k = 0; k < 2; k++)
            d->B[o * 2 + k] = th_round_to(b_row(o) * th_rand_uniform(&seed), "F32");
    double n[6] = {1, 1, 1, 1, 1, 1};
    th_out_tensor t[] = {{"model.layers.0.q_proj.weight", "BF16", 2, {RS_O, RS_I}, d->W},
                         {"model.norm.weight", "BF16", 1, {6}, n}};
    char p[1400];
    rp_path(p, sizeof p, f->base, "model.safetensors");
    cr_assert_eq(th_st_write(p, t, 2), 0);
    th_out_tensor a[] = {{"base_model.model.model.layers.0.q_proj.lora_A.weight", "F32", 2, {2, RS_I}, d->A},
                         {"base_model.model.model.layers.0.q_proj.lora_B.weight", "F32", 2, {RS_O, 2}, d->B}};
    rp_path(p, sizeof p, f->ad, "adapter_model.safetensors");
    cr_assert_eq(th_st_write(p, a, 2), 0);
}

static double rs_normal(int o) { (void)o; return 0.05; }
static double rs_tiny(int o) { (void)o; return 1e-7; }
static double rs_one_row(int o) { return o == 0 ? 0.5 : 1e-7; }

/* n_changed, ||dW|| and ||W|| in the JSON report against a computation in double written here */
Test(report, tensor_stats_exact)
{
    rp_fx f;
    rs_data d;
    rs_make(&f, &d, rs_normal);
    th_run_result r = rp_run("--json", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    uint64_t want_changed = 0;
    double d2 = 0, b2 = 0;
    for (int o = 0; o < RS_O; o++)
        for (int i = 0; i < RS_I; i++) {
            double w = d.W[o * RS_I + i], delta = 2.0 * (d.B[o * 2] * d.A[i] + d.B[o * 2 + 1] * d.A[RS_I + i]);
            double written = th_round_to(w + delta, "BF16"); /* the norms are of the values written */
            want_changed += written != w;
            d2 += (written - w) * (written - w);
            b2 += w * w;
        }
    cJSON *j = cJSON_Parse(r.out);
    const cJSON *t = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "changed_tensors"), 0);
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(t, "stats");
    cr_assert(cJSON_IsObject(st), "no stats: %s", r.out);
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(st, "n_elems")->valuedouble, RS_O * RS_I);
    double got = cJSON_GetObjectItemCaseSensitive(st, "n_changed")->valuedouble;
    /* f32 arithmetic may land the other side of a rounding boundary for a handful of elements */
    cr_assert(fabs(got - (double)want_changed) <= 3, "n_changed %.0f, expected %llu", got, (unsigned long long)want_changed);
    cr_assert_gt(want_changed, RS_O * RS_I / 2);
    double dn = cJSON_GetObjectItemCaseSensitive(st, "delta_norm")->valuedouble;
    double bn = cJSON_GetObjectItemCaseSensitive(st, "base_norm")->valuedouble;
    cr_assert(fabs(dn - sqrt(d2)) <= 1e-5 * sqrt(d2), "delta_norm %.9g, expected %.9g", dn, sqrt(d2));
    cr_assert(fabs(bn - sqrt(b2)) <= 1e-9 * sqrt(b2), "base_norm %.12g, expected %.12g", bn, sqrt(b2));
    cr_assert(fabs(cJSON_GetObjectItemCaseSensitive(st, "rel_delta_norm")->valuedouble - sqrt(d2) / sqrt(b2)) <=
              1e-5 * sqrt(d2) / sqrt(b2));
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(j, "summary");
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(s, "n_elements_changed")->valuedouble, got);
    cJSON_Delete(j);
    th_run_free(&r);
    /* the same numbers for every thread count */
    char out2[800];
    rp_path(out2, sizeof out2, f.tmp, "t1.safetensors");
    th_run_result r1 = rp_run("--json", "--threads", "1", "--tile-elems", "100", f.base, f.ad, out2, NULL);
    cr_assert_eq(r1.status, 0);
    cJSON *j1 = cJSON_Parse(r1.out);
    const cJSON *st1 = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j1, "changed_tensors"), 0), "stats");
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(st1, "n_changed")->valuedouble, got);
    cJSON_Delete(j1);
    th_run_free(&r1);
    rp_free(&f);
}

/* deltas below bf16's precision: the merge would write the base again, an error (NoOp) */
Test(report, deltas_lost_in_rounding_are_a_noop)
{
    rp_fx f;
    rs_data d;
    rs_make(&f, &d, rs_tiny);
    rp_noop_then_allowed(&f, "rounded to BF16");
}

/* one row of 128 changes: under 1% of the elements, a warning; an error under --strict */
Test(report, few_elements_changed_warning)
{
    rp_fx f;
    rs_data d;
    rs_make(&f, &d, rs_one_row);
    th_run_result r = rp_run("--json", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.out, "\"code\":\"FewElementsChanged\"") != NULL, "%s", r.out);
    th_run_free(&r);
    unlink(f.out);
    r = rp_run("--strict", f.base, f.ad, f.out, NULL);
    rp_refused(&f, &r, 5, "FewElementsChanged", NULL);
    th_run_free(&r);
    rp_free(&f);
}

/* a delta that overflows f16: refused naming the tensor, nothing written */
Test(report, non_finite_result_refused)
{
    rp_fx f;
    rs_data d;
    rs_make(&f, &d, rs_normal);
    rp_adapter(&f, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4e20, \"target_modules\": [\"q_proj\"]}", 0.1);
    th_out_tensor a[] = {{"base_model.model.model.layers.0.q_proj.lora_A.weight", "F32", 2, {2, RS_I}, d.A},
                         {"base_model.model.model.layers.0.q_proj.lora_B.weight", "F32", 2, {RS_O, 2}, d.B}};
    char p[1400];
    rp_path(p, sizeof p, f.ad, "adapter_model.safetensors");
    cr_assert_eq(th_st_write(p, a, 2), 0);
    th_run_result r = rp_run("--dtype", "f16", f.base, f.ad, f.out, NULL);
    rp_refused(&f, &r, 1, "NonFiniteResult", "model.layers.0.q_proj.weight");
    th_run_free(&r);
    rp_free(&f);
}
