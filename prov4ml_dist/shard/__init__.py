"""Per-rank HDF5 shards: layout (schema), buffered crash-safe writer, checked reader."""

from .reader import ShardReader
from .writer import SeriesTable, ShardWriter

__all__ = ["SeriesTable", "ShardReader", "ShardWriter"]
