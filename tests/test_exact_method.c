/* SPDX-License-Identifier: MIT */
/* test_exact_method.c : issue 10 for the method types on the f64 tile path (LM_EXACT_F64:
 * lm_method.apply_tile64): every element the value of PEFT's formula evaluated in f64 and rounded
 * ONCE to the output dtype.
 *  - the rounding kernel (lm_f64_round: round-to-odd to f32, then RNE) against a rounding written
 *    here on the f64 bits in integer arithmetic, on every class of value;
 *  - per type, generated adversarial cases merged by the binary (th_run) and compared with PEFT's
 *    formula computed here independently in long double from the stored values: results that
 *    nearly cancel (an f32 evaluation gets many of them wrong), tiny changes (results within an
 *    ulp of the base), subnormal results, an f16 overflow refused naming the tensor.  The
 *    reference carries a bound on f64 noise (the rule allows any rounding where the exact value
 *    lies within float64 noise of a midpoint); elements whose rounding that bound leaves
 *    ambiguous may take either neighbour and are counted (a small fraction), all others must be
 *    the nearest value.
 * For each: the same bytes with --threads 1/2, --tile-elems and --kernels ref; --json says exact
 * and counts every element as recomputed. */
#include "th.h"
#include "th_exact.h"

#include "lm_kernels.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- the rounding kernel --------------------------------------------------------------------- */

/* x rounded to nearest even in a format of p significant bits, minimum normal exponent emin and
 * maximum exponent emax, as (sign, integer significand m, exponent q: value m 2^q), decided on the
 * integer bits of x only; *inf set on overflow.  Independent of round64.c (no float arithmetic). */
static void xm_round_bits(double x, int p, int emin, int emax, int *neg, uint64_t *m, int *q, int *inf)
{
    uint64_t u;
    memcpy(&u, &x, 8);
    *neg = (int)(u >> 63);
    *inf = 0;
    const int be = (int)((u >> 52) & 0x7FF);
    uint64_t f = u & ((1ull << 52) - 1);
    int e; /* x = f 2^e, f an integer */
    if (be == 0) {
        e = -1074;
    } else {
        f |= 1ull << 52;
        e = be - 1075;
    }
    if (f == 0) {
        *m = 0;
        *q = 0;
        return;
    }
    int top = 63 - __builtin_clzll(f) + e; /* exponent of the leading bit */
    int E = top < emin ? emin : top;
    int qq = E - (p - 1); /* the quantum's exponent */
    uint64_t mm;
    if (qq <= e) {
        mm = f << (e - qq); /* exact (f < 2^53, shift keeps it under 2^64 for our formats) */
    } else {
        const int sh = qq - e;
        if (sh > 60) {
            mm = 0; /* below half the quantum: no, f < 2^53 <= 2^(sh-1) */
        } else {
            const uint64_t rem = f & ((1ull << sh) - 1), half = 1ull << (sh - 1);
            mm = f >> sh;
            if (rem > half || (rem == half && (mm & 1)))
                mm++;
        }
    }
    if (mm == (1ull << p)) { /* carried into the next binade */
        mm >>= 1;
        qq++;
    }
    if (mm != 0 && (63 - __builtin_clzll(mm)) + qq > emax)
        *inf = 1;
    *m = mm;
    *q = qq;
}

/* the expected output bits of x in dtype t */
static uint32_t xm_expect_bits(double x, lm_kdtype t)
{
    const int p = t == LM_KDT_F32 ? 24 : t == LM_KDT_BF16 ? 8 : 11;
    const int emin = t == LM_KDT_F16 ? -14 : -126, emax = t == LM_KDT_F16 ? 15 : 127;
    const int ebits = t == LM_KDT_F16 ? 5 : 8, mbits = p - 1, bias = (1 << (ebits - 1)) - 1;
    int neg, q, inf;
    uint64_t m;
    xm_round_bits(x, p, emin, emax, &neg, &m, &q, &inf);
    uint32_t b;
    if (inf) {
        b = ((1u << ebits) - 1) << mbits;
    } else if (m == 0) {
        b = 0;
    } else if (m < (1ull << (p - 1))) { /* subnormal: q == emin - (p - 1) */
        b = (uint32_t)m;
    } else {
        b = ((uint32_t)(q + (p - 1) + bias) << mbits) | (uint32_t)(m & ((1ull << mbits) - 1));
    }
    return b | ((uint32_t)neg << (ebits + mbits));
}

static uint64_t g_r64 = 0x5eed64;

static uint64_t xm_next(void)
{
    g_r64 ^= g_r64 << 13;
    g_r64 ^= g_r64 >> 7;
    g_r64 ^= g_r64 << 17;
    return g_r64;
}

static double xm_from_bits(uint64_t u)
{
    double d;
    memcpy(&d, &u, 8);
    return d;
}

/* values around every rounding boundary of the three formats: midpoints and their neighbours in
 * f64, subnormals of each, the overflow thresholds, plus random bit patterns */
