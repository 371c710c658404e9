"""yProv4ML functions beyond the core API, so that existing scripts run unchanged."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..api import end_run, get_active_run, require_run
from ..context import LoggingItemKind, check_name, context_name, declare_context
from ..environment import code_directory, git_state


def log_current_execution_time(label: str, context: Any = None, step: int | None = None) -> None:
    """Seconds since start_run, as a metric (source EXECUTION_TIME)."""
    run = require_run()
    run.log_metric(label, time.time() - run.started, context if context is not None else "execution", step,
                   LoggingItemKind.EXECUTION_TIME)


def log_system_metrics(context: Any = None, step: int | None = None) -> None:
    """Take a system sample now (the background sampler records them anyway)."""
    require_run().sample_now()


def log_carbon_metrics(context: Any = None, step: int | None = None) -> None:
    """Energy is read from NVML/RAPL counters by the sampler; this samples now."""
    require_run().sample_now()


def log_context(context: Any, is_subcontext_of: Any = None, source_of_data: Any = None) -> None:
    """Declare a context (and its parent) before using it; a new name is then also
    ``Context.<NAME>`` (see ``create_context``)."""
    if isinstance(context, str):
        declare_context(context)
    record: dict[str, Any] = {"kind": "context", "time": time.time(), "context": context_name(context)}
    if is_subcontext_of is not None:
        record["parent"] = context_name(is_subcontext_of)
    if source_of_data is not None:
        record["source_of_data"] = str(source_of_data)
    require_run().writer.record(record)


def create_context(context: str, is_subcontext_of: Any = None) -> Any:
    """yProv4ML 3.x: a context made at run time, usable as ``Context.<NAME>`` from now on (in
    every later run of this process too); recorded in the active run when there is one."""
    member = declare_context(context)
    if get_active_run() is not None:
        log_context(context, is_subcontext_of)
    return member


def log_source_code(path: str | Path | None = None, use_git: bool = True) -> None:
    """Keep a copy of the training script (default: the running ``sys.argv[0]``) as an artifact;
    with ``use_git`` (yProv4ML 3.x) also its repository's commit, branch and dirty flag as the
    param ``source_code_git`` (no param outside a git repository)."""
    source = Path(path) if path is not None else Path(sys.argv[0]).resolve()
    run = require_run()
    run.log_artifact(f"source/{source.name}", source, "source_code", is_input=True)
    if use_git:
        state = git_state(source.parent if source.parent.is_dir() else code_directory())
        if state is not None:
            run.log_param("source_code_git", state)


def log_provenance_documents(create_graph: bool = False, create_svg: bool = False,
                             crate_ro_crate: bool = False) -> Path | None:
    """yProv4ML's itwinai name for ``end_run``."""
    return end_run(create_graph=create_graph, create_svg=create_svg, crate_ro_crate=crate_ro_crate)


def get_run_dir() -> Path:
    """The run directory shared by all ranks (where merged.h5 and prov.json will be)."""
    return require_run().run_dir


def get_artifacts_dir() -> Path:
    """This rank's artifact directory (each rank has its own: no two ranks write one file)."""
    return require_run().artifacts.directory


def log_execution_command(cmd: str, path: str | None = None) -> None:
    """The command line used to run the job, as a parameter."""
    require_run().log_param("execution_command", check_name(f"{cmd} {path}" if path else cmd, "execution command"))


def log_flops_per_batch(label: str, model: Any, batch: Any, context: Any = None, step: int | None = None) -> None:
    """Floating-point operations of one forward pass over ``batch`` (torch's FlopCounterMode)."""
    require_run().log_metric(label, _forward_flops(model, [batch]), context if context is not None else "flops", step,
                      LoggingItemKind.FLOPS_PER_BATCH)


def log_flops_per_epoch(label: str, model: Any, dataset: Any, context: Any = None, step: int | None = None) -> None:
    """Floating-point operations of forward passes over every batch of ``dataset`` (a DataLoader)."""
    require_run().log_metric(label, _forward_flops(model, dataset), context if context is not None else "flops", step,
                      LoggingItemKind.FLOPS_PER_EPOCH)


def _forward_flops(model: Any, batches: Any) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(inputs)
    return float(counter.get_total_flops())
