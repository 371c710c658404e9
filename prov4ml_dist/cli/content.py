"""An artifact's sha256 as the artifact store recorded it, so a copy can be checked against its
record: a file's bytes; for a directory, the sha256 of its sorted ``sha256  relative/path``
manifest of regular files (symlinks and special files are not part of it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..artifacts import sha256_file


def directory_members(root: Path) -> list[Path]:
    """Regular files below ``root``, in the store's manifest order (sorted as paths)."""
    found = []
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        found += [Path(dirpath) / name for name in filenames]
    return [p for p in sorted(found) if p.is_file() and not p.is_symlink()]


def content_sha256(path: Path, directory: bool) -> tuple[str, int]:
    """sha256 and total size of an artifact file or directory (raises OSError if unreadable)."""
    if not directory:
        return sha256_file(path)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    lines, total = [], 0
    for member in directory_members(path):
        sha, size = sha256_file(member)
        lines.append(f"{sha}  {member.relative_to(path).as_posix()}\n")
        total += size
    return hashlib.sha256("".join(lines).encode()).hexdigest(), total
