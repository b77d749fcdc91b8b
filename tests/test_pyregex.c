/* SPDX-License-Identifier: MIT */
/* test_pyregex.c : pyregex against Python's re.  Expected values were derived by hand and
 * checked with Python 3.11 (re.ASCII for \d \w \s, which is what pyregex implements); the test
 * itself needs no Python. */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pyregex.h"

typedef struct rx_case {
    const char *pattern;
    const char *subject;
    size_t n_bytes;      /* subject length (it may hold a NUL) */
    int full;            /* re.fullmatch(pattern, subject) is not None */
    int match;           /* re.match(pattern, subject) is not None */
    long g1_begin, g1_end; /* re.match(...).span(1) in bytes, -1 -1 if none */
} rx_case;

static const rx_case rx_cases[] = {
    { "abc", "abc", 3, 1, 1, -1, -1 },
    { "abc", "abcd", 4, 0, 1, -1, -1 },
    { "abc", "ab", 2, 0, 0, -1, -1 },
    { "a.c", "abc", 3, 1, 1, -1, -1 },
    { "a.c", "a\nc", 3, 0, 0, -1, -1 },
    { "a.c", "a.c", 3, 1, 1, -1, -1 },
    { "...", "ab", 2, 0, 0, -1, -1 },
    { "", "", 0, 1, 1, -1, -1 },
    { "", "a", 1, 0, 1, -1, -1 },
    { "a\\.c", "abc", 3, 0, 0, -1, -1 },
    { "a\\.c", "a.c", 3, 1, 1, -1, -1 },
    { "a\\\\b", "a\\b", 3, 1, 1, -1, -1 },
    { "\\d+", "0123", 4, 1, 1, -1, -1 },
    { "\\d+", "12a", 3, 0, 1, -1, -1 },
    { "\\D+", "ab.", 3, 1, 1, -1, -1 },
    { "\\D", "5", 1, 0, 0, -1, -1 },
    { "\\w+", "q_proj9", 7, 1, 1, -1, -1 },
    { "\\w+", "q-proj", 6, 0, 1, -1, -1 },
    { "\\W", "-", 1, 1, 1, -1, -1 },
    { "\\W", "_", 1, 0, 0, -1, -1 },
    { "\\s\\S", "\tx", 2, 1, 1, -1, -1 },
    { "\\s", "x", 1, 0, 0, -1, -1 },
    { "\\S", " ", 1, 0, 0, -1, -1 },
    { "a\\tb", "a\tb", 3, 1, 1, -1, -1 },
    { "\\x41\\u00e9", "A\xc3""\xa9""", 3, 1, 1, -1, -1 },
    { "\\101", "A", 1, 1, 1, -1, -1 },
    { "\\0", "\0x", 2, 0, 1, -1, -1 },
    { "\\-\\[\\]\\(\\)\\{\\}\\*\\+\\?\\|\\^\\$", "-[](){}*+?|^$", 13, 1, 1, -1, -1 },
    { "\\bq\\b", "q", 1, 1, 1, -1, -1 },
    { "x\\b", "xy", 2, 0, 0, -1, -1 },
    { ".*\\bq_proj", "attn.q_proj", 11, 1, 1, -1, -1 },
    { ".*\\Bq_proj", "attnq_proj", 10, 1, 1, -1, -1 },
    { ".*\\Bq_proj", "attn.q_proj", 11, 0, 0, -1, -1 },
    { "\\Aab\\Z", "ab", 2, 1, 1, -1, -1 },
    { "ab\\Z", "ab\n", 3, 0, 0, -1, -1 },
    { "[abc]+", "cab", 3, 1, 1, -1, -1 },
    { "[abc]+", "cabd", 4, 0, 1, -1, -1 },
    { "[a-z_]+", "q_proj", 6, 1, 1, -1, -1 },
    { "[a-z_]+", "Q_proj", 6, 0, 0, -1, -1 },
    { "[^.]+", "layers", 6, 1, 1, -1, -1 },
    { "[^.]+", "layers.0", 8, 0, 1, -1, -1 },
    { "[\\d.]+", "0.1.2", 5, 1, 1, -1, -1 },
    { "[^\\d]+", "abc", 3, 1, 1, -1, -1 },
    { "[^\\d]+", "ab1", 3, 0, 1, -1, -1 },
    { "[\\w.]+", "model.layers.0", 14, 1, 1, -1, -1 },
    { "[\\W]", ".", 1, 1, 1, -1, -1 },
    { "[\\W]", "a", 1, 0, 0, -1, -1 },
    { "[]a]+", "]a]", 3, 1, 1, -1, -1 },
    { "[^]a]", "b", 1, 1, 1, -1, -1 },
    { "[^]a]", "]", 1, 0, 0, -1, -1 },
    { "[a-]+", "a-a", 3, 1, 1, -1, -1 },
    { "[-a]", "-", 1, 1, 1, -1, -1 },
    { "[\\]]", "]", 1, 1, 1, -1, -1 },
    { "[\\\\]", "\\", 1, 1, 1, -1, -1 },
    { "[.]", "x", 1, 0, 0, -1, -1 },
    { "[.]", ".", 1, 1, 1, -1, -1 },
    { "[a-cx-z]+", "abzy", 4, 1, 1, -1, -1 },
    { "[a-cx-z]", "d", 1, 0, 0, -1, -1 },
    { "[\xc3""\xa9""]", "\xc3""\xa9""", 2, 1, 1, -1, -1 },
    { "[^a]", "\xc3""\xa9""", 2, 1, 1, -1, -1 },
    { "[\xc3""\xa0""-\xc3""\xbf""]", "\xc3""\xa9""", 2, 1, 1, -1, -1 },
    { "^lin", "lin", 3, 1, 1, -1, -1 },
    { "a^b", "ab", 2, 0, 0, -1, -1 },
    { "lin$", "lin", 3, 1, 1, -1, -1 },
    { "lin$", "lin\n", 4, 0, 1, -1, -1 },
    { "lin$\n", "lin\n", 4, 1, 1, -1, -1 },
    { "lin$", "lin\n\n", 5, 0, 0, -1, -1 },
    { "(a|b$)c", "bc", 2, 0, 0, -1, -1 },
    { "(a)(b)", "ab", 2, 1, 1, 0, 1 },
    { "(?:ab)+", "abab", 4, 1, 1, -1, -1 },
    { "(?:ab)+", "aba", 3, 0, 1, -1, -1 },
    { "(a(b)?)+", "aab", 3, 1, 1, 1, 3 },
    { "()", "", 0, 1, 1, 0, 0 },
    { "(?:)", "", 0, 1, 1, -1, -1 },
    { "(?#comment)ab", "ab", 2, 1, 1, -1, -1 },
    { "a|b", "b", 1, 1, 1, -1, -1 },
    { "a|ab", "ab", 2, 1, 1, -1, -1 },
    { "(a|ab)(c|bcd)", "abcd", 4, 1, 1, 0, 1 },
    { "a||b", "", 0, 1, 1, -1, -1 },
    { "|a", "a", 1, 1, 1, -1, -1 },
    { "q_proj|k_proj|v_proj", "k_proj", 6, 1, 1, -1, -1 },
    { "(q|k|v)_proj", "v_proj", 6, 1, 1, 0, 1 },
    { "(q|k|v)_proj", "o_proj", 6, 0, 0, -1, -1 },
    { "a*", "aaa", 3, 1, 1, -1, -1 },
    { "a*", "", 0, 1, 1, -1, -1 },
    { "a+", "", 0, 0, 0, -1, -1 },
    { "a+", "aa", 2, 1, 1, -1, -1 },
    { "a?", "a", 1, 1, 1, -1, -1 },
    { "a?", "aa", 2, 0, 1, -1, -1 },
    { "a{2}", "aa", 2, 1, 1, -1, -1 },
    { "a{2}", "aaa", 3, 0, 1, -1, -1 },
    { "a{2,}", "aaaa", 4, 1, 1, -1, -1 },
    { "a{2,}", "a", 1, 0, 0, -1, -1 },
    { "a{,2}", "aa", 2, 1, 1, -1, -1 },
    { "a{,2}", "aaa", 3, 0, 1, -1, -1 },
    { "a{1,3}", "aaa", 3, 1, 1, -1, -1 },
    { "a{1,3}", "aaaa", 4, 0, 1, -1, -1 },
    { "a{0}", "", 0, 1, 1, -1, -1 },
    { "a{0}", "a", 1, 0, 1, -1, -1 },
    { "a{,}", "aaaa", 4, 1, 1, -1, -1 },
    { "a{}", "a{}", 3, 1, 1, -1, -1 },
    { "a{", "a{", 2, 1, 1, -1, -1 },
    { "a{x}", "a{x}", 4, 1, 1, -1, -1 },
    { "a{ 1}", "a{ 1}", 5, 1, 1, -1, -1 },
    { "{", "{", 1, 1, 1, -1, -1 },
    { "x{1", "x{1", 3, 1, 1, -1, -1 },
    { "(ab){2}", "abab", 4, 1, 1, 2, 4 },
    { "(ab){1,2}?", "ab", 2, 1, 1, 0, 2 },
    { "(a*)a", "aaa", 3, 1, 1, 0, 2 },
    { "(a*?)a", "aaa", 3, 1, 1, 0, 0 },
    { "(a+)", "aaa", 3, 1, 1, 0, 3 },
    { "(a+?)", "aaa", 3, 1, 1, 0, 1 },
    { "(a?)a", "aa", 2, 1, 1, 0, 1 },
    { "(a?\?)a", "aa", 2, 1, 1, 0, 0 },
    { "(a{1,3})", "aaaa", 4, 0, 1, 0, 3 },
    { "(a{1,3}?)", "aaaa", 4, 0, 1, 0, 1 },
    { "(.*)\\.", "a.b.c", 5, 0, 1, 0, 3 },
    { "(.*?)\\.", "a.b.c", 5, 0, 1, 0, 1 },
    { "(a{2,})", "aaaa", 4, 1, 1, 0, 4 },
    { "(a{2,}?)", "aaaa", 4, 1, 1, 0, 2 },
    { ".*\\.[^.]*\\.(\\d+)\\.", "model.layers.3.mlp.experts.7.w1", 31, 0, 1, 27, 28 },
    { ".*?\\.[^.]*\\.(\\d+)\\.", "model.layers.3.mlp.experts.7.w1", 31, 0, 1, 13, 14 },
    { ".*?\\.layers\\.(\\d+)\\.", "model.layers.12.self_attn.q_proj", 32, 0, 1, 13, 15 },
    { ".*?\\.h\\.(\\d+)\\.", "transformer.h.5.attn.c_attn", 27, 0, 1, 14, 15 },
    { "(a?\?|b){,2}c", "bc", 2, 1, 1, 1, 1 },
    { "(a?|b){2,3}c", "bc", 2, 1, 1, 0, 1 },
    { "(a|b|){1,3}?c", "abc", 3, 1, 1, 1, 2 },
    { "(a*){2}b", "aab", 3, 1, 1, 2, 2 },
    { "(a|)*", "aa", 2, 1, 1, 2, 2 },
    { "(a*)*", "aa", 2, 1, 1, 2, 2 },
    { "(a*)+", "aa", 2, 1, 1, 2, 2 },
    { "(a*)*b", "aab", 3, 1, 1, 2, 2 },
    { "(?:a|b)*?c", "abac", 4, 1, 1, -1, -1 },
    { "(a|b)*c", "abac", 4, 1, 1, 2, 3 },
    { "(.*\\.)?(lin)$", "b.a.lin", 7, 1, 1, 0, 4 },
    { "(.*\\.)?(a.lin)$", "b.a.lin", 7, 1, 1, 0, 2 },
    { "(.*\\.)?(^lin)$", "lin", 3, 1, 1, -1, -1 },
    { "(.*\\.)?(^lin)$", "a.lin", 5, 0, 0, -1, -1 },
    { "(.*\\.)?(b\\..*)$", "b.a.lin", 7, 1, 1, -1, -1 },
    { "(.*\\.)?(lin)$", "xlin", 4, 0, 0, -1, -1 },
    { "(^|.*\\.)lm_head($|\\..*)", "lm_head", 7, 1, 1, 0, 0 },
    { "(^|.*\\.)lm_head($|\\..*)", "model.lm_head.base", 18, 1, 1, 0, 6 },
    { "(^|.*\\.)lm_head($|\\..*)", "model.xlm_head", 14, 0, 0, -1, -1 },
    { "(^|.*\\.)score($|\\..*)", "score_x", 7, 0, 0, -1, -1 },
    { ".", "\xc3""\xa9""", 2, 1, 1, -1, -1 },
    { "..", "\xc3""\xa9""", 2, 0, 0, -1, -1 },
    { "\xc3""\xa9""+", "\xc3""\xa9""\xc3""\xa9""", 4, 1, 1, -1, -1 },
    { "a.b", "a\xe2""\x82""\xac""b", 5, 1, 1, -1, -1 },
    { "a.b", "a\xf0""\x9f""\x98""\x80""b", 6, 1, 1, -1, -1 },
    { "\\w", "\xc3""\xa9""", 2, 0, 0, -1, -1 },
    { "[^\\w]", "\xc3""\xa9""", 2, 1, 1, -1, -1 },

};

