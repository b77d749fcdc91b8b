/* SPDX-License-Identifier: MIT */
/* main.c : the lora-merge command line.  argv -> options -> lm_merge_run() / inspect.
 * The only code that prints or exits; it sees only include/lora_merge.h. */
#include "lora_merge.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* from st_writer.c: temporary-file cleanup on signals, SIGXFSZ ignored */
void lm_cleanup_install(void);

enum { EXIT_USAGE = 2 };

static int g_json; /* --json anywhere on the command line: errors are JSON objects on stdout too */
static char g_job[300]; /* a batch: "job N (OUT): ", put in front of the message of an error */

/* g_job in front of err's message */
static void job_prefix(lm_err *err)
{
    if (g_job[0] == '\0')
        return;
    char msg[sizeof err->msg];
    size_t n = strlen(g_job);
    if (n >= sizeof msg)
        n = sizeof msg - 1;
    memcpy(msg, g_job, n);
    size_t rest = strnlen(err->msg, sizeof err->msg);
    if (rest > sizeof msg - 1 - n)
        rest = sizeof msg - 1 - n; /* the message is cut rather than the job's name */
    memcpy(msg + n, err->msg, rest);
    msg[n + rest] = '\0';
    memcpy(err->msg, msg, sizeof msg);
}

static const char USAGE[] =
    "usage: lora-merge [options] BASE ADAPTER_DIR OUT\n"
    "       lora-merge inspect [--json] [--base BASE] PATH\n"
    "       lora-merge convert [--base BASE] ADAPTER OUT_DIR\n"
    "       lora-merge --shards I/N [options] BASE ADAPTER_DIR OUT   (then: lora-merge finalize OUT)\n"
    "       lora-merge batch [options] BASE [JOBS.json] [--job ARGS...]...\n"
    "\n"
    "Folds PEFT adapters into a base model and writes a merged safetensors checkpoint.\n"
    "  BASE         a .safetensors file, a model.safetensors.index.json, or a model directory\n"
    "               (a PyTorch pytorch_model.bin checkpoint too, read into memory)\n"
    "  ADAPTER_DIR  a PEFT adapter directory (adapter_config.json + adapter_model.safetensors/.bin)\n"
    "  OUT          a *.safetensors file (written to a temp file, renamed when complete), or a\n"
    "               directory: an existing one, or any other new name: a model directory comes out\n"
    "               (model.safetensors or shards + index, config.json adjusted to the weights,\n"
    "               tokenizer and chat template from the adapter when it has them, else from the\n"
    "               base, the base's other model files, a model card).  *.gguf, *.bin ... refused.\n"
    "\n"
    "options:\n"
    "  --scale S               multiply the main adapter's delta by S (default 1; negative un-merges)\n"
    "  --adapter DIR           merge one more adapter, weight 1 (repeatable)\n"
    "  --adapter-scaled DIR S  merge one more adapter with weight S (repeatable)\n"
    "  --threads N             worker threads (default: all cores); output identical for every N\n"
    "  --dtype auto|bf16|f16|f32  dtype of floating output tensors (default auto: keep the base's)\n"
    "  --max-shard-size SIZE   with a directory OUT: shards of at most SIZE (default 5GB)\n"
    "  --shards I/N            worker I of N: write only this worker's output shards (balanced by\n"
    "                          bytes) into the directory OUT (resumable); `lora-merge finalize OUT`\n"
    "                          (or the same command with --shards index) then checks them and\n"
    "                          writes the index\n"
    "  --verify                shard jobs: read every shard back to compare its XXH3-128 (by default\n"
    "                          only shards whose size, inode, mtime or ctime changed are re-read)\n"
    "  --copy-file NAME        with a directory OUT: copy NAME from the base (or adapter) directory too\n"
    "                          (repeatable; only model files are copied by default)\n"
    "  --simulate-nf4          QLoRA adapter on a 16-bit base: merge into the NF4-quantized-then-\n"
    "                          dequantized weights the adapter was trained on (bitsandbytes, blocks of 64;\n"
    "                          =double: with bnb_4bit_use_double_quant)\n"
    "  --allow-noop            accept a merge that changes nothing (by default an error)\n"
    "  --strict                warnings are errors (exit status 5), found before anything is written\n"
    "  --dry-run               check everything, print the plan and the files; write nothing\n"
    "  --json                  machine-readable report on stdout (errors too), with sha256 of the files\n"
    "  --fsync                 flush the output to disk before renaming it into place\n"
    "  --kernels ref|avx2|avx512  force a kernel variant (default: best for this CPU)\n"
    "  -q, --quiet             no summary, no notes, no progress bar\n"
    "  --progress              progress bar even when stderr is not a terminal\n"
    "  -h, --help              this text\n"
    "  --version               version, kernel variant and BLAS\n"
    "\n"
    "adapters from other tools (kohya-ss, LyCORIS, mlx-lm, torchtune, diffusers, lora_diffusion, LoRA-SAM,\n"
    "loralib, raw up/down files) are read as PEFT adapters; GGUF LoRAs are llama.cpp's to merge:\n"
    "  --base BASE             inspect / convert: the base model that resolves module names\n"
    "  --target-modules LIST   unnamed up/down pairs: comma-separated module paths or names, in order\n"
    "  --lora-alpha A          alpha for files that do not record it (loralib, torchtune): scale A/r\n"
    "  --lora-scale S          or the multiplier itself (also settles mlx-lm's scale rule)\n"
    "\n"
    "inspect PATH: list a model's tensors (file, index or directory) and what its config.json says,\n"
    "or describe an adapter; --json for a JSON object (PEFT adapters and models).\n"
    "convert ADAPTER OUT_DIR: write any supported adapter as a PEFT adapter directory.\n"
    "batch BASE JOBS.json: K merges of BASE in one pass (each base tile read once), every output the\n"
    "same bytes as `lora-merge [options] BASE <job's arguments>`; JOBS.json is a JSON array of jobs,\n"
    "each the arguments after BASE: [[\"lora-a\", \"out-a/\"], [\"--dtype\", \"f16\", \"lora-b\", \"b.safetensors\"]];\n"
    "or --job ARGS... (every argument up to the next --job; the batch's own options come first).\n"
    "Every job is checked before anything is written, and written before any OUT is committed.\n"
    "errors: list every error kind, the exit status it gives and what it means.\n"
    "\n"
    "exit status: 0 success, 1 invalid or unsupported input (a merge that changes nothing too),\n"
    "2 usage error, 3 I/O error (cannot read or write, disk full, file too large), 4 out of memory,\n"
    "5 a warning under --strict.\n";

