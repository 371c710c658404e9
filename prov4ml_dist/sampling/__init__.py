"""System, GPU and energy sampling into each rank's shard: a small Sensor interface
(process, node, NVML, RAPL) and the sampler thread that owns timing and failures."""

from .sampler import Sampler, default_sensors
from .sensor import Reading, Sensor, SensorUnavailable, Series, UnavailableSensor

__all__ = ["Reading", "Sampler", "Sensor", "SensorUnavailable", "Series", "UnavailableSensor", "default_sensors"]
