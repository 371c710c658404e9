"""Shared tools of the fault-injection, hostile-input and security tests: launching ranks of
``scripts/fault_worker.py`` as plain processes or under torchrun, reading their shards and
the merge back, running untrusted-input work in a process with bounded memory and time,
and recording the figures the README's "Guarantees" section quotes.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from prov4ml_dist.run import Run, RunConfig
from prov4ml_dist.shard import ShardReader, schema
from prov4ml_dist.topology import Topology

from .conftest import BIN, child_env

SCRIPTS = Path(__file__).parent / "scripts"
WORKER = SCRIPTS / "fault_worker.py"
BOUNDED = SCRIPTS / "fault_bounded.py"
EXPERIMENT = "faults"
# A flush can start late on a loaded 2-core machine: the slack on top of flush_interval.
SCHEDULING_SLACK_S = 1.0
# The loss bound: the newest point in a killed rank's shard is at most flush_interval old, plus
# one flush's own time and the scheduling delay of a loaded 2-core machine (was 1.0 s; measured
# with flush_interval 0.1 s at load 9: windows of 0.091 s and 0.148 s at most, 0.207 s before
# flushes started flush_interval apart).
LOSS_SLACK_S = 0.25
# Figures (loss windows, hang bounds) go to this JSON Lines file when the variable is set.
FIGURES_ENV = "PROV4ML_FAULT_FIGURES"


def report(test: str, **figures: Any) -> None:
    """Record figures of a test run (for the README), when PROV4ML_FAULT_FIGURES names a file."""
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"test": test, **figures}) + "\n")


@dataclass
class Worker:
    """One rank of ``fault_worker.py``; its stderr goes to a file (a full pipe would block it)."""

    rank: int
    proc: subprocess.Popen
    stderr_path: Path
    result: dict[str, Any] | None = field(default=None)
    stdout: str = ""

    def ready(self, timeout: float = 60.0) -> None:
        """Wait for the worker's ``ready`` line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if readable:
                line = self.proc.stdout.readline()
                if line.strip() == "ready":
                    return
                if not line:
                    break
        raise AssertionError(f"rank {self.rank} never became ready (rc={self.proc.poll()}): {self.stderr()[-2000:]}")

    def finish(self, timeout: float) -> int:
        """Wait for the exit; keeps the worker's final JSON line in ``result``; the return code.
        Reads through the text wrapper: ``ready``'s readline may already hold later lines in its
        buffer (a worker that finished before the test read its ``ready``), which
        ``communicate(timeout=...)``, reading the descriptor, would miss."""
        self.proc.wait(timeout=timeout)
        out = self.stdout = self.proc.stdout.read()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        self.result = json.loads(lines[-1]) if lines else None
        return self.proc.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def rank_env(rank: int, world_size: int, **extra: str) -> dict[str, str]:
    """The variables a launcher gives rank ``rank`` (torchrun's names, no TORCHELASTIC_RUN_ID)."""
    return child_env(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                     LOCAL_WORLD_SIZE=str(world_size), **extra)


@contextlib.contextmanager
def launch(tmp: Path, save_dir: Path, world_size: int, args_of_rank: Sequence[Sequence[str]] | None = None,
           env: dict[str, str] | None = None, ranks: Sequence[int] | None = None) -> Iterator[list[Worker]]:
    """The workers of ``ranks`` (default: all) of a ``world_size`` job, as plain processes; a
    job without all its ranks ends without a merge. Every one still running at the end is killed."""
    workers = []
    try:
        for rank in range(world_size) if ranks is None else ranks:
            args = list(args_of_rank[rank]) if args_of_rank else []
            err = tmp / f"rank-{rank}.{time.monotonic_ns()}.err"
            with open(err, "w") as stderr:
                proc = subprocess.Popen([sys.executable, str(WORKER), str(save_dir), *args], stdout=subprocess.PIPE,
                                        stderr=stderr, text=True, env=rank_env(rank, world_size, **(env or {})))
            workers.append(Worker(rank, proc, err))
        yield workers
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.proc.wait(timeout=30)
            worker.proc.stdout.close()


