/* SPDX-License-Identifier: MIT */
/* test_golden.c : PEFT's own merges (../shared/fixtures/peft-golden, computed in float64) against
 * the tool, judged by the rule of ../shared/tools/golden_check.py, ported to C (th_compare).
 * Every LoRA case must merge and match; the refusal cases must be refused naming the peft_type;
 * the other PEFT types (not implemented yet) must be refused cleanly, naming their type.
 * Needs ../shared (skips visibly without it). */
#include "th.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN TH_SHARED "/peft-golden"

typedef struct {
    char name[256];
} golden_case;

static int cmp_case(const void *a, const void *b) { return strcmp(((const golden_case *)a)->name, ((const golden_case *)b)->name); }

static struct criterion_test_params golden_params(void)
{
    golden_case *cases = cr_malloc(128 * sizeof *cases);
    size_t n = 0;
    DIR *d = opendir(GOLDEN);
    struct dirent *de;
    while (d && (de = readdir(d)) != NULL && n < 128) {
        char p[512];
        snprintf(p, sizeof p, GOLDEN "/%s/case.json", de->d_name);
        if (th_exists(p)) {
            snprintf(cases[n].name, sizeof cases[n].name, "%s", de->d_name);
            n++;
        }
    }
    if (d)
        closedir(d);
    if (n == 0) { /* no fixtures: one placeholder that skips */
        snprintf(cases[0].name, sizeof cases[0].name, "%s", "(no ../shared)");
        n = 1;
    }
    qsort(cases, n, sizeof *cases, cmp_case);
    return cr_make_param_array(golden_case, cases, n, NULL);
}

static char *norm(const char *s)
{
    char *o = malloc(strlen(s) + 1), *q = o;
    for (; *s; s++)
        if (isalnum((unsigned char)*s))
            *q++ = (char)tolower((unsigned char)*s);
    *q = '\0';
    return o;
}

/* Documented exceptions to the golden rule, as narrow as measured.
 * psoft: PSOFT refuses float64 (case.json's note), so PEFT built its factors from a float32 torch
 * SVD of the base (MKL sgesdd) and only then upcast: the reference carries float32 SVD rounding
 * (the singular vectors to ~1e-7), which lora-merge's double SVD does not. Measured: 3.85e-7 on
 * layers.1.q_proj against the rule's 1.71e-7 (2.25x), every other tensor within the rule; the
 * F32 tolerance is widened 4x for this case only. A wrong sign of a singular pair (the one way
 * PSOFT can go wrong that a tolerance could hide) costs 1e-2 here. */
static double f32_allowance(const char *case_dir)
{
    const char *leaf = strrchr(case_dir, '/');
    return leaf != NULL && strcmp(leaf + 1, "psoft") == 0 ? 4.0 : 1.0;
}

/* osf: PEFT rebuilds the frozen part from a float32 torch SVD of the base (OSFLayer.update_layer ->
 * decompose_weight_matrix casts to float32 whatever the model's dtype), so the reference carries
 * float32 SVD rounding, amplified where the split falls between close singular values: on
 * layers.0.q_proj (s_3 - s_4 = 0.0024, from 0) it differs from the exact merge by up to 5.5e-7, a rank-2
 * error (numpy's and OpenBLAS's float32 SVDs differ from the reference as much). lora-merge's
 * double SVD rounds 2 of its 1024 elements to the other neighbour (0.566 ulp; the rule wants
 * 99.9% nearest); the other three tensors are within the rule. Allowed for this case only: 99.5%
 * nearest, every element still within 1 ulp. A wrong rank split or a lost part costs far beyond
 * 1 ulp here (the parts are of the weight's own size). */
static double nearest_floor(const char *case_dir)
{
    const char *leaf = strrchr(case_dir, '/');
    return leaf != NULL && strcmp(leaf + 1, "osf") == 0 ? 0.995 : 0.999;
}

/* compares the output with merged_f64 by the golden rule; returns a malloc'd problem or NULL */
static char *judge(const char *case_dir, const char *out_path)
{
    char p[1024], *problem = NULL;
    th_st base, ref, out;
    snprintf(p, sizeof p, "%s/base/model.safetensors", case_dir);
    cr_assert_eq(th_st_read(p, &base), 0, "cannot read %s", p);
    snprintf(p, sizeof p, "%s/merged_f64.safetensors", case_dir);
    cr_assert_eq(th_st_read(p, &ref), 0, "cannot read %s", p);
    if (th_st_read(out_path, &out) != 0) {
        th_st_free(&base);
        th_st_free(&ref);
        return strdup("output unreadable by an independent reader");
    }
    char msg[1024] = "";
    if (out.n != base.n)
        snprintf(msg, sizeof msg, "output has %zu tensors, base %zu", out.n, base.n);
    for (size_t i = 0; i < base.n && !msg[0]; i++) {
        const th_tensor *b = &base.t[i], *o = th_st_find(&out, b->name), *r = th_st_find(&ref, b->name);
        if (o == NULL) {
            snprintf(msg, sizeof msg, "missing tensor %s", b->name);
            break;
        }
        if (strcmp(o->dtype, b->dtype) || o->n_dims != b->n_dims || memcmp(o->shape, b->shape, sizeof o->shape)) {
            snprintf(msg, sizeof msg, "%s: %s/%dd where the base has %s/%dd", b->name, o->dtype, o->n_dims, b->dtype,
                     b->n_dims);
            break;
        }
        cr_assert_not_null(r, "reference lacks %s", b->name);
        if (strcmp(b->dtype, "F32") && strcmp(b->dtype, "F16") && strcmp(b->dtype, "BF16") && strcmp(b->dtype, "F64")) {
            if (o->n_bytes != r->n_bytes || memcmp(o->data, r->data, o->n_bytes))
                snprintf(msg, sizeof msg, "%s: %s values differ", b->name, b->dtype);
            continue;
        }
        double *ov = th_to_f64(o), *rv = th_to_f64(r);
        th_cmp c = th_compare(b->dtype, ov, rv, (size_t)o->n_elems);
        free(ov);
        free(rv);
        if (!c.ok && !strcmp(b->dtype, "F32") && c.max_abs_err <= f32_allowance(case_dir) * c.tol)
            c.ok = 1;
        if (!c.ok && (!strcmp(b->dtype, "BF16") || !strcmp(b->dtype, "F16")) && c.n_beyond == 0 &&
            c.nearest_frac >= nearest_floor(case_dir))
            c.ok = 1;
        if (!c.ok)
            snprintf(msg, sizeof msg, "%s (%s): %s", b->name, b->dtype, c.why);
    }
    if (msg[0])
        problem = strdup(msg);
    th_st_free(&base);
    th_st_free(&ref);
    th_st_free(&out);
    return problem;
}

