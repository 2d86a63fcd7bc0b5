"""The sandbox's filesystem plan is data: built, compared and printed without any namespace."""

from __future__ import annotations

import ast
from pathlib import Path

from tapbox.isolate import SandboxConfig
from tapbox.isolate import plan as plan_mod
from tapbox.isolate.plan import BindFile, FreshSysfs

ISOLATE = Path(__file__).resolve().parent.parent / "tapbox" / "isolate"


def test_network_plan_binds_a_private_resolv_conf_after_sysfs() -> None:
    plan = plan_mod.build(SandboxConfig(["true"]), "/tmp/tapbox-resolv-x.conf")
    assert plan.ops == (
        FreshSysfs("/sys"),
        BindFile("/tmp/tapbox-resolv-x.conf", "/etc/resolv.conf", "a private resolv.conf",
                 "run tapbox -n"),
    )
    assert plan.describe() == [
        "sysfs /sys (best effort; submounts carried over)",
        "bind /tmp/tapbox-resolv-x.conf -> /etc/resolv.conf (a private resolv.conf)",
    ]


def test_no_network_plan_keeps_the_hosts_resolv_conf() -> None:
    plan = plan_mod.build(SandboxConfig(["true"], network=False), None)
    assert plan.ops == (FreshSysfs("/sys"),)


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
