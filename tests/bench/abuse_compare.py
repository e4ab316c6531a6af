#!/usr/bin/env python3
"""Two of issue 27's reproduced cases, run against two collector binaries side by side.

    python3 tests/bench/abuse_compare.py BASELINE_BIN CURRENT_BIN [--sessions 5000] [--half 2000]

* MCP sessions: N `initialize` calls on /mcp (each opens a session, as a 2025-11-25 client's does),
  then the collector's RSS;
* half-sent HTTP requests from one host (127.0.0.2): M connections that send half a request
  head, then how many the collector still holds one second later.

Standard library only; no root needed. Prints one table.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

INIT = json.dumps({
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {},
               "clientInfo": {"name": "abuse", "version": "1"}},
})


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start(binary, d):
    g, h = free_port(), free_port()
    log = open(os.path.join(d, "collector.log"), "w")
    p = subprocess.Popen([binary, "--grpc-listen", f"127.0.0.1:{g}", "--http-listen",
                          f"127.0.0.1:{h}", "--data-dir", os.path.join(d, "data")],
                         stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", h, timeout=2)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return p, h
        except OSError:
            pass
        time.sleep(0.1)
    p.kill()
    raise SystemExit(f"{binary} did not become ready")


def sessions(port, n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(n):
        c.request("POST", "/mcp", INIT, {"content-type": "application/json",
                                         "accept": "application/json, text/event-stream",
                                         "host": f"127.0.0.1:{port}"})
        r = c.getresponse()
        r.read()


def half_requests(port, n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    time.sleep(1.0)
    held = 0
    for s in socks:
        s.setblocking(False)
        try:
            s.recv(1)  # b"": closed by the collector; bytes: answered, not held
        except BlockingIOError:
            held += 1  # nothing to read and not closed: still held
        except OSError:
            pass  # reset by the collector
    for s in socks:
        s.close()
    return held


def run(binary, n_sessions, n_half):
    with tempfile.TemporaryDirectory() as d:
        p, port = start(binary, d)
        try:
            base = rss_mb(p.pid)
            t0 = time.time()
            sessions(port, n_sessions)
            took = time.time() - t0
            after = rss_mb(p.pid)
            held = half_requests(port, n_half)
            return base, after, took, held
        finally:
            p.kill()
            p.wait()


def main():
    args = sys.argv[1:]
    if len(args) < 2:
        raise SystemExit(__doc__)
    n_sessions, n_half = 5000, 2000
    if "--sessions" in args:
        n_sessions = int(args[args.index("--sessions") + 1])
    if "--half" in args:
        n_half = int(args[args.index("--half") + 1])
    rows = []
    for name, b in (("baseline", args[0]), ("current", args[1])):
        rows.append((name,) + run(b, n_sessions, n_half))
    print(f"{n_sessions} MCP initialize calls; {n_half} half-sent HTTP requests from 127.0.0.2")
    print(f"{'build':<10} {'RSS before MB':>14} {'RSS after MB':>13} {'init/s':>8} {'half requests held after 1 s':>30}")
    for name, base, after, took, held in rows:
        print(f"{name:<10} {base:>14.1f} {after:>13.1f} {n_sessions / took:>8.0f} {held:>30}")


if __name__ == "__main__":
    main()
