"""A real Slurm cluster on this machine (slurm/testing/start-cluster.sh), and the sbatch
templates in slurm/ run on it.

The cluster: munged, slurmctld and one slurmd per emulated node (2 nodes x 2 CPUs and
2 fake GPUs by default), all local, state under $PROV4ML_SLURM_DIR (/tmp/prov4ml-slurm).
The session fixture ``slurm_cluster`` starts it (installing Slurm with apt when missing)
and skips only when the start script says Slurm cannot be installed here (exit 77); under
CI (``CI`` set) that is a failure instead. It stops the cluster at the end only if this
session started it (and not under xdist, nor with PROV4ML_SLURM_KEEP=1).

The templates (slurm/*.sbatch) run the real examples/train_ddp.py, scaled down to this
cluster with sbatch options (gloo on CPUs, one epoch of a tiny MLP), and the tests check the
provenance the library left: one prov:SoftwareAgent per rank in prov.json with the right rank,
node rank and Slurm job id, one shard per rank, the launcher environment in merged.h5, node-local
shard directories, and a failed job merged afterwards by `prov4ml-dist merge` (template 5).

Helpers for further tests:
  * ``slurm_cluster.submit(template, workdir, env=..., sbatch_args=...) -> SlurmJob``
    (job_id, exit_code, stdout, state, output) submits and waits (polling ``scontrol show
    job`` every 0.25 s: ``sbatch --wait`` polls at 2, 10, 42... s, which would triple the
    time of these tests; test_sbatch_wait checks --wait itself);
  * ``slurm_cluster.wait(job_id)``, ``.run([...])`` (srun, sbatch ... with the cluster's env),
    ``.env(...)``;
  * ``run_template(...)`` / ``read_run(job, run_dir) -> RecordedRun`` (agents, run activity,
    merged.h5 ranks with their launcher environment);
  * ``dist_lines(stdout)``: the records that slurm/dist_check.py prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import pytest
from prov.constants import PROV, XSD_LONG
from prov.model import Literal, ProvActivity, ProvAgent, ProvDocument

from prov4ml_dist.shard import ShardReader

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "slurm"
START = SLURM_DIR / "testing" / "start-cluster.sh"
STOP = SLURM_DIR / "testing" / "stop-cluster.sh"
DIST_CHECK = SLURM_DIR / "dist_check.py"
PYTHON = sys.executable
CANNOT_INSTALL = 77

# Variables of an enclosing launcher (pytest itself may run inside a Slurm job or
# torchrun) that would make srun/sbatch talk about the wrong job.
_LAUNCHER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "TORCHELASTIC_", "PMI_", "PMIX_", "OMPI_",
                      "HYDRA_", "PROV4ML_")
_LAUNCHER_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "MASTER_ADDR", "MASTER_PORT", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "CUDA_VISIBLE_DEVICES")
_KEEP = ("PROV4ML_SLURM_",)  # the cluster's own settings

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


def clean_environ() -> dict[str, str]:
    """os.environ without launcher variables (but with the cluster's PROV4ML_SLURM_* settings)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(_KEEP) or not (k.startswith(_LAUNCHER_PREFIXES) or k in _LAUNCHER_NAMES)}


@dataclass
class SlurmJob:
    job_id: int
    exit_code: int | None  # the batch script's exit status (None if killed by a signal)
    stdout: str  # the job's output file (stdout and stderr)
    state: str  # COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    output: Path


class SlurmCluster:
    """Client side of the test cluster: every command gets SLURM_CONF and a clean environment."""

    def __init__(self, slurm_conf: str, status: str) -> None:
        self.slurm_conf = slurm_conf
        self.status = status

    def env(self, **extra: str) -> dict[str, str]:
        env = clean_environ()
        # UCX_TLS: MPICH's UCX between the emulated nodes (one machine) once failed MPI_Init with
        # "shmat(...) failed: Invalid argument" in its SysV shared-memory transport (an upstream
        # UCX issue, openucx/ucx#8511); its POSIX one serves the same purpose. Test cluster only.
        env.update(SLURM_CONF=self.slurm_conf, PYTHON=PYTHON, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PATH=f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}", UCX_TLS="^sysv")
        env.update(extra)
        return env

    def run(self, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a client command (srun, sbatch, scontrol...) to completion."""
        proc = subprocess.run(args, env=self.env(**(env or {})), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(args)} exited {proc.returncode}\n"
                                 f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
        return proc

    def job_info(self, job_id: int) -> dict[str, str]:
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float = 240) -> tuple[str, int | None]:
        """Wait until the job has ended; (state, exit code). Cancels it on timeout."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in FINISHED:
                code, _, signal = info.get("ExitCode", "0:0").partition(":")
                return state, (int(code) if signal in ("", "0") else None)
            time.sleep(0.25)
        self.run(["scancel", str(job_id)], check=False)
        raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s: {info}")

    def sbatch(self, template: str | Path, workdir: Path, *, env: dict[str, str] | None = None,
               sbatch_args: list[str] | tuple[str, ...] = ()) -> int:
        """sbatch a script (a path, or a name in slurm/), run in ``workdir``; its job id."""
        script = Path(template)
        if not script.is_absolute() and not script.exists():
            script = SLURM_DIR / script
        workdir.mkdir(parents=True, exist_ok=True)
        out = self.run(["sbatch", "--parsable", f"--chdir={workdir}", f"--output={workdir}/slurm-%j.out",
                        *sbatch_args, str(script)], env=env, cwd=workdir).stdout
        return int(out.strip().split(";")[0])

    def submit(self, template: str | Path, workdir: Path, *, env: dict[str, str] | None = None,
               sbatch_args: list[str] | tuple[str, ...] = (), timeout: float = 240) -> SlurmJob:
        """``sbatch``, then wait for the end."""
        job_id = self.sbatch(template, workdir, env=env, sbatch_args=sbatch_args)
        state, code = self.wait(job_id, timeout)
        return self.collect(job_id, workdir, state, code)

    def collect(self, job_id: int, workdir: Path, state: str, code: int | None) -> SlurmJob:
        output = workdir / f"slurm-{job_id}.out"
        for _ in range(20):  # the output file can trail the job state a little
            if output.exists():
                break
            time.sleep(0.1)
        text = output.read_text(errors="replace") if output.exists() else ""
        return SlurmJob(job_id, code, text, state, output)


def dist_lines(stdout: str) -> list[dict]:
    """The records printed by slurm/dist_check.py, sorted by rank."""
    records = [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines()
               if line.startswith("DIST_CHECK ")]
    return sorted(records, key=lambda r: r["rank"])


def _describe(job: SlurmJob) -> str:
    return f"job {job.job_id} {job.state} exit {job.exit_code}; output:\n{job.stdout}"


@contextlib.contextmanager
def explained(*jobs: SlurmJob):
    """Add the jobs' output to any assertion that fails inside."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError("\n".join([str(exc), *map(_describe, jobs)])) from exc


@pytest.fixture(scope="session")
def slurm_cluster():
    try:
        proc = subprocess.run([str(START)], env=clean_environ(), capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"start-cluster.sh did not finish in 900 s:\n{exc.stderr}")
    if proc.returncode == CANNOT_INSTALL:
        reason = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        if os.environ.get("CI"):
            pytest.fail(f"Slurm cannot be installed, and CI needs it: {reason}")
        pytest.skip(f"Slurm cannot be installed here: {reason}")
    if proc.returncode != 0:
        pytest.fail(f"start-cluster.sh exited {proc.returncode}:\n{proc.stderr}")
    values = dict(re.findall(r"^export (\w+)='?([^'\n]*)'?$", proc.stdout, re.M))
    cluster = SlurmCluster(values["SLURM_CONF"], values.get("PROV4ML_SLURM_STATUS", "?"))
    yield cluster
    if (cluster.status == "started" and not os.environ.get("PROV4ML_SLURM_KEEP")
            and not os.environ.get("PYTEST_XDIST_WORKER")):
        subprocess.run([str(STOP)], env=clean_environ(), capture_output=True, timeout=120)


# ----------------------------------------------------------------------------- cluster --

def test_start_is_idempotent(slurm_cluster):
    t0 = time.monotonic()
    proc = subprocess.run([str(START)], env=clean_environ(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "export PROV4ML_SLURM_STATUS=already-up" in proc.stdout, proc.stderr
    assert time.monotonic() - t0 < 10


def test_srun_two_nodes(slurm_cluster):
    out = slurm_cluster.run(["srun", "-N2", "-n2", "--label", "env"]).stdout
    tasks: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        label, _, var = line.partition(": ")
        name, _, value = var.partition("=")
        tasks.setdefault(label.strip(), {})[name] = value
    assert len(tasks) == 2, out
    assert sorted(t["SLURM_NODEID"] for t in tasks.values()) == ["0", "1"]
    assert sorted(t["SLURM_PROCID"] for t in tasks.values()) == ["0", "1"]
    assert len({t["SLURMD_NODENAME"] for t in tasks.values()}) == 2


def test_sbatch_wait(slurm_cluster, tmp_path):
    ok = slurm_cluster.run(["sbatch", "--wait", "--parsable", f"--output={tmp_path}/ok.out",
                            "--wrap", "echo hello from job $SLURM_JOB_ID on $SLURMD_NODENAME"], cwd=tmp_path)
    job_id = ok.stdout.strip().split(";")[0]
    assert f"hello from job {job_id} on " in (tmp_path / "ok.out").read_text()
    # `sbatch --wait` returns the job's exit status.
    bad = slurm_cluster.run(["sbatch", "--wait", f"--output={tmp_path}/bad.out", "--wrap", "exit 3"],
                            cwd=tmp_path, check=False)
    assert bad.returncode == 3, bad.stderr


def test_srun_mpi_pmi2(slurm_cluster):
    code = ("from mpi4py import MPI; import os; c = MPI.COMM_WORLD; "
            "print(c.Get_rank(), c.Get_size(), os.environ['SLURMD_NODENAME'], c.allreduce(c.Get_rank() + 1))")
    out = slurm_cluster.run(["srun", "--mpi=pmi2", "-N2", "-n2", PYTHON, "-c", code]).stdout
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    assert [r[:2] for r in rows] == [["0", "2"], ["1", "2"]], out
    assert rows[0][2] != rows[1][2]  # one rank per node
    assert [r[3] for r in rows] == ["3", "3"]


def test_srun_torchrun_two_nodes_inline(slurm_cluster, tmp_path):
    """Template 2's shape, inline: SLURM_PROCID numbers the torchruns, not the workers."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "t = torch.tensor([dist.get_rank() + 1.0]); dist.all_reduce(t)\n"
        "os.write(1, f\"W RANK={os.environ['RANK']} WORLD_SIZE={os.environ['WORLD_SIZE']} "
        "SLURM_PROCID={os.environ['SLURM_PROCID']} SUM={int(t.item())}\\n\".encode())\n"
        "dist.destroy_process_group()\n")
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
        # As the template: a port free on the first node (another cluster on this machine may
        # have a job of the same id), hosted by the first node's torchrun only.
        "PORT=$($PYTHON -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); print(s.getsockname()[1])')\n"
        "srun --ntasks-per-node=1 bash -c \"$PYTHON -m torch.distributed.run --nnodes=\\$SLURM_NNODES "
        "--node_rank=\\$SLURM_NODEID --nproc_per_node=2 --rdzv_backend=c10d "
        "--rdzv_conf=is_host=\\$([ \\$SLURM_NODEID = 0 ] && echo true || echo false) "
        f"--rdzv_endpoint=$MASTER_ADDR:$PORT --rdzv_id=\\$SLURM_JOB_ID {worker}\"\n")
    job = slurm_cluster.submit(script, tmp_path, sbatch_args=["-N2", "--ntasks-per-node=1", "--cpus-per-task=2"])
    assert job.exit_code == 0, _describe(job)
    rows = [dict(kv.split("=") for kv in line.split()[1:]) for line in job.stdout.splitlines()
            if line.startswith("W ")]
    assert sorted(int(r["RANK"]) for r in rows) == [0, 1, 2, 3], job.stdout
    assert {r["WORLD_SIZE"] for r in rows} == {"4"} and {r["SUM"] for r in rows} == {"10"}
    assert sorted(r["SLURM_PROCID"] for r in rows) == ["0", "0", "1", "1"]
    assert any(r["SLURM_PROCID"] != r["RANK"] for r in rows)


