"""The transport layer in one process: the store protocol between threads (each its own store
client, as ranks are), timeouts, stream framing and flow control, file verification, and the
choice of transport from the environment. Multi-process runs are in test_distributed_transport.py."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from prov4ml_dist.topology import Topology
from prov4ml_dist.transport import (
    FileSpec,
    NoneTransport,
    StreamAborted,
    TransportError,
    TransportTimeout,
    agree_run_id,
    connect,
    read_chunks,
    write_files,
)
from prov4ml_dist.transport.connect import _mpi_launched

dist = pytest.importorskip("torch.distributed")
from prov4ml_dist.transport.torch_dist import MAX_VALUE_BYTES, WINDOW, StoreTransport  # noqa: E402

# Slack for thread scheduling on a loaded 2-core machine, on top of a timeout.
MARGIN_S = 1.5


@pytest.fixture
def server():
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    yield store


def ranks(server, world_size: int, namespace: str = "t") -> list[StoreTransport]:
    """One transport per rank, each over its own client connection."""
    return [StoreTransport(dist.TCPStore("127.0.0.1", server.port, None, False, timedelta(seconds=30)),
                           rank, world_size, namespace) for rank in range(world_size)]


def in_threads(*calls):
    """Run the calls concurrently; their results (or exceptions) in order."""
    results: list = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_broadcast_and_gather_between_ranks(server):
    t0, t1, t2 = ranks(server, 3)
    got = in_threads(lambda: t0.broadcast({"id": "r-1"}, 5), lambda: t1.broadcast(None, 5),
                     lambda: t2.broadcast(None, 5))
    assert got == [{"id": "r-1"}] * 3
    got = in_threads(lambda: t0.gather("zero", 5), lambda: t1.gather("one", 5), lambda: t2.gather(["two"], 5))
    assert got == [{0: "zero", 1: "one", 2: ["two"]}, None, None]


def test_values_and_chunks_over_the_store_server_limit_are_split(server):
    t0, t1 = ranks(server, 2)
    big = "x" * (9 << 20)  # torch's libuv store server refuses values over 8 MiB
    assert in_threads(lambda: t0.broadcast(big, 5), lambda: t1.broadcast(None, 5)) == [big, big]
    assert in_threads(lambda: t0.gather(1, 5), lambda: t1.gather(big, 5))[0] == {0: 1, 1: big}
    chunk = bytes(range(256)) * (40 << 12)  # 10 MiB
    got = in_threads(lambda: [len(c) for c in t0.recv_stream(1, 5)], lambda: t1.send_stream(0, [chunk], 5, 5))
    assert sum(got[0]) == len(chunk) and max(got[0]) <= MAX_VALUE_BYTES


def test_gather_returns_what_arrived_when_a_rank_never_comes(server):
    t0, t1, _absent = ranks(server, 3)
    t1.gather("one", 5)
    start = time.monotonic()
    assert t0.gather("zero", 1.0) == {0: "zero", 1: "one"}
    assert 1.0 <= time.monotonic() - start < 1.0 + MARGIN_S


def test_gather_after_the_deadline_still_takes_ranks_that_arrived_meanwhile(server):
    t0, _slow, t2 = ranks(server, 3)
    t2.gather("two", 5)  # rank 2 is there, rank 1 never comes: waiting for 1 uses up the time
    assert t0.gather("zero", 0.5) == {0: "zero", 2: "two"}


def test_broadcast_times_out_when_rank_0_never_comes(server):
    _absent, t1 = ranks(server, 2)
    start = time.monotonic()
    with pytest.raises(TransportTimeout, match="rank 0's broadcast"):
        t1.broadcast(None, 0.5)
    assert time.monotonic() - start < 0.5 + MARGIN_S


def test_barrier_is_true_together_and_false_without_a_rank(server):
    t0, t1 = ranks(server, 2)
    assert in_threads(lambda: t0.barrier(5), lambda: t1.barrier(5)) == [True, True]
    u0, _absent, u2 = ranks(server, 3, "other")
    start = time.monotonic()
    assert in_threads(lambda: u0.barrier(0.5), lambda: u2.barrier(0.5)) == [False, False]
    assert time.monotonic() - start < 0.5 + 2 * MARGIN_S


def test_sessions_keep_a_second_use_of_a_namespace_apart(server):
    first = ranks(server, 2, "same")
    in_threads(lambda: first[0].broadcast("first", 5), lambda: first[1].broadcast(None, 5))
    second = ranks(server, 2, "same")
    assert in_threads(lambda: second[0].broadcast("second", 5),
                      lambda: second[1].broadcast(None, 5)) == ["second", "second"]


def test_stream_delivers_chunks_in_order(server):
    t0, t1 = ranks(server, 2)
    chunks = [bytes([i]) * (1000 + i) for i in range(7)]
    got = in_threads(lambda: [bytes(c) for c in t0.recv_stream(1, 5)], lambda: t1.send_stream(0, chunks, 5, 5))
    assert got == [chunks, None]


def test_sender_keeps_at_most_a_window_of_chunks_in_the_store(server):
    t0, t1 = ranks(server, 2)
    stream = t0.recv_stream(1, 5)
    result = in_threads(lambda: next(stream), lambda: t1.send_stream(0, [b"x"] * 10, 0.5, 5))
    assert isinstance(result[1], TransportTimeout)  # the receiver took one chunk, then stopped
    store = dist.PrefixStore("prov4ml_dist/t/1", dist.TCPStore("127.0.0.1", server.port, None, False))
    sent = [i for i in range(10) if store.check([f"stream/1-0/0/{i}"])]
    assert sent == list(range(1, WINDOW + 1))  # chunk 0 taken; WINDOW chunks waiting, no more


def test_a_read_error_aborts_the_stream_on_both_sides(server):
    t0, t1 = ranks(server, 2)

    def failing():
        yield b"first"
        raise OSError("disk gone")

    got = in_threads(lambda: [bytes(c) for c in t0.recv_stream(1, 5)], lambda: t1.send_stream(0, failing(), 5, 5))
    assert isinstance(got[0], StreamAborted) and "disk gone" in str(got[0])
    assert isinstance(got[1], OSError)


def test_a_sender_that_stops_waiting_for_its_turn_leaves_word(server):
    t0, t1 = ranks(server, 2)
    with pytest.raises(TransportTimeout):
        t1.send_stream(0, [b"late"], 5, start_timeout=0.2)
    start = time.monotonic()
    with pytest.raises(StreamAborted, match="stopped waiting"):
        list(t0.recv_stream(1, 30))
    assert time.monotonic() - start < MARGIN_S  # told at once, not after the 30 s timeout



def test_a_declined_stream_aborts_at_once_and_the_next_one_is_unaffected(server):
    """A rank that stopped waiting declines the streams rank 0 might still ask for."""
    t0, t1 = ranks(server, 2)
    t1.decline_stream(0)
    start = time.monotonic()
    with pytest.raises(StreamAborted, match="stopped waiting"):
        list(t0.recv_stream(1, 30))
    assert time.monotonic() - start < MARGIN_S
    got = in_threads(lambda: [bytes(c) for c in t0.recv_stream(1, 5)], lambda: t1.send_stream(0, [b"next"], 5, 5))
    assert got == [[b"next"], None]

def test_receiver_times_out_when_the_sender_dies_mid_stream(server):
    t0, t1 = ranks(server, 2)

    def dies():
        yield b"one"
        time.sleep(3)

    stream = t0.recv_stream(1, 0.5)
    sender = threading.Thread(target=lambda: t1.send_stream(0, dies(), 5, 5), daemon=True)
    sender.start()
    assert bytes(next(stream)) == b"one"
    with pytest.raises(TransportTimeout, match="next chunk"):
        next(stream)


def test_store_failure_is_a_transport_error(server):
    t0, t1 = ranks(server, 2)
    t0.close()
    with pytest.raises(AttributeError):
        t0.broadcast("x", 1)  # closed: no store left
    with pytest.raises(TransportError):
        StoreTransport(dist.HashStore(), 0, 1, "t")._wait("never", 0.05, "waiting")


# -- files ----------------------------------------------------------------------------------
def _spec(tmp_path: Path, name: str, data: bytes) -> FileSpec:
    return FileSpec(tmp_path / "out" / name, len(data), hashlib.sha256(data).hexdigest())


def test_files_are_cut_from_one_stream_and_verified(tmp_path):
    a, b = b"a" * 2500, b"b" * 10
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    chunks = list(read_chunks([(tmp_path / "a", len(a)), (tmp_path / "b", len(b))], chunk_size=1000))
    assert [len(c) for c in chunks] == [1000, 1000, 500, 10]  # bounded, never across two files
    specs = [_spec(tmp_path, "a", a), _spec(tmp_path, "b", b)]
    assert write_files(iter(chunks), specs) == [None, None]
    assert (tmp_path / "out" / "a").read_bytes() == a and (tmp_path / "out" / "b").read_bytes() == b


def test_a_corrupt_file_fails_alone_and_leaves_nothing(tmp_path):
    good, bad = _spec(tmp_path, "good", b"good"), _spec(tmp_path, "bad", b"want")
    outcomes = write_files(iter([b"gone", b"good"]), [bad, good])
    assert "sha256" in outcomes[0] and outcomes[1] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good"]


def test_a_broken_stream_fails_the_rest_and_leaves_no_partial_file(tmp_path):
    def broken():
        yield b"12"
        raise TransportTimeout("gone")

    specs = [_spec(tmp_path, "x", b"1234"), _spec(tmp_path, "y", b"5")]
    outcomes = write_files(broken(), specs)
    assert all("gone" in o for o in outcomes)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_unwritable_target_fails_but_the_stream_is_drained(tmp_path):
    (tmp_path / "out").write_text("a file where a directory should be")
    specs = [FileSpec(tmp_path / "out" / "x", 4, hashlib.sha256(b"1234").hexdigest())]
    chunks = iter([b"12", b"34"])
    assert "cannot write" in write_files(chunks, specs)[0]
    assert next(chunks, None) is None


def test_a_file_that_shrank_is_a_read_error(tmp_path):
    (tmp_path / "f").write_bytes(b"123")
    with pytest.raises(OSError, match="shrank"):
        list(read_chunks([(tmp_path / "f", 10)]))


# -- choosing a transport -------------------------------------------------------------------
def test_single_process_needs_no_collectives():
    topology = Topology()
    with connect(topology, "x", 1) as transport:
        assert isinstance(transport, NoneTransport) and transport.reaches_peers
        assert transport.gather({"a": 1}, 1) == {0: {"a": 1}}
    assert agree_run_id(topology, "mine", 1) == "mine"


def test_several_ranks_without_a_launcher_cannot_agree():
    topology = Topology(rank=1, world_size=2)
    with connect(topology, "x", 1, env={}) as transport:
        assert isinstance(transport, NoneTransport) and not transport.reaches_peers
        with pytest.raises(TransportError):
            transport.gather({}, 1)
    assert agree_run_id(topology, "mine", 1) is None


@pytest.mark.parametrize(("env", "expected"), [
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True), ({"PMI_SIZE": "2"}, True), ({"PMI_SIZE": "1"}, False),
    ({"PMIX_RANK": "0", "SLURM_NTASKS": "8"}, True), ({"SLURM_NTASKS": "8"}, False), ({"PMI_SIZE": "x"}, False),
])
def test_mpi_launchers_are_recognised(env, expected):
    assert _mpi_launched(env) is expected


@pytest.mark.skipif("mpi4py.MPI" in sys.modules, reason="MPI already initialised in this process")
def test_the_end_of_a_run_never_initialises_mpi():
    """MPI_Init would wait forever for a rank that is gone: only start_run may call it."""
    with connect(Topology(rank=0, world_size=2), "x", 1, env={"PMI_SIZE": "2"}) as transport:
        assert isinstance(transport, NoneTransport)
    assert "mpi4py.MPI" not in sys.modules
