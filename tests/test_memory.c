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
