/* lm_kernels.h : the numeric kernels (f16/bf16/f64 <-> f32 conversion, acc += s*x) as a table of
 * function pointers, plus the CPU probe that fills it.  Each kernel has a scalar _ref variant
 * (kernels/convert_ref.c), which defines the semantics, and SIMD variants that match it bit for
 * bit.  Kernels never allocate, never fail, and accept any alignment and any n (0 included).
 * This header includes nothing from src/. */
#ifndef LM_KERNELS_H
#define LM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Numeric contract (all variants, bit for bit; no FTZ/DAZ, subnormals are kept everywhere):
 *  bf16 -> f32 : exact (bits << 16; NaNs pass through unchanged, signalling ones included).
 *  f32 -> bf16 : round to nearest, ties to even; overflow -> inf; NaN -> (bits >> 16) | 0x0040,
 *                i.e. quiet, sign and the top 6 payload bits kept.
 *  f16 -> f32  : exact, subnormals included; NaN -> quiet NaN (payload << 13 | 0x00400000,
 *                sign kept), which is what F16C's vcvtph2ps produces.
 *  f32 -> f16  : round to nearest, ties to even, also for results in the f16 subnormal range;
 *                |x| >= 65520 -> inf; NaN -> sign | 0x7e00 | top 9 payload bits (quiet).
 *  f64 -> f32  : the C cast under the default rounding mode (RNE; NaN quieted, top payload kept).
 *  f32 -> f64  : exact.
 *  axpy        : acc[i] = acc[i] + (s * x[i]) with the product rounded to f32 first (no FMA);
 *                a NaN result is always LM_AXPY_NAN.  Why: when two NaNs meet, x86 returns the
 *                first operand's, and compilers order the operands of + and * as they like
 *                (gcc -O1 and -O2 differ), so payloads would not be reproducible otherwise. */
#define LM_AXPY_NAN 0x7FC00000u /* the default quiet NaN, positive */
typedef struct lm_kernels {
    void (*bf16_to_f32)(const uint16_t *src, float *dst, size_t n);
    void (*f32_to_bf16)(const float *src, uint16_t *dst, size_t n);
    void (*f16_to_f32)(const uint16_t *src, float *dst, size_t n);
    void (*f32_to_f16)(const float *src, uint16_t *dst, size_t n);
    void (*axpy)(float *acc, float s, const float *x, size_t n);
    void (*f64_to_f32)(const double *src, float *dst, size_t n);
    void (*f32_to_f64)(const float *src, double *dst, size_t n);
    double (*sumsq)(const float *x, size_t n); /* sum of x[i]^2 in double, 16 lanes (reduce_ref.c) */
    size_t (*count_nonfinite_f32)(const float *x, size_t n);                 /* inf and NaN */
    size_t (*count_nonfinite_16)(const uint16_t *x, size_t n, uint16_t exp_mask); /* exponent all ones */
    const char *name; /* "ref", "avx2", "avx512"; static storage */
} lm_kernels;

/*! lm_kernels_select() :
 *  Fills k with the _ref functions, then overrides them with the best variant this CPU supports.
 *  force: NULL or "auto" (automatic, but a non-empty environment variable LM_KERNELS=ref|avx2|
 *  avx512 is then taken as if passed here), "ref", "avx2" or "avx512".
 *  @return 0, or -1 if the requested variant is unknown or this CPU cannot run it; k then holds
 *  the ref variant (so it is always usable).  No global state: k is the only thing written. */
int lm_kernels_select(lm_kernels *k, const char *force);

/*! lm_cpu_has_avx2_f16c() : 1 if the CPU and OS support AVX2, F16C and FMA, else 0. */
int lm_cpu_has_avx2_f16c(void);
/*! lm_cpu_has_avx512() : 1 if AVX-512 F, BW, VL and DQ are usable (plus F16C and FMA), else 0. */
int lm_cpu_has_avx512(void);
/*! lm_cpu_name() : the CPU model name ("model name" in /proc/cpuinfo, else the cpuid brand
 *  string, else "unknown") into buf, NUL-terminated when cap > 0.  @return buf. */
const char *lm_cpu_name(char *buf, size_t cap);

