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
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# torch/torchvision pinned to the versions this project is tested with.
extra=""
[ $want_test = 1 ] && extra="[test]"
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".${extra}" 2>&1 \
  | grep -vE '^WARNING: Location|^\s*$' || true
.venv/bin/python -c "import dicom_node, inference, training, torch, pynetdicom, highdicom" \
  || { echo "install.sh: the installation is incomplete" >&2; exit 1; }
echo "cxr-node installed in $(pwd)/.venv (run: .venv/bin/cxr-node serve)"
