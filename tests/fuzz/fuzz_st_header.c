/* SPDX-License-Identifier: MIT */
/* fuzz_st_header.c : libFuzzer target for the safetensors reader.  Any bytes are a candidate
 * file: open them from memory, walk every tensor and metadata entry (touching the first and
 * last byte of each tensor, so a range outside the buffer trips ASan), close. */
#include "lora_merge.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lm_err err;
    lm_err_clear(&err);
    lm_st_file *f = lm_st_open_buffer(data, size, "fuzz", &err);
    if (f == NULL) {
        /* a refusal always says what kind of problem it was */
        if (err.code == LM_OK || err.kind[0] == '\0' || err.msg[0] == '\0')
            __builtin_trap();
        return 0;
    }
    volatile unsigned sink = 0;
    const uint8_t *base = lm_st_data(f);
    for (size_t i = 0; i < lm_st_n_tensors(f); i++) {
        const lm_tensor_info *t = lm_st_tensor(f, i);
        if (t->begin > t->end || t->end > lm_st_data_bytes(f) ||
            lm_st_find(f, t->name, NULL) != t)
            __builtin_trap();
        uint64_t n = 1;
        for (size_t d = 0; d < t->n_dims; d++)
            n *= t->shape[d];
        if (n != t->n_elems)
            __builtin_trap();
        if (t->end > t->begin)
            sink += base[t->begin] + base[t->end - 1];
        sink += (unsigned)strlen(t->name) + (unsigned)t->dtype;
    }
    for (size_t i = 0; i < lm_st_n_metadata(f); i++) {
        const char *k, *v;
        lm_st_metadata(f, i, &k, &v);
        sink += (unsigned)strlen(k) + (unsigned)strlen(v);
    }
    (void)sink;
    lm_st_close(f);
    return 0;
}
