/* SPDX-License-Identifier: MIT */
/* numpy_rng.c : see numpy_rng.h.  Each function follows the numpy source named beside it. */
#include "numpy_rng.h"

#include <stdlib.h>
#include <string.h>

/* bit_generator.pyx: the SeedSequence constants */
#define NP_INIT_A 0x43b0d7e5u
#define NP_MULT_A 0x931e8875u
#define NP_INIT_B 0x8b51f9ddu
#define NP_MULT_B 0x58f38dedu
#define NP_MIX_L 0xca01f9ddu
#define NP_MIX_R 0x4973f715u
#define NP_POOL 4

static uint32_t hashmix(uint32_t v, uint32_t *h)
{
    v ^= *h;
    *h *= NP_MULT_A;
    v *= *h;
    return v ^ (v >> 16);
}

static uint32_t mix(uint32_t x, uint32_t y)
{
    uint32_t r = NP_MIX_L * x - NP_MIX_R * y;
    return r ^ (r >> 16);
}

void lm_np_seed_state(uint64_t seed, uint32_t *out, size_t n_words)
{
    uint32_t ent[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)}, pool[NP_POOL];
    size_t n_ent = seed >> 32 ? 2 : 1; /* _int_to_uint32_array: 0 is one word */
    uint32_t h = NP_INIT_A;
    for (size_t i = 0; i < NP_POOL; i++) /* mix_entropy */
        pool[i] = hashmix(i < n_ent ? ent[i] : 0, &h);
    for (size_t s = 0; s < NP_POOL; s++)
        for (size_t d = 0; d < NP_POOL; d++)
            if (s != d)
                pool[d] = mix(pool[d], hashmix(pool[s], &h));
    uint32_t hb = NP_INIT_B; /* generate_state */
    for (size_t i = 0; i < n_words; i++) {
        uint32_t v = pool[i % NP_POOL] ^ hb;
        hb *= NP_MULT_B;
        v *= hb;
        out[i] = v ^ (v >> 16);
    }
}

#define PCG_MULT (((unsigned __int128)2549297995355413924ull << 64) | 4865540595714422341ull)

static uint64_t pcg_step(lm_np_pcg64 *g) /* pcg_setseq_128_xsl_rr_64_random_r */
{
    g->state = g->state * PCG_MULT + g->inc;
    uint64_t x = (uint64_t)(g->state >> 64) ^ (uint64_t)g->state;
    unsigned rot = (unsigned)(g->state >> 122);
    return (x >> rot) | (x << ((64 - rot) & 63));
}

void lm_np_pcg64_set(lm_np_pcg64 *g, const uint64_t seed[4])
{
    unsigned __int128 s = ((unsigned __int128)seed[0] << 64) | seed[1];
    unsigned __int128 q = ((unsigned __int128)seed[2] << 64) | seed[3];
    memset(g, 0, sizeof *g); /* pcg_setseq_128_srandom_r */
    g->inc = (q << 1) | 1u;
    (void)pcg_step(g);
    g->state += s;
    (void)pcg_step(g);
}

void lm_np_default_rng(lm_np_pcg64 *g, uint64_t seed)
{
    uint32_t w[8];
    lm_np_seed_state(seed, w, 8); /* generate_state(4, np.uint64): little-endian word pairs */
    uint64_t s[4];
    for (int i = 0; i < 4; i++)
        s[i] = (uint64_t)w[2 * i] | ((uint64_t)w[2 * i + 1] << 32);
    lm_np_pcg64_set(g, s);
}

uint64_t lm_np_next64(lm_np_pcg64 *g) { return pcg_step(g); }

uint32_t lm_np_next32(lm_np_pcg64 *g) /* pcg64_next32 */
{
    if (g->has32) {
        g->has32 = 0;
        return g->u32;
    }
    uint64_t x = pcg_step(g);
    g->has32 = 1;
    g->u32 = (uint32_t)(x >> 32);
    return (uint32_t)x;
}

