#!/usr/bin/env bash
# One run on a GPU machine: build the default model from a packed data copy, then benchmark inference on CUDA.
#   bash benchmarks/gpu_run.sh PACKED_DATA_DIR OUTPUT_DIR
# PACKED_DATA_DIR comes from `python -m training.pack` (manifest format, ~20 MiB). Python wheels missing on
# that machine (pydicom, highdicom, grad-cam, ttach, pydantic, ...) may be put in ./.whl beforehand
# (`bash benchmarks/gpu_wheels.sh`).
# Output: OUTPUT_DIR/bundle/ (the chosen model), results.json, report.md, split.json, bench.json, run.log.
set -uo pipefail
data=${1:?packed data dir}; out=${2:?output dir}
mkdir -p "$out/bundle"
log="$out/run.log"
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh >>"$log" 2>&1 || exit 1
work=/tmp/default
timeout "${BUILD_TIMEOUT:-420}" python3 -m training.build_default --data "$data" --out "$work" --device cuda \
  ${BUILD_ARGS:-} ${RESUME:+--resume} 2>&1 | tee -a "$log"
cp "$work"/bundle/* "$out/bundle/" 2>/dev/null
cp "$work"/results.json "$work"/report.md "$work"/split.json "$out/" 2>/dev/null
model_arg=()
[ -f "$work/bundle/model.json" ] && model_arg=(--model "$work/bundle")
timeout "${BENCH_TIMEOUT:-120}" python3 -m inference.benchmark --device cuda --batch 1,16,64 "${model_arg[@]}" \
  --out "$out/bench.json" 2>&1 | tee -a "$log"
