/* SPDX-License-Identifier: MIT */
/* test_shards.c : shard jobs (--shards I/N, finalize).  N workers run as separate processes, in
 * a shuffled order, some at the same time, one killed with SIGKILL and rerun; after finalize the
 * directory is byte-identical (diff -r) to the single-process merge.  Finalize refuses missing,
 * unverified and corrupted shards naming them, writing nothing; a worker given other options is
 * refused by the plan's fingerprint. */
#include "th.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <glob.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    char *tmp;
    char bin[PATH_MAX];
    char base[700], ad[700], ref[700], out[700];
} sh_fix;

static int sh_ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* runs a shell command line; @return its exit status (stderr kept for the assertion message) */
static th_run_result sh_run(const char *cmd)
{
    return th_sh(cmd);
}

static int sh_ok(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    th_run_result r = sh_run(cmd);
    int st = r.status;
    if (st != 0)
        cr_log_error("`%s` exit %d: %s", cmd, st, r.err);
    th_run_free(&r);
    return st;
}

/* a generated model, merged once into a sharded base (10 files of ~200 KB: model-0000k-of-00010)
 * and the single-process reference merge of it: REF/out (same leaf name as the workers' OUT so
 * the model cards match) */
static void sh_setup(sh_fix *F, const char *gen_extra)
{
    char gen[4096];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    F->tmp = th_tmpdir();
    cr_assert_not_null(realpath(th_bin(), F->bin));
    snprintf(F->base, sizeof F->base, "%s/sbase", F->tmp);
    snprintf(F->ad, sizeof F->ad, "%s/m/adapter", F->tmp);
    snprintf(F->ref, sizeof F->ref, "%s/ref/out", F->tmp);
    snprintf(F->out, sizeof F->out, "%s/w/out", F->tmp);
    cr_assert_eq(sh_ok("%s --out %s/m --hidden 128 --inter 344 --layers 4 --vocab 512 --heads 4 --kv-heads 2 "
                       "--rank 4 %s >/dev/null", gen, F->tmp, gen_extra), 0);
    cr_assert_eq(sh_ok("%s -q --allow-noop --max-shard-size 200KB %s/m/base %s %s/", F->bin, F->tmp, F->ad, F->base), 0);
    cr_assert_eq(sh_ok("mkdir -p %s/ref %s/w && %s -q --max-shard-size 200KB %s %s %s/", F->tmp, F->tmp, F->bin,
                       F->base, F->ad, F->ref), 0);
    char p[800];
    snprintf(p, sizeof p, "%s/model-00002-of-000%s.safetensors", F->ref, gen_extra[0] ? "" : "10");
    cr_assert(gen_extra[0] || th_exists(p), "the reference is not in 10 shards");
}

static void sh_teardown(sh_fix *F)
{
    th_rmrf(F->tmp);
    free(F->tmp);
}

/* worker i of n, from the base's directory as working directory (finalize replays from there) */
static int worker(const sh_fix *F, int i, int n, const char *extra)
{
    return sh_ok("cd %s && %s -q --shards %d/%d %s %s %s %s/", F->tmp, F->bin, i, n, extra, F->base, F->ad, F->out);
}

static th_run_result finalize(const sh_fix *F)
{
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "cd / && %s -q finalize %s", F->bin, F->out);
    return sh_run(cmd);
}

/* finalize succeeds and OUT is the single merge's directory, byte for byte */
static void finalize_identical(const sh_fix *F)
{
    th_run_result r = finalize(F);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    cr_assert_eq(sh_ok("diff -r %s %s >&2", F->ref, F->out), 0);
}

/* the shards worker `i` of `n` must write (README): the largest first (ties: lower k), each to the
 * worker with the fewest bytes so far (ties: the lower one); from the reference's file sizes */
static void expected_owners(const sh_fix *F, int n, int owner[10])
{
    long long size[10], load[16] = {0};
    int taken[10] = {0};
    for (int k = 0; k < 10; k++) {
        char p[1000];
        struct stat st;
        snprintf(p, sizeof p, "%s/model-%05d-of-00010.safetensors", F->ref, k + 1);
        cr_assert_eq(stat(p, &st), 0, "%s", p);
        size[k] = (long long)st.st_size;
    }
    for (int step = 0; step < 10; step++) {
        int big = -1, w = 0;
        for (int k = 0; k < 10; k++)
            if (!taken[k] && (big < 0 || size[k] > size[big]))
                big = k;
        for (int j = 1; j < n; j++)
            if (load[j] < load[w])
                w = j;
        taken[big] = 1;
        owner[big] = w;
        load[w] += size[big];
    }
}

Test(shards, workers_shuffled_concurrent_killed_then_finalize_identical)
{
    sh_fix F;
    sh_setup(&F, "");
    /* 4 workers: 3 and 1 together, 0 killed with SIGKILL while it may be writing (whatever it
     * left, the rerun must complete it), then 2 and 0 again */
    cr_assert_eq(sh_ok("cd %s && (%s -q --shards 3/4 %s %s %s/ & %s -q --shards 1/4 %s %s %s/ & wait) && "
                       "(%s -q --threads 1 --shards 0/4 %s %s %s/ & p=$!; sleep 0.03; kill -9 $p; wait $p; true)",
                       F.tmp, F.bin, F.base, F.ad, F.out, F.bin, F.base, F.ad, F.out, F.bin, F.base, F.ad, F.out), 0);
    /* worker 2 with drop-behind at a 4 KB step: its shards' pages dropped behind their hashed
     * prefix while they are hashed as written (checked below by finalize --verify) */
    cr_assert_eq(sh_ok("cd %s && LM_DROP_BEHIND=4096 %s -q --shards 2/4 --tile-elems 1024 %s %s %s/", F.tmp, F.bin,
                       F.base, F.ad, F.out), 0);
    /* worker 0 with direct I/O (opt-in): its shards hashed from the tile buffers as written */
    cr_assert_eq(sh_ok("cd %s && LM_DIRECT_IO=1 LM_DROP_BEHIND=4096 %s -q --shards 0/4 --tile-elems 1024 %s %s %s/",
                       F.tmp, F.bin, F.base, F.ad, F.out), 0);
    /* a killed writer's leftovers, made deterministic: shard 5 (worker 0's) renamed but its
     * sidecar never written, and an abandoned temporary file */
    char p[1000];
    snprintf(p, sizeof p, "%s/.lora-merge-shards/model-00005-of-00010.safetensors.json", F.out);
    cr_assert_eq(remove(p), 0);
    snprintf(p, sizeof p, "%s/.model-00005-of-00010.safetensors.lm-tmp-Ab12Cd", F.out);
    cr_assert_eq(th_write_file(p, "partial", 7), 0);
    /* and what a worker killed while recording the plan or a sidecar leaves (the kill above does
     * that at times, under load: finalize then left .lora-merge-shards behind) */
    snprintf(p, sizeof p, "%s/.lora-merge-shards/.plan.json.lm-tmp-Qq11Ww", F.out);
    cr_assert_eq(th_write_file(p, "{", 1), 0);
    snprintf(p, sizeof p, "%s/.lora-merge-shards/.model-00003-of-00010.safetensors.json.lm-tmp-Zz99Yy", F.out);
    cr_assert_eq(th_write_file(p, "{", 1), 0);
    th_run_result r = finalize(&F);
    cr_assert_eq(r.status, 1, "finalize accepted a shard without sidecar: %s", r.err);
    cr_assert(strstr(r.err, "ShardsIncomplete") && strstr(r.err, "model-00005-of-00010.safetensors (no sidecar"),
              "%s", r.err);
    cr_assert(strstr(r.err, "1 of 10 shards"), "%s", r.err);
    th_run_free(&r);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", F.out);
    cr_assert(!th_exists(p), "a refused finalize wrote the index");
    /* the rerun of shard 5's worker keeps its other, verified, shards and rewrites shard 5 */
    int owner[10], n_mine = 0, other = -1;
    expected_owners(&F, 4, owner);
    for (int k = 0; k < 10; k++)
        if (owner[k] == owner[4]) {
            n_mine++;
            other = k != 4 ? k : other;
        }
    cr_assert(other >= 0);
    char cmd[9000], want[200];
    snprintf(cmd, sizeof cmd, "cd %s && %s --shards %d/4 %s %s %s/", F.tmp, F.bin, owner[4], F.base, F.ad, F.out);
    r = sh_run(cmd);
    cr_assert_eq(r.status, 0, "%s", r.err);
    snprintf(want, sizeof want, "shard model-%05d-of-00010.safetensors already complete and verified", other + 1);
    cr_assert(strstr(r.err, want), "%s", r.err);
    cr_assert(strstr(r.err, "removed .model-00005-of-00010.safetensors.lm-tmp-Ab12Cd"), "%s", r.err);
    snprintf(want, sizeof want, "(1 written, %d kept)", n_mine - 1);
    cr_assert(strstr(r.err, want), "%s: %s", want, r.err);
    /* the summary counts what was written: shard 5, its size the reference's */
    struct stat st5;
    snprintf(p, sizeof p, "%s/model-00005-of-00010.safetensors", F.ref);
    cr_assert_eq(stat(p, &st5), 0);
    snprintf(want, sizeof want, "wrote 1 file, %lld bytes; kept %d already complete and verified:\n",
             (long long)st5.st_size, n_mine - 1);
    cr_assert(strstr(r.out, want), "%s: %s", want, r.out);
    th_run_free(&r);
    /* run again: every shard kept, none written (the summary said "wrote N files") */
    r = sh_run(cmd);
    cr_assert_eq(r.status, 0, "%s", r.err);
    snprintf(want, sizeof want, "wrote 0 files, 0 bytes; kept %d already complete and verified:\n", n_mine);
    cr_assert(strstr(r.out, want), "%s: %s", want, r.out);
    /* and the first line says so too (it said "merged 1 adapter into ...: 0.00 GB in ...") */
    char first[1200];
    snprintf(first, sizeof first, "merged nothing into %s/: this worker's %d shard%s already complete and verified "
             "(the plan: ", F.out, n_mine, n_mine == 1 ? " is" : "s are");
    cr_assert(strncmp(r.out, first, strlen(first)) == 0, "%s: %s", first, r.out);
    int n_kept_lines = 0;
    for (const char *q = r.out; (q = strstr(q, "weights (kept)\n")) != NULL; q++)
        n_kept_lines++;
    cr_assert_eq(n_kept_lines, n_mine, "%s", r.out);
    th_run_free(&r);
    snprintf(cmd, sizeof cmd, "cd / && %s --verify finalize %s", F.bin, F.out); /* every sidecar's XXH3-128 */
    r = sh_run(cmd);
    cr_assert_eq(r.status, 0, "%s", r.err);
    cr_assert(strstr(r.err, "10 of the 10 shards read back"), "%s", r.err);
    th_run_free(&r);
    cr_assert_eq(sh_ok("diff -r %s %s >&2", F.ref, F.out), 0, "the workers' directory differs from the single merge");
    sh_teardown(&F);
}

