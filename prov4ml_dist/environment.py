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


def git_state(directory: Path) -> dict[str, Any] | None:
    """Commit, branch and whether tracked files differ from the commit; None outside git."""
    commit = _git(["rev-parse", "HEAD"], directory)
    if commit is None:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], directory)
    return {"commit": commit, "branch": _git(["rev-parse", "--abbrev-ref", "HEAD"], directory),
            "dirty": bool(status) if status is not None else None, "directory": str(directory)}


def capture() -> dict[str, Any]:
    """The environment record. torch is described only if the user's script imported it."""
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
        "git": git_state(code_directory()),
        "software": software_stack(code_directory()),
        "launcher_env": launcher_environment(),
    }
