/* bench_kernels.c : times every kernel of every variant this CPU runs, at working sets from L1
 * (4 KiB) to DRAM (64 MiB), against memcpy moving the same number of bytes.  The kernels are
 * memory-bound, so GB/s relative to memcpy is the figure that matters.  Not run by `make check`.
 *
 * Usage: bench_kernels [--csv] [--runs N] [--max-size BYTES] [--kernel NAME] [--variant NAME]
 *   size = bytes of the f32 side of the operation (n_elems = size / 4); GB/s counts bytes read
 *   plus bytes written, at the fastest run; memcpy copies half that many bytes (same traffic). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
    free(b.src_block);
    free(b.dst_block);
    free(b.f32);
    free(b.f64);
    free(b.bf16);
    free(b.f16);
    return 0;
}
