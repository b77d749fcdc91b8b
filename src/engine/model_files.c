/* SPDX-License-Identifier: MIT */
/* model_files.c : the files around the weights in a model directory OUT (see model_files.h). */
#include "model_files.h"

#include "lm_error.h"
#include "lm_sys.h"
#include "output.h"
#include "st_json.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* names                                                                                        */
/* ------------------------------------------------------------------------------------------ */
enum { G_BASE = 0, G_TOKENIZER = 1, G_TEMPLATE = 2, G_PROCESSOR = 3 };

static const struct {
    const char *name;
    const char *kind;
    int group;
} ALLOWED[] = {
    {"config.json", "config", G_BASE},
    {"generation_config.json", "generation_config", G_BASE},
    {"hf_quant_config.json", "quantization config", G_BASE}, /* ModelOpt's: goes with quantization_config */
    {"tokenizer.json", "tokenizer", G_TOKENIZER},
    {"tokenizer_config.json", "tokenizer", G_TOKENIZER},
    {"tokenizer.model", "tokenizer", G_TOKENIZER},
    {"special_tokens_map.json", "tokenizer", G_TOKENIZER},
    {"added_tokens.json", "tokenizer", G_TOKENIZER},
    {"vocab.json", "tokenizer", G_TOKENIZER},
    {"vocab.txt", "tokenizer", G_TOKENIZER},
    {"merges.txt", "tokenizer", G_TOKENIZER},
    {"spiece.model", "tokenizer", G_TOKENIZER},
    {"sentencepiece.bpe.model", "tokenizer", G_TOKENIZER},
    {"tekken.json", "tokenizer", G_TOKENIZER},
    {"chat_template.jinja", "chat_template", G_TEMPLATE},
    {"chat_template.json", "chat_template", G_TEMPLATE},
    {"preprocessor_config.json", "processor", G_PROCESSOR},
    {"processor_config.json", "processor", G_PROCESSOR},
    {"video_preprocessor_config.json", "processor", G_PROCESSOR},
};

static int has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* LICENSE, LICENSE.txt, LICENCE.md, COPYING, NOTICE, USE_POLICY.md, LICENSE-MIT ... */
static int is_license_name(const char *name)
{
    static const char *const stems[] = {"LICENSE", "LICENCE", "COPYING", "NOTICE", "USE_POLICY"};
    for (size_t i = 0; i < sizeof stems / sizeof *stems; i++) {
        size_t k = strlen(stems[i]);
        if (strncasecmp(name, stems[i], k) != 0)
            continue;
        const char *rest = name + k;
        if (*rest == '\0' || strcasecmp(rest, ".txt") == 0 || strcasecmp(rest, ".md") == 0)
            return 1;
        if (*rest == '-' || *rest == '_') { /* LICENSE-MIT, LICENSE_APACHE.txt */
            for (const char *p = rest + 1; *p; p++)
                if (!isalnum((unsigned char)*p) && *p != '.' && *p != '-' && *p != '_')
                    return 0;
            return rest[1] != '\0';
        }
    }
    return 0;
}

int lm_side_is_allowed(const char *name, const char **kind, int *group)
{
    for (size_t i = 0; i < sizeof ALLOWED / sizeof *ALLOWED; i++)
        if (strcmp(name, ALLOWED[i].name) == 0) {
            *kind = ALLOWED[i].kind;
            *group = ALLOWED[i].group;
            return 1;
        }
    if (strncmp(name, "tokenizer.model.v", 17) == 0 || (has_suffix(name, ".tiktoken") && name[0] != '.')) {
        *kind = "tokenizer"; /* Mistral's tokenizer.model.v3, tiktoken vocabularies */
        *group = G_TOKENIZER;
        return 1;
    }
    if (is_license_name(name)) {
        *kind = "license";
        *group = G_BASE;
        return 1;
    }
    return 0;
}

int lm_is_weight_name(const char *name)
{
    static const char *const ends[] = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".h5",
                                       ".msgpack", ".onnx", ".index.json", ".pkl", ".npz", ".tflite", ".mlmodel"};
    for (size_t i = 0; i < sizeof ends / sizeof *ends; i++)
        if (has_suffix(name, ends[i]))
            return 1;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* reading a side file safely                                                                   */
/* ------------------------------------------------------------------------------------------ */
/* 1 when path (resolved) is root itself or below it */
static int path_within(const char *path, const char *root)
{
    size_t k = strlen(root);
    if (k == 1 && root[0] == '/')
        return 1;
    return strncmp(path, root, k) == 0 && (path[k] == '/' || path[k] == '\0');
}

/* where a link inside dir may point: dir itself, and for a Hugging Face cache snapshot
 * (.../models--org--name/snapshots/<revision>) the cache's blobs directory beside it */
static int link_target_ok(const char *target, const char *dir_real)
{
    if (path_within(target, dir_real))
        return 1;
    const char *rev = strrchr(dir_real, '/');
    if (rev == NULL || rev == dir_real)
        return 0;
    size_t snap_end = (size_t)(rev - dir_real);
    const char *snap = dir_real + snap_end;
    while (snap > dir_real && snap[-1] != '/')
        snap--;
    if ((size_t)(dir_real + snap_end - snap) != 9 || strncmp(snap, "snapshots", 9) != 0)
        return 0;
    char blobs[PATH_MAX];
    int n = snprintf(blobs, sizeof blobs, "%.*sblobs", (int)(snap - dir_real), dir_real);
    return n > 0 && (size_t)n < sizeof blobs && path_within(target, blobs);
}

