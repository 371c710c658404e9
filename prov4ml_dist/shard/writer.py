"""Buffered, crash-safe writing of one rank's shard.

The hot path writes each row into the table's crash ring (``ring.py``: a file-backed shared
mapping that survives the process's death), so a point is safe once the logging call returns.
A flusher thread copies the committed rows into the SWMR file every ``flush_interval`` seconds,
or sooner when ``max_buffer_rows`` wait, and frees their slots. No logging call does I/O: a
ring that is full (the flusher ``ring.CAPACITY`` rows behind) makes the logging call wait for
the flusher (back-pressure, never an overwrite). Journal records also go to the shard's WAL
(one ``os.write``) before they are buffered.

A flush goes in pieces of at most ``FLUSH_PIECE_ROWS`` rows per table, each all or nothing,
each letting the GIL go to the logging threads a few times (see ``FLUSH_PIECE_ROWS``). When a
write fails (disk full, quota), the tables and the journal are cut back to their last flushed
length (a longer extent would read back as rows of zeros), the journal lines are queued again,
and the piece's rows are dropped and counted: the ``end`` record says how many, and a
``warning`` record when it happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5d, h5p, h5s

from ..artifacts import drop_world_write
from . import schema
from .ring import CrashLog, Ring

log = logging.getLogger(__name__)

DEFAULT_MAX_BUFFER_ROWS = 65536
# A flush writes at most FLUSH_PIECE_ROWS committed rows of a table per piece (fewer when fewer
# are issued). The flusher shares the GIL with the logging threads: h5py lets it go inside
# H5Dwrite and the file's flush, numpy in its bulk loops, and each time the flusher waits a
# switch interval (5 ms) to get it back from a logger that runs Python without pause. So a piece
# makes few calls (h5py's low-level API, one numpy call per step) and no sleeps: about 7 GIL
# hand-overs, ~35 ms, whatever the piece's size, so the flusher keeps up with any logging rate
# (a piece takes what was logged during the last one), and what it runs between hand-overs,
# while a logger waits, is short. Per 10^6 points logged in a tight loop (bench_log_metric.py):
# calls that found the ring full 0-12 -> 0, batches over 2 ms 1-12 -> 0-3 (README "Zero loss").
FLUSH_PIECE_ROWS = 65536
MAX_FAILURE_MESSAGES = 20  # kept for the end record; failure_count has them all
MAX_REQUEUE_BYTES = 4 << 20  # journal bytes kept for the next flush while flushing fails
CHUNK_CACHE_BYTES = 4 * schema.TABLE_CHUNK_ROWS * schema.ROW_DTYPE.itemsize  # per open dataset
CLOSE_WAIT_S = 10.0  # close waits this long for the flusher thread, then for a flush in progress

# Writers of this process, for the fork hook below: a forked child must never write its parent's file.
_live_writers: weakref.WeakSet[ShardWriter] = weakref.WeakSet()
_inherited: list[ShardWriter] = []  # kept alive in a forked child: never deallocated into a close


def to_json_line(record: dict[str, Any]) -> bytes:
    """One journal line; values JSON cannot hold are stored as their ``repr``."""
    return (json.dumps(record, default=repr, allow_nan=False, ensure_ascii=False) + "\n").encode()


class SeriesTable:
    """An append-only table of (series, step, value, time) rows with a series registry.

    Rows go into the table's crash ring (``ring.Ring``: a shared file mapping that outlives the
    process) through ``append`` or, on the logging hot path, the ring's slots directly (see
    ``Run.log_metric``); the flusher reads them with ``take`` and frees their slots once they
    are in HDF5 or counted lost (``written``, ``lost``). A flush that is abandoned releases nothing: the rows stay.
    """

    def __init__(self, name: str, journal: Callable[[dict[str, Any]], None], ring: Ring) -> None:
        self.name = name
        self._journal = journal
        self._lock = threading.RLock()
        self._ids: dict[tuple, int] = {}
        self.ring = ring
        self.push = ring.write
        self.rows_written = 0
        self.series_rows = np.zeros(0, dtype=np.int64)  # rows written per series id
        self.dropped = 0  # rows that could not be stored (refused by the ring, or their slot given up)

    def register(self, key: str, context: str, source: str, **extra: Any) -> int:
        """The id of a series, declaring it in the journal the first time it is seen."""
        ident = (key, context, source)
        with self._lock:
            sid = self._ids.get(ident)
            if sid is None:
                sid = self._ids[ident] = len(self._ids)
                self._journal({"kind": "series", "time": time.time(), "table": self.name, "id": sid,
                               "key": key, "context": context, "source": source or None, **extra})
        return sid

    def append(self, sid: int, step: int, value: float, t: float) -> None:
        """Store one row in the ring."""
        self.ring.write(sid, step, value, t)

    def pending(self, at_least: int = 1) -> bool:
        """Whether ``at_least`` rows wait for the flusher."""
        return self.ring.committed(at_least)

    def written(self, rows: np.ndarray) -> None:
        """Count rows that reached the file (the end record's per-series counts) and free their slots."""
        self.ring.release(len(rows))
        self.rows_written += len(rows)
        counts = np.bincount(rows["series"])
        if len(counts) > len(self.series_rows):
            self.series_rows = np.r_[self.series_rows, np.zeros(len(counts) - len(self.series_rows), np.int64)]
        self.series_rows[:len(counts)] += counts

    def take(self, max_rows: int) -> np.ndarray:
        """At most ``max_rows`` rows waiting in the ring, as a structured array (see
        ``Ring.pending``); they stay there until released.
        Rows the ring refused since the last call (the API lets none through) are counted and
        reported, once per flush."""
        refused, self.ring.unstorable = self.ring.unstorable, 0
        self.dropped += self.ring.given_up
        self.ring.given_up = 0
        if refused:
            self.dropped += refused
            message = (f"{refused} rows of {self.name!r} could not be stored (values out of the row type's "
                       "range); dropped and counted in the end record's lost_rows")
            log.warning("prov4ml_dist: %s", message)
            self._journal({"kind": "warning", "time": time.time(), "where": "shard", "message": message})
        return self.ring.pending(max_rows)

    def lost(self, rows: np.ndarray) -> None:
        """Free the slots of rows a failed flush dropped (counted by the writer)."""
        self.ring.release(len(rows))


class ShardWriter:
    """The single writer of one shard file. Thread-safe; never raises from the flusher thread."""

    def __init__(self, path: Path, attrs: dict[str, Any], flush_interval: float = 1.0,
                 max_buffer_rows: int = DEFAULT_MAX_BUFFER_ROWS) -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.failures: list[str] = []  # the first MAX_FAILURE_MESSAGES messages
        self.failure_count = 0
        self.lost_rows = dict.fromkeys(schema.TABLES, 0)  # rows dropped by failed flushes
        self.lost_journal_bytes = 0
        self._journal_lock = threading.RLock()  # re-entrant: a signal handler may close mid-record
        self._journal_buf: list[bytes] = []
        self._flush_lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by close, and by a logging call when max_buffer_rows wait
        self._owner_pid = os.getpid()
        self._deferred: list[tuple[int, Callable[[], None]]] = []  # (thread, action) for after a flush/record
        self._file = self._create(attrs)
        self._fd = self._file.id.get_vfd_handle()
        self._datasets = _open_datasets(self._file)
        self._flushed = dict.fromkeys((*schema.TABLES, schema.JOURNAL), 0)  # lengths at the last good flush
        self._inflight: tuple[list[bytes], dict[str, np.ndarray]] | None = None
        self._failing = False
        self._max_rows = max_buffer_rows
        try:
            self.crash = CrashLog(self.path)
        except BaseException:
            with contextlib.suppress(Exception):
                self._file.close()
            self.path.unlink(missing_ok=True)
            raise
        self._wal_noted = False
        self._journal_drained = 0  # WAL records in the HDF5 journal or counted lost
        self._journal_lines = 0  # lines in the HDF5 journal
        self.tables = {name: SeriesTable(name, self.record, self.crash.rings[name]) for name in schema.TABLES}
        for ring in self.crash.rings.values():
            ring.on_full = self._ring_full
            ring.on_due = self._wake.set
            ring.set_wake_rows(max_buffer_rows)
        self.metrics = self.tables["metrics"]
        self.system = self.tables["system"]
        self._thread = threading.Thread(target=self._run, name="prov4ml-flusher", daemon=True)
        self._thread.start()
        _live_writers.add(self)

    def _create(self, attrs: dict[str, Any]) -> h5py.File:
        """Create the file exclusively (never overwrite another attempt's shard), then go SWMR.
        A file this call created but could not set up (disk full) is removed again."""
        try:
            f = h5py.File(self.path, "x", libver="latest", locking="best-effort")
        except FileExistsError:
            raise
        except BaseException:
            self.path.unlink(missing_ok=True)  # O_EXCL succeeded before the failure: the file is ours
            raise
        try:
            f.attrs["format"] = schema.FORMAT
            f.attrs["schema_version"] = schema.SCHEMA_VERSION
            for key, value in attrs.items():
                f.attrs[key] = value
            for name in schema.TABLES:
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=schema.ROW_DTYPE,
                                 chunks=(schema.TABLE_CHUNK_ROWS,))
            f.create_dataset(schema.JOURNAL, shape=(0,), maxshape=(None,), dtype="u1",
                             chunks=(schema.JOURNAL_CHUNK_BYTES,))
            f.swmr_mode = True
            drop_world_write(self.path)
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            self.path.unlink(missing_ok=True)
            raise
        return f

    def record(self, record: dict[str, Any]) -> None:
        """Buffer one journal record; it reaches the file at the next flush."""
        line = to_json_line(record)
        if self._owner_pid != os.getpid():
            return  # a forked child: nothing reaches the parent's files
        with self._journal_lock:
            self.crash.append_record(line)
            self._journal_buf.append(line)
        if self.crash.wal_error is not None and not self._wal_noted:
            self._wal_noted = True
            self._note(f"journal WAL stopped ({self.crash.wal_error}): records from here on survive a crash "
                       "only once flushed")
        if self._deferred:
            self._run_deferred()

    # -- signals and forks ----------------------------------------------------------------
    def busy_here(self) -> bool:
        """Whether this thread is inside a flush or a journal append: a signal handler running
        now must not close the shard under it (nor wait for the flusher, which may be waiting
        on this very flush)."""
        return self._flush_lock._is_owned() or self._journal_lock._is_owned()

    def defer(self, action: Callable[[], None]) -> bool:
        """Queue ``action`` to run in this thread as soon as it leaves its flush or journal
        append, and say True; say False (queue nothing) when it is in neither."""
        if not self.busy_here():
            return False
        self._deferred.append((threading.get_ident(), action))
        return True

    def _run_deferred(self) -> None:
        if self.busy_here():
            return
        me = threading.get_ident()
        mine = [action for ident, action in self._deferred if ident == me]
        if mine:
            self._deferred = [(ident, action) for ident, action in self._deferred if ident != me]
            for action in mine:
                action()

    def inherited(self) -> bool:
        """Whether this process is a fork of the one that created the shard (never its writer)."""
        return self._owner_pid != os.getpid()

    def _disown(self) -> None:
        """In a forked child: point the inherited descriptor at /dev/null, so that nothing HDF5
        does here (a metadata flush when the file object is deallocated, or at HDF5's exit)
        reaches the parent's file, and keep the objects alive until the process ends."""
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, self._fd)
        finally:
            os.close(devnull)
        _inherited.append(self)

    def _drop_in_child(self) -> None:
        """A flush asked for in a forked child: nothing may reach the parent's file; drop."""
        self._journal_buf = []

    def _ring_full(self) -> None:
        """A logging call found a ring full and waits until slots are free: wake the flusher, or,
        when its thread is gone (it died, or stopped while another thread still logs), flush in
        this thread, so that the call never waits forever (the rows stay safe in the ring)."""
        self._wake.set()
        if not self._thread.is_alive() and self._file is not None and not self.inherited():
            self.flush()

    def _run(self) -> None:
        """Flush every ``flush_interval``, as soon as a ring holds ``max_buffer_rows`` (and
        again at once while it still does), and at once when a logging call found a ring full
        (it waits for this flush). Flushes start ``flush_interval`` apart (not
        after the previous one ended), so a point waits at most ``flush_interval`` plus one
        flush's time for the file."""
        due = time.monotonic() + self.flush_interval
        woken = False
        while not self._stop.is_set():
            now = time.monotonic()
            self._wake.clear()  # before the checks: a wake from here on ends the wait below
            if woken or now >= due or any(t.pending(self._max_rows) for t in self.tables.values()):
                due = now + self.flush_interval
                self.flush()
                woken = False
            else:  # no polling: a ring wakes this thread when max_buffer_rows wait (Ring.at_limit)
                woken = self._wake.wait(max(0.0, due - now))

    def flush(self) -> None:
        """Write everything buffered. A failure (disk full, ...) is recorded, not raised."""
        if self._owner_pid != os.getpid():  # before any lock: a parent's thread may have held it at fork
            self._drop_in_child()
            return
        with self._flush_lock:
            if self._file is None:
                return
            if self._inflight is not None:  # a signal handler interrupted this thread's flush: redo it
                self._abandon(keep_rows=True)
            due = {name: table.ring.issued() for name, table in self.tables.items()}
            failure: Exception | None = None
            while True:  # piece by piece, up to the slots issued when this flush began
                try:
                    more = self._flush_locked(due)
                except Exception as exc:  # noqa: BLE001 - training must go on; the loss is recorded
                    self._abandon(keep_rows=False)
                    failure = failure or exc
                    # The next pieces are tried too: a flush takes (or drops and counts) every
                    # row due, so that nothing is left for a later flush to drop after the end record.
                    more = any(t.ring.drained < due[n] and t.pending() for n, t in self.tables.items())
                except BaseException:  # KeyboardInterrupt mid-flush: nothing is lost, the exit path flushes
                    self._abandon(keep_rows=True)
                    raise
                if not more:
                    break
            if failure is not None:
                self._failed(failure)
        if self._deferred:
            self._run_deferred()

    def _flush_locked(self, due: dict[str, int]) -> bool:
        """One piece: the journal, then up to ``FLUSH_PIECE_ROWS`` committed rows of each table;
        says whether more is due: rows before a table's ``due`` slot left for the next piece,
        or an unwritten slot skipped (the rows behind it)."""
        # Journal first: series records must land before the rows that use their ids.
        with self._journal_lock:
            lines, self._journal_buf = self._journal_buf, []
            self._inflight = (lines, {})
        rows = {name: table.take(FLUSH_PIECE_ROWS) for name, table in self.tables.items()}
        self._inflight = (lines, rows)
        self._set_deltas()
        data = {schema.JOURNAL: np.frombuffer(b"".join(lines), dtype="u1"), **rows}
        for name, values in data.items():
            if len(values):
                self._append(name, values)
        self._file.flush()  # the datasets' cached chunks too: a write that fails (disk full) fails here
        self._inflight = None
        for name, values in data.items():
            self._flushed[name] += len(values)
        self._journal_lines += len(lines)
        self._journal_drained += len(lines)
        for name, values in rows.items():
            self.tables[name].written(values)
        now = time.monotonic()
        if self._failing:
            self._failing = False
            self._note(f"flushing {self.path} works again after {self.failure_count} failed flushes; "
                       f"rows lost: {self.lost_rows}")
        skipped = sum(table.ring.skip_hole(self._flushed[name], now) for name, table in self.tables.items())
        return skipped > 0 or any(len(rows[name]) > 0 and self.tables[name].ring.drained < due[name] for name in rows)

    def _append(self, name: str, values: np.ndarray) -> None:
        """Write ``values`` after the last flushed row (over whatever a failed flush left).
        h5py's low-level calls: its high-level ``Dataset`` runs a few hundred Python calls per
        write (lookup, selection), all holding the GIL, and a logging thread waited for them
        (stalls of 2+ ms in a tight logging loop); h5py lets the GIL go inside ``H5Dwrite``."""
        dataset, start = self._datasets[name], self._flushed[name]
        dataset.set_extent((start + len(values),))
        target = dataset.get_space()
        target.select_hyperslab((start,), (len(values),))
        dataset.write(h5s.create_simple((len(values),)), target, values)

    def _abandon(self, keep_rows: bool) -> None:
        """Undo the flush in flight: cut the datasets back, queue its journal lines again, and
        queue its rows again (``keep_rows``) or count them as lost."""
        if self._inflight is None:  # a signal handler's flush took it over and finished it
            return
        lines, rows = self._inflight
        self._inflight = None
        for name, length in self._flushed.items():
            with contextlib.suppress(Exception):  # the next flush writes from _flushed anyway
                dataset = self._datasets[name]
                if dataset.shape[0] != length:
                    dataset.set_extent((length,))
        with self._journal_lock:
            if keep_rows or sum(map(len, lines)) <= MAX_REQUEUE_BYTES:
                self._journal_buf[:0] = lines
            else:
                self.lost_journal_bytes += sum(map(len, lines))
                self._journal_drained += len(lines)
        if not keep_rows:  # the rows stay in their rings (keep_rows) or are dropped and counted
            for name, data in rows.items():
                self.lost_rows[name] += len(data)
            self._set_deltas(dropped={name: len(data) for name, data in rows.items()})
            for name, data in rows.items():
                self.tables[name].lost(data)

    def _set_deltas(self, dropped: dict[str, int] | None = None) -> None:
        """Tell a crash reader which ring slot / WAL record the next HDF5 row / journal line
        holds; written before the slots are freed, so that no recovery ever misses or repeats one."""
        for name, table in self.tables.items():
            table.ring.set_delta(table.ring.drained + (dropped or {}).get(name, 0) - self._flushed[name])
        self.crash.set_journal_delta(self._journal_drained - self._journal_lines)

    def _failed(self, exc: Exception) -> None:
        """Count a failed flush; warn (log and journal) at the first of a series of failures."""
        self.failure_count += 1
        message = f"flush of {self.path} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        if len(self.failures) < MAX_FAILURE_MESSAGES:
            self.failures.append(message)
        if not self._failing:
            self._failing = True
            self._note(f"{message}; training goes on, unflushed points are dropped and counted "
                       "(further failures are counted, not logged)")
        else:
            log.debug(message)

    def _note(self, message: str) -> None:
        log.warning("prov4ml_dist: %s", message)
        self.record({"kind": "warning", "time": time.time(), "where": "shard", "message": message})

    def close(self, status: str = "ok") -> None:
        """Flush, write the ``end`` record and close. Idempotent; nothing in a forked child.

        Every wait is bounded by ``CLOSE_WAIT_S``: the flusher is not awaited from inside a
        flush of this thread (it may be waiting on that flush's lock), and a flush stuck in
        I/O leaves the shard as its last flush made it, without an end record.
        """
        if self._file is None or self._owner_pid != os.getpid():
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread() and not self._flush_lock._is_owned():
            self._thread.join(CLOSE_WAIT_S)
        if not self._flush_lock.acquire(timeout=CLOSE_WAIT_S):
            log.warning("prov4ml_dist: a flush of %s has been running for more than %s s; the shard keeps "
                        "what its last flush wrote, and no end record", self.path, CLOSE_WAIT_S)
            return
        try:
            if self._file is None:  # closed while this thread waited
                return
            self.flush()  # rows first, so the end record can count them
            self.record({"kind": "end", "time": time.time(), "status": status,
                         "rows": {n: t.rows_written for n, t in self.tables.items()},
                         "series_rows": {n: t.series_rows.tolist() for n, t in self.tables.items()},
                         "failures": self.failures, "failure_count": self.failure_count,
                         "lost_rows": {n: self.lost_rows[n] + t.dropped for n, t in self.tables.items()},
                         "lost_journal_bytes": self.lost_journal_bytes,
                         "ring_waits": {n: t.ring.waits for n, t in self.tables.items()}})
            self.flush()
            try:
                self._file.close()
                complete = not any(t.pending() for t in self.tables.values())
            except Exception as exc:  # noqa: BLE001
                log.warning("closing %s failed: %s", self.path, exc)
                complete = False
            self._file = None
            self.crash.close(remove=complete)  # kept for the reader when the shard lacks something
        finally:
            self._flush_lock.release()
        if self._deferred:  # a signal that arrived during this close acts now
            self._run_deferred()


def _open_datasets(file: h5py.File) -> dict[str, h5py.h5d.DatasetID]:
    """The tables and the journal, open for the writer's life, each with a chunk cache of a
    few chunks (HDF5's default of 1 MiB each was +8 MB of RSS): appends fill chunks in order,
    and the file's flush writes the cached ones after every piece."""
    access = h5p.create(h5p.DATASET_ACCESS)
    slots, _, w0 = access.get_chunk_cache()
    access.set_chunk_cache(slots, CHUNK_CACHE_BYTES, w0)
    return {name: h5d.open(file.id, name.encode(), access) for name in (*schema.TABLES, schema.JOURNAL)}


def _disown_inherited_writers() -> None:
    """The fork hook: a child process never writes, flushes into or closes its parent's shards."""
    for writer in list(_live_writers):
        if writer._file is not None and writer.inherited():
            writer._disown()
            writer.crash.forget_in_child()


os.register_at_fork(after_in_child=_disown_inherited_writers)
