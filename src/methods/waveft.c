/* SPDX-License-Identifier: MIT */
/* waveft.c : WaveFT (docs/adapter-types.md): W += scaling * idwt2(S), S the sparse wavelet
 * spectrum holding waveft_spectrum at the positions torch.randperm(out * in, seed)[:n] draws
 * (torch_rng.c), placed in the centre of a zero-padded [out', in'] array (out' = out + the family's
 * reduction, made even), read as the four quadrants (cA, cH; cV, cD) of one level of PEFT's
 * waverec2d (a transposed convolution of stride 2 with the outer products of the reconstruction
 * filters, cropped by (2L - 3) / 2 on each side, then to [out, in] around the centre).  Each
 * coefficient touches an L x L block, so a tile sums only the coefficients whose block meets its
 * rows (sorted by first row), in double; memory is the n coefficients.  use_idwt false: the
 * spectrum itself, scaled. */
#include "method.h"

#include "lm_error.h"
#include "torch_rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WF_MAX_ELEMS 214748364ull /* torch's randperm switches to 64-bit draws beyond (not reproduced) */

/* PEFT's tuners/waveft/wavelet.py (from PyWavelets): the reconstruction low-pass filter of each
 * family PEFT can build, and constants.py's WAVELET_REDUCTIONS (rows = cols) */
typedef struct {
    const char *name;
    int reduction, len;
    const double *c;
} wf_family;

