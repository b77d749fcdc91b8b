/* SPDX-License-Identifier: MIT */
/* fourierft.c : FourierFT (peft-merge.md §5.10, Appendix A): W += scale * Re(ifft2(S)), S the
 * out x in spectrum holding fourierft_spectrum at the positions torch.randperm(out * in,
 * seed)[:n] draws (torch_rng.c).  Each row of the delta is one inverse real FFT (FFTW, double)
 * of that row's sparse spectrum, so a tile costs its rows x (n + in log in), not a rank-2n
 * product; memory is the positions and one twiddle table per tensor. */
#include "method.h"

#include "linalg.h"
#include "lm_error.h"
#include "lm_sys.h"
#include "torch_rng.h"

#include <fftw3.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* FFTW is loaded on first use, not linked: loading it cost every run ~2-3 ms of one core before
 * main(), and only FourierFT needs it.  Its functions are called through their addresses in the
 * loaded library (ft_lib loaded first, in prepare). */
#define FT_FNS(X) X(fftw_destroy_plan) X(fftw_execute_dft_c2r) X(fftw_free) X(fftw_malloc) X(fftw_plan_dft_c2r_1d)
LM_LAZY_LIBRARY(ft_lib, FT_FNS, "FFTW (libfftw3.so.3)", "merging a FourierFT adapter", "libfftw3.so.3", "libfftw3.so");

#define fftw_destroy_plan (*lm_lazy_fns.fftw_destroy_plan)
#define fftw_execute_dft_c2r (*lm_lazy_fns.fftw_execute_dft_c2r)
#define fftw_free (*lm_lazy_fns.fftw_free)
#define fftw_malloc (*lm_lazy_fns.fftw_malloc)
#define fftw_plan_dft_c2r_1d (*lm_lazy_fns.fftw_plan_dft_c2r_1d)

#define FT_MAX_ELEMS 214748364ull /* torch's randperm switches to 64-bit draws beyond (not reproduced) */

typedef struct {
    double scaling; /* (150) */
    long seed;      /* random_loc_seed (777) */
    long n_frequency; /* 0: not in the file */
    lm_suffix_pattern pattern; /* n_frequency_pattern */
} fourierft_cfg;

typedef struct {
    const lm_ts_tensor *spectrum;
    uint64_t out, in;
    uint64_t seed;
    int transposed; /* W stored [in, out]: tile rows run along `in` */
} fourierft_params;

typedef struct {
    lm_sparse_spectrum sp;
    fftw_plan plan; /* c2r of length n_cols, unaligned arrays */
} fourierft_prep;

static lm_code fourierft_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    fourierft_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    f->scaling = 150.0;
    f->seed = 777;
    if (lm_cfg_num(root, "scaling", &f->scaling, err) || lm_cfg_int(root, "random_loc_seed", &f->seed, err) ||
        lm_cfg_int(root, "n_frequency", &f->n_frequency, err))
        return err->code;
    return lm_suffix_pattern_parse(root, "n_frequency_pattern", &f->pattern, err);
}

static void fourierft_free_config(void *mcfg)
{
    if (mcfg == NULL)
        return;
    lm_suffix_pattern_free(&((fourierft_cfg *)mcfg)->pattern);
    free(mcfg);
}

/* PEFT makes fourierft_spectrum [n_frequency] (n_frequency_pattern, n_frequency) */
static lm_code fourierft_check_config(lm_plan_ctx *ctx, const lm_module *m, uint64_t n, lm_err *err)
{
    const fourierft_cfg *f = lm_ctx_adapter(ctx)->cfg->mcfg;
    long v = f->n_frequency;
    int got = lm_suffix_pattern_lookup(&f->pattern, m->path, &v);
    if (!lm_cfg_checked(ctx) || got < 0 || (got == 0 && f->n_frequency == 0) || (uint64_t)v == n)
        return LM_OK;
    return lm_cfg_disagrees(ctx, err, m->path, got ? "n_frequency_pattern" : "n_frequency", v,
                            "fourierft_spectrum holds %llu", (unsigned long long)n);
}

static lm_code fourierft_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const fourierft_cfg *fc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *sp = m->part[0];
    long wi = lm_ctx_module_weight(ctx, m->path, err);
    if (wi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, wi);
    int conv1d_names = lm_is_gpt2_conv1d(m->path);
    if (W->n_dims != 2 || sp->n_dims != 1 || !lm_is_float_dtype(sp->dtype))
        return lm_mismatch(err, m->path, "FourierFT needs a 1-D fourierft_spectrum and a 2-D base weight");
    if (fourierft_check_config(ctx, m, sp->n_elems, err) != LM_OK)
        return err->code;
    uint64_t out = conv1d_names ? W->shape[1] : W->shape[0], in = conv1d_names ? W->shape[0] : W->shape[1];
    if (sp->n_elems > out * in)
        return lm_mismatch(err, m->path, "fourierft_spectrum has more entries than the weight");
    if (out * in >= FT_MAX_ELEMS)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "FourierFT on a %llu-element weight: torch's randperm "
                       "switches to another draw there, not reproduced by lora-merge yet", (unsigned long long)(out * in));
    int orient = 0;
    long bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err);
    if (bi < 0)
        return err->code;
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "fourierft", m->path, err);
    fourierft_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    *pr = (fourierft_params){sp, out, in, (uint64_t)fc->seed, orient == 1};
    op->in = in;
    op->out = out;
    op->scale = lm_ctx_adapter(ctx)->weight * fc->scaling;
    op->flops = (double)(orient ? in : out) * ((double)sp->n_elems + 5.0 * (double)(orient ? out : in) *
                                                                     log2((double)(orient ? out : in) + 1.0));
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static void fourierft_destroy(lm_prepared *p)
{
    const fourierft_prep *fp = p->data;
    if (fp != NULL && fp->plan != NULL)
        fftw_destroy_plan(fp->plan);
}

