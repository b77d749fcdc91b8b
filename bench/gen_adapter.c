/* SPDX-License-Identifier: MIT */
/* gen_adapter.c : writes a PEFT adapter of any mergeable type for an existing base model, with
 * the tensor names, shapes and adapter_config.json keys PEFT's save_pretrained writes
 * (../shared/docs/peft-merge.md §4.3), so the benchmark (bench_merge --case methods) measures
 * every type on a model of real size without Python.  The base's header says which modules
 * exist and their shapes; a few rows of each weight give its scale.  Values are pseudo-random
 * (gen_common.h: same seed, same bytes) and sized like trained parameters, so that the merge
 * changes most weights by a few percent: IA3 vectors 1 +- 0.2, small rotations, Householder
 * vectors in nearly-cancelling pairs, low-rank products of ~5e-4.
 *
 *   gen_adapter --base PATH --out DIR --type TYPE [--rank R] [--alpha A] [--targets T]
 *               [--block N] [--n-frequency N] [--factor F] [--num-vectors N] [--tokens N] [--seed S]
 *               [--adapter-dtype f32|bf16|f16]
 *   TYPE: lora dora ia3 loha lokr oft boft hra miss fourierft vera road adalora randlora vblora
 *         delora gralora shira c3a hira beft ln_tuning trainable_tokens (or the peft_type)
 *   T: all (q, k, v, o, gate, up, down projections), qv, or a comma list of module names
 *   --block: OFT and BOFT block size, RoAd group size, C3A block size, VB-LoRA vector length
 *   --num-vectors: VB-LoRA's bank (256); --tokens: trainable tokens (16, spread over the vocabulary)
 *   Defaults (`gen_adapter --help` lists them) are the configurations of issue 9's table. */
#include "gen_common.h"
#include "lora_merge.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PROG "gen_adapter"

typedef struct {
    char path[200];   /* "model.layers.0.self_attn.q_proj" */
    const char *leaf; /* its last component */
    uint64_t out, in; /* the weight [out, in]; a 1-D weight: [out], in = 0 */
    double rms;       /* root mean square of the weight's first rows */
    int has_bias;
} gen_module;

typedef struct {
    long rank, block, n_freq, factor, n_vectors, n_tokens;
    double alpha;
    lm_dtype adt;
    uint64_t seed;
    /* over all targeted modules: element-wise max of (out, in) (VeRA, RandLoRA) */
    uint64_t max_out, max_in;
    const char *ff; /* IA3 feedforward_modules entry targeted, or NULL */
} gen_opts;

typedef struct {
    gen_tensor *t;
    size_t n, cap;
    lm_dtype adt;
} gen_out;

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, PROG ": ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return -1;
}

/* appends "base_model.model.<module>.<part>" (module NULL: the shared "base_model.<part>") */
static gen_tensor *add(gen_out *g, const gen_module *m, const char *part, size_t nd, const uint64_t *shape, double amp,
                       double offset)
{
    if (g->n == g->cap) {
        size_t cap = g->cap ? 2 * g->cap : 256;
        gen_tensor *t = realloc(g->t, cap * sizeof *t);
        if (t == NULL) {
            fail("out of memory");
            exit(1);
        }
        g->t = t;
        g->cap = cap;
    }
    gen_tensor *t = &g->t[g->n++];
    memset(t, 0, sizeof *t);
    if (m)
        snprintf(t->name, sizeof t->name, "base_model.model.%s.%s", m->path, part);
    else
        snprintf(t->name, sizeof t->name, "base_model.%s", part);
    t->dtype = g->adt;
    t->n_dims = nd;
    memcpy(t->shape, shape, nd * sizeof *shape);
    t->amp = (float)amp;
    t->offset = (float)offset;
    return t;
}
#define SHAPE(...) (sizeof((uint64_t[]){__VA_ARGS__}) / sizeof(uint64_t)), (uint64_t[]){__VA_ARGS__}

/* ---- the types -------------------------------------------------------------------------- */

static int emit_lora(gen_out *g, const gen_module *m, const gen_opts *o, int dora)
{
    uint64_t r = (uint64_t)o->rank;
    add(g, m, "lora_A.weight", SHAPE(r, m->in), 1.0 / sqrt((double)m->in), 0);
    add(g, m, "lora_B.weight", SHAPE(m->out, r), 0.01, 0);
    if (dora) { /* the magnitude: about the norm of each row, +-20% */
        double nrm = m->rms * sqrt((double)m->in);
        add(g, m, "lora_magnitude_vector", SHAPE(m->out), 0.2 * nrm, nrm);
    }
    return 0;
}
static int emit_plain_lora(gen_out *g, const gen_module *m, const gen_opts *o) { return emit_lora(g, m, o, 0); }
static int emit_dora(gen_out *g, const gen_module *m, const gen_opts *o) { return emit_lora(g, m, o, 1); }

