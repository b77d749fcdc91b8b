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
#include <sys/stat.h>
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
    uint8_t *raw = th_read_file(cfg, &n);
    cr_assert_not_null(raw);
    char *text = calloc(n + 1, 1); /* th_read_file does not terminate */
    memcpy(text, raw, n);
    free(raw);
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

/* ---- item 6: under an address-space limit, every run ends, with 0 or a clean exit 4 -------- */

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

/* runs argv with RLIMIT_AS = limit bytes, stderr to errf; returns the exit status, or -1 on a
 * signal, or -2 when it had to be killed after 30 s (a hang) */
static int bu_run_limited(const char *const *argv, rlim_t limit, const char *errf)
{
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        struct rlimit rl = {limit, limit};
        int fd = open(errf, O_WRONLY | O_CREAT | O_TRUNC, 0600), nul = open("/dev/null", O_WRONLY);
        if (fd < 0 || nul < 0 || dup2(fd, 2) < 0 || dup2(nul, 1) < 0 || setrlimit(RLIMIT_AS, &rl) != 0)
            _exit(120);
        execv(argv[0], (char *const *)argv);
        _exit(121);
    }
    int status = 0;
    for (int i = 0; i < 3000; i++) {
        if (waitpid(pid, &status, WNOHANG) == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -2;
}

Test(budget, address_space_limits_end_cleanly, .timeout = 240)
{
    if (getenv("LM_ASAN") != NULL)
        cr_skip_test("under ASan (its shadow memory needs terabytes of address space)");
    char gen[4096];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    char *tmp = th_tmpdir();
    char m[1200], base[1300], ad[1300], out[1300], ref[1300], errf[1300];
    snprintf(m, sizeof m, "%s/m", tmp);
    const char *gargv[] = {gen, "--out", m, "--hidden", "512", "--inter", "1376", "--layers", "2", "--vocab", "2048",
                           "--rank", "16", NULL};
    th_run_result r = th_run(NULL, gargv);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    snprintf(base, sizeof base, "%s/base/model.safetensors", m);
    snprintf(ad, sizeof ad, "%s/adapter", m);
    snprintf(ref, sizeof ref, "%s/ref.safetensors", tmp);
    snprintf(errf, sizeof errf, "%s/stderr", tmp);
    r = th_runv("-q", base, ad, ref, NULL);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    char bin[4096];
    snprintf(bin, sizeof bin, "%s", th_bin());
    int n_ok = 0, n_oom = 0;
    for (rlim_t mb = 30; mb <= 160; mb += 10) {
        const rlim_t lim = mb << 20;
        const char *ver[] = {bin, "--version", NULL};
        int st = bu_run_limited(ver, lim, errf);
        cr_assert(st == 0 || st == 4, "--version at %lu MB: status %d", (unsigned long)mb, st);
        for (int t = 0; t < 2; t++) {
            snprintf(out, sizeof out, "%s/out%d", tmp, t);
            th_rmrf(out);
            cr_assert_eq(mkdir(out, 0700), 0);
            char o[1400];
            snprintf(o, sizeof o, "%s/model.safetensors", out);
            const char *margv[] = {bin, "-q", "--threads", t ? "7" : "2", base, ad, o, NULL};
            st = bu_run_limited(margv, lim, errf);
            size_t n = 0;
            uint8_t *raw = th_read_file(errf, &n);
            char *e = calloc(n + 1, 1); /* terminated */
            cr_assert(raw != NULL && e != NULL);
            memcpy(e, raw, n);
            free(raw);
            cr_assert(st == 0 || st == 4, "merge at %lu MB (threads %s): status %d: %s", (unsigned long)mb,
                      margv[3], st, e ? e : "");
            if (st == 0) {
                cr_assert(th_files_equal(o, ref), "merge at %lu MB: not the unlimited run's bytes", (unsigned long)mb);
                n_ok++;
            } else {
                cr_assert(e != NULL && strstr(e, "OutOfMemory") != NULL && n > 0 && strchr(e, '\n') == e + n - 1,
                          "at %lu MB: %s", (unsigned long)mb, e ? e : "");
                cr_assert_eq(th_count_entries(out), 0, "at %lu MB a failed merge left files", (unsigned long)mb);
                n_oom++;
            }
            free(e);
        }
    }
    cr_log_info("address-space limits 30..160 MB: %d merges done, %d refused with exit 4", n_ok, n_oom);
    cr_assert(n_ok > 0 && n_oom > 0, "the sweep should cross the limit (%d done, %d refused)", n_ok, n_oom);
    th_rmrf(tmp);
    free(tmp);
}

/* ---- item 9: finite inputs whose merge is not finite are refused, naming the tensor ---------- */
/* (LoRA's exact path is covered in test_plan_checks; these go through the f32 tile path) */
Test(budget, non_finite_results_of_other_methods_refused, .timeout = 120)
{
    char gen[4096], ga[4200];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    snprintf(ga, sizeof ga, "%.*sgen_adapter", (int)(strlen(gen) - strlen("gen_model")), gen);
    char *tmp = th_tmpdir();
    char m[1000], base[1100], ad[1100], out[1100], cfg[1200];
    snprintf(m, sizeof m, "%s/m", tmp);
    const char *gargv[] = {gen, "--out", m, "--hidden", "128", "--inter", "256", "--layers", "1", "--vocab", "64",
                           "--rank", "4", "--dtype", "f32", NULL};
    th_run_result r = th_run(NULL, gargv);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    snprintf(base, sizeof base, "%s/base/model.safetensors", m);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    static const struct {
        const char *type, *key, *value;
    } cases[] = {{"fourierft", "\"scaling\": ", "1e308"}, {"loha", "\"alpha\": ", "1e308"},
                 {"dora", "\"lora_alpha\": ", "1e308"}, {"lokr", "\"alpha\": ", "1e308"}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(ad, sizeof ad, "%s/ad%zu", tmp, i);
        const char *aargv[] = {ga, "--base", base, "--out", ad, "--type", cases[i].type, NULL};
        r = th_run(NULL, aargv);
        cr_assert_eq(r.status, 0, "%s", r.err);
        th_run_free(&r);
        snprintf(cfg, sizeof cfg, "%s/adapter_config.json", ad);
        size_t n;
        uint8_t *raw = th_read_file(cfg, &n);
        cr_assert_not_null(raw);
        char *text = calloc(n + 1, 1), *patched = calloc(n + 64, 1);
        memcpy(text, raw, n);
        free(raw);
        char *at = strstr(text, cases[i].key);
        cr_assert_not_null(at, "%s: no %s in %s", cases[i].type, cases[i].key, text);
        char *end = at + strlen(cases[i].key) + strspn(at + strlen(cases[i].key), "0123456789.eE+-");
        snprintf(patched, n + 64, "%.*s%s%s", (int)(at + strlen(cases[i].key) - text), text, cases[i].value, end);
        cr_assert_eq(th_write_file(cfg, patched, strlen(patched)), 0);
        r = th_runv("-q", base, ad, out, NULL);
        cr_assert_eq(r.status, 1, "%s with %s%s: exit %d: %s", cases[i].type, cases[i].key, cases[i].value, r.status,
                     r.err);
        cr_assert(strstr(r.err, "NonFiniteResult") != NULL && strstr(r.err, ".weight'") != NULL, "%s: %s",
                  cases[i].type, r.err);
        cr_assert(!th_exists(out));
        th_run_free(&r);
        free(text);
        free(patched);
    }
    th_rmrf(tmp);
    free(tmp);
}
