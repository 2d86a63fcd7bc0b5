"""What one tapbox run is asked to do: `RunOptions`, filled by the CLI, profiles and the API.

How this works
--------------
`RunOptions` is a frozen dataclass with one part per concern, each itself a frozen dataclass
whose defaults are what a bare `tapbox -- CMD` does:

    network      allowlist rules and files, DNS upstreams, MTU, IPv6 -- or no network at all
    filesystem   what the command sees of the host's files: the view, and paths written,
                 read, hidden or emptied (docs/isolation.md)
    environment  who the command runs as inside (--root) and its environment variables
    record       what is recorded and reported: event log, capture, audit/learn, stderr
    process      how the command's processes are confined: system calls, nesting, Landlock
    limits       resource limits: time, memory, processes, open files (none by default)

A field is named by its dotted path, "network.mtu"; a profile writes the same field as
`[network]` / `mtu = ...`. Each front end turns what it read into a `Layer`: the fields it
sets, already typed, and where each value came from (an `Origin`, for messages). `from_layers`
stacks layers over the defaults: a later layer replaces an earlier layer's value, except that
the fields marked `adds` (allowlist rules and files) add up. `validate()` then checks the whole
object once, whoever filled it -- types, ranges, options that need each other -- and names the
culprit as its user wrote it ("--mtu 70000: ..." or "team.toml:4: network.mtu 70000: ...").
Text is turned into typed values by the front ends (a size such as "100M" into bytes); a rule
keeps its text and its source, and is parsed when the run loads the allowlist.

Adding an option (issues 9, 10 and 12 add filesystem, overlay, syscall and limit options): a
field with its default in its part (metadata: `PATH` if it is a file name a profile gives
relative to itself, `SIZE` if a profile may write it as "100M", `DURATION` if as "10m", `ADDS`
if the CLI's values add to a profile's rather than replace them); a line in the CLI's table
(tapbox/cli/args.py); a check in `validate()` if it needs more than its type checked; a row
in docs/profiles.md.
Profiles know every field from the dataclasses themselves.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple

from tapbox.errors import UsageError
from tapbox.layout import DEFAULT_MTU

MIN_MTU = 576  # the smallest datagram every IPv4 host must accept (RFC 791)
DEFAULT_PCAP_LIMIT = 100_000_000  # bytes: "100M"
DEFAULT_LOG_LIMIT = 100_000_000  # bytes: "100M"
MIN_LOG_LIMIT = 4096  # room for the start event and the truncation notice

IPv6Mode = Literal["auto", "on", "off"]
SyscallMode = Literal["default", "strict", "off"]  # tapbox.isolate.syscalls.MODES
FilesystemView = Literal["project", "host", "overlay"]
OnExit = Literal["ask", "commit", "keep", "discard"]
PathAction = Literal["write", "read", "hide", "tmpfs"]
PATH_ACTIONS: tuple[PathAction, ...] = ("write", "read", "hide", "tmpfs")
Report = Literal["auto", "summary", "quiet"]

# Field metadata (see "Adding an option" above).
ADDS = {"adds": True}
PATH = {"path": True}
SIZE = {"size": True}
DURATION = {"duration": True}

_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'30', '30s', '1.5m', '2h', '1d' -> seconds (a positive number; no unit is seconds)."""
    body = text.strip().lower()
    unit = body[-1:] if body[-1:] in "smhd" else ""
    try:
        value = float(body[: len(body) - len(unit)])
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"invalid duration {text!r} (e.g. 30s, 10m, 2h, 45)")
    return value * _DURATION_UNITS[unit]


class AllowRule(NamedTuple):
    """One allowlist rule as written, and where it was written: "--allow" for the command
    line, "FILE:LINE" for a profile. Parsed (tapbox.allowlist.parse_rule) when the run starts."""

    text: str
    source: str = "--allow"  # tapbox.allowlist.CLI_SOURCE


