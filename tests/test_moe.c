/* SPDX-License-Identifier: MIT */
/* test_moe.c : the LoRA forms PEFT merges that have no golden case: target_parameters on
 * mixture-of-experts expert stacks (PEFT's ParamWrapper), nn.MultiheadAttention and BD-LoRA;
 * plus the refusals that go with them.  Generated models; the expected values come from a
 * double-precision reference written here from PEFT's formulas (tuners/lora/layer.py
 * ParamWrapper.get_delta_weight: A viewed [E, r, in], B viewed [out, r, E], delta by
 * einsum("o r e, e r i -> e o i") or "-> e i o"; MultiheadAttention.merge; variants.py
 * BlockDiagonalLinear), never from src/.  Outputs are compared by the golden rule (th_compare),
 * untouched tensors bit for bit; every merge is also run with --threads 1/2, small tiles and
 * --kernels ref and must give the same bytes. */
#include "th.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MO_MAX 160

typedef struct {
    char name[200];
    const char *dt;
    int nd;
    uint64_t sh[4];
    uint64_t n;
    double *v;   /* values as stored (rounded to dt) */
    double *ref; /* base tensors: expected after the merge (NULL: unchanged) */
    int shard;
} mo_t;

typedef struct {
    mo_t t[MO_MAX];
    int n;
} mo_set;

typedef struct {
    mo_set base, ad;
    char *dir;
    uint64_t rng;
} mo_ctx;

static mo_t *mo_add(mo_set *s, uint64_t *rng, const char *name, const char *dt, int nd, const uint64_t *sh, double sd)
{
    cr_assert(s->n < MO_MAX);
    mo_t *t = &s->t[s->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dt = dt;
    t->nd = nd;
    t->n = 1;
    for (int d = 0; d < nd; d++) {
        t->sh[d] = sh[d];
        t->n *= sh[d];
    }
    t->v = malloc(t->n * sizeof *t->v);
    for (uint64_t i = 0; i < t->n; i++)
        t->v[i] = th_round_to(sd * th_rand_normal(rng), dt);
    return t;
}

static mo_t *mo_find(mo_set *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->t[i].name, name) == 0)
            return &s->t[i];
    cr_assert_fail("no tensor %s", name);
    return NULL;
}

/* the expected values of base tensor t (a copy of its values on first use) */
static double *mo_ref(mo_t *t)
{
    if (t->ref == NULL) {
        t->ref = malloc(t->n * sizeof *t->ref);
        memcpy(t->ref, t->v, t->n * sizeof *t->ref);
    }
    return t->ref;
}

static void mo_free(mo_ctx *c)
{
    for (int k = 0; k < 2; k++) {
        mo_set *s = k ? &c->ad : &c->base;
        for (int i = 0; i < s->n; i++) {
            free(s->t[i].v);
            free(s->t[i].ref);
        }
    }
    th_rmrf(c->dir);
    free(c->dir);
}

static void mo_write_set(const mo_set *s, const char *path, int shard)
{
    th_out_tensor o[MO_MAX];
    size_t n = 0;
    for (int i = 0; i < s->n; i++) {
        if (shard >= 0 && s->t[i].shard != shard)
            continue;
        memset(&o[n], 0, sizeof o[n]);
        o[n].name = s->t[i].name;
        o[n].dtype = s->t[i].dt;
        o[n].n_dims = s->t[i].nd;
        memcpy(o[n].shape, s->t[i].sh, sizeof s->t[i].sh);
        o[n].values = s->t[i].v;
        n++;
    }
    cr_assert_eq(th_st_write(path, o, n), 0, "cannot write %s", path);
}

/* base: one file, or two shards + model.safetensors.index.json (tensors with shard 1 in the
 * second); returns the BASE argument */
static void mo_write(mo_ctx *c, const char *cfg, int sharded, char *base, char *adir, size_t cap)
{
    char p[1200];
    if (!sharded) {
        snprintf(base, cap, "%s/model.safetensors", c->dir);
        mo_write_set(&c->base, base, -1);
    } else {
        for (int k = 0; k < 2; k++) {
            snprintf(p, sizeof p, "%s/model-0000%d-of-00002.safetensors", c->dir, k + 1);
            mo_write_set(&c->base, p, k);
        }
        size_t cap_j = 200 + (size_t)c->base.n * 260, u = 0;
        char *j = malloc(cap_j);
        u += (size_t)snprintf(j + u, cap_j - u, "{\"metadata\": {}, \"weight_map\": {");
        for (int i = 0; i < c->base.n; i++)
            u += (size_t)snprintf(j + u, cap_j - u, "%s\"%s\": \"model-0000%d-of-00002.safetensors\"", i ? ", " : "",
                                  c->base.t[i].name, c->base.t[i].shard + 1);
        u += (size_t)snprintf(j + u, cap_j - u, "}}");
        snprintf(base, cap, "%s/model.safetensors.index.json", c->dir);
        cr_assert_eq(th_write_file(base, j, u), 0);
        free(j);
    }
    snprintf(adir, cap, "%s/adapter", c->dir);
    mkdir(adir, 0777);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", adir);
    mo_write_set(&c->ad, p, -1);
    snprintf(p, sizeof p, "%s/adapter_config.json", adir);
    cr_assert_eq(th_write_file(p, cfg, strlen(cfg)), 0);
}

