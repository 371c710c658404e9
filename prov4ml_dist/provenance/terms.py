"""How run facts become PROV names and attribute values: the namespaces, local names that any
key can take, timestamps, and nested values flattened into dotted attributes. Shared by the
builder and the per-record attribute functions (``attributes.py``)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from ..merge.model import MergedRun
from ..shard import schema

P4D_NAMESPACE = "https://prov4ml-dist.org/ns#"
KEY_NAMESPACE = "https://prov4ml-dist.org/ns/key#"  # user-chosen field names (dataset stats, ...)
XSD_NAMESPACE = "http://www.w3.org/2001/XMLSchema#"
PLACEHOLDER_NAMESPACE = "http://example.org/"  # start_run's default: replaced by the site's namespace
SITE_NAMESPACE = "urn:prov4ml-dist:site:"
_IRI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s<>\"{}|\\^`]+")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def site_of(run: MergedRun) -> str:
    """The site a run's default namespace is derived from: its Slurm cluster, else rank 0's host."""
    for r in run.ranks:
        launcher = r.environment.get("launcher_env")
        if isinstance(launcher, dict) and isinstance(launcher.get("SLURM_CLUSTER_NAME"), str):
            return launcher["SLURM_CLUSTER_NAME"]
    hosts = [r.hostname for r in sorted(run.ranks, key=lambda r: (r.rank, r.attempt)) if r.hostname]
    return hosts[0] if hosts else "unknown"


def user_namespace_iri(value: str, site: str = "unknown") -> str:
    """The user's namespace if it is an IRI other than the API's placeholder (ending in / or #, so it
    can prefix names); else ``urn:prov4ml-dist:site:<site>/``, which does not collide across sites."""
    if _IRI.fullmatch(value or "") and value != PLACEHOLDER_NAMESPACE:
        return value if value.endswith(("/", "#")) else value + "/"
    return f"{SITE_NAMESPACE}{quote(site.lower(), safe='-_~.')}/"


def local_name(*parts: object) -> str:
    """An identifier's local name from parts joined by '.'; each part percent-encoded so any key is safe."""
    return ".".join(quote(str(part), safe="-_~").replace(".", "%2E") for part in parts)


def key_name(name: str) -> str:
    """A user-chosen field name as an attribute in the ``key:`` namespace: letters, digits, _ . -
    (anything else becomes _), never percent-encoded."""
    name = _KEY_CHARS.sub("_", name).strip(".")
    return "key:" + (name if name and name[0] not in "-" else "_" + name)


def timestamp(value: float | None) -> datetime | None:
    """A unix time as an aware datetime; None for a missing, non-finite or out-of-range one."""
    if value is None or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(value, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def attempt_name(rank: int, attempt: int) -> str:
    """Mirrors the shard names: ``rank-00003``, ``rank-00003.restart-1``, ``rank-00003.requeue-1``."""
    return schema.attempt_stem(rank, max(attempt, 0))


def flat(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested dicts and lists as (dotted path, scalar) pairs; list items by index (order kept)."""
    if isinstance(value, dict):
        for key, item in sorted(value.items(), key=lambda kv: str(kv[0])):
            yield from flat(item, f"{prefix}{key}.")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from flat(item, f"{prefix}{i}.")
    elif value is not None:
        yield prefix[:-1], value


def p4d(pairs: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(f"p4d:{name}", value) for name, value in pairs]


def keys(pairs: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(key_name(name), value) for name, value in pairs]
