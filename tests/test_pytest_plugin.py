"""The pytest plugin (tapbox/pytest_plugin.py) on small test projects run with pytester, in the
fake internet: marked tests, a sandboxed session, learn mode, the report, tapbox_flows,
pytest-xdist, pytest-trio and anyio."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from fakenet import DNS_UPSTREAM, FakeNet

HELPERS = '''
import socket

def hello(host, port=80):
    """One connection to a fake server: its greeting, or the error's name."""
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"HELLO\\n")
            return sock.makefile().readline().strip()
    except OSError as exc:
        return type(exc).__name__
'''


@pytest.fixture
def project(pytester: pytest.Pytester, fakenet: FakeNet,
            monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A test project whose pytest imports tapbox from this checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO_ROOT), str(pytester.path), os.environ.get("PYTHONPATH", "")) if p))
    pytester.makepyfile(helpers=HELPERS)
    return pytester


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    return project.runpytest_subprocess("-p", "tapbox.pytest_plugin", "-p", "no:cacheprovider",
                                        *args, timeout=180)


MARKED = f'''
import os, socket, subprocess, sys
import pytest
from helpers import hello

NET = dict(allow=["api.example.test:80"], dns_upstream="{DNS_UPSTREAM}")

@pytest.mark.tapbox(**NET)
def test_allowed(tapbox_flows, tmp_path):
    assert hello("api.example.test") == "hello from 192.0.2.10:80"
    (tmp_path / "written").write_text("inside")  # fixtures are the test's, as usual
    records = tapbox_flows.wait_for(lambda r: r.flows)
    assert tapbox_flows.destinations() == ["tcp 192.0.2.10:80 (api.example.test)"]
    assert os.environ["TAPBOX"] == "1"
    print("printed inside")

@pytest.mark.tapbox(**NET)
def test_denied_but_swallowed():
    assert hello("203.0.113.7") == "ConnectionRefusedError"  # the code hides the refusal

@pytest.mark.tapbox(**NET)
def test_denied_in_a_subprocess():
    subprocess.run([sys.executable, "-c", "import socket; "
                    "socket.socket().connect_ex(('198.51.100.20', 80))"], check=True)

@pytest.mark.tapbox(check=False, **NET)
def test_denied_allowed_by_check_false(tapbox_flows):
    assert hello("203.0.113.10") == "ConnectionRefusedError"
    assert [str(d) for d in tapbox_flows.denied] == ["tcp 203.0.113.10:80"]

@pytest.mark.tapbox(network=False)
def test_skipped_inside():
    pytest.skip("skipped inside the sandbox")

@pytest.mark.xfail(strict=True, reason="known")
@pytest.mark.tapbox(network=False)
def test_xfail_inside():
    assert False

@pytest.mark.tapbox(network=False)
def test_assertion_inside():
    left = 1
    assert left == 2

def test_unmarked_is_not_sandboxed():
    assert hello("203.0.113.7") == "hello from 203.0.113.7:80"
    assert "TAPBOX" not in os.environ