static int emit_ia3(gen_out *g, const gen_module *m, const gen_opts *o)
{
    if (o->ff && strcmp(m->leaf, o->ff) == 0) /* feed-forward: scales the input columns */
        add(g, m, "ia3_l", SHAPE(1, m->in), 0.2, 1.0);
    else
        add(g, m, "ia3_l", SHAPE(m->out, 1), 0.2, 1.0);
    return 0;
}

static int emit_loha(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t r = (uint64_t)o->rank;
    add(g, m, "hada_w1_a", SHAPE(m->out, r), 0.13, 0);
    add(g, m, "hada_w1_b", SHAPE(r, m->in), 0.13, 0);
    add(g, m, "hada_w2_a", SHAPE(m->out, r), 0.13, 0);
    add(g, m, "hada_w2_b", SHAPE(r, m->in), 0.13, 0);
    return 0;
}

/* PEFT's lokr factorization(): (m, n), m <= n, m * n = dim, m the divisor closest to factor (or to
 * sqrt(dim) when factor is -1) */
static void factorization(uint64_t dim, long factor, uint64_t *m_out, uint64_t *n_out)
{
    uint64_t m, n;
    if (factor > 0 && dim % (uint64_t)factor == 0) {
        m = (uint64_t)factor;
        n = dim / m;
    } else {
        uint64_t f = factor < 0 ? dim : (uint64_t)factor, len = 1 + dim;
        m = 1;
        n = dim;
        while (m < n) {
            uint64_t nm = m + 1;
            while (dim % nm != 0)
                nm++;
            uint64_t nn = dim / nm;
            if (nm + nn > len || nm > f)
                break;
            m = nm;
            n = nn;
        }
    }
    *m_out = m < n ? m : n;
    *n_out = m < n ? n : m;
}

static int emit_lokr(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t a, b, c, d, r = (uint64_t)o->rank;
    factorization(m->out, o->factor, &a, &b); /* out = a * b */
    factorization(m->in, o->factor, &c, &d);  /* in = c * d */
    add(g, m, "lokr_w1", SHAPE(a, c), 0.1, 0); /* decompose_both false: w1 whole */
    if (2 * r >= (b > d ? b : d)) {            /* use_w2 = not (r < max(b, d) / 2) */
        add(g, m, "lokr_w2", SHAPE(b, d), 0.01, 0);
    } else {
        add(g, m, "lokr_w2_a", SHAPE(b, r), 0.1, 0);
        add(g, m, "lokr_w2_b", SHAPE(r, d), 0.05, 0);
    }
    return 0;
}

/* 0 when the weight's outputs (if outs) and inputs (if ins) are multiples of b, else an error */
static int need_multiple(const gen_module *m, int outs, int ins, uint64_t b, const char *what)
{
    if ((outs && m->out % b) || (ins && m->in % b))
        return fail("%s: the weight [%llu, %llu] does not divide into the %s %llu", m->path,
                    (unsigned long long)m->out, (unsigned long long)m->in, what, (unsigned long long)b);
    return 0;
}

static int emit_oft(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t bs = (uint64_t)o->block;
    if (need_multiple(m, 0, 1, bs, "OFT block size") != 0)
        return -1;
    add(g, m, "oft_R.weight", SHAPE(m->in / bs, bs * (bs - 1) / 2), 0.003, 0);
    return 0;
}

static int emit_boft(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t bs = (uint64_t)o->block;
    if (need_multiple(m, 0, 1, bs, "BOFT block size") != 0)
        return -1;
    add(g, m, "boft_R", SHAPE(1, m->in / bs, bs, bs), 0.005, 0);
    add(g, m, "boft_s", SHAPE(m->out, 1), 0.05, 1.0);
    return 0;
}

static int emit_hra(gen_out *g, const gen_module *m, const gen_opts *o)
{
    gen_tensor *t = add(g, m, "hra_u", SHAPE(m->in, (uint64_t)o->rank), 1.0, 0);
    t->fill = GEN_PAIRED;
    t->eps = 0.08f;
    return 0;
}

static int emit_miss(gen_out *g, const gen_module *m, const gen_opts *o)
{
    add(g, m, "miss_block", SHAPE((uint64_t)o->rank, m->out), 1e-3, 0);
    return 0;
}

static int emit_fourierft(gen_out *g, const gen_module *m, const gen_opts *o)
{
    if ((uint64_t)o->n_freq > m->out * m->in)
        return fail("%s: n_frequency %ld is more than the %llu weights", m->path, o->n_freq,
                    (unsigned long long)(m->out * m->in));
    add(g, m, "fourierft_spectrum", SHAPE((uint64_t)o->n_freq), 0.3, 0);
    return 0;
}

