/* SPDX-License-Identifier: MIT */
/* test_model_dir.c : a directory OUT is a model that loads right.  Generated HF-style model
 * directories (config.json, tokenizer files, tied and untied heads, sharded bases, Hugging Face
 * cache links) are merged, and the output directory is checked file by file: config.json adjusted
 * to the weights (dtype, tie_word_embeddings, quantization_config) with every other byte kept,
 * the allow-list of side files (secrets and stray files not copied, links out of the directory
 * refused, permissions kept at most), tokenizer files from the adapter, --copy-file, stale
 * shards removed, foreign weights refused, the model card and the provenance metadata.
 *
 * The tied-head checks go through an independent loader written here (md_head()): it reads
 * config.json and the weights as transformers does and honours tie_word_embeddings, so a trained
 * head that a loader would silently replace by the embedding fails the test. */
#include "th.h"

#include "model_files.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MD_V 12 /* vocabulary */
#define MD_D 8  /* hidden size */
#define MD_R 2  /* LoRA rank; lora_alpha 4: scale 2 */

enum { MD_TIED = 1, MD_HEAD_MTS = 2, MD_EMBED_LORA = 4, MD_QUANT = 8 };

typedef struct {
    char *tmp;
    char base[700], ad[700], out[700];
    double embed[MD_V * MD_D], q[MD_D * MD_D], norm[MD_D], head[MD_V * MD_D];
    double A[MD_R * MD_D], B[MD_D * MD_R];                 /* q_proj LoRA */
    double eA[MD_R * MD_V], eB[MD_D * MD_R];               /* embedding LoRA: A [r, V], B [D, r] */
    double trained_head[MD_V * MD_D];                      /* modules_to_save lm_head */
    int flags;
} md_fx;

#define md_path(dst, cap, dir, name) cr_assert_eq(th_path(dst, cap, dir, name), 0, "path too long")
#define md_write(dir, name, text) cr_assert_eq(th_write_text(dir, name, text), 0, "cannot write %s", name)

static char *md_read(const char *dir, const char *name)
{
    char p[1400];
    md_path(p, sizeof p, dir, name);
    size_t n;
    uint8_t *b = th_read_file(p, &n);
    if (b == NULL)
        return NULL;
    char *s = realloc(b, n + 1);
    s[n] = '\0';
    return s;
}

static int md_has(const char *dir, const char *name)
{
    char p[1400];
    md_path(p, sizeof p, dir, name);
    return th_exists(p);
}

static const char MD_CONFIG_TIED[] =
    "{\n  \"_name_or_path\": \"meta-llama/Llama-3.2-1B\",\n  \"architectures\": [\"LlamaForCausalLM\"],\n"
    "  \"hidden_size\": 8,\n  \"model_type\": \"llama\",\n  \"rope_theta\": 500000.0,\n"
    "  \"rms_norm_eps\": 1e-05,\n  \"tie_word_embeddings\": true,\n  \"torch_dtype\": \"float32\",\n"
    "  \"vocab_size\": 12\n}\n";

static const char MD_CONFIG_UNTIED[] =
    "{\n  \"_name_or_path\": \"meta-llama/Llama-3.2-1B\",\n  \"architectures\": [\"LlamaForCausalLM\"],\n"
    "  \"hidden_size\": 8,\n  \"model_type\": \"llama\",\n  \"rope_theta\": 500000.0,\n"
    "  \"rms_norm_eps\": 1e-05,\n  \"tie_word_embeddings\": false,\n  \"torch_dtype\": \"float32\",\n"
    "  \"vocab_size\": 12\n}\n";

static void md_adapter_config(const md_fx *f, const char *extra)
{
    char text[2048];
    snprintf(text, sizeof text,
             "{\"peft_type\": \"LORA\", \"task_type\": \"CAUSAL_LM\", \"r\": %d, \"lora_alpha\": 4, "
             "\"target_modules\": [\"q_proj\"%s], \"base_model_name_or_path\": \"meta-llama/Llama-3.2-1B\"%s%s}",
             MD_R, f->flags & MD_EMBED_LORA ? ", \"embed_tokens\"" : "",
             f->flags & MD_HEAD_MTS ? ", \"modules_to_save\": [\"lm_head\"]" : "", extra ? extra : "");
    md_write(f->ad, "adapter_config.json", text);
}

static void md_adapter_weights(const md_fx *f)
{
    th_out_tensor t[6];
    size_t n = 0;
    t[n++] = (th_out_tensor){"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32", 2, {MD_R, MD_D}, f->A};
    t[n++] = (th_out_tensor){"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F32", 2, {MD_D, MD_R}, f->B};
    if (f->flags & MD_EMBED_LORA) {
        t[n++] = (th_out_tensor){"base_model.model.model.embed_tokens.lora_embedding_A", "F32", 2, {MD_R, MD_V}, f->eA};
        t[n++] = (th_out_tensor){"base_model.model.model.embed_tokens.lora_embedding_B", "F32", 2, {MD_D, MD_R}, f->eB};
    }
    if (f->flags & MD_HEAD_MTS)
        t[n++] = (th_out_tensor){"base_model.model.lm_head.weight", "F32", 2, {MD_V, MD_D}, f->trained_head};
    char p[1400];
    md_path(p, sizeof p, f->ad, "adapter_model.safetensors");
    cr_assert_eq(th_st_write(p, t, n), 0);
}

static void md_base_weights(const md_fx *f, const char *path)
{
    th_out_tensor t[4];
    size_t n = 0;
    t[n++] = (th_out_tensor){"model.embed_tokens.weight", "F32", 2, {MD_V, MD_D}, f->embed};
    t[n++] = (th_out_tensor){"model.layers.0.self_attn.q_proj.weight", "F32", 2, {MD_D, MD_D}, f->q};
    t[n++] = (th_out_tensor){"model.norm.weight", "F32", 1, {MD_D}, f->norm};
    if (!(f->flags & MD_TIED))
        t[n++] = (th_out_tensor){"lm_head.weight", "F32", 2, {MD_V, MD_D}, f->head};
    cr_assert_eq(th_st_write(path, t, n), 0);
}