static size_t xm_round_inputs(double *v, size_t cap)
{
    size_t n = 0;
    const int ps[3] = {24, 8, 11};
    const int emins[3] = {-126, -126, -14};
    for (int f = 0; f < 3; f++)
        for (int e = emins[f] - ps[f] - 2; e <= (f == 2 ? 16 : 128) && n + 64 < cap; e++)
            for (int k = 0; k < 6; k++) {
                /* a random significand of the format at exponent e, plus half a quantum */
                const int E = e < emins[f] ? emins[f] : e, q = E - (ps[f] - 1);
                const uint64_t m = (xm_next() >> (64 - ps[f])) | (e >= emins[f] ? 1ull << (ps[f] - 1) : 0);
                const double mid = ldexp((double)m + 0.5, q);
                const double sgn = (xm_next() & 1) ? -1.0 : 1.0;
                v[n++] = sgn * mid;
                v[n++] = sgn * nextafter(mid, 0);
                v[n++] = sgn * nextafter(mid, INFINITY);
                v[n++] = sgn * ldexp((double)m, q);
            }
    const double specials[] = {0.0, -0.0, 65504.0, 65519.99, 65520.0, 65520.00000001, -65520.0, 0x1p-24, 0x1p-25,
                               0x1.0000000000001p-25, 0x1p-26, 0x1.fep127, 0x1.fefffffffffffp127, 0x1.ffp127,
                               0x1.ffffffp127, 0x1.fffffe8p127, 0x1p128, 0x1p-133, 0x1p-134, 0x1.8p-134, 0x1p-149,
                               0x1p-150, 0x1.0000000000001p-150, 0x1p-151, 4.9e-324, 1e300, -1e300, 3.4028235e38};
    for (size_t i = 0; i < sizeof specials / sizeof specials[0]; i++)
        v[n++] = specials[i];
    while (n < cap) {
        uint64_t u = xm_next();
        /* exponents near the formats' ranges mostly */
        const uint64_t be = 1023 + (uint64_t)((int)(xm_next() % 300) - 160);
        u = (u & 0x800FFFFFFFFFFFFFull) | (be << 52);
        v[n++] = xm_from_bits(u);
    }
    return n;
}

/* every kernel variant the CPU has (slot f64_round): the integer rounding on every input, and
 * the reference's bits on NaN and inf inputs with payloads too */
Test(exact_method, f64_round_once_matches_integer_rounding, .timeout = 60)
{
    enum { N = 200000 };
    double *v = malloc(N * sizeof *v);
    uint32_t *o32 = malloc(N * sizeof *o32);
    uint16_t *o16 = malloc(N * sizeof *o16);
    cr_assert(v && o32 && o16);
    const size_t n = xm_round_inputs(v, N);
    const lm_kdtype ts[3] = {LM_KDT_F32, LM_KDT_BF16, LM_KDT_F16};
    static const char *const variants[] = {"ref", "avx2", "avx512"};
    int n_variants = 0;
    for (int vi = 0; vi < 3; vi++) {
        lm_kernels kv;
        if (lm_kernels_select(&kv, variants[vi]) != 0)
            continue;
        n_variants++;
        for (int k = 0; k < 3; k++) {
            uint64_t double_wrong = 0;
            /* odd lengths and offsets: every tail */
            for (size_t off = 0; off < 3; off++) {
                const size_t len = n - off - (off * 7) % 5;
                if (ts[k] == LM_KDT_F32)
                    kv.f64_round(v + off, o32 + off, ts[k], len);
                else
                    kv.f64_round(v + off, o16 + off, ts[k], len);
                for (size_t i = off; i < off + len; i++) {
                    const uint32_t want = xm_expect_bits(v[i], ts[k]);
                    const uint32_t got = ts[k] == LM_KDT_F32 ? o32[i] : o16[i];
                    cr_assert_eq(got, want, "%s, dtype %d: %a rounds to 0x%x, the kernel wrote 0x%x", variants[vi],
                                 (int)ts[k], v[i], want, got);
                    if (ts[k] == LM_KDT_BF16)
                        double_wrong += lm_f32_to_bf16_1((float)v[i]) != want;
                    else if (ts[k] == LM_KDT_F16)
                        double_wrong += lm_f32_to_f16_1((float)v[i]) != want;
                    /* the scalar form agrees */
                    if (ts[k] != LM_KDT_F32)
                        cr_assert_eq(lm_f64_to_16_1(v[i], ts[k]), want);
                }
            }
            if (ts[k] != LM_KDT_F32) /* the inputs do reach cases that f64 -> f32 -> out gets wrong */
                cr_assert_gt(double_wrong, 100, "dtype %d: only %llu double-rounding cases", (int)ts[k],
                             (unsigned long long)double_wrong);
        }
        /* NaN stays NaN; NaN payloads and infinities as the reference writes them */
        double sp[37];
        for (int i = 0; i < 37; i++)
            sp[i] = xm_from_bits(0x7FF0000000000000ull | ((uint64_t)(i % 2) << 63) |
                                 (i < 2 ? 0 : xm_next() >> (i % 3 == 0 ? 12 : 40)));
        for (int k = 0; k < 3; k++) {
            uint32_t w32[37], g32[37];
            uint16_t w16[37], g16[37];
            void *want = ts[k] == LM_KDT_F32 ? (void *)w32 : (void *)w16, *got = ts[k] == LM_KDT_F32 ? (void *)g32 : (void *)g16;
            lm_f64_round_ref(sp, want, ts[k], 37);
            kv.f64_round(sp, got, ts[k], 37);
            cr_assert(memcmp(want, got, ts[k] == LM_KDT_F32 ? sizeof w32 : sizeof w16) == 0, "%s: NaN/inf bits, dtype %d",
                      variants[vi], (int)ts[k]);
        }
        const double nan = NAN;
        uint16_t h;
        kv.f64_round(&nan, &h, LM_KDT_BF16, 1);
        cr_assert((h & 0x7F80u) == 0x7F80u && (h & 0x7Fu) != 0);
        kv.f64_round(&nan, &h, LM_KDT_F16, 1);
        cr_assert((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu) != 0);
    }
    cr_assert_geq(n_variants, 1);
    free(v);
    free(o32);
    free(o16);
}

