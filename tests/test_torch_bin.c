/* SPDX-License-Identifier: MIT */
/* test_torch_bin.c : the torch .bin reader (suite "torch_bin") and the restricted pickle machine
 * (suite "pickle").  The real fixtures are checked against HEADERS.txt and against their raw
 * storage entries (read here with libzip directly); generated checkpoints use hand-assembled
 * pickles in zips written by libzip, or in the legacy layout.  Hostile inputs must be refused
 * with the expected kind and a message naming what was found. */
#include <criterion/criterion.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zip.h>

#include "lm_error.h"
#include "pickle_reader.h"
#include "tensor_set.h"
#include "th.h"
#include "torch_bin.h"

#define TB_FIX "../shared/fixtures"

/* ---- building pickles ---------------------------------------------------------------------- */

typedef struct tb_buf {
    uint8_t *b;
    size_t n, cap;
} tb_buf;

static void tb_put(tb_buf *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->b = realloc(b->b, b->cap);
        cr_assert(b->b != NULL);
    }
    memcpy(b->b + b->n, p, n);
    b->n += n;
}

static void tb_op(tb_buf *b, uint8_t op)
{
    tb_put(b, &op, 1);
}

static void tb_str(tb_buf *b, const char *s)
{
    uint32_t n = (uint32_t)strlen(s);
    uint8_t len[4] = {(uint8_t)n, (uint8_t)(n >> 8), (uint8_t)(n >> 16), (uint8_t)(n >> 24)};
    tb_op(b, 'X');
    tb_put(b, len, 4);
    tb_put(b, s, n);
}

static void tb_int(tb_buf *b, uint64_t v)
{
    if (v < 256) {
        uint8_t x[2] = {'K', (uint8_t)v};
        tb_put(b, x, 2);
    } else if (v < 65536) {
        uint8_t x[3] = {'M', (uint8_t)v, (uint8_t)(v >> 8)};
        tb_put(b, x, 3);
    } else { /* LONG1 with 8 bytes */
        uint8_t x[10] = {0x8a, 8};
        for (int i = 0; i < 8; i++)
            x[2 + i] = (uint8_t)(v >> (8 * i));
        tb_put(b, x, 10);
    }
}

static void tb_global(tb_buf *b, const char *mod, const char *name)
{
    tb_op(b, 'c');
    tb_put(b, mod, strlen(mod));
    tb_op(b, '\n');
    tb_put(b, name, strlen(name));
    tb_op(b, '\n');
}

static void tb_int_tuple(tb_buf *b, size_t n, const uint64_t *v)
{
    tb_op(b, '(');
    for (size_t i = 0; i < n; i++)
        tb_int(b, v[i]);
    tb_op(b, 't');
}

/* _rebuild_tensor_v2(('storage', torch.<type>, key, 'cpu', numel), offset, shape, stride, False,
 * OrderedDict()), as torch writes it (protocol 2, no memo).  legacy adds the 6th None. */
static void tb_tensor_ex(tb_buf *b, const char *type, const char *key, uint64_t numel, uint64_t offset,
                         size_t n_dims, const uint64_t *shape, const uint64_t *stride, int legacy)
{
    tb_global(b, "torch._utils", "_rebuild_tensor_v2");
    tb_op(b, '(');
    tb_op(b, '(');
    tb_str(b, "storage");
    tb_global(b, "torch", type);
    tb_str(b, key);
    tb_str(b, "cpu");
    tb_int(b, numel);
    if (legacy)
        tb_op(b, 'N');
    tb_op(b, 't');
    tb_op(b, 'Q');
    tb_int(b, offset);
    tb_int_tuple(b, n_dims, shape);
    tb_int_tuple(b, n_dims, stride);
    tb_op(b, 0x89);
    tb_global(b, "collections", "OrderedDict");
    tb_op(b, ')');
    tb_op(b, 'R');
    tb_op(b, 't');
    tb_op(b, 'R');
}

static void tb_tensor(tb_buf *b, const char *type, const char *key, uint64_t numel, uint64_t offset,
                      size_t n_dims, const uint64_t *shape, const uint64_t *stride)
{
    tb_tensor_ex(b, type, key, numel, offset, n_dims, shape, stride, 0);
}

static void tb_dict_begin(tb_buf *b)
{
    uint8_t h[3] = {0x80, 2, '}'};
    tb_put(b, h, 3);
    tb_op(b, '(');
}

static void tb_dict_end(tb_buf *b)
{
    tb_op(b, 'u');
    tb_op(b, '.');
}

/* ---- writing zips with libzip ------------------------------------------------------------- */

typedef struct tb_entry {
    const char *name;
    const void *data;
    size_t n_bytes;
} tb_entry;

static char tb_dir[64];

static void tb_tmpdir(void)
{
    if (tb_dir[0] == '\0') {
        snprintf(tb_dir, sizeof tb_dir, "/tmp/lm_torch_bin_XXXXXX");
        cr_assert(mkdtemp(tb_dir) != NULL);
    }
}

