"""Crash rings: what a rank logged survives its process's death (any signal, ``os._exit``).

A point is written, on the logging call, into a file-backed shared mapping next to the shard
(``rank-00000.h5.ring``); the kernel's page cache keeps those bytes after the process dies, so
the shard reader recovers the rows the flusher had not yet put into HDF5. A journal record is
appended to ``rank-00000.h5.wal`` with one ``os.write`` (no fsync: the same guarantee). After a
clean close both files are removed; after a node crash (kernel gone) the loss bound stays the
flush interval.

Ring file layout (little-endian): a ``HEADER_BYTES`` header — ``MAGIC``, then per table of
``schema.TABLES`` its capacity (u8, a power of two) and ``delta`` (i8), the journal's delta,
then per table its ``drained`` slot count (u8: what the logging calls may overwrite, published
by whichever process drains the ring) — then each table's ring of ``capacity`` rows of
``RING_DTYPE``. Slot ``s`` (a per-table counter) lives at row
``s % capacity``; its ``seq`` (``s + 1``) is its last field, and one ``struct.pack_into`` stores
the fields in order (CPython packs field by field, straight into the mapping), so a process
killed mid-row leaves a prefix of it: a row whose ``seq`` is not the one its slot expects is
torn or stale and never read. (Threads see whole rows: ``pack_into`` holds the GIL.) HDF5 row
``r`` of a table holds slot ``r + delta`` for every row the flusher wrote since it last changed
``delta`` (it changes it, before writing, when a failed flush dropped rows), so the rows to
recover after a crash are the committed slots from ``readable HDF5 rows + delta`` on. The
journal works the same way with record numbers: ``JOURNAL_DELTA`` in the header, HDF5 journal
lines against WAL records.

WAL record: ``<II`` (length, crc32) then the JSON line; a torn or corrupt record ends the read.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from . import schema

MAGIC = b"P4DRING1"
HEADER_BYTES = 4096
ROW_BYTES = 40
RING_DTYPE = np.dtype({"names": ["series", "step", "value", "time", "seq"],
                       "formats": ["<i4", "<i8", "<f8", "<f8", "<u8"],
                       "offsets": [0, 4, 12, 20, 28], "itemsize": ROW_BYTES})
# The same bytes seen without the commit mark: the fields of ``schema.ROW_DTYPE`` at their ring
# offsets, so that HDF5 converts ring rows to file rows itself, inside ``H5Dwrite`` (h5py lets
# the GIL go there), with no numpy copy before it.
ROW_VIEW_DTYPE = np.dtype({"names": list(schema.ROW_DTYPE.names),
                           "formats": [schema.ROW_DTYPE.fields[n][0] for n in schema.ROW_DTYPE.names],
                           "offsets": [RING_DTYPE.fields[n][1] for n in schema.ROW_DTYPE.names],
                           "itemsize": ROW_BYTES})
PACK = struct.Struct("<iqddQ").pack_into  # series, step, value, time, then the commit mark
_U8 = struct.Struct("<q")
# Rows per ring: 10 MiB and 160 KiB of file, allocated at start (a page written into a hole of
# a full disk would be SIGBUS) and removed at a clean close. Halved while the disk refuses them.
# The metrics ring holds four flush pieces (writer.FLUSH_PIECE_ROWS): a logger in a tight loop
# (~650k points/s here) fills it in 0.4 s, longer than the flusher takes to drain it while it
# shares the GIL; at 2^16 rows, calls that found it full (each a multi-ms stall) were 26-59 per
# 10^6 points, at 2^17 4-24, at 2^18 0-4 (bench_log_metric.py, README "Zero loss"). On a
# filesystem without fallocate, glibc writes the 10 MiB at start_run: shards belong on node-local
# disks there (start_run(local_dir=...)).
CAPACITY = {"metrics": 1 << 18, "system": 1 << 12}
MIN_CAPACITY_SHIFT = 6  # at most 1/64 of CAPACITY, before giving up
JOURNAL_DELTA = len(schema.TABLES)  # header field index of the journal's delta
DRAINED = 2 * JOURNAL_DELTA + 1  # header field index of the first table's drained count
WAL_FRAME = struct.Struct("<II")
MAX_WAL_RECORD = 16 << 20
BACKPRESSURE_SLEEP_S = 0.0005
HOLE_TIMEOUT_S = 5.0  # an issued slot unwritten this long is given up (a logging thread never came back)


def ring_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".ring")


def wal_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".wal")


def _field_offset(index: int) -> int:
    """Header offset of field ``index``: table i's capacity at 2i, its delta at 2i+1; the
    journal's delta after the tables."""
    return len(MAGIC) + 8 * index


