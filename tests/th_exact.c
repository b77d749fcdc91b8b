/* SPDX-License-Identifier: MIT */
/* th_exact.c : see th_exact.h. */
#include "th_exact.h"

#include <cJSON.h>
#include <math.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
tx_t *tx_add(tx_set *s, const char *name, const char *dtype, int nd,
             uint64_t d0, uint64_t d1) {
  cr_assert_lt(s->n, TX_MAX);
  tx_t *t = &s->t[s->n++];
  memset(t, 0, sizeof *t);
  snprintf(t->name, sizeof t->name, "%s", name);
  snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
  t->nd = nd;
  t->shape[0] = d0;
  t->shape[1] = d1;
  t->n = nd == 1 ? d0 : d0 * d1;
  t->v = calloc(t->n, sizeof(double));
  return t;
}

void tx_write(const char *path, const tx_set *s) {
  th_out_tensor o[TX_MAX];
  for (int k = 0; k < s->n; k++) {
    memset(&o[k], 0, sizeof o[k]);
    o[k].name = s->t[k].name;
    o[k].dtype = s->t[k].dtype;
    o[k].n_dims = s->t[k].nd;
    for (int d = 0; d < 4; d++)
      o[k].shape[d] = s->t[k].shape[d];
    o[k].values = s->t[k].v;
  }
  cr_assert_eq(th_st_write(path, o, (size_t)s->n), 0, "cannot write %s", path);
}

void tx_free(tx_set *s) {
  for (int k = 0; k < s->n; k++)
    free(s->t[k].v);
  s->n = 0;
}

void tx_case_write(tx_case *c, const tx_set *base, const tx_set *ad,
                   const char *cfg) {
  c->dir = th_tmpdir();
  cr_assert_not_null(c->dir);
  snprintf(c->base, sizeof c->base, "%s/base.safetensors", c->dir);
  snprintf(c->adir, sizeof c->adir, "%s/adapter", c->dir);
  snprintf(c->out, sizeof c->out, "%s/out.safetensors", c->dir);
  cr_assert_eq(mkdir(c->adir, 0755), 0);
  tx_write(c->base, base);
  char p[700];
  snprintf(p, sizeof p, "%s/adapter_model.safetensors", c->adir);
  tx_write(p, ad);
  cr_assert_eq(th_write_text(c->adir, "adapter_config.json", cfg), 0);
}

void tx_case_free(tx_case *c, tx_set *base, tx_set *ad) {
  tx_free(base);
  tx_free(ad);
  th_rmrf(c->dir);
  free(c->dir);
}

th_run_result tx_merge(const tx_case *c, const char *out,
                       const char *const *opts) {
  const char *argv[24];
  int n = 0;
  argv[n++] = th_bin();
  argv[n++] = "--json";
  for (; opts && *opts; opts++)
    argv[n++] = *opts;
  argv[n++] = c->base;
  argv[n++] = c->adir;
  argv[n++] = out;
  argv[n] = NULL;
  return th_run(NULL, argv);
}

void tx_json_tensor(const char *json, const char *name, int *exact,
                    double *recomputed) {
  cJSON *js = cJSON_Parse(json);
  cr_assert_not_null(js, "--json output is not JSON: %s", json);
  const cJSON *ct = cJSON_GetObjectItem(js, "changed_tensors"), *e;
  int found = 0;
  cJSON_ArrayForEach(e, ct) {
    if (strcmp(cJSON_GetStringValue(cJSON_GetObjectItem(e, "name")), name) != 0)
      continue;
    found = 1;
    *exact = cJSON_IsTrue(cJSON_GetObjectItem(e, "exact"));
    const cJSON *r = cJSON_GetObjectItem(e, "recomputed");
    *recomputed = cJSON_IsNumber(r) ? r->valuedouble : -1;
  }
  cJSON_Delete(js);
  cr_assert(found, "%s is not among the changed tensors: %s", name, json);
}

double *tx_out_values(const char *path, const char *name, uint64_t n) {
  th_st o;
  cr_assert_eq(th_st_read(path, &o), 0, "output %s unreadable", path);
  const th_tensor *t = th_st_find(&o, name);
  cr_assert_not_null(t, "%s missing from the output", name);
  cr_assert_eq(t->n_elems, n);
  double *v = th_to_f64(t);
  th_st_free(&o);
  return v;
}

/* Every element: ref (long double) +- bnd (a bound on f64 evaluation noise)
 * rounds to one value, which out must be; or the interval straddles a boundary
 * and out is one of its two roundings (counted in *n_amb).  @return how many
 * elements a plain f32 evaluation (y32) gets wrong. */
