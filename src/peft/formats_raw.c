/* SPDX-License-Identifier: MIT */
/* formats_raw.c : up/down matrices without PEFT packaging.
 *
 *   raw folder       up.pt / down.pt (also up-param.bin, lora_up.safetensors ...): each a tensor, a
 *                    list of tensors, or a name -> tensor dict.  Names are matched to modules; lists
 *                    and lone tensors are unnamed.  down = PEFT A [r, in], up = B [out, r]; scale 1
 *                    unless --lora-scale / --lora-alpha says otherwise (nothing is recorded).
 *   lora_diffusion   cloneofsimo/lora: a torch.save list [up_0, down_0, up_1, down_1 ...] (.pt), or
 *                    "<group>:<i>:up" / ":down" keys with "<group>" = the target classes and
 *                    "<group>:<i>:rank" in the metadata (.safetensors); scale 1.  Pair k is the k-th
 *                    Linear found under the target classes in named_modules() order.
 *   LoRA-SAM / -ViT  w_a_NNN [r, in], w_b_NNN [d, r]: pair 2k is block k's q, 2k+1 its v, added to rows
 *                    [0, d) and [2d, 3d) of the fused qkv [3d, in]; one exact PEFT LoRA per block with
 *                    A = [a_q; a_v] and B = [[b_q, 0], [0, 0], [0, b_v]].
 * Unnamed pairs take their module order from the base: its config.json names the architecture
 * (a diffusers UNet2DConditionModel, a transformers CLIP text encoder) and the order is
 * named_modules() order of that class, rebuilt from the base's tensor names; every candidate
 * order is checked against every pair's shapes, and exactly one must fit.  --target-modules
 * gives the order instead. */
#include "formats_internal.h"

#include "compat.h"
#include "lm_error.h"
#include "torch_bin.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* module orders                                                                                */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    const char *const *names; /* component names in registration order */
    size_t n;
} rank_table;

static int comp_rank(const rank_table *t, const char *s, size_t n)
{
    for (size_t i = 0; i < t->n; i++)
        if (strlen(t->names[i]) == n && memcmp(t->names[i], s, n) == 0)
            return (int)i;
    return -1;
}

static int is_num(const char *s, size_t n)
{
    if (n == 0 || n > 18)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i]))
            return 0;
    return 1;
}

/* compares module paths component by component: numbers as numbers, names by the table's
 * registration order (names it does not list after those it does, alphabetically) */
static int path_cmp(const char *a, const char *b, const rank_table *t)
{
    while (*a && *b) {
        size_t na = strcspn(a, "."), nb = strcspn(b, ".");
        int c = 0;
        if (is_num(a, na) && is_num(b, nb)) {
            unsigned long long x = strtoull(a, NULL, 10), y = strtoull(b, NULL, 10);
            c = x < y ? -1 : x > y;
        } else {
            int ra = t ? comp_rank(t, a, na) : -1, rb = t ? comp_rank(t, b, nb) : -1;
            if (ra >= 0 && rb >= 0)
                c = ra < rb ? -1 : ra > rb;
            else if (ra >= 0 || rb >= 0)
                c = ra >= 0 ? -1 : 1;
            else {
                size_t n = na < nb ? na : nb;
                c = memcmp(a, b, n);
                if (c == 0 && na != nb)
                    c = na < nb ? -1 : 1;
            }
        }
        if (c != 0)
            return c;
        a += na + (a[na] == '.');
        b += nb + (b[nb] == '.');
    }
    return *a ? 1 : *b ? -1 : 0;
}

static int cmp_paths(const void *x, const void *y, void *ctx)
{
    return path_cmp(*(char *const *)x, *(char *const *)y, ctx);
}

typedef struct {
    const char *label;
    char **mods; /* borrowed from the base index */
    size_t n;
} order;

/* diffusers' UNet2DConditionModel registers down_blocks, up_blocks, then mid_block; a
 * transformer block attn1, ff, attn2 (diffusers <= 0.14) or attn1, attn2, ff (later); an
 * Attention to_q, to_k, to_v, to_out.  transformers' CLIPAttention registers k, v, q, out. */
static const char *const UNET_OLD[] = {"down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "norm",
                                       "proj_in", "transformer_blocks", "proj_out", "attn1", "ff", "attn2", "net",
                                       "to_q", "to_k", "to_v", "to_out", "proj"};
static const char *const UNET_NEW[] = {"down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "norm",
                                       "proj_in", "transformer_blocks", "proj_out", "attn1", "attn2", "ff", "net",
                                       "to_q", "to_k", "to_v", "to_out", "proj"};
static const char *const CLIP_ORDER[] = {"text_model", "encoder", "layers", "self_attn", "k_proj", "v_proj", "q_proj",
                                         "out_proj"};

static int unet_attn(const char *m)
{
    if (strstr(m, "transformer_blocks.") == NULL || (!strstr(m, ".attn1.") && !strstr(m, ".attn2.")))
        return 0;
    return fm_ends_with(m, ".to_q") || fm_ends_with(m, ".to_k") || fm_ends_with(m, ".to_v") ||
           fm_ends_with(m, ".to_out.0");
}

static int unet_geglu(const char *m)
{
    return strstr(m, "transformer_blocks.") != NULL && fm_ends_with(m, ".ff.net.0.proj");
}

