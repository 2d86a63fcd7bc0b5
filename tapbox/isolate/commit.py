"""Committing a kept layer to the host: safely, outside any namespace, as the user.

How this works: `commit()` takes changes read from a layer (tapbox.isolate.changes) and applies
them to the host in three passes:

1. check: a change whose host entry changed after the run started (its ctime is not older
   than the layer's baseline, the ctime of a file tapbox made at the start; for a directory
   being deleted or replaced, any entry below it) is a conflict and is left alone unless
   `force`; so is a host path that now leads through a symlink. Device nodes, sockets and
   setuid/setgid files are refused (the `problem` the reading found).
2. deletions first (whiteouts, and the host entries an opaque directory drops), then
   everything else in order, a directory before its contents. Every host path is reached
   from its layer's host directory one component at a time with O_NOFOLLOW (directory
   descriptors, then the *at() calls), so a symlink -- one the command planted in the layer,
   or one on the host -- is never followed: a layer cannot write outside the paths it shows.
   A file is written to a temporary name in its directory, given its mode (without
   setuid/setgid) and mtime, synced, and renamed over the old one: a crash leaves the old file
   or the new, never half of one. Symlinks are committed as symlinks (their target is not
   looked at), FIFOs as FIFOs, directories get their mode and mtime once their contents are in.
   Names hard-linked in the layer are committed as hard links (copies where the host cannot
   link them, as across filesystems).
3. each committed change is removed from the layer, and directories of the layer left empty
   are removed: a partial commit leaves the rest, and committing again finds nothing to do.

One change failing (a full disk, a permission) is reported and the others go on.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from tapbox.isolate.changes import (
    DIR_FLAGS,
    MAX_ENTRIES,
    OPAQUE_XATTR,
    PATH_FLAGS,
    Change,
    open_path,
    shown,
)
from tapbox.isolate.layerdir import LayerDir, remove_tree
from tapbox.textescape import escape

SHOW_LIMIT = 1 << 20  # bytes: larger files are not read for a diff
TEMP_PREFIX = ".tapbox-commit-"


class Result:
    def __init__(self) -> None:
        self.committed: list[Change] = []
        self.conflicts: list[tuple[Change, str]] = []
        self.refused: list[tuple[Change, str]] = []
        self.failed: list[tuple[Change, str]] = []

    def lines(self) -> list[str]:
        """What happened, one escaped line each (without the "tapbox: " prefix)."""
        out = []
        done = [c for c in self.committed if shown(c)]
        if done:
            kinds = {k: sum(1 for c in done if c.kind == k) for k in ("deleted", "added",
                                                                       "modified")}
            out.append("committed " + ", ".join(f"{n} {k}" for k, n in kinds.items() if n))
        for change, why in self.conflicts:
            out.append(escape(f"conflict: {change.path}: {why}: not committed (--force "
                              "overwrites)"))
        for change, why in self.refused:
            out.append(escape(f"refused: {change.path}: {why}"))
        for change, why in self.failed:
            out.append(escape(f"failed: {change.path}: {why}"))
        return out

    @property
    def ok(self) -> bool:
        return not (self.conflicts or self.refused or self.failed)


class Conflict(Exception):
    pass


def commit(layer: LayerDir, items: Iterable[Change], force: bool = False) -> Result:
    """Apply `items` (from read_changes, maybe selected) to the host; see the module text."""
    result = Result()
    todo: list[Change] = []
    for change in items:
        if change.problem:
            result.refused.append((change, change.problem))
            continue
        if not force:
            try:
                _check(layer, change)
            except Conflict as exc:
                result.conflicts.append((change, str(exc)))
                continue
            except OSError as exc:  # cannot tell whether it changed: leave it
                result.failed.append((change, f"checking it: {exc.strerror or exc}"))
                continue
        todo.append(change)
    blocked = [c.path for c, _ in (*result.conflicts, *result.refused)]
    # Deletions first, then the rest in order (a directory before what is in it).
    ordered = [c for c in todo if c.kind == "deleted"] + [c for c in todo if c.kind != "deleted"]
    links: dict[tuple[int, int], Change] = {}  # a hard-linked file of the layer: its first name
    for change in ordered:
        if change.kind == "modified" and not change.detail and change.what != "dir":
            _forget(layer, change)  # the same as the host's: nothing to write
            continue
        if change.what == "dir" and change.kind != "deleted" and \
                any(b.startswith(change.path + "/") for b in blocked) and change.opaque:
            # an opaque directory whose dropped entries are in conflict: do not replace it
            result.conflicts.append((change, "something in it is in conflict"))
            blocked.append(change.path)
            continue
        try:
            _apply(layer, change, links)
        except Conflict as exc:
            result.conflicts.append((change, str(exc)))
            blocked.append(change.path)
            continue
        except OSError as exc:
            result.failed.append((change, exc.strerror or str(exc)))
            blocked.append(change.path)
            continue
        result.committed.append(change)
        _forget(layer, change)
    # Directories: their mode and mtime once their contents are in; then out of the layer.
    done_dirs = [c for c in result.committed if c.what == "dir" and c.kind != "deleted"]
    for change in reversed(done_dirs):
        _finish_dir(layer, change, blocked)
    return result


# ------------------------------------------------------------------------------------------------
# Checking


def _check(layer: LayerDir, change: Change) -> None:
    """Raise Conflict if the host entry changed after the run started."""
    if change.what == "gone" or (change.kind == "modified" and not change.detail
                                 and change.what != "dir"):
        return  # nothing to write
    parent, name = _host_parent(layer, change, create=False)
    if parent is None:
        return  # the host has no directory there: nothing changed that could be lost
    try:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            if change.kind == "added":
                return
            if change.kind == "deleted":
                return  # already gone: nothing to do
            raise Conflict("removed on the host since the run started") from None
        if change.kind == "added":
            raise Conflict("created on the host since the run started")
        if change.what == "dir" and change.kind == "modified" and not change.detail and \
                not change.opaque:
            return  # a directory only passed through: what is in it is checked by itself
        if st.st_ctime_ns >= layer.baseline:
            raise Conflict("changed on the host since the run started")
        if stat.S_ISDIR(st.st_mode) and (change.kind == "deleted" or change.what != "dir"):
            newer = _newer_below(parent, name, layer.baseline)
            if newer:
                raise Conflict(f"{newer} in it changed on the host since the run started")
    finally:
        os.close(parent)


def _newer_below(parent: int, name: str, baseline: int) -> str:
    """The first entry below directory `name` changed after `baseline` ("" if none). Holds
    two descriptors at a time: the directories still to look at are kept as paths."""
    try:
        top = os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError:
        return ""
    todo = [""]
    seen = 0
    try:
        while todo:
            rel = todo.pop()
            where = f"{name}/{rel}" if rel else name
            try:
                fd = open_path(rel, DIR_FLAGS, dir_fd=top) if rel else os.dup(top)
            except OSError:
                return f"{where} (unreadable)"
            try:
                for entry in os.scandir(fd):
                    seen += 1
                    if seen > MAX_ENTRIES:
                        return f"{where}/... (too many entries to check)"
                    st = entry.stat(follow_symlinks=False)
                    if st.st_ctime_ns >= baseline:
                        return f"{where}/{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(f"{rel}/{entry.name}" if rel else entry.name)
            finally:
                os.close(fd)
    finally:
        os.close(top)
    return ""


# ------------------------------------------------------------------------------------------------
# Applying


def _apply(layer: LayerDir, change: Change, links: dict[tuple[int, int], Change]) -> None:
    if change.what == "gone":
        return
    parent, name = _host_parent(layer, change, create=change.kind != "deleted")
    if parent is None:
        if change.kind == "deleted":
            return
        raise Conflict("its directory is missing on the host")
    try:
        if change.kind == "deleted":
            _remove(parent, name)
            return
        lparent = _layer_parent(layer, change)
        try:
            st = os.stat(name, dir_fd=lparent, follow_symlinks=False)
            if change.what == "dir":
                _make_dir(parent, name)
            elif change.what == "file":
                key = (st.st_dev, st.st_ino)
                if key in links and _link(layer, links[key], parent, name):
                    return
                _write_file(lparent, name, parent, st)
                if st.st_nlink > 1:
                    links.setdefault(key, change)
            elif change.what == "symlink":
                target = os.readlink(name, dir_fd=lparent)
                _replace(parent, name, lambda tmp: _symlink(target, tmp, parent, st))
            elif change.what == "fifo":
                _replace(parent, name, lambda tmp: _fifo(tmp, parent, st))
            else:
                raise Conflict(f"a {change.what}: not committed")
        finally:
            os.close(lparent)
    finally:
        os.close(parent)


def _link(layer: LayerDir, first: Change, parent: int, name: str) -> bool:
    """Commit another name of a file hard-linked in the layer as a hard link to the one
    committed first (False: not possible, say across filesystems; then it is copied)."""
    try:
        first_parent, first_name = _host_parent(layer, first, create=False)
    except (Conflict, OSError):
        return False
    if first_parent is None:
        return False
    try:
        _replace(parent, name, lambda tmp: os.link(first_name, tmp, src_dir_fd=first_parent,
                                                   dst_dir_fd=parent, follow_symlinks=False))
        return True
    except OSError:
        return False
    finally:
        os.close(first_parent)


def _symlink(target: str, tmp: str, parent: int, st: os.stat_result) -> None:
    os.symlink(target, tmp, dir_fd=parent)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=parent, follow_symlinks=False)


def _fifo(tmp: str, parent: int, st: os.stat_result) -> None:
    os.mkfifo(tmp, stat.S_IMODE(st.st_mode) & 0o1777, dir_fd=parent)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=parent, follow_symlinks=False)


def _write_file(lparent: int, name: str, parent: int, st: os.stat_result) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                  dir_fd=lparent)
    try:
        got = os.fstat(src)
        if not stat.S_ISREG(got.st_mode) or got.st_mode & (stat.S_ISUID | stat.S_ISGID):
            raise Conflict("no longer a plain file in the layer")

        def make(tmp: str) -> None:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=parent)
            try:
                _copy(src, dst, got.st_size)
                os.fchmod(dst, stat.S_IMODE(got.st_mode) & 0o1777)
                os.utime(dst, ns=(got.st_atime_ns, got.st_mtime_ns))
                os.fsync(dst)
            finally:
                os.close(dst)

        _replace(parent, name, make)
    finally:
        os.close(src)


def _copy(src: int, dst: int, size: int) -> None:
    offset = 0
    try:
        while True:
            n = os.copy_file_range(src, dst, 1 << 30, offset, offset)
            if n == 0:
                return
            offset += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    os.lseek(src, offset, os.SEEK_SET)
    os.lseek(dst, offset, os.SEEK_SET)
    while True:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]


def _replace(parent: int, name: str, make: object) -> None:
    """Make the new entry at a temporary name in `parent` (`make(tmp)`), then rename it over
    `name` (a directory there is removed first)."""
    assert callable(make)
    tmp = TEMP_PREFIX + os.urandom(6).hex()
    try:
        make(tmp)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            remove_tree(parent, name)
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except OSError:
            pass
        raise


def _make_dir(parent: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent)  # a file (or symlink) the command replaced by a dir
        st = None
    if st is None:
        os.mkdir(name, 0o700, dir_fd=parent)


def _remove(parent: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(parent, name)
    else:
        os.unlink(name, dir_fd=parent)


def _finish_dir(layer: LayerDir, change: Change, blocked: list[str]) -> None:
    """A directory whose contents are committed: its mode and mtime on the host, and out of
    the layer if it is empty there."""
    if any(b.startswith(change.path + "/") for b in blocked):
        return
    try:
        lparent = _layer_parent(layer, change)
    except OSError:
        return
    name = os.path.basename(change.rel)
    try:
        try:
            lfd = os.open(name, DIR_FLAGS, dir_fd=lparent)
        except OSError:
            return
        try:
            st = os.fstat(lfd)
            empty = not any(True for _ in os.scandir(lfd))
        finally:
            os.close(lfd)
        if not empty:
            return
        parent, hname = _host_parent(layer, change, create=False)
        if parent is not None:
            try:
                hfd = os.open(hname, DIR_FLAGS, dir_fd=parent)
                try:
                    if change.kind == "added" or change.detail:
                        os.fchmod(hfd, stat.S_IMODE(st.st_mode) & 0o1777)
                    if change.kind == "added":
                        os.utime(hfd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(hfd)
            except OSError:
                pass
            finally:
                os.close(parent)
        try:
            os.rmdir(name, dir_fd=lparent)
        except OSError:
            pass
    finally:
        os.close(lparent)


def _forget(layer: LayerDir, change: Change) -> None:
    """Take a committed change out of the layer (directories: _finish_dir)."""
    if change.what == "dir" and change.kind != "deleted":
        if change.opaque:
            try:
                lparent = _layer_parent(layer, change)
            except OSError:
                return
            try:
                fd = os.open(os.path.basename(change.rel), DIR_FLAGS, dir_fd=lparent)
                try:
                    os.removexattr(fd, OPAQUE_XATTR)
                finally:
                    os.close(fd)
            except OSError:
                pass
            finally:
                os.close(lparent)
        return
    if change.kind == "deleted" and not change.whiteout:
        return  # dropped by an opaque directory: nothing of its own in the layer
    try:
        lparent = _layer_parent(layer, change)
    except OSError:
        return
    try:
        os.unlink(os.path.basename(change.rel), dir_fd=lparent)
    except OSError:
        pass
    finally:
        os.close(lparent)


# ------------------------------------------------------------------------------------------------
# Reaching the host and the layer without following a symlink


def _layer_parent(layer: LayerDir, change: Change) -> int:
    """A descriptor of the layer directory holding `change` (O_NOFOLLOW all the way)."""
    top = os.open(layer.upper(change.layer), DIR_FLAGS)
    try:
        return open_path(os.path.dirname(change.rel), DIR_FLAGS, dir_fd=top)
    finally:
        os.close(top)


def _host_parent(layer: LayerDir, change: Change, create: bool) -> tuple[int | None, str]:
    """A descriptor (O_PATH) of the host directory that holds `change`, and its name there.
    None if that directory does not exist (with `create`, it is made, with the mode of the
    layer's directory). Conflict if the way there leads through a symlink or a non-directory."""
    base = layer.dirs[change.layer]
    parts = [p for p in os.path.dirname(change.rel).split("/") if p]
    try:
        fd = open_path(base)
    except FileNotFoundError:
        return None, os.path.basename(change.rel)
    except OSError as exc:
        raise Conflict(f"the host directory {base} cannot be reached without following a "
                       f"symlink ({exc.strerror})") from None
    try:
        for i, part in enumerate(parts):
            try:
                new = os.open(part, PATH_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None, os.path.basename(change.rel)
                mode = _layer_mode(layer, change.layer, "/".join(parts[:i + 1]))
                os.mkdir(part, mode, dir_fd=fd)
                new = os.open(part, PATH_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Conflict("a directory above it on the host is now a symlink or a "
                                   "file") from None
                raise
            os.close(fd)
            fd = new
    except BaseException:
        os.close(fd)
        raise
    return fd, os.path.basename(change.rel)


def _layer_mode(layer: LayerDir, number: int, rel: str) -> int:
    try:
        top = os.open(layer.upper(number), DIR_FLAGS)
        try:
            fd = open_path(rel, DIR_FLAGS, dir_fd=top)
        finally:
            os.close(top)
        try:
            return stat.S_IMODE(os.fstat(fd).st_mode) & 0o1777 | 0o700
        finally:
            os.close(fd)
    except OSError:
        return 0o755


# ------------------------------------------------------------------------------------------------
# Reading, for diffs


def read_layer(layer: LayerDir, change: Change) -> bytes | None:
    """The file of `change` in the layer (None: too large or unreadable)."""
    try:
        lparent = _layer_parent(layer, change)
    except OSError:
        return None
    try:
        return _read_small(os.path.basename(change.rel), lparent)
    finally:
        os.close(lparent)


def read_host(path: str) -> bytes | None:
    """The host's file at `path`, reached without following a symlink (None: too large or
    unreadable)."""
    try:
        parent = open_path(os.path.dirname(path), DIR_FLAGS)
    except OSError:
        return None
    try:
        return _read_small(os.path.basename(path), parent)
    finally:
        os.close(parent)


def _read_small(name: str, dir_fd: int) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > SHOW_LIMIT:
            return None
        data = os.read(fd, SHOW_LIMIT + 1)
        return data if len(data) <= SHOW_LIMIT else None
    except OSError:
        return None
    finally:
        os.close(fd)
