/* merge.c : lm_merge_run(): the orchestration.  Opens the base and the adapters, plans, decides
 * the output (output.c), runs the executor, and fills the report (report.c). */
#include "lora_merge.h"

#include "adapter_load.h"
#include "exec.h"
#include "gemm_tile.h"
#include "lm_error.h"
#include "lm_kernels.h"
#include "output.h"
#include "plan.h"
#include "report.h"
#include "st_writer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

const char *lm_version_text(void)
{
    static char buf[256];
    if (buf[0] == '\0') {
        lm_kernels k;
        lm_kernels_select(&k, NULL);
        snprintf(buf, sizeof buf, "lora-merge %s (kernels %s, %s)", LM_VERSION_STRING, k.name, lm_blas_name());
    }
    return buf;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int parse_dtype_opt(const char *s, int *set, lm_dtype *dt)
{
    *set = 0;
    if (s == NULL || strcmp(s, "auto") == 0)
        return 1;
    *set = 1;
    if (strcmp(s, "bf16") == 0 || strcmp(s, "BF16") == 0)
        *dt = LM_DT_BF16;
    else if (strcmp(s, "f16") == 0 || strcmp(s, "F16") == 0 || strcmp(s, "fp16") == 0)
        *dt = LM_DT_F16;
    else if (strcmp(s, "f32") == 0 || strcmp(s, "F32") == 0 || strcmp(s, "fp32") == 0)
        *dt = LM_DT_F32;
    else
        return 0;
    return 1;
}

/* An output file must not be any input, through any alias (symlink, hard link). */
static lm_code check_not_input(const char *out, const lm_model *m, lm_adapter *const *ads, size_t n_ads, lm_err *err)
{
    struct stat st;
    if (stat(out, &st) != 0)
        return LM_OK;
    for (size_t i = 0; i < lm_model_n_files(m); i++)
        if (lm_same_file(out, lm_st_path(lm_model_file(m, i))))
            return lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as the base '%s'",
                           lm_st_path(lm_model_file(m, i)));
    if (lm_model_index_path(m) && lm_same_file(out, lm_model_index_path(m)))
        return lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as the index '%s'",
                       lm_model_index_path(m));
    for (size_t a = 0; a < n_ads; a++) {
        const char *inputs[2] = {ads[a]->weights_path, ads[a]->config_path};
        for (size_t i = 0; i < 2; i++)
            if (lm_same_file(out, inputs[i]))
                return lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output is the same file as the input '%s'",
                               inputs[i]);
    }
    return LM_OK;
}

/* what the adapter loader noticed (formats read, renames) goes into the report */
static void note_adapters(lm_plan *plan, lm_adapter *const *ads, size_t n)
{
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < ads[i]->n_notes; k++)
            plan_note(plan, "%s", ads[i]->notes[k]);
}

