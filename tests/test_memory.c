/* SPDX-License-Identifier: MIT */
/* test_memory.c : peak resident memory of a merge does not grow with the model: a model four
 * times larger (same layer shapes, more layers) must merge within a small constant of the
 * smaller one's peak.  Models come from bench/gen_model beside $LM_BIN (skipped visibly when it
 * is absent).  Not a timing test. */
#include "th.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static void mem_gen(const char *dir, const char *layers)
{
    char gen[4096];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    const char *argv[] = {gen, "--out", dir, "--hidden", "1024", "--inter", "2816", "--layers", layers, "--vocab",
                          "4096", "--heads", "16", "--kv-heads", "4", "--rank", "4", "--dtype", "f32", NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "gen_model: %s", r.err);
    th_run_free(&r);
}

/* peak RSS in KB of a merge run as a child */
static long mem_merge_peak(const char *dir)
{
    char base[1200], ad[1200], out[1200];
    snprintf(base, sizeof base, "%s/base/model.safetensors", dir);
    snprintf(ad, sizeof ad, "%s/adapter", dir);
    snprintf(out, sizeof out, "%s/out.safetensors", dir);
    pid_t pid = fork();
    if (pid == 0) {
        execl(th_bin(), th_bin(), "-q", "--threads", "2", base, ad, out, (char *)NULL);
        _exit(127);
    }
    int st;
    struct rusage ru;
    wait4(pid, &st, 0, &ru);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "merge of %s failed", dir);
    return ru.ru_maxrss;
}

Test(memory, peak_rss_does_not_grow_with_the_model, .timeout = 180)
{
    if (getenv("LM_ASAN") != NULL)
        cr_skip_test("sanitizer builds have their own memory overheads");
    char *tmp = th_tmpdir(), small[600], big[600];
    snprintf(small, sizeof small, "%s/small", tmp);
    snprintf(big, sizeof big, "%s/big", tmp);
    mem_gen(small, "2"); /* ~130 MB */
    mem_gen(big, "8");   /* ~440 MB */
    long rs = mem_merge_peak(small), rb = mem_merge_peak(big);
    /* the adapter grows too (r=4: ~1 MB per layer); everything else is tiles */
    cr_assert_lt(rb, rs + 16 * 1024, "peak RSS %ld KB for the big model vs %ld KB for the small one", rb, rs);
    cr_assert_lt(rb, 96 * 1024, "peak RSS %ld KB: more than the tiles in flight", rb);
    th_rmrf(tmp);
    free(tmp);
}

/* ---- memory does not grow with the number of modules, for types whose factors are built from
 * the stored tensors (FourierFT's positions and spectrum, VeRA's scaled slices of the shared
 * projections): they are built per tensor when its first tile is claimed and freed after its
 * last.  Before that, FourierFT kept a rank-2n factor pair per module (8 MB each here). */
#define MM_DIM 512

/* a bf16 base of `layers` layers with q_proj and v_proj [512, 512], all tensors sharing one
 * array of values */
static void mm_base(const char *path, int layers, const double *vals)
{
    th_out_tensor *t = calloc((size_t)layers * 2, sizeof *t);
    char (*names)[64] = calloc((size_t)layers * 2, sizeof *names);
    for (int l = 0; l < layers; l++)
        for (int k = 0; k < 2; k++) {
            size_t i = (size_t)l * 2 + (size_t)k;
            snprintf(names[i], sizeof names[i], "model.layers.%d.self_attn.%s.weight", l, k ? "v_proj" : "q_proj");
            t[i].name = names[i];
            t[i].dtype = "BF16";
            t[i].n_dims = 2;
            t[i].shape[0] = t[i].shape[1] = MM_DIM;
            t[i].values = vals;
        }
    cr_assert_eq(th_st_write(path, t, (size_t)layers * 2), 0);
    free(t);
    free(names);
}

/* the adapter: per module the tensors `parts` (name suffix, n_dims, shape), plus `shared` ones */
typedef struct {
    const char *suffix;
    int n_dims;
    uint64_t shape[2];
} mm_part;