uint64_t lm_np_bounded(lm_np_pcg64 *g, uint64_t rng) /* random_bounded_uint64(.., use_masked 0) */
{
    if (rng == 0)
        return 0;
    if (rng <= 0xffffffffu) {
        if (rng == 0xffffffffu)
            return lm_np_next32(g);
        uint32_t excl = (uint32_t)rng + 1u; /* buffered_bounded_lemire_uint32 */
        uint64_t m = (uint64_t)lm_np_next32(g) * excl;
        uint32_t left = (uint32_t)m;
        if (left < excl) {
            uint32_t thr = (uint32_t)(UINT32_MAX - (uint32_t)rng) % excl;
            while (left < thr) {
                m = (uint64_t)lm_np_next32(g) * excl;
                left = (uint32_t)m;
            }
        }
        return m >> 32;
    }
    if (rng == UINT64_MAX)
        return lm_np_next64(g);
    uint64_t excl = rng + 1; /* bounded_lemire_uint64 */
    unsigned __int128 m = (unsigned __int128)lm_np_next64(g) * excl;
    uint64_t left = (uint64_t)m;
    if (left < excl) {
        uint64_t thr = (UINT64_MAX - rng) % excl;
        while (left < thr) {
            m = (unsigned __int128)lm_np_next64(g) * excl;
            left = (uint64_t)m;
        }
    }
    return (uint64_t)(m >> 64);
}

uint64_t lm_np_interval(lm_np_pcg64 *g, uint64_t max) /* random_interval */
{
    if (max == 0)
        return 0;
    uint64_t mask = max, v;
    for (int s = 1; s < 64; s *= 2)
        mask |= mask >> s;
    if (max <= 0xffffffffu) {
        while ((v = (lm_np_next32(g) & mask)) > max)
            ;
    } else {
        while ((v = (lm_np_next64(g) & mask)) > max)
            ;
    }
    return v;
}

static void shuffle_int(lm_np_pcg64 *g, uint64_t n, uint64_t first, uint64_t *x) /* _shuffle_int */
{
    for (uint64_t i = n; i-- > first;) {
        uint64_t j = lm_np_bounded(g, i), t = x[j];
        x[j] = x[i];
        x[i] = t;
    }
}

int lm_np_choice(lm_np_pcg64 *g, uint64_t pop, uint64_t size, uint64_t *out)
{
    if (size > pop)
        return -1;
    if (pop > 10000 && size > pop / 50) { /* tail shuffle (cutoff 50 with shuffle=True) */
        uint64_t *idx = malloc((size_t)pop * sizeof *idx);
        if (idx == NULL)
            return -1;
        for (uint64_t i = 0; i < pop; i++)
            idx[i] = i;
        shuffle_int(g, pop, pop - size > 1 ? pop - size : 1, idx);
        memcpy(out, idx + (pop - size), (size_t)size * sizeof *out);
        free(idx);
        return 0;
    }
    /* Floyd's algorithm: j's draw is taken unless already chosen, then j itself.  numpy keeps the
     * chosen values in a hash set; membership is all that matters, kept here as a bit set */
    unsigned char *seen = calloc((size_t)(pop / 8 + 1), 1);
    if (seen == NULL)
        return -1;
    for (uint64_t j = pop - size; j < pop; j++) {
        uint64_t v = lm_np_bounded(g, j);
        if (seen[v / 8] & (1u << (v % 8)))
            v = j;
        seen[v / 8] |= (unsigned char)(1u << (v % 8));
        out[j - (pop - size)] = v;
    }
    free(seen);
    shuffle_int(g, size, 1, out);
    return 0;
}

void lm_np_shuffle_u32(lm_np_pcg64 *g, uint32_t *x, uint64_t n) /* _shuffle_raw, first = 1 */
{
    for (uint64_t i = n; i-- > 1;) {
        uint64_t j = lm_np_interval(g, i);
        uint32_t t = x[j];
        x[j] = x[i];
        x[i] = t;
    }
}
