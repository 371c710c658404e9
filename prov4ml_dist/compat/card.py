"""``end_run(create_card=True)``: a model card of the merged run, as JSON (for tools) and
Markdown (for people): model, params, datasets, metric summaries with their spread across
ranks, ranks and nodes, software, and energy — only what was recorded, nothing invented."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..merge import MergedRun, load_merged
from ..merge.layout import MERGED_NAME

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"


def card_data(run: MergedRun) -> dict[str, Any]:
    """The card's content, from the merged run only."""
    ranks = [r for r in run.ranks if r.status != "missing"]
    first_env = next((r.environment for r in ranks if r.environment), {})
    metrics: dict[tuple[str, str], list] = defaultdict(list)
    for s in run.series:
        if s.dataset.startswith("/metrics/") and s.count:
            metrics[(s.key, s.context)].append(s)
    return {
        "run_id": run.run_id,
        "experiment_name": run.experiment_name,
        "user": run.user,
        "models": [{"name": m.name, "rank": m.rank, **{k: v for k, v in m.fields.items() if k != "other_attrs"},
                    **({"other_attrs": m.fields["other_attrs"]} if "other_attrs" in m.fields else {})}
                   for m in _first_per_name(run.models)],
        "params": {p.key: p.value for p in run.params if p.majority},
        "params_differing_across_ranks": sorted({p.key for p in run.params if not p.majority}),
        "datasets": [{"label": d.name, **d.fields.get("stats", {})} for d in _first_per_name(run.datasets)],
        "metrics": [_metric(key, context, members) for (key, context), members in sorted(metrics.items())],
        "ranks": {"world_size": run.world_size, "merged": len(ranks),
                  "complete": sum(1 for r in ranks if r.complete),
                  "nodes": sorted({r.hostname for r in ranks if r.hostname})},
        "software": {"python": first_env.get("python"), "torch": first_env.get("torch"),
                     "cuda": first_env.get("cuda"), "platform": first_env.get("platform"),
                     "libraries": first_env.get("versions", {}), "git": first_env.get("git")},
        "energy": {e.name or e.scope: e.fields for e in run.energy if e.scope == "job"},
    }


def _first_per_name(records: list) -> list:
    seen: dict[str, Any] = {}
    for r in sorted(records, key=lambda r: (r.name, r.rank)):
        seen.setdefault(r.name, r)
    return list(seen.values())


def _metric(key: str, context: str, members: list) -> dict[str, Any]:
    """Last value per rank and its spread across ranks; the run's min and max."""
    lasts = [s.last for s in members]
    return {"key": key, "context": context, "ranks": len(members), "points": sum(s.count for s in members),
            "last_min": min(lasts), "last_mean": statistics.fmean(lasts), "last_max": max(lasts),
            "min": min(s.min for s in members), "max": max(s.max for s in members)}


def markdown(card: dict[str, Any]) -> str:
    """The card as Markdown."""
    lines = [f"# Model card: {card['experiment_name']} / {card['run_id']}", ""]
    lines += ["## Model", ""]
    lines += [f"- **{m['name']}**: {m.get('class', '?')}, {m.get('parameters', '?')} parameters"
              for m in card["models"]]
    lines += ["" if card["models"] else "(no model logged)", "## Parameters", "", "| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {json.dumps(v)[:80]} |" for k, v in sorted(card["params"].items())]
    if card["params_differing_across_ranks"]:
        lines += ["", f"Differ across ranks: {', '.join(card['params_differing_across_ranks'])}"]
    lines += ["", "## Datasets", ""]
    lines += [f"- **{d['label']}**: {d.get('total_samples', '?')} samples, batch size {d.get('batch_size', '-')}"
              for d in card["datasets"]]
    lines += ["", "## Metrics (last value across ranks)", "", "| key | context | ranks | last min | last mean | "
              "last max | min | max |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {m['key']} | {m['context']} | {m['ranks']} | {m['last_min']:.6g} | {m['last_mean']:.6g} | "
              f"{m['last_max']:.6g} | {m['min']:.6g} | {m['max']:.6g} |" for m in card["metrics"]]
    r, sw = card["ranks"], card["software"]
    lines += ["", "## Ranks and nodes", "", f"{r['merged']} of {r['world_size']} ranks merged, {r['complete']} "
              f"complete, on {len(r['nodes'])} node(s): {', '.join(r['nodes'])}", "", "## Software", "",
              f"Python {sw['python']}, torch {sw['torch']}, CUDA {sw['cuda']}, {sw['platform']}", "", "## Energy", ""]
    lines += [f"- {name}: {json.dumps(fields)}" for name, fields in card["energy"].items()] or ["none measured"]
    return "\n".join(lines) + "\n"


def write_card(run_dir: Path) -> tuple[Path, Path]:
    """model_card.json and model_card.md beside merged.h5."""
    card = card_data(load_merged(run_dir / MERGED_NAME))
    json_path, md_path = run_dir / CARD_JSON, run_dir / CARD_MD
    json_path.write_text(json.dumps(card, indent=2, default=str) + "\n")
    md_path.write_text(markdown(card))
    return json_path, md_path
