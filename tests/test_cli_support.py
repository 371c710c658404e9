"""Helpers for the CLI tests (no tests here): running the console script, writing runs
in-process with the real Run and merge, and reading points back from shards and merged.h5."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import prov4ml_dist as prov4ml
from prov4ml_dist.merge import layout, merge_run
from prov4ml_dist.run import Run, RunConfig
from prov4ml_dist.shard import ShardReader, schema
from prov4ml_dist.topology import Topology

from .conftest import BIN, child_env

CLI = str(BIN / "prov4ml-dist")
RUN_ID = "fab-1"


def cli(*args: object, env: dict[str, str] | None = None, timeout: float = 120, **kwargs: Any
        ) -> subprocess.CompletedProcess:
    """The real console script, as a user runs it (stdout and stderr are pipes, not a TTY)."""
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else child_env(), **kwargs)


def write_run(save_dir: Path, ranks: int, *, steps: int = 40, run_id: str = RUN_ID, outlier: int | None = None,
              local_dir: Path | None = None, merge: bool = True, gpu: bool = False,
              params_of: Callable[[int], dict[str, Any]] | None = None) -> Path:
    """A job of ``ranks`` ranks (4 per node) written by real ``Run`` objects, merged as rank 0
    would at end_run; returns the run directory. ``gpu`` adds what the NVML sensor would
    record: power, utilisation and energy series of one GPU per rank, and energy totals;
    ``params_of(rank)`` are more params that rank logs."""
    run_dir = None
    for r in range(ranks):
        topology = Topology(rank=r, world_size=ranks, local_rank=r % 4, local_world_size=min(4, ranks),
                            node_rank=r // 4, launcher="torchrun", hostname=f"node{r // 4}", pid=1000 + r)
        run = Run(RunConfig(experiment_name="fab", provenance_save_dir=save_dir, run_id=run_id, sample_interval=None,
                            flush_interval=3600, local_dir=local_dir / f"rank-{r}" if local_dir else None), topology)
        run.log_param("lr", 0.1)
        for key, value in (params_of(r) if params_of else {}).items():
            run.log_param(key, value)
        for s in range(steps):
            value = 1.0 / (s + 1) + 0.01 * r + (5.0 if r == outlier and s == steps - 1 else 0.0)
            run.log_metric("loss", value, prov4ml.Context.TRAINING, step=s)
        run.log_metric("val_acc", 0.5 + 0.01 * r, prov4ml.Context.VALIDATION, step=0)
        run.log_artifact("note.txt", f"rank {r}\n".encode(), prov4ml.Context.TRAINING)
        run.log_artifact("shared.json", {"same": True}, prov4ml.Context.TRAINING)
        if gpu:
            _gpu(run, r)
        run.close()
        run_dir = run.run_dir
    if merge:
        merge_run(run_dir, world_size=ranks)
    return run_dir


def _gpu(run: Run, rank: int) -> None:
    t0 = run.started
    for key, unit, value in (("gpu_power", "W", 200.0), ("gpu_utilization", "%", 90.0), ("gpu_energy", "J", 0.0)):
        sid = run.writer.system.register(key, "system", "SYSTEM_METRIC", unit=unit, scope="gpu",
                                         device=f"GPU-{rank:04d}-aaaa")
        for i in range(30):
            run.writer.system.append(sid, i, value + (100.0 * i if unit == "J" else 5.0 * np.sin(i + rank)),
                                     t0 + 0.5 * i)
    run.writer.record({"kind": "energy", "time": t0 + 15, "rank": rank, "samples": 30, "rapl": [],
                       "gpus": [{"uuid": f"GPU-{rank:04d}-aaaa", "method": "counter", "joules": 3000.0 + rank}],
                       "gpu_joules": 3000.0 + rank, "rapl_joules": 0.0})


def shard_points(shard: Path) -> dict[tuple, np.ndarray]:
    """(table, key, context, source) → the (step, value, time) rows a shard holds, by ShardReader."""
    found = {}
    with ShardReader(shard) as reader:
        for table in schema.TABLES:
            rows = reader.read_table(table)
            for ident, decl in reader.series(table).items():
                mine = rows[rows["series"] == ident]
                if len(mine):
                    found[(table, decl["key"], decl.get("context") or "", decl.get("source") or "")] = _points(mine)
    return found


def merged_points(merged_h5: Path, rank: int) -> dict[tuple, np.ndarray]:
    """The same, for one rank, from merged.h5."""
    found = {}
    with h5py.File(merged_h5, "r") as f:
        for table in schema.TABLES:
            rows = f[table][layout.ROWS]
            for s in f[table][layout.SERIES][()]:
                if s["rank"] == rank and s["row_stop"] > s["row_start"]:
                    key = (table, *(s[n].decode() for n in ("key", "context", "source")))
                    found[key] = _points(rows[s["row_start"]:s["row_stop"]])
    return found


def _points(rows: np.ndarray) -> np.ndarray:
    return np.stack([rows["step"].astype(float), rows["value"], rows["time"]], axis=1)


def assert_same_points(a: dict[tuple, np.ndarray], b: dict[tuple, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def merged_content(path: Path) -> dict[str, Any]:
    """Every dataset and attribute of merged.h5 as comparable values, without the merge stamp."""
    content: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        content["/"] = {k: _plain(v) for k, v in f.attrs.items() if k != layout.STAMP_ATTR}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                fields = data.dtype.names or (None,)
                content[name] = {field: _plain(data[field] if field else data) for field in fields}

        f.visititems(visit)
    return content


def _plain(value: Any) -> Any:
    """NaN-safe, decoded values (NaN becomes the string 'nan' so equal files compare equal)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, float) and np.isnan(value):
        return "nan"
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


def prov_structure(prov_json: Path) -> dict[str, Any]:
    """prov.json with relations compared by content (their blank-node ids are counters), less
    the merge activity's own record and its association/communication, which say who merged when."""
    doc = json.loads(prov_json.read_text())
    doc["activity"].pop("run:merge")
    for section in ("wasAssociatedWith", "wasInformedBy"):
        doc[section] = {k: r for k, r in doc[section].items() if "run:merge" not in (
            r.get("prov:activity"), r.get("prov:informed"))}
    return {section: records if section in ("prefix", "entity", "activity", "agent")
            else sorted(json.dumps(r, sort_keys=True) for r in records.values())
            for section, records in doc.items()}


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """``path`` cannot be written into, even by root (who ignores permission bits): the
    immutable attribute for root, the permission bits otherwise."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root, and chattr +i is not available to make a directory unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
