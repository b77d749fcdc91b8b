/* SPDX-License-Identifier: MIT */
/* doracert_ref.c : a certified DoRA row rounded once (exec_dora.c proves the bounds), the
 * reference.  Element j: y = v_j F, then
 *   fast test: lo = fl(y - E), hi = fl(y + E) with E the row's uniform bound; both rounded to the
 *     output (RNE on the f64 bits, sign included: r = (u + 2^(s-1) - 1 + ((u >> s) & 1)) >> s,
 *     s = 52 - the output's mantissa bits); certified when r(lo) == r(hi) and its magnitude lies
 *     strictly above the smallest normal output value and below infinity: then every value in
 *     [lo, hi] rounds to it, and its bits are the output's (exponent rebiased, sign moved);
 *   else the precise test: e_j = ((((A1 kap_j + A0) + A2 (|w_j| + 2 |v_j|)) + eF |v_j|) (1 + 2^-40)
 *     + 2^-50 |y|) + 2^-1060 (exec_dora.c's (e)), lo, hi = fl(y -+ e_j), each rounded to the
 *     output (magnitude bits and sign; subnormal results too: |x| over the subnormal quantum,
 *     exact, to an integer by + 2^52 - 2^52); certified when both give the same finite value.
 * Uncertified elements get the precise test's bits of lo (the caller recomputes their row).
 * base (or NULL): the base row in the output dtype; *n_changed = the elements whose bits
 * written differ from it (the merge's statistics, without a pass of their own).
 * The SIMD variants do the same operations lane by lane: the same bits and the same counts. */
#include "lm_kernels.h"

#include <math.h>
#include <string.h>

const lm_dora_fmt lm_dora_fmts[3] = {
    [LM_KDT_F32] = {29, 32, 0x1p149, 896ull << 23, 897ull << 23, 1151ull << 23, 897ull << 52, 0x7F800000u},
    [LM_KDT_BF16] = {45, 16, 0x1p133, 896ull << 7, 897ull << 7, 1151ull << 7, 897ull << 52, 0x7F80u},
    [LM_KDT_F16] = {42, 16, 0x1p24, 1008ull << 10, 1009ull << 10, 1039ull << 10, 1009ull << 52, 0x7C00u},
};

static inline uint64_t dbits(double x)
{
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline double dfrom(uint64_t u)
{
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* the output's magnitude bits of x, with x's sign in bit 63 (finite normal or subnormal
 * results; inf, NaN and values that round beyond the range give the infinity's bits or more) */
static inline uint64_t prec_bits(double x, const lm_dora_fmt *f)
{
    const uint64_t u = dbits(x), a = u & 0x7FFFFFFFFFFFFFFFu, sg = u & 0x8000000000000000u;
    if (a < f->amin) /* subnormal output: |x| / quantum exactly, rounded to an integer */
        return (dbits(dfrom(a) * f->subscale + 0x1p52) - dbits(0x1p52)) | sg;
    const uint64_t r = (a + ((1ull << (f->s - 1)) - 1) + ((a >> f->s) & 1)) >> f->s;
    return (r - f->bias) | sg;
}

size_t lm_dora_cert_ref(const double *v, const float *w, const double *kap, size_t n, const lm_dora_cert *c,
                        lm_kdtype out, void *dst, const void *base, size_t *n_changed)
{
    size_t changed = 0;
    const lm_dora_fmt *f = &lm_dora_fmts[out];
    const uint64_t half = (1ull << (f->s - 1)) - 1, magr = (1ull << (63 - f->s)) - 1, sgn = 1ull << (f->obits - 1);
    size_t bad = 0;
    for (size_t j = 0; j < n; j++) {
        const double y = v[j] * c->F;
        const uint64_t ul = dbits(y - c->E), uh = dbits(y + c->E);
        const uint64_t rl = (ul + half + ((ul >> f->s) & 1)) >> f->s, rh = (uh + half + ((uh >> f->s) & 1)) >> f->s;
        const uint64_t mag = rl & magr;
        uint64_t o = (mag - f->bias) | ((rl >> (63 - f->s - (f->obits - 1))) & sgn);
        if (!(rl == rh && mag - f->rmin - 1 < f->rinf - f->rmin - 1)) {
            const double av = fabs(v[j]);
            const double e = ((((c->A1 * kap[j] + c->A0) + c->A2 * (fabs((double)w[j]) + 2 * av)) + c->eF * av) *
                                  (1 + 0x1p-40) +
                              0x1p-50 * fabs(y)) +
                             0x1p-1060;
            const uint64_t pl = prec_bits(y - e, f), m = pl & 0x7FFFFFFFFFFFFFFFu;
            o = m | ((pl >> (64 - f->obits)) & sgn);
            bad += !(pl == prec_bits(y + e, f) && m < f->oinf);
        }
        if (f->obits == 32) {
            ((uint32_t *)dst)[j] = (uint32_t)o;
            changed += base != NULL && (uint32_t)o != ((const uint32_t *)base)[j];
        } else {
            ((uint16_t *)dst)[j] = (uint16_t)o;
            changed += base != NULL && (uint16_t)o != ((const uint16_t *)base)[j];
        }
    }
    if (base != NULL)
        *n_changed = changed;
    return bad;
}