/* Reads dir/name.  A link is followed only when it stays inside dir (or points into a Hugging
 * Face cache's blobs).  @return 1 read (*data malloc'd, NUL-terminated), 0 absent, -1 error. */
static int read_side_file(const char *dir, const char *dir_real, const char *name, char **data, size_t *n_bytes,
                          unsigned *mode, lm_err *err)
{
    char *path = lm_path_join(dir, name), *real = NULL;
    int rc = -1, fd = -1;
    *data = NULL;
    if (path == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        return -1;
    }
    struct stat st;
    if (lstat(path, &st) != 0) {
        if (errno == ENOENT) {
            free(path);
            return 0;
        }
        lm_fail_errno(err, errno, "cannot look at the file");
        goto fail;
    }
    const char *open_path = path;
    /* a FIFO, a device, a link loop: said as such (a link to nothing: said below) */
    const char *what = S_ISREG(st.st_mode) ? NULL : lm_path_not_regular(path);
    if (what != NULL && strstr(what, "to nothing") == NULL && lm_fail_not_regular(err, path) != LM_OK)
        goto fail;
    if (S_ISLNK(st.st_mode)) {
        real = realpath(path, NULL);
        if (real == NULL) {
            lm_fail_errno(err, errno, "a link whose target cannot be reached (an incomplete download?)");
            goto fail;
        }
        if (dir_real == NULL || !link_target_ok(real, dir_real)) {
            lm_fail(err, LM_E_UNSUPPORTED, "LinkOutsideDirectory",
                    "a link to '%s', outside the model directory: lora-merge does not follow links out of it "
                    "(copy the file into the directory)", real);
            goto fail;
        }
        open_path = real;
    }
    fd = lm_sys_open(open_path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0);
    if (fd < 0) {
        lm_fail_errno(err, errno, "cannot read the file");
        goto fail;
    }
    if (fstat(fd, &st) != 0) {
        lm_fail_errno(err, errno, "cannot read the file");
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) { /* replaced since the lstat */
        lm_fail(err, LM_E_IO, "NotRegularFile", "%s is no longer a regular file", name);
        goto fail;
    }
    if ((uint64_t)st.st_size > LM_SIDE_FILE_MAX_BYTES) {
        lm_fail(err, LM_E_FORMAT, "FileTooLarge", "%llu bytes, more than the %zu MiB a model file may have",
                (unsigned long long)st.st_size, LM_SIDE_FILE_MAX_BYTES >> 20);
        goto fail;
    }
    size_t want = (size_t)st.st_size, got = 0;
    char *buf = malloc(want + 1);
    if (buf == NULL) {
        lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto fail;
    }
    while (got < want) {
        ssize_t k = lm_sys_read(fd, buf + got, want - got);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            int e = k < 0 ? errno : EIO;
            free(buf);
            lm_fail_errno(err, e, k < 0 ? "cannot read the file" : "the file shrank while being read");
            goto fail;
        }
        got += (size_t)k;
    }
    buf[want] = '\0';
    *data = buf;
    *n_bytes = want;
    *mode = (unsigned)st.st_mode & 0666;
    rc = 1;
    goto done;
fail:
    lm_err_set_path(err, path);
done:
    if (fd >= 0)
        close(fd);
    free(real);
    free(path);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* config.json: fields, and edits that keep every other byte                                    */
/* ------------------------------------------------------------------------------------------ */
/* end of the (valid) JSON value starting at pos */
static size_t json_value_end(const char *s, size_t n, size_t pos)
{
    if (pos >= n)
        return n;
    if (s[pos] == '"') {
        size_t i = pos + 1;
        while (i < n && s[i] != '"')
            i += s[i] == '\\' ? 2 : 1;
        return i < n ? i + 1 : n;
    }
    if (s[pos] == '{' || s[pos] == '[') {
        size_t depth = 0, i = pos;
        for (; i < n; i++) {
            if (s[i] == '"') {
                i = json_value_end(s, n, i) - 1;
            } else if (s[i] == '{' || s[i] == '[') {
                depth++;
            } else if (s[i] == '}' || s[i] == ']') {
                if (--depth == 0)
                    return i + 1;
            }
        }
        return n;
    }
    size_t i = pos;
    while (i < n && !strchr(",}] \t\r\n", s[i]))
        i++;
    return i;
}

typedef struct {
    size_t begin, end; /* bytes replaced */
    char *text;        /* owned replacement */
} json_edit;

typedef struct {
    json_edit *e;
    size_t n, cap;
    char *summary;
    size_t sum_used, sum_cap;
} edit_list;

static int edit_add(edit_list *l, size_t begin, size_t end, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int edit_add(edit_list *l, size_t begin, size_t end, const char *fmt, ...)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 8;
        json_edit *ne = realloc(l->e, cap * sizeof *ne);
        if (ne == NULL)
            return -1;
        l->e = ne;
        l->cap = cap;
    }
    va_list ap;
    va_start(ap, fmt);
    char *t = NULL;
    int k = vasprintf(&t, fmt, ap);
    va_end(ap);
    if (k < 0)
        return -1;
    l->e[l->n++] = (json_edit){begin, end, t};
    return 0;
}

