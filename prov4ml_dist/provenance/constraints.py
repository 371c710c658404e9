"""PROV-CONSTRAINTS checks of our own, on a PROV-JSON document (a dict), written from the W3C
recommendation (https://www.w3.org/TR/prov-constraints/); each violation names the record and
the rule it breaks. Used by ``prov4ml-dist validate`` and the tests.

Checked (rule names as the recommendation's constraints, where it has one):
- ``endpoint-declared`` / ``typing``: a relation's endpoints are declared, each as the kind of
  element its role needs (typing constraints); ``impossible-entity-activity``: no identifier is
  both an entity and an activity (disjointness).
- ``unique-generation``: an entity is generated at most once. Stricter than the recommendation's
  generation-uniqueness + generation-generation-ordering (two generations of one entity are one
  event, so generations by different activities or at different times contradict each other);
  ``unique-invalidation`` likewise.
- Event ordering, wherever both times are stated: ``start-precedes-end``; usage, generation and
  invalidation within their activity (start <= event <= end); ``generation-precedes-usage``,
  ``generation-precedes-invalidation``, ``usage-precedes-invalidation``;
  ``derivation-generation-generation-ordering`` (the used entity is generated before the derived
  one); ``wasInformedBy-ordering`` (the informant starts before the informed activity ends);
  ``association-within-activity`` (an agent that is also an entity is generated before the
  activity ends).
- ``time-format``: every time is an xsd:dateTime.

Events without a stated time are not ordered (nothing to contradict). Two events at the same
stated time are taken as ordered (timestamps have a finite resolution).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .document import ELEMENTS, RELATIONS


@dataclass(frozen=True)
class Violation:
    rule: str
    record: str  # the record that breaks it: "wasGeneratedBy _:gen3", "entity run:x"
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.record}: {self.message}"


def _time(value: Any) -> datetime | None | str:
    """A stated time, None when absent, the text when it is not an xsd:dateTime."""
    if value is None:
        return None
    text = value.get("$") if isinstance(value, dict) else value
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return str(text)


def _ref(value: Any) -> str | None:
    return value.get("$") if isinstance(value, dict) else value


class _Checker:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.found: list[Violation] = []
        self.kinds: dict[str, set[str]] = defaultdict(set)
        for kind in ELEMENTS:
            for identifier in _records(doc, kind):
                self.kinds[identifier].add(kind)
        self.bounds: dict[str, tuple[Any, Any]] = {}

    def add(self, rule: str, record: str, message: str) -> None:
        self.found.append(Violation(rule, record, message))

    def time(self, record: str, value: Any) -> datetime | None:
        found = _time(value)
        if isinstance(found, str):
            self.add("time-format", record, f"{found!r} is not an xsd:dateTime")
            return None
        if found is not None and found.tzinfo is None:
            self.add("time-format", record, f"{value!r} has no time zone")
            return None
        return found

    def run(self) -> list[Violation]:
        for identifier, kinds in self.kinds.items():
            if {"entity", "activity"} <= kinds:
                self.add("impossible-entity-activity", identifier, "declared both as an entity and an activity")
        for identifier, record in _records(self.doc, "activity").items():
            where = f"activity {identifier}"
            start = self.time(where, record.get("prov:startTime"))
            end = self.time(where, record.get("prov:endTime"))
            self.bounds[identifier] = (start, end)
            if start and end and start > end:
                self.add("start-precedes-end", where, f"starts {start.isoformat()} after it ends {end.isoformat()}")
        relations = {kind: _records(self.doc, kind) for kind in RELATIONS}
        for kind, records in relations.items():
            for rid, record in records.items():
                self._endpoints(kind, rid, record)
        generated = self._events(relations["wasGeneratedBy"], "wasGeneratedBy", "unique-generation")
        invalidated = self._events(relations["wasInvalidatedBy"], "wasInvalidatedBy", "unique-invalidation")
        for rid, r in relations["used"].items():
            where, when = f"used {rid}", self.time(f"used {rid}", r.get("prov:time"))
            self._within(where, _ref(r.get("prov:activity")), when, "usage-within-activity")
            entity = _ref(r.get("prov:entity"))
            gen, inv = generated.get(entity), invalidated.get(entity)
            if when and gen and gen > when:
                self.add("generation-precedes-usage", where, f"{entity} is used at {when.isoformat()}, before "
                                                              f"it is generated at {gen.isoformat()}")
            if when and inv and when > inv:
                self.add("usage-precedes-invalidation", where, f"{entity} is used after its invalidation")
        for entity, gen in generated.items():
            inv = invalidated.get(entity)
            if gen and inv and gen > inv:
                self.add("generation-precedes-invalidation", f"entity {entity}", "invalidated before generated")
        for rid, r in relations["wasDerivedFrom"].items():
            new, old = generated.get(_ref(r.get("prov:generatedEntity"))), generated.get(_ref(r.get("prov:usedEntity")))
            if new and old and old > new:
                self.add("derivation-generation-generation-ordering", f"wasDerivedFrom {rid}",
                         f"{_ref(r.get('prov:usedEntity'))} is generated at {old.isoformat()}, after "
                         f"{_ref(r.get('prov:generatedEntity'))} derived from it ({new.isoformat()})")
        for rid, r in relations["wasInformedBy"].items():
            informed = self.bounds.get(_ref(r.get("prov:informed")), (None, None))[1]
            informant = self.bounds.get(_ref(r.get("prov:informant")), (None, None))[0]
            if informed and informant and informant > informed:
                self.add("wasInformedBy-ordering", f"wasInformedBy {rid}",
                         "the informant starts after the informed activity ends")
        for rid, r in relations["wasAssociatedWith"].items():
            agent_born = generated.get(_ref(r.get("prov:agent")))
            end = self.bounds.get(_ref(r.get("prov:activity")), (None, None))[1]
            if agent_born and end and agent_born > end:
                self.add("association-within-activity", f"wasAssociatedWith {rid}",
                         "the agent is generated after the activity ends")
        return self.found

    def _endpoints(self, kind: str, rid: str, record: dict[str, Any]) -> None:
        for position, (role, needed) in enumerate(RELATIONS[kind]):
            target = _ref(record.get(role))
            if target is None:
                if position < 2:
                    self.add("endpoint-declared", f"{kind} {rid}", f"has no {role}")
                continue
            if target not in self.kinds:
                self.add("endpoint-declared", f"{kind} {rid}", f"{role} {target} is not declared")
            elif needed not in self.kinds[target]:
                self.add("typing", f"{kind} {rid}", f"{role} {target} is a {'/'.join(sorted(self.kinds[target]))}, "
                                                    f"not an {needed}")

    def _events(self, records: dict[str, Any], kind: str, rule: str) -> dict[str, datetime | None]:
        """Generation (or invalidation) time per entity; more than one event per entity is a violation."""
        times: dict[str, datetime | None] = {}
        seen: dict[str, str] = {}
        for rid, r in records.items():
            entity, where = _ref(r.get("prov:entity")), f"{kind} {rid}"
            when = self.time(where, r.get("prov:time"))
            self._within(where, _ref(r.get("prov:activity")), when,
                         "generation-within-activity" if kind == "wasGeneratedBy" else "invalidation-within-activity")
            if entity in seen:
                self.add(rule, where, f"{entity} already has {seen[entity]}")
                continue
            seen[entity], times[entity] = where, when
        return times

    def _within(self, where: str, activity: str | None, when: datetime | None, rule: str) -> None:
        start, end = self.bounds.get(activity, (None, None)) if activity else (None, None)
        if when and start and when < start:
            self.add(rule, where, f"at {when.isoformat()}, before {activity} starts ({start.isoformat()})")
        if when and end and when > end:
            self.add(rule, where, f"at {when.isoformat()}, after {activity} ends ({end.isoformat()})")


def _records(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    records = doc.get(kind, {})
    return records if isinstance(records, dict) else {}


def check(doc: dict[str, Any]) -> list[Violation]:
    """Every violation of the checked PROV-CONSTRAINTS in a PROV-JSON document (bundles not descended)."""
    return _Checker(doc).run()
