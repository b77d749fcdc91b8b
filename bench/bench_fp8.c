/* SPDX-License-Identifier: MIT */
/* bench_fp8.c : times the block FP8 kernels (lm_kernels.h fp8_merge, fp8_encode, and the two
 * through quant.c's certified lm_fp8_merge_block) of every variant this CPU runs, on one tile of
 * the fp8 bench's shape: 128 rows x 2048 columns of E4M3 codes in 128 x 128 blocks, an f32 scale
 * each, a rank-16 term (A packed per block, as exec_quant.c packs it) whose values move by about
 * one grid step (the bench's adapter: most of its delta below the grid).  Prints ns per element
 * (the fastest of --runs), the share of elements the certification recomputes and a hash of the
 * codes (the same for every variant).  Not run by `make check`.
 *
 * Usage: bench_fp8 [--runs N] [--step F] [--codes normal|random] [--variant ref|avx2|avx512]
 *   --step F: the term's typical size in grid steps (default 1).
 *   --codes random: every finite code equally likely, as gen_model --quant fp8 writes the fp8
 *   bench's model (5.5% subnormal codes: 60% of the 16-code vectors hold one), instead of the
 *   codes of N(0, 0.02) weights under their block's amax (almost none subnormal). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lm_kernels.h"
#include "quant.h"

enum { BF_H = 128, BF_W = 2048, BF_K = 16, BF_BC = 128, BF_NB = BF_W / BF_BC };

static double bf_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint64_t bf_rs = 88172645463325252ull;

static double bf_normal(void) /* Box-Muller on xorshift64 */
{
    double u[2];
    for (int k = 0; k < 2; k++) {
        bf_rs ^= bf_rs << 13;
        bf_rs ^= bf_rs >> 7;
        bf_rs ^= bf_rs << 17;
        u[k] = (double)(bf_rs >> 11) * 0x1p-53;
    }
    return sqrt(-2 * log(u[0] + 0x1p-60)) * cos(6.283185307179586 * u[1]);
}

typedef struct {
    uint8_t q0[BF_H * BF_W], q[BF_H * BF_W];
    float s0[BF_NB], B[BF_H * BF_K], A[BF_K * BF_W], Ap[BF_K * BF_W], x[BF_H * BF_BC], erow[BF_H];
    uint32_t flag[2 * BF_H * BF_BC];
    float alpha, e0;
} bf_case;

/* lm_fp8_exact_fn: the exact value (f64: the products are exact, the sum's error far below an f32
 * ulp for this data; a timing stand-in for exec_quant.c's) */
static float bf_exact(void *ctx, uint64_t row, uint64_t col, float w)
{
    const bf_case *c = ctx;
    double d = 0;
    for (int p = 0; p < BF_K; p++)
        d += (double)c->B[row * BF_K + (uint64_t)p] * (double)c->A[(uint64_t)p * BF_W + col];
    return (float)((double)w + (double)c->alpha * d);
}

static void bf_make(bf_case *c, double step, int random_codes)
{
    for (int b = 0; b < BF_NB; b++) { /* N(0, 0.02) weights, the block's scale amax / 448 */
        static float v[BF_H * BF_BC];
        float amax = 0;
        for (int i = 0; i < BF_H * BF_BC; i++) {
            v[i] = (float)(0.02 * bf_normal());
            amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
        }
        c->s0[b] = amax / 448;
        for (int i = 0; i < BF_H; i++)
            for (int j = 0; j < BF_BC; j++) {
                uint8_t q = lm_f32_to_fp8_e4m3(v[i * BF_BC + j] / c->s0[b]);
                if (random_codes) { /* (xorshift64's top byte, NaN codes 0x7F / 0xFF skipped) */
                    do {
                        bf_rs ^= bf_rs << 13;
                        bf_rs ^= bf_rs >> 7;
                        bf_rs ^= bf_rs << 17;
                        q = (uint8_t)(bf_rs >> 56);
                    } while ((q & 0x7F) == 0x7F);
                }
                c->q0[i * BF_W + b * BF_BC + j] = q;
            }
    }
    for (int i = 0; i < BF_H * BF_K; i++)
        c->B[i] = (float)(0.02 * bf_normal());
    for (int i = 0; i < BF_K * BF_W; i++)
        c->A[i] = (float)(0.02 * bf_normal());
    for (int b = 0; b < BF_NB; b++)
        for (int p = 0; p < BF_K; p++)
            memcpy(c->Ap + b * BF_BC * BF_K + p * BF_BC, c->A + p * BF_W + b * BF_BC, BF_BC * sizeof(float));
    /* a weight of 0.02 has a grid step of about 0.02 / 16; the term's sum has rms 0.02^2 4 */
    c->alpha = (float)(step * (0.02 / 16) / (0.02 * 0.02 * 4));
    /* the rows' bound as exec_quant.c's (1.02 (K + 2) u |s| ||b_i|| max ||a_j||), a little loose */
    double bn = 0, an = 0;
    for (int i = 0; i < BF_H; i++) {
        double s = 0;
        for (int p = 0; p < BF_K; p++)
            s += (double)c->B[i * BF_K + p] * c->B[i * BF_K + p];
        bn = s > bn ? s : bn;
    }
    for (int j = 0; j < BF_W; j++) {
        double s = 0;
        for (int p = 0; p < BF_K; p++)
            s += (double)c->A[p * BF_W + j] * c->A[p * BF_W + j];
        an = s > an ? s : an;
    }
    c->e0 = (float)(1.02 * (BF_K + 2) * 0x1p-24 * c->alpha * sqrt(bn) * sqrt(an) * 1.01);
}

