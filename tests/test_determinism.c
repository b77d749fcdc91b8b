/* SPDX-License-Identifier: MIT */
/* test_determinism.c : the same merge gives the same bytes whatever the thread count (1, 2, 3,
 * 7) and whatever the kernel variant (--kernels ref vs the default SIMD one), on a generated
 * Llama-shaped model large enough for several row tiles per adapted tensor (a tile is 256 Ki f32
 * elements: mlp.up_proj [1376, 512] is 3 tiles, the whole model ~100 tiles), in BF16, F16 and
 * F32.  The model comes from bench/gen_model, found beside $LM_BIN (skipped visibly if absent). */
#include "th.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* generates a model under tmp/m with the given gen_model dtype options */
static void det_generate(const char *tmp, const char *dtype, const char *adapter_dtype, char *base, char *adir,
                         size_t cap)
{
    char gen[4096];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s (build it: make BUILD=... <build>/bench/gen_model)", gen);
    char out[1200];
    snprintf(out, sizeof out, "%s/m", tmp);
    const char *argv[] = {gen, "--out", out, "--hidden", "512", "--inter", "1376", "--layers", "2", "--vocab", "2048",
                          "--rank", "16", "--dtype", dtype, "--adapter-dtype", adapter_dtype, NULL};
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "gen_model failed (%d): %s", r.status, r.err);
    th_run_free(&r);
    snprintf(base, cap, "%s/base/model.safetensors", out);
    snprintf(adir, cap, "%s/adapter", out);
}

static void det_merge(const char *base, const char *adir, const char *out, const char *threads, const char *kernels,
                      const char *extra1, const char *extra2)
{
    const char *argv[16];
    int n = 0;
    argv[n++] = th_bin();
    argv[n++] = "-q";
    argv[n++] = "--threads";
    argv[n++] = threads;
    if (kernels != NULL) {
        argv[n++] = "--kernels";
        argv[n++] = kernels;
    }
    if (extra1 != NULL)
        argv[n++] = extra1;
    if (extra2 != NULL)
        argv[n++] = extra2;
    argv[n++] = base;
    argv[n++] = adir;
    argv[n++] = out;
    argv[n] = NULL;
    th_run_result r = th_run(NULL, argv);
    cr_assert_eq(r.status, 0, "merge (threads %s, kernels %s) failed (%d): %s", threads, kernels ? kernels : "default",
                 r.status, r.err);
    th_run_free(&r);
}

/* merges with 1, 2, 3 and 7 threads, and with --kernels ref: all byte-identical; and the merge
 * did change the adapted tensors (not a copy of the base) */
static void det_check(const char *dtype, const char *adapter_dtype, const char *extra1, const char *extra2)
{
    char *tmp = th_tmpdir();
    cr_assert_not_null(tmp);
    char base[1300], adir[1300];
    det_generate(tmp, dtype, adapter_dtype, base, adir, sizeof base);
    static const char *const threads[] = {"1", "2", "3", "7"};
    char first[1400];
    snprintf(first, sizeof first, "%s/out-t1.safetensors", tmp);
    det_merge(base, adir, first, "1", NULL, extra1, extra2);
    cr_assert(!th_files_equal(first, base), "the merge changed nothing");
    th_st st;
    cr_assert_eq(th_st_read(first, &st), 0, "output unreadable by the independent reader");
    th_st_free(&st);
    for (size_t i = 1; i < sizeof threads / sizeof *threads; i++) {
        char out[1400];
        snprintf(out, sizeof out, "%s/out-t%s.safetensors", tmp, threads[i]);
        det_merge(base, adir, out, threads[i], NULL, extra1, extra2);
        cr_assert(th_files_equal(first, out), "%s: --threads %s differs from --threads 1", dtype, threads[i]);
        unlink(out);
    }
    /* the reference kernels, single and multi-threaded */
    char ref[1400];
    snprintf(ref, sizeof ref, "%s/out-ref.safetensors", tmp);
    det_merge(base, adir, ref, "1", "ref", extra1, extra2);
    cr_assert(th_files_equal(first, ref), "%s: --kernels ref differs from the default kernels", dtype);
    det_merge(base, adir, ref, "3", "ref", extra1, extra2);
    cr_assert(th_files_equal(first, ref), "%s: --kernels ref --threads 3 differs", dtype);
    /* every SIMD variant this CPU can run, forced; the default one (--version) is the --threads 2
     * run above already */
    static const char *const variants[] = {"avx2", "avx512"};
    const char *vargv[] = {th_bin(), "--version", NULL};
    th_run_result vr = th_run(NULL, vargv);
    const char *kw = strstr(vr.out, "(kernels ");
    char dflt[32] = "";
    cr_assert(vr.status == 0 && kw != NULL && sscanf(kw, "(kernels %31[a-z0-9]", dflt) == 1,
              "--version names no kernel variant: %s", vr.out);
    th_run_free(&vr);
    for (size_t v = 0; v < 2; v++) {
        if (strcmp(variants[v], dflt) == 0)
            continue;
        const char *argv[] = {th_bin(), "-q", "--threads", "2", "--kernels", variants[v], extra1 ? extra1 : "-q",
                              extra2 ? extra2 : "-q", base, adir, ref, NULL};
        th_run_result r = th_run(NULL, argv);
        if (r.status == 2 && strstr(r.err, "cannot run on this CPU") != NULL) {
            cr_log_info("--kernels %s: not on this CPU, not compared", variants[v]);
        } else {
            cr_assert_eq(r.status, 0, "--kernels %s: exit %d: %s", variants[v], r.status, r.err);
            cr_assert(th_files_equal(first, ref), "%s: --kernels %s differs from the default", dtype, variants[v]);
        }
        th_run_free(&r);
    }
    th_rmrf(tmp);
    free(tmp);
}

