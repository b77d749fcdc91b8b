/* SPDX-License-Identifier: MIT */
/* bench_merge.c : the merge benchmark.  Generates a model of a given shape (bench/gen_model,
 * cached under BENCH_DIR), then alternates the copy floor (`cat base > out`) and the merge
 * (`lora-merge -q base adapter out`) several times, the output deleted and synced before every
 * run, and prints median and min-max wall times, the ratio merge/floor, GB/s, GFLOP/s of the
 * low-rank work and the peak resident memory of each (getrusage of the child); for 1b/8b/fp8 also
 * how busy the machine was during the timed runs (CPU pressure, PSI) and the memory's state.
 *
 * --case methods (and methods-small): the same base, then an adapter of every adapter type
 * (bench/gen_adapter); per type, --dry-run once (the plan's GFLOP), then the LoRA r=16 merge and
 * that type's merge alternated; prints the type's time, its ratio to the LoRA merge of the same
 * runs, GFLOP/s, peak RSS, how much of the base the merge changed, and issue 9's targets.
 *
 *   bench_merge [--case 1b|8b|small|methods|methods-small|moe|moe-fused|fp8|batch|batch-small|shards|shards-1b] [--runs N] [--threads N] [--dir DIR]
 *               [--types T1,T2...] [--csv] [--keep]
 *   BENCH_DIR=DIR caches the generated models (default: a temporary directory, removed after);
 *   BENCH_TYPES=T1,T2 (or --types) limits the methods case to some types. */
#include "gemm_tile.h"
#include "gen_common.h"
#include "lm_kernels.h"
#include "lm_xxh128.h"
#include "shards.h"
#include "lora_merge.h"

#include <cJSON.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    const char *name, *shape; /* shape: the generated model (cached as DIR/<shape>-r<rank>) */
    long hidden, inter, layers, vocab, heads, kv, rank;
    double max_ratio, max_rss_mb; /* the targets of the speed issue */
    int methods;                  /* every adapter type against LoRA (issue 9) */
    long experts;                 /* > 0: a Qwen3-MoE-shaped model, experts per expert on disk, the
                                     adapter through target_parameters (issue 13) */
    int fused;                    /* experts stored fused [E, 2I, H], [E, H, I] (transformers v5) */
    const char *quant;            /* a quantized base (gen_model --quant: "fp8"), or NULL (issue 12) */
    int batch;                    /* > 0: that many LoRA adapters, one `lora-merge batch` against as many
                                     merges one after another (issue 14) */
    int shards;                   /* > 0: the base in that many shards, 4 `--shards i/4` workers of 1
                                     thread at once (then finalize) against one merge (issue 14) */
} bench_case;

static const bench_case CASES[] = {
    {"small", "small", 1024, 2816, 8, 32000, 16, 4, 16, 0, 0, 0, 0, 0, NULL, 0, 0}, /* a quick look: no target */
    {"1b", "1b", 2048, 5632, 22, 32000, 32, 4, 16, 1.25, 256, 0, 0, 0, NULL, 0, 0},
    {"8b", "8b", 4096, 14336, 32, 128256, 32, 8, 16, 1.30, 1024, 0, 0, 0, NULL, 0, 0},
    {"methods", "1b", 2048, 5632, 22, 32000, 32, 4, 16, 0, 256, 1, 0, 0, NULL, 0, 0},
    {"methods-small", "small", 1024, 2816, 8, 32000, 16, 4, 16, 0, 0, 1, 0, 0, NULL, 0, 0}, /* no target */
    {"moe", "moe", 1024, 2816, 4, 32000, 16, 4, 16, 1.5, 256, 0, 8, 0, NULL, 0, 0},
    {"moe-fused", "moe-fused", 1024, 2816, 4, 32000, 16, 4, 16, 1.5, 256, 0, 8, 1, NULL, 0, 0},
    /* block FP8 (128x128) 1.1B: dequantize, merge, requantize every linear weight */
    {"fp8", "1b-fp8", 2048, 5632, 22, 32000, 32, 4, 16, 1.5, 256, 0, 0, 0, "fp8", 0, 0},
    /* issue 14: 8 LoRA adapters on the 1.1B base in one pass, at most 0.5x the 8 merges */
    {"batch", "1b", 2048, 5632, 22, 32000, 32, 4, 16, 0.5, 0, 0, 0, 0, NULL, 8, 0},
    {"batch-small", "small", 1024, 2816, 8, 32000, 16, 4, 16, 0, 0, 0, 0, 0, NULL, 8, 0}, /* a quick look */
    /* issue 14: the 8B base in 8 shards, 4 local 1-thread workers within 1.2x one 2-thread merge */
    {"shards", "8b", 4096, 14336, 32, 128256, 32, 8, 16, 1.2, 0, 0, 0, 0, NULL, 0, 8},
    {"shards-1b", "1b", 2048, 5632, 22, 32000, 32, 4, 16, 1.2, 0, 0, 0, 0, NULL, 0, 8}, /* the same on the 1.1B */
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* runs argv with stdout to out_path (or /dev/null); returns wall seconds, *rss_kb the child's peak */
static double g_last_cpu; /* user + system CPU seconds of the last run_timed() (its children included) */
static double g_last_sys; /* of which system */
static double g_last_read_gb; /* GB it read from the disk (not the page cache): ru_inblock */
static double g_last_cpu_wait; /* seconds of it during which some runnable task waited for a CPU
                                  (/proc/pressure/cpu "some"; NAN without PSI): the machine was busy */

/* /proc/pressure/cpu's "some" total in seconds (NAN when the kernel has no PSI) */
static double psi_cpu_some(void)
{
    FILE *f = fopen("/proc/pressure/cpu", "r");
    unsigned long long us = 0;
    int ok = f != NULL && fscanf(f, "some avg10=%*f avg60=%*f avg300=%*f total=%llu", &us) == 1;
    if (f != NULL)
        fclose(f);
    return ok ? 1e-6 * (double)us : NAN;
}

static double run_timed(char *const *argv, const char *out_path, long *rss_kb, int *status)
{
    const double p0 = psi_cpu_some();
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
    g_last_cpu_wait = psi_cpu_some() - p0;
    g_last_read_gb = (double)ru.ru_inblock * 512e-9;
    g_last_sys = (double)ru.ru_stime.tv_sec + 1e-6 * ru.ru_stime.tv_usec;
    g_last_cpu = (double)ru.ru_utime.tv_sec + 1e-6 * ru.ru_utime.tv_usec + g_last_sys;
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

static void print_machine(int threads)
{
    lm_kernels k;
    lm_kernels_select(&k, NULL);
    char cpu[256];
    lm_cpu_name(cpu, sizeof cpu);
    const char *rev = getenv("LM_GIT_REV");
    printf("machine: %s, %ld cores, kernels %s, %s, threads %d, rev %s\n", cpu, sysconf(_SC_NPROCESSORS_ONLN), k.name,
           lm_blas_name(), threads, rev && *rev ? rev : "?");
    fflush(stdout);
}

static void remove_own_dir(int remove, const char *dir)
{
    if (!remove)
        return;
    char cmd[4400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "bench: could not remove %s\n", dir);
}

/* ---- --case methods --------------------------------------------------------------------- */

/* issue 9's configurations and targets (max_ratio 0: no target); options go to gen_adapter */
typedef struct {
    const char *type, *options;
    double max_ratio;
} method_case;

static const method_case METHOD_CASES[] = {
    {"lora", "--rank 16 --alpha 32 --targets all", 0}, /* the reference, generated again: ratio ~1 */
    {"dora", "--rank 16 --alpha 32 --targets all", 1.5},
    {"ia3", "--targets all", 1.5},
    {"loha", "--rank 16 --alpha 16 --targets all", 2.0},
    {"lokr", "--rank 16 --alpha 16 --factor -1 --targets all", 1.5},
    {"oft", "--block 32 --targets all", 2.0},
    {"hra", "--rank 8 --targets all", 2.0},
    {"boft", "--block 8 --targets all", 1.5},
    {"miss", "--rank 64 --targets all", 1.5},
    {"fourierft", "--n-frequency 1000 --targets qv", 1.5},
    {"vera", "--rank 256 --targets all", 6.0},
    {"road", "--block 64 --targets all", 1.5},
    {"adalora", "--rank 12 --alpha 8 --targets all", 0},
    {"randlora", "--rank 32 --alpha 640 --targets v_proj", 0},
    {"vblora", "--rank 4 --block 256 --targets all", 0},
    {"delora", "--rank 8 --targets all", 0},
    {"gralora", "--rank 32 --alpha 64 --targets all", 0},
    {"shira", "--rank 32 --targets all", 0},
    {"c3a", "--block 256 --targets all", 0},
    {"hira", "--rank 32 --targets all", 0},
    {"ln_tuning", "", 0},
    {"trainable_tokens", "", 0},
};
/* bump when gen_adapter's output changes: cached adapters are then generated again */
#define GEN_ADAPTER_VERSION "1"

/* what a merge changed: tensors whose bytes differ from the base, and over those, the share of
 * elements changed and the size of the change relative to the weights (root mean squares) */
typedef struct {
    size_t tensors;
    double elems, changed, d2, b2;
} diff_stats;

static void to_f32(const lm_kernels *k, lm_dtype dt, const uint8_t *src, float *dst, size_t n)
{
    if (dt == LM_DT_BF16)
        k->bf16_to_f32((const uint16_t *)src, dst, n);
    else if (dt == LM_DT_F16)
        k->f16_to_f32((const uint16_t *)src, dst, n);
    else
        memcpy(dst, src, n * sizeof *dst);
}

static int compare_files(const char *base_path, const char *out_path, const lm_kernels *k, diff_stats *ds)
{
    lm_err err;
    memset(ds, 0, sizeof *ds);
    lm_st_file *b = lm_st_open(base_path, &err), *o = b ? lm_st_open(out_path, &err) : NULL;
    const size_t CH = 1 << 20;
    float *fb = malloc(CH * sizeof *fb), *fo = malloc(CH * sizeof *fo);
    int rc = b && o && fb && fo ? 0 : -1;
    for (size_t i = 0; rc == 0 && i < lm_st_n_tensors(o); i++) {
        const lm_tensor_info *to = lm_st_tensor(o, i), *tb = lm_st_find(b, to->name, NULL);
        const uint8_t *po = lm_st_data(o) + to->begin, *pb = tb ? lm_st_data(b) + tb->begin : NULL;
        if (tb && to->end - to->begin == tb->end - tb->begin && memcmp(po, pb, to->end - to->begin) == 0)
            continue;
        ds->tensors++;
        if (tb == NULL || tb->dtype != to->dtype || tb->n_elems != to->n_elems ||
            (to->dtype != LM_DT_BF16 && to->dtype != LM_DT_F16 && to->dtype != LM_DT_F32))
            continue; /* added or converted: counted, not measured */
        size_t esz = lm_dtype_bits(to->dtype) / 8;
        for (uint64_t e = 0; e < to->n_elems; e += CH) {
            size_t n = to->n_elems - e < CH ? (size_t)(to->n_elems - e) : CH;
            to_f32(k, to->dtype, pb + e * esz, fb, n);
            to_f32(k, to->dtype, po + e * esz, fo, n);
            for (size_t j = 0; j < n; j++) { /* the conversions are exact: equal bits, equal elements */
                double d = (double)fo[j] - (double)fb[j];
                uint32_t xb, xo;
                memcpy(&xb, fb + j, sizeof xb);
                memcpy(&xo, fo + j, sizeof xo);
                ds->changed += xb != xo;
                ds->d2 += d * d;
                ds->b2 += (double)fb[j] * fb[j];
            }
            ds->elems += (double)n;
        }
    }
    free(fb);
    free(fo);
    lm_st_close(o);
    lm_st_close(b);
    return rc;
}

/* summary.<key> of lora-merge's --json report, or NAN */
static double json_summary(const char *path, const char *key)
{
    FILE *f = fopen(path, "rb");
    char *buf = f ? malloc(1 << 24) : NULL;
    size_t n = buf ? fread(buf, 1, (1 << 24) - 1, f) : 0;
    double v = NAN;
    if (buf) {
        buf[n] = '\0';
        cJSON *root = cJSON_Parse(buf);
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "summary"), key);
        if (cJSON_IsNumber(x))
            v = x->valuedouble;
        cJSON_Delete(root);
    }
    free(buf);
    if (f)
        fclose(f);
    return v;
}

