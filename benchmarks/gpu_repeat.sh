#!/usr/bin/env bash
# Does one seed give one network on a GPU? One command:
#   bash benchmarks/gpu_repeat.sh PACKED_DATA_DIR OUTPUT_DIR
# Trains the shipped configuration (ResNet18, whole image, 320 px, the shipped stage 1 and split) twice with the
# same seed (SEED, default 3), side by side on the same GPU, on deterministic kernels (training.loops.
# use_deterministic_kernels, the default), and compares the two networks bit for bit, tensor by tensor (with
# the largest difference in value), and the validation and test ROC AUCs each run recorded.
# Before deterministic kernels, two such trainings reached validation ROC AUC 0.991 and 0.995.
# PACKED_DATA_DIR comes from `python -m training.pack`. Output in OUTPUT_DIR: machine.txt, a.log, b.log,
# a-results.json, b-results.json, repeat.txt (the comparison; its last line says "identical" or "different").
# DEVICE (default cuda) and BUILD_ARGS (e.g. --quick) let the same script run a smoke test on a CPU; the step
# timeout is BUILD_TIMEOUT (default 240 s).
set -uo pipefail
data=${1:?packed data dir}; out=${2:?output dir}
device=${DEVICE:-cuda}
mkdir -p "$out"
if [ "$device" = cuda ]; then
  # shellcheck source=benchmarks/gpu_env.sh
  source benchmarks/gpu_env.sh > "$out/machine.txt" 2>&1 || { cat "$out/machine.txt"; exit 1; }
  cat "$out/machine.txt"
fi
py=${PYTHON:-python3}
work=$(mktemp -d)
config=(--data "$data" --device "$device" --archs resnet18 --modes whole --seg-archs= --split
        inference/default_model/split.json --base-bundle inference/default_model --cls-size 320
        --seed "${SEED:-3}")
for run in a b; do
  # shellcheck disable=SC2086  # BUILD_ARGS holds several options
  timeout "${BUILD_TIMEOUT:-240}" "$py" -m training.build_default "${config[@]}" ${BUILD_ARGS:-} \
    --out "$work/$run" > "$out/$run.log" 2>&1 &
done
wait
for run in a b; do
  grep -E "^stage 2|chosen|done in" "$out/$run.log"
  cp "$work/$run/results.json" "$out/$run-results.json" 2>/dev/null
done
"$py" - "$work/a/bundle" "$work/b/bundle" "$out/a-results.json" "$out/b-results.json" <<'EOF' | tee "$out/repeat.txt"
import json
import sys

import torch

from safetensors.torch import load_file

a, b, ra, rb = sys.argv[1:5]
wa, wb = (load_file(f"{d}/classifier.safetensors") for d in (a, b))
if sorted(wa) != sorted(wb):
    sys.exit("the two networks have different tensors")


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


unequal = [k for k in wa if not torch.equal(bits(wa[k]), bits(wb[k]))]
diff = max((float((wa[k].float() - wb[k].float()).abs().max()) for k in wa), default=0.0)
for name, path in (("a", ra), ("b", rb)):
    res = json.load(open(path))
    chosen = res["configs"][res["chosen"]]
    print(f"run {name}: {res['chosen']}, validation ROC AUC "
          f"{chosen['val']['roc_auc']:.4f}, test ROC AUC {chosen['test']['roc_auc']:.4f}")
print(f"{len(wa)} tensors, {len(unequal)} differ in their bits ({', '.join(unequal[:5])}); "
      f"largest difference in value {diff:.3g}")
print("different" if unequal else "identical")
EOF
[ -n "${KEEP:-}" ] && echo "runs kept in $work" || rm -rf "$work"