def _table_layout(caps: list[int]) -> list[int]:
    offsets, at = [], HEADER_BYTES
    for cap in caps:
        offsets.append(at)
        at += cap * ROW_BYTES
    return offsets


class Ring:
    """One table's ring in the shared mapping: the hot path writes slots, the flusher drains."""

    __slots__ = ("mm", "base", "mask", "capacity", "limit", "wake_rows", "drained", "next_slot", "abandoned",
                 "unstorable", "given_up", "waits", "reported", "on_due", "on_full", "on_abandon", "_delta_at",
                 "_drained_at", "_view", "_rows", "_hole")

    def __init__(self, mm: mmap.mmap, base: int, capacity: int, delta_at: int, drained_at: int) -> None:
        self.mm = mm
        self.base = base
        self.capacity = capacity
        self.mask = capacity - 1
        self.drained = 0  # slots before this are in HDF5 (or counted lost)
        # The hot path compares each slot with ``limit`` (one comparison it makes anyway):
        # ``wake_rows`` past the drain point it wakes the flusher (``at_limit``), which then
        # needs no polling; a whole ring past it, it waits.
        self.wake_rows = capacity
        self.limit = capacity - 1
        self.next_slot: itertools.count | None = itertools.count()
        self.reported = 0  # in a drain process: slots the training process said it issued
        self.abandoned: set[int] = set()  # slots taken by a call that raised before committing
        self.unstorable = 0  # rows refused by the packer (values the API never lets through)
        self.given_up = 0  # slots skipped after HOLE_TIMEOUT_S unwritten
        self.waits = 0  # logging calls that found the ring full and waited for the flusher
        self.on_due: Callable[[], None] | None = None  # wakes the flusher: wake_rows wait (set by the writer)
        self.on_full: Callable[[Ring, int], None] | None = None  # wakes it, or flushes when it is gone (writer)
        self.on_abandon: Callable[[int, bool], None] | None = None  # tells a drain process (set by the writer)
        self._hole: tuple[int, float] = (-1, 0.0)  # (slot, since) of an unwritten slot blocking the drain
        self._delta_at = delta_at
        self._drained_at = drained_at
        self._view = np.frombuffer(mm, dtype=RING_DTYPE, count=capacity, offset=base)
        self._rows = self._view.view(ROW_VIEW_DTYPE)

    def write(self, sid: int, step: int, value: float, t: float) -> None:
        """Store one row (thread-safe: the slot counter is atomic under the GIL)."""
        slot = next(self.next_slot)
        try:
            if slot >= self.limit:
                self.at_limit(slot)
            PACK(self.mm, self.base + (slot & self.mask) * ROW_BYTES, sid, step, value, t, slot + 1)
        except (struct.error, TypeError, OverflowError):
            self.abandon(slot, unstorable=True)
        except BaseException:  # KeyboardInterrupt mid-write: the slot must not block the drain
            self.abandon(slot)
            raise

    def abandon(self, slot: int, unstorable: bool = False) -> None:
        """A logging call that took ``slot`` raised before committing it (``unstorable``: the
        packer refused its values, which the API never lets through): the flusher skips it."""
        if self.on_abandon is not None:  # the rows are drained by another process
            self.on_abandon(slot, unstorable)
            return
        self.abandoned.add(slot)
        self.unstorable += unstorable

    def set_wake_rows(self, rows: int) -> None:
        """Wake the flusher (``on_due``) once ``rows`` rows wait (at most the ring's capacity)."""
        self.wake_rows = max(1, min(rows, self.capacity))
        self.limit = self.drained + self.wake_rows - 1  # the call writing the wake_rows-th row wakes it

    def at_limit(self, slot: int) -> None:
        """``slot`` reached ``limit``: when ``wake_rows`` rows wait, wake the flusher (again
        ``wake_rows`` slots later while it has not drained them); when the ring is full (the
        flusher is ``capacity`` rows behind), back-pressure: wait until it drained enough for
        ``slot`` (never overwrite a row that is not in HDF5 yet). The drain point is read from
        the ring's header, where the flusher publishes it, in this process or a drain process."""
        drained = self.published_drained()
        if slot < drained + self.capacity:
            if slot - drained + 1 >= self.wake_rows:
                if self.on_due is not None:
                    self.on_due()
                self.limit = min(slot + self.wake_rows, drained + self.capacity)
            else:
                self.limit = drained + self.wake_rows - 1
            return
        self.waits += 1
        while slot >= self.published_drained() + self.capacity:
            if self.on_full is not None:  # the flusher may be asleep, or gone
                self.on_full(self, slot)
            if slot >= self.published_drained() + self.capacity:
                time.sleep(BACKPRESSURE_SLEEP_S)

    def published_drained(self) -> int:
        return _U8.unpack_from(self.mm, self._drained_at)[0]

    def let_go(self, slot: int) -> None:
        """Nothing drains this ring any more (its drain process is gone): free the oldest slots
        for ``slot``, so that the ring keeps the newest ``capacity`` rows for the reader, and
        count them in ``given_up``. The delta moves with them: recovery starts after them."""
        drained = self.published_drained()
        skip = slot - self.capacity + 1 - drained
        if skip > 0:
            self.set_delta(_U8.unpack_from(self.mm, self._delta_at)[0] + skip)
            self.given_up += skip
            _U8.pack_into(self.mm, self._drained_at, drained + skip)

    def committed(self, at_least: int = 1) -> bool:
        """Whether ``at_least`` rows wait to be drained (O(1): checks the last of them)."""
        slot = self.drained + at_least - 1
        return int(self._view["seq"][slot & self.mask]) == slot + 1

    def pending(self, max_rows: int) -> np.ndarray:
        """The committed rows from ``drained`` on, as a view of the ring in ``ROW_VIEW_DTYPE``
        (no copy: HDF5 converts the rows as it writes them): at most ``max_rows``, up to the
        first slot not yet written and to the ring's end (the next call goes on after the wrap).
        The rows stay in the ring, unchanged, until ``release``."""
        start = self.drained
        at = start & self.mask
        n = max(0, min(max_rows, self.capacity - at, self.issued() - start))
        seq = self._view["seq"][at:at + n]
        # A slot's seq is at most its expected value (a slot is never written a lap ahead of
        # the drain), so the sums are equal only when every row is committed: one numpy call
        # instead of three. Each numpy call lets the GIL go, and taking it back from a logger
        # that runs Python without pause costs the flusher a switch interval (5 ms).
        if int(seq.sum(dtype=np.uint64)) == (n * start + n * (n + 1) // 2) % (1 << 64):
            return self._rows[at:at + n]
        torn = np.flatnonzero(seq != np.arange(start + 1, start + 1 + n, dtype=np.uint64))
        return self._rows[at:at + (int(torn[0]) if len(torn) else n)]

    def issued(self) -> int:
        """Slots handed out so far (the counter's value, read without advancing it). In a drain
        process, which cannot read the training process's counter: the slots committed from
        the drain point on, or more when that process said so (``reported``: with each wake,
        flush and close, so that a slot left unwritten is seen as a hole)."""
        if self.next_slot is not None:
            return self.next_slot.__reduce__()[1][0]
        return max(self.reported, self.drained + self._committed_run())

    def _committed_run(self) -> int:
        """How many slots from ``drained`` on are committed, without a gap (at most one lap)."""
        start, at, seq = self.drained, self.drained & self.mask, self._view["seq"]
        run = 0
        for lo, hi in ((at, self.capacity), (0, at)):
            expected = np.arange(start + run + 1, start + run + 1 + hi - lo, dtype=np.uint64)
            gaps = np.flatnonzero(seq[lo:hi] != expected)
            if len(gaps):
                return run + int(gaps[0])
            run += hi - lo
        return run

    def skip_hole(self, flushed_rows: int, now: float) -> int:
        """Skip the unwritten slots at the drain point that will never be written: abandoned
        ones (returns 0 for them) and, as a last resort, one still unwritten ``HOLE_TIMEOUT_S``
        after it was issued (a thread that took it and never came back; counted in ``given_up``).
        Returns how many slots it skipped. ``flushed_rows`` is the table's HDF5 length, for the delta."""
        skipped = 0
        while self.drained < self.issued() and not self.committed():
            slot = self.drained
            if slot in self.abandoned:
                self.abandoned.discard(slot)
            elif self._hole[0] != slot:
                self._hole = (slot, now)
                break
            elif now - self._hole[1] >= HOLE_TIMEOUT_S:
                self.given_up += 1
            else:
                break
            self.set_delta(slot + 1 - flushed_rows)  # before the slot is freed: recovery starts after it
            self.release(1)
            skipped += 1
        return skipped

    def set_delta(self, delta: int) -> None:
        _U8.pack_into(self.mm, self._delta_at, delta)

    def release(self, n: int) -> None:
        """The flusher is done with the next ``n`` rows (written or counted lost)."""
        self.drained += n
        _U8.pack_into(self.mm, self._drained_at, self.drained)
        self.limit = self.drained + self.wake_rows - 1


def as_rows(ring_rows: np.ndarray) -> np.ndarray:
    """Ring rows as ``schema.ROW_DTYPE`` rows: the first bytes of a ring row are one (asserted
    below), so one strided byte copy does it (one numpy call, not one per field)."""
    raw = np.ascontiguousarray(ring_rows).view(np.uint8).reshape(len(ring_rows), ROW_BYTES)
    return np.ascontiguousarray(raw[:, :schema.ROW_DTYPE.itemsize]).view(schema.ROW_DTYPE).reshape(len(ring_rows))


assert all(RING_DTYPE.fields[name] == schema.ROW_DTYPE.fields[name] for name in schema.ROW_DTYPE.names)


class CrashLog:
    """A shard's ring file and journal WAL, owned by its writer."""

    def __init__(self, shard: Path, adopt: bool = False) -> None:
        """Create the shard's ring file and WAL; or, ``adopt``, map the ones a training process
        created, to drain them (a drain process: it never writes the WAL, whose records are
        the training process's, in its order)."""
        self.ring_path, self.wal_path = ring_path(shard), wal_path(shard)
        fd = os.open(self.ring_path, os.O_RDWR if adopt else os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if adopt:
                header = os.pread(fd, HEADER_BYTES, 0)
                caps = [_header_field(header, 2 * i) for i in range(len(schema.TABLES))]
            else:
                caps = _allocate(fd)
            self.mm = mmap.mmap(fd, HEADER_BYTES + sum(caps) * ROW_BYTES, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            if not adopt:
                self.ring_path.unlink(missing_ok=True)
            raise
        os.close(fd)
        if not adopt:
            self.mm[:len(MAGIC)] = MAGIC
            for i, cap in enumerate(caps):
                _U8.pack_into(self.mm, _field_offset(2 * i), cap)
        self.rings = {name: Ring(self.mm, base, cap, _field_offset(2 * i + 1), _field_offset(DRAINED + i))
                      for i, (name, base, cap) in enumerate(zip(schema.TABLES, _table_layout(caps), caps, strict=True))}
        self.wal_error: str | None = None
        self._wal_lock = threading.Lock()
        self._wal: int | None = None
        if adopt:
            self.wal_error = "a drain process never writes the WAL"
            for r in self.rings.values():
                r.drained = r.published_drained()
                r.next_slot = None  # issued by the training process: see Ring.issued
            return
        try:
            self._wal = os.open(self.wal_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except BaseException:
            self.mm.close()
            self.ring_path.unlink(missing_ok=True)
            raise

    def append_record(self, line: bytes) -> bool:
        """One journal line, in the page cache when this returns True. A failed write (disk
        full) stops the WAL for good, so that its records stay the HDF5 journal's in order; the
        records still reach the shard at the next flush. ``wal_error`` says why."""
        if self.wal_error is not None or self._wal is None:
            return False
        frame = WAL_FRAME.pack(len(line), zlib.crc32(line)) + line
        with self._wal_lock:
            try:
                if os.write(self._wal, frame) != len(frame):
                    raise OSError("short write")
            except OSError as exc:
                self.wal_error = f"{self.wal_path}: {exc.strerror or exc}"
                return False
        return True

    def set_journal_delta(self, delta: int) -> None:
        _U8.pack_into(self.mm, _field_offset(2 * JOURNAL_DELTA), delta)

    def close(self, remove: bool) -> None:
        """Unmap and close; remove the files when the shard holds everything (a clean close)."""
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None
        for ring in self.rings.values():
            ring._view = ring._rows = None
        try:
            self.mm.close()
        except BufferError:  # a view still exported (a flusher frame): the mapping goes with the process
            pass
        if remove:
            self.ring_path.unlink(missing_ok=True)
            self.wal_path.unlink(missing_ok=True)

    def forget_in_child(self) -> None:
        """In a forked child: every ring writes into private memory from now on, never into the
        parent's file (the parent's mapping is shared with this process until it unmaps)."""
        for ring in self.rings.values():
            ring.mm = mmap.mmap(-1, len(self.mm))
        self.wal_error = "a forked child never writes its parent's WAL"


def _allocate(fd: int) -> list[int]:
    """Reserve the ring file's blocks; the capacities per table that the disk took."""
    for shift in range(MIN_CAPACITY_SHIFT + 1):
        caps = [CAPACITY[name] >> shift for name in schema.TABLES]
        try:
            os.posix_fallocate(fd, 0, HEADER_BYTES + sum(caps) * ROW_BYTES)
            return caps
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or shift == MIN_CAPACITY_SHIFT:
                raise
    raise AssertionError("unreachable")


def _header_field(data: bytes, index: int) -> int:
    return _U8.unpack_from(data, _field_offset(index))[0]


def recover_rows(shard: Path, table: str, hdf5_rows: int) -> np.ndarray:
    """The committed rows of ``table`` in the ring next to ``shard`` that HDF5 lacks, in slot
    order; empty when there is no ring. Raises ValueError for a ring that is not one."""
    path = ring_path(shard)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return np.empty(0, schema.ROW_DTYPE)
    if data[:len(MAGIC)] != MAGIC or len(data) < HEADER_BYTES:
        raise ValueError(f"{path}: not a prov4ml_dist crash ring")
    caps = [_header_field(data, 2 * i) for i in range(len(schema.TABLES))]
    if any(c <= 0 or c & (c - 1) or c > 1 << 30 for c in caps) or len(data) < HEADER_BYTES + sum(caps) * ROW_BYTES:
        raise ValueError(f"{path}: damaged crash ring header")
    i = schema.TABLES.index(table)
    base, cap = _table_layout(caps)[i], caps[i]
    view = np.frombuffer(data, dtype=RING_DTYPE, count=cap, offset=base)
    first = hdf5_rows + _header_field(data, 2 * i + 1)
    seqs = view["seq"].astype(np.int64) - 1  # each row's slot, -1 for never written
    keep = np.flatnonzero((seqs >= first) & (seqs < first + cap) & ((seqs & (cap - 1)) == np.arange(cap)))
    return as_rows(view[keep[np.argsort(seqs[keep], kind="stable")]])


def recover_records(shard: Path, hdf5_lines: int) -> Iterator[bytes]:
    """The WAL's journal lines that the HDF5 journal lacks (it holds ``hdf5_lines`` lines)."""
    try:
        data = wal_path(shard).read_bytes()
        header = ring_path(shard).read_bytes()[:HEADER_BYTES]
    except FileNotFoundError:
        return
    first = hdf5_lines + (_header_field(header, 2 * JOURNAL_DELTA) if header[:len(MAGIC)] == MAGIC else 0)
    at, index = 0, 0
    while at + WAL_FRAME.size <= len(data):
        length, crc = WAL_FRAME.unpack_from(data, at)
        line = data[at + WAL_FRAME.size:at + WAL_FRAME.size + length]
        if length > MAX_WAL_RECORD or len(line) < length or zlib.crc32(line) != crc:
            return  # torn (killed mid-write) or damaged: nothing after it is trusted
        if index >= first:
            yield line
        at += WAL_FRAME.size + length
        index += 1