static th_run_result mo_merge(const char *base, const char *adir, const char *out, const char *const *opts)
{
    const char *argv[20];
    size_t k = 0;
    argv[k++] = th_bin();
    for (size_t i = 0; opts != NULL && opts[i] != NULL; i++)
        argv[k++] = opts[i];
    argv[k++] = base;
    argv[k++] = adir;
    argv[k++] = out;
    argv[k] = NULL;
    return th_run(NULL, argv);
}

/* after a merge by mo_check: every targeted base tensor takes the exact path (--json says "exact") and holds
 * the double-precision reference rounded once to its dtype, bit for bit (the reference's own f64
 * error could only matter within 1e-16 of a rounding boundary) */
static void mo_exact(mo_ctx *c)
{
    char out[1200];
    snprintf(out, sizeof out, "%s/exact.safetensors", c->dir);
    char bcopy[1200], adir[1200];
    th_path(bcopy, sizeof bcopy, c->dir, "model.safetensors");
    if (!th_exists(bcopy))
        th_path(bcopy, sizeof bcopy, c->dir, "model.safetensors.index.json");
    snprintf(adir, sizeof adir, "%s/adapter", c->dir);
    th_run_result r = mo_merge(bcopy, adir, out, (const char *const[]){"--json", NULL});
    cr_assert_eq(r.status, 0, "merge: exit %d: %s", r.status, r.err);
    cJSON *js = cJSON_Parse(r.out);
    cr_assert_not_null(js, "--json output is not JSON: %s", r.out);
    th_st st;
    cr_assert_eq(th_st_read(out, &st), 0);
    int n_ref = 0, n_json = 0;
    for (int i = 0; i < c->base.n; i++) {
        const mo_t *t = &c->base.t[i];
        if (t->ref == NULL)
            continue;
        n_ref++;
        const cJSON *ct = cJSON_GetObjectItemCaseSensitive(js, "changed_tensors"), *j;
        cJSON_ArrayForEach(j, ct)
        {
            if (strcmp(cJSON_GetObjectItemCaseSensitive(j, "name")->valuestring, t->name) != 0)
                continue;
            cr_assert(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "exact")), "%s is not on the exact path",
                      t->name);
            n_json++;
        }
        double *v = th_to_f64(th_st_find(&st, t->name));
        uint64_t bad = 0, first = 0;
        for (uint64_t k = 0; k < t->n; k++)
            if (!(v[k] == th_round_to(t->ref[k], t->dt)) && bad++ == 0)
                first = k;
        cr_assert_eq(bad, 0, "%s: %llu elements are not the exact value rounded once (first [%llu]: %.17g, "
                     "reference %.17g)", t->name, (unsigned long long)bad, (unsigned long long)first, v[first],
                     t->ref[first]);
        free(v);
    }
    cr_assert(n_ref > 0 && n_json == n_ref, "%d tensors targeted, %d reported", n_ref, n_json);
    th_st_free(&st);
    cJSON_Delete(js);
    th_run_free(&r);
}

/* merges, compares every base tensor with its reference (or bit for bit), then checks that
 * --threads 1 and 2 with small tiles and --kernels ref give the same bytes, and mo_exact */