static void md_make(md_fx *f, int flags)
{
    memset(f, 0, sizeof *f);
    f->flags = flags;
    f->tmp = th_tmpdir();
    cr_assert_not_null(f->tmp);
    md_path(f->base, sizeof f->base, f->tmp, "base");
    md_path(f->ad, sizeof f->ad, f->tmp, "adapter");
    md_path(f->out, sizeof f->out, f->tmp, "merged");
    cr_assert_eq(mkdir(f->base, 0777), 0);
    cr_assert_eq(mkdir(f->ad, 0777), 0);
    uint64_t seed = 0xd1ull;
    for (int i = 0; i < MD_V * MD_D; i++) {
        f->embed[i] = th_round_to(th_rand_uniform(&seed), "F32");
        f->head[i] = th_round_to(th_rand_uniform(&seed), "F32");
        f->trained_head[i] = th_round_to(2 + th_rand_uniform(&seed), "F32"); /* unlike either */
    }
    for (int i = 0; i < MD_D * MD_D; i++)
        f->q[i] = th_round_to(th_rand_uniform(&seed), "F32");
    for (int i = 0; i < MD_D; i++)
        f->norm[i] = th_round_to(1 + 0.1 * th_rand_uniform(&seed), "F32");
    for (int i = 0; i < MD_R * MD_D; i++) {
        f->A[i] = th_round_to(0.3 * th_rand_uniform(&seed), "F32");
        f->B[i] = th_round_to(0.1 * th_rand_uniform(&seed), "F32");
        f->eB[i] = th_round_to(0.1 * th_rand_uniform(&seed), "F32");
    }
    for (int i = 0; i < MD_R * MD_V; i++)
        f->eA[i] = th_round_to(0.3 * th_rand_uniform(&seed), "F32");
    char p[1400];
    md_path(p, sizeof p, f->base, "model.safetensors");
    md_base_weights(f, p);
    md_write(f->base, "config.json", flags & MD_TIED ? MD_CONFIG_TIED : MD_CONFIG_UNTIED);
    md_adapter_config(f, NULL);
    md_adapter_weights(f);
}

static void md_free(md_fx *f)
{
    if (getenv("LM_TEST_KEEP") == NULL)
        th_rmrf(f->tmp);
    free(f->tmp);
}

#define md_run th_runv

static void md_ok(th_run_result *r)
{
    cr_assert_eq(r->status, 0, "exit %d: %s", r->status, r->err);
}

/* ---- the independent loader -------------------------------------------------------------------- */
/* tensor `name` of the model directory dir (model.safetensors or the shards of its index), as
 * doubles; NULL when absent */
static double *md_tensor(const char *dir, const char *name, uint64_t *n_elems)
{
    char *idx = md_read(dir, "model.safetensors.index.json");
    char file[256] = "model.safetensors";
    if (idx != NULL) {
        cJSON *j = cJSON_Parse(idx);
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "weight_map"), name);
        if (cJSON_IsString(f))
            snprintf(file, sizeof file, "%s", f->valuestring);
        else
            file[0] = '\0';
        cJSON_Delete(j);
        free(idx);
        if (file[0] == '\0')
            return NULL;
    }
    char p[1400];
    md_path(p, sizeof p, dir, file);
    th_st st;
    cr_assert_eq(th_st_read(p, &st), 0, "cannot read %s", p);
    const th_tensor *t = th_st_find(&st, name);
    double *v = t ? th_to_f64(t) : NULL;
    if (t && n_elems)
        *n_elems = t->n_elems;
    th_st_free(&st);
    return v;
}

/* the output head a loader would use: config.json's tie_word_embeddings (absent: true, as
 * PretrainedConfig's default) decides between the input embedding and lm_head.weight */
static double *md_head(const char *dir)
{
    char *cfg = md_read(dir, "config.json");
    cr_assert_not_null(cfg, "%s has no config.json", dir);
    cJSON *j = cJSON_Parse(cfg);
    cr_assert_not_null(j, "config.json is not JSON: %s", cfg);
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(j, "tie_word_embeddings");
    int tied = tie == NULL || cJSON_IsTrue(tie);
    cJSON_Delete(j);
    free(cfg);
    double *h = md_tensor(dir, tied ? "model.embed_tokens.weight" : "lm_head.weight", NULL);
    cr_assert_not_null(h, "the loader finds no %s", tied ? "embedding" : "lm_head.weight");
    return h;
}

static void md_expect_values(const double *got, const double *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        cr_assert(fabs(got[i] - want[i]) <= 1e-6 * (1 + fabs(want[i])), "%s[%zu] = %.9g, expected %.9g", what, i, got[i],
                  want[i]);
}

/* ============================================================================================ */
/* tied and untied heads                                                                         */
/* ============================================================================================ */
/* a trained head (modules_to_save) on a tied base: both tensors written, the flag false, and
 * the loader finds the trained head */
