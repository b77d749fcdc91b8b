#!/bin/sh
# SPDX-License-Identifier: MIT
# make bench [BENCH=small|1b|8b|methods|methods-small|moe|moe-fused|fp8|batch|batch-small|shards|shards-1b]: the merge benchmark (bench/bench_merge.c)
# for one case.  BENCH_DIR=DIR caches the generated models between runs (the 8b case needs
# ~40 GB of disk, methods ~6 GB); BENCH_RUNS=N runs (default 3); BENCH_THREADS=N (default 2);
# BENCH_TYPES=oft,vera limits the methods cases to some adapter types; BENCH_SHARDS_INPUT=file: the
# shards cases read the one base file (no sharded copy: the 8b case then needs ~16 GB less).
set -e
BUILD=${1:-build}
CASE=${2:-1b}
LM_GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
export LM_GIT_REV
exec "$BUILD/bench/bench_merge" --case "$CASE" --runs "${BENCH_RUNS:-3}" --threads "${BENCH_THREADS:-2}"
