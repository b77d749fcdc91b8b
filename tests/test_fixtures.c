/* SPDX-License-Identifier: MIT */
/* test_fixtures.c : every real LoRA adapter of ../shared/fixtures/adapters merged into a base
 * synthesised from its shapes (as that folder's README says), in BF16, F16 and F32 (the .bin one
 * and opencalm's single 12.6M-element module kind in BF16), each kind of module once, and checked
 * element by element against W + scale * B@A computed here in double precision from the stored
 * inputs.  Full tensors in the adapter (classification heads) must come out added or replaced.
 * Needs ../shared (skips visibly without it). */
#include "th.h"

#include "lora_merge.h"
#include "tensor_set.h"
#include "torch_bin.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define ADAPTERS TH_SHARED "/adapters"

typedef struct {
    char adapter[96];
    char dtype[24];
} fx_case;

static const char *const FX_ADAPTERS[] = {
    "smollm135m-lora-qv", "qwen2.5-0.5b-lora-qv", "opencalm1b-gptneox-lora-r1-qkv", "gpt2-lora-anirudh",
    "dialogpt-small-tiny-lora-synthetic", "bert-base-lora-seqcls", "distilbert-lora-modules-to-save",
    "t5-small-lora-seq2seq", "distilbert-lora-adapter-bin",
};
static const char *const FX_DTYPES[] = {"BF16", "F16", "F32"};

ParameterizedTestParameters(fixtures, adapter_merge)
{
    size_t n = 0, na = sizeof FX_ADAPTERS / sizeof *FX_ADAPTERS;
    fx_case *c = cr_malloc(na * 3 * sizeof *c);
    for (size_t a = 0; a < na; a++)
        for (size_t d = 0; d < 3; d++, n++) {
            /* the .bin one (used whole) and the one whose single module kind is 12.6M elements: one
             * dtype (the three dtypes are merged with every other adapter) */
            if ((strstr(FX_ADAPTERS[a], "adapter-bin") || strstr(FX_ADAPTERS[a], "opencalm")) && d > 0) {
                n--;
                continue;
            }
            snprintf(c[n].adapter, sizeof c[n].adapter, "%s", FX_ADAPTERS[a]);
            snprintf(c[n].dtype, sizeof c[n].dtype, "%s", FX_DTYPES[d]);
        }
    return cr_make_param_array(fx_case, c, n, NULL);
}

/* adapter tensors as (name, shape, double values), from safetensors (independent reader) or
 * from .bin (the library's restricted reader: no independent .bin reader exists here) */
typedef struct {
    char name[256];
    int n_dims;
    uint64_t shape[8];
    uint64_t n_elems;
    double *v;
    char dtype[24];
} fx_tensor;

static size_t load_adapter(const char *dir, fx_tensor **out)
{
    char p[1400];
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    fx_tensor *t = NULL;
    size_t n = 0;
    if (th_exists(p)) {
        th_st st;
        cr_assert_eq(th_st_read(p, &st), 0, "cannot read %s", p);
        t = calloc(st.n, sizeof *t);
        for (size_t i = 0; i < st.n; i++, n++) {
            snprintf(t[n].name, sizeof t[n].name, "%s", st.t[i].name);
            t[n].n_dims = st.t[i].n_dims;
            memcpy(t[n].shape, st.t[i].shape, sizeof t[n].shape);
            t[n].n_elems = st.t[i].n_elems;
            t[n].v = th_to_f64(&st.t[i]);
            snprintf(t[n].dtype, sizeof t[n].dtype, "%s", st.t[i].dtype);
        }
        th_st_free(&st);
    } else {
        snprintf(p, sizeof p, "%s/adapter_model.bin", dir);
        lm_tensor_set *ts = NULL;
        lm_err err;
        lm_err_clear(&err);
        cr_assert_eq(lm_torch_bin_load(p, &ts, &err), LM_OK, "%s: %s", p, err.msg);
        t = calloc(ts->n, sizeof *t);
        for (size_t i = 0; i < ts->n; i++, n++) {
            const lm_ts_tensor *s = &ts->t[i];
            cr_assert_eq(s->dtype, LM_DT_F32, "expected F32 in %s", s->name);
            snprintf(t[n].name, sizeof t[n].name, "%s", s->name);
            t[n].n_dims = (int)s->n_dims;
            for (size_t d = 0; d < s->n_dims; d++)
                t[n].shape[d] = s->shape[d];
            t[n].n_elems = s->n_elems;
            t[n].v = malloc(s->n_elems * sizeof(double) + 1);
            for (uint64_t k = 0; k < s->n_elems; k++) {
                float f;
                memcpy(&f, (const uint8_t *)s->data + 4 * k, 4);
                t[n].v[k] = f;
            }
            snprintf(t[n].dtype, sizeof t[n].dtype, "F32");
        }
        lm_ts_free(ts);
    }
    *out = t;
    return n;
}

