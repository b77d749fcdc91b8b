#!/bin/sh
# SPDX-License-Identifier: MIT
# make bench [BENCH=small|1b|8b|methods|methods-small|moe|moe-fused|fp8|batch|batch-small|shards|shards-1b]: the merge benchmark (bench/bench_merge.c)
# for one case.  BENCH_DIR=DIR caches the generated models between runs (the 8b case needs
# ~40 GB of disk, methods ~6 GB); BENCH_RUNS=N runs (default 3, 5 for 1b and fp8); BENCH_THREADS=N (default 2);
# BENCH_TYPES=oft,vera limits the methods cases to some adapter types; BENCH_SHARDS_INPUT=file: the
# shards cases read the one base file (no sharded copy: the 8b case then needs ~16 GB less).
set -e
BUILD=${1:-build}
CASE=${2:-1b}
LM_GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
export LM_GIT_REV
# 1b and fp8 (the cases with a ratio target against the copy floor): 5 runs by default, the floor
# moving ~10% between runs on a shared virtual machine
case "$CASE" in 1b|fp8) RUNS_DEFAULT=5 ;; *) RUNS_DEFAULT=3 ;; esac
exec "$BUILD/bench/bench_merge" --case "$CASE" --runs "${BENCH_RUNS:-$RUNS_DEFAULT}" --threads "${BENCH_THREADS:-2}"