static int emit_vera(gen_out *g, const gen_module *m, const gen_opts *o)
{
    add(g, m, "vera_lambda_b", SHAPE(m->out), 1.0, 0);
    add(g, m, "vera_lambda_d", SHAPE((uint64_t)o->rank), 0.02, 0.1);
    return 0;
}
static int shared_vera(gen_out *g, const gen_opts *o)
{
    uint64_t r = (uint64_t)o->rank; /* kaiming-uniform bounds, as PEFT draws them */
    add(g, NULL, "vera_A", SHAPE(r, o->max_in), 1.0 / sqrt((double)o->max_in), 0);
    add(g, NULL, "vera_B", SHAPE(o->max_out, r), 1.0 / sqrt((double)r), 0);
    return 0;
}

static int emit_road(gen_out *g, const gen_module *m, const gen_opts *o)
{
    if (need_multiple(m, 1, 0, (uint64_t)o->block, "RoAd group size") != 0)
        return -1;
    add(g, m, "road_theta", SHAPE(m->out / 2), 0.05, 0); /* road_1: one angle per output pair */
    add(g, m, "road_alpha", SHAPE(m->out / 2), 0.05, 1.0);
    return 0;
}

static int emit_adalora(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t k = (uint64_t)o->rank; /* init_r; no rank pruned (rank_pattern null) */
    add(g, m, "lora_A", SHAPE(k, m->in), 0.05, 0);
    add(g, m, "lora_B", SHAPE(m->out, k), 0.05, 0);
    add(g, m, "lora_E", SHAPE(k, 1), 0.3, 0);
    return 0;
}

/* RandLoRA: the shared projections are [r, 1, Dmin] and [Dmax, NB, r] for the element-wise
 * largest (out, in); PEFT also saves a copy of both under every module */
enum { RL_STREAM_A = 1u << 30, RL_STREAM_B };
static void randlora_dims(const gen_opts *o, uint64_t *dmin, uint64_t *dmax, uint64_t *nb)
{
    *dmin = o->max_out < o->max_in ? o->max_out : o->max_in;
    *dmax = o->max_out < o->max_in ? o->max_in : o->max_out;
    *nb = (*dmin + (uint64_t)o->rank - 1) / (uint64_t)o->rank;
}
static int emit_randlora(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t r = (uint64_t)o->rank, dmin, dmax, NB, mn = m->out < m->in ? m->out : m->in;
    uint64_t nb = (mn + r - 1) / r;
    randlora_dims(o, &dmin, &dmax, &NB);
    add(g, m, "randlora_A", SHAPE(r, 1, dmin), sqrt(3.0), 0)->stream = RL_STREAM_A;
    add(g, m, "randlora_B", SHAPE(dmax, NB, r), sqrt(3.0), 0)->stream = RL_STREAM_B;
    add(g, m, "randlora_gamma", SHAPE(nb, mn), 2e-3, 0);
    add(g, m, "randlora_lambda", SHAPE(r, nb), 2e-3, 0);
    return 0;
}
static int shared_randlora(gen_out *g, const gen_opts *o)
{
    uint64_t r = (uint64_t)o->rank, dmin, dmax, NB;
    randlora_dims(o, &dmin, &dmax, &NB);
    add(g, NULL, "randlora_A", SHAPE(r, 1, dmin), sqrt(3.0), 0)->stream = RL_STREAM_A; /* unit variance */
    add(g, NULL, "randlora_B", SHAPE(dmax, NB, r), sqrt(3.0), 0)->stream = RL_STREAM_B;
    return 0;
}

static int emit_vblora(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t L = (uint64_t)o->block, r = (uint64_t)o->rank;
    if (need_multiple(m, 1, 1, L, "VB-LoRA vector length") != 0)
        return -1;
    add(g, m, "vblora_logits_A", SHAPE(r, m->in / L, (uint64_t)o->n_vectors), 1.0, 0);
    add(g, m, "vblora_logits_B", SHAPE(m->out / L, r, (uint64_t)o->n_vectors), 1.0, 0);
    return 0;
}
static int shared_vblora(gen_out *g, const gen_opts *o)
{
    add(g, NULL, "vblora_vector_bank", SHAPE((uint64_t)o->n_vectors, (uint64_t)o->block), 0.04, 0);
    return 0;
}

static int emit_delora(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t r = (uint64_t)o->rank;
    double cn = m->rms * sqrt((double)m->out); /* the base's column norms at training time */
    add(g, m, "delora_A", SHAPE(r, m->in), 1.0, 0);
    add(g, m, "delora_B", SHAPE(m->out, r), 1.0, 0);
    add(g, m, "delora_lambda", SHAPE(1), 0.5, 2.0); /* |delta| ~ lambda/sqrt(r*in) of |W| */
    add(g, m, "delora_w_norm", SHAPE(m->in), 0.1 * cn, cn);
    return 0;
}

