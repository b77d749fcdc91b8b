/* SPDX-License-Identifier: MIT */
/* test_gen_adapter.c : bench/gen_adapter, the benchmark's adapter generator.
 * - Against PEFT itself: on the base of each PEFT golden case (../shared, skipped visibly when
 *   absent), the adapter generated with that case's configuration has exactly the tensor names,
 *   shapes and dtypes of the adapter PEFT saved, the same peft_type and target modules, and only
 *   adapter_config.json keys PEFT's config has too.
 * - On a generated base (no ../shared): every type's default adapter is accepted by --dry-run and
 *   by the merge, which changes exactly the targeted tensors, most of their elements for the dense
 *   types; BEFT on a base without biases is refused with a message. */
#include "th.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void ga_path(char *buf, size_t cap)
{
    char gen[4096];
    int ok = th_gen_model_path(gen, sizeof gen);
    size_t n = strlen(gen) - strlen("gen_model");
    snprintf(buf, cap, "%.*sgen_adapter", (int)n, gen);
    if (!ok || !th_exists(buf))
        cr_skip_test("needs %s and bench/gen_model beside it", buf);
}

/* runs gen_adapter with the options in opts (space-separated); returns its result */
static th_run_result ga_run(const char *base, const char *out, const char *type, const char *opts)
{
    char ga[4096], buf[512];
    ga_path(ga, sizeof ga);
    const char *argv[32] = {ga, "--base", base, "--out", out, "--type", type};
    int n = 7;
    snprintf(buf, sizeof buf, "%s", opts);
    for (char *tok = strtok(buf, " "); tok && n < 31; tok = strtok(NULL, " "))
        argv[n++] = tok;
    argv[n] = NULL;
    return th_run(NULL, argv);
}

static cJSON *ga_json(const char *path)
{
    size_t n;
    char *s = (char *)th_read_file(path, &n);
    cr_assert_not_null(s, "cannot read %s", path);
    cJSON *j = cJSON_ParseWithLength(s, n);
    free(s);
    cr_assert_not_null(j, "%s is not JSON", path);
    return j;
}

/* the set of strings of a JSON array (order ignored) */
static int ga_same_set(const cJSON *a, const cJSON *b)
{
    if (cJSON_GetArraySize(a) != cJSON_GetArraySize(b))
        return 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, a) {
        const cJSON *y;
        int found = 0;
        cJSON_ArrayForEach(y, b) found |= cJSON_IsString(x) && cJSON_IsString(y) && !strcmp(x->valuestring, y->valuestring);
        if (!found)
            return 0;
    }
    return 1;
}

typedef struct {
    const char *golden, *type, *opts;
} ga_peft_case;

/* each golden case's configuration, as gen_adapter options */
static const ga_peft_case PEFT_CASES[] = {
    {"lora_dora", "dora", "--rank 4 --alpha 8 --targets all"},
    {"adalora", "adalora", "--rank 6 --alpha 8 --targets qv"},
    {"ia3", "ia3", "--targets k_proj,v_proj,down_proj"},
    {"loha", "loha", "--rank 4 --alpha 8 --targets q_proj,v_proj,down_proj"},
    {"lokr", "lokr", "--rank 4 --alpha 8 --targets q_proj,v_proj,gate_proj"},
    {"oft", "oft", "--block 8 --targets qv"},
    {"boft", "boft", "--block 4 --targets qv"},
    {"hra", "hra", "--rank 4 --targets qv"},
    {"miss", "miss", "--rank 4 --targets qv"},
    {"fourierft", "fourierft", "--n-frequency 60 --targets qv"},
    {"vera", "vera", "--rank 16 --targets qv"},
    {"road", "road", "--block 4 --targets qv"},
    {"randlora", "randlora", "--rank 4 --alpha 8 --targets qv"},
    {"vblora", "vblora", "--rank 4 --block 4 --num-vectors 16 --targets qv"},
    {"delora", "delora", "--rank 4 --targets qv"},
    {"gralora", "gralora", "--rank 8 --alpha 16 --targets qv"},
    {"shira", "shira", "--rank 4 --targets qv"},
    {"c3a", "c3a", "--block 4 --targets qv"},
    {"hira", "hira", "--rank 4 --targets qv"},
    {"beft", "beft", "--targets q_proj,k_proj,v_proj"},
    {"ln_tuning", "ln_tuning", ""},
    {"trainable_tokens", "trainable_tokens", "--tokens 4"},
};

