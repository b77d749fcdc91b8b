# SPDX-License-Identifier: MIT
# lora-merge — build, test, bench, install.  `make V=1` shows the commands.
# The user's CFLAGS are added to ours, never replace them.  BUILD= picks the build directory.
SHELL := /bin/bash
CC ?= cc
CFLAGS ?= -O2 -g
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
MANDIR ?= $(PREFIX)/share/man
PKG_CONFIG ?= pkg-config
BUILD ?= build
Q = $(if $(V),,@)

# Debian packages (installed when missing, as root): `make` installs only what the build needs;
# `make test` / `make check` (through `make deps`) add the test framework, the lint tool and the
# optional checkers (clang for the fuzz smoke, python3-numpy for independent checks)
DEB_PKGS_BUILD = pkg-config libopenblas-dev libcjson-dev libzip-dev libfftw3-dev libssl-dev libxxhash-dev
DEB_PKGS = $(DEB_PKGS_BUILD) libcriterion-dev pmccabe
DEB_PKGS_OPTIONAL = clang libclang-rt-14-dev python3-numpy

PKGS = libcjson openblas libzip fftw3 libcrypto
LM_CPPFLAGS = -Iinclude -Isrc/core -Isrc/format -Isrc/peft -Isrc/methods -Isrc/engine -Ikernels -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 \
              $(shell $(PKG_CONFIG) --cflags $(PKGS) 2>/dev/null)
# -fPIC: the same objects make the static and the shared library
LM_CFLAGS = -std=c11 -fvect-cost-model=cheap -Wall -Wextra -Wshadow -Wstrict-prototypes -Wno-unused-parameter \
            -fopenmp -ffp-contract=off -fvisibility=hidden -pthread -fPIC
# OpenBLAS is not linked: kernels/gemm_tile.c loads it with dlopen when first used (issue 15);
# nor are libzip (torch_bin.c) and FFTW (fourierft.c), loaded the same way, nor libcrypto (the
# SHA-256 is src/core/lm_sha256.c): loading libzip (with the libcrypto, libbz2 and libz it
# needs) and FFTW cost every run ~5 ms of one core before main().  The tests and benches link
# them (TEST_LDLIBS): they write zips, compare with OpenSSL's SHA-256 and FFTW's transforms.
LAZY_PKGS = openblas libzip fftw3 libcrypto
LINK_PKGS = $(filter-out $(LAZY_PKGS),$(PKGS))
LM_LDLIBS = $(shell $(PKG_CONFIG) --libs $(LINK_PKGS) 2>/dev/null) -ldl -fopenmp -lm -pthread
TEST_LDLIBS = $(LM_LDLIBS) $(shell $(PKG_CONFIG) --libs libzip fftw3 libcrypto 2>/dev/null)