/* ---- variants (kernels/convert_<variant>.c) ------------------------------------------------ */
void lm_bf16_to_f32_ref(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_bf16_ref(const float *src, uint16_t *dst, size_t n);
void lm_f16_to_f32_ref(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_f16_ref(const float *src, uint16_t *dst, size_t n);
void lm_axpy_ref(float *acc, float s, const float *x, size_t n);
void lm_f64_to_f32_ref(const double *src, float *dst, size_t n);
void lm_f32_to_f64_ref(const float *src, double *dst, size_t n);

void lm_bf16_to_f32_avx2(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_bf16_avx2(const float *src, uint16_t *dst, size_t n);
void lm_f16_to_f32_avx2(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_f16_avx2(const float *src, uint16_t *dst, size_t n);
void lm_axpy_avx2(float *acc, float s, const float *x, size_t n);
void lm_f64_to_f32_avx2(const double *src, float *dst, size_t n);
void lm_f32_to_f64_avx2(const float *src, double *dst, size_t n);

void lm_bf16_to_f32_avx512(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_bf16_avx512(const float *src, uint16_t *dst, size_t n);
void lm_f16_to_f32_avx512(const uint16_t *src, float *dst, size_t n);
void lm_f32_to_f16_avx512(const float *src, uint16_t *dst, size_t n);
void lm_axpy_avx512(float *acc, float s, const float *x, size_t n);
void lm_f64_to_f32_avx512(const double *src, float *dst, size_t n);
void lm_f32_to_f64_avx512(const float *src, double *dst, size_t n);

size_t lm_count_nonfinite_f32_ref(const float *x, size_t n);
size_t lm_count_nonfinite_f32_avx2(const float *x, size_t n);
size_t lm_count_nonfinite_f32_avx512(const float *x, size_t n);
size_t lm_count_nonfinite_16_ref(const uint16_t *x, size_t n, uint16_t exp_mask);
size_t lm_count_nonfinite_16_avx2(const uint16_t *x, size_t n, uint16_t exp_mask);
size_t lm_count_nonfinite_16_avx512(const uint16_t *x, size_t n, uint16_t exp_mask);
double lm_sumsq_ref(const float *x, size_t n);
double lm_sumsq_avx2(const float *x, size_t n);
double lm_sumsq_avx512(const float *x, size_t n);
/* the reference's pieces the variants share: the tail into the lanes, and the lanes' sum */
void lm_sumsq_ref_tail(const float *x, size_t n, double *lanes);
double lm_sumsq_lanes(const double *lanes);

/* ---- single values: the reference semantics, pure integer bit manipulation ---------------- */
/* type punning through a union is defined in C11 (and keeps this header free of <string.h>) */
static inline uint32_t lm_f32_bits(float f)
{
    const union { float f; uint32_t u; } v = {.f = f};
    return v.u;
}

static inline float lm_f32_from_bits(uint32_t u)
{
    const union { uint32_t u; float f; } v = {.u = u};
    return v.f;
}

static inline float lm_bf16_to_f32_1(uint16_t h)
{
    return lm_f32_from_bits((uint32_t)h << 16);
}

static inline uint16_t lm_f32_to_bf16_1(float f)
{
    const uint32_t u = lm_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) /* NaN: keep sign and top payload, force quiet */
        return (uint16_t)((u >> 16) | 0x0040u);
    /* RNE: add just under half an ulp, plus one more when the kept lsb is odd; a carry out of
     * the mantissa bumps the exponent, which is also how max finite rounds to inf */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float lm_f16_to_f32_1(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    if (exp == 0x1F) /* inf, or NaN made quiet (as vcvtph2ps does) */
        return lm_f32_from_bits(sign | 0x7F800000u | (mant << 13) | (mant ? 0x00400000u : 0));
    if (exp != 0)
        return lm_f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13)); /* 112 = 127 - 15 */
    if (mant == 0)
        return lm_f32_from_bits(sign);
    /* subnormal: mant * 2^-24; normalise so the leading 1 lands on bit 10 */
    uint32_t e = 113; /* biased f32 exponent of 2^-14 */
    while (!(mant & 0x400u)) {
        mant <<= 1;
        e--;
    }
    return lm_f32_from_bits(sign | (e << 23) | ((mant & 0x3FFu) << 13));
}

static inline uint16_t lm_f32_to_f16_1(float f)
{
    const uint32_t u = lm_f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) /* NaN: top 9 payload bits, quiet bit forced */
        return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x1FFu));
    if (a >= 0x477FF000u) /* >= 65520 = halfway between 65504 and 2^16: inf (also inf itself) */
        return (uint16_t)(sign | 0x7C00u);
    if (a >= 0x38800000u) { /* >= 2^-14: normal result; rebias, then RNE on 13 dropped bits */
        const uint32_t r = a - (112u << 23);
        return (uint16_t)(sign | ((r + 0x0FFFu + ((r >> 13) & 1u)) >> 13));
    }
    if (a <= 0x33000000u) /* <= 2^-25: half the smallest subnormal or less, ties to even 0 */
        return sign;
    /* subnormal result m * 2^-24: a is a normal f32 here (a > 2^-25), value = mant * 2^(e-150),
     * so m = mant >> (126 - e) rounded to nearest even; m may round up to 0x400 = 2^-14 */
    const uint32_t e = a >> 23;
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e; /* 14 .. 24 */
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    uint32_t m = mant >> shift;
    if (rem > half || (rem == half && (m & 1u)))
        m++;
    return (uint16_t)(sign | m);
}

#ifdef __cplusplus
}
#endif
#endif