Test(modeldir, tied_base_trained_head_loads_intact)
{
    md_fx f;
    md_make(&f, MD_TIED | MD_HEAD_MTS);
    th_run_result r = md_run("--json", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    cr_assert(strstr(r.out, "tie_word_embeddings set to false") != NULL, "the report does not say it: %s", r.out);
    th_run_free(&r);
    double *h = md_head(f.out);
    md_expect_values(h, f.trained_head, MD_V * MD_D, "head");
    free(h);
    double *e = md_tensor(f.out, "model.embed_tokens.weight", NULL);
    cr_assert_not_null(e);
    md_expect_values(e, f.embed, MD_V * MD_D, "embedding");
    free(e);
    char *cfg = md_read(f.out, "config.json");
    cr_assert(strstr(cfg, "\"tie_word_embeddings\": false") != NULL, "%s", cfg);
    free(cfg);
    md_free(&f);
}

/* nothing on the head: the tied base stays tied, config.json byte-identical (dtype unchanged) */
Test(modeldir, tied_base_untouched_head_stays_tied)
{
    md_fx f;
    md_make(&f, MD_TIED);
    th_run_result r = md_run("-q", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    th_run_free(&r);
    char *a = md_read(f.base, "config.json"), *b = md_read(f.out, "config.json");
    cr_assert_str_eq(b, a, "config.json changed although nothing about it did");
    free(a);
    free(b);
    cr_assert(!md_has(f.out, "lm_head.weight"));
    double *h = md_head(f.out);
    md_expect_values(h, f.embed, MD_V * MD_D, "head (the embedding)");
    free(h);
    md_free(&f);
}

/* an untied base: the saved head replaces lm_head.weight, the flag stays false */
Test(modeldir, untied_base_head_replaced)
{
    md_fx f;
    md_make(&f, MD_HEAD_MTS);
    th_run_result r = md_run("-q", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    th_run_free(&r);
    double *h = md_head(f.out);
    md_expect_values(h, f.trained_head, MD_V * MD_D, "head");
    free(h);
    char *cfg = md_read(f.out, "config.json");
    cr_assert(strstr(cfg, "\"tie_word_embeddings\": false") != NULL, "%s", cfg);
    free(cfg);
    md_free(&f);
}

/* a delta on the embedding of a tied pair: as PEFT merges it, the head follows the embedding
 * (one tensor, still tied), and the report says so */
Test(modeldir, tied_base_embedding_delta_moves_the_head_too)
{
    md_fx f;
    md_make(&f, MD_TIED | MD_EMBED_LORA);
    th_run_result r = md_run("--json", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    cr_assert(strstr(r.out, "tied") != NULL, "the report does not mention the tied head: %s", r.out);
    th_run_free(&r);
    /* merged embedding: W[v, :] + 2 * (B @ A)^T[v, :] */
    double want[MD_V * MD_D];
    for (int v = 0; v < MD_V; v++)
        for (int d = 0; d < MD_D; d++) {
            double s = 0;
            for (int k = 0; k < MD_R; k++)
                s += f.eB[d * MD_R + k] * f.eA[k * MD_V + v];
            want[v * MD_D + d] = th_round_to(f.embed[v * MD_D + d] + 2.0 * s, "F32");
        }
    double *h = md_head(f.out);
    md_expect_values(h, want, MD_V * MD_D, "head (the merged embedding)");
    free(h);
    char *cfg = md_read(f.out, "config.json");
    cr_assert(strstr(cfg, "\"tie_word_embeddings\": true") != NULL, "%s", cfg);
    free(cfg);
    md_free(&f);
}

/* ============================================================================================ */
/* config.json                                                                                   */
/* ============================================================================================ */
static char *md_rewrite(const char *in, const lm_config_edits *e, char *changes, size_t cap)
{
    char *out = NULL;
    size_t n = 0;
    lm_err err;
    lm_err_clear(&err);
    lm_code rc = lm_config_rewrite(in, strlen(in), e, &out, &n, changes, cap, &err);
    cr_assert_eq(rc, LM_OK, "rewrite failed: %s", err.msg);
    cr_assert_eq(strlen(out), n);
    cJSON *j = cJSON_Parse(out);
    cr_assert_not_null(j, "the rewritten config is not JSON: %s", out);
    cJSON_Delete(j);
    return out;
}

Test(modeldir, config_rewrite_keeps_every_other_byte)
{
    const char *in = "{\n    \"architectures\": [\"X\"],\n    \"quantization_config\": {\"bits\": 4, \"x\": [1, {\"y\": \"}\"}]},\n"
                     "    \"rope_theta\": 500000.0,\n    \"text_config\": {\"torch_dtype\": \"bfloat16\", \"vocab_size\": 10,"
                     " \"tie_word_embeddings\": true},\n    \"torch_dtype\": \"bfloat16\",\n    \"eps\": 1e-05\n}\n";
    lm_config_edits e = {"float16", 0, 12, 1};
    char changes[512];
    char *out = md_rewrite(in, &e, changes, sizeof changes);
    const char *want = "{\n    \"architectures\": [\"X\"],\n    \"rope_theta\": 500000.0,\n"
                       "    \"text_config\": {\"torch_dtype\": \"float16\", \"vocab_size\": 12, \"tie_word_embeddings\": false},\n"
                       "    \"torch_dtype\": \"float16\",\n    \"eps\": 1e-05\n}\n";
    cr_assert_str_eq(out, want);
    cr_assert(strstr(changes, "quantization_config removed") && strstr(changes, "torch_dtype bfloat16 -> float16"), "%s",
              changes);
    free(out);
    /* the last member removed (the comma before it goes), keys appended in the file's indentation */
    const char *in2 = "{\n  \"a\": 1,\n  \"quantization_config\": {}\n}";
    lm_config_edits e2 = {"bfloat16", 0, -1, 1};
    out = md_rewrite(in2, &e2, changes, sizeof changes);
    cr_assert_str_eq(out, "{\n  \"a\": 1,\n  \"torch_dtype\": \"bfloat16\",\n  \"tie_word_embeddings\": false\n}");
    free(out);
    /* nothing to do: identical */
    lm_config_edits none = {NULL, -1, -1, 0};
    out = md_rewrite(in, &none, changes, sizeof changes);
    cr_assert_str_eq(out, in);
    cr_assert_str_eq(changes, "");
    free(out);
    /* not strict JSON: an error (the caller copies the file unchanged and warns) */
    lm_err err;
    lm_err_clear(&err);
    size_t n;
    cr_assert_eq(lm_config_rewrite("{\"a\": NaN}", 10, &e, &out, &n, changes, sizeof changes, &err), LM_E_FORMAT);
    cr_assert_null(out);
}

/* --dtype: torch_dtype follows; quantization_config goes when the weights written are floats */
Test(modeldir, config_dtype_and_quantization)
{
    md_fx f;
    md_make(&f, 0);
    md_write(f.base, "config.json",
             "{\"model_type\": \"llama\", \"quantization_config\": {\"quant_method\": \"bitsandbytes\", \"load_in_4bit\": "
             "true}, \"rope_theta\": 500000.0, \"tie_word_embeddings\": false, \"torch_dtype\": \"float32\", "
             "\"vocab_size\": 12}");
    th_run_result r = md_run("-q", "--dtype", "bf16", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    th_run_free(&r);
    char *cfg = md_read(f.out, "config.json");
    cr_assert_str_eq(cfg, "{\"model_type\": \"llama\", \"rope_theta\": 500000.0, \"tie_word_embeddings\": false, "
                          "\"torch_dtype\": \"bfloat16\", \"vocab_size\": 12}");
    free(cfg);
    md_free(&f);
}

/* ============================================================================================ */
/* the files around the weights                                                                  */
/* ============================================================================================ */
static void md_base_side_files(const md_fx *f)
{
    md_write(f->base, "tokenizer.json", "{\"base\": \"tokenizer\"}");
    md_write(f->base, "tokenizer_config.json", "{\"base\": \"tokenizer_config\"}");
    md_write(f->base, "special_tokens_map.json", "{}");
    md_write(f->base, "tokenizer.model", "base sentencepiece");
    md_write(f->base, "generation_config.json", "{\"do_sample\": true}");
    md_write(f->base, "LICENSE", "the base's license\n");
    md_write(f->base, "README.md", "---\nlicense: llama3.2\nlicense_name: llama3.2\n---\n# The BASE card\n");
    md_write(f->base, "id_rsa", "-----BEGIN OPENSSH PRIVATE KEY-----\n");
    md_write(f->base, "notes.txt", "private notes\n");
    md_write(f->base, "modeling_custom.py", "print('custom code')\n");
}

Test(modeldir, allow_list_permissions_and_model_card)
{
    md_fx f;
    md_make(&f, 0);
    md_base_side_files(&f);
    char p[1400];
    md_path(p, sizeof p, f.base, "tokenizer_config.json");
    cr_assert_eq(chmod(p, 0600), 0);
    md_path(p, sizeof p, f.base, "sub");
    cr_assert_eq(mkdir(p, 0777), 0);
    md_write(p, "chat.jinja", "{{ messages }}");
    md_path(p, sizeof p, f.base, "chat_template.jinja"); /* a link that stays inside: followed */
    cr_assert_eq(symlink("sub/chat.jinja", p), 0);
    th_run_result r = md_run("--json", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    static const char *const copied[] = {"config.json", "tokenizer.json", "tokenizer_config.json",
                                         "special_tokens_map.json", "tokenizer.model", "generation_config.json",
                                         "LICENSE", "chat_template.jinja", "model.safetensors", "README.md"};
    for (size_t i = 0; i < sizeof copied / sizeof *copied; i++)
        cr_expect(md_has(f.out, copied[i]), "%s not in the output", copied[i]);
    static const char *const not_copied[] = {"id_rsa", "notes.txt", "modeling_custom.py", "sub"};
    for (size_t i = 0; i < sizeof not_copied / sizeof *not_copied; i++)
        cr_expect(!md_has(f.out, not_copied[i]), "%s was copied", not_copied[i]);
    cr_assert_eq(th_count_entries(f.out), 10);
    cr_assert(strstr(r.out, "not copied") && strstr(r.out, "id_rsa"), "the report does not list what was left: %s", r.out);
    th_run_free(&r);
    /* permissions: never wider than the source's */
    struct stat st;
    md_path(p, sizeof p, f.out, "tokenizer_config.json");
    cr_assert_eq(stat(p, &st), 0);
    cr_assert_eq(st.st_mode & 0777 & ~0600, 0, "a 0600 file was written %o", st.st_mode & 0777);
    md_path(p, sizeof p, f.out, "chat_template.jinja");
    cr_assert_eq(lstat(p, &st), 0);
    cr_assert(S_ISREG(st.st_mode), "the link was copied as a link");
    /* the model card is ours: not the base's, with the base's license and the adapter's hash */
    char *card = md_read(f.out, "README.md");
    cr_assert(strstr(card, "The BASE card") == NULL, "the base's card was passed off as the merged model's");
    cr_assert(strstr(card, "license: llama3.2") != NULL, "%s", card);
    cr_assert(strstr(card, "meta-llama/Llama-3.2-1B") != NULL, "%s", card);
    cr_assert(strstr(card, "lora-merge") != NULL, "%s", card);
    char cmd[1600];
    snprintf(cmd, sizeof cmd, "sha256sum '%s/adapter_model.safetensors' | cut -c1-64", f.ad);
    th_run_result s = th_sh(cmd);
    s.out[64] = '\0';
    cr_assert(strstr(card, s.out) != NULL, "the card lacks the adapter's sha256 %s: %s", s.out, card);
    th_run_free(&s);
    free(card);
    md_free(&f);
}

/* a link that leads out of the base directory is never followed: the merge is refused, naming it */
Test(modeldir, link_out_of_the_directory_refused)
{
    md_fx f;
    md_make(&f, 0);
    char secret[1400], p[1400];
    md_path(secret, sizeof secret, f.tmp, "secret");
    cr_assert_eq(th_write_file(secret, "TOP SECRET", 10), 0);
    md_path(p, sizeof p, f.base, "tokenizer.json");
    cr_assert_eq(symlink(secret, p), 0);
    th_run_result r = md_run(f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "tokenizer.json") && strstr(r.err, "outside"), "%s", r.err);
    cr_assert(!th_exists(f.out), "the refused merge created %s", f.out);
    th_run_free(&r);
    md_free(&f);
}

/* an expected file that cannot be read fails the merge (it was skipped silently) */
Test(modeldir, unreadable_expected_file_fails)
{
    md_fx f;
    md_make(&f, 0);
    char p[1400];
    md_path(p, sizeof p, f.base, "tokenizer.json");
    int expect = 3; /* I/O: it cannot be read */
    if (geteuid() == 0) { /* root reads anything: a directory in its place cannot be read as a file */
        cr_assert_eq(mkdir(p, 0777), 0);
    } else {
        md_write(f.base, "tokenizer.json", "{}");
        cr_assert_eq(chmod(p, 0), 0);
    }
    th_run_result r = md_run(f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, expect, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "tokenizer.json") != NULL, "%s", r.err);
    cr_assert(!th_exists(f.out));
    th_run_free(&r);
    md_free(&f);
}

/* a base in the Hugging Face cache: every file is a link into ../../blobs, which is followed */
Test(modeldir, huggingface_cache_links_followed)
{
    md_fx f;
    md_make(&f, 0);
    char cache[800], blobs[900], snap[1000], p[1400], q[1400];
    md_path(cache, sizeof cache, f.tmp, "models--meta-llama--Llama-3.2-1B");
    md_path(blobs, sizeof blobs, cache, "blobs");
    md_path(snap, sizeof snap, cache, "snapshots");
    cr_assert_eq(mkdir(cache, 0777), 0);
    cr_assert_eq(mkdir(blobs, 0777), 0);
    cr_assert_eq(mkdir(snap, 0777), 0);
    md_path(p, sizeof p, snap, "0123abc");
    cr_assert_eq(mkdir(p, 0777), 0);
    static const char *const names[] = {"model.safetensors", "config.json"};
    for (int i = 0; i < 2; i++) {
        char src[1400], blob[1400];
        md_path(src, sizeof src, f.base, names[i]);
        snprintf(blob, sizeof blob, "%s/blob%d", blobs, i);
        cr_assert_eq(rename(src, blob), 0);
        md_path(q, sizeof q, p, names[i]);
        snprintf(src, sizeof src, "../../blobs/blob%d", i);
        cr_assert_eq(symlink(src, q), 0);
    }
    th_run_result r = md_run("--json", p, f.ad, f.out, NULL);
    md_ok(&r);
    cr_assert(strstr(r.out, "BaseModelMismatch") == NULL, "the cache's repository name was not recognised: %s", r.out);
    th_run_free(&r);
    cr_assert(md_has(f.out, "config.json"));
    md_free(&f);
}

/* tokenizer files and the chat template saved in the adapter directory win (as a group) */
Test(modeldir, tokenizer_and_template_from_the_adapter)
{
    md_fx f;
    md_make(&f, 0);
    md_base_side_files(&f);
    md_write(f.ad, "tokenizer.json", "{\"adapter\": \"tokenizer with added tokens\"}");
    md_write(f.ad, "tokenizer_config.json", "{\"adapter\": \"tokenizer_config\"}");
    md_write(f.ad, "chat_template.jinja", "{% for m in messages %}<|im_start|>{% endfor %}");
    th_run_result r = md_run("--json", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    cJSON *j = cJSON_Parse(r.out);
    cr_assert_not_null(j);
    const cJSON *file;
    int from_adapter = 0;
    cJSON_ArrayForEach(file, cJSON_GetObjectItemCaseSensitive(j, "files"))
    {
        const char *name = cJSON_GetObjectItemCaseSensitive(file, "name")->valuestring;
        const char *origin = cJSON_GetObjectItemCaseSensitive(file, "origin")->valuestring;
        if (strcmp(name, "tokenizer.json") == 0 || strcmp(name, "chat_template.jinja") == 0) {
            cr_expect_str_eq(origin, "adapter", "%s from %s", name, origin);
            from_adapter++;
        }
    }
    cr_assert_eq(from_adapter, 2);
    cJSON_Delete(j);
    cr_assert(strstr(r.out, "tokenizer files taken from the adapter directory") != NULL, "%s", r.out);
    th_run_free(&r);
    char *t = md_read(f.out, "tokenizer.json"), *c = md_read(f.out, "chat_template.jinja");
    cr_assert(strstr(t, "added tokens") != NULL, "%s", t);
    cr_assert(strstr(c, "im_start") != NULL, "%s", c);
    free(t);
    free(c);
    /* the base's tokenizer.model belongs to the base's tokenizer: not mixed with the adapter's */
    cr_assert(!md_has(f.out, "tokenizer.model"), "the base's tokenizer.model was mixed in");
    cr_assert(md_has(f.out, "generation_config.json"));
    md_free(&f);
}

Test(modeldir, copy_file_option)
{
    md_fx f;
    md_make(&f, 0);
    md_base_side_files(&f);
    th_run_result r = md_run("-q", "--copy-file", "modeling_custom.py", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    th_run_free(&r);
    cr_assert(md_has(f.out, "modeling_custom.py"));
    cr_assert(!md_has(f.out, "id_rsa"));
    /* a name that is not there, or a path */
    char out2[800];
    md_path(out2, sizeof out2, f.tmp, "other");
    r = md_run("--copy-file", "no_such.py", f.base, f.ad, out2, NULL);
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "no_such.py") != NULL, "%s", r.err);
    th_run_free(&r);
    r = md_run("--copy-file", "../secret", f.base, f.ad, out2, NULL);
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    cr_assert(!th_exists(out2));
    /* with a file OUT */
    md_path(out2, sizeof out2, f.tmp, "x.safetensors");
    r = md_run("--copy-file", "LICENSE", f.base, f.ad, out2, NULL);
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    md_free(&f);
}

/* custom code named by config.json's auto_map is not copied silently */
Test(modeldir, remote_code_warning)
{
    md_fx f;
    md_make(&f, 0);
    md_write(f.base, "config.json", "{\"model_type\": \"custom\", \"auto_map\": {\"AutoModel\": \"modeling_custom.Model\"}}");
    md_write(f.base, "modeling_custom.py", "pass\n");
    th_run_result r = md_run(f.base, f.ad, f.out, NULL);
    md_ok(&r);
    cr_assert(strstr(r.err, "warning: [RemoteCodeNotCopied]") != NULL, "%s", r.err);
    th_run_free(&r);
    th_rmrf(f.out);
    r = md_run("--copy-file", "modeling_custom.py", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    cr_assert(strstr(r.err, "RemoteCodeNotCopied") == NULL, "%s", r.err);
    th_run_free(&r);
    md_free(&f);
}

/* ============================================================================================ */
/* OUT: names, an earlier merge, foreign weights                                                 */
/* ============================================================================================ */
Test(modeldir, out_names)
{
    md_fx f;
    md_make(&f, 0);
    char p[800];
    /* a new name without an extension: a directory */
    md_path(p, sizeof p, f.tmp, "newdir");
    th_run_result r = md_run("-q", f.base, f.ad, p, NULL);
    md_ok(&r);
    th_run_free(&r);
    char q[1400];
    md_path(q, sizeof q, p, "model.safetensors");
    cr_assert(th_exists(q), "OUT without an extension did not become a directory");
    /* other weight formats: refused, nothing created */
    static const char *const bad[] = {"out.gguf", "out.bin", "out.pt", "OUT.GGUF"};
    for (int i = 0; i < 4; i++) {
        md_path(p, sizeof p, f.tmp, bad[i]);
        r = md_run(f.base, f.ad, p, NULL);
        cr_assert_eq(r.status, 2, "%s: exit %d: %s", bad[i], r.status, r.err);
        cr_assert(strstr(r.err, "safetensors") != NULL, "%s", r.err);
        cr_assert(!th_exists(p), "%s was created", p);
        th_run_free(&r);
    }
    /* *.safetensors: one file */
    md_path(p, sizeof p, f.tmp, "one.safetensors");
    r = md_run("-q", f.base, f.ad, p, NULL);
    md_ok(&r);
    th_run_free(&r);
    struct stat st;
    cr_assert(stat(p, &st) == 0 && S_ISREG(st.st_mode));
    md_free(&f);
}

/* a second merge into the same directory: the first one's shards, index and tokenizer files
 * that the second does not write are removed (and listed) */
Test(modeldir, stale_files_of_an_earlier_merge_removed)
{
    md_fx f;
    md_make(&f, 0);
    md_base_side_files(&f);
    th_run_result r = md_run("-q", "--max-shard-size", "100", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    th_run_free(&r);
    cr_assert(md_has(f.out, "model-00001-of-00004.safetensors"), "expected 4 shards (one per tensor)");
    cr_assert(md_has(f.out, "model.safetensors.index.json"));
    cr_assert(md_has(f.out, "tokenizer.model"));
    md_write(f.ad, "tokenizer.json", "{\"adapter\": 1}");
    r = md_run("--json", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    cJSON *j = cJSON_Parse(r.out);
    const cJSON *removed = cJSON_GetObjectItemCaseSensitive(j, "removed");
    /* 4 shards, the index, and the base's tokenizer files the adapter's tokenizer replaces as a
     * whole (tokenizer_config.json, special_tokens_map.json, tokenizer.model) */
    cr_assert_eq(cJSON_GetArraySize(removed), 8, "removed: %s", r.out);
    cJSON_Delete(j);
    th_run_free(&r);
    for (int i = 1; i <= 4; i++) {
        char name[64];
        snprintf(name, sizeof name, "model-%05d-of-00004.safetensors", i);
        cr_assert(!md_has(f.out, name), "stale %s left", name);
    }
    cr_assert(!md_has(f.out, "model.safetensors.index.json"));
    cr_assert(!md_has(f.out, "tokenizer.model"), "the earlier tokenizer.model is mixed with the new tokenizer");
    cr_assert(md_has(f.out, "model.safetensors"));
    md_free(&f);
}

/* weights lora-merge did not write: refused before anything is written */
Test(modeldir, foreign_weights_in_out_refused)
{
    md_fx f;
    md_make(&f, 0);
    cr_assert_eq(mkdir(f.out, 0777), 0);
    md_write(f.out, "pytorch_model.bin", "PK\x03\x04 not ours");
    md_write(f.out, "notes.md", "the user's");
    th_run_result r = md_run(f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "pytorch_model.bin") != NULL, "%s", r.err);
    th_run_free(&r);
    cr_assert_eq(th_count_entries(f.out), 2, "the refused merge wrote into %s", f.out);
    md_free(&f);
}

/* --dry-run creates nothing and announces exactly the files and sizes a real run writes */
Test(modeldir, dry_run_previews_the_files)
{
    md_fx f;
    md_make(&f, 0);
    md_base_side_files(&f);
    th_run_result d = md_run("--json", "--dry-run", "--max-shard-size", "300", f.base, f.ad, f.out, NULL);
    md_ok(&d);
    cr_assert(!th_exists(f.out), "--dry-run created %s", f.out);
    th_run_result r = md_run("--json", "--max-shard-size", "300", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    cJSON *jd = cJSON_Parse(d.out), *jr = cJSON_Parse(r.out);
    const cJSON *fd = cJSON_GetObjectItemCaseSensitive(jd, "files"), *fr = cJSON_GetObjectItemCaseSensitive(jr, "files");
    cr_assert_eq(cJSON_GetArraySize(fd), cJSON_GetArraySize(fr));
    cr_assert_geq(cJSON_GetArraySize(fd), 8, "%s", d.out);
    for (int i = 0; i < cJSON_GetArraySize(fd); i++) {
        const cJSON *a = cJSON_GetArrayItem(fd, i), *b = cJSON_GetArrayItem(fr, i);
        const char *name = cJSON_GetObjectItemCaseSensitive(a, "name")->valuestring;
        cr_assert_str_eq(name, cJSON_GetObjectItemCaseSensitive(b, "name")->valuestring);
        double bytes = cJSON_GetObjectItemCaseSensitive(a, "bytes")->valuedouble;
        cr_assert_eq(bytes, cJSON_GetObjectItemCaseSensitive(b, "bytes")->valuedouble, "%s", name);
        cr_assert(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(a, "sha256")));
        /* the real run's numbers are the files' */
        char p[1400], cmd[1600];
        md_path(p, sizeof p, f.out, name);
        struct stat st;
        cr_assert_eq(stat(p, &st), 0, "%s not written", p);
        cr_assert_eq((double)st.st_size, bytes, "%s is %lld bytes, announced %.0f", name, (long long)st.st_size, bytes);
        snprintf(cmd, sizeof cmd, "sha256sum '%s' | cut -c1-64", p);
        th_run_result s = th_sh(cmd);
        s.out[64] = '\0';
        cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(b, "sha256")->valuestring, s.out, "%s", name);
        th_run_free(&s);
    }
    cJSON_Delete(jd);
    cJSON_Delete(jr);
    th_run_free(&d);
    th_run_free(&r);
    md_free(&f);
}

/* a sharded base (two shards and an index), merged into a directory */
Test(modeldir, sharded_base)
{
    md_fx f;
    md_make(&f, 0);
    char p[1400];
    md_path(p, sizeof p, f.base, "model.safetensors");
    cr_assert_eq(unlink(p), 0);
    th_out_tensor s1[] = {{"model.embed_tokens.weight", "F32", 2, {MD_V, MD_D}, f.embed},
                          {"model.layers.0.self_attn.q_proj.weight", "F32", 2, {MD_D, MD_D}, f.q}};
    th_out_tensor s2[] = {{"model.norm.weight", "F32", 1, {MD_D}, f.norm}, {"lm_head.weight", "F32", 2, {MD_V, MD_D}, f.head}};
    md_path(p, sizeof p, f.base, "model-00001-of-00002.safetensors");
    cr_assert_eq(th_st_write(p, s1, 2), 0);
    md_path(p, sizeof p, f.base, "model-00002-of-00002.safetensors");
    cr_assert_eq(th_st_write(p, s2, 2), 0);
    md_write(f.base, "model.safetensors.index.json",
             "{\"metadata\": {\"total_size\": 1056}, \"weight_map\": {"
             "\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\", "
             "\"model.layers.0.self_attn.q_proj.weight\": \"model-00001-of-00002.safetensors\", "
             "\"model.norm.weight\": \"model-00002-of-00002.safetensors\", "
             "\"lm_head.weight\": \"model-00002-of-00002.safetensors\"}}");
    th_run_result r = md_run("-q", f.base, f.ad, f.out, NULL);
    md_ok(&r);
    th_run_free(&r);
    /* q_proj: W + 2 * B @ A */
    double want[MD_D * MD_D];
    for (int o = 0; o < MD_D; o++)
        for (int i = 0; i < MD_D; i++) {
            double s = 0;
            for (int k = 0; k < MD_R; k++)
                s += f.B[o * MD_R + k] * f.A[k * MD_D + i];
            want[o * MD_D + i] = th_round_to(f.q[o * MD_D + i] + 2.0 * s, "F32");
        }
    double *got = md_tensor(f.out, "model.layers.0.self_attn.q_proj.weight", NULL);
    cr_assert_not_null(got);
    md_expect_values(got, want, MD_D * MD_D, "q_proj");
    free(got);
    double *h = md_head(f.out);
    md_expect_values(h, f.head, MD_V * MD_D, "head");
    free(h);
    md_free(&f);
}

/* ============================================================================================ */
/* provenance                                                                                    */
/* ============================================================================================ */
Test(modeldir, provenance_metadata)
{
    md_fx f;
    md_make(&f, 0);
    char out[800], cmd[1600];
    md_path(out, sizeof out, f.tmp, "one.safetensors");
    th_run_result r = md_run("-q", "--scale", "-0.75", f.base, f.ad, out, NULL);
    md_ok(&r);
    th_run_free(&r);
    th_st st;
    cr_assert_eq(th_st_read(out, &st), 0);
    cr_assert_not_null(st.meta_json, "no __metadata__");
    cJSON *m = cJSON_Parse(st.meta_json);
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(m, "format");
    cr_assert(cJSON_IsString(fmt) && strcmp(fmt->valuestring, "pt") == 0, "format: pt missing: %s", st.meta_json);
    const cJSON *ver = cJSON_GetObjectItemCaseSensitive(m, "lora_merge.version");
    cr_assert(cJSON_IsString(ver) && strcmp(ver->valuestring, "0.1.0") == 0, "%s", st.meta_json);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(m, "lora_merge.dtype");
    cr_assert(cJSON_IsString(dt) && strcmp(dt->valuestring, "F32") == 0, "%s", st.meta_json);
    const cJSON *ads = cJSON_GetObjectItemCaseSensitive(m, "lora_merge.adapters");
    cr_assert(cJSON_IsString(ads), "%s", st.meta_json);
    cJSON *a = cJSON_Parse(ads->valuestring);
    cr_assert_eq(cJSON_GetArraySize(a), 1);
    const cJSON *a0 = cJSON_GetArrayItem(a, 0);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(a0, "name")->valuestring, "adapter");
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(a0, "weight")->valuedouble, -0.75);
    snprintf(cmd, sizeof cmd, "sha256sum '%s/adapter_model.safetensors' | cut -c1-64", f.ad);
    th_run_result s = th_sh(cmd);
    s.out[64] = '\0';
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(a0, "sha256")->valuestring, s.out);
    th_run_free(&s);
    cJSON_Delete(a);
    cJSON_Delete(m);
    th_st_free(&st);
    md_free(&f);
}

/* ============================================================================================ */
/* saved heads and embeddings: every key form, resized vocabularies                             */
/* ============================================================================================ */
/* the adapter's weights with the trained head saved under `head_key` */
static void md_adapter_with_head_key(const md_fx *f, const char *head_key)
{
    th_out_tensor t[3] = {
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32", 2, {MD_R, MD_D}, f->A},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F32", 2, {MD_D, MD_R}, f->B},
        {head_key, "F32", 2, {MD_V, MD_D}, f->trained_head}};
    char p[1400];
    md_path(p, sizeof p, f->ad, "adapter_model.safetensors");
    cr_assert_eq(th_st_write(p, t, 3), 0);
}

/* PEFT has saved modules_to_save as X.weight, X.modules_to_save.weight and
 * X.modules_to_save.default.weight: each lands on the head (it was skipped with a note) */
Test(modeldir, saved_head_every_key_form)
{
    static const char *const keys[] = {"base_model.model.lm_head.weight", "base_model.model.lm_head.modules_to_save.weight",
                                       "base_model.model.lm_head.modules_to_save.default.weight"};
    for (int k = 0; k < 3; k++) {
        md_fx f;
        md_make(&f, MD_TIED | MD_HEAD_MTS);
        md_adapter_with_head_key(&f, keys[k]);
        th_run_result r = md_run("-q", f.base, f.ad, f.out, NULL);
        cr_assert_eq(r.status, 0, "%s: exit %d: %s", keys[k], r.status, r.err);
        th_run_free(&r);
        double *h = md_head(f.out);
        md_expect_values(h, f.trained_head, MD_V * MD_D, keys[k]);
        free(h);
        md_free(&f);
    }
}

/* an adapter tensor that lands nowhere is an error, never a note */
Test(modeldir, unused_adapter_tensor_is_an_error)
{
    md_fx f;
    md_make(&f, 0);
    th_out_tensor t[3] = {
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32", 2, {MD_R, MD_D}, f.A},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F32", 2, {MD_D, MD_R}, f.B},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.extra", "F32", 2, {MD_R, MD_D}, f.A}};
    char p[1400];
    md_path(p, sizeof p, f.ad, "adapter_model.safetensors");
    cr_assert_eq(th_st_write(p, t, 3), 0);
    th_run_result r = md_run(f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "UnusedTensor") && strstr(r.err, "lora_A.default.extra"), "%s", r.err);
    cr_assert(!th_exists(f.out));
    th_run_free(&r);
    md_free(&f);
}