static void mo_check(mo_ctx *c, const char *cfg, int sharded)
{
    char base[1100], adir[1100], out[1200];
    mo_write(c, cfg, sharded, base, adir, sizeof base);
    snprintf(out, sizeof out, "%s/out.safetensors", c->dir);
    th_run_result r = mo_merge(base, adir, out, (const char *const[]){"--threads", "2", NULL});
    cr_assert_eq(r.status, 0, "merge: exit %d: %s", r.status, r.err);
    th_run_free(&r);
    th_st st;
    cr_assert_eq(th_st_read(out, &st), 0);
    int changed = 0;
    for (int i = 0; i < c->base.n; i++) {
        mo_t *t = &c->base.t[i];
        const th_tensor *o = th_st_find(&st, t->name);
        cr_assert_not_null(o, "output lacks %s", t->name);
        cr_assert_str_eq(o->dtype, t->dt, "%s", t->name);
        double *v = th_to_f64(o);
        if (t->ref == NULL) {
            for (uint64_t k = 0; k < t->n; k++)
                cr_assert(v[k] == t->v[k], "%s[%llu] changed (%g -> %g) but nothing targets it", t->name,
                          (unsigned long long)k, t->v[k], v[k]);
        } else {
            th_cmp cmp = th_compare(t->dt, v, t->ref, (size_t)t->n);
            cr_assert(cmp.ok, "%s (%s): %s (max %.3g ulp, max abs err %.3g)", t->name, t->dt, cmp.why, cmp.max_ulp,
                      cmp.max_abs_err);
            changed++;
        }
        free(v);
    }
    cr_assert(changed > 0);
    th_st_free(&st);
    const char *opts[3][7] = {{"--threads", "1", "--tile-elems", "50", NULL},
                              {"--threads", "2", "--tile-elems", "50", NULL},
                              {"--threads", "2", "--tile-elems", "50", "--kernels", "ref", NULL}};
    char o[3][1200];
    for (int k = 0; k < 3; k++) {
        snprintf(o[k], sizeof o[k], "%s/det%d.safetensors", c->dir, k);
        r = mo_merge(base, adir, o[k], opts[k]);
        cr_assert_eq(r.status, 0, "run %d: %s", k, r.err);
        th_run_free(&r);
    }
    cr_assert(th_files_equal(o[0], o[1]), "--threads 2 differs from --threads 1");
    cr_assert(th_files_equal(o[1], o[2]), "--kernels ref differs");
    mo_exact(c);
}

/* the merge is refused with one error line holding `kind` and `what`, with and without
 * --dry-run, and nothing is left behind */
static void mo_refused(mo_ctx *c, const char *cfg, int sharded, const char *kind, const char *what)
{
    char base[1100], adir[1100], out[1200];
    mo_write(c, cfg, sharded, base, adir, sizeof base);
    snprintf(out, sizeof out, "%s/out.safetensors", c->dir);
    for (int dry = 0; dry < 2; dry++) {
        th_run_result r = mo_merge(base, adir, out, dry ? (const char *const[]){"--dry-run", NULL} : NULL);
        cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
        cr_assert(strncmp(r.err, "error: ", 7) == 0 && strchr(r.err, '\n') == r.err + strlen(r.err) - 1,
                  "not one error line: %s", r.err);
        cr_assert_not_null(strstr(r.err, kind), "no '%s' in: %s", kind, r.err);
        cr_assert_not_null(strstr(r.err, what), "no '%s' in: %s", what, r.err);
        cr_assert(!th_exists(out), "output left");
        th_run_free(&r);
    }
}

static void mo_init(mo_ctx *c, uint64_t seed)
{
    memset(c, 0, sizeof *c);
    c->dir = th_tmpdir();
    c->rng = seed;
}

/* ---- the reference ----------------------------------------------------------------------------- */
/* delta of expert e at [x, y] of the parameter's own [d1, d2] layout, from PEFT's einsum:
 *   A (E*r rows) viewed [E, r, in]: A[e, j, i] = Aflat[(e*r + j)*in + i]
 *   B ([out, r*E]) viewed [out, r, E]: B[o, j, e] = Bflat[o*(r*E) + j*E + e]
 *   out_in ("o r e, e r i -> e o i"): delta[e, x, y] = sum_j B[x, j, e] A[e, j, y]
 *   in_out ("o r e, e r i -> e i o"): delta[e, x, y] = sum_j B[y, j, e] A[e, j, x] */
static double mo_delta(const mo_t *A, const mo_t *B, uint64_t E, uint64_t r, int in_out, uint64_t e, uint64_t x,
                       uint64_t y)
{
    uint64_t in = A->sh[1];
    uint64_t o = in_out ? y : x, i = in_out ? x : y;
    double acc = 0;
    for (uint64_t j = 0; j < r; j++)
        acc += B->v[o * (r * E) + j * E + e] * A->v[(e * r + j) * in + i];
    return acc;
}