Test(determinism, bf16, .timeout = 120) { det_check("bf16", "f32", NULL, NULL); }
Test(determinism, f16, .timeout = 120) { det_check("f16", "f32", NULL, NULL); }
Test(determinism, f32, .timeout = 120) { det_check("f32", "bf16", NULL, NULL); }
/* a conversion of every tensor on the way (bf16 -> f16) and a negative scale */
Test(determinism, bf16_to_f16_negative_scale, .timeout = 120) { det_check("bf16", "f16", "--dtype=f16", "--scale=-0.75"); }

/* the streaming result equals the straightforward one: each tensor in a single tile (the whole
 * matrix at once, as a non-streaming merge does it), one row per tile, and an odd tile size all
 * give the bytes of the default tiling */
Test(determinism, tile_size_does_not_change_the_output, .timeout = 120)
{
    char *tmp = th_tmpdir();
    char base[1300], adir[1300], ref[1300], out[1300];
    det_generate(tmp, "bf16", "f32", base, adir, sizeof base);
    snprintf(ref, sizeof ref, "%s/default.safetensors", tmp);
    snprintf(out, sizeof out, "%s/tiled.safetensors", tmp);
    det_merge(base, adir, ref, "2", NULL, NULL, NULL);
    static const char *const sizes[] = {"17179869184", "1", "77777"};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        det_merge(base, adir, out, "2", NULL, "--tile-elems", sizes[i]);
        cr_assert(th_files_equal(ref, out), "--tile-elems %s changes the output", sizes[i]);
    }
    th_rmrf(tmp);
    free(tmp);
}

/* Issue 15, item 8: --tile-elems 4096 changed a few bytes of DoRA, LoHa and HRA merges (their
 * tile products went to BLAS, whose kernels depend on the number of rows).  Every tile size
 * and thread count must give the default's bytes. */
Test(determinism, tile_size_and_threads_for_blas_methods, .timeout = 120)
{
    char gen[4096];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    size_t n = strlen(gen);
    cr_assert(n > 9 && n + 4 < sizeof gen);
    memcpy(gen + n - 9, "gen_adapter", 12); /* beside gen_model */
    char *tmp = th_tmpdir();
    char base[1300], adir[1300], ref[1300], out[1300], ad[1300];
    det_generate(tmp, "bf16", "f32", base, adir, sizeof base);
    snprintf(ref, sizeof ref, "%s/default.safetensors", tmp);
    snprintf(out, sizeof out, "%s/tiled.safetensors", tmp);
    static const char *const types[] = {"dora", "loha", "hra", "hira"};
    static const char *const sizes[] = {"4096", "1", "77777", "1000000"};
    static const char *const threads[] = {"1", "3", "2", "2"};
    for (size_t k = 0; k < sizeof types / sizeof *types; k++) {
        snprintf(ad, sizeof ad, "%s/ad-%s", tmp, types[k]);
        const char *argv[] = {gen, "--base", base, "--out", ad, "--type", types[k], NULL};
        th_run_result r = th_run(NULL, argv);
        cr_assert_eq(r.status, 0, "gen_adapter %s: %s", types[k], r.err);
        th_run_free(&r);
        det_merge(base, ad, ref, "2", NULL, NULL, NULL);
        cr_assert(!th_files_equal(ref, base), "%s: the merge changed nothing", types[k]);
        for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
            det_merge(base, ad, out, threads[i], NULL, "--tile-elems", sizes[i]);
            cr_assert(th_files_equal(ref, out), "%s: --tile-elems %s --threads %s changes the output", types[k],
                      sizes[i], threads[i]);
        }
    }
    (void)adir;
    th_rmrf(tmp);
    free(tmp);
}
