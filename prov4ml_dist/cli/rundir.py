"""Finding a run directory and what is in it, with a message a person can act on for every way
a path can be wrong (it is the input most often mistyped)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import h5py

from ..errors import MergeError
from ..merge import MergedRun, load_merged
from ..merge.layout import FORMAT, MERGED_NAME, PROV_NAME
from ..shard import schema
from .output import CliError


def existing_directory(path: Path) -> Path:
    """``path`` as a directory that exists, or why not."""
    if not path.exists():
        raise CliError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CliError(f"{path} is a file, not a run directory")
    return path


def run_directory(path: Path) -> Path:
    """A run directory (one with shards, merged.h5 or prov.json); merged.h5 or prov.json
    themselves stand for the directory that holds them."""
    if path.is_file() and path.name in (MERGED_NAME, PROV_NAME):
        return path.parent
    existing_directory(path)
    if not any((path / name).exists() for name in (schema.SHARDS_DIR, MERGED_NAME, PROV_NAME)):
        raise CliError(f"{path} is not a run directory (no {schema.SHARDS_DIR}/, {MERGED_NAME} or {PROV_NAME}); "
                       "a run directory is <provenance_save_dir>/<experiment>/<run_id>")
    return path


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


def unavailable_sensors(run: MergedRun, *names: str) -> list[str]:
    """Why the named sensors (``nvml``, ``rapl``) measured nothing, once per distinct reason;
    "sampled by another rank" is not a reason."""
    return sorted({f"{s.get('name')}: {s.get('reason')}" for r in run.ranks for s in r.sensors
                   if s.get("name") in names and not s.get("available") and s.get("reason")
                   and not str(s.get("reason")).startswith("node-wide")})
