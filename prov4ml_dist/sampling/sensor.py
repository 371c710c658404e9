"""The Sensor interface: what a source of system readings must offer the sampler.

Modelled on Zeus's ``device/gpu/common.py`` and Perun's sensor backends: a small ABC, one
module per vendor or scope. A sensor does its slow set-up in ``open`` (run in the sampler
thread, never in ``start_run``) and returns ``Reading`` callables; the sampler probes each
reading once, keeps those that work and records the others once as unavailable, so the shard
never holds rows of None.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

SYSTEM_METRIC = "SYSTEM_METRIC"
CARBON_METRIC = "CARBON_METRIC"


class SensorUnavailable(Exception):
    """A sensor or reading that cannot work here; the message is the recorded reason."""


@dataclass(frozen=True)
class Series:
    """One system series: its key in the shard, its unit and its yProv4ML source."""

    key: str
    unit: str
    source: str = SYSTEM_METRIC
    device: str | None = None  # defaults to the sensor's device


@dataclass(frozen=True)
class Reading:
    """A callable returning one value per series, in order.

    ``slow`` readings (NVML's energy counter: ~4 ms a call) are taken by the sampler thread
    only, never by ``sample_now`` on the caller's logging path.
    """

    series: tuple[Series, ...]
    read: Callable[[], Sequence[float]]
    slow: bool = False

    @classmethod
    def single(cls, key: str, unit: str, read: Callable[[], float], source: str = SYSTEM_METRIC,
               slow: bool = False) -> Reading:
        """A reading of one value."""
        return cls((Series(key, unit, source),), lambda: (read(),), slow)

    @classmethod
    def since_start(cls, series: tuple[Series, ...], read: Callable[[], Sequence[float]]) -> Reading:
        """Cumulative kernel counters (bytes since boot, or since the process began) as amounts
        since the first read, i.e. since ``start_run``, plus a ``<key>_per_s`` rate each over
        the interval since the previous read: a total since boot says nothing about the run."""
        rates = tuple(Series(f"{s.key}_per_s", f"{s.unit}/s", s.source, s.device) for s in series)
        return cls(series + rates, _SinceStart(read))


class _SinceStart:
    """The state of a ``Reading.since_start``: the first values and the previous read."""

    def __init__(self, read: Callable[[], Sequence[float]]) -> None:
        self._read = read
        self._lock = threading.Lock()  # sample_now (caller's thread) and the sampler thread
        self._first: tuple[float, ...] = ()
        self._previous: tuple[tuple[float, ...], float] | None = None

    def __call__(self) -> tuple[float, ...]:
        with self._lock:
            values, now = tuple(self._read()), time.monotonic()
            if self._previous is None:
                self._first, self._previous = values, (values, now)
            (previous, then), self._previous = self._previous, (values, now)
            elapsed = now - then
            return (*(v - f for v, f in zip(values, self._first, strict=True)),
                    *((v - p) / elapsed if elapsed > 0 else 0.0 for v, p in zip(values, previous, strict=True)))


class Sensor(ABC):
    """A source of readings about one process, node or device."""

    name: str = ""
    scope: str = ""  # "process" | "node" | "gpu"

    def __init__(self) -> None:
        self.device = self.name
        self.info: dict[str, Any] = {}  # recorded in the journal's ``sensor`` record

    @abstractmethod
    def open(self) -> list[Reading]:
        """Set up (slow work allowed) and return the readings; raise SensorUnavailable if absent."""

    def batch(self) -> AbstractContextManager:
        """Context around one sample's readings (psutil's ``oneshot``)."""
        return nullcontext()

    def energy(self) -> dict[str, list[dict[str, Any]]]:
        """Energy totals since ``open``, grouped for the ``energy`` record (``gpus``, ``rapl``)."""
        return {}

    def close(self) -> None:
        """Release what ``open`` took. Must be idempotent."""
        return None


class UnavailableSensor(Sensor):
    """A sensor known to be absent here: recorded once as unavailable, never sampled."""

    def __init__(self, name: str, scope: str, reason: str, **info: Any) -> None:
        self.name, self.scope, self.reason = name, scope, reason
        super().__init__()
        self.info = info

    def open(self) -> list[Reading]:
        raise SensorUnavailable(self.reason)


def describe(exc: BaseException) -> str:
    """A short, recordable reason for a failure."""
    if isinstance(exc, SensorUnavailable):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
