"""The options model (tapbox.options), the error vocabulary (tapbox.errors) and the CLI as a
translation of argv into RunOptions (tapbox.cli): no sandbox needed, except for the one test
that runs a command from options built in Python."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, tapbox_env

import tapbox.runner
from tapbox import cli
from tapbox.allowlist import AllowlistError as AllowlistErrorFromAllowlist
from tapbox.cli import log as log_cli
from tapbox.cli import parse_args
from tapbox.errors import (
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    EXIT_TAPBOX_FAILED,
    AllowlistError,
    InputError,
    ProfileError,
    SetupError,
    TapboxError,
    UsageError,
    exit_status_for_signal,
)
from tapbox.options import (
    AllowRule,
    EnvironmentOptions,
    FilesystemOptions,
    Layer,
    LimitsOptions,
    NetworkOptions,
    Origin,
    ProcessOptions,
    RecordOptions,
    RunOptions,
)

# ------------------------------------------------------------------------------------------------
# Errors and exit statuses


def test_error_hierarchy_and_exit_statuses() -> None:
    for cls in (UsageError, SetupError, InputError, AllowlistError, ProfileError):
        assert issubclass(cls, TapboxError)
        assert cls("x").exit_status == EXIT_TAPBOX_FAILED == 125
    assert issubclass(AllowlistError, InputError) and issubclass(ProfileError, InputError)
    assert AllowlistErrorFromAllowlist is AllowlistError  # one class, importable from both
    assert (EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND) == (126, 127)
    assert exit_status_for_signal(15) == 143


def test_input_error_carries_its_location() -> None:
    err = ProfileError.at("team.toml:7", "unknown key 'x'")
    assert str(err) == "team.toml:7: unknown key 'x'"
    assert (err.location, err.path, err.line, err.problem) == \
        ("team.toml:7", "team.toml", 7, "unknown key 'x'")
    whole = ProfileError.at("team.toml", "cannot read: No such file or directory")
    assert (whole.path, whole.line, whole.location) == (None, None, "team.toml")
    rule = AllowlistError("--allow 'a..b': empty label", problem="empty label")
    assert (rule.location, rule.line) == ("--allow 'a..b'", None)
    usage = UsageError("record.log needs the network", option="record.log",
                       location="team.toml:3")
    assert str(usage) == "team.toml:3: record.log needs the network"
    assert usage.problem == "record.log needs the network"


def _assignments(tree: ast.Module) -> list[tuple[str, Any]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out.append((target.id, node.value.value))
    return out


def test_exit_statuses_are_defined_only_in_errors() -> None:
    """One vocabulary: no other module of the package names an exit status of its own."""
    defined = []
    for path in sorted((REPO_ROOT / "tapbox").rglob("*.py")):
        for name, value in _assignments(ast.parse(path.read_text())):
            if name.startswith("EXIT_") and isinstance(value, int):
                defined.append((path.relative_to(REPO_ROOT).as_posix(), name))
    assert defined and {path for path, _ in defined} == {"tapbox/errors.py"}, defined


# ------------------------------------------------------------------------------------------------
# The model on its own (as the Python API will fill it)


def test_defaults_are_a_bare_run() -> None:
    options = RunOptions().validate()
    assert options.network == NetworkOptions(enabled=True, allow=(), allowlists=(),
                                             dns_upstream=(), mtu=65520, ipv6="auto")
    assert options.filesystem == FilesystemOptions(view="project", paths=())
    assert options.environment == EnvironmentOptions(root=False, setenv=(), unsetenv=(),
                                                     clearenv=False)
    assert options.record == RecordOptions(log=None, pcap=None, pcap_limit=100_000_000,
                                           learn=None, audit=False, report="auto",
                                           verbose=False)
    assert options.limits == LimitsOptions(timeout=None, memory=None, max_procs=None,
                                           max_files=None)  # unlimited
    assert options.process == ProcessOptions(syscalls="default", syscall_allow=(), nest=True,
                                             landlock=False)
    assert not options.record.audit_mode


def test_lists_become_tuples_and_strings_become_rules() -> None:
    net = NetworkOptions(allow=["api.example.test:443", AllowRule("192.0.2.1", "t.toml:3")],
                         allowlists=["a.txt"], dns_upstream=["192.0.2.53"])
    assert net.allow == (AllowRule("api.example.test:443", "--allow"),
                         AllowRule("192.0.2.1", "t.toml:3"))
    assert net.allowlists == ("a.txt",) and net.dns_upstream == ("192.0.2.53",)
    RunOptions(network=net).validate()
    with pytest.raises(AttributeError):
        net.mtu = 1500  # type: ignore[misc]


def test_audit_mode_is_audit_or_learn() -> None:
    assert RecordOptions(audit=True).audit_mode
    assert RecordOptions(learn="p.allow").audit_mode


@pytest.mark.parametrize("options, message", [
    (RunOptions(network=NetworkOptions(mtu="1500")),  # type: ignore[arg-type]
     "network.mtu: expected an integer, got a string ('1500')"),
    (RunOptions(network=NetworkOptions(mtu=True)),
     "network.mtu: expected an integer, got a boolean (true)"),
    (RunOptions(network=NetworkOptions(ipv6="sometimes")),  # type: ignore[arg-type]
     "network.ipv6: expected one of 'auto', 'on', 'off', got a string ('sometimes')"),
    (RunOptions(network=NetworkOptions(enabled="no")),  # type: ignore[arg-type]
     "network.enabled: expected true or false, got a string ('no')"),
    (RunOptions(network=NetworkOptions(allow=["a.test", 7])),  # type: ignore[list-item]
     "network.allow: expected a list of rules (strings), got a list with an integer (7)"),
    (RunOptions(network=NetworkOptions(dns_upstream="192.0.2.53")),  # type: ignore[arg-type]
     "network.dns_upstream: expected a list of strings, got a string ('192.0.2.53')"),
    (RunOptions(record=RecordOptions(log=["a", "b"])),  # type: ignore[arg-type]
     "record.log: expected a string, got a list"),
    (RunOptions(record=RecordOptions(report="loud")),  # type: ignore[arg-type]
     "record.report: expected one of 'auto', 'summary', 'quiet', got a string ('loud')"),
    (RunOptions(filesystem="host"),  # type: ignore[arg-type]
     "filesystem: expected FilesystemOptions, got a string ('host')"),
    (RunOptions(network=NetworkOptions(mtu=575)), "network.mtu 575: must be between 576 and 65520"),
    (RunOptions(network=NetworkOptions(mtu=65521)),
     "network.mtu 65521: must be between 576 and 65520"),
    (RunOptions(record=RecordOptions(pcap_limit=0)),
     "record.pcap_limit 0: must be a positive number of bytes"),
    (RunOptions(network=NetworkOptions(enabled=False), record=RecordOptions(learn="p.allow")),
     "record.learn needs the network: it cannot be used with network.enabled"),
])
def test_validate_names_what_is_wrong(options: RunOptions, message: str) -> None:
    with pytest.raises(UsageError) as info:
        options.validate()
    assert str(info.value) == message


def test_mtu_bounds_are_inclusive() -> None:
    for mtu in (576, 65520):
        RunOptions(network=NetworkOptions(mtu=mtu)).validate()


def test_no_network_alone_is_fine() -> None:
    RunOptions(network=NetworkOptions(enabled=False, allow=["a.test"])).validate()


def _layer(*settings: tuple[str, Any, Origin]) -> Layer:
    layer = Layer()
    for path, value, origin in settings:
        layer.set(path, value, origin)
    return layer


def test_layers_stack_later_wins_rules_and_files_add() -> None:
    first = _layer(("network.mtu", 1500, Origin("network.mtu", "a.toml:2")),
                   ("network.allow", (AllowRule("a.test", "a.toml:3"),), Origin("network.allow")),
                   ("network.allowlists", ("/a.txt",), Origin("network.allowlists")),
                   ("network.dns_upstream", ("192.0.2.53",), Origin("network.dns_upstream")),
                   ("record.report", "summary", Origin("record.report")))
    second = _layer(("network.mtu", 9000, Origin("--mtu")),
                    ("network.allow", (AllowRule("b.test"),), Origin("--allow")),
                    ("network.allowlists", ("b.txt",), Origin("-F")),
                    ("network.dns_upstream", ("198.51.100.53",), Origin("--dns-upstream")))
    options = RunOptions.from_layers(first, second)
    assert options.network.mtu == 9000
    assert options.network.allow == (AllowRule("a.test", "a.toml:3"), AllowRule("b.test"))
    assert options.network.allowlists == ("/a.txt", "b.txt")
    assert options.network.dns_upstream == ("198.51.100.53",)
    assert options.record.report == "summary"  # not set by the later layer: kept
    assert RunOptions.from_layers() == RunOptions()


def test_messages_name_each_option_as_its_layer_wrote_it() -> None:
    profile = _layer(("record.pcap", "/x.pcap", Origin("record.pcap", "team.toml:9")))
    command_line = _layer(("network.enabled", False, Origin("-n")))
    with pytest.raises(UsageError) as info:
        RunOptions.from_layers(profile, command_line)
    assert str(info.value) == "team.toml:9: record.pcap needs the network: it cannot be used " \
                              "with -n"
    assert (info.value.option, info.value.location) == ("record.pcap", "team.toml:9")
    with pytest.raises(UsageError) as info:
        RunOptions.from_layers(_layer(("network.mtu", 100, Origin("--mtu"))))
    assert str(info.value) == "--mtu 100: must be between 576 and 65520"


def test_a_layer_only_sets_fields_that_exist() -> None:
    with pytest.raises(KeyError):
        Layer().set("network.mtuu", 1500, Origin("x"))


# ------------------------------------------------------------------------------------------------
# The command line -> RunOptions


def test_bare_command_line_is_the_defaults() -> None:
    args = parse_args(["--", "true"])
    assert args.options == RunOptions()
    assert args.command == ["true"]


@pytest.mark.parametrize("argv, path, value", [
    (["-F", "a.txt", "--file", "b.txt"], "network.allowlists", ("a.txt", "b.txt")),
    (["--allow", "a.test", "--allow", "192.0.2.1:80"], "network.allow",
     (AllowRule("a.test", "--allow"), AllowRule("192.0.2.1:80", "--allow"))),
    (["--dns-upstream", "192.0.2.53", "--dns-upstream", "[2001:db8::53]:5353"],
     "network.dns_upstream", ("192.0.2.53", "[2001:db8::53]:5353")),
    (["--mtu", "1500"], "network.mtu", 1500),
    (["--ipv6", "off"], "network.ipv6", "off"),
    (["-n"], "network.enabled", False),
    (["--no-network"], "network.enabled", False),
    (["--root"], "environment.root", True),
    (["-v"], "record.verbose", True),
    (["--log", "r.jsonl"], "record.log", "r.jsonl"),
    (["--audit"], "record.audit", True),
    (["--learn", "p.allow"], "record.learn", "p.allow"),
    (["--pcap", "r.pcap"], "record.pcap", "r.pcap"),
    (["--pcap-limit", "64KiB"], "record.pcap_limit", 65536),
    (["--summary"], "record.report", "summary"),
    (["-q"], "record.report", "quiet"),
    (["-q", "--quiet"], "record.report", "quiet"),
    (["--syscalls", "strict"], "process.syscalls", "strict"),
    (["--syscall-allow", "@io_uring", "--syscall-allow", "getrandom"], "process.syscall_allow",
     ("@io_uring", "getrandom")),
    (["--no-nest"], "process.nest", False),
    (["--landlock"], "process.landlock", True),
    (["--timeout", "1.5m"], "limits.timeout", 90.0),
    (["--timeout", "45"], "limits.timeout", 45.0),
    (["--memory", "512M"], "limits.memory", 512_000_000),
    (["--max-procs", "64"], "limits.max_procs", 64),
    (["--max-files", "100"], "limits.max_files", 100),
])
def test_each_option_sets_its_field(argv: list[str], path: str, value: Any) -> None:
    options = parse_args([*argv, "--", "true"]).options
    part, name = path.split(".")
    assert getattr(getattr(options, part), name) == value
    # ...and nothing else
    assert options == RunOptions.from_layers(_layer((path, value, Origin("x"))))


def test_verbose_and_quiet_together_are_accepted_as_before() -> None:
    record = parse_args(["-v", "-q", "--", "true"]).options.record
    assert (record.verbose, record.report) == (True, "quiet")


@pytest.mark.parametrize("argv, message", [
    (["--mtu", "100"], "--mtu 100: must be between 576 and 65520"),
    (["-n", "--log", "x"], "--log needs the network: it cannot be used with -n"),
    (["-n", "--pcap", "x", "--audit"], "--audit needs the network: it cannot be used with -n"),
    (["-q", "--summary"], "--summary and -q contradict each other: choose one"),
    (["--pcap-limit", "lots"], "--pcap-limit: invalid size 'lots'"),
    (["--timeout", "0"], "--timeout: invalid duration '0'"),
    (["--timeout", "5x"], "--timeout: invalid duration '5x'"),
    (["--memory", "-1"], "--memory: invalid size '-1'"),
    (["--max-procs", "0"], "--max-procs 0: must be positive"),
    (["--max-files", "-5"], "--max-files -5: must be positive"),
    (["--syscalls", "loose"], "argument --syscalls: invalid choice: 'loose'"),
    (["--syscall-allow", "@nope"], "--syscall-allow: unknown system-call group '@nope'"),
])
def test_usage_errors_exit_125_with_the_message(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args([*argv, "--", "true"])
    assert info.value.code == 2
    assert f"tapbox: error: {message}" in capsys.readouterr().err
    assert cli.main([*argv, "--", "true"]) == 125


def test_main_hands_command_and_options_to_the_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, Any]] = []

    def fake_run(command: Any, options: Any) -> int:
        seen.append((command, options))
        return 7

    monkeypatch.setattr(tapbox.runner, "run", fake_run)
    assert cli.main(["--mtu", "1500", "--", "log", "show"]) == 7
    assert seen == [(["log", "show"], RunOptions(network=NetworkOptions(mtu=1500)))]


@pytest.mark.parametrize("error, printed", [
    (SetupError("no /dev/net/tun: load the tun module"),
     "tapbox: no /dev/net/tun: load the tun module\n"),
    (SetupError("tapbox: cannot fork"), "tapbox: cannot fork\n"),
    (AllowlistError("a.txt:2: invalid port", problem="invalid port"),
     "tapbox: a.txt:2: invalid port\n"),
])
def test_main_prints_tapbox_errors_as_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        error: TapboxError, printed: str) -> None:
    def failing_run(command: Any, options: Any) -> int:
        raise error

    monkeypatch.setattr(tapbox.runner, "run", failing_run)
    assert cli.main(["--", "true"]) == 125
    assert capsys.readouterr().err == printed


def test_log_subcommand_is_dispatched_to_its_own_parser(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["log"]) == 2
    assert "usage: tapbox log show FILE" in capsys.readouterr().err
    assert cli.main(["log", "show", str(tmp_path / "missing.jsonl")]) == 1
    assert "tapbox: " in capsys.readouterr().err
    assert log_cli.main(["show", str(tmp_path / "missing.jsonl")]) == 1


def test_runner_takes_options_built_in_python() -> None:
    """The runner needs no argparse namespace: options from the model alone run a command."""
    options = RunOptions(network=NetworkOptions(enabled=False)).validate()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert tapbox.runner.run(["sh", "-c", "exit 7"], options) == 7
    # The caller's signal mask is left as it was (a blocked SIGINT leaked into every process
    # the test session started afterwards: Ctrl-C no longer reached them).
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


def test_console_script_and_module_entry_points() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'tapbox = "tapbox.cli:entry"' in pyproject
    assert callable(cli.entry)
    script = subprocess.run([sys.executable, "-c", "from tapbox.cli import entry; entry()",
                             "-n", "--", "sh", "-c", "exit 5"], cwd=REPO_ROOT,
                            env=tapbox_env(), capture_output=True, text=True, timeout=60)
    assert script.returncode == 5, script.stderr
    module = subprocess.run([sys.executable, "-m", "tapbox", "--help"], cwd=REPO_ROOT,
                            env=tapbox_env(), capture_output=True, text=True, timeout=60)
    assert module.returncode == 0 and "--profile FILE" in module.stdout, module.stderr
