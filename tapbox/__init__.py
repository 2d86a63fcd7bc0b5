"""tapbox: a rootless user-space firewall sandbox.

The Python API (docs/api.md)::

    import tapbox
    result = tapbox.run(["curl", "-s", "https://api.example.com/"],
                        allow=["api.example.com:443"], capture_output=True)
    value = tapbox.call(parse, untrusted_bytes, network=False)
    tapbox.enter(allow=["api.example.com:443"])   # the rest of this program is sandboxed

The names below are loaded on first use, so that `import tapbox` (and the `tapbox` command,
which imports this package first) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "run": "tapbox.api.run",
    "run_async": "tapbox.api.run",
    "call": "tapbox.api.run",
    "call_async": "tapbox.api.run",
    "enter": "tapbox.api.enter",
    "Result": "tapbox.api.records",
    "Records": "tapbox.api.records",
    "Flow": "tapbox.api.records",
    "DnsQuery": "tapbox.api.records",
    "Process": "tapbox.api.records",
    "read_log": "tapbox.api.records",
    "inside": "tapbox.api.records",
    "Inside": "tapbox.api.records",
    "RemoteTraceback": "tapbox.api.calls",
    "PIPE": "tapbox.api.job",
    "DEVNULL": "tapbox.api.job",
    "STDOUT": "tapbox.api.job",
    "RunOptions": "tapbox.options",
    "TapboxError": "tapbox.errors",
    "UsageError": "tapbox.errors",
    "SetupError": "tapbox.errors",
    "InputError": "tapbox.errors",
    "AllowlistError": "tapbox.errors",
    "ProfileError": "tapbox.errors",
    "RunError": "tapbox.errors",
    "DeniedError": "tapbox.errors",
    "CommandError": "tapbox.errors",
    "TimeoutExpired": "tapbox.errors",
    "EngineError": "tapbox.errors",
    "CallError": "tapbox.errors",
    "CrashedError": "tapbox.errors",
    "ResultError": "tapbox.errors",
}

__all__ = [
    "AllowlistError",
    "CallError",
    "CommandError",
    "CrashedError",
    "DEVNULL",
    "DeniedError",
    "DnsQuery",
    "Inside",
    "EngineError",
    "Flow",
    "InputError",
    "PIPE",
    "Process",
    "ProfileError",
    "Records",
    "RemoteTraceback",
    "Result",
    "ResultError",
    "RunError",
    "RunOptions",
    "STDOUT",
    "SetupError",
    "TapboxError",
    "TimeoutExpired",
    "UsageError",
    "call",
    "call_async",
    "enter",
    "inside",
    "read_log",
    "run",
    "run_async",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'tapbox' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:
    from tapbox.api.calls import RemoteTraceback
    from tapbox.api.enter import enter
    from tapbox.api.job import DEVNULL, PIPE, STDOUT
    from tapbox.api.records import (
        DnsQuery,
        Flow,
        Inside,
        Process,
        Records,
        Result,
        inside,
        read_log,
    )
    from tapbox.api.run import call, call_async, run, run_async
    from tapbox.errors import (
        AllowlistError,
        CallError,
        CommandError,
        CrashedError,
        DeniedError,
        EngineError,
        InputError,
        ProfileError,
        ResultError,
        RunError,
        SetupError,
        TapboxError,
        TimeoutExpired,
        UsageError,
    )
    from tapbox.options import RunOptions
