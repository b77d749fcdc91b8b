/* SPDX-License-Identifier: MIT */
/* adamss.c : AdaMSS (docs/adapter-types.md, AdaMSS): per layer K subspaces, each updating its own
 * set of output rows: ΔW_aug[rows_k, :] = B_k @ A_k @ newB with the saved adamss_A.<k>
 * [rank_k, q], adamss_B.<k> [len_k, rank_k] and adamss_newB [q, in (+1 with a bias)] (the
 * last column of a biased layer's delta goes to the bias).  Which rows belong to subspace k is
 * not saved: PEFT takes them from sklearn's KMeans (init "random", n_init 1, max_iter 10,
 * random_state 123456789) on the rows of U, the left singular vectors of torch.svd_lowrank of
 * [W | b].  lora-merge rebuilds U from the base and the saved newB = Vᵀ (svd_lowrank's
 * algebra: U S = W V for a wide weight, U S = W (WᵀW)⁻¹ V otherwise), runs that KMeans in double
 * (numpy's legacy MT19937 RandomState.choice for the initial centers, Lloyd as sklearn), and
 * refuses unless every cluster has exactly the saved subspace's row count and no distance or
 * convergence test was a near tie. */
#include "method.h"

#include "linalg.h"
#include "lm_error.h"
#include "torch_rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ADAMSS_MAX 19 /* subspaces: A.0-18, B.0-18 and newB fit lm_module's 40 slots */
enum { NEWB = 2 * ADAMSS_MAX };

typedef struct {
    long r, num_subspaces;
} adamss_cfg;

typedef struct {
    const lm_ts_tensor *A[ADAMSS_MAX], *B[ADAMSS_MAX], *newB;
    const uint32_t *rows;  /* the output rows of subspace 0, then 1 ... (ascending within each) */
    int K;
    int bias;              /* 1: this op is the bias (column `col` of the augmented delta) */
    uint64_t col, q;
} adamss_params;

static lm_code adamss_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    adamss_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    f->r = 100;
    f->num_subspaces = 5;
    if (lm_cfg_int(root, "r", &f->r, err) || lm_cfg_int(root, "num_subspaces", &f->num_subspaces, err))
        return err->code;
    if (f->r <= 0 || f->num_subspaces <= 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type ADAMSS needs r > 0 and num_subspaces > 0");
    return LM_OK;
}

/* ---- sklearn's KMeans(init="random", n_init=1, max_iter=10, random_state=123456789) ---------- */
static double mt_double(lm_mt19937 *g) /* numpy's legacy random_sample */
{
    uint32_t a = lm_mt_next(g) >> 5, b = lm_mt_next(g) >> 6;
    return ((double)a * 67108864.0 + (double)b) / 9007199254740992.0;
}

/* RandomState(seed).choice(n, K, replace=False, p=ones(n, float32) / float32(n)): the p path
 * (rounds of rand() through the cumulated p, duplicates dropped, chosen entries zeroed) */
static int rs_choice(uint32_t seed, uint64_t n, int K, uint64_t *out)
{
    double *p = malloc(n * sizeof *p), *cdf = malloc(n * sizeof *cdf), x[ADAMSS_MAX];
    if (p == NULL || cdf == NULL) {
        free(p);
        free(cdf);
        return -1;
    }
    float pf = 1.0f / (float)n;
    for (uint64_t i = 0; i < n; i++)
        p[i] = (double)pf;
    lm_mt19937 g;
    lm_mt_seed(&g, seed);
    int got = 0;
    while (got < K) {
        int want = K - got;
        for (int t = 0; t < want; t++)
            x[t] = mt_double(&g);
        for (int t = 0; t < got; t++)
            p[out[t]] = 0;
        double s = 0;
        for (uint64_t i = 0; i < n; i++)
            cdf[i] = s += p[i];
        for (uint64_t i = 0; i < n; i++)
            cdf[i] /= s;
        int before = got;
        for (int t = 0; t < want; t++) { /* searchsorted(side="right"), first occurrences in order */
            uint64_t lo = 0, hi = n;
            while (lo < hi) {
                uint64_t mid = lo + (hi - lo) / 2;
                if (cdf[mid] <= x[t])
                    lo = mid + 1;
                else
                    hi = mid;
            }
            int dup = 0;
            for (int u = before; u < got; u++)
                dup |= out[u] == lo;
            if (!dup)
                out[got++] = lo;
        }
    }
    free(p);
    free(cdf);
    return 0;
}

