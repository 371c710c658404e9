"""The report as one HTML file: the page model as JSON, the vendored libraries (uPlot,
cytoscape), the page's own script and styles, all inlined — opened from disk, it loads
nothing from anywhere."""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

VENDOR_SCRIPTS = ("vendor/uPlot.iife.min.js", "vendor/cytoscape.min.js")
VENDOR_STYLES = ("vendor/uPlot.min.css",)
# The browser itself refuses any fetch: everything the page needs is inline.
POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
          "connect-src 'none'")


def _text(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _inline_script(source: str) -> str:
    """Script text that cannot end its own <script> element early."""
    return source.replace("</script", "<\\/script")


def fixed_bytes() -> int:
    """The bytes every report carries whatever the run: libraries, the page's script and styles."""
    return sum(len(_text(name).encode()) for name in (*VENDOR_SCRIPTS, *VENDOR_STYLES, "app.js", "app.css")) + 2048


def render(model: dict[str, Any]) -> str:
    """The whole page."""
    data = json.dumps(model, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    title = html.escape(f"{model['overview']['experiment']} / {model['overview']['run_id']} - prov4ml-dist report")
    styles = "\n".join(_text(name) for name in (*VENDOR_STYLES, "app.css"))
    scripts = "\n".join(f"<script>{_inline_script(_text(name))}</script>" for name in VENDOR_SCRIPTS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
<title>{title}</title>
<style>{styles}</style>
</head><body>
<header><h1></h1><div class="sub"></div><nav></nav></header>
<main></main>
<footer></footer>
<script type="application/json" id="report-data">{data}</script>
{scripts}
<script>{_inline_script(_text("app.js"))}</script>
</body></html>
"""
