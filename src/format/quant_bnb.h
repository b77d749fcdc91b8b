/* SPDX-License-Identifier: MIT */
/* quant_bnb.h : bitsandbytes' quantized weights, the format side (read from bitsandbytes'
 * functional.py and csrc/kernels.cu).
 *
 * 4-bit (Linear4bit / Params4bit, saved by transformers): the weight W [out, in] flattened, in
 * blocks of `blocksize` (64) consecutive elements; element e is code[q_e] * absmax[e / blocksize]
 * computed in f32, code the NF4 or FP4 table.  Two codes a byte, the first element in the high
 * nibble; an odd count pads the last low nibble.  The absmax are F32, or (double quantization,
 * bnb_4bit_use_double_quant) U8 codes of bitsandbytes' 8-bit dynamic map over blocks of
 * nested_blocksize (256): absmax[i] = nested_quant_map[q_i] * nested_absmax[i / 256] +
 * nested_offset, each step rounded to f32 as torch does.
 *
 * 8-bit (Linear8bitLt / Int8Params): weight I8 [out, in], SCB F32 [out];
 * value = (q * SCB[row]) * 7.874015718698502e-3f (int8_vectorwise_dequant; both products f32).
 *
 * Knows nothing of plans or files. */
#ifndef LM_QUANT_BNB_H
#define LM_QUANT_BNB_H

#include <stddef.h>
#include <stdint.h>

/* the 16 values of bitsandbytes' NF4 and FP4 codes (kernels.cu nf4/fp4_dequantization_lut,
 * the FP4 sign bit 0b1000 applied), exactly as f32 */
extern const float LM_BNB_NF4[16];
extern const float LM_BNB_FP4[16];

/* the constant int8_vectorwise_dequant multiplies by, as f32 */
#define LM_BNB_INT8_SCALE 7.874015718698502e-3f

/*! lm_bnb4_dequant() : n elements from element e0 of the flattened tensor: `packed` is the byte
 *  that holds element e0 (byte e0 / 2 of the tensor), absmax the tensor's (f32) block maxima,
 *  code LM_BNB_NF4 or LM_BNB_FP4 */
void lm_bnb4_dequant(const float *code, const uint8_t *packed, const float *absmax, uint64_t blocksize,
                     uint64_t e0, uint64_t n, float *dst);

/*! lm_bnb_nested_absmax() : the n f32 absmax of a double-quantized tensor from their U8 codes q,
 *  the 256-entry nested map, the nested absmax (one per nested_blocksize codes) and the offset:
 *  fl(fl(map[q] * absmax2) + offset) */
void lm_bnb_nested_absmax(const uint8_t *q, uint64_t n, const float *map, const float *absmax2, uint64_t bs2,
                          float offset, float *out);

/*! lm_bnb_int8_dequant() : nr rows of cols I8 codes, row r scaled by scb[r] */
void lm_bnb_int8_dequant(const int8_t *q, const float *scb, uint64_t nr, uint64_t cols, float *dst);

/*! lm_bnb_nf4_code() : the NF4 code bitsandbytes' CUDA quantizer (dQuantizeNF4) gives to the
 *  scaled value x: its decision tree of f32 thresholds, each compared with `>` (a value on a
 *  threshold takes the lower code; NaN takes code 0) */
unsigned lm_bnb_nf4_code(float x);

/*! lm_bnb_nf4_roundtrip() : what QLoRA's forward sees for x[0..n) (n consecutive elements of the
 *  flattened tensor, starting on a block boundary): per block of `blocksize`, amax = max |x|,
 *  codes of x * (1.0f / amax) (kQuantizeBlockwise), then code * absmax in f32 (kDequantizeBlockwise),
 *  rounded to nearest even to the dtype bitsandbytes returns (quant_state.dtype, the weight's:
 *  round_to 0 f32, 1 bf16, 2 f16).  absmax: amax itself (absmax_dq NULL), or absmax_dq[k] for the
 *  k-th block (double quantization: lm_bnb_double_quant()).  An all-zero block gives -0 (1/0 =
 *  inf, 0 * inf = NaN -> code 0 = -1.0, as the kernel does). */
void lm_bnb_nf4_roundtrip(float *x, uint64_t n, uint64_t blocksize, const float *absmax_dq, int round_to);

/*! lm_bnb_block_amax() : amax[k] = max |x| of the k-th block of `blocksize` of x[0..n) */
void lm_bnb_block_amax(const float *x, uint64_t n, uint64_t blocksize, float *amax);

/*! lm_bnb_dynamic_map() : create_dynamic_map(signed=True) (the 8-bit map double quantization
 *  uses) as f32: torch.linspace(0.1, 1, 2^i + 1) by the kernel's scalar formula, the means of
 *  neighbours, times f32(10^(i-6)), with 0 and 1, sorted.  torch's vectorized linspace rounds a
 *  few of the 256 values one ulp differently on some CPUs (the map saved with a checkpoint is
 *  what that machine computed). */
void lm_bnb_dynamic_map(float map[256]);

/*! lm_bnb_double_quant() : bitsandbytes' double quantization of a 4-bit weight's n block maxima
 *  (quantize_4bit with compress_statistics): offset = their mean (f32, rounded once; torch's
 *  reduction order may give an ulp more or less), amax - offset (f32) quantized with the dynamic
 *  map in blocks of 256 (kQuantizeBlockwise, dQuantize's binary search and midpoints), then
 *  what dequantize_4bit uses: map[q] * absmax2 + offset, each step f32, into out[0..n) (out may
 *  be amax) */
void lm_bnb_double_quant(const float *amax, uint64_t n, float *out);

#endif
