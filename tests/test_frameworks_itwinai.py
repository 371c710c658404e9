"""itwinai: ProvMLItwinAILogger on 2 ranks under torchrun, as itwinai's trainers drive it; a
rank that ``log_on_workers`` leaves out is "not logging" (a choice), not missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prov4ml_dist.merge.load import load_merged

from .conftest import BIN
from .frameworks_support import SCRIPTS, assert_one_run, framework_env, run_job, torchrun

pytestmark = pytest.mark.slow


def test_a_rank_log_on_workers_leaves_out_is_not_logging_not_missing(tmp_path):
    """log_on_workers=[0] on 2 ranks: one run of 2 ranks, both complete; rank 1 recorded no
    point, param or system sample and is "not-logging" (with its reason) in merged.h5, in
    `summary` and in prov.json (its agent's status, the run's not_logging_ranks), never
    missing or incomplete. Old code: rank 1 logged like rank 0 (log_on_workers was ignored)."""
    run_job([*torchrun(2), str(SCRIPTS / "itwinai_train.py"), str(tmp_path / "prov"), "[0]"], tmp_path)
    run_dir = assert_one_run(tmp_path / "prov", "itwinai", 2, ())
    merged = load_merged(run_dir / "merged.h5")
    status = {r.rank: (r.status, r.complete) for r in merged.ranks}
    assert status == {0: ("ok", True), 1: ("not-logging", True)}
    assert "log_on_workers=[0] leaves out rank 1" in next(r.reason for r in merged.ranks if r.rank == 1)
    assert {s.rank for s in merged.series} == {0} and {s.key for s in merged.series} >= {"loss", "rank_marker"}
    assert [(p.key, p.ranks) for p in merged.params if p.key == "lr"] == [("lr", (0,))]
    assert not [p for p in merged.problems if "rank 1" in p], merged.problems

    summary = subprocess.run([str(BIN / "prov4ml-dist"), "summary", str(run_dir)], capture_output=True, text=True,
                             env=framework_env(), timeout=120)
    assert summary.returncode == 0, summary.stderr
    assert "1 not-logging" in summary.stdout and "Not logging (1)" in summary.stdout, summary.stdout
    assert "Incomplete" not in summary.stdout and "Missing" not in summary.stdout

    doc = json.loads((run_dir / "prov.json").read_text())
    agents = {int(_plain(a["p4d:rank"])): _plain(a["p4d:status"]) for a in doc["agent"].values() if "p4d:rank" in a}
    assert agents == {0: "complete", 1: "not-logging"}
    run = next(a for a in doc["activity"].values() if "p4d:not_logging_ranks" in a)
    assert _plain(run["p4d:not_logging_ranks"]) == ["1"] and "p4d:missing_ranks" not in run


def _plain(value):
    """A PROV-JSON value without its type: {"$": 1, "type": "xsd:long"} is 1; lists item by item."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value["$"] if isinstance(value, dict) and "$" in value else value


def test_the_logger_subclasses_itwinais_logger_where_itwinai_is_installed(tmp_path):
    """With itwinai importable (not in CI: see README, itwinai), ProvMLItwinAILogger is an
    itwinai Logger that itwinai's own machinery drives: LoggersCollection and its
    start_logging context start, feed and end our run."""
    code = ("import sys; from itwinai.loggers import Logger, LoggersCollection; "
            "from prov4ml_dist.loggers.prov4ml_itwinai_logger import ProvMLItwinAILogger as L; "
            "assert issubclass(L, Logger); l = L(log_freq=3, log_on_workers=[0, 2]); l.worker_rank = 2; "
            "assert l.should_log(6) and not l.should_log(4); l.worker_rank = 1; assert not l.should_log(); "
            "c = LoggersCollection([L(experiment_name='itw', provenance_save_dir=sys.argv[1], log_freq='batch', "
            "log_on_workers=-1)])\n"
            "with c.start_logging(rank=0):\n"
            "    c.save_hyperparameters({'lr': 0.1}); c.log(1.5, 'loss', kind='metric', step=0, batch_idx=0)\n")
    pytest.importorskip("itwinai.loggers")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=framework_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "itw").iterdir()
    merged = load_merged(run_dir / "merged.h5")
    assert [(s.key, s.last) for s in merged.series if s.key == "loss"] == [("loss", 1.5)]
    assert [p.key for p in merged.params] == ["lr"]
