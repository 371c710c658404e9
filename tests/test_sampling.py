"""The sampler on this machine's real psutil, writing into a real shard read back with ShardReader."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prov4ml_dist.errors import InvalidInputError
from prov4ml_dist.sampling import Reading, Sampler, Sensor, SensorUnavailable
from prov4ml_dist.sampling.sensor import Series
from prov4ml_dist.shard import ShardReader, ShardWriter
from prov4ml_dist.topology import Topology

COUNTER_KEYS = {"process_io_read_bytes", "process_io_write_bytes", "node_disk_read_bytes", "node_disk_write_bytes",
                "node_net_sent_bytes", "node_net_recv_bytes"}  # kernel totals, stored since start_run
PROCESS_KEYS = {"process_cpu_percent", "process_memory_rss", "process_threads",
                *(f"{k}{rate}" for k in COUNTER_KEYS if k.startswith("process") for rate in ("", "_per_s"))}
NODE_KEYS = {"node_cpu_percent", "node_memory_used", "node_memory_percent",
             *(f"{k}{rate}" for k in COUNTER_KEYS if k.startswith("node") for rate in ("", "_per_s"))}


@dataclass
class Shard:
    """What a closed shard holds, by series key."""

    records: list[dict[str, Any]]
    series: dict[str, dict[str, Any]]
    rows: dict[str, np.ndarray]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    def sensor(self, name: str) -> dict[str, Any]:
        (record,) = [r for r in self.of("sensor") if r["name"] == name]
        return record


def new_writer(tmp_path: Path) -> ShardWriter:
    return ShardWriter(tmp_path / "r.h5", {"run_id": "t", "rank": 0, "attempt": 0})


def close_and_read(writer: ShardWriter) -> Shard:
    writer.close()
    with ShardReader(writer.path) as reader:
        records = list(reader.records())
        declared = reader.series("system")
        table = reader.read_table("system")
    return Shard(records, {d["key"]: d for d in declared.values()},
                 {d["key"]: table[table["series"] == sid] for sid, d in declared.items()})


def sampler_for(writer: ShardWriter, discover: Callable[[], list[Sensor]] | None = None,
                topology: Topology | None = None, interval: float = 0.05) -> Sampler:
    return Sampler(writer.system, writer.record, topology or Topology(), interval, discover=discover)


def sample_once(tmp_path: Path, discover: Callable[[], list[Sensor]] | None = None,
                topology: Topology | None = None) -> Shard:
    """One caller's sample, stop, and the shard read back."""
    writer = new_writer(tmp_path)
    sampler = sampler_for(writer, discover, topology)
    sampler.sample_now()
    sampler.stop()
    return close_and_read(writer)


class Scripted(Sensor):
    """A sensor whose readings are plain callables; records its life cycle."""

    scope = "process"

    def __init__(self, name: str, **reads: Callable[[], float]) -> None:
        self.name = name
        super().__init__()
        self.reads = reads
        self.closed = 0

    def open(self) -> list[Reading]:
        return [Reading.single(key, "1", fn) for key, fn in self.reads.items()]

    def close(self) -> None:
        self.closed += 1