static const wf_family FAMILIES[] = {
    {"db1", 0, 2, (const double[]){0.7071067811865476, 0.7071067811865476}},
    {"db2", 2, 4, (const double[]){0.48296291314453416, 0.8365163037378079, 0.2241438680420134, -0.12940952255126037}},
    {"db3", 4, 6, (const double[]){0.33267055295008263, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084, -0.08544127388224149, 0.035226291882100656}},
    {"db4", 6, 8, (const double[]){0.2303778133088965, 0.7148465705529157, 0.6308807679298589, -0.027983769416859854, -0.18703481171909309, 0.030841381835560764, 0.0328830116668852, -0.010597401785069032}},
    {"db5", 8, 10, (const double[]){0.16010239797419293, 0.6038292697971896, 0.7243085284377729, 0.13842814590132074, -0.24229488706638203, -0.032244869584638375, 0.07757149384004572, -0.006241490212798274, -0.012580751999081999, 0.0033357252854737712}},
    {"db6", 10, 12, (const double[]){0.11154074335010947, 0.49462389039845306, 0.7511339080210954, 0.31525035170919763, -0.22626469396543983, -0.12976686756726194, 0.09750160558732304, 0.027522865530305727, -0.03158203931748603, 0.0005538422011614961, 0.004777257510945511, -0.0010773010853084796}},
    {"db7", 12, 14, (const double[]){0.07785205408500918, 0.3965393194819173, 0.7291320908462351, 0.4697822874051931, -0.14390600392856498, -0.22403618499387498, 0.07130921926683026, 0.08061260915108308, -0.03802993693501441, -0.01657454163066688, 0.01255099855609984, 0.0004295779729213665, -0.0018016407040474908, 0.00035371379997452024}},
    {"db8", 14, 16, (const double[]){0.05441584224310401, 0.31287159091429995, 0.6756307362972898, 0.5853546836542067, -0.015829105256349306, -0.2840155429615469, 0.0004724845739132828, 0.12874742662047847, -0.017369301001807547, -0.044088253930794755, 0.013981027917398282, 0.008746094047405777, -0.004870352993451574, -0.00039174037337694705, 0.0006754494064505693, -0.00011747678412476953}},
    {"db9", 16, 18, (const double[]){0.038077947363878345, 0.24383467461259034, 0.6048231236901112, 0.6572880780513005, 0.13319738582500756, -0.2932737832791749, -0.09684078322297646, 0.14854074933810638, 0.03072568147933338, -0.06763282906132997, 0.00025094711483145197, 0.022361662123679096, -0.004723204757751397, -0.00428150368246343, 0.0018476468830562265, 0.00023038576352319597, -0.0002519631889427101, 3.93473203162716e-05}},
    {"db10", 18, 20, (const double[]){0.026670057900555554, 0.1881768000776915, 0.5272011889317256, 0.6884590394536035, 0.2811723436605775, -0.24984642432731538, -0.19594627437737705, 0.12736934033579325, 0.09305736460357235, -0.07139414716639708, -0.029457536821875813, 0.033212674059341, 0.0036065535669561697, -0.010733175483330575, 0.001395351747052901, 0.001992405295185056, -0.0006858566949597116, -0.00011646685512928545, 9.358867032006959e-05, -1.3264202894521244e-05}},
    {"sym2", 2, 4, (const double[]){0.48296291314469025, 0.836516303737469, 0.22414386804185735, -0.12940952255092145}},
    {"sym3", 4, 6, (const double[]){0.3326705529509569, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084, -0.08544127388224149, 0.035226291882100656}},
    {"sym4", 6, 8, (const double[]){0.0322231006040427, -0.012603967262037833, -0.09921954357684722, 0.29785779560527736, 0.8037387518059161, 0.49761866763201545, -0.02963552764599851, -0.07576571478927333}},
    {"sym5", 8, 10, (const double[]){0.019538882735286728, -0.021101834024758855, -0.17532808990845047, 0.01660210576452232, 0.6339789634582119, 0.7234076904024206, 0.1993975339773936, -0.039134249302383094, 0.029519490925774643, 0.027333068345077982}},
    {"sym6", 10, 12, (const double[]){-0.007800708325034148, 0.0017677118642428036, 0.04472490177066578, -0.021060292512300564, -0.07263752278646252, 0.3379294217276218, 0.787641141030194, 0.4910559419267466, -0.048311742585633, -0.11799011114819057, 0.0034907120842174702, 0.015404109327027373}},
    {"sym7", 12, 14, (const double[]){0.010268176708511255, 0.004010244871533663, -0.10780823770381774, -0.14004724044296152, 0.2886296317515146, 0.767764317003164, 0.5361019170917628, 0.017441255086855827, -0.049552834937127255, 0.0678926935013727, 0.03051551316596357, -0.01263630340325193, -0.0010473848886829163, 0.002681814568257878}},
    {"sym8", 14, 16, (const double[]){0.0018899503327594609, -0.0003029205147213668, -0.01495225833704823, 0.003808752013890615, 0.049137179673607506, -0.027219029917056003, -0.05194583810770904, 0.3644418948353314, 0.7771857517005235, 0.4813596512583722, -0.061273359067658524, -0.1432942383508097, 0.007607487324917605, 0.03169508781149298, -0.0005421323317911481, -0.0033824159510061256}},
    {"sym9", 16, 18, (const double[]){0.0010694900329086053, -0.0004731544986800831, -0.010264064027633142, 0.008859267493400484, 0.06207778930288603, -0.018233770779395985, -0.19155083129728512, 0.035272488035271894, 0.6173384491409358, 0.717897082764412, 0.238760914607303, -0.05456895843083407, 0.0005834627461258068, 0.03022487885827568, -0.01152821020767923, -0.013271967781817119, 0.0006197808889855868, 0.0014009155259146807}},
    {"sym10", 18, 20, (const double[]){-0.0004593294210046588, 5.7036083618494284e-05, 0.004593173585311828, -0.0008043589320165449, -0.02035493981231129, 0.005764912033581909, 0.04999497207737669, -0.0319900568824278, -0.03553674047381755, 0.38382676106708546, 0.7695100370211071, 0.47169066693843925, -0.07088053578324385, -0.15949427888491757, 0.011609893903711381, 0.0459272392310922, -0.0014653825813050513, -0.008641299277022422, 9.563267072289475e-05, 0.0007701598091144901}},
    {"coif1", 4, 6, (const double[]){-0.05142972847076845, 0.23892972847076846, 0.6028594569415369, 0.2721405430584631, -0.05142972847076845, -0.011070271529231544}},
    {"coif2", 10, 12, (const double[]){0.011587596738716868, -0.029320137983468563, -0.04763959031100813, 0.2730210465347666, 0.5746823938568638, 0.2948671936956192, -0.05408560709171143, -0.042026480460771606, 0.016744410163279506, 0.003967883612962012, -0.0012892033561406595, -0.0005095053991076441}},
    {"coif3", 16, 18, (const double[]){-0.0026824186709220686, 0.005503126707831385, 0.016583560479170346, -0.046507764478726975, -0.043220763560211914, 0.28650333527364746, 0.56128525687033, 0.30298357177282415, -0.050770140754888865, -0.05819625076158553, 0.024434094321166958, 0.011229240962037866, -0.006369601011048823, -0.0018204589155662422, 0.0007902051009575939, 0.000329665173793183, -5.019277455327665e-05, -2.4465734255308132e-05}},
    {"coif4", 22, 24, (const double[]){0.0006309612114309468, -0.0011522251437699736, -0.005194525163470323, 0.01136093089978195, 0.01894506104561664, -0.05171984370581528, -0.03448614047094481, 0.30227251053656845, 0.5545479062408811, 0.30791766802517506, -0.0435250092812657, -0.064887950971431, 0.01988077364815952, 0.017638947871261697, -0.007366054847173364, -0.002312432307658842, 0.0014260063442333715, 0.00046669846355373536, -0.0001270007842387334, -0.0001130536369789105, 3.048364879677801e-05, 1.2667448089330081e-05, -1.5849265807568937e-06, -1.1239480882815428e-06}},
    {"coif5", 28, 48, (const double[]){-0.0001444992186438191, 0.00025416494920119467, 0.0015016192805175522, -0.0029411108712655517, -0.007177767151487719, 0.016680426640070654, 0.019433238433489604, -0.0649349465672125, -0.03624979308913257, 0.2980426621780944, 0.5574916297092007, 0.3073164452920678, -0.04708803471976115, -0.06889052250805007, 0.020697343297747767, 0.021640668655956857, -0.008108937307895367, -0.004988173767104185, 0.002448691432102127, 0.0014095103899593442, -0.0005637801876093826, -0.0002859004477225751, 0.00012739637513815207, 5.416263410701044e-05, -1.7368679443462806e-05, -1.3926561900600109e-05, 3.582065515946049e-06, 1.9140228958473188e-06, -3.12624883770169e-07, -3.4030635502511645e-07, 5.981606523851694e-08, 4.700142784945649e-08, -6.1586157096783646e-09, -9.225635096344936e-09, 1.0284860745188212e-09, 1.1687341751862637e-09, -9.468626176069127e-11, -1.6230233142152042e-10, 1.507665685934695e-11, 1.5770990416421914e-11, -1.084900468648598e-12, -1.9686597794118046e-12, 9.874563463972664e-14, 1.967347814605081e-13, -8.02108014529989e-15, -2.1030408801651653e-14, 7.238886978309157e-16, 1.9432085150727615e-15}},
};

