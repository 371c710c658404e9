"""``ProvMLLogger``: a ``lightning.pytorch`` Logger under yProv4ML's name.

Unlike Lightning's own loggers (rank 0 only), it records on every rank: each rank's
``self.log`` values go to its shard, so the merge has cross-rank statistics. It also records the
LightningModule's hyperparameters, the Trainer's set-up (strategy, devices, precision, nodes) as
params, and every ModelCheckpoint file as a model version (lineage: version N derives from N-1).

Lightning calls ``log_graph`` on every rank once the job is set up (torch.distributed
initialised, after its launcher started the other processes): that is where the rank is settled
(``Run.settle_topology``) and the set-up recorded.
"""

from __future__ import annotations

import os
import weakref
from argparse import Namespace
from typing import Any

from lightning.pytorch.loggers.logger import Logger

from .common import RunHandle


class ProvMLLogger(Logger):
    """Records into the active run (``start_run`` before the Trainer), or into one joining the
    run the parent process exported (ddp_spawn's workers); see the module docstring.

    ``name``/``version``/``prefix`` are yProv4ML's; ``experiment_name`` and
    ``provenance_save_dir`` are used only where this logger starts the run itself."""

    def __init__(self, name: str | None = "lightning_logs", version: int | str | None = None, prefix: str = "",
                 flush_logs_every_n_steps: int = 100, experiment_name: str | None = None,
                 provenance_save_dir: str | os.PathLike | None = None, checkpoint_model_name: str = "checkpoint",
                 **start_options: Any) -> None:
        super().__init__()
        self._name = name or ""
        self._version = version
        self._prefix = prefix
        self._flush_logs_every_n_steps = flush_logs_every_n_steps  # yProv4ML's; points flush every flush_interval
        self.checkpoint_model_name = checkpoint_model_name
        self._handle = RunHandle(experiment_name, provenance_save_dir, start_options)
        self._trainer: weakref.ref | None = None  # set in log_graph: the global step of a checkpoint

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str | None:
        return self._version

    @property
    def save_dir(self) -> str | None:
        run = self._handle.started_here
        return str(run.run_dir) if run is not None else None

    @property
    def experiment(self) -> Any:
        """The run this logger records into (our ``Run``)."""
        return self._handle.ensure()

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Every rank: one point per number, at Lightning's global step."""
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        self._handle.log_numbers(metrics, step)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        values = vars(params) if isinstance(params, Namespace) else dict(params or {})
        self._handle.log_params(values)

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Called by Lightning on every rank once the job is set up: settle the rank, record the
        Trainer's set-up."""
        self._handle.settle()
        trainer = getattr(model, "_trainer", None)
        if trainer is not None:
            self._trainer = weakref.ref(trainer)
            self._handle.log_params(trainer_setup(trainer), prefix="trainer/")

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """ModelCheckpoint's files (Lightning calls this on global rank 0, which wrote them)."""
        callback = checkpoint_callback
        paths = [getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")]
        paths += list(getattr(callback, "best_k_models", {}) or {})
        trainer = self._trainer() if self._trainer is not None else None
        step = getattr(trainer, "global_step", None)
        for path in dict.fromkeys(p for p in paths if p):
            self._handle.checkpoint(path, self.checkpoint_model_name, step)

    def finalize(self, status: str) -> None:
        """End the run if this logger started it (ddp_spawn's workers); the script ends its own."""
        self._handle.finish()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for ddp_spawn's workers (Lightning sends them the Trainer and its loggers):
        the script's process is their launcher, not a rank, so its run is handed over to the
        new rank 0 (prov4ml_dist/handover.py); each worker records into its own shard."""
        from .. import api

        if self._handle.started_here is None:
            api.hand_over_to_spawned_ranks()
        state = self.__dict__.copy()
        state["_trainer"] = None
        state["_handle"] = RunHandle(self._handle.experiment_name, self._handle.provenance_save_dir,
                                     self._handle.start_options)
        return state


def trainer_setup(trainer: Any) -> dict[str, Any]:
    """The Trainer's set-up as params: strategy, its launcher and cluster environment,
    accelerator, devices, precision, nodes, world."""
    strategy = getattr(trainer, "strategy", None)
    return {"strategy": type(strategy).__name__ if strategy is not None else None,
            "strategy_launcher": type(getattr(strategy, "launcher", None)).__name__,
            # who numbered the ranks: SLURMEnvironment (srun), TorchElasticEnvironment, LightningEnvironment
            "cluster_environment": type(getattr(strategy, "cluster_environment", None)).__name__,
            "accelerator": type(getattr(trainer, "accelerator", None)).__name__,
            "devices": getattr(trainer, "num_devices", None), "num_nodes": getattr(trainer, "num_nodes", None),
            "precision": str(getattr(trainer, "precision", None)), "world_size": getattr(trainer, "world_size", None),
            "max_epochs": getattr(trainer, "max_epochs", None), "max_steps": getattr(trainer, "max_steps", None)}
