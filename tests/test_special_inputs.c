/* SPDX-License-Identifier: MIT */
/* test_special_inputs.c : a FIFO, a socket, a device node or a symbolic link loop where an input
 * file should be (issue 15, item 10).  Every one is reported as what it is ("adapter_model.safetensors
 * is a FIFO, not a regular file"): one line, exit 3, never as "missing" (before: "no
 * adapter_model.safetensors or adapter_model.bin", "directory holds neither ...", or a base
 * config.json that is a FIFO silently ignored), and nothing blocks (opening a FIFO for reading
 * waits for a writer: the suite's timeout would catch it).  Nothing is written. */
#include "th.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

typedef enum { SI_FIFO, SI_SOCKET, SI_LOOP, SI_DEVICE } si_kind;
static const char *const si_what[] = {"a FIFO", "a socket", "a symbolic link loop", "a character device"};

/* path replaced by a special file of that kind */
static void si_make(const char *path, si_kind k)
{
    unlink(path);
    if (k == SI_FIFO) {
        cr_assert_eq(mkfifo(path, 0644), 0);
    } else if (k == SI_SOCKET) {
        struct sockaddr_un a;
        memset(&a, 0, sizeof a);
        a.sun_family = AF_UNIX;
        cr_assert_lt(strlen(path), sizeof a.sun_path, "socket path too long: %s", path);
        snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        cr_assert(s >= 0);
        cr_assert_eq(bind(s, (struct sockaddr *)&a, sizeof a), 0);
        close(s); /* the socket file stays */
    } else if (k == SI_LOOP) {
        const char *leaf = strrchr(path, '/');
        cr_assert_eq(symlink(leaf ? leaf + 1 : path, path), 0); /* a link to itself */
    } else {
        cr_assert_eq(symlink("/dev/null", path), 0); /* a character device, without needing root */
    }
}

/* the special file at dir/name replaced by the original from src/name again (the run reads its
 * inputs only, so the directory is as it was copied) */
static void si_restore(const char *dir, const char *src, const char *name)
{
    char p[1500], q[1500];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    snprintf(q, sizeof q, "%s/%s", src, name);
    cr_assert_eq(unlink(p), 0, "%s", p);
    cr_assert_eq(th_copy_tree(q, p), 0, "%s", q);
}

