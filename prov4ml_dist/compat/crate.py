"""``end_run(crate_ro_crate=True)``: the run directory as an RO-Crate 1.1 (Process Run Crate
0.5 profile): ``ro-crate-metadata.json`` lists every file with its size and sha256, and one
``CreateAction`` — the training run — whose instrument is the script, whose objects are the
logged inputs and whose results are the other files; ``prov.json`` is described as its
provenance. Written as JSON-LD directly (no extra dependency); ``rocrate`` reads it back."""

from __future__ import annotations

import json
import mimetypes
import os
import time
from pathlib import Path
from typing import Any

from ..artifacts import sha256_file
from ..merge import MergedRun, load_merged
from ..merge.layout import MERGED_NAME, PROV_NAME

METADATA = "ro-crate-metadata.json"
RO_CRATE = "https://w3id.org/ro/crate/1.1"
PROCESS_RUN = "https://w3id.org/ro/wfrun/process/0.5"
PROV_JSON_SPEC = "https://www.w3.org/submissions/prov-json/"
FORMATS = {".h5": "application/x-hdf5", ".json": "application/json", ".pt": "application/octet-stream",
           ".md": "text/markdown", ".dot": "text/vnd.graphviz", ".svg": "image/svg+xml"}


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _files(run_dir: Path) -> list[str]:
    """Every regular file under the run directory (symlinks are not followed), sorted."""
    found = []
    for root, dirs, names in os.walk(run_dir):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file() and not path.is_symlink() and name != METADATA:
                found.append(path.relative_to(run_dir).as_posix())
    return found


def crate_graph(run_dir: Path, run: MergedRun) -> list[dict[str, Any]]:
    """The JSON-LD ``@graph`` of the crate."""
    files = _files(run_dir)
    inputs = {g.path for a in run.artifacts for g in a.generations if g.item == "input" and g.path}
    ranks = [r for r in run.ranks if r.status != "missing"]
    env = next((r.environment for r in ranks if r.environment), {})
    argv = env.get("argv") or ["?"]
    script = Path(str(argv[0])).name or "?"
    starts = [r.start_time for r in ranks if r.start_time is not None]
    ends = [r.end_time or r.last_time for r in ranks if (r.end_time or r.last_time) is not None]
    file_entities = []
    for rel in files:
        sha, size = sha256_file(run_dir / rel)
        entity: dict[str, Any] = {"@id": rel, "@type": "File", "name": rel, "contentSize": str(size), "sha256": sha,
                                  "encodingFormat": FORMATS.get(Path(rel).suffix)
                                  or mimetypes.guess_type(rel)[0] or "application/octet-stream"}
        if rel == PROV_NAME:
            entity.update(description="W3C PROV-JSON provenance of the run", about={"@id": "#run"},
                          conformsTo={"@id": PROV_JSON_SPEC})
        file_entities.append(entity)
    action: dict[str, Any] = {
        "@id": "#run", "@type": "CreateAction", "name": f"training run {run.run_id} of {run.experiment_name}",
        "instrument": {"@id": "#script"}, "agent": {"@id": "#user"},
        "object": [{"@id": p} for p in files if p in inputs],
        "result": [{"@id": p} for p in files if p not in inputs],
    }
    if starts:
        action["startTime"] = _iso(min(starts))
    if ends:
        action["endTime"] = _iso(max(ends))
    git = env.get("git") if isinstance(env.get("git"), dict) else {}
    script_entity = {"@id": "#script", "@type": "SoftwareApplication", "name": script}
    if git.get("commit"):
        script_entity["version"] = str(git["commit"])
    return [
        {"@id": METADATA, "@type": "CreativeWork", "conformsTo": {"@id": RO_CRATE}, "about": {"@id": "./"}},
        {"@id": "./", "@type": "Dataset", "name": f"{run.experiment_name} / {run.run_id}",
         "description": f"Provenance of a {run.world_size}-rank training run recorded by prov4ml_dist",
         "datePublished": _iso(time.time()), "conformsTo": {"@id": PROCESS_RUN},
         "hasPart": [{"@id": p} for p in files], "mentions": {"@id": "#run"}},
        {"@id": PROCESS_RUN, "@type": "CreativeWork", "name": "Process Run Crate", "version": "0.5"},
        action, script_entity, {"@id": "#user", "@type": "Person", "name": run.user or "unknown"},
        *file_entities,
    ]


def write_crate(run_dir: Path) -> Path:
    """``ro-crate-metadata.json`` in the run directory (written atomically)."""
    run = load_merged(run_dir / MERGED_NAME)
    doc = {"@context": f"{RO_CRATE}/context", "@graph": crate_graph(run_dir, run)}
    dest = run_dir / METADATA
    tmp = dest.with_suffix(".json.partial")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, dest)
    return dest