static lm_regex *rx_compile_ok(const char *pattern)
{
    lm_err err;
    lm_err_clear(&err);
    lm_regex *re = lm_regex_compile(pattern, &err);
    cr_assert_not_null(re, "pattern '%s' refused: %s: %s", pattern, err.kind, err.msg);
    cr_assert_eq(err.code, LM_OK);
    return re;
}

Test(pyregex, table_vs_python)
{
    for (size_t i = 0; i < sizeof rx_cases / sizeof rx_cases[0]; i++) {
        const rx_case *c = &rx_cases[i];
        lm_regex *re = rx_compile_ok(c->pattern);
        long spans[4];
        int full = lm_regex_exec(re, c->subject, c->n_bytes, 1, 0, NULL, 0);
        int match = lm_regex_exec(re, c->subject, c->n_bytes, 0, 0, spans, 4);
        cr_expect_eq(full, c->full, "fullmatch('%s', '%s') = %d, Python %d", c->pattern,
                     c->subject, full, c->full);
        cr_expect_eq(match, c->match, "match('%s', '%s') = %d, Python %d", c->pattern, c->subject,
                     match, c->match);
        if (match == 1 && c->match == 1) {
            cr_expect(spans[2] == c->g1_begin && spans[3] == c->g1_end,
                      "match('%s', '%s').span(1) = (%ld, %ld), Python (%ld, %ld)", c->pattern,
                      c->subject, spans[2], spans[3], c->g1_begin, c->g1_end);
        }
        /* the NUL-terminated entry points agree when the subject has no NUL */
        if (strlen(c->subject) == c->n_bytes) {
            long b = -7, e = -7;
            cr_expect_eq(lm_regex_fullmatch(re, c->subject), c->full, "fullmatch('%s')",
                         c->pattern);
            cr_expect_eq(lm_regex_match(re, c->subject, &b, &e), c->match, "match('%s')",
                         c->pattern);
            if (c->match)
                cr_expect(b == c->g1_begin && e == c->g1_end, "match('%s') g1", c->pattern);
            else
                cr_expect(b == -1 && e == -1, "no match leaves g1 at -1");
        }
        lm_regex_free(re);
    }
}

