/* SPDX-License-Identifier: MIT */
/* th_exact.h : the exactness tests' toolkit (test_exact_method.c, test_exact_lyco.c,
 * test_exact_additive.c): tensors built in f64 and written as a base and an
 * adapter, merged by the binary with --json, the output checked element by
 * element against a long-double reference rounded once. */
#ifndef TH_EXACT_H
#define TH_EXACT_H

#include "th.h"

#include <stdint.h>

#define TX_MAX 12

typedef struct {
  char name[160];
  char dtype[8];
  int nd;
  uint64_t shape[4];
  uint64_t n;
  double *v; /* as stored */
} tx_t;

typedef struct {
  tx_t t[TX_MAX];
  int n;
} tx_set;

typedef struct {
  char *dir;
  char base[600], adir[600], out[600];
} tx_case;

tx_t *tx_add(tx_set *s, const char *name, const char *dtype, int nd,
             uint64_t d0, uint64_t d1);

void tx_write(const char *path, const tx_set *s);

void tx_free(tx_set *s);

void tx_case_write(tx_case *c, const tx_set *base, const tx_set *ad,
                   const char *cfg);

/* base and ad freed, the case's directory removed and freed */
void tx_case_free(tx_case *c, tx_set *base, tx_set *ad);

th_run_result tx_merge(const tx_case *c, const char *out,
                       const char *const *opts);

void tx_json_tensor(const char *json, const char *name, int *exact,
                    double *recomputed);

double *tx_out_values(const char *path, const char *name, uint64_t n);

/* Every element: ref (long double) +- bnd (a bound on f64 evaluation noise)
 * rounds to one value, which out must be; or the interval straddles a boundary
 * and out lies between its two roundings (counted in *n_amb).  @return how many
 * elements a plain f32 evaluation (y32) gets wrong. */
uint64_t tx_check(const double *out, const long double *ref,
                  const long double *bnd, const float *y32, uint64_t n,
                  const char *dtype, const char *what, uint64_t *n_amb);

/* the same bytes with --threads 1 and 2, --tile-elems 100 and --kernels ref */
void tx_same_bytes(const tx_case *c, const char *what);
/* the same with options extra (NULL-terminated) added to every run */
void tx_same_bytes_with(const tx_case *c, const char *what,
                        const char *const *extra);

/* the merged tensor checked against ref/bnd/y32; --json exact with every
 * element recomputed */
uint64_t tx_verify(const tx_case *c, const th_run_result *r, const char *name,
                   uint64_t n, const long double *ref, const long double *bnd,
                   const float *y32, const char *odt, const char *what,
                   uint64_t *recomputed);

/* ---- one runner for the adversarial cases of a type (test_exact_additive.c,
 * test_exact_lyco.c) ---- */
typedef enum { TX_CANCEL, TX_TINY, TX_HUGE, TX_SUBNORMAL, TX_OVERFLOW } tx_mode;

typedef struct tx_type tx_type;
struct tx_type {
  const char *name;
  int id;              /* the file's own type */
  uint64_t rows, cols; /* the q_proj weight the adapter changes */
  /* the adapter at gain g (its first tensor, ad->t[0], scales the delta
   * linearly) written into ad; D: its delta in long double from the stored
   * values (PEFT's formula), mag: the same sum of absolute terms.  @return
   * its adapter_config.json */
  const char *(*adapter)(const tx_type *ty, double g, tx_set *ad,
                         long double *D, long double *mag);
  /* the gain of mode on a base of dtype bdt */
  double (*gain)(const tx_type *ty, const char *bdt, tx_mode mode);
  int noise_log2;  /* f64 noise: mag 2^noise_log2 + |ref| 2^-52; 0: the f64
                      evaluation is exact here (every element the nearest) */
  int f32_form;    /* bf16/f16 outputs take an f32 form with a bound (TINY:
                      under a tenth recomputed); else the f64 tile path (every
                      element recomputed) */
  int delta_f32_exact; /* the delta is exact in f32: CANCEL does not trap an
                          f32 evaluation */
  uint64_t *rng;        /* the file's random stream (W's values too) */
  int f32_bound; /* f32 outputs take an f64 form with a bound too (the low-rank
                    kernel): --json's recomputed counts only what it leaves
                    undecided, not every element */
};

/* Merges ty's adapter onto a base built from its delta in mode: CANCEL W =
 * -(the delta rounded to bf16); TINY the delta far under an ulp of W ~0.05;
 * HUGE W ~1e-6 of the delta; SUBNORMAL CANCEL at a scale whose results are
 * subnormal; OVERFLOW (f16) the delta ~8000, W 60000 with its sign, refused.
 * Every element checked against the reference (tx_verify), --json exact with
 * the recomputed count ty says; CANCEL: the same bytes across threads, tiles
 * and kernels (tx_same_bytes). */
void tx_run_case(const tx_type *ty, const char *bdt, tx_mode mode);

/* the checks of tx_run_case on a merge that succeeded (res, into c->out): W
 * (w's stored values) + D against the output, with ty's noise bound on mag,
 * --json's recomputed count, the f32 evaluation wrong somewhere (CANCEL, not
 * bf16), subnormal results (SUBNORMAL), the same bytes across threads, tiles
 * and kernels (CANCEL) */
void tx_check_case(const tx_type *ty, const tx_case *c,
                   const th_run_result *res, const tx_t *w,
                   const long double *D, const long double *mag,
                   const char *bdt, tx_mode mode, const char *what);

/* Gauss-Jordan with partial pivoting on the n x 2n long-double rows at A
 * (row-major, [M | I]): A becomes [I | M^-1] */
void tx_gauss_jordan(long double *A, int n);

/*! tx_f32_normal() : g times a normal draw from *rng, rounded to f32: a value an adapter stores
 *  exactly */
double tx_f32_normal(uint64_t *rng, double g);

/*! tx_param() : an F32 tensor name of shape [d0] (d1 == 0) or [d0, d1], of tx_f32_normal(rng, g)
 *  values */
tx_t *tx_param(tx_set *ad, const char *name, uint64_t d0, uint64_t d1, double g, uint64_t *rng);

/* tx_run_case for bf16, f16 and f32 bases in every mode, and f16 OVERFLOW */
void tx_run_type(const tx_type *ty);

/* r, a merge into out, refused: non-zero exit, stderr naming `tensor` and
 * `word` (the dtype, "F16"), out not created */
void tx_assert_refused(const th_run_result *r, const char *out,
                       const char *tensor, const char *word);

/* base and ad written with cfg (tx_case_write) and merged: refused as
 * tx_assert_refused says; frees base, ad and the case */
void tx_expect_refused(tx_set *base, tx_set *ad, const char *cfg,
                       const char *tensor, const char *word);

#endif
