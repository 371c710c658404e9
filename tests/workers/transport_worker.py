"""One rank of a transport test, run by torchrun or mpiexec; writes OUT_DIR/rank-N.json.

    transport_worker.py OUT_DIR SCENARIO [--init-gloo]

Scenarios:
  suite      agree on a run id, gather, barrier, and stream a multi-chunk file from every rank to rank 0
  late       the last rank exits at once; the others gather and meet at a barrier with short timeouts
  root-gone  rank 0 exits at once; the others wait for its broadcast with a short timeout
  gave-up    rank 0 starts receiving only after rank 1 stopped waiting to send
  abandoned  two runs' streams in one job, the first abandoned mid-stream (see ``abandoned``)
  slow       rank 0 takes rank 1's stream slowly while rank 2 waits its turn (see ``slow``)
--init-gloo: initialise a gloo process group first and use its store instead of torchrun's agent store.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from prov4ml_dist.topology import detect
from prov4ml_dist.transport import (
    FileSpec,
    StreamAborted,
    TransportTimeout,
    agree_run_id,
    connect,
    send_files,
    write_files,
)

CHUNK = 64 << 10
TIMEOUT = 3.0


def main() -> None:
    out, scenario = Path(sys.argv[1]), sys.argv[2]
    if "PMI_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        # An MPI program initialises MPI first: a rank leaving before MPI_Init would hang the
        # others' MPI_Init (the launcher's doing, not ours).
        from mpi4py import MPI  # noqa: F401
    if "--init-gloo" in sys.argv:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # so connect() takes the group's store
    topology = detect()
    result = {"rank": topology.rank, "world_size": topology.world_size}
    if scenario == "suite":
        suite(topology, out, result)
    elif scenario == "late":
        late(topology, result)
    elif scenario == "root-gone":
        root_gone(topology, result)
    elif scenario == "gave-up":
        gave_up(topology, result)
    elif scenario == "abandoned":
        abandoned(topology, out, result)
    elif scenario == "slow":
        slow(topology, result)
    (out / f"rank-{topology.rank}.json").write_text(json.dumps(result))


def suite(topology, out: Path, result: dict) -> None:
    result["run_id"] = agree_run_id(topology, f"proposal-of-{os.getpid()}", timeout=30)
    with connect(topology, "test-suite", timeout=30) as transport:
        result["transport"] = transport.name
        gathered = transport.gather({"rank": topology.rank, "pid": os.getpid()}, timeout=30)
        result["gathered"] = None if gathered is None else {str(k): v for k, v in gathered.items()}
        result["barrier"] = transport.barrier(timeout=30)
        # Rank r sends r + 1.5 chunks' worth (uneven, so the last chunk is partial).
        if topology.rank == 0:
            received = []
            for src in range(1, topology.world_size):
                size = (src * 2 + 3) * CHUNK // 2
                expected = hashlib.sha256(payload(src, size)).hexdigest()
                target = out / f"from-{src}.bin"
                sizes = []
                outcomes = write_files(recorded(transport.recv_stream(src, timeout=30), sizes),
                                       [FileSpec(target, size, expected)])
                received.append({"src": src, "outcome": outcomes[0], "chunks": sizes,
                                  "sha_ok": hashlib.sha256(target.read_bytes()).hexdigest() == expected})
            result["received"] = received
        else:
            size = (topology.rank * 2 + 3) * CHUNK // 2
            source = out / f"source-{topology.rank}.bin"
            source.write_bytes(payload(topology.rank, size))
            send_files(transport, 0, [(source, size)], timeout=30, start_timeout=30, chunk_size=CHUNK)


def payload(rank: int, size: int) -> bytes:
    return (hashlib.sha256(str(rank).encode()).digest() * (size // 32 + 1))[:size]


def recorded(chunks, sizes: list):
    for chunk in chunks:
        sizes.append(len(chunk))
        yield chunk


def late(topology, result: dict) -> None:
    if topology.rank == topology.world_size - 1:
        sys.exit(0)
    with connect(topology, "test-late", timeout=30) as transport:
        t = time.monotonic()
        gathered = transport.gather({"rank": topology.rank}, timeout=TIMEOUT)
        result["gathered"] = None if gathered is None else sorted(gathered)
        result["barrier"] = transport.barrier(timeout=TIMEOUT)
        result["elapsed"] = time.monotonic() - t


def root_gone(topology, result: dict) -> None:
    if topology.rank == 0:
        sys.exit(0)
    with connect(topology, "test-root-gone", timeout=30) as transport:
        t = time.monotonic()
        try:
            transport.broadcast(None, timeout=TIMEOUT)
            result["error"] = None
        except TransportTimeout as exc:
            result["error"] = str(exc)
        result["elapsed"] = time.monotonic() - t


def gave_up(topology, result: dict) -> None:
    with connect(topology, "test-gave-up", timeout=30) as transport:
        if topology.rank == 1:
            try:
                transport.send_stream(0, [b"late"], timeout=30, start_timeout=1.0)
                result["sender"] = "sent"
            except TransportTimeout:
                result["sender"] = "gave up"
            return
        time.sleep(2.0)
        t = time.monotonic()
        try:
            result["received"] = [bytes(c).decode() for c in transport.recv_stream(1, timeout=30)]
        except StreamAborted as exc:
            result["received"] = str(exc)
        result["elapsed"] = time.monotonic() - t


def abandoned(topology, out: Path, result: dict) -> None:
    """Run A: rank 0 takes one chunk of rank 1's stream and abandons the run; rank 1 times out
    mid-stream, then gives up waiting to send its next stream (a "gave up" word that rank 0
    never takes). Run B, the next run in the same job, streams a file from rank 1 to rank 0:
    rank 0 must receive run B's bytes, not what run A left in the queues."""
    with connect(topology, "finish/run-A/attempt-0", timeout=30) as transport:
        if topology.rank == 1:
            try:
                transport.send_stream(0, [payload(100 + i, CHUNK) for i in range(8)], timeout=1.0, start_timeout=30)
                result["a"] = "sent"
            except TransportTimeout:
                result["a"] = "timed out mid-stream"
            try:
                transport.send_stream(0, [b"never taken"], timeout=1.0, start_timeout=0.5)
            except TransportTimeout:
                result["a"] += ", then gave up"
        else:
            stream = transport.recv_stream(1, timeout=30)
            result["a"] = f"took {len(next(stream))} bytes, then abandoned the run"
            time.sleep(3)  # rank 1 times out, then gives up, meanwhile
    size = 3 * CHUNK + 7
    with connect(topology, "finish/run-B/attempt-0", timeout=30) as transport:
        if topology.rank == 1:
            source = out / "run-b.bin"
            source.write_bytes(payload(1, size))
            send_files(transport, 0, [(source, size)], timeout=30, start_timeout=30, chunk_size=CHUNK)
        else:
            spec = FileSpec(out / "received-b.bin", size, hashlib.sha256(payload(1, size)).hexdigest())
            result["b"] = write_files(transport.recv_stream(1, timeout=10), [spec])[0]


