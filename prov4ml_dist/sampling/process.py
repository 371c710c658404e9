"""This process's CPU, memory, I/O and threads, read with psutil (one ``oneshot`` per sample)."""

from __future__ import annotations

from contextlib import AbstractContextManager

import psutil

from .sensor import Reading, Sensor, Series


class ProcessSensor(Sensor):
    """Sampled by every rank: each rank is its own process."""

    name = "process"
    scope = "process"

    def __init__(self, pid: int | None = None) -> None:
        super().__init__()
        self._proc = psutil.Process(pid)
        self.device = f"pid:{self._proc.pid}"

    def open(self) -> list[Reading]:
        proc = self._proc
        self.info = {"pid": proc.pid, "logical_cpus": psutil.cpu_count()}

        def io() -> tuple[int, int]:
            counters = proc.io_counters()
            return counters.read_bytes, counters.write_bytes

        return [
            # % of one core, so above 100 for a process using several; the probe primes it.
            Reading.single("process_cpu_percent", "%", proc.cpu_percent),
            Reading.single("process_memory_rss", "B", lambda: proc.memory_info().rss),
            Reading.since_start((Series("process_io_read_bytes", "B"), Series("process_io_write_bytes", "B")), io),
            Reading.single("process_threads", "1", proc.num_threads),
        ]

    def batch(self) -> AbstractContextManager:
        return self._proc.oneshot()
