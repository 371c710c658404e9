"""Copying every point of every rank into ``merged.h5``, one contiguous range per series.

Rows are laid out by cross-rank group (key, context, source, attempt), then rank: the
row counts from the scan give every series its range before any row is written, so each
chunk read from a shard is sorted by series and written with one scattered write into a
memory map of the staged rows (see ``rowstage.py``).
Per-series summaries (count, min, max, first/last step, last value) are computed on the
way, vectorised per chunk, so 2,000 keys cost no more passes than one.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import MergeError
from ..shard import ShardReader, schema
from . import layout
from .rowstage import RowWriter
from .scan import BAD_SHARD, RowCountMismatch, ShardInfo, as_text, local_index, read_rows

_SERIES_FIELDS = ("kind", "time", "table", "id", "key", "context", "source")


@dataclass
class SeriesIndex:
    """The series and groups of one table, and how each shard's local ids map onto them."""

    table: str
    series: np.ndarray  # layout.SERIES_DTYPE, summaries filled by copy_rows
    groups: np.ndarray  # layout.GROUP_DTYPE, straggler columns filled by crossrank
    global_ids: list[np.ndarray]  # per shard: global series index of each declared id

    @property
    def total_rows(self) -> int:
        return int(self.series["row_stop"][-1]) if len(self.series) else 0


def build_index(table: str, shards: list[ShardInfo]) -> SeriesIndex:
    """Order the series of all shards group-major and give each its row range."""
    entries = []
    for s, shard in enumerate(shards):
        decl = shard.tables[table]
        for pos, record in enumerate(decl.decls):
            ident = (record["key"], as_text(record.get("context")), as_text(record.get("source")), shard.attempt)
            entries.append((ident, shard.rank, int(decl.ids[pos]), s, pos, record))
    entries.sort(key=lambda e: e[:3])
    global_ids = [np.empty(len(shard.tables[table].ids), dtype=np.int32) for shard in shards]
    group_of, firsts = [], []
    for i, (ident, _, _, s, pos, _) in enumerate(entries):
        if not firsts or entries[firsts[-1]][0] != ident:
            firsts.append(i)
        group_of.append(len(firsts) - 1)
        global_ids[s][pos] = i
    series = np.zeros(len(entries), dtype=layout.SERIES_DTYPE)
    series["key"] = [e[0][0] for e in entries]
    series["context"] = [e[0][1] for e in entries]
    series["source"] = [e[0][2] for e in entries]
    series["attempt"] = [e[0][3] for e in entries]
    series["rank"] = [e[1] for e in entries]
    series["group"] = group_of
    series["extra"] = [json.dumps({k: v for k, v in e[5].items() if k not in _SERIES_FIELDS}, sort_keys=True)
                       for e in entries]
    counts = np.array([shards[e[3]].tables[table].counts[e[4]] for e in entries], dtype=np.int64)
    stops = np.cumsum(counts)
    series["row_start"], series["row_stop"] = stops - counts, stops
    for name in ("min", "max", "last", "first_time", "last_time"):
        series[name] = math.nan
    return SeriesIndex(table, series, group_table(series, np.array(firsts, dtype=np.int64)), global_ids)


def group_table(series: np.ndarray, firsts: np.ndarray) -> np.ndarray:
    """The ``GROUP_DTYPE`` rows of group-major ``series`` whose groups start at ``firsts``."""
    groups = np.zeros(len(firsts), dtype=layout.GROUP_DTYPE)
    lasts = np.r_[firsts[1:], len(series)].astype(np.int64)
    for name in ("key", "context", "source", "attempt"):
        groups[name] = series[name][firsts]
    groups["series_start"], groups["series_stop"] = firsts, lasts
    groups["row_start"] = series["row_start"][firsts]
    groups["row_stop"] = series["row_stop"][lasts - 1] if len(firsts) else []
    return groups


