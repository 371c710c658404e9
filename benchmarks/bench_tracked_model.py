"""Cost of ``ProvenanceTrackedModel`` on a training step: the same MLP and batches, trained
bare, wrapped with the default budget (spent within a few steps, then the hooks return at
once) and wrapped with a budget that is never spent (every batch copied and written).

    python benchmarks/bench_tracked_model.py [--steps 300] [--batch 64] [--width 512]

Each variant is timed in this one process, alternating rounds, median of per-step times; the
writer thread's bytes on disk and dropped batches are reported from the artifact record.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import prov4ml_dist as prov4ml
from prov4ml_dist.wrappers.tracked_model import DEFAULT_MAX_BYTES


def make_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 10))


def step_times(model: torch.nn.Module, batches: list[torch.Tensor], targets: list[torch.Tensor]) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for x, y in zip(batches, targets, strict=True):
        start = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    batches = [torch.randn(args.batch, args.width) for _ in range(args.steps)]
    targets = [torch.randint(0, 10, (args.batch,)) for _ in range(args.steps)]
    variants = {"bare": None, "tracked, default budget": DEFAULT_MAX_BYTES, "tracked, unlimited": 2**62}
    results: dict[str, list[float]] = {name: [] for name in variants}
    written: dict[str, dict] = {}
    step_times(make_model(args.width), batches[:20], targets[:20])  # warm-up: allocator, kernels
    names = list(variants)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotate the order
                budget = variants[name]
                model = make_model(args.width)
                prov4ml.start_run("bench", provenance_save_dir=Path(tmp), sample_interval=None)
                if budget is not None:
                    model = prov4ml.ProvenanceTrackedModel("mlp", model, max_bytes=budget)
                results[name] += step_times(model, batches, targets)
                run = prov4ml.get_active_run()
                run.close()
                prov4ml.api._active = None
                if prov4ml.api._hooks is not None:
                    prov4ml.api._hooks.remove()
                    prov4ml.api._hooks = None
                record = next((r for r in run.artifact_records() if r["name"] == "mlp.h5"), None)
                if record is not None:
                    written[name] = {"size": record["size"], **record["tracked_layers"]}
    bare = statistics.median(results["bare"])
    print(f"{args.steps} steps x {args.rounds} rounds, batch {args.batch}, width {args.width}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'variant':26} {'median ms/step':>14} {'vs bare':>8} {'file MiB':>9} {'dropped':>8}")
    for name, times in results.items():
        med = statistics.median(times)
        info = written.get(name, {})
        size = f"{info['size'] / 2**20:.1f}" if info else "-"
        print(f"{name:26} {med * 1e3:14.3f} {med / bare:8.2f} {size:>9} {info.get('dropped_batches', '-'):>8}")


if __name__ == "__main__":
    main()