static int clip_attn(const char *m)
{
    return strstr(m, "layers.") != NULL && strstr(m, ".self_attn.") != NULL &&
           (fm_ends_with(m, ".q_proj") || fm_ends_with(m, ".k_proj") || fm_ends_with(m, ".v_proj") ||
            fm_ends_with(m, ".out_proj"));
}

static lm_code make_order(const fm_base *b, int (*keep1)(const char *), int (*keep2)(const char *),
                          const char *const *ranks, size_t n_ranks, const char *label, order *o, lm_err *err)
{
    o->label = label;
    o->n = 0;
    o->mods = malloc((b->n ? b->n : 1) * sizeof *o->mods);
    if (o->mods == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; i < b->n; i++)
        if (b->mod[i] && (keep1(b->mod[i]) || (keep2 && keep2(b->mod[i]))))
            o->mods[o->n++] = b->mod[i];
    rank_table t = {ranks, n_ranks};
    qsort_r(o->mods, o->n, sizeof *o->mods, cmp_paths, &t);
    return LM_OK;
}

/* does pair (up, down) fit base weight W: [out, in] or a kernel [out, in, kh, kw] */
static int pair_fits(const lm_tensor_info *W, const lm_ts_tensor *up, const lm_ts_tensor *down)
{
    if (up->n_dims < 2 || down->n_dims < 2 || up->shape[1] != down->shape[0] || W->n_dims < 2)
        return 0;
    uint64_t r = down->shape[0], in = down->n_elems / (r ? r : 1);
    for (size_t d = 2; d < up->n_dims; d++)
        if (up->shape[d] != 1)
            return 0;
    if (W->shape[0] != up->shape[0])
        return 0;
    if (W->n_dims == 2)
        return down->n_dims == 2 || in == W->shape[1];
    uint64_t w_in = W->n_elems / W->shape[0];
    if (down->n_dims == 2) /* 2-D factors fit a 1x1 kernel only */
        return w_in == W->shape[1] && in == W->shape[1];
    if (down->n_dims != W->n_dims)
        return 0;
    for (size_t d = 1; d < W->n_dims; d++)
        if (down->shape[d] != W->shape[d])
            return 0;
    return 1;
}

/* "--target-modules" expanded against the base: exact paths as given, else leaf names over the
 * base's modules, layer by layer (numbers in order), entries in the order given */
typedef struct {
    const char *mod;
    size_t entry;
    size_t layer_len; /* the path before the entry, up to its last numeric component */
} tm_item;

/* the path up to its last numeric component, looking at the first `len` characters only */
static size_t layer_prefix_len(const char *m, size_t len)
{
    size_t last = 0, i = 0;
    while (i < len && m[i]) {
        size_t n = strcspn(m + i, ".");
        if (i + n > len)
            n = len - i;
        if (is_num(m + i, n))
            last = i + n;
        i += n + (m[i + n] == '.');
    }
    return last;
}

static int cmp_tm(const void *x, const void *y)
{
    const tm_item *a = x, *b = y;
    char pa[1024], pb[1024];
    snprintf(pa, sizeof pa, "%.*s", (int)a->layer_len, a->mod);
    snprintf(pb, sizeof pb, "%.*s", (int)b->layer_len, b->mod);
    int c = path_cmp(pa, pb, NULL);
    if (c == 0)
        c = a->entry < b->entry ? -1 : a->entry > b->entry;
    if (c == 0)
        c = path_cmp(a->mod, b->mod, NULL);
    return c;
}

static lm_code user_order(fm_ctx *c, order *o, char ***owned, size_t *n_owned, lm_err *err)
{
    const char *spec = c->opts->target_modules;
    char *copy = strdup(spec);
    char **entries = NULL;
    size_t n_e = 0, cap_e = 0;
    tm_item *items = NULL;
    size_t n_i = 0, cap_i = 0;
    lm_code rc = LM_OK;
    if (copy == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        while (isspace((unsigned char)*tok))
            tok++;
        size_t n = strlen(tok);
        while (n > 0 && isspace((unsigned char)tok[n - 1]))
            tok[--n] = '\0';
        if (n == 0)
            continue;
        if (lm_grow((void **)&entries, &cap_e, n_e, sizeof *entries, 16) != 0) {
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto done;
        }
        entries[n_e++] = tok;
    }
    if (n_e == 0) {
        rc = lm_fail(err, LM_E_USAGE, "Usage", "--target-modules is empty");
        goto done;
    }
    int all_exact = 1;
    for (size_t e = 0; e < n_e; e++)
        all_exact &= c->base == NULL || fm_base_weight(c->base, entries[e]) >= 0;
    if (all_exact) { /* full paths, in the order given */
        *owned = calloc(n_e, sizeof **owned);
        if (*owned == NULL) {
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto done;
        }
        for (size_t e = 0; e < n_e; e++)
            if (((*owned)[e] = strdup(entries[e])) == NULL) {
                rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
                goto done;
            }
        *n_owned = n_e;
        o->mods = malloc(n_e * sizeof *o->mods);
        if (o->mods == NULL) {
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            goto done;
        }
        memcpy(o->mods, *owned, n_e * sizeof *o->mods);
        o->n = n_e;
        o->label = "--target-modules (module paths as given)";
        goto done;
    }
    if (c->base == NULL) {
        rc = lm_fail(err, LM_E_USAGE, "NeedsBase", "--target-modules names ('%s') are looked up in the base: give it",
                     entries[0]);
        goto done;
    }
    for (size_t e = 0; e < n_e; e++) {
        size_t found = 0, ne = strlen(entries[e]);
        for (size_t i = 0; i < c->base->n; i++) {
            const char *m = c->base->mod[i];
            if (m == NULL)
                continue;
            size_t nm = strlen(m);
            if (!(strcmp(m, entries[e]) == 0 || (nm > ne && m[nm - ne - 1] == '.' && !strcmp(m + nm - ne, entries[e]))))
                continue;
            if (lm_grow((void **)&items, &cap_i, n_i, sizeof *items, 64) != 0) {
                rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
                goto done;
            }
            items[n_i].mod = m;
            items[n_i].entry = e;
            items[n_i].layer_len = layer_prefix_len(m, nm > ne ? nm - ne - 1 : 0); /* before the entry's part */
            n_i++;
            found++;
        }
        if (found == 0) {
            rc = lm_fail(err, LM_E_MISMATCH, "NoMatchingTensor", "--target-modules entry '%s' matches no base module "
                         "(a module path, or the last part(s) of one such as 'q_proj' or 'self_attn.q_proj')",
                         entries[e]);
            goto done;
        }
    }
    qsort(items, n_i, sizeof *items, cmp_tm);
    o->mods = malloc((n_i ? n_i : 1) * sizeof *o->mods);
    if (o->mods == NULL) {
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n_i; i++)
        o->mods[i] = (char *)items[i].mod;
    o->n = n_i;
    o->label = "--target-modules (per layer in number order, entries in the order given)";
done:
    free(items);
    free(entries);
    free(copy);
    return rc;
}

