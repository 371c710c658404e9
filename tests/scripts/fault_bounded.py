"""Untrusted input through the library, in a process the tests bound in memory and time.

    fault_bounded.py read SHARD...       ShardReader: open, every row, every journal record
    fault_bounded.py merge RUN_DIR...    merge_run, then load_merged of what it wrote

One JSON line per argument: ``{"path", "outcome", "type", "message", "problems", "seconds"}``
where ``outcome`` is ``ok``, ``refused`` (a ``Prov4MLError``: the documented way to fail) or
``crash`` (anything else: a bug). A segfault or a hang shows as the process's exit status.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prov4ml_dist.errors import Prov4MLError
from prov4ml_dist.merge import load_merged, merge_run
from prov4ml_dist.shard import ShardReader, schema


def read(path: Path) -> list[str]:
    with ShardReader(path) as reader:
        for table in schema.TABLES:
            for _ in reader.iter_rows(table):
                pass
        for _ in reader.records():
            pass
    return []


def merge(path: Path) -> list[str]:
    result = merge_run(path)
    load_merged(result.merged_h5)
    return result.problems


def main() -> None:
    action = {"read": read, "merge": merge}[sys.argv[1]]
    for arg in sys.argv[2:]:
        started = time.monotonic()
        outcome = {"path": arg, "outcome": "ok", "type": None, "message": None, "problems": []}
        try:
            outcome["problems"] = action(Path(arg))
        except Prov4MLError as exc:
            outcome.update(outcome="refused", type=type(exc).__name__, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - reported: the test fails on it
            outcome.update(outcome="crash", type=type(exc).__name__, message=str(exc)[:500])
        outcome["seconds"] = time.monotonic() - started
        print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
