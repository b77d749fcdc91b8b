/* SPDX-License-Identifier: MIT */
/* tensor_stats.h : what the merge did to one output tensor, measured by the executor on the
 * values it writes (for the report and the no-op and non-finite checks). */
#ifndef LM_TENSOR_STATS_H
#define LM_TENSOR_STATS_H

#include <stdint.h>

typedef struct lm_tensor_stats {
    int valid;            /* 1 when the numbers below were measured */
    uint64_t n_elems;
    uint64_t n_changed;   /* elements whose written value differs from the base's (both in the
                             output dtype: a conversion alone changes nothing) */
    int has_norms;        /* the norms below were measured (they cost a pass in double) */
    double delta_norm;    /* ||W' - W|| over the values written (Frobenius, in double) */
    double base_norm;     /* ||W|| */
    /* a weight written back quantized: what requantization kept of the exact merged values x
     * (W the base's dequantized values, Q the values written) */
    int has_quant;
    uint64_t q_blocks, q_blocks_kept; /* blocks, and blocks left as they were (codes and scale) */
    double q_err_max, q_err_mean;     /* |Q - x| relative to the amax of its block */
    double q_delta_norm, q_err_norm;  /* ||x - W|| and ||Q - x|| over the changed blocks */
} lm_tensor_stats;

#endif
