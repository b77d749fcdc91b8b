/* SPDX-License-Identifier: MIT */
/* peft_match.h : PEFT's module-matching rules as pure functions on strings (peft-merge.md §3.3,
 * §3.4): which rank_pattern / alpha_pattern key applies to a module (get_pattern_key), and whether
 * PEFT adapts a module at all (check_target_module_exists).  Regexes are Python `re` syntax,
 * run by pyregex.  Module paths are relative to the model ("model.layers.0.self_attn.q_proj"),
 * without "base_model.model.".  Nothing here reads files or knows module types. */
#ifndef LM_PEFT_MATCH_H
#define LM_PEFT_MATCH_H

#include "lora_merge.h"

/*! lm_pattern_lookup() : §3.3.
 *  keys in file order; the first key P such that re.match(r"(.*\.)?(" P r")$", module) matches
 *  wins (P is used raw: its dots are wildcards).
 *  @return index of the winning key, -1 if none, -2 on error with *err filled: a key that is not
 *  a valid (or supported) regex, named in the message, or the step budget exceeded. */
long lm_pattern_lookup(const char *const *keys, size_t n_keys, const char *module, lm_err *err);

/* The same with the keys compiled once, for looking up many modules.  create: NULL with *err
 * (a bad key, named); lookup: as lm_pattern_lookup(); free(NULL) is a no-op. */
typedef struct lm_pattern_set lm_pattern_set;
lm_pattern_set *lm_pattern_set_create(const char *const *keys, size_t n_keys, lm_err *err);
long lm_pattern_set_lookup(const lm_pattern_set *s, const char *module, lm_err *err);
void lm_pattern_set_free(lm_pattern_set *s);

typedef struct lm_target_rules {
    /* target_modules: a regex string (target_is_regex = 1, full match) or a list of names;
     * "all-linear" is reported as all_linear = 1.  has_target = 0: no target_modules (null), so
     * no module is adapted. */
    int has_target;
    int target_is_regex;
    const char *target_regex;
    const char *const *target_list;
    size_t n_target;
    int all_linear;
    /* exclude_modules: a regex string (full match) or a list of names; NULL / 0 for none */
    int exclude_is_regex;
    const char *exclude_regex;
    const char *const *exclude_list;
    size_t n_exclude;
    const char *const *modules_to_save;
    size_t n_modules_to_save;
    const long *layers_to_transform;   /* an int in the config is a list of one */
    size_t n_layers;                   /* 0: no layer filter */
    const char *const *layers_pattern; /* a string in the config is a list of one */
    size_t n_layers_pattern;           /* 0: none */
} lm_target_rules;

/*! lm_target_matches() : §3.4, would PEFT adapt the module at path `module`?  In order:
 *   1. exclude_modules: regex full match, or list entry equal to module / a dotted suffix of it;
 *   2. modules_to_save: excluded if re.match(r"(^|.*\.)" m r"($|\..*)", module) for an entry m
 *      (m used raw);
 *   3. target regex: re.fullmatch;
 *   4. target list: module equal to an entry -> adapted, layer filter NOT applied; module ending
 *      in "." + entry -> adapted if the layer filter (when n_layers > 0) passes.  The layer index
 *      is group 1 of re.match(r".*?\.[^.]*\.(\d+)\.", module) (lazy, PEFT >= 0.20), or with
 *      layers_pattern the first of r".*?\." p r"\.(\d+)\." that matches; no index -> not adapted.
 *   all_linear = 1: PEFT expands "all-linear" from module types, which a string cannot tell, so
 *   every module counts as a suffix match (callers pass the modules present in the adapter file);
 *   the exclusions and the layer filter still apply.
 *  A regex target_modules together with layers_to_transform or layers_pattern is refused, as
 *  PEFT's LoraConfig refuses it.
 *  @return 1 adapted, 0 not, -1 error with *err filled (bad regex, naming the field and entry;
 *  step budget exceeded; invalid rules). */
int lm_target_matches(const lm_target_rules *rules, const char *module, lm_err *err);

/* The same with the regexes compiled once, for checking many modules. */
typedef struct lm_target_matcher lm_target_matcher;

/*! lm_target_matcher_create() : validates rules and compiles every regex they imply.
 *  @return the matcher, or NULL with *err filled.
 *  Ownership: free with lm_target_matcher_free() (NULL ok).  The matcher borrows the arrays and
 *  strings of `rules` (not the struct itself), which must outlive it. */
lm_target_matcher *lm_target_matcher_create(const lm_target_rules *rules, lm_err *err);
void lm_target_matcher_free(lm_target_matcher *m);
/*! lm_target_matcher_test() : as lm_target_matches().  Safe to call from several threads. */
int lm_target_matcher_test(const lm_target_matcher *m, const char *module, lm_err *err);

#endif
