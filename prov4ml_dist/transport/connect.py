"""Which transport fits this process, decided from the environment before importing anything.

Most specific first: torchrun's agent store (usable with or without a process group), the
store of an initialised torch.distributed, MPI (see ``connect``'s ``init_mpi``); else none.
torch and mpi4py are imported only when the environment says they are in use: importing
mpi4py initialises MPI, which a plain process must not do.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping

from ..topology import Topology, _initialised_dist
from .base import Transport, TransportError
from .none import NoneTransport

log = logging.getLogger(__name__)

# World-size variables of MPI launchers: Open MPI, MPICH/Intel MPI (Hydra, and Slurm's
# --mpi=pmi2), MVAPICH.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def connect(topology: Topology, namespace: str, timeout: float, *, init_mpi: bool = False,
            env: Mapping[str, str] | None = None) -> Transport:
    """A transport among the job's ranks; ``NoneTransport`` when there is no way to reach them.

    ``namespace`` separates unrelated uses (the run-id agreement, one run's merge); ``timeout``
    bounds connecting. A transport that fails to open is logged and the next one is tried.
    ``init_mpi``: whether MPI may be initialised here if the program has not done it. MPI_Init
    waits, with no timeout, for every process the launcher started: fine at the start of a
    run, when all are alive; at its end a rank may be gone, so there only an MPI the program
    initialised itself is used.
    """
    env = os.environ if env is None else env
    if topology.world_size <= 1:
        return NoneTransport(topology.rank, topology.world_size)
    openers: tuple[tuple[str, Callable[[], Transport | None]], ...] = (
        ("torchrun's agent store", lambda: _agent_store(topology, namespace, timeout, env)),
        ("the process group's store", lambda: _default_store(topology, namespace)),
        ("MPI", lambda: _mpi(topology, namespace, env, init_mpi)),
    )
    for name, opener in openers:
        try:
            transport = opener()
        except (TransportError, ImportError, RuntimeError) as exc:
            log.warning("prov4ml_dist: rank %d: %s unusable: %s", topology.rank, name, exc)
            continue
        if transport is not None:
            return transport
    return NoneTransport(topology.rank, topology.world_size)


def _agent_store(topology: Topology, namespace: str, timeout: float, env: Mapping[str, str]) -> Transport | None:
    """torchrun's agent hosts a TCPStore at MASTER_ADDR:MASTER_PORT from before the workers start."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not env.get("MASTER_ADDR") or not env.get("MASTER_PORT"):
        return None
    from .torch_dist import StoreTransport

    return StoreTransport.agent_store(env["MASTER_ADDR"], int(env["MASTER_PORT"]), topology.rank,
                                      topology.world_size, namespace, timeout)


def _default_store(topology: Topology, namespace: str) -> Transport | None:
    dist = _initialised_dist()
    if dist is None:
        return None
    if (dist.get_rank(), dist.get_world_size()) != (topology.rank, topology.world_size):
        raise TransportError(f"torch.distributed says rank {dist.get_rank()} of {dist.get_world_size()}, "
                             f"the launcher rank {topology.rank} of {topology.world_size}")
    from .torch_dist import StoreTransport

    return StoreTransport.default_store(topology.rank, topology.world_size, namespace)


def _mpi(topology: Topology, namespace: str, env: Mapping[str, str], init_mpi: bool) -> Transport | None:
    if not _mpi_initialised() and not (init_mpi and _mpi_launched(env)):
        return None
    from mpi4py import MPI

    from .mpi import MpiTransport

    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (topology.rank, topology.world_size):
        raise TransportError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, "
                             f"the launcher rank {topology.rank} of {topology.world_size}")
    return MpiTransport(comm, namespace)


def _mpi_initialised() -> bool:
    """Whether the program has initialised MPI (through mpi4py); never imports it."""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized()


def _mpi_launched(env: Mapping[str, str]) -> bool:
    """More than one MPI process, by the launcher's variables."""
    for name in MPI_SIZE_VARIABLES:
        try:
            if int(env.get(name, "1")) > 1:
                return True
        except ValueError:
            continue
    return "PMIX_RANK" in env and env.get("SLURM_NTASKS", "1") not in ("", "0", "1")  # srun --mpi=pmix


def agree_run_id(topology: Topology, proposal: str, timeout: float) -> str | None:
    """Rank 0's ``proposal`` on every rank, or None when the ranks have no way to agree.

    Raises ``TransportError`` (a ``TransportTimeout`` after ``timeout``) when a way exists but
    rank 0's proposal does not arrive.
    """
    namespace = f"run-id/attempt-{topology.attempt}"
    with connect(topology, namespace, timeout, init_mpi=True) as transport:
        if not transport.reaches_peers:
            return None
        agreed = transport.broadcast(proposal if transport.rank == 0 else None, timeout)
    if not isinstance(agreed, str):
        raise TransportError(f"rank 0 proposed a run id that is not a string: {agreed!r:.80}")
    return agreed
