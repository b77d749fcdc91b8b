/* SPDX-License-Identifier: MIT */
/* gen_model.c : writes a synthetic Llama-shaped base model and a LoRA adapter for it, so the
 * demo, the tests and the benchmark need no download.  Values are pseudo-random (a counter-based
 * generator: the same seed gives the same bytes for any thread count), sized like trained
 * weights.  Uses the library's writer.
 *
 *   gen_model --out DIR [--hidden H] [--inter I] [--layers L] [--vocab V] [--heads N]
 *             [--kv-heads K] [--rank R] [--alpha A] [--dtype bf16|f16|f32]
 *             [--adapter-dtype f32|bf16|f16] [--targets qv|all] [--seed S] [--no-adapter] [--experts E]
 *             [--fused-experts]
 *   --experts E: a Qwen3-MoE-shaped model instead (each layer's MLP is a router mlp.gate [E, H] and
 *   E experts mlp.experts.<e>.gate_proj/up_proj [I, H], down_proj [H, I], stored per expert as on
 *   the Hub); the adapter (--targets all) then adapts the attention projections and, through
 *   target_parameters, the fused expert parameters mlp.experts.gate_up_proj and down_proj
 *   (lora_A [E*r, in], lora_B [out, r*E], transformers-v5 layout [E, out, in]).  --fused-experts:
 *   the base stores them fused as transformers v5 saves them, mlp.experts.gate_up_proj [E, 2I, H]
 *   and down_proj [E, H, I].
 *   --quant fp8: the linear projections as a block-FP8 checkpoint (DeepSeek-V3 / Qwen3-FP8 layout):
 *   W F8_E4M3 (random codes: every finite code appears) and W_scale_inv F32 [ceil(out/B),
 *   ceil(in/B)] (B = --block, default 128); with --experts E --fused-experts also the expert stacks, as
 *   transformers' FP8Experts holds them: P F8_E4M3 [E, out, in], P_scale_inv F32 [E, ceil(out/B),
 *   ceil(in/B)]; config.json with quantization_config
 *   {"quant_method": "fp8", "weight_block_size": [B, B]}; embeddings, norms and lm_head stay float.
 *   --quant ct-fp8[-channel|-group|-block]: a compressed-tensors float-quantized checkpoint
 *   (llm-compressor's FP8 / FP8_DYNAMIC / group / FP8_BLOCK schemes): W F8_E4M3 and W_scale per
 *   tensor (F32 [1], with an input_scale F32 [1] as the static FP8 scheme saves), per channel
 *   (BF16 [out, 1]), per group of B columns (BF16 [out, in/B]) or per B x B block (F32), and the
 *   quantization_config compressed-tensors writes (config_groups, ignore ["lm_head"]).  --quant
 *   modelopt-fp8: ModelOpt's FP8 export: W F8_E4M3, W_scale F32 [] and input_scale F32 [] (scalars),
 *   hf_quant_config.json (quant_algo FP8) and no quantization_config in config.json.
 *   --quant nvfp4: compressed-tensors nvfp4-pack-quantized: W_packed U8 [out, in/2] (random bytes:
 *   every E2M1 code), W_scale F8_E4M3 [out, in/16], W_global_scale F32 [1].  --quant
 *   modelopt-nvfp4: ModelOpt's NVFP4 export: W U8 [out, in/2], W_scale F8_E4M3 [out, in/16],
 *   W_scale_2 F32 [] (= 1 / the global scale), input_scale F32 [], and hf_quant_config.json; with
 *   --experts E --fused-experts also the expert stacks as gpt-oss's NVFP4 exports name them, P U8
 *   [E, out, in/2], P_weight_scale [E, out, in/16], P_weight_scale_2 per expert [E] (gate_up_proj)
 *   or one [] (down_proj).
 *   --quant bnb-nf4|bnb-fp4 [--nested]: the projections as transformers saves a bitsandbytes 4-bit
 *   model: W U8 [(out*in+1)/2, 1] (random bytes: every code in both nibbles), W.absmax F32 per 64
 *   elements (--nested: U8 codes, W.nested_absmax F32 per 256 of them, W.nested_quant_map F32
 *   [256], the offset in the JSON), W.quant_map F32 [16] (bitsandbytes' table),
 *   W.quant_state.bitsandbytes__nf4/fp4 U8 (the packed JSON: quant_type, blocksize, dtype, shape
 *   ...).  --quant bnb-int8: W I8 [out, in] (random), <module>.SCB F32 [out], <module>.weight_format
 *   U8 [] = 0.  config.json: quantization_config as BitsAndBytesConfig.to_dict() writes it.
 *   --quant-skip P (P a projection, e.g. o_proj): P stays float and is listed in
 *   llm_int8_skip_modules.
 *   --quant mxfp4 (with --experts E): a gpt-oss-shaped model: mlp.router.weight/bias and the experts
 *   as MXFP4, mlp.experts.gate_up_proj_blocks U8 [E, 2I, H/32, 16] (random bytes: every code)
 *   with _scales U8 [E, 2I, H/32] (E8M0, five exponents around the weights' size) and _bias
 *   [E, 2I], down_proj_blocks [E, H, I/32, 16], _scales, _bias [E, H]; quantization_config
 *   {"quant_method": "mxfp4", "modules_to_not_convert": [...]} as gpt-oss ships it.
 *   writes DIR/base/model.safetensors, DIR/base/config.json,
 *          DIR/adapter/adapter_config.json, DIR/adapter/adapter_model.safetensors */
