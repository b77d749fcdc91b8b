/* SPDX-License-Identifier: MIT */
/* lm_dtype.c : the dtypes of the safetensors format: names and bit widths. */
#include "lora_merge.h"

#include <string.h>

static const struct {
    const char *name;
    unsigned bits;
} DTYPES[LM_DT_COUNT] = {
    [LM_DT_BOOL] = {"BOOL", 8},       [LM_DT_U8] = {"U8", 8},
    [LM_DT_I8] = {"I8", 8},           [LM_DT_I16] = {"I16", 16},
    [LM_DT_U16] = {"U16", 16},        [LM_DT_I32] = {"I32", 32},
    [LM_DT_U32] = {"U32", 32},        [LM_DT_I64] = {"I64", 64},
    [LM_DT_U64] = {"U64", 64},        [LM_DT_F16] = {"F16", 16},
    [LM_DT_BF16] = {"BF16", 16},      [LM_DT_F32] = {"F32", 32},
    [LM_DT_F64] = {"F64", 64},        [LM_DT_C64] = {"C64", 64},
    [LM_DT_F8_E4M3] = {"F8_E4M3", 8}, [LM_DT_F8_E5M2] = {"F8_E5M2", 8},
    [LM_DT_F8_E8M0] = {"F8_E8M0", 8}, [LM_DT_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [LM_DT_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [LM_DT_F4] = {"F4", 4},           [LM_DT_F6_E2M3] = {"F6_E2M3", 6},
    [LM_DT_F6_E3M2] = {"F6_E3M2", 6},
};

const char *lm_dtype_name(lm_dtype dt)
{
    return (unsigned)dt < LM_DT_COUNT ? DTYPES[dt].name : "?";
}

unsigned lm_dtype_bits(lm_dtype dt)
{
    return (unsigned)dt < LM_DT_COUNT ? DTYPES[dt].bits : 0;
}

int lm_dtype_parse(const char *name, size_t n_bytes, lm_dtype *out)
{
    for (int i = 0; i < LM_DT_COUNT; i++) {
        if (strlen(DTYPES[i].name) == n_bytes && memcmp(DTYPES[i].name, name, n_bytes) == 0) {
            *out = (lm_dtype)i;
            return 1;
        }
    }
    return 0;
}
