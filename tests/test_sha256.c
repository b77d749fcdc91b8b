/* SPDX-License-Identifier: MIT */
/* test_sha256.c : src/core/lm_sha256.h on every path this CPU has (SHA-NI, portable C): SHA-256
 * against OpenSSL's for lengths around every block boundary, in two pieces; and lm_xxh128.h (the
 * shard sidecars' XXH3-128) streamed in pieces against the library's one-shot call. */
#include "th.h"

#include "lm_sha256.h"
#include "lm_xxh128.h"

#include <criterion/criterion.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

static uint8_t *sha_data(size_t n)
{
    uint8_t *d = malloc(n + 1);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d[i] = (uint8_t)(x >> 24);
    }
    return d;
}

static void check_lengths(void)
{
    static const size_t lens[] = {0,   1,   55,  56,   63,   64,   65,    127,    128,    191,    192,   255,
                                  256, 257, 300, 319,  320,  511,  512,   513,    1000,   4096,   65535, 65536,
                                  65537, 100003, 1 << 20, (1 << 20) + 77};
    const size_t max = (1 << 20) + 77;
    uint8_t *d = sha_data(max);
    for (size_t i = 0; i < sizeof lens / sizeof *lens; i++) {
        size_t n = lens[i];
        uint8_t md[32], om[32];
        /* plain SHA-256, in two pieces */
        lm_sha256_ctx s;
        lm_sha256_init(&s);
        lm_sha256_update(&s, d, n / 3);
        lm_sha256_update(&s, d + n / 3, n - n / 3);
        lm_sha256_final(&s, md);
        unsigned nm = 0;
        EVP_Digest(d, n, om, &nm, EVP_sha256(), NULL);
        cr_assert(memcmp(md, om, 32) == 0, "SHA-256 (%s) of %zu bytes differs from OpenSSL's", lm_sha256_variant(), n);
    }
    free(d);
}

Test(sha256, every_path_against_openssl)
{
    lm_sha256_force_portable(1);
    cr_assert_str_eq(lm_sha256_variant(), "c");
    check_lengths();
    lm_sha256_force_portable(0);
    if (strcmp(lm_sha256_variant(), "c") == 0)
        cr_log_warn("no SHA-NI on this CPU: the portable path only");
    else
        check_lengths();
}

/* lm_xxh128 (the shard sidecars' XXH3-128), streamed in pieces of assorted sizes, against the
 * library's one-shot call over the whole buffer; and the digest of no bytes as xxhsum -H2 prints
 * it (the byte order of the hex) */
Test(sha256, xxh128_in_pieces)
{
    static const size_t lens[] = {0, 1, 16, 17, 128, 129, 240, 241, 1024, 1025, 65536, 100003, (1 << 20) + 77};
    uint8_t *d = sha_data((1 << 20) + 77);
    for (size_t i = 0; i < sizeof lens / sizeof *lens; i++) {
        size_t n = lens[i], off = 0, step = 1;
        lm_xxh128 *h = lm_xxh128_new();
        cr_assert_not_null(h);
        while (off < n) {
            size_t m = step < n - off ? step : n - off;
            lm_xxh128_update(h, d + off, m);
            off += m;
            step = step * 3 + 2;
            if (step > 70000)
                step = 1;
        }
        char got[33], ref[33];
        lm_xxh128_hex(h, got);
        lm_xxh128_free(h);
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, XXH3_128bits(d, n));
        for (int k = 0; k < 16; k++)
            snprintf(ref + 2 * k, 3, "%02x", c.digest[k]);
        cr_assert_str_eq(got, ref, "XXH3-128 of %zu bytes in pieces", n);
        lm_xxh128_of(d, n, got);
        cr_assert_str_eq(got, ref, "XXH3-128 of %zu bytes at once", n);
        if (n == 0)
            cr_assert_str_eq(got, "99aa06d3014798d86001c324468d497f");
    }
    free(d);
}