'''


def test_marked_tests_run_sandboxed(project: pytest.Pytester, fakenet: FakeNet) -> None:
    project.makepyfile(test_marked=MARKED)
    result = run(project, "-rA")
    result.assert_outcomes(passed=3, failed=3, skipped=1, xfailed=1)
    out = result.stdout.str()
    # A denial fails the test naming the destination, whatever the code made of it.
    result.stdout.fnmatch_lines([
        "*test_denied_but_swallowed*",
        "*tapbox denied: tcp 203.0.113.7:80*",
    ])
    result.stdout.fnmatch_lines(["*test_denied_in_a_subprocess*",
                                 "*tapbox denied: tcp 198.51.100.20:80*"])
    result.stdout.fnmatch_lines(["*assert 1 == 2*"])  # the assertion as pytest rewrote it
    result.stdout.fnmatch_lines(["*SKIPPED*skipped inside the sandbox*"])
    assert "printed inside" in out  # captured and shown (-rA) as for any test
    # the report at the end
    result.stdout.fnmatch_lines([
        "*tapbox: what the sandboxed tests connected to*",
        "denied*1  tcp 203.0.113.7:80*test_marked.py::test_denied_but_swallowed*",
    ])
    assert "allowed        1  tcp 192.0.2.10:80 (api.example.test)" in out
    # the denied destinations were never reached; the unmarked test reached its server
    assert not fakenet.connections("198.51.100.20") and not fakenet.connections("203.0.113.10")
    assert len(fakenet.connections("203.0.113.7")) == 1


TEMPORARY = """
import errno, os, pytest

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text("prepared outside")
    return path

@pytest.mark.tapbox(network=False)
def test_tmp_path_is_the_tests_own(tmp_path, data):
    (tmp_path / "out").write_text("written inside")
    assert data.read_text() == "prepared outside"
    with pytest.raises(OSError) as caught:
        data.write_text("changed")  # what the session's fixtures made: read-only
    assert caught.value.errno == errno.EROFS
    with pytest.raises(OSError) as caught:
        open("/var/tmp/tapbox-plugin-test", "w")  # the host: read-only
    assert caught.value.errno == errno.EROFS
"""


def test_marked_test_sees_what_pytest_prepared(project: pytest.Pytester, tmp_path: Path) -> None:
    """pytest's temporary directories are under the host's /tmp, which the sandbox's default
    view replaces: the plugin shows them on purpose."""
    basetemp = tmp_path / "basetemp"  # outside the project's directory (the writable one)
    project.makepyfile(test_temporary=TEMPORARY)
    result = run(project, f"--basetemp={basetemp}")
    result.assert_outcomes(passed=1)
    assert (basetemp / "test_tmp_path_is_the_tests_own0" / "out").read_text() == \
        "written inside"
    assert not os.path.exists("/var/tmp/tapbox-plugin-test")


def test_unused_plugin_changes_nothing(project: pytest.Pytester) -> None:
    project.makepyfile(test_plain="""
        from helpers import hello
        def test_plain():
            assert hello("203.0.113.7") == "hello from 203.0.113.7:80"
        def test_flows_need_a_sandbox(tapbox_flows):
            pass
    """)
    result = run(project)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*tapbox_flows: this test does not run in a tapbox sandbox*"])
    assert "what the sandboxed tests connected to" not in result.stdout.str()


SESSION = '''
import os, subprocess, sys
from helpers import hello

XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))

def test_allowed(tapbox_flows):
    assert hello("api.example.test") == "hello from 192.0.2.10:80"
    tapbox_flows.wait_for(lambda r: r.flows)
    mine = ["tcp 192.0.2.10:80 (api.example.test)"]
    assert set(mine) <= set(tapbox_flows.destinations()) if XDIST else \
        tapbox_flows.destinations() == mine

def test_denied_in_a_subprocess_too(tapbox_flows):
    code = "from helpers import hello; print(hello('203.0.113.7'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out == "ConnectionRefusedError\\n"
    tapbox_flows.wait_for(lambda r: r.denied)
    if XDIST:  # the session's flows while this test ran: another worker's may be among them
        assert "tcp 203.0.113.7:80" in tapbox_flows.destinations()
    else:  # this test's flows only
        assert tapbox_flows.destinations() == ["tcp 203.0.113.7:80"]

def test_inside():
    assert os.environ["TAPBOX"] == "1"
    pytest_pid = os.getppid() if XDIST else os.getpid()  # the controller under xdist
    with open(f"/proc/{pytest_pid}/status") as status:  # a child of the sandbox's pid 1
        assert status.read().split("PPid:")[1].split()[0] == "1"
