"""Dataset statistics for ``log_dataset``: DataLoader, Dataset, Subset — and per-rank truth
under a DistributedSampler (a rank sees ``len(sampler)`` samples, not ``len(dataset)``)."""

from __future__ import annotations

import math
from typing import Any


def _length(obj: Any) -> int | None:
    try:
        return len(obj)
    except Exception:  # noqa: BLE001 - iterable datasets have no length
        return None


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def dataset_stats(dataset: Any) -> dict[str, Any]:
    """What yProv4ML records (batch size, workers, shuffle, batches, samples) and a little more."""
    if hasattr(dataset, "batch_size") and hasattr(dataset, "dataset"):  # a DataLoader
        return _loader_stats(dataset)
    stats: dict[str, Any] = {"type": _qualname(dataset), "total_samples": _length(dataset)}
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # a Subset
        stats["parent_type"] = _qualname(dataset.dataset)
        stats["parent_samples"] = _length(dataset.dataset)
    return stats


def _loader_stats(loader: Any) -> dict[str, Any]:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler_name = type(sampler).__name__ if sampler is not None else None
    distributed = hasattr(sampler, "num_replicas") and hasattr(sampler, "rank")
    if distributed:
        shuffle = bool(getattr(sampler, "shuffle", False))
    else:
        shuffle = sampler_name == "RandomSampler"
    batch_size = loader.batch_size if loader.batch_size is not None else getattr(batch_sampler, "batch_size", None)
    samples_here = _length(sampler) if sampler is not None else _length(loader.dataset)
    stats: dict[str, Any] = {
        "type": _qualname(loader),
        "dataset_type": _qualname(loader.dataset),
        "batch_size": batch_size,
        "num_workers": getattr(loader, "num_workers", 0),
        "shuffle": shuffle,
        "drop_last": bool(getattr(loader, "drop_last", False)),
        "sampler": sampler_name,
        "total_samples": _length(loader.dataset),
        "rank_samples": samples_here,
        "num_batches": _length(loader),
    }
    if stats["num_batches"] is None and samples_here is not None and batch_size:
        rounding = math.floor if stats["drop_last"] else math.ceil
        stats["num_batches"] = int(rounding(samples_here / batch_size))
    if distributed:
        stats.update(num_replicas=sampler.num_replicas, sampler_rank=sampler.rank,
                     seed=getattr(sampler, "seed", None))
    return stats