class PathRule(NamedTuple):
    """One filesystem option as given: `action` is what to do with `path` in the sandbox
    (write: bind it writable; read: bind it read-only, also re-exposing a hidden path; hide:
    empty and inaccessible; tmpfs: empty, writable, discarded), in the order given: later
    wins. A profile or the API may write it as one string, "write ~/.cache"."""

    action: str  # one of PATH_ACTIONS (checked by RunOptions.validate)
    path: str

    @classmethod
    def parse(cls, text: str) -> PathRule:
        """ "ACTION PATH" -> PathRule; ValueError naming the problem."""
        action, _, path = text.strip().partition(" ")
        if action not in PATH_ACTIONS:
            raise ValueError(f"{text!r}: expected ACTION PATH with ACTION one of "
                             f"{', '.join(PATH_ACTIONS)}")
        if not path.strip():
            raise ValueError(f"{text!r}: no path after {action!r}")
        return cls(action, path.strip())


class _Part:
    """Shared by the parts: lists given where tuples belong become tuples, and plain strings
    given as rules become AllowRules, so the API may pass what is natural."""

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            value = getattr(self, name)
            if typing.get_origin(hint) is not tuple or not isinstance(value, list | tuple):
                continue
            if typing.get_args(hint)[0] is AllowRule:
                value = [AllowRule(item) if isinstance(item, str) else item for item in value]
            elif typing.get_args(hint)[0] is PathRule:
                value = [_path_rule(item) for item in value]
            object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class NetworkOptions(_Part):
    """The sandbox's network: what it may reach, and how its link looks."""

    enabled: bool = True  # False: -n, only a loopback interface (no TAP, no engine)
    allow: tuple[AllowRule, ...] = field(default=(), metadata=ADDS)  # --allow RULE
    allowlists: tuple[str, ...] = field(default=(), metadata=ADDS | PATH)  # -F FILE
    dns_upstream: tuple[str, ...] = ()  # "ADDR[:PORT]"; empty: the host's resolv.conf
    mtu: int = DEFAULT_MTU  # of tap0
    ipv6: IPv6Mode = "auto"  # auto: on when the host can reach IPv6 destinations


@dataclass(frozen=True)
class FilesystemOptions(_Part):
    """What the command sees of the host's files (docs/isolation.md).

    "project" (the default): the host read-only, the working directory writable, $HOME
    copy-on-write to a throwaway layer, private /tmp, /dev/shm, /run and $XDG_RUNTIME_DIR, a
    minimal /dev, secrets hidden. "host": the host's filesystem as it is (a private
    resolv.conf aside). `paths` (--write/--read/--hide/--tmpfs) are applied after the view,
    in order: later wins. "overlay": like "project", but every write anywhere (the home
    and the working directory included) goes to a kept layer, reviewed and committed
    afterwards (docs/overlay.md); `changes_dir` is where that layer is kept (default
    $XDG_DATA_HOME/tapbox/changes/ID) and `on_exit` what happens to it when the command
    ends (ask: a prompt on a terminal, else keep).
    """

    view: FilesystemView = "project"
    paths: tuple[PathRule, ...] = field(default=(), metadata=ADDS | PATH)
    changes_dir: str | None = field(default=None, metadata=PATH)  # --changes-dir DIR
    on_exit: OnExit = "ask"  # --on-exit


@dataclass(frozen=True)
class EnvironmentOptions(_Part):
    """Who the command runs as, and its environment: tapbox's own, minus the variables that
    name sockets the project view hides, then `clearenv` (keeps KEPT_BY_CLEARENV), `unsetenv`,
    `setenv` in that order (tapbox.isolate.environment), plus TAPBOX=1."""

    root: bool = False  # --root: uid/gid 0 inside (fakeroot); else the caller's uid/gid
    setenv: tuple[str, ...] = field(default=(), metadata=ADDS)  # "VAR=VALUE"
    unsetenv: tuple[str, ...] = field(default=(), metadata=ADDS)  # "VAR"
    clearenv: bool = False


