/* SPDX-License-Identifier: MIT */
/* test_batch.c : `lora-merge batch BASE JOBS.json` / `--job ARGS...` (issue 14, part 2).  K jobs
 * of different adapter types, weights and options in one pass: every output directory or file is
 * byte-identical (diff -r, cmp) to the single merge `lora-merge BASE <the job's arguments>` run
 * in another directory with the same relative OUT name, and so is its JSON report but for its
 * timings; on a sharded base too.  Bad entries are refused with one line naming the job before
 * anything is written, a batch whose last job turns out to change nothing once rounded commits no
 * job, and faults injected through the LM_FAULT seam at every system call leave every OUT as it
 * was (or committed, for the jobs the error line says were committed). */
#include "th.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct {
    char *tmp;
    char bin[PATH_MAX], gen[PATH_MAX], gad[PATH_MAX];
    char base[800];
} bt_fix;

static th_run_result bt_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static th_run_result bt_sh(const char *fmt, ...)
{
    char cmd[16384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    return th_sh(cmd);
}

#define BT_OK(...)                                                                                                     \
    do {                                                                                                               \
        th_run_result r_ = bt_sh(__VA_ARGS__);                                                                         \
        cr_assert_eq(r_.status, 0, "exit %d: %s", r_.status, r_.err);                                                  \
        th_run_free(&r_);                                                                                              \
    } while (0)

/* a generated model with every projection targeted, and adapters of several types for it */
static void bt_setup_sized(bt_fix *F, int small)
{
    if (!th_gen_model_path(F->gen, sizeof F->gen))
        cr_skip_test("needs %s", F->gen);
    snprintf(F->gad, sizeof F->gad, "%.*s/gen_adapter", (int)(strrchr(F->gen, '/') - F->gen), F->gen);
    F->tmp = th_tmpdir();
    cr_assert_not_null(realpath(th_bin(), F->bin));
    BT_OK("%s --out %s/m --hidden %d --inter %d --layers %d --vocab %d --heads 4 --kv-heads 2 --rank 4 --targets all "
          "--seed 3 >/dev/null", F->gen, F->tmp, small ? 32 : 64, small ? 64 : 160, small ? 1 : 2, small ? 64 : 256);
    snprintf(F->base, sizeof F->base, "%s/m/base", F->tmp);
    static const char *const types[][2] = {{"dora", "--rank 4"}, {"loha", "--rank 4"}, {"road", "--block 16"},
                                           {"oft", "--block 16"}, {"ia3", ""}, {"vera", "--rank 16"}};
    for (size_t i = 0; i < (small ? 1 : sizeof types / sizeof *types); i++)
        BT_OK("%s --base %s --out %s/%s --type %s %s --seed %zu >/dev/null", F->gad, F->base, F->tmp, types[i][0],
              types[i][0], types[i][1], 10 + i);
    BT_OK("mkdir -p %s/ref %s/bat", F->tmp, F->tmp);
}

static void bt_setup(bt_fix *F)
{
    bt_setup_sized(F, 0);
}

static void bt_teardown(bt_fix *F)
{
    th_rmrf(F->tmp);
    free(F->tmp);
}

/* a report without what depends on the run's timing */
static char *bt_report_key(const char *line)
{
    cJSON *j = cJSON_Parse(line);
    cr_assert_not_null(j, "not a JSON report: %s", line);
    cJSON_DeleteItemFromObjectCaseSensitive(j, "timings");
    cJSON_DeleteItemFromObjectCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "summary"), "seconds");
    char *s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    return s;
}

/* job k's arguments (after BASE) as one shell word list, and its OUT */
typedef struct {
    const char *args, *out;
} bt_job;

/* the single merges in ref/, the batch in bat/ (jobs [0, n_file) through JOBS.json, the rest
 * through --job); every OUT and every report compared */
static void bt_compare(const bt_fix *F, const char *base, const bt_job *jobs, size_t n, size_t n_file,
                       const char *batch_opts)
{
    char **ref_reports = calloc(n, sizeof *ref_reports);
    for (size_t k = 0; k < n; k++) {
        th_run_result r = bt_sh("cd %s/ref && %s --json --threads 2 %s %s", F->tmp, F->bin, base, jobs[k].args);
        cr_assert_eq(r.status, 0, "single merge %zu: %s", k, r.err);
        ref_reports[k] = bt_report_key(r.out);
        th_run_free(&r);
    }
    /* JOBS.json: each entry the job's arguments as strings (no shell quoting in them) */
    char json[8192] = "[", path[1000];
    for (size_t k = 0; k < n_file; k++) {
        strcat(json, k ? ", [" : "[");
        char copy[1000], *save = NULL;
        snprintf(copy, sizeof copy, "%s", jobs[k].args);
        int first = 1;
        for (char *w = strtok_r(copy, " ", &save); w; w = strtok_r(NULL, " ", &save), first = 0) {
            strcat(json, first ? "\"" : ", \"");
            strcat(json, w);
            strcat(json, "\"");
        }
        strcat(json, "]");
    }
    strcat(json, "]");
    snprintf(path, sizeof path, "%s/jobs.json", F->tmp);
    cr_assert_eq(th_write_file(path, json, strlen(json)), 0);
    char cmdjobs[8192] = "";
    for (size_t k = n_file; k < n; k++) {
        strcat(cmdjobs, " --job ");
        strcat(cmdjobs, jobs[k].args);
    }
    th_run_result r = bt_sh("cd %s/bat && %s batch --json --threads 2 %s %s %s %s", F->tmp, F->bin, batch_opts, base,
                            n_file ? path : "", cmdjobs);
    cr_assert_eq(r.status, 0, "batch: %s", r.err);
    char *line = r.out;
    for (size_t k = 0; k < n; k++) {
        char *nl = strchr(line, '\n');
        cr_assert_not_null(nl, "the batch printed %zu reports, not %zu", k, n);
        *nl = '\0';
        char *key = bt_report_key(line);
        cr_assert_str_eq(key, ref_reports[k], "job %zu: the report differs from the single merge's", k + 1);
        free(key);
        line = nl + 1;
        th_run_result d = bt_sh("cd %s && diff -r ref/%s bat/%s", F->tmp, jobs[k].out, jobs[k].out);
        cr_assert_eq(d.status, 0, "job %zu (%s): differs from the single merge: %s%s", k + 1, jobs[k].out, d.out, d.err);
        th_run_free(&d);
        free(ref_reports[k]);
    }
    cr_assert_eq(th_count_temps(F->tmp), 0);
    th_run_free(&r);
    free(ref_reports);
}

