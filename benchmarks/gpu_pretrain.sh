#!/usr/bin/env bash
# Self-supervised pretraining on a GPU machine, then the shipped configuration trained from it, one command:
#   bash benchmarks/gpu_pretrain.sh PACKED_DATA_DIR OUTPUT_DIR
# 1. cxr-node pretrain (python -m training.pretrain) of ResNet18 at PRETRAIN_SIZE px (default 320) on every
#    image of the patients outside the shipped model's validation and test sides
#    (inference/default_model/split.json), for up to PRETRAIN_EPOCHS (default 400) epochs within
#    PRETRAIN_BUDGET seconds (default 150; the first epoch's time sets the epoch count). Beside it, on the
#    same GPU, the shipped configuration from random weights with seed 3 (python -m training.build_default:
#    ResNet18, whole image, 320 px, the shipped stage 1 and split), the second seed an ensemble needs;
# 2. the same configuration with seed 2 started from the encoder (--init-weights), with the shipped model and
#    the seed-3 network added as candidates and their ensemble (--ensemble 3 --int8-ensembles), written as
#    version VERSION (default 1.4.0). The selection (validation only) chooses among the four.
# PACKED_DATA_DIR comes from `python -m training.pack`. Output in OUTPUT_DIR: pretrain.json, pretrain.log,
# seed3.log, seed3-results.json, build.log, results.json, report.md, split.json, bundle/ (the chosen model).
# Step timeouts: PRETRAIN_TIMEOUT (default budget + 60 s), SEED3_TIMEOUT (240 s), BUILD_TIMEOUT (240 s).
set -uo pipefail
data=${1:?packed data dir}; out=${2:?output dir}
mkdir -p "$out"
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh > "$out/machine.txt" 2>&1 || { cat "$out/machine.txt"; exit 1; }
cat "$out/machine.txt"
split=inference/default_model/split.json
config=(--data "$data" --device cuda --archs resnet18 --modes whole --seg-archs= --base-bundle inference/default_model
        --split "$split" --cls-size 320)
budget=${PRETRAIN_BUDGET:-150}
timeout "${PRETRAIN_TIMEOUT:-$((budget + 60))}" python3 -m training.pretrain --data "$data" --split "$split" \
  --out /tmp/ssl --arch resnet18 --size "${PRETRAIN_SIZE:-320}" --epochs "${PRETRAIN_EPOCHS:-400}" --seed 2 \
  --batch-size 128 --time-budget "$budget" --device cuda > "$out/pretrain.log" 2>&1 &
pretraining=$!
timeout "${SEED3_TIMEOUT:-240}" python3 -m training.build_default "${config[@]}" --seed 3 --out /tmp/s3 \
  > "$out/seed3.log" 2>&1
echo "seed 3 build exit $?"; grep -E "^stage 2|chosen|done in" "$out/seed3.log"
cp /tmp/s3/results.json "$out/seed3-results.json" 2>/dev/null
wait "$pretraining"; echo "pretrain exit $?"; grep -E "budget|encoder" "$out/pretrain.log"
cp /tmp/ssl/pretrain.json "$out/" 2>/dev/null
members=inference/default_model
[ -f /tmp/s3/bundle/model.json ] && members+=,/tmp/s3/bundle
timeout "${BUILD_TIMEOUT:-240}" python3 -m training.build_default "${config[@]}" --seed 2 --out /tmp/pt320 \
  --init-weights /tmp/ssl/encoder.safetensors --add-bundles "$members" --ensemble 3 --int8-ensembles \
  --version "${VERSION:-1.4.0}" > "$out/build.log" 2>&1
echo "build exit $?"; grep -E "^stage 2|chosen|done in" "$out/build.log"
cp -r /tmp/pt320/bundle /tmp/pt320/results.json /tmp/pt320/report.md /tmp/pt320/split.json "$out/" 2>/dev/null