/* a fused [E, d1, d2] base tensor: ref += s * delta */
static void mo_ref_fused(mo_t *W, const mo_t *A, const mo_t *B, uint64_t r, int in_out, double s)
{
    uint64_t E = W->sh[0], d1 = W->sh[1], d2 = W->sh[2];
    double *ref = mo_ref(W);
    for (uint64_t e = 0; e < E; e++)
        for (uint64_t x = 0; x < d1; x++)
            for (uint64_t y = 0; y < d2; y++)
                ref[(e * d1 + x) * d2 + y] += s * mo_delta(A, B, E, r, in_out, e, x, y);
}

/* per-expert tensors "<pfx><e>.<part>.weight" holding rows lo.. of the fused d1 axis */
static void mo_ref_split(mo_ctx *c, const char *pfx, const char *const *parts, int n_parts, uint64_t E, const mo_t *A,
                         const mo_t *B, uint64_t r, int in_out, double s)
{
    char name[300];
    for (uint64_t e = 0; e < E; e++) {
        uint64_t lo = 0;
        for (int p = 0; p < n_parts; p++) {
            snprintf(name, sizeof name, "%s%llu.%s.weight", pfx, (unsigned long long)e, parts[p]);
            mo_t *W = mo_find(&c->base, name);
            double *ref = mo_ref(W);
            for (uint64_t x = 0; x < W->sh[0]; x++)
                for (uint64_t y = 0; y < W->sh[1]; y++)
                    ref[x * W->sh[1] + y] += s * mo_delta(A, B, E, r, in_out, e, lo + x, y);
            lo += W->sh[0];
        }
    }
}

/* plain LoRA reference: ref[o, i] += s * sum_j B[o, j] A[j, i] */
static void mo_ref_lora(mo_t *W, const double *A, const double *B, uint64_t r, double s)
{
    uint64_t O = W->sh[0], I = W->sh[1];
    double *ref = mo_ref(W);
    for (uint64_t o = 0; o < O; o++)
        for (uint64_t i = 0; i < I; i++) {
            double acc = 0;
            for (uint64_t j = 0; j < r; j++)
                acc += B[o * r + j] * A[j * I + i];
            ref[o * I + i] += s * acc;
        }
}

#define SH(...) (int)(sizeof((uint64_t[]){__VA_ARGS__}) / sizeof(uint64_t)), (const uint64_t[]){__VA_ARGS__}

/* per-expert base (Qwen-MoE names) in two shards: experts 0..1 of each layer in the first, the rest in the
 * second; E experts, hidden H, intermediate I; also attention q_proj */
static void mo_qwen_base(mo_ctx *c, const char *dt, int layers, uint64_t E, uint64_t H, uint64_t I, int extra_expert)
{
    char n[300];
    for (int l = 0; l < layers; l++) {
        snprintf(n, sizeof n, "model.layers.%d.self_attn.q_proj.weight", l);
        mo_add(&c->base, &c->rng, n, dt, SH(H, H), 0.5);
        for (uint64_t e = 0; e < E + (uint64_t)extra_expert; e++) {
            static const char *const parts[] = {"gate_proj", "up_proj", "down_proj"};
            for (int p = 0; p < 3; p++) {
                snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%llu.%s.weight", l, (unsigned long long)e, parts[p]);
                mo_t *t = p < 2 ? mo_add(&c->base, &c->rng, n, dt, SH(I, H), 0.5)
                                : mo_add(&c->base, &c->rng, n, dt, SH(H, I), 0.5);
                t->shard = e >= 2;
            }
        }
    }
}

/* lora_A [E*r, in], lora_B [out, r*E] of a target parameter at module path `mod` */
static void mo_param_ad(mo_ctx *c, const char *mod, uint64_t E, uint64_t r, uint64_t in, uint64_t out, mo_t **A,
                        mo_t **B)
{
    char n[300];
    snprintf(n, sizeof n, "base_model.model.%s.lora_A.weight", mod);
    *A = mo_add(&c->ad, &c->rng, n, "F32", SH(E * r, in), 0.3);
    snprintf(n, sizeof n, "base_model.model.%s.lora_B.weight", mod);
    *B = mo_add(&c->ad, &c->rng, n, "F32", SH(out, r * E), 0.3);
}

static const char *const qwen_gate_up[] = {"gate_proj", "up_proj"}, *const qwen_down[] = {"down_proj"};

/* ---- target_parameters ------------------------------------------------------------------------- */
/* Qwen3-MoE style: per-expert tensors on disk across two shards, the adapter trained on the fused
 * transformers-v5 layout (PEFT 0.21: [E, out, in]); gate_up_proj nested inside down_proj's wrapper;
 * rank_pattern for gate_up; and a plain q_proj LoRA beside them */
