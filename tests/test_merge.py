"""merge_run over shards written by the real ShardWriter: completeness, statistics, robustness."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_merge_support import RUN_ID, T0, crash, log_series, open_shard, shard_path  # noqa: E402

from prov4ml_dist.errors import MergeError  # noqa: E402
from prov4ml_dist.merge import crossrank, layout, load_merged, merge_run, scan  # noqa: E402


def _points(rank: int, steps: int, seed: int = 0) -> list[tuple[int, float, float]]:
    rng = np.random.default_rng(seed * 100 + rank)
    values = rng.normal(size=steps)
    times = T0 + np.arange(steps) + rng.uniform(0, 0.5, size=steps)
    return [(s, float(values[s]), float(times[s])) for s in range(steps)]


def _write_run(run_dir: Path, ranks: int, steps: int = 200) -> dict[int, list[tuple[int, float, float]]]:
    logged = {}
    for r in range(ranks):
        w = open_shard(run_dir, r, ranks)
        logged[r] = _points(r, steps)
        log_series(w, "loss", logged[r])
        log_series(w, "acc", [(s, s / 10, T0 + s) for s in range(steps // 4)], context="VALIDATION")
        sid = w.system.register("cpu_percent", "", "process", unit="%")
        for s in range(10):
            w.system.append(sid, s, 50.0 + r, T0 + s)
        w.close()
    return logged


def _series_rows(f: h5py.File, table: str, key: str, rank: int, context: str = "TRAINING") -> np.ndarray:
    series = f[table][layout.SERIES][()]
    match = [i for i, s in enumerate(series) if s["key"].decode() == key and s["rank"] == rank
             and s["context"].decode() == context]
    assert len(match) == 1
    s = series[match[0]]
    rows = f[table][layout.ROWS][s["row_start"]:s["row_stop"]]
    assert (rows["series"] == match[0]).all() and (rows["rank"] == rank).all()
    return rows


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_point_of_every_rank_is_merged(tmp_path: Path, ranks: int) -> None:
    logged = _write_run(tmp_path, ranks)
    result = merge_run(tmp_path)
    assert result.problems == []
    with h5py.File(result.merged_h5) as f:
        assert f["metrics"][layout.ROWS].shape[0] == ranks * 250
        for r in range(ranks):
            rows = _series_rows(f, "metrics", "loss", r)
            expected = np.array(logged[r])
            np.testing.assert_array_equal(rows["step"], expected[:, 0])
            np.testing.assert_array_equal(rows["value"], expected[:, 1])
            np.testing.assert_array_equal(rows["time"], expected[:, 2])
            assert len(_series_rows(f, "system", "cpu_percent", r, context="")) == 10
        ranks_table = f[layout.RANKS][()]
        assert list(ranks_table["rank"]) == list(range(ranks)) and ranks_table["complete"].all()
    run = load_merged(result.merged_h5)
    loss = [s for s in run.series if s.key == "loss" and s.rank == 1][0]
    values = np.array(logged[1])[:, 1]
    assert (loss.count, loss.first_step, loss.last_step, loss.runs) == (200, 0, 199, 1)
    assert (loss.min, loss.max, loss.last) == (values.min(), values.max(), values[-1])
    cpu = [s for s in run.series if s.key == "cpu_percent"][0]
    assert cpu.extra == {"unit": "%"} and cpu.dataset == "/system/rows"


def _crossrank(f: h5py.File, key: str) -> np.ndarray:
    groups = f["metrics"][layout.GROUPS][()]
    g = [i for i, row in enumerate(groups) if row["key"].decode() == key][0]
    return f["metrics"][layout.CROSSRANK][groups[g]["stat_start"]:groups[g]["stat_stop"]], groups[g]


def test_cross_rank_statistics_match_numpy(tmp_path: Path) -> None:
    logged = _write_run(tmp_path, 4)
    result = merge_run(tmp_path)
    values = np.array([[v for _, v, _ in logged[r]] for r in range(4)])
    times = np.array([[t for _, _, t in logged[r]] for r in range(4)])
    with h5py.File(result.merged_h5) as f:
        stats, group = _crossrank(f, "loss")
    np.testing.assert_array_equal(stats["step"], np.arange(200))
    assert (stats["ranks"] == 4).all() and (stats["count"] == 4).all()
    np.testing.assert_allclose(stats["min"], values.min(axis=0))
    np.testing.assert_allclose(stats["max"], values.max(axis=0))
    np.testing.assert_allclose(stats["mean"], values.mean(axis=0))
    np.testing.assert_array_equal(stats["slowest_rank"], times.argmax(axis=0))
    np.testing.assert_allclose(stats["skew"], times.max(axis=0) - times.min(axis=0))
    counts = np.bincount(times.argmax(axis=0), minlength=4)
    assert group["slowest_rank"] == counts.argmax() and group["slowest_steps"] == counts.max()
    assert group["multi_rank_steps"] == 200


def test_straggler_is_the_rank_that_is_late_most_often(tmp_path: Path) -> None:
    for r in range(4):
        w = open_shard(tmp_path, r, 4)
        delay = 2.0 if r == 2 else 0.1 * r
        log_series(w, "loss", [(s, 1.0, T0 + s + delay + (3.0 if r == 1 and s == 7 else 0.0)) for s in range(50)])
        w.close()
    run = load_merged(merge_run(tmp_path).merged_h5)
    loss = [g for g in run.groups if g.key == "loss"][0]
    assert (loss.slowest_rank, loss.slowest_steps) == (2, 49)
    assert loss.slowest_counts == {1: 1, 2: 49}
    assert loss.skew_max == pytest.approx(3.1) and loss.skew_max_step == 7
    assert loss.skew_mean == pytest.approx((49 * 2.0 + 3.1) / 50)


def test_nan_values_are_ignored_by_the_statistics(tmp_path: Path) -> None:
    for r in range(2):
        w = open_shard(tmp_path, r, 2)
        log_series(w, "loss", [(0, float("nan") if r == 0 else 1.0, T0), (1, float("nan"), T0 + 1),
                               (2, float("inf") if r else 2.0, T0 + 2)])
        w.close()
    with h5py.File(merge_run(tmp_path).merged_h5) as f:
        stats, _ = _crossrank(f, "loss")
    assert stats["mean"][0] == 1.0 and np.isnan(stats["mean"][1]) and stats["max"][2] == np.inf


@pytest.mark.parametrize("epochs", [1, 3])
def test_streamed_large_groups_equal_the_in_memory_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          epochs: int) -> None:
    """Steps that go backwards (per-epoch batch steps) too: both paths must agree."""
    rng = np.random.default_rng(3)
    for r in range(3):
        w = open_shard(tmp_path, r, 3)
        points = [(s, float(rng.normal()), T0 + e * 100 + s + rng.uniform()) for e in range(epochs)
                  for s in range(0, 300, 1 + r % 2)]
        log_series(w, "loss", points)
        w.close()
    window = merge_run(tmp_path)
    with h5py.File(window.merged_h5) as f:
        expected = f["metrics"][layout.CROSSRANK][()], f["metrics"][layout.GROUPS][()]
    monkeypatch.setattr(crossrank, "WINDOW_ROWS", 64)
    monkeypatch.setattr(crossrank, "MIN_BLOCK_ROWS", 16)
    streamed = merge_run(tmp_path)
    with h5py.File(streamed.merged_h5) as f:
        got = f["metrics"][layout.CROSSRANK][()], f["metrics"][layout.GROUPS][()]
        assert f["metrics"][layout.SERIES]["runs"].tolist() == [epochs] * 3
    for a, b in zip(expected, got, strict=True):
        for name in a.dtype.names:  # sums may add up in another order: the mean to rounding
            compare = np.testing.assert_allclose if name in ("mean", "skew_mean") else np.testing.assert_array_equal
            compare(a[name], b[name], err_msg=name)
    assert len(expected[0]) == 300 and expected[0]["count"].sum() == epochs * (300 + 150 + 300)


def _statistics(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(merge_run(run_dir).merged_h5) as f:
        return f["metrics"][layout.CROSSRANK][()], f["metrics"][layout.GROUPS][()]


def _assert_same_statistics(expected: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> None:
    for a, b in zip(expected, got, strict=True):
        for name in a.dtype.names:  # sums may add up in another order: the mean to rounding
            compare = np.testing.assert_allclose if name in ("mean", "skew_mean") else np.testing.assert_array_equal
            compare(a[name], b[name], err_msg=name)


real_lockstep = crossrank.lockstep
LOCKSTEP_CASES = {
    "lockstep": lambda rank, step: step,
    "one rank drifts late": lambda rank, step: step + (1 if rank == 2 and step >= 150 else 0),
    "a repeated step": lambda rank, step: step - (1 if rank == 1 and step == 120 else 0),
    "steps go back": lambda rank, step: step % 120,
}


@pytest.mark.parametrize("case", LOCKSTEP_CASES)
def test_lockstep_statistics_equal_the_general_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    case: str) -> None:
    """Column-wise statistics for ranks logging the same steps; any other group falls back,
    even after lockstep blocks were written (they are dropped). NaN values and times too."""
    rng = np.random.default_rng(5)
    step_of = LOCKSTEP_CASES[case]
    for r in range(3):
        w = open_shard(tmp_path, r, 3)
        values = rng.normal(size=200)
        values[rng.integers(0, 200, 20)] = np.nan
        times = T0 + np.arange(200) + rng.uniform(0, 0.5, size=200)
        times[rng.integers(0, 200, 20)] = np.nan
        log_series(w, "loss", [(step_of(r, s), float(values[s]), float(times[s])) for s in range(200)])
        log_series(w, "solo" if r == 0 else f"other{r}", [(s, 1.0, T0 + s) for s in range(50)])
        w.close()
    monkeypatch.setattr(crossrank, "LOCKSTEP_MIN_ROWS", 1 << 40)
    general = _statistics(tmp_path)
    calls = []
    monkeypatch.setattr(crossrank, "lockstep", lambda *a: calls.append(1) or real_lockstep(*a))
    monkeypatch.setattr(crossrank, "LOCKSTEP_MIN_ROWS", 1)
    monkeypatch.setattr(crossrank, "WINDOW_ROWS", 64)
    monkeypatch.setattr(crossrank, "MIN_BLOCK_ROWS", 16)
    _assert_same_statistics(general, _statistics(tmp_path))
    assert len(calls) == {"lockstep": 10, "one rank drifts late": 7, "a repeated step": 5, "steps go back": 0}[case]
    stats, groups = general
    assert list(groups["key"]) == [b"loss", b"other1", b"other2", b"solo"]
    assert (stats["group"] == 0).all(), "a key one rank logged has no cross-rank rows"
    if case == "lockstep":
        assert len(stats) == 200 and (stats["ranks"] == 3).all()


def test_a_step_without_any_time_has_no_slowest_rank(tmp_path: Path) -> None:
    for r in range(2):
        w = open_shard(tmp_path, r, 2)
        log_series(w, "loss", [(0, 1.0, float("nan")), (1, 2.0, T0 + 1 + r), (2, 3.0, float("nan") if r else T0)])
        w.close()
    stats, groups = _statistics(tmp_path)
    assert stats["slowest_rank"].tolist() == [-1, 1, 0]
    assert np.isnan(stats["skew"][0]) and stats["skew"][1:].tolist() == [1.0, 0.0]
    assert groups["multi_rank_steps"][0] == 3 and groups["skew_mean"][0] == 0.5
    assert groups["slowest_rank"][0] == 0  # a tie (1 step each) goes to the lower rank


def test_params_disagreement(tmp_path: Path) -> None:
    for r in range(4):
        w = open_shard(tmp_path, r, 4)
        w.record({"kind": "param", "time": T0, "key": "batch_size", "value": 32})
        w.record({"kind": "param", "time": T0, "key": "lr", "value": 0.1 if r != 3 else 0.5})
        w.close()
    run = load_merged(merge_run(tmp_path).merged_h5)
    params = {(p.key, json.dumps(p.value)): (p.ranks, p.majority) for p in run.params}
    assert params == {("batch_size", "32"): ((0, 1, 2, 3), True), ("lr", "0.1"): ((0, 1, 2), True),
                      ("lr", "0.5"): ((3,), False)}


def _artifact(w, run_dir: Path, rank: int, name: str, data: bytes, **extra) -> None:
    import hashlib

    rel = f"artifacts/rank-{rank:05d}/{name}"
    (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / rel).write_bytes(data)
    w.record({"kind": "artifact", "time": T0 + rank, "name": name, "context": "TRAINING", "step": None,
              "timestamp": None, "path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "copied": True, "item": "artifact", **extra})


def test_artifacts_are_content_addressed(tmp_path: Path) -> None:
    for r in range(4):
        w = open_shard(tmp_path, r, 4)
        _artifact(w, tmp_path, r, "config.yaml", b"lr: 0.1\n")
        _artifact(w, tmp_path, r, "log.txt", f"rank {r}".encode())
        for version in range(2):
            _artifact(w, tmp_path, r, f"net_v{version}.pt", f"weights {version}".encode(), item="model_version",
                      model_name="net", version=version)
        w.close()
    (tmp_path / "artifacts/rank-00003/log.txt").unlink()
    result = merge_run(tmp_path)
    assert result.problems == ["rank 3: artifact 'log.txt' is missing at artifacts/rank-00003/log.txt"]
    run = load_merged(result.merged_h5)
    by_name = {}
    for a in run.artifacts:
        by_name.setdefault(a.name, []).append(a)
    assert len(by_name["config.yaml"]) == 1 and len(by_name["log.txt"]) == 4
    assert sorted(g.rank for g in by_name["config.yaml"][0].generations) == [0, 1, 2, 3]
    assert sorted(a.present for a in by_name["log.txt"]) == [0, 1, 1, 1]
    assert [a.generations[0].version for a in by_name["net_v1.pt"]] == [1]


def _crashing_rank(run_dir: Path) -> None:
    w = open_shard(run_dir, 1, 2)
    log_series(w, "loss", [(s, 1.0, T0 + s) for s in range(100)])
    crash(w)


def test_rank_that_closed_without_end_run_is_incomplete(tmp_path: Path) -> None:
    for rank, status in ((0, "ok"), (1, "killed-by-SIGTERM")):
        w = open_shard(tmp_path, rank, 2)
        log_series(w, "loss", [(s, 0.5, T0 + s) for s in range(10)])
        w.close(status)
    result = merge_run(tmp_path)
    assert any("rank 1 attempt 0: incomplete (it closed its shard without end_run: killed-by-SIGTERM)" in p
               for p in result.problems)
    run = load_merged(result.merged_h5)
    assert [(r.rank, r.status, r.complete) for r in run.ranks] == [(0, "ok", True), (1, "killed-by-SIGTERM", False)]
    assert [s.count for s in run.series if s.key == "loss"] == [10, 10]  # its points are all merged


def test_crashed_rank_is_incomplete_but_merged(tmp_path: Path) -> None:
    """Only the crashed shard, which has no end record with its row counts, is counted row by row."""
    w = open_shard(tmp_path, 0, 2)
    log_series(w, "loss", [(s, 0.5, T0 + s) for s in range(100)])
    w.close()
    child = multiprocessing.get_context("fork").Process(target=_crashing_rank, args=(tmp_path,))
    child.start()
    child.join(30)
    shards = scan.scan_shards(scan.default_shards(tmp_path), [])
    assert [(s.rank, s.tables["metrics"].from_end) for s in shards] == [(0, True), (1, False)]
    result = merge_run(tmp_path)
    assert any("rank 1 attempt 0: incomplete" in p for p in result.problems)
    run = load_merged(result.merged_h5)
    crashed = [r for r in run.ranks if r.rank == 1][0]
    assert (crashed.status, crashed.complete, crashed.end_time) == ("incomplete", False, None)
    assert crashed.last_time >= T0 + 99  # how far it got: its latest flushed row or record
    assert [s.count for s in run.series if s.key == "loss"] == [100, 100]


def test_bad_shards_are_reported_and_the_others_merge(tmp_path: Path) -> None:
    _write_run(tmp_path, 2)
    shards = tmp_path / "shards"
    (shards / "rank-00002.h5").write_bytes(b"garbage" * 100)
    with h5py.File(shards / "rank-00003.h5", "w") as f:
        f.attrs["format"] = "something else"
    w = open_shard(tmp_path, 4, 5, run_id="another-run")
    w.close()
    result = merge_run(tmp_path, world_size=5)
    assert len(result.problems) == 6, result.problems
    assert sum("rank-0000" in p and "skipped shard" in p for p in result.problems) == 3
    assert "another-run" in " ".join(result.problems)
    run = load_merged(result.merged_h5)
    assert [(r.rank, r.status) for r in run.ranks] == [(0, "ok"), (1, "ok"), (2, "missing"), (3, "missing"),
                                                      (4, "missing")]


@pytest.mark.timeout(60)
def test_truncated_shard_is_reported_and_the_others_merge(tmp_path: Path) -> None:
    _write_run(tmp_path, 2)
    shards = tmp_path / "shards"
    data = (shards / "rank-00001.h5").read_bytes()
    (shards / "rank-00001.h5").write_bytes(data[: len(data) // 2])
    result = merge_run(tmp_path)
    run = load_merged(result.merged_h5)
    assert [r.rank for r in run.ranks if r.status == "ok"] == [0]
    assert any("rank-00001.h5" in p for p in result.problems), result.problems


def test_missing_ranks_and_restarts(tmp_path: Path) -> None:
    for r, attempt in ((0, 0), (1, 0), (1, 1)):
        w = open_shard(tmp_path, r, 3, attempt=attempt)
        log_series(w, "loss", [(s, float(r), T0 + s) for s in range(10)])
        if attempt == 0 and r == 1:
            w.flush()  # the first attempt of rank 1 died: left open, never closed
            w._stop.set()
        else:
            w.close()
    result = merge_run(tmp_path, missing_ranks={2: "did not reach end_run within merge_timeout"})
    run = load_merged(result.merged_h5)
    assert [(r.rank, r.attempt, r.status) for r in run.ranks] == [(0, 0, "ok"), (1, 0, "incomplete"),
                                                                  (1, 1, "ok"), (2, -1, "missing")]
    assert [r.reason for r in run.ranks][-1] == "did not reach end_run within merge_timeout"
    assert sorted((g.attempt, len(g.series)) for g in run.groups) == [(0, 2), (1, 1)]


def test_world_size_marks_ranks_without_shards(tmp_path: Path) -> None:
    _write_run(tmp_path, 2)
    result = merge_run(tmp_path, world_size=3)
    assert "rank 2: missing (no shard found)" in result.problems


def test_no_readable_shard_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "rank-00000.h5").write_bytes(b"nope")
    with pytest.raises(MergeError, match="no readable shard"):
        merge_run(tmp_path)


def _contents(path: Path) -> dict[str, object]:
    found: dict[str, object] = {}
    with h5py.File(path) as f:
        found["/"] = {k: v for k, v in f.attrs.items() if k != layout.STAMP_ATTR}

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                found[name] = obj[()].tolist()

        f.visititems(visit)
    return found


def test_merging_twice_gives_the_same_result(tmp_path: Path) -> None:
    _write_run(tmp_path, 4)
    first = merge_run(tmp_path)
    contents, prov = _contents(first.merged_h5), first.prov_json.read_bytes()
    second = merge_run(tmp_path, shard_paths=sorted((tmp_path / "shards").glob("*.h5"), reverse=True))
    assert _contents(second.merged_h5) == contents
    assert _without_merge_activity(second.prov_json.read_bytes()) == _without_merge_activity(prov)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.h5", "prov.json", "shards"]


def _without_merge_activity(prov_json: bytes) -> dict:
    """prov.json less the merge activity, which says when each merge ran."""
    doc = json.loads(prov_json)
    doc["activity"].pop("run:merge")
    return doc


def test_a_run_that_measured_no_energy_stores_no_energy_total(tmp_path: Path) -> None:
    """No GPU and no RAPL: merged.h5 has no energy rows at all, rather than a total of 0 J that
    summary, plot and any reader would take for a measurement."""
    w = open_shard(tmp_path, 0, 1)
    w.record({"kind": "energy", "time": T0, "rank": 0, "start": T0, "samples": 9, "gpus": [], "rapl": [],
              "gpu_joules": 0.0, "rapl_joules": 0.0})
    w.close()
    assert load_merged(merge_run(tmp_path).merged_h5).energy == []


def test_energy_is_summed_per_rank_node_and_job(tmp_path: Path) -> None:
    rapl = [{"zone": "intel-rapl:0", "domain": "package-0", "joules": 100.0, "in_total": True},
            {"zone": "intel-rapl:0:0", "domain": "package-0/core", "joules": 50.0, "in_total": False}]
    for r in range(4):  # two nodes of two ranks; local rank 0 samples its node's RAPL counters
        w = open_shard(tmp_path, r, 4)
        w.record({"kind": "energy", "time": T0, "rank": r, "start": T0, "samples": 9, "gpu_joules": 10.0 + r,
                  "gpus": [{"index": r % 2, "uuid": f"GPU-{r}", "joules": 10.0 + r, "method": "counter"}],
                  "rapl": rapl if r % 2 == 0 else [], "rapl_joules": 100.0 if r % 2 == 0 else 0.0})
        w.close()
    run = load_merged(merge_run(tmp_path).merged_h5)
    energy = {(e.scope, e.name): e.fields for e in run.energy}
    assert energy[("rank", "1")] == {"gpu.GPU-1.joules": 11.0, "gpu_joules": 11.0}
    node0 = energy[("node", "node0")]
    assert node0["gpu_joules"] == 21.0 and node0["rapl_joules"] == 100.0 and node0["total_joules"] == 121.0
    assert node0["rapl.package-0/core.joules"] == 50.0  # kept per domain, not added to the total
    job = energy[("job", "")]
    assert (job["gpu_joules"], job["rapl_joules"], job["total_joules"]) == (46.0, 200.0, 246.0)


def test_a_gpu_claimed_by_several_ranks_counts_once_per_node(tmp_path: Path) -> None:
    """Ranks that all claimed GPU 0 of their node (current device 0, set_device never called)
    report its energy each: the node and the job count it once (before: once per rank), each
    rank still shows what it sampled."""
    for r in range(4):  # node0: ranks 0, 1 both on GPU-a; node1: rank 2 on GPU-b, rank 3 on GPU-c
        uuid = {0: "GPU-a", 1: "GPU-a", 2: "GPU-b", 3: "GPU-c"}[r]
        w = open_shard(tmp_path, r, 4)
        w.record({"kind": "energy", "time": T0, "rank": r, "gpu_joules": 10.0 + r, "rapl": [], "rapl_joules": 0.0,
                  "gpus": [{"index": 0, "uuid": uuid, "joules": 10.0 + r, "method": "counter"}]})
        w.close()
    energy = {(e.scope, e.name): e.fields for e in load_merged(merge_run(tmp_path).merged_h5).energy}
    assert energy[("rank", "0")]["gpu_joules"] == 10.0 and energy[("rank", "1")]["gpu_joules"] == 11.0
    assert energy[("node", "node0")] == {"gpu.GPU-a.joules": 11.0, "gpu_joules": 11.0, "total_joules": 11.0}
    assert energy[("node", "node1")]["gpu_joules"] == 25.0
    assert energy[("job", "")]["gpu_joules"] == 36.0


def test_progress_is_reported(tmp_path: Path) -> None:
    _write_run(tmp_path, 2)
    seen: list[tuple[str, int, int]] = []
    merge_run(tmp_path, progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert [s for s in dict.fromkeys(stage for stage, _, _ in seen)] == ["scan", "copy", "crossrank", "prov"]
    assert ("copy", 2, 2) in seen


@pytest.mark.parametrize("budget", ["rows kept", "left open", "opened again"])
def test_each_shard_is_opened_and_checked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: str) -> None:
    """Opening and checking a shard was most of the merge of thousands of small shards: the scan
    keeps a small shard's rows, or leaves a larger one open; only past both budgets is a shard
    opened a second time."""
    from prov4ml_dist.shard import ShardReader

    _write_run(tmp_path, 4)
    if budget != "rows kept":
        monkeypatch.setattr(scan, "SMALL_SHARD_BYTES", 0)
    if budget == "opened again":
        monkeypatch.setattr(scan, "OPEN_SHARDS", 1)
    opened: list[Path] = []
    init = ShardReader.__init__

    def counting(self: ShardReader, path: Path) -> None:
        opened.append(Path(path))
        init(self, path)

    monkeypatch.setattr(ShardReader, "__init__", counting)
    result = merge_run(tmp_path)
    assert not result.problems
    twice = {p.name for p in opened if opened.count(p) > 1}
    assert len(opened) == 4 + len(twice) and len(twice) == {"opened again": 3}.get(budget, 0), opened
    assert [s.count for s in load_merged(result.merged_h5).series if s.key == "loss"] == [200] * 4


def test_undeclared_series_rows_are_dropped_and_reported(tmp_path: Path) -> None:
    w = open_shard(tmp_path, 0, 1)
    log_series(w, "loss", [(0, 1.0, T0)])
    w.metrics.append(7, 0, 1.0, T0)
    w.close()
    result = merge_run(tmp_path)
    assert result.problems == ["rank 0 attempt 0: 1 rows of 'metrics' with undeclared series ids dropped"]
    assert shard_path(tmp_path, 0).exists() and RUN_ID == load_merged(result.merged_h5).run_id


def test_copied_shards_merge_anywhere(tmp_path: Path) -> None:
    """The offline merge of a copied run directory gives the same PROV as the original."""
    _write_run(tmp_path / "a", 2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert _without_merge_activity(merge_run(tmp_path / "a").prov_json.read_bytes()) == _without_merge_activity(
        merge_run(tmp_path / "b").prov_json.read_bytes())


def test_thousands_of_keys_per_chunk(tmp_path: Path) -> None:
    """Many series per chunk go out in one scattered write; every point lands in place."""
    for r in range(2):
        w = open_shard(tmp_path, r, 2)
        ids = [w.metrics.register(f"k{k:04d}", "TRAINING", "") for k in range(300)]
        for step in range(3):
            for k, sid in enumerate(ids):
                w.metrics.append(sid, step, float(k * 10 + step + r), T0 + step)
        w.close()
    run = load_merged(merge_run(tmp_path).merged_h5)
    with h5py.File(tmp_path / "merged.h5") as f:
        rows = f["metrics"][layout.ROWS][()]
    for s in run.series:
        k = int(s.key[1:])
        part = rows[s.row_start:s.row_stop]
        assert part["step"].tolist() == [0, 1, 2] and part["value"].tolist() == [k * 10 + i + s.rank for i in range(3)]
