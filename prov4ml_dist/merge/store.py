"""Small HDF5 writing helpers shared by the merge stages: whole tables and buffered appends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import h5py
import numpy as np

from .layout import TABLE_CHUNK_ROWS

APPEND_BUFFER_ROWS = 65536


def write_table(parent: h5py.Group, name: str, dtype: np.dtype, rows: Sequence[tuple] | np.ndarray) -> h5py.Dataset:
    """A small table written at once (possibly empty)."""
    data = rows if isinstance(rows, np.ndarray) else np.array(list(rows), dtype=dtype)
    return parent.create_dataset(name, data=data.astype(dtype, copy=False), dtype=dtype)


class Sink(Protocol):
    """Where rows computed in blocks go: an ``Appender`` (a table of merged.h5) or an
    ``ArraySink`` (memory, in a worker of a parallel merge)."""

    size: int

    def add(self, row: tuple) -> None: ...

    def extend(self, rows: np.ndarray) -> None: ...

    def truncate(self, size: int) -> None: ...

    def flush(self) -> None: ...


class ArraySink:
    """A ``Sink`` in memory, for rows sent back to the process writing merged.h5."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self._parts: list[np.ndarray] = []
        self._tuples: list[tuple] = []
        self.size = 0

    def add(self, row: tuple) -> None:
        self._tuples.append(row)
        self.size += 1

    def extend(self, rows: np.ndarray) -> None:
        self.flush()
        self._parts.append(np.asarray(rows, dtype=self.dtype))
        self.size += len(rows)

    def truncate(self, size: int) -> None:
        self.size = size
        self._parts = [self.array()[:size]]

    def flush(self) -> None:
        if self._tuples:
            self._parts.append(np.array(self._tuples, dtype=self.dtype))
            self._tuples = []

    def array(self) -> np.ndarray:
        """Every row so far."""
        self.flush()
        return np.concatenate(self._parts) if self._parts else np.empty(0, dtype=self.dtype)


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
