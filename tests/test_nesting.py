"""tapbox inside tapbox (and inside an `unshare -U` shell): works unprivileged, only narrows.

End to end in the fake internet: the outer tapbox runs `python -m tapbox` inside, whose DNS
upstream is the outer's resolver (its /etc/resolv.conf names 10.0.2.3) and whose host network
is the outer's tap0, so every connection the innermost command makes is decided by every level.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CLIENT, REPO_ROOT, RunTapbox, setpriv_prefix, tapbox_env
from fakenet import FakeNet

PY = sys.executable
NOBODY = 65534
SHORT = 90.0


TUN = ("--write", "/dev/net/tun")  # a level with a tapbox inside shows it the TUN device


def tapbox(*args: str) -> list[str]:
    """An inner tapbox's argv (its upstream is the outer's DNS, from its resolv.conf)."""
    return [PY, "-m", "tapbox", *args, "--"]


def client(*args: str) -> list[str]:
    return [PY, str(CLIENT), *args]


def test_tapbox_inside_tapbox_mounts_its_own_resolv_conf(run_tapbox: RunTapbox,
                                                         fakenet: FakeNet) -> None:
    """Was: "bind-mounting a private resolv.conf over /etc/resolv.conf: No such file or
    directory" (the outer's resolv.conf was a bind of a file already deleted)."""
    proc = run_tapbox(*TUN, cmd=[*tapbox("--allow", "api.example.test:80"), "sh", "-c",
                                 "cat /etc/resolv.conf"], allow=["api.example.test:80"],
                      timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "nameserver 10.0.2.3"


@pytest.mark.parametrize("user", [None, NOBODY], ids=["root", "unprivileged"])
def test_three_levels_each_only_narrows(run_tapbox: RunTapbox, fakenet: FakeNet,
                                        user: int | None) -> None:
    """Level 1 (outer) allows A and X; level 2 allows A and Y; level 3 (inner) allows A and Z:
    only A, which all three allow, is reached; X, Y and Z are each allowed by one level only."""
    a, x, y, z = "api.example.test:80", "203.0.113.10:80", "198.51.100.20:80", "203.0.113.7:80"
    script = "; ".join(f"{PY} {CLIENT} connect {h} {p}" for h, p in (
        ("api.example.test", 80), ("203.0.113.10", 80), ("198.51.100.20", 80),
        ("203.0.113.7", 80)))
    cmd = [*tapbox(*TUN, "--allow", a, "--allow", y),
           *tapbox("--allow", a, "--allow", z), "sh", "-c", script]
    proc = run_tapbox(*TUN, cmd=cmd, allow=[a, x], user=user, timeout=SHORT)
    results = [json.loads(line)["result"] for line in proc.stdout.splitlines()]
    assert results == ["ok", "refused", "refused", "refused"], proc.stdout + proc.stderr
    reached = {(c.local_addr, c.local_port) for c in fakenet.connections() if c.kind == "blob"}
    assert reached == {("192.0.2.10", 80)}, reached
    # Each refusal is made, and named, by the level whose allowlist lacks it: X by the inner
    # two, Y by levels 1 and 3, Z by levels 1 and 2. The innermost refuses what it can.
    assert "denied tcp 203.0.113.10:80" in proc.stderr
    assert "denied tcp 198.51.100.20:80" in proc.stderr
    assert "denied tcp 203.0.113.7:80" in proc.stderr


def test_an_inner_dns_name_must_pass_the_outer_too(run_tapbox: RunTapbox,
                                                   fakenet: FakeNet) -> None:
    proc = run_tapbox(*TUN, cmd=[*tapbox("--allow", "api.example.test", "--allow",
                                         "twin.example.test"),
                                 *client("resolve", "twin.example.test")],
                      allow=["api.example.test"], timeout=SHORT)
    assert json.loads(proc.stdout)["error"] == "NXDOMAIN", proc.stdout + proc.stderr
    assert "twin.example.test  (no rule)" in proc.stderr  # the outer denied it


def test_an_inner_tapbox_without_the_tun_device_says_what_to_do(run_tapbox: RunTapbox,
                                                                fakenet: FakeNet) -> None:
    proc = run_tapbox(cmd=[*tapbox("--allow", "api.example.test"), "true"], timeout=SHORT)
    assert proc.returncode == 125
    assert "tapbox: /dev/net/tun is missing here: inside another sandbox, give that one the " \
        "device (tapbox --write /dev/net/tun;" in proc.stderr, proc.stderr


def test_no_nest_forbids_user_namespaces_inside(run_tapbox: RunTapbox) -> None:
    script = ("unshare -U true; echo unshare=$?; "
              f"{PY} -m tapbox -n -- true; echo tapbox=$?; "
              "cat /proc/sys/user/max_user_namespaces")
    proc = run_tapbox("-n", "--no-nest", "--root", cmd=["sh", "-c", script], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == ["unshare=1", "tapbox=125", "0"], proc.stdout + proc.stderr
    assert "disabled by user.max_user_namespaces = 0" in proc.stderr
    assert "inside another sandbox, that sandbox may forbid it (tapbox --no-nest" in proc.stderr


def test_no_nest_cannot_be_undone_inside_even_as_root(run_tapbox: RunTapbox) -> None:
    script = ("echo 100 > /proc/sys/user/max_user_namespaces; "
              "cat /proc/sys/user/max_user_namespaces; unshare -U true && echo escaped")
    proc = run_tapbox("-n", "--no-nest", "--root", cmd=["sh", "-c", script], timeout=SHORT)
    assert proc.stdout.splitlines() == ["0"], proc.stdout + proc.stderr
    assert "Permission denied" in proc.stderr


def test_nesting_is_allowed_by_default(run_tapbox: RunTapbox) -> None:
    proc = run_tapbox("-n", cmd=["sh", "-c", "unshare -U true && echo nested"], timeout=SHORT)
    assert proc.stdout == "nested\n", proc.stderr


def _as_nobody(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = tapbox_env({"HOME": "/tmp"})
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run([*setpriv_prefix(NOBODY), *argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=SHORT)


def test_in_an_unshare_user_shell(fakenet: FakeNet) -> None:
    for mapping in ("--map-current-user", "--map-root-user"):
        proc = _as_nobody(["unshare", "-U", mapping, PY, "-m", "tapbox", "--dns-upstream",
                           "198.51.100.53", "--allow", "api.example.test:80", "--",
                           *client("hello", "api.example.test", "80")])
        assert proc.returncode == 0, (mapping, proc.stderr)
        assert json.loads(proc.stdout)["reply"].startswith("hello from 192.0.2.10:80")


def test_in_an_unshare_user_shell_without_a_mapping() -> None:
    proc = _as_nobody(["unshare", "-U", PY, "-m", "tapbox", "-n", "--", "true"])
    assert proc.returncode == 125
    assert proc.stderr.startswith(
        "tapbox: cannot create the sandbox's user namespace: tapbox's user id has no mapping "
        "in the user namespace it runs in"), proc.stderr
    assert "unshare -U --map-current-user" in proc.stderr and proc.stderr.count("\n") == 1
