"""Contexts (training, validation, ...) and metric sources, as in yProv4ML.

Users extend contexts with their own ``Enum``; plain strings (yProv4ML 3.x) work too, and
so do contexts declared at run time (``create_context``), which then read as ``Context.<NAME>``.
Everything is normalised to a string name before it reaches the shard.
"""

from __future__ import annotations

import threading
from enum import Enum, EnumMeta

from .errors import InvalidInputError

MAX_NAME_LENGTH = 1024
_RUNTIME_BASE = 100  # values of contexts declared at run time start here


class _ContextMeta(EnumMeta):
    """An Enum cannot gain members once defined; contexts declared at run time live beside it
    and are found by ``Context.NAME`` / ``Context["NAME"]`` when no built-in member matches."""

    _runtime: dict[str, Enum] = {}
    _lock = threading.Lock()

    def __getattr__(cls, name: str) -> Enum:
        try:
            return _ContextMeta._runtime[name]
        except KeyError:
            raise AttributeError(f"Context has no member {name!r}; declare it with prov4ml.create_context"
                                 f"({name!r})") from None

    def __getitem__(cls, name: str) -> Enum:
        try:
            return super().__getitem__(name)
        except KeyError:
            if name in _ContextMeta._runtime:
                return _ContextMeta._runtime[name]
            raise


class Context(Enum, metaclass=_ContextMeta):
    """The built-in contexts (yProv4ML 3.x's five plus TESTING). Any other ``Enum`` member or a
    string is accepted as well; ``create_context("X")`` makes ``Context.X`` (an Enum member of
    its own one-member class: ``isinstance(Context.X, Enum)`` holds, ``isinstance(.., Context)``
    does not)."""

    TRAINING = 0
    VALIDATION = 1
    TESTING = 2
    MODELS = 3
    EVALUATION = 4
    DATASETS = 5


Contexts = Context  # yProv4ML 3.x's name


def declare_context(name: str) -> Enum | str:
    """The member for a context declared at run time: a built-in one if the name is one,
    else the same new member on every call (series are cached by the member's identity).
    A name that is no Python identifier cannot be an attribute: it stays a string context."""
    check_name(name, "context")
    if not name.isidentifier():
        return name
    builtin = Context.__members__.get(name)
    if builtin is not None:
        return builtin
    with _ContextMeta._lock:
        member = _ContextMeta._runtime.get(name)
        if member is None:
            member = Enum("Context", {name: _RUNTIME_BASE + len(_ContextMeta._runtime)})[name]
            _ContextMeta._runtime[name] = member
    return member


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
