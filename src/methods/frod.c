/* SPDX-License-Identifier: MIT */
/* frod.c : FRoD (docs/adapter-types.md, FRoD): the adapted weight is W' = U (S + diag λ) Vᵀ, V
 * [in, in] shared by the modules of one category (base_model.frod_V.<category>, with the sparse
 * S's positions frod_s_indices.<category> and size frod_s_size.<category>), λ = frod_lambda_l
 * and S's values = frod_lambda_s_values trained per module, and U not saved: PEFT rebuilds it
 * from the base weight when it loads the adapter, bi = W V⁻ᵀ (torch.linalg.solve; where V is
 * singular, W pinv(V)ᵀ with rtol 1e-6), U = bi with unit columns (zero where a column's norm is
 * <= 1e-12), rounded to float32.  A low-rank op of rank in: since W = bi Vᵀ, W' - W =
 * (U (S + diag λ) - bi) Vᵀ; with the pinv fallback W is not bi Vᵀ, and the op's factors are
 * (U (S + diag λ) Vᵀ - W) and I.  Prepare reads the tensor's original values (LM_M_READS_BASE)
 * and solves with LAPACK (linalg.c). */
#include "method.h"

#include "linalg.h"
#include "lm_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { FL, FS };

typedef struct {
    const lm_ts_tensor *V, *idx, *lam, *sval; /* V [in, in], idx [2, nnz], λ [in], values [nnz] */
    int transposed;                           /* W stored [in, out] (Conv1D) */
} frod_params;

static lm_code frod_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    (void)c;
    int save = 1;
    if (lm_cfg_bool(root, "save_projection", &save, err))
        return err->code;
    if (!save)
        return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type FROD with save_projection false: "
                       "PEFT rebuilds frod_V from the base weights by float32 decompositions whose signs the merge "
                       "depends on; not reproduced");
    return LM_OK;
}

/* PEFT's _category_from_key: the last component when the one before is a number, else the last
 * two joined by '_' (BERT's attention.output.dense: "attention_output") */
static void frod_category(const char *path, char *buf, size_t cap)
{
    const char *last = strrchr(path, '.');
    if (last == NULL) {
        snprintf(buf, cap, "%s", path);
        return;
    }
    const char *prev = last;
    while (prev > path && prev[-1] != '.')
        prev--;
    size_t plen = (size_t)(last - prev);
    if (plen > 0 && strspn(prev, "0123456789") >= plen) {
        snprintf(buf, cap, "%s", last + 1);
        return;
    }
    int attn = prev - path >= 10 && strncmp(prev - 10, "attention.", 10) == 0 &&
               (prev - path == 10 || prev[-11] == '.');
    if (attn && plen == 6 && strncmp(prev, "output", 6) == 0 && strcmp(last + 1, "dense") == 0)
        snprintf(buf, cap, "attention_output");
    else
        snprintf(buf, cap, "%.*s_%s", (int)plen, prev, last + 1);
}

static int frod_is_int(lm_dtype dt)
{
    return dt == LM_DT_I64 || dt == LM_DT_I32 || dt == LM_DT_I16 || dt == LM_DT_I8 || dt == LM_DT_U8;
}

/* the category's shared tensors, checked against the module's λ [in] and values [nnz] */
static lm_code frod_shared(lm_plan_ctx *ctx, const lm_module *m, uint64_t in, uint64_t nnz, frod_params *fp,
                           lm_err *err)
{
    char cat[256], name[300];
    frod_category(m->path, cat, sizeof cat);
    const lm_ts_tensor *t[3];
    static const char *const which[] = {"frod_V", "frod_s_indices", "frod_s_size"};
    for (int k = 0; k < 3; k++) {
        snprintf(name, sizeof name, "%s.%s", which[k], cat);
        if ((t[k] = lm_ctx_shared(ctx, name)) == NULL)
            return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "FRoD needs the shared "
                                  "base_model.%s (category '%s' of this module)", name, cat);
    }
    const lm_ts_tensor *V = t[0], *idx = t[1], *sz = t[2];
    if (V->n_dims != 2 || V->shape[0] != in || V->shape[1] != in ||
        !(V->dtype == LM_DT_F32 || V->dtype == LM_DT_BF16 || V->dtype == LM_DT_F16))
        return lm_mismatch(err, m->path, "frod_V.%s must be a [%llu, %llu] F32/BF16/F16 matrix (frod_lambda_l has %llu "
                           "values)", cat, (unsigned long long)in, (unsigned long long)in, (unsigned long long)in);
    if (!frod_is_int(sz->dtype) || sz->n_elems != 2 || lm_ts_index(sz, 0) != (int64_t)in ||
        lm_ts_index(sz, 1) != (int64_t)in)
        return lm_mismatch(err, m->path, "frod_s_size.%s must be the integers [%llu, %llu]", cat,
                           (unsigned long long)in, (unsigned long long)in);
    if (!frod_is_int(idx->dtype) || idx->n_dims != 2 || idx->shape[0] != 2 || idx->shape[1] != nnz)
        return lm_mismatch(err, m->path, "frod_s_indices.%s must be [2, %llu] integers (one position per "
                           "frod_lambda_s_values entry)", cat, (unsigned long long)nnz);
    for (uint64_t e = 0; e < 2 * nnz; e++) {
        int64_t v = lm_ts_index(idx, e);
        if (v < 0 || v >= (int64_t)in)
            return lm_mismatch(err, m->path, "frod_s_indices.%s holds %lld, outside [0, %llu)", cat, (long long)v,
                               (unsigned long long)in);
    }
    fp->V = V;
    fp->idx = idx;
    return LM_OK;
}

