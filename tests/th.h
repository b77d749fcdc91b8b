/* SPDX-License-Identifier: MIT */
/* th.h : helpers shared by the test files (not tests themselves).
 * - running the lora-merge binary (LM_BIN) and capturing its exit status and output
 * - temporary directories, file hashes
 * - an INDEPENDENT safetensors reader (cJSON-based, no code from src/), so merges are checked
 *   against something other than the code under test
 * - exact rounding of doubles to bf16/f16/f32 (double arithmetic, ties to even) and the golden
 *   comparison rule of ../shared/tools/golden_check.py */
#ifndef LM_TH_H
#define LM_TH_H

#include <stddef.h>
#include <stdint.h>

#define TH_SHARED "../shared/fixtures"

/* 1 if ../shared/fixtures is present (tests that need it skip visibly otherwise) */
int th_have_shared(void);

typedef struct {
    int status;     /* exit status, or 128+signal */
    char *out, *err; /* captured stdout / stderr (NUL-terminated, malloc'd) */
} th_run_result;

/* path of the binary under test: $LM_BIN or build/lora-merge */
const char *th_bin(void);
/* runs argv (argv[0] = program) in cwd (NULL = current); captures output. */
th_run_result th_run(const char *cwd, const char *const *argv);
/* runs the binary under test with the given arguments (NULL-terminated, at most 38) */
th_run_result th_runv(const char *first, ...);
/* runs a shell command line (sh -c), e.g. with ulimit */
th_run_result th_sh(const char *cmd);
void th_run_free(th_run_result *r);

/* a run held at a test seam (LM_TEST_PAUSE_BEFORE_COMMIT, LM_FAULT=k:stall:<call>: one line on
 * stderr, then one byte read from stdin): argv (argv[0] the program's path) runs with env's entries
 * ("NAME=value", or "NAME" to unset; NULL-terminated, env may be NULL) and stdin a pipe; once
 * `mark` shows on its stderr, at(ctx) runs there (may be NULL: e.g. an input is changed), then the
 * run is let go (one byte on stdin), or SIGKILLed when kill_it, and waited for. */
typedef struct {
    int status; /* exit status, or 128+signal */
    int held;   /* 1: the mark came (at ran) */
    char *err;  /* malloc'd: stderr after the mark, or all of it when the mark never came */
} th_held_result;
th_held_result th_run_held(const char *const *argv, const char *const *env, const char *mark, int kill_it,
                           void (*at)(void *ctx), void *ctx);

/* bench/gen_model beside $LM_BIN (e.g. build/bench/gen_model): 1 and the path in buf if it is
 * there and executable, else 0 (the caller skips visibly) */
int th_gen_model_path(char *buf, size_t cap);

/* th_quant_ref() : the independent numpy reference of a quantized-base test,
 *  `/usr/bin/python3 tests/quant/SCRIPT ARGS`, must exit 0 (its line is logged); the test is
 *  skipped visibly when /usr/bin/python3 has no numpy */
void th_quant_ref(const char *script, const char *args);

/* mkdtemp under $TMPDIR; th_rmrf() removes a tree */
char *th_tmpdir(void);
void th_rmrf(const char *path);
int th_exists(const char *path);
/* number of entries in a directory (excluding . and ..) */
int th_count_entries(const char *dir);
/* FNV-1a 64 of a whole file (0 if unreadable) */
uint64_t th_file_hash(const char *path);
/* "dir/name" into dst: 0, or -1 when it does not fit */
int th_path(char *dst, size_t cap, const char *dir, const char *name);
/* text into dir/name: 0, or -1 */
int th_write_text(const char *dir, const char *name, const char *text);
/* whole file into memory */
uint8_t *th_read_file(const char *path, size_t *n);
int th_write_file(const char *path, const void *data, size_t n);
int th_files_equal(const char *a, const char *b);

/* ---- independent safetensors ---------------------------------------------------------------- */
typedef struct {
    char *name;
    char dtype[16];
    int n_dims;
    uint64_t shape[8];
    uint64_t n_elems;
    const uint8_t *data; /* into the file buffer */
    uint64_t n_bytes;
} th_tensor;

typedef struct {
    uint8_t *buf;
    size_t n_buf;
    th_tensor *t;
    size_t n;
    char *meta_json; /* the __metadata__ object as JSON text, or NULL */
} th_st;

/* returns 0 on success */
int th_st_read(const char *path, th_st *out);
void th_st_free(th_st *st);
const th_tensor *th_st_find(const th_st *st, const char *name);
/* 1 when two files hold the same tensors (names, order, dtypes, shapes, bytes) and the same
 * __metadata__ but for the key skip_meta (NULL: all of it) */
int th_st_same_except(const char *a, const char *b, const char *skip_meta);
/* float tensor -> doubles (exact); returns malloc'd array */
double *th_to_f64(const th_tensor *t);

/* writing a safetensors file from doubles (values rounded to dtype, ties to even; integer
 * dtypes (I64, I32 ...) take the values rounded to integers) */
typedef struct {
    const char *name;
    const char *dtype; /* "F32", "F16", "BF16", "F64" */
    int n_dims;
    uint64_t shape[8];
    const double *values;
} th_out_tensor;
int th_st_write(const char *path, const th_out_tensor *t, size_t n);
/* the same with a __metadata__ object (string values) */
int th_st_write_meta(const char *path, const th_out_tensor *t, size_t n, const char *const *meta_keys,
                     const char *const *meta_values, size_t n_meta);

/* writing a torch.save() zip (pickle protocol 2, storages stored uncompressed, as torch >= 1.6
 * writes them) of F32 / F16 / BF16 tensors: root 0 a dict (names), 1 a list (names unused), 2 one
 * tensor.  as_parameter wraps each tensor in torch._utils._rebuild_parameter, location is the
 * storage's device tag ("cpu", "cuda:0"). */
int th_torch_save(const char *path, int root, const th_out_tensor *t, size_t n, int as_parameter,
                  const char *location);

/* ---- exact rounding from double --------------------------------------------------------------- */
double th_round_to(double x, const char *dtype);   /* nearest value of dtype, ties to even */
double th_spacing(double x, const char *dtype);    /* ulp of dtype at |x| (subnormals included) */
uint64_t th_encode(double x, const char *dtype);   /* bits of th_round_to(x) in dtype */

/* ---- the golden rule (golden_check.py compare_tensor) ------------------------------------------ */
typedef struct {
    int ok;
    double max_ulp, nearest_frac, max_abs_err, tol;
    size_t n_off, n_beyond;
    char why[128];
} th_cmp;
th_cmp th_compare(const char *dtype, const double *out, const double *ref, size_t n);

/* deterministic random numbers for generated data */
uint64_t th_rand_u64(uint64_t *state);
double th_rand_uniform(uint64_t *state); /* [-1, 1) */
double th_rand_normal(uint64_t *state);

/* the model directory `dir` holds: 1/2 when every tensor (through the index, or model.safetensors)
 * equals ref_a's/ref_b's, 0 when it holds none, -1 for a mixed or broken one */
int th_model_is(const char *dir, const char *ref_a, const char *ref_b);
/* 1 when a and b hold the same: two regular files with the same bytes, or two directories with
 * the same names (hidden ones too) whose entries are the same in turn (diff -r, in process) */
int th_same_tree(const char *a, const char *b);
/* copies the regular file, or the directory tree, from to to (which must not exist); 0 on success */
int th_copy_tree(const char *from, const char *to);
/* names in dir that a run leaves only while it runs: stages and temporary files */
int th_count_temps(const char *dir);

#endif
