/* SPDX-License-Identifier: MIT */
/* exec_lowrank.c : see exec_lowrank.h. */
#include "exec_lowrank.h"

#include "exec_exact.h"
#include "st_reader.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* rows lo .. lo+n of the tensor and the terms of the ops that cover them: built when a tile first
 * needs them, freed when its last row has been computed, so that a fused MoE stack holds the
 * f64 factors of the experts its tiles are at, not of all E */
typedef struct {
    uint64_t lo, n;
    uint64_t rows_left; /* rows not computed yet (atomic) */
    int state;          /* 0 not built, 1 built, 2 freed (atomic; built under the tensor's lock) */
    lm_lowrank lr;
    double *B, *A, *s; /* [n x K], [K x cols], [K] */
    void *ws;          /* the kernel's workspace */
} segment;

struct lm_lowrank_tensor {
    const lm_plan_tensor *t;
    const lm_prepared *prep; /* borrowed: the ops' prepared factors, alive while f is */
    pthread_mutex_t lock;
    segment *seg;
    size_t n_seg;
    unsigned flags; /* the kernel's flags: LM_LOWRANK_UNCERTIFIED prepares only what it reads */
};

static int kernel_dtype(lm_dtype dt)
{
    return dt == LM_DT_BF16 || dt == LM_DT_F16 || dt == LM_DT_F32;
}

lm_kdtype lm_kdtype_of(lm_dtype dt)
{
    return dt == LM_DT_BF16 ? LM_KDT_BF16 : dt == LM_DT_F16 ? LM_KDT_F16 : LM_KDT_F32;
}

/* rows of the view the op's delta covers: row0 .. row0 + op_rows */
static uint64_t op_rows(const lm_op *op)
{
    return op->axis ? op->in : op->out;
}

/* the op's factors as the tile sees them: its rows x rank (B side), rank x cols (A side) */
static int op_fits(const lm_op *op, const lm_plan_tensor *t)
{
    if (op->kind != LM_OP_LOWRANK || (op->axis ? op->out : op->in) != t->cols)
        return 0;
    return op_rows(op) <= t->rows && op->row0 <= t->rows - op_rows(op);
}

static int covers(const lm_op *op, uint64_t lo, uint64_t hi)
{
    return op->row0 <= lo && hi <= op->row0 + op_rows(op);
}

