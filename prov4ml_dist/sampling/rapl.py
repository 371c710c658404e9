"""CPU package and DRAM energy from RAPL counters (Intel, and AMD through the same powercap).

Zones are ``<root>/intel-rapl:N`` (packages, ``psys``) and ``intel-rapl:N:M`` (``core``,
``uncore``, ``dram``); AMD exposes ``amd-rapl:N`` or, on kernels before 5.13 without powercap
support, the ``amd_energy`` hwmon driver. Counters are in µJ and wrap at
``max_energy_range_uj``. On recent kernels ``energy_uj`` is readable by root only
(CVE-2020-8694): such zones are recorded as unavailable with that reason. Node-wide, so
sampled by local rank 0 only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .energy import EnergyCounter
from .sensor import CARBON_METRIC, Reading, Sensor, SensorUnavailable, Series

POWERCAP_ROOT = Path("/sys/class/powercap")
HWMON_ROOT = Path("/sys/class/hwmon")
ZONE_PREFIXES = ("intel-rapl:", "amd-rapl:")
UJ = 1e-6  # joules per RAPL unit


@dataclass
class Zone:
    """One energy counter: a powercap zone or an amd_energy socket counter."""

    zone: str  # "intel-rapl:0:1", "hwmon2/energy17_input"
    domain: str  # "package-0", "package-0/dram", "Esocket0"
    path: Path  # the counter file (µJ)
    wrap: int | None
    in_total: bool  # packages and DRAM do not overlap; core/uncore lie within a package, psys holds all
    counter: EnergyCounter = field(init=False)

    def __post_init__(self) -> None:
        self.counter = EnergyCounter(UJ, self.wrap)


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def powercap_zones(root: Path) -> list[Zone]:
    """The RAPL zones under a powercap root, parents before their subzones."""
    dirs = sorted(p for p in root.glob("*") if p.name.startswith(ZONE_PREFIXES)) if root.is_dir() else []
    names = {d.name: _read_text(d / "name") or d.name for d in dirs}
    zones: list[Zone] = []
    for d in dirs:
        prefix, _, ident = d.name.partition(":")
        parent, _, sub = ident.partition(":")
        name = names[d.name]
        if sub:
            domain, in_total = f"{names.get(f'{prefix}:{parent}', parent)}/{name}", name == "dram"
        else:
            domain, in_total = name, name.startswith("package")
        if any(z.domain == domain for z in zones):
            domain = f"{domain}@{d.name}"
        try:
            wrap: int | None = _read_int(d / "max_energy_range_uj")
        except (OSError, ValueError):
            wrap = None
        zones.append(Zone(d.name, domain, d / "energy_uj", wrap, in_total))
    return zones


def amd_energy_zones(root: Path) -> list[Zone]:
    """Socket counters of the ``amd_energy`` hwmon driver (per-core ones would double count)."""
    zones: list[Zone] = []
    for hwmon in sorted(root.glob("hwmon*")) if root.is_dir() else []:
        if _read_text(hwmon / "name") != "amd_energy":
            continue
        for counter in sorted(hwmon.glob("energy*_input")):
            label = _read_text(counter.with_name(counter.name.replace("_input", "_label"))) or ""
            if label.startswith("Esocket"):
                zones.append(Zone(f"{hwmon.name}/{counter.name}", label, counter, None, True))
    return zones


class RaplSensor(Sensor):
    """Every readable RAPL zone of the node, as cumulative joules since the sampler started."""

    name = "rapl"
    scope = "node"

    def __init__(self, powercap_root: Path = POWERCAP_ROOT, hwmon_root: Path = HWMON_ROOT) -> None:
        super().__init__()
        self._powercap_root = Path(powercap_root)
        self._hwmon_root = Path(hwmon_root)
        self._zones: list[Zone] = []

    def open(self) -> list[Reading]:
        self._zones = powercap_zones(self._powercap_root) or amd_energy_zones(self._hwmon_root)
        if not self._zones:
            raise SensorUnavailable(f"no RAPL zones under {self._powercap_root} "
                                    f"and no amd_energy hwmon under {self._hwmon_root}")
        self.info = {"zones": {z.zone: z.domain for z in self._zones}}
        return [Reading((Series(f"rapl_{z.domain.replace('/', '_')}_energy", "J", CARBON_METRIC, device=z.zone),),
                        partial(self._read, z)) for z in self._zones]

    @staticmethod
    def _read(zone: Zone) -> tuple[float]:
        return (zone.counter.update(_read_int(zone.path), time.monotonic()),)

    def energy(self) -> dict[str, list[dict[str, Any]]]:
        return {"rapl": [{"zone": z.zone, "domain": z.domain, "joules": z.counter.joules,
                          "seconds": z.counter.seconds, "in_total": z.in_total}
                         for z in self._zones if z.counter.started]}
