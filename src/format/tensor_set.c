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
    free(ts->slots);
    for (size_t i = 0; i < ts->n_owned; i++)
        free(ts->owned[i]);
    free(ts->owned);
    lm_st_close(ts->st);
    free(ts->source_path);
    free(ts);
}

static size_t name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return (size_t)(h ^ (h >> 29));
}

#define SLOT_GONE SIZE_MAX

/* the slot holding name, or the first free one on its probe sequence when it is absent
 * (slots[] must have a free slot: n_slots > n) */
static size_t slot_of(const lm_tensor_set *ts, const char *name, int *found)
{
    size_t mask = ts->n_slots - 1, i = name_hash(name) & mask, free_at = SIZE_MAX;
    for (;; i = (i + 1) & mask) {
        size_t v = ts->slots[i];
        if (v == 0) {
            *found = 0;
            return free_at != SIZE_MAX ? free_at : i;
        }
        if (v == SLOT_GONE) {
            if (free_at == SIZE_MAX)
                free_at = i;
        } else if (strcmp(ts->t[v - 1].name, name) == 0) {
            *found = 1;
            return i;
        }
    }
}

/* room for one more name: names and removed entries fill at most half the slots (so a probe
 * always ends on an empty one); a rebuild drops the removed entries */
static int index_reserve(lm_tensor_set *ts)
{
    if (ts->n_slots != 0 && 2 * (ts->n + ts->n_gone + 1) <= ts->n_slots)
        return 0;
    size_t want = 64;
    while (want < 4 * (ts->n + 1))
        want *= 2;
    size_t *slots = calloc(want, sizeof *slots);
    if (slots == NULL)
        return -1;
    free(ts->slots);
    ts->slots = slots;
    ts->n_slots = want;
    ts->n_gone = 0;
    for (size_t k = 0; k < ts->n; k++) {
        int found;
        ts->slots[slot_of(ts, ts->t[k].name, &found)] = k + 1;
    }
    return 0;
}

const lm_ts_tensor *lm_ts_find(const lm_tensor_set *ts, const char *name)
{
    if (ts->n == 0 || ts->n_slots == 0)
        return NULL;
    int found;
    size_t i = slot_of(ts, name, &found);
    return found ? &ts->t[ts->slots[i] - 1] : NULL;
}

lm_code lm_ts_rename(lm_tensor_set *ts, size_t i, char *new_name, lm_err *err)
{
    if (index_reserve(ts) != 0) {
        free(new_name);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    int found;
    size_t s = slot_of(ts, ts->t[i].name, &found);
    if (found) {
        ts->slots[s] = SLOT_GONE;
        ts->n_gone++;
    }
    free(ts->t[i].name);
    ts->t[i].name = new_name;
    ts->slots[slot_of(ts, new_name, &found)] = i + 1;
    return LM_OK;
}

lm_code lm_ts_add(lm_tensor_set *ts, const char *name, lm_dtype dtype, size_t n_dims,
                  const uint64_t *shape, const void *data, int take_ownership, lm_err *err)
{
    if (n_dims > LM_TS_MAX_DIMS)
        return lm_fail(err, LM_E_UNSUPPORTED, "TooManyDims", "tensor '%s' has %zu dimensions (at most %d)",
                       name, n_dims, LM_TS_MAX_DIMS);
    if (lm_ts_find(ts, name) != NULL)
        return lm_fail(err, LM_E_FORMAT, "DuplicateKey", "tensor '%s' appears twice", name);
    if (index_reserve(ts) != 0)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
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
    t->file = t->file_backed ? ts->st : NULL;
    t->data = data;
    int found;
    ts->slots[slot_of(ts, t->name, &found)] = ts->n + 1;
    ts->n++;
    return LM_OK;
}

int lm_ts_read_bytes(const lm_ts_tensor *t, uint64_t off, void *dst, size_t n)
{
    if (!t->file_backed || off > t->n_bytes || n > t->n_bytes - off)
        return -1;
    return lm_st_snapshot_read(t->file, (const uint8_t *)t->data + off, dst, n);
}

void lm_ts_drop_pages(const lm_ts_tensor *t)
{
    if (t != NULL && t->file_backed && !t->shared)
        lm_drop_mapped_pages(t->data, t->n_bytes);
}
