"""tapbox.isolate.seccomp: the policy as data, and the filter libseccomp builds from it."""

from __future__ import annotations

import errno
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tapbox.errors import SetupError
from tapbox.isolate import Sandbox, SandboxConfig
from tapbox.isolate import seccomp as sc
from tapbox.isolate.supervisor import Violation
from tapbox.options import FilesystemOptions, PathRule


def test_the_terminal_guard_reads_as_what_it_does() -> None:
    assert sc.GUARD_POLICY.describe() == [
        "default: allow",
        "ioctl if (arg1 & 0xffffffff) == 0x5412: fail with EPERM  # TIOCSTI: typing into the "
        "terminal",
        "ioctl if (arg1 & 0xffffffff) == 0x541c: fail with EPERM  # TIOCLINUX: console paste "
        "into the terminal",
    ]
    # ... and the default policy starts with it.
    assert sc.DEFAULT_POLICY.rules[:2] == sc.TERMINAL_GUARD


def _pfc(policy: sc.Policy) -> str:
    flt = sc.compile_filter(policy)
    try:
        with tempfile.TemporaryFile() as f:
            flt.export_pfc(f.fileno())
            f.seek(0)
            return f.read().decode()
    finally:
        flt.release()


def test_the_filter_compares_the_low_32_bits_of_the_request_on_every_abi() -> None:
    text = _pfc(sc.DEFAULT_POLICY)
    # libseccomp's pseudo-C: the low word of the request is compared, the high word is masked
    # out entirely (a 64-bit equality would demand hi32 == 0, which TIOCSTI | 1 << 32 escapes).
    assert "& 0xffffffff == 21522" in text, text  # 0x5412 TIOCSTI
    assert "& 0xffffffff == 21532" in text, text  # 0x541c TIOCLINUX
    assert "action ERRNO(1);" in text, text  # EPERM
    assert "hi32 & 0xffffffff" not in text, text
    if platform.machine() == "x86_64":
        assert "$a1.hi32 & 0x00000000 == 0" in text, text
        assert "filter for arch x86 " in text and "filter for arch x32 " in text, text
        flt = sc.compile_filter(sc.DEFAULT_POLICY)
        assert flt.arches == ("x86", "x32")
        flt.release()


def test_unknown_syscall_is_a_setup_error() -> None:
    policy = sc.Policy(sc.Allow(), (sc.Rule("no_such_syscall_xyz", sc.Errno(errno.EPERM)),))
    with pytest.raises(SetupError, match="does not know the system call 'no_such_syscall_xyz'"):
        sc.compile_filter(policy)


def test_too_old_libseccomp_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sc, "MIN_VERSION", (99, 0, 0))
    with pytest.raises(SetupError) as info:
        sc.Libseccomp()
    msg = str(info.value)
    assert "older than 99.0.0" in msg and "libseccomp2" in msg and "\n" not in msg


def test_missing_library_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sc, "LIBRARY", "libseccomp-tapbox-test-missing.so.9")
    with pytest.raises(SetupError) as info:
        Sandbox.spawn(SandboxConfig(["true"], network=False))
    msg = str(info.value)
    assert msg.startswith("tapbox: cannot load libseccomp-tapbox-test-missing.so.9")
    assert "apt install libseccomp2" in msg and "\n" not in msg


def _writable(path: Path) -> FilesystemOptions:
    """The sandbox's default view with the test's tmp_path writable (as --write PATH)."""
    return FilesystemOptions(paths=(PathRule("write", str(path)),))


def test_command_runs_with_no_new_privs_and_a_filter(tmp_path: Path) -> None:
    out = tmp_path / "status"
    sb = Sandbox.spawn(SandboxConfig(["sh", "-c", f"cat /proc/self/status > {out}"],
                                     network=False, filesystem=_writable(tmp_path)))
    sb.start()
    assert sb.wait_status() == 0
    sb.close()
    fields = dict(line.split(":", 1) for line in out.read_text().splitlines() if ":" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # SECCOMP_MODE_FILTER


def test_a_custom_policy_is_enforced(tmp_path: Path) -> None:
    """Rules are data: a policy that refuses mkdir with EACCES is what the command meets, and
    the refusal is named (the supervisor answers it)."""
    policy = sc.Policy(sc.Allow(), (sc.Rule("mkdir", sc.Errno(errno.EACCES)),
                                    sc.Rule("mkdirat", sc.Errno(errno.EACCES))))
    seen: list[Violation] = []
    probe = textwrap.dedent(f"""
        import os
        try:
            os.mkdir({str(tmp_path / 'd')!r})
            print("made")
        except OSError as e:
            print(e.errno)
    """)
    r, w = os.pipe()
    saved = os.dup(1)
    os.dup2(w, 1)
    try:
        sb = Sandbox.spawn(SandboxConfig([sys.executable, "-c", probe], network=False,
                                         syscalls=policy, filesystem=_writable(tmp_path)),
                           on_violation=seen.append)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(w)
    sb.start()
    assert sb.wait_status() == 0
    sb.close()
    with os.fdopen(r) as f:
        assert f.read().strip() == str(errno.EACCES)
    assert not (tmp_path / "d").exists()
    assert [(v.syscall, v.action, v.pid, v.comm) for v in seen] == [
        ("mkdir", "EACCES", 2, Path(sys.executable).name[:15])]


def _in_child(body: str) -> str:
    """Run `body` (Python) in a fresh interpreter; its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_clone_parent_falls_back_to_clone_where_clone3_is_enosys() -> None:
    """Container runtimes' seccomp profiles answer ENOSYS to clone3: the old clone is used,
    and the new process is still the caller's parent's child (CLONE_PARENT)."""
    out = _in_child("""
        import errno, os
        from tapbox.isolate import seccomp as sc
        from tapbox.isolate.libc import Libc
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            flt = sc.compile_filter(sc.Policy(sc.Allow(), (
                sc.Rule("clone3", sc.Errno(errno.ENOSYS)),)))
            assert flt.load() == 0
            libc = Libc()
            nr = sc.Libseccomp().syscall_number("clone")
            assert libc.clone_parent() == -errno.ENOSYS  # without a fallback: the error
            pid = libc.clone_parent(lambda: nr)
            if pid == 0:
                os._exit(42)
            os.write(w, str(pid).encode())
            os._exit(0)
        os.close(w)
        assert os.waitpid(middle, 0)[1] == 0
        grandchild = int(os.read(r, 64))
        _, status = os.waitpid(grandchild, 0)  # ours to reap: CLONE_PARENT
        print(os.waitstatus_to_exitcode(status))
    """)
    assert out.strip() == "42"


def test_tapbox_runs_where_clone3_is_enosys(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _in_child(f"""
        import errno, os, sys
        from tapbox.isolate import seccomp as sc
        flt = sc.compile_filter(sc.Policy(sc.Allow(), (
            sc.Rule("clone3", sc.Errno(errno.ENOSYS)),)))
        assert flt.load() == 0
        from tapbox.isolate import Sandbox, SandboxConfig
        from tapbox.options import FilesystemOptions, PathRule
        sb = Sandbox.spawn(SandboxConfig(["sh", "-c", "echo $$ > {out}"], network=False,
            filesystem=FilesystemOptions(paths=(PathRule("write", {str(tmp_path)!r}),))))
        sb.start()
        assert sb.wait_status() == 0
    """)
    # the command ran, and not as pid 1: pid 1 (the reaper) was made with clone(2)
    assert int(out.read_text()) > 1
