/* SPDX-License-Identifier: MIT */
/* th_exact.h : the exactness tests' toolkit (test_exact_method.c,
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

/* the merged tensor checked against ref/bnd/y32; --json exact with every
 * element recomputed */
uint64_t tx_verify(const tx_case *c, const th_run_result *r, const char *name,
                   uint64_t n, const long double *ref, const long double *bnd,
                   const float *y32, const char *odt, const char *what,
                   uint64_t *recomputed);

/* r, a merge into out, refused: non-zero exit, stderr naming `tensor` and
 * `word` (the dtype, "F16"), out not created */
void tx_assert_refused(const th_run_result *r, const char *out,
                       const char *tensor, const char *word);

/* base and ad written with cfg (tx_case_write) and merged: refused as
 * tx_assert_refused says; frees base, ad and the case */
void tx_expect_refused(tx_set *base, tx_set *ad, const char *cfg,
                       const char *tensor, const char *word);

#endif