/* ---- cases on disk ------------------------------------------------------------------------- */
static uint64_t g_rng = 0x0f7;

/* ---- row transforms: OFT, BOFT, HRA ------------------------------------------------------------ */
/* Each merges W' [O, I] row by row: y_a = s_r sum_b M[a, b] x_b with M [I, I] built here from the
 * stored adapter values by PEFT's formula in long double (s_r = 1 but for BOFT). */
enum { XM_O = 24, XM_I = 32, XM_BS = 8 };

typedef struct {
    long double M[XM_I][XM_I];
    long double s[XM_O];
    int bnd_exp;     /* f64 noise bound: 2^-bnd_exp of sum |s M x| */
    char cfg[512];   /* adapter_config.json */
    const char *type;
} xm_rot;

/* C = A B for XM_BS x XM_BS (long double) */
static void xm_mm8(long double A[XM_BS][XM_BS], long double B[XM_BS][XM_BS], long double C[XM_BS][XM_BS])
{
    for (int a = 0; a < XM_BS; a++)
        for (int b = 0; b < XM_BS; b++) {
            long double s = 0;
            for (int i = 0; i < XM_BS; i++)
                s += A[a][i] * B[i][b];
            C[a][b] = s;
        }
}

/* OFT (OFTLayer, Cayley-Neumann, num_cayley_neumann_terms 5): Q_j skew from the stored upper
 * triangle, R_j = I + 2Q + 2Q^2 + 2Q^3 + Q^4; W' = W @ blockdiag(R_j)^T */
static void xm_oft_R(const double *tri, long double R[XM_BS][XM_BS])
{
    long double Q[XM_BS][XM_BS] = {{0}}, P[XM_BS][XM_BS], T[XM_BS][XM_BS];
    int t = 0;
    for (int a = 0; a < XM_BS; a++)
        for (int b = a + 1; b < XM_BS; b++, t++) {
            Q[a][b] = tri[t];
            Q[b][a] = -tri[t];
        }
    memcpy(P, Q, sizeof P);
    for (int a = 0; a < XM_BS; a++)
        for (int b = 0; b < XM_BS; b++)
            R[a][b] = (a == b) + 2 * Q[a][b];
    for (int k = 2; k <= 4; k++) { /* P = Q^k */
        xm_mm8(P, Q, T);
        memcpy(P, T, sizeof P);
        for (int a = 0; a < XM_BS; a++)
            for (int b = 0; b < XM_BS; b++)
                R[a][b] += (k < 4 ? 2 : 1) * P[a][b];
    }
}

/* BOFT (one butterfly factor): Q_j = (X_j - X_j^T) / 2, R_j = (I - Q)(I + Q)^-1 (torch.linalg.solve
 * with left=False), W' = (W @ blockdiag(R_j)^T) * boft_s [O, 1] */
static void xm_boft_R(const double *X, long double R[XM_BS][XM_BS])
{
    long double A[XM_BS][2 * XM_BS], Im[XM_BS][XM_BS];
    for (int a = 0; a < XM_BS; a++)
        for (int b = 0; b < XM_BS; b++) {
            const long double q = 0.5L * ((long double)X[a * XM_BS + b] - (long double)X[b * XM_BS + a]);
            A[a][b] = (a == b) + q;          /* I + Q */
            A[a][XM_BS + b] = (a == b);
            Im[a][b] = (a == b) - q;         /* I - Q */
        }
    tx_gauss_jordan(&A[0][0], XM_BS); /* A -> [I | (I + Q)^-1] */
    long double Inv[XM_BS][XM_BS];
    for (int a = 0; a < XM_BS; a++)
        for (int b = 0; b < XM_BS; b++)
            Inv[a][b] = A[a][XM_BS + b];
    xm_mm8(Im, Inv, R);
}

