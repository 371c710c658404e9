"""Stable descriptions of parameter values whose ``repr`` carries a memory address.

``repr(loader)`` is ``<DataLoader object at 0x7f...>``: different on every rank, so the merge
would report a false "differs across ranks". Such values are described by what every rank
shares: class, length, and for a DataLoader its batch size, workers and dataset — never a
rank's own share of it.
"""

from __future__ import annotations

import re
from typing import Any

from .datasets import dataset_stats

_ADDRESS = re.compile(r"\s+at\s+0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")
_RANK_SPECIFIC = ("rank_samples", "sampler_rank", "num_batches")  # a rank's share, not the loader's


def has_address(text: str) -> bool:
    return _ADDRESS.search(text) is not None


def describe(value: Any, text: str) -> dict[str, Any]:
    """A JSON description of ``value`` (whose repr ``text`` holds an address) that is the same on
    every rank for the same object."""
    kind = type(value)
    info: dict[str, Any] = {"class": f"{kind.__module__}.{kind.__qualname__}"}
    name = getattr(value, "__qualname__", None)
    if isinstance(name, str):
        info["name"] = name
    try:
        info["len"] = len(value)
    except Exception:  # noqa: BLE001, S110 - no length, or one that fails (iterable datasets)
        pass
    if hasattr(value, "batch_size") and hasattr(value, "dataset"):  # a DataLoader
        stats = dataset_stats(value)
        info.pop("len", None)  # batches of this rank
        info.update({k: v for k, v in stats.items() if k not in _RANK_SPECIFIC and k != "type"})
    info["repr"] = _ADDRESS.sub("", text)[:200]
    return info