/* What finalize checks without --verify: present, sidecar of this plan, size, and the file's
 * identity (inode, mtime, ctime) as its worker recorded it; a shard whose identity changed is read
 * back and hashed.  So a byte changed in place, a truncation and a file renamed over a shard are
 * all caught without reading the others; only a change that leaves the identity alone (here: the
 * sidecar's XXH3-128 forged, as bytes rotting below the filesystem would look) needs --verify. */
Test(shards, finalize_refuses_missing_and_corrupted_then_accepts)
{
    sh_fix F;
    sh_setup(&F, "");
    for (int i = 1; i >= 0; i--)
        cr_assert_eq(worker(&F, i, 2, ""), 0);
    char p[1000], q[1000];
    /* every sidecar's XXH3-128 is the shard's, computed independently (the library's one-shot
     * call over the whole file, th_file_xxh128); the sidecar says what it is, and holds no sha256x4 */
    for (int k = 1; k <= 10; k++) {
        char sc[1000], shard[1000], ref[65];
        snprintf(sc, sizeof sc, "%s/.lora-merge-shards/model-%05d-of-00010.safetensors.json", F.out, k);
        snprintf(shard, sizeof shard, "%s/model-%05d-of-00010.safetensors", F.out, k);
        size_t n = 0;
        uint8_t *text = th_read_file(sc, &n);
        cJSON *j = text ? cJSON_ParseWithLength((const char *)text, n) : NULL;
        const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "xxh3_128");
        cr_assert(cJSON_IsString(h), "%s: no xxh3_128", sc);
        cr_assert(!cJSON_GetObjectItemCaseSensitive(j, "sha256x4"), "%s", sc);
        const cJSON *is = cJSON_GetObjectItemCaseSensitive(j, "xxh3_128_is");
        cr_assert(cJSON_IsString(is) && strstr(is->valuestring, "not a cryptographic digest"), "%s", sc);
        cr_assert_eq(th_file_xxh128(shard, ref), 0);
        cr_assert_str_eq(h->valuestring, ref, "%s", shard);
        cJSON_Delete(j);
        free(text);
    }
    /* one byte of shard 4's data changed in place (same size), shard 7 gone, shard 9 truncated,
     * shard 6 replaced by a copy with one byte changed (renamed over it) */
    snprintf(p, sizeof p, "%s/model-00004-of-00010.safetensors", F.out);
    cr_assert_eq(sh_ok("printf 'Z' | dd of=%s bs=1 seek=5000 conv=notrunc 2>/dev/null", p), 0);
    snprintf(q, sizeof q, "%s/model-00007-of-00010.safetensors", F.out);
    cr_assert_eq(remove(q), 0);
    cr_assert_eq(sh_ok("truncate -s -1 %s/model-00009-of-00010.safetensors", F.out), 0);
    cr_assert_eq(sh_ok("cd %s && cp model-00006-of-00010.safetensors t && printf 'Z' | dd of=t bs=1 seek=6000 "
                       "conv=notrunc 2>/dev/null && mv t model-00006-of-00010.safetensors", F.out), 0);
    /* shard 2's sidecar records another XXH3-128, its file untouched */
    cr_assert_eq(sh_ok("cd %s/.lora-merge-shards && sed 's/\\(\"xxh3_128\":[^\"]*\"\\)./\\1x/' "
                       "model-00002-of-00010.safetensors.json >t && grep -q '\"xxh3_128\":.*\"x' t && "
                       "mv t model-00002-of-00010.safetensors.json", F.out), 0);
    th_run_result r = finalize(&F);
    cr_assert_eq(r.status, 1, "%s", r.err);
    cr_assert(strstr(r.err, "4 of 10 shards"), "%s", r.err);
    cr_assert(strstr(r.err, "model-00004-of-00010.safetensors (XXH3-128 differs from its sidecar (corrupted))"), "%s", r.err);
    cr_assert(strstr(r.err, "model-00006-of-00010.safetensors (XXH3-128 differs from its sidecar (corrupted))"), "%s", r.err);
    cr_assert(strstr(r.err, "model-00007-of-00010.safetensors (missing)"), "%s", r.err);
    cr_assert(strstr(r.err, "model-00009-of-00010.safetensors (wrong size)"), "%s", r.err);
    cr_assert(!strstr(r.err, "model-00002"), "shard 2 was read back without --verify: %s", r.err);
    th_run_free(&r);
    snprintf(p, sizeof p, "%s/config.json", F.out);
    cr_assert(!th_exists(p), "a refused finalize wrote config.json");
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "cd / && %s --verify finalize %s", F.bin, F.out);
    r = sh_run(cmd);
    cr_assert_eq(r.status, 1, "%s", r.err);
    cr_assert(strstr(r.err, "5 of 10 shards"), "%s", r.err);
    cr_assert(strstr(r.err, "model-00002-of-00010.safetensors (XXH3-128 differs from its sidecar (corrupted))"), "%s", r.err);
    th_run_free(&r);
    cr_assert(!th_exists(p), "a refused finalize wrote config.json");
    /* the same refusal through --shards index with the workers' arguments */
    snprintf(cmd, sizeof cmd, "cd %s && %s -q --shards index %s %s %s/", F.tmp, F.bin, F.base, F.ad, F.out);
    r = sh_run(cmd);
    cr_assert_eq(r.status, 1, "%s", r.err);
    th_run_free(&r);
    /* the workers rerun: each rewrites its shards of 4, 6, 7 and 9; the one of shard 2 runs with
     * --verify, so rewrites 2 as well */
    int owner[10];
    expected_owners(&F, 2, owner);
    const int v = owner[1]; /* shard 2's */
    int n_bad[2] = {0, 0}, n_mine[2] = {0, 0};
    for (int k = 0; k < 10; k++) {
        n_mine[owner[k]]++;
        n_bad[owner[k]] += k == 3 || k == 5 || k == 6 || k == 8 || k == 1;
    }
    for (int w = 0; w < 2; w++) {
        char want[100];
        snprintf(cmd, sizeof cmd, "cd %s && %s %s --shards %d/2 %s %s %s/", F.tmp, F.bin, w == v ? "--verify" : "", w,
                 F.base, F.ad, F.out);
        r = sh_run(cmd);
        cr_assert_eq(r.status, 0, "%s", r.err);
        snprintf(want, sizeof want, "(%d written, %d kept)", n_bad[w], n_mine[w] - n_bad[w]);
        cr_assert(strstr(r.err, want), "worker %d: %s: %s", w, want, r.err);
        th_run_free(&r);
    }
    /* sidecars of an older lora-merge (sha256x4, plan 2) are never trusted: shard 3's holds a
     * sha256x4 instead of its XXH3-128, shard 5's another plan's fingerprint; finalize refuses
     * both, their workers rewrite them */
    cr_assert_eq(sh_ok("cd %s/.lora-merge-shards && sed 's/\"xxh3_128\":\\([^\"]*\\)\"[0-9a-f]*\"/\"sha256x4\":\\1\"%064d\"/' "
                       "model-00003-of-00010.safetensors.json >t && grep -q '\"sha256x4\"' t && "
                       "mv t model-00003-of-00010.safetensors.json && "
                       "sed 's/\\(\"fingerprint\":[^\"]*\"\\)./\\1x/' model-00005-of-00010.safetensors.json >t && "
                       "grep -q '\"fingerprint\":.*\"x' t && mv t model-00005-of-00010.safetensors.json", F.out, 0), 0);
    r = finalize(&F);
    cr_assert_eq(r.status, 1, "%s", r.err);
    cr_assert(strstr(r.err, "2 of 10 shards not complete and verified: model-00003-of-00010.safetensors (its sidecar "
                            "has no XXH3-128 (corrupted)), model-00005-of-00010.safetensors (written for another "
                            "plan)"), "%s", r.err);
    th_run_free(&r);
    for (int w = 0; w < 2; w++)
        cr_assert_eq(worker(&F, w, 2, ""), 0);
    snprintf(cmd, sizeof cmd, "cd / && %s --json finalize %s", F.bin, F.out);
    r = sh_run(cmd);
    cr_assert_eq(r.status, 0, "%s", r.err);
    /* --json: every file's sha256, as sha256sum says (the shards' read back for it: the sidecars
     * hold XXH3-128; their workers' identities unchanged) */
    cr_assert(strstr(r.out, "10 shards checked by size and the identity their workers recorded (inode, mtime, ctime), "
                            "0 read back"), "%s", r.out);
    cr_assert(strstr(r.out, "--json: every shard read back for its sha256"), "%s", r.out);
    cJSON *rep = cJSON_Parse(r.out), *f;
    int n_files = 0;
    cr_assert_not_null(rep, "%s", r.out);
    cJSON_ArrayForEach(f, cJSON_GetObjectItemCaseSensitive(rep, "files"))
    {
        const cJSON *path = cJSON_GetObjectItemCaseSensitive(f, "path"), *sha = cJSON_GetObjectItemCaseSensitive(f, "sha256");
        cr_assert(cJSON_IsString(path) && cJSON_IsString(sha), "a file without path or sha256");
        snprintf(cmd, sizeof cmd, "sha256sum %s", path->valuestring);
        th_run_result h = sh_run(cmd);
        cr_assert(h.status == 0 && strncmp(h.out, sha->valuestring, 64) == 0 && strlen(sha->valuestring) == 64,
                  "%s: sha256 %s, sha256sum %s", path->valuestring, sha->valuestring, h.out);
        th_run_free(&h);
        n_files++;
    }
    cr_assert_geq(n_files, 12, "finalize reported %d files", n_files); /* 10 shards, the index, config ... */
    cJSON_Delete(rep);
    th_run_free(&r);
    cr_assert_eq(sh_ok("diff -r %s %s", F.ref, F.out), 0);
    /* finalize twice: nothing left to finalize */
    r = finalize(&F);
    cr_assert_eq(r.status, 2, "%s", r.err);
    cr_assert(strstr(r.err, "no shard plan here"), "%s", r.err);
    th_run_free(&r);
    sh_teardown(&F);
}

