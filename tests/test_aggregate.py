"""finish_run in one process, and rank 0's plan (which file is present, fetched, copied or
linked) from hand-made manifests. Real multi-rank runs are in test_distributed.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

import prov4ml_dist as prov4ml
from prov4ml_dist import aggregate
from prov4ml_dist.aggregate import DEPARTURE_MARGIN_S, make_plan
from prov4ml_dist.errors import MergeError
from prov4ml_dist.run import Run, RunConfig
from prov4ml_dist.topology import Topology

TIMEOUT = 60.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(path: str, data: bytes, kind: str = "artifact") -> dict:
    return {"path": path, "size": len(data), "sha256": sha(data), "kind": kind}


def manifest(rank: int, *files: dict, waits: float = 1e6) -> dict:
    shard = entry(f"shards/rank-{rank:05d}.h5", f"shard {rank}".encode(), "shard")
    return {"rank": rank, "files": [shard, *files], "problems": [], "waits_s": waits}


def put(run_dir: Path, path: str, data: bytes) -> None:
    (run_dir / path).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / path).write_bytes(data)


def test_shared_directory_needs_no_transfer(tmp_path):
    manifests = {r: manifest(r, entry(f"artifacts/rank-{r:05d}/a.json", b"same")) for r in range(2)}
    for r in range(2):
        put(tmp_path, f"shards/rank-{r:05d}.h5", f"shard {r}".encode())
        put(tmp_path, f"artifacts/rank-{r:05d}/a.json", b"same")
    plan = make_plan(tmp_path, manifests, 2, TIMEOUT)
    assert (plan.present, plan.fetch, plan.copy, plan.link, plan.missing, plan.problems) == (4, {}, [], [], {}, [])


def test_private_directories_are_fetched_once_per_content(tmp_path):
    config = b'{"lr": 0.1}'
    manifests = {r: manifest(r, entry(f"artifacts/rank-{r:05d}/config.json", config),
                             entry(f"artifacts/rank-{r:05d}/own.bin", bytes([r]) * 10)) for r in range(3)}
    plan = make_plan(tmp_path, manifests, 3, TIMEOUT)
    assert [e["path"] for e in plan.copy] == ["shards/rank-00000.h5", "artifacts/rank-00000/config.json",
                                              "artifacts/rank-00000/own.bin"]  # rank 0's own: a local copy
    assert {r: [e["path"] for e in files] for r, files in plan.fetch.items()} == {
        1: ["shards/rank-00001.h5", "artifacts/rank-00001/own.bin"],
        2: ["shards/rank-00002.h5", "artifacts/rank-00002/own.bin"]}
    assert [(src, e["path"]) for src, e in plan.link] == [
        (tmp_path / "artifacts/rank-00000/config.json", f"artifacts/rank-{r:05d}/config.json") for r in (1, 2)]
    assert [e["index"] for e in plan.fetch[1]] == [0, 2]  # indices into the rank's own manifest


def test_a_file_already_present_is_the_source_of_its_duplicates(tmp_path):
    put(tmp_path, "artifacts/rank-00001/m.pt", b"weights")
    manifests = {0: manifest(0, entry("artifacts/rank-00000/m.pt", b"weights")),
                 1: manifest(1, entry("artifacts/rank-00001/m.pt", b"weights"))}
    plan = make_plan(tmp_path, manifests, 2, TIMEOUT)
    assert [(src.name, e["path"]) for src, e in plan.link] == [("m.pt", "artifacts/rank-00000/m.pt")]


@pytest.mark.parametrize("path", [
    "artifacts/rank-00000/theirs.json",  # another rank's directory
    "shards/rank-00000.h5",  # another rank's shard
    "artifacts/rank-00001/../rank-00000/x", "/etc/passwd", "merged.h5", "artifacts/rank-00001/a\\b",
])
def test_entries_naming_what_is_not_the_ranks_own_are_refused(tmp_path, path):
    manifests = {0: manifest(0), 1: manifest(1, entry(path, b"x"))}
    plan = make_plan(tmp_path, manifests, 2, TIMEOUT)
    assert all(e["path"] != path for files in plan.fetch.values() for e in files)
    assert any("refused" in p for p in plan.problems)


@pytest.mark.parametrize("bad", [{"size": -1}, {"size": 1.5}, {"sha256": "zz"}, {"kind": "exe"}, {"path": 3}])
def test_malformed_entries_are_refused(tmp_path, bad):
    plan = make_plan(tmp_path, {0: manifest(0), 1: manifest(1, {**entry("artifacts/rank-00001/a", b"a"), **bad})},
                     2, TIMEOUT)
    assert [e["path"] for e in plan.fetch[1]] == ["shards/rank-00001.h5"]
    assert any("refused" in p for p in plan.problems)


def test_absent_malformed_and_shardless_ranks_are_missing_with_a_reason(tmp_path):
    manifests = {0: manifest(0), 1: {"rank": 7}, 3: {"rank": 3, "files": [], "problems": ["shard unreadable"]},
                 4: {"rank": 4, "files": "x", "problems": []}}
    plan = make_plan(tmp_path, manifests, 5, TIMEOUT)
    assert "malformed" in plan.missing[1] and "malformed" in plan.missing[4]
    assert "did not reach end_run within merge_timeout (60 s)" == plan.missing[2]
    assert "no readable shard" in plan.missing[3]
    assert "rank 3: shard unreadable" in plan.problems


def test_nothing_is_asked_of_a_rank_about_to_stop_waiting_and_it_is_told(tmp_path):
    """The rank's wait is a duration counted from its manifest's arrival: 40 s sent, 35 s
    since (by rank 0's monotonic clock) leaves 5 s, too little to be asked."""
    manifests = {0: manifest(0), 1: manifest(1, waits=40.0), 2: manifest(2, waits=40.0)}
    plan = make_plan(tmp_path, manifests, 3, TIMEOUT, waited=40.0 - DEPARTURE_MARGIN_S + 5)
    assert plan.fetch == {}
    assert {r: [f["index"] for f in files] for r, files in plan.left_out.items()} == {1: [0], 2: [0]}
    assert plan.not_transferred == {"1": ["shards/rank-00001.h5"], "2": ["shards/rank-00002.h5"]}
    assert make_plan(tmp_path, manifests, 3, TIMEOUT, waited=0.0).left_out == {}


def test_every_ranks_shard_streams_before_any_artifact(tmp_path):
    """A shard never waits behind another rank's artifacts: each rank sends its shard stream,
    then its artifact stream, and rank 0 takes all shard streams first."""
    big = {r: entry(f"artifacts/rank-{r:05d}/big", bytes([r]) * 100) for r in (1, 2)}
    plan = make_plan(tmp_path, {0: manifest(0), 1: manifest(1, big[1]), 2: manifest(2, big[2]), 3: manifest(3)},
                     4, TIMEOUT)
    assert {r: [[f["path"] for f in stream] for stream in streams] for r, streams in plan.streams().items()} == {
        1: [["shards/rank-00001.h5"], ["artifacts/rank-00001/big"]],
        2: [["shards/rank-00002.h5"], ["artifacts/rank-00002/big"]], 3: [["shards/rank-00003.h5"]]}


def test_a_duplicate_is_copied_where_hard_links_fail(tmp_path, monkeypatch):
    put(tmp_path, "a", b"content")

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert aggregate._link(tmp_path / "a", tmp_path / "sub" / "b", 7) is None
    assert (tmp_path / "sub" / "b").read_bytes() == b"content" and not (tmp_path / "sub" / "b").samefile(tmp_path / "a")
    assert "did not arrive" in aggregate._link(tmp_path / "a", tmp_path / "c", 8)


# -- finish_run on one process --------------------------------------------------------------
def _log_a_little() -> None:
    for step in range(5):
        prov4ml.log_metric("loss", 1.0 / (step + 1), prov4ml.Context.TRAINING, step=step)
    prov4ml.log_artifact("cfg.json", {"a": 1}, prov4ml.Context.TRAINING)


def test_single_process_with_a_private_directory_copies_then_merges(tmp_path):
    run_dir = prov4ml.start_run(experiment_name="e", provenance_save_dir=tmp_path / "prov",
                                local_dir=tmp_path / "local", sample_interval=None)
    _log_a_little()
    prov_json = prov4ml.end_run()
    assert prov_json == run_dir / "prov.json" and prov_json.is_file()
    assert (run_dir / "shards" / "rank-00000.h5").is_file()
    assert (run_dir / "artifacts" / "rank-00000" / "cfg.json").read_text() == '{"a": 1}'
    report = json.loads((run_dir / "aggregate.json").read_text())
    assert (report["transport"], report["files_copied"], report["missing"]) == ("none", 2, {})


def test_a_failed_merge_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise MergeError("disk full")

    monkeypatch.setattr("prov4ml_dist.merge.merge_run", broken)
    run_dir = prov4ml.start_run(experiment_name="e", provenance_save_dir=tmp_path, sample_interval=None)
    _log_a_little()
    with caplog.at_level(logging.WARNING, logger="prov4ml_dist.aggregate"):
        assert prov4ml.end_run() is None
    assert "disk full" in caplog.text and f"prov4ml-dist merge {run_dir}" in caplog.text
    assert (run_dir / "shards" / "rank-00000.h5").is_file()


def test_ranks_that_cannot_reach_each_other_leave_the_merge_to_the_cli(tmp_path, caplog):
    run = Run(RunConfig(experiment_name="e", provenance_save_dir=tmp_path, run_id="r1", sample_interval=None),
              Topology(rank=0, world_size=2))
    with caplog.at_level(logging.WARNING, logger="prov4ml_dist.aggregate"):
        assert run.end() is None
    assert "cannot reach each other" in caplog.text and "prov4ml-dist merge" in caplog.text
    assert not (run.run_dir / "merged.h5").exists()


def test_a_process_group_destroyed_before_end_run_is_named_with_the_local_dirs_command(tmp_path, caplog):
    """The rank found its rank from an initialised process group at start_run; at end_run there
    is none (no torchrun store, no MPI): the message names the call order, and the merge command
    brings in the node-local directory."""
    pytest.importorskip("torch.distributed")
    run = Run(RunConfig(experiment_name="e", provenance_save_dir=tmp_path / "prov", local_dir=tmp_path / "local",
                        run_id="r1", sample_interval=None),
              Topology(rank=1, world_size=2, launcher="torch.distributed"))
    with caplog.at_level(logging.WARNING, logger="prov4ml_dist.aggregate"):
        assert run.end() is None
    assert "process group was destroyed before end_run" in caplog.text
    assert "call end_run before destroy_process_group" in caplog.text
    assert f"prov4ml-dist merge {run.run_dir} --local-dirs {run.rank_root}" in caplog.text