static void summary_add(edit_list *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void summary_add(edit_list *l, const char *fmt, ...)
{
    if (l->sum_used + 1 >= l->sum_cap)
        return;
    if (l->sum_used > 0)
        l->sum_used += (size_t)snprintf(l->summary + l->sum_used, l->sum_cap - l->sum_used, ", ");
    if (l->sum_used + 1 >= l->sum_cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(l->summary + l->sum_used, l->sum_cap - l->sum_used, fmt, ap);
    va_end(ap);
    if (k > 0)
        l->sum_used = l->sum_used + (size_t)k < l->sum_cap ? l->sum_used + (size_t)k : l->sum_cap - 1;
}

static int cmp_edit(const void *a, const void *b)
{
    const json_edit *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

static const st_json_node *member(const st_json_doc *d, const st_json_node *obj, const char *key)
{
    return obj && obj->type == ST_JSON_OBJECT ? st_json_get(d, obj, key, strlen(key)) : NULL;
}

/* the indentation used before the first member of obj ("  " when none can be seen) */
static void member_indent(const char *s, const st_json_node *first, char *buf, size_t cap)
{
    snprintf(buf, cap, "  ");
    if (first == NULL)
        return;
    size_t k = first->key_pos;
    size_t b = k;
    while (b > 0 && (s[b - 1] == ' ' || s[b - 1] == '\t'))
        b--;
    if (b > 0 && s[b - 1] == '\n' && k - b < cap)
        snprintf(buf, cap, "%.*s", (int)(k - b), s + b);
}

/* removes member m of an object (its key, value and one neighbouring comma) */
static int remove_member(edit_list *l, const char *s, size_t n, const st_json_node *m)
{
    size_t begin = m->key_pos, end = json_value_end(s, n, m->pos), i = end;
    while (i < n && isspace((unsigned char)s[i]))
        i++;
    if (i < n && s[i] == ',') { /* not the last member: up to the next key */
        i++;
        while (i < n && isspace((unsigned char)s[i]))
            i++;
        return edit_add(l, begin, i, "%s", "");
    }
    size_t b = begin; /* the last one: from the comma before it */
    while (b > 0 && isspace((unsigned char)s[b - 1]))
        b--;
    if (b > 0 && s[b - 1] == ',')
        begin = b - 1;
    return edit_add(l, begin, end, "%s", "");
}

/* appends "key": value to obj (after its last member, in its indentation) */
static int append_member(edit_list *l, const char *s, size_t n, const st_json_doc *d, const st_json_node *obj,
                         const char *key, const char *value)
{
    const st_json_node *c = st_json_child(d, obj), *last = NULL;
    for (; c != NULL; c = st_json_next(d, c))
        last = c;
    char ind[64];
    member_indent(s, st_json_child(d, obj), ind, sizeof ind);
    if (last == NULL) { /* {} */
        size_t open = obj->pos;
        return edit_add(l, open + 1, open + 1, "\"%s\": %s", key, value);
    }
    size_t end = json_value_end(s, n, last->pos);
    int newline = strchr(ind, '\t') != NULL || ind[0] == ' ' ? 1 : 0;
    const char *nl = memchr(s + obj->pos, '\n', end - obj->pos) != NULL && newline ? "\n" : " ";
    return edit_add(l, end, end, ",%s%s\"%s\": %s", nl, strcmp(nl, "\n") == 0 ? ind : "", key, value);
}

/* top-level object and its direct sub-objects */
static size_t config_objects(const st_json_doc *d, const st_json_node **objs, size_t cap)
{
    const st_json_node *root = st_json_root(d);
    size_t n = 0;
    objs[n++] = root;
    for (const st_json_node *c = st_json_child(d, root); c != NULL && n < cap; c = st_json_next(d, c))
        if (c->type == ST_JSON_OBJECT)
            objs[n++] = c;
    return n;
}

static int is_dtype_name(const char *s)
{
    static const char *const names[] = {"float32", "float16", "bfloat16", "float64", "float", "half", "auto",
                                        "float8_e4m3fn", "float8_e5m2"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strcmp(s, names[i]) == 0)
            return 1;
    return 0;
}

lm_code lm_config_rewrite(const char *text, size_t n, const lm_config_edits *e, char **out, size_t *n_out,
                          char *changes, size_t changes_cap, lm_err *err)
{
    *out = NULL;
    *n_out = 0;
    if (changes_cap)
        changes[0] = '\0';
    st_json_doc d;
    memset(&d, 0, sizeof d);
    edit_list l;
    memset(&l, 0, sizeof l);
    l.summary = changes;
    l.sum_cap = changes_cap;
    lm_code rc = LM_OK;
    if (st_json_parse(&d, text, n) != ST_JSON_OK || st_json_root(&d)->type != ST_JSON_OBJECT) {
        rc = lm_fail(err, LM_E_FORMAT, "InvalidConfig", "not a strict JSON object (%s at byte %zu)",
                     d.err_msg[0] ? d.err_msg : "not an object", d.err_pos);
        goto done;
    }
    const st_json_node *objs[64];
    size_t n_objs = config_objects(&d, objs, 64);
    const st_json_node *root = objs[0];
    int oom = 0;
    if (e->torch_dtype != NULL) {
        int seen = 0;
        for (size_t o = 0; o < n_objs; o++)
            for (int k = 0; k < 2; k++) {
                const st_json_node *v = member(&d, objs[o], k ? "dtype" : "torch_dtype");
                if (v == NULL || v->type != ST_JSON_STRING || !is_dtype_name(st_json_str(&d, v)))
                    continue;
                seen = 1;
                if (strcmp(st_json_str(&d, v), e->torch_dtype) == 0)
                    continue;
                oom |= edit_add(&l, v->pos, json_value_end(text, n, v->pos), "\"%s\"", e->torch_dtype);
                summary_add(&l, "%s%s%s %s -> %s", o ? st_json_key(&d, objs[o]) : "", o ? "." : "",
                            k ? "dtype" : "torch_dtype", st_json_str(&d, v), e->torch_dtype);
            }
        if (!seen) {
            char v[64];
            snprintf(v, sizeof v, "\"%s\"", e->torch_dtype);
            oom |= append_member(&l, text, n, &d, root, "torch_dtype", v);
            summary_add(&l, "torch_dtype %s added", e->torch_dtype);
        }
    }
    if (e->tie_word_embeddings >= 0) {
        const char *want = e->tie_word_embeddings ? "true" : "false";
        int seen = 0;
        for (size_t o = 0; o < n_objs; o++) {
            const st_json_node *v = member(&d, objs[o], "tie_word_embeddings");
            if (v == NULL)
                continue;
            seen = 1;
            if (v->type == (e->tie_word_embeddings ? ST_JSON_TRUE : ST_JSON_FALSE))
                continue;
            oom |= edit_add(&l, v->pos, json_value_end(text, n, v->pos), "%s", want);
            summary_add(&l, "%s%stie_word_embeddings -> %s", o ? st_json_key(&d, objs[o]) : "", o ? "." : "", want);
        }
        if (!seen) { /* absent means tied for transformers: say it */
            oom |= append_member(&l, text, n, &d, root, "tie_word_embeddings", want);
            summary_add(&l, "tie_word_embeddings %s added", want);
        }
    }
    if (e->vocab_size >= 0) {
        int seen = 0;
        for (size_t o = 0; o < n_objs; o++) {
            const st_json_node *v = member(&d, objs[o], "vocab_size");
            if (v == NULL || v->type != ST_JSON_NUMBER)
                continue;
            seen = 1;
            uint64_t old;
            if (st_json_u64(&d, v, &old) == ST_JSON_U64_OK && old == (uint64_t)e->vocab_size)
                continue;
            oom |= edit_add(&l, v->pos, json_value_end(text, n, v->pos), "%lld", (long long)e->vocab_size);
            summary_add(&l, "%s%svocab_size %.*s -> %lld", o ? st_json_key(&d, objs[o]) : "", o ? "." : "", (int)v->n,
                        st_json_num(&d, v), (long long)e->vocab_size);
        }
        if (!seen) {
            char v[32];
            snprintf(v, sizeof v, "%lld", (long long)e->vocab_size);
            oom |= append_member(&l, text, n, &d, root, "vocab_size", v);
            summary_add(&l, "vocab_size %lld added", (long long)e->vocab_size);
        }
    }
    if (e->drop_quantization) {
        static const char *const keys[] = {"quantization_config", "compression_config"};
        for (size_t k = 0; k < 2; k++) {
            const st_json_node *v = member(&d, root, keys[k]);
            if (v == NULL)
                continue;
            oom |= remove_member(&l, text, n, v);
            summary_add(&l, "%s removed", keys[k]);
        }
    }
    if (oom) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    if (l.n > 1)
        qsort(l.e, l.n, sizeof *l.e, cmp_edit);
    size_t total = n + 1;
    for (size_t i = 0; i < l.n; i++)
        total += strlen(l.e[i].text);
    char *o = malloc(total);
    if (o == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    size_t at = 0, used = 0;
    for (size_t i = 0; i < l.n; i++) {
        if (l.e[i].begin < at) /* overlapping edits cannot happen: one per member */
            continue;
        memcpy(o + used, text + at, l.e[i].begin - at);
        used += l.e[i].begin - at;
        size_t k = strlen(l.e[i].text);
        memcpy(o + used, l.e[i].text, k);
        used += k;
        at = l.e[i].end;
    }
    memcpy(o + used, text + at, n - at);
    used += n - at;
    o[used] = '\0';
    *out = o;
    *n_out = used;
done:
    for (size_t i = 0; i < l.n; i++)
        free(l.e[i].text);
    free(l.e);
    st_json_free(&d);
    return rc;
}

void lm_base_info_free(lm_base_info *bi)
{
    free(bi->model_type);
    free(bi->name_or_path);
    free(bi->torch_dtype);
    free(bi->license);
    memset(bi, 0, sizeof *bi);
    bi->tie_word_embeddings = -1;
    bi->vocab_size = -1;
}

/* "license: ..." and "license_name/license_link" lines of a model card's YAML front matter */
static char *front_matter_license(const char *card)
{
    if (strncmp(card, "---", 3) != 0)
        return NULL;
    const char *p = strchr(card, '\n');
    size_t cap = 1024, used = 0;
    char *out = malloc(cap);
    if (out == NULL)
        return NULL;
    out[0] = '\0';
    while (p != NULL && *++p != '\0') {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        if (len >= 3 && strncmp(p, "---", 3) == 0)
            break;
        if ((strncmp(p, "license:", 8) == 0 || strncmp(p, "license_name:", 13) == 0 ||
             strncmp(p, "license_link:", 13) == 0) && used + len + 2 < cap) {
            memcpy(out + used, p, len);
            used += len;
            out[used++] = '\n';
            out[used] = '\0';
        }
        p = eol;
    }
    if (used == 0) {
        free(out);
        return NULL;
    }
    return out;
}

lm_code lm_base_quant_scheme(const char *dir, lm_qscheme *s, lm_err *err)
{
    memset(s, 0, sizeof *s);
    char *real = realpath(dir, NULL), *data = NULL;
    size_t n = 0;
    unsigned mode;
    lm_err e;
    lm_err_clear(&e);
    lm_code rc = LM_OK;
    int got = read_side_file(dir, real, "config.json", &data, &n, &mode, &e);
    if (got == 1 && (rc = lm_qscheme_parse(data, n, s, err)) != LM_OK) {
        char *path = lm_path_join(dir, "config.json");
        lm_err_set_path(err, path);
        free(path);
    } else if (got < 0 && strcmp(e.kind, "LinkOutsideDirectory") != 0) {
        /* there but unreadable (a FIFO, a loop, an I/O error): whether the base is quantized is
         * not known, so nothing is merged (a link out of the directory is only not copied) */
        rc = e.code;
        if (err != NULL && err->code == LM_OK)
            *err = e;
    }
    free(data);
    data = NULL;
    /* ModelOpt's exports describe their quantization in hf_quant_config.json */
    if (rc == LM_OK && s->fmt == LM_Q_NONE && read_side_file(dir, real, "hf_quant_config.json", &data, &n, &mode, &e) == 1 &&
        (rc = lm_qscheme_parse_hf_quant(data, n, s, err)) != LM_OK) {
        char *path = lm_path_join(dir, "hf_quant_config.json");
        lm_err_set_path(err, path);
        free(path);
    }
    free(data);
    free(real);
    return rc;
}

void lm_base_info_read(const char *dir, lm_base_info *bi)
{
    memset(bi, 0, sizeof *bi);
    bi->tie_word_embeddings = -1;
    bi->vocab_size = -1;
    char *real = realpath(dir, NULL), *data = NULL;
    size_t n = 0;
    unsigned mode;
    lm_err e;
    lm_err_clear(&e);
    if (read_side_file(dir, real, "config.json", &data, &n, &mode, &e) == 1) {
        bi->has_config = 1;
        st_json_doc d;
        memset(&d, 0, sizeof d);
        if (st_json_parse(&d, data, n) == ST_JSON_OK && st_json_root(&d)->type == ST_JSON_OBJECT) {
            const st_json_node *objs[64];
            size_t n_objs = config_objects(&d, objs, 64);
            const st_json_node *root = objs[0], *v;
            if ((v = member(&d, root, "model_type")) && v->type == ST_JSON_STRING)
                bi->model_type = strdup(st_json_str(&d, v));
            if ((v = member(&d, root, "_name_or_path")) && v->type == ST_JSON_STRING)
                bi->name_or_path = strdup(st_json_str(&d, v));
            for (size_t o = 0; o < n_objs; o++) {
                if ((v = member(&d, objs[o], "tie_word_embeddings")) && bi->tie_word_embeddings < 0)
                    bi->tie_word_embeddings = v->type == ST_JSON_TRUE ? 1 : v->type == ST_JSON_FALSE ? 0 : -1;
                uint64_t u;
                if ((v = member(&d, objs[o], "vocab_size")) && bi->vocab_size < 0 &&
                    st_json_u64(&d, v, &u) == ST_JSON_U64_OK && u < (1ull << 62))
                    bi->vocab_size = (int64_t)u;
                if (bi->torch_dtype == NULL && (((v = member(&d, objs[o], "torch_dtype")) && v->type == ST_JSON_STRING) ||
                                                ((v = member(&d, objs[o], "dtype")) && v->type == ST_JSON_STRING)))
                    bi->torch_dtype = strdup(st_json_str(&d, v));
            }
            bi->has_quantization = member(&d, root, "quantization_config") != NULL ||
                                   member(&d, root, "compression_config") != NULL;
            struct stat hq;
            char *hp = lm_path_join(dir, "hf_quant_config.json");
            bi->has_quantization |= hp != NULL && stat(hp, &hq) == 0;
            free(hp);
            bi->has_auto_map = member(&d, root, "auto_map") != NULL;
        }
        st_json_free(&d);
    }
    free(data);
    data = NULL;
    if (read_side_file(dir, real, "README.md", &data, &n, &mode, &e) == 1)
        bi->license = front_matter_license(data);
    free(data);
    free(real);
}

/* ------------------------------------------------------------------------------------------ */
/* the plan of side files                                                                       */
/* ------------------------------------------------------------------------------------------ */
void lm_side_plan_free(lm_side_plan *sp)
{
    for (size_t i = 0; i < sp->n; i++) {
        free(sp->f[i].name);
        free(sp->f[i].src);
        free(sp->f[i].data);
    }
    free(sp->f);
    memset(sp, 0, sizeof *sp);
}

const lm_side_file *lm_side_find(const lm_side_plan *sp, const char *name)
{
    for (size_t i = 0; i < sp->n; i++)
        if (strcmp(sp->f[i].name, name) == 0)
            return &sp->f[i];
    return NULL;
}

/* takes data */
static lm_code side_add(lm_side_plan *sp, const char *name, const char *dir, const char *origin, const char *kind,
                        char *data, size_t n_bytes, unsigned mode, lm_err *err)
{
    if (sp->n == sp->cap) {
        size_t cap = sp->cap ? 2 * sp->cap : 16;
        lm_side_file *nf = realloc(sp->f, cap * sizeof *nf);
        if (nf == NULL) {
            free(data);
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        }
        sp->f = nf;
        sp->cap = cap;
    }
    lm_side_file *f = &sp->f[sp->n];
    memset(f, 0, sizeof *f);
    f->name = strdup(name);
    f->src = dir ? lm_path_join(dir, name) : NULL;
    if (f->name == NULL || (dir && f->src == NULL)) {
        free(f->name);
        free(f->src);
        free(data);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    f->origin = origin;
    f->kind = kind;
    f->data = data;
    f->n_bytes = n_bytes;
    f->mode = mode;
    sp->n++;
    return LM_OK;
}

typedef struct {
    char **v;
    size_t n, cap;
} name_list;

static void names_free(name_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* the entries of dir (sorted, so the output does not depend on the directory's order) */
static int list_dir(const char *dir, name_list *l)
{
    memset(l, 0, sizeof *l);
    DIR *d = opendir(dir);
    if (d == NULL)
        return -1;
    struct dirent *de;
    int rc = 0;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (l->n == l->cap) {
            size_t cap = l->cap ? 2 * l->cap : 32;
            char **nv = realloc(l->v, cap * sizeof *nv);
            if (nv == NULL) {
                rc = -2;
                break;
            }
            l->v = nv;
            l->cap = cap;
        }
        if ((l->v[l->n] = strdup(de->d_name)) == NULL) {
            rc = -2;
            break;
        }
        l->n++;
    }
    closedir(d);
    if (l->n > 1)
        qsort(l->v, l->n, sizeof *l->v, cmp_str);
    return rc;
}

static int is_reserved(const lm_side_inputs *in, const char *name)
{
    for (size_t i = 0; i < in->n_reserved; i++)
        if (strcmp(in->reserved[i], name) == 0)
            return 1;
    return 0;
}

/* the groups the adapter directory has files of (bit g set for group g) */
static unsigned adapter_groups(const char *adir, name_list *names)
{
    unsigned groups = 0;
    if (adir == NULL || list_dir(adir, names) != 0)
        return 0;
    for (size_t i = 0; i < names->n; i++) {
        const char *kind;
        int g;
        if (lm_side_is_allowed(names->v[i], &kind, &g) && g != G_BASE)
            groups |= 1u << g;
    }
    return groups;
}

static const char *const GROUP_NAMES[] = {"", "tokenizer", "chat template", "processor config"};

static lm_code add_config(lm_side_plan *sp, const lm_side_inputs *in, char *data, size_t n, unsigned mode,
                          lm_report_impl *r, lm_err *err)
{
    if (in->edits == NULL)
        return side_add(sp, "config.json", in->base_dir, "base", "config", data, n, mode, err);
    char *out = NULL, changes[512];
    size_t n_out = 0;
    lm_err e;
    lm_err_clear(&e);
    lm_code rc = lm_config_rewrite(data, n, in->edits, &out, &n_out, changes, sizeof changes, &e);
    if (rc == LM_E_NOMEM) {
        free(data);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    if (rc != LM_OK) { /* NaN, duplicate keys ...: copied as it is, and said */
        lm_report_warn(r, "ConfigNotRewritten", "%s/config.json is copied unchanged: %s", in->base_dir, e.msg);
        return side_add(sp, "config.json", in->base_dir, "base", "config", data, n, mode, err);
    }
    free(data);
    if (changes[0] != '\0')
        lm_report_note(r, "config.json: %s", changes);
    if ((rc = side_add(sp, "config.json", in->base_dir, "base", "config", out, n_out, mode, err)) == LM_OK)
        sp->f[sp->n - 1].rewritten = changes[0] != '\0';
    return rc;
}

/* what lm_side_plan_build() works with */
typedef struct {
    lm_side_plan *sp;
    const lm_side_inputs *in;
    lm_report_impl *r;
    char *base_real, *ad_real; /* owned: realpath of the base and the main adapter directory */
    const char *adir;          /* the main adapter's directory, or NULL */
    unsigned has;              /* groups the adapter directory holds files of */
    unsigned from_adapter;     /* groups taken from the adapter (a tokenizer brings its template) */
    char skipped[600];         /* the base's files left behind, for a note */
    size_t n_skipped, used;
    int truncated;             /* some names did not fit in skipped */
} side_ctx;

static void note_skipped(side_ctx *c, const char *name)
{
    char item[300];
    int k = snprintf(item, sizeof item, "%s%s", c->n_skipped ? ", " : "", name);
    if (k > 0 && c->used + (size_t)k < sizeof c->skipped) {
        memcpy(c->skipped + c->used, item, (size_t)k + 1);
        c->used += (size_t)k;
    } else {
        c->truncated = 1;
    }
    c->n_skipped++;
}

/* the base's files: allow-listed ones, unless the adapter supplies their group */
static lm_code side_base_files(side_ctx *c, const name_list *base, lm_err *err)
{
    const lm_side_inputs *in = c->in;
    lm_code rc = LM_OK;
    for (size_t i = 0; i < base->n && rc == LM_OK; i++) {
        const char *name = base->v[i], *kind;
        int g;
        if (!lm_side_is_allowed(name, &kind, &g)) {
            struct stat st;
            char *p = lm_path_join(in->base_dir, name);
            int regular = p && lstat(p, &st) == 0 && (S_ISREG(st.st_mode) || S_ISLNK(st.st_mode));
            free(p);
            if (regular && name[0] != '.' && !lm_is_weight_name(name) && strcmp(name, "README.md") != 0)
                note_skipped(c, name);
            continue;
        }
        if ((g != G_BASE && (c->from_adapter & (1u << g))) || is_reserved(in, name))
            continue;
        if (strcmp(name, "hf_quant_config.json") == 0 && in->edits != NULL && in->edits->drop_quantization)
            continue; /* the weights written are not quantized */
        char *data;
        size_t n;
        unsigned mode;
        int got = read_side_file(in->base_dir, c->base_real, name, &data, &n, &mode, err);
        if (got < 0)
            return err->code;
        if (got == 0)
            continue; /* vanished since the listing */
        if (strcmp(name, "config.json") == 0)
            rc = add_config(c->sp, in, data, n, mode, c->r, err);
        else
            rc = side_add(c->sp, name, in->base_dir, "base", kind, data, n, mode, err);
    }
    return rc;
}

/* the adapter's tokenizer, chat template and processor files */
static lm_code side_adapter_files(side_ctx *c, const name_list *ad, lm_err *err)
{
    lm_code rc = LM_OK;
    for (size_t i = 0; i < ad->n && rc == LM_OK; i++) {
        const char *name = ad->v[i], *kind;
        int g;
        if (!lm_side_is_allowed(name, &kind, &g) || g == G_BASE || is_reserved(c->in, name))
            continue;
        char *data;
        size_t n;
        unsigned mode;
        int got = read_side_file(c->adir, c->ad_real, name, &data, &n, &mode, err);
        if (got < 0)
            return err->code;
        if (got == 1)
            rc = side_add(c->sp, name, c->adir, "adapter", kind, data, n, mode, err);
    }
    for (int g = G_TOKENIZER; g <= G_PROCESSOR && rc == LM_OK; g++)
        if (c->has & (1u << g))
            lm_report_note(c->r, "%s files taken from the adapter directory %s, as a whole (none from the base)%s",
                           GROUP_NAMES[g], c->adir,
                           g == G_TOKENIZER && !(c->has & (1u << G_TEMPLATE)) ? "; its chat template too" : "");
    return rc;
}

/* --copy-file NAME: from the base directory, else the main adapter's; replaces a file of that
 * name already chosen */
static lm_code side_copy_file(side_ctx *c, const char *name, lm_err *err)
{
    const lm_side_inputs *in = c->in;
    lm_side_plan *sp = c->sp;
    if (name[0] == '\0' || strchr(name, '/') != NULL || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "--copy-file takes a plain file name, not '%s'", name);
    if (is_reserved(in, name))
        return lm_fail(err, LM_E_USAGE, "Usage", "--copy-file %s: that name is the merged weights' own", name);
    for (size_t k = 0; k < sp->n; k++)
        if (strcmp(sp->f[k].name, name) == 0) {
            free(sp->f[k].name);
            free(sp->f[k].src);
            free(sp->f[k].data);
            sp->f[k] = sp->f[--sp->n];
            break;
        }
    char *data;
    size_t n;
    unsigned mode;
    const char *from = in->base_dir;
    int got = read_side_file(in->base_dir, c->base_real, name, &data, &n, &mode, err);
    if (got == 0 && c->adir != NULL) {
        from = c->adir;
        got = read_side_file(c->adir, c->ad_real, name, &data, &n, &mode, err);
    }
    if (got < 0)
        return err->code;
    if (got == 0)
        return lm_fail(err, LM_E_USAGE, "Usage", "--copy-file %s: no such file in the base directory %s%s%s", name,
                       in->base_dir, c->adir ? " or the adapter directory " : "", c->adir ? c->adir : "");
    return side_add(sp, name, from, from == c->adir ? "adapter" : "base", "extra", data, n, mode, err);
}

/* several adapter directories with tokenizer files: the first adapter's win, and it is said */
static void warn_tokenizer_conflicts(side_ctx *c)
{
    for (size_t a = 1; a < c->in->n_adapter_dirs; a++) {
        name_list other;
        unsigned g = adapter_groups(c->in->adapter_dirs[a], &other);
        names_free(&other);
        if (g & (1u << G_TOKENIZER))
            lm_report_warn(c->r, "TokenizerConflict", "%s also holds tokenizer files; those of %s are used%s",
                           c->in->adapter_dirs[a], c->from_adapter & (1u << G_TOKENIZER) ? c->adir : c->in->base_dir,
                           c->from_adapter & (1u << G_TOKENIZER) ? "" : " (the base's)");
    }
}

lm_code lm_side_plan_build(lm_side_plan *sp, const lm_side_inputs *in, lm_report_impl *r, lm_err *err)
{
    lm_code rc = LM_OK;
    name_list base = {0}, ad = {0};
    side_ctx c;
    memset(&c, 0, sizeof c);
    c.sp = sp;
    c.in = in;
    c.r = r;
    c.adir = in->n_adapter_dirs ? in->adapter_dirs[0] : NULL;
    c.base_real = realpath(in->base_dir, NULL);
    c.ad_real = c.adir ? realpath(c.adir, NULL) : NULL;
    if (list_dir(in->base_dir, &base) == -2) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    c.has = adapter_groups(c.adir, &ad);
    /* a tokenizer saved with the adapter carries its chat template (tokenizer_config.json, or a
     * chat_template.jinja beside it): the base's template must not override it */
    c.from_adapter = c.has | (c.has & (1u << G_TOKENIZER) ? 1u << G_TEMPLATE : 0);
    warn_tokenizer_conflicts(&c);
    if ((rc = side_base_files(&c, &base, err)) != LM_OK || (rc = side_adapter_files(&c, &ad, err)) != LM_OK)
        goto done;
    for (size_t i = 0; i < in->n_copy_files && rc == LM_OK; i++)
        rc = side_copy_file(&c, in->copy_files[i], err);
    if (rc != LM_OK)
        goto done;
    if (lm_side_find(sp, "config.json") == NULL)
        lm_report_warn(r, "ConfigMissing", "%s has no config.json: the output directory will not load with "
                                           "from_pretrained until one is added", in->base_dir);
    if (in->model_card != NULL && lm_side_find(sp, "README.md") == NULL) {
        char *card = strdup(in->model_card);
        if (card == NULL) {
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto done;
        }
        rc = side_add(sp, "README.md", NULL, "generated", "model_card", card, strlen(card), 0666, err);
    }
    if (c.n_skipped > 0)
        lm_report_note(r, "not copied from %s (not model files; --copy-file NAME copies one): %s%s", in->base_dir,
                       c.skipped, c.truncated ? " ..." : "");
done:
    names_free(&base);
    names_free(&ad);
    free(c.base_real);
    free(c.ad_real);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* the model card                                                                               */
/* ------------------------------------------------------------------------------------------ */
/* s with the characters that would break a Markdown table cell replaced */
static void md_cell(char *buf, size_t cap, const char *s)
{
    size_t k = 0;
    for (; s && *s && k + 1 < cap; s++)
        buf[k++] = (*s == '|' || *s == '\n' || *s == '\r') ? ' ' : *s;
    buf[k] = '\0';
}

char *lm_model_card(const lm_card_info *ci)
{
    char *out = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&out, &n);
    if (f == NULL)
        return NULL;
    fprintf(f, "---\n");
    if (ci->base_is_hub_id && ci->base_name)
        fprintf(f, "base_model: %s\n", ci->base_name);
    if (ci->license)
        fputs(ci->license, f);
    fprintf(f, "tags:\n- lora-merge\n- merge\n");
    fprintf(f, "---\n\n# %s\n\n", ci->title ? ci->title : "merged model");
    fprintf(f, "This model is **%s** with %zu adapter%s merged into its weights by lora-merge %s.\n\n",
            ci->base_name ? ci->base_name : "the base model", ci->n_adapters, ci->n_adapters == 1 ? "" : "s",
            LM_VERSION_STRING);
    fprintf(f, "| adapter | type | weight | trained on | sha256 of its weights |\n| --- | --- | --- | --- | --- |\n");
    for (size_t i = 0; i < ci->n_adapters; i++) {
        const lm_card_adapter *a = &ci->adapters[i];
        char name[256], base[256];
        md_cell(name, sizeof name, a->name);
        md_cell(base, sizeof base, a->declared_base ? a->declared_base : "(not declared)");
        fprintf(f, "| %s | %s | %.17g | %s | `%s` |\n", name, a->peft_type, a->weight, base, a->sha256 ? a->sha256 : "");
    }
    fprintf(f, "\nWeights: %s, %zu tensors, %zu of them changed or added by the merge. Every element was computed "
               "in f32 from the base value and the sum of all deltas and rounded once.\n\n",
            ci->dtype ? ci->dtype : "?", ci->n_tensors, ci->n_changed);
    fprintf(f, "This card describes the merge only. The base model's own card (its license, intended use and "
               "limitations) applies to this model too and is not copied here: read it where the base model "
               "comes from.\n");
    if (fclose(f) != 0) {
        free(out);
        return NULL;
    }
    return out;
}
