/* SPDX-License-Identifier: MIT */
/* test_st_conformance.c : the shared safetensors fixtures, table-driven over their manifests.
 * Every fixture is accepted, or refused with exactly the kind its manifest names; valid files
 * are checked against what they hold.  Fixtures come from ../shared/fixtures/safetensors
 * (relative to the project root, where the tests run); without them the tests are skipped. */
#include <criterion/criterion.h>

#include "lora_merge.h"

#include <cJSON.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define STC_ROOT "../shared/fixtures/safetensors"
#define STC_MOJO STC_ROOT "/mojo-conformance-regen"
#define LM_ARRAY_LEN_STC(a) (sizeof(a) / sizeof((a)[0]))

static void stc_need_fixtures(void)
{
    struct stat st;
    if (stat(STC_ROOT, &st) != 0 || !S_ISDIR(st.st_mode))
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
}

static char *stc_read(const char *path, size_t *n_out)
{
    FILE *fp = fopen(path, "rb");
    cr_assert_not_null(fp, "cannot open %s", path);
    fseek(fp, 0, SEEK_END);
    const long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    cr_assert_not_null(buf);
    cr_assert_eq(fread(buf, 1, (size_t)n, fp), (size_t)n);
    buf[n] = '\0';
    fclose(fp);
    *n_out = (size_t)n;
    return buf;
}

static cJSON *stc_manifest(const char *path)
{
    size_t n;
    char *text = stc_read(path, &n);
    cJSON *j = cJSON_ParseWithLength(text, n);
    free(text);
    cr_assert_not_null(j, "%s is not JSON", path);
    return j;
}

/* a refusal: the expected kind, a one-line non-empty message, the path, a code */
static void stc_check_refusal(const char *what, const lm_err *e, const char *kind,
                              const char *path)
{
    cr_expect_str_eq(e->kind, kind, "%s: kind %s, expected %s (%s)", what, e->kind, kind, e->msg);
    cr_expect_neq(e->code, LM_OK, "%s: code not set", what);
    cr_expect(e->msg[0] != '\0', "%s: empty message", what);
    cr_expect(strchr(e->msg, '\n') == NULL && strchr(e->msg, '\r') == NULL,
              "%s: message is not one line", what);
    if (path != NULL)
        cr_expect_str_eq(e->path, path, "%s: err->path", what);
    char line[1400];
    lm_err_format(e, line, sizeof line);
    cr_expect(strchr(line, '\n') == NULL, "%s: formatted error is not one line", what);
}

/* open a single file both ways; expect a refusal with `kind`, or success when kind == NULL */
static void stc_expect_file(const char *path, const char *kind)
{
    lm_err e;
    lm_err_clear(&e);
    lm_st_file *f = lm_st_open(path, &e);
    if (kind == NULL) {
        cr_expect_not_null(f, "%s refused: %s: %s", path, e.kind, e.msg);
    } else {
        cr_expect_null(f, "%s accepted, expected %s", path, kind);
        stc_check_refusal(path, &e, kind, path);
    }
    lm_st_close(f);

    size_t n;
    char *buf = stc_read(path, &n);
    lm_err_clear(&e);
    f = lm_st_open_buffer(buf, n, path, &e);
    if (kind == NULL) {
        cr_expect_not_null(f, "%s (buffer) refused: %s: %s", path, e.kind, e.msg);
        if (f != NULL)
            cr_expect_eq(lm_st_fd(f), -1);
    } else {
        cr_expect_null(f, "%s (buffer) accepted, expected %s", path, kind);
        stc_check_refusal(path, &e, kind, path);
    }
    lm_st_close(f);
    free(buf);
}

/* every regular file of dir must be listed in the manifest (no untested fixture) */
static void stc_all_listed(const char *dir, const cJSON *listed, int is_object)
{
    DIR *d = opendir(dir);
    cr_assert_not_null(d, "cannot list %s", dir);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        int found = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, listed)
        {
            const char *name = is_object ? it->string : cJSON_GetStringValue(it);
            if (name != NULL && strcmp(name, de->d_name) == 0)
                found = 1;
        }
        cr_expect(found, "%s/%s is not in the manifest", dir, de->d_name);
    }
    closedir(d);
}

