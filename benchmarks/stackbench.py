"""The stack alone: the Python cost of one 1-byte round trip through netstack, with no I/O.

How this works: one `netstack.Interface`, as the engine configures it (virtio-net header,
checksum offload), and a scripted sandbox that completes a handshake and then, N times, sends
one byte (acknowledging our last byte) and takes our answer: a data segment in, the events,
`tcp_recv`, `tcp_send` of one byte, the frames out; as the engine drives it for a ping-pong.
No kernel, no sockets, no trio: what is left is the Python work per round trip, so the figure
is steady on a busy machine, and under `valgrind --tool=callgrind` its instruction count is
the same from run to run (run it with N and with 0 and subtract).

    python3 benchmarks/stackbench.py [N]          # microseconds of CPU per round trip
    python3 benchmarks/stackbench.py --bulk [N]   # per 64 KB segment sent to the sandbox
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's netstack

from netstack import events as ev  # noqa: E402
from netstack.iface import Interface, InterfaceConfig  # noqa: E402
from netstack.wire import checksum, vnet  # noqa: E402

SANDBOX_MAC = bytes.fromhex("020000000001")
GATEWAY_MAC = InterfaceConfig().gateway_mac
SANDBOX_IP = bytes([10, 0, 2, 100])
REMOTE_IP = bytes([192, 0, 2, 10])
SPORT, DPORT = 40000, 7
ACK, PSH, SYN = 0x10, 0x08, 0x02


def frame(seq: int, ack: int, flags: int, payload: bytes = b"", options: bytes = b"") -> bytes:
    """A frame from the sandbox, as its kernel hands it over (vnet header: checksum valid)."""
    tcp_len = 20 + len(options)
    tcp = bytearray(struct.pack("!HHIIBBHHH", SPORT, DPORT, seq, ack, (tcp_len // 4) << 4,
                                flags, 65535, 0, 0) + options + payload)
    pseudo = checksum.pseudo_header_sum(SANDBOX_IP, REMOTE_IP, 6, len(tcp))
    struct.pack_into("!H", tcp, 16, checksum.finish(pseudo + checksum.ones_sum(tcp)))
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                               SANDBOX_IP, REMOTE_IP))
    struct.pack_into("!H", ip, 10, checksum.checksum(ip))
    head = struct.pack("=BBHHHH", vnet.F_DATA_VALID, 0, 0, 0, 0, 0)
    return head + GATEWAY_MAC + SANDBOX_MAC + b"\x08\x00" + bytes(ip) + bytes(tcp)


def our_seq(out: bytes) -> int:
    """The sequence number of a segment we sent (after vnet 10, Ethernet 14, IPv4 20 bytes)."""
    return int(struct.unpack_from("!I", out, 10 + 14 + 20 + 4)[0])


def run(rounds: int, bulk: bool = False) -> float:
    stack = Interface(InterfaceConfig(isn_key=bytes(16), vnet_hdr=True, checksum_offload=True))
    now = 1.0
    mss = struct.pack("!BBH", 2, 4, 65480)
    stack.receive(frame(1000, 0, SYN, options=mss), now)
    (request,) = stack.take_events()
    assert isinstance(request, ev.TcpConnectRequest)
    flow = request.flow
    stack.tcp_accept(flow, now)
    (synack,) = stack.take_frames()
    ours = our_seq(synack) + 1
    theirs = 1001
    stack.receive(frame(theirs, ours, ACK), now)
    stack.take_events()
    if bulk:
        return _bulk(stack, flow, rounds, theirs, ours, now)
    inputs = [frame(theirs + i, ours + i, ACK | PSH, b"x") for i in range(rounds)]
    start = time.process_time()
    for data in inputs:
        now += 0.0001
        stack.receive(data, now)
        for event in stack.take_events():
            if isinstance(event, ev.TcpReadable):
                stack.tcp_recv(flow, 256 * 1024)
        stack.take_frames()
        stack.tcp_send(flow, b"y", now)
        stack.take_events()
        stack.take_frames()
        stack.poll(now)
    elapsed = time.process_time() - start
    assert stack.connection(flow) is not None and not stack.drops, dict(stack.drops)
    return elapsed


def _bulk(stack: Interface, flow: ev.Flow, rounds: int, theirs: int, ours: int,
          now: float) -> float:
    """Download: a full-sized segment to the sandbox per round, then its ACK."""
    chunk = bytes(SEGMENT)
    acks = [frame(theirs, ours + (i + 1) * SEGMENT, ACK) for i in range(rounds)]
    start = time.process_time()
    for ack in acks:
        now += 0.0001
        assert stack.tcp_send(flow, chunk, now) == SEGMENT
        stack.take_events()
        (segment,) = stack.take_frames()
        stack.receive(ack, now)
        stack.take_events()
        stack.take_frames()
        stack.poll(now)
    elapsed = time.process_time() - start
    assert not stack.drops, dict(stack.drops)
    return elapsed


SEGMENT = 65480  # a full segment at MTU 65520 (the MSS the sandbox's SYN offers here)

if __name__ == "__main__":
    bulk = "--bulk" in sys.argv[1:]
    numbers = [a for a in sys.argv[1:] if a != "--bulk"]
    n = int(numbers[0]) if numbers else (2000 if bulk else 20000)
    seconds = run(n, bulk)
    what = "full-sized segment sent" if bulk else "round trip"
    if n:
        print(f"{seconds / n * 1e6:.2f} us of CPU per {what} through the stack ({n} rounds)")
