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

import logging
import os
import sys
from pathlib import Path

from .run import HANDOVER_ENV, Run
from .shard import ShardReader

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
        points = 0
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
                run.replay_artifact(record)
    run.writer.flush()
    path.unlink()
    os.environ.pop(HANDOVER_ENV, None)
    log.info("prov4ml_dist: rank %d took in %d points and the records its launcher logged before spawning it",
             run.topology.rank, points)
    return points
