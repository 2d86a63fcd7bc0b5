"""The kept layer of the copy-on-write view (`--fs overlay`): a directory on the host's disk.

How this works: every write of the sandboxed command goes to the upper directories of the
overlays tapbox mounts (one per top-level directory of the host, and where something is
mounted inside one, one per directory below it: tapbox.isolate.rootfs). Those upper
directories, and the overlays' work directories, live in one layer directory:

    $XDG_DATA_HOME/tapbox/changes/ID/        (or --changes-dir DIR)
        tapbox-layer.json   what tapbox knows of the run (written by tapbox only)
        upper/N/            what the command wrote over the host directory dirs[N]
        work/N/             overlayfs' own scratch space
        started             an empty file: its ctime is the run's start, on the disk's clock

The metadata file holds the command, its working directory, start and end, exit status, the
host directories of the upper layers (`dirs`, by number) and the baseline (the ctime of
`started`, in nanoseconds): a host file whose ctime is not older than the baseline changed
after the run started, which makes it a conflict at commit time (tapbox.isolate.commit).

Who writes what: tapbox creates the directory (mode 0700) and writes the metadata; the
sandbox cannot see the layer directory (the view hides it) and writes only into upper/N,
through its overlay. The names and contents of upper/N are hostile (tapbox.isolate.changes
reads them without following symlinks); the metadata is tapbox's, but it is checked when read
(`dirs` must be absolute, normalized paths) and its strings are escaped wherever they are
shown. A DIR that already holds a layer is continued: its upper directories are used again
(a later run sees what an earlier one wrote), its baseline and start stay the first run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tapbox.errors import SetupError, TapboxError

META = "tapbox-layer.json"
STAMP = "started"
UPPER = "upper"
WORK = "work"
FORMAT = 1
MAX_META = 1_000_000  # bytes: a bigger metadata file is not tapbox's


class LayerError(TapboxError):
    """A layer that cannot be found or read (the CLI prints it, exit 125)."""


def changes_root(environ: Mapping[str, str] | None = None) -> str:
    """Where the layers are kept by default: $XDG_DATA_HOME/tapbox/changes."""
    env = os.environ if environ is None else environ
    data = env.get("XDG_DATA_HOME", "")
    if not os.path.isabs(data):
        data = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "tapbox", "changes")


def new_id() -> str:
    """A layer's id: when it started, and a random part (sorts by time)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(3).hex()