typedef struct {
    double scaling;        /* (25) */
    long seed;             /* random_loc_seed (777) */
    int use_idwt;          /* (true) */
    const wf_family *fam;  /* wavelet_family ("db1") */
} waveft_cfg;

typedef struct {
    const lm_ts_tensor *spectrum;
    uint64_t out, in, seed;
    int transposed; /* W stored [in, out]: tile rows run along `in` */
    int use_idwt;
    const wf_family *fam;
} waveft_params;

/* one coefficient: it adds v * fa[a] * fb[b] at stored (a0 + a, b0 + b) */
typedef struct {
    int64_t a0, b0;
    double v;
    uint32_t t;      /* its draw (ties in a0 keep the spectrum's order) */
    uint8_t ha, hb;  /* high-pass filter along the rows / columns */
} wf_coef;

typedef struct {
    wf_coef *c;
    uint64_t n;
    int len;
    double lo[64], hi[64]; /* rec_lo, rec_hi (len <= 48) */
} waveft_prep;

static lm_code waveft_parse(const cJSON *root, lm_adapter_config *c, lm_err *err)
{
    waveft_cfg *f = calloc(1, sizeof *f);
    if (f == NULL)
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    c->mcfg = f;
    f->scaling = 25.0;
    f->seed = 777;
    f->use_idwt = 1;
    f->fam = &FAMILIES[0];
    if (lm_cfg_num(root, "scaling", &f->scaling, err) || lm_cfg_int(root, "random_loc_seed", &f->seed, err) ||
        lm_cfg_bool(root, "use_idwt", &f->use_idwt, err))
        return err->code;
    const cJSON *fam = lm_cfg_field(root, "wavelet_family");
    if (fam != NULL && !cJSON_IsNull(fam)) {
        if (!cJSON_IsString(fam))
            return lm_fail(err, LM_E_FORMAT, "InvalidFieldType", "peft_type WAVEFT: wavelet_family is not a string");
        f->fam = NULL;
        for (size_t i = 0; i < sizeof FAMILIES / sizeof *FAMILIES; i++)
            if (strcmp(FAMILIES[i].name, fam->valuestring) == 0)
                f->fam = &FAMILIES[i];
        if (f->fam == NULL && f->use_idwt)
            return lm_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", "peft_type WAVEFT: wavelet_family '%.64s' is "
                           "not one PEFT 0.21 can build (db1-db10, sym2-sym10, coif1-coif5)", fam->valuestring);
        if (f->fam == NULL)
            f->fam = &FAMILIES[0];
    }
    if (f->seed < 0)
        return lm_fail(err, LM_E_FORMAT, "InvalidConfig", "peft_type WAVEFT: random_loc_seed %ld is negative", f->seed);
    return LM_OK;
}

