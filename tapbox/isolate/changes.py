"""Reading a kept layer: what the command added, modified and deleted, compared with the host.

How this works: `read_changes()` walks each upper directory of a layer (tapbox.isolate.layerdir)
and, alongside it, the host directory it lies over, both through directory descriptors opened
one component at a time with O_NOFOLLOW: no symlink in the layer or on the host is ever
followed. Each entry of the layer becomes a `Change`, in the order a commit applies them
(preorder, a directory before what is in it):

- an overlayfs whiteout (a character device 0/0) over a host entry: "deleted";
- a directory marked opaque (the xattr `user.overlay.opaque` = "y", as overlayfs writes it with
  `userxattr`): the command removed the host's directory and made a new one; the host's
  entries that the layer does not have are "deleted" (one Change each, for the whole subtree);
- an entry the host does not have: "added" (a directory's contents then all are "added");
- an entry the host has: "modified", with what changed in `detail` (content, mode, type, link
  target, or only the time); one with nothing changed (a directory copied up on the way to a
  change below it, a file opened for writing and left as it was) has no detail and is not
  shown (a commit only takes it out of the layer).

The layer was written by the sandbox: its names may hold any byte but "/" and NUL (they are
str with surrogate escapes here, and escaped by whoever shows them: tapbox.textescape), its
files may be symlinks pointing anywhere (never followed), device nodes or setuid files (a
`problem` says why they are not committed), and it may be huge or deep: the walk stops after
MAX_ENTRIES entries or below MAX_DEPTH levels and says so (`Changes.incomplete`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from tapbox.isolate.layerdir import LayerDir

MAX_ENTRIES = 1_000_000
MAX_DEPTH = 200
COMPARE_LIMIT = 64 << 20  # bytes: larger files of the same size are not compared byte by byte
OPAQUE_XATTR = "user.overlay.opaque"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Change(NamedTuple):
    kind: str  # "added", "modified", "deleted"
    path: str  # the host path
    what: str  # "file", "dir", "symlink", "fifo", "device", "socket"
    layer: int  # the upper directory it is in
    rel: str  # its path in that upper directory ("" for the host directory itself)
    size: int = 0  # a file's size in the layer
    detail: str = ""  # modified: what changed ("content", "mode", "type", "time", "target")
    target: str = ""  # a symlink's target
    opaque: bool = False  # a directory replacing the host's (its other entries are deleted)
    whiteout: bool = False  # deleted by a whiteout in the layer (else: below an opaque dir)
    problem: str = ""  # why it cannot be committed


class Changes:
    def __init__(self) -> None:
        self.items: list[Change] = []
        self.incomplete = ""  # why the walk stopped early, if it did
        self.unreadable: list[str] = []  # directories of the layer that could not be read

    @property
    def shown(self) -> list[Change]:
        """The changes a user is shown: not the directories only copied up on the way to a
        change below them, not the whiteouts of what the host no longer has."""
        return [c for c in self.items if shown(c)]

    def count(self, kind: str) -> int:
        return sum(1 for c in self.shown if c.kind == kind)

    @property
    def bytes(self) -> int:
        """What the shown changes hold: the sizes of the files added or modified."""
        return sum(c.size for c in self.shown if c.kind != "deleted")

    def __bool__(self) -> bool:
        return bool(self.items)


def shown(change: Change) -> bool:
    """Not a whiteout of nothing, not an entry identical to the host's (a directory copied up
    on the way to a change below it, a file opened for writing and left as it was)."""
    return change.what != "gone" and not (change.kind == "modified" and not change.detail)


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "device"


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def open_path(path: str, flags: int = PATH_FLAGS, dir_fd: int | None = None) -> int:
    """Open `path` (absolute, or relative to dir_fd) one component at a time with O_NOFOLLOW:
    OSError (ELOOP, ENOTDIR) if any component is a symlink or not a directory."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", flags) if dir_fd is None or path.startswith("/") else os.dup(dir_fd)
    try:
        for part in parts:
            if part in (".", ".."):
                raise OSError(22, f"{part!r} in a path", path)
            new = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = new
    except BaseException:
        os.close(fd)
        raise
    return fd