Test(gen_adapter, names_shapes_and_keys_as_peft_saves_them)
{
    if (!th_have_shared())
        cr_skip_test("needs " TH_SHARED "/peft-golden");
    char *tmp = th_tmpdir();
    for (size_t c = 0; c < sizeof PEFT_CASES / sizeof *PEFT_CASES; c++) {
        const ga_peft_case *pc = &PEFT_CASES[c];
        char base[600], gdir[600], out[700], p1[800], p2[800];
        snprintf(base, sizeof base, TH_SHARED "/peft-golden/%s/base", pc->golden);
        snprintf(gdir, sizeof gdir, TH_SHARED "/peft-golden/%s/adapter", pc->golden);
        snprintf(out, sizeof out, "%s/%s", tmp, pc->golden);
        th_run_result r = ga_run(base, out, pc->type, pc->opts);
        cr_assert_eq(r.status, 0, "%s: gen_adapter failed: %s", pc->golden, r.err);
        th_run_free(&r);
        /* the tensors: the same names, shapes and dtypes */
        th_st mine, peft;
        snprintf(p1, sizeof p1, "%s/adapter_model.safetensors", out);
        snprintf(p2, sizeof p2, "%s/adapter_model.safetensors", gdir);
        cr_assert_eq(th_st_read(p1, &mine), 0);
        cr_assert_eq(th_st_read(p2, &peft), 0);
        cr_assert_eq(mine.n, peft.n, "%s: %zu tensors, PEFT saved %zu", pc->golden, mine.n, peft.n);
        for (size_t i = 0; i < peft.n; i++) {
            const th_tensor *g = &peft.t[i], *m = th_st_find(&mine, g->name);
            cr_assert_not_null(m, "%s: no %s", pc->golden, g->name);
            cr_assert_str_eq(m->dtype, g->dtype, "%s: %s", pc->golden, g->name);
            cr_assert_eq(m->n_dims, g->n_dims, "%s: %s", pc->golden, g->name);
            for (int d = 0; d < g->n_dims; d++)
                cr_assert_eq(m->shape[d], g->shape[d], "%s: %s dim %d is %llu, PEFT's %llu", pc->golden, g->name, d,
                             (unsigned long long)m->shape[d], (unsigned long long)g->shape[d]);
        }
        th_st_free(&mine);
        th_st_free(&peft);
        /* the config: same type and targets; every key one PEFT writes too */
        snprintf(p1, sizeof p1, "%s/adapter_config.json", out);
        snprintf(p2, sizeof p2, "%s/adapter_config.json", gdir);
        cJSON *jm = ga_json(p1), *jg = ga_json(p2);
        cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(jm, "peft_type")->valuestring,
                         cJSON_GetObjectItemCaseSensitive(jg, "peft_type")->valuestring, "%s", pc->golden);
        cr_assert(ga_same_set(cJSON_GetObjectItemCaseSensitive(jm, "target_modules"),
                              cJSON_GetObjectItemCaseSensitive(jg, "target_modules")),
                  "%s: target_modules differ", pc->golden);
        const cJSON *key;
        cJSON_ArrayForEach(key, jm) cr_assert(cJSON_HasObjectItem(jg, key->string), "%s: PEFT has no key '%s'",
                                              pc->golden, key->string);
        cJSON_Delete(jm);
        cJSON_Delete(jg);
    }
    th_rmrf(tmp);
    free(tmp);
}

typedef struct {
    const char *type;
    size_t changed;    /* tensors the merge changes (one layer) */
    int sparse;        /* changes a few elements only */
} ga_merge_case;