#include "gen_common.h"
#include "quant_bnb.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static lm_dtype parse_dt(const char *s)
{
    lm_dtype dt;
    if (gen_parse_dt("gen_model", s, &dt) != 0)
        exit(2);
    return dt;
}

/* bitsandbytes' 8-bit dynamic map (functional.py create_dynamic_map(), signed, 7 exponent bits),
 * computed in double: the nested_quant_map a double-quantized checkpoint stores (the readers
 * use the stored values, so only their order and range matter here) */
static void gen_dynamic_map(float *map)
{
    double d[256];
    int k = 0;
    for (int i = 0; i < 7; i++) {
        int items = (1 << i) + 1; /* fraction_items, signed: 2^i + 1 boundaries */
        for (int j = 0; j + 1 < items; j++) {
            double b0 = 0.1 + 0.9 * j / (items - 1), b1 = 0.1 + 0.9 * (j + 1) / (items - 1);
            double m = pow(10.0, -6 + i) * (b0 + b1) / 2;
            d[k++] = m;
            d[k++] = -m;
        }
    }
    d[k++] = 0.0;
    d[k++] = 1.0;
    while (k < 256)
        d[k++] = 0.0;
    for (int i = 1; i < 256; i++) /* sort */
        for (int j = i; j > 0 && d[j - 1] > d[j]; j--) {
            double t = d[j];
            d[j] = d[j - 1];
            d[j - 1] = t;
        }
    for (int i = 0; i < 256; i++)
        map[i] = (float)d[i];
}

/* one bitsandbytes 4-bit weight: g[0] (the weight as planned: name, shape, dtype) becomes the
 * packed codes, followed by its quant-state tensors.  @return the tensors written at g */
