/* SPDX-License-Identifier: MIT */
/* test_outdir.c : a directory OUT gives a model directory: one model.safetensors, or shards of
 * at most --max-shard-size with model.safetensors.index.json, plus the base directory's other
 * files; every tensor byte-identical to the single-file merge.  Nothing is left behind when the
 * merge is refused. */
#include "th.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void od_gen(const char *dir)
{
    char gen[4096];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    const char *argv[] = {gen, "--out", dir, "--hidden", "128", "--inter", "344", "--layers", "4", "--vocab", "512",
                          "--heads", "4", "--kv-heads", "2", "--rank", "4", NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "gen_model: %s", r.err);
    th_run_free(&r);
}

static void od_run_ok(const char *const *argv)
{
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
}

Test(outdir, shards_index_and_model_files)
{
    char *tmp = th_tmpdir(), m[600], base_dir[700], ad[700], single[700], outd[700], p[1400];
    snprintf(m, sizeof m, "%s/m", tmp);
    od_gen(m);
    snprintf(base_dir, sizeof base_dir, "%s/base", m);
    snprintf(ad, sizeof ad, "%s/adapter", m);
    snprintf(single, sizeof single, "%s/single.safetensors", tmp);
    snprintf(outd, sizeof outd, "%s/out/", tmp);
    snprintf(p, sizeof p, "%s/tokenizer.json", base_dir);
    cr_assert_eq(th_write_file(p, "{\"version\": \"1.0\"}", 18), 0);
    const char *a1[] = {th_bin(), "-q", base_dir, ad, single, NULL};
    od_run_ok(a1);
    const char *a2[] = {th_bin(), "-q", "--max-shard-size", "200KB", base_dir, ad, outd, NULL};
    od_run_ok(a2);
    /* the index names every tensor once, in shards that exist and hold it */
    snprintf(p, sizeof p, "%s/out/model.safetensors.index.json", tmp);
    size_t n;
    char *js = (char *)th_read_file(p, &n);
    cr_assert_not_null(js, "no index");
    cJSON *idx = cJSON_ParseWithLength(js, n);
    free(js);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
    th_st one;
    cr_assert_eq(th_st_read(single, &one), 0);
    cr_assert_eq((size_t)cJSON_GetArraySize(map), one.n);
    double total = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(idx, "metadata"), "total_size")->valuedouble;
    uint64_t sum = 0;
    for (size_t i = 0; i < one.n; i++) {
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(map, one.t[i].name);
        cr_assert(cJSON_IsString(f), "index lacks %s", one.t[i].name);
        snprintf(p, sizeof p, "%s/out/%s", tmp, f->valuestring);
        th_st sh;
        cr_assert_eq(th_st_read(p, &sh), 0, "shard %s unreadable", p);
        cr_assert_leq(sh.n_buf, 200000 + 4096, "shard %s is %zu bytes", p, sh.n_buf);
        const th_tensor *t = th_st_find(&sh, one.t[i].name);
        cr_assert_not_null(t, "%s not in %s", one.t[i].name, f->valuestring);
        cr_assert_eq(t->n_bytes, one.t[i].n_bytes);
        cr_assert(memcmp(t->data, one.t[i].data, t->n_bytes) == 0, "%s differs from the single-file merge", t->name);
        sum += t->n_bytes;
        th_st_free(&sh);
    }
    cr_assert_eq((uint64_t)total, sum);
    /* the base's other files came along; the base's weights did not */
    snprintf(p, sizeof p, "%s/out/config.json", tmp);
    cr_assert(th_exists(p));
    snprintf(p, sizeof p, "%s/out/tokenizer.json", tmp);
    cr_assert(th_exists(p));
    snprintf(p, sizeof p, "%s/out/model.safetensors", tmp);
    cr_assert(!th_exists(p), "a sharded output must not hold model.safetensors");
    cJSON_Delete(idx);
    th_st_free(&one);
    /* the same directory again without sharding: model.safetensors, and the stale index removed */
    const char *a3[] = {th_bin(), "-q", base_dir, ad, outd, NULL};
    od_run_ok(a3);
    snprintf(p, sizeof p, "%s/out/model.safetensors", tmp);
    cr_assert(th_files_equal(p, single), "directory model.safetensors differs from the file merge");
    snprintf(p, sizeof p, "%s/out/model.safetensors.index.json", tmp);
    cr_assert(!th_exists(p), "stale index left");
    th_rmrf(tmp);
    free(tmp);
}

Test(outdir, refusals_leave_nothing)
{
    char *tmp = th_tmpdir(), m[600], base_dir[700], ad[700], p[1400], newd[700];
    snprintf(m, sizeof m, "%s/m", tmp);
    od_gen(m);
    snprintf(base_dir, sizeof base_dir, "%s/base", m);
    snprintf(ad, sizeof ad, "%s/adapter", m);
    /* --max-shard-size with a file OUT */
    snprintf(p, sizeof p, "%s/x.safetensors", tmp);
    const char *a1[] = {th_bin(), "--max-shard-size", "1MB", base_dir, ad, p, NULL};
    th_run_result r = th_run(NULL, a1);
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "directory"), "%s", r.err);
    th_run_free(&r);
    /* the base's own directory as OUT */
    const char *a2[] = {th_bin(), base_dir, ad, base_dir, NULL};
    r = th_run(NULL, a2);
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    /* a refused merge into a new directory does not leave the directory */
    snprintf(p, sizeof p, "%s/adapter_config.json", ad);
    cr_assert_eq(th_write_file(p, "{\"peft_type\": \"LORA\", \"r\": 3}", 30), 0); /* rank mismatch */
    snprintf(newd, sizeof newd, "%s/new/", tmp);
    const char *a3[] = {th_bin(), base_dir, ad, newd, NULL};
    r = th_run(NULL, a3);
    cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    cr_assert(!th_exists(newd), "the refused merge left %s", newd);
    th_rmrf(tmp);
    free(tmp);
}