enum { GRALORA_K = 2 }; /* gralora_k (its config template says so too) */
static int emit_gralora(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t k = GRALORA_K, r = (uint64_t)o->rank;
    if (r % k)
        return fail("r %llu is not a multiple of gralora_k %llu", (unsigned long long)r, (unsigned long long)k);
    if (need_multiple(m, 1, 1, k, "gralora_k blocks") != 0)
        return -1;
    add(g, m, "gralora_A", SHAPE(k, m->in / k, r), 1.0 / sqrt((double)m->in), 0);
    add(g, m, "gralora_B", SHAPE(k, r, m->out / k), 0.01, 0);
    return 0;
}

static int emit_shira(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t nnz = (uint64_t)o->rank * (m->out + m->in);
    if (nnz > m->out * m->in)
        return fail("%s: r %ld gives more SHiRA weights than the layer has", m->path, o->rank);
    add(g, m, "shira_weight", SHAPE(nnz), 0.01, 0);
    gen_tensor *t = add(g, m, "shira_indices", SHAPE(2, nnz), 0, 0);
    t->dtype = LM_DT_I32;
    t->fill = GEN_SORTED_INDEX;
    t->irows = m->out;
    t->icols = m->in;
    return 0;
}

static int emit_c3a(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t b = (uint64_t)o->block;
    if (need_multiple(m, 1, 1, b, "C3A block size") != 0)
        return -1;
    add(g, m, "c3a_kernel", SHAPE(m->out / b, m->in / b, b), 2.0, 0); /* the delta is kernel / in */
    return 0;
}

static int emit_hira(gen_out *g, const gen_module *m, const gen_opts *o)
{
    uint64_t r = (uint64_t)o->rank;
    add(g, m, "hira_A", SHAPE(r, m->in), 0.1, 0);
    add(g, m, "hira_B", SHAPE(m->out, r), 0.1, 0);
    return 0;
}

static int emit_beft(gen_out *g, const gen_module *m, const gen_opts *o)
{
    (void)o;
    if (!m->has_bias)
        return fail("%s: BEFT adapts biases and this layer has none", m->path);
    add(g, m, "beft_bias", SHAPE(1, m->out), 0.01, 0);
    return 0;
}

static int emit_ln_tuning(gen_out *g, const gen_module *m, const gen_opts *o)
{
    (void)o;
    add(g, m, "ln_tuning_layers.weight", SHAPE(m->out), 0.1, 1.0);
    return 0;
}

static int emit_trainable_tokens(gen_out *g, const gen_module *m, const gen_opts *o)
{
    if (m->out < (uint64_t)o->n_tokens)
        return fail("%s: fewer than %ld rows", m->path, o->n_tokens);
    add(g, m, "trainable_tokens_delta", SHAPE((uint64_t)o->n_tokens, m->in), m->rms * sqrt(3.0), 0);
    return 0;
}

typedef enum { MOD_LINEAR, MOD_NORM, MOD_EMBED } mod_kind;

typedef struct {
    const char *name, *peft_type;
    long rank, block;   /* defaults (0: not used) */
    double alpha;
    const char *targets; /* default targets */
    mod_kind kind;
    int (*emit)(gen_out *g, const gen_module *m, const gen_opts *o);
    int (*shared)(gen_out *g, const gen_opts *o); /* adapter-level tensors, or NULL */
    /* the type's own adapter_config.json keys, one per line; $r, $alpha, $block, $nfreq, $factor,
     * $nvectors, $ff (IA3's feed-forward list) and $tokens (trainable token indices) are filled in */
    const char *config;
} type_spec;

static const char ALL_LINEAR[] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";

#define LORA_KEYS(dora)                                                                                          \
    "\"r\": $r,\n\"lora_alpha\": $alpha,\n\"lora_dropout\": 0.0,\n\"bias\": \"none\",\n\"use_rslora\": false,\n" \
    "\"use_dora\": " dora ",\n\"fan_in_fan_out\": false,\n\"init_lora_weights\": true,\n\"rank_pattern\": {},\n"  \
    "\"alpha_pattern\": {},\n"
#define LYCORIS_KEYS                                                                                             \
    "\"r\": $r,\n\"alpha\": $alpha,\n\"rank_dropout\": 0.0,\n\"module_dropout\": 0.0,\n"                          \
    "\"use_effective_conv2d\": false,\n\"init_weights\": true,\n\"rank_pattern\": {},\n\"alpha_pattern\": {},\n"
#define NO_BIAS "\"fan_in_fan_out\": false,\n\"bias\": \"none\",\n"

