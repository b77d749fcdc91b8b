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
} lm_tensor_stats;

#endif