/* one line on stderr; under --json the same error as a JSON object on stdout too */
static int report_error(const lm_err *err_in)
{
    char line[2048];
    lm_err e = *err_in, *err = &e;
    job_prefix(err);
    lm_err_format(err, line, sizeof line);
    fprintf(stderr, "%s\n", line);
    if (g_json) {
        char js[4096];
        lm_err_json(err, js, sizeof js);
        printf("%s\n", js);
    }
    return lm_code_exit_status(err->code);
}

static int usage_error(const char *fmt, const char *arg)
{
    lm_err err;
    lm_err_clear(&err);
    err.code = LM_E_USAGE;
    snprintf(err.kind, sizeof err.kind, "Usage");
    char msg[280];
    snprintf(msg, sizeof msg, fmt, arg);
    snprintf(err.msg, sizeof err.msg, "%s (see lora-merge --help)", msg);
    job_prefix(&err);
    fprintf(stderr, "error: %s\n", err.msg);
    if (g_json) {
        char js[4096];
        lm_err_json(&err, js, sizeof js);
        printf("%s\n", js);
    }
    return EXIT_USAGE;
}

static int parse_double(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (s[0] == '\0' || *end != '\0' || errno != 0 || !isfinite(v))
        return 0;
    *out = v;
    return 1;
}

