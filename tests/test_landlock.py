"""Landlock under the mount plan (--landlock): rules derived from the plan's operations.

Today's plan (the host view) is writable but for single files, which Landlock cannot express
below writable directories; the project view of the isolation work makes the root read-only.
The kernel part is therefore tested with a plan of two test-only operations (a read-only root,
a writable directory), read through the same READINGS table the real operations use.
"""

from __future__ import annotations

import errno
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT, RunTapbox

from tapbox.isolate import landlock
from tapbox.isolate import plan as plan_mod
from tapbox.isolate.config import SandboxConfig
from tapbox.options import FilesystemOptions

PY = sys.executable
SHORT = 60.0


@dataclass(frozen=True)
class ReadOnlyRoot:
    def describe(self) -> str:
        return "read-only /"


@dataclass(frozen=True)
class Writable:
    path: str

    def describe(self) -> str:
        return f"writable {self.path}"


@pytest.fixture
def test_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(landlock.READINGS, "ReadOnlyRoot",
                        lambda op: (landlock.Claim("/", False),))
    monkeypatch.setitem(landlock.READINGS, "Writable",
                        lambda op: (landlock.Claim(op.path, True),))


def test_every_operation_of_the_plan_has_a_reading() -> None:
    """A new kind of mount needs a line in landlock.READINGS (else --landlock steps aside)."""
    for op_type in typing.get_args(plan_mod.Op):
        assert op_type.__name__ in landlock.READINGS, op_type.__name__


def test_the_host_view_has_nothing_landlock_can_add(tmp_path: Path) -> None:
    record = tmp_path / "run.jsonl"
    record.write_text("")
    plan = plan_mod.build(SandboxConfig(["true"], read_only_files=(str(record),),
                                        filesystem=FilesystemOptions(view="host")),
                          str(tmp_path / "resolv"))
    rules = landlock.rules_for(plan)
    assert rules.root_writable and not rules.enforces_anything
    assert rules.left_to_mounts == (str(record),)
    assert landlock.enforce(plan) == (
        f"landlock: nothing to add: the view is writable but for single files ({record} "
        "read-only by their mounts only)")


def test_rules_from_a_read_only_root(test_ops: None) -> None:
    plan = plan_mod.Plan((ReadOnlyRoot(), Writable("/work/project"),  # type: ignore[arg-type]
                          Writable("/work/project/build"),  # type: ignore[arg-type]
                          plan_mod.ReadOnlyFile("/work/project/run.jsonl", 0, 0),
                          plan_mod.FreshProc()))
    rules = landlock.rules_for(plan)
    assert rules.enforces_anything
    # /dev stays writable (devices, the terminal); a writable path below a writable one needs
    # no rule of its own; a read-only file below a writable directory is left to its mount.
    assert rules.writable == ("/dev", "/proc", "/work/project")
    assert rules.left_to_mounts == ("/work/project/run.jsonl",)


def test_the_project_view_operations_read_as_a_read_only_root() -> None:
    """The isolation work's operations, by name (its plan is not in this tree yet)."""
    from typing import NamedTuple

    class NewRoot(NamedTuple):
        pass

    class Bind(NamedTuple):
        source: str
        dest: str
        writable: bool

    class Tmpfs(NamedTuple):
        path: str

    class Hide(NamedTuple):
        path: str

    class ReadOnly(NamedTuple):
        path: str

    class Device(NamedTuple):
        path: str

    ops = (NewRoot(), Bind("/usr", "/usr", False), Device("/dev/null"), Tmpfs("/tmp"),
           Tmpfs("/dev/shm"), Bind("/home/u/src", "/home/u/src", True),
           Hide("/home/u/src/.secrets"), Bind("/home/u/out", "/home/u/out", True),
           ReadOnly("/dev"), ReadOnly("/"))
    rules = landlock.rules_for(plan_mod.Plan(ops))  # type: ignore[arg-type]
    assert rules.unknown is None and rules.enforces_anything
    assert rules.writable == ("/proc", "/tmp", "/dev/null", "/dev/shm", "/home/u/out",
                              "/home/u/src")
    assert rules.left_to_mounts == ("/home/u/src/.secrets",)


def test_an_operation_without_a_reading_makes_landlock_step_aside() -> None:
    plan = plan_mod.Plan((ReadOnlyRoot(),))  # type: ignore[arg-type]  # no reading registered
    assert landlock.rules_for(plan).unknown == "ReadOnlyRoot"
    assert landlock.enforce(plan).startswith("landlock: not used: the view has an operation it "
                                             "cannot read (ReadOnlyRoot)")


def test_where_the_kernel_has_no_landlock_nothing_changes(test_ops: None) -> None:
    plan = plan_mod.Plan((ReadOnlyRoot(),))  # type: ignore[arg-type]
    assert landlock.enforce(plan, abi=0) == (
        "landlock: not supported by this kernel: the mounts alone enforce the view")


