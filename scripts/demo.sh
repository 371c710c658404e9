#!/usr/bin/env bash
# The main job: a real 2-rank torchrun training run that writes merged provenance.
#   bash scripts/demo.sh [OUT_DIR]       (default: ./prov-demo)
# The venv .venv-demo is reused while its inputs are unchanged; PROV4ML_REBUILD_VENV=1 rebuilds it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd -P)
out=${1:-prov-demo}
venv="$repo/.venv-demo"
bash "$repo/scripts/make_venv.sh" "$venv" "plot"
export OMP_NUM_THREADS=1
"$venv/bin/torchrun" --standalone --nproc_per_node=2 "$repo/examples/train_ddp.py" --out "$out" --epochs 3
run_dir=$(ls -td "$out"/demo/*/ | head -n1)
run_dir=${run_dir%/}
"$venv/bin/prov4ml-dist" summary "$run_dir"
"$venv/bin/prov4ml-dist" validate "$run_dir/prov.json"
cat <<NEXT

What next: the run is in $run_dir (merged.h5, prov.json, shards/, artifacts/). Try
  source ${venv#"$PWD/"}/bin/activate; RUN=$run_dir
  prov4ml-dist report \$RUN                             # the HTML report (written below), opens offline
  prov4ml-dist plot \$RUN -o plots                      # PNGs: every metric, system series, energy
  prov4ml-dist export \$RUN --format csv -o points.csv  # every point as CSV
  prov4ml-dist export \$RUN --format svg                # the PROV graph as prov.svg (needs Graphviz)
NEXT
report=$("$venv/bin/prov4ml-dist" report "$run_dir")
echo "Report (one HTML file, opens offline): $report"
