/* SPDX-License-Identifier: MIT */
/* lm_sha256.h : SHA-256 (FIPS 180-4): the adapters' and the report's file hashes.  One message is
 * a chain: on x86 with SHA-NI it runs at the latency of sha256rnds2 (~1.7 GB/s here, what OpenSSL
 * reaches too).  Paths: SHA-NI (x86, checked with cpuid at run time) or portable C; the digests
 * are the same on every path (tests: against OpenSSL, every path this CPU has).  The shard
 * sidecars use XXH3-128 instead (lm_xxh128.h). */
#ifndef LM_SHA256_H
#define LM_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];
    uint64_t n;      /* bytes so far */
    uint8_t buf[64]; /* the partial block */
    size_t nb;       /* bytes in buf */
} lm_sha256_ctx;

void lm_sha256_init(lm_sha256_ctx *c);
void lm_sha256_update(lm_sha256_ctx *c, const void *p, size_t n);
void lm_sha256_final(lm_sha256_ctx *c, uint8_t out[32]);

/*! lm_sha256_hex() : the 64 lower-case hex digits of a digest, and a NUL */
void lm_sha256_hex(const uint8_t md[32], char hex[65]);

/*! lm_sha256_variant() : "shani" or "c", the path used.  lm_sha256_force_portable() (tests,
 *  benches): 1 the portable C, 0 the best the CPU has.  Not thread-safe: set it before hashing. */
const char *lm_sha256_variant(void);
void lm_sha256_force_portable(int on);

#endif