'''


def test_session_runs_sandboxed(project: pytest.Pytester, fakenet: FakeNet,
                                tmp_path: Path) -> None:
    profile = tmp_path / "suite.toml"
    profile.write_text(f'[network]\ndns_upstream = "{DNS_UPSTREAM}"\n'
                       'allow = ["api.example.test:80"]\n')
    project.makepyfile(test_session=SESSION)
    result = run(project, f"--tapbox-profile={profile}")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([
        "*tapbox: what the sandboxed tests connected to*",
        "denied*1  tcp 203.0.113.7:80",
        "allowed*1  tcp 192.0.2.10:80 (api.example.test)",
    ])
    result.stderr.fnmatch_lines(["*denied tcp 203.0.113.7:80*"])  # the supervisor's line
    assert result.ret == 0
    assert not fakenet.connections("203.0.113.7")


def test_session_exit_status_and_bad_profile(project: pytest.Pytester, tmp_path: Path) -> None:
    project.makepyfile(test_fail="def test_fail():\n    assert False\n")
    failed = run(project, "--tapbox-allow=192.0.2.10")
    failed.assert_outcomes(failed=1)
    assert failed.ret == 1  # pytest's status, through the supervisor
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nmtu = 1\n")
    refused = run(project, f"--tapbox-profile={bad}")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines([f"*tapbox: {bad}:2: network.mtu 1: must be between*"])


def test_session_learn_then_replay(project: pytest.Pytester, fakenet: FakeNet,
                                   tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text(f'[network]\ndns_upstream = "{DNS_UPSTREAM}"\n')
    learned = tmp_path / "learned.toml"
    project.makepyfile(test_needs=textwrap.dedent('''
        from helpers import hello
        def test_needs():
            assert hello("api.example.test") == "hello from 192.0.2.10:80"
            assert hello("203.0.113.10") == "hello from 203.0.113.10:80"
    '''))
    learn = run(project, f"--tapbox-profile={base}", f"--tapbox-learn={learned}")
    learn.assert_outcomes(passed=1)
    learn.stderr.fnmatch_lines([f"*learn: wrote 2 rules to {learned}*"])
    assert '"api.example.test:80"' in learned.read_text()
    replay = run(project, f"--tapbox-profile={base}", f"--tapbox-profile={learned}")
    replay.assert_outcomes(passed=1)
    assert "denied" not in replay.stdout.str() + replay.stderr.str()


def test_xdist_workers(project: pytest.Pytester, fakenet: FakeNet, tmp_path: Path) -> None:
    project.makepyfile(test_marked=MARKED)
    marked = run(project, "-n", "2")
    marked.assert_outcomes(passed=3, failed=3, skipped=1, xfailed=1)
    marked.stdout.fnmatch_lines([
        "*tapbox: what the sandboxed tests connected to*",
        "denied*1  tcp 203.0.113.7:80*test_marked.py::test_denied_but_swallowed*",
    ])
    (project.path / "test_marked.py").unlink()
    fakenet.reset()  # the unmarked test reached 203.0.113.7, as it may
    profile = tmp_path / "suite.toml"
    profile.write_text(f'[network]\ndns_upstream = "{DNS_UPSTREAM}"\n'
                       'allow = ["api.example.test:80"]\n')
    project.makepyfile(test_session=SESSION)
    session = run(project, "-n", "2", f"--tapbox-profile={profile}")
    session.assert_outcomes(passed=3)
    session.stdout.fnmatch_lines(["*tapbox: what the sandboxed tests connected to*",
                                  "denied*1  tcp 203.0.113.7:80"])
    assert not fakenet.connections("203.0.113.7")


def test_trio_and_anyio_tests(project: pytest.Pytester, fakenet: FakeNet) -> None:
    project.makepyfile(test_async=f'''
        import anyio, pytest, trio
        NET = dict(allow=["192.0.2.10:80"], dns_upstream="{DNS_UPSTREAM}")

        @pytest.fixture
        async def stream():  # a trio fixture: set up inside the sandbox, with the test
            return await trio.open_tcp_stream("192.0.2.10", 80)

        @pytest.mark.trio
        @pytest.mark.tapbox(**NET)
        async def test_trio_allowed(stream):
            await stream.send_all(b"HELLO\\n")
            assert await stream.receive_some(100) == b"hello from 192.0.2.10:80\\n"

        @pytest.mark.trio
        @pytest.mark.tapbox(**NET)
        async def test_trio_denied():
            with pytest.raises(OSError):
                await trio.open_tcp_stream("203.0.113.7", 80)

        @pytest.mark.anyio
        @pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
        @pytest.mark.tapbox(**NET)
        async def test_anyio(anyio_backend):
            async with await anyio.connect_tcp("192.0.2.10", 80) as stream:
                await stream.send(b"HELLO\\n")
                assert await stream.receive(100) == b"hello from 192.0.2.10:80\\n"

        @pytest.fixture
        async def later():  # anyio runs it in a loop of pytest's own process
            return 1

        @pytest.mark.anyio
        @pytest.mark.parametrize("anyio_backend", ["asyncio"])
        @pytest.mark.tapbox(**NET)
        async def test_anyio_async_fixture(anyio_backend, later):
            pass
    ''')
    result = run(project)
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["*test_trio_denied*", "*tapbox denied: tcp 203.0.113.7:80*"])
    result.stdout.fnmatch_lines(["*test_anyio_async_fixture* is an anyio test with an async "
                                 "fixture (later)*"])