def torchrun(save_dir: Path, nproc: int, worker_args: Sequence[str], *torchrun_args: str,
             timeout: float = 120.0) -> subprocess.CompletedProcess:
    """A real torchrun job of ``fault_worker.py`` on this machine."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *torchrun_args, str(WORKER),
           str(save_dir), *worker_args]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)


def run_dirs(save_dir: Path) -> list[Path]:
    return sorted((save_dir / EXPERIMENT).iterdir())


@dataclass(frozen=True)
class Shard:
    """What a test checks of one shard, read with ``ShardReader`` (which must open it)."""

    recovered: bool
    attrs: dict[str, Any]
    end: dict[str, Any] | None
    warnings: list[dict[str, Any]]
    rows: np.ndarray  # the metrics table


def read_shard(path: Path) -> Shard:
    with ShardReader(path) as reader:
        return Shard(reader.recovered, reader.attrs, reader.end_record(), list(reader.records("warning")),
                     reader.read_table("metrics"))


def merged_counts(merged_h5: Path, key: str = "loss") -> dict[tuple[int, int], int]:
    """Points of ``key`` per (rank, attempt) in ``merged.h5``."""
    with h5py.File(merged_h5, "r") as f:
        series = f["metrics/series"][()]
    return {(int(s["rank"]), int(s["attempt"])): int(s["count"]) for s in series
            if s["key"].decode() == key}


def merged_ranks(merged_h5: Path) -> list[tuple[int, int, str]]:
    """(rank, attempt, status) rows of ``merged.h5``."""
    with h5py.File(merged_h5, "r") as f:
        return [(int(r["rank"]), int(r["attempt"]), r["status"].decode()) for r in f["ranks"][()]]


def bounded(args: Sequence[str], timeout: float = 120.0, memory_bytes: int = 3 << 30,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A Python child with at most ``memory_bytes`` of address space and ``timeout`` seconds:
    what untrusted input makes the library do cannot take the machine down with it."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=child_env(),
                          timeout=timeout, preexec_fn=limit, cwd=cwd)


def bounded_outcomes(action: str, paths: Sequence[Path], timeout: float = 300.0) -> list[dict[str, Any]]:
    """``fault_bounded.py ACTION PATH...`` in a bounded child: one outcome per path, in order."""
    proc = bounded([str(BOUNDED), action, *map(str, paths)], timeout=timeout)
    assert proc.returncode == 0, f"rc={proc.returncode}: {proc.stderr[-3000:]}"
    outcomes = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [o["path"] for o in outcomes] == list(map(str, paths))
    return outcomes


def crashes(outcomes: Sequence[dict[str, Any]], known: Sequence[str] = ()) -> list[str]:
    """The outcomes that are neither a success nor a ``Prov4MLError``, less the ``known`` bugs
    (message fragments of crashes that have their own strict-xfail test)."""
    return [f"{o['path']}: {o['type']}: {o['message']}" for o in outcomes
            if o["outcome"] == "crash" and not any(k in (o["message"] or "") for k in known)]


def files_under(root: Path) -> dict[str, tuple[int, float] | None]:
    """Every path below ``root`` (links not followed): a file's size and mtime; None for a
    directory (whose mtime changes with what is made inside it)."""
    found: dict[str, tuple[int, float] | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            found[str(path.relative_to(root))] = None if name in dirnames else (st.st_size, st.st_mtime)
    return found


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at ``path`` (needs root and mount permission; the test is skipped otherwise)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip() or mount.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def merged_points(merged_h5: Path) -> dict[tuple[str, str, int], list[tuple[int, float]]]:
    """(key, context, rank) → its (step, value) points, in logging order, from ``merged.h5``."""
    with h5py.File(merged_h5, "r") as f:
        series, rows = f["metrics/series"][()], f["metrics/rows"][()]
    points = {}
    for s in series:
        part = rows[s["row_start"]:s["row_stop"]]
        points[(s["key"].decode(), s["context"].decode(), int(s["rank"]))] = list(
            zip(part["step"].tolist(), part["value"].tolist(), strict=True))
    return points


def start_record(run_id: str, rank: int = 0, world_size: int = 2, **extra: Any) -> dict[str, Any]:
    return {"kind": "start", "time": 1.7e9, "run_id": run_id, "experiment_name": "crafted",
            "user_namespace": "http://example.org/", "topology": {"rank": rank, "world_size": world_size},
            "environment": {"user": "mallory"}, "settings": {}, **extra}


def craft_shard(path: Path, *, attrs: dict[str, Any] | None = None, records: Sequence[dict[str, Any]] = (),
                raw_journal: bytes = b"", rows: np.ndarray | None = None) -> Path:
    """A shard written with plain h5py, byte for byte what a hostile or buggy writer could
    leave: any attributes, any journal bytes, any rows. The layout is the schema's unless
    ``attrs`` says otherwise."""
    fields = {"format": schema.FORMAT, "schema_version": schema.SCHEMA_VERSION, "run_id": "crafted", "rank": 0,
              "attempt": 0, "created": 1.7e9, **(attrs or {})}
    journal = b"".join(json.dumps(r).encode() + b"\n" for r in records) + raw_journal
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", libver="latest") as f:
        for key, value in fields.items():
            if value is not None:
                f.attrs[key] = value
        for name in schema.TABLES:
            data = rows if name == "metrics" and rows is not None else np.empty(0, dtype=schema.ROW_DTYPE)
            f.create_dataset(name, data=data, maxshape=(None,), chunks=(schema.TABLE_CHUNK_ROWS,))
        f.create_dataset(schema.JOURNAL, data=np.frombuffer(journal, dtype="u1"), maxshape=(None,),
                         chunks=(schema.JOURNAL_CHUNK_BYTES,))
    return path


def rows_of(points: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """Table rows (series, step, value) at increasing times."""
    rows = np.zeros(len(points), dtype=schema.ROW_DTYPE)
    for i, (series, step, value) in enumerate(points):
        rows[i] = (series, step, value, 1.7e9 + i)
    return rows


def genuine_runs(save_dir: Path, run_id: str, world_size: int = 2, points: int = 3000) -> list[Run]:
    """The open ``Run`` of every rank of a small real run (params, points, an artifact)."""
    runs = [Run(RunConfig(experiment_name=EXPERIMENT, provenance_save_dir=save_dir, run_id=run_id,
                          sample_interval=None), Topology(rank=rank, world_size=world_size))
            for rank in range(world_size)]
    for run in runs:
        run.log_param("lr", 0.1)
        for step in range(points):
            run.log_metric("loss", float(step), "TRAINING", step)
        run.log_artifact("note.txt", b"hello", "TRAINING")
    return runs


def signal_trials(tmp_path: Path, trials: int, seed: int, signal_name: str = "SIGTERM",
                  flush_every: int = 64) -> tuple[list[dict], str]:
    """``scripts/sigterm_trials.py``: ``trials`` ranks, 4 at a time, each sent ``signal_name``
    at a random moment while it logs; one outcome per trial (see the script) and its stderr."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "sigterm_trials.py"), str(tmp_path / "prov"), str(trials),
                           "4", str(seed), signal_name, str(flush_every)],
                          capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr
