/* SPDX-License-Identifier: MIT */
/* test_st_reader.c : the safetensors reader and the model loader on generated inputs (no
 * fixtures): every error kind from hand-built headers, escapes and unicode names, big shapes,
 * 16 dimensions, zero-size tensors, many tensors, files on disk, generated sharded models, and
 * a random-mutation loop (seed printed; LM_TEST_SEED=N replays another seed). */
#include <criterion/criterion.h>

#include "lora_merge.h"
#include "method.h"
#include "st_reader.h"
#include "tensor_set.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- helpers ------------------------------------------------------------------------------ */

/* [8-byte N][header][n_data bytes 0x5a] in a malloc'd buffer */
static uint8_t *rdt_make(const char *hdr, size_t n_hdr, size_t n_data, size_t *n_out)
{
    const size_t n = 8 + n_hdr + n_data;
    uint8_t *b = malloc(n ? n : 1);
    cr_assert_not_null(b);
    uint64_t len = n_hdr;
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(len >> (8 * i));
    memcpy(b + 8, hdr, n_hdr);
    memset(b + 8 + n_hdr, 0x5a, n_data);
    *n_out = n;
    return b;
}

static void rdt_check_err(const char *what, const lm_err *e, const char *kind)
{
    cr_expect_str_eq(e->kind, kind, "%s: got %s (%s), expected %s", what, e->kind, e->msg, kind);
    cr_expect_neq(e->code, LM_OK, "%s", what);
    cr_expect(e->msg[0] != '\0' && strchr(e->msg, '\n') == NULL, "%s: message '%s'", what,
              e->msg);
}

/* header (n_hdr bytes) + n_data data bytes: accepted when kind == NULL, else refused so */
static void rdt_expect_n(const char *hdr, size_t n_hdr, size_t n_data, const char *kind)
{
    size_t n;
    uint8_t *b = rdt_make(hdr, n_hdr, n_data, &n);
    lm_err e;
    lm_err_clear(&e);
    lm_st_file *f = lm_st_open_buffer(b, n, "gen.safetensors", &e);
    if (kind == NULL) {
        cr_expect_not_null(f, "refused %s: %s: %s", hdr, e.kind, e.msg);
    } else {
        cr_expect_null(f, "accepted %s, expected %s", hdr, kind);
        rdt_check_err(hdr, &e, kind);
        cr_expect_str_eq(e.path, "gen.safetensors");
    }
    lm_st_close(f);
    free(b);
}

static void rdt_expect(const char *hdr, size_t n_data, const char *kind)
{
    rdt_expect_n(hdr, strlen(hdr), n_data, kind);
}

static lm_st_file *rdt_open_ok(const char *hdr, size_t n_data, uint8_t **buf)
{
    size_t n;
    *buf = rdt_make(hdr, strlen(hdr), n_data, &n);
    lm_err e;
    lm_err_clear(&e);
    lm_st_file *f = lm_st_open_buffer(*buf, n, "gen", &e);
    cr_assert_not_null(f, "refused %s: %s: %s", hdr, e.kind, e.msg);
    return f;
}

#define RDT_T(dt, shape, offs) \
    "{\"t\":{\"dtype\":\"" dt "\",\"shape\":" shape ",\"data_offsets\":" offs "}}"
#define RDT_X(extra) \
    "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]," extra "}}"

typedef struct {
    const char *hdr;
    size_t n_data;
    const char *kind; /* NULL = accepted */
} rdt_case;

static void rdt_run(const rdt_case *c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        rdt_expect(c[i].hdr, c[i].n_data, c[i].kind);
}

#define RDT_RUN(table) rdt_run(table, sizeof(table) / sizeof((table)[0]))

/* ---- lengths ------------------------------------------------------------------------------ */

Test(st_reader, header_length)
{
    uint8_t b[16] = {0};
    lm_err e;
    for (size_t n = 0; n < 8; n++) {
        lm_err_clear(&e);
        cr_expect_null(lm_st_open_buffer(n ? b : NULL, n, "short", &e));
        rdt_check_err("short", &e, "HeaderTooSmall");
        cr_expect_eq(e.code, LM_E_FORMAT);
    }
    /* checked before the file size: an 8-byte file claiming 100000001 */
    const uint64_t lens[] = {100000001ull, UINT64_MAX, 1ull << 63};
    for (size_t i = 0; i < 3; i++) {
        for (int k = 0; k < 8; k++)
            b[k] = (uint8_t)(lens[i] >> (8 * k));
        lm_err_clear(&e);
        cr_expect_null(lm_st_open_buffer(b, 8, "big", &e));
        rdt_check_err("big", &e, "HeaderTooLarge");
        cr_expect_eq(e.offset, 0);
    }
    const uint64_t short_lens[] = {100000000ull, 9, 1};
    for (size_t i = 0; i < 3; i++) {
        for (int k = 0; k < 8; k++)
            b[k] = (uint8_t)(short_lens[i] >> (8 * k));
        lm_err_clear(&e);
        cr_expect_null(lm_st_open_buffer(b, 8, "trunc", &e));
        rdt_check_err("trunc", &e, "InvalidHeaderLength");
    }
    /* err may be NULL */
    cr_expect_null(lm_st_open_buffer(b, 3, "x", NULL));
}

/* ---- header start, padding, JSON grammar -------------------------------------------------- */

Test(st_reader, header_start_and_padding)
{
    static const rdt_case cases[] = {
        {"{}", 0, NULL},
        {" \t\r\n{}\n\r\t ", 0, NULL},
        {"{}      ", 0, NULL},
        {"", 0, "InvalidHeaderStart"},
        {"    ", 0, "InvalidHeaderStart"},
        {"[]", 0, "InvalidHeaderStart"},
        {"\"x\"", 0, "InvalidHeaderStart"},
        {"1", 0, "InvalidHeaderStart"},
        {"null", 0, "InvalidHeaderStart"},
        {"\xef\xbb\xbf{}", 0, "InvalidHeaderStart"}, /* a BOM is not whitespace */
        {"\f{}", 0, "InvalidHeaderStart"},
        {"{}\x0b", 0, "InvalidHeaderPadding"},
        {"{}\f", 0, "InvalidHeaderPadding"},
        {"{} {}", 0, "InvalidHeaderPadding"},
        {"{}}", 0, "InvalidHeaderPadding"},
        {"{}x", 0, "InvalidHeaderPadding"},
        {"{} ,", 0, "InvalidHeaderPadding"},
        {"{}  \xff", 0, "InvalidUtf8"}, /* the whole header must be UTF-8, padding included */
    };
    RDT_RUN(cases);
    rdt_expect_n("{}\0", 3, 0, "InvalidHeaderPadding");
    rdt_expect_n("{\0}", 3, 0, "InvalidJson");

    size_t n;
    uint8_t *b = rdt_make("{}x", 3, 0, &n);
    lm_err e;
    lm_err_clear(&e);
    cr_assert_null(lm_st_open_buffer(b, n, "pad", &e));
    cr_expect_eq(e.offset, 10, "offset %llu", (unsigned long long)e.offset);
    free(b);
}

Test(st_reader, json_syntax)
{
    static const rdt_case cases[] = {
        {"{", 0, "InvalidJson"},
        {"{\"a\"", 0, "InvalidJson"},
        {"{\"a\":", 0, "InvalidJson"},
        {"{,}", 0, "InvalidJson"},
        {"{\"a\":}", 0, "InvalidJson"},
        {"{\"a\" 1}", 0, "InvalidJson"},
        {"{'a':1}", 0, "InvalidJson"},
        {"{a:1}", 0, "InvalidJson"},
        {"{\"a\":1,}", 0, "InvalidJson"},
        {"{\"a\":[1,]}", 0, "InvalidJson"},
        {"{\"a\":[1 2]}", 0, "InvalidJson"},
        {"{\"a\":tru}", 0, "InvalidJson"},
        {"{\"a\":True}", 0, "InvalidJson"},
        {"{\"a\":nul}", 0, "InvalidJson"},
        {"{\"a\":NaN}", 0, "InvalidJson"},
        {"{\"a\":Infinity}", 0, "InvalidJson"},
        {"{\"a\":\"\\x\"}", 0, "InvalidJson"},
        {"{\"a\":\"\\u12G4\"}", 0, "InvalidJson"},
        {"{\"a\":\"\\u12\"}", 0, "InvalidJson"},
        {"{\"a\":\"tab\there\"}", 0, "InvalidJson"},
        {"{\"a\":\"nl\nhere\"}", 0, "InvalidJson"},
        {"{\"a\":\"unterminated}", 0, "InvalidJson"},
        {"{\"a\":\"\\\"}", 0, "InvalidJson"},
        {"{\"a\":{}", 0, "InvalidJson"},
        {"{\"a\":[}", 0, "InvalidJson"},
        {"{\"a\":]}", 0, "InvalidJson"},
        {"{\"a\"::1}", 0, "InvalidJson"},
        {"{\"a\":1 \"b\":2}", 0, "InvalidJson"},
        {"{\"a\":/*c*/1}", 0, "InvalidJson"},
        /* number tokens outside RFC 8259 in an ignored field: not JSON */
        {RDT_X("\"x\":01"), 1, "InvalidJson"},
        {RDT_X("\"x\":-"), 1, "InvalidJson"},
        {RDT_X("\"x\":1."), 1, "InvalidJson"},
        {RDT_X("\"x\":.5"), 1, "InvalidJson"},
        {RDT_X("\"x\":+1"), 1, "InvalidJson"},
        {RDT_X("\"x\":1e"), 1, "InvalidJson"},
        {RDT_X("\"x\":1e+"), 1, "InvalidJson"},
        {RDT_X("\"x\":-01"), 1, "InvalidJson"},
        {RDT_X("\"x\":[true,{\"y\":[00]}]"), 1, "InvalidJson"},
        /* and the RFC ones are fine, as are all other value types */
        {RDT_X("\"x\":-0.5e+3,\"y\":1E-3,\"z\":0,\"w\":-0,\"v\":123456789012345678901234567890"),
         1, NULL},
        {RDT_X("\"x\":null,\"y\":true,\"z\":false,\"w\":\"s\",\"v\":[],\"u\":{}"), 1, NULL},
        {RDT_X("\"x\" : [ 1 , { \"k\" : [ ] } ]\n"), 1, NULL},
    };
    RDT_RUN(cases);
}