/* the base's architecture: 1 a diffusers UNet, 2 a CLIP text encoder, 0 unknown */
static int base_arch(const fm_base *b, const char **name)
{
    const char *cls = fm_base_config_str(b, "_class_name");
    if (cls == NULL)
        cls = fm_base_config_str(b, "architectures");
    *name = cls;
    if (cls == NULL)
        return 0;
    if (strcmp(cls, "UNet2DConditionModel") == 0)
        return 1;
    if (strcmp(cls, "CLIPTextModel") == 0 || strcmp(cls, "CLIPTextModelWithProjection") == 0)
        return 2;
    return 0;
}

static int has_class(const char *const *classes, size_t n, const char *cls)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(classes[i], cls) == 0)
            return 1;
    return 0;
}

/* why an order does not fit: count, or the first pair whose shapes disagree */
static int order_fits(const fm_base *b, const order *o, const lm_ts_tensor *const *up, const lm_ts_tensor *const *down,
                      size_t n, char *why, size_t cap)
{
    if (o->n != n) {
        snprintf(why, cap, "%s: %zu modules for %zu pairs", o->label, o->n, n);
        return 0;
    }
    for (size_t k = 0; k < n; k++) {
        long idx = b ? fm_base_weight(b, o->mods[k]) : -1;
        if (b == NULL)
            continue;
        const lm_tensor_info *W = idx >= 0 ? fm_base_info(b, idx) : NULL;
        if (W == NULL || !pair_fits(W, up[k], down[k])) {
            snprintf(why, cap, "%s: pair %zu (up [%llu, %llu], down [%llu, %llu%s]) does not fit '%s'", o->label, k,
                     (unsigned long long)up[k]->shape[0], (unsigned long long)up[k]->shape[1],
                     (unsigned long long)down[k]->shape[0], (unsigned long long)down[k]->shape[1],
                     down[k]->n_dims > 2 ? ", ..." : "", o->mods[k]);
            return 0;
        }
    }
    return 1;
}

static int same_order(const order *a, const order *b)
{
    if (a->n != b->n)
        return 0;
    for (size_t i = 0; i < a->n; i++)
        if (strcmp(a->mods[i], b->mods[i]) != 0)
            return 0;
    return 1;
}

/* a plain pair: r from down's rows, scale 1 unless the user gave alpha or the multiplier */
static lm_code add_pair(fm_ctx *c, fm_module *m, const lm_ts_tensor *up, const lm_ts_tensor *down, lm_err *err)
{
    lm_code rc = LM_OK;
    m->r = (long)down->shape[0];
    m->alpha = (double)m->r;
    if (c->opts->lora_alpha != 0)
        m->alpha = c->opts->lora_alpha;
    else if (c->opts->lora_scale != 0)
        rc = fm_alpha_for_scale(c->opts->lora_scale, m->r, &m->alpha, err);
    if (rc == LM_OK)
        rc = fm_part_add(m, "lora_A.weight", down, err);
    return rc == LM_OK ? fm_part_add(m, "lora_B.weight", up, err) : rc;
}

