"""Real multi-process runs under torchrun (gloo, CPU) and mpiexec (MPICH from PyPI).

First the transport alone (tests/workers/transport_worker.py): run-id agreement, gathering,
barrier, streaming a multi-chunk file, and timeouts when a rank never comes or rank 0 is gone.
Then whole runs (tests/workers/train_worker.py): training with every rank logging, end_run
merging on rank 0, over a shared directory or private per-rank directories (files streamed),
and with a rank that exits before end_run.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from .conftest import BIN, child_env
from .prov_support import assert_prov_model_valid

pytestmark = pytest.mark.slow

WORKERS = Path(__file__).parent / "workers"
TORCHRUN = BIN / "torchrun"
MPIEXEC = BIN / "mpiexec"
# The transport worker's short timeout, and the slack a loaded 2-core machine needs on top.
WORKER_TIMEOUT_S = 3.0
MARGIN_S = 3.0


def launch(launcher: str, n: int, script: str, *args: str, timeout: float = 120) -> None:
    if launcher == "torchrun":
        if not TORCHRUN.exists():
            pytest.skip("torchrun is not installed")
        cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={n}", str(WORKERS / script), *args]
    else:
        pytest.importorskip("mpi4py")
        if not MPIEXEC.exists():
            pytest.skip("mpiexec is not installed (pip install mpich)")
        cmd = [str(MPIEXEC), "-n", str(n), sys.executable, str(WORKERS / script), *args]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def results(directory: Path) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in directory.glob("rank-*.json")}


# -- the transport alone ----------------------------------------------------------------
@pytest.mark.parametrize(("launcher", "n", "extra"), [
    ("torchrun", 2, ()),  # torchrun's agent store, no process group at all
    ("torchrun", 4, ("--init-gloo",)),  # the store of an initialised gloo group
    ("mpi", 2, ()),
    ("mpi", 4, ()),
])
def test_agree_gather_barrier_and_stream(tmp_path, launcher, n, extra):
    launch(launcher, n, "transport_worker.py", str(tmp_path), "suite", *extra)
    got = results(tmp_path)
    assert sorted(got) == list(range(n))
    assert {r["transport"] for r in got.values()} == {"torch_dist" if launcher == "torchrun" else "mpi"}
    assert len({r["run_id"] for r in got.values()}) == 1 and got[0]["run_id"].startswith("proposal-of-")
    assert {int(k): v["rank"] for k, v in got[0]["gathered"].items()} == {r: r for r in range(n)}
    assert all(r["barrier"] for r in got.values())
    chunk = 64 << 10
    for received in got[0]["received"]:
        assert received["outcome"] is None and received["sha_ok"]
        assert sum(received["chunks"]) == (received["src"] * 2 + 3) * chunk // 2
        assert max(received["chunks"]) == chunk and len(received["chunks"]) > 1


@pytest.mark.parametrize("launcher", ["torchrun", "mpi"])
def test_a_rank_that_never_comes_costs_the_others_one_timeout(tmp_path, launcher):
    launch(launcher, 3, "transport_worker.py", str(tmp_path), "late")
    got = results(tmp_path)
    assert sorted(got) == [0, 1]  # rank 2 left at once
    assert got[0]["gathered"] == [0, 1]
    assert not any(r["barrier"] for r in got.values())
    # rank 0: the gather's timeout, then the barrier's; the others only the barrier's.
    assert got[0]["elapsed"] < 2 * WORKER_TIMEOUT_S + MARGIN_S
    assert got[1]["elapsed"] < WORKER_TIMEOUT_S + MARGIN_S


@pytest.mark.parametrize("launcher", ["torchrun", "mpi"])
def test_ranks_do_not_hang_when_rank_0_is_gone(tmp_path, launcher):
    launch(launcher, 2, "transport_worker.py", str(tmp_path), "root-gone")
    got = results(tmp_path)
    assert "rank 0's broadcast" in got[1]["error"]
    assert WORKER_TIMEOUT_S <= got[1]["elapsed"] < WORKER_TIMEOUT_S + MARGIN_S


@pytest.mark.parametrize("launcher", ["torchrun", "mpi"])
def test_a_sender_that_stopped_waiting_does_not_cost_rank_0_a_timeout(tmp_path, launcher):
    launch(launcher, 2, "transport_worker.py", str(tmp_path), "gave-up")
    got = results(tmp_path)
    assert got[1]["sender"] == "gave up"
    assert "stopped waiting" in got[0]["received"] and got[0]["elapsed"] < MARGIN_S


# -- whole runs ----------------------------------------------------------------------------
def run_dir_of(save_dir: Path) -> Path:
    (run_dir,) = (save_dir / "e2e").iterdir()
    return run_dir


def check_merged(run_dir: Path, ranks: list[int], world_size: int, steps: int = 20) -> None:
    """Every point and artifact of every rank is in merged.h5; prov.json parses with one
    SoftwareAgent per rank."""
    with h5py.File(run_dir / "merged.h5", "r") as f:
        series, rows = f["metrics/series"][()], f["metrics/rows"][()]
        generations, content = f["artifacts/generations"][()], f["artifacts/content"][()]
    # Every artifact and model version the merged ranks saved is in the run directory.
    assert {int(g["rank"]) for g in generations} == set(ranks)
    assert all(content[g["content"]]["present"] == 1 for g in generations)
    for rank in ranks:
        for key in ("loss", "rank_value"):
            (s,) = [s for s in series if s["key"].decode() == key and s["rank"] == rank]
            points = rows[s["row_start"]:s["row_stop"]]
            np.testing.assert_array_equal(points["step"], np.arange(steps))
            if key == "rank_value":
                np.testing.assert_array_equal(points["value"], rank * 1000 + np.arange(steps))
    assert sorted({int(s["rank"]) for s in series}) == ranks
    prov = pytest.importorskip("prov.model")
    doc = prov.ProvDocument.deserialize(str(run_dir / "prov.json"), format="json")
    agents = [r for r in doc.get_records(prov.ProvAgent)
              if any(str(v) == "prov:SoftwareAgent" for k, v in r.attributes if str(k) == "prov:type")]
    assert sorted(str(a.identifier).rsplit("rank-", 1)[1] for a in agents) == [f"{r:05d}" for r in range(world_size)]
    assert_prov_model_valid(run_dir / "prov.json")  # PROV-CONSTRAINTS, vocabulary


def check_streamed_and_deduplicated(run_dir: Path, results_dir: Path, world_size: int) -> None:
    report = json.loads((run_dir / "aggregate.json").read_text())
    assert report["files_present"] == 0 and report["files_streamed"] > 0 and report["missing"] == {}
    assert report["bytes_streamed"] >= (world_size - 1) * (5 << 20)
    for rank in range(world_size):
        artifacts = run_dir / "artifacts" / f"rank-{rank:05d}"
        assert (artifacts / f"big-{rank}.bin").read_bytes() == random.Random(rank).randbytes(5 << 20)
        assert (run_dir / "shards" / f"rank-{rank:05d}.h5").is_file()
        # The config is the same on every rank: streamed once, then hard-linked.
        assert (artifacts / "config.json").samefile(run_dir / "artifacts" / "rank-00000" / "config.json")
    assert report["files_linked"] >= world_size - 1
    assert not list(results_dir.glob("local/*/e2e/*/merged.h5"))  # only rank 0's shared directory has a merge


@pytest.mark.parametrize(("launcher", "n", "local"), [
    ("torchrun", 2, False), ("torchrun", 4, True), ("mpi", 2, True), ("mpi", 4, False),
])
def test_training_run_merges_every_rank(tmp_path, launcher, n, local):
    save, res = tmp_path / "prov", tmp_path / "results"
    res.mkdir()
    local_args = ("--local-dir-base", str(res / "local")) if local else ()
    launch(launcher, n, "train_worker.py", str(save), str(res), *local_args)
    got = results(res)
    run_dir = run_dir_of(save)
    assert got[0]["prov_json"] == str(run_dir / "prov.json")
    assert all(got[r]["prov_json"] is None for r in range(1, n))
    check_merged(run_dir, list(range(n)), n)
    if local:
        check_streamed_and_deduplicated(run_dir, res, n)
    else:
        assert json.loads((run_dir / "aggregate.json").read_text())["files_streamed"] == 0


@pytest.mark.parametrize(("launcher", "n", "local"), [("torchrun", 3, False), ("mpi", 3, True)])
def test_a_rank_that_exits_before_end_run_is_merged_as_missing(tmp_path, launcher, n, local):
    save, res = tmp_path / "prov", tmp_path / "results"
    res.mkdir()
    merge_timeout, gone = 4.0, n - 1
    local_args = ("--local-dir-base", str(res / "local")) if local else ()
    launch(launcher, n, "train_worker.py", str(save), str(res), "--exit-before-end", str(gone),
           "--merge-timeout", str(merge_timeout), *local_args)
    got = results(res)
    assert sorted(got) == list(range(gone))
    assert all(r["end_seconds"] < merge_timeout + MARGIN_S for r in got.values())
    run_dir = run_dir_of(save)
    report = json.loads((run_dir / "aggregate.json").read_text())
    assert "did not reach end_run" in report["missing"][str(gone)]
    with h5py.File(run_dir / "merged.h5", "r") as f:
        reasons = {int(r["rank"]): r["reason"].decode() for r in f["ranks"][()]}
    assert "did not reach end_run" in reasons[gone]
    # On a shared directory its shard is there all the same (closed by the exit hooks) and
    # merged; on a private one it stayed behind.
    check_merged(run_dir, list(range(n)) if not local else list(range(gone)), n)
