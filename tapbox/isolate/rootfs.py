"""The project view's operations, made from RunOptions.filesystem and what the host looks like.

How this works: `HostFacts.collect()` reads, once and before the fork, what the view depends
on: the working directory, the home directory, the top-level entries of `/` (their kinds come
from the directory itself, so nothing below them is touched: an nfs server that does not answer
or an automount that is not mounted yet stays untouched), the device nodes, the secrets of
secrets.txt that exist, the mounts below the home directory. `project_plan()` then lists the
operations (tapbox.isolate.plan, which names them), in this order:

1. the new root: each top-level directory of the host bound read-only with everything mounted
   below it, each top-level symlink recreated (/bin -> usr/bin), except the directories the view
   provides itself (REPLACED);
2. /dev (null, zero, full, random, urandom, tty from the host; a new devpts; /dev/shm), a fresh
   /proc, a read-only fresh /sys, empty /tmp, /run and $XDG_RUNTIME_DIR;
3. the layers, in order, each covering what an earlier one put at or below its path (`layer()`):
   the home directory as a copy-on-write overlay (split into one overlay per directory where
   something is mounted in it: `copy_on_write()`), the working directory writable, the
   secrets hidden, then the --write/--read/--hide/--tmpfs paths as given. A secret below a path
   the user exposes is hidden again unless the user names it, so `--write ~` does not show
   ~/.ssh; an operation a later one covers entirely is left out;
4. the private resolv.conf and the record files (read-only), tapbox's own tmpfs made
   read-only, pivot_root.

The working directory is not made writable when it is `/`, the home directory or a directory
above it (that would undo the copy-on-write home), or a directory the view provides (/tmp, /run,
/dev...): a notice says so and names the option that would.

Every path is resolved on the host (os.path.realpath) before it goes into an operation, so the
executor never follows a symlink of the host's tree inside the new one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from tapbox.errors import SetupError
from tapbox.isolate.layerdir import LayerDir, changes_root
from tapbox.isolate.plan import (
    Bind,
    BindFile,
    Device,
    Devpts,
    FreshProc,
    FreshSysfs,
    Hide,
    HomeOverlay,
    KeptLayer,
    KeptOverlay,
    NewRoot,
    Op,
    PivotRoot,
    Plan,
    ReadOnly,
    ReadOnlyFile,
    Symlink,
    Tmpfs,
)
from tapbox.options import FilesystemOptions, PathRule

SECRETS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "secrets.txt")
# Top-level directories the project view makes itself rather than binding the host's.
REPLACED = ("dev", "proc", "sys", "tmp", "run")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
DEV_LINKS = (("pts/ptmx", "/dev/ptmx"), ("/proc/self/fd", "/dev/fd"),
             ("/proc/self/fd/0", "/dev/stdin"), ("/proc/self/fd/1", "/dev/stdout"),
             ("/proc/self/fd/2", "/dev/stderr"))


class Entry(NamedTuple):
    """One entry of the host's `/`: kind "dir", "file" or "symlink" (with its target)."""

    name: str
    kind: str
    target: str = ""


