"""A node's part of a hierarchical merge: its shards merged into one file for rank 0.

``scan_node`` then ``write_part`` is what a node leader does (``merge_nodes`` offline): it
reads the node's shards once (from its node-local disk when there is no shared filesystem),
tells rank 0 its series and gets their numbers in merged.h5 (``numbering.py``), copies their
rows, and keeps, per
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
  within the part (row ranges into the part's ``rows``; a group's ``stat_start``/``stat_stop``
  into ``steps``), ``global`` (each series' number in merged.h5, from rank 0: round one,
  ``numbering.py``), ``rows`` (``ROW_DTYPE``, ``series`` numbered as in merged.h5, shuffle +
  deflate: merged.h5 may point at them) and ``steps``, one dataset per ``steps.STEP_FIELDS``,
  sorted by group then step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import MergeError
from ..paths import atomic_target
from ..shard import schema
from . import compress, layout
from .crossrank import WINDOW_ROWS, Partials, partials
from .merger import _copy_all, _silent
from .numbering import NODE_SERIES_DTYPE
from .rowstage import RowsAt, RowStage, open_rows
from .scan import RowBudget, ShardHasher, ShardInfo, TableDecl, close_kept, read_shards, select_shards
from .series import SeriesIndex, build_index
from .steps import STEP_FIELDS, empty, from_partials, step_slabs
from .store import write_table

PARTS_DIR = "parts"  # under the run directory: the parts merged.h5's rows point into
PART_FORMAT = "prov4ml_dist.part"
PART_VERSION = 1
SHARDS = "shards"
GLOBAL = "global"
STEPS = "steps"
RENUMBER_ROWS = 1 << 20
STEP_CHUNK_ROWS = 1 << 15  # rank 0 reads the partials in large slices; a small part wastes at most a chunk

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


@dataclass
class NodeScan:
    """A node's shards, opened and checked once (what the scan kept stays for the copy), and
    the series they declared: what the leader tells rank 0 before it writes its part."""

    run_dir_name: str
    found: list[ShardInfo]  # every readable shard (closed by ``close``)
    shards: list[ShardInfo]  # those merged, in (rank, attempt) order
    indexes: list[SeriesIndex]  # per table, numbered within the node
    problems: PartProblems

    def series(self) -> dict[str, np.ndarray]:
        """Round one of the hierarchical merge: the node's series (``numbering.NODE_SERIES_DTYPE``)."""
        out = {}
        for index in self.indexes:
            rows = np.zeros(len(index.series), dtype=NODE_SERIES_DTYPE)
            for name in ("key", "context", "source", "attempt", "rank"):
                rows[name] = index.series[name]
            rows["decl"] = _decl_ids(index, self.shards)
            rows["rows"] = index.series["row_stop"] - index.series["row_start"]
            out[index.table] = rows
        return out

    def close(self) -> None:
        close_kept(self.found)


def scan_node(shard_paths: Sequence[Path], run_dir_name: str, progress: Progress | None = None) -> NodeScan:
    """Read, check and select a node's shards (as ``merge_run`` does for a whole run, with the
    run directory's name choosing the run id), and lay out their series."""
    report = progress or _silent
    problems = PartProblems([], [], [], [])
    found: list[ShardInfo] = []
    budget = RowBudget()
    paths = sorted(Path(p) for p in shard_paths)
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
    return NodeScan(run_dir_name, found, shards, [build_index(table, shards) for table in schema.TABLES], problems)