/* rows of one level of waverec2d for n output rows: padded to p (even), H2 = p / 2 coefficient
 * rows, (H2 - 1) * 2 + L - 2 * ((2L - 3) / 2) rows after the crop */
static uint64_t wf_padded(uint64_t n, const wf_family *f)
{
    uint64_t p = n + (uint64_t)f->reduction;
    return p + (p & 1);
}

static int64_t wf_pad(int len) { return (2 * (int64_t)len - 3) / 2; }

static int64_t wf_rows(uint64_t n, const wf_family *f)
{
    return ((int64_t)wf_padded(n, f) / 2 - 1) * 2 + f->len - 2 * wf_pad(f->len);
}

static lm_code waveft_plan_module(lm_plan_ctx *ctx, const lm_module *m, lm_err *err)
{
    const waveft_cfg *fc = lm_ctx_adapter(ctx)->cfg->mcfg;
    const lm_ts_tensor *sp = m->part[0];
    long wi = lm_ctx_module_weight(ctx, m->path, err);
    if (wi < 0)
        return err->code;
    const lm_tensor_info *W = lm_ctx_base(ctx, wi);
    int conv1d_names = lm_is_gpt2_conv1d(m->path);
    if (W->n_dims != 2 || sp->n_dims != 1 || !lm_is_float_dtype(sp->dtype))
        return lm_mismatch(err, m->path, "WaveFT needs a 1-D waveft_spectrum and a 2-D base weight");
    uint64_t out = conv1d_names ? W->shape[1] : W->shape[0], in = conv1d_names ? W->shape[0] : W->shape[1];
    if (sp->n_elems == 0 || sp->n_elems > out * in)
        return lm_mismatch(err, m->path, "waveft_spectrum has %llu entries for a %llu x %llu weight",
                           (unsigned long long)sp->n_elems, (unsigned long long)out, (unsigned long long)in);
    if (out * in >= WF_MAX_ELEMS)
        return lm_fail(err, LM_E_UNSUPPORTED, "Unsupported", "WaveFT on a %llu-element weight: torch's randperm "
                       "switches to another draw there, not reproduced by lora-merge yet", (unsigned long long)(out * in));
    if (fc->use_idwt && (wf_rows(out, fc->fam) < (int64_t)out || wf_rows(in, fc->fam) < (int64_t)in))
        return lm_module_fail(err, LM_E_UNSUPPORTED, "UnsupportedVariant", m->path, "WaveFT wavelet_family %s "
                              "reconstructs fewer rows than the weight has (PEFT cannot merge it either)", fc->fam->name);
    int orient = 0;
    long bi = lm_ctx_weight_for(ctx, m->path, out, in, &orient, err);
    if (bi < 0)
        return err->code;
    lm_op *op = lm_ctx_add_op(ctx, bi, LM_OP_METHOD, "waveft", m->path, err);
    waveft_params *pr = op ? lm_ctx_params(ctx, op, sizeof *pr, err) : NULL;
    if (pr == NULL)
        return LM_E_NOMEM;
    *pr = (waveft_params){sp, out, in, (uint64_t)fc->seed, orient == 1, fc->use_idwt, fc->fam};
    op->in = in;
    op->out = out;
    op->scale = lm_ctx_adapter(ctx)->weight * fc->scaling;
    double L = fc->use_idwt ? fc->fam->len : 1;
    op->flops = 2.0 * (double)sp->n_elems * L * L + (double)out * (double)in;
    lm_ctx_count_module(ctx);
    return LM_OK;
}

