/* SPDX-License-Identifier: MIT */
/* cpu.c : CPU feature probe and kernel selection.  Fills an lm_kernels table the caller owns
 * (no global state); the only outside inputs are cpuid (through the compiler's builtins, which
 * also check that the OS saves the vector registers) and the LM_KERNELS environment variable. */
#include "lm_kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define LM_X86 1
#else
#define LM_X86 0
#endif

/* F16C from cpuid directly: clang's __builtin_cpu_supports() does not know "f16c".  AVX2 being
 * reported usable already implies the OS saves YMM state, which F16C needs too. */
#if LM_X86
static int cpu_has_f16c(void)
{
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx))
        return 0;
    return (ecx & bit_F16C) != 0;
}
#endif

int lm_cpu_has_avx2_f16c(void)
{
#if LM_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
#else
    return 0;
#endif
}

int lm_cpu_has_avx512(void)
{
#if LM_X86
    __builtin_cpu_init();
    return lm_cpu_has_avx2_f16c() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

static void copy_trimmed(char *buf, size_t cap, const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strcspn(s, "\r\n");
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    if (n >= cap)
        n = cap - 1;
    memcpy(buf, s, n);
    buf[n] = '\0';
}

const char *lm_cpu_name(char *buf, size_t cap)
{
    if (cap == 0)
        return buf;
    buf[0] = '\0';
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[512];
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "model name", 10) == 0) {
                const char *colon = strchr(line, ':');
                if (colon)
                    copy_trimmed(buf, cap, colon + 1);
                break;
            }
        }
        fclose(f);
    }
#if LM_X86
    if (buf[0] == '\0' && (unsigned)__get_cpuid_max(0x80000000u, NULL) >= 0x80000004u) {
        unsigned regs[12];
        for (unsigned leaf = 0; leaf < 3; leaf++)
            __get_cpuid(0x80000002u + leaf, &regs[4 * leaf], &regs[4 * leaf + 1],
                        &regs[4 * leaf + 2], &regs[4 * leaf + 3]);
        char brand[49];
        memcpy(brand, regs, 48);
        brand[48] = '\0';
        copy_trimmed(buf, cap, brand);
    }
#endif
    if (buf[0] == '\0')
        copy_trimmed(buf, cap, "unknown");
    return buf;
}

static void set_ref(lm_kernels *k)
{
    k->bf16_to_f32 = lm_bf16_to_f32_ref;
    k->f32_to_bf16 = lm_f32_to_bf16_ref;
    k->f16_to_f32 = lm_f16_to_f32_ref;
    k->f32_to_f16 = lm_f32_to_f16_ref;
    k->axpy = lm_axpy_ref;
    k->f64_to_f32 = lm_f64_to_f32_ref;
    k->f32_to_f64 = lm_f32_to_f64_ref;
    k->sumsq = lm_sumsq_ref;
    k->count_nonfinite_f32 = lm_count_nonfinite_f32_ref;
    k->count_nonfinite_16 = lm_count_nonfinite_16_ref;
    k->lowrank = lm_lowrank_ref;
    k->rot_blocks = lm_rot_blocks_ref;
    k->rot_blocks_to = lm_rot_blocks_to_ref;
    k->gemm_rows = lm_gemm_rows_ref;
    k->count_diff_16 = lm_count_diff_16_ref;
    k->count_diff_32 = lm_count_diff_32_ref;
    k->f64_round = lm_f64_round_ref;
    k->wy64 = lm_wy64_ref;
    k->lr64 = lm_lr64_ref;
    k->fp8_merge = lm_fp8_merge_ref;
    k->fp8_encode = lm_fp8_encode_ref;
    k->rot_cert = lm_rot_cert_ref;
    k->dora_cert = lm_dora_cert_ref;
    k->loha_cert = lm_loha_cert_ref;
    k->name = "ref";
}

