/* SPDX-License-Identifier: MIT */
/* convert_ref.c : the scalar reference kernels.  These define the semantics every SIMD variant
 * must reproduce bit for bit (the contract is spelled out in lm_kernels.h and implemented by the
 * single-value helpers there).  Plain C, no intrinsics, no reliance on _Float16, and no FMA:
 * the build uses -ffp-contract=off so s*x is rounded before the add, as in the SIMD code. */
#include "lm_kernels.h"

void lm_bf16_to_f32_ref(const uint16_t *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = lm_bf16_to_f32_1(src[i]);
}

void lm_f32_to_bf16_ref(const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = lm_f32_to_bf16_1(src[i]);
}

void lm_f16_to_f32_ref(const uint16_t *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = lm_f16_to_f32_1(src[i]);
}

void lm_f32_to_f16_ref(const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = lm_f32_to_f16_1(src[i]);
}

void lm_axpy_ref(float *acc, float s, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const float p = s * x[i]; /* rounded on its own: no fused multiply-add */
        const float r = acc[i] + p;
        acc[i] = (lm_f32_bits(r) & 0x7FFFFFFFu) > 0x7F800000u ? lm_f32_from_bits(LM_AXPY_NAN) : r;
    }
}

void lm_f64_to_f32_ref(const double *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = (float)src[i];
}

void lm_f32_to_f64_ref(const float *src, double *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = (double)src[i];
}
