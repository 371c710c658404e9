"""The public, module-level API (yProv4ML's), over the one active ``Run`` of this process.

Arguments are checked here and in ``Run``; yProv4ML 2.x/3.x spellings are accepted and
mapped (see README, "Coming from yProv4ML").
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any

from . import yprov4ml_args
from .context import Context
from .errors import ArtifactError, InvalidInputError, RunStateError
from .handover import forking_ranks, hand_over, move_run, take_over
from .process_hooks import ExitHooks
from .run import (
    INT64_MAX,
    RankMoved,
    Run,
    RunConfig,
    as_metric_value,
    as_step,
    automatic_step_overflow,
    check_param,
    export_run,
    unexport_run,
)
from .topology import detect

log = logging.getLogger(__name__)

_active: Run | None = None
_hooks: ExitHooks | None = None
_forked_from: Run | None = None  # in a forked child: the parent's run, never to be written
_refused = 0  # calls refused in this forked child
_handed_over: Run | None = None  # this process's run, handed over to spawned ranks (handover.py)
_launched_by: Run | None = None  # in a rank forked by torch's start_processes: the run its launcher handed over
_ended: tuple[Run, Path | None] | None = None  # the last run ended here and what end_run returned: a second
# end_run (a framework's hook and the script both call it) returns the same


class _Refused:
    """What ``require_run`` gives a forked child: every attribute and call is a no-op."""

    def __getattr__(self, name: str) -> _Refused:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


def _refuse() -> _Refused:
    """Count a call made in a forked child; warn at the first."""
    global _refused
    _refused += 1
    if _refused == 1:
        parent = _forked_from
        log.warning("prov4ml_dist: process %d is a fork of rank %s's process (a DataLoader worker, a "
                    "multiprocessing helper): it records nothing, and its logging calls are ignored and "
                    "counted (prov4ml_dist.api.refused_calls()); the parent's run %s is not affected. Log "
                    "from the parent, or start_run(run_id=...) a run of this process's own",
                    os.getpid(), parent.topology.rank if parent else "?", parent.run_id if parent else "?")
    return _REFUSED


_REFUSED = _Refused()


def refused_calls() -> int:
    """How many logging calls this forked child made (and had ignored) since the fork."""
    return _refused


def _before_fork() -> None:
    """A process alone in its run that forks the ranks of a job (torch's ``start_processes``:
    Accelerate's notebook_launcher, Lightning's ddp_fork) is their launcher, not a rank: its run
    goes to them, as to ddp_spawn's ranks (handover.py). Any other fork changes nothing."""
    run = _active
    if run is not None and run.topology.world_size == 1 and not run.writer.inherited() and forking_ranks():
        try:
            hand_over_to_spawned_ranks()
        except Exception as exc:  # noqa: BLE001 - a fork hook must never fail the fork
            log.warning("prov4ml_dist: could not hand run %s over to the ranks being started: %s", run.run_id, exc)


def _after_fork_in_child() -> None:
    """A forked child inherits the active run, but it is the parent's: forget it (README,
    "Guarantees": the parent's shard is never written, flushed into or closed by a child). A
    child forked as a rank after its parent handed its run over joins that run instead."""
    global _active, _hooks, _forked_from, _refused, _handed_over, _launched_by
    if _active is not None:
        _forked_from, _active, _hooks, _refused = _active, None, None, 0
    if _handed_over is not None:
        _launched_by, _handed_over = _handed_over, None


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)

# yProv4ML options that have no effect here, and why (also in the README).
YPROV4ML_OPTIONS = {
    "collect_all_processes": "every rank always writes its own shard; rank 0 merges them",
    "save_after_n_logs": "points are flushed every flush_interval seconds instead",
    "metrics_file_type": "metrics are always stored in HDF5 (shards and merged.h5)",
    "csv_separator": "metrics are always stored in HDF5; `prov4ml-dist export --format csv` writes CSV",
    "use_compressor": "no archive is made; the run directory is the result",
    "disable_codecarbon": "energy comes from NVML and RAPL counters, not codecarbon",
    "create_graph": "pass create_graph to end_run",
    "create_svg": "pass create_svg to end_run",
    "use_run_id": "used as run_id when run_id is not given",
}


