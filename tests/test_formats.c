/* SPDX-License-Identifier: MIT */
/* test_formats.c : adapters of other tools (src/peft/adapter_formats.c, formats_*.c).
 *
 * Two kinds of checks:
 *  - generated adapters in every format, small, merged into generated bases and compared element
 *    by element with each format's rule computed here in double precision from the stored values
 *    (kohya alpha / r, LoCon's Tucker core, LoHa, LoKr, LyCORIS IA3 and full deltas, mlx-lm's
 *    transposed factors and its two scale rules, torchtune's per-head row permutation, diffusers'
 *    three spellings and metadata alphas, loralib, LoRA-SAM's fused qkv, lora_diffusion and raw
 *    up/down folders with and without names), plus every refusal;
 *  - the real files of ../shared/fixtures/adapters-other (skipped visibly when absent), against
 *    bases built from their shapes and names: small ones merged and compared, large ones (SD UNets,
 *    FLUX) converted with a sparse base and every output tensor compared with the input tensor it
 *    must be (the mapping and the scale are what those files test).
 * Convert round trips: merging the converted directory gives the same bytes as merging the input. */
#include "th.h"

#include "lora_merge.h"
#include "tensor_set.h"
#include "torch_bin.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define OTHER TH_SHARED "/adapters-other"

/* ============================================================================================ */
/* helpers                                                                                       */
/* ============================================================================================ */
typedef struct {
    char name[300];
    char dtype[8];
    int n_dims;
    uint64_t shape[8];
    uint64_t n;
    double *v; /* values exactly as stored (already rounded to dtype) */
} tt;

typedef struct {
    tt t[400];
    size_t n;
} tset;

static uint64_t g_seed = 0x5eed;

static tt *tadd(tset *s, const char *dtype, const char *name, int n_dims, ...)
{
    cr_assert(s->n < 400);
    tt *t = &s->t[s->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
    t->n_dims = n_dims;
    t->n = 1;
    va_list ap;
    va_start(ap, n_dims);
    for (int d = 0; d < n_dims; d++) {
        t->shape[d] = va_arg(ap, uint64_t);
        t->n *= t->shape[d];
    }
    va_end(ap);
    t->v = malloc((t->n ? t->n : 1) * sizeof *t->v);
    for (uint64_t i = 0; i < t->n; i++)
        t->v[i] = th_round_to(th_rand_uniform(&g_seed), dtype);
    return t;
}

/* a scalar with a given value */
static tt *tscalar(tset *s, const char *dtype, const char *name, double v)
{
    tt *t = tadd(s, dtype, name, 0);
    t->v[0] = th_round_to(v, dtype);
    return t;
}

static tt *tfind(tset *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->t[i].name, name) == 0)
            return &s->t[i];
    cr_assert_fail("no tensor %s in the test set", name);
    return NULL;
}

static void tfree(tset *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->t[i].v);
    s->n = 0;
}

static void twrite_meta(const char *path, const tset *s, const char *const *mk, const char *const *mv, size_t n_meta)
{
    th_out_tensor *o = calloc(s->n + 1, sizeof *o);
    for (size_t i = 0; i < s->n; i++) {
        o[i].name = s->t[i].name;
        o[i].dtype = s->t[i].dtype;
        o[i].n_dims = s->t[i].n_dims;
        memcpy(o[i].shape, s->t[i].shape, sizeof o[i].shape);
        o[i].values = s->t[i].v;
    }
    cr_assert_eq(th_st_write_meta(path, o, s->n, mk, mv, n_meta), 0, "cannot write %s", path);
    free(o);
}

static void twrite(const char *path, const tset *s)
{
    twrite_meta(path, s, NULL, NULL, 0);
}

/* removes the test directory and frees what a test made (NULL entries are skipped) */
static void cleanup(char *dir, tset *s1, tset *s2, tset *s3, char *p1, char *p2, char *p3, char *p4)
{
    tset *sets[3] = {s1, s2, s3};
    char *strs[4] = {p1, p2, p3, p4};
    for (int i = 0; i < 3; i++)
        if (sets[i])
            tfree(sets[i]);
    for (int i = 0; i < 4; i++)
        free(strs[i]);
    th_rmrf(dir);
    free(dir);
}

static void tsave_torch(const char *path, const tset *s, int root)
{
    th_out_tensor *o = calloc(s->n + 1, sizeof *o);
    for (size_t i = 0; i < s->n; i++) {
        o[i].name = s->t[i].name;
        o[i].dtype = s->t[i].dtype;
        o[i].n_dims = s->t[i].n_dims;
        memcpy(o[i].shape, s->t[i].shape, sizeof o[i].shape);
        o[i].values = s->t[i].v;
    }
    cr_assert_eq(th_torch_save(path, root, o, s->n, 1, "cuda:0"), 0, "cannot write %s", path);
    free(o);
}

static char *pjoin(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", a, b);
    return p;
}

static void write_text(const char *path, const char *text)
{
    cr_assert_eq(th_write_file(path, text, strlen(text)), 0, "cannot write %s", path);
}

/* a base directory: model.safetensors (+ config.json when config != NULL) */
static void write_base(const char *dir, const tset *s, const char *config)
{
    char *p = pjoin(dir, "model.safetensors");
    twrite(p, s);
    free(p);
    if (config) {
        p = pjoin(dir, "config.json");
        write_text(p, config);
        free(p);
    }
}

/* a sparse safetensors file (all zeros): names and shapes only, as big as the real thing costs
 * nothing on disk; enough for convert and dry runs */
typedef struct {
    char name[300];
    int n_dims;
    uint64_t shape[4];
} sp_tensor;

typedef struct {
    sp_tensor *t;
    size_t n, cap;
} sp_set;

static void sp_add(sp_set *s, const char *name, int n_dims, const uint64_t *shape)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->t[i].name, name) == 0)
            return;
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->t = realloc(s->t, s->cap * sizeof *s->t);
    }
    sp_tensor *t = &s->t[s->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = n_dims;
    memcpy(t->shape, shape, (size_t)n_dims * sizeof *shape);
}

static void sp_add2(sp_set *s, const char *name, uint64_t a, uint64_t b)
{
    uint64_t sh[2] = {a, b};
    sp_add(s, name, 2, sh);
}

static void sp_write(const char *dir, const sp_set *s, const char *config)
{
    cJSON *root = cJSON_CreateObject();
    uint64_t off = 0;
    for (size_t i = 0; i < s->n; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "dtype", "BF16");
        cJSON *sh = cJSON_AddArrayToObject(e, "shape");
        uint64_t ne = 1;
        for (int d = 0; d < s->t[i].n_dims; d++) {
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)s->t[i].shape[d]));
            ne *= s->t[i].shape[d];
        }
        cJSON *of = cJSON_AddArrayToObject(e, "data_offsets");
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)(off + 2 * ne)));
        off += 2 * ne;
        cJSON_AddItemToObject(root, s->t[i].name, e);
    }
    char *hdr = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    size_t hl = strlen(hdr), padded = (hl + 7) / 8 * 8;
    char *p = pjoin(dir, "model.safetensors");
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    cr_assert(fd >= 0);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)(padded >> (8 * i));
    cr_assert_eq(write(fd, len8, 8), 8);
    cr_assert_eq(write(fd, hdr, hl), (ssize_t)hl);
    for (size_t i = hl; i < padded; i++)
        cr_assert_eq(write(fd, " ", 1), 1);
    cr_assert_eq(ftruncate(fd, (off_t)(8 + padded + off)), 0);
    close(fd);
    free(hdr);
    free(p);
    if (config) {
        p = pjoin(dir, "config.json");
        write_text(p, config);
        free(p);
    }
}

static void sp_free(sp_set *s)
{
    free(s->t);
    memset(s, 0, sizeof *s);
}

static void need_other(void)
{
    if (!th_exists(OTHER "/README.md"))
        cr_skip_test("SKIPPED: %s is absent", OTHER);
}

/* ---- merging ------------------------------------------------------------------------------- */
typedef struct {
    lm_code rc;
    lm_err err;
    lm_merge_report *rep;
    char line[2048];
} mres;

static mres merge_ex(const char *base, const char *adapter, const char *out, const lm_format_opts *fo, double w,
                     int dry)
{
    mres r;
    memset(&r, 0, sizeof r);
    lm_err_clear(&r.err);
    lm_merge_adapter a = {adapter, w};
    lm_merge_job job;
    memset(&job, 0, sizeof job);
    job.base_path = base;
    job.out_path = out;
    job.adapters = &a;
    job.n_adapters = 1;
    job.n_threads = 2;
    job.dry_run = dry;
    job.formats = fo;
    r.rc = lm_merge_run(&job, &r.rep, &r.err);
    lm_err_format(&r.err, r.line, sizeof r.line);
    return r;
}

static mres merge(const char *base, const char *adapter, const char *out, const lm_format_opts *fo)
{
    return merge_ex(base, adapter, out, fo, 1.0, 0);
}

static void mres_free(mres *r)
{
    lm_merge_report_free(r->rep);
    r->rep = NULL;
}

static int has_note(const mres *r, const char *needle)
{
    for (size_t i = 0; r->rep && i < r->rep->n_notes; i++)
        if (strstr(r->rep->notes[i], needle))
            return 1;
    return 0;
}

#define expect_ok(r) cr_assert_eq((r).rc, LM_OK, "merge failed: %s", (r).line)
#define expect_refused(r, kind_, needle)                                                           \
    do {                                                                                           \
        cr_assert_neq((r).rc, LM_OK, "expected a refusal (%s)", (kind_));                        \
        cr_assert_str_eq((r).err.kind, (kind_), "%s", (r).line);                                   \
        cr_assert(strstr((r).line, (needle)) != NULL, "'%s' not in: %s", (needle), (r).line);     \
    } while (0)

/* ---- the reference ------------------------------------------------------------------------ */
typedef struct {
    char name[300];
    char dtype[8];
    uint64_t n;
    double *w; /* base values, then the expected result */
} ref_t;

typedef struct {
    ref_t r[400];
    size_t n;
} refs;

static void refs_from(refs *R, const tset *base)
{
    R->n = base->n;
    for (size_t i = 0; i < base->n; i++) {
        snprintf(R->r[i].name, sizeof R->r[i].name, "%s", base->t[i].name);
        snprintf(R->r[i].dtype, sizeof R->r[i].dtype, "%s", base->t[i].dtype);
        R->r[i].n = base->t[i].n;
        R->r[i].w = malloc((base->t[i].n ? base->t[i].n : 1) * sizeof(double));
        memcpy(R->r[i].w, base->t[i].v, base->t[i].n * sizeof(double));
    }
}

static double *rw(refs *R, const char *name)
{
    for (size_t i = 0; i < R->n; i++)
        if (strcmp(R->r[i].name, name) == 0)
            return R->r[i].w;
    cr_assert_fail("no base tensor %s", name);
    return NULL;
}

static void refs_free(refs *R)
{
    for (size_t i = 0; i < R->n; i++)
        free(R->r[i].w);
    R->n = 0;
}

/* W[o, i] += s * sum_k B[o, k] A[k, i]   (W viewed [out, in]) */
static void ref_lowrank(double *w, const double *B, const double *A, uint64_t out, uint64_t r, uint64_t in, double s)
{
    for (uint64_t o = 0; o < out; o++)
        for (uint64_t i = 0; i < in; i++) {
            double acc = 0;
            for (uint64_t k = 0; k < r; k++)
                acc += B[o * r + k] * A[k * in + i];
            w[o * in + i] += s * acc;
        }
}

/* every base tensor of the output equals the reference (the golden rule per dtype) */
static void check_output(const char *out, refs *R)
{
    th_st st;
    cr_assert_eq(th_st_read(out, &st), 0, "cannot read %s", out);
    for (size_t i = 0; i < R->n; i++) {
        const th_tensor *t = th_st_find(&st, R->r[i].name);
        cr_assert(t != NULL, "output lacks %s", R->r[i].name);
        double *v = th_to_f64(t);
        th_cmp c = th_compare(R->r[i].dtype, v, R->r[i].w, R->r[i].n);
        cr_assert(c.ok, "%s (%s): %s (max %.3g ulp, max abs err %.3g)", R->r[i].name, R->r[i].dtype, c.why, c.max_ulp,
                  c.max_abs_err);
        free(v);
    }
    th_st_free(&st);
}

/* the output equals the reference; then both are freed */
static void check_and_free(const char *out, refs *R, mres *r)
{
    check_output(out, R);
    refs_free(R);
    mres_free(r);
}

/* ---- convert --------------------------------------------------------------------------------- */
static lm_code convert(const char *in, const char *out_dir, const char *base, const lm_format_opts *fo, lm_err *err,
                       char **notes)
{
    lm_err_clear(err);
    return lm_adapter_convert(in, out_dir, base, fo, notes, err);
}

static cJSON *read_json(const char *path)
{
    size_t n;
    uint8_t *b = th_read_file(path, &n);
    cr_assert(b != NULL, "cannot read %s", path);
    cJSON *j = cJSON_ParseWithLength((const char *)b, n);
    free(b);
    cr_assert(j != NULL, "%s is not JSON", path);
    return j;
}

/* the scale PEFT computes for module m from a config: alpha / r through the exact patterns */
static double config_scale(const cJSON *cfg, const char *module)
{
    const cJSON *r = cJSON_GetObjectItem(cfg, "r"), *a = cJSON_GetObjectItem(cfg, "lora_alpha");
    if (a == NULL)
        a = cJSON_GetObjectItem(cfg, "alpha");
    double rv = r->valuedouble, av = a->valuedouble;
    char key[600] = "^";
    size_t k = 1;
    for (const char *p = module; *p && k + 2 < sizeof key; p++) {
        if (*p == '.')
            key[k++] = '\\';
        key[k++] = *p;
    }
    key[k] = '\0';
    const cJSON *rp = cJSON_GetObjectItem(cfg, "rank_pattern"), *ap = cJSON_GetObjectItem(cfg, "alpha_pattern");
    if (rp && cJSON_GetObjectItem(rp, key))
        rv = cJSON_GetObjectItem(rp, key)->valuedouble;
    if (ap && cJSON_GetObjectItem(ap, key))
        av = cJSON_GetObjectItem(ap, key)->valuedouble;
    return av / rv;
}

static int bytes_equal(const th_tensor *t, const void *data, uint64_t n_bytes)
{
    return t->n_bytes == n_bytes && memcmp(t->data, data, n_bytes) == 0;
}

/* ============================================================================================ */
/* kohya-ss / LyCORIS                                                                            */
/* ============================================================================================ */
#define UNET_Q "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
#define UNET_PROJ "down_blocks.0.attentions.0.proj_in"
#define UNET_CONV "down_blocks.0.resnets.0.conv1"

