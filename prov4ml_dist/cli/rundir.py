"""Finding a run directory and what is in it, with a message a person can act on for every way
a path can be wrong (it is the input most often mistyped)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py

from ..errors import MergeError
from ..merge import MergedRun, load_merged
from ..merge.layout import FORMAT, MERGED_NAME, PROV_NAME
from ..shard import schema
from .output import CliError, clock, note, table


def existing_directory(path: Path) -> Path:
    """``path`` as a directory that exists, or why not."""
    if not path.exists():
        raise CliError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CliError(f"{path} is a file, not a run directory")
    return path


def is_run_directory(path: Path) -> bool:
    return any((path / name).exists() for name in (schema.SHARDS_DIR, MERGED_NAME, PROV_NAME))


def run_directory(path: Path) -> Path:
    """A run directory (one with shards, merged.h5 or prov.json); merged.h5 or prov.json
    themselves stand for the directory that holds them, and an experiment or save directory
    for the one run it holds."""
    if path.is_file() and path.name in (MERGED_NAME, PROV_NAME):
        return path.parent
    existing_directory(path)
    if is_run_directory(path):
        return path
    found = one_run_in(path)
    if found is None:
        raise CliError(f"{path} is not a run directory (no {schema.SHARDS_DIR}/, {MERGED_NAME} or {PROV_NAME}); "
                       "a run directory is <provenance_save_dir>/<experiment>/<run_id>")
    return found


def runs_in(path: Path) -> list[Path]:
    """The run directories inside an experiment directory or a provenance_save_dir, newest first."""
    found, level = [], [path]
    for _ in range(2):  # <save_dir>/<experiment>/<run_id>
        level = [d for parent in level for d in _subdirectories(parent)]
        found += [d for d in level if is_run_directory(d)]
        level = [d for d in level if not is_run_directory(d)]
    return sorted(found, key=_started, reverse=True)


def one_run_in(path: Path) -> Path | None:
    """The only run under ``path`` (said on stderr), None when there is none; several are listed
    on stdout, newest first with their status, and are an input error naming the choice."""
    runs = runs_in(path)
    if len(runs) == 1:
        note(f"{path} holds one run: {runs[0]}")
        return runs[0]
    if not runs:
        return None
    rows = [(clock(_started(d)), _status(d), str(d)) for d in runs]  # the path last and whole: it is copied
    print("\n".join(table(("started", "status", "run directory"), rows, indent=0, width=sys.maxsize)))
    raise CliError(f"{path} holds {len(runs)} runs (listed above, newest first), not one run: pass one of them")


def _subdirectories(path: Path) -> list[Path]:
    try:
        return sorted(d for d in path.iterdir() if d.is_dir() and not d.is_symlink())
    except OSError:
        return []


def _started(run_dir: Path) -> float:
    """When the run began, as far as the file system tells: its shards directory was made first."""
    for candidate in (run_dir / schema.SHARDS_DIR, run_dir):
        with contextlib.suppress(OSError):
            return candidate.stat().st_mtime
    return 0.0


def _status(run_dir: Path) -> str:
    shards = len(list((run_dir / schema.SHARDS_DIR).glob("rank-*.h5")))
    merged = "merged" if (run_dir / MERGED_NAME).is_file() else "not merged"
    return f"{merged}, {shards} shard(s)"


def merged_file(run_dir: Path) -> Path:
    """``merged.h5`` of the run, or how to make it."""
    path = run_dir / MERGED_NAME
    if not path.is_file():
        raise CliError(f"{run_dir} has no {MERGED_NAME} (the run was not merged, or its merge failed): "
                       f"run `prov4ml-dist merge {run_dir}` first")
    return path


def load_run(run_dir: Path) -> MergedRun:
    """The merged run's small tables; a foreign or damaged merged.h5 is an input error."""
    try:
        return load_merged(merged_file(run_dir))
    except MergeError as exc:
        raise CliError(f"{exc}; merge it again with `prov4ml-dist merge {run_dir}`") from None


@contextlib.contextmanager
def open_merged(run_dir: Path) -> Iterator[h5py.File]:
    """``merged.h5`` opened for reading points (the tables ``load_run`` leaves out)."""
    path = merged_file(run_dir)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CliError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        fmt = f.attrs.get("format")
        if (fmt.decode("utf-8", "replace") if isinstance(fmt, bytes) else fmt) != FORMAT:
            raise CliError(f"{path}: not a merged prov4ml_dist file")
        yield f


ABSENT = {"nvml": "no NVIDIA GPU", "rapl": "no RAPL"}  # what a person is told when the sensor found nothing


def unavailable_sensors(run: MergedRun, *names: str) -> list[str]:
    """Why the named sensors (``nvml``, ``rapl``) measured nothing, once per distinct reason;
    "sampled by another rank" is not a reason."""
    return sorted({f"{s.get('name')}: {s.get('reason')}" for r in run.ranks for s in r.sensors
                   if s.get("name") in names and not s.get("available") and s.get("reason")
                   and not str(s.get("reason")).startswith("node-wide")})


def absent_sensors(run: MergedRun, *names: str) -> tuple[str, list[str]]:
    """The named sensors that found nothing as a short phrase ("no NVIDIA GPU, no RAPL"), and
    their recorded reasons in full (a reason is never cut: it is what one needs to fix it)."""
    reasons = unavailable_sensors(run, *names)
    absent = [ABSENT.get(name, f"no {name}") for name in names if any(r.startswith(f"{name}: ") for r in reasons)]
    return ", ".join(absent), reasons
