/* SPDX-License-Identifier: MIT */
/* vera.h : what VeRA (vera.c) shares with PVeRA (pvera.c): the module's op after each type's own
 * checks, and the preparation of its scaled slices. */
#ifndef LM_VERA_H
#define LM_VERA_H

#include "method.h"

typedef struct {
    const lm_ts_tensor *A, *B, *lb, *ld; /* shared A [>= r, >= in], B [>= out, r]; lambdas [out], [>= r] */
} lm_vera_params;

/* plans the op W += (lambda_b * B[:out]) @ (lambda_d[:r] * A[:r, :in]) of module m */
lm_code lm_vera_add(lm_plan_ctx *ctx, const lm_module *m, const char *name, const lm_ts_tensor *A,
                    const lm_ts_tensor *B, const lm_ts_tensor *lb, const lm_ts_tensor *ld, uint64_t r, lm_err *err);
/* A' = lambda_d[:r] * A[:r, :in] ([rank, in]) and B' = lambda_b * B[:out, :] ([out, rank]): in f32 (a, b)
 * and exactly in f64 (a64, b64) */
lm_code lm_vera_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err);

#endif
