/* gen_model.c : writes a synthetic Llama-shaped base model and a LoRA adapter for it, so the
 * demo, the tests and the benchmark need no download.  Values are pseudo-random (a counter-based
 * generator: the same seed gives the same bytes for any thread count), sized like trained
 * weights.  Uses the library's writer.
 *
 *   gen_model --out DIR [--hidden H] [--inter I] [--layers L] [--vocab V] [--heads N]
 *             [--kv-heads K] [--rank R] [--alpha A] [--dtype bf16|f16|f32]
 *             [--adapter-dtype f32|bf16|f16] [--targets qv|all] [--seed S] [--no-adapter]
 *   writes DIR/base/model.safetensors, DIR/base/config.json,
 *          DIR/adapter/adapter_config.json, DIR/adapter/adapter_model.safetensors */
#include "lm_kernels.h"
#include "st_writer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    char name[160];
    lm_dtype dtype;
    size_t n_dims;
    uint64_t shape[2];
    float amp;  /* values uniform in [-amp, amp] (plus offset for norms) */
    float offset;
} gen_tensor;

static uint64_t splitmix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* element i of tensor t: uniform in [-1, 1) */
static inline float uval(uint64_t seed, uint64_t t, uint64_t i)
{
    uint64_t r = splitmix(seed ^ (t * 0xD1B54A32D192ED03ull) ^ splitmix(i));
    return (float)((double)(r >> 40) * (1.0 / (double)(1ull << 23)) - 1.0);
}

static int write_tensors(const char *path, gen_tensor *g, size_t n, uint64_t seed, const lm_kernels *k)
{
    lm_out_tensor *o = calloc(n, sizeof *o);
    const char *mk[] = {"format"}, *mv[] = {"pt"};
    lm_err err;
    lm_err_clear(&err);
    for (size_t i = 0; i < n; i++) {
        o[i].name = g[i].name;
        o[i].dtype = g[i].dtype;
        o[i].n_dims = g[i].n_dims;
        o[i].shape = g[i].shape;
    }
    lm_st_writer *w = lm_st_writer_open(path, o, n, NULL, mk, mv, 1, &err);
    free(o);
    if (w == NULL) {
        char line[1024];
        lm_err_format(&err, line, sizeof line);
        fprintf(stderr, "gen_model: %s\n", line);
        return -1;
    }
    const size_t CH = 1 << 20;
    int failed = 0;
    for (size_t t = 0; t < n && !failed; t++) {
        uint64_t ne = g[t].shape[0] * (g[t].n_dims > 1 ? g[t].shape[1] : 1);
        size_t esz = lm_dtype_bits(g[t].dtype) / 8;
        uint64_t n_chunks = (ne + CH - 1) / CH;
#pragma omp parallel for schedule(dynamic, 1)
        for (uint64_t c = 0; c < n_chunks; c++) {
            uint64_t first = c * CH, cnt = first + CH <= ne ? CH : ne - first;
            float *f = malloc(cnt * sizeof *f);
            void *out = malloc(cnt * esz);
            if (f == NULL || out == NULL) {
                failed = 1;
            } else {
                for (uint64_t i = 0; i < cnt; i++)
                    f[i] = g[t].offset + g[t].amp * uval(seed, t, first + i);
                if (g[t].dtype == LM_DT_BF16)
                    k->f32_to_bf16(f, out, cnt);
                else if (g[t].dtype == LM_DT_F16)
                    k->f32_to_f16(f, out, cnt);
                else
                    memcpy(out, f, cnt * 4);
                lm_err e2;
                lm_err_clear(&e2);
                if (lm_st_writer_pwrite(w, out, cnt * esz, lm_st_writer_tensor_offset(w, t) + first * esz, &e2) != LM_OK)
                    failed = 1;
            }
            free(f);
            free(out);
        }
    }
    if (failed) {
        fprintf(stderr, "gen_model: cannot write %s\n", path);
        lm_st_writer_abort(w);
        return -1;
    }
    if (lm_st_writer_commit(w, 0, &err) != LM_OK) {
        fprintf(stderr, "gen_model: cannot finish %s\n", path);
        return -1;
    }
    return 0;
}

