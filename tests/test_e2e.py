"""End-to-end tests: the real CLI (``python -m tapbox``) against the fake internet.

Every test runs tapbox inside the session's private network namespace (see conftest.py and
fakenet.py) with ``--dns-upstream 198.51.100.53``; the command inside the sandbox is usually
tests/client.py, which prints one JSON line. Each test checks both what the sandboxed program saw
and, where it matters, what the fake servers recorded (a denied flow must not reach its server).
Every tapbox run has a timeout, so a hang fails the test instead of blocking the session.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fakenet as fn
import pytest
from conftest import (
    CLIENT,
    REPO_ROOT,
    ClientRun,
    RunClient,
    RunTapbox,
    SpawnTapbox,
    read_line,
    setpriv_prefix,
    tapbox_env,
)
from fakenet import FakeNet

SHORT = 30.0  # seconds for a tapbox run that does a handful of small things
LONG = 300.0  # seconds for the 20 MB transfers
BIG = 20_000_000
NOBODY = 65534


def ok(run: ClientRun) -> dict[str, Any]:
    assert run.returncode == 0, run.describe()
    return run.expect_result()


def failed(run: ClientRun) -> dict[str, Any]:
    assert run.returncode == 1, run.describe()
    return run.expect_result()


# ------------------------------------------------------------------------------------------------
# Allowed names


def test_allowed_name_resolves_through_the_upstream(
    run_client: RunClient, fakenet: FakeNet
) -> None:
    run = run_client(
        "resolve",
        "api.example.test",
        "--type",
        "A",
        allow_file_text="api.example.test\n",
        timeout=SHORT,
    )
    assert ok(run)["addresses"] == ["192.0.2.10"], run.describe()
    assert fakenet.dns_queries(server=fn.DNS_UPSTREAM, qname="api.example.test"), (
        "tapbox answered without asking --dns-upstream 198.51.100.53"
    )


@pytest.mark.slow
def test_allowed_name_get_20mb(run_client: RunClient, fakenet: FakeNet) -> None:
    run = run_client(
        "get",
        "api.example.test",
        "80",
        str(BIG),
        allow_file_text="api.example.test\n",
        timeout=LONG,
    )
    result = ok(run)
    assert result["bytes"] == BIG
    assert result["sha256"] == fakenet.blob_sha256(BIG)
    served = [c for c in fakenet.connections(port=80) if c.command == f"GET {BIG}"]
    assert len(served) == 1 and served[0].bytes_out == BIG
    assert served[0].local_addr in ("192.0.2.10", "2001:db8::10")


@pytest.mark.slow
def test_allowed_name_put_20mb(run_client: RunClient, fakenet: FakeNet) -> None:
    run = run_client(
        "put",
        "api.example.test",
        "80",
        str(BIG),
        allow_file_text="api.example.test\n",
        timeout=LONG,
    )
    result = ok(run)
    assert result["server_sha256"] == result["sent_sha256"] == fakenet.blob_sha256(BIG)
    served = [c for c in fakenet.connections(port=80) if c.command == f"PUT {BIG}"]
    assert len(served) == 1


# ------------------------------------------------------------------------------------------------
# Denials


def test_denied_name_is_nxdomain_and_never_asked_upstream(
    run_client: RunClient, fakenet: FakeNet
) -> None:
    run = run_client("resolve", "denied.test", allow_file_text="api.example.test\n", timeout=SHORT)
    assert failed(run)["error"] == "NXDOMAIN", run.describe()
    assert fakenet.dns_queries(qname="denied.test") == [], "a denied name leaked upstream"


def test_denied_ip_is_refused_at_once_and_audited(run_client: RunClient, fakenet: FakeNet) -> None:
    run = run_client(
        "connect", "203.0.113.7", "80", allow_file_text="api.example.test\n", timeout=SHORT
    )
    result = failed(run)
    assert result["result"] == "refused", run.describe()
    assert result["seconds"] < 1.0, run.describe()
    assert "denied tcp 203.0.113.7:80" in run.stderr, run.describe()
    assert fakenet.connections("203.0.113.7", 80) == []


def test_port_rule_admits_only_that_port(run_client: RunClient, fakenet: FakeNet) -> None:
    allowed = run_client("connect", "192.0.2.10", "80", allow=["192.0.2.10:80"], timeout=SHORT)
    assert ok(allowed)["result"] == "ok"
    other = run_client("connect", "192.0.2.10", "8080", allow=["192.0.2.10:80"], timeout=SHORT)
    assert failed(other)["result"] == "refused", other.describe()
    assert len(fakenet.connections("192.0.2.10", 80)) == 1
    assert fakenet.connections("192.0.2.10", 8080) == []


def test_cidr_rule_admits_the_network(run_client: RunClient, fakenet: FakeNet) -> None:
    rules = "203.0.113.0/28\n"
    for addr in ("203.0.113.10", "203.0.113.7"):
        run = run_client("hello", addr, "80", allow_file_text=rules, timeout=SHORT)
        assert ok(run)["reply"] == f"hello from {addr}:80"
        assert len(fakenet.connections(addr, 80)) == 1
    outside = run_client("connect", "192.0.2.10", "80", allow_file_text=rules, timeout=SHORT)
    assert failed(outside)["result"] == "refused", outside.describe()
    assert fakenet.connections("192.0.2.10", 80) == []


def test_wildcard_rule_admits_subdomains_not_the_apex(
    run_client: RunClient, fakenet: FakeNet
) -> None:
    rules = "*.wild.test\n"
    for name in ("a.wild.test", "b.c.wild.test"):
        run = run_client("hello", name, "80", allow_file_text=rules, timeout=SHORT)
        assert ok(run)["reply"] == "hello from 192.0.2.20:80", run.describe()
    assert len(fakenet.connections("192.0.2.20", 80)) == 2
    apex = run_client("resolve", "wild.test", allow_file_text=rules, timeout=SHORT)
    assert failed(apex)["error"] == "NXDOMAIN", apex.describe()
    # the apex's address was never resolved for the sandbox, so it is not admitted either
    direct = run_client("connect", "192.0.2.21", "80", allow_file_text=rules, timeout=SHORT)
    assert failed(direct)["result"] == "refused", direct.describe()
    assert fakenet.connections("192.0.2.21", 80) == []


def test_ipv6_literal_rule_syntax(run_tapbox: RunTapbox) -> None:
    good = run_tapbox(cmd=["true"], allow_file_text="[2001:db8::10]:80\n", timeout=SHORT)
    assert good.returncode == 0, good.stderr
    bad = run_tapbox(cmd=["true"], allow_file_text="[2001:db8::10:80\n", timeout=SHORT)
    assert bad.returncode == 125, bad.stderr
    assert "allowed.txt:1:" in bad.stderr


def test_cname_target_follows_the_allowed_alias(run_client: RunClient, fakenet: FakeNet) -> None:
    rules = "alias.example.test\n"
    run = run_client(
        "resolve", "alias.example.test", "--type", "A", allow_file_text=rules, timeout=SHORT
    )
    assert ok(run)["addresses"] == ["198.51.100.20"], run.describe()
    hello = run_client("hello", "alias.example.test", "80", allow_file_text=rules, timeout=SHORT)
    assert ok(hello)["reply"] == "hello from 198.51.100.20:80", hello.describe()
    assert len(fakenet.connections("198.51.100.20", 80)) == 1


def test_direct_query_to_another_dns_server_is_refused(
    run_client: RunClient, fakenet: FakeNet
) -> None:
    run = run_client(
        "resolve-raw",
        "203.0.113.53",
        "api.example.test",
        allow_file_text="api.example.test\n",
        timeout=SHORT,
    )
    result = run.expect_result()
    assert run.returncode == 1 or not result.get("addresses"), run.describe()
    assert fakenet.dns_queries(server="203.0.113.53") == []
    assert fakenet.connections("203.0.113.53") == []


def test_rebinding_guard(run_client: RunClient, fakenet: FakeNet) -> None:
    """Allowed names whose answers point at link-local metadata or loopback are not reachable."""
    rules = "meta.example.test\nloop.example.test\n"
    for name in ("meta.example.test", "loop.example.test"):
        run = run_client("hello", name, "80", allow_file_text=rules, timeout=SHORT)
        result = run.expect_result()
        assert run.returncode == 1 and "reply" not in result, run.describe()
    assert fakenet.connections("169.254.169.254", 80) == []
    assert fakenet.connections("127.0.0.1", 80) == []


# ------------------------------------------------------------------------------------------------
# Exit status and signals


@pytest.mark.parametrize(
    ("script", "status"),
    [("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 143), ("kill -KILL $$", 137)],
)
def test_exit_status_is_the_commands(run_tapbox: RunTapbox, script: str, status: int) -> None:
    proc = run_tapbox(cmd=["sh", "-c", script], allow_file_text="api.example.test\n", timeout=SHORT)
    assert proc.returncode == status, proc.stderr


def test_stdin_and_stdout_pass_through(run_tapbox: RunTapbox) -> None:
    proc = run_tapbox(
        cmd=["sh", "-c", 'read x; echo "got $x"; exit 4'],
        input="hello\n",
        allow_file_text="api.example.test\n",
        timeout=SHORT,
    )
    assert (proc.returncode, proc.stdout) == (4, "got hello\n"), proc.stderr


@pytest.mark.parametrize("cmd", ["tapbox-test-no-such-command", "/nonexistent/tapbox-test"])
def test_missing_command_is_127(run_tapbox: RunTapbox, cmd: str) -> None:
    proc = run_tapbox(cmd=[cmd], allow_file_text="api.example.test\n", timeout=SHORT)
    assert proc.returncode == 127, proc.stderr


def test_non_executable_command_is_126(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    proc = run_tapbox("--read", str(tmp_path), cmd=[str(script)],
                      allow_file_text="api.example.test\n", timeout=SHORT)
    assert proc.returncode == 126, proc.stderr


def _pid_is_sleep(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return cmdline.startswith(b"sleep\0") and state != "Z"


def test_sigterm_to_tapbox_exits_143_promptly(spawn_tapbox: SpawnTapbox) -> None:
    proc = spawn_tapbox(
        cmd=["sh", "-c", "echo ready $$; exec sleep 30"], allow_file_text="api.example.test\n"
    )
    line = read_line(proc.stdout, SHORT)
    if line is None:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"the command never started (exit {proc.returncode}):\n{err}", pytrace=False)
    pid = int(line.split()[1])
    sleep_seen = _pid_is_sleep(pid)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("tapbox still running 10 s after SIGTERM", pytrace=False)
    assert status == 143, proc.stderr.read() if proc.stderr else ""
    assert time.monotonic() - start < 5
    if sleep_seen:  # the command must not outlive tapbox
        deadline = time.monotonic() + 5
        while _pid_is_sleep(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _pid_is_sleep(pid), "the sandboxed command outlived tapbox"


# ------------------------------------------------------------------------------------------------
# Allowlist files


def test_bad_allowlist_line_is_125_with_location(run_tapbox: RunTapbox) -> None:
    proc = run_tapbox(
        cmd=["sh", "-c", "echo COMMAND-RAN"],
        allow_file_text="api.example.test\n192.0.2.10:70000\n",
        timeout=SHORT,
    )
    assert proc.returncode == 125, proc.stderr
    assert "allowed.txt:2:" in proc.stderr
    assert "COMMAND-RAN" not in proc.stdout, "tapbox ran the command without its firewall"


def test_empty_allowlist_allows_nothing_and_warns(run_client: RunClient, fakenet: FakeNet) -> None:
    run = run_client("connect", "192.0.2.10", "80", allow_file_text="", timeout=SHORT)
    assert failed(run)["result"] == "refused", run.describe()
    assert re.search(r"warn|empty|nothing", run.stderr, re.IGNORECASE), run.describe()
    assert fakenet.connections() == []


# ------------------------------------------------------------------------------------------------
# UDP


def test_udp_allowed_echoes_denied_unreachable(run_client: RunClient, fakenet: FakeNet) -> None:
    rules = "192.0.2.10:5353\n"
    allowed = run_client("udp", "192.0.2.10", "5353", allow_file_text=rules, timeout=SHORT)
    assert ok(allowed)["result"] == "echo"
    assert len(fakenet.datagrams("192.0.2.10", 5353)) == 1
    denied = run_client("udp", "203.0.113.7", "5353", allow_file_text=rules, timeout=SHORT)
    assert failed(denied)["result"] == "unreachable", denied.describe()
    assert "denied udp 203.0.113.7:5353" in denied.stderr, denied.describe()
    assert fakenet.datagrams("203.0.113.7", 5353) == []


# ------------------------------------------------------------------------------------------------
# No-network mode


def test_no_network_mode(run_client: RunClient, run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    run = run_client(
        "connect", "192.0.2.10", "80", tapbox_args=["-n"], allow=["192.0.2.10"], timeout=SHORT
    )
    assert failed(run)["result"] in ("unreachable", "host-unreachable"), run.describe()
    assert fakenet.connections() == []
    proc = run_tapbox("-n", cmd=["sh", "-c", "exit 5"], timeout=SHORT)
    assert proc.returncode == 5, proc.stderr


# ------------------------------------------------------------------------------------------------
# Rootless


def _unreachable_dirs(path: Path) -> list[str]:
    """Directories on the way to ``path`` that 'others' cannot search (x bit)."""
    blocked = []
    for d in [*reversed(path.parents)]:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            blocked.append(str(d))
    return blocked


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*setpriv_prefix(NOBODY), *argv],
        capture_output=True,
        text=True,
        timeout=SHORT,
        cwd=REPO_ROOT,
        env=tapbox_env(),
    )


def rootless_problems() -> list[str]:
    """What stops an unprivileged uid from running tapbox here, each with the fix."""
    problems = []
    try:
        mode = os.stat("/dev/net/tun").st_mode
        if mode & 0o006 != 0o006:
            problems.append(
                f"/dev/net/tun is mode {stat.S_IMODE(mode):04o}: unprivileged users cannot "
                "open it. Fix: chmod 0666 /dev/net/tun"
            )
    except FileNotFoundError:
        problems.append("/dev/net/tun does not exist. Fix: modprobe tun (or mknod it, 10 200)")
    for what, path in (
        ("the Python interpreter", Path(sys.executable)),
        ("the repository", REPO_ROOT),
        ("tests/client.py", CLIENT),
    ):
        blocked = _unreachable_dirs(path)
        if blocked:
            problems.append(
                f"uid {NOBODY} cannot reach {what} ({path}): {', '.join(blocked)} not searchable "
                f"by others. Fix: chmod o+x {' '.join(blocked)} (or install Python/the repo "
                "outside them)"
            )
    if not problems:
        probe = _as_nobody(sys.executable, "-c", "import trio, dns.message, pyroute2, tapbox")
        if probe.returncode != 0:
            problems.append(
                f"uid {NOBODY} cannot import tapbox's dependencies with {sys.executable}: "
                f"{probe.stderr.strip()[-400:]}. Fix: make site-packages world-readable"
            )
        userns = _as_nobody("unshare", "--user", "--map-root-user", "--net", "true")
        if userns.returncode != 0:
            problems.append(
                "unprivileged user namespaces are disabled: "
                f"{userns.stderr.strip()}. Fix: sysctl -w user.max_user_namespaces=15000 "
                "(and kernel.unprivileged_userns_clone=1 / "
                "kernel.apparmor_restrict_unprivileged_userns=0 where those exist)"
            )
    return problems


def test_rootless_as_nobody(run_tapbox: RunTapbox, run_client: RunClient, fakenet: FakeNet) -> None:
    if fn.netns_state().mode != "root":
        pytest.skip(
            "this session is not root, so it cannot switch to uid 65534; the whole session "
            "already exercises the rootless path"
        )
    problems = rootless_problems()
    if problems:
        pytest.fail(
            "cannot run the rootless test; the machine (.ci/run) must fix:\n  - "
            + "\n  - ".join(problems),
            pytrace=False,
        )
    ident = run_tapbox(cmd=["id", "-u"], allow=["api.example.test"], user=NOBODY, timeout=SHORT)
    assert (ident.returncode, ident.stdout.strip()) == (0, str(NOBODY)), ident.stderr
    run = run_client(
        "hello", "api.example.test", "80", allow=["api.example.test"], user=NOBODY, timeout=SHORT
    )
    assert ok(run)["reply"] in ("hello from 192.0.2.10:80", "hello from [2001:db8::10]:80")
    assert len(fakenet.connections(port=80)) == 1