class LayerDir:
    """One layer directory and its metadata (`meta`, as tapbox wrote it)."""

    def __init__(self, path: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta

    @property
    def id(self) -> str:
        return str(self.meta.get("id") or os.path.basename(self.path))

    @property
    def dirs(self) -> list[str]:
        """The host directory of each upper layer, by number."""
        return list(self.meta.get("dirs", []))

    @property
    def named(self) -> bool:
        """Whether it is a directory the user named (--changes-dir), not one under the
        changes root: such a directory is never removed without being asked."""
        return os.path.dirname(self.path) != os.path.realpath(changes_root())

    @property
    def baseline(self) -> int:
        return int(self.meta.get("baseline_ctime_ns", 0))

    def upper(self, number: int) -> str:
        return os.path.join(self.path, UPPER, str(number))

    # ----- creating, for a run --------------------------------------------------------------

    @classmethod
    def create(cls, changes_dir: str | None, command: Sequence[str], cwd: str,
               environ: Mapping[str, str] | None = None) -> LayerDir:
        """A new layer directory for a run (or the existing one DIR holds, continued).
        Raises SetupError naming the directory and the fix."""
        if changes_dir is None:
            root = changes_root(environ)
            _makedirs(root, "--changes-dir DIR")
            layer_id = new_id()
            path = os.path.join(os.path.realpath(root), layer_id)
        else:
            path = os.path.realpath(changes_dir)
            layer_id = os.path.basename(path)
        given = changes_dir or path
        now = time.time()
        if os.path.lexists(os.path.join(path, META)):
            try:
                layer = load(path)
            except LayerError as exc:
                raise SetupError(f"tapbox: --changes-dir {given}: {exc}") from None
            layer.meta["runs"] = int(layer.meta.get("runs", 1)) + 1
            layer.meta.update(command=list(command), cwd=cwd, started_last=now, ended=None,
                              status=None)
            return layer
        try:
            if changes_dir is None:
                os.mkdir(path, 0o700)
            else:
                _makedirs(path, "another --changes-dir")
                if os.listdir(path):
                    raise SetupError(f"tapbox: --changes-dir {given}: not empty and not a "
                                     "tapbox layer: give a new or empty directory")
                os.chmod(path, 0o700)
            for sub in (UPPER, WORK):
                os.mkdir(os.path.join(path, sub), 0o700)
            stamp = os.path.join(path, STAMP)
            os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            baseline = os.stat(stamp).st_ctime_ns
        except OSError as e:
            raise SetupError(f"tapbox: cannot create the layer directory {path}: {e.strerror}: "
                             "give a writable one with --changes-dir DIR") from None
        meta = {"format": FORMAT, "id": layer_id, "command": list(command), "cwd": cwd,
                "started": now, "ended": None, "status": None, "baseline_ctime_ns": baseline,
                "dirs": [], "runs": 1}
        return cls(path, meta)

    def number(self, directory: str) -> int:
        """The upper layer of the host directory `directory` (a new number if it has none)."""
        dirs = self.meta.setdefault("dirs", [])
        if directory not in dirs:
            dirs.append(directory)
        return int(dirs.index(directory))

    def prepare(self, numbers: Sequence[int], modes: Mapping[int, int]) -> None:
        """Create upper/N and work/N for each layer the plan mounts (upper/N with the mode of
        its host directory: the overlay's root takes it), and write the metadata."""
        try:
            for number in numbers:
                for sub in (UPPER, WORK):
                    path = os.path.join(self.path, sub, str(number))
                    if not os.path.isdir(path):
                        os.mkdir(path, 0o700)
                if number in modes:
                    os.chmod(self.upper(number), modes[number])
        except OSError as e:
            raise SetupError(f"tapbox: cannot prepare the layer directory {self.path}: "
                             f"{e.strerror}: give a writable one with --changes-dir DIR") from None
        self.save()

    def finish(self, status: int) -> None:
        """Record the end of the run and the command's exit status."""
        self.meta.update(ended=time.time(), status=status)
        with contextlib.suppress(OSError):
            self.save()

    def save(self) -> None:
        data = json.dumps(self.meta, indent=1, ensure_ascii=True).encode("ascii") + b"\n"
        tmp = os.path.join(self.path, f".{META}.{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.path, META))

    # ----- removing -------------------------------------------------------------------------

    def remove(self) -> None:
        """Delete the layer directory (never following a symlink in it)."""
        parent, name = os.path.split(self.path)
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            remove_tree(fd, name)
        finally:
            os.close(fd)


def _makedirs(path: str, alternative: str) -> None:
    try:
        os.makedirs(path, 0o700, exist_ok=True)
    except OSError as e:
        raise SetupError(f"tapbox: cannot create {path}: {e.strerror}: give a writable "
                         f"directory with {alternative}") from None


def load(path: str) -> LayerDir:
    """The layer in directory `path`; LayerError if it is none (or its metadata is bad)."""
    meta_path = os.path.join(path, META)
    try:
        fd = os.open(meta_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise LayerError(f"{path}: not a tapbox layer ({META}: {e.strerror})") from None
    try:
        data = os.read(fd, MAX_META + 1)
    finally:
        os.close(fd)
    try:
        meta = json.loads(data) if len(data) <= MAX_META else None
    except ValueError:
        meta = None
    problem = _meta_problem(meta)
    if problem:
        raise LayerError(f"{path}: not a tapbox layer ({META}: {problem})")
    assert isinstance(meta, dict)
    return LayerDir(os.path.realpath(path), meta)


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "not a JSON object of tapbox's"
    dirs = meta.get("dirs")
    if not isinstance(dirs, list):
        return "no list of directories"
    for item in dirs:
        if not isinstance(item, str) or not item.startswith("/") or "\0" in item or \
                os.path.normpath(item) != item:
            return "a directory that is not an absolute, normalized path"
    if not isinstance(meta.get("baseline_ctime_ns"), int):
        return "no baseline"
    return None


def find(name: str, environ: Mapping[str, str] | None = None) -> LayerDir:
    """The layer named by an id (under the changes root) or a directory."""
    if "/" not in name and name not in (".", ".."):
        candidate = os.path.join(changes_root(environ), name)
        if os.path.isdir(candidate):
            return load(candidate)
    if os.path.isdir(name):
        return load(os.path.abspath(name))
    raise LayerError(f"no layer {name!r}: give an id that `tapbox changes` lists, or a "
                     "directory given to --changes-dir")


def all_layers(environ: Mapping[str, str] | None = None) -> Iterator[LayerDir | LayerError]:
    """The layers under the changes root, oldest first (a bad one as a LayerError)."""
    root = changes_root(environ)
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            yield load(path)
        except LayerError as exc:
            yield exc


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove `name` in `dir_fd` and everything below it, never following a symlink, holding
    one descriptor at a time however deep the tree (a layer the sandbox made may nest
    directories thousands deep). The work directory overlayfs leaves behind holds a directory
    of mode 0000: directories are made writable first."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    _writable_dir(name, st, dir_fd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    below: list[str] = []  # the names from `name` down to where fd is
    try:
        while True:
            subdir = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subdir = subdir or entry
                    else:
                        os.unlink(entry.name, dir_fd=fd)
            if subdir is not None:  # down into it
                _writable_dir(subdir.name, subdir.stat(follow_symlinks=False), fd)
                child = os.open(subdir.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = child
                below.append(subdir.name)
                continue
            if not below:
                break
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(below.pop(), dir_fd=fd)  # empty now: up again
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _writable_dir(name: str, st: os.stat_result, dir_fd: int) -> None:
    if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
        os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False)