/* a small diffusers-layout UNet: a Linear, a 1x1 and a 3x3 convolution (with biases), decoys */
static void unet_base(tset *b, const char *dtype)
{
    tadd(b, dtype, UNET_Q ".weight", 2, (uint64_t)8, (uint64_t)8);
    tadd(b, dtype, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight", 2, (uint64_t)8, (uint64_t)8);
    tadd(b, dtype, UNET_PROJ ".weight", 4, (uint64_t)8, (uint64_t)8, (uint64_t)1, (uint64_t)1);
    tadd(b, dtype, UNET_PROJ ".bias", 1, (uint64_t)8);
    tadd(b, dtype, UNET_CONV ".weight", 4, (uint64_t)6, (uint64_t)8, (uint64_t)3, (uint64_t)3);
    tadd(b, dtype, UNET_CONV ".bias", 1, (uint64_t)6);
}

Test(formats, kohya_lora_linear_and_convs)
{
    const char *dtypes[] = {"BF16", "F32"};
    for (int di = 0; di < 2; di++) {
        char *dir = th_tmpdir();
        tset base = {0}, ad = {0};
        unet_base(&base, dtypes[di]);
        write_base(dir, &base, NULL);
        /* Linear: alpha 2 (F16 0-d) with r 4: scale 0.5 */
        tt *qd = tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                      2, (uint64_t)4, (uint64_t)8);
        tt *qu = tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", 2,
                      (uint64_t)8, (uint64_t)4);
        tscalar(&ad, "F16", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha", 2.0);
        /* 1x1 conv: alpha 3 (BF16 0-d), r 2: scale 1.5 */
        tt *pd = tadd(&ad, "BF16", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", 4, (uint64_t)2,
                      (uint64_t)8, (uint64_t)1, (uint64_t)1);
        tt *pu = tadd(&ad, "BF16", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", 4, (uint64_t)8,
                      (uint64_t)2, (uint64_t)1, (uint64_t)1);
        tscalar(&ad, "BF16", "lora_unet_down_blocks_0_attentions_0_proj_in.alpha", 3.0);
        /* 3x3 conv: no alpha: scale 1 */
        tt *cd = tadd(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", 4, (uint64_t)3, (uint64_t)8,
                      (uint64_t)3, (uint64_t)3);
        tt *cu = tadd(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight", 4, (uint64_t)6, (uint64_t)3,
                      (uint64_t)1, (uint64_t)1);
        /* a text-encoder module: the UNet base has none, so that component is skipped (noted) */
        tadd(&ad, "F32", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", 2, (uint64_t)2,
             (uint64_t)8);
        tadd(&ad, "F32", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", 2, (uint64_t)8,
             (uint64_t)2);
        char *ap = pjoin(dir, "kohya.safetensors"), *out = pjoin(dir, "out.safetensors"), *bp = pjoin(dir, "model.safetensors");
        twrite(ap, &ad);
        mres r = merge(bp, ap, out, NULL);
        expect_ok(r);
        cr_assert(has_note(&r, "component 'lora_te'"), "the text-encoder part should be noted as skipped");
        cr_assert(has_note(&r, "kohya-ss"), "the format should be named in the notes");
        refs R;
        refs_from(&R, &base);
        ref_lowrank(rw(&R, UNET_Q ".weight"), qu->v, qd->v, 8, 4, 8, 2.0 / 4);
        ref_lowrank(rw(&R, UNET_PROJ ".weight"), pu->v, pd->v, 8, 2, 8, 3.0 / 2);
        ref_lowrank(rw(&R, UNET_CONV ".weight"), cu->v, cd->v, 6, 3, 8 * 9, 1.0);
        check_and_free(out, &R, &r);
        cleanup(dir, &base, &ad, NULL, ap, out, bp, NULL);
    }
}

/* LoCon's Tucker form: dW[p, c, x, y] = sum_ij up[p, i] mid[i, j, x, y] down[j, c] */
Test(formats, locon_tucker_mid)
{
    char *dir = th_tmpdir();
    tset base = {0}, ad = {0};
    unet_base(&base, "F32");
    write_base(dir, &base, NULL);
    tt *d = tadd(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", 4, (uint64_t)2, (uint64_t)8,
                 (uint64_t)1, (uint64_t)1);
    tt *m = tadd(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight", 4, (uint64_t)2, (uint64_t)2,
                 (uint64_t)3, (uint64_t)3);
    tt *u = tadd(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight", 4, (uint64_t)6, (uint64_t)2,
                 (uint64_t)1, (uint64_t)1);
    tscalar(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1.alpha", 1.0);
    char *ap = pjoin(dir, "locon.safetensors"), *out = pjoin(dir, "out.safetensors"), *bp = pjoin(dir, "model.safetensors");
    twrite(ap, &ad);
    mres r = merge(bp, ap, out, NULL);
    expect_ok(r);
    refs R;
    refs_from(&R, &base);
    double *w = rw(&R, UNET_CONV ".weight");
    for (int p = 0; p < 6; p++)
        for (int c = 0; c < 8; c++)
            for (int x = 0; x < 9; x++) {
                double s = 0;
                for (int i = 0; i < 2; i++)
                    for (int j = 0; j < 2; j++)
                        s += u->v[p * 2 + i] * m->v[(i * 2 + j) * 9 + x] * d->v[j * 8 + c];
                w[(p * 8 + c) * 9 + x] += 0.5 * s; /* alpha 1, r 2 */
            }
    check_and_free(out, &R, &r);
    cleanup(dir, &base, &ad, NULL, ap, out, bp, NULL);
}

/* LoHa and LoKr on a Linear; LoKr with both factors whole has scale 1 whatever alpha says */
Test(formats, lycoris_loha_and_lokr_linear)
{
    for (int kind = 0; kind < 3; kind++) {
        char *dir = th_tmpdir();
        tset base = {0}, ad = {0};
        unet_base(&base, "F32");
        write_base(dir, &base, NULL);
        const char *n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        char k[300];
        refs R;
        refs_from(&R, &base);
        double *w = rw(&R, UNET_Q ".weight");
        if (kind == 0) { /* LoHa r 2, alpha 3 */
            tt *t[4];
            const char *parts[4] = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"};
            for (int i = 0; i < 4; i++) {
                snprintf(k, sizeof k, "%s.%s", n, parts[i]);
                t[i] = i % 2 ? tadd(&ad, "F16", k, 2, (uint64_t)2, (uint64_t)8) : tadd(&ad, "F16", k, 2, (uint64_t)8, (uint64_t)2);
            }
            snprintf(k, sizeof k, "%s.alpha", n);
            tscalar(&ad, "F16", k, 3.0);
            for (int o = 0; o < 8; o++)
                for (int i = 0; i < 8; i++) {
                    double a = 0, b = 0;
                    for (int q = 0; q < 2; q++) {
                        a += t[0]->v[o * 2 + q] * t[1]->v[q * 8 + i];
                        b += t[2]->v[o * 2 + q] * t[3]->v[q * 8 + i];
                    }
                    w[o * 8 + i] += a * b * 1.5;
                }
        } else { /* LoKr: w1 [2, 4] (or w1_a [2, 1] @ w1_b [1, 4]), w2 [4, 2]: kron -> [8, 8] */
            tt *w1 = NULL, *w1a = NULL, *w1b = NULL, *w2;
            if (kind == 1) {
                snprintf(k, sizeof k, "%s.lokr_w1_a", n);
                w1a = tadd(&ad, "F32", k, 2, (uint64_t)2, (uint64_t)1);
                snprintf(k, sizeof k, "%s.lokr_w1_b", n);
                w1b = tadd(&ad, "F32", k, 2, (uint64_t)1, (uint64_t)4);
            } else {
                snprintf(k, sizeof k, "%s.lokr_w1", n);
                w1 = tadd(&ad, "F32", k, 2, (uint64_t)2, (uint64_t)4);
            }
            snprintf(k, sizeof k, "%s.lokr_w2", n);
            w2 = tadd(&ad, "F32", k, 2, (uint64_t)4, (uint64_t)2);
            snprintf(k, sizeof k, "%s.alpha", n);
            tscalar(&ad, "F32", k, 7.0); /* kind 1: scale 7 / 1; kind 2 (both whole): ignored, scale 1 */
            double s = kind == 1 ? 7.0 : 1.0;
            for (int a = 0; a < 2; a++)
                for (int c = 0; c < 4; c++) {
                    double x = kind == 1 ? w1a->v[a] * w1b->v[c] : w1->v[a * 4 + c];
                    for (int b = 0; b < 4; b++)
                        for (int d = 0; d < 2; d++)
                            w[(a * 4 + b) * 8 + c * 2 + d] += s * x * w2->v[b * 2 + d];
                }
        }
        char *ap = pjoin(dir, "lyco.safetensors"), *out = pjoin(dir, "out.safetensors"), *bp = pjoin(dir, "model.safetensors");
        twrite(ap, &ad);
        mres r = merge(bp, ap, out, NULL);
        expect_ok(r);
        check_and_free(out, &R, &r);
        cleanup(dir, &base, &ad, NULL, ap, out, bp, NULL);
    }
}

/* IA3 (W *= 1 + weight, per row or, with on_input, per column) and full deltas (diff, diff_b) */
Test(formats, lycoris_ia3_and_full)
{
    for (int kind = 0; kind < 3; kind++) {
        char *dir = th_tmpdir();
        tset base = {0}, ad = {0};
        unet_base(&base, "F32");
        write_base(dir, &base, NULL);
        refs R;
        refs_from(&R, &base);
        const char *n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        char k[300];
        if (kind < 2) {
            snprintf(k, sizeof k, "%s.weight", n);
            tt *l = tadd(&ad, "F32", k, 1, (uint64_t)8);
            snprintf(k, sizeof k, "%s.on_input", n);
            tt *on = tscalar(&ad, "F32", k, kind);
            (void)on;
            double *w = rw(&R, UNET_Q ".weight");
            for (int o = 0; o < 8; o++)
                for (int i = 0; i < 8; i++) /* (1 + l) in float32, as LyCORIS computes it */
                    w[o * 8 + i] *= (double)((float)l->v[kind ? i : o] + 1.0f);
        } else {
            tt *d = tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_proj_in.diff", 4, (uint64_t)8, (uint64_t)8,
                         (uint64_t)1, (uint64_t)1);
            tt *db = tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_proj_in.diff_b", 1, (uint64_t)8);
            tt *c = tadd(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1.diff", 4, (uint64_t)6, (uint64_t)8,
                         (uint64_t)3, (uint64_t)3);
            double *w = rw(&R, UNET_PROJ ".weight"), *b = rw(&R, UNET_PROJ ".bias"), *wc = rw(&R, UNET_CONV ".weight");
            for (int i = 0; i < 64; i++)
                w[i] += d->v[i];
            for (int i = 0; i < 8; i++)
                b[i] += db->v[i];
            for (int i = 0; i < 6 * 8 * 9; i++)
                wc[i] += c->v[i];
        }
        char *ap = pjoin(dir, "lyco.safetensors"), *out = pjoin(dir, "out.safetensors"), *bp = pjoin(dir, "model.safetensors");
        twrite(ap, &ad);
        mres r = merge(bp, ap, out, NULL);
        expect_ok(r);
        check_and_free(out, &R, &r);
        cleanup(dir, &base, &ad, NULL, ap, out, bp, NULL);
    }
}

/* one module's parts in a small kohya file; the merge must be refused with kind and message */
static void kohya_refused(const char *const *parts, size_t n_parts, const char *module, const char *kind,
                          const char *needle)
{
    char *dir = th_tmpdir();
    tset base = {0}, ad = {0};
    unet_base(&base, "F32");
    tadd(&base, "F32", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias", 1, (uint64_t)8);
    write_base(dir, &base, NULL);
    char k[300];
    for (size_t i = 0; i < n_parts; i++) {
        snprintf(k, sizeof k, "%s.%s", module, parts[i]);
        if (strstr(parts[i], "alpha") || strstr(parts[i], "on_input"))
            tscalar(&ad, "F32", k, 0);
        else if (strstr(parts[i], "weight") && !strstr(parts[i], "lora_"))
            tadd(&ad, "F32", k, 1, (uint64_t)8);
        else if (strstr(parts[i], "up"))
            tadd(&ad, "F32", k, 2, (uint64_t)8, (uint64_t)2);
        else if (strstr(parts[i], "scale"))
            tadd(&ad, "F32", k, 2, (uint64_t)1, (uint64_t)8);
        else
            tadd(&ad, "F32", k, 2, (uint64_t)2, (uint64_t)8);
    }
    char *ap = pjoin(dir, "bad.safetensors"), *out = pjoin(dir, "out.safetensors"), *bp = pjoin(dir, "model.safetensors");
    twrite(ap, &ad);
    mres r = merge(bp, ap, out, NULL);
    expect_refused(r, kind, needle);
    cr_assert(!th_exists(out), "no output after a refusal");
    mres_free(&r);
    cleanup(dir, &base, &ad, NULL, ap, out, bp, NULL);
}

Test(formats, lycoris_refusals)
{
    const char *q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    /* dora_scale and w_norm / b_norm merge now: tests/test_lycoris.c (and their malformed forms) */
    const char *oft[] = {"oft_blocks"};
    kohya_refused(oft, 1, q, "UnsupportedPart", "OFT");
    const char *half[] = {"lora_down.weight"};
    kohya_refused(half, 1, q, "IncompleteModule", "no lora_up");
    const char *alone[] = {"alpha"};
    kohya_refused(alone, 1, q, "IncompleteModule", "only an alpha");
    /* IA3 on the outputs of a layer with a bias: LyCORIS leaves the bias, PEFT's IA3 scales it */
    const char *ia3[] = {"weight", "on_input"};
    kohya_refused(ia3, 2, q, "Unsupported", "bias");
    /* a name no base module flattens to */
    const char *pair[] = {"lora_down.weight", "lora_up.weight"};
    kohya_refused(pair, 2, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z", "NoMatchingTensor",
                  "to_z");
}

/* the hand-converted form '<name>_lora_down.weight' (with or without the doubled prefix
 * lora_unet_unet_) reads as kohya's '<name>.lora_down.weight', scale 1 without an alpha; mixing the
 * two forms, or a joined lora_mid, is refused */
Test(formats, kohya_joined_part_names)
{
    for (int doubled = 0; doubled < 2; doubled++) {
        char *dir = th_tmpdir();
        tset base = {0}, ad = {0};
        unet_base(&base, "F32");
        write_base(dir, &base, NULL);
        const char *pre = doubled ? "lora_unet_unet_" : "lora_unet_";
        char k[300];
        snprintf(k, sizeof k, "%sdown_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_lora_down.weight", pre);
        tt *qd = tadd(&ad, "F32", k, 2, (uint64_t)2, (uint64_t)8);
        snprintf(k, sizeof k, "%sdown_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_lora_up.weight", pre);
        tt *qu = tadd(&ad, "F32", k, 2, (uint64_t)8, (uint64_t)2);
        snprintf(k, sizeof k, "%sdown_blocks_0_resnets_0_conv1_lora_down.weight", pre);
        tt *cd = tadd(&ad, "F32", k, 4, (uint64_t)3, (uint64_t)8, (uint64_t)3, (uint64_t)3);
        snprintf(k, sizeof k, "%sdown_blocks_0_resnets_0_conv1_lora_up.weight", pre);
        tt *cu = tadd(&ad, "F32", k, 4, (uint64_t)6, (uint64_t)3, (uint64_t)1, (uint64_t)1);
        char *ap = pjoin(dir, "k.safetensors"), *out = pjoin(dir, "out.safetensors"), *bp = pjoin(dir, "model.safetensors");
        twrite(ap, &ad);
        mres r = merge(bp, ap, out, NULL);
        expect_ok(r);
        cr_assert(has_note(&r, "hand-converted"), "the reading is noted");
        refs R;
        refs_from(&R, &base);
        ref_lowrank(rw(&R, UNET_Q ".weight"), qu->v, qd->v, 8, 2, 8, 1.0);
        ref_lowrank(rw(&R, UNET_CONV ".weight"), cu->v, cd->v, 6, 3, 8 * 9, 1.0);
        check_and_free(out, &R, &r);
        /* one dotted kohya key among them: refused */
        unlink(out);
        tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", 2, (uint64_t)2, (uint64_t)8);
        twrite(ap, &ad);
        r = merge(bp, ap, out, NULL);
        expect_refused(r, "MalformedKohya", "mixes");
        cr_assert(!th_exists(out));
        mres_free(&r);
        cleanup(dir, &base, &ad, NULL, ap, out, bp, NULL);
    }
    char *dir = th_tmpdir();
    tset base = {0}, ad = {0};
    unet_base(&base, "F32");
    write_base(dir, &base, NULL);
    tadd(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1_lora_mid.weight", 4, (uint64_t)2, (uint64_t)2, (uint64_t)3,
         (uint64_t)3);
    char *ap = pjoin(dir, "k.safetensors"), *out = pjoin(dir, "out.safetensors"), *bp = pjoin(dir, "model.safetensors");
    twrite(ap, &ad);
    mres r = merge(bp, ap, out, NULL);
    expect_refused(r, "MalformedKohya", "lora_mid");
    mres_free(&r);
    cleanup(dir, &base, &ad, NULL, ap, out, bp, NULL);
}

/* two base modules whose dotted paths flatten to the same name cannot be told apart */
Test(formats, kohya_flattening_collision)
{
    char *dir = th_tmpdir();
    tset base = {0}, ad = {0};
    tadd(&base, "F32", "blocks.a_b.proj.weight", 2, (uint64_t)4, (uint64_t)4);
    tadd(&base, "F32", "blocks.a.b_proj.weight", 2, (uint64_t)4, (uint64_t)4);
    write_base(dir, &base, NULL);
    tadd(&ad, "F32", "lora_unet_blocks_a_b_proj.lora_down.weight", 2, (uint64_t)2, (uint64_t)4);
    tadd(&ad, "F32", "lora_unet_blocks_a_b_proj.lora_up.weight", 2, (uint64_t)4, (uint64_t)2);
    char *ap = pjoin(dir, "k.safetensors"), *out = pjoin(dir, "out.safetensors"), *bp = pjoin(dir, "model.safetensors");
    twrite(ap, &ad);
    mres r = merge(bp, ap, out, NULL);
    expect_refused(r, "AmbiguousModule", "blocks.a_b.proj");
    cr_assert(strstr(r.line, "blocks.a.b_proj"), "both candidates named: %s", r.line);
    mres_free(&r);
    cleanup(dir, &base, &ad, NULL, ap, out, bp, NULL);
}

/* diffusers-named kohya modules into an original-layout (LDM) single file: refused, saying what to use */
Test(formats, kohya_ldm_checkpoint_refused)
{
    char *dir = th_tmpdir();
    tset base = {0}, ad = {0};
    tadd(&base, "F32", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", 2, (uint64_t)8,
         (uint64_t)8);
    tadd(&base, "F32", "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", 2,
         (uint64_t)8, (uint64_t)8);
    write_base(dir, &base, NULL);
    tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", 2,
         (uint64_t)2, (uint64_t)8);
    tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", 2,
         (uint64_t)8, (uint64_t)2);
    tadd(&ad, "F32", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", 2, (uint64_t)2,
         (uint64_t)8);
    tadd(&ad, "F32", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", 2, (uint64_t)8,
         (uint64_t)2);
    char *ap = pjoin(dir, "k.safetensors"), *out = pjoin(dir, "out.safetensors"), *bp = pjoin(dir, "model.safetensors");
    twrite(ap, &ad);
    mres r = merge(bp, ap, out, NULL);
    expect_refused(r, "LayoutMismatch", "diffusion_pytorch_model");
    mres_free(&r);
    /* the text-encoder part alone resolves under the LDM prefix (a dotted suffix of the base) */
    tset te = {0};
    tt *d = tadd(&te, "F32", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", 2, (uint64_t)2,
                 (uint64_t)8);
    tt *u = tadd(&te, "F32", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", 2, (uint64_t)8,
                 (uint64_t)2);
    twrite(ap, &te);
    r = merge(bp, ap, out, NULL);
    expect_ok(r);
    refs R;
    refs_from(&R, &base);
    ref_lowrank(rw(&R, "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"), u->v, d->v,
                8, 2, 8, 1.0);
    check_and_free(out, &R, &r);
    cleanup(dir, &base, &ad, &te, ap, out, bp, NULL);
}

