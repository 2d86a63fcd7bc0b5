"""The pytest plugin: tests in tapbox sandboxes, with a real network guard (docs/api.md).

How this works
--------------
Built on the public API (tapbox.call, tapbox.enter, tapbox.inside, tapbox.read_log) only.

- `@pytest.mark.tapbox(allow=[...], ...)`: the test's call phase runs in tapbox.call: pytest
  sets the fixtures up in its own process as usual, then `item.runtest` -- whatever runs the
  test function: pytest itself, pytest-trio, anyio -- runs in a sandboxed fork of it. A skip, an
  xfail or a pytest.fail inside comes back as itself; an exception comes back with its
  traceback. The run's event log (one file per test, in pytest's temporary directory) is read
  afterwards: if anything was denied, the test fails with the denied destinations named (unless
  the marker says check=False), whatever the code under test made of the refusal.
- `--tapbox-profile FILE` / `--tapbox-allow RULE` / `--tapbox-learn FILE`: the whole session
  runs in one sandbox. The plugin calls tapbox.enter() as early as pytest lets a plugin run
  (pytest_load_initial_conftests, before output capturing starts and before any conftest is
  imported), so everything after it -- collection, fixtures, tests, the processes they start,
  pytest-xdist's workers -- is inside; the original pytest process supervises and exits with
  the session's status. `--tapbox-learn FILE` runs it in learn mode and writes FILE at the end
  (an allowlist, or a profile if FILE ends in .toml). It needs the plugin loaded through its
  entry point or `-p tapbox.pytest_plugin` (a conftest comes too late).
- At the end, a short report of what the sandboxed tests connected to (from the session's log,
  or the marked tests' logs; pytest-xdist workers send theirs to the controller).
- `tapbox_flows`: a test's view of its own records so far (tapbox.inside(), filtered to the
  test's time in session mode).

Nothing here runs unless a marker or an option asks for it: loaded and unused, the plugin only
registers its marker, options and fixture.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Generator
from typing import Any

import pytest

MARKER = "tapbox"
_SESSION = pytest.StashKey["_Session"]()
_REPORT = pytest.StashKey["Counter[tuple[str, str]]"]()
_DENIED_BY = pytest.StashKey["dict[str, list[str]]"]()
_LOGS = pytest.StashKey[str]()  # the directory of the marked tests' event logs
_WORKER_OUTPUT = "tapbox"
_REPORT_LINES = 12


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tapbox", "tapbox: run the session or marked tests in a sandbox")
    group.addoption("--tapbox-profile", action="append", default=[], metavar="FILE",
                    help="run the whole session in a tapbox sandbox with this profile "
                         "(docs/profiles.md; may repeat)")
    group.addoption("--tapbox-allow", action="append", default=[], metavar="RULE",
                    help="run the whole session in a tapbox sandbox that allows RULE "
                         "(may repeat; adds to the profile's rules)")
    group.addoption("--tapbox-learn", metavar="FILE",
                    help="run the whole session in a tapbox sandbox in learn mode, then write "
                         "to FILE the allowlist it needed (a profile if FILE ends in .toml)")


# ------------------------------------------------------------------------------------------------
# The session in one sandbox


class _Session:
    def __init__(self, log: str | None) -> None:
        self.log = log


def _session_options(config: pytest.Config) -> dict[str, Any] | None:
    option = config.known_args_namespace if hasattr(config, "known_args_namespace") \
        else config.option
    profiles = getattr(option, "tapbox_profile", None) or []
    rules = getattr(option, "tapbox_allow", None) or []
    learn = getattr(option, "tapbox_learn", None)
    if not (profiles or rules or learn):
        return None
    options: dict[str, Any] = {}
    if profiles:
        options["profile"] = [os.path.abspath(p) for p in profiles]
    if rules:
        options["allow"] = list(rules)
    if learn:
        options["learn"] = os.path.abspath(learn)
    return options


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> Generator[None, None, None]:
    options = _session_options(early_config)
    if options is not None:
        import tapbox

        here = tapbox.inside()
        if here is not None and os.environ.get("PYTEST_XDIST_WORKER"):
            early_config.stash[_SESSION] = _Session(here.log)  # the controller entered
        else:
            try:
                entered = tapbox.enter(**options)
            except tapbox.TapboxError as exc:
                text = str(exc)
                raise pytest.UsageError(text if text.startswith("tapbox:")
                                        else f"tapbox: {text}") from None
            early_config.stash[_SESSION] = _Session(entered.log if entered else None)
    yield


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(**options): run this test in a tapbox sandbox; the options are "
        "tapbox.call's (allow=[...], allowlists=, network=False, dns_upstream=, profile=, ...), "
        "and check=False lets a denied connection pass (docs/api.md)")
    config.stash[_REPORT] = Counter()
    config.stash[_DENIED_BY] = {}


# ------------------------------------------------------------------------------------------------
# One test in one sandbox


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        yield
        return
    original = item.runtest
    item.runtest = functools.partial(_run_sandboxed, item, original, marker)  # type: ignore
    try:
        yield
    finally:
        del item.runtest  # type: ignore[method-assign]


def _log_path(item: pytest.Item) -> str:
    """A fresh event log for the test, in the plugin's own temporary directory."""
    directory = item.config.stash.get(_LOGS, None)
    if directory is None:
        import tempfile

        directory = item.config.stash[_LOGS] = tempfile.mkdtemp(prefix="tapbox-pytest-")
    digest = hashlib.sha256(item.nodeid.encode()).hexdigest()[:16]
    return os.path.join(directory, f"{digest}.jsonl")


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = config.stash.get(_LOGS, None)
    if directory is not None:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


