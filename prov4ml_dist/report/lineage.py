"""The artifacts and model versions of a run as a graph, from its PROV document.

Nodes are contents (``p4d:Content`` entities: one per sha256, however many ranks saved it),
with their sha256, size, kind, path and the ranks whose files are specialisations of them;
edges are the derivations between files (a model version revising the previous one), lifted
to the contents. A run whose ranks each saved distinct files would give thousands of nodes:
above ``MAX_NODES`` the contents of one name and kind are drawn as one node with a count.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..cli.output import ranks_text

MAX_NODES = 300
MAX_EDGES = 4 * MAX_NODES
TEXT = 240  # characters of a label or a path kept
CONTENT_TYPE = "p4d:Content"


def _types(entity: dict[str, Any]) -> set[str]:
    found = entity.get("prov:type")
    found = found if isinstance(found, list) else [found]
    return {t["$"] if isinstance(t, dict) else str(t) for t in found if t}


def _value(v: Any) -> Any:
    """A PROV-JSON literal's value (``{"$": "12", "type": "xsd:long"}`` is 12)."""
    if isinstance(v, dict) and "$" in v:
        if v.get("type") in ("xsd:long", "xsd:int", "xsd:integer"):
            try:
                return int(v["$"])
            except ValueError:
                return v["$"]
        return v["$"]
    return v


def _records(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    found = doc.get(kind) or {}
    out = []
    for rec in found.values():
        out += rec if isinstance(rec, list) else [rec]
    return out


def lineage(doc: dict[str, Any] | None) -> dict[str, Any]:
    """``{"nodes": [...], "edges": [...], "grouped": bool}``; empty without a PROV document."""
    if not doc:
        return {"nodes": [], "edges": [], "grouped": False, "contents": 0}
    entities = doc.get("entity") or {}
    contents = {eid: e for eid, e in entities.items() if CONTENT_TYPE in _types(e)}
    file_of: dict[str, str] = {}
    ranks: dict[str, set[int]] = defaultdict(set)
    for rec in _records(doc, "specializationOf"):
        specific, general = rec.get("prov:specificEntity"), rec.get("prov:generalEntity")
        if general in contents and specific:
            file_of[specific] = general
            rank = _value((entities.get(specific) or {}).get("p4d:rank"))
            if isinstance(rank, int):
                ranks[general].add(rank)
    edges: dict[tuple[str, str], str] = {}
    for rec in _records(doc, "wasDerivedFrom"):
        new, old = file_of.get(rec.get("prov:generatedEntity", "")), file_of.get(rec.get("prov:usedEntity", ""))
        if new and old and new != old:
            kinds = _types(rec)
            edges.setdefault((old, new), "revision" if "prov:Revision" in kinds else "derived")
    nodes = {eid: _node(eid, e, ranks[eid]) for eid, e in contents.items()}
    grouped = len(nodes) > MAX_NODES
    if grouped:
        nodes, edges = _group(nodes, edges, ranks)
    return {"nodes": sorted(nodes.values(), key=lambda n: (n["item"], n["label"], n["id"])),
            "edges": [{"source": a, "target": b, "kind": k} for (a, b), k in sorted(edges.items())][:MAX_EDGES],
            "grouped": grouped, "contents": len(contents)}


def _node(eid: str, e: dict[str, Any], ranks: set[int]) -> dict[str, Any]:
    item = str(_value(e.get("p4d:item")) or "artifact")
    return {"id": eid, "label": str(_value(e.get("prov:label")) or eid)[:TEXT], "item": item,
            "sha256": str(_value(e.get("p4d:sha256")) or ""), "size": _value(e.get("p4d:size")),
            "path": str(_value(e.get("p4d:path")) or "")[:TEXT], "ranks": ranks_text(ranks) if ranks else "",
            "rank_count": len(ranks), "count": 1}


def _group(nodes: dict[str, dict[str, Any]], edges: dict[tuple[str, str], str], ranks: dict[str, set[int]]
           ) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    """One node per (kind, name): its contents counted, sizes summed, ranks merged."""
    merged: dict[str, dict[str, Any]] = {}
    members: dict[str, set[int]] = defaultdict(set)
    into: dict[str, str] = {}
    for eid, n in nodes.items():
        gid = f"group:{n['item']}:{n['label']}"
        into[eid] = gid
        g = merged.setdefault(gid, {**n, "id": gid, "size": 0, "count": 0})
        g["count"] += 1
        g["size"] += n["size"] if isinstance(n["size"], int) else 0
        members[gid] |= ranks[eid]
    for gid, g in merged.items():
        if g["count"] > 1:
            g["sha256"] = f"{g['count']} distinct contents"
        g["ranks"], g["rank_count"] = ranks_text(members[gid]), len(members[gid])
    lifted = {(into[a], into[b]): k for (a, b), k in edges.items() if into[a] != into[b]}
    return merged, lifted
