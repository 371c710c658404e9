"""The hierarchical merge: each node's shards merged into a part (``merge/parts.py``), rank 0
combining the parts (``merge/combine.py``) into the merged.h5 and prov.json that the
single-process ``merge_run`` gives for the same shards — only ``crossrank.mean`` may differ,
in the last bits (its sums are added node by node)."""

from __future__ import annotations

import math
import multiprocessing
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from prov4ml_dist.errors import MergeError
from prov4ml_dist.merge import combine, load_merged, merge_run, parts
from prov4ml_dist.merge.hierarchy import merge_nodes

from .test_cli_support import cli, merged_content, prov_structure
from .test_merge import _artifact
from .test_merge_support import T0, crash, log_series, open_shard

WORLD = 8
MEAN_RTOL = 1e-12  # crossrank.mean: sums added node by node round differently in the last bits


def _crashed_rank(run_dir: Path, rank: int) -> None:
    w = open_shard(run_dir, rank, WORLD, ranks_per_node=4)
    log_series(w, "loss", [(s, float(s), T0 + s) for s in range(30)])
    crash(w)


def _run(run_dir: Path) -> None:
    """Every path of the merge over 8 ranks on 2 nodes: lockstep groups, small groups, steps that
    go back, NaN and ±inf, a restart, a crashed rank, params that disagree, artifacts (one the
    same on every rank), system series, an unreadable shard, a rank with a key of its own."""
    rng = np.random.default_rng(17)
    for rank in range(WORLD - 1):
        for attempt in ((0, 1) if rank == 2 else (0,)):
            w = open_shard(run_dir, rank, WORLD, attempt=attempt, ranks_per_node=4)
            log_series(w, "loss", [(s, float(rng.normal()), T0 + s + rng.uniform()) for s in range(3000)])
            steps = np.r_[np.arange(40), np.arange(20)]  # the step went back: an epoch restarted
            special = {3: math.nan, 5: math.inf, 6: -math.inf if rank == 1 else 1.0, 7: 1.7e308}
            log_series(w, "acc", [(int(s), special.get(int(s), s / 7 + rank), T0 + s + (rank == 5)) for s in steps],
                       context="VALIDATION")
            for k in range(12):
                log_series(w, f"k{k:02d}", [(s, float(rank * k + s), T0 + s) for s in range(rank + 3)])
            if rank == 4:
                log_series(w, "only4", [(s, float(s), math.nan) for s in range(10)])
            w.record({"kind": "param", "time": T0, "key": "lr", "value": 0.1 if rank != 3 else 0.2})
            _artifact(w, run_dir, rank, "config.yaml", b"lr: 0.1\n")
            _artifact(w, run_dir, rank, f"log-{attempt}.txt", f"rank {rank}".encode())
            sid = w.system.register("cpu_percent", "", "process", unit="%")
            for s in range(50):
                w.system.append(sid, s, 50.0 + rank, T0 + s)
            w.close()
    child = multiprocessing.get_context("fork").Process(target=_crashed_rank, args=(run_dir, WORLD - 1))
    child.start()
    child.join(30)
    (run_dir / "shards" / "rank-00009.h5").write_bytes(b"not an HDF5 file")


def assert_same_merge(hierarchical: Path, single: Path, merged_in: Path | None = None) -> None:
    """merged.h5 and prov.json content-equal; ``crossrank.mean`` within ``MEAN_RTOL``
    (``merged_in``: where ``hierarchical`` was when it was merged, if it moved since)."""
    a, b = merged_content(hierarchical / "merged.h5"), merged_content(single / "merged.h5")
    for table in ("metrics", "system"):
        means = [np.array([math.nan if v == "nan" else v for v in c[f"{table}/crossrank"].pop("mean")], dtype=float)
                 for c in (a, b)]
        np.testing.assert_allclose(means[0], means[1], rtol=MEAN_RTOL, atol=0)
    for content, run_dir in ((a, merged_in or hierarchical), (b, single)):  # problems name the shards' paths
        content["/"]["problems"] = content["/"]["problems"].replace(str(run_dir), "RUN")
    assert a == b
    assert prov_structure(hierarchical / "prov.json") == prov_structure(single / "prov.json")