/* generates dir/<type> unless it holds an adapter made with the same options */
static int ensure_adapter(const char *gen_adapter, const char *base, const char *adir, const method_case *mc)
{
    char stamp[4500], want[512], have[512] = "", wpath[4600];
    snprintf(stamp, sizeof stamp, "%s/bench-options.txt", adir);
    snprintf(want, sizeof want, "gen_adapter v" GEN_ADAPTER_VERSION " --type %s %s\n", mc->type, mc->options);
    snprintf(wpath, sizeof wpath, "%s/adapter_model.safetensors", adir);
    FILE *f = fopen(stamp, "r");
    if (f) {
        if (fgets(have, sizeof have, f) == NULL)
            have[0] = '\0';
        fclose(f);
    }
    if (file_size(wpath) > 0 && strcmp(have, want) == 0)
        return 0;
    char cmd[20000];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && '%s' --base '%s' --out '%s' --type %s %s 1>&2", adir, gen_adapter, base,
             adir, mc->type, mc->options);
    if (system(cmd) != 0)
        return -1;
    f = fopen(stamp, "w");
    if (f == NULL || fputs(want, f) < 0 || fclose(f) != 0)
        return -1;
    return 0;
}

static int run_methods(const bench_case *bc, const char *bdir, const char *bin, const char *dir, const char *mdir,
                       const char *base, const char *lora_adapter, const char *out, int runs, int threads, int csv,
                       const char *types)
{
    char gen_adapter[4200], thr[16], plan[4400];
    snprintf(gen_adapter, sizeof gen_adapter, "%s/gen_adapter", bdir);
    snprintf(thr, sizeof thr, "%d", threads);
    snprintf(plan, sizeof plan, "%s/plan.json", dir);
    lm_kernels k;
    lm_kernels_select(&k, NULL);
    int targets = bc->max_rss_mb > 0, n_failed = 0, n_targets = 0, n_met = 0;
    if (csv)
        printf("case,type,options,runs,merge_median_s,merge_min_s,merge_max_s,lora_median_s,lora_min_s,lora_max_s,"
               "ratio,lowrank_gflop,lowrank_gflop_s,merge_peak_rss_mb,lora_peak_rss_mb,changed_tensors,"
               "changed_elems_pct,rel_rms_change_pct,max_ratio,ratio_ok,rss_ok,status\n");
    else
        printf("%-16s %21s %21s %6s %6s %7s %8s %-19s %-24s %s\n", "type", "merge s (min-max)", "LoRA s (min-max)",
               "ratio", "GFLOP", "GFLOP/s", "peak RSS", "changed", "targets (issue 9)", "gen_adapter options");
    fflush(stdout);
    double *tm = calloc((size_t)runs, sizeof *tm), *tl = calloc((size_t)runs, sizeof *tl);
    for (size_t c = 0; c < sizeof METHOD_CASES / sizeof *METHOD_CASES; c++) {
        const method_case *mc = &METHOD_CASES[c];
        if (types && *types && !gen_in_list(types, mc->type, 1))
            continue;
        char adir[4400];
        snprintf(adir, sizeof adir, "%s/methods/%s", mdir, mc->type);
        const char *status = "ok";
        double gflop = NAN;
        long rss, rss_m = 0, rss_l = 0;
        int st = 0;
        diff_stats ds;
        memset(&ds, 0, sizeof ds);
        if (ensure_adapter(gen_adapter, base, adir, mc) != 0) {
            status = "generation failed";
        } else {
            /* the plan (and the check that --dry-run accepts what the merge will do) */
            char *dry_argv[] = {(char *)bin, "--dry-run", "--json", "--threads", thr, (char *)base, adir, (char *)out, NULL};
            run_timed(dry_argv, plan, &rss, &st);
            gflop = json_summary(plan, "lowrank_gflop");
            unlink(plan);
            if (st != 0)
                status = "dry run failed";
        }
        char *lora_argv[] = {(char *)bin, "-q", "--threads", thr, (char *)base, (char *)lora_adapter, (char *)out, NULL};
        char *type_argv[] = {(char *)bin, "-q", "--threads", thr, (char *)base, adir, (char *)out, NULL};
        for (int r = 0; r < runs && !strcmp(status, "ok"); r++) {
            unlink(out);
            sync();
            tl[r] = run_timed(lora_argv, NULL, &rss, &st);
            rss_l = rss > rss_l ? rss : rss_l;
            if (st != 0 || file_size(out) <= 0) {
                status = "LoRA merge failed";
                break;
            }
            unlink(out);
            sync();
            tm[r] = run_timed(type_argv, NULL, &rss, &st);
            rss_m = rss > rss_m ? rss : rss_m;
            if (st != 0 || file_size(out) <= 0)
                status = "merge failed";
        }
        if (!strcmp(status, "ok") && (compare_files(base, out, &k, &ds) != 0 || ds.tensors == 0))
            status = "output unchanged or unreadable";
        unlink(out);
        sync();
        if (strcmp(status, "ok") != 0) {
            n_failed++;
            if (csv)
                printf("%s,%s,%s,%d,,,,,,,,,,,,,,,,,,%s\n", bc->name, mc->type, mc->options, runs, status);
            else
                printf("%-16s FAILED: %s (see the messages above)\n", mc->type, status);
            fflush(stdout);
            continue;
        }
        double mm = median(tm, runs), ml = median(tl, runs), ratio = mm / ml, rss_mb = (double)rss_m / 1024.0;
        double elem_pct = ds.elems > 0 ? 100.0 * ds.changed / ds.elems : 0, rms_pct = ds.b2 > 0 ? 100.0 * sqrt(ds.d2 / ds.b2) : 0;
        int has_ratio = targets && mc->max_ratio > 0, ratio_ok = ratio <= mc->max_ratio, rss_ok = rss_mb <= bc->max_rss_mb;
        if (targets) {
            n_targets += 1 + has_ratio;
            n_met += rss_ok + (has_ratio && ratio_ok);
        }
        if (csv) {
            printf("%s,%s,%s,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.2f,%.2f,%.1f,%.1f,%zu,%.2f,%.3f,", bc->name, mc->type,
                   mc->options, runs, mm, tm[0], tm[runs - 1], ml, tl[0], tl[runs - 1], ratio, gflop, gflop / mm, rss_mb,
                   rss_l / 1024.0, ds.tensors, elem_pct, rms_pct);
            if (has_ratio)
                printf("%.2f,%d,", mc->max_ratio, ratio_ok);
            else
                printf(",,");
            if (targets)
                printf("%d,ok\n", rss_ok);
            else
                printf(",ok\n");
        } else {
            char m1[64], l1[64], gf[16] = "-", gs[16] = "-", chg[64], tg[96] = "(no target for this case)";
            snprintf(m1, sizeof m1, "%.3f (%.3f-%.3f)", mm, tm[0], tm[runs - 1]);
            snprintf(l1, sizeof l1, "%.3f (%.3f-%.3f)", ml, tl[0], tl[runs - 1]);
            if (gflop > 0) {
                snprintf(gf, sizeof gf, "%.1f", gflop);
                snprintf(gs, sizeof gs, "%.1f", gflop / mm);
            }
            snprintf(chg, sizeof chg, "%zu, %.2g%%, %.2g%%", ds.tensors, elem_pct, rms_pct);
            if (targets && has_ratio)
                snprintf(tg, sizeof tg, "<=%.1fx %s, <=%.0fMB %s", mc->max_ratio, ratio_ok ? "ok" : "MISSED",
                         bc->max_rss_mb, rss_ok ? "ok" : "MISSED");
            else if (targets)
                snprintf(tg, sizeof tg, "<=%.0fMB %s", bc->max_rss_mb, rss_ok ? "ok" : "MISSED");
            printf("%-16s %21s %21s %6.2f %6s %7s %5.0f MB %-19s %-24s %s\n", mc->type, m1, l1, ratio, gf, gs, rss_mb,
                   chg, tg, mc->options);
        }
        fflush(stdout);
    }
    if (!csv) {
        printf("ratio: the type's median merge time over the LoRA r=16 merge's median, alternated in the same runs;\n"
               "changed: tensors changed, %% of their elements changed, RMS of the change / RMS of those weights.\n"
               "not benchmarked: beft (adapts biases; this Llama-shaped base has none).\n");
        if (targets)
            printf("targets met: %d of %d%s\n", n_met, n_targets, n_failed ? " (and some types failed)" : "");
    }
    free(tm);
    free(tl);
    return n_failed ? 1 : 0;
}

