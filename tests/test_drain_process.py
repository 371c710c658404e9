"""The drain process (``shard/drain.py``): a process of the rank's own writes its shard, so that
the flusher never takes the GIL from a logging loop (issue 14's slowest call). Every point and
record lands once, in order; a rank killed after the hand-over leaves everything recoverable and
no process behind; a drain process that dies leaves the newest rows and every record; a forked
child never ends it; ``off`` and ``auto`` keep the flusher thread for a slow logger."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import prov4ml_dist as prov4ml
from prov4ml_dist.errors import InvalidInputError
from prov4ml_dist.shard import ShardReader, drain, ring

from .conftest import BIN, child_env
from .faultkit import SCRIPTS, merged_points, read_shard

CHILD = SCRIPTS / "drain_child.py"


def _child(tmp_path: Path, points: int, threads: int, mode: str) -> tuple[dict, Path, subprocess.CompletedProcess]:
    save, run_id = tmp_path / "prov", f"drain-{mode}"
    proc = subprocess.run([sys.executable, str(CHILD), str(save), run_id, str(points), str(threads), mode],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == (-9 if mode == "kill-rank" else 0), proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[0]), save / "drain" / run_id, proc


def _gone(pid: int, within: float = 10.0) -> bool:
    """Whether process ``pid`` has exited (a zombie counts: its parent died, init reaps it)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_a_rank_logging_from_threads_has_every_point_written_by_its_drain_process(tmp_path):
    """Four threads log 300,000 points after the hand-over (more than the crash ring holds,
    so the ring wraps under the drain process); the shard is complete, closed by the process
    (its end record says so), each point once and in order, the ring and WAL removed."""
    points, threads = 300_000, 4
    result, run_dir, proc = _child(tmp_path, points, threads, "end")
    assert result["drain_pid"] is not None, proc.stderr[-2000:]
    assert _gone(result["drain_pid"])
    shard = read_shard(Path(result["shard"]))
    assert not shard.recovered and shard.end["status"] == "ok" and shard.end["written_by"] == "drain process"
    assert shard.end["rows"]["metrics"] == points and shard.end["lost_rows"]["metrics"] == 0
    assert not ring.ring_path(Path(result["shard"])).exists() and not ring.wal_path(Path(result["shard"])).exists()
    merged = merged_points(run_dir / "merged.h5")
    for t in range(threads):
        assert merged[(f"t{t}", "TRAINING", 0)] == [(s, float(s)) for s in range(points // threads)]
    with ShardReader(Path(result["shard"])) as reader:
        assert [r["value"] for r in reader.records("param") if r["key"] == "logged"] == [points]


def test_a_rank_killed_after_the_hand_over_leaves_everything_recoverable_and_no_process(tmp_path):
    """SIGKILL right after the last point (the flush interval is a second: most points are only
    in the ring): the drain process exits at once, leaving the shard as the death left it, and
    the offline merge recovers every point and the last param."""
    points = 200_000
    result, run_dir, _ = _child(tmp_path, points, 1, "kill-rank")
    assert _gone(result["drain_pid"]), "the drain process outlived its rank"
    merge = subprocess.run([str(BIN / "prov4ml-dist"), "merge", str(run_dir)], capture_output=True, text=True,
                           timeout=300, env=child_env())
    assert merge.returncode == 0, merge.stderr[-3000:]
    shard = read_shard(Path(result["shard"]))
    assert shard.end is None
    assert merged_points(run_dir / "merged.h5")[("t0", "TRAINING", 0)] == [(s, float(s)) for s in range(points)]
    with ShardReader(Path(result["shard"])) as reader:
        assert [r["value"] for r in reader.records("param") if r["key"] == "logged"] == [points]


def test_a_drain_process_that_dies_leaves_the_newest_rows_and_every_record(tmp_path):
    """The drain process is SIGKILLed before the rank logs three rings' worth: the rank warns
    once, never waits forever on a full ring, lets the oldest rows go and keeps the newest ring
    of them and its records (the WAL) for the merge, which recovers them."""
    capacity = ring.CAPACITY["metrics"]
    points = 3 * capacity
    result, run_dir, proc = _child(tmp_path, points, 1, "kill-drain")
    assert proc.stderr.count("drain process writing") == 1, proc.stderr[-2000:]
    shard = read_shard(Path(result["shard"]))
    assert shard.end is None
    steps = [s for s, _ in merged_points(run_dir / "merged.h5")[("t0", "TRAINING", 0)]]
    assert steps == sorted(set(steps)) and steps[-capacity:] == list(range(points - capacity, points))
    with ShardReader(Path(result["shard"])) as reader:
        assert [r["value"] for r in reader.records("param") if r["key"] == "logged"] == [points]


def test_a_forked_child_never_ends_the_drain_process(tmp_path):
    """A child forked after the hand-over exits at once (closing its copy of the socket); the
    drain process goes on writing the parent's points."""
    points = 100_000
    result, _, _ = _child(tmp_path, points, 1, "fork")
    shard = read_shard(Path(result["shard"]))
    assert shard.end["written_by"] == "drain process" and shard.end["rows"]["metrics"] == points
    np.testing.assert_array_equal(shard.rows["step"], np.arange(points))


def test_sigterm_during_a_flush_request_closes_the_shard_through_the_drain_process(tmp_path):
    """The rank flushes after every point (each flush a round trip to the drain process), so the
    signal lands inside a request: the handler waits for it, then closes the shard through the
    process, and the rank dies of the signal (a flush that returned early once skipped that)."""
    save = tmp_path / "prov"
    proc = subprocess.Popen([sys.executable, str(CHILD), str(save), "sig", "0", "1", "flush-loop"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env())
    try:
        result = json.loads(proc.stdout.readline())
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    shard = read_shard(Path(result["shard"]))
    assert shard.end["status"] == "killed-by-SIGTERM" and shard.end["written_by"] == "drain process"
    assert shard.end["rows"]["metrics"] == len(shard.rows) > 0
    np.testing.assert_array_equal(shard.rows["step"], np.arange(len(shard.rows)))
    assert _gone(result["drain_pid"])


@pytest.mark.parametrize(("mode", "points", "written_by"), [
    ("on", 1, "drain process"),
    ("off", 300_000, "flusher thread"),
    ("auto", 2_000, "flusher thread"),
    ("auto", 300_000, "drain process"),
])
def test_modes(tmp_path, monkeypatch, mode, points, written_by):
    """``on`` (the default): ``start_run`` returns once the drain process has the shard, so even
    a rank's first point is never written in-process; ``off`` never starts a drain process;
    ``auto`` starts one only for a rank whose rows keep waking the flusher (here: 300,000 points
    in a tight loop, not 2,000). The process runs two threads (its own and the writer's flusher),
    whatever BLAS threads the rank asks for: it does no arithmetic."""
    monkeypatch.setenv(drain.ENV, mode)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    prov4ml.start_run(experiment_name="modes", provenance_save_dir=tmp_path, sample_interval=None)
    writer = prov4ml.get_active_run().writer
    assert (writer._drain is not None) == (mode == "on")
    if mode == "on":
        status = Path(f"/proc/{writer._drain.process.pid}/status").read_text()
        assert status.split("Threads:")[1].split()[0] == "2"
    for step in range(points):
        prov4ml.log_metric("x", float(step), prov4ml.Context.TRAINING, step=step)
    if mode == "auto" and written_by == "drain process":  # the hand-over comes a few tenths of a second after the wake
        assert writer.await_drain(30)
    prov4ml.end_run()
    shard = read_shard(writer.path)
    assert shard.end["written_by"] == written_by and shard.end["rows"]["metrics"] == points


def test_a_process_slower_than_start_run_takes_the_shard_later(tmp_path, monkeypatch):
    """``start_run`` waits ``drain.START_WAIT_S`` for the process (here: not at all); a rank that
    logs meanwhile has its shard written by the flusher thread until the process takes it over,
    and nothing is lost or doubled across the hand-over."""
    monkeypatch.setattr(drain, "START_WAIT_S", 0.0)
    prov4ml.start_run(experiment_name="late", provenance_save_dir=tmp_path, sample_interval=None)
    writer = prov4ml.get_active_run().writer
    assert writer._drain is None
    points = 300_000
    for step in range(points):
        prov4ml.log_metric("x", float(step), prov4ml.Context.TRAINING, step=step)
    assert writer.await_drain(30)
    prov4ml.end_run()
    shard = read_shard(writer.path)
    assert shard.end["written_by"] == "drain process" and shard.end["rows"]["metrics"] == points
    np.testing.assert_array_equal(shard.rows["step"], np.arange(points))


def test_a_misspelt_setting_is_refused_at_start_run(tmp_path, monkeypatch):
    monkeypatch.setenv(drain.ENV, "yes")
    with pytest.raises(InvalidInputError, match="PROV4ML_DRAIN_PROCESS='yes': expected one of auto, off, on"):
        prov4ml.start_run(experiment_name="modes", provenance_save_dir=tmp_path, sample_interval=None)
