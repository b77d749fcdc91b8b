/* SPDX-License-Identifier: MIT */
/* lm_xxh128.c : XXH3-128, streaming (lm_xxh128.h) */
#include "lm_xxh128.h"

#include <stdlib.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

struct lm_xxh128 {
    XXH3_state_t *s;
};

lm_xxh128 *lm_xxh128_new(void)
{
    lm_xxh128 *h = malloc(sizeof *h);
    if (h == NULL)
        return NULL;
    if ((h->s = XXH3_createState()) == NULL || XXH3_128bits_reset(h->s) != XXH_OK) {
        XXH3_freeState(h->s);
        free(h);
        return NULL;
    }
    return h;
}

void lm_xxh128_update(lm_xxh128 *h, const void *p, size_t n)
{
    if (n > 0)
        (void)XXH3_128bits_update(h->s, p, n);
}

static void to_hex(XXH128_hash_t v, char hex[33])
{
    static const char dig[] = "0123456789abcdef";
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, v);
    for (int i = 0; i < 16; i++) {
        hex[2 * i] = dig[c.digest[i] >> 4];
        hex[2 * i + 1] = dig[c.digest[i] & 15];
    }
    hex[32] = '\0';
}

void lm_xxh128_hex(const lm_xxh128 *h, char hex[33]) { to_hex(XXH3_128bits_digest(h->s), hex); }

void lm_xxh128_free(lm_xxh128 *h)
{
    if (h == NULL)
        return;
    XXH3_freeState(h->s);
    free(h);
}

void lm_xxh128_of(const void *p, size_t n, char hex[33]) { to_hex(XXH3_128bits(p, n), hex); }