uint64_t tx_check(const double *out, const long double *ref,
                  const long double *bnd, const float *y32, uint64_t n,
                  const char *dtype, const char *what, uint64_t *n_amb) {
  uint64_t f32_wrong = 0;
  for (uint64_t e = 0; e < n; e++) {
    const double lo = th_round_to((double)(ref[e] - bnd[e]), dtype),
                 hi = th_round_to((double)(ref[e] + bnd[e]), dtype);
    const double want = th_round_to((double)ref[e], dtype);
    if (lo == hi) {
      cr_assert(out[e] == want || (out[e] == 0 && want == 0),
                "%s: element %llu is %a, the f64 value %La rounded once is %a",
                what, (unsigned long long)e, out[e], ref[e], want);
      f32_wrong += th_round_to((double)y32[e], dtype) != want;
    } else {
      cr_assert(out[e] >= lo && out[e] <= hi,
                "%s: element %llu is %a, outside [%a, %a] (value %La +- %Lg)",
                what, (unsigned long long)e, out[e], lo, hi, ref[e], bnd[e]);
      (*n_amb)++;
    }
  }
  return f32_wrong;
}

/* the same bytes with --threads 1 and 2, --tile-elems 100 and --kernels ref */
void tx_same_bytes(const tx_case *c, const char *what) {
  tx_same_bytes_with(c, what, NULL);
}

void tx_same_bytes_with(const tx_case *c, const char *what,
                        const char *const *extra) {
  const char *const v[3][5] = {{"--threads", "1", "--tile-elems", "100", NULL},
                               {"--threads", "2", "--tile-elems", "64", NULL},
                               {"--threads", "2", "--kernels", "ref", NULL}};
  for (int k = 0; k < 3; k++) {
    char o[700];
    snprintf(o, sizeof o, "%s/det%d.safetensors", c->dir, k);
    const char *opts[12];
    int n = 0;
    for (int i = 0; v[k][i] != NULL; i++)
      opts[n++] = v[k][i];
    for (int i = 0; extra != NULL && extra[i] != NULL && n < 11; i++)
      opts[n++] = extra[i];
    opts[n] = NULL;
    th_run_result r = tx_merge(c, o, opts);
    cr_assert_eq(r.status, 0, "%s, variant %d: exit %d: %s", what, k, r.status,
                 r.err);
    th_run_free(&r);
    cr_assert(th_files_equal(o, c->out),
              "%s: variant %d (%s %s %s %s) changed the bytes", what, k,
              v[k][0], v[k][1], v[k][2], v[k][3]);
  }
}

/* the merged tensor checked against ref/bnd/y32; --json exact with every
 * element recomputed */
static uint64_t tx_verify_as(const tx_case *c, const th_run_result *r,
                             const char *name, uint64_t n,
                             const long double *ref, const long double *bnd,
                             const float *y32, const char *odt,
                             const char *what, uint64_t *recomputed,
                             int f32_bound) {
  double *o = tx_out_values(c->out, name, n);
  uint64_t amb = 0;
  const uint64_t wrong = tx_check(o, ref, bnd, y32, n, odt, what, &amb);
  free(o);
  int exact;
  double rec;
  tx_json_tensor(r->out, name, &exact, &rec);
  cr_assert(exact, "%s: --json does not say exact", what);
  /* f32 outputs: every element computed in f64 (unless f32_bound: those an f64
   * form's bound left uncertain); bf16/f16: those the f32 form's bound left
   * uncertain (all, for a type without one) */
  if (!strcmp(odt, "F32") && !f32_bound)
    cr_assert_eq(
        (uint64_t)rec, n,
        "%s: --json says %g recomputed, the f64 path computes all %llu", what,
        rec, (unsigned long long)n);
  else
    cr_assert(rec >= 0 && (uint64_t)rec <= n,
              "%s: --json says %g recomputed of %llu", what, rec,
              (unsigned long long)n);
  if (recomputed != NULL)
    *recomputed = (uint64_t)rec;
  cr_assert_leq(amb, n / 50 + 1,
                "%s: %llu of %llu elements within f64 noise of a boundary",
                what, (unsigned long long)amb, (unsigned long long)n);
  fprintf(stderr,
          "%s: %llu of %llu elements an f32 evaluation gets wrong, %llu within "
          "f64 noise of a "
          "boundary, all others the nearest value; %g recomputed in f64\n",
          what, (unsigned long long)wrong, (unsigned long long)n,
          (unsigned long long)amb, rec);
  return wrong;
}

