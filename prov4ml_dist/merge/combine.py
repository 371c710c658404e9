"""Rank 0's half of the hierarchical merge: node parts (``parts.py``) → merged.h5 + prov.json.

The result has the layout every reader knows and the content ``merge_run`` gives for the
same shards; the one difference allowed is the last bits of ``crossrank.mean``, whose sums
are added node by node (README, "What the merge computes, exactly"). Rank 0 never opens a
shard: the journal tables come from the shards' journals the parts carry, the cross-rank
statistics from the parts' per-(group, step) partials (parts x keys x steps rows). The rows,
which the leaders numbered as merged.h5 does (``numbering.py``), are not touched by default:
merged.h5's ``rows`` is an HDF5 virtual dataset over the parts' rows, one mapping per run of
a node's series (about groups x nodes). ``single_file`` copies them into merged.h5 instead.
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
from .crossrank import WINDOW_ROWS, CrossRank, Partials
from .merger import (
    MergeResult,
    _silent,
    _write_ranks,
    merge_outputs,
    recorded_missing_ranks,
    write_header,
    write_journal,
)
from .parts import GLOBAL, PART_FORMAT, SHARDS, STEPS, PartProblems, shard_info
from .rowstage import RowStage, RowWriter
from .scan import ShardInfo, choose_run_id
from .series import SeriesIndex, group_table
from .steps import STEP_FIELDS, empty, merge_sorted, step_slabs, to_crossrank
from .store import write_table

Progress = Callable[[str, int, int], None]

COPY_SLAB_ROWS = 1 << 20  # rows read from a part at a time
STEP_BUFFER_ROWS = 1 << 18  # partials read from a part at a time


def combine_parts(run_dir: Path, part_paths: Sequence[Path], *, single_file: bool = False,
                  missing_ranks: Mapping[int, str] | None = None, world_size: int | None = None,
                  progress: Progress | None = None) -> MergeResult:
    """Combine the parts of ``run_dir``'s nodes (in the order given: the nodes' order) into
    ``run_dir``'s merged.h5 and prov.json, as ``merge_run`` would from their shards.

    By default merged.h5's rows are a virtual dataset over the parts' rows, which must then be
    under ``run_dir`` (``PARTS_DIR``) and stay there; ``single_file`` copies them into merged.h5
    instead (the parts may then be anywhere, and removed afterwards).

    Raises ``MergeError`` when a part is not one, when the parts overlap (a (rank, attempt)
    in two, or shards of different runs: merge the shards with ``merge_run`` then), when no
    part holds a shard, or when the outputs cannot be written.
    """
    run_dir = Path(run_dir)
    report = progress or _silent
    outside = [p for p in part_paths if not Path(p).resolve().is_relative_to(run_dir.resolve())]
    if outside and not single_file:
        raise MergeError(f"{outside[0]} is not under {run_dir}: merged.h5's rows would point out of the run "
                         "(put the parts under the run directory, or copy their rows: single_file)")
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
            with compress.staging(run_dir) if single_file else contextlib.nullcontext() as stage:
                rows = RowStage(stage) if stage is not None else None
                for n, table in enumerate(schema.TABLES):
                    report("combine", n, len(schema.TABLES))
                    _combine_table(out.create_group(table), table, parts, run_dir, rows)
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


def _combine_table(out: h5py.Group, table: str, parts: list[h5py.File], run_dir: Path,
                   stage: RowStage | None) -> None:
    """One table of merged.h5 from the parts' same table: rows copied into ``stage`` then
    compressed into merged.h5, or (no stage) a virtual dataset over the parts' rows."""
    tables = [f[table] for f in parts]
    series, local_starts = _global_series(tables)
    lengths = series["row_stop"] - series["row_start"]
    series["row_stop"] = np.cumsum(lengths)
    series["row_start"] = series["row_stop"] - lengths
    groups = group_table(series, np.flatnonzero(_new_group(series)))
    index = SeriesIndex(table, series, groups, [])
    CrossRank.into(out, index, np.empty(0, dtype=layout.ROW_DTYPE)).write_combined(_crossrank_batches(tables, groups))
    write_table(out, layout.SERIES, layout.SERIES_DTYPE, index.series)
    write_table(out, layout.GROUPS, layout.GROUP_DTYPE, index.groups)
    if stage is None:
        _virtual_rows(out, tables, series, local_starts, run_dir)
    else:
        stage.create(table, int(lengths.sum()))
        _copy_rows(tables, series, local_starts, stage.writer(table))
        compress.write_compressed(out, layout.ROWS, stage.rows(table))