static lm_code frod_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_ts_tensor *lam = m->part[FL], *sv = m->part[FS];
    if (lam == NULL || sv == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path,
                              "FRoD needs frod_lambda_l and frod_lambda_s_values");
    if (lam->n_dims != 1 || lam->n_elems == 0 || sv->n_dims != 1 || !lm_is_float_dtype(lam->dtype) ||
        !lm_is_float_dtype(sv->dtype))
        return lm_mismatch(err, m->path, "frod_lambda_l and frod_lambda_s_values must be 1-D float tensors");
    uint64_t in = lam->n_elems;
    frod_params fp = {0};
    if (frod_shared(ctx, m, in, sv->n_elems, &fp, err))
        return err->code;
    long wi = lm_ctx_module_weight(ctx, m->path, err);
    if (wi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, wi);
    if (W->n_dims != 2 || (W->shape[1] != in && W->shape[0] != in))
        return lm_mismatch(err, m->path, "frod_lambda_l has %llu values but base '%s' has no such input dimension",
                           (unsigned long long)in, W->name);
    /* Linear [out, in]; GPT-2's Conv1D [in, out] (PEFT transposes it: fan_in_fan_out) */
    int conv = W->shape[0] == in && (W->shape[1] != in || lm_is_gpt2_conv1d(m->path));
    uint64_t out = conv ? W->shape[1] : W->shape[0];
    int orient = 0;
    long bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err);
    if (bi < 0)
        return err->code;
    if (out * in > (uint64_t)INT32_MAX || in * in > (uint64_t)INT32_MAX)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", m->path, "FRoD needs a solve with the [%llu, "
                              "%llu] weight, beyond LAPACK's 32-bit sizes", (unsigned long long)out,
                              (unsigned long long)in);
    lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "frod", m->path, in, in, out, orient, 1.0,
                                 sizeof(frod_params), err);
    if (op == NULL)
        return LM_E_NOMEM;
    fp.lam = lam;
    fp.sval = sv;
    fp.transposed = orient;
    *(frod_params *)op->params = fp;
    op->flops += (double)in * (double)in * (2.0 * (double)in / 3.0 + 2.0 * (double)out); /* LU and solve */
    return LM_OK;
}

static lm_code frod_lapack_fail(int rc, lm_err *err)
{
    if (rc == -3)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "FRoD needs LAPACK from OpenBLAS (libopenblas.so.0), "
                       "which could not be loaded");
    return rc == -1 ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory")
                    : lm_fail(err, LM_E_FORMAT, "NonFinite", "LAPACK failed on FRoD's frod_V or the base weight "
                              "(inf or NaN in them?)");
}

/* bi = W pinv(V)ᵀ = W U_v diag(1/s) Vh_v over the singular values s > 1e-6 s_max (torch's
 * linalg.pinv with rtol 1e-6), for a V on which the solve failed.  bi holds W on entry. */
static int frod_pinv(const float *V, size_t in, size_t out, double *bi)
{
    double *u = malloc((2 * in * in + in + in * out) * sizeof(double));
    if (u == NULL)
        return -1;
    double *s = u + in * in, *vh = s + in, *t = vh + in * in;
    int rc = lm_svd_top(V, in, in, in, u, s, vh);
    if (rc == 0) {
        double tol = 1e-6 * s[0];
        for (size_t c = 0; c < in; c++) { /* u[:, c] / s[c], or 0 */
            double f = s[c] > tol ? 1.0 / s[c] : 0.0;
            for (size_t i = 0; i < in; i++)
                u[i * in + c] *= f;
        }
        lm_matmul_d(bi, u, t, out, in, in);
        lm_matmul_d(t, vh, bi, out, in, in);
    }
    free(u);
    return rc;
}

/* B' [out, in], A' [in, in] (f64 and f32): (U M - bi, Vᵀ), or (U M Vᵀ - W, I) after the pinv
 * fallback, M = S + diag λ */
