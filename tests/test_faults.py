"""Fault injection on whole jobs: SIGKILL of a random rank at a random moment, SIGTERM /
SIGHUP / SIGINT, a hung rank, a full disk, a read-only run directory, a torchrun restart,
and many threads logging at once. Ranks are ``scripts/fault_worker.py`` processes (no torch:
about a second a trial); a few trials run under a real torchrun.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from datetime import timedelta
from enum import Enum
from pathlib import Path

import numpy as np
import pytest

import prov4ml_dist as prov4ml
from prov4ml_dist.errors import RunStateError
from prov4ml_dist.merge import merge_run
from prov4ml_dist.shard import ShardWriter

from .faultkit import (
    EXPERIMENT,
    LOSS_SLACK_S,
    SCHEDULING_SLACK_S,
    Shard,
    bounded_outcomes,
    genuine_runs,
    launch,
    merged_counts,
    merged_points,
    merged_ranks,
    read_shard,
    report,
    run_dirs,
    tmpfs,
    torchrun,
)

FLUSH_S = 0.1
LOG_S = 0.5
KILL_TRIALS = 12


def _assert_prefix(rows: np.ndarray) -> None:
    """What a worker logs: steps 0, 1, 2, ... with value = step, nothing missing in between."""
    np.testing.assert_array_equal(rows["step"], np.arange(len(rows)))
    np.testing.assert_array_equal(rows["value"], rows["step"].astype(float))


# -- SIGKILL ---------------------------------------------------------------------------------
def _kill_trial(tmp_path: Path, rng: random.Random, trial: int) -> float | None:
    """One job of 2-4 ranks, one of them SIGKILLed mid-run; returns the loss window (s)."""
    world, run_id, save = rng.choice((2, 3, 4)), f"kill-{trial}", tmp_path / "prov"
    victim = rng.randrange(world)
    args = [["--run-id", run_id, "--flush-interval", str(FLUSH_S), "--seconds", str(60 if r == victim else LOG_S)]
            for r in range(world)]
    with launch(tmp_path, save, world, args) as workers:
        for worker in workers:
            worker.ready()
        time.sleep(rng.uniform(0.1, LOG_S))
        killed_at = time.time()
        workers[victim].proc.send_signal(signal.SIGKILL)
        codes = [worker.finish(timeout=60) for worker in workers]
    assert codes == [-9 if r == victim else 0 for r in range(world)], (codes, workers[0].stderr()[-2000:])
    run_dir = save / EXPERIMENT / run_id
    window = None
    for worker in workers:
        shard = read_shard(run_dir / "shards" / f"rank-{worker.rank:05d}.h5")  # every shard opens
        rows = shard.rows
        _assert_prefix(rows)
        if worker.rank != victim:
            assert not shard.recovered and len(rows) == worker.result["logged"]
            continue
        assert shard.recovered and shard.end is None
        if len(rows):
            window = killed_at - float(rows["time"][-1])
            assert window <= FLUSH_S + LOSS_SLACK_S, f"trial {trial}: the newest point is {window:.2f} s old"
        else:
            assert killed_at - shard.attrs["created"] < FLUSH_S + SCHEDULING_SLACK_S, f"trial {trial}: no flush"
        victim_rows = len(rows)
    result = merge_run(run_dir)  # the offline merge recovers every flushed point of every rank
    expected = {(w.rank, 0): victim_rows if w.rank == victim else w.result["logged"] for w in workers}
    assert merged_counts(result.merged_h5) == {who: n for who, n in expected.items() if n}
    assert any(f"rank {victim} attempt 0: incomplete" in p for p in result.problems), result.problems
    return window


def test_sigkill_of_a_random_rank_at_random_moments(tmp_path):
    rng = random.Random(7)
    started = time.monotonic()
    windows = [w for trial in range(KILL_TRIALS) if (w := _kill_trial(tmp_path, rng, trial)) is not None]
    assert len(windows) >= KILL_TRIALS * 3 // 4  # most kills landed after the first flush
    report("sigkill", trials=KILL_TRIALS, flush_interval=FLUSH_S, max_loss_window_s=max(windows),
           median_loss_window_s=float(np.median(windows)), seconds=time.monotonic() - started)


@pytest.mark.slow
def test_sigkill_under_torchrun_keeps_every_shard_and_the_offline_merge_recovers_them(tmp_path):
    """torchrun sees a worker die and SIGTERMs the others: they close their shards on the way."""
    rng = random.Random(11)
    for trial in range(2):
        save = tmp_path / f"prov{trial}"
        delay = rng.uniform(0.3, 1.5)
        worker_args = ["--flush-interval", str(FLUSH_S), "--seconds", "60", "--kill-self-after", str(delay),
                       "--victim", str(rng.randrange(2))]
        proc = torchrun(save, 2, worker_args, "--max-restarts=0")
        assert proc.returncode != 0, proc.stderr[-2000:]
        (run_dir,) = run_dirs(save)
        statuses = {}
        for shard in sorted((run_dir / "shards").glob("rank-*.h5")):
            facts = read_shard(shard)
            _assert_prefix(facts.rows)
            statuses[facts.attrs["rank"]] = facts.end["status"] if facts.end else "incomplete"
        assert sorted(statuses.values()) == ["incomplete", "killed-by-SIGTERM"], statuses
        result = merge_run(run_dir)
        assert {rank for rank, _ in merged_counts(result.merged_h5)} == {0, 1}


# -- SIGTERM, SIGHUP, SIGINT -----------------------------------------------------------------
# Slow logging (5,000 points/s) and a 30 s flush interval: no flush is due before the signal,
# so points in the shard newer than the start prove that the exit path flushed them.
SLOW = ["--flush-interval", "30", "--pause", "0.01"]


def _signalled(tmp_path: Path, signum: int, *args: str) -> tuple[int, float, Shard, str]:
    """A single rank logging slowly, sent ``signum`` a second after it is ready."""
    save = tmp_path / "prov"
    with launch(tmp_path, save, 1, [["--run-id", "sig", *SLOW, *args]]) as (worker,):
        worker.ready()
        time.sleep(1.0)
        sent = time.time()
        worker.proc.send_signal(signum)
        code = worker.finish(timeout=30)
        out = worker.stdout + worker.stderr()
    return code, sent, read_shard(save / EXPERIMENT / "sig" / "shards" / "rank-00000.h5"), out


@pytest.mark.parametrize(("signum", "code", "status"), [
    (signal.SIGTERM, -signal.SIGTERM, "killed-by-SIGTERM"),  # Slurm at the time limit, torchrun, kill
    (signal.SIGHUP, -signal.SIGHUP, "killed-by-SIGHUP"),
    (signal.SIGINT, -signal.SIGINT, "exited-without-end_run"),  # KeyboardInterrupt, then atexit
])
def test_a_signal_flushes_and_closes_the_shard_and_keeps_the_exit_status(tmp_path, signum, code, status):
    returncode, sent, shard, output = _signalled(tmp_path, signum)
    assert returncode == code, output[-2000:]
    assert not shard.recovered and shard.end["status"] == status
    assert shard.end["rows"]["metrics"] == len(shard.rows) and shard.end["lost_rows"] == {"metrics": 0, "system": 0}
    _assert_prefix(shard.rows)
    assert sent - shard.rows["time"][-1] < 0.5, "the points logged before the signal were not flushed"
    if signum == signal.SIGINT:
        assert "KeyboardInterrupt" in output  # the usual exit, traceback and all


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_users_sigterm_handler_stays_in_place_and_is_called(tmp_path, when):
    """Installed before start_run we leave it alone; installed after, it replaces ours. Either
    way it runs, its exit status stands, and atexit still closes the shard."""
    returncode, sent, shard, output = _signalled(tmp_path, signal.SIGTERM, "--user-sigterm", when)
    assert returncode == 143 and "user handler called" in output, output[-2000:]
    assert shard.end["status"] == "exited-without-end_run"
    _assert_prefix(shard.rows)
    assert sent - shard.rows["time"][-1] < 0.5


class _Died(BaseException):
    """The process ends inside the signal handler (our handler re-raises the signal)."""


@pytest.mark.parametrize("interrupt", ["signal-handler", "KeyboardInterrupt"])
def test_an_interrupted_flush_loses_and_invents_nothing(tmp_path, monkeypatch, interrupt):
    """A signal can strike the main thread in the middle of its own flush (a fast logger flushes
    itself), after a table grew and before its rows were written. SIGTERM's handler then closes
    the shard from inside that flush; SIGINT raises KeyboardInterrupt out of it."""
    writer = ShardWriter(tmp_path / "s.h5", {"run_id": "r", "rank": 0, "attempt": 0}, flush_interval=3600)
    sid = writer.metrics.register("loss", "TRAINING", "")
    for step in range(1000):
        writer.metrics.append(sid, step, float(step), 1.0 + step)
    torn = ShardWriter._append

    def append_torn_by_a_signal(self: ShardWriter, name: str, values: np.ndarray) -> None:
        if name != "metrics":
            return torn(self, name, values)
        monkeypatch.setattr(ShardWriter, "_append", torn)
        self._file[name].resize((self._flushed[name] + len(values),))  # grown, rows not written yet
        if interrupt == "KeyboardInterrupt":
            raise KeyboardInterrupt
        self.close("killed-by-SIGTERM")  # what ExitHooks._on_signal does
        raise _Died

    monkeypatch.setattr(ShardWriter, "_append", append_torn_by_a_signal)
    with pytest.raises(KeyboardInterrupt if interrupt == "KeyboardInterrupt" else _Died):
        writer.flush()
    writer.close("exited-without-end_run")  # atexit, after the KeyboardInterrupt
    shard = read_shard(tmp_path / "s.h5")
    _assert_prefix(shard.rows)
    assert len(shard.rows) == 1000 and shard.end["lost_rows"]["metrics"] == 0


# -- a rank that hangs -----------------------------------------------------------------------
MERGE_TIMEOUT_S = 3.0
# On top of merge_timeout: connecting, the merge itself, and a loaded 2-core machine.
HANG_MARGIN_S = 5.0


def test_a_hung_rank_costs_the_others_at_most_merge_timeout(tmp_path):
    """Rank 2 of 3 never calls end_run. The others talk over a TCPStore like the one torchrun's
    agent hosts; they are done within merge_timeout, and rank 0 merges without rank 2's end."""
    dist = pytest.importorskip("torch.distributed")
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port)}
    args = ["--run-id", "hang", "--seconds", "0.5", "--merge-timeout", str(MERGE_TIMEOUT_S), "--import-torch",
            "--victim", "2", "--hang"]
    save = tmp_path / "prov"
    with launch(tmp_path, save, 3, [args] * 3, env=env) as workers:
        for worker in workers:
            worker.ready()
        started = time.monotonic()
        codes = [worker.finish(timeout=MERGE_TIMEOUT_S + 60) for worker in workers[:2]]
        waited = time.monotonic() - started
        assert workers[2].proc.poll() is None  # still hanging
    assert codes == [0, 0], workers[0].stderr()[-2000:]
    end_runs = [worker.result["end_run_s"] for worker in workers[:2]]
    assert max(end_runs) <= MERGE_TIMEOUT_S + HANG_MARGIN_S, end_runs
    report("hang", merge_timeout=MERGE_TIMEOUT_S, end_run_s=end_runs, job_s=waited)
    run_dir = save / EXPERIMENT / "hang"
    assert workers[0].result["prov_json"] == str(run_dir / "prov.json")
    statuses = {rank: status for rank, _, status in merged_ranks(run_dir / "merged.h5")}
    assert statuses == {0: "ok", 1: "ok", 2: "incomplete"}  # its flushed points are merged all the same


