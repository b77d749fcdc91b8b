/* SPDX-License-Identifier: MIT */
/* lora_merge.h : the public API of lora-merge, a library that folds PEFT adapters (LoRA and
 * relatives) into a base model's weights and writes a merged safetensors checkpoint.
 *
 * Ways to use it:
 *   - read safetensors files strictly:   lm_st_open() / lm_st_open_buffer(), lm_st_tensor() ...
 *   - read a model (file, sharded index or directory):   lm_model_open()
 *   - merge:   lm_merge_run() with an lm_merge_job (what the command-line tool does)
 *
 * safetensors byte layout (what the reader checks):
 *   [8 bytes: N, little-endian u64][N bytes: UTF-8 JSON object, may be padded with spaces][data]
 *   The JSON maps tensor names to {"dtype": D, "shape": [u64...], "data_offsets": [begin, end]}
 *   (offsets relative to the start of data) and may hold "__metadata__": {string: string}.
 *   Tensors must cover the data exactly: no gaps, no overlaps, no trailing bytes.
 *
 * Conventions: opaque types come in open/close or create/free pairs; close/free accept NULL.  A
 * function that can fail returns lm_code (or NULL) and takes `lm_err *err` last; err may be NULL.
 * The library never prints, exits or aborts on bad input. */
#ifndef LORA_MERGE_H
#define LORA_MERGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) && __GNUC__ >= 4
#define LM_API __attribute__((visibility("default")))
#else
#define LM_API
#endif

#define LM_VERSION_MAJOR 0
#define LM_VERSION_MINOR 1
#define LM_VERSION_PATCH 0
#define LM_VERSION_STRING "0.1.0"

/* ---------------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------------- */
typedef enum {
    LM_OK = 0,
    LM_E_IO,          /* open/read/write/rename failed; sys_errno is set */
    LM_E_NOMEM,
    LM_E_FORMAT,      /* malformed safetensors, JSON, zip or pickle */
    LM_E_UNSUPPORTED, /* well-formed but refused: unmergeable peft_type, unknown dtype */
    LM_E_MISMATCH,    /* names, shapes or dtypes do not line up */
    LM_E_USAGE,       /* bad options */
    LM_E_INTERRUPTED, /* a signal asked the job to stop */
    LM_E_WARNING,     /* a warning under lm_merge_job.strict (err->kind holds its code) */
    /* append only, never renumber */
} lm_code;

typedef struct lm_err {
    lm_code code;
    int sys_errno;   /* 0 unless an OS call failed */
    uint64_t offset; /* byte offset in path, or UINT64_MAX */
    char kind[40];   /* stable short name: "HeaderTooLarge", "DuplicateKey", "ShapeMismatch" ... */
    char path[512];  /* file being read or written, "" if none */
    char tensor[256];/* tensor or module name, "" if none */
    char msg[320];   /* one line, no newline, no trailing period */
} lm_err;

/*! lm_err_clear() : resets *err to "no error" (offset = UINT64_MAX).  NULL is a no-op. */
LM_API void lm_err_clear(lm_err *err);
/*! lm_code_name() : stable name of a code ("IoError", "InvalidFormat" ...); static storage. */
LM_API const char *lm_code_name(lm_code code);
/*! lm_code_exit_status() : the command line's exit status for a code: 0 OK, 1 invalid or
 *  unsupported input, 2 usage, 3 I/O, 4 out of memory, 5 a warning under --strict. */
LM_API int lm_code_exit_status(lm_code code);
/*! lm_err_json() : the error as one JSON object (no newline) into buf, always NUL-terminated when
 *  cap > 0: {"report_version":1,"tool":"lora-merge","version":...,"ok":false,"error":{"code",
 *  "kind","exit_status","path","tensor","offset","errno","message"}} (fields that are empty are
 *  null).  @return the length the whole object needs (as snprintf). */
LM_API size_t lm_err_json(const lm_err *err, char *buf, size_t cap);
/*! lm_err_format() : one line "error: <path>: <Kind>: '<tensor>': <msg> (at byte N)", empty
 *  parts left out, into buf (always NUL-terminated when cap > 0).  @return the length written. */