Test(st_reader, nesting_depth)
{
    /* root (depth 0) > descriptor (1) > "x" ... : up to 64 levels in all */
    char buf[1024];
    for (int k = 1; k <= 70; k++) {
        char x[300];
        int n = snprintf(x, sizeof x, "\"x\":");
        for (int i = 0; i < k; i++)
            x[n++] = '[';
        for (int i = 0; i < k; i++)
            x[n++] = ']';
        x[n] = '\0';
        snprintf(buf, sizeof buf, "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],%s}}",
                 x);
        rdt_expect(buf, 1, k <= 62 ? NULL : "InvalidJson");
    }
    /* very deep input must not exhaust the stack */
    const size_t deep = 200000;
    char *d = malloc(deep * 2 + 8);
    cr_assert_not_null(d);
    d[0] = '{';
    d[1] = '"';
    d[2] = 'a';
    d[3] = '"';
    d[4] = ':';
    memset(d + 5, '[', deep);
    memset(d + 5 + deep, ']', deep);
    d[5 + 2 * deep] = '}';
    rdt_expect_n(d, 6 + 2 * deep, 0, "InvalidJson");
    memset(d + 5, '{', deep);
    rdt_expect_n(d, 6 + 2 * deep, 0, "InvalidJson");
    free(d);
}

/* ---- UTF-8 and escapes -------------------------------------------------------------------- */

Test(st_reader, utf8)
{
    static const char *const bad[] = {
        "\x80",             /* stray continuation */
        "\xc0\x80",         /* overlong NUL */
        "\xc1\xbf",         /* overlong */
        "\xe0\x80\xaf",     /* overlong 3 bytes */
        "\xf0\x80\x80\xaf", /* overlong 4 bytes */
        "\xed\xa0\x80",     /* surrogate D800 */
        "\xed\xbf\xbf",     /* surrogate DFFF */
        "\xf4\x90\x80\x80", /* U+110000 */
        "\xf5\x80\x80\x80", "\xf8\x88\x80\x80\x80", "\xfe", "\xff",
        "\xe2\x82",         /* truncated */
        "\xc3",             /* truncated before the quote */
        "\xe2\x28\xa1",     /* bad continuation */
    };
    char buf[256];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(buf, sizeof buf, "{\"%s\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
                 bad[i]);
        rdt_expect(buf, 0, "InvalidUtf8");
        snprintf(buf, sizeof buf, "{\"__metadata__\":{\"k\":\"v%s\"}}", bad[i]);
        rdt_expect(buf, 0, "InvalidUtf8");
    }
    /* lone surrogate escapes are refused too (they cannot become UTF-8) */
    static const char *const bad_esc[] = {"\\ud800", "\\udc00", "\\udbff\\u0041", "\\ud800\\ud800",
                                          "\\ud800x", "\\udfff"};
    for (size_t i = 0; i < sizeof bad_esc / sizeof bad_esc[0]; i++) {
        snprintf(buf, sizeof buf, "{\"__metadata__\":{\"k\":\"%s\"}}", bad_esc[i]);
        rdt_expect(buf, 0, "InvalidUtf8");
    }
    /* the extremes that are valid */
    rdt_expect("{\"__metadata__\":{\"\xf4\x8f\xbf\xbf\":\"\xef\xbf\xbf\xc2\x80\xe0\xa0\x80"
               "\xf0\x90\x80\x80\xed\x9f\xbf\xee\x80\x80\"}}",
               0, NULL);
    /* the byte offset of the bad byte is reported */
    size_t n;
    uint8_t *b = rdt_make("{\"ab\xff\":1}", 9, 0, &n);
    lm_err e;
    lm_err_clear(&e);
    cr_assert_null(lm_st_open_buffer(b, n, "u", &e));
    cr_expect_eq(e.offset, 8 + 4);
    free(b);
}

Test(st_reader, escapes_and_unicode_names)
{
    uint8_t *b;
    lm_st_file *f = rdt_open_ok(
        "{\"a\\\"b\\\\c\\/d\\n\\t\\b\\f\\r\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
        "\"\\u00e9t\\u00E9\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]},"
        "\"\\ud83d\\ude0a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]},"
        "\"\xe4\xb8\xad\xe6\x96\x87.weight\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[3,4]},"
        "\"\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[4,5]},"
        "\"\\u0041\\u0062\\u0020\\u007f\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[5,6]}}",
        6, &b);
    cr_assert_eq(lm_st_n_tensors(f), 6);
    cr_expect_str_eq(lm_st_tensor(f, 0)->name, "a\"b\\c/d\n\t\b\f\r");
    cr_expect_str_eq(lm_st_tensor(f, 1)->name, "\xc3\xa9t\xc3\xa9");
    cr_expect_str_eq(lm_st_tensor(f, 2)->name, "\xf0\x9f\x98\x8a");
    cr_expect_str_eq(lm_st_tensor(f, 3)->name, "\xe4\xb8\xad\xe6\x96\x87.weight");
    cr_expect_str_eq(lm_st_tensor(f, 4)->name, "");
    cr_expect_str_eq(lm_st_tensor(f, 5)->name, "Ab \x7f");
    for (size_t i = 0; i < 6; i++) {
        size_t at = 99;
        cr_expect_eq(lm_st_find(f, lm_st_tensor(f, i)->name, &at), lm_st_tensor(f, i));
        cr_expect_eq(at, i);
    }
    cr_expect_null(lm_st_find(f, "\\u00e9t\\u00E9", NULL));
    cr_expect_null(lm_st_find(f, "missing", NULL));
    lm_st_close(f);
    free(b);

    /* U+0000 cannot live in a C string name: refused rather than silently cut */
    rdt_expect("{\"a\\u0000b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0,
               "InvalidFieldType");
    rdt_expect("{\"__metadata__\":{\"k\":\"v\\u0000\"}}", 0, "InvalidMetadata");
}

Test(st_reader, duplicate_keys)
{
    static const rdt_case cases[] = {
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
         "\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
         0, "DuplicateKey"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
         "\"\\u0061\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
         0, "DuplicateKey"},
        {"{\"\xf0\x9f\x98\x8a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
         "\"\\ud83d\\ude0a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
         0, "DuplicateKey"},
        {"{\"\\/\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
         "\"/\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
         0, "DuplicateKey"},
        {RDT_X("\"dtype\":\"U8\""), 1, "DuplicateKey"},
        {RDT_X("\"shap\\u0065\":[1]"), 1, "DuplicateKey"},
        {RDT_X("\"x\":{\"k\":1,\"\\u006b\":2}"), 1, "DuplicateKey"},
        {RDT_X("\"x\":[{\"k\":1},{\"k\":1,\"k\":2}]"), 1, "DuplicateKey"},
        {RDT_X("\"x\":[{\"k\":1},{\"k\":1}]"), 1, NULL}, /* same key in two objects is fine */
        {"{\"__metadata__\":{\"a\":\"x\",\"\\u0061\":\"y\"}}", 0, "DuplicateKey"},
        {"{\"__metadata__\":{},\"__metadata__\":{}}", 0, "DuplicateKey"},
        {"{\"__metadata__\":{},\"__metadat\\u0061__\":{}}", 0, "DuplicateKey"},
        /* keys that differ only after decoding stay distinct */
        {"{\"__metadata__\":{\"a\":\"x\",\"\\u0041\":\"y\",\"a \":\"z\"}}", 0, NULL},
    };
    RDT_RUN(cases);

    /* large objects take the hashed path: 40 metadata keys, the last repeats the 3rd */
    char buf[2048];
    int n = snprintf(buf, sizeof buf, "{\"__metadata__\":{");
    for (int i = 0; i < 40; i++)
        n += snprintf(buf + n, sizeof buf - (size_t)n, "%s\"key%d\":\"v\"", i ? "," : "",
                      i == 39 ? 2 : i);
    snprintf(buf + n, sizeof buf - (size_t)n, "}}");
    rdt_expect(buf, 0, "DuplicateKey");
    n = snprintf(buf, sizeof buf, "{\"__metadata__\":{");
    for (int i = 0; i < 40; i++)
        n += snprintf(buf + n, sizeof buf - (size_t)n, "%s\"key%d\":\"v\"", i ? "," : "", i);
    snprintf(buf + n, sizeof buf - (size_t)n, "}}");
    rdt_expect(buf, 0, NULL);
}

