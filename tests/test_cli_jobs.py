"""The prov4ml-dist command line on real 2-rank torchrun jobs: a clean job merged offline gives
the online merge's files; jobs SIGKILLed whole or one rank at a time are recovered up to each
shard's last flush; validate, export, plot and summary on what a real job leaves."""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from prov4ml_dist.merge import load_merged
from prov4ml_dist.shard import ShardReader

from .conftest import BIN, REPO, child_env
from .prov_support import assert_prov_model_valid
from .test_cli_support import assert_same_points, cli, merged_content, merged_points, prov_structure, shard_points

pytestmark = pytest.mark.slow

TRAIN = REPO / "examples" / "train_ddp.py"
UNTIL_KILLED = Path(__file__).parent / "scripts" / "cli_train_until_killed.py"
READY_TIMEOUT_S = 90


def _torchrun(*args: object) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *map(str, args)]


@pytest.fixture(scope="module")
def clean_job(tmp_path_factory) -> Path:
    """examples/train_ddp.py run to its end: merged online by rank 0."""
    out = tmp_path_factory.mktemp("clean")
    done = subprocess.run(_torchrun(TRAIN, "--out", out, "--epochs", "2"), env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (out / "demo").iterdir()
    assert (run_dir / "prov.json").is_file() and (run_dir / "merged.h5").is_file()
    return run_dir


@pytest.fixture
def clean_copy(clean_job, tmp_path) -> Path:
    return Path(shutil.copytree(clean_job, tmp_path / "demo" / clean_job.name))


def test_offline_merge_of_a_clean_job_equals_the_online_merge(clean_job, clean_copy):
    (clean_copy / "merged.h5").unlink()
    (clean_copy / "prov.json").unlink()
    for _ in range(2):  # and again: a second merge completes, it does not duplicate
        done = cli("merge", clean_copy)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "" and done.stdout.count("\n") == 1  # a pipe: just the final line
        assert merged_content(clean_copy / "merged.h5") == merged_content(clean_job / "merged.h5")
        assert prov_structure(clean_copy / "prov.json") == prov_structure(clean_job / "prov.json")
    merges = [json.loads((d / "prov.json").read_text())["activity"]["run:merge"] for d in (clean_job, clean_copy)]
    assert [m["p4d:mode"] for m in merges] == ["online", "offline"]


def test_validate_passes_on_a_clean_job_and_fails_on_a_flipped_byte(clean_copy):
    ok = cli("validate", clean_copy)
    assert ok.returncode == 0 and ok.stdout.startswith("valid:"), ok.stdout
    artifact = clean_copy / "artifacts" / "rank-00001" / "config.json"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    bad = cli("validate", clean_copy)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "config.json of rank 1 does not match its sha256" in bad.stdout, bad.stdout


def test_validate_fails_on_a_prov_json_missing_a_rank_agent(clean_copy):
    prov_json = clean_copy / "prov.json"
    doc = json.loads(prov_json.read_text())
    del doc["agent"][next(a for a in doc["agent"] if a.endswith("rank-00001"))]
    prov_json.write_text(json.dumps(doc))
    bad = cli("validate", prov_json)
    assert bad.returncode == 1, bad.stdout
    assert "rank 1 has no agent" in bad.stdout and "not in the document" in bad.stdout


def test_export_provn_dot_svg_and_csv(clean_copy, tmp_path):
    for fmt in ("provn", "dot", "svg"):
        done = cli("export", clean_copy, "--format", fmt)
        if fmt == "svg" and shutil.which("dot") is None:
            pytest.skip("Graphviz is not installed (apt-get install graphviz)")
        assert done.returncode == 0, done.stderr
    provn = (clean_copy / "prov.provn").read_text()
    assert provn.startswith("document") and provn.rstrip().endswith("endDocument")
    assert "agent(run:rank-00000" in provn and "agent(run:rank-00001" in provn
    assert provn.count("(") == provn.count(")")
    if shutil.which("dot"):  # the dot file is what Graphviz parses
        parsed = subprocess.run(["dot", "-Tcanon", str(clean_copy / "prov.dot")], capture_output=True, timeout=120)
        assert parsed.returncode == 0, parsed.stderr
    assert (clean_copy / "prov.svg").read_text().lstrip().startswith("<?xml")
    assert "<svg" in (clean_copy / "prov.svg").read_text()
    done = cli("export", clean_copy, "--format", "csv", "-o", tmp_path / "points.csv")
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "points.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    merged = load_merged(clean_copy / "merged.h5")
    assert len(rows) == sum(s.count for s in merged.series if s.dataset == "/metrics/rows")
    assert {(r["rank"], r["key"], r["context"]) for r in rows} == {
        (str(s.rank), s.key, s.context) for s in merged.series if s.dataset == "/metrics/rows"}


def test_sparql_over_the_turtle_of_a_real_job(clean_copy):
    """The issue's queries: the script's git commit, Python and torch versions, every generation and
    every model-version lineage, by plain SPARQL over `export --format ttl`."""
    rdflib = pytest.importorskip("rdflib")
    assert_prov_model_valid(clean_copy / "prov.json")
    done = cli("export", clean_copy, "--format", "ttl")
    assert done.returncode == 0, done.stderr
    graph = rdflib.Graph().parse(clean_copy / "prov.ttl", format="turtle")
    prefixes = "PREFIX prov: <http://www.w3.org/ns/prov#> PREFIX p4d: <https://prov4ml-dist.org/ns#> "
    found = {tuple(map(str, row)) for row in graph.query(prefixes + """SELECT ?commit ?python ?torch WHERE {
        ?p a p4d:RankProcess ; prov:qualifiedAssociation [ prov:hadPlan ?plan ] ; prov:used ?stack .
        ?plan p4d:git_commit ?commit . ?stack p4d:python ?python ; p4d:torch ?torch . }""")}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    torch = pytest.importorskip("torch")
    assert found == {(head, platform.python_version(), torch.__version__)}
    doc = json.loads((clean_copy / "prov.json").read_text())
    generations = len({(r["prov:entity"], r["prov:activity"]) for r in doc["wasGeneratedBy"].values()})
    assert len(graph.query(prefixes + "SELECT ?e ?a WHERE { ?e prov:wasGeneratedBy ?a }")) == generations
    lineage = graph.query(prefixes + """SELECT ?new ?old WHERE { ?new prov:wasRevisionOf ?old ;
        prov:wasDerivedFrom ?old ; p4d:item "model_version" . }""")
    versions = [e for e in doc["entity"].values() if e.get("p4d:item") == "model_version" and "p4d:rank" in e]
    assert len(lineage) == len(versions) - 2 > 0  # each rank's versions after its first


def test_plot_a_real_job(clean_job, tmp_path):
    done = cli("plot", clean_job, "-o", tmp_path)
    assert done.returncode == 0, done.stderr
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"metric_loss_TRAINING.png", "metric_val_acc_VALIDATION.png", "system_process_cpu_percent.png",
            "system_process_memory_rss.png"} <= names
    assert all(p.stat().st_size > 10_000 for p in tmp_path.glob("*.png"))
    assert "no GPU series" in done.stderr or any(n.startswith("system_gpu_") for n in names)