/* the adapter of `type` (OFT, BOFT, HRA) for q_proj [O, I] with magnitude qs, and its M, s */
static void xm_rot_adapter(const char *type, double qs, int gs, tx_set *ad, xm_rot *T)
{
    memset(T, 0, sizeof *T);
    T->type = type;
    for (int r = 0; r < XM_O; r++)
        T->s[r] = 1;
    const uint64_t nb = XM_I / XM_BS;
    if (!strcmp(type, "OFT") || !strcmp(type, "BOFT")) {
        const int oft = !strcmp(type, "OFT");
        const uint64_t per = oft ? XM_BS * (XM_BS - 1) / 2 : XM_BS * XM_BS;
        tx_t *q = oft ? tx_add(ad, "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight", "F32", 2, nb, per)
                      : tx_add(ad, "base_model.model.model.layers.0.self_attn.q_proj.boft_R", "F32", 2, nb, per);
        if (!oft) { /* [1, nb, bs, bs] */
            q->nd = 4;
            q->shape[0] = 1;
            q->shape[1] = nb;
            q->shape[2] = q->shape[3] = XM_BS;
        }
        for (uint64_t e = 0; e < q->n; e++)
            q->v[e] = (double)(float)(qs * th_rand_normal(&g_rng));
        for (uint64_t j = 0; j < nb; j++) {
            long double R[XM_BS][XM_BS];
            if (oft)
                xm_oft_R(q->v + j * per, R);
            else
                xm_boft_R(q->v + j * per, R);
            for (int a = 0; a < XM_BS; a++)
                for (int b = 0; b < XM_BS; b++)
                    T->M[j * XM_BS + a][j * XM_BS + b] = R[a][b];
        }
        if (oft) {
            snprintf(T->cfg, sizeof T->cfg, "{\"peft_type\": \"OFT\", \"target_modules\": [\"q_proj\"], \"r\": 0, "
                     "\"oft_block_size\": %d, \"use_cayley_neumann\": true, \"num_cayley_neumann_terms\": 5, "
                     "\"coft\": false, \"block_share\": false}", XM_BS);
            T->bnd_exp = 48;
        } else {
            tx_t *s = tx_add(ad, "base_model.model.model.layers.0.self_attn.q_proj.boft_s", "F32", 2, XM_O, 1);
            for (int r = 0; r < XM_O; r++)
                T->s[r] = s->v[r] = (double)(float)(1.0 + (r % 5 == 0 ? 1e-7 : 0.3) * th_rand_uniform(&g_rng));
            snprintf(T->cfg, sizeof T->cfg, "{\"peft_type\": \"BOFT\", \"target_modules\": [\"q_proj\"], "
                     "\"boft_block_size\": %d, \"boft_block_num\": 0, \"boft_n_butterfly_factor\": 1}", XM_BS);
            T->bnd_exp = 46; /* a Gauss-Jordan inverse in f64 */
        }
        return;
    }
    /* HRA: hra_u [I, r]; u_i its normalised columns (Gram-Schmidt with apply_GS); H = prod (I - 2 u_i u_i^T)
     * (apply_GS: I - 2 sum u_i u_i^T); W' = W @ H, so y_a = sum_b H[b, a] x_b: M = H^T */
    enum { RK = 4 };
    tx_t *u = tx_add(ad, "base_model.model.model.layers.0.self_attn.q_proj.hra_u", "F32", 2, XM_I, RK);
    for (uint64_t e = 0; e < u->n; e++)
        u->v[e] = (double)(float)(th_rand_normal(&g_rng) * (e % 3 == 0 ? qs : 1.0));
    long double U[RK][XM_I], H[XM_I][XM_I], H2[XM_I][XM_I];
    for (int i = 0; i < RK; i++) {
        long double ss = 0;
        for (int x = 0; x < XM_I; x++)
            U[i][x] = u->v[x * RK + i];
        if (gs)
            for (int l = 0; l < i; l++) {
                long double d = 0;
                for (int x = 0; x < XM_I; x++)
                    d += U[l][x] * (long double)u->v[x * RK + i];
                for (int x = 0; x < XM_I; x++)
                    U[i][x] -= d * U[l][x];
            }
        for (int x = 0; x < XM_I; x++)
            ss += U[i][x] * U[i][x];
        for (int x = 0; x < XM_I; x++)
            U[i][x] /= sqrtl(ss);
    }
    for (int a = 0; a < XM_I; a++)
        for (int b = 0; b < XM_I; b++)
            H[a][b] = a == b;
    for (int i = 0; i < RK; i++) {
        for (int a = 0; a < XM_I; a++)
            for (int b = 0; b < XM_I; b++) {
                if (gs) {
                    H2[a][b] = H[a][b] - 2 * U[i][a] * U[i][b];
                    continue;
                }
                long double s = 0; /* H (I - 2 u u^T) */
                for (int k = 0; k < XM_I; k++)
                    s += H[a][k] * ((k == b) - 2 * U[i][k] * U[i][b]);
                H2[a][b] = s;
            }
        memcpy(H, H2, sizeof H);
    }
    for (int a = 0; a < XM_I; a++)
        for (int b = 0; b < XM_I; b++)
            T->M[a][b] = H[b][a];
    snprintf(T->cfg, sizeof T->cfg, "{\"peft_type\": \"HRA\", \"target_modules\": [\"q_proj\"], \"r\": %d, "
             "\"apply_GS\": %s}", RK, gs ? "true" : "false");
    T->bnd_exp = 45; /* 32-term sums and the WY form */
}

