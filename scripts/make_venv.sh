#!/usr/bin/env bash
# Create a fresh virtual environment with prov4ml_dist and everything its tests and demo use.
#   scripts/make_venv.sh VENV_DIR [EXTRAS]      (EXTRAS default: test)
# torch is pinned to 2.13.0: a CPU wheel of it lies in /opt/wheels on our machines; elsewhere
# pip downloads it from PyPI.
set -euo pipefail
venv=${1:?usage: make_venv.sh VENV_DIR [EXTRAS]}
extras=${2:-test}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)

rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${find_links[@]}" "torch==2.13.0"
"$venv/bin/python" -m pip install -q "${find_links[@]}" -e "$repo[$extras]"
echo "venv ready: $venv ($("$venv/bin/python" -c 'import torch, h5py, prov; print("torch", torch.__version__, "h5py", h5py.__version__, "prov", prov.__version__)'))"