Test(batch, outputs_equal_single_merges, .timeout = 300)
{
    bt_fix F;
    bt_setup(&F);
    char jb[8][600];
    const char *t = F.tmp;
    snprintf(jb[0], sizeof jb[0], "%s/m/adapter o1.safetensors", t);
    snprintf(jb[1], sizeof jb[1], "--dtype f32 %s/dora o2/", t);
    snprintf(jb[2], sizeof jb[2], "--scale 0.5 %s/loha --adapter-scaled %s/m/adapter -0.25 o3/", t, t);
    snprintf(jb[3], sizeof jb[3], "--max-shard-size 40KB %s/road o4/", t); /* whole row groups: other tiles */
    snprintf(jb[4], sizeof jb[4], "%s/oft o5.safetensors", t);
    snprintf(jb[5], sizeof jb[5], "--dtype f16 %s/ia3 o6/", t);
    snprintf(jb[6], sizeof jb[6], "%s/vera --adapter %s/dora o7/", t, t);
    snprintf(jb[7], sizeof jb[7], "%s/m/adapter o8/", t); /* the same adapter as job 1, another OUT kind */
    bt_job jobs[8] = {{jb[0], "o1.safetensors"}, {jb[1], "o2"}, {jb[2], "o3"}, {jb[3], "o4"},
                      {jb[4], "o5.safetensors"}, {jb[5], "o6"}, {jb[6], "o7"}, {jb[7], "o8"}};
    bt_compare(&F, F.base, jobs, 8, 5, "");
    /* the batch again, over its own outputs (stale files of o4's earlier shards removed) with
     * other thread counts and tile sizes: the same bytes */
    BT_OK("cd %s/bat && %s batch -q --threads 1 --tile-elems 4096 %s --job %s --job %s --job %s", t, F.bin, F.base,
          jb[3], jb[6], jb[1]);
    BT_OK("cd %s && diff -r ref/o4 bat/o4 && diff -r ref/o7 bat/o7 && diff -r ref/o2 bat/o2", t);
    /* three threads and small tiles: many tiles queued at once in each job's lane, the jobs'
     * outputs written by several threads at a time */
    BT_OK("cd %s/bat && %s batch -q --threads 3 --tile-elems 1024 %s --job %s --job %s --job %s --job %s", t, F.bin,
          F.base, jb[0], jb[3], jb[5], jb[7]);
    BT_OK("cd %s && cmp ref/o1.safetensors bat/o1.safetensors && diff -r ref/o4 bat/o4 && diff -r ref/o6 bat/o6 && "
          "diff -r ref/o8 bat/o8", t);
    /* the large-output case forced (LM_DROP_BEHIND): direct I/O where the file system offers it,
     * the partial pages of the tiles' ends kept until complete: the same bytes; and with --json,
     * each weights file hashed as it is written: every file's sha256 in the reports is sha256sum's
     * (the plain drop-behind's case: direct_io_same_bytes_as_plain_and_drop_behind) */
    th_run_result r = bt_sh("cd %s/bat && rm -rf o2 o4 o5.safetensors && LM_DROP_BEHIND=4096 %s batch -q --json "
                            "--threads 3 --tile-elems 1024 %s --job %s --job %s --job %s", t, F.bin, F.base, jb[1],
                            jb[3], jb[4]);
    cr_assert_eq(r.status, 0, "%s", r.err);
    BT_OK("cd %s && diff -r ref/o2 bat/o2 && diff -r ref/o4 bat/o4 && cmp ref/o5.safetensors bat/o5.safetensors", t);
    int n_reports = 0, n_weights = 0;
    for (char *line = r.out, *nl; (nl = strchr(line, '\n')) != NULL; line = nl + 1, n_reports++) {
        *nl = '\0';
        cJSON *j = cJSON_Parse(line);
        cr_assert_not_null(j, "%s", line);
        const cJSON *files = cJSON_GetObjectItemCaseSensitive(j, "files");
        for (int i = 0; i < cJSON_GetArraySize(files); i++) {
            const cJSON *fi = cJSON_GetArrayItem(files, i);
            const char *path = cJSON_GetObjectItemCaseSensitive(fi, "path")->valuestring;
            const cJSON *sha = cJSON_GetObjectItemCaseSensitive(fi, "sha256");
            cr_assert(cJSON_IsString(sha), "%s: no sha256", path);
            th_run_result s = bt_sh("cd %s/bat && sha256sum '%s' | cut -c1-64", t, path);
            cr_assert_geq(strlen(s.out), 64, "%s", path);
            s.out[64] = '\0';
            cr_assert_str_eq(sha->valuestring, s.out, "%s", path);
            n_weights += strcmp(cJSON_GetObjectItemCaseSensitive(fi, "kind")->valuestring, "weights") == 0;
            th_run_free(&s);
        }
        cJSON_Delete(j);
    }
    cr_assert_eq(n_reports, 3);
    cr_assert_geq(n_weights, 4, "o4 is in shards"); /* o2, o5 and o4's shards */
    th_run_free(&r);
    bt_teardown(&F);
}

