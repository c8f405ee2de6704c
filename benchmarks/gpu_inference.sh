#!/usr/bin/env bash
# Inference checks on a GPU machine, one command:
#   bash benchmarks/gpu_inference.sh OUTPUT_DIR [IMAGES_DIR]
# 1. benchmarks/gpu_check.py: the CUDA pipeline against the CPU pipeline (phantoms, plus up to 30 images
#    from IMAGES_DIR, e.g. a packed data copy from `python -m training.pack`);
# 2. python -m inference.benchmark on CUDA with the shipped model (whole image), batches 1, 16, 64;
# 3. the same with a random-weight bundle in lung-crop mode (the other stage 2 path), batches 1, 16, 64;
# 4. benchmarks/gpu_upload.py: the host-to-device upload of 64 images, ways of converting and the bus alone.
# Output in OUTPUT_DIR: check.log, bench-default.{txt,json}, bench-lung.{txt,json}, upload.txt.
set -uo pipefail
out=${1:?output dir}; images=${2:-}
mkdir -p "$out"
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh > "$out/machine.txt" 2>&1 || { cat "$out/machine.txt"; exit 1; }
cat "$out/machine.txt"
timeout "${CHECK_TIMEOUT:-150}" python3 benchmarks/gpu_check.py --model inference/default_model \
  ${images:+--images "$images"} --limit 30 > "$out/check.log" 2>&1
echo "gpu_check exit $?"; tail -3 "$out/check.log"
timeout "${BENCH_TIMEOUT:-180}" python3 -m inference.benchmark --device cuda --batch 1,16,64 \
  --model inference/default_model --out "$out/bench-default.json" > "$out/bench-default.txt" 2>&1
echo "benchmark (shipped model) exit $?"; tail -8 "$out/bench-default.txt"
timeout "${BENCH_TIMEOUT:-180}" python3 -m inference.benchmark --device cuda --batch 1,16,64 \
  --out "$out/bench-lung.json" > "$out/bench-lung.txt" 2>&1
echo "benchmark (lung crop) exit $?"; tail -6 "$out/bench-lung.txt"
timeout "${BENCH_TIMEOUT:-180}" python3 benchmarks/gpu_upload.py > "$out/upload.txt" 2>&1
echo "upload benchmark exit $?"; cat "$out/upload.txt"
