"""How the merge copies and compresses the rows (issue 17's per-point work): chunks of merged.h5's
rows compressed while the copy goes on, series logged round-robin copied without a sort. Both
must give exactly the rows that were logged, and the same merged.h5 as the plain way."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from concurrent.futures import Executor, Future
from pathlib import Path

import h5py
import numpy as np
import pytest

from prov4ml_dist.merge import compress, layout, merge_run, scan, series

from .test_cli_support import merged_content
from .test_merge_support import T0, log_series, open_shard


class _Inline(Executor):
    """An executor that runs each task when it is submitted: what was compressed by a given
    moment of the copy is then exact, not up to the threads' timing."""

    def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201 - Executor's signature
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def test_rows_chunks_are_compressed_while_the_copy_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After each shard is copied, exactly the chunks whose rows are all staged have been
    compressed (each once), whatever the series' lengths against the chunk size; and the rows
    read back are those logged."""
    ranks, lengths = 4, {"acc": [10, 17, 24, 31], "loss": [100, 100, 100, 100]}
    for rank in range(ranks):
        w = open_shard(tmp_path, rank, ranks)
        for key, n in lengths.items():
            log_series(w, key, [(s, rank * 1000.0 + s, T0 + s) for s in range(n[rank])])
        w.close()
    monkeypatch.setattr(layout, "ROWS_CHUNK_ROWS", 16)
    monkeypatch.setattr(compress, "threads", _Inline)
    compressed: list[int] = []
    real = compress.compressed_chunk

    def counted(source: np.ndarray, start: int, rows: int, level: int = layout.ROWS_DEFLATE_LEVEL) -> bytes:
        compressed.append(start)
        return real(source, start, rows, level)

    monkeypatch.setattr(compress, "compressed_chunk", counted)
    at_tick: dict[int, int] = {}
    merge_run(tmp_path, progress=lambda stage, done, total: at_tick.setdefault(done, len(compressed))
              if stage == "copy" else None)

    with h5py.File(tmp_path / "merged.h5") as f:
        rows, table = f["metrics/rows"][()], f["metrics/series"][()]
        assert f["metrics/rows"].chunks == (16,) and f["metrics/rows"].shuffle
    total = len(rows)
    assert sorted(compressed) == list(range(0, total, 16))  # every chunk, once
    for shard in range(ranks + 1):  # before shard n: the chunks of ranks < n's rows only
        done = np.zeros(total, dtype=bool)
        for s in table[table["rank"] < shard]:
            done[s["row_start"]:s["row_stop"]] = True
        complete = sum(done[c:c + 16].all() for c in range(0, total, 16))
        assert at_tick[shard] == complete, (shard, at_tick)
    assert 0 < at_tick[1] < at_tick[2] < at_tick[3] < total // 16  # it did overlap the copy
    for s in table:
        got = rows[s["row_start"]:s["row_stop"]]
        n = lengths[s["key"].decode()][s["rank"]]
        np.testing.assert_array_equal(got["value"], s["rank"] * 1000.0 + np.arange(n))
        assert (got["rank"] == s["rank"]).all() and (got["step"] == np.arange(n)).all()


def _round_robin_run(run_dir: Path) -> dict[tuple[int, str], list[int]]:
    """3 keys logged each step, round-robin (the usual training loop), and on rank 1 a fourth
    key every 50 steps, which breaks the pattern in some blocks. Returns each series' steps."""
    steps: dict[tuple[int, str], list[int]] = {}
    for rank in range(3):
        w = open_shard(run_dir, rank, 3)
        keys = ["loss", "acc", "lr"] + (["grad"] if rank == 1 else [])
        sids = {key: w.metrics.register(key, "TRAINING", "") for key in keys}
        for step in range(700):
            for key in keys[:3] if step % 50 else keys:
                w.metrics.append(sids[key], step, rank + step / 7 + len(key), T0 + step)
                steps.setdefault((rank, key), []).append(step)
        w.close()
    return steps


def test_series_logged_round_robin_are_copied_without_a_sort_as_with_one(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of rows that repeat one pattern of series (here starting mid-pattern: 1,000 rows
    of 3 series) take strided copies, the others a sort; both give what the sort alone gives,
    summaries included, and the rows logged."""
    logged = _round_robin_run(tmp_path / "src")
    monkeypatch.setattr(series, "COPY_BLOCK_ROWS", 1000)
    patterns: list[bool] = []
    real = series.repeating
    monkeypatch.setattr(series, "repeating", lambda slot, k: patterns.append(real(slot, k)) or patterns[-1])
    strided = Path(shutil.copytree(tmp_path / "src", tmp_path / "strided"))
    merge_run(strided)
    assert True in patterns and False in patterns  # both ways were taken
    monkeypatch.setattr(series, "repeating", lambda slot, k: False)
    sorted_ = Path(shutil.copytree(tmp_path / "src", tmp_path / "sorted"))
    merge_run(sorted_)
    assert merged_content(strided / "merged.h5") == merged_content(sorted_ / "merged.h5")
    with h5py.File(strided / "merged.h5") as f:
        rows, table = f["metrics/rows"][()], f["metrics/series"][()]
    for s in table:
        key, rank = s["key"].decode(), int(s["rank"])
        got = rows[s["row_start"]:s["row_stop"]]
        want = np.array(logged[(rank, key)])
        np.testing.assert_array_equal(got["step"], want)
        np.testing.assert_array_equal(got["value"], rank + want / 7 + len(key))
        assert (got["series"] == np.flatnonzero((table["key"] == s["key"]) & (table["rank"] == rank))[0]).all()
        assert s["count"] == len(want) and s["last"] == rank + want[-1] / 7 + len(key)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
def test_deflate_and_checksum_threads_yield_to_the_copy() -> None:
    """The threads whose work can wait (deflate, sha256) run at a lower priority than the
    thread that copies, whose end the merge waits for; the process keeps its own."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    with compress.threads() as pool:
        theirs = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    with scan.ShardHasher([]) as hasher:
        hashing = hasher._pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert theirs == hashing == min(19, before + compress.BEHIND_NICE) > before
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