/* The large-output case (LM_DROP_BEHIND forced on small outputs): direct I/O (the tiles' and
 * tensors' shared pages kept until complete, untouched tensors read and written directly), the plain
 * writes with drop-behind (the default), and OUT on tmpfs (no direct I/O offered: plain
 * writes), for 1 and 2 threads, default and small tiles: every output the single merge's bytes. */
Test(batch, direct_io_same_bytes_as_plain_and_drop_behind, .timeout = 300)
{
    bt_fix F;
    bt_setup(&F);
    const char *t = F.tmp;
    char jobs[2000];
    snprintf(jobs, sizeof jobs, "--job %s/m/adapter o1.safetensors --job --max-shard-size 40KB %s/road o4/ --job "
             "%s/oft o5.safetensors --job --dtype f32 %s/dora o2/", t, t, t, t);
    BT_OK("cd %s/ref && %s -q %s %s/m/adapter o1.safetensors && %s -q --max-shard-size 40KB %s %s/road o4/ && "
          "%s -q %s %s/oft o5.safetensors && %s -q --dtype f32 %s %s/dora o2/", t, F.bin, F.base, t, F.bin, F.base, t,
          F.bin, F.base, t, F.bin, F.base, t);
    char shm[] = "/dev/shm/lm-test-batch-XXXXXX";
    const int have_shm = mkdtemp(shm) != NULL;
    static const char *const envs[] = {"LM_DROP_BEHIND=1 LM_DIRECT_IO=1", "LM_DROP_BEHIND=4096"};
    for (int e = 0; e < 2; e++)
        for (int th = 1; th <= 2; th++)
            for (int small = 0; small < 2; small++)
                for (int on_shm = 0; on_shm <= have_shm; on_shm++) {
                    const char *dir = on_shm ? shm : "bat";
                    BT_OK("cd %s && rm -rf %s/* && cd %s && %s %s batch -q --threads %d %s %s %s", t, dir, dir, envs[e],
                          F.bin, th, small ? "--tile-elems 1024" : "", F.base, jobs);
                    BT_OK("cd %s && cmp ref/o1.safetensors %s/o1.safetensors && diff -r ref/o4 %s/o4 && "
                          "cmp ref/o5.safetensors %s/o5.safetensors && diff -r ref/o2 %s/o2", t, dir, dir, dir, dir);
                }
    if (have_shm)
        th_rmrf(shm);
    bt_teardown(&F);
}

Test(batch, sharded_base, .timeout = 300)
{
    bt_fix F;
    bt_setup(&F);
    char sbase[900], jb[3][600];
    snprintf(sbase, sizeof sbase, "%s/sbase", F.tmp);
    BT_OK("%s -q --allow-noop --max-shard-size 60KB %s %s/m/adapter %s/", F.bin, F.base, F.tmp, sbase);
    snprintf(jb[0], sizeof jb[0], "%s/m/adapter o1/", F.tmp);
    snprintf(jb[1], sizeof jb[1], "--dtype f16 %s/dora o2.safetensors", F.tmp);
    snprintf(jb[2], sizeof jb[2], "--max-shard-size 100KB %s/loha o3/", F.tmp);
    bt_job jobs[3] = {{jb[0], "o1"}, {jb[1], "o2.safetensors"}, {jb[2], "o3"}};
    bt_compare(&F, sbase, jobs, 3, 3, "-q");
    char p[1000];
    snprintf(p, sizeof p, "%s/bat/o3/model.safetensors.index.json", F.tmp);
    cr_assert(th_exists(p), "o3 is not sharded");
    bt_teardown(&F);
}

/* the names in dir, sorted, with sizes: what a refused batch must leave unchanged */
static char *bt_listing(const char *dir)
{
    th_run_result r = bt_sh("cd %s && find . -printf '%%p %%s\\n' | sort", dir);
    cr_assert_eq(r.status, 0);
    char *s = r.out;
    r.out = NULL;
    th_run_free(&r);
    return s;
}

static void bt_refused(const bt_fix *F, const char *args, int status, const char *needle)
{
    char *before = bt_listing(F->tmp);
    th_run_result r = bt_sh("cd %s/bat && %s batch %s", F->tmp, F->bin, args);
    cr_assert_eq(r.status, status, "`batch %s`: exit %d: %s", args, r.status, r.err);
    cr_assert(strncmp(r.err, "error: ", 7) == 0 && strchr(r.err, '\n') == r.err + strlen(r.err) - 1,
              "`batch %s`: not one error line: %s", args, r.err);
    cr_assert(strstr(r.err, needle) != NULL, "`batch %s`: the error does not say '%s': %s", args, needle, r.err);
    char *after = bt_listing(F->tmp);
    cr_assert_str_eq(after, before, "`batch %s` changed the directory", args);
    free(before);
    free(after);
    th_run_free(&r);
}

