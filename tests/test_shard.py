"""The shard writer and reader on real HDF5 files."""

from __future__ import annotations

import threading
import time

import h5py
import numpy as np
import pytest

from prov4ml_dist.errors import ShardError
from prov4ml_dist.shard import ShardReader, ShardWriter, schema

ATTRS = {"run_id": "r1", "rank": 0, "attempt": 0, "experiment_name": "e"}


def test_round_trip(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", ATTRS)
    w.record({"kind": "start", "time": 1.0, "note": "ünïcode"})
    sid = w.metrics.register("loss", "TRAINING", "")
    for i in range(1000):
        w.metrics.append(sid, i, i / 2, 100.0 + i)
    w.close()
    with ShardReader(tmp_path / "s.h5") as r:
        assert r.run_id == "r1" and r.rank == 0 and r.attempt == 0
        rows = r.read_table("metrics")
        assert len(rows) == 1000
        np.testing.assert_array_equal(rows["step"], np.arange(1000))
        np.testing.assert_array_equal(rows["value"], np.arange(1000) / 2)
        assert r.series("metrics")[sid]["key"] == "loss"
        assert r.start_record()["note"] == "ünïcode"
        assert r.end_record()["rows"] == {"metrics": 1000, "system": 0}
        assert r.end_record()["series_rows"] == {"metrics": [1000], "system": []}


@pytest.mark.parametrize(("text", "read_back"), [
    ("a\x00b", "a\ufffdb"), ("\\u0000", "\\u0000"), ("\\\x00", "\\\ufffd"), ("\\\\u0000", "\\\\u0000")])
def test_nul_becomes_a_replacement_character_and_nothing_else_changes(tmp_path, text, read_back):
    """HDF5 strings cannot hold NUL; a literal backslash before "u0000" is not a NUL."""
    w = ShardWriter(tmp_path / "s.h5", ATTRS)
    w.record({"kind": "start", "time": 1.0, "note": text, text: 1})
    w.close()
    with ShardReader(tmp_path / "s.h5") as r:
        start = r.start_record()
    assert start["note"] == read_back and start[read_back] == 1


def test_flushes_every_interval_without_close(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", ATTRS, flush_interval=0.1)
    sid = w.metrics.register("x", "c", "")
    w.metrics.append(sid, 0, 1.0, 0.0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with ShardReader(tmp_path / "s.h5") as r:
            if r.rows("metrics") == 1:
                assert r.end_record() is None  # still open: no end record yet
                break
        time.sleep(0.05)
    else:
        pytest.fail("row never reached the file")
    w.close()


def test_buffer_is_flushed_early_when_full(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", ATTRS, flush_interval=60, max_buffer_rows=1000)
    sid = w.metrics.register("x", "c", "")
    for i in range(5000):
        w.metrics.append(sid, i, 0.0, 0.0)
    deadline = time.monotonic() + 5
    while w.metrics.pending() >= 1000 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w.metrics.pending() < 1000
    w.close()


def test_threads_lose_and_duplicate_nothing(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", ATTRS, flush_interval=0.01)
    n_threads, per_thread = 8, 20000

    def worker(t: int) -> None:
        sid = w.metrics.register(f"k{t}", "c", "")
        for i in range(per_thread):
            w.metrics.append(sid, i, float(t), 0.0)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    with ShardReader(tmp_path / "s.h5") as r:
        rows = r.read_table("metrics")
        assert r.end_record()["series_rows"]["metrics"] == [per_thread] * n_threads  # many flushes added up
    assert len(rows) == n_threads * per_thread
    for sid in range(n_threads):
        steps = np.sort(rows["step"][rows["series"] == sid])
        np.testing.assert_array_equal(steps, np.arange(per_thread))


def test_never_overwrites_an_existing_shard(tmp_path):
    ShardWriter(tmp_path / "s.h5", ATTRS).close()
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / "s.h5", ATTRS)


def test_shard_names():
    assert schema.shard_name(3) == "rank-00003.h5"
    assert schema.shard_name(3, 1) == "rank-00003.restart-1.h5"


def test_torn_journal_line_is_ignored(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", ATTRS)
    w.record({"kind": "start", "time": 1.0})
    w.flush()
    # Simulate a crash in the middle of a journal append: half a record, no newline.
    journal = w._file[schema.JOURNAL]
    torn = np.frombuffer(b'{"kind": "param", "ke', dtype="u1")
    journal.resize((journal.shape[0] + torn.size,))
    journal[-torn.size:] = torn
    w._file.flush()
    with ShardReader(tmp_path / "s.h5") as r:
        assert [rec["kind"] for rec in r.records()] == ["start"]
    w.close()


@pytest.mark.parametrize("content", [b"", b"not hdf5 at all" * 100])
def test_reader_rejects_garbage(tmp_path, content):
    (tmp_path / "g.h5").write_bytes(content)
    with pytest.raises(ShardError, match="not a readable HDF5 shard"):
        ShardReader(tmp_path / "g.h5")


def test_reader_rejects_foreign_hdf5(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["metrics"] = np.arange(3)
    with pytest.raises(ShardError, match="not a prov4ml_dist shard"):
        ShardReader(tmp_path / "f.h5")


def test_truncated_shard_yields_only_its_intact_prefix(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", ATTRS)
    sid = w.metrics.register("x", "c", "")
    for i in range(100_000):
        w.metrics.append(sid, i, 1.0, 0.0)
    w.close()
    data = (tmp_path / "s.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 3])
    with ShardReader(tmp_path / "t.h5") as r:
        assert r.recovered
        rows = r.read_table("metrics")
    assert len(rows) < 100_000
    np.testing.assert_array_equal(rows["step"], np.arange(len(rows)))


def test_shard_cut_inside_its_metadata_is_an_error(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", ATTRS)
    w.close()
    data = (tmp_path / "s.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[:600])
    with pytest.raises(ShardError):
        ShardReader(tmp_path / "t.h5")


def test_missing_shard(tmp_path):
    with pytest.raises(ShardError, match="no such shard"):
        ShardReader(tmp_path / "nope.h5")


def test_a_row_that_cannot_be_stored_is_dropped_alone_and_counted(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", ATTRS)
    sid = w.metrics.register("x", "c", "")
    for step in (0, 2**63, 1, "two", 2):  # what the API never lets through, among good rows
        w.metrics.append(sid, step, 1.0, 0.0)
    w.close()
    with ShardReader(tmp_path / "s.h5") as r:
        assert r.read_table("metrics")["step"].tolist() == [0, 1, 2]
        end = r.end_record()
        warnings = list(r.records("warning"))
    assert end["lost_rows"]["metrics"] == 2 and end["series_rows"]["metrics"] == [3]
    assert len(warnings) == 1 and "2 rows of 'metrics' could not be stored" in warnings[0]["message"]


def test_flush_failure_is_recorded_not_raised(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", ATTRS)
    sid = w.metrics.register("x", "c", "")
    w.metrics.append(sid, 0, 1.0, 0.0)
    real_file = w._file
    w._file = _Broken()
    w.flush()  # must not raise
    assert w.failures and "flush" in w.failures[0]
    w._file = real_file
    w.metrics.append(sid, 1, 2.0, 0.0)
    w.close()
    with ShardReader(tmp_path / "s.h5") as r:
        end = r.end_record()
    assert end["failures"] and end["lost_rows"]["metrics"] == 1
    assert end["rows"]["metrics"] == 1 and end["series_rows"]["metrics"] == [1]  # the lost row is not counted


class _Broken:
    def __getitem__(self, name):
        raise OSError(28, "No space left on device")

    def flush(self):
        raise OSError(28, "No space left on device")