static int cmp_u64(const void *a, const void *b)
{
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* the row boundaries where the set of ops changes: 0 = b[0] < b[1] < ... < b[n] = rows.
 * @return n (segments), or 0 when out of memory; *b malloc'ed */
static size_t boundaries(const lm_plan_tensor *t, uint64_t **b)
{
    uint64_t *v = malloc((2 * t->n_ops + 2) * sizeof *v);
    if (v == NULL)
        return 0;
    size_t n = 0;
    v[n++] = 0;
    v[n++] = t->rows;
    for (size_t o = 0; o < t->n_ops; o++) {
        v[n++] = t->ops[o].row0;
        v[n++] = t->ops[o].row0 + op_rows(&t->ops[o]);
    }
    qsort(v, n, sizeof *v, cmp_u64);
    size_t u = 1;
    for (size_t i = 1; i < n; i++)
        if (v[i] != v[u - 1])
            v[u++] = v[i];
    *b = v;
    return u - 1;
}

int lm_lowrank_tensor_eligible(const lm_plan_tensor *t)
{
    if (t->base == NULL || t->n_ops == 0 || !kernel_dtype(t->src_dtype) || !kernel_dtype(t->dtype) ||
        t->rows == 0 || t->cols == 0)
        return 0;
    for (size_t o = 0; o < t->n_ops; o++)
        if (!op_fits(&t->ops[o], t))
            return 0;
    uint64_t *b = NULL;
    size_t n_seg = boundaries(t, &b);
    int ok = n_seg > 0;
    for (size_t g = 0; g < n_seg && ok; g++) { /* every row changed by some op, K terms at most */
        uint64_t K = 0;
        for (size_t o = 0; o < t->n_ops; o++)
            K += covers(&t->ops[o], b[g], b[g + 1]) ? t->ops[o].rank : 0;
        ok = K > 0 && K <= LM_LOWRANK_MAX_K;
    }
    free(b);
    return ok;
}

static void segment_free(segment *g)
{
    free(g->B);
    free(g->A);
    free(g->s);
    free(g->ws);
    g->B = g->A = g->s = NULL;
    g->ws = NULL;
}

void lm_lowrank_tensor_free(lm_lowrank_tensor *f)
{
    if (f == NULL)
        return;
    for (size_t g = 0; f->seg != NULL && g < f->n_seg; g++)
        segment_free(&f->seg[g]);
    free(f->seg);
    pthread_mutex_destroy(&f->lock);
    free(f);
}

/* dst[r * dld + c] = src[r * rs + c * cs] for r < nr, c < nc, from the f64 values when the
 * method made them (src64), else the f32 ones (exact in f64).  The four loops are plain
 * conversions the compiler vectorizes when cs == 1 (no per-element test of which source). */
static void copy_f64(double *dst, size_t dld, const float *src32, const double *src64, size_t rs, size_t cs,
                     size_t nr, size_t nc)
{
    for (size_t r = 0; r < nr; r++) {
        double *d = dst + r * dld;
        if (src64 != NULL && cs == 1) {
            memcpy(d, src64 + r * rs, nc * sizeof *d);
        } else if (src64 != NULL) {
            for (size_t c = 0; c < nc; c++)
                d[c] = src64[r * rs + c * cs];
        } else if (cs == 1) {
            const float *f = src32 + r * rs;
            for (size_t c = 0; c < nc; c++)
                d[c] = (double)f[c];
        } else {
            for (size_t c = 0; c < nc; c++)
                d[c] = (double)src32[r * rs + c * cs];
        }
    }
}

/* segment g's factors: the terms of every op covering it, concatenated along k in op order.
 * @return 0, or -1 when out of memory */
static int segment_build(segment *g, const lm_plan_tensor *t, const lm_prepared *prep, unsigned flags)
{
    const int uncert = (flags & LM_LOWRANK_UNCERTIFIED) != 0;
    size_t K = 0, n_cover = 0, o1 = 0;
    for (size_t o = 0; o < t->n_ops; o++)
        if (covers(&t->ops[o], g->lo, g->lo + g->n)) {
            K += (size_t)t->ops[o].rank;
            n_cover++;
            o1 = o;
        }
    const size_t rows = (size_t)g->n, cols = (size_t)t->cols;
    if (n_cover == 1 && !t->ops[o1].axis && prep[o1].b64 == NULL && prep[o1].a64 == NULL) {
        /* one op, not transposed, f32 factors (the common case): the kernel reads them where they
         * are, with no f64 copies (its f64 path, for f32 outputs, makes the ones it needs) */
        const lm_op *op = &t->ops[o1];
        const int f64_path = lm_exact_out_dtype(t) == LM_DT_F32 && !uncert;
        const size_t ws_bytes = uncert ? lm_lowrank_ws_bytes_uncertified(rows, cols, K, 1)
                                       : lm_lowrank_ws_bytes_f32(rows, cols, K, f64_path);
        g->s = malloc(K * sizeof *g->s + 1);
        g->ws = ws_bytes ? malloc(ws_bytes) : NULL;
        if (g->s == NULL || g->ws == NULL)
            return -1;
        lm_populate(g->ws, ws_bytes);
        for (size_t q = 0; q < K; q++)
            g->s[q] = op->scale;
        if (uncert)
            return lm_lowrank_prepare_uncertified(&g->lr, rows, cols, K, NULL, NULL,
                                                  prep[o1].b + (size_t)(g->lo - op->row0) * K, prep[o1].a, g->s,
                                                  g->ws, ws_bytes);
        return lm_lowrank_prepare_f32(&g->lr, rows, cols, K, prep[o1].b + (size_t)(g->lo - op->row0) * K,
                                      prep[o1].a, g->s, f64_path, g->ws, ws_bytes);
    }
    const size_t ws_bytes = uncert ? lm_lowrank_ws_bytes_uncertified(rows, cols, K, 0) : lm_lowrank_ws_bytes(rows, cols, K);
    g->B = malloc(rows * K * sizeof *g->B + 1);
    g->A = malloc(K * cols * sizeof *g->A + 1);
    g->s = malloc(K * sizeof *g->s + 1);
    g->ws = ws_bytes ? malloc(ws_bytes) : NULL;
    if (g->B == NULL || g->A == NULL || g->s == NULL || g->ws == NULL)
        return -1;
    /* written whole just below: present in one call each rather than a page fault a page */
    lm_populate(g->B, rows * K * sizeof *g->B);
    lm_populate(g->A, K * cols * sizeof *g->A);
    lm_populate(g->ws, ws_bytes);
    /* op o's terms are k0 .. k0 + rank - 1.  axis 0: W [out, in] += B' A'; axis 1: W [in, out]
     * += (B' A')^T, so the tile's B side is A'^T and its A side B'^T; the segment's row i is the
     * op's row lo + i - row0 */
    size_t k0 = 0;
    for (size_t o = 0; o < t->n_ops; o++) {
        const lm_op *op = &t->ops[o];
        const lm_prepared *p = &prep[o];
        const size_t rank = (size_t)op->rank, off = (size_t)(g->lo - op->row0);
        if (!covers(op, g->lo, g->lo + g->n))
            continue;
        const size_t in = (size_t)op->in;
        for (size_t q = 0; q < rank; q++)
            g->s[k0 + q] = op->scale;
        /* A' is [rank, in] (element (q, x) at q * in + x), B' [out, rank] (element (o, q) at o * rank + q) */
        if (!op->axis) { /* B side: rows off .. of B'; A side: A' */
            copy_f64(g->B + k0, K, p->b64 ? NULL : p->b + off * rank, p->b64 ? p->b64 + off * rank : NULL, rank, 1, rows,
                     rank);
            copy_f64(g->A + k0 * cols, cols, p->a, p->a64, in, 1, rank, cols);
        } else { /* B side: columns off .. of A', transposed; A side: B' transposed */
            copy_f64(g->B + k0, K, p->a64 ? NULL : p->a + off, p->a64 ? p->a64 + off : NULL, 1, in, rows, rank);
            copy_f64(g->A + k0 * cols, cols, p->b, p->b64, 1, rank, rank, cols);
        }
        k0 += rank;
    }
    if (uncert)
        return lm_lowrank_prepare_uncertified(&g->lr, rows, cols, K, g->B, g->A, NULL, NULL, g->s, g->ws, ws_bytes);
    return lm_lowrank_prepare(&g->lr, rows, cols, K, g->B, g->A, g->s, g->ws, ws_bytes);
}

lm_lowrank_tensor *lm_lowrank_tensor_create(const lm_plan_tensor *t, const lm_prepared *prep, unsigned flags,
                                            lm_err *err)
{
    uint64_t *b = NULL;
    lm_lowrank_tensor *f = calloc(1, sizeof *f);
    size_t n_seg = f ? boundaries(t, &b) : 0;
    if (n_seg == 0 || (f->seg = calloc(n_seg, sizeof *f->seg)) == NULL) {
        free(b);
        if (f != NULL)
            free(f->seg);
        free(f);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory for the low-rank factors of '%s'", t->name);
        return NULL;
    }
    pthread_mutex_init(&f->lock, NULL);
    f->t = t;
    f->prep = prep;
    f->n_seg = n_seg;
    f->flags = flags;
    for (size_t g = 0; g < n_seg; g++) {
        f->seg[g].lo = b[g];
        f->seg[g].n = f->seg[g].rows_left = b[g + 1] - b[g];
    }
    free(b);
    return f;
}

/* segment g built (once, by the first tile that needs it).  @return 0, -1 when out of memory */
static int segment_ready(lm_lowrank_tensor *f, segment *g)
{
    if (__atomic_load_n(&g->state, __ATOMIC_ACQUIRE) == 1)
        return 0;
    int rc = 0;
    pthread_mutex_lock(&f->lock);
    if (g->state == 0) {
        rc = segment_build(g, f->t, f->prep, f->flags);
        if (rc == 0)
            __atomic_store_n(&g->state, 1, __ATOMIC_RELEASE);
        else
            segment_free(g);
    }
    pthread_mutex_unlock(&f->lock);
    return rc;
}

int lm_lowrank_tensor_warm(lm_lowrank_tensor *f, uint64_t r0)
{
    size_t g = 0;
    while (g + 1 < f->n_seg && f->seg[g + 1].lo <= r0)
        g++;
    return g < f->n_seg && __atomic_load_n(&f->seg[g].state, __ATOMIC_ACQUIRE) == 0 ? segment_ready(f, &f->seg[g]) : 0;
}

/* the segment holding row r */
static size_t segment_of(const lm_lowrank_tensor *f, uint64_t r)
{
    size_t g = 0, h = f->n_seg;
    while (h - g > 1) {
        const size_t mid = g + (h - g) / 2;
        if (f->seg[mid].lo <= r)
            g = mid;
        else
            h = mid;
    }
    return g;
}

/* n rows of segment s computed: its last ones free it */
static void segment_rows_done(lm_lowrank_tensor *f, segment *s, uint64_t n)
{
    if (__atomic_sub_fetch(&s->rows_left, n, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_lock(&f->lock);
        segment_free(s);
        __atomic_store_n(&s->state, 2, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&f->lock);
    }
}

int lm_lowrank_tensor_run(lm_lowrank_tensor *f, const lm_kernels *k, uint64_t r0, uint64_t nr, const void *w,
                          lm_kdtype w_dtype, void *out, lm_kdtype out_dtype, uint64_t cols, unsigned flags,
                          lm_lowrank_stats *st)
{
    const size_t wsz = w_dtype == LM_KDT_F32 ? 4 : 2, osz = out_dtype == LM_KDT_F32 ? 4 : 2;
    size_t g = segment_of(f, r0);
    for (uint64_t row = r0; row < r0 + nr; g++) {
        segment *s = &f->seg[g];
        const uint64_t hi = s->lo + s->n < r0 + nr ? s->lo + s->n : r0 + nr;
        const size_t skip = (size_t)((row - r0) * cols);
        if (segment_ready(f, s) != 0)
            return -1;
        k->lowrank(&s->lr, (size_t)(row - s->lo), (size_t)(hi - row), (const unsigned char *)w + skip * wsz, w_dtype,
                   (size_t)cols, (unsigned char *)out + skip * osz, out_dtype, (size_t)cols, flags, st);
        segment_rows_done(f, s, hi - row); /* its last rows free it */
        row = hi;
    }
    return 0;
}

int lm_lowrank_tensor_exact_f32(lm_lowrank_tensor *f, uint64_t row, uint64_t col, float w, float *x)
{
    segment *s = &f->seg[segment_of(f, row)];
    if (segment_ready(f, s) != 0)
        return -1;
    lm_lowrank_stats st = {0};
    const uint32_t b = lm_lowrank_fallback_1(&s->lr, (size_t)(row - s->lo), (size_t)col, w, LM_KDT_F32, &st);
    memcpy(x, &b, sizeof *x);
    return 0;
}

void lm_lowrank_tensor_done(lm_lowrank_tensor *f, uint64_t r0, uint64_t nr)
{
    for (uint64_t row = r0, g = segment_of(f, r0); row < r0 + nr; g++) {
        segment *s = &f->seg[g];
        const uint64_t end = s->lo + s->n < r0 + nr ? s->lo + s->n : r0 + nr;
        segment_rows_done(f, s, end - row);
        row = end;
    }
}
