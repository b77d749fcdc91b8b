/* SPDX-License-Identifier: MIT */
/* lora_param.c : LoRA on parameters (target_parameters, PEFT's ParamWrapper; peft-merge.md
 * §5.1.7), the way mixture-of-experts layers are trained since transformers v5.
 *
 * A module M wraps one parameter per nesting level: "M.lora_A", "M.base_layer.lora_A" ... (the
 * planner keeps those "base_layer"s; which parameter each level holds is read from the shapes).
 * A 2-D parameter P [o, i] merges as Linear.  A 3-D expert stack P [E, d1, d2] has lora_A [E*r,
 * in] (expert e's rows are e*r .. e*r+r-1) and lora_B [out, r*E] (expert e's columns are j*E + e,
 * the expert index fastest), and
 *     delta_e = s * B_e @ A_e,   A_e = A[e*r : e*r+r, :],   B_e[o, j] = B[o, j*E + e]
 * added as P[e] += delta_e when P is [E, out, in] ("out_in": PEFT >= 0.19.1 on transformers v5
 * expert modules that are not is_transposed), as P[e] += delta_e^T when P is [E, in, out]
 * ("in_out": PEFT < 0.19 for every 3-D parameter, gpt-oss-style is_transposed modules).  The
 * shapes decide; for a square P [E, n, n] the layout of the adapter's non-square expert
 * parameters decides, or peft_version < 0.19 (always in_out); otherwise the merge is refused.
 *
 * The base holds P itself (fused: [E, d1, d2], tiled as the view [E*d1, d2] so that a tile is a
 * few rows of one or two experts, with one low-rank op per expert on its block of rows
 * e*d1 .. e*d1+d1-1: op->row0), or, as most checkpoints on
 * disk do, one 2-D tensor per expert: Qwen-MoE style "M.<e>.gate_proj.weight", "up_proj",
 * "down_proj", Mixtral's "block_sparse_moe.experts.<e>.w1/w3/w2" (transformers builds
 * gate_up_proj[e] = cat(gate[e], up[e]), gate rows first; down_proj[e] = down[e]).  Then every
 * expert tensor gets an ordinary low-rank op of rank r with its slice of the factors.  Either way
 * every op is LOWRANK, so the tensors take the exact low-rank path (each element the exact
 * value rounded once).  A gpt-oss MXFP4 base holds "<param>_blocks" (transformers dequantizes it
 * to the parameter [E, in, out]); the planner's F32 view of it is [E, out, in], so the delta is
 * added there transposed once more (P[e] += delta_e^T is W[e] += delta_e), and a square one is
 * always in_out (gpt-oss's experts are is_transposed).  The adapter's expert count must be the base's: every expert of the adapter is
 * merged exactly once, and a base with more or fewer experts is refused. */
#include "lora.h"

#include "gemm_tile.h"
#include "lm_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CANDS 8

typedef struct {
    int kind;                  /* LM_LORA_EXPERTS */
    const lm_ts_tensor *A, *B; /* A [E*r, in], B [out, r*E] */
    uint64_t E, r, e;          /* experts, rank per expert, this op's expert (per-expert tensors) */
    uint64_t lo;               /* per-expert tensors: its first row on the d1 axis (gate 0, up I) */
    uint64_t d1, d2;           /* the parameter's [E, d1, d2] */
    int in_out;                /* layout: 0 P[e] is [out, in], 1 [in, out] */
} expert_params;

/* where a targeted parameter lives in the base */
typedef struct {
    const char *pname;    /* "gate_up_proj" (borrowed from the config) */
    int fused;            /* 1: one tensor (2-D, or 3-D [E, d1, d2]); 0: one tensor per expert and part */
    int stored_t;         /* fused, MXFP4 (gpt-oss): the base holds "<param>_blocks", whose view is
                             [E, d2, d1], the parameter's experts transposed */
    long bi;              /* fused: the tensor */
    int nd;               /* fused: its rank (2 or 3) */
    uint64_t E, d1, d2;   /* E = 1 for a 2-D parameter; per expert: E is the base's expert count */
    char prefix[1024];    /* per expert: full base name up to the expert index ("model.….experts.") */
    const char *part[2];  /* per expert: "gate_proj", "up_proj" / "w1", "w3" / "down_proj" ... */
    uint64_t rows[2];     /* per expert: rows of each part's tensor */
    int n_parts;
    const lm_module *taken; /* the module merged into it */
} param_store;

