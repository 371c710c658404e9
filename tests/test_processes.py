"""Processes, threads and signals: forked children never touch the parent's shard, SIGTERM
during the main thread's own flushes never hangs or loses what was due, ``end_run`` works
from any thread, and a missing Graphviz is a warning (README, "Guarantees").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import BIN, child_env
from .faultkit import merged_counts, read_shard, signal_trials

SCRIPTS = Path(__file__).parent / "scripts"


# -- fork ------------------------------------------------------------------------------------
def _forking_run(tmp_path: Path, mode: str, points_per_item: int) -> tuple[dict, Path, str]:
    save, run_id = tmp_path / "prov", f"fork-{mode}-{points_per_item}"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "fork_children.py"), str(save), run_id, mode,
                           str(points_per_item)], capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), save / "forks" / run_id, proc.stderr


def _assert_parent_intact(result: dict, run_dir: Path) -> None:
    """The parent's points all in its shard (closed once, by the parent) and in both merges;
    nothing of the children's anywhere."""
    shard = read_shard(run_dir / "shards" / "rank-00000.h5")
    assert not shard.recovered and shard.end["status"] == "ok"
    assert shard.end["failure_count"] == 0 and shard.end["lost_rows"] == {"metrics": 0, "system": 0}
    np.testing.assert_array_equal(shard.rows["step"], np.arange(result["logged"]))
    assert result["prov_json"] is not None, "end_run's merge failed"
    assert merged_counts(run_dir / "merged.h5", "parent") == {(0, 0): result["logged"]}
    assert merged_counts(run_dir / "merged.h5", "child") == {}
    offline = subprocess.run([str(BIN / "prov4ml-dist"), "merge", str(run_dir)], capture_output=True, text=True,
                             timeout=300, env=child_env())
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert merged_counts(run_dir / "merged.h5", "parent") == {(0, 0): result["logged"]}


@pytest.mark.parametrize("points_per_item", [3, 20_000])
def test_forked_dataloader_workers_that_log_leave_the_parents_run_intact(tmp_path, points_per_item):
    """A few points per item were silently lost; 20,000 passed the buffer's hard limit, the
    worker flushed into the parent's file and the rank's whole provenance was gone. Now each
    worker's calls are refused, with one warning per worker, and counted."""
    result, run_dir, stderr = _forking_run(tmp_path, "dataloader", points_per_item)
    _assert_parent_intact(result, run_dir)
    assert result["max_refused"] >= points_per_item + 1  # every call of a worker was counted
    assert 1 <= stderr.count("records nothing, and its logging calls are ignored") <= 4  # once per worker (2 epochs)


def test_forked_helpers_that_exit_or_are_terminated_do_not_close_the_parents_shard(tmp_path):
    """An ``os.fork`` child leaving through ``sys.exit`` (atexit) and a terminated
    ``multiprocessing`` child (SIGTERM) wrote an ``end`` record into the parent's live shard.
    Spawned ``Pool`` workers re-import the library: no run there, a clear error, no file touched."""
    result, run_dir, _ = _forking_run(tmp_path, "helpers", 20_000)
    assert result["sys_exit_status"] == 0 and result["terminated_exitcode"] == -15
    assert result["spawned"] == ["RunStateError"] * 4
    _assert_parent_intact(result, run_dir)
    from prov4ml_dist.shard import ShardReader

    with ShardReader(run_dir / "shards" / "rank-00000.h5") as reader:
        assert [r["status"] for r in reader.records("end")] == ["ok"]
        assert not [r for r in reader.records("param") if r["key"] == "child_param"]



# -- SIGTERM ---------------------------------------------------------------------------------
SIGTERM_TRIALS = 80


