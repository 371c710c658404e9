"""Writing a PROV document: PROV-JSON (the merge's output), PROV-N and Graphviz dot.

The dot writer is our own (a few lines) rather than ``prov.dot``, which needs pydot; it
draws the usual PROV shapes: entities as ellipses, activities as boxes, agents as houses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from prov.constants import PROV_LABEL, PROV_N_MAP
from prov.model import ProvActivity, ProvAgent, ProvDocument, ProvElement, ProvEntity, ProvRelation
from prov.serializers.provjson import ProvJSONEncoder

from ..errors import MergeError

_STYLE = {
    ProvEntity: 'shape=ellipse, style=filled, fillcolor="#FFFC87"',
    ProvActivity: 'shape=box, style=filled, fillcolor="#9FB1FC"',
    ProvAgent: 'shape=house, style=filled, fillcolor="#FED37F"',
}


def write_prov_json(doc: ProvDocument | dict, path: Path) -> None:
    """PROV-JSON text through ``json.dumps`` (its C encoder is several times faster than the
    streaming ``json.dump`` that ``serialize`` uses); ``doc`` is the builder's dict or a ``ProvDocument``."""
    text = json.dumps(doc) if isinstance(doc, dict) else json.dumps(doc, cls=ProvJSONEncoder)
    Path(path).write_text(text, encoding="utf-8")


def load_document(path: Path) -> ProvDocument:
    """A PROV-JSON file read back (untrusted input: the prov package parses, nothing is evaluated)."""
    try:
        return ProvDocument.deserialize(source=str(path), format="json")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise MergeError(f"{path}: not a readable PROV-JSON document ({exc})") from None


def write_provn(doc: ProvDocument, path: Path) -> None:
    Path(path).write_text(doc.get_provn(), encoding="utf-8")


def to_dot(doc: ProvDocument) -> str:
    """The document as a Graphviz digraph: one node per element, one labelled edge per relation."""
    lines = ["digraph prov {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8];']
    nodes: dict[str, str] = {}
    for record in doc.get_records(ProvElement):
        node = nodes[str(record.identifier)] = f"n{len(nodes)}"
        labels = record.get_attribute(PROV_LABEL)
        label = str(next(iter(labels))) if labels else str(record.identifier)
        style = next(s for kind, s in _STYLE.items() if isinstance(record, kind))
        lines.append(f'  {node} [label="{_escape(label)}", tooltip="{_escape(str(record.identifier))}", {style}];')
    for record in doc.get_records(ProvRelation):
        ends = [str(value) for _, value in record.formal_attributes[:2]]
        if all(end in nodes for end in ends):
            lines.append(f'  {nodes[ends[0]]} -> {nodes[ends[1]]} [label="{PROV_N_MAP[record.get_type()]}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_dot(doc: ProvDocument, path: Path) -> None:
    Path(path).write_text(to_dot(doc), encoding="utf-8")


def write_graph(prov_json: Path, svg: bool = False) -> Path:
    """``prov.dot`` beside ``prov.json`` (and ``prov.svg`` when asked: needs Graphviz's ``dot``)."""
    prov_json = Path(prov_json)
    dot_path = prov_json.with_suffix(".dot")
    write_dot(load_document(prov_json), dot_path)
    if not svg:
        return dot_path
    dot = shutil.which("dot")
    if dot is None:
        raise MergeError(f"cannot draw {dot_path.with_suffix('.svg')}: Graphviz 'dot' is not installed")
    svg_path = dot_path.with_suffix(".svg")
    try:
        subprocess.run([dot, "-Tsvg", "-o", str(svg_path), str(dot_path)], check=True, capture_output=True,
                       timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MergeError(f"Graphviz failed on {dot_path}: {exc}") from None
    return svg_path