typedef struct {
    const lm_module *m;
    char mpath[1024]; /* the wrapped module: path without trailing ".base_layer"s */
    param_store *ps;
    int layouts;      /* bit 0: out_in fits, bit 1: in_out fits */
    int in_out;
    long r;
    double alpha;
} param_mod;

/* the module path without its trailing ".base_layer"s */
static void unwrap(const char *path, char *out, size_t cap)
{
    snprintf(out, cap, "%s", path);
    size_t n = strlen(out);
    while (n > 11 && strcmp(out + n - 11, ".base_layer") == 0)
        out[n -= 11] = '\0';
}

/* PEFT: key = "<module>.<param>" is targeted when it equals an entry or ends with "." + entry */
static int key_matches(const char *key, const char *t)
{
    size_t nk = strlen(key), nt = strlen(t);
    return strcmp(key, t) == 0 || (nk > nt && key[nk - nt - 1] == '.' && strcmp(key + nk - nt, t) == 0);
}

static const char *param_name_of(const char *t)
{
    const char *d = strrchr(t, '.');
    return d ? d + 1 : t;
}

int lm_lora_param_module(const lm_lora_cfg *lc, const char *path)
{
    char m[1024], key[1200];
    unwrap(path, m, sizeof m);
    for (size_t i = 0; i < lc->target_params.n; i++) {
        snprintf(key, sizeof key, "%s.%s", m, param_name_of(lc->target_params.v[i]));
        if (key_matches(key, lc->target_params.v[i]))
            return 1;
    }
    return 0;
}

/* ---- finding a parameter in the base ------------------------------------------------------- */
/* per-expert tensors for a fused parameter name: (gate, up) or (down), in transformers' order */
static const char *const split_names[][3] = {
    {"gate_up_proj", "gate_proj", "up_proj"}, {"gate_up_proj", "w1", "w3"}, {"down_proj", "down_proj", NULL},
    {"down_proj", "w2", NULL},
};

static lm_code find_split(lm_plan_ctx *ctx, const char *mpath, param_store *ps, lm_err *err)
{
    char spell[2][1024], buf[2200];
    int n_spell = 0;
    snprintf(spell[n_spell++], sizeof spell[0], "%s", mpath);
    size_t n = strlen(mpath);
    if (n >= 11 && strcmp(mpath + n - 11, "mlp.experts") == 0 && (n == 11 || mpath[n - 12] == '.')) /* Mixtral */
        snprintf(spell[n_spell++], sizeof spell[1], "%.*sblock_sparse_moe.experts", (int)(n - 11), mpath);
    for (size_t s = 0; s < sizeof split_names / sizeof *split_names; s++) {
        if (strcmp(split_names[s][0], ps->pname) != 0)
            continue;
        for (int sp = 0; sp < n_spell; sp++) {
            lm_err local;
            lm_err_clear(&local);
            snprintf(buf, sizeof buf, "%s.0.%s.weight", spell[sp], split_names[s][1]);
            long b0 = lm_ctx_base_named(ctx, buf, &local);
            if (b0 < 0)
                continue;
            const lm_tensor_info *T = lm_ctx_base(ctx, b0);
            size_t lt = strlen(T->name), ls = strlen(split_names[s][1]) + 9; /* "0.<part>.weight" */
            if (lt < ls || lt - ls >= sizeof ps->prefix)
                continue;
            memcpy(ps->prefix, T->name, lt - ls);
            ps->prefix[lt - ls] = '\0';
            ps->fused = 0;
            ps->n_parts = split_names[s][2] ? 2 : 1;
            ps->part[0] = split_names[s][1];
            ps->part[1] = split_names[s][2];
            /* every expert 0 .. E-1 with all its parts, same shapes, float */
            uint64_t E = 0;
            for (;; E++) {
                snprintf(buf, sizeof buf, "%s%llu.%s.weight", ps->prefix, (unsigned long long)E, ps->part[0]);
                if (lm_ctx_base_exact(ctx, buf) < 0)
                    break;
            }
            for (int p = 0; p < ps->n_parts; p++)
                for (uint64_t e = 0; e < E; e++) {
                    snprintf(buf, sizeof buf, "%s%llu.%s.weight", ps->prefix, (unsigned long long)e, ps->part[p]);
                    long bi = lm_ctx_base_exact(ctx, buf);
                    if (bi < 0)
                        return lm_module_fail(err, LM_E_MISMATCH, "NoMatchingTensor", mpath,
                                              "expert %llu has no '%s' in the base (its %s is there)",
                                              (unsigned long long)e, buf, ps->part[0]);
                    const lm_tensor_info *W = lm_ctx_base(ctx, bi);
                    const lm_tensor_info *W0 = lm_ctx_base(ctx, b0);
                    if (W->n_dims != 2 || !lm_is_float_dtype(W->dtype) || W->shape[1] != W0->shape[1] ||
                        (e > 0 && W->shape[0] != ps->rows[p]))
                        return lm_mismatch(err, mpath, "per-expert tensor '%s' is not a float [%llu, %llu] like "
                                           "expert 0's", buf, (unsigned long long)(e ? ps->rows[p] : W->shape[0]),
                                           (unsigned long long)W0->shape[1]);
                    ps->rows[p] = W->shape[0];
                }
            ps->E = E;
            ps->d1 = ps->rows[0] + (ps->n_parts > 1 ? ps->rows[1] : 0);
            ps->d2 = lm_ctx_base(ctx, b0)->shape[1];
            ps->nd = 3;
            return LM_OK;
        }
    }
    return LM_OK; /* not there: ps->nd stays 0 (the caller names what it looked for) */
}