Test(pyregex, group0_span_and_groups)
{
    lm_regex *re = rx_compile_ok("(a)(?:b)(c)?");
    long spans[8];
    cr_assert_eq(lm_regex_n_groups(re), 2);
    cr_assert_eq(lm_regex_exec(re, "abx", 3, 0, 0, spans, 8), 1);
    cr_expect(spans[0] == 0 && spans[1] == 2);
    cr_expect(spans[2] == 0 && spans[3] == 1);
    cr_expect(spans[4] == -1 && spans[5] == -1, "group 2 did not participate");
    cr_expect(spans[6] == -1 && spans[7] == -1, "no group 3");
    long b = 5, e = 5;
    lm_regex *nog = rx_compile_ok("ab");
    cr_expect_eq(lm_regex_match(nog, "abc", &b, &e), 1);
    cr_expect(b == -1 && e == -1, "no group 1 -> -1");
    cr_expect_eq(lm_regex_match(nog, "abc", NULL, NULL), 1);
    lm_regex_free(nog);
    lm_regex_free(re);
}

Test(pyregex, dollar_before_final_newline)
{
    lm_regex *re = rx_compile_ok("lin$");
    cr_expect_eq(lm_regex_fullmatch(re, "lin"), 1);
    cr_expect_eq(lm_regex_match(re, "lin\n", NULL, NULL), 1, "$ matches before a final newline");
    cr_expect_eq(lm_regex_fullmatch(re, "lin\n"), 0, "but fullmatch must consume the newline");
    cr_expect_eq(lm_regex_match(re, "lin\n\n", NULL, NULL), 0);
    lm_regex_free(re);
    re = rx_compile_ok("lin\\Z");
    cr_expect_eq(lm_regex_match(re, "lin\n", NULL, NULL), 0, "\\Z is the very end");
    lm_regex_free(re);
}

