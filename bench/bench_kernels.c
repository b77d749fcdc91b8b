/* SPDX-License-Identifier: MIT */
/* bench_kernels.c : times every kernel of every variant this CPU runs, at working sets from L1
 * (4 KiB) to DRAM (64 MiB), against memcpy moving the same number of bytes.  The kernels are
 * memory-bound, so GB/s relative to memcpy is the figure that matters.  Not run by `make check`.
 *
 * Usage: bench_kernels [--csv] [--runs N] [--max-size BYTES] [--kernel NAME] [--variant NAME]
 *   --kernel lowrank runs only the low-rank tile kernel's comparison (see bk_lowrank). 
 *   size = bytes of the f32 side of the operation (n_elems = size / 4); GB/s counts bytes read
 *   plus bytes written, at the fastest run; memcpy copies half that many bytes (same traffic). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

#include "gemm_tile.h"
#include "lm_kernels.h"

#define BK_MAX_RUNS 101

typedef enum {
    BK_BF16_TO_F32, BK_F32_TO_BF16, BK_F16_TO_F32, BK_F32_TO_F16, BK_AXPY, BK_F64_TO_F32,
    BK_F32_TO_F64, BK_N_OPS
} bk_op;

static const struct {
    const char *name;
    size_t src_bytes, dst_bytes; /* per element */
    int dst_read;                /* axpy reads its destination too */
} bk_ops[BK_N_OPS] = {
    {"bf16_to_f32", 2, 4, 0}, {"f32_to_bf16", 4, 2, 0}, {"f16_to_f32", 2, 4, 0},
    {"f32_to_f16", 4, 2, 0},  {"axpy", 4, 4, 1},        {"f64_to_f32", 8, 4, 0},
    {"f32_to_f64", 4, 8, 0},
};

static const size_t bk_sizes[] = {4u << 10, 32u << 10, 256u << 10, 2u << 20, 16u << 20, 64u << 20};
#define BK_N_SIZES (sizeof bk_sizes / sizeof bk_sizes[0])

typedef struct bk_bufs {
    void *src, *dst;  /* kernel operands, 8 bytes per element each (the widest case); src is
                       * page aligned, dst is 2 KiB past a page boundary: buffers whose distance
                       * is a multiple of 4 KiB (or close to one) run memcpy and the kernels
                       * several times slower through 4K aliasing, which would measure the
                       * allocator rather than the code */
    void *src_block, *dst_block; /* what to free */
    size_t n_bytes;   /* of each */
    uint16_t *bf16, *f16;
    float *f32;
    double *f64;
} bk_bufs;

static double bk_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* keeps the compiler from treating stores into p as dead */
static void bk_clobber(void *p)
{
    __asm__ volatile("" : : "r"(p) : "memory");
}

static int bk_cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* source data in the right type for op, copied into bufs->src (weights-like values) */
static void bk_prepare(const bk_bufs *b, bk_op op, size_t n)
{
    switch (bk_ops[op].src_bytes) {
    case 2:
        memcpy(b->src, op == BK_BF16_TO_F32 ? b->bf16 : b->f16, n * 2);
        break;
    case 4:
        memcpy(b->src, b->f32, n * 4);
        break;
    default:
        memcpy(b->src, b->f64, n * 8);
        break;
    }
    if (op == BK_AXPY)
        memcpy(b->dst, b->f32, n * 4);
}

static void bk_call(const lm_kernels *k, bk_op op, void *src, void *dst, size_t n)
{
    switch (op) {
    case BK_BF16_TO_F32: k->bf16_to_f32(src, dst, n); break;
    case BK_F32_TO_BF16: k->f32_to_bf16(src, dst, n); break;
    case BK_F16_TO_F32: k->f16_to_f32(src, dst, n); break;
    case BK_F32_TO_F16: k->f32_to_f16(src, dst, n); break;
    case BK_AXPY: k->axpy(dst, 1e-3f, src, n); break;
    case BK_F64_TO_F32: k->f64_to_f32(src, dst, n); break;
    case BK_F32_TO_F64: k->f32_to_f64(src, dst, n); break;
    default: break;
    }
    bk_clobber(dst);
}