# -- a full disk, a read-only run directory ---------------------------------------------------
def _check_loss_is_accounted(shard: Shard, logged: int) -> None:
    """No silent loss: every point logged is in the shard or counted as lost in its end record,
    and no row is invented (a dropped batch leaves a gap in the steps, never zeros)."""
    lost = shard.end["lost_rows"]["metrics"]
    assert shard.end["failure_count"] >= 1 and shard.end["failures"]
    assert lost > 0 and len(shard.rows) + lost == logged
    assert shard.end["rows"]["metrics"] == len(shard.rows)
    assert (np.diff(shard.rows["step"]) > 0).all() and (shard.rows["time"] > 0).all()
    np.testing.assert_array_equal(shard.rows["value"], shard.rows["step"].astype(float))


def test_a_full_disk_mid_run_is_a_warning_training_goes_on_and_the_loss_is_recorded(tmp_path):
    """A 4 MiB tmpfs filled up mid-run, then freed: logging never raises, a warning is logged
    and journalled, and the end record counts the points that could not be written."""
    with tmpfs(tmp_path / "small", "4m") as small:
        save = small / "prov"
        args = ["--run-id", "full", "--fill-disk", "--seconds", "0.5"]
        with launch(tmp_path, save, 2, [args], ranks=[0]) as workers:  # rank 1 of 2 never comes: no merge
            codes = [worker.finish(timeout=120) for worker in workers]
        assert codes == [0], workers[0].stderr()[-3000:]
        assert "failed" in workers[0].stderr() and "works again" in workers[0].stderr()
        run_dir = save / EXPERIMENT / "full"
        shard = read_shard(run_dir / "shards" / "rank-00000.h5")
        _check_loss_is_accounted(shard, workers[0].result["logged"])
        failed, recovered = (w["message"] for w in shard.warnings)
        assert " failed: " in failed and f"works again after {shard.end['failure_count']} failed flushes" in recovered
        result = merge_run(run_dir)
    assert any("flush failures recorded" in p for p in result.problems), result.problems
    report("disk_full", method="tmpfs", lost_rows=shard.end["lost_rows"]["metrics"],
           kept_rows=len(shard.rows), failed_flushes=shard.end["failure_count"])


