"""SIGKILL at random moments: the shard opens and holds every point older than flush_interval."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prov4ml_dist.shard import ShardReader, ShardWriter

from .conftest import child_env

SCRIPT = Path(__file__).parent / "scripts" / "log_until_killed.py"
FLUSH_INTERVAL = 0.2
# A flush can start late on a loaded 2-core machine; this is the slack on top of flush_interval.
SCHEDULING_SLACK_S = 1.0
TRIALS = 20


def _kill_after(tmp_path: Path, run_id: str, delay: float) -> tuple[Path, float]:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), run_id, str(FLUSH_INTERVAL)],
                            stdout=subprocess.PIPE, env=child_env(), text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    return tmp_path / "crash" / run_id / "shards" / "rank-00000.h5", killed_at


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_older_than_flush_interval(tmp_path):
    rng = random.Random(1234)
    for trial in range(TRIALS):
        shard, killed_at = _kill_after(tmp_path, f"kill-{trial}", rng.uniform(0.0, 1.0))
        with ShardReader(shard) as r:
            assert r.recovered and r.end_record() is None
            assert r.start_record()["run_id"] == f"kill-{trial}"
            rows = r.read_table("metrics")
            params = list(r.records("param"))
        # Everything flushed is intact: contiguous steps from 0, values as logged.
        np.testing.assert_array_equal(rows["step"], np.arange(len(rows)))
        np.testing.assert_array_equal(rows["value"], rows["step"].astype(float))
        if killed_at - r.attrs["created"] > FLUSH_INTERVAL + SCHEDULING_SLACK_S:
            assert len(rows) > 0 and params, f"trial {trial}: nothing flushed"
            assert rows["time"][-1] >= killed_at - FLUSH_INTERVAL - SCHEDULING_SLACK_S, (
                f"trial {trial}: newest flushed point is {killed_at - rows['time'][-1]:.2f} s old")


def test_truncated_copy_of_a_crashed_shard_keeps_its_intact_prefix(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", {"run_id": "r", "rank": 0, "attempt": 0})
    sid = w.metrics.register("x", "c", "")
    for i in range(100_000):
        w.metrics.append(sid, i, 1.0, 0.0)
    w.flush()  # never closed: the file stays flagged as open for SWMR writing
    data = (tmp_path / "s.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 2])
    with ShardReader(tmp_path / "t.h5") as r:
        assert r.recovered
        rows = r.read_table("metrics")
    assert 0 < len(rows) < 100_000
    np.testing.assert_array_equal(rows["step"], np.arange(len(rows)))
    assert (rows["value"] == 1.0).all()
    w.close()