static lm_code fourierft_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const fourierft_params *pr = op->params;
    uint64_t n = pr->spectrum->n_elems;
    if (lm_sys_lazy_load(&ft_lib, err) != LM_OK)
        return err->code;
    fourierft_prep *fp = lm_prep_alloc(p, sizeof *fp, err);
    const float *s = fp ? lm_prep_view(p, pr->spectrum, k, err) : NULL;
    uint64_t *pos = s ? lm_prep_alloc(p, (size_t)(2 * n + 1) * sizeof *pos, err) : NULL;
    if (pos == NULL)
        return LM_E_NOMEM;
    lm_sparse_spectrum *sp = &fp->sp;
    sp->n_rows = pr->transposed ? pr->in : pr->out;
    sp->n_cols = pr->transposed ? pr->out : pr->in;
    sp->n = n;
    uint64_t *rho = pos, *gamma = pos + n;
    double *sv = lm_prep_alloc(p, (size_t)(n + 1) * sizeof *sv, err);
    double *tw = sv ? lm_prep_alloc(p, (size_t)(2 * sp->n_rows) * sizeof *tw, err) : NULL;
    uint64_t *perm = tw ? malloc((size_t)(n + 1) * sizeof *perm) : NULL;
    if (perm == NULL || lm_randperm_prefix(pr->out * pr->in, pr->seed, n, perm) != 0) {
        free(perm);
        return tw ? lm_fail(err, LM_E_NOMEM, NULL, "out of memory") : LM_E_NOMEM;
    }
    for (uint64_t t = 0; t < n; t++) { /* position perm[t] of the [out, in] spectrum */
        uint64_t r = perm[t] / pr->in, c = perm[t] % pr->in;
        rho[t] = pr->transposed ? c : r;
        gamma[t] = pr->transposed ? r : c;
        sv[t] = s[t];
    }
    free(perm);
    lm_twiddles(tw, sp->n_rows);
    sp->rho = rho;
    sp->gamma = gamma;
    sp->s = sv;
    sp->tw = tw;
    sp->norm = op->scale / ((double)pr->out * (double)pr->in);
    size_t nc = (size_t)sp->n_cols;
    fftw_complex *h = fftw_malloc((nc / 2 + 1) * sizeof *h);
    double *y = fftw_malloc(nc * sizeof *y);
    if (h != NULL && y != NULL)
        fp->plan = fftw_plan_dft_c2r_1d((int)nc, h, y, FFTW_ESTIMATE | FFTW_UNALIGNED | FFTW_DESTROY_INPUT);
    fftw_free(h);
    fftw_free(y);
    p->data = fp;
    p->destroy = fourierft_destroy;
    if (fp->plan == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory planning an FFT of %zu points", nc);
    return LM_OK;
}

/* each row's inverse FFT (f64) added to the tile's row: one body for both paths, T the tile's element
 * type (the f32 path rounds each term to float; the exact path adds it in f64, no f32 intermediate,
 * and the engine rounds once).  Scratch: (C/2 + 1) complex, then C reals: 2 C + 2 <= 2 nr cols */
#define FOURIERFT_ROWS(T, p, t)                                                   \
    do {                                                                          \
        const fourierft_prep *fp = (p)->data;                                     \
        double *h = (double *)(t)->scratch;                                       \
        double *y = h + 2 * (fp->sp.n_cols / 2 + 1);                              \
        for (uint64_t i = 0; i < (t)->nr; i++) {                                  \
            lm_half_spectrum_row(&fp->sp, (t)->r0 + i, h);                        \
            fftw_execute_dft_c2r(fp->plan, (fftw_complex *)h, y);                 \
            T *row = (t)->acc + i * (t)->cols;                                    \
            for (uint64_t c = 0; c < fp->sp.n_cols; c++)                          \
                row[c] += (T)(y[c] * fp->sp.norm);                                \
        }                                                                         \
    } while (0)

static void fourierft_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    (void)op;
    FOURIERFT_ROWS(float, p, t);
}

static void fourierft_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    (void)op;
    FOURIERFT_ROWS(double, p, t);
}

static void fourierft_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    const fourierft_cfg *fc = cfg->mcfg;
    snprintf(buf, cap, "fourierft (%llu frequencies, scaling %g, seed %ld)", (unsigned long long)m->part[0]->n_elems,
             fc->scaling, fc->seed);
}

static const lm_part fourierft_parts[] = {{"fourierft_spectrum", 0, -1, 1}};

const lm_method lm_method_fourierft = {
    .peft_type = "FOURIERFT",
    .summary = "sparse spectrum, inverse 2-D DFT",
    .parts = fourierft_parts,
    .n_parts = 1,
    .parse_config = fourierft_parse,
    .free_config = fourierft_free_config,
    .plan_module = fourierft_plan_module,
    .prepare = fourierft_prepare,
    .apply_tile = fourierft_apply,
    .apply_tile64 = fourierft_apply64,
    .describe = fourierft_describe,
};