/* the parameter pname of module mpath in the base: fused, else per expert; ps->nd = 0 when it is
 * in neither form */
static lm_code find_param(lm_plan_ctx *ctx, const char *mpath, param_store *ps, lm_err *err)
{
    char buf[1300];
    lm_err local;
    lm_err_clear(&local);
    snprintf(buf, sizeof buf, "%s.%s", mpath, ps->pname);
    long bi = lm_ctx_base_named(ctx, buf, &local);
    if (bi >= 0) {
        const lm_tensor_info *W = lm_ctx_base(ctx, bi);
        if ((W->n_dims != 2 && W->n_dims != 3) || !lm_is_float_dtype(W->dtype))
            return lm_module_fail(err, LM_E_UNSUPPORTED, "Unsupported", mpath,
                                  "target parameter '%s' is a %zu-D %s tensor: LoRA merges 2-D and 3-D float parameters",
                                  W->name, W->n_dims, lm_dtype_name(W->dtype));
        ps->fused = 1;
        ps->bi = bi;
        ps->nd = (int)W->n_dims;
        ps->E = W->n_dims == 3 ? W->shape[0] : 1;
        ps->d1 = W->shape[W->n_dims - 2];
        ps->d2 = W->shape[W->n_dims - 1];
        return LM_OK;
    }
    if (local.code == LM_E_MISMATCH && strcmp(local.kind, "AmbiguousModule") == 0) {
        *err = local;
        lm_err_set_tensor(err, mpath);
        return err->code;
    }
    /* gpt-oss MXFP4: transformers dequantizes "<param>_blocks" [E, out, in/32, 16] into the
     * parameter [E, in, out]; the planner's view of the blocks is [E, out, in] */
    snprintf(buf, sizeof buf, "%s.%s_blocks", mpath, ps->pname);
    lm_err_clear(&local);
    bi = lm_ctx_base_named(ctx, buf, &local);
    if (bi >= 0 && lm_ctx_base(ctx, bi)->n_dims == 3 && lm_ctx_base(ctx, bi)->dtype == LM_DT_F32) {
        const lm_tensor_info *W = lm_ctx_base(ctx, bi);
        ps->fused = 1;
        ps->stored_t = 1;
        ps->bi = bi;
        ps->nd = 3;
        ps->E = W->shape[0];
        ps->d1 = W->shape[2];
        ps->d2 = W->shape[1];
        return LM_OK;
    }
    return find_split(ctx, mpath, ps, err);
}