class HostFacts(NamedTuple):
    """What the project view depends on, read on the host before the fork."""

    cwd: str  # resolved
    home: str | None  # the resolved home directory, if it is one (None: $HOME unusable)
    home_layer: bool  # whether it can be made copy-on-write (a directory tapbox may read)
    runtime_dir: str  # the sandbox's $XDG_RUNTIME_DIR (the host's path, or /run/user/UID)
    top: tuple[Entry, ...]
    devices: tuple[str, ...]
    # (resolved path, is a directory, the path as the list names it) of each that exists
    secrets: tuple[tuple[str, bool, str], ...]
    home_mounts: tuple[str, ...]  # the mount points strictly below the home directory
    # The copy-on-write view: every mount point, and the top-level directories tapbox may
    # read (the others stay read-only, as the host protects them).
    mounts: tuple[str, ...] = ()
    readable: frozenset[str] = frozenset()

    @classmethod
    def collect(cls, root: bool, environ: Mapping[str, str] | None = None,
                cwd: str | None = None, overlay: bool = False) -> HostFacts:
        """`environ`, `cwd`: the command's, when they are not tapbox's own (the Python API)."""
        env = os.environ if environ is None else environ
        cwd = os.path.realpath(cwd or os.getcwd())
        home_given = env.get("HOME") or os.path.expanduser("~")
        home = os.path.realpath(home_given) if os.path.isabs(home_given) else None
        if home is not None and (home == "/" or not os.path.isdir(home)):
            home = None
        # Not a directory the view makes itself (HOME=/tmp: the sandbox's /tmp is its home),
        # and one tapbox may read (else it stays read-only, as the host protects it).
        home_layer = home is not None and home not in ("/tmp", "/run") and \
            _top(home) not in ("dev", "proc", "sys") and os.access(home, os.R_OK | os.X_OK)
        given = env.get("XDG_RUNTIME_DIR", "")
        runtime = os.path.realpath(given) if os.path.isabs(given) else "/"
        # A tmpfs goes there: never on / or a top-level directory (XDG_RUNTIME_DIR=/usr...)
        uid = 0 if root else os.getuid()
        runtime_dir = runtime if runtime.count("/") >= 2 else f"/run/user/{uid}"
        top = []
        with os.scandir("/") as entries:
            for entry in entries:  # kinds from the directory entry: nothing below is touched
                if entry.is_symlink():
                    top.append(Entry(entry.name, "symlink", os.readlink(entry.path)))
                elif entry.is_dir(follow_symlinks=False):
                    top.append(Entry(entry.name, "dir"))
                elif entry.is_file(follow_symlinks=False):
                    top.append(Entry(entry.name, "file"))
        top.sort(key=lambda e: e.name)
        mounts: tuple[str, ...] = ()
        readable: frozenset[str] = frozenset()
        if overlay:
            from tapbox.isolate.mounts import mount_points

            mounts = tuple(sorted(set(mount_points())))
            readable = frozenset(e.name for e in top if e.kind == "dir" and
                                 os.access("/" + e.name, os.R_OK | os.X_OK))
        return cls(cwd=cwd, home=home, home_layer=home_layer, runtime_dir=runtime_dir,
                   top=tuple(top),
                   devices=tuple(d for d in DEVICES if os.path.lexists(d)),
                   secrets=tuple(existing_secrets(read_secrets(), home and home_given)),
                   home_mounts=tuple(mounts_below(home)) if home_layer and home else (),
                   mounts=mounts, readable=readable)


