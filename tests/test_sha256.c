/* SPDX-License-Identifier: MIT */
/* test_sha256.c : src/core/lm_sha256.h on every path this CPU has (SHA-NI, portable C): SHA-256
 * against OpenSSL's, and sha256x4 against its definition computed independently
 * (th_sha256x4_ref: the lanes gathered by the test and hashed by OpenSSL), for lengths around
 * every block and group boundary, fed in pieces of assorted sizes; the definition itself against
 * Python's hashlib when /usr/bin/python3 is there. */
#include "th.h"

#include "lm_sha256.h"

#include <criterion/criterion.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* the pieces: sizes 1, 2, 5, ... up to ~70 KB, then again (so that the pending group is entered
 * and left at every offset) */
static void x4_pieces(const uint8_t *d, size_t n, char hex[65])
{
    lm_sha256x4_ctx c;
    lm_sha256x4_init(&c);
    size_t off = 0, step = 1;
    while (off < n) {
        size_t m = step < n - off ? step : n - off;
        lm_sha256x4_update(&c, d + off, m);
        off += m;
        step = step * 3 + 2;
        if (step > 70000)
            step = 1;
    }
    uint8_t md[32];
    lm_sha256x4_final(&c, md);
    lm_sha256_hex(md, hex);
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
        char got[65], ref[65], whole[65];
        th_sha256x4_ref(d, n, ref);
        x4_pieces(d, n, got);
        cr_assert_str_eq(got, ref, "sha256x4 (%s) of %zu bytes in pieces", lm_sha256_variant(), n);
        lm_sha256x4_ctx c;
        lm_sha256x4_init(&c);
        lm_sha256x4_update(&c, d, n);
        uint8_t md[32], om[32];
        lm_sha256x4_final(&c, md);
        lm_sha256_hex(md, whole);
        cr_assert_str_eq(whole, ref, "sha256x4 (%s) of %zu bytes at once", lm_sha256_variant(), n);
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

/* sha256x4's definition (lm_sha256.h) in Python against the C reference th_sha256x4_ref */
Test(sha256, x4_definition_in_python)
{
    if (access("/usr/bin/python3", X_OK) != 0)
        cr_skip_test("no /usr/bin/python3");
    char *dir = th_tmpdir(), path[1200];
    snprintf(path, sizeof path, "%s/d.bin", dir);
    const size_t n = 5000;
    uint8_t *d = sha_data(n);
    cr_assert_eq(th_write_file(path, d, n), 0);
    char cmd[1600], ref[65];
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 -c 'import hashlib,sys; d=open(sys.argv[1],\"rb\").read(); "
             "lanes=[b\"\".join(d[i:i+64] for i in range(64*j,len(d),256)) for j in range(4)]; "
             "print(hashlib.sha256(b\"\".join(hashlib.sha256(l).digest() for l in lanes)).hexdigest())' %s",
             path);
    th_run_result r = th_sh(cmd);
    th_sha256x4_ref(d, n, ref);
    cr_assert(r.status == 0 && strncmp(r.out, ref, 64) == 0, "python %s, C %s", r.out, ref);
    th_run_free(&r);
    free(d);
    th_rmrf(dir);
    free(dir);
}