/* which layouts fit factors A [R, a_in], B [b_out, R] on the parameter: bit 0 out_in, bit 1 in_out */
static int layouts_fitting(const param_store *ps, const lm_ts_tensor *A, const lm_ts_tensor *B)
{
    if (A->n_dims != 2 || B->n_dims != 2 || A->shape[0] != B->shape[1])
        return 0;
    int f = 0;
    if (A->shape[1] == ps->d2 && B->shape[0] == ps->d1)
        f |= 1;
    if (ps->nd == 3 && A->shape[1] == ps->d1 && B->shape[0] == ps->d2)
        f |= 2;
    return f;
}

static void store_desc(const param_store *ps, char *buf, size_t cap)
{
    if (ps->fused)
        snprintf(buf, cap, "%s %s", ps->pname, ps->nd == 3 ? "[E, d1, d2]" : "[o, i]");
    else
        snprintf(buf, cap, "%s (%llu experts of %s%s%s)", ps->pname, (unsigned long long)ps->E, ps->part[0],
                 ps->n_parts > 1 ? " + " : "", ps->n_parts > 1 ? ps->part[1] : "");
    size_t n = strlen(buf);
    if (n < cap)
        snprintf(buf + n, cap - n, " = [%llu, %llu, %llu]", (unsigned long long)ps->E, (unsigned long long)ps->d1,
                 (unsigned long long)ps->d2);
}

/* ---- planning ------------------------------------------------------------------------------ */
static lm_code check_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    const lm_ts_tensor *A = m->part[LORA_A], *B = m->part[LORA_B];
    if (A == NULL || B == NULL)
        return lm_module_fail(err, LM_E_FORMAT, "IncompleteModule", m->path, "adapter has %s but no %s for this "
                              "target parameter", A ? "lora_A" : B ? "lora_B" : "a part", A ? "lora_B" : "lora_A");
    if (cfg->use_dora || m->part[LORA_MAG] != NULL || cfg->lora_bias || m->part[LORA_B_BIAS] != NULL ||
        cfg->fan_in_fan_out || m->part[LORA_EA] != NULL || m->part[LORA_EB] != NULL)
        return lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", m->path,
                              "LoRA on a parameter (target_parameters) with %s: PEFT's ParamWrapper refuses it",
                              cfg->use_dora || m->part[LORA_MAG] ? "DoRA"
                              : cfg->lora_bias || m->part[LORA_B_BIAS] ? "lora_bias"
                              : cfg->fan_in_fan_out ? "fan_in_fan_out" : "embedding factors");
    if (!lm_is_float_dtype(A->dtype) || !lm_is_float_dtype(B->dtype))
        return lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedDType", m->path, "lora factors must be float (got %s, %s)",
                              lm_dtype_name(A->dtype), lm_dtype_name(B->dtype));
    return LM_OK;
}