Test(batch, bad_entries_refused_before_anything_is_written, .timeout = 300)
{
    bt_fix F;
    bt_setup(&F);
    const char *t = F.tmp;
    char a[12000], p[1000];
    /* an earlier merge in bat/old/: it must stay as it is */
    BT_OK("cd %s/bat && %s -q %s %s/m/adapter old/", t, F.bin, F.base, t);
    struct {
        const char *json;
        int status;
        const char *needle;
    } files[] = {
        {"[[\"%s/m/adapter\", \"n1/\"], [\"--dtype\", \"f8\", \"%s/dora\", \"n2/\"]]", 2, "job 2 (n2/): --dtype must be"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"%s/nope\", \"n2/\"]]", 3, "job 2 (n2/): cannot open"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"%s/dora\", \"--dtype\"]]", 2, "job 2 (--dtype): --dtype needs a value"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"%s/dora\", \"n1\"]]", 2, "job 2 (n1): OUT 'n1' is also the output of job 1"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"%s/dora\", \"n1/sub.safetensors\"]]", 2, "overlaps the output of job 1"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"--shards\", \"0/2\", \"%s/dora\", \"n2/\"]]", 2, "job 2 (n2/): --shards"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"%s/dora\", \"n2.gguf\"]]", 2, "job 2 (n2.gguf)"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"%s/dora\", \"../m/base\"]]", 2, "OutputIsInput: job 2 (../m/base)"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"--bogus\", \"%s/dora\", \"n2/\"]]", 2, "job 2 (n2/): unknown option '--bogus'"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"%s/dora\", 7]]", 2, "job 2: argument 2 is not a non-empty string"},
        {"[[\"%s/m/adapter\", \"n1/\"], {\"out\": \"%s\"}]", 2, "job 2: an entry is the job's arguments"},
        {"[[\"%s/m/adapter\", \"n1/\"] [\"%s\"]]", 1, "InvalidJson"},
        {"[]", 2, "non-empty JSON array"},
    };
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char js[2000], needle[400];
        snprintf(js, sizeof js, files[i].json, t, t);
        snprintf(needle, sizeof needle, files[i].needle, t);
        snprintf(p, sizeof p, "%s/jobs.json", t);
        cr_assert_eq(th_write_file(p, js, strlen(js)), 0);
        snprintf(a, sizeof a, "%s %s", F.base, p);
        bt_refused(&F, a, files[i].status, needle);
    }
    /* the same through --job; a job that changes nothing (a zero weight: found when planned, as a
     * dry run finds it) and one that changes nothing once rounded, over an earlier merge (found only
     * after the tiles are written): no job is committed, not even the first */
    snprintf(a, sizeof a, "%s --job %s/m/adapter n1/ --job", F.base, t);
    bt_refused(&F, a, 2, "job 2: expected BASE ADAPTER_DIR OUT");
    snprintf(a, sizeof a, "%s --job %s/m/adapter n1/ --job --scale 0 %s/m/adapter n2/", F.base, t, t);
    bt_refused(&F, a, 1, "NoOp: job 2 (n2/): every delta of the adapter is multiplied by 0");
    snprintf(a, sizeof a, "%s --job --dry-run %s/m/adapter n1/ --job --dry-run --scale 0 %s/m/adapter n2/", F.base, t, t);
    bt_refused(&F, a, 1, "NoOp: job 2 (n2/): every delta of the adapter is multiplied by 0");
    snprintf(a, sizeof a, "%s --job %s/m/adapter n1/ --job --scale 1e-12 %s/m/adapter old/", F.base, t, t);
    bt_refused(&F, a, 1, "NoOp: job 2 (old/): the merge changes no element");
    /* the adapters after the first job's are opened ahead on two threads: the error is still the
     * first failing job's, in job order (job 2's options, not job 4's missing adapter nor job 3's
     * non-finite one, which fail when opened) */
    char nan_dir[1000], nan_w[1100], m_ad[1000];
    snprintf(nan_dir, sizeof nan_dir, "%s/nan", t);
    snprintf(m_ad, sizeof m_ad, "%s/m/adapter", t);
    snprintf(nan_w, sizeof nan_w, "%s/adapter_model.safetensors", nan_dir);
    cr_assert_eq(th_copy_tree(m_ad, nan_dir), 0);
    {
        struct stat st;
        int fd = open(nan_w, O_WRONLY);
        cr_assert(fd >= 0 && fstat(fd, &st) == 0);
        static const uint8_t nan32[4] = {0x00, 0x00, 0xc0, 0x7f}; /* the last tensor's last element */
        cr_assert_eq(pwrite(fd, nan32, 4, st.st_size - 4), 4);
        close(fd);
    }
    snprintf(a, sizeof a, "--threads 2 %s --job %s/m/adapter n1/ --job --dtype f8 %s/dora n2/ --job %s/nan n3/ "
             "--job %s/nope n4/", F.base, t, t, t, t);
    bt_refused(&F, a, 2, "job 2 (n2/): --dtype must be");
    snprintf(a, sizeof a, "--threads 2 %s --job %s/m/adapter n1/ --job %s/dora n2/ --job %s/nope n3/ "
             "--job %s/nan n4/", F.base, t, t, t, t);
    bt_refused(&F, a, 3, "job 3 (n3/): cannot open");
    snprintf(a, sizeof a, "--threads 2 %s --job %s/m/adapter n1/ --job %s/dora n2/ --job %s/nan n3/ "
             "--job %s/nope n4/", F.base, t, t, t, t);
    bt_refused(&F, a, 1, "NonFinite: job 3 (n3/): adapter tensor");
    /* a single merge's several adapters are opened together too: the first failing one is named */
    for (int order = 0; order < 2; order++) {
        th_run_result r = bt_sh("cd %s/bat && %s -q --threads 2 %s %s/m/adapter --adapter %s/%s --adapter %s/%s s1/",
                                t, F.bin, F.base, t, t, order ? "nan" : "nope", t, order ? "nope" : "nan");
        cr_assert(r.status != 0 && strstr(r.err, order ? "NonFinite" : "cannot open") != NULL &&
                  strstr(r.err, order ? "/nan/" : "/nope") != NULL && strchr(r.err, '\n') == r.err + strlen(r.err) - 1,
                  "order %d: exit %d: %s", order, r.status, r.err);
        char s1[1000];
        snprintf(s1, sizeof s1, "%s/bat/s1", t);
        cr_assert(!th_exists(s1), "order %d: s1/ was made", order);
        th_run_free(&r);
    }
    snprintf(a, sizeof a, "%s/nobase --job %s/m/adapter n1/", t, t);
    bt_refused(&F, a, 3, "job 1 (n1/): cannot open");
    bt_refused(&F, "", 2, "batch takes BASE");
    snprintf(a, sizeof a, "%s", F.base);
    bt_refused(&F, a, 2, "batch needs jobs");
    bt_teardown(&F);
}

