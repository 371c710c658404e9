"""Per-(group, step) partial cross-rank aggregates that combine exactly, for the hierarchical
merge (``parts.py`` writes them per node, ``combine.py`` adds the nodes' up on rank 0).

A step row (``STEP_FIELDS``, kept as columns in a ``crossrank.Partials``: contiguous arrays
are several times faster to reduce and to read from HDF5 than a compound) holds what a final
``CROSSRANK_DTYPE`` row is made of, never a mean:
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

STEP_FIELDS = {"group": "<i4", "step": "<i8", "ranks": "<i4", "n": "<i8", "nv": "<i8", "sum": "<f8", "scaled": "<f8",
               "min": "<f8", "max": "<f8", "tmin": "<f8", "tmax": "<f8", "slowest": "<i4"}
_SUMS = ("ranks", "n", "nv", "sum", "scaled")
_EXTREMES = (("min", np.fmin), ("tmin", np.fmin), ("max", np.fmax), ("tmax", np.fmax))
_NO_RANK = np.iinfo(np.int32).max


def empty() -> Partials:
    return Partials({name: np.empty(0, dtype=dtype) for name, dtype in STEP_FIELDS.items()})


def from_partials(p: Partials) -> Partials:
    """``crossrank.partials`` of some rows (every row of a step present) → one row per (group, step)."""
    if not len(p):
        return empty()
    c = combine(p).columns  # sorted by (group, step, rank), one row per rank
    out = {name: c[name].astype(dtype, copy=False) for name, dtype in STEP_FIELDS.items()
           if name not in ("ranks", "slowest")}
    out["ranks"] = np.ones(len(c["step"]), dtype=np.int32)
    out["slowest"] = np.where(np.isnan(c["tmax"]), layout.NO_VALUE, c["rank"]).astype(np.int32)
    return reduce_steps(Partials(out))


def reduce_steps(rows: Partials) -> Partials:
    """Rows sorted by (group, step), each step's rows from disjoint ranks → one row per step."""
    c = rows.columns
    if not len(rows):
        return rows
    group, step = c["group"], c["step"]
    new = np.r_[True, (group[1:] != group[:-1]) | (step[1:] != step[:-1])]
    starts = np.flatnonzero(new)
    if len(starts) == len(rows):
        return rows
    out = {"group": group[starts], "step": step[starts]}
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowed sum: "scaled" stays right
        for name in _SUMS:
            out[name] = np.add.reduceat(c[name], starts).astype(STEP_FIELDS[name], copy=False)
    for name, ufunc in _EXTREMES:
        out[name] = ufunc.reduceat(c[name], starts)
    # The slowest: the lowest rank among the rows whose latest time is the step's latest.
    latest = c["tmax"] == out["tmax"][np.cumsum(new) - 1]
    slowest = np.minimum.reduceat(np.where(latest, c["slowest"], _NO_RANK), starts)
    out["slowest"] = np.where(slowest == _NO_RANK, layout.NO_VALUE, slowest).astype(np.int32)
    return Partials(out)


def merge_sorted(parts: Sequence[Partials]) -> Partials:
    """Several nodes' rows of one group, each sorted by step → one row per step (each node
    numbers its groups its own way: the group column is left to ``to_crossrank``)."""
    if len(parts) == 1:
        return parts[0]
    if all(np.array_equal(p.columns["step"], parts[0].columns["step"]) for p in parts[1:]):
        return _columns(parts)  # the nodes logged the same steps (data parallel): no sort
    rows = Partials.concat(list(parts))
    rows = rows.take(np.argsort(rows.columns["step"], kind="stable"))
    rows.columns["group"] = np.zeros(len(rows), dtype=np.int32)
    return reduce_steps(rows)


def _columns(parts: Sequence[Partials]) -> Partials:
    """``merge_sorted`` of rows with the same steps: folded node after node."""
    first = parts[0].columns
    out = {name: first[name].copy() for name in STEP_FIELDS}
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowed sum: "scaled" stays right
        for p in parts[1:]:
            for name in _SUMS:
                out[name] += p.columns[name]
            for name, ufunc in _EXTREMES:
                ufunc(out[name], p.columns[name], out=out[name])
    slowest = np.full(len(parts[0]), _NO_RANK, dtype=np.int32)
    for p in parts:  # the lowest rank among the nodes' slowest whose latest time is the step's
        np.minimum(slowest, np.where(p.columns["tmax"] == out["tmax"], p.columns["slowest"], _NO_RANK), out=slowest)
    out["slowest"] = np.where(slowest == _NO_RANK, np.int32(layout.NO_VALUE), slowest)
    return Partials(out)


def to_crossrank(rows: Partials, group: int) -> np.ndarray:
    """Complete steps of one group → its ``CROSSRANK_DTYPE`` rows."""
    c = rows.columns
    out = np.empty(len(rows), dtype=layout.CROSSRANK_DTYPE)
    out["group"], out["step"] = group, c["step"]
    out["ranks"], out["count"] = c["ranks"], c["n"]
    out["min"], out["max"] = c["min"], c["max"]
    out["mean"] = mean_from_sums(c["sum"], c["nv"], c["min"], c["max"], lambda redo: c["scaled"][redo])
    out["slowest_rank"] = c["slowest"]
    out["skew"] = c["tmax"] - c["tmin"]
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
