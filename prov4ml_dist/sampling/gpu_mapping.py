"""Which GPUs a rank owns, decided without NVML so the rules can be tested anywhere.

A rank samples only the GPUs it owns, so that no GPU is counted twice on a node:

1. the visible GPUs are ``CUDA_VISIBLE_DEVICES`` read as CUDA reads it (indices, ``GPU-``
   UUIDs or prefixes of them, MIG UUIDs; parsing stops at the first invalid entry), or all;
2. torch's current device, when torch is imported and has a CUDA context, except device 0
   for a local rank >= 1 that can see its own GPU: that is torch's default, left by a script
   that moves its model with ``.to(f"cuda:{local_rank}")`` without ``set_device`` (the rank
   would claim its node's first GPU, as every other rank does); the local rank wins then;
3. else the only visible GPU;
4. else, with several ranks on the node, visible GPU ``local_rank``; a rank beyond the
   visible count shares a GPU with a lower local rank, which samples it;
5. else (the sole process on the node) all visible GPUs.

Integer entries are taken as NVML indices, which follow PCI bus order; CUDA follows them
under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and, in practice, on nodes of identical GPUs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Selector = int | str  # an NVML index, or a GPU/MIG UUID (or a GPU UUID's prefix)


def visible_devices(value: str | None) -> list[Selector] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of selectors; None when unset (every GPU is visible)."""
    if value is None:
        return None
    selectors: list[Selector] = []
    for entry in (e.strip() for e in value.split(",")):
        if entry.isdigit():
            selectors.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            selectors.append(entry)
        else:  # CUDA ignores this entry and every one after it ("-1" hides all GPUs)
            break
    return selectors


def resolve(selector: Selector, uuids: Sequence[str | None],
            mig_parent: Callable[[str], str | None]) -> int | None:
    """The NVML index of the physical GPU a selector names, or None when it names none.

    A MIG instance resolves to its parent GPU: power and energy exist only per physical GPU.
    ``uuids`` has None for a GPU whose UUID could not be read (lost, forbidden); an index still
    names it.
    ``MIG-GPU-<uuid>/<gi>/<ci>`` (drivers before R470) names the parent itself; ``MIG-<uuid>``
    needs NVML (``mig_parent``).
    """
    if isinstance(selector, int):
        return selector if 0 <= selector < len(uuids) else None
    if selector.startswith("MIG-GPU-"):
        selector = selector[len("MIG-"):].split("/")[0]
    elif selector.startswith("MIG-"):
        parent = mig_parent(selector)
        if parent is None:
            return None
        selector = parent
    matches = [i for i, uuid in enumerate(uuids) if uuid is not None and uuid.startswith(selector)]
    return matches[0] if len(matches) == 1 else None


@dataclass(frozen=True)
class Ownership:
    """Positions in the visible list this rank samples, and the rule that chose them (provenance)."""

    positions: tuple[int, ...]
    rule: str


def owned_positions(n_visible: int, local_rank: int, local_world_size: int,
                    torch_device: int | None) -> Ownership:
    """Rules 2-5 of the module docstring."""
    if n_visible == 0:
        return Ownership((), "no GPU is visible to this process")
    if torch_device == 0 and 0 < local_rank < n_visible:
        return Ownership((local_rank,), f"local rank {local_rank} of {n_visible} visible GPUs (torch's current "
                                        "device is its default 0: set_device was not called before start_run)")
    if torch_device is not None:
        if 0 <= torch_device < n_visible:
            return Ownership((torch_device,), f"torch.cuda.current_device() = {torch_device}")
        return Ownership((), f"torch device {torch_device} is not among the {n_visible} visible GPUs")
    if n_visible == 1:
        return Ownership((0,), "the only visible GPU")
    if local_world_size > 1 or local_rank > 0:
        if local_rank >= n_visible:
            position = local_rank % n_visible
            return Ownership((), f"local rank {local_rank} shares visible GPU {position} with local rank "
                                 f"{position}, which samples it")
        return Ownership((local_rank,), f"local rank {local_rank} of {n_visible} visible GPUs")
    return Ownership(tuple(range(n_visible)), "sole process on the node: every visible GPU")


def torch_current_device() -> int | None:
    """torch's current CUDA device when torch is imported and CUDA initialised; never imports torch.

    The current device is per thread: call this from the training thread, not the sampler's.
    """
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    try:
        if cuda is not None and cuda.is_initialized():
            return int(cuda.current_device())
    except Exception:  # noqa: BLE001 - a broken torch install must not stop sampling
        return None
    return None
