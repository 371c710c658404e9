"""``rows`` of merged.h5 compressed with shuffle + deflate, off the merge's critical path.

The merge writes rows scattered (rank by rank into each series' range); HDF5 compressing chunks
under such writes was 10x slower than the whole merge. So rows are staged uncompressed in a
temporary file beside merged.h5 (``rowstage.py``), and each chunk is compressed as soon as all
its rows are staged (``RowCompressor``: while the copy goes on with the next shards), in threads
(numpy and the compressors release the GIL), and stored with ``write_direct_chunk`` as a
standard shuffle + deflate dataset: plain h5py, h5dump and every HDF5 reader read it with no
plugin. The deflate streams come from ISA-L (``isal``, a dependency where it has wheels) when
it is installed, zlib otherwise: the same format (zlib reads ISA-L's streams), as small at
level 1, and ~12x faster here (0.02 s per 10⁶ rows against 0.28 s; the merge was 20-170 %
slower than before compression with zlib, ``benchmarks/bench_merge.py``).

Measured on these rows (32 B each: 2,000 keys or 4 of random-walk values, README "Merge at
thousands of ranks"): shuffle + ISA-L level 1 gives 9.7 B/row in 33 ms per 10⁶ rows of deflate;
without the shuffle it is 13.8 B/row and 90 ms (the step and time columns' high bytes stop
repeating), level 0 11.9 B/row and 60 ms, level 3 9.66 B/row and 93 ms. The shuffle itself is
a byte transpose; numpy's, done on a whole 2 MiB chunk, re-reads the source from memory for
each of the 32 byte planes (45 ms per 10⁶ rows): in blocks that stay in the cache it is 17 ms.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
CHUNKS_NAME = "merged-chunks.bin"  # a worker's compressed chunks (ChunkFile)
MAX_THREADS = 8
SHUFFLE_BLOCK_ROWS = 4096  # 128 KiB of 32-byte rows: source and planes stay in the core's cache


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


def cores() -> int:
    """The cores this process may use, at most ``MAX_THREADS``: how many threads share its work."""
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))


def threads() -> ThreadPoolExecutor:
    """The pool that compresses: a thread per core, each yielding to the thread that copies."""
    return ThreadPoolExecutor(max_workers=cores(), thread_name_prefix="prov4ml-deflate", initializer=behind)


BEHIND_NICE = 5  # a third of the copying thread's weight: 3-39 % faster 32 x 10^6 merges in 4 pairs (README)


def behind() -> None:
    """Lower the calling thread's CPU priority (Linux: a thread's own nice value): work that can
    wait, like deflating a chunk or a checksum, then leaves a core to the copy whose end the
    merge waits for, and uses what that leaves. Elsewhere a no-op (it would renice the process)."""
    if sys.platform == "linux" and BEHIND_NICE:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BEHIND_NICE)


def shuffled(data: np.ndarray, rows: int) -> np.ndarray:
    """HDF5's shuffle filter of ``data`` (contiguous) padded with zero rows to ``rows``: byte
    ``j`` of every row, for each ``j``. Transposed block by block, so each block is read from
    the cache for every byte plane instead of from memory."""
    size = data.dtype.itemsize
    source = np.ascontiguousarray(data).view(np.uint8).reshape(len(data), size)
    planes = np.empty((size, rows), dtype=np.uint8)
    for a in range(0, len(data), SHUFFLE_BLOCK_ROWS):
        b = min(len(data), a + SHUFFLE_BLOCK_ROWS)
        planes[:, a:b] = source[a:b].T
    planes[:, len(data):] = 0
    return planes


def compressed_chunk(source: np.ndarray | h5py.Dataset, start: int, rows: int,
                     level: int = layout.ROWS_DEFLATE_LEVEL) -> bytes:
    """One chunk as HDF5's shuffle then deflate filters store it (a last, partial chunk padded
    to the full chunk with zero rows, as HDF5 does)."""
    return _deflate.compress(shuffled(source[start:start + rows], rows), level)


def create_rows(parent: h5py.Group, name: str, rows: int, dtype: np.dtype) -> h5py.Dataset:
    """The empty ``rows`` dataset: chunks of at most ``layout.ROWS_CHUNK_ROWS`` rows and never
    more than the data, shuffle + deflate (which every HDF5 reader has)."""
    if rows == 0:
        return parent.create_dataset(name, shape=(0,), dtype=dtype)
    return parent.create_dataset(name, shape=(rows,), dtype=dtype, chunks=(min(rows, layout.ROWS_CHUNK_ROWS),),
                                 shuffle=True, compression="gzip", compression_opts=layout.ROWS_DEFLATE_LEVEL)


class RowCompressor:
    """Fills a dataset made by ``create_rows`` from ``source`` (the staged rows, a memory map),
    each chunk compressed in ``pool`` once ``staged`` has been told all its rows are there:
    the copy goes on with the next shards meanwhile. The threads store the chunks themselves
    (h5py's lock orders their HDF5 calls), so no compressed chunk waits in memory."""

    def __init__(self, dataset: h5py.Dataset, source: np.ndarray | h5py.Dataset, pool: ThreadPoolExecutor) -> None:
        self.dataset, self.source, self.pool = dataset, source, pool
        n = dataset.shape[0]
        self.chunk = dataset.chunks[0] if dataset.chunks else 1
        self.chunks = -(-n // self.chunk) if n else 0
        self._filled = np.zeros(self.chunks, dtype=np.int64)
        self._sizes = np.minimum(self.chunk, n - np.arange(self.chunks, dtype=np.int64) * self.chunk)
        self._sent = np.zeros(self.chunks, dtype=bool)
        self._futures: list[Future] = []
        self._stop = threading.Event()

    def staged(self, starts: np.ndarray, stops: np.ndarray) -> None:
        """Rows ``starts[i]:stops[i]`` are staged (each range once): compress what is complete."""
        a, b = np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64)
        keep = b > a
        a, b = a[keep], b[keep]
        if not len(a) or not self.chunks:
            return
        c = self.chunk
        first, last = a // c, (b - 1) // c
        one = first == last
        span = ~one  # a range over several chunks: its two ends, and the full chunks between
        ends = (np.bincount(first[one], weights=(b - a)[one], minlength=self.chunks)
                + np.bincount(first[span], weights=((first + 1) * c - a)[span], minlength=self.chunks)
                + np.bincount(last[span], weights=(b - last * c)[span], minlength=self.chunks))
        inner = np.zeros(self.chunks + 1, dtype=np.int64)
        np.add.at(inner, first[span] + 1, 1)
        np.add.at(inner, last[span], -1)
        self._filled += ends.astype(np.int64) + np.cumsum(inner[:-1]) * c
        self._submit(np.flatnonzero((self._filled == self._sizes) & ~self._sent))

    def submit_all(self) -> None:
        """Every chunk not yet sent (the rows are all staged: a parallel merge's copy is done)."""
        self._submit(np.flatnonzero(~self._sent))

    def submit(self, first: int, stop: int) -> None:
        """Chunks ``first`` to ``stop`` (a process's share of a parallel merge)."""
        chosen = np.arange(first, stop)
        self._submit(chosen[~self._sent[chosen]])

    def _submit(self, chunks: np.ndarray) -> None:
        self._sent[chunks] = True
        self._futures += [self.pool.submit(self._store, int(k)) for k in chunks.tolist()]

    def _store(self, k: int) -> None:
        if self._stop.is_set():
            return
        data = compressed_chunk(self.source, k * self.chunk, self.chunk)
        self.dataset.id.write_direct_chunk((k * self.chunk,), data)

    def finish(self) -> None:
        """Wait for every chunk sent; the first failure (a full disk) is raised."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self.abandon()
        if not self._sent.all():  # a bug, not bad input: the copy checks every series' row count
            raise RuntimeError(f"rows chunks {np.flatnonzero(~self._sent)[:5].tolist()} were never staged")

    def abandon(self) -> None:
        """Stop: chunks not started are skipped, those running finish (their rows are still
        mapped). For a copy done again (a recount) or a failed merge."""
        self._stop.set()
        for future in self._futures:
            future.cancel()
        for future in self._futures:
            with contextlib.suppress(Exception):
                future.result()
        self._futures = []

    def store(self, k: int, data: bytes) -> None:
        """A chunk compressed elsewhere (a worker of a parallel merge)."""
        self._sent[k] = True
        self.dataset.id.write_direct_chunk((k * self.chunk,), data)


@dataclass
class ChunkFile:
    """Chunks compressed by a worker process of a parallel merge, in a temporary file beside
    merged.h5 (``path``; none for no chunks): its chunk numbers, offsets and sizes."""

    path: Path | None
    chunks: list[tuple[int, int, int]]

    @classmethod
    def write(cls, directory: Path, source: np.ndarray, first: int, stop: int, rows: int) -> ChunkFile:
        """Chunks ``first`` to ``stop`` of ``rows`` rows each of ``source``, compressed in threads."""
        if stop <= first:
            return cls(None, [])
        path = temporary_path(directory / CHUNKS_NAME)
        done = []
        try:
            with path.open("wb") as f, threads() as pool:
                for k, data in zip(range(first, stop),
                                   pool.map(lambda k: compressed_chunk(source, k * rows, rows), range(first, stop)),
                                   strict=True):
                    done.append((k, f.tell(), len(data)))
                    f.write(data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return cls(path, done)

    def store_into(self, rows: RowCompressor) -> None:
        """Each chunk into its place in merged.h5."""
        if self.path is None:
            return
        with self.path.open("rb") as f:
            for k, offset, size in self.chunks:
                rows.store(k, os.pread(f.fileno(), size, offset))

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


def write_compressed(parent: h5py.Group, name: str, source: np.ndarray | h5py.Dataset) -> h5py.Dataset:
    """Copy the 1-d ``source`` into ``parent[name]`` with shuffle + deflate, at once. A memory
    map of the staged rows (``rowstage.open_rows``) lets the threads read and shuffle in
    parallel (numpy lets the GIL go while it copies); an HDF5 dataset is read under h5py's lock."""
    out = create_rows(parent, name, source.shape[0], source.dtype)
    with threads() as pool:
        rows = RowCompressor(out, source, pool)
        rows.submit_all()
        rows.finish()
    return out
