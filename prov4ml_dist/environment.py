"""What ran: interpreter, library versions, command line, git commit of the code — recorded
once per rank in the shard's start record."""

from __future__ import annotations

import getpass
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .software import software_stack
from .topology import launcher_environment

GIT_TIMEOUT_S = 2.0


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_directory() -> Path:
    """The directory of the script being run (its git repo is the code's), else the cwd."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.is_file():
        return script.resolve().parent
    return Path.cwd()


def git_state(directory: Path, check_dirty: bool = True) -> dict[str, Any] | None:
    """Commit, branch and whether tracked files differ from the commit; None outside git.

    ``git status`` stats every tracked file: on a parallel file system, a thousand ranks
    doing it at once is a metadata storm, so only one rank per node does (``check_dirty``);
    the others record ``dirty`` None and ``dirty_checked_by``."""
    commit = _git(["rev-parse", "HEAD"], directory)
    if commit is None:
        return None
    state: dict[str, Any] = {"commit": commit, "branch": _git(["rev-parse", "--abbrev-ref", "HEAD"], directory),
                             "dirty": None, "directory": str(directory)}
    if not check_dirty:
        state["dirty_checked_by"] = "local rank 0"
        return state
    status = _git(["status", "--porcelain", "--untracked-files=no"], directory)
    state["dirty"] = bool(status) if status is not None else None
    return state


def capture(local_rank: int = 0) -> dict[str, Any]:
    """The environment record. torch is described only if the user's script imported it;
    the working tree's state is checked by local rank 0 only (see ``git_state``)."""
    torch = sys.modules.get("torch")
    cuda = getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "user": _user(),
        "torch": getattr(torch, "__version__", None) if torch is not None else None,
        "cuda": cuda,
        "versions": {name: _version(name) for name in ("prov4ml-dist", "h5py", "numpy", "prov", "psutil")},
        "git": git_state(code_directory(), check_dirty=local_rank == 0),
        "software": software_stack(code_directory(), local_rank),
        "launcher_env": launcher_environment(),
    }
