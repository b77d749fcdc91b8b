/* SPDX-License-Identifier: MIT */
/* adapter_convert.c : `lora-merge convert` and `inspect` for adapters of other tools: the public
 * face of adapter_formats.h.  convert writes the very config text and tensors the merge path
 * reads, so merging its output and merging its input cannot differ. */
#include "lora_merge.h"

#include "adapter_load.h"
#include "formats_internal.h"
#include "lm_error.h"
#include "st_writer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *lm_adapter_format_detect(const char *path)
{
    return path ? lm_formats_detect(path) : NULL;
}

/* the notes as one text, a line each */
static char *join_notes(char *const *notes, size_t n)
{
    size_t total = 1;
    for (size_t i = 0; i < n; i++)
        total += strlen(notes[i]) + 1;
    char *t = malloc(total), *p = t;
    if (t == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++)
        p += sprintf(p, "%s\n", notes[i]);
    *p = '\0';
    return t;
}

static lm_code write_adapter(const lm_adapter *a, const char *config_text, const char *out_dir, lm_err *err)
{
    char *st_path = fm_join(out_dir, "adapter_model.safetensors"), *cfg_path = fm_join(out_dir, "adapter_config.json");
    lm_out_tensor *ot = calloc(a->ts->n ? a->ts->n : 1, sizeof *ot);
    lm_st_writer *w = NULL;
    lm_code rc = LM_OK;
    int wrote_cfg = 0;
    if (st_path == NULL || cfg_path == NULL || ot == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    const char *inputs[2] = {a->weights_path, a->config_path};
    for (size_t i = 0; i < 2; i++)
        if (lm_same_file(st_path, inputs[i]) || lm_same_file(cfg_path, inputs[i])) {
            rc = lm_fail(err, LM_E_USAGE, "OutputIsInput", "the output would overwrite the input '%s'", inputs[i]);
            lm_err_set_path(err, out_dir);
            goto done;
        }
    for (size_t i = 0; i < a->ts->n; i++) {
        ot[i].name = a->ts->t[i].name;
        ot[i].dtype = a->ts->t[i].dtype;
        ot[i].n_dims = a->ts->t[i].n_dims;
        ot[i].shape = a->ts->t[i].shape;
    }
    const char *mk[1] = {"format"}, *mv[1] = {"pt"};
    if ((w = lm_st_writer_open(st_path, ot, a->ts->n, NULL, mk, mv, 1, err)) == NULL) {
        rc = err ? err->code : LM_E_IO;
        goto done;
    }
    for (size_t i = 0; i < a->ts->n && rc == LM_OK; i++)
        if (a->ts->t[i].n_bytes > 0)
            rc = lm_st_writer_pwrite(w, a->ts->t[i].data, (size_t)a->ts->t[i].n_bytes, lm_st_writer_tensor_offset(w, i),
                                     err);
    if (rc == LM_OK)
        rc = lm_st_writer_finish(w, 0, err);
    if (rc == LM_OK && (rc = lm_write_file_atomic(cfg_path, config_text, strlen(config_text), err)) == LM_OK)
        wrote_cfg = 1;
    if (rc == LM_OK) {
        rc = lm_st_writer_commit(w, 0, err);
        w = NULL;
        if (rc != LM_OK && wrote_cfg)
            unlink(cfg_path);
    }
done:
    lm_st_writer_abort(w);
    free(ot);
    free(st_path);
    free(cfg_path);
    return rc;
}

lm_code lm_adapter_convert(const char *input, const char *out_dir, const char *base_path, const lm_format_opts *opts,
                           char **notes, lm_err *err)
{
    lm_err e;
    lm_err_clear(&e);
    lm_model *base = NULL;
    lm_adapter *a = NULL;
    char *config_text = NULL;
    lm_code rc = LM_OK;
    int made_dir = 0;
    if (notes)
        *notes = NULL;
    if (input == NULL || out_dir == NULL || out_dir[0] == '\0') {
        rc = lm_fail(&e, LM_E_USAGE, "Usage", "convert needs an input adapter and an output directory");
        goto done;
    }
    if (base_path != NULL && (base = lm_model_open(base_path, &e)) == NULL) {
        rc = e.code;
        goto done;
    }
    if ((a = lm_adapter_open_with(input, 1.0, base, opts, &e)) == NULL) {
        rc = e.code;
        goto done;
    }
    if (a->foreign != NULL && a->foreign->not_peft != NULL) { /* merged, but no PEFT adapter says it */
        rc = lm_fail(&e, LM_E_UNSUPPORTED, "Unsupported", "cannot be written as a PEFT adapter: %s (merge the file "
                     "itself instead)", a->foreign->not_peft);
        lm_err_set_path(&e, a->foreign->weights_path);
        goto done;
    }
    config_text = a->foreign ? strdup(a->foreign->config_json) : fm_read_text(a->config_path, (size_t)64 << 20, &e);
    if (config_text == NULL) {
        rc = e.code != LM_OK ? e.code : lm_fail(&e, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    struct stat st;
    if (stat(out_dir, &st) != 0) {
        if (mkdir(out_dir, 0777) != 0) {
            rc = lm_fail_errno(&e, errno, "cannot create the output directory");
            lm_err_set_path(&e, out_dir);
            goto done;
        }
        made_dir = 1;
    } else if (!S_ISDIR(st.st_mode)) {
        rc = lm_fail(&e, LM_E_USAGE, "NotADirectory", "the output exists and is not a directory");
        lm_err_set_path(&e, out_dir);
        goto done;
    }
    if ((rc = write_adapter(a, config_text, out_dir, &e)) != LM_OK)
        goto done;
    if (notes != NULL && (*notes = join_notes(a->notes, a->n_notes)) == NULL)
        rc = lm_fail(&e, LM_E_NOMEM, NULL, "out of memory");
done:
    if (rc != LM_OK && made_dir)
        rmdir(out_dir);
    free(config_text);
    lm_adapter_free(a);
    lm_model_close(base);
    if (rc != LM_OK && e.code == LM_OK)
        lm_fail(&e, rc, NULL, "convert failed");
    if (err != NULL && rc != LM_OK)
        *err = e;
    return rc;
}

lm_code lm_adapter_format_describe(const char *input, const char *base_path, const lm_format_opts *opts, char **text,
                                   lm_err *err)
{
    lm_err e;
    lm_err_clear(&e);
    lm_model *base = NULL;
    lm_norm_adapter *n = NULL;
    lm_code rc = LM_OK;
    *text = NULL;
    if (base_path != NULL && (base = lm_model_open(base_path, &e)) == NULL) {
        rc = e.code;
        goto done;
    }
    if (lm_formats_is_peft(input)) {
        rc = lm_fail(&e, LM_E_USAGE, "Usage", "a PEFT adapter directory: `lora-merge inspect` describes it");
        goto done;
    }
    if ((rc = lm_formats_normalise(input, base, opts, &n, &e)) != LM_OK)
        goto done;
    size_t modules = 0;
    for (const char *p = n->mapping; (p = strchr(p, '\n')) != NULL; p++)
        modules++;
    size_t cap = strlen(n->mapping) + strlen(n->config_json) + (n->not_peft ? strlen(n->not_peft) : 0) + 4096, used = 0;
    for (size_t i = 0; i < n->n_notes; i++)
        cap += strlen(n->notes[i]) + 16;
    char *t = malloc(cap);
    if (t == NULL) {
        rc = lm_fail(&e, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
#define OUT(...) (used += (size_t)snprintf(t + used, cap > used ? cap - used : 0, __VA_ARGS__))
    OUT("adapter: %s\nformat: %s\nweights: %s\n", input, n->format, n->weights_path);
    if (strcmp(n->config_path, n->weights_path) != 0)
        OUT("config: %s\n", n->config_path);
    OUT("base: %s\n", base_path ? base_path : "(none given: module names as the file spells them)");
    for (size_t i = 0; i < n->n_notes; i++)
        OUT("note: %s\n", n->notes[i]);
    OUT("modules: %zu (input name -> base module)\n%s", modules, n->mapping);
    if (n->not_peft != NULL) /* merged directly; no PEFT adapter says it */
        OUT("as a PEFT adapter: none (lora-merge convert refuses it): %s\n", n->not_peft);
    else
        OUT("as a PEFT adapter (lora-merge convert writes this adapter_config.json):\n%s\n", n->config_json);
#undef OUT
    *text = t;
done:
    lm_norm_adapter_free(n);
    lm_model_close(base);
    if (err != NULL && rc != LM_OK)
        *err = e;
    return rc;
}
