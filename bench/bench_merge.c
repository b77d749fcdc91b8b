/* bench_merge.c : the merge benchmark.  Generates a model of a given shape (bench/gen_model,
 * cached under BENCH_DIR), then alternates the copy floor (`cat base > out`) and the merge
 * (`lora-merge -q base adapter out`) several times, the output deleted and synced before every
 * run, and prints median and min-max wall times, the ratio merge/floor, GB/s, GFLOP/s of the
 * low-rank work and the peak resident memory of each (getrusage of the child).
 *
 *   bench_merge [--case 1b|8b|small] [--runs N] [--threads N] [--dir DIR] [--csv] [--keep]
 *   BENCH_DIR=DIR caches the generated models (default: a temporary directory, removed after). */
#include "gemm_tile.h"
#include "lm_kernels.h"
#include "lora_merge.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    const char *name;
    long hidden, inter, layers, vocab, heads, kv, rank;
    double max_ratio, max_rss_mb; /* the targets of the speed issue */
} bench_case;

static const bench_case CASES[] = {
    {"small", 1024, 2816, 8, 32000, 16, 4, 16, 0, 0}, /* a quick look: no target */
    {"1b", 2048, 5632, 22, 32000, 32, 4, 16, 1.25, 256},
    {"8b", 4096, 14336, 32, 128256, 32, 8, 16, 1.30, 1024},
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* runs argv with stdout to out_path (or /dev/null); returns wall seconds, *rss_kb the child's peak */
static double run_timed(char *const *argv, const char *out_path, long *rss_kb, int *status)
{
    double t0 = now();
    pid_t pid = fork();
    if (pid == 0) {
        int fd = out_path ? open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644) : open("/dev/null", O_WRONLY);
        if (fd < 0)
            _exit(126);
        dup2(fd, 1);
        execvp(argv[0], argv);
        _exit(127);
    }
    int st = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    wait4(pid, &st, 0, &ru);
    double t = now() - t0;
    *rss_kb = ru.ru_maxrss;
    *status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return t;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static long file_size(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 ? (long)st.st_size : -1;
}

int main(int argc, char **argv)
{
    const char *case_name = "1b", *dir = getenv("BENCH_DIR");
    int runs = 3, threads = 2, csv = 0, keep = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--case") && i + 1 < argc)
            case_name = argv[++i];
        else if (!strcmp(argv[i], "--runs") && i + 1 < argc)
            runs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--csv"))
            csv = 1;
        else if (!strcmp(argv[i], "--keep"))
            keep = 1;
        else {
            fprintf(stderr, "usage: bench_merge [--case small|1b|8b] [--runs N] [--threads N] [--dir DIR] [--csv] [--keep]\n");
            return 2;
        }
    }
    const bench_case *bc = NULL;
    for (size_t i = 0; i < sizeof CASES / sizeof *CASES; i++)
        if (!strcmp(CASES[i].name, case_name))
            bc = &CASES[i];
    if (bc == NULL || runs < 1 || threads < 1) {
        fprintf(stderr, "bench_merge: unknown case '%s' (small, 1b, 8b) or bad --runs/--threads\n", case_name);
        return 2;
    }
    /* tools beside this binary: BUILD/bench/gen_model and BUILD/lora-merge */
    char self[4096], gen[4200], bin[4200];
    snprintf(self, sizeof self, "%s", argv[0]);
    char *bdir = dirname(self);
    snprintf(gen, sizeof gen, "%s/gen_model", bdir);
    snprintf(bin, sizeof bin, "%s/../lora-merge", bdir);
    char tmpl[] = "/tmp/lm-bench-XXXXXX";
    int own_dir = 0;
    if (dir == NULL || !*dir) {
        dir = mkdtemp(tmpl);
        own_dir = 1;
    }
    char mdir[4300], base[4400], adapter[4400], out[4400];
    snprintf(mdir, sizeof mdir, "%s/%s-r%ld", dir, bc->name, bc->rank);
    snprintf(base, sizeof base, "%s/base/model.safetensors", mdir);
    snprintf(adapter, sizeof adapter, "%s/adapter", mdir);
    snprintf(out, sizeof out, "%s/out.safetensors", dir);
    mkdir(dir, 0777);
    if (file_size(base) <= 0) {
        char cmd[9000];
        snprintf(cmd, sizeof cmd,
                 "'%s' --out '%s' --hidden %ld --inter %ld --layers %ld --vocab %ld --heads %ld --kv-heads %ld "
                 "--rank %ld --alpha %ld --dtype bf16 --targets all",
                 gen, mdir, bc->hidden, bc->inter, bc->layers, bc->vocab, bc->heads, bc->kv, bc->rank, 2 * bc->rank);
        fprintf(stderr, "bench: generating the %s model in %s ...\n", bc->name, mdir);
        double t0 = now();
        if (system(cmd) != 0) {
            fprintf(stderr, "bench: generation failed (disk space? the 8b case needs ~40 GB)\n");
            return 1;
        }
        fprintf(stderr, "bench: generated in %.1f s\n", now() - t0);
    }
    double bytes = (double)file_size(base);
    /* low-rank work: 2 * r * in * out per adapted matrix */
    long hd = bc->hidden / bc->heads, kvd = bc->kv * hd;
    double per_layer = 2.0 * (double)bc->rank *
                       ((double)bc->hidden * bc->hidden * 2 + (double)kvd * bc->hidden * 2 + 3.0 * bc->inter * bc->hidden);
    double gflop = per_layer * (double)bc->layers * 1e-9;

    /* page cache warm: both commands read the base from memory */
    char *cat_warm[] = {"cat", base, NULL};
    long rss;
    int st;
    run_timed(cat_warm, NULL, &rss, &st);
    char thr[16];
    snprintf(thr, sizeof thr, "%d", threads);
    char *cat_argv[] = {"cat", base, NULL};
    char *merge_argv[] = {bin, "-q", "--threads", thr, base, adapter, out, NULL};
    /* the same merge without the correct-rounding certification (hidden switch): what exactness costs */
    char *loose_argv[] = {bin, "-q", "--exactness-off", "--threads", thr, base, adapter, out, NULL};
    double *tf = calloc((size_t)runs, sizeof *tf), *tm = calloc((size_t)runs, sizeof *tm);
    double *tx = calloc((size_t)runs, sizeof *tx);
    long rss_f = 0, rss_m = 0;
    for (int r = 0; r < runs; r++) {
        unlink(out);
        sync();
        tf[r] = run_timed(cat_argv, out, &rss, &st);
        if (st != 0) {
            fprintf(stderr, "bench: cat failed\n");
            return 1;
        }
        rss_f = rss > rss_f ? rss : rss_f;
        unlink(out);
        sync();
        tm[r] = run_timed(merge_argv, NULL, &rss, &st);
        if (st != 0) {
            fprintf(stderr, "bench: lora-merge failed with status %d\n", st);
            return 1;
        }
        rss_m = rss > rss_m ? rss : rss_m;
        if (file_size(out) <= 0) {
            fprintf(stderr, "bench: no output\n");
            return 1;
        }
        unlink(out);
        sync();
        tx[r] = run_timed(loose_argv, NULL, &rss, &st);
        if (st != 0) {
            fprintf(stderr, "bench: lora-merge --exactness-off failed with status %d\n", st);
            return 1;
        }
    }
    unlink(out);
    sync();
    double mf = median(tf, runs), mm = median(tm, runs), mx = median(tx, runs);
    lm_kernels k;
    lm_kernels_select(&k, NULL);
    char cpu[256];
    lm_cpu_name(cpu, sizeof cpu);
    const char *rev = getenv("LM_GIT_REV");
    printf("machine: %s, %ld cores, kernels %s, %s, threads %d, rev %s\n", cpu, sysconf(_SC_NPROCESSORS_ONLN), k.name,
           lm_blas_name(), threads, rev && *rev ? rev : "?");
    double ratio = mm / mf, rss_mb = (double)rss_m / 1024.0;
    if (csv) {
        printf("case,bytes,runs,floor_median_s,floor_min_s,floor_max_s,merge_median_s,merge_min_s,merge_max_s,ratio,"
               "merge_gb_s,lowrank_gflop_s,merge_peak_rss_mb,floor_peak_rss_mb,exactness_off_median_s,exactness_cost\n");
        printf("%s,%.0f,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.2f,%.2f,%.1f,%.1f,%.3f,%.4f\n", bc->name, bytes, runs, mf,
               tf[0], tf[runs - 1], mm, tm[0], tm[runs - 1], ratio, bytes * 1e-9 / mm, gflop / mm, rss_mb,
               rss_f / 1024.0, mx, mm / mx - 1);
    } else {
        printf("%-6s %9s %22s %22s %7s %7s %9s %10s %s\n", "case", "GB", "copy floor s (min-max)", "merge s (min-max)",
               "ratio", "GB/s", "GFLOP/s", "peak RSS", "targets");
        char f1[64], m1[64];
        snprintf(f1, sizeof f1, "%.3f (%.3f-%.3f)", mf, tf[0], tf[runs - 1]);
        snprintf(m1, sizeof m1, "%.3f (%.3f-%.3f)", mm, tm[0], tm[runs - 1]);
        char targets[128] = "(no target for this case)";
        if (bc->max_ratio > 0)
            snprintf(targets, sizeof targets, "ratio<=%.2f %s, RSS<=%.0f MB %s", bc->max_ratio,
                     ratio <= bc->max_ratio ? "ok" : "MISSED", bc->max_rss_mb, rss_mb <= bc->max_rss_mb ? "ok" : "MISSED");
        printf("%-6s %9.2f %22s %22s %7.3f %7.2f %9.1f %7.0f MB %s\n", bc->name, bytes * 1e-9, f1, m1, ratio,
               bytes * 1e-9 / mm, gflop / mm, rss_mb, targets);
        printf("exactness: merge %.3f s exact, %.3f s (%.3f-%.3f) with --exactness-off: it costs %+.1f%%%s\n", mm, mx,
               tx[0], tx[runs - 1], 100 * (mm / mx - 1),
               bc->max_ratio > 0 ? (mm / mx - 1 <= 0.05 ? " (target <= 5% ok)" : " (target <= 5% MISSED)") : "");
    }
    free(tf);
    free(tm);
    free(tx);
    if (own_dir && !keep) {
        char cmd[4400];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0)
            fprintf(stderr, "bench: could not remove %s\n", dir);
    }
    return 0;
}
