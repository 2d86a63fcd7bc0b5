"""The copy-on-write view (`--fs overlay`, issue 10), end to end through the CLI: every write
goes to a kept layer and the host is untouched; `tapbox changes` shows it; `tapbox commit`
applies it (all, or some paths; conflicts kept); `tapbox discard` drops it; what happens at
exit without a terminal, with --on-exit, and on a terminal (the prompt, on a pty); the event
log's file_change events.

Each test builds a small world in the host's /tmp (reachable by the unprivileged uid too): a
project directory the command runs in, a home with a ~/.bashrc, and $XDG_DATA_HOME, where the
layers are kept by default.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakenet as fn
import pytest
from conftest import RunTapbox, setpriv_prefix, tapbox_env
from ptyrun import on_pty
from test_e2e import NOBODY, rootless_problems

SHORT = 60.0
USERS = [pytest.param(None, id="root"), pytest.param(NOBODY, id="unprivileged")]


@dataclass
class World:
    root: Path
    proj: Path
    home: Path
    data: Path
    uid: int

    def env(self, **extra: str) -> dict[str, str]:
        return {"HOME": str(self.home), "XDG_DATA_HOME": str(self.data), **extra}

    @property
    def user(self) -> int | None:
        return None if self.uid == os.getuid() else self.uid

    @property
    def changes(self) -> Path:
        return self.data / "tapbox" / "changes"

    def layers(self) -> list[str]:
        return sorted(os.listdir(self.changes)) if self.changes.exists() else []


def make_world(uid: int) -> World:
    root = Path(tempfile.mkdtemp(prefix="tapbox-cow-"))
    root.chmod(0o755)
    world = World(root, root / "proj", root / "home", root / "data", uid)
    for d in (world.proj, world.home, world.data):
        d.mkdir()
    p = world.proj
    (p / "mod.txt").write_text("old line\n")
    (p / "gone.txt").write_text("to be deleted\n")
    (p / "torename.txt").write_text("renamed\n")
    (p / "chmodme.txt").write_text("mode\n")
    (p / "olddir").mkdir()
    (p / "olddir" / "inner.txt").write_text("inner\n")
    (p / "remade").mkdir()
    (p / "remade" / "old.txt").write_text("old\n")
    (p / "same.txt").write_text("untouched\n")
    (world.home / ".bashrc").write_text("# the original\n")
    (root / "outside-target").mkdir()
    for path in (root / "outside-target", *root.rglob("*")):
        os.lchown(path, uid, uid)
    time.sleep(0.05)  # the world is older than any run's start
    return world


@pytest.fixture(params=USERS)
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    yield from _world(request.param)


@pytest.fixture
def root_world() -> Iterator[World]:
    yield from _world(None)


@pytest.fixture
def nobody_world() -> Iterator[World]:
    yield from _world(NOBODY)


def _world(user: int | None) -> Iterator[World]:
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
        shutil.rmtree(made.root, ignore_errors=True)


def snapshot(directory: Path) -> dict[str, Any]:
    """What is in `directory`: relative path -> (type, content or target, mode)."""
    out: dict[str, Any] = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if rel == "data" or rel.startswith("data/"):
            continue  # where the layers are
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


def sandbox(run_tapbox: RunTapbox, world: World, script: str, *args: str,
            expect: int = 0) -> subprocess.CompletedProcess[str]:
    proc = run_tapbox("-n", "--fs", "overlay", *args, cmd=["sh", "-c", script],
                      user=world.user, env=world.env(), cwd=world.proj, timeout=SHORT,
                      dns_upstream=None)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def tapbox_cli(world: World, *args: str, expect: int | None = 0,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tapbox", *args]
    if world.user is not None:
        argv = setpriv_prefix(world.uid) + argv
    proc = subprocess.run(argv, cwd=world.proj, env=tapbox_env(world.env()), text=True,
                          capture_output=True, timeout=SHORT, input=input,
                          errors="surrogateescape")
    if expect is not None:
        assert proc.returncode == expect, f"{args}: exit {proc.returncode}\n{proc.stdout}\n" \
                                          f"{proc.stderr}"
    return proc


def kept_id(stderr: str) -> str:
    for line in stderr.splitlines():
        if "are kept in layer " in line:
            return line.split("are kept in layer ", 1)[1].split(":", 1)[0]
    raise AssertionError(f"no 'kept in layer' line in {stderr!r}")


ODD = "odd\nname\x1b[1m\udcff"  # a newline, an escape sequence, a byte that is not UTF-8
SCRIPT = r"""
set -e
echo new line >> mod.txt
rm gone.txt
echo added > added.txt
mkdir -p newdir/deeper && echo deep > newdir/deeper/f
rm -r olddir
rm -r remade && mkdir remade && echo new > remade/new.txt
mv torename.txt renamed.txt
ln -s /etc/hostname link
ln -s ../outside-target escape
ln added.txt hardlink.txt
chmod 600 chmodme.txt
head -c 30000000 /dev/zero > big.bin
printf x > "$(printf 'odd\nname\033[1m\377')"
echo pwned >> "$HOME/.bashrc"
echo private > /tmp/private-file
echo in-the-sandbox: && cat mod.txt
"""


def test_every_write_goes_to_the_layer_then_commit(run_tapbox: RunTapbox, world: World) -> None:
    before = snapshot(world.root)
    proc = sandbox(run_tapbox, world, SCRIPT)
    assert "in-the-sandbox:\nold line\nnew line\n" in proc.stdout  # it saw its own writes
    assert snapshot(world.root) == before, "the host changed outside the layer directory"
    assert not Path("/tmp/private-file").exists()
    # Not on a terminal: the layer is kept, and one line says so.
    layer_id = kept_id(proc.stderr)
    assert world.layers() == [layer_id]
    assert f"tapbox changes {layer_id}" in proc.stderr and f"tapbox commit {layer_id}" in \
        proc.stderr and f"tapbox discard {layer_id}" in proc.stderr
    meta = json.loads((world.changes / layer_id / "tapbox-layer.json").read_text())
    assert meta["command"] == ["sh", "-c", SCRIPT] and meta["status"] == 0
    assert meta["cwd"] == str(world.proj) and meta["ended"] >= meta["started"]

    listing = tapbox_cli(world, "changes", layer_id).stdout
    p, h = world.proj, world.home
    for line in (f"M file    {p}/mod.txt", f"D file    {p}/gone.txt", f"A file    {p}/added.txt",
                 f"A dir     {p}/newdir", f"A file    {p}/newdir/deeper/f",
                 f"D dir     {p}/olddir", f"D file    {p}/torename.txt",
                 f"A file    {p}/renamed.txt", f"A symlink {p}/link (-> /etc/hostname)",
                 f"A symlink {p}/escape (-> ../outside-target)", f"A file    {p}/hardlink.txt",
                 f"M file    {p}/chmodme.txt (5 bytes; mode changed)",
                 f"A file    {p}/big.bin (28.6 MB)", f"M file    {h}/.bashrc",
                 f"D file    {p}/remade/old.txt", f"A file    {p}/remade/new.txt",
                 f"A file    {p}/odd\\x0aname\\x1b[1m\\udcff"):
        assert line in listing, f"{line!r} not in\n{listing}"
    entries = listing.split("\n", 1)[1]  # after the header naming the command
    assert "private-file" not in entries and "same.txt" not in entries
    assert "\x1b" not in listing
    diff = tapbox_cli(world, "changes", layer_id, "--diff", str(p / "mod.txt")).stdout
    assert " old line\n    +new line" in diff and "bashrc" not in diff.split("\n", 1)[1]

    tapbox_cli(world, "commit", layer_id)
    assert (p / "mod.txt").read_text() == "old line\nnew line\n"
    assert not (p / "gone.txt").exists() and not (p / "olddir").exists()
    assert os.listdir(p / "remade") == ["new.txt"]  # the opaque directory replaced the old
    assert not (p / "torename.txt").exists() and (p / "renamed.txt").read_text() == "renamed\n"
    assert (p / "newdir" / "deeper" / "f").read_text() == "deep\n"
    assert os.readlink(p / "link") == "/etc/hostname"
    assert os.readlink(p / "escape") == "../outside-target"
    assert os.listdir(world.root / "outside-target") == []
    assert (p / "hardlink.txt").read_text() == "added\n"
    assert (p / "hardlink.txt").stat().st_ino == (p / "added.txt").stat().st_ino
    assert stat.S_IMODE((p / "chmodme.txt").stat().st_mode) == 0o600
    assert (p / "big.bin").stat().st_size == 30_000_000
    assert (p / os.fsdecode(os.fsencode(ODD))).read_bytes() == b"x"
    assert (h / ".bashrc").read_text() == "# the original\npwned\n"
    assert (p / "same.txt").read_text() == "untouched\n"
    if world.user is not None:
        assert (p / "added.txt").stat().st_uid == world.uid
    assert world.layers() == []  # fully committed: removed
    again = tapbox_cli(world, "commit", layer_id, expect=125)  # harmless: nothing left
    assert "no layer" in again.stderr


def test_partial_commit_conflict_force_and_discard(run_tapbox: RunTapbox,
                                                   root_world: World) -> None:
    world = root_world
    p = world.proj
    proc = sandbox(run_tapbox, world, "echo A > mod.txt; echo B > same.txt; echo C > new.txt")
    layer_id = kept_id(proc.stderr)
    (p / "same.txt").write_text("edited on the host meanwhile\n")
    one = tapbox_cli(world, "commit", layer_id, "mod.txt")  # a relative path
    assert "committed 1 modified" in one.stderr
    assert (p / "mod.txt").read_text() == "A\n" and not (p / "new.txt").exists()
    rest = tapbox_cli(world, "commit", layer_id, expect=1)
    assert f"conflict: {p}/same.txt: changed on the host since the run started" in rest.stderr
    assert (p / "same.txt").read_text() == "edited on the host meanwhile\n"
    assert (p / "new.txt").read_text() == "C\n"
    listing = tapbox_cli(world, "changes", layer_id).stdout.split("\n", 1)[1]
    assert f"M file    {p}/same.txt" in listing and "new.txt" not in listing
    tapbox_cli(world, "commit", layer_id, "--force")
    assert (p / "same.txt").read_text() == "B\n"
    # discard
    proc = sandbox(run_tapbox, world, "echo D > mod.txt")
    layer_id = kept_id(proc.stderr)
    assert layer_id in tapbox_cli(world, "changes").stdout
    tapbox_cli(world, "discard", layer_id)
    assert world.layers() == [] and (p / "mod.txt").read_text() == "A\n"


def test_on_exit_commit_discard_and_changes_dir(run_tapbox: RunTapbox,
                                                root_world: World) -> None:
    world = root_world
    p = world.proj
    sandbox(run_tapbox, world, "echo 1 > mod.txt; exit 3", "--on-exit", "commit", expect=3)
    assert (p / "mod.txt").read_text() == "1\n" and world.layers() == []
    proc = sandbox(run_tapbox, world, "echo 2 > mod.txt", "--on-exit", "discard")
    assert "discarded 1 modified" in proc.stderr
    assert (p / "mod.txt").read_text() == "1\n" and world.layers() == []
    # --changes-dir: a directory of the user's, continued by a second run, kept once committed
    layer = world.root / "mylayer"
    sandbox(run_tapbox, world, "echo 3 > mod.txt", "--changes-dir", str(layer))
    proc = sandbox(run_tapbox, world, "cat mod.txt; echo 4 > other.txt", "--changes-dir",
                   str(layer))
    assert proc.stdout == "3\n"  # the second run sees the first one's write
    assert f"tapbox changes {layer}" in proc.stderr
    tapbox_cli(world, "commit", str(layer))
    assert (p / "mod.txt").read_text() == "3\n" and (p / "other.txt").read_text() == "4\n"
    assert (layer / "tapbox-layer.json").exists() and world.layers() == []


def test_write_is_a_real_hole_and_nothing_changed_is_nothing_kept(run_tapbox: RunTapbox,
                                                                  root_world: World) -> None:
    world = root_world
    p = world.proj
    (p / "out").mkdir()
    proc = sandbox(run_tapbox, world, "echo real > out/file", "--write", str(p / "out"))
    assert (p / "out" / "file").read_text() == "real\n"
    assert "kept" not in proc.stderr and world.layers() == []  # no change: no layer left
    # The layers are out of the sandbox's sight.
    sandbox(run_tapbox, world, "echo x > mod.txt")
    proc = sandbox(run_tapbox, world, f"find {world.changes} ! -type d | wc -l; cat "
                                      f"{world.changes}/*/tapbox-layer.json", expect=1)
    assert proc.stdout == "0\n" and "No such file" in proc.stderr


def test_the_event_log_records_file_changes(run_tapbox: RunTapbox, root_world: World,
                                            fakenet: fn.FakeNet) -> None:
    world = root_world
    log = world.proj / "run.jsonl"  # where the command sees it: read-only, even through a layer
    proc = run_tapbox("--fs", "overlay", "--log", str(log), "-q",
                      cmd=["sh", "-c", "echo x > mod.txt; rm gone.txt; echo n > 'n\nl'; "
                                       "echo forged >> run.jsonl; rm -f run.jsonl; true"],
                      env=world.env(), cwd=world.proj, timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    assert "Read-only file system" in proc.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert "forged\n" not in log.read_text() and all("event" in e for e in events)
    changes = {(e["change"], e["path"]) for e in events if e["event"] == "file_change"}
    p = world.proj
    assert changes == {("modified", f"{p}/mod.txt"), ("deleted", f"{p}/gone.txt"),
                       ("added", f"{p}/n\nl")}
    kinds = [e["event"] for e in events]
    assert kinds.index("exit") > max(i for i, k in enumerate(kinds) if k == "file_change")
    assert all(line.isascii() and "\n" not in line.rstrip("\n")
               for line in log.read_text().splitlines(keepends=True))


def plan_lines(world: World, *args: str) -> list[str]:
    argv = [sys.executable, "-m", "tapbox", "-n", "-v", "--fs", "overlay", *args, "--", "true"]
    proc = subprocess.run(argv, cwd=world.proj, env=tapbox_env(world.env()), text=True,
                          capture_output=True, timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    return [line.removeprefix("tapbox: sandbox: ") for line in proc.stderr.splitlines()
            if line.startswith("tapbox: sandbox: ")]


def test_the_plan_of_the_overlay_view(root_world: World) -> None:
    lines = plan_lines(root_world)
    assert "overlay /usr (copy-on-write: writes go to kept layer " in "\n".join(lines)
    assert any(line.startswith(f"overlay {root_world.proj} (copy-on-write") for line in lines)
    assert any(line.startswith(f"hide {root_world.changes} ") for line in lines)
    assert not any(line.startswith(f"bind {root_world.proj}") for line in lines)
    assert "tmpfs /tmp (mode 1777; private)" in lines


# ------------------------------------------------------------------------------------------------
# On a terminal: the prompt




PROMPT = b"[c]ommit all, [r]eview one by one, [k]eep for later, [d]iscard? "
ONE = b"commit this one? [y]es, [n]o (keep it in the layer), [q]uit reviewing "


def test_the_prompt_on_a_terminal(root_world: World) -> None:
    world = root_world
    p = world.proj
    argv = [sys.executable, "-m", "tapbox", "-n", "--fs", "overlay", "--", "sh", "-c",
            "echo x > mod.txt; mkdir -p __pycache__; echo c > __pycache__/a.pyc; "
            "echo c > __pycache__/b.pyc"]
    env = tapbox_env(world.env())
    status, out = on_pty(argv, env, p, [(PROMPT, b"c\n")])
    assert status == 0, out
    text = out.decode("utf-8", "replace")
    assert "the command changed files: 3 added, 1 modified" in text, text
    assert f"2  {p}/__pycache__" in text  # noise folded into one line
    assert (p / "mod.txt").read_text() == "x\n" and world.layers() == []
    # Review one by one: the diff shown, the first committed, the rest kept.
    argv[-1] = "echo y > mod.txt; echo z > new.txt"
    status, out = on_pty(argv, env, p, [(PROMPT, b"r\n"), (ONE, b"n\n"), (ONE, b"y\n")])
    assert status == 0, out
    text = out.decode("utf-8", "replace")
    assert "-x" in text and "+y" in text and "+z" in text, text
    assert (p / "mod.txt").read_text() == "x\n" and (p / "new.txt").read_text() == "z\n"
    assert len(world.layers()) == 1 and "left in layer" in text
    # Keep for later; then discard at the prompt.
    argv[-1] = "echo k > mod.txt"
    status, out = on_pty(argv, env, p, [(PROMPT, b"k\n")])
    assert status == 0 and len(world.layers()) == 2 and b"are kept in layer" in out
    argv[-1] = "echo d > mod.txt"
    status, out = on_pty(argv, env, p, [(PROMPT, b"d\n")])
    assert status == 0 and len(world.layers()) == 2 and b"discarded 1 modified" in out
    assert (p / "mod.txt").read_text() == "x\n"
    # Ctrl-C at the prompt keeps the layer, and the command's status stays.
    argv[-1] = "echo i > mod.txt; exit 7"
    status, out = on_pty(argv, env, p, [(PROMPT, b"\x03")])
    assert status == 7 and len(world.layers()) == 3 and b"are kept in layer" in out, out
    assert b"Traceback" not in out


def test_commands_of_the_layers_need_one(root_world: World) -> None:
    proc = tapbox_cli(root_world, "commit", "no-such-layer", expect=125)
    assert "no layer 'no-such-layer'" in proc.stderr
    proc = tapbox_cli(root_world, "changes", expect=0)
    assert "no kept layers" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Installing packages (the mbox use case)


def build_deb(world: World) -> None:
    """proj/hello.deb: a package with one script, /usr/bin/tapbox-test-hello."""
    pkg = world.root / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "bin").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: tapbox-test-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: tests <tests@example.com>\nDescription: tapbox's test package\n")
    tool = pkg / "usr" / "bin" / "tapbox-test-hello"
    tool.write_text("#!/bin/sh\necho hello from the layer\n")
    tool.chmod(0o755)
    subprocess.run(["dpkg-deb", "-b", str(pkg), str(world.proj / "hello.deb")], check=True,
                   capture_output=True)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="not a Debian system: no apt")
def test_apt_get_as_root_installs_into_the_layer(run_tapbox: RunTapbox,
                                                 root_world: World) -> None:
    """tapbox run by root with --root maps every id, so apt can drop to its _apt user and
    set its groups (with one id mapped it fails: "seteuid 42 failed"). No network: a local
    package file."""
    world = root_world
    build_deb(world)
    status = Path("/var/lib/dpkg/status").read_bytes()
    layer = world.root / "layer"
    proc = sandbox(run_tapbox, world, "apt-get install -y ./hello.deb 2>&1; id -u _apt && "
                                      "setpriv --reuid=_apt id -u", "--root", "--changes-dir",
                   str(layer))
    assert "Setting up tapbox-test-hello (1.0)" in proc.stdout, proc.stdout
    assert "failed" not in proc.stdout, proc.stdout
    apt_uid = proc.stdout.strip().splitlines()[-2]
    assert proc.stdout.strip().splitlines()[-1] == apt_uid  # another user, inside
    assert not Path("/usr/bin/tapbox-test-hello").exists()
    assert Path("/var/lib/dpkg/status").read_bytes() == status
    proc = sandbox(run_tapbox, world, "tapbox-test-hello", "--changes-dir", str(layer))
    assert proc.stdout == "hello from the layer\n"


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="not a Debian system: no dpkg")
def test_dpkg_installs_into_the_layer_and_a_continued_layer_uses_it(run_tapbox: RunTapbox,
                                                                    root_world: World) -> None:
    """As root (the suite runs as root): a package built here is installed into the layer,
    the host's /usr and dpkg database untouched; a second run on the same layer runs it."""
    world = root_world
    build_deb(world)
    status = Path("/var/lib/dpkg/status").read_bytes()
    layer = world.root / "layer"
    sandbox(run_tapbox, world, "dpkg -i hello.deb >/dev/null", "--root", "--changes-dir",
            str(layer))
    assert not Path("/usr/bin/tapbox-test-hello").exists()
    assert Path("/var/lib/dpkg/status").read_bytes() == status
    proc = sandbox(run_tapbox, world, "tapbox-test-hello", "--changes-dir", str(layer))
    assert proc.stdout == "hello from the layer\n"
    listing = tapbox_cli(world, "changes", str(layer)).stdout
    assert "A file    /usr/bin/tapbox-test-hello (36 bytes)" in listing
    assert "M file    /var/lib/dpkg/status" in listing


