"""One tapbox run: allowlist, sandbox, engine, command, exit status — in that order.

Everything that can fail is done before the command runs (the allowlist parses, the DNS
upstream is known, the sandbox is set up, the engine reads the TAP device); only then is the
sandbox told to exec. If the engine fails afterwards, the command is killed: tapbox never
leaves a command running without its firewall.
"""

from __future__ import annotations

import argparse
import os
import sys

from tapbox.allowlist import Allowlist, AllowlistError, Rule, load_file, parse_rule
from tapbox.errors import SetupError
from tapbox.sandbox import Sandbox, SandboxConfig, SignalForwarder

EXIT_TAPBOX_FAILED = 125


def load_rules(files: list[str], rules: list[str]) -> list[Rule]:
    """All rules from -F files and --allow options; an AllowlistError names file:line."""
    loaded: list[Rule] = []
    for path in files:
        loaded.extend(load_file(path))
    for text in rules:
        loaded.append(parse_rule(text))
    return loaded


def _upstreams(args: argparse.Namespace) -> list[tuple[str, int]]:
    from tapbox.dns import parse_upstream, upstreams_from_resolv_conf

    if args.dns_upstream:
        try:
            return [parse_upstream(text) for text in args.dns_upstream]
        except ValueError as exc:
            raise SetupError(f"--dns-upstream: {exc}") from None
    return upstreams_from_resolv_conf()


def run(args: argparse.Namespace) -> int:
    if args.no_network:
        return _run_sandbox(args, network=False)
    try:
        rules = load_rules(args.files, args.rules)
    except AllowlistError as exc:
        raise SetupError(str(exc)) from None
    if not rules:
        print("tapbox: the allowlist is empty: no network access is allowed", file=sys.stderr)
    return _run_sandbox(args, network=True, rules=rules)


def _run_sandbox(args: argparse.Namespace, network: bool, rules: list[Rule] | None = None) -> int:
    upstreams = _upstreams(args) if network else []
    if network and not upstreams and any(r.name for r in rules or []):
        print("tapbox: no DNS upstream (none in /etc/resolv.conf; use --dns-upstream): "
              "names will not resolve", file=sys.stderr)
    forwarder = SignalForwarder()
    try:
        sandbox = Sandbox.spawn(SandboxConfig(argv=args.command, network=network,
                                              mtu=args.mtu, root=args.root))
    except BaseException:
        forwarder.restore()
        raise
    forwarder.start(sandbox.pid)
    try:
        if not network:
            sandbox.start()
            return sandbox.wait_status()
        import trio

        return trio.run(_serve, sandbox, rules or [], upstreams, args)
    finally:
        forwarder.stop()
        if sandbox.returncode is None:
            sandbox.kill()
            sandbox.wait_status()
        sandbox.close()


async def _serve(sandbox: Sandbox, rules: list[Rule], upstreams: list[tuple[str, int]],
                 args: argparse.Namespace) -> int:
    import trio

    from netstack.iface import InterfaceConfig
    from tapbox.audit import Audit
    from tapbox.dns import DnsForwarder
    from tapbox.engine import Engine, EngineConfig, EngineError
    from tapbox.policy import Policy

    assert sandbox.tap_fd is not None
    audit = Audit(verbose=args.verbose)
    policy = Policy(Allowlist(rules))
    dns = DnsForwarder(policy, upstreams, on_event=audit.dns, aaaa=False)
    config = EngineConfig(interface=InterfaceConfig(mtu=args.mtu, isn_key=os.urandom(16)))
    engine = Engine(sandbox.tap_fd, policy, dns, audit, config)
    status = EXIT_TAPBOX_FAILED
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            sandbox.start()
            status = await sandbox.wait()
            nursery.cancel_scope.cancel()
    except EngineError as exc:
        audit.say(f"the network engine failed ({exc}); the command was stopped")
        return EXIT_TAPBOX_FAILED
    finally:
        os.close(sandbox.tap_fd)
    return status
