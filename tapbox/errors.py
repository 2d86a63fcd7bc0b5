"""Exceptions tapbox reports to its user.

Every error that stops tapbox before the sandboxed command runs is a `SetupError`: its str() is one
line that names the cause and the fix, and the CLI prints it as is and exits 125.
"""

from __future__ import annotations

# Exit statuses of tapbox's own making (DESIGN.md "Process model"); otherwise tapbox exits with
# the command's status, or 128+N when the command died of signal N.
EXIT_TAPBOX_FAILED = 125  # tapbox could not do its job (set-up failed, engine died)
EXIT_CANNOT_INVOKE = 126  # the command exists but could not be executed, as env(1)
EXIT_NOT_FOUND = 127  # the command was not found, as env(1)


class TapboxError(Exception):
    """Base class of tapbox's own errors."""


class SetupError(TapboxError):
    """tapbox cannot set up the sandbox; str() is one line naming the cause and the fix.

    The CLI exits 125 (tapbox's own failure, as env(1) and podman do).
    """