lm_code fm_map_unnamed(fm_ctx *c, const lm_ts_tensor *const *up, const lm_ts_tensor *const *down, size_t n,
                       const char *group, const char *const *classes, size_t n_classes, const char *what,
                       lm_err *err)
{
    order cand[3];
    size_t n_cand = 0;
    char **owned = NULL;
    size_t n_owned = 0;
    lm_code rc = LM_OK;
    memset(cand, 0, sizeof cand);
    if (c->opts->target_modules != NULL) {
        rc = user_order(c, &cand[0], &owned, &n_owned, err);
        n_cand = rc == LM_OK;
    } else if (c->base == NULL) {
        rc = lm_fail(err, LM_E_USAGE, "NeedsBase", "%s: %zu unnamed (up, down) pairs: their modules come from the "
                     "base model's architecture (give the base) or from --target-modules", what, n);
    } else {
        const char *cls;
        int arch = base_arch(c->base, &cls);
        int geglu = classes == NULL || has_class(classes, n_classes, "GEGLU");
        int plain = classes == NULL || !has_class(classes, n_classes, "GEGLU");
        if (arch == 1) {
            if (plain && (rc = make_order(c->base, unet_attn, NULL, UNET_OLD, LM_ARRAY_LEN(UNET_OLD),
                                          "UNet attention", &cand[n_cand++], err)) != LM_OK)
                goto done;
            if (geglu && (rc = make_order(c->base, unet_attn, unet_geglu, UNET_OLD, LM_ARRAY_LEN(UNET_OLD),
                                          "UNet attention + GEGLU in the order attn1, ff, attn2 (diffusers <= 0.14)",
                                          &cand[n_cand++], err)) != LM_OK)
                goto done;
            if (geglu && (rc = make_order(c->base, unet_attn, unet_geglu, UNET_NEW, LM_ARRAY_LEN(UNET_NEW),
                                          "UNet attention + GEGLU in the order attn1, attn2, ff",
                                          &cand[n_cand++], err)) != LM_OK)
                goto done;
        } else if (arch == 2) {
            rc = make_order(c->base, clip_attn, NULL, CLIP_ORDER, LM_ARRAY_LEN(CLIP_ORDER),
                            "CLIP text encoder attention (k, v, q, out per layer)", &cand[n_cand++], err);
        } else {
            rc = lm_fail(err, LM_E_USAGE, "UnknownOrder", "%s: %zu unnamed (up, down) pairs, and the base's "
                         "config.json %s%s%s: lora-merge knows the module order of diffusers' UNet2DConditionModel and "
                         "transformers' CLIP text encoders only; pass --target-modules with the modules in pair order",
                         what, n, cls ? "names " : "is missing", cls ? cls : "", cls ? "" : " (beside the base)");
        }
    }
    if (rc != LM_OK)
        goto done;
    int fit[3] = {0};
    char why[3][600];
    size_t n_fit = 0, first = 0;
    for (size_t i = 0; i < n_cand; i++)
        if ((fit[i] = order_fits(c->base, &cand[i], up, down, n, why[i], sizeof why[i])) != 0 && n_fit++ == 0)
            first = i;
    if (n_fit == 0) {
        rc = lm_fail(err, LM_E_MISMATCH, "OrderMismatch", "no module order fits the %zu (up, down) pairs of the %s (pass "
                     "--target-modules with the modules in pair order): %s", n, what, why[0]);
        goto done;
    }
    for (size_t i = first + 1; i < n_cand; i++)
        if (fit[i] && !same_order(&cand[first], &cand[i])) {
            size_t k = 0;
            while (k < n && strcmp(cand[first].mods[k], cand[i].mods[k]) == 0)
                k++;
            rc = lm_fail(err, LM_E_MISMATCH, "AmbiguousOrder", "two module orders fit every pair's shapes (pass "
                         "--target-modules with the modules in pair order): pair %zu is '%s' in one, '%s' in the other",
                         k, cand[first].mods[k], cand[i].mods[k]);
            goto done;
        }
    for (size_t k = 0; k < n && rc == LM_OK; k++) {
        char src[300];
        snprintf(src, sizeof src, "%s pair %zu", group ? group : what, k);
        fm_module *m = fm_add(c, FM_LORA, src, group, cand[first].mods[k], c->base ? FM_NAME_RESOLVED : FM_NAME_PATH,
                              err);
        rc = m ? add_pair(c, m, up[k], down[k], err) : LM_E_NOMEM;
    }
    if (rc == LM_OK)
        rc = fm_note(c, "%s: %zu unnamed pairs mapped in the order %s", c->path, n, cand[first].label);
done:
    for (size_t i = 0; i < n_cand; i++)
        free(cand[i].mods);
    for (size_t i = 0; i < n_owned; i++)
        free(owned[i]);
    free(owned);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* lora_diffusion                                                                                */
/* ------------------------------------------------------------------------------------------ */
static lm_code check_pair(const lm_ts_tensor *up, const lm_ts_tensor *down, const char *what, lm_err *err)
{
    if (!fm_is_float(up->dtype) || !fm_is_float(down->dtype) || up->n_dims < 2 || down->n_dims < 2 ||
        up->shape[1] != down->shape[0])
        return lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "%s: up '%s' and down '%s' are not float [out, r] and [r, "
                       "in] matrices of one rank", what, up->name, down->name);
    return LM_OK;
}

lm_code fm_read_clone_list(fm_ctx *c, const lm_tensor_set *ts, lm_err *err)
{
    c->format = "lora_diffusion .pt list";
    if (ts->n == 0 || ts->n % 2 != 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidList", "a lora_diffusion list holds [up_0, down_0, up_1, down_1, ...]: "
                       "an even number of tensors, not %zu", ts->n);
    size_t n = ts->n / 2;
    const lm_ts_tensor **up = malloc(n * sizeof *up), **down = malloc(n * sizeof *down);
    lm_code rc = up && down ? LM_OK : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t k = 0; k < n && rc == LM_OK; k++) {
        up[k] = &ts->t[2 * k];
        down[k] = &ts->t[2 * k + 1];
        rc = check_pair(up[k], down[k], "lora_diffusion list", err);
    }
    const char *cls = NULL;
    int arch = c->base ? base_arch(c->base, &cls) : 0;
    if (rc == LM_OK)
        rc = fm_map_unnamed(c, up, down, n, arch == 1 ? "unet" : arch == 2 ? "text_encoder" : NULL, NULL, 0,
                            "lora_diffusion list", err);
    free(up);
    free(down);
    return rc;
}

