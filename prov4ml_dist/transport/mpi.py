"""MPI (mpi4py) as the transport, for jobs started by mpiexec/mpirun or ``srun --mpi``.

MPI's blocking collectives cannot time out, and a nonblocking collective that never
completes makes ``MPI_Finalize`` hang; so everything here is point-to-point, nonblocking and
polled against a deadline. It all runs on COMM_WORLD (duplicating it would be a collective
without a timeout) under tags of our own. Small messages carry the namespace (run id,
attempt, and the session: the process's count of transports on that namespace) and an
operation number: one from an earlier operation (a late rank) is dropped, one from a later
operation (a fast rank) is kept until that operation asks for it. Stream frames, "go" and
progress messages start with a digest of the namespace and the stream's number: what an
abandoned run or stream left unreceived in MPI's queues is dropped, never taken.

A stream starts when the receiver says so (a small "go" message), so a sender waiting for
its turn holds nothing in flight and can give up without cancelling anything (MPI cannot
reliably cancel a send); it waits as long as the receiver reports progress. Chunks then go
as synchronous sends (``Issend``) with a small window: a chunk only leaves the sender once
rank 0 has posted the receive for it, so rank 0 holds one chunk at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, ClassVar

from mpi4py import MPI

from .base import (
    ABORT,
    DATA,
    END,
    GAVE_UP,
    Deadline,
    Transport,
    TransportError,
    TransportTimeout,
    decode,
    encode,
    parse_frame,
)

# Tags of our own; user code is unlikely to use them on COMM_WORLD (MPI guarantees up to 32767).
TAG_BROADCAST, TAG_GATHER, TAG_STREAM, TAG_GO, TAG_PROGRESS = 31411, 31412, 31413, 31414, 31415
# Every stream frame, "go" and progress report starts with the digest of the transport's
# namespace (run id, attempt, session) and, for streams, the stream's number: a frame left
# over from an abandoned run or stream is recognised and dropped.
_STREAM_ID = struct.Struct(">8sI")
# A frame of a later stream is kept only if this small (a "declined" word, not data).
_MAX_EARLY_BYTES = 4096
WINDOW = 2
# A stream frame larger than this is a protocol error, refused before anything is allocated.
MAX_FRAME_BYTES = 256 << 20
_POLL_MAX_S = 0.005
SMALL_SEND_S = 5.0


def _poll(ready: Callable[[], Any], deadline: Deadline) -> bool:
    """Call ``ready()`` until it is truthy or the deadline passes, backing off to 5 ms."""
    delay = 5e-5
    while not ready():
        if deadline.expired():
            return False
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)
    return True


# Sends that did not complete in time, with their buffers. MPI_Cancel is not used: MPI 4
# deprecates it for sends, and MPICH's shared-memory path crashed in it. MPI may read a buffer
# until its send completes (MPICH reads it from the receiving process), so it must outlive the
# request: a later receive (one that drops stale frames, or ``close``'s drain) completes it.
_abandoned: list[tuple[MPI.Request, bytes]] = []


def _prune_abandoned() -> None:
    """Let go of the abandoned sends that have completed since."""
    _abandoned[:] = [(r, b) for r, b in _abandoned if not r.Test()]


def _abandon(request: MPI.Request, buffer: bytes) -> None:
    """Stop waiting for a send, keeping what it needs alive."""
    _prune_abandoned()
    if not request.Test():
        _abandoned.append((request, buffer))


class MpiTransport(Transport):
    name = "mpi"
    _sessions: ClassVar[Counter[str]] = Counter()

    def __init__(self, comm: MPI.Comm, namespace: str) -> None:
        super().__init__(comm.Get_rank(), comm.Get_size())
        self._comm = comm
        # The process's count of transports opened on the namespace: as the store's sessions,
        # it keeps a second use of the same run id (in the same order on every rank) apart.
        MpiTransport._sessions[namespace] += 1
        self._namespace = f"{namespace}#{MpiTransport._sessions[namespace]}"
        self._digest = hashlib.blake2b(self._namespace.encode(), digest_size=8).digest()
        self._ops = itertools.count()
        self._early: list[tuple[int, int, int, Any]] = []  # (sender, tag, op, value) received ahead
        self._streams: Counter[tuple[int, int]] = Counter()
        self._early_frames: dict[tuple[int, bytes], memoryview] = {}  # (src, stream id) → a frame ahead

    # -- point to point with deadlines -----------------------------------------------
    def _recv(self, source: int, tag: int, deadline: Deadline, what: str) -> tuple[int, bytearray]:
        status = MPI.Status()
        message: list[MPI.Message | None] = [None]

        def probe() -> bool:
            message[0] = self._comm.Improbe(source, tag, status)
            return message[0] is not None

        if not _poll(probe, deadline):
            raise TransportTimeout(f"rank {self.rank}: {what} (timeout {deadline.seconds:.1f} s)")
        size = status.Get_count(MPI.BYTE)
        if size > MAX_FRAME_BYTES:
            raise TransportError(f"rank {status.Get_source()} sent a {size}-byte message; at most "
                                 f"{MAX_FRAME_BYTES} expected")
        buf = bytearray(size)
        message[0].Recv([buf, MPI.BYTE])
        return status.Get_source(), buf

    def _complete(self, request: MPI.Request, buffer: bytes, deadline: Deadline, what: str) -> None:
        """Wait for a send of ``buffer``; on timeout abandon it and raise."""
        if _poll(request.Test, deadline):
            return
        _abandon(request, buffer)
        raise TransportTimeout(f"rank {self.rank}: {what} (timeout {deadline.seconds:.1f} s)")

    def _envelope(self, op: int, value: Any) -> bytes:
        return encode({"ns": self._namespace, "op": op, "value": value})

    def _receive_value(self, source: int, tag: int, op: int, deadline: Deadline, what: str) -> tuple[int, Any]:
        """The next message of operation ``op``. A message of a later operation (a fast rank
        already there) is kept for it; one of an earlier operation or another namespace (a
        late rank) is dropped."""
        for index, (sender, held_tag, held_op, value) in enumerate(self._early):
            if held_tag == tag and held_op == op and source in (sender, MPI.ANY_SOURCE):
                del self._early[index]
                return sender, value
        while True:
            sender, buf = self._recv(source, tag, deadline, what)
            message = decode(buf)
            if not isinstance(message, dict) or message.get("ns") != self._namespace:
                continue
            got = message.get("op")
            if got == op:
                return sender, message.get("value")
            if isinstance(got, int) and got > op:
                self._early.append((sender, tag, got, message.get("value")))

    # -- collectives ---------------------------------------------------------------------
    def broadcast(self, value: Any, timeout: float) -> Any:
        op, deadline = next(self._ops), Deadline(timeout)
        if self.rank != 0:
            return self._receive_value(0, TAG_BROADCAST, op, deadline, "waiting for rank 0's broadcast")[1]
        data = self._envelope(op, value)
        # Small messages are sent eagerly: these complete even towards a rank that has exited.
        requests = [self._comm.Isend([data, MPI.BYTE], rank, TAG_BROADCAST) for rank in range(1, self.world_size)]
        for rank, request in enumerate(requests, start=1):
            self._complete(request, data, deadline, f"broadcasting to rank {rank}")
        return value

    def gather(self, value: Any, timeout: float, ranks: Collection[int] | None = None) -> dict[int, Any] | None:
        op, deadline = next(self._ops), Deadline(timeout)
        if self.rank != 0:
            data = self._envelope(op, value)
            self._complete(self._comm.Isend([data, MPI.BYTE], 0, TAG_GATHER), data, deadline, "sending to rank 0")
            return None
        values = {0: value}
        expected = set(range(self.world_size) if ranks is None else ranks) | {0}
        while not expected <= values.keys():
            try:
                sender, got = self._receive_value(MPI.ANY_SOURCE, TAG_GATHER, op, deadline, "gathering")
            except TransportTimeout:
                break
            values[sender] = got
        return values

    # -- streams -------------------------------------------------------------------------
    def _stream_id(self, src: int, dst: int) -> bytes:
        """The header of every frame of the next stream between two ranks (both count their
        streams in the same order): this transport's namespace digest and the stream's number."""
        number = self._streams[(src, dst)]
        self._streams[(src, dst)] += 1
        return _STREAM_ID.pack(self._digest, number)

    def send_stream(self, dst: int, chunks: Iterable[bytes], timeout: float, start_timeout: float) -> None:
        sid = self._stream_id(self.rank, dst)
        try:
            self.await_turn(dst, start_timeout, lambda seconds: self._take_go(dst, sid, Deadline(seconds)),
                            lambda: self._drain_progress(dst))
        except TransportTimeout:
            self._send_small(sid + GAVE_UP, dst, TAG_STREAM)  # so rank 0 does not wait for us in vain
            raise
        finally:
            self._drain_progress(dst)  # none left unreceived: MPICH may kill a job at exit over them
        pending: deque[tuple[MPI.Request, bytes]] = deque()  # a frame must live until its send completes

        def send(kind: bytes, payload: bytes = b"", keep: int = WINDOW - 1) -> None:
            frame = b"".join((sid, kind, payload))
            pending.append((self._comm.Issend([frame, MPI.BYTE], dst, TAG_STREAM), frame))
            while len(pending) > keep:
                request, sent = pending.popleft()
                self._complete(request, sent, Deadline(timeout), f"streaming to rank {dst}")

        try:
            try:
                for chunk in chunks:
                    send(DATA, chunk)
            except TransportError:
                raise
            except Exception as exc:  # noqa: BLE001 - reading failed: the receiver hears of it, then the caller
                send(ABORT, str(exc).encode(errors="replace"), keep=0)
                raise
            send(END, keep=0)
        except TransportTimeout:
            for request, sent in pending:
                _abandon(request, sent)
            raise

    def _take_go(self, dst: int, sid: bytes, deadline: Deadline) -> bool:
        """Whether ``dst`` said "go" for stream ``sid`` by the deadline; a go of another stream
        or run (one that came after its sender had stopped waiting) is dropped."""
        while True:
            try:
                _, frame = self._recv(dst, TAG_GO, deadline, "waiting for the go")
            except TransportTimeout:
                return False
            if bytes(frame) == sid:
                return True

    def _drain_progress(self, dst: int) -> bool:
        """Whether ``dst`` reported progress (in this transport's namespace) since the last look."""
        moved = False
        while True:
            try:
                _, frame = self._recv(dst, TAG_PROGRESS, Deadline(0.0), "looking for progress")
            except TransportTimeout:
                return moved
            moved = moved or bytes(frame) == self._digest

    def decline_stream(self, dst: int) -> None:
        self._send_small(self._stream_id(self.rank, dst) + GAVE_UP, dst, TAG_STREAM)

    def _progress(self, waiting: Collection[int]) -> None:
        for rank in waiting:
            self._send_small(self._digest, rank, TAG_PROGRESS)

    def _send_small(self, data: bytes, dst: int, tag: int) -> None:
        """A few bytes, sent eagerly: they leave at once, received or not."""
        request = self._comm.Isend([data, MPI.BYTE], dst, tag)
        if not _poll(request.Test, Deadline(SMALL_SEND_S)):
            _abandon(request, data)

    def close(self) -> None:
        """Drop what is already here on the stream tags (frames of abandoned streams, a "go" or
        progress report that came too late): receiving it completes its sender's send, and
        leaves less in MPI's queues at MPI_Finalize."""
        for tag in (TAG_STREAM, TAG_GO, TAG_PROGRESS):
            with contextlib.suppress(TransportError):
                while True:
                    self._recv(MPI.ANY_SOURCE, tag, Deadline(0.0), "draining")
        _prune_abandoned()

    def _receive(self, src: int, timeout: float) -> Iterator[memoryview]:
        sid = self._stream_id(src, self.rank)
        self._send_small(sid, src, TAG_GO)
        while True:
            payload = parse_frame(self._next_frame(src, sid, Deadline(timeout)), src)
            if payload is None:
                return
            yield payload

    def _next_frame(self, src: int, sid: bytes, deadline: Deadline) -> memoryview:
        """The next frame of stream ``sid``, header stripped. Frames of an earlier stream or of
        another run or session (left unreceived when that one was abandoned) are dropped; a
        small frame of a later stream of ours (a sender declining it ahead) is kept for it."""
        early = self._early_frames.pop((src, sid), None)
        if early is not None:
            return early
        while True:
            _, frame = self._recv(src, TAG_STREAM, deadline, f"waiting for rank {src}'s next chunk")
            head, body = bytes(frame[:_STREAM_ID.size]), memoryview(frame)[_STREAM_ID.size:]
            if head == sid:
                return body
            if (len(head) == _STREAM_ID.size and head[:len(self._digest)] == self._digest
                    and _STREAM_ID.unpack(head)[1] > _STREAM_ID.unpack(sid)[1] and len(body) <= _MAX_EARLY_BYTES):
                self._early_frames[(src, head)] = body