/* the parameter each wrapper level of module group g[0..n) adapts */
static lm_code assign_group(lm_plan_ctx *ctx, param_mod *g, size_t n, param_store *cand, size_t *n_cand, lm_err *err)
{
    const lm_lora_cfg *lc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const char *mpath = g[0].mpath;
    char key[1200], looked[600] = "";
    size_t nc = 0, lu = 0;
    for (size_t i = 0; i < lc->target_params.n && nc < MAX_CANDS; i++) {
        const char *pn = param_name_of(lc->target_params.v[i]);
        snprintf(key, sizeof key, "%s.%s", mpath, pn);
        int dup = 0;
        for (size_t c = 0; c < nc; c++)
            dup |= strcmp(cand[c].pname, pn) == 0;
        if (dup || !key_matches(key, lc->target_params.v[i]))
            continue;
        memset(&cand[nc], 0, sizeof cand[nc]);
        cand[nc].pname = pn;
        if (find_param(ctx, mpath, &cand[nc], err) != LM_OK)
            return err->code;
        if (cand[nc].nd != 0)
            nc++;
        else if (lu < sizeof looked)
            lu += (size_t)snprintf(looked + lu, sizeof looked - lu, "%s'%s'", lu ? ", " : "", key);
    }
    *n_cand = nc;
    if (nc == 0)
        return lm_module_fail(err, LM_E_MISMATCH, "NoMatchingTensor", g[0].m->path,
                              "no base tensor for the targeted parameter%s %s (fused, or per expert)", lu ? "" : "s",
                              looked);
    for (size_t k = 0; k < n; k++) {
        const lm_module *m = g[k].m;
        const lm_ts_tensor *A = m->part[LORA_A], *B = m->part[LORA_B];
        size_t hit = 0, n_hit = 0;
        for (size_t c = 0; c < nc; c++)
            if (layouts_fitting(&cand[c], A, B)) {
                hit = c;
                n_hit++;
            }
        char sa[96], sb[96], d[300];
        lm_shape_str(sa, sizeof sa, A->n_dims, A->shape);
        lm_shape_str(sb, sizeof sb, B->n_dims, B->shape);
        if (n_hit != 1) {
            store_desc(&cand[n_hit ? hit : 0], d, sizeof d);
            return lm_module_fail(err, LM_E_MISMATCH, n_hit ? "AmbiguousModule" : "ShapeMismatch", m->path,
                                  "lora_A %s and lora_B %s fit %s targeted parameter of %s (%s%s)", sa, sb,
                                  n_hit ? "more than one" : "no", mpath, d, nc > 1 ? ", ..." : "");
        }
        if (cand[hit].taken != NULL)
            return lm_module_fail(err, LM_E_FORMAT, "DuplicateKey", m->path,
                                  "two wrappers (%s and %s) hold LoRA factors for the same parameter %s.%s",
                                  cand[hit].taken->path, m->path, mpath, cand[hit].pname);
        cand[hit].taken = m;
        g[k].ps = &cand[hit];
        g[k].layouts = layouts_fitting(&cand[hit], A, B);
        if (cand[hit].stored_t && g[k].layouts == 3) /* gpt-oss experts are is_transposed: [E, in, out] */
            g[k].layouts = 2;
    }
    return LM_OK;
}

/* expert count and rank: lora_A has r * E rows */
static lm_code check_rank(lm_plan_ctx *ctx, param_mod *pm, lm_err *err)
{
    const param_store *ps = pm->ps;
    char key[1200];
    snprintf(key, sizeof key, "%s.%s", pm->mpath, ps->pname);
    if (lm_ctx_rank_alpha(ctx, key, &pm->r, &pm->alpha, err) != LM_OK)
        return err->code;
    uint64_t R = pm->m->part[LORA_A]->shape[0];
    if (pm->r <= 0 || R % (uint64_t)pm->r != 0)
        return lm_module_fail(err, LM_E_MISMATCH, "RankMismatch", pm->m->path,
                              "lora_A has %llu rows, not a multiple of r=%ld that adapter_config.json gives %s",
                              (unsigned long long)R, pm->r, key);
    uint64_t E_ad = R / (uint64_t)pm->r;
    if (E_ad != ps->E)
        return lm_module_fail(err, LM_E_MISMATCH, "ExpertMismatch", pm->m->path,
                              "the adapter has %llu experts for %s (lora_A: %llu rows = r %ld x experts) but the base "
                              "has %llu%s", (unsigned long long)E_ad, key, (unsigned long long)R, pm->r,
                              (unsigned long long)ps->E,
                              ps->fused ? "" : E_ad > ps->E ? " (the next expert's tensors are missing)" : "");
    return LM_OK;
}

