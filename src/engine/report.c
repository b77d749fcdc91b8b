/* SPDX-License-Identifier: MIT */
/* report.c : notes, warnings, the files written, the plan text, the JSON report (its format is
 * documented in the README and versioned by LM_REPORT_VERSION), and inspect.  Builds text;
 * prints nothing (the CLI does). */
#include "report.h"

#include "exec_exact.h"
#include "inputs.h"
#include "lm_error.h"
#include "method.h"
#include "model_files.h"
#include "output.h"
#include "plan_quant_bnb.h"

#include <cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ------------------------------------------------------------------------------------------ */
/* the report object                                                                            */
/* ------------------------------------------------------------------------------------------ */
lm_report_impl *lm_report_new(void)
{
    return calloc(1, sizeof(lm_report_impl));
}

void lm_report_free(lm_report_impl *ri)
{
    if (ri == NULL)
        return;
    for (size_t i = 0; i < ri->n_notes; i++)
        free(ri->notes[i]);
    free(ri->notes);
    for (size_t i = 0; i < ri->n_warnings; i++) {
        free((char *)ri->warnings[i].code);
        free((char *)ri->warnings[i].message);
    }
    free(ri->warnings);
    for (size_t i = 0; i < ri->n_files; i++) {
        free((char *)ri->files[i].name);
        free((char *)ri->files[i].path);
        free((char *)ri->files[i].sha256);
    }
    free(ri->files);
    for (size_t i = 0; i < ri->n_removed; i++)
        free(ri->removed[i]);
    free(ri->removed);
    free(ri->plan_text);
    free(ri->json);
    free(ri->recomputed);
    free(ri);
}

void lm_merge_report_free(lm_merge_report *r)
{
    lm_report_free((lm_report_impl *)r);
}

/* room for one more element of size elem in *arr (capacity *cap, n used); 0 on success */
static int grow(void **arr, size_t *cap, size_t n, size_t elem)
{
    if (n < *cap)
        return 0;
    size_t nc = *cap ? 2 * *cap : 16;
    void *na = realloc(*arr, nc * elem);
    if (na == NULL)
        return -1;
    *arr = na;
    *cap = nc;
    return 0;
}

static char *vformat(const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        return NULL;
    for (char *p = s; *p; p++) /* one line: names come from input */
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    return s;
}

void lm_report_note(lm_report_impl *ri, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = vformat(fmt, ap);
    va_end(ap);
    if (s == NULL || grow((void **)&ri->notes, &ri->cap_notes, ri->n_notes, sizeof *ri->notes) != 0) {
        free(s);
        ri->oom = 1;
        return;
    }
    ri->notes[ri->n_notes++] = s;
}

void lm_report_warn(lm_report_impl *ri, const char *code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = vformat(fmt, ap), *c = strdup(code);
    va_end(ap);
    if (s == NULL || c == NULL ||
        grow((void **)&ri->warnings, &ri->cap_warnings, ri->n_warnings, sizeof *ri->warnings) != 0) {
        free(s);
        free(c);
        ri->oom = 1;
        return;
    }
    ri->warnings[ri->n_warnings++] = (lm_merge_warning){c, s};
}

void lm_report_take_notes(lm_report_impl *ri, lm_plan *plan)
{
    if (plan == NULL || plan->n_notes == 0)
        return;
    char **all = malloc((plan->n_notes + ri->n_notes + 1) * sizeof *all);
    if (all == NULL) {
        ri->oom = 1;
        return;
    }
    memcpy(all, plan->notes, plan->n_notes * sizeof *all);
    if (ri->n_notes)
        memcpy(all + plan->n_notes, ri->notes, ri->n_notes * sizeof *all);
    free(ri->notes);
    free(plan->notes);
    ri->notes = all;
    ri->n_notes += plan->n_notes;
    ri->cap_notes = ri->n_notes + 1;
    plan->notes = NULL;
    plan->n_notes = 0;
}

void lm_report_file(lm_report_impl *ri, const char *name, const char *path, const char *kind, const char *origin,
                    uint64_t n_bytes, const char *sha256)
{
    char *n = strdup(name), *p = strdup(path), *h = sha256 ? strdup(sha256) : NULL;
    if (n == NULL || p == NULL || (sha256 && h == NULL) ||
        grow((void **)&ri->files, &ri->cap_files, ri->n_files, sizeof *ri->files) != 0) {
        free(n);
        free(p);
        free(h);
        ri->oom = 1;
        return;
    }
    ri->files[ri->n_files++] = (lm_merge_file){n, p, kind, origin, n_bytes, h};
}

void lm_report_removed(lm_report_impl *ri, const char *name)
{
    char *n = strdup(name);
    if (n == NULL || grow((void **)&ri->removed, &ri->cap_removed, ri->n_removed, sizeof *ri->removed) != 0) {
        free(n);
        ri->oom = 1;
        return;
    }
    ri->removed[ri->n_removed++] = n;
}

/* ------------------------------------------------------------------------------------------ */
/* plan text and JSON                                                                           */
/* ------------------------------------------------------------------------------------------ */
static cJSON *json_str_or_null(const char *s)
{
    return s != NULL && s[0] != '\0' ? cJSON_CreateString(s) : cJSON_CreateNull();
}

static cJSON *json_shape(size_t n_dims, const uint64_t *shape)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t d = 0; d < n_dims && a; d++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber((double)shape[d]));
    return a;
}

/* a growing text buffer */
typedef struct {
    char *s;
    size_t used, cap;
    int oom;
} tbuf;