Test(pyregex, utf8_and_invalid_bytes)
{
    /* '.' takes a whole code point, never half of one */
    lm_regex *re = rx_compile_ok("a.b");
    cr_expect_eq(lm_regex_fullmatch(re, "a\xc3\xa9" "b"), 1);
    cr_expect_eq(lm_regex_fullmatch(re, "a\xf0\x9f\x98\x80" "b"), 1);
    /* invalid UTF-8 bytes are single characters of their own, and never crash */
    cr_expect_eq(lm_regex_fullmatch(re, "a\xff" "b"), 1);
    cr_expect_eq(lm_regex_fullmatch(re, "a\xc3" "b"), 1, "truncated sequence: one byte");
    cr_expect_eq(lm_regex_fullmatch(re, "a\xe2\x82" "b"), 0, "two invalid bytes are two chars");
    lm_regex_free(re);
    re = rx_compile_ok("[^\xc3\xa9]+");
    cr_expect_eq(lm_regex_fullmatch(re, "abc"), 1);
    cr_expect_eq(lm_regex_fullmatch(re, "a\xc3\xa9"), 0);
    cr_expect_eq(lm_regex_fullmatch(re, "\xc3\xa8"), 1, "same lead byte, other char");
    lm_regex_free(re);
    re = rx_compile_ok("\xff+");
    cr_expect_eq(lm_regex_fullmatch(re, "\xff\xff"), 1);
    lm_regex_free(re);
    /* ASCII semantics of \w (as re.ASCII): a non-ASCII letter is not a word character */
    re = rx_compile_ok("\\w+");
    cr_expect_eq(lm_regex_fullmatch(re, "caf\xc3\xa9"), 0);
    lm_regex_free(re);
}

