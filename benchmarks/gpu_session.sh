#!/usr/bin/env bash
# The GPU checks in one go, for a machine with an NVIDIA GPU, torch with CUDA, h5py, psutil and
# nvidia-ml-py (prov is the one package such images tend to lack: put its wheel in .whl/).
#
#     bash benchmarks/gpu_session.sh [OUT_DIR]
#
# 1. benchmarks/gpu_check.py: NVML call costs, the sampler on a busy GPU, counter vs integrated energy.
# 2. A 1-GPU torchrun job of examples/train_ddp.py over NCCL, its merged run summarised and the
#    GPU facts read back from merged.h5 and prov.json.
# 3. Two ranks sharing that GPU over gloo: the GPU's energy must count once in the job's total.
# 4. benchmarks/bench_sampler.py with the NVML sensor live.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/prov4ml-gpu}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ==="; }

step "machine"
nvidia-smi -L
python3 -c 'import torch, h5py, pynvml, prov; print("torch", torch.__version__, "cuda", torch.version.cuda,
"nccl", torch.cuda.nccl.version(), "| h5py", h5py.__version__, "| prov", prov.__version__)'

step "gpu_check.py"
python3 benchmarks/gpu_check.py --seconds 5 || status=1

# What a merged run says about the GPU: the sampled GPU series, the energy table (a GPU shared by
# several ranks counts once per node), PROV's GPU facts. Exit 1 when a GPU series is missing.
check_run() {
    python3 -m prov4ml_dist summary "$1" || return 1
    python3 - "$1" <<'EOF'
import json
import sys
from collections import defaultdict
from pathlib import Path

import h5py

run = Path(sys.argv[1])
with h5py.File(run / "merged.h5", "r") as f:
    series = f["system/series"][:]
    energy = [(r["scope"].decode(), r["name"].decode(), r["field"].decode(), float(r["value"])) for r in f["energy"][:]]
gpu = [(r["key"].decode(), int(r["rank"]), int(r["count"]), float(r["last"])) for r in series if b"gpu" in r["key"]]
print("GPU series in merged.h5 (key, rank, points, last):", *gpu, sep="\n  ")
print("energy table:", *energy, sep="\n  ")
per_uuid = defaultdict(list)
for scope, _name, field, value in energy:
    if scope == "rank" and field.startswith("gpu.GPU-"):
        per_uuid[field].append(value)
job_gpu = sum(v for scope, _n, field, v in energy if scope == "job" and field == "gpu_joules")
once = sum(max(values) for values in per_uuid.values())
print(f"job gpu_joules {job_gpu:.1f} J; each GPU counted once would give {once:.1f} J "
      f"({', '.join(f'{k[4:12]}… seen by {len(v)} rank(s)' for k, v in per_uuid.items())})")
doc = json.loads((run / "prov.json").read_text())
facts = {k: v for section in ("entity", "agent", "activity") for rec in doc.get(section, {}).values()
         for k, v in rec.items() if any(w in k.lower() for w in ("nccl", "cuda", "gpu"))}
print("prov.json GPU facts:", json.dumps(facts, default=str)[:2000])
if not gpu or abs(job_gpu - once) > 0.01 * max(once, 1.0):
    sys.exit("no GPU series, or the job's GPU energy is not each GPU counted once")
EOF
}

step "1-GPU NCCL job: torchrun --nproc_per_node=1 examples/train_ddp.py"
python3 -m torch.distributed.run --standalone --nproc_per_node=1 examples/train_ddp.py --out "$out/prov" \
    --experiment gpu --run-id nccl1 --samples 200000 --epochs 3 --batch-size 256 --sample-interval 0.2 \
    && check_run "$out/prov/gpu/nccl1" || status=1

step "2 ranks sharing the GPU over gloo: the GPU's energy counts once"
python3 -m torch.distributed.run --standalone --nproc_per_node=2 examples/train_ddp.py --out "$out/prov" \
    --experiment gpu --run-id shared2 --backend gloo --samples 50000 --epochs 2 --batch-size 256 \
    --sample-interval 0.2 && check_run "$out/prov/gpu/shared2" || status=1

step "bench_sampler.py (NVML live)"
python3 benchmarks/bench_sampler.py --seconds 4 || status=1
exit $status