/* Removes the temp dir of this test (Criterion runs each test in its own process). */
static void tb_cleanup(void)
{
    if (tb_dir[0] == '\0')
        return;
    DIR *d = opendir(tb_dir);
    struct dirent *de;
    char path[512];
    while (d != NULL && (de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", tb_dir, de->d_name);
        unlink(path);
    }
    if (d != NULL)
        closedir(d);
    rmdir(tb_dir);
    tb_dir[0] = '\0';
}

TestSuite(torch_bin, .fini = tb_cleanup);
TestSuite(pickle, .fini = tb_cleanup);

/* Writes a zip to a file under the temp dir; returns its bytes (malloc'd) in *out. */
static char *tb_zip(const char *file, const tb_entry *e, size_t n, int deflate, uint8_t **out, size_t *n_out)
{
    tb_tmpdir();
    static char path[128];
    snprintf(path, sizeof path, "%s/%s", tb_dir, file);
    int zerr;
    zip_t *za = zip_open(path, ZIP_CREATE | ZIP_TRUNCATE, &zerr);
    cr_assert(za != NULL);
    for (size_t i = 0; i < n; i++) {
        zip_source_t *s = zip_source_buffer(za, e[i].data, e[i].n_bytes, 0);
        zip_int64_t idx = zip_file_add(za, e[i].name, s, ZIP_FL_ENC_UTF_8);
        cr_assert(idx >= 0);
        zip_set_file_compression(za, (zip_uint64_t)idx, deflate ? ZIP_CM_DEFLATE : ZIP_CM_STORE, 0);
    }
    cr_assert(zip_close(za) == 0);
    if (out != NULL) {
        FILE *f = fopen(path, "rb");
        cr_assert(f != NULL);
        fseek(f, 0, SEEK_END);
        *n_out = (size_t)ftell(f);
        fseek(f, 0, SEEK_SET);
        *out = malloc(*n_out);
        cr_assert(fread(*out, 1, *n_out, f) == *n_out);
        fclose(f);
    }
    return path;
}

/* A checkpoint zip "archive/..." around pkl with storages "0", "1", ... */
static char *tb_ckpt(const char *file, const tb_buf *pkl, const void *const *st, const size_t *st_bytes,
                     size_t n_st, const char *byteorder, int deflate, uint8_t **out, size_t *n_out)
{
    tb_entry e[16];
    static char names[16][48];
    size_t n = 0;
    e[n++] = (tb_entry){"archive/data.pkl", pkl->b, pkl->n};
    if (byteorder != NULL)
        e[n++] = (tb_entry){"archive/byteorder", byteorder, strlen(byteorder)};
    for (size_t i = 0; i < n_st; i++) {
        snprintf(names[i], sizeof names[i], "archive/data/%zu", i);
        e[n++] = (tb_entry){names[i], st[i], st_bytes[i]};
    }
    e[n++] = (tb_entry){"archive/version", "3\n", 2};
    return tb_zip(file, e, n, deflate, out, n_out);
}

static lm_code tb_load(const void *buf, size_t n, lm_tensor_set **ts, lm_err *err)
{
    lm_err_clear(err);
    *ts = NULL;
    return lm_torch_bin_load_buffer(buf, n, "test.bin", ts, err);
}

#define tb_expect_err(rc, err, code_, kind_, needle)                                                 \
    do {                                                                                           \
        char line_[1400];                                                                          \
        lm_err_format(&(err), line_, sizeof line_);                                                \
        cr_assert_eq((rc), (code_), "code %d, expected %d: %s", (int)(rc), (int)(code_), line_); \
        cr_assert_str_eq((err).kind, (kind_), "%s", line_);                                        \
        cr_assert(strstr((err).msg, (needle)) != NULL, "'%s' not in: %s", (needle), line_);      \
    } while (0)

/* ---- real fixtures ------------------------------------------------------------------------ */

static void tb_need_fixtures(void)
{
    if (access(TB_FIX "/adapters/distilbert-lora-adapter-bin/adapter_model.bin", R_OK) != 0)
        cr_skip_test("needs ../shared/fixtures (absent in this clone)");
}

/* Raw bytes of one zip entry, read with libzip independently of the reader. */
static uint8_t *tb_zip_entry(const char *path, const char *name, size_t *n)
{
    int zerr;
    zip_t *za = zip_open(path, ZIP_RDONLY, &zerr);
    cr_assert(za != NULL);
    zip_stat_t sb;
    cr_assert(zip_stat(za, name, 0, &sb) == 0, "no entry %s", name);
    uint8_t *b = malloc(sb.size + 1);
    zip_file_t *zf = zip_fopen(za, name, 0);
    cr_assert(zip_fread(zf, b, sb.size) == (zip_int64_t)sb.size);
    zip_fclose(zf);
    zip_discard(za);
    *n = sb.size;
    return b;
}

Test(torch_bin, real_distilbert_matches_headers)
{
    tb_need_fixtures();
    const char *bin = TB_FIX "/adapters/distilbert-lora-adapter-bin/adapter_model.bin";
    FILE *f = fopen(TB_FIX "/adapters/distilbert-lora-adapter-bin/HEADERS.txt", "r");
    cr_assert(f != NULL);
    lm_err err;
    lm_err_clear(&err);
    lm_tensor_set *ts = NULL;
    lm_code rc = lm_torch_bin_load(bin, &ts, &err);
    cr_assert_eq(rc, LM_OK, "%s", err.msg);
    char line[1024];
    size_t i = 0;
    cr_assert(fgets(line, sizeof line, f) != NULL); /* summary line */
    cr_assert(strstr(line, "keys=40") != NULL);
    while (fgets(line, sizeof line, f)) {
        char name[512], type[64];
        unsigned long long d0, d1 = 0;
        int key;
        int n_dims = 2;
        if (sscanf(line, " %511s %63s [%llu, %llu] storage_key=%d", name, type, &d0, &d1, &key) != 5) {
            cr_assert(sscanf(line, " %511s %63s [%llu] storage_key=%d", name, type, &d0, &key) == 4, "%s", line);
            n_dims = 1;
        }
        cr_assert(i < ts->n);
        const lm_ts_tensor *t = &ts->t[i];
        cr_assert_str_eq(t->name, name);
        cr_assert_str_eq(type, "FloatStorage");
        cr_assert_eq(t->dtype, LM_DT_F32);
        cr_assert_eq(t->n_dims, (size_t)n_dims, "%s", name);
        cr_assert_eq(t->shape[0], d0);
        if (n_dims == 2)
            cr_assert_eq(t->shape[1], d1);
        char entry[64];
        size_t n_raw;
        snprintf(entry, sizeof entry, "adapter_model/data/%d", key);
        uint8_t *raw = tb_zip_entry(bin, entry, &n_raw);
        cr_assert_eq(t->n_bytes, n_raw, "%s", name);
        cr_assert(memcmp(t->data, raw, n_raw) == 0, "%s: values differ from entry %s", name, entry);
        free(raw);
        i++;
    }
    fclose(f);
    cr_assert_eq(i, 40);
    cr_assert_eq(ts->n, 40);
    lm_ts_free(ts);
}

/* The golden adapters: keys in dict order use storages "0", "1", ... (seen with pickletools). */
static void tb_check_golden(const char *bin, size_t n_expect, const char *const *suffix_shape)
{
    lm_err err;
    lm_err_clear(&err);
    lm_tensor_set *ts = NULL;
    lm_code rc = lm_torch_bin_load(bin, &ts, &err);
    cr_assert_eq(rc, LM_OK, "%s", err.msg);
    cr_assert_eq(ts->n, n_expect);
    for (size_t i = 0; i < ts->n; i++) {
        const lm_ts_tensor *t = &ts->t[i];
        cr_assert_eq(t->dtype, LM_DT_F32);
        cr_assert_eq(t->n_dims, 2);
        cr_assert(strncmp(t->name, "base_model.model.", 17) == 0, "%s", t->name);
        int matched = 0;
        for (size_t k = 0; suffix_shape[k] != NULL; k += 2) {
            size_t ls = strlen(suffix_shape[k]), ln = strlen(t->name);
            if (ln >= ls && strcmp(t->name + ln - ls, suffix_shape[k]) == 0) {
                char shape[32];
                snprintf(shape, sizeof shape, "%llu,%llu", (unsigned long long)t->shape[0],
                         (unsigned long long)t->shape[1]);
                cr_assert_str_eq(shape, suffix_shape[k + 1], "%s", t->name);
                matched = 1;
                break;
            }
        }
        cr_assert(matched, "unexpected tensor %s", t->name);
        char entry[64];
        size_t n_raw;
        snprintf(entry, sizeof entry, "adapter_model/data/%zu", i);
        uint8_t *raw = tb_zip_entry(bin, entry, &n_raw);
        cr_assert_eq(t->n_bytes, n_raw);
        cr_assert(memcmp(t->data, raw, n_raw) == 0, "%s", t->name);
        free(raw);
    }
    lm_ts_free(ts);
}

Test(torch_bin, real_qwen2_golden)
{
    tb_need_fixtures();
    /* r = 4, hidden 32, 2 kv heads of 8 */
    static const char *const shapes[] = {
        "q_proj.lora_A.weight", "4,32", "q_proj.lora_B.weight", "32,4", "k_proj.lora_A.weight", "4,32",
        "k_proj.lora_B.weight", "16,4", "v_proj.lora_A.weight", "4,32", "v_proj.lora_B.weight", "16,4",
        "o_proj.lora_A.weight", "4,32", "o_proj.lora_B.weight", "32,4", NULL};
    tb_check_golden(TB_FIX "/peft-golden/lora_qwen2_bin/adapter/adapter_model.bin", 16, shapes);
}

Test(torch_bin, real_neox_golden)
{
    tb_need_fixtures();
    static const char *const shapes[] = {
        "query_key_value.lora_A.weight", "4,32", "query_key_value.lora_B.weight", "96,4",
        "dense_4h_to_h.lora_A.weight", "4,32", "dense_4h_to_h.lora_B.weight", "32,4", NULL};
    tb_check_golden(TB_FIX "/peft-golden/lora_neox/adapter/adapter_model.bin", 8, shapes);
}

/* ---- generated checkpoints ---------------------------------------------------------------- */

static const float tb_f6[6] = {0.5f, -1.25f, 2.0f, 3.5f, -4.0f, 1e-3f};
static const int64_t tb_i4[4] = {1, -2, 300000000000LL, 7};

static void tb_two_tensors(tb_buf *pkl)
{
    uint64_t s23[2] = {2, 3}, st23[2] = {3, 1}, s4[1] = {4}, st4[1] = {1};
    tb_dict_begin(pkl);
    tb_str(pkl, "layer.lora_A.weight");
    tb_tensor(pkl, "FloatStorage", "0", 6, 0, 2, s23, st23);
    tb_str(pkl, "steps");
    tb_tensor(pkl, "LongStorage", "1", 4, 0, 1, s4, st4);
    tb_dict_end(pkl);
}

static void tb_check_two(const lm_tensor_set *ts)
{
    cr_assert_eq(ts->n, 2);
    cr_assert_str_eq(ts->t[0].name, "layer.lora_A.weight");
    cr_assert_eq(ts->t[0].dtype, LM_DT_F32);
    cr_assert_eq(ts->t[0].n_dims, 2);
    cr_assert_eq(ts->t[0].shape[0], 2);
    cr_assert_eq(ts->t[0].shape[1], 3);
    cr_assert(memcmp(ts->t[0].data, tb_f6, sizeof tb_f6) == 0);
    cr_assert_str_eq(ts->t[1].name, "steps");
    cr_assert_eq(ts->t[1].dtype, LM_DT_I64);
    cr_assert_eq(ts->t[1].shape[0], 4);
    cr_assert(memcmp(ts->t[1].data, tb_i4, sizeof tb_i4) == 0);
}

Test(torch_bin, zip_two_tensors_stored_deflated_and_file)
{
    tb_buf pkl = {0};
    tb_two_tensors(&pkl);
    const void *st[2] = {tb_f6, tb_i4};
    size_t nb[2] = {sizeof tb_f6, sizeof tb_i4};
    for (int deflate = 0; deflate <= 1; deflate++) {
        uint8_t *z;
        size_t nz;
        char *path = tb_ckpt(deflate ? "two_deflate.bin" : "two.bin", &pkl, st, nb, 2, "little", deflate, &z, &nz);
        lm_tensor_set *ts;
        lm_err err;
        cr_assert_eq(tb_load(z, nz, &ts, &err), LM_OK, "%s", err.msg);
        tb_check_two(ts);
        cr_assert_str_eq(ts->source_path, "test.bin");
        lm_ts_free(ts);
        lm_err_clear(&err);
        cr_assert_eq(lm_torch_bin_load(path, &ts, &err), LM_OK, "%s", err.msg);
        tb_check_two(ts);
        lm_ts_free(ts);
        free(z);
    }
    free(pkl.b);
}

Test(torch_bin, legacy_format)
{
    static const uint8_t magic[] = {0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, '.'};
    static const uint8_t proto[] = {0x80, 2, 'M', 0xe9, 0x03, '.'};
    tb_buf f = {0};
    tb_put(&f, magic, sizeof magic);
    tb_put(&f, proto, sizeof proto);
    /* sys_info = {'protocol_version': 1001, 'little_endian': True, 'type_sizes': {...}} */
    tb_dict_begin(&f);
    tb_str(&f, "protocol_version");
    tb_int(&f, 1001);
    tb_str(&f, "little_endian");
    tb_op(&f, 0x88);
    tb_str(&f, "type_sizes");
    tb_op(&f, '}');
    tb_op(&f, '(');
    tb_str(&f, "short");
    tb_int(&f, 2);
    tb_str(&f, "int");
    tb_int(&f, 4);
    tb_op(&f, 'u');
    tb_dict_end(&f);
    uint64_t s23[2] = {2, 3}, st23[2] = {3, 1}, s4[1] = {4}, st4[1] = {1};
    tb_dict_begin(&f);
    tb_str(&f, "layer.lora_A.weight");
    tb_tensor_ex(&f, "FloatStorage", "94011", 6, 0, 2, s23, st23, 1);
    tb_str(&f, "steps");
    tb_tensor_ex(&f, "LongStorage", "94022", 4, 0, 1, s4, st4, 1);
    tb_dict_end(&f);
    /* sorted storage keys, then count + bytes for each */
    uint8_t list[] = {0x80, 2, ']', '('};
    tb_put(&f, list, sizeof list);
    tb_str(&f, "94011");
    tb_str(&f, "94022");
    tb_op(&f, 'e');
    tb_op(&f, '.');
    uint8_t cnt[8] = {6};
    tb_put(&f, cnt, 8);
    tb_put(&f, tb_f6, sizeof tb_f6);
    cnt[0] = 4;
    tb_put(&f, cnt, 8);
    tb_put(&f, tb_i4, sizeof tb_i4);

    lm_tensor_set *ts;
    lm_err err;
    cr_assert_eq(tb_load(f.b, f.n, &ts, &err), LM_OK, "%s", err.msg);
    tb_check_two(ts);
    lm_ts_free(ts);

    /* legacy file from disk (mapped) */
    tb_tmpdir();
    char path[128];
    snprintf(path, sizeof path, "%s/legacy.bin", tb_dir);
    FILE *fp = fopen(path, "wb");
    fwrite(f.b, 1, f.n, fp);
    fclose(fp);
    lm_err_clear(&err);
    cr_assert_eq(lm_torch_bin_load(path, &ts, &err), LM_OK, "%s", err.msg);
    tb_check_two(ts);
    lm_ts_free(ts);

    /* cut short inside the last storage */
    lm_code rc = tb_load(f.b, f.n - 3, &ts, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidStorage", "truncated");
    cr_assert_str_eq(err.path, "test.bin");
    free(f.b);
}

Test(torch_bin, strided_and_offset_views)
{
    /* one storage of 6 floats 0..5, seen as: transposed [3,2] stride (1,3); offset view [2] at 2;
     * a column [2] stride 3 from offset 1; a scalar at offset 5 */
    static const float v[6] = {0, 1, 2, 3, 4, 5};
    uint64_t sh_t[2] = {3, 2}, st_t[2] = {1, 3}, sh_o[1] = {2}, st_o[1] = {1}, sh_c[1] = {2}, st_c[1] = {3};
    tb_buf pkl = {0};
    tb_dict_begin(&pkl);
    tb_str(&pkl, "t");
    tb_tensor(&pkl, "FloatStorage", "0", 6, 0, 2, sh_t, st_t);
    tb_str(&pkl, "o");
    tb_tensor(&pkl, "FloatStorage", "0", 6, 2, 1, sh_o, st_o);
    tb_str(&pkl, "c");
    tb_tensor(&pkl, "FloatStorage", "0", 6, 1, 1, sh_c, st_c);
    tb_str(&pkl, "s");
    tb_tensor(&pkl, "FloatStorage", "0", 6, 5, 0, NULL, NULL);
    tb_dict_end(&pkl);
    const void *st[1] = {v};
    size_t nb[1] = {sizeof v};
    uint8_t *z;
    size_t nz;
    tb_ckpt("views.bin", &pkl, st, nb, 1, NULL, 0, &z, &nz);
    lm_tensor_set *ts;
    lm_err err;
    cr_assert_eq(tb_load(z, nz, &ts, &err), LM_OK, "%s", err.msg);
    cr_assert_eq(ts->n, 4);
    static const float want_t[6] = {0, 3, 1, 4, 2, 5}, want_o[2] = {2, 3}, want_c[2] = {1, 4}, want_s = 5;
    cr_assert(memcmp(lm_ts_find(ts, "t")->data, want_t, sizeof want_t) == 0);
    cr_assert_eq(lm_ts_find(ts, "t")->shape[0], 3);
    cr_assert(memcmp(lm_ts_find(ts, "o")->data, want_o, sizeof want_o) == 0);
    cr_assert(memcmp(lm_ts_find(ts, "c")->data, want_c, sizeof want_c) == 0);
    cr_assert_eq(lm_ts_find(ts, "s")->n_dims, 0);
    cr_assert(memcmp(lm_ts_find(ts, "s")->data, &want_s, 4) == 0);
    lm_ts_free(ts);
    free(z);
    free(pkl.b);
}

/* Tied weights: torch.save of {"a": w, "b": w, "c": w[1]} memoizes w and writes "b" as a BINGET
 * of the same tensor object, so the storage is read three times though it has two tensor
 * records.  The reader crashed on the second read of the storage (issue 15, item 1). */
static void tb_tied(tb_buf *pkl, const char *key, int legacy)
{
    uint64_t s23[2] = {2, 3}, st23[2] = {3, 1}, s3[1] = {3}, st3[1] = {1};
    tb_dict_begin(pkl);
    tb_str(pkl, "a");
    tb_tensor_ex(pkl, "FloatStorage", key, 6, 0, 2, s23, st23, legacy);
    uint8_t put[2] = {'q', 7}, get[2] = {'h', 7};
    tb_put(pkl, put, 2); /* BINPUT 7 */
    tb_str(pkl, "b");
    tb_put(pkl, get, 2); /* BINGET 7: the same tensor */
    tb_str(pkl, "c");
    tb_tensor_ex(pkl, "FloatStorage", key, 6, 3, 1, s3, st3, legacy);
    tb_str(pkl, "d");
    tb_put(pkl, get, 2);
    tb_dict_end(pkl);
}

static void tb_check_tied(const lm_tensor_set *ts)
{
    cr_assert_eq(ts->n, 4);
    static const char *const names[4] = {"a", "b", "c", "d"};
    for (size_t i = 0; i < 4; i++) {
        const lm_ts_tensor *t = lm_ts_find(ts, names[i]);
        cr_assert(t != NULL, "%s missing", names[i]);
        size_t n = i == 2 ? 3 : 6;
        cr_assert_eq(t->n_dims, i == 2 ? 1u : 2u);
        cr_assert(memcmp(t->data, tb_f6 + (i == 2 ? 3 : 0), n * sizeof(float)) == 0, "%s", names[i]);
    }
    cr_assert(lm_ts_find(ts, "a")->data != lm_ts_find(ts, "b")->data);
}

Test(torch_bin, tied_tensor_under_several_keys)
{
    tb_buf pkl = {0};
    tb_tied(&pkl, "0", 0);
    const void *st[1] = {tb_f6};
    size_t nb[1] = {sizeof tb_f6};
    for (int deflate = 0; deflate <= 1; deflate++) {
        uint8_t *z;
        size_t nz;
        char *path = tb_ckpt(deflate ? "tied_d.bin" : "tied.bin", &pkl, st, nb, 1, "little", deflate, &z, &nz);
        lm_tensor_set *ts;
        lm_err err;
        cr_assert_eq(tb_load(z, nz, &ts, &err), LM_OK, "%s", err.msg);
        tb_check_tied(ts);
        lm_ts_free(ts);
        lm_err_clear(&err);
        cr_assert_eq(lm_torch_bin_load(path, &ts, &err), LM_OK, "%s", err.msg);
        tb_check_tied(ts);
        lm_ts_free(ts);
        free(z);
    }
    free(pkl.b);

    /* legacy layout: storages borrowed from the buffer instead of owned */
    static const uint8_t magic[] = {0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, '.'};
    static const uint8_t proto[] = {0x80, 2, 'M', 0xe9, 0x03, '.'};
    tb_buf f = {0};
    tb_put(&f, magic, sizeof magic);
    tb_put(&f, proto, sizeof proto);
    tb_dict_begin(&f);
    tb_str(&f, "little_endian");
    tb_op(&f, 0x88);
    tb_dict_end(&f);
    tb_tied(&f, "77", 1);
    uint8_t list[] = {0x80, 2, ']', '('};
    tb_put(&f, list, sizeof list);
    tb_str(&f, "77");
    tb_op(&f, 'e');
    tb_op(&f, '.');
    uint8_t cnt[8] = {6};
    tb_put(&f, cnt, 8);
    tb_put(&f, tb_f6, sizeof tb_f6);
    lm_tensor_set *ts;
    lm_err err;
    cr_assert_eq(tb_load(f.b, f.n, &ts, &err), LM_OK, "%s", err.msg);
    tb_check_tied(ts);
    lm_ts_free(ts);
    free(f.b);
}

/* ---- real torch.save outputs (tests/fuzz/gen_torch_seeds.py, torch 1.13.1) -------------- */

#define TB_SEEDS "tests/fuzz/corpus/fuzz_torch_zip/"

/* Tensor `name` is f32 of the given shape and holds ar[idx[i]] where ar[i] = 0.5 i - 1 (the
 * generator's values), idx written out here from the Python expression that made the view. */
static void tb_expect_ar(const lm_tensor_set *ts, const char *name, size_t n_dims, const uint64_t *shape,
                         const unsigned *idx, size_t n)
{
    const lm_ts_tensor *t = lm_ts_find(ts, name);
    cr_assert(t != NULL, "%s missing", name);
    cr_assert_eq(t->dtype, LM_DT_F32, "%s", name);
    cr_assert_eq(t->n_dims, n_dims, "%s", name);
    for (size_t d = 0; d < n_dims; d++)
        cr_assert_eq(t->shape[d], shape[d], "%s dim %zu", name, d);
    const float *v = t->data;
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(v[i], 0.5f * (float)idx[i] - 1.0f, "%s[%zu] = %g", name, i, (double)v[i]);
}

static lm_tensor_set *tb_load_seed(const char *file)
{
    char path[256];
    snprintf(path, sizeof path, TB_SEEDS "%s", file);
    lm_tensor_set *ts = NULL;
    lm_err err;
    lm_err_clear(&err);
    cr_assert_eq(lm_torch_bin_load(path, &ts, &err), LM_OK, "%s: %s", file, err.msg);
    return ts;
}

Test(torch_bin, real_torch_save_tied_views_offsets_legacy_zip64)
{
    static const unsigned i12[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    static const unsigned row1[4] = {4, 5, 6, 7}, col1[3] = {1, 5, 9};
    const uint64_t s34[2] = {3, 4}, s4[1] = {4}, s3[1] = {3};
    static const char *const tied[2] = {"torch_tied.bin", "torch_tied_zip64.bin"};
    for (int f = 0; f < 2; f++) { /* {"embed.weight": w, "lm_head.weight": w, "row1": w[1]} */
        lm_tensor_set *ts = tb_load_seed(tied[f]);
        cr_assert_eq(ts->n, 3);
        tb_expect_ar(ts, "embed.weight", 2, s34, i12, 12);
        tb_expect_ar(ts, "lm_head.weight", 2, s34, i12, 12);
        tb_expect_ar(ts, "row1", 1, s4, row1, 4);
        lm_ts_free(ts);
    }
    lm_tensor_set *ts = tb_load_seed("torch_legacy.bin"); /* _use_new_zipfile_serialization=False */
    cr_assert_eq(ts->n, 4);
    tb_expect_ar(ts, "a", 2, s34, i12, 12);
    tb_expect_ar(ts, "a_tied", 2, s34, i12, 12);
    tb_expect_ar(ts, "view", 1, s3, col1, 3);
    const lm_ts_tensor *ti = lm_ts_find(ts, "i");
    cr_assert(ti != NULL && ti->dtype == LM_DT_I64 && ((const int64_t *)ti->data)[1] == 6);
    lm_ts_free(ts);

    /* base = ar(24).reshape(4, 6): t = base.t(), col = base[:, 2], every2 = base[1, ::2],
     * block = base[1:3, 2:5], scalar = base[3, 5], full = base */
    ts = tb_load_seed("torch_views.bin");
    cr_assert_eq(ts->n, 6);
    unsigned tr[24], full[24];
    for (unsigned i = 0; i < 24; i++) {
        full[i] = i;
        tr[i] = (i % 4) * 6 + i / 4;
    }
    const uint64_t s64[2] = {6, 4}, s46[2] = {4, 6}, s23[2] = {2, 3}, s0[1] = {0};
    static const unsigned col2[4] = {2, 8, 14, 20}, ev2[3] = {6, 8, 10}, blk[6] = {8, 9, 10, 14, 15, 16};
    static const unsigned sc[1] = {23};
    tb_expect_ar(ts, "t", 2, s64, tr, 24);
    tb_expect_ar(ts, "col", 1, s4, col2, 4);
    tb_expect_ar(ts, "every2", 1, s3, ev2, 3);
    tb_expect_ar(ts, "block", 2, s23, blk, 6);
    tb_expect_ar(ts, "scalar", 0, NULL, sc, 1);
    tb_expect_ar(ts, "full", 2, s46, full, 24);
    lm_ts_free(ts);

    /* big = ar(16): tail = big[10:], mid = big[3:7].view(2, 2), empty = big[5:5] */
    ts = tb_load_seed("torch_offsets.bin");
    static const unsigned tail[6] = {10, 11, 12, 13, 14, 15}, mid[4] = {3, 4, 5, 6};
    const uint64_t s6[1] = {6}, s22[2] = {2, 2};
    tb_expect_ar(ts, "tail", 1, s6, tail, 6);
    tb_expect_ar(ts, "mid", 2, s22, mid, 4);
    tb_expect_ar(ts, "empty", 1, s0, NULL, 0);
    lm_ts_free(ts);
}

Test(torch_bin, dtypes_and_big_endian)
{
    static const uint16_t h[2] = {0x3c00, 0xc000}, bf[2] = {0x3f80, 0x4049};
    static const float f[1] = {1.5f};
    static const int64_t l[1] = {-5};
    uint64_t s2[1] = {2}, s1[1] = {1}, one[1] = {1};
    tb_buf pkl = {0};
    tb_dict_begin(&pkl);
    tb_str(&pkl, "h");
    tb_tensor(&pkl, "HalfStorage", "0", 2, 0, 1, s2, one);
    tb_str(&pkl, "bf");
    tb_tensor(&pkl, "BFloat16Storage", "1", 2, 0, 1, s2, one);
    tb_str(&pkl, "f");
    tb_tensor(&pkl, "FloatStorage", "2", 1, 0, 1, s1, one);
    tb_str(&pkl, "l");
    tb_tensor(&pkl, "LongStorage", "3", 1, 0, 1, s1, one);
    tb_dict_end(&pkl);
    const void *st[4] = {h, bf, f, l};
    size_t nb[4] = {4, 4, 4, 8};
    uint8_t *z;
    size_t nz;
    tb_ckpt("dtypes.bin", &pkl, st, nb, 4, "little", 0, &z, &nz);
    lm_tensor_set *ts;
    lm_err err;
    cr_assert_eq(tb_load(z, nz, &ts, &err), LM_OK, "%s", err.msg);
    cr_assert_eq(lm_ts_find(ts, "h")->dtype, LM_DT_F16);
    cr_assert_eq(lm_ts_find(ts, "bf")->dtype, LM_DT_BF16);
    cr_assert_eq(lm_ts_find(ts, "f")->dtype, LM_DT_F32);
    cr_assert_eq(lm_ts_find(ts, "l")->dtype, LM_DT_I64);
    cr_assert(memcmp(lm_ts_find(ts, "h")->data, h, 4) == 0);
    cr_assert(memcmp(lm_ts_find(ts, "bf")->data, bf, 4) == 0);
    cr_assert(memcmp(lm_ts_find(ts, "f")->data, f, 4) == 0);
    cr_assert(memcmp(lm_ts_find(ts, "l")->data, l, 8) == 0);
    lm_ts_free(ts);
    free(z);

    /* the same values stored big-endian come back little-endian */
    uint8_t hb[4], bfb[4], fb[4], lb[8];
    for (int i = 0; i < 4; i++) {
        hb[i] = ((const uint8_t *)h)[i ^ 1];
        bfb[i] = ((const uint8_t *)bf)[i ^ 1];
        fb[i] = ((const uint8_t *)f)[3 - i];
    }
    for (int i = 0; i < 8; i++)
        lb[i] = ((const uint8_t *)l)[7 - i];
    const void *stb[4] = {hb, bfb, fb, lb};
    tb_ckpt("dtypes_be.bin", &pkl, stb, nb, 4, "big", 0, &z, &nz);
    cr_assert_eq(tb_load(z, nz, &ts, &err), LM_OK, "%s", err.msg);
    cr_assert(memcmp(lm_ts_find(ts, "h")->data, h, 4) == 0);
    cr_assert(memcmp(lm_ts_find(ts, "bf")->data, bf, 4) == 0);
    cr_assert(memcmp(lm_ts_find(ts, "f")->data, f, 4) == 0);
    cr_assert(memcmp(lm_ts_find(ts, "l")->data, l, 8) == 0);
    lm_ts_free(ts);
    free(z);
    free(pkl.b);
}

/* protocol 4 spelling: FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE; an OrderedDict root with
 * its _metadata BUILD; a parameter around the tensor */
Test(torch_bin, protocol4_ordered_dict_parameter)
{
    static const float v[2] = {1, 2};
    uint8_t head[] = {0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0};
    tb_buf q = {0};
    tb_put(&q, head, sizeof head);
#define SB(s) do { tb_op(&q, 0x8c); tb_op(&q, (uint8_t)strlen(s)); tb_put(&q, s, strlen(s)); tb_op(&q, 0x94); } while (0)
    SB("collections");
    SB("OrderedDict");
    tb_op(&q, 0x93);
    tb_op(&q, ')');
    tb_op(&q, 'R');
    tb_op(&q, 0x94);
    tb_op(&q, '(');
    SB("w");
    SB("torch._utils");
    SB("_rebuild_parameter");
    tb_op(&q, 0x93);
    SB("torch._utils");
    SB("_rebuild_tensor_v2");
    tb_op(&q, 0x93);
    tb_op(&q, '(');
    tb_op(&q, '(');
    SB("storage");
    SB("torch");
    SB("FloatStorage");
    tb_op(&q, 0x93);
    SB("0");
    SB("cpu");
    tb_int(&q, 2);
    tb_op(&q, 't');
    tb_op(&q, 'Q');
    tb_int(&q, 0);
    tb_int(&q, 2);
    tb_op(&q, 0x85);
    tb_int(&q, 1);
    tb_op(&q, 0x85);
    tb_op(&q, 0x89);
    tb_op(&q, '}');
    tb_op(&q, 't');
    tb_op(&q, 'R');   /* tensor */
    tb_op(&q, 0x89);  /* requires_grad */
    tb_op(&q, '}');   /* hooks */
    tb_op(&q, 0x87);  /* (tensor, False, {}) */
    tb_op(&q, 'R');   /* parameter */
    tb_op(&q, 'u');
    /* BUILD with {'_metadata': {'': {'version': 1}}} */
    tb_op(&q, '}');
    SB("_metadata");
    tb_op(&q, '}');
    SB("");
    tb_op(&q, '}');
    SB("version");
    tb_int(&q, 1);
    tb_op(&q, 's');
    tb_op(&q, 's');
    tb_op(&q, 's');
    tb_op(&q, 'b');
    tb_op(&q, '.');
#undef SB
    const void *st[1] = {v};
    size_t nb[1] = {sizeof v};
    uint8_t *z;
    size_t nz;
    tb_ckpt("proto4.bin", &q, st, nb, 1, NULL, 1, &z, &nz);
    lm_tensor_set *ts;
    lm_err err;
    cr_assert_eq(tb_load(z, nz, &ts, &err), LM_OK, "%s", err.msg);
    cr_assert_eq(ts->n, 1);
    cr_assert_str_eq(ts->t[0].name, "w");
    cr_assert(memcmp(ts->t[0].data, v, sizeof v) == 0);
    lm_ts_free(ts);
    free(z);
    free(q.b);
}

/* ---- hostile checkpoints ------------------------------------------------------------------ */

static const float tb_st4[4] = {1, 2, 3, 4};

/* A zip around a pickle with one storage "0" of 4 floats. */
static lm_code tb_load_pickle_zip(const tb_buf *pkl, lm_err *err)
{
    const void *st[1] = {tb_st4};
    size_t nb[1] = {sizeof tb_st4};
    uint8_t *z;
    size_t nz;
    tb_ckpt("hostile.bin", pkl, st, nb, 1, NULL, 0, &z, &nz);
    lm_tensor_set *ts;
    lm_code rc = tb_load(z, nz, &ts, err);
    cr_assert(rc != LM_OK || ts != NULL);
    lm_ts_free(ts);
    free(z);
    return rc;
}

static void tb_system_call(tb_buf *p, int stack_global, const char *mod, const char *name)
{
    tb_dict_begin(p);
    tb_str(p, "x");
    if (stack_global) {
        tb_str(p, mod);
        tb_str(p, name);
        tb_op(p, 0x93);
    } else {
        tb_global(p, mod, name);
    }
    tb_str(p, "echo pwned");
    tb_op(p, 0x85);
    tb_op(p, 'R');
    tb_dict_end(p);
}

Test(torch_bin, refuses_os_system_global_and_stack_global)
{
    const struct { int sg; const char *mod, *name, *shown; } cases[] = {
        {0, "posix", "system", "'posix.system'"}, {1, "os", "system", "'os.system'"},
        {0, "builtins", "eval", "'builtins.eval'"}, {0, "builtins", "getattr", "'builtins.getattr'"},
        {1, "subprocess", "Popen", "'subprocess.Popen'"}, {0, "torch", "load", "'torch.load'"},
        {0, "builtins", "__import__", "'builtins.__import__'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tb_buf p = {0};
        tb_system_call(&p, cases[i].sg, cases[i].mod, cases[i].name);
        lm_err err;
        lm_code rc = tb_load_pickle_zip(&p, &err);
        tb_expect_err(rc, err, LM_E_UNSUPPORTED, "ForbiddenGlobal", cases[i].shown);
        cr_assert(strstr(err.msg, "forbidden global") != NULL);
        cr_assert_str_eq(err.path, "test.bin");
        cr_assert(err.offset > 0 && err.offset < p.n);
        char line[1400];
        lm_err_format(&err, line, sizeof line);
        cr_assert(strstr(line, "(at byte ") != NULL);
        free(p.b);
    }
    /* the exact example position: GLOBAL at byte 10 of "\x80\x02}(X\x01\x00\x00\x00x" */
    tb_buf p = {0};
    tb_system_call(&p, 0, "posix", "system");
    lm_err err;
    tb_load_pickle_zip(&p, &err);
    cr_assert_eq(err.offset, 10);
    free(p.b);
}

Test(torch_bin, refuses_reduce_on_storage_and_inst_newobj)
{
    tb_buf p = {0};
    tb_dict_begin(&p);
    tb_str(&p, "x");
    tb_global(&p, "torch", "FloatStorage");
    tb_op(&p, ')');
    tb_op(&p, 'R');
    tb_dict_end(&p);
    lm_err err;
    lm_code rc = tb_load_pickle_zip(&p, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "ForbiddenCall", "'torch.FloatStorage'");
    free(p.b);

    tb_buf q = {0};
    tb_dict_begin(&q);
    tb_str(&q, "x");
    tb_op(&q, '(');
    tb_str(&q, "id");
    tb_op(&q, 'i');
    tb_put(&q, "os\nsystem\n", 10);
    tb_dict_end(&q);
    rc = tb_load_pickle_zip(&q, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "ForbiddenGlobal", "'os.system'");
    free(q.b);

    tb_buf r = {0};
    tb_dict_begin(&r);
    tb_str(&r, "x");
    tb_global(&r, "collections", "OrderedDict");
    tb_op(&r, ')');
    tb_op(&r, 0x81);
    tb_dict_end(&r);
    rc = tb_load_pickle_zip(&r, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "UnsupportedOpcode", "NEWOBJ");
    free(r.b);
}

Test(torch_bin, refuses_views_outside_storage)
{
    uint64_t s2[1] = {2}, one[1] = {1}, s22[2] = {2, 2}, st22[2] = {3, 1};
    struct { uint64_t numel, offset; size_t nd; const uint64_t *sh, *st; const char *needle; } cases[] = {
        {4, 3, 1, s2, one, "outside storage '0'"},     /* offset 3 + 1 element = index 4 */
        {4, 9, 1, s2, one, "outside storage '0'"},     /* offset past the data */
        {4, 0, 2, s22, st22, "outside storage '0'"},   /* size*stride: last index 3+1 = 4 */
    };
    for (size_t i = 0; i < 3; i++) {
        tb_buf p = {0};
        tb_dict_begin(&p);
        tb_str(&p, "w");
        tb_tensor(&p, "FloatStorage", "0", cases[i].numel, cases[i].offset, cases[i].nd, cases[i].sh, cases[i].st);
        tb_dict_end(&p);
        lm_err err;
        lm_code rc = tb_load_pickle_zip(&p, &err);
        tb_expect_err(rc, err, LM_E_FORMAT, "InvalidStorage", cases[i].needle);
        free(p.b);
    }
    /* declared larger than the entry holds */
    tb_buf p = {0};
    tb_dict_begin(&p);
    tb_str(&p, "w");
    tb_tensor(&p, "FloatStorage", "0", 1000000, 0, 1, s2, one);
    tb_dict_end(&p);
    lm_err err;
    lm_code rc = tb_load_pickle_zip(&p, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidStorage", "declares 4000000 bytes");
    free(p.b);
    /* a broadcast (stride 0) view with more elements than the storage */
    uint64_t big[1] = {100}, zero[1] = {0};
    tb_buf b = {0};
    tb_dict_begin(&b);
    tb_str(&b, "w");
    tb_tensor(&b, "FloatStorage", "0", 4, 0, 1, big, zero);
    tb_dict_end(&b);
    rc = tb_load_pickle_zip(&b, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "UnsupportedStorage", "broadcast");
    free(b.b);
}

Test(torch_bin, refuses_missing_storage_entry)
{
    uint64_t s2[1] = {2}, one[1] = {1};
    tb_buf p = {0};
    tb_dict_begin(&p);
    tb_str(&p, "w");
    tb_tensor(&p, "FloatStorage", "7", 2, 0, 1, s2, one);
    tb_dict_end(&p);
    lm_err err;
    lm_code rc = tb_load_pickle_zip(&p, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidStorage", "storage '7' is missing from the archive");
    cr_assert(strstr(err.msg, "archive/data/7") != NULL);
    free(p.b);
}

Test(torch_bin, refuses_non_tensor_value)
{
    uint64_t s2[1] = {2}, one[1] = {1};
    tb_buf p = {0};
    tb_dict_begin(&p);
    tb_str(&p, "w");
    tb_tensor(&p, "FloatStorage", "0", 4, 0, 1, s2, one);
    tb_str(&p, "epoch");
    tb_int(&p, 5);
    tb_dict_end(&p);
    lm_err err;
    lm_code rc = tb_load_pickle_zip(&p, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "NonTensorValue", "key 'epoch' is a int");
    cr_assert_str_eq(err.tensor, "epoch");
    free(p.b);

    tb_buf l = {0};
    uint8_t root[] = {0x80, 2, ']', '.'};
    tb_put(&l, root, sizeof root);
    rc = tb_load_pickle_zip(&l, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "NotAStateDict", "list");
    free(l.b);
}

Test(torch_bin, refuses_truncated_and_corrupt_zips)
{
    tb_buf pkl = {0};
    tb_two_tensors(&pkl);
    const void *st[2] = {tb_f6, tb_i4};
    size_t nb[2] = {sizeof tb_f6, sizeof tb_i4};
    uint8_t *z;
    size_t nz;
    tb_ckpt("cut.bin", &pkl, st, nb, 2, NULL, 0, &z, &nz);
    size_t cuts[] = {4, 5, 30, 100, nz / 3, nz / 2, nz - 100, nz - 22, nz - 21, nz - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        lm_tensor_set *ts;
        lm_err err;
        lm_code rc = tb_load(z, cuts[i], &ts, &err);
        cr_assert_neq(rc, LM_OK, "cut at %zu accepted", cuts[i]);
        cr_assert_eq(rc, LM_E_FORMAT, "cut at %zu: %s", cuts[i], err.msg);
        cr_assert_str_eq(err.kind, "InvalidZip", "cut at %zu: %s", cuts[i], err.msg);
        cr_assert_str_eq(err.path, "test.bin");
        cr_assert(ts == NULL);
    }
    /* corrupt the central directory: each "PK\1\2" signature, and the end record's offset */
    uint8_t *c = malloc(nz);
    for (size_t i = 0; i + 4 <= nz; i++) {
        if (memcmp(z + i, "PK\1\2", 4) != 0)
            continue;
        memcpy(c, z, nz);
        c[i + 2] = 9;
        lm_tensor_set *ts;
        lm_err err;
        lm_code rc = tb_load(c, nz, &ts, &err);
        cr_assert_eq(rc, LM_E_FORMAT, "CD at %zu: %s", i, err.msg);
        cr_assert_str_eq(err.kind, "InvalidZip");
    }
    memcpy(c, z, nz);
    c[nz - 22 + 16] ^= 0x55; /* EOCD: offset of the central directory */
    lm_tensor_set *ts;
    lm_err err;
    lm_code rc = tb_load(c, nz, &ts, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidZip", "not a readable zip archive");
    /* a flipped data byte in a storage: CRC error */
    memcpy(c, z, nz);
    for (size_t i = 0; i + 8 <= nz; i++)
        if (memcmp(c + i, tb_i4, 8) == 0) {
            c[i] ^= 1;
            break;
        }
    rc = tb_load(c, nz, &ts, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidZip", "cannot read archive entry 'archive/data/1'");
    free(c);
    free(z);
    free(pkl.b);
}

Test(torch_bin, refuses_non_checkpoints)
{
    lm_tensor_set *ts;
    lm_err err;
    lm_code rc = tb_load("hello", 5, &ts, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "NotACheckpoint", "neither zip nor legacy");
    rc = tb_load("\x80\x02K\x05.", 5, &ts, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "NotACheckpoint", "magic");
    tb_entry e[1] = {{"readme.txt", "hi", 2}};
    uint8_t *z;
    size_t nz;
    tb_zip("plain.zip", e, 1, 0, &z, &nz);
    rc = tb_load(z, nz, &ts, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "NotACheckpoint", "not a torch checkpoint");
    free(z);
    lm_err_clear(&err);
    rc = lm_torch_bin_load("/nonexistent/adapter_model.bin", &ts, &err);
    cr_assert_eq(rc, LM_E_IO);
    cr_assert_str_eq(err.path, "/nonexistent/adapter_model.bin");
}

/* ---- the pickle machine alone ------------------------------------------------------------- */

static lm_code tb_parse(const void *b, size_t n, const lm_pk_limits *lim, lm_err *err)
{
    lm_pk_options opt;
    memset(&opt, 0, sizeof opt);
    if (lim != NULL)
        opt.limits = *lim;
    lm_pickle *pk = NULL;
    lm_err_clear(err);
    lm_code rc = lm_pk_parse(b, n, &opt, &pk, NULL, err);
    cr_assert((rc == LM_OK) == (pk != NULL));
    lm_pk_free(pk);
    return rc;
}

Test(pickle, unknown_and_disallowed_opcodes)
{
    lm_err err;
    lm_code rc = tb_parse("\x80\x02\xff.", 4, NULL, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "UnsupportedOpcode", "unknown pickle opcode 0xff");
    cr_assert_eq(err.offset, 2);
    rc = tb_parse("\x80\x02(S'x'\n.", 10, NULL, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "UnsupportedOpcode", "STRING");
    rc = tb_parse("\x80\x02]\x8f.", 5, NULL, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "UnsupportedOpcode", "EMPTY_SET");
    rc = tb_parse("\x80\x09N.", 4, NULL, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "UnsupportedOpcode", "protocol 9");
}

Test(pickle, malformed)
{
    lm_err err;
    lm_code rc = tb_parse("\x80\x02]", 3, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "TruncatedPickle", "without STOP");
    rc = tb_parse("\x80\x02X\xff\xff\x00\x00" "ab.", 10, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "TruncatedPickle", "truncated");
    rc = tb_parse("\x80\x02h\x05.", 4, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidPickle", "memo key 5");
    rc = tb_parse("\x80\x02R.", 4, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidPickle", "underflow");
    rc = tb_parse("\x80\x02NN.", 5, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidPickle", "2 values");
    rc = tb_parse("\x80\x02\x8c\x02\xc3\x28.", 7, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidPickle", "UTF-8");
    rc = tb_parse("\x80\x02K\x01K\x02s.", 8, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidPickle", "underflow");
    rc = tb_parse("\x80\x02NK\x01K\x02s.", 9, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "InvalidPickle", "SETITEM on a None");
}

Test(pickle, bomb_deep_nesting)
{
    /* MARK nesting */
    tb_buf p = {0};
    tb_op(&p, 0x80);
    tb_op(&p, 2);
    for (int i = 0; i < 100000; i++)
        tb_op(&p, '(');
    tb_op(&p, '.');
    lm_err err;
    lm_code rc = tb_parse(p.b, p.n, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "PickleTooDeep", "MARKs deeper than 100");
    free(p.b);
    /* container nesting: 1000 empty lists, each appended into the one below */
    tb_buf q = {0};
    tb_op(&q, 0x80);
    tb_op(&q, 2);
    for (int i = 0; i < 1000; i++)
        tb_op(&q, ']');
    for (int i = 0; i < 999; i++)
        tb_op(&q, 'a');
    tb_op(&q, '.');
    rc = tb_parse(q.b, q.n, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "PickleTooDeep", "containers deeper than 100");
    free(q.b);
    /* a list appended into itself */
    rc = tb_parse("\x80\x02]q\x00(h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00"
                  "h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00"
                  "h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00"
                  "h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00"
                  "h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00"
                  "h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00" "e.", 6 + 2 * 111 + 2, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "PickleTooDeep", "containers deeper");
}

Test(pickle, bomb_memo_fan_out)
{
    /* billion laughs: L0 = (); Lk = [L(k-1)] * 1000 for k = 1..6 -- 10^18 leaves in Python's
     * view, 6000 references here; then the root is refused as not a state dict */
    tb_buf p = {0};
    uint8_t head[] = {0x80, 2, ')', 'q', 0, '0'};
    tb_put(&p, head, sizeof head);
    for (int k = 1; k <= 6; k++) {
        tb_op(&p, ']');
        tb_op(&p, '(');
        for (int i = 0; i < 1000; i++) {
            tb_op(&p, 'h');
            tb_op(&p, (uint8_t)(k - 1));
        }
        tb_op(&p, 'e');
        tb_op(&p, 'q');
        tb_op(&p, (uint8_t)k);
        if (k < 6)
            tb_op(&p, '0'); /* POP: keep only the memo */
    }
    tb_op(&p, '.');
    lm_err err;
    lm_code rc = tb_parse(p.b, p.n, NULL, &err);
    cr_assert_eq(rc, LM_OK, "%s", err.msg);
    lm_tensor_set *ts;
    rc = tb_load_pickle_zip(&p, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "NotAStateDict", "list");
    (void)ts;
    /* the same with a small item budget is refused */
    lm_pk_limits lim = {0};
    lim.max_items = 2500;
    rc = tb_parse(p.b, p.n, &lim, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "PickleTooLarge", "more than 2500 container items");
    free(p.b);

    /* one BINGET repeated past the stack limit */
    tb_buf s = {0};
    uint8_t h2[] = {0x80, 2, ']', 'q', 0, '('};
    tb_put(&s, h2, sizeof h2);
    for (int i = 0; i < 300000; i++) {
        tb_op(&s, 'h');
        tb_op(&s, 0);
    }
    tb_op(&s, 'e');
    tb_op(&s, '.');
    rc = tb_parse(s.b, s.n, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "PickleTooLarge", "stack grows beyond 262144");
    free(s.b);

    /* object count and memo key limits */
    tb_buf o = {0};
    uint8_t h3[] = {0x80, 2, ']', '('};
    tb_put(&o, h3, sizeof h3);
    for (int i = 0; i < 2000; i++)
        tb_op(&o, ')');
    tb_op(&o, 'e');
    tb_op(&o, '.');
    lm_pk_limits lim2 = {0};
    lim2.max_objects = 1000;
    rc = tb_parse(o.b, o.n, &lim2, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "PickleTooLarge", "more than 1000 objects");
    free(o.b);
    rc = tb_parse("\x80\x02Nr\xff\xff\xff\x7f.", 9, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "PickleTooLarge", "memo key 2147483647");
    rc = tb_parse("\x80\x02\x8d\x00\x00\x00\x00\x00\x00\x00\x40.", 12, NULL, &err);
    tb_expect_err(rc, err, LM_E_FORMAT, "PickleTooLarge", "string of");
}

Test(pickle, values_and_accessors)
{
    /* (1, -2, 70000, 2**64 + 1 (BIGINT), 1.5, 'é', None, True, [], {}) */
    static const uint8_t b[] = {0x80, 2, '(', 'K', 1, 'J', 0xfe, 0xff, 0xff, 0xff, 'J', 0x70, 0x11, 1, 0,
                                0x8a, 9, 1, 0, 0, 0, 0, 0, 0, 0, 1, 'G', 0x3f, 0xf8, 0, 0, 0, 0, 0, 0,
                                0x8c, 2, 0xc3, 0xa9, 'N', 0x88, ']', '}', 't', '.', 'x'};
    lm_pk_options opt;
    memset(&opt, 0, sizeof opt);
    lm_pickle *pk;
    lm_err err;
    lm_err_clear(&err);
    size_t used;
    cr_assert_eq(lm_pk_parse(b, sizeof b, &opt, &pk, &used, &err), LM_OK, "%s", err.msg);
    cr_assert_eq(used, sizeof b - 1);
    lm_pk_ref t = lm_pk_root(pk);
    cr_assert_eq(lm_pk_kind_of(pk, t), LM_PK_TUPLE);
    cr_assert_eq(lm_pk_len(pk, t), 10);
    int64_t v;
    cr_assert(lm_pk_int(pk, lm_pk_item(pk, t, 0), &v) && v == 1);
    cr_assert(lm_pk_int(pk, lm_pk_item(pk, t, 1), &v) && v == -2);
    cr_assert(lm_pk_int(pk, lm_pk_item(pk, t, 2), &v) && v == 70000);
    size_t n;
    cr_assert_eq(lm_pk_kind_of(pk, lm_pk_item(pk, t, 3)), LM_PK_BIGINT);
    cr_assert(lm_pk_bytes(pk, lm_pk_item(pk, t, 3), &n) != NULL && n == 9);
    cr_assert_eq(lm_pk_kind_of(pk, lm_pk_item(pk, t, 4)), LM_PK_FLOAT);
    const uint8_t *s = lm_pk_bytes(pk, lm_pk_item(pk, t, 5), &n);
    cr_assert(n == 2 && s[0] == 0xc3);
    cr_assert_eq(lm_pk_kind_of(pk, lm_pk_item(pk, t, 6)), LM_PK_NONE);
    cr_assert(lm_pk_int(pk, lm_pk_item(pk, t, 7), &v) && v == 1);
    cr_assert_eq(lm_pk_kind_of(pk, lm_pk_item(pk, t, 8)), LM_PK_LIST);
    cr_assert_eq(lm_pk_kind_of(pk, lm_pk_item(pk, t, 9)), LM_PK_DICT);
    lm_pk_free(pk);
}

/* The fuzz-oriented entry point: storages come from a callback. */
static lm_code tb_storage_cb(void *ctx, const char *key, lm_dtype dtype, uint64_t n_bytes, const void **data, lm_err *err)
{
    (void)ctx;
    if (strcmp(key, "0") != 0 || dtype != LM_DT_F32 || n_bytes != sizeof tb_st4)
        return lm_fail(err, LM_E_FORMAT, "InvalidStorage", "no storage '%s'", key);
    *data = tb_st4;
    return LM_OK;
}

Test(pickle, torch_pickle_load_with_callback)
{
    uint64_t s2[1] = {2}, one[1] = {1};
    tb_buf p = {0};
    tb_dict_begin(&p);
    tb_str(&p, "w");
    tb_tensor(&p, "FloatStorage", "0", 4, 1, 1, s2, one);
    tb_dict_end(&p);
    lm_tensor_set *ts;
    lm_err err;
    lm_err_clear(&err);
    cr_assert_eq(lm_torch_pickle_load(p.b, p.n, "mem", tb_storage_cb, NULL, &ts, &err), LM_OK, "%s", err.msg);
    cr_assert_eq(((const float *)ts->t[0].data)[0], 2.0f);
    cr_assert_eq(((const float *)ts->t[0].data)[1], 3.0f);
    lm_ts_free(ts);
    free(p.b);
}

Test(pickle, forbidden_global_name_is_sanitized)
{
    tb_buf p = {0};
    uint8_t h[] = {0x80, 2};
    tb_put(&p, h, 2);
    char mod[201];
    memset(mod, 'm', 200);
    mod[0] = '\x1b';
    mod[200] = '\0';
    tb_global(&p, mod, "sys\ttem");
    tb_op(&p, '.');
    lm_err err;
    lm_code rc = tb_parse(p.b, p.n, NULL, &err);
    tb_expect_err(rc, err, LM_E_UNSUPPORTED, "ForbiddenGlobal", "'?mmm");
    cr_assert(strstr(err.msg, "....sys?tem'") != NULL, "%s", err.msg);
    cr_assert(strchr(err.msg, '\x1b') == NULL && strchr(err.msg, '\t') == NULL);
    free(p.b);
}

/* libzip is loaded on first use (torch_bin.c): when it cannot be, a zip checkpoint is refused in
 * one line naming the file and the library, and nothing else changes (LM_FAULT's "dlopen": the
 * load fails as a missing library would) */
Test(torch_bin, zip_without_libzip_refused_in_one_line)
{
    char *tmp = th_tmpdir();
    char path[1200], cmd[4000];
    snprintf(path, sizeof path, "%s/adapter_model.bin", tmp);
    static const double v[4] = {1, 2, 3, 4};
    th_out_tensor t = {"base_model.model.lm_marker_tensor", "F32", 1, {4}, v};
    cr_assert_eq(th_torch_save(path, 0, &t, 1, 0, "cpu"), 0);
    for (int faulted = 0; faulted < 2; faulted++) {
        snprintf(cmd, sizeof cmd, "%s'%s' inspect '%s'", faulted ? "LM_FAULT=1:EIO:dlopen " : "", th_bin(), path);
        th_run_result r = th_sh(cmd);
        if (faulted) {
            cr_assert_neq(r.status, 0);
            cr_assert(strstr(r.err, "MissingLibrary") != NULL && strstr(r.err, "libzip") != NULL &&
                          strstr(r.err, path) != NULL, "%s", r.err);
            cr_assert(strchr(r.err, '\n') == r.err + strlen(r.err) - 1, "not one line: %s", r.err);
        } else { /* read: the tensor's name comes from inside the zip */
            cr_assert(strstr(r.err, "MissingLibrary") == NULL, "%s", r.err);
            cr_assert(strstr(r.out, "lm_marker_tensor") != NULL || strstr(r.err, "lm_marker_tensor") != NULL,
                      "out: %s err: %s", r.out, r.err);
        }
        th_run_free(&r);
    }
    th_rmrf(tmp);
    free(tmp);
}