SLOW_CHUNKS, SLOW_CHUNK_S, TURN_WAIT_S = 8, 0.5, 1.5


def slow(topology, result: dict) -> None:
    """Rank 0 takes rank 1's 8 chunks at 0.5 s each (4 s in all), then rank 2's; rank 2 gives up
    waiting for its turn after 1.5 s without progress. Rank 0 reports progress as it takes
    rank 1's chunks, so rank 2 waits as long as that lasts, and its stream arrives."""
    with connect(topology, "test-slow", timeout=30) as transport:
        if topology.rank == 0:
            received = []
            for src, waiting in ((1, [2]), (2, [])):
                chunks = 0
                try:
                    for _ in transport.recv_stream(src, timeout=30, waiting=waiting):
                        chunks += 1
                        time.sleep(SLOW_CHUNK_S if src == 1 else 0)
                except StreamAborted as exc:
                    chunks = str(exc)
                received.append(chunks)
            result["received"] = received
        else:
            t = time.monotonic()
            try:
                transport.send_stream(0, [payload(topology.rank, CHUNK)] * SLOW_CHUNKS, timeout=30,
                                      start_timeout=TURN_WAIT_S)
                result["sender"] = "sent"
            except TransportTimeout as exc:
                result["sender"] = str(exc)
            result["elapsed"] = time.monotonic() - t


if __name__ == "__main__":
    main()