def read_secrets(path: str = SECRETS_FILE) -> list[str]:
    """The entries of the secrets file, as written (~/X or /X); comments and blanks skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def existing_secrets(entries: Iterable[str],
                     home: str | None) -> list[tuple[str, bool, str]]:
    """(resolved path, is a directory, path as named) of each entry that exists (~/ entries
    need a home: `home` as $HOME gives it)."""
    found: list[tuple[str, bool, str]] = []
    for entry in entries:
        if entry.startswith("~/"):
            if home is None:
                continue
            entry = os.path.join(home, entry[2:])
        named = os.path.abspath(entry)
        try:
            os.lstat(named)  # most are not there: one system call each
            path = os.path.realpath(named)
            st = os.lstat(path)
        except OSError:
            continue
        if all(path != seen for seen, _d, _n in found):
            found.append((path, stat.S_ISDIR(st.st_mode), named))
    return found


def mounts_below(directory: str) -> list[str]:
    """The mount points strictly below `directory` (from /proc/self/mountinfo)."""
    from tapbox.isolate.mounts import mount_points

    prefix = directory.rstrip("/") + "/"
    return sorted({p for p in mount_points() if p.startswith(prefix)})


def copy_on_write(directory: str, mounts: Sequence[str], kept: bool = False) -> list[Op]:
    """Overlays that make `directory` copy-on-write. The kernel refuses an overlay in a user
    namespace whose lower directory has mounts below it that the namespace did not make
    (revealing what they cover): then `directory` is bound read-only with its mounts, and each
    directory in it with no mount point inside gets an overlay of its own (recursively); the
    mount points, and the files directly in such a directory, stay read-only."""
    below = [m for m in mounts if m.startswith(directory + "/")]
    if not below:  # (numbered once the layers are known)
        return [KeptOverlay(directory) if kept else HomeOverlay(directory)]
    ops: list[Op] = [Bind(directory, directory, writable=False,
                          purpose="copy-on-write below it: something is mounted in it")]
    try:
        with os.scandir(directory) as entries:
            names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except OSError:
        return ops
    for name in names:
        path = os.path.join(directory, name)
        if path in below:
            continue  # a mount point: read-only, with what is mounted in it
        ops.extend(copy_on_write(path, below, kept))
    return ops


def project_plan(fs: FilesystemOptions, host: HostFacts, resolv: BindFile | None,
                 records: Sequence[Op], kept: LayerDir | None = None) -> Plan:
    """The project view's operations (see the module's docstring for the order); with
    `kept` (the layer directory), the copy-on-write view's."""
    overlay = fs.view == "overlay"
    if overlay and kept is None:
        raise SetupError("tapbox: internal error: the copy-on-write view needs a layer")
    ops: list[Op] = [NewRoot()]
    if kept is not None:
        ops.append(KeptLayer(kept.path))
    for entry in host.top:
        if entry.name in REPLACED:
            continue
        path = "/" + entry.name
        if entry.kind == "symlink":
            ops.append(Symlink(entry.target, path))
        elif overlay and entry.name in host.readable:
            ops.extend(copy_on_write(path, host.mounts, kept=True))
        else:
            ops.append(Bind(path, path, writable=False, directory=entry.kind == "dir"))
    ops.append(Tmpfs("/dev", 0o755, "a minimal /dev"))
    ops.extend(Device(path) for path in host.devices)
    ops.append(Devpts())
    ops.extend(Symlink(target, path) for target, path in DEV_LINKS)
    ops.append(Tmpfs("/dev/shm", 0o1777, "private"))
    ops.append(FreshProc())
    ops.append(FreshSysfs(read_only=True))
    ops.append(Tmpfs("/tmp", 0o1777, "private"))
    ops.append(Tmpfs("/run", 0o755, "empty"))

    layers: list[Op] = []
    if overlay:  # the home and the working directory, where the view replaced their tops
        notice = cwd_notice(host, fs.paths, overlay=True)
        # Each gets an overlay of its own where its top-level directory has none: one the
        # view replaces (a home or project under /tmp), or one tapbox cannot read itself (a
        # /home of mode 0711).
        done: list[str] = []
        for path in (host.home if host.home_layer else None, None if notice else host.cwd):
            if path is None or path.count("/") < 2 or any(_covers(d, path) for d in done):
                continue
            top = _top(path)
            if top in ("tmp", "run") or (top not in REPLACED and top not in host.readable
                                         and os.access(path, os.R_OK | os.X_OK)):
                layers.extend(copy_on_write(path, host.mounts, kept=True))
                done.append(path)
    else:
        if host.home_layer and host.home is not None:
            layers.extend(copy_on_write(host.home, host.home_mounts))
        notice = cwd_notice(host, fs.paths)
        if notice is None:
            layers.append(Bind(host.cwd, host.cwd, writable=True,
                               purpose="the working directory"))
    layers.append(Tmpfs(host.runtime_dir, 0o700, "$XDG_RUNTIME_DIR, empty"))
    secrets = [hide_op(path, is_dir, "", "a secret") for path, is_dir, _ in host.secrets]
    names = {path: named for path, _d, named in host.secrets}
    layered = layer([*layers, *secrets], fs.paths, host.cwd, "", secrets, names)
    # The kept layers, last, so that no path option can show them: a sandbox that could
    # write a layer (or its metadata) could make a later commit write where it likes.
    kept_dirs = [p for p in dict.fromkeys((os.path.realpath(changes_root()),
                                           kept.path if kept is not None else ""))
                 if p and os.path.isdir(p)]
    for path in kept_dirs:
        inside = any(other.startswith(path + "/") for other in kept_dirs)
        layered.append(Hide(path, True, 0o111 if inside else 0, "", "the kept layers"))
    _check_cwd_visible(layered, host.cwd)
    overlays = [HomeOverlay(op.path, n) for n, op in
                enumerate(op for op in layered if isinstance(op, HomeOverlay))]
    numbered = iter(overlays)  # layer N's directory is N/ on the layers' tmpfs
    layered = [next(numbered) if isinstance(op, HomeOverlay) else op for op in layered]
    ops.extend(layered)
    modes: dict[int, int] = {}
    if kept is not None:  # layer N's upper directory is upper/N of the layer directory
        for i, op in enumerate(ops):
            if isinstance(op, KeptOverlay):
                ops[i] = KeptOverlay(op.path, kept.number(op.path))
                modes[ops[i].layer] = _mode(op.path)
    if resolv is not None:
        ops.append(resolv)
    ops.extend(op._replace(layered=True) if overlay and isinstance(op, ReadOnlyFile) else op
               for op in records)
    ops.append(ReadOnly("/", "the new root"))
    ops.append(ReadOnly("/dev", "the minimal /dev"))
    ops.extend(ReadOnly(op.path, "hidden") for op in layered if isinstance(op, Hide)
               and op.directory)
    ops.append(PivotRoot(host.cwd))
    return Plan(tuple(ops), notices=() if notice is None else (notice,),
                runtime_dir=host.runtime_dir, home=host.home if overlays else None,
                layers=tuple(op.path for op in overlays), kept=tuple(modes.items()))


