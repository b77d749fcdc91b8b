/* tensor_stats.h : what the merge did to one output tensor, measured by the executor on the
 * values it writes (for the report and the no-op and non-finite checks). */
#ifndef LM_TENSOR_STATS_H
#define LM_TENSOR_STATS_H

#include <stdint.h>

typedef struct lm_tensor_stats {
    int valid;            /* 1 when the numbers below were measured */
    uint64_t n_elems;
    uint64_t n_changed;   /* elements whose written value differs from the base's */
    uint64_t n_nonfinite; /* elements written as inf or NaN */
    double delta_norm;    /* ||W_out - W_base|| (Frobenius, in double) */
    double base_norm;     /* ||W_base|| */
} lm_tensor_stats;

#endif