def _run_sandboxed(item: pytest.Item, runtest: Callable[[], None], marker: pytest.Mark) -> None:
    __tracebackhide__ = True
    import tapbox

    if marker.args:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} takes keyword "
                                "arguments only")
    problem = _loop_outside(item)
    if problem:
        pytest.fail(problem, pytrace=False)
    options = _show_temporary_directories(item, dict(marker.kwargs))
    check = options.pop("check", True)
    options.setdefault("report", "quiet")  # the failure and the final report say it
    log = _log_path(item) if options.get("network", True) is not False else None
    error: BaseException | None = None
    outcome: Any = None
    try:
        outcome = tapbox.call(_child, runtest, log=log, pass_fds=_stdio_fds(), **options)
    except Exception as exc:  # noqa: BLE001 - reported below, denials first
        error = exc
    records = tapbox.Records()
    if log is not None:
        try:
            records = tapbox.read_log(log)
            os.unlink(log)
        except OSError:
            pass
    _tally(item.config, records, item.nodeid)
    denied = records.denied
    if check and denied:
        message = _denied_message(denied)
        if error is not None:
            message += f"\n(the test then failed with {type(error).__name__}: {error})"
            cause = error.__cause__
            if isinstance(cause, tapbox.RemoteTraceback):
                message += "\n\n" + cause.text
        pytest.fail(message, pytrace=False)
    if error is not None:
        raise error.with_traceback(None)
    _replay(outcome)


def _show_temporary_directories(item: pytest.Item, options: dict[str, Any]) -> dict[str, Any]:
    """The marker's options, plus what pytest prepared for the test, shown to its sandbox on
    purpose (the default view's /tmp is the sandbox's own): the test's `tmp_path`/`tmpdir`
    writable, the session's temporary directory (tmp_path_factory: what its fixtures made)
    read-only. They come before the marker's own paths of the same kind, so the marker's win."""
    funcargs = getattr(item, "funcargs", {})
    shown: dict[str, list[str]] = {"read": [], "write": []}
    factory = funcargs.get("tmp_path_factory")
    if factory is not None:
        shown["read"].append(os.fspath(factory.getbasetemp()))
    for name in ("tmp_path", "tmpdir"):
        if funcargs.get(name) is not None:
            shown["write"].append(os.fspath(funcargs[name]))
    merged = {action: paths for action, paths in shown.items()
              if paths and action not in options}
    for keyword, value in options.items():
        if shown.get(keyword):
            given = [value] if isinstance(value, str | os.PathLike) else list(value or ())
            value = [*shown[keyword], *given]
        merged[keyword] = value
    return merged


