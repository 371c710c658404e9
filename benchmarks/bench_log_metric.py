"""Cost of ``log_metric``: per-call latency, start/end time, memory and bytes on disk.

    python benchmarks/bench_log_metric.py [--points 1e4 1e5 1e6] [--repeat 3] [--rss-points 1e7]

Every figure is measured in this one run beside a no-op function of the same signature (the
floor of a Python call here, and of this machine's noise: the no-op's stalls are the other
processes' and the OS's) and beside yProv4ML when it is installed, ``--repeat`` times, the
tools interleaved. The median and p99 per call come from timing batches of 16 calls with
perf_counter_ns (a clock read costs about as much as a call); the mean from timing the whole
loop. ``max ms``: the slowest batch of 16, an upper bound of the slowest single call (the other
15 take microseconds); ``>2ms``: batches that took over 2 ms, i.e. the calls that stalled that
long (a batch holding two of them counts once). ``waits``: logging calls that found the crash
ring full and waited for the flusher (back-pressure; -1 where not recorded). ``prov4ml_dist``
is the default (the shard written by a drain process, ``shard/drain.py``), ``… thread only``
the same with ``PROV4ML_DRAIN_PROCESS=off`` (the flusher thread shares the GIL with the loop).
"""

from __future__ import annotations

import argparse
import bisect
import importlib.util
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BATCH = 16
STALL_NS = 2_000_000
KEYS = [f"metric_{i}" for i in range(4)]


def noop(key, value, context, step=None, source=None):  # noqa: ANN001, ARG001 - the floor
    return None


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_calls(fn: Callable, contexts: list, n: int) -> dict[str, float]:
    """Mean over the whole loop; median/p99 per call from batches of BATCH calls; the slowest
    batch (ms) and the batches over STALL_NS."""
    batches: list[int] = []
    clock = time.perf_counter_ns
    start = clock()
    i = 0
    while i < n:
        t0 = clock()
        for j in range(i, i + BATCH):
            fn(KEYS[j & 3], 0.5 * j, contexts[(j >> 2) & 1], j)
        batches.append(clock() - t0)
        i += BATCH
    mean = (clock() - start) / n / 1000
    batches.sort()
    return {"mean": mean, "median": statistics.median(batches) / BATCH / 1000,
            "p99": batches[int(len(batches) * 0.99)] / BATCH / 1000, "max_ms": batches[-1] / 1e6,
            "stalls": len(batches) - bisect.bisect_right(batches, STALL_NS)}


def bench_prov4ml_dist(n: int, root: Path, drain_process: str = "on") -> dict[str, float]:
    """``drain_process``: ``on`` (the default: the shard written by a drain process), ``off``
    (by the flusher thread, which shares the GIL with the loop)."""
    import prov4ml_dist as prov4ml
    from prov4ml_dist.shard import drain

    os.environ[drain.ENV] = drain_process
    contexts = [prov4ml.Context.TRAINING, prov4ml.Context.VALIDATION]
    t0 = time.perf_counter()
    run_dir = prov4ml.start_run(experiment_name="bench", provenance_save_dir=root, sample_interval=None)
    started = time.perf_counter() - t0
    rss0 = rss_mb()
    result = time_calls(prov4ml.log_metric, contexts, n)
    rss1 = rss_mb()
    t0 = time.perf_counter()
    shard = prov4ml.api.get_active_run().shard_path
    prov4ml.end_run()
    result.update(start_ms=started * 1000, end_s=time.perf_counter() - t0, rss_growth_mb=rss1 - rss0,
                  disk_mb=sum(p.stat().st_size for p in Path(run_dir).rglob("*") if p.is_file()) / 2**20,
                  waits=ring_waits(shard))
    return result


def ring_waits(shard: Path) -> int:
    """Logging calls that found the crash ring full and waited for the flusher (back-pressure)."""
    from prov4ml_dist.shard import ShardReader

    with ShardReader(shard) as reader:
        end = reader.end_record() or {}
    return int((end.get("ring_waits") or {}).get("metrics", -1))