Test(pyregex, lazy_vs_greedy_layer_index)
{
    long b, e;
    const char *key = "model.layers.3.mlp.experts.7.w1";
    lm_regex *lazy = rx_compile_ok(".*?\\.[^.]*\\.(\\d+)\\.");
    lm_regex *greedy = rx_compile_ok(".*\\.[^.]*\\.(\\d+)\\.");
    cr_assert_eq(lm_regex_match(lazy, key, &b, &e), 1);
    cr_expect(b == 13 && e == 14, "lazy: first index (3), got %ld..%ld", b, e);
    cr_assert_eq(lm_regex_match(greedy, key, &b, &e), 1);
    cr_expect(b == 27 && e == 28, "greedy: last index (7), got %ld..%ld", b, e);
    lm_regex_free(lazy);
    lm_regex_free(greedy);
}

typedef struct rx_bad {
    const char *pattern;
    lm_code code;
    const char *kind;
    const char *needle;  /* substring the message must hold */
} rx_bad;

static const rx_bad rx_bad_cases[] = {
    { "(", LM_E_FORMAT, "InvalidRegex", "missing ), unterminated subpattern" },
    { "(a|b", LM_E_FORMAT, "InvalidRegex", "unterminated subpattern" },
    { ")", LM_E_FORMAT, "InvalidRegex", "unbalanced parenthesis" },
    { "a)", LM_E_FORMAT, "InvalidRegex", "unbalanced parenthesis" },
    { "[a-", LM_E_FORMAT, "InvalidRegex", "unterminated character set" },
    { "[]", LM_E_FORMAT, "InvalidRegex", "unterminated character set" },
    { "[z-a]", LM_E_FORMAT, "InvalidRegex", "bad character range z-a" },
    { "[a-\\d]", LM_E_FORMAT, "InvalidRegex", "bad character range" },
    { "*a", LM_E_FORMAT, "InvalidRegex", "nothing to repeat" },
    { "a|*b", LM_E_FORMAT, "InvalidRegex", "nothing to repeat" },
    { "(*)", LM_E_FORMAT, "InvalidRegex", "nothing to repeat" },
    { "^*", LM_E_FORMAT, "InvalidRegex", "nothing to repeat" },
    { "\\b+", LM_E_FORMAT, "InvalidRegex", "nothing to repeat" },
    { "{1}", LM_E_FORMAT, "InvalidRegex", "nothing to repeat" },
    { "a**", LM_E_FORMAT, "InvalidRegex", "multiple repeat" },
    { "a*??", LM_E_FORMAT, "InvalidRegex", "multiple repeat" },
    { "a{1,2}{3}", LM_E_FORMAT, "InvalidRegex", "multiple repeat" },
    { "a{2,1}", LM_E_FORMAT, "InvalidRegex", "min repeat greater than max repeat" },
    { "a{99999999999}", LM_E_FORMAT, "InvalidRegex", "too large" },
    { "\\q", LM_E_FORMAT, "InvalidRegex", "bad escape \\q" },
    { "\\", LM_E_FORMAT, "InvalidRegex", "bad escape (end of pattern)" },
    { "\\x4", LM_E_FORMAT, "InvalidRegex", "incomplete escape" },
    { "(?#abc", LM_E_FORMAT, "InvalidRegex", "unterminated comment" },
    { "(?", LM_E_FORMAT, "InvalidRegex", "unexpected end" },
    { "(?=a)b", LM_E_UNSUPPORTED, "UnsupportedRegex", "lookahead" },
    { "(?!a)b", LM_E_UNSUPPORTED, "UnsupportedRegex", "lookahead" },
    { "(?<=a)b", LM_E_UNSUPPORTED, "UnsupportedRegex", "lookbehind" },
    { "(?<!a)b", LM_E_UNSUPPORTED, "UnsupportedRegex", "lookbehind" },
    { "(a)\\1", LM_E_UNSUPPORTED, "UnsupportedRegex", "backreference" },
    { "(?P<name>a)", LM_E_UNSUPPORTED, "UnsupportedRegex", "named group" },
    { "(?P=name)", LM_E_UNSUPPORTED, "UnsupportedRegex", "named backreference" },
    { "(?i)q_proj", LM_E_UNSUPPORTED, "UnsupportedRegex", "inline flags" },
    { "(?s:a.)", LM_E_UNSUPPORTED, "UnsupportedRegex", "inline flags" },
    { "(?>a)", LM_E_UNSUPPORTED, "UnsupportedRegex", "atomic group" },
    { "a*+", LM_E_UNSUPPORTED, "UnsupportedRegex", "possessive" },
    { "\\N{DIGIT ONE}", LM_E_UNSUPPORTED, "UnsupportedRegex", "\\N{" },
    { "(?(1)a|b)", LM_E_UNSUPPORTED, "UnsupportedRegex", "conditional" },
    { "(?:a{1000}){1000}", LM_E_UNSUPPORTED, "UnsupportedRegex", "instructions" },
};