/* ---- descriptors -------------------------------------------------------------------------- */

Test(st_reader, descriptor_fields)
{
    static const rdt_case cases[] = {
        {RDT_T("U8", "[2]", "[0,2]"), 2, NULL},
        {"{\"t\":{}}", 0, "MissingField"},
        {"{\"t\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "MissingField"},
        {"{\"t\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 1, "MissingField"},
        {"{\"t\":{\"dtype\":\"U8\",\"shape\":[1]}}", 1, "MissingField"},
        {"{\"t\":{\"Dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "MissingField"},
        {"{\"t\":[1]}", 0, "InvalidFieldType"},
        {"{\"t\":null}", 0, "InvalidFieldType"},
        {"{\"t\":\"U8\"}", 0, "InvalidFieldType"},
        {"{\"t\":1}", 0, "InvalidFieldType"},
        {RDT_T("U8", "\"1\"", "[0,1]"), 1, "InvalidFieldType"},
        {RDT_T("U8", "{}", "[0,1]"), 1, "InvalidFieldType"},
        {RDT_T("U8", "1", "[0,1]"), 1, "InvalidFieldType"},
        {RDT_T("U8", "[1]", "{}"), 1, "InvalidFieldType"},
        {RDT_T("U8", "[1]", "null"), 1, "InvalidFieldType"},
        {"{\"t\":{\"dtype\":[\"U8\"],\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "InvalidFieldType"},
        {"{\"t\":{\"dtype\":null,\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "InvalidFieldType"},
        {RDT_T("f32", "[1]", "[0,4]"), 4, "UnsupportedDType"},
        {RDT_T("", "[1]", "[0,4]"), 4, "UnsupportedDType"},
        {RDT_T("F32 ", "[1]", "[0,4]"), 4, "UnsupportedDType"},
        {RDT_T("F8_E4M3FN", "[1]", "[0,1]"), 1, "UnsupportedDType"},
        {RDT_T("Q4_0", "[1]", "[0,1]"), 1, "UnsupportedDType"},
        {RDT_T("F\\u0033\\u0032", "[1]", "[0,4]"), 4, NULL}, /* escapes in the dtype decode */
        /* shape entries */
        {RDT_T("U8", "[null]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[[1]]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[\"1\"]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[true]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[-0]", "[0,0]"), 0, "InvalidShape"},
        {RDT_T("U8", "[-1]", "[0,0]"), 0, "InvalidShape"},
        {RDT_T("U8", "[+1]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[.5]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[1.0]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[1e0]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[1E+0]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[00]", "[0,0]"), 0, "InvalidShape"},
        {RDT_T("U8", "[01]", "[0,1]"), 1, "InvalidShape"},
        {RDT_T("U8", "[0x1]", "[0,1]"), 1, "InvalidJson"}, /* 'x' is not a token at all */
        {RDT_T("U8", "[18446744073709551616]", "[0,0]"), 0, "ValidationOverflow"},
        {RDT_T("U8", "[99999999999999999999999]", "[0,0]"), 0, "ValidationOverflow"},
        {RDT_T("U8", "[0]", "[0,0]"), 0, NULL},
        /* data_offsets entries */
        {RDT_T("U8", "[1]", "[0]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[0,1,2]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[-1,0]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[0,1.0]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[0,1e0]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[00,1]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[\"0\",\"1\"]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[null,1]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[0,18446744073709551616]"), 1, "ValidationOverflow"},
        {RDT_T("U8", "[1]", "[1,0]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[5,6]"), 1, "InvalidOffsets"},
        {RDT_T("U8", "[0]", "[18446744073709551615,18446744073709551615]"), 0, "InvalidOffsets"},
        {RDT_T("U8", "[1]", "[0,1]"), 0, "InvalidOffsets"},
        {RDT_T("U8", "[2]", "[0,1]"), 1, "InvalidTensorSize"},
        {RDT_T("U16", "[1]", "[0,1]"), 1, "InvalidTensorSize"},
        {RDT_T("U16", "[1]", "[0,4]"), 4, "InvalidTensorSize"},
        {RDT_T("F32", "[2,2]", "[0,4]"), 0, "InvalidTensorSize"}, /* size before bounds */
    };
    RDT_RUN(cases);

    /* the error names the tensor and points into the header */
    size_t n;
    const char *h = RDT_T("U8", "[1]", "[1,0]");
    uint8_t *b = rdt_make(h, strlen(h), 1, &n);
    lm_err e;
    lm_err_clear(&e);
    cr_assert_null(lm_st_open_buffer(b, n, "x", &e));
    cr_expect_str_eq(e.tensor, "t");
    cr_expect_str_eq(e.msg, "tensor 't': data_offsets [1, 0]: begin after end");
    cr_expect_eq(e.offset, 8 + (uint64_t)(strstr(h, "[1,0]") - h));
    free(b);
}

Test(st_reader, shapes_and_overflow)
{
    static const rdt_case cases[] = {
        /* element counts multiply left to right with checks: a 0 early absorbs the rest */
        {RDT_T("U8", "[18446744073709551615,0,18446744073709551615]", "[0,0]"), 0, NULL},
        {RDT_T("F64", "[0,18446744073709551615]", "[0,0]"), 0, NULL},
        {RDT_T("U8", "[18446744073709551615,2,0]", "[0,0]"), 0, "ValidationOverflow"},
        {RDT_T("U8", "[4294967296,4294967296]", "[0,0]"), 0, "ValidationOverflow"},
        {RDT_T("U8", "[2,9223372036854775808]", "[0,0]"), 0, "ValidationOverflow"},
        /* fits as elements, not as bits */
        {RDT_T("U8", "[2305843009213693952]", "[0,0]"), 0, "ValidationOverflow"},
        {RDT_T("BOOL", "[18446744073709551615]", "[0,0]"), 0, "ValidationOverflow"},
        {RDT_T("F4", "[18446744073709551615]", "[0,0]"), 0, "ValidationOverflow"},
        /* fits as bits: then the size does not match */
        {RDT_T("U8", "[1152921504606846976]", "[0,0]"), 0, "InvalidTensorSize"},
        {RDT_T("F4", "[2305843009213693952]", "[0,0]"), 0, "InvalidTensorSize"},
        {RDT_T("F4", "[4611686018427387904]", "[0,0]"), 0, "ValidationOverflow"},
        /* sub-byte dtypes need whole bytes */
        {RDT_T("F4", "[2]", "[0,1]"), 1, NULL},
        {RDT_T("F4", "[3]", "[0,2]"), 2, "MisalignedSlice"},
        {RDT_T("F4", "[1]", "[0,1]"), 1, "MisalignedSlice"},
        {RDT_T("F4", "[]", "[0,1]"), 1, "MisalignedSlice"},
        {RDT_T("F4", "[0]", "[0,0]"), 0, NULL},
        {RDT_T("F6_E2M3", "[4]", "[0,3]"), 3, NULL},
        {RDT_T("F6_E3M2", "[2,2]", "[0,3]"), 3, NULL},
        {RDT_T("F6_E3M2", "[2]", "[0,2]"), 2, "MisalignedSlice"},
        {RDT_T("F6_E2M3", "[1]", "[0,1]"), 1, "MisalignedSlice"},
        {RDT_T("F6_E2M3", "[8]", "[0,6]"), 6, NULL},
        /* scalars hold one element */
        {RDT_T("F32", "[]", "[0,4]"), 4, NULL},
        {RDT_T("F32", "[]", "[0,0]"), 0, "InvalidTensorSize"},
        {RDT_T("C64", "[]", "[0,8]"), 8, NULL},
        {RDT_T("U8", "[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]", "[0,1]"), 1, NULL},
    };
    RDT_RUN(cases);

    uint8_t *b;
    lm_st_file *f = rdt_open_ok(RDT_T("BF16", "[2,3,1,1,1,1,1,1,1,1,1,1,1,1,1,4]", "[0,48]"), 48,
                                &b);
    const lm_tensor_info *t = lm_st_tensor(f, 0);
    cr_expect_eq(t->n_dims, 16);
    cr_expect_eq(t->shape[0], 2);
    cr_expect_eq(t->shape[15], 4);
    cr_expect_eq(t->n_elems, 24);
    cr_expect_eq(t->dtype, LM_DT_BF16);
    lm_st_close(f);
    free(b);

    f = rdt_open_ok(RDT_T("U8", "[18446744073709551615,0]", "[0,0]"), 0, &b);
    cr_expect_eq(lm_st_tensor(f, 0)->shape[0], UINT64_MAX);
    cr_expect_eq(lm_st_tensor(f, 0)->n_elems, 0);
    lm_st_close(f);
    free(b);

    /* 64 dimensions */
    char hdr[1024];
    int n = snprintf(hdr, sizeof hdr, "{\"t\":{\"dtype\":\"F32\",\"shape\":[");
    for (int i = 0; i < 64; i++)
        n += snprintf(hdr + n, sizeof hdr - (size_t)n, "%s%d", i ? "," : "", i == 63 ? 3 : 1);
    snprintf(hdr + n, sizeof hdr - (size_t)n, "],\"data_offsets\":[0,12]}}");
    f = rdt_open_ok(hdr, 12, &b);
    cr_expect_eq(lm_st_tensor(f, 0)->n_dims, 64);
    cr_expect_eq(lm_st_tensor(f, 0)->n_elems, 3);
    lm_st_close(f);
    free(b);
}

Test(st_reader, every_dtype)
{
    for (int d = 0; d < LM_DT_COUNT; d++) {
        const char *name = lm_dtype_name((lm_dtype)d);
        const unsigned bits = lm_dtype_bits((lm_dtype)d);
        char hdr[256];
        snprintf(hdr, sizeof hdr,
                 "{\"t\":{\"dtype\":\"%s\",\"shape\":[2,4],\"data_offsets\":[0,%u]}}", name, bits);
        uint8_t *b;
        lm_st_file *f = rdt_open_ok(hdr, bits, &b);
        cr_expect_eq(lm_st_tensor(f, 0)->dtype, (lm_dtype)d, "%s", name);
        cr_expect_eq(lm_st_tensor(f, 0)->n_elems, 8);
        lm_st_close(f);
        free(b);
    }
}

/* ---- coverage ----------------------------------------------------------------------------- */

Test(st_reader, data_coverage)
{
    static const rdt_case cases[] = {
        {"{}", 1, "IncompleteDataCoverage"},
        {"{\"__metadata__\":{\"a\":\"b\"}}", 3, "IncompleteDataCoverage"},
        {RDT_T("U8", "[1]", "[0,1]"), 2, "IncompleteDataCoverage"},
        {RDT_T("U8", "[1]", "[1,2]"), 2, "IncompleteDataCoverage"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
         "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]}}",
         3, "IncompleteDataCoverage"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
         "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[1,3]}}",
         3, "IncompleteDataCoverage"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
         "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}",
         2, "IncompleteDataCoverage"},
        /* zero-size tensors: at the same offset, at the ends, between: fine */
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[0,0]}}",
         0, NULL},
        {"{\"z\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[2,2]},"
         "\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
         "\"m\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[2,2]},"
         "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]},"
         "\"e\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[3,3]}}",
         3, NULL},
        {"{\"z\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
         "\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[1,1]}}",
         1, "IncompleteDataCoverage"},
        /* ... but not inside another tensor's range */
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
         "\"b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[2,2]}}",
         4, "IncompleteDataCoverage"},
        {"{\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]},"
         "\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}",
         4, NULL},
    };
    RDT_RUN(cases);

    /* data pointers: bytes of tensor i are at data + begin */
    uint8_t *b;
    lm_st_file *f = rdt_open_ok(
        "{\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]},"
        "\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}   ",
        4, &b);
    const uint64_t n_hdr = 8 + strlen("{\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]},"
                                      "\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}   ");
    cr_expect_eq(lm_st_data_offset(f), n_hdr);
    cr_expect_eq(lm_st_data(f), b + n_hdr);
    cr_expect_eq(lm_st_data_bytes(f), 4);
    cr_expect_str_eq(lm_st_tensor(f, 0)->name, "b"); /* header order, not offset order */
    cr_expect_eq(lm_st_tensor(f, 0)->begin, 2);
    cr_expect_eq(lm_st_fd(f), -1);
    cr_expect_str_eq(lm_st_path(f), "gen");
    lm_st_close(f);
    free(b);

    size_t n;
    const char *h = "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                    "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]}}";
    b = rdt_make(h, strlen(h), 3, &n);
    lm_err e;
    lm_err_clear(&e);
    cr_assert_null(lm_st_open_buffer(b, n, "gap", &e));
    cr_expect_str_eq(e.tensor, "b");
    cr_expect_eq(e.offset, 8 + strlen(h) + 1, "the gap starts at data byte 1");
    free(b);
}

