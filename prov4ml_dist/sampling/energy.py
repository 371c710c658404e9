"""Energy accounting shared by the NVML and RAPL sensors: counters and integrated power."""

from __future__ import annotations


class EnergyCounter:
    """Joules since the first reading of a cumulative hardware energy counter.

    RAPL's ``energy_uj`` wraps at ``max_energy_range_uj`` (every few minutes at full power on
    big sockets), so each delta is taken modulo that range; NVML's 64-bit counter does not wrap.
    A counter going backwards with no known range (driver reload) adds nothing rather than
    a negative or absurd amount.
    """

    def __init__(self, joules_per_unit: float, wrap: int | None = None) -> None:
        self._scale = joules_per_unit
        self._wrap = wrap
        self._last: int | None = None
        self._units = 0
        self._t0 = self._t1 = 0.0

    def update(self, raw: int, t: float) -> float:
        """Account one reading taken at monotonic time ``t``; the joules so far."""
        if self._last is None:
            self._t0 = t
        else:
            delta = raw - self._last
            if delta < 0 and self._wrap:
                delta += self._wrap
            self._units += max(delta, 0)
        self._last = raw
        self._t1 = t
        return self.joules

    @property
    def started(self) -> bool:
        return self._last is not None

    @property
    def joules(self) -> float:
        return self._units * self._scale

    @property
    def seconds(self) -> float:
        """The window the joules cover."""
        return self._t1 - self._t0


class PowerIntegrator:
    """Energy from polled power by the trapezoid rule, for GPUs without an energy counter."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None  # (watts, monotonic time)
        self._joules = 0.0
        self._t0 = 0.0

    def update(self, watts: float, t: float) -> None:
        if self._last is None:
            self._t0 = t
        else:
            last_watts, last_t = self._last
            self._joules += (watts + last_watts) / 2 * (t - last_t)
        self._last = (watts, t)

    @property
    def started(self) -> bool:
        return self._last is not None

    @property
    def joules(self) -> float:
        return self._joules

    @property
    def seconds(self) -> float:
        return self._last[1] - self._t0 if self._last is not None else 0.0
