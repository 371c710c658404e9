"""What every command shares: its error type and exit codes, and how numbers, sizes, times and
tables look, so that all commands read alike and fit a 100-column terminal."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence

from ..provenance.terms import timestamp as utc_datetime
from ..shard.schema import attempt_label

EXIT_OK = 0
EXIT_PROBLEMS = 1  # the command ran and found problems (validate failed, merge skipped a shard)
EXIT_USAGE = 2  # it could not run: bad arguments, a wrong path, an unreadable file, no permission

WIDTH = 100


class CliError(Exception):
    """A failure the user can act on: shown as one line on stderr, without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(one_line(message))
        self.code = code


def one_line(text: object) -> str:
    """Messages from HDF5 or the OS can span lines; an error must be one."""
    return " ".join(str(text).split())


def warn(message: str) -> None:
    print(f"warning: {one_line(message)}", file=sys.stderr)


def warn_all(messages: list[str], limit: int = 20, rest: str = "") -> None:
    """At most ``limit`` warnings: a crashed 1000-rank job must not bury the result line."""
    for message in messages[:limit]:
        warn(message)
    if len(messages) > limit:
        warn(f"… and {len(messages) - limit} more{rest}")


def note(message: str) -> None:
    print(f"note: {one_line(message)}", file=sys.stderr)


def number(value: float) -> str:
    """Four significant digits: enough to compare, narrow enough for a table."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:.4g}"


BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def byte_unit(n: float) -> tuple[float, str]:
    """The binary unit that shows ``n`` bytes with at most four digits, and its divisor."""
    power = 0
    while abs(n) >= 1024 ** (power + 1) and power < len(BYTE_UNITS) - 1:
        power += 1
    return 1024.0 ** power, BYTE_UNITS[power]


def size(n: float) -> str:
    divisor, unit = byte_unit(n)
    return f"{n:.0f} B" if divisor == 1 else f"{n / divisor:.1f} {unit}"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def clock(timestamp: float | None) -> str:
    """A unix time as UTC, to the second."""
    when = utc_datetime(timestamp)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when is not None else "-"


def rank_attempt(rank: int, attempt: int, *, word: str = "") -> str:
    """``3``, or ``3 requeue-1.restart-2`` for a later attempt: the names its shard carries,
    never the packed attempt number (1002) that means nothing to a reader."""
    label = attempt_label(attempt)
    return f"{word}{rank} {label}" if label else f"{word}{rank}"


def ranks_text(ranks: Iterable[int]) -> str:
    """``0-3,5,7-9``: a thousand ranks in a few characters."""
    ordered = sorted(set(ranks))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: Sequence[int] = (),
          flex: int = 0, indent: int = 2, width: int = WIDTH) -> list[str]:
    """Aligned columns; numeric columns right-aligned; the ``flex`` column is clipped so the
    table fits ``width``."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    overflow = indent + sum(widths) + 2 * (len(widths) - 1) - width
    if overflow > 0:
        widths[flex] = max(len(headers[flex]), widths[flex] - overflow, 6)

    def line(cells: Sequence[str]) -> str:
        out = [clip(c, w).rjust(w) if i in numeric else clip(c, w).ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return (" " * indent + "  ".join(out)).rstrip()

    return [line(headers), *(line(r) for r in rows)]