/* ---- --case batch and --case shards (issue 14) ----------------------------------------- */
static void rm_rf(const char *path)
{
    char cmd[4600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    if (system(cmd) != 0)
        fprintf(stderr, "bench: could not remove %s\n", path);
    sync();
}

/* `bench_merge --floor-write BASE DIR K T` (run as a child, timed as the merges are): the least a
 * batch has to do, the base read once (from the page cache, 8 MB at a time into a buffer: no
 * mapping to fault in) and written to K files, by T threads each writing files t, t + T, ... (each
 * thread reads the chunk itself: a tee per thread).  No compute. */
typedef struct {
    int in;
    size_t n;
    const char *dir;
    int first, step, K, failed;
    uint64_t drop; /* > 0: written with the batch's drop-behind, this step (lm_st_writer_drop_behind) */
} floor_arg;

/* the drop-behind step a run writing K outputs of n bytes takes (exec.c: drop_behind_step), 0: none */
static uint64_t batch_drop_step(int K, uint64_t n)
{
    const char *e = getenv("LM_DROP_BEHIND");
    if (e != NULL && *e != '\0')
        return atoll(e) <= 0 ? 0 : atoll(e) == 1 ? (uint64_t)8 << 20 : (uint64_t)atoll(e);
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return K >= 1 && pages > 0 && page > 0 && (uint64_t)K * n > (uint64_t)pages * (uint64_t)page / 2 ? (uint64_t)8 << 20
                                                                                                     : 0;
}

static void *floor_thread(void *p)
{
    floor_arg *a = p;
    int fds[64], nf = 0;
    const size_t CH = (size_t)8 << 20;
    uint8_t *buf = malloc(CH);
    for (int i = a->first; i < a->K && nf < 64; i += a->step) {
        char path[4600];
        snprintf(path, sizeof path, "%s/f%d", a->dir, i);
        if ((fds[nf++] = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0)
            a->failed = 1;
    }
    for (size_t off = 0; off < a->n && buf != NULL && !a->failed;) {
        size_t want = a->n - off < CH ? a->n - off : CH;
        ssize_t got = pread(a->in, buf, want, (off_t)off);
        if (got <= 0) {
            a->failed = 1;
            break;
        }
        for (int f = 0; f < nf; f++)
            for (ssize_t done = 0; done < got && !a->failed;) {
                ssize_t k = pwrite(fds[f], buf + done, (size_t)(got - done), (off_t)(off + (size_t)done));
                if (k <= 0)
                    a->failed = 1;
                else
                    done += k;
            }
        const uint64_t end = off + (uint64_t)got, st = a->drop; /* st_writer.c's drop_behind, per file */
        if (st > 0 && end >= 3 * st)
            for (int f = 0; f < nf; f++) {
                const uint64_t b = (end - 2 * st) / st * st, lo = b > 4 * st ? b - 4 * st : 0;
                (void)posix_fadvise(fds[f], (off_t)lo, (off_t)(b - lo), POSIX_FADV_DONTNEED);
            }
        off += (size_t)got;
    }
    for (int f = 0; f < nf; f++)
        if (fds[f] >= 0 && close(fds[f]) != 0)
            a->failed = 1;
    a->failed |= buf == NULL;
    free(buf);
    return NULL;
}

static int floor_write(const char *base, const char *dir, int K, int T)
{
    int fd = open(base, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || K < 1 || K > 64 || T < 1 || T > 64)
        return 1;
    pthread_t th[64];
    floor_arg a[64];
    int failed = 0;
    for (int t = 0; t < T; t++) {
        a[t] = (floor_arg){fd, (size_t)st.st_size, dir, t, T, K, 0, batch_drop_step(K, (uint64_t)st.st_size)};
        if (pthread_create(&th[t], NULL, floor_thread, &a[t]) != 0)
            return 1;
    }
    for (int t = 0; t < T; t++) {
        pthread_join(th[t], NULL);
        failed |= a[t].failed;
    }
    return failed;
}

/* the page cache's counters (/proc/vmstat): v[0] pages reclaimed so far by kswapd, v[1] directly
 * by the allocating tasks (pgsteal_*), v[2] pages written back so far (nr_written), v[3] pages
 * dirty or under write-back now (nr_dirty + nr_writeback) */
static void vm_reclaimed(double v[4])
{
    FILE *f = fopen("/proc/vmstat", "r");
    char name[128];
    unsigned long long x;
    v[0] = v[1] = v[2] = v[3] = 0;
    while (f != NULL && fscanf(f, "%127s %llu", name, &x) == 2) {
        if (!strcmp(name, "pgsteal_kswapd"))
            v[0] = (double)x;
        else if (!strcmp(name, "pgsteal_direct"))
            v[1] = (double)x;
        else if (!strcmp(name, "nr_written"))
            v[2] = (double)x;
        else if (!strcmp(name, "nr_dirty") || !strcmp(name, "nr_writeback"))
            v[3] += (double)x;
    }
    if (f != NULL)
        fclose(f);
}

/* the memory's state: *free_gb free now (/proc/vmstat nr_free_pages), *reported_gb given back to
 * the host so far by free page reporting (NAN without it: not a virtual machine that reports) */
static void mem_state(double *free_gb, double *reported_gb)
{
    FILE *f = fopen("/proc/vmstat", "r");
    char name[128];
    unsigned long long x;
    *free_gb = *reported_gb = NAN;
    while (f != NULL && fscanf(f, "%127s %llu", name, &x) == 2)
        if (!strcmp(name, "nr_free_pages"))
            *free_gb = (double)x * (double)sysconf(_SC_PAGESIZE) * 1e-9;
    if (f != NULL)
        fclose(f);
    f = fopen("/sys/module/page_reporting/parameters/reported_kib", "r");
    if (f != NULL && fscanf(f, "%llu", &x) == 1)
        *reported_gb = (double)x * 1024e-9;
    if (f != NULL)
        fclose(f);
}

/* sha256 of a file (sha256sum), into hex[65]; "" when it cannot be read */
static void file_sha(const char *path, char hex[65])
{
    char cmd[4600];
    snprintf(cmd, sizeof cmd, "sha256sum '%s'", path);
    FILE *p = popen(cmd, "r");
    hex[0] = '\0';
    if (p != NULL && fscanf(p, "%64s", hex) != 1)
        hex[0] = '\0';
    if (p != NULL)
        pclose(p);
}

/* one timed phase of run_batch: started with no dirty pages (sync first, untimed), timed to its
 * exit (*t, *c, *sy: wall, CPU and system CPU seconds; *gb: GB it read from the disk) and, with
 * durable, to the end of the sync that follows (*td: the wall seconds until its outputs are on the
 * disk).  @return the exit status */
static int batch_phase(char *const *argv, int durable, double *t, double *c, double *sy, double *gb, double *td,
                       long *rss)
{
    int st = 0;
    sync();
    double t0 = now();
    *t = run_timed(argv, NULL, rss, &st);
    *c = g_last_cpu;
    *sy = g_last_sys;
    *gb = g_last_read_gb;
    if (durable)
        sync();
    *td = now() - t0;
    return st;
}

/* the median over the runs of x[r] / t[r] (0 where t[r] is 0); x and t are left as they are */
static double median_per_second(const double *x, const double *t, int runs)
{
    double *u = calloc((size_t)runs, sizeof *u), v = 0;
    if (u == NULL)
        return 0;
    for (int r = 0; r < runs; r++)
        u[r] = t[r] > 0 ? x[r] / t[r] : 0;
    v = median(u, runs);
    free(u);
    return v;
}

/* K LoRA adapters (r 16, every projection, seeds 1..K): 8 merges one after the other against
 * one batch of the same 8 jobs, and the two floors (the K outputs' bytes written, no compute),
 * in an order that alternates between runs.  Every phase starts with no dirty pages (the last
 * phase's outputs removed, then sync, not timed), so none pays for the writeback of another's
 * outputs; each is timed to its exit, and with BENCH_DURABLE=1 to the end of the sync after it
 * (its outputs on the disk: the disk then writes 4 K outputs a run).  The batch's outputs are compared with
 * the merges' by sha256 in the first run (after the timed phases); at most K outputs are on the
 * disk at a time. */
static int run_batch(const bench_case *bc, const char *bdir, const char *bin, const char *dir, const char *mdir,
                     const char *base, int runs, int threads)
{
    int K = bc->batch, durable = getenv("BENCH_DURABLE") != NULL && atoi(getenv("BENCH_DURABLE")) > 0;
    char gen_adapter[4200], thr[16], opts[64][128], adirs[64][4400], outs[64][4400], refs[64][4400];
    snprintf(gen_adapter, sizeof gen_adapter, "%s/gen_adapter", bdir);
    snprintf(thr, sizeof thr, "%d", threads);
    for (int i = 0; i < K; i++) {
        snprintf(opts[i], sizeof opts[i], "--rank 16 --alpha 32 --targets all --seed %d", i + 1);
        snprintf(adirs[i], sizeof adirs[i], "%s/batch/lora%d", mdir, i);
        snprintf(outs[i], sizeof outs[i], "%s/batch-out/o%d.safetensors", dir, i);
        snprintf(refs[i], sizeof refs[i], "%s/batch-ref/o%d.safetensors", dir, i);
        method_case mc = {"lora", opts[i], 0};
        if (ensure_adapter(gen_adapter, base, adirs[i], &mc) != 0) {
            fprintf(stderr, "bench: generating adapter %d failed\n", i);
            return 1;
        }
    }
    char od[4400], rd[4400];
    snprintf(od, sizeof od, "%s/batch-out", dir);
    snprintf(rd, sizeof rd, "%s/batch-ref", dir);
    char *bargv[8 + 3 * 64] = {(char *)bin, "batch", "-q", "--threads", thr, (char *)base};
    int nb = 6;
    for (int i = 0; i < K; i++) {
        bargv[nb++] = "--job";
        bargv[nb++] = adirs[i];
        bargv[nb++] = outs[i];
    }
    bargv[nb] = NULL;
    /* per phase (0: the K merges, 1: the batch, 2: tee, 3: the threaded floor) and run: wall to
     * exit, CPU, system CPU, GB read from the disk, wall to the outputs on the disk */
    enum { NP = 4 };
    double *t[NP], *c[NP], *sy[NP], *gb[NP], *d[NP], *rk[NP], *rd_[NP]; /* rk, rd_: GB reclaimed, kswapd and direct */
    double *wb[NP], *lf[NP]; /* GB written back during the phase; GB dirty or under write-back at its end */
    for (int p = 0; p < NP; p++) {
        wb[p] = calloc((size_t)runs, sizeof *wb[p]);
        lf[p] = calloc((size_t)runs, sizeof *lf[p]);
        rk[p] = calloc((size_t)runs, sizeof *rk[p]);
        rd_[p] = calloc((size_t)runs, sizeof *rd_[p]);
        t[p] = calloc((size_t)runs, sizeof *t[p]);
        c[p] = calloc((size_t)runs, sizeof *c[p]);
        sy[p] = calloc((size_t)runs, sizeof *sy[p]);
        gb[p] = calloc((size_t)runs, sizeof *gb[p]);
        d[p] = calloc((size_t)runs, sizeof *d[p]);
    }
    /* every phase starts with the base and the adapters in the page cache (read here, not timed):
     * the phase before may have pushed some of them out with its outputs */
    char warm_cmd[64 * 4500 + 4500];
    size_t wu = (size_t)snprintf(warm_cmd, sizeof warm_cmd, "exec cat '%s'", base);
    for (int i = 0; i < K; i++)
        wu += (size_t)snprintf(warm_cmd + wu, sizeof warm_cmd - wu, " '%s'/*", adirs[i]);
    char *wargv[] = {"sh", "-c", warm_cmd, NULL};
    /* the floor, two ways: the base copied to K files by one `tee` (one read, K writes of the same
     * bytes, one thread), and the same by `threads` threads (--floor-write) */
    char kk[16];
    snprintf(kk, sizeof kk, "%d", K);
    char *fargv[] = {"/proc/self/exe", "--floor-write", (char *)base, od, kk, thr, NULL};
    char tee_cmd[64 * 4500 + 4500];
    size_t tu = (size_t)snprintf(tee_cmd, sizeof tee_cmd, "exec tee");
    for (int i = 0; i < K; i++)
        tu += (size_t)snprintf(tee_cmd + tu, sizeof tee_cmd - tu, " '%s/t%d'", od, i);
    snprintf(tee_cmd + tu, sizeof tee_cmd - tu, " < '%s'", base);
    char *targv[] = {"sh", "-c", tee_cmd, NULL};
    long rss, rss_s = 0, rss_b = 0;
    int st = 0, same = 1;
    static char ref_sha[64][65], out_sha[64][65];
    static const int orders[2][NP] = {{0, 1, 2, 3}, {1, 0, 3, 2}};
    for (int r = 0; r < runs; r++) {
        for (int q = 0; q < NP; q++) {
            int p = orders[r % 2][q];
            rm_rf(od);
            rm_rf(rd);
            mkdir(od, 0777);
            mkdir(rd, 0777);
            run_timed(wargv, NULL, &rss, &st);
            double t0 = now(), c0 = 0, sd0 = 0, sy0 = 0, gb0 = 0, v0[4], v1[4];
            vm_reclaimed(v0);
            if (p == 0) { /* the K merges, one after the other: one phase (each pays for the last's writeback) */
                sync();
                t0 = now();
                for (int i = 0; i < K && st == 0; i++) {
                    char *margv[] = {(char *)bin, "-q", "--threads", thr, (char *)base, adirs[i], refs[i], NULL};
                    sd0 += run_timed(margv, NULL, &rss, &st);
                    c0 += g_last_cpu;
                    sy0 += g_last_sys;
                    gb0 += g_last_read_gb;
                    rss_s = rss > rss_s ? rss : rss_s;
                }
                if (durable)
                    sync();
                t[p][r] = sd0;
                c[p][r] = c0;
                sy[p][r] = sy0;
                gb[p][r] = gb0;
                d[p][r] = now() - t0;
            } else if (p == 1) {
                st = batch_phase(bargv, durable, &t[p][r], &c[p][r], &sy[p][r], &gb[p][r], &d[p][r], &rss);
                rss_b = rss > rss_b ? rss : rss_b;
            } else {
                st = batch_phase(p == 2 ? targv : fargv, durable, &t[p][r], &c[p][r], &sy[p][r], &gb[p][r], &d[p][r],
                                 &rss);
            }
            vm_reclaimed(v1);
            rk[p][r] = (v1[0] - v0[0]) * 4096e-9;
            rd_[p][r] = (v1[1] - v0[1]) * 4096e-9;
            wb[p][r] = (v1[2] - v0[2]) * 4096e-9;
            lf[p][r] = v1[3] * 4096e-9;
            if (st != 0) {
                fprintf(stderr, "bench: %s failed with status %d\n",
                        p == 0 ? "a merge" : p == 1 ? "the batch" : p == 2 ? "tee" : "the floor (--floor-write)", st);
                return 1;
            }
            for (int i = 0; i < K && r == 0 && p == 0; i++) /* the outputs' sha256, after the timed phase */
                file_sha(refs[i], ref_sha[i]);
            for (int i = 0; i < K && r == 0 && p == 1; i++)
                file_sha(outs[i], out_sha[i]);
            for (int i = 0; i < K && r == 0 && q == NP - 1; i++) /* both sides hashed by now */
                same &= ref_sha[i][0] != '\0' && strcmp(ref_sha[i], out_sha[i]) == 0;
        }
    }
    rm_rf(od);
    rm_rf(rd);
    double m[NP], mc[NP], md[NP], lo[NP], hi[NP], lod[NP], hid[NP], msy[NP], mgb[NP], cores[NP], mrk[NP], mrd[NP];
    double mwb[NP], mwr[NP], mlf[NP]; /* medians: GB written back, its rate (GB / s of the phase's wall), GB left */
    for (int p = 0; p < NP; p++) {
        mwr[p] = median_per_second(wb[p], t[p], runs);
        mwb[p] = median(wb[p], runs);
        mlf[p] = median(lf[p], runs);
        mrk[p] = median(rk[p], runs);
        mrd[p] = median(rd_[p], runs);
        cores[p] = median_per_second(c[p], t[p], runs); /* cores busy: each run's CPU / its wall */
        msy[p] = median(sy[p], runs);
        mgb[p] = median(gb[p], runs);
        m[p] = median(t[p], runs); /* sorts: [0] and [runs - 1] are then the least and the most */
        lo[p] = t[p][0];
        hi[p] = t[p][runs - 1];
        mc[p] = median(c[p], runs);
        md[p] = median(d[p], runs);
        lod[p] = d[p][0];
        hid[p] = d[p][runs - 1];
    }
    double ratio = m[1] / m[0];
    print_machine(threads);
    printf("%-6s %3s %26s %26s %7s %11s %11s %s\n", "case", "K", "K merges s (min-max)", "one batch s (min-max)",
           "ratio", "merge RSS", "batch RSS", "targets");
    char s1[64], b1[64];
    snprintf(s1, sizeof s1, "%.2f (%.2f-%.2f)", m[0], lo[0], hi[0]);
    snprintf(b1, sizeof b1, "%.2f (%.2f-%.2f)", m[1], lo[1], hi[1]);
    char tg[64] = "no target";
    if (bc->max_ratio > 0)
        snprintf(tg, sizeof tg, "ratio<=%.2f %s", bc->max_ratio, ratio <= bc->max_ratio ? "ok" : "MISSED");
    printf("%-6s %3d %26s %26s %7.3f %8.0f MB %8.0f MB %s; outputs %s\n", bc->name, K, s1, b1, ratio, rss_s / 1024.0,
           rss_b / 1024.0, tg, same ? "identical to the merges'" : "DIFFER from the merges'");
    printf("K merges: the %d merges one after another (each reads the base); one batch: `lora-merge batch` with the "
           "same %d jobs (one read of the base); base %.2f GB, page cache warm; %d runs, the phases' order alternated, "
           "each phase started after a sync (no dirty pages), medians\n", K, K, (double)file_size(base) * 1e-9, runs);
    printf("CPU (user+system, median): K merges %.2f s, one batch %.2f s (%.3f); of which system %.2f s and %.2f s; "
           "cores busy (CPU / wall, median of the runs) %.2f and %.2f of %d; GB read from the disk %.2f and %.2f\n",
           mc[0], mc[1], mc[1] / mc[0], msy[0], msy[1], cores[0], cores[1], threads, mgb[0], mgb[1]);
    if (durable)
        printf("to the outputs on the disk (the phase and the sync after it): K merges %.2f s (%.2f-%.2f), one batch "
               "%.2f s (%.2f-%.2f): ratio %.3f\n", md[0], lod[0], hid[0], md[1], lod[1], hid[1], md[1] / md[0]);
    double fl = m[2] < m[3] ? m[2] : m[3], fld = md[2] < md[3] ? md[2] : md[3];
    printf("the floor, writing the %d outputs' bytes and nothing else (same runs): `tee` of the base to %d files "
           "%.2f s wall (%.2f-%.2f), %.2f s CPU; the same by %d threads (a tee each, K/%d files%s) %.2f s wall "
           "(%.2f-%.2f), %.2f s CPU (system %.2f s and %.2f s)\n", K, K, m[2], lo[2], hi[2], mc[2], threads, threads,
           batch_drop_step(K, file_size(base)) > 0 ? ", with the batch's drop-behind" : "", m[3], lo[3], hi[3], mc[3],
           msy[2], msy[3]);
    if (durable)
        printf("the floors to the disk: `tee` %.2f s, threads %.2f s: %.3f of the K merges'\n", md[2], md[3],
               fld / md[0]);
    printf("page cache reclaimed during each phase (GB, median; by kswapd + directly by the phase's tasks): K merges "
           "%.2f + %.2f, one batch %.2f + %.2f, tee %.2f + %.2f, threads %.2f + %.2f\n", mrk[0], mrd[0], mrk[1], mrd[1],
           mrk[2], mrd[2], mrk[3], mrd[3]);
    printf("written back by the kernel during each phase (GB, median; at GB/s of the phase's wall), and left dirty or "
           "under write-back when it ended (GB): K merges %.2f (%.2f GB/s), %.2f left; one batch %.2f (%.2f GB/s), %.2f "
           "left; tee %.2f (%.2f GB/s), %.2f left; threads %.2f (%.2f GB/s), %.2f left\n", mwb[0], mwr[0], mlf[0],
           mwb[1], mwr[1], mlf[1], mwb[2], mwr[2], mlf[2], mwb[3], mwr[3], mlf[3]);
    printf("floor ratio (the better floor / the K merges): %.3f; the batch / the floor: %.3f%s\n", fl / m[0],
           m[1] / fl,
           fl / m[0] > bc->max_ratio && bc->max_ratio > 0 ? "; the target ratio is below the floor: no batch can "
                                                           "meet it here (writing the outputs alone takes longer)" : "");
    for (int p = 0; p < NP; p++) {
        free(t[p]);
        free(c[p]);
        free(sy[p]);
        free(gb[p]);
        free(d[p]);
        free(rk[p]);
        free(rd_[p]);
        free(wb[p]);
        free(lf[p]);
    }
    return same ? 0 : 1;
}

/* GB/s of SHA-256 over one message in memory (OpenSSL), or with xxh of XXH3-128 (lm_xxh128.h, the
 * sidecars' hash), CPU time of this thread, so the machine's load does not count: what one
 * stream can do on this CPU.  With SHA-NI one message is bound by the latency of its rounds, not
 * by the bytes */
static double hash_one_stream_gbs(int xxh)
{
    const size_t n = (size_t)64 << 20;
    uint8_t *buf = malloc(n), md[32];
    unsigned n_md = 0;
    if (buf == NULL)
        return 0;
    for (size_t i = 0; i < n; i++)
        buf[i] = (uint8_t)(i * 131 + (i >> 11));
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        struct timespec a, b;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
        if (xxh) { /* the sidecars' XXH3-128 */
            char hex[33];
            lm_xxh128_of(buf, n, hex);
        } else {
            EVP_Digest(buf, n, md, &n_md, EVP_sha256(), NULL);
        }
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
        double t = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
        best = t > 0 && (double)n * 1e-9 / t > best ? (double)n * 1e-9 / t : best;
    }
    free(buf);
    return best;
}

/* the shards' sidecars (before finalize removes them): each shard's wall and CPU seconds as its
 * worker measured them.  @return the number of shards read, in name order (k) */
typedef struct {
    char name[128];
    double bytes, wall, cpu, hash; /* hash: CPU seconds of cpu spent on the sidecar's XXH3-128 */
} shard_time;

static int cmp_shard_time(const void *a, const void *b)
{
    return strcmp(((const shard_time *)a)->name, ((const shard_time *)b)->name);
}

static int read_shard_times(const char *out, shard_time *t, int max)
{
    char dir[4500];
    snprintf(dir, sizeof dir, "%s/.lora-merge-shards", out);
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *de;
    while (d != NULL && n < max && (de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (de->d_name[0] == '.' || len < 17 || strcmp(de->d_name + len - 17, ".safetensors.json") != 0)
            continue;
        char path[4800], buf[4096];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        FILE *f = fopen(path, "rb");
        size_t nb = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
        if (f)
            fclose(f);
        buf[nb] = '\0';
        cJSON *j = cJSON_Parse(buf);
        snprintf(t[n].name, sizeof t[n].name, "%.*s", (int)(len - 5), de->d_name);
        t[n].bytes = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(j, "bytes"));
        t[n].wall = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(j, "seconds"));
        t[n].cpu = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(j, "cpu_seconds"));
        const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "hash_cpu_seconds");
        t[n].hash = cJSON_IsNumber(h) ? h->valuedouble : 0;
        cJSON_Delete(j);
        n++;
    }
    if (d != NULL)
        closedir(d);
    qsort(t, (size_t)n, sizeof *t, cmp_shard_time);
    return n;
}

