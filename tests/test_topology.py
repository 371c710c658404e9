"""Rank detection from each launcher's environment, and run ids every rank derives alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from prov.constants import PROV
from prov.model import ProvActivity, ProvAgent, ProvDocument

from prov4ml_dist import Context, environment
from prov4ml_dist.errors import RunStateError
from prov4ml_dist.merge import load_merged
from prov4ml_dist.run import Run, RunConfig, launcher_run_id, resolve_run_id
from prov4ml_dist.shard import schema
from prov4ml_dist.topology import Topology, detect, launcher_environment

TORCHRUN = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_RUN_ID": "abc"}


def test_torchrun():
    t = detect(TORCHRUN)
    assert (t.rank, t.local_rank, t.world_size, t.local_world_size, t.node_rank, t.restart_count) == (5, 1, 8, 4, 1, 2)
    assert t.launcher == "torchrun" and t.elastic_run_id == "abc"


def test_srun_torchrun_uses_the_worker_rank_not_slurm_procid():
    env = {**TORCHRUN, "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NODEID": "1",
           "SLURM_NTASKS": "2"}
    t = detect(env)
    assert t.rank == 5 and t.world_size == 8 and t.launcher == "torchrun" and t.job_id == "42"


def test_srun_one_task_per_gpu():
    env = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
           "SLURM_NODEID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    t = detect(env)
    assert (t.rank, t.local_rank, t.node_rank, t.world_size, t.local_world_size) == (6, 2, 1, 8, 4)
    assert t.launcher == "slurm" and t.step_id == "3"


def test_sbatch_batch_script_is_a_single_process():
    env = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NODEID": "0"}
    t = detect(env)
    assert t.world_size == 1 and t.launcher == "single" and t.job_id == "42"


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1"}
    t = detect(env)
    assert (t.rank, t.world_size, t.local_rank, t.node_rank, t.launcher) == (3, 4, 1, 1, "openmpi")


def test_mpich():
    t = detect({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"})
    assert (t.rank, t.world_size, t.local_rank, t.launcher) == (2, 4, 0, "mpich")


def test_single_process():
    t = detect({})
    assert (t.rank, t.world_size, t.launcher) == (0, 1, "single")


@pytest.mark.parametrize("spec,node,expected", [("2(x3),1", 3, 1), ("2(x3),1", 2, 2), ("4", 0, 4), ("bad", 0, 1)])
def test_tasks_per_node(spec, node, expected):
    env = {"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NODEID": str(node),
           "SLURM_TASKS_PER_NODE": spec}
    assert detect(env).local_world_size == expected


def test_launcher_environment_keeps_launcher_variables_only():
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_PASSWORD": "x", "RANK": "0", "HOME": "/root", "AWS_SECRET": "s"}
    assert launcher_environment(env) == {"RANK": "0", "SLURM_JOB_ID": "1"}


def test_run_ids_every_rank_derives_alike():
    assert launcher_run_id(detect(TORCHRUN)) == "torchrun-abc"
    assert launcher_run_id(Topology(job_id="42", step_id="3")) == "slurm-42.3"
    assert launcher_run_id(Topology(job_id="42")) == "slurm-42"
    # An array task: its array's name for it (its own SLURM_JOB_ID is another number), and the step.
    array_task = detect({**SLURM_TASK, "SLURM_JOB_ID": "1236", "SLURM_ARRAY_JOB_ID": "1234",
                         "SLURM_ARRAY_TASK_ID": "2"})
    assert (array_task.job_id, array_task.array_id, launcher_run_id(array_task)) == ("1236", "1234_2", "slurm-1234_2.0")
    assert launcher_run_id(Topology(elastic_run_id="none")) is None  # torchrun's default is not unique


def test_explicit_run_id_wins_and_single_process_gets_a_fresh_one():
    assert resolve_run_id(RunConfig(run_id="mine"), detect(TORCHRUN)) == "mine"
    a, b = resolve_run_id(RunConfig(), Topology()), resolve_run_id(RunConfig(), Topology())
    assert a != b


@pytest.mark.parametrize("run_id", ["a\nb", "../up", "a/b", "..", ""])
def test_run_id_must_be_a_safe_directory_name(run_id):
    with pytest.raises(ValueError):
        resolve_run_id(RunConfig(run_id=run_id), Topology())


def test_srun_recipe_that_sets_rank_variables_keeps_slurms_tasks_per_node():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0",
           "SLURM_PROCID": "3", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    t = detect(env)
    assert (t.rank, t.local_world_size, t.node_rank, t.launcher) == (3, 2, 1, "env")


def test_launcher_environment_keeps_the_container_and_communication_settings_but_no_secret():
    env = {"APPTAINER_CONTAINER": "/images/train.sif", "APPTAINER_NAME": "train.sif", "SINGULARITY_NAME": "old.sif",
           "NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
           "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "MPI_LOCALNRANKS": "4",
           "APPTAINER_DOCKER_PASSWORD": "x", "SINGULARITY_DOCKER_PASSWORD": "x", "NCCL_TOKEN": "x",
           "APPTAINERENV_API_KEY": "x", "PATH": "/usr/bin"}
    assert launcher_environment(env) == {k: v for k, v in env.items() if v != "x" and k != "PATH"}


def test_launcher_environment_keeps_slurmd_nodename_but_not_the_copied_hostname():
    env = {"SLURMD_NODENAME": "n2", "HOSTNAME": "batch-node", "SLURM_JOB_ID": "9"}
    assert launcher_environment(env) == {"SLURMD_NODENAME": "n2", "SLURM_JOB_ID": "9"}


# -- a requeued Slurm job: SLURM_RESTART_COUNT is an attempt, as a torchrun restart is ---------

SLURM_TASK = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0", "SLURM_NTASKS": "1"}


def test_slurm_requeue_count_numbers_the_attempt_with_torchruns_restarts():
    assert (detect(SLURM_TASK).attempt, detect({**SLURM_TASK, "SLURM_RESTART_COUNT": "2"}).attempt) == (0, 2000)
    # srun torchrun, requeued once, then restarted twice by torchrun: neither count hides the other.
    t = detect({**TORCHRUN, **SLURM_TASK, "SLURM_RESTART_COUNT": "1"})
    assert (t.requeue_count, t.restart_count, t.attempt) == (1, 2, 1002)
    assert detect({"SLURM_RESTART_COUNT": "3"}).requeue_count == 0  # not in a Slurm job: not Slurm's
    assert [schema.shard_name(3, a) for a in (0, 2, 1000, 1002)] == [
        "rank-00003.h5", "rank-00003.restart-2.h5", "rank-00003.requeue-1.h5", "rank-00003.requeue-1.restart-2.h5"]


def test_torchrun_restarts_beyond_the_stride_are_refused_clearly(tmp_path):
    topology = detect({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": str(schema.RESTARTS_PER_REQUEUE)})
    with pytest.raises(RunStateError, match="restart count 1000"):
        Run(RunConfig(experiment_name="e", provenance_save_dir=tmp_path, run_id="r", sample_interval=None), topology)


def test_a_requeued_job_keeps_both_attempts_and_the_merge_shows_them(tmp_path):
    """The requeued job has the same SLURM_JOB_ID, hence the same run id: its rank used to
    fail at start_run on the first attempt's shard. Now each attempt has its own shard and
    the requeued run's merge holds both, in merged.h5 and in prov.json."""
    for env in (SLURM_TASK, {**SLURM_TASK, "SLURM_RESTART_COUNT": "1"}):
        run = Run(RunConfig(experiment_name="e", provenance_save_dir=tmp_path, sample_interval=None), detect(env))
        run.log_metric("loss", float(len(env)), Context.TRAINING, step=0)
        prov_json = run.end()
    assert run.run_dir == tmp_path / "e" / "slurm-77.0" and prov_json == run.run_dir / "prov.json"
    assert sorted(p.name for p in (run.run_dir / "shards").iterdir()) == ["rank-00000.h5", "rank-00000.requeue-1.h5"]
    merged = load_merged(run.run_dir / "merged.h5")
    assert [(r.rank, r.attempt, r.status) for r in merged.ranks] == [(0, 0, "ok"), (0, 1000, "ok")]
    doc = ProvDocument.deserialize(str(prov_json), format="json")
    processes = [_texts(a) for a in doc.get_records(ProvActivity)
                 if any(t.localpart == "RankProcess" for t in a.get_asserted_types())]
    assert sorted((p["attempt"], p["shard"], p["status"]) for p in processes) == [
        ("0", "rank-00000.h5", "ok"), ("1000", "rank-00000.requeue-1.h5", "ok")], processes
    (agent,) = [a for a in doc.get_records(ProvAgent) if PROV["SoftwareAgent"] in a.get_asserted_types()]
    assert (_texts(agent)["restart_count"], _texts(agent)["requeue_count"]) == ("0", "1")
    # summary names the attempt as its shard does, never by the packed number 1000
    text = subprocess.run([sys.executable, "-m", "prov4ml_dist", "summary", str(run.run_dir)], capture_output=True,
                          text=True, check=True).stdout
    loss_rows = [line.split() for line in text.splitlines() if line.split()[:1] == ["loss"]]
    assert [row[2:4] for row in loss_rows] == [["0", "1"], ["0", "requeue-1"]], text
    assert "1000" not in text