/* "5GB", "500MB", "2GiB", "123" (bytes) -> bytes; 0 on error */
static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (s[0] == '\0' || end == s || errno != 0 || !(v > 0))
        return 0;
    static const struct {
        const char *suffix;
        double mult;
    } units[] = {{"", 1}, {"B", 1}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
                 {"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
    for (size_t i = 0; i < sizeof units / sizeof *units; i++)
        if (strcasecmp(end, units[i].suffix) == 0) {
            double b = v * units[i].mult;
            if (b < 1 || b > 1e18)
                return 0;
            *out = (uint64_t)b;
            return 1;
        }
    return 0;
}

/* ---- progress bar --------------------------------------------------------------------------- */
typedef struct {
    double start, last;
    int shown;
} progress_state;

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* "[#####.....]  45%  1.23/2.70 GB  812 MB/s  ETA 0:02" (the last call, done == total: 100% and
 * the time it took) */
static void progress_cb(void *ctx, uint64_t done, uint64_t total)
{
    progress_state *ps = ctx;
    double t = mono_now();
    if (done < total && t - ps->last < 0.1)
        return;
    ps->last = t;
    ps->shown = 1;
    double frac = total ? (double)done / (double)total : 1.0;
    if (frac > 1)
        frac = 1;
    int width = 30, fill = (int)(frac * width);
    char bar[64];
    for (int i = 0; i < width; i++)
        bar[i] = i < fill ? '#' : '.';
    bar[width] = '\0';
    double el = t - ps->start, rate = el > 0 ? (double)done / el : 0;
    char tail[64];
    if (done >= total) {
        snprintf(tail, sizeof tail, "in %.1f s", el);
    } else if (rate > 0 && el > 0.3) {
        double eta = (double)(total - done) / rate;
        snprintf(tail, sizeof tail, "ETA %d:%02d", (int)(eta / 60), (int)eta % 60);
    } else {
        snprintf(tail, sizeof tail, "ETA -:--");
    }
    fprintf(stderr, "\r[%s] %3.0f%% %.2f/%.2f GB %6.0f MB/s  %s   ", bar, 100.0 * frac, (double)done * 1e-9,
            (double)total * 1e-9, rate * 1e-6, tail);
    fflush(stderr);
}

/* ---- adapters of other tools: inspect and convert ------------------------------------------- */
static int cmd_describe_foreign(const char *path, const char *base, const lm_format_opts *fo)
{
    lm_err err;
    lm_err_clear(&err);
    char *text = NULL;
    if (lm_adapter_format_describe(path, base, fo, &text, &err) != LM_OK)
        return report_error(&err);
    fputs(text, stdout);
    free(text);
    return 0;
}

static int cmd_convert(const char *in, const char *out, const char *base, const lm_format_opts *fo, int quiet)
{
    lm_err err;
    lm_err_clear(&err);
    char *notes = NULL;
    if (lm_adapter_convert(in, out, base, fo, &notes, &err) != LM_OK)
        return report_error(&err);
    if (!quiet) {
        for (char *line = notes, *nl; line && *line; line = nl + 1) {
            nl = strchr(line, '\n');
            fprintf(stderr, "note: %.*s\n", (int)(nl - line), line);
        }
        printf("converted %s into the PEFT adapter directory %s\n", in, out);
    }
    free(notes);
    return 0;
}

/* ---- inspect -------------------------------------------------------------------------------- */
static int cmd_inspect(const char *path, int as_json)
{
    lm_err err;
    lm_err_clear(&err);
    char *text = NULL;
    if (lm_inspect(path, as_json, &text, &err) != LM_OK)
        return report_error(&err);
    fputs(text, stdout);
    if (as_json)
        fputs("\n", stdout);
    free(text);
    return 0;
}

/* the files of a shard worker's rerun already complete and verified, kept as they are */
static size_t n_kept_files(const lm_merge_report *rep)
{
    size_t n_kept = 0;
    for (size_t i = 0; i < rep->n_files; i++)
        n_kept += strcmp(rep->files[i].origin, "kept") == 0;
    return n_kept;
}

static void print_files(const lm_merge_report *rep, int dry_run)
{
    if (rep->n_files == 0)
        return;
    size_t n_kept = n_kept_files(rep), n = rep->n_files - n_kept;
    printf("%s %zu file%s, %llu bytes", dry_run ? "would write" : "wrote", n, n == 1 ? "" : "s",
           (unsigned long long)rep->bytes_to_write);
    if (n_kept > 0)
        printf("; kept %zu already complete and verified", n_kept);
    printf(":\n");
    for (size_t i = 0; i < rep->n_files; i++) {
        const lm_merge_file *f = &rep->files[i];
        printf("  %-36s %12llu bytes  %s (%s)\n", f->path, (unsigned long long)f->n_bytes, f->kind, f->origin);
    }
    for (size_t i = 0; i < rep->n_removed; i++)
        printf("  %s %s (left by an earlier merge)\n", dry_run ? "would remove" : "removed", rep->removed[i]);
}

/* --base, --target-modules, --lora-alpha, --lora-scale */
static int is_format_option(const char *name)
{
    return strcmp(name, "--base") == 0 || strcmp(name, "--target-modules") == 0 || strcmp(name, "--lora-alpha") == 0 ||
           strcmp(name, "--lora-scale") == 0;
}

/* @return 0, or non-zero after printing a usage error */
static int set_format_option(const char *name, const char *val, lm_format_opts *fo, const char **base)
{
    double v;
    if (strcmp(name, "--base") == 0)
        *base = val;
    else if (strcmp(name, "--target-modules") == 0)
        fo->target_modules = val;
    else if (!parse_double(val, &v) || v == 0)
        return usage_error("--lora-alpha / --lora-scale need a non-zero number, not '%s'", val);
    else
        *(name[7] == 'a' ? &fo->lora_alpha : &fo->lora_scale) = v;
    return 0;
}

/* errors: the table of error kinds with the exit status each gives */
static int cmd_errors(void)
{
    const char *name, *meaning;
    lm_code code;
    printf("%-24s %s  %s\n", "kind", "exit", "meaning");
    for (size_t i = 0; lm_error_kind(i, &name, &code, &meaning); i++)
        printf("%-24s %4d  %s\n", name, lm_code_exit_status(code), meaning);
    return 0;
}

/* inspect, convert and errors: @return the exit status, or -1 when the arguments are a merge's */
static int subcommand(const char *const *pos, size_t n_pos, const char *base, const lm_format_opts *fo, int quiet,
                      int json)
{
    if (n_pos >= 1 && strcmp(pos[0], "inspect") == 0) {
        if (n_pos != 2)
            return usage_error("inspect takes one PATH%s", "");
        if (lm_adapter_format_detect(pos[1]) != NULL)
            return cmd_describe_foreign(pos[1], base, fo);
        return cmd_inspect(pos[1], json);
    }
    if (n_pos == 1 && strcmp(pos[0], "errors") == 0)
        return cmd_errors();
    if (n_pos >= 1 && strcmp(pos[0], "convert") == 0) {
        if (n_pos != 3)
            return usage_error("convert takes ADAPTER OUT_DIR%s", "");
        return cmd_convert(pos[1], pos[2], base, fo, quiet);
    }
    if (base != NULL)
        return usage_error("--base is for inspect and convert (a merge takes BASE as its first argument)%s", "");
    return -1;
}

/* ---- the command line ----------------------------------------------------------------------- */
typedef struct {
    const char *pos[8];
    size_t n_pos;
    lm_merge_adapter extra[63];
    size_t n_extra;
    double scale;
    const char *copy_files[64];
    size_t n_copy;
    lm_merge_job job;
    int json, quiet, force_progress;
    lm_format_opts fo;    /* adapters of other tools */
    const char *base_opt; /* --base (inspect, convert) */
    lm_merge_adapter adapters[64];
} cli_args;

#define CLI_CONTINUE (-1)

/* the value of option `name`: after '=' (val), else the next argument.  NULL with a usage error */
static const char *option_value(const char *name, const char *val, int argc, char **argv, int *i, int *status)
{
    if (val != NULL)
        return val;
    if (*i + 1 >= argc) {
        *status = usage_error("%s needs a value", name);
        return NULL;
    }
    return argv[++*i];
}

/* options that set a number or a size */
static int parse_numeric_option(cli_args *c, const char *name, const char *val)
{
    char *end;
    if (strcmp(name, "--scale") == 0) {
        if (!parse_double(val, &c->scale))
            return usage_error("--scale needs a number, not '%s'", val);
    } else if (strcmp(name, "--threads") == 0) {
        long n = strtol(val, &end, 10);
        if (*val == '\0' || *end != '\0' || n < 1 || n > 1024)
            return usage_error("--threads needs a whole number from 1 to 1024, not '%s'", val);
        c->job.n_threads = (int)n;
    } else if (strcmp(name, "--tile-elems") == 0) { /* hidden: tests and benchmarks (see lora_merge.h) */
        unsigned long long n = strtoull(val, &end, 10);
        if (*val == '\0' || *end != '\0' || n < 1 || n > (1ull << 34))
            return usage_error("--tile-elems needs a whole number from 1 to 2^34, not '%s'", val);
        c->job.tile_elems = n;
    } else if (strcmp(name, "--max-shard-size") == 0) {
        if (!parse_size(val, &c->job.max_shard_bytes))
            return usage_error("--max-shard-size needs a size such as 5GB, 500MB, 2GiB or a byte count, not '%s'", val);
    }
    return CLI_CONTINUE;
}

/* --shards I/N (worker I of N) or --shards index (finalize); I and N decimal digits only (no
 * sign, no blank: strtoul alone takes " 1/4" and "+1/4") */
static int parse_shards(lm_merge_job *job, const char *val)
{
    if (strcmp(val, "index") == 0) {
        job->shard_mode = LM_SHARDS_INDEX;
        return CLI_CONTINUE;
    }
    size_t n_i = strspn(val, "0123456789"), n_n = val[n_i] == '/' ? strspn(val + n_i + 1, "0123456789") : 0;
    unsigned long i = strtoul(val, NULL, 10), n = n_n ? strtoul(val + n_i + 1, NULL, 10) : 0;
    if (n_i == 0 || n_n == 0 || val[n_i + 1 + n_n] != '\0' || n < 1 || n > 1000000 || i >= n)
        return usage_error("--shards needs I/N (worker I of N, 0 <= I < N <= 1000000) or 'index', not '%s'", val);
    job->shard_mode = LM_SHARDS_WORKER;
    job->shard_index = (unsigned)i;
    job->shard_count = (unsigned)n;
    return CLI_CONTINUE;
}

/* an option that takes a value; *i advances past it.  @return CLI_CONTINUE or an exit status */
static int parse_valued_option(cli_args *c, const char *name, const char *val, int argc, char **argv, int *i)
{
    int status = CLI_CONTINUE;
    if ((val = option_value(name, val, argc, argv, i, &status)) == NULL)
        return status;
    if (strcmp(name, "--adapter") == 0 || strcmp(name, "--adapter-scaled") == 0) {
        double w = 1.0;
        if (strcmp(name, "--adapter-scaled") == 0) {
            if (*i + 1 >= argc)
                return usage_error("--adapter-scaled needs a directory and a weight (after '%s')", val);
            if (!parse_double(argv[*i + 1], &w))
                return usage_error("--adapter-scaled needs a numeric weight, not '%s'", argv[*i + 1]);
            ++*i;
        }
        if (c->n_extra == sizeof c->extra / sizeof *c->extra)
            return usage_error("too many adapters (%s)", val);
        c->extra[c->n_extra].dir = val;
        c->extra[c->n_extra++].weight = w;
    } else if (strcmp(name, "--dtype") == 0) {
        c->job.out_dtype = val;
    } else if (strcmp(name, "--kernels") == 0) {
        c->job.kernels = val;
    } else if (strcmp(name, "--shards") == 0) {
        return parse_shards(&c->job, val);
    } else if (strcmp(name, "--copy-file") == 0) {
        if (c->n_copy == sizeof c->copy_files / sizeof *c->copy_files)
            return usage_error("too many --copy-file (%s)", val);
        c->copy_files[c->n_copy++] = val;
    } else {
        return parse_numeric_option(c, name, val);
    }
    return CLI_CONTINUE;
}

/* how many arguments follow option `name` (without "=value"): 0 for a flag */
static int option_values(const char *name)
{
    static const char *const valued[] = {"--scale", "--adapter", "--adapter-scaled", "--threads", "--tile-elems",
                                         "--dtype", "--kernels", "--copy-file", "--max-shard-size", "--shards"};
    for (size_t k = 0; k < sizeof valued / sizeof *valued; k++)
        if (strcmp(name, valued[k]) == 0)
            return strcmp(name, "--adapter-scaled") == 0 ? 2 : 1;
    return 0;
}

/* argv[*i], an option.  @return CLI_CONTINUE, or the exit status to return now */
static int parse_option(cli_args *c, int argc, char **argv, int *i)
{
    const char *a = argv[*i], *val = NULL, *eq = strchr(a, '=');
    char name[64];
    if (a[1] == '-' && eq != NULL) {
        snprintf(name, sizeof name, "%.*s", (int)(eq - a), a);
        val = eq + 1;
    } else {
        snprintf(name, sizeof name, "%s", a);
    }
    if (option_values(name) > 0)
        return parse_valued_option(c, name, val, argc, argv, i);
    if (is_format_option(name)) {
        int status = CLI_CONTINUE;
        if ((val = option_value(name, val, argc, argv, i, &status)) == NULL)
            return status;
        return set_format_option(name, val, &c->fo, &c->base_opt) != 0 ? EXIT_USAGE : CLI_CONTINUE;
    }
    if (strcmp(name, "-h") == 0 || strcmp(name, "--help") == 0) {
        fputs(USAGE, stdout);
        return 0;
    }
    if (strcmp(name, "--version") == 0) {
        printf("%s\n", lm_version_text());
        return 0;
    }
    if (strcmp(name, "--simulate-nf4") == 0 && val != NULL) { /* bnb_4bit_use_double_quant */
        if (strcmp(val, "double") != 0)
            return usage_error("--simulate-nf4=%s: the only value is 'double' (bnb_4bit_use_double_quant)", val);
        c->job.simulate_nf4 = 2;
        return CLI_CONTINUE;
    }
    static const char *const flags[] = {"--allow-noop", "--strict", "--dry-run", "--json", "--fsync", "-q", "--quiet",
                                        "--progress", "--exactness-off" /* hidden: benchmarks (see lora_merge.h) */,
                                        "--simulate-nf4", "--verify"};
    int *const targets[] = {&c->job.allow_noop, &c->job.strict, &c->job.dry_run, &c->json, &c->job.do_fsync,
                            &c->quiet, &c->quiet, &c->force_progress, &c->job.exactness_off,
                            &c->job.simulate_nf4, &c->job.shard_verify};
    for (size_t k = 0; k < sizeof flags / sizeof *flags; k++)
        if (strcmp(name, flags[k]) == 0) {
            *targets[k] = 1;
            return CLI_CONTINUE;
        }
    return usage_error("unknown option '%s'", a);
}

static void print_report(const cli_args *c, const lm_merge_report *rep)
{
    const lm_merge_job *job = &c->job;
    if (c->json) {
        printf("%s\n", rep->json);
        return;
    }
    if (!c->quiet || job->dry_run)
        for (size_t i = 0; i < rep->n_notes; i++)
            fprintf(stderr, "note: %s\n", rep->notes[i]);
    for (size_t i = 0; i < rep->n_warnings; i++) /* even quiet: a warning is not a note */
        fprintf(stderr, "warning: [%s] %s\n", rep->warnings[i].code, rep->warnings[i].message);
    if (job->dry_run) {
        printf("plan: %zu tensors, %zu changed (%zu low-rank deltas, %zu replaced, %zu added), %.3f GFLOP\n",
               rep->n_tensors, rep->n_changed, rep->n_lowrank, rep->n_replaced, rep->n_added, rep->lowrank_gflop);
        fputs(rep->plan_text, stdout);
        print_files(rep, 1);
        printf("dry run: nothing written\n");
    } else if (!c->quiet) {
        char threads[32] = ""; /* finalize: the workers' (left out when their sidecars do not say) */
        if (rep->n_threads > 0)
            snprintf(threads, sizeof threads, "%d threads, ", rep->n_threads);
        if (rep->n_files > 0 && n_kept_files(rep) == rep->n_files) /* a rerun with nothing left to write */
            printf("merged nothing into %s: this worker's %zu shard%s already complete and verified (the plan: "
                   "%zu tensors, %zu changed), checked in %.2f s\n", job->out_path, rep->n_files,
                   rep->n_files == 1 ? " is" : "s are", rep->n_tensors, rep->n_changed, rep->seconds);
        else
            printf("merged %zu adapter%s into %s: %zu tensors, %zu changed (%zu low-rank deltas, %zu replaced, "
                   "%zu added), %.2f GB in %.2f s (%.2f GB/s, %skernels %s)\n",
                   job->n_adapters, job->n_adapters == 1 ? "" : "s", job->out_path, rep->n_tensors, rep->n_changed,
                   rep->n_lowrank, rep->n_replaced, rep->n_added, (double)rep->out_bytes * 1e-9, rep->seconds,
                   rep->seconds > 0 ? (double)rep->out_bytes * 1e-9 / rep->seconds : 0.0, threads, rep->kernels);
        if (rep->out_kind != NULL && strcmp(rep->out_kind, "directory") == 0)
            print_files(rep, 0);
    }
}

/* ---- stdout ---------------------------------------------------------------------------------- */
static int g_stdout_closed; /* started with no file descriptor 1 */

/* at exit: what was printed must have reached stdout (a full disk, /dev/full, a reader that went
 * away), else one error line and exit status 3, as for any other write */
static void close_stdout(void)
{
    int failed = fflush(stdout) != 0 || ferror(stdout), e = errno;
    if (!failed)
        return;
    if (g_stdout_closed)
        fprintf(stderr, "error: <stdout>: IoError: stdout is closed, the report could not be written\n");
    else
        fprintf(stderr, "error: <stdout>: IoError: cannot write the report: %s\n", strerror(e));
    _exit(3);
}

/* Descriptors 0-2 are kept taken, so no file the merge opens becomes stdout (a report printed into
 * a model file).  A closed stdout becomes /dev/full: printing to it is then an error (exit 3) and
 * a quiet run that prints nothing is not. */
static void std_fds(void)
{
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && errno == EBADF) {
            int r = open(fd == 1 ? "/dev/full" : "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
            if (r >= 0 && r != fd) {
                dup2(r, fd);
                close(r);
            }
            g_stdout_closed |= fd == 1;
        }
    /* a reader that goes away: EPIPE, reported by close_stdout(), rather than death by SIGPIPE */
    signal(SIGPIPE, SIG_IGN);
    atexit(close_stdout);
}

/* ---- main ----------------------------------------------------------------------------------- */
static int run(int argc, char **argv);
static int cmd_batch(int argc, char **argv, int at);

/* the command line a shard worker recorded, minus what is the worker's own (--shards, --verify,
 * --threads, and what it prints: -q, --json, --progress): finalize replays it after its own
 * options */
static void record_args(cli_args *c, int argc, char **argv)
{
    static const char *rec[256];
    static const char *const own[] = {"--shards", "--threads", "--verify", "-q", "--quiet", "--json", "--progress"};
    size_t n = 0;
    for (int i = 1; i < argc && n < sizeof rec / sizeof *rec; i++) {
        int skip = 0;
        for (size_t k = 0; k < sizeof own / sizeof *own && !skip; k++) {
            size_t len = strlen(own[k]);
            if (strcmp(argv[i], own[k]) == 0)
                skip = 1 + option_values(own[k]);
            else if (strncmp(argv[i], own[k], len) == 0 && argv[i][len] == '=')
                skip = 1;
        }
        if (skip == 0)
            rec[n++] = argv[i];
        else
            i += skip - 1;
    }
    c->job.record_args = rec;
    c->job.n_record_args = n;
}

/* the index of the first argument that is neither an option nor an option's value, or argc */
static int finalize_at(int argc, char **argv)
{
    int i = 1;
    while (i < argc && argv[i][0] == '-')
        i += 1 + (strchr(argv[i], '=') ? 0 : option_values(argv[i]));
    return i < argc ? i : argc;
}

/* lora-merge finalize OUT [options]: the workers' command line with --shards index, run from
 * their working directory */
static int cmd_finalize(int argc, char **argv)
{
    int at = finalize_at(argc, argv); /* "finalize"; OUT the next */
    if (at + 1 >= argc || argv[at + 1][0] == '-' || (at + 2 < argc && argv[at + 2][0] != '-'))
        return usage_error("finalize takes OUT, the directory the shard workers wrote%s", "");
    char **args = NULL, *cwd = NULL;
    size_t n = 0;
    lm_err err;
    lm_err_clear(&err);
    int status;
    if (lm_shards_recorded(argv[at + 1], &args, &n, &cwd, &err) != LM_OK) {
        status = report_error(&err);
    } else if (chdir(cwd) != 0) {
        fprintf(stderr, "lora-merge: %s: cannot enter the workers' working directory: %s\n", cwd, strerror(errno));
        status = 3;
    } else {
        char **av = calloc(n + (size_t)argc + 4, sizeof *av);
        if (av == NULL)
            return 4;
        size_t k = 0;
        av[k++] = argv[0];
        for (int i = 1; i < argc; i++) /* finalize's own options (-q, --json ...) */
            if (i != at && i != at + 1)
                av[k++] = argv[i];
        av[k++] = "--shards";
        av[k++] = "index";
        for (size_t i = 0; i < n; i++)
            av[k++] = args[i];
        status = run((int)k, av);
        free(av);
    }
    for (size_t i = 0; i < n; i++)
        free(args[i]);
    free(args);
    free(cwd);
    return status;
}

int main(int argc, char **argv)
{
    std_fds();
    lm_cleanup_install();
    /* the executor allocates each tensor's factors when its first tile is claimed and frees them
     * after its last: keep freed blocks in the heap for the next tensor rather than returning them
     * to the kernel and faulting fresh zero pages in again (peak memory is unchanged).  One arena
     * for every thread: with one per thread, the blocks one worker freed could not serve the
     * next tensor claimed by another, and peak memory became the sum of the arenas' high-water
     * marks (VeRA r=256 on the 1.1B bench, 2 threads: 199-282 MB, with one arena 154-161 MB) */
    mallopt(M_MMAP_THRESHOLD, 512 << 20);
    mallopt(M_TRIM_THRESHOLD, 1024 << 20);
    mallopt(M_ARENA_MAX, 1);
    int at = finalize_at(argc, argv);
    if (at < argc && strcmp(argv[at], "finalize") == 0)
        return cmd_finalize(argc, argv);
    if (at < argc && strcmp(argv[at], "batch") == 0)
        return cmd_batch(argc, argv, at);
    return run(argc, argv);
}

/* argv[1..] into c (c zeroed by the caller).  @return CLI_CONTINUE, or the exit status now */
static int parse_args(cli_args *c, int argc, char **argv)
{
    int only_positional = 0;
    c->scale = 1.0;
    for (int i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) /* before any error can be reported */
        g_json |= strcmp(argv[i], "--json") == 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (only_positional || a[0] != '-' || a[1] == '\0') {
            if (c->n_pos == sizeof c->pos / sizeof *c->pos)
                return usage_error("too many arguments ('%s')", a);
            c->pos[c->n_pos++] = a;
        } else if (strcmp(a, "--") == 0) {
            only_positional = 1;
        } else {
            int status = parse_option(c, argc, argv, &i);
            if (status != CLI_CONTINUE)
                return status;
        }
    }
    return CLI_CONTINUE;
}