typedef enum { XM_CANCEL, XM_TINY, XM_SUBNORMAL } xm_mode;

/* mode CANCEL makes each row M^T e with, per 8 columns, one large target component and the others
 * 2^-12 or less, so after rounding the base most transformed values are the rounding residue of
 * large ones (cancellation by 2^8 .. 2^24); TINY transforms by ~1e-7 (results within an ulp of the
 * base); SUBNORMAL does CANCEL at a scale whose results are subnormal in the output dtype */
static void xm_rot_case(const char *type, const char *bdt, xm_mode mode, int gs)
{
    tx_set base = {0}, ad = {0};
    tx_t *w = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", bdt, 2, XM_O, XM_I);
    tx_t *other = tx_add(&base, "model.layers.0.self_attn.k_proj.weight", bdt, 2, 4, XM_I);
    for (uint64_t e = 0; e < other->n; e++)
        other->v[e] = th_round_to(0.01 * (double)e, bdt);
    xm_rot *T = malloc(sizeof *T);
    xm_rot_adapter(type, mode == XM_TINY ? 1e-7 : 0.08, gs, &ad, T);
    const double scale = mode != XM_SUBNORMAL ? 1.0 : !strcmp(bdt, "F16") ? 0x1p-10 : 0x1p-118;
    /* targets down to 2^-28 (bf16/f16: the residue of rounding the base dominates); f32 outputs
     * 2^-12 only (a cancellation by 2^12, which an f32 evaluation mostly gets wrong): deeper, the
     * f64 noise of the sums reaches an f32 ulp of the result and the rule allows either side */
    const int tstep = strcmp(bdt, "F32") ? 8 : 0;
    for (uint64_t r = 0; r < XM_O; r++) {
        long double e[XM_I];
        for (int a = 0; a < XM_I; a++)
            e[a] = a % XM_BS == (int)(r + (uint64_t)a / XM_BS) % XM_BS
                       ? (0.5 + fabs(th_rand_uniform(&g_rng))) * (r % 2 ? -1 : 1)
                       : ldexpl(th_rand_uniform(&g_rng), -12 - (int)(r % 3) * tstep);
        for (int b = 0; b < XM_I; b++) {
            long double x = 0;
            if (mode == XM_TINY)
                x = 0.05 * th_rand_normal(&g_rng);
            else
                for (int a = 0; a < XM_I; a++)
                    x += T->M[a][b] * e[a]; /* M^T e */
            w->v[r * XM_I + (uint64_t)b] = th_round_to((double)x * scale, bdt);
        }
    }
    tx_case c;
    tx_case_write(&c, &base, &ad, T->cfg);
    th_run_result res = tx_merge(&c, c.out, NULL);
    cr_assert_eq(res.status, 0, "%s %s: exit %d: %s", type, bdt, res.status, res.err);
    long double *ref = malloc(w->n * sizeof *ref), *bnd = malloc(w->n * sizeof *bnd);
    float *y32 = malloc(w->n * sizeof *y32);
    for (uint64_t r = 0; r < XM_O; r++)
        for (int a = 0; a < XM_I; a++) {
            long double s = 0, sa = 0;
            float s32 = 0;
            for (int b = 0; b < XM_I; b++) {
                const double x = w->v[r * XM_I + (uint64_t)b];
                s += T->M[a][b] * x;
                sa += fabsl(T->M[a][b] * x);
                s32 = fmaf((float)T->M[a][b], (float)x, s32);
            }
            const uint64_t e = r * XM_I + (uint64_t)a;
            ref[e] = T->s[r] * s;
            bnd[e] = ldexpl(fabsl(T->s[r]) * sa, -T->bnd_exp);
            y32[e] = (float)T->s[r] * s32;
        }
    char what[96];
    snprintf(what, sizeof what, "%s%s %s %s", type, gs ? "-GS" : "", bdt,
             mode == XM_CANCEL ? "cancel" : mode == XM_TINY ? "tiny" : "subnormal");
    uint64_t rec = 0;
    const uint64_t wrong = tx_verify(&c, &res, w->name, w->n, ref, bnd, y32, bdt, what, &rec);
    if (mode == XM_CANCEL) /* the construction is adversarial */
        cr_assert_gt(wrong, 0, "%s: an f32 evaluation gets every element right: not adversarial", what);
    if (mode == XM_TINY && strcmp(bdt, "F32") != 0 && strcmp(type, "HRA") != 0) /* the f32 form's bound is tight */
        cr_assert_lt(rec, w->n / 4, "%s: %llu of %llu elements recomputed: the bound certifies too few", what,
                     (unsigned long long)rec, (unsigned long long)w->n);
    th_run_free(&res);
    tx_same_bytes(&c, what);
    free(ref);
    free(bnd);
    free(y32);
    free(T);
    tx_case_free(&c, &base, &ad);
}

static void xm_rot_all(const char *type, const char *bdt, int gs)
{
    xm_rot_case(type, bdt, XM_CANCEL, gs);
    xm_rot_case(type, bdt, XM_TINY, gs);
    xm_rot_case(type, bdt, XM_SUBNORMAL, gs);
}

