"""No stall (issue 14): a logging call that finds the crash ring full waits for one flush, not
for the flusher's next poll; the rows of a burst larger than the ring and than a flush piece
(``writer.FLUSH_PIECE_ROWS``) all reach the shard, in order, once. Speed itself is measured in
benchmarks/bench_log_metric.py."""

from __future__ import annotations

import threading
import time

import h5py
import numpy as np
import pytest

from prov4ml_dist.shard import ShardReader, ShardWriter, drain, ring, writer

ATTRS = {"run_id": "r", "rank": 0, "attempt": 0}


@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_full_ring_wakes_the_flusher_at_once(tmp_path, monkeypatch, mode):
    """The flush interval is a minute here and no buffer threshold is ever reached: only a
    logging call that found the ring full can start a flush. A burst of twice the ring's
    capacity finishes within seconds, and every row lands once, in order. The flusher thread
    (``off``: the whole ring, more than a flush piece) and a drain process that has the shard
    (``on``: a small ring, so that the logger always outruns the process and finds it full)."""
    monkeypatch.setenv(drain.ENV, mode)
    if mode == "on":
        monkeypatch.setitem(ring.CAPACITY, "metrics", 1024)
    capacity = ring.CAPACITY["metrics"]
    path = tmp_path / "s.h5"
    w = ShardWriter(path, ATTRS, flush_interval=60, max_buffer_rows=4 * capacity)
    assert w.await_drain() == (mode == "on")
    rows = 2 * capacity + 100
    stuck, steps, end = _burst_then_close(w, rows)
    assert not stuck, "a logging call waited for the flusher's next poll"
    assert steps.tolist() == list(range(rows))
    assert end["ring_waits"]["metrics"] >= 1 and end["lost_rows"]["metrics"] == 0


@pytest.mark.parametrize("mode", ["off", "on"])
def test_max_buffer_rows_waiting_wake_the_flusher_which_never_polls(tmp_path, monkeypatch, mode):
    """The flusher sleeps until its flush interval (a minute here), without polling the rings
    (each poll took the GIL from the logging threads); the logging call that makes
    ``max_buffer_rows`` rows wait wakes it, and the rows are in the file within seconds. One
    row fewer, nothing wakes it. The same for a drain process (``on``), woken over its socket."""
    monkeypatch.setenv(drain.ENV, mode)
    path = tmp_path / "s.h5"
    w = ShardWriter(path, ATTRS, flush_interval=60, max_buffer_rows=1000)
    sid = w.metrics.register("loss", "TRAINING", "")
    assert w.await_drain() == (mode == "on")
    try:
        for step in range(999):
            w.metrics.append(sid, step, float(step), 1.0)
        time.sleep(0.5)
        assert _rows_in_file(path) == 0
        w.metrics.append(sid, 999, 999.0, 1.0)
        deadline = time.monotonic() + 10
        while _rows_in_file(path) < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        with ShardReader(path) as reader:  # a reader of the live shard sees them in HDF5
            assert reader.read_table("metrics")["step"].tolist() == list(range(1000))
    finally:
        w.close()


def _rows_in_file(path) -> int:
    """Rows in HDF5 (the reader would add the crash ring's)."""
    with h5py.File(path, "r", swmr=True) as f:
        return f["metrics"].shape[0]


def test_a_full_ring_never_waits_forever_for_a_flusher_that_is_gone(tmp_path, monkeypatch):
    """The flusher thread died (here: at once): a logging call that finds the ring full flushes
    in its own thread instead of waiting for it forever, and no row is lost."""
    monkeypatch.setitem(ring.CAPACITY, "metrics", 64)

    def dies(self: writer.ShardWriter) -> None:
        raise RuntimeError("the flusher thread died")

    monkeypatch.setattr(writer.ShardWriter, "_run", dies)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # its traceback is expected
    path = tmp_path / "s.h5"
    w = ShardWriter(path, ATTRS, flush_interval=60)
    rows = 10 * 64
    stuck, steps, _ = _burst_then_close(w, rows)
    assert not stuck, "a logging call waited forever for a dead flusher"
    assert steps.tolist() == list(range(rows))


def _burst_then_close(w: ShardWriter, rows: int) -> tuple[bool, np.ndarray, dict]:
    """Log steps 0..rows-1 of one series from a thread, give it 30 s, close the shard; whether
    the thread was still stuck, the steps the shard holds and its end record."""
    sid = w.metrics.register("x", "c", "")

    def burst() -> None:
        for step in range(rows):
            w.metrics.append(sid, step, float(step), 1.0)

    logger = threading.Thread(target=burst, daemon=True)
    logger.start()
    logger.join(30)
    stuck = logger.is_alive()
    w.close()
    with ShardReader(w.path) as reader:
        return stuck, reader.read_table("metrics")["step"], reader.end_record()