/* ---- metadata ----------------------------------------------------------------------------- */

Test(st_reader, metadata)
{
    static const rdt_case cases[] = {
        /* the reference reads __metadata__ into an Option (serde): null is no metadata; mlx-lm
         * writes it (../shared/fixtures/adapters-other/mlx-lm-*) */
        {"{\"__metadata__\":null}", 0, NULL},
        {"{\"__metadata__\":[]}", 0, "InvalidMetadata"},
        {"{\"__metadata__\":\"v\"}", 0, "InvalidMetadata"},
        {"{\"__metadat\\u0061__\":\"v\"}", 0, "InvalidMetadata"}, /* reserved after decoding */
        {"{\"__metadata__\":{\"k\":null}}", 0, "InvalidFieldType"},
        {"{\"__metadata__\":{\"k\":1}}", 0, "InvalidFieldType"},
        {"{\"__metadata__\":{\"k\":{}}}", 0, "InvalidFieldType"},
        {"{\"__metadata__\":{\"k\":[\"v\"]}}", 0, "InvalidFieldType"},
        {"{\"__metadata__\":{}}", 0, NULL},
        {"{\"__METADATA__\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0, NULL},
    };
    RDT_RUN(cases);

    uint8_t *b;
    lm_st_file *f = rdt_open_ok("{\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                                "\"__metadata__\":{\"z\":\"1\",\"a\":\"\\u00e9\\n\",\"m\":\"\"}}",
                                1, &b);
    cr_assert_eq(lm_st_n_metadata(f), 3);
    cr_assert_eq(lm_st_n_tensors(f), 1);
    const char *k, *v;
    lm_st_metadata(f, 0, &k, &v);
    cr_expect_str_eq(k, "z");
    cr_expect_str_eq(v, "1");
    lm_st_metadata(f, 1, &k, &v);
    cr_expect_str_eq(k, "a");
    cr_expect_str_eq(v, "\xc3\xa9\n");
    lm_st_metadata(f, 2, &k, &v);
    cr_expect_str_eq(k, "m");
    cr_expect_str_eq(v, "");
    lm_st_metadata(f, 3, &k, &v);
    cr_expect_null(k);
    cr_expect_null(v);
    cr_expect_null(lm_st_tensor(f, 1));
    cr_expect_null(lm_st_find(f, "__metadata__", NULL));
    lm_st_close(f);
    free(b);
}

/* ---- scale -------------------------------------------------------------------------------- */

Test(st_reader, many_tensors)
{
    const size_t count = 50000;
    size_t cap = count * 96 + 64, n = 0;
    char *h = malloc(cap);
    cr_assert_not_null(h);
    n += (size_t)snprintf(h + n, cap - n, "{");
    for (size_t i = 0; i < count; i++)
        n += (size_t)snprintf(h + n, cap - n,
                              "%s\"model.layers.%zu.w\":{\"dtype\":\"F16\",\"shape\":[2],"
                              "\"data_offsets\":[%zu,%zu]}",
                              i ? "," : "", i, 4 * i, 4 * i + 4);
    n += (size_t)snprintf(h + n, cap - n, "}");
    uint8_t *b;
    lm_st_file *f = rdt_open_ok(h, 4 * count, &b);
    cr_assert_eq(lm_st_n_tensors(f), count);
    for (size_t i = 0; i < count; i += 7) {
        char name[64];
        snprintf(name, sizeof name, "model.layers.%zu.w", i);
        size_t at = 0;
        const lm_tensor_info *t = lm_st_find(f, name, &at);
        cr_assert_not_null(t, "%s", name);
        cr_assert_eq(at, i);
        cr_assert_eq(t->begin, 4 * i);
    }
    cr_expect_null(lm_st_find(f, "model.layers.50000.w", NULL));
    lm_st_close(f);
    free(b);

    /* the same with one name twice, far apart: found by the parser's hashed check */
    char *dup = strstr(h, "\"model.layers.49999.w\"");
    cr_assert_not_null(dup);
    memcpy(dup, "\"model.layers.7.w\"", 18); /* same length: pad with whitespace */
    memset(dup + 18, ' ', 4);
    size_t nb;
    uint8_t *b2 = rdt_make(h, n, 4 * count, &nb);
    lm_err e;
    lm_err_clear(&e);
    cr_expect_null(lm_st_open_buffer(b2, nb, "dup", &e));
    cr_expect_str_eq(e.kind, "DuplicateKey");
    cr_expect_str_eq(e.tensor, "model.layers.7.w");
    free(b2);
    free(h);
}

/* ---- files on disk ------------------------------------------------------------------------ */

static char *rdt_tmpdir(void)
{
    char tmpl[] = "/tmp/lm-st-reader-XXXXXX";
    char *d = mkdtemp(tmpl);
    cr_assert_not_null(d);
    return strdup(d);
}

static void rdt_write(const char *dir, const char *name, const void *bytes, size_t n)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "wb");
    cr_assert_not_null(fp, "%s", path);
    cr_assert_eq(fwrite(bytes, 1, n, fp), n);
    fclose(fp);
}