/* ---- faults --------------------------------------------------------------------------------- */
/* which model OUT holds: 1 the earlier one, 2 the new one, 0 none, -1 anything else */
static int bt_state(const char *out, const char *old, const char *fresh)
{
    char p[1200], q[1200];
    snprintf(p, sizeof p, "%s/model.safetensors", out);
    snprintf(q, sizeof q, "%s/model.safetensors.index.json", out);
    struct stat st;
    if (!th_exists(out) || (stat(out, &st) == 0 && S_ISDIR(st.st_mode) && !th_exists(p) && !th_exists(q)))
        return 0; /* no commit record: not a model (a commit that failed half-way) */
    return th_same_tree(out, old) ? 1 : th_same_tree(out, fresh) ? 2 : -1; /* diff -r, in process */
}

/* the k-th call of kind fails, for every k (every step-th: 1, 1 + step, ...): the batch either
 * succeeds with both OUTs new, or fails with one line and leaves both as they were, but for the
 * jobs its line says were committed.  One process a run (the batch itself): OUTs reset, compared
 * and the fault log read in process.  threads: "1", or more (the two jobs' outputs then written by
 * two threads at once, a failed write in one while the other goes on) */
static int bt_sweep(const bt_fix *F, const char *kind, const char *threads, int step, int *n_ok)
{
    const char *t = F->tmp;
    char bat[900], ad1[900], ad2[900], logp[900];
    snprintf(bat, sizeof bat, "%s/bat", t);
    snprintf(ad1, sizeof ad1, "%s/m/adapter", t);
    snprintf(ad2, sizeof ad2, "%s/dora", t);
    snprintf(logp, sizeof logp, "%s/fault.log", t);
    const char *argv[] = {F->bin, "batch", "-q", "--threads", threads, F->base, "--job", "--scale", "0.5", ad1,
                          "o1.safetensors", "--job", "--scale", "0.5", "--max-shard-size", "8KB", ad2, "o2/", NULL};
    setenv("LM_FAULT_LOG", logp, 1);
    int injected = 0;
    for (int k = 1; k < 5000; k += step) {
        char o1[1000], o2[1000], old1[1000], old2[1000], new1[1000], new2[1000], fault[64];
        snprintf(o1, sizeof o1, "%s/bat/o1.safetensors", t);
        snprintf(o2, sizeof o2, "%s/bat/o2", t);
        snprintf(old1, sizeof old1, "%s/old/o1.safetensors", t);
        snprintf(old2, sizeof old2, "%s/old/o2", t);
        snprintf(new1, sizeof new1, "%s/ref/o1.safetensors", t);
        snprintf(new2, sizeof new2, "%s/ref/o2", t);
        th_rmrf(o1);
        th_rmrf(o2);
        cr_assert(th_copy_tree(old1, o1) == 0 && th_copy_tree(old2, o2) == 0, "k=%d: cannot reset the OUTs", k);
        unlink(logp);
        snprintf(fault, sizeof fault, "%d:%s", k, kind);
        setenv("LM_FAULT", fault, 1);
        th_run_result r = th_run(bat, argv);
        unsetenv("LM_FAULT");
        char site[64] = "";
        size_t n;
        char *log = (char *)th_read_file(logp, &n);
        if (log == NULL || sscanf(log, "%*d %63s", site) != 1) {
            free(log);
            cr_assert_eq(r.status, 0, "%s k=%d (no fault reached): exit %d: %s", kind, k, r.status, r.err);
            th_run_free(&r);
            break;
        }
        free(log);
        injected++;
        int s1 = bt_state(o1, old1, new1), s2 = bt_state(o2, old2, new2);
        if (r.status == 0) {
            (*n_ok)++;
            cr_assert(s1 == 2 && s2 == 2, "%s k=%d at %s: exit 0 but the OUTs are %d %d", kind, k, site, s1, s2);
        } else {
            cr_assert(r.status == 3 || r.status == 4, "%s k=%d at %s: exit %d: %s", kind, k, site, r.status, r.err);
            cr_assert(strncmp(r.err, "error: ", 7) == 0 && strchr(r.err, '\n') == r.err + strlen(r.err) - 1,
                      "%s k=%d at %s: not one error line: %s", kind, k, site, r.err);
            cr_assert(strstr(r.err, "job 1 (") || strstr(r.err, "job 2 ("), "%s k=%d: no job named: %s", kind, k, r.err);
            if (strstr(r.err, "after job 1 of 2 was committed") != NULL)
                cr_assert(s1 == 2 && (s2 == 1 || s2 == 0), "%s k=%d at %s: %d %d: %s", kind, k, site, s1, s2, r.err);
            else
                cr_assert(s1 == 1 && s2 == 1, "%s k=%d at %s: a failed batch changed an OUT (%d %d): %s", kind, k,
                          site, s1, s2, r.err);
        }
        cr_assert_eq(th_count_temps(o2) + th_count_temps(bat), 0, "%s k=%d at %s: temporaries left", kind, k, site);
        th_run_free(&r);
    }
    unsetenv("LM_FAULT_LOG");
    return injected;
}

Test(batch, faults_leave_every_out_as_before, .timeout = 900)
{
    bt_fix F;
    bt_setup_sized(&F, 1); /* one layer: every call of the batch fails in turn */
    const char *t = F.tmp;
    BT_OK("mkdir -p %s/old && cd %s/old && %s -q %s %s/m/adapter o1.safetensors && %s -q --max-shard-size 8KB %s "
          "%s/dora o2/", t, t, F.bin, F.base, t, F.bin, F.base, t);
    BT_OK("cd %s/ref && %s -q --scale 0.5 %s %s/m/adapter o1.safetensors && %s -q --scale 0.5 --max-shard-size 8KB "
          "%s %s/dora o2/", t, F.bin, F.base, t, F.bin, F.base, t);
    static const char *const kinds[] = {"EIO", "short"};
    for (int i = 0; i < 2; i++) {
        if (getenv("LM_ASAN") != NULL && i > 0)
            break; /* the plain build sweeps short counts too */
        int ok = 0, n = bt_sweep(&F, kinds[i], "1", 1, &ok);
        cr_assert_gt(n, 0, "%s: no fault reached", kinds[i]);
        cr_log_info("batch, %s: %d faults injected, %d runs succeeded (exact outputs)", kinds[i], n, ok);
    }
    if (getenv("LM_ASAN") == NULL) { /* with two threads (every third call): the jobs' writers at once */
        int ok = 0, n = bt_sweep(&F, "EIO", "2", 3, &ok);
        cr_assert_gt(n, 0, "EIO, 2 threads: no fault reached");
        cr_log_info("batch, EIO, 2 threads: %d faults injected, %d runs succeeded (exact outputs)", n, ok);
    }
    bt_teardown(&F);
}

