"""torch.distributed's key-value store (TCPStore) as the transport.

Why the store and not the process group's collectives: ``gather_object`` and friends block
without a usable timeout on NCCL (and need GPU tensors there), fail as a whole when one rank
is missing, and can leave the group unusable after a timeout. The store has none of these
problems: every wait takes an explicit timeout, a missing rank is just a missing key, and it
is the same on gloo, NCCL or any backend. Under torchrun the agent hosts the store, so it also
works before ``init_process_group`` and after ``destroy_process_group``. The price is
throughput (every byte passes through the store's server; see benchmarks/bench_transport.py),
which only matters when files must be streamed because ranks have no shared filesystem.

Keys live under ``prov4ml_dist/<namespace>/<session>/`` and never meet torch's own. The
session is the rank's own count of transports opened on the namespace (a store counter), so a
second run in the same job, or a retry, never reads a stale key.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist

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

# Chunks of one stream that may sit in the store at once: enough to overlap the sender's
# reading with the receiver's writing, few enough to bound the store's memory.
WINDOW = 2
# torch's libuv store server refuses a value over 8 MiB (and drops the connection): longer
# values and stream chunks are split into parts of at most this.
MAX_VALUE_BYTES = 4 << 20
# torch < 2.3 raises a plain RuntimeError on a store timeout.
_STORE_TIMEOUT: type[Exception] = getattr(dist, "DistStoreError", RuntimeError)


@contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """Store failures as transport errors, with what we were doing."""
    try:
        yield
    except _STORE_TIMEOUT as exc:
        raise TransportTimeout(f"{what}: {str(exc).splitlines()[0] if str(exc) else 'timed out'}") from None
    except RuntimeError as exc:
        raise TransportError(f"{what}: {exc}") from None


class StoreTransport(Transport):
    name = "torch_dist"

    def __init__(self, store: dist.Store, rank: int, world_size: int, namespace: str) -> None:
        super().__init__(rank, world_size)
        base = f"prov4ml_dist/{namespace}"
        with _store_errors("opening a session on the torch.distributed store"):
            session = store.add(f"{base}/sessions/{rank}", 1)
        self._store: dist.Store = dist.PrefixStore(f"{base}/{session}", store)
        self._ops = itertools.count()
        self._streams: Counter[tuple[int, int]] = Counter()

    @classmethod
    def agent_store(cls, host: str, port: int, rank: int, world_size: int, namespace: str,
                    timeout: float) -> StoreTransport:
        """A client of the store torchrun's agent hosts (TORCHELASTIC_USE_AGENT_STORE=True)."""
        with _store_errors(f"connecting to torchrun's store at {host}:{port}"):
            store = dist.TCPStore(host, port, None, False, timedelta(seconds=timeout), wait_for_workers=False)
        return cls(store, rank, world_size, namespace)

    @classmethod
    def default_store(cls, rank: int, world_size: int, namespace: str) -> StoreTransport:
        """The store of the initialised default process group; a clone when torch can make
        one, so this thread never shares a connection with torch's own watchdog threads."""
        store = dist.distributed_c10d._get_default_store()  # no public accessor; stable since torch 1.x
        clone = getattr(store, "clone", None)
        return cls(clone() if clone is not None else store, rank, world_size, namespace)

    # -- store operations with our errors ----------------------------------------------
    def _set(self, key: str, value: bytes) -> None:
        with _store_errors(f"writing {key!r} to the store"):
            self._store.set(key, value)

    def _get(self, key: str) -> bytes:
        with _store_errors(f"reading {key!r} from the store"):
            return self._store.get(key)

    def _wait(self, key: str, timeout: float, what: str) -> None:
        # A zero timedelta would mean "the store's default"; a millisecond means "now".
        with _store_errors(f"rank {self.rank}: {what} (timeout {timeout:.1f} s)"):
            self._store.wait([key], timedelta(seconds=max(timeout, 0.001)))

    def _arrived(self, key: str, deadline: Deadline) -> bool:
        """Whether ``key`` exists by the deadline; once it has passed, only a quick look."""
        if deadline.expired():
            with _store_errors(f"checking {key!r}"):
                return self._store.check([key])
        try:
            self._wait(key, deadline.remaining(), f"waiting for {key!r}")
        except TransportTimeout:
            return False
        return True

    def _delete(self, key: str) -> None:
        """Free a consumed key. FileStore cannot delete: its file then keeps the bytes."""
        try:
            self._store.delete_key(key)
        except RuntimeError:
            pass

    # -- collectives ---------------------------------------------------------------------
    def _put_value(self, key: str, value: Any) -> None:
        """A JSON value in parts under ``key/<i>``; ``key`` itself, written last, counts them."""
        data = encode(value)
        parts = range(0, len(data), MAX_VALUE_BYTES)
        for number, offset in enumerate(parts):
            self._set(f"{key}/{number}", data[offset:offset + MAX_VALUE_BYTES])
        self._set(key, str(len(parts)).encode())

    def _take_value(self, key: str, delete: bool) -> Any:
        """The value ``_put_value`` wrote (which must be complete: ``key`` exists)."""
        count = self._get(key)
        if not count.isdigit():
            raise TransportError(f"{key!r} holds {count[:20]!r}, not a count of parts")
        keys = [f"{key}/{number}" for number in range(int(count))]
        data = b"".join(self._get(name) for name in keys)
        if delete:
            for name in (*keys, key):
                self._delete(name)
        return decode(data)

    def broadcast(self, value: Any, timeout: float) -> Any:
        key = f"broadcast/{next(self._ops)}"
        if self.rank == 0:
            self._put_value(key, value)
            return value
        self._wait(key, timeout, "waiting for rank 0's broadcast")
        return self._take_value(key, delete=False)

    def gather(self, value: Any, timeout: float, ranks: Collection[int] | None = None) -> dict[int, Any] | None:
        prefix = f"gather/{next(self._ops)}"
        if self.rank != 0:
            self._put_value(f"{prefix}/{self.rank}", value)
            return None
        deadline = Deadline(timeout)
        values = {0: value}
        for rank in range(1, self.world_size) if ranks is None else sorted(set(ranks) - {0}):
            key = f"{prefix}/{rank}"
            if self._arrived(key, deadline):
                values[rank] = self._take_value(key, delete=True)
        return values

    # -- streams -------------------------------------------------------------------------
    def _stream_prefix(self, src: int, dst: int) -> str:
        """Streams between two ranks happen in the same order on both: count them."""
        number = self._streams[(src, dst)]
        self._streams[(src, dst)] += 1
        return f"stream/{src}-{dst}/{number}"

    def send_stream(self, dst: int, chunks: Iterable[bytes], timeout: float, start_timeout: float) -> None:
        prefix = self._stream_prefix(self.rank, dst)
        counter = f"progress/{dst}"
        seen = [self._count(counter)]

        def progressed() -> bool:
            now = self._count(counter)
            moved, seen[0] = now != seen[0], now
            return moved

        try:
            self.await_turn(dst, start_timeout, lambda seconds: self._arrived(f"{prefix}/go", Deadline(seconds)),
                            progressed)
        except TransportTimeout:
            self._set(f"{prefix}/0", GAVE_UP)
            raise
        index = 0
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                for offset in range(0, len(view), MAX_VALUE_BYTES):
                    self._put(prefix, index, DATA + view[offset:offset + MAX_VALUE_BYTES], timeout)
                    index += 1
        except TransportError:
            raise
        except Exception as exc:
            self._put(prefix, index, ABORT + str(exc).encode(errors="replace"), timeout)
            raise
        self._put(prefix, index, END, timeout)

    def _put(self, prefix: str, index: int, frame: bytes, timeout: float) -> None:
        """Frame ``index`` goes in once frame ``index - WINDOW`` was taken out."""
        if index >= WINDOW:
            ack = f"{prefix}/ack/{index - WINDOW}"
            self._wait(ack, timeout, "waiting for the receiver to take a chunk")
            self._delete(ack)
        self._set(f"{prefix}/{index}", frame)

    def decline_stream(self, dst: int) -> None:
        self._set(f"{self._stream_prefix(self.rank, dst)}/0", GAVE_UP)

    def _count(self, key: str) -> int:
        with _store_errors(f"reading {key!r}"):
            return self._store.add(key, 0)

    def _progress(self, waiting: Collection[int]) -> None:
        """One counter per receiver, which its queued senders read: a single store call
        whatever the number of ranks waiting."""
        with _store_errors("reporting progress"):
            self._store.add(f"progress/{self.rank}", 1)

    def _receive(self, src: int, timeout: float) -> Iterator[memoryview]:
        prefix = self._stream_prefix(src, self.rank)
        self._set(f"{prefix}/go", b"")
        for index in itertools.count():
            key = f"{prefix}/{index}"
            self._wait(key, timeout, f"waiting for rank {src}'s next chunk")
            frame = self._get(key)
            self._delete(key)
            payload = parse_frame(frame, src)
            if payload is None:
                return
            self._set(f"{prefix}/ack/{index}", b"")
            yield payload

    def close(self) -> None:
        self._store = None  # drops our connection (a clone, or our own client of the agent's store)
