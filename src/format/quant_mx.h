/* SPDX-License-Identifier: MIT */
/* quant_mx.h : the MXFP4 codec (OCP Microscaling, as gpt-oss checkpoints store it with
 * quant_method "mxfp4").  A row of n values (n a multiple of 32) is n / 2 bytes of E2M1 codes,
 * element 2k in the low nibble of byte k and 2k + 1 in the high one (transformers'
 * convert_moe_packed_tensors), and n / 32 E8M0 scale bytes, one per group of 32 values:
 *     value = E2M1[code] * 2^(scale - 127),  E2M1 = {0, .5, 1, 1.5, 2, 3, 4, 6}, bit 3 the sign;
 *     scale 255 is NaN (the OCP spec; every value of its group is NaN).
 * Every (code, scale) has its exact f32 value, except that scale 254 with |E2M1| >= 2 exceeds the
 * f32 range and gives +-inf (as transformers' bf16 dequantization does). */
#ifndef LM_QUANT_MX_H
#define LM_QUANT_MX_H

#include "quant.h"

#include <stdint.h>

#define LM_MX_GROUP 32 /* values per scale */

/*! lm_e2m1_value() : the value of 4-bit code c (bit 3 the sign; 8 is -0) */
float lm_e2m1_value(unsigned c);
/*! lm_e8m0_value() : 2^(s - 127) (s = 0: 2^-127, a subnormal), NaN for 255 */
float lm_e8m0_value(uint8_t s);
/*! lm_e8m0_from_f32() : the byte of a scale value lm_e8m0_value() gives (NaN: 255) */
uint8_t lm_e8m0_from_f32(float v);
/*! lm_f32_to_e2m1() : q to the nearest E2M1 code, ties to the even code, |q| > 6, inf and NaN
 *  saturated to +-6, the sign kept (also for values that round to 0): the rounding of triton_kernels'
 *  downcast_to_mxfp_torch, which transformers' Mxfp4 quantizer calls */
unsigned lm_f32_to_e2m1(float q);
/*! lm_mx_scale_for() : the E8M0 scale the library gives a group whose largest magnitude is amax:
 *  amax / 6 rounded up to a power of two (DequantScaleRoundingMode.ROUND_UP, the default), the
 *  byte its biased exponent (0 for amax 0, 255 for inf) */
uint8_t lm_mx_scale_for(float amax);

/*! lm_mxfp4_dequant() : nr rows of cols values (cols % 32 == 0) from codes q (cols / 2 bytes a
 *  row) and scales s (cols / 32 a row, as their values: lm_e8m0_value() of the bytes) to f32 dst */
void lm_mxfp4_dequant(const uint8_t *q, const float *s, uint64_t nr, uint64_t cols, float *dst);

/*! lm_mxfp4_requant() :
 *  The merged rows x back to codes q and scales s, group by group, with the rule of transformers'
 *  quantize_to_mxfp4 (triton_kernels downcast_to_mxfp_torch, axis of the 32 values, ROUND_UP):
 *  the values rounded to bf16 first, scale = lm_mx_scale_for(amax), codes lm_f32_to_e2m1(x /
 *  2^(scale - 127)) (a zero scale byte: codes of x * 0).  Scales s0, s as their values.  A group whose merged values all equal
 *  the base's (codes q0, scales s0; NaN equal to NaN) keeps its bytes, so an unchanged tensor is
 *  written back identical.  st: the numbers of lm_qstats (err relative to the group's amax). */
void lm_mxfp4_requant(const float *x, const uint8_t *q0, const float *s0, uint64_t nr, uint64_t cols, uint8_t *q,
                      float *s, lm_qstats *st);

#endif
