#!/usr/bin/env bash
# A virtual environment with prov4ml_dist (editable) and everything its tests and demo use.
#   scripts/make_venv.sh [--check] VENV_DIR [EXTRAS]      (EXTRAS default: test)
# A venv this script made from the same inputs (pyproject.toml, this script, the extras, the
# Python and the local torch wheels) whose package still imports from this checkout is reused
# in seconds; anything else is rebuilt from scratch. PROV4ML_REBUILD_VENV=1 forces a rebuild.
# --check only says whether VENV_DIR would be reused (exit 0) or rebuilt (exit 1, and why).
# torch is pinned to 2.13.0: a CPU wheel of it lies in /opt/wheels on our machines; elsewhere
# pip downloads it from PyPI.
set -euo pipefail
check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
venv=${1:?usage: make_venv.sh [--check] VENV_DIR [EXTRAS]}
extras=${2:-test}
repo=$(cd "$(dirname "$0")/.." && pwd -P)
python=${PYTHON:-python3}
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
stamp_file="$venv/.prov4ml-stamp"

stamp() {  # everything the venv's content depends on
  { echo "extras=$extras"; "$python" -c 'import sys; print(sys.version)'; cat "$repo/pyproject.toml" "$repo/scripts/make_venv.sh"
    ls -l /opt/wheels 2>/dev/null || true; } | sha256sum | cut -d' ' -f1
}

why_rebuild() {  # empty when the venv can be reused
  if [ "${PROV4ML_REBUILD_VENV:-0}" = 1 ]; then echo "PROV4ML_REBUILD_VENV=1"; return; fi
  if [ ! -x "$venv/bin/python" ]; then echo "no venv at $venv"; return; fi
  if [ ! -f "$stamp_file" ]; then echo "$venv was not made by this script (or its build did not finish)"; return; fi
  if [ "$(cat "$stamp_file")" != "$(stamp)" ]; then
    echo "pyproject.toml, the extras, Python or this script changed since $venv was made"; return
  fi
  local where
  where=$(env -u PYTHONPATH "$venv/bin/python" -c 'import prov4ml_dist, torch, h5py, prov; print(prov4ml_dist.__file__)' 2>/dev/null) \
    || { echo "$venv cannot import prov4ml_dist, torch, h5py and prov"; return; }
  [ "$where" = "$repo/prov4ml_dist/__init__.py" ] || echo "$venv imports prov4ml_dist from $where, not from $repo"
}

reason=$(why_rebuild)
if [ "$check" = 1 ]; then
  if [ -z "$reason" ]; then echo "reusable: $venv"; exit 0; fi
  echo "would rebuild: $reason"; exit 1
fi
if [ -z "$reason" ]; then
  echo "venv reused: $venv (PROV4ML_REBUILD_VENV=1 rebuilds it)"
  exit 0
fi
echo "building $venv: $reason"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${find_links[@]}" "torch==2.13.0"
"$venv/bin/python" -m pip install -q "${find_links[@]}" -e "$repo[$extras]"
stamp > "$stamp_file"  # last: an interrupted build is never taken for a finished one
echo "venv ready: $venv ($("$venv/bin/python" -c 'import torch, h5py, prov; print("torch", torch.__version__, "h5py", h5py.__version__, "prov", prov.__version__)'))"
