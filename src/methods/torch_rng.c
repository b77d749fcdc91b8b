/* SPDX-License-Identifier: MIT */
/* torch_rng.c : see torch_rng.h. */
#include "torch_rng.h"

#include <math.h>
#include <stdlib.h>

void lm_mt_seed(lm_mt19937 *g, uint64_t seed)
{
    g->mt[0] = (uint32_t)seed;
    for (int k = 1; k < 624; k++)
        g->mt[k] = 1812433253u * (g->mt[k - 1] ^ (g->mt[k - 1] >> 30)) + (uint32_t)k;
    g->i = 624;
}

uint32_t lm_mt_next(lm_mt19937 *g)
{
    if (g->i >= 624) {
        for (int k = 0; k < 624; k++) {
            uint32_t y = (g->mt[k] & 0x80000000u) | (g->mt[(k + 1) % 624] & 0x7fffffffu);
            g->mt[k] = g->mt[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        g->i = 0;
    }
    uint32_t y = g->mt[g->i++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* a sparse permutation: position -> value for the positions that moved (open addressing) */
typedef struct {
    uint64_t *key, *val, cap;
} perm_map;

static uint64_t perm_slot(const perm_map *m, uint64_t k)
{
    uint64_t h = (k * 0x9E3779B97F4A7C15ull) & (m->cap - 1);
    while (m->key[h] != UINT64_MAX && m->key[h] != k)
        h = (h + 1) & (m->cap - 1);
    return h;
}

static uint64_t perm_get(const perm_map *m, uint64_t k)
{
    uint64_t h = perm_slot(m, k);
    return m->key[h] == k ? m->val[h] : k;
}

static void perm_set(perm_map *m, uint64_t k, uint64_t v)
{
    uint64_t h = perm_slot(m, k);
    m->key[h] = k;
    m->val[h] = v;
}

int lm_randperm_prefix(uint64_t N, uint64_t seed, uint64_t n, uint64_t *out)
{
    perm_map m;
    m.cap = 16;
    while (m.cap < 4 * n + 16)
        m.cap *= 2;
    m.key = malloc(m.cap * sizeof *m.key);
    m.val = malloc(m.cap * sizeof *m.val);
    if (m.key == NULL || m.val == NULL) {
        free(m.key);
        free(m.val);
        return -1;
    }
    for (uint64_t i = 0; i < m.cap; i++)
        m.key[i] = UINT64_MAX;
    lm_mt19937 g;
    lm_mt_seed(&g, seed);
    for (uint64_t t = 0; t < n; t++) {
        if (t + 1 < N) {
            uint64_t b = t + lm_mt_next(&g) % (N - t);
            uint64_t va = perm_get(&m, t), vb = perm_get(&m, b);
            perm_set(&m, t, vb);
            perm_set(&m, b, va);
        }
        out[t] = perm_get(&m, t);
    }
    free(m.key);
    free(m.val);
    return 0;
}

/* torch's uniform_real_distribution<float>(0, 1): the low 24 bits of a 32-bit draw */
static float uniform_f32(lm_mt19937 *g) { return (float)(lm_mt_next(g) & ((1u << 24) - 1)) * (1.0f / (float)(1u << 24)); }

/* torch's normal_fill_16: Box-Muller on data[j], data[j + 8] */
static void normal_fill_16(float *d, float mean, float std)
{
    for (int j = 0; j < 8; j++) {
        const float u1 = 1 - d[j], u2 = d[j + 8];
        const float radius = sqrtf(-2 * logf(u1));
        const float theta = (float)(2.0f * 3.14159265358979323846 * u2);
        d[j] = radius * cosf(theta) * std + mean;
        d[j + 8] = radius * sinf(theta) * std + mean;
    }
}

int lm_torch_normal_f32(uint64_t seed, float mean, float std, size_t n, float *out)
{
    if (n < 16)
        return -1;
    lm_mt19937 g;
    lm_mt_seed(&g, seed);
    for (size_t i = 0; i < n; i++)
        out[i] = uniform_f32(&g);
    for (size_t i = 0; i + 16 <= n; i += 16)
        normal_fill_16(out + i, mean, std);
    if (n % 16 != 0) { /* the last 16 drawn again */
        float *d = out + n - 16;
        for (int i = 0; i < 16; i++)
            d[i] = uniform_f32(&g);
        normal_fill_16(d, mean, std);
    }
    return 0;
}
