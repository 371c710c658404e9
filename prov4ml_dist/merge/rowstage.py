"""The merged rows of each table, staged uncompressed before they are compressed into
``merged.h5`` (``compress.staging``'s temporary HDF5 file).

Each table's rows are a contiguous dataset whose space is allocated when it is created, at a
known offset in the file, and never filled: so its bytes can be written without HDF5. The copy
writes each chunk's series with ``pwrite`` (one call per series; an HDF5 union selection cost
more than the copy) or, for many short series, one scattered assignment to a memory map; and
the processes of a parallel merge (``parallel.py``) write their shards' series ranges into the
same file at once, which HDF5 itself cannot do. The space is reserved (``posix_fallocate``) when
the dataset is made, so a full disk fails the merge there, cleanly. The cross-rank pass reads a
memory map of the rows (no HDF5 call per block), and so does compression (in threads).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from . import layout

LONG_PIECE_ROWS = 256  # pieces at least this long on average are written with pwrite


@dataclass(frozen=True)
class RowsAt:
    """Where a table's staged rows are: file, byte offset, rows (picklable, for workers)."""

    path: Path
    offset: int
    rows: int
    reserved: bool = True  # its blocks are allocated: a memory map may write it (else pwrite only)


class RowStage:
    """The staged rows of each table in ``stage`` (the open staging file)."""

    def __init__(self, stage: h5py.File) -> None:
        self.stage = stage
        self.where: dict[str, RowsAt] = {}

    def create(self, table: str, rows: int) -> None:
        """Room for ``rows`` rows of ``table`` (a second call replaces the first: a recount)."""
        if table in self.stage:
            del self.stage[table]
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # the offset is known at once
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # no writing zeros the copy overwrites
        space = h5py.h5s.create_simple((rows,))
        dtype = h5py.h5t.py_create(layout.ROW_DTYPE, logical=True)
        dataset = h5py.h5d.create(self.stage.id, table.encode(), dtype, space, dcpl=dcpl)
        offset = dataset.get_offset() if rows else 0
        if offset is None:
            raise OSError(f"no space allocated for the staged rows of {table!r}")
        self.stage.flush()
        path = Path(self.stage.filename)
        self.where[table] = RowsAt(path, int(offset), rows, _reserve(path, int(offset), rows))

    def rows(self, table: str) -> np.ndarray:
        """The table's rows as a read-only memory map (an empty array for an empty table)."""
        return open_rows(self.where[table])

    def writer(self, table: str) -> RowWriter:
        return RowWriter(self.where[table])


class RowWriter:
    """Writes rows of one staged table at given rows."""

    def __init__(self, where: RowsAt) -> None:
        self.where = where
        self._fd = os.open(where.path, os.O_RDWR)
        self._map: np.ndarray | None = None

    def scatter(self, data: np.ndarray, sources: np.ndarray, dests: np.ndarray, lengths: np.ndarray) -> None:
        """``data[sources[i]:sources[i] + lengths[i]]`` to rows ``dests[i]`` on, for every i."""
        if not len(lengths):
            return
        if len(data) >= LONG_PIECE_ROWS * len(lengths) or not self.where.reserved:
            size = layout.ROW_DTYPE.itemsize
            for source, dest, n in zip(sources.tolist(), dests.tolist(), lengths.tolist(), strict=True):
                piece = data[source:source + n]
                if os.pwrite(self._fd, piece.data, self.where.offset + dest * size) != piece.nbytes:
                    raise OSError(f"short write to {self.where.path}")
            return
        if self._map is None:
            self._map = open_rows(self.where, writable=True)
        self._map[np.repeat(dests - sources, lengths) + np.arange(len(data))] = data

    def close(self) -> None:
        if isinstance(self._map, np.memmap):
            self._map.flush()
        os.close(self._fd)


def _reserve(path: Path, offset: int, rows: int) -> bool:
    """Allocate the rows' blocks now: a full disk is then an ``OSError`` here, never a SIGBUS
    when a memory map writes to a sparse hole later. False where the filesystem cannot."""
    if rows == 0:
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, offset, rows * layout.ROW_DTYPE.itemsize)
        return True
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return False
        raise
    finally:
        os.close(fd)


def open_rows(where: RowsAt, writable: bool = False) -> np.ndarray:
    """A memory map of a staged table's rows (an empty array when there are none)."""
    if where.rows == 0:
        return np.empty(0, dtype=layout.ROW_DTYPE)
    return np.memmap(where.path, dtype=layout.ROW_DTYPE, mode="r+" if writable else "r", offset=where.offset,
                     shape=(where.rows,))
