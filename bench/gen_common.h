/* SPDX-License-Identifier: MIT */
/* gen_common.h : what the generators (gen_model.c, gen_adapter.c) share: a counter-based
 * pseudo-random generator (the same seed gives the same bytes for any thread count) and a writer
 * that fills tensors through the library's safetensors writer; and a helper bench_merge.c uses too.
 * Header-only: every file in bench/ is a program of its own. */
#ifndef LM_GEN_COMMON_H
#define LM_GEN_COMMON_H

#include "lm_kernels.h"
#include "quant.h"
#include "st_writer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef enum {
    GEN_UNIFORM = 0, /* offset + amp * u, u uniform in [-1, 1) */
    GEN_PAIRED,      /* [n, r] whose odd columns repeat the even one before them plus eps * amp * u
                        (HRA's Householder vectors as trained: pairs that nearly cancel) */
    GEN_FP8_CODES,   /* F8_E4M3 codes: uniform random bytes, the NaN codes 0x7F/0xFF replaced by
                        0x7E/0xFE (every finite code, subnormals, zeros and +-448 appear) */
    GEN_BYTES,       /* U8: uniform random integers in [offset, offset + amp] (packed 4-bit codes:
                        0 .. 255; E8M0 scales: a few exponents) */
    GEN_SORTED_INDEX, /* [2, nnz] integers: distinct positions of an [irows, icols] matrix in row-major
                        order, row indices then column indices (SHiRA's mask as PEFT saves it) */
    GEN_DATA         /* the bytes at `data` (a small tensor written as given) */
} gen_fill;

typedef struct {
    char name[224];
    lm_dtype dtype;
    size_t n_dims;
    uint64_t shape[4];
    float amp; /* values uniform in [-amp, amp] (plus offset) */
    float offset;
    gen_fill fill;
    float eps;              /* GEN_PAIRED */
    uint64_t irows, icols;  /* GEN_SORTED_INDEX */
    const void *data;       /* GEN_DATA: n_elems * element size bytes */
    uint64_t stream;        /* the random stream: tensors with the same stream hold the same values
                               (0: the tensor's own index) */
} gen_tensor;

static inline uint64_t gen_splitmix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* element i of stream t: uniform in [-1, 1) */
static inline float gen_uval(uint64_t seed, uint64_t t, uint64_t i)
{
    uint64_t r = gen_splitmix(seed ^ (t * 0xD1B54A32D192ED03ull) ^ gen_splitmix(i));
    return (float)((double)(r >> 40) * (1.0 / (double)(1ull << 23)) - 1.0);
}

static inline uint64_t gen_n_elems(const gen_tensor *g)
{
    uint64_t n = 1;
    for (size_t d = 0; d < g->n_dims; d++)
        n *= g->shape[d];
    return n;
}

/* element i of a GEN_SORTED_INDEX tensor */
static inline int32_t gen_index(const gen_tensor *g, uint64_t seed, uint64_t t, uint64_t i)
{
    uint64_t nnz = g->shape[1], k = i % nnz, stride = g->irows * g->icols / nnz;
    uint64_t pos = k * stride + gen_splitmix(seed ^ (t * 0xD1B54A32D192ED03ull) ^ k) % stride;
    return (int32_t)(i < nnz ? pos / g->icols : pos % g->icols);
}

/* element i of a float tensor */
static inline float gen_value(const gen_tensor *g, uint64_t seed, uint64_t t, uint64_t i)
{
    if (g->fill == GEN_PAIRED) {
        uint64_t r = g->shape[1], j = i % r;
        float v = gen_uval(seed, t, i - (j & 1));
        if (j & 1)
            v += g->eps * gen_uval(seed ^ 0x5DEECE66Dull, t, i);
        return g->offset + g->amp * v;
    }
    return g->offset + g->amp * gen_uval(seed, t, i);
}