Test(pyregex, malformed_and_unsupported_refused)
{
    for (size_t i = 0; i < sizeof rx_bad_cases / sizeof rx_bad_cases[0]; i++) {
        const rx_bad *c = &rx_bad_cases[i];
        lm_err err;
        lm_err_clear(&err);
        lm_regex *re = lm_regex_compile(c->pattern, &err);
        cr_expect_null(re, "pattern '%s' accepted", c->pattern);
        lm_regex_free(re);
        cr_expect_eq(err.code, c->code, "'%s': code %d", c->pattern, (int)err.code);
        cr_expect_str_eq(err.kind, c->kind, "'%s'", c->pattern);
        cr_expect(strstr(err.msg, c->needle) != NULL, "'%s': message '%s' lacks '%s'", c->pattern,
                  err.msg, c->needle);
        cr_expect(strstr(err.msg, c->pattern) != NULL, "'%s': message '%s' lacks the pattern",
                  c->pattern, err.msg);
    }
    lm_err err;
    lm_err_clear(&err);
    cr_expect_null(lm_regex_compile(NULL, &err));
    cr_expect_neq(err.code, LM_OK);
    cr_expect_null(lm_regex_compile("(", NULL), "err may be NULL");
    lm_regex_free(NULL);
}

Test(pyregex, nesting_is_bounded)
{
    size_t depth = 5000;
    char *pat = malloc(2 * depth + 2);
    cr_assert_not_null(pat);
    memset(pat, '(', depth);
    pat[depth] = 'a';
    memset(pat + depth + 1, ')', depth);
    pat[2 * depth + 1] = '\0';
    lm_err err;
    lm_err_clear(&err);
    cr_expect_null(lm_regex_compile(pat, &err));
    cr_expect_str_eq(err.kind, "UnsupportedRegex");
    free(pat);
    lm_regex *re = rx_compile_ok("((((((((((((((((((((a))))))))))))))))))))");
    cr_expect_eq(lm_regex_fullmatch(re, "a"), 1);
    lm_regex_free(re);
}

