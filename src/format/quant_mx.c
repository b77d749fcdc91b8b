/* SPDX-License-Identifier: MIT */
/* quant_mx.c : the MXFP4 codec (see quant_mx.h). */
#include "quant_mx.h"

#include <math.h>
#include <string.h>

static const float E2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

float lm_e2m1_value(unsigned c)
{
    return E2M1[c & 15];
}

float lm_e8m0_value(uint8_t s)
{
    return s == 255 ? NAN : ldexpf(1.0f, (int)s - 127);
}

static inline uint32_t bits_of(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static inline float float_of(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* Round to nearest, ties to the even code: the midpoints between neighbouring codes are .25,
 * .75, 1.25, 1.75, 2.5, 3.5 and 5; a tie goes to the code with a 0 mantissa bit (0, 1.0, 2.0,
 * 4.0), so the comparison is inclusive below an even code and strict below an odd one.  The sum
 * of comparisons is the magnitude code; NaN compares false everywhere and saturates like inf. */
static inline uint32_t e2m1_code(float q)
{
    const uint32_t u = bits_of(q);
    const float a = float_of(u & 0x7FFFFFFFu);
    uint32_t c = (uint32_t)(a > 0.25f) + (uint32_t)(a >= 0.75f) + (uint32_t)(a > 1.25f) + (uint32_t)(a >= 1.75f) +
                 (uint32_t)(a > 2.5f) + (uint32_t)(a >= 3.5f) + (uint32_t)(a > 5.0f);
    const uint32_t nan = 0u - (uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u);
    c = (7u & nan) | (c & ~nan);
    return ((u >> 28) & 8u) | c;
}

unsigned lm_f32_to_e2m1(float q)
{
    return e2m1_code(q);
}

/* the library's scale: the bits of amax / 6 rounded up to a power of two (int32 arithmetic:
 * a NaN's bits wrap to 0) */
static inline uint32_t scale_bits(float amax)
{
    return (bits_of(amax / 6.0f) + 0x007FFFFFu) & 0x7F800000u;
}

uint8_t lm_e8m0_from_f32(float v)
{
    const uint32_t u = bits_of(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return 255;
    return u == 0x00400000u ? 0 : (uint8_t)(u >> 23); /* 2^-127 is the one subnormal */
}

uint8_t lm_mx_scale_for(float amax)
{
    return (uint8_t)(scale_bits(amax) >> 23);
}

/* bf16 rounding (to nearest even), the value kept in an f32; NaN stays NaN */
static inline float to_bf16(float x)
{
    const uint32_t u = bits_of(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return float_of(u | 0x00400000u);
    return float_of((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}

void lm_mxfp4_dequant(const uint8_t *q, const float *s, uint64_t nr, uint64_t cols, float *dst)
{
    const uint64_t ng = cols / LM_MX_GROUP;
    for (uint64_t r = 0; r < nr; r++) {
        const uint8_t *qr = q + r * (cols / 2);
        const float *sr = s + r * ng;
        float *dr = dst + r * cols;
        for (uint64_t g = 0; g < ng; g++) {
            const float sc = sr[g];
            float t[16];
            for (int c = 0; c < 16; c++)
                t[c] = E2M1[c] * sc;
            const uint8_t *qg = qr + g * (LM_MX_GROUP / 2);
            float *dg = dr + g * LM_MX_GROUP;
            for (int k = 0; k < LM_MX_GROUP / 2; k++) {
                dg[2 * k] = t[qg[k] & 15];
                dg[2 * k + 1] = t[qg[k] >> 4];
            }
        }
    }
}

/* one group of 32 whose values changed: new codes qg and scale byte, and its numbers */
static void group_encode(const float *xg, const uint8_t *q0g, float sc0, uint8_t *qg, float *sg, lm_qstats *st)
{
    float xb[LM_MX_GROUP];
    uint32_t amax = 0;
    int nan = 0;
    for (int i = 0; i < LM_MX_GROUP; i++) {
        xb[i] = to_bf16(xg[i]);
        const uint32_t a = bits_of(xb[i]) & 0x7FFFFFFFu;
        nan |= a > 0x7F800000u;
        amax = a > amax ? a : amax;
    }
    const uint32_t sb = scale_bits(nan ? NAN : float_of(amax)); /* torch's max propagates NaN */
    const float ds = float_of(sb), qs = sb == 0 ? 0.0f : 1.0f / ds;
    const uint8_t s = (uint8_t)(sb >> 23);
    const float sc = lm_e8m0_value(s);
    *sg = sc;
    const uint8_t s0 = lm_e8m0_from_f32(sc0);
    const float ramax = amax > 0 && amax < 0x7F800000u ? 1.0f / float_of(amax) : 0.0f;
    uint64_t changed = 0;
    for (int k = 0; k < LM_MX_GROUP / 2; k++) {
        const uint32_t lo = e2m1_code(xb[2 * k] * qs), hi = e2m1_code(xb[2 * k + 1] * qs);
        qg[k] = (uint8_t)(lo | hi << 4);
        changed += (lo != (q0g[k] & 15u)) + (hi != (uint32_t)(q0g[k] >> 4));
        for (int h = 0; h < 2; h++) {
            const uint32_t c = h ? hi : lo;
            const float x = xg[2 * k + h], dq = E2M1[c] * sc - x;
            const float d = x - E2M1[h ? q0g[k] >> 4 : q0g[k] & 15] * sc0;
            const double e = fabs((double)dq * ramax);
            st->err_max = e > st->err_max ? e : st->err_max;
            st->err_sum += e;
            st->d2 += (double)d * d;
            st->e2 += (double)dq * dq;
        }
    }
    st->n_changed += s != s0 ? LM_MX_GROUP : changed;
    st->n_err += LM_MX_GROUP;
}

void lm_mxfp4_requant(const float *x, const uint8_t *q0, const float *s0, uint64_t nr, uint64_t cols, uint8_t *q,
                      float *s, lm_qstats *st)
{
    const uint64_t ng = cols / LM_MX_GROUP;
    for (uint64_t r = 0; r < nr; r++) {
        for (uint64_t g = 0; g < ng; g++) {
            const uint64_t gi = r * ng + g, bo = gi * (LM_MX_GROUP / 2);
            const float *xg = x + gi * LM_MX_GROUP;
            const float sc0 = s0[gi];
            int same = 1;
            for (int k = 0; same && k < LM_MX_GROUP / 2; k++) {
                const float a = E2M1[q0[bo + k] & 15] * sc0, b = E2M1[q0[bo + k] >> 4] * sc0;
                same = (xg[2 * k] == a || (isnan(xg[2 * k]) && isnan(a))) &&
                       (xg[2 * k + 1] == b || (isnan(xg[2 * k + 1]) && isnan(b)));
            }
            st->n_blocks++;
            if (same) {
                memcpy(q + bo, q0 + bo, LM_MX_GROUP / 2);
                s[gi] = s0[gi];
                st->n_blocks_kept++;
                continue;
            }
            group_encode(xg, q0 + bo, s0[gi], q + bo, s + gi, st);
        }
    }
}