Test(moe, per_expert_base_two_shards_out_in)
{
    mo_ctx c;
    mo_init(&c, 11);
    const uint64_t E = 4, H = 12, I = 5;
    mo_qwen_base(&c, "BF16", 2, E, H, I, 0);
    char mod[200], pfx[200];
    for (int l = 0; l < 2; l++) {
        mo_t *A, *B;
        snprintf(mod, sizeof mod, "model.layers.%d.mlp.experts.base_layer", l); /* gate_up_proj, r = 2 */
        mo_param_ad(&c, mod, E, 2, H, 2 * I, &A, &B);
        snprintf(pfx, sizeof pfx, "model.layers.%d.mlp.experts.", l);
        mo_ref_split(&c, pfx, qwen_gate_up, 2, E, A, B, 2, 0, 8.0 / 2);
        snprintf(mod, sizeof mod, "model.layers.%d.mlp.experts", l); /* down_proj, r = 3 */
        mo_param_ad(&c, mod, E, 3, I, H, &A, &B);
        mo_ref_split(&c, pfx, qwen_down, 1, E, A, B, 3, 0, 8.0 / 3);
        snprintf(mod, sizeof mod, "base_model.model.model.layers.%d.self_attn.q_proj.lora_A.weight", l);
        mo_t *qa = mo_add(&c.ad, &c.rng, mod, "F32", SH(3, H), 0.3);
        snprintf(mod, sizeof mod, "base_model.model.model.layers.%d.self_attn.q_proj.lora_B.weight", l);
        mo_t *qb = mo_add(&c.ad, &c.rng, mod, "F32", SH(H, 3), 0.3);
        snprintf(mod, sizeof mod, "model.layers.%d.self_attn.q_proj.weight", l);
        mo_ref_lora(mo_find(&c.base, mod), qa->v, qb->v, 3, 8.0 / 3);
    }
    mo_check(&c, "{\"peft_type\": \"LORA\", \"peft_version\": \"0.21.0\", \"r\": 3, \"lora_alpha\": 8, "
                 "\"target_modules\": [\"q_proj\"], \"target_parameters\": [\"mlp.experts.gate_up_proj\", "
                 "\"mlp.experts.down_proj\"], \"rank_pattern\": {\"experts.gate_up_proj\": 2}}",
             1);
    mo_free(&c);
}

/* Mixtral: the base keeps block_sparse_moe.experts.N.w1/w3/w2, the adapter names mlp.experts */
Test(moe, mixtral_names_f16)
{
    mo_ctx c;
    mo_init(&c, 12);
    const uint64_t E = 3, H = 8, I = 6, r = 2;
    char n[300];
    for (uint64_t e = 0; e < E; e++) {
        static const char *const parts[] = {"w1", "w3", "w2"};
        for (int p = 0; p < 3; p++) {
            snprintf(n, sizeof n, "model.layers.0.block_sparse_moe.experts.%llu.%s.weight", (unsigned long long)e, parts[p]);
            if (p < 2)
                mo_add(&c.base, &c.rng, n, "F16", SH(I, H), 0.5);
            else
                mo_add(&c.base, &c.rng, n, "F16", SH(H, I), 0.5);
        }
    }
    mo_add(&c.base, &c.rng, "model.layers.0.block_sparse_moe.gate.weight", "F16", SH(E, H), 0.5);
    mo_t *A, *B;
    mo_param_ad(&c, "model.layers.0.mlp.experts", E, r, H, 2 * I, &A, &B);
    static const char *const w13[] = {"w1", "w3"};
    mo_ref_split(&c, "model.layers.0.block_sparse_moe.experts.", w13, 2, E, A, B, r, 0, 16.0 / sqrt(2.0));
    mo_check(&c, "{\"peft_type\": \"LORA\", \"peft_version\": \"0.21.0\", \"r\": 2, \"lora_alpha\": 16, "
                 "\"use_rslora\": true, \"target_modules\": [], \"target_parameters\": [\"experts.gate_up_proj\"]}",
             0);
    mo_free(&c);
}

/* fused stacks on disk in gpt-oss's [E, in, out] layout (PEFT 0.18: "e i o"): gate_up [E, H, 2I]
 * and a square down [E, I, I] (I = H) whose layout the non-square sibling settles */
