"""One health state (issue 15, item 2): servers are checked once, by the master's
checker process, and every worker follows it; tcp-check send/expect, check port/addr,
check-send-proxy. Real proxy, real servers; both data paths."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from mptcpkit.proxy.config import ConfigError, parse_text
from mptcpkit.proxy.ctlserver import request
from proxy_harness import Server, connect, echo, free_port, recv_all, run_proxy, wait_for
from test_proxy_e2e import _conf

# every test here runs on both data paths (the `relay` fixture, tests/conftest.py)
pytestmark = pytest.mark.usefixtures("relay")


def _ping(port: int) -> bytes:
    with connect(port, mptcp=True) as c:
        c.sendall(b"ping")
        return recv_all(c, 4)


def test_checked_once_logged_once(tmp_path: Path, relay: str) -> None:
    """Two workers, one server going down and up: each transition is logged once (each
    worker checked and logged on its own), and both workers stop and resume using it."""
    port = free_port()
    srv = Server(echo, port=port)
    check = 'check = { interval = "100ms", rise = 1, fall = 1, timeout = "500ms" }'
    conf = _conf(
        "mptcp@127.0.0.1:0",
        {"a": f'"tcp@127.0.0.1:{port}"'},
        extra_be=check + "\nretries = 0",
        glob=f'workers = 2\nmetrics = ""\nstats-socket = "unix@{tmp_path}/ctl.sock"',
    )
    with run_proxy(tmp_path, conf) as px:
        fe = px.port("fe")
        assert _ping(fe) == b"ping"
        srv.close()
        wait_for(lambda: "server a is DOWN" in px.log(), what="DOWN")
        wait_for(lambda: _state(tmp_path) == "DOWN", what="every worker to follow")
        for _ in range(6):  # whichever worker takes it knows: no connect is tried
            assert _ping(fe) == b""
        srv = Server(echo, port=port)
        try:
            wait_for(lambda: "server a is UP" in px.log(), what="UP")
            wait_for(lambda: _state(tmp_path) == "UP", what="every worker to follow")
            for _ in range(6):
                assert _ping(fe) == b"ping"
        finally:
            srv.close()
        px.stop()
        log = px.log()
        assert log.count("server a is DOWN") == 1 and log.count("server a is UP") == 1, log
        assert "checks: backend be: server a is DOWN (check failed: ECONNREFUSED)" in log
        assert log.count("ended='no server available'") >= 6, log
        assert "connect to a" not in log  # down: no worker tried it


def _state(tmp: Path) -> str:
    """Server a's state as the workers see it (MIXED while they disagree)."""
    rows = json.loads(request(f"{tmp}/ctl.sock", "show servers json"))
    return str(rows[0]["state"])


def test_maint_pauses_the_checks(tmp_path: Path) -> None:
    """HAProxy does not check a server in maintenance: `set server ... state maint`
    stops the checker's connects to it, `ready` resumes them."""
    srv = Server(echo)  # with no traffic, each connection it gets is a check
    check = 'check = { interval = "100ms", rise = 1, fall = 1, timeout = "500ms" }'
    conf = _conf(
        "mptcp@127.0.0.1:0",
        {"a": f'"{srv.address}"'},
        extra_be=check,
        glob=f'workers = 2\nmetrics = ""\nstats-socket = "unix@{tmp_path}/ctl.sock"',
    )
    with srv, run_proxy(tmp_path, conf):
        wait_for(lambda: srv.accepted >= 2, what="the checks")
        assert request(f"{tmp_path}/ctl.sock", "set server be/a state maint").startswith("ok")
        # A check already under way ends (a connect: at once): wait for a quiet 0.3 s.
        seen, quiet_since = srv.accepted, time.monotonic()
        while time.monotonic() - quiet_since < 0.3:
            time.sleep(0.05)
            if srv.accepted != seen:
                seen, quiet_since = srv.accepted, time.monotonic()
        time.sleep(1.0)  # ten check intervals: checked, it would take ~10 connections
        # one straggler is a check that a stalled (loaded) checker began before maint
        checked = srv.accepted - seen
        assert checked <= 1, f"a server in maint was checked {checked} times"
        assert _state(tmp_path) == "MAINT"
        assert request(f"{tmp_path}/ctl.sock", "set server be/a state ready").startswith("ok")
        wait_for(lambda: srv.accepted > seen, what="the checks to resume")
        wait_for(lambda: _state(tmp_path) == "UP", what="UP again")


def _pong(c: socket.socket) -> None:
    """A check responder: '+PONG' to 'PING', '+PONG proxy' if a PROXY header came first."""
    data = b""
    while data.count(b"\n") < (2 if data.startswith(b"PROXY ") else 1):
        got = c.recv(4096)
        if not got:
            return
        data += got
    proxied = data.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    if data.splitlines()[-1].strip() == b"PING":
        c.sendall(b"+PONG proxy\r\n" if proxied else b"+PONG\r\n")


