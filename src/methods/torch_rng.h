/* SPDX-License-Identifier: MIT */
/* torch_rng.h : torch's CPU random generator as far as PEFT's seeded draws need it
 * (peft-merge.md Appendix A): MT19937 seeded as torch.manual_seed, and torch.randperm's
 * Fisher-Yates from the front for n < 2^28 - 1 elements (32-bit draws). */
#ifndef LM_TORCH_RNG_H
#define LM_TORCH_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t mt[624];
    int i;
} lm_mt19937;

void lm_mt_seed(lm_mt19937 *g, uint64_t seed);
uint32_t lm_mt_next(lm_mt19937 *g);

/*! lm_randperm_prefix() : the first n entries of torch.randperm(N, generator=manual_seed(seed))
 *  (N < 2^28 - 1: torch draws 32-bit numbers there).  Only the moved positions are stored, so
 *  memory is O(n) whatever N.  @return 0, or -1 when out of memory. */
int lm_randperm_prefix(uint64_t N, uint64_t seed, uint64_t n, uint64_t *out);

/*! lm_torch_normal_f32() : torch.normal(mean, std, size, generator=manual_seed(seed)) on the CPU in
 *  float for n >= 16 elements: n uniform draws, Box-Muller on each block of 16 (torch's
 *  normal_fill_16), the last 16 drawn again when 16 does not divide n.  Computed as torch's
 *  scalar path; its AVX2 path may round the last bits differently, so callers compare with a
 *  tolerance.  @return 0, or -1 when n < 16 (torch takes another path there). */
int lm_torch_normal_f32(uint64_t seed, float mean, float std, size_t n, float *out);

#endif
