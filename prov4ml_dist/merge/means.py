"""Means that do not overflow: the cross-rank mean, the mean skew, the summary's means.

A plain sum then a divide overflows when the values are near the float limit (two ranks
logging 1.7e308 give ``inf``; 1.7e308 twice and ``-inf`` give ``nan``). The plain sum is
kept wherever it is finite (it is exact to the last bit there, and cheap); only where it is
not, the mean is taken again from sums scaled by 2**-64: a power of two, so scaling changes
no digit of a normal number, and 2**63 values of up to the float limit cannot overflow it.
The rule that follows: the mean of finite values is finite (and between their min and max);
``+inf`` among them gives ``+inf``, ``-inf`` gives ``-inf``, both give NaN; NaN values are
ignored, and a mean of no values is NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

SCALE = 2.0**-64
UNSCALE = 2.0**64


def mean_from_sums(total: np.ndarray, count: np.ndarray, low: np.ndarray, high: np.ndarray,
                   scaled_total: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``total / count`` where that is finite, NaN where ``count`` is 0; elsewhere the sum of the
    values times ``SCALE`` (``scaled_total(where)``, asked only for those places) decides,
    clipped to ``[low, high]`` (the NaN-ignoring min and max) against rounding at the limit."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        redo = (count > 0) & ~np.isfinite(mean)
        if redo.any():
            mean[redo] = np.clip(scaled_total(redo) / count[redo] * UNSCALE, low[redo], high[redo])
    return mean


def nanmean(values: np.ndarray) -> np.ndarray:
    """The mean down axis 0, NaN ignored (NaN where every value is), overflow-safe."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return np.full(values.shape[1:], np.nan)
    valid = ~np.isnan(values)
    count = valid.sum(axis=0)
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.where(valid, values, 0.0).sum(axis=0)

        def scaled(redo: np.ndarray) -> np.ndarray:
            return np.where(valid, values * SCALE, 0.0).sum(axis=0)[redo]

        low, high = np.fmin.reduce(values, axis=0), np.fmax.reduce(values, axis=0)
        return mean_from_sums(np.asarray(total), np.asarray(count), np.asarray(low), np.asarray(high), scaled)


def mean_of(values: Iterable[float]) -> float:
    """``nanmean`` of Python numbers (``statistics.fmean`` raises OverflowError on 1.7e308 twice
    and ValueError on ``inf`` with ``-inf``); NaN when there are none."""
    values = np.fromiter(values, dtype=np.float64)
    return float(nanmean(values)) if len(values) else float("nan")