def _mode(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o755


def cwd_notice(host: HostFacts, rules: Sequence[PathRule], overlay: bool = False) -> str | None:
    """None if the working directory is made writable (copy-on-write, in the overlay view),
    else the one line that says why not (no line when a --write already covers it)."""
    cwd, home = host.cwd, host.home
    if any(rule.action == "write" and _covers(resolve(rule.path, cwd), cwd) for rule in rules):
        return None
    shown = display(cwd, home)
    if overlay:
        if _top(cwd) in ("dev", "proc", "sys") or cwd in ("/tmp", "/run") or \
                _covers(host.runtime_dir, cwd):
            return (f"the working directory {shown} is the sandbox's own, not the host's: "
                    f"share the host's with --write {shown}")
        return None
    if cwd == "/":
        return (f"the working directory {shown} is not made writable (the sandbox sees the "
                "host read-only): name what the command may write with --write PATH")
    if home is not None and cwd == home:
        return (f"the working directory {shown} is your home: it stays copy-on-write (writes "
                "are discarded at exit); keep them with --write ~")
    if home is not None and home.startswith(cwd + "/"):
        return (f"the working directory {shown} holds your home, so it is not made writable "
                "(read-only in the sandbox): name what the command may write with --write PATH")
    if _top(cwd) in ("dev", "proc", "sys") or cwd in ("/tmp", "/run") or \
            _covers(host.runtime_dir, cwd):
        return (f"the working directory {shown} is the sandbox's own, not the host's: share "
                f"the host's with --write {shown}")
    return None


def layer(ops: list[Op], rules: Sequence[PathRule], cwd: str, empty_file: str,
          secrets: Sequence[Hide] = (), names: Mapping[str, str] | None = None) -> list[Op]:
    """`ops`, then each rule's operation (relative paths from `cwd`), each --write/--read
    followed by the `secrets` strictly below it; then without the operations a later one
    covers, and with each hidden directory searchable (0111) where something is mounted in it.
    `names` gives each secret's path as its list names it (it may be a symlink).

    Raises SetupError for a --write/--read path that does not exist, and for one that shows a
    secret (or something in it) without naming it: through a symlink, for example a `.git`
    that a repository made a link to ~/.ssh, `--write .git` must not make ~/.ssh writable."""
    listed = list(ops)
    for rule in rules:
        op = rule_op(rule, cwd, empty_file)
        if op is None:
            continue
        if isinstance(op, Bind):
            _check_not_a_secret_by_a_symlink(rule, op.dest, cwd, secrets, names or {})
        listed.append(op)
        if isinstance(op, Bind) and op.directory:
            listed.extend(s for s in secrets if s.path.startswith(op.dest + "/"))
    kept = [op for i, op in enumerate(listed)
            if not any(_replaces(later, _path(op)) for later in listed[i + 1:])]
    out: list[Op] = []
    for i, op in enumerate(kept):
        if isinstance(op, Hide) and op.directory:
            inside = any(_path(later).startswith(op.path + "/") for later in kept[i + 1:])
            op = Hide(op.path, True, 0o111 if inside else 0, purpose=op.purpose)
        out.append(op)
    return out


def _check_not_a_secret_by_a_symlink(rule: PathRule, dest: str, cwd: str,
                                     secrets: Sequence[Hide], names: Mapping[str, str]) -> None:
    given = os.path.abspath(os.path.join(cwd, os.path.expanduser(rule.path)))
    for secret in secrets:
        named = names.get(secret.path, secret.path)
        if _covers(secret.path, dest) and not (_covers(named, given) or
                                               _covers(secret.path, given)):
            raise SetupError(
                f"tapbox: --{rule.action} {rule.path}: it leads through a symlink to {dest}, "
                f"which is hidden ({secret.purpose} {named}): name that path itself if you "
                "mean to show it")


def rule_op(rule: PathRule, cwd: str, empty_file: str) -> Op | None:
    """The operation of one --write/--read/--hide/--tmpfs (None: nothing to hide there)."""
    flag = f"--{rule.action} {rule.path}"
    path = resolve(rule.path, cwd)
    if path == "/":
        raise SetupError(f"tapbox: {flag}: not for the whole filesystem: use --fs host for "
                         "the host's files as they are")
    try:
        st = os.lstat(path)
    except OSError as e:
        if rule.action != "hide":  # tapbox creates nothing on the host's side
            raise SetupError(f"tapbox: {flag}: {e.strerror}: give a path that exists (create "
                             "it first)") from None
        return None  # nothing to hide
    if rule.action in ("write", "read"):
        return Bind(path, path, writable=rule.action == "write",
                    directory=stat.S_ISDIR(st.st_mode), purpose=f"--{rule.action}")
    if rule.action == "hide":
        return hide_op(path, stat.S_ISDIR(st.st_mode), empty_file, "--hide")
    if not stat.S_ISDIR(st.st_mode):
        raise SetupError(f"tapbox: {flag}: not a directory: --tmpfs puts an empty directory "
                         "there")
    return Tmpfs(path, stat.S_IMODE(st.st_mode), "--tmpfs")


def hide_op(path: str, is_dir: bool, empty_file: str, purpose: str) -> Hide:
    return Hide(path, is_dir, 0, "" if is_dir else empty_file, purpose)


def path_ops(rules: Sequence[PathRule], cwd: str, empty_file: str) -> tuple[list[Op], list[str]]:
    """The host view's share: the rules' operations, and the hidden directories to make
    read-only once everything is mounted."""
    ops = layer([], rules, os.path.realpath(cwd), empty_file)
    return ops, [op.path for op in ops if isinstance(op, Hide) and op.directory]


def resolve(path: str, cwd: str) -> str:
    """A path as given (~ expanded, relative to `cwd`), resolved on the host."""
    return os.path.realpath(os.path.join(cwd, os.path.expanduser(path)))


def display(path: str, home: str | None) -> str:
    """`path` with the home directory written ~."""
    if home is not None and (path == home or path.startswith(home + "/")):
        return "~" + path[len(home):]
    return path


def _check_cwd_visible(ops: Sequence[Op], cwd: str) -> None:
    for op in reversed(ops):
        if _replaces(op, cwd):
            if isinstance(op, Hide):
                raise SetupError(
                    f"tapbox: the working directory {cwd} is hidden in the sandbox ({op.purpose}"
                    f" {op.path}): run tapbox from another directory, or show it with --read or "
                    "--write")
            return


def _path(op: Op) -> str:
    return op.dest if isinstance(op, Bind) else getattr(op, "path", "")


def _replaces(op: Op, path: str) -> bool:
    """Whether `op` puts something new at `path` (its own path, or one below a directory it
    mounts), so that what was there before can no longer be seen."""
    own = _path(op)
    if own == path:
        return isinstance(op, Bind | Tmpfs | Hide | HomeOverlay | KeptOverlay)
    subtree = isinstance(op, Tmpfs | HomeOverlay | KeptOverlay) or (isinstance(op, Hide | Bind)
                                                     and op.directory)
    return subtree and _covers(own, path)


def _covers(directory: str, path: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _top(path: str) -> str:
    return path.lstrip("/").split("/", 1)[0]
