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
from ..shard import ShardReader
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
    """
    # Sort key: each declared series' position in global order, dense, so segments come out in
    # ascending destination order and radix-sortable.
    order_of = np.empty(len(ids), dtype=np.uint16 if len(ids) <= 1 << 16 else np.int64)
    order_of[np.argsort(ids)] = np.arange(len(ids))
    latest = -math.inf
    for chunk in chunks:
        slot, valid = local_index(declared, chunk["series"])
        if not valid.all():
            chunk, slot = chunk[valid], slot[valid]
        if not len(chunk):
            continue
        order = np.argsort(order_of[slot], kind="stable")
        slot = slot[order]
        out = np.empty(len(chunk), dtype=layout.ROW_DTYPE)
        out["series"] = ids[slot]
        out["rank"] = rank
        for name in ("step", "value", "time"):
            out[name] = chunk[name].take(order)
        starts = np.flatnonzero(np.r_[True, slot[1:] != slot[:-1]])
        lengths = np.diff(np.r_[starts, len(out)])
        segments = slot[starts]
        if (cursor[segments] + lengths > series["row_stop"][segments]).any():
            raise RowCountMismatch(f"{where}: more rows of a series than counted")
        rows.scatter(out, starts, cursor[segments], lengths)
        cursor[segments] += lengths
        _summarise(series, out, starts, lengths, segments)
        latest = max(latest, float(out["time"].max()))
    return latest if latest > -math.inf else math.nan


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


def _blocks(rows: np.ndarray, size: int = 1 << 18) -> Iterator[np.ndarray]:
    """Kept rows in the reader's slice size: the copy's temporaries stay bounded."""
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _summarise(series: np.ndarray, out: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
               segments: np.ndarray) -> None:
    """Fold one chunk's segments (one per series, in logging order) into the summaries."""
    step, value, when = out["step"], out["value"], out["time"]
    lasts = starts + lengths - 1
    backwards = np.r_[step[1:] < step[:-1], False]
    backwards[lasts] = False  # a segment's last row is not compared with the next segment
    before = series["count"][segments]
    fresh = before == 0
    joined_backwards = ~fresh & (step[starts] < series["last_step"][segments])
    series["runs"][segments] += np.add.reduceat(backwards, starts) + fresh + joined_backwards
    series["count"][segments] = before + lengths
    series["nonfinite"][segments] += np.add.reduceat(~np.isfinite(value), starts)
    series["min"][segments] = np.fmin(series["min"][segments], np.fmin.reduceat(value, starts))
    series["max"][segments] = np.fmax(series["max"][segments], np.fmax.reduceat(value, starts))
    series["first_step"][segments[fresh]] = step[starts[fresh]]
    series["first_time"][segments[fresh]] = when[starts[fresh]]
    series["last_step"][segments] = step[lasts]
    series["last"][segments] = value[lasts]
    series["last_time"][segments] = when[lasts]
