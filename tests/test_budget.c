/* SPDX-License-Identifier: MIT */
/* test_budget.c : resource budgets as tests (issue 15, item 7).  Small inputs that used to cost
 * minutes of CPU: an adapter file of 60k tiny tensors (the name checks were linear per tensor:
 * quadratic in all, 114 s for 160k), and an OFT config asking for 10^15 Cayley-Neumann terms.
 * The CPU of the child process is measured with getrusage; the bounds are generous (the fixed
 * code needs under 1 s for each, plain build), the old code exceeds them by far. */
#include "th.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>

static double bu_child_cpu(void)
{
    struct rusage ru;
    cr_assert_eq(getrusage(RUSAGE_CHILDREN, &ru), 0);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
           1e-6 * (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

/* bound in seconds of CPU: generous, and more under ASan */
static double bu_bound(double plain)
{
    return getenv("LM_ASAN") != NULL ? 4 * plain : plain;
}

/* adapter_model.safetensors with n F32 [1, 1] tensors named like a PEFT LoRA */
static void bu_many_tensors(const char *dir, size_t n)
{
    size_t cap = n * 120 + 64, len = 0;
    char *h = malloc(cap);
    cr_assert_not_null(h);
    h[len++] = '{';
    for (size_t i = 0; i < n; i++)
        len += (size_t)snprintf(h + len, cap - len, "%s\"base_model.model.layers.%zu.mlp.w%zu.lora_%c.weight\":"
                                "{\"dtype\":\"F32\",\"shape\":[1,1],\"data_offsets\":[%zu,%zu]}",
                                i ? "," : "", i / 8, (i / 2) % 4, i % 2 ? 'B' : 'A', 4 * i, 4 * i + 4);
    h[len++] = '}';
    while (len % 8)
        h[len++] = ' ';
    char path[1200];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    uint8_t n8[8];
    for (int b = 0; b < 8; b++)
        n8[b] = (uint8_t)((uint64_t)len >> (8 * b));
    fwrite(n8, 1, 8, f);
    fwrite(h, 1, len, f);
    float one = 0.25f;
    for (size_t i = 0; i < n; i++)
        fwrite(&one, 4, 1, f);
    cr_assert_eq(fclose(f), 0);
    free(h);
    cr_assert_eq(th_write_text(dir, "adapter_config.json", "{\"peft_type\": \"LORA\", \"r\": 1, \"lora_alpha\": 1}"), 0);
}

Test(budget, sixty_thousand_tensors_load_in_linear_time, .timeout = 120)
{
    char *tmp = th_tmpdir();
    bu_many_tensors(tmp, 60000);
    double t0 = bu_child_cpu();
    /* the directory (PEFT layout) and the bare file (foreign-format detection) */
    th_run_result r = th_runv("inspect", tmp, NULL);
    cr_assert_eq(r.status, 0, "inspect: %d %s", r.status, r.err);
    cr_assert(strstr(r.out, "60000") != NULL || strstr(r.out, "30000") != NULL, "%.300s", r.out);
    th_run_free(&r);
    char file[1200];
    snprintf(file, sizeof file, "%s/adapter_model.safetensors", tmp);
    r = th_runv("inspect", file, NULL);
    th_run_free(&r);
    double used = bu_child_cpu() - t0;
    cr_assert(used < bu_bound(10.0), "60k tensors took %.1f s of CPU", used);
    cr_log_info("60k tensors: %.2f s of CPU for two inspects", used);
    th_rmrf(tmp);
    free(tmp);
}

Test(budget, oft_neumann_terms_do_not_scale_the_work, .timeout = 120)
{
    char gen[4096], ga[4200];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    snprintf(ga, sizeof ga, "%.*sgen_adapter", (int)(strlen(gen) - strlen("gen_model")), gen);
    char *tmp = th_tmpdir();
    char m[1200], base[1300], ad[1300], out[1300], cfg[1400];
    snprintf(m, sizeof m, "%s/m", tmp);
    const char *gargv[] = {gen, "--out", m, "--hidden", "128", "--inter", "256", "--layers", "1", "--vocab", "64",
                           "--rank", "4", NULL};
    th_run_result r = th_run(NULL, gargv);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    snprintf(base, sizeof base, "%s/base/model.safetensors", m);
    snprintf(ad, sizeof ad, "%s/oft", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    const char *aargv[] = {ga, "--base", base, "--out", ad, "--type", "oft", "--block", "32", NULL};
    r = th_run(NULL, aargv);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    snprintf(cfg, sizeof cfg, "%s/adapter_config.json", ad);
    size_t n;
    char *text = (char *)th_read_file(cfg, &n);
    cr_assert_not_null(text);
    char *at = strstr(text, "\"num_cayley_neumann_terms\": 5");
    cr_assert_not_null(at, "%s", text);
    char *patched = malloc(n + 32);
    snprintf(patched, n + 32, "%.*s\"num_cayley_neumann_terms\": 1000000000000000%s", (int)(at - text), text,
             at + strlen("\"num_cayley_neumann_terms\": 5"));
    cr_assert_eq(th_write_file(cfg, patched, strlen(patched)), 0);
    double t0 = bu_child_cpu();
    r = th_runv("-q", base, ad, out, NULL);
    double used = bu_child_cpu() - t0;
    cr_assert(r.status == 0 || r.status == 1, "exit %d: %s", r.status, r.err);
    cr_assert(used < bu_bound(10.0), "10^15 Neumann terms took %.1f s of CPU", used);
    th_run_free(&r);
    free(patched);
    free(text);
    th_rmrf(tmp);
    free(tmp);
}
