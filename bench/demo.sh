#!/bin/sh
# SPDX-License-Identifier: MIT
# make demo: generate a small Llama-shaped base model and a LoRA adapter, then merge them.
set -e
BUILD=${1:-build}
DIR=$(mktemp -d "${TMPDIR:-/tmp}/lora-merge-demo.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
echo "== generating a Llama-shaped base (hidden 256, 4 layers, vocab 1024, bf16) and an r=8 LoRA adapter in $DIR"
"$BUILD/bench/gen_model" --out "$DIR" --hidden 256 --inter 688 --layers 4 --vocab 1024 --rank 8 --alpha 16 --dtype bf16
echo "== lora-merge inspect $DIR/adapter"
"$BUILD/lora-merge" inspect "$DIR/adapter"
echo "== lora-merge --dry-run (the plan, nothing written)"
"$BUILD/lora-merge" --dry-run "$DIR/base/model.safetensors" "$DIR/adapter" "$DIR/merged.safetensors" | head -8
echo "   ..."
echo "== lora-merge $DIR/base/model.safetensors $DIR/adapter $DIR/merged.safetensors"
"$BUILD/lora-merge" "$DIR/base/model.safetensors" "$DIR/adapter" "$DIR/merged.safetensors"
echo "== the merged file"
"$BUILD/lora-merge" inspect "$DIR/merged.safetensors" | tail -4
echo "== un-merge with --scale -1 gives back the base (up to rounding):"
"$BUILD/lora-merge" -q --scale -1 "$DIR/merged.safetensors" "$DIR/adapter" "$DIR/unmerged.safetensors"
ls -l "$DIR/base/model.safetensors" "$DIR/merged.safetensors" "$DIR/unmerged.safetensors" | awk '{print "   " $5, $9}'
echo "demo done (temporary files removed)"
