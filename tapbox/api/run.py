"""tapbox.run and tapbox.call (and their async forms): one sandboxed run, as a function call.

How this works: the keywords become RunOptions (tapbox.api.options); the run is prepared in the
caller's thread, so a bad option, rule or file raises before anything is forked; a Job
(tapbox.api.job) forks the sandbox and serves it while the caller's thread feeds and reads the
pipes; the Result is read back from the run's event log (tapbox.api.records): the caller's
`log=` file, or a private temporary one removed afterwards. With the network off there is no
engine, no log, and no records.

`check=True` raises DeniedError when the policy denied anything (the denied destinations and
names in its message), else CommandError for a non-zero exit; `timeout=` kills the sandbox and
raises TimeoutExpired. tapbox.call runs the function in the sandbox in Python mode and brings
its outcome back (tapbox.api.calls); whenever something was denied, the exception it raised
carries a note naming what, so a failing test says why.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tapbox.api.calls import DEFAULT_MAX_RESULT, outcome, run_child
from tapbox.api.job import PIPE, Job, Streams, StreamSpec
from tapbox.api.options import run_options
from tapbox.api.records import Records, Result, describe_args
from tapbox.api.runlog import RunLog, command_env
from tapbox.errors import DeniedError, EngineError, TimeoutExpired, UsageError
from tapbox.runner import prepare
from tapbox.textescape import escape


def run(args: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
        stdin: StreamSpec = None, input: bytes | str | None = None,
        stdout: StreamSpec = None, stderr: StreamSpec = None, capture_output: bool = False,
        text: bool | None = None, encoding: str | None = None, errors: str | None = None,
        timeout: float | None = None, check: bool = False, cwd: str | os.PathLike[str] | None
        = None, env: Mapping[str, str] | None = None, pass_fds: Iterable[int] = (),
        **options: Any) -> Result:
    """Run `args` in a sandbox, as subprocess.run runs it, and return what happened."""
    job, argv, feed, decode, log = _run_job(args, stdin, input, stdout, stderr, capture_output,
                                            text, encoding, errors, cwd, env, pass_fds, options)
    try:
        job.start()
        return _finish(job, argv, job.wait(feed, timeout), decode, log, timeout, check)
    finally:
        log.remove()  # (done already, unless the wait was interrupted)


async def run_async(args: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                    stdin: StreamSpec = None, input: bytes | str | None = None,
                    stdout: StreamSpec = None, stderr: StreamSpec = None,
                    capture_output: bool = False, text: bool | None = None,
                    encoding: str | None = None, errors: str | None = None,
                    timeout: float | None = None, check: bool = False,
                    cwd: str | os.PathLike[str] | None = None,
                    env: Mapping[str, str] | None = None, pass_fds: Iterable[int] = (),
                    **options: Any) -> Result:
    """tapbox.run for asyncio and trio programs: the loop keeps running meanwhile; cancelling
    the awaiting task kills the sandbox."""
    from tapbox.api.aio import require_loop, run_in_thread

    require_loop()  # before anything is prepared
    job, argv, feed, decode, log = _run_job(args, stdin, input, stdout, stderr, capture_output,
                                            text, encoding, errors, cwd, env, pass_fds, options)

    def body() -> Result:
        try:
            job.start()
            return _finish(job, argv, job.wait(feed, timeout), decode, log, timeout, check)
        finally:
            log.remove()

    return await run_in_thread(body, job.kill)


def call(fn: Callable[..., Any], /, *args: Any, timeout: float | None = None,
         check: bool = False, cwd: str | os.PathLike[str] | None = None,
         env: Mapping[str, str] | None = None, pass_fds: Iterable[int] = (),
         result_types: Iterable[type] = (), max_result: int = DEFAULT_MAX_RESULT,
         **options: Any) -> Any:
    """fn(*args) in a sandboxed child process (a fork of this one); its result, or the
    exception it raised. Keyword arguments are tapbox's: pass fn's own with functools.partial."""
    job, what, log = _call_job(fn, args, cwd, env, pass_fds, options)
    try:
        job.start()
        piped = job.wait(None, timeout, max_result)
        return _call_outcome(job, what, piped, log, timeout, check, result_types, max_result)
    finally:
        log.remove()


async def call_async(fn: Callable[..., Any], /, *args: Any, timeout: float | None = None,
                     check: bool = False, cwd: str | os.PathLike[str] | None = None,
                     env: Mapping[str, str] | None = None, pass_fds: Iterable[int] = (),
                     result_types: Iterable[type] = (), max_result: int = DEFAULT_MAX_RESULT,
                     **options: Any) -> Any:
    """tapbox.call for asyncio and trio programs (see run_async)."""
    from tapbox.api.aio import require_loop, run_in_thread

    require_loop()
    job, what, log = _call_job(fn, args, cwd, env, pass_fds, options)

    def body() -> Any:
        try:
            job.start()
            piped = job.wait(None, timeout, max_result)
            return _call_outcome(job, what, piped, log, timeout, check, result_types,
                                 max_result)
        finally:
            log.remove()

    return await run_in_thread(body, job.kill)


# ------------------------------------------------------------------------------------------------


def _prepared_job(label: list[str], keywords: Mapping[str, Any], what: str,
                  make: Callable[[Any], Job]) -> tuple[Job, RunLog]:
    options = run_options(keywords, what=what)
    log = RunLog(options)
    try:
        prepared = prepare(label, log.options)
        try:
            return make(prepared), log
        except BaseException:
            prepared.close()
            raise
    except BaseException:
        log.remove()
        raise


def _run_job(args: Any, stdin: StreamSpec, input: bytes | str | None, stdout: StreamSpec,
             stderr: StreamSpec, capture_output: bool, text: bool | None, encoding: str | None,
             errors: str | None, cwd: Any, env: Mapping[str, str] | None,
             pass_fds: Iterable[int], options: Mapping[str, Any]
             ) -> tuple[Job, list[str], bytes | None, Callable[[bytes], Any], RunLog]:
    argv = _argv(args)
    if capture_output:
        if stdout is not None or stderr is not None:
            raise UsageError("tapbox.run: stdout and stderr may not be used with "
                             "capture_output")
        stdout = stderr = PIPE
    if input is not None:
        if stdin is not None:
            raise UsageError("tapbox.run: stdin and input may not both be used")
        stdin = PIPE
    text_mode = bool(text or encoding or errors)
    feed = input.encode(encoding or "utf-8", errors or "strict") \
        if isinstance(input, str) else input

    def decode(data: bytes) -> Any:
        return data.decode(encoding or "utf-8", errors or "strict") if text_mode else data

    def make(prepared: Any) -> Job:
        streams = Streams(stdin, stdout, stderr)
        try:
            return Job(prepared, argv, streams, pass_fds=pass_fds, cwd=_cwd(cwd),
                       env=command_env(env, prepared.options.record.log))
        except BaseException:
            streams.close()
            raise

    job, log = _prepared_job(argv, options, "tapbox.run", make)
    return job, argv, feed, decode, log


def _call_job(fn: Callable[..., Any], args: tuple[Any, ...], cwd: Any,
              env: Mapping[str, str] | None, pass_fds: Iterable[int],
              options: Mapping[str, Any]) -> tuple[Job, str, RunLog]:
    if not callable(fn):
        raise UsageError(f"tapbox.call: expected a function, got {type(fn).__name__}")
    what = _name_of(fn)

    def make(prepared: Any) -> Job:
        read_sources = prepared.policy is None or not prepared.policy.is_allow_list
        streams = Streams(result=True)
        try:
            job = Job(prepared, None, streams, pass_fds=pass_fds, cwd=_cwd(cwd),
                      env=command_env(env, prepared.options.record.log),
                      child=lambda: run_child(fn, args, streams.result_fd, read_sources))
        except BaseException:
            streams.close()
            raise
        return job

    job, log = _prepared_job(["python", what], options, "tapbox.call", make)
    return job, what, log


def _finish(job: Job, argv: list[str], piped: dict[str, bytes], decode: Callable[[bytes], Any],
            log: RunLog, timeout: float | None, check: bool) -> Result:
    records = log.records()
    if job.error is not None:
        raise job.error
    assert job.status is not None
    stdout = decode(piped["stdout"]) if "stdout" in piped else None
    stderr = decode(piped["stderr"]) if "stderr" in piped else None
    result = Result(flows=records.flows, dns=records.dns, events=records.events,
                    truncated=records.truncated, args=argv, returncode=job.status,
                    stdout=stdout, stderr=stderr, log=log.caller)
    if job.timed_out:
        assert timeout is not None
        raise TimeoutExpired(f"tapbox: {describe_args(argv)} timed out after {timeout:g} s "
                             "(the sandbox was killed)", argv, timeout, stdout, stderr)
    if job.failure is not None:
        raise EngineError(f"tapbox: the network engine failed ({job.failure}); "
                          f"{describe_args(argv)} was stopped", result)
    if check:
        _check_denied(result, describe_args(argv))
        result.check_returncode()
    return result


def _call_outcome(job: Job, what: str, piped: dict[str, bytes], log: RunLog,
                  timeout: float | None, check: bool, result_types: Iterable[type],
                  max_result: int) -> Any:
    records = log.records()
    if job.error is not None:
        raise job.error
    assert job.status is not None
    result = Result(flows=records.flows, dns=records.dns, events=records.events,
                    truncated=records.truncated, args=what, returncode=job.status,
                    log=log.caller)
    if job.timed_out:
        assert timeout is not None
        raise TimeoutExpired(f"tapbox.call: {what} timed out after {timeout:g} s (the sandbox "
                             "was killed)", what, timeout)
    if job.failure is not None:
        raise EngineError(f"tapbox: the network engine failed ({job.failure}); {what} was "
                          "stopped", result)
    if job.too_large:
        from tapbox.errors import ResultError

        raise ResultError(f"tapbox.call: the outcome of {what} is larger than max_result "
                          f"({max_result} bytes)")
    denied = result.denied
    try:
        value = outcome(piped.get("result", b""), job.status, result_types, what)
    except Exception as exc:
        with contextlib.suppress(Exception):
            if denied:
                exc.add_note(_denied_text(result))
            if job.violations:  # (a function killed under syscalls="strict", for one)
                exc.add_note("tapbox refused: " + "; ".join(
                    escape(v.describe()) for v in job.violations[:5]))
        raise
    if check:
        _check_denied(result, what)
    return value


def _check_denied(result: Result, what: str) -> None:
    denied = result.denied
    if denied:
        status = f"exited with status {result.returncode}; " if result.returncode else ""
        raise DeniedError(f"tapbox: {what} {status}{_denied_text(result)}", result, denied)


def _denied_text(records: Records, limit: int = 10) -> str:
    """"tapbox denied: tcp 203.0.113.7:80, dns denied.test A" (each destination once)."""
    seen: list[str] = []
    for item in records.denied:
        text = item.destination if hasattr(item, "destination") else str(item)
        if text not in seen:
            seen.append(text)
    more = f" and {len(seen) - limit} more" if len(seen) > limit else ""
    return "tapbox denied: " + ", ".join(seen[:limit]) + more


def _argv(args: Any) -> list[str]:
    if isinstance(args, str | bytes | os.PathLike):
        args = [args]
    try:
        argv = [os.fsdecode(a) for a in args]
    except TypeError:
        raise UsageError(f"tapbox.run: expected the command as a list of strings, got "
                         f"{args!r}") from None
    if not argv:
        raise UsageError("tapbox.run: no command given")
    return argv


def _cwd(cwd: Any) -> str | None:
    if cwd is None:
        return None
    path = os.path.abspath(os.fspath(cwd))
    if not os.path.isdir(path):
        raise UsageError(f"cwd={os.fspath(cwd)!r}: not a directory")
    return path


def _name_of(fn: Callable[..., Any]) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    module = getattr(inner, "__module__", None) or ""
    name = getattr(inner, "__qualname__", None) or type(inner).__name__
    return f"{module}.{name}" if module else name
