/* SPDX-License-Identifier: MIT */
/* batch_file.c : lm_batch_jobs_read(): the JOBS.json of `lora-merge batch BASE JOBS.json`.  The
 * file is a JSON array with one entry per job; an entry is the job's command line after BASE, as
 * an array of strings (["--scale", "0.5", "lora-a", "out-a/"]), so that every job means exactly
 * what `lora-merge BASE <entry...>` means.  Nothing else is accepted. */
#include "lora_merge.h"

#include "adapter_config.h"
#include "lm_error.h"
#include "st_reader.h"

#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LM_JOBS_MAX_BYTES ((size_t)64 << 20) /* a jobs file is a list of command lines */

void lm_batch_jobs_free(char ***args, size_t n_jobs)
{
    for (size_t j = 0; args && j < n_jobs; j++) {
        for (size_t k = 0; args[j] && args[j][k]; k++)
            free(args[j][k]);
        free(args[j]);
    }
    free(args);
}

/* the jobs file, a regular file of at most 64 MiB (not waited on: a FIFO hung the batch) */
static char *read_text(const char *path, size_t *n, lm_err *err)
{
    int why;
    char *buf = lm_read_small_file(path, LM_JOBS_MAX_BYTES, n, &why, err);
    if (buf == NULL && why != LM_READ_ERROR)
        lm_fail(err, LM_E_USAGE, "Usage", "the jobs file must be a regular file of at most 64 MiB");
    if (buf == NULL)
        lm_err_set_path(err, path);
    return buf;
}

/* entry j: an array of non-empty strings into a NULL-terminated copy */
static lm_code job_args(const cJSON *e, size_t j, char ***out, lm_err *err)
{
    if (!cJSON_IsArray(e) || cJSON_GetArraySize(e) < 2)
        return lm_fail(err, LM_E_USAGE, "Usage", "job %zu: an entry is the job's arguments after BASE, an array of "
                       "strings such as [\"ADAPTER\", \"OUT\"] or [\"--dtype\", \"f16\", \"ADAPTER\", \"OUT\"]", j + 1);
    size_t n = (size_t)cJSON_GetArraySize(e), k = 0;
    char **a = calloc(n + 1, sizeof *a);
    if (a == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    *out = a;
    const cJSON *s;
    cJSON_ArrayForEach(s, e) {
        if (!cJSON_IsString(s) || s->valuestring[0] == '\0')
            return lm_fail(err, LM_E_USAGE, "Usage", "job %zu: argument %zu is not a non-empty string", j + 1, k + 1);
        if ((a[k++] = strdup(s->valuestring)) == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    return LM_OK;
}

lm_code lm_batch_jobs_read(const char *path, char ****args, size_t *n_jobs, lm_err *err)
{
    *args = NULL;
    *n_jobs = 0;
    size_t n_text = 0;
    char *text = read_text(path, &n_text, err);
    if (text == NULL)
        return err ? err->code : LM_E_IO;
    /* strict: cJSON alone stops after the first value, so `[[...]], [[...]]` was one job */
    lm_code rc = lm_json_strict(text, n_text, err);
    cJSON *root = rc == LM_OK ? cJSON_ParseWithLength(text, n_text) : NULL;
    free(text);
    if (rc == LM_OK && root == NULL)
        rc = lm_fail(err, LM_E_FORMAT, "InvalidJson", "the jobs file is not valid JSON");
    else if (rc == LM_OK && (!cJSON_IsArray(root) || cJSON_GetArraySize(root) == 0))
        rc = lm_fail(err, LM_E_USAGE, "Usage", "the jobs file must be a non-empty JSON array of jobs, each the "
                     "arguments after BASE: [[\"lora-a\", \"out-a/\"], [\"--scale\", \"0.5\", \"lora-b\", \"out-b/\"]]");
    size_t n = rc == LM_OK ? (size_t)cJSON_GetArraySize(root) : 0, j = 0;
    char ***a = n ? calloc(n, sizeof *a) : NULL;
    if (rc == LM_OK && a == NULL)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    const cJSON *e;
    if (rc == LM_OK)
        cJSON_ArrayForEach(e, root) {
            if ((rc = job_args(e, j, &a[j], err)) != LM_OK)
                break;
            j++;
        }
    cJSON_Delete(root);
    if (rc != LM_OK) {
        lm_err_set_path(err, path);
        lm_batch_jobs_free(a, n);
        return rc;
    }
    *args = a;
    *n_jobs = n;
    return LM_OK;
}
