"""``ProvMLItwinAILogger``: yProv4ML's logger for itwinai's ``Logger`` interface (context
create/destroy, ``save_hyperparameters``, ``log(item, identifier, kind, ...)``), over our API.
itwinai itself is not needed: the class has the interface, not the base class.

Where ours differs: ``log_on_workers`` is accepted but every rank records (each its own shard,
rank 0 merges) — a rank that did not log would leave the merge waiting for its shard.
"""

from __future__ import annotations

from typing import Any, Literal

from .. import api
from ..compat import functions

SUPPORTED_KINDS = ("metric", "flops_pb", "flops_pe", "system", "carbon", "execution_time", "model", "best_model",
                   "torch")


class ProvMLItwinAILogger:
    """yProv4ML's itwinai logger; see the module docstring."""

    supported_kinds = SUPPORTED_KINDS

    def __init__(self, prov_user_namespace: str = "www.example.org", experiment_name: str = "experiment_name",
                 provenance_save_dir: str = "mllogs", save_after_n_logs: int | None = 100,
                 create_graph: bool | None = True, create_svg: bool | None = True,
                 log_freq: int | Literal["epoch", "batch"] = "epoch", log_on_workers: int | list[int] = 0) -> None:
        if not (log_freq in ("epoch", "batch") or (isinstance(log_freq, int) and log_freq > 0)):
            raise ValueError(f"log_freq must be 'epoch', 'batch' or a positive int, got {log_freq!r}")
        self.name = experiment_name
        self.prov_user_namespace = prov_user_namespace
        self.provenance_save_dir = provenance_save_dir
        self.save_after_n_logs = save_after_n_logs
        self.create_graph = bool(create_graph)
        self.create_svg = bool(create_svg)
        self.log_freq = log_freq
        self.log_on_workers = log_on_workers
        self.worker_rank: int | None = None

    def should_log(self, batch_idx: int | None = None) -> bool:
        """itwinai's frequency rule: 'epoch' logs calls without a batch index, 'batch' all, an
        int N every Nth batch."""
        if batch_idx is None or self.log_freq == "batch":
            return True
        if self.log_freq == "epoch":
            return False
        return batch_idx % int(self.log_freq) == 0

    def create_logger_context(self, rank: int | None = None) -> None:
        self.worker_rank = rank
        api.start_run(self.name, self.prov_user_namespace, self.provenance_save_dir,
                      save_after_n_logs=self.save_after_n_logs, collect_all_processes=True, rank=rank)

    def destroy_logger_context(self) -> Any:
        return api.end_run(create_graph=self.create_graph, create_svg=self.create_svg)

    def save_hyperparameters(self, params: dict[str, Any]) -> None:
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
