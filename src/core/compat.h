/* SPDX-License-Identifier: MIT */
/* compat.h : portability macros only.  On-disk integers are little-endian; read them with
 * lm_load_le64() (memcpy plus a swap on big-endian), never by casting file bytes. */
#ifndef LM_COMPAT_H
#define LM_COMPAT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint64_t lm_load_le64(const void *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void lm_store_le64(void *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, sizeof v);
}

static inline uint32_t lm_load_le32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint16_t lm_load_le16(const void *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap16(v);
#endif
    return v;
}

/* a * b into *out; returns 1 on overflow */
static inline int lm_mul_overflow_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}

static inline int lm_add_overflow_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_add_overflow(a, b, out);
}

#define LM_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Makes room for one more element in a growable array (*arr, with *cap slots, n used):
 * doubles the capacity (first: `initial`) when full.  @return 0, or -1 when out of memory
 * (the array is left as it was). */
static inline int lm_grow(void **arr, size_t *cap, size_t n, size_t elem_bytes, size_t initial)
{
    if (n < *cap)
        return 0;
    size_t new_cap = *cap ? *cap * 2 : initial;
    void *p = realloc(*arr, new_cap * elem_bytes);
    if (p == NULL)
        return -1;
    *arr = p;
    *cap = new_cap;
    return 0;
}

#endif
