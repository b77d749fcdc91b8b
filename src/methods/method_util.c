/* SPDX-License-Identifier: MIT */
/* method_util.c : small helpers the method files share (see method.h): error helpers, layer
 * names, f32 views of adapter tensors for prepare(). */
#include "method.h"

#include "lm_error.h"
#include "pyregex.h"

#include <math.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int lm_is_float_dtype(lm_dtype dt)
{
    return dt == LM_DT_F16 || dt == LM_DT_BF16 || dt == LM_DT_F32 || dt == LM_DT_F64;
}

lm_code lm_mismatch(lm_err *err, const char *module, const char *fmt, ...)
{
    char buf[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "%s", buf);
    lm_err_set_tensor(err, module);
    return LM_E_MISMATCH;
}

lm_code lm_module_fail(lm_err *err, lm_code code, const char *kind, const char *module, const char *fmt, ...)
{
    char buf[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    lm_fail(err, code, kind, "%s", buf);
    lm_err_set_tensor(err, module);
    return code;
}

lm_code lm_cfg_disagrees(const lm_plan_ctx *ctx, lm_err *err, const char *module, const char *key, long value,
                         const char *fmt, ...)
{
    char buf[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    const lm_adapter *a = lm_ctx_adapter(ctx);
    lm_fail(err, LM_E_MISMATCH, "ConfigMismatch", "adapter_config.json has \"%s\": %ld, but %s (PEFT builds the "
            "tensors from it, so it could not load them either)", key, value, buf);
    lm_err_set_tensor(err, module);
    lm_err_set_path(err, a->config_path);
    return LM_E_MISMATCH;
}

lm_code lm_cfg_rank_is(lm_plan_ctx *ctx, lm_err *err, const char *module, uint64_t rank, const char *tensor)
{
    const lm_adapter *a = lm_ctx_adapter(ctx);
    const lm_adapter_config *cfg = a->cfg;
    if (a->foreign != NULL || !cfg->r_given || (cfg->rank_pattern_given && cfg->rank_keys.n == 0))
        return LM_OK;
    long r;
    double alpha;
    if (lm_ctx_rank_alpha(ctx, module, &r, &alpha, err) != LM_OK)
        return err->code;
    if (r > 0 && (uint64_t)r == rank)
        return LM_OK;
    return lm_cfg_disagrees(ctx, err, module, r == cfg->r ? "r" : "rank_pattern", r, "%s holds rank %llu", tensor,
                            (unsigned long long)rank);
}

int lm_cfg_checked(const lm_plan_ctx *ctx)
{
    return lm_ctx_adapter(ctx)->foreign == NULL;
}

lm_code lm_suffix_pattern_parse(const cJSON *root, const char *name, lm_suffix_pattern *sp, lm_err *err)
{
    memset(sp, 0, sizeof *sp);
    const cJSON *f = lm_cfg_field(root, name);
    if (f == NULL || cJSON_IsNull(f))
        return LM_OK;
    if (!cJSON_IsObject(f))
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "'%s' must be an object", name);
    size_t n = (size_t)cJSON_GetArraySize(f);
    sp->keys = calloc(n ? n : 1, sizeof *sp->keys);
    sp->vals = calloc(n ? n : 1, sizeof *sp->vals);
    sp->re = calloc(n ? n : 1, sizeof *sp->re);
    if (sp->keys == NULL || sp->vals == NULL || sp->re == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (const cJSON *e = f->child; e != NULL; e = e->next, sp->n++) {
        size_t i = sp->n, lk = strlen(e->string);
        double v = cJSON_IsNumber(e) ? e->valuedouble : 0;
        sp->vals[i] = v >= 1 && v <= 1e15 && v == (double)(long)v ? (long)v : -1;
        char *re = malloc(lk + 8);
        if ((sp->keys[i] = strdup(e->string)) == NULL || re == NULL) {
            free(re);
            sp->n++;
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
        snprintf(re, lk + 8, ".*\\.%s$", e->string);
        lm_err ignored = {0};
        sp->re[i] = lm_regex_compile(re, &ignored); /* NULL: this key is never checked */
        free(re);
    }
    return LM_OK;
}

void lm_suffix_pattern_free(lm_suffix_pattern *sp)
{
    for (size_t i = 0; i < sp->n; i++) {
        free(sp->keys[i]);
        lm_regex_free(sp->re[i]);
    }
    free(sp->keys);
    free(sp->vals);
    free(sp->re);
    memset(sp, 0, sizeof *sp);
}

int lm_suffix_pattern_lookup(const lm_suffix_pattern *sp, const char *module, long *val)
{
    for (size_t i = 0; i < sp->n; i++) {
        if (sp->re[i] == NULL)
            return -1; /* PEFT may take this key here: cannot tell */
        int m = lm_regex_exec(sp->re[i], module, strlen(module), 0, 100000, NULL, 0);
        if (m < 0) { /* over the budget: drop the key, so each one costs this once */
            lm_regex_free(sp->re[i]);
            sp->re[i] = NULL;
            return -1;
        }
        if (m == 1) {
            *val = sp->vals[i];
            return *val > 0 ? 1 : -1;
        }
    }
    for (size_t i = 0; i < sp->n; i++)
        if (strcmp(sp->keys[i], module) == 0) {
            *val = sp->vals[i];
            return *val > 0 ? 1 : -1;
        }
    return 0;
}

const char *lm_leaf_of(const char *module)
{
    const char *dot = strrchr(module, '.');
    return dot ? dot + 1 : module;
}

/* GPT-2's Conv1D layers (stored [in, out]) by name: what decides a square layer's orientation */
int lm_is_gpt2_conv1d(const char *module)
{
    const char *leaf = lm_leaf_of(module);
    return strcmp(leaf, "c_attn") == 0 || strcmp(leaf, "c_proj") == 0 || strcmp(leaf, "c_fc") == 0;
}

void lm_shape_str(char *buf, size_t cap, size_t n_dims, const uint64_t *shape)
{
    size_t used = 0;
    used += (size_t)snprintf(buf + used, cap - used, "[");
    for (size_t d = 0; d < n_dims && used < cap; d++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%llu", d ? ", " : "", (unsigned long long)shape[d]);
    if (used < cap)
        snprintf(buf + used, cap - used, "]");
}

/* b (from malloc; NULL: out of memory) owned by p, or freed */
static void *prep_own(lm_prepared *p, void *b, lm_err *err)
{
    if (b == NULL || p->n_owned >= LM_PREP_OWNED) {
        lm_fail(err, LM_E_NOMEM, NULL, b == NULL ? "out of memory" : "too many prepared blocks");
        free(b);
        return NULL;
    }
    p->owned[p->n_owned++] = b;
    return b;
}

void *lm_prep_alloc(lm_prepared *p, size_t n_bytes, lm_err *err)
{
    return prep_own(p, calloc(1, n_bytes ? n_bytes : 1), err);
}

float *lm_prep_floats(lm_prepared *p, size_t n_floats, lm_err *err)
{
    return lm_prep_alloc(p, n_floats * sizeof(float), err);
}

lm_code lm_prep_publish64(lm_prepared *p, const double *a64, size_t n_a, const double *b64, size_t n_b, lm_err *err)
{
    float *a = lm_prep_floats(p, n_a, err), *b = a != NULL && b64 != NULL ? lm_prep_floats(p, n_b, err) : NULL;
    if (a == NULL || (b64 != NULL && b == NULL))
        return err->code;
    for (size_t e = 0; e < n_a; e++)
        a[e] = (float)a64[e];
    for (size_t e = 0; b != NULL && e < n_b; e++)
        b[e] = (float)b64[e];
    p->a = a;
    p->a64 = a64;
    if (b64 != NULL)
        p->b = b;
    p->b64 = b64;
    return LM_OK;
}

void lm_prep_read(lm_prepared *p, const lm_ts_tensor *t)
{
    for (size_t i = 0; i < p->n_read; i++)
        if (p->read[i] == t)
            return;
    if (t->file_backed && p->n_read < LM_PREP_OWNED)
        p->read[p->n_read++] = t;
}

long lm_ctx_weight_2d_or_conv(lm_plan_ctx *ctx, const char *module, uint64_t *cols, lm_err *err)
{
    long bi = lm_ctx_module_weight(ctx, module, err);
    if (bi < 0)
        return -1;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    if (W->n_dims == 2 || (W->n_dims == 4 && W->shape[2] == W->shape[3])) {
        *cols = W->shape[0] ? W->n_elems / W->shape[0] : 0;
        return bi;
    }
    char sw[96];
    lm_shape_str(sw, sizeof sw, W->n_dims, W->shape);
    lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", module, "%s on '%s' %s: PEFT merges it into Linear and "
                   "square-kernel Conv2d weights only", lm_ctx_adapter(ctx)->cfg->peft_type, W->name, sw);
    return -1;
}

void lm_ts_to_f32(const lm_ts_tensor *t, uint64_t off, size_t n, float *dst, const lm_kernels *k)
{
    const uint8_t *d = t->data;
    switch (t->dtype) {
    case LM_DT_F32: memcpy(dst, d + off * 4, n * sizeof(float)); break;
    case LM_DT_F16: k->f16_to_f32((const uint16_t *)(const void *)(d + off * 2), dst, n); break;
    case LM_DT_BF16: k->bf16_to_f32((const uint16_t *)(const void *)(d + off * 2), dst, n); break;
    case LM_DT_F64: k->f64_to_f32((const double *)(const void *)(d + off * 8), dst, n); break;
    default: break; /* planners accept float tensors only */
    }
}

/* float tensor t's elements as f32 into v, read with pread from the adapter's snapshot
 * (lm_ts_read_bytes), converted a chunk at a time; -1 when t is not in a snapshot */
static int snapshot_f32(const lm_ts_tensor *t, float *v, const lm_kernels *k)
{
    if (t->dtype == LM_DT_F32)
        return lm_ts_read_bytes(t, 0, v, (size_t)t->n_bytes);
    alignas(64) uint8_t raw[1 << 15];
    const size_t esz = lm_dtype_bits(t->dtype) / 8, per = sizeof raw / esz;
    const lm_ts_tensor chunk = {.dtype = t->dtype, .data = raw};
    for (uint64_t e = 0; e < t->n_elems; e += per) {
        const size_t m = t->n_elems - e < per ? (size_t)(t->n_elems - e) : per;
        if (lm_ts_read_bytes(t, e * esz, raw, m * esz) != 0)
            return -1;
        lm_ts_to_f32(&chunk, 0, m, v + e, k);
    }
    return 0;
}

const float *lm_prep_view(lm_prepared *p, const lm_ts_tensor *t, const lm_kernels *k, lm_err *err)
{
    /* A tensor of an adapter's snapshot is read into memory of p's with pread, never through the
     * mapping: mapping its pages (MADV_POPULATE_READ), reading them and dropping them after
     * (MADV_DONTNEED, a TLB shootdown) cost ~2.5x the copy (~25 against ~9 ms of CPU for the
     * 50 MB of the 1.1B bench's factors).  Not a tensor every module reads (shared): that one
     * stays mapped for the whole merge, read once. */
    if (t->file_backed && !t->shared &&
        (t->dtype == LM_DT_F32 || t->dtype == LM_DT_F16 || t->dtype == LM_DT_BF16 || t->dtype == LM_DT_F64)) {
        float *v = malloc(t->n_elems ? (size_t)t->n_elems * sizeof *v : 1);
        if (v != NULL && snapshot_f32(t, v, k) == 0)
            return prep_own(p, v, err);
        free(v);
    }
    lm_prep_read(p, t);
    if (t->dtype == LM_DT_F32 && ((uintptr_t)t->data % sizeof(float)) == 0)
        return t->data;
    float *v = lm_prep_floats(p, (size_t)t->n_elems, err);
    if (v == NULL)
        return NULL;
    lm_ts_to_f32(t, 0, (size_t)t->n_elems, v, k);
    return v;
}

int64_t lm_ts_index(const lm_ts_tensor *t, uint64_t i)
{
    const uint8_t *d = t->data;
    switch (t->dtype) {
    case LM_DT_U8: return d[i];
    case LM_DT_I8: return (int8_t)d[i];
    case LM_DT_I16: { int16_t x; memcpy(&x, d + 2 * i, 2); return x; }
    case LM_DT_I32: { int32_t x; memcpy(&x, d + 4 * i, 4); return x; }
    case LM_DT_I64: { int64_t x; memcpy(&x, d + 8 * i, 8); return x; }
    default: return -1;
    }
}

/* ---- the f64 path a few rows at a time (lm_f64_rows_tile / lm_f64_rows_raw) ----------------
 * The operations of the engine's LM_EXACT_F64 tile (exec.c: f32_to_f64, apply_tile64, f64_round,
 * the same kernels) on row blocks of about LM_F64_ROWS_ELEMS elements, so that the f64 rows stay
 * in the cache between the three passes instead of going to memory and back three times (a 2^19
 * element tile is 4 MiB in f64).  An apply_tile64 computes each row from that row alone (tiles
 * start at any row: the --tile size never changes a byte), so the blocks give the tile's bytes. */
enum { LM_F64_ROWS_ELEMS = 32768 };

static int f64_rows(const lm_op *op, const lm_prepared *p, const lm_tile *t, const void *raw, lm_kdtype in,
                    lm_kdtype out, uint16_t *dst, lm_cert_counts *st, uint64_t *n_changed)
{
    const lm_kernels *k = t->k;
    const uint64_t cols = t->cols, al = op->row_align > 1 ? op->row_align : 1;
    uint64_t g = LM_F64_ROWS_ELEMS / (cols ? cols : 1);
    g = g < 4 ? 4 : g - g % 4; /* whole blocks of the f64 kernels' 4 rows */
    g = g < al ? al : g - g % al;
    g = g < t->nr ? g : t->nr;
    const size_t n_max = (size_t)(g * cols);
    double *acc = malloc((3 * n_max + 64) * sizeof *acc + (raw != NULL ? n_max * sizeof(float) : 0));
    if (acc == NULL)
        return -1;
    double *scratch = acc + n_max; /* 2 n + 64, as lm_tile64 promises */
    float *f32 = (float *)(void *)(scratch + 2 * n_max + 64);
    const uint16_t em = out == LM_KDT_BF16 ? 0x7F80u : 0x7C00u;
    for (uint64_t q = 0; q < t->nr; q += g) {
        const uint64_t nr = t->nr - q < g ? t->nr - q : g;
        const size_t n = (size_t)(nr * cols), e0 = (size_t)(q * cols);
        const float *x = t->acc != NULL ? t->acc + e0 : f32;
        if (raw != NULL) {
            if (in == LM_KDT_F32)
                x = (const float *)raw + e0;
            else if (in == LM_KDT_BF16)
                k->bf16_to_f32((const uint16_t *)raw + e0, f32, n);
            else
                k->f16_to_f32((const uint16_t *)raw + e0, f32, n);
        }
        k->f32_to_f64(x, acc, n);
        const lm_tile64 t64 = {acc, scratch, t->r0 + q, nr, t->rows, cols, k};
        op->method->apply_tile64(op, p, &t64);
        k->f64_round(acc, dst + e0, out, n);
        const size_t bad = k->count_nonfinite_16(dst + e0, n, em);
        if (bad != 0) { /* inf/NaN f64 values, the rest finite ones beyond the range */
            size_t bad64 = 0;
            for (size_t e = 0; e < n; e++)
                bad64 += !isfinite(acc[e]);
            st->n_nonfinite += bad64;
            st->n_overflow += bad - bad64;
        }
        if (n_changed != NULL)
            *n_changed += k->count_diff_16((const uint16_t *)raw + e0, dst + e0, n);
    }
    st->n_recomputed += t->nr * cols; /* every element computed in f64, as the engine's f64 path counts them */
    free(acc);
    return 0;
}

int lm_f64_rows_tile(const lm_op *op, const lm_prepared *p, const lm_tile *t, lm_kdtype out, uint16_t *dst,
                     lm_cert_counts *st)
{
    return f64_rows(op, p, t, NULL, LM_KDT_F32, out, dst, st, NULL);
}

int lm_f64_rows_raw(const lm_op *op, const lm_prepared *p, const lm_tile *t, const void *raw, lm_kdtype in,
                    lm_kdtype out, uint16_t *dst, lm_cert_counts *st, uint64_t *n_changed)
{
    if (n_changed != NULL)
        *n_changed = 0;
    return f64_rows(op, p, t, raw, in, out, dst, st, in == out ? n_changed : NULL);
}