typedef struct {
    int ambiguous, empty;
} km_flags;

/* labels of the rows of X [n, d] by their nearest center (the first on equal distances);
 * a second-nearest within 1e-6 of the nearest (relative) marks the result ambiguous */
static void km_assign(const double *X, uint64_t n, uint64_t d, const double *C, int K, int *lab, km_flags *fl)
{
    for (uint64_t i = 0; i < n; i++) {
        double best = INFINITY, second = INFINITY;
        int bk = 0;
        for (int k = 0; k < K; k++) {
            double s = 0;
            for (uint64_t j = 0; j < d; j++) {
                double e = X[i * d + j] - C[(size_t)k * d + j];
                s += e * e;
            }
            if (s < best) {
                second = best;
                best = s;
                bk = k;
            } else if (s < second) {
                second = s;
            }
        }
        if (second - best <= 1e-6 * (best + second))
            fl->ambiguous = 1;
        lab[i] = bk;
    }
}

/* the labels sklearn's KMeans gives the rows of X [n, d] (float32 values), or -1 (memory) */
static int kmeans(const double *X0, uint64_t n, uint64_t d, int K, int *lab, km_flags *fl)
{
    double *X = malloc(n * d * sizeof *X), *C = calloc((size_t)K * d, sizeof *C), *Cn = calloc((size_t)K * d, sizeof *Cn);
    double *mean = calloc(d, sizeof *mean);
    int *old = malloc(n * sizeof *old);
    uint64_t seeds[ADAMSS_MAX], cnt[ADAMSS_MAX];
    int rc = -1;
    if (X == NULL || C == NULL || Cn == NULL || mean == NULL || old == NULL || rs_choice(123456789u, n, K, seeds) != 0)
        goto done;
    double tol = 0;
    for (uint64_t j = 0; j < d; j++) { /* _tolerance: mean of the features' variances * 1e-4 */
        double s = 0, v = 0;
        for (uint64_t i = 0; i < n; i++)
            s += X0[i * d + j];
        mean[j] = s / (double)n;
        for (uint64_t i = 0; i < n; i++)
            v += (X0[i * d + j] - mean[j]) * (X0[i * d + j] - mean[j]);
        tol += v / (double)n;
    }
    tol = tol / (double)d * 1e-4;
    for (uint64_t i = 0; i < n; i++) /* fit: the data centered */
        for (uint64_t j = 0; j < d; j++)
            X[i * d + j] = X0[i * d + j] - mean[j];
    for (int k = 0; k < K; k++)
        memcpy(C + (size_t)k * d, X + seeds[k] * d, d * sizeof *C);
    for (uint64_t i = 0; i < n; i++)
        old[i] = -1;
    int strict = 0;
    for (int it = 0; it < 10; it++) { /* _kmeans_single_lloyd */
        km_assign(X, n, d, C, K, lab, fl);
        memset(Cn, 0, (size_t)K * d * sizeof *Cn);
        memset(cnt, 0, sizeof cnt);
        for (uint64_t i = 0; i < n; i++) {
            cnt[lab[i]]++;
            for (uint64_t j = 0; j < d; j++)
                Cn[(size_t)lab[i] * d + j] += X[i * d + j];
        }
        double shift = 0;
        for (int k = 0; k < K; k++) {
            if (cnt[k] == 0)
                fl->empty = 1; /* sklearn relocates it to a far point: not reproduced */
            for (uint64_t j = 0; j < d && cnt[k] > 0; j++) {
                Cn[(size_t)k * d + j] /= (double)cnt[k];
                double e = Cn[(size_t)k * d + j] - C[(size_t)k * d + j];
                shift += e * e;
            }
        }
        double *t = C;
        C = Cn;
        Cn = t;
        if (memcmp(lab, old, n * sizeof *lab) == 0) {
            strict = 1;
            break;
        }
        if (fabs(shift - tol) <= 1e-3 * tol)
            fl->ambiguous = 1;
        if (shift <= tol)
            break;
        memcpy(old, lab, n * sizeof *lab);
    }
    if (!strict) /* the E-step again, so that the labels match the centers */
        km_assign(X, n, d, C, K, lab, fl);
    rc = 0;
done:
    free(X);
    free(C);
    free(Cn);
    free(mean);
    free(old);
    return rc;
}

