"""Per-(group, step) partial cross-rank aggregates that combine exactly, for the hierarchical
merge (``parts.py`` writes them per node, ``combine.py`` adds the nodes' up on rank 0).

A ``STEP_DTYPE`` row holds what a final ``CROSSRANK_DTYPE`` row is made of, never a mean:
points ``n``, non-NaN points ``nv``, their ``sum`` and the overflow-safe scaled sum
(``means.py``), ``min``/``max`` (NaN ignored), the earliest and latest time and the lowest
rank with that latest time (``slowest``, -1 when every time is NaN), and the distinct
ranks. Each is associative and the ranks of two nodes never overlap within a group (a
group is one attempt, and a (rank, attempt) has one shard), so adding the nodes' rows gives
the single-process statistics exactly; only ``mean`` may differ in the last bits, as the
sums are added in another order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from . import layout
from .crossrank import Partials, combine
from .means import mean_from_sums

STEP_DTYPE = np.dtype([
    ("group", "<i4"), ("step", "<i8"), ("ranks", "<i4"), ("n", "<i8"), ("nv", "<i8"), ("sum", "<f8"),
    ("scaled", "<f8"), ("min", "<f8"), ("max", "<f8"), ("tmin", "<f8"), ("tmax", "<f8"), ("slowest", "<i4")])

_NO_RANK = np.iinfo(np.int32).max


def from_partials(p: Partials) -> np.ndarray:
    """``crossrank.partials`` of some rows (every row of a step present) → one row per (group, step)."""
    if not len(p):
        return np.empty(0, dtype=STEP_DTYPE)
    c = combine(p).columns  # sorted by (group, step, rank), one row per rank
    out = np.empty(len(c["step"]), dtype=STEP_DTYPE)
    for name in ("group", "step", "n", "nv", "sum", "scaled", "min", "max", "tmin", "tmax"):
        out[name] = c[name]
    out["ranks"] = 1
    out["slowest"] = np.where(np.isnan(c["tmax"]), layout.NO_VALUE, c["rank"])
    return reduce_steps(out)


def reduce_steps(rows: np.ndarray) -> np.ndarray:
    """Rows sorted by (group, step), each step's rows from disjoint ranks → one row per step."""
    if not len(rows):
        return rows
    group, step = rows["group"], rows["step"]
    new = np.r_[True, (group[1:] != group[:-1]) | (step[1:] != step[:-1])]
    starts = np.flatnonzero(new)
    if len(starts) == len(rows):
        return rows
    out = np.empty(len(starts), dtype=STEP_DTYPE)
    out["group"], out["step"] = group[starts], step[starts]
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowed sum: "scaled" stays right
        for name in ("ranks", "n", "nv", "sum", "scaled"):
            out[name] = np.add.reduceat(rows[name], starts)
    for name, ufunc in (("min", np.fmin), ("tmin", np.fmin), ("max", np.fmax), ("tmax", np.fmax)):
        out[name] = ufunc.reduceat(rows[name], starts)
    # The slowest: the lowest rank among the rows whose latest time is the step's latest.
    latest = rows["tmax"] == out["tmax"][np.cumsum(new) - 1]
    slowest = np.minimum.reduceat(np.where(latest, rows["slowest"], _NO_RANK), starts)
    out["slowest"] = np.where(slowest == _NO_RANK, layout.NO_VALUE, slowest)
    return out


def merge_sorted(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Several nodes' rows of one group, each sorted by step → one row per step (each node
    numbers its groups its own way: the group column is left to ``to_crossrank``)."""
    if len(parts) == 1:
        return parts[0]
    rows = np.concatenate(parts)
    rows = rows[np.argsort(rows["step"], kind="stable")]
    rows["group"] = 0
    return reduce_steps(rows)


def to_crossrank(rows: np.ndarray, group: int) -> np.ndarray:
    """Complete steps of one group → its ``CROSSRANK_DTYPE`` rows."""
    out = np.empty(len(rows), dtype=layout.CROSSRANK_DTYPE)
    out["group"], out["step"] = group, rows["step"]
    out["ranks"], out["count"] = rows["ranks"], rows["n"]
    out["min"], out["max"] = rows["min"], rows["max"]
    out["mean"] = mean_from_sums(rows["sum"], rows["nv"], rows["min"], rows["max"], lambda redo: rows["scaled"][redo])
    out["slowest_rank"] = rows["slowest"]
    out["skew"] = rows["tmax"] - rows["tmin"]
    return out


def step_slabs(steps: Sequence[np.ndarray], limit: int) -> Iterator[list[tuple[int, int]]]:
    """Cut arrays of non-decreasing steps at common steps into slabs of about ``limit`` rows
    in all: per slab, each array's (start, stop). A step is never split between slabs."""
    total = sum(len(a) for a in steps)
    if total <= limit:
        yield [(0, len(a)) for a in steps]
        return
    longest = max(steps, key=len)
    pieces = -(-total // limit)
    bounds = np.unique(longest[np.linspace(0, len(longest), pieces + 1)[1:-1].astype(np.int64)])
    cuts = [np.r_[0, np.searchsorted(a, bounds, side="left"), len(a)] for a in steps]
    for k in range(len(bounds) + 1):
        yield [(int(c[k]), int(c[k + 1])) for c in cuts]
