"""Every example in docs/api.md runs, in the fake internet, as a reader would run it.

Each fenced block of Python, shell or TOML in the page is preceded by a marker saying what it
is: `<!-- api:run -->` a Python script, run as it is (its own asserts check it);
`<!-- api:file NAME -->` a file the later examples use; `<!-- api:sh [status=N] -->` commands run
with bash -e in the directory of those files, which must exit with N (default 0). A block
without a marker fails the test, so no example escapes it. The examples run in a mount
namespace whose /etc/resolv.conf names the fake internet's DNS server, so they resolve
api.example.test as a reader's machine resolves real names, and the pytest plugin is loaded
with `-p tapbox.pytest_plugin` (PYTEST_ADDOPTS), as its entry point loads it once installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tapbox_env
from fakenet import DNS_UPSTREAM

DOC = REPO_ROOT / "docs" / "api.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_MARKER = re.compile(r"<!-- api:(\w+)(.*?)-->\s*$")
CHECKED_LANGUAGES = {"python", "sh", "toml"}


def examples() -> list[tuple[str, str, str, int]]:
    """(kind, argument, code, line) of every marked block, in the page's order."""
    text = DOC.read_text()
    found = []
    for fence in _FENCE.finditer(text):
        language, code = fence.group(1), fence.group(2)
        line = text.count("\n", 0, fence.start()) + 1
        before = text[:fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.match(before.strip())
        if marker is None:
            assert language not in CHECKED_LANGUAGES, \
                f"docs/api.md:{line}: a {language} example without an <!-- api:... --> marker"
            continue
        found.append((marker.group(1), marker.group(2).strip(), code, line))
    return found


EXAMPLES = examples()
RUNNABLE = [e for e in EXAMPLES if e[0] in ("run", "sh")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("api-docs")
    for kind, argument, code, line in EXAMPLES:
        if kind == "file":
            assert argument and "/" not in argument, f"docs/api.md:{line}: api:file NAME"
            (directory / argument).write_text(code)
    (directory / "resolv.conf").write_text(f"nameserver {DNS_UPSTREAM}\n")
    return directory


def test_every_block_is_marked_and_known() -> None:
    assert RUNNABLE, "docs/api.md has no runnable example"
    for kind, _argument, _code, line in EXAMPLES:
        assert kind in ("run", "sh", "file"), f"docs/api.md:{line}: unknown marker api:{kind}"


@pytest.mark.parametrize("kind, argument, code, line", RUNNABLE,
                         ids=[f"line{e[3]}" for e in RUNNABLE])
def test_example_runs(kind: str, argument: str, code: str, line: int, workdir: Path,
                      fake_http: str) -> None:
    expected = 0
    if argument:
        match = re.fullmatch(r"status=(\d+)", argument)
        assert match, f"docs/api.md:{line}: unknown argument {argument!r}"
        expected = int(match.group(1))
    command = [sys.executable, "-c", code] if kind == "run" else ["bash", "-e", "-c", code]
    env = tapbox_env({"PYTEST_ADDOPTS": "-p tapbox.pytest_plugin -p no:cacheprovider",
                      "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    resolv = workdir / "resolv.conf"
    wrapped = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv), *command]
    proc = subprocess.run(wrapped, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == expected, (
        f"docs/api.md:{line}: exit status {proc.returncode}, expected {expected}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