Test(moe, fused_in_out_with_square)
{
    mo_ctx c;
    mo_init(&c, 13);
    const uint64_t E = 3, H = 6, r = 2;
    mo_t *gu = mo_add(&c.base, &c.rng, "model.layers.0.mlp.experts.gate_up_proj", "F32", SH(E, H, 2 * H), 0.5);
    mo_t *dn = mo_add(&c.base, &c.rng, "model.layers.0.mlp.experts.down_proj", "F32", SH(E, H, H), 0.5);
    mo_add(&c.base, &c.rng, "model.layers.0.mlp.router.weight", "F32", SH(E, H), 0.5);
    mo_t *A, *B;
    mo_param_ad(&c, "model.layers.0.mlp.experts.base_layer", E, r, H, 2 * H, &A, &B);
    mo_ref_fused(gu, A, B, r, 1, 2.0);
    mo_param_ad(&c, "model.layers.0.mlp.experts", E, r, H, H, &A, &B);
    mo_ref_fused(dn, A, B, r, 1, 2.0);
    mo_check(&c, "{\"peft_type\": \"LORA\", \"peft_version\": \"0.20.0\", \"r\": 2, \"lora_alpha\": 4, "
                 "\"target_modules\": null, \"target_parameters\": [\"mlp.experts.gate_up_proj\", "
                 "\"mlp.experts.down_proj\"]}",
             0);
    mo_free(&c);
}

/* fused [E, out, in] on disk (a transformers-v5 save), BF16, and a 2-D parameter (num_experts 1:
 * as Linear) */
Test(moe, fused_out_in_and_2d_parameter)
{
    mo_ctx c;
    mo_init(&c, 14);
    const uint64_t E = 5, H = 7, I = 4, r = 3;
    mo_t *gu = mo_add(&c.base, &c.rng, "model.layers.0.mlp.experts.gate_up_proj", "BF16", SH(E, 2 * I, H), 0.5);
    mo_t *w2 = mo_add(&c.base, &c.rng, "model.layers.0.mlp.shared.w", "BF16", SH(I, H), 0.5);
    mo_t *A, *B;
    mo_param_ad(&c, "model.layers.0.mlp.experts", E, r, H, 2 * I, &A, &B);
    mo_ref_fused(gu, A, B, r, 0, 2.0);
    mo_param_ad(&c, "model.layers.0.mlp.shared", 1, r, H, I, &A, &B);
    mo_ref_lora(w2, A->v, B->v, r, 2.0);
    mo_check(&c, "{\"peft_type\": \"LORA\", \"peft_version\": \"0.21.0\", \"r\": 3, \"lora_alpha\": 6, "
                 "\"target_parameters\": [\"experts.gate_up_proj\", \"shared.w\"]}",
             0);
    mo_free(&c);
}

static const char moe_cfg[] = "{\"peft_type\": \"LORA\", \"peft_version\": \"0.21.0\", \"r\": 2, \"lora_alpha\": 4, "
                              "\"target_modules\": [], \"target_parameters\": [\"mlp.experts.down_proj\"]}";

Test(moe, refuses_square_without_a_hint)
{
    mo_ctx c;
    mo_init(&c, 15);
    mo_add(&c.base, &c.rng, "model.layers.0.mlp.experts.down_proj", "F32", SH(3, 6, 6), 0.5);
    mo_t *A, *B;
    mo_param_ad(&c, "model.layers.0.mlp.experts", 3, 2, 6, 6, &A, &B);
    mo_refused(&c, moe_cfg, 0, "AmbiguousLayout", "model.layers.0.mlp.experts");
    mo_free(&c);
}

/* expert 3's up_proj missing from the base */
Test(moe, refuses_missing_expert_tensor)
{
    mo_ctx c;
    mo_init(&c, 16);
    mo_qwen_base(&c, "F32", 1, 4, 6, 3, 0);
    for (int i = 0; i < c.base.n; i++)
        if (strcmp(c.base.t[i].name, "model.layers.0.mlp.experts.3.up_proj.weight") == 0)
            snprintf(c.base.t[i].name, sizeof c.base.t[i].name, "model.layers.0.mlp.experts.3.up_projX.weight");
    mo_t *A, *B;
    mo_param_ad(&c, "model.layers.0.mlp.experts", 4, 2, 6, 6, &A, &B);
    mo_refused(&c, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_parameters\": "
                   "[\"experts.gate_up_proj\"]}", 1, "NoMatchingTensor", "experts.3.up_proj.weight");
    mo_free(&c);
}

/* the base has 5 experts, the adapter 4 (and the other way round) */
Test(moe, refuses_expert_count_mismatch)
{
    for (int more = 0; more < 2; more++) {
        mo_ctx c;
        mo_init(&c, 17 + (uint64_t)more);
        mo_qwen_base(&c, "F32", 1, 4, 6, 3, more);
        mo_t *A, *B;
        mo_param_ad(&c, "model.layers.0.mlp.experts", more ? 4 : 5, 2, 3, 6, &A, &B);
        mo_refused(&c, moe_cfg, 1, "ExpertMismatch", more ? "the base has 5" : "the adapter has 5 experts");
        mo_free(&c);
    }
}

