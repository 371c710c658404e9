"""Cross-rank statistics per (group, step) and the straggler report, in bounded memory.

A group is a (key, context, source, attempt): the same series on the ranks that ran
together. Groups small enough are read together in one window and aggregated at once.
A larger group whose ranks logged in lockstep (the same strictly increasing steps, the
data-parallel norm) is reduced column-wise, a block of every series at a time, without
sorting. Any other large group is streamed: one cursor per series (per monotone run of
steps, for a series whose step went backwards), read in blocks and merged by step; a step
is complete once every cursor has moved past it, so only a block per cursor is ever held.
A group with more than ``MAX_CURSORS`` monotone runs (per-epoch batch steps over thousands
of epochs) would hold too many blocks: it is read in passes instead, each pass keeping the
partials of the lowest steps not yet done (at most ``WINDOW_ROWS / 2`` of them, one per
(step, rank)), so memory stays that of a window whatever the runs; the price is one read
of the group per ``WINDOW_ROWS / 4`` distinct (step, rank) pairs.

Times that are NaN are ignored for the slowest rank and the skew; a step with no time at
all has no slowest rank (-1) and a NaN skew.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import h5py
import numpy as np

from . import layout
from .means import SCALE, UNSCALE, mean_from_sums
from .series import SeriesIndex
from .store import Appender, ArraySink, Sink

WINDOW_ROWS = 1 << 19
LOCKSTEP_MIN_ROWS = 1 << 12  # below it, a group goes into a window with its neighbours
MIN_BLOCK_ROWS = 256
MAX_CURSORS = 8192
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

@dataclass
class Partials:
    """Aggregates of runs of rows with the same (series, step), as contiguous columns
    (a structured array would make every sort and take strided, several times slower)."""

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["step"])

    def take(self, index: np.ndarray) -> Partials:
        return Partials({name: column[index] for name, column in self.columns.items()})

    @staticmethod
    def concat(parts: list[Partials]) -> Partials:
        return Partials({name: np.concatenate([p.columns[name] for p in parts]) for name in parts[0].columns})


def partials(rows: np.ndarray, group_of: np.ndarray) -> Partials:
    """Collapse each run of rows with the same (series, step) into one partial aggregate."""
    series, step, value, when = rows["series"], rows["step"], rows["value"], rows["time"]
    starts = np.flatnonzero(np.r_[len(rows) > 0, (series[1:] != series[:-1]) | (step[1:] != step[:-1])])
    isnan = np.isnan(value)
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduceat(np.where(isnan, 0.0, value), starts)
        # The overflow-safe mean's second sum (means.py): scaling a finite sum is exact, so only
        # a sum that overflowed (or met ±inf) is added up again from its scaled values.
        scaled = total * SCALE
        if not np.isfinite(total).all():
            scaled = np.add.reduceat(np.where(isnan, 0.0, value * SCALE), starts)
    return Partials({
        "group": group_of[series[starts]], "step": step[starts], "rank": rows["rank"][starts],
        "n": np.diff(np.r_[starts, len(rows)]), "nv": np.add.reduceat(~isnan, starts),
        "sum": total, "scaled": scaled, "min": np.fmin.reduceat(value, starts),
        "max": np.fmax.reduceat(value, starts), "tmin": np.fmin.reduceat(when, starts),
        "tmax": np.fmax.reduceat(when, starts)})


def combine(p: Partials) -> Partials:
    """One partial per (group, step, rank): what a step-range pass keeps stays bounded even
    when a rank logs one step many times, apart."""
    if not len(p):
        return p
    p = p.take(_by_group_step_rank(p))
    c = p.columns
    group, step, rank = c["group"], c["step"], c["rank"]
    starts = np.flatnonzero(np.r_[True, (group[1:] != group[:-1]) | (step[1:] != step[:-1])
                                  | (rank[1:] != rank[:-1])])
    if len(starts) == len(p):  # nothing to combine (steps that never repeat)
        return p
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowed sum: "scaled" stays right
        return Partials({
            "group": group[starts], "step": step[starts], "rank": rank[starts],
            **{name: np.add.reduceat(c[name], starts) for name in ("n", "nv", "sum", "scaled")},
            **{name: np.fmin.reduceat(c[name], starts) for name in ("min", "tmin")},
            **{name: np.fmax.reduceat(c[name], starts) for name in ("max", "tmax")}})


def _lowest(p: Partials, keep: int) -> Partials:
    """The partials of the lowest steps, about ``keep`` of them (all of a step or none)."""
    steps = p.columns["step"]
    if len(p) <= keep:
        return p
    cutoff = int(np.partition(steps, keep)[keep])
    if cutoff == int(steps.min()):
        cutoff += 1  # one step holds more than ``keep`` partials (at most one per rank): keep it whole
    return p.take(steps < cutoff)


def _by_group_step_rank(p: Partials) -> np.ndarray:
    """A stable order by (group, step, rank): one composite integer key when it fits, as
    partials come in a few sorted runs that a stable sort merges cheaply."""
    keys = [p.columns[name] for name in ("group", "step", "rank")]
    lows = [int(k.min()) for k in keys]
    spans = [int(k.max()) - low + 1 for k, low in zip(keys, lows, strict=True)]
    if spans[0] * spans[1] * spans[2] >= 1 << 62:
        return np.lexsort(keys[::-1])
    composite = np.zeros(len(p), dtype=np.int64)
    for key, low, span in zip(keys, lows, spans, strict=True):
        composite = composite * span + (key - low)
    return np.argsort(composite, kind="stable")


def aggregate(p: Partials) -> np.ndarray:
    """Partials (complete steps only) → one ``CROSSRANK_DTYPE`` row per (group, step)."""
    if not len(p):
        return np.empty(0, dtype=layout.CROSSRANK_DTYPE)
    c = p.take(_by_group_step_rank(p)).columns
    group, step, rank = c["group"], c["step"], c["rank"]
    new = np.r_[True, (group[1:] != group[:-1]) | (step[1:] != step[:-1])]
    starts = np.flatnonzero(new)
    new_rank = new | np.r_[True, rank[1:] != rank[:-1]]
    tmax = np.fmax.reduceat(c["tmax"], starts)
    segment = np.cumsum(new) - 1
    # The slowest rank: the first partial (lowest rank) whose latest time is the step's latest.
    candidate = np.where(c["tmax"] == tmax[segment], np.arange(len(p)), len(p))
    rank_or_none = np.r_[rank, layout.NO_VALUE]
    nv = np.add.reduceat(c["nv"], starts)
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduceat(c["sum"], starts)
    out = np.empty(len(starts), dtype=layout.CROSSRANK_DTYPE)
    out["group"], out["step"] = group[starts], step[starts]
    out["ranks"] = np.add.reduceat(new_rank, starts)
    out["count"] = np.add.reduceat(c["n"], starts)
    out["min"] = np.fmin.reduceat(c["min"], starts)
    out["max"] = np.fmax.reduceat(c["max"], starts)
    out["mean"] = mean_from_sums(total, nv, out["min"], out["max"],
                                 lambda redo: np.add.reduceat(c["scaled"], starts)[redo])
    out["slowest_rank"] = rank_or_none[np.minimum.reduceat(candidate, starts)]
    out["skew"] = tmax - np.fmin.reduceat(c["tmin"], starts)
    return out


def lockstep(group: int, steps: np.ndarray, values: np.ndarray, times: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``aggregate`` for a block where series ``i`` (row ``i`` of ``values`` and ``times``, rank
    ``ranks[i]``, ascending) has one point at each of ``steps``: reductions down the columns."""
    out = np.empty(len(steps), dtype=layout.CROSSRANK_DTYPE)
    out["group"], out["step"] = group, steps
    out["ranks"] = out["count"] = len(ranks)
    out["min"] = np.fmin.reduce(values, axis=0)
    out["max"] = np.fmax.reduce(values, axis=0)
    valid = ~np.isnan(values)
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.where(valid, values, 0.0).sum(axis=0)
    out["mean"] = mean_from_sums(total, valid.sum(axis=0), out["min"], out["max"],
                                 lambda redo: np.where(valid[:, redo], values[:, redo] * SCALE, 0.0).sum(axis=0))
    tmax = np.fmax.reduce(times, axis=0)
    latest = times == tmax
    out["slowest_rank"] = np.where(latest.any(axis=0), ranks[latest.argmax(axis=0)], layout.NO_VALUE)
    out["skew"] = tmax - np.fmin.reduce(times, axis=0)
    return out


