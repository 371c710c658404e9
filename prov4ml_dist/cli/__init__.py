"""``prov4ml-dist``: merge a run offline and look at it without writing Python.

One module per command (``merge_cmd``, ``summary``, ``plot``, ``report_cmd``, ``validate``, ``export``), each
with ``register`` (its arguments) and ``run`` (an exit status). ``main`` turns every error a
person can fix into one line on stderr; ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import Prov4MLError
from . import export, merge_cmd, plot, report_cmd, summary, validate
from .output import EXIT_USAGE, CliError, one_line

COMMANDS = (merge_cmd, summary, plot, report_cmd, validate, export)
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE (e.g. `| head`)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prov4ml-dist", description="Provenance of distributed training runs recorded with prov4ml_dist.",
        epilog="Exit status: 0 success; 1 problems found (validate failed; merge skipped a shard or a file); "
               "2 usage or input error (a wrong path, an unreadable file, no permission, a missing tool).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    # The subcommands take --debug too; SUPPRESS keeps them from resetting one given earlier.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`export ... -o - | head`); say nothing more on a dead pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (CliError, Prov4MLError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        code = exc.code if isinstance(exc, CliError) else EXIT_USAGE
        print(f"prov4ml-dist {args.command}: error: {_describe(exc)}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"prov4ml-dist {args.command}: interrupted", file=sys.stderr)
        return 130


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return one_line(exc)