#if LM_X86
static void set_avx2(lm_kernels *k)
{
    k->bf16_to_f32 = lm_bf16_to_f32_avx2;
    k->f32_to_bf16 = lm_f32_to_bf16_avx2;
    k->f16_to_f32 = lm_f16_to_f32_avx2;
    k->f32_to_f16 = lm_f32_to_f16_avx2;
    k->axpy = lm_axpy_avx2;
    k->f64_to_f32 = lm_f64_to_f32_avx2;
    k->f32_to_f64 = lm_f32_to_f64_avx2;
    k->sumsq = lm_sumsq_avx2;
    k->count_nonfinite_f32 = lm_count_nonfinite_f32_avx2;
    k->count_nonfinite_16 = lm_count_nonfinite_16_avx2;
    k->lowrank = lm_lowrank_avx2;
    k->rot_blocks = lm_rot_blocks_avx2;
    k->rot_blocks_to = lm_rot_blocks_to_avx2;
    k->gemm_rows = lm_gemm_rows_avx2;
    k->count_diff_16 = lm_count_diff_16_avx2;
    k->count_diff_32 = lm_count_diff_32_avx2;
    k->f64_round = lm_f64_round_avx2;
    k->wy64 = lm_wy64_avx2;
    k->lr64 = lm_lr64_avx2;
    k->fp8_merge = lm_fp8_merge_avx2;
    k->fp8_encode = lm_fp8_encode_avx2;
    k->rot_cert = lm_rot_cert_avx2;
    k->dora_cert = lm_dora_cert_avx2;
    k->loha_cert = lm_loha_cert_avx2;
    k->name = "avx2";
}

static void set_avx512(lm_kernels *k)
{
    k->bf16_to_f32 = lm_bf16_to_f32_avx512;
    k->f32_to_bf16 = lm_f32_to_bf16_avx512;
    k->f16_to_f32 = lm_f16_to_f32_avx512;
    k->f32_to_f16 = lm_f32_to_f16_avx512;
    k->axpy = lm_axpy_avx512;
    k->f64_to_f32 = lm_f64_to_f32_avx512;
    k->f32_to_f64 = lm_f32_to_f64_avx512;
    k->sumsq = lm_sumsq_avx512;
    k->count_nonfinite_f32 = lm_count_nonfinite_f32_avx512;
    k->count_nonfinite_16 = lm_count_nonfinite_16_avx512;
    k->lowrank = lm_lowrank_avx512;
    k->rot_blocks = lm_rot_blocks_avx512;
    k->rot_blocks_to = lm_rot_blocks_to_avx512;
    k->gemm_rows = lm_gemm_rows_avx512;
    k->count_diff_16 = lm_count_diff_16_avx512;
    k->count_diff_32 = lm_count_diff_32_avx512;
    k->f64_round = lm_f64_round_avx512;
    k->wy64 = lm_wy64_avx512;
    k->lr64 = lm_lr64_avx512;
    k->fp8_merge = lm_fp8_merge_avx512;
    k->fp8_encode = lm_fp8_encode_avx512;
    k->rot_cert = lm_rot_cert_avx512;
    k->dora_cert = lm_dora_cert_avx512;
    k->loha_cert = lm_loha_cert_avx512;
    k->name = "avx512";
}
#endif

int lm_kernels_select(lm_kernels *k, const char *force)
{
    set_ref(k);
    if (force == NULL || strcmp(force, "auto") == 0) {
        const char *env = getenv("LM_KERNELS");
        force = (env && env[0] && strcmp(env, "auto") != 0) ? env : NULL;
    }
    if (force == NULL) {
#if LM_X86
        if (lm_cpu_has_avx512())
            set_avx512(k);
        else if (lm_cpu_has_avx2_f16c())
            set_avx2(k);
#endif
        return 0;
    }
    if (strcmp(force, "ref") == 0)
        return 0;
#if LM_X86
    if (strcmp(force, "avx2") == 0 && lm_cpu_has_avx2_f16c()) {
        set_avx2(k);
        return 0;
    }
    if (strcmp(force, "avx512") == 0 && lm_cpu_has_avx512()) {
        set_avx512(k);
        return 0;
    }
#endif
    return -1;
}
