"""A run handed over to the ranks a framework starts as fresh processes (Lightning's
``ddp_spawn``: the script's process calls ``start_run``, then the Trainer spawns the ranks,
which do not run the script; the script's process is their launcher, not a rank).

The launcher closes its shard ("handed-over") and renames it out of the merge's sight
(``shards/handover-<pid>.h5``, not ``rank-*.h5``); its path travels in the environment the
spawned ranks inherit. The new process of the same rank takes it in (its params, artifacts,
models, datasets and metric points, replayed into its own shard) and only then deletes it: a
crash in between leaves the file, named, for a person to find; never a second rank-0 shard.

The same happens when the ranks are forked from the script's process by torch's
``start_processes`` (Accelerate's ``notebook_launcher``, Lightning's ``ddp_fork``): a fork hook
(api.py) hands the run over just before the first such fork (``forking_ranks``). The forked
ranks join the run — with ``start_run``, or at their first logging call, ending it at exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path, PurePosixPath

from .run import HANDOVER_ENV, Run
from .shard import ShardReader, schema
from .topology import Topology

log = logging.getLogger(__name__)

# Where torch starts the ranks of a job as processes: torch.multiprocessing.start_processes (torch
# elastic's workers — Accelerate's notebook_launcher —, mp.spawn, Lightning's ddp_fork/notebook).
RANK_STARTER = ("torch.multiprocessing.spawn", "start_processes")
# Journal records that carry the launcher's provenance into the rank's shard as they are.
REPLAYED_KINDS = ("param", "model", "dataset", "warning")


def hand_over(run: Run) -> Path:
    """Close ``run``'s shard and leave it for the process that becomes its rank; returns its new path."""
    run.close("handed-over")
    dest = run.shard_path.with_name(f"handover-{os.getpid()}.h5")
    os.replace(run.shard_path, dest)
    os.environ[HANDOVER_ENV] = str(dest)
    return dest


def forking_ranks() -> bool:
    """Whether the fork about to happen starts a rank of a job: it is made inside torch's
    ``start_processes`` (not a DataLoader worker or a ``multiprocessing`` helper)."""
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) == RANK_STARTER:
            return True
        frame = frame.f_back
    return False


def take_over(run: Run) -> int:
    """In a spawned rank: replay the launcher's shard of this rank, if one was handed over into this
    run; returns how many metric points were taken in."""
    path = Path(os.environ.get(HANDOVER_ENV) or "")
    if not path.name or path.parent != run.shard_path.parent or not path.is_file():
        return 0
    with ShardReader(path) as reader:
        if reader.run_id != run.run_id or reader.rank != run.topology.rank:
            return 0
    points = replay_shard(run, path, run.rank_root)
    path.unlink()
    os.environ.pop(HANDOVER_ENV, None)
    log.info("prov4ml_dist: rank %d took in %d points and the records its launcher logged before spawning it",
             run.topology.rank, points)
    return points


def move_run(run: Run, run_id: str, topology: Topology) -> Run:
    """This process's run, started alone, moved into the job's run ``run_id`` as rank
    ``topology.rank`` (``Run.settle_topology`` found it numbered late: Lightning's nodes
    launched by hand). Its shard is closed ("moved"), replayed into the new rank's shard with
    its artifact files, then deleted with the directories it leaves empty; a crash in between
    leaves it where it was, named, for ``prov4ml-dist merge`` of that directory."""
    run.close("moved")
    moved = Run(replace(run.config, run_id=run_id), topology)
    points = replay_shard(moved, run.shard_path, run.rank_root, schema.rank_artifacts_dir(run.topology.rank))
    run.shard_path.unlink()
    old_artifacts = run.rank_root / schema.rank_artifacts_dir(run.topology.rank)
    emptied = sorted((p for p in old_artifacts.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for directory in (*emptied, old_artifacts, run.shard_path.parent, run.rank_root / schema.ARTIFACTS_DIR,
                      run.rank_root, run.run_dir):
        with contextlib.suppress(OSError):  # not empty (another process's files): kept
            directory.rmdir()
    log.info("prov4ml_dist: run %s moved into run %s as rank %d of %d (%d points)", run.run_id, run_id,
             topology.rank, topology.world_size, points)
    return moved


def replay_shard(run: Run, path: Path, root: Path, artifacts_dir: str | None = None) -> int:
    """Replay the closed shard at ``path`` into ``run``: metric points, then params, models,
    datasets, warnings and artifacts. Artifact files are under ``root``; ``artifacts_dir``
    (another rank's directory there) means they move into ``run``'s own. Returns the points."""
    points = 0
    with ShardReader(path) as reader:
        series = reader.series("metrics")
        for rows in reader.iter_rows("metrics"):
            for sid, step, value, _ in rows.tolist():
                names = series.get(sid)
                if names is not None:
                    run.log_metric(names["key"], value, names["context"], step, names.get("source"))
                    points += 1
        for record in reader.records():
            if record.get("kind") in REPLAYED_KINDS:
                run.writer.record(record)
            elif record.get("kind") == "artifact":
                if artifacts_dir is not None and record.get("copied"):
                    record = _move_artifact(record, root, artifacts_dir, run)
                run.replay_artifact(record)
    run.writer.flush()
    return points


def _move_artifact(record: dict, root: Path, artifacts_dir: str, run: Run) -> dict:
    """A copied artifact's file moved from ``root/artifacts_dir`` into ``run``'s artifacts directory."""
    rel = PurePosixPath(str(record.get("path", "")))
    try:
        inside = rel.relative_to(artifacts_dir)
    except ValueError:
        return record
    target = PurePosixPath(schema.rank_artifacts_dir(run.topology.rank)) / inside
    dest = run.rank_root.joinpath(*target.parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(root.joinpath(*rel.parts), dest)
    return {**record, "path": target.as_posix()}
