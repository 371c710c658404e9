"""A real Slurm cluster on this machine (slurm/testing/start-cluster.sh), and the sbatch
templates in slurm/ run on it.

The cluster: munged, slurmctld and one slurmd per emulated node (2 nodes x 2 CPUs and
2 fake GPUs by default), all local, state under $PROV4ML_SLURM_DIR (/tmp/prov4ml-slurm).
The session fixture ``slurm_cluster`` starts it (installing Slurm with apt when missing)
and skips only when the start script says Slurm cannot be installed here (exit 77); under
CI (``CI`` set) that is a failure instead. It stops the cluster at the end only if this
session started it (and not under xdist, nor with PROV4ML_SLURM_KEEP=1).

Helpers for further tests (e.g. on the merged provenance of a real training run):
  * ``slurm_cluster.submit(template, workdir, env=..., sbatch_args=...) -> SlurmJob``
    (job_id, exit_code, stdout, state, output) submits and waits;
  * ``slurm_cluster.wait(job_id)``, ``.run([...])`` (srun, sbatch ... with the cluster's env),
    ``.env(...)``;
  * ``dist_lines(stdout)``: the records that slurm/dist_check.py prints.
The templates run slurm/dist_check.py as TRAIN_SCRIPT here; once examples/train_ddp.py
exists, pass TRAIN_SCRIPT=<it> in ``env`` and look into PROV4ML_PROV_DIR.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

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
        env.update(SLURM_CONF=self.slurm_conf, PYTHON=PYTHON, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PATH=f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}")
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

    def submit(self, template: str | Path, workdir: Path, *, env: dict[str, str] | None = None,
               sbatch_args: list[str] | tuple[str, ...] = (), timeout: float = 240) -> SlurmJob:
        """sbatch a script (a path, or a name in slurm/), run in ``workdir``; wait for the end."""
        script = Path(template)
        if not script.is_absolute() and not script.exists():
            script = SLURM_DIR / script
        workdir.mkdir(parents=True, exist_ok=True)
        out = self.run(["sbatch", "--parsable", f"--chdir={workdir}", f"--output={workdir}/slurm-%j.out",
                        *sbatch_args, str(script)], env=env, cwd=workdir).stdout
        job_id = int(out.strip().split(";")[0])
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
        "PORT=$((20000 + SLURM_JOB_ID % 20000))\n"
        "srun --ntasks-per-node=1 bash -c \"$PYTHON -m torch.distributed.run --nnodes=\\$SLURM_NNODES "
        "--node_rank=\\$SLURM_NODEID --nproc_per_node=2 --rdzv_backend=c10d "
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

def _template_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"TRAIN_SCRIPT": str(DIST_CHECK), "PROV4ML_PROV_DIR": str(tmp_path / "prov")}
    env.update(extra)
    return env


def test_template_torchrun_single_node(slurm_cluster, tmp_path):
    job = slurm_cluster.submit("torchrun-single-node.sbatch", tmp_path, env=_template_env(tmp_path),
                               sbatch_args=["--gpus-per-node=2", "--cpus-per-task=2"])
    assert job.exit_code == 0, _describe(job)
    recs = dist_lines(job.stdout)
    assert [r["rank"] for r in recs] == [0, 1], job.stdout  # NPROC_PER_NODE from the 2 (fake) GPUs
    assert all(r["launcher"] == "torchrun" and r["ok"] and r["world_size"] == 2 for r in recs)
    assert len({r["env"]["SLURMD_NODENAME"] for r in recs}) == 1
    assert {r["env"]["PROV4ML_RUN_ID"] for r in recs} == {f"slurm-{job.job_id}"}


def test_template_torchrun_multi_node(slurm_cluster, tmp_path):
    job = slurm_cluster.submit("torchrun-multi-node.sbatch", tmp_path, env=_template_env(tmp_path),
                               sbatch_args=["--nodes=2", "--gpus-per-node=2", "--cpus-per-task=2"])
    assert job.exit_code == 0, _describe(job)
    recs = dist_lines(job.stdout)
    assert [r["rank"] for r in recs] == [0, 1, 2, 3], job.stdout
    assert all(r["launcher"] == "torchrun" and r["ok"] and r["world_size"] == 4 for r in recs)
    assert sorted(r["env"]["SLURM_PROCID"] for r in recs) == ["0", "0", "1", "1"]
    assert any(r["env"]["SLURM_PROCID"] != str(r["rank"]) for r in recs)  # SLURM_PROCID is not the rank
    assert len({r["env"]["SLURMD_NODENAME"] for r in recs}) == 2
    assert {r["env"]["TORCHELASTIC_RUN_ID"] for r in recs} == {str(job.job_id)}


@pytest.mark.parametrize("torch_env", ["0", "1"])
def test_template_srun_per_gpu(slurm_cluster, tmp_path, torch_env):
    job = slurm_cluster.submit("srun-per-gpu.sbatch", tmp_path,
                               env=_template_env(tmp_path, TORCH_ENV_FROM_SLURM=torch_env),
                               sbatch_args=["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2",
                                            "--cpus-per-task=1"])
    assert job.exit_code == 0, _describe(job)
    recs = dist_lines(job.stdout)
    assert [r["rank"] for r in recs] == [0, 1, 2, 3], job.stdout
    assert all(r["ok"] and r["world_size"] == 4 for r in recs)
    assert all(r["env"]["SLURM_PROCID"] == str(r["rank"]) for r in recs)
    assert [r["local_rank"] for r in recs] == [0, 1, 0, 1]
    assert {r["launcher"] for r in recs} == {"env" if torch_env == "1" else "slurm"}


def test_template_mpi(slurm_cluster, tmp_path):
    job = slurm_cluster.submit("mpi.sbatch", tmp_path, env=_template_env(tmp_path, TRAIN_ARGS="--mpi"),
                               sbatch_args=["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2",
                                            "--cpus-per-task=1"])
    assert job.exit_code == 0, _describe(job)
    recs = dist_lines(job.stdout)
    assert [r["rank"] for r in recs] == [0, 1, 2, 3], job.stdout
    assert all(r["launcher"] == "mpi" and r["ok"] and r["mpi_sum"] == 10 and r["torch_sum"] == 10 for r in recs)
    assert "MPICH" in recs[0]["mpi_library"]
    assert len({r["env"]["SLURMD_NODENAME"] for r in recs}) == 2


def test_template_merge_after_failed_job(slurm_cluster, tmp_path):
    """Template 5: training fails (rank 1 exits 3) with shards on "node-local" disk; the stage-out
    still copies them, and the afterany merge job still runs, on the right run directory."""
    fake_cli = tmp_path / "fake-prov4ml-dist"
    calls = tmp_path / "merge-calls.txt"
    fake_cli.write_text(f'#!/bin/bash\necho "$@" >> {calls}\nls "$2/shards" >> {calls}\n')
    fake_cli.chmod(0o755)
    env = _template_env(tmp_path, TRAIN_ARGS="--fail-rank 1 --touch-shard", PROV4ML_DIST=str(fake_cli),
                        PROV4ML_EXPERIMENT="exp5", PROV4ML_LOCAL_DIR=str(tmp_path / "node-local"))
    out = slurm_cluster.run([str(SLURM_DIR / "submit-with-merge.sh"), str(SLURM_DIR / "srun-per-gpu.sbatch"),
                             "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
                             f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out"],
                            env={**env, "MERGE_SBATCH_ARGS": f"--chdir={tmp_path} --output={tmp_path}/slurm-%j.out"},
                            cwd=tmp_path).stdout
    train_id, merge_id = (int(x) for x in out.split())
    merge = slurm_cluster.collect(merge_id, tmp_path, *slurm_cluster.wait(merge_id))
    train = slurm_cluster.collect(train_id, tmp_path, *slurm_cluster.wait(train_id, timeout=10))
    # srun's status is the worst task's: 3 from rank 1, or 143 when --kill-on-bad-exit's
    # SIGTERM reaches rank 0 before it has exited by itself.
    assert train.state == "FAILED" and train.exit_code in (3, 143), _describe(train)
    assert merge.state == "COMPLETED" and merge.exit_code == 0, _describe(merge)
    run_dir = tmp_path / "prov" / "exp5" / f"slurm-{train_id}"
    assert f"training job {train_id}: JobState=FAILED ExitCode={train.exit_code}:0" in merge.stdout
    assert calls.read_text().split("\n")[:3] == [f"merge {run_dir}", "placeholder-rank00000.txt",
                                                  "placeholder-rank00001.txt"]