def require_run() -> Run:
    """The active Run; a clear error when there is none. In a rank forked by a launcher that
    handed its run over, the run this rank joins (started here, ended at exit)."""
    run = _active
    if run is None:
        if _forked_from is not None:
            return _refuse()  # type: ignore[return-value] - a no-op Run in a forked child
        if _launched_by is not None and detect().world_size > 1:
            return _join_launchers_run(_launched_by)
        raise RunStateError("no active run: call prov4ml.start_run(...) first (or it has ended)")
    return run


def _join_launchers_run(launcher: Run) -> Run:
    """This forked rank's run, joining the one its launcher handed over (its settings), ended
    when the process exits: torch's workers leave through multiprocessing's exit, which runs
    its finalizers but not ``atexit``."""
    import multiprocessing.util

    config = launcher.config
    start_run(config.experiment_name, config.user_namespace, config.provenance_save_dir, run_id=config.run_id,
              local_dir=config.local_dir, flush_interval=config.flush_interval,
              sample_interval=config.sample_interval, merge_timeout=config.merge_timeout)
    run = require_run()
    multiprocessing.util.Finalize(None, _end_joined_run, args=(run,), exitpriority=100)
    return run


def _end_joined_run(run: Run) -> None:
    """At the exit of a rank that joined its launcher's run: end it, unless the code did."""
    if _active is run:
        end_run()


def get_active_run() -> Run | None:
    """The active Run of this process, or None."""
    return _active


def start_run(experiment_name: str | None = None, prov_user_namespace: str | None = None,
              provenance_save_dir: str | os.PathLike | None = None, *yprov4ml_positional: Any,
              run_id: str | None = None, local_dir: str | os.PathLike | None = None, flush_interval: float = 1.0,
              sample_interval: float | None = 1.0, merge_timeout: float = 300.0,
              prov_save_path: str | os.PathLike | None = None, rank: int | None = None,
              **yprov4ml_options: Any) -> Path:
    """Start recording this process; returns the run directory shared by all ranks of the job.

    yProv4ML 3.x's order (experiment name first, then its options positionally) is ours; a 2.x
    call with the namespace first (an IRI) is recognised. A run still active (an exception
    skipped its end_run: a notebook, a dask worker) is closed as "abandoned", with a warning."""
    global _active, _hooks, _forked_from, _handed_over, _launched_by
    experiment_name, prov_user_namespace = yprov4ml_args.start_run_names(experiment_name, prov_user_namespace)
    options = yprov4ml_args.bind_positional("start_run", yprov4ml_args.START_RUN_POSITIONAL, yprov4ml_positional,
                                            {"rank": rank, **yprov4ml_options})
    rank = options.pop("rank")
    yprov4ml_options = {k: v for k, v in options.items() if k in yprov4ml_options or v is not None}
    unknown = sorted(set(yprov4ml_options) - set(YPROV4ML_OPTIONS))
    if unknown:
        raise TypeError(f"start_run() got unexpected keyword arguments: {', '.join(unknown)}")
    if _active is not None:
        _abandon(_active)
    save_dir = provenance_save_dir if provenance_save_dir is not None else prov_save_path
    if run_id is None and yprov4ml_options.get("use_run_id") is not None:
        run_id = str(yprov4ml_options["use_run_id"])
    config = RunConfig(
        experiment_name=experiment_name or "experiment",
        provenance_save_dir=Path(save_dir if save_dir is not None else "prov"),
        user_namespace=prov_user_namespace or "http://example.org/",
        run_id=run_id, local_dir=Path(local_dir) if local_dir is not None else None,
        flush_interval=flush_interval, sample_interval=sample_interval, merge_timeout=merge_timeout,
        yprov4ml_options={k: repr(v) if isinstance(v, Enum) else v for k, v in yprov4ml_options.items()},
    )
    topology = detect()
    if rank is not None and rank != topology.rank:
        if topology.launcher == "single":
            topology = replace(topology, rank=int(rank))
        else:
            log.warning("start_run(rank=%s) ignored: the launcher (%s) says rank %s",
                        rank, topology.launcher, topology.rank)
    run = Run(config, topology)
    export_run(config, run.run_id)
    # a run handed over earlier (or by this process's launcher) is not this one's
    _active, _forked_from, _handed_over, _launched_by = run, None, None, None
    _hooks = ExitHooks(run.close_unfinished, run.writer.defer)
    take_over(run)
    return run.run_dir


