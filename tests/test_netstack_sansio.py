"""netstack is sans-IO, and no input makes it raise (the h11-style fuzz invariant).

Two properties from DESIGN.md: the package imports nothing that does I/O or reads a clock, and
any byte string into `Interface.receive` is either handled (a reply, an event, a state change
the caller can see) or dropped and counted; nothing raises, and the `internal-error-*` counter
(the stack's own catch-all for bugs) never moves.
"""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netstack_helpers import (
    DNS_IP,
    GATEWAY_IP,
    REMOTE_IP,
    REMOTE_IP_2,
    SANDBOX_IP,
    SANDBOX_MAC,
    Peer,
    check_frame,
    ether,
    ip_frame,
    make_iface,
)
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP

import netstack
from netstack.iface import Interface
from netstack.tcp import TcpConfig

FORBIDDEN = {"trio", "socket", "os", "time", "asyncio", "select", "subprocess", "threading",
             "fcntl", "importlib", "selectors", "signal", "multiprocessing"}
NETSTACK_DIR = Path(netstack.__file__).resolve().parent
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----- no I/O ---------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__"):
            names.add("__import__")
    return names


def test_netstack_imports_no_io_or_clock() -> None:
    files = sorted(NETSTACK_DIR.rglob("*.py"))
    assert len(files) >= 10, files  # the walk really found the package
    offenders = {str(f.relative_to(NETSTACK_DIR)): sorted(imported_modules(f) & FORBIDDEN)
                 for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert all("__import__" not in imported_modules(f) for f in files)


def test_the_checker_sees_imports() -> None:
    sample = NETSTACK_DIR / "iface.py"
    assert {"hashlib", "netstack"} <= imported_modules(sample)


# ----- fuzz -----------------------------------------------------------------------------------


def feed_checked(iface: Interface, frame: bytes, now: float) -> bool:
    """Feed one frame; True if it was dropped-and-counted or visibly handled."""
    before = sum(iface.drops.values())
    iface.receive(frame, now)
    frames = iface.take_frames()
    events = iface.take_events()
    for f in frames:
        check_frame(f)
    assert not [k for k in iface.drops if k.startswith("internal-error")], dict(iface.drops)
    return sum(iface.drops.values()) > before or bool(frames) or bool(events)


def templates() -> list[bytes]:
    """Valid frames of every kind the stack understands, built by scapy."""
    bcast = "ff:ff:ff:ff:ff:ff"
    return [
        raw(ether(ARP(op=1, hwsrc=SANDBOX_MAC, psrc=SANDBOX_IP, pdst=GATEWAY_IP), dst=bcast)),
        ip_frame(ICMP(type=8, id=7, seq=1) / b"ping", dst=GATEWAY_IP),
        ip_frame(UDP(sport=5353, dport=53) / b"\x12\x34\x01\x00query", dst=DNS_IP),
        ip_frame(TCP(sport=40000, dport=443, flags="S", seq=1,
                     options=[("MSS", 1460), ("NOP", None), ("WScale", 7)])),
        ip_frame(TCP(sport=40000, dport=80, flags="PA", seq=5, ack=9) / b"GET /",
                 dst=REMOTE_IP_2),
        ip_frame(TCP(sport=40000, dport=80, flags="FA", seq=5, ack=9)),
        ip_frame(UDP(sport=1, dport=2) / b"x", options=b"\x01\x01\x01\x00"),
    ]


TEMPLATES = templates()


def fix_checksums(frame: bytes) -> bytes:
    """Let scapy recompute the IP and L4 checksums of a (mutated) frame, if it can."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    try:
        pkt = IP(frame[14:])
        del pkt.chksum
        for layer in (TCP, UDP, ICMP):
            if layer in pkt:
                del pkt[layer].chksum
        return frame[:14] + raw(pkt)
    except Exception:  # scapy could not make sense of it: keep the mutated bytes
        return frame


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(frame) - 1))
        frame[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del frame[draw(st.integers(0, len(frame))):]
    frame += draw(st.binary(max_size=8))
    data = bytes(frame)
    return fix_checksums(data) if draw(st.booleans()) else data


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_and_are_counted(frame: bytes) -> None:
    iface = make_iface()
    assert feed_checked(iface, frame, 1.0)


@FUZZ
@given(mutated_frames())
def test_mutated_frames_never_raise_and_are_counted(frame: bytes) -> None:
    iface = make_iface()
    assert feed_checked(iface, frame, 1.0)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(mutated_frames(), max_size=8))
def test_mutated_frame_sequences(frames: list[bytes]) -> None:
    iface = make_iface(max_pending=2)
    for i, frame in enumerate(frames):
        assert feed_checked(iface, frame, 1.0 + i)
        assert iface.pending_count <= 2


# ----- fuzz: valid segments against a live connection ----------------------------------------


@st.composite
def segments(draw: st.DrawFn) -> dict[str, object]:
    return {
        "flags": draw(st.integers(0, 0x3F)),
        "seq_off": draw(st.one_of(st.integers(-5, 5), st.integers(-70000, 70000),
                                  st.integers(0, 2**32 - 1))),
        "ack_off": draw(st.one_of(st.integers(-5, 5), st.integers(0, 2**32 - 1))),
        "payload": draw(st.binary(max_size=40)),
        "window": draw(st.sampled_from([0, 1, 100, 65535])),
        "dt": draw(st.sampled_from([0.0, 0.0, 0.05, 0.3, 1.5, 40.0])),
        "app": draw(st.sampled_from(["none", "none", "recv", "send", "close", "abort"])),
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(segments(), min_size=1, max_size=12), st.booleans())
def test_random_valid_segments_against_a_connection(steps: list[dict[str, object]],
                                                    scaled: bool) -> None:
    cfg = TcpConfig(rcv_buffer=2000, snd_buffer=3000, max_retries=3, time_wait=5.0)
    peer = Peer(make_iface(cfg), isn=2**32 - 20)
    peer.handshake(mss=500, wscale=2 if scaled else None)
    for step in steps:
        peer.now += float(step["dt"])  # type: ignore[arg-type]
        peer.iface.poll(peer.now)
        app = step["app"]
        if app == "recv":
            peer.iface.tcp_recv(peer.flow, 700)
        elif app == "send":
            peer.iface.tcp_send(peer.flow, b"s" * 900, peer.now)
        elif app == "close":
            peer.iface.tcp_close(peer.flow, peer.now)
        elif app == "abort":
            peer.iface.tcp_abort(peer.flow)
        # Aim near the stack's own edges so segments land in, around and outside its windows.
        live = peer.iface.connection(peer.flow)
        seq_base = live.rcv_nxt if live is not None else peer.seq
        ack_base = live.snd_nxt if live is not None else peer.rcv_nxt
        frame = peer.segment(int(step["flags"]),  # type: ignore[call-overload]
                             seq=seq_base + int(step["seq_off"]),  # type: ignore[call-overload]
                             ack=ack_base + int(step["ack_off"]),  # type: ignore[call-overload]
                             payload=step["payload"],  # type: ignore[arg-type]
                             window=step["window"])  # type: ignore[arg-type]
        peer.iface.receive(frame, peer.now)
        for f in peer.iface.take_frames():
            check_frame(f)
        peer.iface.take_events()
        assert not [k for k in peer.iface.drops if k.startswith("internal-error")], \
            dict(peer.iface.drops)
        conn = peer.iface.connection(peer.flow)
        if conn is not None:
            assert len(conn.rcv_buf) <= cfg.rcv_buffer
            assert conn.ooo_bytes <= cfg.rcv_buffer
            assert len(conn.snd_buf) <= cfg.snd_buffer
        assert peer.iface.connection_count <= 1
    # Whatever happened, time alone ends every connection's timers eventually.
    for _ in range(50):
        when = peer.iface.poll_at()
        if when is None:
            break
        peer.now = max(peer.now, when)
        peer.iface.poll(peer.now)
        for f in peer.iface.take_frames():
            check_frame(f)
    assert not [k for k in peer.iface.drops if k.startswith("internal-error")]


def test_remote_ip_constants_are_test_net() -> None:
    for ip in (REMOTE_IP, REMOTE_IP_2):
        assert ip.startswith(("192.0.2.", "198.51.100.", "203.0.113."))