static const fx_tensor *find_t(const fx_tensor *t, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(t[i].name, name) == 0)
            return &t[i];
    return NULL;
}

static int is_gpt2_conv1d(const char *module)
{
    return strstr(module, ".attn.c_attn") || strstr(module, ".attn.c_proj") || strstr(module, ".mlp.c_fc") ||
           strstr(module, ".mlp.c_proj");
}

ParameterizedTest(fx_case *fc, fixtures, adapter_merge, .timeout = 120)
{
    if (!th_have_shared())
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
    char dir[1200], p[1400];
    snprintf(dir, sizeof dir, ADAPTERS "/%s", fc->adapter);
    /* config: r, alpha, rslora (none of these fixtures uses patterns) */
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    size_t n;
    char *json = (char *)th_read_file(p, &n);
    cJSON *cfg = cJSON_ParseWithLength(json, n);
    free(json);
    cr_assert_not_null(cfg);
    double r = cJSON_GetObjectItemCaseSensitive(cfg, "r")->valuedouble;
    double alpha = cJSON_GetObjectItemCaseSensitive(cfg, "lora_alpha")->valuedouble;
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(cfg, "use_rslora");
    double scale = cJSON_IsTrue(rs) ? alpha / sqrt(r) : alpha / r;
    cJSON_Delete(cfg);

    fx_tensor *at;
    size_t nat = load_adapter(dir, &at);
    char *tmp = th_tmpdir();
    /* Keep the test small: each kind of module once, the first in file order (a kind: the name
     * with its layer numbers left out, and the shapes of A and B; further layers of a kind take
     * the same path through the merge); the others are dropped from a trimmed copy of the adapter
     * (same config, same dtypes and values), full tensors (heads) all kept.  The .bin adapter is
     * used whole (small enough). */
    int is_bin = strstr(fc->adapter, "adapter-bin") != NULL;
    char (*kinds)[320] = calloc(nat, sizeof *kinds);
    size_t n_kinds = 0;
    for (size_t i = 0; i < nat; i++) {
        const char *suf = strstr(at[i].name, ".lora_A.weight");
        if (suf == NULL || is_bin)
            continue;
        char bname[300];
        snprintf(bname, sizeof bname, "%.*s.lora_B.weight", (int)(suf - at[i].name), at[i].name);
        const fx_tensor *B = find_t(at, nat, bname);
        cr_assert_not_null(B, "%s: no lora_B for %s", fc->adapter, at[i].name);
        char kind[320];
        size_t kn = 0;
        int in_num = 0; /* inside a number that follows a dot: ".12." -> ".#." */
        for (const char *c = at[i].name; *c && kn + 1 < 200; c++) {
            int digit = *c >= '0' && *c <= '9';
            if (digit && (in_num || (c > at[i].name && c[-1] == '.'))) {
                if (!in_num)
                    kind[kn++] = '#';
                in_num = 1;
            } else {
                kind[kn++] = *c;
                in_num = 0;
            }
        }
        snprintf(kind + kn, sizeof kind - kn, " %llux%llu %llux%llu", (unsigned long long)at[i].shape[0],
                 (unsigned long long)at[i].shape[1], (unsigned long long)B->shape[0],
                 (unsigned long long)B->shape[1]);
        size_t q = 0;
        while (q < n_kinds && strcmp(kinds[q], kind) != 0)
            q++;
        if (q < n_kinds) { /* a kind seen before: drop this module, both factors */
            at[i].name[0] = '\0';
            for (size_t j = 0; j < nat; j++)
                if (strcmp(at[j].name, bname) == 0)
                    at[j].name[0] = '\0';
        } else {
            snprintf(kinds[n_kinds++], sizeof kinds[0], "%s", kind);
        }
    }
    free(kinds);
    if (!is_bin)
        cr_log_info("%s/%s: %zu kinds of module", fc->adapter, fc->dtype, n_kinds);
    if (!is_bin) {
        char adir[1100];
        snprintf(adir, sizeof adir, "%s/adapter", tmp);
        cr_assert_eq(mkdir(adir, 0777), 0);
        th_out_tensor *keep = calloc(nat, sizeof *keep);
        size_t nk = 0;
        for (size_t i = 0; i < nat; i++) {
            if (at[i].name[0] == '\0')
                continue;
            keep[nk].name = at[i].name;
            keep[nk].dtype = at[i].dtype;
            keep[nk].n_dims = at[i].n_dims;
            memcpy(keep[nk].shape, at[i].shape, sizeof keep[nk].shape);
            keep[nk].values = at[i].v;
            nk++;
        }
        snprintf(p, sizeof p, "%s/adapter_model.safetensors", adir);
        cr_assert_eq(th_st_write(p, keep, nk), 0);
        free(keep);
        size_t cn;
        char src[1300];
        snprintf(src, sizeof src, "%s/adapter_config.json", dir);
        uint8_t *cj = th_read_file(src, &cn);
        snprintf(p, sizeof p, "%s/adapter_config.json", adir);
        cr_assert_eq(th_write_file(p, cj, cn), 0);
        free(cj);
        snprintf(dir, sizeof dir, "%s", adir);
    }
    /* synthesise the base: M.weight for every lora module, plus two untouched tensors */
    th_out_tensor *bt = calloc(nat + 2, sizeof *bt);
    double **bvals = calloc(nat + 2, sizeof *bvals);
    char (*bnames)[320] = calloc(nat + 2, sizeof *bnames);
    size_t nb = 0;
    uint64_t seed = 12345;
    for (size_t i = 0; i < nat; i++) {
        const char *k = at[i].name, *suf = strstr(k, ".lora_A.weight");
        if (k[0] == '\0' || suf == NULL || strncmp(k, "base_model.model.", 17) != 0)
            continue;
        char module[256];
        snprintf(module, sizeof module, "%.*s", (int)(suf - k - 17), k + 17);
        char bname[300];
        snprintf(bname, sizeof bname, "base_model.model.%s.lora_B.weight", module);
        const fx_tensor *B = find_t(at, nat, bname);
        cr_assert_not_null(B, "%s: no lora_B for %s", fc->adapter, module);
        snprintf(bnames[nb], sizeof bnames[nb], "%s.weight", module);
        bt[nb].name = bnames[nb];
        bt[nb].dtype = fc->dtype;
        bt[nb].n_dims = 2;
        int conv1d = is_gpt2_conv1d(module);
        bt[nb].shape[0] = conv1d ? at[i].shape[1] : B->shape[0];
        bt[nb].shape[1] = conv1d ? B->shape[0] : at[i].shape[1];
        uint64_t ne = bt[nb].shape[0] * bt[nb].shape[1];
        bvals[nb] = malloc(ne * sizeof(double));
        for (uint64_t e = 0; e < ne; e++)
            bvals[nb][e] = th_round_to(0.02 * th_rand_normal(&seed), fc->dtype);
        bt[nb].values = bvals[nb];
        nb++;
    }
    cr_assert_gt(nb, 0, "%s: no lora modules found", fc->adapter);
    static const char *const extra[] = {"untouched.norm.weight", "untouched.embed.weight"};
    for (int x = 0; x < 2; x++, nb++) {
        snprintf(bnames[nb], sizeof bnames[nb], "%s", extra[x]);
        bt[nb].name = bnames[nb];
        bt[nb].dtype = fc->dtype;
        bt[nb].n_dims = x == 0 ? 1 : 2;
        bt[nb].shape[0] = 48;
        bt[nb].shape[1] = 5;
        uint64_t ne = x == 0 ? 48 : 240;
        bvals[nb] = malloc(ne * sizeof(double));
        for (uint64_t e = 0; e < ne; e++)
            bvals[nb][e] = th_round_to(1.0 + 0.1 * th_rand_normal(&seed), fc->dtype);
        bt[nb].values = bvals[nb];
    }
    char base_path[1024], out_path[1024];
    snprintf(base_path, sizeof base_path, "%s/base.safetensors", tmp);
    snprintf(out_path, sizeof out_path, "%s/out.safetensors", tmp);
    cr_assert_eq(th_st_write(base_path, bt, nb), 0);
    const char *argv[] = {th_bin(), "-q", base_path, dir, out_path, NULL};
    th_run_result rr = th_run(NULL, argv);
    cr_assert_eq(rr.status, 0, "%s/%s: exit %d: %s", fc->adapter, fc->dtype, rr.status, rr.err);
    th_st out;
    cr_assert_eq(th_st_read(out_path, &out), 0, "output unreadable");
    /* every base tensor, in the base's order and dtype */
    for (size_t i = 0; i < nb; i++) {
        cr_assert_str_eq(out.t[i].name, bt[i].name, "order changed at %zu", i);
        cr_assert_str_eq(out.t[i].dtype, fc->dtype);
    }
    for (size_t i = 0; i < nb; i++) {
        const th_tensor *o = &out.t[i];
        double *ov = th_to_f64(o);
        if (strncmp(bt[i].name, "untouched.", 10) == 0) {
            for (uint64_t e = 0; e < o->n_elems; e++)
                cr_assert_eq(ov[e], bvals[i][e], "untouched tensor %s changed", o->name);
            free(ov);
            continue;
        }
        char module[300], an[400], bn[400];
        cr_assert_lt(strlen(bt[i].name), sizeof module);
        snprintf(module, sizeof module, "%.*s", (int)(strlen(bt[i].name) - 7), bt[i].name);
        snprintf(an, sizeof an, "base_model.model.%s.lora_A.weight", module);
        snprintf(bn, sizeof bn, "base_model.model.%s.lora_B.weight", module);
        const fx_tensor *A = find_t(at, nat, an), *B = find_t(at, nat, bn);
        uint64_t rk = A->shape[0], in = A->shape[1], o_ = B->shape[0];
        int conv1d = is_gpt2_conv1d(module);
        double *ref = malloc(o->n_elems * sizeof(double));
        for (uint64_t a = 0; a < o_; a++)
            for (uint64_t b = 0; b < in; b++) {
                double s = 0;
                for (uint64_t k = 0; k < rk; k++)
                    s += B->v[a * rk + k] * A->v[k * in + b];
                uint64_t idx = conv1d ? b * o_ + a : a * in + b;
                ref[idx] = bvals[i][idx] + scale * s;
            }
        th_cmp c = th_compare(fc->dtype, ov, ref, (size_t)o->n_elems);
        cr_expect(c.ok, "%s/%s %s: %s", fc->adapter, fc->dtype, o->name, c.why);
        free(ov);
        free(ref);
    }
    /* full tensors of the adapter (heads) are added, converted to the base dtype */
    for (size_t i = 0; i < nat; i++) {
        const char *k = at[i].name;
        if (k[0] == '\0' || strstr(k, ".lora_") != NULL)
            continue;
        const th_tensor *o = th_st_find(&out, k + 17);
        cr_assert_not_null(o, "%s: adapter tensor %s not in the output", fc->adapter, k);
        cr_assert_eq(o->n_elems, at[i].n_elems);
        double *ov = th_to_f64(o);
        for (uint64_t e = 0; e < o->n_elems; e++)
            cr_assert_eq(ov[e], th_round_to(at[i].v[e], o->dtype), "%s[%llu]", o->name, (unsigned long long)e);
        free(ov);
    }
    th_st_free(&out);
    th_run_free(&rr);
    for (size_t i = 0; i < nb; i++)
        free(bvals[i]);
    free(bvals);
    free(bt);
    free(bnames);
    for (size_t i = 0; i < nat; i++)
        free(at[i].v);
    free(at);
    th_rmrf(tmp);
    free(tmp);
}

Test(fixtures, unsupported_type_refused)
{
    if (!th_have_shared())
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
    char *tmp = th_tmpdir();
    char base[1024], out[1024];
    snprintf(base, sizeof base, "%s/base.safetensors", tmp);
    snprintf(out, sizeof out, "%s/out.safetensors", tmp);
    double v[4] = {1, 2, 3, 4};
    th_out_tensor t = {"x.weight", "F32", 2, {2, 2}, v};
    cr_assert_eq(th_st_write(base, &t, 1), 0);
    const char *argv[] = {th_bin(), base, ADAPTERS "/roberta-finegates-unsupported-type", out, NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 1, "exit %d", r.status);
    cr_assert(strstr(r.err, "FINEGATES") != NULL, "%s", r.err);
    cr_assert(strstr(r.err, "adapter_config.json") != NULL, "%s", r.err);
    cr_assert_eq(th_count_entries(tmp), 1, "output or temp file left");
    th_run_free(&r);
    th_rmrf(tmp);
    free(tmp);
}