ParameterizedTestParameters(golden, peft_case) { return golden_params(); }

ParameterizedTest(golden_case *gc, golden, peft_case, .timeout = 120)
{
    if (!th_have_shared())
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
    char case_dir[512], p[1024];
    snprintf(case_dir, sizeof case_dir, GOLDEN "/%s", gc->name);
    snprintf(p, sizeof p, "%s/case.json", case_dir);
    size_t n;
    char *json = (char *)th_read_file(p, &n);
    cr_assert_not_null(json);
    cJSON *c = cJSON_ParseWithLength(json, n);
    free(json);
    cr_assert_not_null(c, "bad case.json in %s", gc->name);
    const char *expected = cJSON_GetObjectItemCaseSensitive(c, "expected")->valuestring;
    const char *peft_type = cJSON_GetObjectItemCaseSensitive(c, "peft_type")->valuestring;
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(c, "args");
    char *tmp = th_tmpdir();
    char out_path[1024];
    snprintf(out_path, sizeof out_path, "%s/out.safetensors", tmp);
    const char *argv[32];
    char *owned[32];
    size_t na = 0;
    argv[na] = th_bin();
    owned[na++] = NULL;
    const cJSON *a;
    cJSON_ArrayForEach(a, args)
    {
        const char *s = a->valuestring;
        owned[na] = strcmp(s, "{out}") == 0 ? strdup(out_path) : strdup(s);
        argv[na] = owned[na];
        na++;
    }
    argv[na] = NULL;
    th_run_result r = th_run(case_dir, argv);
    /* the types lora-merge merges; the others must be refused cleanly */
    /* one type a line (helpers add types in parallel) */
    static const char *const merged[] = {
        "LORA",
        "ADALORA",
        "IA3",
        "LOHA",
        "LOKR",
        "TRAINABLE_TOKENS",
        "BEFT",
        "LN_TUNING",
        "HIRA",
        "VERA",
        "SHIRA",
        "HRA",
        "MISS",
        "DELORA",
        "GRALORA",
        "VBLORA",
        "RANDLORA",
        "OFT",
        "FOURIERFT",
        "WAVEFT",
        "GLORA",
        "DEFT",
        "ROAD",
        "C3A",
        "BOFT",
        "PVERA",
        "SUPERTUNING",
        "PEANUT",
        "TINYLORA",
        "PSOFT",
        "OSF",
        "FROD",
        "UNILORA",
        "ADAMSS",
    };
    int lora = 0;
    for (size_t i = 0; i < sizeof merged / sizeof *merged; i++)
        lora |= strcmp(peft_type, merged[i]) == 0;
    if (strcmp(expected, "merge") == 0 && lora) {
        cr_assert_eq(r.status, 0, "%s: exit %d: %s", gc->name, r.status, r.err);
        cr_assert(th_exists(out_path), "%s: no output file", gc->name);
        char *problem = judge(case_dir, out_path);
        cr_assert_null(problem, "%s: %s", gc->name, problem);
    } else {
        /* a refusal case, or a type not implemented yet: refused, naming the type, no output */
        cr_assert_neq(r.status, 0, "%s: exit 0 for %s, which must be refused", gc->name, peft_type);
        cr_assert(!th_exists(out_path), "%s: refused but left an output file", gc->name);
        char *want = norm(peft_type), *got = norm(r.err);
        cr_assert(strstr(got, want) != NULL, "%s: message does not name %s: %s", gc->name, peft_type, r.err);
        cr_assert(strncmp(r.err, "error: ", 7) == 0, "%s: not an error line: %s", gc->name, r.err);
        cr_assert(strchr(r.err, '\n') == r.err + strlen(r.err) - 1, "%s: more than one line: %s", gc->name, r.err);
        free(want);
        free(got);
    }
    cr_assert_eq(th_count_entries(tmp), strcmp(expected, "merge") == 0 && lora ? 1 : 0,
                 "%s: temporary files left behind", gc->name);
    th_run_free(&r);
    for (size_t i = 0; i < na; i++)
        free(owned[i]);
    cJSON_Delete(c);
    th_rmrf(tmp);
    free(tmp);
}