/* the base in bc->shards shards (made once by a merge with --max-shard-size); one 2-thread merge
 * of it against 4 workers of 1 thread started together, then finalize; per worker and per shard
 * its wall and CPU time (the machine is shared: CPU is the steady figure), and the speed-up N
 * machines would give */
static int run_shard_jobs(const bench_case *bc, const char *bin, const char *dir, const char *mdir, const char *base,
                          const char *adapter, int runs)
{
    char sbase[4400], stamp[4500], out[4400], size[64];
    snprintf(sbase, sizeof sbase, "%s/base-%dshards", mdir, bc->shards);
    snprintf(stamp, sizeof stamp, "%s/model.safetensors.index.json", sbase);
    snprintf(out, sizeof out, "%s/shards-out/", dir);
    snprintf(size, sizeof size, "%ld", file_size(base) / bc->shards + (1 << 20));
    long rss;
    int st = 0;
    /* BENCH_SHARDS_INPUT=file: no sharded copy of the base (half the disk): the merge and the
     * workers read the one base file and split the output by --max-shard-size (the same shards;
     * each worker still reads only its shards' tensors) */
    const char *input = getenv("BENCH_SHARDS_INPUT");
    int from_file = input != NULL && strcmp(input, "file") == 0;
    if (from_file) {
        snprintf(sbase, sizeof sbase, "%s", base);
        fprintf(stderr, "bench: workers read %s, output split by --max-shard-size %s\n", base, size);
    } else if (file_size(stamp) <= 0) {
        rm_rf(sbase);
        char *argv[] = {(char *)bin, "-q", "--allow-noop", "--max-shard-size", size, (char *)base, (char *)adapter, sbase, NULL};
        fprintf(stderr, "bench: writing the base in %d shards to %s ...\n", bc->shards, sbase);
        run_timed(argv, NULL, &rss, &st);
        if (st != 0) {
            fprintf(stderr, "bench: sharding the base failed (%d)\n", st);
            return 1;
        }
    }
    enum { W = 4, MAX_SHARDS = 256 };
    double *t1 = calloc((size_t)runs, sizeof *t1), *tw = calloc((size_t)runs, sizeof *tw);
    double *c1 = calloc((size_t)runs, sizeof *c1), *cw = calloc((size_t)runs, sizeof *cw);
    /* system CPU seconds, and page cache reclaimed (GB, kswapd + direct) during each side */
    double *s1 = calloc((size_t)runs, sizeof *s1), *sw = calloc((size_t)runs, sizeof *sw);
    double *rc1 = calloc((size_t)runs, sizeof *rc1), *rcw = calloc((size_t)runs, sizeof *rcw);
    double vr0[4], vr1[4];
    double wall[W] = {0}, cpu[W] = {0}, t_fin = 0, c_fin = 0, rd_w[W] = {0}, rd_1 = 0;
    static shard_time sh[MAX_SHARDS];
    int n_sh = 0;
    /* the base read through the page cache before each side (untimed): the 8B's base and output
     * do not both fit, so whichever runs second would otherwise find the base evicted by the
     * first one's output and read it from the disk */
    char warm_cmd[4600];
    snprintf(warm_cmd, sizeof warm_cmd, from_file ? "cat '%s' >/dev/null" : "cat '%s'/*.safetensors >/dev/null", sbase);
    for (int r = 0; r < runs; r++) {
        rm_rf(out);
        if (system(warm_cmd) != 0)
            fprintf(stderr, "bench: could not read the base through the cache\n");
        char *margv[] = {(char *)bin, "-q", "--threads", "2", sbase, (char *)adapter, out, NULL, NULL, NULL};
        if (from_file) { /* the same command with --max-shard-size SIZE before the paths */
            margv[4] = "--max-shard-size";
            margv[5] = size;
            margv[6] = sbase;
            margv[7] = (char *)adapter;
            margv[8] = out;
        }
        vm_reclaimed(vr0);
        t1[r] = run_timed(margv, NULL, &rss, &st);
        vm_reclaimed(vr1);
        rc1[r] = (vr1[0] - vr0[0] + vr1[1] - vr0[1]) * 4096e-9;
        c1[r] = g_last_cpu;
        s1[r] = g_last_sys;
        rd_1 = g_last_read_gb;
        if (st != 0) {
            fprintf(stderr, "bench: the 2-thread merge failed (%d)\n", st);
            return 1;
        }
        rm_rf(out);
        if (system(warm_cmd) != 0)
            fprintf(stderr, "bench: could not read the base through the cache\n");
        vm_reclaimed(vr0);
        double t0 = now();
        pid_t pid[W];
        double start[W];
        for (int w = 0; w < W; w++) {
            char spec[32];
            snprintf(spec, sizeof spec, "%d/%d", w, W);
            start[w] = now();
            if ((pid[w] = fork()) == 0) {
                if (from_file)
                    execl(bin, bin, "-q", "--threads", "1", "--max-shard-size", size, "--shards", spec, sbase, adapter,
                          out, (char *)NULL);
                else
                    execl(bin, bin, "-q", "--threads", "1", "--shards", spec, sbase, adapter, out, (char *)NULL);
                _exit(127);
            }
        }
        cw[r] = sw[r] = 0;
        for (int done = 0; done < W; done++) {
            struct rusage ru;
            int wst;
            pid_t p = wait4(-1, &wst, 0, &ru);
            for (int w = 0; w < W; w++)
                if (pid[w] == p) {
                    wall[w] = now() - start[w];
                    cpu[w] = (double)ru.ru_utime.tv_sec + 1e-6 * ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_sec +
                             1e-6 * ru.ru_stime.tv_usec;
                    cw[r] += cpu[w];
                    sw[r] += (double)ru.ru_stime.tv_sec + 1e-6 * ru.ru_stime.tv_usec;
                    rd_w[w] = (double)ru.ru_inblock * 512e-9;
                    if (!WIFEXITED(wst) || WEXITSTATUS(wst) != 0) {
                        fprintf(stderr, "bench: worker %d failed\n", w);
                        return 1;
                    }
                }
        }
        n_sh = read_shard_times(out, sh, MAX_SHARDS);
        char *fargv[] = {(char *)bin, "-q", "finalize", out, NULL};
        double tf0 = now();
        run_timed(fargv, NULL, &rss, &st);
        t_fin = now() - tf0;
        c_fin = g_last_cpu;
        cw[r] += c_fin;
        sw[r] += g_last_sys;
        tw[r] = now() - t0;
        vm_reclaimed(vr1);
        rcw[r] = (vr1[0] - vr0[0] + vr1[1] - vr0[1]) * 4096e-9;
        if (st != 0) {
            fprintf(stderr, "bench: finalize failed (%d)\n", st);
            return 1;
        }
    }
    rm_rf(out);
    double m1 = median(t1, runs), mw = median(tw, runs), ratio = mw / m1;
    double mc1 = median(c1, runs), mcw = median(cw, runs);
    print_machine(2);
    printf("%-6s %6s %24s %30s %7s %s\n", "case", "shards", "one merge 2 thr s", "4 workers 1 thr + finalize s", "ratio",
           "targets");
    char a[64], b[64];
    snprintf(a, sizeof a, "%.2f (%.2f-%.2f)", m1, t1[0], t1[runs - 1]);
    snprintf(b, sizeof b, "%.2f (%.2f-%.2f)", mw, tw[0], tw[runs - 1]);
    printf("%-6s %6d %24s %30s %7.3f ratio<=%.2f %s\n", bc->name, bc->shards, a, b, ratio, bc->max_ratio,
           ratio <= bc->max_ratio ? "ok" : "MISSED");
    printf("CPU (user+system, median): one merge %.2f s, the 4 workers + finalize %.2f s (%.3f); of which system %.2f "
           "and %.2f s; page cache reclaimed (GB, kswapd + direct, median) %.2f and %.2f\n", mc1, mcw, mcw / mc1,
           median(s1, runs), median(sw, runs), median(rc1, runs), median(rcw, runs));
    /* per worker: its shards' own seconds (sidecars) and the rest, the fixed cost every worker pays
     * (headers, plan, the adapters hashed for the fingerprint, start and exit) */
    double fixed[W] = {0}, sum_cpu = 0, sum_hash = 0, max_fixed = 0;
    /* which worker wrote which shard: the tool's assignment (balanced by bytes), over the shards'
     * sizes from the sidecars; the same for N machines below */
    static uint64_t sh_bytes[MAX_SHARDS];
    static unsigned own_w[MAX_SHARDS], own_n[MAX_SHARDS];
    for (int k = 0; k < n_sh; k++) {
        sum_cpu += sh[k].cpu;
        sum_hash += sh[k].hash;
        sh_bytes[k] = (uint64_t)sh[k].bytes;
    }
    if (lm_shards_owners(sh_bytes, (size_t)n_sh, W, own_w) != 0)
        return 1;
    for (int w = 0; w < W; w++) {
        double sc = 0, swl = 0;
        int ns = 0;
        for (int k = 0; k < n_sh; k++) {
            if (own_w[k] != (unsigned)w)
                continue;
            sc += sh[k].cpu;
            swl += sh[k].wall;
            ns++;
        }
        fixed[w] = cpu[w] - sc;
        max_fixed = fixed[w] > max_fixed ? fixed[w] : max_fixed;
        printf("  worker %d/%d (last run): %.2f s wall, %.2f s CPU: %d shards %.2f s wall %.2f s CPU, the rest %.2f s "
               "CPU; %.2f GB read from the disk\n", w, W, wall[w], cpu[w], ns, swl, sc, fixed[w], rd_w[w]);
    }
    double rd_all = 0;
    for (int w = 0; w < W; w++)
        rd_all += rd_w[w];
    printf("  read from the disk, not the page cache (the base was read through the cache before each side; base and "
           "output do not both fit in memory): the one merge %.2f GB, the workers %.2f GB (last run)\n", rd_1, rd_all);
    for (int k = 0; k < n_sh; k++)
        printf("  shard %s: %.2f GB, %.2f s wall, %.2f s CPU (%.2f s of it its XXH3-128, %.2f GB/s) (worker %d)\n",
               sh[k].name, sh[k].bytes * 1e-9, sh[k].wall, sh[k].cpu, sh[k].hash,
               sh[k].hash > 0 ? sh[k].bytes * 1e-9 / sh[k].hash : 0.0, (int)own_w[k]);
    printf("  finalize: %.2f s wall, %.2f s CPU (default check: size and identity, no shard read back)\n", t_fin,
           c_fin);
    /* the workers' CPU by phase (last run), against the one merge's */
    double c_all = 0;
    for (int w = 0; w < W; w++)
        c_all += cpu[w];
    printf("CPU by phase (last run): the shards' merge work %.2f s (the one merge: %.2f s), their sidecar hash %.2f s "
           "(XXH3-128, hashed as written), the workers' fixed costs %.2f s (%d x ~%.2f: headers, plan, fingerprint), finalize "
           "%.2f s; total %.2f s\n", sum_cpu - sum_hash, mc1, sum_hash, c_all - sum_cpu, W, (c_all - sum_cpu) / W, c_fin,
           c_all + c_fin);
    double bytes_all = 0;
    for (int k = 0; k < n_sh; k++)
        bytes_all += sh[k].bytes;
    printf("sidecar hash (XXH3-128): the shards hashed at %.2f GB/s of CPU; in memory on this CPU (no I/O) "
           "XXH3-128 %.2f GB/s, one SHA-256 message (OpenSSL, what a plain sha256 of a shard is bound by) %.2f GB/s\n",
           sum_hash > 0 ? bytes_all * 1e-9 / sum_hash : 0.0, hash_one_stream_gbs(1), hash_one_stream_gbs(0));
    /* N machines, each running worker i alone, CPU-bound (storage that keeps up; the machine here
     * is shared, so CPU seconds are the steady measure): worker i takes its shards' CPU seconds
     * plus the fixed cost, then finalize; against the one merge's CPU seconds.  Both sides are
     * CPU per process, so more threads per machine scale them alike */
    printf("expected on N machines (CPU-bound: worker i = its shards' CPU + the fixed %.2f s, then finalize %.2f s "
           "CPU; against the one merge's %.2f s CPU):", max_fixed, c_fin, mc1);
    for (int N = 2; N <= 16 && sum_cpu > 0; N *= 2) {
        double worst = 0;
        if (lm_shards_owners(sh_bytes, (size_t)n_sh, (unsigned)N, own_n) != 0)
            return 1;
        for (int i = 0; i < N; i++) {
            double si = 0;
            for (int k = 0; k < n_sh; k++)
                if (own_n[k] == (unsigned)i)
                    si += sh[k].cpu;
            worst = si > worst ? si : worst;
        }
        double tn = worst + max_fixed + c_fin;
        printf(" N=%d %.2f s (%.1fx)", N, tn, mc1 / tn);
    }
    printf("\n");
    free(t1);
    free(tw);
    free(c1);
    free(cw);
    free(s1);
    free(sw);
    free(rc1);
    free(rcw);
    return 0;
}

