/* SPDX-License-Identifier: MIT */
/* pyregex.h : a small matcher for the subset of Python `re` syntax found in adapter configs.
 * Supported: literals, `.`, escapes (\d \D \w \W \s \S \b \B \A \Z, \n \t \r \f \v \a, \xhh,
 * \uhhhh, \Uhhhhhhhh, octal, escaped punctuation), classes `[...]` (ranges, negation, escapes),
 * `^` `$` (Python's: `$` also matches before a final newline), `( )`, `(?: )`, `(?#...)`, `|`,
 * `* + ? {m} {m,} {,n} {m,n}` greedy and lazy.  Refused with LM_E_UNSUPPORTED ("UnsupportedRegex"):
 * lookaround, backreferences, named groups, inline flags, atomic groups, possessive quantifiers,
 * conditionals, \N{...}.  Malformed patterns: LM_E_FORMAT ("InvalidRegex"), Python's message.
 *
 * Semantics: the pattern and the subject are UTF-8, matched code point by code point (an invalid
 * byte counts as one code point of its own), as a Python str pattern without flags, except that
 * \d \w \s and \b are ASCII-only (as with re.ASCII), and \B never matches an empty subject
 * (Python < 3.14).  Spans are byte offsets.  Matching is backtracking in Python's priority order
 * with sre's rule that an optional iteration matching empty ends a repeat, so group spans agree
 * with Python.  Branch points already explored without success are memoised, so the work stays
 * polynomial (about program size x subject length in practice).  A step budget and caps on the
 * backtracking stack (4 Mi entries) and the memo table (32 MiB; beyond it, no memo) bound time
 * and memory; nothing recurses per subject character.  No global state: a compiled regex is
 * immutable and may be shared between threads. */
#ifndef LM_PYREGEX_H
#define LM_PYREGEX_H

#include "lora_merge.h"

/* Default step budget of lm_regex_fullmatch() / lm_regex_match(). */
#define LM_REGEX_MAX_STEPS 10000000UL

typedef struct lm_regex lm_regex;

/*! lm_regex_compile() :
 *  Parses pattern (NUL-terminated) and compiles it.
 *  @return the regex, or NULL with *err filled: LM_E_FORMAT kind "InvalidRegex" for a malformed
 *  pattern, LM_E_UNSUPPORTED kind "UnsupportedRegex" for valid Python syntax this matcher does
 *  not implement, LM_E_NOMEM.  The message names the problem, its position and the pattern.
 *  Ownership: free with lm_regex_free(); pattern is not retained. */
lm_regex *lm_regex_compile(const char *pattern, lm_err *err);

/*! lm_regex_free() : NULL is a no-op. */
void lm_regex_free(lm_regex *re);

/*! lm_regex_n_groups() : number of capturing groups. */
size_t lm_regex_n_groups(const lm_regex *re);

/*! lm_regex_fullmatch() : Python re.fullmatch(pattern, s).
 *  @return 1 match, 0 no match, -1 step budget or stack cap exceeded, or out of memory (treat
 *  as an error). */
int lm_regex_fullmatch(const lm_regex *re, const char *s);

/*! lm_regex_match() : Python re.match(pattern, s): anchored at the start, not at the end.
 *  On a match, when g1_begin != NULL, *g1_begin / *g1_end receive the byte span of group 1
 *  (-1 / -1 if group 1 did not participate or does not exist).  g1_end may be NULL.
 *  @return 1 match, 0 no match, -1 step budget or stack cap exceeded, or out of memory. */
int lm_regex_match(const lm_regex *re, const char *s, long *g1_begin, long *g1_end);

/*! lm_regex_exec() : the general form.  Matches the first n_bytes of s (NUL bytes allowed),
 *  anchored at the start, and also at the end when full != 0.  On a match, spans[2*i] and
 *  spans[2*i+1] receive the byte span of group i (group 0: the whole match) for
 *  2*i+1 < n_spans, -1 for a group that did not participate.  spans may be NULL.
 *  max_steps: work budget (0 means LM_REGEX_MAX_STEPS).
 *  @return 1 match, 0 no match, -1 step budget or stack cap exceeded, or out of memory. */
int lm_regex_exec(const lm_regex *re, const char *s, size_t n_bytes, int full,
                  unsigned long max_steps, long *spans, size_t n_spans);

#endif
