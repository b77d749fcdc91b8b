/* SPDX-License-Identifier: MIT */
/* ln_tuning.c : LN tuning (peft-merge.md §5.14): the adapter saves whole norm layers
 * ("<module>.ln_tuning_layers.weight"), which replace the base's (the planner drops the
 * ln_tuning_layers component and treats them as full tensors).  No parts of its own. */
#include "method.h"

const lm_method lm_method_ln_tuning = {
    .peft_type = "LN_TUNING",
    .flags = LM_M_UNIT_WEIGHT,
    .summary = "norm weights replaced",
};
