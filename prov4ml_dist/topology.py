"""Who am I in the job: rank, local rank, node, world size, launcher — most specific first.

Order: torchrun (its variables describe the worker, even under ``srun torchrun`` where
SLURM_PROCID is only the node's launcher index), an initialised torch.distributed, then the
launcher's numbering: an MPI launcher's (Open MPI, MPICH/Hydra PMI) when it disagrees with
Slurm's (mpirun/mpiexec inside an allocation), else a Slurm step's, else a framework's child
on one node (Lightning's subprocess launcher: LOCAL_RANK and WORLD_SIZE without RANK), else a
single process.

A process may learn its place late (a framework starts the other processes, or initialises
torch.distributed, after the script's ``start_run``): ``Run.settle_topology`` detects again
when the rank is needed (``end_run``, a framework integration's set-up hook).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .shard.schema import attempt_number

# Environment variables worth keeping as provenance of how the process was launched: the
# launchers', the container's (Apptainer/Singularity set APPTAINER_CONTAINER, _NAME, ... in
# it) and the communication settings that change how training runs (NCCL_*, TORCH_NCCL_*).
# (Not HOSTNAME: Slurm sets it to the batch node and srun copies it to every task.)
LAUNCHER_ENV_PREFIXES = ("SLURM_", "SLURMD_", "TORCHELASTIC_", "PMI_", "OMPI_COMM_WORLD_", "PMIX_RANK",
                         "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "APPTAINER_", "SINGULARITY_", "NCCL_",
                         "TORCH_NCCL_")
LAUNCHER_ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS")
# Variables that may hold secrets (SLURM_JOB_PASSWORD, APPTAINER_DOCKER_PASSWORD, ...).
LAUNCHER_ENV_SECRET_WORDS = ("PASSWORD", "PASSPHRASE", "TOKEN", "SECRET", "CREDENTIAL")


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the job. ``node_rank`` is the index of its node in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    restart_count: int = 0  # torchrun's, within one run of the job
    requeue_count: int = 0  # Slurm's SLURM_RESTART_COUNT: the job was requeued, same job id
    launcher: str = "single"
    hostname: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    job_id: str | None = None
    array_id: str | None = None  # an array task as Slurm names it: <array job id>_<task id>
    step_id: str | None = None
    elastic_run_id: str | None = None

    @property
    def attempt(self) -> int:
        """This process's attempt of its rank, unique across torchrun restarts and Slurm
        requeues (``schema.attempt_number``); ValueError for counts no real job reaches."""
        return attempt_number(self.restart_count, self.requeue_count)

    def as_dict(self) -> dict:
        return asdict(self)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        return default


def _slurm_step(env: Mapping[str, str]) -> str | None:
    return env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")


@dataclass(frozen=True)
class _Placement:
    """Rank, world size and place on the node as one launcher numbers its processes."""

    rank: int
    world_size: int | None  # None: the launcher does not say (PMI without PMI_SIZE)
    local_rank: int
    local_world_size: int
    node_rank: int
    launcher: str


def _slurm_task(env: Mapping[str, str]) -> _Placement | None:
    """The process as a task of a Slurm step (srun), or None outside a step."""
    if not (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")) or _slurm_step(env) is None \
            or "SLURM_PROCID" not in env:
        return None
    return _Placement(rank=_int(env, "SLURM_PROCID", 0),
                      world_size=_int(env, "SLURM_NTASKS", _int(env, "SLURM_NPROCS", 1)),
                      local_rank=_int(env, "SLURM_LOCALID", 0), local_world_size=_slurm_tasks_on_node(env),
                      node_rank=_int(env, "SLURM_NODEID", 0), launcher="slurm")


def _mpi_process(env: Mapping[str, str]) -> _Placement | None:
    """The process as an MPI launcher (mpirun/mpiexec, or srun's PMI plugin) numbers it."""
    if "OMPI_COMM_WORLD_RANK" in env:
        return _Placement(rank=_int(env, "OMPI_COMM_WORLD_RANK", 0), world_size=_int(env, "OMPI_COMM_WORLD_SIZE"),
                          local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                          local_world_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1),
                          node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", 0), launcher="openmpi")
    if "PMI_RANK" in env:
        # Hydra (MPICH, Intel MPI) starts one proxy per node, in a Slurm allocation with one
        # srun step over the nodes in order: SLURM_NODEID is then the node's index.
        return _Placement(rank=_int(env, "PMI_RANK", 0), world_size=_int(env, "PMI_SIZE"),
                          local_rank=_int(env, "MPI_LOCALRANKID", 0),
                          local_world_size=_int(env, "MPI_LOCALNRANKS", 1),
                          node_rank=_int(env, "SLURM_NODEID", 0) if _slurm_step(env) is not None else 0,
                          launcher="mpich")
    return None


def _placement(env: Mapping[str, str]) -> tuple[_Placement | None, bool]:
    """The launcher's numbering of this process, and whether an MPI launcher inside a Slurm
    job started it (mpirun/mpiexec in an allocation).

    Open MPI's mpirun and Hydra start their per-node daemons with srun, so their ranks inherit
    the daemon's SLURM_PROCID, SLURM_NTASKS and step (and ranks on mpirun's own node none):
    the MPI variables win. Under ``srun --mpi=pmi2/pmix`` the MPI ranks are Slurm's tasks and
    both numberings agree: then Slurm's, with its step, describes the process.
    """
    slurm, mpi = _slurm_task(env), _mpi_process(env)
    if mpi is None:
        return slurm, False
    if slurm is not None and slurm.rank == mpi.rank and mpi.world_size in (None, slurm.world_size):
        return slurm, False
    return mpi, True


def detect(env: Mapping[str, str] | None = None) -> Topology:
    """Detect the topology from the environment (and torch.distributed when initialised)."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    place, under_mpirun = _placement(env)
    # Under mpirun the Slurm step is the daemons' (absent on mpirun's node): not the rank's step,
    # and it would give the ranks different run ids.
    array = (env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID"))
    common = {"job_id": job_id, "step_id": _slurm_step(env) if job_id and not under_mpirun else None,
              "array_id": f"{array[0]}_{array[1]}" if job_id and all(array) else None,
              "requeue_count": _int(env, "SLURM_RESTART_COUNT", 0) if job_id else 0}
    node_rank = place.node_rank if place is not None else 0

    if "RANK" in env and ("TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env):
        return Topology(
            rank=_int(env, "RANK", 0), world_size=_int(env, "WORLD_SIZE", 1),
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", place.local_world_size if place is not None else 1),
            node_rank=_int(env, "GROUP_RANK", node_rank),
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
            launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "env",
            elastic_run_id=env.get("TORCHELASTIC_RUN_ID"), **common)

    dist = _initialised_dist()
    if dist is not None:
        return Topology(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=_int(env, "LOCAL_RANK", place.local_rank if place is not None else 0),
                        local_world_size=place.local_world_size if place is not None else 1,
                        # without a launcher's numbering, the node rank a framework exported (Lightning's NODE_RANK)
                        node_rank=node_rank if place is not None else _int(env, "NODE_RANK", 0),
                        launcher="torch.distributed", **common)

    if place is not None:
        return Topology(rank=place.rank, world_size=place.world_size or 1, local_rank=place.local_rank,
                        local_world_size=place.local_world_size, node_rank=place.node_rank,
                        launcher=place.launcher, **common)

    framework = _framework_child(env)
    if framework is not None:
        return Topology(**framework, **common)
    return Topology(**common)


def _framework_child(env: Mapping[str, str]) -> dict | None:
    """A process a framework started on one node before torch.distributed (Lightning's
    subprocess launcher exports NODE_RANK, LOCAL_RANK and WORLD_SIZE, never RANK): its rank is
    its local rank. On another node (NODE_RANK > 0) the node's process count is not known
    here: None, and the rank is settled once torch.distributed is initialised."""
    local, world = _int(env, "LOCAL_RANK"), _int(env, "WORLD_SIZE")
    if local is None or world is None or world <= 1 or not 0 <= local < world or _int(env, "NODE_RANK", 0) != 0:
        return None
    return {"rank": local, "world_size": world, "local_rank": local,
            "local_world_size": _int(env, "LOCAL_WORLD_SIZE", world), "launcher": "framework"}


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """SLURM_TASKS_PER_NODE looks like '2(x3),1'; the value for our node is what we need."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    node = _int(env, "SLURM_NODEID", 0) or 0
    counts: list[int] = []
    for part in spec.split(","):
        value, _, rep = part.partition("(x")
        try:
            counts += [int(value)] * (int(rep.rstrip(")")) if rep else 1)
        except ValueError:
            return 1
    return counts[node] if node < len(counts) else 1


def _initialised_dist():
    """torch.distributed if it is imported and initialised; never imports torch itself."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist
    except Exception:  # noqa: BLE001 - a broken torch install must not stop logging
        return None
    return None


def launcher_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher's variables, recorded as provenance of how the job was started."""
    env = os.environ if env is None else env
    return {k: v for k, v in sorted(env.items())
            if (k.startswith(LAUNCHER_ENV_PREFIXES) or k in LAUNCHER_ENV_NAMES)
            and not any(word in k for word in LAUNCHER_ENV_SECRET_WORDS)}