def test_real_sampler_writes_process_and_node_series(tmp_path):
    writer = new_writer(tmp_path)
    sampler = sampler_for(writer)
    before = time.time()
    sampler.start()
    time.sleep(0.3)
    sampler.sample_now()
    sampler.stop()
    after = time.time()
    shard = close_and_read(writer)

    assert PROCESS_KEYS | NODE_KEYS <= set(shard.series)
    for key in PROCESS_KEYS | NODE_KEYS:
        declared, rows = shard.series[key], shard.rows[key]
        assert declared["context"] == "system" and declared["source"] == "SYSTEM_METRIC"
        assert declared["sampled_by"] == 0 and declared["unit"] and declared["device"]
        assert declared["scope"] == ("process" if key.startswith("process") else "node")
        assert len(rows) >= 4  # ~5 ticks, the caller's sample and the last one
        assert np.all(np.diff(rows["step"]) > 0) and np.all(np.isfinite(rows["value"]))
        assert before <= rows["time"].min() and rows["time"].max() <= after
    # main, flusher, sampler; the last sample is taken by stop() once the sampler thread has ended
    assert shard.rows["process_threads"]["value"][:-1].min() >= 3
    assert shard.rows["process_memory_rss"]["value"].min() > 0
    for key in COUNTER_KEYS:  # amounts since the sensor opened (start_run), not since boot
        amounts, rates = shard.rows[key]["value"], shard.rows[f"{key}_per_s"]["value"]
        assert amounts[0] >= 0 and np.all(np.diff(amounts) >= 0) and np.all(rates >= 0), key
        assert amounts[-1] <= rates.max() * (after - before) + 1, key  # no total since boot slipped in
        assert shard.series[f"{key}_per_s"]["unit"] == "B/s"
    # every sensor recorded exactly once, available or not
    names = [r["name"] for r in shard.of("sensor")]
    assert len(names) == len(set(names)) and {"process", "node", "rapl"} <= set(names)
    assert shard.sensor("process")["available"] and shard.sensor("process")["pid"] > 0
    if not Path("/sys/class/powercap").is_dir():
        assert shard.sensor("rapl") | {"time": 0} == {
            "kind": "sensor", "time": 0, "name": "rapl", "scope": "node", "device": "rapl", "available": False,
            "reason": shard.sensor("rapl")["reason"], "unavailable": {}}
    (energy,) = shard.of("energy")
    assert energy["rank"] == 0 and energy["samples"] >= 4
    assert {"gpus", "rapl", "gpu_joules", "rapl_joules", "start", "time"} <= set(energy)
    assert shard.of("warning") == []


def test_counters_are_amounts_since_the_first_read_and_rates_since_the_previous_one(tmp_path):
    totals = iter([(5e9, 7.0), (5e9 + 4096, 7.0), (5e9 + 4096 + 1024, 9.0)])  # e.g. bytes since boot

    class Counting(Sensor):
        name, scope = "counting", "node"

        def open(self) -> list[Reading]:
            return [Reading.since_start((Series("disk_bytes", "B"), Series("packets", "1")), lambda: next(totals))]

    before = time.monotonic()
    shard = sample_once(tmp_path, lambda: [Counting()])  # the probe, the caller's sample, the last one
    elapsed = time.monotonic() - before
    assert shard.rows["disk_bytes"]["value"].tolist() == [4096, 5120]
    assert shard.rows["packets"]["value"].tolist() == [0, 2]
    rates = shard.rows["disk_bytes_per_s"]["value"]
    assert rates[0] >= 4096 / elapsed and rates[1] >= 1024 / elapsed  # over the time between reads
    assert shard.series["packets_per_s"]["unit"] == "1/s" and shard.rows["packets_per_s"]["value"][0] == 0


def test_node_sensors_only_on_local_rank_zero(tmp_path):
    shard = sample_once(tmp_path, topology=Topology(rank=3, local_rank=1, local_world_size=2))
    assert PROCESS_KEYS <= set(shard.series)
    assert not [k for k in shard.series if k.startswith(("node_", "rapl_"))]
    for name in ("node", "rapl"):
        assert not shard.sensor(name)["available"]
        assert "local rank 0" in shard.sensor(name)["reason"]
    assert {d["sampled_by"] for d in shard.series.values()} == {3}


def test_start_returns_at_once_and_stop_is_prompt(tmp_path):
    writer = new_writer(tmp_path)
    opened = threading.Event()

    class SlowToOpen(Scripted):
        def open(self) -> list[Reading]:
            time.sleep(0.2)  # like nvmlInit without the persistence daemon
            opened.set()
            return super().open()

    sampler = sampler_for(writer, lambda: [SlowToOpen("slow", value=lambda: 1.0)], interval=30)
    t0 = time.perf_counter()
    sampler.start()
    assert time.perf_counter() - t0 < 0.05
    assert opened.wait(5)
    t0 = time.perf_counter()
    sampler.stop()
    assert time.perf_counter() - t0 < 1.0
    shard = close_and_read(writer)
    assert len(shard.rows["value"]) == 1  # the last sample, taken by stop()


def test_stop_is_idempotent_and_records_energy_once(tmp_path):
    writer = new_writer(tmp_path)
    sensor = Scripted("s", value=lambda: 2.0)
    sampler = sampler_for(writer, lambda: [sensor])
    sampler.start()
    sampler.stop()
    sampler.stop()
    sampler.sample_now()  # after stop: nothing
    sampler.start()  # after stop: nothing
    shard = close_and_read(writer)
    (energy,) = shard.of("energy")
    assert sampler.energy_summary() == {k: v for k, v in energy.items() if k != "kind"}
    assert sensor.closed == 1
    assert len(shard.rows["value"]) == energy["samples"]


