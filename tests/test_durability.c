/* SPDX-License-Identifier: MIT */
/* test_durability.c : what --fsync flushes, and a base cut short while its bytes are copied
 * (issue 15, item 10).
 * - --fsync: every file the merge leaves in OUT (weights, index, config and other side files) and
 *   the directories the renames went into are flushed.  The fault seam logs each fsync with the
 *   file's inode (LM_FSYNC_LOG, src/core/lm_sys.h); inodes survive renames and links, so the log is
 *   matched against the files in OUT afterwards.  Without --fsync: no fsync at all.  Single file,
 *   model directory (staged commit), and shard workers + finalize.
 * - a base truncated in the middle of the in-kernel copy of its untouched tensors: the merge
 *   is held inside its first copy_file_range (LM_FAULT=1:stall:copy_file_range), the base is cut
 *   to its header, and the merge goes on: exit 3, InputChanged naming the base (not a write
 *   error on OUT), the earlier OUT kept, no temporary file. */
#include "th.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static void du_gen(const char *tmp)
{
    char gen[4096], m[1000];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    snprintf(m, sizeof m, "%s/m", tmp);
    const char *argv[] = {gen, "--out", m, "--hidden", "64", "--inter", "128", "--layers", "2", "--vocab", "128",
                          "--heads", "4", "--kv-heads", "2", "--rank", "4", NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "gen_model: %s", r.err);
    th_run_free(&r);
    char p[1200];
    snprintf(p, sizeof p, "%s/base/tokenizer.json", m);
    cr_assert_eq(th_write_file(p, "{\"version\": \"1.0\"}", 18), 0);
}

/* the binary under test as an absolute path (the shard commands run elsewhere) */
static const char *du_bin(void)
{
    static char abs[4096];
    if (abs[0] == '\0' && realpath(th_bin(), abs) == NULL)
        snprintf(abs, sizeof abs, "%s", th_bin());
    return abs;
}

static int du_sh(const char *cmd)
{
    th_run_result r = th_sh(cmd);
    int st = r.status;
    if (st != 0)
        cr_log_error("%s: exit %d: %s", cmd, st, r.err);
    th_run_free(&r);
    return st;
}

/* the fsync log: inodes of files and of directories, how many times each */
typedef struct {
    unsigned long long ino[4096];
    int dir[4096];
    size_t n;
    char *text;
} du_log;

static void du_log_read(const char *path, du_log *L)
{
    memset(L, 0, sizeof *L);
    size_t n = 0;
    L->text = (char *)th_read_file(path, &n);
    if (L->text == NULL)
        return;
    char *save = NULL;
    char *copy = strndup(L->text, n);
    for (char *line = strtok_r(copy, "\n", &save); line && L->n < 4096; line = strtok_r(NULL, "\n", &save)) {
        char kind[8];
        if (sscanf(line, "%llu %7s", &L->ino[L->n], kind) == 2) {
            L->dir[L->n] = strcmp(kind, "dir") == 0;
            L->n++;
        }
    }
    free(copy);
}

static int du_count(const du_log *L, const char *path, int dir)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return -1;
    int k = 0;
    for (size_t i = 0; i < L->n; i++)
        k += L->ino[i] == (unsigned long long)st.st_ino && L->dir[i] == dir;
    return k;
}

