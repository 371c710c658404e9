"""Thinning long series to what a chart can show, keeping what matters on it: the extremes.

Min/max per bucket: the x range is cut into equal buckets and each keeps its lowest and its
highest point (in x order), so a spike or a dip survives however long the series is and a
series of any length becomes at most ``2 * buckets`` points. Bands (min / mean / max across
ranks at each step) keep the lowest min, the mean of the means and the highest max of each
bucket, so the envelope drawn is never narrower than the data's.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..merge.means import nanmean


def _bucket_of(x: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket (0 .. buckets-1) of each x, equal widths over [min x, max x]."""
    lo, hi = float(x[0]), float(x[-1])
    if hi <= lo:
        return np.zeros(len(x), dtype=np.int64)
    return np.minimum(((x - lo) / (hi - lo) * buckets).astype(np.int64), buckets - 1)


def minmax_points(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * buckets`` of the points (x sorted ascending): each bucket's first minimum
    and first maximum (NaN ignored; a bucket of NaN keeps one NaN: a gap stays a gap)."""
    if len(x) <= 2 * buckets:
        return x, y
    bucket = _bucket_of(x, buckets)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], len(x)]
    keep = []
    finite = np.where(np.isnan(y), np.inf, y), np.where(np.isnan(y), -np.inf, y)
    for a, b in zip(starts, ends, strict=True):
        lo = a + int(np.argmin(finite[0][a:b]))
        hi = a + int(np.argmax(finite[1][a:b]))
        keep += sorted({lo, hi})
    idx = np.asarray(keep, dtype=np.int64)
    return x[idx], y[idx]


def band_buckets(x: np.ndarray, low: np.ndarray, mean: np.ndarray, high: np.ndarray, buckets: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """At most ``buckets`` x positions (each bucket's first x): lowest min, mean of the means,
    highest max of the bucket."""
    if len(x) <= buckets:
        return x, low, mean, high
    bucket = _bucket_of(x, buckets)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # buckets where every value is NaN
        lows = np.fmin.reduceat(low, starts)
        highs = np.fmax.reduceat(high, starts)
        ends = np.r_[starts[1:], len(x)]
        means = np.array([float(nanmean(mean[a:b])) for a, b in zip(starts, ends, strict=True)])
    return x[starts], lows, means, highs