static double rx_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static char *rx_repeat(char ch, size_t n, const char *tail)
{
    char *s = malloc(n + strlen(tail) + 1);
    cr_assert_not_null(s);
    memset(s, ch, n);
    strcpy(s + n, tail);
    return s;
}

Test(pyregex, hostile_patterns_finish)
{
    /* Python's own backtracking needs ~2^40 steps for the first one; here every call must
     * answer (0, or -1 for a budget overrun) well within a second even under sanitizers */
    static const struct {
        const char *pattern;
        size_t n;
        char ch;
        const char *tail;
        int want;
    } h[] = {
        { "(a*)*b", 40, 'a', "", 0 },
        { "(a|a)*b", 40, 'a', "", 0 },
        { "(a|aa)*b", 4096, 'a', "", 0 },
        { "((a*)*)*b", 4096, 'a', "", 0 },
        { "(a+)+b", 4096, 'a', "", 0 },
        { ".*.*.*x", 4096, 'a', "", 0 },
        { ".*.*.*x", 4096, 'a', "x", 1 },
        { "(.*)*x", 4096, 'a', "", 0 },
        { "(?:a{1,100}){1,100}b", 200, 'a', "", 0 },
        { "(x+x+)+y", 4096, 'x', "", 0 },
        { "(.*\\.)?(.*.*.*)$", 4096, '.', "", 1 },
    };
    for (size_t i = 0; i < sizeof h / sizeof h[0]; i++) {
        lm_regex *re = rx_compile_ok(h[i].pattern);
        char *s = rx_repeat(h[i].ch, h[i].n, h[i].tail);
        double t0 = rx_seconds();
        int rc = lm_regex_fullmatch(re, s);
        double dt = rx_seconds() - t0;
        cr_expect(rc == h[i].want || rc == -1, "'%s' on %zu chars: %d", h[i].pattern, h[i].n, rc);
        cr_expect(dt < 2.0, "'%s' took %.2f s", h[i].pattern, dt);
        /* what this implementation guarantees: memoisation answers these exactly */
        cr_expect_eq(rc, h[i].want, "'%s': %d", h[i].pattern, rc);
        free(s);
        lm_regex_free(re);
    }
}