/* defaults: issue 9's table where it names a configuration, PEFT's defaults otherwise */
static const type_spec TYPES[] = {
    {"lora", "LORA", 16, 0, 32, ALL_LINEAR, MOD_LINEAR, emit_plain_lora, NULL, LORA_KEYS("false")},
    {"dora", "LORA", 16, 0, 32, ALL_LINEAR, MOD_LINEAR, emit_dora, NULL, LORA_KEYS("true")},
    {"ia3", "IA3", 0, 0, 0, ALL_LINEAR, MOD_LINEAR, emit_ia3, NULL,
     "\"feedforward_modules\": [$ff],\n\"fan_in_fan_out\": false,\n\"init_ia3_weights\": true,\n"},
    {"loha", "LOHA", 16, 0, 16, ALL_LINEAR, MOD_LINEAR, emit_loha, NULL, LYCORIS_KEYS},
    {"lokr", "LOKR", 16, 0, 16, ALL_LINEAR, MOD_LINEAR, emit_lokr, NULL,
     LYCORIS_KEYS "\"decompose_both\": false,\n\"decompose_factor\": $factor,\n\"rank_dropout_scale\": false,\n"},
    {"oft", "OFT", 0, 32, 0, ALL_LINEAR, MOD_LINEAR, emit_oft, NULL,
     "\"r\": 0,\n\"oft_block_size\": $block,\n\"use_cayley_neumann\": true,\n\"num_cayley_neumann_terms\": 5,\n"
     "\"block_share\": false,\n\"coft\": false,\n\"eps\": 6e-05,\n\"module_dropout\": 0.0,\n" NO_BIAS
     "\"init_weights\": true,\n"},
    {"boft", "BOFT", 0, 8, 0, ALL_LINEAR, MOD_LINEAR, emit_boft, NULL,
     "\"boft_block_size\": $block,\n\"boft_block_num\": 0,\n\"boft_n_butterfly_factor\": 1,\n\"boft_dropout\": 0.0,\n"
     NO_BIAS "\"init_weights\": true,\n"},
    {"hra", "HRA", 8, 0, 0, ALL_LINEAR, MOD_LINEAR, emit_hra, NULL,
     "\"r\": $r,\n\"apply_GS\": false,\n\"bias\": \"none\",\n\"init_weights\": true,\n"},
    {"miss", "MISS", 64, 0, 0, ALL_LINEAR, MOD_LINEAR, emit_miss, NULL,
     "\"r\": $r,\n\"mini_r\": 1,\n\"miss_dropout\": 0.0,\n\"bias\": \"none\",\n\"init_weights\": true,\n"},
    {"fourierft", "FOURIERFT", 0, 0, 0, "q_proj,v_proj", MOD_LINEAR, emit_fourierft, NULL,
     "\"n_frequency\": $nfreq,\n\"n_frequency_pattern\": {},\n\"scaling\": 150.0,\n\"random_loc_seed\": 777,\n"
     NO_BIAS "\"init_weights\": false,\n"},
    {"vera", "VERA", 256, 0, 0, ALL_LINEAR, MOD_LINEAR, emit_vera, shared_vera,
     "\"r\": $r,\n\"projection_prng_key\": 0,\n\"save_projection\": true,\n\"vera_dropout\": 0.0,\n"
     "\"d_initial\": 0.1,\n" NO_BIAS "\"init_weights\": true,\n"},
    {"road", "ROAD", 0, 64, 0, ALL_LINEAR, MOD_LINEAR, emit_road, NULL,
     "\"variant\": \"road_1\",\n\"group_size\": $block,\n\"init_weights\": true,\n"},
    {"adalora", "ADALORA", 12, 0, 8, ALL_LINEAR, MOD_LINEAR, emit_adalora, NULL,
     "\"r\": 8,\n\"init_r\": $r,\n\"target_r\": 8,\n\"lora_alpha\": $alpha,\n\"lora_dropout\": 0.0,\n" NO_BIAS
     "\"use_rslora\": false,\n\"use_dora\": false,\n\"init_lora_weights\": true,\n\"rank_pattern\": null,\n"
     "\"tinit\": 0,\n\"tfinal\": 0,\n\"deltaT\": 1,\n\"beta1\": 0.85,\n\"beta2\": 0.85,\n\"orth_reg_weight\": 0.5,\n"
     "\"total_step\": 1000,\n"},
    /* v_proj only: PEFT saves a copy of the shared projections (sized for the largest layer)
     * under every module, 46 MB each for all linear layers of a 1.1B model */
    {"randlora", "RANDLORA", 32, 0, 640, "v_proj", MOD_LINEAR, emit_randlora, shared_randlora,
     "\"r\": $r,\n\"randlora_alpha\": $alpha,\n\"projection_prng_key\": 0,\n\"save_projection\": true,\n"
     "\"sparse\": false,\n\"very_sparse\": false,\n\"randlora_dropout\": 0.0,\n" NO_BIAS "\"init_weights\": true,\n"},
    {"vblora", "VBLORA", 4, 256, 0, ALL_LINEAR, MOD_LINEAR, emit_vblora, shared_vblora,
     "\"r\": $r,\n\"num_vectors\": $nvectors,\n\"vector_length\": $block,\n\"topk\": 2,\n\"save_only_topk_weights\": false,\n"
     "\"init_vector_bank_bound\": 0.02,\n\"init_logits_std\": 0.1,\n\"vblora_dropout\": 0.0,\n" NO_BIAS},
    {"delora", "DELORA", 8, 0, 0, ALL_LINEAR, MOD_LINEAR, emit_delora, NULL,
     "\"r\": $r,\n\"delora_lambda\": 15,\n\"rank_pattern\": {},\n\"lambda_pattern\": {},\n\"module_dropout\": 0.0,\n"
     "\"bias\": \"none\",\n\"init_weights\": true,\n"},
    {"gralora", "GRALORA", 32, 0, 64, ALL_LINEAR, MOD_LINEAR, emit_gralora, NULL,
     "\"r\": $r,\n\"alpha\": $alpha,\n\"gralora_k\": 2,\n\"hybrid_r\": 0,\n\"gralora_dropout\": 0.0,\n" NO_BIAS
     "\"init_weights\": true,\n"},
    {"shira", "SHIRA", 32, 0, 0, ALL_LINEAR, MOD_LINEAR, emit_shira, NULL,
     "\"r\": $r,\n\"mask_type\": \"random\",\n\"random_seed\": null,\n\"fan_in_fan_out\": false,\n\"init_weights\": true,\n"},
    {"c3a", "C3A", 0, 256, 0, ALL_LINEAR, MOD_LINEAR, emit_c3a, NULL,
     "\"block_size\": $block,\n\"block_size_pattern\": {},\n\"init_weights\": \"xavier_uniform\",\n\"bias\": \"none\",\n"},
    {"hira", "HIRA", 32, 0, 0, ALL_LINEAR, MOD_LINEAR, emit_hira, NULL,
     "\"r\": $r,\n\"rank_pattern\": {},\n\"hira_dropout\": 0.0,\n\"fan_in_fan_out\": false,\n\"init_weights\": true,\n"},
    {"beft", "BEFT", 0, 0, 0, "q_proj,k_proj,v_proj", MOD_LINEAR, emit_beft, NULL, "\"init_weights\": true,\n"},
    {"ln_tuning", "LN_TUNING", 0, 0, 0, "input_layernorm,post_attention_layernorm,norm", MOD_NORM, emit_ln_tuning,
     NULL, ""},
    {"trainable_tokens", "TRAINABLE_TOKENS", 0, 0, 0, "embed_tokens", MOD_EMBED, emit_trainable_tokens, NULL,
     "\"token_indices\": [$tokens],\n\"init_weights\": true,\n"},
};