Test(st_conformance, mojo_malformed)
{
    stc_need_fixtures();
    cJSON *man = stc_manifest(STC_MOJO "/manifest.json");
    const cJSON *bad = cJSON_GetObjectItemCaseSensitive(man, "malformed");
    cr_assert(cJSON_IsObject(bad));
    int count = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, bad)
    {
        char path[512];
        snprintf(path, sizeof path, STC_MOJO "/malformed/%s", it->string);
        stc_expect_file(path, cJSON_GetStringValue(it));
        count++;
    }
    cr_expect_geq(count, 35);
    stc_all_listed(STC_MOJO "/malformed", bad, 1);
    cJSON_Delete(man);
}

Test(st_conformance, mojo_malformed_context)
{
    stc_need_fixtures();
    lm_err e;
    lm_err_clear(&e);
    cr_assert_null(lm_st_open(STC_MOJO "/malformed/begin_after_end.safetensors", &e));
    cr_expect_str_eq(e.tensor, "a");
    cr_expect(strstr(e.msg, "tensor 'a'") != NULL && strstr(e.msg, "[1, 0]") != NULL, "%s",
              e.msg);
    cr_expect_neq(e.offset, UINT64_MAX);
    cr_expect_eq(e.code, LM_E_FORMAT);

    lm_err_clear(&e);
    cr_assert_null(lm_st_open(STC_MOJO "/malformed/unknown_dtype.safetensors", &e));
    cr_expect_eq(e.code, LM_E_UNSUPPORTED);
    cr_expect(strstr(e.msg, "FLOAT32") != NULL, "%s", e.msg);

    lm_err_clear(&e);
    cr_assert_null(lm_st_open(STC_MOJO "/malformed/invalid_utf8.safetensors", &e));
    cr_expect_eq(e.offset, 10, "offset of the 0xff byte in the file, got %llu",
                 (unsigned long long)e.offset);
}

typedef struct {
    const char *file;
    size_t n_tensors, n_meta;
    uint64_t data_bytes;
} stc_valid;

static const stc_valid STC_MOJO_VALID[] = {
    {"aligned_scalar_i64.safetensors", 1, 0, 8},
    {"canonical_writer.safetensors", 6, 3, 25},
    {"empty_archive.safetensors", 0, 0, 0},
    {"float8_scalars.safetensors", 5, 0, 5},
    {"high_rank.safetensors", 1, 0, 4},
    {"json_whitespace_padding.safetensors", 0, 0, 0},
    {"leading_json_whitespace.safetensors", 0, 0, 0},
    {"metadata_only.safetensors", 0, 2, 0},
    {"multiple_empty_boundaries.safetensors", 3, 0, 3},
    {"reference_f6_shapes.safetensors", 6, 0, 12},
    {"reordered_offsets.safetensors", 2, 0, 6},
    {"scalar_i64.safetensors", 1, 0, 8},
    {"space_padding.safetensors", 1, 0, 1},
    {"subbyte.safetensors", 2, 0, 4},
    {"unicode.safetensors", 1, 2, 4},
    {"unknown_descriptor_fields.safetensors", 1, 0, 1},
    {"zero_dimension.safetensors", 1, 0, 0},
};

static lm_st_file *stc_open_ok(const char *path)
{
    lm_err e;
    lm_err_clear(&e);
    lm_st_file *f = lm_st_open(path, &e);
    cr_assert_not_null(f, "%s refused: %s: %s", path, e.kind, e.msg);
    return f;
}