static lm_dtype parse_dt(const char *s)
{
    if (strcmp(s, "bf16") == 0)
        return LM_DT_BF16;
    if (strcmp(s, "f16") == 0)
        return LM_DT_F16;
    if (strcmp(s, "f32") == 0)
        return LM_DT_F32;
    fprintf(stderr, "gen_model: dtype must be bf16, f16 or f32 (not %s)\n", s);
    exit(2);
}

int main(int argc, char **argv)
{
    const char *out = NULL, *targets = "all";
    long hidden = 256, inter = 688, layers = 4, vocab = 1024, heads = 8, kv = 4, rank = 8, no_adapter = 0;
    double alpha = 16;
    uint64_t seed = 1;
    lm_dtype dt = LM_DT_BF16, adt = LM_DT_F32;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(flag) (strcmp(a, flag) == 0 && v != NULL && ++i)
        if (ARG("--out")) out = v;
        else if (ARG("--hidden")) hidden = atol(v);
        else if (ARG("--inter")) inter = atol(v);
        else if (ARG("--layers")) layers = atol(v);
        else if (ARG("--vocab")) vocab = atol(v);
        else if (ARG("--heads")) heads = atol(v);
        else if (ARG("--kv-heads")) kv = atol(v);
        else if (ARG("--rank")) rank = atol(v);
        else if (ARG("--alpha")) alpha = atof(v);
        else if (ARG("--dtype")) dt = parse_dt(v);
        else if (ARG("--adapter-dtype")) adt = parse_dt(v);
        else if (ARG("--targets")) targets = v;
        else if (ARG("--seed")) seed = strtoull(v, NULL, 10);
        else if (strcmp(a, "--no-adapter") == 0) no_adapter = 1;
        else {
            fprintf(stderr, "usage: gen_model --out DIR [--hidden H] [--inter I] [--layers L] [--vocab V] [--heads N] "
                            "[--kv-heads K] [--rank R] [--alpha A] [--dtype bf16|f16|f32] [--adapter-dtype f32|bf16|f16] "
                            "[--targets qv|all] [--seed S] [--no-adapter]\n");
            return 2;
        }
#undef ARG
    }
    if (out == NULL || hidden <= 0 || heads <= 0 || hidden % heads != 0 || kv <= 0 || layers <= 0 || vocab <= 0 ||
        inter <= 0 || rank <= 0) {
        fprintf(stderr, "gen_model: --out DIR is required and sizes must be positive (hidden divisible by heads)\n");
        return 2;
    }
    lm_kernels k;
    lm_kernels_select(&k, NULL);
    long hd = hidden / heads, kvd = kv * hd;
    char path[4096];
    mkdir(out, 0777);
    snprintf(path, sizeof path, "%s/base", out);
    mkdir(path, 0777);
    snprintf(path, sizeof path, "%s/adapter", out);
    mkdir(path, 0777);

    size_t nb = 3 + 9 * (size_t)layers, n = 0;
    gen_tensor *g = calloc(nb, sizeof *g);
    float wamp = (float)(1.7 / sqrt((double)hidden));
