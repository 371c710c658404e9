"""``rows`` of merged.h5 compressed with shuffle + deflate, off the merge's critical path.

The merge writes rows scattered (rank by rank into each series' range); HDF5 compressing chunks
under such writes was 10x slower than the whole merge. So rows are staged uncompressed in a
temporary file beside merged.h5, and once complete they are compressed chunk by chunk, in
threads (the compressors release the GIL), and stored with ``write_direct_chunk`` as a
standard shuffle + deflate dataset: plain h5py, h5dump and every HDF5 reader read it with no
plugin. The deflate streams come from ISA-L (``isal``, a dependency where it has wheels) when
it is installed, zlib otherwise: the same format (zlib reads ISA-L's streams), as small at
level 1, and ~12x faster here (0.02 s per 10⁶ rows against 0.28 s; the merge was 20-170 %
slower than before compression with zlib, ``benchmarks/bench_merge.py``).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

try:
    from isal import isal_zlib as _deflate

    DEFLATE_BACKEND = "isal"
except ImportError:  # a platform without isal's wheels: the same streams, slower
    _deflate = zlib
    DEFLATE_BACKEND = "zlib"

from ..paths import temporary_path
from . import layout

STAGE_NAME = "merged-rows.h5"
MAX_THREADS = 8


@contextlib.contextmanager
def staging(run_dir: Path) -> Iterator[h5py.File]:
    """A temporary HDF5 file for the uncompressed rows, removed when the block ends (a crashed
    merge's is removed by the next merge, like any temporary of a dead process)."""
    path = temporary_path(run_dir / STAGE_NAME)
    try:
        with h5py.File(path, "w") as f:
            yield f
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _compressed_chunk(source: np.ndarray | h5py.Dataset, start: int, rows: int, level: int) -> bytes:
    """One chunk as HDF5's shuffle then deflate filters store it (a last, partial chunk padded
    to the full chunk with zero rows, as HDF5 does)."""
    data = source[start:start + rows]
    if len(data) < rows:
        padded = np.zeros(rows, dtype=source.dtype)
        padded[:len(data)] = data
        data = padded
    shuffled = np.ascontiguousarray(data).view(np.uint8).reshape(rows, source.dtype.itemsize).T.tobytes()
    return _deflate.compress(shuffled, level)


def write_compressed(parent: h5py.Group, name: str, source: np.ndarray | h5py.Dataset) -> h5py.Dataset:
    """Copy the 1-d ``source`` into ``parent[name]`` with shuffle + deflate, in chunks of at
    most ``layout.ROWS_CHUNK_ROWS`` rows and never more than the data. A memory map of the
    staged rows (``rowstage.open_rows``) lets the threads read and shuffle in parallel (numpy
    lets the GIL go while it copies); an HDF5 dataset is read under h5py's one lock."""
    n = source.shape[0]
    if n == 0:
        return parent.create_dataset(name, shape=(0,), dtype=source.dtype)
    chunk = min(n, layout.ROWS_CHUNK_ROWS)
    level = layout.ROWS_DEFLATE_LEVEL
    out = parent.create_dataset(name, shape=(n,), dtype=source.dtype, chunks=(chunk,), shuffle=True,
                                compression="gzip", compression_opts=level)
    starts = range(0, n, chunk)
    threads = max(1, min(MAX_THREADS, os.cpu_count() or 1, len(starts)))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prov4ml-deflate") as pool:
        # Reading, shuffling and deflating run in parallel; HDF5's chunk writes here, in order.
        for start, data in zip(starts, pool.map(lambda s: _compressed_chunk(source, s, chunk, level), starts),
                               strict=True):
            out.id.write_direct_chunk((start,), data)
    return out