Test(exact_method, oft_bf16, .timeout = 60) { xm_rot_all("OFT", "BF16", 0); }
Test(exact_method, oft_f16, .timeout = 60) { xm_rot_all("OFT", "F16", 0); }
Test(exact_method, oft_f32, .timeout = 60) { xm_rot_all("OFT", "F32", 0); }
Test(exact_method, boft_bf16, .timeout = 60) { xm_rot_all("BOFT", "BF16", 0); }
Test(exact_method, boft_f16, .timeout = 60) { xm_rot_all("BOFT", "F16", 0); }
Test(exact_method, boft_f32, .timeout = 60) { xm_rot_all("BOFT", "F32", 0); }
Test(exact_method, hra_bf16, .timeout = 60) { xm_rot_all("HRA", "BF16", 0); }
Test(exact_method, hra_f16, .timeout = 60) { xm_rot_all("HRA", "F16", 1); }
Test(exact_method, hra_f32, .timeout = 60)
{
    xm_rot_all("HRA", "F32", 0);
    xm_rot_case("HRA", "F32", XM_CANCEL, 1);
}

/* a transformed f16 value beyond 65504 is refused naming the tensor, nothing written (v < 0: the
 * Householder vector that reflects the all-60000 row onto its first axis: 60000 sqrt(8)) */
static void xm_f16_overflow(const char *cfg, const char *part, int nd, uint64_t d0, uint64_t d1, double v,
                            const char *part2, uint64_t n2, double v2)
{
    tx_set base = {0}, ad = {0};
    tx_t *w = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", "F16", 2, 8, 8);
    tx_t *q = tx_add(&ad, part, "F32", nd == 4 ? 2 : nd, d0, d1);
    if (nd == 4) {
        q->nd = 4;
        q->shape[0] = 1;
        q->shape[1] = 1;
        q->shape[2] = q->shape[3] = 8;
    }
    if (part2 != NULL) {
        tx_t *q2 = tx_add(&ad, part2, "F32", 2, n2, 1);
        for (uint64_t e = 0; e < q2->n; e++)
            q2->v[e] = v2;
    }
    for (uint64_t e = 0; e < w->n; e++)
        w->v[e] = 60000;
    for (uint64_t e = 0; e < q->n; e++)
        q->v[e] = v < 0 ? (e == 0 ? 1 / sqrt(8.0) - 1 : 1 / sqrt(8.0)) : v * (e % 2 ? 1 : -1);
    tx_expect_refused(&base, &ad, cfg, "model.layers.0.self_attn.q_proj.weight", "F16");
}

Test(exact_method, f16_overflow_refused, .timeout = 60)
{
    xm_f16_overflow("{\"peft_type\": \"OFT\", \"target_modules\": [\"q_proj\"], \"r\": 0, \"oft_block_size\": 8}",
                    "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight", 2, 1, 28, 0.25, NULL, 0, 0);
    xm_f16_overflow("{\"peft_type\": \"BOFT\", \"target_modules\": [\"q_proj\"], \"boft_block_size\": 8}",
                    "base_model.model.model.layers.0.self_attn.q_proj.boft_R", 4, 1, 64, 0.01,
                    "base_model.model.model.layers.0.self_attn.q_proj.boft_s", 8, 1.2);
    xm_f16_overflow("{\"peft_type\": \"HRA\", \"target_modules\": [\"q_proj\"], \"r\": 1}",
                    "base_model.model.model.layers.0.self_attn.q_proj.hra_u", 2, 8, 1, -1.0, NULL, 0, 0);
}

/* ---- element-wise types: MiSS, HiRA, RoAd ------------------------------------------------------ */
/* q_proj [8, 32]; each reference in long double from the stored values, bound 2^-48 of the sum of
 * the terms' magnitudes (a handful of f64 roundings; RoAd's cos/sin in f64 within 1 ulp) */
enum { XE_O = 8, XE_I = 32, XE_R = 4 };

/* ---- the f64 tile by row blocks (lm_f64_rows_tile: MiSS, HRA) --------------------------------
 * q_proj [40, 4096] (xm_elem_case_as, wide): a default tile is the whole tensor, which the f64
 * form takes in 5 blocks of 8 rows, and --tile-elems 100 (a row per tile, tx_same_bytes) a row at
 * a time: the same bytes.  Each element against long double: MiSS W + d exact (half the elements
 * W = -d + a residue below bf16's ulp: cancellation to a tiny value; a few huge and subnormal
 * bases); HRA the reflections applied in turn, within 2^-40 of the row's norm (f64 noise of
 * 4096-term sums). */
enum { XW_O = 40, XW_I = 4096, XW_R = 4 };

/* MiSS on q_proj w [O, I], r = R: W[o, c] += block[c mod r, o], half the elements W = -block + a
 * residue below W's ulp (cancellation to a tiny value); ref, bnd, y32 and the config filled */
