/* SPDX-License-Identifier: MIT */
/* test_errors.c : the one table of error kinds (src/core/lm_kinds.def).  A listed kind always
 * carries its listed code whatever a call site passes; `lora-merge errors` prints every kind once
 * with the exit status it gives, and real refusals exit with the status that table lists. */
#include "th.h"
#include "lm_error.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

Test(errors, listed_kind_takes_the_table_code)
{
    lm_err err;
    lm_err_clear(&err);
    lm_code rc = lm_fail(&err, LM_E_FORMAT, "ShapeMismatch", "a %s", "test");
    cr_assert_eq(rc, LM_E_MISMATCH);
    cr_assert_eq(err.code, LM_E_MISMATCH);
    cr_assert_str_eq(err.kind, "ShapeMismatch");
    cr_assert_str_eq(err.msg, "a test");
    cr_assert_not_null(lm_kind_meaning("ShapeMismatch"));
    /* a kind not in the table keeps the code it was raised with */
    lm_err_clear(&err);
    cr_assert_eq(lm_fail(&err, LM_E_IO, "NotAKindAnywhere", "x"), LM_E_IO);
    cr_assert_eq(err.code, LM_E_IO);
    cr_assert_null(lm_kind_meaning("NotAKindAnywhere"));
    /* no kind: the code's own name */
    lm_err_clear(&err);
    lm_fail(&err, LM_E_NOMEM, NULL, "x");
    cr_assert_str_eq(err.kind, "OutOfMemory");
}

Test(errors, table_names_are_unique_and_described)
{
    const char *name, *meaning, *seen[512];
    lm_code code;
    size_t n = 0;
    for (; lm_error_kind(n, &name, &code, &meaning); n++) {
        cr_assert_lt(n, 512);
        cr_assert(code != LM_OK, "%s has no error code", name);
        cr_assert(strlen(meaning) > 10, "%s has no meaning", name);
        cr_assert(strlen(name) < sizeof ((lm_err *)0)->kind, "%s does not fit lm_err.kind", name);
        for (size_t j = 0; j < n; j++)
            cr_assert_str_neq(seen[j], name, "%s is listed twice", name);
        seen[n] = name;
    }
    cr_assert_gt(n, 50);
}

/* the exit status `lora-merge errors` prints for KIND */
static int listed_exit(const char *listing, const char *kind)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\n%s ", kind);
    const char *p = strstr(listing, pat);
    cr_assert_not_null(p, "'%s' missing from `lora-merge errors`", kind);
    return atoi(p + strlen(pat));
}

Test(errors, cli_lists_each_kind_with_the_status_a_real_refusal_gives)
{
    const char *argv_list[] = {th_bin(), "errors", NULL};
    th_run_result r = th_run(NULL, argv_list);
    cr_assert_eq(r.status, 0, "%s", r.err);
    const char *name, *meaning;
    lm_code code;
    size_t n = 0;
    for (; lm_error_kind(n, &name, &code, &meaning); n++)
        (void)listed_exit(r.out, name);
    size_t lines = 0;
    for (const char *p = r.out; *p; p++)
        lines += *p == '\n';
    cr_assert_eq(lines, n + 1, "one header line and one line per kind");

    /* an adapter directory without adapter_config.json: MissingConfig */
    char *tmp = th_tmpdir();
    char base[512], ad[512], out[512];
    snprintf(base, sizeof base, "%s/base", tmp);
    snprintf(ad, sizeof ad, "%s/adapter", tmp);
    snprintf(out, sizeof out, "%s/out", tmp);
    cr_assert_eq(mkdir(base, 0755), 0);
    cr_assert_eq(mkdir(ad, 0755), 0);
    th_out_tensor w = {"model.layers.0.q_proj.weight", "F32", 2, {2, 2}, (const double[]){1, 2, 3, 4}};
    char wpath[600];
    snprintf(wpath, sizeof wpath, "%s/model.safetensors", base);
    cr_assert_eq(th_st_write(wpath, &w, 1), 0);
    const char *argv_merge[] = {th_bin(), base, ad, out, NULL};
    th_run_result m = th_run(NULL, argv_merge);
    cr_assert(strstr(m.err, "MissingConfig") != NULL, "%s", m.err);
    cr_assert_eq(m.status, listed_exit(r.out, "MissingConfig"), "%s", m.err);
    cr_assert_eq(m.status, 3, "a missing adapter file is an I/O error (exit 3): %s", m.err);
    th_run_free(&m);
    /* a bad option: Usage */
    const char *argv_bad[] = {th_bin(), "--no-such-option", base, ad, out, NULL};
    m = th_run(NULL, argv_bad);
    cr_assert_eq(m.status, listed_exit(r.out, "Usage"), "%s", m.err);
    th_run_free(&m);
    th_run_free(&r);
    th_rmrf(tmp);
    free(tmp);
}
