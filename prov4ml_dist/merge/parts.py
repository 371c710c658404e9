"""A node's part of a hierarchical merge: its shards merged into one file for rank 0.

``write_part`` is what a node leader does at end_run (``hierarchy.py``), and what
``combine.py``'s tests and benchmark do offline: it reads the node's shards once (from its
node-local disk when there is no shared filesystem), copies their rows, and keeps, per
(group, step), the partial cross-rank aggregates of ``steps.py`` (never a mean). Rank 0 then
combines the parts (``combine.combine_parts``) with work that grows with parts x keys x steps,
not with ranks x points. The part carries each shard's journal as read (start and end records,
every other record, its problems, sha256 and latest time), so rank 0 builds /ranks,
/records, /params, /artifacts, /energy and prov.json exactly as ``merge_run`` would.

Layout of a part file (HDF5; names in this module only):
- root attributes ``format`` (``PART_FORMAT``), ``part_version``, ``run_dir_name`` (the run
  directory's name the shards were selected by) and ``problems`` (JSON, each problem with what
  orders it among every part's: ``read`` [name, text], ``select`` [rank, attempt, path, text],
  ``copy`` [text], ``hash`` [rank, attempt, text]);
- ``shards``: one JSON string per shard merged, in (rank, attempt) order;
- per table (``metrics``, ``system``): ``series`` and ``groups`` as in merged.h5 but numbered
  within the part (rows ranges into the part's ``rows``; a group's ``stat_start``/``stat_stop``
  into ``steps``), ``decl`` (each series' id in its shard, the last sort key of merged.h5's
  series order), ``rows`` (``ROW_DTYPE``, ``series`` numbered within the part, shuffle +
  deflate) and ``steps`` (``steps.STEP_DTYPE``, sorted by group then step).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import MergeError
from ..paths import atomic_target
from ..shard import schema
from . import compress, layout
from .crossrank import WINDOW_ROWS, partials
from .merger import _copy_all, _silent
from .rowstage import RowStage
from .scan import RowBudget, ShardHasher, ShardInfo, TableDecl, close_kept, read_shards, select_shards
from .series import SeriesIndex
from .steps import STEP_DTYPE, from_partials, step_slabs
from .store import Appender, write_table

PART_FORMAT = "prov4ml_dist.part"
PART_VERSION = 1
SHARDS = "shards"
DECL = "decl"
STEPS = "steps"

Progress = Callable[[str, int, int], None]


@dataclass
class PartProblems:
    """A part's problems, each with what orders it among every part's (``merge_run``'s order)."""

    read: list[tuple[str, str]]  # (shard file name, problem): read_shards' path order
    select: list[tuple[int, int, str, str]]  # (rank, attempt, path): select_shards' order
    copy: list[str]
    hash: list[tuple[int, int, str]]  # (rank, attempt): ShardHasher.fill's order

    def dumps(self) -> str:
        return json.dumps({"read": self.read, "select": self.select, "copy": self.copy, "hash": self.hash})

    @staticmethod
    def loads(text: str) -> PartProblems:
        raw = json.loads(text)
        return PartProblems([tuple(p) for p in raw["read"]], [tuple(p) for p in raw["select"]],
                            list(raw["copy"]), [tuple(p) for p in raw["hash"]])


def write_part(shard_paths: Sequence[Path], part_path: Path, run_dir_name: str,
               progress: Progress | None = None) -> int:
    """Merge ``shard_paths`` (one node's) into ``part_path``; returns the shards merged. The
    part is written under a temporary name and moved into place: a leader that dies leaves
    none. Raises ``MergeError`` when it cannot be written."""
    report = progress or _silent
    part_path = Path(part_path)
    problems = PartProblems([], [], [], [])
    found: list[ShardInfo] = []
    budget = RowBudget()
    paths = sorted(Path(p) for p in shard_paths)
    try:
        for n, path in enumerate(paths):
            report("scan", n, len(paths))
            said: list[str] = []
            found += read_shards([path], said, budget)
            problems.read += [(path.name, text) for text in said]
        said = []
        shards = select_shards(found, said, run_dir_name)
        dropped = [s for s in sorted(found, key=lambda s: (s.rank, s.attempt, str(s.path)))
                   if not any(s is kept for kept in shards)]
        problems.select += [(s.rank, s.attempt, str(s.path), text) for s, text in zip(dropped, said, strict=True)]
        with atomic_target(part_path) as tmp, ShardHasher(shards) as hasher, h5py.File(tmp, "w") as out:
            out.attrs["format"] = PART_FORMAT
            out.attrs["part_version"] = PART_VERSION
            out.attrs["run_dir_name"] = run_dir_name
            with compress.staging(part_path.parent) as stage:
                rows = RowStage(stage)
                indexes = _copy_all(rows, shards, problems.copy, report, None) if shards else [
                    SeriesIndex(table, np.zeros(0, layout.SERIES_DTYPE), np.zeros(0, layout.GROUP_DTYPE), [])
                    for table in schema.TABLES]
                for index in indexes:
                    staged = rows.rows(index.table) if shards else np.empty(0, dtype=layout.ROW_DTYPE)
                    _write_table(out.create_group(index.table), index, staged, _decl_ids(index, shards))
            said = []
            hasher.fill(said)
            unhashed = [s for s in shards if not s.sha256]
            problems.hash += [(s.rank, s.attempt, text) for s, text in zip(unhashed, said, strict=True)]
            out.create_dataset(SHARDS, data=[json.dumps(_shard_fields(s)) for s in shards], dtype=layout.STR)
            out.attrs["problems"] = problems.dumps()
    except OSError as exc:
        raise MergeError(f"cannot write the part {part_path}: {exc}") from None
    finally:
        close_kept(found)
    return len(shards)


def _decl_ids(index: SeriesIndex, shards: list[ShardInfo]) -> np.ndarray:
    """Each series' id in its shard: merged.h5 orders a group's series by rank, then by it."""
    decl = np.zeros(len(index.series), dtype=np.int64)
    for s, shard in enumerate(shards):
        decl[index.global_ids[s]] = shard.tables[index.table].ids
    return decl


def _write_table(group: h5py.Group, index: SeriesIndex, rows: np.ndarray, decl: np.ndarray) -> None:
    """One table of the part: its partial aggregates, series, groups and rows."""
    steps = Appender(group, STEPS, STEP_DTYPE)
    for first, stop in _batches(index.groups):
        blocks = [from_partials(partials(chunk, index.series["group"])) for chunk in _chunks(index, rows, first, stop)]
        found = np.concatenate(blocks) if blocks else np.empty(0, dtype=STEP_DTYPE)
        counts = np.bincount(found["group"] - first, minlength=stop - first)
        ends = steps.size + np.cumsum(counts)
        index.groups["stat_start"][first:stop], index.groups["stat_stop"][first:stop] = ends - counts, ends
        steps.extend(found)
    steps.flush()
    write_table(group, layout.SERIES, layout.SERIES_DTYPE, index.series)
    write_table(group, layout.GROUPS, layout.GROUP_DTYPE, index.groups)
    write_table(group, DECL, np.dtype(np.int64), decl)
    compress.write_compressed(group, layout.ROWS, rows)


def _batches(groups: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive groups of at most ``WINDOW_ROWS`` rows together (a larger group alone)."""
    out, first = [], 0
    while first < len(groups):
        limit = int(groups["row_start"][first]) + WINDOW_ROWS
        stop = max(first + 1, int(np.searchsorted(groups["row_stop"], limit, side="right")))
        out.append((first, stop))
        first = stop
    return out


def _chunks(index: SeriesIndex, rows: np.ndarray, first: int, stop: int) -> list[np.ndarray]:
    """The rows of groups ``first`` to ``stop`` in pieces that each hold every row of their steps:
    all at once, or, for one large group whose series never step back, slabs of steps."""
    groups, series = index.groups, index.series
    start, end = int(groups["row_start"][first]), int(groups["row_stop"][stop - 1])
    chosen = slice(int(groups["series_start"][first]), int(groups["series_stop"][stop - 1]))
    if end - start <= WINDOW_ROWS or stop - first > 1 or (series["runs"][chosen] > 1).any():
        return [rows[start:end]] if end > start else []
    ranges = [(int(a), int(b)) for a, b in zip(series["row_start"][chosen], series["row_stop"][chosen], strict=True)
              if b > a]
    cuts = step_slabs([rows["step"][a:b] for a, b in ranges], WINDOW_ROWS)
    return [np.concatenate([rows[a + x:a + y] for (a, _), (x, y) in zip(ranges, slab, strict=True)]) for slab in cuts]


def _shard_fields(shard: ShardInfo) -> dict[str, Any]:
    """What rank 0 needs of a shard it never opens (``shard_info`` reads it back)."""
    return {"path": str(shard.path), "rank": shard.rank, "attempt": shard.attempt, "run_id": shard.run_id,
            "start": shard.start, "end": shard.end, "records": shard.records, "last_time": shard.last_time,
            "problems": shard.problems, "sha256": shard.sha256,
            "tables": {name: [decl.rows, decl.undeclared] for name, decl in shard.tables.items()}}


def shard_info(text: str) -> ShardInfo:
    """A shard as a part describes it: its journal, no rows (``merger``'s journal, ranks table
    and problems take it like a scanned shard)."""
    raw = json.loads(text)
    empty = np.zeros(0, dtype=np.int64)
    tables = {name: TableDecl(empty, [], empty, int(rows), int(undeclared))
              for name, (rows, undeclared) in raw["tables"].items()}
    last = raw["last_time"]
    return ShardInfo(Path(raw["path"]), int(raw["rank"]), int(raw["attempt"]), raw["start"], raw["end"],
                     raw["records"], tables, last_time=math.nan if last is None else float(last),
                     problems=list(raw["problems"]), sha256=raw["sha256"], run_id=raw["run_id"])