/* writes the n tensors to path (through a temporary file, renamed when complete) */
static inline int gen_write_tensors(const char *prog, const char *path, const gen_tensor *g, size_t n, uint64_t seed,
                                    const lm_kernels *k)
{
    lm_out_tensor *o = calloc(n ? n : 1, sizeof *o);
    const char *mk[] = {"format"}, *mv[] = {"pt"};
    lm_err err;
    lm_err_clear(&err);
    if (o == NULL) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        o[i].name = g[i].name;
        o[i].dtype = g[i].dtype;
        o[i].n_dims = g[i].n_dims;
        o[i].shape = g[i].shape;
    }
    lm_st_writer *w = lm_st_writer_open(path, o, n, NULL, mk, mv, 1, &err);
    free(o);
    if (w == NULL) {
        char line[1024];
        lm_err_format(&err, line, sizeof line);
        fprintf(stderr, "%s: %s\n", prog, line);
        return -1;
    }
    const size_t CH = 1 << 20;
    int failed = 0;
    for (size_t t = 0; t < n && !failed; t++) {
        const gen_tensor *gt = &g[t];
        uint64_t ne = gen_n_elems(gt), stream = gt->stream ? gt->stream : t;
        size_t esz = lm_dtype_bits(gt->dtype) / 8;
        uint64_t n_chunks = (ne + CH - 1) / CH;
#pragma omp parallel for schedule(dynamic, 1)
        for (uint64_t c = 0; c < n_chunks; c++) {
            uint64_t first = c * CH, cnt = first + CH <= ne ? CH : ne - first;
            float *f = malloc(cnt * sizeof *f);
            void *out = malloc(cnt * esz);
            if (f == NULL || out == NULL) {
                failed = 1;
            } else {
                if (gt->fill == GEN_FP8_CODES) {
                    for (uint64_t i = 0; i < cnt; i++) {
                        uint8_t b = (uint8_t)(gen_splitmix(seed ^ (stream * 0xD1B54A32D192ED03ull) ^ gen_splitmix(first + i)) >> 56);
                        ((uint8_t *)out)[i] = (b & 0x7F) == 0x7F ? (uint8_t)(b ^ 1) : b;
                    }
                } else if (gt->fill == GEN_BYTES) {
                    uint64_t span = (uint64_t)gt->amp + 1;
                    for (uint64_t i = 0; i < cnt; i++)
                        ((uint8_t *)out)[i] = (uint8_t)((uint64_t)gt->offset +
                            gen_splitmix(seed ^ (stream * 0xD1B54A32D192ED03ull) ^ gen_splitmix(first + i)) % span);
                } else if (gt->fill == GEN_DATA) {
                    memcpy(out, (const uint8_t *)gt->data + first * esz, cnt * esz);
                } else if (gt->fill == GEN_SORTED_INDEX) { /* I32 */
                    for (uint64_t i = 0; i < cnt; i++)
                        ((int32_t *)out)[i] = gen_index(gt, seed, stream, first + i);
                } else {
                    for (uint64_t i = 0; i < cnt; i++)
                        f[i] = gen_value(gt, seed, stream, first + i);
                    if (gt->dtype == LM_DT_F8_E4M3) /* scales: values rounded to E4M3 */
                        lm_q_scales_from_f32(LM_DT_F8_E4M3, f, cnt, out);
                    else if (gt->dtype == LM_DT_BF16)
                        k->f32_to_bf16(f, out, cnt);
                    else if (gt->dtype == LM_DT_F16)
                        k->f32_to_f16(f, out, cnt);
                    else
                        memcpy(out, f, cnt * 4);
                }
                lm_err e2;
                lm_err_clear(&e2);
                if (lm_st_writer_pwrite(w, out, cnt * esz, lm_st_writer_tensor_offset(w, t) + first * esz, &e2) != LM_OK)
                    failed = 1;
            }
            free(f);
            free(out);
        }
    }
    if (failed) {
        fprintf(stderr, "%s: cannot write %s\n", prog, path);
        lm_st_writer_abort(w);
        return -1;
    }
    if (lm_st_writer_commit(w, 0, &err) != LM_OK) {
        fprintf(stderr, "%s: cannot finish %s\n", prog, path);
        return -1;
    }
    return 0;
}

static inline int gen_parse_dt(const char *prog, const char *s, lm_dtype *dt)
{
    if (strcmp(s, "bf16") == 0)
        *dt = LM_DT_BF16;
    else if (strcmp(s, "f16") == 0)
        *dt = LM_DT_F16;
    else if (strcmp(s, "f32") == 0)
        *dt = LM_DT_F32;
    else {
        fprintf(stderr, "%s: dtype must be bf16, f16 or f32 (not %s)\n", prog, s);
        return -1;
    }
    return 0;
}

/* is name one of the comma-separated entries of list (ignoring case when nocase)? */
static inline int gen_in_list(const char *list, const char *name, int nocase)
{
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l == n && (nocase ? strncasecmp(p, name, n) : strncmp(p, name, n)) == 0)
            return 1;
        p += l + (e != NULL);
    }
    return 0;
}

#endif