static size_t gen_bnb4(gen_tensor *g, long l, const char *proj, uint64_t o, uint64_t in, const char *qt, long nested,
                       float wamp, lm_dtype dt, const float *dmap, char **json)
{
    const uint64_t ne = o * in, nblk = (ne + 63) / 64, nblk2 = (nblk + 255) / 256;
    const float offset = wamp;
    const char *dtn = dt == LM_DT_BF16 ? "bfloat16" : dt == LM_DT_F16 ? "float16" : "float32";
    size_t n = 0;
    char base[160];
    snprintf(base, sizeof base, "model.layers.%ld.%s.weight", l, proj);
#define G(suffix, d0, nd, dtype_, fill_)                                                           \
    do {                                                                                           \
        memset(&g[n], 0, sizeof g[n]);                                                             \
        snprintf(g[n].name, sizeof g[n].name, "%s%s", base, suffix);                               \
        g[n].dtype = dtype_;                                                                       \
        g[n].n_dims = nd;                                                                          \
        g[n].shape[0] = (uint64_t)(d0);                                                            \
        g[n].shape[1] = 1;                                                                         \
        g[n].fill = fill_;                                                                         \
        n++;                                                                                       \
    } while (0)
    G("", (ne + 1) / 2, 2, LM_DT_U8, GEN_BYTES);
    g[n - 1].amp = 255.0f; /* every byte */
    G(".absmax", nblk, 1, nested ? LM_DT_U8 : LM_DT_F32, nested ? GEN_BYTES : GEN_UNIFORM);
    g[n - 1].amp = nested ? 255.0f : 0.5f * wamp;
    g[n - 1].offset = nested ? 0.0f : wamp;
    G(".quant_map", 16, 1, LM_DT_F32, GEN_DATA);
    g[n - 1].data = strcmp(qt, "nf4") == 0 ? LM_BNB_NF4 : LM_BNB_FP4;
    if (nested) {
        G(".nested_absmax", nblk2, 1, LM_DT_F32, GEN_UNIFORM);
        g[n - 1].amp = 0.25f * wamp;
        g[n - 1].offset = 0.5f * wamp;
        G(".nested_quant_map", 256, 1, LM_DT_F32, GEN_DATA);
        g[n - 1].data = dmap;
    }
    char js[512];
    int len = nested ? snprintf(js, sizeof js, "{\"quant_type\": \"%s\", \"blocksize\": 64, \"dtype\": \"%s\", "
                                "\"shape\": [%llu, %llu], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", "
                                "\"nested_offset\": %.9g}", qt, dtn, (unsigned long long)o, (unsigned long long)in,
                                (double)offset)
                     : snprintf(js, sizeof js, "{\"quant_type\": \"%s\", \"blocksize\": 64, \"dtype\": \"%s\", "
                                "\"shape\": [%llu, %llu]}", qt, dtn, (unsigned long long)o, (unsigned long long)in);
    *json = strdup(js);
    char suffix[64];
    snprintf(suffix, sizeof suffix, ".quant_state.bitsandbytes__%s", qt);
    G(suffix, len, 1, LM_DT_U8, GEN_DATA);
    g[n - 1].data = *json;
#undef G
    return n;
}

