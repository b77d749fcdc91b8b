/* SPDX-License-Identifier: MIT */
/* quant.h : quantized checkpoints, the format side.  What config.json's quantization_config says
 * (the scheme), and the codecs: every code of a format to its exact f32 value, and f32 back to
 * codes with the format's own rounding and saturation.  Knows nothing of plans or adapters. */
#ifndef LM_QUANT_H
#define LM_QUANT_H

#include "lm_kernels.h"
#include "lora_merge.h"

#include <stddef.h>
#include <stdint.h>

typedef enum {
    LM_Q_NONE = 0,   /* no quantization_config */
    LM_Q_FP8_BLOCK,  /* quant_method "fp8": F8_E4M3 weight, weight_scale_inv per block */
    LM_Q_CT_FP8,     /* compressed-tensors float-quantized: F8_E4M3 weight, weight_scale (tensor/channel/group/block) */
    LM_Q_CT_NVFP4,   /* compressed-tensors nvfp4-pack-quantized: weight_packed, weight_scale, weight_global_scale */
    LM_Q_MO_NVFP4,   /* ModelOpt NVFP4 (hf_quant_config.json): weight U8, weight_scale, weight_scale_2 */
    LM_Q_BNB4,       /* bitsandbytes load_in_4bit: packed NF4/FP4 codes, absmax per 64 (quant_bnb.h) */
    LM_Q_BNB8,       /* bitsandbytes load_in_8bit: I8 weight, SCB per row */
    LM_Q_MXFP4,      /* quant_method "mxfp4" (gpt-oss): P_blocks U8 (E2M1 pairs), P_scales U8 (E8M0) per 32 */
    LM_Q_OTHER,      /* a method lora-merge knows but does not dequantize (the tensors decide) */
} lm_qformat;

/* how a modules_to_not_convert / ignore entry names modules (of a tensor "<module>.<param>"),
 * each library's own rule */
typedef enum {
    LM_QSKIP_HF = 0, /* transformers' should_convert_module: re.match(entry, module) or module.endswith(entry) */
    LM_QSKIP_CT,     /* compressed-tensors' match_name: "re:P" is re.match(P, module), else module == entry */
    LM_QSKIP_GLOB,   /* ModelOpt's exclude_modules (as vLLM reads them): fnmatch(module, entry) */
    LM_QSKIP_EXACT,  /* vLLM's ignored_layers: module == entry */
} lm_qskip_rule;

typedef struct lm_qscheme {
    lm_qformat fmt;
    char method[32];            /* quant_method as written ("" when absent) */
    uint64_t block_rows, block_cols; /* weight_block_size (FP8 block); compressed-tensors block_structure */
    char ct_strategy[16];       /* compressed-tensors: the float weights' strategy ("" when not given) */
    uint64_t group_size;        /* compressed-tensors group / tensor_group weights; ModelOpt group_size */
    int asymmetric;             /* compressed-tensors: the float weights are not symmetric (refused) */
    char **skip;                /* owned: modules_to_not_convert / ignore / llm_int8_skip_modules entries */
    unsigned char *skip_rule;   /* owned: each entry's lm_qskip_rule */
    lm_dtype torch_dtype;       /* config.json's torch_dtype (or dtype) when F16, BF16 or F32, else
                                   LM_DT_BOOL: the dtype bitsandbytes weights dequantize to */
    char bnb_quant_type[8];     /* bnb_4bit_quant_type ("nf4", "fp4"), "" when absent */
    int bnb_double_quant;       /* bnb_4bit_use_double_quant */
    size_t n_skip;
} lm_qscheme;

/*! lm_qscheme_parse() : the quantization_config member of config.json text[0..n) (absent:
 *  fmt LM_Q_NONE).  @return LM_OK, or LM_E_UNSUPPORTED naming an unknown quant_method,
 *  LM_E_FORMAT for a malformed weight_block_size. */
lm_code lm_qscheme_parse(const char *text, size_t n, lm_qscheme *s, lm_err *err);
void lm_qscheme_free(lm_qscheme *s);
/*! lm_qscheme_parse_hf_quant() : ModelOpt's hf_quant_config.json text[0..n) ("quantization":
 *  quant_algo, group_size, exclude_modules).  @return LM_OK, or LM_E_FORMAT (not that object) */
lm_code lm_qscheme_parse_hf_quant(const char *text, size_t n, lm_qscheme *s, lm_err *err);
/*! lm_qscheme_add_skip() : appends entry (copied) with its rule.  @return LM_OK or LM_E_NOMEM */
lm_code lm_qscheme_add_skip(lm_qscheme *s, const char *entry, lm_qskip_rule rule, lm_err *err);

