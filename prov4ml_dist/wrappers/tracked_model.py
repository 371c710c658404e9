"""``ProvenanceTrackedModel``: the inputs and outputs of a model's layers (Linear, Conv), as
yProv4ML records them through forward hooks — here into this rank's artifacts as one HDF5
file, written by a background thread, within a byte budget, never blocking a step.

The hook only converts the tensors to float16 copies (on their device) and offers them to a
bounded queue; when the queue is full the batch is dropped and counted, and once the budget
is spent the hooks return at once. The file is closed and recorded as an artifact (with what
was kept, dropped and cut off) when the run closes — also when it closes because of a signal.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..api import get_active_run
from ..context import context_name
from ._module import WrappedModel, model_and_label

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 * 2**20  # 8 MiB of float16 per rank unless the user asks for more
TRACKED_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
QUEUE_BATCHES = 64


class _Recorder:
    """One run's HDF5 file and the thread that writes it."""

    def __init__(self, run: Any, label: str, chunk_size: int, context: Any) -> None:
        import h5py

        self.run, self.label, self.chunk_size, self.context = run, label, chunk_size, context
        self.path: Path = run.artifacts.reserve(f"tracked/{label}.h5")
        self.file = h5py.File(self.path, "w")
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.used = self.dropped = self.skipped = 0
        self.truncated = False
        self.failure: str | None = None
        self._closed = False
        self.thread = threading.Thread(target=self._write_loop, name=f"prov4ml-tracked-{label}", daemon=True)
        self.thread.start()
        run.before_close(self.close)

    def _write_loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.failure is None:
                try:
                    self._write(*item)
                except Exception as exc:  # noqa: BLE001 - recorded with the artifact, training goes on
                    self.failure = f"{type(exc).__name__}: {exc}"

    def _write(self, name: str, inp: torch.Tensor, out: torch.Tensor) -> None:
        for part, tensor in (("input", inp), ("output", out)):
            data = tensor.cpu().numpy()
            if data.ndim == 0:
                data = data.reshape(1)
            key = f"{name}/{part}"
            ds = self.file.get(key)
            if ds is None:
                ds = self.file.create_dataset(key, shape=(0, *data.shape[1:]), maxshape=(None, *data.shape[1:]),
                                              chunks=(self.chunk_size, *data.shape[1:]), dtype=np.float16)
            elif ds.shape[1:] != data.shape[1:]:  # a batch of another shape: not mixed into this table
                self.skipped += 1
                continue
            start = ds.shape[0]
            ds.resize(start + data.shape[0], axis=0)
            ds[start:] = data

    def offer(self, name: str, inp: torch.Tensor, out: torch.Tensor, max_bytes: int) -> None:
        """Called by the hook on the training thread: copy, enqueue or drop, never wait."""
        size = 2 * (inp.numel() + out.numel())
        if self.used + size > max_bytes:
            self.truncated = True
            return
        try:
            self.queue.put_nowait((name, inp.detach().to(torch.float16, copy=True),
                                   out.detach().to(torch.float16, copy=True)))
        except queue.Full:
            self.dropped += 1
            return
        self.used += size

    def close(self) -> None:
        """Drain the queue, close the file and record it as this rank's artifact."""
        if self._closed:
            return
        self._closed = True
        self.queue.put(None)
        self.thread.join(timeout=60)
        self.file.close()
        self.run.record_written_file(self.path, {
            "name": self.path.name, "context": context_name(self.context) if self.context is not None else None,
            "item": "artifact", "tracked_layers": {"bytes": self.used, "dropped_batches": self.dropped,
                                                   "skipped_batches": self.skipped, "budget_reached": self.truncated,
                                                   "failure": self.failure}})


class ProvenanceTrackedModel(WrappedModel):
    """``ProvenanceTrackedModel(model)`` or ``ProvenanceTrackedModel("label", model, context)``.

    ``max_bytes`` (default 8 MiB) bounds what one rank keeps of one run; raise it to keep more
    batches. Outside a run the model just runs."""

    def __init__(self, model_label: Any, model: Any = None, context: Any = None, chunk_size: int = 64,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        model, label = model_and_label(model_label, model, "model")
        super().__init__(model)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative number of bytes, got {max_bytes!r}")
        self.model_name = label
        self.context = context
        self.chunk_size = max(1, int(chunk_size))
        self.max_bytes = max_bytes
        self._recorder: _Recorder | None = None
        self._handles = [module.register_forward_hook(self._hook(name or label))
                         for name, module in model.named_modules() if isinstance(module, TRACKED_TYPES)]

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
            recorder = self._recorder
            if recorder is None or recorder.run.closed or recorder.run is not get_active_run():
                recorder = self._start()
                if recorder is None:
                    return
            if recorder.truncated or not inputs or not isinstance(output, torch.Tensor):
                return
            recorder.offer(name, inputs[0], output, self.max_bytes)
        return hook

    def _start(self) -> _Recorder | None:
        run = get_active_run()
        if run is None or self.max_bytes == 0:
            self._recorder = None
            return None
        self._recorder = _Recorder(run, self.model_name, self.chunk_size, self.context)
        return self._recorder

    def close(self) -> None:
        """Write out now (yProv4ML's explicit close); otherwise done when the run closes."""
        if self._recorder is not None:
            self._recorder.close()
