/* SPDX-License-Identifier: MIT */
/* inputs.c : what a path given as BASE or ADAPTER_DIR really is (see inputs.h). */
#include "inputs.h"

#include "lm_error.h"
#include "output.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

typedef enum { K_MISSING, K_OTHER, K_DIR, K_LFS, K_GGUF } file_kind;

static const char LFS_MAGIC[] = "version https://git-lfs.github.com/spec/v1";

/* what the first bytes of path say it is */
static file_kind sniff(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return K_MISSING;
    if (S_ISDIR(st.st_mode))
        return K_DIR;
    if (!S_ISREG(st.st_mode))
        return K_OTHER;
    unsigned char b[64];
    memset(b, 0, sizeof b);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return K_OTHER;
    ssize_t n = read(fd, b, sizeof b);
    close(fd);
    if (n <= 0)
        return K_OTHER;
    if ((size_t)n >= sizeof LFS_MAGIC - 1 && memcmp(b, LFS_MAGIC, sizeof LFS_MAGIC - 1) == 0)
        return K_LFS;
    if (n >= 4 && memcmp(b, "GGUF", 4) == 0)
        return K_GGUF;
    return K_OTHER;
}

static int exists_in(const char *dir, const char *name)
{
    char *p = lm_path_join(dir, name);
    struct stat st;
    int r = p != NULL && stat(p, &st) == 0;
    free(p);
    return r;
}

static int is_model_dir(const char *dir)
{
    return exists_in(dir, "model.safetensors") || exists_in(dir, "model.safetensors.index.json") ||
           exists_in(dir, "pytorch_model.bin") || exists_in(dir, "pytorch_model.bin.index.json") ||
           (exists_in(dir, "config.json") && !exists_in(dir, "adapter_config.json"));
}

