"""`tapbox log show FILE [--denied] [--domain NAME] [--flows]`: the command line of reading a
saved event log.

How this works: tapbox.cli.main() sends argv here when its first word is "log" (a command that
is literally named `log` is run in the sandbox as `tapbox -- log ...`). This module reads the
arguments and prints; tapbox.logcmd.show() builds the lines. Exit status: 0, 1 if the log cannot
be read, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tapbox import logcmd
from tapbox.eventlog import LogError
from tapbox.textescape import escape

USAGE = "tapbox log show FILE [--denied] [--domain NAME] [--flows]"
DESCRIPTION = "Read an event log written by tapbox --log (docs/audit.md)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapbox log", usage=USAGE, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="action", required=True, metavar="show")
    show = sub.add_parser("show", prog="tapbox log show", usage=USAGE,
                          description="Print the log's summary table (as at exit), optionally "
                                      "filtered.",
                          help="print the log's summary table (as at exit), optionally filtered")
    show.add_argument("file", metavar="FILE", help="a log written with --log")
    show.add_argument("--denied", action="store_true",
                      help="only destinations with something denied (or 'would deny')")
    show.add_argument("--domain", metavar="NAME",
                      help="only NAME and its subdomains (or an IP address)")
    show.add_argument("--flows", action="store_true",
                      help="also list the matching flows, one per line, with their process")
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    if not argv or argv[0] not in ("show", "-h", "--help"):
        what = f"unknown action {escape(argv[0])!r}" if argv else "no action given"
        print(f"usage: {USAGE}\n{DESCRIPTION}\ntapbox log: {what} (the one action is "
              "'show')", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        lines = logcmd.show(args.file, denied=args.denied, domain=args.domain, flows=args.flows)
    except LogError as exc:
        print(f"tapbox: {exc}", file=sys.stderr)
        return 1
    try:
        for line in lines:
            print(escape(line))
    except BrokenPipeError:
        pass
    return 0