@dataclass(frozen=True)
class RecordOptions(_Part):
    """What tapbox records about the run, and what it reports on stderr (docs/audit.md)."""

    log: str | None = field(default=None, metadata=PATH)  # JSON-lines event log
    pcap: str | None = field(default=None, metadata=PATH)  # capture of tap0's frames
    pcap_limit: int = field(default=DEFAULT_PCAP_LIMIT, metadata=SIZE)  # bytes
    log_limit: int = field(default=DEFAULT_LOG_LIMIT, metadata=SIZE)  # bytes; then "truncated"
    learn: str | None = field(default=None, metadata=PATH)  # allowlist to write (audit mode)
    audit: bool = False  # block nothing, record what would be denied
    # auto: denied connections as they happen, and the summary table when something was
    # denied (or in audit mode); summary: the table always (--summary); quiet: neither (-q)
    report: Report = "auto"
    verbose: bool = False  # every connection and DNS decision on stderr (-v)

    @property
    def audit_mode(self) -> bool:
        """Block nothing: --audit, or --learn (which audits, then writes what it saw)."""
        return self.audit or self.learn is not None


@dataclass(frozen=True)
class ProcessOptions(_Part):
    """How the command's processes are confined beyond their namespaces (docs/isolation.md)."""

    # default: a deny list of what has no business in a sandbox; strict: compute only (no
    # files, sockets, exec); off: only the terminal guard (tapbox.isolate.syscalls)
    syscalls: SyscallMode = "default"
    syscall_allow: tuple[str, ...] = field(default=(), metadata=ADDS)  # names and @groups
    nest: bool = True  # False: --no-nest, no user namespaces (so no sandbox) inside
    landlock: bool = False  # Landlock rules mirroring the read-only parts of the view


@dataclass(frozen=True)
class LimitsOptions(_Part):
    """Resource limits of the sandbox; None is unlimited (the default for each)."""

    timeout: float | None = field(default=None, metadata=DURATION)  # seconds, then killed
    memory: int | None = field(default=None, metadata=SIZE)  # bytes
    max_procs: int | None = None  # processes and threads
    max_files: int | None = None  # open file descriptors per process


class Origin(NamedTuple):
    """Where a value came from, for messages: `name` is how its user wrote the option ("--mtu",
    "network.mtu"), `location` the "FILE:LINE" it was read from, if it was read from a file."""

    name: str
    location: str | None = None