static void tb_printf(tbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(tbuf *b, const char *fmt, ...)
{
    for (;;) {
        if (b->oom)
            return;
        va_list ap;
        va_start(ap, fmt);
        int k = b->s ? vsnprintf(b->s + b->used, b->cap - b->used, fmt, ap) : -1;
        va_end(ap);
        if (k >= 0 && b->used + (size_t)k < b->cap) {
            b->used += (size_t)k;
            return;
        }
        size_t nc = b->cap ? 2 * b->cap : 4096;
        while (k >= 0 && nc < b->used + (size_t)k + 1)
            nc *= 2;
        char *ns = realloc(b->s, nc);
        if (ns == NULL) {
            b->oom = 1;
            return;
        }
        if (b->s == NULL)
            ns[0] = '\0';
        b->s = ns;
        b->cap = nc;
    }
}

/* rows of the view a LOWRANK op changes (row0 ..) */
static uint64_t op_rows(const lm_op *op)
{
    return op->axis ? op->in : op->out;
}

/* b is the next block of rows of the same delta as a (a fused MoE stack: one op per expert) */
static int same_lowrank_blocks(const lm_op *a, const lm_op *b)
{
    return a->kind == LM_OP_LOWRANK && b->kind == LM_OP_LOWRANK && a->name == b->name && a->module == b->module &&
           a->adapter == b->adapter && a->rank == b->rank && a->scale == b->scale && a->axis == b->axis &&
           op_rows(a) == op_rows(b) && b->row0 == a->row0 + op_rows(a);
}

/* the plan line's text for op q of t; a run of row blocks of one delta once, with its count */
static void op_text(tbuf *text, const lm_plan_tensor *t, size_t q)
{
    const lm_op *op = &t->ops[q];
    if (op->kind != LM_OP_LOWRANK) {
        tb_printf(text, " %s(#%zu)", op->name, op->adapter);
        return;
    }
    size_t n = 1;
    while (q + n < t->n_ops && same_lowrank_blocks(&t->ops[q + n - 1], &t->ops[q + n]))
        n++;
    tb_printf(text, " %s(r=%llu, scale=%g%s, #%zu)", op->name, (unsigned long long)op->rank, op->scale,
              op->axis ? ", transposed" : "", op->adapter);
    if (n > 1 || op_rows(op) != t->rows)
        tb_printf(text, " x%zu blocks of %llu rows", n, (unsigned long long)op_rows(op));
}

static const char *const PHASE_NAMES[LM_PHASE_COUNT] = {"open", "plan", "prepare", "write", "finish", "hash"};

static cJSON *tensor_stats_json(const lm_tensor_stats *st)
{
    if (st == NULL || !st->valid)
        return cJSON_CreateNull();
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "n_elems", (double)st->n_elems);
    cJSON_AddNumberToObject(o, "n_changed", (double)st->n_changed);
    cJSON_AddNumberToObject(o, "changed_fraction", st->n_elems ? (double)st->n_changed / (double)st->n_elems : 0.0);
    if (st->has_quant) {
        cJSON *q = cJSON_AddObjectToObject(o, "requantized");
        cJSON_AddNumberToObject(q, "blocks", (double)st->q_blocks);
        cJSON_AddNumberToObject(q, "blocks_kept", (double)st->q_blocks_kept);
        cJSON_AddNumberToObject(q, "err_max", st->q_err_max);
        cJSON_AddNumberToObject(q, "err_mean", st->q_err_mean);
        cJSON_AddNumberToObject(q, "delta_norm", st->q_delta_norm);
        cJSON_AddNumberToObject(q, "err_norm", st->q_err_norm);
    }
    if (st->has_norms) {
        cJSON_AddNumberToObject(o, "delta_norm", st->delta_norm);
        cJSON_AddNumberToObject(o, "base_norm", st->base_norm);
    } else {
        cJSON_AddNullToObject(o, "delta_norm");
        cJSON_AddNullToObject(o, "base_norm");
    }
    if (st->has_norms && st->base_norm > 0)
        cJSON_AddNumberToObject(o, "rel_delta_norm", st->delta_norm / st->base_norm);
    else
        cJSON_AddNullToObject(o, "rel_delta_norm");
    return o;
}

lm_code lm_report_plan_exact(lm_report_impl *ri, const lm_plan *p, lm_err *err)
{
    free(ri->recomputed);
    ri->recomputed = malloc((p->n + 1) * sizeof *ri->recomputed);
    if (ri->recomputed == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; i < p->n; i++) /* a dry run does not change them */
        ri->recomputed[i] = lm_exact_kind_of(&p->t[i]) != LM_EXACT_NONE || lm_exact_by_copy(&p->t[i]) ? 0 : UINT64_MAX;
    return LM_OK;
}

/* per changed tensor: "exact" (every element the exact value rounded once) and, after a real
 * run, "recomputed" (its elements recomputed in f64) */
static void tensor_exactness_json(cJSON *o, const lm_report_impl *ri, const lm_merge_job *job, size_t i)
{
    const int exact = ri->recomputed != NULL && ri->recomputed[i] != UINT64_MAX;
    cJSON_AddBoolToObject(o, "exact", exact && !job->exactness_off);
    if (exact && !job->dry_run)
        cJSON_AddNumberToObject(o, "recomputed", (double)ri->recomputed[i]);
}

