"""Shards of a run → ``merged.h5`` (all points, cross-rank statistics) and ``prov.json``."""

from .load import load_merged
from .merger import MergeResult, merge_run
from .model import MergedRun

__all__ = ["MergeResult", "MergedRun", "load_merged", "merge_run"]