LM_API size_t lm_err_format(const lm_err *err, char *buf, size_t cap);
/*! lm_error_kind() : the i-th entry of the table of error kinds (every kind an lm_err can carry,
 *  the code it always has, its one-line meaning).  @return 0 when i is past the end. */
LM_API int lm_error_kind(size_t i, const char **name, lm_code *code, const char **meaning);

/* ---------------------------------------------------------------------------------------------
 * Data types of the safetensors format
 * ------------------------------------------------------------------------------------------- */
typedef enum {
    LM_DT_BOOL = 0,
    LM_DT_U8, LM_DT_I8, LM_DT_I16, LM_DT_U16, LM_DT_I32, LM_DT_U32, LM_DT_I64, LM_DT_U64,
    LM_DT_F16, LM_DT_BF16, LM_DT_F32, LM_DT_F64, LM_DT_C64,
    LM_DT_F8_E4M3, LM_DT_F8_E5M2, LM_DT_F8_E8M0, LM_DT_F8_E4M3FNUZ, LM_DT_F8_E5M2FNUZ,
    LM_DT_F4, LM_DT_F6_E2M3, LM_DT_F6_E3M2,
    LM_DT_COUNT
} lm_dtype;

/*! lm_dtype_name() : the format's spelling ("BF16"); "?" for an invalid value. */
LM_API const char *lm_dtype_name(lm_dtype dt);
/*! lm_dtype_bits() : bits per element (4 for F4, 6 for F6_*, 16 for BF16 ...). */
LM_API unsigned lm_dtype_bits(lm_dtype dt);
/*! lm_dtype_parse() : name (n_bytes long, not necessarily NUL-terminated) -> dtype.
 *  @return 1 if known, 0 otherwise. */
LM_API int lm_dtype_parse(const char *name, size_t n_bytes, lm_dtype *out);

/* ---------------------------------------------------------------------------------------------
 * Reading safetensors files
 * ------------------------------------------------------------------------------------------- */
typedef struct lm_st_file lm_st_file;

typedef struct lm_tensor_info {
    const char *name;      /* NUL-terminated, UTF-8; owned by the file */
    lm_dtype dtype;
    size_t n_dims;
    const uint64_t *shape; /* n_dims entries; owned by the file */
    uint64_t n_elems;      /* product of shape (1 for a scalar) */
    uint64_t begin, end;   /* byte range relative to the start of the data section */
} lm_tensor_info;

/*! lm_st_open() :
 *  Opens path read-only, maps it, parses and validates the header strictly.
 *  @return the file, or NULL with *err filled (err->kind names the problem, err->path = path).
 *  Ownership: close with lm_st_close(); tensor infos and data pointers stay valid until then. */
LM_API lm_st_file *lm_st_open(const char *path, lm_err *err);
/*! lm_st_open_buffer() : the same checks on bytes in memory.  name is used in errors.
 *  Ownership: buf is borrowed and must outlive the returned file. */
LM_API lm_st_file *lm_st_open_buffer(const void *buf, size_t n_bytes, const char *name,
                                     lm_err *err);
LM_API void lm_st_close(lm_st_file *f);

LM_API const char *lm_st_path(const lm_st_file *f);
LM_API size_t lm_st_n_tensors(const lm_st_file *f);
/*! lm_st_tensor() : i-th tensor in header order (i < lm_st_n_tensors()). */
LM_API const lm_tensor_info *lm_st_tensor(const lm_st_file *f, size_t i);
/*! lm_st_find() : tensor by exact name, or NULL. *index receives its position when not NULL. */
LM_API const lm_tensor_info *lm_st_find(const lm_st_file *f, const char *name, size_t *index);
LM_API size_t lm_st_n_metadata(const lm_st_file *f);
/*! lm_st_metadata() : i-th "__metadata__" entry in header order; pointers owned by the file. */
LM_API void lm_st_metadata(const lm_st_file *f, size_t i, const char **key, const char **value);
/*! lm_st_data() : start of the data section (read-only mapping); tensor bytes are at
 *  lm_st_data(f) + info->begin.  lm_st_data_offset() is its offset in the file (8 + N). */