/* the groups ("unet", "text_encoder") of a lora_diffusion file, named by the metadata key that
 * lists their target classes (borrowed from the file); token embeddings are counted */
static lm_code clone_groups(const lm_tensor_set *ts, const char **groups, size_t cap, size_t *n_groups,
                            size_t *n_embeds, lm_err *err)
{
    for (size_t i = 0; i < ts->n; i++) {
        const char *k = ts->t[i].name, *colon = strchr(k, ':'), *meta = fm_st_meta(ts, k);
        if (colon == NULL && meta != NULL && strcmp(meta, "<embed>") == 0) {
            (*n_embeds)++;
            continue;
        }
        if (colon == NULL) {
            lm_fail(err, LM_E_UNSUPPORTED, "UnknownKey", "not a lora_diffusion key ('<group>:<index>:up|down', or a token "
                    "embedding marked <embed>)");
            lm_err_set_tensor(err, k);
            return LM_E_UNSUPPORTED;
        }
        size_t len = (size_t)(colon - k), g = 0;
        while (g < *n_groups && !(strncmp(groups[g], k, len) == 0 && groups[g][len] == '\0'))
            g++;
        if (g < *n_groups)
            continue;
        const char *gname = NULL;
        for (size_t m = 0; ts->st && m < lm_st_n_metadata(ts->st) && gname == NULL; m++) {
            const char *mk, *mv;
            lm_st_metadata(ts->st, m, &mk, &mv);
            if (strncmp(mk, k, len) == 0 && mk[len] == '\0')
                gname = mk;
        }
        if (gname == NULL || *n_groups == cap)
            return lm_fail(err, LM_E_FORMAT, "MissingMetadata", "group '%.*s' has no metadata entry naming its target "
                           "classes (or too many groups)", (int)len, k);
        groups[(*n_groups)++] = gname;
    }
    return LM_OK;
}

/* the pairs gname:0 .. gname:n-1 (up, down), every one present, ranks as the metadata says */
static lm_code clone_pairs(const lm_tensor_set *ts, const char *gname, size_t n, const lm_ts_tensor **up,
                           const lm_ts_tensor **down, lm_err *err)
{
    char key[300];
    size_t total = 0, ng = strlen(gname);
    for (size_t i = 0; i < ts->n; i++)
        total += strncmp(ts->t[i].name, gname, ng) == 0 && ts->t[i].name[ng] == ':';
    if (total != 2 * n)
        return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "group '%s' has %zu tensors, not the %zu of pairs 0 .. %zu",
                       gname, total, 2 * n, n ? n - 1 : 0);
    for (size_t k = 0; k < n; k++) {
        snprintf(key, sizeof key, "%s:%zu:up", gname, k);
        up[k] = lm_ts_find(ts, key);
        snprintf(key, sizeof key, "%s:%zu:down", gname, k);
        if ((down[k] = lm_ts_find(ts, key)) == NULL)
            return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "no '%s' for '%s:%zu:up'", key, gname, k);
        lm_code rc = check_pair(up[k], down[k], gname, err);
        snprintf(key, sizeof key, "%s:%zu:rank", gname, k);
        const char *rank = fm_st_meta(ts, key);
        if (rc == LM_OK && rank != NULL && strtoull(rank, NULL, 10) != down[k]->shape[0])
            rc = lm_fail(err, LM_E_MISMATCH, "RankMismatch", "metadata says rank %s for pair %zu of '%s' but down has "
                         "%llu rows", rank, k, gname, (unsigned long long)down[k]->shape[0]);
        if (rc != LM_OK)
            return rc;
    }
    return LM_OK;
}

/* one group: its pairs in the order of the target classes lora_diffusion recorded (a JSON list) */
static lm_code clone_group(fm_ctx *c, const lm_tensor_set *ts, const char *gname, size_t n, lm_err *err)
{
    const lm_ts_tensor **up = malloc((n ? n : 1) * sizeof *up), **down = malloc((n ? n : 1) * sizeof *down);
    lm_code rc = up && down ? clone_pairs(ts, gname, n, up, down, err) : lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    const char *classes[8];
    size_t n_classes = 0;
    cJSON *cl = cJSON_Parse(fm_st_meta(ts, gname));
    const cJSON *e;
    if (cJSON_IsArray(cl))
        cJSON_ArrayForEach(e, cl) if (cJSON_IsString(e) && n_classes < LM_ARRAY_LEN(classes)) classes[n_classes++] =
            e->valuestring;
    if (rc == LM_OK)
        rc = fm_map_unnamed(c, up, down, n, gname, n_classes ? classes : NULL, n_classes, "lora_diffusion", err);
    cJSON_Delete(cl);
    free(up);
    free(down);
    return rc;
}

