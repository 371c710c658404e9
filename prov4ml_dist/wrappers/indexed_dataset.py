"""``IndexedDatasetWrapper``: items come back as ``(index, item)`` (yProv4ML's interface), and
the indices each rank consumed are recorded per epoch as ranges — which rank saw which sample."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from torch.utils.data import Dataset, get_worker_info

from ..api import get_active_run
from ..compat.indices import RECORD_KIND, to_ranges

log = logging.getLogger(__name__)


class IndexedDatasetWrapper(Dataset):
    """Wrap a map-style dataset. An epoch ends when ``set_epoch(n)`` is called (as for a
    DistributedSampler) or when an index comes again; each epoch's indices become one journal
    record of ranges, written at the epoch's end and when the run closes.

    Indices are seen in the process that calls ``__getitem__``: with ``num_workers > 0`` that is
    a DataLoader worker, which holds no run, so nothing is recorded (a warning says so)."""

    def __init__(self, dataset: Any, label: str | None = None) -> None:
        super().__init__()
        self.dataset = dataset
        self.label = label or type(dataset).__name__
        self.epoch = 0
        self._seen: set[int] = set()
        self._lock = threading.Lock()
        self._run: Any = None
        self._warned = False

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        item = self.dataset[index]
        self._note(int(index))
        return index, item

    def set_epoch(self, epoch: int) -> None:
        """Close the current epoch's record and count from ``epoch``."""
        self.flush()
        self.epoch = int(epoch)

    def _note(self, index: int) -> None:
        if get_worker_info() is not None:
            if not self._warned:
                self._warned = True
                log.warning("IndexedDatasetWrapper(%s): indices are not recorded inside DataLoader workers "
                            "(num_workers > 0)", self.label)
            return
        run = get_active_run()
        if run is None:
            return
        with self._lock:
            if run is not self._run:
                self._run, self._seen = run, set()
                run.before_close(self.flush)
            if index in self._seen:  # the sampler started over: a new epoch
                self._flush_locked()
                self.epoch += 1
            self._seen.add(index)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._seen or self._run is None or self._run.closed:
            return
        try:
            length: int | None = len(self.dataset)
        except TypeError:
            length = None
        self._run.writer.record({"kind": RECORD_KIND, "time": time.time(), "label": self.label, "epoch": self.epoch,
                                 "count": len(self._seen), "dataset_len": length, "ranges": to_ranges(self._seen)})
        self._seen = set()
