"""The benchmark's fake servers, run by run.py as one process inside the benchmark netns.

Theory of operation
-------------------
Every server listens on a TEST-NET address that run.py has put on ``lo`` of its throwaway
network namespace, so nothing here can be reached from, or reach, beyond this machine:

``echo``  TCP 192.0.2.10:7001   echoes every byte (1-byte ping-pong); one thread per connection.
``rr``    TCP 192.0.2.10:7002   reads a SIZE-byte request, answers SIZE bytes, closes first
                                (connection-rate test); a few threads accept in turn.
``hold``  TCP 192.0.2.10:7003   keeps every connection open, echoes what arrives, closes on EOF;
                                one selector thread for any number of connections.
``http``  TCP 192.0.2.10:8080   answers any request with a small HTTP/1.1 200 and closes.
``dns``   UDP 198.51.100.53:53  authoritative for ``test.``: ``bench.test`` A 203.0.113.10 (an
                                address not on this namespace's lo: tapbox strips the host's
                                own addresses from DNS answers); other names in the zone
                                NXDOMAIN, names outside it REFUSED.

iperf3 runs as its own process (run.py starts it). When everything listens the process prints
``ready`` on stdout, then serves until stdin closes or it is killed. Every accepted socket has a
timeout, so a stuck client cannot wedge a server thread for long.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

SERVER_IP = "192.0.2.10"
BENCH_ADDRESS = "203.0.113.10"  # what bench.test resolves to (only resolved, never connected)
DNS_IP = "198.51.100.53"
ECHO_PORT = 7001
RR_PORT = 7002
HOLD_PORT = 7003
HTTP_PORT = 8080
DNS_PORT = 53
RR_SIZE = 1024
ZONE = dns.name.from_text("test.")
BENCH_NAME = dns.name.from_text("bench.test.")
HTTP_BODY = b"hello, world\n"
HTTP_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                 + str(len(HTTP_BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + HTTP_BODY)
BACKLOG = 4096


def _listen(ip: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(BACKLOG)
    return sock


def _spawn(target: object, *args: object) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()  # type: ignore[arg-type]


# ----- echo ------------------------------------------------------------------------------------

def _echo_conn(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(120.0)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def serve_echo(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        _spawn(_echo_conn, conn)


# ----- request/response, one connection each -----------------------------------------------

def serve_rr(listener: socket.socket) -> None:
    response = b"r" * RR_SIZE
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5.0)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                need = RR_SIZE
                while need:
                    data = conn.recv(need)
                    if not data:
                        break
                    need -= len(data)
                if not need:
                    conn.sendall(response)
            except OSError:
                pass


# ----- hold: many idle connections -------------------------------------------------------------

def serve_hold(listener: socket.socket) -> None:
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, True)
                continue
            conn = key.fileobj  # type: ignore[assignment]
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                try:
                    conn.send(data)
                except OSError:
                    pass
            else:
                sel.unregister(conn)
                conn.close()


# ----- HTTP ------------------------------------------------------------------------------------

def _http_conn(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(5.0)
        try:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            conn.sendall(HTTP_RESPONSE)
        except OSError:
            pass


def serve_http(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        _spawn(_http_conn, conn)


# ----- DNS -------------------------------------------------------------------------------------

def dns_answer(wire: bytes) -> bytes | None:
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # anything unparseable is dropped, as a real server would
        return None
    response = dns.message.make_response(query)
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire()
    question = query.question[0]
    if not question.name.is_subdomain(ZONE):
        response.set_rcode(dns.rcode.REFUSED)
        return response.to_wire()
    response.flags |= dns.flags.AA
    if question.name != BENCH_NAME:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif question.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(BENCH_NAME, 60, dns.rdataclass.IN,
                                                   dns.rdatatype.A, BENCH_ADDRESS))
    return response.to_wire()


def serve_dns(sock: socket.socket) -> None:
    while True:
        wire, peer = sock.recvfrom(65535)
        reply = dns_answer(wire)
        if reply is not None:
            try:
                sock.sendto(reply, peer)
            except OSError:
                pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rr-threads", type=int, default=4)
    args = parser.parse_args()
    echo = _listen(SERVER_IP, ECHO_PORT)
    rr = _listen(SERVER_IP, RR_PORT)
    held = _listen(SERVER_IP, HOLD_PORT)
    http = _listen(SERVER_IP, HTTP_PORT)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((DNS_IP, DNS_PORT))
    _spawn(serve_echo, echo)
    for _ in range(max(1, args.rr_threads)):
        _spawn(serve_rr, rr)
    _spawn(serve_hold, held)
    _spawn(serve_http, http)
    _spawn(serve_dns, udp)
    print("ready", flush=True)
    sys.stdin.read()  # serve until run.py closes our stdin (or kills us)
    return 0


if __name__ == "__main__":
    sys.exit(main())
