#!/bin/sh
# SPDX-License-Identifier: MIT
# packaging.sh MAKE BUILD CC : `make install` into a scratch DESTDIR, then a program built against
# the installed library through pkg-config links and runs both ways: with the shared library
# (plain --libs; SONAME checked) and with the static one (--static --libs).  The man page is
# installed and renders without warnings.
set -eu
MAKE=${1:-make}; BUILD=${2:-build}; CC=${3:-cc}
D=$(mktemp -d "${TMPDIR:-/tmp}/lm-pkg.XXXXXX")
trap 'rm -rf "$D"' EXIT
fail() { echo "packaging-test: FAIL: $*" >&2; exit 1; }
$MAKE --no-print-directory -s install BUILD="$BUILD" DESTDIR="$D" PREFIX=/usr/local >"$D/install.log" 2>&1 ||
  { cat "$D/install.log"; fail "make install"; }
R=$D/usr/local
for f in bin/lora-merge include/lora_merge.h lib/liblora_merge.a lib/liblora_merge.so lib/pkgconfig/lora_merge.pc \
         share/man/man1/lora-merge.1; do
  [ -e "$R/$f" ] || fail "make install did not install $f"
done
soname=$(objdump -p "$R/lib/liblora_merge.so" | awk '/SONAME/ {print $2}')
[ -n "$soname" ] || fail "liblora_merge.so has no SONAME"
[ -e "$R/lib/$soname" ] || fail "no $soname installed beside liblora_merge.so"
cat >"$D/prog.c" <<'C'
#include <lora_merge.h>
#include <stdio.h>
#include <string.h>
int main(void)
{
    /* one F32 tensor [1]: header {"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} */
    static const char hdr[] = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    unsigned char buf[256];
    size_t n = sizeof hdr - 1;
    memset(buf, 0, sizeof buf);
    buf[0] = (unsigned char)n;
    memcpy(buf + 8, hdr, n);
    lm_err err;
    lm_st_file *f = lm_st_open_buffer(buf, 8 + n + 4, "mem", &err);
    if (f == NULL || lm_st_n_tensors(f) != 1)
        return 1;
    lm_st_close(f);
    printf("%s\n", lm_version_text());
    return 0;
}
C
export PKG_CONFIG_PATH="$R/lib/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$D"
# shared: the plain flags are enough, the library records its own dependencies
$CC -o "$D/prog-shared" "$D/prog.c" $(pkg-config --cflags --libs lora_merge) 2>"$D/cc.log" ||
  { cat "$D/cc.log"; fail "linking with \$(pkg-config --libs lora_merge)"; }
LD_LIBRARY_PATH="$R/lib" "$D/prog-shared" >"$D/out" || fail "the shared-library program failed"
grep -q "lora-merge" "$D/out" || fail "unexpected output: $(cat "$D/out")"
LD_LIBRARY_PATH="$R/lib" ldd "$D/prog-shared" | grep -q "$soname" || fail "prog-shared does not load $soname"
# static: --static adds the private libraries; the archive is named so the .so cannot win
libs=$(pkg-config --static --libs lora_merge | sed "s|-llora_merge|$R/lib/liblora_merge.a|")
$CC -o "$D/prog-static" "$D/prog.c" $(pkg-config --cflags lora_merge) $libs 2>"$D/cc.log" ||
  { cat "$D/cc.log"; fail "linking with \$(pkg-config --static --libs lora_merge)"; }
"$D/prog-static" >/dev/null || fail "the static program failed"
if ldd "$D/prog-static" | grep -q liblora_merge; then fail "prog-static loads the shared library"; fi
# the man page renders without warnings
if command -v groff >/dev/null 2>&1; then
  w=$(groff -man -Tutf8 -ww -z "$R/share/man/man1/lora-merge.1" 2>&1) || fail "groff failed"
  [ -z "$w" ] || fail "man page warnings: $w"
fi
# plain `make` installs only what the build needs: no test framework, no optional package
plan=$($MAKE -n --no-print-directory deps-build 2>&1)
for p in libcriterion-dev clang python3-numpy; do
  case "$plan" in *"$p"*) fail "make (deps-build) would install the optional package $p";; esac
done
case "$plan" in *libopenblas-dev*) ;; *) fail "make (deps-build) does not check libopenblas-dev: $plan";; esac
echo "packaging-test: install, pkg-config (shared $soname and static), man page: ok"
