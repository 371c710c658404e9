"""No collectives: a single process, or a job whose ranks cannot reach each other.

With one rank every operation is local. With several and no way to talk (no torch.distributed,
no MPI), nothing can be agreed or gathered: the merge is left to ``prov4ml-dist merge``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from typing import Any

from .base import Transport, TransportError


class NoneTransport(Transport):
    name = "none"

    @property
    def reaches_peers(self) -> bool:
        return self.world_size == 1

    def _alone(self) -> None:
        if self.world_size != 1:
            raise TransportError(f"rank {self.rank} of {self.world_size}: no torch.distributed or MPI "
                                 "to reach the other ranks")

    def broadcast(self, value: Any, timeout: float) -> Any:
        self._alone()
        return value

    def gather(self, value: Any, timeout: float, ranks: Collection[int] | None = None) -> dict[int, Any] | None:
        self._alone()
        return {0: value}

    def send_stream(self, dst: int, chunks: Iterable[bytes], timeout: float, start_timeout: float) -> None:
        raise TransportError("a single process has no one to stream to")

    def decline_stream(self, dst: int) -> None:
        raise TransportError("a single process has no one to stream to")

    def _receive(self, src: int, timeout: float) -> Iterator[memoryview]:
        raise TransportError("a single process has no one to stream from")

    def _progress(self, waiting: Collection[int]) -> None:
        pass  # no one waits