static void mm_adapter(const char *dir, int layers, const char *config, const mm_part *parts, size_t n_parts,
                       const mm_part *shared, size_t n_shared, const double *vals)
{
    char p[1024];
    mkdir(dir, 0777);
    size_t n = (size_t)layers * 2 * n_parts + n_shared;
    th_out_tensor *t = calloc(n, sizeof *t);
    char (*names)[160] = calloc(n, sizeof *names);
    size_t k = 0;
    for (size_t s = 0; s < n_shared; s++, k++) {
        snprintf(names[k], sizeof names[k], "base_model.%s", shared[s].suffix);
        t[k] = (th_out_tensor){names[k], "F32", shared[s].n_dims, {shared[s].shape[0], shared[s].shape[1]}, vals};
    }
    for (int l = 0; l < layers; l++)
        for (int m = 0; m < 2; m++)
            for (size_t q = 0; q < n_parts; q++, k++) {
                snprintf(names[k], sizeof names[k], "base_model.model.model.layers.%d.self_attn.%s.%s", l,
                         m ? "v_proj" : "q_proj", parts[q].suffix);
                t[k] = (th_out_tensor){names[k], "F32", parts[q].n_dims, {parts[q].shape[0], parts[q].shape[1]}, vals};
            }
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    cr_assert_eq(th_st_write(p, t, n), 0);
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    cr_assert_eq(th_write_file(p, config, strlen(config)), 0);
    free(t);
    free(names);
}

/* peak RSS (KB) of merging `layers` layers of the type */
static long mm_peak(const char *tmp, int layers, const char *config, const mm_part *parts, size_t n_parts,
                    const mm_part *shared, size_t n_shared, const double *vals)
{
    char d[700], base[800], ad[800];
    snprintf(d, sizeof d, "%s/L%d", tmp, layers);
    mkdir(d, 0777);
    snprintf(base, sizeof base, "%s/base", d);
    mkdir(base, 0777);
    snprintf(base, sizeof base, "%s/base/model.safetensors", d);
    snprintf(ad, sizeof ad, "%s/adapter", d);
    mm_base(base, layers, vals);
    mm_adapter(ad, layers, config, parts, n_parts, shared, n_shared, vals);
    return mem_merge_peak(d);
}

static void mm_check_flat(const char *config, const mm_part *parts, size_t n_parts, const mm_part *shared,
                          size_t n_shared)
{
    if (getenv("LM_ASAN") != NULL)
        cr_skip_test("sanitizer builds have their own memory overheads");
    char *tmp = th_tmpdir();
    double *vals = malloc((size_t)MM_DIM * MM_DIM * sizeof *vals);
    uint64_t seed = 5;
    for (size_t i = 0; i < (size_t)MM_DIM * MM_DIM; i++)
        vals[i] = 0.02 * th_rand_normal(&seed);
    long p4 = mm_peak(tmp, 4, config, parts, n_parts, shared, n_shared, vals);
    long p16 = mm_peak(tmp, 16, config, parts, n_parts, shared, n_shared, vals);
    /* 24 more modules: the adapter file grows by their tensors only (a few MB at most) */
    cr_assert_lt(p16, p4 + 12 * 1024, "peak RSS %ld KB with 32 modules vs %ld KB with 8", p16, p4);
    free(vals);
    th_rmrf(tmp);
    free(tmp);
}

Test(memory, fourierft_does_not_grow_with_the_modules, .timeout = 180)
{
    static const mm_part parts[] = {{"fourierft_spectrum", 1, {1000, 0}}};
    mm_check_flat("{\"peft_type\": \"FOURIERFT\", \"n_frequency\": 1000, \"scaling\": 150.0, "
                  "\"target_modules\": [\"q_proj\", \"v_proj\"]}", parts, 1, NULL, 0);
}

Test(memory, vera_does_not_grow_with_the_modules, .timeout = 180)
{
    static const mm_part parts[] = {{"vera_lambda_b", 1, {MM_DIM, 0}}, {"vera_lambda_d", 1, {256, 0}}};
    static const mm_part shared[] = {{"vera_A", 2, {256, MM_DIM}}, {"vera_B", 2, {MM_DIM, 256}}};
    mm_check_flat("{\"peft_type\": \"VERA\", \"r\": 256, \"target_modules\": [\"q_proj\", \"v_proj\"]}", parts, 1 + 1,
                  shared, 2);
}

/* An adapter is read from its file mapping; pages already merged (and the pages the load-time
 * non-finite check reads) are dropped, so a large adapter is not resident as a whole: r=256 LoRA
 * factors are 1 MB per module here, 24 MB more with 32 modules than with 8. */
Test(memory, adapter_pages_are_not_kept_resident, .timeout = 180)
{
    static const mm_part parts[] = {{"lora_A.weight", 2, {256, MM_DIM}}, {"lora_B.weight", 2, {MM_DIM, 256}}};
    mm_check_flat("{\"peft_type\": \"LORA\", \"r\": 256, \"lora_alpha\": 16, \"target_modules\": [\"q_proj\", "
                  "\"v_proj\"]}", parts, 2, NULL, 0);
}
