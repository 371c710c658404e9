"""The merge spread over processes (``merge_run(jobs=N)``, ``prov4ml-dist merge --jobs N``):
the same merged.h5 and prov.json as one process, whatever the shards hold."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from prov4ml_dist.errors import MergeError
from prov4ml_dist.merge import compress, layout, merge_run, scan
from prov4ml_dist.merge.crossrank import CrossRank
from prov4ml_dist.merge.parallel import PARALLEL_MIN_SHARDS, MergeWorkers, default_jobs

from .test_cli_support import cli, merged_content, prov_structure
from .test_merge_support import T0, crash, log_series, open_shard


def _crashed_rank(run_dir: Path, rank: int, world: int) -> None:
    w = open_shard(run_dir, rank, world)
    log_series(w, "loss", [(s, float(s), T0 + s) for s in range(30)])
    crash(w)


def _varied_run(run_dir: Path) -> None:
    """Every path of the merge: lockstep, windowed and streamed groups, steps that go back, NaN,
    restarts, a crashed rank (counted, no end record), params that disagree, system series."""
    world = 6
    rng = np.random.default_rng(7)
    for rank in range(world - 1):
        for attempt in ((0, 1) if rank == 2 else (0,)):
            w = open_shard(run_dir, rank, world, attempt=attempt)
            log_series(w, "loss", [(s, float(rng.normal()), T0 + s + rng.uniform()) for s in range(5000)])
            steps = np.r_[np.arange(40), np.arange(20)]  # the step went back: an epoch restarted
            log_series(w, "acc", [(int(s), float("nan") if s == 3 else s / 7, T0 + s) for s in steps],
                       context="VALIDATION")
            for k in range(30):  # many small groups: several per window, split over the workers
                log_series(w, f"k{k:02d}", [(s, float(rank * k + s), T0 + s) for s in range(rank + 3)])
            w.record({"kind": "param", "time": T0, "key": "lr", "value": 0.1 if rank != 3 else 0.2})
            sid = w.system.register("cpu_percent", "", "process", unit="%")
            for s in range(50):
                w.system.append(sid, s, 50.0 + rank, T0 + s)
            w.close()
    child = multiprocessing.get_context("fork").Process(target=_crashed_rank, args=(run_dir, world - 1, world))
    child.start()
    child.join(30)


def _merge_copy(source: Path, target: Path, jobs: int) -> Path:
    shutil.copytree(source, target)
    merge_run(target, jobs=jobs)
    return target


def test_parallel_merge_equals_the_single_process_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _varied_run(tmp_path / "src")
    one = _merge_copy(tmp_path / "src", tmp_path / "one", 1)
    for jobs in (2, 3):
        if jobs == 3:  # this process keeps no rows: its shards are spread over the workers to copy
            monkeypatch.setattr(scan, "SMALL_SHARD_BYTES", 0)
        many = _merge_copy(tmp_path / "src", tmp_path / f"jobs{jobs}", jobs)
        assert merged_content(many / "merged.h5") == merged_content(one / "merged.h5"), jobs
        assert prov_structure(many / "prov.json") == prov_structure(one / "prov.json"), jobs
        leftovers = sorted(p.name for p in many.iterdir())
        assert leftovers == ["merged.h5", "prov.json", "shards"], leftovers  # no staged rows left behind
    with h5py.File(one / "merged.h5") as f:  # the case covered what it claims
        assert len(f["metrics"]["groups"]) > 30 and len(f["metrics"]["crossrank"]) > 5000
        assert "incomplete" in {s.decode() for s in f["ranks"]["status"]}


def test_wrong_end_record_counts_are_recounted_in_parallel(tmp_path: Path) -> None:
    """A shard whose end record miscounts its series: the workers' copy notices, the parent
    recounts, and the second copy gives what one process gives."""
    for rank in range(3):
        w = open_shard(tmp_path / "src", rank, 3)
        log_series(w, "a", [(s, float(s), T0 + s) for s in range(10)])
        log_series(w, "b", [(s, float(-s), T0 + s) for s in range(4)])
        w.close()
    path = tmp_path / "src" / "shards" / "rank-00001.h5"
    with h5py.File(path, "a") as f:  # the end record says 12 + 2 rows: it adds up, and is wrong
        journal = f["journal"]
        text = journal[()].tobytes().replace(b'"metrics": [10, 4]', b'"metrics": [12, 2]')
        assert b"[12, 2]" in text
        journal[...] = np.frombuffer(text, dtype=np.uint8)
    one = _merge_copy(tmp_path / "src", tmp_path / "one", 1)
    many = _merge_copy(tmp_path / "src", tmp_path / "two", 2)
    assert merged_content(many / "merged.h5") == merged_content(one / "merged.h5")
    with h5py.File(many / "merged.h5") as f:
        assert "counted them instead" in f.attrs["problems"]


def test_cli_merge_jobs(tmp_path: Path) -> None:
    _varied_run(tmp_path / "src")
    one = _merge_copy(tmp_path / "src", tmp_path / "one", 1)
    run = Path(shutil.copytree(tmp_path / "src", tmp_path / "cli"))
    done = cli("merge", run, "--jobs", "2")
    assert done.returncode == 0 and "rank 5 attempt 0: incomplete" in done.stderr, done.stderr
    assert merged_content(run / "merged.h5") == merged_content(one / "merged.h5")
    bad = cli("merge", run, "--jobs", "0")
    assert bad.returncode == 2 and "--jobs wants a whole number" in bad.stderr, bad.stderr


def test_a_worker_that_dies_fails_the_merge_without_a_hang(tmp_path: Path) -> None:
    """A worker killed (the OOM killer, a signal): the merge fails with a MergeError at once."""
    _varied_run(tmp_path)
    with MergeWorkers(2) as workers:
        workers._procs[0].kill()  # worker 1 (worker 0 is this process)
        workers._procs[0].wait()
        with pytest.raises(MergeError, match="merge worker 1 died"):
            workers.scan(sorted((tmp_path / "shards").glob("*.h5")), [], lambda n: None)


def test_the_default_is_parallel_only_for_runs_of_many_shards(tmp_path):
    """Workers share the per-shard cost, not the per-point one: a run of a few huge shards
    merges in one process, a run of many ranks with the cores this process may use."""
    few = [tmp_path / f"rank-{r:05d}.h5" for r in range(PARALLEL_MIN_SHARDS - 1)]
    many = [*few, tmp_path / "rank-99999.h5"]
    assert default_jobs(few) == 1
    assert default_jobs(many) == len(os.sched_getaffinity(0))


def test_workers_compress_their_share_of_the_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --jobs 2 the per-point work is split, deflate included: this process compresses
    only its share of the rows' chunks, the worker the rest (into a file of its own, removed
    after); merged.h5 is what one process writes, and plain h5py reads it."""
    _varied_run(tmp_path / "src")
    monkeypatch.setattr(layout, "ROWS_CHUNK_ROWS", 1000)
    one = _merge_copy(tmp_path / "src", tmp_path / "one", 1)
    here: list[int] = []
    real = compress.compressed_chunk
    monkeypatch.setattr(compress, "compressed_chunk", lambda source, start, rows, *rest: here.append(start)
                        or real(source, start, rows, *rest))
    two = _merge_copy(tmp_path / "src", tmp_path / "two", 2)
    with h5py.File(two / "merged.h5") as f:
        chunks = -(-len(f["metrics/rows"]) // 1000)
        assert f["metrics/rows"].chunks == (1000,) and chunks >= 20
    assert 0 < len(here) < chunks  # its share; the worker did the rest
    assert merged_content(two / "merged.h5") == merged_content(one / "merged.h5")
    assert sorted(p.name for p in two.iterdir()) == ["merged.h5", "prov.json", "shards"]


def test_cross_rank_statistics_split_over_threads_equal_one_thread(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One process computes the cross-rank statistics in a thread per core, the groups split
    into ranges as between processes: the tables are those of one thread, every path of the
    cross-rank pass included."""
    _varied_run(tmp_path / "src")
    monkeypatch.setattr(compress, "cores", lambda: 1)
    one = _merge_copy(tmp_path / "src", tmp_path / "one", 1)
    monkeypatch.setattr(compress, "cores", lambda: 3)
    split = CrossRank.in_range
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(CrossRank, "in_range", classmethod(lambda cls, index, rows, a, b: seen.append((a, b))
                                                            or split(index, rows, a, b)))
    three = _merge_copy(tmp_path / "src", tmp_path / "three", 1)
    assert len([r for r in seen if r[1] > r[0]]) >= 3  # metrics in 2 ranges or more (by rows), system in 1
    assert merged_content(three / "merged.h5") == merged_content(one / "merged.h5")
