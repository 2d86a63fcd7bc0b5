"""tapbox.isolate against the real kernel: namespaces, tap0, resolv.conf, exit codes, signals, tty.

These tests run as root (CI) or as any user allowed to create user namespaces with /dev/net/tun
usable. They spawn real sandboxes (the default, project view); commands write what they see into
files under tmp_path, which each test makes writable in the sandbox (`writable(tmp_path)`, the
API's --write), since the sandbox's /tmp is its own.
Tests of signal forwarding and of the terminal run a small tapbox-like parent script in a
subprocess (or on a pty), since the forwarder changes the signal mask of its process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tapbox.isolate import Sandbox, SandboxConfig, SetupError, diagnose, mounts
from tapbox.isolate import plan as plan_mod
from tapbox.isolate import tap as tap_mod
from tapbox.isolate.signals import SI_KERNEL, should_forward
from tapbox.options import FilesystemOptions, PathRule

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def writable(path: Path, action: str = "write") -> FilesystemOptions:
    """The project view with `path` (a test's tmp_path) writable, as --write PATH does."""
    return FilesystemOptions(paths=(PathRule(action, str(path)),))


def run(argv: list[str], **config: Any) -> int:
    """Spawn, start and wait; the exit code."""
    sb = Sandbox.spawn(SandboxConfig(argv, **config))
    try:
        sb.start()
        return sb.wait_status()
    finally:
        if sb.tap_fd is not None:
            os.close(sb.tap_fd)
        sb.close()


def sh(script: str, **config: Any) -> int:
    return run(["sh", "-c", script], **config)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# ---------------------------------------------------------------------------------------------
# Exit status


@pytest.mark.parametrize("network", [False, True])
def test_exit_status_propagates(network: bool) -> None:
    assert sh("exit 3", network=network) == 3
    assert sh("true", network=network) == 0


@pytest.mark.parametrize("network", [False, True])
def test_killed_by_signal_is_128_plus_n(network: bool) -> None:
    assert sh("kill -TERM $$", network=network) == 143
    assert sh("kill -KILL $$", network=network) == 137


def test_missing_command_is_127(capfd: pytest.CaptureFixture[str]) -> None:
    assert run(["tapbox-no-such-command-xyz"], network=False) == 127
    err = capfd.readouterr().err
    assert "tapbox: tapbox-no-such-command-xyz: No such file or directory" in err


def test_not_executable_is_126(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    assert run([str(script)], network=False, filesystem=writable(tmp_path, "read")) == 126
    assert f"tapbox: {script}: Permission denied" in capfd.readouterr().err


def test_path_search_and_arguments(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["sh", "-c", f'printf "%s|" "$0" "$@" > {out}', "zero", "x y", "", "z"]
    # "sh" found on PATH, arguments passed verbatim
    assert run(argv, network=False, filesystem=writable(tmp_path)) == 0
    assert out.read_text() == "zero|x y||z|"


def test_wait_status_is_cached_and_kill_after_exit_is_harmless() -> None:
    sb = Sandbox.spawn(SandboxConfig(["sh", "-c", "exit 4"], network=False))
    sb.start()
    sb.start()  # idempotent
    assert sb.returncode is None
    assert sb.wait_status() == 4
    assert sb.wait_status() == 4
    assert sb.returncode == 4
    sb.kill()  # reaped: no-op, and never signals a reused pid
    sb.close()


def test_empty_argv_is_a_setup_error() -> None:
    with pytest.raises(SetupError, match="no command"):
        Sandbox.spawn(SandboxConfig([], network=False))


# ---------------------------------------------------------------------------------------------
# Identity


@pytest.mark.parametrize("network", [False, True])
def test_uid_inside_is_the_callers(tmp_path: Path, network: bool) -> None:
    out = tmp_path / "ids"
    assert sh(f"id -u > {out}; id -g >> {out}", network=network,
              filesystem=writable(tmp_path)) == 0
    assert lines(out) == [str(os.getuid()), str(os.getgid())]


def test_root_maps_to_zero(tmp_path: Path) -> None:
    out = tmp_path / "ids"
    assert sh(f"id -u > {out}; id -g >> {out}", network=False, root=True,
              filesystem=writable(tmp_path)) == 0
    assert lines(out) == ["0", "0"]


# ---------------------------------------------------------------------------------------------
# Network layout

INSPECT = textwrap.dedent(
    """
    import json, sys
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        links = {l.get_attr("IFLA_IFNAME"): l for l in ipr.get_links()}
        addrs = [(a.get_attr("IFA_LABEL"), a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                 for a in ipr.get_addr(family=2)]
        routes = [(r["dst_len"], r.get_attr("RTA_GATEWAY")) for r in ipr.get_routes(family=2)
                  if r.get_attr("RTA_TABLE") == 254]
        json.dump({"links": {n: {"up": bool(l["flags"] & 1), "mtu": l.get_attr("IFLA_MTU")}
                             for n, l in links.items()},
                   "addrs": addrs, "routes": routes}, open(sys.argv[1], "w"))
    """
)


def test_tap0_layout(tmp_path: Path) -> None:
    out = tmp_path / "net.json"
    sysfs = tmp_path / "sysfs"
    route = tmp_path / "route"
    inspect = _script(tmp_path, "netdump.py", INSPECT)
    script = (
        f"cat /sys/class/net/tap0/mtu > {sysfs}; ls /sys/class/net >> {sysfs}; "
        f"cat /proc/net/route > {route}; {PY} {inspect} {out}"
    )
    assert sh(script, mtu=9000, filesystem=writable(tmp_path)) == 0
    net = json.loads(out.read_text())
    assert set(net["links"]) == {"lo", "tap0"}
    assert net["links"]["lo"]["up"] and net["links"]["tap0"]["up"]
    assert net["links"]["tap0"]["mtu"] == 9000
    assert ["tap0", "10.0.2.100", 24] in net["addrs"]
    assert [0, "10.0.2.2"] in net["routes"]
    # /sys shows the sandbox's own links (fresh sysfs), /proc/net the sandbox's netns.
    assert lines(sysfs) == ["9000", "lo", "tap0"]
    default = [
        ln.split() for ln in route.read_text().splitlines()[1:] if ln.split()[1] == "00000000"
    ]
    assert default and default[0][0] == "tap0"
    assert socket.inet_ntoa(struct.pack("<I", int(default[0][2], 16))) == "10.0.2.2"


def test_default_mtu_is_65520(tmp_path: Path) -> None:
    out = tmp_path / "mtu"
    assert sh(f"cat /sys/class/net/tap0/mtu > {out}", filesystem=writable(tmp_path)) == 0
    assert lines(out) == ["65520"]


def test_no_network_has_only_lo(tmp_path: Path) -> None:
    out = tmp_path / "out"
    host_resolv = (
        Path("/etc/resolv.conf").read_bytes() if Path("/etc/resolv.conf").exists() else b""
    )
    assert (
        sh(
            f"ls /sys/class/net > {out}; cat /sys/class/net/lo/operstate /sys/class/net/lo/flags "
            f">> {out}; cat /etc/resolv.conf > {out}.resolv 2>/dev/null; true",
            network=False, filesystem=writable(tmp_path),
        )
        == 0
    )
    listed = lines(out)
    assert listed[0] == "lo" and "tap0" not in listed
    assert int(listed[-1], 16) & 1  # IFF_UP
    assert Path(f"{out}.resolv").read_bytes() == host_resolv  # no private resolv.conf with -n


def test_sysfs_submounts_are_kept(tmp_path: Path) -> None:
    """The fresh /sys carries over what was mounted below the old one (e.g. /sys/fs/cgroup)."""
    host = sorted(mounts.top_submounts("/sys"))
    out = tmp_path / "mounts"
    assert sh(f"cat /proc/self/mountinfo > {out}", filesystem=writable(tmp_path)) == 0
    inside = [ln.split()[4] for ln in out.read_text().splitlines()]
    for mount_point in host:
        assert mount_point in inside
    sysfs_lines = [ln for ln in out.read_text().splitlines() if ln.split()[4] == "/sys"]
    assert len(sysfs_lines) >= 1


def test_invalid_mtu_is_a_setup_error() -> None:
    with pytest.raises(SetupError, match="MTU 70000"):
        Sandbox.spawn(SandboxConfig(["true"], mtu=70000))


# ---------------------------------------------------------------------------------------------
# resolv.conf


def test_private_resolv_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    real = Path(os.path.realpath("/etc/resolv.conf"))
    before = real.read_bytes()
    out = tmp_path / "resolv"
    assert sh(f"cat /etc/resolv.conf > {out}", filesystem=writable(tmp_path)) == 0
    assert out.read_text() == "nameserver 10.0.2.3\n"
    content = "nameserver 10.0.2.3\noptions ndots:1\n"
    assert sh(f"cat /etc/resolv.conf > {out}", resolv_conf=content,
              filesystem=writable(tmp_path)) == 0
    assert out.read_text() == content
    assert real.read_bytes() == before  # the host's file is untouched
    assert not list(tmp_path.glob("tapbox-resolv-*"))  # temp file removed after the mount


def test_missing_resolv_conf_is_a_setup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    dangling = tmp_path / "resolv.conf"
    dangling.symlink_to(tmp_path / "nowhere" / "stub-resolv.conf")
    monkeypatch.setattr(plan_mod, "RESOLV_CONF", str(dangling))
    with pytest.raises(SetupError) as info:
        Sandbox.spawn(SandboxConfig(["true"]))
    msg = str(info.value)
    assert msg.startswith("tapbox: ") and "\n" not in msg
    assert "does not exist" in msg and "stub-resolv.conf" in msg and "tapbox -n" in msg
    assert not list(tmp_path.glob("tapbox-resolv-*"))
    # -n needs no resolv.conf at all
    assert run(["true"], network=False) == 0


# ---------------------------------------------------------------------------------------------
# The TAP fd

VNET_HEADER_LEN = 10


def test_tap_fd_carries_the_sandboxs_frames() -> None:
    send = (
        "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.sendto(b'x', ('10.0.2.2', 9)); time.sleep(30)"
    )
    sb = Sandbox.spawn(SandboxConfig([PY, "-c", send]))
    assert sb.tap_fd is not None
    try:
        assert not os.get_blocking(sb.tap_fd)
        assert fcntl.fcntl(sb.tap_fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        sb.start()
        deadline = time.monotonic() + 10
        arp = None
        while arp is None and time.monotonic() < deadline:
            select.select([sb.tap_fd], [], [], 0.5)
            try:
                frame = os.read(sb.tap_fd, 65536)
            except BlockingIOError:
                continue
            # IFF_NO_PI | IFF_VNET_HDR: a 10-byte virtio-net header, then the Ethernet header.
            assert len(frame) >= VNET_HEADER_LEN + 14
            if frame[VNET_HEADER_LEN + 12:VNET_HEADER_LEN + 14] == b"\x08\x06":
                arp = frame[VNET_HEADER_LEN:]
        assert arp is not None, "no ARP request seen on the TAP fd"
        oper = struct.unpack_from("!H", arp, 20)[0]
        sender_ip, target_ip = arp[28:32], arp[38:42]
        assert oper == 1
        assert socket.inet_ntoa(sender_ip) == "10.0.2.100"
        assert socket.inet_ntoa(target_ip) == "10.0.2.2"
        assert arp[0:6] == b"\xff" * 6
    finally:
        sb.kill()
        assert sb.wait_status() == 137
        os.close(sb.tap_fd)
        sb.close()


def test_tap_fd_and_control_socket_not_inherited(tmp_path: Path) -> None:
    out = tmp_path / "fds"
    assert sh(f"ls -l /proc/$$/fd > {out}", filesystem=writable(tmp_path)) == 0
    listing = out.read_text()
    assert "/dev/net/tun" not in listing
    assert "tun" not in listing


# ---------------------------------------------------------------------------------------------
# Fail closed


@pytest.mark.parametrize("network", [False, True])
def test_no_exec_when_control_socket_closes_before_start(tmp_path: Path, network: bool) -> None:
    marker = tmp_path / "ran"
    sb = Sandbox.spawn(SandboxConfig(["touch", str(marker)], network=network,
                                     filesystem=writable(tmp_path)))
    if sb.tap_fd is not None:
        os.close(sb.tap_fd)
    sb.close()  # as if tapbox gave up: EOF on the control socket
    assert sb.wait_status() == 125
    assert not marker.exists()


def test_kill_before_start() -> None:
    sb = Sandbox.spawn(SandboxConfig(["true"], network=False))
    sb.kill()
    assert sb.wait_status() == 137
    sb.start()  # harmless on a dead child
    sb.close()


PARENT_DIES = textwrap.dedent(
    """
    import json, os, sys
    from tapbox.isolate import Sandbox, SandboxConfig
    from tapbox.options import FilesystemOptions, PathRule
    argv, start = json.loads(sys.argv[1]), sys.argv[2] == "start"
    here = os.path.dirname(os.path.abspath(__file__))  # the test's tmp_path: writable inside
    sb = Sandbox.spawn(SandboxConfig(argv, network=True, filesystem=FilesystemOptions(
        paths=(PathRule("write", here),))))
    if start:
        sb.start()
    print(sb.pid, flush=True)
    if start:
        sys.stdin.readline()  # the test says when to die
    os._exit(0)  # tapbox dies: no close, no cleanup
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_child_never_execs_if_tapbox_dies_before_start(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = _script(tmp_path, "parent.py", PARENT_DIES)
    proc = subprocess.run(
        [PY, str(script), json.dumps(["touch", str(marker)]), "nostart"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    child = int(proc.stdout)
    wait_for(lambda: not _alive(child), what="the orphaned sandbox child to exit")
    time.sleep(0.2)
    assert not marker.exists()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_command_dies_with_tapbox(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG on pid 1: a sandbox whose engine died is killed, not left netless."""
    script = _script(tmp_path, "parent.py", PARENT_DIES)
    proc = subprocess.Popen(
        [PY, str(script), json.dumps(["sleep", "60"]), "start"],
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    init = int(proc.stdout.readline())
    wait_for(lambda: [_comm(c) for c in _children(init)] == ["sleep"], what="exec of sleep")
    (command,) = _children(init)
    proc.stdin.write("die\n")
    proc.stdin.flush()
    assert proc.wait(timeout=10) == 0
    wait_for(lambda: not _alive(init), what="the sandbox's pid 1 to be killed")
    wait_for(lambda: not _alive(command), what="the sandboxed command to be killed")


def _state(pid: int) -> str:
    """The process state letter (R, S, T, Z...), "" if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _find_in_session(sid: int, argv: list[str], timeout: float = 10.0) -> int:
    """Wait for a process of session `sid` running exactly `argv`; its pid."""
    wanted = "\0".join(argv) + "\0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_text()
            except OSError:
                continue
            if int(fields[3]) == sid and cmdline == wanted:
                return int(entry.name)
        time.sleep(0.02)
    raise AssertionError(f"no process {argv} in session {sid}")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Set-up errors: one line naming cause and fix


def test_missing_tun_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tap_mod, "TUN_DEVICE", "/nonexistent/net/tun")
    with pytest.raises(SetupError) as info:
        Sandbox.spawn(SandboxConfig(["true"]))
    assert str(info.value) == (
        "tapbox: /nonexistent/net/tun is missing: load the tun module (modprobe tun) "
        "or run tapbox -n"
    )


def test_tun_permission_message(tmp_path: Path) -> None:
    fake = tmp_path / "tun"
    fake.write_text("")
    fake.chmod(0o600)
    msg = diagnose.tun_permission_failure(str(fake))
    assert "permission denied" in msg and "mode 0600" in msg
    assert f"chmod 0666 {fake}" in msg and "tapbox -n" in msg
    fake.chmod(0o666)
    assert "device cgroup" in diagnose.tun_permission_failure(str(fake))


def host(values: dict[str, str], unprivileged: bool = True) -> diagnose.Host:
    return diagnose.Host(unprivileged, values)


def test_userns_diagnosis_names_the_sysctl() -> None:
    fail = diagnose.unshare_failure
    msg = fail("user", errno.EPERM, host({"/proc/sys/kernel/unprivileged_userns_clone": "0"}))
    assert "kernel.unprivileged_userns_clone = 0" in msg
    assert "sysctl -w kernel.unprivileged_userns_clone=1" in msg

    msg = fail("user", errno.ENOSPC, host({"/proc/sys/user/max_user_namespaces": "0"}))
    assert "user.max_user_namespaces = 0" in msg and "sysctl -w user.max_user_namespaces=" in msg

    msg = fail("user", errno.ENOSPC, host({"/proc/sys/user/max_user_namespaces": "3"}))
    assert "limit" in msg and "user.max_user_namespaces (now 3)" in msg

    apparmor = {
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1",
        "/proc/sys/kernel/unprivileged_userns_clone": "1",
    }
    msg = fail("user", errno.EPERM, host(apparmor))
    assert "kernel.apparmor_restrict_unprivileged_userns = 1" in msg
    assert "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0" in msg
    # The AppArmor restriction usually lets unshare() succeed and fails the next privileged step.
    msg = diagnose.eperm_failure("creating tap0: Operation not permitted", host(apparmor))
    assert "apparmor_restrict_unprivileged_userns" in msg
    # ... and does not apply to real root.
    assert "apparmor" not in fail("user", errno.EPERM, host(apparmor, unprivileged=False))

    msg = fail("user", errno.EPERM, host({}))
    assert "seccomp" in msg and "container" in msg

    msg = fail(diagnose.OTHER_NAMESPACES, errno.ENOSPC,
               host({"/proc/sys/user/max_net_namespaces": "0"}))
    assert "user.max_net_namespaces = 0" in msg
    for m in (msg, fail("user", errno.EINVAL, host({}))):
        assert m.startswith("tapbox: ") and "\n" not in m


def _in_outer_userns(limit: str) -> subprocess.CompletedProcess[str]:
    """Run spawn() inside a user namespace whose namespace limit `limit` is 0."""
    script = textwrap.dedent(
        f"""
        import ctypes, os, sys
        from tapbox.isolate import Sandbox, SandboxConfig, SetupError
        uid, gid = os.getuid(), os.getgid()
        assert ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0
        open("/proc/self/setgroups", "w").write("deny")
        open("/proc/self/uid_map", "w").write(f"0 {{uid}} 1")
        open("/proc/self/gid_map", "w").write(f"0 {{gid}} 1")
        open("/proc/sys/user/{limit}", "w").write("0")
        try:
            Sandbox.spawn(SandboxConfig(["true"], network=False))
        except SetupError as e:
            print(e)
        """
    )
    return subprocess.run(
        [PY, "-c", script], env=_env(), capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("limit", "what"),
    [("max_user_namespaces", "user namespace"),
     ("max_net_namespaces", "network, mount, PID, IPC and UTS namespaces"),
     ("max_pid_namespaces", "network, mount, PID, IPC and UTS namespaces"),
     ("max_ipc_namespaces", "network, mount, PID, IPC and UTS namespaces"),
     ("max_uts_namespaces", "network, mount, PID, IPC and UTS namespaces")],
)
def test_namespace_limit_diagnosed_for_real(limit: str, what: str) -> None:
    proc = _in_outer_userns(limit)
    assert proc.returncode == 0, proc.stderr
    assert f"tapbox: cannot create the sandbox's {what}" in proc.stdout
    assert f"user.{limit} = 0" in proc.stdout and f"sysctl -w user.{limit}=" in proc.stdout


# ---------------------------------------------------------------------------------------------
# trio


async def test_async_wait() -> None:
    sb = Sandbox.spawn(SandboxConfig(["sh", "-c", "exit 5"], network=False))
    sb.start()
    assert await sb.wait() == 5
    assert await sb.wait() == 5
    sb.close()


async def test_async_wait_is_cancellable() -> None:
    sb = Sandbox.spawn(SandboxConfig(["sleep", "60"], network=False))
    sb.start()
    with trio.move_on_after(0.3) as scope:
        await sb.wait()
    assert scope.cancelled_caught
    sb.kill()
    with trio.fail_after(10):
        assert await sb.wait() == 137
    sb.close()


async def test_async_wait_without_pidfd() -> None:
    sb = Sandbox.spawn(SandboxConfig(["sh", "-c", "sleep 0.2; exit 6"], network=False))
    sb._close_pidfd()  # as on a kernel without pidfd_open: falls back to a thread
    sb.start()
    with trio.fail_after(10):
        assert await sb.wait() == 6


# ---------------------------------------------------------------------------------------------
# Signals and the terminal


def test_should_forward_rules() -> None:
    INT, HUP, TERM = signal.SIGINT, signal.SIGHUP, signal.SIGTERM
    SI_USER = 0
    assert should_forward(TERM, SI_USER, True, False)  # kill tapbox
    assert should_forward(INT, SI_USER, True, False)
    assert not should_forward(INT, SI_KERNEL, True, False)  # Ctrl-C: CMD already has it
    assert not should_forward(signal.SIGWINCH, SI_KERNEL, True, False)
    assert should_forward(INT, SI_KERNEL, False, False)  # CMD left our process group
    assert should_forward(HUP, SI_KERNEL, True, True)  # hang-up: only the session leader gets it
    assert not should_forward(HUP, SI_KERNEL, True, False)
    assert not should_forward(INT, SI_KERNEL, True, True)


FORWARDING_PARENT = textwrap.dedent(
    """
    import json, os, sys
    from tapbox.isolate import Sandbox, SandboxConfig, SignalForwarder
    from tapbox.options import FilesystemOptions, PathRule
    fwd = SignalForwarder()  # before any thread and before spawn, as the CLI does
    here = os.path.dirname(os.path.abspath(__file__))  # the test's tmp_path: writable inside
    writable = FilesystemOptions(paths=(PathRule("write", here),))
    sb = Sandbox.spawn(SandboxConfig(json.loads(sys.argv[1]), network=False, filesystem=writable))
    fwd.start(sb.pid)
    sb.start()
    code = sb.wait_status()
    fwd.stop()
    sys.exit(code)
    """
)

SIGNAL_RECORDER = textwrap.dedent(
    """
    import os, signal, sys, time
    log = sys.argv[1]
    def record(signo, frame):
        with open(log, "a") as f:
            f.write(signal.Signals(signo).name + "\\n")
        if signo in (signal.SIGTERM, signal.SIGUSR2):
            os._exit(7)
    for s in ("SIGINT", "SIGQUIT", "SIGHUP", "SIGWINCH", "SIGUSR1", "SIGUSR2", "SIGTERM",
              "SIGCONT"):
        signal.signal(getattr(signal, s), record)
    open(log + ".ready", "w").close()
    while True:
        time.sleep(0.05)
    """
)


def _recorder(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(tapbox-like parent script, signal log, argv of a command recording its signals)"""
    parent = _script(tmp_path, "parent.py", FORWARDING_PARENT)
    recorder = _script(tmp_path, "recorder.py", SIGNAL_RECORDER)
    log = tmp_path / "signals.log"
    return parent, log, [PY, str(recorder), str(log)]


def test_signals_sent_to_tapbox_are_forwarded(tmp_path: Path) -> None:
    parent, log, argv = _recorder(tmp_path)
    proc = subprocess.Popen([PY, str(parent), json.dumps(argv)], env=_env(), start_new_session=True)
    try:
        wait_for(Path(f"{log}.ready").exists, what="the recorder to start")
        expected: list[str] = []
        for sig in (signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH):
            os.kill(proc.pid, sig)
            expected.append(sig.name)
            wait_for(lambda: lines(log) == expected, what=f"{sig.name} to be forwarded")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 7
        assert lines(log) == [*expected, "SIGTERM"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sig_mask(status: str, field: str) -> int:
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/PID/status")


def _bit(signo: int) -> int:
    return 1 << (signo - 1)


@pytest.mark.parametrize("forwarder", [False, True])
def test_command_starts_with_default_signal_state(tmp_path: Path, forwarder: bool) -> None:
    """Empty mask, nothing caught; Python's SIGPIPE/SIGXFSZ ignores undone, others inherited."""
    out = tmp_path / "status"
    argv = ["sh", "-c", f"exec cat /proc/self/status > {out}"]
    if forwarder:  # the parent blocks the forwarded signals: the command must not inherit that
        parent = _script(tmp_path, "parent.py", FORWARDING_PARENT)
        proc = subprocess.run([PY, str(parent), json.dumps(argv)], env=_env(), timeout=30)
        assert proc.returncode == 0
    else:
        assert run(argv, network=False, filesystem=writable(tmp_path)) == 0
    inside = out.read_text()
    ours = Path("/proc/self/status").read_text()
    assert _sig_mask(inside, "SigBlk") == 0
    assert _sig_mask(inside, "SigCgt") == 0
    inherited = _sig_mask(ours, "SigIgn") & ~(_bit(signal.SIGPIPE) | _bit(signal.SIGXFSZ))
    assert _sig_mask(inside, "SigIgn") == inherited


def test_tapbox_exits_128_plus_n_when_forwarded_signal_kills(tmp_path: Path) -> None:
    parent = _script(tmp_path, "parent.py", FORWARDING_PARENT)
    ready = tmp_path / "ready"
    argv = ["sh", "-c", f"touch {ready}; while :; do sleep 0.05; done"]
    proc = subprocess.Popen([PY, str(parent), json.dumps(argv)], env=_env(), start_new_session=True)
    try:
        wait_for(ready.exists, what="the command to start")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Pty:
    """A tapbox-like parent running on a fresh pty, as a terminal user would run it."""

    def __init__(self, argv: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        parent = _script(tmp_path, "parent.py", FORWARDING_PARENT)
        full_env = _env()
        full_env.update(env or {})
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the pty child
            try:
                os.execve(PY, [PY, str(parent), json.dumps(argv)], full_env)
            finally:
                os._exit(126)
        self.log = b""  # everything read
        self._unread = b""  # not yet consumed by expect()

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return True
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the pty's other side is closed
            chunk = b""
        self.log += chunk
        self._unread += chunk
        return bool(chunk)

    def expect(self, pattern: bytes, timeout: float = 15.0) -> bytes:
        """Read until pattern; return the output up to and including it, and consume it."""
        deadline = time.monotonic() + timeout
        while pattern not in self._unread:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen; output: {self.log!r}")
            if not self._read(left):
                raise AssertionError(f"EOF before {pattern!r}; output: {self.log!r}")
        end = self._unread.index(pattern) + len(pattern)
        seen, self._unread = self._unread[:end], self._unread[end:]
        return seen

    def wait(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            self._read(0.02)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise AssertionError(f"tapbox did not exit; output: {self.log!r}")


def _reap_killed(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_ctrl_c_from_the_terminal_is_delivered_once(tmp_path: Path) -> None:
    _parent, log, argv = _recorder(tmp_path)
    term = Pty(argv, tmp_path)
    try:
        wait_for(Path(f"{log}.ready").exists, what="the recorder to start")
        term.write(b"\x03")  # Ctrl-C: the tty signals the foreground process group
        wait_for(lambda: "SIGINT" in lines(log), what="SIGINT from the tty")
        fcntl.ioctl(term.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        wait_for(lambda: "SIGWINCH" in lines(log), what="SIGWINCH from the tty")
        term.write(b"\x1c")  # Ctrl-\
        wait_for(lambda: "SIGQUIT" in lines(log), what="SIGQUIT from the tty")
        time.sleep(0.5)  # a forwarded duplicate would arrive within milliseconds
        assert lines(log) == ["SIGINT", "SIGWINCH", "SIGQUIT"]
        os.kill(term.pid, signal.SIGUSR1)  # from another process: forwarded
        wait_for(lambda: "SIGUSR1" in lines(log), what="forwarded SIGUSR1")
        os.kill(term.pid, signal.SIGUSR2)  # the recorder exits 7
        assert term.wait() == 7
        assert lines(log) == ["SIGINT", "SIGWINCH", "SIGQUIT", "SIGUSR1", "SIGUSR2"]
    finally:
        _reap_killed(term.pid)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_interactive_bash_has_job_control(tmp_path: Path) -> None:
    term = Pty(
        ["bash", "--norc", "--noprofile", "-i"],
        tmp_path,
        env={"PS1": "tb$ ", "TERM": "dumb", "HISTFILE": "/dev/null"},
    )
    try:
        term.expect(b"tb$ ")
        assert b"no job control" not in term.log
        term.write(b"sleep 30\n")
        job = _find_in_session(term.pid, ["sleep", "30"])
        term.write(b"\x03")  # Ctrl-C reaches the foreground job, not bash, not tapbox
        term.expect(b"tb$ ")
        wait_for(lambda: not _alive(job), what="sleep 30 to be interrupted")
        term.write(b"echo rc=$?\n")
        term.expect(b"rc=130")
        term.expect(b"tb$ ")
        term.write(b"sleep 31\n")
        job = _find_in_session(term.pid, ["sleep", "31"])
        term.write(b"\x1a")  # Ctrl-Z stops the job; bash stays in control
        term.expect(b"Stopped")
        term.expect(b"tb$ ")
        assert _state(job) == "T"
        term.write(b"jobs -l; echo jobs-$((1+1))\n")
        listing = term.expect(b"jobs-2")
        assert b"Stopped" in listing and b"sleep 31" in listing
        term.write(b"fg\n")
        wait_for(lambda: _state(job) in ("S", "R"), what="fg to resume sleep 31")
        term.write(b"\x03")
        term.expect(b"tb$ ")
        term.write(b"echo rc=$?; exit 5\n")
        term.expect(b"rc=130")
        assert term.wait() == 5
        assert b"no job control" not in term.log
    finally:
        _reap_killed(term.pid)


# ---------------------------------------------------------------------------------------------
# Rootless (kept separate so the lead can decide whether CI runs it)

ROOTLESS = textwrap.dedent(
    """
    import json, os, sys
    from tapbox.isolate import Sandbox, SandboxConfig
    result = {}
    for root in (False, True):
        r, w = os.pipe()
        saved = os.dup(1)
        os.dup2(w, 1)  # the sandbox's stdout
        try:
            sb = Sandbox.spawn(SandboxConfig(
                ["sh", "-c", "id -u; cat /sys/class/net/tap0/mtu; cat /etc/resolv.conf; exit 9"],
                root=root))
        finally:
            os.dup2(saved, 1)
            os.close(w)
        result[f"tap_fd_{root}"] = sb.tap_fd is not None
        sb.start()
        out = b""
        while chunk := os.read(r, 4096):
            out += chunk
        result[f"exit_{root}"] = sb.wait_status()
        result[f"out_{root}"] = out.decode().split()
    print(json.dumps(result))
    """
)


def _rootless_user() -> tuple[int, int]:
    import pwd

    for name in (os.environ.get("TAPBOX_TEST_USER", ""), "tuser", "nobody"):
        if name:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return entry.pw_uid, entry.pw_gid
    raise AssertionError("no unprivileged user to test with: set TAPBOX_TEST_USER")


def test_rootless(tmp_path: Path) -> None:
    """As an unprivileged user: needs /dev/net/tun 0666, setpriv, and the interpreter reachable."""
    assert os.getuid() == 0, "this test switches to an unprivileged uid and must start as root"
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to switch to an unprivileged uid"
    mode = os.stat("/dev/net/tun").st_mode & 0o777
    assert mode & 0o006 == 0o006, (
        f"/dev/net/tun is mode {mode:04o}: rootless tapbox needs 0666 (chmod 0666 /dev/net/tun)"
    )
    uid, gid = _rootless_user()
    drop = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    env = _env()
    env.pop("XDG_RUNTIME_DIR", None)
    env["HOME"] = "/tmp"
    probe = subprocess.run(
        [*drop, PY, "-c", "import tapbox.isolate, pyroute2"],
        env=env,
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert probe.returncode == 0, (
        f"uid {uid} cannot run {PY} with tapbox and pyroute2 importable (is the interpreter's "
        f"directory, e.g. /root, traversable by others?): {probe.stderr.strip()}"
    )
    proc = subprocess.run(
        [*drop, PY, "-c", ROOTLESS], env=env, capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["tap_fd_False"] and result["tap_fd_True"]
    assert result["exit_False"] == 9 and result["exit_True"] == 9
    assert result["out_False"] == [str(uid), "65520", "nameserver", "10.0.2.3"]
    assert result["out_True"] == ["0", "65520", "nameserver", "10.0.2.3"]