/* every regular file in dir flushed at least once; @return how many files */
static int du_all_files_flushed(const du_log *L, const char *dir, const char *what)
{
    DIR *d = opendir(dir);
    cr_assert_not_null(d);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d)) != NULL) {
        char p[1500];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        if (de->d_name[0] == '.' || stat(p, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        cr_expect_geq(du_count(L, p, 0), 1, "%s: %s was not flushed; log:\n%s", what, de->d_name,
                      L->text ? L->text : "(none)");
        n++;
    }
    closedir(d);
    return n;
}

Test(durability, fsync_flushes_every_file_and_directory, .timeout = 240)
{
    char *tmp = th_tmpdir(), cmd[8000], log[800], out[800], base[800], ad[800];
    du_gen(tmp);
    snprintf(base, sizeof base, "%s/m/base", tmp);
    snprintf(ad, sizeof ad, "%s/m/adapter", tmp);
    snprintf(log, sizeof log, "%s/fsync.log", tmp);
    du_log L;

    /* a single file: the file, then its directory once renamed */
    snprintf(out, sizeof out, "%s/o/merged.safetensors", tmp);
    snprintf(cmd, sizeof cmd, "mkdir -p %s/o && LM_FSYNC_LOG=%s %s -q --fsync %s %s %s", tmp, log, du_bin(), base, ad,
             out);
    cr_assert_eq(du_sh(cmd), 0);
    du_log_read(log, &L);
    cr_expect_geq(du_count(&L, out, 0), 1, "file OUT not flushed:\n%s", L.text);
    snprintf(cmd, sizeof cmd, "%s/o", tmp);
    cr_expect_geq(du_count(&L, cmd, 1), 1, "file OUT: its directory was not flushed after the rename:\n%s", L.text);
    free(L.text);
    unlink(log);
    /* without --fsync: nothing is flushed */
    snprintf(cmd, sizeof cmd, "LM_FSYNC_LOG=%s %s -q %s %s %s", log, du_bin(), base, ad, out);
    cr_assert_eq(du_sh(cmd), 0);
    cr_expect(!th_exists(log), "fsync without --fsync");

    /* a model directory over an earlier one: every shard, the index, config.json and the other
     * side files; OUT after the old records go and after the new record comes; the stage */
    snprintf(out, sizeof out, "%s/dir", tmp);
    snprintf(cmd, sizeof cmd, "%s -q --max-shard-size 30KB %s %s %s/", du_bin(), base, ad, out);
    cr_assert_eq(du_sh(cmd), 0);
    snprintf(cmd, sizeof cmd, "LM_FSYNC_LOG=%s %s -q --fsync --scale 0.5 --max-shard-size 30KB %s %s %s/", log, du_bin(),
             base, ad, out);
    cr_assert_eq(du_sh(cmd), 0);
    du_log_read(log, &L);
    int n_files = du_all_files_flushed(&L, out, "directory OUT");
    cr_expect_geq(n_files, 5, "expected shards, index, config.json, tokenizer.json: %d files", n_files);
    snprintf(cmd, sizeof cmd, "%s/model.safetensors.index.json", out);
    cr_expect(th_exists(cmd));
    cr_expect_geq(du_count(&L, out, 1), 2, "OUT flushed %d times (after the old records went, after the new one "
                  "came):\n%s", du_count(&L, out, 1), L.text);
    cr_expect(strstr(L.text, " dir ") && strstr(L.text, "/.lora-merge-stage."), "the stage was not flushed:\n%s",
              L.text);
    free(L.text);
    unlink(log);
    snprintf(cmd, sizeof cmd, "LM_FSYNC_LOG=%s %s -q --max-shard-size 30KB %s %s %s/", log, du_bin(), base, ad, out);
    cr_assert_eq(du_sh(cmd), 0);
    cr_expect(!th_exists(log), "fsync without --fsync");

    /* shard workers, then finalize: each worker flushes its shards, finalize the side files, the
     * index and OUT */
    snprintf(out, sizeof out, "%s/w", tmp);
    for (int i = 0; i < 2; i++) {
        snprintf(cmd, sizeof cmd, "cd %s && LM_FSYNC_LOG=%s %s -q --fsync --shards %d/2 --max-shard-size 30KB %s %s %s/",
                 tmp, log, du_bin(), i, base, ad, out);
        cr_assert_eq(du_sh(cmd), 0);
    }
    char log2[900];
    snprintf(log2, sizeof log2, "%s.finalize", log);
    snprintf(cmd, sizeof cmd, "cd / && LM_FSYNC_LOG=%s %s -q --fsync finalize %s", log2, du_bin(), out);
    cr_assert_eq(du_sh(cmd), 0);
    cr_expect(th_exists(log2), "finalize --fsync flushed nothing");
    snprintf(cmd, sizeof cmd, "cat %s >> %s 2>/dev/null; true", log2, log);
    cr_assert_eq(du_sh(cmd), 0);
    du_log_read(log, &L);
    n_files = du_all_files_flushed(&L, out, "shard workers + finalize");
    cr_expect_geq(n_files, 5, "%d files", n_files);
    free(L.text);
    du_log_read(log2, &L);
    snprintf(cmd, sizeof cmd, "%s/model.safetensors.index.json", out);
    cr_expect_geq(du_count(&L, cmd, 0), 1, "finalize did not flush the index:\n%s", L.text ? L.text : "(none)");
    snprintf(cmd, sizeof cmd, "%s/config.json", out);
    cr_expect_geq(du_count(&L, cmd, 0), 1, "finalize did not flush config.json:\n%s", L.text ? L.text : "(none)");
    cr_expect_geq(du_count(&L, out, 1), 1, "finalize did not flush OUT:\n%s", L.text ? L.text : "(none)");
    free(L.text);
    th_rmrf(tmp);
    free(tmp);
}

/* cut to the 8-byte length and the header: every tensor's bytes are gone */
static void du_cut_to_header(void *ctx)
{
    const char *victim = ctx;
    int fd = open(victim, O_RDONLY);
    uint8_t len8[8];
    cr_assert(fd >= 0 && pread(fd, len8, 8, 0) == 8);
    close(fd);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | len8[i];
    cr_assert_eq(truncate(victim, (off_t)(8 + hlen)), 0);
}

/* the merge (argv) held in its first copy_file_range; there the base is cut to its header; then
 * it goes on.  @return exit status, *err_text what followed the stall line */
static int du_merge_cut(const char *const *argv, const char *victim, char **err_text)
{
    static const char *const env[] = {"LM_FAULT=1:stall:copy_file_range", NULL};
    th_held_result r = th_run_held(argv, env, "stalled in copy_file_range\n", 0, du_cut_to_header, (void *)victim);
    cr_assert(r.held, "the merge never copied base bytes with copy_file_range (exit %d): %s", r.status, r.err);
    *err_text = r.err;
    return r.status;
}

Test(durability, base_truncated_mid_copy_is_a_changed_input, .timeout = 120)
{
    char *tmp = th_tmpdir(), cmd[8000], base[800], ad[800], out[800], shard[900];
    du_gen(tmp);
    snprintf(ad, sizeof ad, "%s/m/adapter", tmp);
    for (int dir_out = 0; dir_out < 2; dir_out++) {
        snprintf(base, sizeof base, "%s/base.safetensors", tmp);
        snprintf(cmd, sizeof cmd, "cp %s/m/base/model.safetensors %s", tmp, base);
        cr_assert_eq(du_sh(cmd), 0);
        /* an earlier model in OUT, which must stay */
        if (dir_out)
            snprintf(out, sizeof out, "%s/outdir/", tmp);
        else
            snprintf(out, sizeof out, "%s/out.safetensors", tmp);
        snprintf(cmd, sizeof cmd, "%s -q --scale 0.5 %s%s %s %s %s", du_bin(), dir_out ? "--max-shard-size 30KB " : "",
                 base, ad, out, "");
        cr_assert_eq(du_sh(cmd), 0);
        if (dir_out)
            snprintf(shard, sizeof shard, "%smodel.safetensors.index.json", out);
        else
            snprintf(shard, sizeof shard, "%s", out);
        uint64_t before = th_file_hash(shard);
        const char *argv_file[] = {th_bin(), "-q", "--threads", "1", base, ad, out, NULL};
        const char *argv_dir[] = {th_bin(), "-q", "--threads", "1", "--max-shard-size", "30KB", base, ad, out, NULL};
        char *text = NULL;
        int status = du_merge_cut(dir_out ? argv_dir : argv_file, base, &text);
        cr_expect_eq(status, 3, "exit %d: %s", status, text);
        cr_expect(strstr(text, "InputChanged") != NULL && strstr(text, base) != NULL,
                  "not reported as the base changing: %s", text);
        cr_expect(strstr(text, "truncated") != NULL, "%s", text);
        cr_expect(strstr(text, "write") == NULL, "reported as a write error: %s", text);
        const char *nl = strchr(text, '\n');
        cr_expect(nl != NULL && nl[1] == '\0', "not one line: %s", text);
        cr_expect_eq(th_file_hash(shard), before, "the earlier OUT changed");
        if (dir_out)
            cr_expect_eq(th_count_temps(out), 0, "a stage or temporary file was left");
        else
            cr_expect_eq(th_count_temps(tmp), 0, "a temporary file was left");
        free(text);
    }
    th_rmrf(tmp);
    free(tmp);
}

/* runs argv held inside its third pwrite (the output being written), then SIGKILLs it */
static void du_kill_while_writing(const char *const *argv, int named)
{
    /* the stall reads stdin: nothing is written there, the kill comes first */
    const char *const env[] = {"LM_FAULT=3:stall:pwrite", named ? "LM_NO_TMPFILE=1" : "LM_NO_TMPFILE", NULL};
    th_held_result r = th_run_held(argv, env, "stalled in pwrite", 1, NULL, NULL);
    cr_assert(r.held, "the merge never wrote its output: %s", r.err);
    cr_assert_eq(r.status, 128 + SIGKILL, "exit %d: %s", r.status, r.err);
    free(r.err);
}

/* entries of dir, stages' contents counted too */
static int du_entries_deep(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return 0;
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        n++;
        if (strncmp(de->d_name, ".lora-merge-stage.", 18) == 0) {
            char p[1500];
            snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
            n += th_count_entries(p);
        }
    }
    closedir(d);
    return n;
}