def _global_series(tables: list[h5py.Group]) -> tuple[np.ndarray, np.ndarray]:
    """Every part's series at its number in merged.h5 (row ranges still the parts'), the
    group column filled; and where each series' rows start in its part."""
    ids = [t[GLOBAL][()] for t in tables]
    total = sum(len(i) for i in ids)
    series = np.empty(total, dtype=layout.SERIES_DTYPE)
    seen = np.zeros(total, dtype=bool)
    for t, numbers in zip(tables, ids, strict=True):
        if len(numbers) and (numbers.min() < 0 or numbers.max() >= total or seen[numbers].any()):
            raise MergeError(f"{t.file.filename}: its series numbers overlap another part's or leave gaps")
        seen[numbers] = True
        series[numbers] = t[layout.SERIES][()]
    series["group"] = np.cumsum(_new_group(series)) - 1
    return series, series["row_start"].copy()


def _new_group(series: np.ndarray) -> np.ndarray:
    """Where a new (key, context, source, attempt) starts in group-major series."""
    if not len(series):
        return np.zeros(0, dtype=bool)
    new = np.r_[True, series["attempt"][1:] != series["attempt"][:-1]]
    for name in ("key", "context", "source"):
        column = series[name]
        new[1:] |= column[1:] != column[:-1]
    return new


def _pieces(numbers: np.ndarray, series: np.ndarray, local_starts: np.ndarray) -> list[tuple[int, int, int]]:
    """A part's rows as (part row, merged.h5 row, rows): its series that are neighbours in
    merged.h5 too (one node's ranks in one group) make one piece."""
    order = np.argsort(numbers)
    numbers = numbers[order]
    if not len(numbers):
        return []
    breaks = np.flatnonzero(np.r_[True, numbers[1:] != numbers[:-1] + 1])
    ends = np.r_[breaks[1:], len(numbers)] - 1
    first, last = numbers[breaks], numbers[ends]
    sizes = series["row_stop"][last] - series["row_start"][first]
    return [(int(a), int(b), int(n)) for a, b, n in zip(local_starts[first], series["row_start"][first], sizes,
                                                         strict=True) if n]


def _virtual_rows(out: h5py.Group, tables: list[h5py.Group], series: np.ndarray, local_starts: np.ndarray,
                  run_dir: Path) -> None:
    """``rows`` as an HDF5 virtual dataset over the parts' rows, each part named relative to the
    run directory (HDF5 looks for it beside merged.h5: the run directory may move)."""
    total = int(series["row_stop"][-1]) if len(series) else 0
    virtual = h5py.VirtualLayout(shape=(total,), dtype=layout.ROW_DTYPE)
    for t in tables:
        name = Path(t.file.filename).resolve().relative_to(run_dir.resolve()).as_posix()
        source = h5py.VirtualSource(name, t[layout.ROWS].name, shape=t[layout.ROWS].shape)
        for a, b, n in _pieces(t[GLOBAL][()], series, local_starts):
            virtual[b:b + n] = source[a:a + n]
    fill = np.zeros((), dtype=layout.ROW_DTYPE)
    fill["series"] = layout.NO_VALUE  # what a reader gets where a part is missing
    out.create_virtual_dataset(layout.ROWS, virtual, fillvalue=fill)


def _copy_rows(tables: list[h5py.Group], series: np.ndarray, local_starts: np.ndarray, writer: RowWriter) -> None:
    """Each part's rows (numbered as in merged.h5 already) to their place in merged.h5's order."""
    try:
        for t in tables:
            pieces = _pieces(t[GLOBAL][()], series, local_starts)
            rows = t[layout.ROWS]
            for a, b, n in pieces:
                for x in range(0, n, COPY_SLAB_ROWS):
                    data = rows[a + x:a + min(n, x + COPY_SLAB_ROWS)]
                    writer.scatter(data, np.zeros(1, np.int64), np.array([b + x]), np.array([len(data)]))
    finally:
        writer.close()


class _Sequential:
    """Slices of a part's ``steps`` columns, read in buffers: rank 0 asks for them in order."""

    def __init__(self, steps: h5py.Group) -> None:
        self.columns = {name: steps[name] for name in STEP_FIELDS}
        self.total = self.columns["step"].shape[0]
        self.start, self.buffer = 0, empty()

    def get(self, a: int, b: int) -> Partials:
        if b - a > STEP_BUFFER_ROWS:
            return Partials({name: column[a:b] for name, column in self.columns.items()})
        if a < self.start or b > self.start + len(self.buffer):
            stop = min(self.total, a + STEP_BUFFER_ROWS)
            self.start, self.buffer = a, Partials({name: column[a:stop] for name, column in self.columns.items()})
        return Partials({name: column[a - self.start:b - self.start] for name, column in self.buffer.columns.items()})


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
            for slab in step_slabs([b.columns["step"] for b in blocks], WINDOW_ROWS):
                pieces = [b.take(slice(x, y)) for b, (x, y) in zip(blocks, slab, strict=True)]
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
                "partials": sum(f[t][STEPS]["step"].shape[0] for t in schema.TABLES)}

