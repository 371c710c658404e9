"""Exception types of prov4ml_dist: one base class so users can catch everything we raise."""

from __future__ import annotations


class Prov4MLError(Exception):
    """Base class of every error prov4ml_dist raises on purpose."""


class RunStateError(Prov4MLError, RuntimeError):
    """The call does not fit the run's state: nothing started, already ended, started twice."""


class InvalidInputError(Prov4MLError, ValueError):
    """An argument cannot be logged: a bad key, value, context, step or path."""


class ArtifactError(InvalidInputError):
    """An artifact cannot be recorded safely: missing, a symlink or special file, or escaping."""


class ModelSaveError(Prov4MLError):
    """``torch.save`` could not serialise a model; nothing partial is left on disk."""


class ShardError(Prov4MLError):
    """A shard file is unreadable, truncated, foreign, or belongs to another run."""


class MergeError(Prov4MLError):
    """Shards could not be merged into ``merged.h5`` / ``prov.json``."""