Test(st_conformance, mojo_valid)
{
    stc_need_fixtures();
    cJSON *man = stc_manifest(STC_MOJO "/manifest.json");
    const cJSON *good = cJSON_GetObjectItemCaseSensitive(man, "valid");
    cr_assert(cJSON_IsArray(good));
    cr_expect_eq((size_t)cJSON_GetArraySize(good), LM_ARRAY_LEN_STC(STC_MOJO_VALID));
    const cJSON *it;
    cJSON_ArrayForEach(it, good)
    {
        const char *name = cJSON_GetStringValue(it);
        char path[512];
        snprintf(path, sizeof path, STC_MOJO "/valid/%s", name);
        stc_expect_file(path, NULL);
        const stc_valid *v = NULL;
        for (size_t i = 0; i < LM_ARRAY_LEN_STC(STC_MOJO_VALID); i++)
            if (strcmp(STC_MOJO_VALID[i].file, name) == 0)
                v = &STC_MOJO_VALID[i];
        cr_expect_not_null(v, "no expectations for %s", name);
        lm_st_file *f = lm_st_open(path, NULL);
        if (f == NULL || v == NULL) {
            lm_st_close(f);
            continue;
        }
        cr_expect_eq(lm_st_n_tensors(f), v->n_tensors, "%s: tensors", name);
        cr_expect_eq(lm_st_n_metadata(f), v->n_meta, "%s: metadata", name);
        cr_expect_eq(lm_st_data_bytes(f), v->data_bytes, "%s: data bytes", name);
        cr_expect_geq(lm_st_fd(f), 0);
        for (size_t i = 0; i < lm_st_n_tensors(f); i++) {
            const lm_tensor_info *t = lm_st_tensor(f, i);
            size_t at = SIZE_MAX;
            cr_expect_eq(lm_st_find(f, t->name, &at), t, "%s: find %s", name, t->name);
            cr_expect_eq(at, i);
        }
        lm_st_close(f);
    }
    stc_all_listed(STC_MOJO "/valid", good, 0);
    cJSON_Delete(man);
}


Test(st_conformance, mojo_valid_contents)
{
    stc_need_fixtures();
    /* zero_dimension: [2^64-1, 0, 2^64-1] is 0 elements, computed left to right */
    lm_st_file *f = stc_open_ok(STC_MOJO "/valid/zero_dimension.safetensors");
    const lm_tensor_info *t = lm_st_find(f, "empty", NULL);
    cr_assert_not_null(t);
    cr_expect_eq(t->n_dims, 3);
    cr_expect_eq(t->shape[0], UINT64_MAX);
    cr_expect_eq(t->shape[1], 0);
    cr_expect_eq(t->n_elems, 0);
    lm_st_close(f);

    f = stc_open_ok(STC_MOJO "/valid/high_rank.safetensors");
    t = lm_st_tensor(f, 0);
    cr_expect_str_eq(t->name, "rank16");
    cr_expect_eq(t->n_dims, 16);
    cr_expect_eq(t->n_elems, 1);
    cr_expect_eq(t->dtype, LM_DT_F32);
    lm_st_close(f);

    f = stc_open_ok(STC_MOJO "/valid/scalar_i64.safetensors");
    t = lm_st_tensor(f, 0);
    cr_expect_eq(t->n_dims, 0);
    cr_expect_eq(t->n_elems, 1);
    cr_expect_eq(t->dtype, LM_DT_I64);
    int64_t v;
    memcpy(&v, lm_st_data(f) + t->begin, 8);
    cr_expect_eq(v, -42);
    cr_expect_eq(lm_st_data_offset(f), 8 + 58);
    lm_st_close(f);

    /* escapes decoded in metadata; header order kept */
    f = stc_open_ok(STC_MOJO "/valid/canonical_writer.safetensors");
    const char *k, *val;
    lm_st_metadata(f, 0, &k, &val);
    cr_expect_str_eq(k, "author");
    cr_expect_str_eq(val, "safetensors.mojo");
    lm_st_metadata(f, 1, &k, &val);
    cr_expect_str_eq(k, "quote\"and\\slash");
    cr_expect_str_eq(val, "line one\nline two");
    lm_st_metadata(f, 2, &k, &val);
    cr_expect_str_eq(val, "Zo\xc3\xab \xf0\x9f\x98\x8a");
    cr_expect_str_eq(lm_st_tensor(f, 0)->name, "scalar_i64");
    cr_expect_str_eq(lm_st_tensor(f, 1)->name, "beta_f32");
    lm_st_close(f);

    f = stc_open_ok(STC_MOJO "/valid/unicode.safetensors");
    cr_expect_not_null(lm_st_find(f, "w\xc3\xab" "ight\xf0\x9f\x98\x8a", NULL));
    cr_expect_eq(lm_st_tensor(f, 0)->dtype, LM_DT_F16);
    lm_st_close(f);

    f = stc_open_ok(STC_MOJO "/valid/subbyte.safetensors");
    cr_expect_eq(lm_st_find(f, "f4", NULL)->dtype, LM_DT_F4);
    cr_expect_eq(lm_st_find(f, "f6", NULL)->dtype, LM_DT_F6_E2M3);
    cr_expect_eq(lm_st_find(f, "f6", NULL)->end, 4);
    lm_st_close(f);

    f = stc_open_ok(STC_MOJO "/valid/float8_scalars.safetensors");
    static const lm_dtype f8[] = {LM_DT_F8_E5M2, LM_DT_F8_E4M3, LM_DT_F8_E8M0,
                                  LM_DT_F8_E4M3FNUZ, LM_DT_F8_E5M2FNUZ};
    for (size_t i = 0; i < 5; i++)
        cr_expect_eq(lm_st_tensor(f, i)->dtype, f8[i]);
    lm_st_close(f);
}

