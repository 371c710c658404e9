"""prov.json from merge_run: parses with prov, one agent per rank, typed literals, bounded size."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from prov.model import ProvDocument, ProvElement

sys.path.insert(0, str(Path(__file__).parent))
from test_merge_support import T0, log_series, open_shard  # noqa: E402

from prov4ml_dist.merge import load_merged, merge_run  # noqa: E402
from prov4ml_dist.provenance import build_document, to_dot, write_graph, write_provn  # noqa: E402
from prov4ml_dist.provenance.terms import local_name, user_namespace_iri  # noqa: E402


def _run(run_dir: Path, ranks: int = 4, points: int = 100, keys: int = 2) -> Path:
    for r in range(ranks):
        w = open_shard(run_dir, r, ranks)
        for k in range(keys):
            sid = w.metrics.register(f"loss/{k}", "TRAINING", "")
            for s in range(points // keys):
                w.metrics.append(sid, s, float(s % 7) if s != 3 else float("nan"), T0 + s + r * 0.01)
        log_series(w, "acc", [(0, 1.0, T0)], context="VALIDATION")
        w.record({"kind": "param", "time": T0, "key": "lr", "value": 0.1 if r else 0.2})
        w.record({"kind": "dataset", "time": T0, "label": "train", "stats": {"samples": 100, "shape": [3, 4]}})
        w.record({"kind": "sensor", "time": T0, "name": "nvml", "available": True,
                   "devices": [{"index": 0, "uuid": f"GPU-{r}"}]})
        w.record({"kind": "energy", "time": T0, "gpu_joules": 5.0, "rapl": [], "rapl_joules": 0.0,
                  "gpus": [{"index": 0, "uuid": f"GPU-{r}", "joules": 5.0, "method": "counter"}]})
        for version in range(2):
            data = f"model {version}".encode()
            rel = f"artifacts/rank-{r:05d}/net_v{version}.pt"
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / rel).write_bytes(data)
            w.record({"kind": "artifact", "time": T0 + 1 + version, "name": f"net_v{version}.pt", "context": None,
                      "step": None, "timestamp": None, "path": rel, "size": len(data),
                      "sha256": hashlib.sha256(data).hexdigest(), "copied": True, "item": "model_version",
                      "model_name": "net", "version": version})
        w.close()
    return merge_run(run_dir).prov_json


def _by_type(doc: ProvDocument, kind: str) -> list:
    return [r for r in doc.get_records() if any(str(t) == kind for t in r.get_asserted_types())]


def test_prov_json_parses_with_one_agent_per_rank_on_behalf_of_the_user(tmp_path: Path) -> None:
    prov_json = _run(tmp_path)
    doc = ProvDocument.deserialize(source=str(prov_json), format="json")
    agents = _by_type(doc, "prov:SoftwareAgent")
    assert sorted(str(a.identifier) for a in agents) == [f"run:rank-0000{r}" for r in range(4)]
    delegations = {(str(d.formal_attributes[0][1]), str(d.formal_attributes[1][1]))
                   for d in doc.get_records() if d.get_type().localpart == "Delegation"}
    assert delegations == {(f"run:rank-0000{r}", "user:alice") for r in range(4)}
    assert [str(p.identifier) for p in _by_type(doc, "prov:Person")] == ["user:alice"]
    assert sorted(str(u) for a in agents for u in a.get_attribute("p4d:gpu_uuid")) == [f"GPU-{r}" for r in range(4)]


def test_prefixes_literals_and_non_finite_values(tmp_path: Path) -> None:
    text = _run(tmp_path).read_text()

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} emitted as a JSON number")

    data = json.loads(text, parse_constant=no_constants)
    assert data["prefix"]["p4d"] == "https://prov4ml-dist.org/ns#"
    assert data["prefix"]["run"] == "urn:prov4ml-dist:site:node0/run-1/"  # start_run's placeholder replaced
    run = data["activity"]["run:run"]
    assert run["p4d:world_size"] == {"$": "4", "type": "xsd:long"}
    assert run["prov:startTime"].startswith("2023-11-14T22:13:20")
    series = data["entity"]["run:metrics.loss%2F0.TRAINING.rank-00000"]
    assert series["p4d:count"] == {"$": "50", "type": "xsd:long"}
    assert series["p4d:dataset"] == "/metrics/rows" and series["p4d:nonfinite"]["$"] == "1"
    assert series["p4d:min"] == {"$": "0.0", "type": "xsd:double"}


def test_document_structure(tmp_path: Path) -> None:
    run = load_merged(_run(tmp_path).with_name("merged.h5"))
    doc = build_document(run)
    ids = [str(r.identifier) for r in doc.get_records(ProvElement)]
    assert len(ids) == len(set(ids))
    assert len(_by_type(doc, "p4d:RankProcess")) == 4
    assert len(_by_type(doc, "p4d:MetricSeries")) == 4 * 3 + 3  # per rank (few), and per key
    assert len(_by_type(doc, "p4d:CrossRankStatistics")) == 3
    assert len(_by_type(doc, "p4d:ModelVersion")) == 2  # identical on every rank: content-addressed
    assert len(_by_type(doc, "p4d:ArtifactFile")) == 4 * 2  # each rank's file its own entity
    assert len(_by_type(doc, "p4d:Dataset")) == 1 and len(_by_type(doc, "p4d:Energy")) == 4 + 2 + 1
    param = _by_type(doc, "p4d:Param")[0]
    assert str(list(param.get_attribute("p4d:disagreement"))[0]).lower() == "true"
    revisions = [r for r in doc.get_records() if r.get_type().localpart == "Derivation"
                 and any(str(v) == "prov:Revision" for _, v in r.extra_attributes)]
    assert len(revisions) == 4  # v1 from v0, on each rank
    contexts = {str(a.identifier) for a in _by_type(doc, "p4d:ContextActivity")}
    assert "run:process.rank-00002.VALIDATION" in contexts and len(contexts) == 8


def test_size_does_not_grow_with_points(tmp_path: Path) -> None:
    small = _run(tmp_path / "small", ranks=2, points=1_000).stat().st_size
    large = _run(tmp_path / "large", ranks=2, points=100_000).stat().st_size
    assert abs(large - small) < 0.02 * small, (small, large)


def test_exports(tmp_path: Path) -> None:
    prov_json = _run(tmp_path, ranks=2)
    doc = ProvDocument.deserialize(source=str(prov_json), format="json")
    write_provn(doc, tmp_path / "prov.provn")
    provn = (tmp_path / "prov.provn").read_text()
    assert provn.startswith("document") and "agent(run:rank-00001" in provn
    dot = to_dot(doc)
    assert dot.startswith("digraph prov {") and 'label="actedOnBehalfOf"' in dot
    assert dot.count("shape=house") == 3 and dot.count("shape=box") == 1 + 2 + 2 * 2 + 1  # + the merge
    assert write_graph(prov_json) == tmp_path / "prov.dot"
    assert (tmp_path / "prov.dot").read_text() == dot


@pytest.mark.parametrize(("given", "expected"), [("http://example.org/", "urn:prov4ml-dist:site:hpc.lab/"),
                                                 ("https://lab.example/ns", "https://lab.example/ns/"),
                                                 ("urn:x:y#", "urn:x:y#"),
                                                 ("not an iri", "urn:prov4ml-dist:site:hpc.lab/"),
                                                 ("", "urn:prov4ml-dist:site:hpc.lab/")])
def test_user_namespace_must_be_an_iri_else_the_sites(given: str, expected: str) -> None:
    """start_run's placeholder http://example.org/ would make every site's identifiers collide."""
    assert user_namespace_iri(given, "HPC.lab") == expected


def test_local_names_are_safe() -> None:
    assert local_name("loss/train", "a.b c") == "loss%2Ftrain.a%2Eb%20c"