def copy_rows(chunks: Iterable[np.ndarray], declared: np.ndarray, rank: int, ids: np.ndarray, series: np.ndarray,
              cursor: np.ndarray, rows: RowWriter, where: str) -> float:
    """Copy one shard's rows of one table (``chunks``, in logging order) into ``rows`` (the
    table's staged rows, which several processes may write at once, each its own series'
    ranges); returns the latest row time seen (NaN if none).

    ``ids`` is the global series id of each series the shard declared (``declared``, sorted);
    ``series`` their summary rows and ``cursor`` the next row to write of each, both in that
    order: the summaries are filled and the cursors advance here. ``where`` names the shard.

    Each chunk is grouped by series, the series in global order (each is one segment of the
    merged rows): by a stable sort, or, when the chunk repeats one pattern of series (a
    training loop logging the same metrics every step), by strided copies with no sort. The
    step, value and time bytes are copied as one 24-byte field (``_TAIL``), series and rank as
    one 8-byte one (``_HEAD``): a third of the field-by-field copies.
    """
    by_global = np.argsort(ids, kind="stable")  # declared slots in global order
    order_of = np.empty(len(ids), dtype=np.uint16 if len(ids) <= 1 << 16 else np.int64)
    order_of[by_global] = np.arange(len(ids))
    numbered = len(declared) and declared[0] == 0 and declared[-1] == len(declared) - 1
    heads = ids.astype(np.int64) | (np.int64(rank) << 32)  # little-endian: series, then rank
    latest = -math.inf
    buffer = np.empty(0, dtype=layout.ROW_DTYPE)  # reused: a fresh one per chunk is a page fault per 4 KiB
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=schema.ROW_DTYPE)
        slot = chunk["series"]
        if not (numbered and len(chunk) and slot.min() >= 0 and slot.max() < len(ids)):
            slot, valid = local_index(declared, slot)
            if not valid.all():
                chunk, slot = chunk[valid], slot[valid]
        if not len(chunk):
            continue
        counts = np.bincount(slot, minlength=len(ids))
        segments = by_global[counts[by_global] > 0]
        lengths = counts[segments]
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        if (cursor[segments] + lengths > series["row_stop"][segments]).any():
            raise RowCountMismatch(f"{where}: more rows of a series than counted")
        if len(buffer) < len(chunk):
            buffer = np.empty(len(chunk), dtype=layout.ROW_DTYPE)
        out = buffer[:len(chunk)]
        tails, out_tails = chunk.view(_TAIL)["tail"], out.view(_MERGED_TAIL)["tail"]
        k = len(segments)
        if repeating(slot, k):
            residue = np.empty(len(ids), dtype=np.int64)  # row i belongs to series slot[i % k]
            residue[slot[:k]] = np.arange(k)
            for seg, start, n in zip(segments.tolist(), starts.tolist(), lengths.tolist(), strict=True):
                out_tails[start:start + n] = tails[residue[seg]::k]
        else:
            out_tails[...] = tails.take(np.argsort(order_of[slot], kind="stable"))
        out.view(_HEAD)["head"] = np.repeat(heads[segments], lengths)
        rows.scatter(out, starts, cursor[segments], lengths)
        cursor[segments] += lengths
        _summarise(series, out, starts, lengths, segments)
        latest = max(latest, float(out["time"].max()))
    return latest if latest > -math.inf else math.nan


def repeating(slot: np.ndarray, k: int) -> bool:
    """Whether a chunk's rows, of ``k`` series, repeat one pattern: row ``i`` of the series of
    row ``i % k`` (each series then has at least ``MIN_PERIODIC_SEGMENT`` rows)."""
    return k <= len(slot) // MIN_PERIODIC_SEGMENT and bool((slot[k:2 * k] == slot[:k]).all()) \
        and bool((slot[k:] == slot[:-k]).all())


def _field_view(dtype: np.dtype, fields: tuple[str, ...], name: str, kind: str) -> np.dtype:
    """One field ``name`` of type ``kind`` over ``fields`` of ``dtype``, which must be adjacent."""
    first = dtype.fields[fields[0]][1]
    size = sum(dtype.fields[f][0].itemsize for f in fields)
    if [dtype.fields[f][1] for f in fields] != list(np.cumsum([first] + [dtype.fields[f][0].itemsize
                                                                          for f in fields[:-1]])):
        raise ImportError(f"merge: fields {fields} of {dtype} are not adjacent")
    return np.dtype({"names": [name], "formats": [kind.format(size)], "offsets": [first], "itemsize": dtype.itemsize})


