"""Learn mode cannot be made to widen the allowlist (issue 8, item 3).

The sandboxed command controls its DNS questions, its argv (written in the learned file's
header) and, here, the learned file itself while it runs. None of it may turn into a rule:
rules come only from flows tapbox decided, written from its own records.
"""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import CLIENT, RunTapbox
from fakenet import FakeNet

from netstack.events import Flow
from tapbox.allowlist import load_file
from tapbox.flows import FlowRecord
from tapbox.learn import Learner

SHORT = 30.0
PY = sys.executable


def client(*args: str) -> str:
    return " ".join([PY, str(CLIENT), *args])


def rules_in(path: Path) -> list[str]:
    return [rule.text for rule in load_file(str(path))]


def describe(proc: object) -> str:
    return (f"exit {proc.returncode}\nstdout:\n{proc.stdout}\n"  # type: ignore[attr-defined]
            f"stderr:\n{proc.stderr}")  # type: ignore[attr-defined]


def test_a_lookup_of_a_literal_address_is_never_learned(
        run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    """`dig 169.254.169.254 @10.0.2.3` used to be learned as the bare line `169.254.169.254`,
    an IP rule for every port of the metadata address."""
    learned = tmp_path / "project.allow"
    script = "; ".join([client("resolve-raw", "10.0.2.3", "169.254.169.254"),
                        client("resolve-raw", "10.0.2.3", "127.0.0.1"),
                        client("hello", "api.example.test", "80")])
    proc = run_tapbox("--learn", str(learned), cmd=["sh", "-c", script], timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    assert rules_in(learned) == ["api.example.test:80"], learned.read_text()
    text = learned.read_text()
    assert "#   169.254.169.254" not in text and "#   127.0.0.1" not in text, text


def test_an_srv_lookup_is_never_learned(run_tapbox: RunTapbox, fakenet: FakeNet,
                                        tmp_path: Path) -> None:
    """A lookup alone (here SRV) used to become a name rule for every port."""
    learned = tmp_path / "project.allow"
    script = "; ".join([
        client("resolve-raw", "10.0.2.3", "_http._tcp.example.test", "--type", "SRV"),
        client("resolve-raw", "10.0.2.3", "txt.example.test", "--type", "TXT"),
        client("hello", "api.example.test", "80")])
    proc = run_tapbox("--learn", str(learned), cmd=["sh", "-c", script], timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    assert rules_in(learned) == ["api.example.test:80"], learned.read_text()


def test_a_newline_in_the_command_cannot_add_a_rule(run_tapbox: RunTapbox, fakenet: FakeNet,
                                                    tmp_path: Path) -> None:
    """The header names the command; `sh -c $'true\\n0.0.0.0/0 #'` used to leave a line
    `0.0.0.0/0 #'` in the file: all of IPv4."""
    learned = tmp_path / "project.allow"
    argument = "true\n0.0.0.0/0 #\u202e\x1b[2K"
    proc = run_tapbox("--learn", str(learned), cmd=["sh", "-c", argument], timeout=SHORT)
    assert proc.returncode == 127, describe(proc)  # `0.0.0.0/0`: no such command
    text = learned.read_text()
    assert rules_in(learned) == [], text
    assert "# command: sh -c 'true\\x0a0.0.0.0/0 #\\u202e\\x1b[2K'\n" in text, text
    assert all(line.startswith("#") for line in text.splitlines()), text


def test_the_command_cannot_append_to_the_learn_file(run_tapbox: RunTapbox, fakenet: FakeNet,
                                                     tmp_path: Path) -> None:
    """FILE is read-only inside the sandbox (a read-only bind): what the command tries to add
    never reaches it, and FILE ends as the text read before the run plus what tapbox learned."""
    learned = tmp_path / "project.allow"
    original = "# mine\napi.example.test:80\n"
    learned.write_text(original)
    script = "; ".join([f"echo '0.0.0.0/0' >> {learned}",
                        client("hello", "api.example.test", "80"),
                        client("hello", "203.0.113.10", "80")])
    # tmp_path writable in the sandbox, as a user's project directory would be: FILE itself
    # is still read-only
    proc = run_tapbox("--learn", str(learned), "--write", str(tmp_path),
                      cmd=["sh", "-c", script], timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    assert "Read-only file system" in proc.stderr, describe(proc)
    text = learned.read_text()
    assert text.startswith(original), text
    assert rules_in(learned) == ["api.example.test:80", "203.0.113.10:80"], text


def test_the_command_cannot_create_the_learn_file(run_tapbox: RunTapbox, fakenet: FakeNet,
                                                  tmp_path: Path) -> None:
    learned = tmp_path / "project.allow"
    script = f"echo '0.0.0.0/0' > {learned}; " + client("hello", "api.example.test", "80")
    # tmp_path writable in the sandbox, as a user's project directory would be: FILE itself
    # is still read-only
    proc = run_tapbox("--learn", str(learned), "--write", str(tmp_path),
                      cmd=["sh", "-c", script], timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    assert "Read-only file system" in proc.stderr, describe(proc)
    assert rules_in(learned) == ["api.example.test:80"], learned.read_text()


def test_a_file_changed_outside_during_the_run_is_not_merged(tmp_path: Path) -> None:
    """Read once, written from that text: a change made meanwhile (from outside the sandbox,
    which cannot write FILE) is not merged, and is kept aside for review."""
    learned = tmp_path / "project.allow"
    original = "# mine\napi.example.test:80\n"
    learned.write_text(original)
    learner = Learner(str(learned), ["true"])
    with learned.open("a") as f:
        f.write("0.0.0.0/0\n")
    learner.flow(_flow("api.example.test", "192.0.2.10", 443))
    report = learner.write(0)
    text = learned.read_text()
    assert text.startswith(original) and "0.0.0.0/0" not in text, text
    assert any("changed while the command ran" in line for line in report), report
    aside = Path(f"{learned}.changed-during-run")
    assert aside.read_text() == original + "0.0.0.0/0\n"


def test_a_missing_file_is_held_by_a_placeholder_and_replaced(tmp_path: Path) -> None:
    learned = tmp_path / "project.allow"
    learner = Learner(str(learned), ["true"])
    assert learned.exists() and learned.stat().st_size == 0  # held for the run
    learner.flow(_flow("api.example.test", "192.0.2.10", 443))
    report = learner.write(0)
    assert not any("while the command ran" in line for line in report), report
    assert rules_in(learned) == ["api.example.test:443"], learned.read_text()


def _flow(name: str | None, dst: str, port: int) -> FlowRecord:
    return FlowRecord(Flow("tcp", "10.0.2.100", 40000, dst, port), True, "x", None, name, 0.0,
                      would_deny=True)


def test_a_name_that_reads_back_as_an_address_is_left_out(tmp_path: Path) -> None:
    learner = Learner(str(tmp_path / "a.allow"), ["x"])
    learner.flow(_flow("169.254.169.254", "192.0.2.10", 80))
    learner.flow(_flow("api.example.test", "192.0.2.10", 80))
    add, bad = learner.new_rules()
    assert [u.text for u in add] == ["api.example.test:80"]
    assert bad == ["169.254.169.254:80"]


def test_what_the_learner_remembers_is_bounded(tmp_path: Path) -> None:
    learner = Learner(str(tmp_path / "a.allow"), ["x"])
    for i in range(20_000):
        learner.flow(_flow(None, f"198.51.{i // 250}.{i % 250}", 80))
        learner.dns(f"n{i}.example.test", "would-deny")
    assert len(learner.flows) <= 10_000 and len(learner.lookups) <= 1000
    report = learner.write(0)
    assert any("were not learned" in line for line in report), report
