/* SPDX-License-Identifier: MIT */
/* test_live_inputs.c : inputs that change while a merge runs (issue 15, item 3).  The adapter is
 * copied once when opened (a sealed memfd), and before the output is committed every input file
 * is compared with what was read (size, inode, modification and change times).  The merge is
 * held at that point by the test seam LM_TEST_PAUSE_BEFORE_COMMIT (one line on stderr, then one
 * byte read from stdin); the test changes a file there and lets it go on.  Expected: exit 3 with
 * one InputChanged line naming the file, no output and no temporary file; unchanged inputs give
 * the bytes of an ordinary run. */
#include "th.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

typedef enum { LI_NONE, LI_TRUNCATE, LI_OVERWRITE_NAN, LI_REPLACE } li_change;

/* base + adapter of gen_model under tmp/m; *base, *adir set */
static void li_generate(const char *tmp, char *base, char *adir, size_t cap)
{
    char gen[4096], m[1000];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    snprintf(m, sizeof m, "%s/m", tmp);
    const char *argv[] = {gen, "--out", m, "--hidden", "256", "--inter", "512", "--layers", "1", "--vocab", "128",
                          "--rank", "8", NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    snprintf(base, cap, "%s/base/model.safetensors", m);
    snprintf(adir, cap, "%s/adapter", m);
}

static void li_change_file(const char *path, li_change how)
{
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    if (how == LI_TRUNCATE) {
        cr_assert_eq(truncate(path, st.st_size / 2), 0);
    } else if (how == LI_OVERWRITE_NAN) { /* same size, tensor bytes turned into NaN in place */
        int fd = open(path, O_WRONLY);
        cr_assert(fd >= 0);
        static const uint8_t nan32[4] = {0x00, 0x00, 0xc0, 0x7f};
        for (off_t o = st.st_size - 4096; o + 4 <= st.st_size; o += 4)
            cr_assert_eq(pwrite(fd, nan32, 4, o), 4);
        close(fd);
    } else if (how == LI_REPLACE) { /* a new file renamed over it, same bytes */
        char tmp[1300];
        snprintf(tmp, sizeof tmp, "%s.new", path);
        size_t n;
        uint8_t *b = th_read_file(path, &n);
        cr_assert_not_null(b);
        cr_assert_eq(th_write_file(tmp, b, n), 0);
        cr_assert_eq(rename(tmp, path), 0);
        free(b);
    }
}

typedef struct {
    const char *victim;
    li_change how;
} li_at;

static void li_at_pause(void *ctx)
{
    const li_at *a = ctx;
    if (a->how != LI_NONE)
        li_change_file(a->victim, a->how);
}

/* runs the merge held before its commit, applies `how` to `victim` there; returns the exit
 * status and the stderr text (malloc'd) */
static int li_merge(const char *base, const char *adir, const char *out, const char *victim, li_change how,
                    char **err_text)
{
    const char *argv[] = {th_bin(), "-q", "--threads", "2", base, adir, out, NULL};
    static const char *const env[] = {"LM_TEST_PAUSE_BEFORE_COMMIT=1", NULL};
    li_at at = {victim, how};
    th_held_result r = th_run_held(argv, env, "paused before commit\n", 0, li_at_pause, &at);
    cr_assert(r.held, "the merge did not pause before its commit (exit %d): %s", r.status, r.err);
    *err_text = r.err;
    return r.status;
}

/* a fresh copy of base and adapter under tmp/run, so each case changes its own files */
static void li_fresh(const char *tmp, const char *base, const char *adir, char *b2, char *a2, char *out, size_t cap)
{
    char run[1000], cmd[8192];
    snprintf(run, sizeof run, "%s/run", tmp);
    th_rmrf(run);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/out' '%s/ad' && cp '%s' '%s/base.safetensors' && cp '%s'/* '%s/ad/'", run,
             run, base, run, adir, run);
    th_run_result r = th_sh(cmd);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    snprintf(b2, cap, "%s/base.safetensors", run);
    snprintf(a2, cap, "%s/ad", run);
    snprintf(out, cap, "%s/out/merged.safetensors", run);
}

