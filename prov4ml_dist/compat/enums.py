"""yProv4ML's option enums, accepted wherever yProv4ML takes them. Each has no effect here (the
README's "Coming from yProv4ML" table says why); a member is recorded as its name."""

from __future__ import annotations

from enum import Enum


class MetricsType(Enum):
    """yProv4ML's ``metrics_file_type``: metrics here are always HDF5 (export writes CSV)."""

    CSV = "csv"
    ZARR = "zarr"
    NETCDF = "netcdf"


class CompressorType(Enum):
    """yProv4ML's ``use_compressor``: no archive is made here; the run directory is the result."""

    ZIP = "zip"
    GZIP = "gzip"
    LZ4 = "lz4"
    ZSTD = "zstd"
    BLOSC = "blosc"


class FoldOperation(Enum):
    """How repeated values of a metric fold into one. Every point is kept here, and the merge
    folds across ranks itself (min / mean / max per step); the member is accepted as a name."""

    ADD = "add"
    SUBTRACT = "subtract"
    MULTIPLY = "multiply"
    MIN = "min"
    MAX = "max"
    MEAN = "mean"
    LAST = "last"
