"""Exceptions tapbox reports to its user, and the exit statuses of the `tapbox` command.

How this works: every error tapbox raises on purpose is a `TapboxError`, whose str() is one line
a person can act on and whose `exit_status` is what the CLI exits with (125: tapbox failed, as
env(1) and podman do). The subclasses say what kind of thing went wrong, for callers that
want to tell them apart (the Python API raises them as they are; the CLI prints str() after
"tapbox: "):

    TapboxError
    +-- UsageError      options that are wrong or do not fit together (bad value, -n with --log)
    +-- SetupError      the sandbox cannot be set up (no /dev/net/tun, a file that cannot be
    |                   opened, user namespaces disabled...): one line naming cause and fix
    +-- InputError      a line of a file, or one option's text, that cannot be used:
        |               str() is "LOCATION: PROBLEM", e.g. "allowed.txt:7: invalid port ..."
        +-- AllowlistError   an allowlist file or an --allow rule
        +-- ProfileError     a -p/--profile file (TOML)

Exit statuses (DESIGN.md "Process model"), defined here and nowhere else: CMD's own status;
128+N if CMD was killed by signal N; 124 if --timeout ran out and the sandbox was killed (as
timeout(1)); 125 if tapbox itself failed (any TapboxError, before or after CMD ran); 126 if CMD
could not be executed; 127 if CMD was not found (the last two as env(1) reports them).
"""

from __future__ import annotations

import re
from typing import Self

# Exit statuses of tapbox's own making (DESIGN.md "Process model"); otherwise tapbox exits with
# the command's status, or 128+N when the command died of signal N.
EXIT_TIMEOUT = 124  # --timeout ran out: the sandbox was killed, as timeout(1) exits
EXIT_TAPBOX_FAILED = 125  # tapbox could not do its job (set-up failed, engine died)
EXIT_CANNOT_EXECUTE = 126  # the command exists but could not be executed, as env(1)
EXIT_NOT_FOUND = 127  # the command was not found, as env(1)
EXIT_SIGNAL_BASE = 128  # + N when CMD was killed by signal N

_FILE_LINE = re.compile(r"(.+):([0-9]+)")


def exit_status_for_signal(signum: int) -> int:
    """The status the CLI exits with when CMD was killed by signal `signum` (a shell's $?)."""
    return EXIT_SIGNAL_BASE + signum


class TapboxError(Exception):
    """Base class of tapbox's own errors; str() is one line, `exit_status` what the CLI exits
    with."""

    exit_status = EXIT_TAPBOX_FAILED


class UsageError(TapboxError):
    """Options that tapbox cannot use: a value of the wrong type or out of range, or two
    options that contradict each other. `problem` is the message without its location;
    `option` is the options field at fault ("network.mtu"), `location` the "FILE:LINE" its
    value was read from, when it came from a file: str() is then "FILE:LINE: PROBLEM"."""

    def __init__(self, problem: str, *, option: str | None = None,
                 location: str | None = None) -> None:
        super().__init__(f"{location}: {problem}" if location else problem)
        self.problem = problem
        self.option = option
        self.location = location


class SetupError(TapboxError):
    """tapbox cannot set up the sandbox; str() is one line naming the cause and the fix.

    The command never runs without its sandbox: the CLI exits 125.
    """


class InputError(TapboxError):
    """A line of a file, or one option's text, that tapbox cannot use.

    ``str(err)`` is the complete message, ``"LOCATION: PROBLEM"``; ``problem`` is the message
    without its location, ``location`` the part before it (``"allowed.txt:7"``,
    ``"--allow 'RULE'"``, ``"profile.toml"`` when the whole file is at fault), and ``path`` and
    ``line`` the file and line number when the location is ``FILE:LINE``.
    """

    def __init__(self, message: str, *, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem if problem is not None else message
        suffix = ": " + self.problem
        self.location: str | None = (message[: -len(suffix)] if problem is not None
                                     and message.endswith(suffix) else None)

    @classmethod
    def at(cls, location: str, problem: str) -> Self:
        """The error for `problem` at `location` ("file:line", "file" or an option)."""
        return cls(f"{location}: {problem}", problem=problem)

    @property
    def path(self) -> str | None:
        match = _FILE_LINE.fullmatch(self.location or "")
        return match[1] if match else None

    @property
    def line(self) -> int | None:
        match = _FILE_LINE.fullmatch(self.location or "")
        return int(match[2]) if match else None


class AllowlistError(InputError):
    """A rule or allowlist file that cannot be used.

    ``str(err)`` is the complete user-facing message: ``"allowed.txt:7: invalid port ..."``,
    ``"--allow 'RULE': ..."`` or ``"allowed.txt: cannot read: ..."``.
    """


class ProfileError(InputError):
    """A profile file that cannot be used: ``"profile.toml:12: unknown key 'mtuu' in
    [network]"``, ``"profile.toml: cannot read: ..."``."""
