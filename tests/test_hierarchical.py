"""The hierarchical merge: each node's shards merged into a part (``merge/parts.py``), rank 0
combining the parts (``merge/combine.py``) into the merged.h5 and prov.json that the
single-process ``merge_run`` gives for the same shards — only ``crossrank.mean`` may differ,
in the last bits (its sums are added node by node)."""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from prov4ml_dist.errors import MergeError
from prov4ml_dist.merge import combine, load_merged, merge_run, parts
from prov4ml_dist.merge.hierarchy import merge_nodes

from .conftest import BIN, child_env
from .test_cli_support import cli, merged_content, prov_structure
from .test_merge import _artifact
from .test_merge_support import T0, crash, log_series, open_shard

WORLD = 8
WORKER = Path(__file__).parent / "workers" / "hier_worker.py"
MEAN_RTOL = 1e-12  # crossrank.mean: sums added node by node round differently in the last bits
MARGIN_S = 6.0  # what a loaded 2-core machine adds to a bounded wait


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
    ([[0, 1, 2, 3], [4, 5, 6, 7], []], False),  # a node whose only shard is unreadable: an empty part
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
    done = cli("export", tmp_path / "run", "--format", "csv", "-o", tmp_path / "points.csv")
    points = sum(s.count for s in run.series if s.dataset.startswith("/metrics"))
    assert done.returncode == 0 and len((tmp_path / "points.csv").read_text().splitlines()) == points + 1, done.stderr
    done = cli("validate", tmp_path / "run")
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "run" / "parts" / "node-00001.h5").unlink()
    done = cli("validate", tmp_path / "run")
    assert done.returncode != 0 and "parts/node-00001.h5, which is not beside merged.h5" in done.stdout + done.stderr


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


# -- at end_run, real processes ------------------------------------------------------------
def _node_command(nodes: int, per_node: int, save: Path, results: Path, *args: str) -> list[str]:
    """mpiexec with one group of ranks per emulated node (each its SLURM_NODEID, as Hydra in an
    allocation sets it)."""
    worker = [sys.executable, str(WORKER), str(save), str(results), *args]
    cmd = [str(BIN / "mpiexec")]
    for node in range(nodes):
        cmd += [*([":"] if node else []), "-n", str(per_node), "-env", "SLURM_JOB_ID", "77", "-env", "SLURM_STEP_ID",
                "0", "-env", "SLURM_NODEID", str(node), *worker]
    return cmd


def _single_merge_of(run_dir: Path, local: Path | None, target: Path) -> Path:
    """The single-process merge of the shards the job left (on the nodes' disks too)."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("parts", "merged.h5", "prov.json"))
    for shard in (local.glob("node-*/*/*/shards/rank-*.h5") if local else []):
        if not (target / "shards" / shard.name).exists():
            shutil.copy2(shard, target / "shards" / shard.name)
    merge_run(target)
    return target


def _check_hierarchical(save: Path, results: Path, local: Path | None, world: int, nodes: int,
                        gone: int | None = None) -> Path:
    (run_dir,) = [p for p in (save / "hier").iterdir() if p.is_dir()]
    report = json.loads((run_dir / "aggregate.json").read_text())
    assert report["hierarchical"] == {"nodes": nodes, "parts": nodes}, report
    assert list(report["missing"]) == ([] if gone is None else [str(gone)]), report
    ended = sorted(int(p.stem.split("-")[1]) for p in results.glob("rank-*.json"))
    assert ended == [r for r in range(world) if r != gone]
    with h5py.File(run_dir / "merged.h5") as f:
        assert f["metrics"]["rows"].is_virtual and len(f["metrics"]["series"]) > 2 * world
        # The rank that left: its shard merged all the same (rank 0's part takes what no leader reads).
        assert sorted(f["ranks"]["rank"].tolist()) == list(range(world))
        assert [int(r) for r, ok in zip(f["ranks"]["rank"], f["ranks"]["complete"], strict=True) if not ok] == (
            [] if gone is None else [gone])
    if local is not None:  # only the parts crossed: node 1's shards stayed on its disk
        assert not (run_dir / "shards" / f"rank-{world - 1:05d}.h5").exists()
        assert not list(local.glob("node-*/*/*/parts/*.h5"))  # the leaders' copies, once sent
        assert (run_dir / "artifacts" / f"rank-{world - 1:05d}").is_dir()  # its artifacts did not
    assert_same_merge(run_dir, _single_merge_of(run_dir, local, save.parent / "single"))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(("nodes", "node_local"), [(2, True), (4, False)])
def test_mpiexec_8_ranks_merge_by_node(tmp_path, nodes, node_local):
    """8 ranks on 2 emulated nodes with node-local disks (no shared filesystem), or on 4 sharing
    one with rank 5 leaving before end_run: each node's leader merges its node, rank 0
    combines; the single-process merge's files, and the rank that left costs one timeout."""
    pytest.importorskip("mpi4py")
    save, results, local, timeout = tmp_path / "save", tmp_path / "results", tmp_path / "local", 4.0
    results.mkdir()
    extra = ["--node-local", str(local)] if node_local else ["--exit-before-end", "5", "--merge-timeout", str(timeout)]
    cmd = _node_command(nodes, 8 // nodes, save, results, *extra)
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = _check_hierarchical(save, results, local if node_local else None, 8, nodes, None if node_local else 5)
    if node_local:  # the offline merge must not replace it with a merge of rank 0's node alone
        refused = cli("merge", run_dir)
        assert refused.returncode == 2 and "stayed on their nodes" in refused.stderr, refused.stderr
    else:
        rank0 = json.loads((results / "rank-0.json").read_text())
        assert rank0["end_seconds"] < 2 * timeout + MARGIN_S, rank0
        # Every shard is there: the offline merge gives a self-contained file; the parts go.
        assert cli("merge", run_dir).returncode == 0
        assert not list((run_dir / "parts").glob("*.h5"))
        with h5py.File(run_dir / "merged.h5") as f:
            assert not f["metrics"]["rows"].is_virtual


@pytest.mark.slow
def test_torchrun_2_agents_merge_by_node(tmp_path):
    """torchrun with 2 agents (--nnodes=2, c10d rendezvous on 127.0.0.1), node-local disks."""
    save, results, local = tmp_path / "save", tmp_path / "results", tmp_path / "local"
    results.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes=2", f"--node-rank={n}", "--nproc-per-node=2",
                                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=hier",
                                str(WORKER), str(save), str(results), "--node-local", str(local)],
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for n in range(2)]
    outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n".join(o[-3000:] for o in outputs)
    _check_hierarchical(save, results, local, 4, 2)