uint64_t tx_verify(const tx_case *c, const th_run_result *r, const char *name,
                   uint64_t n, const long double *ref, const long double *bnd,
                   const float *y32, const char *odt, const char *what,
                   uint64_t *recomputed) {
  return tx_verify_as(c, r, name, n, ref, bnd, y32, odt, what, recomputed, 0);
}

void tx_assert_refused(const th_run_result *r, const char *out,
                       const char *tensor, const char *word) {
  cr_assert_neq(r->status, 0, "an f16 overflow was written: %s", r->out);
  cr_assert(strstr(r->err, tensor) != NULL && strstr(r->err, word) != NULL,
            "the error does not name the tensor and the dtype: %s", r->err);
  cr_assert(!th_exists(out), "an output was left");
}

void tx_expect_refused(tx_set *base, tx_set *ad, const char *cfg,
                       const char *tensor, const char *word) {
  tx_case c;
  tx_case_write(&c, base, ad, cfg);
  th_run_result r = tx_merge(&c, c.out, NULL);
  tx_assert_refused(&r, c.out, tensor, word);
  th_run_free(&r);
  tx_case_free(&c, base, ad);
}

void tx_gauss_jordan(long double *A, int n) {
  for (int c = 0; c < n; c++) {
    int piv = c;
    for (int r = c + 1; r < n; r++)
      if (fabsl(A[r * 2 * n + c]) > fabsl(A[piv * 2 * n + c]))
        piv = r;
    for (int k = 0; k < 2 * n; k++) {
      const long double t = A[c * 2 * n + k];
      A[c * 2 * n + k] = A[piv * 2 * n + k];
      A[piv * 2 * n + k] = t;
    }
    const long double d = A[c * 2 * n + c];
    for (int k = 0; k < 2 * n; k++)
      A[c * 2 * n + k] /= d;
    for (int r = 0; r < n; r++)
      if (r != c) {
        const long double f = A[r * 2 * n + c];
        for (int k = 0; k < 2 * n; k++)
          A[r * 2 * n + k] -= f * A[c * 2 * n + k];
      }
  }
}

/* the largest |delta| */
static long double tx_max_abs(const long double *D, uint64_t n) {
  long double m = 0;
  for (uint64_t e = 0; e < n; e++)
    m = fabsl(D[e]) > m ? fabsl(D[e]) : m;
  return m;
}

static const char *const TX_MODE_NAMES[] = {"cancel", "tiny", "huge",
                                            "subnormal", "overflow"};

void tx_check_case(const tx_type *ty, const tx_case *c,
                          const th_run_result *res, const tx_t *w,
                          const long double *D, const long double *mag,
                          const char *bdt, tx_mode mode, const char *what) {
  const uint64_t n = w->n;
  const int f16 = !strcmp(bdt, "F16");
  long double *ref = malloc(n * sizeof *ref), *bnd = malloc(n * sizeof *bnd);
  float *y32 = malloc(n * sizeof *y32);
  for (uint64_t e = 0; e < n; e++) {
    ref[e] = w->v[e] + D[e];
    /* f64 noise: a few roundings per term of the delta, and the final sum */
    bnd[e] = ty->noise_log2 ? ldexpl(mag[e], ty->noise_log2) +
                                  ldexpl(fabsl(ref[e]), -52)
                            : 0;
    y32[e] = (float)w->v[e] + (float)D[e]; /* an f32 evaluation */
  }
  uint64_t rec = 0;
  const uint64_t wrong =
      tx_verify_as(c, res, w->name, n, ref, bnd, y32, bdt, what, &rec,
                   ty->f32_bound);
  if (!ty->f32_form)
    cr_assert_eq(rec, n,
                 "%s: --json says %llu recomputed, the f64 path computes all "
                 "%llu",
                 what, (unsigned long long)rec, (unsigned long long)n);
  else if (mode == TX_TINY && strcmp(bdt, "F32") != 0)
    cr_assert_lt(rec, n / 10,
                 "%s: %llu of %llu recomputed: the f32 form's bound is not "
                 "used",
                 what, (unsigned long long)rec, (unsigned long long)n);
  /* bf16: the residue is often exact in f32 */
  if (mode == TX_CANCEL && strcmp(bdt, "BF16") != 0 && !ty->delta_f32_exact)
    cr_assert_gt(wrong, 0,
                 "%s: an f32 evaluation gets every element right: not "
                 "adversarial",
                 what);
  if (mode == TX_SUBNORMAL) { /* the construction reaches the subnormal range */
    double *o = tx_out_values(c->out, w->name, n);
    uint64_t sub = 0, nz = 0; /* of the elements the delta changes */
    for (uint64_t e = 0; e < n; e++) {
      nz += D[e] != 0;
      sub += D[e] != 0 && o[e] != 0 && fabs(o[e]) < (f16 ? 0x1p-14 : 0x1p-126);
    }
    free(o);
    cr_assert_gt(sub, nz / 4, "%s: only %llu of %llu results subnormal", what,
                 (unsigned long long)sub, (unsigned long long)nz);
  }
  if (mode == TX_CANCEL)
    tx_same_bytes(c, what);
  free(ref);
  free(bnd);
  free(y32);
}

