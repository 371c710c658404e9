"""Reading shards back: untrusted input, so every access is checked and memory is bounded."""

from __future__ import annotations

import ctypes
import functools
import glob
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import ShardError
from . import ring, schema

log = logging.getLogger(__name__)

JOURNAL_READ_BYTES = 1 << 20
MAX_RECORD_BYTES = 16 << 20
DEFAULT_ROWS_PER_READ = 1 << 18
TAIL_SCAN_ROWS = 1 << 16
MAX_CHUNK_BYTES = 16 << 20  # reading one row decompresses its whole chunk: bound what a crafted file costs
# A JSON escape of NUL: "\u0000" after an even number of backslashes (after an odd number, the
# backslash before "u0000" is itself escaped and the text is a literal backslash-u-0-0-0-0).
_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
MAX_RANK = 1 << 20  # ranks and attempts beyond are not a real job's (and would size the merge's tables)


class ShardReader:
    """Read-only view of one shard; opens crashed (still SWMR-flagged) files too.

    Use as a context manager. Raises ``ShardError`` for anything that is not a readable shard.
    ``recovered`` is true for a shard that needed recovery to open: its writer never closed it
    (SIGKILL, node failure) or the file was cut short; only rows backed by real bytes are read.
    The rows and journal records its writer accepted but had not flushed are read from the
    crash ring and WAL next to it (``ring.py``), after the HDF5 ones; ``ring_rows`` and
    ``ring_records`` count them. Read a shard whose writer is still alive only for a glance: its
    ring is drained while it is read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.recovered = False
        self.corrupt_records = 0
        self.ring_records = 0
        self._file = self._open()
        try:
            self.attrs = self._check_attrs()
            self._datasets, dtypes = self._check_layout()
            self._limits = {name: self._readable_length(ds, dtypes[name]) for name, ds in self._datasets.items()}
            self._ring = {name: ring.recover_rows(self.path, name, self._limits[name]) for name in schema.TABLES}
        except ValueError as exc:
            self._file.close()
            raise ShardError(str(exc)) from None
        except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for some damaged indexes
            self._file.close()
            raise ShardError(f"{self.path}: damaged HDF5 metadata ({_first_line(exc)})") from None
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> h5py.File:
        """A cleanly closed shard opens normally (with HDF5's end-of-file check). One still
        flagged as open for SWMR writing (its writer died), or cut short, opens in SWMR-read
        mode, which tolerates both; ``_readable_length`` then bounds every read."""
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):  # a FIFO would block the open forever
                raise ShardError(f"{self.path}: not a regular file")
            return h5py.File(self.path, "r", locking="best-effort")
        except FileNotFoundError:
            raise ShardError(f"{self.path}: no such shard") from None
        except OSError as exc:
            if "already open for write" not in str(exc) and "truncated file" not in str(exc):
                raise ShardError(f"{self.path}: not a readable HDF5 shard ({_first_line(exc)})") from None
        self.recovered = True
        try:
            return _open_swmr_read(self.path)
        except OSError as exc:
            raise ShardError(f"{self.path}: not a readable HDF5 shard ({_first_line(exc)})") from None

    def _readable_length(self, ds: h5py.Dataset, dtype: np.dtype) -> int:
        """Rows backed by bytes that exist: SWMR-read skips HDF5's end-of-file check, and a
        truncated copy of a crashed shard would otherwise read as zeros."""
        limit = min(int(ds.id.shape[0]), ds.id.get_storage_size() // dtype.itemsize)  # rows the file holds
        if self.recovered:
            size = self.path.stat().st_size
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                if info.byte_offset is None or info.byte_offset + info.size > size:
                    limit = min(limit, int(info.chunk_offset[0]))
        return _without_unwritten_tail(ds, limit, dtype)

    def _check_attrs(self) -> dict[str, Any]:
        try:
            attrs = {k: _plain(v) for k, v in self._file.attrs.items()}
        except (OSError, KeyError, TypeError) as exc:
            raise ShardError(f"{self.path}: attributes unreadable ({_first_line(exc)})") from None
        if attrs.get("format") != schema.FORMAT:
            raise ShardError(f"{self.path}: not a prov4ml_dist shard (format={attrs.get('format')!r:.60})")
        version = attrs.get("schema_version")
        if not isinstance(version, int) or not 1 <= version <= schema.SCHEMA_VERSION:
            raise ShardError(f"{self.path}: unsupported shard schema version {version!r:.20}")
        for key, kind in (("run_id", str), ("rank", int), ("attempt", int)):
            if not isinstance(attrs.get(key), kind) or isinstance(attrs[key], bool):
                raise ShardError(f"{self.path}: attribute {key!r} missing or not {kind.__name__}")
        for key in ("rank", "attempt"):
            if not 0 <= attrs[key] < MAX_RANK:
                raise ShardError(f"{self.path}: attribute {key!r} out of range: {attrs[key]}")
        return attrs

    def _check_layout(self) -> tuple[dict[str, h5py.Dataset], dict[str, np.dtype]]:
        """The tables and the journal, and their dtypes, each looked up once through h5py's
        low-level API: with thousands of shards, h5py's per-lookup cost was most of a merge."""
        datasets, dtypes = {}, {}
        expected = {**dict.fromkeys(schema.TABLES, schema.ROW_DTYPE), schema.JOURNAL: np.dtype(np.uint8)}
        for name, dtype in expected.items():
            what = "journal" if name == schema.JOURNAL else f"table {name!r}"
            try:
                oid = h5py.h5o.open(self._file.id, name.encode())
            except KeyError:
                raise ShardError(f"{self.path}: {what} missing or of the wrong type") from None
            if not isinstance(oid, h5py.h5d.DatasetID) or oid.dtype != dtype or oid.rank != 1:
                raise ShardError(f"{self.path}: {what} missing or of the wrong type")
            plist = oid.get_create_plist()
            chunks = plist.get_chunk() if plist.get_layout() == h5py.h5d.CHUNKED else None
            if chunks is None or chunks[0] * dtype.itemsize > MAX_CHUNK_BYTES:
                raise ShardError(f"{self.path}: '/{name}' is not stored in chunks of at most "
                                 f"{MAX_CHUNK_BYTES} bytes")
            datasets[name], dtypes[name] = h5py.Dataset(oid), dtype
        return datasets, dtypes

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def run_id(self) -> str:
        return self.attrs["run_id"]

    @property
    def rank(self) -> int:
        return self.attrs["rank"]

    @property
    def attempt(self) -> int:
        return self.attrs["attempt"]

    @property
    def ring_rows(self) -> dict[str, int]:
        """Rows per table recovered from the crash ring (not in HDF5)."""
        return {name: len(rows) for name, rows in self._ring.items()}

    def rows(self, table: str) -> int:
        """Number of rows of ``table``: flushed to HDF5, and recovered from the crash ring."""
        return self._limits[table] + len(self._ring[table])

    def iter_rows(self, table: str, rows_per_read: int = DEFAULT_ROWS_PER_READ) -> Iterator[np.ndarray]:
        """The table's rows in bounded slices (structured arrays of ``schema.ROW_DTYPE``)."""
        if table not in schema.TABLES:
            raise ShardError(f"unknown table {table!r}")
        ds = self._datasets[table]
        n = self._limits[table]
        for start in range(0, n, rows_per_read):
            try:
                yield read_slice(ds, start, min(n, start + rows_per_read), schema.ROW_DTYPE)
            except OSError as exc:
                raise ShardError(f"{self.path}: table {table!r} unreadable at row {start} "
                                 f"({_first_line(exc)})") from None
        if len(self._ring[table]):
            yield self._ring[table]

    def read_table(self, table: str) -> np.ndarray:
        """All rows of a table at once; prefer ``iter_rows`` for large shards."""
        parts = list(self.iter_rows(table))
        return np.concatenate(parts) if parts else np.empty(0, dtype=schema.ROW_DTYPE)

    def records(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Journal records in order. A torn last line is skipped; a corrupt one (bit flip) is
        skipped and counted in ``corrupt_records``, so one bad record does not cost the rank's
        points. NUL characters (which HDF5 strings cannot hold) are replaced by U+FFFD."""
        self.corrupt_records = self.ring_records = 0
        ds = self._datasets[schema.JOURNAL]
        n = self._limits[schema.JOURNAL]
        pending, lines_read = b"", 0
        for start in range(0, n, JOURNAL_READ_BYTES):
            try:
                pending += read_slice(ds, start, min(n, start + JOURNAL_READ_BYTES), np.dtype(np.uint8)).tobytes()
            except OSError as exc:
                raise ShardError(f"{self.path}: journal unreadable ({_first_line(exc)})") from None
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_RECORD_BYTES:
                raise ShardError(f"{self.path}: journal record over {MAX_RECORD_BYTES} bytes")
            lines_read += len(lines)
            yield from self._parsed(lines, kind)
        recovered = [line.rstrip(b"\n") for line in ring.recover_records(self.path, lines_read)]
        self.ring_records = len(recovered)
        yield from self._parsed(recovered, kind)

    def _parsed(self, lines: list[bytes], kind: str | None) -> Iterator[dict[str, Any]]:
        for line in lines:
            record = self._parse(line)
            if record is None:
                self.corrupt_records += 1
            elif kind is None or record["kind"] == kind:
                yield record

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any] | None:
        try:
            record = json.loads(_NUL_ESCAPE.sub(rb"\1\\ufffd", line) if b"\\u0000" in line else line)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep
            return None
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            return None
        return record

    def start_record(self) -> dict[str, Any]:
        """The run metadata written at ``start_run``."""
        for record in self.records("start"):
            return record
        raise ShardError(f"{self.path}: no start record (killed before its first flush?)")

    def end_record(self) -> dict[str, Any] | None:
        """The ``end`` record, or None when the rank never reached a clean ``end_run``."""
        end = None
        for record in self.records("end"):
            end = record
        return end

    def series(self, table: str) -> dict[int, dict[str, Any]]:
        """Series id → its declaration, for one table."""
        return {r["id"]: r for r in self.records("series") if r.get("table") == table
                and isinstance(r.get("id"), int)}


@functools.cache
def _set_read_attempts() -> ctypes._CFuncPtr | None:
    """HDF5's H5Pset_metadata_read_attempts, which h5py does not wrap, from the HDF5 that h5py
    loaded. A SWMR reader retries a bad checksum 100 times with back-off by default: over a
    minute on a damaged file. One attempt suffices for a file no one is writing any more."""
    libdir = os.path.join(os.path.dirname(h5py.__file__), os.pardir, "h5py.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "libhdf5-*.so*"))) or ["libhdf5.so"]:
        try:
            func = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0)).H5Pset_metadata_read_attempts
        except (OSError, AttributeError):
            continue
        func.argtypes = [ctypes.c_int64, ctypes.c_uint]
        return func
    log.debug("H5Pset_metadata_read_attempts not found; damaged shards may open slowly")
    return None


def _open_swmr_read(path: Path) -> h5py.File:
    """Open in SWMR-read mode (tolerates an unclosed writer) with one metadata read attempt."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_file_locking(True, ignore_when_disabled=True)
    set_attempts = _set_read_attempts()
    if set_attempts is not None:
        set_attempts(fapl.id, 1)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


def _without_unwritten_tail(ds: h5py.Dataset, limit: int, dtype: np.dtype) -> int:
    """``limit`` less a tail of all-zero rows (bytes, for the journal): rows HDF5 counts but
    whose data never reached the disk, when a flush failed (disk full) and the file was then
    closed or abandoned. A real row is never all zero (its time is ``time.time()``), nor is a
    journal byte (JSON holds no NUL). One row is read when the tail is intact."""
    scan = 1
    while limit > 0:
        start = max(0, limit - scan)
        try:
            block = read_slice(ds, start, limit, dtype)
        except OSError:
            return limit  # reading the rows reports it
        written = np.flatnonzero(block.view(np.uint8).reshape(len(block), -1).any(axis=1))
        if len(written):
            return start + int(written[-1]) + 1
        limit, scan = start, TAIL_SCAN_ROWS
    return 0


def read_slice(ds: h5py.Dataset, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
    """``ds[start:stop]`` of a 1-d dataset through h5py's low-level API: the same HDF5 read
    without ~100 µs of selection set-up per call."""
    out = np.empty(stop - start, dtype=dtype)
    if stop > start:
        space = ds.id.get_space()
        space.select_hyperslab((start,), (stop - start,))
        ds.id.read(h5py.h5s.create_simple((stop - start,)), space, out)
    return out


def _plain(value: Any) -> Any:
    """HDF5 attribute values as plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