# --------------------------------------------------------------------------- templates --
# Every template runs the real examples/train_ddp.py (tiny MLP, gloo, one epoch) on the
# cluster, scaled down from the #SBATCH lines by sbatch options; the tests read what the
# library recorded: prov.json (one prov:SoftwareAgent per rank), merged.h5 (the ranks'
# start records with the launcher environment) and the shards. One job per template, shared
# by the tests on it (module-scoped fixtures).

TRAIN_SCRIPT = REPO / "examples" / "train_ddp.py"
# LAUNCH_PREFIX of the template tests: several words (as "apptainer exec --nv img.sif" is;
# there is no Apptainer here), setting what Apptainer sets in a container.
CONTAINER = "env APPTAINER_CONTAINER=/images/train.sif APPTAINER_NAME=train.sif"
TRAIN_ARGS = "--epochs 1 --samples 512 --sample-interval 0.5"
NODES = ["p4ml-n1", "p4ml-n2"]  # the emulated nodes (PROV4ML_SLURM_NODE_PREFIX p4ml-n)


@dataclass
class RecordedRun:
    """A training job and the provenance it left."""

    job: SlurmJob
    run_dir: Path
    agents: dict[int, dict[str, Any]]  # rank -> the p4d attributes of its prov:SoftwareAgent
    run: dict[str, Any]  # the p4d attributes of the run activity
    processes: dict[int, dict[str, Any]]  # rank -> its rank-process activity (first attempt)
    ranks: dict[int, dict[str, Any]]  # rank -> merged.h5 /ranks row, 'start' and 'end' parsed
    prov_text: str

    def launcher_env(self, rank: int) -> dict[str, str]:
        return self.ranks[rank]["start"]["environment"]["launcher_env"]

    def node_of(self, rank: int) -> str:
        """The Slurm node the rank ran on (slurmd sets SLURMD_NODENAME in every task)."""
        return self.launcher_env(rank)["SLURMD_NODENAME"]

    def shard_names(self) -> list[str]:
        return sorted(p.name for p in (self.run_dir / "shards").glob("rank-*.h5"))


def _value(value: Any) -> Any:
    """A PROV attribute value as Python: xsd:long -> int, other literals -> their text."""
    if isinstance(value, Literal):
        return int(value.value) if value.datatype == XSD_LONG else value.value
    return value


