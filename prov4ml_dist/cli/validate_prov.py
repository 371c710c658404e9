"""``prov4ml-dist validate``'s model checks: the PROV-CONSTRAINTS rules (provenance/constraints.py)
and the vocabulary (every ``p4d:`` term the document uses is defined in the shipped vocabulary),
each problem naming the record and the rule it breaks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..provenance.constraints import check
from ..provenance.vocabulary import VOCABULARY_FILE, undefined_terms


def model_problems(prov_json: Path) -> tuple[list[str], dict[str, int]]:
    """(problems, counts checked) of the document at ``prov_json`` (already known to parse)."""
    try:
        doc: Any = json.loads(Path(prov_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{prov_json}: not readable as JSON ({exc})"], {}
    if not isinstance(doc, dict):
        return [f"{prov_json}: not a PROV-JSON object"], {}
    problems = [f"PROV-CONSTRAINTS {violation}" for violation in check(doc)]
    problems += [f"vocabulary: {record} uses p4d:{term}, which {VOCABULARY_FILE} does not define"
                 for term, record in sorted(undefined_terms(doc).items())]
    relations = sum(len(v) for k, v in doc.items() if k not in ("prefix", "entity", "activity", "agent")
                    and isinstance(v, dict))
    return problems, {"constraint-checked relations": relations}
