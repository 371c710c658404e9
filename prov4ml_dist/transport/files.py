"""Files as a stream of bounded chunks, and back, verified by sha256.

Several files travel as one stream: the receiver knows every size in advance (from the
sender's manifest) and cuts the stream there, and no chunk spans two files. Memory on either
side is one chunk, whatever the file sizes. A received file appears at its target only once
its size and sha256 match (written to a temporary name, then renamed), and a file that fails
does not stop the others: the stream is always drained so the sender is never left waiting.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..paths import temporary_path
from .base import StreamAborted, Transport, TransportError

DEFAULT_CHUNK_SIZE = 4 << 20


@dataclass(frozen=True)
class FileSpec:
    """A file the receiver expects: where it goes, and what it must be."""

    target: Path
    size: int
    sha256: str


def read_chunks(files: Iterable[tuple[Path, int]], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """Exactly ``size`` bytes of each file, in chunks of at most ``chunk_size``; a file that
    shrank since its size was taken is an error (one that grew is cut, and fails its sha256)."""
    for path, size in files:
        with open(path, "rb") as src:
            left = size
            while left:
                chunk = src.read(min(chunk_size, left))
                if not chunk:
                    raise OSError(f"{path} shrank to {size - left} bytes from {size}")
                left -= len(chunk)
                yield chunk


def send_files(transport: Transport, dst: int, files: list[tuple[Path, int]], timeout: float,
               start_timeout: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
    """Stream ``files`` (path, size) to ``dst``, which receives them with ``receive_files``."""
    transport.send_stream(dst, read_chunks(files, chunk_size), timeout, start_timeout)


def receive_files(transport: Transport, src: int, specs: list[FileSpec], timeout: float,
                  waiting: Collection[int] = ()) -> list[str | None]:
    """Receive what ``send_files`` sends; per file None when stored, else why not. The ranks
    in ``waiting`` are queued behind this stream (see ``Transport.recv_stream``)."""
    return write_files(transport.recv_stream(src, timeout, waiting), specs)


def write_files(chunks: Iterator[bytes | memoryview], specs: list[FileSpec]) -> list[str | None]:
    """Cut ``chunks`` into ``specs``' files. A broken stream fails the file it hit and all after
    it; a file that cannot be written or does not match fails alone."""
    outcomes: list[str | None] = []
    try:
        for spec in specs:
            outcomes.append(_write_one(chunks, spec))
        if next(chunks, None) is not None:
            raise TransportError("the sender sent more bytes than its files hold")
    except (TransportError, OSError) as exc:  # the stream broke (an OSError: reading local files)
        reason = f"transfer failed: {exc}" if not isinstance(exc, StreamAborted) else str(exc)
        outcomes += [reason] * (len(specs) - len(outcomes))
    return outcomes


def _write_one(chunks: Iterator[bytes | memoryview], spec: FileSpec) -> str | None:
    part = temporary_path(spec.target)
    digest = hashlib.sha256()
    problem = None
    try:
        spec.target.parent.mkdir(parents=True, exist_ok=True)
        out = open(part, "wb")
    except OSError as exc:
        out, problem = None, f"cannot write {part}: {exc.strerror or exc}"
    try:
        left = spec.size
        while left:
            chunk = next(chunks, None)
            if chunk is None:
                raise TransportError(f"the stream ended {left} bytes before the end of {spec.target.name}")
            if len(chunk) > left:
                raise TransportError(f"a chunk runs past the end of {spec.target.name}")
            left -= len(chunk)
            digest.update(chunk)
            if out is not None:
                try:
                    out.write(chunk)
                except OSError as exc:  # keep draining: the sender must not be left waiting
                    _discard(out, part)
                    out, problem = None, f"cannot write {part}: {exc.strerror or exc}"
        if problem is None and digest.hexdigest() != spec.sha256:
            problem = f"{spec.target.name}: sha256 {digest.hexdigest()} received, {spec.sha256} announced"
        if problem is None:
            try:
                out.close()
                os.replace(part, spec.target)
            except OSError as exc:
                problem = f"cannot store {spec.target}: {exc.strerror or exc}"
    except BaseException:
        _discard(out, part)
        raise
    if problem is not None:
        _discard(out, part)
    return problem


def _discard(out: BinaryIO | None, part: Path) -> None:
    """Close and remove a partial file; failing to is not worth a second error."""
    with contextlib.suppress(OSError):
        if out is not None:
            out.close()
        part.unlink(missing_ok=True)
