"""Streaming a file from rank 1 to rank 0 (no shared filesystem) against a plain file copy,
and rank 0's memory while it streams a file much bigger than a chunk.

    python benchmarks/bench_transport.py [--size-mib 512] [--quick]

Two local ranks: ``torchrun --standalone --nproc_per_node=2`` with a gloo process group
(the transport uses torch.distributed's store, hosted by torchrun's agent), and
``mpiexec -n 2`` (MPICH). Rank 1 sends with ``send_files``, rank 0 receives with
``receive_files`` (sha256 verified, written under a temporary name, renamed). ``copy`` is
``shutil.copyfile`` of the same file; ``gloo p2p`` is ``dist.send``/``dist.recv`` of the same
bytes from memory, without files or hashing: what a point-to-point data plane could reach.
RSS growth is the peak resident set during the transfer minus the one before it, sampled
every 5 ms (rank 0, and torchrun's agent, which hosts the store's chunks in flight).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
MIB = 1 << 20


class PeakRss:
    """The highest RSS of some processes while the block runs, above what it was on entry."""

    def __init__(self, *pids: int) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.base = [p.memory_info().rss for p in self.procs]
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            for i, p in enumerate(self.procs):
                self.peak[i] = max(self.peak[i], p.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth_mib(self) -> list[float]:
        return [(peak - base) / MIB for peak, base in zip(self.peak, self.base, strict=True)]


def worker(source: Path, size: int, chunk_mib: int, out: Path) -> None:
    """One rank of the benchmark, under torchrun or mpiexec."""
    from prov4ml_dist.artifacts import sha256_file
    from prov4ml_dist.topology import detect
    from prov4ml_dist.transport import FileSpec, connect, receive_files, send_files

    p2p = "TORCHELASTIC_RUN_ID" in os.environ
    if p2p:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    else:
        from mpi4py import MPI  # noqa: F401 - an MPI program initialises MPI first
    topology = detect()
    sha = sha256_file(source)[0] if topology.rank == 0 else ""
    result: dict = {}
    with connect(topology, f"bench-{chunk_mib}", timeout=60) as transport:
        transport.barrier(60)
        if topology.rank == 1:
            send_files(transport, 0, [(source, size)], 60, 60, chunk_size=chunk_mib * MIB)
        else:
            target = out.parent / f"received-{chunk_mib}.bin"
            watched = [os.getpid()] + ([os.getppid()] if p2p else [])
            with PeakRss(*watched) as rss:
                start = time.perf_counter()
                outcome = receive_files(transport, 1, [FileSpec(target, size, sha)], 60)[0]
                seconds = time.perf_counter() - start
            assert outcome is None, outcome
            target.unlink()
            result = {"transport": transport.name, "seconds": seconds, "rss_mib": rss.growth_mib()}
        transport.barrier(60)
    if p2p and chunk_mib == 4:
        result["p2p_seconds"] = gloo_p2p(dist, topology.rank, size, chunk_mib * MIB)
    if topology.rank == 0:
        out.write_text(json.dumps(result))


def gloo_p2p(dist, rank: int, size: int, chunk: int) -> float:
    import torch

    buf = torch.empty(chunk, dtype=torch.uint8)
    dist.barrier()
    start = time.perf_counter()
    for offset in range(0, size, chunk):
        part = buf[:min(chunk, size - offset)]
        if rank == 1:
            dist.send(part, 0)
        else:
            dist.recv(part, 1)
    return time.perf_counter() - start


def launch(kind: str, source: Path, size: int, chunk_mib: int, out: Path) -> dict:
    args = [str(Path(__file__).resolve()), "--worker", str(source), str(size), str(chunk_mib), str(out)]
    if kind == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *args]
    else:
        cmd = [str(BIN / "mpiexec"), "-n", "2", sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="64 MiB, 4 MiB chunks only")
    p.add_argument("--worker", nargs=4, metavar=("SOURCE", "SIZE", "CHUNK_MIB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        source, size, chunk, out = args.worker
        worker(Path(source), int(size), int(chunk), Path(out))
        return
    size = (64 if args.quick else args.size_mib) * MIB
    chunks = [4] if args.quick else [1, 4]
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        source = Path(tmp) / "source.bin"
        with open(source, "wb") as f:
            for _ in range(size // MIB):
                f.write(os.urandom(MIB))
        start = time.perf_counter()
        shutil.copyfile(source, Path(tmp) / "copy.bin")
        copy_s = time.perf_counter() - start
        (Path(tmp) / "copy.bin").unlink()
        print(f"file: {size // MIB} MiB; {os.cpu_count()} CPUs; MB = 1e6 bytes")
        print(f"{'method':<26}{'chunk':>7}{'seconds':>9}{'MB/s':>8}{'rank-0 RSS +MiB':>17}{'agent RSS +MiB':>16}")
        print(f"{'copy (shutil.copyfile)':<26}{'-':>7}{copy_s:>9.2f}{size / copy_s / 1e6:>8.0f}{'-':>17}{'-':>16}")
        p2p = None
        for kind in ("torchrun", "mpiexec"):
            for chunk in chunks:
                r = launch(kind, source, size, chunk, Path(tmp) / f"{kind}-{chunk}.json")
                rss = r["rss_mib"]
                agent = f"{rss[1]:.0f}" if len(rss) > 1 else "-"
                label = "stream, torch store (gloo)" if kind == "torchrun" else "stream, MPI"
                print(f"{label:<26}{chunk:>5}Mi{r['seconds']:>9.2f}{size / r['seconds'] / 1e6:>8.0f}"
                      f"{rss[0]:>17.0f}{agent:>16}")
                p2p = r.get("p2p_seconds", p2p)
        if p2p:
            print(f"{'gloo p2p, memory only':<26}{4:>5}Mi{p2p:>9.2f}{size / p2p / 1e6:>8.0f}{'-':>17}{'-':>16}")


if __name__ == "__main__":
    main()