def test_summary_of_a_real_job(clean_job):
    done = cli("summary", clean_job)
    assert done.returncode == 0, done.stderr
    assert max(map(len, done.stdout.splitlines())) <= 100
    for text in ("Ranks        2 of world size 2: 2 complete", "loss", "val_acc", "Artifacts", "mlp: 610 parameters",
                 "Stragglers", "process_memory_rss"):
        assert text in done.stdout, text


# -- crashes -----------------------------------------------------------------------------
def _start_until_killed(save: Path, local: Path | None = None) -> tuple[subprocess.Popen, dict[int, int]]:
    """The job, once both ranks have flushed some steps; returns torchrun and the ranks' pids."""
    proc = subprocess.Popen(_torchrun(UNTIL_KILLED, save, *([local] if local else [])), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all((save / f"ready-{r}").exists() for r in (0, 1)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the job did not start: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    time.sleep(0.3)  # a few more flushes
    return proc, {r: int((save / f"ready-{r}").read_text()) for r in (0, 1)}


def _expected(shards: dict[int, Path]) -> dict[int, dict]:
    """What each shard holds by ShardReader, and that it was left by a crash where expected."""
    return {rank: shard_points(path) for rank, path in shards.items()}


def test_whole_job_sigkilled_then_merged_offline_from_local_dirs(tmp_path):
    save, local = tmp_path / "prov", tmp_path / "local"
    proc, pids = _start_until_killed(save, local)
    for pid in pids.values():  # torchrun starts each worker in its own session
        os.killpg(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    (run_dir,) = (save / "crash").iterdir()
    shards = {r: local / f"rank-{r}" / "crash" / run_dir.name / "shards" / f"rank-0000{r}.h5" for r in (0, 1)}
    for path in shards.values():
        with ShardReader(path) as reader:
            assert reader.recovered and reader.end_record() is None
    expected = _expected(shards)
    local_dirs = [local / "rank-0", local / "rank-1"]
    done = cli("merge", run_dir, "--local-dirs", *local_dirs)
    assert done.returncode == 0, done.stderr
    assert "(2 incomplete)" in done.stdout
    for rank in (0, 1):
        assert expected[rank][("metrics", "loss", "TRAINING", "")].shape[0] > 20
        assert_same_points(merged_points(run_dir / "merged.h5", rank), expected[rank])
    assert [(r.rank, r.status, r.complete) for r in load_merged(run_dir / "merged.h5").ranks] == [
        (0, "incomplete", False), (1, "incomplete", False)]
    agents = json.loads((run_dir / "prov.json").read_text())["agent"]
    assert sorted(a["p4d:status"] for a in agents.values() if "p4d:rank" in a) == ["incomplete", "incomplete"]
    assert cli("validate", run_dir).returncode == 0  # the artifacts came along, verified
    assert_prov_model_valid(run_dir / "prov.json")
    first = merged_content(run_dir / "merged.h5")
    again = cli("merge", run_dir, "--local-dirs", *local_dirs)
    assert again.returncode == 0 and "0 files copied" in again.stdout
    assert merged_content(run_dir / "merged.h5") == first


def test_one_rank_sigkilled_then_merged_offline(tmp_path):
    save = tmp_path / "prov"
    proc, pids = _start_until_killed(save)
    os.kill(pids[1], signal.SIGKILL)
    try:
        assert proc.wait(timeout=90) != 0  # torchrun stops the other rank and fails
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (run_dir,) = (save / "crash").iterdir()
    assert not (run_dir / "merged.h5").exists()
    expected = _expected({r: run_dir / "shards" / f"rank-0000{r}.h5" for r in (0, 1)})
    done = cli("merge", run_dir)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert_same_points(merged_points(run_dir / "merged.h5", rank), expected[rank])
    ranks = {r.rank: r for r in load_merged(run_dir / "merged.h5").ranks}
    assert ranks[1].status == "incomplete" and not ranks[1].complete
    assert ranks[0].status != "ok"  # closed on its way out (SIGTERM from torchrun, or an error), not end_run
    summary = cli("summary", run_dir)
    assert "Incomplete ranks (1)" in summary.stdout or "Incomplete ranks (2)" in summary.stdout
