"""Safe storage of artifacts: names confined to the rank's artifact directory, no symlinks
followed, nothing overwritten, sha256 computed while copying (one read of each file)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

from .errors import ArtifactError
from .paths import relative_inside

CHUNK = 1 << 20
_OPEN_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
# Modes of what we create, before the umask: never writable by others, whatever the umask.
FILE_MODE = 0o664
DIR_MODE = 0o775


def safe_relative(name: object) -> PurePosixPath:
    """A relative artifact name that cannot leave its directory ('../x', '/etc/x' are refused)."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ArtifactError(f"artifact name must be a non-empty string, got {name!r:.80}")
    if "\x00" in name or not name.isprintable():
        raise ArtifactError(f"artifact name contains control characters: {name!r:.80}")
    path = relative_inside(name.replace("\\", "/"))  # a Windows-style name is taken as POSIX
    if path is None:
        raise ArtifactError(f"artifact name {name!r:.80} must be relative and stay inside the artifacts directory")
    return path


def sha256_file(path: Path) -> tuple[str, int]:
    """sha256 and size of a regular file, read without following a symlink. Anything else is
    an OSError: a path named by an untrusted record may be /dev/zero, which never ends."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, _OPEN_READ)
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ArtifactStore:
    """One rank's artifact directory. Every write creates a new file; an existing name gets a
    numbered sibling (``config.1.yaml``) so no earlier version is ever lost."""

    def __init__(self, rank_root: Path, relative_dir: str) -> None:
        self.rank_root = rank_root
        self.directory = rank_root / relative_dir
        self.directory.mkdir(DIR_MODE, parents=True, exist_ok=True)
        self._real_dir = self.directory.resolve()
        self._last_number: dict[Path, int] = {}  # the highest number given to a name's copies

    def add_file(self, name: object, source: str | os.PathLike, copy: bool = True) -> dict[str, Any]:
        """Record a file or directory; copy it under ``name`` unless ``copy`` is false."""
        rel = safe_relative(name)
        src = Path(os.fspath(source)).expanduser()
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            raise ArtifactError(f"artifact {str(src)!r:.200} does not exist (a str value is a path: to store text "
                                "as the artifact, pass text=...)") from None
        except OSError as exc:
            raise ArtifactError(f"artifact {str(src)!r} cannot be read: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"artifact {str(src)!r} is a symlink; pass its target "
                                f"({os.path.realpath(src)!r}) if that is what you mean")
        if stat.S_ISDIR(st.st_mode):
            return self._add_directory(rel, src, copy)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"artifact {str(src)!r} is not a regular file or directory")
        if not copy:
            sha, size = _checked_hash(src)
            return {"path": str(src.resolve()), "size": size, "sha256": sha, "copied": False}
        dest = self._new_path(rel)
        sha, size = _copy_file(src, dest)
        return self._record(dest, sha, size)

    def _add_directory(self, rel: PurePosixPath, src: Path, copy: bool) -> dict[str, Any]:
        """Directories: regular files only (symlinks and special files are listed as skipped);
        the sha256 is ``directory_sha256``'s."""
        if not copy:
            try:
                sha, total, files, skipped = directory_sha256(src)
            except OSError as exc:
                raise ArtifactError(f"artifact {str(src)!r} cannot be read: {exc.strerror}") from None
            return {"path": str(src.resolve()), "size": total, "sha256": sha, "copied": False, "directory": True,
                    "files": files, "skipped": skipped}
        dest = self._new_path(rel)
        dest.mkdir(DIR_MODE)
        members, skipped = directory_entries(src)
        lines, total = [], 0
        for relpath in members:
            target = dest / relpath
            for parent in reversed(target.relative_to(dest).parents[:-1]):
                (dest / parent).mkdir(DIR_MODE, exist_ok=True)
            sha, size = _copy_file(src / relpath, target)
            lines.append((sha, relpath))
            total += size
        return {**self._record(dest, manifest_sha256(lines), total), "directory": True, "files": len(lines),
                "skipped": skipped}

    def add_bytes(self, name: object, data: bytes) -> dict[str, Any]:
        """Store in-memory content (serialised values, model files) as a new artifact file."""
        dest = self._new_path(safe_relative(name))
        with _new_file(dest) as out:
            out.write(data)
        return self._record(dest, hashlib.sha256(data).hexdigest(), len(data))

    def add_value(self, name: object, value: Any) -> dict[str, Any]:
        """Serialise a non-file value: bytes as is, NumPy arrays as .npy, JSON values as JSON."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self.add_bytes(name, bytes(value))
        if isinstance(value, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            return self.add_bytes(name, buf.getvalue())
        try:
            data = json.dumps(value, allow_nan=False, sort_keys=True).encode()
        except (TypeError, ValueError):
            raise ArtifactError(
                f"cannot store a {type(value).__name__} as an artifact: pass a file path, bytes, "
                "a NumPy array or a JSON-serialisable value") from None
        return self.add_bytes(name, data)

    def reserve(self, name: object) -> Path:
        """A fresh path for a file the caller writes itself (e.g. torch.save), inside the store."""
        return self._new_path(safe_relative(name))

    def record_for(self, path: Path) -> dict[str, Any]:
        sha, size = sha256_file(path)
        return self._record(path, sha, size)

    def _record(self, dest: Path, sha: str, size: int) -> dict[str, Any]:
        return {"path": dest.relative_to(self.rank_root).as_posix(), "size": size, "sha256": sha, "copied": True}

    def _new_path(self, rel: PurePosixPath) -> Path:
        """An unused path for ``rel`` inside the store; parents are checked to stay inside, before
        any is created (a symlinked parent must not get a directory made at its target) and after."""
        dest = self.directory.joinpath(*rel.parts)
        self._check_inside(dest.parent, rel)
        try:
            for parent in reversed(rel.parents[:-1]):
                self.directory.joinpath(*parent.parts).mkdir(DIR_MODE, exist_ok=True)
        except OSError as exc:  # a name too long, a file where a directory should be, a full disk
            raise ArtifactError(f"artifact name {str(rel)!r:.120} cannot be stored: {exc.strerror or exc}") from None
        self._check_inside(dest.parent, rel)
        # Numbering resumes where it stopped: a name logged at every step costs one lookup, not one per earlier copy.
        n = self._last_number.get(dest, 0)
        candidate = dest if n == 0 else self._numbered(dest, rel, n)
        while os.path.lexists(candidate):
            n += 1
            candidate = self._numbered(dest, rel, n)
        self._last_number[dest] = n
        return candidate

    @staticmethod
    def _numbered(dest: Path, rel: PurePosixPath, n: int) -> Path:
        return dest.with_name(f"{rel.stem}.{n}{rel.suffix}" if rel.suffix else f"{rel.name}.{n}")

    def _check_inside(self, directory: Path, rel: PurePosixPath) -> None:
        try:
            real = directory.resolve()
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            raise ArtifactError(f"artifact name {str(rel)!r:.120} cannot be resolved") from None
        if real != self._real_dir and self._real_dir not in real.parents:
            raise ArtifactError(f"artifact name {str(rel)!r} resolves outside the artifacts directory")


def drop_world_write(path: Path) -> None:
    """For files made by code that takes no mode (HDF5, torch.save): under a umask of 0 they
    would be writable by every user of the machine."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & stat.S_IWOTH:
        os.chmod(path, mode & ~stat.S_IWOTH)


