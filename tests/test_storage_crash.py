"""Zero loss on process death (issue 14): once a logging or record call returned, its point or
record survives SIGKILL and ``os._exit`` through the crash ring and WAL (``shard/ring.py``),
and the offline merge recovers it and says how many it recovered; a torn row is never read."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from prov4ml_dist.shard import ShardReader, ShardWriter, ring, schema

from .conftest import BIN, child_env
from .faultkit import SCRIPTS, merged_points, read_shard, signal_trials

BURST = SCRIPTS / "burst_then_die.py"
ATTRS = {"run_id": "r", "rank": 0, "attempt": 0}


def _burst(tmp_path: Path, points: int, threads: int, how: str) -> Path:
    """Run the burst child, check how it died, merge its run offline with the CLI."""
    save, run_id = tmp_path / "prov", f"{how}-{threads}"
    proc = subprocess.run([sys.executable, str(BURST), str(save), run_id, str(points), str(threads), how],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == (-9 if how == "SIGKILL" else 0), proc.stderr[-3000:]
    run_dir = save / "burst" / run_id
    merge = subprocess.run([str(BIN / "prov4ml-dist"), "merge", str(run_dir)], capture_output=True, text=True,
                           timeout=300, env=child_env())
    assert merge.returncode == 0, merge.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize(("threads", "how"), [(1, "SIGKILL"), (1, "exit"), (8, "SIGKILL")])
def test_a_burst_then_sudden_death_keeps_every_point_in_order_once(tmp_path, threads, how):
    """The flush interval is an hour: the points after the last full buffer, the last param and
    artifact are only in the ring and WAL. Every point is merged (the shared step=None series
    too), and the merge says how many came from the ring."""
    points = 40_000
    run_dir = _burst(tmp_path, points, threads, how)
    merged = merged_points(run_dir / "merged.h5")
    per_thread = points // threads
    for t in range(threads):
        assert merged[(f"t{t}", "TRAINING", 0)] == [(s, float(s)) for s in range(per_thread)]
    shared = merged[("shared", "TRAINING", 0)]
    assert [step for step, _ in shared] == list(range(points))  # each step once, in logging order
    assert sorted(value for _, value in shared) == sorted(float(t) for t in range(threads) for _ in range(per_thread))
    with h5py.File(run_dir / "merged.h5", "r") as f:
        problems = json.loads(f.attrs["problems"])
        params = [p["key"].decode() for p in f["params"][()]]
        artifacts = len(f["artifacts/generations"])
    recovered = [re.search(r"(\d+) points and (\d+) journal records recovered from its crash ring", p)
                 for p in problems]
    counts = [(int(m[1]), int(m[2])) for m in recovered if m]
    assert len(counts) == 1 and counts[0][0] > 0 and counts[0][1] >= 2, problems  # the param, the artifact
    assert params == ["last"] and artifacts == 1


def test_sigkill_at_50_random_moments_keeps_every_point_a_call_returned(tmp_path):
    """50 ranks SIGKILLed while logging (flusher every 0.05 s, no flush of their own): each
    shard holds every point whose ``log_metric`` had returned when the signal was sent, steps
    0, 1, 2, ... in order, none twice, values as logged."""
    outcomes, _ = signal_trials(tmp_path, 50, seed=14, signal_name="SIGKILL", flush_every=0)
    assert len(outcomes) == 50 and {o["code"] for o in outcomes} == {-9}
    assert [o["trial"] for o in outcomes if o["hung"]] == []
    from_ring = 0
    for outcome in outcomes:
        shard = read_shard(Path(outcome["shard"]))
        assert shard.recovered and shard.end is None
        np.testing.assert_array_equal(shard.rows["step"], np.arange(len(shard.rows)))
        np.testing.assert_array_equal(shard.rows["value"], shard.rows["step"].astype(float))
        assert len(shard.rows) >= outcome["logged_before"], outcome
        with ShardReader(Path(outcome["shard"])) as reader:
            from_ring += reader.ring_rows["metrics"]
    assert from_ring > 0  # the ring, not luck with the flusher's timing, kept the newest points


def _die_after(tmp_path: Path, write) -> Path:  # noqa: ANN001 - a callable taking the writer
    """A forked writer that does ``write(writer)`` and dies with ``os._exit``: its files are
    what the page cache holds after a crash."""
    path = tmp_path / "s.h5"
    pid = os.fork()
    if pid == 0:
        try:
            writer = ShardWriter(path, ATTRS, flush_interval=3600)
            write(writer)
        finally:
            os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    return path


def _torn_row(writer: ShardWriter, sid: int, step: int) -> None:
    """What a process killed inside ``Ring.write``'s ``pack_into`` leaves: the row's data in its
    slot, without the commit mark (its last field)."""
    r = writer.metrics.ring
    slot = next(r.next_slot)
    struct.pack_into("<iqdd", r.mm, r.base + (slot & r.mask) * ring.ROW_BYTES, sid, step, 666.0, 1.0)


def test_a_torn_last_row_is_ignored_not_misread(tmp_path):
    """A first-lap slot torn after 5 rows: the reader gives the 5 rows, not a sixth."""
    def write(writer: ShardWriter) -> None:
        sid = writer.metrics.register("x", "c", "")
        for step in range(5):
            writer.metrics.append(sid, step, float(step), 1.0)
        _torn_row(writer, sid, 5)

    with ShardReader(_die_after(tmp_path, write)) as reader:
        rows = reader.read_table("metrics")
        assert reader.ring_rows == {"metrics": 5, "system": 0}
    assert rows["step"].tolist() == list(range(5)) and rows["value"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_torn_row_over_a_flushed_one_is_not_read_as_the_old_slot(tmp_path, monkeypatch):
    """A ring of 16 rows on its third lap: the torn row lands on a slot whose old commit mark
    is still there (an already flushed row). It is neither read as that row again nor as
    itself; the rows written after the last flush are recovered once each."""
    monkeypatch.setitem(ring.CAPACITY, "metrics", 16)

    def write(writer: ShardWriter) -> None:
        sid = writer.metrics.register("x", "c", "")
        for step in range(40):
            writer.metrics.append(sid, step, float(step), 1.0)
            if step in (15, 31):
                writer.flush()  # a full ring waits for the flusher: drain it by hand
        _torn_row(writer, sid, 40)

    with ShardReader(_die_after(tmp_path, write)) as reader:
        rows = reader.read_table("metrics")
        assert reader.ring_rows["metrics"] == 8
    assert rows["step"].tolist() == list(range(40)) and rows["value"].tolist() == [float(s) for s in range(40)]


def test_a_clean_close_leaves_no_ring_and_a_forked_child_never_writes_it(tmp_path):
    """The ring and WAL exist only while the shard lacks something; a child's writes after a
    fork go to private memory, so the parent's recovered rows are its own."""
    path = tmp_path / "s.h5"
    writer = ShardWriter(path, ATTRS, flush_interval=3600)
    sid = writer.metrics.register("x", "c", "")
    writer.metrics.append(sid, 0, 0.0, 1.0)
    pid = os.fork()
    if pid == 0:
        try:
            for step in range(100):
                writer.metrics.append(sid, 1000 + step, -1.0, 1.0)
            writer.record({"kind": "param", "time": 1.0, "key": "child", "value": 1})
        finally:
            os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    with ShardReader(path) as reader:
        assert reader.read_table("metrics")["step"].tolist() == [0]
        assert not list(reader.records("param"))
    writer.close()
    assert not ring.ring_path(path).exists() and not ring.wal_path(path).exists()
    with ShardReader(path) as reader:
        assert reader.read_table("metrics")["step"].tolist() == [0]


