"""The Transport interface: the few collectives the end of a run needs, each with a timeout.

A transport moves JSON values (never pickles: whatever arrives is untrusted) and byte streams
between the ranks of one job. Every blocking call takes a timeout in seconds and raises
``TransportTimeout`` when it runs out, so no rank can hang another forever. Partial results
are part of the contract: ``gather`` returns what arrived in time instead of failing, because
a dead rank must not cost the others their merge.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from ..errors import Prov4MLError

# Frame kinds of a byte stream: the first byte of every message of a stream.
DATA, END, ABORT = b"D", b"E", b"A"
# What a sender that stopped waiting for the receiver leaves instead of its first chunk.
GAVE_UP = ABORT + b"the sender stopped waiting for its turn"


class TransportError(Prov4MLError):
    """A collective failed: the peer or the store went away, or broke the protocol."""


class TransportTimeout(TransportError, TimeoutError):
    """A collective did not complete within its timeout."""


class StreamAborted(TransportError):
    """The sender gave up on a stream (a file it could not read, or it stopped waiting)."""


class Deadline:
    """A point in monotonic time; ``remaining()`` never goes below zero."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self._end


def encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


def decode(data: bytes | bytearray | memoryview) -> Any:
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransportError(f"malformed message ({exc})") from None


def parse_frame(frame: bytes | bytearray, src: int) -> memoryview | None:
    """The payload of a DATA frame, None for END; raises for ABORT and anything unknown."""
    kind = bytes(frame[:1])
    if kind == DATA:
        return memoryview(frame)[1:]
    if kind == END:
        return None
    if kind == ABORT:
        raise StreamAborted(f"rank {src} aborted its stream: {bytes(frame[1:]).decode(errors='replace')}")
    raise TransportError(f"rank {src} sent a stream frame of unknown kind {kind!r}")


class Transport(ABC):
    """Rank 0 is the root of every operation; ranks are those of the job's topology."""

    name: ClassVar[str]

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    @property
    def reaches_peers(self) -> bool:
        """False when the other ranks of a multi-rank job cannot be reached at all."""
        return True

    @abstractmethod
    def broadcast(self, value: Any, timeout: float) -> Any:
        """Rank 0's ``value`` on every rank (the others pass anything, e.g. None)."""

    @abstractmethod
    def gather(self, value: Any, timeout: float) -> dict[int, Any] | None:
        """On rank 0, ``{rank: value}`` of every rank whose value arrived within ``timeout``
        (its own included); None on the other ranks, which do not wait."""

    @abstractmethod
    def send_stream(self, dst: int, chunks: Iterable[bytes], timeout: float, start_timeout: float) -> None:
        """Send ``chunks`` to ``dst`` once it starts receiving (waiting up to ``start_timeout``),
        with a bounded number in flight; each later step may take up to ``timeout``. If
        ``chunks`` raises, the receiver is told (``StreamAborted``) and the error propagates."""

    @abstractmethod
    def recv_stream(self, src: int, timeout: float) -> Iterator[memoryview]:
        """The chunks ``src`` sends, in order; at most ``timeout`` between two of them."""

    def barrier(self, timeout: float) -> bool:
        """True when every rank arrived within ``timeout``; False (never an exception) otherwise."""
        deadline = Deadline(timeout)
        try:
            arrived = self.gather(True, timeout)
            everyone = arrived is not None and len(arrived) == self.world_size
            return bool(self.broadcast(everyone, deadline.remaining()))
        except TransportError:
            return False

    def close(self) -> None:  # noqa: B027 - most transports hold nothing to release
        """Release what the transport holds (connections); idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
