"""Reading points out of ``merged.h5`` with bounded memory, whatever the size of the run: whole
tables in blocks (export), one series thinned to what a plot can show (plot)."""

from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np

from ..merge import layout

BLOCK_ROWS = 1 << 16


def table_blocks(f: h5py.File, table: str, block: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
    """Every row of ``/<table>/rows`` in order, ``block`` rows at a time."""
    rows = f[table][layout.ROWS]
    for start in range(0, rows.shape[0], block):
        yield rows[start:start + block]


def series_table(f: h5py.File, table: str) -> np.ndarray:
    """``/<table>/series``: one row per series, the index the ``series`` column of rows points at."""
    return f[table][layout.SERIES][()]


def series_points(f: h5py.File, dataset: str, start: int, stop: int, limit: int) -> np.ndarray:
    """The rows ``start:stop`` of ``dataset``, every k-th one when there are more than ``limit``
    (the last row always kept: it is the value a crashed rank ended on)."""
    rows = f[dataset]
    stride = max(1, -(-(stop - start) // limit))
    points = rows[start:stop:stride]
    if stride > 1 and (stop - 1 - start) % stride:
        points = np.concatenate([points, rows[stop - 1:stop]])
    return points