lm_code lm_report_finish(lm_report_impl *ri, const lm_report_ctx *c, lm_err *err)
{
    const lm_merge_job *job = c->job;
    const lm_plan *p = c->plan;
    lm_merge_report *r = &ri->pub;
    tbuf text = {0};
    cJSON *root = cJSON_CreateObject();
    if (root == NULL)
        goto nomem;
    r->n_tensors = p->n;
    r->n_changed = p->n_changed;
    r->n_lowrank = p->n_lowrank;
    r->n_replaced = p->n_replaced;
    r->n_added = p->n_new;
    r->out_bytes = c->out_bytes;
    r->lowrank_gflop = p->lowrank_flops * 1e-9;
    r->n_threads = c->n_threads;
    r->kernels = c->kernels;
    r->n_exact_tensors = c->n_exact_tensors;
    r->n_recomputed = c->n_recomputed;
    r->out_kind = c->out_kind;
    r->bytes_to_write = 0;
    for (size_t i = 0; i < ri->n_files; i++) /* a worker's shard kept as it was is not written */
        r->bytes_to_write += strcmp(ri->files[i].origin, "kept") != 0 ? ri->files[i].n_bytes : 0;

    cJSON_AddNumberToObject(root, "report_version", LM_REPORT_VERSION);
    cJSON_AddStringToObject(root, "tool", "lora-merge");
    cJSON_AddStringToObject(root, "version", LM_VERSION_STRING);
    cJSON_AddBoolToObject(root, "ok", 1);
    cJSON_AddBoolToObject(root, "dry_run", job->dry_run != 0);
    cJSON_AddStringToObject(root, "base", job->base_path);
    cJSON_AddItemToObject(root, "out", json_str_or_null(job->out_path));
    cJSON_AddItemToObject(root, "out_kind", json_str_or_null(c->out_kind));
    cJSON_AddItemToObject(root, "out_dtype", json_str_or_null(c->out_dtype));
    cJSON *ja = cJSON_AddArrayToObject(root, "adapters");
    for (size_t i = 0; i < job->n_adapters && ja; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "dir", c->ads[i]->dir);
        cJSON_AddStringToObject(a, "name", c->ads[i]->name);
        cJSON_AddStringToObject(a, "peft_type", c->ads[i]->cfg->peft_type);
        cJSON_AddStringToObject(a, "weights", c->ads[i]->weights_path);
        cJSON_AddItemToObject(a, "sha256", json_str_or_null(c->adapter_sha256 ? c->adapter_sha256[i] : NULL));
        cJSON_AddNumberToObject(a, "weight", c->ads[i]->weight);
        cJSON_AddNumberToObject(a, "n_tensors", (double)c->ads[i]->ts->n);
        cJSON_AddItemToArray(ja, a);
    }
    cJSON *jt = cJSON_AddArrayToObject(root, "changed_tensors");
    uint64_t total_changed = 0, total_elems = 0;
    int all_stats = 1;
    for (size_t i = 0; i < p->n && jt; i++) {
        const lm_plan_tensor *t = &p->t[i];
        if (t->n_ops == 0 && t->dtype == t->src_dtype)
            continue;
        const lm_tensor_stats *st = c->stats ? &c->stats[i] : NULL;
        char sh[128];
        lm_shape_str(sh, sizeof sh, t->n_dims, t->shape);
        tb_printf(&text, "  %s %s %s%s:", t->name, lm_dtype_name(t->dtype), sh, t->base ? "" : " (new)");
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", t->name);
        cJSON_AddStringToObject(o, "dtype", lm_dtype_name(t->dtype));
        cJSON_AddStringToObject(o, "src_dtype", lm_dtype_name(t->src_dtype));
        cJSON_AddItemToObject(o, "shape", json_shape(t->n_dims, t->shape));
        cJSON_AddBoolToObject(o, "new", t->base == NULL);
        cJSON *ops = cJSON_AddArrayToObject(o, "ops");
        if (t->n_ops == 0)
            tb_printf(&text, " convert %s -> %s", lm_dtype_name(t->src_dtype), lm_dtype_name(t->dtype));
        for (size_t q = 0; q < t->n_ops; q++) {
            const lm_op *op = &t->ops[q];
            cJSON *jo = cJSON_CreateObject();
            cJSON_AddStringToObject(jo, "op", op->name);
            cJSON_AddStringToObject(jo, "module", op->module ? op->module : "");
            cJSON_AddNumberToObject(jo, "adapter", (double)op->adapter);
            if (op->kind == LM_OP_LOWRANK) {
                cJSON_AddNumberToObject(jo, "rank", (double)op->rank);
                cJSON_AddNumberToObject(jo, "scale", op->scale);
                cJSON_AddBoolToObject(jo, "transposed", op->axis);
                if (op_rows(op) != t->rows)
                    cJSON_AddItemToObject(jo, "rows", json_shape(2, (const uint64_t[]){op->row0, op->row0 + op_rows(op)}));
            }
            if (q == 0 || !same_lowrank_blocks(&t->ops[q - 1], op))
                op_text(&text, t, q);
            cJSON_AddItemToArray(ops, jo);
        }
        if (st != NULL && st->valid) {
            tb_printf(&text, "  [%llu of %llu changed", (unsigned long long)st->n_changed, (unsigned long long)st->n_elems);
            if (st->has_norms && st->base_norm > 0)
                tb_printf(&text, ", |dW|/|W| %.3g", st->delta_norm / st->base_norm);
            if (st->has_quant) /* what requantization kept of the delta */
                tb_printf(&text, "; requantized: error %.3g of the delta (|Q-x|/|x-W|), max %.3g mean %.3g of the "
                          "block amax, %llu of %llu blocks kept", st->q_delta_norm > 0 ? st->q_err_norm / st->q_delta_norm : 0.0,
                          st->q_err_max, st->q_err_mean, (unsigned long long)st->q_blocks_kept,
                          (unsigned long long)st->q_blocks);
            tb_printf(&text, "]");
            total_changed += st->n_changed;
            total_elems += st->n_elems;
        } else {
            all_stats = 0;
        }
        tb_printf(&text, "\n");
        tensor_exactness_json(o, ri, job, i);
        cJSON_AddItemToObject(o, "stats", tensor_stats_json(st));
        cJSON_AddItemToArray(jt, o);
    }
    if (text.s == NULL)
        tb_printf(&text, "%s", "");
    cJSON *jf = cJSON_AddArrayToObject(root, "files");
    for (size_t i = 0; i < ri->n_files && jf; i++) {
        const lm_merge_file *f = &ri->files[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", f->name);
        cJSON_AddStringToObject(o, "path", f->path);
        cJSON_AddStringToObject(o, "kind", f->kind);
        cJSON_AddStringToObject(o, "origin", f->origin);
        cJSON_AddNumberToObject(o, "bytes", (double)f->n_bytes);
        cJSON_AddItemToObject(o, "sha256", json_str_or_null(f->sha256));
        cJSON_AddItemToArray(jf, o);
    }
    cJSON *jr = cJSON_AddArrayToObject(root, "removed");
    for (size_t i = 0; i < ri->n_removed && jr; i++)
        cJSON_AddItemToArray(jr, cJSON_CreateString(ri->removed[i]));
    cJSON *jw = cJSON_AddArrayToObject(root, "warnings");
    for (size_t i = 0; i < ri->n_warnings && jw; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "code", ri->warnings[i].code);
        cJSON_AddStringToObject(o, "message", ri->warnings[i].message);
        cJSON_AddItemToArray(jw, o);
    }
    cJSON *jn = cJSON_AddArrayToObject(root, "notes");
    for (size_t i = 0; i < ri->n_notes && jn; i++)
        cJSON_AddItemToArray(jn, cJSON_CreateString(ri->notes[i]));
    cJSON *jtm = cJSON_AddObjectToObject(root, "timings");
    for (int k = 0; k < LM_PHASE_COUNT && jtm; k++)
        cJSON_AddNumberToObject(jtm, PHASE_NAMES[k], ri->phase_seconds[k]);
    if (jtm)
        cJSON_AddNumberToObject(jtm, "total", r->seconds);
    cJSON *s = cJSON_AddObjectToObject(root, "summary");
    if (s) {
        cJSON_AddNumberToObject(s, "n_tensors", (double)r->n_tensors);
        cJSON_AddNumberToObject(s, "n_changed", (double)r->n_changed);
        cJSON_AddNumberToObject(s, "n_lowrank", (double)r->n_lowrank);
        cJSON_AddNumberToObject(s, "n_replaced", (double)r->n_replaced);
        cJSON_AddNumberToObject(s, "n_added", (double)r->n_added);
        if (all_stats && total_elems > 0) {
            cJSON_AddNumberToObject(s, "n_elements_changed", (double)total_changed);
            cJSON_AddNumberToObject(s, "n_elements_computed", (double)total_elems);
        } else {
            cJSON_AddNullToObject(s, "n_elements_changed");
            cJSON_AddNullToObject(s, "n_elements_computed");
        }
        cJSON_AddNumberToObject(s, "out_bytes", (double)r->out_bytes);
        cJSON_AddNumberToObject(s, "bytes_to_write", (double)r->bytes_to_write);
        cJSON_AddNumberToObject(s, "n_files", (double)ri->n_files);
        cJSON_AddNumberToObject(s, "n_warnings", (double)ri->n_warnings);
        cJSON_AddNumberToObject(s, "lowrank_gflop", r->lowrank_gflop);
        cJSON_AddNumberToObject(s, "seconds", r->seconds);
        if (r->n_threads > 0)
            cJSON_AddNumberToObject(s, "threads", r->n_threads);
        else /* finalize, with sidecars that do not say */
            cJSON_AddNullToObject(s, "threads");
        cJSON_AddStringToObject(s, "kernels", r->kernels ? r->kernels : "");
        cJSON_AddNumberToObject(s, "n_exact_tensors", (double)r->n_exact_tensors);
        cJSON_AddNumberToObject(s, "n_recomputed", (double)r->n_recomputed);
    }
    if (text.oom || ri->oom)
        goto nomem;
    ri->json = cJSON_PrintUnformatted(root);
    if (ri->json == NULL)
        goto nomem;
    cJSON_Delete(root);
    ri->plan_text = text.s;
    r->plan_text = ri->plan_text;
    r->json = ri->json;
    r->notes = (const char *const *)ri->notes;
    r->n_notes = ri->n_notes;
    r->warnings = ri->warnings;
    r->n_warnings = ri->n_warnings;
    r->files = ri->files;
    r->n_files = ri->n_files;
    r->removed = (const char *const *)ri->removed;
    r->n_removed = ri->n_removed;
    return LM_OK;
