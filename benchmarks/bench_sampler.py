"""Cost of the system sampler: its thread's CPU, and what it does to a logging hot loop.

    python benchmarks/bench_sampler.py [--seconds 6]

1. The sampler thread's CPU time (its own POSIX thread clock, ns resolution) over a window
   at 1 Hz and 10 Hz, as a share of one core, and per sample; the caller's ``sample_now``.
2. A hot loop of ``SeriesTable.append`` calls (the shape of ``log_metric``'s buffer push)
   with sampling off, at 1 Hz and at 10 Hz, in this one run. Per-call percentiles come from
   timing batches of 16 calls (one call is below the timer's resolution).

The sensors are the real default ones: process and node (psutil), RAPL and NVML where present.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing

from prov4ml_dist.sampling import Sampler  # noqa: E402
from prov4ml_dist.shard import ShardWriter  # noqa: E402
from prov4ml_dist.topology import detect  # noqa: E402

BATCH = 16


def sampler_thread() -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == "prov4ml-sampler")


def thread_cpu_s(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def sampler_cost(writer: ShardWriter, interval: float, seconds: float) -> dict[str, float]:
    """CPU share of one core and CPU per sample, after the sensors are open."""
    sampler = Sampler(writer.system, writer.record, detect(), interval)
    sampler.start()
    time.sleep(min(interval, 1.0))  # discovery and the first tick are not the steady state
    thread = sampler_thread()
    samples0, cpu0, wall0 = sampler.energy_summary()["samples"], thread_cpu_s(thread), time.monotonic()
    time.sleep(seconds)
    samples1, cpu1, wall1 = sampler.energy_summary()["samples"], thread_cpu_s(thread), time.monotonic()
    now_cost = []
    for _ in range(50):
        t0 = time.perf_counter()
        sampler.sample_now()
        now_cost.append(time.perf_counter() - t0)
    sampler.stop()
    cpu = cpu1 - cpu0
    return {"share": cpu / (wall1 - wall0), "per_sample_us": cpu / max(samples1 - samples0, 1) * 1e6,
            "samples": samples1 - samples0, "sample_now_us": statistics.median(now_cost) * 1e6}


def hot_loop(writer: ShardWriter, seconds: float) -> dict[str, float]:
    """Per-call latency of a buffer append with a timestamp, as log_metric does."""
    append, clock, now = writer.metrics.append, time.perf_counter_ns, time.time
    sid = writer.metrics.register("loss", "bench", "")
    per_call = array("d")
    n = 0
    start = clock()
    end = start + int(seconds * 1e9)
    while True:
        t0 = clock()
        for step in range(n, n + BATCH):
            append(sid, step, 0.5, now())
        t1 = clock()
        per_call.append((t1 - t0) / BATCH)
        n += BATCH
        if t1 >= end:
            break
    ordered = sorted(per_call)
    return {"mean": (t1 - start) / n, "p50": ordered[len(ordered) // 2], "p99": ordered[int(len(ordered) * 0.99)],
            "p99.9": ordered[int(len(ordered) * 0.999)], "calls": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each measured window")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp) / "bench.h5", {"run_id": "bench", "rank": 0, "attempt": 0},
                             flush_interval=0.25)
        try:
            print(f"sampler thread CPU ({args.seconds:g} s windows; sensors: process, node, RAPL/NVML if present)")
            print(f"{'rate':>6} {'samples':>8} {'% of a core':>12} {'µs CPU/sample':>14} {'sample_now µs':>14}")
            for hz in (1, 10):
                cost = sampler_cost(writer, 1 / hz, args.seconds)
                print(f"{hz:>4} Hz {cost['samples']:>8} {cost['share'] * 100:>11.3f}% {cost['per_sample_us']:>14.0f} "
                      f"{cost['sample_now_us']:>14.0f}")

            window = args.seconds / 2
            print(f"\nhot loop: SeriesTable.append(sid, step, value, time.time()), {window:g} s per row, ns per call")
            print(f"{'sampling':>10} {'calls':>10} {'mean':>7} {'p50':>7} {'p99':>7} {'p99.9':>7}")
            for label, interval in (("off", None), ("1 Hz", 1.0), ("10 Hz", 0.1), ("off", None)):
                sampler = None
                if interval is not None:
                    sampler = Sampler(writer.system, writer.record, detect(), interval)
                    sampler.start()
                    time.sleep(0.2)
                result = hot_loop(writer, window)
                if sampler is not None:
                    sampler.stop()
                print(f"{label:>10} {result['calls']:>10} {result['mean']:>7.0f} {result['p50']:>7.0f} "
                      f"{result['p99']:>7.0f} {result['p99.9']:>7.0f}")
        finally:
            writer.close()


if __name__ == "__main__":
    main()
