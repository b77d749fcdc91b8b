/* report.c : the plan text, the JSON report and the description of an adapter (inspect).
 * Builds text from the plan and the run's numbers; prints nothing (the CLI does). */
#include "report.h"

#include "exec_lowrank.h"
#include "lm_error.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void lm_merge_report_free(lm_merge_report *r)
{
    if (r == NULL)
        return;
    lm_report_impl *ri = (lm_report_impl *)r;
    for (size_t i = 0; i < r->n_notes; i++)
        free(ri->notes[i]);
    free(ri->notes);
    free(ri->plan_text);
    free(ri->json);
    free(ri->recomputed);
    free(ri);
}

static void shape_text(char *buf, size_t cap, size_t n_dims, const uint64_t *shape)
{
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (size_t d = 0; d < n_dims && used < cap; d++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%llu", d ? ", " : "", (unsigned long long)shape[d]);
    if (used < cap)
        snprintf(buf + used, cap - used, "]");
}

/* builds plan_text and json */
lm_code lm_report_build(lm_report_impl *ri, const lm_merge_job *job, lm_adapter *const *ads, const lm_plan *p,
                            lm_err *err)
{
    size_t cap = 4096, used = 0;
    char *text = malloc(cap);
    cJSON *root = cJSON_CreateObject();
    ri->recomputed = malloc((p->n + 1) * sizeof *ri->recomputed);
    if (text == NULL || root == NULL || ri->recomputed == NULL)
        goto nomem;
    for (size_t i = 0; i < p->n; i++) /* a dry run does not change them */
        ri->recomputed[i] = lm_lowrank_tensor_eligible(&p->t[i]) ? 0 : UINT64_MAX;
    text[0] = '\0';
    cJSON_AddStringToObject(root, "base", job->base_path);
    cJSON_AddStringToObject(root, "out", job->out_path ? job->out_path : "");
    cJSON_AddBoolToObject(root, "dry_run", job->dry_run != 0);
    cJSON *ja = cJSON_AddArrayToObject(root, "adapters");
    for (size_t i = 0; i < job->n_adapters; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "dir", ads[i]->dir);
        cJSON_AddStringToObject(a, "name", ads[i]->name);
        cJSON_AddStringToObject(a, "peft_type", ads[i]->cfg->peft_type);
        cJSON_AddStringToObject(a, "weights", ads[i]->weights_path);
        cJSON_AddNumberToObject(a, "weight", ads[i]->weight);
        cJSON_AddNumberToObject(a, "n_tensors", (double)ads[i]->ts->n);
        cJSON_AddItemToArray(ja, a);
    }
    cJSON *jt = cJSON_AddArrayToObject(root, "changed_tensors");
    for (size_t i = 0; i < p->n; i++) {
        const lm_plan_tensor *t = &p->t[i];
        if (t->n_ops == 0 && t->dtype == t->src_dtype)
            continue;
        char sh[128], line[1024];
        shape_text(sh, sizeof sh, t->n_dims, t->shape);
        size_t k = (size_t)snprintf(line, sizeof line, "  %s %s %s%s:", t->name, lm_dtype_name(t->dtype), sh,
                                    t->base ? "" : " (new)");
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", t->name);
        cJSON_AddStringToObject(o, "dtype", lm_dtype_name(t->dtype));
        cJSON_AddBoolToObject(o, "new", t->base == NULL);
        cJSON *ops = cJSON_AddArrayToObject(o, "ops");
        if (t->n_ops == 0 && k < sizeof line)
            k += (size_t)snprintf(line + k, sizeof line - k, " convert %s -> %s", lm_dtype_name(t->src_dtype),
                                  lm_dtype_name(t->dtype));
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
                if (k < sizeof line)
                    k += (size_t)snprintf(line + k, sizeof line - k, " %s(r=%llu, scale=%g%s, #%zu)", op->name,
                                          (unsigned long long)op->rank, op->scale, op->axis ? ", transposed" : "",
                                          op->adapter);
            } else if (k < sizeof line) {
                k += (size_t)snprintf(line + k, sizeof line - k, " %s(#%zu)", op->name, op->adapter);
            }
            cJSON_AddItemToArray(ops, jo);
        }
        cJSON_AddItemToArray(jt, o);
        size_t ll = strlen(line);
        if (used + ll + 2 > cap) {
            while (used + ll + 2 > cap)
                cap *= 2;
            char *nt = realloc(text, cap);
            if (nt == NULL)
                goto nomem;
            text = nt;
        }
        memcpy(text + used, line, ll);
        used += ll;
        text[used++] = '\n';
        text[used] = '\0';
    }
    ri->plan_text = text;
    ri->json = NULL;
    /* numbers filled by the caller after the run: kept as a tree until then */
    ri->pub.json = (const char *)root;
    return LM_OK;
nomem:
    free(text);
    cJSON_Delete(root);
    return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
}

/* the array follows lm_report_build's order */
void lm_report_add_exactness(lm_report_impl *ri, const lm_plan *p, int exactness_off, int ran)
{
    const uint64_t *recomputed = ri->recomputed;
    cJSON *jt = cJSON_GetObjectItemCaseSensitive((cJSON *)ri->pub.json, "changed_tensors");
    cJSON *o = jt ? jt->child : NULL;
    for (size_t i = 0; i < p->n && o != NULL; i++) {
        const lm_plan_tensor *t = &p->t[i];
        if (t->n_ops == 0 && t->dtype == t->src_dtype)
            continue;
        const int exact = recomputed[i] != UINT64_MAX;
        cJSON_AddBoolToObject(o, "exact", exact && !exactness_off);
        if (exact && ran)
            cJSON_AddNumberToObject(o, "recomputed", (double)recomputed[i]);
        o = o->next;
    }
}

lm_code lm_report_finish_json(lm_report_impl *ri, lm_err *err)
{
    cJSON *root = (cJSON *)ri->pub.json;
    lm_merge_report *r = &ri->pub;
    cJSON *s = cJSON_CreateObject();
    cJSON_AddNumberToObject(s, "n_tensors", (double)r->n_tensors);
    cJSON_AddNumberToObject(s, "n_changed", (double)r->n_changed);
    cJSON_AddNumberToObject(s, "n_lowrank", (double)r->n_lowrank);
    cJSON_AddNumberToObject(s, "n_replaced", (double)r->n_replaced);
    cJSON_AddNumberToObject(s, "n_added", (double)r->n_added);
    cJSON_AddNumberToObject(s, "out_bytes", (double)r->out_bytes);
    cJSON_AddNumberToObject(s, "lowrank_gflop", r->lowrank_gflop);
    cJSON_AddNumberToObject(s, "seconds", r->seconds);
    cJSON_AddNumberToObject(s, "threads", r->n_threads);
    cJSON_AddStringToObject(s, "kernels", r->kernels);
    cJSON_AddNumberToObject(s, "n_exact_tensors", (double)r->n_exact_tensors);
    cJSON_AddNumberToObject(s, "n_recomputed", (double)r->n_recomputed);
    cJSON_AddItemToObject(root, "summary", s);
    cJSON *jn = cJSON_AddArrayToObject(root, "notes");
    for (size_t i = 0; i < r->n_notes; i++)
        cJSON_AddItemToArray(jn, cJSON_CreateString(r->notes[i]));
    ri->json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    r->json = ri->json;
    if (ri->json == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    return LM_OK;
}

void lm_report_drop_tree(lm_report_impl *ri)
{
    if (ri->pub.json != NULL && ri->json == NULL)
        cJSON_Delete((cJSON *)ri->pub.json);
    ri->pub.json = NULL;
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