/* ============================================================================================ */
/* mlx-lm                                                                                        */
/* ============================================================================================ */
#define HF_Q "model.layers.0.self_attn.q_proj"
#define HF_V "model.layers.0.self_attn.v_proj"
#define HF_EMB "model.embed_tokens"

static void llm_base(tset *b, const char *dtype)
{
    tadd(b, dtype, HF_EMB ".weight", 2, (uint64_t)10, (uint64_t)6);
    tadd(b, dtype, HF_Q ".weight", 2, (uint64_t)6, (uint64_t)6);
    tadd(b, dtype, HF_V ".weight", 2, (uint64_t)4, (uint64_t)6);
    tadd(b, dtype, "model.norm.weight", 1, (uint64_t)6);
}

/* an mlx-lm adapter directory; returns the tensors (lora_a [in, r], lora_b [r, out], m) */
static void mlx_dir(const char *dir, const char *config, int embedding, int dora, tset *ad)
{
    mkdir(dir, 0777);
    tadd(ad, "F32", HF_Q ".lora_a", 2, (uint64_t)6, (uint64_t)2);
    tadd(ad, "F32", HF_Q ".lora_b", 2, (uint64_t)2, (uint64_t)6);
    tadd(ad, "F32", HF_V ".lora_a", 2, (uint64_t)6, (uint64_t)2);
    tadd(ad, "F32", HF_V ".lora_b", 2, (uint64_t)2, (uint64_t)4);
    if (embedding) {
        tadd(ad, "F32", HF_EMB ".lora_a", 2, (uint64_t)10, (uint64_t)2);
        tadd(ad, "F32", HF_EMB ".lora_b", 2, (uint64_t)2, (uint64_t)6);
    }
    if (dora) {
        tt *m = tadd(ad, "F32", HF_Q ".m", 1, (uint64_t)6);
        for (int i = 0; i < 6; i++)
            m->v[i] = fabs(m->v[i]) + 0.5;
        m = tadd(ad, "F32", HF_V ".m", 1, (uint64_t)4);
        for (int i = 0; i < 4; i++)
            m->v[i] = fabs(m->v[i]) + 0.5;
    }
    char *p = pjoin(dir, "adapters.safetensors");
    twrite(p, ad);
    free(p);
    p = pjoin(dir, "adapter_config.json");
    write_text(p, config);
    free(p);
}

/* dW[o, i] = S sum_k a[i, k] b[k, o] (Linear), dW[v, d] = S sum_k a[v, k] b[k, d] (embedding) */
static void mlx_ref(refs *R, tset *ad, double S, int embedding, int dora)
{
    const char *mods[2] = {HF_Q, HF_V};
    uint64_t outs[2] = {6, 4};
    char k[512];
    for (int m = 0; m < 2; m++) {
        snprintf(k, sizeof k, "%s.lora_a", mods[m]);
        tt *a = tfind(ad, k);
        snprintf(k, sizeof k, "%s.lora_b", mods[m]);
        tt *b = tfind(ad, k);
        snprintf(k, sizeof k, "%s.weight", mods[m]);
        double *w = rw(R, k);
        for (uint64_t o = 0; o < outs[m]; o++)
            for (uint64_t i = 0; i < 6; i++) {
                double s = 0;
                for (int q = 0; q < 2; q++)
                    s += a->v[i * 2 + q] * b->v[q * outs[m] + o];
                w[o * 6 + i] += S * s;
            }
        if (dora) { /* W <- m / ||W[o, :]|| W[o, :], the norm of the merged row */
            snprintf(k, sizeof k, "%s.m", mods[m]);
            tt *mag = tfind(ad, k);
            for (uint64_t o = 0; o < outs[m]; o++) {
                double n2 = 0;
                for (uint64_t i = 0; i < 6; i++)
                    n2 += w[o * 6 + i] * w[o * 6 + i];
                for (uint64_t i = 0; i < 6; i++)
                    w[o * 6 + i] *= mag->v[o] / sqrt(n2);
            }
        }
    }
    if (embedding) {
        tt *a = tfind(ad, HF_EMB ".lora_a"), *b = tfind(ad, HF_EMB ".lora_b");
        double *w = rw(R, HF_EMB ".weight");
        for (int v = 0; v < 10; v++)
            for (int d = 0; d < 6; d++)
                for (int q = 0; q < 2; q++)
                    w[v * 6 + d] += S * a->v[v * 2 + q] * b->v[q * 6 + d];
    }
}

static void mlx_case(const char *config, double S, int embedding, int dora, const lm_format_opts *fo)
{
    char *dir = th_tmpdir(), *ad_dir = pjoin(dir, "adapters"), *out = pjoin(dir, "out.safetensors");
    tset base = {0}, ad = {0};
    llm_base(&base, "F32");
    write_base(dir, &base, "{\"model_type\": \"qwen2\"}");
    mlx_dir(ad_dir, config, embedding, dora, &ad);
    mres r = merge(dir, ad_dir, out, fo);
    expect_ok(r);
    cr_assert(has_note(&r, "mlx-lm"), "the scale rule should be noted");
    refs R;
    refs_from(&R, &base);
    mlx_ref(&R, &ad, S, embedding, dora);
    check_and_free(out, &R, &r);
    cleanup(dir, &base, &ad, NULL, ad_dir, out, NULL, NULL);
}

Test(formats, mlx_lm_scale_rules)
{
    /* after mid-2024: scale alone (alpha is written but unused) */
    mlx_case("{\"fine_tune_type\": \"lora\", \"num_layers\": 1, \"lora_parameters\": {\"rank\": 2, \"alpha\": 16, "
             "\"scale\": 2.5, \"dropout\": 0.0}}", 2.5, 1, 0, NULL);
    /* before ml-explore/mlx-examples#614: scale * alpha / rank */
    mlx_case("{\"lora_layers\": 1, \"lora_parameters\": {\"rank\": 2, \"alpha\": 6, \"scale\": 2.5, \"dropout\": 0.0}}",
             2.5 * (6.0 / 2.0), 1, 0, NULL);
    /* between: ambiguous unless the user says */
    lm_format_opts fo = {0};
    fo.lora_scale = 2.5;
    mlx_case("{\"lora_layers\": 1, \"use_dora\": false, \"lora_parameters\": {\"rank\": 2, \"alpha\": 6, \"scale\": 2.5}}",
             2.5, 0, 0, &fo);
    /* DoRA: the magnitude rescales each output row of the merged weight */
    mlx_case("{\"fine_tune_type\": \"dora\", \"num_layers\": 1, \"lora_parameters\": {\"rank\": 2, \"scale\": 1.75}}",
             1.75, 0, 1, NULL);
}

Test(formats, mlx_lm_refusals)
{
    char *dir = th_tmpdir(), *ad_dir = pjoin(dir, "adapters"), *out = pjoin(dir, "out.safetensors");
    tset base = {0}, ad = {0};
    llm_base(&base, "F32");
    write_base(dir, &base, NULL);
    mlx_dir(ad_dir, "{\"lora_layers\": 1, \"use_dora\": false, \"lora_parameters\": {\"rank\": 2, \"alpha\": 6, "
                    "\"scale\": 2.5}}", 0, 0, &ad);
    mres r = merge(dir, ad_dir, out, NULL);
    expect_refused(r, "AmbiguousScale", "--lora-scale");
    mres_free(&r);
    tfree(&ad);
    th_rmrf(ad_dir);
    /* DoRA on an embedding: mlx-lm normalises rows, PEFT columns */
    mlx_dir(ad_dir, "{\"fine_tune_type\": \"dora\", \"num_layers\": 1, \"lora_parameters\": {\"rank\": 2, \"scale\": 1}}",
            1, 0, &ad);
    tt *m = tadd(&ad, "F32", HF_EMB ".m", 1, (uint64_t)10);
    (void)m;
    char *p = pjoin(ad_dir, "adapters.safetensors");
    twrite(p, &ad);
    r = merge(dir, ad_dir, out, NULL);
    expect_refused(r, "Unsupported", "embedding");
    mres_free(&r);
    /* weights without their config */
    char *cfg = pjoin(ad_dir, "adapter_config.json");
    unlink(cfg);
    r = merge(dir, p, out, NULL);
    expect_refused(r, "MissingConfig", "adapter_config.json");
    mres_free(&r);
    cr_assert(!th_exists(out));
    cleanup(dir, &base, &ad, NULL, cfg, p, ad_dir, out);
}

/* ============================================================================================ */
/* torchtune                                                                                     */
/* ============================================================================================ */
/* 4 heads of 4 (hidden 16), 2 key/value heads */
static void tune_base(tset *b)
{
    tadd(b, "F32", "model.layers.0.self_attn.q_proj.weight", 2, (uint64_t)16, (uint64_t)16);
    tadd(b, "F32", "model.layers.0.self_attn.k_proj.weight", 2, (uint64_t)8, (uint64_t)16);
    tadd(b, "F32", "model.layers.0.self_attn.o_proj.weight", 2, (uint64_t)16, (uint64_t)16);
    tadd(b, "F32", "model.layers.0.mlp.gate_proj.weight", 2, (uint64_t)12, (uint64_t)16);
    tadd(b, "F32", "lm_head.weight", 2, (uint64_t)20, (uint64_t)16);
}

static const struct {
    const char *tune, *hf;
    uint64_t out;
    int heads; /* rows permuted per head (0: none) */
} TUNE_MODS[] = {{"layers.0.attn.q_proj", "model.layers.0.self_attn.q_proj", 16, 4},
                 {"layers.0.attn.k_proj", "model.layers.0.self_attn.k_proj", 8, 2},
                 {"layers.0.attn.output_proj", "model.layers.0.self_attn.o_proj", 16, 0},
                 {"layers.0.mlp.w1", "model.layers.0.mlp.gate_proj", 12, 0},
                 {"output", "lm_head", 20, 0}};

static void tune_adapter(tset *ad)
{
    char k[512];
    for (size_t i = 0; i < 5; i++) {
        snprintf(k, sizeof k, "%s.lora_a.weight", TUNE_MODS[i].tune);
        tadd(ad, "F32", k, 2, (uint64_t)2, (uint64_t)16);
        snprintf(k, sizeof k, "%s.lora_b.weight", TUNE_MODS[i].tune);
        tadd(ad, "F32", k, 2, TUNE_MODS[i].out, (uint64_t)2);
    }
}

/* the HF row of torchtune row t for heads of 4: torchtune interleaves the rotary halves */
static uint64_t hf_row(uint64_t t)
{
    uint64_t h = t / 4, within = t % 4, i = within / 2, j = within % 2;
    return h * 4 + j * 2 + i;
}

static void tune_ref(refs *R, tset *ad, double s)
{
    char k[512];
    for (size_t m = 0; m < 5; m++) {
        snprintf(k, sizeof k, "%s.lora_a.weight", TUNE_MODS[m].tune);
        tt *a = tfind(ad, k);
        snprintf(k, sizeof k, "%s.lora_b.weight", TUNE_MODS[m].tune);
        tt *b = tfind(ad, k);
        snprintf(k, sizeof k, "%s.weight", TUNE_MODS[m].hf);
        double *w = rw(R, k);
        for (uint64_t t = 0; t < TUNE_MODS[m].out; t++) {
            uint64_t o = TUNE_MODS[m].heads ? hf_row(t) : t;
            for (int i = 0; i < 16; i++)
                w[o * 16 + i] += s * (b->v[t * 2] * a->v[i] + b->v[t * 2 + 1] * a->v[16 + i]);
        }
    }
}