/* issue 15 item 10: a SIGKILL while the output is written leaves nothing (O_TMPFILE files have no
 * name until the commit); where the file system has no O_TMPFILE (LM_NO_TMPFILE) the named,
 * locked temporary file stays and the next run removes it */
Test(durability, sigkill_while_writing_leaves_nothing, .timeout = 180)
{
    char *tmp = th_tmpdir(), base[800], ad[800], out[1000], d[800], cmd[4000];
    du_gen(tmp);
    snprintf(base, sizeof base, "%s/m/base", tmp);
    snprintf(ad, sizeof ad, "%s/m/adapter", tmp);
    /* a file OUT in a directory of its own */
    snprintf(d, sizeof d, "%s/fo", tmp);
    cr_assert_eq(mkdir(d, 0777), 0);
    snprintf(out, sizeof out, "%s/merged.safetensors", d);
    const char *af[] = {du_bin(), "-q", "--threads", "1", base, ad, out, NULL};
    du_kill_while_writing(af, 0);
    cr_expect_eq(th_count_entries(d), 0, "file OUT: a SIGKILL while writing left %d names", th_count_entries(d));
    du_kill_while_writing(af, 1);
    cr_expect_eq(th_count_temps(d), 1, "named fallback: the locked temporary file is expected to stay");
    snprintf(cmd, sizeof cmd, "%s -q %s %s %s", du_bin(), base, ad, out);
    cr_assert_eq(du_sh(cmd), 0);
    cr_expect_eq(th_count_temps(d), 0, "the rerun did not remove the dead run's temporary file");
    cr_expect_eq(th_count_entries(d), 1);

    /* a directory OUT: nothing either (its stage is made only at the commit; before: an empty,
     * flock'd stage was left); the named fallback's locked temporary files stay, and go with the rerun */
    snprintf(out, sizeof out, "%s/do", tmp);
    const char *ad_[] = {du_bin(), "-q", "--threads", "1", "--max-shard-size", "30KB", base, ad, out, NULL};
    du_kill_while_writing(ad_, 0);
    cr_expect_eq(du_entries_deep(out), 0, "directory OUT: a SIGKILL while writing left %d names", du_entries_deep(out));
    du_kill_while_writing(ad_, 1);
    cr_expect_gt(th_count_temps(out), 0, "named fallback: the locked temporary files are expected to stay");
    cr_expect_eq(du_entries_deep(out), th_count_temps(out), "named fallback: a stage or another file was left");
    snprintf(cmd, sizeof cmd, "%s -q --max-shard-size 30KB %s %s %s/", du_bin(), base, ad, out);
    cr_assert_eq(du_sh(cmd), 0);
    cr_expect_eq(th_count_temps(out), 0);

    /* a shard worker writes into OUT itself: nothing but its records */
    snprintf(out, sizeof out, "%s/wo", tmp);
    const char *aw[] = {du_bin(), "-q", "--threads", "1", "--shards", "0/2", "--max-shard-size", "30KB", base, ad, out,
                        NULL};
    du_kill_while_writing(aw, 0);
    cr_expect_eq(th_count_temps(out), 0, "shard worker: a temporary file was left");
    th_rmrf(tmp);
    free(tmp);
}

