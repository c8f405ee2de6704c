#!/usr/bin/env bash
# Inference checks on a GPU machine, one command (each step has a timeout: CHECK_TIMEOUT, BENCH_TIMEOUT, 150 s):
#   bash benchmarks/gpu_inference.sh OUTPUT_DIR [IMAGES_DIR]
# STEPS (comma-separated names below, default all) runs some of them: check, default, float, ordinary,
# upload, profile, lung.
# 1. benchmarks/gpu_check.py: the CUDA pipeline against the CPU pipeline (phantoms, plus up to 30 images
#    from IMAGES_DIR, e.g. a packed data copy from `python -m training.pack`), the stored values' look-up and
#    the page-locked copy exact, and the stored values' results equal the float32 pixels' results;
# 2. python -m inference.benchmark on CUDA with the shipped model (whole image), batches 1, 16, 64, images
#    decoded with the pipeline's page-locked host arrays as the worker decodes them (DICOM: their stored
#    values, looked up in their tables on the GPU);
# 3. the same at batches 16, 64 with the pixels decoded into page-locked float32 arrays (--float-pixels, the
#    path before stored values), then into ordinary arrays (converted to float16 on the host on their way, the
#    path before page-locked decoding), for comparison on the same machine;
# 4. benchmarks/gpu_upload.py: the host-to-device upload of 64 images, each way and the bus alone;
# 5. a profile of the shipped model at batch 64 (torch profiler and Python functions, with and without the CAM);
# 6. a random-weight bundle in lung-crop mode (the other stage 2 path), batches 16, 64.
# Output in OUTPUT_DIR: check.log, bench-default.{txt,json}, bench-float.{txt,json}, bench-ordinary.{txt,json},
# upload.txt, profile.txt, bench-lung.{txt,json}.
set -uo pipefail
out=${1:?output dir}; images=${2:-}
mkdir -p "$out"
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh > "$out/machine.txt" 2>&1 || { cat "$out/machine.txt"; exit 1; }
cat "$out/machine.txt"
limit=${BENCH_TIMEOUT:-150}
want() { [[ ",${STEPS:-check,default,float,ordinary,upload,profile,lung}," == *",$1,"* ]]; }
if want check; then
  timeout "${CHECK_TIMEOUT:-150}" python3 benchmarks/gpu_check.py --model inference/default_model \
    ${images:+--images "$images"} --limit 30 > "$out/check.log" 2>&1
  echo "gpu_check exit $?"; tail -4 "$out/check.log"
fi
if want default; then
  timeout "$limit" python3 -m inference.benchmark --device cuda --batch 1,16,64 \
    --model inference/default_model --out "$out/bench-default.json" > "$out/bench-default.txt" 2>&1
  echo "benchmark (shipped model) exit $?"; tail -16 "$out/bench-default.txt"
fi
if want float; then
  timeout "$limit" python3 -m inference.benchmark --device cuda --batch 16,64 --repeats 3 --float-pixels \
    --model inference/default_model --out "$out/bench-float.json" > "$out/bench-float.txt" 2>&1
  echo "benchmark (shipped model, float32 pixels page-locked) exit $?"; tail -15 "$out/bench-float.txt"
fi
if want ordinary; then
  timeout "$limit" python3 -m inference.benchmark --device cuda --batch 16,64 --repeats 3 --ordinary-arrays \
    --model inference/default_model --out "$out/bench-ordinary.json" > "$out/bench-ordinary.txt" 2>&1
  echo "benchmark (shipped model, ordinary arrays) exit $?"; tail -15 "$out/bench-ordinary.txt"
fi
if want upload; then
  timeout 90 python3 benchmarks/gpu_upload.py > "$out/upload.txt" 2>&1
  echo "upload benchmark exit $?"; cat "$out/upload.txt"
fi
if want profile; then
  timeout "$limit" python3 -m inference.benchmark --device cuda --batch 64 --repeats 3 \
    --model inference/default_model --profile "$out/profile.txt" > "$out/bench-profile.txt" 2>&1
  echo "profile exit $?"
fi
if want lung; then
  timeout "$limit" python3 -m inference.benchmark --device cuda --batch 16,64 --repeats 3 \
    --out "$out/bench-lung.json" > "$out/bench-lung.txt" 2>&1
  echo "benchmark (lung crop) exit $?"; tail -15 "$out/bench-lung.txt"
fi
