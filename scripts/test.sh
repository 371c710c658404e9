#!/usr/bin/env bash
# All tests, from scratch: system packages (MPI comes from PyPI; Slurm, munge and Graphviz from
# Debian; Chromium and its driver for the report's browser tests), a fresh venv, a local Slurm cluster, then pytest.
#   bash scripts/test.sh [PYTEST_ARGS...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv-test"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  need=()
  for pkg in graphviz chromium chromium-driver; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
bash "$repo/scripts/make_venv.sh" "$venv" "test"
export PATH="$venv/bin:$PATH" OMP_NUM_THREADS=1
cd "$repo"
"$venv/bin/python" -m pytest -q -ra --durations=15 "$@"