/* a block-FP8 base: jobs that keep it quantized (changed blocks requantized, scales rewritten by
 * the weights' tiles) beside one that writes it dequantized (--dtype: the scales leave the plan,
 * so the jobs' plans have different tensors) */
Test(batch, fp8_base_kept_and_dequantized, .timeout = 300)
{
    bt_fix F;
    if (!th_gen_model_path(F.gen, sizeof F.gen))
        cr_skip_test("needs %s", F.gen);
    F.tmp = th_tmpdir();
    cr_assert_not_null(realpath(th_bin(), F.bin));
    BT_OK("%s --out %s/q --hidden 64 --inter 128 --layers 1 --vocab 64 --heads 4 --kv-heads 2 --rank 4 --targets all "
          "--quant fp8 --block 16 >/dev/null && mkdir -p %s/ref %s/bat", F.gen, F.tmp, F.tmp, F.tmp);
    char base[900], jb[3][600];
    snprintf(base, sizeof base, "%s/q/base", F.tmp);
    snprintf(jb[0], sizeof jb[0], "%s/q/adapter o1/", F.tmp);
    snprintf(jb[1], sizeof jb[1], "--dtype bf16 %s/q/adapter o2.safetensors", F.tmp);
    snprintf(jb[2], sizeof jb[2], "--scale 2 %s/q/adapter o3/", F.tmp);
    bt_job jobs[3] = {{jb[0], "o1"}, {jb[1], "o2.safetensors"}, {jb[2], "o3"}};
    bt_compare(&F, base, jobs, 3, 1, "");
    bt_teardown(&F);
}

/* ---- audit (issue 14) ------------------------------------------------------------------------ */
/* a job whose OUT is another job's input: the batch overwrote job 1's adapter_model.safetensors
 * with job 2's merged model (each job checked only its own inputs).  Refused now before anything
 * is written, in either order, through a symlinked directory too; and a directory OUT inside
 * another job's adapter directory */
Test(batch, out_over_another_jobs_input_refused, .timeout = 120)
{
    bt_fix F;
    bt_setup_sized(&F, 1);
    const char *t = F.tmp;
    BT_OK("cd %s && cp -r m/adapter ad2 && ln -s ad2 lnk && cp -r m/adapter ad3", t);
    char a[8000];
    struct {
        const char *jobs, *needle;
    } cases[] = {
        {"--job %s/ad2 y/ --job %s/m/adapter %s/ad2/adapter_model.safetensors",
         "OutputIsInput: job 2 (%s/ad2/adapter_model.safetensors): the output is the same file as job 1's input"},
        {"--job %s/m/adapter %s/ad2/adapter_model.safetensors --job %s/ad2 y/",
         "OutputIsInput: job 1 (%s/ad2/adapter_model.safetensors): the output is the same file as job 2's input"},
        {"--job %s/ad2 y/ --job %s/m/adapter %s/lnk/adapter_model.safetensors", "the same file as job 1's input"},
        {"--job %s/ad2 y/ --job %s/m/adapter %s/ad2/adapter_config.json", "the same file as job 1's input"},
        {"--job %s/ad2 y/ --job --adapter %s/ad3 %s/m/adapter %s/ad3/adapter_model.safetensors",
         "the output is the same file as the input"}, /* its own (merge_begin's check) */
        {"--job %s/ad2 y/ --job %s/m/adapter %s/ad2/sub/", "the output directory is inside the input directory"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        char jobs[4000], needle[1000];
        snprintf(jobs, sizeof jobs, cases[c].jobs, t, t, t, t);
        snprintf(needle, sizeof needle, cases[c].needle, t);
        snprintf(a, sizeof a, "%s %s", F.base, jobs);
        bt_refused(&F, a, 2, needle);
    }
    bt_teardown(&F);
}

/* JOBS.json that is not a list of argument lists, each refused with one line naming the problem
 * (the file with line and column, or the job and argument), before anything is written.  It is read
 * as strictly as adapter_config.json: a second value after the array (the batch ran the first
 * array's jobs only) or bytes that are not UTF-8 are refused; an escaped character is a path like
 * any other (here one that does not exist) */
Test(batch, malformed_jobs_files_refused, .timeout = 120)
{
    bt_fix F;
    bt_setup_sized(&F, 1);
    const char *t = F.tmp;
    char p[1000], a[3000];
    snprintf(p, sizeof p, "%s/jobs.json", t);
    struct {
        const char *json;
        int status;
        const char *needle;
    } files[] = {
        {"{\"jobs\": [[\"%s/m/adapter\", \"n1/\"]]}", 2, "must be a non-empty JSON array of jobs"},
        {"\"%s/m/adapter n1/\"", 2, "must be a non-empty JSON array of jobs"},
        {"[[\"%s/m/adapter\", [\"n1/\"]]]", 2, "job 1: argument 2 is not a non-empty string"},
        {"[[\"%s/m/adapter\", \"n1/\"], []]", 2, "job 2: an entry is the job's arguments"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"n2/\"]]", 2, "job 2: an entry is the job's arguments"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"\", \"n2/\"]]", 2, "job 2: argument 1 is not a non-empty string"},
        {"[[\"%s/m/adapter\", \"n1/\"], [null, \"n2/\"]]", 2, "job 2: argument 1 is not a non-empty string"},
        {"[[\"%s/m/adapter\", \"n1/\"]], [[\"%s/m/adapter\", \"n2/\"]]", 1,
         "InvalidJson: invalid JSON at line 1, column "}, /* was one job: cJSON stopped after the first value */
        {"[[\"%s/m/adapter\", \"n1/\"]] x", 1, "unexpected data after the JSON value"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"%s/m/adapter\", \"n2/\", \"n3/\"]]", 2, "job 2 (n3/): expected BASE ADAPTER_DIR OUT"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"\\u00ff\\u00fe\", \"n2/\"]]", 3, "job 2 (n2/): cannot open"},
        {"[[\"%s/m/adapter\", \"n1/\"], [\"\377\376\", \"n2/\"]]", 1, "InvalidUtf8: not valid UTF-8 at line 1"},
    };
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char js[2000], needle[400];
        snprintf(js, sizeof js, files[i].json, t, t);
        snprintf(needle, sizeof needle, "%s", files[i].needle);
        cr_assert_eq(th_write_file(p, js, strlen(js)), 0);
        snprintf(a, sizeof a, "%s %s", F.base, p);
        bt_refused(&F, a, files[i].status, needle);
    }
    /* larger than 64 MiB (sparse), a directory, a FIFO: not read */
    BT_OK("truncate -s 65M %s", p);
    snprintf(a, sizeof a, "%s %s", F.base, p);
    bt_refused(&F, a, 2, "the jobs file must be a regular file of at most 64 MiB");
    BT_OK("rm %s && mkdir %s", p, p);
    bt_refused(&F, a, 2, "the jobs file must be a regular file of at most 64 MiB");
    BT_OK("rmdir %s && mkfifo %s", p, p);
    bt_refused(&F, a, 2, "the jobs file must be a regular file of at most 64 MiB");
    bt_teardown(&F);
}