COPY_BLOCK_ROWS = 1 << 18  # rows kept by the scan are copied in blocks of the reader's slice size
MIN_PERIODIC_SEGMENT = 16  # rows per series in a chunk below which the strided copies cost more than a sort
_TAIL = _field_view(schema.ROW_DTYPE, ("step", "value", "time"), "tail", "V{}")
_MERGED_TAIL = _field_view(layout.ROW_DTYPE, ("step", "value", "time"), "tail", "V{}")
_HEAD = _field_view(layout.ROW_DTYPE, ("series", "rank"), "head", "<i{}")
assert layout.ROW_DTYPE["series"] == layout.ROW_DTYPE["rank"] == np.dtype("<i4")


@dataclass
class TablePlan:
    """What copying one shard's table needs, picklable for a worker process: the series ids it
    declared (sorted), how many rows to read, their global ids and their summary rows."""

    declared: np.ndarray
    limit: int
    ids: np.ndarray
    series: np.ndarray  # layout.SERIES_DTYPE rows of ``ids``: row ranges in, summaries out


def table_plan(index: SeriesIndex, shard: ShardInfo, shard_no: int) -> TablePlan:
    """``index``'s plan for one shard."""
    ids = index.global_ids[shard_no]
    decl = shard.tables[index.table]
    return TablePlan(decl.ids, decl.rows, ids, index.series[ids])


def copy_shard(shard: ShardInfo, tables: dict[str, TablePlan], rows: dict[str, RowWriter]) -> None:
    """Copy every table of one shard (its rows kept by the scan, else from the reader it left
    open, else opened again), filling the plans' summaries and ``shard.last_time``; what the
    scan kept is released."""
    with contextlib.ExitStack() as stack:
        try:
            reader = shard.reader if shard.rows is None else None
            if reader is None and shard.rows is None:
                reader = ShardReader(shard.path)
            if reader is not None:
                stack.callback(reader.close)
            for table, plan in tables.items():
                chunks = (read_rows(reader, table, plan.limit) if reader is not None
                          else _blocks(shard.rows[table][:plan.limit]))
                cursor = plan.series["row_start"].copy()
                latest = copy_rows(chunks, plan.declared, shard.rank, plan.ids, plan.series, cursor, rows[table],
                                   shard.path.name)
                if not np.array_equal(cursor, plan.series["row_stop"]):
                    raise RowCountMismatch(f"{shard.path.name}: fewer rows of a series of {table!r} than counted")
                shard.last_time = float(np.fmax(shard.last_time, latest))
        except BAD_SHARD as exc:
            raise MergeError(f"shard changed while it was merged: {exc}") from None
    shard.rows, shard.reader = None, None


def _blocks(rows: np.ndarray) -> Iterator[np.ndarray]:
    """Kept rows in the reader's slice size: the copy's temporaries stay bounded."""
    size = COPY_BLOCK_ROWS
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _summarise(series: np.ndarray, out: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
               segments: np.ndarray) -> None:
    """Fold one chunk's segments (one per series, in logging order) into the summaries. The
    columns are copied out of the rows once: reductions over a contiguous column are several
    times faster than over the 32-byte rows, and counts that are zero (no NaN, no step going
    back: the usual case) are found without a reduction per segment."""
    step, value, when = np.ascontiguousarray(out["step"]), np.ascontiguousarray(out["value"]), out["time"]
    lasts = starts + lengths - 1
    backwards = np.r_[step[1:] < step[:-1], False]
    backwards[lasts] = False  # a segment's last row is not compared with the next segment
    before = series["count"][segments]
    fresh = before == 0
    joined_backwards = ~fresh & (step[starts] < series["last_step"][segments])
    series["runs"][segments] += _counts(backwards, starts) + fresh + joined_backwards
    series["count"][segments] = before + lengths
    series["nonfinite"][segments] += _counts(~np.isfinite(value), starts)
    series["min"][segments] = np.fmin(series["min"][segments], np.fmin.reduceat(value, starts))
    series["max"][segments] = np.fmax(series["max"][segments], np.fmax.reduceat(value, starts))
    series["first_step"][segments[fresh]] = step[starts[fresh]]
    series["first_time"][segments[fresh]] = when[starts[fresh]]
    series["last_step"][segments] = step[lasts]
    series["last"][segments] = value[lasts]
    series["last_time"][segments] = when[lasts]


def _counts(flags: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """How many ``flags`` are set in each segment from ``starts``."""
    if not flags.any():
        return np.zeros(len(starts), dtype=np.int64)
    return np.add.reduceat(flags, starts, dtype=np.int64)