Test(special_inputs, fifo_socket_device_or_loop_said_as_such_never_missing, .timeout = 240)
{
    char gen[4096];
    if (!th_gen_model_path(gen, sizeof gen))
        cr_skip_test("needs %s", gen);
    char *tmp = th_tmpdir(), m[600], sharded[700], p[1400];
    snprintf(m, sizeof m, "%s/m", tmp);
    const char *gargv[] = {gen, "--out", m, "--hidden", "64", "--inter", "128", "--layers", "2", "--vocab", "128",
                           "--heads", "4", "--kv-heads", "2", "--rank", "4", NULL};
    th_run_result r = th_run(NULL, gargv);
    cr_assert_eq(r.status, 0, "gen_model: %s", r.err);
    th_run_free(&r);
    /* a sharded base with an index, config.json and a tokenizer file */
    snprintf(sharded, sizeof sharded, "%s/sharded/", tmp);
    snprintf(p, sizeof p, "%s/base", m);
    char ad0[700];
    snprintf(ad0, sizeof ad0, "%s/adapter", m);
    r = th_runv("-q", "--max-shard-size", "20KB", p, ad0, sharded, NULL);
    cr_assert_eq(r.status, 0, "%s", r.err);
    th_run_free(&r);
    snprintf(p, sizeof p, "%s/sharded/tokenizer.json", tmp);
    cr_assert_eq(th_write_file(p, "{}", 2), 0);
    snprintf(p, sizeof p, "%s/sharded/model-00002-of-", tmp);
    char shard2[64] = "";
    for (int n = 2; n < 100 && shard2[0] == '\0'; n++) {
        char q[1500];
        snprintf(q, sizeof q, "%s%05d.safetensors", p, n);
        if (th_exists(q))
            snprintf(shard2, sizeof shard2, "model-00002-of-%05d.safetensors", n);
    }
    cr_assert(shard2[0] != '\0', "the sharded base has no second shard");

    /* which file is replaced, in the adapter (a) or the base (b), and which OUT reads it */
    static const struct {
        char where;
        const char *name;
        int dir_out_only; /* a side file: read only for a directory OUT */
    } victims[] = {
        {'a', "adapter_model.safetensors", 0}, {'a', "adapter_config.json", 0}, {'b', "config.json", 0},
        {'b', "model.safetensors.index.json", 0}, {'b', NULL /* shard2 */, 0}, {'b', "tokenizer.json", 1},
    };
    char a[700], b[700], out_dir[700], out_file[700];
    snprintf(a, sizeof a, "%s/a", tmp);
    snprintf(b, sizeof b, "%s/b", tmp);
    snprintf(out_dir, sizeof out_dir, "%s/out/", tmp);
    snprintf(out_file, sizeof out_file, "%s/out.safetensors", tmp);
    /* copied once; after each run its one special file is the original again */
    cr_assert_eq(th_copy_tree(ad0, a), 0);
    cr_assert_eq(th_copy_tree(sharded, b), 0);
    int n_runs = 0;
    for (size_t v = 0; v < sizeof victims / sizeof *victims; v++)
        for (int k = SI_FIFO; k <= SI_DEVICE; k++)
            for (int dir_out = 0; dir_out < 2; dir_out++) {
                if (victims[v].dir_out_only && !dir_out)
                    continue;
                const char *name = victims[v].name ? victims[v].name : shard2;
                const char *dir = victims[v].where == 'a' ? a : b, *src = victims[v].where == 'a' ? ad0 : sharded;
                snprintf(p, sizeof p, "%s/%s", dir, name);
                si_make(p, (si_kind)k);
                const char *out = dir_out ? out_dir : out_file;
                r = th_runv(b, a, out, NULL);
                char want[200];
                snprintf(want, sizeof want, "%s is %s, not a regular file", name, si_what[k]);
                cr_expect_eq(r.status, 3, "%s as %s (%s OUT): exit %d: %s", name, si_what[k], dir_out ? "dir" : "file",
                             r.status, r.err);
                cr_expect(strstr(r.err, want) != NULL, "%s as %s: expected '%s' in: %s", name, si_what[k], want, r.err);
                cr_expect(strstr(r.err, p) != NULL, "the line does not name %s: %s", p, r.err);
                const char *nl = strchr(r.err, '\n');
                cr_expect(nl != NULL && nl[1] == '\0', "not one line: %s", r.err);
                cr_expect(!th_exists(out_file) && !th_exists(out_dir), "%s as %s: an output was left", name,
                          si_what[k]);
                th_run_free(&r);
                si_restore(dir, src, name);
                n_runs++;
            }
    cr_assert_eq(n_runs, 5 * 4 * 2 + 4);

    /* the inputs named on the command line: the base file, the adapter given as a file */
    static const char *const args[] = {"base.safetensors", "adapter.safetensors"};
    for (int w = 0; w < 2; w++)
        for (int k = SI_FIFO; k <= SI_DEVICE; k++) {
            snprintf(p, sizeof p, "%s/%s", tmp, args[w]);
            si_make(p, (si_kind)k);
            snprintf(b, sizeof b, "%s/m/base", tmp);
            r = w == 0 ? th_runv(p, a, out_file, NULL) : th_runv(b, p, out_file, NULL);
            char want[200];
            snprintf(want, sizeof want, "%s is %s, not a regular file", args[w], si_what[k]);
            cr_expect_eq(r.status, 3, "%s as %s: exit %d: %s", args[w], si_what[k], r.status, r.err);
            cr_expect(strstr(r.err, want) != NULL, "%s as %s: expected '%s' in: %s", args[w], si_what[k], want, r.err);
            cr_expect(!th_exists(out_file), "an output was left");
            th_run_free(&r);
            unlink(p);
        }
    th_rmrf(tmp);
    free(tmp);
}