/* one timed run repeats the call `reps` times (so small sizes are not lost in timer noise);
 * returns per-run ns per element: min and median over `runs` runs, after one warm-up run */
static void bk_time(const lm_kernels *k, int op, const bk_bufs *b, size_t n, int runs,
                    double *min_ns, double *med_ns)
{
    const size_t reps = n >= (1u << 20) ? 1 : (1u << 20) / n;
    double t[BK_MAX_RUNS];
    for (int r = -1; r < runs; r++) {
        const double t0 = bk_now_ns();
        for (size_t i = 0; i < reps; i++) {
            if (op < 0) { /* memcpy baseline: n is a byte count here */
                memcpy(b->dst, b->src, n);
                bk_clobber(b->dst);
            } else {
                bk_call(k, (bk_op)op, b->src, b->dst, n);
            }
        }
        const double dt = (bk_now_ns() - t0) / (double)reps / (double)n;
        if (r >= 0)
            t[r] = dt;
    }
    qsort(t, (size_t)runs, sizeof t[0], bk_cmp_double);
    *min_ns = t[0];
    *med_ns = t[runs / 2];
}

static const char *bk_size_name(size_t bytes, char *buf, size_t cap)
{
    if (bytes >= (1u << 20))
        snprintf(buf, cap, "%zuMiB", bytes >> 20);
    else
        snprintf(buf, cap, "%zuKiB", bytes >> 10);
    return buf;
}

/* ---- the low-rank tile kernel against OpenBLAS ----------------------------------------------
 * One tile (rows x cols, rank K = 16) of a tensor, the factors prepared once.  For each variant and
 * dtype (W and output alike): the kernel with exactness on and off (LM_LOWRANK_UNCERTIFIED), its
 * GFLOP/s per core (2 K flops per element) and the fraction of elements recomputed; against
 * cblas_sgemm on the same f32 tile (beta = 1, single thread), alone and in the pipeline the engine
 * runs today (convert W to f32, sgemm, convert back), and memcpy of the tile's bytes in and out. */

typedef struct bk_lr_case {
    size_t rows, cols, K;
} bk_lr_case;

static double bk_gauss(uint64_t *rng)
{
    double sum = 0;
    for (int j = 0; j < 4; j++) {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        sum += (double)(*rng >> 11) * 0x1p-53 - 0.5;
    }
    return sum * 1.7320508075688772; /* unit variance */
}

/* min over runs of the per-call ns of fn(ctx), each run repeating it to >= ~2 ms */
typedef void (*bk_fn)(void *ctx);
static double bk_time_fn(bk_fn fn, void *ctx, int runs)
{
    fn(ctx); /* warm-up */
    double t1 = bk_now_ns();
    fn(ctx);
    const double one = bk_now_ns() - t1;
    const size_t reps = one >= 2e6 ? 1 : (size_t)(2e6 / (one + 1)) + 1;
    double best = 1e300;
    for (int r = 0; r < runs; r++) {
        const double t0 = bk_now_ns();
        for (size_t i = 0; i < reps; i++)
            fn(ctx);
        const double dt = (bk_now_ns() - t0) / (double)reps;
        if (dt < best)
            best = dt;
    }
    return best;
}

typedef struct bk_lr_ctx {
    const lm_kernels *k;
    const lm_lowrank *lr;
    size_t row0, rows, cols, K;
    lm_kdtype dt;
    const void *w;
    void *out;
    unsigned flags;
    lm_lowrank_stats st;
    float *wf, *Bf, *Af; /* sgemm operands: f32 tile, B [rows x K] (s folded), A [K x cols] */
    const void *w_raw;   /* pipeline: W in dt */
    void *out_raw;
} bk_lr_ctx;

