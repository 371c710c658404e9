"""Small HDF5 writing helpers shared by the merge stages: whole tables and buffered appends."""

from __future__ import annotations

from collections.abc import Sequence

import h5py
import numpy as np
from h5py import h5s

from .layout import TABLE_CHUNK_ROWS

APPEND_BUFFER_ROWS = 65536
SCATTER_BATCH = 128


def write_table(parent: h5py.Group, name: str, dtype: np.dtype, rows: Sequence[tuple] | np.ndarray) -> h5py.Dataset:
    """A small table written at once (possibly empty)."""
    data = rows if isinstance(rows, np.ndarray) else np.array(list(rows), dtype=dtype)
    return parent.create_dataset(name, data=data.astype(dtype, copy=False), dtype=dtype)


class Appender:
    """Buffered appends to a chunked, resizable table, so memory stays bounded while it grows."""

    def __init__(self, parent: h5py.Group, name: str, dtype: np.dtype) -> None:
        self.dtype = dtype
        self._ds = parent.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                         chunks=(TABLE_CHUNK_ROWS,))
        self._tuples: list[tuple] = []
        self._arrays: list[np.ndarray] = []
        self._buffered = 0
        self.size = 0

    def add(self, row: tuple) -> None:
        """One row as a tuple in ``dtype`` field order."""
        self._tuples.append(row)
        self._grew(1)

    def extend(self, rows: np.ndarray) -> None:
        """Rows already in ``dtype``."""
        if len(rows):
            self._flush_tuples()
            self._arrays.append(rows)
            self._grew(len(rows))

    def truncate(self, size: int) -> None:
        """Drop the rows from ``size`` on: a computation that wrote them turned out not to apply."""
        self.flush()
        self._ds.resize((size,))
        self.size = size

    def _grew(self, n: int) -> None:
        self.size += n
        self._buffered += n
        if self._buffered >= APPEND_BUFFER_ROWS:
            self.flush()

    def _flush_tuples(self) -> None:
        if self._tuples:
            self._arrays.append(np.array(self._tuples, dtype=self.dtype))
            self._tuples = []

    def flush(self) -> None:
        self._flush_tuples()
        if self._arrays:
            data = np.concatenate(self._arrays)
            start = self._ds.shape[0]
            self._ds.resize((start + len(data),))
            self._ds[start:] = data
            self._arrays, self._buffered = [], 0


def write_scattered(ds: h5py.Dataset, data: np.ndarray, dest: np.ndarray, lengths: np.ndarray) -> None:
    """Write consecutive pieces of ``data`` to ascending, disjoint row ranges, a batch of
    pieces per HDF5 call.

    One union selection per batch instead of one write per piece: with thousands of series
    per chunk, per-piece writes cost ~100x more (h5py overhead per call). Batches, because
    HDF5 builds a union of n hyperslabs in O(n^2): 16,000 pieces in one union take seconds.
    """
    offsets = np.r_[0, np.cumsum(lengths)]
    space = ds.id.get_space()
    for first in range(0, len(dest), SCATTER_BATCH):
        last = min(len(dest), first + SCATTER_BATCH)
        space.select_none()
        for start, count in zip(dest[first:last].tolist(), lengths[first:last].tolist(), strict=True):
            space.select_hyperslab((start,), (count,), op=h5s.SELECT_OR)
        piece = data[offsets[first]:offsets[last]]
        ds.id.write(h5s.create_simple((len(piece),)), space, piece)