def bench_yprov4ml(n: int, root: Path) -> dict[str, float] | None:
    if importlib.util.find_spec("yprov4ml") is None:
        return None
    import yprov4ml

    context = getattr(yprov4ml, "Context", None)  # 2.x has the enum; 3.x takes strings
    contexts = [context.TRAINING, context.VALIDATION] if context else ["training", "validation"]
    t0 = time.perf_counter()
    yprov4ml.start_run(prov_user_namespace="http://example.org", experiment_name="bench",
                       provenance_save_dir=str(root))
    started = time.perf_counter() - t0
    rss0 = rss_mb()
    result = time_calls(yprov4ml.log_metric, contexts, n)
    rss1 = rss_mb()
    t0 = time.perf_counter()
    yprov4ml.end_run(create_graph=False, create_svg=False)
    result.update(start_ms=started * 1000, end_s=time.perf_counter() - t0, rss_growth_mb=rss1 - rss0,
                  disk_mb=float("nan"))
    return result


def rss_growth(n: int, root: Path) -> float:
    """RSS growth over ``n`` points after a warm-up of 1e5 points more than the crash ring holds
    (allocator arenas settle first, and the ring's pages, shared file pages counted in RSS, are
    all touched: a fixed 10 MiB, not growth)."""
    import prov4ml_dist as prov4ml
    from prov4ml_dist.shard import ring

    prov4ml.start_run(experiment_name="rss", provenance_save_dir=root, sample_interval=None)
    log = prov4ml.log_metric
    ctx = prov4ml.Context.TRAINING
    for i in range(ring.CAPACITY["metrics"] + 100_000):
        log("loss", 0.1, ctx, i)
    before = rss_mb()
    for i in range(n):
        log(KEYS[i & 3], 0.1, ctx, i)
    after = rss_mb()
    prov4ml.end_run()
    return after - before


def print_row(name: str, n: int, r: dict[str, float] | None) -> None:
    if r is None:
        print(f"{name:<14}{n:>10}   (not installed)")
        return
    line = f"{name:<14}{n:>10}{r['mean']:>9.3f}{r['median']:>8.3f}{r['p99']:>8.3f}{r['max_ms']:>8.2f}{r['stalls']:>6}"
    if "start_ms" in r:
        line += (f"{r['start_ms']:>10.1f}{r['end_s']:>8.3f}{r['rss_growth_mb']:>9.1f}{r['disk_mb']:>9.1f}"
                 f"{r.get('waits', -1):>7}")
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, the tools interleaved")
    parser.add_argument("--rss-points", type=float, default=1e7, help="0 to skip the RSS test")
    args = parser.parse_args()
    header = f"{'tool':<14}{'points':>10}{'mean µs':>9}{'median':>8}{'p99':>8}{'max ms':>8}{'>2ms':>6}" \
             f"{'start ms':>10}{'end s':>8}{'ΔRSS MB':>9}{'disk MB':>9}{'waits':>7}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for points in args.points:
            n = int(points) // BATCH * BATCH
            for rep in range(args.repeat):
                rows = [("no-op call", time_calls(noop, [0, 1], n)),
                        ("prov4ml_dist", bench_prov4ml_dist(n, Path(tmp) / f"p{n}-{rep}")),
                        ("… thread only", bench_prov4ml_dist(n, Path(tmp) / f"t{n}-{rep}", "off")),
                        ("yProv4ML", bench_yprov4ml(n, Path(tmp) / f"y{n}-{rep}"))]
                for name, r in rows:
                    print_row(name, n, r)
        if args.rss_points:
            n = int(args.rss_points)
            growth = rss_growth(n, Path(tmp) / "rss")
            print(f"\nRSS growth over {n:.0e} points (after a warm-up of the crash ring + 1e5): {growth:.1f} MB")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
