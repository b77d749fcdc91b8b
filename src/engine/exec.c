/* exec.c : the executor (see exec.h). */
#include "exec.h"

#include "compat.h"
#include "gemm_tile.h"
#include "lm_error.h"
#include "st_writer.h"

#include <errno.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define TILE_ELEMS ((uint64_t)1 << 18)      /* default f32 elements per tile (1 MiB) */
#define COPY_CHUNK ((uint64_t)32 << 20)     /* bytes per copy task: fewer hand-offs of the output inode lock */

uint64_t lm_exec_tile_rows(uint64_t cols, uint64_t tile_elems)
{
    if (tile_elems == 0)
        tile_elems = TILE_ELEMS;
    if (cols == 0 || cols >= tile_elems)
        return 1;
    return tile_elems / cols;
}

static int is_float_dtype(lm_dtype dt)
{
    return dt == LM_DT_F16 || dt == LM_DT_BF16 || dt == LM_DT_F32 || dt == LM_DT_F64;
}

/* ------------------------------------------------------------------------------------------ */
/* f32 views of adapter tensors                                                                 */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    const lm_ts_tensor *src;
    const float *f32; /* borrowed (aligned F32 data) or owned */
    float *owned;
} f32_view;

typedef struct {
    f32_view *v;
    size_t n, cap;
} view_cache;

static void to_f32(const lm_kernels *k, lm_dtype dt, const void *src, float *dst, size_t n)
{
    switch (dt) {
    case LM_DT_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case LM_DT_F16:
        k->f16_to_f32(src, dst, n);
        break;
    case LM_DT_BF16:
        k->bf16_to_f32(src, dst, n);
        break;
    case LM_DT_F64:
        k->f64_to_f32(src, dst, n);
        break;
    default:
        memset(dst, 0, n * sizeof(float)); /* the planner allows float types only */
        break;
    }
}

static void from_f32(const lm_kernels *k, lm_dtype dt, const float *src, void *dst, size_t n)
{
    switch (dt) {
    case LM_DT_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case LM_DT_F16:
        k->f32_to_f16(src, dst, n);
        break;
    case LM_DT_BF16:
        k->f32_to_bf16(src, dst, n);
        break;
    case LM_DT_F64:
        k->f32_to_f64(src, dst, n);
        break;
    default:
        break;
    }
}