def test_a_file_size_limit_is_a_warning_and_training_goes_on(tmp_path):
    """RLIMIT_FSIZE (a quota-like limit without mounting anything): the shard stops growing,
    the rank keeps logging and exits normally, and the shard still opens with no invented rows."""
    save = tmp_path / "prov"
    args = ["--run-id", "fsize", "--seconds", "2", "--pause", "0", "--fsize-limit", str(1 << 20)]
    with launch(tmp_path, save, 2, [args], ranks=[0]) as workers:
        codes = [worker.finish(timeout=120) for worker in workers]
    assert codes == [0], workers[0].stderr()[-3000:]
    assert "failed" in workers[0].stderr()
    shard = read_shard(save / EXPERIMENT / "fsize" / "shards" / "rank-00000.h5")
    assert (np.diff(shard.rows["step"]) > 0).all() and (shard.rows["time"] > 0).all()
    assert len(shard.rows) < workers[0].result["logged"]
    if shard.end is not None:  # the end record fits in the journal's last chunk, or not at all
        _check_loss_is_accounted(shard, workers[0].result["logged"])


@pytest.mark.parametrize("existing", ["", "prov/e/r/shards"])
def test_a_read_only_run_directory_is_a_clear_error_at_start_run(tmp_path, existing):
    """Read-only from the save directory down, or only once the run's directories exist."""
    with tmpfs(tmp_path / "ro", "1m") as ro:
        (ro / existing).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(RunStateError, match="cannot create") as raised:
            prov4ml.start_run(experiment_name="e", provenance_save_dir=ro / "prov", run_id="r",
                              sample_interval=None)
        assert "Read-only file system" in str(raised.value)
        assert prov4ml.get_active_run() is None