@pytest.mark.slow
def test_a_node_leader_killed_mid_merge_makes_rank_0_merge_the_shards(tmp_path):
    """Rank 2, node 1's leader, is SIGKILLed while it writes its part (the ranks started by hand
    with a gloo process group: no launcher takes the others down). Rank 0 waits merge_timeout,
    no more, then merges the shards itself: complete, and said so in aggregate.json."""
    pytest.importorskip("torch")
    save, results, timeout = tmp_path / "save", tmp_path / "results", 4.0
    results.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(save), str(results), "--merge-timeout", str(timeout),
                               "--kill-in-part", "2"],
                              env=child_env(RANK=str(r), WORLD_SIZE="4", LOCAL_RANK=str(r % 2), LOCAL_WORLD_SIZE="2",
                                            GROUP_RANK=str(r // 2), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(4)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert procs[2].returncode == -signal.SIGKILL
    assert [p.returncode for p in procs[:2] + procs[3:]] == [0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    rank0 = json.loads((results / "rank-0.json").read_text())
    assert rank0["prov_json"] and rank0["end_seconds"] < 3 * timeout + 20
    (run_dir,) = [p for p in (save / "hier").iterdir() if p.is_dir()]
    report = json.loads((run_dir / "aggregate.json").read_text())
    assert "rank 2" in report["hierarchical"]["fell_back"] and report["missing"] == {}, report
    assert not (run_dir / "parts").exists()
    with h5py.File(run_dir / "merged.h5") as f:
        assert not f["metrics"]["rows"].is_virtual and f["ranks"]["complete"].all() and len(f["ranks"]) == 4
    assert_same_merge(run_dir, _single_merge_of(run_dir, None, tmp_path / "single"))


@pytest.mark.slow
def test_forced_on_one_node(tmp_path):
    """PROV4ML_HIERARCHICAL_MERGE=on on a one-node job: rank 0 leads the only node; no rank
    waits for a round it is not part of (merge_timeout 30 s, the whole end_run in seconds)."""
    pytest.importorskip("mpi4py")
    save, results = tmp_path / "save", tmp_path / "results"
    results.mkdir()
    cmd = [str(BIN / "mpiexec"), "-n", "3", sys.executable, str(WORKER), str(save), str(results), "--merge-timeout",
           "30"]
    done = subprocess.run(cmd, env=child_env(PROV4ML_HIERARCHICAL_MERGE="on"), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_hierarchical(save, results, None, 3, 1)
    assert all(json.loads(p.read_text())["end_seconds"] < 15 for p in results.glob("rank-*.json"))