def problem_of(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node: not committed"
    if stat.S_ISSOCK(mode):
        return "a socket: not committed"
    if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(mode):
        return "setuid/setgid: not committed (remove the bit in the sandbox, or copy it " \
               "yourself)"
    return ""


def read_changes(layer: LayerDir) -> Changes:
    """Every change in `layer` against the host as it is now."""
    found = Changes()
    budget = [MAX_ENTRIES]
    for number, directory in enumerate(layer.dirs):
        try:
            top = os.open(layer.upper(number), DIR_FLAGS)
        except OSError:
            continue  # this run did not mount it (or nothing was ever written there)
        try:
            host = open_path(directory)
        except OSError:
            host = None
        try:
            _walk(found, number, directory, top, host, "", 0, is_opaque(top), budget)
        finally:
            os.close(top)
            if host is not None:
                os.close(host)
        if found.incomplete:
            break
    return found


def _walk(found: Changes, number: int, base: str, fd: int, host: int | None, rel: str,
          depth: int, opaque: bool, budget: list[int]) -> None:
    """The changes in the layer directory `fd` (its path `rel` below upper/N), whose host
    counterpart is `host` (None: the host has no directory there)."""
    try:
        names = sorted(entry.name for entry in os.scandir(fd))
    except OSError:
        found.unreadable.append(_join(base, rel))
        return
    if opaque and host is not None:  # the host's entries the layer does not have: deleted
        for name in _host_names(host):
            if name not in names:
                hst = _lstat(name, host)
                if hst is not None:
                    found.items.append(Change("deleted", _join(base, _join(rel, name)),
                                              kind_of(hst.st_mode), number, _join(rel, name)))
    for name in names:
        budget[0] -= 1
        if budget[0] < 0:
            found.incomplete = f"more than {MAX_ENTRIES} entries: only the first are listed"
            return
        path = _join(rel, name)
        where = _join(base, path)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue
        hst = _lstat(name, host) if host is not None else None
        if is_whiteout(st):
            if hst is not None:
                found.items.append(Change("deleted", where, kind_of(hst.st_mode), number, path,
                                          whiteout=True))
            else:  # nothing left to delete: listed for the commit to tidy up, not shown
                found.items.append(Change("deleted", where, "gone", number, path,
                                          whiteout=True))
            continue
        what = kind_of(st.st_mode)
        target = ""
        if what == "symlink":
            try:
                target = os.readlink(name, dir_fd=fd)
            except OSError:
                target = "?"
        problem = problem_of(st)
        size = st.st_size if what == "file" else 0
        if what != "dir":
            if hst is None:
                found.items.append(Change("added", where, what, number, path, size,
                                          target=target, problem=problem))
            else:
                detail = _difference(st, hst, name, fd, host, target)
                found.items.append(Change("modified", where, what, number, path, size, detail,
                                          target, problem=problem))
            continue
        if depth >= MAX_DEPTH:
            found.incomplete = f"directories nested deeper than {MAX_DEPTH} levels " \
                               f"({where}...): not listed"
            continue
        try:
            sub = os.open(name, DIR_FLAGS, dir_fd=fd)
        except OSError:
            found.unreadable.append(where)
            continue
        sub_opaque = is_opaque(sub)
        host_sub = None
        if hst is not None and stat.S_ISDIR(hst.st_mode):
            assert host is not None
            try:
                host_sub = os.open(name, PATH_FLAGS, dir_fd=host)
            except OSError:
                host_sub = None
        if hst is None:
            found.items.append(Change("added", where, "dir", number, path))
        elif not stat.S_ISDIR(hst.st_mode):
            found.items.append(Change("modified", where, "dir", number, path, detail="type",
                                      opaque=True))
        else:
            mode_changed = stat.S_IMODE(st.st_mode) != stat.S_IMODE(hst.st_mode)
            found.items.append(Change("modified", where, "dir", number, path,
                                      detail="mode" if mode_changed else "",
                                      opaque=sub_opaque))
        try:
            _walk(found, number, base, sub, host_sub, path, depth + 1,
                  sub_opaque or host_sub is None, budget)
        finally:
            os.close(sub)
            if host_sub is not None:
                os.close(host_sub)
        if found.incomplete and budget[0] < 0:
            return


def _difference(st: os.stat_result, hst: os.stat_result, name: str, fd: int, host: int | None,
                target: str) -> str:
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(hst.st_mode):
        return "type"
    if stat.S_ISLNK(st.st_mode):
        assert host is not None
        try:
            return "target" if os.readlink(name, dir_fd=host) != target else "time"
        except OSError:
            return "target"
    if stat.S_ISREG(st.st_mode):
        if st.st_size != hst.st_size or not _same_content(name, fd, host, st.st_size):
            return "content"
    if stat.S_IMODE(st.st_mode) != stat.S_IMODE(hst.st_mode):
        return "mode"
    if st.st_mtime_ns != hst.st_mtime_ns:
        return "time"
    return ""  # copied up (opened for writing) but unchanged: not shown


def _same_content(name: str, fd: int, host: int | None, size: int) -> bool:
    if host is None or size > COMPARE_LIMIT:
        return False
    try:
        a = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return False
    try:
        host_dir = os.open(".", DIR_FLAGS, dir_fd=host)  # an O_PATH fd opens nothing itself
    except OSError:
        os.close(a)
        return False
    try:
        b = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                    dir_fd=host_dir)
    except OSError:
        os.close(a)
        os.close(host_dir)
        return False
    os.close(host_dir)
    try:
        while True:
            x, y = os.read(a, 1 << 20), os.read(b, 1 << 20)
            if x != y:
                return False
            if not x:
                return True
    except OSError:
        return False
    finally:
        os.close(a)
        os.close(b)