/* ORG/NAME as the Hub spells repository ids: one slash, letters, digits, '-', '_', '.' */
static int looks_like_hub_id(const char *s)
{
    const char *slash = strchr(s, '/');
    if (slash == NULL || slash == s || slash[1] == '\0' || strchr(slash + 1, '/') != NULL || s[0] == '.')
        return 0;
    for (const char *p = s; *p; p++)
        if (p != slash && !isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.')
            return 0;
    return 1;
}

static lm_code usage(lm_err *err, const char *kind, const char *path, const char *fmt, const char *a)
    __attribute__((format(printf, 4, 0)));
static lm_code usage(lm_err *err, const char *kind, const char *path, const char *fmt, const char *a)
{
    lm_fail(err, LM_E_USAGE, kind, fmt, a);
    lm_err_set_path(err, path);
    return LM_E_USAGE;
}

lm_code lm_inputs_precheck(const lm_merge_job *job, lm_err *err)
{
    const char *base = job->base_path;
    file_kind bk = sniff(base);
    for (size_t i = 0; i < job->n_adapters; i++) {
        const char *ad = job->adapters[i].dir;
        file_kind ak = sniff(ad);
        int base_is_adapter = bk == K_DIR && exists_in(base, "adapter_config.json") && !is_model_dir(base);
        /* an adapter of another tool may sit in a directory with model files (torchtune's epoch_N/) */
        int ad_is_model = ak == K_DIR && !exists_in(ad, "adapter_config.json") && is_model_dir(ad) &&
                          lm_adapter_format_detect(ad) == NULL;
        if (i == 0 && base_is_adapter && ad_is_model)
            return usage(err, "SwappedArguments", base,
                         "this is an adapter directory and '%s' a model directory: the order is BASE ADAPTER_DIR OUT",
                         ad);
        if (i == 0 && base_is_adapter)
            return usage(err, "SwappedArguments", base, "%s",
                         "BASE is an adapter directory (it holds adapter_config.json): the order is BASE ADAPTER_DIR OUT");
        if (ad_is_model)
            return usage(err, "SwappedArguments", ad, "%s",
                         "ADAPTER_DIR is a model directory (no adapter_config.json, model weights or config.json): "
                         "the order is BASE ADAPTER_DIR OUT");
        if (ak == K_MISSING && looks_like_hub_id(ad))
            return usage(err, "HubId", ad,
                         "no such directory; '%s' looks like a Hugging Face Hub id: lora-merge reads local files only "
                         "(download it first: huggingface-cli download ID --local-dir DIR, then give DIR)", ad);
    }
    if (bk == K_MISSING && looks_like_hub_id(base))
        return usage(err, "HubId", base,
                     "no such file or directory; '%s' looks like a Hugging Face Hub id: lora-merge reads local files "
                     "only (download it first: huggingface-cli download ID --local-dir DIR, then give DIR)", base);
    return LM_OK;
}

static void replace(lm_err *err, lm_code code, const char *kind, const char *path, const char *msg)
{
    lm_err_clear(err);
    lm_fail(err, code, kind, "%s", msg);
    lm_err_set_path(err, path);
}

/* the weight file a directory would hold that is one of the formats below */
static const char *const DIR_FILES[] = {"model.safetensors", "adapter_model.safetensors", "pytorch_model.bin",
                                        "adapter_model.bin", "model.gguf"};

void lm_inputs_explain(const char *role, const char *path, lm_err *err)
{
    if (err->code == LM_OK || err->code == LM_E_NOMEM)
        return;
    const char *failed = err->path[0] ? err->path : path;
    char *copy = strdup(failed);
    if (copy == NULL)
        return;
    file_kind k = sniff(copy);
    char *inner = NULL;
    if (k == K_DIR) { /* a directory: look at the weights it holds */
        for (size_t i = 0; i < sizeof DIR_FILES / sizeof *DIR_FILES && inner == NULL; i++)
            if (exists_in(copy, DIR_FILES[i]))
                inner = lm_path_join(copy, DIR_FILES[i]);
        if (inner != NULL) {
            k = sniff(inner);
            free(copy);
            copy = inner;
        }
    }
    switch (k) {
    case K_LFS:
        replace(err, LM_E_FORMAT, "GitLfsPointer", copy,
                "a Git LFS pointer, not the file's content: run 'git lfs pull' in its repository (or download the "
                "file itself)");
        break;
    case K_GGUF:
        if (strcmp(role, "base") == 0)
            replace(err, LM_E_UNSUPPORTED, "GgufFile", copy,
                    "a GGUF file (llama.cpp): lora-merge merges into safetensors checkpoints; merge into the original "
                    "model, then convert the result to GGUF");
        else if (err->code != LM_E_UNSUPPORTED) /* else the adapter reader has said it (adapter_formats.c) */
            replace(err, LM_E_UNSUPPORTED, "GgufFile", copy,
                    "a GGUF file (llama.cpp): merge GGUF LoRA adapters with llama.cpp's own llama-export-lora, or "
                    "merge the PEFT adapter it came from");
        break;
    default:
        break;
    }
    free(copy);
}

/* ------------------------------------------------------------------------------------------ */
/* the base an adapter declares                                                                 */
/* ------------------------------------------------------------------------------------------ */
char *lm_adapter_declared_base(const char *config_path)
{
    FILE *f = fopen(config_path, "rb");
    if (f == NULL)
        return NULL;
    char *buf = malloc((size_t)1 << 20);
    size_t n = buf ? fread(buf, 1, ((size_t)1 << 20) - 1, f) : 0;
    fclose(f);
    if (buf == NULL)
        return NULL;
    cJSON *root = cJSON_ParseWithLength(buf, n);
    free(buf);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "base_model_name_or_path");
    char *out = cJSON_IsString(v) && v->valuestring[0] ? strdup(v->valuestring) : NULL;
    cJSON_Delete(root);
    return out;
}

/* the last path component, lowercased, into buf */
static void leaf_lower(const char *s, char *buf, size_t cap)
{
    size_t n, used = 0;
    const char *leaf = lm_path_leaf(s, &n);
    for (size_t i = 0; i < n && used + 1 < cap; i++)
        buf[used++] = (char)tolower((unsigned char)leaf[i]);
    buf[used] = '\0';
}

