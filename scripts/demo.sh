#!/usr/bin/env bash
# The main job: a real 2-rank torchrun training run that writes merged provenance.
#   bash scripts/demo.sh [OUT_DIR]       (default: ./prov-demo)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-prov-demo}
venv="$repo/.venv-demo"
bash "$repo/scripts/make_venv.sh" "$venv" "plot"
export OMP_NUM_THREADS=1
"$venv/bin/torchrun" --standalone --nproc_per_node=2 "$repo/examples/train_ddp.py" --out "$out" --epochs 3
run_dir=$(ls -td "$out"/demo/*/ | head -n1)
"$venv/bin/prov4ml-dist" summary "$run_dir"
"$venv/bin/prov4ml-dist" validate "$run_dir/prov.json"
