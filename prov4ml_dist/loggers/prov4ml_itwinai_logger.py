"""``ProvMLItwinAILogger``: yProv4ML's logger for itwinai's ``Logger`` interface (context
create/destroy, ``save_hyperparameters``, ``log(item, identifier, kind, ...)``), over our API.

Where itwinai is installed the class subclasses ``itwinai.loggers.Logger`` (so itwinai's
trainers and ``LoggersCollection`` accept it); elsewhere it has the same interface on its own.

``log_on_workers`` (-1: every rank; an int or a list of ranks: those) is itwinai's rule, with
one difference: a rank it leaves out still starts a run (no sampling, nothing recorded) and
takes part in ``end_run``, declared "not logging" (``Run.declare_not_logging``). Were it
absent, the merge would wait ``merge_timeout`` for its shard and then call it missing; this
way ``merged.h5``, ``prov4ml-dist summary`` and ``prov.json`` say it was left out on purpose.
"""

from __future__ import annotations

from typing import Any, Literal

from .. import api
from ..compat import functions

try:  # the real base class, where itwinai is installed (pip install prov4ml-dist[itwinai])
    from itwinai.loggers import Logger as _ItwinaiLogger
except ImportError:  # itwinai pins numpy<2 and pulls ray, mlflow, wandb: often not installed
    _ItwinaiLogger = None

SUPPORTED_KINDS = ("metric", "flops_pb", "flops_pe", "system", "carbon", "execution_time", "model", "best_model",
                   "torch")
_BASES: tuple[type, ...] = (_ItwinaiLogger,) if _ItwinaiLogger is not None else ()


class ProvMLItwinAILogger(*_BASES):  # type: ignore[misc] - itwinai's Logger where it is installed
    """yProv4ML's itwinai logger; see the module docstring."""

    supported_kinds = SUPPORTED_KINDS

    def __init__(self, prov_user_namespace: str = "www.example.org", experiment_name: str = "experiment_name",
                 provenance_save_dir: str = "mllogs", save_after_n_logs: int | None = 100,
                 create_graph: bool | None = True, create_svg: bool | None = True,
                 log_freq: int | Literal["epoch", "batch"] = "epoch", log_on_workers: int | list[int] = 0) -> None:
        if not (log_freq in ("epoch", "batch") or (isinstance(log_freq, int) and log_freq > 0)):
            raise ValueError(f"log_freq must be 'epoch', 'batch' or a positive int, got {log_freq!r}")
        if not (isinstance(log_on_workers, int) or (isinstance(log_on_workers, list)
                                                    and all(isinstance(r, int) for r in log_on_workers))):
            raise ValueError(f"log_on_workers must be -1, a rank or a list of ranks, got {log_on_workers!r}")
        if _ItwinaiLogger is not None:
            super().__init__(savedir=provenance_save_dir, log_freq=log_freq, log_on_workers=log_on_workers)
        else:
            self.log_freq = log_freq
            self.log_on_workers = log_on_workers
        self.name = experiment_name
        self.experiment_name = experiment_name
        self.prov_user_namespace = prov_user_namespace
        self.provenance_save_dir = str(provenance_save_dir)
        self.save_after_n_logs = save_after_n_logs
        self.create_graph = bool(create_graph)
        self.create_svg = bool(create_svg)
        self.worker_rank: int | None = None
        self.is_initialized = False

    def logs_on_this_worker(self) -> bool:
        """Whether ``log_on_workers`` includes this worker (itwinai's rule)."""
        workers = self.log_on_workers
        if isinstance(workers, int):
            return workers == -1 or workers == self.worker_rank
        return self.worker_rank in workers

    def should_log(self, batch_idx: int | None = None) -> bool:
        """itwinai's rule: this worker is one ``log_on_workers`` names, and the frequency:
        'epoch' logs calls without a batch index, 'batch' all, an int N every Nth batch."""
        if not self.logs_on_this_worker():
            return False
        if batch_idx is None or self.log_freq == "batch":
            return True
        if self.log_freq == "epoch":
            return False
        return batch_idx % int(self.log_freq) == 0

    def create_logger_context(self, rank: int | None = None, **kwargs: Any) -> None:
        """Start this worker's run (``rank``: its global rank; None: the launcher's). A worker
        ``log_on_workers`` leaves out starts one too, declared not logging (module docstring)."""
        if rank is None:  # itwinai always passes it; a direct call may not
            from ..topology import detect

            rank = detect().rank
        self.worker_rank = rank
        records = self.logs_on_this_worker()
        api.start_run(self.name, self.prov_user_namespace, self.provenance_save_dir,
                      save_after_n_logs=self.save_after_n_logs, collect_all_processes=True, rank=rank,
                      **({} if records else {"sample_interval": None}))
        if not records:
            api.require_run().declare_not_logging(
                f"log_on_workers={self.log_on_workers!r} leaves out rank {rank} (ProvMLItwinAILogger)")
        self.is_initialized = True

    def destroy_logger_context(self) -> Any:
        """End this worker's run: every worker, logging or not, takes part in the merge."""
        self.is_initialized = False
        return api.end_run(create_graph=self.create_graph, create_svg=self.create_svg)

    def save_hyperparameters(self, params: dict[str, Any]) -> None:
        if not self.should_log():
            return
        for key, value in params.items():
            api.log_param(key, value)

    def log(self, item: Any, identifier: str, kind: str = "metric", step: int | None = None,
            batch_idx: int | None = None, context: Any = "training", **kwargs: Any) -> None:
        """One item of ``kind`` (see ``supported_kinds``) under ``identifier``."""
        if kind not in SUPPORTED_KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(SUPPORTED_KINDS)}")
        if not self.should_log(batch_idx):
            return
        if kind == "metric":
            api.log_metric(identifier, item, context, step=step)
        elif kind == "flops_pb":
            functions.log_flops_per_batch(identifier, item[0], item[1], context, step)
        elif kind == "flops_pe":
            functions.log_flops_per_epoch(identifier, item[0], item[1], context, step)
        elif kind == "system":
            functions.log_system_metrics(context, step)
        elif kind == "carbon":
            functions.log_carbon_metrics(context, step)
        elif kind == "execution_time":
            functions.log_current_execution_time(identifier, context, step)
        elif kind == "model":
            api.save_model_version(item, identifier, context, step)
        elif kind == "best_model":
            api.log_model(item, identifier, log_model_info=True, log_model_layers=False)
        elif hasattr(item, "batch_size") and hasattr(item, "dataset"):  # torch: a DataLoader
            api.log_dataset(item, identifier)
        else:
            api.log_param(identifier, item)
