/* SPDX-License-Identifier: MIT */
/* lycoris.h : LyCORIS's weight decomposition (dora_scale) on a LoRA / LoHa / LoKr module read
 * from a LyCORIS file (see lycoris.c for the rule). */
#ifndef LM_LYCORIS_H
#define LM_LYCORIS_H

#include "method.h"

/*! lm_lycoris_dora() :
 *  Plans LyCORIS's DoRA for module after its delta op `delta` on base tensor `base`: checks
 *  dora_scale `ds` against the base (its shape says the axis), sets delta->scale to `scale` (the
 *  module's alpha / r without the user's weight: LyCORIS puts the multiplier in the factor) and
 *  adds the NORM op.  Refused for a PEFT adapter (only another tool's file has dora_scale). */
lm_code lm_lycoris_dora(lm_plan_ctx *ctx, const char *module, long base, lm_op *delta, double scale,
                        const lm_ts_tensor *ds, lm_err *err);

#endif
