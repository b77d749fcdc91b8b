/* SPDX-License-Identifier: MIT */
/* adapter_load.c : see adapter_load.h. */
#include "adapter_load.h"

#include "lm_error.h"
#include "st_reader.h"
#if __has_include("torch_bin.h")
#include "torch_bin.h"
#define LM_HAVE_TORCH_BIN 1
#endif

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char *join(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p != NULL)
        snprintf(p, n, "%s%s%s", a, (a[0] && a[strlen(a) - 1] == '/') ? "" : "/", b);
    return p;
}

static int is_file(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static int has_weights(const char *dir)
{
    char *a = join(dir, "adapter_model.safetensors"), *b = join(dir, "adapter_model.bin");
    int r = (a && is_file(a)) || (b && is_file(b));
    free(a);
    free(b);
    return r;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

char *lm_adapter_locate(const char *dir, char **name_out, lm_err *err)
{
    struct stat st;
    *name_out = NULL;
    if (stat(dir, &st) != 0) {
        lm_fail_errno(err, errno, "cannot open the adapter directory");
        lm_err_set_path(err, dir);
        return NULL;
    }
    if (!S_ISDIR(st.st_mode)) {
        lm_fail(err, LM_E_USAGE, "NotADirectory", "the adapter must be a directory holding adapter_config.json");
        lm_err_set_path(err, dir);
        return NULL;
    }
    char *cfg = join(dir, "adapter_config.json");
    if (cfg == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    int here = is_file(cfg);
    const char *what = here ? NULL : lm_path_not_regular(cfg);
    if (what != NULL) { /* there, but not a file: a FIFO, a loop ... (never "missing") */
        lm_fail(err, LM_E_IO, "UnreadableConfig", "adapter_config.json is %s, not a regular file", what);
        lm_err_set_path(err, cfg);
        free(cfg);
        return NULL;
    }
    free(cfg);
    if (here) {
        *name_out = strdup("default");
        return strdup(dir);
    }
    /* a multi-adapter save: no files here, NAME/ sub-folders with their own config + weights */
    DIR *d = opendir(dir);
    if (d == NULL) {
        lm_fail_errno(err, errno, "cannot list the adapter directory");
        lm_err_set_path(err, dir);
        return NULL;
    }
    char *found[16];
    size_t n_found = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        char *sub = join(dir, de->d_name);
        char *sub_cfg = sub ? join(sub, "adapter_config.json") : NULL;
        if (sub_cfg && is_file(sub_cfg) && has_weights(sub) && n_found < 16)
            found[n_found++] = strdup(de->d_name);
        free(sub);
        free(sub_cfg);
    }
    closedir(d);
    char *cfg_path = join(dir, "adapter_config.json");
    if (n_found == 0) {
        lm_fail(err, LM_E_IO, "MissingConfig", "no adapter_config.json (not a PEFT adapter directory?)");
        lm_err_set_path(err, cfg_path);
        free(cfg_path);
        return NULL;
    }
    free(cfg_path);
    if (n_found > 1) {
        qsort(found, n_found, sizeof *found, cmp_str);
        char list[256] = "";
        for (size_t i = 0; i < n_found; i++) {
            size_t k = strlen(list);
            snprintf(list + k, sizeof list - k, "%s%s", i ? ", " : "", found[i]);
        }
        lm_fail(err, LM_E_USAGE, "AmbiguousAdapter",
                "holds several adapters (%s) and no default one: name the sub-folder, e.g. %s/%s", list, dir,
                found[0]);
        lm_err_set_path(err, dir);
        for (size_t i = 0; i < n_found; i++)
            free(found[i]);
        return NULL;
    }
    char *sub = join(dir, found[0]);
    *name_out = found[0];
    return sub;
}

void lm_adapter_free(lm_adapter *a)
{
    if (a == NULL)
        return;
    free(a->dir);
    free(a->name);
    free(a->config_path);
    free(a->weights_path);
    lm_adapter_config_free(a->cfg);
    lm_ts_free(a->ts);
    for (size_t i = 0; i < a->n_notes; i++)
        free(a->notes[i]);
    free(a->notes);
    lm_norm_adapter_free(a->foreign);
    free(a);
}

static lm_code load_safetensors(lm_adapter *a, lm_err *err)
{
    /* read once: later changes cannot reach the merge; hashed on the way (merge.c: hash_adapters) */
    lm_st_file *f = lm_st_open_snapshot_hashed(a->weights_path, err);
    if (f == NULL)
        return err ? err->code : LM_E_FORMAT;
    a->ts = lm_ts_create(a->weights_path);
    if (a->ts == NULL) {
        lm_st_close(f);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    a->ts->st = f;
    for (size_t i = 0; i < lm_st_n_tensors(f); i++) {
        const lm_tensor_info *t = lm_st_tensor(f, i);
        if (t->n_dims > LM_TS_MAX_DIMS)
            return lm_fail(err, LM_E_UNSUPPORTED, "TooManyDims", "adapter tensor '%s' has %zu dimensions",
                           t->name, t->n_dims);
        if (lm_ts_add(a->ts, t->name, t->dtype, t->n_dims, t->shape, lm_st_data(f) + t->begin, 0, err) != LM_OK)
            return err ? err->code : LM_E_FORMAT;
    }
    return LM_OK;
}

/* index of the first non-finite value of the n at p, or -1 */
static long first_non_finite(const uint8_t *p, size_t n, lm_dtype dt)
{
    const size_t esz = dt == LM_DT_F64 ? 8 : dt == LM_DT_F32 ? 4 : 2;
    for (size_t i = 0; i < n; i++)
        if (lm_any_non_finite(p + i * esz, 1, dt))
            return (long)i;
    return -1;
}

/* Every value of every float tensor finite.  The bytes of a tensor in the adapter's file (a
 * snapshot in memory) are read with pread in chunks rather than through its mapping: no page
 * faults, and no pages to drop after (an madvise that interrupts every core the process ran on). */
static lm_code check_finite(const lm_adapter *a, lm_err *err)
{
    enum { CHUNK = 1 << 20 }; /* bytes, a multiple of every element size */
    const lm_st_file *st = a->ts->st;
    const int fd = st != NULL ? lm_st_fd(st) : -1;
    /* a snapshot's tensors were looked at as they were copied (a PEFT file: its tensors are the
     * file's, one for one); the others, and any where a value was not finite, are read here */
    const int seen = st != NULL && lm_st_snapshot_all_finite(st);
    uint8_t *buf = NULL;
    for (size_t i = 0; i < a->ts->n; i++) {
        const lm_ts_tensor *t = &a->ts->t[i];
        const lm_dtype dt = t->dtype;
        if ((dt != LM_DT_F32 && dt != LM_DT_F16 && dt != LM_DT_BF16 && dt != LM_DT_F64) || (seen && t->file_backed))
            continue;
        const size_t esz = lm_dtype_bits(dt) / 8;
        long bad = -1;
        if (t->file_backed && fd >= 0 && (buf != NULL || (buf = malloc(CHUNK)) != NULL)) {
            const uint64_t at = (uint64_t)((const uint8_t *)t->data - lm_st_data(st)) + lm_st_data_offset(st);
            for (uint64_t done = 0; done < t->n_bytes && bad < 0;) {
                const size_t want = t->n_bytes - done < CHUNK ? (size_t)(t->n_bytes - done) : CHUNK;
                ssize_t k = pread(fd, buf, want, (off_t)(at + done));
                if (k < 0 && errno == EINTR)
                    continue;
                if (k != (ssize_t)want) { /* cannot happen (a sealed copy in memory): the mapping */
                    bad = first_non_finite(t->data, (size_t)t->n_elems, dt);
                    lm_ts_drop_pages(t);
                    break;
                }
                if (lm_any_non_finite(buf, want / esz, dt))
                    bad = (long)(done / esz) + first_non_finite(buf, want / esz, dt);
                done += want;
            }
        } else if (lm_any_non_finite(t->data, (size_t)t->n_elems, dt)) {
            bad = first_non_finite(t->data, (size_t)t->n_elems, dt);
            lm_ts_drop_pages(t); /* read again when merged: not kept resident meanwhile */
        } else {
            lm_ts_drop_pages(t);
        }
        if (bad >= 0) {
            free(buf);
            lm_fail(err, LM_E_FORMAT, "NonFinite", "adapter tensor '%s' holds a non-finite value (inf or NaN) at element %ld",
                    t->name, bad);
            lm_err_set_path(err, a->weights_path);
            return LM_E_FORMAT;
        }
    }
    free(buf);
    return LM_OK;
}

lm_adapter *lm_adapter_open(const char *dir, double weight, lm_err *err)
{
    lm_adapter *a = calloc(1, sizeof *a);
    if (a == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    a->weight = weight;
    a->dir = lm_adapter_locate(dir, &a->name, err);
    if (a->dir == NULL)
        goto fail;
    a->config_path = join(a->dir, "adapter_config.json");
    if (a->config_path == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    a->cfg = lm_adapter_config_load(a->config_path, err);
    if (a->cfg == NULL)
        goto fail;
    char *st = join(a->dir, "adapter_model.safetensors"), *bin = join(a->dir, "adapter_model.bin");
    if (st == NULL || bin == NULL) {
        free(st);
        free(bin);
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    lm_code rc;
    if (is_file(st)) { /* PEFT prefers safetensors when both exist */
        a->weights_path = st;
        free(bin);
        rc = load_safetensors(a, err);
    } else if (lm_fail_not_regular(err, st) != LM_OK) {
        /* a FIFO, a loop ... where PEFT would read the weights from (it prefers this name) */
        free(st);
        free(bin);
        goto fail;
    } else if (is_file(bin)) {
        a->weights_path = bin;
        free(st);
#ifdef LM_HAVE_TORCH_BIN
        rc = lm_torch_bin_load(a->weights_path, &a->ts, err);
#else
        rc = lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "adapter_model.bin is not supported by this build");
#endif
    } else {
        if (lm_fail_not_regular(err, bin) == LM_OK)
            lm_fail(err, LM_E_IO, "MissingWeights", "no adapter_model.safetensors or adapter_model.bin");
        lm_err_set_path(err, st);
        free(st);
        free(bin);
        goto fail;
    }
    if (rc != LM_OK) {
        lm_err_set_path(err, a->weights_path);
        goto fail;
    }
    if (check_finite(a, err) != LM_OK)
        goto fail;
    return a;
fail:
    lm_adapter_free(a);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* adapters of other tools (adapter_formats.h) and key drift                                   */
/* ------------------------------------------------------------------------------------------ */
static lm_adapter *open_foreign(const char *path, double weight, const lm_model *base, const lm_format_opts *opts,
                                lm_err *err)
{
    lm_adapter *a = calloc(1, sizeof *a);
    lm_norm_adapter *n = NULL;
    if (a == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return NULL;
    }
    a->weight = weight;
    if (lm_formats_normalise(path, base, opts, &n, err) != LM_OK)
        goto fail;
    a->foreign = n;
    a->ts = n->ts;
    n->ts = NULL;
    a->notes = n->notes;
    a->n_notes = n->n_notes;
    n->notes = NULL;
    n->n_notes = 0;
    if ((a->dir = strdup(n->dir)) == NULL || (a->name = strdup("default")) == NULL ||
        (a->config_path = strdup(n->config_path)) == NULL || (a->weights_path = strdup(n->weights_path)) == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    /* what was read is said first; the config the PEFT path sees is the normalised one */
    char line[400];
    snprintf(line, sizeof line, "%s: read as %s and normalised into a PEFT adapter (%s)", path, n->format,
             n->not_peft ? "with LyCORIS parts of lora-merge's own: convert refuses it" : "lora-merge convert writes it");
    char **nn = realloc(a->notes, (a->n_notes + 1) * sizeof *nn);
    if (nn == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    memmove(nn + 1, nn, a->n_notes * sizeof *nn);
    a->notes = nn;
    a->n_notes++;
    if ((nn[0] = strdup(line)) == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    a->cfg = lm_adapter_config_parse(n->config_json, strlen(n->config_json), a->config_path, err);
    if (a->cfg == NULL || check_finite(a, err) != LM_OK)
        goto fail;
    return a;
fail:
    lm_adapter_free(a);
    return NULL;
}

lm_adapter *lm_adapter_open_with(const char *path, double weight, const lm_model *base, const lm_format_opts *opts,
                                 lm_err *err)
{
    if (!lm_formats_is_peft(path))
        return open_foreign(path, weight, base, opts, err);
    lm_adapter *a = lm_adapter_open(path, weight, err);
    if (a != NULL && base != NULL && lm_formats_key_drift(a->ts, base, &a->notes, &a->n_notes, err) != LM_OK) {
        lm_err_set_path(err, a->weights_path);
        lm_adapter_free(a);
        return NULL;
    }
    return a;
}
