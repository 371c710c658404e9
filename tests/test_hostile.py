"""Hostile and malformed input to the readers of a run: truncated, bit-flipped and foreign
files, shards of another run, and crafted shards whose names, attributes and records hold
path separators, '..', control characters or absurd sizes. Every one gets a clear error (a
skipped shard, a ``Prov4MLError``), in bounded memory and time, and nothing is written
outside the run directory. The work runs in a child process with bounded memory
(``faultkit.bounded``), so a bug shows as a failed test, not as a machine out of memory.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import h5py
import numpy as np
import pytest

from prov4ml_dist.merge import merge_run
from prov4ml_dist.run import Run, RunConfig
from prov4ml_dist.shard import schema
from prov4ml_dist.topology import Topology

from .faultkit import (
    bounded,
    bounded_outcomes,
    craft_shard,
    crashes,
    files_under,
    genuine_runs,
    merged_points,
    rows_of,
    start_record,
)

FLIPS = 24


def _series(sid: int, key: str, context: str = "TRAINING", **extra: object) -> dict:
    return {"kind": "series", "time": 1.7e9, "table": "metrics", "id": sid, "key": key, "context": context,
            "source": None, **extra}


def _artifact(path: str, name: str = "a", size: int = 10) -> dict:
    return {"kind": "artifact", "time": 1.7e9, "name": name, "path": path, "size": size, "sha256": "a" * 64,
            "copied": True, "item": "artifact"}


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of real shards: rank 0 closed, rank 1 as a SIGKILL leaves it (never closed)."""
    runs = genuine_runs(tmp_path_factory.mktemp("genuine"), "g")
    runs[1].writer.flush()
    shards = {"crashed": runs[1].shard_path.read_bytes()}
    for run in runs:
        run.close()
    shards["closed"] = runs[0].shard_path.read_bytes()
    shards["rank1"] = runs[1].shard_path.read_bytes()
    return shards


def _run_with(directory: Path, rank0: bytes | None, genuine: dict[str, bytes]) -> Path:
    """A run directory: the given bytes as rank 0's shard beside a good rank 1."""
    (directory / "shards").mkdir(parents=True)
    if rank0 is not None:
        (directory / "shards" / "rank-00000.h5").write_bytes(rank0)
    (directory / "shards" / "rank-00001.h5").write_bytes(genuine["rank1"])
    return directory