static void bk_lr_kernel(void *p)
{
    bk_lr_ctx *c = p;
    c->st = (lm_lowrank_stats){0};
    c->k->lowrank(c->lr, c->row0, c->rows, c->w, c->dt, c->cols, c->out, c->dt, c->cols, c->flags, &c->st);
    bk_clobber(c->out);
}

static void bk_lr_sgemm(void *p)
{
    bk_lr_ctx *c = p;
    lm_sgemm_rm(0, 0, c->rows, c->cols, c->K, 1.0f, c->Bf, c->K, c->Af, c->cols, 1.0f, c->wf, c->cols);
    bk_clobber(c->wf);
}

static void bk_lr_pipeline(void *p) /* what exec.c does per tile today */
{
    bk_lr_ctx *c = p;
    const size_t n = c->rows * c->cols;
    if (c->dt == LM_KDT_BF16)
        c->k->bf16_to_f32(c->w_raw, c->wf, n);
    else if (c->dt == LM_KDT_F16)
        c->k->f16_to_f32(c->w_raw, c->wf, n);
    else
        memcpy(c->wf, c->w_raw, n * 4);
    lm_gemm_tile_nn(c->k, c->wf, c->rows, c->cols, c->Bf, c->Af, c->K, 1.0f);
    if (c->dt == LM_KDT_BF16)
        c->k->f32_to_bf16(c->wf, c->out_raw, n);
    else if (c->dt == LM_KDT_F16)
        c->k->f32_to_f16(c->wf, c->out_raw, n);
    else
        memcpy(c->out_raw, c->wf, n * 4);
    bk_clobber(c->out_raw);
}

static void bk_lr_memcpy(void *p)
{
    bk_lr_ctx *c = p;
    memcpy(c->out, c->w, c->rows * c->cols * (c->dt == LM_KDT_F32 ? 4 : 2));
    bk_clobber(c->out);
}

