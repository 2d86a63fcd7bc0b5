"""Learn mode end to end: `--learn FILE` writes an allowlist; `-F FILE` then admits the same run
and nothing else; an existing FILE is merged, with stderr naming what was added."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import CLIENT, RunTapbox
from fakenet import FakeNet

SHORT = 30.0
PY = sys.executable


def client(*args: str) -> str:
    return " ".join([PY, str(CLIENT), *args])


# Each step exits non-zero on failure, and `set -e` makes the script fail with it.
STEPS = [
    client("hello", "api.example.test", "80"),
    client("hello", "alias.example.test", "80"),  # a CNAME to edge.cdn.test (198.51.100.20)
    client("hello", "203.0.113.10", "80"),  # an address, no name
    client("udp", "203.0.113.7", "5353"),  # an address no name of this run resolved to
]
SCRIPT = "set -e; " + "; ".join(STEPS)
LOOKUP = client("resolve", "multi.example.test")  # resolved, never connected to: not learned

LEARNED = [
    "alias.example.test:80",
    "api.example.test:80",
    "203.0.113.7:5353",
    "203.0.113.10:80",
]


def rules_in(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        rule = line.split("#", 1)[0].strip()
        if rule:
            out.append(rule)
    return out


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_learn_then_replay(run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    learned = tmp_path / "project.allow"
    learn = run_tapbox("--learn", str(learned), cmd=["sh", "-c", f"{SCRIPT}; {LOOKUP}"],
                       timeout=SHORT)
    assert learn.returncode == 0, describe(learn)
    assert f"wrote 4 rules to {learned}" in learn.stderr, describe(learn)
    text = learned.read_text()
    assert rules_in(learned) == LEARNED, text
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("tapbox --learn" in line for line in header), text
    assert any("client.py hello api.example.test 80" in line for line in header), text
    assert any("UTC" in line for line in header), text
    assert "198.51.100.20" not in text, "a CDN address was learned instead of the name"
    assert "\n#   multi.example.test\n" in text  # listed, as a comment only

    fakenet.reset()
    replay = run_tapbox("-F", str(learned), cmd=["sh", "-c", SCRIPT], timeout=SHORT)
    assert replay.returncode == 0, describe(replay)
    assert "denied" not in replay.stderr, describe(replay)
    assert len(fakenet.connections("198.51.100.20", 80)) == 1
    assert len(fakenet.connections("203.0.113.10", 80)) == 1

    # Anything outside the learned file is denied.
    fakenet.reset()
    for step, expect in (
        (client("connect", "203.0.113.7", "80"), "denied tcp 203.0.113.7:80"),
        (client("connect", "192.0.2.10", "443"), "denied tcp 192.0.2.10:443"),
        (client("connect", "203.0.113.10", "443"), "denied tcp 203.0.113.10:443"),
        (client("resolve", "denied.test"), None),
        (LOOKUP, None),
    ):
        other = run_tapbox("-F", str(learned), cmd=["sh", "-c", step], timeout=SHORT)
        assert other.returncode == 1, describe(other)
        if expect:
            assert expect in other.stderr, describe(other)
        else:
            assert '"NXDOMAIN"' in other.stdout, describe(other)
    # (192.0.2.10:443 by its learned name too: api.example.test is admitted on port 80 only)
    by_name = run_tapbox("-F", str(learned), cmd=["sh", "-c", client(
        "connect", "api.example.test", "443")], timeout=SHORT)
    assert by_name.returncode == 1, describe(by_name)
    assert fakenet.connections(port=443) == []


def test_learn_merges_into_an_existing_file(run_tapbox: RunTapbox, fakenet: FakeNet,
                                            tmp_path: Path) -> None:
    learned = tmp_path / "project.allow"
    original = "# my own notes\napi.example.test:80   # the API\n"
    learned.write_text(original)
    script = "set -e; " + "; ".join([client("hello", "api.example.test", "80"),
                                     client("hello", "203.0.113.7", "80")])
    first = run_tapbox("--learn", str(learned), cmd=["sh", "-c", script], timeout=SHORT)
    assert first.returncode == 0, describe(first)
    assert f"added 1 rule to {learned}: 203.0.113.7:80" in first.stderr, describe(first)
    text = learned.read_text()
    assert text.startswith(original), text
    assert rules_in(learned) == ["api.example.test:80", "203.0.113.7:80"], text
    added = text[len(original):]
    assert "# added by tapbox --learn" in added and "hello 203.0.113.7 80" in added, text

    again = run_tapbox("--learn", str(learned), cmd=["sh", "-c", script], timeout=SHORT)
    assert again.returncode == 0, describe(again)
    assert "already admits everything" in again.stderr, describe(again)
    assert learned.read_text() == text


def test_learn_file_that_does_not_parse_stops_before_the_command(
        run_tapbox: RunTapbox, tmp_path: Path) -> None:
    learned = tmp_path / "project.allow"
    learned.write_text("api.example.test:99999\n")
    proc = run_tapbox("--learn", str(learned), cmd=["sh", "-c", "echo COMMAND-RAN"],
                      timeout=SHORT)
    assert proc.returncode == 125, describe(proc)
    assert "project.allow:1:" in proc.stderr and "COMMAND-RAN" not in proc.stdout
    assert learned.read_text() == "api.example.test:99999\n"


# ------------------------------------------------------------------------------------------------
# --learn FILE.toml: a profile


def test_learn_writes_a_profile_that_replays(run_tapbox: RunTapbox, fakenet: FakeNet,
                                              tmp_path: Path) -> None:
    import tomllib

    learned = tmp_path / "project.toml"
    learn = run_tapbox("--learn", str(learned), cmd=["sh", "-c", f"{SCRIPT}; {LOOKUP}"],
                       timeout=SHORT)
    assert learn.returncode == 0, describe(learn)
    assert f"wrote 4 rules to {learned}" in learn.stderr, describe(learn)
    text = learned.read_text()
    assert tomllib.loads(text) == {"network": {"allow": LEARNED}}, text
    assert text.startswith("# Profile learned by tapbox --learn"), text
    assert "#   multi.example.test" in text  # a comment, not a rule

    fakenet.reset()
    replay = run_tapbox("-p", str(learned), cmd=["sh", "-c", SCRIPT], timeout=SHORT)
    assert replay.returncode == 0 and "denied" not in replay.stderr, describe(replay)
    other = run_tapbox("-p", str(learned), cmd=["sh", "-c", client("connect", "203.0.113.7",
                                                                   "80")], timeout=SHORT)
    assert "denied tcp 203.0.113.7:80" in other.stderr, describe(other)


def _learn_into(run_tapbox: RunTapbox, profile: Path) -> subprocess.CompletedProcess[str]:
    script = "set -e; " + "; ".join([client("hello", "api.example.test", "80"),
                                     client("hello", "203.0.113.7", "80")])
    return run_tapbox("--learn", str(profile), cmd=["sh", "-c", script], timeout=SHORT)


def test_learn_merges_into_a_profile_keeping_its_text(run_tapbox: RunTapbox, fakenet: FakeNet,
                                                      tmp_path: Path) -> None:
    import tomllib

    (tmp_path / "team.allow").write_text("api.example.test:80\n")
    cases = {
        # the array, with a bracket and a '#' inside strings and comments, no trailing comma
        "array.toml": ('# ours\n[network]\nallow = [\n  "192.0.2.20:80", # "]" not the end\n'
                       '  "[2001:db8::1]:443"\n]\nmtu = 1500\n[record]\nreport = "summary"\n',
                       ["192.0.2.20:80", "[2001:db8::1]:443", "api.example.test:80",
                        "203.0.113.7:80"]),
        # a [network] table without allow (its allowlist file already admits the API)
        "table.toml": '[network]\nallowlists = ["team.allow"]\nipv6 = "off"\n',
        # no [network] at all
        "bare.toml": '[record]\nreport = "quiet"\n',
    }
    expected = {"table.toml": ["203.0.113.7:80"],
                "bare.toml": ["api.example.test:80", "203.0.113.7:80"]}
    for name, case in cases.items():
        text, want = case if isinstance(case, tuple) else (case, expected[name])
        profile = tmp_path / name
        profile.write_text(text)
        merged = _learn_into(run_tapbox, profile)
        assert merged.returncode == 0, describe(merged)
        after = profile.read_text()
        lines = iter(after.splitlines())  # every line that was there stays, in its order
        assert all(any(line == kept.rstrip(",") or line == kept for kept in lines)
                   for line in text.splitlines()), after
        document = tomllib.loads(after)
        assert document["network"]["allow"] == want, after
        for key, value in tomllib.loads(text).items():  # nothing else changed
            for inner, setting in value.items():
                if inner != "allow":
                    assert document[key][inner] == setting, after
        assert "# added by tapbox --learn" in after
        again = _learn_into(run_tapbox, profile)
        assert "already admits everything" in again.stderr, describe(again)


def test_learn_refuses_a_profile_it_cannot_extend(run_tapbox: RunTapbox, fakenet: FakeNet,
                                                  tmp_path: Path) -> None:
    profile = tmp_path / "one.toml"
    original = '[network]\nallow = "192.0.2.20:80"   # one rule, not an array\n'
    profile.write_text(original)
    proc = _learn_into(run_tapbox, profile)
    assert "cannot add to" in proc.stderr and "left unchanged" in proc.stderr, describe(proc)
    assert "The run needed: api.example.test:80, 203.0.113.7:80" in proc.stderr
    assert profile.read_text() == original