def settle() -> Run:
    """The active run once the framework has set the job up (``Run.settle_topology``): the same
    run, or — in a process that was alone at ``start_run`` and is now another rank of a job
    (Lightning's nodes started by hand) — the run it moved into (handover.move_run)."""
    global _active, _hooks
    run = require_run()
    try:
        run.settle_topology()
    except RankMoved as moved:
        if _hooks is not None:
            _hooks.remove()
            _hooks = None
        _active = None
        unexport_run(run.run_id)
        run = move_run(run, moved.run_id, moved.topology)
        export_run(run.config, run.run_id)
        _active, _hooks = run, ExitHooks(run.close_unfinished, run.writer.defer)
    return run


def hand_over_to_spawned_ranks() -> Path | None:
    """Called in the script's process when a framework is about to start the job's ranks as new
    processes that do not run the script (ddp_spawn): this process is their launcher, not a
    rank; its shard is taken in by the new rank of the same number (handover.py). Returns the
    handed-over file, or None when there is nothing to hand over (no run, or already a rank of
    a multi-process job)."""
    global _active, _hooks, _handed_over
    run = _active
    if run is None or run.topology.world_size > 1:
        return None
    _active = None
    if _hooks is not None:
        _hooks.remove()
        _hooks = None
    _handed_over = run
    return hand_over(run)


def _abandon(stale: Run) -> None:
    """Close a run whose end_run never came (its shard says "abandoned"; ``prov4ml-dist merge``
    merges it later), so that a new start_run in the same process works."""
    global _active, _hooks
    log.warning("start_run: the previous run %s was never ended (an exception?); closing its shard as "
                "'abandoned' (merge it with: prov4ml-dist merge %s)", stale.run_dir, stale.run_dir)
    _active = None
    if _hooks is not None:
        _hooks.remove()
        _hooks = None
    unexport_run(stale.run_id)
    stale.close("abandoned")


def end_run(create_graph: bool = False, create_svg: bool = False, crate_ro_crate: bool = False,
            create_card: bool = False) -> Path | None:
    """Close this rank's shard and merge. Returns the merged prov.json on rank 0, None elsewhere
    (and None when the merge is left to ``prov4ml-dist merge``, or when no run is active: as in
    yProv4ML, with a warning). On rank 0, ``create_card`` writes a model card and
    ``crate_ro_crate`` an RO-Crate of the run directory (see compat/card.py, compat/crate.py)."""
    global _active, _hooks, _ended, _handed_over
    run = _active
    if run is not None and not run.closed:
        with contextlib.suppress(RunStateError):  # Run.end meets it again, and raises it with its shard closed
            run = settle()  # before the gather: the world size known now, the rank in its run
    if run is None:
        if _forked_from is not None:
            _refuse()  # a forked child: the run is its parent's to end
            return None
        if _handed_over is not None:  # its ranks ended it; rank 0 wrote prov.json
            handed, _handed_over = _handed_over, None
            unexport_run(handed.run_id)
            prov_json = handed.run_dir / "prov.json"
            _ended = (handed, prov_json if prov_json.is_file() else None)
            return _ended[1]
        if _ended is not None:
            log.warning("end_run: the run %s has already ended; returning what its end_run returned",
                        _ended[0].run_dir)
            return _ended[1]
        log.warning("end_run: no active run (never started); nothing to do")
        return None
    _active = None
    if _hooks is not None:
        _hooks.remove()
        _hooks = None
    unexport_run(run.run_id)
    prov_json = run.end(create_graph=create_graph, create_svg=create_svg)
    if prov_json is not None and (create_card or crate_ro_crate):
        from .compat.outputs import write_outputs

        write_outputs(prov_json.parent, card=create_card, crate=crate_ro_crate)
    _ended = (run, prov_json)
    return prov_json