@pytest.mark.parametrize("free_bytes", [0, 4096, 16384])
def test_a_full_disk_at_start_run_is_a_clear_error_and_leaves_no_shard(tmp_path, free_bytes):
    """Depending on how much is left, creating the file, starting SWMR or the first flush
    fails: each is a RunStateError, and no half-made shard blocks a retry with the run id."""
    with tmpfs(tmp_path / "small", "1m") as small:
        stat = os.statvfs(small)
        (small / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free_bytes))
        with pytest.raises(RunStateError, match="cannot (create|write) the shard"):
            prov4ml.start_run(experiment_name="e", provenance_save_dir=small / "prov", run_id="r",
                              sample_interval=None)
        assert list((small / "prov" / "e" / "r" / "shards").iterdir()) == []
        assert prov4ml.get_active_run() is None


# -- a torchrun restart ----------------------------------------------------------------------
@pytest.mark.slow
def test_an_elastic_restart_keeps_both_attempts_and_the_merge_records_it(tmp_path):
    """torchrun --max-restarts=1: rank 1 exits 1 in attempt 0, torchrun SIGTERMs rank 0 and
    starts both again; attempt 1 ends normally and rank 0 merges both attempts."""
    save = tmp_path / "prov"
    proc = torchrun(save, 2, ["--seconds", "3", "--victim", "1", "--fail-attempt", "0"], "--max-restarts=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(save)
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == [
        "rank-00000.h5", "rank-00000.restart-1.h5", "rank-00001.h5", "rank-00001.restart-1.h5"]
    assert sorted(merged_ranks(run_dir / "merged.h5")) == [
        (0, 0, "killed-by-SIGTERM"), (0, 1, "ok"), (1, 0, "exited-without-end_run"), (1, 1, "ok")]
    counts = merged_counts(run_dir / "merged.h5")
    assert sorted(counts) == [(0, 0), (0, 1), (1, 0), (1, 1)] and all(counts.values())


# -- many threads ----------------------------------------------------------------------------
class Phase(Enum):
    WARMUP = 1


def test_many_threads_logging_at_once_lose_and_duplicate_nothing(tmp_path):
    """8 threads through the public API: their own series with explicit steps, in three kinds
    of context, and one series all of them share with step=None (a count they share)."""
    run_dir = prov4ml.start_run(experiment_name="threads", provenance_save_dir=tmp_path, run_id="t",
                                sample_interval=None, flush_interval=0.02)
    contexts = (prov4ml.Context.TRAINING, "custom", Phase.WARMUP)
    n_threads, steps = 8, 3000
    barrier = threading.Barrier(n_threads)

    def work(t: int) -> None:
        barrier.wait()
        for step in range(steps):
            for k, context in enumerate(contexts):
                prov4ml.log_metric(f"k{t % 4}", t * 1e6 + k * 1e5 + step, context, step=t * steps + step)
            prov4ml.log_metrics({"shared": float(t)}, prov4ml.Context.VALIDATION)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    prov4ml.end_run()
    points = merged_points(run_dir / "merged.h5")
    for key in (f"k{i}" for i in range(4)):
        for k, context in enumerate(("TRAINING", "custom", "WARMUP")):
            expected = {(t * steps + step, t * 1e6 + k * 1e5 + step) for t in range(n_threads) if t % 4 == int(key[1])
                        for step in range(steps)}
            got = points[(key, context, 0)]
            assert len(got) == len(expected) and set(got) == expected
    shared = points[("shared", "VALIDATION", 0)]
    assert sorted(step for step, _ in shared) == list(range(n_threads * steps))  # each step once
    assert sorted(value for _, value in shared) == sorted(float(t) for t in range(n_threads) for _ in range(steps))


# -- the merge on a full disk --------------------------------------------------------------
@pytest.fixture
def genuine_run(tmp_path) -> Path:
    """A small, cleanly ended run directory (not merged)."""
    runs = genuine_runs(tmp_path / "genuine", "g", world_size=1)
    runs[0].close()
    return runs[0].run_dir


def test_the_merge_says_how_many_points_a_full_disk_cost(tmp_path):
    with tmpfs(tmp_path / "small", "4m") as small:
        args = ["--run-id", "full", "--fill-disk", "--seconds", "0.5"]
        with launch(tmp_path, small / "prov", 2, [args], ranks=[0]) as (worker,):
            assert worker.finish(timeout=120) == 0, worker.stderr()[-3000:]
        run_dir = small / "prov" / EXPERIMENT / "full"
        lost = read_shard(run_dir / "shards" / "rank-00000.h5").end["lost_rows"]["metrics"]
        problems = merge_run(run_dir).problems
    assert any(str(lost) in p and "lost" in p for p in problems), problems


def test_a_merge_on_a_full_disk_fails_cleanly(tmp_path, genuine_run):
    with tmpfs(tmp_path / "small", "2m") as small:
        run_dir = shutil.copytree(genuine_run, small / "run")
        stat = os.statvfs(small)
        (small / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 20_000))
        (outcome,) = bounded_outcomes("merge", [run_dir])  # asserts a clean exit of the child
    assert outcome["outcome"] == "refused" and outcome["type"] == "MergeError", outcome