/* ---- sharded ----------------------------------------------------------------------------- */

Test(st_conformance, mojo_sharded_malformed)
{
    stc_need_fixtures();
    cJSON *man = stc_manifest(STC_MOJO "/manifest.json");
    const cJSON *bad = cJSON_GetObjectItemCaseSensitive(man, "sharded_malformed");
    cr_assert(cJSON_IsObject(bad));
    int count = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, bad)
    {
        char path[512];
        snprintf(path, sizeof path, STC_MOJO "/sharded/%s", it->string);
        const char *kind = cJSON_GetStringValue(it);
        lm_err e;
        lm_err_clear(&e);
        lm_model *m = lm_model_open(path, &e);
        cr_expect_null(m, "%s accepted, expected %s", path, kind);
        lm_model_close(m);
        stc_check_refusal(path, &e, kind, NULL);
        cr_expect(e.path[0] != '\0', "%s: no path in the error", path);
        /* the same through the directory */
        char dir[512];
        snprintf(dir, sizeof dir, "%s", path);
        *strrchr(dir, '/') = '\0';
        lm_err e2;
        lm_err_clear(&e2);
        m = lm_model_open(dir, &e2);
        cr_expect_null(m);
        lm_model_close(m);
        cr_expect_str_eq(e2.kind, kind, "%s (directory)", dir);
        count++;
    }
    cr_expect_eq(count, 14);
    cJSON_Delete(man);
}

Test(st_conformance, mojo_sharded_paths)
{
    stc_need_fixtures();
    lm_err e;
    lm_err_clear(&e);
    /* a malformed shard: its own kind, and the shard as path */
    cr_assert_null(lm_model_open(STC_MOJO "/sharded/malformed/malformed-shard", &e));
    cr_expect_str_eq(e.kind, "HeaderTooSmall");
    cr_expect_str_eq(e.path, STC_MOJO "/sharded/malformed/malformed-shard/shard.safetensors");
    lm_err_clear(&e);
    cr_assert_null(lm_model_open(STC_MOJO "/sharded/malformed/missing-shard", &e));
    cr_expect_eq(e.code, LM_E_IO);
    cr_expect(strstr(e.path, "missing.safetensors") != NULL, "%s", e.path);
    lm_err_clear(&e);
    cr_assert_null(lm_model_open(STC_MOJO "/sharded/malformed/ghost-tensor", &e));
    cr_expect_str_eq(e.tensor, "ghost");
}

