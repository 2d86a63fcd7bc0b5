"""tapbox.call's two ends: the function's outcome sent out of the sandbox, and read back.

How this works
--------------
In the sandbox (pid 2, Python mode), `run_child()` calls the function, flushes sys.stdout and
sys.stderr, and writes its outcome to the result pipe, pickled, then leaves with os._exit (the
program's atexit handlers and finalizers belong to the caller, not to this copy of it):

    ("value", value)                     it returned
    ("raised", exception, traceback)     it raised (traceback: the formatted text)
    ("raised-text", type, message, traceback)   it raised something that does not pickle
    ("unpicklable", type, problem)       it returned something that does not pickle

In the caller, `outcome()` reads that back. The bytes come from the sandbox, and whatever runs
there may have written them instead of the function: they are untrusted, and unpickling
untrusted bytes can call any function the unpickler can reach. So the unpickler here reaches
none but: the types pickle builds without a lookup (None, bool, int, float, str, bytes,
bytearray, list, tuple, dict, set, frozenset), complex, range and slice, the exception classes
(subclasses of Exception) of modules the caller has already imported -- never importing one --
and the types the caller names (`result_types=`). Anything else is a ResultError naming the
type. The size is bounded (`max_result`, read by the job), and every string shown from the
sandbox (the traceback text, type names) is escaped (tapbox.textescape).

An exception that is not an Exception (SystemExit, KeyboardInterrupt, GeneratorExit) is not
raised in the caller as it is -- a plugin must not be able to end its caller's program -- but as
a CallError naming it.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from tapbox.errors import EXIT_SIGNAL_BASE, EXIT_TAPBOX_FAILED, CallError, CrashedError, ResultError
from tapbox.textescape import escape

DEFAULT_MAX_RESULT = 100_000_000  # bytes of pickled outcome, as the log's default limit
# Callables the unpickler may reach besides admitted types: harmless constructors only.
_SAFE: dict[tuple[str, str], Any] = {("builtins", name): getattr(builtins, name)
                                     for name in ("complex", "range", "slice")}


class RemoteTraceback(Exception):
    """The traceback of an exception raised inside tapbox.call, as text: set as the
    __cause__ of the exception the caller sees, so a traceback print shows both."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


# ------------------------------------------------------------------------------------------------
# In the sandbox


def run_child(fn: Callable[..., Any], args: tuple[Any, ...], fd: int,
              read_sources: bool = True) -> NoReturn:
    """Pid 2 in Python mode: call fn(*args), send the outcome through `fd`, _exit.
    `read_sources` False (an allow-list policy: no file may be opened): a traceback shows only
    the source lines Python already holds."""
    status = 0
    try:
        os.set_inheritable(fd, False)  # not for what the function may exec
        try:
            outcome: tuple[Any, ...] = ("value", fn(*args))
        except BaseException as exc:  # noqa: B036 - every outcome goes back to the caller
            if not read_sources:
                _no_source_files()
            tb = exc.__traceback__.tb_next if exc.__traceback__ else None  # not this frame
            text = "".join(traceback.format_exception(type(exc), exc, tb))
            outcome = ("raised", exc, text) if isinstance(exc, Exception) else \
                ("raised-text", _type_name(exc), _message(exc), text)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: S110 - a closed stream must not lose the outcome
                pass
        _send(fd, _dump(outcome))
    except BaseException:  # noqa: B036 - nothing may return into the caller's copy
        status = EXIT_TAPBOX_FAILED  # the outcome could not be sent
    finally:
        os._exit(status)


def _no_source_files() -> None:
    """Make the traceback module use the lines linecache holds and stat or read no file (under
    syscalls="strict" the first would kill the process before its outcome is sent). Only in the
    function's process, about to exit."""
    import linecache

    cache = linecache.cache

    def getline(filename: str, lineno: int, module_globals: Any = None) -> str:
        entry = cache.get(filename)
        lines = entry[2] if entry is not None and len(entry) > 2 else []
        return lines[lineno - 1] if 0 < lineno <= len(lines) else ""

    linecache.getline = getline
    linecache.checkcache = lambda filename=None: None
    linecache.lazycache = lambda filename, module_globals: False


