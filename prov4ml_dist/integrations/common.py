"""What every framework integration needs: a run to record into (the script's, or one joining
the run the parent process exported), numbers out of a framework's log dict, checkpoints as
model versions. No framework is imported here."""

from __future__ import annotations

import logging
import numbers
import os
from pathlib import Path
from typing import Any

from .. import api
from ..context import Context
from ..run import INHERITED_EXPERIMENT, INHERITED_SAVE_DIR, Run

log = logging.getLogger(__name__)


class RunHandle:
    """The run an integration records into. ``ensure`` gives the active run, or starts one in a
    process the framework started without running the script's ``start_run`` (ddp_spawn's
    workers): it joins the run the parent exported. A run started here is ended here
    (``finish``); the script's own run is the script's to end."""

    def __init__(self, experiment_name: str | None, provenance_save_dir: str | os.PathLike | None,
                 start_options: dict[str, Any] | None = None) -> None:
        self.experiment_name = experiment_name
        self.provenance_save_dir = provenance_save_dir
        self.start_options = dict(start_options or {})
        self.started_here: Run | None = None
        self._checkpoints: set[tuple[str, int, int]] = set()
        self._contexts: dict[Any, Any] = {}  # a metric name's context, read once

    def ensure(self) -> Run:
        run = api.get_active_run()
        if run is not None:
            return run
        api.start_run(self.experiment_name or os.environ.get(INHERITED_EXPERIMENT) or "experiment",
                      provenance_save_dir=self.provenance_save_dir or os.environ.get(INHERITED_SAVE_DIR) or "prov",
                      **self.start_options)
        self.started_here = api.require_run()
        return self.started_here

    def settle(self) -> Run:
        """The run, its topology detected again now that the framework set the job up (a
        process alone at start_run that is another rank of the job moves into its run)."""
        started_here = self.ensure() is self.started_here
        run = api.settle()
        if started_here:
            self.started_here = run
        return run

    def finish(self) -> Path | None:
        """End the run if this integration started it (rank 0 gets prov.json)."""
        run, self.started_here = self.started_here, None
        if run is None or api.get_active_run() is not run:
            return None
        return api.end_run()

    def log_numbers(self, values: dict[str, Any], step: int | None, context: Any = None) -> int:
        """Each numeric value (floats, ints, one-element tensors) as a metric point; strings and
        other values are not metrics and are skipped. Returns how many were recorded."""
        run = self.ensure()
        recorded = 0
        for key, value in values.items():
            number = as_number(value)
            if number is None:
                continue
            if context is None:
                ctx = self._contexts.get(key)
                if ctx is None:
                    ctx = self._contexts[key] = context_of(str(key))
            else:
                ctx = context
            run.log_metric(str(key), number, ctx, step)
            recorded += 1
        return recorded

    def log_params(self, params: dict[str, Any], prefix: str = "") -> None:
        run = self.ensure()
        for key, value in params.items():
            run.log_param(f"{prefix}{key}", value)

    def checkpoint(self, path: str | os.PathLike, model_name: str, step: int | None) -> dict[str, Any] | None:
        """A checkpoint file as the next version of ``model_name``, once per (path, mtime, size):
        frameworks announce the same file again (best and last, repeated callbacks)."""
        source = Path(os.fspath(path))
        try:
            st = source.stat()
        except OSError:
            return None
        ident = (str(source.absolute()), st.st_mtime_ns, st.st_size)
        if ident in self._checkpoints or not source.is_file():
            return None
        self._checkpoints.add(ident)
        return self.ensure().save_model_version_file(source, model_name, Context.MODELS, step)


def as_number(value: Any) -> float | None:
    """A log value as a float, or None when it is not a single number (a string, a list, a
    tensor of several elements)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    numel = getattr(value, "numel", None)
    if callable(numel) and numel() == 1 and callable(getattr(value, "item", None)):
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None


def context_of(key: str) -> Any:
    """The context a framework's metric name implies: test, evaluation (Hugging Face's
    ``eval_*``), validation (Lightning's ``val_*``) names, else training."""
    lowered = key.lower()
    if "test" in lowered:
        return Context.TESTING
    if "eval" in lowered:
        return Context.EVALUATION
    if "val" in lowered:
        return Context.VALIDATION
    return Context.TRAINING