def _loop_outside(item: pytest.Item) -> str | None:
    """Why the test cannot run in its sandbox: an anyio test with async fixtures, whose event
    loop anyio started in pytest's own process for the fixtures (the sandbox has a copy of the
    process, not of that loop's thread and descriptors)."""
    if "anyio_backend" not in getattr(item, "fixturenames", ()):
        return None
    import inspect

    async_fixtures = []
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name, defs in definitions.items():
        for fixturedef in defs:
            func = getattr(fixturedef, "func", None)
            if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func) \
                    or getattr(func, "__module__", None) == "anyio.pytest_plugin":
                async_fixtures.append(name)  # (anyio < 4.1 puts a wrapper of its own there)
    # ...and anyio's runner, alive in this process while an async fixture holds it
    runner = getattr(sys.modules.get("anyio.pytest_plugin"), "_current_runner", None)
    if not async_fixtures and runner is None:
        return None
    which = f" ({', '.join(async_fixtures)})" if async_fixtures else ""
    return (f"tapbox: {item.nodeid} is an anyio test with an async fixture{which}: anyio runs "
            "those in an event loop of pytest's process, which the test's sandbox cannot "
            "share. Make the fixture synchronous, or sandbox the whole session "
            "(--tapbox-profile / --tapbox-allow)")


def _child(runtest: Callable[[], None]) -> tuple[str, Any] | None:
    """In the sandbox: run the test; pytest's own outcomes come back as data."""
    try:
        runtest()
    except pytest.skip.Exception as exc:
        return ("skip", exc.msg)
    except pytest.xfail.Exception as exc:
        return ("xfail", exc.msg)
    except pytest.fail.Exception as exc:
        return ("fail", (exc.msg, exc.pytrace))
    except pytest.exit.Exception as exc:
        return ("exit", (exc.msg, exc.returncode))
    except Exception as exc:
        raise exc.with_traceback(_from_test_code(exc.__traceback__)) from exc.__cause__
    return None


def _from_test_code(tb: Any) -> Any:
    """The traceback from its first frame outside pytest, pluggy and tapbox (the test's)."""
    start = tb
    while start is not None:
        module = start.tb_frame.f_globals.get("__name__", "")
        if not module.startswith(("_pytest.", "pluggy.", "tapbox.")):
            return start
        start = start.tb_next
    return tb


def _replay(outcome: Any) -> None:
    __tracebackhide__ = True
    if outcome is None:
        return
    kind, value = outcome
    if kind == "skip":
        pytest.skip(value)
    if kind == "xfail":
        pytest.xfail(value)
    if kind == "fail":
        pytest.fail(value[0], pytrace=value[1])
    if kind == "exit":
        pytest.exit(value[0], value[1])


def _stdio_fds() -> list[int]:
    """The descriptors behind sys.stdout and sys.stderr (pytest's capture files), so that what
    the test prints inside reaches pytest's report as it would outside."""
    fds = []
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        if fd > 2:
            fds.append(fd)
    return fds


def _denied_message(denied: list[Any]) -> str:
    names: list[str] = []
    for item in denied:
        text = getattr(item, "destination", None) or str(item)
        if text not in names:
            names.append(text)
    return "tapbox denied: " + ", ".join(names)


# ------------------------------------------------------------------------------------------------
# tapbox_flows