Test(live_inputs, a_changed_input_is_reported_and_nothing_written, .timeout = 120)
{
    char *tmp = th_tmpdir();
    char base[1200], adir[1200], ref[1200], b2[1200], a2[1200], out[1200], victim[1300];
    li_generate(tmp, base, adir, sizeof base);
    snprintf(ref, sizeof ref, "%s/ref.safetensors", tmp);
    li_fresh(tmp, base, adir, b2, a2, out, sizeof b2); /* the same paths: they are in the metadata */
    th_run_result r = th_runv("-q", "--threads", "2", b2, a2, out, NULL);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    cr_assert_eq(rename(out, ref), 0);

    /* held and let go unchanged: the ordinary bytes */
    char *e;
    li_fresh(tmp, base, adir, b2, a2, out, sizeof b2);
    int st = li_merge(b2, a2, out, NULL, LI_NONE, &e);
    cr_assert_eq(st, 0, "%s", e);
    cr_assert(th_files_equal(out, ref));
    free(e);

    static const struct {
        int adapter;
        li_change how;
        const char *what;
    } cases[] = {
        {1, LI_TRUNCATE, "adapter truncated"},   {1, LI_OVERWRITE_NAN, "adapter overwritten with NaN"},
        {1, LI_REPLACE, "adapter replaced"},     {0, LI_TRUNCATE, "base truncated"},
        {0, LI_OVERWRITE_NAN, "base overwritten"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        li_fresh(tmp, base, adir, b2, a2, out, sizeof b2);
        if (cases[i].adapter)
            snprintf(victim, sizeof victim, "%s/adapter_model.safetensors", a2);
        else
            snprintf(victim, sizeof victim, "%s", b2);
        st = li_merge(b2, a2, out, victim, cases[i].how, &e);
        cr_assert_eq(st, 3, "%s: exit %d: %s", cases[i].what, st, e);
        cr_assert(strstr(e, "InputChanged") != NULL && strstr(e, victim) != NULL, "%s: %s", cases[i].what, e);
        cr_assert(strchr(e, '\n') == e + strlen(e) - 1, "%s: not one line: %s", cases[i].what, e);
        char od[1400];
        snprintf(od, sizeof od, "%s/../out", a2);
        cr_assert_eq(th_count_entries(od), 0, "%s: the output directory is not empty", cases[i].what);
        free(e);
    }
    th_rmrf(tmp);
    free(tmp);
}

/* the snapshot itself: after the file is cut to 100 bytes, a plain mapping faults (SIGBUS, shown
 * in a child) while the snapshot still reads every byte as it was, and says the file changed */
#include "st_reader.h"

Test(live_inputs, snapshot_reads_the_bytes_as_they_were)
{
    char *tmp = th_tmpdir();
    char path[1200];
    snprintf(path, sizeof path, "%s/a.safetensors", tmp);
    static double v[65536];
    for (size_t i = 0; i < 65536; i++)
        v[i] = (double)(i % 251) - 125.0;
    th_out_tensor t = {"w", "F32", 1, {65536}, v};
    cr_assert_eq(th_st_write(path, &t, 1), 0);

    pid_t pid = getenv("LM_ASAN") != NULL ? -1 : fork(); /* (ASan would report the SIGBUS as an error) */
    if (pid == 0) { /* the old way: the file's own mapping */
        lm_err e;
        lm_st_file *f = lm_st_open(path, &e);
        if (f == NULL || truncate(path, 100) != 0)
            _exit(2);
        const float *d = (const float *)(lm_st_data(f) + lm_st_tensor(f, 0)->begin);
        volatile float s = 0;
        for (size_t i = 0; i < 65536; i++)
            s += d[i];
        _exit(0);
    }
    if (pid > 0) {
        int status;
        waitpid(pid, &status, 0);
        cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS, "a cut file's mapping: status %d", status);
    }

    cr_assert_eq(th_st_write(path, &t, 1), 0);
    lm_err e;
    lm_err_clear(&e);
    lm_st_file *f = lm_st_open_snapshot(path, &e);
    cr_assert_not_null(f, "%s", e.msg);
    cr_assert_eq(lm_st_input_changed(f), 0);
    cr_assert_eq(truncate(path, 100), 0);
    const float *d = (const float *)(lm_st_data(f) + lm_st_tensor(f, 0)->begin);
    for (size_t i = 0; i < 65536; i++)
        cr_assert_eq(d[i], (float)v[i], "element %zu", i);
    cr_assert_eq(lm_st_input_changed(f), 1);
    lm_st_close(f);
    th_rmrf(tmp);
    free(tmp);
}
