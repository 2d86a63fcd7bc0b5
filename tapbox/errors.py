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
    |   +-- AllowlistError   an allowlist file or an --allow rule
    |   +-- ProfileError     a -p/--profile file (TOML)
    +-- RunError        the Python API (tapbox.run, tapbox.call): a run that did not end as asked
    |   +-- DeniedError      check=True, and the policy denied something (destinations named)
    |   +-- CommandError     check=True, and the command exited non-zero (also a
    |   |                    subprocess.CalledProcessError)
    |   +-- TimeoutExpired   timeout= passed: the sandbox was killed (also a
    |   |                    subprocess.TimeoutExpired)
    |   +-- EngineError      the network engine failed: the command was stopped
    +-- CallError       tapbox.call(): the function gave back neither a value nor an exception
        +-- CrashedError     its process died (a signal, os._exit) before it returned
        +-- ResultError      its result (or exception) could not be brought back: not
                             picklable, too large, or of a type the caller did not admit

An exception the function raised inside tapbox.call() is raised in the caller as it was (its
traceback text as its __cause__), not wrapped in one of these.

Exit statuses (DESIGN.md "Process model"), defined here and nowhere else: CMD's own status;
128+N if CMD was killed by signal N; 124 if --timeout ran out and the sandbox was killed (as
timeout(1)); 125 if tapbox itself failed (any TapboxError, before or after CMD ran); 126 if CMD
could not be executed; 127 if CMD was not found (the last two as env(1) reports them).
"""

from __future__ import annotations

import re
import subprocess
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from tapbox.api.records import Result

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


class RunError(TapboxError):
    """A run of the Python API did not end as its caller asked (check=True, timeout=).
    `result` is what is known of the run (tapbox.Result; None if nothing is)."""

    def __init__(self, message: str, result: Result | None = None) -> None:
        Exception.__init__(self, message)  # not super(): the subprocess bases come next
        self.result = result


class DeniedError(RunError):
    """check=True and the sandbox tried what its policy denies. `denied`: the denied flows and
    DNS queries (tapbox.Flow, tapbox.DnsQuery); str() names them."""

    def __init__(self, message: str, result: Result, denied: list[Any]) -> None:
        super().__init__(message, result)
        self.denied = denied


class CommandError(RunError, subprocess.CalledProcessError):
    """check=True and the command exited with a non-zero status (as subprocess.run raises
    CalledProcessError: `returncode`, `cmd`, `output`/`stdout`, `stderr`)."""

    def __init__(self, message: str, result: Result) -> None:
        RunError.__init__(self, message, result)
        subprocess.CalledProcessError.__init__(self, result.returncode, result.args,
                                               result.stdout, result.stderr)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TimeoutExpired(RunError, subprocess.TimeoutExpired):
    """The run took longer than its timeout= and was killed (`timeout`, `cmd`, and what was
    captured until then: `output`/`stdout`, `stderr`)."""

    def __init__(self, message: str, cmd: Any, timeout: float, output: Any = None,
                 stderr: Any = None) -> None:
        RunError.__init__(self, message)
        subprocess.TimeoutExpired.__init__(self, cmd, timeout, output, stderr)
        self.message = message

    def __str__(self) -> str:
        return self.message


class EngineError(RunError):
    """The network engine failed during the run; the command was stopped (the CLI's 125)."""


class CallError(TapboxError):
    """tapbox.call(): the function gave back neither a value nor an exception of its own."""


class CrashedError(CallError):
    """The function's process died before it returned: `returncode` is its status (128+N for
    signal N, as the CLI reports it)."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


class ResultError(CallError):
    """The function's result, or the exception it raised, could not be brought back."""
