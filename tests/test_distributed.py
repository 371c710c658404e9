"""Real multi-process runs under torchrun (gloo, CPU) and mpiexec (MPICH from PyPI).

First the transport alone (tests/workers/transport_worker.py): run-id agreement, gathering,
barrier, streaming a multi-chunk file, and timeouts when a rank never comes or rank 0 is gone.
Then whole runs (tests/workers/train_worker.py): training with every rank logging, end_run
merging on rank 0, over a shared directory or private per-rank directories (files streamed),
and with a rank that exits before end_run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
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


def command(launcher: str, n: int, script: str, *args: str) -> list[str]:
    if launcher == "torchrun":
        if not TORCHRUN.exists():
            pytest.skip("torchrun is not installed")
        return [str(TORCHRUN), "--standalone", f"--nproc_per_node={n}", str(WORKERS / script), *args]
    pytest.importorskip("mpi4py")
    if not MPIEXEC.exists():
        pytest.skip("mpiexec is not installed (pip install mpich)")
    return [str(MPIEXEC), "-n", str(n), sys.executable, str(WORKERS / script), *args]


def launch(launcher: str, n: int, script: str, *args: str, timeout: float = 120) -> str:
    """Run the job; its output (every rank's warnings)."""
    cmd = command(launcher, n, script, *args)
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


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



def test_a_run_abandoned_mid_stream_leaves_nothing_the_next_run_takes(tmp_path):
    """MPI keeps unreceived messages for the job's lifetime: the frames an abandoned run left
    (a chunk in flight, a sender's "gave up") carry that run's namespace and are dropped."""
    launch("mpi", 2, "transport_worker.py", str(tmp_path), "abandoned")
    got = results(tmp_path)
    assert got[0]["a"].endswith("then abandoned the run") and got[1]["a"] == "timed out mid-stream, then gave up"
    assert got[0]["b"] is None  # run B's file arrived whole and verified



@pytest.mark.parametrize("launcher", ["torchrun", "mpi"])
def test_a_queued_sender_waits_while_the_receiver_takes_bytes(tmp_path, launcher):
    """No assumed transfer rate: rank 2 gives up its turn after 1.5 s without progress, yet
    waits the 4 s rank 0 spends taking rank 1's stream, because bytes keep moving."""
    launch(launcher, 3, "transport_worker.py", str(tmp_path), "slow")
    got = results(tmp_path)
    assert got[0]["received"] == [8, 8]
    assert got[1]["sender"] == got[2]["sender"] == "sent"
    assert got[2]["elapsed"] > 3.0  # well past its 1.5 s without progress


# -- whole runs ----------------------------------------------------------------------------
def run_dir_of(save_dir: Path) -> Path:
    return run_dir_of_experiment(save_dir, "e2e")


def run_dir_of_experiment(save_dir: Path, experiment: str) -> Path:
    (run_dir,) = (save_dir / experiment).iterdir()
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


# Each launcher once with each rank skewed and each offset, paired differently (the full
# product, 8 jobs, took 74 s of CI for what these 4 cover).
@pytest.mark.parametrize(("launcher", "skewed", "offset"), [
    ("torchrun", 1, -120.0), ("torchrun", 0, 3600.0), ("mpi", 1, -3600.0), ("mpi", 0, 120.0),
])
def test_a_rank_whose_clock_is_off_is_merged_all_the_same(tmp_path, launcher, skewed, offset):
    """One rank's wall clock is off by 2 minutes or an hour, far more than merge_timeout (5 s),
    behind rank 0's (rank 1 slow, or rank 0 fast): no wall clock is compared across ranks,
    so every rank's files are fetched and merged."""
    save, res = tmp_path / "prov", tmp_path / "results"
    res.mkdir()
    output = launch(launcher, 2, "train_worker.py", str(save), str(res), "--local-dir-base", str(res / "local"),
                    "--merge-timeout", "5", "--steps", "20", "--clock-offset", f"{skewed}:{offset}")
    got = results(res)
    # The offset reached that rank's process (and the library's rows), not the other's.
    assert abs(got[skewed]["wall_clock"] - got[1 - skewed]["wall_clock"] - offset) < 60
    run_dir = run_dir_of(save)
    with h5py.File(run_dir / "merged.h5", "r") as f:
        series, rows = f["metrics/series"][()], f["metrics/rows"][()]
    first = {int(s["rank"]): rows[s["row_start"]]["time"] for s in series if s["key"] == b"loss"}
    assert abs(first[skewed] - first[1 - skewed] - offset) < 60
    report = json.loads((run_dir / "aggregate.json").read_text())
    assert report["missing"] == {} and report["not_transferred"] == {} and report["problems"] == []
    check_merged(run_dir, [0, 1], 2)
    check_streamed_and_deduplicated(run_dir, res, 2)
    assert "did not reach rank 0" not in output and "merged without" not in output


STALL_MERGE_TIMEOUT_S = 3.0
# Longer than a queued rank's wait for its turn without progress (2 x merge_timeout) and than a
# sender's wait for rank 0 to take a chunk (merge_timeout).
STALL_S = 2 * STALL_MERGE_TIMEOUT_S + 3.0


def _stall_when_receiving(save: Path, proc: subprocess.Popen, name: str, seconds: float) -> None:
    """Once rank 0 is writing ``name`` (its temporary ``.NAME.tmp-HOST-PID-N`` appears under the
    run directory, see paths.temporary_path), freeze rank 0 with SIGSTOP for ``seconds``, as a
    node that stops serving."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list(save.glob(f"e2e/*/artifacts/*/.{name}.tmp-*"))
        if parts:
            pid = int(parts[0].name.rsplit("-", 2)[1])
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(seconds)
            finally:
                os.kill(pid, signal.SIGCONT)
            return
        time.sleep(0.005)
    pytest.fail(f"rank 0 never received {name}")


@pytest.mark.parametrize("launcher", ["torchrun", "mpi"])
def test_a_stalled_receiver_gets_every_shard_and_the_ranks_report_what_it_lacks(tmp_path, launcher):
    """Rank 0 freezes while taking rank 1's 24 MiB artifact, longer than the others wait: every
    shard is already there (shards stream first), both ranks say which of their files did not
    reach rank 0, and rank 0's outputs mark those artifacts as missing."""
    save, res = tmp_path / "prov", tmp_path / "results"
    res.mkdir()
    cmd = command(launcher, 3, "train_worker.py", str(save), str(res), "--local-dir-base", str(res / "local"),
                  "--merge-timeout", str(STALL_MERGE_TIMEOUT_S), "--big-mib", "24", "--steps", "10")
    with subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        _stall_when_receiving(save, proc, "big-1.bin", STALL_S)
        output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output[-3000:]
    run_dir = run_dir_of(save)
    report = json.loads((run_dir / "aggregate.json").read_text())
    assert report["missing"] == {}
    with h5py.File(run_dir / "merged.h5", "r") as f:
        assert sorted({int(r) for r in f["metrics/series"]["rank"]}) == [0, 1, 2]
        content = {c["path"].decode(): int(c["present"]) for c in f["artifacts/content"][()]}
    for rank in (1, 2):
        path = f"artifacts/rank-{rank:05d}/big-{rank}.bin"
        assert path in report["not_transferred"][str(rank)]
        # The rank's own word: which files, and the command that merges them later.
        said = [line for line in output.splitlines() if f"rank {rank}: " in line and "did not reach rank 0" in line]
        assert said and path in said[0] and "--local-dirs" in said[0], output[-3000:]
    assert content["artifacts/rank-00000/big-0.bin"] == 1
    assert content["artifacts/rank-00001/big-1.bin"] == content["artifacts/rank-00002/big-2.bin"] == 0


def test_a_process_group_destroyed_before_end_run_is_named_with_the_merge_command(tmp_path):
    """Two plain processes (no launcher, no MPI) with their own gloo group call
    destroy_process_group() before end_run: each says so, and how to merge with --local-dirs."""
    pytest.importorskip("torch.distributed")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    save, local = tmp_path / "prov", tmp_path / "local"
    procs = [subprocess.Popen([sys.executable, str(WORKERS / "destroy_worker.py"), str(rank), port, str(save),
                               str(local)], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    run_dir = run_dir_of_experiment(save, "e")
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, output[-3000:]
        assert "process group was destroyed before end_run" in output, output[-3000:]
        assert f"prov4ml-dist merge {run_dir} --local-dirs {local / f'rank-{rank}' / 'e' / run_dir.name}" in output
