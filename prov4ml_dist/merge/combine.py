"""Rank 0's half of the hierarchical merge: node parts (``parts.py``) → merged.h5 + prov.json.

The result has the layout every reader knows and the content ``merge_run`` gives for the
same shards; the one difference allowed is the last bits of ``crossrank.mean``, whose sums
are added node by node (README, "What the merge computes, exactly"). Rank 0 never opens a
shard: the journal tables come from the shards' journals the parts carry, the cross-rank
statistics from the parts' per-(group, step) partials (parts x keys x steps rows), and the
rows are copied once, renumbered, from the parts into one self-contained merged.h5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from ..errors import MergeError
from ..shard import schema
from . import compress, layout
from .crossrank import WINDOW_ROWS, CrossRank
from .merger import (
    MergeResult,
    _silent,
    _write_ranks,
    merge_outputs,
    recorded_missing_ranks,
    write_header,
    write_journal,
)
from .parts import DECL, PART_FORMAT, SHARDS, STEPS, PartProblems, shard_info
from .rowstage import RowStage
from .scan import ShardInfo, choose_run_id
from .series import SeriesIndex, group_table
from .steps import STEP_DTYPE, merge_sorted, step_slabs, to_crossrank
from .store import write_table

Progress = Callable[[str, int, int], None]

COPY_SLAB_ROWS = 1 << 20  # rows read from a part at a time
STEP_BUFFER_ROWS = 1 << 18  # partials read from a part at a time


def combine_parts(run_dir: Path, part_paths: Sequence[Path], *, missing_ranks: Mapping[int, str] | None = None,
                  world_size: int | None = None, progress: Progress | None = None) -> MergeResult:
    """Combine the parts of ``run_dir``'s nodes (in the order given: the nodes' order) into
    ``run_dir``'s merged.h5 and prov.json, as ``merge_run`` would from their shards.

    Raises ``MergeError`` when a part is not one, when the parts overlap (a (rank, attempt)
    in two, or shards of different runs: merge the shards with ``merge_run`` then), when no
    part holds a shard, or when the outputs cannot be written.
    """
    run_dir = Path(run_dir)
    report = progress or _silent
    with contextlib.ExitStack() as stack:
        parts = [stack.enter_context(_open_part(Path(p))) for p in part_paths]
        shards = _shards(parts, run_dir.name)
        notes = [PartProblems.loads(str(f.attrs["problems"])) for f in parts]
        problems = [text for _, text in sorted(p for n in notes for p in n.read)]
        problems += [p[3] for p in sorted(p for n in notes for p in n.select)]
        if not shards:
            raise MergeError(f"no readable shard in the parts of {run_dir}" + (": " + "; ".join(problems)
                                                                                 if problems else ""))
        with merge_outputs(run_dir, report) as tmp_merged, h5py.File(tmp_merged, "w") as out:
            missing = dict(missing_ranks) if missing_ranks is not None else recorded_missing_ranks(run_dir)
            write_header(out, shards, world_size)
            write_journal(out, run_dir, shards, problems)
            with compress.staging(run_dir) as stage:
                rows = RowStage(stage)
                for n, table in enumerate(schema.TABLES):
                    report("combine", n, len(schema.TABLES))
                    _combine_table(out.create_group(table), table, parts, rows)
                report("combine", len(schema.TABLES), len(schema.TABLES))
            problems += [p for n in notes for p in n.copy]
            problems += [p[2] for p in sorted(p for n in notes for p in n.hash)]
            _write_ranks(out, shards, missing, problems)
    return MergeResult(run_dir / layout.MERGED_NAME, run_dir / layout.PROV_NAME, problems)


@contextlib.contextmanager
def _open_part(path: Path) -> Iterator[h5py.File]:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise MergeError(f"{path}: unreadable part ({exc})") from None
    with f:
        if f.attrs.get("format") != PART_FORMAT:
            raise MergeError(f"{path}: not a part of a hierarchical merge")
        yield f


def _shards(parts: list[h5py.File], directory_name: str) -> list[ShardInfo]:
    """Every part's shards in (rank, attempt) order; the parts must not overlap."""
    shards = [shard_info(text) for f in parts for text in f[SHARDS].asstr()[()]]
    if not shards:
        return []
    run_id = choose_run_id(directory_name, [(s.run_id, s.rank, s.attempt) for s in shards])
    seen: set[tuple[int, int]] = set()
    for s in shards:
        if s.run_id != run_id or (s.rank, s.attempt) in seen:
            raise MergeError(f"the parts overlap or hold shards of different runs (rank {s.rank} attempt "
                             f"{s.attempt}, run id {s.run_id!r}): merge the shards themselves (merge_run)")
        seen.add((s.rank, s.attempt))
    return sorted(shards, key=lambda s: (s.rank, s.attempt))


