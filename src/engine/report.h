/* report.h : what a merge says about itself: the plan text, the JSON report, the description
 * of an adapter (inspect).  Builds text from the plan and the executor's statistics; prints
 * nothing (the CLI does). */
#ifndef LM_REPORT_H
#define LM_REPORT_H

#include "adapter_load.h"
#include "lora_merge.h"
#include "plan.h"

typedef struct lm_report_impl {
    lm_merge_report pub;
    char **notes;
    char *plan_text;
    char *json;
    uint64_t *recomputed; /* [plan->n], filled by the executor (exec.h); freed with the report */
} lm_report_impl;

/*! lm_report_build() : plan text and the JSON tree (kept in pub.json as a cJSON tree until
 *  lm_report_finish_json() turns it into text). */
lm_code lm_report_build(lm_report_impl *ri, const lm_merge_job *job, lm_adapter *const *ads,
                        const lm_plan *p, lm_err *err);
/*! lm_report_add_exactness() : per changed tensor of the JSON tree, "exact" (every element the
 *  exact value rounded once) and, after a real run (ran), "recomputed" (its elements recomputed
 *  in f64), from ri->recomputed. */
void lm_report_add_exactness(lm_report_impl *ri, const lm_plan *p, int exactness_off, int ran);
/*! lm_report_finish_json() : adds the summary and notes, prints the tree into ri->json. */
lm_code lm_report_finish_json(lm_report_impl *ri, lm_err *err);
/*! lm_report_drop_tree() : frees the JSON tree of a report that will not be finished. */
void lm_report_drop_tree(lm_report_impl *ri);

#endif
