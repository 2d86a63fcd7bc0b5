"""What happens to a kept layer (`--fs overlay`) when the command ends, and how it is shown.

How this works: `at_exit()` runs once the sandbox is gone (nothing can change the layer any
more), outside any namespace, as the user. It reads the layer (tapbox.isolate.changes) and,
as `--on-exit` says:

- keep (and ask when stdin or stderr is not a terminal): the layer stays; one line on stderr
  says what changed, its id, and the commands to review, commit or discard it;
- commit: everything is committed (tapbox.isolate.commit); what cannot be (conflicts, device
  nodes...) stays in the layer, and the line says so;
- discard: the layer is deleted;
- ask, on a terminal: a summary (added, modified, deleted, bytes; grouped by directory, noise
  such as __pycache__ folded) and a prompt: commit all, review one by one (each change shown,
  a diff for text), keep for later, discard.

A layer with no change is removed without a word (a --changes-dir DIR the user named is left
in place). `log_changes()` writes the changes to the event log (`--log`) as `file_change`
events, before its `exit` event. Everything shown comes from the layer, which the sandbox
wrote: every name is escaped (tapbox.textescape) before it reaches the terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from tapbox.isolate.changes import Change, Changes, group, read_changes, shown
from tapbox.isolate.layerdir import LayerDir
from tapbox.textescape import escape

if TYPE_CHECKING:
    from tapbox.eventlog import EventLog

MAX_LOGGED = 10_000  # file_change events per run, at most (then one saying how many more)


def counts(changes: Changes) -> str:
    """ "2 added, 1 modified, 1 deleted, 4.0 KB" """
    parts = [f"{changes.count(kind)} {kind}" for kind in ("added", "modified", "deleted")
             if changes.count(kind)]
    return ", ".join(parts) + f", {human(changes.bytes)}" if parts else "no changes"


def human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            if unit == "bytes":
                return "1 byte" if size == 1 else f"{size} bytes"
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


def commands(layer: LayerDir) -> str:
    ref = _quote(layer.path if layer.named else layer.id)
    return (f"review with `tapbox changes {ref}`, apply with `tapbox commit {ref}`, drop with "
            f"`tapbox discard {ref}`")


def _quote(text: str) -> str:
    import shlex

    return escape(shlex.quote(text))


def describe(change: Change) -> str:
    """One line for a change: "A file  /path (12 bytes)" -- escaped."""
    mark = {"added": "A", "modified": "M", "deleted": "D"}[change.kind]
    extra = []
    if change.what == "symlink":
        extra.append(f"-> {change.target}")
    elif change.what == "file" and change.kind != "deleted":
        extra.append(human(change.size))
    if change.detail and change.detail != "content":
        extra.append(f"{change.detail} changed" if change.detail != "time" else "time only")
    if change.opaque and change.kind == "modified":
        extra.append("replaced")
    if change.problem:
        extra.append(change.problem)
    tail = f" ({'; '.join(extra)})" if extra else ""
    return escape(f"{mark} {change.what:<7} {change.path}{tail}")


def at_exit(layer: LayerDir, on_exit: str, status: int,
            stdin: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Keep, commit, discard or ask about `layer`; returns the exit status to leave with
    (the command's)."""
    err = stderr or sys.stderr
    changes = read_changes(layer)
    named = layer.named
    if not changes.shown and not changes.incomplete:
        if not named:
            layer.remove()
        elif not changes.items:
            print(f"tapbox: no changes in {escape(layer.path)}", file=err)
        return status
    action = on_exit
    if action == "ask":
        inp = stdin or sys.stdin
        if _interactive(inp, err):
            try:
                _take_terminal(inp)
                action = ask(layer, changes, inp, err)
            except (KeyboardInterrupt, EOFError, OSError):  # Ctrl-C at the prompt: keep it
                err.write("\n")
                action = "keep"
        else:
            action = "keep"
    if action == "commit":
        from tapbox.isolate.commit import commit

        result = commit(layer, changes.items, force=False)
        for line in result.lines():
            print(f"tapbox: {line}", file=err)
        left = read_changes(layer)
        if left.shown:
            print(f"tapbox: the layer {escape(layer.id)} keeps what was not committed "
                  f"({counts(left)}): {commands(layer)}", file=err)
        elif not named:
            layer.remove()
    elif action == "discard":
        layer.remove()
        print(f"tapbox: discarded {counts(changes)}", file=err)
    elif action == "keep":
        what = counts(changes) + (f"; {changes.incomplete}" if changes.incomplete else "")
        print(f"tapbox: the command's changes ({what}) are kept in layer {escape(layer.id)}: "
              f"{commands(layer)}", file=err)
    return status


def _interactive(inp: TextIO, err: TextIO) -> bool:
    try:
        return inp.isatty() and err.isatty()
    except (AttributeError, ValueError):
        return False


def _take_terminal(inp: TextIO) -> None:
    """Be the terminal's foreground process group again (a shell in the sandbox may have left
    its own there), so that reading the answer does not stop tapbox with SIGTTIN."""
    import os
    import signal

    fd = inp.fileno()
    if os.tcgetpgrp(fd) == os.getpgrp():
        return
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(fd, os.getpgrp())
    finally:
        signal.signal(signal.SIGTTOU, old)