/* every shard stays open until the commit: a merge into more shards than the soft open-file limit
 * (1024 on most systems) raises it toward the hard limit (before: EMFILE, exit 3, after the planning);
 * more than the hard limit allows is refused before any file is created, saying so */
Test(durability, more_shards_than_the_soft_open_file_limit, .timeout = 240)
{
    char gen[4096];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    char *tmp = th_tmpdir(), cmd[6000], ref[800], out[800];
    snprintf(cmd, sizeof cmd, "%s --out %s/m --hidden 32 --inter 64 --layers 24 --vocab 64 --heads 2 --kv-heads 1 "
             "--rank 2 >/dev/null", gen, tmp);
    cr_assert_eq(du_sh(cmd), 0);
    snprintf(ref, sizeof ref, "%s/ref.safetensors", tmp);
    snprintf(cmd, sizeof cmd, "%s -q %s/m/base %s/m/adapter %s", du_bin(), tmp, tmp, ref);
    cr_assert_eq(du_sh(cmd), 0);
    snprintf(out, sizeof out, "%s/out", tmp);
    /* about 220 shards (one tensor each) under a soft limit of 150 */
    snprintf(cmd, sizeof cmd, "ulimit -S -n 150 && %s -q --max-shard-size 1 %s/m/base %s/m/adapter %s/", du_bin(), tmp,
             tmp, out);
    th_run_result r = th_sh(cmd);
    cr_expect_eq(r.status, 0, "soft limit 150: exit %d: %s", r.status, r.err);
    th_run_free(&r);
    cr_expect_gt(th_count_entries(out), 200, "not a merge into more than 150 shards");
    cr_expect_eq(th_model_is(out, ref, ref), 1, "the sharded merge differs from the single-file one");
    /* a hard limit of 150: refused before any file, one line that says why */
    th_rmrf(out);
    snprintf(cmd, sizeof cmd, "ulimit -n 150 && %s -q --max-shard-size 1 %s/m/base %s/m/adapter %s/", du_bin(), tmp, tmp,
             out);
    r = th_sh(cmd);
    cr_expect_eq(r.status, 3, "hard limit 150: exit %d: %s", r.status, r.err);
    cr_expect(strstr(r.err, "ulimit -n") != NULL && strstr(r.err, "shards") != NULL, "%s", r.err);
    const char *nl = strchr(r.err, '\n');
    cr_expect(nl != NULL && nl[1] == '\0', "not one line: %s", r.err);
    cr_expect(!th_exists(out) || th_count_entries(out) == 0, "files were left");
    th_run_free(&r);
    th_rmrf(tmp);
    free(tmp);
}
