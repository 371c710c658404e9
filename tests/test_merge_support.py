"""Shards for the merge tests, written with the real ShardWriter (no tests here)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prov4ml_dist.shard import ShardWriter, schema
from prov4ml_dist.topology import Topology

RUN_ID = "run-1"
T0 = 1_700_000_000.0


def shard_path(run_dir: Path, rank: int, attempt: int = 0) -> Path:
    path = run_dir / schema.SHARDS_DIR / schema.shard_name(rank, attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def open_shard(run_dir: Path, rank: int, world_size: int, attempt: int = 0, run_id: str = RUN_ID,
               ranks_per_node: int = 2, environment: dict[str, Any] | None = None) -> ShardWriter:
    """A writer with its start record, as Run would open it."""
    writer = ShardWriter(shard_path(run_dir, rank, attempt), {"run_id": run_id, "rank": rank, "attempt": attempt,
                                                              "experiment_name": "exp", "created": T0},
                         flush_interval=3600)
    topology = Topology(rank=rank, world_size=world_size, local_rank=rank % ranks_per_node,
                        local_world_size=ranks_per_node, node_rank=rank // ranks_per_node, restart_count=attempt,
                        launcher="torchrun", hostname=f"node{rank // ranks_per_node}", pid=1000 + rank,
                        job_id="42", step_id="0")
    writer.record({"kind": "start", "time": T0 + rank * 0.01, "run_id": run_id, "experiment_name": "exp",
                   "user_namespace": "http://example.org/", "topology": topology.as_dict(),
                   "environment": environment if environment is not None else {"user": "alice"},
                   "settings": {}})
    return writer


def log_series(writer: ShardWriter, key: str, points: Iterable[tuple[int, float, float]],
               context: str = "TRAINING", source: str = "") -> None:
    sid = writer.metrics.register(key, context, source)
    for step, value, when in points:
        writer.metrics.append(sid, step, value, when)


def crash(writer: ShardWriter) -> None:
    """Flush, then leave the shard as a SIGKILL would: never closed, no end record."""
    writer.flush()
    os._exit(0)


