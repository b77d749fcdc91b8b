/* SPDX-License-Identifier: MIT */
/* quant_bnb.c : bitsandbytes' 4-bit and 8-bit codecs (see quant_bnb.h). */
#include "quant_bnb.h"

#include "lm_kernels.h"

#include <math.h>
#include <string.h>

/* kernels.cu nf4_dequantization_lut; functional.py get_4bit_type("nf4") holds the same f32s */
const float LM_BNB_NF4[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

/* kernels.cu fp4_dequantization_lut (bit patterns 0b000..0b111) and its sign bit 0b1000:
 * dDequantizeFP4Tree returns lut[c & 7] * (1 - 2 * (c >> 3)), so 0b1000 is -0 */
const float LM_BNB_FP4[16] = {
    0.0f,  0.005208333333f,  0.66666667f,  1.0f,  0.33333333f,  0.5f,  0.16666667f,  0.25f,
    -0.0f, -0.005208333333f, -0.66666667f, -1.0f, -0.33333333f, -0.5f, -0.16666667f, -0.25f,
};

void lm_bnb4_dequant(const float *code, const uint8_t *packed, const float *absmax, uint64_t blocksize,
                     uint64_t e0, uint64_t n, float *dst)
{
    uint64_t e = e0, end = e0 + n;
    const uint64_t b0 = e0 >> 1; /* packed[0] is byte b0 of the tensor */
    if ((e & 1) && e < end) { /* starts on a low nibble */
        *dst++ = code[packed[(e >> 1) - b0] & 15] * absmax[e / blocksize];
        e++;
    }
    while (e < end) {
        const uint64_t b = e / blocksize, stop = (b + 1) * blocksize < end ? (b + 1) * blocksize : end;
        const float a = absmax[b];
        for (; e + 1 < stop; e += 2) {
            const uint8_t v = packed[(e >> 1) - b0];
            *dst++ = code[v >> 4] * a;
            *dst++ = code[v & 15] * a;
        }
        if (e < stop) { /* one element left in the block: a high nibble */
            *dst++ = code[packed[(e >> 1) - b0] >> 4] * a;
            e++;
            if (e < end) {
                *dst++ = code[packed[(e >> 1) - b0] & 15] * absmax[e / blocksize];
                e++;
            }
        }
    }
}

void lm_bnb_nested_absmax(const uint8_t *q, uint64_t n, const float *map, const float *absmax2, uint64_t bs2,
                          float offset, float *out)
{
    for (uint64_t i = 0; i < n; i++) {
        const float v = map[q[i]] * absmax2[i / bs2];
        out[i] = v + offset;
    }
}

void lm_bnb_int8_dequant(const int8_t *q, const float *scb, uint64_t nr, uint64_t cols, float *dst)
{
    for (uint64_t r = 0; r < nr; r++) {
        const float s = scb[r];
        for (uint64_t c = 0; c < cols; c++) {
            const float v = (float)q[r * cols + c] * s;
            dst[r * cols + c] = v * LM_BNB_INT8_SCALE;
        }
    }
}

/* kernels.cu dQuantizeNF4, thresholds as written there */
unsigned lm_bnb_nf4_code(float x)
{
    if (x > 0.03979014977812767f) {
        if (x > 0.3893125355243683f) {
            if (x > 0.6427869200706482f)
                return x > 0.8614784181118011f ? 15 : 14;
            return x > 0.5016634166240692f ? 13 : 12;
        }
        if (x > 0.2035212516784668f)
            return x > 0.2920137718319893f ? 11 : 10;
        return x > 0.1202552504837513f ? 9 : 8;
    }
    if (x > -0.33967943489551544f) {
        if (x > -0.13791173323988914f)
            return x > -0.045525018125772476f ? 7 : 6;
        return x > -0.23460740596055984f ? 5 : 4;
    }
    if (x > -0.6106329262256622f)
        return x > -0.4599952697753906f ? 3 : 2;
    return x > -0.8480964004993439f ? 1 : 0;
}

static float round_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7FFFFFFFu) <= 0x7F800000u) /* not NaN */
        u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&x, &u, 4);
    return x;
}

