"""DESIGN.md's rule between the two halves: the network half (tapbox/net/) imports nothing of
the process half (tapbox/isolate/). (The other direction is checked in test_plan.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

NET = Path(__file__).resolve().parent.parent / "tapbox" / "net"


def imported_names(node: ast.AST) -> list[str]:
    """The modules an import statement names (none for any other node)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module]
    return []


def test_net_imports_nothing_of_isolate() -> None:
    paths = sorted(NET.glob("*.py"))
    assert len(paths) >= 8, paths
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports count too
            for name in imported_names(node):
                assert not (name == "tapbox.isolate" or name.startswith("tapbox.isolate.")), (
                    f"{path.name} imports {name}"
                )
