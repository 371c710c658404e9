"""Check the sampler on a machine with an NVIDIA GPU; exits 0 with a message where there is none.

    python benchmarks/gpu_check.py [--seconds 5] [--interval 0.1] [--calls 200]

1. The cost of each NVML call the GPU sensor makes (µs, median of --calls; the energy counter
   is known to take ~4 ms, so it gets a tenth as many calls).
2. The Sampler, with its default sensors, writing into a real shard for --seconds while
   torch (when it has CUDA) keeps this rank's GPU busy with matmuls; then what was sampled
   (series, rows, last values, sensor records) read back from the shard.
3. The energy of each GPU over the same window by the NVML counter and by integrating polled
   power; exit 1 if a GPU sensor recorded nothing or the two disagree by more than 25 %.

Needs only torch, h5py, psutil, nvidia-ml-py and numpy (prov4ml_dist.sampling and .shard do not
import prov).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing

MAX_DISAGREEMENT = 0.25


def nvml_or_exit() -> Any:
    """pynvml, initialised; or a clear message and exit 0 where there is no NVIDIA GPU."""
    try:
        import pynvml
    except ImportError:
        sys.exit("gpu_check: nvidia-ml-py is not installed (pip install nvidia-ml-py); nothing to check")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        print(f"gpu_check: no NVIDIA GPU here (NVML: {exc}); nothing to check.")
        sys.exit(0)
    if pynvml.nvmlDeviceGetCount() == 0:
        print("gpu_check: NVML found no GPU; nothing to check.")
        sys.exit(0)
    return pynvml


def median_us(fn: Callable[[], Any], calls: int) -> float | str:
    try:
        fn()
    except Exception as exc:
        return f"unavailable ({exc})"
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000


def nvml_costs(pynvml: Any, calls: int) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    probes: dict[str, tuple[Callable[[], Any], int]] = {
        "nvmlDeviceGetUtilizationRates": (lambda: pynvml.nvmlDeviceGetUtilizationRates(h), calls),
        "nvmlDeviceGetMemoryInfo": (lambda: pynvml.nvmlDeviceGetMemoryInfo(h), calls),
        "nvmlDeviceGetPowerUsage": (lambda: pynvml.nvmlDeviceGetPowerUsage(h), calls),
        "nvmlDeviceGetTemperature": (lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU), calls),
        "nvmlDeviceGetClockInfo(SM)": (lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM), calls),
        "nvmlDeviceGetTotalEnergyConsumption": (lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h),
                                                max(calls // 10, 5)),
    }
    print(f"GPU 0: {pynvml.nvmlDeviceGetName(h)}, driver {pynvml.nvmlSystemGetDriverVersion()}")
    print(f"\n{'NVML call':<40} {'calls':>6} {'median µs':>12}")
    for name, (fn, n) in probes.items():
        cost = median_us(fn, n)
        print(f"{name:<40} {n:>6} {cost:>12.1f}" if isinstance(cost, float) else f"{name:<40} {n:>6} {cost}")


def keep_gpu_busy(stop: threading.Event) -> tuple[str, threading.Thread | None]:
    """Start matmuls on this rank's GPU in a thread; says what it does. Join the thread after
    setting stop: a CUDA thread still running at interpreter exit aborts the process."""
    try:
        import torch
    except ImportError:
        return "torch not installed: the GPU idles", None
    if not torch.cuda.is_available():
        return "torch has no CUDA: the GPU idles", None
    torch.cuda.set_device(0)  # before the sampler starts: it reads the current device then
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def work() -> None:
        while not stop.is_set():
            for _ in range(20):
                a @ a  # noqa: B018 - the work is the point
            torch.cuda.synchronize()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    return f"bf16 8192² matmuls on {torch.cuda.get_device_name(0)}", worker


def run_sampler(seconds: float, interval: float) -> int:
    from prov4ml_dist.sampling import Sampler
    from prov4ml_dist.shard import ShardReader, ShardWriter
    from prov4ml_dist.topology import detect

    stop = threading.Event()
    load, worker = keep_gpu_busy(stop)
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp) / "gpu.h5", {"run_id": "gpu_check", "rank": 0, "attempt": 0})
        sampler = Sampler(writer.system, writer.record, detect(), interval)
        print(f"\nsampling every {interval:g} s for {seconds:g} s; load: {load}")
        sampler.start()
        time.sleep(seconds)
        sampler.stop()
        stop.set()
        if worker is not None:
            worker.join()
        writer.close()
        with ShardReader(writer.path) as reader:
            records = list(reader.records())
            declared = reader.series("system")
            table = reader.read_table("system")

    print("\nsensors:")
    for r in (r for r in records if r["kind"] == "sensor"):
        detail = r.get("gpu_name") and (f"{r['gpu_name']} {r['uuid']} pci {r['pci_bus_id']}, "
                                        f"energy by {r['energy_method']}")
        print(f"  {r['name']:<8} {'ok' if r['available'] else 'unavailable'}: {detail or r.get('reason') or ''}"
              + (f"; unavailable: {r['unavailable']}" if r.get("unavailable") else ""))
    print(f"\n{'series':<28} {'unit':>5} {'rows':>6} {'last':>16}")
    for sid, d in sorted(declared.items()):
        rows = table[table["series"] == sid]
        print(f"{d['key']:<28} {d['unit']:>5} {len(rows):>6} {rows['value'][-1] if len(rows) else float('nan'):>16.6g}")
    for w in (r for r in records if r["kind"] == "warning"):
        print(f"WARNING {w['where']}: {w['message']}")

    (energy,) = [r for r in records if r["kind"] == "energy"]
    failures = 0
    print(f"\n{'GPU':<6} {'method':<17} {'counter J':>10} {'integrated J':>13} {'window s':>9} {'mean W':>8} "
          f"{'diff':>7}")
    for g in energy["gpus"]:
        counter = g["joules"] if g["method"] == "counter" else None
        integrated = g.get("joules_integrated", g["joules"] if g["method"] == "integrated_power" else None)
        diff = (counter - integrated) / integrated if counter and integrated else None
        mean_w = g["joules"] / g["seconds"] if g["joules"] and g["seconds"] else float("nan")
        print(f"{g['index']:<6} {g['method'] or 'none':<17} {counter or float('nan'):>10.1f} "
              f"{integrated or float('nan'):>13.1f} {g['seconds'] or float('nan'):>9.2f} {mean_w:>8.1f} "
              + (f"{diff:>+7.1%}" if diff is not None else f"{'-':>7}"))
        if g["joules"] is None or "error" in g or (diff is not None and abs(diff) > MAX_DISAGREEMENT):
            failures += 1
    if not energy["gpus"]:
        print("no GPU was sampled by this rank")
        failures += 1
    print("\nRAPL:", ", ".join(f"{r['domain']} {r['joules']:.1f} J" for r in energy["rapl"]) or "none")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    pynvml = nvml_or_exit()
    try:
        nvml_costs(pynvml, args.calls)
    finally:
        pynvml.nvmlShutdown()
    sys.exit(run_sampler(args.seconds, args.interval))


if __name__ == "__main__":
    main()
