"""Bytes on disk per point: the shard and merged.h5 of a single-rank run, at 10², 10⁴, 10⁶ points.

    python benchmarks/bench_disk.py [--points 1e2 1e4 1e6] [--values ramp|walk] [--dump] [--codecs]

Each run logs its points over 4 keys (2 contexts, explicit steps; values ``0.5 * i`` as in
bench_log_metric.py, or a random walk like a real loss, which compresses less), ends with ``end_run`` (the
merge), and is measured file by file: shard, merged.h5, prov.json, and everything in the run
directory. yProv4ML is not installed here; the issue's figures for it (3.2.8, same workload) are
printed beside ours: 39 MB at 10⁶ points. ``--dump`` lists merged.h5's datasets by size.

``--codecs``: merged.h5's ``rows`` of the largest run written again with each codec in turn
(HDF5's own shuffle + deflate at levels 1 and 4, and hdf5plugin's LZ4, Zstd and Blosc when it is
installed), chunks as the merge makes them, one thread: bytes per point, write and read time
(``--codec-repeat`` times, the best), and the merge's own writer (deflate in threads) beside them.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable
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


def codecs() -> dict[str, dict]:
    """h5py ``create_dataset`` filter options per codec; hdf5plugin's only where installed."""
    table: dict[str, dict] = {"none": {}, "shuffle+deflate 1 (default)": {"shuffle": True, "compression": "gzip",
                                                                         "compression_opts": 1},
                              "shuffle+deflate 4": {"shuffle": True, "compression": "gzip", "compression_opts": 4}}
    if importlib.util.find_spec("hdf5plugin") is None:
        return table
    import hdf5plugin

    table.update({"shuffle+LZ4": {"shuffle": True, **hdf5plugin.LZ4()},
                  "shuffle+Zstd 3": {"shuffle": True, **hdf5plugin.Zstd(clevel=3)},
                  "Blosc lz4 5 (shuffle)": dict(hdf5plugin.Blosc(cname="lz4", clevel=5,
                                                                 shuffle=hdf5plugin.Blosc.SHUFFLE)),
                  "Blosc zstd 5 (shuffle)": dict(hdf5plugin.Blosc(cname="zstd", clevel=5,
                                                                  shuffle=hdf5plugin.Blosc.SHUFFLE))})
    return table


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def compare_codecs(merged: Path, root: Path, repeat: int) -> None:
    """Each codec on the same rows: bytes, write and read seconds, all in this one run."""
    from prov4ml_dist.merge import compress, layout

    with h5py.File(merged, "r") as f:
        rows = f[f"metrics/{layout.ROWS}"][()]
    n = len(rows)
    chunk = min(n, layout.ROWS_CHUNK_ROWS)
    print(f"\nmerged.h5 metrics/rows: {n:,} rows of {rows.dtype.itemsize} B, chunks of {chunk:,} rows")
    print(f"{'codec':<28}{'bytes':>12}{'B/pt':>7}{'write s':>9}{'read s':>8}")
    for name, options in codecs().items():
        path = root / "codec.h5"

        def write(options: dict = options, path: Path = path) -> None:
            with h5py.File(path, "w") as f:
                f.create_dataset("rows", data=rows, chunks=(chunk,), **options)

        def read(path: Path = path) -> None:
            with h5py.File(path, "r") as f:
                f["rows"][()]

        written = best_of(repeat, write)
        with h5py.File(path, "r") as f:
            size = f["rows"].id.get_storage_size()
        print(f"{name:<28}{size:>12,}{size / n:>7.2f}{written:>9.3f}{best_of(repeat, read):>8.3f}", flush=True)
    stage_path = root / "stage.h5"
    with h5py.File(stage_path, "w") as stage:
        stage.create_dataset("rows", data=rows)
    out_path = root / "merge-writer.h5"

    def merge_writer() -> None:
        with h5py.File(stage_path, "r") as stage, h5py.File(out_path, "w") as out:
            compress.write_compressed(out, "rows", stage["rows"])

    written = best_of(repeat, merge_writer)
    with h5py.File(out_path, "r") as f:
        size = f["rows"].id.get_storage_size()
    print(f"{'merge writer (deflate 1, threads)':<28}{size:>12,}{size / n:>7.2f}{written:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=float, nargs="+", default=[1e2, 1e4, 1e6])
    parser.add_argument("--values", choices=["ramp", "walk"], default="ramp")
    parser.add_argument("--dump", action="store_true")
    parser.add_argument("--codecs", action="store_true", help="compare codecs on the largest run's merged.h5")
    parser.add_argument("--codec-repeat", type=int, default=3)
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
        if args.codecs:
            n = int(max(args.points))
            compare_codecs(next((Path(tmp) / f"p{n}").rglob("merged.h5")), Path(tmp), args.codec_repeat)
    print(f"yProv4ML 3.2.8 (the issue's figure): {YPROV4ML_MB_AT_1E6:.0f} MB at 1e6 points")


if __name__ == "__main__":
    main()
