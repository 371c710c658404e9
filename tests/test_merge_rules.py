"""The merge's documented rules (README, "What the merge computes"), each pinned on real shards
merged by ``merge_run``: overflow-safe means on every path, the limit of the streaming path,
and the tie and ordering rules of series summaries, params and the straggler report."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_merge_support import T0, open_shard  # noqa: E402

from prov4ml_dist.merge import crossrank, layout, load_merged, merge_run  # noqa: E402

BIG, TOP, INF, NAN = 1.7e308, np.finfo(np.float64).max, math.inf, math.nan

# Per step, the values of ranks 0, 1, 2 and the cross-rank mean the README promises.
MEAN_CASES = [
    ((BIG, BIG, BIG), BIG),
    ((BIG, BIG, -INF), -INF),
    ((INF, -INF, 1.0), NAN),
    ((NAN, BIG, BIG), BIG),  # NaN values are ignored, as before
    ((NAN, NAN, NAN), NAN),
    ((-BIG, -BIG, NAN), -BIG),
    ((TOP, TOP, TOP), TOP),  # rounding at the limit does not tip it over to inf
    ((BIG, -BIG, 0.0), 0.0),
    ((1.0, 2.0, 4.0), 7.0 / 3.0),  # finite sums: the plain mean, to the last bit
]
PAIR_CASES = [((BIG, BIG), BIG), ((INF, -INF), NAN), ((INF, BIG), INF)]


def _write(run_dir: Path, columns: dict[str, list[tuple[tuple[float, ...], float]]],
           times: dict[int, float] | None = None) -> None:
    """Each key's cases as steps 0, 1, ...; rank r logs the r-th value of every case."""
    ranks = max(len(vals) for cases in columns.values() for vals, _ in cases)
    for r in range(ranks):
        w = open_shard(run_dir, r, ranks)
        for key, cases in columns.items():
            if r >= len(cases[0][0]):
                continue
            sid = w.metrics.register(key, "TRAINING", "")
            for step, (values, _) in enumerate(cases):
                w.metrics.append(sid, step, values[r], (times or {}).get(r, T0 + step + 0.1 * r))
        w.close()


