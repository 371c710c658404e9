"""Two rules every module that touches a run directory shares, each in one place:

- ``relative_inside``: which paths (artifact names, paths read back from records and
  manifests) may be joined to a directory — they must stay inside it;
- ``atomic_target``: how a file appears whole or not at all — written under a temporary name
  beside it, then renamed. Every temporary has the same shape (``.NAME.tmp-HOST-PID-N``), so
  a crash's leftovers can be found (``is_temporary``) and removed.
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
_TEMPORARY = re.compile(r"\..+\.tmp-[A-Za-z0-9_-]+-\d+-\d+")
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