Test(formats, torchtune_names_and_permutation)
{
    const char *cfg = "{\"model_type\": \"llama\", \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
                      "\"hidden_size\": 16}";
    for (int form = 0; form < 2; form++) {
        char *dir = th_tmpdir(), *out = pjoin(dir, "out.safetensors"), *tdir = pjoin(dir, "tune");
        tset base = {0}, ad = {0};
        tune_base(&base);
        write_base(dir, &base, cfg);
        tune_adapter(&ad);
        mkdir(tdir, 0777);
        char *pt = pjoin(tdir, form ? "adapter_0.pt" : "adapter_model.pt");
        tsave_torch(pt, &ad, 0);
        lm_format_opts fo = {0};
        if (form == 0) { /* the PEFT config torchtune writes beside it gives alpha */
            char *c = pjoin(tdir, "adapter_config.json");
            write_text(c, "{\"r\": 2, \"lora_alpha\": 3, \"peft_type\": \"LORA\", \"target_modules\": [\"q_proj\"]}");
            free(c);
        } else {
            fo.lora_alpha = 3;
        }
        mres r = merge(dir, form ? pt : tdir, out, &fo);
        expect_ok(r);
        cr_assert(has_note(&r, "permuted per head"), "the permutation should be noted");
        refs R;
        refs_from(&R, &base);
        tune_ref(&R, &ad, 1.5);
        check_and_free(out, &R, &r);
        /* refusals: no alpha anywhere; a model type whose permutation is not known */
        if (form == 1) {
            r = merge(dir, pt, out, NULL);
            expect_refused(r, "MissingAlpha", "--lora-alpha");
            mres_free(&r);
            char *c = pjoin(dir, "config.json");
            write_text(c, "{\"model_type\": \"qwen2\", \"num_attention_heads\": 4, \"hidden_size\": 16}");
            free(c);
            r = merge(dir, pt, out, &fo);
            expect_refused(r, "Unsupported", "qwen2");
            mres_free(&r);
        }
        cleanup(dir, &base, &ad, NULL, pt, out, tdir, NULL);
    }
}

/* ============================================================================================ */
/* diffusers                                                                                     */
/* ============================================================================================ */
#define ATT "down_blocks.0.attentions.0.transformer_blocks.0.attn1"

static void attn_base(tset *b)
{
    tadd(b, "F32", ATT ".to_q.weight", 2, (uint64_t)8, (uint64_t)8);
    tadd(b, "F32", ATT ".to_k.weight", 2, (uint64_t)8, (uint64_t)8);
    tadd(b, "F32", ATT ".to_out.0.weight", 2, (uint64_t)8, (uint64_t)8);
    tadd(b, "F32", ATT ".to_out.0.bias", 1, (uint64_t)8);
}

/* three spellings of the same two modules; scale from .alpha keys or metadata, else 1 */
Test(formats, diffusers_spellings_and_alphas)
{
    for (int style = 0; style < 4; style++) {
        char *dir = th_tmpdir(), *ap = pjoin(dir, "pytorch_lora_weights.safetensors"), *out = pjoin(dir, "out.safetensors");
        tset base = {0}, ad = {0};
        attn_base(&base);
        write_base(dir, &base, NULL);
        const char *down[2], *up[2];
        char kd[2][300], ku[2][300];
        const char *mods[2] = {"to_q", "to_out"};
        const char *targets[2] = {ATT ".to_q", ATT ".to_out.0"};
        double s[2] = {1.0, 1.0};
        for (int m = 0; m < 2; m++) {
            if (style == 0) { /* attention processors, no prefix */
                snprintf(kd[m], 300, ATT ".processor.%s_lora.down.weight", mods[m]);
                snprintf(ku[m], 300, ATT ".processor.%s_lora.up.weight", mods[m]);
            } else if (style == 1) { /* unet. prefix, .lora.down, .alpha keys */
                snprintf(kd[m], 300, "unet.%s.lora.down.weight", targets[m]);
                snprintf(ku[m], 300, "unet.%s.lora.up.weight", targets[m]);
            } else { /* PEFT keys under transformer. (2: metadata alphas; 3: none) */
                snprintf(kd[m], 300, "transformer.%s.lora_A.weight", targets[m]);
                snprintf(ku[m], 300, "transformer.%s.lora_B.weight", targets[m]);
            }
            down[m] = kd[m];
            up[m] = ku[m];
        }
        tt *A[2], *B[2];
        for (int m = 0; m < 2; m++) {
            A[m] = tadd(&ad, "BF16", down[m], 2, (uint64_t)2, (uint64_t)8);
            B[m] = tadd(&ad, "BF16", up[m], 2, (uint64_t)8, (uint64_t)2);
        }
        if (style == 1) {
            char k[300];
            snprintf(k, sizeof k, "unet.%s.alpha", targets[0]);
            tscalar(&ad, "F32", k, 3.0);
            s[0] = 1.5;
        }
        if (style == 2) {
            const char *mk[1] = {"lora_adapter_metadata"};
            const char *mv[1] = {"{\"transformer.r\": 2, \"transformer.lora_alpha\": 5, \"transformer.alpha_pattern\": "
                                 "{\"to_out.0\": 1}}"};
            twrite_meta(ap, &ad, mk, mv, 1);
            s[0] = 2.5;
            s[1] = 0.5;
        } else {
            twrite(ap, &ad);
        }
        mres r = merge(dir, ap, out, NULL);
        expect_ok(r);
        refs R;
        refs_from(&R, &base);
        for (int m = 0; m < 2; m++) {
            char k[300];
            snprintf(k, sizeof k, "%s.weight", targets[m]);
            ref_lowrank(rw(&R, k), B[m]->v, A[m]->v, 8, 2, 8, s[m]);
        }
        check_and_free(out, &R, &r);
        cleanup(dir, &base, &ad, NULL, ap, out, NULL, NULL);
    }
}

/* ============================================================================================ */
/* loralib, LoRA-SAM                                                                             */
/* ============================================================================================ */
Test(formats, loralib_linear_embedding_and_bias)
{
    char *dir = th_tmpdir(), *ap = pjoin(dir, "lora_weights.pt"), *out = pjoin(dir, "out.safetensors");
    tset base = {0}, ad = {0};
    tadd(&base, "F32", "bert.embeddings.word_embeddings.weight", 2, (uint64_t)10, (uint64_t)6);
    tadd(&base, "F32", "bert.encoder.layer.0.attention.self.query.weight", 2, (uint64_t)6, (uint64_t)6);
    tadd(&base, "F32", "bert.encoder.layer.0.attention.self.query.bias", 1, (uint64_t)6);
    write_base(dir, &base, NULL);
    /* loralib.Embedding: lora_A [r, vocab], lora_B [dim, r], dW = (B @ A)^T * alpha / r */
    tt *ea = tadd(&ad, "F32", "bert.embeddings.word_embeddings.lora_A", 2, (uint64_t)2, (uint64_t)10);
    tt *eb = tadd(&ad, "F32", "bert.embeddings.word_embeddings.lora_B", 2, (uint64_t)6, (uint64_t)2);
    tt *qa = tadd(&ad, "F32", "bert.encoder.layer.0.attention.self.query.lora_A", 2, (uint64_t)2, (uint64_t)6);
    tt *qb = tadd(&ad, "F32", "bert.encoder.layer.0.attention.self.query.lora_B", 2, (uint64_t)6, (uint64_t)2);
    tt *bias = tadd(&ad, "F32", "bert.encoder.layer.0.attention.self.query.bias", 1, (uint64_t)6);
    tsave_torch(ap, &ad, 0);
    mres r = merge(dir, ap, out, NULL);
    expect_refused(r, "MissingAlpha", "--lora-alpha");
    mres_free(&r);
    lm_format_opts fo = {0};
    fo.lora_alpha = 3;
    r = merge(dir, ap, out, &fo);
    expect_ok(r);
    refs R;
    refs_from(&R, &base);
    double *we = rw(&R, "bert.embeddings.word_embeddings.weight");
    for (int v = 0; v < 10; v++)
        for (int d = 0; d < 6; d++)
            we[v * 6 + d] += 1.5 * (eb->v[d * 2] * ea->v[v] + eb->v[d * 2 + 1] * ea->v[10 + v]);
    ref_lowrank(rw(&R, "bert.encoder.layer.0.attention.self.query.weight"), qb->v, qa->v, 6, 2, 6, 1.5);
    memcpy(rw(&R, "bert.encoder.layer.0.attention.self.query.bias"), bias->v, 6 * sizeof(double));
    check_and_free(out, &R, &r);
    cleanup(dir, &base, &ad, NULL, ap, out, NULL, NULL);
}

/* pair 2k is block k's q (rows [0, d)), 2k + 1 its v (rows [2d, 3d)) of the fused qkv */
Test(formats, lora_sam_fused_qkv)
{
    char *dir = th_tmpdir(), *ap = pjoin(dir, "lora.safetensors"), *out = pjoin(dir, "out.safetensors");
    tset base = {0}, ad = {0};
    tadd(&base, "F32", "image_encoder.blocks.0.attn.qkv.weight", 2, (uint64_t)12, (uint64_t)4);
    tadd(&base, "F32", "image_encoder.blocks.0.attn.qkv.bias", 1, (uint64_t)12);
    tadd(&base, "F32", "image_encoder.blocks.1.attn.qkv.weight", 2, (uint64_t)12, (uint64_t)4);
    write_base(dir, &base, NULL);
    tt *a[4], *b[4];
    char k[32];
    for (int i = 0; i < 4; i++) {
        snprintf(k, sizeof k, "w_a_%03d", i);
        a[i] = tadd(&ad, "F32", k, 2, (uint64_t)2, (uint64_t)4);
    }
    for (int i = 0; i < 4; i++) {
        snprintf(k, sizeof k, "w_b_%03d", i);
        b[i] = tadd(&ad, "F32", k, 2, (uint64_t)4, (uint64_t)2);
    }
    twrite(ap, &ad);
    mres r = merge(dir, ap, out, NULL);
    expect_ok(r);
    refs R;
    refs_from(&R, &base);
    for (int blk = 0; blk < 2; blk++) {
        snprintf(k, sizeof k, "x");
        double *w = rw(&R, blk ? "image_encoder.blocks.1.attn.qkv.weight" : "image_encoder.blocks.0.attn.qkv.weight");
        ref_lowrank(w, b[2 * blk]->v, a[2 * blk]->v, 4, 2, 4, 1.0);
        ref_lowrank(w + 8 * 4, b[2 * blk + 1]->v, a[2 * blk + 1]->v, 4, 2, 4, 1.0);
    }
    check_and_free(out, &R, &r);
    /* an odd pair count cannot be q and v of every block */
    tset half = {0};
    tadd(&half, "F32", "w_a_000", 2, (uint64_t)2, (uint64_t)4);
    tadd(&half, "F32", "w_b_000", 2, (uint64_t)4, (uint64_t)2);
    twrite(ap, &half);
    r = merge(dir, ap, out, NULL);
    expect_refused(r, "IncompleteModule", "even");
    mres_free(&r);
    cleanup(dir, &half, &base, &ad, ap, out, NULL, NULL);
}

/* ============================================================================================ */
/* lora_diffusion and unnamed pairs                                                              */
/* ============================================================================================ */
/* a tiny diffusers UNet: down_blocks.0 (dim 4), up_blocks.1 (dim 8), mid_block (dim 6); context
 * ctx; GEGLU proj of `geglu` rows (0: none) */
static void tiny_unet(tset *b, uint64_t ctx, uint64_t geglu_rows)
{
    const char *blocks[3] = {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "mid_block.attentions.0"};
    uint64_t dims[3] = {4, 8, 6};
    char k[300];
    for (int i = 0; i < 3; i++) {
        uint64_t d = dims[i];
        const char *attn[2] = {"attn1", "attn2"};
        for (int a = 0; a < 2; a++) {
            const char *proj[4] = {"to_q", "to_k", "to_v", "to_out.0"};
            for (int p = 0; p < 4; p++) {
                snprintf(k, sizeof k, "%s.transformer_blocks.0.%s.%s.weight", blocks[i], attn[a], proj[p]);
                uint64_t in = (a == 1 && (p == 1 || p == 2)) ? ctx : d;
                tadd(b, "F32", k, 2, d, in);
            }
        }
        snprintf(k, sizeof k, "%s.transformer_blocks.0.ff.net.0.proj.weight", blocks[i]);
        tadd(b, "F32", k, 2, geglu_rows ? geglu_rows : 4 * d, d);
        snprintf(k, sizeof k, "%s.proj_in.weight", blocks[i]);
        tadd(b, "F32", k, 4, d, d, (uint64_t)1, (uint64_t)1);
    }
}

/* the modules in lora_diffusion's order, written out: down, up, then mid (UNet2DConditionModel
 * registers mid_block last); per block attn1, ff, attn2 (diffusers <= 0.14); q, k, v, out */
static size_t tiny_unet_order(char mods[][300], int geglu)
{
    const char *blocks[3] = {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "mid_block.attentions.0"};
    size_t n = 0;
    for (int i = 0; i < 3; i++) {
        const char *seq[3] = {"attn1", "ff", "attn2"};
        for (int s = 0; s < 3; s++) {
            if (s == 1) {
                if (geglu)
                    snprintf(mods[n++], 300, "%s.transformer_blocks.0.ff.net.0.proj", blocks[i]);
                continue;
            }
            const char *proj[4] = {"to_q", "to_k", "to_v", "to_out.0"};
            for (int p = 0; p < 4; p++)
                snprintf(mods[n++], 300, "%s.transformer_blocks.0.%s.%s", blocks[i], seq[s], proj[p]);
        }
    }
    return n;
}

static tt *tfind_base(tset *b, const char *module)
{
    char k[320];
    snprintf(k, sizeof k, "%s.weight", module);
    return tfind(b, k);
}

/* pairs [up_k, down_k] for the modules, into a list/dict set; the reference deltas */
static void unnamed_pairs(tset *ad, tset *base, char mods[][300], size_t n, refs *R, int dict)
{
    char k[64];
    for (size_t i = 0; i < n; i++) {
        tt *w = tfind_base(base, mods[i]);
        snprintf(k, sizeof k, dict ? "unet:%zu:up" : "%zu", dict ? i : 2 * i);
        tt *u = tadd(ad, "F32", k, 2, w->shape[0], (uint64_t)1);
        snprintf(k, sizeof k, dict ? "unet:%zu:down" : "%zu", dict ? i : 2 * i + 1);
        tt *d = tadd(ad, "F32", k, 2, (uint64_t)1, w->shape[1]);
        ref_lowrank(rw(R, w->name), u->v, d->v, w->shape[0], 1, w->shape[1], 1.0);
    }
}

