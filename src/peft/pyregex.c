/* SPDX-License-Identifier: MIT */
/* pyregex.c : Python-`re`-compatible backtracking matcher (see pyregex.h for the subset).
 * Pattern -> syntax tree (recursive descent, nesting bounded) -> program for a backtracking VM
 * (SPLIT/JMP/SAVE/MARK/CHECK, counted repeats expanded, program size bounded).  The VM runs with
 * an explicit stack, never recursion.  An optional iteration that matched the empty string ends
 * its repeat, as in sre's MAX_UNTIL: loops always progress and Python's group spans come out.
 * Pruning: a (SPLIT, position) state whose whole subtree failed is not explored again.  Captures
 * cannot change an outcome (no backreferences); a loop mark can, but only by ending a loop where
 * an earlier visit continued it, which gives a subset of that visit's paths.  States still being
 * explored are never pruned, so priority order, hence captures, is Python's.  The differential
 * check against Python's re that this was developed with covered ~100k random pattern/subject
 * pairs with and without the memo table. */
#include "pyregex.h"

#include "lm_error.h"

#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NESTING 200        /* groups nested deeper than this are refused */
#define MAX_INSTS 100000       /* program size after expanding counted repeats */
#define MAX_REPEAT_PY 4294967295ULL  /* Python's MAXREPEAT: counts >= this are invalid */
#define MEMO_MAX_BITS (1UL << 28)    /* visited bitmap cap (32 MiB); beyond it, budget only */
#define MAX_STACK_JOBS (1UL << 22)   /* 4 Mi jobs (64 MiB): beyond it, like a budget overrun */
#define INF_REPEAT (-1L)

/* ---------------------------------------------------------------------------------------------
 * UTF-8
 * ------------------------------------------------------------------------------------------- */

/* Decodes one code point from p[0..avail).  An invalid or truncated sequence yields its first
 * byte b as U+DC00+b (Python's surrogateescape), one byte long.  @return bytes consumed (>= 1). */
static size_t utf8_decode(const unsigned char *p, size_t avail, uint32_t *cp)
{
    unsigned char b = p[0];
    size_t n;
    uint32_t v, min;
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    if (b >= 0xC2 && b <= 0xDF) {
        n = 2; v = b & 0x1Fu; min = 0x80;
    } else if (b >= 0xE0 && b <= 0xEF) {
        n = 3; v = b & 0x0Fu; min = 0x800;
    } else if (b >= 0xF0 && b <= 0xF4) {
        n = 4; v = b & 0x07u; min = 0x10000;
    } else {
        goto invalid;
    }
    if (avail < n)
        goto invalid;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0u) != 0x80u)
            goto invalid;
        v = (v << 6) | (p[i] & 0x3Fu);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        goto invalid;
    *cp = v;
    return n;
invalid:
    *cp = 0xDC00u + b;
    return 1;
}