/* a model family named in s (lowercase), or NULL; more specific names first */
static const char *family_of(const char *s)
{
    static const struct {
        const char *token, *family;
    } fam[] = {{"mixtral", "mixtral"}, {"mistral", "mistral"}, {"llama", "llama"}, {"qwen", "qwen"},
               {"gemma", "gemma"},     {"phi", "phi"},         {"gpt2", "gpt2"},   {"gpt-2", "gpt2"},
               {"falcon", "falcon"},   {"bloom", "bloom"},     {"gpt_neox", "gpt_neox"}, {"pythia", "gpt_neox"},
               {"starcoder", "starcoder"}, {"olmo", "olmo"},   {"deepseek_v", "deepseek"}, {"opt-", "opt"},
               {"t5", "t5"},           {"bert", "bert"}};
    for (size_t i = 0; i < sizeof fam / sizeof *fam; i++)
        if (strstr(s, fam[i].token) != NULL)
            return fam[i].family;
    return NULL;
}

void lm_inputs_check_base(const lm_base_info *bi, const char *base_path, lm_adapter *const *ads, size_t n_ads,
                          lm_report_impl *r)
{
    char base_leaf[256] = "", dir_leaf[256] = "", mt[64] = "";
    if (bi->name_or_path)
        leaf_lower(bi->name_or_path, base_leaf, sizeof base_leaf);
    char *bdir = lm_base_directory(base_path), *real = bdir ? realpath(bdir, NULL) : NULL;
    if (real != NULL) { /* a Hugging Face cache snapshot: .../models--org--name/snapshots/rev */
        const char *m = strstr(real, "/models--"), *snap = m ? strstr(m, "/snapshots/") : NULL;
        if (snap != NULL) {
            char repo[256];
            snprintf(repo, sizeof repo, "%.*s", (int)(snap - m - 1), m + 1);
            const char *name = repo, *p;
            while ((p = strstr(name, "--")) != NULL)
                name = p + 2;
            leaf_lower(name, dir_leaf, sizeof dir_leaf);
        } else {
            leaf_lower(real, dir_leaf, sizeof dir_leaf);
        }
    }
    free(real);
    free(bdir);
    if (bi->model_type) {
        size_t k = 0;
        for (const char *p = bi->model_type; *p && k + 1 < sizeof mt; p++)
            mt[k++] = (char)tolower((unsigned char)*p);
        mt[k] = '\0';
    }
    for (size_t i = 0; i < n_ads; i++) {
        if (ads[i]->foreign != NULL) /* another tool's adapter: no PEFT config that names its base */
            continue;
        char *declared = lm_adapter_declared_base(ads[i]->config_path);
        if (declared == NULL)
            continue;
        char dl[256];
        leaf_lower(declared, dl, sizeof dl);
        if ((base_leaf[0] && strcmp(dl, base_leaf) == 0) || (dir_leaf[0] && strcmp(dl, dir_leaf) == 0)) {
            free(declared);
            continue;
        }
        const char *fa = family_of(dl), *fb = mt[0] ? family_of(mt) : NULL;
        if (fa != NULL && fb != NULL && strcmp(fa, fb) != 0)
            lm_report_warn(r, "BaseModelMismatch",
                           "%s was trained on '%s' (a %s model) but the base is a %s model (config.json model_type "
                           "'%s')", ads[i]->dir, declared, fa, fb, bi->model_type);
        else if (base_leaf[0] && strchr(bi->name_or_path, '/') != NULL && bi->name_or_path[0] != '/' &&
                 bi->name_or_path[0] != '.')
            lm_report_warn(r, "BaseModelMismatch",
                           "%s was trained on '%s' but the base's config.json names '%s'", ads[i]->dir, declared,
                           bi->name_or_path);
        free(declared);
    }
}