void tx_run_case(const tx_type *ty, const char *bdt, tx_mode mode) {
  const uint64_t O = ty->rows, I = ty->cols, n = O * I;
  long double *D = malloc(n * sizeof *D), *mag = malloc(n * sizeof *mag);
  tx_set base = {0}, ad = {0};
  tx_t *w = tx_add(&base, "model.layers.0.self_attn.q_proj.weight", bdt, 2, O,
                   I);
  tx_t *other =
      tx_add(&base, "model.layers.0.self_attn.k_proj.weight", bdt, 2, 4, I);
  for (uint64_t e = 0; e < other->n; e++)
    other->v[e] = th_round_to(0.01 * (double)e, bdt);
  const char *cfg = ty->adapter(ty, ty->gain(ty, bdt, mode), &ad, D, mag);
  if (mode == TX_OVERFLOW) { /* the delta ~8000 at its largest (its first
                                tensor scaled), W 60000 with its sign */
    const long double m = tx_max_abs(D, n);
    tx_t *f = &ad.t[0];
    for (uint64_t e = 0; e < f->n; e++)
      f->v[e] = (double)(float)(f->v[e] * (double)(8000 / m));
  }
  for (uint64_t e = 0; e < n; e++) {
    switch (mode) {
    case TX_CANCEL:
    case TX_SUBNORMAL:
      w->v[e] = th_round_to(-th_round_to((double)D[e], "BF16"), bdt);
      break;
    case TX_TINY: w->v[e] = th_round_to(0.05 * th_rand_normal(ty->rng), bdt); break;
    case TX_HUGE: w->v[e] = th_round_to(1e-6 * th_rand_normal(ty->rng), bdt); break;
    case TX_OVERFLOW: w->v[e] = D[e] < 0 ? -60000.0 : 60000.0; break;
    }
  }
  tx_case c;
  tx_case_write(&c, &base, &ad, cfg);
  th_run_result res = tx_merge(&c, c.out, NULL);
  char what[96];
  snprintf(what, sizeof what, "%s %s %s", ty->name, bdt, TX_MODE_NAMES[mode]);
  if (mode == TX_OVERFLOW) {
    cr_assert_neq(res.status, 0, "%s: exit 0, the result overflows f16", what);
    cr_assert(strstr(res.err, "q_proj.weight") != NULL,
              "%s: the error does not name the tensor: %s", what, res.err);
    cr_assert(!th_exists(c.out), "%s: an output was written", what);
  } else {
    cr_assert_eq(res.status, 0, "%s: exit %d: %s", what, res.status, res.err);
    tx_check_case(ty, &c, &res, w, D, mag, bdt, mode, what);
  }
  th_run_free(&res);
  free(D);
  free(mag);
  tx_case_free(&c, &base, &ad);
}

void tx_run_type(const tx_type *ty) {
  static const char *const dts[3] = {"BF16", "F16", "F32"};
  for (int d = 0; d < 3; d++)
    for (int m = TX_CANCEL; m <= TX_SUBNORMAL; m++)
      tx_run_case(ty, dts[d], (tx_mode)m);
  tx_run_case(ty, "F16", TX_OVERFLOW);
}

double tx_f32_normal(uint64_t *rng, double g)
{
    return (double)(float)(g * th_rand_normal(rng));
}

tx_t *tx_param(tx_set *ad, const char *name, uint64_t d0, uint64_t d1, double g, uint64_t *rng)
{
    tx_t *t = tx_add(ad, name, "F32", d1 ? 2 : 1, d0, d1);
    for (uint64_t e = 0; e < t->n; e++)
        t->v[e] = tx_f32_normal(rng, g);
    return t;
}