/* tokens added while training: embedding and head saved with more rows; the output takes them,
 * config.json's vocab_size follows, the tokenizer comes from the adapter */
static void md_resized_adapter(md_fx *f, int save_head, double *emb14, double *head14)
{
    uint64_t seed = 99;
    for (int i = 0; i < 14 * MD_D; i++) {
        emb14[i] = th_round_to(th_rand_uniform(&seed), "F32");
        head14[i] = th_round_to(th_rand_uniform(&seed), "F32");
    }
    th_out_tensor t[4] = {
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32", 2, {MD_R, MD_D}, f->A},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F32", 2, {MD_D, MD_R}, f->B},
        {"base_model.model.model.embed_tokens.weight", "F32", 2, {14, MD_D}, emb14},
        {"base_model.model.lm_head.weight", "F32", 2, {14, MD_D}, head14}};
    char p[1400];
    md_path(p, sizeof p, f->ad, "adapter_model.safetensors");
    cr_assert_eq(th_st_write(p, t, save_head ? 4 : 3), 0);
    md_adapter_config(f, save_head ? ", \"modules_to_save\": [\"embed_tokens\", \"lm_head\"]"
                                   : ", \"modules_to_save\": [\"embed_tokens\"]");
    md_write(f->ad, "tokenizer.json", "{\"added_tokens\": [\"<|im_start|>\", \"<|im_end|>\"]}");
}