def test_send_expect_port_addr_send_proxy(tmp_path: Path, relay: str) -> None:
    with Server(echo) as traffic, Server(_pong) as pong:
        addr = f'"tcp@127.0.0.1:{traffic.port}"'
        common = f'port = {pong.port}, addr = "127.0.0.1", send = "PING\\r\\n", fall = 1'
        # One backend per expectation: good (expect), bad (expect fails), proxied.
        conf = (
            '[global]\nworkers = 1\nmetrics = ""\n'
            f'[frontend.fe]\nbind = "mptcp@127.0.0.1:0"\nbackend = "good"\n'
            f'[frontend.f2]\nbind = "tcp@127.0.0.1:0"\nbackend = "bad"\n'
            f'[frontend.f3]\nbind = "tcp@127.0.0.1:0"\nbackend = "proxied"\n'
            f"[backend.good]\nserver.a = {addr}\n"
            f'check = {{ interval = "100ms", {common}, expect = "+PONG" }}\n'
            f"[backend.bad]\nserver.b = {addr}\n"
            f'check = {{ interval = "100ms", {common}, expect = "+NOPE" }}\n'
            f"[backend.proxied]\nserver.c = {addr}\n"
            f'check = {{ interval = "100ms", {common}, send-proxy = true, '
            'expect-regex = "^\\\\+PONG proxy$" }\n'
        )
        with run_proxy(tmp_path, conf) as px:
            wait_for(lambda: "server b is DOWN" in px.log(), what="b DOWN")
            assert "server b is DOWN (check failed: expected '+NOPE', got '+PONG')" in px.log()
            assert pong.accepted >= 3  # the checks went to the check port
            assert _ping(px.port("fe")) == b"ping"
            with connect(px.port("f3"), mptcp=False) as c:
                c.sendall(b"ping")
                assert recv_all(c, 4) == b"ping"
            px.stop()
            log = px.log()
            assert "server a is DOWN" not in log and "server c is DOWN" not in log, log


def test_observe_layer4(tmp_path: Path, relay: str) -> None:
    """Passive checks: the check port answers, the traffic port refuses; with
    `observe = "layer4"` the refused connects take the server down (logged once)."""
    dead = free_port()
    with Server(echo) as alive:
        check = f'check = {{ interval = "1h", port = {alive.port}, fall = 2, observe = "layer4" }}'
        conf = _conf(
            "mptcp@127.0.0.1:0",
            {"a": f'"tcp@127.0.0.1:{dead}"'},
            extra_be=check + "\nretries = 0",
            glob=f'workers = 2\nmetrics = ""\nstats-socket = "unix@{tmp_path}/ctl.sock"',
        )
        with run_proxy(tmp_path, conf) as px:
            fe = px.port("fe")
            wait_for(lambda: alive.accepted >= 1, what="the first check")
            assert _state(tmp_path) == "UP"
            for _ in range(2):
                assert _ping(fe) == b""  # refused
            wait_for(lambda: "observe layer4" in px.log(), what="DOWN")
            wait_for(lambda: _state(tmp_path) == "DOWN", what="every worker to follow")
            px.stop()
            log = px.log()
            assert log.count("server a is DOWN (observe layer4") == 1, log


@pytest.mark.parametrize(
    ("check", "key"),
    [
        ('{ expect-regex = "(" }', "expect-regex"),
        ('{ addr = "localhost" }', "addr"),
        ('{ fastinter = "0s" }', "fastinter"),
        ("{ port = 70000 }", "port"),
        ('{ observe = "layer7" }', "observe"),
    ],
)
def test_check_options_fail_closed(check: str, key: str) -> None:
    text = _conf("tcp@127.0.0.1:0", {"a": '"tcp@127.0.0.1:1"'}, extra_be=f"check = {check}")
    with pytest.raises(ConfigError) as ei:
        parse_text(text)
    assert key in str(ei.value)


def test_check_options_read() -> None:
    text = _conf(
        "tcp@127.0.0.1:0",
        {"a": '"tcp@127.0.0.1:1"'},
        extra_be='check = { interval = "2s", fastinter = "200ms", downinter = "5s", '
        'send = "HELO\\r\\n", expect = "250", port = 25, send-proxy = true }',
    )
    c = parse_text(text).backends["be"].check
    assert c is not None
    assert (c.interval, c.fastinter, c.downinter) == (2.0, 0.2, 5.0)
    assert (c.send, c.expect, c.port, c.send_proxy) == (b"HELO\r\n", "250", 25, True)