void lm_bnb_nf4_roundtrip(float *x, uint64_t n, uint64_t blocksize, const float *absmax_dq, int round_to)
{
    for (uint64_t b0 = 0, k = 0; b0 < n; b0 += blocksize, k++) {
        const uint64_t m = b0 + blocksize < n ? blocksize : n - b0;
        float amax = -INFINITY; /* -FLT_MAX in the kernel; fmaxf skips a NaN the same way */
        for (uint64_t i = 0; i < m; i++)
            amax = fmaxf(amax, fabsf(x[b0 + i]));
        const float inv = 1.0f / amax, a = absmax_dq != NULL ? absmax_dq[k] : amax;
        for (uint64_t i = 0; i < m; i++)
            x[b0 + i] = LM_BNB_NF4[lm_bnb_nf4_code(x[b0 + i] * inv)] * a;
    }
    if (round_to == 1)
        for (uint64_t i = 0; i < n; i++)
            x[i] = round_bf16(x[i]);
    else if (round_to == 2) /* to nearest even (not _Float16: clang has no such type on older x86) */
        for (uint64_t i = 0; i < n; i++)
            x[i] = lm_f16_to_f32_1(lm_f32_to_f16_1(x[i]));
}

void lm_bnb_block_amax(const float *x, uint64_t n, uint64_t blocksize, float *amax)
{
    for (uint64_t b0 = 0, k = 0; b0 < n; b0 += blocksize, k++) {
        const uint64_t m = b0 + blocksize < n ? blocksize : n - b0;
        float a = -INFINITY;
        for (uint64_t i = 0; i < m; i++)
            a = fmaxf(a, fabsf(x[b0 + i]));
        amax[k] = a;
    }
}

/* torch.linspace(0.1, 1, steps) in f32, the kernel's scalar formula: start + step * i below the
 * half, end - step * (steps - 1 - i) from it */
static float linspace_f32(int steps, int i)
{
    const float start = 0.1f, end = 1.0f, step = (end - start) / (float)(steps - 1);
    return i < steps / 2 ? start + step * (float)i : end - step * (float)(steps - 1 - i);
}

void lm_bnb_dynamic_map(float map[256])
{
    int k = 0;
    for (int i = 0; i < 7; i++) { /* max_exponent_bits 7, signed: 2^i + 1 boundaries */
        const int steps = (1 << i) + 1;
        const float scale = (float)pow(10.0, (double)(i - 6)); /* Python's 10 ** (i - 6), then f32 */
        for (int j = 0; j + 1 < steps; j++) {
            const float mean = (linspace_f32(steps, j) + linspace_f32(steps, j + 1)) / 2.0f;
            map[k++] = scale * mean;
            map[k++] = -(scale * mean);
        }
    }
    map[k++] = 0.0f;
    map[k++] = 1.0f;
    while (k < 256)
        map[k++] = 0.0f;
    for (int i = 1; i < 256; i++) /* data.sort() */
        for (int j = i; j > 0 && map[j - 1] > map[j]; j--) {
            float t = map[j];
            map[j] = map[j - 1];
            map[j - 1] = t;
        }
}

/* kernels.cu dQuantize<0>: the binary search over the sorted map, then the nearer of the two
 * neighbours by their f32 midpoint (x on a midpoint takes the pivot) */
static unsigned dquantize(const float *code, float x)
{
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255)
        upper = code[upper_pivot];
    if (lower_pivot == 0)
        lower = code[lower_pivot];
    if (x > val)
        return x > (upper + val) * 0.5f ? (unsigned)upper_pivot : (unsigned)pivot;
    return x < (lower + val) * 0.5f ? (unsigned)lower_pivot : (unsigned)pivot;
}

void lm_bnb_double_quant(const float *amax, uint64_t n, float *out)
{
    float map[256];
    lm_bnb_dynamic_map(map);
    double sum = 0.0, c = 0.0; /* Neumaier: the mean of the f32 maxima, rounded once to f32 */
    for (uint64_t i = 0; i < n; i++) {
        const double t = sum + amax[i];
        c += fabs(sum) >= fabs((double)amax[i]) ? (sum - t) + amax[i] : ((double)amax[i] - t) + sum;
        sum = t;
    }
    const float offset = n ? (float)((sum + c) / (double)n) : 0.0f;
    for (uint64_t b0 = 0; b0 < n; b0 += 256) {
        const uint64_t m = b0 + 256 < n ? 256 : n - b0;
        float a2 = -INFINITY;
        for (uint64_t i = 0; i < m; i++) /* _absmax -= offset (f32), then quantize_blockwise's amax */
            a2 = fmaxf(a2, fabsf(amax[b0 + i] - offset));
        const float inv = 1.0f / a2;
        for (uint64_t i = 0; i < m; i++) /* dequantize_blockwise, then absmax += offset (f32) */
            out[b0 + i] = map[dquantize(map, (amax[b0 + i] - offset) * inv)] * a2 + offset;
    }
}
