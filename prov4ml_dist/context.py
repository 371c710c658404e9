"""Contexts (training, validation, ...) and metric sources, as in yProv4ML.

Users extend contexts with their own ``Enum``; plain strings (yProv4ML 3.x) work too.
Everything is normalised to a string name before it reaches the shard.
"""

from __future__ import annotations

from enum import Enum

from .errors import InvalidInputError

MAX_NAME_LENGTH = 1024


class Context(Enum):
    """The built-in contexts. Any other ``Enum`` member or a string is accepted as well."""

    TRAINING = 0
    VALIDATION = 1
    TESTING = 2


class LoggingItemKind(Enum):
    """Where a metric came from (yProv4ML's ``source`` argument)."""

    METRIC = 0
    FLOPS_PER_BATCH = 1
    FLOPS_PER_EPOCH = 2
    SYSTEM_METRIC = 3
    CARBON_METRIC = 4
    EXECUTION_TIME = 5
    MODEL_VERSION = 6
    FINAL_MODEL_VERSION = 7
    PARAMETER = 8
    ARTIFACT = 9


def check_name(name: object, what: str) -> str:
    """Validate a key, context or label: a non-empty string of printable characters."""
    if not isinstance(name, str):
        raise InvalidInputError(f"{what} must be a string, got {type(name).__name__}: {name!r:.80}")
    if not name:
        raise InvalidInputError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    if not name.isprintable():
        raise InvalidInputError(f"{what} contains control characters: {name!r:.80}")
    return name


def context_name(context: object) -> str:
    """The stored name of a context: an Enum member's name, or the string itself."""
    if isinstance(context, Enum):
        return check_name(context.name, "context")
    if isinstance(context, str):
        return check_name(context, "context")
    raise InvalidInputError(
        f"context must be prov4ml.Context, another Enum member or a string, got {type(context).__name__}"
    )


def source_name(source: object) -> str:
    """The stored name of a metric source; '' when none was given."""
    if source is None:
        return ""
    if isinstance(source, Enum):
        return source.name
    if isinstance(source, str):
        return check_name(source, "source")
    raise InvalidInputError(f"source must be a LoggingItemKind, an Enum member or a string, got {source!r:.80}")