static void rdt_write_st(const char *dir, const char *name, const char *hdr, size_t n_data)
{
    size_t n;
    uint8_t *b = rdt_make(hdr, strlen(hdr), n_data, &n);
    rdt_write(dir, name, b, n);
    free(b);
}

static void rdt_rmtree(const char *dir)
{
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_expect_eq(system(cmd), 0);
}

Test(st_reader, files, .timeout = 30)
{
    char *dir = rdt_tmpdir();
    char path[1024];
    lm_err e;

    rdt_write(dir, "empty.safetensors", "", 0);
    snprintf(path, sizeof path, "%s/empty.safetensors", dir);
    lm_err_clear(&e);
    cr_expect_null(lm_st_open(path, &e));
    rdt_check_err("empty", &e, "HeaderTooSmall");
    cr_expect_str_eq(e.path, path);

    rdt_write(dir, "seven.safetensors", "\x02\0\0\0\0\0\0", 7);
    snprintf(path, sizeof path, "%s/seven.safetensors", dir);
    lm_err_clear(&e);
    cr_expect_null(lm_st_open(path, &e));
    rdt_check_err("seven", &e, "HeaderTooSmall");

    snprintf(path, sizeof path, "%s/absent.safetensors", dir);
    lm_err_clear(&e);
    cr_expect_null(lm_st_open(path, &e));
    rdt_check_err("absent", &e, "IoError");
    cr_expect_eq(e.code, LM_E_IO);
    cr_expect_eq(e.sys_errno, ENOENT);
    cr_expect_str_eq(e.path, path);

    lm_err_clear(&e);
    cr_expect_null(lm_st_open(dir, &e));
    rdt_check_err("dir", &e, "NotRegularFile"); /* "<leaf> is a directory, not a regular file" */
    cr_expect_eq(e.code, LM_E_IO);
    cr_expect(strstr(e.msg, "is a directory, not a regular file") != NULL, "%s", e.msg);
    cr_expect_str_eq(e.path, dir);

    rdt_write_st(dir, "ok.safetensors", RDT_T("I16", "[3]", "[0,6]"), 6);
    snprintf(path, sizeof path, "%s/ok.safetensors", dir);
    lm_err_clear(&e);
    lm_st_file *f = lm_st_open(path, &e);
    cr_assert_not_null(f, "%s: %s", e.kind, e.msg);
    cr_expect_geq(lm_st_fd(f), 0);
    cr_expect_str_eq(lm_st_path(f), path);
    const lm_tensor_info *t = lm_st_tensor(f, 0);
    cr_expect_eq(lm_st_data(f)[t->begin], 0x5a);
    cr_expect_eq(lm_st_data(f)[t->end - 1], 0x5a);
    lm_st_close(f);

    rdt_write_st(dir, "bad.safetensors", RDT_T("I16", "[3]", "[0,6]"), 5);
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    lm_err_clear(&e);
    cr_expect_null(lm_st_open(path, &e));
    rdt_check_err("bad", &e, "InvalidOffsets");
    cr_expect_str_eq(e.path, path);
    cr_expect_str_eq(e.tensor, "t");

    /* a FIFO is refused at once, without waiting for a writer */
    snprintf(path, sizeof path, "%s/fifo.safetensors", dir);
    cr_assert_eq(mkfifo(path, 0600), 0);
    lm_err_clear(&e);
    cr_expect_null(lm_st_open(path, &e));
    rdt_check_err("fifo", &e, "NotRegularFile");
    cr_expect_str_eq(e.msg, "fifo.safetensors is a FIFO, not a regular file");
    snprintf(path, sizeof path, "%s/fifo.json", dir);
    cr_assert_eq(mkfifo(path, 0600), 0);
    lm_err_clear(&e);
    cr_expect_null(lm_model_open(path, &e));
    rdt_check_err("fifo index", &e, "NotRegularFile");
    cr_expect_str_eq(e.msg, "fifo.json is a FIFO, not a regular file");

    lm_st_close(NULL);
    lm_model_close(NULL);
    rdt_rmtree(dir);
    free(dir);
}

/* ---- random mutations --------------------------------------------------------------------- */