nomem:
    cJSON_Delete(root);
    free(text.s);
    return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
}

size_t lm_err_json(const lm_err *err, char *buf, size_t cap)
{
    cJSON *root = cJSON_CreateObject(), *e = cJSON_CreateObject();
    char *text = NULL;
    size_t need = 0;
    if (root != NULL && e != NULL) {
        cJSON_AddNumberToObject(root, "report_version", LM_REPORT_VERSION);
        cJSON_AddStringToObject(root, "tool", "lora-merge");
        cJSON_AddStringToObject(root, "version", LM_VERSION_STRING);
        cJSON_AddBoolToObject(root, "ok", 0);
        cJSON_AddStringToObject(e, "code", lm_code_name(err->code));
        cJSON_AddItemToObject(e, "kind", json_str_or_null(err->kind));
        cJSON_AddNumberToObject(e, "exit_status", lm_code_exit_status(err->code));
        cJSON_AddItemToObject(e, "path", json_str_or_null(err->path));
        cJSON_AddItemToObject(e, "tensor", json_str_or_null(err->tensor));
        if (err->offset != UINT64_MAX)
            cJSON_AddNumberToObject(e, "offset", (double)err->offset);
        else
            cJSON_AddNullToObject(e, "offset");
        if (err->sys_errno != 0)
            cJSON_AddNumberToObject(e, "errno", err->sys_errno);
        else
            cJSON_AddNullToObject(e, "errno");
        cJSON_AddStringToObject(e, "message", err->msg);
        cJSON_AddItemToObject(root, "error", e);
        e = NULL;
        text = cJSON_PrintUnformatted(root);
    }
    cJSON_Delete(e);
    cJSON_Delete(root);
    if (text == NULL) { /* out of memory: a fixed object still says what happened */
        text = strdup("{\"ok\":false,\"error\":{\"code\":\"OutOfMemory\",\"exit_status\":4}}");
        if (text == NULL)
            return 0;
    }
    need = strlen(text);
    if (cap > 0)
        snprintf(buf, cap, "%s", text);
    free(text);
    return need;
}

