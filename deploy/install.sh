#!/usr/bin/env bash
# Set up cxr-node on a fresh Debian/Ubuntu machine, in ./.venv of this checkout.
#   bash deploy/install.sh          the node and its Python dependencies
#   bash deploy/install.sh --test   also the real DICOM peers and servers the tests drive:
#                                   dcmtk, orthanc, dicom3tools, postgresql, chromium, docker-compose,
#                                   systemd (for systemd-analyze) (Debian packages)
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_pkgs=()
[ $want_test = 1 ] && apt_pkgs+=(dcmtk orthanc dicom3tools postgresql chromium fonts-dejavu-core docker-compose systemd)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "install.sh: please install these Debian packages first: ${missing[*]}" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
root=$(pwd)
# pip's own output, less its noise; its exit status stands (a failed install must not read as "installed")
pip_quiet() {
  local out rc=0
  out=$(.venv/bin/python -m pip "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -vE '^WARNING: Location|^\s*$' || true
  return $rc
}
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then  # none yet, or one left half-made
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
    echo "install.sh: cxr-node needs Python 3.11 or newer; '$PY' is not (set PYTHON=python3.11 or newer)" >&2
    exit 1; }
  "$PY" -m venv --clear .venv || {
    echo "install.sh: '$PY -m venv' failed: install the python3-venv package (apt-get install python3-venv)" >&2
    exit 1; }
fi
pip_quiet install -q --upgrade pip || { echo "install.sh: pip could not upgrade itself (see above)" >&2; exit 1; }
# torch/torchvision pinned to the versions this project is tested with. TORCH_INDEX_URL picks their build, e.g.
# https://download.pytorch.org/whl/cpu on a machine without an NVIDIA GPU (some hundred MB instead of gigabytes
# of CUDA libraries), as deploy/Dockerfile does.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  pip_quiet install -q --index-url "$TORCH_INDEX_URL" "torch==2.14.1" "torchvision==0.29.1" \
    || { echo "install.sh: pip could not install torch from $TORCH_INDEX_URL (see above)" >&2; exit 1; }
fi
extra=""
[ $want_test = 1 ] && extra="[test]"
pip_quiet install -q "torch==2.14.1" "torchvision==0.29.1" -e ".${extra}" \
  || { echo "install.sh: pip could not install cxr-node and its dependencies (see above)" >&2; exit 1; }
# checked from outside the checkout, so that its folders do not stand in for the installed packages
(cd / && "$root/.venv/bin/python" -c "import dicom_node, inference, training, torch, pynetdicom, highdicom") \
  || { echo "install.sh: the installation is incomplete" >&2; exit 1; }
echo "cxr-node installed in $root/.venv (run: .venv/bin/cxr-node serve)"
