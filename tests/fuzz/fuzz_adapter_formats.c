/* SPDX-License-Identifier: MIT */
/* fuzz_adapter_formats.c : libFuzzer target for adapters of other tools: the bytes of one
 * weights file (safetensors or torch.save) normalised without a base and with a small base
 * (diffusers UNet / CLIP / ViT / Llama names, config.json of a UNet2DConditionModel).  Checks: a
 * refusal names its kind and message; an accepted adapter's config is one the PEFT config parser
 * accepts, and every tensor's bytes are readable. */
#include "adapter_config.h"
#include "adapter_formats.h"
#include "lm_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lm_model *m;
static char dir[] = "/tmp/lm-fuzz-base-XXXXXX";

static void fuzz_base_remove(void)
{
    char path[128];
    lm_model_close(m);
    m = NULL;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
}

/* a tiny base written once per process (removed at exit): names the readers resolve against,
 * zero data */
static lm_model *fuzz_base(void)
{
    static int tried;
    if (tried)
        return m;
    tried = 1;
    static const char *const names[] = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.0.self_attn.k_proj.weight",
        "blocks.0.attn.qkv.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "lm_head.weight"};
    char path[128], hdr[4096];
    if (mkdtemp(dir) == NULL)
        return NULL;
    atexit(fuzz_base_remove);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return NULL;
    uint8_t len8[8] = {0};
    static const uint8_t zeros[16 * 12 * 16];
    size_t used = (size_t)snprintf(hdr, sizeof hdr, "{");
    size_t off = 0;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        size_t rows = strstr(names[i], "qkv") ? 12 : 4;
        used += (size_t)snprintf(hdr + used, sizeof hdr - used, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%zu,4],"
                                 "\"data_offsets\":[%zu,%zu]}", i ? "," : "", names[i], rows, off, off + 16 * rows);
        off += 16 * rows;
    }
    used += (size_t)snprintf(hdr + used, sizeof hdr - used, "}");
    while (used % 8)
        hdr[used++] = ' ';
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)used >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(hdr, 1, used, f);
    fwrite(zeros, 1, off, f);
    fclose(f);
    snprintf(path, sizeof path, "%s/config.json", dir);
    f = fopen(path, "wb");
    if (f == NULL)
        return NULL;
    fputs("{\"_class_name\": \"UNet2DConditionModel\", \"model_type\": \"llama\", \"num_attention_heads\": 1, "
          "\"hidden_size\": 4}", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    m = lm_model_open(path, NULL);
    return m;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const lm_format_opts opts[2] = {{NULL, 0, 0}, {"q_proj,k_proj", 2.0, 0}};
    for (int pass = 0; pass < 3; pass++) {
        lm_err err;
        lm_err_clear(&err);
        lm_norm_adapter *n = NULL;
        const lm_model *base = pass ? fuzz_base() : NULL;
        lm_code rc = lm_formats_normalise_buffer(data, size, pass == 2 ? "fuzz.pt" : "fuzz.safetensors", base,
                                                 &opts[pass == 2], &n, &err);
        if (rc != LM_OK) {
            if (n != NULL || err.code != rc || err.kind[0] == '\0' || err.msg[0] == '\0')
                __builtin_trap();
            continue;
        }
        lm_err cerr;
        lm_err_clear(&cerr);
        lm_adapter_config *cfg = lm_adapter_config_parse(n->config_json, strlen(n->config_json), "fuzz", &cerr);
        if (cfg == NULL) /* what normalisation writes, the PEFT path must read */
            __builtin_trap();
        lm_adapter_config_free(cfg);
        volatile unsigned sink = 0;
        for (size_t i = 0; i < n->ts->n; i++) {
            const lm_ts_tensor *t = &n->ts->t[i];
            const uint8_t *b = t->data;
            if (t->n_bytes > 0)
                sink += b[0] + b[t->n_bytes - 1];
        }
        (void)sink;
        lm_norm_adapter_free(n);
    }
    return 0;
}
