/* SPDX-License-Identifier: MIT */
/* fuzz_torch_zip.c : libFuzzer target for whole adapter_model.bin files: zip archives read
 * through libzip, legacy torch files, and anything else (refused).  Checks: a refusal names its
 * kind, message and the file; an accepted tensor's bytes are all readable. */
#include "lm_error.h"
#include "tensor_set.h"
#include "torch_bin.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lm_err err;
    lm_err_clear(&err);
    lm_tensor_set *ts = NULL;
    lm_code rc = lm_torch_bin_load_buffer(data, size, "fuzz.bin", &ts, &err);
    if (rc != LM_OK) {
        if (ts != NULL || err.code != rc || err.kind[0] == '\0' || err.msg[0] == '\0' ||
            strcmp(err.path, "fuzz.bin") != 0)
            __builtin_trap();
        return 0;
    }
    volatile unsigned sink = 0;
    for (size_t i = 0; i < ts->n; i++) {
        const lm_ts_tensor *t = &ts->t[i];
        const uint8_t *b = t->data;
        if (t->n_bytes > 0)
            sink += b[0] + b[t->n_bytes - 1];
        sink += (unsigned)strlen(t->name);
    }
    (void)sink;
    lm_ts_free(ts);
    return 0;
}