/* c's merge job from its BASE ADAPTER_DIR OUT and options.  @return CLI_CONTINUE or a status */
static int merge_job_of(cli_args *c, int argc, char **argv)
{
    lm_merge_job *job = &c->job;
    if (c->n_pos != 3 && !(job->dry_run && c->n_pos == 2)) {
        char got[64];
        snprintf(got, sizeof got, "%zu argument%s", c->n_pos, c->n_pos == 1 ? "" : "s");
        return usage_error("expected BASE ADAPTER_DIR OUT, got %s", got);
    }
    c->adapters[0].dir = c->pos[1];
    c->adapters[0].weight = c->scale;
    for (size_t i = 0; i < c->n_extra; i++)
        c->adapters[1 + i] = c->extra[i];
    job->base_path = c->pos[0];
    job->out_path = c->n_pos == 3 ? c->pos[2] : NULL;
    job->adapters = c->adapters;
    job->n_adapters = 1 + c->n_extra;
    job->formats = &c->fo;
    job->copy_files = c->copy_files;
    job->n_copy_files = c->n_copy;
    job->hash_outputs = c->json;
    if (job->shard_verify && job->shard_mode == LM_SHARDS_NONE)
        return usage_error("--verify is for shard jobs (--shards I/N, finalize)%s", "");
    if (job->shard_mode == LM_SHARDS_WORKER)
        record_args(c, argc, argv);
    job->tensor_norms = c->json;
    return CLI_CONTINUE;
}

