"""`tapbox changes`, `tapbox commit`, `tapbox discard`: the kept layers of `--fs overlay`.

How this works: each subcommand finds a layer by its id (under $XDG_DATA_HOME/tapbox/changes)
or by its directory (--changes-dir), reads it (tapbox.isolate.changes) and prints it, commits
it (tapbox.isolate.commit) or deletes it. This runs as the user, outside any namespace.
Everything printed that comes from a layer or its metadata is escaped (tapbox.textescape).

Exit status: 0; 1 when `commit` left something in the layer (a conflict, a refused or failed
change); 125 when the layer cannot be found or read, or the command line is wrong.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence

from tapbox.errors import EXIT_TAPBOX_FAILED
from tapbox.isolate import layerdir
from tapbox.isolate.changes import read_changes, select
from tapbox.textescape import escape

COMMANDS = ("changes", "commit", "discard")


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tapbox {command}")
    if command == "changes":
        parser.description = ("List the kept layers of --fs overlay, or what one of them "
                              "changed (docs/overlay.md).")
        parser.add_argument("layer", nargs="?", metavar="ID|DIR")
        parser.add_argument("--diff", action="store_true",
                            help="show a diff of each changed text file")
        parser.add_argument("paths", nargs="*", metavar="PATH",
                            help="only the changes at or below these host paths")
    elif command == "commit":
        parser.description = ("Apply a kept layer (or the changes at or below PATHs) to your "
                              "files; what is applied leaves the layer.")
        parser.add_argument("layer", metavar="ID|DIR")
        parser.add_argument("paths", nargs="*", metavar="PATH")
        parser.add_argument("--force", action="store_true",
                            help="overwrite files changed on the host since the run started")
    else:
        parser.description = "Delete a kept layer."
        parser.add_argument("layer", metavar="ID|DIR")
    return parser


def main(command: str, argv: Sequence[str]) -> int:
    parser = build_parser(command)
    try:
        args = parser.parse_intermixed_args(list(argv))
    except SystemExit as exc:
        return EXIT_TAPBOX_FAILED if exc.code == 2 else int(exc.code or 0)
    try:
        if command == "changes" and args.layer is None:
            return list_layers()
        layer = layerdir.find(args.layer)
        paths = [host_path(p) for p in getattr(args, "paths", [])]
        if command == "changes":
            return show(layer, paths, args.diff)
        if command == "commit":
            return commit(layer, paths, args.force)
        layer.remove()
        print(f"tapbox: discarded layer {escape(layer.id)}", file=sys.stderr)
        return 0
    except layerdir.LayerError as exc:
        print(f"tapbox: {escape(exc)}", file=sys.stderr)
        return EXIT_TAPBOX_FAILED
    except OSError as exc:
        print(f"tapbox: {escape(exc.filename or '')}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_TAPBOX_FAILED


def host_path(given: str) -> str:
    """A PATH as the user wrote it, as the layer names it: absolute, its directory resolved
    (the last component is not: it may be a symlink the layer changed)."""
    path = os.path.abspath(os.path.expanduser(given))
    if path == "/":
        return path
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def list_layers() -> int:
    from tapbox.review import counts

    found = False
    for layer in layerdir.all_layers():
        found = True
        if isinstance(layer, layerdir.LayerError):
            print(f"?  {escape(layer)}")
            continue
        meta = layer.meta
        started = meta.get("started")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) \
            if isinstance(started, int | float) else "?"
        status = meta.get("status")
        command = meta.get("command")
        shown = shlex.join(str(c) for c in command) if isinstance(command, list) else "?"
        changes = read_changes(layer)
        print(escape(f"{layer.id}  {when}  exit {status if status is not None else '?'}  "
                     f"{counts(changes)}  {shown}"))
    if not found:
        print(f"no kept layers in {escape(layerdir.changes_root())}", file=sys.stderr)
    return 0


def show(layer: layerdir.LayerDir, paths: list[str], diff: bool) -> int:
    from tapbox.review import counts, describe, diff_lines

    changes = read_changes(layer)
    meta = layer.meta
    command = meta.get("command")
    print(escape(f"layer {layer.id}: "
                 f"{shlex.join(str(c) for c in command) if isinstance(command, list) else '?'}"
                 f" (in {meta.get('cwd')}, exit {meta.get('status')})"))
    print(f"{counts(changes)}")
    if changes.incomplete:
        print(escape(changes.incomplete))
    items = [c for c in select(changes.shown, paths)]
    # Deletions first, as a commit applies them.
    for change in [c for c in items if c.kind == "deleted"] + \
            [c for c in items if c.kind != "deleted"]:
        print(describe(change))
        if diff:
            for line in diff_lines(layer, change):
                print(f"    {line}")
    return 0


def commit(layer: layerdir.LayerDir, paths: list[str], force: bool) -> int:
    from tapbox.isolate.commit import commit as apply
    from tapbox.review import commands, counts

    changes = read_changes(layer)
    items = list(select(changes.items, paths))
    if paths and not any(c for c in items if c.what != "gone"):
        print("tapbox: nothing in the layer at or below " +
              ", ".join(escape(p) for p in paths), file=sys.stderr)
        return 1
    result = apply(layer, items, force=force)
    for line in result.lines():
        print(f"tapbox: {line}", file=sys.stderr)
    left = read_changes(layer)
    if not left.shown and not left.incomplete:
        if not layer.named:
            layer.remove()
        print(f"tapbox: layer {escape(layer.id)} fully committed"
              f"{'' if layer.named else ' and removed'}", file=sys.stderr)
    else:
        print(f"tapbox: left in layer {escape(layer.id)}: {counts(left)}; "
              f"{commands(layer)}", file=sys.stderr)
    return 0 if result.ok else 1