def log_metric(key: str, value: Any, context: Any = None, step: int | None = None, source: Any = None,
               timestamp: Any = None) -> None:
    """Record one point of a metric series (the hot path: no I/O). Without a context (optional
    in yProv4ML 3.x) the point is TRAINING's. yProv4ML's ``timestamp`` is accepted; every point
    carries this process's wall-clock time instead."""
    run = _active
    if run is None:  # raises, or refuses in a forked child, or joins the run its launcher handed over
        run = require_run()
    if context is None:
        context = Context.TRAINING
    run.log_metric(key, value, context, step, source)


def log_metrics(metrics: dict[str, Any], context: Any, step: int | None = None, source: Any = None) -> None:
    """Several metrics at the same step, all or nothing: every key, value, the context, source
    and step are checked before the first point is logged, so a refused call records nothing."""
    if not isinstance(metrics, dict):
        raise InvalidInputError(f"log_metrics takes a dict of key → value, got {type(metrics).__name__}")
    run = require_run()
    if step is not None:
        step = as_step(step)
    values = {}
    for key, value in metrics.items():
        if run.next_step(key, context, source) > INT64_MAX and step is None:
            raise automatic_step_overflow(key)
        values[key] = as_metric_value(value)
    for key, value in values.items():
        run.log_metric(key, value, context, step, source)


def log_param(key: str, value: Any, context: Any = None, source: Any = None, is_input: bool = False) -> None:
    """Record a parameter; non-JSON values are stored as their repr. yProv4ML 3.x's ``context``
    is recorded; ``source`` and ``is_input`` are accepted."""
    require_run().log_param(key, value, context)


def log_params(params: dict[str, Any]) -> None:
    """Several params, all or nothing, as ``log_metrics``: every key and value is checked first."""
    if not isinstance(params, dict):
        raise InvalidInputError(f"log_params takes a dict of key → value, got {type(params).__name__}")
    run = require_run()
    for key, value in params.items():
        check_param(key, value)
    for key, value in params.items():
        run.log_param(key, value)


def log_artifact(artifact_path: str | os.PathLike, value: Any = None, context: Any = None,
                 step: Any = None, timestamp: Any = None,
                 log_copy_in_prov_directory: bool = True, *, source: Any = None,
                 log_copy_subdirectory: str | None = None, is_model: bool = False,
                 is_input: bool = False, other_attrs: dict[str, Any] | None = None,
                 text: str | None = None) -> dict[str, Any]:
    """Record a file, directory or value under the name ``artifact_path``; without a context
    (optional in 3.x) the artifact has none. A ``str`` or path ``value`` is always a file or
    directory to copy; text to store as the artifact's content goes in ``text=`` (UTF-8).

    yProv4ML 2.x's ``log_artifact(path, context, step)`` works too: the file is ``artifact_path``.
    3.x's ``log_artifact(name, path, context, source, step)`` is recognised (a string where the
    step goes is the source). 3.x keywords: ``log_copy_subdirectory`` prefixes the stored name,
    ``is_input`` records the artifact as used (read) by the rank rather than generated,
    ``other_attrs`` is recorded with it; ``source`` and ``is_model`` are accepted.
    """
    step, timestamp, source = yprov4ml_args.artifact_3x(step, timestamp, source)
    if text is not None:
        if not isinstance(text, str):
            raise InvalidInputError(f"log_artifact(text=...) takes a str, got {type(text).__name__}")
        if value is not None:
            raise InvalidInputError("log_artifact: pass the content either as value or as text=, not both")
        value = text.encode("utf-8")
    if not isinstance(artifact_path, (str, os.PathLike)):
        raise ArtifactError(f"artifact_path must be a name or a path, got {type(artifact_path).__name__}")
    if isinstance(value, Enum) and (context is None or isinstance(context, int)):
        value, context, step = None, value, step if context is None else context
    if value is None:
        value = artifact_path
    same_file = isinstance(value, (str, os.PathLike)) and os.fspath(value) == os.fspath(artifact_path)
    name = os.path.basename(os.fspath(artifact_path)) if same_file else os.fspath(artifact_path)
    if log_copy_subdirectory:
        name = f"{log_copy_subdirectory}/{name}"
    return require_run().log_artifact(name, value, context, step, timestamp, copy=log_copy_in_prov_directory,
                                      is_input=is_input, other_attrs=other_attrs)