LM_API const uint8_t *lm_st_data(const lm_st_file *f);
LM_API uint64_t lm_st_data_offset(const lm_st_file *f);
LM_API uint64_t lm_st_data_bytes(const lm_st_file *f);
/*! lm_st_fd() : the open file descriptor (-1 for a buffer). */
LM_API int lm_st_fd(const lm_st_file *f);

/* ---------------------------------------------------------------------------------------------
 * Models: a single file, a sharded checkpoint (model.safetensors.index.json) or a directory
 * ------------------------------------------------------------------------------------------- */
typedef struct lm_model lm_model;

typedef struct lm_model_entry {
    const lm_tensor_info *info; /* owned by the shard file */
    size_t file;                /* index of the shard: lm_model_file(m, file) */
} lm_model_entry;

/*! lm_model_open() :
 *  path is a .safetensors file, a model.safetensors.index.json, or a directory holding
 *  model.safetensors or model.safetensors.index.json.  Every referenced shard is opened and
 *  checked; the index must route every tensor to the shard that holds it.
 *  Ownership: close with lm_model_close(). */
LM_API lm_model *lm_model_open(const char *path, lm_err *err);
LM_API void lm_model_close(lm_model *m);
LM_API size_t lm_model_n_files(const lm_model *m);
LM_API const lm_st_file *lm_model_file(const lm_model *m, size_t i);
/*! lm_model_n_tensors() / lm_model_tensor() : all tensors, shard by shard, header order. */
LM_API size_t lm_model_n_tensors(const lm_model *m);
LM_API const lm_model_entry *lm_model_tensor(const lm_model *m, size_t i);
/*! lm_model_find() : tensor by name, or NULL (*index receives its position if not NULL). */
LM_API const lm_model_entry *lm_model_find(const lm_model *m, const char *name, size_t *index);
/*! lm_model_index_path() : the index file when the model is sharded, else NULL. */
LM_API const char *lm_model_index_path(const lm_model *m);


/* ---------------------------------------------------------------------------------------------
 * Merging
 * ------------------------------------------------------------------------------------------- */
typedef struct lm_merge_adapter {
    const char *dir; /* PEFT adapter directory (or a multi-adapter save with one sub-folder), or
                        an adapter file/directory of another tool (see lm_format_opts) */
    double weight;   /* multiplies the adapter's delta (1 = as trained; negative un-merges) */
} lm_merge_adapter;

/* ---------------------------------------------------------------------------------------------
 * Adapters from other tools: kohya-ss / LyCORIS, mlx-lm, torchtune, diffusers, lora_diffusion,
 * LoRA-SAM / LoRA-ViT, microsoft loralib and raw up/down files.  Each is read and normalised into
 * a PEFT adapter (adapter_config.json + base_model.model.<module>.lora_A/B.weight ...), which the
 * PEFT path merges; `convert` writes that adapter out.  Module names that need the base (kohya's
 * flattened names, unnamed up/down lists) are resolved against it.
 * ------------------------------------------------------------------------------------------- */
typedef struct lm_format_opts {
    const char *target_modules; /* unnamed up/down pairs: comma-separated module paths or leaf
                                   names, in pair order (NULL: the order from the base's config.json) */
    double lora_alpha;          /* alpha of formats that do not record it (loralib, torchtune):
                                   scale = alpha / r; 0 = not given */
    double lora_scale;          /* or the multiplier itself (also settles mlx-lm's version
                                   question); 0 = not given */
} lm_format_opts;

/*! lm_adapter_format_detect() : the format of an adapter path that is not a PEFT adapter
 *  directory ("kohya-ss LoRA", "mlx-lm" ...), read from file names, headers and keys.
 *  @return a static name, or NULL for a PEFT adapter directory, a model, or nothing known. */
LM_API const char *lm_adapter_format_detect(const char *path);

