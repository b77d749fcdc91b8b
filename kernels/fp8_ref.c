/* SPDX-License-Identifier: MIT */
/* fp8_ref.c : block FP8 merged with a low-rank term (contract in lm_kernels.h), the reference:
 * one element at a time, each value from the scalar operations the contract names (the build
 * has -ffp-contract=off, so every product and sum is rounded on its own). */
#include "lm_kernels.h"

#include <math.h>
#include <string.h>

static uint32_t f8_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static float f8_float(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* the exact value of an E4M3FN code: m 2^-9 below the normals, (1 + m / 8) 2^(e - 7) above (also the
 * AVX2 variant's column tails) */
float lm_fp8_code_value(uint8_t c)
{
    const unsigned e = (c >> 3) & 15u, m = c & 7u;
    float v;
    if (e == 15 && m == 7)
        v = f8_float(0x7FC00000u);
    else if (e == 0)
        v = (float)m * 0x1p-9f;
    else
        v = f8_float(((e + 120u) << 23) | (m << 20));
    return (c & 0x80u) ? f8_float(f8_bits(v) | 0x80000000u) : v;
}

void lm_fp8_merge_ref(const uint8_t *q0, size_t ldq, float s0, size_t h, size_t w, const lm_fp8_term *t, float *x,
                      size_t ldx, lm_fp8_lanes *L)
{
    memset(L, 0, sizeof *L);
    L->same = 1;
    for (size_t i = 0; i < h; i++)
        for (size_t j = 0; j < w; j++) {
            const float c = lm_fp8_code_value(q0[i * ldq + j]) * s0;
            float v = c;
            if (i >= t->r_lo && i < t->r_hi) {
                const float *b = t->B + (i - t->r_lo) * t->ldb;
                float acc = 0.0f;
                for (size_t p = 0; p < t->K; p++)
                    acc = fmaf(b[p], t->A[p * t->lda + j], acc);
                v = c + t->alpha * acc;
            }
            x[i * ldx + j] = v;
            const uint32_t a = f8_bits(v) & 0x7FFFFFFFu;
            L->amax = a > L->amax ? a : L->amax;
            if (i < t->r_lo || i >= t->r_hi)
                L->amax_b = a > L->amax_b ? a : L->amax_b;
            L->same &= v == c;
            const float d = v - c;
            L->d2[j % 16] += d * d;
        }
}

/* the code of y (|y| <= 464) rounded to nearest even, and the magnitude it codes: below 2^-6 in
 * steps of 2^-9 (the sum with 2^14 rounds there), above by the mantissa rounded to 3 bits */
unsigned lm_fp8_encode1(float y, float *v)
{
    const uint32_t u = f8_bits(y), a = u & 0x7FFFFFFFu;
    unsigned c;
    if (a < 0x3C800000u) {
        const float sub = f8_float(a) + 16384.0f;
        c = f8_bits(sub) - 0x46800000u;
        *v = sub - 16384.0f;
    } else {
        const uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);
        c = (r >> 20) - 960u;
        *v = f8_float(r & 0xFFF00000u);
    }
    return ((u >> 24) & 0x80u) | c;
}

/* 1 if the element y (a: |y|'s bits, e: |v - y|, v the value coded) of a checked row is flagged
 * (lm_fp8_cert; ers: the row's Ers) */
int lm_fp8_flagged1(uint32_t a, float e, float ers, uint32_t thr)
{
    if (a >= thr)
        return 1;
    if (a < 0x3C800000u) { /* the distance to the nearest odd multiple of 2^-10, or to zero */
        const float af = f8_float(a), r = (af + 16384.0f) - 16384.0f;
        const float dm = 0x1p-10f - fabsf(af - r);
        return fminf(dm, af) <= fmaf(af, 0x1p-19f, ers);
    }
    return f8_bits(e + lm_fp8_margin(ers)) >= (a & 0x7F800000u) - 0x020002C0u;
}

void lm_fp8_encode_ref(const float *x, size_t ldx, size_t h, size_t w, float s, float inv, float ramax,
                       const uint8_t *q0, size_t ldq, uint8_t *q, size_t ldo, lm_fp8_lanes *L, lm_fp8_cert *cert)
{
    memset(L->sum, 0, sizeof L->sum);
    memset(L->e2, 0, sizeof L->e2);
    memset(L->emax, 0, sizeof L->emax);
    L->n_diff = 0;
    if (cert != NULL)
        cert->n_flag = 0;
    for (size_t i = 0; i < h; i++) {
        float ers = 0.0f;
        const int chk = cert != NULL && cert->erow[i] > 0.0f;
        if (chk)
            ers = cert->erow[i] * s * 1.0001f + 0x1p-140f;
        for (size_t j = 0; j < w; j++) {
            const float xv = x[i * ldx + j];
            float v;
            const float y = xv * s;
            const unsigned c = lm_fp8_encode1(y, &v);
            const float ey = f8_float(f8_bits(v) | (f8_bits(y) & 0x80000000u)) - y; /* (exact) */
            const uint32_t e = f8_bits(ey) & 0x7FFFFFFFu;
            if (chk && lm_fp8_flagged1(f8_bits(y) & 0x7FFFFFFFu, f8_float(e), ers, cert->thr))
                cert->flag[cert->n_flag++] = (uint32_t)(i * w + j);
            q[i * ldo + j] = (uint8_t)c;
            if (q0 != NULL)
                L->n_diff += c != q0[i * ldq + j];
            const size_t k = j % 16;
            L->emax[k] = e > L->emax[k] ? e : L->emax[k];
            L->sum[k] += f8_float(e);
            L->e2[k] += ey * ey;
        }
    }
}
