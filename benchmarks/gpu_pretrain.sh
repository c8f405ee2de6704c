#!/usr/bin/env bash
# Self-supervised pretraining on a GPU machine, then the shipped configuration trained from it, one command:
#   bash benchmarks/gpu_pretrain.sh PACKED_DATA_DIR OUTPUT_DIR
# 1. cxr-node pretrain (python -m training.pretrain) of ResNet18 at PRETRAIN_SIZE px (default 320) for
#    PRETRAIN_EPOCHS (default 200) on every image of the patients outside the shipped model's validation and
#    test sides (inference/default_model/split.json);
# 2. python -m training.build_default with the shipped model's configuration (ResNet18, whole image, 320 px,
#    seed 2, its stage 1 and split) started from that encoder (--init-weights), and the shipped model added as
#    a candidate, so the report compares the two on one split and the selection (validation only) decides.
# PACKED_DATA_DIR comes from `python -m training.pack`. Output in OUTPUT_DIR: pretrain.json, pretrain.log,
# encoder.safetensors, results.json, report.md, build.log, bundle/.
set -uo pipefail
data=${1:?packed data dir}; out=${2:?output dir}
mkdir -p "$out"
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh > "$out/machine.txt" 2>&1 || { cat "$out/machine.txt"; exit 1; }
cat "$out/machine.txt"
split=inference/default_model/split.json
timeout "${PRETRAIN_TIMEOUT:-300}" python3 -m training.pretrain --data "$data" --split "$split" \
  --out /tmp/ssl --arch resnet18 --size "${PRETRAIN_SIZE:-320}" --epochs "${PRETRAIN_EPOCHS:-200}" --seed 2 \
  --batch-size 128 --device cuda > "$out/pretrain.log" 2>&1
echo "pretrain exit $?"; tail -3 "$out/pretrain.log"
cp /tmp/ssl/pretrain.json /tmp/ssl/encoder.safetensors "$out/" 2>/dev/null
timeout "${BUILD_TIMEOUT:-240}" python3 -m training.build_default --data "$data" --out /tmp/pt320 --device cuda \
  --archs resnet18 --modes whole --seg-archs= --base-bundle inference/default_model --split "$split" \
  --seed 2 --cls-size 320 --init-weights /tmp/ssl/encoder.safetensors \
  --add-bundles inference/default_model > "$out/build.log" 2>&1
echo "build exit $?"; grep -E "^stage 2|chosen" "$out/build.log"
cp -r /tmp/pt320/bundle /tmp/pt320/results.json /tmp/pt320/report.md "$out/" 2>/dev/null