/* ---- batch ----------------------------------------------------------------------------------- */
/* the arguments of a batch: its own (argv[0] first, without "batch", JOBS.json and the --job
 * groups) and each --job group's */
typedef struct {
    char **common;
    int n_common;
    int *job_at, *job_n; /* the --job groups: argv + job_at[g], job_n[g] arguments */
    size_t n_groups;
    char ***file_args;   /* JOBS.json's jobs */
    size_t n_file;
    cli_args *cs;        /* per job */
    char ***jargv;       /* per job: its command line (common + its own) */
    lm_merge_job *jobs;
    lm_merge_report **reps;
    size_t n_jobs;
} batch_args;

static void batch_args_free(batch_args *b)
{
    for (size_t j = 0; b->jargv && j < b->n_jobs; j++)
        free(b->jargv[j]);
    for (size_t j = 0; b->reps && j < b->n_jobs; j++)
        lm_merge_report_free(b->reps[j]);
    lm_batch_jobs_free(b->file_args, b->n_file);
    free(b->common);
    free(b->job_at);
    free(b->job_n);
    free(b->cs);
    free(b->jargv);
    free(b->jobs);
    free(b->reps);
}

/* "job N (OUT): " in front of the errors that concern job j */
static void set_job_label(const batch_args *b, size_t j, const char *out, size_t n_committed)
{
    int k = snprintf(g_job, sizeof g_job, "job %zu", j + 1);
    if (out != NULL && k > 0 && (size_t)k < sizeof g_job)
        k += snprintf(g_job + k, sizeof g_job - (size_t)k, " (%s)", out);
    if (n_committed == 1 && k > 0 && (size_t)k < sizeof g_job)
        k += snprintf(g_job + k, sizeof g_job - (size_t)k, ", after job 1 of %zu was committed", b->n_jobs);
    else if (n_committed > 1 && k > 0 && (size_t)k < sizeof g_job)
        k += snprintf(g_job + k, sizeof g_job - (size_t)k, ", after jobs 1-%zu of %zu were committed", n_committed,
                      b->n_jobs);
    if (k > 0 && (size_t)k < sizeof g_job)
        snprintf(g_job + k, sizeof g_job - (size_t)k, ": ");
}