Test(shards, fingerprint_refuses_a_worker_with_other_options)
{
    sh_fix F;
    sh_setup(&F, "");
    cr_assert_eq(worker(&F, 0, 3, ""), 0);
    /* worker 0 of 3 wrote its shards, balanced by bytes, and no other; the sizes here differ
     * (the size split), so that is not k % 3 */
    int owner[10], differs = 0;
    expected_owners(&F, 3, owner);
    for (int k = 0; k < 10; k++) {
        char p[1000];
        snprintf(p, sizeof p, "%s/model-%05d-of-00010.safetensors", F.out, k + 1);
        cr_assert_eq(th_exists(p), owner[k] == 0, "shard %d: owner %d, written by worker 0: %d", k + 1, owner[k],
                     th_exists(p));
        differs |= owner[k] != k % 3;
    }
    cr_assert(differs, "the shards' sizes give k %% 3: the test shows nothing");
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "cd %s && %s -q --scale 0.5 --shards 1/3 %s %s %s/", F.tmp, F.bin, F.base, F.ad, F.out);
    th_run_result r = sh_run(cmd);
    cr_assert_eq(r.status, 2, "%s", r.err);
    cr_assert(strstr(r.err, "PlanMismatch"), "%s", r.err);
    th_run_free(&r);
    for (int k = 0; k < 10; k++) {
        char p[1000];
        snprintf(p, sizeof p, "%s/model-%05d-of-00010.safetensors", F.out, k + 1);
        cr_assert(owner[k] == 0 || !th_exists(p), "the refused worker wrote its shard %d", k + 1);
    }
    snprintf(cmd, sizeof cmd, "cd %s && %s -q --dtype f32 --shards 2/3 %s %s %s/", F.tmp, F.bin, F.base, F.ad, F.out);
    r = sh_run(cmd);
    cr_assert_eq(r.status, 2, "%s", r.err);
    th_run_free(&r);
    /* finalize with other options than the workers' is refused too */
    snprintf(cmd, sizeof cmd, "cd %s && %s -q --scale 2 --shards index %s %s %s/", F.tmp, F.bin, F.base, F.ad, F.out);
    r = sh_run(cmd);
    cr_assert_eq(r.status, 2, "%s", r.err);
    cr_assert(strstr(r.err, "PlanMismatch"), "%s", r.err);
    th_run_free(&r);
    sh_teardown(&F);
}

/* an unsharded base with --max-shard-size: the deterministic size split; a MoE model, whose
 * fused expert parameters are adapted from tensors the planner reads globally */
Test(shards, size_split_moe_identical)
{
    sh_fix F;
    sh_setup(&F, "--experts 4 --targets all");
    cr_assert_eq(sh_ok("%s -q --max-shard-size 150KB %s/m/base %s %s/ref/split/", F.bin, F.tmp, F.ad, F.tmp), 0);
    for (int i = 2; i >= 0; i--)
        cr_assert_eq(sh_ok("cd %s && %s -q --threads 1 --max-shard-size 150KB --shards %d/3 m/base m/adapter w/split/",
                           F.tmp, F.bin, i), 0);
    /* options (with values) may come before the command, as for a merge; the report gives the
     * threads the workers used (their sidecars), not finalize's own (it writes no tensor) */
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "cd / && %s --threads 2 --kernels=ref finalize %s/w/split", F.bin, F.tmp);
    th_run_result r = sh_run(cmd);
    cr_assert_eq(r.status, 0, "%s", r.err);
    cr_assert(strstr(r.out, "GB/s, 1 threads, kernels ref)"), "%s", r.out);
    th_run_free(&r);
    cr_assert_eq(sh_ok("diff -r %s/ref/split %s/w/split", F.tmp, F.tmp), 0);
    sh_teardown(&F);
}

/* writes the tensors of st that shard_of puts in shard k as a safetensors file, their bytes as
 * they are */
static void raw_shard(const char *path, const th_st *st, int (*shard_of)(const char *), int k)
{
    static char hdr[1 << 16];
    size_t used = (size_t)snprintf(hdr, sizeof hdr, "{");
    uint64_t off = 0;
    for (size_t i = 0; i < st->n; i++) {
        const th_tensor *t = &st->t[i];
        if (shard_of(t->name) != k)
            continue;
        used += (size_t)snprintf(hdr + used, sizeof hdr - used, "%s\"%s\": {\"dtype\": \"%s\", \"shape\": [", off ? ", " : "",
                                 t->name, t->dtype);
        for (int d = 0; d < t->n_dims; d++)
            used += (size_t)snprintf(hdr + used, sizeof hdr - used, "%s%llu", d ? ", " : "", (unsigned long long)t->shape[d]);
        used += (size_t)snprintf(hdr + used, sizeof hdr - used, "], \"data_offsets\": [%llu, %llu]}", (unsigned long long)off,
                                 (unsigned long long)(off + t->n_bytes));
        off += t->n_bytes;
    }
    used += (size_t)snprintf(hdr + used, sizeof hdr - used, "}");
    while (used % 8)
        hdr[used++] = ' ';
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "%s", path);
    uint64_t n = used;
    fwrite(&n, 8, 1, f);
    fwrite(hdr, 1, used, f);
    for (size_t i = 0; i < st->n; i++)
        if (shard_of(st->t[i].name) == k)
            fwrite(st->t[i].data, 1, st->t[i].n_bytes, f);
    fclose(f);
}

/* the base file `src` split into DIR/model-0000k-of-00002.safetensors as shard_of says (1, 2, or 0:
 * left out), with its index */
static void split_base(const char *src, const char *dir, int (*shard_of)(const char *))
{
    th_st st;
    cr_assert_eq(th_st_read(src, &st), 0);
    char p[1200];
    static char idx[1 << 16];
    size_t used = (size_t)snprintf(idx, sizeof idx, "{\"metadata\": {}, \"weight_map\": {"), w = 0;
    for (int k = 1; k <= 2; k++) {
        snprintf(p, sizeof p, "%s/model-0000%d-of-00002.safetensors", dir, k);
        raw_shard(p, &st, shard_of, k);
        for (size_t i = 0; i < st.n; i++)
            if (shard_of(st.t[i].name) == k)
                used += (size_t)snprintf(idx + used, sizeof idx - used, "%s\"%s\": \"model-0000%d-of-00002.safetensors\"",
                                         w++ ? ", " : "", st.t[i].name, k);
    }
    snprintf(idx + used, sizeof idx - used, "}}");
    th_write_text(dir, "model.safetensors.index.json", idx);
    th_st_free(&st);
}

/* DIR's weight files: model.safetensors, or model-*.safetensors (glob order) */
static size_t weight_files(const char *dir, glob_t *g)
{
    char pat[1200];
    snprintf(pat, sizeof pat, "%s/model*.safetensors", dir);
    cr_assert_eq(glob(pat, 0, NULL, g), 0, "no weight file in %s", dir);
    return g->gl_pathc;
}

