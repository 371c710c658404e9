"""Model information and model files: what ``log_model`` and ``save_model_version`` record.

torch is imported lazily: the library must load (and merge offline) where torch is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifacts import drop_world_write
from .errors import ModelSaveError
from .paths import atomic_target

# Wrappers that hold the user's model in an attribute: DDP, DataParallel and FSDP in ``module``,
# torch.compile's OptimizedModule in ``_orig_mod``. What was trained is the model inside.
# Our yProv4ML wrappers (prov4ml_dist/wrappers/) hold it in ``model``.
WRAPPERS = {"DistributedDataParallel": "module", "DataParallel": "module", "FullyShardedDataParallel": "module",
            "OptimizedModule": "_orig_mod",
            "ProvenanceTrackedModel": "model", "WeightDistributionTrackedModel": "model"}


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def unwrap(model: Any) -> tuple[Any, list[str]]:
    """The model inside DDP / DataParallel / FSDP / torch.compile wrappers, and the wrappers'
    class names from the outside in."""
    wrappers = []
    while (attr := WRAPPERS.get(type(model).__name__)) is not None and getattr(model, attr, None) is not None:
        wrappers.append(_qualname(model))
        model = getattr(model, attr)
    return model, wrappers


def model_info(model: Any) -> dict[str, Any]:
    """Parameter counts and memory footprint of a torch module; the class name of anything else.
    ``class`` is the wrapped model's (a DDP-wrapped MLP is an MLP), ``wrappers`` the wrappers'."""
    inner, wrappers = unwrap(model)
    info: dict[str, Any] = {"class": _qualname(inner)}
    if wrappers:
        info["wrappers"] = wrappers
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        params = list(parameters())
        buffers = list(model.buffers()) if callable(getattr(model, "buffers", None)) else []
        info.update(
            parameters=int(sum(p.numel() for p in params)),
            trainable_parameters=int(sum(p.numel() for p in params if p.requires_grad)),
            memory_bytes=int(sum(t.numel() * t.element_size() for t in params + buffers)),
            dtypes=sorted({str(p.dtype) for p in params}),
            devices=sorted({str(p.device) for p in params}),
        )
    return info


def layer_table(model: Any) -> list[dict[str, Any]]:
    """One row per leaf module: name, type, parameter count and shapes, dtype."""
    named_modules = getattr(model, "named_modules", None)
    if not callable(named_modules):
        return []
    rows = []
    for name, module in named_modules():
        if any(True for _ in module.children()):
            continue
        params = list(module.parameters(recurse=False))
        rows.append({
            "name": name or type(module).__name__,
            "type": type(module).__name__,
            "parameters": int(sum(p.numel() for p in params)),
            "shapes": {n: list(p.shape) for n, p in module.named_parameters(recurse=False)},
            "dtype": str(params[0].dtype) if params else None,
            "repr": repr(module)[:200],
        })
    return rows


def save_model(model: Any, dest: Path) -> None:
    """``torch.save`` of the state dict (or the object) to ``dest``, atomically: a model that
    cannot be pickled raises ``ModelSaveError`` and leaves no file behind."""
    import torch

    state = model.state_dict() if callable(getattr(model, "state_dict", None)) else model
    # torch names the archive inside the file after the file's stem: the temporary name's stem
    # holds no host or pid, so identical weights saved by different ranks are identical bytes.
    try:
        with atomic_target(dest) as tmp:
            torch.save(state, tmp)
            drop_world_write(tmp)
    except Exception as exc:  # noqa: BLE001 - pickling can raise anything
        dest.unlink(missing_ok=True)
        raise ModelSaveError(f"torch.save could not save model {type(model).__name__}: {exc}") from exc