/*! lm_adapter_convert() :
 *  Reads any supported adapter (PEFT directories too) and writes it as a PEFT adapter directory
 *  out_dir (adapter_config.json + adapter_model.safetensors, created if needed).  base_path
 *  (may be NULL) is needed by formats whose module names only the base can resolve.  Merging
 *  out_dir gives the same tensors, byte for byte, as merging input (only the provenance metadata
 *  names another adapter).  *notes (may be NULL) receives one line per remark (malloc'd, free()).
 *  Nothing is written unless everything checks out. */
LM_API lm_code lm_adapter_convert(const char *input, const char *out_dir, const char *base_path,
                                  const lm_format_opts *opts, char **notes, lm_err *err);

/*! lm_adapter_format_describe() : what a non-PEFT adapter is and how it maps (module names,
 *  scales, the PEFT config it becomes).  @return LM_OK with *text (malloc'd) or an error. */
LM_API lm_code lm_adapter_format_describe(const char *input, const char *base_path,
                                          const lm_format_opts *opts, char **text, lm_err *err);

typedef struct lm_merge_job {
    const char *base_path;  /* .safetensors, model.safetensors.index.json or a model directory */
    const char *out_path;   /* a *.safetensors file (or an existing regular file) to write
                               through a temp file + rename; or a directory: an existing one, a
                               path ending in '/', or any other name that does not exist yet
                               (*.gguf, *.bin, *.pt ... are refused): then a model directory
                               comes out: model.safetensors or shards + index, config.json
                               adjusted, the allow-listed model files (tokenizer, chat template
                               ...), a model card */
    uint64_t max_shard_bytes; /* directory OUT: bytes per shard at most (0 = 5 GB) */
    const lm_merge_adapter *adapters;
    size_t n_adapters;
    int n_threads;          /* <= 0: all cores; the output does not depend on it */
    int dry_run;            /* plan and check everything, write nothing */
    int do_fsync;           /* fsync the output before the rename */
    const char *out_dtype;  /* NULL or "auto" (keep), "bf16", "f16", "f32" */
    const char *kernels;    /* NULL (auto), "ref", "avx2", "avx512" */
    /* progress: may be NULL; called from worker threads, one at a time */
    void (*progress)(void *ctx, uint64_t done_bytes, uint64_t total_bytes);
    void *progress_ctx;
    uint64_t tile_elems;    /* f32 elements per row tile (0 = default 2^19), for tests and
                               benchmarks: the output is the same for every thread count, but
                               products done by BLAS (most types other than LoRA) may differ in
                               the last bit between tile sizes, since BLAS picks its kernel by
                               the matrix shape */
    const lm_format_opts *formats; /* adapters from other tools (NULL: defaults) */
    int exactness_off;      /* benchmarks only: tensors whose deltas are all low-rank are then
                               computed in f32 without the correct-rounding certification */
    /* fields added in 0.2 (a zeroed job keeps the 0.1 meaning, except where said) */
    int allow_noop;         /* accept a merge that changes nothing (otherwise LM_E_MISMATCH "NoOp") */
    int strict;             /* a warning is an error (LM_E_WARNING), before anything is written */
    int hash_outputs;       /* sha256 of every file written, in the report (reads them back) */
    const char *const *copy_files; /* directory OUT: more file names to copy from the base (or the
                                      adapter) directory, beside the allow-listed model files */
    size_t n_copy_files;
    int tensor_norms;       /* measure ||dW|| and ||W|| of every computed tensor for the report
                               (a pass in double over them; changed elements are always counted) */
    /* shard jobs (0.3): a directory OUT written by several processes (README "Shard jobs").
     * shard_mode LM_SHARDS_WORKER: this process writes only its output shards, balanced by bytes
     * (largest first, each to the worker with the fewest bytes so far, ties to the lower k and
     * worker: with shards of equal size k % shard_count == shard_index), each through a
     * temporary name, renamed when complete, with
     * a sidecar in OUT/.lora-merge-shards/); shards already complete and verified are skipped.
     * LM_SHARDS_INDEX: checks every shard, then writes the index, side files and report. */
    int shard_mode;         /* LM_SHARDS_NONE (0), LM_SHARDS_WORKER, LM_SHARDS_INDEX */
    unsigned shard_index, shard_count;
    const char *const *record_args; /* worker: the command line recorded for `finalize OUT` */
    size_t n_record_args;
    int simulate_nf4;       /* QLoRA adapters on a 16-bit base: every 2-D weight the merge changes
                               (not embeddings, not the output head) first goes through
                               bitsandbytes' NF4 quantize/dequantize (blocks of 64, rounded to the
                               weight's dtype), what the adapter saw in training, then is merged;
                               2: with double quantization (bnb_4bit_use_double_quant) */
    int shard_verify;       /* shard jobs: read every shard back and compare its sha256 with its
                               sidecar (finalize, and a worker's kept shards); otherwise only a
                               shard whose size or identity (inode, mtime, ctime) changed since
                               its worker recorded it is read back */
} lm_merge_job;