/* every tensor of the single merge `one` is in DIR's weight files with the same bytes, and no other */
static void same_tensors(const char *one, const char *dir)
{
    th_st a, sh[8];
    glob_t g;
    size_t n = weight_files(dir, &g), total = 0;
    cr_assert(n <= 8);
    cr_assert_eq(th_st_read(one, &a), 0);
    for (size_t k = 0; k < n; k++) {
        cr_assert_eq(th_st_read(g.gl_pathv[k], &sh[k]), 0);
        total += sh[k].n;
    }
    cr_assert_eq(total, a.n, "%s: another set of tensors than the single merge's", dir);
    for (size_t i = 0; i < a.n; i++) {
        const th_tensor *x = &a.t[i], *y = NULL;
        for (size_t k = 0; k < n && y == NULL; k++)
            y = th_st_find(&sh[k], x->name);
        cr_assert(y != NULL && y->n_bytes == x->n_bytes && memcmp(x->data, y->data, x->n_bytes) == 0,
                  "%s differs from the single merge's", x->name);
    }
    th_st_free(&a);
    for (size_t k = 0; k < n; k++)
        th_st_free(&sh[k]);
    globfree(&g);
}

/* what a loader sees in DIR: one model.safetensors and no index, or an index naming exactly the
 * weight files there; no weight file without a tensor */
static void weight_files_as_indexed(const char *dir)
{
    glob_t g;
    size_t n = weight_files(dir, &g);
    char p[1300];
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    size_t len = 0;
    uint8_t *text = th_read_file(p, &len);
    cJSON *j = text ? cJSON_ParseWithLength((const char *)text, len) : NULL;
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(j, "weight_map"), *it;
    cr_assert(n == 1 ? text == NULL && strcmp(strrchr(g.gl_pathv[0], '/'), "/model.safetensors") == 0 : map != NULL,
              "%s: %zu weight files, index %s", dir, n, text ? "present" : "absent");
    for (size_t k = 0; k < n; k++) {
        th_st st;
        cr_assert_eq(th_st_read(g.gl_pathv[k], &st), 0);
        cr_assert(st.n > 0, "%s: a weight file without tensors", g.gl_pathv[k]);
        th_st_free(&st);
        int named = 0;
        cJSON_ArrayForEach(it, map) named |= strcmp(it->valuestring, strrchr(g.gl_pathv[k], '/') + 1) == 0;
        cr_assert(n == 1 || named, "%s: not named by the index", g.gl_pathv[k]);
    }
    cJSON_ArrayForEach(it, map)
    {
        snprintf(p, sizeof p, "%s/%s", dir, it->valuestring);
        cr_assert(th_exists(p), "the index names %s, absent", p);
    }
    cJSON_Delete(j);
    free(text);
    globfree(&g);
}

static int is_scale(const char *name)
{
    size_t n = strlen(name);
    return n > 10 && strcmp(name + n - 10, "_scale_inv") == 0;
}

static int scales_apart(const char *name)
{
    return is_scale(name) ? 2 : 1;
}

/* a block-FP8 base kept quantized: a changed weight's requantized tiles carry new scales for its
 * scale tensor, which must be in the shard its worker writes.  (1) The size split with shards
 * small enough to part weights from their scales (the workers crashed on a NULL writer there);
 * (2) a sharded base whose scales are all stored in a shard of their own (as a shard boundary of
 * a Hub checkpoint can fall between a weight and its scale_inv): the scales go with their
 * weights (the planned shards left without a tensor get no file: a loader reads the index, or the
 * one model.safetensors), the finalized model holds the single merge's tensors, byte for byte */
/* a temporary directory with a generated model in m/ (gen_model's args), bin the binary's path,
 * gen gen_model's */
static char *gen_in_tmp(char *bin, char *gen, size_t cap, const char *args)
{
    if (!th_gen_model_path(gen, cap))
        cr_skip_test("needs %s", gen);
    cr_assert_not_null(realpath(th_bin(), bin));
    char *tmp = th_tmpdir();
    cr_assert_eq(sh_ok("%s --out %s/m %s >/dev/null", gen, tmp, args), 0);
    return tmp;
}

Test(shards, quantized_scales_stored_apart, .timeout = 120)
{
    char gen[4096], bin[PATH_MAX];
    char *tmp = gen_in_tmp(bin, gen, sizeof gen, "--hidden 256 --inter 512 --layers 2 --vocab 512 --heads 4 "
                                                 "--kv-heads 2 --rank 8 --quant fp8");
    cr_assert_eq(sh_ok("cd %s && mkdir a b c d && %s -q --max-shard-size 100KB m/base m/adapter a/split/ 2>/dev/null", tmp,
                       bin), 0);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(sh_ok("cd %s && %s -q --max-shard-size 100KB --shards %d/2 m/base m/adapter b/split/ 2>/dev/null", tmp,
                           bin, i), 0);
    cr_assert_eq(sh_ok("%s -q finalize %s/b/split", bin, tmp), 0);
    cr_assert_eq(sh_ok("diff -r %s/a/split %s/b/split", tmp, tmp), 0);
    /* the split planned shards holding only scales, now with their weights: no file for them */
    char p[1200], q[1200];
    snprintf(p, sizeof p, "%s/b/split", tmp);
    weight_files_as_indexed(p);
    /* (2) the base in two shards: every tensor but the scales, then the scales */
    cr_assert_eq(sh_ok("mkdir %s/sb && cp %s/m/base/config.json %s/sb/", tmp, tmp, tmp), 0);
    snprintf(p, sizeof p, "%s/m/base/model.safetensors", tmp);
    snprintf(q, sizeof q, "%s/sb", tmp);
    split_base(p, q, scales_apart);
    for (int i = 1; i >= 0; i--)
        cr_assert_eq(sh_ok("cd %s && %s -q --shards %d/2 sb m/adapter c/w/ 2>/dev/null", tmp, bin, i), 0);
    cr_assert_eq(sh_ok("%s -q finalize %s/c/w", bin, tmp), 0);
    cr_assert_eq(sh_ok("cd %s && %s -q --shards 0/1 sb m/adapter d/w/ 2>/dev/null && %s -q finalize d/w && diff -r d/w c/w",
                       tmp, bin, bin), 0);
    /* every tensor as the single merge of the unsharded base writes it, the scales with their weights */
    cr_assert_eq(sh_ok("cd %s && %s -q m/base m/adapter one.safetensors 2>/dev/null", tmp, bin), 0);
    snprintf(p, sizeof p, "%s/one.safetensors", tmp);
    snprintf(q, sizeof q, "%s/c/w", tmp);
    same_tensors(p, q);
    weight_files_as_indexed(q); /* the scales' shard is gone: one model.safetensors */
    th_st s1;
    snprintf(p, sizeof p, "%s/c/w/model.safetensors", tmp);
    cr_assert_eq(th_st_read(p, &s1), 0);
    for (size_t i = 0; i < s1.n; i++)
        if (!is_scale(s1.t[i].name) && strstr(s1.t[i].name, "_proj.weight")) {
            char sc[300];
            snprintf(sc, sizeof sc, "%s_scale_inv", s1.t[i].name);
            cr_assert_not_null(th_st_find(&s1, sc), "%s: not with its weight in shard 1", sc);
        }
    th_st_free(&s1);
    th_rmrf(tmp);
    free(tmp);
}

static int is_embed(const char *name)
{
    return strstr(name, "embed_tokens") != NULL;
}

static int tied_apart(const char *name) /* the embedding apart, no head */
{
    return is_embed(name) ? 2 : strcmp(name, "lm_head.weight") != 0;
}

/* a tied model (no lm_head in the checkpoint) whose embedding is in another shard than the layers:
 * the adapter's lm_head and embed_tokens deltas both land on the one embedding, planned globally,
 * whichever worker writes it; the finalized tensors are the single merge's, byte for byte */
Test(shards, tied_head_in_another_shard, .timeout = 120)
{
    char gen[4096], bin[PATH_MAX];
    char *tmp = gen_in_tmp(bin, gen, sizeof gen, "--hidden 64 --inter 128 --layers 2 --vocab 96 --heads 4 --kv-heads 2 "
                                                 "--no-adapter");
    cr_assert_eq(sh_ok("%.*s/gen_adapter --base %s/m/base --out %s/ad --type lora --rank 4 "
                       "--targets q_proj,lm_head,embed_tokens >/dev/null", (int)(strrchr(gen, '/') - gen), gen, tmp, tmp), 0);
    char p[1200], q[1200];
    cr_assert_eq(sh_ok("mkdir %s/sb %s/a %s/b", tmp, tmp, tmp), 0);
    snprintf(p, sizeof p, "%s/m/base/model.safetensors", tmp);
    snprintf(q, sizeof q, "%s/sb", tmp);
    split_base(p, q, tied_apart);
    th_write_text(tmp, "sb/config.json", "{\"model_type\": \"llama\", \"tie_word_embeddings\": true, "
                                         "\"torch_dtype\": \"bfloat16\"}");
    cr_assert_eq(sh_ok("cd %s && %s -q sb ad a/w/", tmp, bin), 0); /* the single merge: one file */
    for (int i = 1; i >= 0; i--)
        cr_assert_eq(sh_ok("cd %s && %s -q --shards %d/2 sb ad b/w/", tmp, bin, i), 0);
    cr_assert_eq(sh_ok("%s -q finalize %s/b/w", bin, tmp), 0);
    snprintf(p, sizeof p, "%s/a/w/model.safetensors", tmp);
    snprintf(q, sizeof q, "%s/b/w", tmp);
    same_tensors(p, q); /* no head added */
    th_st base, s2;
    snprintf(p, sizeof p, "%s/m/base/model.safetensors", tmp);
    cr_assert_eq(th_st_read(p, &base), 0);
    snprintf(p, sizeof p, "%s/b/w/model-00002-of-00002.safetensors", tmp);
    cr_assert_eq(th_st_read(p, &s2), 0);
    const th_tensor *eb = th_st_find(&base, "model.embed_tokens.weight"), *e = th_st_find(&s2, "model.embed_tokens.weight");
    cr_assert(e != NULL && memcmp(eb->data, e->data, e->n_bytes) != 0, "the embedding is not merged (in shard 2)");
    th_st_free(&s2);
    th_st_free(&base);
    th_rmrf(tmp);
    free(tmp);
}

