"""NVIDIA GPUs through NVML (nvidia-ml-py's ``pynvml``): one sensor per GPU this rank owns.

NVML counts ``nvmlInit``/``nvmlShutdown`` pairs, so each GPU sensor holds one reference and
releases it in ``close``; no module state is kept here. Every pynvml function is looked up on
the module at call time, which is also what lets unit tests stand in a fake NVML.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import pynvml

from ..topology import Topology
from .energy import EnergyCounter, PowerIntegrator
from .gpu_mapping import Selector, owned_positions, resolve, visible_devices
from .sensor import CARBON_METRIC, Reading, Sensor, SensorUnavailable, UnavailableSensor, describe

MJ = 1e-3  # joules per NVML energy unit (millijoule)


def gpu_sensors(topology: Topology, torch_device: int | None,
                env: Mapping[str, str] = os.environ) -> list[Sensor]:
    """The sensors of the GPUs this rank owns (see gpu_mapping), or one unavailable ``nvml`` sensor.

    Slow (``nvmlInit`` can take a second without the persistence daemon): run it in the sampler thread.
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # NVMLError_LibraryNotFound: no driver, no GPU
        return [UnavailableSensor("nvml", "gpu", f"NVML unavailable: {describe(exc)}")]
    cuda_visible = env.get("CUDA_VISIBLE_DEVICES")
    try:
        uuids = [_uuid(i) for i in range(pynvml.nvmlDeviceGetCount())]
        physical = _visible(uuids, cuda_visible)
    except pynvml.NVMLError as exc:
        _shutdown()
        return [UnavailableSensor("nvml", "gpu", f"GPU enumeration failed: {describe(exc)}")]
    ownership = owned_positions(len(physical), topology.local_rank, topology.local_world_size, torch_device)
    owned: dict[int, Selector] = {}
    for position in ownership.positions:
        owned.setdefault(*physical[position])  # MIG siblings share one physical GPU
    if not owned:
        _shutdown()
        return [UnavailableSensor("nvml", "gpu", ownership.rule, gpus_on_node=len(uuids),
                                  cuda_visible_devices=cuda_visible)]
    for _ in range(len(owned) - 1):
        pynvml.nvmlInit()  # one reference per sensor
    suffix = len(owned) > 1
    return [GpuSensor(index, selector, ownership.rule, cuda_visible, key_suffix=f"_{index}" if suffix else "")
            for index, selector in owned.items()]


def _uuid(index: int) -> str | None:
    """The GPU's UUID; None for a GPU this process may not open (lost, or outside its cgroup's
    devices: NVML still counts it) — it must not hide the others."""
    try:
        return _text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index)))
    except pynvml.NVMLError:
        return None


def _visible(uuids: list[str | None], cuda_visible: str | None) -> list[tuple[int, Selector]]:
    """(NVML index, the selector naming it) of each visible GPU, in CUDA's order."""
    selectors = visible_devices(cuda_visible)
    if selectors is None:
        return [(i, i) for i in range(len(uuids))]
    physical: list[tuple[int, Selector]] = []
    for selector in selectors:
        index = resolve(selector, uuids, _mig_parent)
        if index is None:  # CUDA stops at an entry that names no device
            break
        physical.append((index, selector))
    return physical


def _mig_parent(mig_uuid: str) -> str | None:
    try:
        mig = pynvml.nvmlDeviceGetHandleByUUID(mig_uuid)
        return _text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)))
    except pynvml.NVMLError:
        return None


def _shutdown() -> None:
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass


def _text(value: str | bytes) -> str:
    """Older pynvml versions return bytes."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class GpuSensor(Sensor):
    """One physical GPU. Energy comes from the counter (Volta and later), else from integrated power."""

    scope = "gpu"

    def __init__(self, index: int, selector: Selector, selection: str, cuda_visible: str | None,
                 key_suffix: str = "") -> None:
        self.name = f"gpu{index}"
        super().__init__()
        self.index = index
        self._suffix = key_suffix
        self._handle: Any = None
        self._closed = False
        self._method: str | None = None
        self._counter = EnergyCounter(MJ)
        self._power = PowerIntegrator()
        self.info = {"index": index, "selection": selection, "selector": selector,
                     "cuda_visible_devices": cuda_visible}

    def open(self) -> list[Reading]:
        handle = self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        self.device = _text(pynvml.nvmlDeviceGetUUID(handle))
        self.info.update(uuid=self.device, gpu_name=_text(pynvml.nvmlDeviceGetName(handle)),
                         pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                         driver_version=_text(pynvml.nvmlSystemGetDriverVersion()))
        readings = [
            Reading.single(self._key("utilization"), "%", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            Reading.single(self._key("memory_used"), "B", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used),
            Reading.single(self._key("power"), "W", self._read_power),
            Reading.single(self._key("temperature"), "C",
                           lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
            Reading.single(self._key("sm_clock"), "MHz",
                           lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
        ]
        try:
            self._read_counter()  # the baseline; NotSupported before Volta
            self._method = "counter"
            readings.append(Reading.single(self._key("energy"), "J", self._read_counter, CARBON_METRIC, slow=True))
        except pynvml.NVMLError as exc:
            self._method = "integrated_power"
            self.info["energy_counter"] = describe(exc)
            readings.append(Reading.single(self._key("energy"), "J", self._integrated, CARBON_METRIC))
        self.info["energy_method"] = self._method
        return readings  # power before energy: the integrated energy uses this sample's power

    def _key(self, what: str) -> str:
        return f"gpu_{what}{self._suffix}"

    def _read_power(self) -> float:
        watts = pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000
        self._power.update(watts, time.monotonic())
        return watts

    def _read_counter(self) -> float:
        return self._counter.update(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle), time.monotonic())

    def _integrated(self) -> float:
        if not self._power.started:
            raise SensorUnavailable("no energy counter and no power reading to integrate")
        return self._power.joules

    def energy(self) -> dict[str, list[dict[str, Any]]]:
        entry: dict[str, Any] = {"index": self.index, "uuid": self.info.get("uuid"),
                                 "name": self.info.get("gpu_name"), "pci_bus_id": self.info.get("pci_bus_id")}
        if self._method == "counter":
            entry.update(method="counter", joules=self._counter.joules, seconds=self._counter.seconds)
            if self._power.started:
                entry["joules_integrated"] = self._power.joules
        elif self._power.started:
            entry.update(method="integrated_power", joules=self._power.joules, seconds=self._power.seconds)
        else:
            entry.update(method=None, joules=None, seconds=None)
        return {"gpus": [entry]}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _shutdown()
