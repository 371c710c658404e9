"""``prov4ml-dist validate``: is a run's provenance whole and true?

The prov.json must parse (with the prov package), and our own invariants must hold: exactly one run
activity; every rank of the world size has a software agent and every rank process is
associated with its rank's agent; no relation points at a record that is not there; every
shard it names is a readable shard of this run; merged.h5 is this run's and holds every row
range the document points into; every artifact is where the records say, with their sha256
and size. Artifacts kept outside the run directory (not copied) are checked when they can be
found and only noted otherwise: they are the user's files, free to move. The PROV model must
satisfy PROV-CONSTRAINTS (unique generation, time ordering, endpoints declared with the right
types) and use only p4d: terms the shipped vocabulary defines; each problem names its record
and rule.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import h5py
from prov.identifier import Namespace
from prov.model import Literal, ProvActivity, ProvAgent, ProvDocument, ProvElement, ProvEntity, ProvRelation

from ..artifacts import sha256_file
from ..errors import MergeError
from ..merge import load_merged
from ..merge.hierarchy import missing_parts
from ..merge.layout import MERGED_NAME, PROV_NAME
from ..merge.scan import BAD_SHARD
from ..paths import relative_inside
from ..provenance import load_document
from ..provenance.terms import P4D_NAMESPACE
from ..shard import ShardReader, schema
from .content import content_sha256
from .output import EXIT_OK, EXIT_PROBLEMS, CliError, note
from .rundir import is_run_directory, one_run_in
from .validate_prov import model_problems

P4D = Namespace("p4d", P4D_NAMESPACE)
ARTIFACT_TYPES = ("Artifact", "Model", "ModelVersion")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("validate", parents=[common], help="check prov.json and the files it names",
                            description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", type=Path, metavar="PATH", help="a prov.json, or a run directory holding one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prov_json = _locate(args.path)
    report = validate(prov_json)
    for text in report.notes:
        note(text)
    if report.problems:
        print(f"INVALID {prov_json}: {len(report.problems)} problem(s)")
        for problem in report.problems:
            print(f"  - {problem}")
        return EXIT_PROBLEMS
    checked = ", ".join(f"{n} {what}" for what, n in report.checked.items())
    print(f"valid: {prov_json} ({checked})")
    return EXIT_OK


def _locate(path: Path) -> Path:
    """The prov.json to check: PATH itself, or the one in (or beside, for merged.h5) PATH."""
    if path.is_file() and path.name == MERGED_NAME:
        path = path.parent
    if path.is_dir():
        if not is_run_directory(path):
            path = one_run_in(path) or path
        path = path / PROV_NAME
        if not path.is_file():
            raise CliError(f"{path.parent} has no {PROV_NAME}: merge the run first (`prov4ml-dist merge "
                           f"{path.parent}`) or pass the prov.json itself")
    elif not path.exists():
        raise CliError(f"{path}: no such file or directory")
    return path


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)


def validate(prov_json: Path) -> Report:
    """Every check, against the run directory that holds ``prov_json``."""
    report = Report()
    try:
        doc = load_document(prov_json)
    except MergeError as exc:
        report.problems.append(str(exc))
        return report
    _Checks(doc, prov_json.parent, report).run()
    problems, checked = model_problems(prov_json)
    report.problems += problems
    report.checked.update(checked)
    return report


def _value(value: Any) -> Any:
    """A PROV literal as the Python value it was written from."""
    if not isinstance(value, Literal):
        return value
    kind = value.datatype.localpart if value.datatype is not None else ""
    try:
        if kind in ("long", "int", "integer"):
            return int(value.value)
        if kind == "double":
            return float(value.value)
    except ValueError:
        return value.value
    return value.value == "true" if kind == "boolean" else value.value


def _attr(record: ProvElement, name: str) -> Any:
    values = record.get_attribute(P4D[name])
    return _value(next(iter(values))) if values else None


def _typed(doc: ProvDocument, kind: type, *types: str) -> list[ProvElement]:
    return [r for r in doc.get_records(kind) if any(P4D[t] in r.get_asserted_types() for t in types)]


class _Checks:
    """One pass over the document; problems and notes go to the report as they are found."""

    def __init__(self, doc: ProvDocument, run_dir: Path, report: Report) -> None:
        self.doc, self.run_dir, self.report = doc, run_dir, report
        self.problems = report.problems
        self.hashed: dict[str, str | None] = {}

    def run(self) -> None:
        elements = {str(r.identifier): r for r in self.doc.get_records(ProvElement)}
        self._relations(elements)
        runs = _typed(self.doc, ProvActivity, "Run")
        if len(runs) != 1:
            self.problems.append(f"{len(runs)} run activities (prov:type p4d:Run); expected exactly one")
            return
        run = runs[0]
        run_id = _attr(run, "run_id")
        self._agents(run)
        self._shards(run_id)
        self._merged(run, run_id)
        self._artifacts()
        self.report.checked["artifact files"] = len(self.hashed)

    def _relations(self, elements: dict[str, ProvElement]) -> None:
        relations = list(self.doc.get_records(ProvRelation))
        for rel in relations:
            for role, target in rel.formal_attributes[:2]:
                if target is not None and str(target) not in elements:
                    self.problems.append(f"{rel.get_type().localpart} {role.localpart} refers to {target}, "
                                         "which is not in the document")
        self.report.checked["relations"] = len(relations)

    def _agents(self, run: ProvActivity) -> None:
        world_size = _attr(run, "world_size")
        agents = {_attr(a, "rank"): str(a.identifier) for a in self.doc.get_records(ProvAgent)
                  if _attr(a, "rank") is not None}
        if not isinstance(world_size, int) or world_size < 1:
            self.problems.append(f"the run activity has no valid p4d:world_size ({world_size!r})")
            world_size = 0
        for rank in sorted(set(range(world_size)) - set(agents)):
            self.problems.append(f"rank {rank} has no agent (a prov:SoftwareAgent with p4d:rank {rank})")
        associated: dict[str, set[str]] = {}
        for rel in self.doc.get_records(ProvRelation):
            if rel.get_type().localpart == "Association":
                activity, agent = (str(v) for _, v in rel.formal_attributes[:2])
                associated.setdefault(activity, set()).add(agent)
        processes = _typed(self.doc, ProvActivity, "RankProcess")
        for process in processes:
            rank = _attr(process, "rank")
            if rank not in agents:
                self.problems.append(f"{process.identifier} (rank {rank}) has no agent of its rank")
            elif agents[rank] not in associated.get(str(process.identifier), set()):
                self.problems.append(f"{process.identifier} is not associated with its agent {agents[rank]}")
        self.report.checked["rank agents"] = len(agents)

    def _shards(self, run_id: Any) -> None:
        count = 0
        for process in _typed(self.doc, ProvActivity, "RankProcess"):
            name, rank = _attr(process, "shard"), _attr(process, "rank")
            if name is None:
                continue
            count += 1
            if not isinstance(name, str) or PurePosixPath(name).name != name or name in ("", ".", ".."):
                self.problems.append(f"{process.identifier}: p4d:shard {name!r} is not a shard file name")
                continue
            path = self.run_dir / schema.SHARDS_DIR / name
            try:
                with ShardReader(path) as reader:
                    if (reader.run_id, reader.rank) != (run_id, rank):
                        self.problems.append(f"{path} is rank {reader.rank} of run {reader.run_id!r}, not rank "
                                             f"{rank} of {run_id!r}")
            except BAD_SHARD as exc:
                self.problems.append(f"shard of rank {rank}: {exc}")
                continue
            recorded = _attr(process, "shard_sha256")
            if recorded is not None and sha256_file(path)[0] != recorded:
                self.problems.append(f"{path} does not match its recorded sha256 (changed after the merge)")
        self.report.checked["shards"] = count

    def _merged(self, run: ProvActivity, run_id: Any) -> None:
        name = _attr(run, "merged_file")
        if name is None:
            return
        path = self.run_dir / (name if name == MERGED_NAME else MERGED_NAME)
        try:
            merged = load_merged(path)
            if merged.run_id != run_id:
                self.problems.append(f"{path} is the merge of run {merged.run_id!r}, not {run_id!r}")
            with h5py.File(path, "r") as f:
                ranges = self._ranges(f)
                self.problems += missing_parts(f)  # merged by node: its rows lie in the node parts
        except (MergeError, OSError) as exc:
            self.problems.append(f"merged file: {exc}")
            return
        self.report.checked["row ranges"] = ranges
        self._generations(merged)

    def _ranges(self, f: h5py.File) -> int:
        """Every (dataset, row_start, row_stop) an entity points at must exist in merged.h5."""
        count = 0
        for entity in self.doc.get_records(ProvEntity):
            dataset, start, stop = (_attr(entity, n) for n in ("dataset", "row_start", "row_stop"))
            if dataset is None:
                continue
            count += 1
            target = f.get(str(dataset))
            if not isinstance(target, h5py.Dataset):
                self.problems.append(f"{entity.identifier}: {dataset} is not a dataset of merged.h5")
            elif not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= target.shape[0]):
                self.problems.append(f"{entity.identifier}: rows {start}:{stop} are not within {dataset} "
                                     f"({target.shape[0]} rows)")
        return count

    def _artifacts(self) -> None:
        entities = _typed(self.doc, ProvEntity, *ARTIFACT_TYPES)
        for entity in entities:
            self._artifact(str(entity.identifier), _attr(entity, "path"), _attr(entity, "sha256"),
                           _attr(entity, "size"), bool(_attr(entity, "directory")),
                           copied=_attr(entity, "present") is not None)
        self.report.checked["artifacts"] = len(entities)

    def _generations(self, merged: Any) -> None:
        """Every copy the ranks saved (prov.json names one path per content; merged.h5 all)."""
        for artifact in merged.artifacts:
            for g in artifact.generations:
                self._artifact(f"{artifact.name} of rank {g.rank}", g.path, artifact.sha256, artifact.size,
                               artifact.directory, copied=artifact.present >= 0)

    def _artifact(self, what: str, path: Any, sha: Any, size: Any, directory: bool, copied: bool) -> None:
        """``copied``: the artifact was copied into the run, so its path must be inside it."""
        if not isinstance(path, str) or not isinstance(sha, str):
            self.problems.append(f"artifact {what} has no p4d:path or p4d:sha256")
            return
        rel = PurePosixPath(path)
        if rel.is_absolute() and copied:
            self.problems.append(f"artifact {what} was copied into the run but its path is absolute: {path}")
            return
        if rel.is_absolute():
            found = self._hash(Path(path), directory)
            if found is None:
                self.report.notes.append(f"artifact {what} was not copied into the run and is no longer at {path}")
            elif found != sha:
                self.report.notes.append(f"artifact {what} at {path} changed since it was logged")
            return
        rel = relative_inside(path)
        if rel is None:
            self.problems.append(f"artifact {what} has a path that could leave the run directory: {path!r}")
            return
        target = self.run_dir.joinpath(*rel.parts)
        found = self._hash(target, directory)
        if found is None:
            self.problems.append(f"artifact {what} is missing: {target}")
        elif found != sha:
            self.problems.append(f"artifact {what} does not match its sha256: {target} hashes to {found[:16]}…, "
                                 f"recorded {sha[:16]}…")
        elif isinstance(size, int) and not directory and target.stat().st_size != size:
            self.problems.append(f"artifact {what} is {target.stat().st_size} bytes, recorded {size}")

    def _hash(self, path: Path, directory: bool) -> str | None:
        """Each file hashed once, however many records name it."""
        key = str(path)
        if key not in self.hashed:
            try:
                self.hashed[key] = content_sha256(path, directory)[0]
            except OSError:
                self.hashed[key] = None
        return self.hashed[key]