def test_sigterm_during_the_logging_threads_own_flushes_never_hangs_or_loses_what_was_due(tmp_path):
    """80 SIGTERMs at random moments into ranks whose logging thread flushes itself every 64
    points while the flusher competes for the lock. The handler used to close the shard from
    inside that flush and join the flusher, which waited on that flush: a hang until SIGKILL.
    Now every rank dies of the signal within the bound, its shard closed, every point there.
    Half the ranks have their shard written by a drain process (each flush a request to it),
    half by their flusher thread."""
    outcomes, stderr = signal_trials(tmp_path, SIGTERM_TRIALS, seed=18)
    assert len(outcomes) == SIGTERM_TRIALS
    assert [o["trial"] for o in outcomes if o["hung"]] == []
    assert {o["code"] for o in outcomes} == {-15}
    for outcome in outcomes:
        shard = read_shard(Path(outcome["shard"]))
        assert shard.end is not None and shard.end["status"] == "killed-by-SIGTERM", outcome
        assert shard.end["written_by"] == {"on": "drain process", "off": "flusher thread"}[outcome["drain"]]
        assert shard.end["lost_rows"]["metrics"] == 0 and shard.end["rows"]["metrics"] == len(shard.rows)
        np.testing.assert_array_equal(shard.rows["step"], np.arange(len(shard.rows)))
        np.testing.assert_array_equal(shard.rows["value"], shard.rows["step"].astype(float))
        # Every point the rank had logged when the signal was sent is there: the handler's close
        # flushed them all (a stronger promise than "older than flush_interval").
        assert len(shard.rows) >= outcome["logged_before"], outcome
    assert "received during a flush" in stderr  # the deferred path ran, not only the easy one


# -- end_run from another thread -------------------------------------------------------------
END_FROM_A_THREAD = """
import json, os, signal, sys, threading
import prov4ml_dist as prov4ml
from prov4ml_dist.shard import ShardReader

def end_in_a_thread():
    out = {}
    def end():
        try:
            out["prov_json"] = str(prov4ml.end_run(create_graph=True))
        except BaseException as exc:
            out["error"] = repr(exc)
    thread = threading.Thread(target=end)
    thread.start()
    thread.join(120)
    return out

for attempt in range(2):  # a second run in the same process: the hooks work again
    run_dir = prov4ml.start_run(experiment_name="t", provenance_save_dir=sys.argv[1], run_id=f"r{attempt}",
                                sample_interval=None)
    for step in range(1000):
        prov4ml.log_metric("loss", float(step), prov4ml.Context.TRAINING, step=step)
    out = end_in_a_thread()
    with ShardReader(run_dir / "shards" / "rank-00000.h5") as reader:
        out["end"] = [r["status"] for r in reader.records("end")]
    out["active"] = prov4ml.get_active_run() is not None
    print(json.dumps(out), flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # no run: the default action, as before start_run
print("survived SIGTERM", flush=True)
"""


def test_end_run_from_another_thread_merges_closes_and_leaves_the_signals_working(tmp_path):
    """``signal.signal`` refuses to run off the main thread: end_run raised ValueError after the
    run was cleared, leaving a shard with only its start record and no merge."""
    proc = subprocess.run([sys.executable, "-c", END_FROM_A_THREAD, str(tmp_path / "prov")], capture_output=True,
                          text=True, timeout=300, env=child_env())
    assert proc.returncode == -15 and "survived" not in proc.stdout, proc.stdout + proc.stderr[-3000:]
    for line, run_id in zip(proc.stdout.splitlines(), ("r0", "r1"), strict=True):
        out = json.loads(line)
        assert "error" not in out, out
        assert out["prov_json"] == str(tmp_path / "prov" / "t" / run_id / "prov.json")
        assert out["end"] == ["ok"] and not out["active"]
        assert (tmp_path / "prov" / "t" / run_id / "prov.dot").is_file()
        assert merged_counts(tmp_path / "prov" / "t" / run_id / "merged.h5") == {(0, 0): 1000}


# -- Graphviz --------------------------------------------------------------------------------
NO_GRAPHVIZ = """
import json, sys
import prov4ml_dist as prov4ml
prov4ml.start_run(experiment_name="t", provenance_save_dir=sys.argv[1], run_id="svg", sample_interval=None)
prov4ml.log_metric("loss", 1.0, prov4ml.Context.TRAINING)
print(json.dumps(str(prov4ml.end_run(create_graph=True, create_svg=True))), flush=True)
"""