Test(shards, usage_errors)
{
    sh_fix F;
    sh_setup(&F, "");
    static const char *const bad[] = {"3/3", "1/0", "-1/2", "1", "a/b", "1/2x"};
    for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
        char cmd[9000];
        snprintf(cmd, sizeof cmd, "%s --shards %s %s %s %s/", F.bin, bad[k], F.base, F.ad, F.out);
        th_run_result r = sh_run(cmd);
        cr_assert_eq(r.status, 2, "--shards %s: %s", bad[k], r.err);
        cr_assert(strstr(r.err, "--shards"), "%s", r.err);
        th_run_free(&r);
    }
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "%s --shards 0/2 %s %s %s/x.safetensors", F.bin, F.base, F.ad, F.tmp);
    th_run_result u = sh_run(cmd);
    cr_assert_eq(u.status, 2, "%s", u.err);
    cr_assert(strstr(u.err, "needs a directory OUT"), "%s", u.err);
    th_run_free(&u);
    snprintf(cmd, sizeof cmd, "%s --verify %s %s %s/", F.bin, F.base, F.ad, F.out);
    u = sh_run(cmd);
    cr_assert_eq(u.status, 2, "%s", u.err);
    cr_assert(strstr(u.err, "--verify is for shard jobs"), "%s", u.err);
    th_run_free(&u);
    cr_assert(!th_exists(F.out), "a refused worker created OUT");
    th_run_result r = finalize(&F);
    cr_assert_eq(r.status, 2, "%s", r.err);
    th_run_free(&r);
    sh_teardown(&F);
}

/* the README's Slurm and Kubernetes examples, run as written (tests/readme_cluster.sh: fake
 * sbatch and kubectl run the array tasks / completion indexes here, in a shuffled order, four
 * tasks or 16 pods at a time, with the schedulers' variables set): every flag exists, the commands
 * chain, and the merged directory (16 workers over the 10 input shards, then finalize) is the
 * single merge's */
Test(shards, readme_slurm_and_kubernetes_examples_run)
{
    sh_fix F;
    sh_setup(&F, "");
    /* the reference under the examples' names (the model card names the base and adapter), in
     * the base's shards */
    cr_assert_eq(sh_ok("cd %s && mkdir -p n/models n/adapters && ln -s %s n/models/Llama-3.1-405B && ln -s %s "
                       "n/adapters/my-lora && %s -q --max-shard-size 200KB n/models/Llama-3.1-405B n/adapters/my-lora "
                       "ref/merged-405b/", F.tmp, F.base, F.ad, F.bin), 0);
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "sh tests/readme_cluster.sh README.md %s %s/readme %s %s", F.bin, F.tmp, F.base, F.ad);
    th_run_result r = sh_run(cmd);
    cr_assert_eq(r.status, 0, "%s", r.err);
    int n_out = 0;
    for (char *line = strtok(r.out, "\n"); line != NULL; line = strtok(NULL, "\n"), n_out++)
        cr_assert_eq(sh_ok("diff -r %s/ref/merged-405b %s >&2", F.tmp, line), 0, "%s differs from the single merge", line);
    cr_assert_eq(n_out, 2, "%s", r.out);
    th_run_free(&r);
    sh_teardown(&F);
}

/* ---- audit (issue 14): spec parsing, fingerprint coverage ------------------------------------ */

/* --shards I/N: decimal digits only.  strtoul alone took " 1/4", "+1/4", "1/ 4" and "1/+4" as 1/4;
 * a leading zero is still a decimal number (printf %02d). */
Test(shards, spec_digits_only)
{
    sh_fix F;
    sh_setup(&F, "");
    static const char *const bad[] = {" 1/4", "+1/4", "1/ 4", "1/+4", "1/4 ", "4/4", "-1/4", "1/0", "1/4x", "0x1/4",
                                      "1/4/5", "", "/4", "1/", "0/1000001", "0/99999999999999999999",
                                      "99999999999999999999/4", "Index"};
    for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
        char cmd[9000];
        snprintf(cmd, sizeof cmd, "%s --shards '%s' %s %s %s/", F.bin, bad[k], F.base, F.ad, F.out);
        th_run_result r = sh_run(cmd);
        cr_assert_eq(r.status, 2, "--shards '%s': exit %d: %s", bad[k], r.status, r.err);
        cr_assert(strncmp(r.err, "error: --shards needs I/N", 25) == 0 && strchr(r.err, '\n') == r.err + strlen(r.err) - 1,
                  "--shards '%s': %s", bad[k], r.err);
        th_run_free(&r);
        cr_assert(!th_exists(F.out), "--shards '%s': a refused worker created OUT", bad[k]);
    }
    /* 01/4 is worker 1 of 4: the same shards as 1/4 (kept on the second run) */
    cr_assert_eq(sh_ok("cd %s && %s -q --shards 01/4 %s %s %s/", F.tmp, F.bin, F.base, F.ad, F.out), 0);
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "cd %s && %s --shards 1/4 %s %s %s/", F.tmp, F.bin, F.base, F.ad, F.out);
    th_run_result r = sh_run(cmd);
    cr_assert_eq(r.status, 0, "%s", r.err);
    cr_assert(strstr(r.err, " written, ") && strstr(r.err, "(0 written, "), "01/4 and 1/4 are not one worker: %s", r.err);
    th_run_free(&r);
    sh_teardown(&F);
}

/* every option that changes an output byte is in the plan's fingerprint (a worker given it is
 * refused: PlanMismatch, exit 2, nothing written); those that do not (--threads, --kernels,
 * --tile-elems on LoRA, -q, --fsync) are not, and such a worker completes the directory.
 * --simulate-nf4 and --exactness-off were missing: a worker given them wrote shards of other bytes
 * that finalize accepted (checked first: each of them changes the single merge's bytes). */
Test(shards, fingerprint_covers_every_byte_changing_option, .timeout = 120)
{
    sh_fix F;
    sh_setup(&F, "");
    static const char *const changing[] = {"--simulate-nf4", "--exactness-off", "--scale 0.999", "--dtype f32",
                                           "--adapter-scaled ad2 0.5"};
    /* ad2: the adapter with one byte of its weights changed (its last element's low byte) */
    cr_assert_eq(sh_ok("cd %s && cp -r %s ad2 && f=ad2/adapter_model.safetensors && s=$(stat -c %%s $f) && "
                       "printf '\\001' | dd of=$f bs=1 seek=$((s - 4)) conv=notrunc 2>/dev/null", F.tmp, F.ad), 0);
    cr_assert_eq(sh_ok("cd %s && %s -q %s %s one.safetensors", F.tmp, F.bin, F.base, F.ad), 0);
    for (size_t k = 0; k < sizeof changing / sizeof *changing; k++)
        cr_assert_eq(sh_ok("cd %s && %s -q %s %s %s two.safetensors && ! cmp -s one.safetensors two.safetensors", F.tmp,
                           F.bin, changing[k], F.base, F.ad), 0, "%s does not change the merge: the test shows nothing",
                     changing[k]);
    cr_assert_eq(sh_ok("cd %s && %s -q %s ad2 two.safetensors && ! cmp -s one.safetensors two.safetensors", F.tmp, F.bin,
                       F.base), 0);
    cr_assert_eq(worker(&F, 0, 2, ""), 0);
    int owner[10];
    expected_owners(&F, 2, owner);
    for (size_t k = 0; k < sizeof changing / sizeof *changing + 1; k++) {
        const char *opt = k < sizeof changing / sizeof *changing ? changing[k] : NULL;
        char cmd[9000];
        snprintf(cmd, sizeof cmd, "cd %s && %s -q --shards 1/2 %s %s %s %s/", F.tmp, F.bin, opt ? opt : "", F.base,
                 opt ? F.ad : "ad2", F.out);
        th_run_result r = sh_run(cmd);
        cr_assert_eq(r.status, 2, "a worker with %s was accepted: %s", opt ? opt : "another adapter", r.err);
        cr_assert(strstr(r.err, "PlanMismatch") && strchr(r.err, '\n') == r.err + strlen(r.err) - 1, "%s", r.err);
        th_run_free(&r);
        for (int s = 0; s < 10; s++) {
            char p[1000];
            snprintf(p, sizeof p, "%s/model-%05d-of-00010.safetensors", F.out, s + 1);
            cr_assert(owner[s] == 0 || !th_exists(p), "%s: the refused worker wrote shard %d", opt ? opt : "ad2", s + 1);
        }
        cr_assert_eq(th_count_temps(F.out), 0);
        /* finalize with the option is refused too */
        snprintf(cmd, sizeof cmd, "cd %s && %s -q %s --shards index %s %s %s/", F.tmp, F.bin, opt ? opt : "", F.base,
                 opt ? F.ad : "ad2", F.out);
        r = sh_run(cmd);
        cr_assert_neq(r.status, 0, "finalize with %s was accepted", opt ? opt : "another adapter");
        th_run_free(&r);
    }
    cr_assert_eq(worker(&F, 1, 2, "--threads 1 --kernels ref --tile-elems 4096 --fsync"), 0);
    finalize_identical(&F);
    sh_teardown(&F);
}