/* ---- scale tensors: F32, BF16, F16, F8_E4M3, or U8 holding E8M0 (MXFP4) ---- */
/*! lm_q_scales_to_f32() : n scales of dtype dt (bytes src, any alignment) to f32, exactly */
void lm_q_scales_to_f32(lm_dtype dt, const void *src, size_t n, float *dst);
/*! lm_q_scales_from_f32() : n f32 scales to dtype dt, rounded to nearest even (F8_E4M3
 *  saturating to +-448) */
void lm_q_scales_from_f32(lm_dtype dt, const float *src, size_t n, void *dst);
/*! lm_q_round_to() : x rounded to dtype dt and back (the value lm_q_scales_from_f32() stores) */
float lm_q_round_to(lm_dtype dt, float x);
/*! lm_q_scale_dtype_ok() : 1 when dt is a scale dtype these functions read */
int lm_q_scale_dtype_ok(lm_dtype dt);

/* ---- FP8 E4M3FN (no infinities; 0x7F/0xFF NaN; max finite 448) ---- */
/*! lm_fp8_e4m3_value() : the code's value (exact; NaN for 0x7F/0xFF) */
float lm_fp8_e4m3_value(uint8_t c);
/*! lm_f32_to_fp8_e4m3() : round to nearest even, saturating to +-448 (torch's
 *  x.clamp(-448, 448).to(float8_e4m3fn)); NaN -> 0x7F with the sign kept */
uint8_t lm_f32_to_fp8_e4m3(float x);

/*! lm_fp8_block_dequant() : rows [0, nr) x cols of codes q (row stride cols) -> f32,
 *  each element times the scale of its block: scale[(r / br) * scols + c / bc] */
void lm_fp8_block_dequant(const uint8_t *q, const float *scale, uint64_t scols, uint64_t br, uint64_t bc,
                          uint64_t nr, uint64_t cols, float *dst);

/* what requantizing a tile did (summed into the tensor's numbers) */
typedef struct lm_qstats {
    uint64_t n_changed;     /* codes (or their block's scale) different from the base's */
    uint64_t n_blocks, n_blocks_kept; /* blocks, and blocks whose codes and scale were kept */
    double err_max, err_sum; /* |dequant(requant(x)) - x| / amax of its block */
    uint64_t n_err;
    double d2, e2;          /* sums of (x - base)^2 and (dequant(requant(x)) - x)^2, changed blocks */
    uint64_t n_nonfinite_blocks; /* block FP8: blocks holding inf or NaN (their amax is not finite) */
    uint64_t n_exact;            /* block FP8, certified fused tiles: elements made exact */
} lm_qstats;

/*! lm_fp8_block_requant() :
 *  The merged tile x (nr rows of cols) back to codes and one scale per block, with the rule of
 *  transformers' FineGrainedFP8 quantizer: s = 448 / amax(|block|), q = fp8(clamp(x * s)),
 *  scale_inv = 1 / s.  A block whose merged values all equal the base's dequantized values
 *  (base codes q0, scales scale0) keeps its codes and scale, so an unchanged tensor gives
 *  identical bytes; a block of zeros keeps its scale.  out_scale: the tile's block rows.  Every
 *  value is seen by the amax: st->n_nonfinite_blocks counts the blocks that are not finite. */
void lm_fp8_block_requant(const float *x, const uint8_t *q0, const float *scale0, uint64_t scols, uint64_t br,
                          uint64_t bc, uint64_t nr, uint64_t cols, uint8_t *q, float *out_scale, lm_qstats *st);

/* the same one block at a time (block FP8's fused tiles, exec_quant.c): a block of h x w
 * elements, row stride cols, with the base's scale s */
/*! lm_fp8_dequant_block() : codes q -> dst, each code's value times s (lm_fp8_block_dequant()'s
 *  values), and the same values into base (row stride w) */
void lm_fp8_dequant_block(const uint8_t *q, float s, uint64_t h, uint64_t w, uint64_t cols, float *dst, float *base);
/*! lm_fp8_requant_block() : one block of lm_fp8_block_requant(): merged x, the base's values base
 *  (row stride w, lm_fp8_dequant_block()'s) and codes q0 -> codes q and the block's scale
 *  *out_scale; st as lm_fp8_block_requant() sums it (blocks in the same order: the same sums) */
void lm_fp8_requant_block(const float *x, const float *base, const uint8_t *q0, float s, uint64_t h, uint64_t w,
                          uint64_t cols, uint8_t *q, float *out_scale, lm_qstats *st);

/* the exact merged value of element (row, col) of a tensor rounded once to f32, w its base value */
typedef float (*lm_fp8_exact_fn)(void *ctx, uint64_t row, uint64_t col, float w);

/* lm_fp8_merge_block()'s certification (the proof in quant.c): the block's element (i, j) is
 * element (row0 + i, col0 + j) of its tensor */
