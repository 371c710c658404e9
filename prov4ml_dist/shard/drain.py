"""A drain process: a rank's shard is written by a process of the rank's own.

The flusher thread shares the GIL with the training loop. Each time it lets the GIL go (inside
``H5Dwrite``, the file's flush, numpy) and takes it back, a logging thread that runs Python
without pause waits for it, and on a busy or virtual machine that hand-over alone can take
milliseconds (README "Zero loss"). So the shard writer moves its HDF5 writing into a process of
its own: it starts one (``BOOT``, ``main``) and goes on flushing until the process is ready,
then closes the shard and hands the process its state (``ShardWriter._hand_over``): the journal
lines not flushed yet travel with it, the rows stay in the crash rings. The process reopens the
shard and drains the same rings (shared file mappings) with the same ``ShardWriter`` code; the
training process keeps the hot path (a row into the ring; the drain point read from the ring's
header when it must wake the process or wait for it) and sends the process its journal records
(after writing them to the WAL, as before), wakes, flush and close requests over a socket.

``PROV4ML_DRAIN_PROCESS``: ``on`` (the default: started first thing by ``start_run``, which
returns once the process has the shard, ``ShardWriter.await_drain``), ``auto`` (started
once ``max_buffer_rows`` rows wait before the flush interval: a rank logging tens of thousands
of points a second), ``off`` (the flusher thread only, no extra process).

Nothing changes for crashes: the process ignores the signals a launcher sends to stop a job
(the training process handles them and closes the shard through it), and when the training
process dies without closing (SIGKILL, ``os._exit``), its end of the socket closes and the
process exits at once, leaving the shard as that death leaves it without a drain process: rows
and records not in HDF5 yet are in the crash ring and WAL, and the reader recovers them.

If the process dies while the training process lives, the shard keeps what it flushed; the
training process warns once, keeps its records in the WAL, and when its ring is full lets the
oldest rows go (counted, the newest ring's worth kept for recovery) rather than wait forever.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

MODES = ("auto", "off", "on")
ENV = "PROV4ML_DRAIN_PROCESS"
PROMOTE_AFTER = 1  # "auto": wakes of the flusher in a row by rows waiting, not by the flush interval
READY_TIMEOUT_S = 60.0  # a process not ready by then is given up (the flusher goes on in-process)
START_WAIT_S = 10.0  # start_run waits this long for the hand-over, then the flusher writes until it
STARTING_POLL_S = 0.01  # how often the flusher looks whether a process being started is ready
REPLY_TIMEOUT_S = 5.0  # for a flush or the hand-over; a close waits writer.CLOSE_WAIT_S
EXIT_WAIT_S = 2.0  # for the process to exit once it closed the shard, before it is killed
# The process imports the shard package without the public API's modules
# (``prov4ml_dist/__init__``): an empty package module stands for it.
BOOT = """import importlib.util, sys, types
spec = importlib.util.find_spec("prov4ml_dist")
package = sys.modules["prov4ml_dist"] = types.ModuleType("prov4ml_dist")
package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
from prov4ml_dist.shard.drain import main
main()
"""
# The process does no arithmetic: numpy's BLAS must not start a thread per core at import
# (63 on a 64-core node; here it halves the process's start-up CPU).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
IGNORED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def mode() -> str:
    """The drain-process setting, checked (a typo must not silently mean ``auto``)."""
    value = os.environ.get(ENV, "on").strip().lower() or "on"
    if value not in MODES:
        raise InvalidInputError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


class DrainGone(Exception):
    """The drain process exited, or did not answer in time."""


class DrainClient:
    """The training process's end: starts the process, sends it messages, waits for replies.
    Thread-safe (one request at a time); never raises but ``DrainGone``."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair()
        try:
            import prov4ml_dist

            package_root = str(Path(prov4ml_dist.__file__).resolve().parent.parent)
            env = dict(os.environ, **ONE_THREAD, PYTHONPATH=os.pathsep.join(
                p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
            self.process = subprocess.Popen(
                [sys.executable, "-c", BOOT, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(mine.detach())
        self._lock = threading.RLock()  # re-entrant only to be seen held (``sending_here``)
        self.gone: str | None = None  # why the process is gone, once it is

    def ready(self) -> bool:
        """Whether the process has started and waits for the hand-over (never blocks)."""
        try:
            if self._conn.poll(0):
                return self._conn.recv() == ("ready",)
        except (EOFError, OSError) as exc:
            self._lost(f"it exited while starting ({exc or type(exc).__name__})")
        if self.process.poll() is not None and self.gone is None:
            self._lost(f"it exited while starting (status {self.process.returncode})")
        return False

    def sending_here(self) -> bool:
        """Whether this thread is sending or waiting for a reply: a signal handler running now
        must not send (it would cut a message in two), only defer (``ShardWriter.defer``)."""
        return self._lock._is_owned()

    def send(self, message: tuple) -> None:
        with self._lock:
            self._send(message)

    def request(self, message: tuple, timeout: float = REPLY_TIMEOUT_S) -> Any:
        """Send ``message`` and wait for the process's reply."""
        with self._lock:
            self._send(message)
            try:
                if self._conn.poll(timeout):
                    return self._conn.recv()
            except (EOFError, OSError) as exc:
                self._lost(f"it exited ({exc or type(exc).__name__})")
            self._lost(f"it did not answer {message[0]!r} within {timeout:g} s")
        raise AssertionError("unreachable")

    def _send(self, message: tuple) -> None:
        if self.gone is not None:
            raise DrainGone(self.gone)
        try:
            self._conn.send(message)
        except OSError as exc:
            self._lost(f"it exited ({exc.strerror or exc})")

    def _lost(self, why: str) -> None:
        self.gone = self.gone or why
        raise DrainGone(self.gone)

    def stop(self, wait: float) -> None:
        """Close our end (the process exits on it, if it has not) and reap the process."""
        self.gone = self.gone or "stopped"
        self._conn.close()
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def forget_in_child(self) -> None:
        """In a forked child: drop the parent's socket without a word (the process must see
        the parent's death, not the child's), pointing the descriptor at /dev/null so that the
        connection object still owns it."""
        self.gone = "a forked child never talks to its parent's drain process"
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, self._conn.fileno())
        finally:
            os.close(devnull)


def serve(conn: Connection) -> None:
    """The process: wait for the hand-over, then write the shard until told to close."""
    from .writer import ShardWriter

    try:
        conn.send(("ready",))
        message = conn.recv()
    except EOFError:  # the training process is gone, or closed without us
        return
    writer = ShardWriter.adopt(message[1])
    conn.send(("adopted",))
    rings = {name: table.ring for name, table in writer.tables.items()}
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the training process died without closing: leave all as its death would
            os._exit(0)
        kind = message[0]
        if kind == "record":
            writer.take_record(message[1], message[2])
        elif kind == "abandon":
            rings[message[1]].abandoned.add(message[2])
            rings[message[1]].unstorable += message[3]
        else:
            for name, issued in message[1].items():
                rings[name].reported = max(rings[name].reported, issued)
            if kind == "wake":
                writer.wake()
            elif kind == "flush":
                writer.flush()
                conn.send(writer.summary())
            elif kind == "close":
                writer.close(message[2], ring_waits=message[3], ended=message[4])  # the rank's clock
                conn.send(writer.summary())
                return


def main() -> None:
    for name in IGNORED_SIGNALS:  # the training process decides when its shard closes
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    logging.basicConfig(format="%(message)s")
    try:
        serve(Connection(int(sys.argv[1])))
    except (BrokenPipeError, ConnectionResetError):  # the training process is gone: nothing to say
        pass
    # The shard is closed (or left as a death leaves it): skip the interpreter's teardown of
    # numpy and h5py, ~60 ms that the rank's end_run would wait for.
    sys.stderr.flush()
    os._exit(0)
