"""The benchmark's client, run inside a sandbox (or, for "direct" figures, in the benchmark netns).

Theory of operation
-------------------
`run.py` starts this script as the sandboxed command (``tapbox ... -- python3 agent.py``, or as
the process an ``unshare`` + slirp4netns/pasta set-up runs) and drives it over stdin/stdout with
one JSON object per line: a request ``{"op": ..., ...}`` in, one reply object out. The first line
the agent writes is ``{"hello": pid}``, which also tells run.py that the agent is running inside
its namespaces. Every operation is bounded in time and never raises out of the loop: a failure is
the reply ``{"error": "..."}``.

Operations
----------
``wait_net``  host, port, timeout: connect until a connection succeeds (the link is up).
``run``       argv, timeout: run a program (iperf3), reply rc, stdout, stderr tail.
``pingpong``  host, port, count: 1-byte ping-pong over one open connection; the RTTs (us).
``connrate``  host, port, duration, size: connect, send size bytes, read size bytes, close,
              as often as possible for duration seconds; count, elapsed, errors.
``dns``       server, name, duration: A queries over UDP, one in flight; count, elapsed, the
              latencies (us), errors.
``hold``      host, port, count, timeout: open count connections and keep them; then reply and
              wait for the next request (``release``) before closing them.
``exit``      reply, then exit.

Only the standard library and dnspython (``dns`` op) are used, so the agent starts quickly.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any

Reply = dict[str, Any]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_net(host: str, port: int, timeout: float) -> Reply:
    deadline = time.monotonic() + timeout
    last = ""
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return {"ok": True, "tries": tries}
        except OSError as exc:
            last = str(exc)
            time.sleep(0.01)
    return {"error": f"no connection to {host}:{port} within {timeout:.0f} s: {last}"}


def run(argv: list[str], timeout: float) -> Reply:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"{argv[0]} timed out after {timeout:.0f} s"}
    except OSError as exc:
        return {"error": f"{argv[0]}: {exc}"}
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-2000:]}


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        data = sock.recv(size)
        if not data:
            raise ConnectionError("connection closed early")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def pingpong(host: str, port: int, count: int, timeout: float) -> Reply:
    rtts: list[float] = []
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=5.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(20):  # warm-up: first exchanges pay for lazy set-up on every path
            sock.sendall(b"x")
            _recv_exact(sock, 1)
        clock = time.perf_counter
        for _ in range(count):
            start = clock()
            sock.sendall(b"x")
            _recv_exact(sock, 1)
            rtts.append((clock() - start) * 1e6)
            if start > deadline:
                break
    return {"rtts_us": rtts}


def connrate(host: str, port: int, duration: float, size: int) -> Reply:
    request = b"q" * size
    count = errors = 0
    last_error = ""
    start = time.monotonic()
    end = start + duration
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=5.0) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(request)
                _recv_exact(sock, size)
            count += 1
        except OSError as exc:
            errors += 1
            last_error = str(exc)
            if errors > 100:
                break
    elapsed = time.monotonic() - start
    return {"count": count, "elapsed": elapsed, "errors": errors, "last_error": last_error}


def dns_queries(server: str, port: int, name: str, duration: float) -> Reply:
    import dns.message
    import dns.query
    import dns.rcode

    latencies: list[float] = []
    errors = 0
    last_error = ""
    clock = time.perf_counter
    start = clock()
    end = start + duration
    while clock() < end:
        query = dns.message.make_query(name, "A")
        t0 = clock()
        try:
            answer = dns.query.udp(query, server, port=port, timeout=2.0)
            if answer.rcode() != dns.rcode.NOERROR or not answer.answer:
                raise ValueError(f"answer {dns.rcode.to_text(answer.rcode())} without records")
            latencies.append((clock() - t0) * 1e6)
        except Exception as exc:  # any failure is counted and reported
            errors += 1
            last_error = f"{type(exc).__name__}: {exc}"
            if errors > 20:
                break
    return {"count": len(latencies), "elapsed": clock() - start, "latencies_us": latencies,
            "errors": errors, "last_error": last_error}


def hold(host: str, port: int, count: int, timeout: float) -> tuple[Reply, list[socket.socket]]:
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                return {"error": f"only {len(socks)} connections within {timeout:.0f} s"}, socks
            sock = socket.create_connection((host, port), timeout=5.0)
            socks.append(sock)
        # One byte each way proves every connection is established end to end.
        for sock in socks:
            sock.sendall(b"h")
        for sock in socks:
            _recv_exact(sock, 1)
    except OSError as exc:
        return {"error": f"after {len(socks)} connections: {exc}"}, socks
    return {"held": len(socks)}, socks


def handle(request: dict[str, Any], held: list[socket.socket]) -> Reply:
    op = request.get("op")
    if op == "wait_net":
        return wait_net(request["host"], request["port"], request.get("timeout", 10.0))
    if op == "run":
        return run(request["argv"], request.get("timeout", 60.0))
    if op == "pingpong":
        return pingpong(request["host"], request["port"], request["count"],
                        request.get("timeout", 60.0))
    if op == "connrate":
        return connrate(request["host"], request["port"], request["duration"],
                        request.get("size", 1024))
    if op == "dns":
        return dns_queries(request["server"], request.get("port", 53), request["name"],
                           request["duration"])
    if op == "hold":
        reply, socks = hold(request["host"], request["port"], request["count"],
                            request.get("timeout", 60.0))
        held.extend(socks)
        return reply
    if op == "release":
        for sock in held:
            sock.close()
        n = len(held)
        held.clear()
        return {"released": n}
    return {"error": f"unknown op {op!r}"}


def main() -> int:
    _raise_nofile()
    out = sys.stdout
    out.write(json.dumps({"hello": os.getpid()}) + "\n")
    out.flush()
    held: list[socket.socket] = []
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError as exc:
            reply: Reply = {"error": f"bad request: {exc}"}
        else:
            if request.get("op") == "exit":
                out.write(json.dumps({"bye": True}) + "\n")
                out.flush()
                return 0
            try:
                reply = handle(request, held)
            except Exception as exc:  # reported to run.py, never fatal
                reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