def test_create_svg_without_graphviz_is_a_warning_and_the_run_is_complete(tmp_path):
    """yProv4ML scripts pass create_svg=True routinely: a missing ``dot`` raised MergeError out
    of end_run."""
    env = child_env(PATH=str(BIN))  # this venv's bin only: no Graphviz ``dot`` on it
    proc = subprocess.run([sys.executable, "-c", NO_GRAPHVIZ, str(tmp_path / "prov")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "prov" / "t" / "svg"
    assert json.loads(proc.stdout.splitlines()[-1]) == str(run_dir / "prov.json")
    assert "Graphviz 'dot' is not installed" in proc.stderr and "prov.json is complete" in proc.stderr
    assert (run_dir / "prov.dot").is_file() and not (run_dir / "prov.svg").exists()


# -- one rule each: safe relative paths, whole-or-nothing writes -----------------------------
@pytest.mark.parametrize(("path", "inside"), [
    ("artifacts/rank-00000/note.txt", "artifacts/rank-00000/note.txt"), ("a/./b", "a/b"), ("a//b", "a/b"),
    ("../x", None), ("a/../../x", None), ("/etc/passwd", None), ("a\\..\\x", None), (".", None), ("", None),
    ("a\nb", None), ("a\x00b", None), (3, None)])
def test_one_rule_decides_which_recorded_paths_stay_inside(path, inside):
    """Five copies had different rules ('.' and backslashes refused by some, not others)."""
    from prov4ml_dist.aggregate import _checked_target
    from prov4ml_dist.cli.localdirs import _own_artifact_path
    from prov4ml_dist.paths import relative_inside

    assert (None if relative_inside(path) is None else str(relative_inside(path))) == inside
    entry = {"path": path, "size": 1, "sha256": "0" * 64, "kind": "artifact"}
    if inside is None:  # every consumer of recorded paths refuses what the rule refuses
        assert _checked_target(Path("/run"), 0, entry) is None and _own_artifact_path(0, path) is None


def test_every_atomic_writer_uses_the_one_temporary_scheme(tmp_path, monkeypatch):
    """Six naming variants (``.part-PID``, ``.PID.tmp``, ``.partial``, ...) meant a crash's
    leftovers could not be told from real files; now every rename comes from ``is_temporary``."""
    import os

    import torch

    from prov4ml_dist.cli import main
    from prov4ml_dist.merge import merge_run
    from prov4ml_dist.paths import is_temporary

    from .faultkit import EXPERIMENT, genuine_runs

    renamed: list[str] = []
    replace = os.replace

    def recording_replace(src: os.PathLike, dst: os.PathLike) -> None:
        renamed.append(Path(src).name)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    runs = genuine_runs(tmp_path / "prov", "tmps")
    runs[0].save_model_version(torch.nn.Linear(2, 2), "net", "TRAINING")  # models.save_model
    for run in runs:
        run.close()
    run_dir = tmp_path / "prov" / EXPERIMENT / "tmps"
    merge_run(run_dir)  # merged.h5 and prov.json
    assert main(["export", str(run_dir), "--format", "provn"]) in (0, None)
    assert len(renamed) >= 4 and all(is_temporary(name) for name in renamed), renamed
    assert not [p for p in run_dir.rglob("*") if is_temporary(p.name)]


CRASHING_MERGE = """
import os, sys
import prov4ml_dist.provenance
from prov4ml_dist.merge import merge_run
prov4ml_dist.provenance.write_prov_json = lambda doc, path: os._exit(9)  # dies with merged.h5 half done
merge_run(sys.argv[1])
"""


def test_a_merge_that_crashed_leaves_a_temporary_the_next_merge_removes(tmp_path):
    """A crashed merge's temporary merged.h5 is as large as the shards, and its old name
    (``.merged.h5.PID.tmp``) was never cleaned up: a disk filled run after run."""
    from prov4ml_dist.merge import merge_run
    from prov4ml_dist.paths import is_temporary

    from .faultkit import EXPERIMENT, genuine_runs

    for run in genuine_runs(tmp_path / "prov", "crash"):
        run.close()
    run_dir = tmp_path / "prov" / EXPERIMENT / "crash"
    crashed = subprocess.run([sys.executable, "-c", CRASHING_MERGE, str(run_dir)], capture_output=True, text=True,
                             timeout=300, env=child_env())
    assert crashed.returncode == 9, crashed.stderr[-2000:]
    left = [p.name for p in run_dir.iterdir() if is_temporary(p.name)]
    assert len(left) == 1 and left[0].startswith(".merged.h5.") and not (run_dir / "merged.h5").exists()
    merge_run(run_dir)
    assert [p.name for p in run_dir.iterdir() if is_temporary(p.name)] == []
    assert merged_counts(run_dir / "merged.h5") == {(0, 0): 3000, (1, 0): 3000}
