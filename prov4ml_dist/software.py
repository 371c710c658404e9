"""What software and program ran, beyond ``environment.capture``: the script's sha256, the git
remote, NCCL and MPI library versions and a Singularity/Apptainer container — the parts of
the PROV Plan and software stack (issue 13). Captured once per process, cheaply: the script
is hashed by one process per node (local rank 0) only, so 1,000 ranks never read it at once.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

SCRIPT_HASH_LIMIT = 64 << 20  # a "script" larger than this is not one: not hashed
CONTAINER_VARIABLES = ("CONTAINER", "NAME", "VERSION")  # after the SINGULARITY_/APPTAINER_ prefix


def script_identity(argv0: str | None = None, hash_it: bool | None = None) -> dict[str, Any] | None:
    """The script being run (absolute path, size, sha256); None when there is no script file.

    ``hash_it`` defaults to: this process is its node's local rank 0 (LOCAL_RANK unset or 0).
    """
    name = argv0 if argv0 is not None else (sys.argv[0] if sys.argv else "")
    path = Path(name) if name else None
    if path is None or not path.is_file():
        return None
    path = path.resolve()
    found: dict[str, Any] = {"path": str(path), "size": path.stat().st_size}
    if hash_it is None:
        hash_it = os.environ.get("LOCAL_RANK", "0") == "0"
    if hash_it and found["size"] <= SCRIPT_HASH_LIMIT:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        found["sha256"] = digest.hexdigest()
    return found


def nccl_version() -> str | None:
    """NCCL's version as torch reports it; only when the script already imported torch with CUDA."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return None
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a CPU build or a broken CUDA install: not recorded
        return None
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def mpi_library() -> str | None:
    """The MPI library's version string, when the script already imported mpi4py (never imported here:
    importing it can initialise MPI)."""
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        return mpi.Get_library_version().strip().splitlines()[0] if mpi is not None else None
    except Exception:  # noqa: BLE001 - an MPI that cannot say: not recorded
        return None


def container() -> dict[str, str] | None:
    """The Singularity/Apptainer image the process runs in, from the variables those runtimes set."""
    for runtime in ("APPTAINER", "SINGULARITY"):
        found = {name.lower(): os.environ[f"{runtime}_{name}"] for name in CONTAINER_VARIABLES
                 if os.environ.get(f"{runtime}_{name}")}
        if found:
            return {"runtime": runtime.lower(), **found}
    return None


def software_stack(git_directory: Path | None = None, local_rank: int | None = None) -> dict[str, Any]:
    """The shard's ``environment.software`` record; the script is hashed by local rank 0 only
    (the topology's, else LOCAL_RANK): one read per node, not one per rank."""
    from .environment import _git  # the one git runner (timeout, no failure)

    remote = _git(["remote", "get-url", "origin"], git_directory) if git_directory is not None else None
    hash_it = None if local_rank is None else local_rank == 0
    return {"script": script_identity(hash_it=hash_it), "git_remote": remote, "nccl": nccl_version(),
            "mpi": mpi_library(), "container": container()}
