"""RAPL on fake powercap and hwmon trees; the energy counters and power integration they rely on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prov4ml_dist.sampling import rapl
from prov4ml_dist.sampling.energy import EnergyCounter, PowerIntegrator
from prov4ml_dist.sampling.rapl import RaplSensor

from .test_sampling import close_and_read, new_writer, sample_once, sampler_for

RANGE_UJ = 262_143_328_850  # a real Xeon's max_energy_range_uj


def make_zone(root: Path, zone: str, name: str, energy_uj: int, max_range: int | None = RANGE_UJ) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    if max_range is not None:
        (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    return path / "energy_uj"


@pytest.fixture
def powercap(tmp_path) -> Path:
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)  # the control type, not a zone
    make_zone(root, "intel-rapl:0", "package-0", RANGE_UJ - 1_000_000)
    make_zone(root, "intel-rapl:0:0", "core", 5_000_000)
    make_zone(root, "intel-rapl:0:1", "dram", 7_000_000)
    make_zone(root, "intel-rapl:1", "package-1", 0)
    make_zone(root, "intel-rapl:1:0", "dram", 0)
    return root


def deny_reading(monkeypatch, path: Path) -> None:
    """energy_uj of mode 0400 root:root, as on kernels since the Platypus fix; root reads anything,
    so when the tests run as root the denial is emulated at the one place RAPL reads a counter."""
    path.chmod(0)
    if os.geteuid() == 0:
        read = rapl._read_int

        def denied(p: Path) -> int:
            if p == path:
                raise PermissionError(13, "Permission denied", str(p))
            return read(p)

        monkeypatch.setattr(rapl, "_read_int", denied)


def test_rapl_zones_with_wraparound(tmp_path, powercap):
    writer = new_writer(tmp_path)
    sampler = sampler_for(writer, lambda: [RaplSensor(powercap, tmp_path / "no-hwmon")])
    sampler.sample_now()  # opens: the baseline
    (powercap / "intel-rapl:0" / "energy_uj").write_text("3000000\n")  # wrapped: +1 J +3 J
    (powercap / "intel-rapl:0:0" / "energy_uj").write_text("6000000\n")
    (powercap / "intel-rapl:0:1" / "energy_uj").write_text("9500000\n")
    (powercap / "intel-rapl:1" / "energy_uj").write_text("10000000\n")
    (powercap / "intel-rapl:1:0" / "energy_uj").write_text("500000\n")
    sampler.stop()
    shard = close_and_read(writer)

    assert set(shard.series) == {"rapl_package-0_energy", "rapl_package-0_core_energy", "rapl_package-0_dram_energy",
                                 "rapl_package-1_energy", "rapl_package-1_dram_energy"}
    declared = shard.series["rapl_package-0_energy"]
    assert (declared["unit"], declared["source"], declared["device"], declared["scope"]) == (
        "J", "CARBON_METRIC", "intel-rapl:0", "node")
    assert list(shard.rows["rapl_package-0_energy"]["value"]) == [0.0, pytest.approx(4.0)]
    (energy,) = shard.of("energy")
    joules = {e["domain"]: e["joules"] for e in energy["rapl"]}
    assert joules == pytest.approx({"package-0": 4.0, "package-0/core": 1.0, "package-0/dram": 2.5,
                                    "package-1": 10.0, "package-1/dram": 0.5})
    assert energy["rapl_joules"] == pytest.approx(4.0 + 2.5 + 10.0 + 0.5)  # core lies within the package
    assert energy["gpu_joules"] == 0.0 and energy["gpus"] == []
    assert shard.sensor("rapl")["zones"]["intel-rapl:0:1"] == "package-0/dram"


def test_unreadable_zone_is_unavailable_with_its_reason(tmp_path, powercap, monkeypatch):
    deny_reading(monkeypatch, powercap / "intel-rapl:0:1" / "energy_uj")
    shard = sample_once(tmp_path, lambda: [RaplSensor(powercap, tmp_path / "no-hwmon")])
    record = shard.sensor("rapl")
    assert record["available"]
    assert list(record["unavailable"]) == ["rapl_package-0_dram_energy"]
    assert "Permission denied" in record["unavailable"]["rapl_package-0_dram_energy"]
    assert "rapl_package-0_dram_energy" not in shard.series and "rapl_package-0_energy" in shard.series
    assert "package-0/dram" not in {e["domain"] for e in shard.of("energy")[0]["rapl"]}


def test_no_readable_zone_makes_rapl_unavailable(tmp_path, monkeypatch):
    root = tmp_path / "powercap"
    deny_reading(monkeypatch, make_zone(root, "intel-rapl:0", "package-0", 1))
    shard = sample_once(tmp_path, lambda: [RaplSensor(root, tmp_path / "no-hwmon")])
    record = shard.sensor("rapl")
    assert not record["available"] and "Permission denied" in record["reason"]
    assert shard.series == {} and shard.of("energy")[0]["rapl"] == []


def test_absent_rapl_is_recorded_once(tmp_path):
    writer = new_writer(tmp_path)
    sampler = sampler_for(writer, lambda: [RaplSensor(tmp_path / "none", tmp_path / "none")])
    sampler.start()
    for _ in range(3):
        sampler.sample_now()
    sampler.stop()
    shard = close_and_read(writer)
    assert [r["reason"] for r in shard.of("sensor")] == [
        f"no RAPL zones under {tmp_path / 'none'} and no amd_energy hwmon under {tmp_path / 'none'}"]
    assert shard.rows == {}


def test_amd_energy_hwmon_sockets(tmp_path):
    hwmon = tmp_path / "hwmon"
    for n, (driver, files) in enumerate([("k10temp", {"temp1_input": "40000"}),
                                         ("amd_energy", {"energy1_input": "100", "energy1_label": "Ecore000",
                                                         "energy65_input": "1000000", "energy65_label": "Esocket0"})]):
        (hwmon / f"hwmon{n}").mkdir(parents=True)
        (hwmon / f"hwmon{n}" / "name").write_text(driver)
        for name, text in files.items():
            (hwmon / f"hwmon{n}" / name).write_text(text)
    zones = rapl.amd_energy_zones(hwmon)
    assert [(z.zone, z.domain, z.in_total) for z in zones] == [("hwmon1/energy65_input", "Esocket0", True)]
    assert rapl.powercap_zones(tmp_path / "no-powercap") == []


@given(st.integers(0, 10**6), st.lists(st.integers(0, 10**6 - 1), max_size=50))
def test_counter_accumulates_across_any_number_of_wraps(start, increments):
    wrap = 10**6
    counter = EnergyCounter(1e-6, wrap)
    raw = start % wrap
    counter.update(raw, 0.0)
    for i, inc in enumerate(increments, 1):
        raw = (raw + inc) % wrap
        counter.update(raw, float(i))
    assert counter.joules == pytest.approx(sum(increments) * 1e-6)
    assert counter.seconds == len(increments)


def test_counter_going_backwards_without_a_range_adds_nothing():
    counter = EnergyCounter(1e-3)
    for raw in (5000, 7000, 100, 1100):  # a driver reload between the 2nd and 3rd reading
        counter.update(raw, 0.0)
    assert counter.joules == pytest.approx(3.0)


def test_trapezoid_is_exact_for_a_power_ramp():
    integrator = PowerIntegrator()
    assert not integrator.started and integrator.seconds == 0.0
    for t in (0.0, 0.5, 2.0, 3.0):
        integrator.update(100.0 + 10.0 * t, t)  # 100 W rising 10 W/s
    assert integrator.joules == pytest.approx(100.0 * 3 + 5.0 * 9)
    assert integrator.seconds == 3.0
