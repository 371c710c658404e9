"""One process's run: identity, directories, the shard writer, artifacts, and the hot path.

A ``Run`` can be built directly (tests do); the module-level API in ``api.py`` only keeps a
handle to the active one.
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from . import environment, models
from .artifacts import ArtifactStore
from .context import check_name, context_name, source_name
from .datasets import dataset_stats
from .describe import describe, has_address
from .errors import InvalidInputError, MergeError, RunStateError
from .sampling import Sampler
from .shard import ShardWriter, schema
from .shard.ring import PACK as _pack
from .shard.ring import ROW_BYTES
from .shard.writer import to_json_line
from .topology import Topology, detect

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# How a shard's end status reads in the one-line message of a rank that did not reach end_run.
UNFINISHED = {"exited-without-end_run": "exited (an exception, sys.exit or the end of the script)",
              "killed-by-SIGTERM": "got SIGTERM (a time limit, scancel, a launcher stopping the job)",
              "killed-by-SIGHUP": "got SIGHUP (its terminal or launcher went away)"}
_now = time.time  # bound once: the hot path saves an attribute lookup per point


@dataclass(frozen=True)
class RunConfig:
    """Everything ``start_run`` was asked for; recorded in the shard as ``settings``."""

    experiment_name: str = "experiment"
    provenance_save_dir: Path = Path("prov")
    user_namespace: str = "http://example.org/"
    run_id: str | None = None
    local_dir: Path | None = None
    flush_interval: float = 1.0
    sample_interval: float | None = 1.0
    merge_timeout: float = 300.0
    yprov4ml_options: dict[str, Any] = field(default_factory=dict)


def merge_command(run_dir: Path, local_roots: Iterable[Path] = ()) -> str:
    """The offline merge of ``run_dir``; with ``--local-dirs`` for files left on node-local
    disks (to be copied back first), each directory named once."""
    roots = list(dict.fromkeys(str(root) for root in local_roots))
    return f"prov4ml-dist merge {run_dir}" + (f" --local-dirs {' '.join(roots)}" if roots else "")


def check_component(name: object, what: str) -> str:
    """A name used as one directory level: no separators, not '.' or '..'."""
    name = check_name(name, what)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidInputError(f"{what} {name!r:.80} must be a single directory name (no '/', not '..')")
    return name


def check_seconds(value: object, what: str, optional: bool = False) -> None:
    """A duration setting: a finite positive number (None too where ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise InvalidInputError(f"{what} must be a positive, finite number of seconds, got {value!r:.40}")


# What start_run exports to the processes a framework starts after it (Lightning's subprocess
# launcher and ddp_spawn, Accelerate's launchers): they inherit the run, not only the script.
INHERITED_RUN_ID = "PROV4ML_DIST_RUN_ID"
INHERITED_SAVE_DIR = "PROV4ML_DIST_SAVE_DIR"
INHERITED_EXPERIMENT = "PROV4ML_DIST_EXPERIMENT"
# Set by a process that handed its run over to the ranks it starts (handover.py): they join it
# whatever their launcher (torch elastic's workers, forked by notebook_launcher, have a
# launcher's variables but no run id of their own: TORCHELASTIC_RUN_ID "none").
HANDOVER_ENV = "PROV4ML_DIST_HANDOVER"
# Launchers whose processes take the inherited run: a framework's (see topology), or one that
# only initialised torch.distributed; torchrun and Slurm name the run themselves.
INHERITING_LAUNCHERS = ("framework", "torch.distributed", "env")


def export_run(config: RunConfig, run_id: str) -> None:
    """Let the processes a framework starts later join this run (README, "Which rank am I")."""
    os.environ[INHERITED_RUN_ID] = run_id
    os.environ[INHERITED_SAVE_DIR] = str(Path(config.provenance_save_dir).absolute())
    os.environ[INHERITED_EXPERIMENT] = config.experiment_name


def unexport_run(run_id: str) -> None:
    """The run has ended: processes started from now on (another script) do not join it."""
    if os.environ.get(INHERITED_RUN_ID) == run_id:
        for name in (INHERITED_RUN_ID, INHERITED_SAVE_DIR, INHERITED_EXPERIMENT, HANDOVER_ENV):
            os.environ.pop(name, None)


def inherited_run_id(topology: Topology) -> str | None:
    """The run a parent process exported, for a process of a multi-process job that has no
    launcher's run id: a plain single process (a script run by ``subprocess``) starts its own."""
    inherited = os.environ.get(INHERITED_RUN_ID)
    if not inherited or topology.world_size <= 1:
        return None
    if topology.launcher not in INHERITING_LAUNCHERS and not os.environ.get(HANDOVER_ENV):
        return None
    return inherited


def new_run_id() -> str:
    """Sortable and unique: UTC time plus random bits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def launcher_run_id(topology: Topology) -> str | None:
    """A run id every rank derives alike from its launcher, with no communication."""
    if topology.elastic_run_id and topology.elastic_run_id != "none":
        return f"torchrun-{topology.elastic_run_id}"
    if topology.job_id:  # an array task by its array name, so that all the array's runs go together
        step = f".{topology.step_id}" if topology.step_id not in (None, "") else ""
        return f"slurm-{topology.array_id or topology.job_id}{step}"
    return None


def resolve_run_id(config: RunConfig, topology: Topology) -> str:
    """Explicit id, else the launcher's, else rank 0's broadcast; never a directory scan."""
    if config.run_id is not None:
        return check_component(config.run_id, "run_id")
    from_launcher = launcher_run_id(topology) or inherited_run_id(topology)
    if from_launcher is not None:
        return check_component(from_launcher, "run_id")
    if topology.world_size == 1:
        return new_run_id()
    from .transport import TransportError, agree_run_id

    try:
        agreed = agree_run_id(topology, new_run_id(), timeout=min(config.merge_timeout, 120.0))
    except TransportError as exc:
        raise RunStateError(f"rank {topology.rank}: rank 0's run id did not arrive ({exc}); are all ranks "
                            "calling start_run? Passing the same start_run(run_id=...) avoids the exchange") from None
    if agreed is None:
        raise RunStateError(
            f"rank {topology.rank} of {topology.world_size}: cannot agree on a run id with the other ranks "
            "(no TORCHELASTIC_RUN_ID, no SLURM_JOB_ID, no initialised torch.distributed or MPI); "
            "pass the same start_run(run_id=...) on every rank")
    return check_component(agreed, "run_id")


def as_metric_value(value: Any) -> float:
    """A metric value as a float: numbers, NumPy scalars, one-element tensors and arrays.
    NaN and ±inf are kept (a diverging loss is provenance too)."""
    if isinstance(value, (str, bytes, bytearray)):
        raise InvalidInputError(f"metric value must be a number, got a string: {value!r:.80}")
    numel = getattr(value, "numel", None)
    count = numel() if callable(numel) else getattr(value, "size", None)
    if isinstance(count, int) and count != 1:
        raise InvalidInputError(f"metric value must be a single number, got {type(value).__name__} "
                                f"with {count} elements; reduce it (e.g. .mean().item()) first")
    try:
        return float(value.item() if callable(getattr(value, "item", None)) else value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"metric value must be a real number, got {type(value).__name__}: {exc}") from None


def as_step(step: Any) -> int:
    """A step as a 64-bit integer (ints, NumPy ints, integer tensors); floats are refused."""
    try:
        value = operator.index(step)
    except TypeError:
        raise InvalidInputError(f"step must be an integer, got {type(step).__name__}: {step!r:.40}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidInputError(f"step {value} does not fit in 64 bits")
    return value


def automatic_step_overflow(key: str) -> InvalidInputError:
    """The error for ``step=None`` after step 2**63 - 1 (the flusher could not store it)."""
    return InvalidInputError(f"metric {key!r:.60}: the next automatic step does not fit in 64 bits; pass step=")


def as_param_value(value: Any) -> Any:
    """Params keep JSON types; NumPy/torch scalars become numbers; Enum members their name,
    as contexts (a StrEnum or IntEnum too: it is a str or int, but its name is what it says);
    anything else its repr (NaN and ±inf too: JSON has no such numbers, the journal would
    refuse the record), or a stable description where the repr holds a memory address (ranks
    must agree)."""
    if isinstance(value, Enum):
        return value.name
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [as_param_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): as_param_value(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return as_param_value(item())
    text = repr(value)
    return describe(value, text) if has_address(text) else text


def other(other_attrs: Any) -> dict[str, Any]:
    """yProv4ML's ``other_attrs``: the user's extra attributes, kept as one JSON field."""
    if other_attrs is None:
        return {}
    if not isinstance(other_attrs, dict):
        raise InvalidInputError(f"other_attrs must be a dict, got {type(other_attrs).__name__}")
    return {"other_attrs": as_param_value(other_attrs)}


def check_param(key: Any, value: Any) -> Any:
    """A param's key checked and its value as stored (``as_param_value``, and known to encode),
    or InvalidInputError: ``log_params`` checks every item before it records one."""
    check_name(key, "param key")
    try:
        stored = as_param_value(value)
        to_json_line({"value": stored})
    except RecursionError:
        raise InvalidInputError(f"param {key!r:.60}: its value is nested too deeply, or contains itself") from None
    return stored


class RankMoved(RunStateError):
    """``Run.settle_topology`` in a process that was alone at ``start_run`` and is now rank
    ``topology.rank`` of a job whose run is rank 0's ``run_id``: its records must move there
    (``api.settle`` does it; used directly, a Run says so as this error)."""

    def __init__(self, topology: Topology, run_id: str) -> None:
        super().__init__(f"this process started its own run as rank 0 of 1, but is rank {topology.rank} of "
                         f"{topology.world_size} (torch.distributed) of run {run_id}: its records move there")
        self.topology = topology
        self.run_id = run_id


class Run:
    """The provenance of one process: its shard, its artifacts, its sampler."""

    def __init__(self, config: RunConfig, topology: Topology | None = None) -> None:
        check_component(config.experiment_name, "experiment_name")
        for what in ("flush_interval", "merge_timeout", "sample_interval"):  # before any file is made
            check_seconds(getattr(config, what), what, optional=what == "sample_interval")
        self.config = config
        self.topology = topology if topology is not None else detect()
        self.run_id = resolve_run_id(config, self.topology)
        self.run_dir = (Path(config.provenance_save_dir) / config.experiment_name / self.run_id).absolute()
        base = Path(config.local_dir) if config.local_dir is not None else None
        self.rank_root = (base / config.experiment_name / self.run_id).absolute() if base else self.run_dir
        self.started = time.time()
        try:
            rank, attempt = self.topology.rank, self.topology.attempt
        except ValueError as exc:
            raise RunStateError(f"cannot number this attempt of rank {self.topology.rank}: {exc}") from None
        shards = self.rank_root / schema.SHARDS_DIR
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            shards.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunStateError(f"cannot create the run directory {self.rank_root}: {exc.strerror}") from None
        self.shard_path = shards / schema.shard_name(rank, attempt)
        attrs = {"run_id": self.run_id, "experiment_name": config.experiment_name, "rank": rank,
                 "attempt": attempt, "created": self.started}
        try:
            self.writer = ShardWriter(self.shard_path, attrs, flush_interval=config.flush_interval)
        except FileExistsError:
            raise RunStateError(f"{self.shard_path} already exists: run id {self.run_id!r} was used before; "
                                "pass a new run_id") from None
        except (OSError, RuntimeError) as exc:  # HDF5 reports some write failures as RuntimeError
            raise RunStateError(f"cannot create the shard {self.shard_path}: {str(exc).splitlines()[0]}") from None
        self.artifacts = ArtifactStore(self.rank_root, schema.rank_artifacts_dir(rank))
        self._artifact_records: list[dict[str, Any]] = []
        self._model_versions: dict[str, int] = {}
        self._series: dict[tuple, list[int]] = {}
        self._series_by_name: dict[tuple[str, str, str], list[int]] = {}
        self._series_lock = threading.Lock()
        self._by_context: dict[int, dict[str, list[int]]] = {}
        self._context_refs: dict[int, Any] = {}
        self._ring = self.writer.metrics.ring
        self._closed = False
        self._before_close: list[Any] = []
        self.sampler: Sampler | None = None
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
        self.writer.record({"kind": "start", "time": self.started, "run_id": self.run_id,
                            "experiment_name": config.experiment_name, "user_namespace": config.user_namespace,
                            "topology": self.topology.as_dict(),
                            "environment": environment.capture(self.topology.local_rank),
                            "settings": settings, "shard": self.shard_path.name})
        self.writer.flush()  # the shard is identifiable from the first moment, even if killed at once
        if self.writer.failures:  # e.g. a full disk: a shard without its start record is of no use
            self.writer.close("failed-to-start")
            self.shard_path.unlink(missing_ok=True)
            raise RunStateError(f"cannot write the shard {self.shard_path}: {self.writer.failures[0]}")
        if config.sample_interval is not None:
            self.sampler = Sampler(self.writer.system, self.writer.record, self.topology, config.sample_interval)
            self.sampler.start()
        self.writer.await_drain()  # the drain process has the shard before the first point is logged

    # -- hot path -------------------------------------------------------------------------
    def log_metric(self, key: str, value: Any, context: Any, step: Any = None, source: Any = None) -> None:
        """Store one metric point: two dict lookups, a float check and a row in the crash ring
        (``shard/ring.py``, inlined from ``Ring.write``: a call costs ~100 ns here), which
        survives this process's death as soon as this returns."""
        try:
            series = self._by_context[id(context)][key] if source is None else None
        except KeyError:
            series = None
        except TypeError:
            raise InvalidInputError(f"metric key, context and source must be hashable; got key={key!r:.60}") from None
        if type(value) is not float:
            value = as_metric_value(value)
        if step is not None and (type(step) is not int or not INT64_MIN <= step <= INT64_MAX):
            step = as_step(step)
        if series is None:  # only now: a refused point must not declare a new series
            series = self._lookup(key, context, source)
        if step is None:
            step = series[1]
            if step > INT64_MAX:  # the last explicit step was 2**63 - 1
                raise automatic_step_overflow(key)
        series[1] = step + 1
        ring = self._ring
        slot = next(ring.next_slot)
        try:  # free unless it raises
            if slot >= ring.limit:  # wake the flusher, or wait for it when a whole ring behind (never overwrite)
                ring.at_limit(slot)
            # The commit mark (slot + 1) is packed last: a row killed half-written is never read.
            _pack(ring.mm, ring.base + (slot & ring.mask) * ROW_BYTES, series[0], step, value, _now(), slot + 1)
        except BaseException:  # KeyboardInterrupt mid-write: the flusher must not wait for this slot
            ring.abandon(slot)
            raise

    def next_step(self, key: Any, context: Any, source: Any) -> int:
        """The step ``step=None`` would give this series now (0 if it is new), checking the
        names but declaring nothing: ``log_metrics`` checks every item before logging one."""
        names = (check_name(key, "metric key"), context_name(context), source_name(source))
        series = self._series_by_name.get(names)
        return series[1] if series is not None else 0

    def _lookup(self, key: Any, context: Any, source: Any) -> list[int]:
        """The [id, next step] of a (key, context, source), validated and created on first use.

        The stored names decide the series: the cache is keyed by the types as well as the
        values, since ``"train" == Phase.TRAIN`` (a StrEnum) and two IntEnum members with equal
        values compare (and hash) equal while their stored names differ (an Enum's is its name,
        a string's its value). Enum contexts are also cached by ``id()`` (Enum.__hash__ is
        Python code, ~80 ns a call); the cache holds the member, so its id cannot be reused.
        Strings stay keyed by value.
        """
        if type(context) is str and source is None and type(key) is str:  # the common case, kept short
            ident = (key, context)
        else:
            ident = (key, context, source, type(key), type(context), type(source))
        try:
            series = self._series.get(ident)
        except TypeError:
            raise InvalidInputError(f"metric key, context and source must be hashable; got key={key!r:.60}") from None
        if series is None:
            check_name(key, "metric key")
            names = (key, context_name(context), source_name(source))
            with self._series_lock:
                series = self._series.get(ident)
                if series is None:
                    # One counter per stored series: Context.TRAINING and "TRAINING" are the same series.
                    series = self._series_by_name.get(names)
                    if series is None:
                        series = self._series_by_name[names] = [self.writer.metrics.register(*names), 0]
                    self._series[ident] = series
        if source is None and isinstance(context, Enum):
            self._by_context.setdefault(id(context), {}).setdefault(key, series)
            self._context_refs[id(context)] = context
        return series

    # -- records --------------------------------------------------------------------------
    def log_param(self, key: str, value: Any, context: Any = None) -> None:
        record = {"kind": "param", "time": time.time(), "key": check_name(key, "param key")}
        if context is not None:
            record["context"] = context_name(context)
        record["value"] = check_param(key, value)
        self.writer.record(record)

    def log_artifact(self, name: Any, value: Any, context: Any, step: Any = None, timestamp: Any = None,
                     copy: bool = True, is_input: bool = False, other_attrs: dict | None = None) -> dict[str, Any]:
        """Record a file, directory or in-memory value (``is_input``: read by the run, not
        produced by it); returns the artifact record."""
        ctx = context_name(context) if context is not None else None
        step = as_step(step) if step is not None else None
        if isinstance(value, (str, os.PathLike)):
            stored = self.artifacts.add_file(name, value, copy=copy)
        else:
            stored = self.artifacts.add_value(name, value)
        return self._add_artifact({"name": str(name), "context": ctx, "step": step, "timestamp": timestamp,
                                   "item": "input" if is_input else "artifact", **stored, **other(other_attrs)})

    def save_model_version(self, model: Any, model_name: str, context: Any, step: Any = None,
                           timestamp: Any = None, other_attrs: dict | None = None) -> dict[str, Any]:
        """A new version of ``model_name`` (0, 1, 2, ... per rank) under models/<name>/."""
        return self._model_version(lambda dest: models.save_model(model, dest), model_name, context, step,
                                   timestamp, other_attrs)

    def save_model_version_file(self, path: str | os.PathLike, model_name: str, context: Any = None,
                                step: Any = None, other_attrs: dict | None = None) -> dict[str, Any]:
        """A file a framework saved (a Lightning or Hugging Face checkpoint) as the next version
        of ``model_name``: copied, so that later saves over the same name keep each version."""
        source = Path(os.fspath(path))
        if not source.is_file():
            raise InvalidInputError(f"checkpoint {str(source)!r:.200} is not a file")
        return self._model_version(lambda dest: shutil.copyfile(source, dest), model_name, context, step, None,
                                   {"source_path": str(source.absolute()), **(other_attrs or {})})

    def _model_version(self, write: Any, model_name: str, context: Any, step: Any, timestamp: Any,
                       other_attrs: dict | None) -> dict[str, Any]:
        """Write (``write(dest)``) and record version 0, 1, 2, ... of ``model_name`` on this rank."""
        check_name(model_name, "model_name")
        ctx = context_name(context) if context is not None else None
        step = as_step(step) if step is not None else None
        version = self._model_versions.get(model_name, -1) + 1
        dest = self.artifacts.reserve(f"models/{model_name}/{model_name}_v{version:04d}.pt")
        write(dest)
        self._model_versions[model_name] = version
        return self._add_artifact({"name": f"{model_name}_v{version:04d}.pt", "context": ctx, "step": step,
                                   "timestamp": timestamp, "item": "model_version", "model_name": model_name,
                                   "version": version, **self.artifacts.record_for(dest), **other(other_attrs)})

    def log_model(self, model: Any, model_name: str = "default", log_model_info: bool = True,
                  log_model_layers: bool = False, log_as_artifact: bool = True,
                  other_attrs: dict | None = None) -> None:
        check_name(model_name, "model_name")
        attrs = other(other_attrs)
        if log_model_info or attrs:
            self.writer.record({"kind": "model", "time": time.time(), "model_name": model_name,
                                **(models.model_info(model) if log_model_info else {}), **attrs})
        if log_model_layers:
            stored = self.artifacts.add_value(f"models/{model_name}/layers.json", models.layer_table(model))
            self._add_artifact({"name": "layers.json", "context": None, "step": None, "timestamp": None,
                                "item": "model_layers", "model_name": model_name, **stored})
        if log_as_artifact:
            stem = model_name if model_name.endswith("_final") else f"{model_name}_final"  # not x_final_final
            dest = self.artifacts.reserve(f"models/{model_name}/{stem}.pt")
            models.save_model(model, dest)
            self._add_artifact({"name": dest.name, "context": None, "step": None, "timestamp": None,
                                "item": "model", "model_name": model_name, **self.artifacts.record_for(dest)})

    def log_dataset(self, dataset: Any, label: str, other_attrs: dict | None = None) -> None:
        self.writer.record({"kind": "dataset", "time": time.time(), "label": check_name(label, "dataset label"),
                            "stats": dataset_stats(dataset), **other(other_attrs)})

    def _add_artifact(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {"kind": "artifact", "time": time.time(), **record}
        self.writer.record(record)
        self._artifact_records.append(record)
        return record

    def replay_artifact(self, record: dict[str, Any]) -> None:
        """An artifact record of this rank's launcher (``handover``): its file is already under
        this rank's artifacts directory, at the recorded path."""
        self._add_artifact(dict(record))

    def record_written_file(self, dest: Path, fields: dict[str, Any]) -> dict[str, Any]:
        """Record a file written in place at ``dest`` (from ``artifacts.reserve``), e.g. by a
        wrapper's writer thread; ``fields`` name it (name, context, item, ...)."""
        return self._add_artifact({"context": None, "step": None, "timestamp": None, **fields,
                                   **self.artifacts.record_for(dest)})

    @property
    def closed(self) -> bool:
        return self._closed

    def before_close(self, callback: Any) -> None:
        """Call ``callback()`` when this run closes, before its shard does (wrappers flush what
        they hold); a failing callback is logged, never raised."""
        self._before_close.append(callback)

    def artifact_records(self) -> list[dict[str, Any]]:
        """This rank's artifact records (paths relative to ``rank_root`` when copied)."""
        return list(self._artifact_records)

    def sample_now(self) -> None:
        """One system sample now (yProv4ML's log_system_metrics); nothing when sampling is off."""
        if self.sampler is not None:
            self.sampler.sample_now()

    # -- lifecycle ------------------------------------------------------------------------
    def close(self, status: str = "ok") -> None:
        """Flush and close this rank's shard; no merge. Idempotent; nothing in a forked child
        (the shard and the sampler are the parent's)."""
        if self._closed or self.writer.inherited():
            return
        callbacks, self._before_close = self._before_close, []  # while the shard still takes records
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - a wrapper's failure must not lose the shard
                log.warning("rank %s: %r failed at close: %s", self.topology.rank, callback, exc)
        self._closed = True
        if self.sampler is not None:
            self.sampler.stop()  # before the writer closes: its energy record must reach the shard
        self.writer.close(status)

    def settle_topology(self) -> Topology:
        """Detect this process's place again when ``start_run`` found it alone: a framework may
        have started the other ranks, or initialised torch.distributed, since (README, "Which
        rank am I"). The world size and launcher learnt are recorded in the shard (the merge
        reads them). The rank cannot change in place, as the shard and artifacts are named by
        it: a process alone at ``start_run`` (no launcher, no run_id) that torch.distributed
        numbers now agrees on rank 0's run over it (rank 0 publishes its run id), and another
        rank raises RankMoved for ``api.settle`` to move its records into that run as its
        rank; any other change is a RunStateError saying what to do. A topology a launcher
        gave is kept as it is."""
        if self._closed or self.topology.world_size > 1:  # a launcher's numbering: nothing to learn
            return self.topology
        now = detect()
        if now.world_size <= 1:  # still alone (or a process group already destroyed): as it was
            return self.topology
        if self.topology.launcher == "single" and now.launcher == "torch.distributed" and self.config.run_id is None:
            agreed = self._agree_run_id(now)
            if agreed != self.run_id:
                raise RankMoved(now, agreed)
        if now.rank != self.topology.rank:
            raise RunStateError(
                f"this process started its run {self.run_id} as rank {self.topology.rank} of "
                f"{self.topology.world_size}, but is rank {now.rank} of {now.world_size} ({now.launcher}): call "
                "start_run after init_process_group, or launch with torchrun/srun/mpirun, or pass the same "
                "start_run(run_id=...) and rank=... on every process")
        if (now.world_size, now.launcher, now.local_rank, now.node_rank) != (
                self.topology.world_size, self.topology.launcher, self.topology.local_rank, self.topology.node_rank):
            self.topology = replace(now, job_id=self.topology.job_id, step_id=self.topology.step_id,
                                    array_id=self.topology.array_id, elastic_run_id=self.topology.elastic_run_id)
            self.writer.record({"kind": "topology", "time": time.time(), "topology": self.topology.as_dict()})
        return self.topology

    def declare_not_logging(self, reason: str) -> None:
        """Say that this rank records nothing by choice (itwinai's ``log_on_workers`` leaves it
        out): it still takes part in the merge, which marks it "not-logging" — a decision, not
        a rank that is missing or crashed."""
        self.writer.record({"kind": "not_logging", "time": time.time(), "reason": str(reason)[:1000]})

    def _agree_run_id(self, now: Topology) -> str:
        """Rank 0's run id over torch.distributed (rank 0 publishes its own, the others wait)."""
        from .transport import TransportError, agree_run_id

        try:
            agreed = agree_run_id(now, self.run_id, timeout=self.config.merge_timeout)
        except TransportError as exc:
            raise RunStateError(f"rank {now.rank} of {now.world_size}: rank 0's run id did not arrive over "
                                f"torch.distributed ({exc}); its records stay in {self.run_dir}") from None
        return check_component(agreed, "run_id") if agreed is not None else self.run_id

    def local_roots(self) -> list[Path]:
        """This rank's node-local directory, when it used one (``--local-dirs`` of the offline merge)."""
        return [self.rank_root] if self.rank_root != self.run_dir else []

    def close_unfinished(self, status: str) -> None:
        """Close the shard of a run that will not reach ``end_run`` (an exception, ``sys.exit``,
        a signal) and say so in one line: the run, what was kept, and the command that merges it."""
        if self._closed or self.writer.inherited():
            return
        self.close(status)
        kept = sum(table.rows_written for table in (self.writer.metrics, self.writer.system))
        log.warning("prov4ml_dist: rank %d %s before end_run; its shard %s is closed and keeps %d points up to "
                    "%s UTC; once the job is over, complete the run with: %s", self.topology.rank,
                    UNFINISHED.get(status, status), self.shard_path, kept,
                    time.strftime("%H:%M:%S", time.gmtime()), merge_command(self.run_dir, self.local_roots()))

    def end(self, create_graph: bool = False, create_svg: bool = False) -> Path | None:
        """Close the shard, then take part in the merge. Rank 0 gets prov.json; others None."""
        settle_error = None
        try:
            self.settle_topology()  # before the gather: it needs the world size known now
        except RunStateError as exc:
            settle_error = exc
        self.close("ok")
        if settle_error is not None:
            raise settle_error
        from .aggregate import finish_run

        prov_json = finish_run(self)
        if prov_json is not None and (create_graph or create_svg):
            from .provenance import write_graph

            try:
                write_graph(prov_json, svg=create_svg)
            except MergeError as exc:  # no Graphviz: the run's provenance is complete without a drawing
                log.warning("prov4ml_dist: %s; prov.json is complete (draw it later with "
                            "`prov4ml-dist export --format svg RUN_DIR`)", exc)
        return prov_json
