/* SPDX-License-Identifier: MIT */
/* fuzz_pickle.c : libFuzzer target for the restricted pickle machine and the state-dict builder.
 * Any bytes are a candidate data.pkl; every storage it names is served from one patterned
 * buffer (up to 64 KiB), so views, gathers and byte counts are exercised without an archive.
 * Checks: a refusal names its kind and message; an accepted tensor's bytes are all readable. */
#include "lm_error.h"
#include "tensor_set.h"
#include "torch_bin.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FP_MAX_STORAGE (64u << 10)

static uint8_t fp_storage[FP_MAX_STORAGE];

static lm_code fp_storage_fn(void *ctx, const char *key, lm_dtype dtype, uint64_t n_bytes,
                             const void **out, lm_err *err)
{
    (void)ctx;
    (void)dtype;
    if (n_bytes > FP_MAX_STORAGE)
        return lm_fail(err, LM_E_FORMAT, "InvalidStorage", "storage '%s' too large for the fuzzer", key);
    *out = fp_storage;
    return LM_OK;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fp_storage[1] == 0)
        for (size_t i = 0; i < sizeof fp_storage; i++)
            fp_storage[i] = (uint8_t)(i * 131u + 7u);
    lm_err err;
    lm_err_clear(&err);
    lm_tensor_set *ts = NULL;
    lm_code rc = lm_torch_pickle_load(data, size, "fuzz", fp_storage_fn, NULL, &ts, &err);
    if (rc != LM_OK) {
        if (ts != NULL || err.code != rc || err.kind[0] == '\0' || err.msg[0] == '\0')
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