Test(formats, lora_diffusion_list_and_safetensors)
{
    for (int form = 0; form < 2; form++) {
        char *dir = th_tmpdir(), *out = pjoin(dir, "out.safetensors");
        tset base = {0}, ad = {0};
        tiny_unet(&base, 5, 0);
        write_base(dir, &base, "{\"_class_name\": \"UNet2DConditionModel\"}");
        char mods[64][300];
        size_t n = tiny_unet_order(mods, 1);
        refs R;
        refs_from(&R, &base);
        unnamed_pairs(&ad, &base, mods, n, &R, form);
        char *ap;
        if (form == 0) {
            ap = pjoin(dir, "lora.pt");
            tsave_torch(ap, &ad, 1);
        } else {
            ap = pjoin(dir, "lora.safetensors");
            tadd(&ad, "F32", "<s1>", 1, (uint64_t)4);
            const char *mk[3] = {"unet", "<s1>", "text_encoder"};
            const char *mv[3] = {"[\"GEGLU\", \"CrossAttention\", \"Attention\"]", "<embed>", "[\"CLIPAttention\"]"};
            tadd(&ad, "F32", "text_encoder:0:up", 2, (uint64_t)4, (uint64_t)1);
            tadd(&ad, "F32", "text_encoder:0:down", 2, (uint64_t)1, (uint64_t)4);
            twrite_meta(ap, &ad, mk, mv, 3);
        }
        mres r = merge(dir, ap, out, NULL);
        expect_ok(r);
        cr_assert(has_note(&r, "attn1, ff, attn2"), "the order used should be noted");
        if (form == 1) {
            cr_assert(has_note(&r, "group 'text_encoder' skipped"), "the text encoder group is another component");
            cr_assert(has_note(&r, "token embeddings"), "the <embed> tensors are not merged, and it is said");
        }
        check_and_free(out, &R, &r);
        cleanup(dir, &base, &ad, NULL, ap, out, NULL, NULL);
    }
}

/* when the attention and GEGLU projections have one shape, the two diffusers orders both fit:
 * refused, naming the pair that differs and what to pass */
Test(formats, unnamed_order_ambiguous_or_short)
{
    char *dir = th_tmpdir(), *out = pjoin(dir, "out.safetensors"), *ap = pjoin(dir, "lora.pt");
    tset base = {0}, ad = {0};
    tiny_unet(&base, 0, 0);
    /* make everything square: context = dim, GEGLU rows = dim */
    tfree(&base);
    const char *blocks[1] = {"down_blocks.0.attentions.0"};
    char k[300];
    const char *seq[2] = {"attn1", "attn2"}, *proj[4] = {"to_q", "to_k", "to_v", "to_out.0"};
    for (int a = 0; a < 2; a++)
        for (int p = 0; p < 4; p++) {
            snprintf(k, sizeof k, "%s.transformer_blocks.0.%s.%s.weight", blocks[0], seq[a], proj[p]);
            tadd(&base, "F32", k, 2, (uint64_t)4, (uint64_t)4);
        }
    snprintf(k, sizeof k, "%s.transformer_blocks.0.ff.net.0.proj.weight", blocks[0]);
    tadd(&base, "F32", k, 2, (uint64_t)4, (uint64_t)4);
    write_base(dir, &base, "{\"_class_name\": \"UNet2DConditionModel\"}");
    for (int i = 0; i < 18; i++) {
        snprintf(k, sizeof k, "%d", i);
        tadd(&ad, "F32", k, 2, (uint64_t)(i % 2 ? 1 : 4), (uint64_t)(i % 2 ? 4 : 1));
    }
    tsave_torch(ap, &ad, 1);
    mres r = merge(dir, ap, out, NULL);
    expect_refused(r, "AmbiguousOrder", "--target-modules");
    cr_assert(strstr(r.line, "ff.net.0.proj") != NULL, "the differing module is named: %s", r.line);
    mres_free(&r);
    /* --target-modules settles it (leaf names: per layer, in the order given) */
    lm_format_opts fo = {0};
    fo.target_modules = "attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,attn2.to_q,attn2.to_k,attn2.to_v,"
                        "attn2.to_out.0,ff.net.0.proj";
    r = merge(dir, ap, out, &fo);
    expect_ok(r);
    refs R;
    refs_from(&R, &base);
    const char *order[9] = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                            "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj"};
    for (int i = 0; i < 9; i++) {
        snprintf(k, sizeof k, "%s.transformer_blocks.0.%s.weight", blocks[0], order[i]);
        ref_lowrank(rw(&R, k), ad.t[2 * i].v, ad.t[2 * i + 1].v, 4, 1, 4, 1.0);
    }
    check_and_free(out, &R, &r);
    unlink(out);
    /* too few pairs for every order (8 would be the attention-only order) */
    tset shorter = {0};
    for (int i = 0; i < 14; i++) {
        snprintf(k, sizeof k, "%d", i);
        tadd(&shorter, "F32", k, 2, (uint64_t)(i % 2 ? 1 : 4), (uint64_t)(i % 2 ? 4 : 1));
    }
    tsave_torch(ap, &shorter, 1);
    r = merge(dir, ap, out, NULL);
    expect_refused(r, "OrderMismatch", "7 (up, down) pairs");
    mres_free(&r);
    /* no config.json: nothing says the order */
    char *cfg = pjoin(dir, "config.json");
    unlink(cfg);
    free(cfg);
    r = merge(dir, ap, out, NULL);
    expect_refused(r, "UnknownOrder", "--target-modules");
    mres_free(&r);
    cr_assert(!th_exists(out));
    cleanup(dir, &shorter, &base, &ad, out, ap, NULL, NULL);
}

/* transformers' CLIPAttention registers k_proj, v_proj, q_proj, out_proj */
Test(formats, lora_diffusion_clip_text_encoder_order)
{
    char *dir = th_tmpdir(), *out = pjoin(dir, "out.safetensors"), *ap = pjoin(dir, "lora.text_encoder.pt");
    tset base = {0}, ad = {0};
    char mods[8][300], k[300];
    size_t n = 0;
    for (int l = 0; l < 2; l++) {
        const char *order[4] = {"k_proj", "v_proj", "q_proj", "out_proj"};
        for (int p = 0; p < 4; p++) {
            snprintf(mods[n], 300, "text_model.encoder.layers.%d.self_attn.%s", l, order[p]);
            n++;
        }
        const char *reg[4] = {"q_proj", "k_proj", "v_proj", "out_proj"}; /* base file order differs on purpose */
        for (int p = 0; p < 4; p++) {
            snprintf(k, sizeof k, "text_model.encoder.layers.%d.self_attn.%s.weight", l, reg[p]);
            tadd(&base, "F32", k, 2, (uint64_t)4, (uint64_t)4);
        }
    }
    write_base(dir, &base, "{\"architectures\": [\"CLIPTextModel\"]}");
    refs R;
    refs_from(&R, &base);
    unnamed_pairs(&ad, &base, mods, n, &R, 0);
    tsave_torch(ap, &ad, 1);
    mres r = merge(dir, ap, out, NULL);
    expect_ok(r);
    check_and_free(out, &R, &r);
    cleanup(dir, &base, &ad, NULL, out, ap, NULL, NULL);
}

/* ============================================================================================ */
/* folders of raw up / down files                                                                */
/* ============================================================================================ */
/* 11 layers (so "10" sorts after "2") of q_proj [3, 4] and v_proj [2, 4] */
static void layers_base(tset *b)
{
    char k[512];
    for (int l = 0; l < 11; l++) {
        snprintf(k, sizeof k, "model.layers.%d.self_attn.q_proj.weight", l);
        tadd(b, "F32", k, 2, (uint64_t)3, (uint64_t)4);
        snprintf(k, sizeof k, "model.layers.%d.self_attn.v_proj.weight", l);
        tadd(b, "F32", k, 2, (uint64_t)2, (uint64_t)4);
    }
}

/* form 0: bare tensors + one full path; 1: lists + leaf names; 2: named dicts (.bin); 3: named
 * safetensors; 4: dicts keyed 0, 1, ... (.pt) + leaf names */
static void raw_case(int form)
{
    char *dir = th_tmpdir(), *rd = pjoin(dir, "raw"), *out = pjoin(dir, "out.safetensors");
    mkdir(rd, 0777);
    tset base = {0}, up = {0}, down = {0};
    layers_base(&base);
    write_base(dir, &base, NULL);
    refs R;
    refs_from(&R, &base);
    char k[512];
    lm_format_opts fo = {0};
    int n_layers = form == 0 ? 1 : 11;
    for (int l = 0; l < n_layers; l++)
        for (int p = 0; p < (form == 0 ? 1 : 2); p++) {
            const char *proj = p ? "v_proj" : "q_proj";
            uint64_t out_rows = p ? 2 : 3;
            if (form == 2 || form == 3)
                snprintf(k, sizeof k, "model.layers.%d.self_attn.%s%s", l, proj, form == 2 ? ".weight" : "");
            else
                snprintf(k, sizeof k, "%zu", up.n);
            tt *u = tadd(&up, "F32", k, 2, out_rows, (uint64_t)2);
            tt *d = tadd(&down, "F32", k, 2, (uint64_t)2, (uint64_t)4);
            snprintf(k, sizeof k, "model.layers.%d.self_attn.%s.weight", l, proj);
            ref_lowrank(rw(&R, k), u->v, d->v, out_rows, 2, 4, form == 3 ? 0.75 : 1.0);
        }
    char *pu, *pd;
    if (form == 0) {
        pu = pjoin(rd, "up-param.bin");
        pd = pjoin(rd, "down-param.bin");
        tsave_torch(pu, &up, 2);
        tsave_torch(pd, &down, 2);
        fo.target_modules = "model.layers.0.self_attn.q_proj";
    } else if (form == 1 || form == 4) {
        pu = pjoin(rd, form == 1 ? "lora_up.pt" : "up.pt");
        pd = pjoin(rd, form == 1 ? "lora_down.pt" : "down.pt");
        tsave_torch(pu, &up, form == 1 ? 1 : 0);
        tsave_torch(pd, &down, form == 1 ? 1 : 0);
        fo.target_modules = "q_proj, v_proj";
    } else if (form == 2) {
        pu = pjoin(rd, "up.bin");
        pd = pjoin(rd, "down.bin");
        tsave_torch(pu, &up, 0);
        tsave_torch(pd, &down, 0);
    } else {
        pu = pjoin(rd, "up.safetensors");
        pd = pjoin(rd, "down.safetensors");
        twrite(pu, &up);
        twrite(pd, &down);
        fo.lora_scale = 0.75;
    }
    mres r = merge(dir, rd, out, &fo);
    expect_ok(r);
    check_and_free(out, &R, &r);
    if (form == 1) { /* the order is needed: no config.json, no --target-modules */
        unlink(out);
        r = merge(dir, rd, out, NULL);
        expect_refused(r, "UnknownOrder", "--target-modules");
        mres_free(&r);
        fo.target_modules = "q_proj"; /* 11 modules for 22 pairs */
        r = merge(dir, rd, out, &fo);
        expect_refused(r, "OrderMismatch", "11 modules for 22 pairs");
        mres_free(&r);
        fo.target_modules = "q_proj,o_proj";
        r = merge(dir, rd, out, &fo);
        expect_refused(r, "NoMatchingTensor", "o_proj");
        mres_free(&r);
        /* a second up file */
        char *extra = pjoin(rd, "up.safetensors");
        twrite(extra, &up);
        r = merge(dir, rd, out, &fo);
        expect_refused(r, "AmbiguousAdapter", "two up files");
        mres_free(&r);
        unlink(extra);
        free(extra);
        /* a truncated down file is refused naming it */
        size_t n;
        uint8_t *b = th_read_file(pd, &n);
        cr_assert(th_write_file(pd, b, n / 2) == 0);
        free(b);
        fo.target_modules = "q_proj,v_proj";
        r = merge(dir, rd, out, &fo);
        cr_assert_neq(r.rc, LM_OK);
        cr_assert(strstr(r.line, "lora_down.pt") != NULL, "the file is named: %s", r.line);
        mres_free(&r);
        cr_assert(!th_exists(out), "nothing written after a refusal");
    }
    cleanup(dir, &base, &up, &down, pu, pd, rd, out);
}

Test(formats, raw_up_down_tensors) { raw_case(0); }
Test(formats, raw_up_down_lists_and_errors) { raw_case(1); }
Test(formats, raw_up_down_named_bin) { raw_case(2); }
Test(formats, raw_up_down_named_safetensors) { raw_case(3); }
Test(formats, raw_up_down_numbered_dicts) { raw_case(4); }

/* ============================================================================================ */
/* key drift (transformers >= 4.52 VLM layout), both directions                                   */
/* ============================================================================================ */
static void peft_dir(const char *dir, const char *module, tt **A, tt **B, tset *ad)
{
    mkdir(dir, 0777);
    char k[300];
    snprintf(k, sizeof k, "base_model.model.%s.lora_A.weight", module);
    *A = tadd(ad, "F32", k, 2, (uint64_t)2, (uint64_t)4);
    snprintf(k, sizeof k, "base_model.model.%s.lora_B.weight", module);
    *B = tadd(ad, "F32", k, 2, (uint64_t)4, (uint64_t)2);
    char *p = pjoin(dir, "adapter_model.safetensors");
    twrite(p, ad);
    free(p);
    p = pjoin(dir, "adapter_config.json");
    write_text(p, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": [\"q_proj\"]}");
    free(p);
}

Test(formats, key_drift_both_directions)
{
    /* adapter (old) -> base (new), base (new) -> adapter (old); a vision tower with the same
     * leaf names makes the generic prefix search ambiguous, the rename table is not */
    const char *cases[2][2] = {{"model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.q_proj"},
                               {"model.language_model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"}};
    for (int c = 0; c < 2; c++) {
        char *dir = th_tmpdir(), *ad_dir = pjoin(dir, "adapter"), *out = pjoin(dir, "out.safetensors");
        tset base = {0}, ad = {0};
        char k[300];
        snprintf(k, sizeof k, "%s.weight", cases[c][1]);
        tadd(&base, "F32", k, 2, (uint64_t)4, (uint64_t)4);
        tadd(&base, "F32", "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", 2, (uint64_t)4, (uint64_t)4);
        write_base(dir, &base, NULL);
        tt *A, *B;
        peft_dir(ad_dir, cases[c][0], &A, &B, &ad);
        mres r = merge(dir, ad_dir, out, NULL);
        expect_ok(r);
        cr_assert(has_note(&r, "key drift"), "the rename is noted");
        refs R;
        refs_from(&R, &base);
        ref_lowrank(rw(&R, k), B->v, A->v, 4, 2, 4, 2.0);
        check_and_free(out, &R, &r);
        cleanup(dir, &base, &ad, NULL, ad_dir, out, NULL, NULL);
    }
    /* two renames fit: refused, naming both */
    char *dir = th_tmpdir(), *ad_dir = pjoin(dir, "adapter"), *out = pjoin(dir, "out.safetensors");
    tset base = {0}, ad = {0};
    tadd(&base, "F32", "language_model.model.layers.0.self_attn.q_proj.weight", 2, (uint64_t)4, (uint64_t)4);
    tadd(&base, "F32", "model.layers.0.self_attn.q_proj.weight", 2, (uint64_t)4, (uint64_t)4);
    write_base(dir, &base, NULL);
    tt *A, *B;
    peft_dir(ad_dir, "model.language_model.layers.0.self_attn.q_proj", &A, &B, &ad);
    mres r = merge(dir, ad_dir, out, NULL);
    expect_refused(r, "AmbiguousModule", "language_model.model.layers.0.self_attn.q_proj");
    cr_assert(strstr(r.line, "'model.layers.0.self_attn.q_proj'"), "%s", r.line);
    mres_free(&r);
    cleanup(dir, &base, &ad, NULL, ad_dir, out, NULL, NULL);
}

/* ============================================================================================ */
/* convert                                                                                        */
/* ============================================================================================ */
/* merging the converted directory gives the same tensors, byte for byte, as merging the input (the
 * provenance in __metadata__, lora_merge.adapters, names each adapter and its hash); converting the
 * converted directory again changes nothing */