static uint64_t rdt_rand(uint64_t *s)
{
    /* xorshift64*: local state, reproducible from the printed seed */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

/* on success every invariant holds and every byte of every tensor is readable */
static void rdt_walk(const lm_st_file *f)
{
    unsigned sum = 0;
    for (size_t i = 0; i < lm_st_n_tensors(f); i++) {
        const lm_tensor_info *t = lm_st_tensor(f, i);
        cr_assert(t->begin <= t->end && t->end <= lm_st_data_bytes(f));
        uint64_t n = 1;
        for (size_t d = 0; d < t->n_dims; d++)
            n *= t->shape[d];
        cr_assert_eq(n, t->n_elems);
        cr_assert_eq(lm_st_find(f, t->name, NULL), t);
        if (t->end > t->begin)
            sum += lm_st_data(f)[t->begin] + lm_st_data(f)[t->end - 1];
    }
    for (size_t i = 0; i < lm_st_n_metadata(f); i++) {
        const char *k, *v;
        lm_st_metadata(f, i, &k, &v);
        cr_assert(k != NULL && v != NULL);
        sum += (unsigned)strlen(k) + (unsigned)strlen(v);
    }
    (void)sum;
}

Test(st_reader, random_mutations, .timeout = 120)
{
    static const char base_hdr[] =
        "{\"__metadata__\":{\"format\":\"pt\",\"n\\u00e9\":\"\\ud83d\\ude0a\"},"
        "\"a.weight\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]},"
        "\"b\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[12,14]},"
        "\"s\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[14,22],\"x\":[1,{\"y\":null}]},"
        "\"z\":{\"dtype\":\"F32\",\"shape\":[0,7],\"data_offsets\":[22,22]}}  ";
    static const uint8_t interesting[] = {'{', '}', '[', ']', '"', '\\', ',', ':', '0', '1',
                                          '9', '-', '+', 'e', '.', ' ', 'u', 0x00, 0x0b, 0x7f,
                                          0x80, 0xc3, 0xed, 0xf4, 0xff};
    uint64_t seed = 0x5eed5afe7e45ull;
    const char *env = getenv("LM_TEST_SEED");
    if (env != NULL)
        seed = strtoull(env, NULL, 0);
    fprintf(stderr, "st_reader/random_mutations: seed %llu (LM_TEST_SEED to replay)\n",
            (unsigned long long)seed);
    uint64_t s = seed ? seed : 1;
    size_t n_base;
    uint8_t *base = rdt_make(base_hdr, sizeof base_hdr - 1, 22, &n_base);
    {
        lm_err e;
        lm_err_clear(&e);
        lm_st_file *f = lm_st_open_buffer(base, n_base, "base", &e);
        cr_assert_not_null(f, "base refused: %s: %s", e.kind, e.msg);
        lm_st_close(f);
    }
    uint8_t *buf = malloc(n_base + 64);
    cr_assert_not_null(buf);
    size_t accepted = 0;
    for (int iter = 0; iter < 20000; iter++) {
        size_t n = n_base;
        memcpy(buf, base, n);
        const int n_mut = 1 + (int)(rdt_rand(&s) % 4);
        for (int k = 0; k < n_mut; k++) {
            const uint64_t r = rdt_rand(&s);
            const size_t pos = n ? (size_t)(rdt_rand(&s) % n) : 0;
            switch (r % 6) {
            case 0: buf[pos] ^= (uint8_t)(1u << (r >> 8) % 8); break;
            case 1: buf[pos] = interesting[(r >> 8) % sizeof interesting]; break;
            case 2: buf[pos] = (uint8_t)(r >> 8); break;
            case 3: /* delete a byte */
                if (n > 0) {
                    memmove(buf + pos, buf + pos + 1, n - pos - 1);
                    n--;
                }
                break;
            case 4: /* insert a byte */
                if (n < n_base + 60) {
                    memmove(buf + pos + 1, buf + pos, n - pos);
                    buf[pos] = interesting[(r >> 8) % sizeof interesting];
                    n++;
                }
                break;
            case 5: /* truncate */
                n = pos;
                break;
            }
        }
        lm_err e;
        lm_err_clear(&e);
        lm_st_file *f = lm_st_open_buffer(buf, n, "mut", &e);
        if (f == NULL) {
            cr_assert(e.kind[0] != '\0', "iteration %d: refusal without a kind", iter);
            cr_assert(e.msg[0] != '\0' && strchr(e.msg, '\n') == NULL, "iteration %d", iter);
            cr_assert_neq(e.code, LM_OK);
        } else {
            accepted++;
            rdt_walk(f);
            lm_st_close(f);
        }
    }
    fprintf(stderr, "st_reader/random_mutations: %zu of 20000 mutants accepted\n", accepted);
    free(buf);
    free(base);
}

/* ---- models, generated -------------------------------------------------------------------- */

#define RDT_A "{\"alpha\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]}}"
#define RDT_B                                                              \
    "{\"beta\":{\"dtype\":\"I16\",\"shape\":[2],\"data_offsets\":[0,4]},"  \
    "\"gamma\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}"

/* a snapshot opened hashed: the sha256 made while the bytes were copied is sha256sum's, for a
 * file of several copy slices (9 MB and an odd tail) and for a small one, hashed by a thread of
 * its own or by the copying thread; unhashed: none */
Test(st_reader, snapshot_sha256, .timeout = 30)
{
    char *dir = rdt_tmpdir();
    static const size_t sizes[] = {9 * 1024 * 1024 + 17, 100}; /* more chunks than the copy's ring of buffers */
    for (size_t c = 0; c < 2; c++) {
        char hdr[200], path[1024], cmd[1200], want[65] = {0}, got[65];
        snprintf(hdr, sizeof hdr, "{\"t\":{\"dtype\":\"U8\",\"shape\":[%zu],\"data_offsets\":[0,%zu]}}",
                 sizes[c], sizes[c]);
        size_t n;
        uint8_t *b = rdt_make(hdr, strlen(hdr), sizes[c], &n);
        uint64_t rng = 42 + c;
        for (size_t i = 8 + strlen(hdr); i < n; i++) /* varied bytes: a misplaced chunk would show */
            b[i] = (uint8_t)(rdt_rand(&rng) >> 56);
        rdt_write(dir, "a.safetensors", b, n);
        free(b);
        snprintf(path, sizeof path, "%s/a.safetensors", dir);
        snprintf(cmd, sizeof cmd, "sha256sum '%s'", path);
        FILE *p = popen(cmd, "r");
        cr_assert_not_null(p);
        cr_assert_eq(fread(want, 1, 64, p), 64);
        pclose(p);
        lm_err e;
        lm_err_clear(&e);
        lm_st_file *f = NULL;
        for (int here = 0; here < 2; here++) { /* by a hasher thread; by this thread as it copies */
            lm_st_snapshot_hash_here(here);
            f = lm_st_open_snapshot_hashed(path, &e);
            lm_st_snapshot_hash_here(0);
            cr_assert_not_null(f, "%s: %s", e.kind, e.msg);
            cr_assert_eq(lm_st_snapshot_sha256(f, got), 0);
            cr_assert_str_eq(got, want, "size %zu, hashed here %d", sizes[c], here);
            cr_assert_eq(lm_st_snapshot_sha256(f, got), 0, "asked twice");
            cr_assert_str_eq(got, want);
            lm_st_close(f);
        }
        f = lm_st_open_snapshot(path, &e);
        cr_assert_not_null(f);
        cr_expect_eq(lm_st_snapshot_sha256(f, got), -1, "not hashed: no hash");
        lm_st_close(f);
        f = lm_st_open_snapshot_hashed(path, &e); /* closed without asking: the thread is joined */
        cr_assert_not_null(f);
        lm_st_close(f);
    }
    rdt_rmtree(dir);
    free(dir);
}

/* A snapshot's bytes read with pread (lm_st_snapshot_read) are the file's bytes as they were when
 * it was opened, even after the file is overwritten (independent: the buffer that was written), at
 * any offset and length; a range outside the mapping, and a file that is not a snapshot, are
 * refused (-1: the caller reads the mapping).  The adapter's factors are read this way
 * (lm_prep_view): same values as its mapping, no page of it mapped. */
Test(st_reader, snapshot_read, .timeout = 30)
{
    char *dir = rdt_tmpdir(), path[1024];
    snprintf(path, sizeof path, "%s/a.safetensors", dir);
    enum { NF = 70001, NH = 50001 };
    const size_t dh = 3 + 4 * (size_t)NF, n_data = dh + 2 * (size_t)NH;
    char hdr[400];
    snprintf(hdr, sizeof hdr,
             "{\"u\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
             "\"f\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[3,%zu]},"
             "\"h\":{\"dtype\":\"BF16\",\"shape\":[%d],\"data_offsets\":[%zu,%zu]}}",
             NF, dh, NH, dh, n_data);
    size_t n;
    uint8_t *b = rdt_make(hdr, strlen(hdr), n_data, &n);
    for (size_t i = 8 + strlen(hdr); i < n; i++)
        b[i] = (uint8_t)(i * 131u + (i >> 9));
    rdt_write(dir, "a.safetensors", b, n);
    lm_err e;
    lm_err_clear(&e);
    lm_st_file *f = lm_st_open_snapshot(path, &e);
    cr_assert_not_null(f, "%s: %s", e.kind, e.msg);
    uint8_t *other = malloc(n);
    cr_assert_not_null(other);
    for (size_t i = 0; i < n; i++) /* the same header, other data */
        other[i] = i < 8 + strlen(hdr) ? b[i] : (uint8_t)~b[i];
    rdt_write(dir, "a.safetensors", other, n); /* the file now holds other bytes: the snapshot does not */
    const uint8_t *d = lm_st_data(f);
    const size_t ds = (size_t)lm_st_data_offset(f);
    cr_assert_eq(ds, 8 + strlen(hdr));
    uint8_t *got = malloc(n_data);
    cr_assert_not_null(got);
    const struct {
        size_t at, len;
    } r[] = {{0, n_data}, {0, 1}, {3, 4 * (size_t)NF}, {dh + 1, 2 * (size_t)NH - 1}, {12345, 99999}, {n_data - 1, 1}};
    for (size_t c = 0; c < sizeof r / sizeof *r; c++) {
        memset(got, 0xa5, r[c].len);
        cr_assert_eq(lm_st_snapshot_read(f, d + r[c].at, got, r[c].len), 0, "range %zu", c);
        cr_expect_eq(memcmp(got, b + ds + r[c].at, r[c].len), 0, "range %zu: the bytes when opened", c);
    }
    cr_expect_eq(lm_st_snapshot_read(f, d + n_data - 1, got, 2), -1, "past the mapping's end");
    cr_expect_eq(lm_st_snapshot_read(f, got, got, 1), -1, "not in the mapping");
    lm_st_close(f);
    f = lm_st_open(path, &e);
    cr_assert_not_null(f, "%s: %s", e.kind, e.msg);
    cr_expect_eq(lm_st_snapshot_read(f, lm_st_data(f), got, 1), -1, "not a snapshot");
    lm_st_close(f);
    free(got);
    free(other);
    free(b);
    rdt_rmtree(dir);
    free(dir);
}

/* An adapter tensor of a snapshot viewed as f32 (lm_prep_view) is read with pread into memory the
 * prepared op owns, never through the mapping (nothing recorded to drop): an F32 tensor's values
 * bit for bit, a BF16 tensor's (more than one conversion chunk) as their bits shifted by 16 (the
 * exact f32 of a bf16, computed here); a tensor every module reads (shared) stays the mapping. */
Test(st_reader, snapshot_prep_view, .timeout = 30)
{
    char *dir = rdt_tmpdir(), path[1024];
    snprintf(path, sizeof path, "%s/a.safetensors", dir);
    enum { NF = 5000, NH = 40002, NG = 64 };
    const size_t dh = 4 * (size_t)NF, dg = dh + 2 * (size_t)NH, n_data = dg + 4 * (size_t)NG;
    char hdr[400];
    int pad = 0;
    size_t n_hdr;
    do { /* data 8-aligned, as writers pad the header */
        snprintf(hdr, sizeof hdr,
                 "{\"f\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[0,%zu]},"
                 "\"h\":{\"dtype\":\"BF16\",\"shape\":[%d],\"data_offsets\":[%zu,%zu]},"
                 "\"g\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[%zu,%zu]}}%*s",
                 NF, dh, NH, dh, dh + 2 * (size_t)NH, NG, dg, n_data, pad++, "");
        n_hdr = strlen(hdr);
    } while ((8 + n_hdr) % 8 != 0);
    size_t n;
    uint8_t *b = rdt_make(hdr, n_hdr, n_data, &n), *d = b + 8 + n_hdr;
    for (size_t i = 0; i < NF + 0u; i++)
        memcpy(d + 4 * i, &(uint32_t){0x3f800000u + (uint32_t)i * 977u}, 4);
    for (size_t i = 0; i < NH + 0u; i++)
        memcpy(d + dh + 2 * i, &(uint16_t){(uint16_t)(0x3c00u + i % 0x700u)}, 2);
    for (size_t i = 0; i < NG + 0u; i++)
        memcpy(d + dg + 4 * i, &(uint32_t){0xbf000000u + (uint32_t)i}, 4);
    rdt_write(dir, "a.safetensors", b, n);
    lm_err e;
    lm_err_clear(&e);
    lm_st_file *f = lm_st_open_snapshot(path, &e);
    cr_assert_not_null(f, "%s: %s", e.kind, e.msg);
    lm_tensor_set *ts = lm_ts_create(path);
    cr_assert_not_null(ts);
    ts->st = f;
    for (size_t i = 0; i < lm_st_n_tensors(f); i++) {
        const lm_tensor_info *t = lm_st_tensor(f, i);
        cr_assert_eq(lm_ts_add(ts, t->name, t->dtype, t->n_dims, t->shape, lm_st_data(f) + t->begin, 0, &e), LM_OK);
    }
    const lm_ts_tensor *tf = lm_ts_find(ts, "f"), *th = lm_ts_find(ts, "h"), *tg = lm_ts_find(ts, "g");
    cr_assert(tf && th && tg && tf->file_backed && th->file_backed && tg->file_backed);
    ts->t[tg - ts->t].shared = 1;
    lm_kernels k;
    lm_kernels_select(&k, NULL);
    lm_prepared p;
    memset(&p, 0, sizeof p);
    const float *vf = lm_prep_view(&p, tf, &k, &e), *vh = lm_prep_view(&p, th, &k, &e);
    cr_assert(vf != NULL && vh != NULL);
    cr_expect(vf != tf->data, "F32: a copy, not the mapping");
    cr_expect_eq(memcmp(vf, d, 4 * (size_t)NF), 0, "F32: the file's values");
    size_t bad = 0;
    for (size_t i = 0; i < NH + 0u; i++) {
        uint32_t u;
        memcpy(&u, &vh[i], 4);
        bad += u != (uint32_t)(0x3c00u + i % 0x700u) << 16;
    }
    cr_expect_eq(bad, 0, "BF16: %zu values not the exact f32", bad);
    cr_expect_eq(p.n_read, 0, "read with pread: nothing of the mapping to drop");
    const float *vg = lm_prep_view(&p, tg, &k, &e);
    cr_expect(vg == tg->data, "shared: the mapping");
    cr_expect_eq(p.n_read, 1);
    for (size_t i = 0; i < p.n_owned; i++)
        free(p.owned[i]);
    lm_ts_free(ts);
    free(b);
    rdt_rmtree(dir);
    free(dir);
}

/* A hashed snapshot looks at its float tensors' values as it copies them (the adapter's
 * finiteness check): one inf or NaN anywhere, the element across a copy chunk's end (1 MiB,
 * 2 MiB: the header's length puts both inside an element) included, in F32, F64 or BF16, and it
 * says not all finite; with none, all finite; unhashed, not looked at. */
Test(st_reader, snapshot_all_finite, .timeout = 30)
{
    char *dir = rdt_tmpdir(), path[1024];
    snprintf(path, sizeof path, "%s/a.safetensors", dir);
    enum { NF = 300000, ND = 150000, NH = 100000 };
    const size_t df = 3, dd = df + 4 * NF, dh = dd + 8 * ND, n_data = dh + 2 * NH;
    char hdr[600];
    int pad = 0;
    size_t n_hdr = 0;
    for (;; pad++) { /* spaces after the JSON until 1 MiB and 2 MiB fall inside elements */
        snprintf(hdr, sizeof hdr,
                 "{\"u\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
                 "\"f\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[%zu,%zu]},"
                 "\"d\":{\"dtype\":\"F64\",\"shape\":[%d],\"data_offsets\":[%zu,%zu]},"
                 "\"h\":{\"dtype\":\"BF16\",\"shape\":[%d],\"data_offsets\":[%zu,%zu]}}%*s",
                 NF, df, dd, ND, dd, dh, NH, dh, n_data, pad, "");
        n_hdr = strlen(hdr);
        const size_t s = 8 + n_hdr;
        if (((1u << 20) - s - df) % 4 != 0 && ((2u << 20) - s - dd) % 8 > 1)
            break;
    }
    const size_t ds = 8 + n_hdr;
    /* where each case puts its value: byte offset in the data, dtype size, value bits */
    const struct {
        size_t at;
        int esz;
        uint64_t bits;
    } cases[] = {
        {0, 0, 0}, /* all finite */
        {df + ((1u << 20) - ds - df) / 4 * 4, 4, 0x7f800000u},                     /* F32 inf across 1 MiB */
        {df + 4 * (NF - 1), 4, 0xffc00001u},                                       /* F32 NaN, the last */
        {dd + ((2u << 20) - ds - dd) / 8 * 8, 8, 0x7ff8000000000000ull},           /* F64 NaN across 2 MiB */
        {dd, 8, 0xfff0000000000000ull},                                            /* F64 -inf, the first */
        {dh + 2 * 777, 2, 0x7f80u},                                                /* BF16 inf */
        {dh + 2 * (NH - 1), 2, 0xff81u},                                           /* BF16 NaN, the last */
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        size_t n;
        uint8_t *b = rdt_make(hdr, n_hdr, n_data, &n), *d = b + ds;
        for (size_t i = 0; i < NF; i++)
            memcpy(d + df + 4 * i, &(uint32_t){0x3f800000u + (uint32_t)i}, 4);
        for (size_t i = 0; i < ND; i++)
            memcpy(d + dd + 8 * i, &(uint64_t){0xbff0000000000000ull + i}, 8);
        for (size_t i = 0; i < NH; i++)
            memcpy(d + dh + 2 * i, &(uint16_t){(uint16_t)(0x3f80u + i % 127)}, 2);
        for (int k = 0; k < cases[c].esz; k++)
            d[cases[c].at + (size_t)k] = (uint8_t)(cases[c].bits >> (8 * k));
        rdt_write(dir, "a.safetensors", b, n);
        free(b);
        lm_err e;
        lm_err_clear(&e);
        lm_st_file *f = lm_st_open_snapshot_hashed(path, &e);
        cr_assert_not_null(f, "%s: %s", e.kind, e.msg);
        cr_expect_eq(lm_st_snapshot_all_finite(f), c == 0, "case %zu (byte %zu of the data)", c, cases[c].at);
        lm_st_close(f);
        f = lm_st_open_snapshot(path, &e);
        cr_assert_not_null(f);
        cr_expect_eq(lm_st_snapshot_all_finite(f), 0, "unhashed: not looked at");
        lm_st_close(f);
    }
    rdt_rmtree(dir);
    free(dir);
}

static char *rdt_model_dir(void)
{
    char *dir = rdt_tmpdir();
    rdt_write_st(dir, "a.safetensors", RDT_A, 3);
    rdt_write_st(dir, "b.safetensors", RDT_B, 8);
    return dir;
}

static void rdt_index_expect(const char *index_json, const char *kind)
{
    char *dir = rdt_model_dir();
    rdt_write(dir, "model.safetensors.index.json", index_json, strlen(index_json));
    lm_err e;
    lm_err_clear(&e);
    lm_model *m = lm_model_open(dir, &e);
    if (kind == NULL) {
        cr_expect_not_null(m, "%s refused: %s: %s", index_json, e.kind, e.msg);
    } else {
        cr_expect_null(m, "%s accepted, expected %s", index_json, kind);
        rdt_check_err(index_json, &e, kind);
        cr_expect(e.path[0] != '\0');
    }
    lm_model_close(m);
    rdt_rmtree(dir);
    free(dir);
}

Test(st_index, index_rules)
{
    static const struct {
        const char *json;
        const char *kind;
    } cases[] = {
        {"{\"weight_map\":{\"alpha\":\"a.safetensors\",\"beta\":\"b.safetensors\","
         "\"gamma\":\"b.safetensors\"}}",
         NULL},
        {"{\"metadata\":{\"total_size\":11},\"weight_map\":{\"alpha\":\"a.safetensors\","
         "\"beta\":\"b.safetensors\",\"gamma\":\"b.safetensors\"}}  \n",
         NULL},
        {"{\"metadata\":null,\"weight_map\":{\"beta\":\"b.safetensors\",\"gamma\":\"b.safetensors\"}}",
         NULL},
        {"{\"metadata\":{\"total_size\":12},\"weight_map\":{\"beta\":\"b.safetensors\","
         "\"gamma\":\"b.safetensors\"}}",
         "TotalSizeMismatch"},
        {"{\"metadata\":{\"total_size\":-1},\"weight_map\":{\"alpha\":\"a.safetensors\"}}",
         "InvalidIndex"},
        {"{\"metadata\":{\"total_size\":2.5},\"weight_map\":{\"alpha\":\"a.safetensors\"}}",
         "InvalidIndex"},
        {"{\"metadata\":{\"total_size\":\"3\"},\"weight_map\":{\"alpha\":\"a.safetensors\"}}",
         "InvalidIndex"},
        {"{\"metadata\":[],\"weight_map\":{\"alpha\":\"a.safetensors\"}}", "InvalidIndex"},
        {"", "InvalidJson"},
        {"{\"weight_map\":{\"alpha\":\"a.safetensors\"}} x", "InvalidJson"},
        {"{\"weight_map\":{\"alpha\":\"a.safetensors\",}}", "InvalidJson"},
        {"[]", "InvalidIndex"},
        {"{}", "MissingField"},
        {"{\"Weight_map\":{\"alpha\":\"a.safetensors\"}}", "MissingField"},
        {"{\"weight_map\":[]}", "InvalidIndex"},
        {"{\"weight_map\":{}}", "InvalidIndex"},
        {"{\"weight_map\":null}", "InvalidIndex"},
        {"{\"weight_map\":{\"alpha\":1}}", "InvalidIndex"},
        {"{\"weight_map\":{\"alpha\":null}}", "InvalidIndex"},
        {"{\"weight_map\":{\"alpha\":\"a.safetensors\",\"alpha\":\"a.safetensors\"}}",
         "DuplicateKey"},
        {"{\"weight_map\":{\"alpha\":\"\"}}", "PathTraversal"},
        {"{\"weight_map\":{\"alpha\":\"..\"}}", "PathTraversal"},
        {"{\"weight_map\":{\"alpha\":\".\"}}", "PathTraversal"},
        {"{\"weight_map\":{\"alpha\":\"./a.safetensors\"}}", "PathTraversal"},
        {"{\"weight_map\":{\"alpha\":\"..\\\\a.safetensors\"}}", "PathTraversal"},
        {"{\"weight_map\":{\"alpha\":\"C:\\\\a.safetensors\"}}", "PathTraversal"},
        {"{\"weight_map\":{\"alpha\":\"a.safetensors/\"}}", "PathTraversal"},
        {"{\"weight_map\":{\"alpha\":\"a.SAFETENSORS\"}}", "PathTraversal"},
        {"{\"weight_map\":{\"alpha\":\"a.safetensors.bak\"}}", "PathTraversal"},
        {"{\"weight_map\":{\"alpha\":\"c.safetensors\"}}", "IoError"},
        {"{\"weight_map\":{\"alpha\":\"b.safetensors\"}}", "ShardMismatch"},
        {"{\"weight_map\":{\"beta\":\"b.safetensors\"}}", "ShardMismatch"},
        {"{\"weight_map\":{\"alpha\":\"a.safetensors\",\"beta\":\"a.safetensors\","
         "\"gamma\":\"b.safetensors\"}}",
         "ShardMismatch"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        rdt_index_expect(cases[i].json, cases[i].kind);
}

Test(st_index, order_and_find)
{
    char *dir = rdt_model_dir();
    const char *idx = "{\"weight_map\":{\"gamma\":\"b.safetensors\",\"alpha\":\"a.safetensors\","
                      "\"beta\":\"b.safetensors\"}}";
    rdt_write(dir, "model.safetensors.index.json", idx, strlen(idx));
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    lm_err e;
    lm_err_clear(&e);
    lm_model *m = lm_model_open(path, &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    cr_expect_str_eq(lm_model_index_path(m), path);
    cr_assert_eq(lm_model_n_files(m), 2);
    /* shards by first appearance in the map (gamma -> b), tensors in each header's order */
    cr_expect(strstr(lm_st_path(lm_model_file(m, 0)), "/b.safetensors") != NULL);
    cr_assert_eq(lm_model_n_tensors(m), 3);
    cr_expect_str_eq(lm_model_tensor(m, 0)->info->name, "beta");
    cr_expect_str_eq(lm_model_tensor(m, 1)->info->name, "gamma");
    cr_expect_str_eq(lm_model_tensor(m, 2)->info->name, "alpha");
    cr_expect_eq(lm_model_tensor(m, 2)->file, 1);
    cr_expect_null(lm_model_tensor(m, 3));
    cr_expect_null(lm_model_file(m, 2));
    size_t at = 0;
    const lm_model_entry *g = lm_model_find(m, "gamma", &at);
    cr_assert_not_null(g);
    cr_expect_eq(at, 1);
    cr_expect_eq(g->info->dtype, LM_DT_F32);
    cr_expect_null(lm_model_find(m, "delta", NULL));
    lm_model_close(m);

    /* relative index path without a directory part */
    cr_assert_eq(chdir(dir), 0);
    m = lm_model_open("model.safetensors.index.json", &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    cr_expect_eq(lm_model_n_tensors(m), 3);
    lm_model_close(m);
    cr_assert_eq(chdir("/"), 0);
    rdt_rmtree(dir);
    free(dir);
}

Test(st_index, directories)
{
    char *dir = rdt_tmpdir();
    lm_err e;
    lm_err_clear(&e);
    cr_expect_null(lm_model_open(dir, &e));
    rdt_check_err("empty dir", &e, "IoError");
    cr_expect_str_eq(e.path, dir);
    cr_expect(strstr(e.msg, "model.safetensors") != NULL, "%s", e.msg);

    /* model.safetensors alone */
    rdt_write_st(dir, "model.safetensors", RDT_A, 3);
    lm_model *m = lm_model_open(dir, &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    cr_expect_null(lm_model_index_path(m));
    cr_expect_eq(lm_model_n_tensors(m), 1);
    lm_model_close(m);

    /* the index wins when both are there */
    rdt_write_st(dir, "b.safetensors", RDT_B, 8);
    const char *idx = "{\"weight_map\":{\"beta\":\"b.safetensors\",\"gamma\":\"b.safetensors\"}}";
    rdt_write(dir, "model.safetensors.index.json", idx, strlen(idx));
    char slash[1024];
    snprintf(slash, sizeof slash, "%s//", dir);
    m = lm_model_open(slash, &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    cr_expect_not_null(lm_model_index_path(m));
    cr_expect_eq(lm_model_n_tensors(m), 2);
    cr_expect_null(lm_model_find(m, "alpha", NULL));
    lm_model_close(m);

    /* a bad one-file model keeps its own kind and path */
    char path[1024];
    rdt_write_st(dir, "bad.safetensors", "{}", 1);
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    lm_err_clear(&e);
    cr_expect_null(lm_model_open(path, &e));
    rdt_check_err("bad", &e, "IncompleteDataCoverage");
    cr_expect_str_eq(e.path, path);

    lm_err_clear(&e);
    snprintf(path, sizeof path, "%s/none.json", dir);
    cr_expect_null(lm_model_open(path, &e));
    rdt_check_err("none", &e, "IoError");
    rdt_rmtree(dir);
    free(dir);
}

/* the value of element i of a (p, dt) array, as a double (independent of lm_any_non_finite: the
 * bits are decoded with C's own types, f16 through _Float16) */
static double nf_value(const uint8_t *p, size_t i, lm_dtype dt)
{
    const size_t esz = dt == LM_DT_F64 ? 8 : dt == LM_DT_F32 ? 4 : 2;
    union {
        double d;
        float f;
        _Float16 h;
        uint16_t b[2]; /* bf16: the high half of an f32 (little-endian) */
    } v = {0};
    memcpy(dt == LM_DT_BF16 ? (void *)&v.b[1] : (void *)&v, p + esz * i, esz);
    return dt == LM_DT_F64 ? v.d : dt == LM_DT_F16 ? (double)v.h : (double)v.f;
}

/* lm_any_non_finite (vectorised, one clone per instruction set) says 1 exactly when an element is
 * inf or NaN: every length up to 100 (the vector loops' tails), one special value (+inf, -inf,
 * quiet and signalling NaN, or the largest finite, which is not) at every position, at an odd
 * address, in F32, F64, F16 and BF16. */
Test(st_reader, any_non_finite_every_position)
{
    static const lm_dtype dts[] = {LM_DT_F32, LM_DT_F64, LM_DT_F16, LM_DT_BF16};
    static const uint64_t sp[4][5] = {
        {0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0x7f7fffffu},
        {0x7ff0000000000000u, 0xfff0000000000000u, 0x7ff8000000000000u, 0x7ff0000000000001u, 0x7fefffffffffffffu},
        {0x7c00u, 0xfc00u, 0x7e00u, 0x7c01u, 0x7bffu},
        {0x7f80u, 0xff80u, 0x7fc0u, 0x7f81u, 0x7f7fu},
    };
    enum { N = 100 };
    static uint8_t raw[8 * N + 1];
    uint8_t *p = raw + 1;
    for (size_t d = 0; d < 4; d++) {
        const size_t esz = dts[d] == LM_DT_F64 ? 8 : dts[d] == LM_DT_F32 ? 4 : 2;
        for (size_t n = 0; n <= N; n++)
            for (size_t at = 0; at <= n; at++) /* at == n: no special value */
                for (size_t s = 0; s < (at < n ? 5u : 1u); s++) {
                    for (size_t i = 0; i < n; i++) { /* finite values of every sign and size */
                        const uint64_t v = (uint64_t)(i * 2654435761u) & (esz == 8 ? 0xbfefffffffffffffu : esz == 4 ? 0xbf7fffffu : 0xbbffu);
                        memcpy(p + esz * i, &v, esz);
                    }
                    if (at < n)
                        memcpy(p + esz * at, &sp[d][s], esz);
                    int want = 0;
                    for (size_t i = 0; i < n; i++)
                        want |= !isfinite(nf_value(p, i, dts[d]));
                    cr_assert_eq(lm_any_non_finite(p, n, dts[d]), want, "dtype %zu, n %zu, special %zu at %zu", d, n, s,
                                 at);
                    if (at < n)
                        cr_assert_eq(want, s < 4, "the reference: special %zu", s);
                }
    }
}
