"""Node-wide CPU, memory, disk and network, read with psutil.

Sampled only by local rank 0 of each node (the default sensor list enforces it): every other
rank on the node would record the same numbers and a merge would count them several times.
"""

from __future__ import annotations

import socket
from typing import TypeVar

import psutil

from .sensor import Reading, Sensor, SensorUnavailable, Series

T = TypeVar("T")


def _present(counters: T | None, what: str) -> T:
    """psutil returns None (or an empty value) where a counter does not exist, e.g. in some containers."""
    if not counters:
        raise SensorUnavailable(f"no {what} counters on this system")
    return counters


def _memory() -> tuple[int, float]:
    memory = psutil.virtual_memory()
    return memory.used, memory.percent


def _disk() -> tuple[int, int]:
    disk = _present(psutil.disk_io_counters(), "disk I/O")
    return disk.read_bytes, disk.write_bytes


def _network() -> tuple[int, int]:
    net = _present(psutil.net_io_counters(), "network I/O")
    return net.bytes_sent, net.bytes_recv


class NodeSensor(Sensor):
    """The whole node, as seen by the kernel."""

    name = "node"
    scope = "node"

    def __init__(self) -> None:
        super().__init__()
        self.device = f"node:{socket.gethostname()}"

    def open(self) -> list[Reading]:
        memory = psutil.virtual_memory()
        self.info = {"hostname": socket.gethostname(), "logical_cpus": psutil.cpu_count(),
                     "physical_cpus": psutil.cpu_count(logical=False), "memory_total": memory.total}
        return [
            # psutil keeps this state module-wide: a user's own cpu_percent() call shortens our window.
            Reading.single("node_cpu_percent", "%", psutil.cpu_percent),
            Reading((Series("node_memory_used", "B"), Series("node_memory_percent", "%")), _memory),
            Reading.since_start((Series("node_disk_read_bytes", "B"), Series("node_disk_write_bytes", "B")), _disk),
            Reading.since_start((Series("node_net_sent_bytes", "B"), Series("node_net_recv_bytes", "B")), _network),
        ]