def _host_names(host: int) -> list[str]:
    try:
        fd = os.open(".", DIR_FLAGS, dir_fd=host)
    except OSError:
        return []
    try:
        return sorted(entry.name for entry in os.scandir(fd))
    except OSError:
        return []
    finally:
        os.close(fd)


def _lstat(name: str, host: int | None) -> os.stat_result | None:
    if host is None:
        return None
    try:
        return os.stat(name, dir_fd=host, follow_symlinks=False)
    except OSError:
        return None


def _join(base: str, name: str) -> str:
    if not name:
        return base
    if not base:
        return name
    return base.rstrip("/") + "/" + name


def select(changes: Iterable[Change], paths: Iterable[str]) -> Iterator[Change]:
    """The changes at or below any of `paths` (absolute host paths); all without paths."""
    wanted = [p.rstrip("/") or "/" for p in paths]
    for change in changes:
        if not wanted or any(change.path == p or change.path.startswith(p.rstrip("/") + "/")
                             for p in wanted):
            yield change


# Names of noise: folded into one line each in a summary.
NOISE = ("__pycache__", ".cache", "node_modules", ".git", ".npm", ".pytest_cache", ".mypy_cache",
         ".ruff_cache", ".tox", ".venv")


def group(changes: Iterable[Change], limit: int = 12) -> list[tuple[str, int]]:
    """(directory, number of changes) for a summary: changes below a noise directory counted
    under it, the others under their own directory; the largest groups first, at most
    `limit` (the rest as one group "...")."""
    counts: dict[str, int] = {}
    for change in changes:
        if not shown(change):
            continue
        parts = change.path.split("/")
        key = os.path.dirname(change.path) or "/"
        for i, part in enumerate(parts[:-1]):
            if part in NOISE:
                key = "/".join(parts[:i + 1])
                break
        counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if len(ranked) > limit:
        rest = sum(n for _k, n in ranked[limit - 1:])
        ranked = [*ranked[:limit - 1], (f"{len(ranked) - limit + 1} more directories", rest)]
    return ranked