static int64_t md_config_int(const char *dir, const char *key)
{
    char *cfg = md_read(dir, "config.json");
    cJSON *j = cJSON_Parse(cfg);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    int64_t r = cJSON_IsNumber(v) ? (int64_t)v->valuedouble : -1;
    cJSON_Delete(j);
    free(cfg);
    return r;
}

Test(modeldir, added_tokens_untied)
{
    md_fx f;
    md_make(&f, 0);
    double emb14[14 * MD_D], head14[14 * MD_D];
    md_resized_adapter(&f, 1, emb14, head14);
    th_run_result r = md_run("--json", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.out, "resized from 12 to 14 rows") != NULL, "%s", r.out);
    th_run_free(&r);
    uint64_t n = 0;
    double *e = md_tensor(f.out, "model.embed_tokens.weight", &n);
    cr_assert_eq(n, 14 * MD_D);
    md_expect_values(e, emb14, 14 * MD_D, "embedding");
    free(e);
    double *h = md_head(f.out);
    md_expect_values(h, head14, 14 * MD_D, "head");
    free(h);
    cr_assert_eq(md_config_int(f.out, "vocab_size"), 14);
    char *tok = md_read(f.out, "tokenizer.json");
    cr_assert(strstr(tok, "im_start") != NULL);
    free(tok);
    md_free(&f);
}