def test_rights_follow_the_abi() -> None:
    assert not landlock.handled_rights(1) & (landlock.REFER | landlock.TRUNCATE)
    assert landlock.handled_rights(3) & landlock.TRUNCATE
    assert landlock.abi_version() >= 1, "this machine's kernel has Landlock (ABI 7)"


def _in_landlocked_child(plan: plan_mod.Plan, attempts: dict[str, object]) -> dict[str, str]:
    """Fork; the child sets no_new_privs, enforces `plan`, tries each write; the outcomes."""
    import json

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        outcome: dict[str, str] = {}
        try:
            os.close(r)
            from tapbox.isolate.libc import PR_SET_NO_NEW_PRIVS, Libc

            Libc().prctl(PR_SET_NO_NEW_PRIVS, 1)
            outcome["enforce"] = landlock.enforce(plan)
            for name, attempt in attempts.items():
                try:
                    attempt()  # type: ignore[operator]
                    outcome[name] = "ok"
                except OSError as e:
                    outcome[name] = errno.errorcode[e.errno or 0]
            os.write(w, json.dumps(outcome).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return json.loads(f.read())


def test_the_kernel_enforces_the_read_only_root(test_ops: None, tmp_path: Path) -> None:
    writable, other = tmp_path / "w", tmp_path / "ro"
    writable.mkdir()
    other.mkdir()
    (other / "existing").write_text("keep")
    (writable / "moving").write_text("x")
    plan = plan_mod.Plan((ReadOnlyRoot(), Writable(str(writable))))  # type: ignore[arg-type]

    def create(path: Path) -> object:
        return lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))

    outcome = _in_landlocked_child(plan, {
        "create_in_writable": create(writable / "new"),
        "create_elsewhere": create(other / "new"),
        "truncate_elsewhere": lambda: os.truncate(other / "existing", 0),
        "mkdir_elsewhere": lambda: os.mkdir(other / "d"),
        "rename_out": lambda: os.rename(writable / "moving", other / "moving"),
        "dev_null": lambda: os.close(os.open("/dev/null", os.O_WRONLY)),
        "read_elsewhere": lambda: os.close(os.open(other / "existing", os.O_RDONLY)),
    })
    assert outcome["enforce"] == f"landlock (ABI {landlock.abi_version()}): read-only " \
                                 f"everywhere but /dev, /proc, {writable}"
    assert outcome == {**outcome, "create_in_writable": "ok", "create_elsewhere": "EACCES",
                       "truncate_elsewhere": "EACCES", "mkdir_elsewhere": "EACCES",
                       "dev_null": "ok", "read_elsewhere": "ok"}
    assert outcome["rename_out"] in ("EACCES", "EXDEV")
    assert (other / "existing").read_text() == "keep" and not (other / "new").exists()


def test_landlock_from_the_cli_with_the_host_view(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    """Nothing to add in the host view: the command runs as without it, and so does a nested
    tapbox (a Landlock domain would forbid its mounts)."""
    proc = run_tapbox("-n", "-v", "--fs", "host", "--landlock", cmd=[
        PY, "-m", "tapbox", "-n", "--fs", "host", "--", "sh", "-c",
        f"touch {tmp_path}/made && echo ok"], timeout=SHORT)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr
    assert "tapbox: sandbox: landlock: nothing to add: the view is writable" in proc.stderr
    assert (tmp_path / "made").exists()


def test_landlock_in_the_project_view(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    """The default view is read-only but for its writable places: Landlock says so, the
    command's usual writes still work, and the sandbox can no longer mount, even in a user
    namespace of its own (Landlock forbids it; without --landlock it can)."""
    written = REPO_ROOT / f".landlock-test-{os.getpid()}"
    script = (f"set -e; echo x > {written.name}; echo y > /tmp/t; echo z > \"$HOME/h\"; "
              f"echo w > /dev/null; cat {written.name} /tmp/t \"$HOME/h\"; rm {written.name}; "
              "unshare -Urm sh -c 'mount -t tmpfs none /mnt' 2>/dev/null && echo mounted "
              "|| echo no-mount")
    landlocked = run_tapbox("-n", "-v", "--landlock", cmd=["sh", "-c", script], timeout=SHORT)
    assert landlocked.stdout.split() == ["x", "y", "z", "no-mount"], landlocked.stderr
    line = next(x for x in landlocked.stderr.splitlines() if "sandbox: landlock" in x)
    assert line.startswith(f"tapbox: sandbox: landlock (ABI {landlock.abi_version()}): "
                           "read-only everywhere but ")
    for writable in ("/proc", "/tmp", "/dev/null", str(REPO_ROOT)):
        assert writable in line, line
    plain = run_tapbox("-n", cmd=["sh", "-c", script], timeout=SHORT)
    assert plain.stdout.split() == ["x", "y", "z", "mounted"], plain.stderr