def directory_entries(root: Path) -> tuple[list[str], list[str]]:
    """Sorted relative paths below ``root``: regular files, and what is skipped (symlinks,
    special files). Symlinked directories are not followed."""
    members, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            path = base / name
            relpath = path.relative_to(root).as_posix()
            (members if path.is_file() and not path.is_symlink() else skipped).append(relpath)
    return sorted(members), sorted(skipped)


def manifest_sha256(entries: list[tuple[str, str]]) -> str:
    """A directory's sha256: that of its sorted 'sha256  relative/path' lines."""
    return hashlib.sha256("".join(f"{sha}  {rel}\n" for sha, rel in sorted(entries, key=lambda e: e[1]))
                          .encode()).hexdigest()


def directory_sha256(root: Path) -> tuple[str, int, int, list[str]]:
    """sha256, total size, file count and skipped entries of a directory artifact, as stored
    (raises OSError for an unreadable member)."""
    members, skipped = directory_entries(root)
    entries, total = [], 0
    for relpath in members:
        sha, size = sha256_file(root / relpath)
        entries.append((sha, relpath))
        total += size
    return manifest_sha256(entries), total, len(entries), skipped


def _checked_hash(src: Path) -> tuple[str, int]:
    try:
        return sha256_file(src)
    except OSError as exc:
        raise ArtifactError(f"artifact {str(src)!r} cannot be read: {exc.strerror}") from None


def _copy_file(src: Path, dest: Path) -> tuple[str, int]:
    """Copy without following symlinks at either end; hash in the same pass."""
    digest = hashlib.sha256()
    size = 0
    try:
        fd_in = os.open(src, _OPEN_READ)
    except OSError as exc:
        raise ArtifactError(f"artifact {str(src)!r} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd_in, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise ArtifactError(f"artifact {str(src)!r} is not a regular file")
        with _new_file(dest) as fout:
            try:
                while chunk := fin.read(CHUNK):
                    digest.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
            except OSError as exc:  # a read error (EIO), a full disk
                raise ArtifactError(f"artifact {str(src)!r} could not be copied: {exc.strerror or exc}") from None
    return digest.hexdigest(), size


@contextlib.contextmanager
def _new_file(dest: Path) -> Iterator[BinaryIO]:
    """A file that did not exist, never through a symlink, ``FILE_MODE`` less the umask; removed
    again if writing it fails (a full disk is an ArtifactError, not a half-written artifact)."""
    try:
        fd = os.open(dest, _OPEN_NEW, FILE_MODE)
    except OSError as exc:
        raise ArtifactError(f"artifact {dest.name!r:.120} cannot be created: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
    except OSError as exc:
        dest.unlink(missing_ok=True)
        raise ArtifactError(f"artifact {dest.name!r} could not be written: {exc.strerror or exc}") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
