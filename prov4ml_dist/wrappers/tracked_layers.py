"""``WeightDistributionTrackedModel``: per-epoch statistics of every parameter tensor, as
metrics — how the weights move, at a cost of one pass over the weights per epoch."""

from __future__ import annotations

from typing import Any

import torch

from ..api import get_active_run
from ..context import Context
from ._module import WrappedModel, model_and_label

STATS = ("mean", "std", "min", "max", "norm")


class WeightDistributionTrackedModel(WrappedModel):
    """``WeightDistributionTrackedModel("net", model)``; call ``log_epoch(epoch)`` once per epoch.
    Each parameter ``layer.weight`` gives metrics ``net/layer.weight/<stat>`` (mean, std, min,
    max, L2 norm) at step ``epoch`` in ``context`` (default MODELS)."""

    def __init__(self, model_name: Any, model: Any = None, context: Any = None) -> None:
        model, name = model_and_label(model_name, model, "model")
        super().__init__(model)
        self.model_name = name
        self.context = context if context is not None else Context.MODELS

    @torch.no_grad()
    def log_epoch(self, epoch: int) -> None:
        run = get_active_run()
        if run is None:
            return
        for param_name, param in self.model.named_parameters():
            w = param.detach().float()
            values = (w.mean(), w.std() if w.numel() > 1 else torch.zeros(()), w.min(), w.max(), w.norm())
            for stat, value in zip(STATS, torch.stack(values).tolist(), strict=True):  # one device sync per tensor
                run.log_metric(f"{self.model_name}/{param_name}/{stat}", value, self.context, epoch)
