/* SPDX-License-Identifier: MIT */
/* registry.c : the one list of adapter types.  Adding a type: its file in src/methods/, one line
 * here, one README row, one row in tests/test_methods.c. */
#include "method.h"

#include <string.h>

extern const lm_method lm_method_lora;
extern const lm_method lm_method_adalora;
extern const lm_method lm_method_ia3;
extern const lm_method lm_method_loha;
extern const lm_method lm_method_lokr;
extern const lm_method lm_method_trainable_tokens;
extern const lm_method lm_method_beft;
extern const lm_method lm_method_ln_tuning;
extern const lm_method lm_method_hira;
extern const lm_method lm_method_vera;
extern const lm_method lm_method_shira;
extern const lm_method lm_method_hra;
extern const lm_method lm_method_miss;
extern const lm_method lm_method_delora;
extern const lm_method lm_method_gralora;
extern const lm_method lm_method_vblora;
extern const lm_method lm_method_randlora;
extern const lm_method lm_method_oft;
extern const lm_method lm_method_fourierft;
extern const lm_method lm_method_waveft;
extern const lm_method lm_method_glora;
extern const lm_method lm_method_deft;
extern const lm_method lm_method_road;
extern const lm_method lm_method_c3a;
extern const lm_method lm_method_boft;
extern const lm_method lm_method_lycoris_norm;
extern const lm_method lm_method_pvera;
extern const lm_method lm_method_supertuning;
extern const lm_method lm_method_peanut;
extern const lm_method lm_method_tinylora;
extern const lm_method lm_method_psoft;
extern const lm_method lm_method_osf;
extern const lm_method lm_method_frod;
extern const lm_method lm_method_unilora;
extern const lm_method lm_method_adamss;

/* one type a line (helpers add types in parallel) */
static const lm_method *const METHODS[] = {
    &lm_method_lora,
    &lm_method_adalora,
    &lm_method_ia3,
    &lm_method_loha,
    &lm_method_lokr,
    &lm_method_trainable_tokens,
    &lm_method_beft,
    &lm_method_ln_tuning,
    &lm_method_hira,
    &lm_method_vera,
    &lm_method_shira,
    &lm_method_hra,
    &lm_method_miss,
    &lm_method_delora,
    &lm_method_gralora,
    &lm_method_vblora,
    &lm_method_randlora,
    &lm_method_oft,
    &lm_method_fourierft,
    &lm_method_waveft,
    &lm_method_glora,
    &lm_method_deft,
    &lm_method_road,
    &lm_method_c3a,
    &lm_method_boft,
    &lm_method_lycoris_norm,
    &lm_method_pvera,
    &lm_method_supertuning,
    &lm_method_peanut,
    &lm_method_tinylora,
    &lm_method_psoft,
    &lm_method_osf,
    &lm_method_frod,
    &lm_method_unilora,
    &lm_method_adamss,
};

const lm_method *lm_method_find(const char *peft_type)
{
    for (size_t i = 0; i < sizeof METHODS / sizeof *METHODS; i++)
        if (strcmp(METHODS[i]->peft_type, peft_type) == 0)
            return METHODS[i];
    return NULL;
}

size_t lm_method_count(void) { return sizeof METHODS / sizeof *METHODS; }

const lm_method *lm_method_at(size_t i) { return i < lm_method_count() ? METHODS[i] : NULL; }

const lm_part *lm_method_part(const lm_method *m, const char *name, size_t name_len)
{
    for (size_t i = 0; i < m->n_parts; i++) {
        size_t n = strlen(m->parts[i].name);
        if (n > 2 && strcmp(m->parts[i].name + n - 2, ".#") == 0)
            n -= 2; /* a numbered part */
        if (n == name_len && memcmp(m->parts[i].name, name, name_len) == 0)
            return &m->parts[i];
    }
    return NULL;
}