def _dump(outcome: tuple[Any, ...]) -> bytes:
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as problem:  # noqa: BLE001 - anything pickle raises is the same problem
        if outcome[0] == "value":
            return pickle.dumps(("unpicklable", _type_name(outcome[1]),
                                 f"{type(problem).__name__}: {problem}"))
        exc = outcome[1]
        return pickle.dumps(("raised-text", _type_name(exc), _message(exc), outcome[2]))


def _send(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _type_name(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - its __str__ may fail too
        return "(no message: str() failed)"


# ------------------------------------------------------------------------------------------------
# In the caller


def outcome(data: bytes, returncode: int, result_types: Iterable[type], what: str) -> Any:
    """The function's value, or raise what it raised (or the CallError saying why neither can
    be had). `what` names the function in messages."""
    if not data:
        raise CrashedError(_crash(what, returncode), returncode)
    try:
        record = _Unpickler(io.BytesIO(data), frozenset(result_types)).load()
        kind = record[0]
    except ResultError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything wrong with the bytes is the same problem
        raise ResultError(f"tapbox.call: the outcome of {what} could not be read: "
                          f"{escape(exc)}") from None
    if kind == "value" and len(record) == 2:
        return record[1]
    if kind == "raised" and len(record) == 3 and isinstance(record[2], str):
        exc, text = record[1], record[2]
        if isinstance(exc, Exception):
            raise exc from RemoteTraceback(escape_lines(text))
        raise CallError(f"tapbox.call: {what} raised {escape(_type_name(exc))}") \
            from RemoteTraceback(escape_lines(text))
    if kind == "raised-text" and len(record) == 4:
        _, type_name, message, text = record
        raise CallError(f"tapbox.call: {what} raised {escape(type_name)}: {escape(message)}") \
            from RemoteTraceback(escape_lines(str(text)))
    if kind == "unpicklable" and len(record) == 3:
        raise ResultError(f"tapbox.call: the result of {what} cannot be sent back: "
                          f"{escape(record[1])} does not pickle ({escape(record[2])})")
    raise ResultError(f"tapbox.call: the outcome of {what} is not one tapbox sends")


def escape_lines(text: str) -> str:
    """A traceback's text, each line escaped (its line breaks kept)."""
    return "\n".join(escape(line) for line in text.rstrip("\n").split("\n"))


def _crash(what: str, returncode: int) -> str:
    if returncode > EXIT_SIGNAL_BASE:
        import signal

        signo = returncode - EXIT_SIGNAL_BASE
        try:
            name = f" ({signal.Signals(signo).name})"
        except ValueError:
            name = ""
        return (f"tapbox.call: {what} did not return: its process was killed by signal "
                f"{signo}{name}")
    return (f"tapbox.call: {what} did not return: its process exited with status {returncode} "
            "(os._exit, or a crash)")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, admitted: frozenset[type]) -> None:
        super().__init__(file)
        self.admitted = admitted

    def find_class(self, module: str, name: str) -> Any:
        safe = _SAFE.get((module, name))
        if safe is not None:
            return safe
        found = _imported(module, name)
        if found is not None and (found in self.admitted or (
                isinstance(found, type) and issubclass(found, Exception))):
            return found
        raise ResultError(f"tapbox.call: the result holds a {escape(module)}.{escape(name)}, "
                          "which is not admitted: name the type in result_types= to accept it")

    def persistent_load(self, pid: Any) -> NoReturn:
        raise ResultError("tapbox.call: the result holds a persistent reference")


def _imported(module: str, name: str) -> Any:
    """module.name if the module is already imported (never importing it), else None."""
    found: Any = sys.modules.get(module)
    for part in name.split("."):
        if found is None or part.startswith("__"):
            return None
        found = getattr(found, part, None)
    return found