enum { LM_SHARDS_NONE = 0, LM_SHARDS_WORKER = 1, LM_SHARDS_INDEX = 2 };

typedef struct lm_merge_warning {
    const char *code;    /* stable: "BaseModelMismatch", "ConfigMissing" ... (README lists them) */
    const char *message; /* one line */
} lm_merge_warning;

typedef struct lm_merge_file {
    const char *name;    /* name in OUT ("model-00001-of-00002.safetensors", "config.json") */
    const char *path;    /* where it is (or would be, on a dry run) */
    const char *kind;    /* "weights", "index", "config", "generation_config", "tokenizer",
                            "chat_template", "processor", "license", "model_card", "extra" */
    const char *origin;  /* "merge", "base", "adapter", "generated"; "kept": a shard worker's shard
                            already complete and verified, left as it was (not written) */
    uint64_t n_bytes;
    const char *sha256;  /* 64 lowercase hex digits, or NULL (not asked for, or a dry run) */
} lm_merge_file;

typedef struct lm_merge_report {
    size_t n_tensors;        /* tensors in the output */
    size_t n_changed;        /* computed (merged, replaced, converted) */
    size_t n_lowrank;        /* low-rank deltas applied */
    size_t n_replaced;       /* base tensors replaced by adapter tensors */
    size_t n_added;          /* tensors the adapters add */
    uint64_t out_bytes;      /* size of the output file (0 on a dry run) */
    double lowrank_gflop;    /* work of the low-rank products */
    double seconds;          /* wall time of the whole job */
    int n_threads;           /* the threads used; finalize: the most a worker used (its sidecars), 0 if unknown */
    const char *kernels;     /* kernel variant used ("avx2" ...) */
    size_t n_exact_tensors;  /* tensors on a certified path (every delta low-rank, an IA3 scaling,
                                ...; see the README): each element the exact value rounded once */
    uint64_t n_recomputed;   /* elements of those the fast path could not certify, recomputed
                                in f64 (per tensor in the JSON report: "recomputed") */
    size_t n_notes;
    const char *const *notes; /* one-line remarks: skipped modules, orientation guesses ... */
    const char *plan_text;   /* one line per changed tensor: "name dtype shape <- ops" */
    const char *json;        /* the whole report as a JSON object (README: "The JSON report") */
    /* added in 0.2 */
    size_t n_warnings;
    const lm_merge_warning *warnings;
    size_t n_files;
    const lm_merge_file *files;  /* what was written (or would be, on a dry run), in order */
    size_t n_removed;
    const char *const *removed;  /* stale files of an earlier merge removed from a directory OUT */
    uint64_t bytes_to_write;     /* all files, weights and others, but kept shards (origin "kept") */
    const char *out_kind;        /* "file", "directory", or NULL (a dry run without OUT) */
} lm_merge_report;

