/* SPDX-License-Identifier: MIT */
/* lm_xxh128.h : XXH3-128 (xxHash, header-only: XXH_INLINE_ALL in lm_xxh128.c, so the binary needs
 * no libxxhash at run time), streaming.  The shard workers' sidecars record it for each shard: a
 * 128-bit integrity check against truncation and corruption, NOT a cryptographic digest (anyone
 * who can rewrite a shard can rewrite its sidecar too).  Chosen over SHA-256 for its cost: SHA-256
 * is bound by the CPU's SHA unit (~1.7 GB/s one message, ~3.1 GB/s four interleaved with SHA-NI
 * here, no faster with AVX-512 lanes), while XXH3 runs at memory speed.  The digest is written as
 * `xxhsum -H2` does (XXH128_canonical_t: the high 64 bits first, big-endian), 32 hex digits. */
#ifndef LM_XXH128_H
#define LM_XXH128_H

#include <stddef.h>

typedef struct lm_xxh128 lm_xxh128;

/* @return a state at the start of a message, or NULL when out of memory */
lm_xxh128 *lm_xxh128_new(void);
void lm_xxh128_update(lm_xxh128 *h, const void *p, size_t n);
/* the digest of what was given so far: 32 lower-case hex digits and a NUL */
void lm_xxh128_hex(const lm_xxh128 *h, char hex[33]);
void lm_xxh128_free(lm_xxh128 *h); /* NULL: no-op */
/* the digest of one buffer (tests, benches) */
void lm_xxh128_of(const void *p, size_t n, char hex[33]);

#endif