static int wf_cmp(const void *x, const void *y)
{
    const wf_coef *a = x, *b = y;
    if (a->a0 != b->a0)
        return a->a0 < b->a0 ? -1 : 1;
    return a->t < b->t ? -1 : a->t > b->t;
}

/* logical position (r, c) of draw t -> where its block starts along the output rows (y) and
 * columns (x) and which filters it uses there */
static void wf_place(const waveft_params *pr, uint64_t r, uint64_t c, int64_t *y0, int64_t *x0, int *hy, int *hx)
{
    if (!pr->use_idwt) {
        *y0 = (int64_t)r, *x0 = (int64_t)c, *hy = *hx = 0;
        return;
    }
    const wf_family *f = pr->fam;
    uint64_t po = wf_padded(pr->out, f), pi = wf_padded(pr->in, f), h2 = po / 2, w2 = pi / 2;
    uint64_t R = r + (po - pr->out) / 2, C = c + (pi - pr->in) / 2;
    int64_t pad = wf_pad(f->len);
    int64_t sr = (wf_rows(pr->out, f) - (int64_t)pr->out) / 2, sc = (wf_rows(pr->in, f) - (int64_t)pr->in) / 2;
    /* channels (cA, cH, cV, cD) meet filters (ll, lh, hl, hh) = outer(rows, cols) of (lo lo, hi lo,
     * lo hi, hi hi): the right half (cH, cD) is high-pass along the rows, the bottom half along
     * the columns */
    *hy = C >= w2;
    *hx = R >= h2;
    *y0 = 2 * (int64_t)(R % h2) - pad - sr;
    *x0 = 2 * (int64_t)(C % w2) - pad - sc;
}

static lm_code waveft_prepare(const lm_op *op, const lm_kernels *k, lm_prepared *p, lm_err *err)
{
    const waveft_params *pr = op->params;
    uint64_t n = pr->spectrum->n_elems;
    waveft_prep *wp = lm_prep_alloc(p, sizeof *wp, err);
    const float *s = wp ? lm_prep_view(p, pr->spectrum, k, err) : NULL;
    wf_coef *c = s ? lm_prep_alloc(p, (size_t)n * sizeof *c, err) : NULL;
    if (c == NULL)
        return LM_E_NOMEM;
    uint64_t *perm = malloc((size_t)n * sizeof *perm);
    if (perm == NULL || lm_randperm_prefix(pr->out * pr->in, pr->seed, n, perm) != 0) {
        free(perm);
        return lm_fail(err, LM_E_NOMEM, NULL, "out of memory");
    }
    for (uint64_t t = 0; t < n; t++) {
        int64_t y0, x0;
        int hy, hx;
        wf_place(pr, perm[t] / pr->in, perm[t] % pr->in, &y0, &x0, &hy, &hx);
        c[t] = pr->transposed ? (wf_coef){x0, y0, s[t], (uint32_t)t, (uint8_t)hx, (uint8_t)hy}
                              : (wf_coef){y0, x0, s[t], (uint32_t)t, (uint8_t)hy, (uint8_t)hx};
    }
    free(perm);
    qsort(c, (size_t)n, sizeof *c, wf_cmp);
    wp->c = c;
    wp->n = n;
    if (!pr->use_idwt) {
        wp->len = 1;
        wp->lo[0] = 1.0;
    } else { /* wavelet.py: rec_lo = the coefficients (coiflets times sqrt(2)), rec_hi[i] = (-1)^i rec_lo[L-1-i] */
        const wf_family *f = pr->fam;
        double sc = strncmp(f->name, "coif", 4) == 0 ? sqrt(2.0) : 1.0;
        wp->len = f->len;
        for (int i = 0; i < f->len; i++) {
            wp->lo[i] = f->c[i] * sc;
            wp->hi[i] = (i % 2 ? -1.0 : 1.0) * (f->c[f->len - 1 - i] * sc);
        }
    }
    p->data = wp;
    return LM_OK;
}

