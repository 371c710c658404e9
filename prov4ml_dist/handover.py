"""A run handed over to the ranks a framework starts as fresh processes (Lightning's
``ddp_spawn``: the script's process calls ``start_run``, then the Trainer spawns the ranks,
which do not run the script; the script's process is their launcher, not a rank).

The launcher closes its shard ("handed-over") and renames it out of the merge's sight
(``shards/handover-<pid>.h5``, not ``rank-*.h5``); its path travels in the environment the
spawned ranks inherit. The new process of the same rank takes it in (its params, artifacts,
models, datasets and metric points, replayed into its own shard) and only then deletes it: a
crash in between leaves the file, named, for a person to find; never a second rank-0 shard.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .run import Run
from .shard import ShardReader

log = logging.getLogger(__name__)

HANDOVER_ENV = "PROV4ML_DIST_HANDOVER"
# Journal records that carry the launcher's provenance into the rank's shard as they are.
REPLAYED_KINDS = ("param", "model", "dataset", "warning")


def hand_over(run: Run) -> Path:
    """Close ``run``'s shard and leave it for the process that becomes its rank; returns its new path."""
    run.close("handed-over")
    dest = run.shard_path.with_name(f"handover-{os.getpid()}.h5")
    os.replace(run.shard_path, dest)
    os.environ[HANDOVER_ENV] = str(dest)
    return dest


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
