"""The PROV model of issue 13: PROV-CONSTRAINTS valid, the program and software stack, the merge
as an activity, no invented values, plain triples for SPARQL, lineage, typed values with a
shipped vocabulary, and a size that grows with ranks + keys, never ranks x keys."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from prov_support import assert_prov_model_valid, records, synthetic_run  # noqa: E402
from test_merge_support import T0, log_series, open_shard  # noqa: E402

from prov4ml_dist.cli.validate import validate  # noqa: E402
from prov4ml_dist.merge import load_merged, merge_run  # noqa: E402
from prov4ml_dist.provenance import build_document, build_prov_json  # noqa: E402
from prov4ml_dist.provenance.constraints import check  # noqa: E402
from prov4ml_dist.provenance.turtle import write_turtle  # noqa: E402
from prov4ml_dist.provenance.vocabulary import defined_terms, undefined_terms, vocabulary_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SCRIPT_SHA = "ab" * 32


def _environment(rank: int) -> dict[str, Any]:
    """What environment.capture records (local rank 0 alone hashes the script)."""
    script = {"path": "/home/alice/train.py", "size": 100, **({"sha256": SCRIPT_SHA} if rank % 2 == 0 else {})}
    return {"user": "alice", "python": "3.11.7", "implementation": "CPython", "torch": "2.5.0", "cuda": "12.4",
            "argv": ["train.py", "--epochs", "2"], "versions": {"prov4ml-dist": "0.1.0", "h5py": "3.11.0"},
            "git": {"commit": COMMIT, "branch": "main", "dirty": True, "directory": "/home/alice"},
            "software": {"script": script, "git_remote": "https://git.example/alice/train.git", "nccl": "2.21.5",
                         "mpi": None, "container": {"runtime": "apptainer", "container": "/images/train.sif"}}}


def _save(w: Any, run_dir: Path, rank: int, name: str, data: bytes, when: float, **fields: Any) -> None:
    rel = f"artifacts/rank-{rank:05d}/{name}"
    (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / rel).write_bytes(data)
    w.record({"kind": "artifact", "time": when, "name": name, "context": "TRAINING", "step": None,
              "timestamp": None, "path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "copied": True, **fields})


def _run(run_dir: Path, ranks: int = 2, gpu: bool = False) -> Path:
    """A merged run: every rank saves the same config and model versions, then a final model."""
    for r in range(ranks):
        w = open_shard(run_dir, r, ranks, environment=_environment(r))
        log_series(w, "loss", [(s, 1.0 / (s + 1), T0 + 1 + s) for s in range(5)])
        w.record({"kind": "dataset", "time": T0 + 1, "label": "train",
                  "stats": {"samples": 100, "shape": [3, 4], "rank_samples": 50 + r}})
        w.record({"kind": "param", "time": T0 + 1, "key": "layers", "value": [64, 32]})
        if gpu:
            w.record({"kind": "sensor", "time": T0 + 1, "name": "gpu0", "available": True, "driver_version": "550.54"})
            w.record({"kind": "energy", "time": T0 + 9, "rapl": [], "rapl_joules": 0.0, "gpu_joules": 7.0,
                      "gpus": [{"index": 0, "uuid": f"GPU-{r}", "joules": 7.0, "method": "counter"}]})
        else:
            w.record({"kind": "sensor", "time": T0 + 1, "name": "nvml", "available": False,
                      "reason": "NVML unavailable: no driver"})
            w.record({"kind": "energy", "time": T0 + 9, "rapl": [], "rapl_joules": 0.0, "gpu_joules": 0.0, "gpus": []})
        w.record({"kind": "sensor", "time": T0 + 1, "name": "rapl", "available": False, "reason": "no RAPL zones"})
        _save(w, run_dir, r, "config.json", b"{}", T0 + 2, item="artifact")
        for version in range(3):
            _save(w, run_dir, r, f"net_v{version}.pt", f"net {version}".encode(), T0 + 3 + version,
                  item="model_version", model_name="net", version=version)
        _save(w, run_dir, r, "net_final.pt", b"net 2", T0 + 8, item="model", model_name="net")
        w.close()
    return merge_run(run_dir).prov_json


def _of_type(doc: dict, kind: str, section: str = "entity") -> dict[str, dict]:
    def types(record: dict) -> list[str]:
        value = record.get("prov:type", [])
        return [v["$"] for v in (value if isinstance(value, list) else [value])]
    return {k: v for k, v in doc.get(section, {}).items() if kind in types(v)}


def _relations(doc: dict, kind: str, a: str, b: str) -> set[tuple[str, str]]:
    return {(r[a], r[b]) for r in doc.get(kind, {}).values() if a in r and b in r}


# -- 1. PROV-CONSTRAINTS -------------------------------------------------------------------
def _doc(**sections: dict) -> dict:
    base = {"prefix": {"ex": "http://ex/"},
            "entity": {"ex:e": {}, "ex:f": {}},
            "activity": {"ex:a": {"prov:startTime": "2024-01-01T00:00:10+00:00",
                                  "prov:endTime": "2024-01-01T00:00:20+00:00"},
                         "ex:b": {"prov:startTime": "2024-01-01T00:00:30+00:00"}},
            "agent": {"ex:ag": {}}}
    for name, value in sections.items():
        base.setdefault(name, {}).update(value)
    return base


@pytest.mark.parametrize(("sections", "rule", "record"), [
    ({"wasGeneratedBy": {"_:1": {"prov:entity": "ex:e", "prov:activity": "ex:a"},
                         "_:2": {"prov:entity": "ex:e", "prov:activity": "ex:b"}}},
     "unique-generation", "wasGeneratedBy _:2"),
    ({"activity": {"ex:c": {"prov:startTime": "2024-01-01T00:00:09+00:00",
                            "prov:endTime": "2024-01-01T00:00:08+00:00"}}}, "start-precedes-end", "activity ex:c"),
    ({"wasGeneratedBy": {"_:1": {"prov:entity": "ex:e", "prov:activity": "ex:a",
                                 "prov:time": "2024-01-01T00:00:21+00:00"}}}, "generation-within-activity",
     "wasGeneratedBy _:1"),
    ({"used": {"_:1": {"prov:activity": "ex:a", "prov:entity": "ex:e", "prov:time": "2024-01-01T00:00:05+00:00"}}},
     "usage-within-activity", "used _:1"),
    ({"wasGeneratedBy": {"_:1": {"prov:entity": "ex:e", "prov:activity": "ex:b",
                                 "prov:time": "2024-01-01T00:00:40+00:00"}},
      "used": {"_:2": {"prov:activity": "ex:a", "prov:entity": "ex:e", "prov:time": "2024-01-01T00:00:15+00:00"}}},
     "generation-precedes-usage", "used _:2"),
    ({"wasGeneratedBy": {"_:1": {"prov:entity": "ex:e", "prov:activity": "ex:a",
                                 "prov:time": "2024-01-01T00:00:15+00:00"},
                         "_:2": {"prov:entity": "ex:f", "prov:activity": "ex:b",
                                 "prov:time": "2024-01-01T00:00:35+00:00"}},
      "wasDerivedFrom": {"_:3": {"prov:generatedEntity": "ex:e", "prov:usedEntity": "ex:f"}}},
     "derivation-generation-generation-ordering", "wasDerivedFrom _:3"),
    ({"wasInformedBy": {"_:1": {"prov:informed": "ex:a", "prov:informant": "ex:b"}}}, "wasInformedBy-ordering",
     "wasInformedBy _:1"),
    ({"used": {"_:1": {"prov:activity": "ex:a", "prov:entity": "ex:nowhere"}}}, "endpoint-declared", "used _:1"),
    ({"used": {"_:1": {"prov:activity": "ex:a", "prov:entity": "ex:b"}}}, "typing", "used _:1"),
    ({"wasAssociatedWith": {"_:1": {"prov:activity": "ex:a", "prov:agent": "ex:ag", "prov:plan": "ex:a"}}},
     "typing", "wasAssociatedWith _:1"),
    ({"entity": {"ex:a": {}}}, "impossible-entity-activity", "ex:a"),
    ({"wasGeneratedBy": {"_:1": {"prov:entity": "ex:e", "prov:activity": "ex:a", "prov:time": "yesterday"}}},
     "time-format", "wasGeneratedBy _:1"),
])
def test_each_constraint_names_the_record_and_the_rule(sections: dict, rule: str, record: str) -> None:
    assert check(_doc()) == []
    found = check(_doc(**sections))
    assert [(v.rule, v.record) for v in found] == [(rule, record)], found


def test_a_file_every_rank_saved_is_one_entity_per_rank_specializing_one_content(tmp_path: Path) -> None:
    """The old model generated one config entity from each rank at different times: invalid."""
    doc = assert_prov_model_valid(_run(tmp_path, ranks=3))
    (config,) = [k for k, v in _of_type(doc, "p4d:Content").items() if v["prov:label"] == "config.json"]
    files = {s for s, g in _relations(doc, "specializationOf", "prov:specificEntity", "prov:generalEntity")
             if g == config}
    assert len(files) == 3
    generated = [r["prov:entity"] for r in doc["wasGeneratedBy"].values()]
    assert len(generated) == len(set(generated)) and files <= set(generated)


# -- 2. the program and the software stack ----------------------------------------------------
def test_the_script_is_a_plan_and_the_software_stack_is_recorded(tmp_path: Path) -> None:
    doc = assert_prov_model_valid(_run(tmp_path))
    processes = _of_type(doc, "p4d:RankProcess", "activity")
    plans = {r["prov:activity"]: r.get("prov:plan") for r in doc["wasAssociatedWith"].values()}
    (plan,) = {plans[p] for p in processes}  # local rank 1 did not hash it: its node's rank 0 did
    assert {k: doc["entity"][plan][k] for k in ("p4d:sha256", "p4d:git_commit", "p4d:git_dirty", "p4d:git_remote",
                                                "p4d:path")} == {
        "p4d:sha256": SCRIPT_SHA, "p4d:git_commit": COMMIT, "p4d:git_dirty": True,
        "p4d:git_remote": "https://git.example/alice/train.git", "p4d:path": "/home/alice/train.py"}
    assert {t["$"] for t in doc["entity"][plan]["prov:type"]} == {"prov:Plan", "p4d:Script"}
    stacks = _of_type(doc, "p4d:SoftwareStack")
    used = _relations(doc, "used", "prov:activity", "prov:entity")
    assert all(any((p, s) in used for s in stacks) for p in processes)
    (stack,) = stacks.values()
    assert (stack["p4d:python"], stack["p4d:torch"], stack["p4d:cuda"], stack["p4d:nccl"]) == (
        "3.11.7", "2.5.0", "12.4", "2.21.5")
    assert stack["p4d:container_image"] == "/images/train.sif" and "p4d:mpi" not in stack
    assert processes["run:process.rank-00000"]["p4d:command_line"] == "train.py --epochs 2"


def test_sparql_finds_commit_python_torch_and_every_relation_in_the_turtle(tmp_path: Path) -> None:
    rdflib = pytest.importorskip("rdflib")
    doc = json.loads(_run(tmp_path).read_text())
    text = io.StringIO()
    write_turtle(doc, text)
    graph = rdflib.Graph().parse(data=text.getvalue(), format="turtle")
    prefixes = "PREFIX prov: <http://www.w3.org/ns/prov#> PREFIX p4d: <https://prov4ml-dist.org/ns#> "
    found = list(graph.query(prefixes + """SELECT DISTINCT ?commit ?python ?torch WHERE {
        ?process a p4d:RankProcess ; prov:qualifiedAssociation [ prov:hadPlan ?plan ] ; prov:used ?stack .
        ?plan p4d:git_commit ?commit . ?stack p4d:python ?python ; p4d:torch ?torch . }"""))
    assert [tuple(map(str, row)) for row in found] == [(COMMIT, "3.11.7", "2.5.0")]
    for kind, prop, a, b in [("wasGeneratedBy", "wasGeneratedBy", "prov:entity", "prov:activity"),
                             ("used", "used", "prov:activity", "prov:entity"),
                             ("wasDerivedFrom", "wasDerivedFrom", "prov:generatedEntity", "prov:usedEntity"),
                             ("wasAssociatedWith", "wasAssociatedWith", "prov:activity", "prov:agent")]:
        pairs = {(str(s), str(o)) for s, o in graph.query(prefixes + f"SELECT ?s ?o WHERE {{ ?s prov:{prop} ?o }}")}
        expected = {(_iri(doc, x), _iri(doc, y)) for x, y in _relations(doc, kind, a, b)}
        assert expected and expected == pairs, kind
    revisions = graph.query(prefixes + "SELECT ?new ?old WHERE { ?new prov:wasDerivedFrom ?old ; a p4d:ArtifactFile ."
                                       " ?old a p4d:ArtifactFile }")
    assert len(revisions) == 2 * (2 + 1)  # per rank: v1<-v0, v2<-v1, final<-v2


def _iri(doc: dict, name: str) -> str:
    prefix, local = name.split(":", 1)
    return doc["prefix"][prefix] + local


# -- 3. the merge ---------------------------------------------------------------------------
def test_the_merge_is_an_activity_that_used_each_shard_and_generated_the_statistics(tmp_path: Path) -> None:
    doc = assert_prov_model_valid(_run(tmp_path))
    merge = doc["activity"]["run:merge"]
    assert merge["p4d:library_version"] and merge["prov:startTime"] <= merge["prov:endTime"]
    assert merge["p4d:mode"] in ("online", "offline")
    shards = _of_type(doc, "p4d:Shard")
    assert {s["p4d:sha256"] for s in shards.values()} == {r.shard_sha256 for r in load_merged(
        tmp_path / "merged.h5").ranks}
    assert {("run:merge", s) for s in shards} <= _relations(doc, "used", "prov:activity", "prov:entity")
    generated = dict(_relations(doc, "wasGeneratedBy", "prov:entity", "prov:activity"))
    assert generated["run:merged.h5"] == "run:merge"
    assert all(generated[s] == "run:merge" for s in _of_type(doc, "p4d:CrossRankStatistics"))
    members = _relations(doc, "hadMember", "prov:collection", "prov:entity")
    assert all(("run:merged.h5", s) in members for s in _of_type(doc, "p4d:CrossRankStatistics"))
    keyed = [k for k, v in _of_type(doc, "p4d:MetricSeries").items() if "p4d:rank" not in v]
    assert keyed and all(("run:merged.h5", k) in members for k in keyed)


# -- 4. no invented values ---------------------------------------------------------------------
def test_energy_not_measured_is_absent_with_the_reason(tmp_path: Path) -> None:
    doc = assert_prov_model_valid(_run(tmp_path))
    energy = _of_type(doc, "p4d:Energy")
    assert energy and all("p4d:total_joules" not in e and "p4d:gpu_joules" not in e for e in energy.values())
    job = energy["run:energy.job"]
    assert set(job["p4d:not_measured"]) == {"gpu_joules", "rapl_joules"}
    assert any("NVML unavailable: no driver" in r for r in job["p4d:not_measured_reason"])


def test_energy_measured_by_gpus_only(tmp_path: Path) -> None:
    doc = assert_prov_model_valid(_run(tmp_path / "gpu", gpu=True))
    job = doc["entity"]["run:energy.job"]
    assert job["p4d:gpu_joules"] == job["p4d:total_joules"] == {"$": "14.0", "type": "xsd:double"}
    assert job["p4d:not_measured"] == ["rapl_joules"] and "p4d:rapl_joules" not in job
    assert doc["entity"][next(iter(_of_type(doc, "p4d:SoftwareStack")))]["p4d:nvidia_driver"] == "550.54"


# -- 6. lineage ----------------------------------------------------------------------------
def test_lineage_final_model_versions_and_the_data_they_were_trained_on(tmp_path: Path) -> None:
    doc = assert_prov_model_valid(_run(tmp_path))
    files = _of_type(doc, "p4d:ArtifactFile")
    name = {k: (v["p4d:rank"]["$"], v["p4d:name"]) for k, v in files.items()}
    derived = {(name[a], name[b]) for a, b in _relations(doc, "wasDerivedFrom", "prov:generatedEntity",
                                                         "prov:usedEntity") if a in name}
    for r in ("0", "1"):
        assert {((r, "net_v1.pt"), (r, "net_v0.pt")), ((r, "net_v2.pt"), (r, "net_v1.pt")),
                ((r, "net_final.pt"), (r, "net_v2.pt"))} <= derived
    assert all(v["p4d:context"] == "TRAINING" for v in files.values())
    whole, parts = "run:dataset.train", _of_type(doc, "p4d:DatasetPart")
    assert {(whole, p) for p in parts} <= _relations(doc, "hadMember", "prov:collection", "prov:entity")
    assert doc["entity"][whole]["key:stats.samples"]["$"] == "100" and "key:stats.rank_samples" not in doc["entity"][
        whole]
    generated = dict(_relations(doc, "wasGeneratedBy", "prov:entity", "prov:activity"))
    used = _relations(doc, "used", "prov:activity", "prov:entity")
    for f, v in files.items():
        if v["p4d:item"] == "model_version":
            assert (generated[f], f"run:dataset.train.rank-0000{v['p4d:rank']['$']}") in used


# -- 7. values and vocabulary ---------------------------------------------------------------------
def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_no_json_text_in_strings_no_percent_encoded_names(tmp_path: Path) -> None:
    doc = assert_prov_model_valid(_run(tmp_path))
    for text in _strings({k: v for k, v in doc.items() if k != "prefix"}):
        if text[:1] in "[{":
            with pytest.raises(ValueError):
                json.loads(text)
    names = {n for section in doc.values() for record in section.values() if isinstance(record, dict)
             for n in record}
    assert not [n for n in names if "%" in n]
    part = doc["entity"]["run:dataset.train.rank-00001"]
    assert (part["key:stats.shape.0"]["$"], part["key:stats.shape.1"]["$"]) == ("3", "4")
    param = doc["entity"]["run:param.layers"]
    assert (param["key:value.0"]["$"], param["key:value.1"]["$"]) == ("64", "32")
    assert doc["activity"]["run:run"].get("p4d:missing_ranks") is None


def test_vocabulary_defines_every_term_and_is_package_data(tmp_path: Path) -> None:
    rdflib = pytest.importorskip("rdflib")
    graph = rdflib.Graph().parse(data=vocabulary_text(), format="turtle")
    p4d = rdflib.Namespace("https://prov4ml-dist.org/ns#")
    rdfs = rdflib.RDFS
    defined = {str(s).removeprefix(str(p4d)) for s in graph.subjects(rdflib.RDF.type, rdfs.Class)} | {
        str(s).removeprefix(str(p4d)) for s in graph.subjects(rdflib.RDF.type, rdflib.RDF.Property)}
    assert defined == set(defined_terms())
    assert all((p4d[c], rdfs.subClassOf, None) in graph for c in ("Run", "Merge", "Script", "Shard"))
    assert (p4d.Script, rdfs.subClassOf, rdflib.URIRef("http://www.w3.org/ns/prov#Plan")) in graph
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\n"prov4ml_dist.provenance" = ["vocabulary.ttl"]' in pyproject
    doc = build_prov_json(synthetic_run(4, 3))
    assert undefined_terms(doc) == {}
    doc["entity"]["run:extra"] = {"p4d:bogus": 1}
    assert undefined_terms(doc) == {"bogus": "entity run:extra"}


def test_validate_names_the_record_and_rule_it_breaks(tmp_path: Path) -> None:
    prov_json = _run(tmp_path)
    assert validate(prov_json).problems == []
    doc = json.loads(prov_json.read_text())
    (gen_id, gen) = next((k, r) for k, r in doc["wasGeneratedBy"].items() if r["prov:entity"].startswith("run:file."))
    doc["wasGeneratedBy"]["_:again"] = {**gen, "prov:activity": "run:merge"}
    doc["entity"][gen["prov:entity"]]["p4d:colour"] = "blue"
    prov_json.write_text(json.dumps(doc))
    problems = validate(prov_json).problems
    assert any(p.startswith("PROV-CONSTRAINTS [unique-generation] wasGeneratedBy _:again") for p in problems), problems
    assert any("p4d:colour" in p and gen["prov:entity"] in p for p in problems), problems


# -- 8. size ---------------------------------------------------------------------------------
def test_records_grow_with_ranks_plus_keys_never_ranks_times_keys() -> None:
    few, many = records(build_prov_json(synthetic_run(64, 10))), records(build_prov_json(synthetic_run(64, 100)))
    assert many <= 2 * few, (few, many)
    assert many < 64 * 100  # not even one record per (rank, key)


def test_per_rank_series_only_while_few(monkeypatch: pytest.MonkeyPatch) -> None:
    def per_rank(doc: dict) -> int:
        return sum("p4d:rank" in v for v in _of_type(doc, "p4d:MetricSeries").values())

    assert per_rank(build_prov_json(synthetic_run(4, 10))) == 40
    assert per_rank(build_prov_json(synthetic_run(4, 10), series_limit=39)) == 0
    monkeypatch.setenv("PROV4ML_PROV_RANK_SERIES", "0")
    assert per_rank(build_prov_json(synthetic_run(4, 10))) == 0


def test_the_dict_writer_is_prov_json_that_prov_parses() -> None:
    run = synthetic_run(8, 20)
    data = build_prov_json(run, built_at=T0 + 2000)
    doc = build_document(run)
    assert len(list(doc.get_records())) == records(data)
    assert check(data) == []


# -- what environment.capture adds for the Plan and the software stack --------------------------
def test_software_stack_script_hash_on_local_rank_0_and_container(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from prov4ml_dist.software import container, script_identity

    script = tmp_path / "train.py"
    script.write_bytes(b"print('hi')\n")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert script_identity(str(script)) == {"path": str(script.resolve()), "size": 12,
                                            "sha256": hashlib.sha256(b"print('hi')\n").hexdigest()}
    monkeypatch.setenv("LOCAL_RANK", "1")  # its node's local rank 0 hashes it: no filesystem storm
    assert "sha256" not in script_identity(str(script))
    assert script_identity(str(tmp_path / "no-such.py")) is None
    for name in ("APPTAINER_CONTAINER", "APPTAINER_NAME", "SINGULARITY_CONTAINER", "SINGULARITY_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert container() is None
    monkeypatch.setenv("SINGULARITY_CONTAINER", "/images/a.sif")
    monkeypatch.setenv("SINGULARITY_NAME", "a.sif")
    assert container() == {"runtime": "singularity", "container": "/images/a.sif", "name": "a.sif"}


def test_capture_records_the_software_record(monkeypatch: pytest.MonkeyPatch) -> None:
    from prov4ml_dist import environment

    monkeypatch.setattr(sys, "argv", [str(Path(__file__))])
    monkeypatch.setenv("LOCAL_RANK", "0")
    software = environment.capture()["software"]
    assert software["script"]["sha256"] == hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    assert set(software) == {"script", "git_remote", "nccl", "mpi", "container"}


def test_export_ttl_and_jsonld(tmp_path: Path) -> None:
    from prov4ml_dist.cli import main

    rdflib = pytest.importorskip("rdflib")
    prov_json = _run(tmp_path)
    assert main(["export", str(tmp_path), "--format", "ttl"]) == 0
    assert main(["export", str(tmp_path), "--format", "jsonld"]) == 0
    turtle = rdflib.Graph().parse(tmp_path / "prov.ttl", format="turtle")
    jsonld = rdflib.Graph().parse(tmp_path / "prov.jsonld", format="json-ld")
    assert len(turtle) == len(jsonld) > 0
    generations = len(json.loads(prov_json.read_text())["wasGeneratedBy"])
    prov = rdflib.Namespace("http://www.w3.org/ns/prov#")
    assert len(set(jsonld.subject_objects(prov.wasGeneratedBy))) == generations


def test_one_software_stack_per_node_where_it_differs() -> None:
    run = synthetic_run(8, 2)  # 4 ranks per node: node1 runs another torch
    run.ranks = [dataclasses.replace(r, environment={**r.environment, "torch": "2.6.0"}) if r.node_rank == 1 else r
                 for r in run.ranks]
    doc = build_prov_json(run)
    stacks = _of_type(doc, "p4d:SoftwareStack")
    assert sorted(s["p4d:torch"] for s in stacks.values()) == ["2.5.0", "2.6.0"]
    used = _relations(doc, "used", "prov:activity", "prov:entity")
    torch_of = {a: doc["entity"][e]["p4d:torch"] for a, e in used if e in stacks}
    assert torch_of == {f"run:process.rank-0000{r}": "2.5.0" if r < 4 else "2.6.0" for r in range(8)}
