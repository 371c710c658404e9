"""An artifact's sha256 as the artifact store recorded it, so a copy can be checked against its
record: a file's bytes; a directory's ``artifacts.directory_sha256``."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import directory_sha256, sha256_file


def content_sha256(path: Path, directory: bool) -> tuple[str, int]:
    """sha256 and total size of an artifact file or directory (raises OSError if unreadable)."""
    if not directory:
        return sha256_file(path)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    sha, total, _, _ = directory_sha256(path)
    return sha, total