static int is_word_cp(uint32_t c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static int is_digit_cp(uint32_t c) { return c >= '0' && c <= '9'; }

static int is_space_cp(uint32_t c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* ---------------------------------------------------------------------------------------------
 * Compiled form
 * ------------------------------------------------------------------------------------------- */

enum { SH_NONE = 0, SH_DIGIT, SH_WORD, SH_SPACE };    /* shorthand classes \d \w \s */

typedef struct class_item {
    uint32_t lo, hi;  /* code point range, when shorthand == SH_NONE */
    int shorthand;    /* SH_* */
    int negated;      /* for a shorthand: \D \W \S */
} class_item;

typedef struct char_class {
    size_t first, n_items;  /* into lm_regex.items */
    int negated;            /* [^...] */
} char_class;

enum { AS_BEGIN, AS_END_PY, AS_END_TEXT, AS_WORDB, AS_NOT_WORDB };  /* ^/\A, $, \Z, \b, \B */

enum {
    I_CHAR,   /* x: code point */
    I_ANY,    /* any code point but '\n' */
    I_CLASS,  /* x: class index */
    I_SPLIT,  /* try x, then y */
    I_JMP,    /* x */
    I_SAVE,   /* x: slot <- position */
    I_ASSERT, /* x: AS_* */
    I_MARK,   /* x: loop register <- position (start of an iteration) */
    I_CHECK,  /* x: loop register; y: loop exit.  Empty iteration -> go to y, else fall through */
    I_MATCH
};

typedef struct inst {
    int op;
    uint32_t x, y;
} inst;

struct lm_regex {
    inst *prog;            /* owned */
    size_t n_insts;
    char_class *classes;   /* owned */
    size_t n_classes;
    class_item *items;     /* owned */
    size_t n_items;
    size_t n_groups;       /* capturing groups, not counting group 0 */
    size_t n_loop_regs;
};

/* ---------------------------------------------------------------------------------------------
 * Syntax tree
 * ------------------------------------------------------------------------------------------- */

enum { N_EMPTY, N_CHAR, N_ANY, N_CLASS, N_ASSERT, N_CAT, N_ALT, N_GROUP, N_REPEAT };

typedef struct node {
    int type;
    uint32_t arg;          /* N_CHAR: code point; N_CLASS: index; N_ASSERT: AS_*; N_GROUP: number */
    long min, max;         /* N_REPEAT; max == INF_REPEAT for no bound */
    int greedy;            /* N_REPEAT */
    long child, last;      /* first and last child (N_CAT, N_ALT, N_GROUP, N_REPEAT), -1 if none */
    long next;             /* next sibling, -1 if none */
} node;

typedef struct parser {
    const char *pat;
    size_t n_bytes, pos;
    lm_err *err;
    node *nodes;
    size_t n_nodes, cap_nodes;
    char_class *classes;
    size_t n_classes, cap_classes;
    class_item *items;
    size_t n_items, cap_items;
    size_t n_groups;
    int depth;
    int oom;
} parser;

#define NOTHING (-2L)  /* parse_atom(): a comment group, nothing to add */

static void *grow(void *arr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return arr;
    size_t ncap = *cap ? *cap * 2 : 16;
    while (ncap < need)
        ncap *= 2;
    void *p = realloc(arr, ncap * elem);
    if (p != NULL)
        *cap = ncap;
    return p;
}

/* character index of byte offset `at` (Python reports positions in characters) */
static size_t char_index(const parser *p, size_t at)
{
    size_t k = 0;
    for (size_t i = 0; i < at && i < p->n_bytes; i++)
        if (((unsigned char)p->pat[i] & 0xC0u) != 0x80u)
            k++;
    return k;
}

static long perr(parser *p, lm_code code, size_t at, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static long perr(parser *p, lm_code code, size_t at, const char *fmt, ...)
{
    char what[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    const char *kind = code == LM_E_UNSUPPORTED ? "UnsupportedRegex" : "InvalidRegex";
    int show = p->n_bytes > 120 ? 120 : (int)p->n_bytes;
    lm_fail(p->err, code, kind, "%s at position %zu in pattern '%.*s'%s", what, char_index(p, at),
            show, p->pat, p->n_bytes > 120 ? "..." : "");
    return -1;
}

static long oom(parser *p)
{
    p->oom = 1;
    lm_fail(p->err, LM_E_NOMEM, NULL, "out of memory compiling a regex");
    return -1;
}

static long new_node(parser *p, int type)
{
    node *nn = grow(p->nodes, &p->cap_nodes, p->n_nodes + 1, sizeof *nn);
    if (nn == NULL)
        return oom(p);
    p->nodes = nn;
    node *x = &p->nodes[p->n_nodes];
    memset(x, 0, sizeof *x);
    x->type = type;
    x->child = x->last = x->next = -1;
    return (long)p->n_nodes++;
}

static void add_child(parser *p, long parent, long child)
{
    node *par = &p->nodes[parent];
    if (par->last < 0)
        par->child = child;
    else
        p->nodes[par->last].next = child;
    par->last = child;
}

static int peek(const parser *p)
{
    return p->pos < p->n_bytes ? (unsigned char)p->pat[p->pos] : -1;
}

static int peek_at(const parser *p, size_t k)
{
    return p->pos + k < p->n_bytes ? (unsigned char)p->pat[p->pos + k] : -1;
}

static uint32_t take_cp(parser *p)
{
    uint32_t cp;
    p->pos += utf8_decode((const unsigned char *)p->pat + p->pos, p->n_bytes - p->pos, &cp);
    return cp;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int is_octal(int c) { return c >= '0' && c <= '7'; }

static int is_ascii_alnum(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* Result of an escape: a literal, a shorthand class or (outside classes) an assertion. */
typedef struct escape {
    int kind;          /* 0 literal, 1 shorthand, 2 assertion */
    uint32_t cp;       /* literal */
    int shorthand, negated;
    int assertion;     /* AS_* */
} escape;

/* p->pos is on the backslash.  @return 0, or -1 with the error recorded. */
static int parse_escape(parser *p, int in_class, escape *e)
{
    size_t at = p->pos;
    memset(e, 0, sizeof *e);
    p->pos++;
    int c = peek(p);
    if (c < 0)
        return (int)perr(p, LM_E_FORMAT, at, "bad escape (end of pattern)");
    switch (c) {
    case 'd': case 'D': case 'w': case 'W': case 's': case 'S':
        p->pos++;
        e->kind = 1;
        e->shorthand = (c == 'd' || c == 'D')   ? SH_DIGIT
                       : (c == 'w' || c == 'W') ? SH_WORD
                                                : SH_SPACE;
        e->negated = c == 'D' || c == 'W' || c == 'S';
        return 0;
    case 'n': p->pos++; e->cp = '\n'; return 0;
    case 't': p->pos++; e->cp = '\t'; return 0;
    case 'r': p->pos++; e->cp = '\r'; return 0;
    case 'f': p->pos++; e->cp = '\f'; return 0;
    case 'v': p->pos++; e->cp = '\v'; return 0;
    case 'a': p->pos++; e->cp = '\a'; return 0;
    case 'b':
        p->pos++;
        if (in_class) {
            e->cp = '\b';
        } else {
            e->kind = 2;
            e->assertion = AS_WORDB;
        }
        return 0;
    case 'B': case 'A': case 'Z':
        if (in_class)
            return (int)perr(p, LM_E_FORMAT, at, "bad escape \\%c", c);
        p->pos++;
        e->kind = 2;
        e->assertion = c == 'B' ? AS_NOT_WORDB : c == 'A' ? AS_BEGIN : AS_END_TEXT;
        return 0;
    case 'x': case 'u': case 'U': {
        size_t n_digits = c == 'x' ? 2 : c == 'u' ? 4 : 8;
        uint32_t v = 0;
        p->pos++;
        for (size_t i = 0; i < n_digits; i++) {
            int h = hexval(peek(p));
            if (h < 0)
                return (int)perr(p, LM_E_FORMAT, at, "incomplete escape \\%c", c);
            v = v * 16u + (uint32_t)h;
            p->pos++;
        }
        if (v > 0x10FFFF)
            return (int)perr(p, LM_E_FORMAT, at, "bad escape \\%c (beyond U+10FFFF)", c);
        e->cp = v;
        return 0;
    }
    case 'N':
        return (int)perr(p, LM_E_UNSUPPORTED, at,
                         "named character escape \\N{...} is not supported");
    default:
        break;
    }
    if (c >= '0' && c <= '9') {
        /* octal: \0, \0o, \0oo; or three octal digits; else (outside a class) a group reference */
        if (c == '0' || (is_octal(c) && is_octal(peek_at(p, 1)) && is_octal(peek_at(p, 2)))
            || (in_class && is_octal(c))) {
            uint32_t v = 0;
            size_t k = 0;
            while (k < 3 && is_octal(peek(p))) {
                v = v * 8u + (uint32_t)(peek(p) - '0');
                p->pos++;
                k++;
            }
            if (v > 0377)
                return (int)perr(p, LM_E_FORMAT, at,
                                 "octal escape value \\%o outside of range 0-0o377", v);
            e->cp = v;
            return 0;
        }
        if (in_class)
            return (int)perr(p, LM_E_FORMAT, at, "bad escape \\%c", c);
        return (int)perr(p, LM_E_UNSUPPORTED, at, "backreference \\%c is not supported", c);
    }
    if (c < 0x80 && is_ascii_alnum(c))
        return (int)perr(p, LM_E_FORMAT, at, "bad escape \\%c", c);
    e->cp = take_cp(p);  /* escaped punctuation or non-ASCII: itself */
    return 0;
}

static long add_class_item(parser *p, class_item it)
{
    class_item *ni = grow(p->items, &p->cap_items, p->n_items + 1, sizeof *ni);
    if (ni == NULL)
        return oom(p);
    p->items = ni;
    p->items[p->n_items++] = it;
    return 0;
}

/* p->pos is on '['. */
static long parse_class(parser *p)
{
    size_t start = p->pos;
    char_class cc = { p->n_items, 0, 0 };
    p->pos++;
    if (peek(p) == '^') {
        cc.negated = 1;
        p->pos++;
    }
    int first = 1;
    for (;;) {
        int c = peek(p);
        if (c < 0)
            return perr(p, LM_E_FORMAT, start, "unterminated character set");
        if (c == ']' && !first) {
            p->pos++;
            break;
        }
        first = 0;
        size_t item_at = p->pos;
        class_item it = { 0, 0, SH_NONE, 0 };
        escape e;
        if (c == '\\') {
            if (parse_escape(p, 1, &e) < 0)
                return -1;
            if (e.kind == 1) {
                it.shorthand = e.shorthand;
                it.negated = e.negated;
            } else {
                it.lo = it.hi = e.cp;
            }
        } else {
            it.lo = it.hi = take_cp(p);
        }
        if (peek(p) == '-' && peek_at(p, 1) >= 0 && peek_at(p, 1) != ']') {
            p->pos++;
            uint32_t hi;
            int hi_is_class = 0;
            if (peek(p) == '\\') {
                if (parse_escape(p, 1, &e) < 0)
                    return -1;
                hi_is_class = e.kind == 1;
                hi = e.cp;
            } else {
                hi = take_cp(p);
            }
            if (it.shorthand != SH_NONE || hi_is_class || hi < it.lo)
                return perr(p, LM_E_FORMAT, item_at, "bad character range %.*s",
                            (int)(p->pos - item_at), p->pat + item_at);
            it.hi = hi;
        }
        if (add_class_item(p, it) < 0)
            return -1;
    }
    cc.n_items = p->n_items - cc.first;
    char_class *nc = grow(p->classes, &p->cap_classes, p->n_classes + 1, sizeof *nc);
    if (nc == NULL)
        return oom(p);
    p->classes = nc;
    p->classes[p->n_classes] = cc;
    long n = new_node(p, N_CLASS);
    if (n < 0)
        return -1;
    p->nodes[n].arg = (uint32_t)p->n_classes++;
    return n;
}

/* Tries to read a {m}, {m,}, {,n}, {m,n}, {,} quantifier at p->pos (on '{').  Anything else is a
 * literal '{' in Python.  @return 1 (p->pos moved past '}'), 0 (not a quantifier), -1 error. */
static int parse_brace(parser *p, long *min, long *max)
{
    size_t at = p->pos, i = p->pos + 1;
    unsigned long long lo = 0, hi = 0;
    int has_lo = 0, has_hi = 0, comma = 0;
    if (i < p->n_bytes && p->pat[i] == '}')
        return 0;
    while (i < p->n_bytes && p->pat[i] >= '0' && p->pat[i] <= '9') {
        if (lo < MAX_REPEAT_PY)
            lo = lo * 10 + (unsigned)(p->pat[i] - '0');
        has_lo = 1;
        i++;
    }
    if (i < p->n_bytes && p->pat[i] == ',') {
        comma = 1;
        i++;
        while (i < p->n_bytes && p->pat[i] >= '0' && p->pat[i] <= '9') {
            if (hi < MAX_REPEAT_PY)
                hi = hi * 10 + (unsigned)(p->pat[i] - '0');
            has_hi = 1;
            i++;
        }
    }
    if (i >= p->n_bytes || p->pat[i] != '}')
        return 0;
    if (!comma) {
        hi = lo;
        has_hi = has_lo;
    }
    if ((has_lo && lo >= MAX_REPEAT_PY) || (has_hi && hi >= MAX_REPEAT_PY))
        return (int)perr(p, LM_E_FORMAT, at, "the repetition number is too large");
    if (has_hi && hi < lo)
        return (int)perr(p, LM_E_FORMAT, at, "min repeat greater than max repeat");
    if ((has_lo && lo > MAX_INSTS) || (has_hi && hi > MAX_INSTS))
        return (int)perr(p, LM_E_UNSUPPORTED, at, "repetition count above %d is not supported",
                         MAX_INSTS);
    *min = has_lo ? (long)lo : 0;
    *max = has_hi ? (long)hi : INF_REPEAT;
    p->pos = i + 1;
    return 1;
}

/* Is there a quantifier at p->pos?  Does not move (a brace is probed on a copy). */
static int quantifier_ahead(parser *p)
{
    int c = peek(p);
    if (c == '*' || c == '+' || c == '?')
        return 1;
    if (c != '{')
        return 0;
    size_t save = p->pos;
    long a, b;
    lm_err *keep = p->err;
    p->err = NULL;  /* a malformed count is reported when it is parsed for real */
    int r = parse_brace(p, &a, &b);
    p->err = keep;
    p->pos = save;
    return r != 0;
}

static long parse_alt(parser *p);

static long parse_group(parser *p)
{
    size_t at = p->pos;
    long g = -1;
    p->pos++;  /* '(' */
    if (peek(p) == '?') {
        int c = peek_at(p, 1);
        switch (c) {
        case ':':
            p->pos += 2;
            break;
        case '#':
            while (p->pos < p->n_bytes && p->pat[p->pos] != ')')
                p->pos++;
            if (p->pos >= p->n_bytes)
                return perr(p, LM_E_FORMAT, at, "missing ), unterminated comment");
            p->pos++;
            return NOTHING;
        case 'P':
            if (peek_at(p, 2) == '=')
                return perr(p, LM_E_UNSUPPORTED, at,
                            "named backreference (?P=...) is not supported");
            return perr(p, LM_E_UNSUPPORTED, at, "named group (?P<...>...) is not supported");
        case '=':
        case '!':
            return perr(p, LM_E_UNSUPPORTED, at, "lookahead (?%c...) is not supported", c);
        case '<':
            if (peek_at(p, 2) == '=' || peek_at(p, 2) == '!')
                return perr(p, LM_E_UNSUPPORTED, at, "lookbehind (?<%c...) is not supported",
                            peek_at(p, 2));
            return perr(p, LM_E_UNSUPPORTED, at, "named group (?<...>...) is not supported");
        case '>':
            return perr(p, LM_E_UNSUPPORTED, at, "atomic group (?>...) is not supported");
        case '(':
            return perr(p, LM_E_UNSUPPORTED, at, "conditional group (?(...)...) is not supported");
        default:
            if (c >= 0 && strchr("aiLmsux-", c) != NULL)
                return perr(p, LM_E_UNSUPPORTED, at, "inline flags (?%c...) are not supported", c);
            if (c < 0)
                return perr(p, LM_E_FORMAT, at, "unexpected end of pattern");
            return perr(p, LM_E_FORMAT, at, "unknown extension ?%c", c);
        }
    } else {
        g = (long)++p->n_groups;
    }
    if (++p->depth > MAX_NESTING)
        return perr(p, LM_E_UNSUPPORTED, at, "groups nested deeper than %d are not supported",
                    MAX_NESTING);
    long inner = parse_alt(p);
    p->depth--;
    if (inner < 0)
        return -1;
    if (peek(p) != ')')
        return perr(p, LM_E_FORMAT, at, "missing ), unterminated subpattern");
    p->pos++;
    if (g < 0)
        return inner;
    long n = new_node(p, N_GROUP);
    if (n < 0)
        return -1;
    p->nodes[n].arg = (uint32_t)g;
    add_child(p, n, inner);
    return n;
}

static long parse_atom(parser *p)
{
    size_t at = p->pos;
    int c = peek(p);
    long n;
    switch (c) {
    case '(':
        return parse_group(p);
    case '[':
        return parse_class(p);
    case '*': case '+': case '?':
        return perr(p, LM_E_FORMAT, at, "nothing to repeat");
    case '{':
        if (quantifier_ahead(p))
            return perr(p, LM_E_FORMAT, at, "nothing to repeat");
        break;
    case '.':
        p->pos++;
        return new_node(p, N_ANY);
    case '^': case '$':
        p->pos++;
        n = new_node(p, N_ASSERT);
        if (n >= 0)
            p->nodes[n].arg = c == '^' ? AS_BEGIN : AS_END_PY;
        return n;
    case '\\': {
        escape e;
        if (parse_escape(p, 0, &e) < 0)
            return -1;
        if (e.kind == 2) {
            n = new_node(p, N_ASSERT);
            if (n >= 0)
                p->nodes[n].arg = (uint32_t)e.assertion;
            return n;
        }
        if (e.kind == 1) {
            char_class cc = { p->n_items, 1, 0 };
            class_item it = { 0, 0, e.shorthand, e.negated };
            if (add_class_item(p, it) < 0)
                return -1;
            char_class *nc = grow(p->classes, &p->cap_classes, p->n_classes + 1, sizeof *nc);
            if (nc == NULL)
                return oom(p);
            p->classes = nc;
            p->classes[p->n_classes] = cc;
            n = new_node(p, N_CLASS);
            if (n >= 0)
                p->nodes[n].arg = (uint32_t)p->n_classes++;
            return n;
        }
        n = new_node(p, N_CHAR);
        if (n >= 0)
            p->nodes[n].arg = e.cp;
        return n;
    }
    default:
        break;
    }
    uint32_t cp = take_cp(p);
    n = new_node(p, N_CHAR);
    if (n >= 0)
        p->nodes[n].arg = cp;
    return n;
}

static long parse_cat(parser *p)
{
    long cat = new_node(p, N_CAT);
    if (cat < 0)
        return -1;
    while (p->pos < p->n_bytes && peek(p) != '|' && peek(p) != ')') {
        long atom = parse_atom(p);
        if (atom == NOTHING)
            continue;
        if (atom < 0)
            return -1;
        if (quantifier_ahead(p)) {
            size_t qat = p->pos;
            long min = 0, max = INF_REPEAT;
            if (p->nodes[atom].type == N_ASSERT)
                return perr(p, LM_E_FORMAT, qat, "nothing to repeat");
            int c = peek(p);
            if (c == '*') {
                p->pos++;
            } else if (c == '+') {
                min = 1;
                p->pos++;
            } else if (c == '?') {
                max = 1;
                p->pos++;
            } else if (parse_brace(p, &min, &max) < 0) {
                return -1;
            }
            int greedy = 1;
            if (peek(p) == '?') {
                greedy = 0;
                p->pos++;
            } else if (peek(p) == '+') {
                return perr(p, LM_E_UNSUPPORTED, p->pos,
                            "possessive quantifier (%.*s+) is not supported",
                            (int)(p->pos - qat), p->pat + qat);
            }
            if (quantifier_ahead(p))
                return perr(p, LM_E_FORMAT, p->pos, "multiple repeat");
            long rep = new_node(p, N_REPEAT);
            if (rep < 0)
                return -1;
            p->nodes[rep].min = min;
            p->nodes[rep].max = max;
            p->nodes[rep].greedy = greedy;
            add_child(p, rep, atom);
            atom = rep;
        }
        add_child(p, cat, atom);
    }
    return cat;
}

static long parse_alt(parser *p)
{
    long first = parse_cat(p);
    if (first < 0 || peek(p) != '|')
        return first;
    long alt = new_node(p, N_ALT);
    if (alt < 0)
        return -1;
    add_child(p, alt, first);
    while (peek(p) == '|') {
        p->pos++;
        long c = parse_cat(p);
        if (c < 0)
            return -1;
        add_child(p, alt, c);
    }
    return alt;
}

/* ---------------------------------------------------------------------------------------------
 * Code generation
 * ------------------------------------------------------------------------------------------- */

typedef struct gen {
    parser *p;
    inst *prog;
    size_t n, cap;
    size_t n_loop_regs;
    int too_big;
} gen;

static long emit(gen *g, int op, uint32_t x, uint32_t y)
{
    if (g->n >= MAX_INSTS) {
        g->too_big = 1;
        return -1;
    }
    inst *ni = grow(g->prog, &g->cap, g->n + 1, sizeof *ni);
    if (ni == NULL) {
        oom(g->p);
        return -1;
    }
    g->prog = ni;
    g->prog[g->n] = (inst){ op, x, y };
    return (long)g->n++;
}

static int nullable(const parser *p, long ni)
{
    const node *nd = &p->nodes[ni];
    switch (nd->type) {
    case N_EMPTY: case N_ASSERT:
        return 1;
    case N_CHAR: case N_ANY: case N_CLASS:
        return 0;
    case N_CAT:
        for (long c = nd->child; c >= 0; c = p->nodes[c].next)
            if (!nullable(p, c))
                return 0;
        return 1;
    case N_ALT:
        for (long c = nd->child; c >= 0; c = p->nodes[c].next)
            if (nullable(p, c))
                return 1;
        return 0;
    case N_GROUP:
        return nullable(p, nd->child);
    case N_REPEAT:
        return nd->min == 0 || nullable(p, nd->child);
    }
    return 1;
}

/* Recursion follows the tree's nesting (bounded by MAX_NESTING groups), not its length. */
static int gen_node(gen *g, long ni)
{
    const parser *p = g->p;
    const node *nd = &p->nodes[ni];
    switch (nd->type) {
    case N_EMPTY:
        return 0;
    case N_CHAR:
        return emit(g, I_CHAR, nd->arg, 0) < 0 ? -1 : 0;
    case N_ANY:
        return emit(g, I_ANY, 0, 0) < 0 ? -1 : 0;
    case N_CLASS:
        return emit(g, I_CLASS, nd->arg, 0) < 0 ? -1 : 0;
    case N_ASSERT:
        return emit(g, I_ASSERT, nd->arg, 0) < 0 ? -1 : 0;
    case N_CAT:
        for (long c = nd->child; c >= 0; c = p->nodes[c].next)
            if (gen_node(g, c) < 0)
                return -1;
        return 0;
    case N_ALT: {
        /* SPLIT L1 next; L1: a1; JMP end; next: SPLIT L2 next2; ... ak; end: */
        long prev_jmp = -1;
        for (long c = nd->child; c >= 0; c = p->nodes[c].next) {
            long split = -1;
            if (p->nodes[c].next >= 0 && (split = emit(g, I_SPLIT, 0, 0)) < 0)
                return -1;
            if (split >= 0)
                g->prog[split].x = (uint32_t)g->n;
            if (gen_node(g, c) < 0)
                return -1;
            if (p->nodes[c].next >= 0) {
                long j = emit(g, I_JMP, 0, 0);
                if (j < 0)
                    return -1;
                /* chain the pending jumps through their x field, patched at the end */
                g->prog[j].x = prev_jmp < 0 ? UINT32_MAX : (uint32_t)prev_jmp;
                prev_jmp = j;
                g->prog[split].y = (uint32_t)g->n;
            }
        }
        for (long j = prev_jmp; j >= 0;) {
            long nxt = g->prog[j].x == UINT32_MAX ? -1 : (long)g->prog[j].x;
            g->prog[j].x = (uint32_t)g->n;
            j = nxt;
        }
        return 0;
    }
    case N_GROUP:
        if (emit(g, I_SAVE, 2 * nd->arg, 0) < 0 || gen_node(g, nd->child) < 0
            || emit(g, I_SAVE, 2 * nd->arg + 1, 0) < 0)
            return -1;
        return 0;
    case N_REPEAT: {
        for (long i = 0; i < nd->min; i++)
            if (gen_node(g, nd->child) < 0)
                return -1;
        if (nd->max == INF_REPEAT) {
            /* L1: SPLIT body exit; body: [MARK r] child [CHECK r exit]; JMP L1; exit: */
            int empty_ok = nullable(p, nd->child);
            uint32_t reg = (uint32_t)g->n_loop_regs;
            long l1 = emit(g, I_SPLIT, 0, 0);
            if (l1 < 0)
                return -1;
            uint32_t body = (uint32_t)g->n;
            if (empty_ok) {
                g->n_loop_regs++;
                if (emit(g, I_MARK, reg, 0) < 0)
                    return -1;
            }
            if (gen_node(g, nd->child) < 0)
                return -1;
            long check = -1;
            if (empty_ok && (check = emit(g, I_CHECK, reg, 0)) < 0)
                return -1;
            if (emit(g, I_JMP, (uint32_t)l1, 0) < 0)
                return -1;
            uint32_t exit_pc = (uint32_t)g->n;
            if (check >= 0)
                g->prog[check].y = exit_pc;
            g->prog[l1].x = nd->greedy ? body : exit_pc;
            g->prog[l1].y = nd->greedy ? exit_pc : body;
            return 0;
        }
        /* (max - min) nested optional copies, all skipping to the same end.  As in sre's
         * MAX_UNTIL, an optional iteration that matched empty ends the repeat. */
        int empty_ok = nullable(p, nd->child);
        uint32_t reg = (uint32_t)g->n_loop_regs;
        long n_opt = nd->max - nd->min;
        long *splits = n_opt > 0 ? malloc(2 * (size_t)n_opt * sizeof *splits) : NULL;
        long *checks = splits != NULL ? splits + n_opt : NULL;
        if (n_opt > 0 && splits == NULL) {
            oom(g->p);
            return -1;
        }
        if (n_opt > 0 && empty_ok)
            g->n_loop_regs++;
        for (long i = 0; i < n_opt; i++) {
            checks[i] = -1;
            if ((splits[i] = emit(g, I_SPLIT, 0, 0)) < 0
                || (empty_ok && emit(g, I_MARK, reg, 0) < 0) || gen_node(g, nd->child) < 0
                || (empty_ok && (checks[i] = emit(g, I_CHECK, reg, 0)) < 0)) {
                free(splits);
                return -1;
            }
        }
        for (long i = 0; i < n_opt; i++) {
            uint32_t in = (uint32_t)splits[i] + 1, end = (uint32_t)g->n;
            g->prog[splits[i]].x = nd->greedy ? in : end;
            g->prog[splits[i]].y = nd->greedy ? end : in;
            if (checks[i] >= 0)
                g->prog[checks[i]].y = end;
        }
        free(splits);
        return 0;
    }
    }
    return -1;
}

lm_regex *lm_regex_compile(const char *pattern, lm_err *err)
{
    parser p;
    gen g;
    lm_regex *re = NULL;
    memset(&p, 0, sizeof p);
    memset(&g, 0, sizeof g);
    if (pattern == NULL) {
        lm_fail(err, LM_E_USAGE, "Usage", "NULL regex pattern");
        return NULL;
    }
    p.pat = pattern;
    p.n_bytes = strlen(pattern);
    p.err = err;
    long root = parse_alt(&p);
    if (root < 0)
        goto done;
    if (p.pos < p.n_bytes) {  /* parse_alt stops only at ')' or the end */
        perr(&p, LM_E_FORMAT, p.pos, "unbalanced parenthesis");
        goto done;
    }
    g.p = &p;
    if (emit(&g, I_SAVE, 0, 0) < 0 || gen_node(&g, root) < 0 || emit(&g, I_SAVE, 1, 0) < 0
        || emit(&g, I_MATCH, 0, 0) < 0) {
        if (g.too_big)
            perr(&p, LM_E_UNSUPPORTED, 0, "pattern expands to more than %d instructions",
                 MAX_INSTS);
        goto done;
    }
    re = calloc(1, sizeof *re);
    if (re == NULL) {
        oom(&p);
        goto done;
    }
    re->prog = g.prog;
    re->n_insts = g.n;
    re->n_loop_regs = g.n_loop_regs;
    re->classes = p.classes;
    re->n_classes = p.n_classes;
    re->items = p.items;
    re->n_items = p.n_items;
    re->n_groups = p.n_groups;
    g.prog = NULL;
    p.classes = NULL;
    p.items = NULL;
done:
    free(p.nodes);
    free(p.classes);
    free(p.items);
    free(g.prog);
    return re;
}

void lm_regex_free(lm_regex *re)
{
    if (re == NULL)
        return;
    free(re->prog);
    free(re->classes);
    free(re->items);
    free(re);
}

size_t lm_regex_n_groups(const lm_regex *re) { return re != NULL ? re->n_groups : 0; }

/* ---------------------------------------------------------------------------------------------
 * Matching
 * ------------------------------------------------------------------------------------------- */

static int class_matches(const lm_regex *re, const char_class *cc, uint32_t c)
{
    int in = 0;
    for (size_t i = 0; i < cc->n_items && !in; i++) {
        const class_item *it = &re->items[cc->first + i];
        int m;
        switch (it->shorthand) {
        case SH_DIGIT: m = is_digit_cp(c); break;
        case SH_WORD: m = is_word_cp(c); break;
        case SH_SPACE: m = is_space_cp(c); break;
        default: m = c >= it->lo && c <= it->hi; break;
        }
        in = it->shorthand != SH_NONE && it->negated ? !m : m;
    }
    return cc->negated ? !in : in;
}

static int assert_holds(int kind, const unsigned char *s, size_t n, size_t pos)
{
    int before, after;
    switch (kind) {
    case AS_BEGIN:
        return pos == 0;
    case AS_END_PY:
        return pos == n || (pos + 1 == n && s[pos] == '\n');
    case AS_END_TEXT:
        return pos == n;
    default:
        /* ASCII \w: a byte >= 0x80 (part of a multi-byte character) is never a word byte */
        before = pos > 0 && is_word_cp(s[pos - 1]);
        after = pos < n && is_word_cp(s[pos]);
        /* Python < 3.14: \B never matches an empty subject */
        return kind == AS_WORDB ? before != after : (before == after && n > 0);
    }
}

enum { J_RUN, J_RESTORE, J_FAILED };

typedef struct job {
    uint32_t kind; /* J_RUN: resume at pc, position val; J_RESTORE: slot pc <- val;
                      J_FAILED: state (pc, val) explored without a match */
    uint32_t pc;   /* < MAX_INSTS, or a slot index */
    long val;
} job;

int lm_regex_exec(const lm_regex *re, const char *subject, size_t n_bytes, int full,
                  unsigned long max_steps, long *spans, size_t n_spans)
{
    for (size_t i = 0; spans != NULL && i < n_spans; i++)
        spans[i] = -1;
    if (re == NULL || subject == NULL || n_bytes > (size_t)(LONG_MAX / 2))
        return -1;
    if (max_steps == 0)
        max_steps = LM_REGEX_MAX_STEPS;
    const unsigned char *s = (const unsigned char *)subject;
    const size_t n_group_slots = 2 * (re->n_groups + 1);
    const size_t n_slots = n_group_slots + re->n_loop_regs;
    const size_t width = n_bytes + 1;
    long *slots = malloc(n_slots * sizeof *slots);
    unsigned char *visited = NULL;
    job *stack = NULL;
    size_t sp = 0, cap = 0;
    unsigned long steps = 0;
    int rc = -1;
    if (slots == NULL)
        goto done;
    for (size_t i = 0; i < n_slots; i++)
        slots[i] = -1;
    if (re->n_insts <= MEMO_MAX_BITS / width) {
        visited = calloc((re->n_insts * width + 7) / 8, 1);
        if (visited == NULL)
            goto done;
    }
    stack = malloc(64 * sizeof *stack);
    if (stack == NULL)
        goto done;
    cap = 64;
    stack[sp++] = (job){ J_RUN, 0, 0 };
    rc = 0;

#define PUSH(KIND, PC, VAL)                                                                 \
    do {                                                                                \
        if (sp == cap) {                                                                \
            if (cap >= MAX_STACK_JOBS) {                                                \
                rc = -1;                                                                \
                goto done;                                                              \
            }                                                                           \
            job *ns_ = realloc(stack, 2 * cap * sizeof *stack);                         \
            if (ns_ == NULL) {                                                          \
                rc = -1;                                                                \
                goto done;                                                              \
            }                                                                           \
            stack = ns_;                                                                \
            cap *= 2;                                                                   \
        }                                                                               \
        stack[sp++] = (job){ (KIND), (uint32_t)(PC), (VAL) };                           \
    } while (0)

    while (sp > 0) {
        job j = stack[--sp];
        if (j.kind == J_RESTORE) {
            slots[j.pc] = j.val;
            continue;
        }
        if (j.kind == J_FAILED) {
            size_t bit = j.pc * width + (size_t)j.val;
            visited[bit / 8] |= (unsigned char)(1u << (bit % 8));
            continue;
        }
        size_t pc = j.pc, pos = (size_t)j.val;
        for (;;) {
            if (visited != NULL && re->prog[pc].op == I_SPLIT) {
                /* Only states whose whole subtree failed are marked (when their J_FAILED job
                 * surfaces), so a state still being explored, reached again through an empty
                 * loop iteration, runs again: that keeps Python's captures.  Only branch points
                 * are memoised: between two of them the path is fixed and short. */
                size_t bit = pc * width + pos;
                if (visited[bit / 8] & (1u << (bit % 8)))
                    break;
                PUSH(J_FAILED, pc, (long)pos);
            }
            if (++steps > max_steps) {
                rc = -1;
                goto done;
            }
            const inst *in = &re->prog[pc];
            uint32_t c;
            size_t len;
            switch (in->op) {
            case I_CHAR:
                if (pos >= n_bytes)
                    goto fail;
                len = utf8_decode(s + pos, n_bytes - pos, &c);
                if (c != in->x)
                    goto fail;
                pos += len;
                pc++;
                continue;
            case I_ANY:
                if (pos >= n_bytes || s[pos] == '\n')
                    goto fail;
                pos += utf8_decode(s + pos, n_bytes - pos, &c);
                pc++;
                continue;
            case I_CLASS:
                if (pos >= n_bytes)
                    goto fail;
                len = utf8_decode(s + pos, n_bytes - pos, &c);
                if (!class_matches(re, &re->classes[in->x], c))
                    goto fail;
                pos += len;
                pc++;
                continue;
            case I_SPLIT:
                PUSH(J_RUN, in->y, (long)pos);
                pc = in->x;
                continue;
            case I_JMP:
                pc = in->x;
                continue;
            case I_SAVE:
                PUSH(J_RESTORE, in->x, slots[in->x]);
                slots[in->x] = (long)pos;
                pc++;
                continue;
            case I_ASSERT:
                if (!assert_holds((int)in->x, s, n_bytes, pos))
                    goto fail;
                pc++;
                continue;
            case I_MARK: {
                size_t r = n_group_slots + in->x;
                PUSH(J_RESTORE, r, slots[r]);
                slots[r] = (long)pos;
                pc++;
                continue;
            }
            case I_CHECK:
                /* an iteration that matched empty ends the loop (Python's MAX_UNTIL) */
                pc = slots[n_group_slots + in->x] == (long)pos ? in->y : pc + 1;
                continue;
            case I_MATCH:
                if (full && pos != n_bytes)
                    goto fail;
                for (size_t i = 0; spans != NULL && i < n_spans && i < n_group_slots; i += 2) {
                    int set = slots[i] >= 0 && slots[i + 1] >= 0;
                    spans[i] = set ? slots[i] : -1;
                    if (i + 1 < n_spans)
                        spans[i + 1] = set ? slots[i + 1] : -1;
                }
                rc = 1;
                goto done;
            default:
                goto fail;
            }
        fail:
            break;
        }
    }
#undef PUSH
done:
    free(slots);
    free(visited);
    free(stack);
    return rc;
}

int lm_regex_fullmatch(const lm_regex *re, const char *s)
{
    if (s == NULL)
        return -1;
    return lm_regex_exec(re, s, strlen(s), 1, 0, NULL, 0);
}

int lm_regex_match(const lm_regex *re, const char *s, long *g1_begin, long *g1_end)
{
    long spans[4] = { -1, -1, -1, -1 };
    int rc = s == NULL ? -1 : lm_regex_exec(re, s, strlen(s), 0, 0, spans, 4);
    if (g1_begin != NULL)
        *g1_begin = spans[2];
    if (g1_end != NULL)
        *g1_end = spans[3];
    return rc;
}
