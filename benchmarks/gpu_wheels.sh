#!/usr/bin/env bash
# Puts in ./.whl the wheels the GPU scripts need on a machine that has PyTorch, NumPy, SciPy, OpenCV, scikit-learn
# and matplotlib but not the DICOM and CAM packages (benchmarks/gpu_env.sh installs them there), at the versions
# of this checkout's environment, for CPython 3.12 on x86-64:
#   bash benchmarks/gpu_wheels.sh [PYTHON]     (PYTHON: whose versions to take; default .venv/bin/python)
# Only what training, pretraining, evaluation and the inference benchmark import: the repository, a packed data
# copy and these wheels travel together to such a machine, within 64 MiB.
set -euo pipefail
py=${1:-.venv/bin/python}
names=(pydicom highdicom pydantic pydantic_core annotated-types typing-inspection typing_extensions ttach)
pins=$("$py" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' \
  "${names[@]}")
gradcam=$("$py" -c 'import importlib.metadata as m; print(m.version("grad-cam"))')
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086  # one argument per pin
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
"$py" -m pip wheel -q --no-deps -w .whl "grad-cam==$gradcam"  # published as a source distribution only
ls .whl && du -sh .whl