/* in_out or out_in for every module; squares from the others or peft_version */
static lm_code decide_layouts(lm_plan_ctx *ctx, param_mod *pm, size_t n, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    const lm_lora_cfg *lc = cfg->mcfg;
    int known = -1;
    for (size_t k = 0; k < n && known < 0; k++)
        if (pm[k].ps->nd == 3 && pm[k].layouts != 3)
            known = pm[k].layouts == 2;
    int old_peft = lc->peft_major == 0 && lc->peft_minor >= 0 && lc->peft_minor < 19;
    for (size_t k = 0; k < n; k++) {
        if (pm[k].layouts != 3) {
            pm[k].in_out = pm[k].layouts == 2;
            continue;
        }
        if (old_peft) {
            pm[k].in_out = 1;
        } else if (known >= 0) {
            pm[k].in_out = known;
        } else {
            return lm_module_fail(err, LM_E_UNSUPPORTED, "AmbiguousLayout", pm[k].m->path,
                                  "square expert parameter %s.%s [%llu, %llu, %llu]: PEFT %d.%d stores its delta as "
                                  "[E, out, in] or, for is_transposed expert modules (gpt-oss), [E, in, out], and "
                                  "no non-square expert parameter in the adapter tells which",
                                  pm[k].mpath, pm[k].ps->pname, (unsigned long long)pm[k].ps->E,
                                  (unsigned long long)pm[k].ps->d1, (unsigned long long)pm[k].ps->d2,
                                  lc->peft_major, lc->peft_minor);
        }
        if (lm_ctx_note(ctx, "%s: square expert parameter %s.%s taken as [E, %s] (%s)", lm_ctx_adapter(ctx)->dir,
                        pm[k].mpath, pm[k].ps->pname, pm[k].in_out ? "in, out" : "out, in",
                        old_peft ? "peft_version < 0.19" : "as the adapter's other expert parameters") != LM_OK)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    return LM_OK;
}

static lm_code add_ops(lm_plan_ctx *ctx, const param_mod *pm, lm_lora_scale_fn scale_of, lm_err *err)
{
    const lm_adapter_config *cfg = lm_ctx_adapter(ctx)->cfg;
    const param_store *ps = pm->ps;
    const lm_module *m = pm->m;
    double s = scale_of(cfg, pm->r, pm->alpha);
    uint64_t r = (uint64_t)pm->r, in = pm->in_out ? ps->d1 : ps->d2, out = pm->in_out ? ps->d2 : ps->d1;
    /* the tensor's experts are [d1, d2], or (stored_t) [d2, d1] with the delta transposed once more */
    uint64_t t1 = ps->stored_t ? ps->d2 : ps->d1, t2 = ps->stored_t ? ps->d1 : ps->d2;
    int t_io = pm->in_out ^ ps->stored_t;
    expert_params ep = {LM_LORA_EXPERTS, m->part[LORA_A], m->part[LORA_B], ps->E, r, 0, 0, t1, t2, t_io};
    if (ps->fused && ps->nd == 3 && lm_ctx_view_rows(ctx, ps->bi, ps->E * t1, err) != 0) {
        lm_err_set_tensor(err, m->path);
        return err->code;
    }
    if (ps->fused) { /* expert e: rows e*t1 .. of the view [E*t1, t2] (a 2-D parameter: E = 1) */
        for (uint64_t e = 0; e < ps->E; e++) {
            lm_op *op = lm_ctx_add_delta(ctx, ps->bi, LM_OP_LOWRANK, "lora", m->path, r, in, out, t_io, s,
                                         sizeof ep, err);
            if (op == NULL)
                return LM_E_NOMEM;
            op->row0 = e * t1;
            ep.e = e;
            *(expert_params *)op->params = ep;
        }
        return LM_OK;
    }
    char buf[1300];
    for (uint64_t e = 0; e < ps->E; e++) {
        uint64_t lo = 0;
        for (int p = 0; p < ps->n_parts; p++) {
            snprintf(buf, sizeof buf, "%s%llu.%s.weight", ps->prefix, (unsigned long long)e, ps->part[p]);
            long bi = lm_ctx_base_exact(ctx, buf);
            uint64_t rows = ps->rows[p];
            /* out_in: rows lo.. of B_e; in_out: columns lo.. of A_e (the tensor is [in-slice, out]) */
            lm_op *op = lm_ctx_add_delta(ctx, bi, LM_OP_LOWRANK, "lora", m->path, r, pm->in_out ? rows : ps->d2,
                                         pm->in_out ? ps->d2 : rows, pm->in_out, s, sizeof ep, err);
            if (op == NULL)
                return LM_E_NOMEM;
            ep.e = e;
            ep.lo = lo;
            *(expert_params *)op->params = ep;
            lo += rows;
        }
    }
    return LM_OK;
}

lm_code lm_lora_plan_params(lm_plan_ctx *ctx, const lm_module *const *mods, size_t n, lm_lora_scale_fn scale_of,
                            lm_err *err)
{
    param_mod *pm = calloc(n ? n : 1, sizeof *pm);
    param_store *stores = calloc(n ? n * MAX_CANDS : 1, sizeof *stores);
    lm_code rc = LM_OK;
    if (pm == NULL || stores == NULL)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t k = 0; k < n && rc == LM_OK; k++) {
        pm[k].m = mods[k];
        unwrap(mods[k]->path, pm[k].mpath, sizeof pm[k].mpath);
        rc = check_module(ctx, mods[k], err);
    }
    /* group the wrapper levels of each module (sorted by the module path, so they are adjacent) */
    for (size_t k = 1; k < n && rc == LM_OK; k++)
        for (size_t j = k; j > 0 && strcmp(pm[j - 1].mpath, pm[j].mpath) > 0; j--) {
            param_mod t = pm[j];
            pm[j] = pm[j - 1];
            pm[j - 1] = t;
        }
    for (size_t k = 0, used = 0; k < n && rc == LM_OK;) {
        size_t e = k + 1, nc = 0;
        while (e < n && strcmp(pm[e].mpath, pm[k].mpath) == 0)
            e++;
        rc = assign_group(ctx, &pm[k], e - k, &stores[used], &nc, err);
        used += MAX_CANDS;
        k = e;
    }
    for (size_t k = 0; k < n && rc == LM_OK; k++)
        rc = check_rank(ctx, &pm[k], err);
    if (rc == LM_OK)
        rc = decide_layouts(ctx, pm, n, err);
    for (size_t k = 0; k < n && rc == LM_OK; k++)
        rc = add_ops(ctx, &pm[k], scale_of, err);
    free(pm);
    free(stores);
    return rc;
}