/* the names, sizes and inodes under dir, sorted: what a refused run must leave as it was (but
 * the lock files in .lora-merge-shards, which workers and finalize create to take them) */
static char *sh_listing(const char *dir)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "cd %s && find . ! -name '*.lock' -printf '%%p %%s %%i\\n' | sort", dir);
    th_run_result r = sh_run(cmd);
    cr_assert_eq(r.status, 0);
    char *s = r.out;
    r.out = NULL;
    th_run_free(&r);
    return s;
}

/* finalize refused: exit `status`, one line holding `needle`, OUT as it was */
static void sh_finalize_refused(const sh_fix *F, int status, const char *needle)
{
    char *before = sh_listing(F->out);
    th_run_result r = finalize(F);
    cr_assert_eq(r.status, status, "%s", r.err);
    cr_assert(strstr(r.err, needle) && strchr(r.err, '\n') == r.err + strlen(r.err) - 1, "%s: %s", needle, r.err);
    th_run_free(&r);
    char *after = sh_listing(F->out);
    cr_assert_str_eq(after, before, "a refused finalize changed the directory");
    free(before);
    free(after);
}

/* OUT/.lora-merge-shards/plan.json damaged (not UTF-8, truncated, 100 MB, a directory, an
 * argument not a string): a worker and finalize each refuse with one line naming plan.json
 * (PlanMismatch, exit 2: finalize said "no shard plan here" as if no worker had run, and an
 * argument not a string was "out of memory"), and change nothing; once it is removed, a worker
 * records it again and the directory is finalized as the single merge */
Test(shards, damaged_plan_file_refused_then_recorded_again, .timeout = 120)
{
    sh_fix F;
    sh_setup(&F, "");
    cr_assert_eq(worker(&F, 0, 2, ""), 0);
    static const char *const damage[] = {"printf '\\377\\376{\"fingerprint\"' >P", "truncate -s 50 P", "truncate -s 100M P",
                                         "rm P && mkdir P", "sed -i 's/\"args\":\\t*\\[/&7, /' P && grep -q '\\[7, ' P"};
    char plan[1000];
    snprintf(plan, sizeof plan, "%s/.lora-merge-shards/plan.json", F.out);
    cr_assert_eq(sh_ok("cp %s %s/plan.good", plan, F.tmp), 0);
    for (size_t d = 0; d < sizeof damage / sizeof *damage; d++) {
        char cmd[9000];
        cr_assert_eq(sh_ok("cd %s/.lora-merge-shards && rm -rf P && cp %s/plan.good P && %s && rm -rf plan.json && "
                           "mv P plan.json", F.out, F.tmp, damage[d]), 0);
        char *before = sh_listing(F.out);
        for (int fin = 0; fin < 2 + (d == 4); fin++) {
            if (fin == 0)
                snprintf(cmd, sizeof cmd, "cd %s && %s -q --shards 1/2 %s %s %s/", F.tmp, F.bin, F.base, F.ad, F.out);
            else
                snprintf(cmd, sizeof cmd, "cd / && %s -q finalize %s", F.bin, F.out);
            th_run_result r = sh_run(cmd);
            if (d == 4 && fin == 0) { /* the fingerprint is intact: the worker may go on */
                cr_assert_eq(r.status, 0, "%s", r.err);
                th_run_free(&r);
                free(before);
                before = sh_listing(F.out);
                continue;
            }
            cr_assert_eq(r.status, 2, "%s, %s: exit %d: %s", damage[d], fin ? "finalize" : "worker", r.status, r.err);
            cr_assert(strstr(r.err, ".lora-merge-shards/plan.json: PlanMismatch: ") && strstr(r.err, "damaged") &&
                          strchr(r.err, '\n') == r.err + strlen(r.err) - 1,
                      "%s, %s: %s", damage[d], fin ? "finalize" : "worker", r.err);
            th_run_free(&r);
            char *after = sh_listing(F.out);
            cr_assert_str_eq(after, before, "%s, %s: the directory changed", damage[d], fin ? "finalize" : "worker");
            free(after);
        }
        free(before);
    }
    cr_assert_eq(sh_ok("rm -rf %s", plan), 0);
    cr_assert_eq(worker(&F, 1, 2, ""), 0);
    finalize_identical(&F);
    sh_teardown(&F);
}

/* a plan of 1983 shards (one tensor each): plan.json is 72 KB, and was read through a 64 KB
 * buffer, so the second worker found it "unreadable" (PlanMismatch) and finalize "no shard plan" */
Test(shards, plan_larger_than_64k, .timeout = 120)
{
    char gen[4096], bin[PATH_MAX];
    char *tmp = gen_in_tmp(bin, gen, sizeof gen, "--hidden 16 --inter 32 --layers 220 --vocab 32 --heads 2 --kv-heads 1 "
                                                 "--rank 2");
    cr_assert_eq(sh_ok("cd %s && mkdir ref w && %s -q --max-shard-size 1 m/base m/adapter ref/out/", tmp, bin), 0);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(sh_ok("cd %s && %s -q --max-shard-size 1 --shards %d/2 m/base m/adapter w/out/", tmp, bin, i), 0);
    char p[1200];
    snprintf(p, sizeof p, "%s/w/out/.lora-merge-shards/plan.json", tmp);
    struct stat st;
    cr_assert(stat(p, &st) == 0 && st.st_size > 65536, "plan.json is not larger than 64 KB: the test shows nothing");
    cr_assert_eq(sh_ok("%s -q finalize %s/w/out", bin, tmp), 0);
    cr_assert_eq(sh_ok("cd %s && ls ref/out | wc -l | grep -qx 1986 && diff -r ref/out w/out >&2", tmp), 0);
    th_rmrf(tmp);
    free(tmp);
}

/* a worker given another base with the same headers (the same files but the last mantissa bit of
 * every 16-bit element flipped, as another revision of a checkpoint would differ: names, shapes,
 * dtypes, offsets and index the same) was accepted, and finalize took the mixed directory; the
 * fingerprint now samples the base's values.  The same base through another path (another mount
 * point on another machine) is still the same plan. */
Test(shards, fingerprint_samples_the_base_values, .timeout = 120)
{
    sh_fix F;
    sh_setup(&F, "");
    cr_assert_eq(sh_ok("cd %s && cp -r %s sbase2 && ln -s %s mnt", F.tmp, F.base, F.base), 0);
    for (int k = 1; k <= 10; k++) {
        char p[1000];
        snprintf(p, sizeof p, "%s/sbase2/model-%05d-of-00010.safetensors", F.tmp, k);
        size_t n = 0;
        uint8_t *b = th_read_file(p, &n);
        uint64_t hl;
        cr_assert(b != NULL && n > 8);
        memcpy(&hl, b, 8);
        for (size_t i = 8 + hl; i < n; i += 2)
            b[i] ^= 1;
        cr_assert_eq(th_write_file(p, b, n), 0);
        free(b);
    }
    cr_assert_eq(worker(&F, 0, 2, ""), 0);
    char *before = sh_listing(F.out), cmd[9000];
    snprintf(cmd, sizeof cmd, "cd %s && %s -q --shards 1/2 sbase2 %s %s/", F.tmp, F.bin, F.ad, F.out);
    th_run_result r = sh_run(cmd);
    cr_assert_eq(r.status, 2, "a worker given another base was accepted: %s", r.err);
    cr_assert(strstr(r.err, "PlanMismatch"), "%s", r.err);
    th_run_free(&r);
    char *after = sh_listing(F.out);
    cr_assert_str_eq(after, before, "the refused worker changed the directory");
    free(after);
    free(before);
    snprintf(cmd, sizeof cmd, "cd %s && %s -q --shards index sbase2 %s %s/", F.tmp, F.bin, F.ad, F.out);
    r = sh_run(cmd);
    cr_assert_eq(r.status, 2, "finalize given another base: %s", r.err);
    th_run_free(&r);
    cr_assert_eq(sh_ok("cd %s && %s -q --shards 1/2 mnt %s %s/", F.tmp, F.bin, F.ad, F.out), 0);
    r = finalize(&F);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    cr_assert_eq(sh_ok("diff -r %s %s >&2", F.ref, F.out), 0);
    sh_teardown(&F);
}

/* a shard replaced by a symbolic link to its own bytes elsewhere: finalize accepted it (stat
 * followed the link, the bytes hashed right), leaving a model that depends on a file outside OUT.
 * Refused now, naming it (nothing written); its worker rewrites it as a file.  A directory in a
 * shard's place: "not a regular file". */