static void xm_miss(tx_set *ad, tx_t *w, uint64_t R, const char *bdt, long double *ref, long double *bnd, float *y32,
                    char *cfg, size_t cap)
{
    const uint64_t O = w->shape[0], I = w->shape[1];
    tx_t *b = tx_add(ad, "base_model.model.model.layers.0.self_attn.q_proj.miss_block", "F32", 2, R, O);
    for (uint64_t e = 0; e < b->n; e++)
        b->v[e] = (double)(float)(0.05 * th_rand_normal(&g_rng) * (e % 3 ? 1 : 1e-4));
    for (uint64_t o = 0; o < O; o++)
        for (uint64_t c = 0; c < I; c++) {
            const uint64_t e = o * I + c;
            const double d = b->v[(c % R) * O + o];
            if (c % 2)
                w->v[e] = th_round_to(-d + ldexp(th_rand_uniform(&g_rng), -30), bdt);
            ref[e] = (long double)w->v[e] + d;
            bnd[e] = 0; /* W + d is exact in f64: every element, ties included, must be the nearest */
            y32[e] = (float)w->v[e] + (float)d;
        }
    snprintf(cfg, cap, "{\"peft_type\": \"MISS\", \"target_modules\": [\"q_proj\"], \"r\": %d, \"mini_r\": 1}",
             (int)R);
}

/* wide: q_proj [XW_O, XW_I] (MiSS, HRA), with a few huge and subnormal base values; else
 * [XE_O, XE_I] */