static int bk_lowrank(const lm_kernels *variants, size_t n_variants, int runs, int csv)
{
    static const bk_lr_case cases[] = {{64, 4096, 16}, {16, 16384, 16}, {64, 4096, 64}, {64, 2048, 256}, {64, 5632, 256}};
    static const lm_kdtype dts[] = {LM_KDT_BF16, LM_KDT_F16, LM_KDT_F32};
    static const char *const dt_names[] = {"bf16", "f16", "f32"};
    lm_blas_single_thread();
    if (csv)
        printf("# lowrank: %s\nlowrank,rows,cols,K,dtype,what,variant,ns_per_elem,gflops,gb_per_s,recomputed_frac\n",
               lm_blas_name());
    else
        printf("\nlow-rank tile kernel, one core, W and output in the same dtype; %s\n"
               "%-11s %-5s %-22s %-7s %9s %8s %8s %10s\n",
               lm_blas_name(), "tile", "dtype", "what", "variant", "ns/elem", "GFLOP/s", "GB/s", "recomputed");
    int rc = 0;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const size_t rows = cases[ci].rows, cols = cases[ci].cols, K = cases[ci].K, n = rows * cols;
        /* a tensor of 4 tiles; the tile timed is its second one */
        const size_t trows = 4 * rows;
        double *B = malloc(trows * K * sizeof *B), *A = malloc(K * cols * sizeof *A), *s = malloc(K * sizeof *s);
        const size_t ws_n = lm_lowrank_ws_bytes(trows, cols, K);
        void *ws = malloc(ws_n);
        float *wf = aligned_alloc(64, n * 4), *Bf = malloc(rows * K * 4), *Af = malloc(K * cols * 4);
        void *w = aligned_alloc(64, n * 4), *out = aligned_alloc(64, n * 4 + 4096);
        double *wd = malloc(n * sizeof *wd);
        if (!B || !A || !s || !ws || !wf || !Bf || !Af || !w || !out || !wd) {
            fprintf(stderr, "bench_kernels: out of memory\n");
            return 1;
        }
        uint64_t rng = 0x9E3779B97F4A7C15ull ^ ci;
        for (size_t k = 0; k < K; k++)
            s[k] = 2.0; /* alpha / r = 32 / 16 */
        for (size_t e = 0; e < trows * K; e++)
            B[e] = (double)(float)(0.01 * bk_gauss(&rng));
        for (size_t e = 0; e < K * cols; e++)
            A[e] = (double)(float)(bk_gauss(&rng) / sqrt((double)cols));
        for (size_t e = 0; e < n; e++)
            wd[e] = 0.0376 * bk_gauss(&rng); /* 1.7 / sqrt(2048), as bench/gen_model */
        lm_lowrank lr;
        if (lm_lowrank_prepare(&lr, trows, cols, K, B, A, s, ws, ws_n) != 0) {
            fprintf(stderr, "bench_kernels: lm_lowrank_prepare failed\n");
            return 1;
        }
        for (size_t e = 0; e < rows * K; e++)
            Bf[e] = (float)(s[e % K] * B[rows * K + e]);
        for (size_t e = 0; e < K * cols; e++)
            Af[e] = (float)A[e];
        for (size_t d = 0; d < 3; d++) {
            const lm_kdtype dt = dts[d];
            for (size_t e = 0; e < n; e++) {
                const float f = (float)wd[e];
                if (dt == LM_KDT_BF16)
                    ((uint16_t *)w)[e] = lm_f32_to_bf16_1(f);
                else if (dt == LM_KDT_F16)
                    ((uint16_t *)w)[e] = lm_f32_to_f16_1(f);
                else
                    ((float *)w)[e] = f;
            }
            const size_t tile_bytes = n * (dt == LM_KDT_F32 ? 4 : 2) * 2; /* read + written */
            const double flops = 2.0 * (double)K * (double)n;
            char tile[32];
            snprintf(tile, sizeof tile, "%zux%zu K%zu", rows, cols, K);
            bk_lr_ctx c = {0};
            c.lr = &lr;
            c.row0 = rows; /* the timed tile: rows [rows, 2 rows) of the tensor */
            c.rows = rows;
            c.cols = cols;
            c.K = K;
            c.dt = dt;
            c.w = w;
            c.out = (char *)out + 2048; /* away from 4K aliasing with w */
            c.wf = wf;
            c.Bf = Bf;
            c.Af = Af;
            c.w_raw = w;
            c.out_raw = c.out;
            struct { const char *what; bk_fn fn; unsigned flags; int per_variant; } rowsdef[] = {
                {"fused, exact", bk_lr_kernel, 0, 1},
                {"fused, exactness off", bk_lr_kernel, LM_LOWRANK_UNCERTIFIED, 1},
                {"convert+gemm_rows+conv", bk_lr_pipeline, 0, 1},
                {"BLAS sgemm alone (f32)", bk_lr_sgemm, 0, 0},
                {"memcpy in+out", bk_lr_memcpy, 0, 0},
            };
            for (size_t r = 0; r < sizeof rowsdef / sizeof rowsdef[0]; r++) {
                const size_t nv = rowsdef[r].per_variant ? n_variants : 1;
                for (size_t v = 0; v < nv; v++) {
                    c.k = rowsdef[r].per_variant ? &variants[v] : &variants[n_variants - 1];
                    c.flags = rowsdef[r].flags;
                    if (rowsdef[r].fn == bk_lr_sgemm)
                        for (size_t e = 0; e < n; e++)
                            wf[e] = (float)wd[e];
                    const double ns = bk_time_fn(rowsdef[r].fn, &c, runs);
                    const double frac = rowsdef[r].fn == bk_lr_kernel && c.st.n_elems
                                            ? (double)c.st.n_recomputed / (double)c.st.n_elems : 0;
                    const int has_flops = rowsdef[r].fn != bk_lr_memcpy;
                    const char *vname = rowsdef[r].per_variant ? variants[v].name : "-";
                    if (csv)
                        printf("lowrank,%zu,%zu,%zu,%s,%s,%s,%.4f,%.2f,%.2f,%.3g\n", rows, cols, K, dt_names[d],
                               rowsdef[r].what, vname, ns / (double)n, has_flops ? flops / ns : 0,
                               (double)tile_bytes / ns, frac);
                    else {
                        char fr[32] = "", gf[32] = "-";
                        if (rowsdef[r].fn == bk_lr_kernel && !(c.flags & LM_LOWRANK_UNCERTIFIED))
                            snprintf(fr, sizeof fr, "%.2e", frac);
                        if (has_flops)
                            snprintf(gf, sizeof gf, "%.1f", flops / ns);
                        printf("%-11s %-5s %-22s %-7s %9.4f %8s %8.2f %10s\n", tile, dt_names[d], rowsdef[r].what,
                               vname, ns / (double)n, gf, (double)tile_bytes / ns, fr);
                    }
                    fflush(stdout);
                }
            }
        }
        free(B);
        free(A);
        free(s);
        free(ws);
        free(wf);
        free(Bf);
        free(Af);
        free(w);
        free(out);
        free(wd);
    }
    return rc;
}

