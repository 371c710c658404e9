"""Two rules every module that touches a run directory shares, each in one place:

- ``relative_inside``: which paths (artifact names, paths read back from records and
  manifests) may be joined to a directory — they must stay inside it;
- ``atomic_target``: how a file appears whole or not at all — written under a temporary name
  beside it, then renamed. Every temporary has the same shape (``.NAME.tmp-HOST-PID-N``), so
  a crash's leftovers can be found (``is_temporary``) and removed (``remove_stale_temporaries``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

TEMPORARY_MARK = ".tmp-"
_TEMPORARY = re.compile(r"\..+\.tmp-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-\d+")
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_numbers = itertools.count()


def relative_inside(path: object) -> PurePosixPath | None:
    """``path`` as a relative POSIX path that cannot leave the directory it is joined to, or
    None: not a string, absolute, a ``..`` part, a backslash (a separator elsewhere), a control
    character, or nothing but ``.`` and empty parts (the directory itself)."""
    if not isinstance(path, str) or "\\" in path or not path.isprintable():
        return None
    rel = PurePosixPath(path)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        return None
    return rel


def temporary_path(target: Path) -> Path:
    """A new temporary name beside ``target``: hidden, unique to this host, process and call.
    Its last suffix holds all that varies (``torch.save`` names its archive after the rest)."""
    return target.with_name(f".{target.name}{TEMPORARY_MARK}{_HOST}-{os.getpid()}-{next(_numbers)}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of ``temporary_path``'s (a leftover when nothing is writing)."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Remove the temporaries in ``directory`` (not below) whose writer, a process of this host,
    is gone (it crashed mid-write: a half-written merged.h5 is as large as the shards); those of
    live processes and of other hosts are left alone. Returns the names removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


@contextlib.contextmanager
def atomic_target(target: Path) -> Iterator[Path]:
    """A temporary path to write ``target``'s content to: renamed over ``target`` when the block
    ends normally, removed when it raises (nothing half-written is ever at ``target``)."""
    tmp = temporary_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