class Layer:
    """The fields one source of options sets (dotted path -> typed value), and their origins."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.origins: dict[str, Origin] = {}

    def set(self, path: str, value: Any, origin: Origin) -> None:
        _field(path)  # a KeyError here is a programming error: the path names no field
        self.values[path] = value
        self.origins[path] = origin


@dataclass(frozen=True)
class RunOptions:
    """Everything one run is asked to do (the command itself is given separately)."""

    network: NetworkOptions = field(default_factory=NetworkOptions)
    filesystem: FilesystemOptions = field(default_factory=FilesystemOptions)
    environment: EnvironmentOptions = field(default_factory=EnvironmentOptions)
    record: RecordOptions = field(default_factory=RecordOptions)
    process: ProcessOptions = field(default_factory=ProcessOptions)
    limits: LimitsOptions = field(default_factory=LimitsOptions)

    @classmethod
    def from_layers(cls, *layers: Layer) -> RunOptions:
        """The defaults, then each layer in turn (later ones win; `adds` fields add up),
        validated. Raises UsageError naming the option at fault as its layer wrote it."""
        values: dict[str, dict[str, Any]] = {part.name: {} for part in fields(cls)}
        origins: dict[str, Origin] = {}
        for layer in layers:
            for path, value in layer.values.items():
                part, name = path.split(".")
                if _field(path).metadata.get("adds") and name in values[part]:
                    value = (*values[part][name], *value)
                values[part][name] = value
                origins[path] = layer.origins[path]
        options = cls(**{part.name: _part_class(part.name)(**values[part.name])
                         for part in fields(cls)})
        options.validate(origins)
        return options

    def validate(self, origins: Mapping[str, Origin] | None = None) -> RunOptions:
        """Check every field's type, then the ranges and the options that need each other.
        Returns self; raises UsageError for the first problem. `origins` says how each
        field was written (default: its dotted path)."""
        origins = origins or {}

        def name(path: str) -> str:
            origin = origins.get(path)
            return origin.name if origin else path

        def fail(path: str, problem: str) -> UsageError:
            origin = origins.get(path)
            return UsageError(problem, option=path, location=origin and origin.location)

        for part in fields(self):
            values = getattr(self, part.name)
            if not isinstance(values, _part_class(part.name)):
                raise UsageError(f"{part.name}: expected {_part_class(part.name).__name__}, "
                                 f"got {_kind(values)}", option=part.name)
            for path, hint in _part_hints(part.name).items():
                value = getattr(values, path.split(".")[1])
                expected = _type_problem(value, hint)
                if expected is None:
                    continue
                got = _kind(value)
                if isinstance(value, tuple) and typing.get_origin(hint) is tuple:  # which item
                    item = typing.get_args(hint)[0]
                    got += " with " + next(_kind(v) for v in value
                                           if _type_problem(v, item) is not None)
                raise fail(path, f"{name(path)}: expected {expected}, got {got}")
        net, record = self.network, self.record
        if not MIN_MTU <= net.mtu <= DEFAULT_MTU:
            raise fail("network.mtu", f"{name('network.mtu')} {net.mtu}: must be between "
                                      f"{MIN_MTU} and {DEFAULT_MTU}")
        if record.pcap_limit <= 0:
            raise fail("record.pcap_limit", f"{name('record.pcap_limit')} {record.pcap_limit}: "
                                            "must be a positive number of bytes")
        if record.log_limit < MIN_LOG_LIMIT:
            raise fail("record.log_limit", f"{name('record.log_limit')} {record.log_limit}: "
                                           f"must be at least {MIN_LOG_LIMIT} bytes")
        for rule in self.filesystem.paths:
            problem = _path_rule_problem(rule)
            if problem:
                given = name("filesystem.paths")  # on the command line: the flag itself,
                label = given  # in the API the keyword ("write=")
                if rule.action in PATH_ACTIONS and given.startswith("--"):
                    label = f"--{rule.action}"
                elif rule.action in PATH_ACTIONS and given.endswith("="):
                    label = f"{rule.action}="
                raise fail("filesystem.paths", f"{label}: {problem}")
        fs = self.filesystem
        for path, used in (("filesystem.changes_dir", fs.changes_dir is not None),
                           ("filesystem.on_exit", fs.on_exit != "ask")):
            if used and fs.view != "overlay":
                add = "--fs overlay" if name(path).startswith("--") else \
                    'filesystem.view = "overlay"'
                raise fail(path, f"{name(path)} is for the copy-on-write view: add {add}")
        if fs.changes_dir is not None and ("\0" in fs.changes_dir or not fs.changes_dir):
            raise fail("filesystem.changes_dir", f"{name('filesystem.changes_dir')}: not a path")
        env = self.environment
        for path, items, check in (("environment.setenv", env.setenv, _setenv_problem),
                                   ("environment.unsetenv", env.unsetenv, _variable_problem)):
            for item in items:
                problem = check(item)
                if problem:
                    raise fail(path, f"{name(path)} {item!r}: {problem}")
        for path in ("limits.timeout", "limits.memory", "limits.max_procs", "limits.max_files"):
            value = getattr(self.limits, path.split(".")[1])
            if value is not None and not value > 0:
                raise fail(path, f"{name(path)} {value}: must be positive")
        if self.process.syscall_allow:
            from tapbox.isolate.syscalls import expand

            try:
                expand(self.process.syscall_allow)
            except ValueError as exc:
                raise fail("process.syscall_allow", f"{name('process.syscall_allow')}: "
                                                    f"{exc}") from None
        if not net.enabled:
            for path, used in (("record.log", record.log), ("record.audit", record.audit),
                               ("record.learn", record.learn), ("record.pcap", record.pcap)):
                if used:
                    raise fail(path, f"{name(path)} needs the network: it cannot be used "
                                     f"with {name('network.enabled')}")
        return self


def _path_rule(item: Any) -> Any:
    """A string "ACTION PATH" given where a PathRule belongs, as a PathRule (validate() names
    what does not parse: it is left as it is)."""
    if isinstance(item, str):
        try:
            return PathRule.parse(item)
        except ValueError:
            return item
    return item


def _path_rule_problem(rule: PathRule) -> str | None:
    if rule.action not in PATH_ACTIONS:
        return f"{rule.action!r} is not one of {', '.join(PATH_ACTIONS)}"
    if not rule.path:
        return "empty path"
    if "\0" in rule.path:
        return f"{rule.path!r}: a path cannot contain a NUL byte"
    return None


def _variable_problem(name: str) -> str | None:
    if not name:
        return "empty variable name"
    if "=" in name or "\0" in name:
        return "a variable name cannot contain '=' or a NUL byte"
    return None


def _setenv_problem(item: str) -> str | None:
    name, equals, value = item.partition("=")
    if not equals:
        return "expected VAR=VALUE"
    if "\0" in value:
        return "a value cannot contain a NUL byte"
    return _variable_problem(name)


def part_fields(part: str) -> dict[str, Any]:
    """The fields of one part ("network"): name -> dataclasses.Field."""
    return {f.name: f for f in fields(_part_class(part))}


def part_names() -> list[str]:
    return [part.name for part in fields(RunOptions)]


def field_type(path: str) -> Any:
    """The type a field holds ("network.mtu" -> int)."""
    return _part_hints(path.split(".")[0])[path]


# ------------------------------------------------------------------------------------------------
# Types


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _part_class(part: str) -> type:
    return _hints(RunOptions)[part]


@functools.cache
def _part_hints(part: str) -> dict[str, Any]:
    return {f"{part}.{name}": hint for name, hint in _hints(_part_class(part)).items()}


def _field(path: str) -> Any:
    part, name = path.split(".")
    return part_fields(part)[name]


def _type_problem(value: Any, hint: Any) -> str | None:
    """None if `value` is of type `hint`, else what was expected ("an integer")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return None if value in args and isinstance(value, str) else \
            "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (types.UnionType, typing.Union):
        if any(_type_problem(value, arg) is None for arg in args):
            return None
        return " or ".join(_type_problem(object(), arg) or "?" for arg in args
                           if arg is not type(None))
    if origin is tuple:
        item = args[0]
        if isinstance(value, tuple) and all(_type_problem(v, item) is None for v in value):
            return None
        return "a list of " + ("rules (strings)" if item is AllowRule else
                               "paths (\"ACTION PATH\" strings)" if item is PathRule else "strings")
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) \
            else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if isinstance(hint, type):
        return None if isinstance(value, hint) else hint.__name__
    raise TypeError(f"options: no check for the type {hint!r}")


def _kind(value: Any) -> str:
    """How a wrong value is described in a message: "a string '1500'", "a list"."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    for types_, word in ((int, "an integer"), (float, "a float"), (str, "a string"),
                         ((list, tuple), "a list"), (dict, "a table")):
        if isinstance(value, types_):
            return f"{word} ({value!r})" if isinstance(value, str | int | float) else word
    return "nothing" if value is None else f"a {type(value).__name__}"
