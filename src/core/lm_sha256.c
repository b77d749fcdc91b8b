/* SPDX-License-Identifier: MIT */
/* lm_sha256.c : SHA-256 (lm_sha256.h) */
#include "lm_sha256.h"

#include <stdio.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define LM_SHA_X86 1
#endif

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

/* ---- portable C ---------------------------------------------------------------------------- */
#define ROR(x, k) (((x) >> (k)) | ((x) << (32 - (k))))

static void blocks_c(uint32_t h[8], const uint8_t *p, size_t nblk)
{
    for (; nblk > 0; nblk--, p += 64) {
        uint32_t w[64];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
        for (int i = 16; i < 64; i++) {
            uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
            uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
        for (int i = 0; i < 64; i++) {
            uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
            uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            k = g;
            g = f;
            f = e;
            e = d + t1;
            d = c;
            c = b;
            b = a;
            a = t1 + t2;
        }
        h[0] += a;
        h[1] += b;
        h[2] += c;
        h[3] += d;
        h[4] += e;
        h[5] += f;
        h[6] += g;
        h[7] += k;
    }
}


/* ---- SHA-NI -------------------------------------------------------------------------------- */
#ifdef LM_SHA_X86
#define SHANI __attribute__((target("sha,sse4.1,ssse3")))

/* the state as the instructions want it: ABEF and CDGH */
SHANI static void shani_load(const uint32_t h[8], __m128i *s0, __m128i *s1)
{
    *s0 = _mm_set_epi32((int)h[0], (int)h[1], (int)h[4], (int)h[5]);
    *s1 = _mm_set_epi32((int)h[2], (int)h[3], (int)h[6], (int)h[7]);
}

SHANI static void shani_store(uint32_t h[8], __m128i s0, __m128i s1)
{
    uint32_t a[4], b[4];
    _mm_storeu_si128((__m128i *)a, s0);
    _mm_storeu_si128((__m128i *)b, s1);
    h[0] = a[3];
    h[1] = a[2];
    h[4] = a[1];
    h[5] = a[0];
    h[2] = b[3];
    h[3] = b[2];
    h[6] = b[1];
    h[7] = b[0];
}

/* four rounds r (0..15) of one message: m[r & 3] holds W[4r..4r+3]; the schedule for r + 4 is
 * computed into it once it is used */
#define QROUND(S0, S1, M, r)                                                                                           \
    do {                                                                                                               \
        __m128i msg_ = _mm_add_epi32(M[(r)&3], _mm_loadu_si128((const __m128i *)&K256[4 * (r)]));                      \
        S1 = _mm_sha256rnds2_epu32(S1, S0, msg_);                                                                      \
        S0 = _mm_sha256rnds2_epu32(S0, S1, _mm_shuffle_epi32(msg_, 0x0E));                                             \
        if ((r) < 12)                                                                                                  \
            M[(r)&3] = _mm_sha256msg2_epu32(                                                                           \
                _mm_add_epi32(_mm_sha256msg1_epu32(M[(r)&3], M[((r) + 1) & 3]),                                       \
                              _mm_alignr_epi8(M[((r) + 3) & 3], M[((r) + 2) & 3], 4)),                                 \
                M[((r) + 3) & 3]);                                                                                     \
    } while (0)

#define LOADMSG(M, p, MASK)                                                                                            \
    do {                                                                                                               \
        for (int i_ = 0; i_ < 4; i_++)                                                                                 \
            M[i_] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((p) + 16 * i_)), MASK);                         \
    } while (0)

SHANI static void blocks_shani(uint32_t h[8], const uint8_t *p, size_t nblk)
{
    const __m128i MASK = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i s0, s1;
    shani_load(h, &s0, &s1);
    for (; nblk > 0; nblk--, p += 64) {
        __m128i a0 = s0, a1 = s1, m[4];
        LOADMSG(m, p, MASK);
        QROUND(s0, s1, m, 0);
        QROUND(s0, s1, m, 1);
        QROUND(s0, s1, m, 2);
        QROUND(s0, s1, m, 3);
        QROUND(s0, s1, m, 4);
        QROUND(s0, s1, m, 5);
        QROUND(s0, s1, m, 6);
        QROUND(s0, s1, m, 7);
        QROUND(s0, s1, m, 8);
        QROUND(s0, s1, m, 9);
        QROUND(s0, s1, m, 10);
        QROUND(s0, s1, m, 11);
        QROUND(s0, s1, m, 12);
        QROUND(s0, s1, m, 13);
        QROUND(s0, s1, m, 14);
        QROUND(s0, s1, m, 15);
        s0 = _mm_add_epi32(s0, a0);
        s1 = _mm_add_epi32(s1, a1);
    }
    shani_store(h, s0, s1);
}

static int have_shani(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 19)) || !(c & (1u << 9))) /* SSE4.1, SSSE3 */
        return 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29)) != 0;
}
#endif

static int g_force_c; /* tests: the portable path */

static int use_shani(void)
{
#ifdef LM_SHA_X86
    static int have = -1; /* cpuid asked once; a race only asks twice, with the same answer */
    if (__atomic_load_n(&have, __ATOMIC_RELAXED) < 0)
        __atomic_store_n(&have, have_shani(), __ATOMIC_RELAXED);
    return __atomic_load_n(&have, __ATOMIC_RELAXED) && !g_force_c;
#else
    return 0;
#endif
}

void lm_sha256_force_portable(int on) { g_force_c = on; }

const char *lm_sha256_variant(void) { return use_shani() ? "shani" : "c"; }

static void blocks(uint32_t h[8], const uint8_t *p, size_t nblk)
{
#ifdef LM_SHA_X86
    if (use_shani()) {
        blocks_shani(h, p, nblk);
        return;
    }
#endif
    blocks_c(h, p, nblk);
}

static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

void lm_sha256_init(lm_sha256_ctx *c)
{
    memcpy(c->h, H0, sizeof H0);
    c->n = 0;
    c->nb = 0;
}

void lm_sha256_update(lm_sha256_ctx *c, const void *data, size_t n)
{
    const uint8_t *p = data;
    c->n += n;
    if (c->nb > 0) {
        size_t k = 64 - c->nb < n ? 64 - c->nb : n;
        memcpy(c->buf + c->nb, p, k);
        c->nb += k;
        p += k;
        n -= k;
        if (c->nb < 64)
            return;
        blocks(c->h, c->buf, 1);
        c->nb = 0;
    }
    if (n >= 64) {
        blocks(c->h, p, n / 64);
        p += n & ~(size_t)63;
        n &= 63;
    }
    memcpy(c->buf, p, n);
    c->nb = n;
}

void lm_sha256_final(lm_sha256_ctx *c, uint8_t out[32])
{
    uint64_t bits = c->n * 8;
    uint8_t pad[72] = {0x80};
    size_t k = (c->nb < 56 ? 56 : 120) - c->nb;
    for (int i = 0; i < 8; i++)
        pad[k + (size_t)i] = (uint8_t)(bits >> (56 - 8 * i));
    lm_sha256_update(c, pad, k + 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)c->h[i];
    }
}

void lm_sha256_hex(const uint8_t md[32], char hex[65])
{
    static const char dig[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = dig[md[i] >> 4];
        hex[2 * i + 1] = dig[md[i] & 15];
    }
    hex[64] = '\0';
}
