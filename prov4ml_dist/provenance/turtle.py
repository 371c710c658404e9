"""A PROV-JSON document (dict) → PROV-O Turtle, streamed, with the plain relation triples
triple stores query (``prov:wasGeneratedBy``, ``prov:used``, ``prov:wasDerivedFrom``,
``prov:wasAssociatedWith``, ...) beside the qualified forms that carry times and plans.

``prov``'s own RDF output writes a relation with a time only in qualified form, so a plain
SPARQL query misses it; here every relation has its unqualified triple, and a qualified node
too when it has a time, a plan, an activity or other attributes. IRIs are written in full
(``<...>``): local names from user keys need no Turtle escaping rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TextIO

from .document import RELATIONS

PROV_NS = "http://www.w3.org/ns/prov#"
RDF_TYPE = "<http://www.w3.org/1999/02/22-rdf-syntax-ns#type>"
RDFS_LABEL = "<http://www.w3.org/2000/01/rdf-schema#label>"
XSD = "http://www.w3.org/2001/XMLSchema#"
KIND_CLASS = {"entity": "Entity", "activity": "Activity", "agent": "Agent"}
# relation → (subject role, PROV-O property, object role, qualified property, class, object property of the node)
_RELATION = {
    "wasGeneratedBy": ("prov:entity", "wasGeneratedBy", "prov:activity", "qualifiedGeneration", "Generation",
                       "activity"),
    "used": ("prov:activity", "used", "prov:entity", "qualifiedUsage", "Usage", "entity"),
    "wasInformedBy": ("prov:informed", "wasInformedBy", "prov:informant", "qualifiedCommunication",
                      "Communication", "activity"),
    "wasAssociatedWith": ("prov:activity", "wasAssociatedWith", "prov:agent", "qualifiedAssociation", "Association",
                          "agent"),
    "wasAttributedTo": ("prov:entity", "wasAttributedTo", "prov:agent", "qualifiedAttribution", "Attribution",
                        "agent"),
    "actedOnBehalfOf": ("prov:delegate", "actedOnBehalfOf", "prov:responsible", "qualifiedDelegation", "Delegation",
                        "agent"),
    "wasDerivedFrom": ("prov:generatedEntity", "wasDerivedFrom", "prov:usedEntity", "qualifiedDerivation",
                       "Derivation", "entity"),
    "wasInvalidatedBy": ("prov:entity", "wasInvalidatedBy", "prov:activity", "qualifiedInvalidation", "Invalidation",
                         "activity"),
    "specializationOf": ("prov:specificEntity", "specializationOf", "prov:generalEntity", None, None, None),
    "alternateOf": ("prov:alternate1", "alternateOf", "prov:alternate2", None, None, None),
    "hadMember": ("prov:collection", "hadMember", "prov:entity", None, None, None),
}
# other formal attributes of a qualified node → PROV-O property
_NODE_PROPERTY = {"prov:time": "atTime", "prov:plan": "hadPlan", "prov:activity": "hadActivity",
                  "prov:generation": "hadGeneration", "prov:usage": "hadUsage"}
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


class _Terms:
    def __init__(self, prefixes: dict[str, str]) -> None:
        self.prefixes = {"prov": PROV_NS, "xsd": XSD, **prefixes}

    def iri(self, name: str) -> str:
        """``prefix:local`` → ``<full IRI>`` (an unknown prefix is kept as a scheme: it is an IRI already)."""
        prefix, _, local = name.partition(":")
        base = self.prefixes.get(prefix)
        full = base + local if base is not None else name
        return "<" + "".join(c if c not in '<>"{}|^`\\ ' else f"%{ord(c):02X}" for c in full) + ">"

    def value(self, value: Any) -> str:
        if isinstance(value, dict):
            datatype = str(value.get("type", ""))
            if datatype == "prov:QUALIFIED_NAME":
                return self.iri(str(value["$"]))
            lang = value.get("lang")
            text = f'"{str(value.get("$", "")).translate(_ESCAPES)}"'
            return f"{text}@{lang}" if lang else f"{text}^^{self.iri(datatype)}" if datatype else text
        if isinstance(value, bool):
            return f'"{str(value).lower()}"^^<{XSD}boolean>'
        if isinstance(value, (int, float)):
            return f'"{value!r}"^^<{XSD}{"long" if isinstance(value, int) else "double"}>'
        return f'"{str(value).translate(_ESCAPES)}"'


def _values(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _attributes(terms: _Terms, record: dict[str, Any], skip: set[str]) -> Iterator[tuple[str, str]]:
    for name, value in record.items():
        if name in skip:
            continue
        if name == "prov:type":
            yield from ((RDF_TYPE, terms.value(v)) for v in _values(value))
        elif name == "prov:label":
            yield from ((RDFS_LABEL, terms.value(v)) for v in _values(value))
        else:
            yield from ((terms.iri(name), terms.value(v)) for v in _values(value))


def _element(terms: _Terms, kind: str, identifier: str, record: dict[str, Any]) -> str:
    pairs = [(RDF_TYPE, f"<{PROV_NS}{KIND_CLASS[kind]}>")]
    for name, prop in (("prov:startTime", "startedAtTime"), ("prov:endTime", "endedAtTime")):
        if name in record:
            pairs.append((f"<{PROV_NS}{prop}>", f'"{record[name]}"^^<{XSD}dateTime>'))
    pairs += _attributes(terms, record, {"prov:startTime", "prov:endTime"})
    return terms.iri(identifier) + " " + " ;\n    ".join(f"{p} {o}" for p, o in pairs) + " .\n"


def _relation(terms: _Terms, kind: str, record: dict[str, Any]) -> str:
    subject_role, prop, object_role, qualified, node_class, node_prop = _RELATION[kind]
    subject, obj = record.get(subject_role), record.get(object_role)
    if subject is None or obj is None:
        return ""
    subject_iri = terms.iri(str(subject))
    lines = f"{subject_iri} <{PROV_NS}{prop}> {terms.iri(str(obj))} .\n"
    if kind == "wasDerivedFrom" and any(isinstance(v, dict) and v.get("$") == "prov:Revision"
                                        for v in _values(record.get("prov:type", []))):
        lines += f"{subject_iri} <{PROV_NS}wasRevisionOf> {terms.iri(str(obj))} .\n"
    extra = {k: v for k, v in record.items() if k not in (subject_role, object_role)}
    if qualified is None or not extra:
        return lines
    pairs = [(RDF_TYPE, f"<{PROV_NS}{node_class}>"), (f"<{PROV_NS}{node_prop}>", terms.iri(str(obj)))]
    for name in [k for k in extra if k in _NODE_PROPERTY]:
        value = extra.pop(name)
        pairs.append((f"<{PROV_NS}{_NODE_PROPERTY[name]}>", f'"{value}"^^<{XSD}dateTime>' if name == "prov:time"
                      else terms.iri(str(value))))
    pairs += _attributes(terms, extra, set())
    return lines + f"{subject_iri} <{PROV_NS}{qualified}> [\n    " + " ;\n    ".join(
        f"{p} {o}" for p, o in pairs) + "\n] .\n"


def write_turtle(doc: dict[str, Any], out: TextIO) -> int:
    """Write ``doc`` as Turtle to ``out``; returns the number of records written."""
    terms = _Terms(doc.get("prefix", {}))
    for prefix, iri in sorted(terms.prefixes.items()):
        out.write(f"@prefix {prefix}: <{iri}> .\n")
    out.write("\n")
    count = 0
    for kind in KIND_CLASS:
        for identifier, record in doc.get(kind, {}).items():
            out.write(_element(terms, kind, identifier, record))
            count += 1
    for kind in RELATIONS:
        for record in doc.get(kind, {}).values():
            out.write(_relation(terms, kind, record))
            count += 1
    return count