Test(shards, shard_replaced_by_a_symlink_refused)
{
    sh_fix F;
    sh_setup(&F, "");
    for (int i = 0; i < 2; i++)
        cr_assert_eq(worker(&F, i, 2, ""), 0);
    cr_assert_eq(sh_ok("cd %s && mv model-00003-of-00010.safetensors ../s3 && ln -s %s/w/s3 model-00003-of-00010.safetensors"
                       " && rm model-00008-of-00010.safetensors && mkdir model-00008-of-00010.safetensors", F.out, F.tmp), 0);
    sh_finalize_refused(&F, 1, "2 of 10 shards not complete and verified: model-00003-of-00010.safetensors (a symbolic "
                               "link, not the file its worker wrote), model-00008-of-00010.safetensors (not a regular file)");
    cr_assert_eq(sh_ok("rmdir %s/model-00008-of-00010.safetensors", F.out), 0);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(worker(&F, i, 2, ""), 0);
    th_run_result r = finalize(&F);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    struct stat st;
    char p[1000];
    snprintf(p, sizeof p, "%s/model-00003-of-00010.safetensors", F.out);
    cr_assert(lstat(p, &st) == 0 && S_ISREG(st.st_mode), "shard 3 is still a link");
    cr_assert_eq(sh_ok("diff -r %s %s >&2", F.ref, F.out), 0);
    sh_teardown(&F);
}

/* two finalize steps at once (a retried dependent job), four times: the directory is the single
 * merge's, nothing of the records left; one exits 0, the other 0 too or 2 saying the directory
 * was finalized (it said all 10 shards lacked a sidecar: "rerun their workers") */
Test(shards, two_finalize_at_once, .timeout = 120)
{
    sh_fix F;
    sh_setup(&F, "");
    for (int round = 0; round < 4; round++) {
        cr_assert_eq(sh_ok("rm -rf %s", F.out), 0);
        for (int i = 0; i < 2; i++)
            cr_assert_eq(worker(&F, i, 2, ""), 0);
        char cmd[16000];
        snprintf(cmd, sizeof cmd, "cd / && (%s -q finalize %s 2>%s/e1; echo $? >%s/s1) & (%s -q finalize %s 2>%s/e2; "
                 "echo $? >%s/s2) & wait; cat %s/s1 %s/s2 %s/e1 %s/e2", F.bin, F.out, F.tmp, F.tmp, F.bin, F.out, F.tmp,
                 F.tmp, F.tmp, F.tmp, F.tmp, F.tmp);
        th_run_result r = sh_run(cmd);
        int s1 = -1, s2 = -1, n = 0;
        cr_assert_eq(sscanf(r.out, "%d\n%d\n%n", &s1, &s2, &n), 2, "%s", r.out);
        const char *errs = r.out + n;
        cr_assert((s1 == 0 && (s2 == 0 || s2 == 2)) || (s2 == 0 && s1 == 2), "round %d: exits %d %d: %s", round, s1, s2,
                  errs);
        if (s1 + s2 == 2)
            cr_assert(strstr(errs, "finalized already") || strstr(errs, "no shard plan here"), "round %d: %s", round, errs);
        th_run_free(&r);
        cr_assert_eq(sh_ok("diff -r %s %s >&2", F.ref, F.out), 0, "round %d", round);
    }
    sh_teardown(&F);
}

/* the workers rerun with another N (4 then 3, as a resubmitted array of another size): the plan is
 * the same (N is not in it), the second set keeps every shard the first completed and writes the
 * rest; then a worker run after finalize (a late retry) rewrites its shards with the same bytes:
 * the model stays the single merge's at every point, and once every worker and finalize rerun,
 * nothing of the records is left */
Test(shards, rerun_with_another_n_and_a_worker_after_finalize, .timeout = 120)
{
    sh_fix F;
    sh_setup(&F, "");
    cr_assert_eq(worker(&F, 3, 4, ""), 0);
    cr_assert_eq(worker(&F, 1, 4, ""), 0);
    int total_written = 0;
    for (int i = 0; i < 3; i++) {
        char cmd[9000];
        snprintf(cmd, sizeof cmd, "cd %s && %s --shards %d/3 %s %s %s/", F.tmp, F.bin, i, F.base, F.ad, F.out);
        th_run_result r = sh_run(cmd);
        cr_assert_eq(r.status, 0, "%s", r.err);
        int mine, n, written, kept;
        const char *q = strstr(r.err, "shard worker ");
        cr_assert(q && sscanf(q, "shard worker %*u of 3: %d of the %d shards (%d written, %d kept)", &mine, &n, &written,
                              &kept) == 4, "%s", r.err);
        total_written += written;
        th_run_free(&r);
    }
    int owner4[10], n_first = 0;
    expected_owners(&F, 4, owner4);
    for (int k = 0; k < 10; k++)
        n_first += owner4[k] == 1 || owner4[k] == 3;
    cr_assert_eq(total_written, 10 - n_first, "the second set rewrote shards the first completed");
    finalize_identical(&F);
    /* a late worker: every shard of the model the single merge's still (its records aside) */
    cr_assert_eq(worker(&F, 0, 3, ""), 0);
    cr_assert_eq(sh_ok("diff -r -x .lora-merge-shards %s %s >&2", F.ref, F.out), 0);
    for (int i = 1; i < 3; i++)
        cr_assert_eq(worker(&F, i, 3, ""), 0);
    th_run_result r = finalize(&F);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    cr_assert_eq(sh_ok("diff -r %s %s >&2", F.ref, F.out), 0);
    sh_teardown(&F);
}

/* OUT as worker 1 of 2 leaves it (the plan records OUT's path: a copy would not do), then worker
 * 0 run with LM_FAULT=fault and SIGKILLed at the stall when kill_it; @return its exit status
 * (128 + 9 when killed), *held whether the k-th call was reached (LM_FAULT_LOG), *err its stderr */
static int sh_faulted_worker(const sh_fix *F, const char *fault, int kill_it, int *held, char **err)
{
    cr_assert_eq(sh_ok("rm -rf %s", F->out), 0);
    cr_assert_eq(worker(F, 1, 2, ""), 0);
    char fenv[100], out[800], log[800], lenv[900];
    snprintf(fenv, sizeof fenv, "LM_FAULT=%s", fault);
    snprintf(out, sizeof out, "%s/", F->out);
    snprintf(log, sizeof log, "%s/fault.log", F->tmp);
    snprintf(lenv, sizeof lenv, "LM_FAULT_LOG=%s", log);
    unlink(log);
    const char *argv[] = {F->bin, "-q", "--threads", "1", "--shards", "0/2", F->base, F->ad, out, NULL};
    const char *env[] = {fenv, lenv, NULL};
    th_held_result r = th_run_held(argv, env, "stalled in ", kill_it, NULL, NULL);
    *held = th_exists(log); /* the k-th call was reached */
    *err = r.err;
    return r.status;
}

/* worker 0 (~370 system calls and allocations) killed with SIGKILL at its k-th, for every 31st k
 * (the LM_FAULT stall seam: deterministic points, with one thread), and failing with EIO at every
 * 61st and ENOSPC at every 73rd (the steps prime to each other: other points of every phase, the
 * plan, the shards' writes, renames and sidecars; ~25 runs, ~5 CPU-s; a third of them under ASan):
 * each time one error line (exit 3 or 4) or success, then its rerun completes the
 * directory, finalize accepts it, and it is the single merge's byte for byte with nothing left
 * (diff -r: no temporary file, lock or record) */
Test(shards, worker_killed_or_failing_at_every_call_then_rerun_identical, .timeout = 900)
{
    sh_fix F;
    sh_setup(&F, "");
    static const struct {
        const char *kind;
        int step, kill;
    } sweeps[] = {{"stall", 31, 1}, {"EIO", 61, 0}, {"ENOSPC", 73, 0}};
    const int asan = getenv("LM_ASAN") != NULL; /* ~7x the CPU there (each start maps the shadow) */
    for (size_t s = 0; s < sizeof sweeps / sizeof *sweeps; s++) {
        int n_hit = 0;
        for (int k = 1;; k += sweeps[s].step * (asan ? 3 : 1)) {
            char fault[64];
            snprintf(fault, sizeof fault, "%d:%s", k, sweeps[s].kind);
            int held = 0;
            char *err = NULL;
            int st = sh_faulted_worker(&F, fault, sweeps[s].kill, &held, &err);
            if (sweeps[s].kill) {
                if (!held) { /* past the worker's last call: it completed */
                    cr_assert_eq(st, 0, "%s: %s", fault, err);
                    free(err);
                    break;
                }
                cr_assert_eq(st, 128 + 9, "%s: not killed: %s", fault, err);
            } else {
                cr_assert(st == 0 || ((st == 3 || st == 4) && strncmp(err, "error: ", 7) == 0 &&
                                      strchr(err, '\n') == err + strlen(err) - 1),
                          "%s: exit %d: %s", fault, st, err);
                cr_assert_eq(th_count_temps(F.out), 0, "%s: a failed worker left a temporary file", fault);
                if (!held) { /* past the worker's last call: the sweep is over */
                    cr_assert_eq(st, 0, "%s: %s", fault, err);
                    free(err);
                    break;
                }
            }
            free(err);
            n_hit++;
            cr_assert_eq(sh_ok("cd %s && %s -q --shards 0/2 %s %s %s/", F.tmp, F.bin, F.base, F.ad, F.out), 0, "%s: rerun",
                         fault);
            th_run_result r = finalize(&F);
            cr_assert_eq(r.status, 0, "%s: finalize: %s", fault, r.err);
            th_run_free(&r);
            cr_assert_eq(sh_ok("diff -r %s %s >&2", F.ref, F.out), 0, "%s: not the single merge", fault);
            cr_assert(k < 20000, "the sweep does not end");
        }
        cr_assert_geq(n_hit, asan ? 2 : 5, "%s: %d faults only", sweeps[s].kind, n_hit);
        cr_log_info("worker 0: %d runs with %s", n_hit, sweeps[s].kind);
    }
    sh_teardown(&F);
}

