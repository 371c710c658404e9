"""``ProvMLCallback``: a ``transformers.TrainerCallback`` recording, on every rank, the
TrainingArguments (``args/*`` params), the Trainer's logs (one point per number at the global
step), evaluation metrics (context EVALUATION) and each saved checkpoint's weights as a model
version (on the process that saves them).

Pass it as ``Trainer(callbacks=[ProvMLCallback()])``. There is no ``report_to="prov4ml_dist"``:
the Trainer's integration registry is a fixed table inside transformers, which only patching
could extend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..context import Context
from .common import RunHandle

# A checkpoint directory's weights, in the order the Trainer writes them.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


class ProvMLCallback(TrainerCallback):
    """See the module docstring; ``experiment_name``/``provenance_save_dir`` are used only where
    no run is active (processes a launcher started without the script's ``start_run``)."""

    def __init__(self, experiment_name: str | None = None, provenance_save_dir: str | os.PathLike | None = None,
                 checkpoint_model_name: str = "checkpoint", **start_options: Any) -> None:
        self.checkpoint_model_name = checkpoint_model_name
        self._handle = RunHandle(experiment_name, provenance_save_dir, start_options)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """The job is set up (torch.distributed initialised): settle the rank, record the arguments."""
        self._handle.settle()
        self._handle.log_params(args.to_dict(), prefix="args/")
        if model is not None:
            self._handle.log_params({"model_class": type(model).__name__}, prefix="trainer/")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Every rank's logs; ``eval_*`` values are on_evaluate's (recorded once, not twice)."""
        self._handle.log_numbers({k: v for k, v in (logs or {}).items() if not k.startswith("eval_")},
                                 state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        self._handle.log_numbers(metrics or {}, state.global_step, Context.EVALUATION)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The checkpoint just saved (``<output_dir>/checkpoint-<step>``), by the process that saved it."""
        if not getattr(args, "should_save", True):
            return
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for name in WEIGHT_FILES:
            if (directory / name).is_file():
                self._handle.checkpoint(directory / name, self.checkpoint_model_name, state.global_step)
                return

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """End the run if this callback started it; the script ends its own."""
        self._handle.finish()