def _combine_table(out: h5py.Group, table: str, parts: list[h5py.File], stage: RowStage) -> None:
    """One table of merged.h5 from the parts' same table."""
    tables = [f[table] for f in parts]
    series, origin = _global_series(tables)
    stage.create(table, int((series["row_stop"] - series["row_start"]).sum()))
    _copy_rows(tables, series, origin, stage.writer(table))
    # Now the series' row ranges are merged.h5's: the part-local ranges were needed for the copy.
    lengths = series["row_stop"] - series["row_start"]
    series["row_stop"] = np.cumsum(lengths)
    series["row_start"] = series["row_stop"] - lengths
    groups = group_table(series, np.flatnonzero(_new_group(series)))
    index = SeriesIndex(table, series, groups, [])
    CrossRank.into(out, index, stage.rows(table)).write_combined(_crossrank_batches(tables, groups))
    write_table(out, layout.SERIES, layout.SERIES_DTYPE, index.series)
    write_table(out, layout.GROUPS, layout.GROUP_DTYPE, index.groups)
    compress.write_compressed(out, layout.ROWS, stage.rows(table))


def _global_series(tables: list[h5py.Group]) -> tuple[np.ndarray, np.ndarray]:
    """Every part's series in merged.h5's order (key, context, source, attempt, rank, id in the
    shard), with their part-local row ranges; and each one's (part, local index)."""
    local = [t[layout.SERIES][()] for t in tables]
    decl = [t[DECL][()] for t in tables]
    keys: list[tuple] = []
    for p, (s, d) in enumerate(zip(local, decl, strict=True)):
        keys += zip(s["key"].tolist(), s["context"].tolist(), s["source"].tolist(), s["attempt"].tolist(),
                    s["rank"].tolist(), d.tolist(), [p] * len(s), range(len(s)), strict=True)
    keys.sort()
    origin = np.array([k[6:] for k in keys], dtype=np.int64).reshape(-1, 2)
    series = np.empty(len(keys), dtype=layout.SERIES_DTYPE)
    for p, s in enumerate(local):
        chosen = origin[:, 0] == p
        series[chosen] = s[origin[chosen, 1]]
    series["group"] = np.cumsum(_new_group(series)) - 1
    return series, origin


def _new_group(series: np.ndarray) -> np.ndarray:
    """Where a new (key, context, source, attempt) starts in group-major series."""
    if not len(series):
        return np.zeros(0, dtype=bool)
    new = np.r_[True, series["attempt"][1:] != series["attempt"][:-1]]
    for name in ("key", "context", "source"):
        column = series[name]
        new[1:] |= column[1:] != column[:-1]
    return new