/* splits argv; reads JOBS.json.  @return CLI_CONTINUE or an exit status */
static int batch_split(batch_args *b, int argc, char **argv, int at)
{
    b->common = calloc((size_t)argc + 1, sizeof *b->common);
    b->job_at = calloc((size_t)argc + 1, sizeof *b->job_at);
    b->job_n = calloc((size_t)argc + 1, sizeof *b->job_n);
    cli_args *bc = calloc(1, sizeof *bc);
    if (b->common == NULL || b->job_at == NULL || b->job_n == NULL || bc == NULL) {
        free(bc);
        return 4;
    }
    b->common[b->n_common++] = argv[0];
    for (int i = 1; i < argc; i++) {
        if (i == at)
            continue;
        if (strcmp(argv[i], "--job") == 0) {
            int e = i + 1;
            while (e < argc && strcmp(argv[e], "--job") != 0)
                e++;
            b->job_at[b->n_groups] = i + 1;
            b->job_n[b->n_groups++] = e - i - 1;
            i = e - 1;
            continue;
        }
        b->common[b->n_common++] = argv[i];
    }
    int status = parse_args(bc, b->n_common, b->common);
    if (status == CLI_CONTINUE && (bc->n_pos < 1 || bc->n_pos > 2))
        status = usage_error("batch takes BASE and an optional JOBS.json (then --job ARGS... for more jobs)%s", "");
    if (status == CLI_CONTINUE && bc->n_pos == 2) {
        lm_err err;
        lm_err_clear(&err);
        if (lm_batch_jobs_read(bc->pos[1], &b->file_args, &b->n_file, &err) != LM_OK)
            status = report_error(&err);
        int k = 0; /* JOBS.json is the batch's, not a job's argument */
        for (int i = 0; i < b->n_common; i++)
            if (b->common[i] != bc->pos[1])
                b->common[k++] = b->common[i];
        b->n_common = k;
    }
    b->n_jobs = b->n_file + b->n_groups;
    if (status == CLI_CONTINUE && b->n_jobs == 0)
        status = usage_error("batch needs jobs: a JOBS.json, or --job ADAPTER... OUT%s", "");
    free(bc);
    return status;
}