/* writes a type's config template, two spaces before each line */
static void write_config(FILE *f, const char *tmpl, const gen_opts *o, uint64_t vocab)
{
    for (const char *p = tmpl; *p; p++) {
        if (p == tmpl || p[-1] == '\n')
            fputs("  ", f);
        if (*p != '$') {
            fputc(*p, f);
            continue;
        }
        size_t n = strspn(p + 1, "abcdefghijklmnopqrstuvwxyz");
#define KEY(k) (n == sizeof k - 1 && strncmp(p + 1, k, n) == 0)
        if (KEY("r"))
            fprintf(f, "%ld", o->rank);
        else if (KEY("alpha"))
            fprintf(f, "%g", o->alpha);
        else if (KEY("block"))
            fprintf(f, "%ld", o->block);
        else if (KEY("nfreq"))
            fprintf(f, "%ld", o->n_freq);
        else if (KEY("factor"))
            fprintf(f, "%ld", o->factor);
        else if (KEY("nvectors"))
            fprintf(f, "%ld", o->n_vectors);
        else if (KEY("ff") && o->ff)
            fprintf(f, "\"%s\"", o->ff);
        else if (KEY("tokens")) {
            uint64_t step = vocab / (uint64_t)o->n_tokens; /* spread over the vocabulary */
            for (long t = 0; t < o->n_tokens; t++)
                fprintf(f, "%s%llu", t ? ", " : "", (unsigned long long)((uint64_t)t * step + (step > 7 ? 7 : 0)));
        }
#undef KEY
        p += n;
    }
}

/* ---- the base ----------------------------------------------------------------------------- */

/* root mean square of the first rows (up to 64k elements) of a float tensor */
static double sample_rms(const lm_model *mdl, const lm_model_entry *e, const lm_kernels *k)
{
    const lm_tensor_info *ti = e->info;
    const uint8_t *p = lm_st_data(lm_model_file(mdl, e->file)) + ti->begin;
    size_t n = ti->n_elems < 65536 ? (size_t)ti->n_elems : 65536;
    float *f = malloc((n ? n : 1) * sizeof *f);
    if (f == NULL)
        return 0;
    if (ti->dtype == LM_DT_BF16)
        k->bf16_to_f32((const uint16_t *)p, f, n);
    else if (ti->dtype == LM_DT_F16)
        k->f16_to_f32((const uint16_t *)p, f, n);
    else if (ti->dtype == LM_DT_F32)
        memcpy(f, p, n * sizeof *f);
    else
        n = 0;
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)f[i] * f[i];
    free(f);
    return n ? sqrt(s / (double)n) : 0;
}