def test_make_install_into_the_home_then_use_it_from_the_continued_layer(
        run_tapbox: RunTapbox, world: World) -> None:
    """`make install` to ~/.local (a build, then an install): in the layer, usable by the next
    run on the same layer, and the host's home untouched until the commit."""
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.fail("make and a C compiler are needed (Debian: make, gcc)", pytrace=False)
    p = world.proj
    (p / "hello.c").write_text('#include <stdio.h>\nint main(void) { puts("built here"); '
                               'return 0; }\n')
    (p / "Makefile").write_text("hello: hello.c\n\tcc -o hello hello.c\n"
                                "install: hello\n\tmkdir -p $(HOME)/.local/bin\n"
                                "\tinstall -m 755 hello $(HOME)/.local/bin/hello\n")
    for name in ("hello.c", "Makefile"):
        os.lchown(p / name, world.uid, world.uid)
    layer = world.root / "layer"
    if world.user is not None:
        layer.mkdir()
        os.chown(layer, world.uid, world.uid)
    sandbox(run_tapbox, world, "make -s install", "--changes-dir", str(layer))
    assert not (world.home / ".local").exists() and not (p / "hello").exists()
    proc = sandbox(run_tapbox, world, "$HOME/.local/bin/hello", "--changes-dir", str(layer))
    assert proc.stdout == "built here\n"
    tapbox_cli(world, "commit", str(layer), str(world.home / ".local"))
    assert subprocess.run([str(world.home / ".local/bin/hello")], capture_output=True,
                          text=True).stdout == "built here\n"
    assert not (p / "hello").exists()  # the build in the project: still only in the layer
    assert f"A file    {p}/hello" in tapbox_cli(world, "changes", str(layer)).stdout


def test_root_without_privileges_says_what_it_cannot_do(run_tapbox: RunTapbox,
                                                        nobody_world: World) -> None:
    world = nobody_world
    proc = sandbox(run_tapbox, world, "touch /usr/bin/tapbox-test; echo $?", "--root")
    assert "tapbox: --root --fs overlay: the sandbox's root cannot write the host's " \
           "root-owned directories" in proc.stderr
    assert proc.stdout.strip() != "0" and not Path("/usr/bin/tapbox-test").exists()
