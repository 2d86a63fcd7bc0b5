"""The sandbox's filesystem plan is data: built, compared and printed without any namespace."""

from __future__ import annotations

import ast
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tapbox.errors import SetupError
from tapbox.isolate import SandboxConfig
from tapbox.isolate import plan as plan_mod
from tapbox.isolate.plan import BindFile, FreshProc, FreshSysfs, Pin, ReadOnlyFile

ISOLATE = Path(__file__).resolve().parent.parent / "tapbox" / "isolate"


def test_network_plan_binds_a_private_resolv_conf_after_sysfs() -> None:
    plan = plan_mod.build(SandboxConfig(["true"]), "/tmp/tapbox-resolv-x.conf")
    assert plan.ops == (
        FreshSysfs("/sys"),
        BindFile("/tmp/tapbox-resolv-x.conf", "/etc/resolv.conf", "a private resolv.conf",
                 "run tapbox -n"),
        FreshProc("/proc"),
    )
    assert plan.describe() == [
        "sysfs /sys (best effort; submounts carried over)",
        "bind /tmp/tapbox-resolv-x.conf -> /etc/resolv.conf (a private resolv.conf)",
        "proc /proc (the sandbox's PID namespace)",
    ]


def test_no_network_plan_keeps_the_hosts_resolv_conf() -> None:
    plan = plan_mod.build(SandboxConfig(["true"], network=False), None)
    assert plan.ops == (FreshSysfs("/sys"), FreshProc("/proc"))


def _fake_stat(kinds: dict[str, int]) -> Callable[[str], os.stat_result]:
    def stat_path(path: str) -> os.stat_result:
        if path not in kinds:
            raise FileNotFoundError(2, "No such file or directory")
        return os.stat_result((kinds[path], len(path), 7, 1, 0, 0, 0, 0, 0, 0))
    return stat_path


def test_record_files_are_read_only_and_their_directories_pinned_deepest_first() -> None:
    files = ("/work/p/logs/run.jsonl", "/work/p/run.pcap", "/work/p/run.pcap", "/dev/null")
    config = SandboxConfig(["true"], network=False, read_only_files=files)
    kinds = {"/work/p/logs/run.jsonl": stat.S_IFREG | 0o644, "/work/p/run.pcap": stat.S_IFREG,
             "/dev/null": stat.S_IFCHR | 0o666}
    plan = plan_mod.build(config, None, stat_path=_fake_stat(kinds))
    assert plan.ops[2:] == (
        ReadOnlyFile("/work/p/logs/run.jsonl", 7, len("/work/p/logs/run.jsonl")),
        ReadOnlyFile("/work/p/run.pcap", 7, len("/work/p/run.pcap")),
        Pin("/work/p/logs"),
        Pin("/work/p"),
        Pin("/work"),
    )  # each file once; /dev/null (not a regular file) is left alone; "/" needs no pin
    assert plan.describe()[-1] == "pin /work (cannot be renamed or removed)"


def test_a_missing_record_file_is_a_setup_error() -> None:
    config = SandboxConfig(["true"], network=False, read_only_files=("/nowhere/run.jsonl",))
    with pytest.raises(SetupError, match="/nowhere/run.jsonl: No such file or directory"):
        plan_mod.build(config, None, stat_path=_fake_stat({}))


def test_isolate_imports_neither_trio_nor_the_network_half() -> None:
    """DESIGN.md: isolate/ and the network half never import each other; no trio at import."""
    forbidden = ("trio", "netstack", "tapbox.engine", "tapbox.netstack", "tapbox.dns",
                 "tapbox.policy", "tapbox.net")
    for path in sorted(ISOLATE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: a function may import trio lazily
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (
                    f"{path.name} imports {name} at module level"
                )