/* the targeted modules of the base, in header order */
static gen_module *find_modules(const lm_model *mdl, const char *targets, mod_kind kind, size_t *n_out,
                                const lm_kernels *k)
{
    size_t nt = lm_model_n_tensors(mdl), n = 0;
    gen_module *ms = calloc(nt ? nt : 1, sizeof *ms);
    if (ms == NULL)
        return NULL;
    for (size_t i = 0; i < nt; i++) {
        const lm_model_entry *e = lm_model_tensor(mdl, i);
        const char *name = e->info->name;
        size_t len = strlen(name);
        if (len < 8 || strcmp(name + len - 7, ".weight") != 0 || len - 7 >= sizeof ms[n].path)
            continue;
        gen_module *m = &ms[n];
        memcpy(m->path, name, len - 7);
        m->path[len - 7] = '\0';
        const char *dot = strrchr(m->path, '.');
        m->leaf = dot ? dot + 1 : m->path;
        size_t want_dims = kind == MOD_NORM ? 1 : 2;
        if (e->info->n_dims != want_dims || !gen_in_list(targets, m->leaf, 0))
            continue;
        m->out = e->info->shape[0];
        m->in = want_dims == 2 ? e->info->shape[1] : 0;
        m->rms = sample_rms(mdl, e, k);
        char bias[sizeof m->path + 8];
        snprintf(bias, sizeof bias, "%s.bias", m->path);
        m->has_bias = lm_model_find(mdl, bias, NULL) != NULL;
        n++;
    }
    *n_out = n;
    return ms;
}

static int mkdir_p(const char *dir)
{
    char p[4096];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1; *s; s++)
        if (*s == '/') {
            *s = '\0';
            if (mkdir(p, 0777) != 0 && errno != EEXIST)
                return -1;
            *s = '/';
        }
    return mkdir(p, 0777) != 0 && errno != EEXIST ? -1 : 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: " PROG " --base PATH --out DIR --type TYPE [--rank R] [--alpha A] [--targets all|qv|NAME,...]\n"
                    "       [--block N] [--n-frequency N] [--factor F] [--num-vectors N] [--tokens N] [--seed S]\n"
                    "       [--adapter-dtype f32|bf16|f16]\n"
                    "types and their defaults:\n");
    for (size_t i = 0; i < sizeof TYPES / sizeof *TYPES; i++) {
        const type_spec *t = &TYPES[i];
        fprintf(stderr, "  %-17s %-17s", t->name, t->peft_type);
        if (t->rank)
            fprintf(stderr, " r %ld", t->rank);
        if (t->alpha)
            fprintf(stderr, " alpha %g", t->alpha);
        if (t->block)
            fprintf(stderr, " block %ld", t->block);
        if (strcmp(t->name, "fourierft") == 0)
            fprintf(stderr, " n_frequency 1000");
        if (strcmp(t->name, "lokr") == 0)
            fprintf(stderr, " factor -1");
        fprintf(stderr, "  targets %s\n", t->targets == ALL_LINEAR ? "all" : t->targets);
    }
}

typedef struct {
    const char *base, *out, *targets;
    const type_spec *ts;
    gen_opts o;
} gen_args;

/* the command line, the type's defaults filled in.  @return 0, or 2 (usage error) */
static int parse_args(int argc, char **argv, gen_args *ga)
{
    const char *type = NULL, *targets = NULL;
    gen_opts *o = &ga->o;
    *o = (gen_opts){.rank = -1, .block = -1, .n_freq = 1000, .factor = -1, .n_vectors = 256, .n_tokens = 16, .alpha = -1,
                    .adt = LM_DT_F32, .seed = 7};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(flag) (strcmp(a, flag) == 0 && v != NULL && ++i)
        if (ARG("--base")) ga->base = v;
        else if (ARG("--out")) ga->out = v;
        else if (ARG("--type")) type = v;
        else if (ARG("--rank")) o->rank = atol(v);
        else if (ARG("--alpha")) o->alpha = atof(v);
        else if (ARG("--targets")) targets = v;
        else if (ARG("--block")) o->block = atol(v);
        else if (ARG("--n-frequency")) o->n_freq = atol(v);
        else if (ARG("--factor")) o->factor = atol(v);
        else if (ARG("--num-vectors")) o->n_vectors = atol(v);
        else if (ARG("--tokens")) o->n_tokens = atol(v);
        else if (ARG("--seed")) o->seed = strtoull(v, NULL, 10);
        else if (ARG("--adapter-dtype")) {
            if (gen_parse_dt(PROG, v, &o->adt) != 0)
                return 2;
        } else {
            usage();
            return 2;
        }
#undef ARG
    }
    for (size_t i = 0; type && i < sizeof TYPES / sizeof *TYPES; i++)
        if (strcmp(type, TYPES[i].name) == 0 || strcmp(type, TYPES[i].peft_type) == 0)
            ga->ts = &TYPES[i];
    const type_spec *ts = ga->ts;
    if (ga->base == NULL || ga->out == NULL || ts == NULL) {
        if (type && ts == NULL)
            fail("unknown type '%s'", type);
        usage();
        return 2;
    }
    o->rank = o->rank < 0 ? ts->rank : o->rank;
    o->alpha = o->alpha < 0 ? ts->alpha : o->alpha;
    o->block = o->block < 0 ? ts->block : o->block;
    if ((ts->rank && o->rank <= 0) || (ts->block && o->block <= 1) || o->n_freq <= 0 || o->factor == 0 ||
        o->n_vectors <= 0 || o->n_tokens <= 0) {
        fail("--rank, --block, --n-frequency, --num-vectors, --tokens must be positive, --factor positive or -1");
        return 2;
    }
    if (targets == NULL)
        targets = ts->targets;
    ga->targets = !strcmp(targets, "all") ? ALL_LINEAR : !strcmp(targets, "qv") ? "q_proj,v_proj" : targets;
    return 0;
}

