"""The `tapbox` command: argv in, exit status out; everything else happens elsewhere.

How this works: `tapbox log ...` goes to tapbox.cli.log (reading a saved event log), `tapbox
changes|commit|discard ...` to tapbox.cli.changes (the kept layers of --fs overlay); any other
command line is translated into RunOptions by tapbox.cli.args and run by tapbox.runner. A
TapboxError is printed as one line after "tapbox: " and becomes its exit status (125); a usage
error exits 125 too, after argparse's usage text. The exit statuses are defined in
tapbox.errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from tapbox.cli.args import build_parser, parse_args
from tapbox.errors import EXIT_TAPBOX_FAILED, TapboxError

__all__ = ["build_parser", "entry", "main", "parse_args"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "log":  # `tapbox log show FILE`; a command named log: tapbox -- log
        from tapbox.cli.log import main as log_main

        return log_main(argv[1:])
    if argv and argv[0] in ("changes", "commit", "discard"):  # the layers of --fs overlay
        from tapbox.cli.changes import main as changes_main

        return changes_main(argv[0], argv[1:])
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exc:  # argparse: usage errors are tapbox's own failure
            code = exc.code if isinstance(exc.code, int) else EXIT_TAPBOX_FAILED
            return EXIT_TAPBOX_FAILED if code == 2 else code
        from tapbox.runner import run

        return run(args.command, args.options)
    except TapboxError as exc:
        from tapbox.textescape import escape

        text = escape(exc)  # it may quote a line of a file the sandbox could have written
        print(text if text.startswith("tapbox:") else f"tapbox: {text}", file=sys.stderr)
        return exc.exit_status


def entry() -> None:
    """The `tapbox` command: run, then leave without the interpreter's teardown (module
    clean-up and garbage collection cost tens of milliseconds on every sandboxed command;
    everything tapbox writes is flushed or closed by then)."""
    status = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
