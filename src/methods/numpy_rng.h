/* SPDX-License-Identifier: MIT */
/* numpy_rng.h : numpy's Generator as far as PEFT's seeded draws need it (numpy/random:
 * bit_generator.pyx SeedSequence, src/pcg64 PCG64, src/distributions/distributions.c bounded
 * integers, _generator.pyx choice and shuffle): np.random.default_rng(seed) for a non-negative
 * integer seed, Generator.choice(n, size, replace=False) and Generator.shuffle of a 1-D array. */
#ifndef LM_NUMPY_RNG_H
#define LM_NUMPY_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    unsigned __int128 state, inc;
    int has32;    /* a buffered upper half for next32 */
    uint32_t u32;
} lm_np_pcg64;

/*! lm_np_seed_state() : SeedSequence(seed).generate_state(n_words, np.uint32) (pool of 4 words,
 *  the seed split into 32-bit words, lowest first; no spawn key) */
void lm_np_seed_state(uint64_t seed, uint32_t *out, size_t n_words);
/*! lm_np_default_rng() : np.random.default_rng(seed): PCG64 seeded from SeedSequence(seed) */
void lm_np_default_rng(lm_np_pcg64 *g, uint64_t seed);
/*! lm_np_pcg64_seeded() : PCG64 from its 4 seed words (state high, low, increment high, low) */
void lm_np_pcg64_set(lm_np_pcg64 *g, const uint64_t seed[4]);
uint64_t lm_np_next64(lm_np_pcg64 *g);
uint32_t lm_np_next32(lm_np_pcg64 *g);
/*! lm_np_bounded() : random_bounded_uint64(off 0, rng, Lemire): uniform in [0, rng] */
uint64_t lm_np_bounded(lm_np_pcg64 *g, uint64_t rng);
/*! lm_np_interval() : random_interval(max): uniform in [0, max] by masked rejection */
uint64_t lm_np_interval(lm_np_pcg64 *g, uint64_t max);
/*! lm_np_choice() : Generator.choice(pop, size, replace=False) (shuffle=True, p=None): the tail
 *  shuffle for pop > 10000 and size > pop // 50, else Floyd's algorithm then a shuffle.
 *  @return 0, or -1 when out of memory or size > pop */
int lm_np_choice(lm_np_pcg64 *g, uint64_t pop, uint64_t size, uint64_t *out);
/*! lm_np_shuffle_u32() : Generator.shuffle of a 1-D array (Fisher-Yates from the end with
 *  random_interval); the values' width does not change the draws */
void lm_np_shuffle_u32(lm_np_pcg64 *g, uint32_t *x, uint64_t n);

#endif
