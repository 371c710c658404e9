"""Merged run → W3C PROV document → PROV-JSON, PROV-N, Turtle or Graphviz dot."""

from .builder import build_document, build_prov_json
from .export import load_document, to_dot, write_dot, write_graph, write_prov_json, write_provn

__all__ = ["build_document", "build_prov_json", "load_document", "to_dot", "write_dot", "write_graph",
           "write_prov_json", "write_provn"]