def test_stop_without_start_still_records_energy(tmp_path):
    writer = new_writer(tmp_path)
    sampler = sampler_for(writer, lambda: [Scripted("s", value=lambda: 1.0)])
    sampler.stop()
    shard = close_and_read(writer)
    assert len(shard.of("energy")) == 1 and shard.of("sensor") == [] and shard.rows == {}


def test_failing_sensor_is_warned_once_and_dropped_while_others_go_on(tmp_path):
    writer = new_writer(tmp_path)
    calls = {"n": 0}

    def flaky() -> float:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("device went away")
        return 1.0

    flaky_sensor, steady = Scripted("flaky", flaky_value=flaky), Scripted("steady", steady_value=lambda: 5.0)
    sampler = sampler_for(writer, lambda: [flaky_sensor, steady], interval=0.02)
    sampler.start()
    time.sleep(0.3)
    sampler.stop()
    shard = close_and_read(writer)
    (warning,) = shard.of("warning")
    assert warning["where"] == "sampler/flaky" and "device went away" in warning["message"]
    assert len(shard.rows["flaky_value"]) == 2  # the probe was call 1
    assert len(shard.rows["steady_value"]) >= 8
    assert flaky_sensor.closed == 1 and steady.closed == 1


def test_unavailable_reading_is_recorded_once_and_never_as_rows(tmp_path):
    writer = new_writer(tmp_path)

    def missing() -> float:
        raise SensorUnavailable("not on this hardware")

    sampler = sampler_for(writer, lambda: [Scripted("mixed", good=lambda: 1.0, missing=missing)])
    for _ in range(3):
        sampler.sample_now()
    sampler.stop()
    shard = close_and_read(writer)
    record = shard.sensor("mixed")
    assert record["available"] and record["series"] == ["good"]
    assert record["unavailable"] == {"missing": "not on this hardware"}
    assert set(shard.series) == {"good"} and len(shard.rows["good"]) == 4


def test_sensor_failing_to_open_is_recorded_unavailable_and_closed(tmp_path):
    writer = new_writer(tmp_path)

    class Broken(Scripted):
        def open(self) -> list[Reading]:
            raise RuntimeError("driver mismatch")

    broken, nothing_works = Broken("broken"), Scripted("empty", x=lambda: math.nan + [][0])
    sampler = sampler_for(writer, lambda: [broken, nothing_works])
    sampler.sample_now()
    sampler.stop()
    shard = close_and_read(writer)
    assert shard.sensor("broken")["reason"] == "RuntimeError: driver mismatch"
    assert not shard.sensor("empty")["available"]
    assert shard.sensor("empty")["unavailable"] == {"x": "IndexError: list index out of range"}
    assert broken.closed == 1 and nothing_works.closed == 1 and shard.series == {}


def test_nothing_raises_into_the_caller(tmp_path):
    writer = new_writer(tmp_path)

    def discover() -> list[Sensor]:
        raise RuntimeError("discovery bug")

    sampler = sampler_for(writer, discover)
    sampler.sample_now()
    sampler.start()
    sampler.stop()
    shard = close_and_read(writer)
    assert [w["message"] for w in shard.of("warning")] == ["sensor discovery failed: RuntimeError: discovery bug"]
    assert len(shard.of("energy")) == 1


def test_ticks_follow_deadlines_without_drift(tmp_path):
    writer = new_writer(tmp_path)
    ticks: list[float] = []

    def slow_read() -> float:
        ticks.append(time.monotonic())
        time.sleep(0.02)  # a sample costing 40 % of the interval
        return 0.0

    sampler = sampler_for(writer, lambda: [Scripted("slow", v=slow_read)], interval=0.05)
    sampler.start()
    time.sleep(0.8)
    sampler.stop()
    writer.close()
    periods = np.diff(ticks[1:-1])  # between the probe and stop()'s sample
    assert len(periods) >= 8
    assert 0.045 < periods.mean() < 0.058  # a sleep(interval) loop would give ~0.07


@pytest.mark.parametrize("interval", [0, -1, math.nan, math.inf])
def test_interval_must_be_positive(tmp_path, interval):
    writer = new_writer(tmp_path)
    with pytest.raises(InvalidInputError):
        sampler_for(writer, interval=interval)
    writer.close()