static const ga_merge_case MERGE_CASES[] = {
    {"lora", 7, 0},      {"dora", 7, 0},     {"ia3", 7, 0},      {"loha", 7, 0},      {"lokr", 7, 0},
    {"oft", 7, 0},       {"boft", 7, 0},     {"hra", 7, 0},      {"miss", 7, 0},      {"fourierft", 2, 0},
    {"vera", 7, 0},      {"road", 7, 0},     {"adalora", 7, 0},  {"randlora", 1, 0},  {"vblora", 7, 0},
    {"delora", 7, 0},    {"gralora", 7, 0},  {"shira", 7, 1},    {"c3a", 7, 0},       {"hira", 7, 0},
    {"ln_tuning", 3, 0}, {"trainable_tokens", 1, 1},
};

Test(gen_adapter, every_type_merges_and_changes_its_targets)
{
    char gen[4096], ga[4096];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    ga_path(ga, sizeof ga);
    char *tmp = th_tmpdir(), base[700], bfile[800], ad[800], out[800];
    /* one layer; every dimension a multiple of the block sizes (OFT 32, C3A and VB-LoRA 256) */
    const char *gargv[] = {gen, "--out", tmp, "--hidden", "512", "--inter", "1536", "--layers", "1", "--vocab", "256",
                           "--heads", "8", "--kv-heads", "4", "--no-adapter", NULL};
    th_run_result r = th_run(NULL, gargv);
    cr_assert_eq(r.status, 0, "gen_model: %s", r.err);
    th_run_free(&r);
    snprintf(base, sizeof base, "%s/base", tmp);
    snprintf(bfile, sizeof bfile, "%s/model.safetensors", base);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    th_st b;
    cr_assert_eq(th_st_read(bfile, &b), 0);
    for (size_t c = 0; c < sizeof MERGE_CASES / sizeof *MERGE_CASES; c++) {
        const ga_merge_case *mc = &MERGE_CASES[c];
        snprintf(ad, sizeof ad, "%s/%s", tmp, mc->type);
        r = ga_run(base, ad, mc->type, "");
        cr_assert_eq(r.status, 0, "%s: gen_adapter failed: %s", mc->type, r.err);
        th_run_free(&r);
        const char *dry[] = {th_bin(), "-q", "--dry-run", bfile, ad, out, NULL};
        r = th_run(NULL, dry);
        cr_assert_eq(r.status, 0, "%s: --dry-run refused: %s", mc->type, r.err);
        th_run_free(&r);
        const char *merge[] = {th_bin(), "-q", bfile, ad, out, NULL};
        r = th_run(NULL, merge);
        cr_assert_eq(r.status, 0, "%s: merge refused: %s", mc->type, r.err);
        th_run_free(&r);
        th_st o;
        cr_assert_eq(th_st_read(out, &o), 0);
        cr_assert_eq(o.n, b.n);
        size_t changed = 0;
        for (size_t i = 0; i < b.n; i++) {
            const th_tensor *tb = &b.t[i], *to = th_st_find(&o, tb->name);
            cr_assert_not_null(to);
            cr_assert_eq(to->n_bytes, tb->n_bytes);
            if (memcmp(to->data, tb->data, tb->n_bytes) == 0)
                continue;
            changed++;
            uint64_t diff = 0; /* bf16 elements changed */
            for (uint64_t e = 0; e < tb->n_elems; e++)
                diff += memcmp(to->data + 2 * e, tb->data + 2 * e, 2) != 0;
            if (!mc->sparse)
                cr_assert_gt(4 * diff, tb->n_elems, "%s: only %llu of the %llu elements of %s changed", mc->type,
                             (unsigned long long)diff, (unsigned long long)tb->n_elems, tb->name);
        }
        cr_assert_eq(changed, mc->changed, "%s: %zu tensors changed, %zu expected", mc->type, changed, mc->changed);
        th_st_free(&o);
    }
    /* BEFT adapts biases; this base has none */
    snprintf(ad, sizeof ad, "%s/beft", tmp);
    r = ga_run(base, ad, "beft", "");
    cr_assert_neq(r.status, 0);
    cr_assert(strstr(r.err, "bias") != NULL, "unclear message: %s", r.err);
    th_run_free(&r);
    th_st_free(&b);
    th_rmrf(tmp);
    free(tmp);
}