/* job j's command line (the batch's arguments, then its own) parsed into b->cs[j] */
static int batch_parse_job(batch_args *b, size_t j, char **argv)
{
    char **own = j < b->n_file ? b->file_args[j] : argv + b->job_at[j - b->n_file];
    int n_own = 0;
    if (j < b->n_file)
        while (own[n_own] != NULL)
            n_own++;
    else
        n_own = b->job_n[j - b->n_file];
    char **av = b->jargv[j] = calloc((size_t)(b->n_common + n_own) + 1, sizeof *av);
    if (av == NULL)
        return 4;
    int n = 0;
    for (int i = 0; i < b->n_common; i++)
        av[n++] = b->common[i];
    for (int i = 0; i < n_own; i++)
        av[n++] = own[i];
    set_job_label(b, j, n_own > 0 ? own[n_own - 1] : NULL, 0);
    int status = parse_args(&b->cs[j], n, av);
    if (status == CLI_CONTINUE)
        status = merge_job_of(&b->cs[j], n, av);
    b->jobs[j] = b->cs[j].job;
    return status;
}

/* lora-merge batch [options] BASE [JOBS.json] [--job ARGS...]... */
static int cmd_batch(int argc, char **argv, int at)
{
    batch_args b;
    memset(&b, 0, sizeof b);
    int status = batch_split(&b, argc, argv, at);
    if (status == CLI_CONTINUE) {
        b.cs = calloc(b.n_jobs, sizeof *b.cs);
        b.jargv = calloc(b.n_jobs, sizeof *b.jargv);
        b.jobs = calloc(b.n_jobs, sizeof *b.jobs);
        b.reps = calloc(b.n_jobs, sizeof *b.reps);
        if (b.cs == NULL || b.jargv == NULL || b.jobs == NULL || b.reps == NULL)
            status = 4;
    }
    for (size_t j = 0; j < b.n_jobs && status == CLI_CONTINUE; j++)
        status = batch_parse_job(&b, j, argv);
    g_job[0] = '\0';
    if (status != CLI_CONTINUE) {
        batch_args_free(&b);
        return status;
    }
    progress_state ps = {mono_now(), 0, 0};
    const cli_args *c0 = &b.cs[0];
    if (!c0->quiet && !c0->json && !b.jobs[0].dry_run && (c0->force_progress || isatty(STDERR_FILENO))) {
        b.jobs[0].progress = progress_cb;
        b.jobs[0].progress_ctx = &ps;
    }
    lm_err err;
    lm_err_clear(&err);
    size_t failed = 0, n_committed = 0;
    double t0 = mono_now();
    lm_code rc = lm_merge_batch(b.jobs, b.n_jobs, b.reps, &failed, &n_committed, &err);
    if (ps.shown)
        fprintf(stderr, "\n");
    if (rc != LM_OK) {
        set_job_label(&b, failed, b.jobs[failed].out_path, n_committed);
        status = report_error(&err);
    } else {
        for (size_t j = 0; j < b.n_jobs; j++)
            print_report(&b.cs[j], b.reps[j]);
        if (!c0->quiet && !c0->json && !b.jobs[0].dry_run)
            printf("batch: %zu merges of %s in one pass, %.2f s\n", b.n_jobs, b.jobs[0].base_path, mono_now() - t0);
        status = 0;
    }
    g_job[0] = '\0';
    batch_args_free(&b);
    return status;
}

static int run(int argc, char **argv)
{
    static cli_args c;
    int status = parse_args(&c, argc, argv);
    if (status != CLI_CONTINUE)
        return status;
    lm_merge_job *job = &c.job;
    int sub = subcommand(c.pos, c.n_pos, c.base_opt, &c.fo, c.quiet, c.json);
    if (sub >= 0)
        return sub;
    if ((status = merge_job_of(&c, argc, argv)) != CLI_CONTINUE)
        return status;
    progress_state ps = {mono_now(), 0, 0};
    if (!c.quiet && !c.json && !job->dry_run && (c.force_progress || isatty(STDERR_FILENO))) {
        job->progress = progress_cb;
        job->progress_ctx = &ps;
    }
    lm_err err;
    lm_err_clear(&err);
    lm_merge_report *rep = NULL;
    lm_code rc = lm_merge_run(job, &rep, &err);
    if (ps.shown)
        fprintf(stderr, "\n");
    if (rc != LM_OK)
        return report_error(&err);
    print_report(&c, rep);
    lm_merge_report_free(rep);
    return 0;
}