static lm_code frod_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const frod_params *pr = op->params;
    size_t in = (size_t)op->in, out = (size_t)op->out, nnz = (size_t)pr->sval->n_elems;
    const float *V = lm_prep_view(p, pr->V, k, err), *lam = V ? lm_prep_view(p, pr->lam, k, err) : NULL;
    const float *sv = lam ? lm_prep_view(p, pr->sval, k, err) : NULL;
    double *b64 = sv ? lm_prep_alloc(p, out * in * sizeof(double), err) : NULL;
    double *a64 = b64 ? lm_prep_alloc(p, in * in * sizeof(double), err) : NULL;
    double *w = a64 ? malloc((2 * out * in + in * in) * sizeof(double)) : NULL;
    if (w == NULL)
        return a64 == NULL ? LM_E_NOMEM : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    double *bi = w + out * in, *vd = bi + out * in;
    lm_prep_read(p, pr->idx);
    for (size_t o = 0; o < out; o++) /* logical W [out, in] */
        for (size_t i = 0; i < in; i++)
            w[o * in + i] = bi[o * in + i] = p->base[pr->transposed ? i * out + o : o * in + i];
    for (size_t e = 0; e < in * in; e++)
        vd[e] = V[e];
    int rc = lm_solve_rows(vd, in, bi, out), pinv = rc == 1;
    if (pinv)
        rc = frod_pinv(V, in, out, bi);
    if (rc != 0) {
        free(w);
        return frod_lapack_fail(rc, err);
    }
    for (size_t j = 0; j < in; j++) { /* U = bi with unit columns, rounded to f32 (PEFT: u.float()) */
        double ss = 0;
        for (size_t o = 0; o < out; o++)
            ss += bi[o * in + j] * bi[o * in + j];
        double nrm = sqrt(ss);
        for (size_t o = 0; o < out; o++)
            b64[o * in + j] = nrm > 1e-12 ? (double)(float)(bi[o * in + j] / nrm) : 0.0;
    }
    /* B' = U M: column c gets U[:, c] λ_c plus U[:, r] v for each S entry (r, c, v); duplicates add */
    double *um = malloc(out * in * sizeof(double));
    if (um == NULL) {
        free(w);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    for (size_t o = 0; o < out; o++)
        for (size_t c = 0; c < in; c++)
            um[o * in + c] = b64[o * in + c] * (double)lam[c];
    for (size_t e = 0; e < nnz; e++) {
        size_t r = (size_t)lm_ts_index(pr->idx, e), c = (size_t)lm_ts_index(pr->idx, nnz + e);
        for (size_t o = 0; o < out; o++)
            um[o * in + c] += b64[o * in + r] * (double)sv[e];
    }
    if (!pinv) {
        for (size_t e = 0; e < out * in; e++)
            b64[e] = um[e] - bi[e];
        for (size_t q = 0; q < in; q++) /* A' = Vᵀ */
            for (size_t i = 0; i < in; i++)
                a64[q * in + i] = V[i * in + q];
    } else {
        for (size_t q = 0; q < in; q++) /* Vᵀ, then B' = U M Vᵀ - W and A' = I */
            for (size_t i = 0; i < in; i++)
                vd[q * in + i] = V[i * in + q];
        lm_matmul_d(um, vd, b64, out, in, in);
        for (size_t e = 0; e < out * in; e++)
            b64[e] -= w[e];
        for (size_t q = 0; q < in; q++)
            for (size_t i = 0; i < in; i++)
                a64[q * in + i] = q == i;
    }
    free(um);
    free(w);
    return lm_prep_publish64(p, a64, in * in, b64, out * in, err);
}

static void frod_describe_config(const lm_adapter_config *cfg, char *buf, size_t cap)
{
    (void)cfg;
    snprintf(buf, cap, "save_projection: true (U rebuilt from the base weight and the saved frod_V per category)\n");
}

static const lm_part frod_parts[] = {{"frod_lambda_l", FL, -1, 1}, {"frod_lambda_s_values", FS, -1, 1}};
static const char *const frod_shared_names[] = {"frod_V.*", "frod_s_indices.*", "frod_s_size.*", NULL};

const lm_method lm_method_frod = {
    .peft_type = "FROD",
    .summary = "frod (the weight rebuilt as U (S + diag lambda) V^T, U from the base weight and the shared V)",
    .parts = frod_parts,
    .n_parts = 2,
    .shared = frod_shared_names,
    .flags = LM_M_READS_BASE | LM_M_UNIT_WEIGHT | LM_M_NO_RANK,
    .parse_config = frod_parse,
    .plan_module = frod_plan_module,
    .prepare = frod_prepare,
    .describe_config = frod_describe_config,
};