/* factors that fit no targeted parameter; two wrappers fitting the same one; DoRA */
Test(moe, refuses_bad_factors)
{
    mo_ctx c;
    mo_init(&c, 19);
    mo_qwen_base(&c, "F32", 1, 4, 6, 3, 0);
    mo_t *A, *B;
    mo_param_ad(&c, "model.layers.0.mlp.experts", 4, 2, 7, 6, &A, &B);
    mo_refused(&c, moe_cfg, 0, "ShapeMismatch", "model.layers.0.mlp.experts");
    mo_free(&c);
    mo_init(&c, 20);
    mo_qwen_base(&c, "F32", 1, 4, 6, 3, 0);
    mo_param_ad(&c, "model.layers.0.mlp.experts", 4, 2, 3, 6, &A, &B);
    mo_param_ad(&c, "model.layers.0.mlp.experts.base_layer", 4, 2, 3, 6, &A, &B);
    mo_refused(&c, moe_cfg, 0, "DuplicateKey", "mlp.experts.down_proj");
    mo_free(&c);
    mo_init(&c, 21);
    mo_qwen_base(&c, "F32", 1, 4, 6, 3, 0);
    mo_param_ad(&c, "model.layers.0.mlp.experts", 4, 2, 3, 6, &A, &B);
    mo_refused(&c, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"use_dora\": true, "
                   "\"target_parameters\": [\"mlp.experts.down_proj\"]}", 0, "UnsupportedVariant", "DoRA");
    mo_free(&c);
}

/* ---- nn.MultiheadAttention ------------------------------------------------------------------- */
/* in_proj_weight [3D, D] += s B A; out_proj.weight += 2 s B A (PEFT's MHA merge adds it, then
 * merges the wrapped out_proj once more); a Linear beside it once */
Test(moe, multihead_attention)
{
    mo_ctx c;
    mo_init(&c, 22);
    const uint64_t D = 8, r = 2;
    mo_t *ip = mo_add(&c.base, &c.rng, "encoder.layers.0.self_attn.in_proj_weight", "BF16", SH(3 * D, D), 0.5);
    mo_add(&c.base, &c.rng, "encoder.layers.0.self_attn.in_proj_bias", "BF16", SH(3 * D), 0.5);
    mo_t *op = mo_add(&c.base, &c.rng, "encoder.layers.0.self_attn.out_proj.weight", "BF16", SH(D, D), 0.5);
    mo_t *fc = mo_add(&c.base, &c.rng, "encoder.layers.0.linear1.weight", "BF16", SH(2 * D, D), 0.5);
    mo_t *a1 = mo_add(&c.ad, &c.rng, "base_model.model.encoder.layers.0.self_attn.lora_A.weight", "F32", SH(r, D), 0.3);
    mo_t *b1 = mo_add(&c.ad, &c.rng, "base_model.model.encoder.layers.0.self_attn.lora_B.weight", "F32", SH(3 * D, r), 0.3);
    mo_t *a2 = mo_add(&c.ad, &c.rng, "base_model.model.encoder.layers.0.self_attn.base_layer.out_proj.lora_A.weight",
                      "F32", SH(r, D), 0.3);
    mo_t *b2 = mo_add(&c.ad, &c.rng, "base_model.model.encoder.layers.0.self_attn.base_layer.out_proj.lora_B.weight",
                      "F32", SH(D, r), 0.3);
    mo_t *a3 = mo_add(&c.ad, &c.rng, "base_model.model.encoder.layers.0.linear1.lora_A.weight", "F32", SH(r, D), 0.3);
    mo_t *b3 = mo_add(&c.ad, &c.rng, "base_model.model.encoder.layers.0.linear1.lora_B.weight", "F32", SH(2 * D, r), 0.3);
    mo_ref_lora(ip, a1->v, b1->v, r, 3.0);
    mo_ref_lora(op, a2->v, b2->v, r, 2 * 3.0);
    mo_ref_lora(fc, a3->v, b3->v, r, 3.0);
    mo_check(&c, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 6, \"target_modules\": [\"self_attn\", "
                 "\"linear1\"]}", 0);
    mo_free(&c);
}