def _texts(record) -> dict[str, str]:
    """A PROV record's attributes by local name, as text (typed literals too)."""
    return {k.localpart: str(getattr(v, "value", v)) for k, v in record.attributes}


# -- every launcher combination: the rank is the launcher's that started the process -----------

JOB = {"SLURM_JOB_ID": "42", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "2"}
# The batch script's environment (no step): what mpirun's own node gives its ranks.
BATCH = {**JOB, "SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8"}


def _step(procid: int, ntasks: int, node: int, step: str = "0") -> dict[str, str]:
    """A task of a Slurm step: ``ntasks`` tasks, this one ``procid`` on node ``node``."""
    return {**JOB, "SLURM_STEP_ID": step, "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
            "SLURM_NODEID": str(node), "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": f"{ntasks // 2}(x2)"}


def _ompi(rank: int, local: int, node: int) -> dict[str, str]:
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": str(node), "PMIX_RANK": str(rank)}


def _hydra(rank: int, local: int) -> dict[str, str]:
    return {"PMI_RANK": str(rank), "PMI_SIZE": "8", "MPI_LOCALRANKID": str(local), "MPI_LOCALNRANKS": "4",
            "PMI_FD": "5"}


# name -> (environment, (rank, world size, local rank, local world size, node rank, launcher, step))
LAUNCHERS = {
    "torchrun": (TORCHRUN, (5, 8, 1, 4, 1, "torchrun", None)),
    "srun": ({**_step(6, 8, 1), "SLURM_LOCALID": "2"}, (6, 8, 2, 4, 1, "slurm", "0")),
    "srun+torchrun": ({**_step(1, 2, 1), **TORCHRUN}, (5, 8, 1, 4, 1, "torchrun", "0")),
    # Open MPI's mpirun in an allocation: orted started by `srun` on the other nodes (a step
    # of 1 daemon there), ranks on mpirun's own node straight from the batch script.
    "mpirun (Open MPI), other node": ({**_step(0, 1, 0), **_ompi(6, 2, 1)}, (6, 8, 2, 4, 1, "openmpi", None)),
    "mpirun (Open MPI), mpirun's node": ({**BATCH, **_ompi(1, 1, 0)}, (1, 8, 1, 4, 0, "openmpi", None)),
    # MPICH's Hydra: one hydra_pmi_proxy per node, all in one srun step of 2 tasks.
    "mpiexec (Hydra) in allocation": ({**_step(1, 2, 1), **_hydra(6, 2)}, (6, 8, 2, 4, 1, "mpich", None)),
    "mpiexec (Hydra), rank = proxy's procid": ({**_step(1, 2, 1), **_hydra(1, 1)}, (1, 8, 1, 4, 1, "mpich", None)),
    "mpiexec, no Slurm": (_hydra(3, 3), (3, 8, 3, 4, 0, "mpich", None)),
    # srun starts the MPI ranks itself: PMI's numbering is Slurm's; the step is the ranks'.
    "srun --mpi=pmi2": ({**_step(6, 8, 1), "SLURM_LOCALID": "2", "PMI_RANK": "6", "PMI_SIZE": "8", "PMI_FD": "7"},
                        (6, 8, 2, 4, 1, "slurm", "0")),
    "srun --mpi=pmix": ({**_step(6, 8, 1), "SLURM_LOCALID": "2", "PMIX_RANK": "6"}, (6, 8, 2, 4, 1, "slurm", "0")),
    # A script under mpirun that exports RANK/LOCAL_RANK itself for torch.distributed.
    "mpirun + RANK set by the script": ({**_step(0, 1, 0), **_ompi(6, 2, 1), "RANK": "6", "LOCAL_RANK": "2",
                                         "WORLD_SIZE": "8"}, (6, 8, 2, 4, 1, "env", None)),
}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_combination(name):
    env, expected = LAUNCHERS[name]
    t = detect(env)
    assert (t.rank, t.world_size, t.local_rank, t.local_world_size, t.node_rank, t.launcher, t.step_id) == expected
    assert t.job_id == (env.get("SLURM_JOB_ID"))