int main(int argc, char **argv)
{
    const char *out = NULL, *targets = "all";
    long hidden = 256, inter = 688, layers = 4, vocab = 1024, heads = 8, kv = 4, rank = 8, no_adapter = 0, experts = 0,
         fused = 0, block = 128;
    const char *quant = NULL, *qskip = NULL;
    int ct = 0; /* compressed-tensors FP8: 1 tensor, 2 channel, 3 group, 4 block; 5 ModelOpt FP8 */
    int nv = 0; /* NVFP4: 1 compressed-tensors, 2 ModelOpt */
    long nested = 0;
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
        else if (ARG("--experts")) experts = atol(v);
        else if (ARG("--quant")) quant = v;
        else if (ARG("--block")) block = atol(v);
        else if (ARG("--quant-skip")) qskip = v;
        else if (strcmp(a, "--nested") == 0) nested = 1;
        else if (strcmp(a, "--no-adapter") == 0) no_adapter = 1;
        else if (strcmp(a, "--fused-experts") == 0) fused = 1;
        else {
            fprintf(stderr, "usage: gen_model --out DIR [--hidden H] [--inter I] [--layers L] [--vocab V] [--heads N] "
                            "[--kv-heads K] [--rank R] [--alpha A] [--dtype bf16|f16|f32] [--adapter-dtype f32|bf16|f16] "
                            "[--targets qv|all] [--seed S] [--no-adapter] [--experts E] [--fused-experts] [--quant fp8|ct-fp8[-channel|-group|-block]|modelopt-fp8|nvfp4|modelopt-nvfp4|bnb-nf4|bnb-fp4|bnb-int8] [--block B] [--nested] [--quant-skip P]\n");
            return 2;
        }
#undef ARG
    }
    if (out == NULL || hidden <= 0 || heads <= 0 || hidden % heads != 0 || kv <= 0 || layers <= 0 || vocab <= 0 ||
        inter <= 0 || rank <= 0 || block <= 0 || (quant != NULL && strcmp(quant, "fp8") != 0 && strcmp(quant, "mxfp4") != 0 &&
        strcmp(quant, "bnb-nf4") != 0 && strcmp(quant, "bnb-fp4") != 0 && strcmp(quant, "bnb-int8") != 0 &&
        !(ct = strcmp(quant, "ct-fp8") == 0 ? 1 : strcmp(quant, "ct-fp8-channel") == 0 ? 2
              : strcmp(quant, "ct-fp8-group") == 0 ? 3 : strcmp(quant, "ct-fp8-block") == 0 ? 4
              : strcmp(quant, "modelopt-fp8") == 0 ? 5 : 0) &&
        !(nv = strcmp(quant, "nvfp4") == 0 ? 1 : strcmp(quant, "modelopt-nvfp4") == 0 ? 2 : 0))) {
        fprintf(stderr, "gen_model: --out DIR is required and sizes must be positive (hidden divisible by heads); "
                        "--quant takes fp8, mxfp4, ct-fp8, ct-fp8-channel, ct-fp8-group, ct-fp8-block, modelopt-fp8, nvfp4, modelopt-nvfp4, bnb-nf4, bnb-fp4 or bnb-int8\n");
        return 2;
    }
    const int mx = quant != NULL && strcmp(quant, "mxfp4") == 0;
    if (mx && (experts <= 0 || hidden % 32 != 0 || inter % 32 != 0)) {
        fprintf(stderr, "gen_model: --quant mxfp4 writes gpt-oss experts: it needs --experts E and hidden and inter "
                        "multiples of 32\n");
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

    const int bnb4 = quant != NULL && strncmp(quant, "bnb-", 4) == 0 && strcmp(quant, "bnb-int8") != 0;
    const int bnb8 = quant != NULL && strcmp(quant, "bnb-int8") == 0;
    size_t nb = 3 + (32 + 7 * 6 + 6 * (size_t)experts) * (size_t)layers, n = 0;
    char **jsons = calloc(nb, sizeof *jsons); /* the packed quant_state JSON of each 4-bit weight */
    size_t n_json = 0;
    float dmap[256];
    gen_dynamic_map(dmap);
    static const uint8_t zero_byte = 0;
    gen_tensor *g = calloc(nb, sizeof *g);
    float wamp = (float)(1.7 / sqrt((double)hidden));
    /* MXFP4 scales 2^(s - 127) around wamp / 2.5 (E2M1 magnitudes average about 2.6), s0 .. s0 + 4 */
    long mx_scale0 = 127 + (long)floor(log2(wamp / 2.5)) - 2;
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
        for (int p = 0; p < (experts ? 4 : 7); p++) {
            long o = p == 1 || p == 2 ? kvd : p >= 4 && p <= 5 ? inter : hidden;
            long in = p == 6 ? inter : hidden;
            snprintf(nm, sizeof nm, "model.layers.%ld.%s.weight", l, proj[p]);
            T(nm, o, in, 2, wamp, 0.0f);
            if (qskip != NULL && strstr(proj[p], qskip) != NULL) {
                /* kept float (llm_int8_skip_modules) */
            } else if (bnb4) {
                n += gen_bnb4(g + n - 1, l, proj[p], (uint64_t)o, (uint64_t)in, quant + 4, nested, wamp, dt, dmap,
                              &jsons[n_json++]) - 1;
            } else if (bnb8) {
                g[n - 1].dtype = LM_DT_I8;
                g[n - 1].fill = GEN_BYTES; /* every byte */
                g[n - 1].amp = 255.0f;
                g[n - 1].offset = 0.0f;
                snprintf(nm, sizeof nm, "model.layers.%ld.%s.SCB", l, proj[p]);
                T(nm, o, 1, 1, 0.5f * wamp, 2.0f * wamp);
                g[n - 1].dtype = LM_DT_F32;
                snprintf(nm, sizeof nm, "model.layers.%ld.%s.weight_format", l, proj[p]);
                T(nm, 1, 1, 0, 0.0f, 0.0f);
                g[n - 1].dtype = LM_DT_U8;
                g[n - 1].fill = GEN_DATA;
                g[n - 1].data = &zero_byte;
            } else if (nv) { /* packed codes, FP8 group scales in [112, 336], the second scale: values ~ wamp */
                const float gscale = 2688.0f / (2.0f * wamp); /* compressed-tensors' global scale */
                if (nv == 1) {
                    snprintf(nm, sizeof nm, "model.layers.%ld.%s.weight_packed", l, proj[p]);
                    snprintf(g[n - 1].name, sizeof g[n - 1].name, "%s", nm);
                }
                g[n - 1].dtype = LM_DT_U8;
                g[n - 1].fill = GEN_FP8_CODES;
                g[n - 1].shape[1] = (uint64_t)(in / 2);
                snprintf(nm, sizeof nm, "model.layers.%ld.%s.weight_scale", l, proj[p]);
                T(nm, o, in / 16, 2, 112.0f, 224.0f); /* [112, 336]: headroom for the merged amax */
                g[n - 1].dtype = LM_DT_F8_E4M3;
                snprintf(nm, sizeof nm, "model.layers.%ld.%s.%s", l, proj[p], nv == 1 ? "weight_global_scale" : "weight_scale_2");
                T(nm, 1, 1, nv == 1 ? 1 : 0, 0.0f, nv == 1 ? gscale : 1.0f / gscale);
                g[n - 1].dtype = LM_DT_F32;
                if (nv == 2) {
                    snprintf(nm, sizeof nm, "model.layers.%ld.%s.input_scale", l, proj[p]);
                    T(nm, 1, 1, 0, 0.0f, 0.002f);
                    g[n - 1].dtype = LM_DT_F32;
                }
            } else if (ct) { /* codes, then compressed-tensors' weight_scale (scale ~ wamp / 448) */
                g[n - 1].dtype = LM_DT_F8_E4M3;
                g[n - 1].fill = GEN_FP8_CODES;
                snprintf(nm, sizeof nm, "model.layers.%ld.%s.weight_scale", l, proj[p]);
                long s0 = ct == 1 || ct == 5 ? 1 : ct == 4 ? (o + block - 1) / block : o;
                long s1 = ct == 1 || ct == 2 || ct == 5 ? 1 : (in + block - 1) / block;
                T(nm, s0, s1, ct == 5 ? 0 : ct == 1 ? 1 : 2, 0.5f * wamp / 448.0f, wamp / 448.0f);
                g[n - 1].dtype = ct == 2 || ct == 3 ? LM_DT_BF16 : LM_DT_F32;
                if (ct == 1 || ct == 5) { /* ModelOpt: scalars, shape [] */
                    snprintf(nm, sizeof nm, "model.layers.%ld.%s.input_scale", l, proj[p]);
                    T(nm, 1, 1, ct == 5 ? 0 : 1, 0.001f, 0.01f);
                    g[n - 1].dtype = LM_DT_F32;
                }
            } else if (quant != NULL && !mx) { /* codes, then the block scales (values ~ wamp: scale ~ wamp / 448) */
                g[n - 1].dtype = LM_DT_F8_E4M3;
                g[n - 1].fill = GEN_FP8_CODES;
                snprintf(nm, sizeof nm, "model.layers.%ld.%s.weight_scale_inv", l, proj[p]);
                T(nm, (o + block - 1) / block, (in + block - 1) / block, 2, 0.5f * wamp / 448.0f, wamp / 448.0f);
                g[n - 1].dtype = LM_DT_F32;
            }
        }
        if (experts && mx) { /* gpt-oss: router, and the experts as MXFP4 blocks / scales with a bias */
            snprintf(nm, sizeof nm, "model.layers.%ld.mlp.router.weight", l);
            T(nm, experts, hidden, 2, wamp, 0.0f);
            snprintf(nm, sizeof nm, "model.layers.%ld.mlp.router.bias", l);
            T(nm, experts, 1, 1, wamp, 0.0f);
            for (int p = 0; p < 2; p++) { /* gate_up [E, 2I, H/32, 16], down [E, H, I/32, 16] */
                const char *pn = p ? "down_proj" : "gate_up_proj";
                uint64_t o = (uint64_t)(p ? hidden : 2 * inter), ng = (uint64_t)(p ? inter : hidden) / 32;
                snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%s_blocks", l, pn);
                T(nm, experts, o, 4, 255.0f, 0.0f);
                g[n - 1].shape[2] = ng;
                g[n - 1].shape[3] = 16;
                g[n - 1].dtype = LM_DT_U8;
                g[n - 1].fill = GEN_BYTES;
                snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%s_scales", l, pn);
                T(nm, experts, o, 3, 4.0f, (float)mx_scale0);
                g[n - 1].shape[2] = ng;
                g[n - 1].dtype = LM_DT_U8;
                g[n - 1].fill = GEN_BYTES;
                snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%s_bias", l, pn);
                T(nm, experts, o, 2, wamp, 0.0f);
            }
        } else if (experts) {
            snprintf(nm, sizeof nm, "model.layers.%ld.mlp.gate.weight", l);
            T(nm, experts, hidden, 2, wamp, 0.0f);
            for (int p = 0; fused && p < 2; p++) { /* [E, 2I, H], [E, H, I] */
                const char *pn = p ? "down_proj" : "gate_up_proj";
                long o = p ? hidden : 2 * inter, in = p ? inter : hidden;
                snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%s", l, pn);
                T(nm, experts, o, 3, wamp, 0.0f);
                g[n - 1].shape[2] = (uint64_t)in;
                if (quant != NULL && !ct && !nv && !bnb4 && !bnb8) { /* transformers' FP8Experts: P F8_E4M3, P_scale_inv [E, O/B, I/B] */
                    g[n - 1].dtype = LM_DT_F8_E4M3;
                    g[n - 1].fill = GEN_FP8_CODES;
                    snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%s_scale_inv", l, pn);
                    T(nm, experts, (o + block - 1) / block, 3, 0.5f * wamp / 448.0f, wamp / 448.0f);
                    g[n - 1].shape[2] = (uint64_t)((in + block - 1) / block);
                    g[n - 1].dtype = LM_DT_F32;
                } else if (nv == 2) { /* ModelOpt NVFP4 stacks: P U8 [E, O, I/2], P_weight_scale F8_E4M3
                                         [E, O, I/16], P_weight_scale_2 F32 per expert [E] (gate_up_proj)
                                         or one [] (down_proj), P_input_scale [] */
                    const float g2 = 2.0f * wamp / 2688.0f;
                    g[n - 1].dtype = LM_DT_U8;
                    g[n - 1].fill = GEN_FP8_CODES;
                    g[n - 1].shape[2] = (uint64_t)(in / 2);
                    snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%s_weight_scale", l, pn);
                    T(nm, experts, o, 3, 112.0f, 224.0f);
                    g[n - 1].shape[2] = (uint64_t)(in / 16);
                    g[n - 1].dtype = LM_DT_F8_E4M3;
                    snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%s_weight_scale_2", l, pn);
                    T(nm, experts, 1, p ? 0 : 1, 0.25f * g2, 1.25f * g2);
                    g[n - 1].dtype = LM_DT_F32;
                    snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%s_input_scale", l, pn);
                    T(nm, 1, 1, 0, 0.0f, 0.002f);
                    g[n - 1].dtype = LM_DT_F32;
                }
            }
            for (long e = 0; e < experts && !fused; e++)
                for (int p = 4; p < 7; p++) {
                    long o = p == 6 ? hidden : inter, in = p == 6 ? inter : hidden;
                    snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%ld.%s.weight", l, e, proj[p] + 4);
                    T(nm, o, in, 2, wamp, 0.0f);
                    if (quant != NULL && !ct && !nv) { /* Qwen3-FP8: every expert's weight with its block scales */
                        g[n - 1].dtype = LM_DT_F8_E4M3;
                        g[n - 1].fill = GEN_FP8_CODES;
                        snprintf(nm, sizeof nm, "model.layers.%ld.mlp.experts.%ld.%s.weight_scale_inv", l, e, proj[p] + 4);
                        T(nm, (o + block - 1) / block, (in + block - 1) / block, 2, 0.5f * wamp / 448.0f, wamp / 448.0f);
                        g[n - 1].dtype = LM_DT_F32;
                    }
                }
        }
        snprintf(nm, sizeof nm, "model.layers.%ld.post_attention_layernorm.weight", l);
        T(nm, hidden, 1, 1, 0.1f, 1.0f);
    }
    T("model.norm.weight", hidden, 1, 1, 0.1f, 1.0f);
    T("lm_head.weight", vocab, hidden, 2, 0.05f, 0.0f);
    snprintf(path, sizeof path, "%s/base/model.safetensors", out);
    if (gen_write_tensors("gen_model", path, g, n, seed, &k) != 0)
        return 1;
    for (size_t j = 0; j < n_json; j++)
        free(jsons[j]);
    free(jsons);
    char qcfg[1024] = "", skipl[96] = "null";
    if (qskip != NULL)
        snprintf(skipl, sizeof skipl, "[\"%.80s\"]", qskip);
    const char *dtn = dt == LM_DT_BF16 ? "bfloat16" : dt == LM_DT_F16 ? "float16" : "float32";
    if (mx)
        snprintf(qcfg, sizeof qcfg, ", \"num_local_experts\": %ld, \"quantization_config\": {\"modules_to_not_convert\": [\"model.layers.*.self_attn\", "
                 "\"model.layers.*.mlp.router\", \"model.embed_tokens\", \"lm_head\"], \"quant_method\": \"mxfp4\"}", experts);
    else if (bnb4 || bnb8)
        snprintf(qcfg, sizeof qcfg, ", \"quantization_config\": {\"_load_in_4bit\": %s, \"_load_in_8bit\": %s, "
                 "\"bnb_4bit_compute_dtype\": \"%s\", \"bnb_4bit_quant_storage\": \"uint8\", \"bnb_4bit_quant_type\": "
                 "\"%s\", \"bnb_4bit_use_double_quant\": %s, \"llm_int8_enable_fp32_cpu_offload\": false, "
                 "\"llm_int8_has_fp16_weight\": false, \"llm_int8_skip_modules\": %s, \"llm_int8_threshold\": 6.0, "
                 "\"load_in_4bit\": %s, \"load_in_8bit\": %s, \"quant_method\": \"bitsandbytes\"}",
                 bnb4 ? "true" : "false", bnb8 ? "true" : "false", bnb4 ? dtn : "float32",
                 bnb4 ? quant + 4 : "fp4", nested ? "true" : "false", skipl, bnb4 ? "true" : "false",
                 bnb8 ? "true" : "false");
    else if (ct && ct != 5) {
        static const char *const strat[] = {"", "tensor", "channel", "group", "block"};
        char gs[32] = "null", bs[48] = "null";
        if (ct == 3)
            snprintf(gs, sizeof gs, "%ld", block);
        if (ct == 4)
            snprintf(bs, sizeof bs, "[%ld, %ld]", block, block);
        snprintf(qcfg, sizeof qcfg, ", \"quantization_config\": {\"quant_method\": \"compressed-tensors\", "
                 "\"format\": \"float-quantized\", \"quantization_status\": \"compressed\", \"config_groups\": "
                 "{\"group_0\": {\"targets\": [\"Linear\"], \"weights\": {\"num_bits\": 8, \"type\": \"float\", "
                 "\"symmetric\": true, \"strategy\": \"%s\", \"group_size\": %s, \"block_structure\": %s, "
                 "\"dynamic\": false, \"observer\": \"minmax\"}, \"input_activations\": null, \"output_activations\": null, "
                 "\"format\": \"float-quantized\"}}, \"ignore\": [\"lm_head\"], \"kv_cache_scheme\": null}",
                 strat[ct], gs, bs);
    } else if (nv == 1) {
        snprintf(qcfg, sizeof qcfg, ", \"quantization_config\": {\"quant_method\": \"compressed-tensors\", "
                 "\"format\": \"nvfp4-pack-quantized\", \"quantization_status\": \"compressed\", \"config_groups\": "
                 "{\"group_0\": {\"targets\": [\"Linear\"], \"weights\": {\"num_bits\": 4, \"type\": \"float\", "
                 "\"symmetric\": true, \"strategy\": \"tensor_group\", \"group_size\": 16, \"dynamic\": false, "
                 "\"observer\": \"minmax\", \"scale_dtype\": \"torch.float8_e4m3fn\"}, \"input_activations\": null, "
                 "\"output_activations\": null, \"format\": \"nvfp4-pack-quantized\"}}, \"ignore\": [\"lm_head\"], "
                 "\"kv_cache_scheme\": null}");
    } else if (quant != NULL && nv == 0 && ct != 5)
        snprintf(qcfg, sizeof qcfg, ", \"quantization_config\": {\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\", "
                 "\"quant_method\": \"fp8\", \"weight_block_size\": [%ld, %ld]}", block, block);
    snprintf(path, sizeof path, "%s/base/config.json", out);
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "{\"architectures\": [\"%s\"], \"model_type\": \"%s\", \"num_experts\": %ld, \"hidden_size\": %ld, "
                   "\"intermediate_size\": %ld, \"num_hidden_layers\": %ld, \"num_attention_heads\": %ld, "
                   "\"num_key_value_heads\": %ld, \"vocab_size\": %ld, \"tie_word_embeddings\": false, "
                   "\"torch_dtype\": \"%s\"%s}\n",
                mx ? "GptOssForCausalLM" : experts ? "Qwen3MoeForCausalLM" : "LlamaForCausalLM",
                mx ? "gpt_oss" : experts ? "qwen3_moe" : "llama", experts, hidden,
                inter, layers, heads, kv, vocab, dtn, qcfg);
        fclose(f);
    }
    if (nv == 2 || ct == 5) {
        snprintf(path, sizeof path, "%s/base/hf_quant_config.json", out);
        f = fopen(path, "w");
        if (f) {
            fprintf(f, "{\n  \"producer\": {\"name\": \"modelopt\", \"version\": \"0.29.0\"},\n  \"quantization\": "
                       "{\"quant_algo\": \"%s\", \"kv_cache_quant_algo\": null,%s "
                       "\"exclude_modules\": [\"lm_head\"]}\n}\n", ct == 5 ? "FP8" : "NVFP4",
                    ct == 5 ? "" : " \"group_size\": 16,");
            fclose(f);
        }
    }
    free(g);
    if (no_adapter)
        return 0;
    /* the adapter */
    int all = strcmp(targets, "all") == 0;
    size_t na = 0, cap = (size_t)layers * 7 * 2;
    gen_tensor *ga = calloc(cap, sizeof *ga);
    for (long l = 0; l < layers; l++) {
        for (int p = 0; p < 7; p++) {
            if ((!all && p != 0 && p != 2) || (experts && p == 5))
                continue;
            long o = p == 1 || p == 2 ? kvd : p >= 4 && p <= 5 ? inter : hidden;
            long in = p == 6 ? inter : hidden;
            long ne = experts && p >= 4 ? experts : 1; /* expert parameters: r * E */
            if (ne > 1 && p == 4)
                o = 2 * inter; /* gate_up_proj: gate rows, then up rows */
            /* two parameters of one module: gate_up_proj (registered first) is the inner wrapper */
            const char *mod = ne == 1 ? proj[p] : p == 4 ? "mlp.experts.base_layer" : "mlp.experts";
            snprintf(ga[na].name, sizeof ga[na].name, "base_model.model.model.layers.%ld.%s.lora_A.weight", l, mod);
            ga[na].dtype = adt;
            ga[na].n_dims = 2;
            ga[na].shape[0] = (uint64_t)(rank * ne);
            ga[na].shape[1] = (uint64_t)in;
            ga[na].amp = (float)(1.0 / sqrt((double)in));
            na++;
            snprintf(ga[na].name, sizeof ga[na].name, "base_model.model.model.layers.%ld.%s.lora_B.weight", l, mod);
            ga[na].dtype = adt;
            ga[na].n_dims = 2;
            ga[na].shape[0] = (uint64_t)o;
            ga[na].shape[1] = (uint64_t)(rank * ne);
            ga[na].amp = 0.01f;
            na++;
        }
    }
    snprintf(path, sizeof path, "%s/adapter/adapter_model.safetensors", out);
    if (gen_write_tensors("gen_model", path, ga, na, seed + 1000, &k) != 0)
        return 1;
    snprintf(path, sizeof path, "%s/adapter/adapter_config.json", out);
    f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "gen_model: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    fprintf(f, "{\n  \"peft_type\": \"LORA\",\n  \"task_type\": \"CAUSAL_LM\",\n  \"r\": %ld,\n  \"lora_alpha\": %g,\n"
               "  \"lora_dropout\": 0.0,\n  \"bias\": \"none\",\n  \"use_rslora\": false,\n  \"use_dora\": false,\n"
               "  \"fan_in_fan_out\": false,\n  \"peft_version\": \"0.21.0\",\n  \"target_modules\": [%s]%s\n}\n",
            rank, alpha,
            experts && all ? "\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\""
            : all ? "\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\""
                : "\"q_proj\", \"v_proj\"",
            experts && all ? ",\n  \"target_parameters\": [\"mlp.experts.gate_up_proj\", \"mlp.experts.down_proj\"]" : "");
    fclose(f);
    free(ga);
    return 0;
}
