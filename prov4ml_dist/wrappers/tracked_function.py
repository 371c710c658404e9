"""``ProvenanceTrackedFunction``: a callable (a loss, a metric) whose every scalar result is
logged as a point of the metric named after it."""

from __future__ import annotations

import numbers
from typing import Any

from ..api import get_active_run, log_metric
from ..context import Context


def scalar(result: Any) -> float | None:
    """The result as a float when it is one number (a 0-d or 1-element tensor, a Python or NumPy
    number); None for anything else (a tuple, a vector), which is then not logged."""
    numel = getattr(result, "numel", None)
    if callable(numel):
        return float(result.detach().item()) if numel() == 1 else None
    if isinstance(result, numbers.Real) and not isinstance(result, bool):
        return float(result)
    return None


class ProvenanceTrackedFunction:
    """Wrap ``func``; each call logs its result under ``name`` (default: the function's or its
    class's name, e.g. ``MSELoss``) in ``context`` (default TRAINING), one step per call.
    Outside a run the function just runs: tracking never breaks the training it watches."""

    def __init__(self, func: Any, context: Any = None, name: str | None = None) -> None:
        if not callable(func):
            raise TypeError(f"ProvenanceTrackedFunction wraps a callable, got {type(func).__name__}")
        self.fn = func
        self.context = context if context is not None else Context.TRAINING
        self.name = name or getattr(func, "__name__", None) or type(func).__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.fn(*args, **kwargs)
        if get_active_run() is not None:
            value = scalar(result)
            if value is not None:
                log_metric(self.name, value, self.context)
        return result

    def __getattr__(self, name: str) -> Any:  # .to(device), .reduction, ... reach the function
        fn = self.__dict__.get("fn")
        if fn is None:
            raise AttributeError(name)
        return getattr(fn, name)