@pytest.mark.parametrize("nodes", [
    # Open MPI, 2 nodes x 4: ranks 0-3 forked by mpirun in the batch script, 4-7 by orted.
    [{**BATCH, **_ompi(r, r, 0)} for r in range(4)] + [{**_step(0, 1, 0), **_ompi(r, r - 4, 1)} for r in range(4, 8)],
    # Hydra, 2 nodes x 4: every rank under a proxy of the same step.
    [{**_step(r // 4, 2, r // 4), **_hydra(r, r % 4)} for r in range(8)],
], ids=["openmpi", "hydra"])
def test_mpirun_in_an_allocation_gives_every_rank_its_own_shard_in_one_run(nodes):
    """Before: Open MPI rank 6 of 8 was Slurm task 0 of 1; ranks on one node shared a shard
    name, and the ranks on mpirun's node (no step) got another run id than the others."""
    topologies = [detect(env) for env in nodes]
    assert sorted((t.rank, t.node_rank, t.local_rank) for t in topologies) == [(r, r // 4, r % 4) for r in range(8)]
    assert {(t.world_size, launcher_run_id(t)) for t in topologies} == {(8, "slurm-42")}


# -- the code's git state: `git status` once per node ------------------------------------------

def test_git_status_runs_on_local_rank_0_only(tmp_path, monkeypatch):
    """`git status` stats every tracked file; at a thousand ranks on Lustre that was a metadata
    storm. A logging `git` on PATH (which runs the real one) shows who calls what."""
    repo, log, bin_dir = tmp_path / "repo", tmp_path / "git.log", tmp_path / "bin"
    repo.mkdir()
    bin_dir.mkdir()
    real_git = shutil.which("git")
    if real_git is None:
        pytest.skip("no git")
    for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                                  "-m", "x"]):
        subprocess.run([real_git, *args], cwd=repo, check=True)
    (repo / "train.py").write_text("print()\n")
    subprocess.run([real_git, "add", "train.py"], cwd=repo, check=True)  # staged: a dirty tree
    (bin_dir / "git").write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec {real_git} "$@"\n')
    (bin_dir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(sys, "argv", [str(repo / "train.py")])
    ranks = {local_rank: environment.capture(local_rank)["git"] for local_rank in (1, 0)}
    assert log.read_text().split().count("status") == 1
    assert (ranks[0]["dirty"], ranks[1]["dirty"], ranks[1]["dirty_checked_by"]) == (True, None, "local rank 0")
    assert ranks[0]["commit"] == ranks[1]["commit"] and len(ranks[0]["commit"]) == 40