def summary(changes: Changes) -> list[str]:
    lines = [f"the command changed files: {counts(changes)}"]
    if changes.incomplete:
        lines.append(escape(changes.incomplete))
    for directory, n in group(changes.shown):
        lines.append(escape(f"  {n:>6}  {directory}"))
    return lines


def ask(layer: LayerDir, changes: Changes, inp: TextIO, err: TextIO) -> str:
    """The prompt on a terminal; returns the action left to do ("keep", "commit",
    "discard"), or "done" when the review committed what the user chose."""
    for line in summary(changes):
        print(f"tapbox: {line}", file=err)
    answer = _prompt(inp, err, "tapbox: [c]ommit all, [r]eview one by one, [k]eep for "
                               "later, [d]iscard? ", "crkd", "k")
    if answer == "c":
        return "commit"
    if answer == "d":
        return "discard"
    if answer == "k":
        return "keep"
    return review(layer, changes, inp, err)


def review(layer: LayerDir, changes: Changes, inp: TextIO, err: TextIO) -> str:
    """Each change in turn, with its diff: commit it, leave it in the layer, or stop."""
    from tapbox.isolate.commit import commit

    chosen: list[Change] = []
    items = [c for c in changes.items if shown(c)]
    for number, change in enumerate(items, 1):
        print(f"tapbox: [{number}/{len(items)}] {describe(change)}", file=err)
        for line in diff_lines(layer, change, limit=40):
            print(f"    {line}", file=err)
        answer = _prompt(inp, err, "tapbox: commit this one? [y]es, [n]o (keep it in the "
                                   "layer), [q]uit reviewing ", "ynq", "n")
        if answer == "q":
            break
        if answer == "y":
            chosen.append(change)
    if chosen:
        result = commit(layer, _with_parents(changes.items, chosen), force=False)
        for line in result.lines():
            print(f"tapbox: {line}", file=err)
    left = read_changes(layer)
    if left.shown:
        print(f"tapbox: left in layer {escape(layer.id)} ({counts(left)}): "
              f"{commands(layer)}", file=err)
    elif not layer.named:
        layer.remove()
    return "done"


def _with_parents(items: Sequence[Change], chosen: Sequence[Change]) -> list[Change]:
    """The chosen changes; a chosen directory also takes what is in it."""
    out = []
    for change in items:
        if change in chosen or any(c.what == "dir" and change.path.startswith(c.path + "/")
                                   for c in chosen):
            out.append(change)
    return out


def _prompt(inp: TextIO, err: TextIO, text: str, choices: str, default: str) -> str:
    while True:
        err.write(text)
        err.flush()
        line = inp.readline()
        if not line:  # end of input: the safe choice
            err.write("\n")
            return default
        answer = line.strip().lower()[:1]
        if answer in choices:
            return answer
        print(f"tapbox: please answer one of: {', '.join(choices)}", file=err)


def diff_lines(layer: LayerDir, change: Change, limit: int = 200) -> list[str]:
    """What a change looks like: a unified diff for text, size and type otherwise (escaped,
    at most `limit` lines)."""
    from tapbox.isolate.commit import read_host, read_layer

    if change.kind == "deleted" or change.what != "file":
        return []
    new = read_layer(layer, change)
    old = read_host(change.path) if change.kind == "modified" else b""
    if new is None or old is None:
        return [f"{change.what}, {human(change.size)} (too large or unreadable to show)"]
    if b"\0" in new or b"\0" in old:
        return [f"binary, {human(len(old))} -> {human(len(new))}"] if change.kind == \
            "modified" else [f"binary, {human(len(new))}"]
    import difflib

    a = old.decode("utf-8", "replace").splitlines()
    b = new.decode("utf-8", "replace").splitlines()
    name = escape(change.path)
    lines = list(difflib.unified_diff(a, b, "/dev/null" if change.kind == "added" else name,
                                      name, lineterm="", n=2))
    if len(lines) > limit:
        lines = [*lines[:limit], f"... {len(lines) - limit} more lines"]
    return [escape(line) for line in lines]


def log_changes(layer: LayerDir, log: EventLog, clock: Callable[[], float] = time.time) -> None:
    """The layer's changes as `file_change` events of the event log."""
    changes = read_changes(layer)
    now = round(clock(), 6)
    logged = 0
    for change in changes.shown:
        if logged >= MAX_LOGGED:
            log.write({"event": "file_changes_truncated", "time": now,
                       "more": len(changes.shown) - logged})
            break
        event: dict[str, object] = {"event": "file_change", "time": now, "layer": layer.id,
                                    "change": change.kind, "path": change.path,
                                    "type": change.what}
        if change.what == "file" and change.kind != "deleted":
            event["size"] = change.size
        if change.what == "symlink":
            event["target"] = change.target
        if change.detail:
            event["detail"] = change.detail
        log.write(event)
        logged += 1