static void bk_usage(FILE *f)
{
    fprintf(f, "usage: bench_kernels [--csv] [--runs N (1..%d, default 9)] [--max-size BYTES]\n"
               "                     [--kernel NAME] [--variant ref|avx2|avx512]\n",
            BK_MAX_RUNS);
}

int main(int argc, char **argv)
{
    int csv = 0, runs = 9;
    size_t max_size = SIZE_MAX;
    const char *only_kernel = NULL, *only_variant = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const int has_val = i + 1 < argc;
        if (strcmp(a, "--csv") == 0) {
            csv = 1;
        } else if (strcmp(a, "--runs") == 0 && has_val) {
            runs = atoi(argv[++i]);
        } else if (strcmp(a, "--max-size") == 0 && has_val) {
            max_size = (size_t)strtoull(argv[++i], NULL, 0);
        } else if (strcmp(a, "--kernel") == 0 && has_val) {
            only_kernel = argv[++i];
        } else if (strcmp(a, "--variant") == 0 && has_val) {
            only_variant = argv[++i];
        } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            bk_usage(stdout);
            return 0;
        } else {
            bk_usage(stderr);
            return 2;
        }
    }
    if (runs < 1 || runs > BK_MAX_RUNS) {
        bk_usage(stderr);
        return 2;
    }

    const char *const variant_names[] = {"ref", "avx2", "avx512"};
    lm_kernels variants[3];
    size_t n_variants = 0;
    char skipped[64] = "";
    for (size_t v = 0; v < 3; v++) {
        if (only_variant && strcmp(only_variant, variant_names[v]) != 0)
            continue;
        if (lm_kernels_select(&variants[n_variants], variant_names[v]) == 0)
            n_variants++;
        else
            snprintf(skipped + strlen(skipped), sizeof skipped - strlen(skipped), " %s",
                     variant_names[v]);
    }

    size_t largest = 0;
    for (size_t s = 0; s < BK_N_SIZES; s++)
        if (bk_sizes[s] <= max_size)
            largest = bk_sizes[s];
    if (largest == 0) {
        fprintf(stderr, "bench_kernels: --max-size below the smallest size (4096)\n");
        return 2;
    }
    const size_t max_n = largest / 4;

    bk_bufs b = {0};
    b.n_bytes = max_n * 8;
    b.src_block = aligned_alloc(4096, b.n_bytes);
    b.dst_block = aligned_alloc(4096, b.n_bytes + 4096);
    b.src = b.src_block;
    b.dst = b.dst_block ? (char *)b.dst_block + 2048 : NULL;
    b.f32 = malloc(max_n * sizeof *b.f32);
    b.f64 = malloc(max_n * sizeof *b.f64);
    b.bf16 = malloc(max_n * sizeof *b.bf16);
    b.f16 = malloc(max_n * sizeof *b.f16);
    if (!b.src || !b.dst || !b.f32 || !b.f64 || !b.bf16 || !b.f16) {
        fprintf(stderr, "bench_kernels: out of memory\n");
        return 1;
    }
    uint64_t rng = 0x2545F4914F6CDD1Dull;
    for (size_t i = 0; i < max_n; i++) { /* roughly N(0, 0.02), like trained weights */
        double sum = 0;
        for (int j = 0; j < 4; j++) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            sum += (double)(rng >> 11) * 0x1p-53 - 0.5;
        }
        b.f64[i] = sum * 0.035;
        b.f32[i] = (float)b.f64[i];
    }
    lm_f32_to_bf16_ref(b.f32, b.bf16, max_n);
    lm_f32_to_f16_ref(b.f32, b.f16, max_n);
    memset(b.src, 0, b.n_bytes); /* first touch outside the timing */
    memset(b.dst, 0, b.n_bytes);

    lm_kernels selected;
    lm_kernels_select(&selected, NULL);
    char cpu[128];
    lm_cpu_name(cpu, sizeof cpu);
