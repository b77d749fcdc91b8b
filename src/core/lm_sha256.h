/* SPDX-License-Identifier: MIT */
/* lm_sha256.h : SHA-256 (FIPS 180-4), and sha256x4: a hash of one file as four interleaved
 * SHA-256 messages, for the shard workers' sidecars.
 *
 * One SHA-256 message is a chain: on x86 with SHA-NI it runs at the latency of sha256rnds2
 * (~1.7 GB/s here, what OpenSSL reaches too).  Four independent messages interleaved in one
 * thread overlap those latencies (about 2.5x the bytes per second).  sha256x4 makes one file
 * four messages without buffering:
 *
 *   lane j (j = 0..3) = the file's 64-byte blocks i (the last one may be short) with i % 4 == j,
 *                       concatenated;
 *   sha256x4(file)    = SHA-256(SHA-256(lane 0) || SHA-256(lane 1) || SHA-256(lane 2) || SHA-256(lane 3))
 *
 * (in Python: lanes = [b"".join(d[i:i + 64] for i in range(64 * j, len(d), 256)) for j in range(4)];
 * hashlib.sha256(b"".join(hashlib.sha256(l).digest() for l in lanes)).hexdigest()).  Any write
 * of 256 bytes or more feeds all four lanes, from the writer's own buffer.  The file is determined
 * by its four lanes, so a collision of sha256x4 is a collision of SHA-256.
 *
 * Paths: SHA-NI (x86, checked with cpuid at run time) or portable C; the digests are the same on
 * every path (tests: against Python's hashlib, every path this CPU has). */
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

typedef struct {
    uint32_t h[4][8]; /* the lanes' states */
    uint64_t n;       /* bytes so far */
    uint8_t buf[256]; /* the partial group of four blocks */
    size_t nb;        /* bytes in buf */
} lm_sha256x4_ctx;

void lm_sha256x4_init(lm_sha256x4_ctx *c);
void lm_sha256x4_update(lm_sha256x4_ctx *c, const void *p, size_t n);
void lm_sha256x4_final(lm_sha256x4_ctx *c, uint8_t out[32]);

/*! lm_sha256_hex() : the 64 lower-case hex digits of a digest, and a NUL */
void lm_sha256_hex(const uint8_t md[32], char hex[65]);

/*! lm_sha256_variant() : "shani" or "c", the path used.  lm_sha256_force_portable() (tests,
 *  benches): 1 the portable C, 0 the best the CPU has.  Not thread-safe: set it before hashing. */
const char *lm_sha256_variant(void);
void lm_sha256_force_portable(int on);

#endif
