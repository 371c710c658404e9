"""Buffered, crash-safe writing of one rank's shard.

The hot path writes each row into the table's crash ring (``ring.py``: a file-backed shared
mapping that survives the process's death), so a point is safe once the logging call returns.
A flusher thread copies the committed rows into the SWMR file every ``flush_interval`` seconds,
or sooner when ``max_buffer_rows`` wait, and frees their slots; once a drain process of the
rank's own is ready (``drain.py``), the shard is handed to it, which runs the same code there,
so that the flusher never takes the GIL from the training loop. No logging call does I/O: a
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
from . import drain, schema
from .drain import DrainClient, DrainGone
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
        self._setup(Path(path), flush_interval, max_buffer_rows, drain.mode())
        self._maybe_spawn(0)  # "on": first, so that the process imports while the shard is made
        try:
            self._file = self._create(attrs)
            try:
                self.crash = CrashLog(self.path)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._file.close()
                self.path.unlink(missing_ok=True)
                raise
        except BaseException:
            if self._spawning is not None:
                self._spawning[0].stop(0.0)
            raise
        self._start()

    @classmethod
    def adopt(cls, state: dict[str, Any]) -> ShardWriter:
        """In a drain process (``drain.py``): go on writing the shard a training process handed
        over, from the state it sent (``_state``), draining the same crash rings."""
        self = cls.__new__(cls)
        self._setup(Path(state["path"]), state["flush_interval"], state["max_rows"], "off")
        self._written_by = "drain process"
        self._file = h5py.File(self.path, "r+", libver="latest", locking="best-effort")
        self._file.swmr_mode = True
        self.crash = CrashLog(self.path, adopt=True)
        self._start(state)
        return self

    def _setup(self, path: Path, flush_interval: float, max_buffer_rows: int, drain_mode: str) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self.failures: list[str] = []  # the first MAX_FAILURE_MESSAGES messages
        self.failure_count = 0
        self.lost_rows = dict.fromkeys(schema.TABLES, 0)  # rows dropped by failed flushes
        self.lost_journal_bytes = 0
        self._journal_lock = threading.RLock()  # re-entrant: a signal handler may close mid-record
        self._journal_buf: list[bytes] = []
        self._journal_unlogged = 0  # lines of _journal_buf that are not in the WAL
        self._flush_lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by close, and by a logging call when max_buffer_rows wait
        self._owner_pid = os.getpid()
        self._deferred: list[tuple[int, Callable[[], None]]] = []  # (thread, action) for after a flush/record
        self._flushed = dict.fromkeys((*schema.TABLES, schema.JOURNAL), 0)  # lengths at the last good flush
        self._inflight: tuple[list[bytes], int, dict[str, np.ndarray]] | None = None
        self._failing = False
        self._max_rows = max_buffer_rows
        self._closed = False
        self._drain_mode = drain_mode
        self._spawning: tuple[DrainClient, float] | None = None  # a drain process starting, since
        self._drain: DrainClient | None = None  # the drain process that writes the shard now
        self._drain_lost_why: str | None = None
        self._written_by = "flusher thread"  # for the end record: who wrote the shard at the end

    def _start(self, state: dict[str, Any] | None = None) -> None:
        self._fd = self._file.id.get_vfd_handle()
        self._datasets = _open_datasets(self._file)
        self._wal_noted = False
        self._journal_drained = 0  # WAL records in the HDF5 journal or counted lost
        self._journal_lines = 0  # lines in the HDF5 journal
        self.tables = {name: SeriesTable(name, self.record, self.crash.rings[name]) for name in schema.TABLES}
        for ring in self.crash.rings.values():
            ring.on_full = self._ring_full
            ring.on_due = self._wake.set
            ring.set_wake_rows(self._max_rows)
        self.metrics = self.tables["metrics"]
        self.system = self.tables["system"]
        if state is not None:
            self._restore(state)
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
            logged = self.crash.append_record(line)
            if self._drain is not None:
                try:
                    self._drain.send(("record", line, logged))
                except DrainGone as exc:
                    self._drain_lost(exc)
            elif self._drain_lost_why is None:
                self._journal_buf.append(line)
                self._journal_unlogged += not logged
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
        client = self._drain or (self._spawning[0] if self._spawning else None)
        return (self._flush_lock._is_owned() or self._journal_lock._is_owned()
                or (client is not None and client.sending_here()))

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
        reaches the parent's file, drop the parent's drain-process socket, and keep the objects
        alive until the process ends."""
        if self._file is not None:
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, self._fd)
            finally:
                os.close(devnull)
        for client in (self._drain, self._spawning[0] if self._spawning else None):
            if client is not None:
                client.forget_in_child()
        _inherited.append(self)

    def _drop_in_child(self) -> None:
        """A flush asked for in a forked child: nothing may reach the parent's file; drop."""
        self._journal_buf = []

    def _ring_full(self, ring: Ring, slot: int) -> None:
        """A logging call found a ring full and waits until slots are free: wake the flusher, or,
        when its thread is gone (it died, or stopped while another thread still logs), flush in
        this thread, so that the call never waits forever (the rows stay safe in the ring).
        With a drain process: wake it; when it is gone, let the ring's oldest rows go."""
        if self._drain is not None:
            self._drain_wake()
        if self._drain_lost_why is not None:
            ring.let_go(slot)
            return
        self._wake.set()
        if not self._thread.is_alive() and self._file is not None and not self.inherited():
            self.flush()

    # -- the drain process (drain.py) -----------------------------------------------------
    def _issued(self) -> dict[str, int]:
        return {name: table.ring.issued() for name, table in self.tables.items()}

    def _drain_wake(self) -> None:
        try:
            self._drain.send(("wake", self._issued()))
        except DrainGone as exc:
            self._drain_lost(exc)
        except AttributeError:  # lost by another thread since the caller looked
            pass
        if self._deferred:  # a signal that arrived during the send acts now
            self._run_deferred()

    def _drain_abandon(self, name: str) -> Callable[[int, bool], None]:
        def abandon(slot: int, unstorable: bool) -> None:
            try:
                self._drain.send(("abandon", name, slot, int(unstorable)))
            except (DrainGone, AttributeError):  # the process is gone: nothing will drain the slot
                pass
            if self._deferred:
                self._run_deferred()
        return abandon

    def _maybe_spawn(self, rows_woke: int) -> None:
        """Start a drain process at once with ``on``; with ``auto`` once rows waiting woke this
        thread ``drain.PROMOTE_AFTER`` times in a row (a rank that logs fast); never with ``off``."""
        if self._spawning is not None or self._drain_mode == "off" or (
                self._drain_mode == "auto" and rows_woke < drain.PROMOTE_AFTER):
            return
        try:
            self._spawning = (DrainClient(), time.monotonic())
        except (OSError, ValueError) as exc:
            self._drain_mode = "off"
            log.warning("prov4ml_dist: cannot start a drain process for %s (%s); the shard is written by "
                        "this process's flusher thread", self.path, exc)

    def await_drain(self, timeout: float | None = None) -> bool:
        """Wait until the drain process being started has taken the shard (or was given up), at
        most ``timeout`` (``drain.START_WAIT_S``); says whether it writes the shard now.
        ``start_run`` waits here: until the hand-over the flusher thread writes the shard, and a
        rank that logs at once in a tight loop would meet the stalls the process is there to
        remove (README "Zero loss")."""
        # Polls: with the rank's main thread blocked in a ``threading.Event.wait`` here, the MPI
        # template job on the test cluster failed inside MPICH's PMI2 address exchange 4 times
        # in 4 (requests garbled with this process's heap); polling passed 4 of 4. Not
        # understood: see README "Zero loss", the drain process.
        deadline = time.monotonic() + (drain.START_WAIT_S if timeout is None else timeout)
        while self._spawning is not None and time.monotonic() < deadline:
            time.sleep(drain.STARTING_POLL_S / 2)
        return self._drain is not None

    def _drain_ready(self) -> bool:
        """Whether the drain process being started waits for the hand-over; gives it up when it
        exited or takes too long (the flusher thread goes on writing the shard)."""
        client, since = self._spawning
        try:
            if client.ready():
                return True
            if time.monotonic() - since < drain.READY_TIMEOUT_S:
                return False
            why = f"not ready after {drain.READY_TIMEOUT_S:g} s"
        except DrainGone as exc:
            why = str(exc)
        self._spawning, self._drain_mode = None, "off"
        client.stop(0.0)
        log.warning("prov4ml_dist: the drain process for %s did not start (%s); the shard is written by this "
                    "process's flusher thread", self.path, why)
        return False

    def _hand_over(self) -> bool:
        """Close the shard and hand it to the drain process, which goes on from this writer's
        state (the journal lines not flushed yet with it; the rows not flushed yet stay in the
        rings, which it drains); says whether it took it (else this thread goes on writing
        it). The journal lock is held until the process has the shard, so no record falls
        between. ``_spawning`` stays set until it is done: ``await_drain`` waits on it."""
        client, _ = self._spawning
        try:
            with self._flush_lock:
                if self._file is None or self._stop.is_set():
                    client.stop(0.0)
                    return False
                with self._journal_lock:
                    state = self._state()
                    self._close_file()
                    try:
                        reply = client.request(("adopt", state))
                        if reply != ("adopted",):
                            raise DrainGone(f"unexpected reply {reply!r}")
                    except DrainGone as exc:
                        client.stop(1.0)
                        self._drain_mode = "off"
                        return self._take_back(str(exc))
                    self._journal_buf, self._journal_unlogged = [], 0
                    self._drain = client
                    for name, ring in self.crash.rings.items():
                        ring.on_due = self._drain_wake
                        ring.on_abandon = self._drain_abandon(name)
        finally:
            self._spawning = None
        log.info("prov4ml_dist: %s is written by a drain process (pid %d) from now on", self.path,
                 client.process.pid)
        return True

    def _take_back(self, why: str) -> bool:
        """The drain process failed to take the shard: reopen it here (says False: this thread
        goes on), or, when the process left it open for writing, keep rows and records in the
        crash ring and WAL (says True: nothing is left for this thread to do)."""
        try:
            self._file = h5py.File(self.path, "r+", libver="latest", locking="best-effort")
            self._file.swmr_mode = True
            self._fd = self._file.id.get_vfd_handle()
            self._datasets = _open_datasets(self._file)
        except Exception as exc:  # noqa: BLE001 - the crash ring and WAL keep everything
            self._file = None
            self._drain_lost(DrainGone(f"{why}; reopening the shard failed: {exc}"))
            return True
        log.warning("prov4ml_dist: the drain process did not take %s (%s); this process goes on writing it",
                    self.path, why)
        return False

    def _drain_lost(self, exc: Exception) -> None:
        """The drain process is gone while this process lives: the shard keeps what it flushed;
        records stay in the WAL and rows in the crash ring, for the reader to recover (a full
        ring lets its oldest rows go: ``Ring.let_go``)."""
        with self._journal_lock:
            if self._drain_lost_why is not None:
                return
            self._drain_lost_why = str(exc)
            client, self._drain = self._drain, None
        for ring in self.crash.rings.values():
            ring.on_due, ring.on_abandon = None, None
        log.warning("prov4ml_dist: the drain process writing %s is gone (%s); the shard keeps what it flushed, "
                    "and from now on records are kept in its WAL and the newest rows in its crash ring, which "
                    "`prov4ml-dist merge` recovers", self.path, exc)
        if client is not None:
            client.stop(0.0)

    def _state(self) -> dict[str, Any]:
        """What a drain process needs to go on writing this shard (``adopt``)."""
        return {"path": str(self.path), "flush_interval": self.flush_interval, "max_rows": self._max_rows,
                "failures": self.failures, "failure_count": self.failure_count, "lost_rows": self.lost_rows,
                "lost_journal_bytes": self.lost_journal_bytes, "failing": self._failing, "flushed": self._flushed,
                "journal_drained": self._journal_drained, "journal_lines": self._journal_lines,
                "journal": self._journal_buf, "unlogged": self._journal_unlogged,
                "tables": {name: {"rows_written": t.rows_written, "series_rows": t.series_rows, "dropped": t.dropped,
                                  "drained": t.ring.drained, "issued": t.ring.issued(),
                                  "abandoned": sorted(t.ring.abandoned), "unstorable": t.ring.unstorable,
                                  "given_up": t.ring.given_up}
                           for name, t in self.tables.items()}}

    def _restore(self, state: dict[str, Any]) -> None:
        """Take up a training process's ``_state`` (a drain process)."""
        self.failures, self.failure_count = state["failures"], state["failure_count"]
        self.lost_rows, self.lost_journal_bytes = state["lost_rows"], state["lost_journal_bytes"]
        self._failing, self._flushed = state["failing"], state["flushed"]
        self._journal_drained, self._journal_lines = state["journal_drained"], state["journal_lines"]
        self._journal_buf, self._journal_unlogged = list(state["journal"]), state["unlogged"]
        self._wal_noted = True  # this process never writes the WAL: nothing to note
        for name, saved in state["tables"].items():
            table = self.tables[name]
            table.rows_written, table.series_rows, table.dropped = (
                saved["rows_written"], saved["series_rows"], saved["dropped"])
            ring = table.ring
            ring.drained, ring.reported = saved["drained"], saved["issued"]
            ring.abandoned, ring.unstorable, ring.given_up = (
                set(saved["abandoned"]), saved["unstorable"], saved["given_up"])
            ring.set_wake_rows(self._max_rows)

    def take_record(self, line: bytes, logged: bool) -> None:
        """A journal line from the training process (a drain process); ``logged``: in its WAL."""
        with self._journal_lock:
            self._journal_buf.append(line)
            self._journal_unlogged += not logged

    def wake(self) -> None:
        self._wake.set()

    def summary(self) -> dict[str, Any]:
        """What the training process mirrors after a flush or the close (a drain process)."""
        return {"failures": self.failures, "failure_count": self.failure_count,
                "rows_written": {name: t.rows_written for name, t in self.tables.items()}}

    def _mirror(self, summary: dict[str, Any]) -> None:
        self.failures, self.failure_count = summary["failures"], summary["failure_count"]
        for name, rows in summary["rows_written"].items():
            self.tables[name].rows_written = rows

    def _close_file(self) -> None:
        self._datasets = {}
        self._file.close()
        self._file = None

    def _run(self) -> None:
        """Flush every ``flush_interval``, as soon as a ring holds ``max_buffer_rows`` (and
        again at once while it still does), and at once when a logging call found a ring full
        (it waits for this flush). Flushes start ``flush_interval`` apart (not
        after the previous one ended), so a point waits at most ``flush_interval`` plus one
        flush's time for the file. Hands the shard to a drain process when rows keep waking
        this thread (``drain.py``), and ends."""
        due = time.monotonic() + self.flush_interval
        woken = False
        rows_woke = 0  # wakes in a row by rows waiting (not by the flush interval)
        while not self._stop.is_set():
            now = time.monotonic()
            self._wake.clear()  # before the checks: a wake from here on ends the wait below
            if self._spawning is not None and self._drain_ready() and self._hand_over():
                return
            if self._spawning is None:
                by_rows = woken or any(t.pending(self._max_rows) for t in self.tables.values())
                rows_woke = rows_woke + 1 if by_rows else 0
                self._maybe_spawn(rows_woke)
            if self._spawning is not None:  # a drain process starting: let the rings fill, it takes them
                by_rows = any(t.pending(t.ring.capacity * 7 // 8) for t in self.tables.values())
            if by_rows or now >= due:
                due = now + self.flush_interval
                self.flush()
                woken = False
            else:  # no polling: a ring wakes this thread when max_buffer_rows wait (Ring.at_limit)
                wait = due - now if self._spawning is None else min(due - now, drain.STARTING_POLL_S)
                woken = self._wake.wait(max(0.0, wait))

    def flush(self) -> None:
        """Write everything buffered. A failure (disk full, ...) is recorded, not raised."""
        if self._owner_pid != os.getpid():  # before any lock: a parent's thread may have held it at fork
            self._drop_in_child()
            return
        with self._flush_lock:
            if self._drain is not None:
                try:
                    self._mirror(self._drain.request(("flush", self._issued())))
                except DrainGone as exc:
                    self._drain_lost(exc)
            elif self._file is not None:
                self._flush_here()
        if self._deferred:  # a signal that arrived during the flush acts now
            self._run_deferred()

    def _flush_here(self) -> None:
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

    def _flush_locked(self, due: dict[str, int]) -> bool:
        """One piece: the journal, then up to ``FLUSH_PIECE_ROWS`` committed rows of each table;
        says whether more is due: rows before a table's ``due`` slot left for the next piece,
        or an unwritten slot skipped (the rows behind it)."""
        # Journal first: series records must land before the rows that use their ids.
        with self._journal_lock:
            lines, self._journal_buf = self._journal_buf, []
            unlogged, self._journal_unlogged = self._journal_unlogged, 0
            self._inflight = (lines, unlogged, {})
        rows = {name: table.take(FLUSH_PIECE_ROWS) for name, table in self.tables.items()}
        self._inflight = (lines, unlogged, rows)
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
        self._journal_drained += len(lines) - unlogged
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
        lines, unlogged, rows = self._inflight
        self._inflight = None
        for name, length in self._flushed.items():
            with contextlib.suppress(Exception):  # the next flush writes from _flushed anyway
                dataset = self._datasets[name]
                if dataset.shape[0] != length:
                    dataset.set_extent((length,))
        with self._journal_lock:
            if keep_rows or sum(map(len, lines)) <= MAX_REQUEUE_BYTES:
                self._journal_buf[:0] = lines
                self._journal_unlogged += unlogged
            else:
                self.lost_journal_bytes += sum(map(len, lines))
                self._journal_drained += len(lines) - unlogged
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

    def close(self, status: str = "ok", ring_waits: dict[str, int] | None = None, ended: float | None = None) -> None:
        """Flush, write the ``end`` record and close. Idempotent; nothing in a forked child.
        With a drain process, the process does it (``ring_waits`` and ``ended``: the training
        process's counts and clock, for the end record) and this process waits for it.

        Every wait is bounded by ``CLOSE_WAIT_S``: the flusher is not awaited from inside a
        flush of this thread (it may be waiting on that flush's lock), and a flush stuck in
        I/O leaves the shard as its last flush made it, without an end record.
        """
        if self._closed or self._owner_pid != os.getpid():
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
            if self._closed:  # closed while this thread waited
                return
            if self._spawning is not None:  # a drain process still starting: not needed any more
                self._spawning[0].stop(0.0)
                self._spawning = None
            if self._drain is not None or self._drain_lost_why is not None:
                self._close_drained(status)
            elif self._file is not None:
                self._close_here(status, ring_waits or {n: t.ring.waits for n, t in self.tables.items()},
                                 time.time() if ended is None else ended)
            self._closed = True
        finally:
            self._flush_lock.release()
        if self._deferred:  # a signal that arrived during this close acts now
            self._run_deferred()

    def _close_here(self, status: str, ring_waits: dict[str, int], ended: float) -> None:
        self.flush()  # rows first, so the end record can count them
        self.record({"kind": "end", "time": ended, "status": status,
                     "rows": {n: t.rows_written for n, t in self.tables.items()},
                     "series_rows": {n: t.series_rows.tolist() for n, t in self.tables.items()},
                     "failures": self.failures, "failure_count": self.failure_count,
                     "lost_rows": {n: self.lost_rows[n] + t.dropped for n, t in self.tables.items()},
                     "lost_journal_bytes": self.lost_journal_bytes, "ring_waits": ring_waits,
                     "written_by": self._written_by})
        self.flush()
        try:
            self._close_file()
            complete = not any(t.pending() for t in self.tables.values())
        except Exception as exc:  # noqa: BLE001
            log.warning("closing %s failed: %s", self.path, exc)
            self._file = None
            complete = False
        self.crash.close(remove=complete)  # kept for the reader when the shard lacks something

    def _close_drained(self, status: str) -> None:
        """Have the drain process close the shard (it removes the ring and WAL when the shard
        holds everything); when it is gone, keep them for the reader."""
        if self._drain is not None:
            try:
                self._mirror(self._drain.request(
                    ("close", self._issued(), status, {n: t.ring.waits for n, t in self.tables.items()},
                     time.time()),
                    timeout=CLOSE_WAIT_S))
            except DrainGone as exc:
                self._drain_lost(exc)
            else:
                self._drain.stop(drain.EXIT_WAIT_S)
                self._drain = None
        if self._drain_lost_why is not None:
            lost = {n: t.ring.given_up for n, t in self.tables.items()}
            log.warning("prov4ml_dist: %s has no end record: its drain process was gone (%s); the offline merge "
                        "recovers its crash ring and WAL (rows let go from the full ring: %s)",
                        self.path, self._drain_lost_why, lost)
        self.crash.close(remove=False)


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
        if not writer._closed and writer.inherited():
            writer._disown()
            writer.crash.forget_in_child()


os.register_at_fork(after_in_child=_disown_inherited_writers)