static void round_trip(const char *base, const char *input, const lm_format_opts *fo, const char *work)
{
    char *c1 = pjoin(work, "converted"), *c2 = pjoin(work, "converted2");
    char *o1 = pjoin(work, "merged_input.safetensors"), *o2 = pjoin(work, "merged_converted.safetensors");
    lm_err err;
    char *notes = NULL;
    cr_assert_eq(convert(input, c1, base, fo, &err, &notes), LM_OK, "convert %s: %s", input, err.msg);
    free(notes);
    mres a = merge(base, input, o1, fo), b = merge(base, c1, o2, NULL);
    expect_ok(a);
    expect_ok(b);
    cr_assert(th_st_same_except(o1, o2, "lora_merge.adapters"), "merging %s and its conversion gave different bytes",
              input);
    cr_assert_eq(convert(c1, c2, base, NULL, &err, NULL), LM_OK, "convert again: %s", err.msg);
    char *f1 = pjoin(c1, "adapter_model.safetensors"), *f2 = pjoin(c2, "adapter_model.safetensors");
    char *g1 = pjoin(c1, "adapter_config.json"), *g2 = pjoin(c2, "adapter_config.json");
    cr_assert(th_files_equal(f1, f2) && th_files_equal(g1, g2), "a converted adapter converts to itself");
    mres_free(&a);
    mres_free(&b);
    free(f1);
    free(f2);
    free(g1);
    free(g2);
    free(c1);
    free(c2);
    free(o1);
    free(o2);
}

