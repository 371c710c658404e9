"""Progress of a long merge, for a person watching: a live line on a terminal; in a pipe or a
batch log, nothing for a quick merge and an occasional plain line once it takes a while (a
log full of carriage returns is unreadable)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

STAGES = {"scan": "reading shards", "copy": "copying points", "crossrank": "cross-rank statistics",
          "prov": "writing prov.json"}


class MergeProgress:
    """``merge_run``'s ``progress`` callback. ``finish`` clears the live line."""

    def __init__(self, stream: TextIO, *, quiet_for: float = 1.0, log_every: float = 5.0,
                 live_every: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.quiet_for, self.log_every, self.live_every = quiet_for, log_every, live_every
        self.clock = clock
        self.started = clock()
        self.shown_at = -float("inf")
        self.shown_stage = ""
        self.width = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        elapsed = now - self.started
        changed = stage != self.shown_stage
        if self.live:
            due = changed or now - self.shown_at >= self.live_every or done == total
        else:
            due = elapsed >= self.quiet_for and (changed or now - self.shown_at >= self.log_every)
        if not due:
            return
        text = f"merging: {STAGES.get(stage, stage)} {done}/{total} ({elapsed:.0f} s)"
        if self.live:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown_at, self.shown_stage = now, stage

    def finish(self) -> None:
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