Test(pyregex, step_budget_reports_minus_one)
{
    lm_regex *re = rx_compile_ok(".*.*.*x");
    char *s = rx_repeat('a', 4096, "");
    cr_expect_eq(lm_regex_exec(re, s, strlen(s), 1, 1000, NULL, 0), -1, "tiny budget overrun");
    cr_expect_eq(lm_regex_exec(re, s, strlen(s), 1, 0, NULL, 0), 0, "default budget suffices");
    free(s);
    lm_regex_free(re);
}

Test(pyregex, long_subject_without_memo_table)
{
    /* a program of ~60k instructions times a 5k subject exceeds the memo table cap: the matcher
     * runs without it, iteratively, under the step budget */
    lm_regex *re = rx_compile_ok("(?:ab){30000}");
    size_t n = 6000;
    char *s = malloc(n + 1);
    cr_assert_not_null(s);
    for (size_t i = 0; i < n; i++)
        s[i] = (char)(i % 2 ? 'b' : 'a');
    s[n] = '\0';
    cr_expect_eq(lm_regex_fullmatch(re, s), 0);
    free(s);
    lm_regex_free(re);
    /* there, a hostile branch is stopped by the budget instead */
    re = rx_compile_ok("(?:c{60000}|(a*)*b)");
    s = rx_repeat('a', 5000, "");
    int rc = lm_regex_fullmatch(re, s);
    cr_expect(rc == 0 || rc == -1, "%d", rc);
    cr_expect_eq(lm_regex_exec(re, s, 5000, 1, 100000, NULL, 0), -1, "small budget overrun");
    free(s);
    lm_regex_free(re);
}

Test(pyregex, random_patterns_never_crash)
{
    /* garbage patterns from a fixed seed: each is compiled or refused, and matched if compiled */
    static const char alphabet[] = "ab.\\()[]{}^$|*+?-,0123:=!<>#P dwsDWSbBAZxu9\xc3\xa9\xff";
    unsigned long seed = 12345;
    for (int iter = 0; iter < 20000; iter++) {
        char pat[16];
        seed = seed * 6364136223846793005UL + 1442695040888963407UL;
        size_t n = 1 + (seed >> 60) % 12;
        for (size_t i = 0; i < n; i++) {
            seed = seed * 6364136223846793005UL + 1442695040888963407UL;
            pat[i] = alphabet[(seed >> 33) % (sizeof alphabet - 1)];
        }
        pat[n] = '\0';
        lm_err err;
        lm_err_clear(&err);
        lm_regex *re = lm_regex_compile(pat, &err);
        if (re == NULL) {
            cr_assert(err.code == LM_E_FORMAT || err.code == LM_E_UNSUPPORTED, "'%s': %s", pat,
                      err.msg);
            cr_assert(err.msg[0] != '\0');
            continue;
        }
        int rc = lm_regex_fullmatch(re, "ab.a-b{1}\xc3\xa9");
        cr_assert(rc >= -1 && rc <= 1);
        rc = lm_regex_match(re, "", NULL, NULL);
        cr_assert(rc >= -1 && rc <= 1);
        lm_regex_free(re);
    }
}
