"""A PROV-JSON document built as plain dicts: the builder's output, ~50x cheaper per record than
``prov.model`` (~300 µs per entity). The result is the W3C PROV-JSON structure itself, so
``json.dumps`` writes it and ``prov`` parses it (tests check both).

Attribute values: ``literal`` turns Python values into PROV-JSON values (typed literals for
numbers, booleans and times; a list is a repeated attribute, never JSON text in a string);
``qname`` makes a qualified-name value (a reference to another record).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

JsonValue = Any
ELEMENTS = ("entity", "activity", "agent")
# relation → (its formal endpoints in order, the element kind each must be declared as)
RELATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "wasGeneratedBy": (("prov:entity", "entity"), ("prov:activity", "activity")),
    "used": (("prov:activity", "activity"), ("prov:entity", "entity")),
    "wasInformedBy": (("prov:informed", "activity"), ("prov:informant", "activity")),
    "wasAssociatedWith": (("prov:activity", "activity"), ("prov:agent", "agent"), ("prov:plan", "entity")),
    "wasAttributedTo": (("prov:entity", "entity"), ("prov:agent", "agent")),
    "actedOnBehalfOf": (("prov:delegate", "agent"), ("prov:responsible", "agent"), ("prov:activity", "activity")),
    "wasDerivedFrom": (("prov:generatedEntity", "entity"), ("prov:usedEntity", "entity"),
                       ("prov:activity", "activity")),
    "wasInvalidatedBy": (("prov:entity", "entity"), ("prov:activity", "activity")),
    "specializationOf": (("prov:specificEntity", "entity"), ("prov:generalEntity", "entity")),
    "alternateOf": (("prov:alternate1", "entity"), ("prov:alternate2", "entity")),
    "hadMember": (("prov:collection", "entity"), ("prov:entity", "entity")),
}
_ID_PREFIX = {"wasGeneratedBy": "gen", "used": "use", "wasInformedBy": "com", "wasAssociatedWith": "assoc",
              "wasAttributedTo": "attr", "actedOnBehalfOf": "deleg", "wasDerivedFrom": "der",
              "wasInvalidatedBy": "inv", "specializationOf": "spec", "alternateOf": "alt", "hadMember": "mem"}


def iso_time(value: float | None) -> str | None:
    """A unix time as xsd:dateTime text (UTC); None for a missing, non-finite or out-of-range one
    (a bit-flipped time column must not fail the merge)."""
    if value is None or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(value, tz=timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def typed(text: str, datatype: str) -> dict[str, str]:
    return {"$": text, "type": datatype}


def qname(name: str) -> dict[str, str]:
    """A value that refers to a record (prov:QUALIFIED_NAME), not a string."""
    return {"$": name, "type": "prov:QUALIFIED_NAME"}


def literal(value: Any) -> JsonValue:
    """A PROV-JSON value: typed xsd literals for numbers and times (JSON booleans); NaN and infinities as
    xsd:double words, never JSON numbers; a list or tuple as repeated values."""
    kind = type(value)  # the common cases first: this runs once per attribute of a 1,000-rank document
    if kind is str or kind is bool:  # PROV-JSON's native boolean is xsd:boolean
        return value
    if kind is float and math.isfinite(value):
        return {"$": repr(value), "type": "xsd:double"}
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return typed(str(value), "xsd:long") if -(1 << 63) <= value < 1 << 63 else typed(str(value), "xsd:integer")
    if isinstance(value, float):
        if math.isnan(value):
            return typed("NaN", "xsd:double")
        if math.isinf(value):
            return typed("INF" if value > 0 else "-INF", "xsd:double")
        return typed(repr(value), "xsd:double")
    if isinstance(value, datetime):
        return typed(value.isoformat(), "xsd:dateTime")
    if isinstance(value, (list, tuple)):
        return [literal(v) for v in value]
    if isinstance(value, dict) and set(value) == {"$", "type"}:  # already a PROV-JSON value (qname, typed)
        return value
    if isinstance(value, dict):  # callers flatten; a stray one must still not be JSON text
        raise TypeError(f"a dict is not a PROV value: {sorted(value)[:5]}")
    return value if isinstance(value, str) else str(value)


class ProvJson:
    """Records added in order; identifiers are the caller's (``prefix:local``)."""

    def __init__(self, prefixes: dict[str, str]) -> None:
        self.data: dict[str, Any] = {"prefix": dict(prefixes)}
        self._ids: dict[str, int] = {}

    def _bucket(self, kind: str) -> dict[str, Any]:
        return self.data.setdefault(kind, {})

    def element(self, kind: str, identifier: str, types: Iterable[str] = (),
                attrs: Iterable[tuple[str, Any]] = (), label: str | None = None) -> str:
        """Declare an entity, activity or agent; attributes with a None value are left out."""
        record: dict[str, Any] = {}
        kinds = [qname(t) for t in types]
        if kinds:
            record["prov:type"] = kinds if len(kinds) > 1 else kinds[0]
        if label is not None:
            record["prov:label"] = label
        for name, value in attrs:
            if value is None or value == []:
                continue
            value = literal(value)
            if name in record:  # a repeated attribute: several values
                old = record[name]
                record[name] = (old if isinstance(old, list) else [old]) + (value if isinstance(value, list)
                                                                              else [value])
            else:
                record[name] = value
        bucket = self._bucket(kind)
        if identifier in bucket:
            raise ValueError(f"{identifier} declared twice")
        bucket[identifier] = record
        return identifier

    def activity(self, identifier: str, start: float | None, end: float | None, types: Iterable[str] = (),
                 attrs: Iterable[tuple[str, Any]] = (), label: str | None = None) -> str:
        times = [("prov:startTime", iso_time(start)), ("prov:endTime", iso_time(end))]
        self.element("activity", identifier, types, attrs, label)
        record = self.data["activity"][identifier]
        record.update({k: v for k, v in times if v is not None})
        return identifier

    def relation(self, kind: str, *ends: str | None, time: float | None = None,
                 attrs: Iterable[tuple[str, Any]] = ()) -> str:
        """A relation by its formal endpoints (in the order of ``RELATIONS``); returns its id."""
        roles = RELATIONS[kind]
        record: dict[str, Any] = {role: end for (role, _), end in zip(roles, ends, strict=False) if end is not None}
        when = iso_time(time)
        if when is not None:
            record["prov:time"] = when
        record.update((name, literal(value)) for name, value in attrs if value is not None)
        number = self._ids[kind] = self._ids.get(kind, 0) + 1
        identifier = f"_:{_ID_PREFIX[kind]}{number}"
        self._bucket(kind)[identifier] = record
        return identifier
