"""Profiles (-p FILE, tapbox.profile) and the TOML key positions behind their messages
(tapbox.tomllines): the schema, every error path as `file:line: what is wrong`, how profiles
and the command line combine, that no profile is ever read unasked, and end to end through the
real CLI in the fake internet."""

from __future__ import annotations

import json
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import fakenet as fn
import pytest
from conftest import RunClient, RunTapbox, client_cmd, parse_client_json
from fakenet import FakeNet

from tapbox import cli
from tapbox.cli import parse_args
from tapbox.errors import ProfileError
from tapbox.options import AllowRule, PathRule, RunOptions
from tapbox.profile import load_profile, parse_profile
from tapbox.tomllines import key_lines, line_of

SHORT = 30.0


def write(directory: Path, text: str, name: str = "team.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def options_of(path: Path) -> RunOptions:
    return RunOptions.from_layers(load_profile(str(path)))


def profile_error(path: Path) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# Where keys are (tapbox.tomllines)


def test_key_lines_follow_tables_keys_and_array_items() -> None:
    text = textwrap.dedent('''\
        # [not] a table = 1
        title = "x"   # [not a table]
        [network]
        allow = [
          "a.test",  # a comment with "quotes" and ]
          \'\'\'b.test\'\'\',
          """c
        d""",
          [1, 2],
        ]
        mtu = 1_500
        when = 1979-05-27 07:32:00.5
        "quoted.key" = 1
        inline = { a = 1, b.c = [3,
         4] }
        [[runs]]
        x = 1
        [[runs]]
        [ network . sub ]
        z = 'C:\\'
        w = "a\\"b]"
        physical.color = "orange"
        last = """a"""""
        after = 2
        ''')
    tomllib.loads(text)  # the input is valid TOML
    lines = key_lines(text)
    assert lines[("title",)] == 2
    assert lines[("network",)] == 3
    assert [lines[("network", "allow", i)] for i in range(4)] == [5, 6, 7, 9]
    assert lines[("network", "mtu")] == 11
    assert lines[("network", "when")] == 12
    assert lines[("network", "quoted.key")] == 13
    assert lines[("network", "inline", "b", "c", 1)] == 15
    assert (lines[("runs", 0)], lines[("runs", 0, "x")], lines[("runs", 1)]) == (16, 17, 18)
    assert lines[("network", "sub")] == 19
    assert lines[("network", "sub", "w")] == 21
    assert lines[("network", "sub", "physical", "color")] == 22
    assert lines[("network", "sub", "after")] == 24


def test_line_of_falls_back_to_the_enclosing_key() -> None:
    lines = key_lines("\n[network]\nallow = ['a']\n")
    assert line_of(lines, ("network", "allow", 0)) == 3
    assert line_of(lines, ("network", "allow", 5)) == 3
    assert line_of(lines, ("network", "nothing")) == 2
    assert line_of(lines, ("elsewhere",)) == 1


def test_key_lines_with_crlf_and_line_continuations() -> None:
    text = '[network]\r\nallow = """a\\\r\n  b"""\r\nmtu = 1\r\n'
    tomllib.loads(text)
    assert key_lines(text)[("network", "mtu")] == 4


# ------------------------------------------------------------------------------------------------
# The schema


EXAMPLE = """\
    # team.toml
    [network]
    allowlists = ["lists/registry.txt", "/etc/tapbox/base.txt"]
    allow = [
        "api.example.test:443",
        "192.0.2.0/24",
    ]
    dns_upstream = "192.0.2.53"
    ipv6 = "off"
    mtu = 1500
    enabled = true

    [filesystem]
    view = "host"
    paths = ["write build", "read ~/.npmrc", "hide build/secret", "tmpfs /var/cache/x"]

    [environment]
    root = true
    setenv = ["LANG=C.UTF-8", "EMPTY="]
    unsetenv = "TERM"
    clearenv = true

    [record]
    log = "logs/run.jsonl"
    pcap = "~/run.pcap"
    pcap_limit = "20M"
    learn = "learned.allow"
    audit = false
    report = "summary"
    verbose = true

    [process]
    syscalls = "strict"
    syscall_allow = ["@files_read", "getrandom"]
    nest = false
    landlock = true

    [limits]
    timeout = "10m"
    memory = "2G"
    max_procs = 100
    max_files = 256
    """


def test_every_key_of_the_documented_example(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    options = options_of(write(tmp_path, EXAMPLE))
    net = options.network
    assert net.allowlists == (str(tmp_path / "lists/registry.txt"), "/etc/tapbox/base.txt")
    assert net.allow == (AllowRule("api.example.test:443", f"{tmp_path}/team.toml:5"),
                         AllowRule("192.0.2.0/24", f"{tmp_path}/team.toml:6"))
    assert (net.dns_upstream, net.ipv6, net.mtu, net.enabled) == (("192.0.2.53",), "off", 1500,
                                                                   True)
    assert options.filesystem.view == "host"
    assert options.filesystem.paths == (
        PathRule("write", str(tmp_path / "build")), PathRule("read", "/home/someone/.npmrc"),
        PathRule("hide", str(tmp_path / "build/secret")), PathRule("tmpfs", "/var/cache/x"))
    env = options.environment
    assert (env.root, env.setenv, env.unsetenv, env.clearenv) == \
        (True, ("LANG=C.UTF-8", "EMPTY="), ("TERM",), True)
    record = options.record
    assert record.log == str(tmp_path / "logs/run.jsonl")
    assert record.pcap == "/home/someone/run.pcap"
    assert record.learn == str(tmp_path / "learned.allow")
    assert (record.pcap_limit, record.audit, record.report, record.verbose) == \
        (20_000_000, False, "summary", True)
    process = options.process
    assert (process.syscalls, process.syscall_allow, process.nest, process.landlock) == \
        ("strict", ("@files_read", "getrandom"), False, True)
    limits = options.limits
    assert (limits.timeout, limits.memory, limits.max_procs, limits.max_files) == \
        (600.0, 2_000_000_000, 100, 256)


def test_the_example_in_the_docs_is_a_valid_profile(tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "profiles.md").read_text()
    example = docs.split("```toml\n", 1)[1].split("```", 1)[0]
    options = options_of(write(tmp_path, example, "project.toml"))
    assert options.network.mtu == 1500 and options.record.report == "summary"


def test_an_empty_profile_sets_nothing(tmp_path: Path) -> None:
    assert options_of(write(tmp_path, "# nothing yet\n")) == RunOptions()


def test_list_keys_take_one_string_and_sizes_take_bytes(tmp_path: Path) -> None:
    options = options_of(write(tmp_path, """\
        [network]
        allow = "api.example.test"
        allowlists = "a.txt"
        [record]
        pcap_limit = 4096
        """))
    assert options.network.allow == (AllowRule("api.example.test", f"{tmp_path}/team.toml:2"),)
    assert options.network.allowlists == (str(tmp_path / "a.txt"),)
    assert options.record.pcap_limit == 4096


def test_relative_paths_are_relative_to_the_profile_not_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "conf", '[record]\nlog = "run.jsonl"\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    options = options_of(Path("../conf/team.toml"))
    assert options.record.log == str(tmp_path / "conf" / "run.jsonl")


# ------------------------------------------------------------------------------------------------
# Every error path: FILE:LINE: what is wrong


@pytest.mark.parametrize("text, line, problem", [
    # tables and keys that do not exist
    ("[network]\nmtu = 1500\n[netwrok]\n", 3,
     "unknown table [netwrok] (did you mean 'network'?); known: network, filesystem, "
     "environment, record, process, limits"),
    ("title = 'x'\n", 1, "unknown key 'title'"),
    ("[network]\n\nallowlist = ['a.txt']\n", 3,
     "unknown key 'allowlist' in [network] (did you mean 'allowlists'?); known: enabled, "
     "allow, allowlists, dns_upstream, mtu, ipv6"),
    ("[record]\npcap-limit = '1M'\n", 2, "unknown key 'pcap-limit' in [record] (did you mean "
                                         "'pcap_limit'?)"),
    ("[network.extra]\nx = 1\n", 1, "unknown key 'extra' in [network]"),
    ("[limits]\nmemroy = '1G'\n", 2, "unknown key 'memroy' in [limits] (did you mean "
                                      "'memory'?); known: timeout, memory, max_procs, max_files"),
    ("[limits]\ntimeout = 'soon'\n", 2, "limits.timeout: invalid duration 'soon'"),
    ("[limits]\ntimeout = -3\n", 2, "limits.timeout -3: must be positive"),
    ("[limits]\nmax_procs = 0\n", 2, "limits.max_procs 0: must be positive"),
    ("[limits]\nmax_files = '10'\n", 2,
     "limits.max_files: expected an integer, got a string ('10')"),
    ("[process]\nsyscalls = 'loose'\n", 2, "process.syscalls: expected one of 'default', "
                                            "'strict', 'off'"),
    ("[process]\nsyscall_allow = ['@nope']\n", 2, "process.syscall_allow: unknown system-call "
                                                   "group '@nope'"),
    ("network = 1500\n", 1, "network must be a table ([network]), not a value"),
    # wrong types
    ("[network]\nmtu = '1500'\n", 2, "network.mtu: expected an integer, got a string ('1500')"),
    ("[network]\nmtu = 1500.0\n", 2, "network.mtu: expected an integer, got a float (1500.0)"),
    ("[network]\nenabled = 'no'\n", 2, "network.enabled: expected true or false"),
    ("[network]\nipv6 = true\n", 2,
     "network.ipv6: expected one of 'auto', 'on', 'off', got a boolean (true)"),
    ("[network]\nallow = [\n  'a.test',\n  7,\n]\n", 2,
     "network.allow: expected a list of rules (strings), got a list with an integer (7)"),
    ("[network]\nallowlists = 3\n", 2, "network.allowlists: expected a list of strings, "
                                       "got an integer (3)"),
    ("[network]\ndns_upstream = { a = 1 }\n", 2, "network.dns_upstream: expected a list of "
                                                 "strings, got a table"),
    ("[record]\nlog = ['a', 'b']\n", 2, "record.log: expected a string, got a list"),
    ("[record]\npcap_limit = true\n", 2, "record.pcap_limit: expected an integer"),
    ("[record]\nlog = 1979-05-27\n", 2, "record.log: expected a string, got a date"),
    ("[record]\nreport = 'loud'\n", 2, "record.report: expected one of 'auto', 'summary', "
                                      "'quiet', got a string ('loud')"),
    ("[filesystem]\nview = 'cow'\n", 2, "filesystem.view: expected one of 'project', "
                                       "'host', 'overlay', got a string ('cow')"),
    ("[filesystem]\non_exit = 'keep'\n", 2, "filesystem.on_exit is for the copy-on-write "
                                           "view: add filesystem.view = \"overlay\""),
    ("[filesystem]\npaths = ['wrte x']\n", 2, "filesystem.paths: 'wrte x': expected ACTION "
                                            "PATH with ACTION one of write, read, hide, tmpfs"),
    ("[filesystem]\npaths = ['hide']\n", 2, "filesystem.paths: 'hide': no path after 'hide'"),
    ("[filesystem]\npaths = [1]\n", 2, "filesystem.paths: expected a list of paths"),
    ("[environment]\nsetenv = ['NOVALUE']\n", 2, "environment.setenv 'NOVALUE': expected "
                                                 "VAR=VALUE"),
    ("[environment]\nsetenv = ['=x']\n", 2, "environment.setenv '=x': empty variable name"),
    ("[environment]\nunsetenv = ['A=B']\n", 2, "environment.unsetenv 'A=B': a variable name "
                                               "cannot contain '='"),
    # values out of range, and text that does not parse
    ("[network]\nmtu = 70000\n", 2, "network.mtu 70000: must be between 576 and 65520"),
    ("[record]\npcap_limit = 0\n", 2, "record.pcap_limit 0: must be a positive number"),
    ("[record]\npcap_limit = 'lots'\n", 2, "record.pcap_limit: invalid size 'lots'"),
    ("[network]\nallow = [\n  'api.example.test',\n  '192.0.2.10:99999',\n]\n", 4,
     "invalid port '99999' (must be 1-65535)"),
    ("[network]\nallow = '*.*.example.test'\n", 2, "invalid wildcard '*.*.example.test'"),
    ("[network]\ndns_upstream = ['192.0.2.53', 'resolver.example.test']\n", 2,
     "network.dns_upstream: DNS upstream 'resolver.example.test' is not an IP address"),
    ("[record]\nlog = ''\n", 2, "record.log: empty path"),
    # options that need each other
    ("[network]\nenabled = false\n[record]\naudit = true\n", 4,
     "record.audit needs the network: it cannot be used with network.enabled"),
    # TOML syntax: tomllib's message, its line moved to the front
    ("[network]\nmtu = \n", 2, "not valid TOML: invalid value (column 7)"),
    ("[network]\nmtu = 1\nmtu = 2\n", 3, "not valid TOML: cannot overwrite a value"),
    ("[network]\nallow = ['a.test',\n", 2, "not valid TOML: invalid value (at the end of the "
                                          "file)"),
])
def test_profile_errors_name_file_and_line(tmp_path: Path, text: str, line: int,
                                           problem: str) -> None:
    path = write(tmp_path, text)
    message = profile_error(path)
    assert message.startswith(f"{path}:{line}: {problem}"), message


def test_unreadable_profiles(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert profile_error(missing) == f"{missing}: cannot read: No such file or directory"
    assert profile_error(tmp_path).startswith(f"{tmp_path}: cannot read: Is a directory")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\n")
    assert profile_error(latin1) == \
        f"{latin1}: cannot read: not UTF-8 text (bad byte at offset 5)"


def test_a_bad_profile_through_the_cli_is_one_line_and_125(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[network]\nmtu = 'big'\n")
    assert cli.main(["-p", str(path), "--", "true"]) == 125
    assert capsys.readouterr().err == \
        f"tapbox: {path}:2: network.mtu: expected an integer, got a string ('big')\n"


def test_the_same_error_message_whatever_the_file_is_called(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nmtu = 1\n", "my profile: v2.toml")
    assert profile_error(path) == f"{path}:2: network.mtu 1: must be between 576 and 65520"


def test_parse_profile_names_the_given_path() -> None:
    with pytest.raises(ProfileError) as info:
        parse_profile("[nope]\n", "given.toml")
    assert str(info.value).startswith("given.toml:1: unknown table [nope]")
    assert (info.value.path, info.value.line) == ("given.toml", 1)


# ------------------------------------------------------------------------------------------------
# Profiles and the command line


def test_rules_and_files_add_up_other_options_replace(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        [network]
        allow = ["api.example.test"]
        allowlists = ["team.txt"]
        dns_upstream = ["192.0.2.53", "192.0.2.54"]
        mtu = 1500
        ipv6 = "off"
        [record]
        report = "summary"
        log = "team.jsonl"
        """)
    options = parse_args(["-p", str(path), "--allow", "192.0.2.10:80", "-F", "mine.txt",
                          "--dns-upstream", "198.51.100.53", "--mtu", "9000", "-q",
                          "--", "true"]).options
    net = options.network
    assert net.allow == (AllowRule("api.example.test", f"{path}:2"),
                         AllowRule("192.0.2.10:80", "--allow"))
    assert net.allowlists == (str(tmp_path / "team.txt"), "mine.txt")
    assert net.dns_upstream == ("198.51.100.53",)
    assert (net.mtu, net.ipv6) == (9000, "off")  # --mtu replaces; ipv6 kept from the profile
    assert options.record.report == "quiet"  # -q replaces report = "summary"
    assert options.record.log == str(tmp_path / "team.jsonl")


def test_the_profile_alone_and_summary_over_quiet(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\nmtu = 1500\n[record]\nreport = "quiet"\n')
    alone = parse_args(["-p", str(path), "--", "true"]).options
    assert (alone.network.mtu, alone.record.report) == (1500, "quiet")
    louder = parse_args(["-p", str(path), "--summary", "--", "true"]).options
    assert louder.record.report == "summary"


def test_later_profiles_replace_earlier_ones_and_rules_add_up(tmp_path: Path) -> None:
    first = write(tmp_path, "[network]\nallow = 'a.test'\nmtu = 1500\nipv6 = 'on'\n", "1.toml")
    second = write(tmp_path, "[network]\nallow = 'b.test'\nmtu = 9000\n", "2.toml")
    net = parse_args(["-p", str(first), "--profile", str(second), "--", "true"]).options.network
    assert [rule.text for rule in net.allow] == ["a.test", "b.test"]
    assert (net.mtu, net.ipv6) == (9000, "on")


def test_a_contradiction_across_profile_and_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[network]\nmtu = 1500\n\n[record]\nlog = "run.jsonl"\n')
    with pytest.raises(SystemExit):
        parse_args(["-p", str(path), "-n", "--", "true"])
    assert f"tapbox: error: {path}:5: record.log needs the network: it cannot be used with -n" \
        in capsys.readouterr().err
    assert cli.main(["-p", str(path), "-n", "--", "true"]) == 125


def test_a_profile_is_never_read_unless_named(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A repository cannot widen its own sandbox by shipping a profile."""
    for name in ("tapbox.toml", ".tapbox.toml", "profile.toml", "pyproject.toml"):
        write(tmp_path, "[network]\nallow = '*.example.test'\nmtu = 1500\n", name)
    (tmp_path / ".config" / "tapbox").mkdir(parents=True)
    write(tmp_path / ".config" / "tapbox", "[network]\nmtu = 1500\n", "profile.toml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))

    def no_toml(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a TOML file was read without -p")

    monkeypatch.setattr(tomllib, "loads", no_toml)
    monkeypatch.setattr(tomllib, "load", no_toml)
    assert parse_args(["--", "true"]).options == RunOptions()


# ------------------------------------------------------------------------------------------------
# End to end: the real CLI in the fake internet


def test_profile_rules_files_and_log_end_to_end(run_client: RunClient, fakenet: FakeNet,
                                                tmp_path: Path) -> None:
    """tapbox runs with its cwd at the repository: the profile's relative allowlist file and
    log are found next to the profile, and its rules admit exactly what they say."""
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "web.txt").write_text("192.0.2.10:80\n")
    profile = write(tmp_path, """\
        [network]
        allowlists = ["lists/web.txt"]
        allow = ["192.0.2.10:443"]
        [record]
        log = "run.jsonl"
        """)
    allowed = run_client("connect", "192.0.2.10", "443", tapbox_args=("-p", str(profile)),
                         timeout=SHORT)
    assert allowed.returncode == 0 and allowed.expect_result()["result"] == "ok", \
        allowed.describe()
    start = json.loads((tmp_path / "run.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start"
    assert start["allowlist"] == [str(tmp_path / "lists" / "web.txt"),
                                  f"{profile}:3 192.0.2.10:443"], start
    assert start["rules"] == 2
    from_file = run_client("connect", "192.0.2.10", "80", tapbox_args=("-p", str(profile)),
                           timeout=SHORT)
    assert from_file.returncode == 0, from_file.describe()
    denied = run_client("connect", "192.0.2.10", "8080", tapbox_args=("-p", str(profile)),
                        timeout=SHORT)
    assert denied.returncode == 1 and denied.get("result") == "refused", denied.describe()
    assert fakenet.connections("192.0.2.10", 8080) == []


def test_profile_dns_upstream_end_to_end(fakenet: FakeNet, run_tapbox: RunTapbox,
                                         tmp_path: Path) -> None:
    profile = write(tmp_path, f"""\
        [network]
        allow = ["api.example.test"]
        dns_upstream = "{fn.DNS_UPSTREAM}"
        """)
    proc = run_tapbox("-p", str(profile), cmd=client_cmd("resolve", "api.example.test", "--type",
                                                         "A"),
                      dns_upstream=None, timeout=SHORT)
    result = parse_client_json(proc.stdout)
    assert proc.returncode == 0 and result and result["addresses"] == ["192.0.2.10"], proc.stderr
    assert fakenet.dns_queries(server=fn.DNS_UPSTREAM, qname="api.example.test")


def test_a_bad_profile_stops_tapbox_before_the_command(run_tapbox: RunTapbox,
                                                       tmp_path: Path) -> None:
    profile = write(tmp_path, "[network]\nallow = [\n  'api.example.test',\n  '192.0.2.10:0',\n]\n")
    proc = run_tapbox("-p", str(profile), cmd=["sh", "-c", "echo COMMAND-RAN"], timeout=SHORT)
    assert proc.returncode == 125, proc.stderr
    assert proc.stderr == f"tapbox: {profile}:4: invalid port '0' (must be 1-65535)\n"
    assert "COMMAND-RAN" not in proc.stdout
