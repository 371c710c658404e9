"""Cross-rank statistics per (group, step) and the straggler report, in bounded memory.

A group is a (key, context, source, attempt): the same series on the ranks that ran
together. Groups small enough are read together in one window and aggregated at once.
A larger group whose ranks logged in lockstep (the same strictly increasing steps, the
data-parallel norm) is reduced column-wise, a block of every series at a time, without
sorting. Any other large group is streamed: one cursor per series (per monotone run of
steps, for a series whose step went backwards), read in blocks and merged by step; a step
is complete once every cursor has moved past it, so only a block per cursor is ever held.

Times that are NaN are ignored for the slowest rank and the skew; a step with no time at
all has no slowest rank (-1) and a NaN skew.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import h5py
import numpy as np

from . import layout
from .series import SeriesIndex
from .store import Appender

WINDOW_ROWS = 1 << 19
LOCKSTEP_MIN_ROWS = 1 << 12  # below it, a group goes into a window with its neighbours
MIN_BLOCK_ROWS = 256
MAX_CURSORS = 8192

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
    return Partials({
        "group": group_of[series[starts]], "step": step[starts], "rank": rows["rank"][starts],
        "n": np.diff(np.r_[starts, len(rows)]), "nv": np.add.reduceat(~isnan, starts),
        "sum": np.add.reduceat(np.where(isnan, 0.0, value), starts), "min": np.fmin.reduceat(value, starts),
        "max": np.fmax.reduceat(value, starts), "tmin": np.fmin.reduceat(when, starts),
        "tmax": np.fmax.reduceat(when, starts)})


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
    total = np.add.reduceat(c["sum"], starts)
    out = np.empty(len(starts), dtype=layout.CROSSRANK_DTYPE)
    out["group"], out["step"] = group[starts], step[starts]
    out["ranks"] = np.add.reduceat(new_rank, starts)
    out["count"] = np.add.reduceat(c["n"], starts)
    out["min"] = np.fmin.reduceat(c["min"], starts)
    out["max"] = np.fmax.reduceat(c["max"], starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mean"] = np.where(nv > 0, total / np.maximum(nv, 1), math.nan)
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
    nv = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mean"] = np.where(nv > 0, np.where(valid, values, 0.0).sum(axis=0) / np.maximum(nv, 1), math.nan)
    tmax = np.fmax.reduce(times, axis=0)
    latest = times == tmax
    out["slowest_rank"] = np.where(latest.any(axis=0), ranks[latest.argmax(axis=0)], layout.NO_VALUE)
    out["skew"] = tmax - np.fmin.reduce(times, axis=0)
    return out


@dataclass
class _Tally:
    """The straggler report of one group, built from its cross-rank rows as they come."""

    start: int = -1
    steps: int = 0
    multi: int = 0
    timed: int = 0  # multi-rank steps with a skew (not NaN)
    skew_sum: float = 0.0
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

    def __init__(self, parent: h5py.Group, index: SeriesIndex, problems: list[str]) -> None:
        self.index = index
        self.rows = parent[layout.ROWS]
        self.problems = problems
        self.stats = Appender(parent, layout.CROSSRANK, layout.CROSSRANK_DTYPE)
        self.slowest = Appender(parent, layout.SLOWEST, layout.SLOWEST_DTYPE)
        self.group_of = index.series["group"]
        self.tallies: dict[int, _Tally] = {}

    def run(self) -> None:
        groups = self.index.groups
        # One rank: nothing to compare, its series is its statistics.
        compared = groups["series_stop"] - groups["series_start"] >= 2
        lockstep_next = self._lockstep_candidates(compared)
        g = 0
        while g < len(groups):
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
            last = min(last, int(lockstep_next[g + 1]))
            rows = self.rows[start:int(groups["row_stop"][last - 1])]
            p = partials(rows, self.group_of)
            self._emit(iter([aggregate(p.take(compared[p.columns["group"]]))]), range(g, last))
            g = last
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
            tally.skew_sum += float(multi["skew"].sum())
            top = int(np.argmax(multi["skew"]))
            if multi["skew"][top] > tally.skew_max:
                tally.skew_max, tally.skew_max_step = float(multi["skew"][top]), int(multi["step"][top])
            slowest = multi["slowest_rank"]
            counts = np.bincount(slowest[slowest >= 0])
            ranks = np.flatnonzero(counts)
            tally.slowest.update(dict(zip(ranks.tolist(), counts[ranks].tolist(), strict=True)))

    def _finish(self, g: int, tally: _Tally) -> None:
        row = self.index.groups[g:g + 1]
        start = tally.start if tally.steps else self.stats.size
        row["stat_start"], row["stat_stop"] = start, start + tally.steps
        row["multi_rank_steps"] = tally.multi
        row["skew_mean"] = tally.skew_sum / tally.timed if tally.timed else math.nan
        row["skew_max"] = tally.skew_max if tally.timed else math.nan
        row["skew_max_step"] = tally.skew_max_step
        # Most often slowest; ties go to the lower rank.
        rank, steps = min(tally.slowest.items(), key=lambda rc: (-rc[1], rc[0]), default=(layout.NO_VALUE, 0))
        row["slowest_rank"], row["slowest_steps"] = rank, steps
        for r in sorted(tally.slowest):
            self.slowest.add((g, r, tally.slowest[r]))

    def _stream(self, g: int) -> Iterator[np.ndarray]:
        """A large group: k-way merge of its monotone runs, emitting complete steps."""
        cursors = self._cursors(g)
        if cursors is None:
            return
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

    def _cursors(self, g: int) -> list[_Cursor] | None:
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
            if len(cursors) > MAX_CURSORS:
                self.problems.append(
                    f"no cross-rank statistics for {self.index.table} key {groups['key'][g]!r} context "
                    f"{groups['context'][g]!r}: its steps go backwards more than {MAX_CURSORS} times")
                return None
        return cursors

    def _runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Row ranges where the step never decreases (a second read of this series only)."""
        bounds, previous = [start], None
        for a in range(start, stop, WINDOW_ROWS):
            steps = self.rows.fields("step")[a:min(stop, a + WINDOW_ROWS)]
            if previous is not None and steps[0] < previous:
                bounds.append(a)
            bounds += (np.flatnonzero(steps[1:] < steps[:-1]) + 1 + a).tolist()
            previous = steps[-1]
            if len(bounds) > MAX_CURSORS:
                break
        return list(zip(bounds, [*bounds[1:], stop], strict=True))
