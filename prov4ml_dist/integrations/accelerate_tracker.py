"""``ProvMLTracker``: an Accelerate tracker, ``Accelerator(log_with=[ProvMLTracker()])``.

``init_trackers(config=...)`` becomes ``config/*`` params and ``accelerator.log(values, step)``
metric points. Accelerate (1.x) calls its trackers from the main process only, whatever the
tracker says; the tracker itself works on every rank (``main_process_only = False``), so
calling ``tracker.log(...)`` (``accelerator.get_tracker("prov4ml_dist")`` on rank 0, or the
instance you passed) or ``prov4ml_dist.log_metric`` on each rank gives cross-rank statistics.
"""

from __future__ import annotations

import os
from typing import Any

from accelerate.tracking import GeneralTracker

from .common import RunHandle


class ProvMLTracker(GeneralTracker):
    """Records into the active run, or one joining the run the parent exported."""

    name = "prov4ml_dist"
    requires_logging_directory = False
    main_process_only = False

    def __init__(self, experiment_name: str | None = None, provenance_save_dir: str | os.PathLike | None = None,
                 **start_options: Any) -> None:
        super().__init__()
        self._handle = RunHandle(experiment_name, provenance_save_dir, start_options)

    @property
    def tracker(self) -> Any:
        """The run this tracker records into (our ``Run``)."""
        return self._handle.ensure()

    def start(self) -> None:
        self._handle.settle()

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self._handle.log_params(dict(values or {}), prefix="config/")

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self._handle.log_numbers(values, step)

    def finish(self) -> None:
        """End the run if this tracker started it; the script ends its own."""
        self._handle.finish()
