"""The shipped ``p4d:`` vocabulary (``vocabulary.ttl``, package data) and the check that a
document uses only terms it defines."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from typing import Any

VOCABULARY_FILE = "vocabulary.ttl"
_DEFINITION = re.compile(r"^p4d:([A-Za-z_][A-Za-z0-9_]*) a (rdfs:Class|rdf:Property) ;", re.MULTILINE)


def vocabulary_text() -> str:
    return resources.files(__package__).joinpath(VOCABULARY_FILE).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def defined_terms() -> frozenset[str]:
    """Every ``p4d:`` class and property the vocabulary defines (local names)."""
    return frozenset(m.group(1) for m in _DEFINITION.finditer(vocabulary_text()))


def used_terms(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(record, p4d local name) for every p4d: attribute name and p4d: qualified-name value."""
    for kind, records in doc.items():
        if kind == "prefix" or not isinstance(records, dict):
            continue
        for identifier, record in records.items():
            if not isinstance(record, dict):
                continue
            for name, value in record.items():
                if name.startswith("p4d:"):
                    yield f"{kind} {identifier}", name[4:]
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, dict) and item.get("type") == "prov:QUALIFIED_NAME" \
                            and str(item.get("$", "")).startswith("p4d:"):
                        yield f"{kind} {identifier}", item["$"][4:]


def undefined_terms(doc: dict[str, Any]) -> dict[str, str]:
    """p4d: terms a document uses that the vocabulary does not define → the first record using each."""
    known = defined_terms()
    found: dict[str, str] = {}
    for record, term in used_terms(doc):
        if term not in known:
            found.setdefault(term, record)
    return found