static const float *view_get(view_cache *c, const lm_ts_tensor *t, const lm_kernels *k, lm_err *err)
{
    for (size_t i = 0; i < c->n; i++)
        if (c->v[i].src == t)
            return c->v[i].f32;
    if (lm_grow((void **)&c->v, &c->cap, c->n, sizeof *c->v, 64) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    f32_view *v = &c->v[c->n];
    memset(v, 0, sizeof *v);
    v->src = t;
    if (t->dtype == LM_DT_F32 && ((uintptr_t)t->data % sizeof(float)) == 0) {
        v->f32 = t->data;
    } else {
        v->owned = malloc((t->n_elems ? t->n_elems : 1) * sizeof(float));
        if (v->owned == NULL) {
            lm_fail(err, LM_E_NOMEM, NULL, "out of memory converting '%s'", t->name);
            return NULL;
        }
        to_f32(k, t->dtype, t->data, v->owned, t->n_elems);
        v->f32 = v->owned;
    }
    c->n++;
    return v->f32;
}

/* AdaLoRA: A with row i scaled by e[i] (A [rank, in] f32), kept with the views */
static const float *scaled_rows(view_cache *c, const lm_ts_tensor *a, const float *A, const lm_ts_tensor *e,
                                const lm_kernels *k, lm_err *err)
{
    const float *E = view_get(c, e, k, err);
    if (E == NULL || lm_grow((void **)&c->v, &c->cap, c->n, sizeof *c->v, 64) != 0) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    uint64_t rank = a->shape[0], in = rank ? a->n_elems / rank : 0;
    float *out = malloc((a->n_elems ? a->n_elems : 1) * sizeof *out);
    if (out == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory scaling '%s'", a->name);
        return NULL;
    }
    for (uint64_t r = 0; r < rank; r++)
        for (uint64_t i = 0; i < in; i++)
            out[r * in + i] = A[r * in + i] * E[r];
    f32_view *v = &c->v[c->n++];
    memset(v, 0, sizeof *v); /* src NULL: never found by view_get, only freed */
    v->owned = out;
    v->f32 = out;
    return out;
}

/* an owned f32 product A [m, k] @ B [k, n] (f32 arithmetic, as PEFT), kept with the views */
static const float *matmul_owned(view_cache *c, const float *A, const float *B, uint64_t m, uint64_t k, uint64_t n,
                                 lm_err *err)
{
    float *out = calloc((size_t)(m * n) + 1, sizeof *out);
    if (out == NULL || lm_grow((void **)&c->v, &c->cap, c->n, sizeof *c->v, 64) != 0) {
        free(out);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    lm_gemm_tile_nn(out, (size_t)m, (size_t)n, A, B, (size_t)k, 1.0f);
    f32_view *v = &c->v[c->n++];
    memset(v, 0, sizeof *v);
    v->owned = out;
    v->f32 = out;
    return out;
}

/* VeRA: A' = lambda_d * A[:, :in] ([rank, in]) and B' = lambda_b * B[:out, :] ([out, rank]) from
 * the shared projections; *A and *B hold the full projections' views on entry */
static lm_code vera_factors(view_cache *c, const lm_op *op, const float **A, const float **B, const float *lb,
                            const float *ld, lm_err *err)
{
    uint64_t r = op->rank, lda = op->a->shape[1];
    float *a2 = malloc((size_t)(r * op->in) * sizeof *a2 + 1), *b2 = malloc((size_t)(op->out * r) * sizeof *b2 + 1);
    if (a2 == NULL || b2 == NULL || lm_grow((void **)&c->v, &c->cap, c->n + 1, sizeof *c->v, 64) != 0) {
        free(a2);
        free(b2);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    for (uint64_t k = 0; k < r; k++)
        for (uint64_t j = 0; j < op->in; j++)
            a2[k * op->in + j] = ld[k] * (*A)[k * lda + j];
    for (uint64_t p = 0; p < op->out; p++)
        for (uint64_t k = 0; k < r; k++)
            b2[p * r + k] = lb[p] * (*B)[p * r + k];
    float *owned[2] = {a2, b2};
    for (int i = 0; i < 2; i++) {
        f32_view *v = &c->v[c->n++];
        memset(v, 0, sizeof *v);
        v->owned = owned[i];
        v->f32 = owned[i];
    }
    *A = a2;
    *B = b2;
    return LM_OK;
}

/* HRA: the unit vectors of the reflections, column j at [j * in]: U's columns normalized, or
 * (apply_GS) made orthonormal by classical Gram-Schmidt in order */
static const float *hra_vectors(view_cache *c, const lm_op *op, const float *U, lm_err *err)
{
    uint64_t n = op->in, r = op->rank;
    float *q = malloc((size_t)(n * r) * sizeof *q + 1);
    double *v = malloc((size_t)n * sizeof *v + 1);
    if (q == NULL || v == NULL || lm_grow((void **)&c->v, &c->cap, c->n, sizeof *c->v, 64) != 0) {
        free(q);
        free(v);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    for (uint64_t j = 0; j < r; j++) {
        for (uint64_t x = 0; x < n; x++)
            v[x] = U[x * r + j];
        if (op->dora_axis) /* Gram-Schmidt: remove the earlier directions (of U_j, classical) */
            for (uint64_t l = 0; l < j; l++) {
                double d = 0;
                for (uint64_t x = 0; x < n; x++)
                    d += (double)q[l * n + x] * (double)U[x * r + j];
                for (uint64_t x = 0; x < n; x++)
                    v[x] -= d * q[l * n + x];
            }
        double ss = 0;
        for (uint64_t x = 0; x < n; x++)
            ss += v[x] * v[x];
        double inv = ss > 0 ? 1.0 / sqrt(ss) : 0.0;
        for (uint64_t x = 0; x < n; x++)
            q[j * n + x] = (float)(v[x] * inv);
    }
    free(v);
    f32_view *fv = &c->v[c->n++];
    memset(fv, 0, sizeof *fv);
    fv->owned = q;
    fv->f32 = q;
    return q;
}

/* OFT (peft-merge.md §5.6): per block, the skew matrix Q from the stored upper triangle
 * (row-major), optionally projected (coft), then R by the Cayley-Neumann series of k1 terms or
 * exactly, R = (I - Q)(I + Q)^-1.  Returns [blocks, bs, bs] in f32 (computed in double). */
static const float *oft_rotations(view_cache *c, const lm_op *op, const float *q, lm_err *err)
{
    int boft = (op->k2 & 4) != 0; /* BOFT: full [bs, bs] blocks X, skew part (X - X^T)/2, exact */
    uint64_t bs = op->kd, nbl = boft ? op->a->shape[1] : op->a->shape[0], tri = op->a->shape[1], T = op->k1;
    int neumann = !boft && (op->k2 & 1) != 0, coft = !boft && (op->k2 & 2) != 0;
    double *Q = malloc((size_t)(bs * bs) * 4 * sizeof *Q);
    float *R = malloc((size_t)(nbl * bs * bs) * sizeof *R + 1);
    if (Q == NULL || R == NULL || lm_grow((void **)&c->v, &c->cap, c->n, sizeof *c->v, 64) != 0) {
        free(Q);
        free(R);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    double *P = Q + bs * bs, *S = P + bs * bs, *X = S + bs * bs; /* power, sum, scratch */
    for (uint64_t j = 0; j < nbl; j++) {
        memset(Q, 0, (size_t)(bs * bs) * sizeof *Q);
        uint64_t t = 0;
        for (uint64_t a = 0; a < bs && !boft; a++)
            for (uint64_t b = a + 1; b < bs; b++, t++) {
                Q[a * bs + b] = q[j * tri + t];
                Q[b * bs + a] = -q[j * tri + t];
            }
        for (uint64_t a = 0; a < bs && boft; a++)
            for (uint64_t b = 0; b < bs; b++)
                Q[a * bs + b] = 0.5 * ((double)q[(j * bs + a) * bs + b] - (double)q[(j * bs + b) * bs + a]);
        if (coft) {
            double fro = 0, lim = op->scale_f64 / sqrt((double)nbl);
            for (uint64_t i = 0; i < bs * bs; i++)
                fro += Q[i] * Q[i];
            fro = sqrt(fro);
            if (fro > lim)
                for (uint64_t i = 0; i < bs * bs; i++)
                    Q[i] *= lim / fro;
        }
        /* S = the rotation */
        memset(S, 0, (size_t)(bs * bs) * sizeof *S);
        for (uint64_t a = 0; a < bs; a++)
            S[a * bs + a] = 1.0;
        if (neumann) {
            /* T<=1: I; T=2: I+2Q; T=3: I+2Q+2Q^2+Q^3; T>=4: I + 2 sum_{k=1}^{T-2} Q^k + Q^(T-1) */
            uint64_t top = T <= 1 ? 0 : T == 2 ? 1 : T == 3 ? 3 : T - 1;
            memcpy(P, Q, (size_t)(bs * bs) * sizeof *P); /* P = Q^k */
            for (uint64_t k = 1; k <= top; k++) {
                double f = (T == 3 && k == 3) || (T >= 4 && k == T - 1) ? 1.0 : 2.0;
                for (uint64_t i = 0; i < bs * bs; i++)
                    S[i] += f * P[i];
                if (k < top) { /* P <- P @ Q */
                    for (uint64_t a = 0; a < bs; a++)
                        for (uint64_t b = 0; b < bs; b++) {
                            double v = 0;
                            for (uint64_t x = 0; x < bs; x++)
                                v += P[a * bs + x] * Q[x * bs + b];
                            X[a * bs + b] = v;
                        }
                    memcpy(P, X, (size_t)(bs * bs) * sizeof *P);
                }
            }
        } else {
            /* S = (I - Q) (I + Q)^-1: solve S (I + Q) = (I - Q), i.e. (I + Q)^T S^T = (I - Q)^T */
            for (uint64_t a = 0; a < bs; a++)
                for (uint64_t b = 0; b < bs; b++) {
                    P[a * bs + b] = (a == b) + Q[b * bs + a];  /* (I + Q)^T */
                    X[a * bs + b] = (a == b) - Q[b * bs + a];  /* (I - Q)^T, becomes S^T */
                }
            for (uint64_t col = 0; col < bs; col++) { /* Gauss-Jordan with partial pivoting */
                uint64_t piv = col;
                for (uint64_t r = col + 1; r < bs; r++)
                    if (fabs(P[r * bs + col]) > fabs(P[piv * bs + col]))
                        piv = r;
                for (uint64_t x = 0; x < bs && piv != col; x++) {
                    double t1 = P[col * bs + x], t2 = X[col * bs + x];
                    P[col * bs + x] = P[piv * bs + x];
                    X[col * bs + x] = X[piv * bs + x];
                    P[piv * bs + x] = t1;
                    X[piv * bs + x] = t2;
                }
                double d = P[col * bs + col];
                for (uint64_t x = 0; x < bs; x++) {
                    P[col * bs + x] /= d;
                    X[col * bs + x] /= d;
                }
                for (uint64_t r = 0; r < bs; r++) {
                    double f = P[r * bs + col];
                    if (r == col || f == 0)
                        continue;
                    for (uint64_t x = 0; x < bs; x++) {
                        P[r * bs + x] -= f * P[col * bs + x];
                        X[r * bs + x] -= f * X[col * bs + x];
                    }
                }
            }
            for (uint64_t a = 0; a < bs; a++)
                for (uint64_t b = 0; b < bs; b++)
                    S[a * bs + b] = X[b * bs + a];
        }
        for (uint64_t i = 0; i < bs * bs; i++)
            R[j * bs * bs + i] = (float)S[i];
    }
    free(Q);
    f32_view *v = &c->v[c->n++];
    memset(v, 0, sizeof *v);
    v->owned = R;
    v->f32 = R;
    return R;
}

static float *keep_owned(view_cache *c, size_t n_floats, lm_err *err);

/* RoAd: per output row p, c[p] (cos part) then s[p] (sin part), from theta and alpha by variant */
static const float *road_coefficients(view_cache *c, const lm_op *op, const float *th, const float *al, lm_err *err)
{
    uint64_t o = op->out, g = op->kd, h = g / 2;
    float *cs = keep_owned(c, (size_t)(2 * o), err);
    if (cs == NULL)
        return NULL;
    for (uint64_t p = 0; p < o; p++) {
        uint64_t G = p / g, x = p % g;
        double cv, sv;
        if (op->k2 == 1) { /* one angle per pair (x, x + h) */
            uint64_t t = G * h + (x % h);
            cv = (double)al[t] * cos((double)th[t]);
            sv = (double)al[t] * sin((double)th[t]);
        } else if (op->k2 == 2) {
            cv = (double)al[p] * cos((double)th[p]);
            sv = (double)al[p] * sin((double)th[p]);
        } else { /* [o/g, 2, g]: cos part, then sin part */
            cv = (double)al[G * 2 * g + x] * cos((double)th[G * 2 * g + x]);
            sv = (double)al[G * 2 * g + g + x] * sin((double)th[G * 2 * g + g + x]);
        }
        cs[p] = (float)cv;
        cs[o + p] = (float)sv;
    }
    return cs;
}

/* keeps an owned array with the views (freed with them) */
static float *keep_owned(view_cache *c, size_t n_floats, lm_err *err)
{
    float *p = calloc(n_floats ? n_floats : 1, sizeof *p);
    if (p == NULL || lm_grow((void **)&c->v, &c->cap, c->n, sizeof *c->v, 64) != 0) {
        free(p);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    f32_view *v = &c->v[c->n++];
    memset(v, 0, sizeof *v);
    v->owned = p;
    v->f32 = p;
    return p;
}

static int64_t read_index(const lm_ts_tensor *t, uint64_t i)
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

/* VB-LoRA: one mixed vector (length L) from logits z[N] (top-k, softmax) or stored top-k
 * indices and k-1 weights (the last weight completes them to 1) */
static lm_code vb_mix(const float *bank, uint64_t N, uint64_t L, uint64_t topk, const float *z,
                      const lm_ts_tensor *ix, const float *wk, uint64_t slot, float *out, lm_err *err)
{
    int64_t idx[64] = {0};
    double w[64];
    if (topk == 0 || topk > 64)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "VB-LoRA topk %llu is larger than 64",
                       (unsigned long long)topk);
    if (z != NULL) {
        for (uint64_t t = 0; t < topk; t++) { /* the t-th largest; ties: the lower index first */
            int64_t best = -1;
            for (uint64_t n = 0; n < N; n++) {
                int used = 0;
                for (uint64_t u = 0; u < t; u++)
                    used |= idx[u] == (int64_t)n;
                if (!used && (best < 0 || z[n] > z[best]))
                    best = (int64_t)n;
            }
            idx[t] = best;
        }
        double mx = z[idx[0]], sum = 0;
        for (uint64_t t = 0; t < topk; t++)
            sum += (w[t] = exp((double)z[idx[t]] - mx));
        for (uint64_t t = 0; t < topk; t++)
            w[t] /= sum;
    } else {
        double sum = 0;
        for (uint64_t t = 0; t < topk; t++) {
            idx[t] = read_index(ix, slot * topk + t);
            if (idx[t] < 0 || (uint64_t)idx[t] >= N)
                return lm_fail(err, LM_E_FORMAT, "IndexOutOfRange", "'%s' holds index %lld outside the bank (%llu)",
                               ix->name, (long long)idx[t], (unsigned long long)N);
            if (t + 1 < topk)
                sum += (w[t] = wk[slot * (topk - 1) + t]);
        }
        w[topk - 1] = 1.0 - sum;
    }
    for (uint64_t l = 0; l < L; l++) {
        double v = 0;
        for (uint64_t t = 0; t < topk; t++)
            v += w[t] * (double)bank[(uint64_t)idx[t] * L + l];
        out[l] = (float)v;
    }
    return LM_OK;
}

/* torch's CPU generator: MT19937 seeded as torch's manual_seed (peft-merge.md Appendix A) */
typedef struct {
    uint32_t mt[624];
    int i;
} mt19937;

static void mt_seed(mt19937 *g, uint64_t seed)
{
    g->mt[0] = (uint32_t)seed;
    for (int k = 1; k < 624; k++)
        g->mt[k] = 1812433253u * (g->mt[k - 1] ^ (g->mt[k - 1] >> 30)) + (uint32_t)k;
    g->i = 624;
}

static uint32_t mt_next(mt19937 *g)
{
    if (g->i >= 624) {
        for (int k = 0; k < 624; k++) {
            uint32_t y = (g->mt[k] & 0x80000000u) | (g->mt[(k + 1) % 624] & 0x7fffffffu);
            g->mt[k] = g->mt[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        g->i = 0;
    }
    uint32_t y = g->mt[g->i++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* a sparse permutation: position -> value for the positions that moved (open addressing) */
typedef struct {
    uint64_t *key, *val, cap;
} perm_map;

static uint64_t perm_slot(const perm_map *m, uint64_t k)
{
    uint64_t h = (k * 0x9E3779B97F4A7C15ull) & (m->cap - 1);
    while (m->key[h] != UINT64_MAX && m->key[h] != k)
        h = (h + 1) & (m->cap - 1);
    return h;
}

static uint64_t perm_get(const perm_map *m, uint64_t k)
{
    uint64_t h = perm_slot(m, k);
    return m->key[h] == k ? m->val[h] : k;
}

static void perm_set(perm_map *m, uint64_t k, uint64_t v)
{
    uint64_t h = perm_slot(m, k);
    m->key[h] = k;
    m->val[h] = v;
}

/* the first n entries of torch.randperm(N, generator=manual_seed(seed)) (N < 2^32 / 20):
 * Fisher-Yates from the front; only the moved positions are stored */
static int randperm_prefix(uint64_t N, uint64_t seed, uint64_t n, uint64_t *out)
{
    perm_map m;
    m.cap = 16;
    while (m.cap < 4 * n + 16)
        m.cap *= 2;
    m.key = malloc(m.cap * sizeof *m.key);
    m.val = malloc(m.cap * sizeof *m.val);
    if (m.key == NULL || m.val == NULL) {
        free(m.key);
        free(m.val);
        return -1;
    }
    for (uint64_t i = 0; i < m.cap; i++)
        m.key[i] = UINT64_MAX;
    mt19937 g;
    mt_seed(&g, seed);
    for (uint64_t t = 0; t < n; t++) {
        if (t + 1 < N) {
            uint64_t b = t + mt_next(&g) % (N - t);
            uint64_t va = perm_get(&m, t), vb = perm_get(&m, b);
            perm_set(&m, t, vb);
            perm_set(&m, b, va);
        }
        out[t] = perm_get(&m, t);
    }
    free(m.key);
    free(m.val);
    return 0;
}

/* builds A' [rank, in] and B' [out, rank] of a derived low-rank op (DeLoRA, GraLoRA, VB-LoRA) */
static lm_code derive_factors(view_cache *c, const lm_op *op, const lm_kernels *k, const float **fa,
                              const float **fb, lm_err *err)
{
    const float *x[4] = {NULL, NULL, NULL, NULL};
    int vb_topk_only = op->derive == LM_DERIVE_VBLORA && op->k2;
    for (int q = 0; q < 4; q++)
        if (op->x[q] != NULL && !(vb_topk_only && (q == 0 || q == 2)) &&
            (x[q] = view_get(c, op->x[q], k, err)) == NULL)
            return LM_E_NOMEM;
    uint64_t K = op->rank, in = op->in, out = op->out;
    float *A = keep_owned(c, (size_t)(K * in), err), *B = keep_owned(c, (size_t)(out * K), err);
    if (A == NULL || B == NULL)
        return LM_E_NOMEM;
    if (op->derive == LM_DERIVE_FOURIER) {
        /* Re(ifft2(S)) with S sparse: sum_t s_t cos(2 pi (a r_t / out + b c_t / in)) / (out in)
         * = B' A' with B'[a, 2t] = cos(2 pi a r_t/out), B'[a, 2t+1] = -sin(...) and
         * A'[2t, b] = s_t cos(2 pi b c_t/in) / (out in), A'[2t+1, b] = s_t sin(...) / (out in) */
        uint64_t n = op->x[0]->n_elems;
        uint64_t *perm = malloc((n ? n : 1) * sizeof *perm);
        if (perm == NULL || randperm_prefix(out * in, op->k1, n, perm) != 0) {
            free(perm);
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
        const double two_pi = 6.283185307179586476925286766559, norm = 1.0 / ((double)out * (double)in);
        for (uint64_t t = 0; t < n; t++) {
            uint64_t rt = perm[t] / in, ct = perm[t] % in;
            double st = x[0][t];
            for (uint64_t a = 0; a < out; a++) {
                double ang = two_pi * (double)((a * rt) % out) / (double)out;
                B[a * K + 2 * t] = (float)cos(ang);
                B[a * K + 2 * t + 1] = (float)-sin(ang);
            }
            for (uint64_t b = 0; b < in; b++) {
                double ang = two_pi * (double)((b * ct) % in) / (double)in;
                A[(2 * t) * in + b] = (float)(st * cos(ang) * norm);
                A[(2 * t + 1) * in + b] = (float)(st * sin(ang) * norm);
            }
        }
        free(perm);
    } else if (op->derive == LM_DERIVE_DELORA) {
        /* B diag(lambda / r / (max(|A_j|, 1e-4) max(|B_.j|, 1e-4))) A, columns times w_norm */
        double lambda = x[2][0];
        for (uint64_t j = 0; j < K; j++) {
            double na = 0, nb = 0;
            for (uint64_t i = 0; i < in; i++)
                na += (double)x[0][j * in + i] * (double)x[0][j * in + i];
            for (uint64_t o = 0; o < out; o++)
                nb += (double)x[1][o * K + j] * (double)x[1][o * K + j];
            double d = lambda / (double)K / (fmax(sqrt(na), 1e-4) * fmax(sqrt(nb), 1e-4));
            for (uint64_t i = 0; i < in; i++)
                A[j * in + i] = (float)((double)x[0][j * in + i] * d * (double)x[3][i]);
        }
        memcpy(B, x[1], (size_t)(out * K) * sizeof *B);
    } else if (op->derive == LM_DERIVE_GRALORA) {
        /* block (j, n): sum_t A3[n, x, j*s + t] * B3[j, n*s + t, y]; inner index j*R + n*s + t */
        uint64_t kk = op->k1, R = op->k2, sg = R / kk, ik = in / kk, ok = out / kk, h = K - kk * R;
        for (uint64_t j = 0; j < kk; j++)
            for (uint64_t n = 0; n < kk; n++)
                for (uint64_t t = 0; t < sg; t++) {
                    uint64_t p = j * R + n * sg + t;
                    for (uint64_t y = 0; y < ok; y++)
                        B[(j * ok + y) * K + p] = x[1][(j * R + n * sg + t) * ok + y];
                    for (uint64_t xx = 0; xx < ik; xx++)
                        A[p * in + n * ik + xx] = x[0][(n * ik + xx) * R + j * sg + t];
                }
        for (uint64_t q = 0; q < h; q++) { /* the hybrid (ordinary low-rank) part */
            for (uint64_t o = 0; o < out; o++)
                B[o * K + kk * R + q] = x[3][o * h + q];
            for (uint64_t i = 0; i < in; i++)
                A[(kk * R + q) * in + i] = x[2][q * in + i];
        }
    } else if (op->derive == LM_DERIVE_RANDLORA) {
        /* A_flat [r*nb, m]: row k*nb + b = lambda[k, b] * A_all[k, 0, :m] * gamma[b, :];
         * B_flat [M, nb*r]: column b*r + k = B_all[:M, b, k]; delta = B_flat @ A_flat is [M, m],
         * transposed when the layer's out is the smaller side */
        uint64_t r = op->x[0]->shape[0], nb = op->x[0]->shape[1], M = op->k1, mn = op->k2;
        uint64_t dmin = op->x[2]->shape[2], NB = op->x[3]->shape[1];
        int flip = !(out == M && in == mn);
        for (uint64_t kk = 0; kk < r; kk++)
            for (uint64_t b = 0; b < nb; b++)
                for (uint64_t j = 0; j < mn; j++) {
                    uint64_t p = kk * nb + b;
                    float v = x[0][kk * nb + b] * x[2][kk * dmin + j] * x[1][b * mn + j];
                    if (!flip)
                        A[p * in + j] = v;
                    else
                        B[j * K + p] = v;
                }
        for (uint64_t row = 0; row < M; row++)
            for (uint64_t b = 0; b < nb; b++)
                for (uint64_t kk = 0; kk < r; kk++) {
                    uint64_t p = b * r + kk;
                    float v = x[3][(row * NB + b) * r + kk];
                    if (!flip)
                        B[row * K + p] = v;
                    else
                        A[p * in + row] = v;
                }
    } else {
        const float *bank = view_get(c, op->b, k, err);
        if (bank == NULL)
            return LM_E_NOMEM;
        uint64_t N = op->b->shape[0], L = op->b->shape[1], topk = op->k1, ci = in / L, co = out / L;
        float v[4096];
        if (L > 4096)
            return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "VB-LoRA vector_length %llu is too large",
                           (unsigned long long)L);
        for (uint64_t a = 0; a < K; a++) /* A [r, in]: row a, chunk q */
            for (uint64_t q = 0; q < ci; q++) {
                uint64_t slot = a * ci + q;
                lm_code rc = vb_mix(bank, N, L, topk, vb_topk_only ? NULL : x[0] + slot * N, op->x[0], x[1], slot, v, err);
                if (rc != LM_OK)
                    return rc;
                memcpy(A + a * in + q * L, v, (size_t)L * sizeof *v);
            }
        for (uint64_t q = 0; q < co; q++) /* B: logits [out/L, r, N] -> [out, r] */
            for (uint64_t a = 0; a < K; a++) {
                uint64_t slot = q * K + a;
                lm_code rc = vb_mix(bank, N, L, topk, vb_topk_only ? NULL : x[2] + slot * N, op->x[2], x[3], slot, v, err);
                if (rc != LM_OK)
                    return rc;
                for (uint64_t l = 0; l < L; l++)
                    B[(q * L + l) * K + a] = v[l];
            }
    }
    *fa = A;
    *fb = B;
    return LM_OK;
}

static void view_cache_free(view_cache *c)
{
    for (size_t i = 0; i < c->n; i++)
        free(c->v[i].owned);
    free(c->v);
}

/* ------------------------------------------------------------------------------------------ */
/* tasks                                                                                        */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    size_t tensor;   /* plan index */
    uint64_t first;  /* copy: byte offset in the tensor; compute: first row */
    uint64_t count;  /* copy: bytes; compute: rows */
    int copy;
} task;

typedef struct {
    const lm_plan *plan;
    const lm_model *model;
    lm_st_writer **w;        /* one writer per output shard */
    size_t n_shards;
    const size_t *shard_of;  /* plan tensor -> shard */
    size_t *local;           /* plan tensor -> its index inside its shard */
    const lm_kernels *k;
    const float **fa, **fb, **fc, **fd; /* per tensor, per op: f32 views (flattened [tensor][op]) */
    size_t *op_base;        /* index of tensor i's first op in fa/fb */
    double **col_scale;     /* per tensor: column DoRA factors (pass 1), or NULL */
    size_t *col_dora_op;    /* per tensor: index of the column DoRA op */
    uint64_t tile_elems;    /* f32 elements per tile (0: default) */
} job;

/* Drops the pages of [p, p + n) from this process's mapping once processed, so that resident
 * memory stays bounded by the tiles in flight, not the model (the data stays in the page cache). */
static void release_pages(const void *p, uint64_t n)
{
    static long page;
    if (page == 0)
        page = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)(page - 1), e = (uintptr_t)p + (uintptr_t)n;
    if (n > 0)
        madvise((void *)a, (size_t)(e - a), MADV_DONTNEED);
}

/* the base file a tensor's bytes come from (NULL when they come from an adapter) */
static const lm_st_file *tensor_src_file(const job *J, size_t ti)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    if (t->base == NULL || (t->n_ops > 0 && t->ops[0].kind == LM_OP_REPLACE))
        return NULL;
    return lm_model_file(J->model, t->base->file);
}

/* rows per tile for plan tensor t: never more than the tensor has; whole RoAd groups (their
 * rotations mix rows p and p + g/2) */
static uint64_t tile_rows_for(const lm_plan_tensor *t, uint64_t tile_elems)
{
    uint64_t tr = lm_exec_tile_rows(t->cols, tile_elems);
    if (tr > t->rows && t->rows > 0)
        tr = t->rows;
    for (size_t o = 0; o < t->n_ops; o++)
        if (t->ops[o].kind == LM_OP_ROAD) {
            uint64_t g = t->ops[o].kd;
            tr = tr < g ? g : tr - tr % g;
        }
    return tr;
}

static const uint8_t *tensor_src_bytes(const job *J, size_t ti)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    if (t->n_ops > 0 && t->ops[0].kind == LM_OP_REPLACE)
        return t->ops[0].a->data;
    const lm_st_file *f = lm_model_file(J->model, t->base->file);
    return lm_st_data(f) + t->base->info->begin;
}

/* Applies ops [from, to) of tensor ti to the f32 tile acc (rows r0 .. r0+nr). */
/* scratch: room for 2 * nr * cols floats (the tile's raw read buffer, free once converted) */
static void apply_ops(const job *J, size_t ti, size_t from, size_t to, float *acc, float *scratch, uint64_t r0,
                      uint64_t nr)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    const uint64_t cols = t->cols;
    for (size_t o = from; o < to; o++) {
        const lm_op *op = &t->ops[o];
        const float *A = J->fa[J->op_base[ti] + o], *B = J->fb[J->op_base[ti] + o];
        switch (op->kind) {
        case LM_OP_REPLACE:
            break; /* the tile was loaded from the replacement */
        case LM_OP_LOWRANK:
            if (!op->transposed)
                lm_gemm_tile_nn(acc, nr, cols, B + r0 * op->rank, A, op->rank, op->scale);
            else
                lm_gemm_tile_tt(acc, nr, cols, A + r0, op->in, B, op->rank, op->scale);
            break;
        case LM_OP_BIAS_ADD:
            /* a bias [o] is viewed [o, 1]: the tile holds elements r0 .. r0+nr */
            J->k->axpy(acc, op->scale, A + r0 * cols, (size_t)(nr * cols));
            break;
        case LM_OP_HADAMARD: {
            /* (w1a@w1b) * (w2a@w2b) for these rows, then scaled and added */
            const float *C = J->fc[J->op_base[ti] + o], *D = J->fd[J->op_base[ti] + o];
            float *t1 = scratch, *t2 = scratch + nr * cols;
            size_t n = (size_t)(nr * cols), r = (size_t)op->rank;
            memset(scratch, 0, 2 * n * sizeof *scratch);
            lm_gemm_tile_nn(t1, (size_t)nr, (size_t)cols, A + r0 * r, B, r, 1.0f);
            lm_gemm_tile_nn(t2, (size_t)nr, (size_t)cols, C + r0 * r, D, r, 1.0f);
            for (size_t i = 0; i < n; i++)
                acc[i] += t1[i] * t2[i] * op->scale;
            break;
        }
        case LM_OP_KRON: {
            /* W[p*kb + q, u*kd + v] += w1[p, u] * w2[q, v] * scale */
            const float *w2 = J->fc[J->op_base[ti] + o];
            uint64_t w1_cols = cols / op->kd;
            for (uint64_t r = 0; r < nr; r++) {
                uint64_t R = r0 + r, p = R / op->kb, q = R % op->kb;
                float *row = acc + r * cols;
                for (uint64_t u = 0; u < w1_cols; u++) {
                    const float a = A[p * w1_cols + u];
                    const float *w2row = w2 + q * op->kd;
                    for (uint64_t v = 0; v < op->kd; v++)
                        row[u * op->kd + v] += a * w2row[v] * op->scale;
                }
            }
            break;
        }
        case LM_OP_HIRA: {
            /* W += scale * W * (B@A): the product for these rows, then elementwise */
            float *t1 = scratch;
            size_t n = (size_t)(nr * cols);
            memset(t1, 0, n * sizeof *t1);
            if (!op->transposed)
                lm_gemm_tile_nn(t1, (size_t)nr, (size_t)cols, B + r0 * op->rank, A, (size_t)op->rank, 1.0f);
            else
                lm_gemm_tile_tt(t1, (size_t)nr, (size_t)cols, A + r0, (size_t)op->in, B, (size_t)op->rank, 1.0f);
            for (size_t i = 0; i < n; i++)
                acc[i] += acc[i] * t1[i] * op->scale;
            break;
        }
        case LM_OP_SPARSE:
            for (size_t q = 0; q < op->n_rows; q++) {
                uint64_t row = (uint64_t)op->rows[q];
                if (row >= r0 && row < r0 + nr)
                    acc[(row - r0) * cols + (uint64_t)op->rows[op->n_rows + q]] += A[q] * op->scale;
            }
            break;
        case LM_OP_HRA:
            /* each row x <- x @ H: reflections in order, or x - 2 (x Q) Q^T after Gram-Schmidt */
            for (uint64_t r = 0; r < nr; r++) {
                float *x = acc + r * cols;
                if (!op->dora_axis) {
                    for (uint64_t j = 0; j < op->rank; j++) {
                        const float *u = A + j * cols;
                        double d = 0;
                        for (uint64_t c = 0; c < cols; c++)
                            d += (double)x[c] * (double)u[c];
                        for (uint64_t c = 0; c < cols; c++)
                            x[c] = (float)((double)x[c] - 2.0 * d * (double)u[c]);
                    }
                } else {
                    double *dq = (double *)scratch; /* rank values */
                    for (uint64_t j = 0; j < op->rank; j++) {
                        double d = 0;
                        for (uint64_t c = 0; c < cols; c++)
                            d += (double)x[c] * (double)A[j * cols + c];
                        dq[j] = d;
                    }
                    for (uint64_t c = 0; c < cols; c++) {
                        double y = x[c];
                        for (uint64_t j = 0; j < op->rank; j++)
                            y -= 2.0 * dq[j] * (double)A[j * cols + c];
                        x[c] = (float)y;
                    }
                }
            }
            break;
        case LM_OP_OFT: {
            /* each row: block j <- R_j @ block j (W @ blockdiag(R)^T) */
            uint64_t bs = op->kd, nbl = (op->k2 & 4) ? op->a->shape[1] : op->a->shape[0];
            for (uint64_t r = 0; r < nr; r++) {
                float *x = acc + r * cols;
                for (uint64_t j = 0; j < cols / bs; j++) {
                    const float *Rj = A + (nbl == 1 ? 0 : j) * bs * bs;
                    float *blk = x + j * bs;
                    for (uint64_t a = 0; a < bs; a++) {
                        double v = 0;
                        for (uint64_t b = 0; b < bs; b++)
                            v += (double)Rj[a * bs + b] * (double)blk[b];
                        scratch[a] = (float)v;
                    }
                    memcpy(blk, scratch, (size_t)bs * sizeof *blk);
                }
                if (op->k2 & 4) /* BOFT: then each output row scaled by s */
                    for (uint64_t c = 0; c < cols; c++)
                        x[c] *= B[r0 + r];
            }
            break;
        }
        case LM_OP_ROAD: {
            /* rows p, q = p + g/2 of each group: p <- c_p W_p - s_p W_q, q <- s_q W_p + c_q W_q */
            uint64_t g = op->kd, h = g / 2, n_out = op->out;
            for (uint64_t G = 0; G < nr / g; G++)
                for (uint64_t x = 0; x < h; x++) {
                    uint64_t p = G * g + x, q = p + h, P0 = r0 + p, Q0 = r0 + q;
                    float *wp = acc + p * cols, *wq = acc + q * cols;
                    double cp = A[P0], sp = A[n_out + P0], cq = A[Q0], sq = A[n_out + Q0];
                    for (uint64_t c = 0; c < cols; c++) {
                        double a = wp[c], b = wq[c];
                        wp[c] = (float)(cp * a - sp * b);
                        wq[c] = (float)(sq * a + cq * b);
                    }
                }
            break;
        }
        case LM_OP_C3A: {
            /* block-circulant: row p b + u, column q b + v gets kernel[p, q, (v - u) mod b] / in */
            uint64_t b = op->kd, nq = cols / b;
            double inv = 1.0 / (double)op->in;
            for (uint64_t r = 0; r < nr; r++) {
                uint64_t R = r0 + r, p = R / b, u = R % b;
                float *row = acc + r * cols;
                for (uint64_t q = 0; q < nq; q++) {
                    const float *kv = A + (p * nq + q) * b;
                    for (uint64_t v = 0; v < b; v++)
                        row[q * b + v] += (float)((double)kv[(v + b - u) % b] * inv) * op->scale;
                }
            }
            break;
        }
        case LM_OP_MISS:
            for (uint64_t r = 0; r < nr; r++) {
                float *row = acc + r * cols;
                uint64_t oi = (r0 + r) % op->kd;
                for (uint64_t c = 0; c < cols; c++)
                    row[c] += A[(c % op->rank) * op->kd + oi] * op->scale;
            }
            break;
        case LM_OP_SCALE:
            for (uint64_t r = 0; r < nr; r++) {
                float *row = acc + r * cols;
                if (op->dora_axis == 0) {
                    const float f = A[r0 + r];
                    for (uint64_t c = 0; c < cols; c++)
                        row[c] *= f;
                } else {
                    for (uint64_t c = 0; c < cols; c++)
                        row[c] *= A[c];
                }
            }
            break;
        case LM_OP_ROWS:
            for (size_t q = 0; q < op->n_rows; q++) {
                uint64_t row = (uint64_t)op->rows[q];
                if (row >= r0 && row < r0 + nr)
                    memcpy(acc + (row - r0) * cols, A + q * cols, cols * sizeof(float));
            }
            break;
        case LM_OP_DORA:
            if (op->dora_axis == 0) {
                for (uint64_t r = 0; r < nr; r++) {
                    float *row = acc + r * cols;
                    double ss = 0;
                    for (uint64_t c = 0; c < cols; c++)
                        ss += (double)row[c] * (double)row[c];
                    float f = (float)((double)A[r0 + r] / sqrt(ss));
                    for (uint64_t c = 0; c < cols; c++)
                        row[c] *= f;
                }
            } else {
                const double *cs = J->col_scale[ti];
                for (uint64_t r = 0; r < nr; r++) {
                    float *row = acc + r * cols;
                    for (uint64_t c = 0; c < cols; c++)
                        row[c] = (float)((double)row[c] * cs[c]);
                }
            }
            break;
        }
    }
}

/* Loads rows [r0, r0+nr) of tensor ti as f32.  Base bytes are read with pread into `raw`
 * rather than through the mapping: the mapping would leave pages resident (the kernel maps
 * neighbouring pages on every fault), and resident memory must stay bounded by the tiles in
 * flight, not the model. */
static lm_code load_tile(const job *J, size_t ti, float *acc, uint8_t *raw, uint64_t r0, uint64_t nr, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    size_t esz = lm_dtype_bits(t->src_dtype) / 8;
    uint64_t n_bytes = nr * t->cols * esz, rel = r0 * t->cols * esz;
    const lm_st_file *f = tensor_src_file(J, ti);
    const uint8_t *src;
    if (f != NULL && lm_st_fd(f) >= 0 && raw != NULL) {
        uint64_t off = lm_st_data_offset(f) + t->base->info->begin + rel, got = 0;
        while (got < n_bytes) {
            ssize_t k = pread(lm_st_fd(f), raw + got, (size_t)(n_bytes - got), (off_t)(off + got));
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0) {
                int e = k < 0 ? errno : EIO;
                lm_fail_errno(err, e, "cannot read tensor '%s'", t->name);
                lm_err_set_path(err, lm_st_path(f));
                return LM_E_IO;
            }
            got += (uint64_t)k;
        }
        src = raw;
    } else {
        src = tensor_src_bytes(J, ti) + rel;
    }
    to_f32(J->k, t->src_dtype, src, acc, (size_t)(nr * t->cols));
    return LM_OK;
}

static lm_code run_task(const job *J, const task *tk, float *acc, uint8_t *out, uint8_t *raw, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[tk->tensor];
    lm_st_writer *w = J->w[J->shard_of ? J->shard_of[tk->tensor] : 0];
    uint64_t dst = lm_st_writer_tensor_offset(w, J->local[tk->tensor]);
    if (tk->copy) {
        const uint8_t *src = tensor_src_bytes(J, tk->tensor);
        const lm_st_file *f = tensor_src_file(J, tk->tensor);
        if (f != NULL && lm_st_fd(f) >= 0) {
            /* in-kernel copy: the bytes never pass through (or stay in) this process */
            loff_t in = (loff_t)(lm_st_data_offset(f) + t->base->info->begin + tk->first);
            loff_t outp = (loff_t)(dst + tk->first);
            uint64_t left = tk->count;
            while (left > 0) {
                ssize_t k = copy_file_range(lm_st_fd(f), &in, lm_st_writer_fd(w), &outp, (size_t)left, 0);
                if (k <= 0) {
                    if (k < 0 && errno == EINTR)
                        continue;
                    if (k < 0 && (errno == ENOSPC || errno == EFBIG || errno == EIO || errno == EDQUOT))
                        return lm_st_writer_pwrite(w, src + (tk->count - left) + tk->first, (size_t)left,
                                                   dst + tk->first + (tk->count - left), err);
                    break; /* not supported here (EXDEV, EINVAL, ...): plain writes below */
                }
                left -= (uint64_t)k;
            }
            if (left == 0)
                return LM_OK;
            uint64_t done = tk->count - left;
            lm_code rc = lm_st_writer_pwrite(w, src + tk->first + done, (size_t)left, dst + tk->first + done, err);
            release_pages(src + tk->first + done, left);
            return rc;
        }
        return lm_st_writer_pwrite(w, src + tk->first, (size_t)tk->count, dst + tk->first, err);
    }
    uint64_t r0 = tk->first, nr = tk->count, n = nr * t->cols;
    if (load_tile(J, tk->tensor, acc, raw, r0, nr, err) != LM_OK)
        return LM_E_IO;
    apply_ops(J, tk->tensor, 0, t->n_ops, acc, (float *)raw, r0, nr);
    from_f32(J->k, t->dtype, acc, out, (size_t)n);
    size_t esz = lm_dtype_bits(t->dtype) / 8;
    return lm_st_writer_pwrite(w, out, (size_t)(n * esz), dst + r0 * t->cols * esz, err);
}

/* Column DoRA (Conv1D, Embedding): the norm of every column of W + dW needs all rows first.
 * Partial sums per tile, reduced in tile order: the same sums for every thread count. */
static lm_code column_dora_pass(job *J, size_t ti, int n_threads, lm_err *err)
{
    const lm_plan_tensor *t = &J->plan->t[ti];
    size_t d = J->col_dora_op[ti];
    uint64_t tr = tile_rows_for(t, J->tile_elems), n_tiles = (t->rows + tr - 1) / tr;
    double *part = calloc((size_t)(n_tiles * t->cols) + 1, sizeof *part);
    double *scale = calloc((size_t)t->cols + 1, sizeof *scale);
    if (part == NULL || scale == NULL) {
        free(part);
        free(scale);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the DoRA column norms of '%s'", t->name);
    }
    int oom = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *acc = malloc((size_t)(tr * t->cols) * sizeof *acc + 1);
        uint8_t *raw = malloc((size_t)(tr * t->cols) * sizeof(double) + 1);
        lm_err lerr;
        lm_err_clear(&lerr);
        if (acc == NULL || raw == NULL) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (uint64_t k = 0; k < n_tiles; k++) {
            if (acc == NULL || raw == NULL)
                continue;
            uint64_t r0 = k * tr, nr = r0 + tr <= t->rows ? tr : t->rows - r0;
            if (load_tile(J, ti, acc, raw, r0, nr, &lerr) != LM_OK) {
#pragma omp atomic write
                oom = 2;
                continue;
            }
            apply_ops(J, ti, 0, d, acc, (float *)raw, r0, nr);
            double *p = part + k * t->cols;
            for (uint64_t r = 0; r < nr; r++)
                for (uint64_t c = 0; c < t->cols; c++)
                    p[c] += (double)acc[r * t->cols + c] * (double)acc[r * t->cols + c];
        }
        free(acc);
        free(raw);
    }
    if (oom) {
        free(part);
        free(scale);
        return oom == 2 ? lm_fail(err, LM_E_IO, NULL, "cannot read '%s'", t->name)
                        : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    const float *m = J->fa[J->op_base[ti] + d];
    for (uint64_t c = 0; c < t->cols; c++) {
        double ss = 0;
        for (uint64_t k = 0; k < n_tiles; k++)
            ss += part[k * t->cols + c];
        scale[c] = (double)m[c] / sqrt(ss);
    }
    free(part);
    J->col_scale[ti] = scale;
    return LM_OK;
}

lm_code lm_exec_run(const lm_plan *plan, const lm_model *model, lm_adapter *const *adapters,
                    const char *out_path, const lm_exec_opts *opts, lm_exec_stats *stats,
                    lm_err *err)
{
    (void)adapters;
    lm_code rc = LM_OK;
    lm_kernels kern;
    const lm_kernels *k = opts && opts->kernels ? opts->kernels : NULL;
    if (k == NULL) {
        lm_kernels_select(&kern, NULL);
        k = &kern;
    }
#ifdef _OPENMP
    int n_threads = opts && opts->n_threads > 0 ? opts->n_threads : omp_get_num_procs();
#else
    int n_threads = 1; /* built without OpenMP (the fuzz builds): one worker */
#endif
    lm_blas_single_thread();
    lm_exec_stats st;
    memset(&st, 0, sizeof st);
    st.n_threads = n_threads;

    lm_out_tensor *outs = calloc(plan->n ? plan->n : 1, sizeof *outs);
    job J;
    memset(&J, 0, sizeof J);
    J.plan = plan;
    J.model = model;
    J.k = k;
    J.tile_elems = opts ? opts->tile_elems : 0;
    view_cache vc = {0};
    task *tasks = NULL;
    size_t n_tasks = 0, cap_tasks = 0, total_ops = 0;
    if (outs == NULL)
        goto nomem;
    for (size_t i = 0; i < plan->n; i++) {
        outs[i].name = plan->t[i].name;
        outs[i].dtype = plan->t[i].dtype;
        outs[i].n_dims = plan->t[i].n_dims;
        outs[i].shape = plan->t[i].shape;
        total_ops += plan->t[i].n_ops;
    }
    J.op_base = calloc(plan->n + 1, sizeof *J.op_base);
    J.fa = calloc(total_ops + 1, sizeof *J.fa);
    J.fb = calloc(total_ops + 1, sizeof *J.fb);
    J.fc = calloc(total_ops + 1, sizeof *J.fc);
    J.fd = calloc(total_ops + 1, sizeof *J.fd);
    J.col_scale = calloc(plan->n + 1, sizeof *J.col_scale);
    J.col_dora_op = calloc(plan->n + 1, sizeof *J.col_dora_op);
    if (J.op_base == NULL || J.fa == NULL || J.fb == NULL || J.fc == NULL || J.fd == NULL || J.col_scale == NULL ||
        J.col_dora_op == NULL)
        goto nomem;
    /* f32 views of every factor (borrowed when already aligned f32) */
    size_t pos = 0;
    for (size_t i = 0; i < plan->n; i++) {
        const lm_plan_tensor *t = &plan->t[i];
        J.op_base[i] = pos;
        size_t n_col_dora = 0;
        for (size_t o = 0; o < t->n_ops; o++, pos++) {
            const lm_op *op = &t->ops[o];
            if (op->kind == LM_OP_REPLACE)
                continue;
            if (op->derive != LM_DERIVE_NONE) { /* factors built from several stored tensors */
                if (derive_factors(&vc, op, k, &J.fa[pos], &J.fb[pos], err) != LM_OK)
                    goto fail;
                continue;
            }
            if ((J.fa[pos] = view_get(&vc, op->a, k, err)) == NULL)
                goto fail;
            if (op->b != NULL && (J.fb[pos] = view_get(&vc, op->b, k, err)) == NULL)
                goto fail;
            if (op->e != NULL && (J.fa[pos] = scaled_rows(&vc, op->a, J.fa[pos], op->e, k, err)) == NULL)
                goto fail;
            if (op->c != NULL && (J.fc[pos] = view_get(&vc, op->c, k, err)) == NULL)
                goto fail;
            if (op->d != NULL && (J.fd[pos] = view_get(&vc, op->d, k, err)) == NULL)
                goto fail;
            if (op->kind == LM_OP_LOWRANK && op->c != NULL &&
                vera_factors(&vc, op, &J.fa[pos], &J.fb[pos], J.fc[pos], J.fd[pos], err) != LM_OK)
                goto fail;
            if (op->kind == LM_OP_HRA && (J.fa[pos] = hra_vectors(&vc, op, J.fa[pos], err)) == NULL)
                goto fail;
            if (op->kind == LM_OP_OFT && (J.fa[pos] = oft_rotations(&vc, op, J.fa[pos], err)) == NULL)
                goto fail;
            if (op->kind == LM_OP_ROAD && (J.fa[pos] = road_coefficients(&vc, op, J.fa[pos], J.fb[pos], err)) == NULL)
                goto fail;
            if (op->kind == LM_OP_KRON) { /* whole w1 and w2 (small): products of their halves */
                if (op->b != NULL &&
                    (J.fa[pos] = matmul_owned(&vc, J.fa[pos], J.fb[pos], op->a->shape[0], op->a->shape[1],
                                              op->b->shape[1], err)) == NULL)
                    goto fail;
                if (op->d != NULL &&
                    (J.fc[pos] = matmul_owned(&vc, J.fc[pos], J.fd[pos], op->c->shape[0], op->c->shape[1],
                                              op->d->shape[1], err)) == NULL)
                    goto fail;
            }
            if (op->kind == LM_OP_DORA && op->dora_axis == 1) {
                J.col_dora_op[i] = o;
                n_col_dora++;
            }
        }
        if (n_col_dora > 1) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "several DoRA adapters on one Conv1D/Embedding tensor");
            lm_err_set_tensor(err, t->name);
            goto fail;
        }
    }
    /* tasks in data order */
    for (size_t q = 0; q < plan->n; q++) {
        size_t i = plan->data_order[q];
        const lm_plan_tensor *t = &plan->t[i];
        int copy = t->n_ops == 0 && t->dtype == t->src_dtype;
        if (t->n_ops == 1 && t->ops[0].kind == LM_OP_REPLACE && t->dtype == t->src_dtype)
            copy = 1;
        if (!copy && (!is_float_dtype(t->dtype) || !is_float_dtype(t->src_dtype))) {
            rc = lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", "cannot convert %s to %s",
                         lm_dtype_name(t->src_dtype), lm_dtype_name(t->dtype));
            lm_err_set_tensor(err, t->name);
            goto fail;
        }
        uint64_t bytes = t->base ? t->base->info->end - t->base->info->begin : t->ops[0].a->n_bytes;
        uint64_t unit = copy ? COPY_CHUNK : tile_rows_for(t, J.tile_elems);
        /* a tensor with no elements (a zero in its shape; other dimensions may be huge) has no
         * work; an output dtype of another width changes nothing to that */
        uint64_t total = bytes == 0 ? 0 : copy ? bytes : t->rows;
        if (copy) {
            st.n_copied_tensors++;
            st.bytes_copied += bytes;
        } else {
            st.n_computed_tensors++;
        }
        for (uint64_t first = 0; first < total; first += unit) {
            if (lm_grow((void **)&tasks, &cap_tasks, n_tasks, sizeof *tasks, 1024) != 0)
                goto nomem;
            task *tk = &tasks[n_tasks++];
            tk->tensor = i;
            tk->first = first;
            tk->count = first + unit <= total ? unit : total - first;
            tk->copy = copy;
            if (!copy)
                st.n_tiles++;
        }
    }
    /* every check is done: now the output files exist (as temporary files) */
    J.n_shards = opts && opts->n_shards > 1 ? opts->n_shards : 1;
    J.shard_of = opts && opts->n_shards > 1 ? opts->shard_of : NULL;
    J.w = calloc(J.n_shards, sizeof *J.w);
    J.local = calloc(plan->n + 1, sizeof *J.local);
    lm_out_tensor *souts = calloc(plan->n + 1, sizeof *souts);
    size_t *sorder = calloc(plan->n + 1, sizeof *sorder);
    if (J.w == NULL || J.local == NULL || souts == NULL || sorder == NULL) {
        free(souts);
        free(sorder);
        goto nomem;
    }
    for (size_t sh = 0; sh < J.n_shards; sh++) {
        size_t n_in = 0, n_ord = 0;
        for (size_t i = 0; i < plan->n; i++) /* header order */
            if ((J.shard_of ? J.shard_of[i] : 0) == sh) {
                J.local[i] = n_in;
                souts[n_in++] = outs[i];
            }
        for (size_t q = 0; q < plan->n; q++) { /* data order */
            size_t i = plan->data_order[q];
            if ((J.shard_of ? J.shard_of[i] : 0) == sh)
                sorder[n_ord++] = J.local[i];
        }
        const char *path = J.n_shards > 1 ? opts->shard_paths[sh] : out_path;
        J.w[sh] = lm_st_writer_open(path, souts, n_in, sorder, plan->meta_keys, plan->meta_values, plan->n_meta, err);
        if (J.w[sh] == NULL) {
            free(souts);
            free(sorder);
            rc = err ? err->code : LM_E_IO;
            goto fail;
        }
        st.bytes_written += lm_st_writer_file_bytes(J.w[sh]);
    }
    free(souts);
    free(sorder);
    for (size_t i = 0; i < plan->n; i++) {
        const lm_plan_tensor *t = &plan->t[i];
        int has_col = 0;
        for (size_t o = 0; o < t->n_ops; o++)
            has_col |= t->ops[o].kind == LM_OP_DORA && t->ops[o].dora_axis == 1;
        if (has_col && (rc = column_dora_pass(&J, i, n_threads, err)) != LM_OK)
            goto fail;
    }
    size_t max_elems = 1;
    for (size_t i = 0; i < plan->n; i++) {
        uint64_t e = tile_rows_for(&plan->t[i], J.tile_elems) * plan->t[i].cols;
        if (e > max_elems)
            max_elems = (size_t)e;
    }
    int failed = 0;
    uint64_t done_bytes = 0;
    lm_err shared_err;
    lm_err_clear(&shared_err);
#pragma omp parallel num_threads(n_threads)
    {
        float *acc = malloc(max_elems * sizeof(float));
        uint8_t *out = malloc(max_elems * sizeof(double));
        uint8_t *raw = malloc(max_elems * sizeof(double));
        lm_err local;
        lm_err_clear(&local);
        if (acc == NULL || out == NULL || raw == NULL)
            lm_fail(&local, LM_E_NOMEM, NULL, "out of memory for the tile workspace");
#pragma omp for schedule(dynamic, 1)
        for (size_t q = 0; q < n_tasks; q++) {
            int stop;
#pragma omp atomic read
            stop = failed;
            if (stop || local.code != LM_OK)
                continue;
            if (run_task(&J, &tasks[q], acc, out, raw, &local) != LM_OK)
                continue;
            if (opts && opts->progress) {
                const lm_plan_tensor *t = &plan->t[tasks[q].tensor];
                uint64_t b = tasks[q].copy ? tasks[q].count : tasks[q].count * t->cols * (lm_dtype_bits(t->dtype) / 8);
#pragma omp critical(lm_progress)
                {
                    done_bytes += b;
                    opts->progress(opts->progress_ctx, done_bytes, st.bytes_written);
                }
            }
        }
        if (local.code != LM_OK) {
#pragma omp critical(lm_error)
            {
                if (!failed)
                    shared_err = local;
                failed = 1;
            }
        }
        free(acc);
        free(out);
        free(raw);
    }
    if (failed) {
        if (err != NULL && err->code == LM_OK)
            *err = shared_err;
        rc = shared_err.code;
        goto fail;
    }
    st.bytes_computed = st.bytes_written - st.bytes_copied;
    /* every shard complete and closed before any is renamed into place */
    for (size_t sh = 0; sh < J.n_shards; sh++)
        if ((rc = lm_st_writer_finish(J.w[sh], opts ? opts->do_fsync : 0, err)) != LM_OK)
            goto fail;
    for (size_t sh = 0; sh < J.n_shards; sh++) {
        rc = lm_st_writer_commit(J.w[sh], opts ? opts->do_fsync : 0, err);
        J.w[sh] = NULL;
        if (rc != LM_OK)
            goto fail;
    }
    if (stats)
        *stats = st;
    goto done;
nomem:
    rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
fail:
    if (J.w)
        for (size_t sh = 0; sh < J.n_shards; sh++)
            lm_st_writer_abort(J.w[sh]);
done:
    free(J.w);
    free(J.local);
    if (J.col_scale)
        for (size_t i = 0; i < plan->n; i++)
            free(J.col_scale[i]);
    free(J.col_scale);
    free(J.col_dora_op);
    free(J.op_base);
    free(J.fa);
    free(J.fb);
    free(J.fc);
    free(J.fd);
    free(tasks);
    free(outs);
    view_cache_free(&vc);
    return rc;
}