/* peak RSS (KB) of `lora-merge batch` run as a child with K jobs, each the adapter at another
 * scale into its own file */
static long bt_batch_peak(const bt_fix *F, const char *model, int k)
{
    char base[1000], ad[1000], *argv[4 + 64 * 5 + 1];
    static char outs[64][1000], scales[64][16];
    snprintf(base, sizeof base, "%s/%s/base", F->tmp, model);
    snprintf(ad, sizeof ad, "%s/%s/adapter", F->tmp, model);
    int n = 0;
    argv[n++] = (char *)F->bin;
    argv[n++] = "batch";
    argv[n++] = "-q";
    argv[n++] = base;
    for (int j = 0; j < k; j++) {
        snprintf(outs[j], sizeof outs[j], "%s/bo/o%d.safetensors", F->tmp, j);
        snprintf(scales[j], sizeof scales[j], "0.%02d", j + 1);
        argv[n++] = "--job";
        argv[n++] = "--scale";
        argv[n++] = scales[j];
        argv[n++] = ad;
        argv[n++] = outs[j];
    }
    argv[n] = NULL;
    BT_OK("rm -rf %s/bo && mkdir %s/bo", F->tmp, F->tmp);
    pid_t pid = fork();
    if (pid == 0) {
        execv(F->bin, argv);
        _exit(127);
    }
    int st;
    struct rusage ru;
    wait4(pid, &st, 0, &ru);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "batch of %d jobs on %s failed", k, model);
    BT_OK("rm -rf %s/bo", F->tmp);
    return ru.ru_maxrss;
}

/* memory stays bounded by the tiles in flight times K: with 64 jobs the peak grows by less than
 * 1 MB a job over one job's (measured: ~0.3 MB a job: 10, 15, 23, 30 MB for K = 1, 8, 32, 64), and
 * a model 2.7 times larger adds no more than its adapters (K = 16: 18 and 21 MB) */
Test(batch, peak_rss_bounded_by_tiles_times_jobs, .timeout = 300)
{
    if (getenv("LM_ASAN") != NULL)
        cr_skip_test("sanitizer builds have their own memory overheads");
    bt_fix F;
    if (!th_gen_model_path(F.gen, sizeof F.gen))
        cr_skip_test("needs %s", F.gen);
    F.tmp = th_tmpdir();
    cr_assert_not_null(realpath(th_bin(), F.bin));
    for (int l = 2; l <= 8; l += 6)
        BT_OK("%s --out %s/m%d --hidden 512 --inter 1408 --layers %d --vocab 4096 --heads 8 --kv-heads 2 --rank 4 "
              ">/dev/null", F.gen, F.tmp, l, l);
    long one = bt_batch_peak(&F, "m2", 1), k64 = bt_batch_peak(&F, "m2", 64);
    long small16 = bt_batch_peak(&F, "m2", 16), big16 = bt_batch_peak(&F, "m8", 16);
    cr_log_info("peak RSS: K=1 %ld KB, K=64 %ld KB; K=16: %ld KB (2 layers), %ld KB (8 layers)", one, k64, small16, big16);
    cr_assert_lt(k64, one + 64 * 1024, "64 jobs: %ld KB, one job: %ld KB", k64, one);
    cr_assert_lt(big16, small16 + 8 * 1024, "16 jobs: %ld KB on 8 layers, %ld KB on 2", big16, small16);
    bt_teardown(&F);
}

/* six jobs, each OUT a file an earlier merge left: pwrite failing at every 3rd call (a failure in
 * any job's writing, job 5's too: ~60 calls), then rename failing at each of its calls (the
 * commits, in job order): every OUT holds the earlier model, or the new one for exactly the jobs
 * the error line says were committed; exit 0 only with every OUT new; never a temporary file */