Test(modeldir, added_tokens_tied)
{
    md_fx f;
    md_make(&f, MD_TIED);
    double emb14[14 * MD_D], head14[14 * MD_D];
    md_resized_adapter(&f, 0, emb14, head14);
    th_run_result r = md_run("-q", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    double *h = md_head(f.out); /* tied: the resized embedding */
    md_expect_values(h, emb14, 14 * MD_D, "head (the resized embedding)");
    free(h);
    cr_assert_eq(md_config_int(f.out, "vocab_size"), 14);
    md_free(&f);
}

/* a resized embedding with the untied head left at the old size: two vocabularies, refused */
Test(modeldir, added_tokens_without_the_head_refused)
{
    md_fx f;
    md_make(&f, 0);
    double emb14[14 * MD_D], head14[14 * MD_D];
    md_resized_adapter(&f, 0, emb14, head14);
    th_run_result r = md_run(f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
    cr_assert(strstr(r.err, "ResizedVocabulary") && strstr(r.err, "lm_head.weight"), "%s", r.err);
    cr_assert(!th_exists(f.out));
    th_run_free(&r);
    md_free(&f);
}

/* ============================================================================================ */
/* a PyTorch checkpoint as the base                                                              */
/* ============================================================================================ */
/* torch.save()'s zip layout (archive/data.pkl with persistent storage ids, archive/data/<key>,
 * byteorder, version), written by Python's own pickle module with stand-ins for the torch
 * globals: an independent writer of the format the restricted reader reads */
static const char MD_TORCH_SAVE_PY[] =
    "import sys, io, json, pickle, zipfile, types, collections\n"
    "spec = json.load(open(sys.argv[1]))\n"
    "torch = types.ModuleType('torch'); sys.modules['torch'] = torch\n"
    "utils = types.ModuleType('torch._utils'); sys.modules['torch._utils'] = utils; torch._utils = utils\n"
    "def _rebuild_tensor_v2(*a): pass\n"
    "_rebuild_tensor_v2.__module__ = 'torch._utils'; utils._rebuild_tensor_v2 = _rebuild_tensor_v2\n"
    "kinds = {}\n"
    "for nm in ('FloatStorage', 'BFloat16Storage'):\n"
    "    c = type(nm, (), {}); c.__module__ = 'torch'; setattr(torch, nm, c); kinds[nm] = c\n"
    "class Storage:\n"
    "    def __init__(s, key, cls, numel): s.key, s.cls, s.numel = key, cls, numel\n"
    "class Tensor:\n"
    "    def __init__(s, st, shape): s.st, s.shape = st, shape\n"
    "    def __reduce_ex__(s, proto):\n"
    "        stride, acc = [], 1\n"
    "        for d in reversed(s.shape): stride.insert(0, acc); acc *= d\n"
    "        return (_rebuild_tensor_v2, (s.st, 0, tuple(s.shape), tuple(stride), False, collections.OrderedDict()))\n"
    "class P(pickle.Pickler):\n"
    "    def persistent_id(s, o):\n"
    "        return ('storage', o.cls, o.key, 'cpu', o.numel) if isinstance(o, Storage) else None\n"
    "sd, blobs = collections.OrderedDict(), {}\n"
    "for i, t in enumerate(spec['tensors']):\n"
    "    n = 1\n"
    "    for d in t['shape']: n *= d\n"
    "    sd[t['name']] = Tensor(Storage(str(i), kinds[t['storage']], n), t['shape'])\n"
    "    blobs[str(i)] = open(t['file'], 'rb').read()\n"
    "buf = io.BytesIO(); P(buf, protocol=2).dump(sd)\n"
    "with zipfile.ZipFile(spec['out'], 'w', zipfile.ZIP_STORED) as z:\n"
    "    z.writestr('archive/data.pkl', buf.getvalue())\n"
    "    z.writestr('archive/byteorder', 'little')\n"
    "    for k, v in blobs.items(): z.writestr('archive/data/' + k, v)\n"
    "    z.writestr('archive/version', '3\\n')\n";

static void md_raw_f32(const char *path, const double *v, size_t n)
{
    float *f = malloc(n * sizeof *f);
    for (size_t i = 0; i < n; i++)
        f[i] = (float)v[i]; /* the values are f32 already: exact */
    cr_assert_eq(th_write_file(path, f, n * sizeof *f), 0);
    free(f);
}

Test(modeldir, pytorch_bin_base)
{
    th_run_result probe = th_sh("python3 -c 'import pickle, zipfile' 2>&1");
    int have_python = probe.status == 0;
    th_run_free(&probe);
    if (!have_python)
        cr_skip_test("needs python3 to write a torch.save() checkpoint (skipped: python3 absent)");
    md_fx f;
    md_make(&f, 0);
    char p[1400], spec[4000], raw[4][1400];
    const char *names[4] = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
                            "lm_head.weight"};
    const double *vals[4] = {f.embed, f.q, f.norm, f.head};
    const size_t counts[4] = {MD_V * MD_D, MD_D * MD_D, MD_D, MD_V * MD_D};
    const char *shapes[4] = {"[12, 8]", "[8, 8]", "[8]", "[12, 8]"};
    int used = snprintf(spec, sizeof spec, "{\"tensors\": [");
    for (int i = 0; i < 4; i++) {
        snprintf(raw[i], sizeof raw[i], "%s/raw%d", f.tmp, i);
        md_raw_f32(raw[i], vals[i], counts[i]);
        used += snprintf(spec + used, sizeof spec - used, "%s{\"name\": \"%s\", \"storage\": \"FloatStorage\", "
                         "\"shape\": %s, \"file\": \"%s\"}", i ? ", " : "", names[i], shapes[i], raw[i]);
    }
    md_path(p, sizeof p, f.base, "model.safetensors");
    cr_assert_eq(unlink(p), 0);
    snprintf(spec + used, sizeof spec - used, "], \"out\": \"%s/pytorch_model.bin\"}", f.base);
    char specp[1400], pyp[1400], cmd[3000];
    md_path(specp, sizeof specp, f.tmp, "spec.json");
    md_path(pyp, sizeof pyp, f.tmp, "torch_save.py");
    cr_assert_eq(th_write_file(specp, spec, strlen(spec)), 0);
    cr_assert_eq(th_write_file(pyp, MD_TORCH_SAVE_PY, strlen(MD_TORCH_SAVE_PY)), 0);
    snprintf(cmd, sizeof cmd, "python3 '%s' '%s' 2>&1", pyp, specp);
    th_run_result py = th_sh(cmd);
    cr_assert_eq(py.status, 0, "the checkpoint writer failed: %s", py.out);
    th_run_free(&py);
    /* the directory holding pytorch_model.bin is the base: a safetensors model directory comes out */
    th_run_result r = md_run("--json", f.base, f.ad, f.out, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    double want[MD_D * MD_D];
    for (int o = 0; o < MD_D; o++)
        for (int i = 0; i < MD_D; i++) {
            double s = 0;
            for (int k = 0; k < MD_R; k++)
                s += f.B[o * MD_R + k] * f.A[k * MD_D + i];
            want[o * MD_D + i] = th_round_to(f.q[o * MD_D + i] + 2.0 * s, "F32");
        }
    double *got = md_tensor(f.out, "model.layers.0.self_attn.q_proj.weight", NULL);
    cr_assert_not_null(got, "q_proj missing from the output");
    md_expect_values(got, want, MD_D * MD_D, "q_proj");
    free(got);
    for (int i = 0; i < 4; i += 2) { /* untouched tensors come through exactly */
        got = md_tensor(f.out, names[i], NULL);
        cr_assert_not_null(got, "%s missing", names[i]);
        md_expect_values(got, vals[i], counts[i], names[i]);
        free(got);
    }
    /* the file directly, too */
    char bin[1400], out2[800];
    md_path(bin, sizeof bin, f.base, "pytorch_model.bin");
    md_path(out2, sizeof out2, f.tmp, "direct.safetensors");
    r = md_run("-q", bin, f.ad, out2, NULL);
    cr_assert_eq(r.status, 0, "exit %d: %s", r.status, r.err);
    th_run_free(&r);
    md_free(&f);
}