#ifdef __VERSION__
    const char *compiler = __VERSION__;
#else
    const char *compiler = "unknown";
#endif
    printf("%sbench_kernels: cpu \"%s\", kernels selected \"%s\", compiler \"%s\", runs %d%s%s\n",
           csv ? "# " : "", cpu, selected.name, compiler, runs,
           skipped[0] ? ", not supported here:" : "", skipped);
    if (csv)
        printf("kernel,variant,size_bytes,n_elems,min_ns_per_elem,median_ns_per_elem,gb_per_s,"
               "memcpy_gb_per_s,vs_memcpy\n");
    else
        printf("%-12s %-7s %7s %9s %10s %10s %8s %8s %6s\n", "kernel", "variant", "size",
               "n_elems", "min_ns/el", "med_ns/el", "GB/s", "memcpy", "ratio");

    /* memcpy baselines, by traffic per element (6, 12 or 16 bytes) and size */
    double memcpy_gbs[17][BK_N_SIZES] = {{0}};
    for (int op = 0; op < BK_N_OPS; op++) {
        if (only_kernel && strcmp(only_kernel, bk_ops[op].name) != 0)
            continue;
        const size_t traffic =
            bk_ops[op].src_bytes + bk_ops[op].dst_bytes * (bk_ops[op].dst_read ? 2 : 1);
        for (size_t s = 0; s < BK_N_SIZES && bk_sizes[s] <= largest; s++) {
            const size_t n = bk_sizes[s] / 4;
            char sz[16];
            double *base = &memcpy_gbs[traffic][s];
            if (*base == 0) {
                double mn, md;
                const size_t copy_bytes = n * traffic / 2;
                bk_time(NULL, -1, &b, copy_bytes, runs, &mn, &md);
                *base = 1.0 / mn * 2; /* bytes moved per ns = GB/s; read + write */
            }
            for (size_t v = 0; v < n_variants; v++) {
                double mn, md;
                bk_prepare(&b, (bk_op)op, n);
                bk_time(&variants[v], op, &b, n, runs, &mn, &md);
                const double gbs = (double)traffic / mn;
                if (csv)
                    printf("%s,%s,%zu,%zu,%.4f,%.4f,%.3f,%.3f,%.3f\n", bk_ops[op].name,
                           variants[v].name, bk_sizes[s], n, mn, md, gbs, *base, gbs / *base);
                else
                    printf("%-12s %-7s %7s %9zu %10.4f %10.4f %8.2f %8.2f %6.2f\n",
                           bk_ops[op].name, variants[v].name,
                           bk_size_name(bk_sizes[s], sz, sizeof sz), n, mn, md, gbs, *base,
                           gbs / *base);
                fflush(stdout);
            }
        }
    }
    if (only_kernel == NULL || strcmp(only_kernel, "lowrank") == 0)
        if (bk_lowrank(variants, n_variants, runs, csv) != 0)
            return 1;
    free(b.src_block);
    free(b.dst_block);
    free(b.f32);
    free(b.f64);
    free(b.bf16);
    free(b.f16);
    return 0;
}