def _stats(merged: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(merged) as f:
        groups = f["metrics"][layout.GROUPS][()]
        g = [row for row in groups if row["key"].decode() == key][0]
        return f["metrics"][layout.CROSSRANK][g["stat_start"]:g["stat_stop"]], g


def _use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Route every group through one of crossrank's three paths; returns the paths taken."""
    taken: list[str] = []
    real_lockstep, real_stream = crossrank.lockstep, crossrank.CrossRank._stream
    monkeypatch.setattr(crossrank, "lockstep", lambda *a: taken.append("lockstep") or real_lockstep(*a))
    monkeypatch.setattr(crossrank.CrossRank, "_stream",
                        lambda self, g: taken.append("stream") or real_stream(self, g))
    monkeypatch.setattr(crossrank, "LOCKSTEP_MIN_ROWS", 1 if path == "lockstep" else 1 << 40)
    if path == "stream":
        monkeypatch.setattr(crossrank, "WINDOW_ROWS", 4)
        monkeypatch.setattr(crossrank, "MIN_BLOCK_ROWS", 2)
    return taken


@pytest.mark.parametrize("path", ["window", "lockstep", "stream"])
def test_the_cross_rank_mean_does_not_overflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    _write(tmp_path, {"loss": MEAN_CASES, "pair": PAIR_CASES})
    taken = _use_path(path, monkeypatch)
    merged = merge_run(tmp_path).merged_h5
    assert set(taken) == ({path} if path != "window" else set())
    for key, cases in (("loss", MEAN_CASES), ("pair", PAIR_CASES)):
        stats, _ = _stats(merged, key)
        assert stats["step"].tolist() == list(range(len(cases)))
        np.testing.assert_array_equal(stats["mean"], [mean for _, mean in cases], err_msg=f"{key} via {path}")


def test_a_step_repeated_on_one_rank_does_not_overflow_the_mean(tmp_path: Path) -> None:
    """The rank's own partial sum (two points of one step) overflows first, in the general path."""
    for r in range(2):
        w = open_shard(tmp_path, r, 2)
        sid = w.metrics.register("loss", "TRAINING", "")
        for value in (BIG, BIG) if r == 0 else (BIG,):
            w.metrics.append(sid, 0, value, T0 + r)
        w.close()
    stats, _ = _stats(merge_run(tmp_path).merged_h5, "loss")
    assert (stats["count"][0], stats["mean"][0]) == (3, BIG)


def test_the_mean_skew_does_not_overflow(tmp_path: Path) -> None:
    """Crafted times (shards are untrusted): each step's skew is 1.5e308 s, so is their mean."""
    _write(tmp_path, {"loss": [((1.0, 2.0), 1.5)] * 3}, times={0: 0.0, 1: 1.5e308})
    stats, group = _stats(merge_run(tmp_path).merged_h5, "loss")
    assert stats["skew"].tolist() == [1.5e308] * 3
    assert (group["skew_mean"], group["skew_max"]) == (1.5e308, 1.5e308)


def _summary(run_dir: Path, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "prov4ml_dist", "summary", str(run_dir), *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_summary_of_many_ranks_means_huge_last_values_without_overflow(tmp_path: Path) -> None:
    """Above --max-ranks the summary shows the mean of the ranks' last values (it raised
    OverflowError on 1.7e308 from every rank)."""
    _write(tmp_path, {"loss": MEAN_CASES[:1]})
    merge_run(tmp_path)
    lines = _summary(tmp_path, "--max-ranks", "1")
    row = [line.split() for line in lines if line.startswith("  loss ")]
    assert row and row[0][4:7] == ["1.7e+308"] * 3, lines  # last: min, mean, max


PER_EPOCH = {
    "per-epoch batch steps": lambda r, e, i: (i, T0 + e * 100 + i + r),
    "a step logged again and again, apart": lambda r, e, i: (i % 2, T0 + e * 100 + i + 0.5 * r),
}


@pytest.mark.parametrize("case", PER_EPOCH)
def test_a_group_with_more_monotone_runs_than_cursors_gets_full_statistics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Over WINDOW_ROWS points whose steps go back more than MAX_CURSORS times (it got no
    cross-rank rows and no straggler report): passes over step ranges give what the
    in-memory window gives, each holding at most WINDOW_ROWS / 2 partials."""
    rng = np.random.default_rng(7)
    for r in range(3):
        w = open_shard(tmp_path, r, 3)
        sid = w.metrics.register("loss", "TRAINING", "")
        for e in range(10 + 3 * r):  # ranks ran a different number of epochs
            for i in range(100):
                step, when = PER_EPOCH[case](r, e, i)
                w.metrics.append(sid, step, float(rng.normal()) if rng.uniform() > 0.1 else NAN, when)
        w.close()
    window = merge_run(tmp_path)
    with h5py.File(window.merged_h5) as f:
        expected = f["metrics"][layout.CROSSRANK][()], f["metrics"][layout.GROUPS][()]
    sizes: list[int] = []
    real_aggregate = crossrank.aggregate
    monkeypatch.setattr(crossrank, "aggregate", lambda p: sizes.append(len(p)) or real_aggregate(p))
    monkeypatch.setattr(crossrank, "WINDOW_ROWS", 32)
    monkeypatch.setattr(crossrank, "MAX_CURSORS", 8)
    monkeypatch.setattr(crossrank, "LOCKSTEP_MIN_ROWS", 1 << 40)
    streamed = merge_run(tmp_path)
    assert streamed.problems == window.problems == []
    with h5py.File(streamed.merged_h5) as f:
        got = f["metrics"][layout.CROSSRANK][()], f["metrics"][layout.GROUPS][()]
    for a, b in zip(expected, got, strict=True):
        for name in a.dtype.names:  # sums may add up in another order: the mean to rounding
            compare = np.testing.assert_allclose if name in ("mean", "skew_mean") else np.testing.assert_array_equal
            compare(a[name], b[name], err_msg=name)
    assert got[1]["multi_rank_steps"][0] == len(got[0]) > 0
    assert max(sizes) <= 16 and len(sizes) >= (300 // 8 if case == "per-epoch batch steps" else 1)


# -- the rules of the README's "What the merge computes", one test each where none pinned it --
def test_params_last_value_wins_per_rank_ties_go_to_the_lowest_rank_and_1_is_not_1_0(tmp_path: Path) -> None:
    """A param logged twice keeps its last value, across a restart too (the later attempt's);
    values are compared as JSON (1 and 1.0 differ); a majority tie goes to the lowest rank's."""
    logged = {(0, 0): [("lr", 0.5), ("lr", 0.1), ("seed", 1)], (1, 0): [("lr", 0.1), ("seed", 1.0)],
              (2, 0): [("lr", 0.9)], (2, 1): [("lr", 0.2)], (3, 0): [("lr", 0.2), ("seed", 1.0)]}
    for (rank, attempt), params in logged.items():
        w = open_shard(tmp_path, rank, 4, attempt=attempt)
        for key, value in params:
            w.record({"kind": "param", "time": T0, "key": key, "value": value})
        w.close()
    run = load_merged(merge_run(tmp_path).merged_h5)
    got = {(p.key, repr(p.value)): (p.ranks, p.majority) for p in run.params}
    assert got == {("lr", "0.1"): ((0, 1), True), ("lr", "0.2"): ((2, 3), False),
                   ("seed", "1"): ((0,), False), ("seed", "1.0"): ((1, 3), True)}


def test_series_summaries_keep_logging_order_and_ignore_only_nan(tmp_path: Path) -> None:
    """first/last step are the first and last point as logged (not the min and max step); min
    and max ignore NaN and include ±inf; ``last`` is the last value, NaN too; ``runs`` is 1 +
    how often the step went back; ``nonfinite`` counts NaN and ±inf."""
    w = open_shard(tmp_path, 0, 1)
    points = [(5, 1.0), (9, -INF), (2, NAN), (7, INF), (3, 4.0), (1, NAN)]
    sid = w.metrics.register("loss", "TRAINING", "")
    for i, (step, value) in enumerate(points):
        w.metrics.append(sid, step, value, T0 + i)
    w.metrics.register("never", "TRAINING", "")
    w.close()
    run = load_merged(merge_run(tmp_path).merged_h5)
    loss = next(s for s in run.series if s.key == "loss")
    assert (loss.first_step, loss.last_step, loss.runs, loss.count, loss.nonfinite) == (5, 1, 4, 6, 4)
    assert (loss.min, loss.max) == (-INF, INF) and math.isnan(loss.last)
    never = next(s for s in run.series if s.key == "never")
    assert (never.count, never.runs) == (0, 0) and math.isnan(never.min) and math.isnan(never.last)


def test_a_step_repeated_on_one_rank_its_latest_point_decides_and_its_gap_is_skew(tmp_path: Path) -> None:
    """Rank 0 logs step 0 at T0 and again at T0+5, rank 1 at T0+3: rank 0 is the slowest (its
    latest point), the skew is 5 s (rank 0's own gap included) and the step has 3 points."""
    for r, times in ((0, (T0, T0 + 5)), (1, (T0 + 3,))):
        w = open_shard(tmp_path, r, 2)
        sid = w.metrics.register("loss", "TRAINING", "")
        for t in times:
            w.metrics.append(sid, 0, 1.0, t)
        w.close()
    stats, group = _stats(merge_run(tmp_path).merged_h5, "loss")
    assert stats[["ranks", "count", "slowest_rank"]].tolist() == [(2, 3, 0)] and stats["skew"][0] == 5.0
    assert (group["slowest_rank"], group["skew_max"], group["skew_max_step"]) == (0, 5.0, 0)


@pytest.mark.parametrize("path", ["window", "lockstep", "stream"])
def test_skew_max_step_ties_go_to_the_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Steps 2, 4 and 6 share the largest skew (2 s): ``skew_max_step`` is 2, on every path."""
    for r in range(2):
        w = open_shard(tmp_path, r, 2)
        sid = w.metrics.register("loss", "TRAINING", "")
        for step in range(8):
            w.metrics.append(sid, step, 1.0, T0 + step * 10 + (2.0 if r and step in (2, 4, 6) else 0.5 * r))
        w.close()
    taken = _use_path(path, monkeypatch)
    _, group = _stats(merge_run(tmp_path).merged_h5, "loss")
    assert set(taken) == ({path} if path != "window" else set())
    assert (group["skew_max"], group["skew_max_step"]) == (2.0, 2)