/* d [nr, cols] <- the unscaled delta of rows r0 .. r0+nr, in f64 */
static void waveft_delta(const waveft_prep *wp, uint64_t tr0, uint64_t nr, uint64_t tcols, double *d)
{
    memset(d, 0, (size_t)(nr * tcols) * sizeof *d);
    int64_t r0 = (int64_t)tr0, r1 = r0 + (int64_t)nr, L = wp->len, cols = (int64_t)tcols;
    uint64_t lo = 0, hi = wp->n; /* first coefficient whose block reaches row r0 */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (wp->c[mid].a0 + L <= r0)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (uint64_t q = lo; q < wp->n && wp->c[q].a0 < r1; q++) {
        const wf_coef *c = &wp->c[q];
        const double *fa = c->ha ? wp->hi : wp->lo, *fb = c->hb ? wp->hi : wp->lo;
        for (int64_t a = 0; a < L; a++) {
            int64_t row = c->a0 + a;
            if (row < r0 || row >= r1)
                continue;
            double *dr = d + (row - r0) * cols;
            for (int64_t b = 0; b < L; b++) {
                int64_t col = c->b0 + b;
                if (col >= 0 && col < cols)
                    dr[col] += c->v * (fa[a] * fb[b]);
            }
        }
    }
}

static void waveft_apply(const lm_op *op, const lm_prepared *p, const lm_tile *t)
{
    double *d = (double *)t->scratch; /* the tile's delta, nr x cols */
    waveft_delta(p->data, t->r0, t->nr, t->cols, d);
    for (uint64_t i = 0; i < t->nr * t->cols; i++)
        t->acc[i] += (float)(d[i] * op->scale);
}

/* the exact path: the same f64 delta added in f64, rounded once by the engine */
static void waveft_apply64(const lm_op *op, const lm_prepared *p, const lm_tile64 *t)
{
    double *d = t->scratch;
    waveft_delta(p->data, t->r0, t->nr, t->cols, d);
    for (uint64_t i = 0; i < t->nr * t->cols; i++)
        t->acc[i] += d[i] * op->scale;
}

static void waveft_describe(const lm_adapter_config *cfg, const lm_module *m, char *buf, size_t cap)
{
    const waveft_cfg *fc = cfg->mcfg;
    snprintf(buf, cap, "waveft (%llu coefficients, %s%s, scaling %g, seed %ld)",
             (unsigned long long)m->part[0]->n_elems, fc->use_idwt ? "inverse wavelet " : "no transform",
             fc->use_idwt ? fc->fam->name : "", fc->scaling, fc->seed);
}

static const lm_part waveft_parts[] = {{"waveft_spectrum", 0, -1, 1}};

const lm_method lm_method_waveft = {
    .peft_type = "WAVEFT",
    .summary = "sparse wavelet spectrum, inverse 2-D DWT",
    .parts = waveft_parts,
    .n_parts = 1,
    .parse_config = waveft_parse,
    .plan_module = waveft_plan_module,
    .prepare = waveft_prepare,
    .apply_tile = waveft_apply,
    .apply_tile64 = waveft_apply64,
    .describe = waveft_describe,
};