typedef struct lm_fp8_bound {
    const float *erow; /* h: row i's kernel values x and exact values X (RN32) have
                          |X - x| <= erow[i] + 2^-21 |x|; 0: the row is outside the term (x exact) */
    lm_fp8_exact_fn exact;
    void *ctx;
    uint64_t row0, col0;
    uint32_t *flag;   /* scratch: 2 h w */
    uint64_t n_exact; /* elements computed by exact(), added to */
} lm_fp8_bound;

/*! lm_fp8_merge_block() : lm_fp8_dequant_block(), one low-rank term (gemm_rows' chains, rows
 *  term->r_lo .. r_hi of the block) and lm_fp8_requant_block() in two passes of k's kernels
 *  (k->fp8_merge, k->fp8_encode, non-NULL; lm_kernels.h): the same codes, scale, numbers and
 *  merged values x (h x w, row stride ldx, the caller's scratch).  bd not NULL: the codes, scale
 *  and kept block are the rule's on the exact values X (bd->exact() for the few elements whose
 *  result x's bound does not settle it); the numbers (err_*, d2, e2) stay x's. */
void lm_fp8_merge_block(const lm_kernels *k, const uint8_t *q0, float s0, uint64_t h, uint64_t w, uint64_t cols,
                        const lm_fp8_term *term, float *x, uint64_t ldx, uint8_t *q, float *out_scale, lm_qstats *st,
                        lm_fp8_bound *bd);

/* ---- compressed-tensors and ModelOpt (quant_ct.c) ---- */
/*! lm_ct_fp8_requant() :
 *  As lm_fp8_block_requant() (blocks of br x bc, one f32 scale each, unchanged blocks keep codes
 *  and scale), with compressed-tensors' rule (calculate_qparams + quantize): scale = amax / 448
 *  rounded to the scale dtype sdt (0 -> that dtype's eps), q = fp8(clamp(x / scale, +-448)).
 *  tamax >= 0: a per-tensor scale, the merged tensor's amax (the tile holds some of its rows;
 *  unchanged rows keep their bytes when the scale stays). */
void lm_ct_fp8_requant(const float *x, const uint8_t *q0, const float *scale0, uint64_t scols, uint64_t br,
                       uint64_t bc, uint64_t nr, uint64_t cols, lm_dtype sdt, float tamax, uint8_t *q,
                       float *out_scale, lm_qstats *st);

/* ---- NVFP4: E2M1 codes (4 bits, two a byte, the even element in the low nibble) times an FP8
 * E4M3 scale per group of columns, with a per-tensor second scale g.  compressed-tensors
 * (nvfp4-pack-quantized): value = e2m1 x (scale / g), g = weight_global_scale; ModelOpt:
 * value = e2m1 x (scale x g), g = weight_scale_2 (the two libraries' directions are opposite).
 * Both products are f32 operations in the libraries' order (forward.py _dequantize;
 * NVFP4QTensor.dequantize). */
/*! lm_e2m1_value() : the value of code c (0..15): 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives */
float lm_e2m1_value(unsigned c);
/*! lm_f32_to_e2m1() : nearest code, ties to the even code, saturating at +-6 (the libraries'
 *  thresholds .25 .75 1.25 1.75 2.5 3.5 5); the sign from x's sign bit */
unsigned lm_f32_to_e2m1(float x);
/*! lm_nvfp4_dequant() : nr rows of cols values from packed codes q (cols / 2 bytes a row) and
 *  group scales s (f32 values of the FP8 scales, cols / gsz a row); modelopt selects the direction */
void lm_nvfp4_dequant(const uint8_t *q, const float *s, float g, int modelopt, uint64_t gsz, uint64_t nr,
                      uint64_t cols, float *dst);
/*! lm_nvfp4_requant() :
 *  nr merged rows x of a tensor whose merged amax is tamax back to packed codes q, group
 *  scales out_s (f32 values of FP8 codes) and the second scale *out_g.  The second scale g0 is
 *  kept when the merged amax still fits it (every group scale representable in FP8), so groups
 *  whose values are unchanged keep their codes and scale; otherwise it is recomputed by the
 *  library's rule (compressed-tensors 448 x 6 / amax, ModelOpt amax / (6 x 448)) and every group
 *  requantized.  A changed group: compressed-tensors s = fp8(amax / 6 x g) (0 -> 0.125), codes
 *  e2m1(x / (s / g)); ModelOpt s = fp8(max(amax / (6 g), 2^-9)) (0 -> 1), codes e2m1(x / (s g)). */
void lm_nvfp4_requant(const float *x, const uint8_t *q0, const float *s0, float g0, int modelopt, uint64_t gsz,
                      float tamax, uint64_t nr, uint64_t cols, uint8_t *q, float *out_s, float *out_g,
                      lm_qstats *st);

#endif