/* ------------------------------------------------------------------------------------------ */
/* lm_adapter_describe                                                                          */
/* ------------------------------------------------------------------------------------------ */
lm_code lm_adapter_describe(const char *dir, char **text, lm_err *err)
{
    *text = NULL;
    lm_err open_err;
    lm_err_clear(&open_err);
    lm_adapter *a = lm_adapter_open(dir, 1.0, &open_err);
    if (a == NULL && open_err.code != LM_E_UNSUPPORTED) {
        if (err)
            *err = open_err;
        return open_err.code;
    }
    size_t cap = 1 << 17, used = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        lm_adapter_free(a);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    buf[0] = '\0';
#define OUT(...)                                                                                   \
    do {                                                                                           \
        if (used < cap)                                                                            \
            used += (size_t)snprintf(buf + used, cap - used, __VA_ARGS__);                         \
    } while (0)
    if (a == NULL) { /* a well-formed adapter lora-merge refuses: say what and why */
        char line[1024];
        lm_err_format(&open_err, line, sizeof line);
        OUT("adapter: %s\nrefused: lora-merge cannot merge this adapter\n  %s\n", dir, line);
        *text = buf;
        return LM_OK;
    }
    const lm_adapter_config *c = a->cfg;
    OUT("adapter: %s (name '%s')\n", a->dir, a->name);
    OUT("config: %s\nweights: %s\n", a->config_path, a->weights_path);
    OUT("type: %s\n", c->peft_type);
    if (c->method->describe_config != NULL) {
        char mc[2048];
        c->method->describe_config(c, mc, sizeof mc);
        OUT("%s", mc);
    }
    for (size_t i = 0; i < c->rank_keys.n; i++)
        OUT("rank_pattern: %s -> %ld\n", c->rank_keys.v[i], c->rank_vals[i]);
    for (size_t i = 0; i < c->alpha_keys.n; i++)
        OUT("alpha_pattern: %s -> %g\n", c->alpha_keys.v[i], c->alpha_vals[i]);
    if (c->all_linear)
        OUT("target_modules: all-linear\n");
    else if (c->target_is_regex)
        OUT("target_modules: regex %s\n", c->target_regex);
    else if (c->target_list.n) {
        OUT("target_modules:");
        for (size_t i = 0; i < c->target_list.n; i++)
            OUT(" %s", c->target_list.v[i]);
        OUT("\n");
    }
    if (c->exclude_is_regex)
        OUT("exclude_modules: regex %s\n", c->exclude_regex);
    else if (c->exclude_list.n) {
        OUT("exclude_modules:");
        for (size_t i = 0; i < c->exclude_list.n; i++)
            OUT(" %s", c->exclude_list.v[i]);
        OUT("\n");
    }
    if (c->n_layers) {
        OUT("layers_to_transform:");
        for (size_t i = 0; i < c->n_layers; i++)
            OUT(" %ld", c->layers_to_transform[i]);
        OUT("\n");
    }
    if (c->modules_to_save.n) {
        OUT("modules_to_save:");
        for (size_t i = 0; i < c->modules_to_save.n; i++)
            OUT(" %s", c->modules_to_save.v[i]);
        OUT("\n");
    }
    OUT("bias: %s, fan_in_fan_out: %s\n", c->bias, c->fan_in_fan_out ? "true" : "false");
    size_t per_dtype[LM_DT_COUNT] = {0};
    for (size_t i = 0; i < a->ts->n; i++)
        per_dtype[a->ts->t[i].dtype]++;
    OUT("tensors: %zu;", a->ts->n);
    for (int d = 0; d < LM_DT_COUNT; d++)
        if (per_dtype[d])
            OUT(" %s x%zu", lm_dtype_name((lm_dtype)d), per_dtype[d]);
    OUT("\n");
    char *mods = NULL;
    lm_code rc = lm_plan_describe_modules(a, &mods, err);
    if (rc == LM_OK)
        OUT("%s", mods);
    free(mods);
#undef OUT
    lm_adapter_free(a);
    if (rc != LM_OK) {
        free(buf);
        return rc;
    }
    *text = buf;
    return LM_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* lm_inspect                                                                                   */
/* ------------------------------------------------------------------------------------------ */
/* an adapter directory (or something only the adapter reader can explain), not a model */
static int is_adapter_dir(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return 0;
    static const char *const model_files[] = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                              "pytorch_model.bin.index.json"};
    char *p = lm_path_join(path, "adapter_config.json");
    int has = p != NULL && stat(p, &st) == 0;
    free(p);
    if (has)
        return 1;
    for (size_t i = 0; i < sizeof model_files / sizeof *model_files; i++) {
        p = lm_path_join(path, model_files[i]);
        has = p != NULL && stat(p, &st) == 0;
        free(p);
        if (has)
            return 0;
    }
    return 1; /* let the adapter reader explain (multi-adapter save, or nothing there) */
}