def _p4d(record: Any) -> dict[str, Any]:
    """p4d attributes; one repeated (a set of values, e.g. incomplete_ranks) becomes a sorted list."""
    found: dict[str, Any] = {}
    for k, v in record.attributes:
        if k.namespace.prefix == "p4d":
            found.setdefault(k.localpart, []).append(_value(v))
    return {k: v[0] if len(v) == 1 else sorted(v) for k, v in found.items()}


def _many(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def read_run(job: SlurmJob, run_dir: Path) -> RecordedRun:
    """Parse prov.json (with the prov package) and merged.h5 of a run directory."""
    assert (run_dir / "prov.json").is_file(), f"no prov.json in {run_dir}\n{_describe(job)}"
    doc = ProvDocument.deserialize(str(run_dir / "prov.json"), format="json")
    agents: dict[int, dict[str, Any]] = {}
    for agent in doc.get_records(ProvAgent):
        if PROV["SoftwareAgent"] in agent.get_asserted_types():
            attrs = _p4d(agent)
            assert attrs["rank"] not in agents, f"two agents for rank {attrs['rank']}"
            agents[attrs["rank"]] = attrs
    run: dict[str, Any] = {}
    processes: dict[int, dict[str, Any]] = {}
    for activity in doc.get_records(ProvActivity):
        types = activity.get_asserted_types()
        if any(t.localpart == "Run" for t in types):
            run = _p4d(activity)
        elif any(t.localpart == "RankProcess" for t in types):
            attrs = _p4d(activity)
            processes.setdefault(attrs["rank"], attrs)
    ranks: dict[int, dict[str, Any]] = {}
    with h5py.File(run_dir / "merged.h5", "r") as merged:
        table = merged["ranks"][:]
    for row in table:
        rec = {name: row[name].decode() if isinstance(row[name], bytes) else row[name] for name in table.dtype.names}
        rec["start"] = json.loads(rec["start"]) if rec["start"] else {}
        rec["end"] = json.loads(rec["end"]) if rec["end"] else {}
        ranks[int(rec["rank"])] = rec
    return RecordedRun(job, run_dir, agents, run, processes, ranks, (run_dir / "prov.json").read_text())


def check_ranks(rec: RecordedRun, world_size: int) -> None:
    """One agent, one shard and one merged.h5 row per rank 0..N-1; the job id on every agent."""
    expected = list(range(world_size))
    assert sorted(rec.agents) == expected, rec.agents  # the dict would have caught duplicates
    assert rec.run["world_size"] == world_size
    assert rec.shard_names() == [f"rank-{r:05d}.h5" for r in expected]
    assert sorted(rec.ranks) == expected
    assert [rec.ranks[r]["shard"] for r in expected] == [f"rank-{r:05d}.h5" for r in expected]
    for rank, agent in rec.agents.items():
        assert agent["job_id"] == str(rec.job.job_id), agent
        assert agent["world_size"] == world_size
        assert agent["hostname"] == socket.gethostname()  # every emulated node is this machine
        topo = rec.ranks[rank]["start"]["topology"]
        assert (topo["rank"], topo["job_id"]) == (rank, str(rec.job.job_id))
        env = rec.launcher_env(rank)
        assert env["SLURM_JOB_ID"] == str(rec.job.job_id)
        assert env["SLURM_CLUSTER_NAME"] == "prov4ml"
        # The rank's own node; not HOSTNAME, which Slurm sets to the batch node and srun
        # copies to every task.
        assert env["SLURMD_NODENAME"] == env["SLURM_TOPOLOGY_ADDR"] in NODES
        assert "HOSTNAME" not in env
    # The allocation, in the run activity (as rank 0's environment had it).
    assert rec.run["slurm_job_id"] == str(rec.job.job_id)
    assert rec.run["slurm_cluster_name"] == "prov4ml" and rec.run["slurm_job_partition"] == "debug"


def check_complete(rec: RecordedRun) -> None:
    assert all(a["status"] == "complete" for a in rec.agents.values()), rec.agents
    assert "incomplete_ranks" not in rec.run and "missing_ranks" not in rec.run, rec.run
    assert rec.run["problems"] == 0, rec.run


def check_two_nodes(rec: RecordedRun, per_node: int) -> dict[int, str]:
    """Node ranks 0 and 1 with ``per_node`` ranks each, each node rank on one Slurm node of
    its own, local ranks 0..per_node-1 on each; returns node rank -> Slurm node name."""
    node_of: dict[int, set[str]] = {}
    for rank, agent in rec.agents.items():
        node_of.setdefault(agent["node_rank"], set()).add(rec.node_of(rank))
        assert rec.ranks[rank]["node_rank"] == agent["node_rank"]
    assert sorted(node_of) == [0, 1], rec.agents
    assert all(len(names) == 1 for names in node_of.values()), node_of
    names = {n: next(iter(s)) for n, s in node_of.items()}
    assert sorted(names.values()) == NODES, names
    for node_rank in (0, 1):
        local = sorted(a["local_rank"] for a in rec.agents.values() if a["node_rank"] == node_rank)
        assert local == list(range(per_node)), rec.agents
    return names


def default_run_id(template: str | Path, job_id: int | str) -> str:
    """The templates' run id: the srun templates add the step (the first, 0, here)."""
    return f"slurm-{job_id}" if template == "torchrun-single-node.sbatch" else f"slurm-{job_id}.0"


def run_template(cluster: SlurmCluster, template: str | Path, workdir: Path, sbatch_args: list[str],
                 **env: str) -> RecordedRun:
    env.setdefault("TRAIN_SCRIPT", str(TRAIN_SCRIPT))
    env.setdefault("TRAIN_ARGS", TRAIN_ARGS)
    env.setdefault("PROV4ML_PROV_DIR", str(workdir / "prov"))
    env.setdefault("PROV4ML_EXPERIMENT", "exp")
    job = cluster.submit(template, workdir, env=env, sbatch_args=sbatch_args)
    assert job.state == "COMPLETED" and job.exit_code == 0, _describe(job)
    assert "stage-out" not in job.stdout, _describe(job)  # no failed copy from a node-local directory
    run_dir = Path(env["PROV4ML_PROV_DIR"]) / env["PROV4ML_EXPERIMENT"] / default_run_id(template, job.job_id)
    assert f"merged provenance: {run_dir / 'prov.json'}" in job.stdout, _describe(job)  # rank 0 merged online
    rec = read_run(job, run_dir)
    if "LAUNCH_PREFIX" in env:  # PYTHON ran under it, so every rank recorded its "container"
        assert {(rec.launcher_env(r)["APPTAINER_CONTAINER"], rec.launcher_env(r)["APPTAINER_NAME"])
                for r in rec.agents} == {("/images/train.sif", "train.sif")}, _describe(job)
    return rec


# -- template 1: one node, torchrun --standalone ---------------------------------------------

@pytest.fixture(scope="module")
def single_node_run(slurm_cluster, tmp_path_factory):
    return run_template(slurm_cluster, "torchrun-single-node.sbatch", tmp_path_factory.mktemp("t1"),
                        ["--gpus-per-node=2", "--cpus-per-task=2"], LAUNCH_PREFIX=CONTAINER)


def test_template_torchrun_single_node(single_node_run):
    rec = single_node_run
    check_ranks(rec, 2)  # NPROC_PER_NODE from the 2 (fake) GPUs
    check_complete(rec)
    assert {(a["node_rank"], a["launcher"], a["local_world_size"]) for a in rec.agents.values()} == {
        (0, "torchrun", 2)}
    assert sorted(a["local_rank"] for a in rec.agents.values()) == [0, 1]
    # torchrun --standalone: a random rendezvous id, the template's run id instead.
    assert rec.run["run_id"] == f"slurm-{rec.job.job_id}"
    assert len({a["elastic_run_id"] for a in rec.agents.values()}) == 1
    # The batch script is not a step: no step id (sacct calls it <job>.batch).
    assert all("step_id" not in a for a in rec.agents.values())
    for rank in (0, 1):
        env = rec.launcher_env(rank)
        assert env["RANK"] == str(rank) and env["SLURM_PROCID"] == "0"
        assert (env["SLURM_JOB_NODELIST"], env["SLURM_JOB_NUM_NODES"], env["SLURM_GPUS_ON_NODE"],
                env["SLURM_CPUS_PER_TASK"]) == (rec.node_of(rank), "1", "2", "2")
        assert rec.node_of(rank) in NODES


# -- template 2: srun one torchrun per node, c10d; shards on "node-local" disks -----------------

@pytest.fixture(scope="module")
def multi_node_run(slurm_cluster, tmp_path_factory):
    """Shards and artifacts on per-node directories (%N -> the node's name): both emulated
    nodes share this machine's disk, so that is what keeps each node's files to itself."""
    work = tmp_path_factory.mktemp("t2")
    return run_template(slurm_cluster, "torchrun-multi-node.sbatch", work,
                        ["--nodes=2", "--gpus-per-node=2", "--cpus-per-task=2"],
                        PROV4ML_LOCAL_DIR=str(work / "local-%N"), LAUNCH_PREFIX=CONTAINER)


def test_template_torchrun_multi_node(multi_node_run):
    rec = multi_node_run
    check_ranks(rec, 4)
    check_complete(rec)
    check_two_nodes(rec, per_node=2)
    assert {(a["launcher"], a["step_id"], a["elastic_run_id"], a["local_world_size"])
            for a in rec.agents.values()} == {("torchrun", "0", f"{rec.job.job_id}.0", 2)}  # one rendezvous per step
    # srun numbers the torchruns, not the workers: SLURM_PROCID is 0 or 1, the ranks 0..3.
    procids = {r: rec.launcher_env(r)["SLURM_PROCID"] for r in rec.agents}
    assert sorted(procids.values()) == ["0", "0", "1", "1"]
    assert any(p != str(r) for r, p in procids.items())
    for rank in rec.agents:
        env = rec.launcher_env(rank)
        assert (env["RANK"], env["WORLD_SIZE"], env["TORCHELASTIC_RUN_ID"]) == (str(rank), "4", f"{rec.job.job_id}.0")
        # The job's allocation as Slurm gave it, in every rank's record.
        assert (env["SLURM_STEP_ID"], env["SLURM_JOB_NODELIST"], env["SLURM_JOB_NUM_NODES"],
                env["SLURM_GPUS_PER_NODE"], env["SLURM_CPUS_PER_TASK"], env["SLURM_JOB_PARTITION"]) == (
            "0", "p4ml-n[1-2]", "2", "2", "2", "debug")
    # ... and the request in the PROV itself, on the run activity.
    assert (rec.run["slurm_job_nodelist"], rec.run["slurm_job_num_nodes"], rec.run["slurm_gpus_per_node"],
            rec.run["slurm_cpus_per_task"], rec.run["slurm_ntasks"]) == ("p4ml-n[1-2]", "2", "2", "2", "2")
    # The rendezvous port (torchrun gives its workers a MASTER_PORT of its own).
    check_picked_port(rec, int(re.search(r"rendezvous p4ml-n1:(\d+),", rec.job.stdout).group(1)))


def check_picked_port(rec: RecordedRun, port: int) -> None:
    """The template picked a free port below the ephemeral range, not torch's default, nor
    the job-id formula that put jobs 20,000 apart on one port (and 36 % into that range)."""
    assert 15000 <= port < 32768 and port not in (29500, 20000 + rec.job.job_id % 20000)


def test_node_local_dirs_streamed_to_rank0(multi_node_run):
    """Each node kept its ranks' files in its own directory; rank 0 merged online anyway,
    because the other ranks streamed their files to it (before the template's stage-out)."""
    rec = multi_node_run
    work = rec.run_dir.parents[2]
    run_rel = rec.run_dir.relative_to(work / "prov")
    for node in NODES:
        local = work / f"local-{node}" / run_rel
        on_node = sorted(r for r in rec.agents if rec.node_of(r) == node)
        assert sorted(p.name for p in (local / "shards").iterdir()) == [f"rank-{r:05d}.h5" for r in on_node]
        assert sorted(p.name for p in (local / "artifacts").iterdir()) == [f"rank-{r:05d}" for r in on_node]
        for rank in on_node:  # the run directory holds the same bytes
            name = f"shards/rank-{rank:05d}.h5"
            assert (local / name).read_bytes() == (rec.run_dir / name).read_bytes()
    report = json.loads((rec.run_dir / "aggregate.json").read_text())
    assert (report["transport"], report["ranks"], report["missing"], report["problems"]) == (
        "torch_dist", [0, 1, 2, 3], {}, [])
    assert report["files_present"] == 0  # nothing of any rank was in the shared run directory
    assert report["files_streamed"] >= 3  # at least the shards of ranks 1, 2, 3
    assert report["bytes_streamed"] > 0
    settings = {rec.ranks[r]["start"]["settings"]["local_dir"] for r in rec.agents}
    assert settings == {str(work / f"local-{n}") for n in NODES}


# -- template 3: srun, one task per GPU (CPU here), no torchrun ----------------------------------

@pytest.fixture(scope="module")
def srun_run(slurm_cluster, tmp_path_factory):
    return run_template(slurm_cluster, "srun-per-gpu.sbatch", tmp_path_factory.mktemp("t3"),
                        ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
                        LAUNCH_PREFIX=CONTAINER)


def test_template_srun_per_gpu(srun_run):
    rec = srun_run
    check_ranks(rec, 4)
    check_complete(rec)
    names = check_two_nodes(rec, per_node=2)
    for rank, agent in rec.agents.items():
        env = rec.launcher_env(rank)
        # Slurm's task numbering is the rank: train_ddp copies it into RANK/LOCAL_RANK.
        assert (env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NODEID"]) == (
            str(rank), str(agent["local_rank"]), str(agent["node_rank"]))
        assert names[agent["node_rank"]] == NODES[agent["node_rank"]]
        # train_ddp sets RANK/LOCAL_RANK itself: launcher "env", tasks per node from Slurm.
        assert (agent["launcher"], agent["step_id"], agent["local_world_size"]) == ("env", "0", 2)
        assert (env["SLURM_NTASKS"], env["SLURM_STEP_NUM_TASKS"], env["SLURM_TASKS_PER_NODE"],
                env["SLURM_CPUS_PER_TASK"], env["SLURM_JOB_NODELIST"]) == ("4", "4", "2(x2)", "1", "p4ml-n[1-2]")
    (port,) = {int(rec.launcher_env(r)["MASTER_PORT"]) for r in rec.agents}
    check_picked_port(rec, port)


# -- template 4: MPI (srun --mpi=pmi2, mpi4py) ----------------------------------------------------

@pytest.fixture(scope="module")
def mpi_run(slurm_cluster, tmp_path_factory):
    return run_template(slurm_cluster, "mpi.sbatch", tmp_path_factory.mktemp("t4"),
                        ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"])


def test_template_mpi(mpi_run):
    """train_ddp's MPI path (no MASTER_ADDR: weights averaged with mpi4py, no process group);
    the library sees Slurm tasks and gathers over MPI."""
    rec = mpi_run
    check_ranks(rec, 4)
    check_complete(rec)
    check_two_nodes(rec, per_node=2)
    for rank, agent in rec.agents.items():
        env = rec.launcher_env(rank)
        assert (agent["launcher"], agent["step_id"], agent["local_world_size"]) == ("slurm", "0", 2)
        assert (env["SLURM_PROCID"], env["PMI_RANK"], env["PMI_SIZE"]) == (str(rank), str(rank), "4")
        assert "MASTER_ADDR" not in env and "RANK" not in env
    assert json.loads((rec.run_dir / "aggregate.json").read_text())["transport"] == "mpi"


def test_dist_check_mpi_with_torch_store(slurm_cluster, tmp_path):
    """slurm/dist_check.py --mpi on template 4 with TORCH_DIST_STORE=1: MPI ranks and a
    torch.distributed process group over the exported MASTER_ADDR/MASTER_PORT agree."""
    job = slurm_cluster.submit("mpi.sbatch", tmp_path,
                               env={"TRAIN_SCRIPT": str(DIST_CHECK), "TRAIN_ARGS": "--mpi", "TORCH_DIST_STORE": "1",
                                    "PROV4ML_PROV_DIR": str(tmp_path / "prov")},
                               sbatch_args=["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2",
                                            "--cpus-per-task=1"])
    assert job.exit_code == 0, _describe(job)
    recs = dist_lines(job.stdout)
    assert [r["rank"] for r in recs] == [0, 1, 2, 3], job.stdout
    assert all(r["launcher"] == "mpi" and r["ok"] and r["mpi_sum"] == 10 and r["torch_sum"] == 10 for r in recs)
    assert "MPICH" in recs[0]["mpi_library"]
    assert len({r["env"]["SLURMD_NODENAME"] for r in recs}) == 2
    assert {r["env"]["MASTER_ADDR"] for r in recs} == {"p4ml-n1"}


# -- template 5: a failed training job, then `prov4ml-dist merge` in an afterany job --------------

@pytest.mark.parametrize("node_local", [False, True], ids=["shared-dir", "node-local"])
def test_template_merge_after_failed_job(slurm_cluster, tmp_path, node_local):
    """Rank 1 exits (status 3) without end_run; srun's --kill-on-bad-exit ends rank 0 while
    it waits for rank 1 in the online merge. The afterany job runs the real
    `prov4ml-dist merge`: prov.json has both ranks, rank 1 incomplete. Node-local: only the
    template's stage-out brings the shards into the run directory (no rank streamed any)."""
    env = {"TRAIN_SCRIPT": str(TRAIN_SCRIPT), "TRAIN_ARGS": f"{TRAIN_ARGS} --exit-before-end-rank 1",
           "PROV4ML_PROV_DIR": str(tmp_path / "prov"), "PROV4ML_EXPERIMENT": "exp5",
           "MERGE_SBATCH_ARGS": f"--chdir={tmp_path} --output={tmp_path}/slurm-%j.out"}
    if node_local:
        env["PROV4ML_LOCAL_DIR"] = str(tmp_path / "local-%N")
    out = slurm_cluster.run([str(SLURM_DIR / "submit-with-merge.sh"), str(SLURM_DIR / "srun-per-gpu.sbatch"),
                             "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
                             f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out"], env=env, cwd=tmp_path).stdout
    train_id, merge_id = (int(x) for x in out.split())
    merge = slurm_cluster.collect(merge_id, tmp_path, *slurm_cluster.wait(merge_id))
    train = slurm_cluster.collect(train_id, tmp_path, *slurm_cluster.wait(train_id, timeout=10))
    # srun's status is the worst task's: 3 from rank 1, or 143 when --kill-on-bad-exit's
    # SIGTERM reaches rank 0 before it has exited by itself.
    assert train.state == "FAILED" and train.exit_code in (3, 143), _describe(train)
    assert "rank 1: exiting without end_run" in train.stdout
    assert merge.state == "COMPLETED" and merge.exit_code == 0, _describe(merge)
    run_dir = tmp_path / "prov" / "exp5" / f"slurm-{train_id}.0"
    with explained(train, merge):
        assert f"training job {train_id}: JobState=FAILED ExitCode={train.exit_code}:0" in merge.stdout
        assert f"merging {run_dir}" in merge.stdout
        assert "merged provenance:" not in train.stdout  # no online merge: rank 0 was waiting for rank 1
        assert not (run_dir / "aggregate.json").exists()
        assert "stage-out" not in train.stdout  # every node copied its files
        rec = read_run(train, run_dir)
        check_ranks(rec, 2)
        names = check_two_nodes(rec, per_node=1)
        assert rec.agents[1]["status"] == "incomplete"
        # Rank 0 got SIGTERM from --kill-on-bad-exit while waiting for rank 1 in end_run (its
        # shard closed: complete), or, on a slow machine, before end_run (incomplete).
        assert (rec.agents[0]["status"], rec.processes[0]["status"]) in (
            ("complete", "ok"), ("incomplete", "killed-by-SIGTERM"))
        assert 1 in _many(rec.run["incomplete_ranks"])
        assert rec.processes[1]["complete"] is False and rec.processes[1]["status"] == "incomplete"
        assert rec.ranks[1]["status"] == "incomplete" and not rec.ranks[1]["end"]
        if node_local:
            for node_rank, node in names.items():
                rank = next(r for r, a in rec.agents.items() if a["node_rank"] == node_rank)
                local = tmp_path / f"local-{node}" / "exp5" / f"slurm-{train_id}.0"
                shard = f"rank-{rank:05d}.h5"
                # rank 1 died by os._exit: its crash ring and journal WAL stay beside its shard,
                # and the stage-out brings them along for the merge to recover from
                crashed = {f"{shard}.ring", f"{shard}.wal"} if rank == 1 else set()
                found = {p.name for p in (local / "shards").iterdir()}
                assert {shard} | crashed <= found <= {shard, f"{shard}.ring", f"{shard}.wal"}, found
                for name in found:
                    path = f"shards/{name}"
                    assert (local / path).read_bytes() == (run_dir / path).read_bytes()  # copied by the stage-out
        else:
            assert not list(tmp_path.glob("local-*"))


@dataclass
class CancelledRun:
    train: SlurmJob
    merge: SlurmJob
    rec: RecordedRun


def _metric_rows(shard: Path) -> int:
    """Metric points a live shard holds so far (0 while it cannot be opened yet)."""
    try:
        with ShardReader(shard) as reader:
            return reader.rows("metrics")
    except Exception:
        return 0


def wait_until_logging(cluster: SlurmCluster, job_id: int, run_dir: Path, world_size: int,
                       timeout: float = 120) -> None:
    """Until every rank has flushed metric points (so start_run, with its exit hooks, is done)."""
    deadline = time.monotonic() + timeout
    while not all(_metric_rows(run_dir / "shards" / f"rank-{r:05d}.h5") for r in range(world_size)):
        state = cluster.job_info(job_id).get("JobState", "")
        assert state not in FINISHED and time.monotonic() < deadline, f"job {job_id}: {state}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def cancelled_run(slurm_cluster, tmp_path_factory):
    """Template 5 after `scancel` (what a time limit does too: SIGTERM to every step and the
    batch script, SIGKILL KillWait seconds later): a long training job is cancelled once
    both ranks are logging; the afterany job merges what the shards hold."""
    work = tmp_path_factory.mktemp("t5c")
    # Epochs of a few seconds: each saves a model version, and thousands of files would make
    # the stage-out slow on a loaded machine.
    env = {"TRAIN_SCRIPT": str(TRAIN_SCRIPT), "TRAIN_ARGS": "--epochs 100000 --samples 65536 --sample-interval 0.5",
           "PROV4ML_PROV_DIR": str(work / "prov"), "PROV4ML_EXPERIMENT": "exp5c",
           "MERGE_SBATCH_ARGS": f"--chdir={work} --output={work}/slurm-%j.out"}
    out = slurm_cluster.run([str(SLURM_DIR / "submit-with-merge.sh"), str(SLURM_DIR / "srun-per-gpu.sbatch"),
                             "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
                             f"--chdir={work}", f"--output={work}/slurm-%j.out"], env=env, cwd=work).stdout
    train_id, merge_id = (int(x) for x in out.split())
    run_dir = work / "prov" / "exp5c" / f"slurm-{train_id}.0"
    try:
        wait_until_logging(slurm_cluster, train_id, run_dir, 2)
    finally:
        slurm_cluster.run(["scancel", str(train_id)], check=False)
    merge = slurm_cluster.collect(merge_id, work, *slurm_cluster.wait(merge_id))
    train = slurm_cluster.collect(train_id, work, *slurm_cluster.wait(train_id, timeout=10))
    assert train.state == "CANCELLED", _describe(train)
    assert merge.state == "COMPLETED" and merge.exit_code == 0, _describe(merge)
    return CancelledRun(train, merge, read_run(train, run_dir))


def test_template_merge_after_cancelled_job(cancelled_run):
    """Both ranks' SIGTERM handlers closed their shards (status killed-by-SIGTERM); the
    offline merge has both agents, with the job id, marked incomplete, and the points logged
    before the kill."""
    rec = cancelled_run.rec
    assert f"training job {rec.job.job_id}: JobState=CANCELLED" in cancelled_run.merge.stdout
    check_ranks(rec, 2)
    check_two_nodes(rec, per_node=1)
    assert {p["status"] for p in rec.processes.values()} == {"killed-by-SIGTERM"}, rec.processes
    # Neither reached end_run: both incomplete, on their agents and in the run activity.
    assert {a["status"] for a in rec.agents.values()} == {"incomplete"}, rec.agents
    assert _many(rec.run["incomplete_ranks"]) == [0, 1], rec.run
    assert {p["complete"] for p in rec.processes.values()} == {False}
    assert {rec.ranks[r]["end"]["status"] for r in (0, 1)} == {"killed-by-SIGTERM"}
    assert "merged provenance:" not in rec.job.stdout
    with h5py.File(rec.run_dir / "merged.h5", "r") as merged:
        assert len(merged["metrics/rows"]) > 0


# -- a requeued job (scontrol requeue; preemption and node failures requeue too) ------------------

# The training script of the requeue test: the job's first run trains until it is requeued, the
# second (SLURM_RESTART_COUNT=1) one epoch; everything else is examples/train_ddp.py.
REQUEUE_TRAIN = f"""import os, runpy, sys
if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    sys.argv += ["--epochs", "100000"]
sys.argv[0] = {str(TRAIN_SCRIPT)!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _merged_attempts(run_dir: Path) -> list[tuple[int, int, str]]:
    with h5py.File(run_dir / "merged.h5", "r") as merged:
        return sorted((int(r["rank"]), int(r["attempt"]), r["status"].decode()) for r in merged["ranks"][:])


def test_requeued_job_keeps_both_attempts(slurm_cluster, tmp_path):
    """`scontrol requeue` ends the running job (SIGTERM to its steps and batch script) and runs
    the batch script again with the same SLURM_JOB_ID, so the same run id, and
    SLURM_RESTART_COUNT=1. Each rank of the second run writes a shard of its own next to the
    first run's (before: RunStateError "rank-00000.h5 already exists" on every rank), and rank
    0's online merge holds both attempts of every rank, as for a torchrun restart."""
    train = tmp_path / "train_until_requeued.py"
    train.write_text(REQUEUE_TRAIN)
    env = {"TRAIN_SCRIPT": str(train), "TRAIN_ARGS": TRAIN_ARGS, "PROV4ML_PROV_DIR": str(tmp_path / "prov"),
           "PROV4ML_EXPERIMENT": "exprq"}
    job_id = slurm_cluster.sbatch("srun-per-gpu.sbatch", tmp_path, env=env, sbatch_args=[
        "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"])
    run_dir = tmp_path / "prov" / "exprq" / f"slurm-{job_id}.0"
    try:
        wait_until_logging(slurm_cluster, job_id, run_dir, 2)
        deadline = time.monotonic() + 60
        slurm_cluster.run(["scontrol", "requeue", str(job_id)])
        # Slurm holds a requeued job back for two minutes (Reason=BeginTime): release it sooner, but
        # only once its nodes have finished the first instance and a second has passed: slurmd
        # revoked the job's credential then, to the second, and refuses any credential made in the
        # same second ("Killing non-startable batch job: Job credential revoked", seen in CI).
        while (info := slurm_cluster.job_info(job_id)).get("JobState") != "PENDING":
            assert info.get("JobState") not in FINISHED and time.monotonic() < deadline, info
            time.sleep(0.25)
        while "comp" in slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%t"]).stdout:
            assert time.monotonic() < deadline, "nodes still completing the first instance"
            time.sleep(0.25)
        time.sleep(2.0)
        slurm_cluster.run(["scontrol", "update", f"job={job_id}", "StartTime=now"])
        job = slurm_cluster.collect(job_id, tmp_path, *slurm_cluster.wait(job_id))
    finally:
        slurm_cluster.run(["scancel", str(job_id)], check=False)
    assert job.state == "COMPLETED" and job.exit_code == 0, _describe(job)
    with explained(job):
        assert f"merged provenance: {run_dir / 'prov.json'}" in job.stdout
        assert sorted(p.name for p in (run_dir / "shards").iterdir()) == [
            "rank-00000.h5", "rank-00000.requeue-1.h5", "rank-00001.h5", "rank-00001.requeue-1.h5"]
        # The first attempt of each rank closed its shard on the requeue's SIGTERM, or just before
        # it: a rank whose peer got the signal first leaves on the failed collective (DDP over
        # gloo raises), closing its shard at exit. Either way closed, never missing.
        attempts = _merged_attempts(run_dir)
        assert [(rank, attempt) for rank, attempt, _ in attempts] == [(0, 0), (0, 1000), (1, 0), (1, 1000)]
        first, second = attempts[0::2], attempts[1::2]
        assert {status for *_, status in second} == {"ok"}
        assert {status for *_, status in first} <= {"killed-by-SIGTERM", "exited-without-end_run"}
        assert "killed-by-SIGTERM" in {status for *_, status in first}  # the requeue's signal reached the job
        rec = read_run(job, run_dir)
        assert sorted(rec.agents) == [0, 1] and rec.run["world_size"] == 2
        for rank, agent in rec.agents.items():
            assert (agent["job_id"], agent["requeue_count"], agent["restart_count"]) == (str(job_id), 1, 0)
            assert rec.ranks[rank]["start"]["topology"]["requeue_count"] == 1  # the last row: the second run
            assert rec.launcher_env(rank)["SLURM_RESTART_COUNT"] == "1"
        doc = ProvDocument.deserialize(str(run_dir / "prov.json"), format="json")
        shards = sorted(_p4d(a)["shard"] for a in doc.get_records(ProvActivity)
                        if any(t.localpart == "RankProcess" for t in a.get_asserted_types()))
        assert shards == ["rank-00000.h5", "rank-00000.requeue-1.h5", "rank-00001.h5", "rank-00001.requeue-1.h5"]


# -- mpiexec inside an allocation (not srun --mpi) -------------------------------------------------

def test_mpiexec_in_an_allocation(slurm_cluster, tmp_path):
    """MPICH's mpiexec (Hydra) in a batch script starts one proxy per node with srun, so every
    rank inherits its proxy's SLURM_PROCID (the node's index) and step: before, ranks 0 and 1
    were both "Slurm task 0 of 2" and collided on one shard. The library now takes Hydra's
    PMI_RANK/PMI_SIZE/MPI_LOCALRANKID, and the job id (not the proxies' step) for the run id."""
    script = tmp_path / "mpiexec.sh"
    script.write_text(f'#!/bin/bash\nmpiexec -n 4 "$PYTHON" {TRAIN_SCRIPT} {TRAIN_ARGS} --experiment mpx\n')
    job = slurm_cluster.submit(script, tmp_path, env={"PROV4ML_PROV_DIR": str(tmp_path / "prov")},
                               sbatch_args=["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1"])
    assert job.state == "COMPLETED" and job.exit_code == 0, _describe(job)
    rec = read_run(job, tmp_path / "prov" / "mpx" / f"slurm-{job.job_id}")
    with explained(job):
        check_ranks(rec, 4)
        check_complete(rec)
        names = check_two_nodes(rec, per_node=2)
        for rank, agent in rec.agents.items():
            env = rec.launcher_env(rank)
            assert (agent["launcher"], agent["local_world_size"], "step_id" in agent) == ("mpich", 2, False)
            assert (env["PMI_RANK"], env["PMI_SIZE"], env["MPI_LOCALRANKID"]) == (str(rank), "4", str(rank % 2))
            # The proxy's Slurm numbering, which the library no longer takes for the rank's:
            assert (env["SLURM_PROCID"], env["SLURM_NTASKS"], env["SLURM_STEP_ID"]) == (
                str(agent["node_rank"]), "2", "0")
            assert names[agent["node_rank"]] == rec.node_of(rank)
        assert json.loads((rec.run_dir / "aggregate.json").read_text())["transport"] == "mpi"


# -- the time limit: --signal ends training early enough for the stage-out -------------------------

def _signal_option(template: str, seconds: int) -> str:
    """The template's own ``#SBATCH --signal=...TERM@N``, with N = ``seconds`` (the tests' limit
    is 3 minutes, the templates' warning 120 s)."""
    match = re.search(r"^#SBATCH --signal=((?:B:)?TERM)@\d+$", (SLURM_DIR / template).read_text(), re.M)
    assert match, f"{template} asks for no warning signal before its time limit"
    return f"--signal={match.group(1)}@{seconds}"


def _end_status(shard: Path) -> str | None:
    with ShardReader(shard) as reader:
        return next((r.get("status") for r in reader.records() if r["kind"] == "end"), None)


TIME_LIMIT_CASES = {  # template: (sbatch arguments, environment); the two fit the cluster at once
    "torchrun-single-node.sbatch": (["--gpus-per-node=1", "--cpus-per-task=1"], {"NPROC_PER_NODE": "2"}),
    "srun-per-gpu.sbatch": (["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"], {}),
}


def test_time_limit_leaves_closed_shards_staged_out(slurm_cluster, tmp_path):
    """A job that trains past its 3-minute limit, shards on node-local directories, for each
    template (both jobs at once: each mostly waits for Slurm's signal): the template's warning
    signal (Slurm sends it 100-130 s before the limit here) stops training (every shard closed
    by its SIGTERM handler), and the batch script, still alive, copies the shards into the
    shared run directory before the limit. Before: no --signal, the batch script was killed
    with the training at the limit and the node-local shards never left."""
    jobs = {}
    for template, (sbatch_args, extra_env) in TIME_LIMIT_CASES.items():
        work = tmp_path / template.split(".")[0]
        # Epochs of a few seconds: each saves a model version, and thousands of files would
        # make the stage-out slow on a loaded machine.
        env = {"TRAIN_SCRIPT": str(TRAIN_SCRIPT), "TRAIN_ARGS": "--epochs 100000 --samples 65536 --sample-interval 0.5",
               "PROV4ML_PROV_DIR": str(work / "prov"), "PROV4ML_EXPERIMENT": "limit",
               "PROV4ML_LOCAL_DIR": str(work / "local-%N"), **extra_env}
        jobs[template] = (work, slurm_cluster.sbatch(template, work, env=env, sbatch_args=[
            *sbatch_args, "--time=3", _signal_option(template, 100)]))
    for template, (work, job_id) in jobs.items():
        job = slurm_cluster.collect(job_id, work, *slurm_cluster.wait(job_id, 300))
        run_dir = work / "prov" / "limit" / default_run_id(template, job.job_id)
        with explained(job):
            assert job.state != "TIMEOUT"  # it ended by itself, before the limit
            assert "stage-out" not in job.stdout  # no copy failed
            shards = sorted((run_dir / "shards").iterdir())
            assert [p.name for p in shards] == ["rank-00000.h5", "rank-00001.h5"]
            assert [_end_status(p) for p in shards] == ["killed-by-SIGTERM"] * 2
            local = {p.name: p for p in work.glob("local-*/limit/*/shards/*.h5")}
            assert sorted(local) == [p.name for p in shards]
            assert all(local[p.name].read_bytes() == p.read_bytes() for p in shards)  # copied after closing
            if template == "torchrun-single-node.sbatch":
                assert "SIGTERM (time limit near?): stopping torchrun" in job.stdout


# -- rendezvous on an address torch cannot match to the first node (the InfiniBand case) -------------

def _other_interface_address() -> str | None:
    """An IPv4 address of this machine that its hostname does not resolve to, like the
    InfiniBand address of a node whose hostname names its Ethernet interface."""
    import psutil

    named = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    return next((a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family == socket.AF_INET and not a.address.startswith("127.") and a.address not in named), None)


def test_rendezvous_on_another_interfaces_address(slurm_cluster, tmp_path):
    """MASTER_ADDR set to an address of another interface of the first node: torch's c10d
    cannot tell it is that node's, so without ``--rdzv_conf=is_host`` no torchrun hosts the
    store and the rendezvous times out; the template names the first node's torchrun host."""
    address = _other_interface_address()
    if address is None:
        pytest.skip("this machine has no IPv4 address besides the one its hostname resolves to")
    job = slurm_cluster.submit("torchrun-multi-node.sbatch", tmp_path, timeout=180,
                               env={"TRAIN_SCRIPT": str(DIST_CHECK), "MASTER_ADDR": address,
                                    "PROV4ML_PROV_DIR": str(tmp_path / "prov")},
                               sbatch_args=["--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1"])
    assert job.exit_code == 0, _describe(job)
    recs = dist_lines(job.stdout)
    assert [r["rank"] for r in recs] == [0, 1] and all(r["ok"] for r in recs), job.stdout
    assert f"rendezvous {address}:" in job.stdout, job.stdout
    # torch's own guess, which the template no longer relies on:
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname

    assert not _matches_machine_hostname(address)


# -- a job array, merged by one merge-after job ---------------------------------------------------

def test_array_tasks_have_runs_of_their_own_and_merge_after_merges_them_all(slurm_cluster, tmp_path):
    """An array of 3: each task's run is slurm-<array id>_<task>.<step> (before: slurm-<its own
    job id>, which merge-after, given the array's id, found for one task at most), and the
    merge-after job that depends on the whole array merges every task's run."""
    env = {"TRAIN_SCRIPT": str(TRAIN_SCRIPT), "TRAIN_ARGS": f"{TRAIN_ARGS} --exit-before-end-rank 0",
           "PROV4ML_PROV_DIR": str(tmp_path / "prov"), "PROV4ML_EXPERIMENT": "arr",
           "MERGE_SBATCH_ARGS": f"--chdir={tmp_path} --output={tmp_path}/slurm-%j.out",
           "LAUNCH_PREFIX": CONTAINER}  # merge-after too: `$LAUNCH_PREFIX $PYTHON -m prov4ml_dist merge`
    out = slurm_cluster.run([str(SLURM_DIR / "submit-with-merge.sh"), str(SLURM_DIR / "srun-per-gpu.sbatch"),
                             "--array=0-2", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1",
                             "--cpus-per-task=1", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%A_%a.out"],
                            env=env, cwd=tmp_path).stdout
    array_id, merge_id = (int(x) for x in out.split())
    merge = slurm_cluster.collect(merge_id, tmp_path, *slurm_cluster.wait(merge_id, timeout=300))
    assert merge.state == "COMPLETED" and merge.exit_code == 0, _describe(merge)
    runs = [tmp_path / "prov" / "arr" / f"slurm-{array_id}_{task}.0" for task in range(3)]
    with explained(merge):
        for run_dir in runs:  # rank 0 left without end_run: only merge-after merged these
            assert f"merging {run_dir}" in merge.stdout
            rec = read_run(merge, run_dir)
            (agent,) = rec.agents.values()
            assert agent["array_id"] == run_dir.name[len("slurm-"):-len(".0")]
            assert rec.launcher_env(0)["SLURM_ARRAY_JOB_ID"] == str(array_id)
            assert rec.launcher_env(0)["APPTAINER_NAME"] == "train.sif"
        job_ids = {read_run(merge, r).agents[0]["job_id"] for r in runs}
        assert len(job_ids) == 3  # each task its own SLURM_JOB_ID


def test_submit_with_merge_prints_the_training_job_when_the_merge_submission_fails(slurm_cluster, tmp_path):
    """Before, `set -e` ended the script between the two submissions: the training job ran,
    and nothing said which one it was."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsleep 1\n")
    proc = slurm_cluster.run([str(SLURM_DIR / "submit-with-merge.sh"), str(script), f"--chdir={tmp_path}",
                              f"--output={tmp_path}/slurm-%j.out"], cwd=tmp_path, check=False,
                             env={"MERGE_TEMPLATE": str(tmp_path / "no-such-template.sbatch")})
    assert proc.returncode == 1, proc
    train_id = int(proc.stdout.split()[0])
    assert f"training job {train_id} submitted, but not the merge job" in proc.stderr
    assert slurm_cluster.wait(train_id)[0] == "COMPLETED"


def test_a_second_training_step_gets_a_run_of_its_own(slurm_cluster, tmp_path):
    """srun-per-gpu with its training step twice (as a job that trains, then fine-tunes, would
    have it): each step's ranks derive their run id in the step, slurm-<job>.0 and .1, so the
    second does not fail on the first's shards (before: both were slurm-<job>)."""
    text = (SLURM_DIR / "srun-per-gpu.sbatch").read_text()
    start = text.index("srun --kill-on-bad-exit=1 bash -c '")
    end = text.index("srun-wrapper $TRAIN_ARGS\n", start) + len("srun-wrapper $TRAIN_ARGS\n")
    script = tmp_path / "two-steps.sbatch"
    script.write_text(text[:end] + text[start:end] + text[end:])
    rec = run_template(slurm_cluster, script, tmp_path, ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
                                                         "--cpus-per-task=1"])
    check_ranks(rec, 2)
    second = read_run(rec.job, rec.run_dir.with_name(f"slurm-{rec.job.job_id}.1"))
    check_ranks(second, 2)
    check_complete(second)
    assert {a["step_id"] for a in rec.agents.values()} == {"0"}
    assert {a["step_id"] for a in second.agents.values()} == {"1"}


# -- frameworks under srun -------------------------------------------------------------------------

def test_lightning_under_srun_gives_one_run_with_provml_logger_metrics_from_both_tasks(slurm_cluster, tmp_path):
    """`srun python train.py` on 2 nodes x 1 task: Lightning's SLURMEnvironment makes each task
    a rank (devices=1, num_nodes=2; no launcher of its own). The script's start_run comes before
    the Trainer; the library's rank is Slurm's task: one run slurm-<job>.0 of 2 ranks on the two
    nodes, ProvMLLogger's self.log values from both, the Trainer's set-up as params."""
    pytest.importorskip("lightning")
    from prov4ml_dist.merge.load import load_merged

    from .frameworks_support import SCRIPTS, assert_one_run

    script = tmp_path / "lightning.sh"
    script.write_text(
        "#!/bin/bash\n"
        # Lightning's SLURMEnvironment takes MASTER_PORT when set (else 15000 + the job id's last
        # digits, which another cluster on this machine may be using).
        "export MASTER_PORT=$($PYTHON -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); "
        "print(s.getsockname()[1])')\n"
        f"srun --kill-on-bad-exit=1 $PYTHON {SCRIPTS / 'lightning_train.py'} {tmp_path / 'prov'} ddp 1 prov 2\n")
    job = slurm_cluster.submit(script, tmp_path, sbatch_args=["-N2", "--ntasks-per-node=1", "--cpus-per-task=1"],
                               env={"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    with explained(job):
        assert job.exit_code == 0
        run_dir = assert_one_run(tmp_path / "prov", "lightning", 2, ("train_loss", "rank_marker"))
        assert run_dir.name == f"slurm-{job.job_id}.0"
        merged = load_merged(run_dir / "merged.h5")
        assert {r.rank: r.topology["launcher"] for r in merged.ranks} == {0: "slurm", 1: "slurm"}
        assert len({r.environment["launcher_env"]["SLURMD_NODENAME"] for r in merged.ranks}) == 2
        assert {s.rank: s.last for s in merged.series if s.key == "rank_marker"} == {0: 0.0, 1: 1.0}
        params = {p.key: p.value for p in merged.params if p.majority}
        assert params["trainer/num_nodes"] == 2 and params["trainer/world_size"] == 2
        assert params["trainer/cluster_environment"] == "SLURMEnvironment"