def _hierarchical(source: Path, target: Path, nodes: list[list[int]], single_file: bool = False) -> None:
    """``source`` copied to ``target`` and merged there through one part per node (each node
    its ranks' shards, the unreadable one on the last node)."""
    shutil.copytree(source, target)
    shards = sorted((target / "shards").glob("rank-*.h5"))
    last = len(nodes) - 1
    merge_nodes(target, [[p for p in shards if int(p.name[5:10]) in ranks or (n == last and int(p.name[5:10]) >= WORLD)]
                         for n, ranks in enumerate(nodes)], single_file=single_file)


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The run's shards, and their single-process merge."""
    base = tmp_path_factory.mktemp("hier")
    _run(base / "src")
    shutil.copytree(base / "src", base / "single")
    merge_run(base / "single")
    return base / "src", base / "single"


@pytest.mark.parametrize(("nodes", "single_file"), [
    ([[0, 1, 2, 3], [4, 5, 6, 7]], False),  # block placement: one piece per (group, node)
    ([[0, 1, 2, 3], [4, 5, 6, 7]], True),
    ([[0, 2, 4, 6], [1, 3, 5, 7]], False),  # cyclic placement: a node's ranks interleave with the other's
    ([[0], [1, 2, 3, 4, 5], [6, 7]], True),
])
def test_parts_combine_to_the_single_process_merge(tmp_path, varied, nodes, single_file, monkeypatch):
    source, single = varied
    # Windows of a few hundred rows: the parts' and rank 0's slabs of steps are exercised.
    monkeypatch.setattr(parts, "WINDOW_ROWS", 700)
    monkeypatch.setattr(combine, "WINDOW_ROWS", 700)
    _hierarchical(source, tmp_path / "run", nodes, single_file)
    assert_same_merge(tmp_path / "run", single)
    with h5py.File(tmp_path / "run" / "merged.h5") as f:
        assert f["metrics"]["rows"].is_virtual is not single_file
    assert (tmp_path / "run" / "parts").exists() is not single_file
    with h5py.File(single / "merged.h5") as f:  # the case covers what it claims
        assert "incomplete" in {s.decode() for s in f["ranks"]["status"]}
        assert "skipped shard" in f.attrs["problems"] and len(f["metrics"]["crossrank"]) > 3000
        assert np.isinf(f["metrics"]["crossrank"]["max"]).any()


def test_readers_take_the_combined_merge_where_the_run_moved(tmp_path, varied):
    """load_merged and the CLI read the hierarchical merged.h5 like any other, also once the
    run directory is moved: its virtual rows name the parts relative to it."""
    _hierarchical(varied[0], tmp_path / "first", [[0, 1, 2, 3], [4, 5, 6, 7]])
    shutil.move(tmp_path / "first", tmp_path / "run")
    assert_same_merge(tmp_path / "run", varied[1], merged_in=tmp_path / "first")
    run = load_merged(tmp_path / "run" / "merged.h5")
    assert run.world_size == WORLD and {p.key for p in run.params} == {"lr"}
    done = cli("summary", tmp_path / "run")
    assert done.returncode == 0 and "loss" in done.stdout, done.stderr
    done = cli("validate", tmp_path / "run")
    assert done.returncode == 0, done.stdout + done.stderr


def test_overlapping_parts_are_refused(tmp_path, varied):
    """A (rank, attempt) in two parts would count twice in the cross-rank statistics."""
    run = Path(shutil.copytree(varied[0], tmp_path / "run"))
    shards = sorted((run / "shards").glob("rank-0000[0-3]*.h5"))
    with pytest.raises(MergeError, match="overlap"):
        merge_nodes(run, [shards[:3], shards[2:]])
    assert not (run / "merged.h5").exists()


def test_cli_single_file_copies_the_parts_rows_into_merged_h5(tmp_path, varied):
    """``prov4ml-dist merge --single-file`` on a run merged over node parts: one self-contained
    merged.h5, the same content, the parts gone."""
    _hierarchical(varied[0], tmp_path / "run", [[0, 1, 2, 3], [4, 5, 6, 7]])
    done = cli("merge", tmp_path / "run", "--single-file")
    assert done.returncode == 0 and "2 node part(s)" in done.stdout, done.stdout + done.stderr
    assert not list((tmp_path / "run" / "parts").glob("*.h5"))
    with h5py.File(tmp_path / "run" / "merged.h5") as f:
        assert not f["metrics"]["rows"].is_virtual
    assert_same_merge(tmp_path / "run", varied[1])