def _mutants(genuine: dict[str, bytes]) -> dict[str, bytes]:
    """Truncations at the places that matter (the superblock, object headers, mid-data) and
    random bit flips, of a closed and of a crashed shard."""
    rng = random.Random(20261126)
    found = {}
    for kind in ("closed", "crashed"):
        data = genuine[kind]
        for cut in (0, 8, 100, 600, 2048, len(data) // 3, len(data) // 2, len(data) - 1):
            found[f"{kind}-cut{cut}"] = data[:cut]
        for n in range(FLIPS):
            flipped = bytearray(data)
            for _ in range(rng.choice((1, 2, 8, 64))):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            found[f"{kind}-flip{n}"] = bytes(flipped)
    return found


def test_truncated_and_bit_flipped_shards_are_read_or_refused(tmp_path, genuine):
    paths = []
    for name, data in _mutants(genuine).items():
        paths.append(tmp_path / f"{name}.h5")
        paths[-1].write_bytes(data)
    outcomes = bounded_outcomes("read", paths)
    assert crashes(outcomes) == []
    assert {o["outcome"] for o in outcomes} == {"ok", "refused"}
    assert max(o["seconds"] for o in outcomes) < 10


def test_a_run_with_a_damaged_shard_merges_the_rest(tmp_path, genuine):
    dirs = [_run_with(tmp_path / name, data, genuine) for name, data in _mutants(genuine).items()]
    outcomes = bounded_outcomes("merge", dirs, timeout=600)
    assert crashes(outcomes, ()) == []
    assert [o["message"] for o in outcomes if o["outcome"] == "refused"] == []  # rank 1 always merges
    assert max(o["seconds"] for o in outcomes) < 20


def _foreign(path: Path, kind: str) -> None:
    """Something named like a shard that is not one."""
    shard_attrs = {"format": schema.FORMAT, "schema_version": 1, "run_id": "crafted", "rank": 0, "attempt": 0}
    if kind == "text":
        path.write_text("hello")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(random.Random(1).randbytes(5000))
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it to read would wait for a writer forever
    elif kind in ("/dev/zero", "/etc/passwd", "/nonexistent"):
        path.symlink_to(kind)
    elif kind == "symlink-loop":
        path.symlink_to(path)
    else:
        with h5py.File(path, "w") as f:
            if kind != "hdf5-without-attributes":
                f.attrs.update(shard_attrs)
            if kind == "tables-of-the-wrong-type":
                f["metrics"], f["system"], f["journal"] = np.arange(3.0), np.arange(3.0), np.zeros(3, "u1")
            elif kind == "hdf5-without-attributes":
                f["metrics"] = np.arange(3)


FOREIGN = ["text", "empty", "random", "directory", "fifo", "/dev/zero", "/etc/passwd", "/nonexistent",
           "symlink-loop", "hdf5-without-attributes", "attributes-without-tables", "tables-of-the-wrong-type"]


def test_foreign_files_named_like_shards_are_skipped(tmp_path, genuine):
    dirs = []
    for n, kind in enumerate(FOREIGN):
        dirs.append(_run_with(tmp_path / f"foreign{n}", None, genuine))
        _foreign(dirs[-1] / "shards" / "rank-00000.h5", kind)
    read = bounded_outcomes("read", [d / "shards" / "rank-00000.h5" for d in dirs], timeout=60)
    assert [o["outcome"] for o in read] == ["refused"] * len(FOREIGN), read
    merged = bounded_outcomes("merge", dirs, timeout=120)
    assert [o["outcome"] for o in merged] == ["ok"] * len(FOREIGN), merged
    assert all(any("skipped shard" in p for p in o["problems"]) for o in merged)


def test_a_shard_of_another_run_is_left_out(tmp_path):
    shards = tmp_path / "run" / "shards"
    for rank, run_id in ((0, "ours"), (1, "ours"), (2, "theirs")):
        craft_shard(shards / f"rank-{rank:05d}.h5", attrs={"run_id": run_id, "rank": rank},
                    records=[start_record(run_id, rank, world_size=2), _series(0, "loss")],
                    rows=rows_of([(0, 0, 1.0)]))
    (outcome,) = bounded_outcomes("merge", [tmp_path / "run"])
    assert outcome["outcome"] == "ok"
    assert any("run id 'theirs' is not the run's 'ours'" in p for p in outcome["problems"]), outcome["problems"]
    with h5py.File(tmp_path / "run" / "merged.h5", "r") as f:
        assert sorted(int(r) for r in f["ranks"]["rank"]) == [0, 1]


NAME_KEYS = [("a/b", "TRAINING"), ("../../x", "../ctx"), ("line\nbreak", "c"), ("a\nb", "/etc")]


def _crafted_names(run_dir: Path) -> None:
    """A shard whose names are paths: keys and contexts with separators, '..' and newlines,
    artifact records at '../../etc/passwd', at an absolute path, and one claiming 10 GB."""
    craft_shard(run_dir / "shards" / "rank-00000.h5", attrs={"run_id": "../../evil"},
                records=[start_record("../../evil", world_size=1),
                         *(_series(i, k, c) for i, (k, c) in enumerate(NAME_KEYS)),
                         _artifact("../../etc/passwd"), _artifact("/etc/passwd", name="/etc/passwd"),
                         _artifact("artifacts/rank-00000/big", size=10 << 30)],
                rows=rows_of([(i, 0, float(i)) for i in range(len(NAME_KEYS))]))


def test_names_in_records_are_data_never_paths(tmp_path):
    """Series keys and contexts with separators, '..' and newlines round-trip as strings;
    artifact records pointing at '../../etc/passwd', an absolute path, or claiming 10 GB are
    reported, not followed; a run id of '../../evil' names nothing on disk."""
    run_dir = tmp_path / "box" / "run"
    _crafted_names(run_dir)
    before = files_under(tmp_path)
    (outcome,) = bounded_outcomes("merge", [run_dir])
    assert outcome["outcome"] == "ok", outcome
    new = set(files_under(tmp_path)) - set(before)
    assert new == {"box/run/merged.h5", "box/run/prov.json"}
    assert {k: v for k, v in files_under(tmp_path).items() if k in before} == before  # nothing else touched
    problems = " | ".join(outcome["problems"])
    assert "unsafe path '../../etc/passwd'" in problems and "unsafe path '/etc/passwd'" in problems
    assert "is missing at artifacts/rank-00000/big" in problems
    with h5py.File(run_dir / "merged.h5", "r") as f:
        stored = sorted((s["key"].decode(), s["context"].decode()) for s in f["metrics/series"][()])
    assert stored == sorted(NAME_KEYS)


def test_absurd_sizes_cost_bounded_memory_and_time(tmp_path):
    """A table whose extent claims 10 billion rows, a 17 MiB journal line, a chunk of 1.8 GB,
    JSON nested 100,000 deep, a rank of 10**12: read in a child limited to 3 GiB of memory."""
    base = tmp_path / "absurd"
    paths = {name: base / f"{name}.h5" for name in ("extent", "line", "chunk", "nested", "rank", "attempt")}
    craft_shard(paths["extent"], records=[start_record("crafted"), _series(0, "k")], rows=rows_of([(0, 0, 1.0)]))
    with h5py.File(paths["extent"], "a") as f:
        f["metrics"].resize((10**10,))  # sparse: nothing stored beyond the first chunk
    craft_shard(paths["line"], records=[start_record("crafted")],
                raw_journal=b'{"kind": "param", "value": "' + b"x" * (17 << 20) + b'"}\n')
    craft_shard(paths["chunk"], records=[start_record("crafted")])
    with h5py.File(paths["chunk"], "a") as f:
        del f["system"]
        f.create_dataset("system", shape=(0,), maxshape=(None,), dtype=schema.ROW_DTYPE, chunks=(1 << 26,))
    craft_shard(paths["nested"], records=[start_record("crafted")], raw_journal=b"[" * 100_000 + b"\n")
    craft_shard(paths["rank"], attrs={"rank": 10**12}, records=[start_record("crafted")])
    craft_shard(paths["attempt"], attrs={"attempt": -1}, records=[start_record("crafted")])
    outcomes = dict(zip(paths, bounded_outcomes("read", list(paths.values()), timeout=120), strict=True))
    assert outcomes["extent"]["outcome"] == "ok"  # its one real row is read, nothing more
    assert outcomes["nested"]["outcome"] == "ok"  # the record is skipped and counted, the shard still reads
    for name, why in (("line", "journal record over"), ("chunk", "chunks of at most"),
                      ("rank", "'rank' out of range"), ("attempt", "'attempt' out of range")):
        assert outcomes[name]["outcome"] == "refused" and why in outcomes[name]["message"], outcomes[name]
    assert max(o["seconds"] for o in outcomes.values()) < 20


# -- crafted journals the merge must survive -------------------------------------------------
def _merge_crafted(tmp_path: Path, **shard: object) -> dict:
    craft_shard(tmp_path / "run" / "shards" / "rank-00000.h5", **shard)
    (outcome,) = bounded_outcomes("merge", [tmp_path / "run"], timeout=120)
    return outcome


@pytest.mark.parametrize("records", [
    [_series(0, "k\x00ey")],
    [{"kind": "param", "time": 1.7e9, "key": "k\x00", "value": 1}],
    [_artifact("artifacts/rank-00000/a", name="a\x00b")],
], ids=["series-key", "param-key", "artifact-name"])
def test_nul_characters_in_records_are_kept_by_the_merge(tmp_path, records):
    outcome = _merge_crafted(tmp_path, records=[start_record("crafted", world_size=1), *records],
                             rows=rows_of([(0, 0, 1.0)]))
    assert outcome["outcome"] == "ok", outcome  # NUL is stored as U+FFFD


@pytest.mark.parametrize(("series_rows", "trusted"), [
    ([3, 1], True), ([1, 3], False), ([4], False), ([0, 0, 4], False), ([3, 2], None), ([3, -1, 2], None),
    ([3, 1.0], None), ([3, True], None), ([2**70, 1], None), ("3,1", None)])
def test_wrong_row_counts_in_an_end_record_are_caught(tmp_path, series_rows, trusted):
    """The merge lays out rows by the end record's per-series counts when they add up, checks
    them while copying, and counts the rows itself when they were wrong (True: right; False:
    add up but wrong; None: do not add up, never used)."""
    end = {"kind": "end", "time": 1.7e9, "status": "ok", "rows": {"metrics": 4, "system": 0},
           "series_rows": {"metrics": series_rows, "system": []}}
    craft_shard(tmp_path / "run" / "shards" / "rank-00000.h5",
                records=[start_record("crafted", world_size=1), _series(0, "a"), _series(1, "b"), end],
                rows=rows_of([(0, 0, 1.0), (0, 1, 2.0), (1, 0, 5.0), (0, 2, 3.0)]))
    result = merge_run(tmp_path / "run")
    assert merged_points(result.merged_h5) == {("a", "TRAINING", 0): [(0, 1.0), (1, 2.0), (2, 3.0)],
                                               ("b", "TRAINING", 0): [(0, 5.0)]}
    recounted = [p for p in result.problems if "row counts in end records disagree" in p]
    assert len(recounted) == (trusted is False)


def test_out_of_range_topology_numbers_are_dropped_by_the_merge(tmp_path):
    topology = {"rank": 0, "world_size": 1, "node_rank": 10**30, "local_rank": 2**40}
    outcome = _merge_crafted(tmp_path, records=[start_record("crafted", topology=topology)])
    assert outcome["outcome"] == "ok", outcome


def test_a_claimed_world_size_costs_bounded_memory(tmp_path):
    outcome = _merge_crafted(tmp_path, records=[start_record("crafted", world_size=10**12)])
    assert outcome["outcome"] == "ok", outcome


@pytest.mark.parametrize("when", [1e300, 1e18])
def test_absurd_times_do_not_fail_the_merge(tmp_path, when):
    outcome = _merge_crafted(tmp_path, records=[start_record("crafted", world_size=1),
                                                {"kind": "end", "time": when, "status": "ok"}])
    assert outcome["outcome"] == "ok", outcome


# -- the CLI, when it is there -----------------------------------------------------------------
def test_the_cli_gives_one_line_errors_on_hostile_run_directories(tmp_path, genuine):
    pytest.importorskip("prov4ml_dist.cli")
    dirs = [_run_with(tmp_path / name, data, genuine) for name, data in list(_mutants(genuine).items())[::16]]
    for n, kind in enumerate(("fifo", "/dev/zero", "random")):
        dirs.append(_run_with(tmp_path / f"foreign{n}", None, genuine))
        _foreign(dirs[-1] / "shards" / "rank-00000.h5", kind)
    _crafted_names(tmp_path / "names")
    empty = tmp_path / "empty"
    empty.mkdir()
    dirs += [tmp_path / "names", empty, tmp_path / "nonexistent"]

    def outside_the_runs() -> dict:
        return {k: v for k, v in files_under(tmp_path).items()
                if not any((tmp_path / k).is_relative_to(d) for d in dirs)}

    before = outside_the_runs()
    for directory in dirs:
        for command in ("merge", "summary", "validate"):
            proc = bounded(["-m", "prov4ml_dist", command, str(directory)], timeout=60)
            assert proc.returncode in (0, 1, 2), (command, directory, proc.stderr[-2000:])
            assert "Traceback" not in proc.stderr, (command, directory, proc.stderr[-2000:])
    assert outside_the_runs() == before


def test_validate_does_not_read_special_files_a_prov_json_names(tmp_path, genuine):
    """A tampered prov.json pointing an artifact at /dev/zero (an endless read)."""
    pytest.importorskip("prov4ml_dist.cli")
    run_dir = tmp_path / "run"
    run = Run(RunConfig(experiment_name="e", provenance_save_dir=tmp_path, run_id="v", sample_interval=None),
              Topology())
    run.log_artifact("note.txt", b"hello", "TRAINING")
    run.end()
    run_dir = run.run_dir
    doc = json.loads((run_dir / "prov.json").read_text())
    for entity in doc["entity"].values():
        if "p4d:path" in entity:
            entity["p4d:path"] = "/dev/zero"
    (run_dir / "prov.json").write_text(json.dumps(doc))
    proc = bounded(["-m", "prov4ml_dist", "validate", str(run_dir)], timeout=60)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
