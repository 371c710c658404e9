"""MPI (mpi4py) as the transport, for jobs started by mpiexec/mpirun or ``srun --mpi``.

MPI's blocking collectives cannot time out, and a nonblocking collective that never
completes makes ``MPI_Finalize`` hang; so everything here is point-to-point, nonblocking and
polled against a deadline. It all runs on COMM_WORLD (duplicating it would be a collective
without a timeout) under tags of our own. Small messages carry the namespace and an
operation number: one from an earlier operation (a late rank) is dropped, one from a later
operation (a fast rank) is kept until that operation asks for it.

A stream starts when the receiver says so (a small "go" message), so a sender waiting for
its turn holds nothing in flight and can give up without cancelling anything (MPI cannot
reliably cancel a send). Chunks then go as synchronous sends (``Issend``) with a small window:
a chunk only leaves the sender once rank 0 has posted the receive for it, so rank 0 holds
one chunk at a time.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
TAG_BROADCAST, TAG_GATHER, TAG_STREAM, TAG_GO = 31411, 31412, 31413, 31414
WINDOW = 2
# A stream frame larger than this is a protocol error, refused before anything is allocated.
MAX_FRAME_BYTES = 256 << 20
_POLL_MAX_S = 0.005
CANCEL_GRACE_S = 5.0


def _poll(ready: Callable[[], Any], deadline: Deadline) -> bool:
    """Call ``ready()`` until it is truthy or the deadline passes, backing off to 5 ms."""
    delay = 5e-5
    while not ready():
        if deadline.expired():
            return False
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)
    return True


def _cancel(request: MPI.Request) -> bool:
    """Cancel a send nobody received; True if it had completed after all. A send that can be
    neither cancelled nor completed within CANCEL_GRACE_S is abandoned, not waited for."""
    request.Cancel()
    status = MPI.Status()
    done = _poll(lambda: request.Test(status), Deadline(CANCEL_GRACE_S))
    return done and not status.Is_cancelled()


class MpiTransport(Transport):
    name = "mpi"

    def __init__(self, comm: MPI.Comm, namespace: str) -> None:
        super().__init__(comm.Get_rank(), comm.Get_size())
        self._comm = comm
        self._namespace = namespace
        self._ops = itertools.count()
        self._early: list[tuple[int, int, int, Any]] = []  # (sender, tag, op, value) received ahead

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

    def _complete(self, request: MPI.Request, deadline: Deadline, what: str) -> None:
        """Wait for a send; on timeout cancel it (unless it completed meanwhile) and raise."""
        if _poll(request.Test, deadline) or _cancel(request):
            return
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
            self._complete(request, deadline, f"broadcasting to rank {rank}")
        return value

    def gather(self, value: Any, timeout: float) -> dict[int, Any] | None:
        op, deadline = next(self._ops), Deadline(timeout)
        if self.rank != 0:
            self._complete(self._comm.Isend([self._envelope(op, value), MPI.BYTE], 0, TAG_GATHER), deadline,
                           "sending to rank 0")
            return None
        values = {0: value}
        while len(values) < self.world_size:
            try:
                sender, got = self._receive_value(MPI.ANY_SOURCE, TAG_GATHER, op, deadline, "gathering")
            except TransportTimeout:
                break
            values[sender] = got
        return values

    # -- streams -------------------------------------------------------------------------
    def send_stream(self, dst: int, chunks: Iterable[bytes], timeout: float, start_timeout: float) -> None:
        try:
            self._recv(dst, TAG_GO, Deadline(start_timeout), f"waiting for rank {dst} to receive")
        except TransportTimeout:
            self._send_small(GAVE_UP, dst, TAG_STREAM)  # so rank 0 does not wait for us in vain
            raise
        pending: deque[tuple[MPI.Request, bytes]] = deque()  # a frame must live until its send completes

        def send(frame: bytes, keep: int = WINDOW - 1) -> None:
            pending.append((self._comm.Issend([frame, MPI.BYTE], dst, TAG_STREAM), frame))
            while len(pending) > keep:
                request, _ = pending.popleft()
                self._complete(request, Deadline(timeout), f"streaming to rank {dst}")

        try:
            try:
                for chunk in chunks:
                    send(DATA + chunk)
            except TransportError:
                raise
            except Exception as exc:  # noqa: BLE001 - reading failed: the receiver hears of it, then the caller
                send(ABORT + str(exc).encode(errors="replace"), keep=0)
                raise
            send(END, keep=0)
        except TransportTimeout:
            for request, _ in pending:
                _cancel(request)
            raise

    def _send_small(self, data: bytes, dst: int, tag: int) -> None:
        """A few bytes, sent eagerly: they leave at once, received or not."""
        request = self._comm.Isend([data, MPI.BYTE], dst, tag)
        if not _poll(request.Test, Deadline(CANCEL_GRACE_S)):
            _cancel(request)

    def recv_stream(self, src: int, timeout: float) -> Iterator[memoryview]:
        self._send_small(b"", src, TAG_GO)
        while True:
            _, frame = self._recv(src, TAG_STREAM, Deadline(timeout), f"waiting for rank {src}'s next chunk")
            payload = parse_frame(frame, src)
            if payload is None:
                return
            yield payload