def test_the_flusher_takes_the_committed_rows_up_to_a_torn_slot_and_no_further(tmp_path, monkeypatch):
    """``Ring.pending`` checks a piece's commit marks with one sum (a slot's mark is never ahead
    of the one it expects); a torn slot on the ring's second lap, with committed rows after it,
    keeps its old mark, so the flusher takes the rows before it, and the rest once it is
    written. The rows reach HDF5 as logged, field for field (one byte copy per piece)."""
    monkeypatch.setitem(ring.CAPACITY, "metrics", 16)
    writer = ShardWriter(tmp_path / "s.h5", ATTRS, flush_interval=3600)
    table, r = writer.metrics, writer.metrics.ring
    sid = table.register("x", "c", "")
    for step in range(12):
        table.append(sid, step, float(step), 1.0)
    writer.flush()  # the next slots land on rows of the first lap
    for step in range(12, 15):
        table.append(sid, step, step * 0.5, 2.0)
    torn = next(r.next_slot)  # taken, not yet written: its row still holds slot torn - 16's mark
    for step in range(16, 20):
        table.append(sid, step, -float(step), 3.0)
    assert table.take(100)["step"].tolist() == [12, 13, 14]  # taken, not released: still due
    ring.PACK(r.mm, r.base + (torn & r.mask) * ring.ROW_BYTES, sid, 15, np.inf, 2.5, torn + 1)
    assert table.take(100)["step"].tolist() == [12, 13, 14, 15]  # up to the ring's end; the rest after the wrap
    writer.close()
    with ShardReader(tmp_path / "s.h5") as reader:
        rows = reader.read_table("metrics")
        assert reader.ring_rows["metrics"] == 0
    assert rows.dtype == schema.ROW_DTYPE and rows["step"].tolist() == list(range(20))
    assert rows["value"][12:].tolist() == [6.0, 6.5, 7.0, np.inf, -16.0, -17.0, -18.0, -19.0]
    assert rows["time"][12:].tolist() == [2.0] * 3 + [2.5] + [3.0] * 4 and set(rows["series"].tolist()) == {sid}