static void xm_elem_case_as(const char *type, const char *bdt, int wide)
{
    tx_set base = {0}, ad = {0};
    tx_t *w = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", bdt, 2, wide ? XW_O : XE_O, wide ? XW_I : XE_I);
    const uint64_t n = w->n;
    long double *ref = malloc(n * sizeof *ref), *bnd = malloc(n * sizeof *bnd);
    float *y32 = malloc(n * sizeof *y32);
    char cfg[400];
    const double big = !strcmp(bdt, "F16") ? 3e4 : 1e30, tiny = !strcmp(bdt, "F16") ? 0x1p-20 : 0x1p-130;
    for (uint64_t e = 0; e < n; e++)
        w->v[e] = th_round_to(0.05 * th_rand_normal(&g_rng) * (!wide ? 1 : e % 97 == 0 ? big : e % 89 == 0 ? tiny : 1), bdt);
    if (!strcmp(type, "MISS")) {
        xm_miss(&ad, w, wide ? XW_R : XE_R, bdt, ref, bnd, y32, cfg, sizeof cfg);
    } else if (!strcmp(type, "HRA")) {
        tx_t *u = tx_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.hra_u", "F32", 2, XW_I, XW_R);
        for (uint64_t e = 0; e < u->n; e++)
            u->v[e] = (double)(float)th_rand_normal(&g_rng);
        long double *U = malloc(XW_R * XW_I * sizeof *U);
        for (int i = 0; i < XW_R; i++) {
            long double ss = 0;
            for (int x = 0; x < XW_I; x++)
                ss += (long double)u->v[x * XW_R + i] * u->v[x * XW_R + i];
            for (int x = 0; x < XW_I; x++)
                U[i * XW_I + x] = u->v[x * XW_R + i] / sqrtl(ss);
        }
        for (uint64_t o = 0; o < XW_O; o++) { /* y = x H_0 H_1 ...: each reflection in turn */
            long double *y = ref + o * XW_I, nx = 0;
            for (int x = 0; x < XW_I; x++) {
                y[x] = w->v[o * XW_I + (uint64_t)x];
                nx += y[x] * y[x];
            }
            for (int i = 0; i < XW_R; i++) {
                long double d = 0;
                for (int x = 0; x < XW_I; x++)
                    d += y[x] * U[i * XW_I + x];
                for (int x = 0; x < XW_I; x++)
                    y[x] -= 2 * d * U[i * XW_I + x];
            }
            for (int x = 0; x < XW_I; x++) {
                bnd[o * XW_I + (uint64_t)x] = ldexpl(sqrtl(nx), -40);
                y32[o * XW_I + (uint64_t)x] = (float)y[x];
            }
        }
        free(U);
        snprintf(cfg, sizeof cfg, "{\"peft_type\": \"HRA\", \"target_modules\": [\"q_proj\"], \"r\": %d}", XW_R);
    } else if (!strcmp(type, "HIRA")) { /* W' = W + W * (B A): B A = -1 + small */
        tx_t *A = tx_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.hira_A", "F32", 2, XE_R, XE_I);
        tx_t *B = tx_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.hira_B", "F32", 2, XE_O, XE_R);
        /* 1 + B A ~ 1e-6 (a cancellation by 2^20); f32 outputs 1e-3 (2^10: deeper, f64 noise reaches
         * an f32 ulp of the result) */
        const double sm = strcmp(bdt, "F32") ? 1e-3 : 3e-2;
        for (uint64_t e = 0; e < A->n; e++)
            A->v[e] = e < XE_I ? 1.0 : (double)(float)(th_rand_normal(&g_rng) * sm);
        for (uint64_t e = 0; e < B->n; e++)
            B->v[e] = e % XE_R == 0 ? -1.0 : (double)(float)(th_rand_normal(&g_rng) * sm);
        for (uint64_t o = 0; o < XE_O; o++)
            for (uint64_t c = 0; c < XE_I; c++) {
                long double p = 0, pa = 0;
                float p32 = 0;
                for (uint64_t k = 0; k < XE_R; k++) {
                    p += (long double)B->v[o * XE_R + k] * A->v[k * XE_I + c];
                    pa += fabsl((long double)B->v[o * XE_R + k] * A->v[k * XE_I + c]);
                    p32 = fmaf((float)B->v[o * XE_R + k], (float)A->v[k * XE_I + c], p32);
                }
                const uint64_t e = o * XE_I + c;
                ref[e] = (long double)w->v[e] + (long double)w->v[e] * p;
                bnd[e] = ldexpl(fabsl((long double)w->v[e]) * (1 + pa), -49);
                y32[e] = (float)w->v[e] + (float)w->v[e] * p32;
            }
        snprintf(cfg, sizeof cfg, "{\"peft_type\": \"HIRA\", \"target_modules\": [\"q_proj\"], \"r\": %d}", XE_R);
    } else { /* RoAd road_1, groups of 4: rows p, q = p + 2 share (c, s) = alpha (cos, sin) theta;
              * p <- c W_p - s W_q, q <- s W_p + c W_q; W_q = (c / s) W_p + residue cancels row p */
        const uint64_t nt = XE_O / 2;
        tx_t *th = tx_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.road_theta", "F32", 1, nt, 0);
        tx_t *al = tx_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.road_alpha", "F32", 1, nt, 0);
        for (uint64_t t = 0; t < nt; t++) {
            th->v[t] = (double)(float)(0.3 + 0.5 * th_rand_uniform(&g_rng));
            al->v[t] = (double)(float)(1.0 + 0.1 * th_rand_uniform(&g_rng));
        }
        for (uint64_t G = 0; G < XE_O / 4; G++)
            for (uint64_t x = 0; x < 2; x++) {
                const uint64_t p = G * 4 + x, q = p + 2, t = G * 2 + x;
                const long double cv = al->v[t] * cosl(th->v[t]), sv = al->v[t] * sinl(th->v[t]);
                for (uint64_t c = 0; c < XE_I; c++)
                    if (c % 2)
                        w->v[q * XE_I + c] = th_round_to(th_round_to((double)(cv / sv * w->v[p * XE_I + c]), "BF16"),
                                                         bdt); /* a residue of 2^-8 relative */
                for (uint64_t c = 0; c < XE_I; c++) {
                    const long double a = w->v[p * XE_I + c], b = w->v[q * XE_I + c];
                    ref[p * XE_I + c] = cv * a - sv * b;
                    ref[q * XE_I + c] = sv * a + cv * b;
                    bnd[p * XE_I + c] = bnd[q * XE_I + c] = ldexpl(fabsl(cv * a) + fabsl(sv * b), -49);
                    y32[p * XE_I + c] = (float)cv * (float)a - (float)sv * (float)b;
                    y32[q * XE_I + c] = (float)sv * (float)a + (float)cv * (float)b;
                }
            }
        snprintf(cfg, sizeof cfg, "{\"peft_type\": \"ROAD\", \"target_modules\": [\"q_proj\"], \"group_size\": 4, "
                 "\"variant\": \"road_1\"}");
    }
    tx_case c;
    tx_case_write(&c, &base, &ad, cfg);
    th_run_result res = tx_merge(&c, c.out, NULL);
    cr_assert_eq(res.status, 0, "%s %s: exit %d: %s", type, bdt, res.status, res.err);
    char what[64];
    snprintf(what, sizeof what, "%s %s [%llu, %llu]", type, bdt, (unsigned long long)w->shape[0],
             (unsigned long long)w->shape[1]);
    uint64_t rec = 0;
    tx_verify(&c, &res, w->name, n, ref, bnd, y32, bdt, what, &rec);
    cr_assert_eq(rec, n, "%s: --json says %llu recomputed, the f64 form computes all %llu", what,
                 (unsigned long long)rec, (unsigned long long)n);
    th_run_free(&res);
    tx_same_bytes(&c, what);
    free(ref);
    free(bnd);
    free(y32);
    tx_case_free(&c, &base, &ad);
}

static void xm_elem_case(const char *type, const char *bdt)
{
    xm_elem_case_as(type, bdt, 0);
}

static void xm_elem_all(const char *type)
{
    xm_elem_case(type, "BF16");
    xm_elem_case(type, "F16");
    xm_elem_case(type, "F32");
}

Test(exact_method, miss, .timeout = 60) { xm_elem_all("MISS"); }
Test(exact_method, hira, .timeout = 60) { xm_elem_all("HIRA"); }
Test(exact_method, road, .timeout = 60) { xm_elem_all("ROAD"); }

/* the f64 tile by row blocks (see XW_O) */
Test(exact_method, miss_wide, .timeout = 120)
{
    xm_elem_case_as("MISS", "BF16", 1);
    xm_elem_case_as("MISS", "F16", 1);
}

Test(exact_method, hra_wide, .timeout = 120)
{
    xm_elem_case_as("HRA", "BF16", 1);
    xm_elem_case_as("HRA", "F16", 1);
}