Test(formats, convert_round_trips)
{
    char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors");
    tset base = {0}, ad = {0};
    unet_base(&base, "BF16");
    tadd(&base, "BF16", "text_model.encoder.layers.0.self_attn.q_proj.weight", 2, (uint64_t)8, (uint64_t)8);
    write_base(dir, &base, NULL);
    /* kohya with mixed ranks and alphas: rank_pattern / alpha_pattern with the exact doubles */
    tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", 2,
         (uint64_t)4, (uint64_t)8);
    tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", 2,
         (uint64_t)8, (uint64_t)4);
    tscalar(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha", 0.1);
    tadd(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", 4, (uint64_t)3, (uint64_t)8,
         (uint64_t)3, (uint64_t)3);
    tadd(&ad, "F32", "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight", 4, (uint64_t)6, (uint64_t)3,
         (uint64_t)1, (uint64_t)1);
    tscalar(&ad, "BF16", "lora_unet_down_blocks_0_resnets_0_conv1.alpha", 1.0 / 3.0);
    tadd(&ad, "F32", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", 2, (uint64_t)4,
         (uint64_t)8);
    tadd(&ad, "F32", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", 2, (uint64_t)8,
         (uint64_t)4);
    char *ap = pjoin(dir, "kohya.safetensors");
    twrite(ap, &ad);
    round_trip(bp, ap, NULL, dir);
    /* the config holds the exact doubles PEFT would compute alpha / r from */
    char *cp = pjoin(dir, "converted/adapter_config.json");
    cJSON *cfg = read_json(cp);
    cr_assert_str_eq(cJSON_GetObjectItem(cfg, "peft_type")->valuestring, "LORA");
    cr_assert(config_scale(cfg, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == (double)0.1f / 4,
              "the F32 alpha 0.1 over r 4, exactly");
    cr_assert(config_scale(cfg, "down_blocks.0.resnets.0.conv1") == th_round_to(1.0 / 3.0, "BF16") / 3,
              "the BF16 alpha over r 3, exactly");
    cr_assert(config_scale(cfg, "text_model.encoder.layers.0.self_attn.q_proj") == 1.0, "no alpha: scale 1");
    cJSON_Delete(cfg);
    free(cp);
    tfree(&ad);
    /* mlx-lm (transposes) and a PEFT directory with key drift */
    char *mdir = pjoin(dir, "mlx");
    tset lb = {0};
    llm_base(&lb, "F32");
    char *ldir = pjoin(dir, "llm");
    mkdir(ldir, 0777);
    write_base(ldir, &lb, NULL);
    char *lbp = pjoin(ldir, "model.safetensors");
    mlx_dir(mdir, "{\"fine_tune_type\": \"lora\", \"lora_parameters\": {\"rank\": 2, \"scale\": 0.3}}", 1, 0, &ad);
    char *work = pjoin(dir, "w2");
    mkdir(work, 0777);
    round_trip(lbp, mdir, NULL, work);
    free(ap);
    free(bp);
    free(mdir);
    free(ldir);
    free(lbp);
    free(work);
    tfree(&lb);
    tfree(&base);
    tfree(&ad);
    th_rmrf(dir);
    free(dir);
}

/* the small UNet base and a kohya file with one module (its 1x1 proj_in) in dir; the file's path */
static char *kohya_proj_in(const char *dir, tset *base, tset *ad)
{
    unet_base(base, "F32");
    write_base(dir, base, NULL);
    tadd(ad, "F32", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", 2, (uint64_t)2, (uint64_t)8);
    tadd(ad, "F32", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", 2, (uint64_t)8, (uint64_t)2);
    char *ap = pjoin(dir, "kohya.safetensors");
    twrite(ap, ad);
    return ap;
}

Test(formats, convert_refusals)
{
    char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *out = pjoin(dir, "out");
    tset base = {0}, ad = {0};
    char *ap = kohya_proj_in(dir, &base, &ad);
    lm_err err;
    /* kohya names need the base */
    cr_assert_neq(convert(ap, out, NULL, NULL, &err, NULL), LM_OK);
    cr_assert_str_eq(err.kind, "NeedsBase", "%s", err.msg);
    cr_assert(!th_exists(out), "no output directory left behind");
    /* a PEFT directory cannot be converted onto itself */
    cr_assert_eq(convert(ap, out, bp, NULL, &err, NULL), LM_OK, "%s", err.msg);
    cr_assert_neq(convert(out, out, bp, NULL, &err, NULL), LM_OK);
    cr_assert_str_eq(err.kind, "OutputIsInput", "%s", err.msg);
    /* the 2-D factors of a 1x1 convolution became [r, in, 1, 1] / [out, r, 1, 1] */
    char *sp = pjoin(out, "adapter_model.safetensors");
    th_st st;
    cr_assert_eq(th_st_read(sp, &st), 0);
    const th_tensor *A = th_st_find(&st, "base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight");
    cr_assert(A != NULL && A->n_dims == 4 && A->shape[2] == 1 && A->shape[3] == 1, "A viewed as a 1x1 kernel");
    th_st_free(&st);
    cleanup(dir, &base, &ad, NULL, sp, ap, bp, out);
}

/* ============================================================================================ */
/* malformed inputs                                                                              */
/* ============================================================================================ */
Test(formats, malformed_inputs_refused)
{
    char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *out = pjoin(dir, "out.safetensors");
    tset base = {0};
    unet_base(&base, "F32");
    write_base(dir, &base, NULL);
    char *p = pjoin(dir, "a.gguf");
    write_text(p, "GGUF\x03\x00\x00\x00 and then some");
    mres r = merge(bp, p, out, NULL);
    expect_refused(r, "UnsupportedFormat", "llama.cpp");
    mres_free(&r);
    free(p);
    p = pjoin(dir, "adapters.npz");
    write_text(p, "PK\x03\x04 numpy");
    r = merge(bp, p, out, NULL);
    expect_refused(r, "UnsupportedFormat", "mlx");
    mres_free(&r);
    free(p);
    /* keys nobody writes */
    tset junk = {0};
    tadd(&junk, "F32", "something.else", 1, (uint64_t)3);
    p = pjoin(dir, "junk.safetensors");
    twrite(p, &junk);
    r = merge(bp, p, out, NULL);
    expect_refused(r, "UnknownFormat", "something.else");
    mres_free(&r);
    /* a non-finite alpha, a non-finite factor */
    tset ad = {0};
    tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", 2, (uint64_t)2, (uint64_t)8);
    tadd(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", 2, (uint64_t)8, (uint64_t)2);
    tt *al = tscalar(&ad, "F32", "lora_unet_down_blocks_0_attentions_0_proj_in.alpha", 1);
    al->v[0] = INFINITY;
    twrite(p, &ad);
    r = merge(bp, p, out, NULL);
    expect_refused(r, "NonFinite", "alpha");
    mres_free(&r);
    al->v[0] = 1;
    ad.t[0].v[3] = NAN;
    twrite(p, &ad);
    r = merge(bp, p, out, NULL);
    expect_refused(r, "NonFinite", "non-finite");
    mres_free(&r);
    /* a lone tensor, a truncated torch file, an odd list */
    tset one = {0};
    tadd(&one, "F32", "x", 2, (uint64_t)2, (uint64_t)2);
    char *pt = pjoin(dir, "one.pt");
    tsave_torch(pt, &one, 2);
    r = merge(bp, pt, out, NULL);
    expect_refused(r, "NotAnAdapter", "single tensor");
    mres_free(&r);
    tsave_torch(pt, &one, 1);
    r = merge(bp, pt, out, NULL);
    expect_refused(r, "InvalidList", "even number");
    mres_free(&r);
    size_t n;
    uint8_t *b = th_read_file(pt, &n);
    cr_assert(th_write_file(pt, b, n - 30) == 0);
    free(b);
    r = merge(bp, pt, out, NULL);
    cr_assert_neq(r.rc, LM_OK);
    cr_assert(strstr(r.line, "one.pt"), "%s", r.line);
    mres_free(&r);
    cr_assert(!th_exists(out), "no output after refusals");
    free(pt);
    free(p);
    free(bp);
    free(out);
    tfree(&base);
    tfree(&junk);
    tfree(&ad);
    tfree(&one);
    th_rmrf(dir);
    free(dir);
}

/* the command line: inspect names the format and the mapping; convert; exit codes */
Test(formats, cli_inspect_and_convert)
{
    char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *out = pjoin(dir, "conv");
    tset base = {0}, ad = {0};
    char *ap = kohya_proj_in(dir, &base, &ad);
    const char *inspect[] = {th_bin(), "inspect", "--base", bp, ap, NULL};
    th_run_result r = th_run(NULL, inspect);
    cr_assert_eq(r.status, 0, "%s", r.err);
    cr_assert(strstr(r.out, "format: kohya-ss LoRA"), "%s", r.out);
    cr_assert(strstr(r.out, "lora_unet_down_blocks_0_attentions_0_proj_in -> down_blocks.0.attentions.0.proj_in"),
              "%s", r.out);
    th_run_free(&r);
    const char *no_base[] = {th_bin(), "convert", ap, out, NULL};
    r = th_run(NULL, no_base);
    cr_assert_eq(r.status, 2, "NeedsBase is a usage error: %s", r.err);
    cr_assert(strstr(r.err, "--base"), "%s", r.err);
    th_run_free(&r);
    const char *conv[] = {th_bin(), "convert", "--base", bp, ap, out, NULL};
    r = th_run(NULL, conv);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    char *merged = pjoin(dir, "m.safetensors");
    const char *mergecmd[] = {th_bin(), "-q", bp, out, merged, NULL};
    r = th_run(NULL, mergecmd);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    const char *bad[] = {th_bin(), "--base", bp, bp, ap, merged, NULL};
    r = th_run(NULL, bad);
    cr_assert_eq(r.status, 2, "--base belongs to inspect and convert");
    th_run_free(&r);
    cleanup(dir, &base, &ad, NULL, merged, ap, bp, out);
}

/* ============================================================================================ */
/* the real files of ../shared/fixtures/adapters-other                                           */
/* ============================================================================================ */
/* Stable Diffusion UNet attention and feed-forward linears (diffusers layout) */
typedef struct {
    const char *block;
    uint64_t dim;
} sd_block;

static const sd_block SD_DOWN[] = {{"down_blocks.0.attentions.0", 320}, {"down_blocks.0.attentions.1", 320},
                                   {"down_blocks.1.attentions.0", 640}, {"down_blocks.1.attentions.1", 640},
                                   {"down_blocks.2.attentions.0", 1280}, {"down_blocks.2.attentions.1", 1280}};
static const sd_block SD_UP[] = {{"up_blocks.1.attentions.0", 1280}, {"up_blocks.1.attentions.1", 1280},
                                 {"up_blocks.1.attentions.2", 1280}, {"up_blocks.2.attentions.0", 640},
                                 {"up_blocks.2.attentions.1", 640},  {"up_blocks.2.attentions.2", 640},
                                 {"up_blocks.3.attentions.0", 320},  {"up_blocks.3.attentions.1", 320},
                                 {"up_blocks.3.attentions.2", 320}};
static const sd_block SD_MID[] = {{"mid_block.attentions.0", 1280}};

static void sd_unet_sparse(sp_set *s, uint64_t ctx)
{
    const sd_block *groups[3] = {SD_DOWN, SD_UP, SD_MID};
    size_t sizes[3] = {6, 9, 1};
    char k[300];
    for (int g = 0; g < 3; g++)
        for (size_t b = 0; b < sizes[g]; b++) {
            uint64_t d = groups[g][b].dim;
            const char *attn[2] = {"attn1", "attn2"}, *proj[4] = {"to_q", "to_k", "to_v", "to_out.0"};
            for (int a = 0; a < 2; a++)
                for (int p = 0; p < 4; p++) {
                    snprintf(k, sizeof k, "%s.transformer_blocks.0.%s.%s.weight", groups[g][b].block, attn[a], proj[p]);
                    sp_add2(s, k, d, a == 1 && (p == 1 || p == 2) ? ctx : d);
                }
            snprintf(k, sizeof k, "%s.transformer_blocks.0.ff.net.0.proj.weight", groups[g][b].block);
            sp_add2(s, k, 8 * d, d);
            snprintf(k, sizeof k, "%s.transformer_blocks.0.ff.net.2.weight", groups[g][b].block);
            sp_add2(s, k, d, 4 * d);
        }
}

/* lora_diffusion's pair order: down, up, mid; attn1, (ff,) attn2; q, k, v, out */
static size_t sd_unet_order(char mods[][300], int geglu)
{
    const sd_block *groups[3] = {SD_DOWN, SD_UP, SD_MID};
    size_t sizes[3] = {6, 9, 1}, n = 0;
    for (int g = 0; g < 3; g++)
        for (size_t b = 0; b < sizes[g]; b++) {
            const char *seq[3] = {"attn1", "ff", "attn2"}, *proj[4] = {"to_q", "to_k", "to_v", "to_out.0"};
            for (int q = 0; q < 3; q++) {
                if (q == 1) {
                    if (geglu)
                        snprintf(mods[n++], 300, "%s.transformer_blocks.0.ff.net.0.proj", groups[g][b].block);
                    continue;
                }
                for (int p = 0; p < 4; p++)
                    snprintf(mods[n++], 300, "%s.transformer_blocks.0.%s.%s", groups[g][b].block, seq[q], proj[p]);
            }
        }
    return n;
}

static void clip_sparse(sp_set *s)
{
    char k[300];
    const char *p[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};
    for (int l = 0; l < 12; l++)
        for (int i = 0; i < 4; i++) {
            snprintf(k, sizeof k, "text_model.encoder.layers.%d.self_attn.%s.weight", l, p[i]);
            sp_add2(s, k, 768, 768);
        }
}

/* the converted pair for module m holds exactly the bytes of (down, up) */
static void expect_pair(const th_st *conv, const char *module, const void *down, uint64_t down_bytes, const void *up,
                        uint64_t up_bytes)
{
    char k[400];
    snprintf(k, sizeof k, "base_model.model.%s.lora_A.weight", module);
    const th_tensor *a = th_st_find(conv, k);
    cr_assert(a != NULL, "converted adapter lacks %s", k);
    cr_assert(bytes_equal(a, down, down_bytes), "%s is not the down matrix it should be", k);
    snprintf(k, sizeof k, "base_model.model.%s.lora_B.weight", module);
    const th_tensor *b = th_st_find(conv, k);
    cr_assert(b != NULL, "converted adapter lacks %s", k);
    cr_assert(bytes_equal(b, up, up_bytes), "%s is not the up matrix it should be", k);
}

/* converts input with a base; returns the converted tensors and config */
static void convert_fixture(const char *input, const char *base_dir, const lm_format_opts *fo, const char *work,
                            th_st *conv, cJSON **cfg, char **notes)
{
    char *bp = pjoin(base_dir, "model.safetensors"), *out = pjoin(work, "converted");
    lm_err err;
    cr_assert_eq(convert(input, out, bp, fo, &err, notes), LM_OK, "convert %s: %s (%s)", input, err.msg, err.tensor);
    char *sp = pjoin(out, "adapter_model.safetensors"), *cp = pjoin(out, "adapter_config.json");
    cr_assert_eq(th_st_read(sp, conv), 0);
    *cfg = read_json(cp);
    free(sp);
    free(cp);
    free(bp);
    free(out);
}

static void expect_scale_one(const cJSON *cfg, const th_st *conv)
{
    for (size_t i = 0; i < conv->n; i++) {
        const char *k = conv->t[i].name;
        if (strstr(k, ".lora_A.weight") == NULL)
            continue;
        char m[400];
        snprintf(m, sizeof m, "%.*s", (int)(strlen(k) - 17 - 14), k + 17);
        cr_assert(config_scale(cfg, m) == 1.0, "module %s: scale %g, expected 1", m, config_scale(cfg, m));
    }
}

/* a sparse CLIP text encoder (config.json names it) and lora_diffusion's order: k, v, q, out */
static size_t clip_base_and_order(const char *dir, sp_set *s, char mods[][300])
{
    size_t n = 0;
    clip_sparse(s);
    sp_write(dir, s, "{\"architectures\": [\"CLIPTextModel\"]}");
    const char *order[4] = {"k_proj", "v_proj", "q_proj", "out_proj"};
    for (int l = 0; l < 12; l++)
        for (int p = 0; p < 4; p++)
            snprintf(mods[n++], 300, "text_model.encoder.layers.%d.self_attn.%s", l, order[p]);
    return n;
}

/* a sparse SD UNet with context ctx and lora_diffusion's order (with or without GEGLU) */
static size_t sd_base_and_order(const char *dir, sp_set *s, char mods[][300], uint64_t ctx, int geglu)
{
    sd_unet_sparse(s, ctx);
    sp_write(dir, s, "{\"_class_name\": \"UNet2DConditionModel\"}");
    return sd_unet_order(mods, geglu);
}

Test(fixtures_other, lora_diffusion_pt_lists)
{
    need_other();
    for (int which = 0; which < 2; which++) {
        const char *input = which ? OTHER "/cloneofsimo-pt-list-textenc-sd1/lora_kiriko2.text_encoder.pt"
                                  : OTHER "/cloneofsimo-pt-list-unet-sd2/lora_illust.pt";
        char *dir = th_tmpdir();
        sp_set s = {0};
        char mods[200][300];
        size_t n = which ? clip_base_and_order(dir, &s, mods) : sd_base_and_order(dir, &s, mods, 1024, 0);
        th_st conv;
        cJSON *cfg;
        convert_fixture(input, dir, NULL, dir, &conv, &cfg, NULL);
        lm_tensor_set *src = NULL;
        int root;
        lm_err err;
        lm_err_clear(&err);
        cr_assert_eq(lm_torch_obj_load(input, &src, &root, &err), LM_OK, "%s", err.msg);
        cr_assert_eq(root, LM_TORCH_ROOT_LIST);
        cr_assert_eq(src->n, 2 * n, "%zu tensors, expected %zu", src->n, 2 * n);
        for (size_t k = 0; k < n; k++)
            expect_pair(&conv, mods[k], src->t[2 * k + 1].data, src->t[2 * k + 1].n_bytes, src->t[2 * k].data,
                        src->t[2 * k].n_bytes);
        expect_scale_one(cfg, &conv);
        lm_ts_free(src);
        th_st_free(&conv);
        cJSON_Delete(cfg);
        /* the same mapping is a valid merge plan */
        char *bp = pjoin(dir, "model.safetensors");
        mres r = merge_ex(bp, input, NULL, NULL, 1.0, 1);
        expect_ok(r);
        cr_assert_eq(r.rep->n_lowrank, n, "every pair becomes one low-rank delta");
        mres_free(&r);
        free(bp);
        sp_free(&s);
        th_rmrf(dir);
        free(dir);
    }
}

Test(fixtures_other, lora_diffusion_safetensors)
{
    need_other();
    const char *input = OTHER "/cloneofsimo-safetensors-sd1-rank1/lora_disney.safetensors";
    th_st src;
    cr_assert_eq(th_st_read(input, &src), 0);
    for (int which = 0; which < 2; which++) {
        char *dir = th_tmpdir();
        sp_set s = {0};
        char mods[200][300], k[64];
        size_t n = which ? clip_base_and_order(dir, &s, mods) : sd_base_and_order(dir, &s, mods, 768, 1);
        th_st conv;
        cJSON *cfg;
        char *notes = NULL;
        convert_fixture(input, dir, NULL, dir, &conv, &cfg, &notes);
        cr_assert(strstr(notes, which ? "group 'unet' skipped" : "group 'text_encoder' skipped"), "%s", notes);
        cr_assert(strstr(notes, "2 textual-inversion token embeddings"), "%s", notes);
        for (size_t i = 0; i < n; i++) {
            snprintf(k, sizeof k, "%s:%zu:down", which ? "text_encoder" : "unet", i);
            const th_tensor *d = th_st_find(&src, k);
            snprintf(k, sizeof k, "%s:%zu:up", which ? "text_encoder" : "unet", i);
            const th_tensor *u = th_st_find(&src, k);
            cr_assert(d && u, "fixture lacks pair %zu", i);
            expect_pair(&conv, mods[i], d->data, d->n_bytes, u->data, u->n_bytes);
        }
        cr_assert_eq(conv.n, 2 * n, "only the base's group is in the adapter");
        expect_scale_one(cfg, &conv);
        free(notes);
        th_st_free(&conv);
        cJSON_Delete(cfg);
        sp_free(&s);
        th_rmrf(dir);
        free(dir);
    }
    th_st_free(&src);
}

/* the module a diffusers key adapts, spelled out here */
static int diffusers_expected(const char *key, char *module, size_t cap, int *up)
{
    static const struct {
        const char *suffix, *target;
        int up;
    } map[] = {{".processor.to_q_lora.down.weight", ".to_q", 0}, {".processor.to_q_lora.up.weight", ".to_q", 1},
               {".processor.to_k_lora.down.weight", ".to_k", 0}, {".processor.to_k_lora.up.weight", ".to_k", 1},
               {".processor.to_v_lora.down.weight", ".to_v", 0}, {".processor.to_v_lora.up.weight", ".to_v", 1},
               {".processor.to_out_lora.down.weight", ".to_out.0", 0},
               {".processor.to_out_lora.up.weight", ".to_out.0", 1}, {".lora.down.weight", "", 0},
               {".lora.up.weight", "", 1}, {".lora_A.weight", "", 0}, {".lora_B.weight", "", 1}};
    const char *k = key;
    if (strncmp(k, "unet.", 5) == 0)
        k += 5;
    if (strncmp(k, "transformer.", 12) == 0)
        k += 12;
    for (size_t i = 0; i < sizeof map / sizeof *map; i++) {
        size_t nk = strlen(k), ns = strlen(map[i].suffix);
        if (nk > ns && strcmp(k + nk - ns, map[i].suffix) == 0) {
            snprintf(module, cap, "%.*s%s", (int)(nk - ns), k, map[i].target);
            *up = map[i].up;
            return 1;
        }
    }
    return 0;
}

static void diffusers_fixture(const char *input, sp_set *s, const char *config, int from_torch)
{
    char *dir = th_tmpdir();
    sp_write(dir, s, config);
    th_st conv;
    cJSON *cfg;
    convert_fixture(input, dir, NULL, dir, &conv, &cfg, NULL);
    /* every input tensor is in the converted adapter, under the module spelled out above */
    size_t n_src = 0;
    const char **names = NULL;
    const void **data = NULL;
    uint64_t *bytes = NULL;
    lm_tensor_set *ts = NULL;
    th_st st;
    if (from_torch) {
        int root;
        lm_err err;
        lm_err_clear(&err);
        cr_assert_eq(lm_torch_obj_load(input, &ts, &root, &err), LM_OK, "%s", err.msg);
        n_src = ts->n;
    } else {
        cr_assert_eq(th_st_read(input, &st), 0);
        n_src = st.n;
    }
    names = calloc(n_src, sizeof *names);
    data = calloc(n_src, sizeof *data);
    bytes = calloc(n_src, sizeof *bytes);
    for (size_t i = 0; i < n_src; i++) {
        names[i] = from_torch ? ts->t[i].name : st.t[i].name;
        data[i] = from_torch ? ts->t[i].data : (const void *)st.t[i].data;
        bytes[i] = from_torch ? ts->t[i].n_bytes : st.t[i].n_bytes;
    }
    for (size_t i = 0; i < n_src; i++) {
        char module[300], k[400];
        int up;
        cr_assert(diffusers_expected(names[i], module, sizeof module, &up), "unexpected key %s", names[i]);
        snprintf(k, sizeof k, "base_model.model.%s.%s", module, up ? "lora_B.weight" : "lora_A.weight");
        const th_tensor *t = th_st_find(&conv, k);
        cr_assert(t != NULL, "%s -> %s missing", names[i], k);
        cr_assert(bytes_equal(t, data[i], bytes[i]), "%s -> %s: different bytes", names[i], k);
    }
    cr_assert_eq(conv.n, n_src, "nothing added, nothing dropped");
    expect_scale_one(cfg, &conv);
    free(names);
    free(data);
    free(bytes);
    if (from_torch)
        lm_ts_free(ts);
    else
        th_st_free(&st);
    th_st_free(&conv);
    cJSON_Delete(cfg);
    th_rmrf(dir);
    free(dir);
}

Test(fixtures_other, diffusers_files)
{
    need_other();
    sp_set sd1 = {0}, sd2 = {0}, flux = {0};
    sd_unet_sparse(&sd1, 768);
    sd_unet_sparse(&sd2, 1024);
    diffusers_fixture(OTHER "/diffusers-attnproc-noprefix-sd15/pytorch_lora_weights.safetensors", &sd1, NULL, 0);
    diffusers_fixture(OTHER "/diffusers-attnproc-bin-sd15/pytorch_lora_weights.bin", &sd1, NULL, 1);
    diffusers_fixture(OTHER "/diffusers-unet-loradown-bf16-sd2/pytorch_lora_weights.safetensors", &sd2, NULL, 0);
    char k[512];
    for (int b = 0; b < 38; b++) {
        snprintf(k, sizeof k, "single_transformer_blocks.%d.proj_out.weight", b);
        sp_add2(&flux, k, 3072, 15360);
    }
    diffusers_fixture(OTHER "/diffusers-peft-flux-aitoolkit-f16/lora.safetensors", &flux, NULL, 0);
    sp_free(&sd1);
    sp_free(&sd2);
    sp_free(&flux);
}

/* a kohya name -> the module path, by re-joining known words (the tool looks names up instead) */
static void kohya_dotted(const char *rest, char *out, size_t cap)
{
    static const char *const words[] = {"text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
                                        "double_blocks", "single_blocks", "img_attn", "img_mlp", "txt_attn"};
    size_t used = 0;
    const char *p = rest;
    while (*p && used + 1 < cap) {
        size_t len = 0;
        for (size_t w = 0; w < sizeof words / sizeof *words && !len; w++) {
            size_t n = strlen(words[w]);
            if (strncmp(p, words[w], n) == 0 && (p[n] == '_' || p[n] == '\0'))
                len = n;
        }
        if (!len)
            len = strcspn(p, "_");
        used += (size_t)snprintf(out + used, cap - used, "%s%.*s", used ? "." : "", (int)len, p);
        p += len + (p[len] == '_');
    }
}

Test(fixtures_other, kohya_files)
{
    need_other();
    /* the truncated FLUX file is refused (its header promises 306 MB, the file has 475 kB) */
    const char *trunc = OTHER "/kohya-flux-truncated/test.safetensors";
    char *dir = th_tmpdir(), *bp = pjoin(dir, "model.safetensors"), *out = pjoin(dir, "out.safetensors");
    tset base = {0}, ad = {0};
    const char *names[4] = {"double_blocks_0_img_attn_qkv", "double_blocks_0_img_mlp_0", "single_blocks_0_linear1",
                            "single_blocks_0_modulation_lin"};
    char k[512], dotted[300];
    for (int i = 0; i < 4; i++) {
        kohya_dotted(names[i], dotted, sizeof dotted);
        snprintf(k, sizeof k, "%s.weight", dotted);
        tadd(&base, "BF16", k, 2, (uint64_t)(6 + 2 * i), (uint64_t)8);
    }
    tadd(&base, "BF16", "double_blocks.0.img_attn.proj.weight", 2, (uint64_t)8, (uint64_t)8);
    write_base(dir, &base, NULL);
    mres r = merge(bp, trunc, out, NULL);
    expect_refused(r, "InvalidOffsets", "test.safetensors");
    mres_free(&r);
    /* its real module names, in a complete small file: 0-d BF16 alphas, alpha 2 over rank 4 */
    size_t n;
    uint8_t *raw = th_read_file(trunc, &n);
    cr_assert(raw && n > 8);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = hl << 8 | raw[i];
    cJSON *hdr = cJSON_ParseWithLength((const char *)raw + 8, hl);
    cr_assert(hdr != NULL, "the header is complete");
    refs R;
    refs_from(&R, &base);
    for (int i = 0; i < 4; i++) {
        snprintf(k, sizeof k, "lora_unet_%s.lora_down.weight", names[i]);
        cr_assert(cJSON_GetObjectItem(hdr, k) != NULL, "%s is a real kohya FLUX name", k);
        tt *d = tadd(&ad, "BF16", k, 2, (uint64_t)4, (uint64_t)8);
        snprintf(k, sizeof k, "lora_unet_%s.lora_up.weight", names[i]);
        tt *u = tadd(&ad, "BF16", k, 2, (uint64_t)(6 + 2 * i), (uint64_t)4);
        snprintf(k, sizeof k, "lora_unet_%s.alpha", names[i]);
        const cJSON *a = cJSON_GetObjectItem(hdr, k);
        cr_assert(a && cJSON_GetArraySize(cJSON_GetObjectItem(a, "shape")) == 0, "the real alpha is 0-d");
        tscalar(&ad, "BF16", k, 2.0);
        kohya_dotted(names[i], dotted, sizeof dotted);
        snprintf(k, sizeof k, "%s.weight", dotted);
        ref_lowrank(rw(&R, k), u->v, d->v, (uint64_t)(6 + 2 * i), 4, 8, 0.5);
    }
    cJSON_Delete(hdr);
    free(raw);
    char *ap = pjoin(dir, "flux_kohya.safetensors");
    twrite(ap, &ad);
    r = merge(bp, ap, out, NULL);
    expect_ok(r);
    check_and_free(out, &R, &r);
    cleanup(dir, &base, &ad, NULL, ap, bp, out, NULL);
}

/* the hand-converted file with a doubled prefix and '_lora_down' (no alpha) maps exactly onto an
 * SD 1.5 UNet: every one of its 128 pairs lands on the module its name flattens from, bytes
 * unchanged, scale 1 */
Test(fixtures_other, kohya_double_prefix_mapped)
{
    need_other();
    const char *input = OTHER "/kohya-style-unet-double-prefix-noalpha/new.safetensors";
    th_st src, conv;
    cr_assert_eq(th_st_read(input, &src), 0);
    char *dir = th_tmpdir(), *notes = NULL;
    sp_set s = {0};
    sd_unet_sparse(&s, 768);
    sp_write(dir, &s, "{\"_class_name\": \"UNet2DConditionModel\"}");
    cJSON *cfg;
    convert_fixture(input, dir, NULL, dir, &conv, &cfg, &notes);
    cr_assert(notes && strstr(notes, "hand-converted"), "the reading is noted: %s", notes ? notes : "");
    size_t pairs = 0;
    char k[600], flat[400];
    for (size_t i = 0; i < conv.n; i++) {
        const char *name = conv.t[i].name;
        if (!strstr(name, ".lora_A.weight"))
            continue;
        /* the input's name for this module: lora_unet_unet_ + the path with '.' -> '_' */
        snprintf(flat, sizeof flat, "%.*s", (int)(strlen(name) - 17 - 14), name + 17);
        for (char *p = flat; *p; p++)
            *p = *p == '.' ? '_' : *p;
        snprintf(k, sizeof k, "lora_unet_unet_%s_lora_down.weight", flat);
        const th_tensor *d = th_st_find(&src, k);
        snprintf(k, sizeof k, "lora_unet_unet_%s_lora_up.weight", flat);
        const th_tensor *u = th_st_find(&src, k);
        cr_assert(d && u, "no input pair for %s", name);
        snprintf(k, sizeof k, "%.*s", (int)(strlen(name) - 17 - 14), name + 17);
        expect_pair(&conv, k, d->data, d->n_bytes, u->data, u->n_bytes);
        pairs++;
    }
    cr_assert_eq(pairs, 128, "all 128 pairs of the 256 tensors are mapped (got %zu)", pairs);
    cr_assert_eq(src.n, 256);
    expect_scale_one(cfg, &conv);
    cJSON_Delete(cfg);
    th_st_free(&conv);
    th_st_free(&src);
    free(notes);
    sp_free(&s);
    th_rmrf(dir);
    free(dir);
}

/* LyCORIS LoKr: the text-encoder modules onto a CLIP base (the UNet part is another component) */
Test(fixtures_other, lycoris_lokr)
{
    need_other();
    const char *input = OTHER "/lycoris-lokr-sd1-dim4/smart_falcon_4_lokr.safetensors";
    th_st src;
    cr_assert_eq(th_st_read(input, &src), 0);
    char *dir = th_tmpdir();
    sp_set s = {0};
    char mods[100][300], k[700];
    size_t n = 0;
    for (size_t i = 0; i < src.n; i++) {
        const char *name = src.t[i].name;
        if (strncmp(name, "lora_te_", 8) != 0 || strstr(name, ".lokr_w1_a") == NULL)
            continue;
        char stem[300];
        snprintf(stem, sizeof stem, "%.*s", (int)(strstr(name, ".lokr_w1_a") - name), name);
        snprintf(k, sizeof k, "%s.lokr_w2_a", stem);
        const th_tensor *w1a = &src.t[i], *w2a = th_st_find(&src, k);
        snprintf(k, sizeof k, "%s.lokr_w1_b", stem);
        const th_tensor *w1b = th_st_find(&src, k);
        snprintf(k, sizeof k, "%s.lokr_w2_b", stem);
        const th_tensor *w2b = th_st_find(&src, k);
        cr_assert(w2a && w1b && w2b);
        kohya_dotted(stem + 8, mods[n], sizeof mods[n]);
        snprintf(k, sizeof k, "%s.weight", mods[n]);
        sp_add2(&s, k, w1a->shape[0] * w2a->shape[0], w1b->shape[1] * w2b->shape[1]);
        n++;
    }
    cr_assert_eq(n, 72, "12 layers x (q, k, v, out, fc1, fc2)");
    sp_write(dir, &s, NULL);
    th_st conv;
    cJSON *cfg;
    char *notes = NULL;
    convert_fixture(input, dir, NULL, dir, &conv, &cfg, &notes);
    cr_assert(strstr(notes, "component 'lora_unet'"), "the UNet part is noted as skipped: %s", notes);
    cr_assert_str_eq(cJSON_GetObjectItem(cfg, "peft_type")->valuestring, "LOKR");
    const char *parts[4] = {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"};
    for (size_t m = 0; m < n; m++) {
        /* alpha 4 over r 4: scale 1 */
        cr_assert(config_scale(cfg, mods[m]) == 1.0, "%s: scale %g", mods[m], config_scale(cfg, mods[m]));
        for (int p = 0; p < 4; p++) {
            char stem[300];
            size_t used = (size_t)snprintf(stem, sizeof stem, "lora_te_");
            for (const char *c = mods[m]; *c; c++)
                stem[used++] = *c == '.' ? '_' : *c;
            stem[used] = '\0';
            snprintf(k, sizeof k, "%s.%s", stem, parts[p]);
            const th_tensor *a = th_st_find(&src, k);
            snprintf(k, sizeof k, "base_model.model.%.280s.%s", mods[m], parts[p]);
            const th_tensor *b = th_st_find(&conv, k);
            cr_assert(a && b && bytes_equal(b, a->data, a->n_bytes), "%s passes through unchanged", k);
        }
    }
    /* and the planner takes it (Linear LoKr) */
    char *bp = pjoin(dir, "model.safetensors");
    mres r = merge_ex(bp, input, NULL, NULL, 1.0, 1);
    expect_ok(r);
    cr_assert_eq(r.rep->n_lowrank, n);
    mres_free(&r);
    free(bp);
    free(notes);
    th_st_free(&conv);
    th_st_free(&src);
    cJSON_Delete(cfg);
    sp_free(&s);
    th_rmrf(dir);
    free(dir);
}

Test(fixtures_other, lora_sam_and_vit)
{
    need_other();
    const char *input = OTHER "/lora-sam-w_a-w_b-rank4/lora.safetensors";
    char *dir = th_tmpdir();
    sp_set s = {0};
    char k[512];
    for (int b = 0; b < 12; b++) {
        snprintf(k, sizeof k, "image_encoder.blocks.%d.attn.qkv.weight", b);
        sp_add2(&s, k, 2304, 768);
    }
    sp_write(dir, &s, NULL);
    th_st conv, src;
    cJSON *cfg;
    convert_fixture(input, dir, NULL, dir, &conv, &cfg, NULL);
    cr_assert_eq(th_st_read(input, &src), 0);
    for (int b = 0; b < 12; b++) {
        snprintf(k, sizeof k, "base_model.model.image_encoder.blocks.%d.attn.qkv.lora_A.weight", b);
        const th_tensor *A = th_st_find(&conv, k);
        snprintf(k, sizeof k, "base_model.model.image_encoder.blocks.%d.attn.qkv.lora_B.weight", b);
        const th_tensor *B = th_st_find(&conv, k);
        cr_assert(A && B && A->shape[0] == 8 && A->shape[1] == 768 && B->shape[0] == 2304 && B->shape[1] == 8);
        const th_tensor *aq, *av, *bq, *bv;
        snprintf(k, sizeof k, "w_a_%03d", 2 * b);
        aq = th_st_find(&src, k);
        snprintf(k, sizeof k, "w_a_%03d", 2 * b + 1);
        av = th_st_find(&src, k);
        snprintf(k, sizeof k, "w_b_%03d", 2 * b);
        bq = th_st_find(&src, k);
        snprintf(k, sizeof k, "w_b_%03d", 2 * b + 1);
        bv = th_st_find(&src, k);
        cr_assert(memcmp(A->data, aq->data, aq->n_bytes) == 0 && memcmp(A->data + aq->n_bytes, av->data, av->n_bytes) == 0,
                  "block %d: A = [a_q; a_v]", b);
        double *Bv = th_to_f64(B), *q = th_to_f64(bq), *v = th_to_f64(bv);
        for (int row = 0; row < 2304; row++)
            for (int c = 0; c < 8; c++) {
                double want = row < 768 && c < 4 ? q[row * 4 + c] : row >= 1536 && c >= 4 ? v[(row - 1536) * 4 + c - 4] : 0;
                cr_assert(Bv[row * 8 + c] == want, "block %d B[%d, %d]", b, row, c);
            }
        free(Bv);
        free(q);
        free(v);
    }
    expect_scale_one(cfg, &conv);
    th_st_free(&conv);
    th_st_free(&src);
    cJSON_Delete(cfg);
    /* LoRA-ViT's file with the A matrices only */
    char *bp = pjoin(dir, "model.safetensors");
    mres r = merge_ex(bp, OTHER "/lora-vit-a-only-incomplete/lora.safetensors", NULL, NULL, 1.0, 1);
    expect_refused(r, "IncompleteModule", "w_b");
    mres_free(&r);
    free(bp);
    sp_free(&s);
    th_rmrf(dir);
    free(dir);
}

Test(fixtures_other, loralib_state_dict)
{
    need_other();
    const char *input = OTHER "/loralib-chinese-clip-qv-pt/lora_weights.pt";
    char *dir = th_tmpdir();
    sp_set s = {0};
    char k[512];
    for (int l = 0; l < 12; l++) {
        snprintf(k, sizeof k, "bert.encoder.layer.%d.attention.self.query.weight", l);
        sp_add2(&s, k, 768, 768);
        snprintf(k, sizeof k, "bert.encoder.layer.%d.attention.self.value.weight", l);
        sp_add2(&s, k, 768, 768);
    }
    sp_write(dir, &s, NULL);
    char *bp = pjoin(dir, "model.safetensors");
    mres r = merge_ex(bp, input, NULL, NULL, 1.0, 1);
    expect_refused(r, "MissingAlpha", "lora_alpha");
    mres_free(&r);
    lm_format_opts fo = {0};
    fo.lora_alpha = 16; /* the training code's lora.Linear(r=16, lora_alpha=16) */
    th_st conv;
    cJSON *cfg;
    convert_fixture(input, dir, &fo, dir, &conv, &cfg, NULL);
    lm_tensor_set *src = NULL;
    int root;
    lm_err err;
    lm_err_clear(&err);
    cr_assert_eq(lm_torch_obj_load(input, &src, &root, &err), LM_OK, "%s", err.msg);
    for (size_t i = 0; i < src->n; i += 2) {
        const char *a = src->t[i].name;
        char module[300];
        snprintf(module, sizeof module, "%.*s", (int)(strlen(a) - 7), a);
        expect_pair(&conv, module, src->t[i].data, src->t[i].n_bytes, src->t[i + 1].data, src->t[i + 1].n_bytes);
    }
    expect_scale_one(cfg, &conv);
    lm_ts_free(src);
    th_st_free(&conv);
    cJSON_Delete(cfg);
    free(bp);
    sp_free(&s);
    th_rmrf(dir);
    free(dir);
}

Test(fixtures_other, mlx_lm_dirs)
{
    need_other();
    /* Qwen2.5-0.5B's last four layers: merged and checked against S (a @ b)^T with S = 10 */
    const char *qwen = OTHER "/mlx-lm-qwen2.5-0.5b-qv";
    char *dir = th_tmpdir(), *out = pjoin(dir, "out.safetensors");
    tset base = {0};
    char k[512];
    for (int l = 20; l < 24; l++) {
        snprintf(k, sizeof k, "model.layers.%d.self_attn.q_proj.weight", l);
        tadd(&base, "F32", k, 2, (uint64_t)896, (uint64_t)896);
        snprintf(k, sizeof k, "model.layers.%d.self_attn.v_proj.weight", l);
        tadd(&base, "F32", k, 2, (uint64_t)128, (uint64_t)896);
    }
    write_base(dir, &base, "{\"model_type\": \"qwen2\"}");
    mres r = merge(dir, qwen, out, NULL);
    expect_ok(r);
    th_st src;
    char *sp = pjoin(qwen, "adapters.safetensors");
    cr_assert_eq(th_st_read(sp, &src), 0);
    refs R;
    refs_from(&R, &base);
    for (size_t i = 0; i < src.n; i++) {
        const char *a = src.t[i].name;
        if (strstr(a, ".lora_a") == NULL)
            continue;
        char mod[300];
        snprintf(mod, sizeof mod, "%.*s", (int)(strlen(a) - 7), a);
        snprintf(k, sizeof k, "%s.lora_b", mod);
        const th_tensor *bt = th_st_find(&src, k);
        double *av = th_to_f64(&src.t[i]), *bv = th_to_f64(bt);
        uint64_t in = src.t[i].shape[0], rr = src.t[i].shape[1], o = bt->shape[1];
        snprintf(k, sizeof k, "%s.weight", mod);
        double *w = rw(&R, k);
        for (uint64_t oo = 0; oo < o; oo++)
            for (uint64_t ii = 0; ii < in; ii++) {
                double acc = 0;
                for (uint64_t q = 0; q < rr; q++)
                    acc += av[ii * rr + q] * bv[q * o + oo];
                w[oo * in + ii] += 10.0 * acc;
            }
        free(av);
        free(bv);
    }
    check_output(out, &R);
    refs_free(&R);
    th_st_free(&src);
    mres_free(&r);
    free(sp);
    /* MiniCPM's old config: scale * alpha / rank = 20; lora_a transposed into PEFT's A */
    const char *mini = OTHER "/mlx-lm-minicpm-2b-old-config";
    sp_set s = {0};
    for (int l = 36; l < 40; l++) {
        snprintf(k, sizeof k, "model.layers.%d.self_attn.q_proj.weight", l);
        sp_add2(&s, k, 2304, 2304);
        snprintf(k, sizeof k, "model.layers.%d.self_attn.v_proj.weight", l);
        sp_add2(&s, k, 2304, 2304);
    }
    char *sdir = pjoin(dir, "mini");
    mkdir(sdir, 0777);
    sp_write(sdir, &s, NULL);
    th_st conv;
    cJSON *cfg;
    convert_fixture(mini, sdir, NULL, sdir, &conv, &cfg, NULL);
    sp = pjoin(mini, "adapters.safetensors");
    cr_assert_eq(th_st_read(sp, &src), 0);
    for (size_t i = 0; i < src.n; i++) {
        const char *a = src.t[i].name;
        if (strstr(a, ".lora_a") == NULL)
            continue;
        char mod[300];
        snprintf(mod, sizeof mod, "%.*s", (int)(strlen(a) - 7), a);
        cr_assert(config_scale(cfg, mod) == 20.0, "%s: scale %g, expected 10 * 16 / 8", mod, config_scale(cfg, mod));
        snprintf(k, sizeof k, "base_model.model.%s.lora_A.weight", mod);
        const th_tensor *A = th_st_find(&conv, k);
        double *x = th_to_f64(&src.t[i]), *y = th_to_f64(A);
        for (uint64_t ii = 0; ii < 2304; ii++)
            for (uint64_t q = 0; q < 8; q++)
                cr_assert(y[q * 2304 + ii] == x[ii * 8 + q], "%s: A is lora_a transposed", mod);
        free(x);
        free(y);
    }
    th_st_free(&src);
    th_st_free(&conv);
    cJSON_Delete(cfg);
    free(sp);
    free(sdir);
    sp_free(&s);
    tfree(&base);
    th_rmrf(dir);
    free(dir);
    free(out);
}