RangeStats = tuple[np.ndarray, np.ndarray, np.ndarray]  # crossrank rows, slowest rows, groups rows


def ranges(row_stop: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges of groups with about equal rows (some may be empty)."""
    total = int(row_stop[-1]) if len(row_stop) else 0
    cuts = [0] + [int(np.searchsorted(row_stop, total * k / parts, side="left")) for k in range(1, parts)]
    cuts.append(len(row_stop))
    cuts = np.maximum.accumulate(cuts).tolist()
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def gather(parent: h5py.Group, groups: np.ndarray, bounds: list[tuple[int, int]], answers: list[RangeStats]) -> None:
    """``crossrank`` and ``slowest`` of ``parent`` from the ranges' answers (``CrossRank.in_range``),
    in order; each range's groups rows, their ``stat_start`` moved to where its rows landed."""
    stats = Appender(parent, layout.CROSSRANK, layout.CROSSRANK_DTYPE)
    slowest = Appender(parent, layout.SLOWEST, layout.SLOWEST_DTYPE)
    for (a, b), (stat_rows, slow, report) in zip(bounds, answers, strict=True):
        report["stat_start"] += stats.size
        report["stat_stop"] += stats.size
        groups[a:b] = report
        stats.extend(stat_rows)
        slowest.extend(slow)
    stats.flush()
    slowest.flush()


@dataclass
class _Tally:
    """The straggler report of one group, built from its cross-rank rows as they come."""

    start: int = -1
    steps: int = 0
    multi: int = 0
    timed: int = 0  # multi-rank steps with a skew (not NaN)
    skew_sum: float = 0.0  # times means.SCALE: crafted times must not overflow the mean skew
    skew_max: float = -math.inf
    skew_max_step: int = layout.NO_VALUE
    slowest: Counter = field(default_factory=Counter)


class _NotLockstep(Exception):
    """A block showed that the ranks of a group did not log the same steps."""


@dataclass
class _Cursor:
    pos: int
    stop: int
    frontier: float = -math.inf


class CrossRank:
    """Writes ``crossrank`` and ``slowest`` of one table and fills the groups' report columns."""

    def __init__(self, index: SeriesIndex, rows: np.ndarray, stats: Sink, slowest: Sink) -> None:
        self.index = index
        self.rows = rows  # the table's merged rows, a memory map of the staged file (rowstage.py)
        self.stats = stats  # crossrank rows; ``stat_start`` of the groups counts from its first row
        self.slowest = slowest
        self.group_of = index.series["group"]
        self.tallies: dict[int, _Tally] = {}
        self._frontier = 0  # where the crossrank rows of the last group finished end

    @classmethod
    def into(cls, parent: h5py.Group, index: SeriesIndex, rows: np.ndarray) -> CrossRank:
        """Writing ``crossrank`` and ``slowest`` of ``parent`` (a table's group of merged.h5)."""
        return cls(index, rows, Appender(parent, layout.CROSSRANK, layout.CROSSRANK_DTYPE),
                   Appender(parent, layout.SLOWEST, layout.SLOWEST_DTYPE))

    @classmethod
    def in_range(cls, index: SeriesIndex, rows: np.ndarray, first: int, stop: int) -> RangeStats:
        """Groups ``first`` to ``stop`` in memory: their crossrank and slowest rows, and their
        rows of ``index.groups`` (``stat_start`` counting from the range's first row), for
        ``gather``."""
        stats, slowest = ArraySink(layout.CROSSRANK_DTYPE), ArraySink(layout.SLOWEST_DTYPE)
        cls(index, rows, stats, slowest).run(first, stop)
        return stats.array(), slowest.array(), index.groups[first:stop].copy()

    @classmethod
    def in_threads(cls, parent: h5py.Group, index: SeriesIndex, rows: np.ndarray, threads: int) -> None:
        """``into(...).run()`` with the groups split into ``threads`` ranges of about equal rows,
        computed at once (numpy lets the GIL go in the reductions); the same tables."""
        if threads <= 1 or len(index.groups) < 2:
            cls.into(parent, index, rows).run()
            return
        bounds = ranges(index.groups["row_stop"], threads)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prov4ml-crossrank") as pool:
            answers = list(pool.map(lambda ab: cls.in_range(index, rows, *ab), bounds))
        gather(parent, index.groups, bounds, answers)

    def run(self, first: int = 0, stop: int | None = None) -> None:
        """The groups ``first`` to ``stop`` (all by default): a parallel merge gives each process
        a range, and each group's statistics are the same whichever range it is in."""
        groups = self.index.groups
        stop = len(groups) if stop is None else stop
        # One rank: nothing to compare, its series is its statistics.
        compared = groups["series_stop"] - groups["series_start"] >= 2
        lockstep_next = self._lockstep_candidates(compared)
        self._frontier = self.stats.size
        g = first
        while g < stop:
            if not compared[g]:
                self._finish(g, _Tally())
                g += 1
                continue
            if lockstep_next[g] == g and self._try_lockstep(g):
                g += 1
                continue
            start = int(groups["row_start"][g])
            if groups["row_stop"][g] - start > WINDOW_ROWS:
                self._emit(self._stream(g), [g])
                g += 1
                continue
            last = int(np.searchsorted(groups["row_stop"], start + WINDOW_ROWS, side="right"))
            last = min(last, int(lockstep_next[g + 1]), stop)
            rows = self.rows[start:int(groups["row_stop"][last - 1])]
            p = partials(rows, self.group_of)
            self._emit(iter([aggregate(p.take(compared[p.columns["group"]]))]), range(g, last))
            g = last
        self.stats.flush()
        self.slowest.flush()

    def write_combined(self, batches: Iterable[tuple[np.ndarray, range]]) -> None:
        """``run`` for rows aggregated elsewhere (the hierarchical merge's node parts, combine.py):
        batches in group order, each with the groups it completes; the same tables and report."""
        self._frontier = self.stats.size
        for rows, done in batches:
            self._emit(iter([rows] if len(rows) else []), done)
        self.stats.flush()
        self.slowest.flush()

    def _lockstep_candidates(self, compared: np.ndarray) -> np.ndarray:
        """For each group, the first group from it on worth trying in lockstep (``len(groups)``
        if none): compared, at least ``LOCKSTEP_MIN_ROWS`` rows, series of one non-zero length
        whose steps never went back. Windows of small groups stop before such a group."""
        groups, series = self.index.groups, self.index.series
        candidate = compared & (groups["row_stop"] - groups["row_start"] >= LOCKSTEP_MIN_ROWS)
        if len(groups):
            firsts = groups["series_start"]
            count, runs = series["count"], series["runs"]
            candidate &= ((np.minimum.reduceat(count, firsts) == np.maximum.reduceat(count, firsts))
                          & (np.minimum.reduceat(count, firsts) > 0) & (np.maximum.reduceat(runs, firsts) == 1))
        ahead = np.where(candidate, np.arange(len(groups)), len(groups))
        return np.r_[np.minimum.accumulate(ahead[::-1])[::-1], len(groups)]

    def _try_lockstep(self, g: int) -> bool:
        """Lockstep if every block confirms it; else the blocks written are dropped again."""
        mark = self.stats.size
        try:
            self._emit(self._lockstep(g), [g])
            return True
        except _NotLockstep:
            self.stats.truncate(mark)
            self.tallies.pop(g, None)
            return False

    def _lockstep(self, g: int) -> Iterator[np.ndarray]:
        group, series = self.index.groups[g], self.index.series
        chosen = slice(int(group["series_start"]), int(group["series_stop"]))
        starts, ranks = series["row_start"][chosen].tolist(), series["rank"][chosen]
        count = int(series["count"][chosen][0])
        block = max(MIN_BLOCK_ROWS, WINDOW_ROWS // len(starts))
        previous = None
        for a in range(0, count, block):
            parts = [self.rows[s + a:s + min(count, a + block)] for s in starts]
            steps = parts[0]["step"]
            if ((previous is not None and steps[0] <= previous) or (steps[1:] <= steps[:-1]).any()
                    or not all(np.array_equal(p["step"], steps) for p in parts[1:])):
                raise _NotLockstep
            previous = steps[-1]
            yield lockstep(g, steps, np.stack([p["value"] for p in parts]), np.stack([p["time"] for p in parts]),
                           ranks)

    def _emit(self, batches: Iterator[np.ndarray], groups: range | list[int]) -> None:
        for rows in batches:
            self._tally(rows, self.stats.size)
            self.stats.extend(rows)
        for g in groups:
            self._finish(g, self.tallies.pop(g, _Tally()))

    def _tally(self, rows: np.ndarray, base: int) -> None:
        starts = np.flatnonzero(np.r_[True, rows["group"][1:] != rows["group"][:-1]]) if len(rows) else []
        for a, b in zip(starts, [*starts[1:], len(rows)], strict=True):
            part = rows[a:b]
            tally = self.tallies.setdefault(int(part["group"][0]), _Tally())
            if tally.start < 0:
                tally.start = base + int(a)
            tally.steps += len(part)
            kept = (part["ranks"] >= 2)
            tally.multi += int(np.count_nonzero(kept))
            kept &= ~np.isnan(part["skew"])
            multi = part if kept.all() else part[kept]
            if not len(multi):
                continue
            tally.timed += len(multi)
            tally.skew_sum += float((multi["skew"] * SCALE).sum())
            top = int(np.argmax(multi["skew"]))
            if multi["skew"][top] > tally.skew_max:
                tally.skew_max, tally.skew_max_step = float(multi["skew"][top]), int(multi["step"][top])
            slowest = multi["slowest_rank"]
            counts = np.bincount(slowest[slowest >= 0])
            ranks = np.flatnonzero(counts)
            tally.slowest.update(dict(zip(ranks.tolist(), counts[ranks].tolist(), strict=True)))

    def _finish(self, g: int, tally: _Tally) -> None:
        row = self.index.groups[g:g + 1]
        # A group without steps gets the empty range where its rows would be, after the previous
        # group's: the same however the groups were batched (or split between processes).
        start = tally.start if tally.steps else self._frontier
        self._frontier = start + tally.steps
        row["stat_start"], row["stat_stop"] = start, start + tally.steps
        row["multi_rank_steps"] = tally.multi
        row["skew_mean"] = min(tally.skew_sum / tally.timed * UNSCALE, tally.skew_max) if tally.timed else math.nan
        row["skew_max"] = tally.skew_max if tally.timed else math.nan
        row["skew_max_step"] = tally.skew_max_step
        # Most often slowest; ties go to the lower rank.
        rank, steps = min(tally.slowest.items(), key=lambda rc: (-rc[1], rc[0]), default=(layout.NO_VALUE, 0))
        row["slowest_rank"], row["slowest_steps"] = rank, steps
        for r in sorted(tally.slowest):
            self.slowest.add((g, r, tally.slowest[r]))

    def _stream(self, g: int) -> Iterator[np.ndarray]:
        """A large group: k-way merge of its monotone runs, emitting complete steps."""
        series = self.index.series[int(self.index.groups["series_start"][g]):int(self.index.groups["series_stop"][g])]
        if int(series["runs"].sum()) > MAX_CURSORS:
            yield from self._step_ranges(g)
            return
        cursors = self._cursors(g)
        block = max(MIN_BLOCK_ROWS, WINDOW_ROWS // max(1, len(cursors)))
        pending: list[Partials] = []
        while cursors:
            low = min(c.frontier for c in cursors)
            for c in cursors:
                if c.frontier == low:
                    rows = self.rows[c.pos:min(c.stop, c.pos + block)]
                    c.pos += len(rows)
                    c.frontier = int(rows["step"][-1])
                    pending.append(partials(rows, self.group_of))
            cursors = [c for c in cursors if c.pos < c.stop]
            bound = min((c.frontier for c in cursors), default=math.inf)
            p = Partials.concat(pending)
            done = p.columns["step"] < bound
            pending = [p.take(~done)]
            if done.any():
                yield aggregate(p.take(done))

    def _step_ranges(self, g: int) -> Iterator[np.ndarray]:
        """Passes over the group's rows: each keeps, combined per (step, rank), the partials of
        the lowest steps from ``done_below`` on (at most ``WINDOW_ROWS / 2``) and emits them.
        The first pass notes each block's step range, so later passes read only the blocks
        that hold steps still wanted (all of them for shuffled steps, few for long runs)."""
        start, stop = int(self.index.groups["row_start"][g]), int(self.index.groups["row_stop"][g])
        block = max(MIN_BLOCK_ROWS, WINDOW_ROWS // 4)  # the window's peak memory: blocks, partials and sorts
        spans: dict[int, tuple[int, int]] = {}  # block start → least and greatest step
        done_below = INT64_MIN
        while True:
            cutoff = INT64_MAX + 1  # steps from it on are left to a later pass
            kept: list[Partials] = []
            size = 0
            # Blocks by their least step once known: the lowest steps fill the pass first, and
            # the cutoff they set lets the later blocks be skipped unread.
            for a in sorted(spans, key=lambda a: spans[a][0]) if spans else range(start, stop, block):
                low, high = spans.get(a, (done_below, done_below))
                if high < done_below or low >= cutoff:
                    continue
                rows = self.rows[a:min(stop, a + block)]
                step = rows["step"]
                spans.setdefault(a, (int(step.min()), int(step.max())))
                wanted = (step >= done_below) & (step < cutoff)
                if not wanted.all():
                    rows = rows[wanted]
                if not len(rows):
                    continue
                kept.append(combine(partials(rows, self.group_of)))
                size += len(kept[-1])
                if size > WINDOW_ROWS // 2:
                    combined = combine(Partials.concat(kept))
                    p = _lowest(combined, WINDOW_ROWS // 4)
                    if len(p) < len(combined):
                        cutoff = int(p.columns["step"].max()) + 1
                    kept, size = [p], len(p)
            if kept:
                yield aggregate(Partials.concat(kept))
            if cutoff > INT64_MAX:
                return
            done_below = cutoff

    def _cursors(self, g: int) -> list[_Cursor]:
        """One cursor per monotone run of steps of each series of the group."""
        groups, series = self.index.groups, self.index.series
        cursors: list[_Cursor] = []
        for s in range(int(groups["series_start"][g]), int(groups["series_stop"][g])):
            start, stop = int(series["row_start"][s]), int(series["row_stop"][s])
            if start == stop:
                continue
            if series["runs"][s] == 1:
                cursors.append(_Cursor(start, stop))
            else:
                cursors += [_Cursor(a, b) for a, b in self._runs(start, stop)]
        return cursors

    def _runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Row ranges where the step never decreases (a second read of this series only)."""
        bounds, previous = [start], None
        for a in range(start, stop, WINDOW_ROWS):
            steps = self.rows["step"][a:min(stop, a + WINDOW_ROWS)]
            if previous is not None and steps[0] < previous:
                bounds.append(a)
            bounds += (np.flatnonzero(steps[1:] < steps[:-1]) + 1 + a).tolist()
            previous = steps[-1]
        return list(zip(bounds, [*bounds[1:], stop], strict=True))