static lm_code merge_run(const lm_merge_job *job, lm_merge_report **report, lm_err *err)
{
    double t0 = now_seconds();
    lm_code rc = LM_OK;
    lm_model *model = NULL;
    lm_adapter **ads = NULL;
    lm_plan *plan = NULL;
    lm_report_impl *ri = NULL;
    lm_kernels kern;
    lm_out_target ot;
    memset(&ot, 0, sizeof ot);
    char *base_dir = NULL;
    if (report)
        *report = NULL;
    if (job == NULL || job->base_path == NULL || (job->out_path == NULL && !job->dry_run) || job->n_adapters == 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "a merge needs a base, at least one adapter and an output");
    if (job->out_path != NULL && job->out_path[0] == '\0')
        return lm_fail(err, LM_E_USAGE, "Usage", "the output path is empty");
    if (job->out_path != NULL) { /* a directory OUT: a model directory comes out */
        struct stat st;
        size_t n = strlen(job->out_path);
        ot.is_dir = job->out_path[n - 1] == '/' || (stat(job->out_path, &st) == 0 && S_ISDIR(st.st_mode));
        if (ot.is_dir) {
            while (n > 1 && job->out_path[n - 1] == '/')
                n--;
            ot.dir = strndup(job->out_path, n);
            if (ot.dir == NULL)
                return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
    }
    if (job->max_shard_bytes && !ot.is_dir && !job->dry_run)
        return lm_fail(err, LM_E_USAGE, "Usage", "--max-shard-size needs a directory OUT (e.g. 'merged/')");
    lm_plan_opts popts;
    memset(&popts, 0, sizeof popts);
    if (!parse_dtype_opt(job->out_dtype, &popts.out_dtype_set, &popts.out_dtype))
        return lm_fail(err, LM_E_USAGE, "Usage", "--dtype must be auto, bf16, f16 or f32 (not '%s')", job->out_dtype);
    if (lm_kernels_select(&kern, job->kernels) != 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "kernel variant '%s' cannot run on this CPU", job->kernels);
    ri = calloc(1, sizeof *ri);
    ads = calloc(job->n_adapters, sizeof *ads);
    if (ri == NULL || ads == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    model = lm_model_open(job->base_path, err);
    if (model == NULL) {
        rc = err ? err->code : LM_E_FORMAT;
        goto done;
    }
    for (size_t i = 0; i < job->n_adapters; i++) {
        ads[i] = lm_adapter_open_with(job->adapters[i].dir, job->adapters[i].weight, model, job->formats, err);
        if (ads[i] == NULL) {
            rc = err ? err->code : LM_E_FORMAT;
            goto done;
        }
    }
    plan = lm_plan_create(model, ads, job->n_adapters, &popts, err);
    if (plan == NULL) {
        rc = err ? err->code : LM_E_FORMAT;
        goto done;
    }
    note_adapters(plan, ads, job->n_adapters);
    if (job->out_path != NULL) {
        if ((rc = lm_out_plan_shards(&ot, job, plan, err)) != LM_OK)
            goto done;
        for (size_t i = 0; i < ot.n_shards; i++)
            if ((rc = check_not_input(ot.paths[i], model, ads, job->n_adapters, err)) != LM_OK) {
                lm_err_set_path(err, ot.paths[i]);
                goto done;
            }
        base_dir = lm_base_directory(job->base_path);
        if (ot.is_dir && base_dir != NULL && lm_same_file(ot.dir, base_dir)) {
            rc = lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output directory is the base model's directory");
            lm_err_set_path(err, ot.dir);
            goto done;
        }
        if (ot.is_dir) {
            struct stat st;
            if (stat(ot.dir, &st) != 0) {
                if (mkdir(ot.dir, 0777) != 0) {
                    rc = lm_fail_errno(err, errno, "cannot create the output directory");
                    lm_err_set_path(err, ot.dir);
                    goto done;
                }
                ot.created_dir = 1;
            }
            if (ot.n_shards > 1)
                plan_note(plan, "output in %zu shards of at most %llu bytes, with model.safetensors.index.json",
                          ot.n_shards, (unsigned long long)(job->max_shard_bytes ? job->max_shard_bytes
                                                                                  : LM_DEFAULT_SHARD_BYTES));
        }
    }
    if ((rc = lm_report_build(ri, job, ads, plan, err)) != LM_OK)
        goto done;
    lm_exec_stats st;
    memset(&st, 0, sizeof st);
    st.n_threads = job->n_threads;
    if (!job->dry_run) {
        lm_exec_opts eo;
        memset(&eo, 0, sizeof eo);
        eo.n_threads = job->n_threads;
        eo.do_fsync = job->do_fsync;
        eo.kernels = &kern;
        eo.progress = job->progress;
        eo.progress_ctx = job->progress_ctx;
        eo.tile_elems = job->tile_elems;
        eo.exactness_off = job->exactness_off;
        eo.recomputed = ri->recomputed;
        eo.n_shards = ot.n_shards;
        eo.shard_paths = (const char *const *)ot.paths;
        eo.shard_of = ot.shard_of;
        if ((rc = lm_exec_run(plan, model, ads, ot.paths[0], &eo, &st, err)) != LM_OK) {
            lm_report_drop_tree(ri);
            goto done;
        }
        if (ot.is_dir) {
            char *old_index = lm_path_join(ot.dir, "model.safetensors.index.json");
            if (ot.n_shards > 1)
                rc = lm_out_write_index(&ot, plan, err);
            else if (old_index != NULL && unlink(old_index) == 0) /* it listed an earlier output */
                plan_note(plan, "removed a stale model.safetensors.index.json from the output directory");
            free(old_index);
            long n_copied = rc == LM_OK && base_dir ? lm_out_copy_model_files(&ot, base_dir, err) : 0;
            if (n_copied < 0)
                rc = err ? err->code : LM_E_IO;
            if (rc != LM_OK) {
                lm_report_drop_tree(ri);
                goto done;
            }
            if (n_copied > 0)
                plan_note(plan, "copied %ld non-weight file%s (config, tokenizer ...) from %s", n_copied,
                          n_copied == 1 ? "" : "s", base_dir);
            if (n_copied > 0 && popts.out_dtype_set)
                plan_note(plan, "the copied config.json keeps the base's torch_dtype although --dtype changed the weights");
        }
    }
    lm_merge_report *r = &ri->pub;
    r->n_tensors = plan->n;
    r->n_changed = plan->n_changed;
    r->n_lowrank = plan->n_lowrank;
    r->n_replaced = plan->n_replaced;
    r->n_added = plan->n_new;
    r->out_bytes = st.bytes_written;
    r->lowrank_gflop = plan->lowrank_flops * 1e-9;
    r->n_threads = st.n_threads;
    r->kernels = kern.name;
    r->n_exact_tensors = st.n_exact_tensors;
    r->n_recomputed = st.n_recomputed;
    lm_report_add_exactness(ri, plan, job->exactness_off, !job->dry_run);
    r->plan_text = ri->plan_text;
    ri->notes = plan->notes;
    r->n_notes = plan->n_notes;
    r->notes = (const char *const *)plan->notes;
    plan->notes = NULL;
    plan->n_notes = 0;
    r->seconds = now_seconds() - t0;
    if ((rc = lm_report_finish_json(ri, err)) != LM_OK)
        goto done;
    if (report) {
        *report = r;
        ri = NULL;
    }
done:
    if (ri != NULL) {
        lm_report_drop_tree(ri);
        lm_merge_report_free(&ri->pub);
    }
    if (rc != LM_OK && ot.created_dir)
        rmdir(ot.dir); /* only if still empty: nothing of ours is left in it */
    lm_out_target_free(&ot);
    free(base_dir);
    lm_plan_free(plan);
    if (ads)
        for (size_t i = 0; i < job->n_adapters; i++)
            lm_adapter_free(ads[i]);
    free(ads);
    lm_model_close(model);
    return rc;
}

/* the work always records its error in a local lm_err, so the code returned is the real one even
 * when the caller passes err == NULL */
lm_code lm_merge_run(const lm_merge_job *job, lm_merge_report **report, lm_err *err)
{
    lm_err e;
    lm_err_clear(&e);
    lm_code rc = merge_run(job, report, &e);
    if (rc != LM_OK && e.code == LM_OK) /* every failure path names itself; this is a safety net */
        lm_fail(&e, rc, NULL, "merge failed");
    if (err != NULL && rc != LM_OK)
        *err = e;
    return rc;
}