def _copy_rows(tables: list[h5py.Group], series: np.ndarray, origin: np.ndarray, writer) -> None:
    """Each part's rows to their place in merged.h5's order, series renumbered. A part's series
    that are neighbours in merged.h5 too (the ranks of one node, in one group) move as one piece."""
    lengths = series["row_stop"] - series["row_start"]
    dest = np.cumsum(lengths) - lengths
    try:
        for p, t in enumerate(tables):
            chosen = np.flatnonzero(origin[:, 0] == p)
            number = np.empty(len(chosen), dtype=np.int32)  # local series → merged.h5's
            number[origin[chosen, 1]] = chosen
            shift = np.empty(len(chosen), dtype=np.int64)  # local row → merged.h5's row
            shift[origin[chosen, 1]] = dest[chosen] - series["row_start"][chosen]
            rows = t[layout.ROWS]
            for a in range(0, rows.shape[0], COPY_SLAB_ROWS):
                data = rows[a:a + COPY_SLAB_ROWS]
                local = data["series"]
                to = np.arange(a, a + len(data)) + shift[local]
                data["series"] = number[local]
                starts = np.flatnonzero(np.r_[True, to[1:] != to[:-1] + 1])
                writer.scatter(data, starts, to[starts], np.diff(np.r_[starts, len(data)]))
    finally:
        writer.close()


class _Sequential:
    """Slices of a part's ``steps``, read in buffers: rank 0 asks for them in order."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.start, self.buffer = 0, np.empty(0, dtype=STEP_DTYPE)

    def get(self, a: int, b: int) -> np.ndarray:
        if b - a > STEP_BUFFER_ROWS:
            return self.dataset[a:b]
        if a < self.start or b > self.start + len(self.buffer):
            self.start, self.buffer = a, self.dataset[a:min(self.dataset.shape[0], a + STEP_BUFFER_ROWS)]
        return self.buffer[a - self.start:b - self.start]


def _crossrank_batches(tables: list[h5py.Group], groups: np.ndarray) -> Iterator[tuple[np.ndarray, range]]:
    """merged.h5's crossrank rows, group by group, from the parts' partials, in batches of about
    ``WINDOW_ROWS`` rows (a larger group in slabs of steps), each with the groups it completes."""
    readers = [_Sequential(t[STEPS]) for t in tables]
    ranges = [_local_groups(t) for t in tables]
    compared = groups["series_stop"] - groups["series_start"] >= 2
    pending: list[np.ndarray] = []
    size, done = 0, 0
    for g in range(len(groups)):
        if not compared[g]:
            continue
        ident = (groups["key"][g], groups["context"][g], groups["source"][g], int(groups["attempt"][g]))
        found = [(reader, spans[ident]) for reader, spans in zip(readers, ranges, strict=True) if ident in spans]
        blocks = [reader.get(a, b) for reader, (a, b) in found if b > a]
        if not blocks:
            continue
        if sum(len(b) for b in blocks) <= WINDOW_ROWS:
            pending.append(to_crossrank(merge_sorted(blocks), g))
            size += len(pending[-1])
        else:
            if pending:
                yield np.concatenate(pending), range(done, g)
                pending, size, done = [], 0, g
            for slab in step_slabs([b["step"] for b in blocks], WINDOW_ROWS):
                pieces = [b[x:y] for b, (x, y) in zip(blocks, slab, strict=True)]
                yield to_crossrank(merge_sorted(pieces), g), range(g, g)
        if size >= WINDOW_ROWS:
            yield np.concatenate(pending), range(done, g + 1)
            pending, size, done = [], 0, g + 1
    rows = np.concatenate(pending) if pending else np.empty(0, dtype=layout.CROSSRANK_DTYPE)
    yield rows, range(done, len(groups))


def _local_groups(table: h5py.Group) -> dict[tuple, tuple[int, int]]:
    """A part's groups by (key, context, source, attempt): their range of partials."""
    groups = table[layout.GROUPS][()]
    return {(k, c, s, int(a)): (int(x), int(y)) for k, c, s, a, x, y in zip(
        groups["key"].tolist(), groups["context"].tolist(), groups["source"].tolist(), groups["attempt"].tolist(),
        groups["stat_start"].tolist(), groups["stat_stop"].tolist(), strict=True)}


def part_summary(path: Path) -> dict[str, int]:
    """Shards and rows a part holds (for the benchmark's and end_run's reports)."""
    with h5py.File(path, "r") as f:
        return {"shards": len(f[SHARDS]), "rows": sum(f[t][layout.ROWS].shape[0] for t in schema.TABLES),
                "partials": sum(f[t][STEPS].shape[0] for t in schema.TABLES)}