/* ---- merging ------------------------------------------------------------------------------- */
/* element i of a float adapter tensor */
static float elem(const lm_ts_tensor *t, uint64_t i, const lm_kernels *k)
{
    float v;
    lm_ts_to_f32(t, i, 1, &v, k);
    return v;
}

/* expert e's delta (a per-expert tensor: its slice lo.. of d1; a fused tensor: all of d1; a 2-D
 * parameter: E = 1), as a plain low-rank op expects its factors: A' [rank, in], B' [out, rank] */
static lm_code prepare_slice(const lm_op *op, const expert_params *ep, const lm_kernels *k, lm_prepared *p,
                             lm_err *err)
{
    const uint64_t r = ep->r, R = ep->E * r, e = ep->e;
    float *A = lm_prep_floats(p, (size_t)(op->rank * op->in), err), *B = lm_prep_floats(p, (size_t)(op->out * op->rank), err);
    if (A == NULL || B == NULL)
        return LM_E_NOMEM;
    lm_prep_read(p, ep->A);
    lm_prep_read(p, ep->B);
    if (!ep->in_out) { /* A' = A_e (in = d2), B'[x, j] = B[lo + x, j*E + e] */
        lm_ts_to_f32(ep->A, e * r * ep->d2, (size_t)(r * ep->d2), A, k);
        for (uint64_t x = 0; x < op->out; x++)
            for (uint64_t j = 0; j < r; j++)
                B[x * r + j] = elem(ep->B, (ep->lo + x) * R + j * ep->E + e, k);
    } else { /* A'[j, x] = A[e*r + j, lo + x] (in = the slice of d1), B'[y, j] = B[y, j*E + e] */
        for (uint64_t j = 0; j < r; j++)
            lm_ts_to_f32(ep->A, (e * r + j) * ep->d1 + ep->lo, (size_t)op->in, A + j * op->in, k);
        for (uint64_t y = 0; y < op->out; y++)
            for (uint64_t j = 0; j < r; j++)
                B[y * r + j] = elem(ep->B, y * R + j * ep->E + e, k);
    }
    p->a = A;
    p->b = B;
    return LM_OK;
}

lm_code lm_lora_param_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    return prepare_slice(op, op->params, k, p, err);
}