def write_part(scan: NodeScan, ids: Mapping[str, np.ndarray], part_path: Path,
               progress: Progress | None = None) -> None:
    """Copy the node's rows into ``part_path``, numbered as in merged.h5 (``ids``: per table, the
    merged.h5 series number of each of ``scan.series()``, from ``numbering.number_series``), with
    their partial cross-rank aggregates and the shards' journals. Written under a temporary name
    and moved into place: a leader that dies leaves none. Closes ``scan``. Raises
    ``MergeError`` when it cannot be written, or when a shard's row counts turned out other than
    its scan said (the numbering would be wrong: merge the shards themselves then)."""
    report = progress or _silent
    part_path = Path(part_path)
    shards, problems = scan.shards, scan.problems
    try:
        with atomic_target(part_path) as tmp, ShardHasher(shards) as hasher, h5py.File(tmp, "w") as out:
            out.attrs["format"] = PART_FORMAT
            out.attrs["part_version"] = PART_VERSION
            out.attrs["run_dir_name"] = scan.run_dir_name
            with compress.staging(part_path.parent) as stage:
                rows = RowStage(stage)
                copied = _copy_all(None, rows, shards, problems.copy, report, None, None) if shards else None
                indexes = copied[0] if copied else scan.indexes
                for index, scanned in zip(indexes, scan.indexes, strict=True):
                    if not np.array_equal(index.series["row_stop"], scanned.series["row_stop"]):
                        raise MergeError(f"{part_path}: row counts changed while the node's shards were merged")
                    if len(ids[index.table]) != len(index.series):
                        raise MergeError(f"{part_path}: {len(ids[index.table])} series numbers for "
                                         f"{len(index.series)} series of {index.table!r}")
                    staged = rows.rows(index.table) if shards else np.empty(0, dtype=layout.ROW_DTYPE)
                    _write_table(out.create_group(index.table), index, staged, np.asarray(ids[index.table]),
                                 rows.where.get(index.table))
            said: list[str] = []
            hasher.fill(said)
            unhashed = [s for s in shards if not s.sha256]
            problems.hash += [(s.rank, s.attempt, text) for s, text in zip(unhashed, said, strict=True)]
            out.create_dataset(SHARDS, data=[json.dumps(_shard_fields(s)) for s in shards], dtype=layout.STR)
            out.attrs["problems"] = problems.dumps()
    except OSError as exc:
        raise MergeError(f"cannot write the part {part_path}: {exc}") from None
    finally:
        scan.close()


def _decl_ids(index: SeriesIndex, shards: list[ShardInfo]) -> np.ndarray:
    """Each series' id in its shard: merged.h5 orders a group's series by rank, then by it."""
    decl = np.zeros(len(index.series), dtype=np.int64)
    for s, shard in enumerate(shards):
        decl[index.global_ids[s]] = shard.tables[index.table].ids
    return decl


def _write_table(group: h5py.Group, index: SeriesIndex, rows: np.ndarray, ids: np.ndarray,
                 where: RowsAt | None) -> None:
    """One table of the part: its partial aggregates, series, groups and rows (renumbered)."""
    steps = group.create_group(STEPS)
    columns = {name: steps.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                          chunks=(STEP_CHUNK_ROWS,)) for name, dtype in STEP_FIELDS.items()}
    size = 0
    for first, stop in _batches(index.groups):
        blocks = [from_partials(partials(chunk, index.series["group"])) for chunk in _chunks(index, rows, first, stop)]
        found = Partials.concat(blocks) if blocks else empty()
        counts = np.bincount(found.columns["group"] - first, minlength=stop - first)
        ends = size + np.cumsum(counts)
        index.groups["stat_start"][first:stop], index.groups["stat_stop"][first:stop] = ends - counts, ends
        for name, column in columns.items():
            column.resize((size + len(found),))
            column[size:] = found.columns[name]
        size += len(found)
    write_table(group, layout.SERIES, layout.SERIES_DTYPE, index.series)
    write_table(group, layout.GROUPS, layout.GROUP_DTYPE, index.groups)
    write_table(group, GLOBAL, np.dtype(np.int64), ids)
    if where is not None and len(rows):  # merged.h5's series numbers, so that rank 0 need not touch the rows
        del rows
        writable = open_rows(where, writable=True)
        for a in range(0, len(writable), RENUMBER_ROWS):
            piece = writable[a:a + RENUMBER_ROWS]
            piece["series"] = ids[piece["series"]]
        writable.flush()
        rows = open_rows(where)
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