/* adapter_config.json: the common keys, the type's, and the modules' names */
static int write_adapter_config(const char *path, const type_spec *ts, const gen_opts *o, const gen_module *ms,
                                size_t nm)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return fail("cannot write %s: %s", path, strerror(errno));
    fprintf(f, "{\n  \"peft_type\": \"%s\",\n  \"task_type\": \"CAUSAL_LM\",\n  \"base_model_name_or_path\": null,\n"
               "  \"inference_mode\": true,\n", ts->peft_type);
    write_config(f, ts->config, o, ms[0].out);
    fprintf(f, "  \"target_modules\": [");
    int first = 1;
    for (size_t i = 0; i < nm; i++) { /* each name once, in the order met */
        size_t j = 0;
        while (j < i && strcmp(ms[j].leaf, ms[i].leaf) != 0)
            j++;
        if (j == i) {
            fprintf(f, "%s\"%s\"", first ? "" : ", ", ms[i].leaf);
            first = 0;
        }
    }
    fprintf(f, "]\n}\n");
    return fclose(f) != 0 ? fail("cannot write %s", path) : 0;
}

int main(int argc, char **argv)
{
    gen_args ga = {0};
    int rc = parse_args(argc, argv, &ga);
    if (rc != 0)
        return rc;
    const type_spec *ts = ga.ts;
    const char *base = ga.base, *out = ga.out, *targets = ga.targets;
    gen_opts o = ga.o;
    lm_kernels k;
    lm_kernels_select(&k, NULL);
    lm_err err;
    lm_err_clear(&err);
    lm_model *mdl = lm_model_open(base, &err);
    if (mdl == NULL) {
        char line[1024];
        lm_err_format(&err, line, sizeof line);
        fprintf(stderr, PROG ": %s\n", line);
        return 1;
    }
    size_t nm = 0;
    gen_module *ms = find_modules(mdl, targets, ts->kind, &nm, &k);
    gen_out g = {.adt = o.adt};
    rc = 1;
    if (ms == NULL || nm == 0) {
        fail("no module of %s matches the targets %s", base, targets);
        goto done;
    }
    for (size_t i = 0; i < nm; i++) {
        o.max_out = ms[i].out > o.max_out ? ms[i].out : o.max_out;
        o.max_in = ms[i].in > o.max_in ? ms[i].in : o.max_in;
        if (strcmp(ms[i].leaf, "down_proj") == 0)
            o.ff = "down_proj"; /* IA3: PEFT's feed-forward module for Llama */
    }
    for (size_t i = 0; i < nm; i++)
        if (ts->emit(&g, &ms[i], &o) != 0)
            goto done;
    if (ts->shared && ts->shared(&g, &o) != 0)
        goto done;
    /* adapter_config.json first: the weights file, renamed into place when complete, marks a
     * finished adapter */
    char path[4096];
    if (mkdir_p(out) != 0) {
        fail("cannot create %s: %s", out, strerror(errno));
        goto done;
    }
    snprintf(path, sizeof path, "%s/adapter_config.json", out);
    if (write_adapter_config(path, ts, &o, ms, nm) != 0)
        goto done;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", out);
    if (gen_write_tensors(PROG, path, g.t, g.n, o.seed, &k) != 0)
        goto done;
    double bytes = 0;
    for (size_t i = 0; i < g.n; i++)
        bytes += (double)gen_n_elems(&g.t[i]) * (lm_dtype_bits(g.t[i].dtype) / 8);
    printf(PROG ": %s (%s), %zu modules, %zu tensors, %.1f MB -> %s\n", ts->name, ts->peft_type, nm, g.n, bytes / 1e6,
           out);
    rc = 0;
done:
    free(g.t);
    free(ms);
    lm_model_close(mdl);
    return rc;
}
