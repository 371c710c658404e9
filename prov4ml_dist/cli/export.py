"""``prov4ml-dist export``: the provenance as PROV-N, PROV-O Turtle (ttl, with the plain
relation triples SPARQL queries need), JSON-LD (needs rdflib) or a Graphviz graph (dot, svg), and the
points as CSV/TSV for pandas and spreadsheets. Rows are streamed block by block, so a run of
any size exports in little memory."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import h5py

from ..merge.layout import PROV_NAME
from ..paths import atomic_target
from ..provenance import load_document, to_dot
from ..provenance.turtle import write_turtle
from ..shard import schema
from .output import CliError, one_line
from .points import series_table, table_blocks
from .rundir import open_merged, run_directory

FORMATS = ("provn", "ttl", "jsonld", "dot", "svg", "csv", "tsv")
COLUMNS = ("rank", "key", "context", "step", "value", "time")
DOT_TIMEOUT_S = 600


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("export", parents=[common], help="write PROV-N, Turtle, JSON-LD, dot, svg or CSV/TSV",
                            description="Export a merged run: its PROV document as PROV-N, PROV-O Turtle (ttl), "
                                        "JSON-LD (needs rdflib), Graphviz dot or SVG "
                                        "(needs Graphviz's `dot`), or its points as CSV/TSV with the columns "
                                        + ", ".join(COLUMNS) + ".")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a merged run directory (or its prov.json)")
    p.add_argument("--format", "-f", choices=FORMATS, required=True)
    p.add_argument("-o", "--output", metavar="FILE",
                   help="where to write ('-': stdout); default: next to prov.json (prov.provn, prov.ttl, prov.dot, "
                        "prov.svg, metrics.csv, ...)")
    p.add_argument("--table", choices=schema.TABLES, default="metrics",
                   help="csv/tsv: the logged metrics (default) or the sampled system series")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_dir = run_directory(args.run_dir)
    fmt = args.format
    default = f"{args.table}.{fmt}" if fmt in ("csv", "tsv") else Path(PROV_NAME).with_suffix(f".{fmt}").name
    output = args.output if args.output is not None else str(run_dir / default)
    if fmt in ("csv", "tsv"):
        with open_merged(run_dir) as f, _writing(output) as out:
            rows = write_points(f, args.table, out, "\t" if fmt == "tsv" else ",")
        _done(output, f"{rows} rows")
        return 0
    if fmt in ("ttl", "jsonld"):
        return _rdf(_prov_json(run_dir), fmt, output)
    doc = load_document(_prov_json(run_dir))
    if fmt == "svg":
        svg = _svg(to_dot(doc))
        with _writing(output) as out:
            out.write(svg)
    else:
        with _writing(output) as out:
            out.write(doc.get_provn() + "\n" if fmt == "provn" else to_dot(doc))
    _done(output, fmt)
    return 0


def _rdf(prov_json: Path, fmt: str, output: str) -> int:
    """Turtle written by our own streaming writer; JSON-LD from it through rdflib (optional)."""
    try:
        data = json.loads(prov_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"{prov_json}: not a readable PROV-JSON document ({exc})") from None
    if not isinstance(data, dict):
        raise CliError(f"{prov_json}: not a PROV-JSON document (not a JSON object)")
    if fmt == "ttl":
        with _writing(output) as out:
            records = write_turtle(data, out)
        _done(output, f"{records} records")
        return 0
    try:
        import rdflib
    except ImportError:
        raise CliError("JSON-LD needs rdflib (pip install 'prov4ml-dist[rdf]'); `--format ttl` needs nothing") from None
    text = io.StringIO()
    write_turtle(data, text)
    graph = rdflib.Graph().parse(data=text.getvalue(), format="turtle")
    with _writing(output) as out:
        out.write(graph.serialize(format="json-ld"))
    _done(output, f"{len(graph)} triples")
    return 0


def write_points(f: h5py.File, table: str, out: TextIO, delimiter: str) -> int:
    """Every point of ``table`` as one row; returns the number of rows."""
    series = series_table(f, table)
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in series["key"]]
    contexts = [c.decode() if isinstance(c, bytes) else str(c) for c in series["context"]]
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(COLUMNS)
    count = 0
    for block in table_blocks(f, table):
        index = block["series"].tolist()
        writer.writerows(zip(block["rank"].tolist(), (keys[i] for i in index), (contexts[i] for i in index),
                             block["step"].tolist(), block["value"].tolist(), block["time"].tolist(), strict=True))
        count += len(block)
    return count


def _prov_json(run_dir: Path) -> Path:
    path = run_dir / PROV_NAME
    if not path.is_file():
        raise CliError(f"{run_dir} has no {PROV_NAME}: run `prov4ml-dist merge {run_dir}` first")
    return path


def _svg(dot_text: str) -> str:
    dot = shutil.which("dot")
    if dot is None:
        raise CliError("SVG needs Graphviz's `dot`, which is not installed (Debian/Ubuntu: apt-get install "
                       "graphviz); `--format dot` writes the graph without it")
    try:
        done = subprocess.run([dot, "-Tsvg"], input=dot_text, capture_output=True, text=True, check=True,
                              timeout=DOT_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise CliError(f"Graphviz `dot` failed: {one_line(exc.stderr) or exc}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CliError(f"Graphviz `dot` failed: {exc}") from None
    return done.stdout


@contextlib.contextmanager
def _writing(output: str) -> Iterator[TextIO]:
    """stdout for '-'; else a file that appears whole or not at all (never half an export)."""
    if output == "-":
        yield sys.stdout
        return
    with atomic_target(Path(output)) as part, open(part, "w", encoding="utf-8", newline="") as out:
        yield out


def _done(output: str, what: str) -> None:
    if output != "-":
        print(f"wrote {output} ({what})")