static lm_code inspect_adapter(const char *path, int as_json, char **text, lm_err *err)
{
    char *desc = NULL;
    lm_code rc = lm_adapter_describe(path, &desc, err);
    if (rc != LM_OK)
        return rc;
    char *cfg = lm_path_join(path, "adapter_config.json");
    char *declared = NULL;
    if (cfg != NULL)
        declared = lm_adapter_declared_base(cfg);
    free(cfg);
    tbuf b = {0};
    if (!as_json) {
        tb_printf(&b, "%s", desc);
        tb_printf(&b, "base_model_name_or_path: %s\n", declared ? declared : "(not declared)");
    } else {
        cJSON *root = cJSON_CreateObject(), *lines = NULL;
        cJSON_AddNumberToObject(root, "report_version", LM_REPORT_VERSION);
        cJSON_AddStringToObject(root, "tool", "lora-merge");
        cJSON_AddStringToObject(root, "version", LM_VERSION_STRING);
        cJSON_AddStringToObject(root, "kind", "adapter");
        cJSON_AddStringToObject(root, "path", path);
        cJSON_AddItemToObject(root, "base_model_name_or_path", json_str_or_null(declared));
        cJSON_AddBoolToObject(root, "refused", strncmp(strchr(desc, '\n') ? strchr(desc, '\n') + 1 : "", "refused:", 8) == 0);
        lines = cJSON_AddArrayToObject(root, "description");
        for (char *line = desc, *nl; line && *line; line = nl ? nl + 1 : NULL) {
            nl = strchr(line, '\n');
            if (nl)
                *nl = '\0';
            cJSON_AddItemToArray(lines, cJSON_CreateString(line));
        }
        char *js = cJSON_PrintUnformatted(root);
        cJSON_Delete(root);
        if (js != NULL)
            tb_printf(&b, "%s", js);
        else
            b.oom = 1;
        free(js);
    }
    free(desc);
    free(declared);
    if (b.oom || b.s == NULL) {
        free(b.s);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    *text = b.s;
    return LM_OK;
}

/* a bitsandbytes model: 1 and its line in buf (and root's "quantization"), else 0 */
static int inspect_bnb(const lm_model *m, const lm_qscheme *s, char *buf, size_t cap, cJSON *root)
{
    lm_bnb_summary b;
    lm_bnb_summarize(m, &b);
    size_t n4 = b.n_nf4 + b.n_fp4;
    if (n4 + b.n_int8 == 0 && s->fmt != LM_Q_BNB4 && s->fmt != LM_Q_BNB8)
        return 0;
    char fmt[160];
    if (n4 > 0)
        snprintf(fmt, sizeof fmt, "bitsandbytes 4-bit %s, blocks of %llu%s", b.n_fp4 == 0 ? "NF4" : b.n_nf4 == 0 ? "FP4"
                 : "NF4/FP4", (unsigned long long)b.blocksize, b.n_nested == n4 ? ", nested absmax (double quant)"
                 : b.n_nested ? ", some with nested absmax" : "");
    else
        snprintf(fmt, sizeof fmt, "bitsandbytes %s", b.n_int8 ? "8-bit (I8, SCB per row)" : "(no quantized weight found)");
    lm_dtype dt = s->torch_dtype != LM_DT_BOOL ? s->torch_dtype : n4 && b.dtype != LM_DT_BOOL ? b.dtype : LM_DT_BF16;
    snprintf(buf, cap, "quantization: %s, quant_method %s, %zu quantized weights; merged output dequantized to %s "
             "(--dtype to choose)\n", fmt, s->method[0] ? s->method : "-", n4 + b.n_int8, lm_dtype_name(dt));
    if (root) {
        cJSON *q = cJSON_AddObjectToObject(root, "quantization");
        cJSON_AddStringToObject(q, "format", fmt);
        cJSON_AddStringToObject(q, "quant_method", s->method);
        cJSON_AddNumberToObject(q, "blocksize", (double)b.blocksize);
        cJSON_AddNumberToObject(q, "quantized_weights", (double)(n4 + b.n_int8));
        cJSON_AddStringToObject(q, "dequantized_dtype", lm_dtype_name(dt));
    }
    return 1;
}

/* an MXFP4 (gpt-oss) model: its "P_blocks" U8 tensors that have "P_scales" */
static void inspect_mx(const lm_model *m, char *buf, size_t cap, cJSON *root)
{
    size_t n_q = 0;
    for (size_t i = 0; i < lm_model_n_tensors(m); i++) {
        const lm_tensor_info *t = lm_model_tensor(m, i)->info;
        size_t n = strlen(t->name);
        char name[1100];
        if (t->dtype != LM_DT_U8 || n < 7 || strcmp(t->name + n - 7, "_blocks") != 0)
            continue;
        snprintf(name, sizeof name, "%.*s_scales", (int)(n - 7), t->name);
        n_q += lm_model_find(m, name, NULL) != NULL;
    }
    const char *fmt = "MXFP4 (E2M1 blocks, E8M0 scales per 32)";
    snprintf(buf, cap, "quantization: %s, quant_method mxfp4, %zu quantized weights\n", fmt, n_q);
    if (root) {
        cJSON *q = cJSON_AddObjectToObject(root, "quantization");
        cJSON_AddStringToObject(q, "format", fmt);
        cJSON_AddStringToObject(q, "quant_method", "mxfp4");
        cJSON_AddNumberToObject(q, "group", 32);
        cJSON_AddNumberToObject(q, "quantized_weights", (double)n_q);
    }
}

/* the quantization format of a model: its config's scheme and the quantized weights found */
static void inspect_quant(const lm_model *m, const char *dir, char *buf, size_t cap, cJSON *root)
{
    lm_qscheme s;
    lm_err e;
    lm_err_clear(&e);
    buf[0] = '\0';
    if (dir == NULL)
        return;
    if (lm_base_quant_scheme(dir, &s, &e) != LM_OK) {
        snprintf(buf, cap, "quantization: refused: %s\n", e.msg);
        if (root)
            cJSON_AddStringToObject(root, "quantization_error", e.msg);
        return;
    }
    if (inspect_bnb(m, &s, buf, cap, root)) {
        lm_qscheme_free(&s);
        return;
    }
    if (s.fmt == LM_Q_MXFP4) {
        inspect_mx(m, buf, cap, root);
        lm_qscheme_free(&s);
        return;
    }
    size_t n_q = 0, n_ct = 0, n_nv = 0, n_mo = 0, n_stack = 0;
    for (size_t i = 0; i < lm_model_n_tensors(m); i++) {
        const lm_tensor_info *t = lm_model_tensor(m, i)->info;
        char name[1100];
        const size_t before = n_q + n_ct + n_nv + n_mo;
        snprintf(name, sizeof name, "%s_scale_inv", t->name);
        n_q += t->dtype == LM_DT_F8_E4M3 && lm_model_find(m, name, NULL) != NULL;
        snprintf(name, sizeof name, "%s_scale", t->name);
        n_ct += t->dtype == LM_DT_F8_E4M3 && lm_model_find(m, name, NULL) != NULL;
        snprintf(name, sizeof name, "%s_scale_2", t->name); /* ModelOpt: "<m>.weight", or an expert stack "P" */
        int mo = lm_model_find(m, name, NULL) != NULL;
        snprintf(name, sizeof name, "%s_weight_scale_2", t->name);
        n_mo += t->dtype == LM_DT_U8 && (mo || lm_model_find(m, name, NULL) != NULL);
        size_t nl = strlen(t->name);
        n_nv += t->dtype == LM_DT_U8 && nl > 14 && strcmp(t->name + nl - 14, ".weight_packed") == 0;
        n_stack += t->n_dims == 3 && n_q + n_ct + n_nv + n_mo > before;
    }
    if (s.fmt == LM_Q_NONE && n_q + n_ct + n_nv + n_mo == 0)
        return;
    const int nv = s.fmt == LM_Q_CT_NVFP4 || s.fmt == LM_Q_MO_NVFP4 || (s.fmt == LM_Q_NONE && n_nv + n_mo > 0);
    int ct = !nv && (s.fmt == LM_Q_CT_FP8 || (s.fmt == LM_Q_NONE && n_ct > n_q));
    const char *fmt = nv && (s.fmt == LM_Q_MO_NVFP4 || n_mo > n_nv)
                          ? "ModelOpt NVFP4 (U8 E2M1 pairs, weight_scale F8_E4M3 per group, weight_scale_2)"
                      : nv ? "compressed-tensors NVFP4 (weight_packed U8 E2M1 pairs, weight_scale F8_E4M3 per group, "
                             "weight_global_scale)"
                      : ct && strcmp(s.method, "modelopt") == 0 ? "ModelOpt FP8 (F8_E4M3, weight_scale per tensor)"
                      : ct ? "compressed-tensors FP8 (F8_E4M3, weight_scale)"
                      : s.fmt == LM_Q_FP8_BLOCK || (s.fmt == LM_Q_NONE && n_q) ? "block FP8 (F8_E4M3, weight_scale_inv)"
                      : "not dequantized by lora-merge";
    if (nv) {
        n_ct = n_nv + n_mo;
        ct = 1;
    }
    char blocks[96];
    if (nv)
        snprintf(blocks, sizeof blocks, "group size %llu", (unsigned long long)(s.group_size ? s.group_size : 16));
    else if (!ct)
        snprintf(blocks, sizeof blocks, "blocks %llux%llu", (unsigned long long)s.block_rows,
                 (unsigned long long)s.block_cols);
    else if (strcmp(s.ct_strategy, "group") == 0)
        snprintf(blocks, sizeof blocks, "strategy group, group size %llu", (unsigned long long)s.group_size);
    else if (strcmp(s.ct_strategy, "block") == 0)
        snprintf(blocks, sizeof blocks, "strategy block, blocks %llux%llu", (unsigned long long)s.block_rows,
                 (unsigned long long)s.block_cols);
    else
        snprintf(blocks, sizeof blocks, "strategy %s", s.ct_strategy[0] ? s.ct_strategy : "from the scale shapes");
    char stacks[64] = "";
    if (n_stack)
        snprintf(stacks, sizeof stacks, " (%zu of them 3-D expert stacks)", n_stack);
    snprintf(buf, cap, "quantization: %s, quant_method %s, %s, %zu quantized weights%s\n", fmt,
             s.method[0] ? s.method : "-", blocks, ct ? n_ct : n_q, stacks);
    if (root) {
        cJSON *q = cJSON_AddObjectToObject(root, "quantization");
        cJSON_AddStringToObject(q, "format", fmt);
        cJSON_AddStringToObject(q, "quant_method", s.method);
        if (ct) {
            cJSON_AddStringToObject(q, "strategy", s.ct_strategy);
            if (s.group_size)
                cJSON_AddNumberToObject(q, "group_size", (double)s.group_size);
        }
        if (!ct || strcmp(s.ct_strategy, "block") == 0)
            cJSON_AddItemToObject(q, "block", json_shape(2, (const uint64_t[]){s.block_rows, s.block_cols}));
        cJSON_AddNumberToObject(q, "quantized_weights", (double)(ct ? n_ct : n_q));
        if (n_stack)
            cJSON_AddNumberToObject(q, "expert_stacks", (double)n_stack);
    }
    lm_qscheme_free(&s);
}

static lm_code inspect_model(const char *path, int as_json, char **text, lm_err *err)
{
    lm_model *m = lm_model_open(path, err);
    if (m == NULL)
        return err->code;
    char *dir = lm_base_directory(path);
    lm_base_info bi;
    memset(&bi, 0, sizeof bi);
    bi.tie_word_embeddings = -1;
    bi.vocab_size = -1;
    if (dir != NULL)
        lm_base_info_read(dir, &bi);
    uint64_t total_bytes = 0, total_elems = 0;
    size_t per_dtype[LM_DT_COUNT] = {0};
    tbuf b = {0};
    cJSON *root = as_json ? cJSON_CreateObject() : NULL, *jfiles = NULL, *jt = NULL;
    char qline[512];
    inspect_quant(m, dir, qline, sizeof qline, root);
    free(dir);
    if (root) {
        cJSON_AddNumberToObject(root, "report_version", LM_REPORT_VERSION);
        cJSON_AddStringToObject(root, "tool", "lora-merge");
        cJSON_AddStringToObject(root, "version", LM_VERSION_STRING);
        cJSON_AddStringToObject(root, "kind", "model");
        cJSON_AddStringToObject(root, "path", path);
        cJSON_AddItemToObject(root, "index", json_str_or_null(lm_model_index_path(m)));
        jfiles = cJSON_AddArrayToObject(root, "files");
        jt = cJSON_AddArrayToObject(root, "tensors");
    }
    if (!as_json && lm_model_index_path(m))
        tb_printf(&b, "index: %s (%zu shards)\n", lm_model_index_path(m), lm_model_n_files(m));
    for (size_t f = 0; f < lm_model_n_files(m); f++) {
        const lm_st_file *sf = lm_model_file(m, f);
        cJSON *jf = root ? cJSON_CreateObject() : NULL, *jm = NULL;
        if (jf) {
            cJSON_AddStringToObject(jf, "path", lm_st_path(sf));
            cJSON_AddNumberToObject(jf, "header_bytes", (double)(lm_st_data_offset(sf) - 8));
            cJSON_AddNumberToObject(jf, "data_bytes", (double)lm_st_data_bytes(sf));
            jm = cJSON_AddObjectToObject(jf, "metadata");
            cJSON_AddItemToArray(jfiles, jf);
        } else {
            tb_printf(&b, "file: %s (header %llu bytes, data %llu bytes)\n", lm_st_path(sf),
                      (unsigned long long)(lm_st_data_offset(sf) - 8), (unsigned long long)lm_st_data_bytes(sf));
        }
        for (size_t i = 0; i < lm_st_n_metadata(sf); i++) {
            const char *k, *v;
            lm_st_metadata(sf, i, &k, &v);
            if (jm)
                cJSON_AddStringToObject(jm, k, v);
            else
                tb_printf(&b, "  metadata %s = %s\n", k, v);
        }
    }
    for (size_t i = 0; i < lm_model_n_tensors(m); i++) {
        const lm_model_entry *e = lm_model_tensor(m, i);
        const lm_tensor_info *t = e->info;
        if (jt) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "name", t->name);
            cJSON_AddStringToObject(o, "dtype", lm_dtype_name(t->dtype));
            cJSON_AddItemToObject(o, "shape", json_shape(t->n_dims, t->shape));
            cJSON_AddNumberToObject(o, "bytes", (double)(t->end - t->begin));
            cJSON_AddNumberToObject(o, "file", (double)e->file);
            cJSON_AddItemToArray(jt, o);
        } else {
            char sh[256];
            lm_shape_str(sh, sizeof sh, t->n_dims, t->shape);
            tb_printf(&b, "  %s %s %s %llu bytes\n", t->name, lm_dtype_name(t->dtype), sh,
                      (unsigned long long)(t->end - t->begin));
        }
        total_bytes += t->end - t->begin;
        total_elems += t->n_elems;
        per_dtype[t->dtype]++;
    }
    if (root) {
        cJSON *tot = cJSON_AddObjectToObject(root, "totals"), *jd = NULL;
        cJSON_AddNumberToObject(tot, "tensors", (double)lm_model_n_tensors(m));
        cJSON_AddNumberToObject(tot, "elements", (double)total_elems);
        cJSON_AddNumberToObject(tot, "bytes", (double)total_bytes);
        jd = cJSON_AddObjectToObject(tot, "dtypes");
        for (int d = 0; d < LM_DT_COUNT; d++)
            if (per_dtype[d])
                cJSON_AddNumberToObject(jd, lm_dtype_name((lm_dtype)d), (double)per_dtype[d]);
        if (bi.has_config) {
            cJSON *c = cJSON_AddObjectToObject(root, "config");
            cJSON_AddItemToObject(c, "model_type", json_str_or_null(bi.model_type));
            cJSON_AddItemToObject(c, "_name_or_path", json_str_or_null(bi.name_or_path));
            cJSON_AddItemToObject(c, "torch_dtype", json_str_or_null(bi.torch_dtype));
            if (bi.tie_word_embeddings >= 0)
                cJSON_AddBoolToObject(c, "tie_word_embeddings", bi.tie_word_embeddings);
            else
                cJSON_AddNullToObject(c, "tie_word_embeddings");
            if (bi.vocab_size >= 0)
                cJSON_AddNumberToObject(c, "vocab_size", (double)bi.vocab_size);
            else
                cJSON_AddNullToObject(c, "vocab_size");
            cJSON_AddBoolToObject(c, "quantization_config", bi.has_quantization);
        } else {
            cJSON_AddNullToObject(root, "config");
        }
        char *js = cJSON_PrintUnformatted(root);
        if (js)
            tb_printf(&b, "%s", js);
        else
            b.oom = 1;
        free(js);
        cJSON_Delete(root);
    } else {
        tb_printf(&b, "total: %zu tensors, %llu elements, %llu bytes;", lm_model_n_tensors(m),
                  (unsigned long long)total_elems, (unsigned long long)total_bytes);
        for (int d = 0; d < LM_DT_COUNT; d++)
            if (per_dtype[d])
                tb_printf(&b, " %s x%zu", lm_dtype_name((lm_dtype)d), per_dtype[d]);
        tb_printf(&b, "\n");
        if (bi.has_config) {
            tb_printf(&b, "config: model_type %s, _name_or_path %s, torch_dtype %s, tie_word_embeddings %s", 
                      bi.model_type ? bi.model_type : "-", bi.name_or_path ? bi.name_or_path : "-",
                      bi.torch_dtype ? bi.torch_dtype : "-",
                      bi.tie_word_embeddings < 0 ? "-" : bi.tie_word_embeddings ? "true" : "false");
            if (bi.vocab_size >= 0)
                tb_printf(&b, ", vocab_size %lld", (long long)bi.vocab_size);
            tb_printf(&b, "%s\n", bi.has_quantization ? ", quantization_config" : "");
        }
        tb_printf(&b, "%s", qline);
    }
    lm_base_info_free(&bi);
    lm_model_close(m);
    if (b.oom || b.s == NULL) {
        free(b.s);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    *text = b.s;
    return LM_OK;
}

lm_code lm_inspect(const char *path, int as_json, char **text, lm_err *err)
{
    lm_err e;
    lm_err_clear(&e);
    *text = NULL;
    lm_code rc;
    if (path == NULL || path[0] == '\0')
        rc = lm_fail(&e, LM_E_USAGE, "Usage", "inspect needs a path");
    else if (is_adapter_dir(path))
        rc = inspect_adapter(path, as_json, text, &e);
    else
        rc = inspect_model(path, as_json, text, &e);
    if (rc != LM_OK && err != NULL)
        *err = e;
    return rc;
}