def log_model(model: Any, model_name: Any = "default", *positional: Any, log_model_info: bool | None = None,
              log_model_layers: bool | None = None, log_as_artifact: bool | None = None, context: Any = None,
              source: Any = None, log_copy_in_prov_directory: bool | None = None, is_input: bool | None = None,
              other_attrs: dict[str, Any] | None = None) -> None:
    """Model information, optionally its layers (JSON) and its final weights as an artifact.

    Ours: ``log_model(model, name, log_model_info=True, log_model_layers=False,
    log_as_artifact=True)``. 3.x's ``log_model(name, model, context, source, log_model_info,
    log_model_layers, log_as_artifact, is_input)`` is recognised by type; its
    ``log_copy_in_prov_directory`` means ``log_as_artifact``; ``other_attrs`` is recorded with
    the model; ``context``, ``source`` and ``is_input`` are accepted."""
    given = {"context": context, "source": source, "log_model_info": log_model_info,
             "log_model_layers": log_model_layers, "log_as_artifact": log_as_artifact, "is_input": is_input}
    names = yprov4ml_args.LOG_MODEL_OURS
    if isinstance(model, str) and not isinstance(model_name, str):
        model, model_name = model_name, model
        names = yprov4ml_args.LOG_MODEL_3X
    bound = yprov4ml_args.bind_positional("log_model", names, positional, given)
    if log_copy_in_prov_directory is not None and bound["log_as_artifact"] is None:
        bound["log_as_artifact"] = log_copy_in_prov_directory
    require_run().log_model(model, model_name, bound["log_model_info"] is not False,
                            bool(bound["log_model_layers"]), bound["log_as_artifact"] is not False,
                            other_attrs=other_attrs)


def save_model_version(model: Any, model_name: Any, context: Any = None, step: int | None = None,
                       timestamp: int | None = None, *, source: Any = None, incremental: bool = True,
                       is_input: bool = False, log_copy_in_prov_directory: bool = True,
                       other_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save a new numbered version of a model (state dict) and record it. 3.x's
    ``save_model_version(model_name, model, context, source, step)`` is recognised by type;
    ``other_attrs`` is recorded with the version; its other keywords are accepted (versions are
    always incremental and always copied)."""
    if isinstance(model, str) and not isinstance(model_name, str):
        model, model_name = model_name, model
    step, timestamp, source = yprov4ml_args.artifact_3x(step, timestamp, source)
    return require_run().save_model_version(model, model_name, context, step, timestamp, other_attrs=other_attrs)


def log_dataset(dataset: Any, label: Any, context: Any = None, source: Any = None,
                log_dataset_info: bool = True, other_attrs: dict[str, Any] | None = None) -> None:
    """Dataset statistics; 3.x's ``log_dataset(label, dataset)`` order is recognised by type;
    ``other_attrs`` is recorded with them (its ``context``, ``source`` and ``log_dataset_info``
    are accepted)."""
    if isinstance(dataset, str) and not isinstance(label, str):
        dataset, label = label, dataset
    require_run().log_dataset(dataset, label, other_attrs=other_attrs)


