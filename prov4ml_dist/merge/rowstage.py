"""The merged rows of each table, staged uncompressed in a raw file before they are compressed
into ``merged.h5``.

A raw file of ``ROW_DTYPE`` records, memory-mapped: the copy writes each chunk's rows with one
scattered numpy assignment (an HDF5 union selection cost more than the copy itself), and the
processes of a parallel merge (``parallel.py``) write their shards' series ranges into the same
file at once, which HDF5 cannot do. The cross-rank pass reads the map; compression reads it as
an HDF5 dataset whose storage is this file (``external``), so ``compress.py`` sees plain h5py.
The files are temporaries (``paths.temporary_path``): a crashed merge's are removed by the next.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ..paths import temporary_path
from . import layout

RAW_SUFFIX = "raw"


class RowStage:
    """One raw file per table, sized to its rows; ``close`` removes them."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.paths: dict[str, Path] = {}
        self.sizes: dict[str, int] = {}

    def create(self, table: str, rows: int) -> None:
        """A new (sparse) file of ``rows`` rows for ``table``, replacing one made before."""
        path = self.paths.get(table) or temporary_path(self.run_dir / f"merged-{table}.{RAW_SUFFIX}")
        with open(path, "wb") as f:
            f.truncate(rows * layout.ROW_DTYPE.itemsize)
        self.paths[table], self.sizes[table] = path, rows

    def rows(self, table: str, writable: bool = False) -> np.ndarray:
        """The table's rows as a memory map (an empty array for an empty table)."""
        return open_rows(self.paths[table], self.sizes[table], writable)

    def dataset(self, stage: h5py.File, table: str) -> h5py.Dataset:
        """The table's rows as an HDF5 dataset of ``stage`` stored in the raw file."""
        n = self.sizes[table]
        if n == 0:
            return stage.create_dataset(table, shape=(0,), dtype=layout.ROW_DTYPE)
        return stage.create_dataset(table, shape=(n,), dtype=layout.ROW_DTYPE,
                                    external=[(os.fspath(self.paths[table]), 0, n * layout.ROW_DTYPE.itemsize)])

    def close(self) -> None:
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                path.unlink()
        self.paths.clear()


def open_rows(path: Path, rows: int, writable: bool = False) -> np.ndarray:
    """A memory map of ``rows`` rows of a raw file (an empty array when there are none)."""
    if rows == 0:
        return np.empty(0, dtype=layout.ROW_DTYPE)
    return np.memmap(path, dtype=layout.ROW_DTYPE, mode="r+" if writable else "r", shape=(rows,))


@contextlib.contextmanager
def row_stage(run_dir: Path) -> Iterator[RowStage]:
    stage = RowStage(run_dir)
    try:
        yield stage
    finally:
        stage.close()
