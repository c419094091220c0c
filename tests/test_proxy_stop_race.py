"""A stopping proxy resets no connection the kernel completed (issue 12, item 4).

Between a worker's last accept() and the close of its listener the kernel may still
complete handshakes into that listener's queue, and the close resets them. The race
is hit here on purpose: a client process opens connections as fast as it can (each
sends a hash-derived payload, half-closes and must read it all back) while the proxy
gets SIGTERM, a few times. Every connection must be served intact or refused (SYNs
the stopping proxy no longer takes: retransmitted, then refused once it is gone).
Both data paths.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy_harness import Server, echo, run_proxy, wait_for

ROUNDS = 3
BINDS = 16

# Connections as fast as one process opens them, `inflight` at a time, for `seconds`;
# each sends a payload of its own, half-closes and reads the echo to EOF. Prints the
# counts as JSON once every connection ended (bounded: `limit` seconds in all).
_CLIENT = r"""
import errno, hashlib, json, selectors, socket, sys, time
ports = [int(p) for p in sys.argv[1].split(",")]
seconds, inflight, limit = float(sys.argv[2]), int(sys.argv[3]), 20.0
sel = selectors.DefaultSelector()
counts = {"ok": 0, "refused": 0, "reset": 0, "truncated": 0, "other": []}
t0 = time.monotonic()
started = 0
live = {}

def start():
    global started
    i = started
    started += 1
    data = hashlib.sha256(b"%d" % i).digest() * (4 + i % 60)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", ports[i % len(ports)]))
    live[s] = [data, bytearray(), "connect"]
    sel.register(s, selectors.EVENT_WRITE)

def end(s, what):
    sel.unregister(s)
    s.close()
    del live[s]
    if what in counts:
        counts[what] += 1
    else:
        counts["other"].append(what)

while True:
    now = time.monotonic()
    if now - t0 > limit:
        for s in list(live):
            end(s, "timed out in state " + live[s][2])
        break
    while now - t0 < seconds and len(live) < inflight:
        start()
    if not live and now - t0 >= seconds:
        break
    for key, _ in sel.select(0.05):
        s = key.fileobj
        data, got, state = live[s]
        try:
            if state == "connect":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, errno.errorcode.get(err, str(err)))
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                live[s][2] = "read"
                sel.modify(s, selectors.EVENT_READ)
                continue
            chunk = s.recv(65536)
            if chunk:
                got += chunk
                continue
            ok = hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            end(s, "ok" if ok else "truncated")
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                end(s, "refused")
            elif exc.errno in (errno.ECONNRESET, errno.EPIPE):
                end(s, "reset")
            else:
                end(s, f"{state}: {exc!r}")
print(json.dumps({**counts, "started": started}))
"""


# every test here runs on both data paths (the `relay` fixture, tests/conftest.py)
pytestmark = pytest.mark.usefixtures("relay")


def _conf(server_port: int, binds_n: int = BINDS) -> str:
    # Many listeners per worker: a worker takes what each one queued, then closes them
    # one after the other, so the first ones stay open a while after their last accept.
    binds = ", ".join(["'mptcp@127.0.0.1:0'"] * binds_n)
    return (
        '[global]\nworkers = 2\nmetrics = ""\nlog = "none"\n'
        f"[frontend.fe]\nbind = [{binds}]\nbackend = 'be'\nmaxconn = 4000\n"
        f"[backend.be]\nserver.s = 'tcp@127.0.0.1:{server_port}'\n"
    )


def test_sigterm_during_a_connection_burst_resets_nothing(tmp_path: Path) -> None:
    """SIGTERM while connections arrive as fast as a client can open them, ROUNDS
    times: none reset or cut short, each served or refused."""
    results = []
    with Server(echo) as srv:
        for _ in range(ROUNDS):
            with run_proxy(tmp_path, _conf(srv.port)) as px:
                client = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        _CLIENT,
                        ",".join(map(str, px.ports("fe"))),
                        "0.6",
                        "200",
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(0.3)
                px.signal(signal.SIGTERM)
                assert px.proc.wait(30) == 0, px.log()
                out, _ = client.communicate(timeout=40)
            got = json.loads(out)
            results.append(got)
            assert got["ok"] > 0, got
    summary = "; ".join(
        f"ok {r['ok']} refused {r['refused']} reset {r['reset']} truncated {r['truncated']}"
        f" other {r['other'][:3]}"
        for r in results
    )
    print(summary)
    for r in results:
        assert (r["reset"], r["truncated"], r["other"]) == (0, 0, []), summary
        assert r["ok"] + r["refused"] == r["started"], summary


def test_reload_removing_binds_during_a_connection_burst_resets_nothing(tmp_path: Path) -> None:
    """Reloads that drop listening addresses while connections arrive as fast as a
    client opens them (16 -> 8 -> 2 binds; port 0 binds get new sockets at each reload,
    so every old one is dropped): they close with the old workers' copies, and none of
    their connections is reset."""
    with Server(echo) as srv, run_proxy(tmp_path, _conf(srv.port)) as px:
        ports = px.ports("fe")
        client = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, ",".join(map(str, ports)), "1.2", "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n, keep in enumerate((8, 2), 1):
            time.sleep(0.3)
            (tmp_path / "proxy.toml").write_text(_conf(srv.port, keep))
            px.signal(signal.SIGHUP)
            wait_for(lambda n=n: px.log().count("reloaded") >= n, what=f"reload {n}")
        out, _ = client.communicate(timeout=40)
    r = json.loads(out)
    print(r)
    assert r["ok"] > 0, r
    assert (r["reset"], r["truncated"], r["other"]) == (0, 0, []), r
    assert r["ok"] + r["refused"] == r["started"], r