Test(st_conformance, mojo_sharded_valid)
{
    stc_need_fixtures();
    lm_err e;
    lm_err_clear(&e);
    lm_model *m = lm_model_open(STC_MOJO "/sharded/valid/multiple/model.safetensors.index.json",
                                &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    /* shards in order of first appearance in the weight_map: empty -> b, alpha -> a;
     * the unreferenced invalid file is never opened */
    cr_expect_eq(lm_model_n_files(m), 2);
    cr_expect(strstr(lm_st_path(lm_model_file(m, 0)), "shard-b.safetensors") != NULL);
    cr_expect(strstr(lm_st_path(lm_model_file(m, 1)), "shard-a.safetensors") != NULL);
    cr_assert_eq(lm_model_n_tensors(m), 3);
    cr_expect_str_eq(lm_model_tensor(m, 0)->info->name, "beta");
    cr_expect_str_eq(lm_model_tensor(m, 1)->info->name, "empty");
    cr_expect_str_eq(lm_model_tensor(m, 2)->info->name, "alpha");
    size_t at = 99;
    const lm_model_entry *a = lm_model_find(m, "alpha", &at);
    cr_assert_not_null(a);
    cr_expect_eq(at, 2);
    cr_expect_eq(a->file, 1);
    cr_expect_eq(a->info->n_elems, 3);
    cr_expect_null(lm_model_find(m, "ghost", NULL));
    cr_expect_not_null(lm_model_index_path(m));
    lm_model_close(m);

    m = lm_model_open(STC_MOJO "/sharded/valid/multiple", &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    cr_expect_eq(lm_model_n_tensors(m), 3);
    lm_model_close(m);

    m = lm_model_open(STC_MOJO "/sharded/valid/single/", &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    cr_expect_eq(lm_model_n_files(m), 1);
    cr_expect_eq(lm_model_n_tensors(m), 1);
    lm_model_close(m);

    /* a .safetensors path is a one-file model, without index */
    m = lm_model_open(STC_MOJO "/sharded/valid/single/model.safetensors", &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    cr_expect_null(lm_model_index_path(m));
    cr_expect_not_null(lm_model_find(m, "alpha", NULL));
    lm_model_close(m);
}

/* ---- the other corpora -------------------------------------------------------------------- */

/* rust's error names differ from ours; how each maps, and why */
typedef struct {
    const char *expected_prefix; /* start of the manifest's "expected" text */
    const char *kind;            /* NULL = accepted */
} stc_rust_map;

static const stc_rust_map STC_RUST_MAP[] = {
    {"OK", NULL},
    {"ERR HeaderTooLarge", "HeaderTooLarge"},
    {"ERR HeaderTooSmall", "HeaderTooSmall"},
    {"ERR InvalidHeaderLength", "InvalidHeaderLength"},
    {"ERR InvalidHeader (non-UTF8)", "InvalidUtf8"},
    {"ERR InvalidHeaderDeserialization", "InvalidJson"},
    {"ERR TensorInvalidInfo", "InvalidTensorSize"},   /* length != dtype x shape */
    {"ERR ValidationOverflow", "ValidationOverflow"},
    {"ERR InvalidOffset", "IncompleteDataCoverage"},  /* overlapping ranges */
    /* MetadataIncompleteBuffer is two cases: bytes left over -> coverage; data too short ->
     * the tensor's end lies beyond the data section */
    {"ERR MetadataIncompleteBuffer (trailing", "IncompleteDataCoverage"},
    {"ERR MetadataIncompleteBuffer (data", "InvalidOffsets"},
};

Test(st_conformance, rust_cases)
{
    stc_need_fixtures();
    cJSON *man = stc_manifest(STC_ROOT "/rust-testcases/manifest.json");
    cr_assert(cJSON_IsArray(man));
    int count = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, man)
    {
        const char *file = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(it, "file"));
        const char *exp = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(it, "expected"));
        cr_assert(file != NULL && exp != NULL);
        const stc_rust_map *map = NULL;
        for (size_t i = 0; i < LM_ARRAY_LEN_STC(STC_RUST_MAP); i++)
            if (strncmp(exp, STC_RUST_MAP[i].expected_prefix,
                        strlen(STC_RUST_MAP[i].expected_prefix)) == 0)
                map = &STC_RUST_MAP[i];
        cr_expect_not_null(map, "%s: no mapping for \"%s\"", file, exp);
        if (map == NULL)
            continue;
        char path[512];
        snprintf(path, sizeof path, STC_ROOT "/rust-testcases/%s", file);
        stc_expect_file(path, map->kind);
        count++;
    }
    cr_expect_eq(count, 16);
    cJSON_Delete(man);

    lm_st_file *f = stc_open_ok(STC_ROOT "/rust-testcases/empty_shapes_allowed.safetensors");
    cr_expect_eq(lm_st_tensor(f, 0)->n_dims, 0);
    cr_expect_eq(lm_st_tensor(f, 0)->n_elems, 1);
    lm_st_close(f);
    f = stc_open_ok(STC_ROOT "/rust-testcases/zero_sized_tensor.safetensors");
    cr_expect_eq(lm_st_tensor(f, 0)->n_elems, 0);
    cr_expect_eq(lm_st_tensor(f, 0)->shape[1], 0);
    lm_st_close(f);
}

Test(st_conformance, official_samples)
{
    stc_need_fixtures();
    static const struct {
        const char *name;
        lm_dtype dt;
    } samples[] = {{"B", LM_DT_U8},  {"H", LM_DT_U16}, {"I", LM_DT_U32},
                   {"b", LM_DT_I8},  {"d", LM_DT_F64}, {"e", LM_DT_F16},
                   {"f", LM_DT_F32}, {"h", LM_DT_I16}, {"i", LM_DT_I32}};
    lm_st_file *all = stc_open_ok(STC_ROOT "/official-samples/overall.safetensors");
    cr_expect_eq(lm_st_n_tensors(all), 9);
    for (size_t i = 0; i < sizeof samples / sizeof samples[0]; i++) {
        char path[512];
        snprintf(path, sizeof path, STC_ROOT "/official-samples/%s.safetensors", samples[i].name);
        stc_expect_file(path, NULL);
        lm_st_file *f = stc_open_ok(path);
        cr_assert_eq(lm_st_n_tensors(f), 1);
        const lm_tensor_info *t = lm_st_tensor(f, 0);
        cr_expect_str_eq(t->name, samples[i].name);
        cr_expect_eq(t->dtype, samples[i].dt, "%s", path);
        cr_expect_eq(t->n_dims, 1);
        cr_expect_eq(t->n_elems, 6);
        const char *k, *v;
        cr_assert_eq(lm_st_n_metadata(f), 1);
        lm_st_metadata(f, 0, &k, &v);
        cr_expect_str_eq(k, "test");
        cr_expect_str_eq(v, "a");
        /* the same tensor, with the same bytes, in overall.safetensors */
        const lm_tensor_info *o = lm_st_find(all, samples[i].name, NULL);
        cr_assert_not_null(o);
        cr_expect_eq(o->dtype, t->dtype);
        cr_expect_eq(o->end - o->begin, t->end - t->begin);
        cr_expect(memcmp(lm_st_data(all) + o->begin, lm_st_data(f) + t->begin,
                         (size_t)(t->end - t->begin)) == 0,
                  "%s: data differ from overall.safetensors", samples[i].name);
        lm_st_close(f);
    }
    lm_st_close(all);
}

Test(st_conformance, cpp_tests)
{
    stc_need_fixtures();
    stc_expect_file(STC_ROOT "/cpp-tests/model.safetensors", NULL);
    stc_expect_file(STC_ROOT "/cpp-tests/safetensors_abuse_attempt_1.safetensors",
                    "InvalidHeaderLength");
    lm_st_file *f = stc_open_ok(STC_ROOT "/cpp-tests/model.safetensors");
    cr_assert_eq(lm_st_n_tensors(f), 2);
    cr_expect_str_eq(lm_st_tensor(f, 0)->name, "weight1");
    cr_expect_eq(lm_st_tensor(f, 0)->dtype, LM_DT_F64);
    cr_expect_eq(lm_st_tensor(f, 0)->shape[0], 8);
    cr_expect_eq(lm_st_tensor(f, 1)->shape[1], 16);
    cr_expect_eq(lm_st_data_bytes(f), 2560);
    lm_st_close(f);
}

Test(st_conformance, jl_tests)
{
    stc_need_fixtures();
    static const struct {
        const char *file;
        size_t n_tensors, n_meta;
    } files[] = {{"model.numpy.safetensors", 27, 0},
                 {"model.safetensors", 36, 0},
                 {"model.with_metadata.safetensors", 36, 2}};
    for (size_t i = 0; i < 3; i++) {
        char path[512];
        snprintf(path, sizeof path, STC_ROOT "/jl-tests/non_sharded/%s", files[i].file);
        stc_expect_file(path, NULL);
        lm_st_file *f = stc_open_ok(path);
        cr_expect_eq(lm_st_n_tensors(f), files[i].n_tensors, "%s", path);
        cr_expect_eq(lm_st_n_metadata(f), files[i].n_meta, "%s", path);
        const lm_tensor_info *t = lm_st_find(f, "int64_357", NULL);
        cr_assert_not_null(t);
        cr_expect_eq(t->n_dims, 3);
        cr_expect_eq(t->shape[2], 7);
        cr_expect_eq(t->n_elems, 105);
        lm_st_close(f);
    }

    /* the sharded model holds the same 36 tensors as the one-file model */
    lm_err e;
    lm_err_clear(&e);
    lm_model *m = lm_model_open(STC_ROOT "/jl-tests/sharded/model.safetensors.index.json", &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    cr_expect_eq(lm_model_n_files(m), 6);
    cr_assert_eq(lm_model_n_tensors(m), 36);
    uint64_t total = 0;
    for (size_t i = 0; i < lm_model_n_tensors(m); i++)
        total += lm_model_tensor(m, i)->info->end - lm_model_tensor(m, i)->info->begin;
    cr_expect_eq(total, 4305);
    lm_st_file *one = stc_open_ok(STC_ROOT "/jl-tests/non_sharded/model.safetensors");
    for (size_t i = 0; i < lm_st_n_tensors(one); i++) {
        const lm_tensor_info *t = lm_st_tensor(one, i);
        const lm_model_entry *me = lm_model_find(m, t->name, NULL);
        cr_assert_not_null(me, "%s missing from the sharded model", t->name);
        cr_expect_eq(me->info->dtype, t->dtype, "%s", t->name);
        cr_expect_eq(me->info->n_dims, t->n_dims, "%s", t->name);
        cr_expect_eq(me->info->n_elems, t->n_elems, "%s", t->name);
        cr_expect_eq(lm_model_file(m, me->file) != NULL, 1);
        cr_expect(memcmp(lm_st_data(lm_model_file(m, me->file)) + me->info->begin,
                         lm_st_data(one) + t->begin, (size_t)(t->end - t->begin)) == 0,
                  "%s: bytes differ between the sharded and the one-file model", t->name);
    }
    lm_st_close(one);
    lm_model_close(m);

    m = lm_model_open(STC_ROOT "/jl-tests/sharded", &e);
    cr_assert_not_null(m, "%s: %s", e.kind, e.msg);
    cr_expect_eq(lm_model_n_tensors(m), 36);
    lm_model_close(m);
}
