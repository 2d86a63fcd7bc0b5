"""The record of one flow the sandbox opened: what was decided, and how it went.

The engine fills a `FlowRecord` as the flow goes (decision at the start, byte counts while it
runs, `ended`/`ending` at the end) and hands it to the audit layer twice: when it starts and
when it ends. `process` is filled in by tapbox.attribution when that is on (`--log`).
"""

from __future__ import annotations

from dataclasses import dataclass

from netstack.events import Flow


@dataclass(frozen=True)
class ProcessInfo:
    """The sandboxed process holding a flow's socket, or why it is not known (pid None)."""

    pid: int | None
    comm: str = ""
    cmdline: tuple[str, ...] = ()
    shared_with: tuple[int, ...] = ()  # other processes holding the same socket
    note: str = ""  # why the process is unknown

    @property
    def known(self) -> bool:
        return self.pid is not None


@dataclass
class FlowRecord:
    flow: Flow
    allowed: bool
    reason: str  # the policy's words: "rule 192.0.2.0/24", "dns api.example.com via ...", ...
    rule: str | None  # the rule text that admitted it
    name: str | None  # the DNS name the destination was learned from
    started: float  # wall-clock seconds (time.time())
    ended: float | None = None
    bytes_out: int = 0  # sandbox -> destination
    bytes_in: int = 0  # destination -> sandbox
    datagrams_out: int = 0  # UDP/ICMP: datagrams from the sandbox (for a denied flow: refused)
    datagrams_in: int = 0  # UDP/ICMP: datagrams to the sandbox
    # How it ended: "denied", "closed", "reset by sandbox", "reset by host",
    # "refused upstream", "connect timeout", "unreachable upstream", "idle timeout", ...
    ending: str | None = None
    # Audit mode: the allowlist denies this flow but it was let through (allowed is True).
    would_deny: bool = False
    process: ProcessInfo | None = None  # None: not attributed (or not yet)
    attributing: bool = False  # attribution is under way; process is not known yet
    serial: int = 0  # set by the audit layer: the flow's number in this run (1, 2, ...)