int main(int argc, char **argv)
{
    const char *case_name = "1b", *dir = getenv("BENCH_DIR"), *types = getenv("BENCH_TYPES");
    int runs = 3, threads = 2, csv = 0, keep = 0;
    if (argc == 6 && !strcmp(argv[1], "--floor-write")) /* the batch's floor, as a timed child (run_batch) */
        return floor_write(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]));
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--case") && i + 1 < argc)
            case_name = argv[++i];
        else if (!strcmp(argv[i], "--runs") && i + 1 < argc)
            runs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--types") && i + 1 < argc)
            types = argv[++i];
        else if (!strcmp(argv[i], "--csv"))
            csv = 1;
        else if (!strcmp(argv[i], "--keep"))
            keep = 1;
        else {
            fprintf(stderr, "usage: bench_merge [--case small|1b|8b|methods|methods-small|moe|moe-fused|fp8|batch|batch-small|shards|shards-1b] [--runs N] [--threads N] "
                            "[--dir DIR] [--types T1,T2...] [--csv] [--keep]\n");
            return 2;
        }
    }
    const bench_case *bc = NULL;
    for (size_t i = 0; i < sizeof CASES / sizeof *CASES; i++)
        if (!strcmp(CASES[i].name, case_name))
            bc = &CASES[i];
    if (bc == NULL || runs < 1 || threads < 1) {
        fprintf(stderr, "bench_merge: unknown case '%s' (small, 1b, 8b, methods, methods-small, moe, moe-fused, fp8, batch, batch-small, shards, shards-1b) or bad --runs/--threads\n",
                case_name);
        return 2;
    }
    /* tools beside this binary: BUILD/bench/gen_model, gen_adapter and BUILD/lora-merge */
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
    snprintf(mdir, sizeof mdir, "%s/%s-r%ld", dir, bc->shape, bc->rank);
    snprintf(base, sizeof base, "%s/base/model.safetensors", mdir);
    snprintf(adapter, sizeof adapter, "%s/adapter", mdir);
    snprintf(out, sizeof out, "%s/out.safetensors", dir);
    mkdir(dir, 0777);
    if (file_size(base) <= 0) {
        char cmd[9000];
        snprintf(cmd, sizeof cmd,
                 "'%s' --out '%s' --hidden %ld --inter %ld --layers %ld --vocab %ld --heads %ld --kv-heads %ld "
                 "--rank %ld --alpha %ld --dtype bf16 --targets all --experts %ld%s%s%s",
                 gen, mdir, bc->hidden, bc->inter, bc->layers, bc->vocab, bc->heads, bc->kv, bc->rank, 2 * bc->rank,
                 bc->experts, bc->fused ? " --fused-experts" : "", bc->quant ? " --quant " : "", bc->quant ? bc->quant : "");
        fprintf(stderr, "bench: generating the %s model in %s ...\n", bc->shape, mdir);
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
                       ((double)bc->hidden * bc->hidden * 2 + (double)kvd * bc->hidden * 2 +
                        3.0 * bc->inter * bc->hidden * (double)(bc->experts ? bc->experts : 1));
    double gflop = per_layer * (double)bc->layers * 1e-9;

    /* page cache warm: both commands read the base from memory */
    char *cat_warm[] = {"cat", base, NULL};
    long rss;
    int st;
    run_timed(cat_warm, NULL, &rss, &st);
    if (bc->batch > 0) {
        int rc = run_batch(bc, bdir, bin, dir, mdir, base, runs, threads);
        remove_own_dir(own_dir && !keep, dir);
        return rc;
    }
    if (bc->shards > 0) {
        int rc = run_shard_jobs(bc, bin, dir, mdir, base, adapter, runs);
        remove_own_dir(own_dir && !keep, dir);
        return rc;
    }
    if (bc->methods) {
        print_machine(threads);
        int rc = run_methods(bc, bdir, bin, dir, mdir, base, adapter, out, runs, threads, csv, types);
        remove_own_dir(own_dir && !keep, dir);
        return rc;
    }
    char thr[16];
    snprintf(thr, sizeof thr, "%d", threads);
    char *cat_argv[] = {"cat", base, NULL};
    char *merge_argv[] = {bin, "-q", "--threads", thr, base, adapter, out, NULL};
    /* the same merge without the correct-rounding certification (hidden switch): what exactness costs */
    char *loose_argv[] = {bin, "-q", "--exactness-off", "--threads", thr, base, adapter, out, NULL};
    double *tf = calloc((size_t)runs, sizeof *tf), *tm = calloc((size_t)runs, sizeof *tm);
    double *tx = calloc((size_t)runs, sizeof *tx);
    /* CPU seconds (user + system) of each run: on a loaded machine the wall times mostly say how
     * busy it was, the CPU times what each command cost */
    double *cf = calloc((size_t)runs, sizeof *cf), *cm = calloc((size_t)runs, sizeof *cm);
    double *cx = calloc((size_t)runs, sizeof *cx);
    /* system CPU seconds, and the ratio merge / floor of each run (the two timed one after the other) */
    double *sf = calloc((size_t)runs, sizeof *sf), *sm = calloc((size_t)runs, sizeof *sm);
    double *pr = calloc((size_t)runs, sizeof *pr);
    /* the share of each timed run's wall during which some runnable task waited for a CPU (PSI):
     * the floor is one thread and the merge two, so a busy machine (another job, write-back)
     * slows the merge far more than the floor; and the runs with the merge under 10% */
    double *wf = calloc((size_t)runs, sizeof *wf), *wm = calloc((size_t)runs, sizeof *wm);
    double *qr = calloc((size_t)runs, sizeof *qr);
    int n_quiet = 0;
    double free0, rep0, free1, rep1;
    long rss_f = 0, rss_m = 0;
    /* Every timed command writes OUT just after the previous one's OUT was deleted, so that each
     * gets the page cache the last one freed: the first floor too, after this untimed copy (on a
     * virtual machine, memory free for a few seconds is given back to the host, and writing into
     * it costs a fault each page: 0.5 s more system time for 2.2 GB here). */
    unlink(out);
    sync();
    run_timed(cat_argv, out, &rss, &st);
    mem_state(&free0, &rep0);
    for (int r = 0; r < runs; r++) {
        unlink(out);
        sync();
        tf[r] = run_timed(cat_argv, out, &rss, &st);
        cf[r] = g_last_cpu;
        sf[r] = g_last_sys;
        wf[r] = g_last_cpu_wait / tf[r];
        if (st != 0) {
            fprintf(stderr, "bench: cat failed\n");
            return 1;
        }
        rss_f = rss > rss_f ? rss : rss_f;
        unlink(out);
        sync();
        tm[r] = run_timed(merge_argv, NULL, &rss, &st);
        cm[r] = g_last_cpu;
        sm[r] = g_last_sys;
        wm[r] = g_last_cpu_wait / tm[r];
        pr[r] = tm[r] / tf[r];
        if (wm[r] < 0.1 && wf[r] < 0.1)
            qr[n_quiet++] = pr[r];
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
        cx[r] = g_last_cpu;
        if (st != 0) {
            fprintf(stderr, "bench: lora-merge --exactness-off failed with status %d\n", st);
            return 1;
        }
    }
    unlink(out);
    sync();
    mem_state(&free1, &rep1);
    double mf = median(tf, runs), mm = median(tm, runs), mx = median(tx, runs), mpr = median(pr, runs);
    print_machine(threads);
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
        const double ccf = median(cf, runs), ccm = median(cm, runs), ccx = median(cx, runs);
        const double csf = median(sf, runs), csm = median(sm, runs);
        printf("CPU (user+system, median): floor %.2f s, merge %.2f s (%.2f per thread of %d), exactness off %.2f s "
               "(exactness %+.1f%% of CPU)\n", ccf, ccm, ccm / threads, threads, ccx, 100 * (ccm / ccx - 1));
        printf("  of which system: floor %.2f s, merge %.2f s (median)\n", csf, csm);
        /* the floor's own spread, and the ratio of each run's merge to the floor timed just before
         * it: on a busy machine these say whether the verdict above is the run's or the machine's */
        printf("floor spread: %.1f%% of its median (min-max); ratio of each run's merge to its own floor: median "
               "%.3f (%.3f-%.3f)%s\n", 100 * (tf[runs - 1] - tf[0]) / mf, mpr, pr[0], pr[runs - 1],
               bc->max_ratio > 0 && (mpr <= bc->max_ratio) != (ratio <= bc->max_ratio)
                   ? ": the two ratios disagree on the target, run again (BENCH_RUNS=7)" : "");
        /* what the machine was doing: CPU contention and the memory's state */
        const double pwf = median(wf, runs), pwm = median(wm, runs), qmed = n_quiet ? median(qr, n_quiet) : NAN;
        if (pwm == pwm) { /* (NAN: no PSI in this kernel) */
            printf("CPU pressure (PSI: share of the wall during which a runnable task waited for a CPU, median): "
                   "floor %.0f%%, merge %.0f%%", 100 * pwf, 100 * pwm);
            if (n_quiet > 0)
                printf("; the %d run(s) with both under 10%%: ratio median %.3f", n_quiet, qmed);
            printf("%s\n", pwm > 0.1 ? " -- the machine was busy: the merge (2 threads) loses more to other work "
                                        "than the floor (1 thread), so the ratio above is the machine's, not the "
                                        "merge's" : "");
        }
        printf("memory: %.1f GB free before the runs, %.1f GB after", free0, free1);
        if (rep1 == rep1)
            printf("; %.2f GB given back to the host (free page reporting) during them", rep1 - rep0);
        printf("; every timed run starts with the output deleted and synced (the floor and the merge alike)\n");
    }
    free(tf);
    free(tm);
    free(tx);
    free(cf);
    free(cm);
    free(cx);
    free(sf);
    free(sm);
    free(pr);
    free(wf);
    free(wm);
    free(qr);
    remove_own_dir(own_dir && !keep, dir);
    return 0;
}
