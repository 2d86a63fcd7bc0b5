"""What the command wrote to its copy-on-write home, counted once the sandbox is gone.

How this works: in the project view the home directory is an overlay (or, where something is
mounted in it, several: one per directory) whose upper layers are on a tmpfs of their own
(tapbox.isolate.mounts); pid 1 hands tapbox a descriptor of that tmpfs, so it outlives the
sandbox's mount namespace. After the sandbox has exited (nothing can change the
layer any more), `count()` walks it through that descriptor -- openat() with O_NOFOLLOW from
entry to entry, never a path, never a symlink followed -- and `describe()` makes the one line
tapbox prints: how many files were written (and removed) under which places of the home,
and how to keep them next time. Closing the descriptor frees the tmpfs.

The layer was written by the sandbox: its names are escaped before they are printed, and the
walk is bounded (LIMIT entries) so a layer of millions of files cannot hold tapbox up at exit.
What is counted: every non-directory (files, symlinks...) except overlay whiteouts, which are
counted as removals; directories alone (created empty, or copied up on the way to a file) are
not.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from tapbox.textescape import escape

LIMIT = 100_000  # entries looked at, at most
SHOWN = 3  # places named in the line, at most


class Discarded:
    """What count() found (a plain class: defined at every exit, a dataclass costs more)."""

    def __init__(self, files: int = 0, removed: int = 0, places: dict[str, int] | None = None,
                 directories: set[str] | None = None) -> None:
        self.files = files  # written (every non-directory but whiteouts)
        self.removed = removed  # whiteouts: files of the home the command removed
        self.places = places or {}  # first name under home -> changes
        self.directories = directories or set()  # the places that are directories
        self.truncated = False  # LIMIT reached: there is more
        self.unreadable = 0  # directories of the layer tapbox could not open

    @property
    def changes(self) -> int:
        return self.files + self.removed


def count(layers_fd: int, layers: Sequence[str], home: str) -> Discarded:
    """Count the changes in the copy-on-write layers under `layers_fd` (a directory
    descriptor, not closed): N/upper is the layer of the directory layers[N], a path below
    `home` (or `home` itself)."""
    found = Discarded()
    budget = [LIMIT]
    for number, directory in enumerate(layers):
        relative = os.path.relpath(directory, home)
        place = None if relative == "." else relative.split("/", 1)[0]
        if place is not None:
            found.directories.add(place)
        try:
            upper = _open_dir(f"{number}/upper", layers_fd)
        except OSError:
            found.unreadable += 1
            continue
        _walk(upper, place, found, budget)
        if found.truncated:
            break
    return found


def _walk(top: int, place: str | None, found: Discarded, budget: list[int]) -> None:
    """Count below the directory `top` (closed here)."""
    stack: list[tuple[int, str | None]] = [(top, place)]
    try:
        while stack:
            fd, place = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        budget[0] -= 1
                        if budget[0] < 0:
                            found.truncated = True
                            return
                        where = place if place is not None else entry.name
                        if entry.is_dir(follow_symlinks=False):
                            try:
                                stack.append((_open_dir(entry.name, fd), where))
                            except OSError:
                                found.unreadable += 1
                                continue
                            if place is None:
                                found.directories.add(where)
                            continue
                        if _is_whiteout(entry):
                            found.removed += 1
                        else:
                            found.files += 1
                        found.places[where] = found.places.get(where, 0) + 1
            except OSError:
                found.unreadable += 1
            finally:
                os.close(fd)
    finally:
        for fd, _place in stack:
            os.close(fd)


def _open_dir(path: str, dir_fd: int) -> int:
    """openat() each component with O_NOFOLLOW: never out of the layer by a symlink."""
    fd = dir_fd
    try:
        for part in path.split("/"):
            new = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = new
    except OSError:
        if fd != dir_fd:
            os.close(fd)
        raise
    return fd


def _is_whiteout(entry: os.DirEntry[str]) -> bool:
    if entry.is_file(follow_symlinks=False) or entry.is_symlink():
        return False
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def describe(found: Discarded, home: str = "~") -> str | None:
    """The line saying what was discarded, or None if nothing was."""
    if not found.changes:
        return None
    at_least = "at least " if found.unreadable else "more than " if found.truncated else ""
    what = _count(found.files, "file", "written") if found.files else ""
    if found.removed:
        what += (" and " if what else "") + _count(found.removed, "file", "removed")
    ranked = sorted(found.places.items(), key=lambda item: (-item[1], item[0]))
    names = [escape(f"{home}/{name}") for name, _n in ranked]
    verb = "was" if found.changes == 1 and not at_least else "were"
    if len(ranked) == 1:
        where = f"under {names[0]}" if ranked[0][0] in found.directories else f"to {names[0]}"
        line = f"{at_least}{what} {where} {verb} discarded"
    else:
        parts = [f"{name}: {n}" for name, (_p, n) in zip(names, ranked[:SHOWN], strict=False)]
        more = len(ranked) - len(parts)
        if more:
            parts.append(f"{more} more place{'s' if more > 1 else ''}")
        line = f"{at_least}{what} in your home {verb} discarded ({', '.join(parts)})"
    return (f"{line}: the sandbox's home is copy-on-write; keep such changes next time with "
            f"--write {names[0]}, or review them before they are kept with --fs overlay")


def _count(n: int, noun: str, verb: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'} {verb}"