SRCS = $(sort $(wildcard src/core/*.c src/format/*.c src/peft/*.c src/methods/*.c src/engine/*.c) $(wildcard kernels/*.c))
OBJS = $(SRCS:%.c=$(BUILD)/%.o)
LIB = $(BUILD)/liblora_merge.a
# the shared library: its SONAME changes with LM_SOVERSION, bumped whenever the ABI breaks
VERSION := $(shell sed -n 's/.*LM_VERSION_STRING "\(.*\)"/\1/p' include/lora_merge.h)
LM_SOVERSION = 0
SONAME = liblora_merge.so.$(LM_SOVERSION)
SOLIB = $(BUILD)/liblora_merge.so.$(VERSION)
BIN = $(BUILD)/lora-merge
CLI_OBJS = $(BUILD)/src/cli/main.o
TEST_SRCS = $(sort $(wildcard tests/*.c))
TEST_OBJS = $(TEST_SRCS:%.c=$(BUILD)/%.o)
UNIT = $(BUILD)/tests/unit
FUZZ_SRCS = $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_REPLAY = $(FUZZ_SRCS:tests/fuzz/%.c=$(BUILD)/fuzz/%-replay)
BENCH_BINS = $(patsubst bench/%.c,$(BUILD)/bench/%,$(sort $(wildcard bench/*.c)))

# vector flags for the SIMD kernel files only
$(BUILD)/kernels/%_avx2.o: LM_VEC = -mavx2 -mf16c -mfma
$(BUILD)/kernels/%_avx512.o: LM_VEC = -mavx512f -mavx512bw -mavx512vl -mavx512dq -mf16c -mfma
$(BUILD)/libfuzzer/obj/kernels/%_avx2.o: LM_VEC = -mavx2 -mf16c -mfma
$(BUILD)/libfuzzer/obj/kernels/%_avx512.o: LM_VEC = -mavx512f -mavx512bw -mavx512vl -mavx512dq -mf16c -mfma
# the low-rank preparation's sqrt() inline (its arguments are never negative: errno is never set), so
# that its loops over the rows and columns vectorize; the same correctly rounded results
$(BUILD)/kernels/lowrank_exact.o $(BUILD)/libfuzzer/obj/kernels/lowrank_exact.o: LM_VEC = -fno-math-errno

.SECONDARY:

.PHONY: all deps deps-build deps-install deps-quiet deps-build-quiet lib check test unit-test lint fuzz-replay fuzz \
        fuzz-smoke asan demo bench bench-kernels install uninstall clean packaging-test

all: deps-build-quiet $(BIN) $(SOLIB)

lib: $(LIB) $(SOLIB)

# Install missing Debian packages (needs root, as on a fresh CI machine).  deps: everything the
# tests use; deps-build: only what `make` needs (no optional package).
deps:
	$(Q)$(MAKE) --no-print-directory deps-install DEPS_REQ="$(DEB_PKGS)" DEPS_OPT="$(DEB_PKGS_OPTIONAL)"

deps-build:
	$(Q)$(MAKE) --no-print-directory deps-install DEPS_REQ="$(DEB_PKGS_BUILD)" DEPS_OPT=

deps-install:
	$(Q)missing=""; for p in $(DEPS_REQ); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	opt=""; for p in $(DEPS_OPT); do dpkg -s $$p >/dev/null 2>&1 || opt="$$opt $$p"; done; \
	if [ -n "$$missing$$opt" ]; then \
	  echo "deps: installing$$missing$$opt"; \
	  if [ "$$(id -u)" != 0 ]; then echo "deps: not root: install$$missing$$opt yourself" >&2; \
	     [ -z "$$missing" ] || exit 1; \
	  else \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q $$missing $$opt >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q $$missing $$opt >/dev/null; } || \
	      { [ -z "$$missing" ] || { echo "deps: apt-get failed for$$missing" >&2; exit 1; }; }; \
	  fi; \
	fi

deps-quiet:
	$(Q)$(MAKE) --no-print-directory deps

deps-build-quiet:
	$(Q)$(MAKE) --no-print-directory deps-build

# the compile flags, rewritten (when the Makefile is read) only when they change: objects built
# with other flags (say, before -fPIC) are rebuilt
ifeq ($(filter clean deps deps-build deps-install,$(MAKECMDGOALS)),)
FLAGS_LINE = $(CC) $(CPPFLAGS) $(LM_CFLAGS) $(CFLAGS)
$(shell mkdir -p $(BUILD) && { echo '$(FLAGS_LINE)' | cmp -s - $(BUILD)/.flags || echo '$(FLAGS_LINE)' > $(BUILD)/.flags; })
endif

# on a fresh machine the packages (and pkg-config) arrive first (order-only): the flags above
# are expanded only when a recipe runs, so they see them
$(BUILD)/%.o: %.c $(BUILD)/.flags | deps-build-quiet
	@mkdir -p $(@D)
	$(Q)$(CC) $(CPPFLAGS) $(LM_CPPFLAGS) $(LM_CFLAGS) $(LM_VEC) $(CFLAGS) -MMD -MP -c $< -o $@

$(LIB): $(OBJS)
	$(Q)rm -f $@
	$(Q)ar rcs $@ $^

# only the LM_API symbols are exported (-fvisibility=hidden); it records its own dependencies,
# so `cc prog.c -llora_merge` needs nothing more
$(SOLIB): $(OBJS)
	$(Q)$(CC) -shared $(CFLAGS) $(LDFLAGS) -Wl,-soname,$(SONAME) -Wl,--no-undefined -o $@ $^ $(LM_LDLIBS)
	$(Q)ln -sf $(notdir $@) $(BUILD)/$(SONAME)
	$(Q)ln -sf $(SONAME) $(BUILD)/liblora_merge.so

$(BIN): $(CLI_OBJS) $(LIB)
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LM_LDLIBS)
	@echo "built $@"

# the tests need the test framework (deps), the library only the build packages (deps-build)
$(TEST_OBJS): | deps-quiet
$(UNIT): $(TEST_OBJS) $(LIB)
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ -lcriterion $(TEST_LDLIBS)

# fuzz targets replayed over their corpus by a plain main() (no clang needed)
$(BUILD)/fuzz/%-replay: $(BUILD)/tests/fuzz/%.o $(BUILD)/tests/fuzz/replay_main.o $(LIB)
	@mkdir -p $(@D)
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LM_LDLIBS)

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(LIB)
	@mkdir -p $(@D)
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(TEST_LDLIBS)

# fast tier: unit tests, conformance, fixtures
check: deps-quiet all $(UNIT) $(BUILD)/bench/gen_model $(BUILD)/bench/gen_adapter
	$(Q)LM_BIN=$(BIN) $(UNIT) --jobs 2

unit-test: deps-quiet all $(UNIT) $(BUILD)/bench/gen_model $(BUILD)/bench/gen_adapter
	$(Q)LM_BIN=$(BIN) $(UNIT) --jobs 2

# complexity budget: no function above 50 except the listed ones, whose scores only go down
lint: deps-quiet
	$(Q)sh tests/lint/complexity.sh
	$(Q)sh tests/lint/kinds.sh

fuzz-replay: all $(FUZZ_REPLAY)
	$(Q)for f in $(FUZZ_REPLAY); do n=$$(basename $$f -replay); $$f tests/fuzz/corpus/$$n || exit 1; done

# everything: sanitizer build, fuzz corpus replay and smoke, then the unit suite last
# (its summary line is the last thing printed).  Its three builds (plain, sanitizers, libFuzzer)
# run TEST_JOBS compilers at once, as the unit suites run 2 jobs (the packages come first, alone)
TEST_JOBS ?= 2
TEST_J = $(if $(findstring jobserver,$(MAKEFLAGS)),,-j$(TEST_JOBS))
test: deps-quiet
	$(Q)$(MAKE) --no-print-directory $(TEST_J) all $(UNIT) $(BUILD)/bench/gen_model $(BUILD)/bench/gen_adapter
	$(Q)$(MAKE) --no-print-directory lint
	$(Q)$(MAKE) --no-print-directory $(TEST_J) fuzz-replay
	$(Q)$(MAKE) --no-print-directory packaging-test
	$(Q)$(MAKE) --no-print-directory $(TEST_J) asan
	$(Q)$(MAKE) --no-print-directory $(TEST_J) fuzz-smoke
	$(Q)LM_BIN=$(BIN) $(UNIT) --jobs 2

asan:
	$(Q)$(MAKE) --no-print-directory BUILD=build-asan \
	  CFLAGS="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
	  LDFLAGS="-fsanitize=address,undefined" build-asan/lora-merge build-asan/tests/unit build-asan/bench/gen_model build-asan/bench/gen_adapter \
	  $(FUZZ_REPLAY:$(BUILD)/%=build-asan/%)
	$(Q)for f in $(FUZZ_REPLAY:$(BUILD)/%=build-asan/%); do n=$$(basename $$f -replay); \
	  ASAN_OPTIONS=detect_leaks=1 $$f tests/fuzz/corpus/$$n >/dev/null || exit 1; done
	@echo "asan: unit tests under AddressSanitizer+UBSan"
	$(Q)ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp LM_BIN=build-asan/lora-merge LM_ASAN=1 \
	  build-asan/tests/unit --jobs 2 >build-asan/unit.log 2>&1 || { tail -50 build-asan/unit.log; exit 1; }
	@tail -1 build-asan/unit.log

# libFuzzer (clang): `make fuzz` runs each target FUZZ_SECONDS (default 60); fuzz-smoke ~30 s of
# fuzzing in all, two targets at a time (~18 s)
FUZZ_SECONDS ?= 60
FUZZ_CC ?= clang
FUZZ_FLAGS = -g -O1 -fsanitize=fuzzer,address,undefined
# built without OpenMP: clang's OpenMP runtime is another package, and the targets need no threads
FUZZ_OBJS = $(SRCS:%.c=$(BUILD)/libfuzzer/obj/%.o)
FUZZ_LDLIBS = $(shell $(PKG_CONFIG) --libs $(LINK_PKGS) 2>/dev/null) -ldl -lm -pthread
# the SIMD kernel variants get the coverage instrumentation only: no fuzz target executes them
# (the parsers link them for the method registry's references; they run only through
# lm_kernels_select, from the engine, and the ASan unit run checks them), and ASan and UBSan on
# their intrinsics cost most of this build (fp8_avx512.c: 91 CPU-s against 3 without)
FUZZ_SAN = fuzzer-no-link,address,undefined
$(BUILD)/libfuzzer/obj/kernels/%_avx2.o: FUZZ_SAN = fuzzer-no-link
$(BUILD)/libfuzzer/obj/kernels/%_avx512.o: FUZZ_SAN = fuzzer-no-link
$(BUILD)/libfuzzer/obj/%.o: %.c | deps-build-quiet
	@mkdir -p $(@D)
	$(Q)$(FUZZ_CC) -g -O1 -fsanitize=$(FUZZ_SAN) $(LM_CPPFLAGS) -std=c11 \
	  -Wno-unknown-pragmas -ffp-contract=off $(LM_VEC) -c $< -o $@

$(BUILD)/libfuzzer/%: tests/fuzz/%.c $(FUZZ_OBJS)
	$(Q)$(FUZZ_CC) $(FUZZ_FLAGS) $(LM_CPPFLAGS) -std=c11 -o $@ $< $(FUZZ_OBJS) $(FUZZ_LDLIBS)

fuzz-bin: $(FUZZ_SRCS:tests/fuzz/%.c=$(BUILD)/libfuzzer/%)

# the shared fixtures (when present) seed the corpora too: read in place, never copied
FUZZ_SEEDS_fuzz_st_header = $(wildcard ../shared/fixtures/safetensors/*/ ../shared/fixtures/safetensors/*/*/)
FUZZ_SEEDS_fuzz_adapter_config = $(wildcard ../shared/fixtures/adapters/*/ ../shared/fixtures/peft-golden/*/adapter/)
# FUZZ_JOBS targets at a time (fuzz-smoke: TEST_JOBS); a failing target fails the run
FUZZ_JOBS ?= 1
fuzz: fuzz-bin
	$(Q)one() { n=$$(basename $$1 .c); mkdir -p $(BUILD)/libfuzzer/corpus-$$n; \
	  seeds="$(FUZZ_SEEDS_fuzz_st_header)"; [ $$n = fuzz_st_header ] || seeds=""; \
	  [ $$n != fuzz_adapter_config ] || seeds="$(FUZZ_SEEDS_fuzz_adapter_config)"; \
	  $(BUILD)/libfuzzer/$$n -max_total_time=$(FUZZ_SECONDS) -max_len=65536 \
	    $(BUILD)/libfuzzer/corpus-$$n tests/fuzz/corpus/$$n $$seeds; }; \
	  pids=(); for t in $(FUZZ_SRCS); do one $$t & pids+=($$!); \
	    if [ $${#pids[@]} -ge $(FUZZ_JOBS) ]; then wait $${pids[0]} || exit 1; pids=("$${pids[@]:1}"); fi; done; \
	  for p in "$${pids[@]}"; do wait $$p || exit 1; done

fuzz-smoke:
	$(Q)if command -v $(FUZZ_CC) >/dev/null 2>&1; then \
	  n=$$(ls $(FUZZ_SRCS) | wc -l); s=$$((30 / (n > 0 ? n : 1))); [ $$s -ge 5 ] || s=5; \
	  $(MAKE) --no-print-directory fuzz-bin && \
	  $(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$$s FUZZ_JOBS=$(TEST_JOBS) 2>&1 | grep -E "^#[0-9]+ *DONE|ERROR|SUMMARY|Done" ; \
	  test $${PIPESTATUS[0]:-0} -eq 0; \
	else echo "fuzz-smoke: SKIPPED (no $(FUZZ_CC); install clang to run it)"; fi

demo: all $(BUILD)/bench/gen_model
	$(Q)sh bench/demo.sh $(BUILD)

bench: all $(BENCH_BINS)
	$(Q)sh bench/run_bench.sh $(BUILD) $(BENCH)

bench-kernels: all $(BUILD)/bench/bench_kernels
	$(Q)$(BUILD)/bench/bench_kernels

install: all $(LIB)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(MANDIR)/man1
	install -m 755 $(BIN) $(DESTDIR)$(BINDIR)/lora-merge
	install -m 644 $(LIB) $(DESTDIR)$(LIBDIR)/liblora_merge.a
	install -m 755 $(SOLIB) $(DESTDIR)$(LIBDIR)/$(notdir $(SOLIB))
	ln -sf $(notdir $(SOLIB)) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/liblora_merge.so
	install -m 644 include/lora_merge.h $(DESTDIR)$(INCLUDEDIR)/lora_merge.h
	install -m 644 doc/lora-merge.1 $(DESTDIR)$(MANDIR)/man1/lora-merge.1
	sed -e 's|@PREFIX@|$(PREFIX)|; s|@LIBDIR@|$(LIBDIR)|; s|@INCLUDEDIR@|$(INCLUDEDIR)|' \
	    -e 's|@VERSION@|$(VERSION)|; s|@PKGS@|$(PKGS)|' \
	    lora_merge.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/lora_merge.pc

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/lora-merge $(DESTDIR)$(LIBDIR)/liblora_merge.a \
	      $(DESTDIR)$(LIBDIR)/$(notdir $(SOLIB)) $(DESTDIR)$(LIBDIR)/$(SONAME) $(DESTDIR)$(LIBDIR)/liblora_merge.so \
	      $(DESTDIR)$(INCLUDEDIR)/lora_merge.h $(DESTDIR)$(LIBDIR)/pkgconfig/lora_merge.pc \
	      $(DESTDIR)$(MANDIR)/man1/lora-merge.1

# install into a scratch DESTDIR, then build a program against the installed library through
# pkg-config, once with the shared library and once with the static one
packaging-test: all $(LIB)
	$(Q)sh tests/packaging.sh "$(MAKE)" "$(BUILD)" "$(CC)"

clean:
	rm -rf build build-asan

-include $(OBJS:.o=.d) $(TEST_OBJS:.o=.d) $(CLI_OBJS:.o=.d) $(BENCH_BINS:=.d)