static lm_fp8_term bf_term(const bf_case *c, int b)
{
    return (lm_fp8_term){c->B, c->Ap + b * BF_BC * BF_K, BF_K, BF_BC, BF_K, 0, BF_H, c->alpha};
}

static void bf_run(const lm_kernels *k, bf_case *c, int runs)
{
    double best[4] = {1e9, 1e9, 1e9, 1e9};
    uint64_t n_exact = 0;
    lm_fp8_lanes L;
    for (int r = 0; r < runs; r++) {
        float s[BF_NB];
        double t0 = bf_now();
        for (int b = 0; b < BF_NB; b++) { /* the merge pass alone (x of the last block kept) */
            const lm_fp8_term t = bf_term(c, b);
            k->fp8_merge(c->q0 + b * BF_BC, BF_W, c->s0[b], BF_H, BF_BC, &t, c->x, BF_BC, &L);
            float amax;
            memcpy(&amax, &L.amax, sizeof amax);
            s[b] = 448.0f / amax;
        }
        double t1 = bf_now();
        best[0] = t1 - t0 < best[0] ? t1 - t0 : best[0];
        for (int i = 0; i < BF_H; i++)
            c->erow[i] = c->e0;
        for (int pass = 0; pass < 2; pass++) { /* the encode pass on that x, unchecked and checked */
            t0 = bf_now();
            for (int b = 0; b < BF_NB; b++) {
                lm_fp8_cert cert = {c->erow, 0xFFFFFFFFu, c->flag, 0};
                k->fp8_encode(c->x, BF_BC, BF_H, BF_BC, s[BF_NB - 1], 1 / s[BF_NB - 1], 0, NULL, BF_W,
                              c->q + b * BF_BC, BF_W, &L, pass ? &cert : NULL);
            }
            t1 = bf_now();
            best[1 + pass] = t1 - t0 < best[1 + pass] ? t1 - t0 : best[1 + pass];
        }
        lm_qstats st;
        memset(&st, 0, sizeof st);
        n_exact = 0;
        t0 = bf_now();
        for (int b = 0; b < BF_NB; b++) { /* both, certified, as exec_quant.c runs them */
            const lm_fp8_term t = bf_term(c, b);
            for (int i = 0; i < BF_H; i++)
                c->erow[i] = c->e0;
            lm_fp8_bound bd = {c->erow, bf_exact, c, 0, (uint64_t)b * BF_BC, c->flag, 0};
            float sc;
            lm_fp8_merge_block(k, c->q0 + b * BF_BC, c->s0[b], BF_H, BF_BC, BF_W, &t, c->x, BF_BC, c->q + b * BF_BC,
                               &sc, &st, &bd);
            n_exact += bd.n_exact;
        }
        t1 = bf_now();
        best[3] = t1 - t0 < best[3] ? t1 - t0 : best[3];
    }
    uint64_t h = 1469598103934665603ull; /* FNV-1a of the certified codes */
    for (size_t i = 0; i < sizeof c->q; i++)
        h = (h ^ c->q[i]) * 1099511628211ull;
    const double n = (double)BF_H * BF_W * 1e-9;
    printf("%-7s %8.3f %9.3f %9.3f %10.3f %10.4f  %016llx\n", k->name, best[0] / n, best[1] / n, best[2] / n,
           best[3] / n, 100.0 * (double)n_exact / (BF_H * BF_W), (unsigned long long)h);
}

int main(int argc, char **argv)
{
    int runs = 30, random_codes = 0;
    double step = 1.0;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--runs") && i + 1 < argc)
            runs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--step") && i + 1 < argc)
            step = atof(argv[++i]);
        else if (!strcmp(argv[i], "--codes") && i + 1 < argc && (!strcmp(argv[i + 1], "random") || !strcmp(argv[i + 1], "normal")))
            random_codes = !strcmp(argv[++i], "random");
        else if (!strcmp(argv[i], "--variant") && i + 1 < argc)
            only = argv[++i];
        else {
            fprintf(stderr, "usage: bench_fp8 [--runs N] [--step F] [--codes normal|random] [--variant ref|avx2|avx512]\n");
            return 2;
        }
    }
    if (runs < 1 || !(step > 0)) {
        fprintf(stderr, "bench_fp8: --runs must be >= 1 and --step > 0\n");
        return 2;
    }
    bf_case *c = malloc(sizeof *c);
    if (c == NULL) {
        fprintf(stderr, "bench_fp8: out of memory\n");
        return 1;
    }
    bf_make(c, step, random_codes);
    printf("block FP8 kernels, %d x %d tile of 128 x 128 blocks, %s codes, K = %d, term ~%.2g grid steps; ns per "
           "element (fastest of %d)\n", BF_H, BF_W, random_codes ? "random" : "N(0, 0.02)", BF_K, step, runs);
    printf("variant    merge    encode  enc+cert  certified   recomp%%  codes\n");
    static const char *names[] = {"ref", "avx2", "avx512"};
    for (int v = 0; v < 3; v++) {
        lm_kernels k;
        if ((only != NULL && strcmp(only, names[v]) != 0) || lm_kernels_select(&k, names[v]) != 0)
            continue;
        bf_run(&k, c, v == 0 && runs > 3 ? 3 : runs); /* (ref: ~0.1 s a run) */
    }
    free(c);
    return 0;
}
