"""The common part of the model wrappers: forward, state dict and attributes go to the
wrapped model, so a saved checkpoint loads into the bare model and ``log_model`` records the
model inside (see ``models.WRAPPERS``)."""

from __future__ import annotations

from typing import Any

import torch


class WrappedModel(torch.nn.Module):
    """A torch module around ``self.model`` that behaves as that model for saving and calling."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # the bare model's keys, no "model." prefix
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        return self.model.load_state_dict(state_dict, *args, **kwargs)


def model_and_label(first: Any, second: Any, default: str) -> tuple[torch.nn.Module, str]:
    """yProv4ML takes ``(label, model)`` in one version and ``(model)`` in another."""
    if isinstance(first, str):
        return second, first
    return first, second if isinstance(second, str) else default
