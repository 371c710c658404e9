"""yProv4ML's wrappers, at the import paths its examples use (``prov4ml_dist.wrappers.tracked_model``
...). Each needs torch, so each module is imported on first use."""

from typing import Any


def __getattr__(name: str) -> Any:
    import prov4ml_dist

    if prov4ml_dist._LAZY.get(name, "").startswith(__name__ + "."):
        return getattr(prov4ml_dist, name)
    raise AttributeError(f"module 'prov4ml_dist.wrappers' has no attribute {name!r}")