Test(batch, write_fault_in_any_of_six_jobs_leaves_every_out, .timeout = 300)
{
    bt_fix F;
    bt_setup_sized(&F, 1);
    const char *t = F.tmp;
    char ad[900], logp[900], bat[900], sc[6][16], out[6][64];
    snprintf(ad, sizeof ad, "%s/m/adapter", t);
    snprintf(logp, sizeof logp, "%s/fault.log", t);
    snprintf(bat, sizeof bat, "%s/bat", t);
    const char *argv[4 + 6 * 5 + 1] = {F.bin, "batch", "-q"};
    int n = 3;
    argv[n++] = F.base;
    for (int j = 0; j < 6; j++) {
        snprintf(sc[j], sizeof sc[j], "0.%d", j + 1);
        snprintf(out[j], sizeof out[j], "o%d.safetensors", j + 1);
        argv[n++] = "--job";
        argv[n++] = "--scale";
        argv[n++] = sc[j];
        argv[n++] = ad;
        argv[n++] = out[j];
        BT_OK("cd %s/ref && %s -q --scale 0.%d %s %s %s", t, F.bin, j + 1, F.base, ad, out[j]);
    }
    argv[n] = NULL;
    BT_OK("mkdir %s/old && cd %s/old && for j in 1 2 3 4 5 6; do %s -q --scale 2 %s %s o$j.safetensors || exit 1; done",
          t, t, F.bin, F.base, ad);
    static const struct {
        const char *call;
        int step;
    } sweeps[] = {{"pwrite", 3}, {"rename", 1}};
    setenv("LM_FAULT_LOG", logp, 1);
    for (size_t s = 0; s < 2; s++) {
        int n_failed = 0, n_partial = 0;
        for (int k = 1;; k += sweeps[s].step) {
            char fault[64];
            snprintf(fault, sizeof fault, "%d:EIO:%s", k, sweeps[s].call);
            BT_OK("rm -rf %s/bat && cp -a %s/old %s/bat", t, t, t);
            unlink(logp);
            setenv("LM_FAULT", fault, 1);
            th_run_result r = th_run(bat, argv);
            unsetenv("LM_FAULT");
            int reached = th_exists(logp);
            size_t committed = 0;
            if (r.status == 0) {
                committed = 6;
            } else {
                n_failed++;
                cr_assert(r.status == 3 && strncmp(r.err, "error: ", 7) == 0 &&
                              strchr(r.err, '\n') == r.err + strlen(r.err) - 1 && strstr(r.err, "job "),
                          "%s: exit %d: %s", fault, r.status, r.err);
                const char *c = strstr(r.err, "after job");
                unsigned a = 0, b = 0;
                if (c != NULL && sscanf(c, "after jobs 1-%u of 6 were committed", &b) == 1)
                    committed = b;
                else if (c != NULL && sscanf(c, "after job %u of 6 was committed", &a) == 1)
                    committed = a;
                n_partial += committed > 0;
            }
            for (int j = 0; j < 6; j++) {
                char o[1000], want[1000];
                snprintf(o, sizeof o, "%s/bat/%s", t, out[j]);
                snprintf(want, sizeof want, "%s/%s/%s", t, (size_t)j < committed ? "ref" : "old", out[j]);
                cr_assert(th_files_equal(o, want), "%s: job %d's OUT is not the %s model (%zu committed): %s", fault,
                          j + 1, (size_t)j < committed ? "new" : "earlier", committed, r.err);
            }
            cr_assert_eq(th_count_temps(bat), 0, "%s: temporary files left", fault);
            th_run_free(&r);
            if (!reached)
                break;
        }
        cr_log_info("%s: %d runs failed, %d of them after some commits", sweeps[s].call, n_failed, n_partial);
        cr_assert_geq(n_failed, sweeps[s].step == 1 ? 5 : 15, "%s: %d failures only", sweeps[s].call, n_failed);
        if (sweeps[s].step == 1)
            cr_assert_geq(n_partial, 4, "rename: no failure between the commits");
    }
    unsetenv("LM_FAULT_LOG");
    bt_teardown(&F);
}

/* the types outputs_equal_single_merges does not cover (but BEFT: the generated model has no
 * biases), 15 jobs of one batch, half through JOBS.json, every 4th with --dtype f32, files and
 * directories: every output byte-identical to its single merge, its report the same but timings */
Test(batch, more_types_equal_single_merges, .timeout = 300)
{
    bt_fix F;
    bt_setup_sized(&F, 0);
    static const char *const types[][2] = {
        {"lokr", "--rank 4"},      {"boft", "--block 8"},     {"hra", "--rank 4"},         {"miss", "--rank 16"},
        {"fourierft", "--n-frequency 100"}, {"adalora", "--rank 4"}, {"randlora", "--rank 8"}, {"vblora", "--block 16"},
        {"delora", "--rank 4"},    {"gralora", "--rank 8"},   {"shira", "--rank 8"},       {"c3a", "--block 16"},
        {"hira", "--rank 8"},      {"ln_tuning", ""},         {"trainable_tokens", ""}};
    enum { NT = sizeof types / sizeof *types };
    static char args[NT][700], outs[NT][32];
    bt_job jobs[NT];
    for (size_t i = 0; i < NT; i++) {
        BT_OK("%s --base %s --out %s/x_%s --type %s %s --seed %zu >/dev/null", F.gad, F.base, F.tmp, types[i][0],
              types[i][0], types[i][1], 40 + i);
        snprintf(outs[i], sizeof outs[i], i % 3 ? "x%zu/" : "x%zu.safetensors", i);
        snprintf(args[i], sizeof args[i], "%s%s/x_%s %s", i % 4 == 1 ? "--dtype f32 " : "", F.tmp, types[i][0], outs[i]);
        if (outs[i][strlen(outs[i]) - 1] == '/')
            outs[i][strlen(outs[i]) - 1] = '\0';
        jobs[i] = (bt_job){args[i], outs[i]};
    }
    bt_compare(&F, F.base, jobs, NT, NT / 2, "");
    bt_teardown(&F);
}
