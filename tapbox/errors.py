"""Exceptions tapbox reports to its user.

Every error that stops tapbox before the sandboxed command runs is a `SetupError`: its str() is one
line that names the cause and the fix, and the CLI prints it as is and exits 125.
"""

from __future__ import annotations


class TapboxError(Exception):
    """Base class of tapbox's own errors."""


class SetupError(TapboxError):
    """tapbox cannot set up the sandbox; str() is one line naming the cause and the fix.

    The CLI exits 125 (tapbox's own failure, as env(1) and podman do).
    """