static int half_split(const char *name) /* the layers in shard 1, everything else in shard 2 */
{
    return strstr(name, "layers.") != NULL ? 1 : 2;
}

/* a sharded base whose shards have names of their own (not model-0000k-of-0000n): output shard k
 * is input shard k, the same name and exactly its tensors (a tensor the adapter adds: the last),
 * whichever worker writes it; the tensors are the single merge's */
Test(shards, output_shard_k_is_input_shard_k_by_name_and_tensors, .timeout = 120)
{
    char gen[4096], bin[PATH_MAX];
    char *tmp = gen_in_tmp(bin, gen, sizeof gen, "--hidden 64 --inter 128 --layers 2 --vocab 96 --heads 4 --kv-heads 2 "
                                                 "--rank 4");
    char p[1200], q[1200];
    cr_assert_eq(sh_ok("mkdir %s/sb && cp %s/m/base/config.json %s/sb/", tmp, tmp, tmp), 0);
    snprintf(p, sizeof p, "%s/m/base/model.safetensors", tmp);
    snprintf(q, sizeof q, "%s/sb", tmp);
    split_base(p, q, half_split);
    cr_assert_eq(sh_ok("cd %s/sb && mv model-00001-of-00002.safetensors layers.safetensors && "
                       "mv model-00002-of-00002.safetensors rest.safetensors && "
                       "sed -i 's/model-00001-of-00002/layers/g; s/model-00002-of-00002/rest/g' model.safetensors.index.json",
                       tmp), 0);
    for (int i = 1; i >= 0; i--)
        cr_assert_eq(sh_ok("cd %s && %s -q --shards %d/2 sb m/adapter w/", tmp, bin, i), 0);
    cr_assert_eq(sh_ok("%s -q finalize %s/w", bin, tmp), 0);
    cr_assert_eq(sh_ok("cd %s && %s -q m/base m/adapter one.safetensors", tmp, bin), 0);
    static const char *const names[] = {"layers.safetensors", "rest.safetensors"};
    size_t n_total = 0;
    th_st one;
    for (int k = 0; k < 2; k++) {
        th_st in, out;
        snprintf(p, sizeof p, "%s/sb/%s", tmp, names[k]);
        snprintf(q, sizeof q, "%s/w/%s", tmp, names[k]);
        cr_assert_eq(th_st_read(p, &in), 0);
        cr_assert_eq(th_st_read(q, &out), 0, "no output shard %s", names[k]);
        cr_assert_eq(out.n, in.n, "%s: %zu tensors, its input shard %zu", names[k], out.n, in.n);
        snprintf(p, sizeof p, "%s/one.safetensors", tmp);
        cr_assert_eq(th_st_read(p, &one), 0);
        for (size_t i = 0; i < in.n; i++) {
            const th_tensor *x = th_st_find(&out, in.t[i].name), *y = th_st_find(&one, in.t[i].name);
            cr_assert_not_null(x, "%s: %s is not in its output shard", names[k], in.t[i].name);
            cr_assert(y != NULL && x->n_bytes == y->n_bytes && memcmp(x->data, y->data, x->n_bytes) == 0,
                      "%s differs from the single merge's", x->name);
        }
        n_total += out.n;
        th_st_free(&in);
        th_st_free(&out);
        th_st_free(&one);
    }
    snprintf(p, sizeof p, "%s/one.safetensors", tmp);
    cr_assert_eq(th_st_read(p, &one), 0);
    cr_assert_eq(n_total, one.n, "the shards hold %zu tensors, the single merge %zu", n_total, one.n);
    th_st_free(&one);
    cr_assert_eq(sh_ok("cd %s/w && grep -q '\"layers.safetensors\"' model.safetensors.index.json && "
                       "grep -q '\"rest.safetensors\"' model.safetensors.index.json", tmp), 0);
    th_rmrf(tmp);
    free(tmp);
}

/* OUT a file (with and without the slash): one line, exit 2, the file untouched, nothing beside
 * it.  A worker of a million (index past the shards): writes none, says so.  Stray files in OUT
 * at finalize: weights lora-merge would not write (other.safetensors) refused (OutputNotEmpty,
 * nothing written); a shard name outside the plan (model-00011-of-00010) removed as an earlier
 * merge's; another file (notes.txt) kept */
Test(shards, out_not_a_directory_huge_n_and_stray_files)
{
    sh_fix F;
    sh_setup(&F, "");
    cr_assert_eq(sh_ok("echo hi >%s/wf", F.tmp), 0);
    for (int slash = 0; slash < 2; slash++) {
        char cmd[9000];
        snprintf(cmd, sizeof cmd, "cd %s && %s -q --shards 0/2 %s %s wf%s", F.tmp, F.bin, F.base, F.ad, slash ? "/" : "");
        th_run_result r = sh_run(cmd);
        cr_assert_eq(r.status, 2, "%s", r.err);
        cr_assert(strncmp(r.err, "error: ", 7) == 0 && strchr(r.err, '\n') == r.err + strlen(r.err) - 1 &&
                      strstr(r.err, slash ? "Not a directory" : "--shards needs a directory OUT (e.g. 'merged/'), not "
                                                                "the file 'wf'"), "%s", r.err);
        th_run_free(&r);
        cr_assert_eq(sh_ok("cd %s && test \"$(cat wf)\" = hi && test $(ls -A | grep -c wf) = 1", F.tmp), 0);
    }
    cr_assert_eq(sh_ok("cd %s && %s --shards 999999/1000000 %s %s %s/ 2>err && grep -q 'shard worker 999999 of 1000000: "
                       "0 of the 10 shards (0 written, 0 kept)' err && test $(ls %s | grep -c safetensors) = 0", F.tmp,
                       F.bin, F.base, F.ad, F.out, F.out), 0);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(worker(&F, i, 2, ""), 0);
    cr_assert_eq(sh_ok("cd %s && echo notes >notes.txt && cp model-00001-of-00010.safetensors other.safetensors && "
                       "cp model-00001-of-00010.safetensors model-00011-of-00010.safetensors", F.out), 0);
    sh_finalize_refused(&F, 2, "OutputNotEmpty: the output directory holds 'other.safetensors'");
    cr_assert_eq(sh_ok("rm %s/other.safetensors", F.out), 0);
    th_run_result r = finalize(&F);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    cr_assert_eq(sh_ok("cd %s && test \"$(cat notes.txt)\" = notes && rm notes.txt && diff -r %s %s >&2", F.out, F.ref,
                       F.out), 0);
    sh_teardown(&F);
}

/* "workers read only their own input shards plus the adapter": worker 0 of 2 traced (strace -ff -y:
 * a file per thread, so no call is split over two lines; one worker thread): from an input shard whose output it does not write, nothing but the fingerprint's
 * 32-byte samples (the headers are mapped); from each of its own, tiles (preads) or copies
 * (copy_file_range), which shows the trace sees the reads.  Skipped without strace. */
Test(shards, a_worker_reads_only_its_own_input_shards)
{
    if (system("strace -V >/dev/null 2>&1") != 0)
        cr_skip_test("needs strace");
    sh_fix F;
    sh_setup(&F, "");
    cr_assert_eq(sh_ok("cd %s && ASAN_OPTIONS=detect_leaks=0 strace -ff -y -e trace=pread64,preadv,read,copy_file_range,sendfile,splice -o st "
                       "%s -q --threads 1 --shards 0/2 %s %s %s/ && cat st.* >st.log", F.tmp, F.bin, F.base, F.ad, F.out), 0);
    /* per input shard: other = 1 when worker 0 does not write its output; every call on it listed */
    cr_assert_eq(sh_ok("cd %s && n_other=0 n_own=0; for f in %s/model-*.safetensors; do n=${f##*/}; "
                       "grep -F \"$f>\" st.log >calls || true; "
                       "if [ -e %s/$n ]; then grep -Eq '(copy_file_range|pread64)\\(' calls && n_own=$((n_own + 1)); "
                       "else bad=$(grep -Ev '^pread64\\(.*, 32, [0-9]+\\) = 32$' calls || true); "
                       "[ -z \"$bad\" ] || { echo \"$n (not this worker's): $bad\" >&2; exit 1; }; "
                       "n_other=$((n_other + 1)); fi; done; n_out=$(ls %s | grep -c '^model-'); "
                       "[ $n_own = $n_out ] && [ $n_other -gt 0 ] || { echo \"own $n_own of $n_out, other $n_other\" >&2; "
                       "exit 1; }", F.tmp, F.base, F.out, F.out), 0);
    sh_teardown(&F);
}