/*! lm_merge_run() :
 *  Opens the base and the adapters, plans (every check), then writes the merged file.
 *  @return LM_OK with *report filled (when report is not NULL), or an error with *err filled;
 *  no output or temporary file is left behind on error.  An OUT that is the same file as an
 *  input (by device and inode) is refused before anything is opened for writing.
 *  Ownership: free *report with lm_merge_report_free(). */
LM_API lm_code lm_merge_run(const lm_merge_job *job, lm_merge_report **report, lm_err *err);
LM_API void lm_merge_report_free(lm_merge_report *report);

/*! lm_merge_batch() :
 *  K merges of one base in one pass (`lora-merge batch`): each base tile (or copy chunk) that
 *  several jobs need is read once and used by each in turn; job j writes jobs[j].out_path with
 *  its own adapters, weights and options, byte-identical to lm_merge_run(&jobs[j]) (report
 *  included, but for its timings).  Every job shares base_path, n_threads, kernels, tile_elems,
 *  exactness_off and dry_run (the first job's progress callback follows the whole pass); shard
 *  mode is refused; no two jobs may write the same OUT or one inside another.
 *  All or nothing: every job is opened, planned and checked (its OUT too) before anything is
 *  written, and every job's files are written and checked (NoOp, --strict, inputs unchanged)
 *  before any OUT is committed; only then are the OUTs committed, in job order, each by the
 *  single merge's protocol.  A failure before that leaves every OUT as it was; a failure while
 *  committing job j (a rename or directory sync) leaves jobs 0..j-1 committed (*n_committed of
 *  them), job j as the single merge leaves a failed commit, the later ones as they were.
 *  @return LM_OK with reports[j] (reports may be NULL) for every job, or an error with *err
 *  filled and *failed_job the job it concerns (reports are then NULL).
 *  Ownership: free each reports[j] with lm_merge_report_free(). */
LM_API lm_code lm_merge_batch(const lm_merge_job *jobs, size_t n_jobs, lm_merge_report **reports, size_t *failed_job,
                              size_t *n_committed, lm_err *err);

/*! lm_batch_jobs_read() : a batch's JOBS.json: a JSON array with one entry per job, each the
 *  job's command line after BASE as an array of strings (["--scale", "0.5", "lora-a", "out-a/"]).
 *  @return LM_OK with *args (n_jobs NULL-terminated arrays of strings), or an error naming the
 *  file and the job.  Ownership: lm_batch_jobs_free(). */
LM_API lm_code lm_batch_jobs_read(const char *path, char ****args, size_t *n_jobs, lm_err *err);
LM_API void lm_batch_jobs_free(char ***args, size_t n_jobs);

/*! lm_adapter_describe() :
 *  What an adapter directory is: type and variant, rank/alpha and patterns, scale per module
 *  group, targets, tensor count and dtypes, and anything lora-merge would refuse.
 *  @return LM_OK with *text (malloc'd, several lines) or an error.  Ownership: free(*text). */
LM_API lm_code lm_adapter_describe(const char *dir, char **text, lm_err *err);

/*! lm_inspect() :
 *  What PATH is: a model (file, index or directory: tensors, metadata, totals, and what its
 *  config.json says) or an adapter directory (as lm_adapter_describe(), plus the base it
 *  declares).  as_json: one JSON object instead of text.
 *  @return LM_OK with *text (malloc'd) or an error.  Ownership: free(*text). */
LM_API lm_code lm_inspect(const char *path, int as_json, char **text, lm_err *err);

/*! lm_version_text() : "lora-merge 0.1.0 (kernels avx2, OpenBLAS ...)" (static storage). */
LM_API const char *lm_version_text(void);

/*! lm_shards_recorded() : what the shard workers of out_dir recorded for `lora-merge finalize
 *  OUT`: their command line (without --shards) and working directory.
 *  @return LM_OK with *args (n_args strings), *cwd, all malloc'd (free each, then the array);
 *  LM_E_USAGE when out_dir holds no shard plan. */
LM_API lm_code lm_shards_recorded(const char *out_dir, char ***args, size_t *n_args, char **cwd, lm_err *err);

#ifdef __cplusplus
}
#endif
#endif
