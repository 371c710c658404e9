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
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, ClassVar

from ..errors import Prov4MLError

# Frame kinds of a byte stream: the first byte of every message of a stream.
DATA, END, ABORT = b"D", b"E", b"A"
# What a sender that stopped waiting for the receiver leaves instead of its first chunk.
GAVE_UP = ABORT + b"the sender stopped waiting for its turn"
# A receiver tells the ranks queued behind the stream it is taking that bytes are moving at
# most this often (they keep waiting while it does); a queued sender looks this often.
PROGRESS_INTERVAL_S = 1.0


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


def parse_frame(frame: bytes | bytearray | memoryview, src: int) -> memoryview | None:
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
        self._last_progress = -float("inf")

    @property
    def reaches_peers(self) -> bool:
        """False when the other ranks of a multi-rank job cannot be reached at all."""
        return True

    @abstractmethod
    def broadcast(self, value: Any, timeout: float) -> Any:
        """Rank 0's ``value`` on every rank (the others pass anything, e.g. None)."""

    @abstractmethod
    def gather(self, value: Any, timeout: float, ranks: Collection[int] | None = None) -> dict[int, Any] | None:
        """On rank 0, ``{rank: value}`` of every rank whose value arrived within ``timeout``
        (its own included); None on the other ranks, which do not wait. ``ranks``: the ranks
        rank 0 waits for (all by default), e.g. those known to be there: one known gone then
        costs no timeout."""

    @abstractmethod
    def send_stream(self, dst: int, chunks: Iterable[bytes], timeout: float, start_timeout: float) -> None:
        """Send ``chunks`` to ``dst`` once it starts receiving, with a bounded number in flight;
        each step after the start may take up to ``timeout``. The wait for the start lasts as
        long as ``dst`` shows progress (bytes of other streams arriving): it ends, leaving word
        for ``dst`` (``StreamAborted`` there), after ``start_timeout`` without any. If
        ``chunks`` raises, the receiver is told (``StreamAborted``) and the error propagates."""

    @abstractmethod
    def decline_stream(self, dst: int) -> None:
        """Give up this rank's next stream to ``dst`` without waiting: ``dst``'s
        ``recv_stream`` for it raises ``StreamAborted`` at once instead of waiting in vain."""

    def recv_stream(self, src: int, timeout: float, waiting: Collection[int] = ()) -> Iterator[memoryview]:
        """The chunks ``src`` sends, in order; at most ``timeout`` between two of them. The
        ranks in ``waiting`` (queued to stream to this rank later) are told, at most every
        PROGRESS_INTERVAL_S, that this rank is taking bytes, so they keep waiting."""
        if waiting:
            self._tick(waiting)  # moving on to the next stream is progress too
        for payload in self._receive(src, timeout):
            if waiting:
                self._tick(waiting)
            yield payload

    def _tick(self, waiting: Collection[int]) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self._progress(waiting)

    @abstractmethod
    def _receive(self, src: int, timeout: float) -> Iterator[memoryview]:
        """``recv_stream`` without the progress reports."""

    @abstractmethod
    def _progress(self, waiting: Collection[int]) -> None:
        """Tell the ``waiting`` ranks that this rank is taking bytes (see ``await_turn``)."""

    def await_turn(self, dst: int, start_timeout: float, go: Callable[[float], bool],
                   progressed: Callable[[], bool]) -> None:
        """Wait for ``go(seconds)`` (True once ``dst`` starts receiving) for as long as
        ``progressed()`` (``dst`` reported progress since the last look) keeps turning True
        within ``start_timeout``: a slow receiver is waited for, a stalled one is not."""
        deadline = Deadline(start_timeout)
        while not go(min(PROGRESS_INTERVAL_S, deadline.remaining())):
            if progressed():
                deadline = Deadline(start_timeout)
            elif deadline.expired():
                raise TransportTimeout(f"rank {self.rank}: waiting for rank {dst} to receive: no progress "
                                       f"from it for {start_timeout:.1f} s")

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
