/* SPDX-License-Identifier: MIT */
/* test_packaging.c : what ships beside the binary.  The man page (doc/lora-merge.1) and
 * `lora-merge --help` name the same options; the LICENSE is there.  (The install, pkg-config and
 * shared/static linking checks are tests/packaging.sh, run by `make test`.) */
#include "th.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PK_MAX 64

/* the distinct long options ("--name") and short ones ("-q") in text; the man page writes '-' as
 * "\-", so backslashes are dropped first */
static size_t pk_options(const char *text, char opts[][40])
{
    size_t n = 0, len = strlen(text);
    char *t = malloc(len + 1);
    size_t k = 0;
    for (size_t i = 0; i < len; i++)
        if (text[i] != '\\')
            t[k++] = text[i];
    t[k] = '\0';
    for (const char *p = t; *p; p++) {
        int start = (p == t || !(p[-1] == '-' || (p[-1] >= 'a' && p[-1] <= 'z') || (p[-1] >= 'A' && p[-1] <= 'Z') ||
                                 (p[-1] >= '0' && p[-1] <= '9')));
        if (!start || p[0] != '-')
            continue;
        size_t m = p[1] == '-' ? 2 : 1, e = m;
        while ((p[e] >= 'a' && p[e] <= 'z') || (p[e] == '-' && p[e + 1] >= 'a' && p[e + 1] <= 'z'))
            e++;
        if (e == m || (m == 1 && e != 2)) /* "--" alone, or a dash followed by a word ("-0.75", "re-run") */
            continue;
        char o[40];
        snprintf(o, sizeof o, "%.*s", (int)e, p);
        int seen = 0;
        for (size_t i = 0; i < n; i++)
            seen |= strcmp(opts[i], o) == 0;
        if (!seen && n < PK_MAX)
            snprintf(opts[n++], 40, "%s", o);
        p += e - 1;
    }
    free(t);
    return n;
}

Test(packaging, man_page_matches_help)
{
    size_t n_man;
    char *man = (char *)th_read_file("doc/lora-merge.1", &n_man);
    cr_assert_not_null(man, "doc/lora-merge.1 is missing");
    char *m0 = realloc(man, n_man + 1);
    m0[n_man] = '\0';
    const char *argv[] = {th_bin(), "--help", NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0);
    /* the exit statuses too: every status the help lists is in the man page */
    for (int s = 0; s <= 9; s++) {
        char key[16];
        snprintf(key, sizeof key, " %d ", s);
        const char *es = strstr(r.out, "exit status:");
        if (es == NULL || strstr(es, key) == NULL)
            continue;
        char mk[16];
        snprintf(mk, sizeof mk, ".B %d\n", s);
        cr_expect(strstr(m0, mk) != NULL, "exit status %d is in --help but not in the man page", s);
    }
    /* the options section of the man page: from ".SH OPTIONS" to the next ".SH" */
    char *sec = strstr(m0, ".SH OPTIONS");
    cr_assert_not_null(sec, "the man page has no OPTIONS section");
    char *end = strstr(sec + 4, "\n.SH");
    if (end)
        *end = '\0';
    static char help_opts[PK_MAX][40], man_opts[PK_MAX][40];
    size_t nh = pk_options(strstr(r.out, "options:") ? strstr(r.out, "options:") : r.out, help_opts);
    size_t nm = pk_options(sec, man_opts);
    cr_assert_gt(nh, 10, "too few options found in --help: %s", r.out);
    for (size_t i = 0; i < nh; i++) {
        int found = 0;
        for (size_t j = 0; j < nm; j++)
            found |= strcmp(help_opts[i], man_opts[j]) == 0;
        cr_expect(found, "%s is in --help but not in the man page's OPTIONS", help_opts[i]);
    }
    for (size_t j = 0; j < nm; j++) {
        int found = 0;
        for (size_t i = 0; i < nh; i++)
            found |= strcmp(help_opts[i], man_opts[j]) == 0;
        cr_expect(found, "%s is in the man page's OPTIONS but not in --help", man_opts[j]);
    }
    th_run_free(&r);
    free(m0);
}

Test(packaging, license_file)
{
    size_t n;
    char *lic = (char *)th_read_file("LICENSE", &n);
    cr_assert_not_null(lic, "no LICENSE file");
    char *l0 = realloc(lic, n + 1);
    l0[n] = '\0';
    cr_assert(strstr(l0, "MIT License") != NULL || strstr(l0, "Apache License") != NULL, "LICENSE is not MIT or Apache");
    free(l0);
}

/* every source file says its license in its first lines (SPDX), so copies of single files keep it;
 * a new file needs "SPDX-License-Identifier: MIT" in a comment on its first line (after #!) */
Test(packaging, spdx_tags)
{
    /* one awk reading the first 3 lines of each file (not a head | grep per file), printing those
     * without the tag (an empty file too) */
    th_run_result r = th_sh("awk 'BEGIN { for (i = 1; i < ARGC; i++) { ok = 0; "
                            "for (k = 0; k < 3 && (getline l < ARGV[i]) > 0; k++) if (l ~ /SPDX-License-Identifier: MIT/) ok = 1; "
                            "close(ARGV[i]); if (!ok) print ARGV[i] } }' "
                            "$(ls src/*/*.c src/*/*.h include/*.h kernels/*.c kernels/*.h tests/*.c tests/*.h "
                            "tests/fuzz/*.c bench/*.c tests/*.sh tests/lint/*.sh bench/*.sh Makefile lora_merge.pc.in "
                            "doc/lora-merge.1 2>/dev/null)");
    cr_assert_eq(r.status, 0);
    cr_assert_eq(r.out[0], '\0', "files without an SPDX tag in their first 3 lines:\n%s", r.out);
    th_run_free(&r);
    th_run_result n = th_sh("ls src/*/*.c | wc -l");
    cr_assert_gt(atoi(n.out), 20, "the source files were not found (run from the repository's root)");
    th_run_free(&n);
}
