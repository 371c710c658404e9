"""PROV document size and build time against ranks and keys (issue 13's targets).

    python benchmarks/bench_prov.py [--quick]

Part 1, the builder alone, on synthetic merged runs (tests/prov_support.py: plain data, no
HDF5; each rank logs every key): seconds to build the PROV-JSON dict and to write it, bytes and
records. Targets: 1,024 ranks x 2,000 keys <= 20 MB built in <= 10 s; records of 64 x 100 at
most twice those of 64 x 10. Making the synthetic 1,024 x 2,000 run (2 million series
summaries) takes longer than building its document; it is not counted.

Part 2, the PROV part of a real merge (``merge_run``'s "prov" stage: load merged.h5's
summaries, build, write), 8 ranks x 2,000 keys, through bench_merge's shards. Target: <= 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_merge import make_run, merge_in_child  # noqa: E402

from prov4ml_dist.provenance import build_prov_json  # noqa: E402
from tests.prov_support import records, synthetic_run  # noqa: E402


def builder(ranks: int, keys: int, repeat: int = 3) -> dict[str, float]:
    run = synthetic_run(ranks, keys)
    builds, writes = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        doc = build_prov_json(run)
        built = time.perf_counter()
        text = json.dumps(doc)
        builds.append(built - started)
        writes.append(time.perf_counter() - built)
    return {"ranks": ranks, "keys": keys, "build_s": min(builds), "write_s": min(writes),
            "mb": len(text.encode()) / 1e6, "records": records(doc)}


def merge_prov_stage(ranks: int, keys: int, points_per_key: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-prov-") as tmp:
        run_dir = Path(tmp) / "run"
        make_run(run_dir, ranks, points_per_key * keys, keys)
        found = [merge_in_child(run_dir) for _ in range(2)]
    best = min(found, key=lambda m: m["prov_s"])
    return {"ranks": ranks, "keys": keys, "merge_s": best["seconds"], "prov_s": best["prov_s"],
            "prov_kb": best["prov_kb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 ranks instead of 1,024 (seconds, not minutes)")
    args = parser.parse_args()
    cases = [(8, 2000), (64, 10), (64, 100), (256, 2000)] + ([] if args.quick else [(1024, 2000)])
    print(f"{'ranks':>5} {'keys':>5} {'build s':>8} {'write s':>8} {'MB':>7} {'records':>8}")
    for ranks, keys in cases:
        m = builder(ranks, keys, repeat=1 if ranks >= 1024 else 3)
        print(f"{m['ranks']:>5} {m['keys']:>5} {m['build_s']:>8.3f} {m['write_s']:>8.3f} {m['mb']:>7.2f} "
              f"{m['records']:>8}", flush=True)
    print(f"\n{'ranks':>5} {'keys':>5} {'merge s':>8} {'of it PROV s':>12} {'prov KB':>8}")
    m = merge_prov_stage(8, 2000, 20)
    print(f"{m['ranks']:>5} {m['keys']:>5} {m['merge_s']:>8.3f} {m['prov_s']:>12.3f} {m['prov_kb']:>8.0f}")


if __name__ == "__main__":
    main()