/* ---- planning ---------------------------------------------------------------------------- */
static lm_code adamss_fail(lm_err *err, const lm_module *m, const char *fmt, const char *what)
{
    return lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", m->path, fmt, what);
}

/* U [out, q] (rounded to float, as PEFT's clustering sees it) from [W | b] and newB = Vᵀ */
static lm_code left_vectors(const double *Wa, uint64_t m, uint64_t n, const float *newB, uint64_t q, double *U,
                            const lm_module *mod, lm_err *err)
{
    double *V = malloc(n * q * sizeof *V);
    if (V == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (uint64_t i = 0; i < n; i++)
        for (uint64_t j = 0; j < q; j++)
            V[i * q + j] = newB[j * n + i];
    int rc = 0;
    if (m < n) { /* torch works on Wᵀ: U S = W V exactly */
        lm_matmul_d(Wa, V, U, m, n, q);
    } else { /* U = Q U_b with Q in W's range and Wᵀ U = V S: U S = the least-norm X of Wᵀ X = V */
        rc = lm_min_norm_solve(Wa, m, n, V, q, U);
    }
    free(V);
    if (rc == -1)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if (rc != 0)
        return adamss_fail(err, mod, "AdaMSS: the base weight's left singular vectors cannot be rebuilt (%s)",
                           rc == -3 ? "LAPACK cannot be loaded" : "the weight is rank-deficient");
    for (uint64_t j = 0; j < q; j++) {
        double s = 0;
        for (uint64_t i = 0; i < m; i++)
            s += U[i * q + j] * U[i * q + j];
        s = sqrt(s);
        for (uint64_t i = 0; i < m; i++)
            U[i * q + j] = s > 0 ? (double)(float)(U[i * q + j] / s) : 0.0;
    }
    return LM_OK;
}

/* the rows of each subspace, checked against the saved sizes */
static lm_code cluster_rows(lm_plan_ctx *ctx, const lm_module *mod, long bi, long bias, uint64_t m, uint64_t n,
                            const float *newB, uint64_t q, int K, const uint64_t *len, uint32_t *rows, lm_err *err)
{
    /* without a bias [W | b] is W itself: one copy of the weight in double (plus LAPACK's) */
    double *w = malloc(m * (n - (bias >= 0)) * sizeof *w), *Wa = bias >= 0 ? malloc(m * n * sizeof *Wa) : w;
    double *U = malloc(m * q * sizeof *U), *b = bias >= 0 ? malloc(m * sizeof *b) : NULL;
    int *lab = malloc(m * sizeof *lab);
    lm_code rc = LM_OK;
    if (Wa == NULL || U == NULL || w == NULL || lab == NULL || (bias >= 0 && b == NULL)) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    if ((rc = lm_ctx_base_f64(ctx, bi, w, err)) != LM_OK || (bias >= 0 && (rc = lm_ctx_base_f64(ctx, bias, b, err)) != LM_OK))
        goto done;
    uint64_t in = n - (bias >= 0);
    for (uint64_t i = 0; i < m && bias >= 0; i++) {
        memcpy(Wa + i * n, w + i * in, in * sizeof *Wa);
        Wa[i * n + in] = b[i];
    }
    if ((rc = left_vectors(Wa, m, n, newB, q, U, mod, err)) != LM_OK)
        goto done;
    km_flags fl = {0, 0};
    if (kmeans(U, m, q, K, lab, &fl) != 0) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    uint64_t cnt[ADAMSS_MAX] = {0};
    for (uint64_t i = 0; i < m; i++)
        cnt[lab[i]]++;
    char sizes[400];
    size_t used = 0;
    int same = 1;
    for (int k = 0; k < K; k++) {
        same &= cnt[k] == len[k];
        used += (size_t)snprintf(sizes + used, sizeof sizes - used, "%s%llu/%llu", k ? ", " : "",
                                 (unsigned long long)cnt[k], (unsigned long long)len[k]);
        if (used >= sizeof sizes)
            used = sizeof sizes - 1;
    }
    if (fl.empty || fl.ambiguous || !same) {
        rc = lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", mod->path, "AdaMSS: PEFT does not save which "
                            "output rows each subspace updates (its scatter_index comes from sklearn KMeans on the "
                            "base weight's singular vectors); lora-merge's reproduction of that clustering %s (rows "
                            "per subspace, reproduced/saved: %s), so the rows cannot be placed; the base must be the "
                            "one the adapter was trained on", fl.empty ? "meets an empty cluster, which sklearn "
                            "relocates in a way not reproduced" : fl.ambiguous ? "meets a near tie that float rounding "
                            "decides" : "does not give the saved subspace sizes", sizes);
        goto done;
    }
    uint64_t at = 0; /* seg_locations: subspace k's rows ascending, subspaces in label order */
    for (int k = 0; k < K; k++)
        for (uint64_t i = 0; i < m; i++)
            if (lab[i] == k)
                rows[at++] = (uint32_t)i;
done:
    if (Wa != w)
        free(Wa);
    free(U);
    free(w);
    free(b);
    free(lab);
    return rc;
}