/* ---- BD-LoRA, VeLoRA, MonteCLoRA ------------------------------------------------------------- */
/* the block-diagonal factor is stored [rows, cols / nb]: block_diag of its nb row-chunks */
static double *mo_blockdiag(const mo_t *w, uint64_t rows, uint64_t cols, uint64_t nb)
{
    double *f = calloc(rows * cols, sizeof *f);
    uint64_t rb = rows / nb, cb = cols / nb;
    for (uint64_t i = 0; i < rows; i++)
        for (uint64_t k = 0; k < cb; k++)
            f[i * cols + (i / rb) * cb + k] = w->v[i * cb + k];
    return f;
}

Test(moe, bdlora_velora_monteclora_extras)
{
    mo_ctx c;
    mo_init(&c, 23);
    const uint64_t D = 12, O = 8, r = 4, nb = 2;
    mo_t *q = mo_add(&c.base, &c.rng, "model.layers.0.self_attn.q_proj.weight", "F16", SH(O, D), 0.5);
    mo_t *v = mo_add(&c.base, &c.rng, "model.layers.0.self_attn.v_proj.weight", "F16", SH(O, D), 0.5);
    mo_t *qa = mo_add(&c.ad, &c.rng, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32",
                      SH(r, D / nb), 0.3); /* A block-diagonal */
    mo_t *qb = mo_add(&c.ad, &c.rng, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F32", SH(O, r), 0.3);
    mo_t *va = mo_add(&c.ad, &c.rng, "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", "F32", SH(r, D), 0.3);
    mo_t *vb = mo_add(&c.ad, &c.rng, "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", "F32",
                      SH(O, r / nb), 0.3); /* B block-diagonal */
    mo_add(&c.ad, &c.rng, "base_model.model.model.layers.0.self_attn.q_proj.lora_velora_embed", "F32", SH(3), 1);
    mo_add(&c.ad, &c.rng, "base_model.model.model.layers.0.self_attn.v_proj.lora_monteclora_sampler.std_prior", "F32",
           SH(r), 1);
    mo_add(&c.ad, &c.rng, "base_model.model.model.layers.0.self_attn.v_proj.lora_monteclora_sampler.expert_weights",
           "F32", SH(3), 1);
    double *qaf = mo_blockdiag(qa, r, D, nb), *vbf = mo_blockdiag(vb, O, r, nb);
    mo_ref_lora(q, qaf, qb->v, r, 2.0);
    mo_ref_lora(v, va->v, vbf, r, 2.0);
    free(qaf);
    free(vbf);
    mo_check(&c, "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\", \"v_proj\"], "
                 "\"use_bdlora\": {\"target_modules_bd_a\": [\"q_proj\"], \"target_modules_bd_b\": [\"v_proj\"], "
                 "\"nblocks\": 2, \"match_strict\": true}}", 0);
    mo_free(&c);
}

/* ---- convolutions PEFT cannot merge ----------------------------------------------------------- */
/* a grouped conv (groups 2): lora_A [r, in, k, k] keeps every input channel, lora_B [out, r/2, 1, 1] */
/* MiCA (init_lora_weights "mica", PEFT's MiCALinearVariant): B from the base's minor singular
 * vectors at init, frozen, saved with A; merged as plain LoRA (variants.py: merge adds
 * get_delta_weight), the base untouched at init, so nothing else to do */
Test(moe, mica_merges_as_lora)
{
    mo_ctx c;
    mo_init(&c, 25);
    const uint64_t D = 10, O = 6, r = 2;
    mo_t *q = mo_add(&c.base, &c.rng, "model.layers.0.self_attn.q_proj.weight", "BF16", SH(O, D), 0.5);
    mo_t *qa = mo_add(&c.ad, &c.rng, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32", SH(r, D), 0.3);
    mo_t *qb = mo_add(&c.ad, &c.rng, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F32", SH(O, r), 0.3);
    mo_ref_lora(q, qa->v, qb->v, r, 3.0);
    mo_check(&c, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 6, \"target_modules\": [\"q_proj\"], "
                 "\"init_lora_weights\": \"mica\"}", 0);
    mo_free(&c);
}

Test(moe, refuses_grouped_conv_lora)
{
    mo_ctx c;
    mo_init(&c, 24);
    mo_add(&c.base, &c.rng, "conv.weight", "F32", SH(6, 2, 3, 3), 0.5);
    mo_add(&c.ad, &c.rng, "base_model.model.conv.lora_A.weight", "F32", SH(4, 4, 3, 3), 0.3);
    mo_add(&c.ad, &c.rng, "base_model.model.conv.lora_B.weight", "F32", SH(6, 2, 1, 1), 0.3);
    mo_refused(&c, "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"conv\"]}", 0,
               "groups = 2", "conv");
    mo_free(&c);
}