#define T(nm, d0, d1, nd, amp_, off_)                                                              \
    do {                                                                                           \
        snprintf(g[n].name, sizeof g[n].name, "%s", nm);                                           \
        g[n].dtype = dt;                                                                           \
        g[n].n_dims = nd;                                                                          \
        g[n].shape[0] = (uint64_t)(d0);                                                            \
        g[n].shape[1] = (uint64_t)(d1);                                                            \
        g[n].amp = amp_;                                                                           \
        g[n].offset = off_;                                                                        \
        n++;                                                                                       \
    } while (0)
    char nm[160];
    T("model.embed_tokens.weight", vocab, hidden, 2, 0.05f, 0.0f);
    static const char *const proj[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
    for (long l = 0; l < layers; l++) {
        snprintf(nm, sizeof nm, "model.layers.%ld.input_layernorm.weight", l);
        T(nm, hidden, 1, 1, 0.1f, 1.0f);
        for (int p = 0; p < 7; p++) {
            long o = p == 1 || p == 2 ? kvd : p >= 4 && p <= 5 ? inter : hidden;
            long in = p == 6 ? inter : hidden;
            snprintf(nm, sizeof nm, "model.layers.%ld.%s.weight", l, proj[p]);
            T(nm, o, in, 2, wamp, 0.0f);
        }
        snprintf(nm, sizeof nm, "model.layers.%ld.post_attention_layernorm.weight", l);
        T(nm, hidden, 1, 1, 0.1f, 1.0f);
    }
    T("model.norm.weight", hidden, 1, 1, 0.1f, 1.0f);
    T("lm_head.weight", vocab, hidden, 2, 0.05f, 0.0f);
    snprintf(path, sizeof path, "%s/base/model.safetensors", out);
    if (write_tensors(path, g, n, seed, &k) != 0)
        return 1;
    snprintf(path, sizeof path, "%s/base/config.json", out);
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": %ld, "
                   "\"intermediate_size\": %ld, \"num_hidden_layers\": %ld, \"num_attention_heads\": %ld, "
                   "\"num_key_value_heads\": %ld, \"vocab_size\": %ld, \"tie_word_embeddings\": false, "
                   "\"torch_dtype\": \"%s\"}\n",
                hidden, inter, layers, heads, kv, vocab, dt == LM_DT_BF16 ? "bfloat16" : dt == LM_DT_F16 ? "float16" : "float32");
        fclose(f);
    }
    if (no_adapter)
        return 0;
    /* the adapter */
    int all = strcmp(targets, "all") == 0;
    size_t na = 0, cap = (size_t)layers * 7 * 2;
    gen_tensor *ga = calloc(cap, sizeof *ga);
    for (long l = 0; l < layers; l++) {
        for (int p = 0; p < 7; p++) {
            if (!all && p != 0 && p != 2)
                continue;
            long o = p == 1 || p == 2 ? kvd : p >= 4 && p <= 5 ? inter : hidden;
            long in = p == 6 ? inter : hidden;
            snprintf(ga[na].name, sizeof ga[na].name, "base_model.model.model.layers.%ld.%s.lora_A.weight", l, proj[p]);
            ga[na].dtype = adt;
            ga[na].n_dims = 2;
            ga[na].shape[0] = (uint64_t)rank;
            ga[na].shape[1] = (uint64_t)in;
            ga[na].amp = (float)(1.0 / sqrt((double)in));
            na++;
            snprintf(ga[na].name, sizeof ga[na].name, "base_model.model.model.layers.%ld.%s.lora_B.weight", l, proj[p]);
            ga[na].dtype = adt;
            ga[na].n_dims = 2;
            ga[na].shape[0] = (uint64_t)o;
            ga[na].shape[1] = (uint64_t)rank;
            ga[na].amp = 0.01f;
            na++;
        }
    }
    snprintf(path, sizeof path, "%s/adapter/adapter_model.safetensors", out);
    if (write_tensors(path, ga, na, seed + 1000, &k) != 0)
        return 1;
    snprintf(path, sizeof path, "%s/adapter/adapter_config.json", out);
    f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "gen_model: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    fprintf(f, "{\n  \"peft_type\": \"LORA\",\n  \"task_type\": \"CAUSAL_LM\",\n  \"r\": %ld,\n  \"lora_alpha\": %g,\n"
               "  \"lora_dropout\": 0.0,\n  \"bias\": \"none\",\n  \"use_rslora\": false,\n  \"use_dora\": false,\n"
               "  \"fan_in_fan_out\": false,\n  \"target_modules\": [%s]\n}\n",
            rank, alpha,
            all ? "\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\""
                : "\"q_proj\", \"v_proj\"");
    fclose(f);
    free(g);
    free(ga);
    return 0;
}