class TapboxFlows:
    """What tapbox recorded of this test's network use so far (tapbox.Records: flows, dns,
    denied), read as it grows. A flow shows up once tapbox knows which process made it
    (usually within milliseconds): `wait_for()` waits until a condition holds."""

    def __init__(self, since: float | None) -> None:
        self.since = since

    def records(self) -> Any:
        import tapbox

        here = tapbox.inside()
        if here is None:
            raise RuntimeError("tapbox_flows: not inside a tapbox sandbox (only the test "
                               "function runs in the marked test's sandbox)")
        records = here.records()
        if self.since is None:
            return records
        since = self.since
        return tapbox.Records(
            flows=tuple(f for f in records.flows if f.start >= since),
            dns=tuple(q for q in records.dns if q.time >= since),
            events=records.events, truncated=records.truncated)

    @property
    def flows(self) -> tuple[Any, ...]:
        return tuple(self.records().flows)

    @property
    def dns(self) -> tuple[Any, ...]:
        return tuple(self.records().dns)

    @property
    def denied(self) -> list[Any]:
        return list(self.records().denied)

    def destinations(self, verdict: str | None = None) -> list[str]:
        """Each destination once, in order: "tcp 192.0.2.10:80 (api.example.test)"."""
        seen: list[str] = []
        for flow in self.records().flows:
            if (verdict is None or flow.verdict == verdict) and str(flow) not in seen:
                seen.append(str(flow))
        return seen

    def wait_for(self, condition: Callable[[Any], bool], timeout: float = 5.0) -> Any:
        """The records, once `condition(records)` is true; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if condition(records):
                return records
            if time.monotonic() >= deadline:
                raise AssertionError(f"tapbox_flows: not true within {timeout:g} s; flows: "
                                     + (", ".join(str(f) for f in records.flows) or "none"))
            time.sleep(0.02)


@pytest.fixture
def tapbox_flows(request: pytest.FixtureRequest) -> TapboxFlows:
    """This test's connections, as tapbox records them (docs/api.md)."""
    if request.node.get_closest_marker(MARKER) is not None:
        return TapboxFlows(since=None)  # the test's own sandbox: all of its log
    if request.config.stash.get(_SESSION, None) is not None:
        return TapboxFlows(since=time.time())
    pytest.fail("tapbox_flows: this test does not run in a tapbox sandbox: mark it "
                f"@pytest.mark.{MARKER}(...) or run pytest with --tapbox-profile / "
                "--tapbox-allow", pytrace=False)


# ------------------------------------------------------------------------------------------------
# The report


def _tally(config: pytest.Config, records: Any, nodeid: str | None = None) -> None:
    report = config.stash.get(_REPORT, None)
    if report is None:
        return
    for flow in records.flows:
        report[(flow.verdict, str(flow))] += 1
    for query in records.dns:
        if query.denied:
            report[("denied", str(query))] += 1
    if nodeid is not None:
        denied_by = config.stash[_DENIED_BY]
        for item in records.denied:
            tests = denied_by.setdefault(str(item), [])
            if nodeid not in tests and len(tests) < 3:
                tests.append(nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller reports
        report = config.stash.get(_REPORT, Counter())
        workeroutput[_WORKER_OUTPUT] = json.dumps({
            "report": [[v, d, n] for (v, d), n in report.items()],
            "denied_by": config.stash.get(_DENIED_BY, {})})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist: a worker is done; take its report."""
    data = getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT)
    if not data:
        return
    config = node.config
    report = config.stash.get(_REPORT, None)
    if report is None:
        return
    received = json.loads(data)
    for verdict, destination, count in received["report"]:
        report[(verdict, destination)] += count
    denied_by = config.stash[_DENIED_BY]
    for destination, tests in received["denied_by"].items():
        denied_by.setdefault(destination, []).extend(tests)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    report = config.stash.get(_REPORT, None)
    if report is None:
        return
    session = config.stash.get(_SESSION, None)
    if session is not None and session.log is not None:
        import tapbox

        try:
            _tally(config, tapbox.read_log(session.log))
        except OSError:
            pass
    if session is None and not report:
        return
    terminalreporter.write_sep("-", "tapbox: what the sandboxed tests connected to")
    if not report:
        terminalreporter.write_line("nothing")
        return
    order = {"denied": 0, "would-deny": 1, "allowed": 2}
    rows = sorted(report.items(), key=lambda row: (order.get(row[0][0], 3), -row[1], row[0][1]))
    denied_by = config.stash[_DENIED_BY]
    for (verdict, destination), count in rows[:_REPORT_LINES]:
        tests = denied_by.get(destination, [])
        where = f"  ({', '.join(tests)})" if tests else ""
        terminalreporter.write_line(f"{verdict:<10} {count:>5}  {destination}{where}")
    if len(rows) > _REPORT_LINES:
        terminalreporter.write_line(f"... and {len(rows) - _REPORT_LINES} more destinations")
