/* SPDX-License-Identifier: MIT */
/* tensor_set.c : see tensor_set.h. */
#include "tensor_set.h"

#include "compat.h"
#include "lm_error.h"
#include "st_reader.h"

#include <stdlib.h>
#include <string.h>

lm_tensor_set *lm_ts_create(const char *source_path)
{
    lm_tensor_set *ts = calloc(1, sizeof *ts);
    if (ts == NULL)
        return NULL;
    if (source_path != NULL && (ts->source_path = strdup(source_path)) == NULL) {
        free(ts);
        return NULL;
    }
    return ts;
}

void lm_ts_free(lm_tensor_set *ts)
{
    if (ts == NULL)
        return;
    for (size_t i = 0; i < ts->n; i++)
        free(ts->t[i].name);
    free(ts->t);
    for (size_t i = 0; i < ts->n_owned; i++)
        free(ts->owned[i]);
    free(ts->owned);
    lm_st_close(ts->st);
    free(ts->source_path);
    free(ts);
}

const lm_ts_tensor *lm_ts_find(const lm_tensor_set *ts, const char *name)
{
    for (size_t i = 0; i < ts->n; i++)
        if (strcmp(ts->t[i].name, name) == 0)
            return &ts->t[i];
    return NULL;
}

lm_code lm_ts_add(lm_tensor_set *ts, const char *name, lm_dtype dtype, size_t n_dims,
                  const uint64_t *shape, const void *data, int take_ownership, lm_err *err)
{
    if (n_dims > LM_TS_MAX_DIMS)
        return lm_fail(err, LM_E_UNSUPPORTED, "TooManyDims", "tensor '%s' has %zu dimensions (at most %d)",
                       name, n_dims, LM_TS_MAX_DIMS);
    if (lm_ts_find(ts, name) != NULL)
        return lm_fail(err, LM_E_FORMAT, "DuplicateKey", "tensor '%s' appears twice", name);
    uint64_t n_elems = 1, bits;
    for (size_t d = 0; d < n_dims; d++)
        if (lm_mul_overflow_u64(n_elems, shape[d], &n_elems))
            return lm_fail(err, LM_E_FORMAT, "ValidationOverflow", "tensor '%s': shape product overflows", name);
    if (lm_mul_overflow_u64(n_elems, lm_dtype_bits(dtype), &bits))
        return lm_fail(err, LM_E_FORMAT, "ValidationOverflow", "tensor '%s': byte size overflows", name);
    if (lm_grow((void **)&ts->t, &ts->cap, ts->n, sizeof *ts->t, 64) != 0)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if (take_ownership) {
        if (lm_grow((void **)&ts->owned, &ts->cap_owned, ts->n_owned, sizeof *ts->owned, 64) != 0)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        ts->owned[ts->n_owned++] = (void *)data;
    }
    lm_ts_tensor *t = &ts->t[ts->n];
    memset(t, 0, sizeof *t);
    if ((t->name = strdup(name)) == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    t->dtype = dtype;
    t->n_dims = n_dims;
    if (n_dims)
        memcpy(t->shape, shape, n_dims * sizeof *shape);
    t->n_elems = n_elems;
    t->n_bytes = bits / 8;
    t->file_backed = !take_ownership && lm_st_in_mapping(ts->st, data, t->n_bytes);
    t->data = data;
    ts->n++;
    return LM_OK;
}

void lm_ts_drop_pages(const lm_ts_tensor *t)
{
    if (t != NULL && t->file_backed)
        lm_drop_mapped_pages(t->data, t->n_bytes);
}