lm_code fm_read_clone_st(fm_ctx *c, const lm_tensor_set *ts, lm_err *err)
{
    c->format = "lora_diffusion .safetensors";
    const char *groups[8], *cls = NULL;
    size_t n_groups = 0, n_embeds = 0;
    int mapped = 0, arch = c->base ? base_arch(c->base, &cls) : 0;
    lm_code rc = clone_groups(ts, groups, LM_ARRAY_LEN(groups), &n_groups, &n_embeds, err);
    for (size_t g = 0; g < n_groups && rc == LM_OK; g++) {
        const char *gname = groups[g];
        int wanted = arch == 1 ? strcmp(gname, "unet") == 0 : arch == 2 ? strcmp(gname, "text_encoder") == 0
                                                                        : n_groups == 1;
        size_t n = 0;
        char key[300];
        do
            snprintf(key, sizeof key, "%s:%zu:up", gname, n);
        while (lm_ts_find(ts, key) != NULL && ++n);
        if (!wanted) {
            rc = fm_note(c, "%s: %zu pairs of group '%s' skipped (the base is %s; merge them into that component "
                         "separately)", c->path, n, gname, cls ? cls : "another component");
            continue;
        }
        rc = clone_group(c, ts, gname, n, err);
        mapped++;
    }
    if (rc == LM_OK && n_embeds > 0)
        rc = fm_note(c, "%s: %zu textual-inversion token embeddings (<embed>) are new tokens, not weight deltas: not "
                     "merged", c->path, n_embeds);
    if (rc == LM_OK && mapped == 0)
        rc = lm_fail(err, LM_E_MISMATCH, "NoMatchingTensor", "no group of the file (%s%s) belongs to the base (%s)",
                     n_groups ? groups[0] : "none", n_groups > 1 ? ", ..." : "", cls ? cls : "no config.json");
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* LoRA-SAM / LoRA-ViT                                                                          */
/* ------------------------------------------------------------------------------------------ */
static int qkv_module(const char *m)
{
    return fm_ends_with(m, ".attn.qkv") && strstr(m, "blocks.") != NULL;
}

lm_code fm_read_lora_sam(fm_ctx *c, const lm_tensor_set *ts, lm_err *err)
{
    c->format = "LoRA-SAM / LoRA-ViT";
    size_t n_a = 0, n_b = 0;
    for (size_t i = 0; i < ts->n; i++) {
        const char *k = ts->t[i].name;
        if (fm_starts_with(k, "w_a_"))
            n_a++;
        else if (fm_starts_with(k, "w_b_"))
            n_b++;
        else
            return lm_fail(err, LM_E_UNSUPPORTED, "UnknownKey", "'%s' is not w_a_NNN / w_b_NNN", k);
    }
    char key[32];
    for (size_t i = 0; i < n_a; i++) {
        snprintf(key, sizeof key, "w_a_%03zu", i);
        const lm_ts_tensor *a = lm_ts_find(ts, key);
        snprintf(key, sizeof key, "w_b_%03zu", i);
        const lm_ts_tensor *b = lm_ts_find(ts, key);
        if (a == NULL || b == NULL)
            return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "pair %zu is incomplete: %s%s (LoRA-SAM / LoRA-ViT "
                           "save w_a_NNN and w_b_NNN for every pair: the up matrices are missing, nothing can be "
                           "merged)", i, a ? "" : "no w_a, ", b ? "" : "no w_b");
    }
    if (n_a != n_b || n_a == 0 || n_a % 2 != 0)
        return lm_fail(err, LM_E_FORMAT, "IncompleteModule", "%zu w_a and %zu w_b tensors: expected the same even "
                       "number (a q and a v pair per block)", n_a, n_b);
    if (c->base == NULL)
        return lm_fail(err, LM_E_USAGE, "NeedsBase", "LoRA-SAM pairs name no module: pair 2k is block k's q and 2k+1 "
                       "its v of the fused qkv, found in the base: give the base");
    order blocks;
    lm_code rc = make_order(c->base, qkv_module, NULL, NULL, 0, "blocks.N.attn.qkv", &blocks, err);
    if (rc != LM_OK)
        return rc;
    if (blocks.n * 2 != n_a) {
        rc = lm_fail(err, LM_E_MISMATCH, "OrderMismatch", "%zu pairs but the base has %zu fused qkv layers "
                     "(blocks.N.attn.qkv): LoRA-SAM's pairs are a q and a v per block; a subset of blocks is not "
                     "recorded in the file", n_a, blocks.n);
        free(blocks.mods);
        return rc;
    }
    for (size_t k = 0; k < blocks.n && rc == LM_OK; k++) {
        const lm_ts_tensor *aq, *av, *bq, *bv;
        snprintf(key, sizeof key, "w_a_%03zu", 2 * k);
        aq = lm_ts_find(ts, key);
        snprintf(key, sizeof key, "w_a_%03zu", 2 * k + 1);
        av = lm_ts_find(ts, key);
        snprintf(key, sizeof key, "w_b_%03zu", 2 * k);
        bq = lm_ts_find(ts, key);
        snprintf(key, sizeof key, "w_b_%03zu", 2 * k + 1);
        bv = lm_ts_find(ts, key);
        const lm_tensor_info *W = fm_base_info(c->base, fm_base_weight(c->base, blocks.mods[k]));
        lm_dtype dt = aq->dtype;
        int ok = W->n_dims == 2 && W->shape[0] % 3 == 0 && aq->n_dims == 2 && av->n_dims == 2 && bq->n_dims == 2 &&
                 bv->n_dims == 2 && fm_is_float(dt) && av->dtype == dt && bq->dtype == dt && bv->dtype == dt;
        uint64_t d = ok ? W->shape[0] / 3 : 0, r = ok ? aq->shape[0] : 0, in = ok ? W->shape[1] : 0;
        ok = ok && av->shape[0] == r && aq->shape[1] == in && av->shape[1] == in && bq->shape[0] == d &&
             bv->shape[0] == d && bq->shape[1] == r && bv->shape[1] == r;
        if (!ok) {
            rc = lm_fail(err, LM_E_MISMATCH, "ShapeMismatch", "pairs %zu and %zu do not fit the fused qkv '%s' [%llu, "
                         "%llu] (w_a [r, in], w_b [in/3... d, r] of one dtype)", 2 * k, 2 * k + 1, blocks.mods[k],
                         (unsigned long long)W->shape[0], (unsigned long long)(W->n_dims > 1 ? W->shape[1] : 0));
            break;
        }
        size_t es = lm_dtype_bits(dt) / 8;
        uint8_t *A = malloc((size_t)(2 * r * in) * es), *B = calloc((size_t)(3 * d * 2 * r), es);
        if (A == NULL || B == NULL) {
            free(A);
            free(B);
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
            break;
        }
        memcpy(A, aq->data, (size_t)(r * in) * es);
        memcpy(A + r * in * es, av->data, (size_t)(r * in) * es);
        for (uint64_t o = 0; o < d; o++) { /* q rows [0, d) use columns [0, r); v rows [2d, 3d) columns [r, 2r) */
            memcpy(B + (o * 2 * r) * es, (const uint8_t *)bq->data + o * r * es, (size_t)r * es);
            memcpy(B + ((2 * d + o) * 2 * r + r) * es, (const uint8_t *)bv->data + o * r * es, (size_t)r * es);
        }
        uint64_t sa[2] = {2 * r, in}, sb[2] = {3 * d, 2 * r};
        const lm_ts_tensor *tA = fm_made(c, dt, 2, sa, A, err), *tB = tA ? fm_made(c, dt, 2, sb, B, err) : NULL;
        if (tA == NULL)
            free(B);
        char src[64];
        snprintf(src, sizeof src, "w_a/w_b_%03zu+%03zu", 2 * k, 2 * k + 1);
        fm_module *m = tB ? fm_add(c, FM_LORA, src, NULL, blocks.mods[k], FM_NAME_RESOLVED, err) : NULL;
        if (m == NULL) {
            rc = err ? err->code : LM_E_NOMEM;
            break;
        }
        m->r = (long)(2 * r);
        m->alpha = (double)m->r;
        if ((rc = fm_part_add(m, "lora_A.weight", tA, err)) == LM_OK)
            rc = fm_part_add(m, "lora_B.weight", tB, err);
    }
    if (rc == LM_OK)
        rc = fm_note(c, "%s: %zu LoRA-SAM pairs: q (even) and v (odd) of each block's fused qkv, merged as one rank-%llu "
                     "LoRA per block with zero blocks (exact)", c->path, n_a,
                     (unsigned long long)(c->n ? c->m[c->n - 1].r : 0));
    free(blocks.mods);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* a folder of up / down files                                                                   */
/* ------------------------------------------------------------------------------------------ */
static int raw_role(const char *name)
{
    static const char *const up[] = {"up", "lora_up", "up-param", "up_param", "up_params"};
    static const char *const down[] = {"down", "lora_down", "down-param", "down_param", "down_params"};
    for (size_t i = 0; i < LM_ARRAY_LEN(up); i++) {
        size_t k = strlen(up[i]);
        if (strncmp(name, up[i], k) == 0 && name[k] == '.')
            return 1;
        k = strlen(down[i]);
        if (strncmp(name, down[i], k) == 0 && name[k] == '.')
            return 2;
    }
    return 0;
}

/* a dict key -> module path: ".weight" and a trailing role word removed */
static char *raw_module_name(const char *k)
{
    static const char *const tails[] = {".weight", ".lora_up", ".lora_down", ".up", ".down", ".lora_B", ".lora_A"};
    char *s = strdup(k);
    if (s == NULL)
        return NULL;
    for (size_t i = 0; i < LM_ARRAY_LEN(tails); i++)
        if (fm_ends_with(s, tails[i]) && strlen(s) > strlen(tails[i]))
            s[strlen(s) - strlen(tails[i])] = '\0';
    return s;
}

static int all_numeric_names(const lm_tensor_set *ts)
{
    for (size_t i = 0; i < ts->n; i++)
        if (!is_num(ts->t[i].name, strlen(ts->t[i].name)))
            return 0;
    return 1;
}

static int cmp_num_name(const void *x, const void *y)
{
    const lm_ts_tensor *a = *(const lm_ts_tensor *const *)x, *b = *(const lm_ts_tensor *const *)y;
    unsigned long long p = strtoull(a->name, NULL, 10), q = strtoull(b->name, NULL, 10);
    return p < q ? -1 : p > q;
}

/* the up and the down file of a folder; exactly one each */
static lm_code raw_files(const char *dir, char *files[2], lm_err *err)
{
    lm_code rc = LM_OK;
    DIR *d = opendir(dir);
    if (d == NULL)
        return lm_fail_errno(err, errno, "cannot list the directory");
    struct dirent *de;
    while ((de = readdir(d)) != NULL && rc == LM_OK) {
        int role = raw_role(de->d_name);
        if (role == 0)
            continue;
        if (files[role - 1] != NULL)
            rc = lm_fail(err, LM_E_USAGE, "AmbiguousAdapter", "two %s files ('%s' and '%s'): keep one", role == 1 ? "up"
                         : "down", strrchr(files[role - 1], '/') + 1, de->d_name);
        else if ((files[role - 1] = fm_join(dir, de->d_name)) == NULL)
            rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    closedir(d);
    if (rc == LM_OK && (files[0] == NULL || files[1] == NULL))
        rc = lm_fail(err, LM_E_FORMAT, "IncompleteModule", "a %s file but no %s file (up-param.bin / down-param.bin, "
                     "up.pt / down.pt, lora_up.safetensors ...)", files[0] ? "up" : "down", files[0] ? "down" : "up");
    return rc;
}

/* unnamed: lone tensors, lists, or dicts keyed 0, 1, ... (in number order) */
static lm_code raw_unnamed(fm_ctx *c, lm_tensor_set *const ts[2], const int root[2], char *const files[2], lm_err *err)
{
    lm_code rc = LM_OK;
    for (int i = 0; i < 2 && rc == LM_OK; i++)
        if (root[i] == LM_TORCH_ROOT_DICT && !all_numeric_names(ts[i]))
            rc = lm_fail(err, LM_E_FORMAT, "MixedNaming", "'%s' names its tensors but '%s' does not: both or neither",
                         files[i], files[1 - i]);
    if (rc == LM_OK && ts[0]->n != ts[1]->n)
        rc = lm_fail(err, LM_E_FORMAT, "IncompleteModule", "%zu up tensors but %zu down tensors", ts[0]->n, ts[1]->n);
    if (rc != LM_OK)
        return rc;
    size_t n = ts[0]->n;
    const lm_ts_tensor **up = malloc((n ? n : 1) * sizeof *up), **down = malloc((n ? n : 1) * sizeof *down);
    if (up == NULL || down == NULL)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    for (size_t k = 0; k < n && rc == LM_OK; k++) {
        up[k] = &ts[0]->t[k];
        down[k] = &ts[1]->t[k];
    }
    if (rc == LM_OK && root[0] == LM_TORCH_ROOT_DICT) {
        qsort(up, n, sizeof *up, cmp_num_name);
        qsort(down, n, sizeof *down, cmp_num_name);
    }
    for (size_t k = 0; k < n && rc == LM_OK; k++)
        rc = check_pair(up[k], down[k], "up/down files", err);
    if (rc == LM_OK)
        rc = fm_map_unnamed(c, up, down, n, NULL, NULL, 0, "up/down files", err);
    free(up);
    free(down);
    return rc;
}

/* the down tensor whose name matches an up tensor's module name */
static const lm_ts_tensor *raw_partner(const lm_tensor_set *downs, const char *name)
{
    for (size_t j = 0; j < downs->n; j++) {
        char *other = raw_module_name(downs->t[j].name);
        int same = other && strcmp(other, name) == 0;
        free(other);
        if (same)
            return &downs->t[j];
    }
    return NULL;
}

/* named: dicts (or safetensors) whose keys are the module paths */
static lm_code raw_named(fm_ctx *c, lm_tensor_set *const ts[2], lm_err *err)
{
    lm_code rc = LM_OK;
    for (size_t k = 0; k < ts[0]->n && rc == LM_OK; k++) {
        const lm_ts_tensor *up = &ts[0]->t[k], *down;
        char *name = raw_module_name(up->name);
        if (name == NULL)
            return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
        if ((down = raw_partner(ts[1], name)) == NULL)
            rc = lm_fail(err, LM_E_FORMAT, "IncompleteModule", "up tensor '%s' has no down tensor of the same name",
                         up->name);
        if (rc == LM_OK)
            rc = check_pair(up, down, "up/down files", err);
        fm_module *m = rc == LM_OK ? fm_add(c, FM_LORA, up->name, NULL, name, FM_NAME_PATH, err) : NULL;
        free(name);
        if (rc == LM_OK)
            rc = m ? add_pair(c, m, up, down, err) : LM_E_NOMEM;
    }
    if (rc == LM_OK && ts[1]->n != ts[0]->n)
        rc = lm_fail(err, LM_E_FORMAT, "IncompleteModule", "%zu down tensors but %zu up tensors", ts[1]->n, ts[0]->n);
    return rc;
}

lm_code fm_read_raw_dir(fm_ctx *c, const char *dir, lm_err *err)
{
    c->format = "raw up/down files";
    char *files[2] = {NULL, NULL};
    lm_tensor_set *ts[2] = {NULL, NULL};
    int root[2] = {0, 0};
    lm_code rc = raw_files(dir, files, err);
    for (int i = 0; i < 2 && rc == LM_OK; i++)
        rc = fm_load_file(c, files[i], &ts[i], &root[i], err);
    if (rc == LM_OK && (c->weights_path = strdup(files[0])) == NULL)
        rc = lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    if (rc == LM_OK) {
        int named = root[0] == LM_TORCH_ROOT_DICT && root[1] == LM_TORCH_ROOT_DICT && !all_numeric_names(ts[0]) &&
                    !all_numeric_names(ts[1]);
        rc = named ? raw_named(c, ts, err) : raw_unnamed(c, ts, root, files, err);
    }
    if (rc == LM_OK && c->opts->lora_alpha == 0 && c->opts->lora_scale == 0)
        rc = fm_note(c, "%s: up/down files record no scale: merged with scale 1 (give --lora-scale or --lora-alpha "
                     "otherwise)", dir);
    free(files[0]);
    free(files[1]);
    return rc;
}