static lm_code adamss_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const adamss_cfg *f = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *nb = m->part[NEWB];
    int K = 0;
    while (K < ADAMSS_MAX && m->part[K] != NULL && m->part[ADAMSS_MAX + K] != NULL)
        K++;
    for (int k = K; k < ADAMSS_MAX; k++)
        if (m->part[k] != NULL || m->part[ADAMSS_MAX + k] != NULL)
            return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "AdaMSS subspace %d has %s but "
                                  "subspace %d is incomplete", k, m->part[k] ? "adamss_A" : "adamss_B", K);
    if (nb == NULL || K == 0)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "AdaMSS needs adamss_newB and "
                              "adamss_A.<k> / adamss_B.<k> for its subspaces");
    long bi = lm_ctx_module_weight(ctx, m->path, err);
    if (bi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
    long bias = lm_ctx_module_bias(ctx, m->path);
    if (W->n_dims != 2 || lm_is_gpt2_conv1d(m->path))
        return lm_mismatch(err, m->path, "AdaMSS merges into nn.Linear weights [out, in] only (PEFT's AdamssLayer)");
    uint64_t out = W->shape[0], in = W->shape[1], n = in + (bias >= 0), q = nb->shape[0];
    uint64_t qe = (uint64_t)f->r < out ? (uint64_t)f->r : out;
    qe = qe < n ? qe : n;
    uint64_t Ke = (uint64_t)f->num_subspaces < out ? (uint64_t)f->num_subspaces : out;
    if (nb->n_dims != 2 || nb->shape[1] != n || q != qe || !lm_is_float_dtype(nb->dtype))
        return lm_mismatch(err, m->path, "adamss_newB is not [min(r, out, in%s) = %llu, %llu] floats", bias >= 0 ? " + 1" : "",
                           (unsigned long long)qe, (unsigned long long)n);
    if ((uint64_t)K != Ke)
        return lm_mismatch(err, m->path, "AdaMSS has %d subspaces in the file but min(num_subspaces, out) = %llu", K,
                           (unsigned long long)Ke);
    uint64_t len[ADAMSS_MAX], total = 0, rank = 0;
    for (int k = 0; k < K; k++) {
        const lm_ts_tensor *A = m->part[k], *B = m->part[ADAMSS_MAX + k];
        if (A->n_dims != 2 || B->n_dims != 2 || A->shape[1] != q || B->shape[1] != A->shape[0] ||
            !lm_is_float_dtype(A->dtype) || !lm_is_float_dtype(B->dtype))
            return lm_mismatch(err, m->path, "adamss_A.%d / adamss_B.%d are not [rank, %llu] and [rows, rank] floats",
                               k, k, (unsigned long long)q);
        len[k] = B->shape[0];
        total += len[k];
        rank += A->shape[0];
    }
    if (total != out)
        return lm_mismatch(err, m->path, "the subspaces' adamss_B hold %llu rows in all, the weight has %llu",
                           (unsigned long long)total, (unsigned long long)out);
    uint32_t *rows = lm_ctx_alloc(ctx, out * sizeof *rows, err);
    float *V = malloc(q * n * sizeof *V + 1);
    lm_kernels kr;
    if (rows == NULL || V == NULL || lm_kernels_select(&kr, "ref") != 0) {
        free(V);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    lm_ts_to_f32(nb, 0, q * n, V, &kr);
    lm_code rc = cluster_rows(ctx, m, bi, bias, out, n, V, q, K, len, rows, err);
    free(V);
    for (int w = 0; w < 1 + (bias >= 0) && rc == LM_OK; w++) {
        lm_op *op = lm_ctx_add_delta(ctx, w ? bias : bi, LM_OP_LOWRANK, "adamss", m->path, rank, w ? 1 : in, out, 0,
                                     1.0, sizeof(adamss_params), err);
        if (op == NULL)
            return LM_E_NOMEM;
        adamss_params *pr = op->params;
        for (int k = 0; k < K; k++) {
            pr->A[k] = m->part[k];
            pr->B[k] = m->part[ADAMSS_MAX + k];
        }
        pr->newB = nb;
        pr->rows = rows;
        pr->K = K;
        pr->bias = w;
        pr->col = w ? in : 0;
        pr->q = q;
    }
    return rc;
}

/* A' [rank, in] = stacked A_k @ newB (the op's columns), B' [out, rank]: B_k's rows at subspace k's
 * rows and columns, zero elsewhere; in f64 */
static lm_code adamss_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const adamss_params *pr = op->params;
    uint64_t R = op->rank, in = op->in, out = op->out, q = pr->q, n = pr->newB->shape[1], nt = q * n;
    for (int s = 0; s < pr->K; s++)
        nt += pr->A[s]->n_elems + pr->B[s]->n_elems;
    /* the adapter tensors as f32 in one block (up to 39 of them) */
    float *f = lm_prep_floats(p, (size_t)nt, err);
    double *d = lm_prep_alloc(p, (size_t)(R * in + out * R) * sizeof(double), err);
    if (f == NULL || d == NULL)
        return LM_E_NOMEM;
    float *nb = f, *at_f = f + q * n;
    lm_ts_to_f32(pr->newB, 0, (size_t)(q * n), nb, k);
    double *A2 = d, *B2 = d + R * in;
    uint64_t r0 = 0, at = 0;
    for (int s = 0; s < pr->K; s++) {
        uint64_t rk = pr->A[s]->shape[0], len = pr->B[s]->shape[0];
        float *A = at_f, *B = at_f + rk * q;
        at_f += rk * q + len * rk;
        lm_ts_to_f32(pr->A[s], 0, (size_t)(rk * q), A, k);
        lm_ts_to_f32(pr->B[s], 0, (size_t)(len * rk), B, k);
        for (uint64_t a = 0; a < rk; a++)
            for (uint64_t c = 0; c < in; c++) {
                double v = 0;
                for (uint64_t t = 0; t < q; t++)
                    v += (double)A[a * q + t] * (double)nb[t * n + pr->col + c];
                A2[(r0 + a) * in + c] = v;
            }
        for (uint64_t i = 0; i < len; i++, at++)
            for (uint64_t a = 0; a < rk; a++)
                B2[(uint64_t)pr->rows[at] * R + r0 + a] = (double)B[i * rk + a];
        r0 += rk;
    }
    return lm_prep_publish64(p, A2, (size_t)(R * in), B2, (size_t)(out * R), err);
}

static void adamss_describe_config(const lm_adapter_config *cfg, char *buf, size_t cap)
{
    const adamss_cfg *f = cfg->mcfg;
    snprintf(buf, cap, "r: %ld, num_subspaces: %ld (rows per subspace from a KMeans of the base, checked against the "
             "saved sizes)\n", f->r, f->num_subspaces);
}

static const lm_part adamss_parts[] = {{"adamss_A.#", 0, -1, 1}, {"adamss_B.#", ADAMSS_MAX, -1, 1},
                                       {"adamss_newB", NEWB, -1, 1}};

const lm_method lm_method_adamss = {
    .peft_type = "ADAMSS",
    .summary = "adamss (per-subspace B A newB on output rows clustered by KMeans of the base's singular vectors)",
    .parts = adamss_parts,
    .n_parts = 3,
    .n_index = ADAMSS_MAX,
    .parse_config = adamss_parse,
    .plan_module = adamss_plan_module,
    .prepare = adamss_prepare,
    .describe_config = adamss_describe_config,
};
