"""The sampler thread: owns the timing, the sensors' life cycle and every failure of theirs.

Sensors are discovered and opened in the thread (``nvmlInit`` may take a second), so
``start`` returns at once. Ticks follow monotonic deadlines, so the rate does not drift with
the cost of a sample, and ticks missed behind a slow sample are skipped rather than bunched.
A sensor that fails is recorded once, logged once and dropped; the others go on. Nothing
here raises into training.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..errors import InvalidInputError
from ..shard.writer import SeriesTable
from ..topology import Topology
from .gpu_mapping import torch_current_device
from .node import NodeSensor
from .nvml import gpu_sensors
from .process import ProcessSensor
from .rapl import RaplSensor
from .sensor import Reading, Sensor, SensorUnavailable, Series, UnavailableSensor, describe

log = logging.getLogger(__name__)

CONTEXT = "system"
STOP_TIMEOUT_S = 5.0  # how long stop() waits for a sample in progress (a hung driver call)

Discovery = Callable[[], list[Sensor]]


def default_sensors(topology: Topology, torch_device: int | None) -> list[Sensor]:
    """This process; the node and its RAPL counters on local rank 0 only; the GPUs this rank owns."""
    sensors: list[Sensor] = [ProcessSensor()]
    if topology.local_rank == 0:
        sensors += [NodeSensor(), RaplSensor()]
    else:
        reason = f"node-wide: sampled by local rank 0 of {topology.hostname}"
        sensors += [UnavailableSensor("node", "node", reason), UnavailableSensor("rapl", "node", reason)]
    return sensors + gpu_sensors(topology, torch_device)


@dataclass
class _Open:
    """An opened sensor, its working readings with their series ids, and why it stopped, if it did."""

    sensor: Sensor
    readings: list[tuple[Reading, list[int]]]
    error: str | None = None


class Sampler:
    """Samples system, GPU and energy sensors into a ``SeriesTable`` every ``interval`` seconds.

    Series are registered in context ``system`` with ``unit``, ``device``, ``scope``, ``sensor``
    and ``sampled_by`` (the rank); a row's step is the sample's index. The journal gets one
    ``sensor`` record per sensor (available or why not), a ``warning`` per sensor lost mid-run
    and, from ``stop``, one ``energy`` record (see ``_summary``). ``discover`` builds the sensors
    (called once, in whichever thread samples first); the default is ``default_sensors``.
    Stop the sampler before closing the writer the table belongs to.
    """

    def __init__(self, table: SeriesTable, record: Callable[[dict[str, Any]], None], topology: Topology,
                 interval: float, *, discover: Discovery | None = None) -> None:
        if not interval > 0 or math.isinf(interval):
            raise InvalidInputError(f"sample interval must be a positive number of seconds, got {interval!r}")
        self.interval = float(interval)
        self.topology = topology
        self._table = table
        self._record = record
        self._discover = discover
        self._lock = threading.Lock()  # one sample at a time: sensors keep state between readings
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sensors: list[_Open] | None = None  # None until opened
        self._step = 0
        self._opened_at: float | None = None  # the start of every energy window
        self._final: dict[str, Any] | None = None

    # -- public ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the sampler thread; returns at once. A second call, or one after stop, does nothing."""
        if self._thread is not None or self._stopping.is_set():
            return
        self._bind_discovery()
        self._thread = threading.Thread(target=self._run, name="prov4ml-sampler", daemon=True)
        self._thread.start()

    def sample_now(self) -> None:
        """One sample from the caller's thread, without the slow energy counter. Never raises."""
        try:
            self._bind_discovery()
            with self._lock:
                if self._final is None:
                    self._sample_locked(slow=False)
        except Exception as exc:  # noqa: BLE001 - sampling must never break training
            self._warn("sampler", f"sample failed: {describe(exc)}")

    def stop(self) -> None:
        """Stop the thread, take a last sample, record the energy totals, close the sensors. Idempotent."""
        try:
            self._stopping.set()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(STOP_TIMEOUT_S)
            if not self._lock.acquire(timeout=STOP_TIMEOUT_S):
                self._warn("sampler", f"a sample still running after {STOP_TIMEOUT_S} s; sensors left open")
                self._finish(sample=False)
                return
            try:
                self._finish(sample=True)
            finally:
                self._lock.release()
        except Exception as exc:  # noqa: BLE001
            self._warn("sampler", f"stop failed: {describe(exc)}")

    def energy_summary(self) -> dict[str, Any]:
        """The energy totals so far; after ``stop``, the content of the ``energy`` record."""
        if self._final is not None:
            return self._final
        with self._lock:
            return self._summary()

    # -- thread ---------------------------------------------------------------------------
    def _bind_discovery(self) -> None:
        """Default discovery, with torch's device read here: it is per thread, so not in ours."""
        if self._discover is None:
            self._discover = partial(default_sensors, self.topology, torch_current_device())

    def _run(self) -> None:
        try:
            with self._lock:
                if self._final is None:
                    self._open_locked()
            deadline = time.monotonic()
            while True:
                deadline += self.interval
                now = time.monotonic()
                if deadline < now:  # a slow sample: skip the missed ticks
                    deadline += math.ceil((now - deadline) / self.interval) * self.interval
                if self._stopping.wait(deadline - now):
                    return
                with self._lock:
                    if self._final is not None:
                        return
                    self._sample_locked(slow=True)
        except Exception as exc:  # noqa: BLE001 - a bug here must not reach training
            self._warn("sampler", f"sampler thread stopped: {describe(exc)}")

    # -- internals (called with the lock held) --------------------------------------------
    def _open_locked(self) -> list[_Open]:
        if self._sensors is None:
            self._sensors = []
            self._opened_at = time.time()
            try:
                discovered = self._discover() if self._discover is not None else []
            except Exception as exc:  # noqa: BLE001
                self._warn("sampler", f"sensor discovery failed: {describe(exc)}")
                discovered = []
            for sensor in discovered:
                opened = self._open_sensor(sensor)
                if opened is not None:
                    self._sensors.append(opened)
        return self._sensors

    def _open_sensor(self, sensor: Sensor) -> _Open | None:
        """Open and probe a sensor; record what works and what does not, once."""
        unavailable: dict[str, str] = {}
        try:
            readings = sensor.open()
            working: list[Reading] = []
            with sensor.batch():
                for reading in readings:  # the probe also primes psutil's cpu_percent
                    try:
                        reading.read()
                        working.append(reading)
                    except Exception as exc:  # noqa: BLE001 - an unavailable reading, recorded below
                        unavailable.update(dict.fromkeys((s.key for s in reading.series), describe(exc)))
            if not working:
                raise SensorUnavailable(f"no reading works: {next(iter(unavailable.values()), 'none offered')}")
        except Exception as exc:  # noqa: BLE001 - SensorUnavailable, or a driver error while opening
            self._record_sensor(sensor, available=False, reason=describe(exc), unavailable=unavailable)
            self._close(sensor)
            return None
        opened = _Open(sensor, [(r, [self._register(sensor, s) for s in r.series]) for r in working])
        self._record_sensor(sensor, available=True, reason=None, unavailable=unavailable,
                            series=[s.key for r in working for s in r.series])
        return opened

    def _register(self, sensor: Sensor, series: Series) -> int:
        return self._table.register(series.key, CONTEXT, series.source, unit=series.unit,
                                    device=series.device or sensor.device, scope=sensor.scope,
                                    sensor=sensor.name, sampled_by=self.topology.rank)

    def _record_sensor(self, sensor: Sensor, **fields: Any) -> None:
        self._record({**sensor.info, "kind": "sensor", "time": time.time(), "name": sensor.name,
                      "scope": sensor.scope, "device": sensor.device, **fields})

    def _sample_locked(self, slow: bool) -> None:
        t = time.time()
        step = self._step
        self._step += 1
        append = self._table.append
        for opened in self._open_locked():
            if opened.error is not None:
                continue
            try:
                with opened.sensor.batch():
                    for reading, sids in opened.readings:
                        if reading.slow and not slow:
                            continue
                        for sid, value in zip(sids, reading.read(), strict=True):
                            append(sid, step, float(value), t)
            except Exception as exc:  # noqa: BLE001 - drop this sensor, keep the others
                opened.error = describe(exc)
                self._warn(f"sampler/{opened.sensor.name}", f"{opened.error}; no longer sampled")
                self._close(opened.sensor)

    def _finish(self, sample: bool) -> None:
        """The last sample, the energy record, and the sensors closed; once."""
        if self._final is not None:
            return
        if sample and self._sensors is not None:
            self._sample_locked(slow=True)
        self._final = self._summary()
        self._record({"kind": "energy", **self._final})
        for opened in self._sensors or []:
            if opened.error is None:  # a failed sensor was closed when it failed
                self._close(opened.sensor)

    def _summary(self) -> dict[str, Any]:
        """Per GPU owned (``gpus``: index, uuid, name, pci_bus_id, method, joules, seconds, and
        joules_integrated beside the counter) and per RAPL zone (``rapl``: zone, domain, joules,
        seconds, in_total); a sensor lost mid-run keeps what it counted, with its ``error``.
        ``rapl_joules`` adds the zones that do not overlap (packages and DRAM)."""
        groups: dict[str, list[dict[str, Any]]] = {"gpus": [], "rapl": []}
        for opened in self._sensors or []:
            for group, entries in opened.sensor.energy().items():
                groups.setdefault(group, []).extend(
                    {**e, "error": opened.error} if opened.error else e for e in entries)
        return {"time": time.time(), "rank": self.topology.rank, "local_rank": self.topology.local_rank,
                "hostname": self.topology.hostname, "start": self._opened_at, "samples": self._step, **groups,
                "gpu_joules": _total(groups["gpus"]),
                "rapl_joules": _total(e for e in groups["rapl"] if e.get("in_total"))}

    def _close(self, sensor: Sensor) -> None:
        try:
            sensor.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("closing sensor %s failed: %s", sensor.name, describe(exc))

    def _warn(self, where: str, message: str) -> None:
        log.warning("%s: %s", where, message)
        try:
            self._record({"kind": "warning", "time": time.time(), "where": where, "message": message})
        except Exception as exc:  # noqa: BLE001 - the journal itself failing: the log line is all we can do
            log.warning("recording a sampler warning failed: %s", describe(exc))


def _total(entries: Iterable[dict[str, Any]]) -> float:
    return sum((e["joules"] for e in entries if e.get("joules") is not None), 0.0)
