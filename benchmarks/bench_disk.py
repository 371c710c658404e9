"""Bytes on disk per point: the shard and merged.h5 of a single-rank run, at 10², 10⁴, 10⁶ points.

    python benchmarks/bench_disk.py [--points 1e2 1e4 1e6] [--values ramp|walk] [--dump]

Each run logs its points over 4 keys (2 contexts, explicit steps; values ``0.5 * i`` as in
bench_log_metric.py, or a random walk like a real loss, which compresses less), ends with ``end_run`` (the
merge), and is measured file by file: shard, merged.h5, prov.json, and everything in the run
directory. yProv4ML is not installed here; the issue's figures for it (3.2.8, same workload) are
printed beside ours: 39 MB at 10⁶ points. ``--dump`` lists merged.h5's datasets by size.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import h5py

YPROV4ML_MB_AT_1E6 = 39.0  # issue 14, measured with yProv4ML 3.2.8
KEYS = [f"metric_{i}" for i in range(4)]


def run(n: int, root: Path, walk: bool) -> dict[str, int]:
    import numpy as np

    import prov4ml_dist as prov4ml

    values = (np.random.default_rng(0).standard_normal(n).cumsum() if walk else 0.5 * np.arange(n)).tolist()

    contexts = [prov4ml.Context.TRAINING, prov4ml.Context.VALIDATION]
    run_dir = Path(prov4ml.start_run(experiment_name="disk", provenance_save_dir=root, sample_interval=None))
    log = prov4ml.log_metric
    for j in range(n):
        log(KEYS[j & 3], values[j], contexts[(j >> 2) & 1], j)
    prov4ml.end_run()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    return {"shard": sum(p.stat().st_size for p in files if p.parent.name == "shards"),
            "merged": (run_dir / "merged.h5").stat().st_size, "prov": (run_dir / "prov.json").stat().st_size,
            "total": sum(p.stat().st_size for p in files)}


def dump(merged: Path) -> None:
    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            print(f"    {name:<28}{obj.id.get_storage_size():>12,} B  chunks={obj.chunks} filters={obj.compression}")
    with h5py.File(merged, "r") as f:
        f.visititems(visit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=float, nargs="+", default=[1e2, 1e4, 1e6])
    parser.add_argument("--values", choices=["ramp", "walk"], default="ramp")
    parser.add_argument("--dump", action="store_true")
    args = parser.parse_args()
    print(f"{'points':>10}{'shard B':>12}{'B/pt':>8}{'merged B':>12}{'B/pt':>8}{'prov.json B':>13}{'total B':>12}"
          f"{'total MB':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for points in args.points:
            n = int(points)
            r = run(n, Path(tmp) / f"p{n}", args.values == "walk")
            print(f"{n:>10}{r['shard']:>12,}{r['shard'] / n:>8.1f}{r['merged']:>12,}{r['merged'] / n:>8.1f}"
                  f"{r['prov']:>13,}{r['total']:>12,}{r['total'] / 1e6:>10.2f}")
            if args.dump:
                dump(next((Path(tmp) / f"p{n}").rglob("merged.h5")))
    print(f"yProv4ML 3.2.8 (the issue's figure): {YPROV4ML_MB_AT_1E6:.0f} MB at 1e6 points")


if __name__ == "__main__":
    main()
